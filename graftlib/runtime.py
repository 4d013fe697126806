"""Runtime graphs: the canonical grafted graph specialised for one mode and one set of active adapters.

The canonical graph is traced in training mode and holds every adapter. ``specialise`` copies it and
- replaces the joins of inactive adapters by their base values (a disabled adapter is the base graph),
- in eval mode removes dropout nodes, zeroes attention dropout and switches batch norm to inference
  (and stops its ``num_batches_tracked`` update),
then drops dead nodes and makes matmuls on frozen weights fold as the eager model's do (folding.py). Runtime graph modules share every parameter with the canonical one.
"""
from __future__ import annotations

import copy
from collections.abc import Collection

import torch
from torch import fx

from .cache import hoist_cached
from .editor import graft_tag, is_join
from .folding import fold_like_eager
from .quiet import torch_internals

__all__ = ["copy_graph", "specialise", "build_module", "flat_module", "op_histogram", "eliminate_dead_code"]

aten = torch.ops.aten
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default}


def copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph(owning_module=graph.owning_module)
    output = new.graph_copy(graph, {})
    new.output(output)
    with torch_internals():  # torch 2.13's LeafSpec FutureWarning, raised by deep-copying the pytree specs
        new._codegen = copy.deepcopy(graph._codegen)
    return new


def deactivate(graph: fx.Graph, keep: Collection[str]) -> None:
    """Route around the joins of every adapter not in `keep`."""
    for node in list(graph.nodes):
        if is_join(node):
            tag = graft_tag(node)
            if tag["adapter"] not in keep:
                node.replace_all_uses_with(node.args[tag["base"]])
                graph.erase_node(node)


def _to_eval(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROPOUTS:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target == aten.scaled_dot_product_attention.default:
            args = list(node.args)
            if len(args) > 4:
                args[4] = 0.0
                node.args = tuple(args)
            if "dropout_p" in node.kwargs:
                node.kwargs = {**node.kwargs, "dropout_p": 0.0}
        elif node.target == aten.batch_norm.default:
            args = list(node.args)
            args[5] = False
            node.args = tuple(args)
        elif node.target == aten.add_.Tensor and getattr(node.args[0], "op", "") == "get_attr" \
                and str(node.args[0].target).endswith("num_batches_tracked") and not node.users:
            graph.erase_node(node)


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Drop unused nodes, unused random ops too (a disabled branch's dropout; fx keeps them as impure)."""
    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure(impure_random=False))


def _drop_null_dropout(graph: fx.Graph) -> None:
    """Dropout with p = 0 is the identity but still dispatched (and recorded by autograd): remove it."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _DROPOUTS and node.args[1] == 0:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def specialise(graph: fx.Graph, active: Collection[str], training: bool,
               eager_grad: Collection[str] = ()) -> fx.Graph:
    """`graph` for one mode and set of active adapters; `eager_grad` names the base parameters that
    required grad in the eager model, whose matmuls fold as eager folds them (``graftlib/folding.py``)."""
    new = copy_graph(graph)
    deactivate(new, active)
    if training:
        _drop_null_dropout(new)
    else:
        _to_eval(new)
    eliminate_dead_code(new)
    fold_like_eager(new, eager_grad)
    if not training:
        hoist_cached(new)  # parameter-only values (DoRA's norm) computed once until a parameter changes
    new.lint()
    return new


def build_module(root: torch.nn.Module, graph: fx.Graph, training: bool) -> fx.GraphModule:
    module = fx.GraphModule(root, graph)
    module.train(training)
    return module


def flat_module(named: fx.GraphModule) -> fx.GraphModule:
    """The same graph reading every weight from a flat attribute of its own module.

    Generated code reads ``self.encoder_layer_0_attention_self_query_weight`` instead of walking
    ``getattr(self.encoder.layer, "0").attention...`` through ``nn.Module.__getattr__`` on every call
    (about 1.4 ms per bert-base forward). Objects are shared, not copied. Used for calling only:
    export and diff read the named module, whose attribute paths are the model's.
    """
    graph = copy_graph(named.graph)
    attrs: dict[str, object] = {}
    flat_of: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        if node.target not in flat_of:
            obj = named.get_submodule(node.target) if node.op == "call_module" else _resolve(named, node.target)
            name = "_" + str(node.target).replace(".", "_")
            while name in attrs and attrs[name] is not obj:
                name += "_"
            attrs[name] = obj
            flat_of[node.target] = name
        node.target = flat_of[node.target]
    module = fx.GraphModule(attrs, graph)
    module.train(named.training)
    return module


def _resolve(module: torch.nn.Module, target: str) -> object:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def op_histogram(graph: fx.Graph) -> dict[str, int]:
    """Count of each call_function target: the op inventory merge must preserve."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return dict(sorted(counts.items()))
