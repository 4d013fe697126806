"""Moving a grafted module to another dtype or device after grafting: rewrite the graph to follow.

torch.export records the trace's dtype and device as constants::

    _assert_tensor_metadata(x, dtype=torch.float32, device=cpu)     checks only: dropped at graft time
    arange(n, device=cpu)  full(..., dtype=torch.float32)            factories: retargeted
    to(h, torch.float32)   to(inv_freq, cpu, torch.float32)          casts: retargeted when they follow the model

Dropping the asserts is also what lets the graph run under ``torch.autocast`` (the eager model's ops
get autocast's casts at dispatch, the graph's aten ops the same).

After ``g.to(device / dtype)`` / ``g.half()`` / ``g.bfloat16()`` every device argument that named the old
device names the new one. A dtype argument naming the old floating dtype S is ambiguous in the graph:
Hugging Face code writes both ``h.to(torch.float32)`` (an explicit upcast: RMSNorm, rotary, softmax)
and ``h.to(input_dtype)`` (back to the model's dtype), and in an fp32 trace both read ``float32``. One
probe run of the graph on the traced example inputs, with the converted weights, decides each cast in
order: a cast to S of a value that is already in the new dtype T is an explicit upcast and stays; a
cast to S of a value in S (or of an S-dtype model that is not fp32) follows the model to T. Factories
creating S tensors (masks' ``finfo.min`` fills) follow the model; ``x.to(other.device)``, recorded with
x's own dtype, keeps x's. Uses of ``h`` that the trace attributed to a no-op cast of it are rewired to
``h`` first (:func:`unalias_noop_casts`). The result is checked against the
eager model converted the same way (tests/test_training.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .editor import STORE

if TYPE_CHECKING:
    from .protocols import GraftedModule

__all__ = ["Placement", "placement", "strip_metadata_asserts", "retarget_graph", "follow", "to_placement"]

aten = torch.ops.aten
_ASSERTS = {aten._assert_tensor_metadata.default}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default}
_FACTORIES = {aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
              aten.scalar_tensor.default, aten.new_full.default, aten.new_zeros.default,
              aten.new_ones.default, aten.new_empty.default, aten.full_like.default, aten.zeros_like.default,
              aten.ones_like.default, aten.empty_like.default, aten.arange.default, aten.arange.start,
              aten.arange.start_step}


@dataclass(frozen=True)
class Placement:
    dtype: torch.dtype | None      # the base weights' floating dtype (None: no floating weights)
    device: torch.device


def placement(module: nn.Module) -> Placement:
    """Where the base weights of `module` (a Grafted or a plain model) live; adapters are not counted."""
    counts: dict[torch.dtype, int] = {}
    device = None
    for name, param in module.named_parameters():
        if f".{STORE}." in f".{name}":
            continue
        device = device or param.device
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    dtype = max(counts, key=counts.get) if counts else None
    return Placement(dtype, device or torch.device("cpu"))


def strip_metadata_asserts(graph: fx.Graph) -> int:
    """Remove ``_assert_tensor_metadata`` checks (dtype / device asserts of the trace); returns how many."""
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            graph.erase_node(node)
            removed += 1
    return removed


def _map_devices(value: Any, old: torch.device, new: torch.device) -> Any:
    if isinstance(value, torch.device) and value == old:
        return new
    if isinstance(value, (list, tuple)):
        return type(value)(_map_devices(v, old, new) for v in value)
    if isinstance(value, Mapping):  # node.kwargs: arange(..., device=cpu), to(x, dtype, device=cpu)
        return {k: _map_devices(v, old, new) for k, v in value.items()}
    return value


def _dtype_slot(node: fx.Node) -> tuple[str, Any] | None:
    """Where `node` names a dtype: ("arg", index) or ("kwarg", "dtype")."""
    if node.target is aten.to.dtype:
        return ("arg", 1)
    if node.target is aten.to.device:
        return ("arg", 2) if len(node.args) > 2 else None
    return ("kwarg", "dtype") if "dtype" in node.kwargs else None


def _get(node: fx.Node, slot: tuple[str, Any]) -> Any:
    kind, where = slot
    return node.args[where] if kind == "arg" else node.kwargs.get(where)


def _set(node: fx.Node, slot: tuple[str, Any], value: Any) -> None:
    kind, where = slot
    if kind == "arg":
        args = list(node.args)
        args[where] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, where: value}


def _traced_dtype(value: Any) -> torch.dtype | None:
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


class _Probe(fx.Interpreter):
    """Runs the graph once, deciding each ambiguous cast from the dtype its input has at run time."""

    def __init__(self, gm: fx.GraphModule, before: Placement, after: Placement):
        super().__init__(gm, garbage_collect_values=True)
        self.before, self.after = before, after
        self.changed = 0

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)  # adapters kept in fp32 are read as the base dtype for the probe
        if isinstance(value, torch.Tensor) and value.is_floating_point() and self.after.dtype is not None:
            return value.detach().to(self.after.dtype)
        return value

    def run_node(self, node: fx.Node) -> Any:
        if node.op == "call_function":
            self._retarget(node)
        return super().run_node(node)

    def _retarget(self, node: fx.Node) -> None:
        old, new = self.before, self.after
        if old.device != new.device:
            args, kwargs = _map_devices(node.args, old.device, new.device), _map_devices(node.kwargs, old.device, new.device)
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                self.changed += 1
        if old.dtype is None or new.dtype is None or old.dtype == new.dtype:
            return
        slot = _dtype_slot(node)
        if slot is None or _get(node, slot) != old.dtype:
            return
        if node.target in (aten.to.dtype_layout, aten._to_copy.default) and "device" in node.kwargs \
                and _traced_dtype(node.args[0]) == old.dtype:
            _set(node, slot, None)  # x.to(other.device) is recorded with x's own dtype: keep x's, whatever it is
            self.changed += 1
            return
        if node.target in _CASTS:
            source = self.env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            source_dtype = getattr(source, "dtype", None)
            upcast = old.dtype == torch.float32 and source_dtype is not None and source_dtype != torch.float32 \
                and (source_dtype == new.dtype or not source_dtype.is_floating_point)
            if upcast:
                return  # h.to(torch.float32) of a low-precision (or integer) value: explicit, kept
        elif node.target not in _FACTORIES:
            return
        _set(node, slot, new.dtype)
        self.changed += 1


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return str(list(stack.values())[-1][0])


def _inside(path: str | None, module: str) -> bool:
    return path is not None and (path == module or path.startswith(module + "."))


def unalias_noop_casts(graph: fx.Graph) -> int:
    """Uses of ``x`` that the trace attributed to a no-op cast of it: rewire them to ``x``.

    In an fp32 trace ``h.to(torch.float32)`` returns ``h`` itself, so every later use of ``h`` (Llama's
    residual, taken before its RMSNorm upcasts) is recorded as a use of the cast node. A cast inside module
    M of a value made outside M, used outside M, is that alias: at the trace's dtype the rewiring changes
    nothing; after a move to bf16 the residual stays bf16 as it does eagerly. Returns the uses rewired.
    """
    rewired = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _CASTS or not isinstance(node.args[0], fx.Node):
            continue
        source, out = node.args[0].meta.get("val"), node.meta.get("val")
        module = _module_path(node)
        if module is None or not isinstance(source, torch.Tensor) or not isinstance(out, torch.Tensor) \
                or (source.dtype, source.device) != (out.dtype, out.device):
            continue
        if _inside(_module_path(node.args[0]), module) and node.args[0].op == "call_function":
            continue
        for user in list(node.users):
            if not _inside(_module_path(user), module):
                user.replace_input_with(node, node.args[0])
                rewired += 1
    return rewired


def retarget_graph(gm: fx.GraphModule, before: Placement, after: Placement, example_inputs: Mapping[str, Any],
                   graph_inputs: Callable[[Mapping[str, Any]], dict[str, Any]]) -> int:
    """Rewrite `gm`'s graph in place from `before` to `after` (its weights are already converted); returns
    the number of nodes changed."""
    strip_metadata_asserts(gm.graph)
    unalias_noop_casts(gm.graph)
    inputs = graph_inputs(to_placement(dict(example_inputs), Placement(None, after.device)))
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    probe = _Probe(gm, before, after)
    with torch.no_grad(), _no_autocast(after.device):
        probe.run(*[inputs.get(name) for name in placeholders])
    gm.recompile()
    return probe.changed


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    with torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext():
        yield


def to_placement(inputs: dict[str, Any], where: Placement) -> dict[str, Any]:
    """Tensors of `inputs` on `where.device`; floating ones in `where.dtype` when it is given."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            dtype = where.dtype if where.dtype is not None and value.is_floating_point() else value.dtype
            value = value.to(device=where.device, dtype=dtype)
        out[key] = value
    return out


def follow(grafted: "GraftedModule", before: Placement) -> None:
    """After the weights of `grafted` moved from `before`, rewrite its canonical and base graphs."""
    after = placement(grafted)
    if after == before:
        return
    traced = grafted._traced
    retarget_graph(grafted.graph_module, before, after, traced.example_inputs, traced.graph_inputs)
    base = fx.GraphModule(grafted.graph_module, _copy(grafted._base_graph))
    retarget_graph(base, before, after, traced.example_inputs, traced.graph_inputs)
    grafted._base_graph = _copy(base.graph)


def follow_model(variant: "GraftedModule", model: nn.Module) -> None:
    """A graph traced from the user's model (a new input set) for a module that has since moved: convert
    its own buffers and rewrite its graphs to the module's placement (its parameters are the module's)."""
    before, after = placement(model), placement(variant)
    if before == after:
        return
    for module in variant.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                dtype = after.dtype if buffer.is_floating_point() and after.dtype is not None else buffer.dtype
                module._buffers[name] = buffer.to(device=after.device, dtype=dtype)
    follow(variant, before)
    variant._invalidate()


def _copy(graph: fx.Graph) -> fx.Graph:
    from .runtime import copy_graph

    return copy_graph(graph)
