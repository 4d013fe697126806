"""Checks that a traced graph is the model: verification at trace time, and short trace-failure messages.

A graph records what one forward did. Python-side state (a counter, a tensor cached on the first call), a
branch on a value, or anything else that runs in Python but leaves no op is baked in at trace time, and the
graph then silently differs from the eager model. ``verify_trace`` runs both on the example inputs (and, when
some axis is dynamic, on one other shape) and raises a :class:`TraceError` naming the first module whose
output differs::

    eager model(**inputs)   --- forward hooks: each module's first output, in completion order
    graph(**inputs)         --- the node that leaves the same module's scope (node.meta["nn_module_stack"])

Training mode is random (dropout, stochastic depth): both runs start from the same RNG seed inside
``torch.random.fork_rng``, which makes them draw the same numbers in the same order, so the comparison is
exact there too. Buffers the forward updates (batch-norm statistics) are restored after each run: verifying
changes neither the model's nor the graph's buffers. Skipped for meta / fake weights (nothing to run).
"""
from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from .errors import TraceError

__all__ = ["verify_trace", "explain_trace_failure", "ATOL", "RTOL"]

ATOL, RTOL = 1e-5, 1e-4  # float noise only: a baked value or a skipped op differs far more
_SEED = 20261202


# -- running both ---------------------------------------------------------------------------------
def _fake_weights(model: nn.Module) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return any(t.is_meta or isinstance(t, FakeTensor) for t in tensors)


