"""Merge: fold mergeable adapters' deltas into the weights they sit on.

    linear(x, W) + s * B(A(x))   ->   linear(x, W + s * B @ A)

The result's graph has exactly the base graph's ops (non-mergeable adapters stay as nodes). A weight
shared with an op outside the site (tied embeddings) gets its merged copy under a new name, so the
other op keeps the original weight.

A weight a base rewrite replaced (a quantised weight, read through its dequantise subgraph) is
dequantised, the delta added, and stored in full precision; with ``requantize=True`` it is quantised
again instead, and the error that adds is reported (``merged.requantization_error``, and a warning).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .editor import AdapterParams, SiteParams, graft_tag, is_join
from .errors import GraftError
from .registry import get_method
from .runtime import copy_graph, deactivate, eliminate_dead_code
from .select import SiteIndex
from .packed import weight_rows
from .sites import Site, _walk_back, weight_value

if TYPE_CHECKING:
    from .protocols import GraftedModule

__all__ = ["merge_grafted", "site_ops"]

aten = torch.ops.aten
_WEIGHT_ARG = {aten.linear.default: 1, aten.addmm.default: 2, aten.conv1d.default: 1, aten.conv2d.default: 1,
               aten.conv3d.default: 1, aten.embedding.default: 0}


def _weight_reader(op: fx.Node) -> tuple[fx.Node, int]:
    """(node, argument position) where `op` reads its weight: ``x @ W.T`` reads it through the transpose."""
    if op.target in (aten.matmul.default, aten.mm.default):
        return op.args[1], 0  # (x @ W.T): the transpose of the stored weight, sites._transposed_param
    position = _WEIGHT_ARG[op.target]
    if op.target == aten.linear.default and weight_rows(op.args[position]) is not None:
        rows = op.args[position]   # a packed weight's row block (graftlib/packed.py): its cut reads the weight
        return (rows.args[0], 0) if rows.target is not aten.slice.Tensor else (rows, 0)
    return op, position


def site_ops(site: Site, anchors: list[fx.Node]) -> list[fx.Node]:
    """The ops that read `site`'s weight (the fused op for a slice of a fused projection)."""
    return [_walk_back(a.args[0].args[0]) if site.part and site.columns is None else a for a in anchors]


def _rewritten(graph: fx.Graph, target: str) -> fx.Node | None:
    """The node a base rewrite put in place of weight `target` (tagged ``role="weight"``), if any."""
    return next((n for n in graph.nodes if (graft_tag(n) or {}).get("role") == "weight"
                 and graft_tag(n).get("weight") == target), None)


def base_weight(grafted: "GraftedModule", target: str) -> torch.Tensor:
    """Weight `target` as the graph reads it: the stored tensor, or a quantised weight dequantised."""
    node = _rewritten(grafted.graph, target)
    if node is None:
        return weight_value(grafted.graph_module, target)
    tag = graft_tag(node)
    record = grafted.adapters[tag["adapter"]]
    params = grafted.store.tensors(tag["adapter"])[tag["site"]]
    dtype = weight_value(grafted.graph_module, target).dtype
    return get_method(record.method).dequantized_weight(params, tuple(tag["shape"]), record.config).to(dtype)


def _is_replacement(node: fx.Node) -> bool:
    """A join through which an adapter's own tensor replaces a weight (``replace``, PEFT's
    modules_to_save: ``expand_as(W', W)``)."""
    return is_join(node) and node.target == aten.expand_as.default and node.args[0].op == "get_attr"


def _replacement(graph: fx.Graph, target: str) -> fx.Node | None:
    """The join through which another adapter's tensor replaces weight `target`, if any."""
    return next((user for n in graph.nodes if n.op == "get_attr" and n.target == target for user in n.users
                 if _is_replacement(user) and user.args[1] is n), None)


def merged_into(grafted: "GraftedModule", target: str) -> tuple[str | None, torch.Tensor]:
    """(adapter, tensor) a delta on weight `target` folds into: the weight as the graph reads it
    (adapter None), or the replacing tensor of an active ``replace`` adapter, which the graph reads
    instead of the weight (so a LoRA beside it adds to that copy)."""
    join = _replacement(grafted.graph, target)
    if join is None:
        return None, base_weight(grafted, target)
    adapter = graft_tag(join)["adapter"]
    if adapter not in grafted.active_adapters:
        raise GraftError(f"cannot merge into {target}: adapter {adapter!r} replaces that weight but is inactive, "
                         f"so the merged weight would be wrong whenever it is switched on again; activate it "
                         f"(g.set_active([..., {adapter!r}])) or delete it (g.delete_adapter({adapter!r})) first")
    if _rewritten(grafted.graph, target) is not None:
        raise GraftError(f"cannot merge into {target}: it is both quantised and replaced by adapter {adapter!r}")
    return adapter, weight_value(grafted.graph_module, str(join.args[0].target))


