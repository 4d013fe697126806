"""LoRA in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors`` <-> ``lora(...)``.

    PEFT LoRA on module M   base_model.model.M.lora_A.weight (r, in), .lora_B.weight (out, r)
                            (conv2d (r, in, kh, kw) / (out, r, 1, 1); embeddings lora_embedding_A (r, vocab)
                            and lora_embedding_B (dim, r))
        ->  lora(re:"M|...", r=R, alpha=a, rslora=..., dropout=p)

The LoRA pass's PEFT hooks (re-exported by passes/lora.py; ``graftlib/peft.py`` dispatches to them and
keeps the format: reading, key naming, target matching, modules_to_save):

- ``peft_check(config, source)`` refuses what would load as a different model, before tracing;
- ``peft_import(config, state, model, grafted=, source=) -> (spec, {site key: {param: tensor}}, extras)``;
- ``peft_export(grafted, record) -> (adapter_config dict, PEFT state dict)``.

Rank and alpha patterns (``rank_pattern`` / ``alpha_pattern``): graftlib gives one adapter one LoRA graft
with one ``r`` and ``alpha``, so every site is stored at the largest rank R (A zero-padded with rows,
B with columns; zero rows and columns add exactly nothing and get zero gradients, so they stay zero
in training) and the site's own scale is folded into B (``B * s_site / s_graft``). The per-site PEFT
``(r, alpha)`` is kept in the record's ``extras["peft"]["sites"]``; ``peft_export`` cuts the padding and
unfolds the scale, so the checkpoint round-trips with its original shapes. Slices of a fused projection
(GPT-2 ``c_attn[q]``) export as one LoRA on the whole module.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from graftlib.errors import GraftError, LoadError, near_names
from graftlib.lowrank import block_groups, cut_rank, dense_groups, pad_rank
from graftlib.lowrank import scale as _scale
from graftlib.peft import (LORA_KINDS, PREFIX, _LORA_KEY, _empty, _exact_regex, _float_text, _graph_parameters,
                           _not_supported, _site_rank_alpha, _strip_prefix, peft_target_match)
from graftlib.select import SiteIndex
from graftlib.sites import Site, weight_value

from .dora import peft_export_magnitudes, peft_import_magnitudes
from . import lora_peft_options as options
from .lora_param import peft_import_params, peft_param_targets
from .tokens import peft_companion

if TYPE_CHECKING:
    from graftlib.protocols import GraftedModule, GraftRecord

__all__ = ["peft_check", "peft_import", "peft_export"]


def peft_check(config: Mapping[str, Any], source: str) -> None:
    """Refuse LoRA options that would load as a different model (before the model is traced)."""
    _check_lora_options(config, source)


def peft_import(config: dict[str, Any], state: Mapping[str, torch.Tensor], model: Any, *,
                grafted: "GraftedModule", source: str) -> tuple[str, dict, dict]:
    """The lora(...) spec, tensors per site key and the per-site PEFT (r, alpha) for a PEFT LoRA checkpoint.

    `state` holds the LoRA tensors (modules_to_save split off); `grafted` is the module loaded into (its
    base graph's sites are the candidates), `model` its base model (unused: the sites are the graph's).
    """
    return _lora_plan(grafted, SiteIndex.build(grafted.base_graph_module), config, state, source)


def peft_export(grafted: "GraftedModule", record: "GraftRecord") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's adapter_config dict and state dict for a lora(...) adapter."""
    return _export_lora(grafted, record)


_LORA_HANDLED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                 "auto_mapping", "peft_version", "r", "lora_alpha", "lora_dropout", "target_modules",
                 "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
                 "alpha_pattern", "modules_to_save", "use_rslora", "fan_in_fan_out", "bias",
                 "init_lora_weights", "megatron_core", "use_dora", "qalora_group_size", "runtime_config",
                 "loftq_config", "eva_config", "corda_config", "lora_ga_config"} | options.HANDLED


_SAFE_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")
#: why an option is refused (the README lists them)
_WHY = {
}


