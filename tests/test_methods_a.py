"""DoRA (lora(dora=true)), IA3 and VeRA: PEFT interop both ways, init, merge, eval cache, ONNX, diff.

References: PEFT itself (a PEFT model with random non-zero adapter weights, saved with save_pretrained),
the base model (init and disabled adapters), the unmerged graft (merge), onnxruntime (export).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

import graftlib
from graftlib.runtime import op_histogram, specialise
from models import build, example_inputs

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, VeraConfig, get_peft_model  # noqa: E402

TOL = 1e-5

# id -> (arch, PEFT config): random non-zero adapter weights are saved with save_pretrained
PEFT_CASES = {
    "dora-bert": ("bert", lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                             target_modules=["query", "value", "word_embeddings"])),
    "dora-llama": ("llama", lambda: LoraConfig(r=4, lora_alpha=16, use_dora=True, use_rslora=True,
                                               target_modules=["q_proj", "v_proj", "down_proj"])),
    "dora-gpt2": ("gpt2", lambda: LoraConfig(r=2, use_dora=True, target_modules=["c_attn", "c_fc"],
                                             fan_in_fan_out=True)),
    "dora-convnet": ("convnet", lambda: LoraConfig(r=3, lora_alpha=5, use_dora=True, target_modules=["stem", "head"])),
    "ia3-bert": ("bert", lambda: IA3Config(target_modules=["key", "value", "output.dense"],
                                           feedforward_modules=["output.dense"])),
    "ia3-llama": ("llama", lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                             feedforward_modules=["down_proj"])),
    "ia3-convnet": ("convnet", lambda: IA3Config(target_modules=["stem", "grouped", "head"],
                                                 feedforward_modules=["grouped", "head"])),
    "vera-bert": ("bert", lambda: VeraConfig(r=8, target_modules=["query", "value", "intermediate.dense"])),
    "vera-llama": ("llama", lambda: VeraConfig(r=6, target_modules=["q_proj", "v_proj"], save_projection=False,
                                               projection_prng_key=7)),
}
# id -> (arch, graftlib spec): native grafts, randomised, written with save_peft for PEFT to load
NATIVE_CASES = {
    "dora-bert": ("bert", "lora(q,v,embed,r=4,alpha=8,dora=true)"),
    "dora-llama": ("llama", "lora(q,v,up,r=2,dora=true,rslora=true)"),
    "dora-convnet": ("convnet", "lora(stem,head,r=2,dora=true)"),
    "ia3-bert": ("bert", "ia3(k,v,down)"),
    "ia3-llama": ("llama", "ia3(k,v,down)"),
    "ia3-convnet": ("convnet", 'ia3(stem,grouped,head,feedforward="grouped|head")'),
    "vera-bert": ("bert", "vera(q,v,r=8)"),
    "vera-llama": ("llama", "vera(q,v,up,r=4,seed=3)"),
}
_ROOT = tempfile.TemporaryDirectory(prefix="graftlib-methods-a-")  # removed at exit


def _first(output):
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _randomise(params, seed: int = 1, scale: float = 0.3) -> None:
    """Non-zero adapter weights: factors and vectors get random values around their init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn_like(param) * scale)


def _peft_adapter_params(model):
    keys = ("lora_", "ia3_l", "vera_lambda")
    return [p for n, p in model.named_parameters() if any(k in n for k in keys)]


def _apply(arch: str, spec: str) -> tuple[graftlib.Grafted, dict, torch.nn.Module]:
    model, inputs = build(arch)
    return graftlib.apply(model, spec, example_inputs=example_inputs(arch)).eval(), inputs, model


def _run(g, inputs) -> torch.Tensor:
    with torch.no_grad():
        return _first(g(**inputs))


_peft_cache: dict[str, tuple] = {}


def _peft_case(case: str) -> tuple[Path, torch.Tensor, dict]:
    if case not in _peft_cache:
        arch, make = PEFT_CASES[case]
        model, inputs = build(arch)
        peft_model = get_peft_model(model, make())
        _randomise(_peft_adapter_params(peft_model))
        peft_model.eval()
        directory = Path(tempfile.mkdtemp(prefix=f"{case}-", dir=_ROOT.name))
        peft_model.save_pretrained(directory)
        with torch.no_grad():
            _peft_cache[case] = (directory, _first(peft_model(**inputs)), inputs)
    return _peft_cache[case]


def _peft_load(arch: str, directory: Path, inputs: dict) -> torch.Tensor:
    model, _ = build(arch)
    loaded = PeftModel.from_pretrained(model, str(directory)).eval()
    with torch.no_grad():
        return _first(loaded(**inputs))


# -- PEFT -> graftlib -> PEFT ------------------------------------------------------------------
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_checkpoint_loads_with_peft_outputs_and_saves_back(case, tmp_path):
    arch = PEFT_CASES[case][0]
    directory, want, inputs = _peft_case(case)
    model, _ = build(arch)
    g = graftlib.from_peft(model, directory, example_inputs=example_inputs(arch)).eval()
    got = _run(g, inputs)
    assert (got - want).abs().max().item() < TOL
    g.save_peft(tmp_path)
    assert (_peft_load(arch, tmp_path, inputs) - want).abs().max().item() < TOL


