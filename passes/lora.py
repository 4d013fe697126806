"""LoRA: a low-rank branch beside a projection, convolution or embedding lookup.

    linear(x, W, b)          ->  add(linear(x, W, b), linear(linear(dropout(x), A), B), alpha=s)
    addmm(b, x, W)  (Conv1D) ->  addmm(b, x, W) + s * linear(linear(dropout(x), A), B)
    conv2d(x, W, ...)        ->  conv2d(x, W, ...) + s * conv2d(conv2d(dropout(x), A, ...), B 1x1)
    embedding(E, i)          ->  embedding(E, i) + s * linear(embedding(A^T, i), B)

with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). Initialisation follows PEFT: A kaiming-uniform
(a = sqrt 5) and B zero for linear and conv; for embeddings A is zero and B normal. The branch starts as
an exact zero, so the grafted model equals the base model until B (or A) is trained. A slice of a fused
projection (GPT-2 ``c_attn[q]``) gets its branch on that slice only. Grouped convolutions get one rank-r
factorisation per group (A: ``groups`` blocks of r channels, B: grouped 1x1).

DoRA (``dora=true``): the branch is renormalised to a learned magnitude, see passes/dora.py.

``bias=true`` (PEFT's ``lora_bias``): B gets a learned bias ``c`` (zero at init), scaled with the branch:

    linear(x, W, b)  ->  linear(x, W, b) + s * linear(linear(x, A), B, c)     merge: W += s B A, b += s c

Merge: ``W += s * B @ A`` (Conv1D stores W as (in, out): ``W += (s * B @ A)^T``; conv:
``einsum('or,rikl->oikl')`` per group; embedding: ``E += (s * B @ A)^T``).

PEFT's format: ``peft_check`` / ``peft_import`` / ``peft_export`` live in passes/lora_peft.py.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from graftlib.editor import Editor
from graftlib.errors import GraftError
from graftlib.registry import Method, Option, in_range, positive, register
from graftlib.sites import Site, _walk_back
from graftlib.spec import GraftCall

from .dora import dora_merged_weight, dora_rewrite

__all__ = ["LoRA", "lora_scale", "lora_delta", "peft_check", "peft_import", "peft_export"]

aten = torch.ops.aten


def lora_scale(config: dict[str, Any]) -> float:
    r, alpha = config["r"], config["alpha"]
    alpha = float(r) if alpha is None else alpha
    return alpha / math.sqrt(r) if config["rslora"] else alpha / r


def _kaiming(shape: tuple[int, ...]) -> torch.Tensor:
    weight = torch.empty(shape)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


def lora_delta(site: Site, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight change of one LoRA branch, in the stored weight's layout (its span for parts)."""
    if site.kind == "conv2d":
        groups = site.conv["groups"]
        r = a.shape[0] // groups
        out_per_group = b.shape[0] // groups
        blocks = [torch.einsum("or,rikl->oikl", b[g * out_per_group:(g + 1) * out_per_group, :, 0, 0],
                               a[g * r:(g + 1) * r]) for g in range(groups)]
        return scale * torch.cat(blocks, dim=0)
    delta = scale * (b @ a)  # (out, in) for linear; (dim, vocab) for embedding
    if site.kind in ("conv1d", "embedding"):
        return delta.T
    return delta


def scatter_columns(editor: Editor, delta: Any, site: Site) -> Any:
    """The branch output (..., len(columns)) placed into the fused projection's columns, zero elsewhere.

    ``index_select(cat([delta, 0], -1), -1, where)`` with ``where[c]`` = the position of column ``c``
    in the part, or the appended zero column: one gather, exact, and ONNX-exportable.
    """
    width = site.fused_out
    def where() -> torch.Tensor:
        index = torch.full((width,), len(site.columns), dtype=torch.long)
        index[list(site.columns)] = torch.arange(len(site.columns))
        return index
    where_node = editor.param("lora_columns", where, trainable=False)
    zero = editor.call(aten.zeros_like.default, editor.call(aten.slice.Tensor, delta, -1, 0, 1))
    padded = editor.call(aten.cat.default, [delta, zero], -1)
    return editor.call(aten.index_select.default, padded, -1, where_node)


