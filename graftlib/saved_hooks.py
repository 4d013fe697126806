"""Tracing under the caller's ``torch.autograd.graph.saved_tensors_hooks``: the hooks are set aside.

A first call that needs a new graph (``labels`` added, training mode, ...) traces inside the caller's
context. torch.export runs the model on fake tensors with grad on, so any pack hook the caller has
pushed (memory accounting, ``save_on_cpu``, offloading) would see FakeTensors: a hook touching data
fails with "Cannot access data pointer of Tensor (e.g. FakeTensor ...)", and one that only counts would
count the trace's symbolic tensors. The trace is not the call: while it runs, the hook stack is emptied,
and restored (same order) afterwards, on every path::

    with saved_tensors_hooks(pack, unpack):   # the user's
        g(**batch)          -> trace (hooks off) -> run the graph (hooks on: they see the call's tensors)

Hooks pushed inside the trace (non-reentrant checkpointing's own) work as usual.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["paused_saved_tensors_hooks"]

_autograd: Any = torch._C._autograd


@contextlib.contextmanager
def paused_saved_tensors_hooks() -> Iterator[int]:
    """The default saved-tensor hooks stack, empty for the block; yields how many pairs were set aside."""
    held: list[tuple[Any, Any]] = []
    if _autograd._saved_tensors_hooks_is_enabled():
        while (top := _autograd._top_saved_tensors_default_hooks(True)) is not None:
            held.append(top)
            _autograd._pop_saved_tensors_default_hooks()
    try:
        yield len(held)
    finally:
        for pack, unpack in reversed(held):  # innermost was popped first: push outermost first
            _autograd._push_saved_tensors_default_hooks(pack, unpack)
