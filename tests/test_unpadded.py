"""Unpadded batches run a second trace with Hugging Face's mask skip (graftlib/unpadded.py).

Reference for every check: the masked graph of the same grafted module (verified against hand formulas
in test_lora.py), called directly, and the base model for padded batches.
"""
from __future__ import annotations

import pytest
import torch

import graftlib
from graftlib.unpadded import UNPADDED, masked_attention_count
from models import build, inputs_for

# (architecture, masked SDPA calls left in the unpadded twin; None: no twin is kept)
CASES = [
    ("bert", 0),
    ("gpt2", 0),
    ("llama", 0),
    ("bart", 0),
    ("t5", None),        # eager attention with a position bias: nothing to skip
    ("mistral", None),   # sliding-window attention keeps its mask, as Hugging Face does
]
TOL = 1e-5


def _grafted(arch: str) -> tuple[torch.nn.Module, graftlib.Grafted]:
    model, _ = build(arch)
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    torch.manual_seed(1)
    for param in g.trainable_parameters().values():
        torch.nn.init.normal_(param, std=0.2)
    return model, g


def _hidden(out) -> torch.Tensor:
    if isinstance(out, dict) or hasattr(out, "keys"):
        return next(iter(out.values()))
    return out[0] if isinstance(out, (tuple, list)) else out


def _masked_graph(g: graftlib.Grafted, inputs: dict) -> torch.Tensor:
    """The masked (traced) graph called directly: what forward ran before the unpadded twin existed."""
    return _hidden(g.runtime_module()(**inputs, **g._traced.constants))


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    arch, masked_left = request.param
    model, g = _grafted(arch)
    return arch, masked_left, model, g


def test_unpadded_call_equals_masked_graph(case):
    arch, masked_left, _, g = case
    inputs = inputs_for(arch, batch=3, seq=9)
    assert bool(inputs["attention_mask"].all())
    out = _hidden(g(**inputs))
    torch.testing.assert_close(out, _masked_graph(g, inputs), atol=TOL, rtol=0)
    twins = [v for k, v in g._variants.items() if UNPADDED in k]
    if masked_left is None:
        assert twins == [] and any(UNPADDED in k for k in g._no_gain)
    else:
        assert masked_attention_count(g.graph) > 0
        assert [masked_attention_count(t.graph) for t in twins] == [masked_left]


def test_padded_batch_uses_masked_graph_and_matches_base(case):
    arch, _, model, g = case
    inputs = inputs_for(arch, batch=3, seq=9)
    inputs["attention_mask"][0, -3:] = 0  # (B, N): three padded tokens in row 0
    with g.disable_adapters():
        out = _hidden(g(**inputs))
    with torch.no_grad():
        ref = _hidden(model(**inputs))
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_other_sizes_after_a_batch_of_one(case):
    arch, masked_left, _, g = case
    g._invalidate()
    first = inputs_for(arch, batch=1, seq=5)
    torch.testing.assert_close(_hidden(g(**first)), _masked_graph(g, first), atol=TOL, rtol=0)
    later = inputs_for(arch, batch=4, seq=11, seed=3)  # the twin was traced with dynamic sizes
    torch.testing.assert_close(_hidden(g(**later)), _masked_graph(g, later), atol=TOL, rtol=0)


def test_twin_follows_set_active_and_disable(case):
    arch, _, model, g = case
    inputs = inputs_for(arch, batch=2, seq=7)
    adapted = _hidden(g(**inputs))
    with torch.no_grad():
        base = _hidden(model(**inputs))
    with g.disable_adapters():
        torch.testing.assert_close(_hidden(g(**inputs)), base, atol=TOL, rtol=0)
    g.set_active([])
    torch.testing.assert_close(_hidden(g(**inputs)), base, atol=TOL, rtol=0)
    g.set_active(["default"])
    torch.testing.assert_close(_hidden(g(**inputs)), adapted, atol=TOL, rtol=0)
    assert (adapted - base).abs().max() > 1e-2  # the adapters do change the output


def test_gradients_through_twin_equal_masked_graph(case):
    arch, _, _, g = case
    inputs = inputs_for(arch, batch=2, seq=7)
    params = g.trainable_parameters()

    def grads(run) -> dict[str, torch.Tensor]:
        for p in params.values():
            p.grad = None
        run().pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in params.items()}

    through_twin = grads(lambda: _hidden(g(**inputs)))
    through_masked = grads(lambda: _masked_graph(g, inputs))
    assert through_twin.keys() == through_masked.keys() and through_twin
    for name in through_twin:
        torch.testing.assert_close(through_twin[name], through_masked[name], atol=1e-5, rtol=1e-4)


def test_merged_module_has_its_own_twin(case):
    arch, masked_left, _, g = case
    inputs = inputs_for(arch, batch=2, seq=7)
    merged = g.merge()
    torch.testing.assert_close(_hidden(merged(**inputs)), _hidden(g(**inputs)), atol=TOL, rtol=0)
    twins = [v for k, v in merged._variants.items() if UNPADDED in k]
    assert [masked_attention_count(t.graph) for t in twins] == ([] if masked_left is None else [masked_left])


def test_hand_written_models_are_not_retraced():
    model, inputs = build("hand")
    g = graftlib.apply(model, "lora(q,v,r=4)", example_inputs=inputs_for("hand", seq=7)).eval()
    out = g(**inputs)
    assert g._variants == {} and g._no_gain == set()  # no Hugging Face config: the mask is the user's
    torch.testing.assert_close(out, model(**inputs), atol=TOL, rtol=0)  # B is zero: base output


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_mixed_batch_runs_on_the_twin(arch):
    model, _ = build(arch)
    g = graftlib.apply(model, "lora(q,v,r=4,name=a) + lora(q,v,r=2,name=b)").eval()
    for param in g.trainable_parameters().values():
        torch.nn.init.normal_(param, std=0.2)
    inputs = inputs_for(arch, batch=3, seq=7)
    names = ["a", "__base__", "b"]
    mixed = _hidden(g(**inputs, adapter_names=names))
    assert [masked_attention_count(v.graph) for k, v in g._variants.items() if UNPADDED in k] == [0]
    rows = []
    for row, name in enumerate(names):
        g.set_active([] if name == "__base__" else [name])
        row_inputs = {k: v[row : row + 1] for k, v in inputs.items()}
        rows.append(_masked_graph(g, row_inputs))
    torch.testing.assert_close(mixed, torch.cat(rows), atol=TOL, rtol=0)
