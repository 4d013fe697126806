"""Finding attention for prefix tuning: SDPA calls and eager ``scores -> softmax -> values`` patterns.

An eager attention is matched by dataflow around a softmax over the last axis:

    p = softmax(f(q @ k^T))          q @ k^T: matmul (B, H, N, D) or bmm / baddbmm (B*H, N, D)
    out = [dropout](p) @ v            matmul or bmm, 4-D or 3-D

where ``f`` is any chain of elementwise score ops (scale, add / sub of a mask, bias or ALiBi, in-place
``add_`` of a relative-position bias, ``where`` / ``masked_fill`` of a mask, ``tanh`` soft-capping,
casts) and views between the 3-D and 4-D layouts. ``baddbmm(bias, q, k^T)`` (BLOOM) folds an additive
operand into the product. The keys are read through ``transpose`` / ``permute`` and scalar scaling
(DeBERTa divides ``k^T`` by ``sqrt(d * scale)`` before the product). The recorded pattern -- the product,
the score path to the softmax input, the probability path to the value product -- is what the
rewrite widens by n key columns (``passes/prefix_widen.py``).

3-D (B*H, S, D) keys and values are related to their 4-D (B, H, S, D) source through one view /
reshape; head counts are read there. Pure: reads the graph, changes nothing.
"""
from __future__ import annotations

import dataclasses
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from graftlib.editor import graft_tag, is_join
from graftlib.select import SiteIndex
from graftlib.sites import Site, _layer_of, _module_class, _module_path

__all__ = ["AttentionCall", "find_attention", "is_tagged", "base_value", "arg", "PASS_THROUGH", "VIEWS",
           "SCORE_OPS", "UNARY_SCORE_OPS"]

aten = torch.ops.aten

_SDPA = aten.scaled_dot_product_attention.default
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
PASS_THROUGH = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
                aten.clone.default, aten.contiguous.default, aten.alias.default, aten.type_as.default}
_DROPOUT = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
#: elementwise ops without a second tensor operand (soft-capping: ``c * tanh(s / c)``)
UNARY_SCORE_OPS = {aten.tanh.default}
SCORE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor,
             aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.masked_fill.Scalar,
             aten.masked_fill.Tensor} | UNARY_SCORE_OPS | PASS_THROUGH | VIEWS
_PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
_SCALE = {aten.mul.Tensor, aten.div.Tensor} | PASS_THROUGH   # k^T / scale: a scalar operand


@dataclass
class AttentionCall:
    """One attention computation: an SDPA node, or the eager ``softmax(q k^T ...) v`` pattern."""

    site: Site
    kind: str                       # "sdpa" | "eager"
    node: fx.Node                   # the SDPA node or the softmax node
    query: fx.Node
    key: fx.Node                    # the keys as the attention reads them: (B, H, Sk, D) or (B*H, Sk, D)
    value: fx.Node                  # the values, same layout
    key_user: fx.Node               # the node that reads `key` (SDPA, or the transpose feeding q @ k^T)
    value_user: fx.Node             # the node that reads `value`
    scores_path: list[fx.Node] = field(default_factory=list)  # eager: q @ k^T ... softmax input
    probs_path: list[fx.Node] = field(default_factory=list)   # eager: softmax ... the value product
    cross: bool = False
    heads_source: fx.Node | None = None   # the (B, H, Sk, D) keys that 3-D keys are a view of

    @property
    def keys4(self) -> fx.Node:
        """The keys as (B, H, Sk, D): `key` itself, or the 4-D tensor 3-D keys are flattened from."""
        return self.heads_source if self.heads_source is not None else self.key

    @property
    def heads(self) -> int:
        return int(self.keys4.meta["val"].shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.keys4.meta["val"].shape[3])

    @property
    def repeat(self) -> int:
        return _kv_repeat(self.keys4)

    @property
    def token_dim(self) -> int:
        """H_kv * D: the width of one learned key (or value) row."""
        return self.heads // self.repeat * self.head_dim


def arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _skip(node: Any, ops: set) -> Any:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops:
        node = node.args[0]
    return node


def base_value(node: fx.Node) -> fx.Node:
    """The model's own value under any adapters' joins (e.g. keys another prefix already extended)."""
    while is_join(node):
        node = node.args[graft_tag(node)["base"]]
    return node