def _check_lora_options(config: Mapping[str, Any], source: str) -> None:
    init = config.get("init_lora_weights", True)
    if init not in _SAFE_INITS:
        raise _not_supported(source, f"init_lora_weights={init!r}",
                             "PEFT rewrites the base weights with it when loading")
    for key, value in config.items():
        if key in _LORA_HANDLED or _empty(value):
            continue
        raise _not_supported(source, f"{key}={value!r}", _WHY.get(key, ""))
    options.check_options(config, source)
    if config.get("bias", "none") != "none":
        raise _not_supported(source, f"bias={config['bias']!r}", "trained biases of the base model")
    if config.get("use_qalora"):
        raise _not_supported(source, "use_qalora=True")
    targets = config.get("target_modules")
    if targets is None and not config.get("target_parameters"):
        raise LoadError(f"{source}: target_modules is null; PEFT writes the resolved list when it saves "
                        "an adapter, so this config was not written by save_pretrained")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise _not_supported(source, "target_modules='all-linear' in a saved config",
                             "PEFT resolves it to module names when it creates the adapter")
    if float(config.get("lora_alpha", 8)) <= 0:
        raise _not_supported(source, f"lora_alpha={config.get('lora_alpha')}")


def _lora_plan(grafted: "GraftedModule", index: SiteIndex, config: dict[str, Any],
               state: Mapping[str, torch.Tensor], source: str) -> tuple[str, dict, dict]:
    """The lora(...) spec, tensors per site key and extras for a PEFT LoRA checkpoint."""
    _check_lora_options(config, source)
    state = dict(state)
    companion = peft_companion(config, state, grafted, source)  # trainable_token_indices: passes/tokens.py
    diagonals = options.kasa_diagonals(config, state)  # KaSA's lora_diag
    notes = options.training_notes(config)
    by_path: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in options.drop_training_state(config, state).items():
        rest = _strip_prefix(key) if key.startswith(PREFIX) else None
        match = _LORA_KEY.fullmatch(rest) if rest is not None else None
        if match is None:
            what = "not a LoRA tensor of this model"
            raise LoadError(f"{source}: unexpected tensor {key!r} ({what}); the checkpoint does not match "
                            "its config or this model")
        param = options.bias_name(match.group("param"))
        by_path.setdefault(match.group("path"), {})[param] = (key, tensor)
    sites = {s.path: s for s in index.sites if s.kind in LORA_KINDS and s.part is None}
    chosen = {p: s for p, s in sites.items() if peft_target_match(config, p)}
    model_name = grafted._traced.model_class
    raw = _parameter_targets(grafted, index, config, chosen, source)
    if raw:
        if companion is not None or diagonals:
            raise LoadError(f"{source}: not supported: target_parameters {raw} together with trainable_token_indices "
                            "or kasa_config")
        r, alpha = _one_rank(config, raw, source)
        return peft_import_params(config, raw, state, grafted, source, r, alpha)
    for path in sorted(set(by_path) - set(chosen)):
        key = next(iter(by_path[path].values()))[0]
        if path in sites:
            raise LoadError(f"{source}: tensor {key!r} is for {path}, which the config's target_modules "
                            "do not select; the checkpoint does not match its config")
        raise LoadError(f"{source}: tensor {key!r} is for module {path!r}, which {model_name} does not have "
                        f"(or never calls); was the adapter saved from another base model? Nearest: "
                        f"{near_names(path, sites)}")
    if not chosen:
        raise LoadError(f"{source}: target_modules {config.get('target_modules')!r} select no module of "
                        f"{model_name} that LoRA can adapt; was the adapter saved from another base model?")
    rslora = bool(config.get("use_rslora", False))
    entries = {}
    for path, site in chosen.items():
        r, alpha = _site_rank_alpha(config, path)
        a, b, bias = _site_tensors(site, by_path.get(path, {}), r, source, config)
        if config.get("kasa_config"):  # PEFT's truncated base and diagonal as one rank-2r LoRA
            weight = weight_value(grafted.base_graph_module, site.weight)
            r, alpha, a, b = options.kasa_fold(site, weight, diagonals.pop(path, None), r, alpha, rslora, a, b,
                                               source)
        entries[path] = (site, r, alpha, a, b, bias)
    if diagonals:
        raise LoadError(f"{source}: unexpected tensor {next(iter(diagonals.values()))[0]!r}: not a KaSA module of "
                        "the config's targets")

    magnitudes = peft_import_magnitudes(config, chosen, by_path, source)  # DoRA (passes/dora.py); {} without
    spec, tensors, extras = _lora_spec(entries, config, rslora)
    for path, magnitude in magnitudes.items():
        tensors[chosen[path].key]["lora_magnitude_vector"] = magnitude
    if notes:
        extras["notes"] = notes
    if companion is not None:
        extras["companions"] = [companion]
    flags = (", dora=true" if config.get("use_dora") else "") + (", bias=true" if config.get("lora_bias") else "")
    return spec[:-1] + flags + ")", tensors, extras


