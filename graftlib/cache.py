"""Eval-mode caching of values computed from parameters only (DoRA's weight norm and factors).

A pass tags nodes ``meta["custom"]["graft"]["cache"] = True`` when they read only parameters (get_attr
nodes, or other tagged nodes). In an eval runtime graph each (adapter, site) group of such nodes becomes

    get_attr W, A, B, m, b  ->  call_module graft_cache.<group>(W, A, B, m, b)  ->  getitem 0..n-1

where the module runs the group's nodes once and returns the stored results until one of its inputs
changes: a stamp of ``(id, _version)`` of every input tensor, so an optimiser step, ``load``,
``copy_``, a merge in place or a replaced parameter all recompute. Results are reused only where no
gradient can be asked for (grad mode off, or no input requires grad); otherwise, and under
``torch.compile`` / ``torch.export`` or fake tensors, the group runs every call, as in training.
The training graph never has these modules: there the norm is recomputed every step as in PEFT.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from .editor import graft_tag

__all__ = ["hoist_cached", "CachedValues", "CACHE_ROOT"]

CACHE_ROOT = "graft_cache"


def _cacheable(node: fx.Node) -> bool:
    tag = graft_tag(node)
    return node.op == "call_function" and bool(tag) and bool(tag.get("cache"))


class CachedValues(nn.Module):
    """Runs a parameter-only subgraph and keeps its outputs until an input tensor changes."""

    def __init__(self, graph: fx.Graph):
        super().__init__()
        self.compute = fx.GraphModule(nn.Module(), graph)
        self._stamp: tuple | None = None
        self._values: tuple[torch.Tensor, ...] = ()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if torch.compiler.is_compiling() or _exporting() or not all(type(t) in (torch.Tensor, nn.Parameter)
                                                                     for t in inputs):
            return self.compute(*inputs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            return self.compute(*inputs)  # gradients may be asked for: no stored values
        stamp = (torch.is_inference_mode_enabled(), *((id(t), t._version) for t in inputs))
        if stamp != self._stamp:
            with torch.no_grad():
                self._values = tuple(self.compute(*inputs))
            self._stamp = stamp
        return self._values


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def hoist_cached(graph: fx.Graph) -> None:
    """Replace each (adapter, site) group of cache-tagged nodes of `graph` by one CachedValues call.

    The modules are registered on ``graph.owning_module`` under ``graft_cache`` (no parameters or
    buffers of their own, so nothing is added to any state dict)."""
    root = graph.owning_module
    if root is None:
        return
    groups: dict[tuple[str, str], list[fx.Node]] = {}
    for node in graph.nodes:
        if _cacheable(node):
            tag = graft_tag(node)
            groups.setdefault((tag["adapter"], tag["site"]), []).append(node)
    if not groups:
        return
    holder = getattr(root, CACHE_ROOT, None)
    if not isinstance(holder, nn.ModuleDict):
        holder = nn.ModuleDict()
        root.add_module(CACHE_ROOT, holder)
    for (adapter, site), nodes in groups.items():
        _hoist_group(graph, holder, f"{adapter}__{site}", nodes)


def _hoist_group(graph: fx.Graph, holder: nn.ModuleDict, label: str, nodes: list[fx.Node]) -> None:
    members = set()
    for node in nodes:  # graph order: an input is either a get_attr or an earlier member
        if all(i.op == "get_attr" or i in members for i in node.all_input_nodes):
            members.add(node)
    ordered = [n for n in nodes if n in members]
    if not ordered:
        return
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []
    for node in ordered:
        for i in node.all_input_nodes:
            if i.op == "get_attr" and i not in env:
                env[i] = sub.placeholder(f"in_{len(inputs)}")
                inputs.append(i)
        env[node] = sub.node_copy(node, lambda n: env[n])
    outputs = [n for n in ordered if any(u not in members for u in n.users)]
    sub.output(tuple(env[n] for n in outputs))
    name = "".join(c if c.isalnum() else "_" for c in label)
    holder[name] = CachedValues(sub)
    order = {n: i for i, n in enumerate(graph.nodes)}
    first_user = min((u for n in outputs for u in n.users if u not in members), key=order.__getitem__)
    with graph.inserting_before(first_user):
        call = graph.call_module(f"{CACHE_ROOT}.{name}", tuple(inputs))
    call.meta["custom"] = {"graft": {**graft_tag(ordered[0]), "role": "cache", "cache": False}}
    for position, node in enumerate(outputs):
        with graph.inserting_before(first_user):
            item = graph.call_function(operator.getitem, (call, position))
        item.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        item.meta["custom"] = {"graft": {**graft_tag(node), "role": "cached", "cache": False}}
        node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
    for node in reversed(ordered):
        if not node.users:
            graph.erase_node(node)
