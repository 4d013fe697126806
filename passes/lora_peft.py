"""LoRA in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors`` <-> ``lora(...)``.

    PEFT LoRA on module M   base_model.model.M.lora_A.weight (r, in), .lora_B.weight (out, r)
                            (nn.Conv1d/2d/3d (r, in, *k) / (out, r/groups, 1, ...); embeddings lora_embedding_A
                            (r, vocab) and lora_embedding_B (dim, r))
        ->  lora(re:"M|...", r=R, alpha=a, rslora=..., dropout=p)
    PEFT LoRA on nn.MultiheadAttention M   M.lora_A/B (in_proj: (r, E), (3E, r)) and
                            M.base_layer.out_proj.lora_A/B  ->  the sites M (in_proj) and M.out_proj

A grouped conv whose ``lora_A`` mixes groups (PEFT's own init always does) loads in PEFT's dense layout,
``conv_groups=dense`` (not mergeable, see passes/lora.py); one whose A is block-diagonal loads in the block
layout, which merges. PEFT applies an nn.MultiheadAttention's LoRA by merging it into ``in_proj_weight``
and ``out_proj.weight`` for the call; graftlib's branch on both projections is the same function (to float
rounding), with one exception kept on purpose: PEFT (0.21.2 and its main branch at 5d602fd) adds the
out_proj delta twice in that merge (``W + 2·s·B A``; huggingface/peft PR #3774, open), in its forward and
in ``merge_and_unload``, so a PEFT-trained MHA adapter *is* that model. ``from_peft`` loads the out_proj's
B doubled (exact) and ``save_peft`` writes it halved, so both directions compute what PEFT computes;
checkpoints from a PEFT version after 0.21.2 are refused until it is known whether the fix landed there.
The in-projection is a site both when it is one ``linear`` (batched self-attention) and when the model
cuts ``in_proj_weight`` into q, k, v rows first (unbatched or cross-attention: a ``packed`` site,
graftlib/packed.py).

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
    base graph's sites are the candidates), `model` its base model (its module types name what a
    refusal is about).
    """
    return _lora_plan(grafted, SiteIndex.build(grafted.base_graph_module), config, state, source, model)


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
               state: Mapping[str, torch.Tensor], source: str, model: Any = None) -> tuple[str, dict, dict]:
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
    modules = _named_modules(grafted, model)
    chosen = _with_attention(chosen, sites, by_path, modules, config, source)   # nn.MultiheadAttention
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
        raise _unknown_module(source, key, path, modules, sites, model_name)
    if not chosen:
        raise LoadError(f"{source}: target_modules {config.get('target_modules')!r} select no module of "
                        f"{model_name} that LoRA can adapt; was the adapter saved from another base model?")
    rslora = bool(config.get("use_rslora", False))
    entries = {}
    for path, site in chosen.items():
        r, alpha = _site_rank_alpha(config, _attention_owner(path, modules) or path)
        a, b, bias = _site_tensors(site, by_path.get(path, {}), r, source, config)
        if config.get("kasa_config"):  # PEFT's truncated base and diagonal as one rank-2r LoRA
            weight = weight_value(grafted.base_graph_module, site.weight)
            r, alpha, a, b = options.kasa_fold(site, weight, diagonals.pop(path, None), r, alpha, rslora, a, b,
                                               source)
        entries[path] = (site, r, alpha, a, b, bias)
    if diagonals:
        raise LoadError(f"{source}: unexpected tensor {next(iter(diagonals.values()))[0]!r}: not a KaSA module of "
                        "the config's targets")

    # grouped convs: the block layout when every lora_A is block-diagonal (it merges), else PEFT's dense one
    dense = bool(config.get("use_dora")) or any(
        block_groups(e[3], e[0].conv["groups"]) is None for e in entries.values() if _grouped(e[0]))
    dense = dense and any(_grouped(e[0]) for e in entries.values())
    if not dense:
        entries = {p: (e[0], e[1], e[2], block_groups(e[3], e[0].conv["groups"]) if _grouped(e[0]) else e[3], *e[4:])
                   for p, e in entries.items()}
    magnitudes = peft_import_magnitudes(config, chosen, by_path, source)  # DoRA (passes/dora.py); {} without
    spec, tensors, extras = _lora_spec(entries, config, rslora, dense)
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


def _grouped(site: Site) -> bool:
    return site.kind == "conv" and site.conv["groups"] > 1


