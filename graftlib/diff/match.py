"""Matching: which node of the before graph each node of the after graph is.

Nodes are identified by provenance, never by node names (they renumber on every trace or export): inputs
by name, weights by target, graft-inserted nodes by (adapter, site, op, occurrence), every other node by
aligning the sequence of ops module by module, so two independent traces of one model match node for node.
"""
from __future__ import annotations

import difflib
from collections import Counter, defaultdict

from .views import _Node, _short, _View

__all__ = ["match", "node_ids"]


def _anchor_key(node: _Node) -> tuple | None:
    if node.kind == "input":
        return ("input", node.target)
    if node.kind == "output":
        return ("output",)
    if node.kind == "param":
        return ("param", node.target)
    if node.tag:
        return ("graft", node.tag.get("adapter"), node.tag.get("site"), node.op)
    return None


def _keys(view: _View) -> list[tuple | None]:
    seen: Counter = Counter()
    keys: list[tuple | None] = []
    for node in view.nodes:
        key = _anchor_key(node)
        if key is not None:
            key = key + (seen[key],)
            seen[key[:-1]] += 1
        keys.append(key)
    return keys


def match(before: _View, after: _View) -> dict[int, int]:
    """after index -> before index for every node present on both sides."""
    bkeys, akeys = _keys(before), _keys(after)
    anchored = {k: i for i, k in enumerate(bkeys) if k is not None}
    pairs = {i: anchored[k] for i, k in enumerate(akeys) if k is not None and k in anchored}
    bmods: dict[str, list[int]] = defaultdict(list)
    amods: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(bkeys):
        if k is None:
            bmods[before.nodes[i].module].append(i)
    for i, k in enumerate(akeys):
        if k is None:
            amods[after.nodes[i].module].append(i)
    for module, aidx in amods.items():
        bidx = bmods.get(module, [])
        matcher = difflib.SequenceMatcher(None, [before.nodes[i].op for i in bidx],
                                          [after.nodes[i].op for i in aidx], autojunk=False)
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                pairs[aidx[block.b + k]] = bidx[block.a + k]
    return pairs


def node_ids(view: _View) -> list[str]:
    """Stable, readable ids: ``param:<target>``, ``<adapter>:<site>:<op>#k``, ``<module>:<op>#k``."""
    seen: Counter = Counter()
    ids = []
    for node in view.nodes:
        if node.kind == "input":
            ids.append(f"input:{node.target}")
            continue
        if node.kind == "param":
            ids.append(f"param:{node.target}")
            continue
        if node.kind == "output":
            ids.append("output")
            continue
        tag = node.tag if node.tag and node.tag.get("adapter") is not None and "pass" in node.tag else None
        base = f"{tag['adapter']}:{tag['site']}:{_short(node.op)}" if tag else \
            f"{node.module or '.'}:{_short(node.op)}"
        ids.append(f"{base}#{seen[base]}")
        seen[base] += 1
    return ids
