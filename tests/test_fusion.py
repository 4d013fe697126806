"""AdapterFusion: the formula by hand, replacing the fused adapters, weights, two-stage training, errors,
save/load, ``from=``, ONNX, and a seeded two-task training run.

The hand computation hooks the eager model's output projections at two blocks (attention of the first
layer, FFN of the last): it recomputes the three adapters' bottleneck outputs from the block's input
and applies ``BertFusion`` (query from the adapters' input, identity-free random key / value matrices,
softmax over adapters). The adapters are zero elsewhere, so the fusion is exactly neutral there.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graftlib
from graftlib.passes.fusion import fusion_weights

sys.path.insert(0, str(Path(__file__).parent))
import models  # noqa: E402
from test_adapter import BLOCKS, main_output, randomized, run  # noqa: E402

CASES = [("bert", "pfeiffer"), ("gpt2", "pfeiffer"), ("llama", "houlsby"), ("hand", "parallel")]
ACTS = {"pfeiffer": F.relu, "houlsby": F.silu, "parallel": F.relu}
SCALES = {"pfeiffer": 1.0, "houlsby": 1.0, "parallel": 4.0}
#: fusion name -> options (F: the defaults; G: the other branches of the formula)
FUSIONS = {"F": dict(temperature=1.0, value=True, residual_before=False),
           "G": dict(temperature=2.0, value=False, residual_before=True)}
NAMES = ("a", "b", "c")


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{k}" for a, k in CASES])
def case(request: pytest.FixtureRequest) -> dict:
    arch, kind = request.param
    model, inputs = models.build(arch)
    spec = " + ".join(f"adapter(ffn, attn, kind={kind}, m=4, name={n})" for n in NAMES)
    g = graftlib.apply(model, spec, example_inputs=models.example_inputs(arch)).eval()
    sites = {BLOCKS[arch][s][0] for s in ("attn", "ffn")}
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # "trained" adapters at the two hand-checked blocks, zero (neutral) elsewhere
        for name in NAMES:
            for site in sites:
                for tensor in g.store.tensors(name)[site].values():
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
    stacked = run(g, inputs, NAMES)
    g.add("fusion(a, b, c, name=F) + fusion(a, b, c, temperature=2.0, value=false, residual_before=true, name=G)")
    with torch.no_grad():
        for name in FUSIONS:
            for params in g.store.tensors(name).values():
                for tensor in params.values():
                    tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return dict(arch=arch, kind=kind, model=model, inputs=inputs, g=g, stacked=stacked, sites=sites)


def fused_by_hand(case: dict, fusion: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The eager model with AdapterFusion at the two blocks; also returns the softmax weights."""
    model, g, kind = case["model"], case["g"], case["kind"]
    options = FUSIONS[fusion]
    modules = dict(model.named_modules())
    weights: dict[str, torch.Tensor] = {}
    handles = []
    for sublayer in ("attn", "ffn"):
        proj, source, norm = BLOCKS[case["arch"]][sublayer]
        captured: dict[str, torch.Tensor] = {}
        adapters = [{k: v.detach() for k, v in g.store.tensors(n)[proj].items()} for n in NAMES]
        layer = {k: v.detach() for k, v in g.store.tensors(fusion)[proj].items()}

        def grab(_m: nn.Module, args: tuple, captured: dict = captured) -> None:
            captured["x"] = args[0]

        def patch(_m: nn.Module, _args: tuple, f: torch.Tensor, captured: dict = captured, proj: str = proj,
                  norm: str | None = norm, adapters: list = adapters, layer: dict = layer) -> torch.Tensor:
            x = captured["x"]
            u = {"pfeiffer": modules[norm](f + x) if norm else f, "houlsby": f, "parallel": x}[kind]
            ups = torch.stack([SCALES[kind] * F.linear(ACTS[kind](F.linear(u, p["down_weight"], p["down_bias"])),
                                                       p["up_weight"], p["up_bias"]) for p in adapters], dim=-2)
            query = F.linear(u, layer["query_weight"], layer["query_bias"])              # (B, N, H)
            keys = ups @ layer["key_weight"].T                                            # (B, N, 3, H)
            probs = torch.softmax((keys @ query.unsqueeze(-1)).squeeze(-1) / options["temperature"], dim=-1)
            weights[proj] = probs
            r = x if kind == "parallel" else f
            values = ups + r.unsqueeze(-2) if options["residual_before"] else ups
            if options["value"]:
                values = values @ layer["value_weight"].T
            context = (probs.unsqueeze(-1) * values).sum(-2)                              # (B, N, H)
            if not options["residual_before"]:
                return f + context                 # the model adds x (and applies its LN)
            return context if kind != "parallel" else f + context - x

        handles += [modules[source].register_forward_pre_hook(grab), modules[proj].register_forward_hook(patch)]
    try:
        with torch.no_grad():
            return main_output(model(**case["inputs"])), weights
    finally:
        for handle in handles:
            handle.remove()


