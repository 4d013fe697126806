"""LoRA on every architecture: exact at B = 0, the hand formula with random B, merge, dynamic shapes.

The reference for "random B" is independent of the graph rewrite: the eager model with forward hooks
that add ``s * B(A(x))`` at each selected module.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import graftlib
from graftlib.runtime import op_histogram, specialise
from models import build, example_inputs, inputs_for, run_with_site_deltas

CASES = [
    ("bert", "lora(q,v,r=8)", 4),
    ("roberta", "lora(q,v,r=8)", 4),
    ("distilbert", "lora(q,v,r=8)", 4),
    ("gpt2", "lora(q,v,r=8)", 4),
    ("llama", "lora(q,v,r=8)", 4),
    ("mistral", "lora(q,v,r=8)", 4),
    ("qwen2", "lora(q,v,r=8)", 4),
    ("t5", "lora(q,v,r=8)", 12),          # encoder self, decoder self and cross attention
    ("bart", "lora(q,v,r=8)", 12),
    ("vit", "lora(q,v,r=8)", 4),
    ("clip", "lora(q,v,r=8)", 8),         # text and vision towers
    ("hand", "lora(q,v,r=8)", 4),         # names found from the attention call, not a table
    ("resnet", "lora(conv,r=4)", 8),
    ("convnext", "lora(conv,r=4)", 4),    # depthwise convs included: one factorisation per group
    ("convnet", "lora(conv,r=4)", 3),     # stride, padding, dilation, groups
    ("bert", "lora(q,k,v,o,ffn,r=4,alpha=16,rslora=true)", 12),
    ("gpt2", "lora(all-linear,r=4)", 8),
    ("gpt2", "lora(embed,r=4)", 1),
    ("llama", "lora(embed,r=4) + lora(o,gate,r=2,name=second)", 5),
    ("t5", "lora(embed,r=4)", 2),         # encoder and decoder embed_tokens share one tied weight
]
IDS = [f"{arch}:{spec}" for arch, spec, _ in CASES]
_cache: dict[int, tuple] = {}


def _first(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state") and output.last_hidden_state is not None:
        return output.last_hidden_state
    return output[0] if not hasattr(output, "logits_per_image") else output.logits_per_image


def _case(i: int):
    if i not in _cache:
        arch, spec, _ = CASES[i]
        model, inputs = build(arch)
        g = graftlib.apply(model, spec, example_inputs(arch)).eval()
        _cache[i] = (model, inputs, g)
    return _cache[i]


def _randomise(g: graftlib.Grafted, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.store.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _hook_reference(model, g: graftlib.Grafted, inputs) -> torch.Tensor:
    """Eager model + hooks adding each LoRA branch computed by hand."""
    from graftlib.select import SiteIndex

    index = SiteIndex.build(g.base_graph_module)
    deltas = []
    for record in g.records:
        if record.adapter not in g.active_adapters:
            continue
        r, alpha = record.config["r"], record.config["alpha"] or float(record.config["r"])
        scale = alpha / math.sqrt(r) if record.config["rslora"] else alpha / r
        for key, params in g.store.tensors(record.adapter).items():
            site = index.by_key(key)

            def delta(mod, x, site=site, p=params, s=scale):
                if site.kind == "embedding":
                    return s * F.embedding(x, p["lora_embedding_A"].T) @ p["lora_embedding_B"].T
                if site.kind == "conv":
                    c = site.conv
                    low = F.conv2d(x, p["lora_A"], None, c["stride"], c["padding"], c["dilation"], c["groups"])
                    return s * F.conv2d(low, p["lora_B"], groups=c["groups"])
                return s * x @ p["lora_A"].T @ p["lora_B"].T

            deltas.append((site, delta))
    return _first(run_with_site_deltas(model, deltas, inputs))


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_lora(i):
    arch, spec, n_sites = CASES[i]
    model, inputs, g = _case(i)
    g.graph.lint()
    assert len(g.sites()) == n_sites
    base_names = {n.name for n in g.base_graph.nodes}
    added = [n for n in g.graph.nodes if n.name not in base_names]
    tags = [(n.meta.get("custom") or {}).get("graft") for n in added]
    assert added and all(tags), "every inserted node carries a provenance tag"
    assert {t["site"] for t in tags} == set(g.sites())
    assert sum(t["role"] == "join" for t in tags) >= n_sites
    with torch.no_grad():
        base = _first(model(**inputs))
        assert torch.equal(_first(g(**inputs)), base), "zero-initialised branch must be exact"
    _randomise(g)
    with torch.no_grad():
        grafted = _first(g(**inputs))
    expected = _hook_reference(model, g, inputs)
    assert not torch.allclose(grafted, base, atol=1e-4), "random weights must change the output"
    torch.testing.assert_close(grafted, expected, atol=1e-5, rtol=1e-5)

    merged = g.merge().eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(merged(**inputs)), grafted, atol=1e-5, rtol=1e-5)
    assert merged.op_histogram() == op_histogram(specialise(g.base_graph, (), False))
    with torch.no_grad():
        assert torch.equal(_first(model(**inputs)), base), "merge(inplace=False) must not touch the model"

    other = inputs_for(arch, batch=3, seq=9, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(_first(g(**other)), _hook_reference(model, g, other), atol=1e-5, rtol=1e-5)

    with g.disable_adapters(), torch.no_grad():
        assert torch.equal(_first(g(**inputs)), base)
