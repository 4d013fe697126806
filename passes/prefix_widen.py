"""Widening eager attention by n prefix key columns, every change a join.

Once the keys and values have n prefix rows (``passes/prefix.py``), every tensor that the scores meet
on their way to the softmax and whose last axis is the key axis gets n columns on the left:

    mask / bias operand of add, where, masked_fill, ...   pad with the neutral value (0, visible, 1)
    ALiBi computed from the attention mask (cumsum)        recompute it from [1 ... 1 | mask]
    view / reshape sizes naming the key length            Sk -> Sk + n (a join on the size)

The ALiBi case is what the eager model computes when it is given a cache of n prefix tokens and the
mask of prefix + tokens (PEFT's prefix tuning): BLOOM builds ``slopes * ((cumsum(mask) - 1) * mask)``,
so the prefix keys sit at positions 0 .. n-1 and the real keys move to n, n+1, ... The operand's
producers that read the 2-D mask are copied with the mask padded by n ones (``constant_pad_nd(mask,
[n, 0], 1)``), and the result replaces the operand through two joins (pad, then ``slice_scatter``):
deactivation gives the traced operand back. The padded mask is itself a join on the mask (read only by
the copies), so a second prefix adapter recomputes from ``n1 + n2`` ones while both are active.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_arg

from graftlib.editor import Editor, graft_tag, is_join
from graftlib.errors import GraftError

from .prefix_find import UNARY_SCORE_OPS, VIEWS, AttentionCall, base_value

__all__ = ["join_into", "widen", "widen_mask", "widen_scores", "recompute", "mask_source", "MAXINT"]

aten = torch.ops.aten
MAXINT = 9223372036854775807
_ADDITIVE = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.baddbmm.default}


def join_into(editor: Editor, base: fx.Node, user: fx.Node | None, op: Any, *args: Any) -> fx.Node:
    """``editor.join`` that reroutes only `user` (other readers of `base` keep the old value; with
    `user` None, nothing is rerouted: the join is read by nodes inserted later)."""
    others = [u for u in base.users if u is not user]
    node = editor.join(base, op, *args)
    for other in others:
        if other is not node and node in other.all_input_nodes and other not in editor.inserted:
            other.replace_input_with(node, base)
    return node


def _shared(operand: fx.Node, adapter: str, marker: str) -> fx.Node | None:
    """This adapter's widened `operand` made for an earlier attention call (layers share masks)."""
    for existing in operand.users:
        tag = graft_tag(existing)
        if tag and tag.get("adapter") == adapter and tag.get("prefix") == marker:
            return existing
    return None


def widen(editor: Editor, operand: fx.Node, user: fx.Node, value: Any, n: int) -> None:
    """Add n columns holding `value` on the left of `operand`'s last dim (shared per adapter)."""
    val = operand.meta.get("val")
    if val is None or val.dim() == 0 or (isinstance(val.shape[-1], int) and val.shape[-1] == 1):
        return  # broadcasts over the keys (a scale, a whole-row mask): covers the prefix columns too
    marker = f"widen:{value!r}"
    existing = _shared(operand, editor.adapter, marker)
    if existing is not None:
        user.replace_input_with(operand, existing)
        return
    if val.dtype == torch.bool:
        value = bool(value)
    node = join_into(editor, operand, user, aten.constant_pad_nd.default, operand, [n, 0], value)
    graft_tag(node)["prefix"] = marker


def _neutral(user: fx.Node, operand: fx.Node, on_path: fx.Node, site: str) -> Any:
    """The value that makes a prefix column of `operand` leave the scores untouched in `user`."""
    target = user.target
    if target in _ADDITIVE:
        return 0.0
    if target in (aten.mul.Tensor, aten.div.Tensor):
        return 1.0
    if target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        if user.args[0] is operand:
            return len(user.args) > 1 and user.args[1] is on_path
        return 0.0
    if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        return False if user.args[1] is operand else 0.0
    raise GraftError(f"prefix: cannot widen the {target} operand of the attention scores at {site}; "
                     "trace the model with attn_implementation='sdpa'")


