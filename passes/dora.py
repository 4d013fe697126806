"""DoRA (``lora(..., dora=true)``): LoRA whose merged weight is renormalised to a learned magnitude.

PEFT's DoRA computes ``y = m / ||W + s·BA||_row · (W + s·BA) x + b`` with the norm detached (DoRA paper
section 4.3). With ``k = m / ||W + s·BA||`` (one factor per output; computed from parameters only)
the pass fuses it as

    linear(x, W, b)  ->  addcmul(linear(linear(x, A), B·(s·k), (1 - k)·b), linear(x, W, b), k)
                         =  k·(Wx + b) + s·k·BAx + (1 - k)·b  =  k·Wx + s·k·BAx + b

so the activations see the two LoRA matmuls and one addcmul, the same work as LoRA; the rest is on
(out, r) and (out,) tensors. nn.Conv1d/2d/3d keep PEFT's own order instead,

    convNd(x, W, b)  ->  y + ((k - 1)·(y - b) + (k·convNd(convNd(x, A), B))·s)        k (1, out, 1, ...)

because conv activations can be large (PEFT's tests feed 0..57599) and the fused form rounds 1e-3 away
from PEFT there; a grouped conv only in PEFT's dense layout, whose norm is PEFT's ``mm(B.view(-1, r),
A.view(r, -1))`` reshaped to W. GPT-2 Conv1D (W
stored (in, out): the norm runs over its columns) and Embedding (``k`` per embedding dim, no bias:
``addcmul(linear(emb(A^T, i), B·(s·k)), emb(E, i), k)``) follow PEFT's ``DoraLinearLayer`` /
``DoraConv2dLayer`` / ``DoraEmbeddingLayer``. With dropout ``p > 0`` PEFT's training forward uses the
dropped input for the magnitude term too: ``y + linear(drop(x), (k - 1)·W) + linear(linear(drop(x), A),
B·(s·k))`` (eval drops the dropout and gives the fused value).

The factor nodes (norm, ``k``, ``B·(s·k)``, ``(1 - k)·b``) read only parameters and are tagged
``cache``: in eval mode the runtime computes them once and reuses them until a parameter they read
changes (``graftlib/cache.py``), as PEFT's ``ENABLE_DORA_CACHING`` does, without its stale-cache risk.

Init: PEFT's LoRA init and ``m = ||W + s·BA||_row = ||W||_row`` (B is zero), so ``k == 1`` exactly
and the grafted model equals the base. Merge: ``W' = k·(W + s·BA)`` (rows; conv: output channels;
embedding: columns), bias unchanged.
"""
from __future__ import annotations

from typing import Any

import torch

from graftlib.conv import channel_shape, conv_op, ones, zeros
from graftlib.editor import Editor, graft_tag
from graftlib.sites import Site

__all__ = ["dora_rewrite", "dora_norm", "dora_merged_weight", "lora_weight", "NORM_DIMS", "norm_dims"]

aten = torch.ops.aten

#: site kind -> the dims of the stored weight the norm reduces over (what stays: one entry per output)
NORM_DIMS = {"linear": [1], "conv1d": [0], "embedding": [0]}


def norm_dims(site: Site) -> list[int]:
    """The dims the norm reduces over; a conv (nn.Conv1d/2d/3d) keeps its output channels."""
    if site.kind == "conv":
        return list(range(1, len(site.conv["kernel"]) + 2))
    return NORM_DIMS[site.kind]


