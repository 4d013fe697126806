"""The diff's records: nodes named by provenance, inserted branches as drawn steps, changes per site.

Plain data (no torch): :func:`graftlib.diff` returns a :class:`~graftlib.diff.result.GraphDiff` of these,
and the text, DOT and HTML renderers read them through :class:`DiffLike`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["NodeRef", "ChainItem", "Reroute", "Change", "SiteDiff", "DiffLike", "site_from_dict", "counts",
           "HIGHLIGHT"]

HIGHLIGHT = "#e8590c"   # inserted nodes in the HTML and DOT drawings


@dataclass
class NodeRef:
    """One node named by provenance: ``id`` is stable across re-traces, ``op`` is the aten target
    (``aten.linear.default``), ``get_attr`` / ``placeholder`` or the ONNX op type."""

    id: str
    op: str
    kind: str                      # "call" | "param" | "input" | "output"
    module: str                    # module path ("" for the root)
    role: str | None = None        # graft role: "branch" | "join" | "param" | ...
    label: str = ""                # short display label, e.g. "linear" or "query.weight"
    shape: str = ""
    inputs: list[str] = field(default_factory=list)


@dataclass
class ChainItem:
    """One drawn step of an inserted branch: ``linear(x,A)``. ``ids`` are its nodes (an ONNX step can
    be several nodes lowered from one aten op); ``inputs`` name other steps, params or context nodes."""

    label: str
    op: str
    ids: list[str]
    inputs: list[str]
    role: str | None = None

    @property
    def key(self) -> str:
        return self.ids[-1]


@dataclass
class Reroute:
    """A node on both sides whose inputs changed: ``was`` / ``now`` are input ids."""

    node: NodeRef
    was: list[str]
    now: list[str]


@dataclass
class Change:
    """A node on both sides with the same inputs but other constant arguments."""

    node: NodeRef
    was: str
    now: str


@dataclass
class SiteDiff:
    """Everything that changed at one site for one adapter (``adapter`` None: untagged changes)."""

    site: str
    adapter: str | None = None
    method: str | None = None
    inserted: list[NodeRef] = field(default_factory=list)
    removed: list[NodeRef] = field(default_factory=list)
    rerouted: list[Reroute] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    chain: list[ChainItem] = field(default_factory=list)
    removed_chain: list[ChainItem] = field(default_factory=list)
    context: list[NodeRef] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The module path (the site key without a fused-projection part such as ``[q]``)."""
        return self.site.split("[", 1)[0]

    @property
    def who(self) -> str:
        if self.adapter is None:
            return ""
        return f"{self.method}[{self.adapter}]" if self.method else f"[{self.adapter}]"

    @property
    def kind(self) -> str:
        if self.inserted and not self.removed:
            return "+"
        if self.removed and not self.inserted:
            return "-"
        return "±" if self.inserted else "~"


class DiffLike(Protocol):
    """What the renderers (text, dot, html) read of a diff; :class:`~graftlib.diff.result.GraphDiff` is one."""

    before: str
    after: str
    sites: list[SiteDiff]
    modules: dict[str, dict[str, Any]]     # path -> {class, ops, op}

    @property
    def adapters(self) -> list[str]: ...
    @property
    def empty(self) -> bool: ...
    def counts(self) -> dict[str, int]: ...


def site_from_dict(d: dict[str, Any]) -> SiteDiff:
    ref = lambda x: NodeRef(**x)  # noqa: E731
    return SiteDiff(
        site=d["site"], adapter=d["adapter"], method=d["method"],
        inserted=[ref(x) for x in d["inserted"]], removed=[ref(x) for x in d["removed"]],
        rerouted=[Reroute(ref(r["node"]), r["was"], r["now"]) for r in d["rerouted"]],
        changed=[Change(ref(c["node"]), c["was"], c["now"]) for c in d["changed"]],
        weights=list(d["weights"]),
        chain=[ChainItem(**c) for c in d["chain"]],
        removed_chain=[ChainItem(**c) for c in d["removed_chain"]],
        context=[ref(x) for x in d["context"]])


def counts(sites: list[SiteDiff]) -> dict[str, int]:
    """The summary line's numbers: sites touched, adapters, inserted / removed / rerouted / changed nodes."""
    return {
        "sites": len({s.site for s in sites if s.inserted or s.removed}),
        "adapters": len({s.adapter for s in sites if s.adapter is not None}),
        "inserted": sum(len(s.inserted) for s in sites),
        "removed": sum(len(s.removed) for s in sites),
        "rerouted": sum(len(s.rerouted) for s in sites),
        "changed": sum(len(s.changed) for s in sites),
        "weights": sum(len(s.weights) for s in sites),
    }
