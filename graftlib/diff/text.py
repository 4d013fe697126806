"""The diff as text: one line per site (identical layers collapsed to ``layer.{0-11}``) and a summary.

    + encoder.layer.{0-1}.attention.self.query  lora[default]: linear(x,A) -> linear(.,B) -> add scale=2.0
"""
from __future__ import annotations

import re

from .model import ChainItem, DiffLike, Reroute, SiteDiff
from .views import _short

__all__ = ["render", "block_lines", "collapsed", "summary", "moved", "plural"]


_ANSI = {"+": "\x1b[32m", "-": "\x1b[31m", "~": "\x1b[33m", "±": "\x1b[35m", "bold": "\x1b[1m",
         "dim": "\x1b[2m", "reset": "\x1b[0m"}
_LAYER = re.compile(r"(?<![^.])(\d+)(?=\.|$|\[)")


def _paint(text: str, style: str, color: bool) -> str:
    return f"{_ANSI[style]}{text}{_ANSI['reset']}" if color and text else text


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _chain_text(chain: list[ChainItem]) -> str:
    return " -> ".join(item.label for item in chain)


def block_lines(site: SiteDiff, name: str, count: int = 1) -> list[tuple[str, str, str, str]]:
    """(sign, site name, body, counts) lines of one site block (`count` identical sites collapsed)."""
    each = " each" if count > 1 else ""
    times = [f"x{count}"] if count > 1 else []
    who = f"{site.who}: " if site.who else ""
    lines = []
    extra = []
    if site.rerouted:
        extra.append(f"{len(site.rerouted)} rerouted{each}")
    if site.changed:
        extra.append(f"{len(site.changed)} changed{each}")
    if site.inserted:
        counts = ", ".join(times + [f"+{plural(len(site.inserted), 'node')}{each}"] + extra)
        body = _chain_text(site.chain) or ", ".join(_short(n.op) for n in site.inserted)
        lines.append(("+", name, who + body, counts))
        extra = []
    if site.removed:
        counts = ", ".join(times + [f"-{plural(len(site.removed), 'node')}{each}"] + extra)
        body = _chain_text(site.removed_chain) or ", ".join(_short(n.op) for n in site.removed)
        lines.append(("-", name, who + body, counts))
        extra = []
    if extra and site.rerouted:
        r = site.rerouted[0]
        now, was = moved(r)
        lines.append(("~", name, who + f"{_short(r.node.op)} now reads {now} (was {was})",
                      ", ".join(times + extra)))
    elif extra:
        c = site.changed[0]
        lines.append(("~", name, who + f"{_short(c.node.op)} args {c.was} -> {c.now}", ", ".join(times + extra)))
    if site.weights:
        names = ", ".join(w.rsplit(".", 1)[-1] for w in site.weights)
        lines.append(("~", name, f"weights changed: {names}",
                      ", ".join(times + [plural(len(site.weights), "weight") + each])))
    return lines


def _readable(ids: list[str]) -> str:
    return ", ".join(i.split(":", 1)[-1] if i.startswith("param:") else i for i in ids) or "nothing"


def moved(r: Reroute) -> tuple[str, str]:
    """The inputs of a rerouted node that changed: (now, was), other inputs left out."""
    if len(r.now) == len(r.was):
        pairs = [(n, w) for n, w in zip(r.now, r.was) if n != w]
        return _readable([n for n, _ in pairs]), _readable([w for _, w in pairs])
    return _readable(r.now), _readable(r.was)


def _signature(site: SiteDiff) -> tuple[str, str] | None:
    """(site with its layer index as {}, block text with that layer's path generalised) for collapsing."""
    match = _LAYER.search(site.site)
    if match is None:
        return None
    prefix = site.site[:match.end()]
    general = site.site[:match.start()] + "{}"
    body = "\n".join("|".join(line) for line in block_lines(site, ""))
    return general + site.site[match.end():], body.replace(prefix + ".", general + ".")


def _ranges(numbers: list[int]) -> str:
    numbers = sorted(set(numbers))
    parts, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None]):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


def collapsed(d: DiffLike) -> list[tuple[SiteDiff, str, int]]:
    """(representative site, display name, number of sites) with identical layers merged."""
    groups: dict[tuple, list[SiteDiff]] = {}
    order: list[tuple] = []
    for site in d.sites:
        sig = _signature(site)
        key = (sig, site.adapter) if sig else (id(site),)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(site)
    out = []
    for key in order:
        sites = groups[key]
        if len(sites) == 1:
            out.append((sites[0], sites[0].site, 1))
            continue
        pattern = key[0][0]
        layers = [int(_LAYER.search(s.site).group(1)) for s in sites]
        out.append((sites[0], pattern.replace("{}", "{" + _ranges(layers) + "}"), len(sites)))
    return out


def summary(d: DiffLike) -> str:
    c = d.counts()
    return (f"{plural(c['sites'], 'site')}, {plural(c['adapters'], 'adapter')}: +{c['inserted']} inserted, "
            f"-{c['removed']} removed, ~{c['rerouted']} rerouted, {c['changed']} changed, "
            f"{plural(c['weights'], 'weight')} changed")


def render(d: DiffLike, color: bool = False, verbose: bool = False) -> str:
    out = [_paint(f"--- {d.before}", "-", color), _paint(f"+++ {d.after}", "+", color)]
    if d.empty:
        out.append("no differences")
    blocks = [(s, s.site, 1) for s in d.sites] if verbose else collapsed(d)
    width = max((len(name) for _, name, _ in blocks), default=0)
    for site, name, count in blocks:
        for sign, label, body, counts in block_lines(site, name, count):
            out.append(f"{_paint(sign, sign, color)} {_paint(label.ljust(width), 'bold', color)}  {body}  "
                       f"{_paint('(' + counts + ')', 'dim', color)}")
        if verbose:
            out.extend(_verbose_lines(site, color))
    out.append(_paint(summary(d), "bold", color))
    return "\n".join(out) + "\n"


def _verbose_lines(site: SiteDiff, color: bool) -> list[str]:
    lines = []
    for sign, nodes in (("+", site.inserted), ("-", site.removed)):
        for n in nodes:
            role = f" {n.role}" if n.role else ""
            inputs = f" <- {', '.join(n.inputs)}" if n.inputs else ""
            lines.append(f"    {_paint(sign, sign, color)} {n.id}  {n.op}{role} {n.shape}{inputs}")
    for r in site.rerouted:
        now, was = moved(r)
        lines.append(f"    {_paint('~', '~', color)} {r.node.id}  reads {now} (was {was})")
    for c in site.changed:
        lines.append(f"    {_paint('~', '~', color)} {c.node.id}  args {c.was} -> {c.now}")
    return lines
