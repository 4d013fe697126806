"""Bounds on untrusted input, and the process-wide trace lock.

Text from outside (specs, ``graft.json``, PEFT configs) can ask for a lot: a regex that backtracks for
ever, a range of 30 million layers, a rank of 2**63, a JSON file nested 100,000 deep. Each is refused here
with an error that states the bound:

- regexes run on the ``regex`` engine with a time bound (``REGEX_SECONDS`` per pattern, summed over all
  the paths it is matched against) and a length bound (``MAX_PATTERN``);
- numeric options are finite and inside ``OPTION_BOUNDS`` (any other integer option: ``|v| <= MAX_INT``);
- JSON files are at most ``MAX_JSON_BYTES`` and ``MAX_JSON_DEPTH`` deep;
- error messages are cut to ``MAX_MESSAGE`` characters (:func:`shorten`).

torch.export is not thread-safe: two threads tracing at once fail inside torch and can leave its global
"compiling" flags set. :func:`exclusive_trace` serialises every trace in the process and restores those
flags whatever happens.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import regex
import torch

from .errors import GraftError, LoadError
from .locks import TRACE_LOCK
from .text import MAX_MESSAGE, shorten

__all__ = ["REGEX_SECONDS", "MAX_PATTERN", "OPTION_BOUNDS", "MAX_INT", "MAX_JSON_BYTES", "MAX_JSON_DEPTH",
           "MAX_MESSAGE", "BoundedRegex", "regex_call", "option_bound_problem", "read_json", "loads_json", "shorten", "exclusive_trace",
           "TRACE_LOCK"]

REGEX_SECONDS = 0.5  # per pattern, summed over its matches: far above any real use (microseconds per name)
MAX_PATTERN = 2000
MAX_INT = 2**31 - 1
MAX_JSON_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32

# option -> (lowest, highest) inclusive; every float option is also finite
OPTION_BOUNDS: dict[str, tuple[float, float]] = {
    "r": (0, 4096), "init_r": (1, 4096), "target_r": (1, 4096), "rank": (1, 4096),
    "m": (1, 65536), "reduction": (1, 65536), "n": (1, 4096), "hidden": (1, 65536),
    "encoder_layers": (1, 16), "layers": (0, 100_000),
    "alpha": (-1e6, 1e6), "scale": (-1e6, 1e6), "temperature": (1e-6, 1e6),
    "seed": (0, 2**32 - 1), "dropout": (0.0, 1.0), "total_steps": (0, 10**9),
    "tinit": (0, 10**9), "tfinal": (0, 10**9), "delta_t": (1, 10**9),
}


def _shown(value: Any) -> str:
    return shorten(repr(value), 80)


def option_bound_problem(key: str, value: Any) -> str | None:
    """Why numeric option `key`=`value` is out of bounds (None when it is fine); tuples item by item."""
    if isinstance(value, tuple):
        if len(value) > 100_000:
            return f"has {len(value)} items; at most 100000"
        return next((p for p in (option_bound_problem(key, v) for v in value) if p), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    lo, hi = OPTION_BOUNDS.get(key, (-MAX_INT, MAX_INT))
    if not lo <= value <= hi:
        return f"is out of bounds: {key} must be in [{lo:g}, {hi:g}]"
    return None


class BoundedRegex:
    """A regex from untrusted text: compiled by the ``regex`` engine (``re`` syntax), matched under a
    time budget; a pattern that is too long, invalid or too slow raises `error` naming it."""

    def __init__(self, pattern: Any, what: str, error: Callable[[str], Exception] = LoadError,
                 seconds: float = REGEX_SECONDS):
        self.what, self.error, self.left = what, error, seconds
        if not isinstance(pattern, str):
            raise error(f"{what} {_shown(pattern)} must be a string (a regular expression)")
        if len(pattern) > MAX_PATTERN:
            raise error(f"{what} is {len(pattern)} characters long; at most {MAX_PATTERN}")
        self.pattern = pattern
        try:
            self.compiled = regex.compile(pattern, regex.VERSION0)
        except Exception as exc:  # regex.error, OverflowError, RecursionError, ...
            raise error(f"invalid {what} {_shown(pattern)}: {shorten(str(exc), 200)}") \
                from None

    def _run(self, method: str, text: str) -> Any:
        import time

        if self.left <= 0:
            self._slow()
        start = time.perf_counter()
        try:
            return getattr(self.compiled, method)(text, timeout=self.left)
        except TimeoutError:
            self._slow()
        finally:
            self.left -= time.perf_counter() - start

    def _slow(self) -> None:
        raise self.error(f"{self.what} {_shown(self.pattern)} takes more than {REGEX_SECONDS:g} s to match "
                         "(catastrophic backtracking?); simplify it")

    def fullmatch(self, text: str) -> Any:
        return self._run("fullmatch", text)

    def match(self, text: str) -> Any:
        return self._run("match", text)

    def search(self, text: str) -> Any:
        return self._run("search", text)


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> Any:
    return regex.compile(pattern, regex.VERSION0)


def regex_call(method: str, pattern: Any, text: str, what: str,
               error: Callable[[str], Exception] = LoadError) -> Any:
    """``regex.<method>(pattern, text)`` for an untrusted pattern (re syntax): invalid, too long or slower
    than REGEX_SECONDS on one text raises `error` naming `what`."""
    if not isinstance(pattern, str):
        raise error(f"{what} {_shown(pattern)} must be a string (a regular expression)")
    if len(pattern) > MAX_PATTERN:
        raise error(f"{what} is {len(pattern)} characters long; at most {MAX_PATTERN}")
    try:
        compiled = _compiled(pattern)
    except Exception as exc:  # regex.error, OverflowError, RecursionError, ...
        raise error(f"invalid {what} {_shown(pattern)}: {shorten(str(exc), 200)}") from None
    try:
        return getattr(compiled, method)(text, timeout=REGEX_SECONDS)
    except TimeoutError:
        raise error(f"{what} {_shown(pattern)} takes more than {REGEX_SECONDS:g} s to match "
                    "(catastrophic backtracking?); simplify it") from None


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _finite_constant(text: str) -> float:
    raise ValueError(f"{text} is not a finite number")


def read_json(path: Path, what: str) -> Any:
    """A JSON file from outside: at most MAX_JSON_BYTES, UTF-8, MAX_JSON_DEPTH deep, no NaN/Infinity."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise LoadError(f"{path} is {size} bytes; a {what} is at most {MAX_JSON_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {shorten(str(exc), 300)}") from None
    return loads_json(data, str(path), what)


def loads_json(data: bytes, source: str, what: str) -> Any:
    """JSON bytes from outside, with read_json's bounds; `source` names them in errors."""
    if len(data) > MAX_JSON_BYTES:
        raise LoadError(f"{source} is {len(data)} bytes; a {what} is at most {MAX_JSON_BYTES} bytes")
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_finite_constant)
    except RecursionError:
        raise LoadError(f"cannot read {source}: nested more than {MAX_JSON_DEPTH} deep") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LoadError(f"cannot read {source}: {shorten(str(exc), 300)}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise LoadError(f"cannot read {source}: nested more than {MAX_JSON_DEPTH} deep")
    return value


# -- the trace lock ---------------------------------------------------------------------------------
F = TypeVar("F", bound=Callable[..., Any])
_FLAGS = ("_is_compiling_flag", "_is_exporting_flag")


def exclusive_trace(function: F) -> F:
    """Run `function` (a tracer) holding the process-wide trace lock; torch's compile/export flags are
    restored afterwards on every path. A thread that waits more than 10 minutes gets a GraftError."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not TRACE_LOCK.acquire(timeout=600):
            raise GraftError("another thread has been tracing for 10 minutes; graftlib traces one model at "
                             "a time per process (torch.export is not thread-safe)")
        flags = {name: getattr(torch.compiler, name, None) for name in _FLAGS}
        try:
            return function(*args, **kwargs)
        finally:
            for name, value in flags.items():
                if value is not None:
                    setattr(torch.compiler, name, value)
            TRACE_LOCK.release()

    return run  # type: ignore[return-value]
