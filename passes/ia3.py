"""IA3: learned vectors that rescale a projection's output (keys, values) or its input (feed-forward).

    linear(x, W, b)             ->  mul(linear(x, W, b), view(l, [-1]))      l (out, 1)     k, v, o, ...
    linear(x, W, b)  (ffn)      ->  linear(mul(x, l), W, b)                  l (1, in)      feedforward
    addmm(b, x, W)   (Conv1D)   ->  the same with W stored (in, out)
    convNd(x, W, ...)           ->  mul(convNd(x, W, ...), l)                l (1, out, 1, ...)  N = 1, 2, 3
    convNd(x, W, ...) (ffn)     ->  convNd(mul(x, l), W, ...)                l (1, in, 1, ...)

PEFT's ``(IA)^3`` semantics: a target is *feedforward* when PEFT's ``feedforward_modules`` names it; here
``feedforward=auto`` (the default) makes the FFN roles (up, down, gate) feedforward, as PEFT's default
tables do (``ia3(k,v,down)`` is PEFT's BERT / Llama default); ``feedforward=none`` makes none, and any
other text is a regex fully matched against module paths (what ``from_peft`` writes). Output scaling
multiplies the bias too. ``l`` starts at ones (PEFT's ``init_ia3_weights``), so the graft is the base
model exactly. A slice of a fused projection (``c_attn[k]``) scales its own output columns.

Merge: ``W *= l`` (rows for output scaling, with ``b *= l``; columns for input scaling; Conv1D stores W
transposed; grouped convs repeat the input vector per group, as PEFT).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from graftlib.conv import CONV_MODULES, channel_shape
from graftlib.editor import Editor
from graftlib.errors import GraftError, LoadError
from graftlib.registry import Method, Option, register
from graftlib.sites import Site
from graftlib.spec import GraftCall

__all__ = ["IA3", "is_feedforward", "peft_import", "peft_export"]

aten = torch.ops.aten
FFN_ROLES = ("up", "down", "gate")
PREFIX = "base_model.model."


def is_feedforward(site: Site, config: dict[str, Any]) -> bool:
    rule = config["feedforward"]
    if rule == "auto":
        return site.role in FFN_ROLES
    if rule == "none":
        return False
    return re.fullmatch(rule, site.path) is not None


def _shape(site: Site, feedforward: bool) -> tuple[int, ...]:
    """PEFT's ia3_l shape (stored as is, so checkpoints map one to one)."""
    n = site.in_features if feedforward else site.out_features
    if site.kind == "conv":
        return tuple(channel_shape(site, n))
    return (1, n) if feedforward else (n, 1)


@register
class IA3(Method):
    name = "ia3"
    site_kinds = ("linear", "conv1d", "conv")
    mergeable = True
    options = {
        "feedforward": Option("auto", (str,), help="auto (FFN roles), none, or a regex of module paths "
                                                   "whose input is scaled"),
    }

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        if config["feedforward"] not in ("auto", "none"):
            try:
                re.compile(config["feedforward"])
            except re.error as exc:
                raise call.option_error("feedforward", f"feedforward={config['feedforward']!r} is not a regex "
                                                       f"({exc}); use auto, none or a module-path regex")

    def check_site(self, call: GraftCall, site: Site, config: dict[str, Any]) -> None:
        if site.part is not None and is_feedforward(site, config):
            raise call.error(f"cannot graft ia3 on {site.key} as feedforward: its input is shared by the whole "
                             "fused projection; target the projection itself")

    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        feedforward = is_feedforward(site, config)
        anchor = editor.anchor
        if feedforward:
            position = 1 if site.kind == "conv1d" else 0
            x = anchor.args[position]
            with editor.before(anchor):
                scale = editor.param("ia3_l", lambda: torch.ones(_shape(site, True)))
                if len(x.users) > 1:  # x feeds other ops too: give the anchor its own alias to rescale
                    alias = editor.call(aten.alias.default, x)
                    anchor.replace_input_with(x, alias)
                    x = alias
                editor.join(x, aten.mul.Tensor, x, scale)                      # (..., in) * (1, in)
            return
        scale = editor.param("ia3_l", lambda: torch.ones(_shape(site, False)))
        if site.kind != "conv":
            scale = editor.call(aten.view.default, scale, [-1])                  # (out,)
        base = editor.value_at(anchor, same_shape=True)
        editor.join(base, aten.mul.Tensor, base, scale)

    def merge_deltas(self, site: Site, params: dict[str, torch.Tensor], config: dict[str, Any],
                     weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = params["ia3_l"].detach()
        feedforward = is_feedforward(site, config)
        factor = _weight_factor(site, scale, feedforward)
        bias_delta = None
        if not feedforward and bias is not None:
            bias_delta = bias * (scale.reshape(-1) - 1)
        return weight * (factor - 1), bias_delta


def _weight_factor(site: Site, scale: torch.Tensor, feedforward: bool) -> torch.Tensor:
    """``l`` shaped to multiply the stored weight (PEFT's ``transpose`` / ``_get_ia3_scaling_for_weight``)."""
    if site.kind == "conv":
        if not feedforward:
            return scale.transpose(0, 1)                                          # (out, 1, 1, 1)
        groups = site.conv["groups"]
        if groups == 1:
            return scale                                                          # (1, in, 1, 1)
        per_in, per_out = site.in_features // groups, site.out_features // groups
        ones = scale.shape[2:]
        expanded = scale.reshape(groups, 1, per_in, *ones).expand(groups, per_out, per_in, *ones)
        return expanded.reshape(site.out_features, per_in, *ones)
    return scale.T if site.kind == "conv1d" else scale


# -- PEFT checkpoints ----------------------------------------------------------------------------
_HANDLED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "peft_version", "target_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights",
            "exclude_modules", "modules_to_save"}


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *CONV_MODULES)) or type(module).__name__ == "Conv1D"