@contextlib.contextmanager
def _kept_state(*modules: nn.Module) -> Iterator[None]:
    """Buffers (batch-norm statistics, counters) as they were before the block."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _seeded(devices: list[int], run: Any) -> Any:
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_SEED)
        return run()


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _tensors(output: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def max_difference(want: Any, got: Any) -> float | None:
    """Max abs difference when some element is outside ATOL + RTOL * |want| (inf: shapes differ); else None."""
    wants, gots = _tensors(want), _tensors(got)
    if len(wants) != len(gots):
        return float("inf")
    worst = None
    for w, g in zip(wants, gots):
        if w.shape != g.shape:
            return float("inf")
        w, g = w.detach(), g.detach()
        if not w.is_floating_point():
            if not torch.equal(w, g.to(w.dtype)):
                return float((w.double() - g.double()).abs().max()) if w.numel() else float("inf")
            continue
        w, g = w.double(), g.double()
        both_nan = torch.isnan(w) & torch.isnan(g)
        delta = torch.where(both_nan, torch.zeros_like(w), (w - g).abs())
        delta = torch.nan_to_num(delta, nan=float("inf"))
        if bool((delta > ATOL + RTOL * w.abs().nan_to_num(0.0)).any()):
            worst = max(worst or 0.0, float(delta.max()))
    return worst


# -- the check -----------------------------------------------------------------------------------
def verify_trace(model: nn.Module, graph_module: fx.GraphModule, kwargs: Mapping[str, Any],
                 bound: Mapping[str, Any], axes: Mapping[str, tuple[int, ...]], training: bool) -> None:
    """Raise TraceError if `graph_module` differs from `model` (in its current mode) on `kwargs`, or on
    one other shape of the dynamic axes."""
    if _fake_weights(model):
        return
    devices = _cuda_devices(model)
    shapes = [dict(kwargs)]
    other = _other_shape(kwargs, axes)
    if other is not None:
        shapes.append(other)
    with torch.no_grad():
        for index, inputs in enumerate(shapes):
            try:  # each run from the same buffers: a forward that updates one must not skew the other
                with _kept_state(model, graph_module):
                    want = _seeded(devices, lambda: model(**inputs, **bound))
                with _kept_state(model, graph_module):
                    got = _seeded(devices, lambda: graph_module(**inputs))
            except Exception:
                if index == 0:
                    raise
                continue  # the other shape is a bonus check; a guard the graph keeps is not a mismatch
            difference = max_difference(want, got)
            if difference is not None:
                raise TraceError(_mismatch_message(model, graph_module, inputs, bound, devices, difference,
                                                   training, index))


def _other_shape(kwargs: Mapping[str, Any], axes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """The inputs with batch one larger and the sequence one shorter (one longer at length <= 2)."""
    sizes: dict[str, int] = {}
    changed = False
    out = dict(kwargs)
    for name, value in kwargs.items():
        if not isinstance(value, torch.Tensor):
            continue
        for axis in axes.get(name, ()):
            role = "batch" if axis == 0 else ("decoder" if name.startswith("decoder_") else "sequence") \
                if axis == 1 else None
            if role is None:
                continue
            size = value.shape[axis]
            new = sizes.setdefault(role, size + 1 if role == "batch" or size <= 2 else size - 1)
            index = torch.arange(new, device=value.device).clamp(max=size - 1)
            out[name] = out[name].index_select(axis, index)
            changed = True
    return out if changed else None


# -- naming the diverging module ------------------------------------------------------------------
def _scope(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [_clean(path) for path, _ in stack.values()]


def _clean(path: str) -> str:
    """'L['self'].encoder.layer[0]' or 'encoder.layer.0' -> 'encoder.layer.0'."""
    path = path.replace("L['self']", "").replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
    return path.strip(".")


def _module_outputs(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """module path -> nodes computed inside it that are used outside it (candidates for its output)."""
    scopes = {node: set(_scope(node)) for node in graph.nodes}
    outputs: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        for path in scopes[node]:
            if any(path not in scopes[user] or user.op == "output" for user in node.users):
                outputs.setdefault(path, []).append(node)
    return outputs


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(module)
        self.wanted, self.values = wanted, {}

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node in self.wanted and isinstance(value, torch.Tensor):
            self.values[node] = value.detach().clone()
        return value


def _first_tensor(output: Any) -> torch.Tensor | None:
    tensors = _tensors(output)
    return tensors[0] if tensors else None


def _eager_outputs(model: nn.Module, inputs: Mapping[str, Any], bound: Mapping[str, Any],
                   devices: list[int]) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(path, module, first output) of every submodule, in the order their forwards finished."""
    seen: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(mod: nn.Module, args: Any, out: Any, path: str = path) -> None:
            tensor = _first_tensor(out)
            if tensor is not None:
                seen.append((path, mod, tensor.detach().clone()))
        handles.append(module.register_forward_hook(hook))
    try:
        _seeded(devices, lambda: model(**inputs, **bound))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def first_divergence(model: nn.Module, graph_module: fx.GraphModule, inputs: Mapping[str, Any],
                     bound: Mapping[str, Any], devices: list[int]) -> tuple[str, str, float] | None:
    """(module path, class, max abs diff) of the first module whose output differs, or None."""
    candidates = _module_outputs(graph_module.graph)
    eager = _eager_outputs(model, inputs, bound, devices)
    recorder = _Recorder(graph_module, {n for nodes in candidates.values() for n in nodes})
    placeholders = [n.target for n in graph_module.graph.nodes if n.op == "placeholder"]
    try:
        _seeded(devices, lambda: recorder.run(*[inputs.get(name) for name in placeholders]))
    except Exception:
        return None
    for path, module, want in eager:
        nodes = [n for n in candidates.get(path, []) if n in recorder.values
                 and recorder.values[n].shape == want.shape]
        if not nodes:
            continue
        differences = [max_difference(want, recorder.values[n]) for n in nodes]
        if all(d is not None for d in differences):
            return path, type(module).__name__, min(differences)
    return None


