"""PEFT interop: PEFT LoRA checkpoints load into graftlib with PEFT's outputs, graftlib adapters save so
that ``peft.PeftModel.from_pretrained`` gives graftlib's outputs, and bad checkpoints fail cleanly.

References: PEFT itself (the installed ``peft`` package) on a fresh copy of the same tiny model.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import graftlib
from graftlib.runtime import op_histogram
from models import build, example_inputs

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = 1e-5

# (arch, LoraConfig options): BERT with rank/alpha patterns and a modules_to_save head, GPT-2 Conv1D with
# rsLoRA and an embedding, Llama with layers_to_transform, a conv net (Conv2d + Linear).
CASES = {
    "bert": dict(target_modules=["query", "value"], r=4, lora_alpha=8,
                 rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"value": 3},
                 modules_to_save=["pooler.dense"]),
    "gpt2": dict(target_modules=["c_attn", "wte"], r=4, lora_alpha=6, use_rslora=True),
    "llama": dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=16,
                  layers_to_transform=[1], layers_pattern="layers"),
    "convnet": dict(target_modules=["stem", "head"], r=3, lora_alpha=5),
}
# graftlib-native adapters written for PEFT: fused slices, embeddings, rsLoRA, grouped convs
NATIVE = {
    "bert": "lora(q,v,embed,r=4,alpha=16,rslora=true,name=native)",
    "gpt2": "lora(q,v,c_fc,r=4,name=native)",
    "llama": "lora(q,k,down,r=2,alpha=4,name=native)",
    "convnet": "lora(stem,grouped,head,r=2,name=native)",
}
_cache: dict[str, dict] = {}


def _first(output):
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _randomise(module: torch.nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.normal_(0, scale)


_ROOT = tempfile.TemporaryDirectory(prefix="graftlib-peft-cases-")  # removed at exit


def _peft_dir(arch: str, options: dict, seed: int = 1) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Save a PEFT model with random non-zero factors; (dir, PEFT output, base output)."""
    model, inputs = build(arch)
    with torch.no_grad():
        base = _first(model(**inputs))
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **options))
    torch.manual_seed(seed)
    _randomise(peft_model)
    peft_model.eval()
    directory = Path(tempfile.mkdtemp(prefix=f"peft-{arch}-", dir=_ROOT.name))
    peft_model.save_pretrained(directory)
    with torch.no_grad():
        return directory, _first(peft_model(**inputs)), base


def _case(arch: str) -> dict:
    if arch not in _cache:
        directory, want, base = _peft_dir(arch, CASES[arch])
        model, inputs = build(arch)
        g = graftlib.from_peft(model, directory, example_inputs=example_inputs(arch)).eval()
        _cache[arch] = dict(dir=directory, want=want, base=base, g=g, inputs=inputs)
    return _cache[arch]


