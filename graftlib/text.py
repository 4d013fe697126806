"""Showing untrusted text in messages: cut to a length, and a caret under a column of a spec line.

The caret is placed by display width: a spec from a config file may hold newlines (only the line with
the error is shown, with its line number), tabs (shown as 4 spaces), wide characters (2 cells), combining
marks (0 cells) and control characters (shown escaped, e.g. ``\\x00``).
"""
from __future__ import annotations

import unicodedata

__all__ = ["MAX_MESSAGE", "shorten", "caret_block"]

MAX_MESSAGE = 2000
_WINDOW = 100  # display cells shown around the caret


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut to about `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    keep = max(limit - 40, 10)
    return f"{text[:keep]}... [{len(text) - keep} more characters]"


def _cell(char: str) -> str:
    if char == "\t":
        return "    "
    if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
        return repr(char)[1:-1]
    return char


def _width(shown: str) -> int:
    total = 0
    for char in shown:
        if unicodedata.combining(char):
            continue
        total += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return total


def caret_block(spec: str, column: int) -> str:
    """Two indented lines: the line of `spec` holding `column` (cut to a window around it) and a caret
    under that column."""
    column = max(0, min(column, len(spec)))
    start = spec.rfind("\n", 0, column) + 1
    end = spec.find("\n", column)
    end = len(spec) if end == -1 else end
    cells = [_cell(c) for c in spec[start:end]]
    offset = column - start
    before, after = cells[:offset], cells[offset:]
    lead = ""
    while before and _width("".join(before)) > _WINDOW:
        before = before[len(before) // 4 or 1:]
        lead = "..."
    tail = "".join(after)
    if len(tail) > _WINDOW:
        tail = tail[:_WINDOW] + "..."
    line_no = spec.count("\n", 0, start) + 1
    label = f"line {line_no}: " if "\n" in spec else ""
    prefix = f"  {label}{lead}"
    shown = prefix + "".join(before)
    return f"{shown}{tail}\n{' ' * _width(shown)}^"
