"""quantize(...): NF4 / int8 base weights as a graph pass, QLoRA on top, merge, save/load, ONNX.

References: the eager model whose quantised weights are replaced by their dequantised values (the
graph must equal it bit for bit), bitsandbytes' own NF4 quantisation and dequantisation of the same
weights, and the eager LoRA formula through forward hooks.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import graftlib
from graftlib.errors import GraftError, GraftSpecError
from graftlib.passes.lora import lora_scale
from graftlib.passes.quantize import (BLOCK, DYNAMIC_CODE, NF4_CODE, dequantize_nf4, dequantize_weight, is_released,
                                      quantize_nf4, quantize_weight)
from models import build, example_inputs, run_with_site_deltas

CASES = [  # (arch, bits, quantised sites)
    ("llama", 4, 14), ("llama", 8, 14), ("bert", 4, 13), ("gpt2", 4, 8), ("gpt2", 8, 8), ("hand", 4, 13),
]
IDS = [f"{arch}-{bits}bit" for arch, bits, _ in CASES]


def _first(output):
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if getattr(output, "last_hidden_state", None) is not None else output[0]


def _dequantised_reference(model, sites: list[str], bits: int):
    """`model` with each quantised weight replaced by its dequantised value (eager, no graph)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for path in sites:
            weight = ref.get_submodule(path).weight
            weight.copy_(dequantize_weight(quantize_weight(weight, bits), tuple(weight.shape), bits))
    return ref


def _graft(arch: str, bits: int, lora: str = " + lora(q,v,r=4)"):
    model, inputs = build(arch)
    g = graftlib.apply(model, f"quantize(all-linear, bits={bits}){lora}", example_inputs(arch)).eval()
    return model, inputs, g


@pytest.mark.parametrize("arch,bits,count", CASES, ids=IDS)
def test_graph_equals_eager_with_dequantised_weights(arch, bits, count):
    model, inputs, g = _graft(arch, bits)
    sites = g.adapters["quantize"].sites
    assert len(sites) == count
    ref = _dequantised_reference(model, sites, bits)
    with torch.no_grad():
        assert torch.equal(_first(g(**inputs)), _first(ref(**inputs)))  # LoRA B = 0: exact
        with g.disable_adapters():  # quantisation is the base: disabling adapters keeps it
            assert torch.equal(_first(g(**inputs)), _first(ref(**inputs)))
    assert all(not is_released(p) for p in model.parameters()), "the user's model must keep its weights"


@pytest.mark.parametrize("arch,bits,count", CASES[:4], ids=IDS[:4])
def test_lora_on_quantised_weights_matches_hooks_and_trains_only_lora(arch, bits, count):
    model, inputs, g = _graft(arch, bits)
    torch.manual_seed(3)
    for param in g.trainable_parameters().values():
        param.data.normal_(0, 0.2)
    record = g.adapters["default"]
    tensors = g.store.tensors("default")
    scale = lora_scale(record.config)
    deltas = []
    for site in graftlib.select(g, record.spec)[0].sites:
        a, b = tensors[site.key]["lora_A"].detach(), tensors[site.key]["lora_B"].detach()
        deltas.append((site, lambda _m, x, a=a, b=b: scale * (x @ a.T @ b.T)))
    ref = _dequantised_reference(model, g.adapters["quantize"].sites, bits)
    want = _first(run_with_site_deltas(ref, deltas, inputs))
    with torch.no_grad():
        got = _first(g(**inputs))
    assert (got - want).abs().max() < 1e-5
    g.train()
    _first(g(**inputs)).pow(2).mean().backward()
    trained = {n for n, p in g.named_parameters() if p.grad is not None}
    assert trained and all("default" in n and "lora_" in n for n in trained)
    assert not any(b.requires_grad for b in g.store["quantize"].buffers())


