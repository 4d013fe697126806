"""Graph diff: what the passes inserted, removed and rerouted, site by site.

    diff(base, grafted)                                    ->  GraphDiff
    + encoder.layer.{0-11}.attention.self.query  lora[default]: linear(x,A) -> linear(.,B) -> mul 2.0 -> add

Nodes are identified by provenance, never by node names (they renumber on every trace or export):

- graft-inserted nodes by their tag ``meta["custom"]["graft"]``: (adapter, site, op, occurrence),
- weights by their get_attr target (ONNX: initializer name), inputs by name,
- every other node by aligning, module by module (``nn_module_stack``; ONNX: name scopes), the
  sequence of ops in each module, so two independent traces of one model match node for node.

A node present on both sides whose inputs now come from other nodes is *rerouted* (the consumer of
a join is); one whose constant arguments differ is *changed*; a weight with other values (a merged
module) is listed under *weights*. Changes are grouped by site (module path) and adapter.

Each side may be an ``nn.Module`` (traced with :func:`graftlib.trace`), a :class:`~graftlib.Traced`,
an ``fx.GraphModule``, a :class:`~graftlib.Grafted` (its runtime graph, merged modules included),
an ``onnx.ModelProto`` or a ``.onnx`` path. Graphs are compared in eval mode unless ``training``.
Formats: ``str(d)`` / :meth:`GraphDiff.format_text`, :meth:`~GraphDiff.to_json`,
:meth:`~GraphDiff.to_dot`, :meth:`~GraphDiff.to_html` (one self-contained page, inline SVG).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import html
import json
import operator
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .editor import graft_tag
from .errors import GraftError
from .protocols import is_grafted
from .runtime import specialise
from .sites import weight_value

__all__ = ["diff", "GraphDiff", "SiteDiff", "NodeRef", "ChainItem", "Reroute", "Change", "HIGHLIGHT"]

HIGHLIGHT = "#e8590c"   # inserted nodes in the HTML and DOT drawings
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------
@dataclass
class NodeRef:
    """One node named by provenance: ``id`` is stable across re-traces, ``op`` is the aten target
    (``aten.linear.default``), ``get_attr`` / ``placeholder`` or the ONNX op type."""

    id: str
    op: str
    kind: str                      # "call" | "param" | "input" | "output"
    module: str                    # module path ("" for the root)
    role: str | None = None        # graft role: "branch" | "join" | "param" | ...
    label: str = ""                # short display label, e.g. "linear" or "query.weight"
    shape: str = ""
    inputs: list[str] = field(default_factory=list)


@dataclass
class ChainItem:
    """One drawn step of an inserted branch: ``linear(x,A)``. ``ids`` are its nodes (an ONNX step can
    be several nodes lowered from one aten op); ``inputs`` name other steps, params or context nodes."""

    label: str
    op: str
    ids: list[str]
    inputs: list[str]
    role: str | None = None

    @property
    def key(self) -> str:
        return self.ids[-1]


@dataclass
class Reroute:
    """A node on both sides whose inputs changed: ``was`` / ``now`` are input ids."""

    node: NodeRef
    was: list[str]
    now: list[str]


@dataclass
class Change:
    """A node on both sides with the same inputs but other constant arguments."""

    node: NodeRef
    was: str
    now: str


@dataclass
class SiteDiff:
    """Everything that changed at one site for one adapter (``adapter`` None: untagged changes)."""

    site: str
    adapter: str | None = None
    method: str | None = None
    inserted: list[NodeRef] = field(default_factory=list)
    removed: list[NodeRef] = field(default_factory=list)
    rerouted: list[Reroute] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    chain: list[ChainItem] = field(default_factory=list)
    removed_chain: list[ChainItem] = field(default_factory=list)
    context: list[NodeRef] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The module path (the site key without a fused-projection part such as ``[q]``)."""
        return self.site.split("[", 1)[0]

    @property
    def who(self) -> str:
        if self.adapter is None:
            return ""
        return f"{self.method}[{self.adapter}]" if self.method else f"[{self.adapter}]"

    @property
    def kind(self) -> str:
        if self.inserted and not self.removed:
            return "+"
        if self.removed and not self.inserted:
            return "-"
        return "±" if self.inserted else "~"


