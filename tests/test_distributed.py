"""More than one device (#20): block modules (``g.blocks()``), DDP and FSDP2 over 2 gloo processes on CPU
against a single-process run with the same global batch, meta graft -> shard -> load, distributed saves.

Every check compares numbers: the live (per-block) runtime against the flat one bit for bit, the 2-process
runs against one process (losses and adapter tensors within 1e-5), a sharded save against the single-
process module's outputs."""
from __future__ import annotations

import pytest
import torch

import graftlib
from models import build, build_with_head, inputs_for


def _hidden(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if getattr(output, "last_hidden_state", None) is not None else output[0]


def _randomise(g: graftlib.Grafted, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in g.store.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


# -- 1. g.blocks(): the live runtime equals the flat one bit for bit ------------------------------------
#: (architecture, spec, gradient checkpointing)
LIVE = [
    ("llama", "lora(q_proj, v_proj, r=4, name=a) + lora(o_proj, r=2, name=b)", False),
    ("llama", "lora(q_proj, v_proj, r=4)", True),
    ("gpt2", "lora(c_attn, r=4)", False),
    ("bert", "lora(query, value, r=4, name=a) + adapter(output.dense, reduction=4, name=b)", False),
]


def _pair(arch: str, spec: str) -> tuple[graftlib.Grafted, graftlib.Grafted, dict]:
    model, x = build(arch)
    flat, live = graftlib.apply(model, spec), graftlib.apply(model, spec)
    _randomise(flat), _randomise(live)
    return flat, live, x


@pytest.mark.parametrize("arch,spec,checkpointed", LIVE, ids=[f"{a}-{s[:24]}-{c}" for a, s, c in LIVE])
def test_blocks_equal_flat_runtime(arch: str, spec: str, checkpointed: bool) -> None:
    flat, live, x = _pair(arch, spec)
    blocks = live.blocks()
    assert [type(b).__name__ for b in blocks] == ["Block"] * len(blocks) and len(blocks) >= 2
    names = dict(blocks[0].named_parameters())  # the model's own names, relative to the block
    assert any(n.endswith("weight") and "." in n for n in names)
    for g in (flat, live):
        if checkpointed:
            g.gradient_checkpointing_enable()
        g.train()
    out_flat, out_live = _seeded(flat, x), _seeded(live, x)  # the same dropout masks
    assert torch.equal(out_flat, out_live)
    out_flat.square().mean().backward()
    out_live.square().mean().backward()
    for (name, a), b in zip(flat.store.named_parameters(), live.store.parameters()):
        assert a.grad is not None and torch.equal(a.grad, b.grad), name
    flat.eval(), live.eval()
    assert torch.equal(_hidden(flat(**x)), _hidden(live(**x)))
    live.set_active(live.active_adapters[:1])  # another adapter set: another runtime, the same blocks
    flat.set_active(flat.active_adapters[:1])
    assert torch.equal(_hidden(flat(**x)), _hidden(live(**x)))


def _seeded(g: graftlib.Grafted, x: dict) -> torch.Tensor:
    torch.manual_seed(7)
    return _hidden(g(**x))


def test_blocks_read_weights_at_call_time() -> None:
    """FSDP2 assigns gathered parameters on the owning modules around a block's call: the live runtime
    must read them there, in every variant (here: a new trace for labels=), not a cached object."""
    model = build_with_head("llama")
    g = graftlib.apply(model, "lora(q_proj, v_proj, r=4)")
    _randomise(g)
    g.train()
    block = g.blocks()[1]
    x = inputs_for("llama")
    before = g(**x, labels=x["input_ids"]).loss
    owner = block.get_submodule("mlp.down_proj")
    original = owner._parameters["weight"]
    owner._parameters["weight"] = torch.nn.Parameter(torch.zeros_like(original), requires_grad=False)
    zeroed = g(**x, labels=x["input_ids"]).loss
    owner._parameters["weight"] = original
    eager_zeroed = _eager_loss_with_zero_down(model, g, x)
    assert not torch.equal(before, zeroed)
    torch.testing.assert_close(zeroed, eager_zeroed, rtol=0, atol=1e-6)
    assert torch.equal(g(**x, labels=x["input_ids"]).loss, before)


def _eager_loss_with_zero_down(model: torch.nn.Module, g: graftlib.Grafted, x: dict) -> torch.Tensor:
    """The same call on a module grafted from a copy of the model whose layers.1 down_proj is zero."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.zero_()
    twin = graftlib.apply(other, "lora(q_proj, v_proj, r=4)")
    with torch.no_grad():
        for a, b in zip(twin.store.parameters(), g.store.parameters()):
            a.copy_(b)
    twin.train()
    return twin(**x, labels=x["input_ids"]).loss


def test_blocks_refuse_a_model_without_repeated_layers() -> None:
    from graftlib.errors import GraftError

    from collections import OrderedDict

    model = torch.nn.Sequential(OrderedDict(inp=torch.nn.Linear(4, 4), act=torch.nn.ReLU(), out=torch.nn.Linear(4, 2)))
    g = graftlib.apply(model, "lora(inp, r=2)", example_inputs=(torch.randn(2, 4),))
    with pytest.raises(GraftError, match="no repeated blocks"):
        g.blocks()
