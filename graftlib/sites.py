"""Sites: the places in a graph a pass may rewrite, found by op and weight, named by module path.

Discovery is pure: it reads the graph and changes nothing. A site is keyed by its module path (the
weight's owner, relative to the traced root) plus, for fused projections, the part it covers
(``h.0.attn.c_attn[q]``). Node names are never used as ids: they renumber on every trace.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .conv import CONV_OPS, conv_geometry
from .dataflow import column_parts
from .packed import PACKED, weight_rows
from .names import original_path

__all__ = ["Site", "find_sites", "site_from_key", "weight_value", "stored_weight"]

aten = torch.ops.aten

#: ops that only move or view data; walked through when relating projections to attention.
SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default, aten.unsqueeze.default,
    aten.expand.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.alias.default,
}
LINEAR_KINDS = ("linear", "conv1d")
FUSED_NAME = re.compile(r"(c_attn|qkv|qkv_proj|Wqkv|query_key_value|in_proj)$")


@dataclass(frozen=True)
class Site:
    """One rewritable place: a projection, convolution, embedding lookup or attention call."""

    path: str                 # module path that owns the weight, e.g. "encoder.layer.0.attention.self.query"
    kind: str                 # "linear" | "conv1d" (GPT-2 Conv1D) | "conv" (nn.Conv1d/2d/3d) | "embedding" | "attention"
    #                           | "packed" (linears on row blocks of one weight: graftlib/packed.py)
    #                           | "experts" (a 3-D expert stack read one expert at a time: graftlib/experts.py)
    weight: str | None        # get_attr target of the weight
    in_features: int          # input features / channels / vocabulary size
    out_features: int         # output features / channels / embedding dim
    part: str | None = None   # "q" | "k" | "v" for a slice of a fused projection
    span: tuple[int, int] | None = None  # output columns covered by `part` (a contiguous split)
    role: str | None = None   # semantic role: q k v o up down gate embed lm_head
    layer: int | None = None
    module_class: str = ""
    conv: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: output columns covered by `part` when they are not one split's slice (per-head interleaved
    #: q/k/v of GPT-NeoX / BLOOM, Falcon's head groups, Phi3's slices); the site anchors at the
    #: fused projection itself and its branch is scattered into these columns
    columns: tuple[int, ...] | None = field(default=None, compare=False, hash=False)
    fused_out: int | None = None  # the fused projection's output width, for a part given by `columns`
    experts: int = 0              # kind "experts": a 3-D stack (experts, ., .) of per-expert weights (graftlib/experts.py)
    transposed: bool = False      # an expert stack stored (experts, in, out), not (experts, out, in)

    @property
    def key(self) -> str:
        return f"{self.path}[{self.part}]" if self.part else self.path

    def describe(self) -> str:
        part = f"[{self.part} {self.span[0]}:{self.span[1]}]" if self.part and self.span else \
            f"[{self.part} {len(self.columns)} columns]" if self.part and self.columns else ""
        shape = f"{self.in_features}->{self.out_features}"
        role = f" ({self.role})" if self.role else ""
        return f"{self.path}{part}  {self.kind} {shape}{role}"


def _module_class(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return str(list(stack.values())[-1][1]).rsplit(".", 1)[-1]


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def weight_value(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _layer_of(path: str) -> int | None:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else ""


def _has_attr(gm: fx.GraphModule, target: str) -> bool:
    try:
        weight_value(gm, target)
        return True
    except AttributeError:
        return False


def _site_path(gm: fx.GraphModule, node: fx.Node, weight: str) -> str:
    """The calling module's path; differs from the weight's owner for tied weights (T5 embed_tokens)."""
    owner, leaf = _owner(weight), weight.rsplit(".", 1)[-1]
    calling = _module_path(node)
    if calling and calling != owner and _has_attr(gm, f"{calling}.{leaf}"):
        return calling
    return original_path(gm, owner)  # the user's module name, also where it is not a safe attribute name


def _walk_back(node: Any) -> Any:
    while isinstance(node, fx.Node) and node.op == "call_function":
        tag = (node.meta.get("custom") or {}).get("graft") or {}
        if node.target in SHAPE_OPS:
            node = node.args[0]
        elif tag.get("role") == "join":  # a graft join stands for its base value
            node = node.args[tag["base"]]
        else:
            break
    return node


def _passes_through(user: fx.Node, value: fx.Node) -> bool:
    """A graft join whose base is `value` stands for it (sites stay found after grafting)."""
    tag = (user.meta.get("custom") or {}).get("graft") or {}
    return tag.get("role") == "join" and user.args[tag["base"]] is value


def _walk_forward(node: fx.Node) -> list[fx.Node]:
    """Users of `node` reached through shape ops (and graft joins) only."""
    out, frontier = [], [node]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if user.op == "call_function" and (user.target in SHAPE_OPS or _passes_through(user, current)):
                frontier.append(user)
            else:
                out.append(user)
    return out


def _stored(arg: Any) -> Any:
    """A weight argument through graft joins on the weight read (OFT's W', replace's copy) to its get_attr."""
    while isinstance(arg, fx.Node) and arg.op == "call_function":
        tag = (arg.meta.get("custom") or {}).get("graft") or {}
        if tag.get("role") != "join":
            break
        arg = arg.args[tag["base"]]
    return arg


def stored_weight(node: Any) -> str | None:
    """The weight target `node` reads: a get_attr, or a base rewrite's stand-in for one (a quantised
    weight's dequantise subgraph, tagged ``role="weight"``)."""
    node = _stored(node)
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target
    tag = (node.meta.get("custom") or {}).get("graft") or {}
    return tag.get("weight") if tag.get("role") == "weight" else None


def _linear_like(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str, int, int] | None:
    """(kind, weight target, in, out) when `node` is a projection with a stored weight."""
    if node.target == aten.linear.default:
        weight = stored_weight(node.args[1])
        if weight is not None:
            out_f, in_f = weight_value(gm, weight).shape
            return "linear", weight, in_f, out_f
    if node.target in (aten.matmul.default, aten.mm.default) and len(node.args) == 2:
        weight = _transposed_param(node.args[1])   # x @ W.T (+ b): Falcon's FalconLinear
        if weight is not None:
            out_f, in_f = weight_value(gm, weight.target).shape
            return "linear", weight.target, in_f, out_f
    if node.target == aten.addmm.default:
        weight = stored_weight(node.args[2])
        if weight is not None:
            in_f, out_f = weight_value(gm, weight).shape
            return "conv1d", weight, in_f, out_f
    return None


_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int}


