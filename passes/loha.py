"""LoHa: a weight delta that is the Hadamard product of two low-rank matrices (FedPara / LyCORIS).

    linear(x, W, b)    ->  linear(x, W, b) + linear(x, dW)
    convNd(x, W, ...)  ->  convNd(x, W, ...) + convNd(x, dW, None, stride, padding, dilation, groups)

    dW = s * (w1_a @ w1_b) * (w2_a @ w2_b)                      w*_a (out, r), w*_b (r, in*prod(kernel))
    dW = s * cp(t1, w1_a, w1_b) * cp(t2, w2_a, w2_b)            effective_conv2d (CP form, k x k convs):
         cp(t, a, b) = einsum("ijkl,jr,ip->prkl", t, b, a)      t (r, r, kh, kw), a (r, out), b (r, in)
                                                                (nn.Conv1d: t (r, r, k, 1), as PEFT)

with ``s = alpha / r`` and ``in`` the input channels per group. Initialisation is PEFT's
(``init_weights=True``): w1_a, w1_b, w2_a (and t1, t2) kaiming-uniform, w2_b zero, so dW starts at
exactly zero. The branch is PEFT's own unmerged form (dW built from the factors, then the op), so a
PEFT checkpoint loads with PEFT's outputs. Training only (eval is exact): ``rank_dropout`` drops rows of
dW and rescales by the kept fraction, ``module_dropout`` skips the whole branch, both as PEFT. Merge: ``W += dW``. Deltas add, so several LoHa (or LoRA)
adapters on one weight merge by summing.

Gradients are autograd's through the graph. (PEFT 0.21.2's hand-written ``HadaWeightCP.backward``,
used with ``use_effective_conv2d``, returns w1_a / w2_a gradients that differ from autograd's derivative
of its own forward; its non-CP ``HadaWeight`` agrees.)

PEFT: ``peft_type`` LOHA, tensors ``<module>.hada_w1_a`` ... ``hada_t2``; ``peft_import`` /
``peft_export`` below convert both ways (Linear, nn.Conv1d, Conv2d; PEFT has no LoHa on Conv3d, graftlib's
flattened form works there). Not supported: rank / alpha patterns, ``effective_conv2d`` on a Conv3d.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graftlib.conv import CONV_MODULES, conv_name
from graftlib.editor import Editor
from graftlib.registry import Method, Option, in_range, positive, register
from graftlib.sites import Site
from graftlib.spec import GraftCall

from ._weight_delta import (check_options, peft_export_config, float_text, join_delta, kaiming,
                            peft_site_tensors, peft_sites, peft_spec_regex, rank_dropout, weight_shape)

__all__ = ["LoHa", "loha_delta", "peft_import", "peft_export"]

aten = torch.ops.aten
NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
CP = "ijkl,jr,ip->prkl"


def _uses_cp(site: Site, config: dict[str, Any]) -> bool:
    return site.kind == "conv" and config["effective_conv2d"] and any(k != 1 for k in site.conv["kernel"])


def _cp_kernel(site: Site) -> tuple[int, ...]:
    """The CP core's spatial dims: (kh, kw); PEFT's Conv1d stores (k, 1)."""
    kernel = tuple(site.conv["kernel"])
    return kernel + (1,) if len(kernel) == 1 else kernel


def _shapes(site: Site, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    r = config["r"]
    shape = weight_shape(site)
    out, rest = shape[0], shape[1:]
    if _uses_cp(site, config):
        core = _cp_kernel(site)
        return {"hada_w1_a": (r, out), "hada_w1_b": (r, rest[0]), "hada_t1": (r, r, *core),
                "hada_w2_a": (r, out), "hada_w2_b": (r, rest[0]), "hada_t2": (r, r, *core)}
    fan_in = 1
    for dim in rest:
        fan_in *= dim
    return {"hada_w1_a": (out, r), "hada_w1_b": (r, fan_in), "hada_w2_a": (out, r), "hada_w2_b": (r, fan_in)}


def loha_delta(site: Site, params: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """dW in the stored weight's layout, computed eagerly (merge)."""
    if "hada_t1" in params:
        first = torch.einsum(CP, params["hada_t1"], params["hada_w1_b"], params["hada_w1_a"])
        second = torch.einsum(CP, params["hada_t2"], params["hada_w2_b"], params["hada_w2_a"])
        delta = first * second * scale
    else:
        delta = (params["hada_w1_a"] @ params["hada_w1_b"]) * (params["hada_w2_a"] @ params["hada_w2_b"]) * scale
    return delta.reshape(weight_shape(site))


