"""LoHa, LoKr and OFT: PEFT checkpoints load with PEFT's outputs, graftlib grafts save back into PEFT with
graftlib's outputs, merge, ONNX export and the graph diff.

References: PEFT 0.21.2 (the installed ``peft``) on fresh copies of the same tiny models, onnxruntime
(through export_onnx's verification), and the base model (adapters at PEFT's init or disabled).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import graftlib
from graftlib.errors import GraftSpecError, LoadError
from models import build, example_inputs

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoKrConfig, OFTConfig, PeftModel, get_peft_model  # noqa: E402

TOL = 1e-5
CONFIGS = {"loha": LoHaConfig, "lokr": LoKrConfig, "oft": OFTConfig}
ADAPTER_PARAMS = ("hada_", "lokr_", "oft_")
_ONE_BY_ONE = r".*layer\.[02]\.convolution"  # ResNet's 1x1 convolutions

# (case id, arch, method, PEFT config options): BERT, Llama and a conv model for each method
CASES = {
    "loha-bert": ("bert", "loha", dict(target_modules=["query", "value", "intermediate.dense"], r=4, alpha=6)),
    "loha-llama": ("llama", "loha", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=2)),
    "loha-convnet": ("convnet", "loha", dict(target_modules=["stem", "dilated", "grouped", "head"], r=2,
                                             use_effective_conv2d=True)),
    "lokr-bert": ("bert", "lokr", dict(target_modules=["query", "value"], r=2, alpha=4, decompose_both=True)),
    "lokr-llama": ("llama", "lokr", dict(target_modules=["q_proj", "k_proj", "up_proj"], r=4, decompose_factor=4)),
    "lokr-convnet": ("convnet", "lokr", dict(target_modules=["stem", "grouped", "head"], r=1,
                                             use_effective_conv2d=True)),
    "oft-bert": ("bert", "oft", dict(target_modules=["query", "value", "word_embeddings"], oft_block_size=8, r=0)),
    "oft-llama": ("llama", "oft", dict(target_modules=["q_proj", "o_proj"], r=4, oft_block_size=0,
                                       use_cayley_neumann=False, block_share=True)),
    "oft-resnet": ("resnet", "oft", dict(target_modules=_ONE_BY_ONE, oft_block_size=4, r=0, coft=True, eps=0.05)),
}
# graftlib's own spec syntax, saved for PEFT
NATIVE = {
    "loha-bert": ("bert", "loha(q,v,r=4,alpha=8,name=native)"),
    "loha-convnet": ("convnet", "loha(stem,grouped,head,r=2,effective_conv2d=true,name=native)"),
    "lokr-llama": ("llama", "lokr(q,v,down,r=2,decompose_both=true,name=native)"),
    "lokr-convnet": ("convnet", "lokr(conv,r=2,name=native)"),
    "oft-llama": ("llama", "oft(v,down,block_size=8,name=native)"),   # (the imported adapter has q, o)
    "oft-bert": ("bert", "oft(k,o,r=4,block_size=0,neumann=false,name=native)"),
    "oft-resnet": ("resnet", 're:".*shortcut\\.convolution", block_size=4, coft=true, eps=0.1, name=native'),
}
_ROOT = tempfile.TemporaryDirectory(prefix="graftlib-methods-b-")
_cache: dict[str, dict] = {}


def _first(output):
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _run(module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return _first(module(**inputs))


def _randomise(parameters, std: float = 0.2, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in parameters:
            param.normal_(0, std)


def _peft_dir(arch: str, method: str, options: dict) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A PEFT model with random non-zero adapter weights, saved; (dir, PEFT output, base output)."""
    model, inputs = build(arch)
    base = _run(model, inputs)
    peft_model = get_peft_model(model, CONFIGS[method](**options))
    _randomise([p for n, p in peft_model.named_parameters() if any(t in n for t in ADAPTER_PARAMS)])
    peft_model.eval()
    directory = Path(tempfile.mkdtemp(prefix=f"{method}-{arch}-", dir=_ROOT.name))
    peft_model.save_pretrained(directory)
    return directory, _run(peft_model, inputs), base


