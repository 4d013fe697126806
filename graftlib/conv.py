"""Convolution sites of any dimension: ``aten.conv1d`` / ``conv2d`` / ``conv3d`` as one site kind, ``"conv"``.

    nn.Conv1d  -> aten.conv1d(x, W (out, in/g, k), b, stride, padding, dilation, groups)         dims 1
    nn.Conv2d  -> aten.conv2d(x, W (out, in/g, kh, kw), ...)                                       dims 2
    nn.Conv3d  -> aten.conv3d(x, W (out, in/g, kd, kh, kw), ...)                                   dims 3

A conv site records its geometry in ``site.conv`` (``dims``, ``kernel``, ``stride``, ``padding``,
``dilation``, ``groups``); the number of spatial dims comes from the weight's rank. Passes build their
branch convolutions with :func:`conv_op` and the ``ones`` / ``zeros`` / ``channel_shape`` helpers here
instead of spelling out 2-d lists, so one code path serves all three.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["CONV_OPS", "CONV_MODULES", "conv_geometry", "conv_op", "conv_dims", "ones", "zeros",
           "channel_shape", "conv_name"]

aten = torch.ops.aten

#: aten op -> spatial dims
CONV_OPS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
_BY_DIMS = {dims: op for op, dims in CONV_OPS.items()}
#: torch module classes of the conv sites (PEFT conversion matches modules by type)
CONV_MODULES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def conv_geometry(args: tuple[Any, ...], weight_shape: tuple[int, ...]) -> dict[str, Any]:
    """``site.conv`` from a conv node's arguments and its weight's shape (out, in/g, *kernel)."""
    dims = len(weight_shape) - 2
    args = list(args) + [None] * (7 - len(args))
    return dict(dims=dims, kernel=tuple(weight_shape[2:]), stride=list(args[3] or [1] * dims),
                padding=list(args[4] or [0] * dims), dilation=list(args[5] or [1] * dims), groups=args[6] or 1)


def conv_dims(site: Any) -> int:
    return int(site.conv.get("dims", 2))


def conv_op(site: Any) -> Any:
    """The aten convolution of the site's dimension."""
    return _BY_DIMS[conv_dims(site)]


def ones(site: Any) -> list[int]:
    """``[1] * dims``: the stride / dilation / kernel of a pointwise conv."""
    return [1] * conv_dims(site)


def zeros(site: Any) -> list[int]:
    return [0] * conv_dims(site)


def channel_shape(site: Any, n: int = -1, first: bool = False) -> list[int]:
    """A per-channel vector shaped to broadcast over the conv's output (1, n, 1, ...) or its weight
    (n, 1, 1, ...) with ``first``."""
    tail = [1] * conv_dims(site)
    return [n, 1, *tail] if first else [1, n, *tail]


def conv_name(site: Any) -> str:
    """``Conv1d`` / ``Conv2d`` / ``Conv3d`` (for messages)."""
    return f"Conv{conv_dims(site)}d"