_HANDLED_LAYERS = ("Linear, transformers Conv1D, nn.Conv1d / Conv2d / Conv3d, Embedding and "
                   "nn.MultiheadAttention (self-attention calls)")


def _named_modules(grafted: "GraftedModule", model: Any) -> dict[str, Any]:
    model = model if isinstance(model, torch.nn.Module) else grafted._model
    return dict(model.named_modules()) if isinstance(model, torch.nn.Module) else {}


def _attention_owner(path: str, modules: Mapping[str, Any]) -> str | None:
    """The nn.MultiheadAttention `path` belongs to as PEFT targets it (itself, or its out_proj), else None."""
    owner = path[:-len(".out_proj")] if path.endswith(".out_proj") else path
    return owner if isinstance(modules.get(owner), torch.nn.MultiheadAttention) else None


def _with_attention(chosen: dict[str, Site], sites: Mapping[str, Site], by_path: dict, modules: Mapping[str, Any],
                    config: Mapping[str, Any], source: str) -> dict[str, Site]:
    """PEFT's LoRA on an nn.MultiheadAttention M is two graftlib sites: M (the packed in_proj) and M.out_proj,
    whose tensors PEFT keys ``M.base_layer.out_proj.*``; `by_path` is re-keyed to the site paths."""
    chosen = dict(chosen)
    for path, module in modules.items():
        if not isinstance(module, torch.nn.MultiheadAttention):
            continue
        out = f"{path}.out_proj"
        if out in chosen and not peft_target_match(config, path):
            raise LoadError(f"{source}: not supported: PEFT LoRA on {out}, the out_proj of the nn.MultiheadAttention "
                            f"{path!r}, targeted alone: PEFT never calls it there, so PEFT's model ignores that LoRA; "
                            f"target {path!r} itself")
        if not peft_target_match(config, path):
            continue
        if path not in sites or out not in sites:
            raise LoadError(f"{source}: not supported: LoRA on the nn.MultiheadAttention {path!r} as the model calls "
                            "it (graftlib finds its packed in-projection only in self-attention calls, query is key "
                            "is value, and its out_proj as a linear)")
        if not module._qkv_same_embed_dim:
            raise LoadError(f"{source}: not supported: LoRA on the nn.MultiheadAttention {path!r} with separate "
                            "q/k/v weights (PEFT has no LoRA there either)")
        chosen[path], chosen[out] = sites[path], sites[out]
        stored = f"{path}.base_layer.out_proj"
        if stored in by_path:
            by_path[out] = by_path.pop(stored)
            if "lora_B" in by_path[out]:
                key, b = by_path[out]["lora_B"]
                by_path[out]["lora_B"] = (key, b * _out_proj_factor(config, source))
    return chosen


#: PEFT versions known to add an nn.MultiheadAttention's out_proj LoRA twice (huggingface/peft PR #3774)
_OUT_PROJ_TWICE_THROUGH = (0, 21, 2)


def _out_proj_factor(config: Mapping[str, Any], source: str) -> float:
    """2.0: PEFT up to 0.21.2 computes ``W + 2·s·B A`` on an MHA's out_proj (see the module docstring)."""
    text = str(config.get("peft_version") or "0.21.2")
    numbers = tuple(int(n) for n in re.findall(r"\d+", text)[:3])
    if numbers > _OUT_PROJ_TWICE_THROUGH:
        raise LoadError(f"{source}: not supported: LoRA on nn.MultiheadAttention saved by PEFT {text}: PEFT through "
                        "0.21.2 applies the out_proj delta twice (huggingface/peft PR #3774) and graftlib does not "
                        "know whether this version still does")
    return 2.0


def _unknown_module(source: str, key: str, path: str, modules: Mapping[str, Any], sites: Mapping[str, Site],
                    model_name: str) -> LoadError:
    """A tensor for a module graftlib has no site for: a layer type it does not handle, a module the traced
    forward never calls, or (only when the model has no such module) an adapter from another model."""
    module = modules.get(path)
    if module is not None:
        kind = type(module).__name__
        if any(p == path or p.startswith(path + ".") for p in sites) or isinstance(module, _HANDLED_TYPES):
            return LoadError(f"{source}: tensor {key!r} is for the {kind} {path!r}, which {model_name}'s traced "
                             "forward never calls (with these example inputs); graftlib adapts what the graph "
                             "computes")
        return LoadError(f"{source}: not supported: LoRA on the {kind} module {path!r} (graftlib's LoRA loads "
                         f"PEFT checkpoints on {_HANDLED_LAYERS})")
    return LoadError(f"{source}: tensor {key!r} is for module {path!r}, which {model_name} does not have; was the "
                     f"adapter saved from another base model? Nearest: {near_names(path, sites)}")


