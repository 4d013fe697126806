"""AdapterFusion: attention over the outputs of bottleneck adapters that sit at the same sites.

At each residual block where the fused adapters ``a_1 .. a_N`` sit (see ``passes/adapter.py`` for
``f``, ``x``, ``LN`` and the kinds), with ``s`` = the residual state before the fused adapters (the
residual add ``f + x`` when they are the only adapters there):

    u     = LN(s) | f | x                            the adapters' shared input (their kind decides)
    up_i  = scale_i * Up_i(act_i(Down_i(u)))         each adapter's bottleneck output   (..., H)
    q     = Wq u + bq                                query from the block state         (..., H)
    k_i   = Wk up_i,   v_i = Wv up_i                 identity-initialised, no bias      (..., N, H)
    p     = softmax_i(q . k_i / temperature)         the fusion weights                 (..., N)
    s'    = s + sum_i p_i v_i                        residual_before=false (default)
    s'    = (s - r) + sum_i p_i Wv(up_i + r)         residual_before=true, r = f (x for parallel)

and the block continues from ``s'`` (its own LN reads it in post-LN blocks), so a single adapter's
``LN(f + up + x)`` becomes ``LN(f + sum_i p_i v_i + x)``, AdapterHub's ``BertFusion`` with the
default "dynamic" config (query from the adapters' input, value before the softmax; no score dropout,
fixed temperature). ``value=false`` uses ``v_i = up_i``. ``Wq`` is N(0, 0.02) with zero bias, so the
weights start near uniform. ``g.regularization_loss()`` includes AdapterHub's ``0.01 * ||I - Wv||^2``.

Joins and activation: the fusion recomputes each adapter's branch from ``u`` with the adapters' own
parameters (it reads their parameters, never their joins), and re-enters the graph with one join at
the end of the site's join chain:

    s'' = join(c, where(True, s', c))                c = the chain end (the adapters' own joins)

- fusion active: the block continues from ``s'``: the fusion *replaces* the individual adapters'
  contributions at its sites, whether or not they are active themselves (active ones are computed and
  discarded: ``g.set_active("<fusion name>")`` alone skips that work);
- fusion inactive: the join is removed and the individual adapters (those active) stack as before;
- deactivating a fused adapter does not change the fusion's output: it still reads its parameters.

Two-stage training (the seeds): ``g.train_only("adapters:a,b")`` trains the adapters with the base
frozen; ``g.train_only("fusion")`` then trains only the fusion layers. ``fusion_weights(g, name,
**inputs)`` returns the softmax weights per site for inspection.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from graftlib.editor import STORE, Editor, escape, graft_tag, is_join, join_chain_end
from graftlib.errors import GraftError
from graftlib.registry import Method, Option, get_method, positive, register
from graftlib.runtime import copy_graph
from graftlib.select import Selection, SiteIndex
from graftlib.sites import Site
from graftlib.spec import GraftCall, parse_spec

from .adapter import (Block, adapters_in_graph, bottleneck_input, bottleneck_spec, bottleneck_up,
                      first_user, locate_block)

__all__ = ["Fusion", "fusion_weights"]

aten = torch.ops.aten
_ADAPTER_PARAMS = ("down_weight", "down_bias", "up_weight", "up_bias")
_REGULARIZATION = 0.01


# -- which adapters, where ------------------------------------------------------------------------
def _pending_adapters(call: GraftCall, index: SiteIndex) -> dict[str, dict[str, Any]]:
    """Adapters defined earlier in the same spec (not yet in the graph): name -> sites / spec / method."""
    found: dict[str, dict[str, Any]] = {}
    for earlier in parse_spec(call.source):
        if earlier.column >= call.column:
            break
        method = get_method(earlier)
        if method.name != "adapter":
            found[str(earlier.options.get("name", "default"))] = {"method": method.name, "sites": [], "spec": None}
            continue
        config = method.configure(earlier, index)
        selection = method.select(earlier, index, config)
        found[config["name"]] = {"method": "adapter", "sites": [s.key for s in selection.sites],
                                 "spec": bottleneck_spec(config)}
    return found


def _describe(known: dict[str, dict[str, Any]]) -> str:
    if not known:
        return "none (add some with adapter(ffn, name=...))"
    return ", ".join(f"{name} ({entry['method']})" for name, entry in known.items())


def _check_sites(call: GraftCall, names: tuple[str, ...], known: dict[str, dict[str, Any]]) -> list[str]:
    first = names[0]
    reference = set(known[first]["sites"])
    for name in names[1:]:
        sites = set(known[name]["sites"])
        if sites != reference:
            only_first, only_other = sorted(reference - sites), sorted(sites - reference)
            raise call.error(
                f"fusion needs its adapters at the same sites, but {first!r} ({len(reference)} sites) and "
                f"{name!r} ({len(sites)} sites) differ: only {first!r} at {only_first[:3]}, only {name!r} at "
                f"{only_other[:3]}; graft them with the same targets")
    kinds = {name: known[name]["spec"]["kind"] for name in names}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{n} is {k}" for n, k in kinds.items())
        raise call.error(f"fusion needs adapters of one kind (they share their input): {listed}")
    return known[first]["sites"]


# -- the method ------------------------------------------------------------------------------------
@register
class Fusion(Method):
    """``fusion(a, b, c, temperature=1.0, value=true, residual_before=false, name=fusion)``."""

    name = "fusion"
    site_kinds = ("linear", "conv1d")
    mergeable = False
    needs_targets = True
    options = {
        "name": Option("fusion", (str,), help="adapter name of the fusion layers"),
        "temperature": Option(1.0, (float,), positive, help="softmax temperature"),
        "value": Option(True, (bool,), help="learn a value matrix (identity at init)"),
        "residual_before": Option(False, (bool,), help="add the residual to the values before the softmax"),
    }

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        names: list[str] = []
        for target in call.targets:
            if target.kind != "name":
                raise call.error(f"fusion takes adapter names, not patterns ({target.text!r})", target.column)
            if target.text in names:
                raise call.error(f"adapter {target.text!r} is listed twice", target.column)
            names.append(target.text)
        if len(names) < 2:
            raise call.error(f"fusion needs at least two adapters to fuse, got {len(names)} ({', '.join(names)}); "
                             "list them as fusion(a, b, ...)")
        config["adapters"] = tuple(names)

    def depends_on(self, spec: str) -> list[str]:
        return [target.text for target in parse_spec(spec)[0].targets]

    def select(self, call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> Selection:
        known = {**_pending_adapters(call, index), **adapters_in_graph(index.graph_module)}
        names = config["adapters"]
        for target, name in zip(call.targets, names):
            entry = known.get(name)
            if entry is None:
                raise call.error(f"fusion: no adapter named {name!r}; adapters here: {_describe(known)}",
                                 target.column)
            if entry["method"] != "adapter" or entry["spec"] is None:
                raise call.error(f"fusion fuses bottleneck adapters; {name!r} is a {entry['method']} adapter",
                                 target.column)
        keys = set(_check_sites(call, names, known))
        layers = config["layers"]
        sites = [s for s in index.sites if s.key in keys and (layers is None or s.layer in layers)]
        return Selection(call, sites, {name: known[name]["sites"] for name in names})

    # -- rewrite -----------------------------------------------------------------------------
    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        block = locate_block(editor.anchor)
        if block.perm is not None:
            raise GraftError(f"fusion at {site.key}: the residual add there is channels-first (ConvNeXt: the "
                             "branch runs permuted); fusing adapters at such a block is not supported yet")
        if block.sibling is not None and any(u.target == aten.add_.Tensor for u in block.f.users):
            raise GraftError(f"fusion at {site.key}: the sublayer output is summed in place with the parallel "
                             "sublayer's (Falcon's mlp_output += attn); fusing adapters there is not supported yet")
        names = config["adapters"]
        joins = _fused_joins(block, names, site)
        first = min(joins.values(), key=lambda pair: pair[0])[1]
        state = first.args[graft_tag(first)["base"]]        # s: the state the fused adapters read
        specs = [graft_tag(joins[n][1])["bottleneck"] for n in names]
        kind, hidden = specs[0]["kind"], site.out_features
        end = join_chain_end(block.add)
        with editor.before(first_user(end)):
            u = bottleneck_input(editor, block, kind, state)
            ups = [bottleneck_up(editor, u, tuple(_adapter_param(editor, n, p) for p in _ADAPTER_PARAMS),
                                 spec["act"], spec["scale"]) for n, spec in zip(names, specs)]
            stacked = editor.call(aten.stack.default, ups, -2)                        # (..., N, H)
            base, values = self._residual(editor, block, kind, state, stacked, config)
            new = self._attend(editor, u, stacked, values, base, hidden, config)
            keep = editor.call(aten.new_full.default, end, [], True, dtype=torch.bool)  # 0-d, end's device
            editor.join(end, aten.where.self, keep, new, end)

    @staticmethod
    def _residual(editor: Editor, block: Block, kind: str, state: fx.Node, stacked: fx.Node,
                  config: dict[str, Any]) -> tuple[fx.Node, fx.Node]:
        """(what the fused delta is added to, the values before Wv)."""
        if not config["residual_before"]:
            return state, stacked
        r = block.x if kind == "parallel" else block.f
        if state is block.add and block.sibling is None:
            base = block.f if kind == "parallel" else block.x                         # s - r, exactly
        else:
            base = editor.call(aten.sub.Tensor, state, r)
        values = editor.call(aten.add.Tensor, stacked, editor.call(aten.unsqueeze.default, r, -2))
        return base, values

    @staticmethod
    def _attend(editor: Editor, u: fx.Node, stacked: fx.Node, values: fx.Node, base: fx.Node, hidden: int,
                config: dict[str, Any]) -> fx.Node:
        wq = editor.param("query_weight", lambda: torch.randn(hidden, hidden) * 0.02)
        bq = editor.param("query_bias", lambda: torch.zeros(hidden))
        wk = editor.param("key_weight", lambda: torch.eye(hidden))
        query = editor.call(aten.unsqueeze.default, editor.call(aten.linear.default, u, wq, bq), -2)  # (..., 1, H)
        keys = editor.call(aten.linear.default, stacked, wk)                                       # (..., N, H)
        scores = editor.call(aten.sum.dim_IntList, editor.call(aten.mul.Tensor, query, keys), [-1])  # (..., N)
        if config["temperature"] != 1.0:
            scores = editor.call(aten.div.Tensor, scores, config["temperature"])
        weights = editor.call(aten._softmax.default, scores, -1, False, role="weights")            # (..., N)
        if config["value"]:
            values = editor.call(aten.linear.default, values, editor.param("value_weight", lambda: torch.eye(hidden)))
        mixed = editor.call(aten.mul.Tensor, values, editor.call(aten.unsqueeze.default, weights, -1))
        context = editor.call(aten.sum.dim_IntList, mixed, [-2])                                    # (..., H)
        return editor.call(aten.add.Tensor, base, context)

    # -- hooks the grafted module delegates to -------------------------------------------------
    def regularization_loss(self, grafted: Any, record: Any) -> torch.Tensor:
        """AdapterHub's fusion regulariser: ``0.01 * sum ||I - Wv||^2`` over the sites."""
        total = torch.zeros(())
        for params in grafted.store.tensors(record.adapter).values():
            value = params.get("value_weight")
            if value is not None:
                eye = torch.eye(value.shape[0], dtype=value.dtype, device=value.device)
                total = total + _REGULARIZATION * (eye - value).pow(2).sum()
        return total


