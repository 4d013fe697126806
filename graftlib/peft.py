"""PEFT checkpoints in and out: ``adapter_config.json`` + ``adapter_model.safetensors`` <-> grafts.

This module keeps the format; each method's conversion lives with its pass:

    peft_type in adapter_config.json  --PASS_TYPES-->   graftlib.passes.<module>.peft_import / peft_check
    record.method of the adapter      --PASS_METHODS--> graftlib.passes.<module>.peft_export
    LORA: passes/lora_peft.py (re-exported by lora.py)   ADALORA: adalora.py   PROMPT_TUNING: prompt.py
    P_TUNING: ptuning.py   PREFIX_TUNING: prefix.py      (docs/ENGINE.md: the hooks' contract)

Here: reading (``read_peft``: never unpickles), PEFT's key naming (``base_model.model.<path>.<param>``,
``PREFIX``), PEFT's target matching (``peft_target_match``, as ``check_target_module_exists``:
``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``, the ``modules_to_save`` exclusion), the
rank / alpha patterns lookup, the dispatch, the all-or-nothing install, and ``modules_to_save``:

    PEFT modules_to_save M  base_model.model.M.<param> (full copies of M's parameters)
        ->  replace("M", name=<adapter>_modules):  op(.., W, ..) -> op(.., expand_as(W', W), ..)

The copies become a second graft, ``replace(...)`` named ``<adapter>_modules``, whose parameters stand in
for the module's own at every read of the weight (a join, so disabling, deleting and merging behave like
any graft; ``merge`` keeps it as nodes). Activate both names to get the PEFT model (``from_peft``
activates both); ``save_peft(g, dir, "<adapter>")`` writes both.

``from_peft(model, dir, adapter_name)`` traces `model` (or adds to an existing grafted module) and
``save_peft(g, dir, adapter)`` writes one adapter so that ``peft.PeftModel.from_pretrained(model, dir)``
loads it. Both are exact: outputs match PEFT's to float rounding. Refused with "not supported: X" (never
loaded as a different model): unknown PEFT types, the options a pass's ``peft_check`` refuses (LoRA:
``kasa_config``, PiSSA-like inits, ...) and pickled ``adapter_model.bin`` files. A load validates every key
and shape before it changes anything; a failed load leaves the model and the grafted module as they were.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import fx, nn

from .editor import graft_tag
from .errors import GraftError, LoadError
from .io import install_tensors, write_directory
from .names import check_adapter_name
from .peft_checks import check_peft_config
from .safety import read_json, regex_call
from .protocols import is_grafted, new_grafted
from .sites import weight_value
from .spec import parse_spec

if TYPE_CHECKING:
    from .protocols import GraftedModule, GraftRecord

__all__ = ["from_peft", "save_peft", "read_peft", "peft_target_match",
           "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX"]


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
MODULES_SUFFIX = "_modules"
LORA_KINDS = ("linear", "conv1d", "conv2d", "embedding")

#: PEFT type -> pass module under graftlib.passes with peft_import (and optionally peft_check)
PASS_TYPES = {"LORA": "lora", "ADALORA": "adalora", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning",
              "PREFIX_TUNING": "prefix", "LOHA": "loha", "LOKR": "lokr", "OFT": "oft",
              "IA3": "ia3", "VERA": "vera"}
#: graftlib method -> its pass module with peft_export (for save_peft)
PASS_METHODS = {"lora": "lora", "adalora": "adalora", "prompt": "prompt", "ptuning": "ptuning", "prefix": "prefix",
                "ptuning_v2": "prefix", "loha": "loha", "lokr": "lokr", "oft": "oft",
                "ia3": "ia3", "vera": "vera", "lora_param": "lora_param",
                "tokens": "tokens"}

#: a companion graft's kind (extras["peft"]["companion"]) -> the pass module that writes it with its adapter
COMPANION_HOOKS = {"tokens": "tokens"}

# LoRA options: handled here, or metadata that does not change the model
# initialisations that only set A and B (which the checkpoint overwrites); the others rewrite W


# -- reading -------------------------------------------------------------------------------------
def read_peft(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json as a dict, adapter_model.safetensors tensors)``; never unpickles."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise LoadError(f"{directory} is not a directory; pass the folder PEFT's save_pretrained wrote")
    if not config_path.is_file():
        nested = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_NAME}"))
        hint = (f"; it holds adapters in sub-folders ({', '.join(nested)}): pass {directory / nested[0]}"
                if nested else "; is this a PEFT adapter folder?")
        raise LoadError(f"{directory} has no {CONFIG_NAME}{hint}")
    config = read_json(config_path, "PEFT adapter config")
    if not isinstance(config, dict) or "peft_type" not in config:
        raise LoadError(f"{config_path} is not a PEFT adapter config (no peft_type)")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [name for name in PICKLE_NAMES if (directory / name).is_file()]
        if pickled:
            raise LoadError(f"{directory} holds {pickled[0]}, a pickle; graftlib never unpickles. Re-save "
                            "the adapter with save_pretrained(..., safe_serialization=True) to get "
                            f"{WEIGHTS_NAME}")
        raise LoadError(f"{weights} is missing: the PEFT adapter has no weights file")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # SafetensorError, OSError, ValueError, RuntimeError: a corrupt file
        raise LoadError(f"{weights} is not a readable safetensors file ({str(exc)[:200]}); re-save the "
                        "adapter") from None
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LoadError(f"{weights}: tensor {key[:120]!r} holds NaN or infinite values; refusing to load it")
    return config, state


# -- PEFT's target matching ----------------------------------------------------------------------
def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def _excluded_by_modules_to_save(config: Mapping[str, Any], key: str) -> bool:
    return any(regex_call("match", rf"(^|.*\.){m}($|\..*)", key, "modules_to_save entry")
               for m in _as_list(config.get("modules_to_save")))


def peft_target_match(config: Mapping[str, Any], key: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a module path `key` (relative to the base model)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if regex_call("fullmatch", exclude, key, "exclude_modules regex"):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    if _excluded_by_modules_to_save(config, key):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return regex_call("fullmatch", targets, key, "target_modules regex") is not None
    targets = _as_list(targets)
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    indexes = config.get("layers_to_transform")
    using = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if not (found and using):
        return found
    patterns = _as_list(config.get("layers_pattern"))
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in patterns:
            match = regex_call("match", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key, "layers_pattern")
            if match is not None:
                break
    if match is None:
        return False
    layer = int(match.group("idx"))
    return layer == indexes if isinstance(indexes, int) else layer in indexes


def _pattern_value(patterns: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of `key` wins."""
    for pattern, value in (patterns or {}).items():
        if regex_call("match", rf"(.*\.)?({pattern})$", key, "rank_pattern/alpha_pattern key"):
            return value
    return default