_HANDLED_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)


def _site_tensors(site: Site, found: Mapping[str, tuple[str, torch.Tensor]], r: int,
                  source: str, config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validated (A, B, B's bias or None) in graftlib's layout for one site."""
    names = ("lora_embedding_A", "lora_embedding_B") if site.kind == "embedding" else ("lora_A", "lora_B")
    suffix = "" if site.kind == "embedding" else ".weight"
    if site.kind == "conv":
        conv = site.conv
        if any(d != 1 for d in conv["dilation"]) and any(k > 1 for k in conv["kernel"]):
            raise LoadError(f"{source}: not supported: LoRA on the dilated convolution {site.path} (PEFT's "
                            "lora_A ignores dilation; its output does not line up with the base conv)")
        if r % conv["groups"]:
            raise LoadError(f"{source}: not supported: rank {r} on {site.path} with {conv['groups']} groups")
        a_shape = (r, site.in_features, *conv["kernel"])
        b_shape = (site.out_features, r // conv["groups"], *[1] * len(conv["kernel"]))
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


def _lora_spec(entries: dict[str, tuple], config: dict[str, Any], rslora: bool,
               dense: bool = False) -> tuple[str, dict, dict]:
    """`dense`: grouped convs in PEFT's layout (graft r = PEFT's total r), else r per group."""
    groups = {path: (e[0].conv["groups"] if e[0].kind == "conv" else 1) for path, e in entries.items()}
    ranks = {path: e[1] if dense else e[1] // groups[path] for path, e in entries.items()}   # graftlib r
    rank = max(ranks.values())
    if dense and any(rank % g for g in groups.values()):
        raise LoadError(f"not supported: PEFT ranks {sorted({e[1] for e in entries.values()})} with grouped convs "
                        "of mixed group counts in one adapter (graftlib stores one rank per adapter)")
    scales = {path: _scale(e[1], e[2], rslora) for path, e in entries.items()}
    uniform = len({(e[1], e[2]) for e in entries.values()}) == 1 and \
        (dense or all(g == 1 for g in groups.values()))
    if uniform:
        alpha = next(iter(entries.values()))[2]
    else:
        common = Counter(scales.values()).most_common(1)[0][0]
        alpha = common * (math.sqrt(rank) if rslora else rank)
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    paths = sorted(entries)
    spec = (f're:"{_exact_regex(paths)}", r={rank}, alpha={_float_text(alpha)}, '
            f"dropout={_float_text(dropout)}, rslora={'true' if rslora else 'false'}"
            f"{', conv_groups=dense' if dense else ''}")
    graft_scale = _scale(rank, float(_float_text(alpha)), rslora)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for path in paths:
        site, r, site_alpha, a, b, bias = entries[path]
        a, b = pad_rank(a, b, rank // groups[path] if dense else rank, groups[path])
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
    target: str = ""        # the module PEFT targets (an nn.MultiheadAttention for its out_proj)
    stored: str = ""        # the module path of PEFT's keys (``M.base_layer.out_proj`` for that out_proj)

    def __post_init__(self) -> None:
        self.target = self.target or self.site.path
        self.stored = self.stored or self.site.path


def _lora_scale(config: Mapping[str, Any]) -> float:
    alpha = float(config["r"]) if config.get("alpha") is None else float(config["alpha"])
    return _scale(int(config["r"]), alpha, bool(config.get("rslora")))


def _export_site(site: Site, params: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                 original: list | None) -> tuple[int, float, torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """(PEFT r, alpha, A, B, groups, B's bias) for one whole-module site; `original` is the imported (r, alpha)."""
    names = ("lora_embedding_A", "lora_embedding_B") if site.kind == "embedding" else ("lora_A", "lora_B")
    a, b = params[names[0]].detach(), params[names[1]].detach()
    bias = params["lora_B_bias"].detach() if "lora_B_bias" in params else None
    groups = site.conv["groups"] if site.kind == "conv" else 1
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
        if site.kind == "conv":
            conv = site.conv
            if any(d != 1 for d in conv["dilation"]) and any(k > 1 for k in conv["kernel"]):
                raise GraftError(f"not supported: saving LoRA on the dilated convolution {path} in PEFT's "
                                 "format (PEFT's conv LoRA ignores dilation, so it would compute another model)")
        if len(entries) == 1 and site.part is None:
            r, alpha, a, b, groups, bias = _export_site(site, entries[0][1], record.config, originals.get(site.key))
            dense = a.shape[1] == site.in_features if site.kind == "conv" else False
            outputs.append(_Out(site, r, alpha, a if dense else dense_groups(a, groups), b, bias))
            continue
        whole = next((s for s in index.sites if s.key == path), None)
        if whole is None:
            raise GraftError(f"cannot save {path} in PEFT's format: its fused projection is not a site")
        r, alpha, a, b, bias = _fuse_parts(entries, record.config, whole)
        outputs.append(_Out(whole, r, alpha, a, b, bias))
    return _attention_outputs(grafted, outputs, index, record.config)


def _attention_outputs(grafted: "GraftedModule", outputs: list[_Out], index: SiteIndex,
                       config: Mapping[str, Any]) -> list[_Out]:
    """An nn.MultiheadAttention's two sites as PEFT's one LoRA on the module: its out_proj keyed
    ``M.base_layer.out_proj``, both at one rank and alpha (the missing one, or the lower rank, zero-padded)."""
    modules = _named_modules(grafted, None)
    by_path = {o.site.path: o for o in outputs}
    rslora = bool(config.get("rslora"))
    for path, module in modules.items():
        if not isinstance(module, torch.nn.MultiheadAttention):
            continue
        out_path = f"{path}.out_proj"
        if path not in by_path and out_path not in by_path:
            continue
        pair = []
        for site_path in (path, out_path):
            site = next((s for s in index.sites if s.key == site_path), None)
            if site is None:
                raise GraftError(f"cannot save LoRA on the nn.MultiheadAttention {path!r} in PEFT's format: "
                                 f"{site_path} is not a site of the graph")
            pair.append(by_path.get(site_path))
        present = [o for o in pair if o is not None]
        if any(o.bias is not None for o in present):
            raise GraftError(f"cannot save LoRA with bias=true on the nn.MultiheadAttention {path!r} in PEFT's format "
                             "(PEFT merges the module's LoRA into its weights only)")
        scale = _scale(present[0].r, present[0].alpha, rslora)
        if any(abs(_scale(o.r, o.alpha, rslora) - scale) > 1e-12 * abs(scale) for o in present):
            raise GraftError(f"cannot save LoRA on the nn.MultiheadAttention {path!r} in PEFT's format: its in_proj "
                             "and out_proj have different scales, and PEFT gives the module one")
        rank = max(o.r for o in present)
        alpha = scale * (math.sqrt(rank) if rslora else rank)
        for i, site_path in enumerate((path, out_path)):
            site = index.by_key(site_path)
            old = pair[i]
            a = old.a if old is not None else torch.zeros(0, site.in_features)
            b = old.b if old is not None else torch.zeros(site.out_features, 0)
            a, b = pad_rank(a, b, rank)
            if i == 1:
                b = b / 2.0   # PEFT (through 0.21.2) adds the out_proj delta twice: see the module docstring
            stored = path if i == 0 else f"{path}.base_layer.out_proj"
            by_path[site_path] = _Out(site, rank, alpha, a, b, target=path, stored=stored)
    return list(by_path.values())


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
    paths = sorted({o.target for o in outputs})
    if original is not None:
        same_sites = sorted(p for p in paths if peft_target_match(original, p)) == paths and all(
            not peft_target_match(original, s.path) or s.path in paths
            for s in index.sites if s.kind in LORA_KINDS and not s.part)
        same_ranks = all(_site_rank_alpha(original, o.target) == (o.r, o.alpha) for o in outputs)
        if same_sites and same_ranks and bool(original.get("use_rslora")) == rslora and \
                bool(original.get("use_dora")) == bool(record.config.get("dora")) and \
                bool(original.get("lora_bias")) == bool(record.config.get("bias")):
            return dict(original)
    r = Counter(o.r for o in outputs).most_common(1)[0][0]
    alpha = Counter(o.alpha for o in outputs if o.r == r).most_common(1)[0][0]
    rank_pattern = {re.escape(o.target): o.r for o in outputs if o.r != r}
    alpha_pattern = {re.escape(o.target): o.alpha for o in outputs if o.alpha != alpha}
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
        state[f"{PREFIX}{out.stored}.{names[0]}"] = out.a
        state[f"{PREFIX}{out.stored}.{names[1]}"] = out.b
        if out.bias is not None:
            state[f"{PREFIX}{out.stored}.lora_B.bias"] = out.bias
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
