"""Prefix tuning and P-tuning v2: learned keys and values in front of every self-attention.

At each attention call, with learned per-layer prefixes ``Pk, Pv`` of shape ``(n, H_kv * D)``:

    sdpa(q, k, v, mask)                ->  sdpa(q, [Pk; k], [Pv; v], [1 | mask])
    sdpa(q, k, v, is_causal=True)      ->  sdpa([0; q], [Pk; k], [Pv; v], is_causal=True)[:, :, n:]
    softmax(q @ k^T * s + m) @ v       ->  softmax(q @ [Pk; k]^T * s + [0 | m]) @ [Pv; v]

``[P; k]`` prepends ``P`` (reshaped to ``(B, H_kv, n, D)``) on the key axis (dim 2); ``[1 | mask]`` adds
n visible columns on the left of the mask (``True`` for a boolean mask, ``0.0`` for an additive one;
each operand that the eager scores meet on their way to the softmax is widened the same way). An
additive bias folded into the mask (T5's relative position bias) is 0 on the prefix columns.

Causal SDPA (``is_causal=True``) aligns its triangle top-left, so keys longer than queries would hide the
prefix. Instead of an explicit mask the rewrite prepends n dummy (zero) queries, keeps ``is_causal``
and drops the dummy rows from the output: real query ``n + i`` sees every prefix key and the real
keys ``<= i`` -- the prefix is visible, attention stays causal over the real tokens, the flag stays as
traced (an explicit mask would have to replace it, which no join can undo), at the cost of n extra
query rows. Every change is a join, so deactivation gives back the base graph exactly. (A prepend is
two joins, ``constant_pad_nd`` then ``slice_scatter``, because a join's base must be a direct argument.)

Grouped-query attention: the prefix has the kv-head count. When the graph repeats kv heads before
the attention (``repeat_kv``: unsqueeze/expand/reshape, or ``repeat_interleave``) the prefix goes
through the same expansion (head ``h`` reads kv head ``h // rep``); with ``enable_gqa`` it is passed
with ``H_kv`` heads as the keys are.

Encoder-decoder models: encoder and decoder self-attention get prefixes; cross-attention (queries
and keys projected from different tensors) is left alone, as PEFT does (it empties the cross-attention
cache). Layer slots follow graph order (encoder layers, then decoder layers).

``projection=true`` computes the prefixes in the graph with PEFT's reparameterisation
``Linear(hidden -> L*2*td)(tanh(Linear(td -> hidden)(E)))``, ``E`` an ``(n, td)`` embedding,
``td = H_kv * D``; ``freeze_for_export`` folds it to constant prefixes. ``peft_positions=true`` adds n
to the position ids that feed absolute position embeddings or rotary embeddings, as PEFT's
past-key-values path does. Parameter layout follows PEFT: slot l's key and value are columns
``[2l*td, (2l+1)*td)`` and ``[(2l+1)*td, (2l+2)*td)`` of PEFT's ``prompt_embeddings``.
"""
from __future__ import annotations

import dataclasses
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from graftlib.editor import Editor, escape, graft_tag, is_join
from graftlib.errors import GraftError, LoadError
from graftlib.registry import Method, Option, positive, register
from graftlib.select import Selection, SiteIndex, resolve_targets
from graftlib.sites import Site, _layer_of, _module_class, _module_path
from graftlib.spec import GraftCall

if TYPE_CHECKING:
    from graftlib.grafted import Grafted, GraftRecord

__all__ = ["Prefix", "PTuningV2", "AttentionCall", "find_attention", "peft_import", "peft_export"]

aten = torch.ops.aten
MAXINT = 9223372036854775807
ENCODER_KEY = "prefix_encoder"   # store slot of the projection's parameters
POSITIONS_KEY = "positions"      # tag site of the position-offset nodes

_SDPA = aten.scaled_dot_product_attention.default
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_PASS_THROUGH = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
                 aten.clone.default, aten.contiguous.default, aten.alias.default, aten.type_as.default}
_DROPOUT = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default}
_SCORE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.where.self,
              aten.where.ScalarOther, aten.where.ScalarSelf, aten.masked_fill.Scalar,
              aten.masked_fill.Tensor} | _PASS_THROUGH
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
#: ops position ids pass through on their way from arange / the position_ids buffer to their consumer
_POSITION_OPS = {aten.add.Tensor, aten.unsqueeze.default, aten.slice.Tensor, aten.expand.default,
                 aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
                 aten.select.int, aten.flatten.using_ints} | _PASS_THROUGH