def _bias_target(graph: fx.Graph, index: SiteIndex, site: Site) -> str | None:
    """get_attr target of the bias the site's op adds (linear / conv2d args[2], Conv1D addmm args[0])."""
    ops = site_ops(site, index.anchors.get(site.key, []))
    if not ops:
        return None
    op = ops[0]
    position = 0 if op.target == aten.addmm.default else 2
    bias = op.args[position] if len(op.args) > position else None
    return str(bias.target) if isinstance(bias, fx.Node) and bias.op == "get_attr" else None


def _span_of(full: torch.Tensor, site: Site, columns: bool) -> torch.Tensor:
    """The rows of `full` (columns for Conv1D's (in, out) layout) that `site` writes: a contiguous span,
    the strided rows of a fused projection's part (a copy, for reading), or all of it."""
    if site.columns is not None:
        rows = torch.tensor(site.columns)
        return full[:, rows] if columns else full[rows]
    if site.span is None:
        return full
    lo, hi = site.span
    return full[:, lo:hi] if columns else full[lo:hi]


def _add_to_span(full: torch.Tensor, site: Site, columns: bool, delta: torch.Tensor) -> None:
    """full[site's rows] += delta, in place (index_put for strided parts)."""
    if site.columns is not None:
        rows = torch.tensor(site.columns)
        if columns:
            full[:, rows] += delta
        else:
            full[rows] += delta
    else:
        _span_of(full, site, columns).add_(delta)


def _weight_deltas(grafted: "GraftedModule", names: list[str], index: SiteIndex
                   ) -> dict[str, tuple[list[Site], torch.Tensor, tuple[str, torch.Tensor] | None]]:
    """Module path -> (its sites, summed weight delta in the stored layout, (bias target, bias delta) or None).

    Each method sees the weight (and bias) with the earlier adapters' deltas already in, in record order."""
    deltas: dict[str, tuple[list[Site], torch.Tensor, tuple[str, torch.Tensor] | None]] = {}
    for name in names:
        record = grafted.adapters[name]
        method = get_method(record.method)
        tensors = grafted.store.tensors(name)
        for key in record.sites:
            site = index.by_key(key)
            weight = merged_into(grafted, site.weight)[1]
            sites, full, bias_entry = deltas.get(site.path, ([], torch.zeros_like(weight), None))
            bias_name = _bias_target(grafted.graph, index, site)
            if bias_name is not None and bias_entry is None:
                bias_entry = (bias_name, torch.zeros_like(weight_value(grafted.graph_module, bias_name)))
            bias_now = None
            if bias_entry is not None:
                bias_now = _span_of(weight_value(grafted.graph_module, bias_entry[0]).detach() + bias_entry[1],
                                    site, False)
            weight_now = _span_of(weight.detach() + full, site, site.kind == "conv1d")
            delta, bias_delta = method.merge_deltas(site, tensors[key], record.config, weight_now, bias_now)
            _add_to_span(full, site, site.kind == "conv1d", delta)
            if bias_delta is not None:
                _add_to_span(bias_entry[1], site, False, bias_delta)
            if not torch.isfinite(delta).all() or not torch.isfinite(weight.detach() + full).all() or \
                    (bias_delta is not None and not torch.isfinite(bias_delta).all()):
                raise GraftError(f"merging adapter {name!r} into {key} gives non-finite weights; "
                                 "nothing was merged (check the adapter's parameters for inf/nan)")
            deltas[site.path] = (sites + [site], full, bias_entry)
    return deltas


def _shared_elsewhere(graph: fx.Graph, target: str, ops: list[fx.Node]) -> bool:
    # a site anchored at the weight's read itself (an expert stack) owns that read and all its users
    readers = {user for n in graph.nodes if n.op == "get_attr" and n.target == target and n not in ops
               for user in n.users}
    readers = {r for reader in readers for r in (reader.users if _is_replacement(reader) else (reader,))}
    return bool(readers - {_weight_reader(op)[0] for op in ops if op.op != "get_attr"} - set(ops))


