"""Calls that do not fit the traced graph, explained: which input, the shape seen, the shape it takes.

A graph traced by torch.export takes each tensor input at a fixed rank, with some sizes fixed and the
others symbolic (``s0``, ``s1``: free, but equal names must be equal). A call outside that fails deep in
torch (``Guard failed: x.size()[1] == 8``, a matmul shape error, an index error). ``call_checked`` runs
the graph and, only when it raised, compares the inputs with the graph's placeholders: a mismatch
becomes a :class:`GraftError` naming it (torch's error chained as its cause); otherwise torch's error
passes through unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from .errors import GraftError

__all__ = ["expected_inputs", "mismatch", "call_checked"]

HOW_TO_TRACE = ("Sizes the model itself fixes (a Linear's feature width, a vocabulary) cannot change; a size "
                "fixed only by the trace (dynamic=False, or an example of size 1 on that axis) takes a new "
                "trace: graftlib.apply(model, spec, example_inputs=<inputs shaped like this call>)")


def expected_inputs(graph: fx.Graph) -> dict[str, tuple[tuple[int | str, ...], torch.dtype]]:
    """Tensor placeholder -> (its sizes, ints or symbol names s0, s1, ... by first appearance; dtype)."""
    names: dict[str, str] = {}
    out: dict[str, tuple[tuple[int | str, ...], torch.dtype]] = {}
    for node in graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if not isinstance(value, torch.Tensor):
            continue
        dims: list[int | str] = []
        for size in value.shape:  # ints, or SymInts: a symbol, or one specialised to a number ("8")
            text = str(size)
            if isinstance(size, int) or text.isdigit():
                dims.append(int(text))
            else:
                dims.append(names.setdefault(text, f"s{len(names)}"))
        out[str(node.target)] = (tuple(dims), value.dtype)
    return out


def _shape(dims: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + (",)" if len(dims) == 1 else ")")


def mismatch(graph: fx.Graph, inputs: Mapping[str, Any]) -> str | None:
    """Why `inputs` do not fit `graph` (the first input that does not), or None when they all fit."""
    bound: dict[str, tuple[int, str]] = {}
    for name, (dims, dtype) in expected_inputs(graph).items():
        value = inputs.get(name)
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_floating_point() != dtype.is_floating_point:
            want = str(dtype).removeprefix("torch.")
            return (f"input {name!r} is {str(value.dtype).removeprefix('torch.')}, but the graph takes {want}: "
                    f"pass {name}.to(torch.{want})")
        free = [d for d in dict.fromkeys(dims) if isinstance(d, str)]
        note = f" ({', '.join(free)} may vary)" if free else ""
        head = f"input {name!r} has shape {_shape(tuple(value.shape))}, but the graph takes {_shape(dims)}{note}"
        if value.dim() != len(dims):
            return f"{head}: {value.dim()} dims instead of {len(dims)}. {HOW_TO_TRACE}"
        for axis, (size, want) in enumerate(zip(value.shape, dims)):
            if isinstance(want, int) and size != want:
                return f"{head}: dim {axis} must be {want}. {HOW_TO_TRACE}"
            if isinstance(want, str):
                first = bound.setdefault(want, (size, f"{name!r} dim {axis}"))
                if first[0] != size:
                    return f"{head}: dim {axis} ({want}) must equal {first[1]}, which is {first[0]}"
    return None


def call_checked(runtime: fx.GraphModule, inputs: Mapping[str, Any]) -> Any:
    """``runtime(**inputs)``; when it raises and the inputs do not fit its graph, a GraftError saying how.
    Under torch.compile the module is called as is (compiled code has guards of its own)."""
    if torch.compiler.is_compiling():
        return runtime(**inputs)
    try:
        return runtime(**inputs)
    except GraftError:
        raise
    except Exception as exc:
        problem = mismatch(runtime.graph, inputs)
        if problem is None:
            raise
        raise GraftError(problem) from exc
