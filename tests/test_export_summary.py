"""The export summary's parameter counts add up: ONNX initialisers = base + kept adapters + buffers (#23)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graftlib


class _WithBuffer(nn.Module):
    """A linear layer plus a buffer the forward reads (as BERT's position_ids is read)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.register_buffer("offsets", torch.arange(6, dtype=torch.float32).reshape(1, 6))

    def forward(self, x):
        return self.proj(x) + self.offsets


@pytest.mark.parametrize("merge", [False, True])
def test_exported_count_is_base_plus_adapters_plus_buffers(tmp_path, merge: bool) -> None:
    torch.manual_seed(0)
    model = _WithBuffer().eval()
    g = graftlib.apply(model, 'lora("proj", r=2)', example_inputs=(torch.randn(3, 6),))
    report = graftlib.export_onnx(g, tmp_path / "m.onnx", merge=merge, verify=False, progress=False)
    base = sum(p.numel() for p in model.parameters())
    adapters = sum(p.numel() for p in g.store.parameters())
    assert (report.base_parameters, report.adapter_parameters) == (base, adapters) == (42, 24)
    assert report.buffers == {"offsets": model.offsets.numel()} == {"offsets": 6}
    kept = 0 if merge else adapters
    assert report.exported_parameters == base + kept + 6
    line = next(line for line in str(report).splitlines() if "parameters:" in line)
    assert "includes 6 buffer elements (offsets)" in line
    assert ("merged adapters are inside the base weights" in line) == merge
