"""AdaLoRA: the SVD-form branch against a hand formula, importance and budget schedule by hand,
rank allocation, training, merge, save/load after shrinking, ONNX, PEFT interop both ways, errors.

References are independent of the pass: forward hooks on the eager model adding
``B (A * E) x * alpha / (init_r + 1e-5)``, EMAs and schedule recomputed in the test, onnxruntime, and
PEFT's own AdaLoRA model.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import graftlib
from graftlib.editor import graft_tag
from graftlib.io import install_tensors
from graftlib.passes import adalora as ad
from graftlib.runtime import op_histogram, specialise
from graftlib.select import SiteIndex
from models import build, example_inputs, run_with_site_deltas

# -- the branch on every layer kind ----------------------------------------------------------------
CASES = [
    ("bert", "adalora(q,v,init_r=4)", 4),
    ("gpt2", "adalora(q,v,c_fc,init_r=4,alpha=6)", 6),     # slices of the fused c_attn + whole Conv1D
    ("gpt2", "adalora(c_attn,init_r=3)", 2),               # whole fused projection: slices not added
    ("convnet", "adalora(conv,init_r=3)", 3),              # stride, padding, dilation, groups
    ("hand", "adalora(embed,o,init_r=4,alpha=8)", 3),
    ("bert", "adalora(q,v,init_r=4,ranks=[2,0,4,1])", 4),  # pruned shapes; rank 0 has no branch
]
IDS = [f"{arch}:{spec}" for arch, spec, _ in CASES]
_models: dict[str, tuple] = {}


def _model(arch: str):
    if arch not in _models:
        _models[arch] = build(arch)
    return _models[arch]


def _first(output):
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _randomise(g: graftlib.Grafted, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.store.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _hook_reference(model: nn.Module, g: graftlib.Grafted, inputs: dict) -> torch.Tensor:
    """The eager model with hooks adding B (A * E) x * alpha / (init_r + 1e-5) per site."""
    index = SiteIndex.build(g.base_graph_module)
    deltas = []
    for record in g.records:
        init_r = record.config["init_r"]
        alpha = record.config["alpha"] or float(init_r)
        scale = alpha / (init_r + 1e-5)
        for key, p in g.store.tensors(record.adapter).items():
            site = index.by_key(key)

            def delta(mod, x, site=site, ae=p["lora_A"] * p["lora_E"], b=p["lora_B"], scale=scale):
                if site.kind == "embedding":
                    return scale * F.embedding(x, ae.T) @ b.T
                if site.kind == "conv":
                    c = site.conv
                    kernel = (b @ ae).reshape(mod.weight.shape)
                    return scale * F.conv2d(x, kernel, None, c["stride"], c["padding"], c["dilation"], c["groups"])
                return scale * x @ ae.T @ b.T

            deltas.append((site, delta))
    return _first(run_with_site_deltas(model, deltas, inputs))


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_branch_formula_and_merge(i):
    arch, spec, n_sites = CASES[i]
    model, inputs = _model(arch)
    g = graftlib.apply(model, spec, example_inputs(arch)).eval()
    assert len(g.sites()) == n_sites
    with torch.no_grad():
        base = _first(model(**inputs))
        assert torch.equal(_first(g(**inputs)), base), "E = 0 at init: the branch must be exactly zero"
    _randomise(g)
    with torch.no_grad():
        grafted = _first(g(**inputs))
    assert not torch.allclose(grafted, base, atol=1e-4)
    torch.testing.assert_close(grafted, _hook_reference(model, g, inputs), atol=1e-5, rtol=1e-5)
    merged = g.merge().eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(merged(**inputs)), grafted, atol=1e-5, rtol=1e-5)
    assert merged.op_histogram() == op_histogram(specialise(g.base_graph, (), False))
    record = g.records[0]
    ranks = record.config["ranks"]
    shapes = {k: t["lora_E"].shape[0] for k, t in g.store.tensors(record.adapter).items()}
    expected = dict(zip(sorted(shapes), ranks)) if ranks else {k: record.config["init_r"] for k in shapes}
    assert shapes == expected
    with_branch = {graft_tag(n)["site"] for n in g.graph.nodes if graft_tag(n)}
    assert with_branch == {k for k, r in expected.items() if r > 0}


# -- importance, schedule and masking, by hand ---------------------------------------------------------
class TwoSites(nn.Module):
    """y = head(tanh(a(x)) + mix * tanh(b(x))): with mix = 0 site b cannot matter."""

    def __init__(self, mix: float = 1.0):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.mix = mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x)) + self.mix * torch.tanh(self.b(x)))


def _hand_budget(step: int) -> int:
    # init 8 (= 4 * 2 sites), target 2 (= 1 * 2), tinit 1, tfinal 2, total 9: cubic over steps 2..6
    return int((8 - 2) * (1 - (step - 1) / (9 - 2 - 1)) ** 3 + 2)


def test_importance_schedule_and_masking_by_hand():
    torch.manual_seed(0)
    model, x, y = TwoSites(), torch.randn(32, 8), torch.randn(32, 1)
    g = graftlib.apply(model, "adalora(a,b,init_r=4,target_r=1,tinit=1,tfinal=2,total_steps=9,delta_t=2,"
                              "beta1=0.8,beta2=0.7,alpha=4)", {"x": x}).train()
    _randomise(g, seed=1)  # E != 0 so every entry has a gradient from the first step
    opt = torch.optim.SGD(g.trainable_parameters().values(), lr=0.05)

    def tensors() -> dict:
        return g.store.tensors("default")

    sites = ["a", "b"]
    s_bar: dict = {}
    u_bar: dict = {}
    expected_budgets = {1: 8, 2: 5, 3: 3, 4: 2, 5: 2, 6: 2}
    for step in range(1, 8):
        loss = ((g(x=x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        if step < 7:  # importance is not updated at the final allocation (PEFT)
            for site in sites:
                for name in ("lora_A", "lora_E", "lora_B"):
                    p = tensors()[site][name]
                    ipt = (p.detach() * p.grad).abs()
                    s = 0.8 * s_bar.get((site, name), 0) + 0.2 * ipt
                    u = 0.7 * u_bar.get((site, name), 0) + 0.3 * (ipt - s).abs()
                    s_bar[(site, name)], u_bar[(site, name)] = s, u
            hand = {site: (s_bar[(site, "lora_E")] * u_bar[(site, "lora_E")])[:, 0]
                    + (s_bar[(site, "lora_A")] * u_bar[(site, "lora_A")]).mean(dim=1)
                    + (s_bar[(site, "lora_B")] * u_bar[(site, "lora_B")]).mean(dim=0) for site in sites}
        before = {site: {n: t.detach().clone() for n, t in tensors()[site].items()} for site in sites}
        g.update_and_allocate(step)
        state = ad.allocator_state(g, "default")
        flat = torch.cat([hand[s] for s in sites])
        if step < 7:
            assert state.budget == expected_budgets[step] == (8 if step <= 1 else _hand_budget(step))
            scores = ad.triplet_scores(state, sites)
            for site in sites:
                torch.testing.assert_close(scores[site], hand[site], rtol=1e-6, atol=0)
            masked_now = step in (2, 4, 6)  # delta_t = 2, after tinit
            zero = torch.cat([tensors()[s]["lora_E"][:, 0] == 0 for s in sites])
            if masked_now:
                lowest = set(torch.argsort(flat)[: 8 - expected_budgets[step]].tolist())
                assert set(zero.nonzero().view(-1).tolist()) == lowest
            else:
                assert not zero.any()
        else:  # step 7 = total_steps - tfinal: final allocation at the target budget, then shrink
            keep = torch.ones(8, dtype=torch.bool)
            keep[torch.argsort(flat)[:6]] = False
            kept = dict(zip(sites, keep.split([4, 4])))
            table = g.rank_allocation()
            assert table.as_dict() == {s: int(kept[s].sum()) for s in sites}
            assert table.total == 2 == table.target
            for site in sites:
                now = tensors()[site]
                torch.testing.assert_close(now["lora_A"], before[site]["lora_A"][kept[site]])
                torch.testing.assert_close(now["lora_B"], before[site]["lora_B"][:, kept[site]])
                torch.testing.assert_close(now["lora_E"], before[site]["lora_E"][kept[site]])
            assert g.records[0].extras["rank_pattern"] == {s: kept[s].tolist() for s in sites}
            assert g.records[0].spec.endswith(f"ranks=[{int(kept['a'].sum())},{int(kept['b'].sum())}])")
        opt.zero_grad()
    # the optimizer still holds the pre-shrink tensors: the next call says so
    loss = ((g(x=x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    with pytest.warns(UserWarning, match="rebuild the optimizer"):
        g.update_and_allocate(8)


def test_regularization_loss_by_hand():
    torch.manual_seed(0)
    g = graftlib.apply(TwoSites(), "adalora(a,b,init_r=3,orth_reg=0.3)", {"x": torch.randn(2, 8)})
    _randomise(g)
    norms = []
    for site in ("a", "b"):
        p = g.store.tensors("default")[site]
        a, b = p["lora_A"].detach(), p["lora_B"].detach()
        norms += [torch.sqrt(((a @ a.T - torch.eye(3)) ** 2).sum()), torch.sqrt(((b.T @ b - torch.eye(3)) ** 2).sum())]
    expected = 0.3 * sum(norms) / 4
    reg = g.regularization_loss()
    torch.testing.assert_close(reg, expected)
    reg.backward()
    assert g.store.tensors("default")["a"]["lora_A"].grad is not None


# -- training: allocation follows the gradients, convergence, merge, save/load, ONNX ----------------------
@pytest.fixture(scope="module")
def trained():
    return _train()


def _train():
    """Site a matters, site b is multiplied by 0: after the schedule a keeps the whole budget.

    orth_reg=0: the penalty alone would give b's A and B gradients (and so importance).
    """
    torch.manual_seed(0)
    model = TwoSites(mix=0.0).eval()
    x = torch.randn(128, 8)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher.a.weight += 0.8 * torch.randn(8, 2) @ torch.randn(2, 8)
        y = teacher(x)
    g = graftlib.apply(model, "adalora(a,b,init_r=4,target_r=2,tinit=20,tfinal=60,total_steps=200,alpha=8,"
                       "orth_reg=0.0)",
                       {"x": x}).train()
    opt = torch.optim.Adam(g.trainable_parameters().values(), lr=5e-2)
    losses = []
    for step in range(1, 201):
        task = F.mse_loss(g(x=x), y)
        task.backward()
        opt.step()
        g.update_and_allocate(step)
        opt.zero_grad()
        if step == 140:  # the final allocation shrank the branches: new tensors, new optimizer
            opt = torch.optim.Adam(g.trainable_parameters().values(), lr=5e-2)
        losses.append(task.item())
    return model, x, g.eval(), losses


def test_allocation_follows_importance(trained):
    model, x, g, _ = trained
    table = g.rank_allocation()
    assert table.as_dict() == {"a": 4, "b": 0}, str(table)
    assert table.total == table.target == 4
    assert "a" in str(table) and "4 / 4" in str(table) and "(target 4)" in str(table)
    assert g.store.tensors("default")["b"]["lora_A"].shape == (0, 8)
    assert {graft_tag(n)["site"] for n in g.graph.nodes if graft_tag(n)} == {"a"}, "rank 0: branch removed"


def test_training_converges_and_merges(trained):
    model, x, g, losses = trained
    assert losses[-1] < losses[0] / 15, f"task loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    with torch.no_grad():
        out = g(x=x)
        merged = g.merge().eval()
        torch.testing.assert_close(merged(x=x), out, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x), out, atol=1e-3)


def test_save_load_after_shrinking(trained, tmp_path):
    model, x, g, _ = trained
    g.save(tmp_path)
    saved = json.loads((tmp_path / "graft.json").read_text())["adapters"][0]
    assert "ranks=[4,0]" in saved["spec"] and saved["extras"]["rank_pattern"]["b"] == [False] * 4
    loaded = graftlib.load(model, tmp_path, {"x": x}).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x=x), g(x=x), atol=0, rtol=0)
    assert loaded.rank_allocation().as_dict() == {"a": 4, "b": 0}
    assert loaded.op_histogram() == g.op_histogram()
    with pytest.raises(graftlib.GraftError, match="already has its final ranks"):
        loaded.update_and_allocate(5)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_onnx_export(trained, tmp_path, merge):
    ort = pytest.importorskip("onnxruntime")
    _, x, g, _ = trained
    module = (g.merge() if merge else g).eval()
    program = torch.onnx.export(module.runtime_module(), (), kwargs={"x": x}, dynamo=True, optimize=False)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(result), g(x=x), atol=1e-5, rtol=1e-5)


# -- PEFT interop ------------------------------------------------------------------------------------------
def _peft_trained_bert():
    from peft import AdaLoraConfig, get_peft_model

    model, inputs = _model("bert")
    config = AdaLoraConfig(init_r=4, target_r=2, target_modules=["query", "value"], total_step=10, tinit=1,
                           tfinal=3, lora_alpha=8)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # E != 0: PEFT's `<=` threshold masks every tied (all-zero) score otherwise
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    for step in range(1, 8):  # step 7 = total_step - tfinal: the final allocation
        _first(peft_model(**inputs)).pow(2).mean().backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return model, inputs, peft_model.eval()


@pytest.mark.filterwarnings("ignore:Adapter 'default'")  # PEFT flags its own zero-rank tensors
def test_peft_checkpoint_imports(tmp_path):
    model, inputs, peft_model = _peft_trained_bert()
    pattern = peft_model.peft_config["default"].rank_pattern
    assert 0 < sum(map(sum, pattern.values())) < 16, "PEFT must have pruned some triplets"
    peft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    spec, tensors = ad.peft_import(config, state, model)
    assert "ranks=[" in spec
    g = graftlib.apply(model, spec).eval()
    install_tensors(g, {f"default/{site}/{n}": t for site, ts in tensors.items() for n, t in ts.items()},
                    ["default"], source=str(tmp_path))
    with torch.no_grad():
        expected = _first(peft_model(**inputs))
        assert not torch.allclose(expected, _first(model(**inputs)), atol=1e-4)
        torch.testing.assert_close(_first(g(**inputs)), expected, atol=1e-5, rtol=1e-5)
    kept = {k.rsplit(".lora_E", 1)[0].replace(".default", ""): sum(v) for k, v in pattern.items()}
    assert g.rank_allocation().as_dict() == kept


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")  # PEFT warns on its own files too
def test_graftlib_adapter_exports_to_peft(tmp_path):
    from peft import PeftModel

    model, inputs = _model("bert")
    g = graftlib.apply(model, "adalora(q,v,init_r=4,target_r=2,tinit=1,tfinal=2,total_steps=6,alpha=8)").train()
    _randomise(g, seed=6)
    opt = torch.optim.SGD(g.trainable_parameters().values(), lr=0.05)
    for step in range(1, 5):  # step 4 = total_steps - tfinal: shrink
        _first(g(**inputs)).pow(2).mean().backward()
        opt.step()
        g.update_and_allocate(step)
        opt.zero_grad()
    g.eval()
    assert g.rank_allocation().total == 8
    config, state = ad.peft_export(g, g.records[0])
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        expected = _first(g(**inputs))
        assert not torch.allclose(expected, _first(model(**inputs)), atol=1e-4)
        torch.testing.assert_close(_first(peft_model(**inputs)), expected, atol=1e-5, rtol=1e-5)
    spec, tensors = ad.peft_import(config, state, model)  # and back
    assert f"ranks=[{','.join(str(r) for r in g.records[0].config['ranks'])}]" in spec


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")
def test_conv1d_ranks_roundtrip_with_peft(tmp_path):
    """GPT-2 Conv1D sites with pruned ranks (one at 0) -> PEFT -> graftlib; slices are refused."""
    from peft import PeftModel

    model, inputs = _model("gpt2")
    g = graftlib.apply(model, "adalora(c_attn,c_fc,init_r=4,alpha=8,ranks=[3,0,2,4]) + "
                              "adalora(q,init_r=2,name=slices)").eval()
    _randomise(g, seed=7)
    g.set_active("default")
    config, state = ad.peft_export(g, g.records[0])
    assert config["rank_pattern"]["h.0.mlp.c_fc.lora_E"] == [False] * 4 and config["fan_in_fan_out"]
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    spec, tensors = ad.peft_import(config, load_file(str(tmp_path / "adapter_model.safetensors")), model)
    back = graftlib.apply(model, spec).eval()
    install_tensors(back, {f"default/{site}/{n}": t for site, ts in tensors.items() for n, t in ts.items()},
                    ["default"], source="peft")
    with torch.no_grad():
        expected = _first(g(**inputs))
        assert not torch.allclose(expected, _first(model(**inputs)), atol=1e-4)
        torch.testing.assert_close(_first(peft_model(**inputs)), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_first(back(**inputs)), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(graftlib.GraftError, match="slice of a fused projection.*g.save"):
        ad.peft_export(g, g.adapters["slices"])


# -- errors ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = TwoSites()
    x = torch.randn(4, 8)
    return model, x


def test_update_without_total_steps(small):
    model, x = small
    g = graftlib.apply(model, "adalora(a,b,init_r=2)", {"x": x})
    with pytest.raises(graftlib.GraftError, match=r"no total_steps.*adalora\(\.\.\., total_steps=N\)"):
        g.update_and_allocate(1)


def test_steps_out_of_order_and_missing_gradients(small):
    model, x = small
    g = graftlib.apply(model, "adalora(a,b,init_r=2,target_r=1,total_steps=10)", {"x": x}).train()
    with pytest.raises(graftlib.GraftError, match=r"no gradients: call g.update_and_allocate\(step\) after loss.backward"):
        g.update_and_allocate(1)
    g(x=x).sum().backward()
    g.update_and_allocate(3)
    with pytest.raises(graftlib.GraftError, match=r"update_and_allocate\(2\) came after update_and_allocate\(3\).*steps must increase"):
        g.update_and_allocate(2)
    with pytest.raises(graftlib.GraftError, match="steps must increase"):
        g.update_and_allocate(3)
    with pytest.raises(graftlib.GraftError, match="must be the global step"):
        g.update_and_allocate(-1)


@pytest.mark.parametrize("spec, message", [
    ("adalora(a,b,init_r=4,target_r=6)", "target_r=6 exceeds init_r=4"),
    ("adalora(a,b,tinit=5,tfinal=5,total_steps=10)", "leaves no budgeting phase"),
    ("adalora(a,b,init_r=4,ranks=[1,2,3])", "ranks has 3 entries but adalora selects 2 sites"),
    ("adalora(a,b,init_r=4,ranks=[1,5])", r"ranks \[5\] must be integers in \[0, init_r=4\]"),
    ("adalora(a,b,beta1=1.0)", r"beta1=1.0 must be in \(0, 1\)"),
])
def test_spec_errors(small, spec, message):
    model, x = small
    with pytest.raises(graftlib.GraftSpecError, match=message):
        graftlib.apply(model, spec, {"x": x})