# -- sizes ----------------------------------------------------------------------------------------
def _widen_size(editor: Editor, view: fx.Node, n: int, site: str) -> None:
    """A view / reshape whose last size is the key length: ``Sk`` -> ``Sk + n`` (a join on ``Sk``)."""
    sizes = list(view.args[1])
    last = sizes[-1]
    if isinstance(last, int) and last == -1:
        return
    if not isinstance(last, fx.Node):
        raise GraftError(f"prefix: the attention scores at {site} are reshaped to a fixed key length {last}; "
                         "trace the model with dynamic sequence lengths (the default) so it can grow by n")
    with editor.before(view):
        grown = join_into(editor, last, None, operator.add, last, n)
    if isinstance(last.meta.get("val"), torch.SymInt):
        grown.meta["val"] = last.meta["val"] + n
    view.args = (view.args[0], sizes[:-1] + [grown], *view.args[2:])


# -- values the model computes from the attention mask -------------------------------------------------
def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _learned(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return node.op == "get_attr" and isinstance(val, torch.Tensor) and val.is_floating_point() and val.numel() > 1


def mask_source(operand: fx.Node) -> fx.Node | None:
    """The 2-D mask input that `operand` is computed from, with no learned tensor on the way (a mask,
    a sliding window, ALiBi; not a learned relative-position bias); None otherwise."""
    ancestors = _ancestors(operand)
    if any(_learned(a) for a in ancestors):
        return None
    sources = {a for node in ancestors if node.op == "call_function" and node.target != aten.sym_size.int
               for a in node.all_input_nodes
               if a.op == "placeholder" and getattr(a.meta.get("val"), "dim", lambda: 0)() == 2}
    return sources.pop() if len(sources) == 1 else None


def _wide_mask(editor: Editor, mask: fx.Node, n: int) -> fx.Node:
    """``[1 ... 1 | mask]`` for this adapter: a join on the mask (after earlier prefix adapters' ones),
    read only by the copies; made once per adapter."""
    current = mask
    while True:
        nxt = next((u for u in current.users if (graft_tag(u) or {}).get("prefix") == "mask"
                    and u.args[0] is current), None)
        if nxt is None:
            break
        if graft_tag(nxt)["adapter"] == editor.adapter:
            return nxt
        current = nxt
    wide = join_into(editor, current, None, aten.constant_pad_nd.default, current, [n, 0], 1)   # (B, n + S)
    graft_tag(wide)["prefix"] = "mask"
    return wide


def _writes_model_value(node: fx.Node, env: dict[fx.Node, fx.Node]) -> bool:
    """An in-place op whose written tensor is the model's own (not a copy): replaying it would change it."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    return any(a.alias_info is not None and a.alias_info.is_write and isinstance(node.args[i], fx.Node)
               and node.args[i] not in env for i, a in enumerate(schema.arguments[:len(node.args)]))


def _replay(editor: Editor, operand: fx.Node, mask: fx.Node, n: int) -> fx.Node | None:
    """`operand`'s producers copied onto ``[1 ... 1 | mask]`` (n ones in front); the copy of `operand`
    (None where a producer writes in place into a value that is not copied)."""
    ancestors, cone = _ancestors(operand), {mask}
    env: dict[fx.Node, fx.Node] = {mask: _wide_mask(editor, mask, n)}
    for node in operand.graph.nodes:
        if node not in ancestors or node is mask or not any(a in cone for a in node.all_input_nodes):
            continue
        if _writes_model_value(node, env):
            return None
        cone.add(node)
        env[node] = editor.call(node.target, *map_arg(node.args, lambda a: env.get(a, a)),
                                **map_arg(node.kwargs, lambda a: env.get(a, a)))
    return env[operand]


def _widened_rows(editor: Editor, copy: fx.Node | None, operand: fx.Node, n: int) -> fx.Node | None:
    """The copy cut to the operand's query rows (the copy has a row per prefix token too, as if the
    prefix were n more input tokens), or None when its shape is not the operand's plus n key columns."""
    if copy is None:
        return None
    new, old = copy.meta.get("val"), operand.meta.get("val")
    if new is None or old is None or new.dim() != old.dim() or str(new.shape[-1]) != str(old.shape[-1] + n):
        return None
    if old.dim() < 2 or str(new.shape[-2]) == str(old.shape[-2]):
        return copy
    rows, keep = editor.call(aten.sym_size.int, copy, -2), editor.call(aten.sym_size.int, operand, -2)
    return editor.call(aten.slice.Tensor, copy, -2, editor.call(operator.sub, rows, keep), MAXINT)


