"""The diff as one self-contained HTML page: inline SVG, the CSS and script inlined, no external resource.

The layout is drawn here, not by a layout engine: the overview is the module tree of the after graph
(untouched modules collapsed to one grey box, numbered layers in a grid), each site a row of its
inserted steps; a site's detail is its branch drawn left to right (inputs -> steps -> rerouted users).
Boxes are sized from a monospace advance (``_CHAR``), so no text measuring is needed. ``html.css`` and
``html.js`` (package data next to this file) are read once and inlined into every page.

No layout library: the overview is a nested module tree (boxes in boxes, layers in a grid), which
layered graph layouts (Graphviz ``dot``, elkjs, dagre) do not draw, and a site's branch is a handful of
nodes in a row. ``dot`` would be a system dependency and elkjs ~1.5 MB inlined into every page; the DOT
output (``GraphDiff.to_dot``) is there for Graphviz users.
"""
from __future__ import annotations

import functools
import html
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .dot import _context_label
from .model import HIGHLIGHT, ChainItem, DiffLike, SiteDiff
from .text import block_lines, collapsed, moved, plural
from .views import _short

__all__ = ["render"]

_FONT = 12.0
_CHAR = 7.23            # DejaVu Sans Mono / Menlo advance at 12px
_PAD = 8.0
_GAP = 6.0
_ROW = 24.0
_MAX_WIDTH = 1340.0
_COLORS = {"removed": "#e03131", "reroute": "#1971c2", "weight": "#7048e8", "ink": "#212529",
           "muted": "#868e96", "line": "#dee2e6", "box": "#f1f3f5"}


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _tw(text: str, size: float = _FONT) -> float:
    return len(text) * _CHAR * size / _FONT


@dataclass
class _Box:
    """A laid-out drawing: size plus a function that renders it at (x, y)."""

    w: float
    h: float
    draw: Callable[[float, float], list[str]]


def _text_el(x: float, y: float, text: str, cls: str = "", size: float = _FONT) -> str:
    size_attr = f' font-size="{size:g}"' if size != _FONT else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}"{size_attr}>{_e(text)}</text>'


