"""Combine LoRA adapters into a new one: ``g.combine({"a": 0.7, "b": 0.3}, how=..., rank=..., name=...)``.

Each source adapter ``i`` has, at a site, factors ``A_i`` (r_i, in) and ``B_i`` (out, r_i) and scale
``s_i`` (``alpha / r`` or ``alpha / sqrt(r)``), so its weight change is ``dW_i = s_i B_i A_i``. With
weights ``w_i`` the modes are, per site (sites an adapter lacks count as ``dW_i = 0``):

``"cat"``   A = [A_1; A_2; ...] (rank = r_1 + r_2 + ...), B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], scale 1.
            B A = sum_i w_i s_i B_i A_i: **exactly the weighted sum of the adapters' deltas**,
            ``dW = sum_i w_i dW_i``, at the cost of the summed rank.
``"linear"`` (all ranks equal, r) A = sum_i sign(c_i) sqrt|c_i| A_i and B = sum_i sqrt|c_i| B_i with
            ``c_i = w_i s_i``, scale 1 (PEFT's ``combination_type="linear"``). Then
            ``B A = sum_i c_i B_i A_i + sum_{i != j} sign(c_j) sqrt|c_i c_j| B_i A_j``: the weighted sum
            of the deltas **plus cross terms** between different adapters; it equals the weighted sum only
            when the cross terms vanish (e.g. a single adapter). Rank stays r.
``"svd"``   dW = sum_i w_i s_i B_i A_i (the exact weighted sum) truncated to `rank` by SVD:
            dW = U S V^T -> B = U_k S_k, A = V_k^T, scale 1, k = min(rank, dims of dW); the best
            rank-k approximation of the weighted sum (Eckart-Young), exact when rank >= rank(dW).
            `rank` defaults to the largest source rank. Unlike PEFT, no clamping of U and V.

Grouped convolutions are combined group by group (graftlib's conv LoRA is one factorisation per
group). The result is added as a new ``lora(...)`` graft on the union of the sources' sites (fused
slices such as ``c_attn[q]`` stay slices), inactive: ``g.set_active(name)`` to use it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .errors import GraftError
from .io import install_tensors
from .names import check_adapter_name
from .registry import get_method
from .select import SiteIndex
from .sites import Site

if TYPE_CHECKING:
    from .protocols import GraftedModule

__all__ = ["combine", "MODES"]

MODES = ("cat", "linear", "svd")

_Source = tuple[float, torch.Tensor, torch.Tensor]  # (w * s, A grouped as (g, r, ...), B (out, r, ...))


def combine(g: "GraftedModule", weights: Mapping[str, float], how: str = "cat", rank: int | None = None,
            name: str = "combined") -> str:
    """Add adapter `name` combining the LoRA adapters in `weights` (see the module docstring)."""
    _validate(g, weights, how, rank, name)
    lora_scale = get_method("lora").scale  # the pass, through the registry: the engine does not import passes

    index = SiteIndex.build(g.base_graph_module)
    ranks = {a: _rank(g, a) for a in weights}
    if how == "linear" and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{a} r={r}" for a, r in ranks.items())
        raise GraftError(f"combine(how='linear') needs adapters of one rank ({listed}); use how='cat' "
                         "(exact, summed rank) or how='svd' (truncated to rank=...)")
    new_rank = {"cat": sum(ranks.values()), "linear": next(iter(ranks.values())),
                "svd": rank or max(ranks.values())}[how]
    keys = list(dict.fromkeys(k for a in weights for k in g.adapters[a].sites))
    tensors: dict[str, torch.Tensor] = {}
    for key in keys:
        site = index.by_key(key)
        if site.kind == "experts":
            raise GraftError(f"combine: {key} is an expert stack (lora(experts)), whose factors hold one pair per "
                             "expert; combining them is not supported yet: merge or run the adapters one by one")
        sources = {a: _source(g, a, key, float(w) * lora_scale(g.adapters[a].config), site)
                   for a, w in weights.items()}
        a_new, b_new = _COMBINE[how](site, sources, ranks, new_rank)
        names = ("lora_embedding_A", "lora_embedding_B") if site.kind == "embedding" else ("lora_A", "lora_B")
        tensors[f"{name}/{key}/{names[0]}"] = a_new
        tensors[f"{name}/{key}/{names[1]}"] = b_new
    dropouts = {float(g.adapters[a].config.get("dropout") or 0.0) for a in weights}
    dropout = dropouts.pop() if len(dropouts) == 1 else 0.0
    regex = "|".join(re.escape(k) for k in keys)
    spec = f're:"{regex}", r={new_rank}, alpha={float(new_rank)!r}, dropout={dropout!r}, name={name}'
    _add(g, f"lora({spec})", tensors, name)
    return name


def _validate(g: "GraftedModule", weights: Mapping[str, float], how: str, rank: int | None, name: str) -> None:
    check_adapter_name(name)  # it is written into a spec: one rule for every adapter name
    if how not in MODES:
        raise GraftError(f"combine: how={how!r} is not one of {', '.join(MODES)}")
    if not weights:
        raise GraftError('combine needs adapters and weights, e.g. g.combine({"a": 0.7, "b": 0.3})')
    g._check_names(list(weights))
    for adapter, weight in weights.items():
        method = g.adapters[adapter].method
        if method != "lora":
            raise GraftError(f"combine: {adapter!r} is a {method} adapter; only LoRA adapters combine")
        if g.adapters[adapter].config.get("dora"):
            raise GraftError(f"combine: {adapter!r} is a DoRA adapter (lora(dora=true)), whose weight change is not "
                             "B A alone; only plain LoRA adapters combine")
        if g.adapters[adapter].config.get("conv_groups") == "dense":
            raise GraftError(f"combine: {adapter!r} has PEFT's dense grouped-conv layout (conv_groups=dense); "
                             "only the block layout combines")
        if g.adapters[adapter].config.get("bias"):
            raise GraftError(f"combine: {adapter!r} has a bias on B (lora(bias=true)), which a combined B A "
                             "cannot hold; only plain LoRA adapters combine")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise GraftError(f"combine: the weight of {adapter!r} must be a finite number, got {weight!r}")
    if name in g.adapters or name == "__base__":
        raise GraftError(f"combine: adapter {name!r} already exists; pass name=... (e.g. {name}2)")
    if rank is not None and (how != "svd" or not isinstance(rank, int) or rank <= 0):
        raise GraftError("combine: rank=... is for how='svd' and must be a positive integer "
                         f"(got how={how!r}, rank={rank!r})")


def _rank(g: "GraftedModule", adapter: str) -> int:
    """The adapter's stored rank (per group): B's second dim at its sites."""
    stored = {params.get("lora_B", params.get("lora_embedding_B")).shape[1]
              for params in g.store.tensors(adapter).values()}
    if len(stored) != 1:
        raise GraftError(f"combine: adapter {adapter!r} has several stored ranks {sorted(stored)}")
    return stored.pop()


def _groups(site: Site) -> int:
    return site.conv["groups"] if site.kind == "conv" else 1


def _source(g: "GraftedModule", adapter: str, key: str, coefficient: float, site: Site) -> _Source | None:
    params = g.store.tensors(adapter).get(key)
    if params is None:
        return None
    a = params.get("lora_A", params.get("lora_embedding_A")).detach()
    b = params.get("lora_B", params.get("lora_embedding_B")).detach()
    groups = _groups(site)
    return coefficient, a.reshape(groups, a.shape[0] // groups, *a.shape[1:]), b  # A (g, r, ...)


def _like(site: Site, sources: Mapping[str, _Source | None], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero (A (g, rank, ...), B (out, rank, ...)) in the sources' dtype/device."""
    _, a, b = next(s for s in sources.values() if s is not None)
    return a.new_zeros(a.shape[0], rank, *a.shape[2:]), b.new_zeros(b.shape[0], rank, *b.shape[2:])


