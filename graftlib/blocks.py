"""Block modules: the runtime split into one ``nn.Module`` call per repeated layer (``g.blocks()``).

torch.distributed's FSDP2 shards per module: ``fully_shard(block)`` replaces the block's parameters by
DTensor shards and, around each call of the block, puts the gathered (unsharded) ones back by assignment
on the modules that own them. The flat runtime (``runtime.flat_module``) reads Parameter objects cached
at build time, and runs as one call, so it could only be sharded as one unit. After ``g.blocks()`` every
runtime of the module (each mode, each set of active adapters, each variant trace) is built live::

    flat:   embed -> [layers.0 nodes] -> [layers.1 nodes] -> ... -> norm, head
    live:   embed -> layers.0(part_0, h, cos, sin) -> layers.1(part_1, ...) -> ... -> norm, head

- ``layers.0`` is the canonical graph module's own submodule (class changed to :class:`Block`), so its
  parameters keep the model's names (``self_attn.q_proj.weight``) and ``fully_shard(block)`` hooks run;
  ``part_0`` is the block's partition of the current runtime graph (one per mode / adapter set / trace).
- Every weight is read at call time from its owner's parameter dict in the canonical module tree
  (``owner._parameters["weight"]``: one dict lookup, what FSDP2's assignment writes), so variants and
  every runtime see the same (sharded or gathered) parameters. Adapter parameters stay in ``g.store``:
  with ``fully_shard(g)`` they belong to the root unit, gathered for the whole step (they are small).

Blocks are found as gradient checkpointing finds them (``checkpoint.blocks``: nn_module_stack). Ops and
their order are the flat graph's, so outputs and gradients are equal bit for bit.

*Units* (``units(g)``) do the same for the weight matrices outside the blocks (token embeddings, output
head): each op reading one is called through its owner module, so FSDP2 can shard the owner as a unit of
its own and gather it around that op only. Left in the root unit they are gathered for the whole step,
all at once: on a 1.1B Llama that is 524 MB of embedding and head, with FSDP2's all-gather buffer beside
the gathered copy (measured: the training peak then sits ~1.4 GiB above the loaded shards at 4 and at 8
layers alike).
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import fx, nn

import graftlib.checkpoint as checkpoint
from .editor import STORE
from .errors import GraftError

if TYPE_CHECKING:
    from .protocols import GraftedModule

__all__ = ["Block", "blocks", "block_paths", "units", "unit_paths", "live_module", "runtime", "inherit",
           "share_tree"]

_ROOT = "_blocks_root"  # a live module's __dict__ entry: the Grafted whose module tree holds the weights
_UNITS = "_blocks_units"  # the root's __dict__ entry: module paths of the units (see units())


class Block(nn.Module):
    """One repeated layer of a grafted model: its parameters (the model's names) and a call that runs
    its partition of whichever runtime graph is current (passed by that runtime)."""

    def forward(self, part: fx.GraphModule, *args: Any) -> tuple[Any, ...]:
        return part.forward(*args)


def block_paths(graph: fx.Graph) -> list[str]:
    """Module paths of the repeated layers, in the order the graph runs them (``layers.0``, ``layers.1``)."""
    container = checkpoint._container(graph)
    if container is None:
        return []
    paths: list[str] = []
    for node in graph.nodes:
        path = checkpoint.block_of(node, container) if node.op == "call_function" else None
        if path is not None and path not in paths:
            paths.append(path)
    return paths


def blocks(grafted: "GraftedModule") -> list[nn.Module]:
    """The block modules of `grafted` (see the module docstring); from now on its runtimes call them."""
    paths = block_paths(grafted.graph)
    if len(paths) < 2:
        raise GraftError("this model has no repeated blocks (no module list with numbered children in the "
                         "graph's module structure): shard it as one unit, fully_shard(g)")
    modules = [grafted.graph_module.get_submodule(path) for path in paths]
    for module in modules:
        if not isinstance(module, Block):
            if type(module) is not nn.Module:
                raise GraftError(f"block {module.__class__.__name__} at {paths[0]!r} is not a plain module")
            module.__class__ = Block
    root = grafted.__dict__.get(_ROOT) or grafted
    for member in checkpoint._family(grafted):
        member.__dict__[_ROOT] = root
        member._runtimes.clear()
    grafted.runtime_module()
    return modules


def unit_paths(graph: fx.Graph, tree: nn.Module) -> list[str]:
    """Owners of the weight matrices (2-D or more) outside the blocks, each read by ops outside the blocks
    only and not tied to another name: the token embeddings, the output head, position tables."""
    part, block_parts = checkpoint.blocks(graph)
    holders: dict[int, int] = {}
    for _, module in tree.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                holders[id(param)] = holders.get(id(param), 0) + 1
    paths: list[str] = []
    for node in graph.nodes:
        owner_path, _, leaf = str(node.target).rpartition(".")
        if node.op != "get_attr" or not owner_path or owner_path.split(".")[0] == STORE or owner_path in paths:
            continue
        try:
            owner = tree.get_submodule(owner_path)
        except AttributeError:
            continue
        param = owner._parameters.get(leaf)
        if param is None or param.dim() < 2 or holders.get(id(param)) != 1 or type(owner) not in (nn.Module, Block):
            continue
        if any(part.get(user) in block_parts or user.op != "call_function" for user in node.users):
            continue
        paths.append(owner_path)
    return paths


def units(grafted: "GraftedModule") -> list[nn.Module]:
    """The unit modules of `grafted` (module docstring), in block mode (``g.blocks()`` is called)."""
    if _ROOT not in grafted.__dict__:
        blocks(grafted)
    root = grafted.__dict__[_ROOT]
    paths = root.__dict__.get(_UNITS)
    if paths is None:
        paths = root.__dict__[_UNITS] = unit_paths(root.graph, root.graph_module)
        for path in paths:
            root.graph_module.get_submodule(path).__class__ = Block
        for member in checkpoint._family(grafted):
            member._runtimes.clear()
        grafted.runtime_module()
    return [root.graph_module.get_submodule(path) for path in paths]


def inherit(variant: "GraftedModule", parent: "GraftedModule") -> None:
    """A variant traced later runs live too, on its parent's module tree."""
    if _ROOT in parent.__dict__:
        variant.__dict__[_ROOT] = parent.__dict__[_ROOT]


def runtime(grafted: "GraftedModule", named: fx.GraphModule, flat: fx.GraphModule, training: bool) -> nn.Module:
    """The module forward calls: the flat one (checkpointed when enabled) unless ``g.blocks()`` was called."""
    root = grafted.__dict__.get(_ROOT)
    if root is None:
        return checkpoint.maybe_wrap(grafted, flat, training)
    options = grafted.__dict__.get("_checkpointing") if training else None
    share_tree(named, root.graph_module)
    return live_module(named, root.graph_module, options, root.__dict__.get(_UNITS, ()))


def share_tree(named: fx.GraphModule, tree: nn.Module) -> None:
    """Point `named`'s top-level children at `tree`'s where every target under them resolves there, so the
    named module keeps no Parameter objects of its own: once FSDP has replaced them by shards, the
    originals are freed (and export / diff read the current ones)."""
    targets = [str(n.target) for n in named.graph.nodes if n.op == "get_attr"]
    called = {str(n.target).split(".", 1)[0] for n in named.graph.nodes if n.op == "call_module"}
    for name in list(named._modules):  # called modules (guards, caches) belong to one trace: kept
        if name in called or name not in tree._modules or named._modules[name] is tree._modules[name]:
            continue
        under = [t for t in targets if t.split(".", 1)[0] == name]
        if all(_resolves(tree, t) for t in under):
            named._modules[name] = tree._modules[name]


def _resolves(tree: nn.Module, target: str) -> bool:
    try:
        _resolve(tree, target)
    except AttributeError:
        return False
    return True


def live_module(named: fx.GraphModule, tree: nn.Module, checkpointing: dict[str, Any] | None = None,
                unit_owners: Sequence[str] = ()) -> fx.GraphModule:
    """`named`'s graph with each block partition called through the block module of `tree`, each op
    reading a unit's weight through that unit, and every weight read at call time from its owner in
    `tree` (see the module docstring)."""
    part, block_parts = checkpoint.blocks(named.graph)
    unit_calls = _unit_calls(named.graph, unit_owners)
    paths = {index: _path_of(named.graph, part, index) for index in block_parts}
    options = dict(checkpointing or {})
    every_n, offload = int(options.pop("every_n_layers", 1)), bool(options.pop("offload", False))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, Any] = {}
    reader = _Reader(named, tree, attrs)
    done: set[int] = set()
    for node in named.graph.nodes:
        index = part.get(node)
        if index in block_parts:
            if index not in done and node.op != "get_attr":
                done.add(index)
                chosen = checkpointing is not None and sorted(block_parts).index(index) % every_n == 0
                _call_block(graph, env, named.graph, part, index, paths[index], tree, attrs, reader,
                            checkpoint.Checkpointed if chosen else None, options, offload)
            continue
        if node.op == "get_attr":
            continue  # read where used (reader)
        if node in unit_calls:
            _call_block(graph, env, named.graph, unit_calls, unit_calls[node], unit_calls[node].split("@")[0],
                        tree, attrs, reader, None, options, offload)
            continue
        env[node] = graph.node_copy(node, lambda n: _value(graph, env, reader, n))
    graph._codegen = copy.deepcopy(named.graph._codegen)  # pytree in/out: the model's output class
    module = fx.GraphModule(_with_modules(attrs, graph, named), graph)
    module.train(named.training)
    return module


