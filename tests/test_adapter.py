"""Bottleneck adapters: identity at init, the AdapterHub formulas by hand, sites, disable, save/load, ONNX.

Each architecture is traced once (module-scoped fixture) with three adapters on ``ffn, attn``:
``p`` (pfeiffer), ``h`` (houlsby) and ``q`` (parallel); tests activate one at a time. The hand
computation runs the eager model with forward hooks: a pre-hook captures the block's residual input
``x`` (post-LN: the input of the sublayer's first projection; pre-LN: the input of the norm that feeds
the sublayer) and a hook on the output projection returns ``f + B(u)``, after which the model's own
add (and, post-LN, its own LayerNorm) finish the formula.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graftlib
from graftlib.runtime import op_histogram, specialise

sys.path.insert(0, str(Path(__file__).parent))
import models  # noqa: E402

ARCHS = ["bert", "roberta", "distilbert", "gpt2", "llama", "t5", "bart", "vit", "hand_preln", "hand"]
SPEC = ("adapter(ffn, attn, m=4, name=p) + adapter(attn, ffn, kind=houlsby, reduction=8, name=h) + "
        "adapter(ffn, attn, kind=parallel, act=tanh, scale=2.0, m=3, name=q)")
KIND_OF = {"p": "pfeiffer", "h": "houlsby", "q": "parallel"}
ACT_OF = {"p": F.relu, "h": F.silu, "q": torch.tanh}
SCALE_OF = {"p": 1.0, "h": 1.0, "q": 2.0}

#: arch -> sublayer -> (output projection, module whose input is the residual x, post-add LayerNorm)
BLOCKS: dict[str, dict[str, tuple[str, str, str | None]]] = {
    "bert": {"attn": ("encoder.layer.0.attention.output.dense", "encoder.layer.0.attention.self.query",
                      "encoder.layer.0.attention.output.LayerNorm"),
             "ffn": ("encoder.layer.1.output.dense", "encoder.layer.1.intermediate.dense",
                     "encoder.layer.1.output.LayerNorm")},
    "distilbert": {"attn": ("transformer.layer.0.attention.out_lin", "transformer.layer.0.attention.q_lin",
                            "transformer.layer.0.sa_layer_norm"),
                   "ffn": ("transformer.layer.1.ffn.lin2", "transformer.layer.1.ffn.lin1",
                           "transformer.layer.1.output_layer_norm")},
    "gpt2": {"attn": ("h.0.attn.c_proj", "h.0.ln_1", None), "ffn": ("h.1.mlp.c_proj", "h.1.ln_2", None)},
    "llama": {"attn": ("layers.0.self_attn.o_proj", "layers.0.input_layernorm", None),
              "ffn": ("layers.1.mlp.down_proj", "layers.1.post_attention_layernorm", None)},
    "t5": {"attn": ("encoder.block.0.layer.0.SelfAttention.o", "encoder.block.0.layer.0.layer_norm", None),
           "ffn": ("decoder.block.1.layer.2.DenseReluDense.wo", "decoder.block.1.layer.2.layer_norm", None)},
    "bart": {"attn": ("encoder.layers.0.self_attn.out_proj", "encoder.layers.0.self_attn.q_proj",
                      "encoder.layers.0.self_attn_layer_norm"),
             "ffn": ("decoder.layers.1.fc2", "decoder.layers.1.fc1", "decoder.layers.1.final_layer_norm")},
    "vit": {"attn": ("layers.0.attention.o_proj", "layers.0.layernorm_before", None),
            "ffn": ("layers.1.mlp.fc2", "layers.1.layernorm_after", None)},
    "hand_preln": {"attn": ("blocks.0.o_proj", "blocks.0.ln1", None),
                   "ffn": ("blocks.1.down_proj", "blocks.1.ln2", None)},
    "hand": {"attn": ("blocks.0.proj", "blocks.0.wq", "blocks.0.norm1"),
             "ffn": ("blocks.1.fc_out", "blocks.1.fc_in", "blocks.1.norm2")},
}
BLOCKS["roberta"] = BLOCKS["bert"]
#: transformer layers (T5 / BART: encoder + decoder layers)
LAYERS = {arch: 4 if arch in ("t5", "bart") else 2 for arch in ARCHS}


def main_output(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out[0]  # type: ignore[index]


@pytest.fixture(scope="module", params=ARCHS)
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, dict, graftlib.Grafted]:
    arch = request.param
    model, inputs = models.build(arch)
    g = graftlib.apply(model, SPEC, example_inputs=models.example_inputs(arch))
    g.eval()
    return arch, model, inputs, g


@contextlib.contextmanager
def randomized(g: graftlib.Grafted, adapter: str, sites: set[str] | None = None, seed: int = 0,
               std: float = 0.3) -> Iterator[None]:
    """Random adapter weights (at `sites`, or everywhere) for the duration of the block."""
    gen = torch.Generator().manual_seed(seed)
    saved = []
    with torch.no_grad():
        for key, params in g.store.tensors(adapter).items():
            if sites is None or key in sites:
                for tensor in params.values():
                    saved.append((tensor, tensor.detach().clone()))
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)


def run(g: graftlib.Grafted, inputs: dict, active: tuple[str, ...] | str) -> torch.Tensor:
    g.set_active(active)
    with torch.no_grad():
        return main_output(g(**inputs))


def by_hand(model: nn.Module, inputs: dict, block: tuple[str, str, str | None], adapter: str,
            params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The eager model with ``f -> f + B(u)`` at one projection (the AdapterHub formulas)."""
    proj, source, norm = block
    modules = dict(model.named_modules())
    kind, act, scale = KIND_OF[adapter], ACT_OF[adapter], SCALE_OF[adapter]
    captured: dict[str, torch.Tensor] = {}

    def grab(_module: nn.Module, args: tuple) -> None:
        captured["x"] = args[0]

    def patch(_module: nn.Module, _args: tuple, f: torch.Tensor) -> torch.Tensor:
        x = captured["x"]
        if kind == "pfeiffer":
            u = modules[norm](f + x) if norm else f
        else:
            u = f if kind == "houlsby" else x
        hidden = act(F.linear(u, params["down_weight"], params["down_bias"]))
        return f + scale * F.linear(hidden, params["up_weight"], params["up_bias"])

    handles = [modules[source].register_forward_pre_hook(grab), modules[proj].register_forward_hook(patch)]
    try:
        with torch.no_grad():
            return main_output(model(**inputs))
    finally:
        for handle in handles:
            handle.remove()


