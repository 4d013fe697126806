"""The graph editor: the one place that keeps the graph's invariants while passes rewrite it.

Every node a pass inserts goes through :meth:`Editor.call` or :meth:`Editor.param`, which

- insert in program order (each new node after the previous one, never in reverse),
- copy ``nn_module_stack`` / ``stack_trace`` from the anchor and compute ``meta["val"]`` with the
  graph's fake mode where it can,
- tag the node ``meta["custom"]["graft"] = {pass, adapter, site, role}`` (``custom`` survives
  re-export; diff and merge read tags, never node names),
- keep adapter parameters in the graph module's ``graft`` store (created once, reused on re-trace).

A *join* is the node where a branch re-enters the main path; the base value is ``args[base]``.
Deactivating an adapter replaces its joins by their base values, so a disabled adapter is the base
graph exactly.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from .errors import GraftError
from .names import safe_atom, safe_target
from .sites import Site
from .trace import fake_call

__all__ = ["Editor", "AdapterStore", "graft_tag", "is_join", "join_chain_end", "STORE"]

STORE = "graft"


def graft_tag(node: fx.Node) -> dict[str, Any] | None:
    return (node.meta.get("custom") or {}).get("graft")


def is_join(node: fx.Node) -> bool:
    tag = graft_tag(node)
    return bool(tag) and tag.get("role") == "join"


def join_chain_end(node: fx.Node, same_shape: bool = False) -> fx.Node:
    """The latest value standing for `node`: follow joins whose base is `node`.

    With `same_shape`, stop before a join that changes the value's shape (a prompt's prepend, tagged
    ``widens``): an additive branch ``base + delta`` on a lookup then joins before the virtual tokens
    are prepended, whichever pass ran first.
    """
    while True:
        nxt = next((u for u in node.users if is_join(u) and u.args[graft_tag(u)["base"]] is node), None)
        if nxt is None or (same_shape and graft_tag(nxt).get("widens")):
            return node
        node = nxt


def _comes_after(node: fx.Node, start: fx.Node) -> bool:
    current = start.next
    while current.op != "root":
        if current is node:
            return True
        current = current.next
    return False


def escape(key: str) -> str:
    esc = re.sub(r"[^0-9A-Za-z_]", "_", key)
    return esc if safe_atom(esc) else f"_{esc}"  # a keyword site ('class') or an empty key


class SiteParams(nn.Module):
    """The parameters one adapter owns at one site."""

    def __init__(self, key: str):
        super().__init__()
        self.site_key = key


class AdapterParams(nn.ModuleDict):
    """One adapter's per-site parameters, keyed by escaped site key."""


class AdapterStore(nn.ModuleDict):
    """All adapters' parameters; installed as ``graph_module.graft``."""

    def site_params(self, adapter: str, key: str, create: bool = True) -> SiteParams | None:
        if adapter not in self:
            if not create:
                return None
            self[adapter] = AdapterParams()
        sites = self[adapter]
        esc = escape(key)
        if esc not in sites:
            if not create:
                return None
            sites[esc] = SiteParams(key)
        return sites[esc]

    def tensors(self, adapter: str) -> dict[str, dict[str, torch.Tensor]]:
        """site key -> {param name: tensor} for one adapter."""
        if adapter not in self:
            return {}
        return {sp.site_key: dict(sp.named_parameters(recurse=True)) | dict(sp.named_buffers())
                for sp in self[adapter].values()}