# -- graftlib -> PEFT, merge -------------------------------------------------------------------
@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_native_graft_is_base_at_init_loads_in_peft_equal_and_merges(case, tmp_path):
    arch, spec = NATIVE_CASES[case]
    g, inputs, model = _apply(arch, spec)
    with torch.no_grad():
        base = _first(model(**inputs))
    assert torch.equal(_run(g, inputs), base)  # PEFT's init: the graft is the base model exactly
    _randomise(g.trainable_parameters().values())
    got = _run(g, inputs)
    assert (got - base).abs().max().item() > 1e-3
    with g.disable_adapters():
        assert torch.equal(_run(g, inputs), base)
    g.save_peft(tmp_path)
    assert (_peft_load(arch, tmp_path, inputs) - got).abs().max().item() < TOL
    merged = g.merge()
    assert (_run(merged, inputs) - got).abs().max().item() < TOL
    assert merged.op_histogram() == op_histogram(specialise(g.base_graph, (), False))
    with torch.no_grad():
        assert torch.equal(_first(model(**inputs)), base)  # the user's model is untouched


# -- ONNX and the diff -------------------------------------------------------------------------------
def test_onnx_export_verified_and_diff_shows_each_method(tmp_path):
    spec = "lora(q,r=2,dora=true,name=d) + ia3(k,down,name=i) + vera(v,r=4,name=w)"
    g, inputs, _ = _apply("bert", spec)
    _randomise(g.trainable_parameters().values())
    d = g.diff()
    for name, method in (("d", "lora"), ("i", "ia3"), ("w", "vera")):
        shown = {s.site for s in d.sites if s.adapter == name}
        assert shown == set(g.sites(name)) and len(shown) in (2, 4)
        assert all(s.method == method and s.inserted for s in d.sites if s.adapter == name)
    report = graftlib.export_onnx(g, tmp_path / "m.onnx", merge=True, progress=False)
    assert sorted(report.merged) == ["d", "i", "w"] and 0 <= max(report.max_abs_diff.values()) < 1e-4
    unmerged = graftlib.export_onnx(g, tmp_path / "u.onnx", merge=False, progress=False)
    assert sorted(unmerged.kept) == ["d", "i", "w"] and 0 <= max(unmerged.max_abs_diff.values()) < 1e-4


# -- DoRA specifics --------------------------------------------------------------------------------
def test_dora_eval_cache_follows_parameter_changes():
    g, inputs, _ = _apply("llama", "lora(q,v,r=2,dora=true)")
    _randomise(g.trainable_parameters().values())
    first = _run(g, inputs)
    assert torch.equal(_run(g, inputs), first)
    calls = [n for n in g.runtime_module().graph.nodes if n.op == "call_module" and "graft_cache" in str(n.target)]
    assert len(calls) == 4  # one cached group per site
    params = g.trainable_parameters()
    with torch.no_grad():  # an optimiser-style in-place update of B and of m: the cache must notice both
        next(p for n, p in params.items() if n.endswith("lora_B")).mul_(2)
        changed = _run(g, inputs)
        next(p for n, p in params.items() if n.endswith("lora_magnitude_vector")).add_(0.5)
        changed_m = _run(g, inputs)
    g.train()  # the training graph recomputes the norm each call: the reference
    with torch.no_grad():
        assert (_first(g(**inputs)) - changed_m).abs().max().item() < TOL
    g.eval()
    assert (changed - first).abs().max().item() > 1e-4 and (changed_m - changed).abs().max().item() > 1e-4


def test_dora_gradients_match_peft():
    model, inputs = build("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]))
    _randomise(_peft_adapter_params(peft_model))
    directory = Path(tempfile.mkdtemp(prefix="dora-grad-", dir=_ROOT.name))
    peft_model.save_pretrained(directory)
    g = graftlib.from_peft(build("llama")[0], directory).train()
    peft_model.train()
    _first(peft_model(**inputs)).pow(2).mean().backward()
    _first(g(**inputs)).pow(2).mean().backward()
    theirs = dict(peft_model.named_parameters())
    got = _grads_as_peft(g)
    assert len(got) == 12  # A, B, m at 4 sites
    for key, grad in got.items():
        want = theirs[key].grad
        assert want.abs().max() > 0 and (grad.reshape(want.shape) - want).abs().max().item() < 1e-5, key


def _grads_as_peft(g) -> dict:
    from graftlib.select import SiteIndex

    index = SiteIndex.build(g.base_graph_module)
    names = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
             "lora_magnitude_vector": "lora_magnitude_vector.default.weight"}
    out = {}
    for key, params in g.store["default"].items():
        site = index.by_key(params.site_key)
        for pname, param in params.named_parameters():
            out[f"base_model.model.{site.path}.{names[pname]}"] = param.grad
    return out


def test_dora_refuses_what_it_cannot_represent():
    model, _ = build("gpt2")
    with pytest.raises(graftlib.GraftSpecError, match="slice of a fused projection"):
        graftlib.apply(model, "lora(q,v,dora=true)")
    g, inputs, _ = _apply("bert", "lora(q,v,r=2,dora=true,name=d) + lora(q,v,r=2,name=p)")
    with pytest.raises(graftlib.GraftError, match="DoRA"):
        g(**inputs, adapter_names=["d", "p"])
    with pytest.raises(graftlib.GraftError, match="DoRA"):
        g.combine({"d": 0.5, "p": 0.5})