def _site_rank_alpha(config: Mapping[str, Any], path: str) -> tuple[int, float]:
    r = int(_pattern_value(config.get("rank_pattern"), path, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8)))
    return r, alpha


# -- option checks -------------------------------------------------------------------------------
def _empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _not_supported(source: str, what: str, why: str = "") -> LoadError:
    return LoadError(f"{source}: not supported: {what}{' (' + why + ')' if why else ''}; graftlib "
                     "refuses rather than load a different model")


# -- modules_to_save: the base parameters the graph reads ----------------------------------------
def _graph_parameters(gm: fx.GraphModule) -> dict[str, str]:
    """get_attr target -> "parameter" | "buffer" for the base model's tensors the graph reads."""
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    kinds: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not graft_tag(node) and not str(node.target).startswith("graft."):
            kinds[str(node.target)] = "parameter" if node.target in params else "buffer"
    return kinds


def _module_params(kinds: Mapping[str, str], module: str) -> list[str]:
    return sorted(t for t in kinds if t.startswith(module + "."))


# -- import plan ---------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What a load adds: one spec, the tensors per adapter, extras per adapter."""

    specs: list[str] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)   # "<adapter>/<site>/<param>"
    adapters: list[str] = field(default_factory=list)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    single: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # adapter -> {param: tensor}

    def add(self, adapter: str, spec: str, per_site: Mapping[str, Any],
            extras: dict[str, Any] | None = None) -> None:
        """`per_site` is {site key: {param: tensor}}, or {param: tensor} for a graft with one site."""
        self.specs.append(spec)
        self.adapters.append(adapter)
        for site, params in per_site.items():
            if isinstance(params, torch.Tensor):
                self.single.setdefault(adapter, {})[site] = params
                continue
            for pname, tensor in params.items():
                self.tensors[f"{adapter}/{site}/{pname}"] = tensor
        if extras:
            self.extras[adapter] = extras

    def resolve(self, grafted: "GraftedModule") -> None:
        """Key one-site tensors by the site the graft created."""
        for adapter, params in self.single.items():
            holders = list(grafted.store[adapter].values()) if adapter in grafted.store else []
            if len(holders) != 1:
                raise GraftError(f"adapter {adapter!r}: the pass gave tensors for one site but the graft has "
                                 f"{len(holders)}")
            for pname, tensor in params.items():
                self.tensors[f"{adapter}/{holders[0].site_key}/{pname}"] = tensor


