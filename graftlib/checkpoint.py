"""Per-block activation checkpointing of the runtime graph (``g.gradient_checkpointing_enable()``).

torch.export drops ``model.gradient_checkpointing_enable()``: the graph is flat. The training runtime is
split back into one partition per repeated block, found from the ``nn_module_stack`` of its nodes (the
container with the most numbered children: ``layers.0 ... layers.11``, ``encoder.layer.*``, ``h.*``), and
each block partition runs under non-reentrant ``torch.utils.checkpoint``::

    flat graph:   embed -> [layers.0 nodes] -> [layers.1 nodes] -> ... -> norm, head
    split:        glue_0(x) -> ckpt(block_1)(...) -> ckpt(block_2)(...) -> ... -> glue_n(...)

Only a block's inputs are kept for backward; its forward is recomputed in backward with the RNG state it
had (dropout masks equal), so gradients equal the non-checkpointed ones. Non-reentrant checkpointing
gives adapter parameters their gradients even when the block input does not require grad (so
``use_reentrant`` is always False). Eval mode and no-grad calls run the flat graph.
"""
from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from .protocols import GraftedModule

__all__ = ["block_of", "blocks", "checkpointed_module", "Checkpointed", "enable", "disable", "maybe_wrap"]

_NUMBERED = re.compile(r"^(?P<container>.+)\.(?P<index>\d+)$")


def _paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [str(path) for path, _ in stack.values()]


def _container(graph: fx.Graph) -> str | None:
    """The module list whose numbered children the graph runs most of: the repeated blocks."""
    children: dict[str, set[str]] = {}
    for node in graph.nodes:
        for path in _paths(node):
            match = _NUMBERED.match(path)
            if match:
                children.setdefault(match["container"], set()).add(match["index"])
    ranked = Counter({c: len(i) for c, i in children.items() if len(i) >= 2})
    return ranked.most_common(1)[0][0] if ranked else None


def block_of(node: fx.Node, container: str) -> str | None:
    for path in _paths(node):
        match = _NUMBERED.match(path)
        if match and match["container"] == container:
            return path
    return None


def blocks(graph: fx.Graph) -> tuple[dict[fx.Node, int], set[int]]:
    """(partition of every node, the partitions that are blocks). Partitions follow node order: nodes of
    one block form one partition; model code between blocks its own; inserted nodes without a module
    stack stay with their neighbours; weights go with their first user."""
    container = _container(graph)
    part: dict[fx.Node, int] = {}
    block_parts: set[int] = set()
    if container is None:
        return part, block_parts
    current, current_block, counter = 0, None, 0
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        block = block_of(node, container)
        if block is not None and block != current_block:
            counter += 1
            current, current_block = counter, block
            block_parts.add(current)
        elif block is None and _paths(node) and current_block is not None and not _inside_block(node, current_block):
            counter += 1
            current, current_block = counter, None
        part[node] = current
    for node in graph.nodes:
        if node.op == "get_attr":
            users = [u for u in node.users if u in part]
            part[node] = part[users[0]] if users else 0
    return part, block_parts


def _inside_block(node: fx.Node, block: str) -> bool:
    return any(p == block or p.startswith(block + ".") for p in _paths(node))


class Checkpointed(nn.Module):
    """Runs `inner` under non-reentrant activation checkpointing while grad is on."""

    def __init__(self, inner: nn.Module, options: dict[str, Any]):
        super().__init__()
        self.inner = inner
        self.options = dict(options)

    def forward(self, *args: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args)
        return checkpoint(self.inner, *args, use_reentrant=False, **self.options)


def checkpointed_module(flat: fx.GraphModule, options: dict[str, Any] | None = None) -> fx.GraphModule:
    """`flat` split into per-block partitions, each block under checkpointing; `flat` itself when the
    graph has no repeated blocks."""
    part, block_parts = blocks(flat.graph)
    if len(block_parts) < 2:
        return flat
    split = split_module(flat, None, lambda node: part.get(node, 0), keep_original_order=True)
    for name, sub in list(split.named_children()):
        index = int(name.rsplit("_", 1)[1]) if name.startswith("submod_") else None
        if index in block_parts:
            setattr(split, name, Checkpointed(sub, options or {}))
    split.graph._codegen = copy.deepcopy(flat.graph._codegen)  # pytree in/out: the model's output class
    split.recompile()
    split.train(flat.training)
    split.checkpointed_blocks = len(block_parts)  # type: ignore[attr-defined]
    return split


_OPTIONS = {"preserve_rng_state", "determinism_check", "debug"}


def enable(grafted: "GraftedModule", gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
    options = {k: v for k, v in (gradient_checkpointing_kwargs or {}).items() if k in _OPTIONS}
    _set(grafted, options)


def disable(grafted: "GraftedModule") -> None:
    _set(grafted, None)


def _set(grafted: "GraftedModule", options: dict[str, Any] | None) -> None:
    for module in _family(grafted):
        module.__dict__["_checkpointing"] = options
        module._runtimes.clear()
    if grafted.records:
        grafted.runtime_module()


def _family(grafted: "GraftedModule") -> list["GraftedModule"]:
    out, todo = [], [grafted]
    while todo:
        module = todo.pop()
        out.append(module)
        todo.extend(module._variants.values())
    return out


def maybe_wrap(grafted: "GraftedModule", flat: fx.GraphModule, training: bool) -> nn.Module:
    """The module forward calls: checkpointed per block in training mode when enabled."""
    options = grafted.__dict__.get("_checkpointing")
    if options is None or not training:
        return flat
    return checkpointed_module(flat, options)


def inherit(variant: "GraftedModule", parent: "GraftedModule") -> None:
    variant.__dict__["_checkpointing"] = parent.__dict__.get("_checkpointing")