# -- identity, disable ----------------------------------------------------------------------------
def test_identity_at_init(case: tuple) -> None:
    arch, model, inputs, g = case
    base = run(g, inputs, ())
    with torch.no_grad():
        eager = main_output(model(**inputs))
    torch.testing.assert_close(base, eager, atol=1e-5, rtol=0)
    for active in (("p",), ("h",), ("q",), ("p", "h", "q")):
        assert torch.equal(run(g, inputs, active), base), (arch, active)


def test_disable_restores_base_exactly(case: tuple) -> None:
    arch, _, inputs, g = case
    base = run(g, inputs, ())
    with randomized(g, "p"), randomized(g, "h", seed=1), randomized(g, "q", seed=2):
        changed = run(g, inputs, ("p", "h", "q"))
        assert (changed - base).abs().max() > 1e-3
        with g.disable_adapters():
            assert torch.equal(main_output(g(**inputs)), base)
            assert g.op_histogram() == op_histogram(specialise(g.base_graph, (), False))


# -- the formulas -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sublayer", ["attn", "ffn"])
@pytest.mark.parametrize("adapter", ["p", "h", "q"])
def test_formula_by_hand(case: tuple, adapter: str, sublayer: str) -> None:
    arch, model, inputs, g = case
    block = BLOCKS[arch][sublayer]
    site = block[0]
    assert site in g.adapters[adapter].sites
    with randomized(g, adapter, {site}, seed=3):
        got = run(g, inputs, adapter)
        params = {k: v.detach() for k, v in g.store.tensors(adapter)[site].items()}
        want = by_hand(model, inputs, block, adapter, params)
        base = run(g, inputs, ())
    assert (want - base).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_post_and_pre_ln_found_structurally(case: tuple) -> None:
    arch, _, _, g = case
    tags = [n.meta["custom"]["graft"] for n in g.graph.nodes
            if (n.meta.get("custom") or {}).get("graft", {}).get("role") == "join"
            and n.meta["custom"]["graft"]["adapter"] == "p"]
    post = {BLOCKS[arch][s][2] is not None for s in ("attn", "ffn")}
    assert len(post) == 1
    assert [t["bottleneck"]["post_ln"] for t in tags] == [post.pop()] * LAYERS[arch] * 2


