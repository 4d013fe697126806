"""The errors graftlib raises. Each message names the problem and the fix."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

from .text import caret_block, shorten

__all__ = ["GraftError", "GraftSpecError", "TraceError", "LoadError", "near_names", "did_you_mean",
           "require_eager"]


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


#: names users bring from PEFT or papers -> graftlib's option names (suggested when the option exists)
SYNONYMS: dict[str, str] = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                            "use_rslora": "rslora", "num_virtual_tokens": "n", "layers_to_transform": "layers",
                            "adapter_name": "name", "bottleneck": "m", "reduction_factor": "reduction"}


def did_you_mean(name: str, candidates: Iterable[str], what: str, limit: int = 30,
                 listed: Iterable[str] | None = None) -> str:
    """"did you mean 'lora'? all 7 methods: adalora, ..." - the close matches among `candidates` (if any),
    then the whole list (`listed`, default the candidates) labelled as the whole list: its first `limit`
    names and a count of the rest when it is long."""
    pool = sorted(set(candidates))
    close = [SYNONYMS[name]] if SYNONYMS.get(name) in pool else []
    close = close or difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    if not close:  # a prefix or substring typo: "lor" -> lora, "query" -> ...attention.self.query
        close = [c for c in pool if name and (c.startswith(name) or name in c)][:3]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    full = pool if listed is None else list(dict.fromkeys(listed))
    if not full:
        return f"{hint}there are no {what}"
    shown = ", ".join(full[:limit])
    more = f", ... ({len(full) - limit} more)" if len(full) > limit else ""
    return f"{hint}all {len(full)} {what}: {shown}{more}"


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
