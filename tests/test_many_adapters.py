"""Many adapters on one grafted module: choose (set_active), mix per row (adapter_names), combine, delete.

References: the eager model with hand-computed weight deltas ``s * B @ A`` added to its weights (for
several active adapters and for combine), each row run alone with its adapter (for mixed batches), and
PEFT's own output for a PEFT-imported adapter in a mixed batch.
"""
from __future__ import annotations

import copy
import math
import tempfile

import pytest
import torch

import graftlib
from graftlib.select import SiteIndex
from graftlib.sites import weight_value
from models import build, example_inputs, inputs_for

TOL = 1e-5
SPECS = {
    "bert": "lora(q,v,r=4,name=a) + lora(q,k,embed,r=2,alpha=8,name=b) + lora(o,up,r=3,rslora=true,name=c)",
    "gpt2": "lora(q,v,r=4,name=a) + lora(c_attn,c_fc,embed,r=8,alpha=4,name=b) + lora(c_proj,r=2,name=c)",
    "convnet": "lora(conv,head,r=2,name=a) + lora(stem,grouped,r=3,name=b) + lora(dilated,r=1,name=c)",
    "hand_preln": "lora(q,v,r=4,name=a) + lora(q,k,embed,r=2,name=b) + lora(o,down,q,r=4,alpha=2,name=c)",
}
ARCHS = list(SPECS)
_cache: dict[str, dict] = {}


def _first(output):
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _case(arch: str) -> dict:
    if arch not in _cache:
        model, _ = build(arch)
        g = graftlib.apply(model, SPECS[arch], example_inputs(arch)).eval()
        torch.manual_seed(3)
        with torch.no_grad():
            for param in g.store.parameters():
                param.normal_(0, 0.3)
        _cache[arch] = dict(model=model, g=g, inputs=inputs_for(arch, batch=4, seq=5))
    return _cache[arch]


