"""Adapters where a norm or a scale sits between the sublayer output and the residual add.

Gemma2's post-feed-forward RMSNorm, DINOv2's layer scale and Granite's residual multiplier put
``f = post(down(h))`` into ``x + f``; the adapter adapts the value entering the add (pre-LN:
``x + f + B(f)``, parallel ``x + f + B(x)``), found by dataflow (passes/adapter.py). Each block is
checked against that formula by hand on the eager model, and a gated branch (a value computed from
the input multiplies the output) is still refused.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graftlib


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, in float32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + self.weight.float())).type_as(x)


class Block(nn.Module):
    """Pre-LN FFN block ``x + post(fc2(act(fc1(norm(x)))))``; ``tap`` marks f for the hand formula."""

    def __init__(self, post: str, dim: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 64), nn.Linear(64, dim)
        self.post = post
        self.post_norm = RMSNorm(dim)
        self.layer_scale = nn.Parameter(torch.full((dim,), 0.5))
        self.gate = nn.Linear(dim, dim)
        self.tap = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fc2(F.gelu(self.fc1(self.norm(x))))
        if self.post == "rmsnorm":
            f = self.post_norm(f)
        elif self.post == "layer_scale":
            f = f * self.layer_scale
        elif self.post == "multiplier":
            f = f * 0.25
        elif self.post == "gated":
            f = f * torch.sigmoid(self.gate(x))
        return x + self.tap(f)


class Model(nn.Module):
    def __init__(self, post: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(post), Block(post)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


POSTS = ["rmsnorm", "layer_scale", "multiplier"]
KINDS = {"pfeiffer": (F.relu, 1.0, "f"), "houlsby": (F.silu, 1.0, "f"), "parallel": (F.relu, 4.0, "x")}
X = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))


def _by_hand(model: Model, g: graftlib.Grafted, adapter: str, kind: str) -> torch.Tensor:
    act, scale, reads = KINDS[kind]
    tensors = g.store.tensors(adapter)
    handles = []
    for index, block in enumerate(model.blocks):
        (params,) = [v for k, v in tensors.items() if f"blocks.{index}." in k]
        captured: dict[str, torch.Tensor] = {}
        handles.append(block.register_forward_pre_hook(lambda _m, args, c=captured: c.update(x=args[0])))

        def patch(_m: nn.Module, _args: tuple, f: torch.Tensor, p=params, c=captured) -> torch.Tensor:
            u = f if reads == "f" else c["x"]
            hidden = act(F.linear(u, p["down_weight"], p["down_bias"]))
            return f + scale * F.linear(hidden, p["up_weight"], p["up_bias"])
        handles.append(block.tap.register_forward_hook(patch))
    try:
        with torch.no_grad():
            return model(X)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("post", POSTS)
def test_adapter_after_norm_or_scale_by_hand(post: str, kind: str) -> None:
    torch.manual_seed(0)
    model = Model(post).eval()
    g = graftlib.apply(model, f"adapter(ffn, m=4, kind={kind})", example_inputs=(X,)).eval()
    assert len(g.sites()) == 2
    with torch.no_grad():
        assert torch.equal(g(X), model(X))  # Up is zero at init
        gen = torch.Generator().manual_seed(3)
        for tensor in g.trainable_parameters().values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
        got = g(X)
    want = _by_hand(model, g, next(iter(g.adapters)), kind)
    assert (got - model(X)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with g.disable_adapters(), torch.no_grad():
        assert torch.equal(g(X), model(X))


def test_a_gate_from_the_input_is_not_a_scale() -> None:
    with pytest.raises(graftlib.GraftSpecError, match="no residual add"):
        graftlib.apply(Model("gated"), "adapter(ffn, m=4)", example_inputs=(X,))