# -- the formula, activation semantics, weights ------------------------------------------------------------
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_fusion_formula_by_hand(case: dict, fusion: str) -> None:
    got = run(case["g"], case["inputs"], fusion)
    want, _ = fused_by_hand(case, fusion)
    assert (want - run(case["g"], case["inputs"], ())).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fusion_replaces_the_fused_adapters(case: dict) -> None:
    g, inputs = case["g"], case["inputs"]
    alone = run(g, inputs, "F")
    assert (alone - case["stacked"]).abs().max() > 1e-3
    # active fusion: the adapters' own contributions are replaced, active or not
    assert torch.equal(run(g, inputs, ("a", "b", "c", "F")), alone)
    assert torch.equal(run(g, inputs, ("F", "b")), alone)
    # inactive fusion: the adapters stack exactly as before the fusion was added
    assert torch.equal(run(g, inputs, NAMES), case["stacked"])
    assert torch.equal(run(g, inputs, ("a", "b", "c", "G", "F")), run(g, inputs, ("G", "F")))


def test_fusion_weights_sum_to_one(case: dict) -> None:
    g, inputs = case["g"], case["inputs"]
    g.set_active("F")
    weights = fusion_weights(g, "F", **inputs)
    assert list(weights) == g.adapters["F"].sites
    for site, probs in weights.items():
        assert probs.shape == (*inputs["input_ids"].shape, 3)  # (B, N, adapters)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-6, rtol=0)
        assert bool((probs >= 0).all() and (probs <= 1).all())
    _, by_hand = fused_by_hand(case, "F")
    for site in case["sites"]:
        torch.testing.assert_close(weights[site], by_hand[site], atol=1e-5, rtol=1e-5)
    g.set_active(NAMES)
    with pytest.raises(graftlib.GraftError, match=r"fusion 'F' is not active .* g\.set_active"):
        fusion_weights(g, "F", **inputs)
    with pytest.raises(graftlib.GraftError, match=r"no fusion named 'a'; fusions here: F, G"):
        fusion_weights(g, "a", **inputs)


# -- training ------------------------------------------------------------------------------------------
def _snapshot(g: graftlib.Grafted) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in g.named_parameters()}


def _steps(g: graftlib.Grafted, params: dict, inputs: dict, target: torch.Tensor, steps: int = 3) -> None:
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(g(**inputs), target) + g.regularization_loss()
        loss.backward()
        optimizer.step()


def test_two_stage_training() -> None:
    torch.manual_seed(0)
    model, inputs = models.build("hand_preln")
    g = graftlib.apply(model, " + ".join(f"adapter(ffn, attn, m=4, name={n})" for n in NAMES),
                       example_inputs=models.example_inputs("hand_preln")).train()
    target = torch.randn(2, 6, 32)
    before = _snapshot(g)
    params = g.train_only("adapters:a,b,c")                   # stage 1: adapters, base frozen
    assert set(params) == {n for n in before if n.split(".")[2] in NAMES}
    _steps(g, params, inputs, target)
    after = _snapshot(g)
    for name, value in after.items():
        assert torch.equal(value, before[name]) == (name not in params), name
    g.add("fusion(a, b, c)")
    before = _snapshot(g)
    params = g.train_only("fusion")                           # stage 2: only the fusion layers
    assert params and all(n.startswith("graph_module.graft.fusion.") for n in params)
    assert {n.rsplit(".", 1)[1] for n in params} == {"query_weight", "query_bias", "key_weight", "value_weight"}
    _steps(g, params, inputs, target)
    after = _snapshot(g)
    changed = {n for n, v in after.items() if n not in before or not torch.equal(v, before[n])}
    assert changed == set(params)
    g.eval()
    for probs in fusion_weights(g, "fusion", **inputs).values():
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 6), atol=1e-6, rtol=0)


