"""Adapters on a mixture-of-experts FFN with a gated shared expert (Qwen2-MoE).

``mlp(h) = experts(h) + sigmoid(gate(h)) * shared_expert(h)``: the shared expert's down projection is
found by name, its gated output is summed with the routed experts' output (a sibling, not the residual:
dataflow, passes/adapter.py), and the adapter sits at the residual add over the whole block output
``f = mlp(h)``: ``y = x + f + B(u)``, ``u = f`` (pfeiffer, houlsby) or ``x`` (parallel). Checked by
hand on the eager model; a gate from the input with no sibling sum is still refused
(tests/test_adapter_through.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graftlib
from graftlib.tools.matrix_families import build_family, family_inputs

KINDS = {"pfeiffer": (F.relu, 1.0, "f"), "houlsby": (F.silu, 1.0, "f"), "parallel": (F.relu, 4.0, "x")}


def _by_hand(model: torch.nn.Module, g: graftlib.Grafted, kind: str, inputs: dict) -> torch.Tensor:
    act, scale, reads = KINDS[kind]
    handles = []
    for layer, params in zip(model.layers, g.store.tensors("default").values(), strict=True):
        captured: dict[str, torch.Tensor] = {}
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda _m, args, c=captured: c.update(x=args[0])))                 # the residual x

        def patch(_m, _args, f: torch.Tensor, p=params, c=captured) -> torch.Tensor:
            u = f if reads == "f" else c["x"]
            return f + scale * F.linear(act(F.linear(u, p["down_weight"], p["down_bias"])), p["up_weight"], p["up_bias"])
        handles.append(layer.mlp.register_forward_hook(patch))
    try:
        with torch.no_grad():
            return model(**inputs).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_over_a_gated_shared_expert_by_hand(kind: str) -> None:
    model, inputs = build_family("qwen2-moe"), family_inputs("qwen2-moe")
    g = graftlib.apply(model, f"adapter(ffn, m=4, kind={kind})").eval()
    assert g.sites() == ["layers.0.mlp.shared_expert.down_proj", "layers.1.mlp.shared_expert.down_proj"]
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
        assert torch.equal(g(**inputs).last_hidden_state, base)
        gen = torch.Generator().manual_seed(3)
        for tensor in g.trainable_parameters().values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
        got = g(**inputs).last_hidden_state
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, _by_hand(model, g, kind, inputs), rtol=1e-5, atol=1e-5)
    with g.disable_adapters(), torch.no_grad():
        assert torch.equal(g(**inputs).last_hidden_state, base)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_experts_without_a_shared_expert_point_to_lora_experts(family: str) -> None:
    with pytest.raises(graftlib.GraftSpecError, match=r"mixtures of experts stored as 3-D stacks .* lora\(experts\)"):
        graftlib.apply(build_family(family), "adapter(ffn, m=4)")
