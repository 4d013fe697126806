"""``lora(experts)``: LoRA on mixture-of-experts weights stored as one 3-D parameter, found by dataflow.

transformers 5 keeps Mixtral / Qwen2-MoE / OLMoE experts as ``gate_up_proj`` (E, 2I, H) and ``down_proj``
(E, H, I) read through a grouped matmul (``grouped_mm``) or per-token indexing + bmm (``batched_mm``); a
hand-written MoE picks ``W[e]`` in a loop and multiplies with ``linear`` or ``@`` (an (E, in, out) stack).
Each case is checked against the per-expert reference written here by hand: the eager model (transformers'
``eager`` experts loop) with every expert's weight replaced by ``W_e + s * B_e @ A_e``; the merge against
the unmerged graph (1e-6) with the base graph's ops; ONNX against onnxruntime.
"""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graftlib
from graftlib.tools.matrix import max_diff
from graftlib.tools.matrix_families import build_family, family_inputs

R, ALPHA = 2, 8.0          # s = alpha / r = 4: the scale is checked, not 1
SPEC = f"lora(experts, r={R}, alpha={ALPHA})"


class HandMoE(nn.Module):
    """A dense mixture: every expert runs, weighted by a softmax router; W[e] picked in a Python loop."""

    def __init__(self, transposed: bool, dim: int = 16, hidden: int = 24, experts: int = 3) -> None:
        super().__init__()
        self.transposed = transposed
        self.router = nn.Linear(dim, experts)
        up, down = ((experts, dim, hidden), (experts, hidden, dim)) if transposed else \
            ((experts, hidden, dim), (experts, dim, hidden))
        self.w_in = nn.Parameter(torch.randn(up) * 0.2)
        self.w_out = nn.Parameter(torch.randn(down) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.router(x), -1)                                # (B, N, E)
        out = torch.zeros_like(x)
        for e in range(self.w_in.shape[0]):
            if self.transposed:                                              # (E, in, out): x @ W[e]
                y = F.gelu(x @ self.w_in[e]) @ self.w_out[e]
            else:                                                            # (E, out, in): linear(x, W[e])
                y = F.linear(F.gelu(F.linear(x, self.w_in[e])), self.w_out[e])
            out = out + p[..., e:e + 1] * y
        return x + out


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))

# case -> (build, inputs, expert stacks found, (in, out, experts, transposed) of the first)
FAMILY_CASES = [(family, impl) for family in ("mixtral", "qwen2-moe", "olmoe") for impl in ("grouped_mm", "batched_mm")]
FIRST = {"mixtral": (32, 128, 4), "qwen2-moe": (32, 64, 4), "olmoe": (32, 128, 4)}


def _family_model(family: str, impl: str) -> nn.Module:
    model = build_family(family)
    model.set_experts_implementation(impl)
    return model


def _randomise(g: graftlib.Grafted) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in g.trainable_parameters().values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)
    g._invalidate()


def _fold_by_hand(model: nn.Module, g: graftlib.Grafted) -> nn.Module:
    """A copy of `model` with every expert e of every stack W replaced by W_e + s * B_e @ A_e.

    PEFT's ParamWrapper layout: A (r E, in) holds expert e's rows e*r .. e*r+r-1; B (out, r E) its columns
    e, e+E, e+2E, ... (``B.view(out, r, E)``). An (E, in, out) stack takes the transpose."""
    ref = copy.deepcopy(model)
    scale = ALPHA / R
    (adapter,) = g.adapters
    with torch.no_grad():
        for path, params in g.store.tensors(adapter).items():
            weight = ref.get_parameter(path)
            experts = weight.shape[0]
            for e in range(experts):
                a_e = params["lora_A"][e * R:(e + 1) * R]                     # (r, in)
                b_e = params["lora_B"][:, e::experts]                         # (out, r)
                delta = scale * (b_e @ a_e)                                   # (out, in)
                weight[e] += delta.T if getattr(ref, "transposed", False) else delta   # HandMoE(transposed)
    if hasattr(ref, "set_experts_implementation"):
        ref.set_experts_implementation("eager")                               # transformers' per-expert loop
        assert ref.config._experts_implementation == "eager"
    return ref


def _check_against_reference(model: nn.Module, g: graftlib.Grafted, inputs: dict) -> float:
    with torch.no_grad():
        base = model(**inputs)
        assert max_diff(g(**inputs), base) == 0.0                          # B = 0: the base model bit for bit
        _randomise(g)
        out = g(**inputs)
        ref = _fold_by_hand(model, g)(**inputs)
    assert max_diff(out, base) > 1e-2                                       # the adapter does something
    diff = max_diff(out, ref)
    assert diff < 1e-5, diff
    with g.disable_adapters(), torch.no_grad():
        assert max_diff(g(**inputs), base) == 0.0
    return diff


def _check_merge(g: graftlib.Grafted, inputs: dict) -> None:
    merged = g.merge()
    with torch.no_grad():
        assert max_diff(merged(**inputs), g(**inputs)) <= 1e-6
    with g.disable_adapters():
        assert merged.op_histogram() == g.op_histogram()                  # the base graph's ops