def _parameter_targets(grafted: "GraftedModule", index: SiteIndex, config: Mapping[str, Any],
                       chosen: dict[str, Site], source: str) -> list[str]:
    """PEFT's ``target_parameters``: a Linear's (out, in) weight joins `chosen` as that Linear's LoRA (W + s B A
    read by linear(x, W) is the branch's output exactly); the others (raw parameters), returned, load as one
    ``lora_param`` graft (passes/lora_param.py), which cannot share the adapter with module sites."""
    if not config.get("target_parameters"):
        return []
    kinds = _graph_parameters(grafted.graph_module)
    paths = peft_param_targets(config, [t for t, kind in kinds.items() if kind == "parameter"])
    if not paths:
        raise LoadError(f"{source}: target_parameters {config.get('target_parameters')!r} select no parameter of "
                        f"{grafted._traced.model_class}; was the adapter saved from another base model?")
    linear = {s.weight: s for s in index.sites if s.kind == "linear" and s.part is None}
    raw = []
    for path in paths:
        site = linear.get(path)
        if site is not None and site.path in chosen:
            raise LoadError(f"{source}: not supported: {site.path} in target_modules and its {path} in "
                            "target_parameters (PEFT nests two LoRAs there)")
        if site is not None:
            chosen[site.path] = site
        else:
            raw.append(path)
    if raw and chosen:
        raise LoadError(f"{source}: not supported: target_parameters {raw} (raw parameters, not a Linear's weight) "
                        f"together with LoRA on modules ({', '.join(sorted(chosen))}) in one adapter")
    return raw


def _one_rank(config: Mapping[str, Any], paths: list[str], source: str) -> tuple[int, float]:
    found = {_site_rank_alpha(config, p.rsplit(".", 1)[0]) for p in paths}
    if len(found) != 1:
        raise LoadError(f"{source}: not supported: rank_pattern / alpha_pattern giving target_parameters "
                        f"{paths} different ranks")
    if config.get("lora_dropout") or config.get("lora_bias") or config.get("use_dora"):
        raise LoadError(f"{source}: not supported: target_parameters with lora_dropout, lora_bias or use_dora "
                        "(PEFT refuses them too)")
    return found.pop()


