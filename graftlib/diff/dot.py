"""The diff as Graphviz DOT: one cluster per site, inserted steps filled in the highlight colour."""
from __future__ import annotations

from collections.abc import Callable

from .model import HIGHLIGHT, DiffLike, NodeRef, SiteDiff
from .text import summary

__all__ = ["render"]


def _dq(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render(d: DiffLike) -> str:
    lines = ["digraph graftlib_diff {", "  rankdir=LR;", '  graph [fontname="monospace", fontsize=10];',
             '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10, '
             'fillcolor="#f1f3f5", color="#adb5bd"];', '  edge [color="#868e96"];',
             f"  label={_dq(d.before + '  ->  ' + d.after + '  |  ' + summary(d))};"]
    names: dict[str, str] = {}

    def name(node_id: str) -> str:
        return names.setdefault(node_id, f"n{len(names)}")

    edges: set[tuple[str, str, str]] = set()
    for k, site in enumerate(d.sites):
        lines.append(f"  subgraph cluster_{k} {{")
        lines.append(f"    label={_dq(site.site + ('  ' + site.who if site.who else ''))}; style=rounded; "
                     'color="#ced4da";')
        _dot_site(site, lines, name, edges)
        lines.append("  }")
    declared = set(names)
    context = {n.id: n for site in d.sites for n in site.context}
    for src, dst, style in sorted(edges):
        for node_id in (src, dst):
            if node_id not in declared:
                declared.add(node_id)
                label = _context_label(context[node_id]) if node_id in context else node_id
                lines.append(f"  {name(node_id)} [label={_dq(label)}];")
        lines.append(f"  {name(src)} -> {name(dst)}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _context_label(node: NodeRef) -> str:
    """``query.linear``: a node outside the site, named by its module's last part and its op."""
    owner = node.module.rsplit(".", 1)[-1]
    return f"{owner}.{node.label}" if owner and node.kind == "call" else node.label


def _dot_site(site: SiteDiff, lines: list[str], name: Callable[[str], str],
              edges: set[tuple[str, str, str]]) -> None:
    params = {n.id: n for n in site.inserted + site.removed if n.kind == "param"}
    for n in params.values():
        fill = "#ffe8cc" if n in site.inserted else "#fff5f5"
        lines.append(f"    {name(n.id)} [label={_dq(n.label)}, fillcolor={_dq(fill)}, color={_dq(HIGHLIGHT)}];")
    for chain, fill, font in ((site.chain, HIGHLIGHT, "white"), (site.removed_chain, "#fff5f5", "#c92a2a")):
        style = "" if chain is site.chain else ', style="rounded,filled,dashed", color="#e03131"'
        for item in chain:
            lines.append(f"    {name(item.key)} [label={_dq(item.label)}, fillcolor={_dq(fill)}, "
                         f"fontcolor={_dq(font)}{style}];")
            for src in item.inputs:
                edges.add((src, item.key, ""))
    keys = {item.key for item in site.chain}
    for r in site.rerouted:
        lines.append(f"    {name(r.node.id)} [label={_dq(r.node.label + ' (rerouted)')}, "
                     'style="rounded,filled,dashed", fillcolor="#e7f5ff", color="#1971c2"];')
        for src in r.now:
            if src in keys or src in params:
                edges.add((src, r.node.id, ' [color="#1971c2"]'))
    for w in site.weights:
        lines.append(f"    {name('weight:' + w)} [label={_dq(w + ' (changed)')}, fillcolor=\"#f3f0ff\", "
                     'color="#7048e8"];')
