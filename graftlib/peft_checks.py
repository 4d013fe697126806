"""Checks on a PEFT ``adapter_config.json`` from outside, before anything is traced or built.

Types and bounds of the fields graftlib reads (``r=4.7`` or ``r="abc"`` is refused, not truncated or
raised as a TypeError), and every regex field compiled by the bounded engine (see graftlib.safety).
Each problem is a :class:`LoadError` naming the field, its value and what is allowed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import LoadError
from .safety import MAX_PATTERN, regex_call, shorten

__all__ = ["check_peft_config", "INT_FIELDS", "FLOAT_FIELDS"]

# field -> (lowest, highest) inclusive
INT_FIELDS: dict[str, tuple[int, int]] = {
    "r": (1, 4096), "init_r": (1, 4096), "target_r": (1, 4096), "num_virtual_tokens": (1, 4096),
    "encoder_num_layers": (1, 16), "encoder_hidden_size": (1, 65536), "token_dim": (1, 65536),
    "num_layers": (1, 10_000), "num_attention_heads": (1, 65536), "num_transformer_submodules": (1, 2),
    "tinit": (0, 10**9), "tfinal": (0, 10**9), "deltaT": (1, 10**9), "total_step": (0, 10**9),
}
FLOAT_FIELDS: dict[str, tuple[float, float]] = {
    "lora_alpha": (-1e6, 1e6), "lora_dropout": (0.0, 1.0), "beta1": (0.0, 1.0), "beta2": (0.0, 1.0),
    "orth_reg_weight": (-1e6, 1e6),
}
_LIST_LIMIT = 100_000
_RANKED = {"LORA", "ADALORA"}  # types whose r is a rank (> 0); OFT may write r=0


def _show(value: Any) -> str:
    return shorten(repr(value), 80)


def _int(source: str, key: str, value: Any, bounds: tuple[int, int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LoadError(f"{source}: {key}={_show(value)} must be an integer in [{bounds[0]}, {bounds[1]}]")
    if not bounds[0] <= value <= bounds[1]:
        raise LoadError(f"{source}: {key}={value} is out of bounds: {key} must be in [{bounds[0]}, {bounds[1]}]")


def _float(source: str, key: str, value: Any, bounds: tuple[float, float]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoadError(f"{source}: {key}={_show(value)} must be a number in [{bounds[0]:g}, {bounds[1]:g}]")
    if not math.isfinite(value) or not bounds[0] <= value <= bounds[1]:
        raise LoadError(f"{source}: {key}={value} is out of bounds: {key} must be a finite number in "
                        f"[{bounds[0]:g}, {bounds[1]:g}]")


def _names(source: str, key: str, value: Any, regex_ok: bool) -> None:
    """None, a string (a regex where `regex_ok`) or a list of strings."""
    if value is None:
        return
    if isinstance(value, str):
        if regex_ok:
            regex_call("fullmatch", value, "", f"{key} regex", lambda m: LoadError(f"{source}: {m}"))
        elif len(value) > MAX_PATTERN:
            raise LoadError(f"{source}: {key} is {len(value)} characters long; at most {MAX_PATTERN}")
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise LoadError(f"{source}: {key}={_show(value)} must be a string or a list of strings")
    if len(value) > _LIST_LIMIT or any(len(v) > MAX_PATTERN for v in value):
        raise LoadError(f"{source}: {key} has {len(value)} entries or one longer than {MAX_PATTERN} characters")


def _patterns(source: str, key: str, value: Any, check: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise LoadError(f"{source}: {key}={_show(value)} must be an object {{module regex: value}}")
    for pattern, item in value.items():
        regex_call("match", rf"(.*\.)?({pattern})$", "", f"{key} key", lambda m: LoadError(f"{source}: {m}"))
        check(source, f"{key}[{shorten(repr(pattern), 40)}]", item)


def check_peft_config(config: Mapping[str, Any], source: str) -> None:
    """Refuse a config whose fields graftlib reads have the wrong type or are out of bounds."""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise LoadError(f"{source}: peft_type={_show(peft_type)} must be a string such as 'LORA'")
    for key, bounds in INT_FIELDS.items():
        if key == "r" and peft_type.upper() not in _RANKED:
            bounds = (0, bounds[1])  # OFT writes r=0 when it is sized by oft_block_size
        if config.get(key) is not None or (key == "r" and key in config):
            _int(source, key, config[key], bounds)
    for key, bounds in FLOAT_FIELDS.items():
        if config.get(key) is not None or (key == "lora_alpha" and key in config):
            _float(source, key, config[key], bounds)
    _names(source, "target_modules", config.get("target_modules"), regex_ok=True)
    _names(source, "exclude_modules", config.get("exclude_modules"), regex_ok=True)
    _names(source, "modules_to_save", config.get("modules_to_save"), regex_ok=False)
    _names(source, "layers_pattern", config.get("layers_pattern"), regex_ok=False)
    for entry in [config.get("modules_to_save")] if isinstance(config.get("modules_to_save"), str) else \
            (config.get("modules_to_save") or []):
        regex_call("match", rf"(^|.*\.){entry}($|\..*)", "", "modules_to_save entry",
                   lambda m: LoadError(f"{source}: {m}"))
    for entry in _as_list(config.get("layers_pattern")):
        regex_call("match", rf"(?:^|.*?\.){entry}\.(?P<idx>\d+)\.", "", "layers_pattern",
                   lambda m: LoadError(f"{source}: {m}"))
    layers = config.get("layers_to_transform")
    if layers is not None:
        for layer in layers if isinstance(layers, list) else [layers]:
            _int(source, "layers_to_transform", layer, (0, 100_000))
    _patterns(source, "rank_pattern", config.get("rank_pattern"),
              lambda s, k, v: _int(s, k, v, INT_FIELDS["r"]))
    _patterns(source, "alpha_pattern", config.get("alpha_pattern"),
              lambda s, k, v: _float(s, k, v, FLOAT_FIELDS["lora_alpha"]))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
