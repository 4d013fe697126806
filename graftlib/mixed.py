"""Mixed-adapter batches: every row of one forward through its own LoRA adapter (or ``"__base__"``).

    g(**inputs, adapter_names=["a", "__base__", "b", "a"])

runs a runtime graph built from the base graph (adapters off, this mode) with one gathered branch per
site instead of a loop over adapters. With ``i`` the per-row adapter index (a new graph input,
``adapter_index``, 0 for ``__base__``) and the adapters' factors stacked behind a zero slot:

    linear / Conv1D / fused slice   y + bmm(bmm(x, A_T[i]), s * B_T[i])      A_T (N+1, in, R), B_T (N+1, R, out)
                                    (x viewed (B, -1, in); one baddbmm when y is (B, T, out))
    conv2d                          y + conv(conv(x as (1, B*C, H, W), A[i], groups=B*g), s * B[i], groups=B*g)
    embedding                       y + bmm(A_T[i[:, None], ids], s * B_T[i])  A_T (N+1, vocab, R)

``R`` is the largest rank among the batch's adapters (smaller ones are zero-padded, which adds exactly
nothing) and the scale ``s`` of each adapter is folded into its B slot. Each row equals running that row
alone with its adapter (to float rounding). In eval mode the stacks are cached buffers, rebuilt when a
factor changes (parameter version counters); in training mode they are stacked from the parameters in
the graph, so gradients reach every adapter, and LoRA dropout uses each row's own probability.

Graphs are cached per (mode, set of adapter names). Only LoRA adapters can be mixed; the batch dim
must lead every adapted input (checked on the traced shapes).
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from .editor import escape
from .errors import GraftError, near_names, require_eager
from .lowrank import pad_rank
from .registry import get_method
from .runtime import specialise
from .select import SiteIndex
from .sites import Site

if TYPE_CHECKING:
    from .protocols import GraftedModule

__all__ = ["mixed_forward", "mixed_module", "BASE", "INDEX_INPUT"]

aten = torch.ops.aten
BASE = "__base__"
INDEX_INPUT = "adapter_index"
MIXABLE = ("lora",)


# -- entry point ---------------------------------------------------------------------------------
def mixed_forward(g: "GraftedModule", kwargs: dict[str, Any], adapter_names: Sequence[str]) -> Any:
    """Run `g` on `kwargs` with row ``b`` through ``adapter_names[b]`` (``"__base__"``: no adapter)."""
    inputs = {k: v for k, v in kwargs.items() if v is not None}
    for key, value in g._traced.constants.items():
        if inputs.get(key, value) == value:
            inputs[key] = value
    names = _check_names(g, inputs, adapter_names)
    target = g._variant(inputs)  # this mode's graph for these inputs (g itself or a variant)
    chosen = tuple(sorted(set(names) - {BASE}))
    if target._unpadded:  # build the masked graph too: torch.compile looks it up
        mixed_module(g._variant(inputs, unpadded=False), chosen, refresh=False)
    module = mixed_module(target, chosen)
    slot = {name: i + 1 for i, name in enumerate(chosen)}
    device = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).device
    index = torch.tensor([slot.get(n, 0) for n in names], dtype=torch.long, device=device)
    return module(**target._traced.graph_inputs(inputs), **{INDEX_INPUT: index})


def _check_names(g: "GraftedModule", inputs: dict[str, Any], adapter_names: Sequence[str]) -> list[str]:
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise GraftError("adapter_names is a list with one adapter name (or '__base__') per batch row")
    names = list(adapter_names)
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not tensors:
        raise GraftError("mixed batches need tensor inputs with a batch dimension")
    if len(names) != tensors[0].shape[0]:
        raise GraftError(f"adapter_names has {len(names)} names but the batch has {tensors[0].shape[0]} rows: "
                         "give one name (or '__base__') per row")
    adapters = g.adapters
    for name in dict.fromkeys(names):
        if name == BASE:
            continue
        if name not in adapters:
            raise GraftError(f"adapter_names: no adapter named {name!r}; adapters: "
                             f"{near_names(name, list(adapters) + [BASE])}")
        record = adapters[name]
        if record.method not in MIXABLE:
            raise GraftError(f"adapter_names: {name!r} is a {record.method} adapter; mixed batches support "
                             f"LoRA adapters only ({', '.join(MIXABLE)}) — run it as a whole batch with "
                             "g.set_active(...)")
        if record.config.get("dora"):
            raise GraftError(f"adapter_names: {name!r} is a DoRA adapter (lora(dora=true)); mixed batches support "
                             "plain LoRA adapters only — run it as a whole batch with g.set_active(...)")
        if record.config.get("conv_groups") == "dense":
            raise GraftError(f"adapter_names: {name!r} has PEFT's dense grouped-conv layout (conv_groups=dense), "
                             "which mixed batches do not stack; run it as a whole batch with g.set_active(...)")
        if record.config.get("bias"):
            raise GraftError(f"adapter_names: {name!r} has a bias on B (lora(bias=true)); mixed batches support "
                             "plain LoRA adapters only — run it as a whole batch with g.set_active(...)")
        modules = (record.extras.get("peft") or {}).get("modules")
        if modules and modules in adapters:
            raise GraftError(f"adapter_names: {name!r} comes with replaced module weights ({modules!r}, PEFT's "
                             "modules_to_save), which mixed batches cannot apply per row; run it with "
                             f"g.set_active([{name!r}, {modules!r}])")
    return names


# -- building the mixed graph --------------------------------------------------------------------
def mixed_module(g: "GraftedModule", names: tuple[str, ...], refresh: bool = True) -> fx.GraphModule:
    """The cached runtime module for this mode and these adapters (slot i+1 = names[i]); `refresh`
    restacks eval-mode factors whose parameters changed, as a call needs."""
    key = ("mixed", g.training, names)
    module = g._runtimes.get(key)
    if module is None:
        require_eager(f"the mixed-batch graph for adapters {list(names)}",
                      "call g(**inputs, adapter_names=...) once with these adapters before compiling")
        module = g._runtimes[key] = _build(g, names)
    if refresh and not g.training:
        module.graft_mixed.refresh()
    return module


class _Stacks(nn.Module):
    """Eval-mode stacked factors, rebuilt when any source parameter changes."""

    def __init__(self):
        super().__init__()
        self.builders: list[tuple[str, Any]] = []
        self.sources: list[torch.Tensor] = []
        self.stamp: tuple = ()

    def add(self, name: str, build: Any, sources: list[torch.Tensor]) -> None:
        self.builders.append((name, build))
        self.sources.extend(sources)
        with torch.no_grad():
            self.register_buffer(name, build(), persistent=False)

    def refresh(self) -> None:
        if torch.compiler.is_compiling():  # no version counters under Dynamo: stack in the graph, every call
            with torch.no_grad():
                for name, build in self.builders:
                    setattr(self, name, build())
            return
        stamp = tuple((id(p), p._version) for p in self.sources)
        if stamp == self.stamp:
            return
        with torch.no_grad():
            for name, build in self.builders:
                setattr(self, name, build())
        self.stamp = stamp


def _build(g: "GraftedModule", names: tuple[str, ...]) -> fx.GraphModule:
    graph = specialise(g.graph, (), g.training, g._eager_grad)
    module = fx.GraphModule(g.graph_module, graph)
    module.train(g.training)
    module.add_module("graft", g.store)
    stacks = _Stacks()
    module.add_module("graft_mixed", stacks)
    index_node = _add_input(graph, INDEX_INPUT)
    sites = SiteIndex.build(module)
    builder = _Builder(g, module, stacks, index_node, names, _batch_size(graph))
    for key in _union_sites(g, names):
        site = sites.by_key(key)
        for anchor in sites.anchors.get(key, []):
            builder.branch(site, anchor)
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()
    stacks.refresh()
    return module


def _union_sites(g: "GraftedModule", names: tuple[str, ...]) -> list[str]:
    return list(dict.fromkeys(key for name in names for key in g.adapters[name].sites))


def _add_input(graph: fx.Graph, name: str) -> fx.Node:
    """A new keyword input `name` after the existing ones (also in the pytree calling convention)."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(name)
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        args, kwargs = pytree.tree_unflatten([0] * info.in_spec.num_leaves, info.in_spec)
        in_spec = pytree.tree_flatten((args, {**kwargs, name: 0}))[1]
        codegen.pytree_info = info._replace(orig_args=[*info.orig_args, name], in_spec=in_spec)
    return node


