"""Site selection: which sites a spec's targets name. Pure: reads the graph, changes nothing.

Short aliases are semantic tables over module-path patterns (names differ between architectures and
between transformers versions), completed from the graph itself: a projection whose output reaches a
``scaled_dot_product_attention`` query/key/value input through view ops is q/k/v, and the projection
reading the attention output is o. Quoted globs and ``re:"..."`` regexes (full match) are the escape
hatch for everything else.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import fx

from .errors import GraftSpecError, did_you_mean
from .experts import find_expert_sites
from .safety import BoundedRegex, regex_call
from .sites import LINEAR_KINDS, Site, _walk_back, _walk_forward, find_sites
from .spec import GraftCall, Target

__all__ = ["ALIASES", "SiteIndex", "Selection", "Selections", "format_table", "resolve_targets", "target_matches"]

_ROLE_PATTERNS: dict[str, list[str]] = {
    "q": [r"(^|\.)(query|q_proj|q_lin|q|to_q|query_proj)$"],
    "k": [r"(^|\.)(key|k_proj|k_lin|k|to_k|key_proj)$"],
    "v": [r"(^|\.)(value|v_proj|v_lin|v|to_v|value_proj)$"],
    "o": [r"attention\.output\.dense$", r"(attn|attention|Attention)\.(c_proj|dense|o|out_proj|o_proj|out_lin)$",
          r"(^|\.)(o_proj|out_proj|out_lin|to_out\.0)$"],
    "gate": [r"(^|\.)(gate_proj|wi_0)$"],
    "up": [r"intermediate\.dense$", r"mlp\.c_fc$", r"(^|\.)(up_proj|fc1|lin1|c_fc|wi|wi_1|dense_h_to_4h|fc_in)$"],
    "down": [r"(?<!attention)\.output\.dense$", r"mlp\.c_proj$", r"(^|\.)(down_proj|fc2|lin2|wo|dense_4h_to_h|fc_out)$"],
    "lm_head": [r"(^|\.)(lm_head|classifier|score|qa_outputs)$", r"predictions\.decoder$"],
}

#: alias -> roles or kinds it stands for (documented in the README's spec table)
ALIASES: dict[str, tuple[str, ...]] = {
    "q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",),
    "up": ("up",), "down": ("down",), "gate": ("gate",),
    "ffn": ("up", "down", "gate"), "mlp": ("up", "down", "gate"),
    "attn": ("q", "k", "v", "o"), "qkv": ("q", "k", "v"),
    "embed": ("embed",), "conv": ("kind:conv",), "all-linear": ("kind:linear-all",),
    "attention": ("kind:attention",), "experts": ("kind:experts",),
}


def _name_role(path: str) -> str | None:
    for role, patterns in _ROLE_PATTERNS.items():
        if any(re.search(p, path) for p in patterns):
            return role
    return None


@dataclass
class SiteIndex:
    """All sites of one graph, with their anchors and semantic roles."""

    graph_module: fx.GraphModule
    sites: list[Site]
    anchors: dict[str, list[fx.Node]]

    @classmethod
    def build(cls, gm: fx.GraphModule) -> "SiteIndex":
        sites, anchors = find_sites(gm)
        experts, expert_anchors = find_expert_sites(gm)
        sites, anchors = sites + experts, {**anchors, **expert_anchors}
        sites = _assign_roles(sites, anchors)
        return cls(gm, sites, anchors)

    def by_key(self, key: str) -> Site:
        for site in self.sites:
            if site.key == key:
                return site
        raise KeyError(key)

    @property
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.sites if s.layer is not None})


def _assign_roles(sites: list[Site], anchors: dict[str, list[fx.Node]]) -> list[Site]:
    roles = {s.key: s.role or (_name_role(s.path) if s.kind in LINEAR_KINDS and not s.part else None)
             for s in sites}
    # Structural completion: projections feeding attention, for hand-written or unusually named models.
    by_node = {id(node): s for s in sites for node in anchors[s.key] if s.kind in LINEAR_KINDS}
    for site in sites:
        if site.kind != "attention":
            continue
        for node in anchors[site.key]:
            for index, role in enumerate("qkv"):
                source = _walk_back(node.args[index])
                owner = by_node.get(id(source))
                if owner is not None and roles.get(owner.key) is None:
                    roles[owner.key] = role
            for user in _walk_forward(node):
                owner = by_node.get(id(user))
                if owner is not None and roles.get(owner.key) is None:
                    roles[owner.key] = "o"
    _ffn_by_structure(sites, anchors, roles, by_node)
    fused = {s.path for s in sites if s.part}
    return [dataclasses.replace(s, role=None if (s.path in fused and not s.part) else roles[s.key])
            for s in sites]


_ELEMENTWISE = {"gelu", "relu", "silu", "tanh", "sigmoid", "mul", "add", "pow", "div", "erf", "neg",
                "sub", "to", "_to_copy", "view", "reshape", "clone", "contiguous", "dropout", "hardtanh",
                "leaky_relu", "elu", "softplus", "mish", "hardswish", "hardsigmoid", "rsub"}
_ACTIVATIONS = {"gelu", "relu", "silu", "tanh", "sigmoid", "erf", "leaky_relu", "elu", "softplus", "mish",
                "hardswish", "hardsigmoid", "hardtanh"}


def _op_base(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


def _feeding_projection(start: fx.Node, by_node: dict[int, Site], limit: int = 16) -> Site | None:
    """The one projection whose output reaches `start` through elementwise ops including an activation."""
    frontier, seen, found, activated = [start], set(), set(), False
    while frontier and len(seen) < limit:
        node = frontier.pop()
        if not isinstance(node, fx.Node) or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in by_node and node is not start:
            found.add(by_node[id(node)].key)
            site = by_node[id(node)]
            continue
        if node.op != "call_function" or _op_base(node) not in _ELEMENTWISE:
            continue
        activated = activated or _op_base(node) in _ACTIVATIONS
        frontier.extend(a for a in node.args if isinstance(a, fx.Node))
    return site if len(found) == 1 and activated else None


def _ffn_by_structure(sites: list[Site], anchors: dict[str, list[fx.Node]], roles: dict[str, str | None],
                      by_node: dict[int, Site]) -> None:
    """linear -> activation -> linear with no role from names: up and down (ALBERT ffn / ffn_output,
    ConvNeXt pwconv1 / pwconv2, hand-written ff_in / ff_out). Names stay first; this fills gaps."""
    for site in sites:
        if site.kind not in LINEAR_KINDS or site.part or roles.get(site.key) is not None:
            continue
        node = anchors[site.key][0]
        x = node.args[1] if site.kind == "conv1d" else node.args[0]
        up = _feeding_projection(x, by_node)
        if up is None or up.part or up.layer != site.layer or roles.get(up.key) not in (None, "up"):
            continue
        if up.out_features != site.in_features:
            continue
        roles[site.key], roles[up.key] = "down", "up"


@dataclass
class Selection:
    """The sites one graft call selects, and why: a dry run users can print."""

    call: GraftCall
    sites: list[Site]
    matched: dict[str, list[str]]  # target text -> site keys

    def __str__(self) -> str:
        return format_table(self)

    def __repr__(self) -> str:
        return f"<Selection {self.call.text}: {_count(len(self.sites))}>"

    def __len__(self) -> int:
        return len(self.sites)


class Selections(list):
    """What ``select`` returns: a list of :class:`Selection`, one per graft call, that prints as tables."""

    def __str__(self) -> str:
        return "\n\n".join(format_table(selection) for selection in self)

    __repr__ = __str__


def _count(n: int) -> str:
    return f"{n} site{'' if n == 1 else 's'}"


def format_table(selection: Selection) -> str:
    """The sites of one call as an aligned table: site, kind, in -> out features, role, layer."""
    header = ("site", "kind", "in -> out", "role", "layer")
    rows = [(site.key, site.kind, f"{site.in_features} -> {site.out_features}", site.role or "-",
             "-" if site.layer is None else str(site.layer)) for site in selection.sites]
    title = f"{selection.call.text}: {_count(len(rows))}"
    if not rows:
        return title
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join([title, *("  " + line for line in lines)])


def _alias_sites(alias: str, sites: Sequence[Site], kinds: Iterable[str]) -> list[Site]:
    kinds = set(kinds)
    wanted = ALIASES[alias]
    out = []
    for site in sites:
        if site.kind not in kinds:
            continue
        if "kind:linear-all" in wanted:
            hit = site.kind in LINEAR_KINDS and not site.part and site.role != "lm_head"
        elif "kind:conv" in wanted:
            hit = site.kind == "conv"
        elif "kind:attention" in wanted:
            hit = site.kind == "attention"
        elif "kind:experts" in wanted:
            hit = site.kind == "experts"
        else:
            hit = site.role in wanted
        if hit:
            out.append(site)
    return out


def _pattern_sites(target: Target, sites: Sequence[Site]) -> list[Site]:
    # A slice of a fused projection is named by its key only (h.0.attn.c_attn[q]): its bare path
    # names the whole projection, a site of its own, so "c_attn" must not graft it four times.
    if target.kind == "regex":
        pattern = BoundedRegex(target.text, "regular expression", GraftSpecError)  # time-bounded
        return [s for s in sites if pattern.fullmatch(s.key)]
    if target.kind == "glob":
        return [s for s in sites if fnmatch.fnmatchcase(s.key, target.text)]
    name = target.text
    return [s for s in sites if s.key == name or s.key.endswith("." + name)]


def target_matches(target: Target, path: str) -> bool:
    """Whether a spec target names `path` (a module or parameter path): a regex (time-bounded) or glob
    over the whole path, or a plain name that is the path or its last dotted part(s)."""
    if target.kind == "regex":
        return regex_call("fullmatch", target.text, path, "regular expression", GraftSpecError) is not None
    if target.kind == "glob":
        return fnmatch.fnmatchcase(path, target.text)
    return path == target.text or path.endswith("." + target.text)


def resolve_targets(call: GraftCall, index: SiteIndex, kinds: Iterable[str],
                    layers: Sequence[int] | None = None) -> Selection:
    """Resolve a call's targets to sites; unknown or empty targets raise with the nearest names."""
    kinds = tuple(kinds)
    candidates = [s for s in index.sites if s.kind in kinds]
    chosen: dict[str, Site] = {}
    matched: dict[str, list[str]] = {}
    for target in call.targets:
        if target.kind == "name" and target.text in ALIASES:
            hits = _alias_sites(target.text, candidates, kinds)
            if not hits:
                found = sorted({s.role or s.kind for s in index.sites if s.kind in kinds}) or ["nothing"]
                raise call.error(
                    f"alias {target.text!r} matches no {'/'.join(kinds)} site in this model; "
                    f"it has: {', '.join(found)}. Name modules with a quoted glob or re:\"...\"",
                    target.column)
        else:
            hits = _pattern_sites(target, candidates)
            if not hits:
                leaves = sorted({s.path.rsplit(".", 1)[-1] for s in candidates})
                names = list(ALIASES) + [s.path for s in candidates] + leaves
                what = "alias or module" if target.kind == "name" else "module"
                hint = did_you_mean(target.text, names, "aliases and module names", listed=list(ALIASES) + leaves)
                raise call.error(
                    f"target {target.text!r} matches no {what} that {call.method} can graft "
                    f"({'/'.join(kinds)}); {hint}", target.column)
        matched[target.text] = [s.key for s in hits]
        for site in hits:
            chosen.setdefault(site.key, site)
    sites = [s for s in index.sites if s.key in chosen]
    if layers is not None:
        sites = [s for s in sites if s.layer in set(layers)]
    return Selection(call, sites, matched)