def _run(g: graftlib.Grafted, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return _first(g(**inputs))


def _peft_output(arch: str, directory: Path) -> torch.Tensor:
    model, inputs = build(arch)
    loaded = PeftModel.from_pretrained(model, directory).eval()
    with torch.no_grad():
        return _first(loaded(**inputs))


# -- PEFT -> graftlib ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(CASES))
def test_peft_checkpoint_loads_with_peft_outputs(arch):
    case = _case(arch)
    got = _run(case["g"], case["inputs"])
    assert (case["want"] - case["base"]).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(got, case["want"], atol=TOL, rtol=0)
    with case["g"].disable_adapters():
        torch.testing.assert_close(_run(case["g"], case["inputs"]), case["base"], atol=0, rtol=0)


@pytest.mark.parametrize("arch", list(CASES))
def test_imported_adapter_saves_back_as_the_same_checkpoint(arch, tmp_path):
    case = _case(arch)
    case["g"].save_peft(tmp_path, adapter="default")
    original, saved = load_file(case["dir"] / "adapter_model.safetensors"), load_file(tmp_path / "adapter_model.safetensors")
    # PEFT also saves a targeted embed_tokens' unchanged base weight; it equals the model's, so it is not kept
    original = {k: v for k, v in original.items() if ".base_layer." not in k}
    assert sorted(saved) == sorted(original)
    for key in original:  # rank patterns: padding cut, scale unfolded -> original shapes and values
        torch.testing.assert_close(saved[key], original[key], atol=1e-6, rtol=1e-6)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == CASES[arch].get("rank_pattern", {})
    torch.testing.assert_close(_peft_output(arch, tmp_path), case["want"], atol=TOL, rtol=0)


def test_rank_pattern_is_one_adapter_padded_to_the_largest_rank():
    g = _case("bert")["g"]
    record = g.adapters["default"]
    assert record.config["r"] == 4 and len(record.sites) == 4
    params = g.store.tensors("default")["encoder.layer.1.attention.self.query"]
    assert params["lora_A"].shape == (4, 32)
    assert params["lora_A"][2:].abs().sum() == 0 and params["lora_B"][:, 2:].abs().sum() == 0
    assert record.extras["peft"]["sites"]["encoder.layer.1.attention.self.query"] == [2, 8.0]


def test_layers_to_transform_selects_peft_modules_only():
    g = _case("llama")["g"]
    assert sorted(g.adapters["default"].sites) == ["embed_tokens", "layers.1.self_attn.q_proj",
                                                   "layers.1.self_attn.v_proj"]


def test_modules_to_save_is_a_replace_graft_saved_back():
    case = _case("bert")
    g = case["g"]
    assert g.adapters["default_modules"].method == "replace"
    assert set(g.active_adapters) >= {"default", "default_modules"}
    original = load_file(case["dir"] / "adapter_model.safetensors")
    head = g.store.tensors("default_modules")["pooler.dense.weight"]["value"]
    torch.testing.assert_close(head, original["base_model.model.pooler.dense.weight"], atol=0, rtol=0)
    model_weight = dict(build("bert")[0].named_parameters())["pooler.dense.weight"]
    assert not torch.equal(head, model_weight)  # the user's model keeps its own head
    saved = g.merge()  # a replaced head survives merging (it stays a node)
    torch.testing.assert_close(_run(saved, case["inputs"]), case["want"], atol=TOL, rtol=0)


# -- graftlib -> PEFT ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(NATIVE))
def test_graftlib_adapter_loads_in_peft_with_graftlib_outputs(arch, tmp_path):
    case = _case(arch)
    g = case["g"]
    saved_active = tuple(a for a in g.active_adapters if a != "native")
    if "native" not in g.adapters:
        g.add(NATIVE[arch])
        torch.manual_seed(2)
        with torch.no_grad():
            for param in g.store["native"].parameters():
                param.normal_(0, 0.3)
    try:
        g.set_active("native")
        want = _run(g, case["inputs"])
    finally:
        g.set_active(saved_active)
    assert (want - case["base"]).abs().max() > 1e-3
    g.save_peft(tmp_path, adapter="native")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    torch.testing.assert_close(_peft_output(arch, tmp_path), want, atol=TOL, rtol=0)


def test_fused_slices_save_as_one_block_lora(tmp_path):
    g = _case("gpt2")["g"]
    test_graftlib_adapter_loads_in_peft_with_graftlib_outputs("gpt2", tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    a, b = state["base_model.model.h.0.attn.c_attn.lora_A.weight"], state["base_model.model.h.0.attn.c_attn.lora_B.weight"]
    assert a.shape == (8, 32) and b.shape == (96, 8)  # q and v slices: rank 4 + 4
    assert b[32:64].abs().sum() == 0 and b[:32, 4:].abs().sum() == 0 and b[64:, :4].abs().sum() == 0
    params = g.store.tensors("native")["h.0.attn.c_attn[q]"]
    torch.testing.assert_close(a[:4], params["lora_A"], atol=0, rtol=0)


def test_peft_dir_adds_to_an_existing_grafted_module():
    case = _case("llama")
    g = case["g"]
    options = dict(CASES["llama"], r=2, lora_alpha=4)
    directory, want, _ = _peft_dir("llama", options, seed=5)
    saved_active = g.active_adapters
    returned = graftlib.from_peft(g, directory, adapter_name="second")
    assert returned is g and "second" in g.adapters and "default" in g.adapters
    try:
        g.set_active("second")
        torch.testing.assert_close(_run(g, case["inputs"]), want, atol=TOL, rtol=0)
        g.set_active("default")
        torch.testing.assert_close(_run(g, case["inputs"]), case["want"], atol=TOL, rtol=0)
    finally:
        g.set_active(saved_active)
    with pytest.raises(graftlib.LoadError, match="adapter 'second' already exists"):
        graftlib.from_peft(g, directory, adapter_name="second")


def test_graftlib_save_and_load_keep_peft_grafts(tmp_path):
    case = _case("bert")
    case["g"].save(tmp_path)
    loaded = graftlib.load(build("bert")[0], tmp_path).eval()
    assert {"default", "default_modules"} <= set(loaded.adapters)
    loaded.set_active(["default", "default_modules"])
    torch.testing.assert_close(_run(loaded, case["inputs"]), case["want"], atol=TOL, rtol=0)


# -- bad input -----------------------------------------------------------------------------------
def _snapshot(g: graftlib.Grafted, inputs: dict) -> tuple:
    return (list(g.adapters), g.active_adapters, sorted(g.store.keys()), op_histogram(g.graph),
            _run(g, inputs))


def _assert_unchanged(g: graftlib.Grafted, inputs: dict, before: tuple) -> None:
    after = _snapshot(g, inputs)
    assert after[:4] == before[:4]
    torch.testing.assert_close(after[4], before[4], atol=0, rtol=0)


def _copy_dir(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_base_model_mismatch_names_key_and_shapes(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    wider = BertModel(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64))
    get_peft_model(wider, LoraConfig(target_modules=["query", "value"], r=4)).save_pretrained(tmp_path)
    case = _case("bert")
    before = _snapshot(case["g"], case["inputs"])
    with pytest.raises(graftlib.LoadError) as error:
        graftlib.from_peft(case["g"], tmp_path, adapter_name="wider")
    message = str(error.value)
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in message
    assert "(4, 48)" in message and "(4, 32)" in message and "another base model" in message
    _assert_unchanged(case["g"], case["inputs"], before)


@pytest.mark.parametrize("damage, expected", [
    ("no_weights", "adapter_model.safetensors is missing"),
    ("pickle", "adapter_model.bin, a pickle; graftlib never unpickles"),
    ("corrupt", "is not a readable safetensors file"),
    ("no_config", "has no adapter_config.json"),
    ("bad_json", "cannot read"),
    ("missing_tensor", "encoder.layer.1.attention.self.value.lora_B.weight' is missing"),
    ("extra_tensor", "which BertModel does not have"),
    ("dora", "not supported: use_dora=True"),
    ("pissa", "not supported: init_lora_weights='pissa'"),
    ("boft", "not supported: peft_type='BOFT'"),
    ("bias", "not supported: bias='all'"),
])
def test_bad_checkpoints_fail_clearly_and_change_nothing(damage, expected, tmp_path):
    case = _case("bert")
    directory = _copy_dir(case["dir"], tmp_path / "adapter")
    weights, config_path = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if damage == "no_weights":
        weights.unlink()
    elif damage == "pickle":
        weights.rename(directory / "adapter_model.bin")
    elif damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:100] + b"\x00garbage")
    elif damage == "no_config":
        config_path.unlink()
    elif damage == "bad_json":
        config_path.write_text("{not json")
    elif damage in ("missing_tensor", "extra_tensor"):
        state = load_file(weights)
        if damage == "missing_tensor":
            del state["base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"]
        else:
            state["base_model.model.encoder.layer.7.attention.self.query.lora_A.weight"] = torch.zeros(4, 32)
        save_file(state, weights)
    else:
        changes = {"dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"},
                   "boft": {"peft_type": "BOFT"}, "bias": {"bias": "all"}}[damage]
        config_path.write_text(json.dumps({**config, **changes}))
    before = _snapshot(case["g"], case["inputs"])
    with pytest.raises(graftlib.LoadError) as error:
        graftlib.from_peft(case["g"], directory, adapter_name="broken")
    assert expected in str(error.value)
    _assert_unchanged(case["g"], case["inputs"], before)


