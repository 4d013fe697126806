"""PEFT's own kind of test table, with our own models: small models x LoRA options, through shared checks.

Each row: a tiny model and a ``LoraConfig``. PEFT builds the adapter, random non-zero adapter weights are
set, PEFT saves it; then, against PEFT itself as the reference:

- ``from_peft``: graftlib's outputs equal PEFT's (<= 1e-5); with the adapters off, the base model's bit for
  bit; merged (where the method merges), the unmerged outputs;
- ``save_peft``: graftlib writes the adapter back, and ``PeftModel.from_pretrained`` on a fresh model gives
  graftlib's outputs (and the saved tensors are PEFT's, key for key);
- native (graftlib -> PEFT): a spec grafted in graftlib with random parameters, saved with ``save_peft``,
  loads in PEFT with graftlib's outputs.

Layer kinds on Conv1d / Conv3d / MultiheadAttention / grouped convs are in tests/test_peft_conv.py.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import graftlib

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

TOL = 1e-5


# -- models (PEFT's custom-model kinds, our own sizes) --------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(12, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class EmbConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(40, 6), Conv1D(4, 6), nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin0(torch.relu(self.conv1d(self.emb(ids))))


class _ParamLinear(nn.Module):
    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_in, fan_out) / fan_in ** 0.5)   # (in, out): x @ W
        self.bias = nn.Parameter(torch.randn(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class ParamMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = _ParamLinear(12, 16), _ParamLinear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 16, 12) / 4)   # (experts, out, in): PEFT's default layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # x (E, N, in) -> (E, N, out)
        return torch.bmm(x, self.weight.transpose(1, 2))


class ExpertMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts, self.head = _Experts(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # x (N, in)
        return self.head(torch.relu(self.experts(x.expand(3, -1, -1))).sum(0))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d, self.lin0 = nn.Conv2d(3, 6, 3), nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(torch.relu(self.conv2d(x)).flatten(1))


MODELS = {"mlp": MLP, "emb": EmbConv1D, "param": ParamMLP, "experts": ExpertMLP, "conv": ConvNet}


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    if kind == "emb":
        return {"ids": torch.randint(0, 40, (5, 7), generator=generator).index_fill_(1, torch.tensor([0]), 10)}
    if kind == "conv":
        return {"x": torch.randn(2, 3, 6, 6, generator=generator)}
    return {"x": torch.randn(5, 12, generator=generator)}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]().eval()


# -- the table: (model, LoraConfig options, mergeable) -------------------------------------------
def _velora(**kw):
    from peft import VeloraConfig
    return VeloraConfig(**kw)


def _monteclora(**kw):
    from peft import MontecloraConfig
    return MontecloraConfig(**kw)


def _kasa(**kw):
    from peft import KasaConfig
    return KasaConfig(**kw)


def _bdlora(**kw):
    from peft import BdLoraConfig
    return BdLoraConfig(**kw)


CASES = {
    "mlp-plain": ("mlp", lambda: dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8), True),
    "mlp-lora_bias": ("mlp", lambda: dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=32, lora_bias=True), True),
    "conv-lora_bias": ("conv", lambda: dict(target_modules=["conv2d", "lin0"], r=3, lora_alpha=6, lora_bias=True),
                       True),
    "emb-conv1d-lora_bias": ("emb", lambda: dict(target_modules=["conv1d"], r=2, lora_bias=True), True),
    "mlp-velora": ("mlp", lambda: dict(target_modules=["lin0", "lin1"], r=4,
                                       velora_config=_velora(num_groups=2, init_type="batch_average")), True),
    "mlp-monteclora": ("mlp", lambda: dict(target_modules=["lin0"], r=4, monteclora_config=_monteclora(num_samples=2)),
                       True),
    "mlp-mica": ("mlp", lambda: dict(target_modules=["lin0"], r=4, init_lora_weights="mica"), True),
    "mlp-bdlora-a": ("mlp", lambda: dict(target_modules=["lin0", "lin1"], r=4,
                                         use_bdlora=_bdlora(target_modules_bd_a=["lin0"], nblocks=2,
                                                            match_strict=False)), True),
    "mlp-bdlora-ab": ("mlp", lambda: dict(target_modules=["lin0", "lin1"], r=4,
                                          use_bdlora=_bdlora(target_modules_bd_a=["lin0"],
                                                             target_modules_bd_b=["lin1"], nblocks=2)), True),
    "param-target_parameters": ("param", lambda: dict(target_parameters=["lin0.weight", "lin1.weight"], r=3,
                                                      lora_alpha=6), False),
    "mlp-linear-target_parameters": ("mlp", lambda: dict(target_modules=["lin0"], target_parameters=["lin1.weight"],
                                                         r=4), True),
    "experts-target_parameters": ("experts", lambda: dict(target_parameters=["experts.weight"], r=2, lora_alpha=4),
                                  False),
    "mlp-kasa": ("mlp", lambda: dict(target_modules=["lin0"], r=4, lora_alpha=8, kasa_config=_kasa()), True),
    "emb-trainable_tokens": ("emb", lambda: dict(target_modules=["conv1d"], r=2,
                                                 trainable_token_indices={"emb": [0, 10, 33]}), False),
}

#: graftlib-native specs written for PEFT (model, spec)
NATIVE = {
    "mlp-bias": ("mlp", "lora(lin0, lin1, r=2, alpha=6, bias=true, name=native)"),
    "conv-bias": ("conv", "lora(conv2d, r=2, bias=true, name=native)"),
    "param": ("param", 'lora_param("lin0.weight", r=2, alpha=3, name=native)'),
    "experts": ("experts", 'lora_param("experts.weight", r=2, name=native)'),
}

_ROOT = tempfile.TemporaryDirectory(prefix="graftlib-peft-table-")
_built: dict[str, dict] = {}


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _run(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return _first(module(**inputs))


def _randomise(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def _peft_case(name: str) -> dict:
    """PEFT's adapter for row `name`, saved; graftlib's load of it (built once per row)."""
    if name not in _built:
        kind, options, mergeable = CASES[name]
        inputs = _inputs(kind)
        base = _run(_model(kind), inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(_model(kind), LoraConfig(**options()))
        _randomise(peft_model, seed=len(name))
        peft_model.eval()
        want = _run(peft_model, inputs)
        directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_ROOT.name))
        peft_model.save_pretrained(directory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = graftlib.from_peft(_model(kind), directory, example_inputs=inputs).eval()
        _built[name] = dict(kind=kind, inputs=inputs, base=base, want=want, dir=directory, g=g, mergeable=mergeable)
    return _built[name]


def _peft_output(kind: str, directory: Path, inputs) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(_model(kind), directory).eval()
    return _run(loaded, inputs)


# -- shared checks -------------------------------------------------------------------------------
def check_from_peft(case: dict) -> None:
    g, inputs = case["g"], case["inputs"]
    assert (case["want"] - case["base"]).abs().max() > 1e-3, "the adapter must change the model"
    torch.testing.assert_close(_run(g, inputs), case["want"], atol=TOL, rtol=0)
    with g.disable_adapters():
        torch.testing.assert_close(_run(g, inputs), case["base"], atol=0, rtol=0)
    if case["mergeable"]:
        merged = g.merge()
        torch.testing.assert_close(_run(merged, inputs), case["want"], atol=TOL, rtol=0)


def check_save_peft(case: dict, directory: Path, exact_tensors: bool = True) -> None:
    g, inputs = case["g"], case["inputs"]
    g.save_peft(directory, adapter="default")
    torch.testing.assert_close(_peft_output(case["kind"], directory, inputs), _run(g, inputs), atol=TOL, rtol=0)
    original = load_file(case["dir"] / "adapter_model.safetensors")
    saved = load_file(directory / "adapter_model.safetensors")
    original = {k: v for k, v in original.items()  # training-only state graftlib does not load
                if "lora_velora_embed" not in k and "lora_monteclora_sampler" not in k}
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items() if exact_tensors else ():
        torch.testing.assert_close(saved[key], tensor, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_from_peft_equals_peft(name):
    check_from_peft(_peft_case(name))


@pytest.mark.parametrize("name", list(CASES))
def test_save_peft_loads_in_peft_with_the_same_outputs(name, tmp_path):
    check_save_peft(_peft_case(name), tmp_path, exact_tensors=name != "mlp-kasa")  # KaSA: B·diag, diag ones


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_graft_saves_for_peft(name, tmp_path):
    kind, spec = NATIVE[name]
    inputs = _inputs(kind)
    g = graftlib.apply(_model(kind), spec, example_inputs=inputs).eval()
    _randomise(g.store["native"], seed=7)
    want = _run(g, inputs)
    assert (want - _run(_model(kind), inputs)).abs().max() > 1e-3
    g.save_peft(tmp_path, adapter="native")
    torch.testing.assert_close(_peft_output(kind, tmp_path, inputs), want, atol=TOL, rtol=0)
    back = graftlib.from_peft(_model(kind), tmp_path, example_inputs=inputs).eval()
    torch.testing.assert_close(_run(back, inputs), want, atol=TOL, rtol=0)


# -- option-specific facts -----------------------------------------------------------------------
def test_lora_bias_merges_into_the_op_bias():
    case = _peft_case("mlp-lora_bias")
    merged = case["g"].merge()
    assert not any(n.startswith("graft") for n, _ in merged.graph_module.named_parameters())
    config = json.loads((case["dir"] / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and "bias=true" in case["g"].adapters["default"].spec


def test_bdlora_saves_in_block_layout_until_training_fills_a_block(tmp_path):
    case = _peft_case("mlp-bdlora-ab")
    g = graftlib.from_peft(_model("mlp"), case["dir"], example_inputs=case["inputs"]).eval()
    a = g.store.tensors("default")["lin0"]["lora_A"]
    assert a.shape == (4, 12) and a[:2, 6:].abs().sum() == 0 and a[2:, :6].abs().sum() == 0  # dense, block-diagonal
    with torch.no_grad():
        a[0, 11] = 0.5  # an off-diagonal entry, as training would give
    want = _run(g, case["inputs"])
    g.save_peft(tmp_path, adapter="default")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_bdlora"] is None  # written as plain LoRA: PEFT's block layer cannot hold it
    assert load_file(tmp_path / "adapter_model.safetensors")["base_model.model.lin0.lora_A.weight"].shape == (4, 12)
    torch.testing.assert_close(_peft_output("mlp", tmp_path, case["inputs"]), want, atol=TOL, rtol=0)


def test_training_only_variants_warn_what_is_not_applied():
    case = _peft_case("mlp-velora")
    with pytest.warns(UserWarning, match="activation compression is not applied"):
        graftlib.from_peft(_model("mlp"), case["dir"], example_inputs=case["inputs"])


def test_trainable_tokens_change_only_their_rows():
    case = _peft_case("emb-trainable_tokens")
    g = case["g"]
    assert g.adapters["default_tokens"].method == "tokens" and "default_tokens" in g.active_adapters
    rows = g.store.tensors("default_tokens")["emb.weight"]["trainable_tokens_delta"]
    original = load_file(case["dir"] / "adapter_model.safetensors")
    torch.testing.assert_close(rows, original["base_model.model.emb.token_adapter.trainable_tokens_delta"],
                               atol=0, rtol=0)
    with pytest.raises(graftlib.GraftError, match="save_peft\\(dir, adapter='default'\\)"):
        g.save_peft(tempfile.mkdtemp(dir=_ROOT.name), adapter="default_tokens")


def test_native_tokens_graft_keeps_other_rows_exact():
    inputs = _inputs("emb")
    model = _model("emb")
    g = graftlib.apply(model, "tokens(emb, ids=[10, 3])", example_inputs=inputs).eval()
    torch.testing.assert_close(_run(g, inputs), _run(model, inputs), atol=0, rtol=0)  # starts as E[ids]
    with torch.no_grad():
        g.store.tensors("default")["emb.weight"]["trainable_tokens_delta"].add_(1.0)
    changed = (_run(g, inputs) - _run(model, inputs)).abs().amax(-1)                 # (B, T)
    hit = (inputs["ids"] == 10) | (inputs["ids"] == 3)
    assert bool((changed[hit] > 0).all()) and bool((changed[~hit] == 0).all())


@pytest.mark.parametrize("spec, match", [
    ("lora(emb, bias=true)", "not supported on an embedding"),
    ("tokens(emb, ids=[3, 3])", "twice"),
    ("tokens(emb, ids=[99])", "out of range"),
    ('lora_param("nope.weight")', "names no parameter"),
])
def test_bad_option_specs_are_clear(spec, match):
    with pytest.raises(graftlib.GraftSpecError, match=match):
        graftlib.apply(_model("emb"), spec, example_inputs=_inputs("emb"))


def test_kasa_is_one_lora_holding_the_truncation_and_refuses_a_changed_truncation(tmp_path):
    case = _peft_case("mlp-kasa")
    g = graftlib.from_peft(_model("mlp"), case["dir"], example_inputs=case["inputs"]).eval()
    record = g.adapters["default"]
    assert record.method == "lora" and record.config["r"] == 4 + 12 and list(g.adapters) == ["default"]
    params = g.store.tensors("default")["lin0"]
    with torch.no_grad():
        params["lora_A"][-1].add_(0.01)  # the truncation part, changed as training would
    with pytest.raises(graftlib.GraftError, match="no longer are PEFT.s SVD truncation"):
        g.save_peft(tmp_path, adapter="default")


# (model, spec, also through ONNX: export is slow-ish, these two cover mm/bmm deltas, index_copy, B's bias)
SAVED = [
    ("mlp", "lora(lin0, lin1, r=2, bias=true)", False),
    ("param", 'lora_param("lin0.weight", r=2)', False),
    ("experts", 'lora_param("experts.weight", r=2)', True),
    ("emb", "tokens(emb, ids=[1, 4], name=t) + lora(conv1d, r=2, bias=true)", True),
]


@pytest.mark.parametrize("kind, spec, onnx", SAVED)
def test_new_grafts_save_load_and_export_to_onnx(kind, spec, onnx, tmp_path):
    inputs = _inputs(kind)
    g = graftlib.apply(_model(kind), spec, example_inputs=inputs).eval()
    for adapter in g.adapters:
        _randomise(g.store[adapter], seed=5)
    want = _run(g, inputs)
    g.save(tmp_path / "graft")
    back = graftlib.load(_model(kind), tmp_path / "graft", example_inputs=inputs).eval()
    torch.testing.assert_close(_run(back, inputs), want, atol=0, rtol=0)
    if not onnx:
        return
    graftlib.export_onnx(g, tmp_path / "m.onnx", example_inputs=inputs)
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    feeds = {i.name: v.numpy() for i, v in zip(session.get_inputs(), inputs.values())}
    torch.testing.assert_close(torch.from_numpy(session.run(None, feeds)[0]), want, atol=TOL, rtol=0)
