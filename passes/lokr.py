"""LoKr: a weight delta that is the Kronecker product of two small (optionally low-rank) matrices.

    linear(x, W, b)    ->  linear(x, W, b) + linear(x, dW)
    convNd(x, W, ...)  ->  convNd(x, W, ...) + convNd(x, dW, None, stride, padding, dilation, groups)

    dW = s * kron(w1, w2)  reshaped to W's shape
    w1 = lokr_w1 (a, c)            or  lokr_w1_a (a, r) @ lokr_w1_b (r, c)     (decompose_both, small r)
    w2 = lokr_w2 (b, d[, kh, kw])  or  lokr_w2_a (b, r) @ lokr_w2_b (r, d*kh*kw)
                                   or  einsum("ijkl,ip,jr->prkl", lokr_t2, w2_a (r, b), w2_b (r, d))
                                       (effective_conv2d on a k x k conv)

with ``out = a*b``, ``in = c*d`` (in: channels per group) from PEFT's ``factorization(dim, factor)``
(``decompose_factor``, default: the divisor pair nearest the square root), ``s = alpha / r``, and the
full (not low-rank) w2 used when ``r >= max(b, d) / 2`` — exactly PEFT's choices, so the shapes match
its checkpoints. Initialisation is PEFT's: w1 (or w1_a) zero, the rest kaiming-uniform, so dW starts
at zero; ``init=lycoris`` zeroes w2 (or w2_b) instead. Merge: ``W += dW``; deltas add. Training only
(eval is exact): ``rank_dropout`` drops rows of dW (rescaled with ``rank_dropout_scale``),
``module_dropout`` skips the whole branch, both as PEFT.

PEFT: ``peft_type`` LOKR, tensors ``<module>.lokr_w1`` ... ``lokr_t2``; ``peft_import`` / ``peft_export``
below (Linear, nn.Conv1d, Conv2d; graftlib's flattened form also on Conv3d, where PEFT has no LoKr). As in
PEFT, a full w2 of an nn.Conv1d, (b, d, k), is Kronecker-multiplied with the 2-d w1 as ``torch.kron`` does
(w1 read as (1, a, c)), and its CP core is (r, r, k, 1). Not supported: rank / alpha patterns,
``effective_conv2d`` on a Conv3d.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graftlib.conv import conv_name
from graftlib.editor import Editor
from graftlib.registry import Method, Option, in_range, positive, register
from graftlib.sites import Site
from graftlib.spec import GraftCall

from ._weight_delta import (check_options, peft_export_config, float_text, join_delta, kaiming,
                            peft_site_tensors, peft_sites, peft_spec_regex, rank_dropout, weight_shape)

__all__ = ["LoKr", "factorization", "lokr_delta", "peft_import", "peft_export"]

aten = torch.ops.aten
NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
CP = "ijkl,ip,jr->prkl"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS's) split of `dimension` into ``m <= n`` with ``m * n == dimension``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _shapes(site: Site, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, following PEFT's LoKrLayer.update_layer decisions."""
    r, factor = config["r"], config["decompose_factor"]
    shape = weight_shape(site)
    out_l, out_k = factorization(shape[0], factor)
    in_m, in_n = factorization(shape[1], factor)
    kernel = tuple(shape[2:])
    use_w1 = not (config["decompose_both"] and r < max(out_l, in_m) / 2)
    use_w2 = r >= max(out_k, in_n) / 2
    effective = bool(kernel) and config["effective_conv2d"] and any(k != 1 for k in kernel)
    shapes = {"lokr_w1": (out_l, in_m)} if use_w1 else {"lokr_w1_a": (out_l, r), "lokr_w1_b": (r, in_m)}
    if use_w2:
        shapes["lokr_w2"] = (out_k, in_n, *kernel)
    elif effective:
        core = kernel + (1,) if len(kernel) == 1 else kernel                      # PEFT's Conv1d: (k, 1)
        shapes.update(lokr_t2=(r, r, *core), lokr_w2_a=(r, out_k), lokr_w2_b=(r, in_n))
    else:
        size = in_n
        for k in kernel:
            size *= k
        shapes.update(lokr_w2_a=(out_k, r), lokr_w2_b=(r, size))
    return shapes


def _zero_init(name: str, lycoris: bool) -> bool:
    return name in (("lokr_w2", "lokr_w2_b") if lycoris else ("lokr_w1", "lokr_w1_a"))