def _batch_size(graph: fx.Graph) -> Any:
    """The traced batch size (a SymInt under dynamic shapes) of the first tensor input, or None."""
    for node in graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() > 0:
                return val.shape[0]
    return None


def _leads_with_batch(size: Any, batch: Any) -> bool:
    """Whether a leading dim of `size` rows is batch-major: a multiple of the batch size."""
    if size is None or batch is None:
        return True
    if isinstance(size, int) and isinstance(batch, int):
        return size % batch == 0
    try:
        import sympy

        expr = getattr(size, "node", None)
        base = getattr(batch, "node", None)
        if expr is None or base is None:
            return True
        return sympy.fraction(sympy.cancel(expr.expr / base.expr))[1] == 1
    except Exception:  # symbolic check unavailable: trust the model's layout
        return True


class _Builder:
    """Inserts the gathered branch at each anchor of the mixed graph."""

    def __init__(self, g: "GraftedModule", module: fx.GraphModule, stacks: _Stacks, index: fx.Node,
                 names: tuple[str, ...], batch: Any):
        self.g, self.module, self.graph, self.stacks = g, module, module.graph, stacks
        self.index, self.names, self.batch = index, names, batch
        self.training = g.training
        self._count = 0
        self._cursor: fx.Node | None = None
        self._buffers: dict[str, str] = {}  # site key -> stack buffer prefix (a module called twice)

    # -- node helpers ------------------------------------------------------------------------------
    def _call(self, op: Any, *args: Any) -> fx.Node:
        with self.graph.inserting_after(self._cursor):
            node = self.graph.call_function(op, tuple(args))
        self._cursor = node
        return node

    def _get(self, target: str) -> fx.Node:
        with self.graph.inserting_after(self._cursor):
            node = self.graph.get_attr(target)
        self._cursor = node
        return node

    def _rows_node(self) -> fx.Node:
        return self._call(aten.sym_size.int, self.index, 0)

    # -- per-site factors ------------------------------------------------------------------------
    def _entries(self, site: Site) -> list[tuple[dict[str, torch.Tensor], float, float] | None]:
        lora_scale = get_method("lora").scale  # through the registry: the engine does not import passes
        out = []
        for name in self.names:
            record = self.g.adapters[name]
            if site.key not in record.sites:
                out.append(None)
                continue
            holder = self.g.store[name][escape(site.key)]
            params = dict(holder.named_parameters(recurse=False))
            out.append((params, lora_scale(record.config), float(record.config.get("dropout") or 0.0)))
        return out

    def _factor_nodes(self, site: Site) -> tuple[fx.Node, fx.Node]:
        """(A stack, B stack) nodes in the layout the site's kind uses, slot 0 zero."""
        entries = self._entries(site)
        if self.training:
            return self._traced_stack(site, entries)
        name = self._buffers.get(site.key)
        if name is None:
            build_a, build_b, sources = _stack_builders(site, entries)
            name = self._buffers[site.key] = f"s{self._count}"
            self._count += 1
            self.stacks.add(f"{name}_A", build_a, sources)
            self.stacks.add(f"{name}_B", build_b, [])
        return self._get(f"graft_mixed.{name}_A"), self._get(f"graft_mixed.{name}_B")

    def _traced_stack(self, site: Site, entries: list) -> tuple[fx.Node, fx.Node]:
        """Training mode: stack the parameters in the graph so gradients reach them."""
        a_names, b_names = _param_names(site)
        rank = _rank(site, entries)
        groups = _groups(site)
        a_slots, b_slots = [], []
        for slot, entry in zip(self.names, entries):
            if entry is None:
                a_slots.append(None)
                b_slots.append(None)
                continue
            prefix = f"graft.{slot}.{escape(site.key)}"
            a = self._get(f"{prefix}.{a_names}")
            b = self._get(f"{prefix}.{b_names}")
            a, b = self._pad_nodes(site, a, b, entry[0][b_names].shape[1], rank, groups)
            b = self._call(aten.mul.Tensor, b, entry[1])
            a_slots.append(self._layout_a(site, a))
            b_slots.append(self._layout_b(site, b))
        return self._stack(a_slots), self._stack(b_slots)

    def _pad_nodes(self, site: Site, a: fx.Node, b: fx.Node, r: int, rank: int, groups: int
                   ) -> tuple[fx.Node, fx.Node]:
        if r == rank:
            return a, b
        if site.kind == "conv":
            a = self._call(aten.unflatten.int, a, 0, [groups, r])                        # (g, r, C/g, kh, kw)
            a = self._call(aten.constant_pad_nd.default, a, [0, 0] * 3 + [0, rank - r])
            a = self._call(aten.flatten.using_ints, a, 0, 1)                             # (g*R, C/g, kh, kw)
            b = self._call(aten.constant_pad_nd.default, b, [0, 0, 0, 0, 0, rank - r])    # (out, R, 1, 1)
        else:
            a = self._call(aten.constant_pad_nd.default, a, [0, 0, 0, rank - r])         # (R, in)
            b = self._call(aten.constant_pad_nd.default, b, [0, rank - r])               # (out, R)
        return a, b

    def _layout_a(self, site: Site, a: fx.Node) -> fx.Node:
        return a if site.kind == "conv" else self._call(aten.t.default, a)              # (in, R)

    def _layout_b(self, site: Site, b: fx.Node) -> fx.Node:
        return b if site.kind == "conv" else self._call(aten.t.default, b)              # (R, out)

    def _stack(self, slots: list[fx.Node | None]) -> fx.Node:
        present = next(s for s in slots if s is not None)
        zero = self._call(aten.zeros_like.default, present)
        return self._call(aten.stack.default, [zero, *[s if s is not None else zero for s in slots]])

    # -- the branch ------------------------------------------------------------------------------
    def branch(self, site: Site, anchor: fx.Node) -> None:
        if site.kind == "packed":
            raise GraftError(f"mixed batches do not support LoRA on {site.key}, a weight read in row blocks "
                             "(nn.MultiheadAttention's in_proj); run each adapter as a whole batch")
        if site.kind == "experts":
            raise GraftError(f"mixed batches do not support LoRA on the expert stack {site.key}: its LoRA changes "
                             "the 3-D weight every row reads (lora(experts)); run each adapter as a whole batch")
        if site.kind == "embedding":
            x = anchor.args[1]
        elif site.kind == "conv":
            x = anchor.args[0]
        else:
            x = get_method("lora").branch_input(anchor, site)
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if val is not None and val.dim() > 0 and not _leads_with_batch(val.shape[0], self.batch):
            raise GraftError(f"mixed batches need the batch dim first, but the input of {site.key} has shape "
                             f"{tuple(val.shape)}; run each adapter as a whole batch instead")
        users = [u for u in anchor.users]
        self._cursor = anchor
        a_stack, b_stack = self._factor_nodes(site)
        rows = self._rows_node()
        a_rows = self._call(aten.index_select.default, a_stack, 0, self.index)
        b_rows = self._call(aten.index_select.default, b_stack, 0, self.index)
        if site.kind == "conv":
            out = self._conv(site, x, anchor, a_rows, b_rows, rows)
        elif site.kind == "embedding":
            out = self._embedding(site, x, anchor, a_stack, b_rows, rows)
        else:
            out = self._linear(site, x, anchor, a_rows, b_rows, rows)
        for user in users:
            user.replace_input_with(anchor, out)

    def _dropout(self, site: Site, x: fx.Node, rank: int) -> fx.Node:
        """Training: each row's own LoRA dropout (probability p of its adapter; 0 for __base__)."""
        probs = [0.0] + [e[2] if e is not None else 0.0 for e in self._entries(site)]
        if not self.training or not any(probs):
            return x
        keep = self._get(self._keep_buffer(probs))
        keep_rows = self._call(aten.index_select.default, keep, 0, self.index)            # (B,)
        shape = [-1] + [1] * (rank - 1)
        keep_rows = self._call(aten.view.default, keep_rows, shape)                       # (B, 1, ...)
        expanded = self._call(aten.expand_as.default, keep_rows, x)
        mask = self._call(aten.bernoulli.default, expanded)
        dropped = self._call(aten.mul.Tensor, x, mask)
        return self._call(aten.div.Tensor, dropped, keep_rows)

    def _keep_buffer(self, probs: list[float]) -> str:
        name = f"keep{self._count}"
        self._count += 1
        self.stacks.register_buffer(name, torch.tensor([1.0 - p for p in probs]), persistent=False)
        return f"graft_mixed.{name}"

    def _linear(self, site: Site, x: fx.Node, anchor: fx.Node, a_rows: fx.Node, b_rows: fx.Node,
                rows: fx.Node) -> fx.Node:
        x_val, y_val = x.meta.get("val"), anchor.meta.get("val")
        x = self._dropout(site, x, x_val.dim() if x_val is not None else 3)
        direct = x_val is not None and y_val is not None and x_val.dim() == 3 and y_val.dim() == 3
        if not direct:
            x = self._call(aten.view.default, x, [rows, -1, site.in_features])             # (B, T, in)
        low = self._call(aten.bmm.default, x, a_rows)                                     # (B, T, R)
        if direct:
            return self._call(aten.baddbmm.default, anchor, low, b_rows)                  # (B, T, out)
        delta = self._call(aten.bmm.default, low, b_rows)                                 # (B, T, out)
        delta = self._call(aten.reshape.default, delta, self._shape_of(anchor))
        return self._call(aten.add.Tensor, anchor, delta)

    def _embedding(self, site: Site, ids: fx.Node, anchor: fx.Node, a_stack: fx.Node, b_rows: fx.Node,
                   rows: fx.Node) -> fx.Node:
        ids2 = self._call(aten.view.default, ids, [rows, -1])                             # (B, T)
        column = self._call(aten.view.default, self.index, [-1, 1])                       # (B, 1)
        low = self._call(aten.index.Tensor, a_stack, [column, ids2])                      # (B, T, R)
        y_val = anchor.meta.get("val")
        if y_val is not None and y_val.dim() == 3:
            return self._call(aten.baddbmm.default, anchor, low, b_rows)                  # (B, T, dim)
        delta = self._call(aten.bmm.default, low, b_rows)
        delta = self._call(aten.reshape.default, delta, self._shape_of(anchor))
        return self._call(aten.add.Tensor, anchor, delta)

    def _conv(self, site: Site, x: fx.Node, anchor: fx.Node, a_rows: fx.Node, b_rows: fx.Node,
              rows: fx.Node) -> fx.Node:
        conv, groups = site.conv, _groups(site)
        if conv.get("dims", 2) != 2:
            raise GraftError(f"mixed batches support LoRA on Conv2d, not on the Conv{conv['dims']}d {site.key}; "
                             "run each adapter as a whole batch with g.set_active(...)")
        x = self._dropout(site, x, 4)
        height = self._call(aten.sym_size.int, x, 2)
        width = self._call(aten.sym_size.int, x, 3)
        flat = self._call(aten.reshape.default, x, [1, -1, height, width])                # (1, B*C, H, W)
        a_flat = self._call(aten.flatten.using_ints, a_rows, 0, 1)                        # (B*g*R, C/g, kh, kw)
        b_flat = self._call(aten.flatten.using_ints, b_rows, 0, 1)                        # (B*out, R, 1, 1)
        all_groups = self._call(operator.mul, rows, groups)
        low = self._call(aten.conv2d.default, flat, a_flat, None, conv["stride"], conv["padding"],
                         conv["dilation"], all_groups)                                    # (1, B*g*R, H', W')
        delta = self._call(aten.conv2d.default, low, b_flat, None, [1, 1], [0, 0], [1, 1], all_groups)
        delta = self._call(aten.reshape.default, delta, self._shape_of(anchor))           # (B, out, H', W')
        return self._call(aten.add.Tensor, anchor, delta)

    def _shape_of(self, node: fx.Node) -> list[Any]:
        val = node.meta.get("val")
        rank = val.dim() if val is not None else 3
        return [self._call(aten.sym_size.int, node, d) for d in range(rank)]


