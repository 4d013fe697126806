"""Save and load grafts: adapter tensors as safetensors, everything else as JSON. Nothing is unpickled.

    <dir>/graft.json               {"format": "graftlib", "adapters": [{name, method, spec, sites}], ...}
    <dir>/adapters.safetensors     "<adapter>/<site key>/<param>" -> tensor

Writes are atomic (temp file + rename); a load validates every key and shape before it builds anything.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import LoadError
from .protocols import graft, is_grafted, named_spec
from .registry import get_method

if TYPE_CHECKING:
    from .protocols import GraftedModule

__all__ = ["save", "load", "config_dict", "atomic_write", "restoring", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "graft.json"
WEIGHTS_NAME = "adapters.safetensors"
FORMAT_VERSION = 1

_RESTORING = contextvars.ContextVar("graftlib_restoring", default=False)


@contextlib.contextmanager
def _restoring_saved_tensors() -> Iterator[None]:
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def restoring() -> bool:
    """Whether grafts are being rebuilt for saved tensors that will replace their initial values: an
    initialiser that needs outside data (a tokenizer for a text init) can then skip it."""
    return _RESTORING.get()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` then rename over `path`; on any failure no file is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def config_dict(grafted: "GraftedModule") -> dict[str, Any]:
    """graft.json's content for `grafted`."""
    config = grafted._traced.config
    return {
        "format": "graftlib",
        "version": FORMAT_VERSION,
        "base_model": {"class": grafted._traced.model_class,
                       "name_or_path": getattr(config, "_name_or_path", None) or None},
        "inputs": list(grafted.input_names),
        "active": list(grafted.active_adapters),
        "adapters": [{"name": r.adapter, "method": r.method, "spec": named_spec(r),
                      "config": _jsonable(r.config), "sites": r.sites, "extras": _jsonable(r.extras)}
                     for r in grafted.records],
    }


def save(grafted: "GraftedModule", directory: str | os.PathLike) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for record in grafted.records:
        if not get_method(record.method).saves_tensors:
            continue  # rebuilt from the base model on load (quantised weights)
        for site, params in grafted.store.tensors(record.adapter).items():
            for pname, tensor in params.items():
                tensors[f"{record.adapter}/{site}/{pname}"] = tensor.detach().contiguous().cpu()
    meta = config_dict(grafted)
    directory = Path(directory)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME,
                 lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise LoadError(f"{directory} is not a saved graft: {CONFIG_NAME} is missing "
                        "(save one with g.save(dir))")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"cannot read {path}: {exc}") from None
    if meta.get("format") != "graftlib":
        raise LoadError(f"{path} is not a graftlib config (format={meta.get('format')!r})")
    return meta


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise LoadError(f"{path} is missing: the saved graft has no weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{path} is not a readable safetensors file ({exc}); re-save the adapter") from None


def load(model: nn.Module, directory: str | os.PathLike, example_inputs: Any = None,
         dynamic: bool = True) -> "GraftedModule":
    """Rebuild the grafted module saved in `directory` on top of `model` (which is not modified)."""
    from .hf import is_trainer_checkpoint, read_trainer_checkpoint

    if is_trainer_checkpoint(directory):  # a Trainer checkpoint-N/ of a grafted module (see hf.py)
        meta, tensors = read_trainer_checkpoint(directory)
    else:
        meta, tensors = read_config(directory), read_tensors(directory)
    records = meta["adapters"]
    spec = " + ".join(r["spec"] for r in records)
    if not spec:
        raise LoadError(f"{directory} holds no adapters")
    with _restoring_saved_tensors():
        grafted = graft(model, spec, example_inputs=example_inputs, dynamic=dynamic) \
            if not is_grafted(model) else model.add(spec)
    saved_names = [r["name"] for r in records if get_method(r["method"]).saves_tensors]
    install_tensors(grafted, tensors, saved_names, source=str(directory))
    for record in grafted.records:
        saved = next((r for r in records if r["name"] == record.adapter), None)
        if saved is not None:
            record.extras = saved.get("extras", {}) or {}
    active = [a for a in meta.get("active", []) if a in grafted.adapters]
    grafted.set_active(active)
    return grafted


def install_tensors(grafted: "GraftedModule", tensors: dict[str, torch.Tensor], adapters: list[str],
                    source: str) -> None:
    """Validate every expected tensor (present, right shape) and only then copy them in."""
    plan: list[tuple[nn.Module, str, torch.Tensor]] = []
    expected: set[str] = set()
    for adapter in adapters:
        resizable = getattr(get_method(grafted.adapters[adapter].method), "resizable", False)
        for holder in grafted.store[adapter].values():
            for pname, current in list(holder.named_parameters(recurse=False)) + list(holder.named_buffers(recurse=False)):
                key = f"{adapter}/{holder.site_key}/{pname}"
                expected.add(key)
                if key not in tensors:
                    raise LoadError(f"{source}: tensor {key!r} is missing (expected shape "
                                    f"{tuple(current.shape)}); the checkpoint does not match its config")
                if tensors[key].shape != current.shape and not resizable:
                    raise LoadError(f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)} but the "
                                    f"model needs {tuple(current.shape)}; was it saved from another base model?")
                plan.append((holder, pname, tensors[key]))
    unexpected = sorted(k for k in tensors if k.split("/", 1)[0] in adapters and k not in expected)
    if unexpected:
        raise LoadError(f"{source}: unexpected tensors {unexpected[:5]}; the checkpoint does not match its config")
    with torch.no_grad():
        for holder, pname, value in plan:
            current = getattr(holder, pname)
            if current.shape == value.shape:
                current.copy_(value.to(current.dtype))
            elif isinstance(current, nn.Parameter):
                holder._parameters[pname] = nn.Parameter(value.to(current.dtype).clone(),
                                                         requires_grad=current.requires_grad)
            else:
                holder._buffers[pname] = value.to(current.dtype).clone()
    grafted._invalidate()