# -- finding attention calls ---------------------------------------------------------------------
@dataclass
class AttentionCall:
    """One attention computation: an SDPA node, or the eager ``softmax(q k^T ...) v`` pattern."""

    site: Site
    kind: str                       # "sdpa" | "eager"
    node: fx.Node                   # the SDPA node or the softmax node
    query: fx.Node
    key: fx.Node                    # (B, H, Sk, D): the keys as the attention reads them
    value: fx.Node
    key_user: fx.Node               # the node that reads `key` (SDPA, or the transpose feeding q @ k^T)
    value_user: fx.Node             # the node that reads `value`
    scores_path: list[fx.Node] = field(default_factory=list)  # eager: q @ k^T ... softmax input
    cross: bool = False

    @property
    def heads(self) -> int:
        return int(self.key.meta["val"].shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.key.meta["val"].shape[3])

    @property
    def repeat(self) -> int:
        return _kv_repeat(self.key)

    @property
    def token_dim(self) -> int:
        """H_kv * D: the width of one learned key (or value) row."""
        return self.heads // self.repeat * self.head_dim


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _skip(node: Any, ops: set) -> Any:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops:
        node = node.args[0]
    return node


def _base_value(node: fx.Node) -> fx.Node:
    """The model's own value under any adapters' joins (e.g. keys another prefix already extended)."""
    while is_join(node):
        node = node.args[graft_tag(node)["base"]]
    return node


def _kv_repeat(key: fx.Node) -> int:
    """How many query heads share one kv head when the graph repeats kv heads before the attention."""
    node = _skip(_base_value(key), _PASS_THROUGH)
    if node.op == "call_function" and node.target == aten.repeat_interleave.self_int \
            and _arg(node, 2, "dim", None) in (1, -3):
        return int(node.args[1])
    if node.op != "call_function" or node.target not in _VIEWS:
        return 1
    expand = _skip(node.args[0], _PASS_THROUGH)
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
        for arg in current.all_input_nodes:
            if arg not in seen and arg.op == "call_function":
                seen.add(arg)
                queue.append(arg)
    return None


def _projection_input(node: fx.Node) -> fx.Node | None:
    projection = _projection(node)
    if projection is None:
        return None
    if projection.target == aten.addmm.default:
        return _skip(projection.args[1], _VIEWS | _PASS_THROUGH)
    return projection.args[0]


def _key_weight_owner(call: "AttentionCall") -> str | None:
    """The module path owning the key projection's weight (``blocks.0.wk``), if there is one."""
    projection = _projection(_base_value(call.key))
    if projection is None:
        return None
    weight = projection.args[1] if projection.target == aten.linear.default else projection.args[2]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    return str(weight.target).rsplit(".", 1)[0]


def _distinct_sites(calls: list["AttentionCall"]) -> None:
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
    q_in, k_in = _projection_input(_base_value(query)), _projection_input(_base_value(key))
    return q_in is not None and k_in is not None and q_in is not k_in


def _is_tagged(node: fx.Node) -> bool:
    return bool((node.meta.get("custom") or {}).get("graft"))


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
        if len(parents) > 32:
            return None
        for user in current.users:
            if user not in parents and user.op == "call_function" and user.target in _SCORE_OPS:
                parents[user] = current
                queue.append(user)
    return None


def _probs_matmul(softmax: fx.Node) -> fx.Node | None:
    """``matmul(p, v)`` reached from the softmax through casts / dropout (other readers, such as
    returned attention weights, are ignored)."""
    current = softmax
    for _ in range(6):
        step = None
        for user in current.users:
            if user.op != "call_function":
                continue
            if user.target == aten.matmul.default and user.args[0] is current:
                return user
            if user.target in _PASS_THROUGH | _DROPOUT or (user.target is operator.getitem and user.args[1] == 0):
                step = user
        if step is None:
            return None
        current = step
    return None