def _peft_feedforward(config: dict[str, Any], path: str) -> bool:
    rule = config.get("feedforward_modules") or []
    if isinstance(rule, str):
        return re.fullmatch(rule, path) is not None
    return any(path.endswith(name) for name in rule)


def peft_import(config: dict[str, Any], state: dict[str, torch.Tensor],
                model: nn.Module) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """A PEFT IA3 checkpoint as ``ia3(re:"...", feedforward="...")`` plus ``{site key: {"ia3_l": l}}``."""
    from graftlib.peft import _exact_regex, peft_target_match

    for key, value in config.items():
        if key not in _HANDLED and value not in (None, False, {}, [], ""):
            raise LoadError(f"IA3 checkpoint: not supported: {key}={value!r}; graftlib refuses rather than "
                            "load a different model")
    modules = {name: module for name, module in model.named_modules() if name and _adaptable(module)}
    chosen = sorted(path for path in modules if peft_target_match(config, path))
    named = dict(model.named_modules())
    for key in state:
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.ia3_l", key)
        other = named.get(match.group(1)) if match is not None else None
        if other is not None and not _adaptable(other):
            raise LoadError(f"IA3 checkpoint: not supported: IA3 on the {type(other).__name__} module "
                            f"{match.group(1)!r} (graftlib's IA3 handles Linear, Conv1D and nn.Conv1d/2d/3d)")
    if not chosen:
        raise LoadError(f"IA3 checkpoint: target_modules {config.get('target_modules')!r} select no linear or "
                        f"conv module of {type(model).__name__}; was it saved from another base model?")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.ia3_l", key)
        if match is None or match.group(1) not in chosen:
            raise LoadError(f"IA3 checkpoint: unexpected tensor {key!r}; the checkpoint does not match its config "
                            "or this model")
        tensors[match.group(1)] = {"ia3_l": tensor}
    missing = [p for p in chosen if p not in tensors]
    if missing:
        raise LoadError(f"IA3 checkpoint: tensor {PREFIX}{missing[0]}.ia3_l is missing; the config targets it")
    feedforward = [p for p in chosen if _peft_feedforward(config, p)]
    rule = f'"{_exact_regex(feedforward)}"' if feedforward else "none"
    return f'ia3(re:"{_exact_regex(chosen)}", feedforward={rule})', _as_graft_shapes(tensors, config, modules)


def _as_graft_shapes(tensors: dict[str, dict[str, torch.Tensor]], config: dict[str, Any],
                     modules: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Check each ia3_l against its module (PEFT's shapes are graftlib's)."""
    for path, params in tensors.items():
        module = modules[path]
        ff = _peft_feedforward(config, path)
        if isinstance(module, CONV_MODULES):
            n = module.in_channels if ff else module.out_channels
            want: tuple[int, ...] = (1, n) + (1,) * (module.weight.dim() - 2)
        else:
            weight = module.weight
            din, dout = (weight.shape[0], weight.shape[1]) if type(module).__name__ == "Conv1D" else \
                (weight.shape[1], weight.shape[0])
            want = (1, din) if ff else (dout, 1)
        if tuple(params["ia3_l"].shape) != want:
            raise LoadError(f"IA3 checkpoint: tensor {PREFIX}{path}.ia3_l has shape {tuple(params['ia3_l'].shape)} "
                            f"but {path} needs {want}; was it saved from another base model?")
    return tensors


def peft_export(grafted: Any, record: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One IA3 adapter as PEFT's adapter_config dict and tensors."""
    from graftlib.passes.lora_peft import _target_modules
    from graftlib.select import SiteIndex

    index = SiteIndex.build(grafted.base_graph_module)
    tensors = grafted.store.tensors(record.adapter)
    state, paths, feedforward, kinds = {}, [], [], set()
    for key in record.sites:
        site = index.by_key(key)
        if site.part is not None:
            raise GraftError(f"adapter {record.adapter!r} scales {key}, a slice of a fused projection, which PEFT's "
                             "IA3 cannot represent; save it with graftlib's own g.save")
        state[f"{PREFIX}{site.path}.ia3_l"] = tensors[key]["ia3_l"].detach()
        paths.append(site.path)
        kinds.add(site.kind)
        if is_feedforward(site, record.config):
            feedforward.append(site.path)
    targets = _target_modules(grafted, paths)
    ff_rule: list[str] | str = _target_modules(grafted, feedforward) if feedforward else []
    if isinstance(ff_rule, list) and isinstance(targets, str):
        ff_rule = sorted(feedforward)
    if isinstance(ff_rule, list) and any(o.endswith(f) and o != f for f in ff_rule for o in paths):
        from graftlib.peft import _exact_regex

        ff_rule = f"(?:{_exact_regex(feedforward)})"  # PEFT matches list entries as suffixes
    config = {
        "peft_type": "IA3", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "target_modules": targets, "feedforward_modules": ff_rule, "exclude_modules": None,
        "fan_in_fan_out": "conv1d" in kinds, "modules_to_save": None, "init_ia3_weights": True,
    }
    return config, state
