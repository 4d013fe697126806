"""What graftlib's command-line tools share: one-line failures with exit status 1, quiet libraries."""
from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CliFailure", "one_line", "run_guarded", "named_base", "load_hf", "base_model", "output_problem"]


class CliFailure(Exception):
    """A reason to exit with status 1 (printed as one line)."""


def one_line(exc: BaseException) -> str:
    from graftlib.errors import GraftSpecError

    if isinstance(exc, GraftSpecError) and exc.spec is not None:
        return f"{exc.reason} (in {exc.spec!r} at column {exc.column})"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(exc).__name__


def run_guarded(prog: str, debug: bool, run: Callable[[], int]) -> int:
    """Run a tool's body: warnings and library chatter off unless `debug`; any failure is one line + 1."""
    if not debug:
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line and status 1
        from graftlib.errors import GraftError

        if debug:
            traceback.print_exc()
        reason = one_line(exc)
        if not isinstance(exc, (GraftError, CliFailure, OSError)):
            reason = f"{type(exc).__name__}: {reason} (run with --debug for the traceback)"
        print(f"{prog}: error: {reason}", file=sys.stderr)
        return 1


def named_base(graft_dir: Path, meta: dict[str, Any], fix: str) -> tuple[Path, str | None]:
    """The base model directory a saved graft's graft.json names (absolute, or relative to the graft
    directory) and its class; `fix` tells the user how to name it instead."""
    base = meta.get("base_model") or {}
    name = base.get("name_or_path")
    if not name:
        class_name = base.get("class")
        if class_name and not _is_transformers_class(class_name):
            raise CliFailure(f"{graft_dir} was saved on a {class_name}, not a Hugging Face model, and graft.json "
                             f"does not say how to build one: load it in Python with graftlib.load(model, "
                             f"{str(graft_dir)!r}, example_inputs=...), then graftlib.export_onnx or g.diff()")
        raise CliFailure(f"{graft_dir}/graft.json does not name its base model: {fix}")
    for candidate in (Path(name), graft_dir / name):
        if (candidate / "config.json").is_file():
            return candidate, base.get("class")
    raise CliFailure(f"{graft_dir} was grafted on {name!r}, which is not a local model directory: {fix}")


def _is_transformers_class(name: str) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return isinstance(name, str) and name.isidentifier() and hasattr(getattr(transformers, name, None),
                                                                      "from_pretrained")


def load_hf(directory: Path, class_name: str | None = None) -> Any:
    """A Hugging Face model from a local directory, with the class it was saved as when known."""
    import transformers

    try:
        if class_name is None:
            config = transformers.AutoConfig.from_pretrained(str(directory))
            class_name = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, class_name, None) if _is_transformers_class(class_name or "") else None
        cls = cls if cls is not None else transformers.AutoModel
        model = cls.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError) as exc:
        raise CliFailure(f"cannot load a Hugging Face model from {directory}: {one_line(exc)}") from exc
    return model.eval()


#: graft.json base_model "builder" -> the function that rebuilds that base: a fixed table (the name is
#: data from the file and only ever looked up here, never imported or evaluated)
_BUILDERS = {"graftlib-demo": ("graftlib.tools.demo", "rebuild")}


def builder_of(meta: dict[str, Any]) -> str | None:
    """The builder a saved graft's base needs (``"graftlib-demo"``), or None for a Hugging Face model."""
    builder = (meta.get("base_model") or {}).get("builder")
    if builder is None:
        return None
    if builder not in _BUILDERS:
        known = ", ".join(sorted(_BUILDERS))
        raise CliFailure(f"graft.json names base builder {str(builder)[:40]!r}, which this graftlib does not "
                         f"know (known: {known}); load the graft in Python with graftlib.load(model, dir)")
    return builder


def base_model(graft_dir: Path, meta: dict[str, Any], model_dir: Path | None, fix: str) -> tuple[Any, Any]:
    """The module a saved graft sits on, and trace inputs for it (None: synthesised from the config):
    built by its builder (the demo's classifier) around `model_dir` or the directory graft.json names,
    or the Hugging Face model in `model_dir`, else in the directory graft.json names."""
    import importlib

    builder = builder_of(meta)
    if builder is not None:
        module_name, function = _BUILDERS[builder]
        from graftlib.tools.demo import DemoError

        try:
            return getattr(importlib.import_module(module_name), function)(meta["base_model"], graft_dir, model_dir)
        except DemoError as exc:
            raise CliFailure(str(exc)) from None
    class_name = (meta.get("base_model") or {}).get("class")
    if model_dir is None:
        model_dir, class_name = named_base(graft_dir, meta, fix)
    elif not (model_dir / "config.json").is_file():
        raise CliFailure(f"--model {model_dir} is not a Hugging Face model directory (no config.json)")
    return load_hf(model_dir, class_name), None


def output_problem(path: Path, option: str = "output") -> str | None:
    """Why a file cannot be written at `path` (checked before any work), or None: the path is a
    directory, a parent is a file, or the nearest existing parent directory is not writable."""
    if path.is_dir():
        return f"{option} {path} is a directory: give a file name such as {path / 'model.onnx'}"
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{option} {path}: {parent} is a file, not a directory; choose another path"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{option} {path}: cannot write in {parent} (permission denied); choose another path"
    return None