def recompute(editor: Editor, operand: fx.Node, mask: fx.Node, user: fx.Node, n: int) -> bool:
    """Replace `operand` (read by `user`) by what the model computes from the mask with n ones in front
    (the eager model given a cache of n prefix tokens); False, changing nothing, where that does not
    come out as the operand plus n key columns."""
    existing = _shared(operand, editor.adapter, "recomputed")
    if existing is not None:
        user.replace_input_with(operand, next(iter(existing.users)))
        return True
    checkpoint = list(editor.inserted)
    with editor.before(user):
        # replay the model's own operand (under earlier adapters' joins) on the mask as widened so far
        wide = _widened_rows(editor, _replay(editor, base_value(operand), mask, n), operand, n)
        if wide is None:
            _drop(editor, checkpoint)
            return False
        padded = join_into(editor, operand, user, aten.constant_pad_nd.default, operand, [n, 0], 0.0)
        graft_tag(padded)["prefix"] = "recomputed"
        join_into(editor, padded, user, aten.slice_scatter.default, padded, wide, -1, 0, MAXINT)
    return True


def _drop(editor: Editor, keep: list[fx.Node]) -> None:
    """Erase the nodes inserted since `keep` (a replay that did not fit), last first."""
    kept = set(keep)
    for node in reversed([n for n in editor.inserted if n not in kept]):
        if is_join(node):
            node.replace_all_uses_with(node.args[graft_tag(node)["base"]])
        node.graph.erase_node(node)
    editor.inserted[:] = keep


# -- the score and probability paths ------------------------------------------------------------------
def widen_mask(editor: Editor, operand: fx.Node, user: fx.Node, neutral: Any, n: int) -> None:
    """`operand` (read by `user`) with n more key columns: recomputed from the mask when it is derived from
    it (a mask, a sliding window, ALiBi), else padded with `neutral`."""
    mask = mask_source(operand)
    if mask is not None and recompute(editor, operand, mask, user, n):
        return
    with editor.before(user):
        widen(editor, operand, user, neutral, n)


def _widen_operand(editor: Editor, node: fx.Node, operand: fx.Node, previous: fx.Node, n: int) -> None:
    widen_mask(editor, operand, node, _neutral(node, operand, previous, editor.site.path), n)


def widen_scores(editor: Editor, call: AttentionCall, n: int) -> None:
    """Grow every key-axis operand and size between ``q @ k^T`` and the value product by n columns."""
    path, site = call.scores_path, call.site.path
    product = path[0]
    if product.target == aten.baddbmm.default and isinstance(product.args[0], fx.Node):
        _widen_operand(editor, product, product.args[0], product, n)   # baddbmm(bias, q, k^T)
    for previous, node in zip(path, path[1:]):
        if node.target in VIEWS:
            _widen_size(editor, node, n, site)
            continue
        if node.target in UNARY_SCORE_OPS:
            continue
        for operand in list(node.all_input_nodes):
            if operand is not previous:
                _widen_operand(editor, node, operand, previous, n)
    for node in call.probs_path[1:-1]:
        if node.target in VIEWS:
            _widen_size(editor, node, n, site)