def test_regularization_loss_is_adapterhub_value_penalty() -> None:
    model, _ = models.build("hand_preln")
    g = graftlib.apply(model, "adapter(ffn, name=a) + adapter(ffn, name=b) + fusion(a, b)",
                       example_inputs=models.example_inputs("hand_preln"))
    assert g.regularization_loss().item() == 0.0
    with randomized(g, "fusion", seed=4, std=0.1):
        values = [p["value_weight"] for p in g.store.tensors("fusion").values()]
        want = sum(0.01 * (torch.eye(32) - v).pow(2).sum() for v in values)
        torch.testing.assert_close(g.regularization_loss(), want)


def _task(which: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 3-way labels; the two tasks use disjoint token ranges and different rules."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (3, 50) if which == 1 else (50, 100)
    ids = torch.randint(lo, hi, (n, 8), generator=gen)
    return ids, (ids % 3 if which == 1 else (ids // 2 + 1) % 3)


def test_two_tasks_end_to_end() -> None:
    """Adapter A learns task 1, B task 2; their fusion, trained on both, is at least as good on each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, _ = models.build("hand")                       # post-LN, per-token 3-class head (frozen)
        g = graftlib.apply(model, "adapter(ffn, attn, m=2, name=A) + adapter(ffn, attn, m=2, name=B)",
                           example_inputs={"input_ids": torch.randint(3, 100, (2, 7))})

        def loss(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(g(input_ids=ids).reshape(-1, 3), labels.reshape(-1))

        def train(active: str, selector: str, batch, steps: int, lr: float, decay: bool = False) -> None:
            torch.manual_seed(1)
            g.set_active(active)
            optimizer = torch.optim.Adam(g.train_only(selector).values(), lr=lr)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps if decay else 1.0)
            g.train()
            for step in range(steps):
                optimizer.zero_grad()
                (loss(*batch(step)) + g.regularization_loss()).backward()
                optimizer.step()
                schedule.step()
            g.eval()

        def evaluate(active: str, which: int) -> float:
            g.set_active(active)
            with torch.no_grad():
                return loss(*_task(which, 64, 1000 + which)).item()

        def mixed(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            (ids1, y1), (ids2, y2) = _task(1, 16, 20_000 + step), _task(2, 16, 30_000 + step)
            return torch.cat([ids1, ids2]), torch.cat([y1, y2])

        train("A", "adapters:A", lambda s: _task(1, 32, s), 60, 1e-2)
        train("B", "adapters:B", lambda s: _task(2, 32, 10_000 + s), 60, 1e-2)
        single = {1: evaluate("A", 1), 2: evaluate("B", 2)}
        other = {1: evaluate("B", 1), 2: evaluate("A", 2)}
        frozen = {k: v.detach().clone() for k, v in g.named_parameters()}
        g.add("fusion(A, B, name=F)")
        train("F", "fusion", mixed, 300, 5e-3, decay=True)   # linear decay: no late spikes
        fused = {1: evaluate("F", 1), 2: evaluate("F", 2)}
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(v, frozen[k]) for k, v in g.named_parameters() if k in frozen)
    assert single[1] < other[1] and single[2] < other[2]       # each adapter is a specialist
    assert fused[1] <= single[1] and fused[2] <= single[2], (fused, single)
    g.set_active("F")
    for which, favourite in ((1, 0), (2, 1)):                  # the fusion leans on the right adapter
        weights = fusion_weights(g, "F", input_ids=_task(which, 16, 77)[0])
        mean = torch.stack([w.mean((0, 1)) for w in weights.values()]).mean(0)
        assert mean[favourite] > 0.5, (which, mean)


# -- bad input -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preln() -> tuple[nn.Module, dict, graftlib.Grafted]:
    model, inputs = models.build("hand_preln")
    g = graftlib.apply(model, "adapter(ffn, attn, m=4, name=a) + adapter(ffn, attn, m=4, name=b) + "
                              "adapter(ffn, attn, m=4, name=c) + fusion(a, b, c)",
                       example_inputs=models.example_inputs("hand_preln")).eval()
    return model, inputs, g


@pytest.mark.parametrize("spec, message", [
    ("adapter(ffn, name=a) + fusion(a, zzz)", r"no adapter named 'zzz'; adapters here: a \(adapter\)"),
    ("adapter(ffn, name=a) + fusion(a)", r"needs at least two adapters to fuse, got 1 \(a\)"),
    ("adapter(ffn, name=a) + fusion(a, a)", r"adapter 'a' is listed twice"),
    ("adapter(ffn, name=a) + adapter(ffn, attn, name=b) + fusion(a, b)",
     r"'a' \(2 sites\) and 'b' \(4 sites\) differ: only 'a' at \[\], only 'b' at \['blocks\.0\.o_proj', "
     r"'blocks\.1\.o_proj'\]"),
    ("adapter(ffn, name=a) + adapter(ffn, kind=houlsby, name=b) + fusion(a, b)",
     r"adapters of one kind .*: a is pfeiffer, b is houlsby"),
    ("adapter(ffn, name=a) + lora(q, name=l) + fusion(a, l)", r"fuses bottleneck adapters; 'l' is a lora adapter"),
    ('adapter(ffn, name=a) + fusion(a, "b*")', r"fusion takes adapter names, not patterns"),
])
def test_bad_fusions(preln: tuple, spec: str, message: str) -> None:
    _, _, g = preln
    with pytest.raises(graftlib.GraftSpecError, match=message):
        graftlib.select(g, spec)


def test_unknown_name_lists_the_graphs_adapters(preln: tuple) -> None:
    _, _, g = preln
    with pytest.raises(graftlib.GraftSpecError,
                       match=r"no adapter named 'd'; adapters here: a \(adapter\), b \(adapter\), c \(adapter\), "
                             r"fusion \(fusion\)"):
        g.add("fusion(a, d, name=f2)")
    assert list(g.adapters) == ["a", "b", "c", "fusion"]


# -- save / load / from= / ONNX --------------------------------------------------------------------------
def test_save_load_fusion(preln: tuple, tmp_path: Path) -> None:
    model, inputs, g = preln
    with randomized(g, "a", seed=1), randomized(g, "b", seed=2), randomized(g, "c", seed=3), \
            randomized(g, "fusion", seed=4, std=0.2):
        want = run(g, inputs, ("a", "b", "c", "fusion"))
        weights = fusion_weights(g, "fusion", **inputs)
        g.save(tmp_path / "fused")
        loaded = graftlib.load(model, tmp_path / "fused", example_inputs=models.example_inputs("hand_preln")).eval()
        assert [r.method for r in loaded.records] == ["adapter"] * 3 + ["fusion"]
        with torch.no_grad():
            assert torch.equal(main_output(loaded(**inputs)), want)
        for site, probs in fusion_weights(loaded, "fusion", **inputs).items():
            assert torch.equal(probs, weights[site])
        # from= : adapters started from the saved directory, fused in the same spec
        saved = str(tmp_path / "fused")
        fresh = graftlib.apply(model, f'adapter(from="{saved}", name=a) + adapter(from="{saved}", name=b) + '
                                      "fusion(a, b, name=ab)", example_inputs=models.example_inputs("hand_preln"))
        fresh.eval()
        assert torch.equal(run(fresh, inputs, "a"), run(g, inputs, "a"))
        assert torch.equal(run(fresh, inputs, "b"), run(g, inputs, "b"))
        assert (run(fresh, inputs, "ab") - run(fresh, inputs, ())).abs().max() > 1e-3


def test_onnx_fusion_matches_onnxruntime(preln: tuple, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    _, inputs, g = preln
    with randomized(g, "a", seed=1), randomized(g, "b", seed=2), randomized(g, "c", seed=3), \
            randomized(g, "fusion", seed=4, std=0.2):
        want = run(g, inputs, "fusion")
        program = torch.onnx.export(g.runtime_module(), (), kwargs=dict(inputs), dynamo=True, optimize=False)
        path = tmp_path / "fusion.onnx"
        program.save(str(path))
        base = run(g, inputs, ())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input_ids": inputs["input_ids"].numpy()})[0])
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_deleting_a_fused_adapter_is_refused():
    model, _ = models.build("bert")
    g = graftlib.apply(model, "adapter(ffn,m=4,name=a) + adapter(ffn,m=4,name=b) + fusion(a,b,name=f)")
    with pytest.raises(graftlib.GraftError, match="adapter 'a' is used by 'f': delete that first"):
        g.delete_adapter("a")
    g.delete_adapter("f")
    g.delete_adapter("a")
    assert list(g.adapters) == ["b"]
