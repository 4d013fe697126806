"""Save and load grafts: adapter tensors as safetensors, everything else as JSON. Nothing is unpickled.

    <dir>/graft.json               {"format": "graftlib", "adapters": [{name, method, spec, sites}], ...}
    <dir>/adapters.safetensors     "<adapter>/<site key>/<param>" -> tensor

Writes are atomic as a whole: the new directory is written beside the old one and swapped in with one
``renameat2(RENAME_EXCHANGE)`` (:func:`write_directory`), so a reader sees one complete generation;
staging folders a killed process left behind are removed by the next write. A load validates the config
(version, names, types), every tensor (present, shape, finite) and only then builds anything; into an
existing graft it is all or nothing.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import json
import math
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import GraftError, GraftSpecError, LoadError
from .names import adapter_name_problem
from .protocols import graft, is_grafted, named_spec
from .registry import get_method
from .safety import loads_json, read_json, shorten
from .spec import parse_spec

if TYPE_CHECKING:
    from .protocols import GraftedModule

__all__ = ["save", "load", "config_dict", "atomic_write", "write_directory", "clean_staging", "restoring",
           "CONFIG_NAME", "WEIGHTS_NAME",
           "TRAINER_WEIGHTS_NAME", "EXTRA_STATE", "decode_config", "is_trainer_checkpoint", "read_trainer_checkpoint"]

CONFIG_NAME = "graft.json"
WEIGHTS_NAME = "adapters.safetensors"
TRAINER_WEIGHTS_NAME = "model.safetensors"   # what Trainer._save writes for a plain nn.Module (hf.py)
EXTRA_STATE = "_extra_state"                 # the state-dict entry holding graft.json's content
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


# -- atomic directories ---------------------------------------------------------------------------
_STAGING = ".graftlib-"  # staging folders: .<name>.graftlib-<pid>-<token>
_RENAME_EXCHANGE = 2


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    function = getattr(_LIBC, "renameat2", None)
    if function is None:
        return False
    at_fdcwd = -100
    result = function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _staging_pid(path: Path, name: str) -> int | None:
    stem = f".{name}{_STAGING}"
    if not path.name.startswith(stem):
        return None
    pid = path.name[len(stem):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def clean_staging(target: str | os.PathLike) -> list[str]:
    """Remove the staging folders/files a killed write to `target` left beside it (their writer is gone);
    if a killed fallback swap left `target` missing, put its previous generation back. Returns the removed
    names."""
    target = Path(target)
    removed: list[str] = []
    if not target.parent.is_dir():
        return removed
    for path in sorted(target.parent.iterdir()):
        pid = _staging_pid(path, target.name)
        if pid is None or _alive(pid):
            continue
        if path.name.endswith(".old") and not target.exists():
            os.replace(path, target)  # the fallback swap was killed between its two renames
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path.name)
    return removed


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _carry_over(old: Path, staging: Path, written: set[str]) -> None:
    """Files of the old directory that this write does not replace (a README, other adapters' folders)."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in old.iterdir():
        if entry.name in written:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=link)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), staging / entry.name)
        else:
            link(str(entry), str(staging / entry.name))


def write_directory(directory: str | os.PathLike, files: dict[str, Callable[[str], None]]) -> None:
    """Write `files` ({file name: write(path)}) as one generation of `directory`: all of them are written
    into a staging folder beside it, the old directory's other files are carried over, and the folder is
    swapped in with one exchange, so a reader never sees a mix of two generations or a missing file.
    On failure nothing changes (and the staging folder is removed)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise GraftError(f"{directory} is a file; give a directory to save into")
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_staging(directory)
    token = f".{directory.name}{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
    staging = directory.parent / token
    staging.mkdir()
    try:
        for name, write in files.items():
            write(str(staging / name))
            _fsync(staging / name)
        if directory.exists():
            _carry_over(directory, staging, set(files))
        _fsync(staging)
        if not directory.exists():
            os.rename(staging, directory)
        elif _exchange(staging, directory):
            shutil.rmtree(staging, ignore_errors=True)  # it holds the previous generation now
        else:  # no exchange on this filesystem: two renames; clean_staging restores a killed one
            old = directory.parent / (token + ".old")
            os.rename(directory, old)
            os.rename(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        _fsync(directory.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
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
    sharded = False
    for record in grafted.records:
        if not get_method(record.method).saves_tensors:
            continue  # rebuilt from the base model on load (quantised weights)
        for site, params in grafted.store.tensors(record.adapter).items():
            for pname, tensor in params.items():
                sharded = sharded or hasattr(tensor, "full_tensor")
                tensors[f"{record.adapter}/{site}/{pname}"] = _full(tensor).detach().contiguous().cpu()
    rank = _rank()  # torch.distributed: rank 0 writes; sharded (FSDP), every rank gathers and waits for it
    if rank <= 0:
        meta = config_dict(grafted)
        write_directory(directory, {
            WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
            CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"),
        })
    if sharded:
        torch.distributed.barrier()  # no rank reads the directory before it is written


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter gathered whole: a collective, so every rank saves."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _rank() -> int:
    """This process's rank in torch.distributed's default group, -1 when there is none."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else -1


