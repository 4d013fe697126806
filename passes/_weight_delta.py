"""Shared pieces of the weight-delta methods (LoHa, LoKr) and of their PEFT conversion.

A weight-delta method builds ``dW`` from its factors inside the graph and adds the op applied with it:

    linear(x, W, b)   ->  linear(x, W, b) + linear(x, dW)
    convNd(x, W, ...) ->  convNd(x, W, ...) + convNd(x, dW, None, stride, padding, dilation, groups)   (N = 1, 2, 3)

which is PEFT's own unmerged computation (``result + F.linear(x, delta_weight)``), so outputs match
PEFT's to float rounding, and merging is ``W += dW`` (the same tensor, computed eagerly).

PEFT checkpoints (LyCORIS family, ``peft_type`` LOHA / LOKR): tensors ``base_model.model.<module>.<param>``
with the adapter name stripped; target matching is PEFT's (:func:`graftlib.peft.peft_target_match`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from graftlib.conv import CONV_MODULES, conv_op
from graftlib.editor import Editor
from graftlib.errors import GraftError, LoadError
from graftlib.sites import Site

__all__ = ["peft_export_config", "kaiming", "join_delta", "rank_dropout", "weight_shape", "conv_options", "peft_sites", "peft_site_tensors",
           "peft_spec_regex", "site_paths", "target_modules", "check_options", "float_text", "PEFT_PREFIX", "METADATA_KEYS"]

aten = torch.ops.aten
PEFT_PREFIX = "base_model.model."
#: config keys that describe the checkpoint but do not change the model
METADATA_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                 "auto_mapping", "peft_version", "target_modules", "exclude_modules", "layers_to_transform",
                 "layers_pattern", "modules_to_save", "runtime_config"}


def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
    """PEFT's ``kaiming_uniform_(a=sqrt(5))``."""
    weight = torch.empty(shape)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


def weight_shape(site: Site) -> tuple[int, ...]:
    """The stored weight's shape: (out, in) for linear, (out, in/groups, *kernel) for a conv."""
    if site.kind == "conv":
        return (site.out_features, site.in_features // site.conv["groups"], *site.conv["kernel"])
    return (site.out_features, site.in_features)


def conv_options(site: Site) -> tuple[list[int], list[int], list[int], int]:
    conv = site.conv
    return list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]), conv["groups"]


def _keep_mask(editor: Editor, like: fx.Node, size: int, p: float) -> fx.Node:
    """(size,) of 1 (kept) or 0 (dropped, probability p) in training; exactly 1 in eval, where the runtime
    removes dropout nodes: ``min(dropout(ones), 1)`` maps dropout's {0, 1/(1-p)} to {0, 1}."""
    ones = editor.call(aten.new_ones.default, like, [size])
    return editor.call(aten.clamp_max.default, editor.call(aten.dropout.default, ones, p, True), 1.0)


def rank_dropout(editor: Editor, site: Site, delta: fx.Node, p: float, rescale: bool) -> fx.Node:
    """PEFT's LyCORIS rank dropout: rows of dW (output channels) dropped in training, optionally
    rescaled by the kept fraction (``drop /= drop.mean()``)."""
    if p <= 0:
        return delta
    keep = _keep_mask(editor, delta, site.out_features, p)                              # (out,)
    if rescale:
        keep = editor.call(aten.div.Tensor, keep, editor.call(aten.mean.default, keep))
    rank = len(weight_shape(site))
    keep = editor.call(aten.view.default, keep, [-1] + [1] * (rank - 1))
    return editor.call(aten.mul.Tensor, delta, keep)


def join_delta(editor: Editor, site: Site, delta: fx.Node, module_dropout: float = 0.0) -> None:
    """``y + op(x, dW)`` at the anchor: the op is the anchor's own (linear or convNd, same geometry).
    With `module_dropout` the whole branch is skipped with that probability in training (PEFT's)."""
    anchor = editor.anchor
    x = anchor.args[0]
    if site.kind == "conv":
        stride, padding, dilation, groups = conv_options(site)
        h = editor.call(conv_op(site), x, delta, None, stride, padding, dilation, groups)
    else:
        h = editor.call(aten.linear.default, x, delta)
    if module_dropout > 0:
        h = editor.call(aten.mul.Tensor, h, _keep_mask(editor, delta, 1, module_dropout))
    base = editor.value_at(anchor, same_shape=True)
    editor.join(base, aten.add.Tensor, base, h)


def float_text(value: float) -> str:
    text = repr(float(value))
    return text if any(c in text for c in ".eEn") else text + ".0"


