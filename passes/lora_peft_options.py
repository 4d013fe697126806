"""PEFT LoRA options beyond r / alpha / patterns, as the LoRA import and export see them.

    lora_bias=True               <path>.lora_B.bias (out,)       ->  lora(..., bias=true), param lora_B_bias
    use_bdlora (BD-LoRA)         block-diagonal A (r, in/n) or B (out, r/n), n = nblocks
                                 ->  the dense block-diagonal factor:  block_diag(*chunk(A, n, dim=0))  (r, in)
    velora_config (VeLoRA)       eval forward is LoRA's; the training-time activation compression is not applied
    monteclora_config            eval forward is LoRA's (A unperturbed); the training-time Monte-Carlo sampling
                                 of A is not applied; its sampler tensors are not loaded
    kasa_config (KaSA)           PEFT truncates the base weight by SVD at load (its r smallest components) and puts a
                                 learned diagonal between A and B -> one LoRA of rank r + min(in, out):
                                 [B·diag | B_t] [A ; A_t] with s B_t A_t = W' - W exactly as PEFT computes W'
                                 (mergeable); exported back to rank r with diag ones while the truncation is intact
    init_lora_weights='mica'     B set from the base weight's minor singular vectors at creation, saved in the
                                 checkpoint, so the load is LoRA's; PEFT freezes B in training, graftlib does not

BD-LoRA on export: a factor that is still exactly block-diagonal is written in PEFT's block layout with the
original ``use_bdlora``; once training filled an off-diagonal block, the adapter is written as plain LoRA
(same outputs, ``use_bdlora`` dropped), because PEFT's block layer cannot hold it.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from graftlib.errors import LoadError

__all__ = ["HANDLED", "check_options", "training_notes", "drop_training_state", "bdlora_blocks",
           "to_dense", "to_blocks", "bias_name", "kasa_diagonals", "kasa_fold", "kasa_outputs"]

#: LoRA config keys this module handles (besides the plain ones in lora_peft)
HANDLED = {"lora_bias", "use_bdlora", "velora_config", "monteclora_config", "target_parameters",
           "trainable_token_indices", "kasa_config"}
#: PEFT tensor suffixes of training-only state, per option
_TRAINING_STATE = {"velora_config": re.compile(r"\.lora_velora_embed$"),
                   "monteclora_config": re.compile(r"\.lora_monteclora_sampler\.[A-Za-z_]+$")}
_NOTES = {
    "velora_config": "VeLoRA's training-time activation compression is not applied (its eval forward is plain "
                     "LoRA's, which is what graftlib computes; training here uses full activations)",
    "monteclora_config": "MonteCLoRA's training-time Monte-Carlo sampling of lora_A is not applied (its eval "
                         "forward is plain LoRA's, which is what graftlib computes); its sampler state is not loaded",
}
_KASA_NOTE = ("KaSA's SVD-truncated base is held as extra ranks (r + min(in, out) in all) of the LoRA: graftlib "
              "trains them with the rest (PEFT keeps the truncated base frozen; save_peft refuses once they changed), and "
              "disable_adapters() gives the untruncated base (PEFT's disabled model keeps the truncation)")
_MICA_NOTE = ("MiCA (init_lora_weights='mica') freezes lora_B in PEFT's training; graftlib trains both factors "
              "(the loaded model is the same)")


def bias_name(peft_param: str) -> str:
    """graftlib's parameter name for a PEFT LoRA tensor name (``lora_B.bias`` -> ``lora_B_bias``)."""
    return "lora_B_bias" if peft_param == "lora_B.bias" else peft_param.split(".")[0]


def check_options(config: Mapping[str, Any], source: str) -> None:
    """Types and bounds of the options here; combinations graftlib does not load."""
    bd = config.get("use_bdlora")
    if bd:
        if not isinstance(bd, Mapping):
            raise LoadError(f"{source}: use_bdlora={str(bd)[:80]!r} must be an object (PEFT's BdLoraConfig)")
        nblocks = bd.get("nblocks", 1)
        if isinstance(nblocks, bool) or not isinstance(nblocks, int) or not 1 <= nblocks <= 4096:
            raise LoadError(f"{source}: use_bdlora.nblocks={nblocks!r} must be an integer in [1, 4096]")
        for key in ("target_modules_bd_a", "target_modules_bd_b"):
            value = bd.get(key)
            if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)
                                      or len(value) > 10_000 or any(len(v) > 1000 for v in value)):
                raise LoadError(f"{source}: use_bdlora.{key} must be a list of module names")
        if config.get("use_dora"):
            raise LoadError(f"{source}: not supported: use_bdlora together with use_dora")
    if config.get("lora_bias") not in (None, False, True):
        raise LoadError(f"{source}: lora_bias={config.get('lora_bias')!r} must be true or false")
    if config.get("lora_bias") and config.get("use_dora"):
        raise LoadError(f"{source}: not supported: lora_bias=true together with use_dora")


