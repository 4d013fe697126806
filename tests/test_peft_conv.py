"""Layer kinds beyond Linear / Conv2d, against PEFT: nn.Conv1d, grouped Conv1d, nn.Conv3d, grouped Conv2d
in PEFT's layout, and nn.MultiheadAttention (batched self-attention: one packed in-projection; unbatched:
the in-projection read in q/k/v row blocks).

Every (model, PEFT config) case goes through the same checks: ``from_peft`` gives PEFT's outputs
(<= 1e-5); ``save_peft`` writes what ``PeftModel.from_pretrained`` loads with graftlib's outputs and the
same tensors; with adapters disabled the graft is the base model bit for bit; merging gives the unmerged
outputs (or a clear refusal where PEFT's layout is not mergeable); ONNX export is verified against
onnxruntime for one case per layer kind. graftlib-native adapters on the same layers save into PEFT.
References: the installed ``peft`` package on copies of the same tiny models.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import graftlib
from graftlib.errors import GraftError, LoadError

peft = pytest.importorskip("peft")
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftModel, get_peft_model  # noqa: E402

TOL = 1e-5


class Conv1dNet(nn.Module):
    def __init__(self, groups: int = 1, channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, 8, 3, padding=1, groups=groups)
        self.lin = nn.Linear(8 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x (B, channels, 6)
        return self.lin(torch.relu(self.conv(x)).flatten(1))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 2, padding=1)
        self.lin = nn.Linear(4 * 27, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x (B, 3, 2, 2, 2)
        return self.lin(torch.relu(self.conv(x)).flatten(1))


class GroupedConv2dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.lin = nn.Linear(8 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x (B, 8, 4, 4)
        return self.lin(torch.relu(self.conv(x)).flatten(1))


class Conv2dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.lin = nn.Linear(6 * 9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x (B, 4, 5, 5): overlapping 3x3 patches
        return self.lin(torch.relu(self.conv(x)).flatten(1))


class MhaNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x (T, B, 8) or unbatched (T, 8)
        out, _ = self.mha(x, x, x)
        return self.lin(out)


MODELS = {
    "conv1d": (Conv1dNet, (2, 8, 6)),
    "conv1d-groups": (lambda: Conv1dNet(groups=2), (2, 8, 6)),
    "conv1d-wide": (lambda: Conv1dNet(channels=64), (2, 64, 6)),
    "conv3d": (Conv3dNet, (2, 3, 2, 2, 2)),
    "conv2d-groups": (GroupedConv2dNet, (2, 8, 4, 4)),
    "conv2d": (Conv2dNet, (2, 4, 5, 5)),
    "mha": (MhaNet, (5, 2, 8)),
    "mha-unbatched": (MhaNet, (5, 8)),
}

# case -> (model, PEFT config, mergeable, export ONNX)
CASES: dict[str, tuple[str, Any, bool, bool]] = {
    "lora-conv1d": ("conv1d", LoraConfig(target_modules=["conv", "lin"], r=4, lora_alpha=8), True, True),
    "dora-conv1d": ("conv1d", LoraConfig(target_modules=["conv"], r=4, use_dora=True), True, False),
    "lora-conv1d-groups": ("conv1d-groups", LoraConfig(target_modules=["conv"], r=4), False, False),
    "lora-conv3d": ("conv3d", LoraConfig(target_modules=["conv"], r=2, lora_alpha=3), True, True),
    "dora-conv3d": ("conv3d", LoraConfig(target_modules=["conv", "lin"], r=2, use_dora=True), True, False),
    "lora-conv2d-groups": ("conv2d-groups", LoraConfig(target_modules=["conv"], r=8), False, True),
    "dora-conv2d-groups": ("conv2d-groups", LoraConfig(target_modules=["conv"], r=4, use_dora=True), False, False),
    "lora-mha": ("mha", LoraConfig(target_modules=["mha", "lin"], r=4, lora_alpha=8), True, True),
    "lora-mha-unbatched": ("mha-unbatched", LoraConfig(target_modules=["mha"], r=2), True, True),
    "loha-conv1d": ("conv1d", LoHaConfig(target_modules=["conv"], r=2), True, True),
    "loha-conv1d-cp": ("conv1d", LoHaConfig(target_modules=["conv"], r=2, use_effective_conv2d=True), True, False),
    "loha-conv1d-groups": ("conv1d-groups", LoHaConfig(target_modules=["conv"], r=2), True, False),
    "lokr-conv1d": ("conv1d", LoKrConfig(target_modules=["conv"], r=2), True, False),
    "lokr-conv1d-cp": ("conv1d-wide", LoKrConfig(target_modules=["conv"], r=2, use_effective_conv2d=True), True, False),
    "lokr-conv1d-groups": ("conv1d-groups", LoKrConfig(target_modules=["conv"], r=2), True, False),
    "ia3-conv3d": ("conv3d", IA3Config(target_modules=["conv", "lin"], feedforward_modules=[]), True, False),
    # PEFT's unmerged OFT on a k x k conv unfolds, rotates and folds the input: oft(peft_conv=true)
    "oft-conv2d": ("conv2d", OFTConfig(target_modules=["conv"], r=0, oft_block_size=6), False, True),
    "oft-conv2d-share-coft": ("conv2d", OFTConfig(target_modules=["conv"], r=0, oft_block_size=4, block_share=True,
                                                  coft=True), False, False),
    "ia3-conv3d-ff": ("conv3d", IA3Config(target_modules=["conv"], feedforward_modules=["conv"]), True, False),
}

_ROOT = tempfile.TemporaryDirectory(prefix="graftlib-peft-conv-")
_cache: dict[str, dict[str, Any]] = {}


def _base(model: str) -> tuple[nn.Module, torch.Tensor]:
    make, shape = MODELS[model]
    torch.manual_seed(0)
    base = make().eval()
    x = torch.randn(*shape)
    return base, x


def _randomise(module: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if any(tag in name for tag in ("lora_", "hada_", "lokr_", "ia3_", "oft_")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if "ia3_" in name else 0.0))


def _case(name: str) -> dict[str, Any]:
    """PEFT model, its saved folder and output, and the graftlib module loaded from it (built once)."""
    if name not in _cache:
        model, config, _, _ = CASES[name]
        base, x = _base(model)
        peft_model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
        _randomise(peft_model)
        peft_model.eval()
        with torch.no_grad():
            expected = peft_model(x)
        folder = Path(_ROOT.name) / name
        peft_model.save_pretrained(str(folder))
        g = graftlib.from_peft(copy.deepcopy(base), folder / "default" if (folder / "default").is_dir() else folder,
                               example_inputs={"x": x})
        _cache[name] = dict(base=base, x=x, expected=expected, folder=folder, g=g)
    return _cache[name]


@pytest.mark.parametrize("name", list(CASES))
def test_from_peft_matches_peft(name: str) -> None:
    case = _case(name)
    with torch.no_grad():
        got = case["g"](x=case["x"])
    assert (got - case["expected"]).abs().max().item() <= TOL


@pytest.mark.parametrize("name", list(CASES))
def test_save_peft_round_trips(name: str, tmp_path: Path) -> None:
    case = _case(name)
    case["g"].save_peft(str(tmp_path))
    written, original = load_file(str(tmp_path / "adapter_model.safetensors")), \
        load_file(str(case["folder"] / "adapter_model.safetensors"))
    assert sorted(written) == sorted(original)
    for key, tensor in original.items():
        assert torch.allclose(written[key], tensor, atol=1e-7), key
    reloaded = PeftModel.from_pretrained(copy.deepcopy(case["base"]), str(tmp_path)).eval()
    with torch.no_grad():
        assert (reloaded(case["x"]) - case["g"](x=case["x"])).abs().max().item() <= TOL


@pytest.mark.parametrize("name", list(CASES))
def test_adapters_off_is_the_base_model_exactly(name: str) -> None:
    case = _case(name)
    with torch.no_grad(), case["g"].disable_adapters():
        got = case["g"](x=case["x"])
    assert torch.equal(got, case["base"](case["x"]))


@pytest.mark.parametrize("name", list(CASES))
def test_merge(name: str) -> None:
    case = _case(name)
    mergeable = CASES[name][2]
    if not mergeable:
        with pytest.raises(GraftError, match="not mergeable"):
            case["g"].merge()
        return
    merged = case["g"].merge()
    with torch.no_grad():
        assert (merged(x=case["x"]) - case["expected"]).abs().max().item() <= TOL
    ops = merged.op_histogram()
    assert not any("lora" in k or "kron" in k for k in ops)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[3]])
def test_onnx_export_is_verified(name: str, tmp_path: Path) -> None:
    case = _case(name)
    report = graftlib.export_onnx(case["g"], tmp_path / "m.onnx", merge=CASES[name][2], progress=False,
                                  tolerance=1e-4)
    assert (tmp_path / "m.onnx").is_file() and report.verified
    assert max(report.max_abs_diff.values()) <= 1e-4
    assert bool(report.merged) == CASES[name][2]


# -- graftlib-native adapters on the new layer kinds, saved for PEFT ----------------------------------
NATIVE = {
    "conv1d": "lora(conv, r=2, alpha=4)",
    "conv1d-groups": "lora(conv, r=2)",                     # block layout (the default): mergeable
    "conv3d": "lora(conv, lin, r=2, dora=true)",
    "conv2d-groups": "lora(conv, r=4, conv_groups=dense)",  # PEFT's layout
    "mha-unbatched": "lora(mha, r=2)",                      # in_proj only: out_proj saved as a zero LoRA
}


@pytest.mark.parametrize("model", list(NATIVE))
def test_native_adapter_saves_into_peft(model: str, tmp_path: Path) -> None:
    base, x = _base(model)
    g = graftlib.apply(copy.deepcopy(base), NATIVE[model], {"x": x})
    _randomise(g)
    with torch.no_grad():
        ours = g(x=x)
    assert (ours - base(x)).abs().max().item() > 1e-3          # the adapter changes the model
    g.save_peft(str(tmp_path))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert (reloaded(x) - ours).abs().max().item() <= TOL
    if "dense" not in NATIVE[model]:
        with torch.no_grad():
            assert (g.merge()(x=x) - ours).abs().max().item() <= TOL


def test_block_layout_merges_per_group() -> None:
    """The default grouped-conv LoRA is one rank-r LoRA per group: its delta has the grouped weight's shape."""
    base, x = _base("conv2d-groups")
    g = graftlib.apply(copy.deepcopy(base), "lora(conv, r=2)", {"x": x})
    params = g.store.tensors("default")["conv"]
    assert tuple(params["lora_A"].shape) == (2 * 4, 2, 3, 3) and tuple(params["lora_B"].shape) == (8, 2, 1, 1)
    _randomise(g)
    with torch.no_grad():
        assert (g.merge()(x=x) - g(x=x)).abs().max().item() <= TOL


def test_dense_rank_must_divide_groups() -> None:
    base, x = _base("conv2d-groups")
    with pytest.raises(GraftError, match="divisible"):
        graftlib.apply(copy.deepcopy(base), "lora(conv, r=3, conv_groups=dense)", {"x": x})


# -- refusals name the layer type, never blame the checkpoint for it -----------------------------------
class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x))


def _hand_checkpoint(folder: Path, module: str, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["%s"]}' % module)
    save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(shapes[0]),
               f"base_model.model.{module}.lora_B.weight": torch.zeros(shapes[1])},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("module, expected, not_expected", [
    ("norm", r"not supported: LoRA on the LayerNorm module 'norm'", "another base model"),
    ("unused", r"never calls", "another base model"),
    ("nowhere", r"does not have; was the adapter saved from another base model", "not supported"),
])
def test_refusal_names_the_layer(module: str, expected: str, not_expected: str, tmp_path: Path) -> None:
    folder = _hand_checkpoint(tmp_path / module, module, ((2, 8), (8, 2)))
    with pytest.raises(LoadError, match=expected) as info:
        graftlib.from_peft(NormNet().eval(), folder, example_inputs={"x": torch.randn(2, 8)})
    assert not_expected not in str(info.value)