def _site_group_ops(graph: fx.Graph, index: SiteIndex, sites: list[Site]) -> list[fx.Node]:
    anchors = _anchors_in(graph, index)
    return list(dict.fromkeys(op for site in sites for op in site_ops(site, anchors.get(site.key, []))))


def merge_grafted(grafted: "GraftedModule", inplace: bool = False, adapters: Iterable[str] | None = None,
                  requantize: bool = False) -> "GraftedModule":
    if adapters is None:
        names = [a for a in grafted.active_adapters if get_method(grafted.adapters[a].method).mergeable]
    else:
        names = list(adapters)
        grafted._check_names(names)
        for name in names:
            if not get_method(grafted.adapters[name].method).mergeable:
                raise GraftError(f"adapter {name!r} ({grafted.adapters[name].method}) is not mergeable: "
                                 "it stays as graph nodes and exports as such")
    index = SiteIndex.build(grafted.graph_module)
    deltas = _weight_deltas(grafted, names, index)
    rewritten = {path: _rewritten(grafted.graph, sites[0].weight) for path, (sites, _, _) in deltas.items()}
    if inplace and any(node is not None for node in rewritten.values()):
        path = next(p for p, node in rewritten.items() if node is not None)
        raise GraftError(f"cannot merge in place into {path}: its weight is quantised; use merge() for "
                         "full-precision weights or merge(requantize=True) to quantise the merged weights")
    if inplace:
        for path, (sites, _, _) in deltas.items():
            ops = _site_group_ops(grafted.graph, index, sites)
            if _shared_elsewhere(grafted.graph, sites[0].weight, ops):
                raise GraftError(f"cannot merge in place into {path}: its weight {sites[0].weight} is tied to "
                                 "another module, which would change too; use merge(inplace=False)")
    for path, (sites, _, _) in deltas.items():
        if _replacement(grafted.graph, sites[0].weight) is not None and \
                _shared_elsewhere(grafted.graph, sites[0].weight, _site_group_ops(grafted.graph, index, sites)):
            raise GraftError(f"cannot merge into {path}: its weight {sites[0].weight} is tied to another module "
                             "and replaced by an adapter's copy, which both modules read")
    target = grafted if inplace else grafted._derived(copy_graph(grafted.graph))
    graph = target.graph
    gm = target.graph_module
    errors: dict[str, float] = {}
    with torch.no_grad():
        for path, (sites, delta, bias_entry) in deltas.items():
            weight_name = sites[0].weight
            if bias_entry is not None and bias_entry[1].any():
                _merge_bias(gm, bias_entry, inplace)
            replacing = merged_into(grafted, weight_name)[0]
            if replacing is not None:  # the graph reads the replace adapter's copy: the delta goes there
                _merge_replacement(target, replacing, weight_name, delta, inplace)
                continue
            if rewritten[path] is not None:
                new_weight = base_weight(grafted, weight_name) + delta
                if requantize:
                    errors[path] = _requantize(target, graft_tag(rewritten[path]), new_weight)
                    continue
                _unquantize(target, graft_tag(rewritten[path]))
                merged = nn.Parameter(new_weight, requires_grad=False)
            else:
                weight = weight_value(gm, weight_name)
                if inplace:
                    weight.add_(delta)
                    continue
                merged = nn.Parameter(weight.detach() + delta, requires_grad=False)
            ops = _site_group_ops(graph, index, sites)
            tied = _shared_elsewhere(graph, weight_name, ops)
            if tied:
                weight_name = f"{path}.{weight_name.rsplit('.', 1)[-1]}_merged"
            owner, _, leaf = weight_name.rpartition(".")
            _ensure_module(gm, owner)._parameters[leaf] = merged
            for op in ops:  # a tied weight's copy, or a quantised weight stored in full again
                if op.op == "get_attr":     # the site is the read itself (an expert stack)
                    op.target = weight_name
                    continue
                reader, position = _weight_reader(op)
                reads = reader.args[position]
                if getattr(reads, "op", None) == "get_attr" and reads.target == weight_name:
                    continue
                with graph.inserting_before(reader):
                    getter = graph.get_attr(weight_name)
                args = list(reader.args)
                args[position] = getter
                reader.args = tuple(args)
    deactivate(graph, [a for a in grafted.adapters if a not in names])
    eliminate_dead_code(graph)
    for name in names:
        if name in target.store:
            del target.store[name]
    target.records = [r for r in target.records if r.adapter not in names]
    target._active = tuple(a for a in target._active if a not in names)
    _prune_base_rewrites(target)
    target.retraceable = False
    if not inplace and (grafted.retraceable or getattr(grafted, "_merged_from", None) is None):
        target._merged_from = (grafted, tuple(names), {"requantize": requantize})
    target._finish()
    if errors:
        target.requantization_error = errors
        worst = max(errors, key=errors.get)
        warnings.warn(f"merge(requantize=True) quantised {len(errors)} merged weights again; max abs error "
                      f"against the full-precision merge {errors[worst]:.3g} (at {worst}); see "
                      "merged.requantization_error", stacklevel=3)
    return target


