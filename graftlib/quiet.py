"""Warnings torch raises inside graftlib's own calls that a user can do nothing about, ignored there only.

Each entry is one known message from torch internals that graftlib's code paths reach (deep-copying a
graph's pytree code generator asks ``isinstance(treespec, LeafSpec)``, deprecated in torch 2.13). The
filters are scoped with ``warnings.catch_warnings`` around graftlib's call, so the same warning from the
user's own code still shows, and every other warning passes through.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["TORCH_INTERNAL_WARNINGS", "torch_internals"]

#: (category, regex matched against the start of the message)
TORCH_INTERNAL_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


@contextmanager
def torch_internals() -> Iterator[None]:
    """Ignore TORCH_INTERNAL_WARNINGS for the duration of the block (other warnings are untouched)."""
    with warnings.catch_warnings():
        for category, message in TORCH_INTERNAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
