"""Bottleneck adapters (AdapterHub semantics), inserted wherever the graph has a residual block.

The insertion point is found structurally, never by architecture: from a sublayer's output projection
(role ``o`` for ``attn``, ``down`` for ``ffn``; GPT-2's Conv1D ``c_proj`` included) the pass walks
forward through view / dropout / dtype ops to the residual ``aten.add.Tensor`` that adds the sublayer
output to the block's input, and through a norm or a scale by parameters where one sits before that
add (Gemma2's post-feed-forward RMSNorm, a layer scale, Granite's residual multiplier: ``f`` is then
the value entering the add; a gate computed from the input is not a scale), then looks at the add's
neighbourhood:

    post-LN (BERT family, BART):  a = f + x ;  y = LN(a)   the add's only reader is a norm, and the
                                                           sublayer read x itself
    pre-LN  (GPT-2, Llama, ViT,   a = f + x                x is also read by a norm (LayerNorm or the
             T5, HandPreLN)                                RMSNorm pow/mean/rsqrt/mul pattern) that
                                                           feeds the sublayer: there is no LN after
                                                           the add (the norm after the last block is
                                                           the model's final norm, not the block's)

with ``f`` = the sublayer output exactly as it enters the add (after its dropout), ``x`` = the block's
residual input (the other operand of the add) and ``LN`` = the norm node that reads the add (post-LN
only; the block's own LayerNorm with its own weights). With ``B(u) = scale * Up(act(Down(u)))``:

    kind=pfeiffer  (seq_bn)  LN(f + B(LN(f + x)) + x)      pre-LN: x + f + B(f)
    kind=houlsby             LN(x + f + B(f))              pre-LN: x + f + B(f)
    kind=parallel            LN(x + f + B(x))              pre-LN: x + f + B(x)

The post-LN forms are AdapterHub's ``bottleneck_layer_forward`` (``pre_forward`` / ``Adapter.forward``
/ ``post_forward``). Pre-LN blocks have no LN to apply, and the sequential kinds adapt the sublayer
output ``f`` (the project's pre-LN formula ``h + f + Up(act(Down(f)))``, ``h`` = ``x``); note that
AdapterHub's own code path with ``layer_norm=None`` would feed pfeiffer ``x + f`` instead. Defaults
follow AdapterHub's configs: pfeiffer relu scale 1, houlsby swish scale 1, parallel relu scale 4; the
bottleneck width is ``m`` or ``hidden // reduction`` (reduction 16 when neither is given).

The rewrite, at the residual add ``a`` (or the latest join standing for it):

    a' = join(a, add(a, B(u)))       u = LN(a) | f | x   (pfeiffer post-LN | pfeiffer pre-LN, houlsby | parallel)

``LN(a)`` is a copy of the block's norm node (same weights) read from ``a``; the original norm then
reads ``a'``. Down is kaiming-uniform with zero bias and Up is zero (weight and bias), so ``B = 0``
and the output equals the base exactly at init; deactivating the adapter removes the join and
restores the base graph exactly. Adapters at the same site stack in order (each reads the value the
previous one produced), as AdapterHub's ``Stack``.

Cross-attention output projections (BART ``encoder_attn.out_proj``, T5 ``EncDecAttention.o``) are
left out of ``attn`` unless ``cross=true`` (AdapterHub's ``cross_adapter``, off by default); an
attention is "cross" when its q and k projections read different tensors.

``from="dir"`` starts the adapter from a saved graft (``g.save(dir)``): kind, width, activation and
sites come from the saved config and the saved tensors are the initial values (the directory is read
again when the graft is replayed on a fresh trace, e.g. by ``graftlib.load``).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from graftlib.editor import Editor, graft_tag, is_join, join_chain_end
from graftlib.errors import GraftError, GraftSpecError, LoadError
from graftlib.io import read_config, read_tensors
from graftlib.registry import Method, Option, positive, register
from graftlib.select import Selection, SiteIndex, resolve_targets
from graftlib.sites import SHAPE_OPS, Site, _walk_back, _walk_forward
from graftlib.spec import GraftCall, Target

__all__ = ["Adapter", "Block", "BlockError", "locate_block", "bottleneck_input", "bottleneck_up",
           "bottleneck_spec", "first_user", "is_cross_attention", "adapters_in_graph", "ACTIVATIONS",
           "KINDS"]

aten = torch.ops.aten

ACTIVATIONS = {"relu": aten.relu.default, "gelu": aten.gelu.default, "swish": aten.silu.default,
               "silu": aten.silu.default, "tanh": aten.tanh.default}
#: kind -> (default activation, default scale), as AdapterHub's SeqBn / DoubleSeqBn / ParBn configs
KINDS = {"pfeiffer": ("relu", 1.0), "houlsby": ("swish", 1.0), "parallel": ("relu", 4.0)}
_ALIASES = {"ffn": "down", "mlp": "down", "attn": "o", "attention": "o"}
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default}
_IGNORED = {aten._assert_tensor_metadata.default}
_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
_MAX_STEPS = 8


# -- finding the residual block -----------------------------------------------------------------
class BlockError(GraftError):
    """No residual add after a projection; ``found`` lists the ops walked."""

    def __init__(self, found: list[str], why: str):
        self.found = found
        super().__init__(f"{why}; after the projection: {' -> '.join(found)}")


@dataclass(frozen=True)
class Block:
    """A residual sublayer ``a = f + x`` (then ``LN(a)`` when post-LN), found from its projection."""

    anchor: fx.Node       # the output projection
    f: fx.Node            # the sublayer output as it enters the add
    x: fx.Node            # the residual input (the add's other operand)
    add: fx.Node          # the residual add (a base-graph node)
    norm: fx.Node | None  # post-LN: the norm reading the add; None for pre-LN / no norm
    #: the permutation taking the add's layout to the projection's where ``f`` was permuted back before the
    #: add (ConvNeXt: (B, C, H, W) -> (B, H, W, C)); None when both have the projection's width last
    perm: tuple[int, ...] | None = None
    #: a parallel block (GPT-J, Falcon, GPT-NeoX): the other sublayer's output, added to f before ``x``
    #: (``a = (f + sibling) + x``); None for a sequential block
    sibling: fx.Node | None = None

    @property
    def post_ln(self) -> bool:
        return self.norm is not None


def _is_graft(node: fx.Node) -> bool:
    return graft_tag(node) is not None


def _op_name(node: fx.Node) -> str:
    if node.op == "output":
        return "output"
    return getattr(node.target, "_opname", None) or str(node.target)


def _plain_users(node: fx.Node) -> list[fx.Node]:
    """Users that belong to the model (not inserted by a graft, not shape assertions)."""
    return [u for u in node.users if not _is_graft(u) and u.target not in _IGNORED]


def _is_norm(node: fx.Node) -> bool:
    """A LayerNorm / RMSNorm node, or the first op of the RMSNorm pattern (``pow(x, 2)``)."""
    if node.target in _NORMS:
        return True
    return node.target == aten.pow.Tensor_Scalar and node.args[1] == 2


def _norm_readers(node: fx.Node) -> list[fx.Node]:
    return [u for u in _walk_forward(node) if not _is_graft(u) and u.target not in _IGNORED]


def _residual_operand(add: fx.Node, operand: fx.Node) -> fx.Node | None:
    others = [a for a in add.args if a is not operand]
    if len(others) != 1 or not isinstance(others[0], fx.Node) or others[0].op == "get_attr":
        return None  # x + x, or a bias add: not a residual connection
    other = others[0]
    mine, theirs = operand.meta.get("val"), other.meta.get("val")
    if isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) and mine.dim() != theirs.dim():
        return None
    return other


def locate_block(anchor: fx.Node) -> Block:
    """Walk from a projection to its residual add and classify the block (see the module docstring)."""
    node = join_chain_end(anchor)
    walked = [_op_name(anchor)]
    for _ in range(_MAX_STEPS):
        users = _plain_users(node)
        if len(users) > 1 and (found := _past_norm_or_scale(node, anchor)) is not None:
            f, add, x, perm, sibling = found  # the branches are a norm's (RMSNorm reads its input twice)
            return Block(anchor, f, x, add, _post_norm(add, x, anchor), perm, sibling)
        if len(users) != 1:
            listed = ", ".join(_op_name(u) for u in users) or "nothing"
            raise BlockError(walked + [f"({len(users)} readers: {listed})"],
                             "no residual add: the projection's output branches before any add")
        user = users[0]
        walked.append(_op_name(user))
        if user.target in _ADDS:
            x = _residual_operand(user, node)
            if x is not None and (parallel := _parallel_residual(user, x)) is not None:
                outer, residual = parallel
                return Block(anchor, node, residual, outer, _post_norm(outer, residual, anchor), sibling=x)
            if x is not None and user.target == aten.add.Tensor:
                return Block(anchor, node, x, user, _post_norm(user, x, anchor), _channels_back(node, anchor))
        elif user.target not in SHAPE_OPS and user.target not in _DROPOUTS:
            found = _past_norm_or_scale(node, anchor)
            if found is not None:
                f, add, x, perm, sibling = found
                return Block(anchor, f, x, add, _post_norm(add, x, anchor), perm, sibling)
            break
        node = join_chain_end(user)
    raise BlockError(walked, "no residual add (x + f) where the projection's output enters the block")


_ADDS = {aten.add.Tensor, aten.add_.Tensor}


def _parallel_residual(add: fx.Node, other: fx.Node, limit: int = 512) -> tuple[fx.Node, fx.Node] | None:
    """(outer add, residual x) when ``add = f + other`` is a parallel block's sum of sublayer outputs: its
    value (through dropout / shape ops) is added to an ``x`` that `other` was computed from (Falcon's
    ``x + dropout(mlp + attn)``, GPT-J's ``attn + mlp + x``). In a sequential block the next add's other
    operand is computed from this one, never an ancestor of `other`."""
    node = add
    for _ in range(_MAX_STEPS):
        users = _plain_users(node)
        if len(users) != 1:
            return None
        user = users[0]
        if user.target == aten.add.Tensor:
            x = _residual_operand(user, node)
            return (user, x) if x is not None and x in _ancestors(other, limit) else None
        if user.target not in SHAPE_OPS and user.target not in _DROPOUTS:
            return None
        node = user
    return None


_REGION_OPS = _NORMS | _DROPOUTS | SHAPE_OPS | {
    aten.pow.Tensor_Scalar, aten.mean.dim, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.rsqrt.default, aten.sqrt.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
    aten.type_as.default}
_REGION_NODES = 256


def _parameter_only(node: Any, memo: dict[fx.Node, bool]) -> bool:
    """True for constants and values computed from get_attr nodes alone (``1 + norm.weight``)."""
    if not isinstance(node, fx.Node):
        return True
    if node not in memo:
        memo[node] = node.op == "get_attr" or (
            node.op == "call_function" and all(_parameter_only(i, memo) for i in node.all_input_nodes))
    return memo[node]


def _channels_back(f: fx.Node, anchor: fx.Node) -> tuple[int, ...] | None:
    """For ``f = permute(g, dims)`` moving `g`'s last dim, the projection's width (ConvNeXt's channels-last
    MLP permuted back to channels-first), possibly followed by same-shape ops (a channels-first scale): the
    inverse permutation, taking the add's layout to `g`'s. Found by the permute, not by shapes (C may equal W)."""
    width = getattr(anchor.meta.get("val"), "shape", (None,))[-1]
    shape = getattr(f.meta.get("val"), "shape", None)
    for _ in range(_MAX_STEPS):
        if f is anchor or is_join(f) or f.target == aten.permute.default:   # between the projection and the add
            break
        same = [i for i in f.all_input_nodes if getattr(i.meta.get("val"), "shape", None) == shape
                and i.op != "get_attr"]
        if len(same) != 1:
            return None
        f = same[0]
    g = f.args[0].meta.get("val") if f.target == aten.permute.default else None
    if not isinstance(g, torch.Tensor) or g.shape[-1] != width:
        return None
    dims = [d % g.dim() for d in f.args[1]]
    if dims[-1] == g.dim() - 1:
        return None                                  # the width stays last (a head / window shuffle)
    return tuple(sorted(range(len(dims)), key=dims.__getitem__))


def _past_norm_or_scale(start: fx.Node, anchor: fx.Node
                        ) -> tuple[fx.Node, fx.Node, fx.Node, tuple[int, ...] | None, fx.Node | None] | None:
    """``(f, add, x, perm, sibling)`` when the sublayer output reaches its residual add through a norm (Gemma2's
    post-feed-forward RMSNorm) or a scale by parameters (a layer scale, a residual multiplier): the
    nodes computed from `start` are only norm / scale / shape ops, multiplied by themselves or by
    parameter-only values, until an add whose other operand is not from `start` (the residual ``x``).
    ``f`` is the value entering that add, and keeps the projection's width last, or is a permute of a
    value that does (ConvNeXt's layer scale then channels-first permute: ``perm`` takes it back). A gate
    computed from the input is accepted only where the gated value is then summed with a sibling output
    that is not the residual (Qwen2-MoE's ``sigmoid(gate(h)) * shared_expert(h) + experts(h)``): ``f`` is
    then the whole sum entering the add (the MoE block's output). None otherwise."""
    region, memo = {start}, {}
    gated, sibling = False, None
    node = start.next
    for _ in range(_REGION_NODES):
        if node.op == "output":
            return None
        inside = [i for i in node.all_input_nodes if i in region]
        if inside and not _is_graft(node) and node.target not in _IGNORED:
            if node.target not in _REGION_OPS:
                return None
            outside = [a for a in node.args if a not in region]
            if node.target == aten.add.Tensor and len(inside) == 1 and len(outside) == 1 \
                    and not _parameter_only(outside[0], memo):
                f, x = inside[0], outside[0]
                if gated and x not in _ancestors(anchor, 4096):      # the routed experts' output
                    sibling = x
                    region.add(node)
                    node = node.next
                    continue
                if gated and sibling is None:
                    return None  # a gate computed from the input, then the residual: not a scale
                vals = [n.meta.get("val") for n in (anchor, f, x)]
                if not all(isinstance(v, torch.Tensor) for v in vals):
                    return None
                width, f_val, x_val = vals
                if f_val.dim() != x_val.dim():
                    return None
                perm = _channels_back(f, anchor)
                keeps = perm is not None or f_val.shape[-1] == width.shape[-1]
                return (f, node, x, perm, sibling) if keeps else None
            if node.target in (aten.mul.Tensor, aten.div.Tensor) and not all(_parameter_only(a, memo) for a in outside):
                gated = True  # a gate computed from the input: only a gated shared expert goes on (above)
            region.add(node)
        node = node.next
    return None


def _post_norm(add: fx.Node, x: fx.Node, anchor: fx.Node) -> fx.Node | None:
    """The norm after the add in a post-LN block, else None (pre-LN: the sublayer read a norm of x, or
    normalises on its way from x to the projection, as ConvNeXt's depthwise conv -> LayerNorm)."""
    if any(_is_norm(u) for u in _norm_readers(x)) or _norm_inside(anchor, x):
        return None
    readers = _norm_readers(join_chain_end(add))
    if len(readers) == 1 and _is_norm(readers[0]):
        return readers[0]
    return None


def _norm_inside(anchor: fx.Node, x: fx.Node, limit: int = 24) -> bool:
    """Whether a norm lies on the sublayer's path from its input `x` to the projection `anchor`."""
    frontier, seen = list(anchor.all_input_nodes), set()
    while frontier and len(seen) < limit:
        node = frontier.pop()
        if node is x or node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if _is_norm(node) and x in _ancestors(node, limit):
            return True
        frontier.extend(node.all_input_nodes)
    return False


def _ancestors(node: fx.Node, limit: int) -> set[fx.Node]:
    """Up to `limit` nodes `node` is computed from, nearest first."""
    found, frontier = set(), collections.deque([node])
    while frontier and len(found) < limit:
        for i in frontier.popleft().all_input_nodes:
            if i not in found:
                found.add(i)
                frontier.append(i)
    return found


def _branch_point(block: Block, join_point: fx.Node, kind: str) -> fx.Node:
    """Where the branch is computed: before the join, or, where the sibling's sum overwrites f in place
    (Falcon's ``mlp_output += attn``), before that op, while f is still f."""
    inplace = [u for u in block.f.users if u.target == aten.add_.Tensor and u.args[0] is block.f]
    if inplace and block.norm is None and kind != "parallel":
        return inplace[0]
    return join_point


def first_user(node: fx.Node) -> fx.Node:
    """The earliest node (graph order) that reads `node`: inserting before it keeps the graph valid."""
    users = set(node.users)
    current = node.next
    while current not in users:
        current = current.next
    return current


def _projection_input(node: fx.Node) -> Any:
    return _walk_back(node.args[1] if node.target == aten.addmm.default else node.args[0])


def is_cross_attention(site: Site, index: SiteIndex) -> bool:
    """True for an attention output projection whose attention's q and k read different tensors."""
    if site.role != "o":
        return False
    parts = site.path.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth]) + "."
        inside = [s for s in index.sites if s.path.startswith(prefix) and s.layer == site.layer and not s.part]
        q = [s for s in inside if s.role == "q"]
        k = [s for s in inside if s.role == "k"]
        if q or k:
            if not (q and k):
                return False
            q_in = {id(_projection_input(a)) for s in q for a in index.anchors[s.key]}
            k_in = {id(_projection_input(a)) for s in k for a in index.anchors[s.key]}
            return q_in != k_in
    return False


# -- building the branch -----------------------------------------------------------------------
def bottleneck_spec(config: dict[str, Any]) -> dict[str, Any]:
    """kind / act / scale with the kind's defaults filled in."""
    act, scale = KINDS[config["kind"]]
    return {"kind": config["kind"], "act": config["act"] or act,
            "scale": float(scale if config["scale"] is None else config["scale"])}


def bottleneck_input(editor: Editor, block: Block, kind: str, state: fx.Node) -> fx.Node:
    """The value the bottleneck reads: LN(state) (pfeiffer post-LN), f (houlsby, pre-LN pfeiffer), x (parallel)."""
    if kind == "parallel":
        return block.x
    if kind == "houlsby" or block.norm is None:
        return block.f
    norm = block.norm
    if norm.target not in _NORMS:
        raise GraftError(f"kind=pfeiffer needs the block's post-add norm as one op; {block.add.name} is "
                         f"read by an unfused {_op_name(norm)} pattern: use kind=houlsby or kind=parallel")
    return editor.call(norm.target, state, *norm.args[1:], **norm.kwargs)


def bottleneck_up(editor: Editor, u: fx.Node, params: tuple[fx.Node, fx.Node, fx.Node, fx.Node],
                  act: str, scale: float, role: str = "branch") -> fx.Node:
    """``scale * Up(act(Down(u)))`` from (down W, down b, up W, up b) get_attr nodes."""
    down_w, down_b, up_w, up_b = params
    hidden = editor.call(aten.linear.default, u, down_w, down_b)      # (..., m)
    hidden = editor.call(ACTIVATIONS[act], hidden)
    up = editor.call(aten.linear.default, hidden, up_w, up_b, role=role)  # (..., H)
    if scale != 1.0:
        up = editor.call(aten.mul.Tensor, up, scale, role=role)
    return up


def _kaiming(shape: tuple[int, int]) -> torch.Tensor:
    weight = torch.empty(shape)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


# -- starting from a saved graft ------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _saved_tensors(directory: str, stamp: tuple[int, int]) -> dict[str, torch.Tensor]:
    return read_tensors(directory)


def _read_saved(directory: str) -> dict[str, torch.Tensor]:
    path = Path(directory) / "adapters.safetensors"
    stat = os.stat(path) if path.is_file() else None
    return _saved_tensors(str(Path(directory).resolve()), (stat.st_mtime_ns, stat.st_size) if stat else (0, 0))


def _saved_entry(call: GraftCall, directory: str, name: str) -> dict[str, Any]:
    if not Path(directory).is_dir():
        raise call.option_error("from", f"from={directory!r}: no such directory (save one with g.save(dir))")
    try:
        meta = read_config(directory)
    except LoadError as exc:
        raise call.option_error("from", f"from={directory!r}: {exc}") from None
    entries = [e for e in meta.get("adapters", []) if e.get("method") == "adapter"]
    if not entries:
        found = ", ".join(f"{e['name']} ({e['method']})" for e in meta.get("adapters", [])) or "nothing"
        raise call.option_error("from", f"from={directory!r} holds no bottleneck adapter (it has: {found})")
    if len(entries) == 1:
        return entries[0]
    named = [e for e in entries if e["name"] == name]
    if not named:
        names = ", ".join(e["name"] for e in entries)
        raise call.option_error("from", f"from={directory!r} holds several adapters ({names}); "
                                        "pick one with name=<its name>")
    return named[0]


_SAVED_KEYS = ("kind", "m", "reduction", "act", "scale", "cross")


# -- the method ----------------------------------------------------------------------------------
@register
class Adapter(Method):
    """``adapter(ffn, attn, m=.. | reduction=.., act=.., kind=pfeiffer|houlsby|parallel, scale=..)``."""

    name = "adapter"
    site_kinds = ("linear", "conv1d")
    mergeable = False
    needs_targets = True
    options = {
        "m": Option(None, (int,), positive, help="bottleneck width"),
        "reduction": Option(None, (float,), positive, help="width = hidden // reduction (default 16)"),
        "act": Option(None, (str,), choices=tuple(ACTIVATIONS), help="non-linearity (default: the kind's)"),
        "kind": Option("pfeiffer", (str,), choices=tuple(KINDS), help="adapter placement"),
        "scale": Option(None, (float,), help="multiplies Up's output (default 1; parallel 4)"),
        "cross": Option(False, (bool,), help="also adapt cross-attention outputs (attn)"),
        "from": Option(None, (str,), help="start from the adapter saved in this directory"),
    }

    def configure(self, call: GraftCall, index: SiteIndex | None = None) -> dict[str, Any]:
        probe = call
        if not call.targets and "from" in call.options:  # sites come from the saved adapter
            probe = dataclasses.replace(call, targets=[Target("name", "ffn", call.column)])
        config = super().configure(probe, index)
        if config["from"] is not None:
            self._configure_from(call, config)
        return config

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        if config["m"] is not None and config["reduction"] is not None:
            raise call.option_error("reduction", "give m= (bottleneck width) or reduction= (hidden // "
                                                 "reduction), not both")

    def _configure_from(self, call: GraftCall, config: dict[str, Any]) -> None:
        entry = _saved_entry(call, config["from"], config["name"])
        saved = entry.get("config", {})
        for key in _SAVED_KEYS:
            if key in call.options and call.options[key] != saved.get(key):
                raise call.option_error(key, f"{key}={call.options[key]!r} differs from the saved adapter's "
                                             f"{key}={saved.get(key)!r} in {config['from']!r}; leave it out")
            config[key] = saved.get(key, config[key])
        config["from_adapter"] = entry["name"]
        config["from_sites"] = list(entry.get("sites", []))

    def replay_spec(self, record: Any) -> str | None:
        """``adapter(from=dir)`` replays as the graft it resolved to (its sites by path, the saved
        options), so graftlib.load and re-traces never read `dir` again: it may be gone."""
        config = record.config
        if config.get("from") is None:
            return None
        values = {key: config[key] for key in _SAVED_KEYS if config.get(key) is not None}
        options = ", ".join(f"{key}={str(v).lower() if isinstance(v, bool) else v}" for key, v in values.items())
        targets = ", ".join(f'"{key}"' for key in record.sites)
        return f"adapter({targets}, {options}, name={record.adapter})"

    # -- select ------------------------------------------------------------------------------
    def select(self, call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> Selection:
        if not call.targets and config.get("from_sites") is not None:
            sites = self._saved_sites(call, index, config)
            selection = Selection(call, sites, {config["from"]: [s.key for s in sites]})
        else:
            resolved = self._resolve(call, index, config)
            sites = [s for s in resolved.sites if config["cross"] or not is_cross_attention(s, index)]
            selection = Selection(call, sites, resolved.matched)
            if config.get("from_sites") is not None:
                self._check_same_sites(call, sites, config)
        for site in selection.sites:
            self._check_block(call, site, index, config)
        return selection

    def _resolve(self, call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> Selection:
        """resolve_targets with ffn/mlp meaning the down projection and attn/attention the o projection."""
        targets = [dataclasses.replace(t, text=_ALIASES.get(t.text, t.text)) if t.kind == "name" else t
                   for t in call.targets]
        try:
            return resolve_targets(dataclasses.replace(call, targets=targets), index, self.site_kinds,
                                   config["layers"])
        except GraftSpecError as exc:
            for target in call.targets:
                mapped = _ALIASES.get(target.text)
                if mapped and exc.column == target.column:
                    reason = exc.reason.replace(f"alias {mapped!r}", f"{target.text!r} (its {mapped!r} projection)")
                    stacks = [site.key for site in index.sites if site.kind == "experts"]
                    if mapped == "down" and stacks:
                        reason += (f". Its feed-forward layers are mixtures of experts stored as 3-D stacks "
                                   f"({stacks[0]}, ...) with no 2-D projection leading to the residual add: "
                                   "adapt the experts with lora(experts)")
                    raise GraftSpecError(reason, exc.spec, exc.column) from None
            raise

    @staticmethod
    def _saved_sites(call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> list[Site]:
        keys = set(config["from_sites"])
        sites = [s for s in index.sites if s.key in keys]
        missing = sorted(keys - {s.key for s in sites})
        if missing:
            raise call.option_error("from", f"the adapter saved in {config['from']!r} sits at {missing[:3]}, "
                                            f"which this model lacks; is it the same base model?")
        return sites

    @staticmethod
    def _check_same_sites(call: GraftCall, sites: list[Site], config: dict[str, Any]) -> None:
        chosen, saved = {s.key for s in sites}, set(config["from_sites"])
        if chosen != saved:
            raise call.error(f"the targets select other sites than the adapter saved in {config['from']!r}: "
                             f"only selected {sorted(chosen - saved)[:3]}, only saved {sorted(saved - chosen)[:3]}"
                             "; leave the targets out to use the saved sites")

    @staticmethod
    def _check_block(call: GraftCall, site: Site, index: SiteIndex, config: dict[str, Any]) -> None:
        hidden = site.out_features
        if config["m"] is not None and config["m"] > hidden:
            raise call.option_error("m", f"m={config['m']} is larger than the hidden size {hidden} at "
                                         f"{site.key}: choose m <= {hidden} (or reduction=)")
        for anchor in index.anchors[site.key]:
            try:
                block = locate_block(anchor)
            except BlockError as exc:
                raise call.error(f"adapter cannot graft {site.key} ({site.role or site.kind}): {exc}. "
                                 "Target the output projection of a residual sublayer (ffn, attn)") from None
            if config["kind"] == "pfeiffer" and block.norm is not None and block.norm.target not in _NORMS:
                raise call.option_error("kind", f"kind=pfeiffer at {site.key} needs the post-add norm as one "
                                                f"op, found the {_op_name(block.norm)} pattern: use houlsby or parallel")

    # -- rewrite -----------------------------------------------------------------------------
    @staticmethod
    def width(site: Site, config: dict[str, Any]) -> int:
        if config["m"] is not None:
            return int(config["m"])
        return max(1, int(site.out_features // (config["reduction"] or 16)))

    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        block = locate_block(editor.anchor)
        spec = bottleneck_spec(config)
        hidden, m = site.out_features, self.width(site, config)
        state = join_chain_end(block.add)
        join_point = first_user(state)          # before the branch's own readers of state (LN(state)) exist
        with editor.before(_branch_point(block, join_point, spec["kind"])):
            params = (editor.param("down_weight", self._init(config, site, "down_weight", lambda: _kaiming((m, hidden)))),
                      editor.param("down_bias", self._init(config, site, "down_bias", lambda: torch.zeros(m))),
                      editor.param("up_weight", self._init(config, site, "up_weight", lambda: torch.zeros(hidden, m))),
                      editor.param("up_bias", self._init(config, site, "up_bias", lambda: torch.zeros(hidden))))
            u = bottleneck_input(editor, block, spec["kind"], state)
            if block.perm is not None:                      # channels-first add: B runs channels-last
                u = editor.call(aten.permute.default, u, list(block.perm))
            up = bottleneck_up(editor, u, params, spec["act"], spec["scale"], role="up")
            if block.perm is not None:
                back = sorted(range(len(block.perm)), key=block.perm.__getitem__)
                up = editor.call(aten.permute.default, up, back, role="up")
        with editor.before(join_point):
            join = editor.join(state, aten.add.Tensor, state, up)
        graft_tag(join)["bottleneck"] = {**spec, "m": m, "post_ln": block.post_ln}

    @staticmethod
    def _init(config: dict[str, Any], site: Site, pname: str, default: Any) -> Any:
        directory = config.get("from")
        if directory is None:
            return default

        def load() -> torch.Tensor:
            if not Path(directory).is_dir():
                raise LoadError(f"adapter(from={directory!r}): the directory is gone; this graft is "
                                "replayed from it (restore it, or re-create the graft without from=)")
            key = f"{config['from_adapter']}/{site.key}/{pname}"
            tensors = _read_saved(directory)
            if key not in tensors:
                raise LoadError(f"{directory}: tensor {key!r} is missing; the checkpoint does not match its config")
            return tensors[key].detach().clone().float()
        return load


def adapters_in_graph(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """name -> {"method", "sites": [keys], "spec": bottleneck spec} from the graph's join tags."""
    found: dict[str, dict[str, Any]] = {}
    for node in gm.graph.nodes:
        tag = graft_tag(node)
        if not tag or not is_join(node):
            continue
        entry = found.setdefault(tag["adapter"], {"method": tag["pass"], "sites": [], "spec": None})
        if tag["site"] not in entry["sites"]:
            entry["sites"].append(tag["site"])
        if "bottleneck" in tag:
            entry["spec"] = {k: tag["bottleneck"][k] for k in ("kind", "act", "scale")}
    return found
