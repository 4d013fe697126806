"""Adapters at a channels-first residual add (ConvNeXt): the MLP runs channels-last, is scaled, then
permuted back before ``x + f``.

ConvNeXt's block is ``x + permute(gamma * pwconv2(act(pwconv1(LN(permute(dwconv(x)))))))``: a pre-norm
block whose norm sits inside the sublayer (after the depthwise conv), so the formula is the pre-LN one,
``x + f + B(u)`` with ``u = f`` (pfeiffer, houlsby) or ``x`` (parallel), and ``B`` (a linear bottleneck
over channels) runs on ``u`` permuted channels-last, its output permuted back. Checked by hand on the
eager model (transformers' ConvNextModel and a hand-written block whose scale comes after the permute).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graftlib
from graftlib.tools.matrix_families import build_family

KINDS = {"pfeiffer": (F.relu, 1.0, "f"), "houlsby": (F.silu, 1.0, "f"), "parallel": (F.relu, 4.0, "x")}
IMAGE = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class ChannelsFirstBlock(nn.Module):
    """``x + gamma[:, None, None] * permute(fc2(gelu(fc1(LN(permute(conv(x)))))))``: the scale after the permute."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 16), nn.Linear(16, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.tap = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x).permute(0, 2, 3, 1))                      # (B, H, W, C)
        f = self.fc2(F.gelu(self.fc1(h))).permute(0, 3, 1, 2)                # (B, C, H, W)
        return x + self.tap(self.gamma[:, None, None] * f)


class Hand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.blocks = nn.ModuleList([ChannelsFirstBlock(), ChannelsFirstBlock()])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixel_values)
        for block in self.blocks:
            x = block(x)
        return x


def _blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(block, the module whose output is f as it enters the add) in order."""
    if isinstance(model, Hand):
        return [(b, b.tap) for b in model.blocks]
    return [(layer, layer.drop_path) for stage in model.encoder.stages for layer in stage.layers]


def _by_hand(model: nn.Module, g: graftlib.Grafted, kind: str) -> torch.Tensor:
    """x + f + B(u) per block, B = scale * Up(act(Down(u))) over channels: u permuted channels-last."""
    act, scale, reads = KINDS[kind]
    tensors = list(g.store.tensors("default").values())         # the adapter named default
    handles = []
    for (block, tap), params in zip(_blocks(model), tensors, strict=True):
        captured: dict[str, torch.Tensor] = {}
        handles.append(block.register_forward_pre_hook(lambda _m, args, c=captured: c.update(x=args[0])))

        def patch(_m: nn.Module, _args: tuple, f: torch.Tensor, p=params, c=captured) -> torch.Tensor:
            u = (f if reads == "f" else c["x"]).permute(0, 2, 3, 1)                           # (B, H, W, C)
            up = scale * F.linear(act(F.linear(u, p["down_weight"], p["down_bias"])), p["up_weight"], p["up_bias"])
            return f + up.permute(0, 3, 1, 2)                                                 # (B, C, H, W)
        handles.append(tap.register_forward_hook(patch))
    try:
        with torch.no_grad():
            out = model(IMAGE)
        return out if isinstance(out, torch.Tensor) else out.last_hidden_state
    finally:
        for handle in handles:
            handle.remove()


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_family("convnext") if name == "convnext" else Hand().eval()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", ["convnext", "hand"])
def test_adapter_at_a_channels_first_add_by_hand(name: str, kind: str) -> None:
    model = _model(name)
    g = graftlib.apply(model, f"adapter(ffn, m=4, kind={kind})", example_inputs={"pixel_values": IMAGE}).eval()
    assert len(g.sites()) == 2

    def last(out):
        return out if isinstance(out, torch.Tensor) else out.last_hidden_state
    with torch.no_grad():
        base = last(model(IMAGE))
        assert torch.equal(last(g(pixel_values=IMAGE)), base)              # Up is zero at init
        gen = torch.Generator().manual_seed(3)
        for tensor in g.trainable_parameters().values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
        got = last(g(pixel_values=IMAGE))
    want = _by_hand(model, g, kind)
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with g.disable_adapters(), torch.no_grad():
        assert torch.equal(last(g(pixel_values=IMAGE)), base)


def test_fusion_at_a_channels_first_add_is_refused() -> None:
    g = graftlib.apply(_model("hand"), "adapter(ffn, m=4, name=a) + adapter(ffn, m=4, name=b)",
                       example_inputs={"pixel_values": IMAGE})
    with pytest.raises(graftlib.GraftError, match="channels-first"):
        g.add("fusion(a, b)")



def test_a_lora_join_on_the_projection_keeps_the_layout() -> None:
    """A LoRA join on pwconv2 sits between the projection and the permute: the layout is still found
    (stage 0 has C = W = 8, so only the permute tells channels-first apart). LoRA's B stays zero."""
    model = _model("convnext")
    g = graftlib.apply(model, "lora(down, r=2, name=l) + adapter(ffn, m=4, kind=houlsby)",
                       example_inputs={"pixel_values": IMAGE}).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for name, tensor in g.trainable_parameters().items():
            if ".graft.default." in name:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
        got = g(pixel_values=IMAGE).last_hidden_state
    torch.testing.assert_close(got, _by_hand(model, g, "houlsby"), rtol=1e-5, atol=1e-5)
