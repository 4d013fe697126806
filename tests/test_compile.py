"""``torch.compile(fullgraph=True)`` on grafted modules: every method, merged and mixed-adapter calls.

Each case compiles the grafted module (``aot_eager``: Dynamo with ``fullgraph=True`` raises on any
graph break, AOT autograd traces forward and backward; no C++ toolchain needed) and checks the
compiled module against the eager grafted one: eval outputs, and in training mode (dropout on, same
seed) the loss and the adapter gradients. Random non-zero adapter weights, so a dropped branch would show.
"""
from __future__ import annotations

import pytest
import torch

import graftlib
from models import build, example_inputs, inputs_for

#: (architecture, spec): every method at least once, on encoder, decoder, encoder-decoder and conv models
CASES = [
    ("bert", "lora(q,v,r=4)"),
    ("gpt2", "lora(qkv,r=4)"),
    ("llama", "lora(q,k,v,o,r=4) + adapter(ffn,m=4,name=ad)"),
    ("t5", "adalora(q,v,init_r=4)"),
    ("convnet", "lora(stem,r=2)"),
    ("hand", "lora(q,v,r=4)"),
    ("bert", "adapter(ffn,attn,m=4,name=a) + adapter(ffn,attn,m=4,name=b) + fusion(a,b)"),
    ("bert", "prompt(n=3)"),
    ("llama", "ptuning(n=3)"),
    ("llama", "prefix(n=3)"),
    ("bart", "prefix(n=2)"),
]
IDS = [f"{arch}-{spec}" for arch, spec in CASES]


def _first(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "last_hidden_state", None) is not None:
        return output.last_hidden_state
    return output[0]


def _randomise(g: graftlib.Grafted, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in g.store.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _grafted(arch: str, spec: str) -> tuple[graftlib.Grafted, dict]:
    model, _ = build(arch)
    g = graftlib.apply(model, spec, example_inputs(arch))
    _randomise(g)
    return g, inputs_for(arch, batch=3, seq=5)


def _compiled(module: torch.nn.Module) -> torch.nn.Module:
    torch._dynamo.reset()
    return torch.compile(module, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("arch,spec", CASES, ids=IDS)
def test_eval_forward_compiles_without_graph_breaks(arch: str, spec: str) -> None:
    g, inputs = _grafted(arch, spec)
    g.eval()
    with torch.no_grad():
        want = _first(g(**inputs))
        got = _first(_compiled(g)(**inputs))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,spec", [CASES[0], CASES[2], CASES[3], CASES[9]], ids=[IDS[0], IDS[2], IDS[3], IDS[9]])
def test_training_step_compiles_with_the_same_gradients(arch: str, spec: str) -> None:
    g, inputs = _grafted(arch, spec)
    g.train()

    with torch.no_grad():
        shape = _first(g(**inputs)).shape
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(1))  # a loss that sees every output

    def loss_and_grads(module: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout masks: aot_eager runs the same RNG ops in the same order
        loss = (_first(module(**inputs)) * weights).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in g.store.named_parameters() if p.grad is not None}

    want_loss, want_grads = loss_and_grads(g)
    got_loss, got_grads = loss_and_grads(_compiled(g))
    assert want_grads and got_grads.keys() == want_grads.keys()
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_merged_module_compiles() -> None:
    g, inputs = _grafted("llama", "lora(q,v,r=4)")
    merged = g.merge().eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(_compiled(merged)(**inputs)), _first(g.eval()(**inputs)),
                                   atol=1e-5, rtol=1e-5)


def test_mixed_adapter_batch_compiles_and_follows_weight_updates() -> None:
    g, inputs = _grafted("bert", "lora(q,v,r=4,name=a) + lora(q,v,r=2,name=b)")
    g.eval()
    names = ["a", "b", "a"]
    compiled = _compiled(g)
    with torch.no_grad():
        g(**inputs, adapter_names=names)  # one eager call builds the mixed graphs
        torch.testing.assert_close(_first(compiled(**inputs, adapter_names=names)),
                                   _first(g(**inputs, adapter_names=names)), atol=1e-5, rtol=1e-5)
        for param in g.store["b"].parameters():
            param.mul_(3.0)  # the compiled module must not keep stale stacked factors
        want = _first(g(**inputs, adapter_names=names))
        torch.testing.assert_close(_first(compiled(**inputs, adapter_names=names)), want, atol=1e-5, rtol=1e-5)


def test_module_rebuilt_by_to_still_compiles() -> None:
    g, inputs = _grafted("llama", "lora(q,v,r=4)")
    g = g.eval().to("cpu")  # .to() may replace tensors: the runtime graph is rebuilt eagerly, not under compile
    with torch.no_grad():
        torch.testing.assert_close(_first(_compiled(g)(**inputs)), _first(g(**inputs)), atol=1e-5, rtol=1e-5)


def test_a_graph_first_needed_under_compile_is_a_clear_error() -> None:
    g, inputs = _grafted("bert", "lora(q,v,r=4,name=a) + lora(q,v,r=2,name=b)")
    g.eval()
    with pytest.raises(Exception, match=r"mixed-batch graph for adapters \['a'\] is not built yet .* once with "
                                        r"these adapters before compiling"):
        with torch.no_grad():
            _compiled(g)(**inputs, adapter_names=["a", "a", "__base__"])
