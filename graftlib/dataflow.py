"""Dataflow helpers for site discovery: which output columns of a fused projection each part covers.

A fused q/k/v projection is cut into parts by any mix of layout ops (view, reshape, transpose,
permute) and partition ops (chunk / split / unbind + getitem, select, slice, index with constant
indices), e.g.

    GPT-NeoX  linear -> view(B, N, H, 3D) -> transpose -> chunk(3, -1) -> getitem 0 / 1 / 2
    BLOOM     linear -> view(B, N, H, 3, D) -> select(3, 0 / 1 / 2)
    Phi3      linear -> slice(-1, 0, q) / slice(-1, q, q + kv) / slice(-1, q + kv, end)
    Falcon    matmul(x, W.T) + b -> view(B, N, H + 2, D) -> slice(2, 0, -2) / index(2, [-2]) / index(2, [-1])

The columns are found by replaying the chain on an index tensor (``arange(out)`` broadcast to the
projection's example shape): each part's values are the projection columns it holds. Pure: reads
the graph, changes nothing.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

__all__ = ["column_parts"]

aten = torch.ops.aten

_LAYOUT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten.flatten.using_ints, aten.unflatten.int,
}
_IDENTITY = {aten.to.dtype, aten.to.dtype_layout, aten.type_as.default, aten._to_copy.default}
_SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int}
_PARTITIONS = {aten.select.int, aten.slice.Tensor, aten.index.Tensor}
_MAX_NODES = 64


def _hint(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        node = value.node
        hint = getattr(node, "hint", None)
        return int(hint) if hint is not None else int(node.shape_env.size_hint(node.expr))
    if isinstance(value, (list, tuple)):
        return type(value)(_hint(v) for v in value)
    return value


def _is_bias_add(node: fx.Node, source: fx.Node, out_features: int) -> bool:
    """``y + b`` with a stored (out,) bias: the columns pass through unchanged (FalconLinear)."""
    if node.target != aten.add.Tensor or len(node.args) != 2 or node.args[0] is not source:
        return False
    bias = node.args[1]
    value = getattr(bias, "meta", {}).get("val")
    return isinstance(bias, fx.Node) and bias.op == "get_attr" and value is not None \
        and tuple(value.shape) == (out_features,)


def _is_join_over(user: fx.Node, value: fx.Node) -> bool:
    """A graft join whose base is `value` stands for it (parts stay found after grafting)."""
    tag = (user.meta.get("custom") or {}).get("graft") or {}
    return tag.get("role") == "join" and user.args[tag["base"]] is value


def _constant(gm: fx.GraphModule, node: Any) -> Any:
    """A constant index tensor (lifted tensor, possibly through lift_fresh_copy), else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.lift_fresh_copy.default:
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj: Any = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) and not obj.is_floating_point() else None
    return None


def _evaluate(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, Any]) -> Any:
    def arg(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in values:
                return values[a]
            constant = _constant(gm, a)
            if constant is not None:
                return constant
            return _hint(a.meta.get("val"))
        if isinstance(a, (list, tuple)):
            return type(a)(arg(v) for v in a)
        return _hint(a)

    args = [arg(a) for a in node.args]
    kwargs = {k: arg(v) for k, v in node.kwargs.items()}
    if node.target is operator.getitem:
        return args[0][args[1]]
    if node.target == aten.index.Tensor and any(
            i is not None and not isinstance(i, torch.Tensor) for i in args[1]):
        raise ValueError("non-constant index")
    return node.target(*args, **kwargs)


def column_parts(gm: fx.GraphModule, anchor: fx.Node, out_features: int) -> list[tuple[fx.Node, tuple[int, ...]]]:
    """(part node, sorted columns) for each part a fused projection's output is cut into, or [].

    Only a complete partition counts: every use of the output goes through layout ops to partition
    ops, the parts are disjoint and cover all ``out_features`` columns, and there are at least two.
    """
    value = anchor.meta.get("val")
    if value is None or value.shape[-1] != out_features:
        return []
    shape = _hint(tuple(value.shape))
    values: dict[fx.Node, Any] = {anchor: torch.arange(out_features).expand(*shape)}
    parts: list[tuple[fx.Node, tuple[int, ...]]] = []
    frontier, seen = [anchor], 0
    try:
        while frontier:
            current = frontier.pop(0)
            for user in list(current.users):
                seen += 1
                if seen > _MAX_NODES or user.op != "call_function":
                    return []
                if _is_join_over(user, current) or user.target in _IDENTITY or \
                        _is_bias_add(user, current, out_features):
                    values[user] = values[current]
                    frontier.append(user)
                elif user.target in _LAYOUT:
                    values[user] = _evaluate(gm, user, values)
                    frontier.append(user)
                elif user.target in _SPLITS:
                    pieces = _evaluate(gm, user, values)
                    for getitem in user.users:
                        if getitem.target is not operator.getitem:
                            return []
                        parts.append((getitem, _columns(pieces[getitem.args[1]])))
                elif user.target in _PARTITIONS and user.args[0] is current:
                    parts.append((user, _columns(_evaluate(gm, user, values))))
                else:
                    return []
    except Exception:  # a shape op this replay cannot evaluate: no parts, never a wrong guess
        return []
    covered = [c for _, cols in parts for c in cols]
    if len(parts) < 2 or len(covered) != out_features or set(covered) != set(range(out_features)):
        return []
    return parts


def _columns(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(c) for c in torch.unique(value))