def _merge_bias(gm: fx.GraphModule, bias_entry: tuple[str, torch.Tensor], inplace: bool) -> None:
    """A bias change (IA3 on an output): in place, or as a new parameter of the derived module."""
    name, delta = bias_entry
    bias = weight_value(gm, name)
    if inplace:
        bias.add_(delta)
        return
    owner, _, leaf = name.rpartition(".")
    _ensure_module(gm, owner)._parameters[leaf] = nn.Parameter(bias.detach() + delta, requires_grad=False)


def _own_site_params(target: "GraftedModule", adapter: str, site: str) -> SiteParams:
    """`target`'s own copy of one site's holder (a derived module shares holders with its source)."""
    shared = target.store[adapter]
    own = AdapterParams({key: holder for key, holder in shared.items()})
    target.store[adapter] = own
    key = next(k for k, holder in own.items() if holder.site_key == site)
    fresh = SiteParams(site)
    for name, buffer in own[key].named_buffers(recurse=False):
        fresh.register_buffer(name, buffer)
    for name, param in own[key].named_parameters(recurse=False):
        fresh.register_parameter(name, param)
    own[key] = fresh
    return fresh


def _merge_replacement(target: "GraftedModule", adapter: str, weight_name: str, delta: torch.Tensor,
                       inplace: bool) -> None:
    """Add `delta` to the tensor with which `adapter` (``replace``) replaces `weight_name`: in place, or
    as the merged module's own copy (the source module keeps its tensor)."""
    holder = target.store[adapter][next(k for k, h in target.store[adapter].items() if h.site_key == weight_name)]
    if inplace:
        holder.value.add_(delta)
        return
    value = holder.value
    _own_site_params(target, adapter, weight_name).value = nn.Parameter(value.detach() + delta,
                                                                        requires_grad=value.requires_grad)


def _requantize(target: "GraftedModule", tag: dict[str, Any], weight: torch.Tensor) -> float:
    """Quantise the merged `weight` into the site's tensors; returns the max abs error that adds."""
    record = target.adapters[tag["adapter"]]
    method = get_method(record.method)
    holder = _own_site_params(target, tag["adapter"], tag["site"])
    state = method.quantized_state(weight, record.config)
    for name, value in state.items():
        holder.register_buffer(name, value)
    restored = method.dequantized_weight(dict(holder.named_buffers()), tuple(weight.shape), record.config)
    return float((restored.to(weight.dtype) - weight).abs().max())


def _unquantize(target: "GraftedModule", tag: dict[str, Any]) -> None:
    """The site's weight is stored in full precision again: it leaves the quantising record."""
    for record in target.records:
        if record.adapter == tag["adapter"]:
            record.sites = [s for s in record.sites if s != tag["site"]]


def _prune_base_rewrites(target: "GraftedModule") -> None:
    """Drop the tensors of sites a base rewrite no longer covers (after dead-code removal)."""
    for record in [r for r in target.records if get_method(r.method).base_rewrite]:
        kept = AdapterParams({k: h for k, h in target.store[record.adapter].items() if h.site_key in record.sites})
        if len(kept):
            target.store[record.adapter] = kept
        else:
            del target.store[record.adapter]
            target.records.remove(record)
            target._active = tuple(a for a in target._active if a != record.adapter)


def _anchors_in(graph: fx.Graph, index: SiteIndex) -> dict[str, list[fx.Node]]:
    """Map the index's anchors (found on the source graph) to the same nodes in `graph` by name."""
    by_name = {n.name: n for n in graph.nodes}
    return {key: [by_name[n.name] for n in nodes if n.name in by_name] for key, nodes in index.anchors.items()}


def _ensure_module(gm: fx.GraphModule, path: str) -> nn.Module:
    module: nn.Module = gm
    for part in [p for p in path.split(".") if p]:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module