def _eager_call(softmax: fx.Node) -> AttentionCall | None:
    """Match ``softmax(f(q @ k^T)) [dropout] @ v`` around `softmax`; None when it is not attention."""
    value = softmax.meta.get("val")
    if value is None or value.dim() != 4 or softmax.args[1] not in (-1, 3):
        return None
    out_matmul = _probs_matmul(softmax)
    if out_matmul is None:
        return None
    # backward: softmax input <- score ops <- matmul(q, k^T)
    seen, queue, scores = {softmax.args[0]}, deque([softmax.args[0]]), None
    while queue and len(seen) < 32:
        current = queue.popleft()
        if current.op == "call_function" and current.target == aten.matmul.default:
            scores = current
            break
        if current.op == "call_function" and current.target in _SCORE_OPS:
            for arg in current.all_input_nodes:
                if arg not in seen:
                    seen.add(arg)
                    queue.append(arg)
    if scores is None:
        return None
    path = _scores_path(scores, softmax)
    if path is None:
        return None
    key_t = scores.args[1]
    key = _untranspose(key_t)
    query = scores.args[0]
    path_name = _module_path(softmax)
    site = Site(path_name, "attention", None, 0, 0, layer=_layer_of(path_name), module_class=_module_class(softmax))
    call = AttentionCall(site, "eager", softmax, query, key if key is not None else key_t, out_matmul.args[1],
                         key_t, out_matmul, path)
    call.cross = key is not None and _is_cross(query, key)
    return call


def _untranspose(key_t: fx.Node) -> fx.Node | None:
    """For ``k^T`` written as a transpose/permute of (B, H, S, D) keys, the keys; else None."""
    if key_t.op != "call_function":
        return None
    if key_t.target == aten.transpose.int and {key_t.args[1] % 4, key_t.args[2] % 4} == {2, 3}:
        return key_t.args[0]
    if key_t.target == aten.permute.default and list(key_t.args[1]) in ([0, 1, 3, 2], [0, 1, -1, -2]):
        return key_t.args[0]
    return None


def find_attention(gm: fx.GraphModule, index: SiteIndex | None = None) -> list[AttentionCall]:
    """Every attention call of the graph in graph order (graft-inserted nodes skipped)."""
    index = index or SiteIndex.build(gm)
    sdpa_site = {id(node): site for site in index.sites if site.kind == "attention"
                 for node in index.anchors[site.key]}
    calls = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or _is_tagged(node):
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
        if call.key.meta.get("val") is not None and call.key.meta["val"].dim() == 4:
            call.site = _with_dims(call.site, call.token_dim)
    return calls


def _with_dims(site: Site, width: int) -> Site:
    return dataclasses.replace(site, in_features=width, out_features=width)


# -- graph building blocks -------------------------------------------------------------------------
def _join_into(editor: Editor, base: fx.Node, user: fx.Node, op: Any, *args: Any) -> fx.Node:
    """``editor.join`` that reroutes only `user` (other readers of `base` keep the old value)."""
    others = [u for u in base.users if u is not user]
    node = editor.join(base, op, *args)
    for other in others:
        if other is not node and node in other.all_input_nodes and other not in editor.inserted:
            other.replace_input_with(node, base)
    return node


def _prefix_heads(editor: Editor, flat: fx.Node, like: fx.Node, call: AttentionCall, n: int) -> fx.Node:
    """(n, H_kv*D) -> (B, H, n, D), repeating kv heads the way the graph repeats the keys."""
    heads, dim, rep = call.heads, call.head_dim, call.repeat
    kv_heads = heads // rep
    x = editor.call(aten.reshape.default, flat, [n, kv_heads, dim])          # (n, Hkv, D)
    x = editor.call(aten.permute.default, x, [1, 0, 2])                       # (Hkv, n, D)
    x = editor.call(aten.unsqueeze.default, x, 0)                             # (1, Hkv, n, D)
    batch = editor.call(aten.sym_size.int, like, 0)
    if rep == 1:
        x = editor.call(aten.expand.default, x, [batch, kv_heads, n, dim])    # (B, Hkv, n, D)
    else:
        x = editor.call(aten.unsqueeze.default, x, 2)                         # (1, Hkv, 1, n, D)
        x = editor.call(aten.expand.default, x, [batch, kv_heads, rep, n, dim])
        x = editor.call(aten.reshape.default, x, [batch, heads, n, dim])      # (B, H, n, D)
    dtype = like.meta["val"].dtype
    if dtype != flat.meta["val"].dtype:
        x = editor.call(aten.to.dtype, x, dtype)
    return x