def _pill(label: str, cls: str, title: str = "") -> _Box:
    w, h = _tw(label) + 16, 20.0

    def draw(x: float, y: float) -> list[str]:
        tip = f"<title>{_e(title)}</title>" if title else ""
        return [f'<g class="{cls}">{tip}<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                f'rx="10"/>', _text_el(x + 8, y + 14, label), "</g>"]
    return _Box(w, h, draw)


def _label_box(name: str, detail: str, cls: str, title: str = "", min_w: float = 0) -> _Box:
    w = max(min_w, _tw(name) + (_tw(detail, 11) + 14 if detail else 0) + 20)
    h = 22.0

    def draw(x: float, y: float) -> list[str]:
        out = [f'<g class="{cls}"><title>{_e(title or name)}</title>',
               f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="4"/>',
               _text_el(x + 10, y + 15, name, "name")]
        if detail:
            out.append(f'<text x="{x + w - 10:.1f}" y="{y + 15:.1f}" class="detail" font-size="11" '
                       f'text-anchor="end">{_e(detail)}</text>')
        return out + ["</g>"]
    return _Box(w, h, draw)


def _hstack(boxes: list[_Box], gap: float = _GAP, arrows: bool = False) -> _Box:
    step = gap + (10 if arrows else 0)
    w = sum(b.w for b in boxes) + step * max(len(boxes) - 1, 0)
    h = max((b.h for b in boxes), default=0)

    def draw(x: float, y: float) -> list[str]:
        out, cx = [], x
        for k, b in enumerate(boxes):
            if k and arrows:
                mid = y + h / 2
                out.append(f'<path class="arrow" d="M{cx - step + 3:.1f},{mid:.1f} H{cx - 4:.1f}" '
                           'marker-end="url(#arrow)"/>')
            out += b.draw(cx, y + (h - b.h) / 2)
            cx += b.w + step
        return out
    return _Box(w, h, draw)


def _vstack(boxes: list[_Box], gap: float = _GAP) -> _Box:
    w = max((b.w for b in boxes), default=0)
    h = sum(b.h for b in boxes) + gap * max(len(boxes) - 1, 0)

    def draw(x: float, y: float) -> list[str]:
        out, cy = [], y
        for b in boxes:
            out += b.draw(x, cy)
            cy += b.h + gap
        return out
    return _Box(w, h, draw)


def _grid(boxes: list[_Box], max_width: float, gap: float = 10.0) -> _Box:
    cell = max(b.w for b in boxes)
    cols = max(1, min(len(boxes), int((max_width + gap) // (cell + gap))))
    rows = [boxes[i:i + cols] for i in range(0, len(boxes), cols)]
    heights = [max(b.h for b in row) for row in rows]
    w = cols * cell + (cols - 1) * gap
    h = sum(heights) + gap * (len(rows) - 1)

    def draw(x: float, y: float) -> list[str]:
        out, cy = [], y
        for row, rh in zip(rows, heights):
            for k, b in enumerate(row):
                out += b.draw(x + k * (cell + gap), cy)
            cy += rh + gap
        return out
    return _Box(w, h, draw)


def _frame(title: str, detail: str, inner: _Box, depth: int, link: str = "") -> _Box:
    head = 22.0
    w = max(inner.w + 2 * _PAD, _tw(title) + _tw(detail, 11) + 3 * _PAD)
    h = head + inner.h + _PAD

    def draw(x: float, y: float) -> list[str]:
        out = [f'<g class="frame d{min(depth, 3)}"><rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" '
               f'height="{h:.1f}" rx="8"/>', _text_el(x + _PAD, y + 16, title, "ftitle")]
        if detail:
            out.append(_text_el(x + _PAD + _tw(title) + 8, y + 16, detail, "detail", 11))
        out.append("</g>")
        return out + inner.draw(x + _PAD, y + head)
    return _Box(w, h, draw)


class _Tree:
    """The module hierarchy of the after graph, marked where the diff touches it."""

    def __init__(self, d: DiffLike):
        self.d = d
        self.children: dict[str, list[str]] = defaultdict(list)
        self.ops: dict[str, int] = {}
        self.groups: dict[str, list[tuple[int, SiteDiff]]] = defaultdict(list)
        for k, site in enumerate(d.sites):
            self.groups[site.path].append((k, site))
        paths = list(d.modules) + [s.path for s in d.sites]
        for path in dict.fromkeys(paths):
            self._add(path)
        self.touched = {p for path in self.groups for p in self._ancestors(path)}
        self.total: dict[str, int] = {}
        self._sum("")

    def _add(self, path: str) -> None:
        if path in self.ops:
            return
        self.ops[path] = int(self.d.modules.get(path, {}).get("ops", 0))
        if path:
            parent = self._parent(path)
            self._add(parent)
            self.children[parent].append(path)

    @staticmethod
    def _parent(path: str) -> str:
        return path.rsplit(".", 1)[0] if "." in path else ""

    def _ancestors(self, path: str) -> list[str]:
        out = [path]
        while path:
            path = self._parent(path)
            out.append(path)
        return out

    def _sum(self, path: str) -> int:
        self.total[path] = self.ops[path] + sum(self._sum(c) for c in self.children[path])
        return self.total[path]


def _relative(path: str, parent: str) -> str:
    return path[len(parent) + 1:] if parent and path.startswith(parent + ".") else path


def _ops_text(n: int) -> str:
    return plural(n, "op")


def _render_module(tree: _Tree, path: str, label: str, depth: int) -> _Box:
    d = tree.d
    cls = d.modules.get(path, {}).get("class", "")
    if path not in tree.touched:
        return _label_box(label, _ops_text(tree.total[path]), "mod", f"{path or d.after}  {cls}")
    kids = tree.children[path]
    if not tree.groups[path] and not tree.ops[path] and len(kids) == 1:
        child = kids[0]
        return _render_module(tree, child, f"{label}.{_relative(child, path)}" if label else child, depth)
    rows: list[_Box] = []
    if tree.groups[path]:
        rows.append(_site_rows(tree, path, label if not kids else "(this module)"))
        if not kids:
            return rows[0]
    rows += _child_rows(tree, path, depth)
    numeric = len(kids) >= 4 and all(_relative(k, path).isdigit() for k in kids)
    inner = _grid(rows, _MAX_WIDTH - 2 * _PAD * (depth + 1)) if numeric else _vstack(rows)
    return _frame(label or cls or "model", cls if label else "", inner, depth)


def _child_rows(tree: _Tree, path: str, depth: int) -> list[_Box]:
    rows: list[_Box] = []
    quiet: list[str] = []
    parent_name = path.rsplit(".", 1)[-1]

    def flush() -> None:
        if quiet:
            names = [_relative(q, path) for q in quiet]
            text = ", ".join(names)
            short = text if len(text) <= 48 else text[:45] + "..."
            rows.append(_label_box(short, _ops_text(sum(tree.total[q] for q in quiet)), "mod",
                                   "\n".join(quiet)))
            quiet.clear()
    for child in tree.children[path]:
        if child in tree.touched:
            flush()
            name = _relative(child, path)
            rows.append(_render_module(tree, child, f"{parent_name}.{name}" if name.isdigit() else name,
                                       depth + 1))
        else:
            quiet.append(child)
    flush()
    if tree.ops[path]:
        rows.append(_label_box("(own ops)", _ops_text(tree.ops[path]), "mod",
                               f"ops called directly in {path or 'the root module'}"))
    return rows


def _site_rows(tree: _Tree, path: str, label: str) -> _Box:
    info = tree.d.modules.get(path, {})
    base = _label_box(label, info.get("op", ""), "site-base", path, min_w=0)
    chips = len({s.who for s in tree.d.sites}) > 1
    lines = [_site_line(k, site, chips) for k, site in tree.groups[path]]
    return _hstack([base, _vstack(lines, 4)], 10)


def _site_line(k: int, site: SiteDiff, chip: bool) -> _Box:
    """One adapter's change at a site: [adapter] (step) -> (step) -> ... +n ~r (who only if several)."""
    parts: list[_Box] = []
    if site.who and chip:
        parts.append(_pill(site.who, "who"))
    steps = [_pill(item.label, "ins", f"{item.op} ({item.role or 'inserted'})") for item in site.chain]
    steps += [_pill(item.label, "rem", f"{item.op} (removed)") for item in site.removed_chain]
    if not steps and site.inserted:
        steps = [_pill(_short(n.op), "ins", n.id) for n in site.inserted]
    if not steps and site.removed:
        steps = [_pill(_short(n.op), "rem", n.id) for n in site.removed]
    chain = _hstack(steps, 4, arrows=True) if steps else None
    badges = []
    if site.inserted:
        badges.append(_count_pill(site))
    if site.removed:
        badges.append(_pill(f"-{len(site.removed)}", "rem"))
    if site.rerouted:
        badges.append(_pill(f"~{len(site.rerouted)}", "rer", plural(len(site.rerouted), "rerouted node") + ": "
                            + ", ".join(r.node.id for r in site.rerouted)))
    if site.changed:
        badges.append(_pill(f"~{len(site.changed)} changed", "rer"))
    if site.weights:
        badges.append(_pill(f"{plural(len(site.weights), 'weight')} changed", "wt"))
    row = _hstack(parts + ([chain] if chain else []) + badges, 8)

    def draw(x: float, y: float) -> list[str]:
        return [f'<a href="#s{k}" class="site">'] + row.draw(x, y) + ["</a>"]
    return _Box(row.w, row.h, draw)


def _count_pill(site: SiteDiff) -> _Box:
    """``+3 ops +2 params``: the inserted nodes, ops (the steps drawn beside it) and parameters apart."""
    params = sum(1 for n in site.inserted if n.kind == "param")
    ops = len(site.inserted) - params
    label = " ".join(part for part in (f"+{plural(ops, 'op')}" if ops else "",
                                       f"+{plural(params, 'param')}" if params else "") if part)
    return _pill(label, "count", f"{plural(len(site.inserted), 'inserted node')}: {plural(ops, 'op')} and "
                                 f"{plural(params, 'parameter')} (the adapter's tensors, read by the ops)")


_SVG_DEFS = ('<defs><marker id="arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" fill="#adb5bd"/></marker></defs>')


def _svg(box: _Box, cls: str) -> str:
    w, h = box.w + 2 * _PAD, box.h + 2 * _PAD
    body = "\n".join(box.draw(_PAD, _PAD))
    return (f'<svg class="{cls}" xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
            f'viewBox="0 0 {w:.0f} {h:.0f}">{_SVG_DEFS}\n{body}\n</svg>')


def _overview(d: DiffLike) -> str:
    if d.empty:
        return '<p class="none">No differences: the two graphs have the same nodes, inputs and weights.</p>'
    tree = _Tree(d)
    return _svg(_render_module(tree, "", "", 0), "overview")


def _local_graph(site: SiteDiff) -> str:
    """The site's branch, left to right: inputs (grey) -> steps (orange) -> rerouted users (blue);
    adapter parameters sit above the step that reads them, side inputs below."""
    chain = site.chain or site.removed_chain
    kind = "ins" if site.chain else "rem"
    if not chain:
        return ""
    labels: dict[str, tuple[str, str]] = {n.id: (_context_label(n), "ctx") for n in site.context}
    for n in site.inserted + site.removed:
        if n.kind == "param":
            labels[n.id] = (n.label, "prm")
    for item in chain:
        labels[item.key] = (item.label, kind)
    keys = {item.key for item in chain}
    users = [r for r in site.rerouted if any(s in keys for s in r.now)]
    for r in users:
        labels[r.node.id] = (r.node.label + " (rerouted)", "usr")
    edges = [(src, item.key) for item in chain for src in item.inputs if src in labels]
    edges += [(src, r.node.id) for r in users for src in r.now if src in keys]
    return _draw_local(_place(labels, edges, chain, [r.node.id for r in users]), labels, edges)


def _place(labels: dict[str, tuple[str, str]], edges: list[tuple[str, str]], chain: list[ChainItem],
           users: list[str]) -> dict[str, tuple[int, int]]:
    """(column, row) per node: steps and users on row 1, parameters above, side inputs below."""
    preds: dict[str, list[str]] = defaultdict(list)
    succs: dict[str, list[str]] = defaultdict(list)
    for src, dst in edges:
        preds[dst].append(src)
        succs[src].append(dst)
    col: dict[str, int] = {}
    for node_id in [i.key for i in chain] + users:
        col[node_id] = 1 + max((col[p] for p in preds[node_id] if p in col), default=0)
    first = min((col[i.key] for i in chain), default=1)
    taken: set[tuple[int, int]] = {(col[n], 1) for n in col}
    place = {n: (c, 1) for n, c in col.items()}
    for node_id, (_, kind) in labels.items():
        targets = [col[s] for s in succs[node_id] if s in col]
        if node_id in place or not targets:
            continue
        c = max(0, min(targets) - 1)
        row, step = (0, -1) if kind == "prm" else ((1, 1) if min(targets) == first else (2, 1))
        while (c, row) in taken:
            row += step
        taken.add((c, row))
        place[node_id] = (c, row)
    return place


def _draw_local(place: dict[str, tuple[int, int]], labels: dict[str, tuple[str, str]],
                edges: list[tuple[str, str]]) -> str:
    top = min(r for _, r in place.values())
    widths: dict[int, float] = defaultdict(float)
    for node_id, (c, _) in place.items():
        widths[c] = max(widths[c], _tw(labels[node_id][0]) + 16)
    xs, x = {}, _PAD
    for c in range(max(widths) + 1):
        xs[c] = x
        x += widths.get(c, 0) + (44 if c in widths else 0)
    pos = {n: (xs[c], _PAD + (r - top) * 32, _tw(labels[n][0]) + 16) for n, (c, r) in place.items()}
    out = []
    for src, dst in edges:
        if src in pos and dst in pos:
            sx, sy, sw = pos[src]
            dx, dy, _ = pos[dst]
            x1, y1, x2, y2 = sx + sw, sy + 10, dx - 2, dy + 10
            mid = (x1 + x2) / 2
            out.append(f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} '
                       f'{x2:.1f},{y2:.1f}" marker-end="url(#arrow)"/>')
    for node_id, (px, py, pw) in pos.items():
        label, kind = labels[node_id]
        out.append(f'<g class="{kind}"><title>{_e(node_id)}</title><rect x="{px:.1f}" y="{py:.1f}" '
                   f'width="{pw:.1f}" height="20" rx="10"/>{_text_el(px + 8, py + 14, label)}</g>')
    w = x - 44 + _PAD
    h = max(py for _, py, _ in pos.values()) + 20 + _PAD
    return (f'<svg class="local" xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
            f'viewBox="0 0 {w:.0f} {h:.0f}">{_SVG_DEFS}{"".join(out)}</svg>')


def _node_rows(site: SiteDiff) -> str:
    rows = []
    for sign, nodes in (("+", site.inserted), ("-", site.removed)):
        for n in nodes:
            rows.append(f'<tr class="{"i" if sign == "+" else "r"}"><td>{sign}</td><td>{_e(n.id)}</td>'
                        f'<td>{_e(n.op)}</td><td>{_e(n.role or "")}</td><td>{_e(n.shape)}</td>'
                        f'<td>{_e(", ".join(n.inputs))}</td></tr>')
    for r in site.rerouted:
        rows.append(f'<tr class="w"><td>~</td><td>{_e(r.node.id)}</td><td>{_e(r.node.op)}</td><td>rerouted</td>'
                    f'<td>{_e(r.node.shape)}</td><td>now {_e(moved(r)[0])}<br>was {_e(moved(r)[1])}'
                    '</td></tr>')
    for c in site.changed:
        rows.append(f'<tr class="w"><td>~</td><td>{_e(c.node.id)}</td><td>{_e(c.node.op)}</td><td>changed</td>'
                    f'<td></td><td>{_e(c.was)} &rarr; {_e(c.now)}</td></tr>')
    for w in site.weights:
        rows.append(f'<tr class="w"><td>~</td><td>{_e(w)}</td><td>weight</td><td>values changed</td>'
                    '<td></td><td></td></tr>')
    head = "<tr><th></th><th>node</th><th>op</th><th>role</th><th>shape</th><th>inputs</th></tr>"
    return f'<table>{head}{"".join(rows)}</table>'


def _site_details(k: int, site: SiteDiff) -> str:
    lines = block_lines(site, site.site)
    summary = "<br>".join(
        f'<span class="sign s{_e(sign)}">{_e(sign)}</span> <b>{_e(name)}</b> {_e(body)} '
        f'<span class="muted">({_e(counts)})</span>' for sign, name, body, counts in lines)
    return (f'<details class="site" id="s{k}"><summary>{summary}</summary><div class="body">'
            f'{_local_graph(site)}{_node_rows(site)}</div></details>')


def _summary_html(d: DiffLike) -> str:
    c = d.counts()
    chips = [("sites", c["sites"], ""), ("inserted", c["inserted"], "ins"), ("removed", c["removed"], "rem"),
             ("rerouted", c["rerouted"], "rer"), ("changed", c["changed"], "rer"),
             ("weights changed", c["weights"], "wt")]
    out = "".join(f'<span class="chip {cls}"><b>{n}</b> {_e(name)}</span>' for name, n, cls in chips)
    adapters = ", ".join(d.adapters)
    return out + (f'<span class="chip">adapters: {_e(adapters)}</span>' if adapters else "")


def _compact_html(d: DiffLike) -> str:
    rows = []
    for site, name, count in collapsed(d):
        for sign, label, body, counts in block_lines(site, name, count):
            rows.append(f'<div><span class="sign s{_e(sign)}">{_e(sign)}</span> <b>{_e(label)}</b>  '
                        f'{_e(body)}  <span class="muted">({_e(counts)})</span></div>')
    return f'<div class="compact">{"".join(rows)}</div>' if rows else ""


@functools.lru_cache(maxsize=None)
def _asset(name: str) -> str:
    """``html.css`` / ``html.js``, package data of graftlib.diff."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _style() -> str:
    palette = {"highlight": HIGHLIGHT, **_COLORS}
    return ":root{" + ";".join(f"--{k}:{v}" for k, v in palette.items()) + "}\n" + _asset("html.css")


def render(d: DiffLike, title: str | None = None) -> str:
    title = title or f"graftlib diff: {d.after}"
    whos = {s.who for s in d.sites}
    by = f" by {next(iter(whos))}" if len(whos) == 1 and next(iter(whos)) else ""
    legend = (f'<div class="legend"><span><i style="background:{HIGHLIGHT}"></i>inserted{_e(by)}</span>'
              '<span><i style="background:#fff5f5;border:1px dashed #e03131"></i>removed</span>'
              '<span><i style="background:#e7f5ff;border:1px solid #74c0fc"></i>rerouted</span>'
              '<span><i style="background:#f1f3f5;border:1px solid #e9ecef"></i>unchanged module '
              '(collapsed)</span><span class="muted">click a site to expand it</span></div>')
    sites = "".join(_site_details(k, s) for k, s in enumerate(d.sites))
    buttons = ('<button onclick="setAll(true)">expand all</button>'
               '<button onclick="setAll(false)">collapse all</button>') if d.sites else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_style()}</style></head>
<body><header><h1>{_e(title)}</h1>
<div class="sides"><span class="b">--- {_e(d.before)}</span><br><span class="a">+++ {_e(d.after)}</span></div>
<div class="chips">{_summary_html(d)}</div></header>
<main><h2>Changes</h2>{_compact_html(d) or '<p class="muted">none</p>'}
<h2>Graph</h2>{legend}
<div class="scroll">{_overview(d)}</div>
<h2>Sites{buttons}</h2>{sites or '<p class="muted">none</p>'}
</main><script>{_asset("html.js")}</script></body></html>
"""
