"""Expert stacks: 3-D parameters ``(experts, ., .)`` that a mixture-of-experts layer reads one expert at a time.

Found by dataflow, not by name: from each read of a 3-D parameter, follow its value forward through
layout ops to the matmul that consumes it::

    W (E, d1, d2) -> transpose(-2, -1) -> grouped_mm(x, ., offs)          transformers 5 "grouped_mm"
    W (E, d1, d2) -> W[expert_ids]     -> bmm(., x[..., None])            transformers 5 "batched_mm"
    W (E, d1, d2) -> W[e] (select)     -> linear(x, .)  /  x @ .          a hand-written loop over experts

The stack is kept only if the expert dim reaches the matmul as its group / batch dim, or is indexed
away first (``select`` / ``index`` / ``index_select`` on dim 0). The consumer fixes the layout:
``linear(x, w)`` and a left operand ``w @ x`` read ``w`` as (out, in); a right operand ``x @ w`` and
grouped mm read it as (in, out); each transpose of the last two dims on the way flips that. A stack
stored (E, out, in) is ``transposed=False`` (Mixtral, Qwen2-MoE, OLMoE), (E, in, out) ``transposed=True``
(GPT-OSS style): PEFT's ``is_transposed``. A stack whose reads disagree is not a site.

Each stack is a :class:`~graftlib.sites.Site` of kind ``"experts"`` keyed by the parameter's path
(``layers.0.mlp.experts.gate_up_proj``), anchored at its ``get_attr`` reads; ``lora(experts)`` selects them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .names import original_path
from .sites import Site, _layer_of, _module_class, _passes_through, weight_value

__all__ = ["EXPERTS", "find_expert_sites", "expert_layout"]

EXPERTS = "experts"
aten = torch.ops.aten

_PASS_THROUGH = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.clone.default,
                 aten.contiguous.default, aten.alias.default, aten.detach.default}
_INDEX = {aten.select.int, aten.index.Tensor, aten.index_select.default}


def _grouped_ops() -> set[Any]:
    """Grouped matmuls ``(x (S, K), W (G, K, N), offs)``: torch's and transformers' fallback, if registered."""
    ops = {getattr(aten, "_grouped_mm").default} if hasattr(aten, "_grouped_mm") else set()
    namespace = getattr(torch.ops, "transformers")
    if hasattr(namespace, "grouped_mm_fallback"):
        ops.add(namespace.grouped_mm_fallback.default)
    return ops


def _swaps_last_two(node: fx.Node, rank: int) -> bool | None:
    """True if a transpose / permute swaps the last two dims, False if it changes nothing, None otherwise."""
    if node.target == aten.transpose.int:
        dims = sorted(d % rank for d in node.args[1:3])
        return True if dims == [rank - 2, rank - 1] else (False if dims[0] == dims[1] else None)
    if node.target == aten.t.default:
        return True if rank == 2 else None
    perm = [d % rank for d in node.args[1]]
    head = list(range(rank - 2))
    if perm == head + [rank - 2, rank - 1]:
        return False
    return True if perm == head + [rank - 1, rank - 2] else None


def _indexes_experts(node: fx.Node, rank: int) -> bool:
    """Whether an index op picks experts on dim 0 (and nothing else)."""
    if node.target == aten.index.Tensor:
        indices = node.args[1]
        return len(indices) == 1 and indices[0] is not None
    return node.args[1] % rank == 0


def _consumer_layout(node: fx.Node, value: fx.Node, rank: int, grouped: set[Any]) -> tuple[str, bool] | None:
    """("grouped" | "batched" | "single", reads as (in, out)) when `node` is a matmul consuming `value`."""
    args = list(node.args)
    if node.target in grouped and len(args) > 1 and args[1] is value and rank == 3:
        return "grouped", True
    if node.target == aten.linear.default and len(args) > 1 and args[1] is value and rank == 2:
        return "single", False
    operands = args[1:3] if node.target == aten.baddbmm.default else args[:2]
    if node.target in (aten.mm.default, aten.bmm.default, aten.matmul.default, aten.baddbmm.default) \
            and value in operands:
        right = operands[1] is value
        kind = "batched" if rank == 3 else "single"
        return kind, right
    return None


def expert_layout(getter: fx.Node, grouped: set[Any] | None = None, limit: int = 8) -> bool | None:
    """For one read of a 3-D parameter: True if its matmuls read it as (E, in, out), False as (E, out, in),
    None if no matmul reads it one expert at a time (or its matmuls disagree)."""
    grouped = _grouped_ops() if grouped is None else grouped
    found: set[bool] = set()
    # (node, rank, last two dims swapped, experts indexed away or picked)
    frontier: list[tuple[fx.Node, int, bool, bool]] = [(getter, 3, False, False)]
    steps = 0
    while frontier and steps < 64:
        node, rank, swapped, indexed = frontier.pop()
        steps += 1
        for user in node.users:
            if user.op != "call_function":
                continue
            layout = _consumer_layout(user, node, rank, grouped)
            if layout is not None:
                kind, in_out = layout
                if kind == "single" and not indexed:
                    continue                    # the whole stack in one 2-D matmul: not per expert
                found.add(in_out != swapped)    # the stored stack's (d1, d2) read as (in, out)?
                continue
            if (user.args[0] is not node and not _passes_through(user, node)) or len(frontier) > limit:
                continue
            if user.target in _PASS_THROUGH or _passes_through(user, node):   # a graft join stands for W
                frontier.append((user, rank, swapped, indexed))
            elif user.target in (aten.transpose.int, aten.permute.default, aten.t.default):
                swap = _swaps_last_two(user, rank)
                if swap is not None:
                    frontier.append((user, rank, swapped != swap, indexed))
            elif user.target in _INDEX and rank == 3 and not indexed and _indexes_experts(user, rank):
                frontier.append((user, 2 if user.target == aten.select.int else 3, swapped, True))
    return found.pop() if len(found) == 1 else None


def find_expert_sites(gm: fx.GraphModule) -> tuple[list[Site], dict[str, list[fx.Node]]]:
    """Every expert stack of the graph (see the module docstring), with its get_attr reads as anchors."""
    grouped = _grouped_ops()
    reads: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not (node.meta.get("custom") or {}).get("graft"):
            reads.setdefault(str(node.target), []).append(node)
    sites: list[Site] = []
    anchors: dict[str, list[fx.Node]] = {}
    for target, getters in reads.items():
        value = weight_value(gm, target)
        if not isinstance(value, torch.nn.Parameter) or value.dim() != 3 or not value.is_floating_point():
            continue
        layouts = {expert_layout(g, grouped) for g in getters} - {None}
        if len(layouts) != 1:
            continue
        transposed = layouts.pop()
        experts, d1, d2 = value.shape
        in_f, out_f = (d1, d2) if transposed else (d2, d1)
        owner, _, leaf = target.rpartition(".")
        path = f"{original_path(gm, owner)}.{leaf}" if owner else leaf
        user = next(iter(getters[0].users), getters[0])
        site = Site(path, EXPERTS, target, int(in_f), int(out_f), layer=_layer_of(path),
                    module_class=_module_class(user), experts=int(experts), transposed=transposed)
        sites.append(site)
        anchors[site.key] = list(getters)
    return sites, anchors