def _case(case_id: str) -> dict:
    if case_id not in _cache:
        arch, method, options = CASES[case_id]
        directory, want, base = _peft_dir(arch, method, options)
        model, inputs = build(arch)
        g = graftlib.from_peft(model, directory, example_inputs=example_inputs(arch)).eval()
        _cache[case_id] = dict(arch=arch, dir=directory, want=want, base=base, g=g, inputs=inputs)
    return _cache[case_id]


def _peft_output(arch: str, directory: Path) -> torch.Tensor:
    model, inputs = build(arch)
    return _run(PeftModel.from_pretrained(model, directory).eval(), inputs)


# -- PEFT -> graftlib ----------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", list(CASES))
def test_peft_checkpoint_loads_with_peft_outputs(case_id):
    case = _case(case_id)
    assert case["g"].adapters["default"].method == CASES[case_id][1]
    assert (case["want"] - case["base"]).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(_run(case["g"], case["inputs"]), case["want"], atol=TOL, rtol=0)
    with case["g"].disable_adapters():
        torch.testing.assert_close(_run(case["g"], case["inputs"]), case["base"], atol=0, rtol=0)


@pytest.mark.parametrize("case_id", list(CASES))
def test_merge_folds_the_adapter_into_the_weights(case_id):
    case = _case(case_id)
    merged = case["g"].merge()
    assert not merged.adapters
    torch.testing.assert_close(_run(merged, case["inputs"]), case["want"], atol=TOL, rtol=0)
    assert not any((n.meta.get("custom") or {}).get("graft") for n in merged.graph.nodes)


@pytest.mark.parametrize("case_id", list(CASES))
def test_imported_adapter_saves_back_as_the_same_checkpoint(case_id, tmp_path):
    case = _case(case_id)
    case["g"].save_peft(tmp_path, adapter="default")
    original, saved = load_file(case["dir"] / "adapter_model.safetensors"), load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key in original:
        torch.testing.assert_close(saved[key], original[key], atol=0, rtol=0)
    torch.testing.assert_close(_peft_output(case["arch"], tmp_path), case["want"], atol=TOL, rtol=0)


# -- graftlib -> PEFT ----------------------------------------------------------------------------
def _native(case_id: str) -> dict:
    """The spec of NATIVE[case_id] added to that case's imported module as adapter "native"."""
    key = f"native:{case_id}"
    if key not in _cache:
        case = _case(case_id)
        spec, method, g = NATIVE[case_id][1], case_id.split("-")[0], case["g"]
        saved = g.active_adapters
        g.add(spec if spec.startswith(method) else f"{method}({spec})")
        g.set_active(saved)
        at_init = _run_native(g, case["inputs"])
        _randomise(g.store["native"].parameters(), std=0.1 if method == "oft" else 0.2, seed=3)
        g._invalidate()
        _cache[key] = dict(case, at_init=at_init, want=_run_native(g, case["inputs"]))
    return _cache[key]


def _run_native(g: graftlib.Grafted, inputs: dict, module=None) -> torch.Tensor:
    saved = g.active_adapters
    g.set_active("native")
    try:
        return _run(module(g) if module else g, inputs)
    finally:
        g.set_active(saved)


@pytest.mark.parametrize("case_id", list(NATIVE))
def test_graft_starts_as_the_base_model_exactly(case_id):
    case = _native(case_id)
    torch.testing.assert_close(case["at_init"], case["base"], atol=0, rtol=0)
    assert (case["want"] - case["base"]).abs().max() > 1e-3


@pytest.mark.parametrize("case_id", list(NATIVE))
def test_graftlib_adapter_loads_in_peft_with_graftlib_outputs(case_id, tmp_path):
    case = _native(case_id)
    case["g"].save_peft(tmp_path, adapter="native")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == case_id.split("-")[0].upper()
    torch.testing.assert_close(_peft_output(case["arch"], tmp_path), case["want"], atol=TOL, rtol=0)