NF4_SHAPES = [  # 300 x 64: a partial 256-group of absmaxes; 3 x 33: a partial 64-block and an odd count;
    (64, 128), (300, 64), (128, 256), (3, 33), (7, 1), (1, 64 * 257 + 3), (5632, 2048),  # TinyLlama's mlp
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_state_and_dequantisation_equal_bitsandbytes(dtype):
    """Every stored tensor (4-bit codes, 8-bit absmax codes, second-level scales, offset) and the
    dequantised weight equal bitsandbytes 0.50's CPU quantize_4bit / dequantize_4bit, bit for bit."""
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(F.create_dynamic_map().float(), DYNAMIC_CODE)
    torch.manual_seed(0)
    for shape in NF4_SHAPES if dtype == torch.float32 else NF4_SHAPES[:4]:
        weight = (torch.randn(shape) * 0.05).to(dtype)
        weight.view(-1)[:BLOCK] = 0  # a block of zeros
        packed, state = F.quantize_4bit(weight, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
        mine = quantize_nf4(weight)
        assert torch.equal(packed.reshape(-1), mine["packed"])          # every 4-bit code
        assert torch.equal(state.absmax, mine["qabsmax"])               # every 8-bit absmax code
        assert torch.equal(state.state2.absmax, mine["absmax2"])
        assert torch.equal(state.offset, mine["offset"])
        theirs = F.dequantize_4bit(packed, state)
        assert theirs.dtype == dtype
        assert torch.equal(theirs, dequantize_nf4(mine, shape).to(dtype))  # the graph's cast, the same


def test_nf4_error_is_bounded_by_the_code_spacing():
    """|x - NF4[c] * a'| <= half the widest NF4 gap * a + |a' - a| (a: block absmax, a': its 8-bit copy)."""
    torch.manual_seed(0)
    weight = torch.randn(256, 128)
    state = quantize_nf4(weight)
    restored = dequantize_nf4(state, tuple(weight.shape)).reshape(-1, BLOCK)
    absmax = weight.reshape(-1, BLOCK).abs().amax(dim=1, keepdim=True)
    absmax_restored = restored.abs().amax(dim=1, keepdim=True)  # NF4 holds +-1: the restored absmax
    half_gap = float((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2)
    bound = half_gap * absmax + (absmax_restored - absmax).abs() + 1e-7
    assert ((restored - weight.reshape(-1, BLOCK)).abs() <= bound).all()


class _Wide(torch.nn.Module):
    """Projections wide enough that per-block statistics are what they are in real models."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(256, 512), torch.nn.Linear(512, 256)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("bits,ratio", [(4, 0.14), (8, 0.26)])  # NF4 ~0.13, int8 ~0.25 of fp32
def test_quantised_weights_are_stored_packed(bits, ratio):
    model = _Wide()
    x = torch.randn(3, 256)
    g = graftlib.apply(model, f"quantize(all-linear, bits={bits})", (x,)).eval()
    fp32 = sum(m.weight.numel() * 4 for m in (model.up, model.down))
    packed = sum(t.numel() * t.element_size() for t in g.store["quantize"].buffers())
    assert packed / fp32 < ratio
    for path in ("up", "down"):  # the grafted module holds stand-ins of one element, not the fp32 weights
        weight = g.graph_module.get_submodule(path).weight
        assert is_released(weight) and weight.untyped_storage().nbytes() == 4
    ref = _dequantised_reference(model, ["up", "down"], bits)
    with torch.no_grad():
        assert torch.equal(g(x), ref(x))


def test_merge_full_precision_and_requantised():
    model, inputs, g = _graft("llama", 4)
    torch.manual_seed(5)
    for param in g.trainable_parameters().values():
        param.data.normal_(0, 0.1)
    before = {k: dict(v) for k, v in g.store.tensors("quantize").items()}
    before = {k: {n: t.clone() for n, t in v.items()} for k, v in before.items()}
    with torch.no_grad():
        unmerged = _first(g(**inputs))
        merged = g.merge()
        assert (_first(merged(**inputs)) - unmerged).abs().max() < 1e-5
        lora_sites = set(g.adapters["default"].sites)
        assert set(merged.adapters["quantize"].sites) == set(g.adapters["quantize"].sites) - lora_sites
        assert merged.op_histogram() == g.merge().op_histogram()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            requantised = g.merge(requantize=True)
        assert any("requantize" in str(w.message) for w in caught), "requantisation must not be silent"
        assert set(requantised.requantization_error) == lora_sites
        # the reported error is the real one: requantised weights against the full-precision merge
        for path, error in requantised.requantization_error.items():
            holder = next(h for h in requantised.store["quantize"].values() if h.site_key == path)
            shape = tuple(merged.graph_module.get_submodule(path).weight.shape)
            restored = dequantize_nf4(dict(holder.named_buffers()), shape)
            assert math.isclose(error, float((restored - merged.graph_module.get_submodule(path).weight).abs().max()),
                                rel_tol=1e-6)
        assert (_first(requantised(**inputs)) - unmerged).abs().max() < 1.0
        assert set(requantised.adapters) == {"quantize"}
    after = g.store.tensors("quantize")  # the source graft keeps its own quantised tensors
    assert all(torch.equal(after[k][n], t) for k, v in before.items() for n, t in v.items())
    with pytest.raises(GraftError, match="quantised"):
        g.merge(inplace=True)


def test_save_load_stores_no_base_weights(tmp_path):
    model, inputs, g = _graft("gpt2", 4)
    for param in g.trainable_parameters().values():
        param.data.normal_(0, 0.1)
    g.save(tmp_path)
    from safetensors.torch import load_file

    assert all(k.startswith("default/") for k in load_file(str(tmp_path / "adapters.safetensors")))
    loaded = graftlib.load(model, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(_first(loaded(**inputs)), _first(g(**inputs)))


def test_onnx_export_of_quantised_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    model, inputs, g = _graft("llama", 4)
    for param in g.trainable_parameters().values():
        param.data.normal_(0, 0.1)
    report = graftlib.export_onnx(g, tmp_path / "q.onnx", merge=False, progress=False)  # verifies with ORT
    assert max(report.max_abs_diff.values()) < 1e-4
    proto = onnx.load(str(tmp_path / "q.onnx"))
    packed = [i for i in proto.graph.initializer if i.name.endswith(".packed")]
    assert len(packed) == 14 and all(i.data_type == onnx.TensorProto.UINT8 for i in packed)
    assert not any(i.name.endswith("q_proj.weight") for i in proto.graph.initializer)


@pytest.mark.parametrize("spec,message", [
    ("quantize(all-linear, bits=3)", "must be 4"),
    ("quantize(q)", "slice of"),
])
def test_bad_specs_are_refused(spec, message):
    model, _ = build("gpt2")
    with pytest.raises(GraftSpecError, match=message):
        graftlib.apply(model, spec)


def test_quantisation_cannot_be_deleted():
    _, _, g = _graft("llama", 8, lora="")
    with pytest.raises(GraftError, match="base model"):
        g.delete_adapter("quantize")


def _train_step(g, inputs, autocast: bool = False):
    """(output, LoRA gradients, saved-for-backward (shape, dtype)s) of one step, dropout seeded."""
    g(**inputs)  # builds the training graph outside the hooks
    saved = []
    for param in g.trainable_parameters().values():
        param.grad = None
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = _first(g(**inputs))
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in g.trainable_parameters().items()}, saved


@pytest.mark.parametrize("arch,bits,checkpointing,autocast", [
    ("llama", 4, False, False), ("gpt2", 8, False, False), ("llama", 4, True, True),
], ids=["llama-nf4", "gpt2-int8", "llama-nf4-checkpointed-bf16"])
def test_training_recomputes_dequantised_weights_in_backward(arch, bits, checkpointing, autocast, monkeypatch):
    """Training keeps the packed tensors, not the dequantised weights, for backward; outputs and LoRA
    gradients equal the plain aten graph's (the one export and eval run) bit for bit."""
    import graftlib.passes.quantize as quantize

    model, inputs, g = _graft(arch, bits)
    g.train()
    if checkpointing:
        g.gradient_checkpointing_enable()
    torch.manual_seed(3)
    for param in g.trainable_parameters().values():
        param.data.normal_(0, 0.2)
    shapes = {tuple(int(d) for d in g.graph_module.get_submodule(p).weight.shape) for p in g.adapters["quantize"].sites}
    out, grads, saved = _train_step(g, inputs, autocast)
    assert not [s for s in saved if s[0] in shapes and s[1].is_floating_point], "a dequantised weight was saved"
    monkeypatch.setattr(quantize, "recompute_in_backward", lambda graph, adapter: False)
    g._invalidate()
    plain_out, plain_grads, plain_saved = _train_step(g, inputs, autocast)
    if not checkpointing:  # (checkpointed blocks keep neither)
        assert [s for s in plain_saved if s[0] in shapes and s[1].is_floating_point], "the reference keeps them"
    assert torch.equal(out, plain_out)
    assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)
