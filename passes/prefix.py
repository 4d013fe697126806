"""Prefix tuning and P-tuning v2: learned keys and values in front of every self-attention.

At each attention call, with learned per-layer prefixes ``Pk, Pv`` of shape ``(n, H_kv * D)``:

    sdpa(q, k, v, mask)                ->  sdpa(q, [Pk; k], [Pv; v], [1 | mask])
    sdpa(q, k, v, is_causal=True)      ->  sdpa([0; q], [Pk; k], [Pv; v], is_causal=True)[:, :, n:]
    softmax(f(q @ k^T)) @ v            ->  softmax(f(q @ [Pk; k]^T)) @ [Pv; v], f's key-axis operands widened

``[P; k]`` prepends ``P`` (reshaped to ``(B, H_kv, n, D)``, or ``(B*H, n, D)`` for 3-D ``bmm`` attention)
on the key axis (dim -2); ``[1 | mask]`` adds n visible columns on the left of the mask (``True`` for a
boolean mask, ``0.0`` for an additive one). Eager attention is any ``scores -> softmax -> values``
pattern (``passes/prefix_find.py``): matmul / bmm / baddbmm, then scale, masks, biases, ALiBi, tanh
soft-capping, views, in any order. Its key-axis operands (and an SDPA mask) are widened as the eager
model given a cache of n prefix tokens computes them (``passes/prefix_widen.py``): a mask, sliding
window or ALiBi derived from the 2-D attention mask is recomputed from ``[1 ... 1 | mask]`` (BLOOM's
ALiBi puts the prefix at positions 0 .. n-1 and the tokens after it; a sliding window, Gemma2's or
Mistral's, hides prefix keys from queries further than the window, as PEFT's cache does); a learned
relative-position bias (T5, DeBERTa's c2p / p2c, MPNet) is 0 on the prefix columns; views naming the
key length grow by n.

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

from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from graftlib.editor import Editor, escape, graft_tag
from graftlib.errors import GraftError, LoadError
from graftlib.registry import Method, Option, positive, register
from graftlib.select import Selection, SiteIndex, resolve_targets
from graftlib.sites import Site
from graftlib.spec import GraftCall

from .prefix_find import PASS_THROUGH, AttentionCall, arg, find_attention, is_tagged
from .prefix_widen import MAXINT, join_into, widen_mask, widen_scores

if TYPE_CHECKING:
    from graftlib.grafted import Grafted, GraftRecord

__all__ = ["Prefix", "PTuningV2", "AttentionCall", "find_attention", "peft_import", "peft_export"]

aten = torch.ops.aten
ENCODER_KEY = "prefix_encoder"   # store slot of the projection's parameters
POSITIONS_KEY = "positions"      # tag site of the position-offset nodes

#: ops position ids pass through on their way from arange / the position_ids buffer to their consumer
_POSITION_OPS = {aten.add.Tensor, aten.unsqueeze.default, aten.slice.Tensor, aten.expand.default,
                 aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
                 aten.select.int, aten.flatten.using_ints} | PASS_THROUGH


# -- graph building blocks -------------------------------------------------------------------------
def _prefix_heads(editor: Editor, flat: fx.Node, like: fx.Node, call: AttentionCall, n: int) -> fx.Node:
    """(n, H_kv*D) -> (B, H, n, D) -- or (B*H, n, D) when `like` is 3-D -- repeating kv heads the way
    the graph repeats the keys."""
    heads, dim, rep = call.heads, call.head_dim, call.repeat
    flat_like, like = like, (call.keys4 if like.meta["val"].dim() == 3 else like)
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
    if flat_like is not like:  # batch * heads flattened as the graph flattens (B, H, S, D) keys
        rows = editor.call(aten.sym_size.int, flat_like, 0)
        x = editor.call(aten.reshape.default, x, [rows, n, dim])               # (B*H, n, D)
    dtype = like.meta["val"].dtype
    if dtype != flat.meta["val"].dtype:
        x = editor.call(aten.to.dtype, x, dtype)
    return x


def _prepend(editor: Editor, base: fx.Node, user: fx.Node, prefix: fx.Node, n: int) -> fx.Node:
    """[prefix; base] on the sequence dim (-2: (B, H, S, D) or (B*H, S, D)) as two joins (pad, then
    write the prefix rows), rerouting only `user`."""
    dim = base.meta["val"].dim() - 2
    padded = join_into(editor, base, user, aten.constant_pad_nd.default, base, [0, 0, n, 0], 0.0)
    return join_into(editor, padded, user, aten.slice_scatter.default, padded, prefix, dim, 0, n)


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
        val = attention.keys4.meta.get("val")
        if val is None or val.dim() != 4:
            raise call.error(f"attention at {attention.site.path}: keys are neither (B, H, S, D) tensors nor a "
                             "(B*H, S, D) view of them; prefix tuning needs multi-head attention")

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
            widen_scores(editor, call, n)
            return
        node = call.node
        mask = arg(node, 3, "attn_mask", None)
        if isinstance(mask, fx.Node):
            widen_mask(editor, mask, node, True if mask.meta["val"].dtype == torch.bool else 0.0, n)
        with editor.before(node):
            causal = bool(arg(node, 5, "is_causal", False))
            if causal:  # n dummy queries in front keep the top-left causal triangle right
                join_into(editor, call.query, node, aten.constant_pad_nd.default, call.query, [0, 0, n, 0], 0.0)
        if causal:
            editor.join(node, aten.slice.Tensor, node, 2, n, MAXINT)

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
                shared[id(ids)] = join_into(editor, ids, consumer, aten.add.Tensor, ids, n)
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
        if is_tagged(node):
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
                if user in seen or (is_tagged(user) and graft_tag(user).get("prefix") != "positions"):
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
    if not record.config.get("peft_positions") and position_consumers(grafted.base_graph_module):
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
    ``peft_positions=true`` so the graft gives PEFT's outputs (models with position ids to offset: ALiBi and
    relative positions have none, and the ALiBi widening already follows PEFT); PEFT saves a projection already evaluated,
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
    positions = ", peft_positions=true" if position_consumers(gm) else ""
    return f"prefix(n={n}{positions})", tensors
