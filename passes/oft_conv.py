"""PEFT's unmerged OFT forward on a k x k Conv2d, reproduced (``oft(..., peft_conv=true)``).

    conv2d(x, W, ...)  ->  conv2d(x', W, ...)
    x' = fold(rotate(unfold(x)))                        PEFT 0.21.2 OFTRotationModule.forward:
         unfold: x.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5)   (B*Ho*Wo, C*kh*kw)
         rotate: each patch's (C*kh*kw) vector in blocks of b, times R_j      ("...rk,rkc->...rc")
         fold:   view (B, Ho, Wo, C, kh, kw).permute(0, 3, 1, 2, 4, 5), contiguous, then read as
                 (B, C*kh*kw, Ho*Wo) and F.fold to (H, W), stride 1, no padding

This is not the rotation PEFT merges (``W @ blockdiag(R)^T``, what ``oft(...)`` grafts by default): fold
sums overlapping patches and the (C, Ho, Wo, kh, kw) memory is reinterpreted as fold's (C*kh*kw, L)
layout, so even at R = I, x' differs from x wherever patches overlap. A PEFT checkpoint on a k x k conv
*is* that model, so ``from_peft`` loads it this way and outputs match PEFT's; the graft is not mergeable
(``merge`` refuses it); fold's output size is the input's (symbolic sizes are read with ``sym_size``). ``oft(...)`` without ``peft_conv`` keeps the mergeable weight rotation.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from graftlib.editor import Editor
from graftlib.errors import GraftError
from graftlib.sites import Site

__all__ = ["unfold_rotate_fold"]

aten = torch.ops.aten


def _spatial(editor: Editor, x: fx.Node, site: Site) -> tuple[int, Any, Any]:
    """(C, H, W) of the conv input: C a plain int, H and W ints or the graph's symbolic sizes."""
    value = x.meta.get("val")
    shape = tuple(value.shape) if value is not None else ()
    if len(shape) != 4 or not isinstance(shape[1], int):
        raise GraftError(f"oft(peft_conv=true) on {site.path} needs a 4-d input with a fixed channel count "
                         f"(got {shape})")
    sizes = [d if isinstance(d, int) else editor.call(aten.sym_size.int, x, i) for i, d in
             ((2, shape[2]), (3, shape[3]))]
    return int(shape[1]), sizes[0], sizes[1]


def _minus(editor: Editor, size: Any, k: int) -> Any:
    """``size - k + 1`` (the unfolded length), as an int or a graph node."""
    return size - k + 1 if isinstance(size, int) else editor.call(operator.add, editor.call(operator.sub, size, k), 1)


def unfold_rotate_fold(editor: Editor, site: Site, rotation: fx.Node, blocks: int, size: int) -> None:
    """Join PEFT's ``fold(R·unfold(x))`` on the anchor's input; `rotation` is (blocks, b, b)."""
    anchor, call = editor.anchor, editor.call
    kh, kw = site.conv["kernel"]
    x = anchor.args[0]
    with editor.before(anchor):
        channels, height, width = _spatial(editor, x, site)
        out_h, out_w = _minus(editor, height, kh), _minus(editor, width, kw)
        length = out_h * out_w if isinstance(out_h, int) and isinstance(out_w, int) else \
            call(operator.mul, out_h, out_w)
        if len(x.users) > 1:  # x feeds other ops too: the anchor gets its own alias to rewrite
            alias = call(aten.alias.default, x)
            anchor.replace_input_with(x, alias)
            x = alias
        patches = call(aten.unfold.default, call(aten.unfold.default, x, 2, kh, 1), 3, kw, 1)  # (B, C, Ho, Wo, kh, kw)
        patches = call(aten.clone.default, call(aten.permute.default, patches, [0, 2, 3, 1, 4, 5]),
                       memory_format=torch.contiguous_format)                             # (B, Ho, Wo, C, kh, kw)
        rows = call(aten.reshape.default, patches, [-1, blocks, size])                       # (B*Ho*Wo, r, b)
        turned = call(aten.einsum.default, "...rk,rkc->...rc", [rows, rotation])          # (B*Ho*Wo, r, b)
        back = call(aten.reshape.default, turned, [-1, out_h, out_w, channels, kh, kw])
        back = call(aten.clone.default, call(aten.permute.default, back, [0, 3, 1, 2, 4, 5]),
                    memory_format=torch.contiguous_format)                                # (B, C, Ho, Wo, kh, kw)
        columns = call(aten.reshape.default, back, [-1, channels * kh * kw, length])  # PEFT's reading
        folded = call(aten.col2im.default, columns, [height, width], [kh, kw], [1, 1], [0, 0], [1, 1])
        editor.join(x, aten.expand_as.default, folded, x)                                 # x' stands for x