def _mismatch_message(model: nn.Module, graph_module: fx.GraphModule, inputs: Mapping[str, Any],
                      bound: Mapping[str, Any], devices: list[int], difference: float, training: bool,
                      index: int) -> str:
    where = "the example inputs" if index == 0 else "inputs of another batch size / length"
    shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in inputs.items() if isinstance(v, torch.Tensor))
    try:
        found = first_divergence(model, graph_module, inputs, bound, devices)
    except Exception:  # naming the module is a diagnosis; the mismatch stands without it
        found = None
    module = (f"first diverging module: {found[0]} ({found[1]}), max abs diff {found[2]:.3g}" if found
              else "no single submodule's output differs; the difference is in the model's own forward")
    return (
        f"the traced graph of {type(model).__name__} does not match its eager forward "
        f"({'training' if training else 'eval'} mode, {where}: {shapes}): max abs diff {difference:.3g}\n"
        f"{module}\n"
        "the trace baked in something the eager forward computes anew on each call (Python-side state such "
        "as a counter, a tensor cached on an earlier call, a branch on a tensor's value): make that forward "
        "depend only on its inputs, parameters and buffers, or pass verify=False to graft anyway")


# -- short trace-failure messages ------------------------------------------------------------------
_LIBRARY_DIRS = tuple(os.path.dirname(p) + os.sep for p in (torch.__file__, __file__))
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep


def _is_user_frame(frame: traceback.FrameSummary) -> bool:
    name = os.path.abspath(frame.filename) if not frame.filename.startswith("<") else frame.filename
    return not (name.startswith("<") or name.startswith(_LIBRARY_DIRS) or name.startswith(_STDLIB))


def _chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return chain


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame outside torch, graftlib and the standard library, in the exception's chain."""
    for error in reversed(_chain(exc)):  # the original error first: its traceback reaches deepest
        frames = [f for f in traceback.extract_tb(error.__traceback__) if _is_user_frame(f)]
        if frames:
            return frames[-1]
    return None


def _kind(exc: BaseException) -> str:
    text = " ".join(f"{type(e).__name__} {e}" for e in _chain(exc))
    if any(word in text for word in ("data-dependent", "DataDependent", "data dependent", "GuardOnDataDependent",
                                     "unbacked")):
        return "data"
    if any(word in text for word in ("Constraints violated", "ConstraintViolation", "specialized", "specialised",
                                     "marked as dynamic", "Dim.AUTO", "not in range")):
        return "shape"
    return "other"


_MEANING = {
    "data": ("the forward uses a tensor's value in Python (an if/while on it, int(), .item(), .tolist()); a graph "
             "records one path for all inputs, so a value cannot choose it",
             ["write the branch as torch.cond(pred, true_fn, false_fn, (x,)), or decide it from shapes "
              "(x.shape) instead of values",
              "or make the value a constant: pass it as a Python number / bool in example_inputs (it is baked "
              "into the graph), or compute it outside the model"]),
    "shape": ("an input axis graftlib made dynamic is fixed by the model at this line (it needs one size)",
              ["mark that axis static: dynamic={'<input>': (0,)} (batch only) or dynamic=False",
               "or pass example_inputs at the size the model needs"]),
    "other": ("torch.export cannot record this operation",
              ["pass example_inputs matching how you call the model (dict of keyword tensors)",
               "for decoders pass use_cache=False; for attention errors load the model with "
               "attn_implementation='eager'"]),
}


def explain_trace_failure(model_class: str, exc: BaseException) -> str:
    """At most 15 lines: what failed where (the user's file and line), what it means, what to try."""
    meaning, options = _MEANING[_kind(exc)]
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    lines = [f"torch.export could not trace {model_class}: {meaning}"]
    frame = user_frame(exc)
    if frame is not None:
        lines.append(f"  {frame.filename}:{frame.lineno}, in {frame.name}")
        if frame.line:
            lines.append(f"    {frame.line.strip()[:160]}")
    lines.append(f"  torch: {type(exc).__name__}: {reason[:240]}")
    lines.append("what to try:")
    lines.extend(f"  - {option}" for option in options)
    lines.append("(the full torch error is chained below this one)")
    return "\n".join(lines)