# -- PEFT conversion -------------------------------------------------------------------------------
def check_options(config: Mapping[str, Any], handled: Iterable[str], source: str,
                  zero: Iterable[str] = ()) -> None:
    """Refuse options graftlib would not reproduce: unknown non-empty keys, non-zero `zero` keys."""
    known = METADATA_KEYS | set(handled) | set(zero)
    for key, value in config.items():
        if key not in known and not _empty(value):
            raise LoadError(f"{source}: not supported: {key}={value!r}; graftlib refuses rather than load a "
                            "different model")
    for key in zero:
        if config.get(key):
            raise LoadError(f"{source}: not supported: {key}={config[key]!r} (training-time dropout graftlib's "
                            f"{str(config.get('peft_type')).lower()} does not have yet); set it to 0 in "
                            "adapter_config.json to load the adapter for inference")
    for key in ("rank_dropout", "module_dropout"):
        value = config.get(key) or 0.0
        if not 0.0 <= float(value) < 1.0:
            raise LoadError(f"{source}: {key}={value!r} must be in [0, 1)")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise LoadError(f"{source}: not supported: {key}={config[key]!r} (graftlib gives one adapter one "
                            "rank and alpha for this method)")
    if config.get("target_modules") is None:
        raise LoadError(f"{source}: target_modules is null; PEFT writes the resolved list when it saves an "
                        "adapter, so this config was not written by save_pretrained")


def _empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def peft_sites(config: Mapping[str, Any], model: nn.Module, kinds: tuple[type, ...],
               method: str) -> list[str]:
    """Module paths PEFT adapts: PEFT's target matching over `model`'s modules of the supported types."""
    from graftlib.peft import peft_target_match

    chosen, refused = [], []
    for path, module in model.named_modules():
        if not path or not peft_target_match(config, path):
            continue
        if isinstance(module, kinds):
            chosen.append(path)
        elif isinstance(module, (nn.Embedding, nn.Linear, *CONV_MODULES)) or type(module).__name__ == "Conv1D":
            refused.append((path, type(module).__name__))
    if refused:
        path, kind = refused[0]
        raise LoadError(f"not supported: {method} on {kind} module {path!r} (graftlib's {method} handles "
                        f"{', '.join(k.__name__ for k in kinds)})")
    if not chosen:
        raise LoadError(f"target_modules {config.get('target_modules')!r} select no module of "
                        f"{type(model).__name__} that {method} can adapt; was the adapter saved from another model?")
    return chosen


def peft_site_tensors(state: Mapping[str, torch.Tensor], paths: list[str], names: tuple[str, ...],
                      method: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{path: {param: tensor}}`` from PEFT keys ``base_model.model.<path>.<param>``; refuses strays."""
    pattern = re.compile(rf"(?:{re.escape(PEFT_PREFIX)})(?P<path>.+)\.(?P<param>{'|'.join(map(re.escape, names))})")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    wanted = set(paths)
    for key, tensor in state.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise LoadError(f"unexpected tensor {key!r}: not a {method} tensor ({', '.join(names)})")
        path = match.group("path")
        if path not in wanted:
            raise LoadError(f"tensor {key!r} is for module {path!r}, which the config's target_modules do not "
                            "select; the checkpoint does not match its config")
        tensors.setdefault(path, {})[match.group("param")] = tensor
    for path in paths:
        if path not in tensors:
            raise LoadError(f"the config targets {path} but the weights file has no {method} tensor for it")
    return tensors


def peft_spec_regex(paths: Iterable[str]) -> str:
    return "re:\"(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")\""


def site_paths(record: Any) -> list[str]:
    """The adapter's module paths, refusing slices of fused projections (PEFT adapts whole modules)."""
    for key in record.sites:
        if "[" in key:
            raise GraftError(f"adapter {record.adapter!r} adapts {key}, a slice of a fused projection, which "
                             "PEFT cannot represent; save it with graftlib's own g.save instead")
    return sorted(record.sites)


def target_modules(grafted: Any, paths: list[str]) -> list[str] | str:
    """PEFT ``target_modules`` selecting exactly `paths` (a list, or one exact regex on a name clash)."""
    from graftlib.passes.lora_peft import _target_modules

    return _target_modules(grafted, paths)


def peft_export_config(grafted: Any, record: Any, peft_type: str,
                       **extra: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's adapter_config dict and ``adapter_model`` tensors for a LyCORIS-style adapter (LoHa, LoKr):
    the keys they share, plus the method's own `extra` keys."""
    paths = site_paths(record)
    tensors = grafted.store.tensors(record.adapter)
    state = {f"{PEFT_PREFIX}{path}.{name}": value.detach()
             for path in paths for name, value in tensors[path].items()}
    config = record.config
    return {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "r": config["r"], "alpha": config["alpha"], "rank_dropout": config["rank_dropout"],
            "module_dropout": config["module_dropout"],
            "use_effective_conv2d": bool(config["effective_conv2d"]), "target_modules": target_modules(grafted, paths),
            "exclude_modules": None, "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, **extra}, state