def _fused_joins(block: Block, names: tuple[str, ...], site: Site) -> dict[str, tuple[int, fx.Node]]:
    """name -> (position in the site's join chain, the adapter's join) for the fused adapters."""
    found: dict[str, tuple[int, fx.Node]] = {}
    node, position = block.add, 0
    while True:
        nxt = next((u for u in node.users if is_join(u) and u.args[graft_tag(u)["base"]] is node), None)
        if nxt is None:
            break
        tag = graft_tag(nxt)
        if tag["pass"] == "adapter" and tag["adapter"] in names and tag["adapter"] not in found:
            found[tag["adapter"]] = (position, nxt)
        node, position = nxt, position + 1
    missing = [n for n in names if n not in found]
    if missing:
        raise GraftError(f"fusion: adapter(s) {missing} have no join at {site.key}; fuse adapters that sit there")
    return found


def _adapter_param(editor: Editor, adapter: str, pname: str) -> fx.Node:
    """A get_attr node reading another adapter's parameter at this site (fusion never copies them)."""
    holder = editor.store.site_params(adapter, editor.site.key, create=False)
    if holder is None or not hasattr(holder, pname):
        raise GraftError(f"fusion: adapter {adapter!r} has no parameter {pname!r} at {editor.site.key}")
    target = f"{STORE}.{adapter}.{escape(editor.site.key)}.{pname}"
    node = editor._insert(lambda: editor.graph.get_attr(target))
    fake_mode = editor._fake_mode()
    if fake_mode is not None:
        node.meta["val"] = fake_mode.from_tensor(getattr(holder, pname), static_shapes=True)
    return editor._tag(node, "param", param=pname, owner=adapter)


