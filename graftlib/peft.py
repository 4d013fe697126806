"""PEFT checkpoints in and out: ``adapter_config.json`` + ``adapter_model.safetensors`` <-> grafts.

    PEFT LoRA on module M   base_model.model.M.lora_A.weight (r, in), .lora_B.weight (out, r)
                            (conv2d (r, in, kh, kw) / (out, r, 1, 1); embeddings lora_embedding_A (r, vocab)
                            and lora_embedding_B (dim, r))
        ->  lora(re:"M|...", r=R, alpha=a, rslora=..., dropout=p, name=<adapter>)
    PEFT modules_to_save M  base_model.model.M.<param> (full copies of M's parameters)
        ->  replace("M", name=<adapter>_modules):  op(.., W, ..) -> op(.., expand_as(W', W), ..)
    AdaLoRA, prompt tuning, P-tuning, prefix tuning
        ->  the pass's own ``peft_import(config, state, model) -> (spec, tensors)`` and
            ``peft_export(grafted, record) -> (config, state)`` (passes/adalora.py, prompt.py, ...)

``from_peft(model, dir, adapter_name)`` traces `model` (or adds to an existing :class:`Grafted`) and
``save_peft(g, dir, adapter)`` writes one adapter so that ``peft.PeftModel.from_pretrained(model, dir)``
loads it. Both are exact: outputs match PEFT's to float rounding.

Target matching is PEFT's own (``check_target_module_exists``): a list of names matches a module whose
path equals a name or ends with ``.name``; a string is a regex that must match the whole path;
``exclude_modules``, ``layers_to_transform`` / ``layers_pattern`` and the ``modules_to_save`` exclusion are
honoured. The matched paths are written into the spec as one exact regex, so the graft replays on the
same sites. Keys are PEFT's with the ``base_model.model.`` prefix mapped to the traced root.

Rank and alpha patterns (``rank_pattern`` / ``alpha_pattern``): graftlib gives one adapter one LoRA graft
with one ``r`` and ``alpha``, so every site is stored at the largest rank R (A zero-padded with rows,
B with columns; zero rows and columns add exactly nothing and get zero gradients, so they stay zero
in training) and the site's own scale is folded into B (``B * s_site / s_graft``). The per-site PEFT
``(r, alpha)`` and the original config are kept in the record's ``extras["peft"]``; ``save_peft`` cuts
the padding and unfolds the scale, so the checkpoint round-trips with its original shapes.

modules_to_save: the copies become a second graft, ``replace(...)`` named ``<adapter>_modules``, whose
parameters stand in for the module's own at every read of the weight (a join, so disabling, deleting
and merging behave like any graft; ``merge`` keeps it as nodes). Activate both names to get the PEFT
model (``from_peft`` activates both); ``save_peft(g, dir, "<adapter>")`` writes both.

DoRA (``use_dora``): ``lora(..., dora=true)`` with the ``lora_magnitude_vector`` per site (passes/dora.py).

Refused with "not supported: X" (never loaded as a different model): ``lora_bias``, ``bias`` other
than "none", initialisations that rewrite the base weights at load (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA,
MiCA), layer replication, target parameters, trainable tokens, aLoRA, QALoRA, LoRA variants, unknown
non-empty options, LoRA on dilated or (non block-diagonal) grouped convolutions, and pickled
``adapter_model.bin`` files. A load validates every key and shape before it changes anything; a failed
load leaves the model and the grafted module as they were.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import fx, nn

from .editor import Editor, graft_tag
from .errors import GraftError, LoadError, near_names
from .io import atomic_write, install_tensors
from .registry import Method, register
from .select import Selection, SiteIndex
from .sites import Site, weight_value
from .spec import GraftCall, parse_spec


def peft_magnitudes(config: Mapping[str, Any], chosen: Mapping[str, Site], by_path: Mapping[str, Any],
                    source: str) -> dict[str, torch.Tensor]:
    """DoRA magnitudes of a LoRA checkpoint (none without use_dora); the conversion lives in the pass."""
    return importlib.import_module("graftlib.passes.dora").peft_import_magnitudes(config, chosen, by_path, source)


def peft_magnitude_state(grafted: "Grafted", record: "GraftRecord", index: SiteIndex) -> dict[str, torch.Tensor]:
    return importlib.import_module("graftlib.passes.dora").peft_export_magnitudes(grafted, record, index, PREFIX)

if TYPE_CHECKING:
    from .grafted import Grafted, GraftRecord

__all__ = ["from_peft", "save_peft", "read_peft", "peft_target_match", "Replace",
           "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX"]

aten = torch.ops.aten

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
MODULES_SUFFIX = "_modules"
LORA_KINDS = ("linear", "conv1d", "conv2d", "embedding")

#: PEFT type -> pass module under graftlib.passes with peft_import / peft_export
PASS_TYPES = {"ADALORA": "adalora", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning",
              "PREFIX_TUNING": "prefix", "IA3": "ia3", "VERA": "vera"}
#: graftlib method -> its pass module (for save_peft)
PASS_METHODS = {"adalora": "adalora", "prompt": "prompt", "ptuning": "ptuning", "prefix": "prefix",
                "ptuning_v2": "prefix", "ia3": "ia3", "vera": "vera"}

# LoRA options: handled here, or metadata that does not change the model
_LORA_HANDLED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                 "auto_mapping", "peft_version", "r", "lora_alpha", "lora_dropout", "target_modules",
                 "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
                 "alpha_pattern", "modules_to_save", "use_rslora", "fan_in_fan_out", "bias",
                 "init_lora_weights", "megatron_core", "use_dora", "qalora_group_size", "runtime_config",
                 "loftq_config", "eva_config", "corda_config", "lora_ga_config"}
# initialisations that only set A and B (which the checkpoint overwrites); the others rewrite W
_SAFE_INITS = (True, False, "gaussian", "orthogonal", "eva")
_NAME = re.compile(r"[A-Za-z_][\w\-]*")


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
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"cannot read {config_path}: {exc}") from None
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
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoadError(f"{weights} is not a readable safetensors file ({exc}); re-save the adapter") from None
    return config, state


# -- PEFT's target matching ----------------------------------------------------------------------
def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def _excluded_by_modules_to_save(config: Mapping[str, Any], key: str) -> bool:
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in _as_list(config.get("modules_to_save")))


def peft_target_match(config: Mapping[str, Any], key: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a module path `key` (relative to the base model)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    if _excluded_by_modules_to_save(config, key):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
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
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    layer = int(match.group("idx"))
    return layer == indexes if isinstance(indexes, int) else layer in indexes


def _pattern_value(patterns: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of `key` wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _site_rank_alpha(config: Mapping[str, Any], path: str) -> tuple[int, float]:
    r = int(_pattern_value(config.get("rank_pattern"), path, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8)))
    return r, alpha


def _scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


# -- option checks -------------------------------------------------------------------------------
def _empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _not_supported(source: str, what: str, why: str = "") -> LoadError:
    return LoadError(f"{source}: not supported: {what}{' (' + why + ')' if why else ''}; graftlib "
                     "refuses rather than load a different model")


def _check_lora_options(config: Mapping[str, Any], source: str) -> None:
    init = config.get("init_lora_weights", True)
    if init not in _SAFE_INITS:
        raise _not_supported(source, f"init_lora_weights={init!r}",
                             "PEFT rewrites the base weights with it when loading")
    for key, value in config.items():
        if key in _LORA_HANDLED or _empty(value):
            continue
        raise _not_supported(source, f"{key}={value!r}")
    if config.get("bias", "none") != "none":
        raise _not_supported(source, f"bias={config['bias']!r}", "trained biases of the base model")
    if config.get("use_qalora"):
        raise _not_supported(source, "use_qalora=True")
    targets = config.get("target_modules")
    if targets is None:
        raise LoadError(f"{source}: target_modules is null; PEFT writes the resolved list when it saves "
                        "an adapter, so this config was not written by save_pretrained")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise _not_supported(source, "target_modules='all-linear' in a saved config",
                             "PEFT resolves it to module names when it creates the adapter")
    if float(config.get("lora_alpha", 8)) <= 0:
        raise _not_supported(source, f"lora_alpha={config.get('lora_alpha')}")


# -- rank padding and conv groups ----------------------------------------------------------------
def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A (g*r, ...), B (out, r, ...) -> A (g*rank, ...), B (out, rank, ...) with zeros."""
    r = b.shape[1]
    if r == rank:
        return a, b
    a_groups = a.reshape(groups, r, *a.shape[1:])                                  # (g, r, ...)
    a_pad = a.new_zeros(groups, rank, *a.shape[1:])
    a_pad[:, :r] = a_groups
    b_pad = b.new_zeros(b.shape[0], rank, *b.shape[2:])
    b_pad[:, :r] = b
    return a_pad.reshape(groups * rank, *a.shape[1:]), b_pad