def test_failure_after_grafting_rolls_back(monkeypatch):
    case = _case("convnet")
    directory, _, _ = _peft_dir("convnet", CASES["convnet"], seed=7)
    before = _snapshot(case["g"], case["inputs"])

    def fail(*args, **kwargs):
        raise graftlib.LoadError("simulated failure while copying tensors")

    monkeypatch.setattr(graftlib.peft, "install_tensors", fail)
    with pytest.raises(graftlib.LoadError, match="simulated failure"):
        graftlib.from_peft(case["g"], directory, adapter_name="halfway")
    _assert_unchanged(case["g"], case["inputs"], before)


def test_unknown_adapter_and_unsupported_saves(tmp_path):
    g = _case("convnet")["g"]
    with pytest.raises(graftlib.GraftError, match="no adapter named 'nope'"):
        g.save_peft(tmp_path, adapter="nope")
    saved_active = g.active_adapters
    if "dilated_lora" not in g.adapters:
        g.add("lora(dilated, r=2, name=dilated_lora)")
    g.set_active(saved_active)
    with pytest.raises(graftlib.GraftError, match="not supported: saving LoRA on the dilated convolution"):
        g.save_peft(tmp_path / "d", adapter="dilated_lora")
    assert not (tmp_path / "d" / "adapter_config.json").exists()
    bert = _case("bert")["g"]
    with pytest.raises(graftlib.GraftError, match="save_peft\\(dir, adapter='default'\\) writes it"):
        bert.save_peft(tmp_path / "m", adapter="default_modules")