# -- inspection ----------------------------------------------------------------------------------
def fusion_weights(g: Any, name: str = "fusion", **inputs: Any) -> dict[str, torch.Tensor]:
    """The softmax weights of fusion `name` for `inputs`: site key -> (..., N adapters), rows sum to 1.

    Runs the module as it is now (mode, active adapters); the fusion must be active. A site whose
    module runs twice has keys ``site#0``, ``site#1``.
    """
    record = g.adapters.get(name)
    if record is None or record.method != "fusion":
        fusions = [r.adapter for r in g.records if r.method == "fusion"] or ["none"]
        raise GraftError(f"no fusion named {name!r}; fusions here: {', '.join(fusions)}")
    if name not in g.active_adapters:
        raise GraftError(f"fusion {name!r} is not active (active: {list(g.active_adapters)}); "
                         f"g.set_active([{name!r}, ...]) first")
    target, call_inputs = _target_module(g, inputs)
    runtime = target.runtime_module()
    graph = copy_graph(runtime.graph)
    nodes = [n for n in graph.nodes if (graft_tag(n) or {}).get("adapter") == name
             and graft_tag(n).get("role") == "weights"]
    keys = _weight_keys(nodes)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(nodes),)
    graph._codegen = fx.graph.CodeGen()
    graph.eliminate_dead_code()
    module = fx.GraphModule(runtime, graph)
    placeholders = [n.target for n in graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        values = module(**{k: call_inputs[k] for k in placeholders if k in call_inputs})
    return dict(zip(keys, values))


def _weight_keys(nodes: list[fx.Node]) -> list[str]:
    sites = [graft_tag(n)["site"] for n in nodes]
    counts = {s: sites.count(s) for s in sites}
    seen: dict[str, int] = {}
    keys = []
    for site in sites:
        if counts[site] == 1:
            keys.append(site)
        else:
            keys.append(f"{site}#{seen.get(site, 0)}")
            seen[site] = seen.get(site, 0) + 1
    return keys


def _target_module(g: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The grafted module traced for these inputs (``g`` itself or its re-traced variant), and the inputs."""
    call_inputs = {k: v for k, v in inputs.items() if v is not None}
    for key, value in g._traced.constants.items():
        call_inputs.setdefault(key, value)
    return g._variant(call_inputs), call_inputs  # this mode's graph for these inputs