def lora_weight(site: Site, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B @ A`` in the stored weight's layout (unscaled)."""
    if site.kind == "conv":  # PEFT's mm(B.view(-1, r), A.view(r, -1)) reshaped to W (its dense grouped layout too)
        r = a.shape[0]
        groups = site.conv["groups"]
        return (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(site.out_features, site.in_features // groups,
                                                             *site.conv["kernel"])
    delta = b @ a  # (out, in); embedding: (dim, vocab)
    return delta.T if site.kind in ("conv1d", "embedding") else delta


def dora_norm(site: Site, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``||W + s·BA||`` per output (out,), as the graph computes it (the magnitude init uses it too)."""
    return torch.linalg.vector_norm(weight + scale * lora_weight(site, a, b), 2, norm_dims(site))


def _factor_shape(site: Site, k: torch.Tensor) -> torch.Tensor:
    """k (out,) shaped to scale the stored weight."""
    if site.kind == "linear":
        return k[:, None]
    if site.kind == "conv":
        return k.reshape(channel_shape(site, first=True))
    return k[None, :]  # conv1d (in, out), embedding (vocab, dim)


def dora_merged_weight(site: Site, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """``k·(W + s·BA)`` in the stored layout."""
    adapted = weight + scale * lora_weight(site, a, b)
    k = m / torch.linalg.vector_norm(adapted, 2, norm_dims(site))
    return _factor_shape(site, k) * adapted


def _cached(node: Any) -> Any:
    graft_tag(node)["cache"] = True
    return node


def _norm_nodes(editor: Editor, site: Site, weight: Any, a: Any, b: Any, scale: float,
                weight_shape: list[int], rank: int) -> Any:
    """Graph nodes for the detached ``||W + s·BA||`` (out,)."""
    call = editor.call
    if site.kind == "conv":
        flat = _cached(call(aten.mm.default, _cached(call(aten.reshape.default, b, [-1, rank])),
                            _cached(call(aten.reshape.default, a, [rank, -1]))))            # (out, in·kh·kw)
        low = _cached(call(aten.reshape.default, flat, weight_shape))
        adapted = _cached(call(aten.add.Tensor, weight, low, alpha=scale))
    elif site.kind == "linear":
        adapted = _cached(call(aten.addmm.default, weight, b, a, alpha=scale))             # W + s·B@A
    else:  # conv1d W (in, out); embedding E (vocab, dim): W + s·(B@A)^T = W + s·A^T@B^T
        a_t = _cached(call(aten.t.default, a))
        b_t = _cached(call(aten.t.default, b))
        adapted = _cached(call(aten.addmm.default, weight, a_t, b_t, alpha=scale))
    norm = _cached(call(aten.linalg_vector_norm.default, adapted, 2, norm_dims(site)))
    return _cached(call(aten.detach.default, norm))


def _weight_and_bias(anchor: Any, site: Site) -> tuple[Any, Any]:
    if site.kind == "conv1d":  # addmm(b, x, W)
        return anchor.args[2], anchor.args[0]
    if site.kind == "embedding":  # embedding(E, i)
        return anchor.args[0], None
    return anchor.args[1], (anchor.args[2] if len(anchor.args) > 2 else None)


def _magnitude_init(editor: Editor, site: Site, weight: Any, scale: float) -> Any:
    """PEFT's init: ``m = ||W + s·BA||`` from the branch's initial factors, in the graph's own arithmetic."""
    from graftlib.sites import weight_value

    holder = editor.store.site_params(editor.adapter, site.key)
    names = ("lora_embedding_A", "lora_embedding_B") if site.kind == "embedding" else ("lora_A", "lora_B")
    w = weight_value(editor.gm, weight.target).detach()
    a, b = (getattr(holder, n).detach() for n in names)

    def init() -> torch.Tensor:
        with torch.no_grad():
            return dora_norm(site, w, a, b, scale)
    return editor.param("lora_magnitude_vector", init), a.shape[0]


def dora_rewrite(editor: Editor, site: Site, config: dict[str, Any], scale: float,
                 a: Any, b: Any, x: Any, low: Any) -> None:
    """Join DoRA at the anchor. `a`, `b` are the LoRA factors' get_attr nodes, `x` the branch input
    (after dropout), `low` = A(x) (``emb(A^T, i)`` for embeddings)."""
    anchor, call = editor.anchor, editor.call
    weight, bias = _weight_and_bias(anchor, site)
    m, rank = _magnitude_init(editor, site, weight, scale)
    weight_shape = list(weight.meta["val"].shape) if site.kind == "conv" else []
    norm = _norm_nodes(editor, site, weight, a, b, scale, weight_shape, rank)
    k = _cached(call(aten.div.Tensor, m, norm))                                             # (out,)
    sk = _cached(call(aten.mul.Tensor, k, scale))
    column = channel_shape(site, first=True) if site.kind == "conv" else [-1, 1]
    b_eff = _cached(call(aten.mul.Tensor, b, _cached(call(aten.view.default, sk, column))))  # B·(s·k)
    base = editor.value_at(anchor, same_shape=True)
    if config["dropout"] > 0 and site.kind != "embedding":
        _join_with_dropout(editor, site, base, weight, k, x, low, b_eff)
        return
    if site.kind == "conv":
        _join_conv(editor, site, base, bias, k, low, b, scale)
        return
    corrected = None
    if bias is not None:
        corrected = _cached(call(aten.mul.Tensor, _cached(call(aten.rsub.Scalar, k, 1)), bias))  # (1-k)·b
    if site.kind == "conv":
        extra = call(conv_op(site), low, b_eff, corrected, ones(site), zeros(site), ones(site), site.conv["groups"])
        k = _cached(call(aten.view.default, k, channel_shape(site)))
    else:
        extra = call(aten.linear.default, low, b_eff, corrected)
    editor.join(base, aten.addcmul.default, extra, base, k)                                 # extra + base·k


def _join_conv(editor: Editor, site: Site, base: Any, bias: Any, k: Any, low: Any, b: Any, scale: float) -> None:
    """A conv's DoRA op for op in PEFT's order, ``y + ((k - 1)·(y - b) + (k·conv(A(x), B))·s)``: conv outputs
    can be large (PEFT's tests feed 0..57599), where a fused ``y·k + ...`` rounds differently (1e-3)."""
    call = editor.call
    k_view = _cached(call(aten.view.default, k, channel_shape(site)))                     # (1, out, 1, ...)
    k_minus_1 = _cached(call(aten.sub.Tensor, k_view, 1))
    unbiased = base if bias is None else call(aten.sub.Tensor, base, call(aten.view.default, bias,
                                                                          channel_shape(site)))
    lora = call(conv_op(site), low, b, None, ones(site), zeros(site), ones(site), site.conv["groups"])
    scaled = call(aten.mul.Tensor, call(aten.mul.Tensor, k_view, lora), scale)
    extra = call(aten.add.Tensor, call(aten.mul.Tensor, k_minus_1, unbiased), scaled)
    editor.join(base, aten.add.Tensor, base, extra)


def _join_with_dropout(editor: Editor, site: Site, base: Any, weight: Any, k: Any, x: Any, low: Any,
                       b_eff: Any) -> None:
    """PEFT's training forward under dropout: the magnitude term reads the dropped input too."""
    call = editor.call
    k_minus_1 = _cached(call(aten.sub.Tensor, k, 1))
    if site.kind == "conv":
        conv = site.conv
        w_scaled = _cached(call(aten.mul.Tensor, weight, _cached(call(aten.view.default, k_minus_1,
                                                                         channel_shape(site, first=True)))))
        mag = call(conv_op(site), x, w_scaled, None, conv["stride"], conv["padding"], conv["dilation"],
                   conv["groups"])
        lora = call(conv_op(site), low, b_eff, None, ones(site), zeros(site), ones(site), conv["groups"])
    elif site.kind == "conv1d":
        mag = call(aten.matmul.default, x, _cached(call(aten.mul.Tensor, weight, k_minus_1)))
        lora = call(aten.linear.default, low, b_eff)
    else:
        w_scaled = _cached(call(aten.mul.Tensor, weight, _cached(call(aten.unsqueeze.default, k_minus_1, 1))))
        mag = call(aten.linear.default, x, w_scaled)
        lora = call(aten.linear.default, low, b_eff)
    editor.join(base, aten.add.Tensor, base, call(aten.add.Tensor, mag, lora))


# -- PEFT checkpoints (graftlib/peft.py's LoRA conversion calls these) ---------------------------------
def _peft_shape(site: Site) -> tuple[int, ...]:
    return tuple(channel_shape(site, site.out_features)) if site.kind == "conv" else (site.out_features,)


def peft_import_magnitudes(config: Any, chosen: Any, by_path: Any, source: str) -> dict[str, torch.Tensor]:
    """``{module path: m (out,)}`` from PEFT's ``<path>.lora_magnitude_vector`` (conv: (1, out, 1, 1))."""
    from graftlib.errors import LoadError

    found = {path: params["lora_magnitude_vector"] for path, params in by_path.items()
             if "lora_magnitude_vector" in params}
    if not config.get("use_dora"):
        if found:
            key = next(iter(found.values()))[0]
            raise LoadError(f"{source}: unexpected tensor {key!r} (a DoRA magnitude) in a checkpoint whose config "
                            "has use_dora=false; the checkpoint does not match its config")
        return {}
    magnitudes = {}
    for path, site in chosen.items():
        key = f"base_model.model.{path}.lora_magnitude_vector"
        if path not in found:
            raise LoadError(f"{source}: tensor {key!r} is missing (expected shape {_peft_shape(site)}); the config "
                            "has use_dora=true")
        tensor = found[path][1]
        if tuple(tensor.shape) != _peft_shape(site):
            raise LoadError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but {path} needs "
                            f"{_peft_shape(site)}; was the adapter saved from another base model?")
        magnitudes[path] = tensor.reshape(site.out_features)
    return magnitudes


def peft_export_magnitudes(grafted: Any, record: Any, index: Any, prefix: str) -> dict[str, torch.Tensor]:
    """PEFT's ``lora_magnitude_vector`` keys for a ``lora(..., dora=true)`` graft."""
    tensors = grafted.store.tensors(record.adapter)
    state = {}
    for key in record.sites:
        site = index.by_key(key)
        state[f"{prefix}{site.path}.lora_magnitude_vector"] = \
            tensors[key]["lora_magnitude_vector"].detach().reshape(_peft_shape(site))
    return state
