"""The graph rounds as the eager model does where a frozen weight would change ATen's matmul path.

ATen folds ``x @ W.t()`` into one ``mm`` when the weight requires grad, and broadcasts to ``bmm`` for a
frozen weight and a non-contiguous input; grafting freezes the base weights (graftlib/folding.py).
Each case is checked bit for bit against the eager model in every grad mode and in training, and a
control shows the same graph without the folding rewrite is off (so the check can fail).
"""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
from torch import nn

import graftlib


class ProbeAttention(nn.Module):
    """SigLIP's pooling head: a learned probe attends over the tokens (nn.MultiheadAttention, batch first)."""

    def __init__(self) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, 32))
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 32)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attention(self.probe.repeat(h.shape[0], 1, 1), h, h)[0])


class Permuted(nn.Module):
    """A ConvNeXt-style Linear over a permuted feature map, with and without bias (folded; on this CPU its
    unfolded bmm happens to round as mm, so it guards the rewrite rather than shows the bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(48, 96)
        self.proj = nn.Linear(96, 40, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C, H, W)
        y = self.fc(x.permute(0, 2, 3, 1))               # (B, H, W, 96), input not contiguous
        return self.proj(y.transpose(1, 2))              # (B, W, H, 40)


class Computed(nn.Module):
    """``x @ f(W).T`` with x transposed: the operand is computed from a weight, not a view of it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32))
        self.fc = nn.Linear(32, 32)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.transpose(0, 1) @ (self.w * 2).T)


CASES = {  # name -> (model, input, spec)
    "probe-attention": (ProbeAttention, (2, 16, 32), "lora(fc,r=2)"),
    "permuted": (Permuted, (2, 48, 7, 9), "lora(fc,r=2)"),
    "computed": (Computed, (2, 16, 32), "lora(fc,r=2)"),
}
MODES = ("grad", "no_grad", "inference", "train")


def _graft(name: str) -> tuple[nn.Module, graftlib.Grafted, torch.Tensor]:
    build, shape, spec = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return model, graftlib.apply(model, spec, example_inputs=(x,)).eval(), x


def _run(module: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    module.train(mode == "train")
    context = {"no_grad": torch.no_grad, "inference": torch.inference_mode}.get(mode, torch.enable_grad)
    with context():
        return module(x).detach().clone()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_graph_rounds_as_eager(name: str, mode: str) -> None:
    model, g, x = _graft(name)
    assert torch.equal(_run(g, x, mode), _run(model, x, mode))


@pytest.mark.parametrize("name", ["probe-attention", "computed"])  # 'permuted': bmm rounds as mm here
def test_without_folding_the_graph_is_off(name: str) -> None:
    """The control: the same graph with its frozen weights' matmuls unfolded differs from eager, on a CPU
    whose mm and bmm kernels round this case apart (eager itself, frozen vs trainable, shows whether)."""
    model, g, x = _graft(name)
    frozen = copy.deepcopy(model).requires_grad_(False)
    if torch.equal(_run(frozen, x, "grad"), _run(model, x, "grad")):
        pytest.skip("this CPU's mm and bmm kernels round this case alike, so the control cannot fail here "
                    "(the bit-exact checks above still run)")
    g._eager_grad = frozenset()
    g._invalidate()
    assert not torch.equal(_run(g, x, "grad"), _run(model, x, "grad"))


@pytest.mark.parametrize("name", list(CASES))
def test_folded_graph_backward_equals_eager(name: str) -> None:
    """Training mode, adapters at their zero init: the input's gradient through the folded nodes is
    the eager model's, bit for bit."""
    model, g, x = _graft(name)
    x_graph, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    g.train()(x_graph).square().sum().backward()
    model.train()(x_eager).square().sum().backward()
    assert torch.equal(x_graph.grad, x_eager.grad)


def test_folded_graph_exports_and_compiles() -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    del onnxruntime
    model, g, x = _graft("probe-attention")
    with tempfile.TemporaryDirectory() as tmp:
        report = graftlib.export_onnx(g, os.path.join(tmp, "m.onnx"), merge=False, progress=False)
    assert report.verified and max(report.max_abs_diff.values()) < 1e-5
    compiled = torch.compile(g, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), model(x))
