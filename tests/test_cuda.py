"""Grafted modules on an accelerator (#18): device moves, CUDA autocast fp16 / bf16, a training step, merge,
mixed-adapter batches and ``torch.compile``, each against PEFT LoRA (the eager reference) on the same device.

Which device: ``GRAFTLIB_TEST_DEVICE`` (default ``cuda``). Without a GPU the CUDA tests skip, so the default
suite (CI) never depends on one. ``GRAFTLIB_TEST_DEVICE=cpu`` runs the same tests on the CPU (CPU autocast,
``aot_eager`` compile) to exercise their logic without a GPU; that mode takes ~1-2 min, so it is marked
``slow``::

    python -m pytest -q tests/test_cuda.py                                   # on a GPU machine (tools/gpu_check.sh)
    GRAFTLIB_TEST_DEVICE=cpu python -m pytest -q -m slow tests/test_cuda.py  # the same checks on the CPU

``GRAFTLIB_TEST_COMPILE_BACKEND`` picks the compile backend (default: inductor on CUDA, aot_eager on CPU).
The move to the ``meta`` device at the end runs everywhere: it shows, without a GPU, that after ``g.to(d)``
no weight, buffer or device argument of the graph is left on the CPU.

The models: tiny Llama (causal LM, labels = ids) and BERT (sequence classification) with dropout set to 0
(the dropout RNG streams are compared on the CPU in tests/test_training.py); LoRA A and B random and
copied into the PEFT twin, so a dropped or mis-scaled branch shows.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import graftlib
from models import build, build_with_head, inputs_for

DEVICE = torch.device(os.environ.get("GRAFTLIB_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
COMPILE_BACKEND = os.environ.get("GRAFTLIB_TEST_COMPILE_BACKEND", "inductor" if ON_CUDA else "aot_eager")
_NO_GPU = pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                             reason="no CUDA device (GRAFTLIB_TEST_DEVICE=cpu runs these checks on the CPU)")


def on_device(test):
    """A device test: skipped without a GPU; ``slow`` when run on the CPU."""
    return _NO_GPU(test) if ON_CUDA else pytest.mark.slow(test)


ARCHS = ["llama", "bert"]
TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
FP32_TOL = dict(rtol=1e-4, atol=1e-5)
#: under the same autocast the graph runs the eager model's aten ops: this is the usual mixed-precision slack
AUTOCAST_TOL = {torch.float16: dict(rtol=5e-3, atol=5e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
#: gradients: max abs difference relative to the largest gradient of the tensor
GRAD_REL = {None: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
AUTOCAST_DTYPES = [torch.float16, torch.bfloat16]


def _no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)
    return model


def _randomise(g: graftlib.Grafted, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in g.store.parameters():
            param.copy_((torch.randn(param.shape, generator=gen) * 0.1).to(param.device))


def _peft_twin(model: nn.Module, g: graftlib.Grafted, arch: str, adapter: str = "default") -> tuple[nn.Module, list]:
    """PEFT LoRA on a copy of `model` with `g`'s A and B (scale 1, as graftlib's lora(r=4))."""
    from peft import LoraConfig, get_peft_model

    twin = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=TARGETS[arch], r=4, lora_alpha=4))
    pairs = []
    for site in g.store[adapter].values():
        layer = twin.base_model.model.get_submodule(site.site_key)
        pairs += [(site.lora_A, layer.lora_A["default"].weight), (site.lora_B, layer.lora_B["default"].weight)]
    with torch.no_grad():
        for ours, theirs in pairs:
            theirs.copy_(ours.to(theirs.device))
    return twin, pairs


def _batch(arch: str) -> dict[str, torch.Tensor]:
    inputs = inputs_for(arch, batch=3, seq=7)
    inputs.pop("token_type_ids", None)  # the model's default, filled in by graftlib
    inputs["attention_mask"][0, -2:] = 0  # one padded row
    inputs["labels"] = inputs["input_ids"].clone() if arch == "llama" else torch.tensor([0, 2, 1])
    return {k: v.to(DEVICE) for k, v in inputs.items()}


_PAIRS: dict[str, tuple] = {}


def _pair(arch: str) -> tuple[graftlib.Grafted, nn.Module, list]:
    """(graft on DEVICE, its PEFT twin on DEVICE, [(our tensor, PEFT's)]), built once per architecture; each
    test leaves them on DEVICE in fp32 with checkpointing off."""
    if arch not in _PAIRS:
        model = _no_dropout(build_with_head(arch))
        g = graftlib.apply(model, "lora(q,v,r=4)")
        _randomise(g)
        twin, pairs = _peft_twin(model, g, arch)
        _PAIRS[arch] = g.to(DEVICE), twin.to(DEVICE), pairs
    g, twin, pairs = _PAIRS[arch]
    g.gradient_checkpointing_disable()
    return g, twin, pairs


def _on(module: nn.Module, device: torch.device) -> bool:
    tensors = list(module.parameters()) + list(module.buffers())
    return bool(tensors) and all(t.device.type == device.type for t in tensors)


# -- device moves ------------------------------------------------------------------------------------------
@on_device
@pytest.mark.parametrize("arch", ARCHS)
def test_moves_to_the_device_and_back(arch: str) -> None:
    model = _no_dropout(build_with_head(arch))
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    _randomise(g)
    twin, _ = _peft_twin(model, g, arch)
    batch = _batch(arch)
    cpu_batch = {k: v.cpu() for k, v in batch.items()}
    with torch.no_grad():
        before = g(**cpu_batch).logits
        g.to(DEVICE)
        twin.to(DEVICE).eval()
        assert _on(g, DEVICE) and _on(model, torch.device("cpu")), "the user's model stays where it was"
        got, want = g(**batch), twin(**batch)  # labels: a new input set, traced after the move
        torch.testing.assert_close(got.logits, want.logits, **FP32_TOL)
        torch.testing.assert_close(got.loss, want.loss, **FP32_TOL)
        assert got.logits.device.type == DEVICE.type
        g.to("cpu")
        assert _on(g, torch.device("cpu"))
        assert torch.equal(g(**cpu_batch).logits, before), "back on the CPU: the same graph, the same output"


# -- autocast ----------------------------------------------------------------------------------------------
def _autocast(dtype: torch.dtype | None):
    return torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None)


@on_device
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_autocast_equals_eager_autocast(arch: str, dtype: torch.dtype) -> None:
    g, twin, _ = _pair(arch)
    g.eval(), twin.eval()
    batch = _batch(arch)
    with torch.no_grad(), _autocast(dtype):
        got, want = g(**batch), twin(**batch)
    assert got.logits.dtype == want.logits.dtype
    torch.testing.assert_close(got.logits, want.logits, **AUTOCAST_TOL[dtype])
    torch.testing.assert_close(got.loss, want.loss, **AUTOCAST_TOL[dtype])


@on_device
def test_bf16_base_fp32_adapters_on_device() -> None:
    """The common recipe: base weights bf16, adapters fp32, under bf16 autocast; against PEFT the same way."""
    model = _no_dropout(build_with_head("llama"))
    g = graftlib.apply(model, "lora(q,v,r=4)")
    _randomise(g)
    twin, _ = _peft_twin(model, g, "llama")
    g.to(DEVICE, torch.bfloat16)
    g.store.float()
    twin.to(DEVICE, torch.bfloat16)
    for name, param in twin.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    batch = _batch("llama")
    with torch.no_grad(), _autocast(torch.bfloat16):
        got, want = g(**batch), twin(**batch)
    assert all(p.dtype == torch.float32 for p in g.store.parameters())
    torch.testing.assert_close(got.logits.float(), want.logits.float(), **AUTOCAST_TOL[torch.bfloat16])


# -- a training step ---------------------------------------------------------------------------------------
def _loss_and_grads(module: nn.Module, batch: dict, tensors: list[torch.Tensor],
                    dtype: torch.dtype | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for tensor in tensors:
        tensor.grad = None
    with _autocast(dtype):
        loss = module(**batch).loss
    loss.backward()
    return loss.detach().float(), [t.grad.detach().float().clone() for t in tensors]


@on_device
@pytest.mark.parametrize("dtype", [None, *AUTOCAST_DTYPES], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_with_checkpointing_equals_peft(arch: str, dtype: torch.dtype | None) -> None:
    g, twin, pairs = _pair(arch)
    g.train(), twin.train()
    g.gradient_checkpointing_enable()  # recomputed per block in backward: the same gradients
    batch = _batch(arch)
    ours, theirs = [p for p, _ in pairs], [p for _, p in pairs]
    got_loss, got = _loss_and_grads(g, batch, ours, dtype)
    want_loss, want = _loss_and_grads(twin, batch, theirs, dtype)
    tol = FP32_TOL if dtype is None else AUTOCAST_TOL[dtype]
    torch.testing.assert_close(got_loss, want_loss, **tol)
    assert all(grad.dtype == torch.float32 for grad in got)
    for index, (a, b) in enumerate(zip(got, want)):
        scale = b.abs().max().item()
        assert scale > 0, "every A and B gets a gradient"
        assert (a - b).abs().max().item() <= GRAD_REL[dtype] * scale, (index, (a - b).abs().max().item(), scale)
    g.gradient_checkpointing_disable()


# -- merge -------------------------------------------------------------------------------------------------
@on_device
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_on_device(arch: str) -> None:
    g, twin, _ = _pair(arch)
    g.eval(), twin.eval()
    batch = {k: v for k, v in _batch(arch).items() if k != "labels"}
    merged = g.merge().eval()
    assert _on(merged, DEVICE)
    with torch.no_grad():
        got, want = merged(**batch).logits, twin(**batch).logits
        folded = copy.deepcopy(twin).merge_and_unload()(**batch).logits
    torch.testing.assert_close(got, want, **FP32_TOL)
    torch.testing.assert_close(got, folded, **FP32_TOL)


# -- mixed-adapter batches ---------------------------------------------------------------------------------
@on_device
def test_mixed_adapter_batch_on_device() -> None:
    model, _ = build("bert")
    g = graftlib.apply(model, "lora(q,v,r=4,name=a) + lora(q,v,r=2,name=b)").eval()
    _randomise(g)
    g.to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in inputs_for("bert", batch=3, seq=5).items()}
    names = ["a", "b", "__base__"]
    with torch.no_grad():
        got = g(**inputs, adapter_names=names).last_hidden_state
        rows = []
        for row, name in enumerate(names):
            one = {k: v[row:row + 1] for k, v in inputs.items()}
            if name == "__base__":
                with g.disable_adapters():
                    rows.append(g(**one).last_hidden_state)
            else:
                g.set_active(name)
                rows.append(g(**one).last_hidden_state)
        g.set_active(["a", "b"])
    torch.testing.assert_close(got, torch.cat(rows), **FP32_TOL)
    assert not torch.allclose(rows[0], rows[2]), "the adapters change the output"


# -- torch.compile -----------------------------------------------------------------------------------------
@on_device
def test_compile_first_call_and_a_training_step() -> None:
    """A fresh graft moved to the device, compiled with fullgraph=True: the first call with input_ids +
    attention_mask works (no warm-up) and equals eager; a compiled training step gives PEFT's gradients."""
    model = _no_dropout(build_with_head("bert"))
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    _randomise(g)
    twin, pairs = _peft_twin(model, g, "bert")
    g.to(DEVICE), twin.to(DEVICE).eval()
    batch = _batch("bert")
    plain = {k: v for k, v in batch.items() if k != "labels"}
    torch._dynamo.reset()
    compiled = torch.compile(g, fullgraph=True, backend=COMPILE_BACKEND)
    with torch.no_grad():
        got = compiled(**plain).logits
        want = twin(**plain).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    g.train(), twin.train()
    ours, theirs = [p for p, _ in pairs], [p for _, p in pairs]
    _loss_and_grads(g, batch, ours, None)  # the training graph for these keys is built eagerly, once
    got_loss, got_grads = _loss_and_grads(compiled, batch, ours, None)
    want_loss, want_grads = _loss_and_grads(twin, batch, theirs, None)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_grads, want_grads):
        assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item()


# -- runs everywhere: a move leaves nothing on the old device ---------------------------------------------
def _device_arguments(graph: torch.fx.Graph) -> set[str]:
    found: set[str] = set()

    def visit(value) -> None:
        if isinstance(value, torch.device):
            found.add(value.type)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for node in graph.nodes:
        visit(node.args)
        visit(node.kwargs)
    return found


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_a_move_leaves_nothing_on_the_cpu(arch: str, monkeypatch) -> None:
    """``meta`` stands in for an accelerator: an op mixing a meta and a CPU tensor, or copying a meta tensor to
    the CPU, fails, so the forward only runs if every device argument and tensor followed the move."""
    import graftlib.grafted as grafted_module

    model, _ = build(arch)
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    assert _device_arguments(g.graph_module.graph) == {"cpu"}
    g.to("meta")
    assert _device_arguments(g.graph_module.graph) == {"meta"}
    assert _device_arguments(g.base_graph) <= {"meta"}
    assert _on(g, torch.device("meta")) and _on(model, torch.device("cpu"))
    monkeypatch.setattr(grafted_module, "is_unpadded_call", lambda config, inputs: False)  # reads mask values
    inputs = {k: v.to("meta") for k, v in inputs_for(arch, batch=3, seq=5).items()}
    with torch.no_grad():
        got = g(**inputs)
        want = model(**{k: torch.zeros_like(v, device="cpu") for k, v in inputs.items()})  # (eager reads masks)
    assert got.last_hidden_state.device.type == "meta"
    assert got.last_hidden_state.shape == want.last_hidden_state.shape
    with torch.no_grad():  # a new input set: traced on the user's (CPU) model, then moved like the graft
        hidden = g(**inputs, output_hidden_states=True).hidden_states
        want_hidden = model(**{k: torch.zeros_like(v, device="cpu") for k, v in inputs.items()},
                            output_hidden_states=True).hidden_states
    assert [h.shape for h in hidden] == [h.shape for h in want_hidden] and len(hidden) == 3  # embeddings + 2 layers
    assert all(h.device.type == "meta" for h in hidden)