def _unit_calls(graph: fx.Graph, owners: Sequence[str]) -> dict[fx.Node, str]:
    """Each op reading a unit's weight -> ``"owner@k"`` (one call of the owner module per op)."""
    calls: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and str(node.target).rpartition(".")[0] in owners:
            for user in node.users:
                calls.setdefault(user, f"{str(node.target).rpartition('.')[0]}@{len(calls)}")
    return calls


def _with_modules(attrs: dict[str, Any], graph: fx.Graph, named: fx.GraphModule) -> dict[str, Any]:
    """`attrs` plus the named module's submodules that `graph` calls (guards, hoisted caches)."""
    for node in graph.nodes:
        if node.op == "call_module" and node.target not in attrs:
            attrs[node.target] = named.get_submodule(node.target)
    return attrs


def _path_of(graph: fx.Graph, part: dict[fx.Node, int], index: int) -> str:
    container = checkpoint._container(graph)
    for node in graph.nodes:
        if part.get(node) == index and node.op == "call_function":
            path = checkpoint.block_of(node, container) if container else None
            if path is not None:
                return path
    raise GraftError(f"partition {index} has no block")  # blocks() only marks partitions with block nodes


def _value(graph: fx.Graph, env: dict[fx.Node, fx.Node], reader: "_Reader", node: fx.Node) -> fx.Node:
    if node.op == "get_attr":
        return reader.read(graph, node.target)
    return env[node]