@register
class LoRA(Method):
    name = "lora"
    site_kinds = ("linear", "conv1d", "conv2d", "embedding")
    mergeable = True
    options = {
        "r": Option(8, (int,), positive, help="rank"),
        "alpha": Option(None, (float,), positive, help="scale numerator (default: r)"),
        "dropout": Option(0.0, (float,), in_range(0.0, 1.0), help="dropout on the branch input"),
        "rslora": Option(False, (bool,), help="scale alpha/sqrt(r) instead of alpha/r"),
        "dora": Option(False, (bool,), help="DoRA: learned magnitude over the renormalised weight (passes/dora.py)"),
        "bias": Option(False, (bool,), help="a learned bias on B, scaled with the branch (PEFT's lora_bias)"),
    }

    def check_site(self, call: GraftCall, site: Site, config: dict[str, Any]) -> None:
        if site.kind == "conv2d" and (site.out_features % site.conv["groups"]):
            raise call.error(f"cannot graft lora on {site.path}: its {site.out_features} output channels "
                             f"do not split into {site.conv['groups']} groups")
        if config.get("dora") and (site.part is not None or (site.kind == "conv2d" and site.conv["groups"] > 1)):
            what = "a slice of a fused projection" if site.part else "a grouped convolution"
            raise call.error(f"cannot graft lora(dora=true) on {site.key}, {what}: DoRA normalises whole "
                             "weight rows (PEFT has no DoRA there either); target the whole module or drop dora")
        if config.get("bias") and (site.kind == "embedding" or config.get("dora")):
            what = "an embedding" if site.kind == "embedding" else "a DoRA adapter"
            raise call.error(f"cannot graft lora(bias=true) on {site.key}: not supported on {what} (PEFT's "
                             "lora_bias has neither); drop bias=true")

    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        anchor, r = editor.anchor, config["r"]
        scale = lora_scale(config)
        if site.kind == "embedding":
            indices = anchor.args[1]
            a = editor.param("lora_embedding_A", lambda: torch.zeros(r, site.in_features))
            b = editor.param("lora_embedding_B", lambda: torch.randn(site.out_features, r))
            padding_idx = anchor.args[2] if len(anchor.args) > 2 else -1
            low = editor.call(aten.embedding.default, editor.call(aten.t.default, a), indices, padding_idx)
            x = indices
            if config.get("dora"):
                return dora_rewrite(editor, site, config, scale, a, b, x, low)
            delta = editor.call(aten.linear.default, low, b)
        elif site.kind == "conv2d":
            conv = site.conv
            groups = conv["groups"]
            x = self._dropout(editor, anchor.args[0], config)
            a = editor.param("lora_A", lambda: _kaiming((r * groups, site.in_features // groups, *conv["kernel"])))
            b = editor.param("lora_B", lambda: torch.zeros(site.out_features, r, 1, 1))
            low = editor.call(aten.conv2d.default, x, a, None, conv["stride"], conv["padding"],
                              conv["dilation"], groups)
            if config.get("dora"):
                return dora_rewrite(editor, site, config, scale, a, b, x, low)
            delta = editor.call(aten.conv2d.default, low, b, self._bias(editor, site, config), [1, 1], [0, 0],
                                [1, 1], groups)
        else:
            x = self._branch_input(anchor, site)
            x = self._dropout(editor, x, config)
            a = editor.param("lora_A", lambda: _kaiming((r, site.in_features)))
            b = editor.param("lora_B", lambda: torch.zeros(site.out_features, r))
            low = editor.call(aten.linear.default, x, a)
            if config.get("dora"):
                if site.columns is not None:
                    raise GraftError(f"lora(dora=true) on {site.key}: a strided part of a fused projection "
                                     "is not supported with DoRA yet; target the whole projection")
                return dora_rewrite(editor, site, config, scale, a, b, x, low)
            delta = editor.call(aten.linear.default, low, b, self._bias(editor, site, config))
            if site.columns is not None:
                delta = scatter_columns(editor, delta, site)
        base = editor.value_at(anchor, same_shape=True)  # before a prompt's prepend
        editor.join(base, aten.add.Tensor, base, delta, alpha=scale)  # base + scale * delta, one kernel

    @staticmethod
    def scale(config: dict[str, Any]) -> float:
        """``s`` of the branch (combine and mixed batches read it through the registry)."""
        return lora_scale(config)

    @staticmethod
    def branch_input(anchor: Any, site: Site) -> Any:
        """The node the branch reads (mixed batches build their branch on it)."""
        return LoRA._branch_input(anchor, site)

    @staticmethod
    def _branch_input(anchor: Any, site: Site) -> Any:
        if site.part is None or site.columns is not None:
            return anchor.args[1] if site.kind == "conv1d" else anchor.args[0]
        # a slice of a fused projection: anchor is getitem(split(view(op(x)))); find op's input
        # at the slice's rank so the branch output lines up with the slice without reshaping
        split = anchor.args[0]
        fused = _walk_back(split.args[0])
        x = fused.args[1] if site.kind == "conv1d" else fused.args[0]
        rank = len(anchor.meta["val"].shape) if "val" in anchor.meta else None
        while rank is not None and "val" in x.meta and len(x.meta["val"].shape) != rank \
                and x.target in (aten.view.default, aten.reshape.default):
            x = x.args[0]
        return x

    @staticmethod
    def _bias(editor: Editor, site: Site, config: dict[str, Any]) -> Any:
        """B's bias (out,), zero at init, or None without ``bias=true``."""
        if not config.get("bias"):
            return None
        return editor.param("lora_B_bias", lambda: torch.zeros(site.out_features))

    @staticmethod
    def _dropout(editor: Editor, x: Any, config: dict[str, Any]) -> Any:
        if config["dropout"] > 0:
            return editor.call(aten.dropout.default, x, config["dropout"], True)
        return x

    def merge_deltas(self, site: Site, params: dict[str, torch.Tensor], config: dict[str, Any],
                     weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        if not config.get("dora"):
            return self.delta(site, params, config), self._bias_delta(site, params, config, bias)
        names = ("lora_embedding_A", "lora_embedding_B") if site.kind == "embedding" else ("lora_A", "lora_B")
        a, b = (params[n].detach() for n in names)
        m = params["lora_magnitude_vector"].detach()
        return dora_merged_weight(site, weight, a, b, m, lora_scale(config)) - weight, None

    @staticmethod
    def _bias_delta(site: Site, params: dict[str, torch.Tensor], config: dict[str, Any],
                    bias: torch.Tensor | None) -> torch.Tensor | None:
        """``s * c`` for ``bias=true`` (folded into the op's bias), else None."""
        if not config.get("bias"):
            return None
        if bias is None:
            raise GraftError(f"cannot merge lora(bias=true) into {site.key}: its op has no bias to fold B's bias "
                             "into (PEFT refuses lora_bias there too); keep the adapter unmerged")
        return lora_scale(config) * params["lora_B_bias"].detach()

    def delta(self, site: Site, params: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
        if config.get("dora"):
            raise NotImplementedError("a DoRA delta depends on the weight: use merge_deltas")
        if site.kind == "embedding":
            a, b = params["lora_embedding_A"], params["lora_embedding_B"]
        else:
            a, b = params["lora_A"], params["lora_B"]
        return lora_delta(site, a.detach(), b.detach(), lora_scale(config))


from graftlib.passes.lora_peft import peft_check, peft_export, peft_import  # noqa: E402  PEFT's format
