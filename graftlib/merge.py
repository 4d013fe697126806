"""Merge: fold mergeable adapters' deltas into the weights they sit on.

    linear(x, W) + s * B(A(x))   ->   linear(x, W + s * B @ A)

The result's graph has exactly the base graph's ops (non-mergeable adapters stay as nodes). A weight
shared with an op outside the site (tied embeddings) gets its merged copy under a new name, so the
other op keeps the original weight.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from .errors import GraftError
from .registry import get_method
from .runtime import copy_graph, deactivate, eliminate_dead_code
from .select import SiteIndex
from .sites import Site, _walk_back, weight_value

if TYPE_CHECKING:
    from .grafted import Grafted

__all__ = ["merge_grafted", "site_ops"]

aten = torch.ops.aten
_WEIGHT_ARG = {aten.linear.default: 1, aten.addmm.default: 2, aten.conv2d.default: 1, aten.embedding.default: 0}


def site_ops(site: Site, anchors: list[fx.Node]) -> list[fx.Node]:
    """The ops that read `site`'s weight (the fused op for a slice of a fused projection)."""
    return [_walk_back(a.args[0].args[0]) if site.part and site.columns is None else a for a in anchors]


def _weight_deltas(grafted: "Grafted", names: list[str], index: SiteIndex) -> dict[str, tuple[list[Site], torch.Tensor]]:
    """Module path -> (its sites, summed delta in the stored weight's layout)."""
    deltas: dict[str, tuple[list[Site], torch.Tensor]] = {}
    for name in names:
        record = grafted.adapters[name]
        method = get_method(record.method)
        tensors = grafted.store.tensors(name)
        for key in record.sites:
            site = index.by_key(key)
            delta = method.delta(site, tensors[key], record.config)
            weight = weight_value(grafted.graph_module, site.weight)
            sites, full = deltas.get(site.path, ([], torch.zeros_like(weight)))
            if site.columns is not None:  # a strided part of a fused projection: its rows
                rows = torch.tensor(site.columns)
                if site.kind == "conv1d":
                    full[:, rows] += delta
                else:
                    full[rows] += delta
            elif site.span is None:
                full += delta
            elif site.kind == "conv1d":
                full[:, site.span[0]:site.span[1]] += delta
            else:
                full[site.span[0]:site.span[1]] += delta
            if not torch.isfinite(delta).all() or not torch.isfinite(weight.detach() + full).all():
                raise GraftError(f"merging adapter {name!r} into {key} gives non-finite weights; "
                                 "nothing was merged (check the adapter's parameters for inf/nan)")
            deltas[site.path] = (sites + [site], full)
    return deltas


def _shared_elsewhere(graph: fx.Graph, target: str, ops: list[fx.Node]) -> bool:
    readers = {user for n in graph.nodes if n.op == "get_attr" and n.target == target for user in n.users}
    return bool(readers - set(ops))


def _site_group_ops(graph: fx.Graph, index: SiteIndex, sites: list[Site]) -> list[fx.Node]:
    anchors = _anchors_in(graph, index)
    return list(dict.fromkeys(op for site in sites for op in site_ops(site, anchors.get(site.key, []))))


def merge_grafted(grafted: "Grafted", inplace: bool = False, adapters: Iterable[str] | None = None) -> "Grafted":
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
    if inplace:
        for path, (sites, _) in deltas.items():
            ops = _site_group_ops(grafted.graph, index, sites)
            if _shared_elsewhere(grafted.graph, sites[0].weight, ops):
                raise GraftError(f"cannot merge in place into {path}: its weight {sites[0].weight} is tied to "
                                 "another module, which would change too; use merge(inplace=False)")
    target = grafted if inplace else grafted._derived(copy_graph(grafted.graph))
    graph = target.graph
    gm = target.graph_module
    with torch.no_grad():
        for path, (sites, delta) in deltas.items():
            weight_name = sites[0].weight
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
            if tied:
                for op in ops:
                    with graph.inserting_before(op):
                        getter = graph.get_attr(weight_name)
                    args = list(op.args)
                    args[_WEIGHT_ARG[op.target]] = getter
                    op.args = tuple(args)
    deactivate(graph, [a for a in grafted.adapters if a not in names])
    eliminate_dead_code(graph)
    for name in names:
        if name in target.store:
            del target.store[name]
    target.records = [r for r in target.records if r.adapter not in names]
    target._active = tuple(a for a in target._active if a not in names)
    target.retraceable = False
    if not inplace and (grafted.retraceable or getattr(grafted, "_merged_from", None) is None):
        target._merged_from = (grafted, tuple(names))
    target._finish()
    return target


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