def is_tagged(node: fx.Node) -> bool:
    return bool((node.meta.get("custom") or {}).get("graft"))


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _kv_repeat(key: fx.Node) -> int:
    """How many query heads share one kv head when the graph repeats kv heads before the attention."""
    node = _skip(base_value(key), PASS_THROUGH)
    if node.op == "call_function" and node.target == aten.repeat_interleave.self_int \
            and arg(node, 2, "dim", None) in (1, -3):
        return int(node.args[1])
    if node.op != "call_function" or node.target not in VIEWS:
        return 1
    expand = _skip(node.args[0], PASS_THROUGH)
    if expand.op != "call_function" or expand.target != aten.expand.default:
        return 1
    source, out = expand.args[0].meta.get("val"), expand.meta.get("val")
    if source is None or out is None or source.dim() != 5 or out.dim() != 5 or source.shape[2] != 1:
        return 1
    return int(out.shape[2])


def _projection(node: fx.Node, limit: int = 64) -> fx.Node | None:
    """The nearest linear / addmm projection upstream of `node` (breadth first)."""
    seen, queue = {node}, deque([node])
    while queue and len(seen) < limit:
        current = queue.popleft()
        if current.op == "call_function" and current.target in (aten.linear.default, aten.addmm.default):
            return current
        for item in current.all_input_nodes:
            if item not in seen and item.op == "call_function":
                seen.add(item)
                queue.append(item)
    return None


def _projection_input(node: fx.Node) -> fx.Node | None:
    projection = _projection(node)
    if projection is None:
        return None
    if projection.target == aten.addmm.default:
        return _skip(projection.args[1], VIEWS | PASS_THROUGH)
    return projection.args[0]


def _key_weight_owner(call: AttentionCall) -> str | None:
    """The module path owning the key projection's weight (``blocks.0.wk``), if there is one."""
    projection = _projection(base_value(call.key))
    if projection is None:
        return None
    weight = projection.args[1] if projection.target == aten.linear.default else projection.args[2]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    return str(weight.target).rsplit(".", 1)[0]


def _distinct_sites(calls: list[AttentionCall]) -> None:
    """Name attention calls that share a module path but not their key weights (attention written
    inline in a parent's forward) after the key projection's parent module, e.g. ``blocks.0``."""
    groups: dict[str, list[AttentionCall]] = {}
    for call in calls:
        groups.setdefault(call.site.key, []).append(call)
    for key, group in groups.items():
        owners = [_key_weight_owner(call) for call in group]
        if key and len(set(owners)) <= 1:
            continue  # one module (possibly called several times: one site, shared prefix)
        parents = [owner.rsplit(".", 1)[0] if owner and "." in owner else owner for owner in owners]
        names = parents if None not in parents and "" not in parents and len(set(parents)) == len(set(owners)) \
            else owners
        for call, name in zip(group, names):
            name = name or key or "attention"
            call.site = dataclasses.replace(call.site, path=name, layer=_layer_of(name))


def _is_cross(query: fx.Node, key: fx.Node) -> bool:
    q_in, k_in = _projection_input(base_value(query)), _projection_input(base_value(key))
    return q_in is not None and k_in is not None and q_in is not k_in