@pytest.mark.parametrize("case_id", ["loha-convnet", "lokr-convnet", "oft-resnet"])
def test_onnx_export_is_verified_by_onnxruntime(case_id, tmp_path):
    case = _native(case_id)
    g = case["g"]
    saved = g.active_adapters
    g.set_active("native")
    try:
        report = graftlib.export_onnx(g, tmp_path / "model.onnx", progress=False, tolerance=TOL)
        merged = g.merge()
    finally:
        g.set_active(saved)
    assert report.verified
    torch.testing.assert_close(_run(merged, case["inputs"]), case["want"], atol=TOL, rtol=0)


@pytest.mark.parametrize("case_id", list(NATIVE))
def test_graph_diff_shows_the_adapter_at_its_sites(case_id):
    case = _native(case_id)
    g = case["g"]
    saved = g.active_adapters
    g.set_active("native")
    try:
        d = g.diff()
    finally:
        g.set_active(saved)
    assert d.adapters == ["native"]
    method = case_id.split("-")[0]
    marks = ("bmm", "linalg_solve") if method == "oft" else ("mm", "einsum", "kron")
    for key in g.adapters["native"].sites:
        ops = {n.op for n in d.site(key, "native").inserted}
        assert any(mark in op for op in ops for mark in marks), ops


# -- refusals and spec errors ----------------------------------------------------------------------
def test_peft_oft_on_a_k_by_k_conv_loads_peft_s_unmerged_forward():
    """PEFT's k x k conv OFT unfolds, rotates and folds the input (passes/oft_conv.py): loaded as such, not merged."""
    directory, want, _ = _peft_dir("convnet", "oft", dict(target_modules=["stem"], oft_block_size=3, r=0))
    model, inputs = build("convnet")
    g = graftlib.from_peft(model, directory, example_inputs=example_inputs("convnet")).eval()
    assert "peft_conv=true" in g.adapters["default"].spec
    assert (_run(g, inputs) - want).abs().max().item() <= TOL
    with pytest.raises(graftlib.GraftError, match="not mergeable"):
        g.merge()