def _call_block(graph: fx.Graph, env: dict[fx.Node, fx.Node], source: fx.Graph, part: dict[fx.Node, Any],
                index: Any, path: str, tree: nn.Module, attrs: dict[str, Any], reader: "_Reader",
                wrap: Any, options: dict[str, Any], offload: bool) -> None:
    """Move partition `index` into its own graph module and call it through the block at `path`."""
    members = [n for n in source.nodes if part.get(n) == index]
    inside = set(members)
    inputs = list(dict.fromkeys(i for n in members for i in n.all_input_nodes
                                if i not in inside and i.op != "get_attr"))
    outputs = [n for n in members if n.op != "get_attr" and any(u not in inside for u in n.users)]
    sub = fx.Graph()
    sub_env: dict[fx.Node, fx.Node] = {}
    sub_attrs: dict[str, Any] = {}
    sub_reader = _Reader(reader.named, tree, sub_attrs)
    for node in inputs:
        sub_env[node] = sub.placeholder(node.name)
        sub_env[node].meta = dict(node.meta)
    for node in members:
        if node.op != "get_attr":
            sub_env[node] = sub.node_copy(
                node, lambda n: sub_reader.read(sub, n.target) if n.op == "get_attr" else sub_env[n])
    sub.output(tuple(sub_env[n] for n in outputs))
    runner: nn.Module = fx.GraphModule(_with_modules(sub_attrs, sub, reader.named), sub)
    if wrap is not None:
        runner = _Forward(wrap(runner, options, offload))
    key = str(index).replace(".", "_").replace("@", "_at_")
    name = f"_part_{key}"
    attrs[name] = runner
    attrs[f"_block_{key}"] = tree.get_submodule(path)
    call = graph.call_module(f"_block_{key}", (graph.get_attr(name),
                                                 *(_value(graph, env, reader, n) for n in inputs)))
    for position, node in enumerate(outputs):
        env[node] = graph.call_function(operator.getitem, (call, position))
        env[node].meta = dict(node.meta)


class _Forward(nn.Module):
    """Gives a checkpointed partition the ``forward`` attribute Block calls."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return self.inner(*args)


class _Reader:
    """Turns ``get_attr target`` into a call-time read ``holder[leaf]`` of the owner's parameter (or buffer)
    dict in the canonical tree; other attributes (caches, constants) are the named module's objects."""

    def __init__(self, named: fx.GraphModule, tree: nn.Module, attrs: dict[str, Any]):
        self.named, self.tree, self.attrs = named, tree, attrs
        self.holders: dict[int, str] = {}
        self.nodes: dict[tuple[int, str], fx.Node] = {}

    def read(self, graph: fx.Graph, target: str) -> fx.Node:
        key = (id(graph), target)
        if key not in self.nodes:
            self.nodes[key] = self._read(graph, target)
        return self.nodes[key]

    def _read(self, graph: fx.Graph, target: str) -> fx.Node:
        holder, leaf = self._holder(target)
        if holder is None:
            name = "_c_" + target.replace(".", "_")
            self.attrs[name] = _resolve(self.named, target)
            return graph.get_attr(name)
        name = self.holders.setdefault(id(holder), f"_h{len(self.holders)}")
        self.attrs[name] = holder
        node = graph.get_attr(name)
        return graph.call_function(operator.getitem, (node, leaf))

    def _holder(self, target: str) -> tuple[dict[str, Any] | None, str]:
        """The dict that owns `target` in the tree (a model path or an adapter: shared by every trace)."""
        owner_path, _, leaf = target.rpartition(".")
        if not owner_path:
            return None, leaf  # top-level attributes are a trace's own constants
        try:
            owner = self.tree.get_submodule(owner_path)
        except AttributeError:
            return None, leaf
        for holder in (owner._parameters, owner._buffers):
            if leaf in holder:
                return holder, leaf
        return None, leaf


def _resolve(module: Any, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module