def _prepend(editor: Editor, base: fx.Node, user: fx.Node, prefix: fx.Node, n: int) -> fx.Node:
    """[prefix; base] on dim 2 as two joins (pad, then write the prefix rows), rerouting only `user`."""
    padded = _join_into(editor, base, user, aten.constant_pad_nd.default, base, [0, 0, n, 0], 0.0)
    return _join_into(editor, padded, user, aten.slice_scatter.default, padded, prefix, 2, 0, n)


def _widen(editor: Editor, operand: fx.Node, user: fx.Node, value: Any, n: int) -> None:
    """Add n columns holding `value` on the left of `operand`'s last dim (shared per adapter)."""
    val = operand.meta.get("val")
    if val is None or val.dim() == 0 or (isinstance(val.shape[-1], int) and val.shape[-1] == 1):
        return  # broadcasts over the keys (a scale, a whole-row mask): covers the prefix columns too
    marker = f"widen:{value!r}"
    for existing in operand.users:
        tag = graft_tag(existing)
        if tag and tag.get("adapter") == editor.adapter and tag.get("prefix") == marker:
            user.replace_input_with(operand, existing)
            return
    if val.dtype == torch.bool:
        value = bool(value)
    node = _join_into(editor, operand, user, aten.constant_pad_nd.default, operand, [n, 0], value)
    graft_tag(node)["prefix"] = marker


def _neutral(user: fx.Node, operand: fx.Node, on_path: fx.Node, site: str) -> Any:
    """The value that makes a prefix column of `operand` leave the scores untouched in `user`."""
    target = user.target
    if target in (aten.add.Tensor, aten.sub.Tensor):
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