# -- sites -----------------------------------------------------------------------------------------------
def test_site_count(case: tuple) -> None:
    arch, _, _, g = case
    for name in ("p", "h", "q"):
        assert len(g.adapters[name].sites) == LAYERS[arch] * 2
    (attn,) = graftlib.select(g, "adapter(attn)")
    (ffn,) = graftlib.select(g, "adapter(ffn)")
    assert len(attn) == len(ffn) == LAYERS[arch]
    assert {s.role for s in attn.sites} == {"o"} and {s.role for s in ffn.sites} == {"down"}
    (cross,) = graftlib.select(g, "adapter(attn, cross=true)")
    decoder_layers = 2 if arch in ("t5", "bart") else 0  # cross-attention: opt-in, one per decoder layer
    assert len(cross) == LAYERS[arch] + decoder_layers
    (first,) = graftlib.select(g, "adapter(ffn, attn, layers=0)")
    assert {s.layer for s in first.sites} == {0} and len(first) == (4 if arch in ("t5", "bart") else 2)


def test_parameter_shapes_and_trainable(case: tuple) -> None:
    arch, _, _, g = case
    site = BLOCKS[arch]["ffn"][0]
    hidden = 32
    shapes = {k: tuple(v.shape) for k, v in g.store.tensors("h")[site].items()}
    assert shapes == {"down_weight": (hidden // 8, hidden), "down_bias": (hidden // 8,),
                      "up_weight": (hidden, hidden // 8), "up_bias": (hidden,)}
    up = g.store.tensors("p")[site]
    assert torch.count_nonzero(up["up_weight"]) == 0 and torch.count_nonzero(up["up_bias"]) == 0
    trainable = g.train_only("adapters:p")
    assert trainable and all(name.startswith("graph_module.graft.p.") for name in trainable)
    assert sum(p.numel() for p in trainable.values()) == LAYERS[arch] * 2 * (2 * 4 * hidden + 4 + hidden)
    g.train_only("adapters")


# -- bad input -----------------------------------------------------------------------------------
class NoResidual(nn.Module):
    """A block without a residual connection: nothing to attach an adapter to."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def preln() -> tuple[nn.Module, dict]:
    model, inputs = models.build("hand_preln")
    return model, inputs


def test_m_larger_than_hidden(preln: tuple) -> None:
    model, _ = preln
    with pytest.raises(graftlib.GraftSpecError, match=r"m=64 is larger than the hidden size 32 at blocks\.0\."):
        graftlib.apply(model, "adapter(ffn, m=64)", example_inputs=models.example_inputs("hand_preln"))


@pytest.mark.parametrize("spec, message", [
    ("adapter(ffn, m=4, reduction=8)", r"give m= \(bottleneck width\) or reduction= .*not both"),
    ("adapter(ffn, kind=lora)", "kind='lora' is not one of pfeiffer, houlsby, parallel"),
    ("adapter(ffn, act=softmax)", "act='softmax' is not one of relu, gelu, swish, silu, tanh"),
    ("adapter(q)", r"cannot graft blocks\.0\.q_proj \(q\).*linear -> view -> transpose -> "
                   r"scaled_dot_product_attention"),
])
def test_bad_options(preln: tuple, spec: str, message: str) -> None:
    model, _ = preln
    with pytest.raises(graftlib.GraftSpecError, match=message):
        graftlib.apply(model, spec, example_inputs=models.example_inputs("hand_preln"))


def test_no_residual_add_lists_what_was_found() -> None:
    model = NoResidual()
    with pytest.raises(graftlib.GraftSpecError) as info:
        graftlib.apply(model, "adapter(fc2)", example_inputs=(torch.randn(2, 3, 8),))
    assert "no residual add (x + f)" in str(info.value)
    assert "after the projection: linear -> output" in str(info.value)
    with pytest.raises(graftlib.GraftSpecError, match=r"after the projection: linear -> relu"):
        graftlib.apply(model, "adapter(fc1)", example_inputs=(torch.randn(2, 3, 8),))
    with pytest.raises(graftlib.GraftSpecError, match=r"'attn' \(its 'o' projection\) matches no linear/conv1d "
                                                      r"site in this model; it has: down, up"):
        graftlib.apply(model, "adapter(attn)", example_inputs=(torch.randn(2, 3, 8),))


# -- save / load / from= / ONNX ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert() -> tuple[nn.Module, dict, graftlib.Grafted]:
    model, inputs = models.build("bert")
    g = graftlib.apply(model, "adapter(ffn, attn, m=4, name=p) + adapter(ffn, kind=houlsby, m=2, name=h)")
    g.eval()
    return model, inputs, g


def test_save_load_round_trip(bert: tuple, tmp_path: Path) -> None:
    model, inputs, g = bert
    with randomized(g, "p", seed=5), randomized(g, "h", seed=6):
        want = run(g, inputs, ("p", "h"))
        g.save(tmp_path / "saved")
        loaded = graftlib.load(model, tmp_path / "saved").eval()
        assert loaded.active_adapters == ("p", "h")
        with torch.no_grad():
            assert torch.equal(main_output(loaded(**inputs)), want)
        for name in ("p", "h"):
            for site, params in g.store.tensors(name).items():
                for pname, value in params.items():
                    assert torch.equal(loaded.store.tensors(name)[site][pname], value)


def test_from_directory(bert: tuple, tmp_path: Path) -> None:
    model, inputs, g = bert
    with randomized(g, "p", seed=7):
        want = run(g, inputs, "p")
        g.save(tmp_path / "two")
    fresh = graftlib.apply(model, 'adapter(from="' + str(tmp_path / "two") + '", name=p)').eval()
    assert fresh.adapters["p"].sites == g.adapters["p"].sites
    with torch.no_grad():
        assert torch.equal(main_output(fresh(**inputs)), want)
    fresh.save(tmp_path / "fresh")
    shutil.rmtree(tmp_path / "two")  # the saved graft no longer needs the directory it started from
    loaded = graftlib.load(model, tmp_path / "fresh").eval()
    assert loaded.adapters["p"].sites == g.adapters["p"].sites
    with torch.no_grad():
        assert torch.equal(main_output(loaded(**inputs)), want)  # all-ones mask: the unpadded twin, a re-trace
        assert loaded._variants, "the call above re-traced the grafts"
    g.save(tmp_path / "two")
    with pytest.raises(graftlib.GraftSpecError, match=r"holds several adapters \(p, h\); pick one with name="):
        fresh.add('adapter(from="' + str(tmp_path / "two") + '", name=other)')
    with pytest.raises(graftlib.GraftSpecError, match=r"kind='parallel' differs from the saved adapter's kind='pfeiffer'"):
        fresh.add('adapter(from="' + str(tmp_path / "two") + '", kind=parallel, name=p)')
    with pytest.raises(graftlib.GraftSpecError, match=r"the targets select other sites than the adapter saved"):
        graftlib.select(fresh, 'adapter(ffn, from="' + str(tmp_path / "two") + '", name=p)')
    with pytest.raises(graftlib.GraftSpecError, match="no such directory"):
        fresh.add('adapter(from="' + str(tmp_path / "missing") + '", name=x)')


def test_onnx_matches_onnxruntime(bert: tuple, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, inputs, g = bert
    with randomized(g, "p", seed=8), randomized(g, "h", seed=9):
        want = run(g, inputs, ("p", "h"))
        module = g.runtime_module()
        kwargs = {**inputs, **g._traced.constants}
        program = torch.onnx.export(module, (), kwargs=kwargs, dynamo=True, optimize=False)
        path = tmp_path / "adapter.onnx"
        program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    got = torch.from_numpy(session.run(None, feed)[0])
    assert (want - run(g, inputs, ())).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
