"""Adapters on parallel blocks: attention and MLP read the same norm, their outputs are summed, then
added to the residual (Falcon ``x + dropout(mlp + attn)`` with an in-place ``+=``; GPT-J ``attn + mlp + x``).

The residual is the ``x`` both sublayers were computed from, found by dataflow (passes/adapter.py), not
the other sublayer's output; the formula is the pre-LN one over the sublayer output ``f``:
``y = x + attn + f + B(u)``, ``u = f`` (pfeiffer, houlsby) or ``x`` (parallel). Checked by hand on
the eager model: the MLP's output hooked to ``f + B(u)``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graftlib
from graftlib.tools.matrix_families import build_family, family_inputs

KINDS = {"pfeiffer": (F.relu, 1.0, "f"), "houlsby": (F.silu, 1.0, "f"), "parallel": (F.relu, 4.0, "x")}
X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


class ParallelBlock(nn.Module):
    """``x + dropout(mlp(h) + attn(h))``, h = LN(x); ``inplace``: Falcon's ``mlp_output += attn``."""

    def __init__(self, inplace: bool, dim: int = 16) -> None:
        super().__init__()
        self.inplace = inplace
        self.norm = nn.LayerNorm(dim)
        self.attn_in, self.attn_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        attn = self.attn_out(torch.softmax(self.attn_in(h) @ h.transpose(1, 2), -1) @ h)
        f = self.mlp(h)
        if self.inplace:
            f += attn
            return x + self.drop(f)
        return attn + f + x


class Hand(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ParallelBlock(inplace), ParallelBlock(inplace)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


CASES = {"falcon": ("h", "mlp"), "gptj": ("h", "mlp"), "hand-inplace": ("layers", "mlp"), "hand-sum": ("layers", "mlp")}


def _model(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    if name.startswith("hand"):
        return Hand(name == "hand-inplace").eval(), {"x": X}
    return build_family(name), family_inputs(name)


def _first(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _by_hand(model: nn.Module, g: graftlib.Grafted, name: str, kind: str, inputs: dict) -> torch.Tensor:
    act, scale, reads = KINDS[kind]
    stack, mlp = CASES[name]
    handles = []
    for layer, params in zip(getattr(model, stack), g.store.tensors("default").values(), strict=True):
        captured: dict[str, torch.Tensor] = {}

        def keep(_m, args, kwargs, c=captured):
            c["x"] = args[0] if args else kwargs["hidden_states"]
        handles.append(layer.register_forward_pre_hook(keep, with_kwargs=True))

        def patch(_m: nn.Module, _args: tuple, f: torch.Tensor, p=params, c=captured) -> torch.Tensor:
            u = f if reads == "f" else c["x"]
            return f + scale * F.linear(act(F.linear(u, p["down_weight"], p["down_bias"])), p["up_weight"], p["up_bias"])
        handles.append(getattr(layer, mlp).register_forward_hook(patch))
    try:
        with torch.no_grad():
            return _first(model(**inputs))
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", list(CASES))
def test_adapter_on_a_parallel_block_by_hand(name: str, kind: str) -> None:
    model, inputs = _model(name)
    example = inputs if name.startswith("hand") else None
    g = graftlib.apply(model, f"adapter(ffn, m=4, kind={kind})", example_inputs=example).eval()
    assert len(g.sites()) == 2
    with torch.no_grad():
        base = _first(model(**inputs))
        assert torch.equal(_first(g(**inputs)), base)
        gen = torch.Generator().manual_seed(3)
        for tensor in g.trainable_parameters().values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
        got = _first(g(**inputs))
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, _by_hand(model, g, name, kind, inputs), rtol=1e-5, atol=1e-5)
    with g.disable_adapters(), torch.no_grad():
        assert torch.equal(_first(g(**inputs)), base)