def training_notes(config: Mapping[str, Any]) -> list[str]:
    """What a load of this config does not reproduce in training (warned once per load)."""
    notes = [text for key, text in _NOTES.items() if config.get(key)]
    if config.get("kasa_config"):
        notes.append(_KASA_NOTE)
    if config.get("init_lora_weights") == "mica":
        notes.append(_MICA_NOTE)
    for note in notes:
        warnings.warn(f"from_peft: {note}", stacklevel=4)
    return notes


def drop_training_state(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the training-only tensors of the options `config` sets (VeLoRA, MonteCLoRA)."""
    patterns = [pattern for key, pattern in _TRAINING_STATE.items() if config.get(key)]
    return {k: v for k, v in state.items() if not any(p.search(k) for p in patterns)}


def bdlora_blocks(config: Mapping[str, Any], path: str) -> tuple[str | None, int]:
    """("A" | "B" | None, nblocks): which factor of module `path` PEFT stores block-diagonal (its substring
    match of the module path, ``BdLoraLinearVariant.init``)."""
    bd = config.get("use_bdlora")
    if not bd:
        return None, 1
    in_a = any(p in path for p in bd.get("target_modules_bd_a") or [])
    in_b = any(p in path for p in bd.get("target_modules_bd_b") or [])
    nblocks = int(bd.get("nblocks", 1))
    if in_a and in_b:
        raise LoadError(f"use_bdlora: module {path!r} matches both target_modules_bd_a and target_modules_bd_b")
    return ("A" if in_a else "B" if in_b else None), nblocks


def to_dense(blocks: torch.Tensor, nblocks: int, dense_shape: tuple[int, int], key: str,
             source: str) -> torch.Tensor:
    """PEFT's stored block-diagonal factor (rows, cols / n) -> the dense (rows, cols) factor."""
    rows, cols = dense_shape
    want = (rows, cols // nblocks)
    if rows % nblocks or cols % nblocks or tuple(blocks.shape) != want:
        raise LoadError(f"{source}: tensor {key!r} has shape {tuple(blocks.shape)}; a block-diagonal factor with "
                        f"{nblocks} blocks of the dense {dense_shape} needs {want} (both sides divisible by "
                        f"{nblocks}); was the adapter saved from another base model?")
    return torch.block_diag(*torch.chunk(blocks, nblocks, dim=0))


def to_blocks(dense: torch.Tensor, nblocks: int) -> torch.Tensor | None:
    """The dense factor in PEFT's block layout, or None when an off-diagonal entry is not zero."""
    rows, cols = dense.shape
    if rows % nblocks or cols % nblocks:
        return None
    n, m = rows // nblocks, cols // nblocks
    blocks = [dense[i * n:(i + 1) * n, i * m:(i + 1) * m] for i in range(nblocks)]
    if not torch.equal(torch.block_diag(*blocks), dense):
        return None
    return torch.cat(blocks, dim=0)


# -- KaSA --------------------------------------------------------------------------------------------
def truncation_delta(weight: torch.Tensor, r: int) -> torch.Tensor:
    """W' - W (out, in): PEFT's KaSA base W' (``KasaLinearVariant._truncate_base_weight``: fp32 SVD, the `r`
    smallest components dropped, back in the weight's dtype) minus the base weight."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    keep = min(weight.shape) - r
    truncated = ((u[:, :keep] * s[:keep]) @ vh[:keep, :]).to(weight.dtype)
    return truncated - weight.detach()


def _truncation_factors(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_t (k, in), B_t (out, k)), k = min(in, out), with s B_t A_t = W' - W: an identity and the delta."""
    delta = truncation_delta(weight, r)                                           # (out, in)
    out_features, in_features = delta.shape
    if in_features <= out_features:
        return torch.eye(in_features, dtype=delta.dtype), delta / scale
    return delta / scale, torch.eye(out_features, dtype=delta.dtype)


def _scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def kasa_diagonals(config: Mapping[str, Any], state: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    """``{module path: (key, lora_diag (r,))}`` taken out of `state` for a ``kasa_config`` checkpoint."""
    if not config.get("kasa_config"):
        return {}
    found = {}
    for key in [k for k in state if k.endswith(".lora_diag")]:
        found[key[len("base_model.model."):-len(".lora_diag")]] = (key, state.pop(key))
    return found


def kasa_fold(site: Any, weight: torch.Tensor, diag: tuple[str, torch.Tensor] | None, r: int, alpha: float,
              rslora: bool, a: torch.Tensor, b: torch.Tensor, source: str
              ) -> tuple[int, float, torch.Tensor, torch.Tensor]:
    """KaSA as one plain LoRA of rank r + k, k = min(in, out), with the same scale s:

        W' x + s B(diag * A x)  =  W x + s [B·diag | B_t] [A ; A_t] x,   s B_t A_t = W' - W

    W' is PEFT's truncated base computed as PEFT does, so the load is PEFT's to float rounding (a rank-r
    form of W' - W from the dropped singular vectors misses PEFT's own rounding of W', ~1e-5 on large
    inputs); it merges into W like any LoRA."""
    key = f"base_model.model.{site.path}.lora_diag"
    if site.kind != "linear":
        raise LoadError(f"{source}: not supported: KaSA on {site.path} ({site.kind}); PEFT's KaSA is for nn.Linear")
    if diag is None:
        raise LoadError(f"{source}: tensor {key!r} is missing (expected shape ({r},)); the config has kasa_config")
    if tuple(diag[1].shape) != (r,):
        raise LoadError(f"{source}: tensor {key!r} has shape {tuple(diag[1].shape)} but r={r} needs ({r},)")
    if r >= min(site.in_features, site.out_features):
        raise LoadError(f"{source}: KaSA needs r={r} below min(in, out) of {site.path}")
    scale = _scale(r, alpha, rslora)
    a_t, b_t = _truncation_factors(weight, r, scale)
    rank = r + a_t.shape[0]
    a2 = torch.cat([a, a_t.to(a.dtype)], dim=0)                                 # (r + k, in)
    b2 = torch.cat([b * diag[1], b_t.to(b.dtype)], dim=1)                       # (out, r + k)
    return rank, scale * (math.sqrt(rank) if rslora else rank), a2, b2


def kasa_outputs(config: Mapping[str, Any], outputs: list[Any], weights: Mapping[str, torch.Tensor],
                 site_rank_alpha: Any, prefix: str) -> dict[str, torch.Tensor]:
    """Cut exported KaSA LoRAs back to rank r (in place on `outputs`) and give their ``lora_diag`` (ones: B
    holds B·diag); refused when the truncation part no longer is PEFT's (training changed it)."""
    from graftlib.errors import GraftError

    extra = {}
    rslora = bool(config.get("use_rslora"))
    for out in outputs:
        r, alpha = site_rank_alpha(config, out.site.path)
        a_t, b_t = _truncation_factors(weights[out.site.path], r, _scale(r, alpha, rslora))
        if out.r != r + a_t.shape[0]:
            raise GraftError(f"cannot save the KaSA LoRA on {out.site.path}: rank {out.r}, expected {r} + "
                             f"{a_t.shape[0]}")
        if not (torch.allclose(out.a[r:], a_t.to(out.a.dtype), rtol=1e-5, atol=1e-7) and
                torch.allclose(out.b[:, r:], b_t.to(out.b.dtype), rtol=1e-5, atol=1e-7)):
            raise GraftError(f"cannot save the KaSA adapter on {out.site.path} in PEFT's format: its last "
                             f"{out.r - r} ranks no longer are PEFT's SVD truncation of the base weight (PEFT "
                             "recomputes that when loading); save it with g.save(dir)")
        out.a, out.b, out.r, out.alpha = out.a[:r], out.b[:, :r], r, alpha
        extra[f"{prefix}{out.site.path}.lora_diag"] = out.a.new_ones(r)
    return extra