def _into(current: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` laid out as `current`: this rank's rows of it when `current` is a DTensor shard."""
    if not hasattr(current, "device_mesh"):
        return value.to(current.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(current.dtype), current.device_mesh, current.placements, src_data_rank=None)


def _config_problem(meta: Any) -> str | None:
    """What is wrong with a graft.json's structure (None when it is well formed)."""
    if not isinstance(meta, dict):
        return f"the top level is a {type(meta).__name__}, not an object"
    if meta.get("format") != "graftlib":
        return f"format={shorten(repr(meta.get('format')), 60)}, not 'graftlib'"
    version = meta.get("version", FORMAT_VERSION)
    if type(version) is not int or version != FORMAT_VERSION:
        return (f"version {shorten(repr(version), 40)} is not one this graftlib reads ({FORMAT_VERSION}); "
                "upgrade graftlib or re-save the graft")
    adapters = meta.get("adapters")
    if not isinstance(adapters, list) or not adapters:
        return "'adapters' must be a non-empty list"
    names = []
    for i, record in enumerate(adapters):
        if not isinstance(record, dict):
            return f"adapters[{i}] is a {type(record).__name__}, not an object"
        for key in ("name", "method", "spec"):
            if not isinstance(record.get(key), str):
                return f"adapters[{i}].{key} is missing or not a string"
        problem = adapter_name_problem(record["name"])
        if problem:
            return f"adapters[{i}]: {problem}"
        try:
            calls = parse_spec(record["spec"])
        except GraftSpecError as exc:
            return f"adapters[{i}].spec does not parse: {exc.reason}"
        if len(calls) != 1 or calls[0].options.get("name", "default") != record["name"] \
                or calls[0].method != record["method"]:
            return (f"adapters[{i}].spec {shorten(repr(record['spec']), 80)} is not one {record['method']} "
                    f"graft named {record['name']!r}")
        if not isinstance(record.get("extras", {}) or {}, dict):
            return f"adapters[{i}].extras is not an object"
        names.append(record["name"])
    if len(set(names)) != len(names):
        return "two adapters have the same name"
    active = meta.get("active", [])
    if isinstance(active, str):
        active = [active]
    if not isinstance(active, list) or not all(isinstance(a, str) for a in active):
        return "'active' must be a list of adapter names"
    unknown = [a for a in active if a not in names]
    if unknown:
        return f"'active' names {shorten(repr(unknown), 80)}, which are not among its adapters"
    inputs = meta.get("inputs", [])
    if not isinstance(inputs, list):
        return "'inputs' must be a list"
    return None


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """graft.json, checked: size, depth, structure, version, adapter names (LoadError otherwise)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise LoadError(f"{directory} is not a saved graft: {CONFIG_NAME} is missing "
                        "(save one with g.save(dir))")
    return _checked_config(read_json(path, "graftlib config"), str(path))


def _checked_config(meta: Any, source: str) -> dict[str, Any]:
    problem = _config_problem(meta)
    if problem:
        raise LoadError(f"{source} is not a valid graftlib config: {problem}")
    if isinstance(meta.get("active"), str):
        meta["active"] = [meta["active"]]
    return meta


def decode_config(state: Any, source: str) -> dict[str, Any]:
    """A graft config stored in a state dict (``Grafted.get_extra_state``: a 1-D uint8 tensor of JSON),
    with graft.json's bounds and checks; ``state_dict_keys`` stays in it."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        raise LoadError(f"{source} is not a graftlib config (a 1-D uint8 tensor of JSON)")
    meta = loads_json(bytes(state.tolist()), source, "graftlib config")
    keys = meta.pop("state_dict_keys", {}) if isinstance(meta, dict) else {}
    meta = _checked_config(meta, source)
    if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise LoadError(f"{source}: the config's state_dict_keys is not a mapping of names")
    meta["state_dict_keys"] = keys
    return meta


def is_trainer_checkpoint(directory: str | os.PathLike) -> bool:
    """A Trainer checkpoint-N/ of a grafted module: a state dict with the config in it, no graft.json."""
    directory = Path(directory)
    return not (directory / CONFIG_NAME).is_file() and (directory / TRAINER_WEIGHTS_NAME).is_file()


def read_trainer_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(graft config, tensors keyed as in adapters.safetensors) from a Trainer checkpoint directory."""
    path = Path(directory) / TRAINER_WEIGHTS_NAME
    try:
        raw = load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ValueError, RuntimeError: a corrupt file
        raise LoadError(f"{path} is not a readable safetensors file ({shorten(str(exc), 200)})") from None
    configs = [k for k in raw if k == EXTRA_STATE or k.endswith("." + EXTRA_STATE)]
    if len(configs) != 1:
        raise LoadError(f"{path} holds no graftlib config (no {EXTRA_STATE} tensor): it was not saved from a "
                        "grafted module's state dict")
    prefix = configs[0][: -len(EXTRA_STATE)]
    meta = decode_config(raw[configs[0]], f"{path}:{configs[0]}")
    tensors = {}
    for key, saved_as in meta.pop("state_dict_keys").items():
        if prefix + key not in raw:
            raise LoadError(f"{path}: tensor {shorten(prefix + key, 120)!r} is missing; the checkpoint does not "
                            "match its config")
        tensors[saved_as] = raw[prefix + key]
    return meta, tensors


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise LoadError(f"{path} is missing: the saved graft has no weights file")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ValueError, RuntimeError: a corrupt file
        raise LoadError(f"{path} is not a readable safetensors file ({shorten(str(exc), 200)}); "
                        "re-save the adapter") from None


def _check_saved_adapters(meta: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> None:
    """No tensor outside the config's adapters, and every tensor finite (install_tensors then checks that
    each adapter's own tensors are all there: none is invented)."""
    names = [r["name"] for r in meta["adapters"]]
    stray = sorted(k for k in tensors if k.split("/", 1)[0] not in names)
    if stray:
        raise LoadError(f"{source}: tensors {shorten(repr(stray[:5]), 200)} belong to no adapter of "
                        f"{CONFIG_NAME}; the checkpoint does not match its config")
    for key, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise LoadError(f"{source}: tensor {shorten(key, 120)!r} holds NaN or infinite values; "
                            "refusing to load it")


def load(model: nn.Module, directory: str | os.PathLike, example_inputs: Any = None,
         dynamic: bool = True) -> "GraftedModule":
    """Rebuild the grafted module saved in `directory` on top of `model` (which is not modified).

    Onto an existing :class:`Grafted` it is all or nothing: any failure leaves it as it was."""
    source = str(directory)
    if is_trainer_checkpoint(directory):  # a Trainer checkpoint-N/ of a grafted module (hf.py)
        meta, tensors = read_trainer_checkpoint(directory)
    else:
        meta, tensors = read_config(directory), read_tensors(directory)
    _check_saved_adapters(meta, tensors, source)
    records = meta["adapters"]
    names = [r["name"] for r in records]
    if is_grafted(model):
        clash = [n for n in names if n in model.adapters]
        if clash:
            raise LoadError(f"adapter {clash[0]!r} already exists: delete_adapter({clash[0]!r}) first, or "
                            "load into a fresh model")
    spec = " + ".join(r["spec"] for r in records)
    try:
        with _restoring_saved_tensors():
            if not is_grafted(model):
                return _finish_load(graft(model, spec, example_inputs=example_inputs, dynamic=dynamic),
                                    meta, tensors, source)
            return _load_into(model, spec, meta, tensors, source)
    except GraftSpecError as exc:
        raise LoadError(f"{source}: the saved spec does not apply to this model: {exc}") from None


def _load_into(grafted: "GraftedModule", spec: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
               source: str) -> "GraftedModule":
    before, active = set(grafted.adapters), grafted.active_adapters
    grafted.add(spec)
    try:
        return _finish_load(grafted, meta, tensors, source)
    except BaseException:
        added = [r.adapter for r in grafted.records if r.adapter not in before]
        for name in reversed(added):
            with contextlib.suppress(Exception):
                grafted.delete_adapter(name)
        grafted._active = active
        grafted._invalidate()
        raise


def _finish_load(grafted: "GraftedModule", meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                 source: str) -> "GraftedModule":
    records = meta["adapters"]
    saved_names = [r["name"] for r in records if get_method(r["method"]).saves_tensors]
    install_tensors(grafted, tensors, saved_names, source=source)
    for record in grafted.records:
        saved = next((r for r in records if r["name"] == record.adapter), None)
        if saved is not None:
            record.extras = saved.get("extras", {}) or {}
    active = [a for a in meta.get("active", []) if a in grafted.adapters]
    previous = [a for a in grafted.active_adapters if a not in {r["name"] for r in records}]
    grafted.set_active(list(dict.fromkeys(previous + active)))
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
                if tensors[key].is_floating_point() and not bool(torch.isfinite(tensors[key]).all()):
                    raise LoadError(f"{source}: tensor {key!r} holds NaN or infinite values; refusing to load it")
                plan.append((holder, pname, tensors[key]))
    converted = sorted({(str(v.dtype), str(getattr(h, n).dtype)) for h, n, v in plan
                        if v.dtype != getattr(h, n).dtype})
    if converted:
        warnings.warn(f"{source}: converting saved tensors " + ", ".join(f"{a} -> {b}" for a, b in converted)
                      + " to the model's dtype", stacklevel=3)
    unexpected = sorted(k for k in tensors if k.split("/", 1)[0] in adapters and k not in expected)
    if unexpected:
        raise LoadError(f"{source}: unexpected tensors {unexpected[:5]}; the checkpoint does not match its config")
    with torch.no_grad():
        for holder, pname, value in plan:
            current = getattr(holder, pname)
            if current.shape == value.shape:
                current.copy_(_into(current, value))
            elif isinstance(current, nn.Parameter):
                holder._parameters[pname] = nn.Parameter(value.to(current.dtype).clone(),
                                                         requires_grad=current.requires_grad)
            else:
                holder._buffers[pname] = value.to(current.dtype).clone()
    grafted._invalidate()
