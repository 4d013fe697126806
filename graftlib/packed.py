"""Packed weights read in row blocks: one parameter, several projections.

    W (3E, E) --chunk(3)--> W[0:E], W[E:2E], W[2E:3E] --> linear(q, W[0:E], b[0:E]), linear(k, ...), ...

``nn.MultiheadAttention`` keeps q, k and v in one ``in_proj_weight``; called with one tensor as query,
key and value (self-attention on a batched input) it is one ``linear`` on the whole weight, an ordinary
site. Called otherwise (unbatched input, cross-attention) it cuts the weight into row blocks first and
runs one linear per block. Such a site is of kind ``"packed"``: the module path that owns the weight,
``in`` its columns and ``out`` all its rows, anchored at every linear that reads a block. A pass adapts
the whole weight and each anchor sees its own rows (LoRA: ``linear(low, B[lo:hi])``); merging adds the
whole delta to the stored weight, which the cuts then read as before.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

__all__ = ["weight_rows", "PACKED"]

aten = torch.ops.aten
PACKED = "packed"


def _rows_of_cut(cut: fx.Node, index: int, total: int) -> tuple[int, int] | None:
    """Rows `index` of `cut` (a chunk / split of a weight along dim 0) covers, or None."""
    dim = cut.args[2] if len(cut.args) > 2 else cut.kwargs.get("dim", 0)
    if dim not in (0, -2):
        return None
    if cut.target in (aten.chunk.default, aten.unsafe_chunk.default):
        size = -(-total // int(cut.args[1]))
        lo = index * size
        return lo, min(lo + size, total)
    if cut.target in (aten.split.Tensor, aten.unsafe_split.Tensor):
        size = int(cut.args[1])
        return index * size, min((index + 1) * size, total)
    if cut.target in (aten.split_with_sizes.default, aten.unsafe_split_with_sizes.default):
        sizes = [int(s) for s in cut.args[1]]
        return sum(sizes[:index]), sum(sizes[:index + 1])
    return None


def weight_rows(node: Any) -> tuple[str, int, int] | None:
    """(get_attr target, lo, hi) when `node` is rows ``lo:hi`` of a stored 2-d weight, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is operator.getitem:
        cut = node.args[0]
        if not isinstance(cut, fx.Node) or cut.op != "call_function":
            return None
        source = cut.args[0]
        rows = None
        if _stored_2d(source):
            rows = _rows_of_cut(cut, int(node.args[1]), int(source.meta["val"].shape[0]))
        return (str(source.target), *rows) if rows is not None and rows[1] > rows[0] else None
    if node.target == aten.slice.Tensor and _stored_2d(node.args[0]):
        dim = node.args[1] if len(node.args) > 1 else 0
        step = node.args[4] if len(node.args) > 4 else 1
        total = int(node.args[0].meta["val"].shape[0])
        lo = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        hi = node.args[3] if len(node.args) > 3 and node.args[3] is not None else total
        if dim == 0 and step == 1 and isinstance(lo, int) and isinstance(hi, int):
            lo, hi = max(0, lo if lo >= 0 else total + lo), min(total, hi if hi >= 0 else total + hi)
            return (str(node.args[0].target), lo, hi) if hi > lo else None
    return None


def _stored_2d(node: Any) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(node, fx.Node) and node.op == "get_attr" and value is not None and len(value.shape) == 2
