"""The errors graftlib raises. Each message names the problem and the fix."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

from .text import caret_block, shorten

__all__ = ["GraftError", "GraftSpecError", "TraceError", "LoadError", "near_names", "require_eager"]


class GraftError(ValueError):
    """Base class of graftlib's user-facing errors."""


class GraftSpecError(GraftError):
    """A spec string that does not parse or names something that does not exist.

    The message shows the spec with a caret under the offending column.
    """

    def __init__(self, message: str, spec: str | None = None, column: int | None = None):
        self.reason = message
        self.spec = spec
        self.column = column
        message = shorten(str(message))
        if spec is not None and column is not None:
            message = f"{message}\n{caret_block(spec, column)}"
        super().__init__(message)


class TraceError(GraftError):
    """The model could not be traced into a graph."""


class LoadError(GraftError):
    """A saved graft or checkpoint could not be loaded; nothing was changed."""


def near_names(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """A short "did you mean" phrase listing the names closest to `name`."""
    pool = sorted(set(candidates))
    close = difflib.get_close_matches(name, pool, n=n, cutoff=0.4)
    if not close:
        close = pool[:n]
    return ", ".join(close) if close else "(none)"


def require_eager(what: str, fix: str) -> None:
    """Graph modules are built by eager Python, which torch.compile cannot trace (fullgraph or not):
    a module first needed under compile is an error that says how to build it beforehand."""
    import torch

    if torch.compiler.is_compiling() and not torch.compiler.is_dynamo_compiling():
        from .locks import TRACE_LOCK  # another thread's torch.export sets the process-wide flag

        with TRACE_LOCK:
            compiling = torch.compiler.is_compiling()
    else:
        compiling = torch.compiler.is_compiling()
    if compiling:
        raise GraftError(f"{what} is not built yet and cannot be built while torch.compile traces: {fix}")