# -- the eager pattern -----------------------------------------------------------------------------
def _product_operands(product: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(left, right) factors of a matmul / bmm / baddbmm (whose args[0] is the added input)."""
    if product.target == aten.baddbmm.default:
        return product.args[1], product.args[2]
    return product.args[0], product.args[1]


def _scores_path(scores: fx.Node, softmax: fx.Node) -> list[fx.Node] | None:
    """Nodes from ``q @ k^T`` (first) to the softmax input (last), through score ops only."""
    parents: dict[fx.Node, fx.Node | None] = {scores: None}
    queue = deque([scores])
    while queue:
        current = queue.popleft()
        if current is softmax.args[0]:
            path = [current]
            while parents[path[-1]] is not None:
                path.append(parents[path[-1]])
            return path[::-1]
        if len(parents) > 48:
            return None
        for user in current.users:
            if user not in parents and user.op == "call_function" and user.target in SCORE_OPS \
                    and not is_tagged(user):
                parents[user] = current
                queue.append(user)
    return None


def _probs_path(softmax: fx.Node) -> list[fx.Node] | None:
    """softmax ... ``p @ v``: the softmax, the casts / dropout / views after it, the value product last
    (other readers, such as returned attention weights, are ignored)."""
    path = [softmax]
    current = softmax
    for _ in range(8):
        step = None
        for user in current.users:
            if user.op != "call_function" or is_tagged(user):
                continue
            if user.target in (aten.matmul.default, aten.bmm.default) and user.args[0] is current:
                return path + [user]
            if user.target in PASS_THROUGH | _DROPOUT | VIEWS or \
                    (user.target is operator.getitem and user.args[1] == 0):
                step = user
        if step is None:
            return None
        path.append(step)
        current = step
    return None


def _untranspose(key_t: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """For ``k^T`` written as a transpose / permute of (..., S, D) keys, possibly scaled by a scalar
    afterwards, (the keys, the transpose); else None."""
    node = key_t
    while node.op == "call_function" and node.target in _SCALE:
        others = [a for a in node.args[1:] if isinstance(a, fx.Node)]
        if any(_val(o) is None or _val(o).numel() != 1 for o in others):
            return None
        node = node.args[0]
    if node.op != "call_function":
        return None
    val = _val(node)
    rank = val.dim() if val is not None else 0
    if rank not in (3, 4):
        return None
    if node.target == aten.transpose.int and {node.args[1] % rank, node.args[2] % rank} == {rank - 2, rank - 1}:
        return node.args[0], node
    if node.target == aten.permute.default:
        dims = [d % rank for d in node.args[1]]
        if dims == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return node.args[0], node
    return None


def _heads_source(flat: fx.Node) -> fx.Node | None:
    """The (B, H, S, D) tensor that (B*H, S, D) keys or values are one view / reshape of."""
    node = _skip(base_value(flat), PASS_THROUGH)
    if node.op != "call_function" or node.target not in VIEWS:
        return None
    source = _skip(node.args[0], PASS_THROUGH)
    val, flat_val = _val(source), _val(node)
    if val is None or flat_val is None or val.dim() != 4 or not isinstance(val.shape[1], int):
        return None
    if str(val.shape[3]) != str(flat_val.shape[2]) or str(val.shape[2]) != str(flat_val.shape[1]):
        return None
    return source


def _same_size(a: Any, b: Any) -> bool:
    return str(a) == str(b)


def _products_before(softmax: fx.Node) -> list[fx.Node]:
    """q @ k^T candidates: products reached backwards from the softmax input through score ops."""
    seen, queue, found = {softmax.args[0]}, deque([softmax.args[0]]), []
    while queue and len(seen) < 48:
        current = queue.popleft()
        if current.op != "call_function":
            continue
        if current.target in _PRODUCTS:
            found.append(current)
            continue
        if current.target in SCORE_OPS:
            for item in current.all_input_nodes:
                if item not in seen:
                    seen.add(item)
                    queue.append(item)
    return found


def _eager_call(softmax: fx.Node) -> AttentionCall | None:
    """Match ``softmax(f(q @ k^T)) [dropout] @ v`` around `softmax`; None when it is not attention."""
    val = softmax.meta.get("val")
    if val is None or val.dim() not in (3, 4) or softmax.args[1] % val.dim() != val.dim() - 1:
        return None
    probs = _probs_path(softmax)
    if probs is None:
        return None
    out = probs[-1]
    for scores in _products_before(softmax):
        query, key_t = _product_operands(scores)
        found = _untranspose(key_t)
        if found is None or not _same_size(scores.meta["val"].shape[-1], val.shape[-1]):
            continue
        path = _scores_path(scores, softmax)
        if path is None:
            continue
        key, transpose = found
        value = out.args[1]
        path_name = _module_path(softmax)
        site = Site(path_name, "attention", None, 0, 0, layer=_layer_of(path_name),
                    module_class=_module_class(softmax))
        call = AttentionCall(site, "eager", softmax, query, key, value, transpose, out, path, probs)
        if _val(key) is not None and _val(key).dim() == 3:
            call.heads_source = _heads_source(key)
        call.cross = _is_cross(query, key)
        return call
    return None


def find_attention(gm: fx.GraphModule, index: SiteIndex | None = None) -> list[AttentionCall]:
    """Every attention call of the graph in graph order (graft-inserted nodes skipped)."""
    index = index or SiteIndex.build(gm)
    sdpa_site = {id(node): site for site in index.sites if site.kind == "attention"
                 for node in index.anchors[site.key]}
    calls = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or is_tagged(node):
            continue
        if node.target == _SDPA and id(node) in sdpa_site:
            site = sdpa_site[id(node)]
            query, key, value = node.args[:3]
            call = AttentionCall(site, "sdpa", node, query, key, value, node, node)
            call.cross = _is_cross(query, key)
            calls.append(call)
        elif node.target in _SOFTMAX:
            call = _eager_call(node)
            if call is not None:
                calls.append(call)
    _distinct_sites(calls)
    for call in calls:  # record head dims on the site (SDPA sites carry the query's D already)
        keys = call.keys4.meta.get("val")
        if keys is not None and keys.dim() == 4:
            call.site = dataclasses.replace(call.site, in_features=call.token_dim, out_features=call.token_dim)
    return calls