def _fake(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return value.meta.get("val")
    return value


class Editor:
    """Inserts tagged nodes for one (pass, adapter, site) at one anchor."""

    def __init__(self, gm: fx.GraphModule, method: str, adapter: str, site: Site, anchor: fx.Node):
        self.gm = gm
        self.graph = gm.graph
        self.method = method
        self.adapter = adapter
        self.site = site
        self.anchor = anchor
        self.inserted: list[fx.Node] = []
        self._cursor = anchor
        self._before = False
        store = getattr(gm, STORE, None)
        if not isinstance(store, AdapterStore):
            store = AdapterStore()
            gm.add_submodule(STORE, store)
        self.store: AdapterStore = store

    # -- placement -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def before(self, node: fx.Node) -> Iterator[None]:
        """Insert the following nodes just before `node` (in order)."""
        saved = self._cursor, self._before
        self._cursor, self._before = node, True
        try:
            yield
        finally:
            self._cursor, self._before = saved

    def _insert(self, make: Callable[[], fx.Node]) -> fx.Node:
        context = self.graph.inserting_before(self._cursor) if self._before else \
            self.graph.inserting_after(self._cursor)
        with context:
            node = make()
        if not self._before:
            self._cursor = node
        self.inserted.append(node)
        return node

    def _tag(self, node: fx.Node, role: str, **extra: Any) -> fx.Node:
        for key in ("nn_module_stack", "stack_trace"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        custom = dict(node.meta.get("custom") or {})
        custom["graft"] = {"pass": self.method, "adapter": self.adapter, "site": self.site.key,
                           "role": role, **extra}
        node.meta["custom"] = custom
        return node

    # -- nodes -----------------------------------------------------------------------------------
    def param(self, name: str, init: Callable[[], torch.Tensor], trainable: bool = True) -> fx.Node:
        """A get_attr node for this adapter's parameter `name` at this site (created by `init` once)."""
        holder = self.store.site_params(self.adapter, self.site.key)
        if not hasattr(holder, name):
            value = self._like_base(init())
            if trainable:
                holder.register_parameter(name, nn.Parameter(value))
            else:
                holder.register_buffer(name, value)
        target = f"{STORE}.{self.adapter}.{escape(self.site.key)}.{name}"
        if not safe_target(target):  # names are checked at the boundary; never emit source from others
            raise GraftError(f"refusing to create the graph attribute {target[:120]!r}: not a safe name")
        node = self._insert(lambda: self.graph.get_attr(target))
        value = getattr(holder, name)
        fake_mode = self._fake_mode()
        if fake_mode is not None:
            node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
        return self._tag(node, "param", param=name)

    def _like_base(self, value: torch.Tensor) -> torch.Tensor:
        """New parameters live on the base weight's device, in its floating dtype."""
        reference = None
        if self.site.weight:
            from .sites import weight_value

            reference = weight_value(self.gm, self.site.weight)
        else:
            reference = next(iter(self.gm.parameters()), None)
        if reference is None:
            return value
        dtype = reference.dtype if reference.is_floating_point() and value.is_floating_point() else value.dtype
        return value.to(device=reference.device, dtype=dtype)

    def call(self, op: Any, *args: Any, role: str = "branch", **kwargs: Any) -> fx.Node:
        node = self._insert(lambda: self.graph.call_function(op, tuple(args), dict(kwargs)))
        self._fake_propagate(node, op, args, kwargs)
        return self._tag(node, role)

    def join(self, base: fx.Node, op: Any, *args: Any, **kwargs: Any) -> fx.Node:
        """Insert ``op(*args)`` (one arg is `base`) and route every other user of `base` to it."""
        position = next(i for i, a in enumerate(args) if a is base)
        if not self._before and _comes_after(base, self._cursor):
            self._cursor = base  # base is an earlier adapter's join at this site: join after it
        node = self.call(op, *args, role="join", **kwargs)
        graft_tag(node)["base"] = position
        inserted = set(self.inserted)
        base.replace_all_uses_with(node, delete_user_cb=lambda user: user not in inserted)
        return node

    def value_at(self, node: fx.Node, same_shape: bool = False) -> fx.Node:
        """The current value standing for `node` (after earlier joins on it; see `join_chain_end`)."""
        return join_chain_end(node, same_shape)

    # -- fake values -----------------------------------------------------------------------------
    def _fake_mode(self) -> Any:
        val = self.anchor.meta.get("val")
        if isinstance(val, (list, tuple)):
            val = next((v for v in val if isinstance(v, torch.Tensor)), None)
        return getattr(val, "fake_mode", None)

    def _fake_propagate(self, node: fx.Node, op: Any, args: tuple, kwargs: dict) -> None:
        mode = self._fake_mode()
        if mode is None:
            return
        try:  # fake_call: composite ops (linear, ...) reuse one decomposition across sites
            node.meta["val"] = fake_call(mode, op, *tree_map(_fake, args), **tree_map(_fake, kwargs))
        except Exception:  # shape metadata is a convenience; the graph itself stays valid
            pass