def _site_tensors(site: Site, found: Mapping[str, tuple[str, torch.Tensor]], r: int,
                  source: str, config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validated (A, B, B's bias or None) in graftlib's layout for one site."""
    names = ("lora_embedding_A", "lora_embedding_B") if site.kind == "embedding" else ("lora_A", "lora_B")
    suffix = "" if site.kind == "embedding" else ".weight"
    if site.kind == "conv2d":
        conv = site.conv
        if tuple(conv["dilation"]) != (1, 1) and any(k > 1 for k in conv["kernel"]):
            raise LoadError(f"{source}: not supported: LoRA on the dilated convolution {site.path} (PEFT's "
                            "lora_A ignores dilation; its output does not line up with the base conv)")
        if r % conv["groups"]:
            raise LoadError(f"{source}: not supported: rank {r} on {site.path} with {conv['groups']} groups")
        a_shape = (r, site.in_features, *conv["kernel"])
        b_shape = (site.out_features, r // conv["groups"], 1, 1)
    elif site.kind == "embedding":
        a_shape, b_shape = (r, site.in_features), (site.out_features, r)
    else:
        a_shape, b_shape = (r, site.in_features), (site.out_features, r)
    tensors = []
    for name, shape in zip(names, (a_shape, b_shape)):
        key = f"{PREFIX}{site.path}.{name}{suffix}"
        if name not in found:
            raise LoadError(f"{source}: tensor {key!r} is missing (expected shape {shape}); the config targets "
                            f"{site.path} but the weights file has nothing for it")
        tensor = found[name][1]
        blocked, nblocks = options.bdlora_blocks(config, site.path)
        if blocked == name[-1] and site.kind in ("linear", "conv1d"):
            tensor = options.to_dense(tensor, nblocks, shape, key, source)
        elif blocked and site.kind not in ("linear", "conv1d"):
            raise LoadError(f"{source}: not supported: BD-LoRA on {site.path} ({site.kind}); PEFT's BD-LoRA is "
                            "for linear layers")
        if tuple(tensor.shape) != shape:
            raise LoadError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but {site.path} "
                            f"({site.kind} {site.in_features}->{site.out_features}, r={r}) needs {shape}; was "
                            "the adapter saved from another base model?")
        tensors.append(tensor)
    a, b = tensors
    if site.kind == "conv2d" and site.conv["groups"] > 1:
        grouped = block_groups(a, site.conv["groups"])
        if grouped is None:
            raise LoadError(f"{source}: not supported: LoRA on the grouped convolution {site.path} whose "
                            "lora_A mixes groups (graftlib's conv LoRA is one factorisation per group)")
        a = grouped
    return a, b, _site_bias(site, found, config, source)


def _site_bias(site: Site, found: Mapping[str, tuple[str, torch.Tensor]], config: Mapping[str, Any],
               source: str) -> torch.Tensor | None:
    """PEFT's ``lora_B.bias`` (out,) for a ``lora_bias=true`` config; refuses one where it does not belong."""
    key = f"{PREFIX}{site.path}.lora_B.bias"
    if not config.get("lora_bias"):
        if "lora_B_bias" in found:
            raise LoadError(f"{source}: unexpected tensor {key!r} (a LoRA bias) in a checkpoint whose config has "
                            "lora_bias=false; the checkpoint does not match its config")
        return None
    if "lora_B_bias" not in found:
        raise LoadError(f"{source}: tensor {key!r} is missing (expected shape ({site.out_features},)); the config "
                        "has lora_bias=true")
    bias = found["lora_B_bias"][1]
    if tuple(bias.shape) != (site.out_features,):
        raise LoadError(f"{source}: tensor {key!r} has shape {tuple(bias.shape)} but {site.path} needs "
                        f"({site.out_features},); was the adapter saved from another base model?")
    return bias


def _lora_spec(entries: dict[str, tuple], config: dict[str, Any], rslora: bool) -> tuple[str, dict, dict]:
    groups = {path: (e[0].conv["groups"] if e[0].kind == "conv2d" else 1) for path, e in entries.items()}
    ranks = {path: e[1] // groups[path] for path, e in entries.items()}       # graftlib r per group
    rank = max(ranks.values())
    scales = {path: _scale(e[1], e[2], rslora) for path, e in entries.items()}
    uniform = len({(e[1], e[2]) for e in entries.values()}) == 1 and all(g == 1 for g in groups.values())
    if uniform:
        alpha = next(iter(entries.values()))[2]
    else:
        common = Counter(scales.values()).most_common(1)[0][0]
        alpha = common * (math.sqrt(rank) if rslora else rank)
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    paths = sorted(entries)
    spec = (f're:"{_exact_regex(paths)}", r={rank}, alpha={_float_text(alpha)}, '
            f"dropout={_float_text(dropout)}, rslora={'true' if rslora else 'false'}")
    graft_scale = _scale(rank, float(_float_text(alpha)), rslora)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for path in paths:
        site, r, site_alpha, a, b, bias = entries[path]
        a, b = pad_rank(a, b, rank, groups[path])
        if scales[path] != graft_scale:
            b = b * (scales[path] / graft_scale)
            bias = None if bias is None else bias * (scales[path] / graft_scale)
        names = ("lora_embedding_A", "lora_embedding_B") if site.kind == "embedding" else ("lora_A", "lora_B")
        tensors[site.key] = {names[0]: a, names[1]: b, **({"lora_B_bias": bias} if bias is not None else {})}
    sites = {entries[p][0].key: [entries[p][1], entries[p][2]] for p in paths}   # PEFT's (r, alpha) per site
    return f"lora({spec})", tensors, {"sites": sites}


@dataclass
class _Out:
    """One module's LoRA in PEFT's layout."""

    site: Site
    r: int
    alpha: float
    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None = None    # B's bias (lora(bias=true), PEFT's lora_B.bias)


def _lora_scale(config: Mapping[str, Any]) -> float:
    alpha = float(config["r"]) if config.get("alpha") is None else float(config["alpha"])
    return _scale(int(config["r"]), alpha, bool(config.get("rslora")))


def _export_site(site: Site, params: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                 original: list | None) -> tuple[int, float, torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """(PEFT r, alpha, A, B, groups, B's bias) for one whole-module site; `original` is the imported (r, alpha)."""
    names = ("lora_embedding_A", "lora_embedding_B") if site.kind == "embedding" else ("lora_A", "lora_B")
    a, b = params[names[0]].detach(), params[names[1]].detach()
    bias = params["lora_B_bias"].detach() if "lora_B_bias" in params else None
    groups = site.conv["groups"] if site.kind == "conv2d" else 1
    rslora = bool(config.get("rslora"))
    scale = _lora_scale(config)
    if original is not None:
        r_peft, alpha_peft = int(original[0]), float(original[1])
        cut = cut_rank(a, b, r_peft // groups, groups)
        if cut is not None:
            a, b = cut
            site_scale = _scale(r_peft, alpha_peft, rslora)
            if site_scale != scale:
                b = b * (scale / site_scale)
                bias = None if bias is None else bias * (scale / site_scale)
            return r_peft, alpha_peft, a, b, groups, bias
    r_peft = b.shape[1] * groups
    alpha = float(config["alpha"]) if config.get("alpha") is not None and r_peft == config["r"] else \
        scale * (math.sqrt(r_peft) if rslora else r_peft)
    return r_peft, alpha, a, b, groups, bias


def _fuse_parts(entries: list[tuple[Site, Mapping[str, torch.Tensor]]], config: Mapping[str, Any],
                whole: Site) -> tuple[int, float, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Slices of a fused projection (c_attn[q], c_attn[v], ...) as one LoRA on the whole module.

    A = cat(A_i) (sum r_i, in); B (out, sum r_i) holds B_i in its slice's rows and its own columns, so
    s * B A equals the sum of the slices' deltas, each in its rows.
    """
    a_list, blocks, start = [], [], 0
    for site, params in entries:
        a, b = params["lora_A"].detach(), params["lora_B"].detach()
        a_list.append(a)
        blocks.append((site.span or (0, whole.out_features), start, b, params.get("lora_B_bias")))
        start += a.shape[0]
    b_full = a_list[0].new_zeros(whole.out_features, start)
    bias_full = a_list[0].new_zeros(whole.out_features) if config.get("bias") else None
    for (lo, hi), col, b, bias in blocks:
        b_full[lo:hi, col:col + b.shape[1]] = b
        if bias_full is not None and bias is not None:
            bias_full[lo:hi] = bias.detach()
    rslora = bool(config.get("rslora"))
    alpha = _lora_scale(config) * (math.sqrt(start) if rslora else start)
    return start, alpha, torch.cat(a_list), b_full, bias_full


def _lora_outputs(grafted: "GraftedModule", record: "GraftRecord", index: SiteIndex) -> list[_Out]:
    tensors = grafted.store.tensors(record.adapter)
    originals = ((record.extras.get("peft") or {}).get("sites")) or {}
    by_path: dict[str, list[tuple[Site, Mapping[str, torch.Tensor]]]] = {}
    for key in record.sites:
        site = index.by_key(key)
        by_path.setdefault(site.path, []).append((site, tensors[key]))
    outputs = []
    for path, entries in by_path.items():
        site = entries[0][0]
        if site.kind == "conv2d":
            conv = site.conv
            if tuple(conv["dilation"]) != (1, 1) and any(k > 1 for k in conv["kernel"]):
                raise GraftError(f"not supported: saving LoRA on the dilated convolution {path} in PEFT's "
                                 "format (PEFT's conv LoRA ignores dilation, so it would compute another model)")
        if len(entries) == 1 and site.part is None:
            r, alpha, a, b, groups, bias = _export_site(site, entries[0][1], record.config, originals.get(site.key))
            outputs.append(_Out(site, r, alpha, dense_groups(a, groups), b, bias))
            continue
        whole = next((s for s in index.sites if s.key == path), None)
        if whole is None:
            raise GraftError(f"cannot save {path} in PEFT's format: its fused projection is not a site")
        r, alpha, a, b, bias = _fuse_parts(entries, record.config, whole)
        outputs.append(_Out(whole, r, alpha, a, b, bias))
    return outputs


def _known_paths(grafted: "GraftedModule") -> set[str]:
    paths = {t.rsplit(".", 1)[0] for t in _graph_parameters(grafted.graph_module) if "." in t}
    model = grafted._model
    if model is not None:
        paths |= {name for name, _ in model.named_modules() if name}
    return paths


def _target_modules(grafted: "GraftedModule", paths: list[str]) -> list[str] | str:
    """Exact full paths as a list when no other module ends with one of them, else one exact regex."""
    known = _known_paths(grafted)
    clash = any(other != p and other.endswith("." + p) for p in paths for other in known)
    return f"(?:{_exact_regex(paths)})" if clash else sorted(paths)


def _lora_config(grafted: "GraftedModule", record: "GraftRecord", outputs: list[_Out],
                 index: SiteIndex) -> dict[str, Any]:
    original = (record.extras.get("peft") or {}).get("config")
    rslora = bool(record.config.get("rslora"))
    paths = sorted(o.site.path for o in outputs)
    if original is not None:
        same_sites = sorted(p for p in paths if peft_target_match(original, p)) == paths and all(
            not peft_target_match(original, s.path) or s.path in paths
            for s in index.sites if s.kind in LORA_KINDS and not s.part)
        same_ranks = all(_site_rank_alpha(original, o.site.path) == (o.r, o.alpha) for o in outputs)
        if same_sites and same_ranks and bool(original.get("use_rslora")) == rslora and \
                bool(original.get("use_dora")) == bool(record.config.get("dora")) and \
                bool(original.get("lora_bias")) == bool(record.config.get("bias")):
            return dict(original)
    r = Counter(o.r for o in outputs).most_common(1)[0][0]
    alpha = Counter(o.alpha for o in outputs if o.r == r).most_common(1)[0][0]
    rank_pattern = {re.escape(o.site.path): o.r for o in outputs if o.r != r}
    alpha_pattern = {re.escape(o.site.path): o.alpha for o in outputs if o.alpha != alpha}
    name_or_path = getattr(grafted._traced.config, "_name_or_path", None) or None
    base = {k: v for k, v in (original or {}).items()
            if k in ("task_type", "base_model_name_or_path", "revision", "auto_mapping")}
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": name_or_path, "revision": None,
        **base, "inference_mode": True, "r": r, "lora_alpha": alpha,
        "target_modules": _target_modules(grafted, paths), "exclude_modules": None,
        "lora_dropout": float(record.config.get("dropout") or 0.0),
        "fan_in_fan_out": any(o.site.kind == "conv1d" for o in outputs), "bias": "none",
        "use_rslora": rslora, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "use_dora": bool(record.config.get("dora")),
        "lora_bias": bool(record.config.get("bias")),
    }


def _export_lora(grafted: "GraftedModule", record: "GraftRecord") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    index = SiteIndex.build(grafted.base_graph_module)
    outputs = _lora_outputs(grafted, record, index)
    state: dict[str, torch.Tensor] = {}
    for out in outputs:
        if out.site.kind == "embedding":
            names = ("lora_embedding_A", "lora_embedding_B")
        else:
            names = ("lora_A.weight", "lora_B.weight")
        state[f"{PREFIX}{out.site.path}.{names[0]}"] = out.a
        state[f"{PREFIX}{out.site.path}.{names[1]}"] = out.b
        if out.bias is not None:
            state[f"{PREFIX}{out.site.path}.lora_B.bias"] = out.bias
    if record.config.get("dora"):
        state.update(peft_export_magnitudes(grafted, record, index, PREFIX))  # passes/dora.py
    original = (record.extras.get("peft") or {}).get("config") or {}
    if original.get("kasa_config"):  # back to rank r + lora_diag (passes/lora_peft_options.py)
        weights = {o.site.path: weight_value(grafted.base_graph_module, o.site.weight) for o in outputs}
        state.update(options.kasa_outputs(original, outputs, weights, _site_rank_alpha, PREFIX))
        for out in outputs:
            state[f"{PREFIX}{out.site.path}.lora_A.weight"] = out.a
            state[f"{PREFIX}{out.site.path}.lora_B.weight"] = out.b
    config = _lora_config(grafted, record, outputs, index)
    if original.get("kasa_config") and not config.get("kasa_config"):
        config = {**config, "kasa_config": original["kasa_config"]}
    if config.get("use_bdlora") and not _bdlora_state(config, outputs, state):
        config = {**config, "use_bdlora": None}  # a factor left block-diagonal form: plain LoRA, same outputs
    return config, state


def _bdlora_state(config: Mapping[str, Any], outputs: list[_Out], state: dict[str, torch.Tensor]) -> bool:
    """BD-LoRA's block layout in `state` for the factors `config` marks; False (state untouched) when one is
    no longer block-diagonal."""
    blocked = {}
    for out in outputs:
        which, nblocks = options.bdlora_blocks(config, out.site.path)
        if which is None:
            continue
        blocks = options.to_blocks(out.a if which == "A" else out.b, nblocks)
        if blocks is None:
            return False
        blocked[f"{PREFIX}{out.site.path}.lora_{which}.weight"] = blocks
    state.update(blocked)
    return True
