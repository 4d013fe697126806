"""LoRA: a low-rank branch beside a projection, convolution or embedding lookup.

    linear(x, W, b)          ->  add(linear(x, W, b), linear(linear(dropout(x), A), B), alpha=s)
    addmm(b, x, W)  (Conv1D) ->  addmm(b, x, W) + s * linear(linear(dropout(x), A), B)
    convNd(x, W, ...)        ->  convNd(x, W, ...) + s * convNd(convNd(dropout(x), A, ...), B 1x..x1)
                                 (nn.Conv1d, Conv2d, Conv3d: graftlib/conv.py)
    embedding(E, i)          ->  embedding(E, i) + s * linear(embedding(A^T, i), B)
    linear(x, W[lo:hi], ...) ->  linear(x, W[lo:hi], ...) + s * linear(linear(dropout(x), A), B[lo:hi])
                                 (a packed weight read in row blocks, nn.MultiheadAttention's in_proj:
                                 graftlib/packed.py; one A, B over all rows, as a LoRA on W)
    W (E, out, in) expert stack ->  add(W, bmm(B_e, A_e), alpha=s) at every read of W     ``lora(experts)``:
                                 one rank-r pair per expert (graftlib/experts.py finds the stacks by dataflow;
                                 the branch and PEFT's factor layout are passes/lora_param.py's)

with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). Initialisation follows PEFT: A kaiming-uniform
(a = sqrt 5) and B zero for linear and conv; for embeddings A is zero and B normal. The branch starts as
an exact zero, so the grafted model equals the base model until B (or A) is trained. A slice of a fused
projection (GPT-2 ``c_attn[q]``) gets its branch on that slice only.

Grouped convolutions (``groups = g > 1``) have two layouts, chosen by ``conv_groups``:

- ``block`` (the default): one rank-r factorisation per group. A is a grouped conv ``(g*r, in/g, *k)``,
  B a grouped pointwise conv ``(out, r, 1..)``, so ``s·BA`` has the grouped weight's own shape
  ``(out, in/g, *k)``: it merges into W, combines and mixes like any LoRA. Per group it is exactly a
  rank-r LoRA of that group's conv.
- ``dense``: PEFT's layout. A is one ungrouped conv over all input channels ``(r, in, *k)`` and B a
  grouped pointwise conv ``(out, r/g, 1..)`` (``r`` is the total rank, divisible by g). Output group j
  reads A's rows of block j, which read every input channel, so the change is not a grouped weight:
  not mergeable (PEFT warns "Merging is not supported" too). ``from_peft`` uses it for a PEFT grouped-conv
  checkpoint whose ``lora_A`` mixes groups, so the load is exact; ``dense`` with DoRA computes PEFT's
  weight norm exactly (``mm(B.view(-1, r), A.view(r, -1))`` reshaped to W).

``block`` is the default for ``graftlib.apply`` because the graft stays in the base layer's function
class: merging, exporting merged weights, combining and mixed batches all work, and the parameter count
equals PEFT's at the same total rank (r per group times g groups).

DoRA (``dora=true``): the branch is renormalised to a learned magnitude, see passes/dora.py.

``bias=true`` (PEFT's ``lora_bias``): B gets a learned bias ``c`` (zero at init), scaled with the branch:

    linear(x, W, b)  ->  linear(x, W, b) + s * linear(linear(x, A), B, c)     merge: W += s B A, b += s c

Merge: ``W += s * B @ A`` (Conv1D stores W as (in, out): ``W += (s * B @ A)^T``; conv: ``B_j @ A_j``
per group, reshaped to the kernel; embedding: ``E += (s * B @ A)^T``).

PEFT's format: ``peft_check`` / ``peft_import`` / ``peft_export`` live in passes/lora_peft.py.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from graftlib.conv import conv_name, conv_op, ones, zeros
from graftlib.editor import Editor
from graftlib.packed import PACKED, weight_rows
from graftlib.errors import GraftError
from graftlib.experts import EXPERTS
from graftlib.registry import Method, Option, in_range, positive, register
from graftlib.sites import Site, _walk_back
from graftlib.spec import GraftCall

from .dora import dora_merged_weight, dora_rewrite
from .lora_param import graft_param, param_delta

__all__ = ["LoRA", "lora_scale", "lora_delta", "conv_lora_weight", "conv_factor_shapes", "peft_check", "peft_import",
           "peft_export"]

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
    if site.kind == "conv":
        return scale * conv_lora_weight(site, a, b)
    delta = scale * (b @ a)  # (out, in) for linear; (dim, vocab) for embedding
    if site.kind in ("conv1d", "embedding"):
        return delta.T
    return delta


def _stack_shape(site: Site) -> tuple[int, int, int]:
    """The stored shape of an expert stack: (E, in, out) if transposed, else (E, out, in)."""
    inner = (site.in_features, site.out_features) if site.transposed else (site.out_features, site.in_features)
    return (site.experts, *inner)


def refuse_dense_merge(site: Site, a: torch.Tensor) -> None:
    """PEFT's dense grouped-conv layout (A over every input channel) has no grouped weight to merge into."""
    if site.conv["groups"] > 1 and a.shape[1] == site.in_features:
        raise GraftError(f"LoRA on the grouped convolution {site.path} in PEFT's dense layout "
                         "(conv_groups=dense) is not mergeable: its change reads every input channel, which the "
                         "grouped weight cannot hold; keep it unmerged, or train it with conv_groups=block")