@dataclass
class GraphDiff:
    """The difference between two graphs, grouped by site and adapter (see :func:`diff`)."""

    before: str
    after: str
    sites: list[SiteDiff] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)   # path -> {class, ops, op}

    # -- queries -------------------------------------------------------------------------------
    @property
    def inserted(self) -> list[NodeRef]:
        return [n for s in self.sites for n in s.inserted]

    @property
    def removed(self) -> list[NodeRef]:
        return [n for s in self.sites for n in s.removed]

    @property
    def rerouted(self) -> list[Reroute]:
        return [r for s in self.sites for r in s.rerouted]

    @property
    def adapters(self) -> list[str]:
        return list(dict.fromkeys(s.adapter for s in self.sites if s.adapter is not None))

    def by_adapter(self) -> dict[str | None, list[SiteDiff]]:
        out: dict[str | None, list[SiteDiff]] = {}
        for site in self.sites:
            out.setdefault(site.adapter, []).append(site)
        return out

    def site(self, key: str, adapter: str | None = None) -> SiteDiff:
        for s in self.sites:
            if s.site == key and (adapter is None or s.adapter == adapter):
                return s
        raise KeyError(f"no change at site {key!r}" + (f" for adapter {adapter!r}" if adapter else ""))

    def counts(self) -> dict[str, int]:
        return {
            "sites": len({s.site for s in self.sites if s.inserted or s.removed}),
            "adapters": len(self.adapters),
            "inserted": len(self.inserted),
            "removed": len(self.removed),
            "rerouted": len(self.rerouted),
            "changed": sum(len(s.changed) for s in self.sites),
            "weights": sum(len(s.weights) for s in self.sites),
        }

    @property
    def empty(self) -> bool:
        return not self.sites

    def __bool__(self) -> bool:
        return not self.empty

    def __str__(self) -> str:
        return self.format_text()

    # -- formats -------------------------------------------------------------------------------
    def format_text(self, color: bool = False, verbose: bool = False) -> str:
        return _text(self, color=color, verbose=verbose)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "graftlib-diff", "version": FORMAT_VERSION, "summary": self.counts(),
                **dataclasses.asdict(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphDiff":
        if data.get("format") != "graftlib-diff":
            raise GraftError(f"not a graftlib diff (format={data.get('format')!r}); "
                             "write one with GraphDiff.to_json()")
        return cls(data["before"], data["after"], [_site_from_dict(s) for s in data["sites"]],
                   dict(data.get("modules", {})))

    def to_dot(self) -> str:
        return _dot(self)

    def to_html(self, title: str | None = None) -> str:
        return _html(self, title)

    def format(self, fmt: str = "text", color: bool = False, verbose: bool = False) -> str:
        if fmt == "text":
            return self.format_text(color=color, verbose=verbose)
        if fmt == "json":
            return self.to_json() + "\n"
        if fmt == "dot":
            return self.to_dot()
        if fmt == "html":
            return self.to_html()
        raise GraftError(f"unknown diff format {fmt!r}; use text, json, dot or html")


def _site_from_dict(d: dict[str, Any]) -> SiteDiff:
    ref = lambda x: NodeRef(**x)  # noqa: E731
    return SiteDiff(
        site=d["site"], adapter=d["adapter"], method=d["method"],
        inserted=[ref(x) for x in d["inserted"]], removed=[ref(x) for x in d["removed"]],
        rerouted=[Reroute(ref(r["node"]), r["was"], r["now"]) for r in d["rerouted"]],
        changed=[Change(ref(c["node"]), c["was"], c["now"]) for c in d["changed"]],
        weights=list(d["weights"]),
        chain=[ChainItem(**c) for c in d["chain"]],
        removed_chain=[ChainItem(**c) for c in d["removed_chain"]],
        context=[ref(x) for x in d["context"]])


# ---------------------------------------------------------------------------------------------
# Graph views: one neutral node list for fx graphs and ONNX graphs
# ---------------------------------------------------------------------------------------------
@dataclass
class _Node:
    kind: str                       # "call" | "param" | "input" | "output"
    op: str                         # aten target, "get_attr", ONNX op type
    module: str
    inputs: list[int]               # indices of input nodes, in argument order
    args: list[int | str]           # display template: node indices and constant tokens
    consts: str = ""                # constant arguments (for "changed")
    tag: dict[str, Any] | None = None
    target: str = ""                # input name / weight name
    shape: str = ""
    origin: str = ""                # ONNX: the fx node this node was lowered from (display only)
    origin_op: str = ""
    value: str | None = None        # ONNX: scalar value of a Constant node
    join_base: int | None = None    # a join's base value (the main path it re-enters)


@dataclass
class _View:
    title: str
    nodes: list[_Node]
    modules: dict[str, str]                       # path -> class name, first-seen order
    weight: Callable[[str], Any] | None = None    # weight target -> tensor (or bytes)


def _short(op: str) -> str:
    """``aten.linear.default`` -> ``linear``; ``aten.add.Tensor`` -> ``add``; ``Transpose`` stays."""
    parts = op.split(".")
    if len(parts) >= 3 and parts[0] in ("aten", "prims", "quantized", "torchvision"):
        return parts[1]
    if len(parts) == 2 and parts[0] == "aten":
        return parts[1]
    return parts[-1] if op.startswith("_operator.") or op.startswith("operator.") else op


def _op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return str(target)
        if target is operator.getitem:
            return "getitem"
        return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    if node.op == "call_module":
        return f"module:{node.target}"
    if node.op == "call_method":
        return f"method:{node.target}"
    return node.op


_NO_STACK = "_empty_nn_module_stack"


def _stack(node: fx.Node) -> list[tuple[str, str]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in stack.items():
        if _NO_STACK in str(key):
            continue
        path, cls = value[0], value[1]
        out.append((str(path), str(getattr(cls, "__name__", cls)).rsplit(".", 1)[-1]))
    return out


def _const(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        text = format(value, ".6g")
        return text if any(c in text for c in ".einf") else text + ".0"
    if isinstance(value, (list, tuple)):
        inner = ",".join(_const(v) for v in value)
        return f"[{inner}]"
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        return ""
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _flat_nodes(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found


def _fx_template(node: fx.Node, index: dict[fx.Node, int]) -> list[int | str]:
    template: list[int | str] = []
    for arg in node.args:
        nodes = _flat_nodes(arg)
        if isinstance(arg, fx.Node):
            template.append(index[arg])
        elif nodes:
            template.extend(index[n] for n in nodes)
        elif arg is not None:
            template.append(_const(arg))
    for key, value in node.kwargs.items():
        nodes = _flat_nodes(value)
        if nodes:
            template.extend(index[n] for n in nodes)
        elif value is not None:
            template.append(f"{key}={_const(value)}")
    return template


def _fx_module(node: fx.Node, tag: dict[str, Any] | None, stack: list[tuple[str, str]]) -> str:
    if tag and tag.get("site"):
        return str(tag["site"]).split("[", 1)[0]
    if node.op == "get_attr":
        return str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else ""
    return stack[-1][0] if stack else ""


def _join_base(node: fx.Node, tag: dict[str, Any] | None, index: dict[fx.Node, int]) -> int | None:
    if not tag or tag.get("role") != "join" or not isinstance(tag.get("base"), int):
        return None
    base = node.args[tag["base"]] if tag["base"] < len(node.args) else None
    return index[base] if isinstance(base, fx.Node) else None


def _is_guard(node: fx.Node) -> bool:
    """torch.export's input-guard call (``_guards_fn``): a check, not a model op."""
    return node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users


def _fx_view(graph: fx.Graph, owner: nn.Module | None, title: str) -> _View:
    kept = [node for node in graph.nodes if not _is_guard(node)]
    index = {node: i for i, node in enumerate(kept)}
    nodes: list[_Node] = []
    modules: dict[str, str] = {"": ""}
    for node in kept:
        tag = graft_tag(node)
        stack = _stack(node)
        for path, cls in stack:
            if not modules.get(path):
                modules[path] = cls
        kind = {"placeholder": "input", "get_attr": "param", "output": "output"}.get(node.op, "call")
        module = _fx_module(node, tag, stack)
        modules.setdefault(module, "")
        consts = repr(fx.node.map_arg((node.args, node.kwargs), lambda n: "%"))
        nodes.append(_Node(kind=kind, op=_op_name(node), module=module,
                           inputs=[index[n] for n in _flat_nodes((node.args, node.kwargs))],
                           args=_fx_template(node, index), consts=consts, tag=dict(tag) if tag else None,
                           target=str(node.target) if kind in ("param", "input") else "",
                           shape=_shape(node), join_base=_join_base(node, tag, index)))
    weight = (lambda target: weight_value(owner, target)) if owner is not None else None
    return _View(title, nodes, modules, weight)


# -- ONNX --------------------------------------------------------------------------------------
_FX_TARGET = re.compile(r"target=(?:torch\.ops\.)?([\w.]+)")


def _onnx_meta(node: Any) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _onnx_scopes(node: Any, meta: dict[str, str]) -> tuple[list[str], list[str]]:
    """(module paths from the root, their classes) of an ONNX node; the last scope is the fx node."""
    try:
        scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
        classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
        return [str(s) for s in scopes], [str(c).rsplit(".", 1)[-1] for c in classes]
    except (KeyError, ValueError, SyntaxError):
        pass
    if "/" in node.name:  # legacy exporter names: /encoder/layer.0/attention/self/query/MatMul
        parts = [p for p in node.name.split("/") if p]
        paths = ["".join("." + q if i else q for i, q in enumerate(parts[:k])) for k in range(len(parts))]
        return [""] + paths[1:] + [parts[-1]], []
    return ["", node.name], []


def _onnx_value(node: Any) -> str | None:
    from onnx import helper, numpy_helper

    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            array = numpy_helper.to_array(value)
            return _const(array.reshape(-1)[0].item()) if array.size == 1 else None
        if attr.name in ("value_float", "value_int"):
            return _const(value)
    return None


def _onnx_view(model: Any, title: str) -> _View:
    graph = model.graph
    nodes: list[_Node] = []
    producer: dict[str, int] = {}
    modules: dict[str, str] = {"": ""}
    for value in graph.input:
        producer[value.name] = len(nodes)
        nodes.append(_Node("input", "input", "", [], [], target=value.name))
    initializers = {init.name: init for init in graph.initializer}
    for name in initializers:
        producer[name] = len(nodes)
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        nodes.append(_Node("param", "initializer", owner, [], [], target=name))
    for node in graph.node:
        meta = _onnx_meta(node)
        scopes, classes = _onnx_scopes(node, meta)
        for path, cls in zip(scopes[:-1], classes[:-1] or [""] * (len(scopes) - 1)):
            if not modules.get(path):
                modules[path] = cls
        inputs = [producer[i] for i in node.input if i in producer]
        match = _FX_TARGET.search(meta.get("pkg.torch.onnx.fx_node", ""))
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        consts = repr(sorted((a.name, str(a)) for a in node.attribute if a.name != "value"))
        module = scopes[-2] if len(scopes) >= 2 else ""
        modules.setdefault(module, "")
        for out in node.output:
            producer[out] = len(nodes)
        nodes.append(_Node("call", op, module, inputs, list(inputs), consts, origin=scopes[-1],
                           origin_op=match.group(1) if match else "",
                           value=_onnx_value(node) if node.op_type == "Constant" else None))
    outputs = [producer[o.name] for o in graph.output if o.name in producer]
    nodes.append(_Node("output", "output", "", outputs, list(outputs)))
    _onnx_param_modules(nodes)
    return _View(title, nodes, modules, lambda name: _onnx_bytes(initializers[name]))


def _onnx_param_modules(nodes: list[_Node]) -> None:
    """Adapter initializers (``graft.<adapter>.<site>.<param>``) take their first consumer's module."""
    for node in nodes:
        for i in node.inputs:
            param = nodes[i]
            if param.kind == "param" and param.target.startswith("graft.") and not param.tag:
                name = param.target.rsplit(".", 1)[-1]
                param.module = node.module
                param.tag = {"adapter": param.target.split(".")[1], "site": node.module, "role": "param",
                             "param": name, "pass": _method_of(name)}


def _method_of(param: str) -> str | None:
    """The method whose parameter this is, when its name starts with a known method (``lora_A``)."""
    from .registry import _METHODS, _PASS_MODULES

    prefix = param.split("_", 1)[0]
    return prefix if "_" in param and prefix in set(_PASS_MODULES) | set(_METHODS) else None


def _onnx_bytes(init: Any) -> bytes:
    from onnx import numpy_helper

    return init.raw_data if init.raw_data else numpy_helper.to_array(init).tobytes()


def _infer_onnx_tags(view: _View, inserted: list[int]) -> None:
    """ONNX keeps no graft tags: inserted nodes inherit the adapter of the graft initializer they
    read (forward through inserted inputs, then backward to inserted producers such as constants)."""
    members = set(inserted)
    for i in inserted:
        node = view.nodes[i]
        if node.tag is None:
            source = next((view.nodes[j].tag for j in node.inputs if view.nodes[j].tag), None)
            if source is not None:
                node.tag = {"adapter": source["adapter"], "site": node.module, "role": "branch",
                            "pass": source.get("pass")}
    users: dict[int, list[int]] = defaultdict(list)
    for i in inserted:
        for j in view.nodes[i].inputs:
            users[j].append(i)
    for i in reversed(inserted):
        node = view.nodes[i]
        if node.tag is None:
            tagged = [view.nodes[u].tag for u in users[i] if u in members and view.nodes[u].tag]
            if tagged and view.nodes[users[i][0]].module == node.module:
                node.tag = {"adapter": tagged[0]["adapter"], "site": node.module, "role": "branch",
                            "pass": tagged[0].get("pass")}


# -- turning arguments into views ----------------------------------------------------------------
def _is_onnx(side: Any) -> bool:
    if isinstance(side, (str, os.PathLike)):
        return str(side).lower().endswith(".onnx")
    return type(side).__name__ == "ModelProto" and hasattr(side, "graph")


def _load_onnx(side: Any) -> tuple[Any, str]:
    import onnx

    if isinstance(side, (str, os.PathLike)):
        if not os.path.isfile(side):
            raise GraftError(f"{side}: no such ONNX file")
        try:
            return onnx.load(str(side)), os.path.basename(str(side))
        except Exception as exc:  # onnx raises DecodeError and friends
            raise GraftError(f"{side} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    return side, side.graph.name or "onnx model"


def _tagged_adapters(graph: fx.Graph) -> list[str]:
    return list(dict.fromkeys(t["adapter"] for n in graph.nodes if (t := graft_tag(n))))


def _graph_view(graph: fx.Graph, owner: nn.Module, keep: Iterable[str], training: bool, title: str) -> _View:
    graph = specialise(graph, list(keep), training)
    return _fx_view(graph, owner, f"{title} [{'train' if training else 'eval'}]")


def _view(side: Any, training: bool, example_inputs: Any) -> _View:
    from .trace import Traced, trace

    if _is_onnx(side):
        model, title = _load_onnx(side)
        return _onnx_view(model, title)
    if isinstance(side, _View):
        return side
    if is_grafted(side):
        adapters = [f"{r.method}[{r.adapter}]" for r in side.records if r.adapter in side.active_adapters]
        title = f"{side._traced.model_class}" + (" + " + " + ".join(adapters) if adapters else "")
        return _graph_view(side.graph, side.graph_module, side.active_adapters, training, title)
    if isinstance(side, Traced):
        gm = side.graph_module
        return _graph_view(gm.graph, gm, _tagged_adapters(gm.graph), training, side.model_class)
    if isinstance(side, fx.GraphModule):
        return _graph_view(side.graph, side, _tagged_adapters(side.graph), training, type(side).__name__)
    if isinstance(side, nn.Module):
        traced = trace(side, example_inputs)
        gm = traced.graph_module
        return _graph_view(gm.graph, gm, [], training, traced.model_class)
    raise GraftError(f"diff compares models, traced graphs, grafted modules or ONNX files; "
                     f"got {type(side).__name__}")


def _example_inputs(side: Any) -> Any:
    from .trace import Traced

    if is_grafted(side):
        return side._traced.example_inputs
    if isinstance(side, Traced):
        return side.example_inputs
    return None


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------
def _anchor_key(node: _Node) -> tuple | None:
    if node.kind == "input":
        return ("input", node.target)
    if node.kind == "output":
        return ("output",)
    if node.kind == "param":
        return ("param", node.target)
    if node.tag:
        return ("graft", node.tag.get("adapter"), node.tag.get("site"), node.op)
    return None


def _keys(view: _View) -> list[tuple | None]:
    seen: Counter = Counter()
    keys: list[tuple | None] = []
    for node in view.nodes:
        key = _anchor_key(node)
        if key is not None:
            key = key + (seen[key],)
            seen[key[:-1]] += 1
        keys.append(key)
    return keys


def _match(before: _View, after: _View) -> dict[int, int]:
    """after index -> before index for every node present on both sides."""
    bkeys, akeys = _keys(before), _keys(after)
    anchored = {k: i for i, k in enumerate(bkeys) if k is not None}
    pairs = {i: anchored[k] for i, k in enumerate(akeys) if k is not None and k in anchored}
    bmods: dict[str, list[int]] = defaultdict(list)
    amods: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(bkeys):
        if k is None:
            bmods[before.nodes[i].module].append(i)
    for i, k in enumerate(akeys):
        if k is None:
            amods[after.nodes[i].module].append(i)
    for module, aidx in amods.items():
        bidx = bmods.get(module, [])
        matcher = difflib.SequenceMatcher(None, [before.nodes[i].op for i in bidx],
                                          [after.nodes[i].op for i in aidx], autojunk=False)
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                pairs[aidx[block.b + k]] = bidx[block.a + k]
    return pairs


def _ids(view: _View) -> list[str]:
    """Stable, readable ids: ``param:<target>``, ``<adapter>:<site>:<op>#k``, ``<module>:<op>#k``."""
    seen: Counter = Counter()
    ids = []
    for node in view.nodes:
        if node.kind == "input":
            ids.append(f"input:{node.target}")
            continue
        if node.kind == "param":
            ids.append(f"param:{node.target}")
            continue
        if node.kind == "output":
            ids.append("output")
            continue
        tag = node.tag if node.tag and node.tag.get("adapter") is not None and "pass" in node.tag else None
        base = f"{tag['adapter']}:{tag['site']}:{_short(node.op)}" if tag else \
            f"{node.module or '.'}:{_short(node.op)}"
        ids.append(f"{base}#{seen[base]}")
        seen[base] += 1
    return ids


# ---------------------------------------------------------------------------------------------
# Building the diff
# ---------------------------------------------------------------------------------------------
def _group_key(node: _Node) -> tuple[str, str | None, str | None]:
    tag = node.tag
    if tag and tag.get("adapter") is not None:
        return str(tag.get("site") or node.module), str(tag["adapter"]), tag.get("pass")
    return node.module, None, None


class _Builder:
    """Collects per-site changes while walking the matched graphs."""

    def __init__(self, before: _View, after: _View):
        self.before, self.after = before, after
        self.pairs = _match(before, after)
        self.matched_before = set(self.pairs.values())
        self.aids = _ids(after)
        self.bids = self._before_ids()
        self.inserted = [i for i in range(len(after.nodes)) if i not in self.pairs]
        self.removed = [i for i in range(len(before.nodes)) if i not in self.matched_before]
        _infer_onnx_tags(after, self.inserted)
        _infer_onnx_tags(before, self.removed)
        self.groups: dict[tuple, SiteDiff] = {}
        self.order: dict[tuple, float] = {}
        self.members: dict[tuple, list[int]] = defaultdict(list)
        self.removed_members: dict[tuple, list[int]] = defaultdict(list)

    def _before_ids(self) -> list[str]:
        own = _ids(self.before)
        mapped = {b: self.aids[a] for a, b in self.pairs.items()}
        taken = set(self.aids)
        return [mapped.get(i) or (f"{own[i]}~before" if own[i] in taken else own[i])
                for i in range(len(self.before.nodes))]

    def group(self, key: tuple[str, str | None, str | None], position: float) -> SiteDiff:
        if key not in self.groups:
            self.groups[key] = SiteDiff(site=key[0], adapter=key[1], method=key[2])
            self.order[key] = position
        self.order[key] = min(self.order[key], position)
        return self.groups[key]

    def ref(self, view: _View, ids: list[str], i: int) -> NodeRef:
        node = view.nodes[i]
        return NodeRef(id=ids[i], op=node.op, kind=node.kind, module=node.module,
                       role=(node.tag or {}).get("role"), label=_node_label(node), shape=node.shape,
                       inputs=[ids[j] for j in node.inputs])

    def before_positions(self) -> list[float]:
        """Where each before-node would sit in the after graph (for ordering removed sites)."""
        to_after = {b: a for a, b in self.pairs.items()}
        positions, last = [], -1.0
        for i in range(len(self.before.nodes)):
            last = float(to_after[i]) if i in to_after else last
            positions.append(last + 0.5)
        return positions

    def build(self) -> GraphDiff:
        for i in self.inserted:
            key = _group_key(self.after.nodes[i])
            self.group(key, i).inserted.append(self.ref(self.after, self.aids, i))
            self.members[key].append(i)
        positions = self.before_positions()
        for i in self.removed:
            key = _group_key(self.before.nodes[i])
            self.group(key, positions[i]).removed.append(self.ref(self.before, self.bids, i))
            self.removed_members[key].append(i)
        self._matched_changes()
        for key, site in self.groups.items():
            site.chain = _chain(self.after, self.aids, self.members.get(key, []), site)
            site.removed_chain = _chain(self.before, self.bids, self.removed_members.get(key, []), site)
            site.context = self._context(site)
        site_first: dict[str, float] = {}
        for (site, _, _), position in self.order.items():
            site_first[site] = min(site_first.get(site, position), position)
        # at one site, adapters in data-flow order: the one whose branch re-enters first comes first
        last = {k: max(self.members[k], default=self.order[k]) for k in self.groups}
        order = sorted(self.groups, key=lambda k: (site_first[k[0]], last[k]))
        sites = [self.groups[k] for k in order]
        return GraphDiff(self.before.title, self.after.title, sites, self._modules())

    def _matched_changes(self) -> None:
        inserted_key = {i: _group_key(self.after.nodes[i]) for i in self.inserted}
        removed_key = {i: _group_key(self.before.nodes[i]) for i in self.removed}
        for a, b in sorted(self.pairs.items()):
            anode, bnode = self.after.nodes[a], self.before.nodes[b]
            now = [self.aids[j] for j in anode.inputs]
            was = [self.bids[j] for j in bnode.inputs]
            if now != was:
                key = next((inserted_key[j] for j in anode.inputs if j in inserted_key), None) or \
                    next((removed_key[j] for j in bnode.inputs if j in removed_key), None) or _group_key(anode)
                self.group(key, a).rerouted.append(Reroute(self.ref(self.after, self.aids, a), was, now))
            elif anode.consts != bnode.consts and anode.kind == "call":
                self.group(_group_key(anode), a).changed.append(
                    Change(self.ref(self.after, self.aids, a), bnode.consts, anode.consts))
            if anode.kind == "param" and not _same_weight(self.before, self.after, bnode.target, anode.target):
                self.group(_group_key(anode), a).weights.append(anode.target)

    def _context(self, site: SiteDiff) -> list[NodeRef]:
        """Outside nodes the drawings need: inputs of inserted/removed nodes, rerouted consumers."""
        known = {n.id for n in site.inserted + site.removed}
        lookup = {self.aids[i]: (self.after, self.aids, i) for i in range(len(self.after.nodes))}
        for i in range(len(self.before.nodes)):
            lookup.setdefault(self.bids[i], (self.before, self.bids, i))
        wanted = [x for n in site.inserted + site.removed for x in n.inputs] + \
                 [r.node.id for r in site.rerouted]
        out, seen = [], set()
        for node_id in wanted:
            if node_id in known or node_id in seen or node_id not in lookup:
                continue
            seen.add(node_id)
            view, ids, i = lookup[node_id]
            out.append(self.ref(view, ids, i))
        return out

    def _modules(self) -> dict[str, dict[str, Any]]:
        modules: dict[str, dict[str, Any]] = {}
        for view in (self.after, self.before):
            counts: dict[str, Counter] = defaultdict(Counter)
            for node in view.nodes:
                if node.kind == "call" and not node.tag:
                    counts[node.module][_short(node.origin_op or node.op)] += 1
            for path, cls in view.modules.items():
                if path in modules:
                    continue
                ops = counts.get(path, Counter())
                modules[path] = {"class": cls, "ops": sum(ops.values()),
                                 "op": ops.most_common(1)[0][0] if ops else ""}
        return modules


def _same_weight(before: _View, after: _View, btarget: str, atarget: str) -> bool:
    if before.weight is None or after.weight is None:
        return True
    try:
        x, y = before.weight(btarget), after.weight(atarget)
    except (AttributeError, KeyError):
        return True
    if x is y:
        return True
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.device == y.device and x.data_ptr() == y.data_ptr() and x.stride() == y.stride():
            return True
        return bool(torch.equal(x.detach(), y.detach()))
    return x == y


def _node_label(node: _Node) -> str:
    if node.kind == "param" and node.tag and node.tag.get("param"):
        return str(node.tag["param"])
    if node.kind == "param":
        return ".".join(node.target.split(".")[-2:])
    if node.kind == "input":
        return node.target
    if node.kind == "output":
        return "output"
    return _short(node.origin_op or node.op)


# -- chains: the inserted branch as drawn steps ---------------------------------------------------
def _param_token(node: _Node, method: str | None) -> str:
    name = str((node.tag or {}).get("param") or node.target.rsplit(".", 1)[-1])
    if method and name.startswith(method + "_") and len(name) > len(method) + 1:
        return name[len(method) + 1:]
    return name


def _steps(view: _View, members: list[int]) -> list[list[int]]:
    """Inserted nodes grouped into drawn steps (ONNX nodes lowered from one aten op form one step)."""
    steps: list[list[int]] = []
    for i in members:
        node = view.nodes[i]
        if node.kind != "call" or (node.value is not None and node.op == "Constant"):
            continue
        if steps and node.origin and view.nodes[steps[-1][-1]].origin == node.origin:
            steps[-1].append(i)
        else:
            steps.append([i])
    return steps


def _chain(view: _View, ids: list[str], members: list[int], site: SiteDiff) -> list[ChainItem]:
    steps = _steps(view, members)
    step_of = {i: k for k, step in enumerate(steps) for i in step}
    externals: dict[int, str] = {}
    items = []
    for k, step in enumerate(steps):
        tokens: list[tuple[str, str]] = []
        inputs: list[str] = []
        for i in step:
            for arg in _step_args(view, i, step):
                if arg == view.nodes[i].join_base and arg not in step_of:
                    inputs.append(ids[arg])       # the main path this branch re-enters
                    continue
                kind, text, source = _token(view, arg, k, step_of, externals, site)
                if text:
                    tokens.append((kind, text))
                if source is not None:
                    inputs.append(ids[steps[step_of[source]][-1]] if source in step_of else ids[source])
        last = view.nodes[step[-1]]
        if last.origin:  # ONNX: Transpose(A) then MatMul(x, .) reads better as linear(x,A)
            tokens.sort(key=lambda token: token[0] == "param")
        op = _short(last.origin_op or last.op)
        items.append(ChainItem(_step_label(op, tokens), last.origin_op or last.op, [ids[i] for i in step],
                               list(dict.fromkeys(inputs)), (last.tag or {}).get("role")))
    return items


def _step_args(view: _View, i: int, step: list[int]) -> list[int | str]:
    """Arguments of node `i` that come from outside its step."""
    inside = set(step)
    return [a for a in view.nodes[i].args if not (isinstance(a, int) and a in inside)]


def _token(view: _View, arg: int | str, k: int, step_of: dict[int, int], externals: dict[int, str],
           site: SiteDiff) -> tuple[str, str, int | None]:
    """(kind, text, source node) of one argument: kind is prev / ref / param / const / value."""
    if isinstance(arg, str):
        return "const", arg, None
    node = view.nodes[arg]
    if arg in step_of:
        return ("prev", ".", arg) if step_of[arg] == k - 1 else ("ref", f"%{step_of[arg] + 1}", arg)
    if node.kind == "param":
        return "param", _param_token(node, site.method), arg
    if node.value is not None:
        return "const", node.value, None
    if node.kind == "call" and node.tag and node.tag.get("adapter") == site.adapter:
        return "const", "", None      # an inserted helper of this branch without a value
    if arg not in externals:
        stem = "base" if node.module == site.path else "x"
        n = sum(1 for v in externals.values() if v.rstrip("0123456789") == stem)
        externals[arg] = stem if n == 0 else f"{stem}{n + 1}"
    kind = "prev" if externals[arg] == "base" else "ref"
    return kind, externals[arg], arg


def _step_label(op: str, tokens: list[tuple[str, str]]) -> str:
    """``linear(x,A)``; a step that only continues the chain shows its constants: ``mul 2.0``, ``add``."""
    if all(kind in ("prev", "const") for kind, _ in tokens):
        return " ".join([op] + [text for kind, text in tokens if kind == "const"])
    return f"{op}({','.join(text for _, text in tokens)})"


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def diff(before: Any, after: Any, *, training: bool = False, example_inputs: Any = None) -> GraphDiff:
    """What changed from `before` to `after`: inserted, removed and rerouted nodes by site/adapter.

    Each side is an ``nn.Module`` (traced; ``example_inputs`` default to the other side's trace
    inputs), a ``Traced``, an ``fx.GraphModule``, a ``Grafted`` (its runtime graph for the active
    adapters; a merged module too), an ``onnx.ModelProto`` or a ``.onnx`` path. Graphs are compared
    in eval mode (dropout removed) unless ``training=True``.
    """
    if _is_onnx(before) != _is_onnx(after):
        raise GraftError("diff compares an ONNX model with another ONNX model; export both sides "
                         "(base and grafted) to ONNX, or pass both as PyTorch modules")
    bview = _view(before, training, example_inputs if example_inputs is not None else _example_inputs(after))
    aview = _view(after, training, example_inputs if example_inputs is not None else _example_inputs(before))
    for side, other, view in ((before, after, bview), (after, before, aview)):
        base_of = _base_of(side, other)
        if base_of:
            view.title = view.title.replace(type(side).__name__, f"{base_of} (base graph)", 1)
    return _Builder(bview, aview).build()


def _base_of(side: Any, other: Any) -> str | None:
    """The model class when `side` is `other`'s base graph module (a GraphModule sharing its weights)."""
    if not isinstance(side, fx.GraphModule) or not is_grafted(other) or _tagged_adapters(side.graph):
        return None
    targets = [n.target for n in side.graph.nodes if n.op == "get_attr"]
    try:
        shared = bool(targets) and all(weight_value(side, t) is weight_value(other.graph_module, t)
                                       for t in targets[:3])
    except AttributeError:
        return None
    return other._traced.model_class if shared else None


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
_ANSI = {"+": "\x1b[32m", "-": "\x1b[31m", "~": "\x1b[33m", "±": "\x1b[35m", "bold": "\x1b[1m",
         "dim": "\x1b[2m", "reset": "\x1b[0m"}
_LAYER = re.compile(r"(?<![^.])(\d+)(?=\.|$|\[)")


def _paint(text: str, style: str, color: bool) -> str:
    return f"{_ANSI[style]}{text}{_ANSI['reset']}" if color and text else text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _chain_text(chain: list[ChainItem]) -> str:
    return " -> ".join(item.label for item in chain)


def _block_lines(site: SiteDiff, name: str, count: int = 1) -> list[tuple[str, str, str, str]]:
    """(sign, site name, body, counts) lines of one site block (`count` identical sites collapsed)."""
    each = " each" if count > 1 else ""
    times = [f"x{count}"] if count > 1 else []
    who = f"{site.who}: " if site.who else ""
    lines = []
    extra = []
    if site.rerouted:
        extra.append(f"{len(site.rerouted)} rerouted{each}")
    if site.changed:
        extra.append(f"{len(site.changed)} changed{each}")
    if site.inserted:
        counts = ", ".join(times + [f"+{_plural(len(site.inserted), 'node')}{each}"] + extra)
        body = _chain_text(site.chain) or ", ".join(_short(n.op) for n in site.inserted)
        lines.append(("+", name, who + body, counts))
        extra = []
    if site.removed:
        counts = ", ".join(times + [f"-{_plural(len(site.removed), 'node')}{each}"] + extra)
        body = _chain_text(site.removed_chain) or ", ".join(_short(n.op) for n in site.removed)
        lines.append(("-", name, who + body, counts))
        extra = []
    if extra and site.rerouted:
        r = site.rerouted[0]
        now, was = _moved(r)
        lines.append(("~", name, who + f"{_short(r.node.op)} now reads {now} (was {was})",
                      ", ".join(times + extra)))
    elif extra:
        c = site.changed[0]
        lines.append(("~", name, who + f"{_short(c.node.op)} args {c.was} -> {c.now}", ", ".join(times + extra)))
    if site.weights:
        names = ", ".join(w.rsplit(".", 1)[-1] for w in site.weights)
        lines.append(("~", name, f"weights changed: {names}",
                      ", ".join(times + [_plural(len(site.weights), "weight") + each])))
    return lines


def _readable(ids: list[str]) -> str:
    return ", ".join(i.split(":", 1)[-1] if i.startswith("param:") else i for i in ids) or "nothing"


def _moved(r: Reroute) -> tuple[str, str]:
    """The inputs of a rerouted node that changed: (now, was), other inputs left out."""
    if len(r.now) == len(r.was):
        pairs = [(n, w) for n, w in zip(r.now, r.was) if n != w]
        return _readable([n for n, _ in pairs]), _readable([w for _, w in pairs])
    return _readable(r.now), _readable(r.was)


def _signature(site: SiteDiff) -> tuple[str, str] | None:
    """(site with its layer index as {}, block text with that layer's path generalised) for collapsing."""
    match = _LAYER.search(site.site)
    if match is None:
        return None
    prefix = site.site[:match.end()]
    general = site.site[:match.start()] + "{}"
    body = "\n".join("|".join(line) for line in _block_lines(site, ""))
    return general + site.site[match.end():], body.replace(prefix + ".", general + ".")


def _ranges(numbers: list[int]) -> str:
    numbers = sorted(set(numbers))
    parts, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None]):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


def _collapsed(d: GraphDiff) -> list[tuple[SiteDiff, str, int]]:
    """(representative site, display name, number of sites) with identical layers merged."""
    groups: dict[tuple, list[SiteDiff]] = {}
    order: list[tuple] = []
    for site in d.sites:
        sig = _signature(site)
        key = (sig, site.adapter) if sig else (id(site),)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(site)
    out = []
    for key in order:
        sites = groups[key]
        if len(sites) == 1:
            out.append((sites[0], sites[0].site, 1))
            continue
        pattern = key[0][0]
        layers = [int(_LAYER.search(s.site).group(1)) for s in sites]
        out.append((sites[0], pattern.replace("{}", "{" + _ranges(layers) + "}"), len(sites)))
    return out


def _summary(d: GraphDiff) -> str:
    c = d.counts()
    return (f"{_plural(c['sites'], 'site')}, {_plural(c['adapters'], 'adapter')}: +{c['inserted']} inserted, "
            f"-{c['removed']} removed, ~{c['rerouted']} rerouted, {c['changed']} changed, "
            f"{_plural(c['weights'], 'weight')} changed")


def _text(d: GraphDiff, color: bool, verbose: bool) -> str:
    out = [_paint(f"--- {d.before}", "-", color), _paint(f"+++ {d.after}", "+", color)]
    if d.empty:
        out.append("no differences")
    blocks = [(s, s.site, 1) for s in d.sites] if verbose else _collapsed(d)
    width = max((len(name) for _, name, _ in blocks), default=0)
    for site, name, count in blocks:
        for sign, label, body, counts in _block_lines(site, name, count):
            out.append(f"{_paint(sign, sign, color)} {_paint(label.ljust(width), 'bold', color)}  {body}  "
                       f"{_paint('(' + counts + ')', 'dim', color)}")
        if verbose:
            out.extend(_verbose_lines(site, color))
    out.append(_paint(_summary(d), "bold", color))
    return "\n".join(out) + "\n"


def _verbose_lines(site: SiteDiff, color: bool) -> list[str]:
    lines = []
    for sign, nodes in (("+", site.inserted), ("-", site.removed)):
        for n in nodes:
            role = f" {n.role}" if n.role else ""
            inputs = f" <- {', '.join(n.inputs)}" if n.inputs else ""
            lines.append(f"    {_paint(sign, sign, color)} {n.id}  {n.op}{role} {n.shape}{inputs}")
    for r in site.rerouted:
        now, was = _moved(r)
        lines.append(f"    {_paint('~', '~', color)} {r.node.id}  reads {now} (was {was})")
    for c in site.changed:
        lines.append(f"    {_paint('~', '~', color)} {c.node.id}  args {c.was} -> {c.now}")
    return lines


# ---------------------------------------------------------------------------------------------
# DOT
# ---------------------------------------------------------------------------------------------
def _dq(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot(d: GraphDiff) -> str:
    lines = ["digraph graftlib_diff {", "  rankdir=LR;", '  graph [fontname="monospace", fontsize=10];',
             '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10, '
             'fillcolor="#f1f3f5", color="#adb5bd"];', '  edge [color="#868e96"];',
             f"  label={_dq(d.before + '  ->  ' + d.after + '  |  ' + _summary(d))};"]
    names: dict[str, str] = {}

    def name(node_id: str) -> str:
        return names.setdefault(node_id, f"n{len(names)}")

    edges: set[tuple[str, str, str]] = set()
    for k, site in enumerate(d.sites):
        lines.append(f"  subgraph cluster_{k} {{")
        lines.append(f"    label={_dq(site.site + ('  ' + site.who if site.who else ''))}; style=rounded; "
                     'color="#ced4da";')
        _dot_site(site, lines, name, edges)
        lines.append("  }")
    declared = set(names)
    context = {n.id: n for site in d.sites for n in site.context}
    for src, dst, style in sorted(edges):
        for node_id in (src, dst):
            if node_id not in declared:
                declared.add(node_id)
                label = _context_label(context[node_id]) if node_id in context else node_id
                lines.append(f"  {name(node_id)} [label={_dq(label)}];")
        lines.append(f"  {name(src)} -> {name(dst)}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _context_label(node: NodeRef) -> str:
    """``query.linear``: a node outside the site, named by its module's last part and its op."""
    owner = node.module.rsplit(".", 1)[-1]
    return f"{owner}.{node.label}" if owner and node.kind == "call" else node.label


def _dot_site(site: SiteDiff, lines: list[str], name: Callable[[str], str],
              edges: set[tuple[str, str, str]]) -> None:
    params = {n.id: n for n in site.inserted + site.removed if n.kind == "param"}
    for n in params.values():
        fill = "#ffe8cc" if n in site.inserted else "#fff5f5"
        lines.append(f"    {name(n.id)} [label={_dq(n.label)}, fillcolor={_dq(fill)}, color={_dq(HIGHLIGHT)}];")
    for chain, fill, font in ((site.chain, HIGHLIGHT, "white"), (site.removed_chain, "#fff5f5", "#c92a2a")):
        style = "" if chain is site.chain else ', style="rounded,filled,dashed", color="#e03131"'
        for item in chain:
            lines.append(f"    {name(item.key)} [label={_dq(item.label)}, fillcolor={_dq(fill)}, "
                         f"fontcolor={_dq(font)}{style}];")
            for src in item.inputs:
                edges.add((src, item.key, ""))
    keys = {item.key for item in site.chain}
    for r in site.rerouted:
        lines.append(f"    {name(r.node.id)} [label={_dq(r.node.label + ' (rerouted)')}, "
                     'style="rounded,filled,dashed", fillcolor="#e7f5ff", color="#1971c2"];')
        for src in r.now:
            if src in keys or src in params:
                edges.add((src, r.node.id, ' [color="#1971c2"]'))
    for w in site.weights:
        lines.append(f"    {name('weight:' + w)} [label={_dq(w + ' (changed)')}, fillcolor=\"#f3f0ff\", "
                     'color="#7048e8"];')


# ---------------------------------------------------------------------------------------------
# HTML: one page, inline SVG, no external resources
# ---------------------------------------------------------------------------------------------
_FONT = 12.0
_CHAR = 7.23            # DejaVu Sans Mono / Menlo advance at 12px
_PAD = 8.0
_GAP = 6.0
_ROW = 24.0
_MAX_WIDTH = 1340.0
_COLORS = {"removed": "#e03131", "reroute": "#1971c2", "weight": "#7048e8", "ink": "#212529",
           "muted": "#868e96", "line": "#dee2e6", "box": "#f1f3f5"}


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _tw(text: str, size: float = _FONT) -> float:
    return len(text) * _CHAR * size / _FONT


@dataclass
class _Box:
    """A laid-out drawing: size plus a function that renders it at (x, y)."""

    w: float
    h: float
    draw: Callable[[float, float], list[str]]


def _text_el(x: float, y: float, text: str, cls: str = "", size: float = _FONT) -> str:
    size_attr = f' font-size="{size:g}"' if size != _FONT else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}"{size_attr}>{_e(text)}</text>'


def _pill(label: str, cls: str, title: str = "") -> _Box:
    w, h = _tw(label) + 16, 20.0

    def draw(x: float, y: float) -> list[str]:
        tip = f"<title>{_e(title)}</title>" if title else ""
        return [f'<g class="{cls}">{tip}<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                f'rx="10"/>', _text_el(x + 8, y + 14, label), "</g>"]
    return _Box(w, h, draw)


def _label_box(name: str, detail: str, cls: str, title: str = "", min_w: float = 0) -> _Box:
    w = max(min_w, _tw(name) + (_tw(detail, 11) + 14 if detail else 0) + 20)
    h = 22.0

    def draw(x: float, y: float) -> list[str]:
        out = [f'<g class="{cls}"><title>{_e(title or name)}</title>',
               f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="4"/>',
               _text_el(x + 10, y + 15, name, "name")]
        if detail:
            out.append(f'<text x="{x + w - 10:.1f}" y="{y + 15:.1f}" class="detail" font-size="11" '
                       f'text-anchor="end">{_e(detail)}</text>')
        return out + ["</g>"]
    return _Box(w, h, draw)


def _hstack(boxes: list[_Box], gap: float = _GAP, arrows: bool = False) -> _Box:
    step = gap + (10 if arrows else 0)
    w = sum(b.w for b in boxes) + step * max(len(boxes) - 1, 0)
    h = max((b.h for b in boxes), default=0)

    def draw(x: float, y: float) -> list[str]:
        out, cx = [], x
        for k, b in enumerate(boxes):
            if k and arrows:
                mid = y + h / 2
                out.append(f'<path class="arrow" d="M{cx - step + 3:.1f},{mid:.1f} H{cx - 4:.1f}" '
                           'marker-end="url(#arrow)"/>')
            out += b.draw(cx, y + (h - b.h) / 2)
            cx += b.w + step
        return out
    return _Box(w, h, draw)


def _vstack(boxes: list[_Box], gap: float = _GAP) -> _Box:
    w = max((b.w for b in boxes), default=0)
    h = sum(b.h for b in boxes) + gap * max(len(boxes) - 1, 0)

    def draw(x: float, y: float) -> list[str]:
        out, cy = [], y
        for b in boxes:
            out += b.draw(x, cy)
            cy += b.h + gap
        return out
    return _Box(w, h, draw)


def _grid(boxes: list[_Box], max_width: float, gap: float = 10.0) -> _Box:
    cell = max(b.w for b in boxes)
    cols = max(1, min(len(boxes), int((max_width + gap) // (cell + gap))))
    rows = [boxes[i:i + cols] for i in range(0, len(boxes), cols)]
    heights = [max(b.h for b in row) for row in rows]
    w = cols * cell + (cols - 1) * gap
    h = sum(heights) + gap * (len(rows) - 1)

    def draw(x: float, y: float) -> list[str]:
        out, cy = [], y
        for row, rh in zip(rows, heights):
            for k, b in enumerate(row):
                out += b.draw(x + k * (cell + gap), cy)
            cy += rh + gap
        return out
    return _Box(w, h, draw)


def _frame(title: str, detail: str, inner: _Box, depth: int, link: str = "") -> _Box:
    head = 22.0
    w = max(inner.w + 2 * _PAD, _tw(title) + _tw(detail, 11) + 3 * _PAD)
    h = head + inner.h + _PAD

    def draw(x: float, y: float) -> list[str]:
        out = [f'<g class="frame d{min(depth, 3)}"><rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" '
               f'height="{h:.1f}" rx="8"/>', _text_el(x + _PAD, y + 16, title, "ftitle")]
        if detail:
            out.append(_text_el(x + _PAD + _tw(title) + 8, y + 16, detail, "detail", 11))
        out.append("</g>")
        return out + inner.draw(x + _PAD, y + head)
    return _Box(w, h, draw)


class _Tree:
    """The module hierarchy of the after graph, marked where the diff touches it."""

    def __init__(self, d: GraphDiff):
        self.d = d
        self.children: dict[str, list[str]] = defaultdict(list)
        self.ops: dict[str, int] = {}
        self.groups: dict[str, list[tuple[int, SiteDiff]]] = defaultdict(list)
        for k, site in enumerate(d.sites):
            self.groups[site.path].append((k, site))
        paths = list(d.modules) + [s.path for s in d.sites]
        for path in dict.fromkeys(paths):
            self._add(path)
        self.touched = {p for path in self.groups for p in self._ancestors(path)}
        self.total: dict[str, int] = {}
        self._sum("")

    def _add(self, path: str) -> None:
        if path in self.ops:
            return
        self.ops[path] = int(self.d.modules.get(path, {}).get("ops", 0))
        if path:
            parent = self._parent(path)
            self._add(parent)
            self.children[parent].append(path)

    @staticmethod
    def _parent(path: str) -> str:
        return path.rsplit(".", 1)[0] if "." in path else ""

    def _ancestors(self, path: str) -> list[str]:
        out = [path]
        while path:
            path = self._parent(path)
            out.append(path)
        return out

    def _sum(self, path: str) -> int:
        self.total[path] = self.ops[path] + sum(self._sum(c) for c in self.children[path])
        return self.total[path]


def _relative(path: str, parent: str) -> str:
    return path[len(parent) + 1:] if parent and path.startswith(parent + ".") else path


def _ops_text(n: int) -> str:
    return _plural(n, "op")


def _render_module(tree: _Tree, path: str, label: str, depth: int) -> _Box:
    d = tree.d
    cls = d.modules.get(path, {}).get("class", "")
    if path not in tree.touched:
        return _label_box(label, _ops_text(tree.total[path]), "mod", f"{path or d.after}  {cls}")
    kids = tree.children[path]
    if not tree.groups[path] and not tree.ops[path] and len(kids) == 1:
        child = kids[0]
        return _render_module(tree, child, f"{label}.{_relative(child, path)}" if label else child, depth)
    rows: list[_Box] = []
    if tree.groups[path]:
        rows.append(_site_rows(tree, path, label if not kids else "(this module)"))
        if not kids:
            return rows[0]
    rows += _child_rows(tree, path, depth)
    numeric = len(kids) >= 4 and all(_relative(k, path).isdigit() for k in kids)
    inner = _grid(rows, _MAX_WIDTH - 2 * _PAD * (depth + 1)) if numeric else _vstack(rows)
    return _frame(label or cls or "model", cls if label else "", inner, depth)


def _child_rows(tree: _Tree, path: str, depth: int) -> list[_Box]:
    rows: list[_Box] = []
    quiet: list[str] = []
    parent_name = path.rsplit(".", 1)[-1]

    def flush() -> None:
        if quiet:
            names = [_relative(q, path) for q in quiet]
            text = ", ".join(names)
            short = text if len(text) <= 48 else text[:45] + "..."
            rows.append(_label_box(short, _ops_text(sum(tree.total[q] for q in quiet)), "mod",
                                   "\n".join(quiet)))
            quiet.clear()
    for child in tree.children[path]:
        if child in tree.touched:
            flush()
            name = _relative(child, path)
            rows.append(_render_module(tree, child, f"{parent_name}.{name}" if name.isdigit() else name,
                                       depth + 1))
        else:
            quiet.append(child)
    flush()
    if tree.ops[path]:
        rows.append(_label_box("(own ops)", _ops_text(tree.ops[path]), "mod",
                               f"ops called directly in {path or 'the root module'}"))
    return rows


def _site_rows(tree: _Tree, path: str, label: str) -> _Box:
    info = tree.d.modules.get(path, {})
    base = _label_box(label, info.get("op", ""), "site-base", path, min_w=0)
    chips = len({s.who for s in tree.d.sites}) > 1
    lines = [_site_line(k, site, chips) for k, site in tree.groups[path]]
    return _hstack([base, _vstack(lines, 4)], 10)


def _site_line(k: int, site: SiteDiff, chip: bool) -> _Box:
    """One adapter's change at a site: [adapter] (step) -> (step) -> ... +n ~r (who only if several)."""
    parts: list[_Box] = []
    if site.who and chip:
        parts.append(_pill(site.who, "who"))
    steps = [_pill(item.label, "ins", f"{item.op} ({item.role or 'inserted'})") for item in site.chain]
    steps += [_pill(item.label, "rem", f"{item.op} (removed)") for item in site.removed_chain]
    if not steps and site.inserted:
        steps = [_pill(_short(n.op), "ins", n.id) for n in site.inserted]
    if not steps and site.removed:
        steps = [_pill(_short(n.op), "rem", n.id) for n in site.removed]
    chain = _hstack(steps, 4, arrows=True) if steps else None
    badges = []
    if site.inserted:
        badges.append(_pill(f"+{len(site.inserted)}", "count", _plural(len(site.inserted), "inserted node")))
    if site.removed:
        badges.append(_pill(f"-{len(site.removed)}", "rem"))
    if site.rerouted:
        badges.append(_pill(f"~{len(site.rerouted)}", "rer", _plural(len(site.rerouted), "rerouted node") + ": "
                            + ", ".join(r.node.id for r in site.rerouted)))
    if site.changed:
        badges.append(_pill(f"~{len(site.changed)} changed", "rer"))
    if site.weights:
        badges.append(_pill(f"{_plural(len(site.weights), 'weight')} changed", "wt"))
    row = _hstack(parts + ([chain] if chain else []) + badges, 8)

    def draw(x: float, y: float) -> list[str]:
        return [f'<a href="#s{k}" class="site">'] + row.draw(x, y) + ["</a>"]
    return _Box(row.w, row.h, draw)


_SVG_DEFS = ('<defs><marker id="arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" fill="#adb5bd"/></marker></defs>')


def _svg(box: _Box, cls: str) -> str:
    w, h = box.w + 2 * _PAD, box.h + 2 * _PAD
    body = "\n".join(box.draw(_PAD, _PAD))
    return (f'<svg class="{cls}" xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
            f'viewBox="0 0 {w:.0f} {h:.0f}">{_SVG_DEFS}\n{body}\n</svg>')


def _overview(d: GraphDiff) -> str:
    if d.empty:
        return '<p class="none">No differences: the two graphs have the same nodes, inputs and weights.</p>'
    tree = _Tree(d)
    return _svg(_render_module(tree, "", "", 0), "overview")


def _local_graph(site: SiteDiff) -> str:
    """The site's branch, left to right: inputs (grey) -> steps (orange) -> rerouted users (blue);
    adapter parameters sit above the step that reads them, side inputs below."""
    chain = site.chain or site.removed_chain
    kind = "ins" if site.chain else "rem"
    if not chain:
        return ""
    labels: dict[str, tuple[str, str]] = {n.id: (_context_label(n), "ctx") for n in site.context}
    for n in site.inserted + site.removed:
        if n.kind == "param":
            labels[n.id] = (n.label, "prm")
    for item in chain:
        labels[item.key] = (item.label, kind)
    keys = {item.key for item in chain}
    users = [r for r in site.rerouted if any(s in keys for s in r.now)]
    for r in users:
        labels[r.node.id] = (r.node.label + " (rerouted)", "usr")
    edges = [(src, item.key) for item in chain for src in item.inputs if src in labels]
    edges += [(src, r.node.id) for r in users for src in r.now if src in keys]
    return _draw_local(_place(labels, edges, chain, [r.node.id for r in users]), labels, edges)


def _place(labels: dict[str, tuple[str, str]], edges: list[tuple[str, str]], chain: list[ChainItem],
           users: list[str]) -> dict[str, tuple[int, int]]:
    """(column, row) per node: steps and users on row 1, parameters above, side inputs below."""
    preds: dict[str, list[str]] = defaultdict(list)
    succs: dict[str, list[str]] = defaultdict(list)
    for src, dst in edges:
        preds[dst].append(src)
        succs[src].append(dst)
    col: dict[str, int] = {}
    for node_id in [i.key for i in chain] + users:
        col[node_id] = 1 + max((col[p] for p in preds[node_id] if p in col), default=0)
    first = min((col[i.key] for i in chain), default=1)
    taken: set[tuple[int, int]] = {(col[n], 1) for n in col}
    place = {n: (c, 1) for n, c in col.items()}
    for node_id, (_, kind) in labels.items():
        targets = [col[s] for s in succs[node_id] if s in col]
        if node_id in place or not targets:
            continue
        c = max(0, min(targets) - 1)
        row, step = (0, -1) if kind == "prm" else ((1, 1) if min(targets) == first else (2, 1))
        while (c, row) in taken:
            row += step
        taken.add((c, row))
        place[node_id] = (c, row)
    return place


def _draw_local(place: dict[str, tuple[int, int]], labels: dict[str, tuple[str, str]],
                edges: list[tuple[str, str]]) -> str:
    top = min(r for _, r in place.values())
    widths: dict[int, float] = defaultdict(float)
    for node_id, (c, _) in place.items():
        widths[c] = max(widths[c], _tw(labels[node_id][0]) + 16)
    xs, x = {}, _PAD
    for c in range(max(widths) + 1):
        xs[c] = x
        x += widths.get(c, 0) + (44 if c in widths else 0)
    pos = {n: (xs[c], _PAD + (r - top) * 32, _tw(labels[n][0]) + 16) for n, (c, r) in place.items()}
    out = []
    for src, dst in edges:
        if src in pos and dst in pos:
            sx, sy, sw = pos[src]
            dx, dy, _ = pos[dst]
            x1, y1, x2, y2 = sx + sw, sy + 10, dx - 2, dy + 10
            mid = (x1 + x2) / 2
            out.append(f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} '
                       f'{x2:.1f},{y2:.1f}" marker-end="url(#arrow)"/>')
    for node_id, (px, py, pw) in pos.items():
        label, kind = labels[node_id]
        out.append(f'<g class="{kind}"><title>{_e(node_id)}</title><rect x="{px:.1f}" y="{py:.1f}" '
                   f'width="{pw:.1f}" height="20" rx="10"/>{_text_el(px + 8, py + 14, label)}</g>')
    w = x - 44 + _PAD
    h = max(py for _, py, _ in pos.values()) + 20 + _PAD
    return (f'<svg class="local" xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
            f'viewBox="0 0 {w:.0f} {h:.0f}">{_SVG_DEFS}{"".join(out)}</svg>')


def _node_rows(site: SiteDiff) -> str:
    rows = []
    for sign, nodes in (("+", site.inserted), ("-", site.removed)):
        for n in nodes:
            rows.append(f'<tr class="{"i" if sign == "+" else "r"}"><td>{sign}</td><td>{_e(n.id)}</td>'
                        f'<td>{_e(n.op)}</td><td>{_e(n.role or "")}</td><td>{_e(n.shape)}</td>'
                        f'<td>{_e(", ".join(n.inputs))}</td></tr>')
    for r in site.rerouted:
        rows.append(f'<tr class="w"><td>~</td><td>{_e(r.node.id)}</td><td>{_e(r.node.op)}</td><td>rerouted</td>'
                    f'<td>{_e(r.node.shape)}</td><td>now {_e(_moved(r)[0])}<br>was {_e(_moved(r)[1])}'
                    '</td></tr>')
    for c in site.changed:
        rows.append(f'<tr class="w"><td>~</td><td>{_e(c.node.id)}</td><td>{_e(c.node.op)}</td><td>changed</td>'
                    f'<td></td><td>{_e(c.was)} &rarr; {_e(c.now)}</td></tr>')
    for w in site.weights:
        rows.append(f'<tr class="w"><td>~</td><td>{_e(w)}</td><td>weight</td><td>values changed</td>'
                    '<td></td><td></td></tr>')
    head = "<tr><th></th><th>node</th><th>op</th><th>role</th><th>shape</th><th>inputs</th></tr>"
    return f'<table>{head}{"".join(rows)}</table>'


def _site_details(k: int, site: SiteDiff) -> str:
    lines = _block_lines(site, site.site)
    summary = "<br>".join(
        f'<span class="sign s{_e(sign)}">{_e(sign)}</span> <b>{_e(name)}</b> {_e(body)} '
        f'<span class="muted">({_e(counts)})</span>' for sign, name, body, counts in lines)
    return (f'<details class="site" id="s{k}"><summary>{summary}</summary><div class="body">'
            f'{_local_graph(site)}{_node_rows(site)}</div></details>')


def _summary_html(d: GraphDiff) -> str:
    c = d.counts()
    chips = [("sites", c["sites"], ""), ("inserted", c["inserted"], "ins"), ("removed", c["removed"], "rem"),
             ("rerouted", c["rerouted"], "rer"), ("changed", c["changed"], "rer"),
             ("weights changed", c["weights"], "wt")]
    out = "".join(f'<span class="chip {cls}"><b>{n}</b> {_e(name)}</span>' for name, n, cls in chips)
    adapters = ", ".join(d.adapters)
    return out + (f'<span class="chip">adapters: {_e(adapters)}</span>' if adapters else "")


def _compact_html(d: GraphDiff) -> str:
    rows = []
    for site, name, count in _collapsed(d):
        for sign, label, body, counts in _block_lines(site, name, count):
            rows.append(f'<div><span class="sign s{_e(sign)}">{_e(sign)}</span> <b>{_e(label)}</b>  '
                        f'{_e(body)}  <span class="muted">({_e(counts)})</span></div>')
    return f'<div class="compact">{"".join(rows)}</div>' if rows else ""


_CSS = f"""
body{{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:{_COLORS['ink']};
background:#f8f9fa}}
header{{padding:14px 24px 10px;background:#fff;border-bottom:1px solid {_COLORS['line']}}}
h1{{font-size:18px;margin:0 0 4px}} h2{{font-size:15px;margin:18px 0 8px}}
.sides{{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;font-size:12.5px;color:#495057}}
.sides .b{{color:#c92a2a}} .sides .a{{color:#2b8a3e}}
.chips{{margin-top:8px}} .chip{{display:inline-block;margin:0 6px 4px 0;padding:2px 10px;border-radius:12px;
background:#f1f3f5;font-size:12.5px}}
.chip.ins{{background:#fff4e6;color:#d9480f}} .chip.rem{{background:#fff5f5;color:#c92a2a}}
.chip.rer{{background:#e7f5ff;color:#1971c2}} .chip.wt{{background:#f3f0ff;color:#6741d9}}
main{{padding:6px 24px 40px}} .scroll{{overflow-x:auto}}
.legend span{{display:inline-block;margin-right:14px;font-size:12.5px}}
.legend i{{display:inline-block;width:22px;height:12px;border-radius:6px;vertical-align:-1px;margin-right:5px}}
.compact{{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;font-size:12.5px;background:#fff;
border:1px solid {_COLORS['line']};border-radius:8px;padding:8px 12px;white-space:pre-wrap}}
.sign{{font-weight:bold}} .s\\+{{color:#2b8a3e}} .s-{{color:#c92a2a}} .s\\~{{color:#1971c2}} .s±{{color:#862e9c}}
.muted{{color:{_COLORS['muted']}}}
svg text{{font-family:"DejaVu Sans Mono",ui-monospace,Menlo,Consolas,monospace;font-size:12px;fill:#343a40}}
svg .frame rect{{fill:#fff;stroke:#ced4da}} svg .frame.d1 rect{{fill:#fcfcfd}} svg .frame.d2 rect{{fill:#fff}}
svg .frame.d3 rect{{fill:#fcfcfd}} svg .ftitle{{font-weight:bold}} svg .detail{{fill:{_COLORS['muted']}}}
svg .mod rect{{fill:{_COLORS['box']};stroke:#e9ecef}} svg .mod .name{{fill:#495057}}
svg .site-base rect{{fill:#fff;stroke:#868e96}} svg .site-base .name{{font-weight:bold}}
svg .ins rect{{fill:{HIGHLIGHT};stroke:{HIGHLIGHT}}} svg .ins text{{fill:#fff}}
svg .who rect{{fill:#fff4e6;stroke:#ffc078}} svg .who text{{fill:#d9480f}}
svg .count rect{{fill:#fff;stroke:#ffc078}} svg .count text{{fill:#d9480f}}
svg .rem rect{{fill:#fff5f5;stroke:{_COLORS['removed']};stroke-dasharray:4 2}}
svg .rem text{{fill:#c92a2a;text-decoration:line-through}}
svg .rer rect{{fill:#e7f5ff;stroke:#74c0fc}} svg .rer text{{fill:{_COLORS['reroute']}}}
svg .wt rect{{fill:#f3f0ff;stroke:#b197fc}} svg .wt text{{fill:{_COLORS['weight']}}}
svg .ctx rect{{fill:{_COLORS['box']};stroke:#ced4da}}
svg .prm rect{{fill:#fff4e6;stroke:#ffa94d}} svg .prm text{{fill:#d9480f}}
svg .usr rect{{fill:#e7f5ff;stroke:{_COLORS['reroute']};stroke-dasharray:4 2}} svg .usr text{{fill:#1971c2}}
svg .arrow,svg .edge{{stroke:#adb5bd;stroke-width:1.3;fill:none}}
svg a.site:hover rect{{filter:brightness(0.93)}} svg a.site{{cursor:pointer}}
details.site{{background:#fff;border:1px solid {_COLORS['line']};border-radius:8px;margin:0 0 6px;
padding:6px 12px}}
details.site summary{{cursor:pointer;font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;
font-size:12.5px}}
details.site[open]{{border-color:#ffc078}} .body{{overflow-x:auto;padding:8px 0 4px}}
table{{border-collapse:collapse;font:12px ui-monospace,"DejaVu Sans Mono",Menlo,monospace;margin-top:8px}}
td,th{{border-bottom:1px solid #f1f3f5;padding:3px 10px 3px 0;text-align:left;vertical-align:top}}
td:nth-child(5){{white-space:nowrap}}
tr.i td:first-child{{color:{HIGHLIGHT};font-weight:bold}} tr.r td:first-child{{color:#c92a2a}}
tr.w td:first-child{{color:#1971c2}}
button{{font:inherit;font-size:12.5px;padding:2px 10px;margin-left:8px;border:1px solid #ced4da;
border-radius:6px;background:#fff;cursor:pointer}}
.none{{background:#ebfbee;border:1px solid #b2f2bb;border-radius:8px;padding:10px 14px}}
"""

_SCRIPT = """
function openHash(){var e=document.getElementById(location.hash.slice(1));
if(e&&e.tagName==='DETAILS'){e.open=true;e.scrollIntoView({block:'start'});}}
window.addEventListener('hashchange',openHash);openHash();
function setAll(v){document.querySelectorAll('details.site').forEach(function(d){d.open=v;});}
"""


def _html(d: GraphDiff, title: str | None) -> str:
    title = title or f"graftlib diff: {d.after}"
    whos = {s.who for s in d.sites}
    by = f" by {next(iter(whos))}" if len(whos) == 1 and next(iter(whos)) else ""
    legend = (f'<div class="legend"><span><i style="background:{HIGHLIGHT}"></i>inserted{_e(by)}</span>'
              '<span><i style="background:#fff5f5;border:1px dashed #e03131"></i>removed</span>'
              '<span><i style="background:#e7f5ff;border:1px solid #74c0fc"></i>rerouted</span>'
              '<span><i style="background:#f1f3f5;border:1px solid #e9ecef"></i>unchanged module '
              '(collapsed)</span><span class="muted">click a site to expand it</span></div>')
    sites = "".join(_site_details(k, s) for k, s in enumerate(d.sites))
    buttons = ('<button onclick="setAll(true)">expand all</button>'
               '<button onclick="setAll(false)">collapse all</button>') if d.sites else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head>
<body><header><h1>{_e(title)}</h1>
<div class="sides"><span class="b">--- {_e(d.before)}</span><br><span class="a">+++ {_e(d.after)}</span></div>
<div class="chips">{_summary_html(d)}</div></header>
<main><h2>Changes</h2>{_compact_html(d) or '<p class="muted">none</p>'}
<h2>Graph</h2>{legend}
<div class="scroll">{_overview(d)}</div>
<h2>Sites{buttons}</h2>{sites or '<p class="muted">none</p>'}
</main><script>{_SCRIPT}</script></body></html>
"""