# -- stacked factors (eval) ----------------------------------------------------------------------
def _param_names(site: Site) -> tuple[str, str]:
    return ("lora_embedding_A", "lora_embedding_B") if site.kind == "embedding" else ("lora_A", "lora_B")


def _groups(site: Site) -> int:
    return site.conv["groups"] if site.kind == "conv" else 1


def _rank(site: Site, entries: list) -> int:
    _, b_name = _param_names(site)
    return max(e[0][b_name].shape[1] for e in entries if e is not None)


def _stack_builders(site: Site, entries: list) -> tuple[Any, Any, list[torch.Tensor]]:
    """Callables that build the (A, B) stacks from the current parameters, and those parameters."""
    a_name, b_name = _param_names(site)
    rank, groups = _rank(site, entries), _groups(site)
    sources = [t for e in entries if e is not None for t in (e[0][a_name], e[0][b_name])]

    def padded() -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        out = []
        for entry in entries:
            if entry is None:
                out.append(None)
                continue
            a, b = pad_rank(entry[0][a_name].detach(), entry[0][b_name].detach(), rank, groups)
            out.append((a, b * entry[1]))
        return out

    def layout(pairs: list, which: int) -> torch.Tensor:
        tensors = []
        for pair in pairs:
            if pair is None:
                tensors.append(None)
                continue
            t = pair[which]
            tensors.append(t if site.kind == "conv" else t.t())
        present = next(t for t in tensors if t is not None)
        zero = torch.zeros_like(present)
        return torch.stack([zero, *[t if t is not None else zero for t in tensors]]).contiguous()

    return (lambda: layout(padded(), 0)), (lambda: layout(padded(), 1)), sources
