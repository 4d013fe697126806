"""Matmul folding as the eager model does it, although the graph's base weights are frozen.

``aten.matmul`` (and ``aten.linear`` without the fused bias path) decides at run time whether to fold
a (..., n) input into a matrix and call ``mm``, or to broadcast and call ``bmm``. One of its tests is
whether the *weight requires grad* (``should_fold`` in ATen's LinearAlgebra.cpp): a weight that
requires grad always folds, a frozen one folds only when the input's leading dimensions are
contiguous. The two paths round differently. The eager model's weights require grad; the graph's are
frozen (only adapters train), so a Linear on a transposed input (``nn.MultiheadAttention`` with
``batch_first=True``, a vision block after a ``permute``) would run ``bmm`` in the graph and ``mm``
eagerly: SigLIP's pooling head came out 3.6e-7 off its eager model.

What "requires grad" means for the operand follows eager exactly: a *view* of a weight that requires
grad (``W.t()``, a ``split`` of a packed in-projection) reports ``requires_grad`` even under ``no_grad``
or ``inference_mode``, so it always folds; a value *computed* from such a weight folds only while grad
mode is on. The runtime graph therefore calls, where the input is not contiguous and the operand is
one of those,

    linear(x, W, b)  ->  linear_like_eager(x, W, b, always)
    matmul(x, Wt)    ->  matmul_like_eager(x, Wt, always)

which fold as ATen folds (``mm`` over ``x.reshape(-1, n)``, then the bias added) when ``always`` or
grad mode is on, and call the plain op otherwise. A contiguous input folds either way, and a linear
with a bias on a contiguous input takes ATen's fused ``addmm`` path whatever the weight's grad, so
those nodes (nearly all: Llama's, BERT's) are left alone; so is every node whose weight the user had
frozen before grafting (eager and graph take the same path already).
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

import operator

import torch
from torch import fx
from torch._prims_common import is_contiguous_or_false

__all__ = ["fold_like_eager", "eager_grad_targets", "linear_like_eager", "matmul_like_eager"]

aten = torch.ops.aten


def eager_grad_targets(gm: torch.nn.Module) -> frozenset[str]:
    """Names of `gm`'s parameters that require grad now (before the graph freezes them)."""
    return frozenset(name for name, p in gm.named_parameters(remove_duplicate=False) if p.requires_grad)


_VIEW_OPS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default, aten.reshape.default,
             aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
             aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default,
             aten.expand.default, aten.alias.default, aten.unflatten.int, aten.numpy_T.default, operator.getitem}


def _grad_reads(graph: fx.Graph, eager_grad: Collection[str]) -> tuple[set[fx.Node], set[fx.Node]]:
    """(views, computed): nodes that are views of a parameter in `eager_grad` (eager: requires_grad in
    every grad mode) and nodes computed from one (eager: requires_grad while grad mode is on)."""
    views: set[fx.Node] = set()
    computed: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" and str(node.target) in eager_grad:
            views.add(node)
        elif node.op == "call_function" and node.target in _VIEW_OPS and node.args and node.args[0] in views:
            views.add(node)
        elif any(i in views or i in computed for i in node.all_input_nodes):
            computed.add(node)
    return views, computed


def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _fold(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """ATen's folding path: ``mm`` over the input flattened to a matrix (a copy if it is not contiguous)."""
    return torch.mm(x.reshape(-1, x.shape[-1]), weight_t).view(*x.shape[:-1], weight_t.shape[-1])


def linear_like_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      always: bool = False) -> torch.Tensor:
    """``F.linear`` as eager runs it when `weight` requires grad (the graph's copy is frozen): always for
    a view of a trained weight, in grad mode for a value computed from one."""
    if not (always or torch.is_grad_enabled()) or x.dim() < 3 or (bias is not None and x.is_contiguous()):
        return torch.ops.aten.linear.default(x, weight, bias)
    out = _fold(x, weight.t())
    return out if bias is None else out + bias


def matmul_like_eager(x: torch.Tensor, weight_t: torch.Tensor, always: bool = False) -> torch.Tensor:
    """``x @ weight_t`` as eager runs it when the 2-D `weight_t` requires grad (the graph's is frozen)."""
    if not (always or torch.is_grad_enabled()) or x.dim() < 3:
        return torch.ops.aten.matmul.default(x, weight_t)
    return _fold(x, weight_t)


def _replace(graph: fx.Graph, node: fx.Node, target: Any, always: bool) -> None:
    with graph.inserting_before(node):
        new = graph.call_function(target, node.args, {**node.kwargs, "always": always})
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _candidate(node: fx.Node, reads: set[fx.Node]) -> bool:
    """A 2-D operand computed from a weight the eager model trains, with a >= 3-D input that is not
    contiguous."""
    x, weight = node.args[0], node.args[1]
    val, w_val = _val(x), _val(weight)
    if val is None or w_val is None or val.dim() < 3 or w_val.dim() != 2:
        return False
    return weight in reads and not is_contiguous_or_false(val)


def fold_like_eager(graph: fx.Graph, eager_grad: Collection[str]) -> int:
    """Spell out ATen's matmul folding wherever the eager weight (a target in `eager_grad`) required grad
    and the graph's frozen one would take the other path. Returns the number of nodes rewritten."""
    if not eager_grad:
        return 0
    targets = {aten.linear.default: linear_like_eager, aten.matmul.default: matmul_like_eager}
    views, computed = _grad_reads(graph, eager_grad)
    reads = views | computed
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in targets and len(node.args) >= 2 \
                and _candidate(node, reads):
            _replace(graph, node, targets[node.target], always=node.args[1] in views)
            count += 1
    return count
