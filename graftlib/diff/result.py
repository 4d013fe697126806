"""``GraphDiff``: the difference between two graphs, its queries and its formats (text, JSON, DOT, HTML)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import GraftError
from .dot import render as render_dot
from .html import render as render_html
from .model import NodeRef, Reroute, SiteDiff, counts, site_from_dict
from .text import render as render_text

__all__ = ["GraphDiff", "FORMAT_VERSION"]

FORMAT_VERSION = 1


@dataclass
class GraphDiff:
    """The difference between two graphs, grouped by site and adapter (see :func:`diff`)."""

    before: str
    after: str
    sites: list[SiteDiff] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)   # path -> {class, ops, op}

    # -- queries -------------------------------------------------------------------------------
    @property
    def inserted(self) -> list[NodeRef]:
        return [n for s in self.sites for n in s.inserted]

    @property
    def removed(self) -> list[NodeRef]:
        return [n for s in self.sites for n in s.removed]

    @property
    def rerouted(self) -> list[Reroute]:
        return [r for s in self.sites for r in s.rerouted]

    @property
    def adapters(self) -> list[str]:
        return list(dict.fromkeys(s.adapter for s in self.sites if s.adapter is not None))

    def by_adapter(self) -> dict[str | None, list[SiteDiff]]:
        out: dict[str | None, list[SiteDiff]] = {}
        for site in self.sites:
            out.setdefault(site.adapter, []).append(site)
        return out

    def site(self, key: str, adapter: str | None = None) -> SiteDiff:
        for s in self.sites:
            if s.site == key and (adapter is None or s.adapter == adapter):
                return s
        raise KeyError(f"no change at site {key!r}" + (f" for adapter {adapter!r}" if adapter else ""))

    def counts(self) -> dict[str, int]:
        return counts(self.sites)

    @property
    def empty(self) -> bool:
        return not self.sites

    def __bool__(self) -> bool:
        return not self.empty

    def __str__(self) -> str:
        return self.format_text()

    # -- formats -------------------------------------------------------------------------------
    def format_text(self, color: bool = False, verbose: bool = False) -> str:
        return render_text(self, color=color, verbose=verbose)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "graftlib-diff", "version": FORMAT_VERSION, "summary": self.counts(),
                **dataclasses.asdict(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphDiff":
        if data.get("format") != "graftlib-diff":
            raise GraftError(f"not a graftlib diff (format={data.get('format')!r}); "
                             "write one with GraphDiff.to_json()")
        return cls(data["before"], data["after"], [site_from_dict(s) for s in data["sites"]],
                   dict(data.get("modules", {})))

    def to_dot(self) -> str:
        return render_dot(self)

    def to_html(self, title: str | None = None) -> str:
        return render_html(self, title)

    def format(self, fmt: str = "text", color: bool = False, verbose: bool = False) -> str:
        if fmt == "text":
            return self.format_text(color=color, verbose=verbose)
        if fmt == "json":
            return self.to_json() + "\n"
        if fmt == "dot":
            return self.to_dot()
        if fmt == "html":
            return self.to_html()
        raise GraftError(f"unknown diff format {fmt!r}; use text, json, dot or html")
