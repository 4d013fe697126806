"""The graph is the model: every mode's graph is that mode's trace, verified against the eager model.

Table of models whose training mode does more than dropout: stochastic depth written as rand/floor/div
(Swin, ConvNeXt, BEiT) and a hand-written ``if self.training:`` branch (Gaussian noise plus batch norm).
Each is grafted in training mode (the eval graph is then traced on ``eval()``) and in eval mode (the train
graph traced on ``train()``), and checked: adapters off equals the eager model bit for bit in eval, eval is
deterministic, training mode matches the eager model under a fixed seed, a saved and reloaded graft gives
the same outputs, and ONNX export verifies. Then the refusals: a trace that silently diverges from its
eager forward is refused naming the module; an untraceable forward gets a short error naming its line.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graftlib
from graftlib.trace import trace

IMAGE = 32


class NoisyBlock(nn.Module):
    """A residual block whose training mode adds Gaussian noise (not dropout) and updates batch norm."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D)
        h = self.v(F.gelu(self.q(x)))
        if self.training:
            h = h + 0.5 * torch.randn_like(h)
        return x + self.norm(h.transpose(1, 2)).transpose(1, 2)


class Noisy(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([NoisyBlock(dim), NoisyBlock(dim)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return x


def _swin() -> nn.Module:
    import transformers as T

    config = T.SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                          window_size=4)
    assert config.drop_path_rate == 0.1  # the default, as in the issue
    return T.SwinModel(config)


def _convnext() -> nn.Module:
    import transformers as T

    return T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[2, 1], num_stages=2, image_size=IMAGE,
                                            drop_path_rate=0.3))


def _beit() -> nn.Module:
    import transformers as T

    config = T.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=IMAGE, patch_size=8, drop_path_rate=0.2, use_mean_pooling=True)
    return T.BeitModel(config)


def _pixels(batch: int, seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))}


def _tokens(batch: int, seed: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 50, (batch, 6), generator=torch.Generator().manual_seed(seed))}


#: (name, builder, spec, inputs(batch, seed), example inputs or None)
CASES: list[tuple[str, Callable[[], nn.Module], str, Callable[..., dict], dict | None]] = [
    ("swin", _swin, "lora(q,v,r=4)", _pixels, None),
    ("convnext", _convnext, "lora(pwconv1,r=2)", _pixels, None),
    ("beit", _beit, "lora(q,v,r=4)", _pixels, None),
    ("noisy", Noisy, "lora(q,v,r=2)", _tokens, _tokens(2, 0)),
]
#: grafted in training mode (eval traced on eval()) for every case; in eval mode (train traced on train()) for two
PARAMS = [(case, "applied-in-train") for case in CASES] + [(CASES[0], "applied-in-eval"), (CASES[3], "applied-in-eval")]