@pytest.mark.parametrize("family, impl", FAMILY_CASES)
def test_experts_equal_per_expert_reference_and_merge(family: str, impl: str) -> None:
    model = _family_model(family, impl)
    g = graftlib.apply(model, SPEC).eval()
    sites = g.sites()
    assert sites == [f"layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    tensors = g.store.tensors(next(iter(g.adapters)))
    in_f, out_f, experts = FIRST[family]
    first = tensors[sites[0]]
    assert tuple(first["lora_A"].shape) == (R * experts, in_f) and tuple(first["lora_B"].shape) == (out_f, R * experts)
    inputs = family_inputs(family)
    _check_against_reference(model, g, inputs)
    _check_merge(g, inputs)


@pytest.mark.parametrize("transposed", [False, True])
def test_hand_written_expert_loop(transposed: bool) -> None:
    torch.manual_seed(0)
    model = HandMoE(transposed).eval()
    g = graftlib.apply(model, SPEC, example_inputs=(X,)).eval()
    assert g.sites() == ["w_in", "w_out"]
    first = g.store.tensors(next(iter(g.adapters)))["w_in"]
    assert tuple(first["lora_A"].shape) == (R * 3, 16) and tuple(first["lora_B"].shape) == (24, R * 3)
    _check_against_reference(model, g, {"x": X})
    _check_merge(g, {"x": X})


def test_experts_onnx_matches_onnxruntime() -> None:
    """Merged into the stacks and exported: the grouped matmul translates (graftlib/onnx_ops.py)."""
    model = _family_model("mixtral", "grouped_mm")
    g = graftlib.apply(model, SPEC).eval()
    _randomise(g)
    with tempfile.TemporaryDirectory() as tmp:
        report = graftlib.export_onnx(g, f"{tmp}/m.onnx", progress=False)
    assert report.merged == ["default"]
    assert 0 < max(report.max_abs_diff.values()) < 1e-4


def test_save_and_load_replay_the_experts() -> None:
    model = _family_model("olmoe", "grouped_mm")
    g = graftlib.apply(model, SPEC).eval()
    _randomise(g)
    inputs = family_inputs("olmoe")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        g.save(f"{tmp}/a")
        loaded = graftlib.load(_family_model("olmoe", "grouped_mm"), f"{tmp}/a").eval()
        assert max_diff(loaded(**inputs), g(**inputs)) == 0.0


@pytest.mark.parametrize("option", ["dropout=0.1", "dora=true", "bias=true"])
def test_options_that_need_a_branch_input_are_refused(option: str) -> None:
    with pytest.raises(graftlib.GraftSpecError, match="expert stack .* drop"):
        graftlib.apply(HandMoE(False), f"lora(experts, r=2, {option})", example_inputs=(X,))


def test_a_model_without_experts_names_what_it_has() -> None:
    with pytest.raises(graftlib.GraftSpecError, match="alias 'experts' matches no"):
        graftlib.apply(build_family("llama"), "lora(experts)")


@pytest.mark.parametrize("use, match", [
    (lambda g: g.combine({"default": 1.0, "b": 0.5}, name="c"), "combine: w_in is an expert stack"),
    (lambda g: g(X, adapter_names=["default", "b"]), "mixed batches do not support LoRA on the expert stack"),
    (lambda g: g.save_peft(tempfile.mkdtemp(), adapter="default"), "saving lora\\(experts\\) in PEFT's format"),
])
def test_features_that_cannot_hold_expert_factors_say_so(use, match: str) -> None:
    g = graftlib.apply(HandMoE(False), f"{SPEC} + lora(experts, r=2, name=b)", example_inputs=(X,)).eval()
    with pytest.raises(graftlib.GraftError, match=match):
        use(g)


@pytest.mark.parametrize("family, stack", [("mixtral", "down_proj"), ("mixtral", "gate_up_proj"),
                                           ("qwen2-moe", "down_proj"), ("olmoe", "gate_up_proj")])
def test_equals_peft_target_parameters(family: str, stack: str) -> None:
    """PEFT as referee: ``LoraConfig(target_parameters=["mlp.experts.<stack>"])`` (its ParamWrapper) with the
    same factors equals the expert sites selected by name (one stack per module, as PEFT allows)."""
    from peft import LoraConfig, get_peft_model

    model, inputs = _family_model(family, "grouped_mm"), family_inputs(family)
    g = graftlib.apply(model, f"lora(experts.{stack}, r={R}, alpha={ALPHA})").eval()
    assert g.sites() == [f"layers.{i}.mlp.experts.{stack}" for i in range(2)]
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], target_parameters=[f"mlp.experts.{stack}"])
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    _randomise(g)
    with torch.no_grad():
        for key, params in g.store.tensors("default").items():
            owner = key.rsplit(".", 1)[0]
            for name in ("lora_A", "lora_B"):
                peft_model.get_parameter(f"base_model.model.{owner}.{name}.default.weight").copy_(params[name])
        diff = max_diff(g(**inputs), peft_model(**inputs))
    assert diff < 1e-5, diff