_LORA_KEY = re.compile(r"(?P<path>.+)\.(?P<param>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A"
                       r"|lora_embedding_B|lora_magnitude_vector)")


def _strip_prefix(key: str) -> str | None:
    for prefix in (PREFIX, "base_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def _split_modules(state: Mapping[str, torch.Tensor], kinds: Mapping[str, str]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, torch.Tensor]]]:
    """(method tensors, modules_to_save tensors: parameter path -> (key, tensor))."""
    method, modules = {}, {}
    for key, tensor in state.items():
        rest = _strip_prefix(key)
        path = rest.replace(".base_layer.", ".") if rest is not None else None
        if path is not None and path in kinds and not _LORA_KEY.fullmatch(rest):
            modules[path] = (key, tensor)
        else:
            method[key] = tensor
    return method, modules


def _float_text(value: float) -> str:
    text = repr(float(value))
    return text if any(c in text for c in ".eEn") else text + ".0"


def _exact_regex(paths: list[str]) -> str:
    return "|".join(re.escape(p) for p in paths)


def _modules_plan(grafted: "GraftedModule", config: dict[str, Any], modules: Mapping[str, tuple[str, torch.Tensor]],
                  kinds: Mapping[str, str], source: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Validate modules_to_save copies (and changed base layers); (module paths, param -> tensor)."""
    names = _as_list(config.get("modules_to_save"))
    wanted = {t for t in kinds if kinds[t] == "parameter" and any(
        _prefixes(t, lambda m: any(m.endswith(n) for n in names)))}
    replaced: dict[str, torch.Tensor] = {}
    for path, (key, tensor) in modules.items():
        current = weight_value(grafted.graph_module, path)
        if tuple(tensor.shape) != tuple(current.shape):
            raise LoadError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but the model's {path} has "
                            f"{tuple(current.shape)}; was the adapter saved from another base model?")
        is_base_layer = ".base_layer." in key
        if is_base_layer and torch.equal(tensor.to(current.dtype), current.detach()):
            continue  # PEFT saved an unchanged embedding alongside its LoRA
        if not is_base_layer and path not in wanted:
            raise LoadError(f"{source}: unexpected tensor {key!r}: {path} is not in modules_to_save {names}")
        replaced[path] = tensor
    missing = sorted(wanted - set(modules))
    if missing:
        raise LoadError(f"{source}: modules_to_save {names} covers {missing[0]}, but the weights file has no "
                        f"{PREFIX}{missing[0]}; the checkpoint does not match its config")
    owners = sorted({p.rsplit(".", 1)[0] for p in replaced})
    return owners, replaced


def _prefixes(path: str, test: Any) -> list[bool]:
    parts = path.split(".")
    return [test(".".join(parts[:i])) for i in range(1, len(parts))]


def _pass_hook(module_name: str, function: str) -> Any:
    """``graftlib.passes.<module_name>.<function>``, or None (imported by name: the engine imports no pass)."""
    try:
        module = importlib.import_module(f"graftlib.passes.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"graftlib.passes.{module_name}":
            raise
        return None
    return getattr(module, function, None)


def _pass_module(table: Mapping[str, str], kind: str, function: str, what: str) -> Any:
    module_name = table[kind]
    hook = _pass_hook(module_name, function)
    if hook is None:
        raise GraftError(f"not supported yet: {what} {kind} (graftlib.passes.{module_name}.{function} "
                         "does not exist yet)")
    return hook


def _with_name(spec: str, name: str) -> tuple[str, list[str]]:
    """Give every call of `spec` a name (the first `name`, then `name_1`, ...)."""
    out, names = [], []
    for i, call in enumerate(parse_spec(spec)):
        text = call.text
        if "name" in call.options:
            names.append(str(call.options["name"]))
        else:
            given = name if i == 0 else f"{name}_{i}"
            inner = text[text.index("(") + 1:text.rindex(")")].strip()
            text = f"{call.method}({inner}{', ' if inner else ''}name={given})"
            names.append(given)
        out.append(text)
    return " + ".join(out), names


def _plan(grafted: "GraftedModule", config: dict[str, Any], state: dict[str, torch.Tensor], adapter: str,
          source: str) -> _Plan:
    peft_type = str(config.get("peft_type", "")).upper()
    kinds = _graph_parameters(grafted.graph_module)
    method_state, modules = _split_modules(state, kinds)
    plan = _Plan()
    if peft_type not in PASS_TYPES:
        known = ", ".join(PASS_TYPES)
        raise LoadError(f"{source}: not supported: peft_type={config.get('peft_type')!r}; graftlib loads {known}")
    hook = _pass_module(PASS_TYPES, peft_type, "peft_import", "loading PEFT type")
    model = grafted._model if grafted._model is not None else grafted.graph_module
    spec, tensors, *more = hook(config, method_state, model, **_context(hook, grafted, source))
    spec, names = _with_name(spec, adapter)
    if len(names) != 1:
        raise GraftError(f"peft_import for {peft_type} returned {len(names)} grafts; expected one")
    extras = dict(more[0]) if more else {}
    companions = extras.pop("companions", [])
    plan.add(names[0], spec, tensors, {"peft": {"config": config, **extras}})
    for suffix, companion_spec, companion_tensors, kind in companions:  # e.g. trainable tokens beside a LoRA
        name = _companion_name(grafted, names[0] + suffix, source)
        plan.add(name, _with_name(companion_spec, name)[0], companion_tensors,
                 {"peft": {"of": names[0], "companion": kind}})
        plan.extras[names[0]]["peft"].setdefault("companions", []).append(name)
    owners, replaced = _modules_plan(grafted, config, modules, kinds, source)
    if replaced:
        name = plan.adapters[0] + MODULES_SUFFIX
        targets = ", ".join(f'"{m}"' for m in owners)
        per_param = {p: {"value": replaced.get(p, weight_value(grafted.graph_module, p).detach())}
                     for m in owners for p in _module_params(kinds, m)}
        plan.add(name, f"replace({targets}, name={name})", per_param,
                 {"peft": {"of": plan.adapters[0], "modules_to_save": owners}})
        plan.extras[plan.adapters[0]]["peft"]["modules"] = name
    return plan


def _companion_name(grafted: "GraftedModule", name: str, source: str) -> str:
    check_adapter_name(name, LoadError)
    if name in grafted.adapters:
        raise LoadError(f"{source}: adapter {name!r} already exists: load with another adapter_name, or "
                        f"delete_adapter({name!r}) first")
    return name


def from_peft(model: nn.Module, peft_dir: str | os.PathLike, adapter_name: str = "default",
              example_inputs: Any = None, dynamic: bool = True) -> "GraftedModule":
    """Load a PEFT adapter folder as grafts on `model` (traced here) or on an existing Grafted.

    The adapter is named `adapter_name` (PEFT's modules_to_save become ``<adapter_name>_modules``) and is
    activated alongside the already active adapters. Nothing changes when the load fails.
    """
    source = str(peft_dir)
    check_adapter_name(adapter_name, LoadError)
    check_adapter_name(adapter_name + MODULES_SUFFIX, LoadError)
    config, state = read_peft(peft_dir)
    check_peft_config(config, source)
    _precheck(config, source)
    if is_grafted(model):
        grafted = model
        for name in (adapter_name, adapter_name + MODULES_SUFFIX):
            if name in grafted.adapters:
                raise LoadError(f"adapter {name!r} already exists: load with another adapter_name, e.g. "
                                f"adapter_name={adapter_name!r}2, or delete_adapter({name!r}) first")
    else:
        grafted = new_grafted(model, example_inputs, dynamic)
    plan = _plan(grafted, config, state, adapter_name, source)
    _install(grafted, plan, source)
    return grafted


def _precheck(config: dict[str, Any], source: str) -> None:
    """Refuse unknown types, and the options the pass's ``peft_check`` refuses, before spending time tracing."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in PASS_TYPES:
        known = ", ".join(PASS_TYPES)
        raise LoadError(f"{source}: not supported: peft_type={config.get('peft_type')!r}; graftlib loads {known}")
    check = _pass_hook(PASS_TYPES[peft_type], "peft_check")
    if check is not None:
        check(config, source)


def _context(hook: Any, grafted: "GraftedModule", source: str) -> dict[str, Any]:
    """The keywords a ``peft_import`` hook names besides (config, state, model): ``grafted`` (the module
    loaded into: its base graph's sites) and ``source`` (the checkpoint, for messages)."""
    wanted = inspect.signature(hook).parameters
    return {k: v for k, v in (("grafted", grafted), ("source", source)) if k in wanted}


def _install(grafted: "GraftedModule", plan: _Plan, source: str) -> None:
    """Add the plan's grafts and copy its tensors in; on any failure undo both."""
    before, active = set(grafted.adapters), grafted.active_adapters
    grafted.add(" + ".join(plan.specs))
    try:
        plan.resolve(grafted)
        install_tensors(grafted, plan.tensors, plan.adapters, source=source)
    except Exception:
        for name in plan.adapters:
            if name in grafted.adapters and name not in before:
                grafted.delete_adapter(name)
        grafted._active = active
        grafted._invalidate()
        raise
    for name, extras in plan.extras.items():
        grafted.adapters[name].extras.update(extras)


# -- writing -------------------------------------------------------------------------------------
def _pick_adapter(grafted: "GraftedModule", adapter: str | None) -> "GraftRecord":
    if adapter is not None:
        grafted._check_names([adapter])
        return grafted.adapters[adapter]
    owned = {(r.extras.get("peft") or {}).get("modules") for r in grafted.records}
    owned |= {c for r in grafted.records for c in (r.extras.get("peft") or {}).get("companions", [])}
    main = [r for r in grafted.records if r.adapter not in owned]
    if len(main) != 1:
        names = ", ".join(r.adapter for r in main) or "(none)"
        raise GraftError(f"save_peft needs the adapter to write: this module has {names}; "
                         "call g.save_peft(dir, adapter='<name>')")
    return main[0]


def _modules_record(grafted: "GraftedModule", record: "GraftRecord") -> "GraftRecord | None":
    name = (record.extras.get("peft") or {}).get("modules") or record.adapter + MODULES_SUFFIX
    found = grafted.adapters.get(name)
    return found if found is not None and found.method == "replace" else None


def _export(grafted: "GraftedModule", record: "GraftRecord") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    owner = (record.extras.get("peft") or {}).get("of")
    if owner is not None and record.method != "replace":
        raise GraftError(f"adapter {record.adapter!r} is saved with its adapter: save_peft(dir, adapter={owner!r})")
    if record.method == "replace":
        hint = f"save_peft(dir, adapter={owner!r}) writes it with its LoRA" if owner else \
            "PEFT stores replaced modules only alongside an adapter (modules_to_save)"
        raise GraftError(f"adapter {record.adapter!r} replaces module weights; {hint}")
    if record.method in PASS_METHODS:
        hook = _pass_module(PASS_METHODS, record.method, "peft_export", "saving in PEFT format the method")
        config, state = hook(grafted, record)
    else:
        raise GraftError(f"not supported: saving a {record.method} adapter in PEFT's format "
                         "(use g.save(dir) for graftlib's own format)")
    for name in (record.extras.get("peft") or {}).get("companions", []):
        if name in grafted.adapters:  # deleted: written without it
            companion = grafted.adapters[name]
            kind = (companion.extras.get("peft") or {}).get("companion")
            hook = _pass_module(COMPANION_HOOKS, kind if kind in COMPANION_HOOKS else "tokens",
                                "peft_export_companion", "saving in PEFT format the companion")
            config, state = hook(grafted, companion, config, state)
    modules = _modules_record(grafted, record)
    if modules is not None:
        config, state = _export_modules(grafted, modules, config, state)
    elif config.get("modules_to_save"):
        config = {**config, "modules_to_save": None}  # its replace graft was deleted: base modules
    return config, state


def _export_modules(grafted: "GraftedModule", modules: "GraftRecord", config: dict[str, Any],
                    state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Replaced weights: ``<module>.base_layer.<param>`` for a module that also has LoRA (PEFT loads
    it into the wrapped layer), else ``<module>.<param>`` listed in modules_to_save."""
    adapted = {m.group("path") for k in state if (m := _LORA_KEY.fullmatch(k[len(PREFIX):]))}
    owners: list[str] = []
    for path, params in grafted.store.tensors(modules.adapter).items():
        owner, leaf = path.rsplit(".", 1)
        if owner in adapted:
            state[f"{PREFIX}{owner}.base_layer.{leaf}"] = params["value"]
        else:
            state[f"{PREFIX}{path}"] = params["value"]
            owners.append(owner)
    if owners and not config.get("modules_to_save"):
        config = {**config, "modules_to_save": sorted(set(owners))}
    return config, state


def save_peft(grafted: "GraftedModule", directory: str | os.PathLike, adapter: str | None = None) -> None:
    """Write `adapter` (the only one when None) as PEFT's adapter_config.json + adapter_model.safetensors."""
    record = _pick_adapter(grafted, adapter)
    config, state = _export(grafted, record)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    directory = Path(directory)
    write_directory(directory, {  # one generation: both files swapped in together
        WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
        CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True) + "\n"),
    })


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in (sorted(value) if isinstance(value, set) else value)]
    return value