def _cut_rank(a: torch.Tensor, b: torch.Tensor, rank: int, groups: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Inverse of :func:`_pad_rank`; None when the padding is not zero."""
    stored = b.shape[1]
    if stored == rank:
        return a, b
    a_groups = a.reshape(groups, stored, *a.shape[1:])                             # (g, R, ...)
    if a_groups[:, rank:].any() or b[:, rank:].any():
        return None
    return a_groups[:, :rank].reshape(groups * rank, *a.shape[1:]), b[:, :rank]


def _dense_groups(a: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped conv A (g*r, in/g, kh, kw) -> PEFT's dense A (g*r, in, kh, kw), zero off the blocks."""
    if groups == 1:
        return a
    rows, cols = a.shape[0] // groups, a.shape[1]
    dense = a.new_zeros(a.shape[0], cols * groups, *a.shape[2:])
    for j in range(groups):
        dense[j * rows:(j + 1) * rows, j * cols:(j + 1) * cols] = a[j * rows:(j + 1) * rows]
    return dense


def _block_groups(a: torch.Tensor, groups: int) -> torch.Tensor | None:
    """Dense A (g*r, in, kh, kw) -> grouped (g*r, in/g, kh, kw); None if it mixes groups."""
    if groups == 1:
        return a
    rows, cols = a.shape[0] // groups, a.shape[1] // groups
    blocks = torch.cat([a[j * rows:(j + 1) * rows, j * cols:(j + 1) * cols] for j in range(groups)])
    return blocks if torch.equal(_dense_groups(blocks, groups), a) else None


# -- the replace method (modules_to_save) --------------------------------------------------------
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


@register
class Replace(Method):
    """``replace("classifier", name=x)``: the module's parameters replaced by the adapter's own copies.

        op(.., W, ..)  ->  op(.., expand_as(W', W), ..)      (W' starts as a copy of W)

    The join returns W' itself (a view, no copy per call), so a disabled adapter reads W again. This is
    how PEFT's ``modules_to_save`` are loaded; targets are module paths (names, quoted globs, re:"...").
    """

    name = "replace"
    needs_targets = False
    mergeable = False

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        if not call.targets:
            raise call.error('replace(...) needs the modules whose weights it replaces, e.g. replace("classifier")')

    def select(self, call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> Selection:
        kinds = _graph_parameters(index.graph_module)
        modules = sorted({t.rsplit(".", 1)[0] for t in kinds if "." in t})
        matched: dict[str, list[str]] = {}
        for target in call.targets:
            hits = [m for m in modules if _module_match(target, m)]
            if not hits:
                raise call.error(f"replace: {target.text!r} names no module with weights in this model; "
                                 f"nearest: {near_names(target.text, modules)}", target.column)
            params = sorted({p for m in hits for p in _module_params(kinds, m)})
            buffers = [p for p in params if kinds[p] == "buffer"]
            if buffers:
                raise call.error(f"replace: not supported: {target.text!r} has buffers ({', '.join(buffers[:3])}); "
                                 "only parameters can be replaced", target.column)
            matched[target.text] = params
        return Selection(call, [], matched)

    def rewrite_graph(self, gm: fx.GraphModule, selection: Selection, config: dict[str, Any],
                      index: SiteIndex) -> None:
        targets = sorted({p for params in selection.matched.values() for p in params})
        getters = [n for n in gm.graph.nodes if n.op == "get_attr" and not graft_tag(n)]
        for target in targets:
            value = weight_value(gm, target)
            site = Site(target, "weights", target, 0, 0)
            for node in [n for n in getters if n.target == target]:
                editor = Editor(gm, self.name, config["name"], site, node)
                new = editor.param("value", lambda v=value: v.detach().clone())
                editor.join(node, aten.expand_as.default, new, node)


def _module_match(target: Any, module: str) -> bool:
    import fnmatch

    if target.kind == "regex":
        return re.fullmatch(target.text, module) is not None
    if target.kind == "glob":
        return fnmatch.fnmatchcase(module, target.text)
    return module == target.text or module.endswith("." + target.text)


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

    def resolve(self, grafted: "Grafted") -> None:
        """Key one-site tensors by the site the graft created."""
        for adapter, params in self.single.items():
            holders = list(grafted.store[adapter].values()) if adapter in grafted.store else []
            if len(holders) != 1:
                raise GraftError(f"adapter {adapter!r}: the pass gave tensors for one site but the graft has "
                                 f"{len(holders)}")
            for pname, tensor in params.items():
                self.tensors[f"{adapter}/{holders[0].site_key}/{pname}"] = tensor


_LORA_KEY = re.compile(r"(?P<path>.+)\.(?P<param>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                       r"|lora_magnitude_vector)")


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


def _lora_plan(grafted: "Grafted", index: SiteIndex, config: dict[str, Any],
               state: Mapping[str, torch.Tensor], adapter: str, source: str) -> tuple[str, dict, dict]:
    """The lora(...) spec, tensors per site key and extras for a PEFT LoRA checkpoint."""
    _check_lora_options(config, source)
    by_path: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        rest = _strip_prefix(key) if key.startswith(PREFIX) else None
        match = _LORA_KEY.fullmatch(rest) if rest is not None else None
        if match is None:
            what = "a LoRA bias" if ".lora_B.bias" in key else "not a LoRA tensor of this model"
            raise LoadError(f"{source}: unexpected tensor {key!r} ({what}); the checkpoint does not match "
                            "its config or this model")
        param = match.group("param").split(".")[0]
        by_path.setdefault(match.group("path"), {})[param] = (key, tensor)
    sites = {s.path: s for s in index.sites if s.kind in LORA_KINDS and s.part is None}
    chosen = {p: s for p, s in sites.items() if peft_target_match(config, p)}
    model_name = grafted._traced.model_class
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
        entries[path] = (site, r, alpha, *_site_tensors(site, by_path.get(path, {}), r, source))
    magnitudes = peft_magnitudes(config, chosen, by_path, source)  # DoRA (passes/dora.py); {} without
    spec, tensors, extras = _lora_spec(entries, config, rslora, adapter)
    for path, magnitude in magnitudes.items():
        tensors[chosen[path].key]["lora_magnitude_vector"] = magnitude
    return (spec[:-1] + ", dora=true)" if config.get("use_dora") else spec), tensors, extras


def _site_tensors(site: Site, found: Mapping[str, tuple[str, torch.Tensor]], r: int,
                  source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated (A, B) in graftlib's layout for one site."""
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
        if tuple(tensor.shape) != shape:
            raise LoadError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but {site.path} "
                            f"({site.kind} {site.in_features}->{site.out_features}, r={r}) needs {shape}; was "
                            "the adapter saved from another base model?")
        tensors.append(tensor)
    a, b = tensors
    if site.kind == "conv2d" and site.conv["groups"] > 1:
        grouped = _block_groups(a, site.conv["groups"])
        if grouped is None:
            raise LoadError(f"{source}: not supported: LoRA on the grouped convolution {site.path} whose "
                            "lora_A mixes groups (graftlib's conv LoRA is one factorisation per group)")
        a = grouped
    return a, b


def _float_text(value: float) -> str:
    text = repr(float(value))
    return text if any(c in text for c in ".eEn") else text + ".0"


def _exact_regex(paths: list[str]) -> str:
    return "|".join(re.escape(p) for p in paths)


def _lora_spec(entries: dict[str, tuple], config: dict[str, Any], rslora: bool,
               adapter: str) -> tuple[str, dict, dict]:
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
            f"dropout={_float_text(dropout)}, rslora={'true' if rslora else 'false'}, name={adapter}")
    graft_scale = _scale(rank, float(_float_text(alpha)), rslora)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for path in paths:
        site, r, site_alpha, a, b = entries[path]
        a, b = _pad_rank(a, b, rank, groups[path])
        if scales[path] != graft_scale:
            b = b * (scales[path] / graft_scale)
        names = ("lora_embedding_A", "lora_embedding_B") if site.kind == "embedding" else ("lora_A", "lora_B")
        tensors[site.key] = {names[0]: a, names[1]: b}
    extras = {"peft": {"config": config, "sites": {entries[p][0].key: [entries[p][1], entries[p][2]]
                                                   for p in paths}}}
    return f"lora({spec})", tensors, extras


def _modules_plan(grafted: "Grafted", config: dict[str, Any], modules: Mapping[str, tuple[str, torch.Tensor]],
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


def _pass_module(table: Mapping[str, str], kind: str, function: str, what: str) -> Any:
    module_name = table[kind]
    try:
        module = importlib.import_module(f"graftlib.passes.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"graftlib.passes.{module_name}":
            raise
        module = None
    hook = getattr(module, function, None)
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


def _plan(grafted: "Grafted", config: dict[str, Any], state: dict[str, torch.Tensor], adapter: str,
          source: str) -> _Plan:
    peft_type = str(config.get("peft_type", "")).upper()
    kinds = _graph_parameters(grafted.graph_module)
    method_state, modules = _split_modules(state, kinds)
    plan = _Plan()
    if peft_type == "LORA":
        index = SiteIndex.build(grafted.base_graph_module)
        spec, tensors, extras = _lora_plan(grafted, index, config, method_state, adapter, source)
        plan.add(adapter, spec, tensors, extras)
    elif peft_type in PASS_TYPES:
        hook = _pass_module(PASS_TYPES, peft_type, "peft_import", "loading PEFT type")
        model = grafted._model if grafted._model is not None else grafted.graph_module
        spec, tensors = hook(config, method_state, model)
        spec, names = _with_name(spec, adapter)
        if len(names) != 1:
            raise GraftError(f"peft_import for {peft_type} returned {len(names)} grafts; expected one")
        plan.add(names[0], spec, tensors, {"peft": {"config": config}})
    else:
        known = ", ".join(["LORA", *PASS_TYPES])
        raise LoadError(f"{source}: not supported: peft_type={config.get('peft_type')!r}; graftlib loads {known}")
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


def from_peft(model: nn.Module, peft_dir: str | os.PathLike, adapter_name: str = "default",
              example_inputs: Any = None, dynamic: bool = True) -> "Grafted":
    """Load a PEFT adapter folder as grafts on `model` (traced here) or on an existing Grafted.

    The adapter is named `adapter_name` (PEFT's modules_to_save become ``<adapter_name>_modules``) and is
    activated alongside the already active adapters. Nothing changes when the load fails.
    """
    from .grafted import Grafted
    from .trace import trace

    source = str(peft_dir)
    if not isinstance(adapter_name, str) or not _NAME.fullmatch(adapter_name):
        raise LoadError(f"adapter_name={adapter_name!r}: use letters, digits, '_' or '-' (e.g. 'default')")
    config, state = read_peft(peft_dir)
    _precheck(config, source)
    if isinstance(model, Grafted):
        grafted = model
        for name in (adapter_name, adapter_name + MODULES_SUFFIX):
            if name in grafted.adapters:
                raise LoadError(f"adapter {name!r} already exists: load with another adapter_name, e.g. "
                                f"adapter_name={adapter_name!r}2, or delete_adapter({name!r}) first")
    else:
        grafted = Grafted(trace(model, example_inputs, dynamic), model)
    plan = _plan(grafted, config, state, adapter_name, source)
    _install(grafted, plan, source)
    return grafted


def _precheck(config: dict[str, Any], source: str) -> None:
    """Refuse unknown types and options before spending time tracing."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        _check_lora_options(config, source)
    elif peft_type not in PASS_TYPES:
        known = ", ".join(["LORA", *PASS_TYPES])
        raise LoadError(f"{source}: not supported: peft_type={config.get('peft_type')!r}; graftlib loads {known}")


def _install(grafted: "Grafted", plan: _Plan, source: str) -> None:
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
def _pick_adapter(grafted: "Grafted", adapter: str | None) -> "GraftRecord":
    if adapter is not None:
        grafted._check_names([adapter])
        return grafted.adapters[adapter]
    owned = {(r.extras.get("peft") or {}).get("modules") for r in grafted.records}
    main = [r for r in grafted.records if r.adapter not in owned]
    if len(main) != 1:
        names = ", ".join(r.adapter for r in main) or "(none)"
        raise GraftError(f"save_peft needs the adapter to write: this module has {names}; "
                         "call g.save_peft(dir, adapter='<name>')")
    return main[0]


@dataclass
class _Out:
    """One module's LoRA in PEFT's layout."""

    site: Site
    r: int
    alpha: float
    a: torch.Tensor
    b: torch.Tensor


def _lora_scale(config: Mapping[str, Any]) -> float:
    alpha = float(config["r"]) if config.get("alpha") is None else float(config["alpha"])
    return _scale(int(config["r"]), alpha, bool(config.get("rslora")))


def _export_site(site: Site, params: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                 original: list | None) -> tuple[int, float, torch.Tensor, torch.Tensor, int]:
    """(PEFT r, alpha, A, B, groups) for one whole-module site; `original` is the imported (r, alpha)."""
    names = ("lora_embedding_A", "lora_embedding_B") if site.kind == "embedding" else ("lora_A", "lora_B")
    a, b = params[names[0]].detach(), params[names[1]].detach()
    groups = site.conv["groups"] if site.kind == "conv2d" else 1
    rslora = bool(config.get("rslora"))
    scale = _lora_scale(config)
    if original is not None:
        r_peft, alpha_peft = int(original[0]), float(original[1])
        cut = _cut_rank(a, b, r_peft // groups, groups)
        if cut is not None:
            a, b = cut
            site_scale = _scale(r_peft, alpha_peft, rslora)
            if site_scale != scale:
                b = b * (scale / site_scale)
            return r_peft, alpha_peft, a, b, groups
    r_peft = b.shape[1] * groups
    alpha = float(config["alpha"]) if config.get("alpha") is not None and r_peft == config["r"] else \
        scale * (math.sqrt(r_peft) if rslora else r_peft)
    return r_peft, alpha, a, b, groups


def _fuse_parts(entries: list[tuple[Site, Mapping[str, torch.Tensor]]], config: Mapping[str, Any],
                whole: Site) -> tuple[int, float, torch.Tensor, torch.Tensor]:
    """Slices of a fused projection (c_attn[q], c_attn[v], ...) as one LoRA on the whole module.

    A = cat(A_i) (sum r_i, in); B (out, sum r_i) holds B_i in its slice's rows and its own columns, so
    s * B A equals the sum of the slices' deltas, each in its rows.
    """
    a_list, blocks, start = [], [], 0
    for site, params in entries:
        a, b = params["lora_A"].detach(), params["lora_B"].detach()
        a_list.append(a)
        blocks.append((site.span or (0, whole.out_features), start, b))
        start += a.shape[0]
    b_full = a_list[0].new_zeros(whole.out_features, start)
    for (lo, hi), col, b in blocks:
        b_full[lo:hi, col:col + b.shape[1]] = b
    rslora = bool(config.get("rslora"))
    alpha = _lora_scale(config) * (math.sqrt(start) if rslora else start)
    return start, alpha, torch.cat(a_list), b_full


def _lora_outputs(grafted: "Grafted", record: "GraftRecord", index: SiteIndex) -> list[_Out]:
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
            r, alpha, a, b, groups = _export_site(site, entries[0][1], record.config, originals.get(site.key))
            outputs.append(_Out(site, r, alpha, _dense_groups(a, groups), b))
            continue
        whole = next((s for s in index.sites if s.key == path), None)
        if whole is None:
            raise GraftError(f"cannot save {path} in PEFT's format: its fused projection is not a site")
        r, alpha, a, b = _fuse_parts(entries, record.config, whole)
        outputs.append(_Out(whole, r, alpha, a, b))
    return outputs


def _known_paths(grafted: "Grafted") -> set[str]:
    paths = {t.rsplit(".", 1)[0] for t in _graph_parameters(grafted.graph_module) if "." in t}
    model = grafted._model
    if model is not None:
        paths |= {name for name, _ in model.named_modules() if name}
    return paths


def _target_modules(grafted: "Grafted", paths: list[str]) -> list[str] | str:
    """Exact full paths as a list when no other module ends with one of them, else one exact regex."""
    known = _known_paths(grafted)
    clash = any(other != p and other.endswith("." + p) for p in paths for other in known)
    return f"(?:{_exact_regex(paths)})" if clash else sorted(paths)


def _lora_config(grafted: "Grafted", record: "GraftRecord", outputs: list[_Out],
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
                bool(original.get("use_dora")) == bool(record.config.get("dora")):
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
        "alpha_pattern": alpha_pattern, "use_dora": bool(record.config.get("dora")), "lora_bias": False,
    }


def _export_lora(grafted: "Grafted", record: "GraftRecord") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
    if record.config.get("dora"):
        state.update(peft_magnitude_state(grafted, record, index))  # passes/dora.py
    return _lora_config(grafted, record, outputs, index), state


def _modules_record(grafted: "Grafted", record: "GraftRecord") -> "GraftRecord | None":
    name = (record.extras.get("peft") or {}).get("modules") or record.adapter + MODULES_SUFFIX
    found = grafted.adapters.get(name)
    return found if found is not None and found.method == "replace" else None


def _export(grafted: "Grafted", record: "GraftRecord") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if record.method == "replace":
        owner = (record.extras.get("peft") or {}).get("of")
        hint = f"save_peft(dir, adapter={owner!r}) writes it with its LoRA" if owner else \
            "PEFT stores replaced modules only alongside an adapter (modules_to_save)"
        raise GraftError(f"adapter {record.adapter!r} replaces module weights; {hint}")
    if record.method == "lora":
        config, state = _export_lora(grafted, record)
    elif record.method in PASS_METHODS:
        hook = _pass_module(PASS_METHODS, record.method, "peft_export", "saving in PEFT format the method")
        config, state = hook(grafted, record)
    else:
        raise GraftError(f"not supported: saving a {record.method} adapter in PEFT's format "
                         "(use g.save(dir) for graftlib's own format)")
    modules = _modules_record(grafted, record)
    if modules is not None:
        config, state = _export_modules(grafted, modules, config, state)
    elif config.get("modules_to_save"):
        config = {**config, "modules_to_save": None}  # its replace graft was deleted: base modules
    return config, state


def _export_modules(grafted: "Grafted", modules: "GraftRecord", config: dict[str, Any],
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


def save_peft(grafted: "Grafted", directory: str | os.PathLike, adapter: str | None = None) -> None:
    """Write `adapter` (the only one when None) as PEFT's adapter_config.json + adapter_model.safetensors."""
    record = _pick_adapter(grafted, adapter)
    config, state = _export(grafted, record)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    directory = Path(directory)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(
        json.dumps(_jsonable(config), indent=2, sort_keys=True) + "\n"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in (sorted(value) if isinstance(value, set) else value)]
    return value