def lokr_delta(site: Site, params: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """dW in the stored weight's layout, computed eagerly (merge)."""
    w1 = params["lokr_w1"] if "lokr_w1" in params else params["lokr_w1_a"] @ params["lokr_w1_b"]
    if "lokr_w2" in params:
        w2 = params["lokr_w2"]
    elif "lokr_t2" in params:
        w2 = torch.einsum(CP, params["lokr_t2"], params["lokr_w2_a"], params["lokr_w2_b"])
    else:
        w2 = params["lokr_w2_a"] @ params["lokr_w2_b"]
    w1 = w1.reshape(*w1.shape, *[1] * (_w1_rank(w2.dim()) - 2))
    return (torch.kron(w1, w2.contiguous()) * scale).reshape(weight_shape(site))


def _w1_rank(w2_rank: int) -> int:
    """The rank w1 is viewed at for ``kron(w1, w2)``: w2's, except PEFT's 3-d (Conv1d) w2, which it leaves 2-d."""
    return 2 if w2_rank == 3 else w2_rank


@register
class LoKr(Method):
    name = "lokr"
    site_kinds = ("linear", "conv")
    mergeable = True
    options = {
        "r": Option(8, (int,), positive, help="rank of the low-rank factors"),
        "alpha": Option(8.0, (float,), positive, help="scale numerator: s = alpha / r (PEFT's default 8)"),
        "decompose_both": Option(False, (bool,), help="low-rank w1 too (when r < max(a, c) / 2)"),
        "decompose_factor": Option(-1, (int,), help="Kronecker factor size (-1: nearest the square root)"),
        "rank_dropout": Option(0.0, (float,), in_range(0.0, 1.0), help="training: drop rows of dW"),
        "module_dropout": Option(0.0, (float,), in_range(0.0, 1.0), help="training: skip the branch"),
        "rank_dropout_scale": Option(False, (bool,), help="rescale kept rows by the kept fraction"),
        "effective_conv2d": Option(False, (bool,), help="CP-decomposed w2 for k x k convolutions"),
        "init": Option("peft", (str,), choices=("peft", "lycoris"), help="which factor starts at zero"),
    }

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        if config["decompose_factor"] == 0 or config["decompose_factor"] < -1:
            raise call.option_error("decompose_factor", "decompose_factor must be -1 or a positive divisor size")

    def check_site(self, call: GraftCall, site: Site, config: dict[str, Any]) -> None:
        if site.part is not None:
            raise call.error(f"cannot graft lokr on {site.key}: a slice of a fused projection; target the "
                             "whole projection")
        if site.kind == "conv" and len(site.conv["kernel"]) == 3 and config["effective_conv2d"] and \
                "lokr_t2" in _shapes(site, config):
            raise call.error(f"not supported: lokr(effective_conv2d=true) on the {conv_name(site)} {site.path} "
                             "(the CP form is for Conv1d and Conv2d, as PEFT); drop effective_conv2d")

    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        lycoris = config["init"] == "lycoris"
        nodes = {name: editor.param(name, (lambda s=shape, n=name: torch.zeros(s) if _zero_init(n, lycoris)
                                           else kaiming(s)))
                 for name, shape in _shapes(site, config).items()}
        w1 = nodes.get("lokr_w1")
        if w1 is None:
            w1 = editor.call(aten.mm.default, nodes["lokr_w1_a"], nodes["lokr_w1_b"])       # (a, c)
        if "lokr_w2" in nodes:
            w2 = nodes["lokr_w2"]
        elif "lokr_t2" in nodes:
            w2 = editor.call(aten.einsum.default, CP, [nodes["lokr_t2"], nodes["lokr_w2_a"], nodes["lokr_w2_b"]])
        else:
            w2 = editor.call(aten.mm.default, nodes["lokr_w2_a"], nodes["lokr_w2_b"])       # (b, d*kh*kw)
        shapes = _shapes(site, config)
        w2_rank = 4 if "lokr_t2" in shapes else len(shapes.get("lokr_w2", (0, 0)))
        if _w1_rank(w2_rank) > 2:                                                   # w2 (b, d, *kernel)
            shape = weight_shape(site)
            a, c = factorization(shape[0], config["decompose_factor"])[0], \
                factorization(shape[1], config["decompose_factor"])[0]
            w1 = editor.call(aten.view.default, w1, [a, c] + [1] * (_w1_rank(w2_rank) - 2))
        w2 = editor.call(aten.contiguous.default, w2)                              # as PEFT's make_kron
        delta = editor.call(aten.mul.Tensor, editor.call(aten.kron.default, w1, w2), config["alpha"] / config["r"])
        delta = editor.call(aten.reshape.default, delta, list(weight_shape(site)))
        delta = rank_dropout(editor, site, delta, config["rank_dropout"], config["rank_dropout_scale"])
        join_delta(editor, site, delta, config["module_dropout"])

    def delta(self, site: Site, params: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
        return lokr_delta(site, {k: v.detach() for k, v in params.items()}, config["alpha"] / config["r"])


# -- PEFT conversion -------------------------------------------------------------------------------
_HANDLED = {"r", "alpha", "use_effective_conv2d", "decompose_both", "decompose_factor", "init_weights",
            "rank_dropout_scale", "rank_pattern", "alpha_pattern"}


def peft_import(config: dict[str, Any], state: dict[str, torch.Tensor],
                model: nn.Module) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """A PEFT LoKr checkpoint as ``lokr(re:"...", r=, alpha=, ...)`` plus its tensors."""
    check_options(config, _HANDLED | {"rank_dropout", "module_dropout"}, "LoKr checkpoint")
    paths = peft_sites(config, model, (nn.Linear, nn.Conv1d, nn.Conv2d), "lokr")
    tensors = peft_site_tensors(state, paths, NAMES, "LoKr")
    options = [peft_spec_regex(paths), f"r={int(config.get('r', 8))}",
               f"alpha={float_text(config.get('alpha', 8))}",
               f"decompose_factor={int(config.get('decompose_factor', -1))}"]
    if config.get("decompose_both"):
        options.append("decompose_both=true")
    if config.get("use_effective_conv2d"):
        options.append("effective_conv2d=true")
    if config.get("init_weights") == "lycoris":
        options.append("init=lycoris")
    options += [f"{key}={float_text(config[key])}" for key in ("rank_dropout", "module_dropout") if config.get(key)]
    if config.get("rank_dropout_scale"):
        options.append("rank_dropout_scale=true")
    return f"lokr({', '.join(options)})", tensors


def peft_export(grafted: Any, record: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One LoKr adapter as PEFT's adapter_config dict and ``adapter_model`` tensors."""
    config = record.config
    return peft_export_config(grafted, record, "LOKR", decompose_both=bool(config["decompose_both"]),
                              decompose_factor=config["decompose_factor"],
                              rank_dropout_scale=bool(config["rank_dropout_scale"]),
                              init_weights="lycoris" if config["init"] == "lycoris" else True)
