"""Graph views: one neutral node list for fx graphs and ONNX graphs, and the sides of a diff as views.

An fx node keeps its graft tag (``meta["custom"]["graft"]``), module stack and shape; an ONNX node its
name scopes and the fx node it was lowered from. ONNX keeps no graft tags: inserted nodes inherit the
adapter of the ``graft.*`` initializer they read (:func:`_infer_onnx_tags`).
"""
from __future__ import annotations

import ast
import operator
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..editor import graft_tag
from ..errors import GraftError
from ..protocols import is_grafted
from ..registry import _METHODS, _PASS_MODULES
from ..runtime import specialise
from ..sites import weight_value

__all__ = ["view_of", "example_inputs_of", "base_title", "is_onnx"]

aten = torch.ops.aten
_SCALED = {aten.add.Tensor, aten.sub.Tensor}  # add(x, y, alpha=s) is x + s * y: drawn as scale=s


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
            name = "scale" if key == "alpha" and node.target in _SCALED else key
            template.append(f"{name}={_const(value)}")
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
def is_onnx(side: Any) -> bool:
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


def view_of(side: Any, training: bool, example_inputs: Any) -> _View:
    """`side` (a model, trace, graph module, grafted module, ONNX model or path) as a view."""
    from ..trace import Traced, trace

    if is_onnx(side):
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


def example_inputs_of(side: Any) -> Any:
    """The inputs `side` was traced with (to trace the other side alike), or None."""
    from ..trace import Traced

    if is_grafted(side):
        return side._traced.example_inputs
    if isinstance(side, Traced):
        return side.example_inputs
    return None



def base_title(side: Any, other: Any) -> str | None:
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