def _run(g, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return _first(g(**inputs, **kwargs))


def _per_row(g, inputs: dict, names: list[str]) -> torch.Tensor:
    """Each row alone, through its own adapter (or none)."""
    saved, rows = g.active_adapters, []
    try:
        for i, name in enumerate(names):
            row = {k: v[i:i + 1] for k, v in inputs.items()}
            if name == "__base__":
                with g.disable_adapters():
                    rows.append(_run(g, row))
            else:
                g.set_active(name)
                rows.append(_run(g, row))
    finally:
        g.set_active(saved)
    return torch.cat(rows)


# -- hand-computed deltas ------------------------------------------------------------------------
def _delta(site, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """s * B A in the stored weight's layout, written out per site kind."""
    if site.kind == "conv":
        groups = site.conv["groups"]
        r, out = a.shape[0] // groups, b.shape[0] // groups
        return scale * torch.cat([torch.einsum("or,rikl->oikl", b[j * out:(j + 1) * out, :, 0, 0],
                                               a[j * r:(j + 1) * r]) for j in range(groups)])
    product = scale * (b @ a)                                   # (out, in) or (dim, vocab)
    return product.T if site.kind in ("conv1d", "embedding") else product


def _scale(config: dict) -> float:
    alpha = config["r"] if config["alpha"] is None else config["alpha"]
    return alpha / math.sqrt(config["r"]) if config["rslora"] else alpha / config["r"]


def _hand_deltas(g, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Weight name -> sum_i w_i s_i B_i A_i over the adapters' sites."""
    index = SiteIndex.build(g.base_graph_module)
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        config = g.adapters[name].config
        for key, params in g.store.tensors(name).items():
            site = index.by_key(key)
            a = params.get("lora_A", params.get("lora_embedding_A")).detach()
            b = params.get("lora_B", params.get("lora_embedding_B")).detach()
            d = w * _delta(site, a, b, _scale(config))
            full = out.setdefault(site.weight, torch.zeros_like(weight_value(g.graph_module, site.weight)))
            if site.span is None:
                full += d
            elif site.kind == "conv1d":
                full[:, site.span[0]:site.span[1]] += d
            else:
                full[site.span[0]:site.span[1]] += d
    return out


def _eager_output(case: dict, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    model = copy.deepcopy(case["model"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta)
        return _first(model(**case["inputs"]))


# -- choosing adapters ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_set_active_one_several_or_none(arch):
    case = _case(arch)
    g = case["g"]
    saved = g.active_adapters
    try:
        for chosen in (["a"], ["b"], ["a", "b", "c"], []):
            g.set_active(chosen)
            want = _eager_output(case, _hand_deltas(g, {n: 1.0 for n in chosen}))
            torch.testing.assert_close(_run(g, case["inputs"]), want, atol=TOL, rtol=0)
        with pytest.raises(graftlib.GraftError, match="no adapter named 'nope'"):
            g.set_active(["a", "nope"])
        assert g.active_adapters == ()
    finally:
        g.set_active(saved)


# -- mixed batches -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("names", [["a", "__base__", "b", "c"], ["b", "b", "__base__", "a"]])
def test_mixed_batch_equals_each_row_alone(arch, names):
    case = _case(arch)
    g = case["g"]
    got = _run(g, case["inputs"], adapter_names=names)
    torch.testing.assert_close(got, _per_row(g, case["inputs"], names), atol=TOL, rtol=0)
    with g.disable_adapters():
        base = _run(g, case["inputs"])
    assert (got[0] - base[0]).abs().max() > 1e-3  # rows really go through their adapters


def test_mixed_batch_with_peft_and_combined_adapters():
    peft = pytest.importorskip("peft")
    case = _case("hand_preln")
    g = case["g"]
    model = copy.deepcopy(case["model"])
    options = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False,
                   rank_pattern={"blocks.1.q_proj": 2}, alpha_pattern={"v_proj": 3})
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**options))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft_model.eval()
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        graftlib.from_peft(g, directory, adapter_name="p")
    g.combine({"a": 0.5, "b": 0.5}, how="cat", name="ab")
    names = ["p", "ab", "__base__", "p"]
    got = _run(g, case["inputs"], adapter_names=names)
    torch.testing.assert_close(got, _per_row(g, case["inputs"], names), atol=TOL, rtol=0)
    with torch.no_grad():
        want = _first(peft_model(**case["inputs"]))
    torch.testing.assert_close(got[[0, 3]], want[[0, 3]], atol=TOL, rtol=0)
    g.delete_adapter("p")
    g.delete_adapter("ab")


def test_mixed_training_mode_matches_rows_and_reaches_every_adapter():
    case = _case("hand_preln")  # no dropout anywhere: training mode is deterministic
    g = case["g"]
    names = ["a", "c", "__base__", "a"]
    g.train()
    try:
        g.zero_grad()
        mixed = _first(g(**case["inputs"], adapter_names=names))
        mixed.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in g.store.named_parameters() if p.grad is not None}
        g.zero_grad()
        saved = g.active_adapters
        rows = []
        for i, name in enumerate(names):
            row = {k: v[i:i + 1] for k, v in case["inputs"].items()}
            if name == "__base__":
                with g.disable_adapters():
                    rows.append(_first(g(**row)))
            else:
                g.set_active(name)
                rows.append(_first(g(**row)))
        g.set_active(saved)
        torch.cat(rows).pow(2).sum().backward()
        want = {n: p.grad for n, p in g.store.named_parameters() if p.grad is not None}
    finally:
        g.zero_grad()
        g.eval()
    torch.testing.assert_close(mixed.detach(), torch.cat(rows).detach(), atol=TOL, rtol=0)
    assert set(grads) == set(want) and any(n.startswith("c.") for n in grads)
    assert not any(n.startswith("b.") for n in grads)
    for name in want:
        torch.testing.assert_close(grads[name], want[name], atol=1e-5, rtol=1e-4)


def test_mixed_batch_sees_updated_factors():
    case = _case("convnet")
    g = case["g"]
    names = ["b", "a", "__base__", "b"]
    before = _run(g, case["inputs"], adapter_names=names)
    param = g.store["b"]["stem"].lora_B
    with torch.no_grad():
        param.add_(0.5)
    try:
        after = _run(g, case["inputs"], adapter_names=names)
        torch.testing.assert_close(after, _per_row(g, case["inputs"], names), atol=TOL, rtol=0)
        assert (after[0] - before[0]).abs().max() > 1e-3
    finally:
        with torch.no_grad():
            param.sub_(0.5)


def test_mixed_batch_errors():
    case = _case("hand_preln")
    g = case["g"]
    with pytest.raises(graftlib.GraftError, match="adapter_names has 3 names but the batch has 4 rows"):
        g(**case["inputs"], adapter_names=["a", "b", "c"])
    with pytest.raises(graftlib.GraftError, match="no adapter named 'z'"):
        g(**case["inputs"], adapter_names=["a", "z", "a", "a"])
    g.add('replace("norm", name=r)')
    try:
        with pytest.raises(graftlib.GraftError, match="'r' is a replace adapter; mixed batches support LoRA"):
            g(**case["inputs"], adapter_names=["a", "r", "a", "a"])
    finally:
        g.delete_adapter("r")


# -- combine -------------------------------------------------------------------------------------
def _combined_delta(g, name: str) -> dict[str, torch.Tensor]:
    return _hand_deltas(g, {name: 1.0})


@pytest.mark.parametrize("arch", ARCHS)
def test_combine_cat_is_the_weighted_sum_of_deltas(arch):
    case = _case(arch)
    g = case["g"]
    weights = {"a": 0.7, "b": -0.3, "c": 1.5}
    active = g.active_adapters
    name = g.combine(weights, how="cat", name="cat_all")
    try:
        assert g.active_adapters == active  # added inactive
        assert g.adapters[name].config["r"] == sum(g.adapters[n].config["r"] for n in weights)
        want, got = _hand_deltas(g, weights), _combined_delta(g, name)
        assert sorted(got) == sorted(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=TOL, rtol=0)
        g.set_active(name)
        torch.testing.assert_close(_run(g, case["inputs"]), _eager_output(case, want), atol=TOL, rtol=0)
    finally:
        g.set_active(active)
        g.delete_adapter(name)


def test_combine_svd_is_the_truncated_weighted_sum():
    case = _case("bert")
    g = case["g"]
    weights = {"a": 0.7, "b": 0.3}
    full = g.combine(weights, how="svd", rank=64, name="svd_full")
    low = g.combine(weights, how="svd", rank=1, name="svd_1")
    try:
        want = _hand_deltas(g, weights)
        exact, truncated = _combined_delta(g, full), _combined_delta(g, low)
        for key, delta in want.items():
            torch.testing.assert_close(exact[key], delta, atol=TOL, rtol=0)
            u, s, vh = torch.linalg.svd(delta.double())
            best = (s[0] * torch.outer(u[:, 0], vh[0])).float()       # best rank-1 approximation
            torch.testing.assert_close(truncated[key], best, atol=TOL, rtol=0)
    finally:
        g.delete_adapter(full)
        g.delete_adapter(low)


def test_combine_linear_is_the_mixed_factor_formula():
    case = _case("hand_preln")
    g = case["g"]
    weights = {"a": 0.5, "c": -2.0}  # both rank 4; they share the q projections
    name = g.combine(weights, how="linear", name="lin")
    try:
        index = SiteIndex.build(g.base_graph_module)
        for key, params in g.store.tensors(name).items():
            a_sum, b_sum = 0, 0
            for adapter, w in weights.items():
                source = g.store.tensors(adapter).get(key)
                if source is None:
                    continue
                c = w * _scale(g.adapters[adapter].config)
                a_sum = a_sum + math.copysign(math.sqrt(abs(c)), c) * source["lora_A"].detach()
                b_sum = b_sum + math.sqrt(abs(c)) * source["lora_B"].detach()
            torch.testing.assert_close(params["lora_A"].detach(), a_sum, atol=1e-6, rtol=0)
            torch.testing.assert_close(params["lora_B"].detach(), b_sum, atol=1e-6, rtol=0)
        shared = "blocks.0.q_proj"  # cross terms: not the weighted sum where both adapters sit
        site = index.by_key(shared)
        weight = site.weight
        assert (_combined_delta(g, name)[weight] - _hand_deltas(g, weights)[weight]).abs().max() > 1e-3
        with pytest.raises(graftlib.GraftError, match="how='linear'\\) needs adapters of one rank"):
            g.combine({"a": 1.0, "b": 1.0}, how="linear", name="bad")
    finally:
        g.delete_adapter(name)


@pytest.mark.parametrize("weights, options, expected", [
    ({"a": 1.0, "nope": 1.0}, {}, "no adapter named 'nope'"),
    ({"a": 1.0}, {"how": "mean"}, "how='mean' is not one of cat, linear, svd"),
    ({"a": 1.0}, {"name": "b"}, "adapter 'b' already exists"),
    ({"a": 1.0}, {"rank": 2}, "rank=... is for how='svd'"),
    ({}, {}, "combine needs adapters and weights"),
    ({"a": float("nan")}, {}, "must be a finite number"),
])
def test_combine_errors(weights, options, expected):
    g = _case("hand_preln")["g"]
    adapters = list(g.adapters)
    with pytest.raises(graftlib.GraftError, match=expected.replace("(", "\\(").replace(")", "\\)")):
        g.combine(weights, **options)
    assert list(g.adapters) == adapters


# -- saving, deleting ----------------------------------------------------------------------------
def test_save_and_load_keep_every_adapter(tmp_path):
    case = _case("gpt2")
    g = case["g"]
    g.save(tmp_path)
    loaded = graftlib.load(build("gpt2")[0], tmp_path).eval()
    assert list(loaded.adapters) == list(g.adapters) and loaded.active_adapters == g.active_adapters
    names = ["c", "a", "b", "__base__"]
    torch.testing.assert_close(_run(loaded, case["inputs"], adapter_names=names),
                               _run(g, case["inputs"], adapter_names=names), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_delete_adapter_removes_it_and_keeps_the_others(arch):
    case = _case(arch)
    g = case["g"]
    g.set_active(["a", "b"])
    before = _run(g, case["inputs"])
    g.delete_adapter("c")
    assert "c" not in g.adapters and "c" not in g.store
    assert not any(((n.meta.get("custom") or {}).get("graft") or {}).get("adapter") == "c" for n in g.graph.nodes)
    torch.testing.assert_close(_run(g, case["inputs"]), before, atol=0, rtol=0)
    torch.testing.assert_close(_run(g, case["inputs"]), _eager_output(case, _hand_deltas(g, {"a": 1, "b": 1})),
                               atol=TOL, rtol=0)
    with pytest.raises(graftlib.GraftError, match="no adapter named 'c'"):
        g.delete_adapter("c")


# -- merge beside replace (PEFT's modules_to_save on a LoRA'd module) ------------------------------
REPLACED = {"bert": "encoder.layer.0.attention.self.query", "gpt2": "h.0.attn.c_attn"}


@pytest.mark.parametrize("order", ["replace first", "lora first"])
@pytest.mark.parametrize("arch", sorted(REPLACED))
def test_merge_folds_lora_into_the_replacing_copy(arch, order):
    """The graph reads replace's own copy W' instead of W, so merge folds s·B@A into W': the merged
    module equals the unmerged one, and the source's W' and the user's W are untouched."""
    model, _ = build(arch)
    inputs = inputs_for(arch, 2, 5)
    replace, lora = f'replace("{REPLACED[arch]}", name=keep)', "lora(q,v,r=2,name=ad)"
    g = graftlib.apply(model, f"{replace} + {lora}" if order == "replace first" else f"{lora} + {replace}").eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for param in g.store.parameters():
            param.add_(0.1 * torch.randn_like(param))
    copy_before = next(g.store["keep"].parameters()).detach().clone()
    weight_before = weight_value(model, f"{REPLACED[arch]}.weight").detach().clone()
    with torch.no_grad():
        want = _first(g(**inputs))
        merged = g.merge()
        got = _first(merged(**inputs))
    assert (got - want).abs().max() <= TOL
    assert merged.adapters.keys() == {"keep"}  # LoRA folded, replace kept as nodes
    assert torch.equal(next(g.store["keep"].parameters()), copy_before)
    assert torch.equal(weight_value(model, f"{REPLACED[arch]}.weight"), weight_before)
    g.set_active(["ad"])
    with pytest.raises(graftlib.GraftError, match="'keep' replaces that weight but is inactive"):
        g.merge()
