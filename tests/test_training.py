"""Training the way people train (#18): calls with fewer / other-dtype inputs, Trainer, dtype moves,
autocast, per-block gradient checkpointing. Every check compares against the eager model or PEFT."""
from __future__ import annotations

import pytest
import torch

import graftlib
from models import build, inputs_for


def _hidden(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if getattr(output, "last_hidden_state", None) is not None else output[0]


def _randomise(g: graftlib.Grafted, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in g.store.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _padded(inputs: dict) -> dict:
    inputs = dict(inputs)
    mask = inputs["attention_mask"].clone()
    mask[0, -2:] = 0
    inputs["attention_mask"] = mask
    return inputs


# -- 1. calls with a subset of the traced inputs, other integer / bool dtypes ------------------------------
#: (architecture, how the call differs from the trace's inputs)
CALLS = [
    ("bert", "no token_type_ids"),
    ("bert", "no token_type_ids, no attention_mask"),
    ("bert", "int32 ids, bool mask"),
    ("bert", "float mask, no token_type_ids"),
    ("llama", "int32 ids, bool mask"),
    ("llama", "no attention_mask"),
    ("gpt2", "int32 ids, float mask"),
]


def _call_inputs(arch: str, how: str) -> dict:
    inputs = _padded(inputs_for(arch, batch=3, seq=5))
    if "no token_type_ids" in how:
        inputs.pop("token_type_ids", None)
    if "no attention_mask" in how:
        inputs.pop("attention_mask")
    if "int32 ids" in how:
        inputs["input_ids"] = inputs["input_ids"].int()
    if "bool mask" in how:
        inputs["attention_mask"] = inputs["attention_mask"].bool()
    if "float mask" in how:
        inputs["attention_mask"] = inputs["attention_mask"].float()
    return inputs


@pytest.mark.parametrize("arch,how", CALLS, ids=[f"{a}-{h}" for a, h in CALLS])
def test_subset_and_dtype_calls_run_the_traced_graph(arch: str, how: str) -> None:
    model, _ = build(arch)
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    inputs = _call_inputs(arch, how)
    with torch.no_grad():
        got, want = _hidden(g(**inputs)), _hidden(model(**inputs))
    assert torch.equal(got, want), (got - want).abs().max()  # LoRA B is zero: exactly the model
    traced_keys = set(g.input_names) | set(g._traced.constants)
    assert all(key <= traced_keys | {"<unpadded>"} for key in g._variants), "no new trace for a subset call"


def test_token_type_default_is_the_models_buffer() -> None:
    model, _ = build("bert")
    g = graftlib.apply(model, "lora(q,r=2)")
    default = g._input_defaults["token_type_ids"]
    assert model.embeddings.token_type_ids.abs().sum() == 0 and default.kind == "zeros"
    import inspect
    assert inspect.signature(model.forward).parameters["token_type_ids"].default is None


def test_first_compiled_call_with_ids_and_mask_needs_no_warm_up() -> None:
    model, _ = build("bert")
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    _randomise(g)
    inputs = _call_inputs("bert", "no token_type_ids")
    torch._dynamo.reset()
    compiled = torch.compile(g, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = _hidden(compiled(**inputs))
        want = _hidden(g(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"])))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