def _transposed_param(node: Any) -> fx.Node | None:
    """The 2-D parameter `node` transposes (``W.T``, ``W.t()``, ``W.transpose(0, 1)``), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _TRANSPOSES:
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node) or source.op != "get_attr":
        return None
    value = source.meta.get("val")
    if value is None or len(value.shape) != 2:
        return None
    if node.target == aten.permute.default and list(node.args[1]) not in ([1, 0], [-1, -2]):
        return None
    if node.target == aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    return source


def _fused_parts(anchor: fx.Node, out_features: int) -> list[tuple[str, int, int, fx.Node]]:
    """For a fused q/k/v projection split three ways on its last dim: (part, start, stop, getitem)."""
    for user in _walk_forward(anchor):
        if user.target not in (aten.split.Tensor, aten.split_with_sizes.default):
            continue
        dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
        rank = len(user.args[0].meta["val"].shape) if "val" in user.args[0].meta else None
        if rank is None or dim not in (-1, rank - 1):
            continue
        sizes = user.args[1]
        if isinstance(sizes, int):
            sizes = [sizes] * (out_features // sizes)
        if len(sizes) != 3 or sum(sizes) != out_features:
            continue
        getitems = {g.args[1]: g for g in user.users if g.target is operator.getitem}
        parts, start = [], 0
        for index, (name, size) in enumerate(zip("qkv", sizes)):
            if index in getitems:
                parts.append((name, start, start + size, getitems[index]))
            start += size
        return parts
    return []


def _attention_slot(node: fx.Node, limit: int = 48) -> int | None:
    """Which q/k/v input (0/1/2) of the first SDPA call forward of `node` its values reach."""
    frontier, seen = [node], {node}
    while frontier and len(seen) < limit:
        current = frontier.pop(0)
        for user in current.users:
            if user.target == aten.scaled_dot_product_attention.default:
                for slot in range(3):
                    if user.args[slot] is current:
                        return slot
            elif user not in seen:
                seen.add(user)
                frontier.append(user)
    return None


def _qkv_columns(gm: fx.GraphModule, node: fx.Node, out_f: int) -> list[tuple[str, tuple[int, ...]]]:
    """q/k/v parts of a fused projection cut by views, chunks, selects, slices or indexing.

    The role of each part comes from the attention input it flows into; a model without SDPA
    (eager attention) names them in column order, as every fused layout seen stores them.
    """
    parts = column_parts(gm, node, out_f)
    if len(parts) != 3:
        return []
    parts = sorted(parts, key=lambda p: p[1][0])
    slots = [_attention_slot(part) for part, _ in parts]
    names = ["qkv"[slot] for slot in slots] if sorted(s for s in slots if s is not None) == [0, 1, 2] \
        else list("qkv")
    return [(name, columns) for name, (_, columns) in zip(names, parts)]


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], dict[str, list[fx.Node]]]:
    """Every candidate site of the graph, in graph order, with the nodes it anchors at.

    A module called more than once (shared layers, tied embeddings) is one site with several anchors.
    """
    sites: list[Site] = []
    anchors: dict[str, list[fx.Node]] = {}
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}

    def add(site: Site, node: fx.Node) -> None:
        if site.key not in anchors:
            sites.append(site)
            anchors[site.key] = []
        anchors[site.key].append(node)

    for node in gm.graph.nodes:
        if node.op != "call_function" or (node.meta.get("custom") or {}).get("graft"):
            continue
        linear = _linear_like(gm, node)
        if linear is not None:
            kind, weight, in_f, out_f = linear
            path = _site_path(gm, node, weight)
            common = dict(layer=_layer_of(path), module_class=_module_class(node))
            add(Site(path, kind, weight, in_f, out_f, **common), node)
            split = _fused_parts(node, out_f) if FUSED_NAME.search(path) else []
            for part, start, stop, getitem in split:
                add(Site(path, kind, weight, in_f, stop - start, part, (start, stop), part, **common),
                    getitem)
            if not split:
                for part, columns in _qkv_columns(gm, node, out_f):
                    add(Site(path, kind, weight, in_f, len(columns), part, None, part, columns=columns,
                             fused_out=out_f, **common), node)
        elif node.target == aten.linear.default and weight_rows(node.args[1]) is not None:
            weight = weight_rows(node.args[1])[0]
            out_f, in_f = weight_value(gm, weight).shape
            path = _site_path(gm, node, weight)
            add(Site(path, PACKED, weight, in_f, out_f, layer=_layer_of(path), module_class=_module_class(node)),
                node)
        elif node.target in CONV_OPS and getattr(_stored(node.args[1]), "op", "") == "get_attr":
            weight = _stored(node.args[1]).target
            shape = tuple(weight_value(gm, weight).shape)                # (out, in/g, *kernel)
            conv = conv_geometry(node.args, shape)
            path = _site_path(gm, node, weight)
            add(Site(path, "conv", weight, shape[1] * conv["groups"], shape[0],
                     layer=_layer_of(path), module_class=_module_class(node), conv=conv), node)
        elif node.target == aten.embedding.default and getattr(_stored(node.args[0]), "op", "") == "get_attr":
            weight = _stored(node.args[0]).target
            vocab, dim = weight_value(gm, weight).shape
            source = _walk_back(node.args[1])
            role = "embed" if source in placeholders and "input_ids" in source.name else None
            path = _site_path(gm, node, weight)
            add(Site(path, "embedding", weight, vocab, dim, role=role,
                     layer=_layer_of(path), module_class=_module_class(node)), node)
        elif node.target == aten.scaled_dot_product_attention.default:
            path = _module_path(node)
            query = node.args[0].meta.get("val")
            heads_dim = tuple(query.shape[-1:]) if query is not None else (0,)
            add(Site(path, "attention", None, int(heads_dim[0]), int(heads_dim[0]),
                     layer=_layer_of(path), module_class=_module_class(node)), node)
    return sites, anchors


def site_from_key(sites: list[Site], key: str) -> Site | None:
    return next((s for s in sites if s.key == key), None)
