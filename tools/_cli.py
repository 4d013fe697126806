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

__all__ = ["CliFailure", "one_line", "run_guarded", "named_base", "output_problem"]


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
        raise CliFailure(f"{graft_dir}/graft.json does not name its base model: {fix}")
    for candidate in (Path(name), graft_dir / name):
        if (candidate / "config.json").is_file():
            return candidate, base.get("class")
    raise CliFailure(f"{graft_dir} was grafted on {name!r}, which is not a local model directory: {fix}")


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
