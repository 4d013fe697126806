"""Low-rank factor tensors: LoRA's scale, rank padding and grouped-convolution layouts.

    A (g*r, ...), B (out, r, ...)  --pad_rank-->  A (g*R, ...), B (out, R, ...)    (zeros: the same B @ A)

Shared by mixed-adapter batches (graftlib/mixed.py stacks adapters of several ranks) and the LoRA pass's
PEFT conversion (passes/lora_peft.py: rank_pattern sites stored at one rank, PEFT's dense grouped A).
"""
from __future__ import annotations

import math

import torch

__all__ = ["scale", "pad_rank", "cut_rank", "dense_groups", "block_groups"]


def scale(r: int, alpha: float, rslora: bool) -> float:
    """LoRA's ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A (g*r, ...), B (out, r, ...) -> A (g*rank, ...), B (out, rank, ...) with zeros."""
    r = b.shape[1]
    if r == rank:
        return a, b
    a_groups = a.reshape(groups, r, *a.shape[1:])                                  # (g, r, ...)
    a_pad = a.new_zeros(groups, rank, *a.shape[1:])
    a_pad[:, :r] = a_groups
    b_pad = b.new_zeros(b.shape[0], rank, *b.shape[2:])
    b_pad[:, :r] = b
    return a_pad.reshape(groups * rank, *a.shape[1:]), b_pad


def cut_rank(a: torch.Tensor, b: torch.Tensor, rank: int, groups: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Inverse of :func:`pad_rank`; None when the padding is not zero."""
    stored = b.shape[1]
    if stored == rank:
        return a, b
    a_groups = a.reshape(groups, stored, *a.shape[1:])                             # (g, R, ...)
    if a_groups[:, rank:].any() or b[:, rank:].any():
        return None
    return a_groups[:, :rank].reshape(groups * rank, *a.shape[1:]), b[:, :rank]


def dense_groups(a: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped conv A (g*r, in/g, kh, kw) -> PEFT's dense A (g*r, in, kh, kw), zero off the blocks."""
    if groups == 1:
        return a
    rows, cols = a.shape[0] // groups, a.shape[1]
    dense = a.new_zeros(a.shape[0], cols * groups, *a.shape[2:])
    for j in range(groups):
        dense[j * rows:(j + 1) * rows, j * cols:(j + 1) * cols] = a[j * rows:(j + 1) * rows]
    return dense


def block_groups(a: torch.Tensor, groups: int) -> torch.Tensor | None:
    """Dense A (g*r, in, kh, kw) -> grouped (g*r, in/g, kh, kw); None if it mixes groups."""
    if groups == 1:
        return a
    rows, cols = a.shape[0] // groups, a.shape[1] // groups
    blocks = torch.cat([a[j * rows:(j + 1) * rows, j * cols:(j + 1) * cols] for j in range(groups)])
    return blocks if torch.equal(dense_groups(blocks, groups), a) else None