# -- target matching is PEFT's -------------------------------------------------------------------
KEYS = ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.value",
        "encoder.layer.1.attention.output.dense", "pooler.dense", "h.0.attn.c_attn", "h.1.mlp.c_proj",
        "model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.v_proj", "layers.2.mlp.down_proj",
        "embed_tokens", "classifier", "blocks.1.q_proj"]
MATCH_CONFIGS = [
    dict(target_modules=["query", "value"]),
    dict(target_modules=["dense"], exclude_modules=["pooler.dense"]),
    dict(target_modules=r".*layers\.[0-2]\..*_proj"),
    dict(target_modules=["q_proj", "v_proj", "query"], exclude_modules=r".*\.0\..*"),
    dict(target_modules=["q_proj", "v_proj", "c_attn"], layers_to_transform=[0, 3]),
    dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=2, layers_pattern="layers"),
    dict(target_modules=["dense", "classifier"], modules_to_save=["pooler"]),
]


@pytest.mark.parametrize("options", MATCH_CONFIGS)
def test_target_matching_agrees_with_peft(options):
    from peft.tuners.tuners_utils import check_target_module_exists

    from graftlib.peft import peft_target_match

    config = LoraConfig(**options)
    for key in KEYS:
        expected = check_target_module_exists(config, key)
        expected = bool(expected) and type(expected).__name__ != "_ExcludedModule"
        assert peft_target_match(json.loads(json.dumps(config.to_dict(), default=list)), key) == expected, key


# -- other PEFT types go to their passes -------------------------------------------------------
def test_prompt_tuning_dispatches_to_its_pass(tmp_path):
    case = _case("llama")
    g = case["g"]
    model, inputs = build("llama")
    prompt = get_peft_model(model, peft.PromptTuningConfig(num_virtual_tokens=3, task_type="FEATURE_EXTRACTION"))
    torch.manual_seed(4)
    with torch.no_grad():
        prompt.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    prompt.eval()
    prompt.save_pretrained(tmp_path / "in")
    with torch.no_grad():
        want = _first(prompt(**inputs))
    saved_active = g.active_adapters
    graftlib.from_peft(g, tmp_path / "in", adapter_name="prompted")
    try:
        assert g.adapters["prompted"].method == "prompt"
        g.set_active("prompted")
        torch.testing.assert_close(_run(g, inputs), want, atol=TOL, rtol=0)
        g.save_peft(tmp_path / "out", adapter="prompted")
        torch.testing.assert_close(_peft_output("llama", tmp_path / "out"), want, atol=TOL, rtol=0)
    finally:
        g.set_active(saved_active)
        g.delete_adapter("prompted")


def test_missing_pass_hook_says_not_supported_yet(tmp_path, monkeypatch):
    import graftlib.passes.prompt as prompt_pass

    config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"prompt_embeddings": torch.zeros(2, 32)}, tmp_path / "adapter_model.safetensors")
    monkeypatch.delattr(prompt_pass, "peft_import")
    g = _case("llama")["g"]
    adapters = list(g.adapters)
    with pytest.raises(graftlib.GraftError, match="not supported yet: loading PEFT type PROMPT_TUNING"):
        graftlib.from_peft(g, tmp_path, adapter_name="later")
    assert list(g.adapters) == adapters