class _MLP(torch.nn.Module):
    """No dropout, no batch norm: train-mode outputs differ from eval only by the adapter's dropouts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, X):
        return self.head(torch.relu(self.lin0(X)))


@pytest.mark.parametrize("method, options", [
    ("loha", dict(rank_dropout=0.5, module_dropout=0.3)),
    ("lokr", dict(rank_dropout=0.5, rank_dropout_scale=True)),
    ("lokr", dict(module_dropout=0.5)),
])
def test_training_dropouts_load_exact_in_eval_and_drop_in_training(method, options, tmp_path):
    inputs = {"X": torch.randn(5, 8, generator=torch.Generator().manual_seed(1))}
    peft_model = get_peft_model(_MLP(), CONFIGS[method](target_modules=["lin0", "head"], r=2, **options))
    _randomise([p for n, p in peft_model.named_parameters() if any(t in n for t in ADAPTER_PARAMS)])
    want = _run(peft_model.eval(), inputs)
    peft_model.save_pretrained(tmp_path)
    g = graftlib.from_peft(_MLP(), tmp_path, example_inputs=inputs)
    assert all(g.adapters["default"].config[k] == v for k, v in options.items())
    torch.testing.assert_close(_run(g.eval(), inputs), want, atol=TOL, rtol=0)
    g.train()
    torch.manual_seed(0)
    outputs = [_run(g, inputs) for _ in range(12)]
    assert any((o - want).abs().max() > 1e-4 for o in outputs)  # something was dropped
    if set(options) == {"module_dropout"}:  # each branch all on or all off: 4 possible outputs
        assert len({tuple(o.flatten().tolist()) for o in outputs}) <= 4
    torch.testing.assert_close(_run(g.eval(), inputs), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("spec, message", [
    ("oft(head,block_size=8,r=2)", "exactly one of block_size"),
    ("lokr(head,decompose_factor=0)", "decompose_factor"),
    ("loha(head,r=0)", "r=0 must be > 0"),
    ("lokr(head,init=zero)", "not one of peft, lycoris"),
    ("oft(grouped)", "grouped, dilated or non-square"),
])
def test_bad_options_point_at_the_option(spec, message):
    with pytest.raises(GraftSpecError, match=message):
        graftlib.apply(build("convnet")[0], spec, example_inputs=example_inputs("convnet"))


def test_oft_and_lora_on_one_weight_merge_exactly():
    model, inputs = build("convnet")
    g = graftlib.apply(model, "oft(head,block_size=4,name=rot) + lora(head,r=2,name=low)",
                       example_inputs=example_inputs("convnet")).eval()
    _randomise(g.store.parameters(), std=0.1, seed=4)
    g._invalidate()
    want = _run(g, inputs)
    assert (want - _run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(_run(g.merge(), inputs), want, atol=TOL, rtol=0)
    with pytest.raises(Exception, match="one OFT adapter"):
        g.add("oft(head,block_size=8,name=again)")


def test_oft_on_a_k_by_k_conv_rotates_the_flattened_filter():
    """graftlib's k x k conv OFT is the rotation PEFT merges; PEFT's format cannot hold it (refused)."""
    model, inputs = build("convnet")
    g = graftlib.apply(model, "oft(stem,block_size=9,neumann_terms=7,name=rot)",
                       example_inputs=example_inputs("convnet")).eval()
    torch.testing.assert_close(_run(g, inputs), _run(model, inputs), atol=0, rtol=0)
    _randomise(g.store.parameters(), std=0.1, seed=5)
    g._invalidate()
    want = _run(g, inputs)
    assert (want - _run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(_run(g.merge(), inputs), want, atol=TOL, rtol=0)
    with pytest.raises(graftlib.GraftError, match="k x k convolution stem"):
        g.save_peft(tempfile.mkdtemp(dir=_ROOT.name), adapter="rot")


@pytest.mark.parametrize("method, options", [
    # (not use_effective_conv2d: PEFT 0.21.2's HadaWeightCP.backward gives w1_a / w2_a gradients that are
    # not the derivative of its forward (checked against autograd); graftlib's are autograd's)
    ("loha", dict(target_modules=["stem", "grouped", "head"], r=2)),
    ("lokr", dict(target_modules=["grouped", "head"], r=2, decompose_both=True)),
    ("oft", dict(target_modules=["head"], oft_block_size=4, r=0, coft=True, eps=0.05)),
])
def test_gradients_equal_peft(method, options):
    """Training sees the same function: every adapter parameter's gradient equals PEFT's."""
    directory, _, _ = _peft_dir("convnet", method, options)
    model, inputs = build("convnet")
    peft_model = PeftModel.from_pretrained(model, directory, is_trainable=True).eval()
    peft_model(**inputs).square().sum().backward()
    g = graftlib.from_peft(build("convnet")[0], directory, example_inputs=example_inputs("convnet")).eval()
    g(**inputs).square().sum().backward()
    grads = {name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad}
    compared = 0
    for path, params in g.store.tensors("default").items():
        for name, param in params.items():
            peft_name = f"base_model.model.{path}.{name}" + (".default.weight" if method == "oft" else ".default")
            torch.testing.assert_close(param.grad, grads[peft_name], atol=1e-5, rtol=1e-4)
            compared += 1
    assert compared == len(grads) > 0


@pytest.mark.parametrize("spec", ["loha(stem,head,r=2,effective_conv2d=true)", "lokr(grouped,head,r=2,init=lycoris)",
                                  "oft(head,block_size=4,coft=true,eps=0.1)"])
def test_graftlib_save_and_load_round_trip(spec, tmp_path):
    model, inputs = build("convnet")
    g = graftlib.apply(model, spec, example_inputs=example_inputs("convnet")).eval()
    _randomise(g.store.parameters(), std=0.1, seed=6)
    g._invalidate()
    want = _run(g, inputs)
    g.save(tmp_path)
    loaded = graftlib.load(build("convnet")[0], tmp_path, example_inputs=example_inputs("convnet")).eval()
    torch.testing.assert_close(_run(loaded, inputs), want, atol=0, rtol=0)