@register
class LoHa(Method):
    name = "loha"
    site_kinds = ("linear", "conv")
    mergeable = True
    options = {
        "r": Option(8, (int,), positive, help="rank of each of the two factors"),
        "alpha": Option(8.0, (float,), positive, help="scale numerator: s = alpha / r (PEFT's default 8)"),
        "rank_dropout": Option(0.0, (float,), in_range(0.0, 1.0), help="training: drop rows of dW"),
        "module_dropout": Option(0.0, (float,), in_range(0.0, 1.0), help="training: skip the branch"),
        "effective_conv2d": Option(False, (bool,), help="CP-decomposed factors for k x k convolutions "
                                                        "(PEFT's use_effective_conv2d)"),
    }

    def check_site(self, call: GraftCall, site: Site, config: dict[str, Any]) -> None:
        if site.part is not None:
            raise call.error(f"cannot graft loha on {site.key}: a slice of a fused projection; target the "
                             "whole projection")
        if _uses_cp(site, config) and len(site.conv["kernel"]) == 3:
            raise call.error(f"not supported: loha(effective_conv2d=true) on the {conv_name(site)} {site.path} "
                             "(the CP form is for Conv1d and Conv2d, as PEFT); drop effective_conv2d")

    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        shapes = _shapes(site, config)
        nodes = {name: editor.param(name, (lambda s=shape, n=name: torch.zeros(s) if n == "hada_w2_b" else kaiming(s)))
                 for name, shape in shapes.items()}
        scale = config["alpha"] / config["r"]
        if _uses_cp(site, config):
            first = editor.call(aten.einsum.default, CP, [nodes["hada_t1"], nodes["hada_w1_b"], nodes["hada_w1_a"]])
            second = editor.call(aten.einsum.default, CP, [nodes["hada_t2"], nodes["hada_w2_b"], nodes["hada_w2_a"]])
        else:
            first = editor.call(aten.mm.default, nodes["hada_w1_a"], nodes["hada_w1_b"])    # (out, in*k*k)
            second = editor.call(aten.mm.default, nodes["hada_w2_a"], nodes["hada_w2_b"])
        delta = editor.call(aten.mul.Tensor, editor.call(aten.mul.Tensor, first, second), scale)
        if site.kind == "conv":
            delta = editor.call(aten.view.default, delta, list(weight_shape(site)))  # (out, in/g, *kernel)
        delta = rank_dropout(editor, site, delta, config["rank_dropout"], True)
        join_delta(editor, site, delta, config["module_dropout"])

    def delta(self, site: Site, params: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
        return loha_delta(site, {k: v.detach() for k, v in params.items()}, config["alpha"] / config["r"])


# -- PEFT conversion -------------------------------------------------------------------------------
_HANDLED = {"r", "alpha", "use_effective_conv2d", "init_weights", "rank_pattern", "alpha_pattern"}


def peft_import(config: dict[str, Any], state: dict[str, torch.Tensor],
                model: nn.Module) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """A PEFT LoHa checkpoint as ``loha(re:"...", r=, alpha=, effective_conv2d=)`` plus its tensors."""
    check_options(config, _HANDLED | {"rank_dropout", "module_dropout"}, "LoHa checkpoint")
    paths = peft_sites(config, model, (nn.Linear, nn.Conv1d, nn.Conv2d), "loha")
    tensors = peft_site_tensors(state, paths, NAMES, "LoHa")
    r = int(config.get("r", 8))
    options = [peft_spec_regex(paths), f"r={r}", f"alpha={float_text(config.get('alpha', 8))}"]
    if config.get("use_effective_conv2d"):
        options.append("effective_conv2d=true")
    options += _dropouts(config)
    return f"loha({', '.join(options)})", tensors


def _dropouts(config: dict[str, Any]) -> list[str]:
    return [f"{key}={float_text(config[key])}" for key in ("rank_dropout", "module_dropout") if config.get(key)]


def peft_export(grafted: Any, record: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One LoHa adapter as PEFT's adapter_config dict and ``adapter_model`` tensors."""
    return peft_export_config(grafted, record, "LOHA")