def conv_lora_weight(site: Site, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B @ A`` of a block-layout conv LoRA in the kernel's layout (out, in/g, *k), group by group."""
    refuse_dense_merge(site, a)
    groups = site.conv["groups"]
    r, out_per_group = a.shape[0] // groups, b.shape[0] // groups
    blocks = [b[g * out_per_group:(g + 1) * out_per_group].reshape(out_per_group, r)
              @ a[g * r:(g + 1) * r].reshape(r, -1) for g in range(groups)]              # (out/g, in/g·k)
    return torch.cat(blocks).reshape(b.shape[0], *a.shape[1:])


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


def conv_factor_shapes(site: Site, config: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(A's shape, B's shape, A's groups) of a conv site in the graft's layout (``conv_groups``)."""
    conv, r = site.conv, config["r"]
    groups, pointwise = conv["groups"], (1,) * len(conv["kernel"])
    if groups > 1 and config.get("conv_groups") == "dense":                   # PEFT: r total
        return (r, site.in_features, *conv["kernel"]), (site.out_features, r // groups, *pointwise), 1
    return (r * groups, site.in_features // groups, *conv["kernel"]), (site.out_features, r, *pointwise), groups


@register
class LoRA(Method):
    name = "lora"
    site_kinds = ("linear", "conv1d", "conv", "embedding", PACKED, EXPERTS)
    mergeable = True
    options = {
        "r": Option(8, (int,), positive, help="rank"),
        "alpha": Option(None, (float,), positive, help="scale numerator (default: r)"),
        "dropout": Option(0.0, (float,), in_range(0.0, 1.0), help="dropout on the branch input"),
        "rslora": Option(False, (bool,), help="scale alpha/sqrt(r) instead of alpha/r"),
        "dora": Option(False, (bool,), help="DoRA: learned magnitude over the renormalised weight (passes/dora.py)"),
        "conv_groups": Option("block", (str,), choices=("block", "dense"),
                              help="grouped convs: block (r per group, mergeable) or dense (PEFT's layout: "
                                   "one A over all input channels, r total, not mergeable)"),
        "bias": Option(False, (bool,), help="a learned bias on B, scaled with the branch (PEFT's lora_bias)"),
    }

    def check_site(self, call: GraftCall, site: Site, config: dict[str, Any]) -> None:
        if site.kind == EXPERTS:
            return self._check_experts(call, site, config)
        if site.kind == "conv" and (site.out_features % site.conv["groups"]):
            raise call.error(f"cannot graft lora on {site.path}: its {site.out_features} output channels "
                             f"do not split into {site.conv['groups']} groups")
        if config.get("dora") and site.kind == PACKED:
            raise call.error(f"cannot graft lora(dora=true) on {site.key}: its weight is read in row blocks "
                             "(nn.MultiheadAttention's in_proj; PEFT has no DoRA there either); drop dora")
        dense = site.kind == "conv" and site.conv["groups"] > 1 and config.get("conv_groups") == "dense"
        if dense and config["r"] % site.conv["groups"]:
            raise call.error(f"cannot graft lora(conv_groups=dense) on the {conv_name(site)} {site.path}: r="
                             f"{config['r']} (the total rank in this layout) must be divisible by its "
                             f"{site.conv['groups']} groups")
        if config.get("dora") and (site.part is not None or (site.kind == "conv" and site.conv["groups"] > 1
                                                             and not dense)):
            what = "a slice of a fused projection" if site.part else "a grouped convolution"
            raise call.error(f"cannot graft lora(dora=true) on {site.key}, {what}: DoRA normalises whole "
                             "weight rows (PEFT has no DoRA there either); target the whole module or drop dora")
        if config.get("bias") and (site.kind == "embedding" or config.get("dora")):
            what = "an embedding" if site.kind == "embedding" else "a DoRA adapter"
            raise call.error(f"cannot graft lora(bias=true) on {site.key}: not supported on {what} (PEFT's "
                             "lora_bias has neither); drop bias=true")

    @staticmethod
    def _check_experts(call: GraftCall, site: Site, config: dict[str, Any]) -> None:
        """An expert stack's branch changes the weight itself (PEFT's ParamWrapper): no input dropout, DoRA or bias."""
        for option, value in (("dropout", config["dropout"] > 0), ("dora", config.get("dora")),
                              ("bias", config.get("bias"))):
            if value:
                raise call.option_error(option, f"cannot graft lora({option}=...) on the expert stack {site.key}: "
                                                 "its LoRA is added to the 3-D weight, which has no branch input "
                                                 f"(PEFT's target_parameters refuses it too); drop {option}")

    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        anchor, r = editor.anchor, config["r"]
        scale = lora_scale(config)
        if site.kind == EXPERTS:                                                # anchor: a read of W (E, ., .)
            return graft_param(editor, _stack_shape(site), r, scale, site.transposed)
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
        elif site.kind == "conv":
            conv, groups = site.conv, site.conv["groups"]
            x = self._dropout(editor, anchor.args[0], config)
            a_shape, b_shape, a_groups = conv_factor_shapes(site, config)
            a = editor.param("lora_A", lambda: _kaiming(a_shape))
            b = editor.param("lora_B", lambda: torch.zeros(b_shape))
            low = editor.call(conv_op(site), x, a, None, conv["stride"], conv["padding"],
                              conv["dilation"], a_groups)                        # (N, A rows, *spatial')
            if config.get("dora"):
                return dora_rewrite(editor, site, config, scale, a, b, x, low)
            delta = editor.call(conv_op(site), low, b, self._bias(editor, site, config), ones(site), zeros(site),
                                ones(site), groups)
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
            bias = self._bias(editor, site, config)
            if site.kind == PACKED:                                             # this anchor's rows of B
                _, lo, hi = weight_rows(anchor.args[1])
                b = editor.call(aten.slice.Tensor, b, 0, lo, hi)
                bias = None if bias is None else editor.call(aten.slice.Tensor, bias, 0, lo, hi)
            delta = editor.call(aten.linear.default, low, b, bias)
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
        if site.kind == "conv":
            refuse_dense_merge(site, a)
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
        if site.kind == EXPERTS:
            return param_delta(_stack_shape(site), params["lora_A"].detach(), params["lora_B"].detach(),
                               lora_scale(config), site.transposed)
        if site.kind == "embedding":
            a, b = params["lora_embedding_A"], params["lora_embedding_B"]
        else:
            a, b = params["lora_A"], params["lora_B"]
        return lora_delta(site, a.detach(), b.detach(), lora_scale(config))


def peft_export(grafted: Any, record: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's adapter_config and state dict (passes/lora_peft.py); expert stacks are refused."""
    from graftlib.select import SiteIndex

    index = SiteIndex.build(grafted.base_graph_module)
    stacks = [key for key in record.sites if index.by_key(key).kind == EXPERTS]
    if stacks:
        raise GraftError(f"not supported: saving lora(experts) in PEFT's format ({stacks[0]}): graftlib writes "
                         "PEFT's target_parameters for one parameter per module (lora_param), and an experts module "
                         "holds two (gate_up_proj, down_proj); save with g.save(dir)")
    return _peft_export(grafted, record)


from graftlib.passes.lora_peft import peft_check, peft_import  # noqa: E402  PEFT's format
from graftlib.passes.lora_peft import peft_export as _peft_export  # noqa: E402