# -- the method --------------------------------------------------------------------------------
def _slot_columns(slot: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    start = 2 * slot * width
    return (start, start + width), (start + width, start + 2 * width)


def _linear_init(fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    layer = nn.Linear(fan_in, fan_out)
    return layer.weight.detach().clone(), layer.bias.detach().clone()


@register
class Prefix(Method):
    """``prefix(n=20, projection=false, hidden=..., peft_positions=false)``."""

    name = "prefix"
    site_kinds = ("attention",)
    needs_targets = False
    mergeable = False
    options = {
        "n": Option(20, (int,), positive, help="number of virtual tokens (prefix length)"),
        "projection": Option(False, (bool,), help="PEFT's reparameterisation: Embedding -> Linear -> Tanh -> Linear"),
        "hidden": Option(None, (int,), positive, help="projection hidden size (default: H_kv * D)"),
        "peft_positions": Option(False, (bool,), help="offset position ids by n, as PEFT's past-key-values path"),
    }

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        if config.get("hidden") is not None and not config.get("projection"):
            raise call.option_error("hidden", "hidden= only applies with projection=true")

    # -- select ----------------------------------------------------------------------------------
    def select(self, call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> Selection:
        calls = find_attention(index.graph_module, index)
        if not calls:
            raise call.error(
                f"{call.method}(...) found no attention in this model: no aten.scaled_dot_product_attention "
                "call and no matmul-softmax-matmul pattern; prefix tuning needs attention layers")
        own = [c for c in calls if not c.cross]
        if not own:
            raise call.error(f"{call.method}(...) found only cross-attention; prefixes go on self-attention")
        for attention in own:
            self._check(call, attention)
        sites = list({c.site.key: c.site for c in own}.values())
        if call.targets:
            return resolve_targets(call, SiteIndex(index.graph_module, sites, {}), self.site_kinds, config["layers"])
        if config["layers"] is not None:
            sites = [s for s in sites if s.layer in set(config["layers"])]
            if not sites:
                raise call.option_error("layers", f"layers={list(config['layers'])} holds no self-attention")
        return Selection(call, sites, {"(all self-attention)": [s.key for s in sites]})

    @staticmethod
    def _check(call: GraftCall, attention: AttentionCall) -> None:
        val = attention.key.meta.get("val")
        if attention.kind == "eager" and _untranspose(attention.key_user) is None:
            raise call.error(f"eager attention at {attention.site.path}: the keys reach q @ k^T as "
                             f"{attention.key_user.target}, not as a transpose of (B, H, S, D) keys; "
                             "trace the model with attn_implementation='sdpa'")
        if val is None or val.dim() != 4:
            raise call.error(f"attention at {attention.site.path}: keys are not (B, H, S, D) tensors; "
                             "prefix tuning needs 4-d multi-head attention")

    def check_site(self, call: GraftCall, site: Site, config: dict[str, Any]) -> None:
        """Sites are checked in ``select`` (which sees the attention pattern, not only the site)."""

    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        """No per-anchor work: the sites share one prefix encoder and one position offset, so the whole
        rewrite happens in :meth:`rewrite_graph` (which also covers eager attention, absent from the
        engine's anchors)."""

    # -- rewrite -----------------------------------------------------------------------------------
    def rewrite_graph(self, gm: fx.GraphModule, selection: Selection, config: dict[str, Any],
                      index: SiteIndex) -> None:
        n, adapter = config["n"], config["name"]
        slot_of = {site.key: slot for slot, site in enumerate(selection.sites)}
        calls = [c for c in find_attention(gm, index) if c.site.key in slot_of and not c.cross]
        widths = {c.token_dim for c in calls}
        encoder = None
        if config.get("projection"):
            if len(widths) != 1:
                raise selection.call.option_error(
                    "projection", f"projection=true needs one key width for every layer; found {sorted(widths)}")
            encoder = self._encoder(gm, adapter, calls[0], n, widths.pop(), len(selection.sites), config)
        for call in calls:
            editor = Editor(gm, self.name, adapter, call.site, call.node)
            self._rewrite_call(editor, call, slot_of[call.site.key], encoder, n)
        if config.get("peft_positions"):
            self._offset_positions(gm, selection, adapter, n)

    def _encoder(self, gm: fx.GraphModule, adapter: str, first: AttentionCall, n: int, width: int,
                 slots: int, config: dict[str, Any]) -> fx.Node:
        """PEFT's prefix encoder in the graph: tanh(E W0^T + b0) W2^T + b2, (n, slots*2*width)."""
        site = Site(ENCODER_KEY, "attention", None, width, slots * 2 * width)
        editor = Editor(gm, self.name, adapter, site, first.node)
        hidden = config.get("hidden") or width
        w0, b0 = _linear_init(width, hidden)
        w2, b2 = _linear_init(hidden, slots * 2 * width)
        start = next(node for node in gm.graph.nodes if node.op not in ("placeholder", "get_attr"))
        with editor.before(start):
            emb = editor.param("embedding", lambda: torch.randn(n, width))
            h = editor.call(aten.linear.default, emb, editor.param("transform_0_weight", lambda: w0),
                            editor.param("transform_0_bias", lambda: b0))
            h = editor.call(aten.tanh.default, h)
            out = editor.call(aten.linear.default, h, editor.param("transform_2_weight", lambda: w2),
                              editor.param("transform_2_bias", lambda: b2))
        graft_tag(out)["prefix"] = "encoder"
        return out

    def _flat(self, editor: Editor, call: AttentionCall, slot: int, encoder: fx.Node | None,
              n: int) -> tuple[fx.Node, fx.Node]:
        width = call.token_dim
        if encoder is None:
            key = editor.param("key", lambda: torch.randn(n, width))
            value = editor.param("value", lambda: torch.randn(n, width))
        else:
            (k0, k1), (v0, v1) = _slot_columns(slot, width)
            key = editor.call(aten.slice.Tensor, encoder, 1, k0, k1)
            value = editor.call(aten.slice.Tensor, encoder, 1, v0, v1)
        graft_tag(key)["kv_heads"] = call.heads // call.repeat
        return key, value

    def _rewrite_call(self, editor: Editor, call: AttentionCall, slot: int, encoder: fx.Node | None,
                      n: int) -> None:
        with editor.before(call.key_user):
            flat_k, flat_v = self._flat(editor, call, slot, encoder, n)
            _prepend(editor, call.key, call.key_user, _prefix_heads(editor, flat_k, call.key, call, n), n)
        with editor.before(call.value_user):
            _prepend(editor, call.value, call.value_user, _prefix_heads(editor, flat_v, call.value, call, n), n)
        if call.kind == "eager":
            self._widen_scores(editor, call, n)
            return
        node = call.node
        mask = _arg(node, 3, "attn_mask", None)
        with editor.before(node):
            if isinstance(mask, fx.Node):
                _widen(editor, mask, node, True if mask.meta["val"].dtype == torch.bool else 0.0, n)
            causal = bool(_arg(node, 5, "is_causal", False))
            if causal:  # n dummy queries in front keep the top-left causal triangle right
                _join_into(editor, call.query, node, aten.constant_pad_nd.default, call.query, [0, 0, n, 0], 0.0)
        if causal:
            editor.join(node, aten.slice.Tensor, node, 2, n, MAXINT)

    @staticmethod
    def _widen_scores(editor: Editor, call: AttentionCall, n: int) -> None:
        path = call.scores_path
        for previous, node in zip(path, path[1:]):
            for operand in list(node.all_input_nodes):
                if operand is previous:
                    continue
                value = _neutral(node, operand, previous, call.site.path)
                with editor.before(node):
                    _widen(editor, operand, node, value, n)

    # -- positions ---------------------------------------------------------------------------------
    def _offset_positions(self, gm: fx.GraphModule, selection: Selection, adapter: str, n: int) -> None:
        points = position_consumers(gm)
        if not points:
            raise selection.call.option_error(
                "peft_positions",
                "peft_positions=true found no position ids to offset (no absolute position-embedding lookup "
                "or rotary embedding fed by arange / position_ids); this model's positions are relative or "
                "absent, so drop peft_positions")
        site = Site(POSITIONS_KEY, "attention", None, 0, 0)
        shared: dict[int, fx.Node] = {}
        for consumer, ids in points:
            if id(ids) in shared:
                consumer.replace_input_with(ids, shared[id(ids)])
                continue
            editor = Editor(gm, self.name, adapter, site, consumer)
            with editor.before(consumer):
                shared[id(ids)] = _join_into(editor, ids, consumer, aten.add.Tensor, ids, n)
                graft_tag(shared[id(ids)])["prefix"] = "positions"

    # -- export ------------------------------------------------------------------------------------
    def freeze_for_export(self, grafted: "Grafted", record: "GraftRecord") -> None:
        """Fold ``projection=true`` to constant prefixes, in place (PEFT's inference mode).

        The adapter is re-grafted as ``projection=false`` holding the evaluated prefixes, so the graph
        has no encoder left; outputs are unchanged. Without a projection there is nothing to fold.
        """
        if not record.config.get("projection"):
            return
        tensors = prefix_tensors(grafted, record)
        active = grafted.active_adapters
        spec = _spec_text(record, projection=False)
        grafted.delete_adapter(record.adapter)
        grafted.add(spec)
        _install(grafted, record.adapter, tensors)
        grafted.set_active([a for a in active if a in grafted.adapters])


@register
class PTuningV2(Prefix):
    """``ptuning_v2(n=20)``: deep prompts -- prefix tuning without reparameterisation."""

    name = "ptuning_v2"
    options = {key: Prefix.options[key] for key in ("n", "peft_positions")}


# -- positions ---------------------------------------------------------------------------------
def _reaches_inv_freq(node: Any, depth: int = 8) -> bool:
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for current in frontier:
            if not isinstance(current, fx.Node):
                continue
            if current.op == "get_attr" and "inv_freq" in str(current.target):
                return True
            if current.op == "call_function":
                nxt.extend(current.all_input_nodes)
        frontier = nxt
    return False


def _position_sources(gm: fx.GraphModule) -> list[fx.Node]:
    sources = []
    for node in gm.graph.nodes:
        if _is_tagged(node):
            continue
        if node.op == "call_function" and node.target in (aten.arange.default, aten.arange.start,
                                                           aten.arange.start_step):
            sources.append(node)
        elif node.op == "placeholder" and "position_ids" in node.name:  # given by the caller (generate)
            sources.append(node)
        elif node.op == "get_attr" and "position" in str(node.target).rsplit(".", 1)[-1]:
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor) and not value.is_floating_point():
                sources.append(node)
    return sources


def position_consumers(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(consumer, position ids) pairs: absolute position-embedding lookups and rotary embeddings."""
    points: list[tuple[fx.Node, fx.Node]] = []
    for source in _position_sources(gm):
        frontier, seen = [source], {source}
        while frontier:
            current = frontier.pop()
            for user in list(current.users):
                if user in seen or (_is_tagged(user) and graft_tag(user).get("prefix") != "positions"):
                    continue  # graft nodes are not the model's, except other adapters' position offsets
                seen.add(user)
                if user.op != "call_function":
                    continue
                if user.target in _POSITION_OPS and user.args[0] is current and \
                        (user.target != aten.add.Tensor or not isinstance(user.args[1], fx.Node)):
                    frontier.append(user)
                elif user.target == aten.embedding.default and user.args[1] is current:
                    points.append((user, current))
                elif any(_reaches_inv_freq(a) for a in user.all_input_nodes if a is not current):
                    points.append((user, current))
    return list({(id(c), id(p)): (c, p) for c, p in points}.values())


# -- tensors, interop --------------------------------------------------------------------------------
def _kv_heads(grafted: "Grafted", adapter: str) -> dict[str, int]:
    heads = {}
    for node in grafted.graph.nodes:
        tag = graft_tag(node)
        if tag and tag.get("adapter") == adapter and "kv_heads" in tag:
            heads[tag["site"]] = tag["kv_heads"]
    return heads


def prefix_tensors(grafted: "Grafted", record: "GraftRecord") -> dict[str, dict[str, torch.Tensor]]:
    """The (n, H_kv*D) key and value prefixes per site, with a projection evaluated."""
    params = grafted.store.tensors(record.adapter)
    if not record.config.get("projection"):
        return {key: {name: params[key][name].detach().clone() for name in ("key", "value")}
                for key in record.sites}
    enc = params[ENCODER_KEY]
    with torch.no_grad():
        h = torch.tanh(nn.functional.linear(enc["embedding"], enc["transform_0_weight"], enc["transform_0_bias"]))
        out = nn.functional.linear(h, enc["transform_2_weight"], enc["transform_2_bias"])
    width = enc["embedding"].shape[1]
    tensors = {}
    for slot, key in enumerate(record.sites):
        (k0, k1), (v0, v1) = _slot_columns(slot, width)
        tensors[key] = {"key": out[:, k0:k1].clone(), "value": out[:, v0:v1].clone()}
    return tensors


def _install(grafted: "Grafted", adapter: str, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for key, params in tensors.items():
            holder = grafted.store[adapter][escape(key)]
            for name, value in params.items():
                getattr(holder, name).copy_(value)
    grafted._invalidate()


def _target_text(target: Any) -> str:
    if target.kind == "glob":
        return '"' + target.text.replace('"', '\\"') + '"'
    if target.kind == "regex":
        return 're:"' + target.text.replace('"', '\\"') + '"'
    return target.text


def _spec_text(record: "GraftRecord", projection: bool) -> str:
    from graftlib.spec import parse_spec

    call = parse_spec(record.spec)[0]
    items = [_target_text(t) for t in call.targets]
    config = record.config
    items.append(f"n={config['n']}")
    if projection:
        items.append("projection=true")
        if config.get("hidden") is not None:
            items.append(f"hidden={config['hidden']}")
    if config.get("peft_positions"):
        items.append("peft_positions=true")
    layers = config.get("layers")
    if layers is not None:
        items.append(f"layers=[{','.join(str(i) for i in layers)}]")
    items.append(f"name={record.adapter}")
    return f"{record.method}({', '.join(items)})"


_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
               ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS"))


def _task_type(model_class: str) -> str:
    return next((task for suffix, task in _TASK_TYPES if model_class.endswith(suffix)), "FEATURE_EXTRACTION")


def peft_export(grafted: "Grafted", record: "GraftRecord") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's ``adapter_config`` dict and state dict (``prompt_embeddings``) for a prefix adapter."""
    if record.method not in ("prefix", "ptuning_v2"):
        raise GraftError(f"peft_export: adapter {record.adapter!r} is {record.method}, not prefix tuning")
    config = grafted._traced.config
    if getattr(config, "is_encoder_decoder", False):
        raise GraftError("peft_export: PEFT's encoder-decoder prefix layout gives prefixes only to the decoder "
                         "(and drops cross-attention ones); a graft with encoder prefixes has no PEFT equivalent")
    if not record.config.get("peft_positions"):
        raise GraftError(f"peft_export: adapter {record.adapter!r} was grafted without peft_positions=true, but PEFT "
                         "offsets position ids by n; re-graft with peft_positions=true to get the same outputs in PEFT")
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and len(record.sites) != layers:
        raise GraftError(f"peft_export: PEFT prefix tuning covers all {layers} layers; adapter "
                         f"{record.adapter!r} has {len(record.sites)} (drop layers= to export it)")
    tensors = prefix_tensors(grafted, record)
    heads = _kv_heads(grafted, record.adapter)
    widths = {t["key"].shape[1] for t in tensors.values()}
    if len(widths) != 1 or len(set(heads.values())) != 1:
        raise GraftError("peft_export: PEFT needs one key width and head count for every layer")
    width, n = widths.pop(), record.config["n"]
    rows = [torch.cat([tensors[key]["key"], tensors[key]["value"]], dim=1) for key in record.sites]
    embeddings = torch.cat(rows, dim=1).contiguous()  # (n, L * 2 * token_dim)
    peft_config = {
        "peft_type": "PREFIX_TUNING", "task_type": _task_type(grafted._traced.model_class),
        "num_virtual_tokens": n, "token_dim": width, "num_transformer_submodules": 1,
        "num_attention_heads": next(iter(heads.values())), "num_layers": len(record.sites),
        "encoder_hidden_size": record.config.get("hidden") or width,
        "prefix_projection": bool(record.config.get("projection")), "inference_mode": True,
        "init_weights": None, "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": None, "modules_to_save": None, "auto_mapping": None,
    }
    return peft_config, {"prompt_embeddings": embeddings}


def peft_import(config: dict[str, Any], state: dict[str, torch.Tensor],
                model: Any) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """A PEFT prefix-tuning checkpoint as a graftlib spec and per-site ``key`` / ``value`` tensors.

    `model` is the base model (traced here) or a :class:`Grafted` over it. The spec uses
    ``peft_positions=true`` so the graft gives PEFT's outputs; PEFT saves a projection already evaluated,
    so the spec has no projection.
    """
    from graftlib.grafted import Grafted
    from graftlib.trace import trace

    if str(config.get("peft_type", "")).upper() not in ("PREFIX_TUNING", "PEFTTYPE.PREFIX_TUNING"):
        raise LoadError(f"peft_import: peft_type {config.get('peft_type')!r} is not PREFIX_TUNING")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise LoadError("peft_import: encoder-decoder prefix checkpoints (num_transformer_submodules=2) are not "
                        "supported: PEFT gives their prefixes to the decoder only")
    if "prompt_embeddings" not in state:
        raise LoadError(f"peft_import: the state dict has no 'prompt_embeddings' (keys: {sorted(state)[:5]})")
    embeddings = state["prompt_embeddings"]
    n, width, layers = (int(config[k]) for k in ("num_virtual_tokens", "token_dim", "num_layers"))
    if tuple(embeddings.shape) != (n, layers * 2 * width):
        raise LoadError(f"peft_import: prompt_embeddings has shape {tuple(embeddings.shape)}, the config needs "
                        f"({n}, {layers * 2 * width}) = (num_virtual_tokens, num_layers * 2 * token_dim)")
    if isinstance(model, Grafted):
        gm = model.base_graph_module
    elif isinstance(model, fx.GraphModule):
        gm = model
    else:
        gm = trace(model, dynamic=False).graph_module  # only the structure is read
    calls = [c for c in find_attention(gm) if not c.cross]
    sites = list({c.site.key: c for c in calls}.values())
    if len(sites) != layers:
        raise LoadError(f"peft_import: the checkpoint has {layers} layers, the model {len(sites)} self-attention layers")
    heads = int(config.get("num_attention_heads") or 0)
    tensors = {}
    for slot, call in enumerate(sites):
        if call.token_dim != width or (heads and call.heads // call.repeat != heads):
            raise LoadError(f"peft_import: {call.site.path} has {call.heads // call.repeat} kv heads x "
                            f"{call.head_dim} = {call.token_dim}, the checkpoint {heads} heads, token_dim {width}")
        (k0, k1), (v0, v1) = _slot_columns(slot, width)
        tensors[call.site.key] = {"key": embeddings[:, k0:k1].clone(), "value": embeddings[:, v0:v1].clone()}
    return f"prefix(n={n}, peft_positions=true)", tensors
