"""Building the diff: the two views matched, every difference grouped by site and adapter.

A node present on both sides whose inputs now come from other nodes is *rerouted* (the consumer of a
join is); one whose constant arguments differ is *changed*; a weight with other values (a merged module)
is listed under *weights*. :func:`diff` is the entry point (``graftlib.diff(before, after)``).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import torch

from ..errors import GraftError
from .chain import chain
from .match import match, node_ids
from .model import Change, NodeRef, Reroute, SiteDiff
from .result import GraphDiff
from .views import _infer_onnx_tags, _Node, _short, _View, base_title, example_inputs_of, is_onnx, view_of

__all__ = ["diff"]


def _group_key(node: _Node) -> tuple[str, str | None, str | None]:
    tag = node.tag
    if tag and tag.get("adapter") is not None:
        return str(tag.get("site") or node.module), str(tag["adapter"]), tag.get("pass")
    return node.module, None, None


class _Builder:
    """Collects per-site changes while walking the matched graphs."""

    def __init__(self, before: _View, after: _View):
        self.before, self.after = before, after
        self.pairs = match(before, after)
        self.matched_before = set(self.pairs.values())
        self.aids = node_ids(after)
        self.bids = self._before_ids()
        self.inserted = [i for i in range(len(after.nodes)) if i not in self.pairs]
        self.removed = [i for i in range(len(before.nodes)) if i not in self.matched_before]
        _infer_onnx_tags(after, self.inserted)
        _infer_onnx_tags(before, self.removed)
        self.groups: dict[tuple, SiteDiff] = {}
        self.order: dict[tuple, float] = {}
        self.members: dict[tuple, list[int]] = defaultdict(list)
        self.removed_members: dict[tuple, list[int]] = defaultdict(list)

    def _before_ids(self) -> list[str]:
        own = node_ids(self.before)
        mapped = {b: self.aids[a] for a, b in self.pairs.items()}
        taken = set(self.aids)
        return [mapped.get(i) or (f"{own[i]}~before" if own[i] in taken else own[i])
                for i in range(len(self.before.nodes))]

    def group(self, key: tuple[str, str | None, str | None], position: float) -> SiteDiff:
        if key not in self.groups:
            self.groups[key] = SiteDiff(site=key[0], adapter=key[1], method=key[2])
            self.order[key] = position
        self.order[key] = min(self.order[key], position)
        return self.groups[key]

    def ref(self, view: _View, ids: list[str], i: int) -> NodeRef:
        node = view.nodes[i]
        return NodeRef(id=ids[i], op=node.op, kind=node.kind, module=node.module,
                       role=(node.tag or {}).get("role"), label=_node_label(node), shape=node.shape,
                       inputs=[ids[j] for j in node.inputs])

    def before_positions(self) -> list[float]:
        """Where each before-node would sit in the after graph (for ordering removed sites)."""
        to_after = {b: a for a, b in self.pairs.items()}
        positions, last = [], -1.0
        for i in range(len(self.before.nodes)):
            last = float(to_after[i]) if i in to_after else last
            positions.append(last + 0.5)
        return positions

    def build(self) -> GraphDiff:
        for i in self.inserted:
            key = _group_key(self.after.nodes[i])
            self.group(key, i).inserted.append(self.ref(self.after, self.aids, i))
            self.members[key].append(i)
        positions = self.before_positions()
        for i in self.removed:
            key = _group_key(self.before.nodes[i])
            self.group(key, positions[i]).removed.append(self.ref(self.before, self.bids, i))
            self.removed_members[key].append(i)
        self._matched_changes()
        for key, site in self.groups.items():
            site.chain = chain(self.after, self.aids, self.members.get(key, []), site)
            site.removed_chain = chain(self.before, self.bids, self.removed_members.get(key, []), site)
            site.context = self._context(site)
        site_first: dict[str, float] = {}
        for (site, _, _), position in self.order.items():
            site_first[site] = min(site_first.get(site, position), position)
        # at one site, adapters in data-flow order: the one whose branch re-enters first comes first
        last = {k: max(self.members[k], default=self.order[k]) for k in self.groups}
        order = sorted(self.groups, key=lambda k: (site_first[k[0]], last[k]))
        sites = [self.groups[k] for k in order]
        return GraphDiff(self.before.title, self.after.title, sites, self._modules())

    def _matched_changes(self) -> None:
        inserted_key = {i: _group_key(self.after.nodes[i]) for i in self.inserted}
        removed_key = {i: _group_key(self.before.nodes[i]) for i in self.removed}
        for a, b in sorted(self.pairs.items()):
            anode, bnode = self.after.nodes[a], self.before.nodes[b]
            now = [self.aids[j] for j in anode.inputs]
            was = [self.bids[j] for j in bnode.inputs]
            if now != was:
                key = next((inserted_key[j] for j in anode.inputs if j in inserted_key), None) or \
                    next((removed_key[j] for j in bnode.inputs if j in removed_key), None) or _group_key(anode)
                self.group(key, a).rerouted.append(Reroute(self.ref(self.after, self.aids, a), was, now))
            elif anode.consts != bnode.consts and anode.kind == "call":
                self.group(_group_key(anode), a).changed.append(
                    Change(self.ref(self.after, self.aids, a), bnode.consts, anode.consts))
            if anode.kind == "param" and not _same_weight(self.before, self.after, bnode.target, anode.target):
                self.group(_group_key(anode), a).weights.append(anode.target)

    def _context(self, site: SiteDiff) -> list[NodeRef]:
        """Outside nodes the drawings need: inputs of inserted/removed nodes, rerouted consumers."""
        known = {n.id for n in site.inserted + site.removed}
        lookup = {self.aids[i]: (self.after, self.aids, i) for i in range(len(self.after.nodes))}
        for i in range(len(self.before.nodes)):
            lookup.setdefault(self.bids[i], (self.before, self.bids, i))
        wanted = [x for n in site.inserted + site.removed for x in n.inputs] + \
                 [r.node.id for r in site.rerouted]
        out, seen = [], set()
        for node_id in wanted:
            if node_id in known or node_id in seen or node_id not in lookup:
                continue
            seen.add(node_id)
            view, ids, i = lookup[node_id]
            out.append(self.ref(view, ids, i))
        return out

    def _modules(self) -> dict[str, dict[str, Any]]:
        modules: dict[str, dict[str, Any]] = {}
        for view in (self.after, self.before):
            counts: dict[str, Counter] = defaultdict(Counter)
            for node in view.nodes:
                if node.kind == "call" and not node.tag:
                    counts[node.module][_short(node.origin_op or node.op)] += 1
            for path, cls in view.modules.items():
                if path in modules:
                    continue
                ops = counts.get(path, Counter())
                modules[path] = {"class": cls, "ops": sum(ops.values()),
                                 "op": ops.most_common(1)[0][0] if ops else ""}
        return modules


def _same_weight(before: _View, after: _View, btarget: str, atarget: str) -> bool:
    if before.weight is None or after.weight is None:
        return True
    try:
        x, y = before.weight(btarget), after.weight(atarget)
    except (AttributeError, KeyError):
        return True
    if x is y:
        return True
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.device == y.device and x.data_ptr() == y.data_ptr() and x.stride() == y.stride():
            return True
        return bool(torch.equal(x.detach(), y.detach()))
    return x == y


def _node_label(node: _Node) -> str:
    if node.kind == "param" and node.tag and node.tag.get("param"):
        return str(node.tag["param"])
    if node.kind == "param":
        return ".".join(node.target.split(".")[-2:])
    if node.kind == "input":
        return node.target
    if node.kind == "output":
        return "output"
    return _short(node.origin_op or node.op)


def diff(before: Any, after: Any, *, training: bool = False, example_inputs: Any = None) -> GraphDiff:
    """What changed from `before` to `after`: inserted, removed and rerouted nodes by site/adapter.

    Each side is an ``nn.Module`` (traced; ``example_inputs`` default to the other side's trace
    inputs), a ``Traced``, an ``fx.GraphModule``, a ``Grafted`` (its runtime graph for the active
    adapters; a merged module too), an ``onnx.ModelProto`` or a ``.onnx`` path. Graphs are compared
    in eval mode (dropout removed) unless ``training=True``.
    """
    if is_onnx(before) != is_onnx(after):
        raise GraftError("diff compares an ONNX model with another ONNX model; export both sides "
                         "(base and grafted) to ONNX, or pass both as PyTorch modules")
    bview = view_of(before, training, example_inputs if example_inputs is not None else example_inputs_of(after))
    aview = view_of(after, training, example_inputs if example_inputs is not None else example_inputs_of(before))
    for side, other, view in ((before, after, bview), (after, before, aview)):
        base_of = base_title(side, other)
        if base_of:
            view.title = view.title.replace(type(side).__name__, f"{base_of} (base graph)", 1)
    return _Builder(bview, aview).build()