def _flat(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])                        # (g*r, ...)


def _cat(site: Site, sources: Mapping[str, _Source | None], ranks: Mapping[str, int],
         rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a_new, b_new = _like(site, sources, rank)
    start = 0
    for adapter, source in sources.items():
        width = ranks[adapter]
        if source is not None:
            coefficient, a, b = source
            a_new[:, start:start + width] = a
            b_new[:, start:start + width] = coefficient * b
        start += width
    return _flat(a_new), b_new


def _linear(site: Site, sources: Mapping[str, _Source | None], ranks: Mapping[str, int],
            rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a_new, b_new = _like(site, sources, rank)
    for source in sources.values():
        if source is None:
            continue
        coefficient, a, b = source
        root = math.sqrt(abs(coefficient))
        a_new += math.copysign(root, coefficient) * a
        b_new += root * b
    return _flat(a_new), b_new


def _svd(site: Site, sources: Mapping[str, _Source | None], ranks: Mapping[str, int],
         rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a_new, b_new = _like(site, sources, rank)
    groups = a_new.shape[0]
    out_per_group = b_new.shape[0] // groups
    for j in range(groups):
        rows = slice(j * out_per_group, (j + 1) * out_per_group)
        delta = None
        for source in sources.values():
            if source is None:
                continue
            coefficient, a, b = source
            term = coefficient * _mat(b[rows]) @ a[j].reshape(a.shape[1], -1)       # (out_g, in_g*k*k)
            delta = term if delta is None else delta + term
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        k = min(rank, s.shape[0])
        b_new[rows, :k] = _unmat(u[:, :k] * s[:k], b_new).to(b_new.dtype)
        a_new[j, :k] = vh[:k].reshape(k, *a_new.shape[2:]).to(a_new.dtype)
    return _flat(a_new), b_new


def _mat(b: torch.Tensor) -> torch.Tensor:
    return b.reshape(b.shape[0], b.shape[1])                                      # conv (out, r, 1, 1) -> (out, r)


def _unmat(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return b.reshape(b.shape[0], b.shape[1], *like.shape[2:])


_COMBINE = {"cat": _cat, "linear": _linear, "svd": _svd}


def _add(g: "GraftedModule", spec: str, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Graft the combined adapter, copy its factors in, keep the active set as it was."""
    active = g.active_adapters
    g.add(spec)
    try:
        install_tensors(g, tensors, [name], source="combine")
    except Exception:
        g.delete_adapter(name)
        raise
    finally:
        g._active = tuple(a for a in active if a in g.adapters)
        g._invalidate()