def _first(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state


def _randomise(g: graftlib.Grafted) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in g.store.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module", params=PARAMS, ids=[f"{c[0]}-{m}" for c, m in PARAMS])
def grafted(request: pytest.FixtureRequest) -> tuple[nn.Module, graftlib.Grafted, tuple]:
    case, mode = request.param
    name, builder, spec, inputs, example = case
    torch.manual_seed(0)
    model = builder()
    model.train(mode == "applied-in-train")
    g = graftlib.apply(model, spec, example_inputs=example)
    assert g.traced_training == model.training
    _randomise(g)
    return model, g, case


def test_adapters_off_equals_the_eager_model_exactly_in_eval(grafted) -> None:
    model, g, (_, _, _, inputs, _) = grafted
    x = inputs(3, seed=1)
    model.eval()
    g.eval()
    with torch.no_grad():
        want = _first(model(**x))
        with g.disable_adapters():
            got, again = _first(g(**x)), _first(g(**x))
        on = _first(g(**x))
    assert torch.equal(got, want), (got - want).abs().max()
    assert torch.equal(again, got)  # deterministic: no random op left in the eval graph
    assert not torch.equal(on, want)  # the adapters are on the path (non-zero weights)


def test_training_mode_matches_the_eager_model_under_a_fixed_seed(grafted) -> None:
    model, g, (_, _, _, inputs, _) = grafted
    x = inputs(8, seed=2)
    model.train()
    g.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    graph_buffers = [(b, b.clone()) for b in g.buffers()]
    try:
        with torch.no_grad(), g.disable_adapters():
            torch.manual_seed(7)
            got = _first(g(**x))
            torch.manual_seed(7)
            want = _first(model(**x))
            others = []
            for seed in range(8, 12):
                torch.manual_seed(seed)
                others.append(_first(g(**x)))
    finally:  # batch-norm statistics as they were, for the other checks
        model.load_state_dict(buffers)
        with torch.no_grad():
            for buffer, value in graph_buffers:
                buffer.copy_(value)
        model.eval()
        g.eval()
    assert torch.equal(got, want), (got - want).abs().max()
    assert not all(torch.equal(got, other) for other in others)  # the training graph kept its randomness


def test_saved_graft_reloads_to_the_same_outputs(grafted, tmp_path) -> None:
    model, g, (_, _, _, inputs, example) = grafted
    x = inputs(2, seed=3)
    g.eval()
    g.save(tmp_path / "graft")
    model.eval()
    loaded = graftlib.load(model, tmp_path / "graft", example_inputs=example)
    loaded.eval()
    with torch.no_grad():
        want = _first(g(**x))
        got = _first(loaded(**x))
    assert torch.equal(got, want), (got - want).abs().max()


def test_onnx_export_verifies(grafted, tmp_path) -> None:
    _, g, _ = grafted
    report = graftlib.export_onnx(g, tmp_path / "model.onnx", progress=False)  # raises above its tolerance
    assert report.max_abs_diff and max(report.max_abs_diff.values()) <= 1e-4


# -- dynamic dims by input kind ---------------------------------------------------------------------
def test_image_sizes_are_static_and_batch_is_dynamic() -> None:
    torch.manual_seed(0)
    model = _swin().eval()
    g = graftlib.apply(model, "lora(q,v,r=2)")
    assert g._traced.axes == {"pixel_values": (0,)}
    with torch.no_grad(), g.disable_adapters():
        for batch in (1, 3):  # batch 1 at a fresh size: the window-count guard used to reject it
            x = _pixels(batch, seed=batch)
            assert torch.equal(_first(g(**x)), _first(model(**x)))


def test_dynamic_takes_a_per_input_spec() -> None:
    x = _tokens(2, 0)
    model = Noisy().eval()
    assert trace(model, x).axes == {"input_ids": (0, 1)}
    assert trace(model, x, dynamic={"input_ids": (0,)}).axes == {"input_ids": (0,)}
    assert trace(model, x, dynamic={"input_ids": {0: "batch"}}).axes == {"input_ids": (0,)}
    assert trace(model, x, dynamic={"input_ids": False}).axes == {"input_ids": ()}
    assert trace(model, x, dynamic=False).dynamic is False
    with pytest.raises(graftlib.TraceError, match="'pixels'.*not tensor inputs"):
        trace(model, x, dynamic={"pixels": True})
    with pytest.raises(graftlib.TraceError, match="5 is not an axis of input_ids"):
        trace(model, x, dynamic={"input_ids": (0, 5)})


# -- refusals ----------------------------------------------------------------------------------------
class Counting(nn.Module):
    """Scales by how often it was called: a Python int the trace bakes in as a constant."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.q(x) * self.calls


class Cached(nn.Module):
    """Caches a tensor on its first call and updates it in place on every call: the trace reads it as a
    constant, so the graph keeps the value it saw."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.offset: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset is None:
            self.offset = torch.zeros(x.shape[-1])
        out = self.q(x) + self.offset
        self.offset.add_(1.0)
        return out


class Outer(nn.Module):
    def __init__(self, inner: nn.Module, dim: int = 8):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.inner = inner
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(self.embed(x)))


@pytest.mark.parametrize("inner,name", [(Counting, "Counting"), (Cached, "Cached")], ids=["counter", "cache"])
def test_a_trace_that_diverges_from_eager_is_refused_naming_the_module(inner, name) -> None:
    torch.manual_seed(0)
    model = Outer(inner()).eval()
    x = torch.randn(2, 5, 8)
    model(x)  # used eagerly before grafting, as models are
    with pytest.raises(graftlib.TraceError, match=rf"first diverging module: inner \({name}\), max abs diff") as info:
        graftlib.apply(model, "lora(q,r=2)", example_inputs={"x": x})
    assert "max abs diff" in str(info.value).splitlines()[0]
    graftlib.apply(Outer(inner()).eval(), "lora(q,r=2)", example_inputs={"x": x}, verify=False)  # opt out


def test_verification_is_skipped_for_meta_weights() -> None:
    with torch.device("meta"):
        model = Outer(Counting()).eval()
    traced = trace(model, {"x": torch.randn(2, 5, 8, device="meta")})  # would diverge with real weights
    assert traced.verify is True


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent branch
            return self.q(x)
        return x


def test_an_untraceable_model_gets_a_short_error_naming_its_line() -> None:
    line = next(i for i, text in enumerate(inspect.getsourcelines(Branching.forward)[0])
                if "x.sum() > 0" in text) + inspect.getsourcelines(Branching.forward)[1]
    with pytest.raises(graftlib.TraceError) as info:
        graftlib.apply(Branching(), "lora(q,r=2)", example_inputs={"x": torch.randn(2, 4)})
    message = str(info.value)
    assert len(message.splitlines()) <= 15, message
    assert f"{__file__}:{line}, in forward" in message, message
    assert "if x.sum() > 0" in message and "torch.cond" in message
    assert "dynamic=False" not in message  # it does not help a data-dependent branch
    assert info.value.__cause__ is not None  # the full chain stays available
