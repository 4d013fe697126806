"""The spec language: parsed, never evaluated.

    spec    := graft ("+" graft)*
    graft   := METHOD "(" [item ("," item)*] ")"
    item    := target | KEY "=" value
    target  := NAME | "quoted.glob.*" | re:"regex"
    value   := INT | FLOAT | true | false | NAME | "string" | PREFIX:"string" | INT-INT | [INT, ...]

Examples: ``lora(q,v,r=16)``, ``lora("encoder.layer.*.attention.self.query", r=4)``,
``lora(re:"h\\.[0-3]\\.attn", r=8) + adapter(ffn, m=32, name=task)``.
Errors are :class:`GraftSpecError` with a caret under the offending column.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import GraftSpecError
from .safety import BoundedRegex

__all__ = ["Target", "Prefixed", "GraftCall", "parse_spec", "MAX_SPEC", "MAX_DEPTH", "MAX_DIGITS", "MAX_RANGE"]

MAX_SPEC = 100_000   # characters in a spec
MAX_DEPTH = 8        # nesting of [...] lists
MAX_DIGITS = 20      # digits in a number literal
MAX_RANGE = 100_000  # values in a range lo-hi


@dataclass(frozen=True)
class Prefixed:
    """A value written ``prefix:"text"``, e.g. ``text:"Classify if ..."``."""

    prefix: str
    text: str


@dataclass(frozen=True)
class Target:
    """One positional item: an alias (``q``), a glob (``"a.*.b"``) or a regex (``re:"..."``)."""

    kind: str  # "name" | "glob" | "regex"
    text: str
    column: int


@dataclass
class GraftCall:
    """One ``method(...)`` term of a spec, with the columns of its parts for error messages."""

    method: str
    targets: list[Target]
    options: dict[str, Any]
    option_columns: dict[str, int]
    column: int
    source: str
    end: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.source[self.column : self.end]

    def error(self, message: str, column: int | None = None) -> GraftSpecError:
        return GraftSpecError(message, self.source, self.column if column is None else column)

    def option_error(self, key: str, message: str) -> GraftSpecError:
        return self.error(message, self.option_columns.get(key, self.column))


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<range>\d+-\d+)(?![\w.])
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)(?![\w])
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<name>[A-Za-z_*][\w\-.*]*)
  | (?P<punct>[(),=+:\[\]])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    column: int


def _tokenize(spec: str) -> list[_Tok]:
    tokens, pos = [], 0
    while pos < len(spec):
        match = _TOKEN.match(spec, pos)
        if match is None:
            if spec[pos] in "\"'":
                raise GraftSpecError("unterminated string: add the closing quote", spec, pos)
            raise GraftSpecError(f"unexpected character {spec[pos]!r}", spec, pos)
        kind = match.lastgroup or ""
        if kind != "ws":
            tokens.append(_Tok(kind, match.group(), pos))
        pos = match.end()
    tokens.append(_Tok("end", "", len(spec)))
    return tokens


def _unquote(text: str) -> str:
    """Strip the quotes; only an escaped quote is unescaped, so regexes keep their backslashes."""
    quote = text[0]
    return text[1:-1].replace("\\" + quote, quote)


class _Parser:
    def __init__(self, spec: str):
        self.spec = spec
        self.tokens = _tokenize(spec)
        self.i = 0

    @property
    def tok(self) -> _Tok:
        return self.tokens[self.i]

    def fail(self, message: str, tok: _Tok | None = None) -> GraftSpecError:
        return GraftSpecError(message, self.spec, (tok or self.tok).column)

    def expect(self, text: str, hint: str) -> _Tok:
        tok = self.tok
        if tok.text != text or tok.kind not in ("punct",):
            found = "end of spec" if tok.kind == "end" else repr(tok.text)
            raise self.fail(f"expected {text!r} {hint}, found {found}")
        self.i += 1
        return tok

    def parse(self) -> list[GraftCall]:
        if self.tok.kind == "end":
            raise self.fail('empty spec: write a method call such as lora(q,v,r=16)')
        calls = [self.graft()]
        while self.tok.text == "+":
            self.i += 1
            calls.append(self.graft())
        if self.tok.kind != "end":
            raise self.fail("expected '+' between grafts or the end of the spec")
        return calls

    def graft(self) -> GraftCall:
        head = self.tok
        if head.kind != "name" or not re.fullmatch(r"[A-Za-z_]\w*", head.text):
            raise self.fail("expected a method name such as lora, adapter or prefix")
        self.i += 1
        self.expect("(", f"after the method name {head.text!r}")
        call = GraftCall(head.text, [], {}, {}, head.column, self.spec)
        if self.tok.text != ")":
            self.item(call)
            while self.tok.text == ",":
                self.i += 1
                self.item(call)
        close = self.expect(")", "to close the argument list (or ',' between arguments)")
        call.end = close.column + 1
        return call

    def item(self, call: GraftCall) -> None:
        tok = self.tok
        nxt = self.tokens[min(self.i + 1, len(self.tokens) - 1)]
        if tok.kind == "name" and nxt.text == "=":
            if tok.text in call.options:
                raise self.fail(f"option {tok.text!r} is given twice", tok)
            self.i += 2
            call.options[tok.text] = self.value()
            call.option_columns[tok.text] = tok.column
            return
        if tok.kind == "name" and nxt.text == ":":
            value = self.value()
            if not isinstance(value, Prefixed) or value.prefix != "re":
                raise self.fail('a prefixed target must be re:"regex"', tok)
            BoundedRegex(value.text, "regular expression", lambda m: self.fail(m, tok))
            call.targets.append(Target("regex", value.text, tok.column))
            return
        if tok.kind == "name":
            self.i += 1
            kind = "glob" if "*" in tok.text else "name"
            call.targets.append(Target(kind, tok.text, tok.column))
            return
        if tok.kind == "string":
            self.i += 1
            call.targets.append(Target("glob", _unquote(tok.text), tok.column))
            return
        if tok.kind == "end":
            raise self.fail("unexpected end of spec: close the argument list with ')'")
        raise self.fail("expected a target (q, v, \"path.*\", re:\"...\") or an option key=value")

    def number(self, tok: _Tok) -> int | float:
        text = tok.text
        if sum(c.isdigit() for c in text.split("e")[0].split("E")[0]) > MAX_DIGITS:
            raise self.fail(f"number {text[:30]}... has more than {MAX_DIGITS} digits", tok)
        if not any(c in text for c in ".eE"):
            return int(text)
        value = float(text)
        if not math.isfinite(value):
            raise self.fail(f"number {text[:30]} is too large (not a finite float)", tok)
        return value

    def value(self, depth: int = 0) -> Any:
        tok = self.tok
        self.i += 1
        if tok.kind == "number":
            return self.number(tok)
        if tok.kind == "range":
            lo, hi = (self.number(_Tok("number", part, tok.column)) for part in tok.text.split("-"))
            if hi < lo:
                raise self.fail(f"range {tok.text} runs backwards: write {hi}-{lo}", tok)
            if hi - lo + 1 > MAX_RANGE:
                raise self.fail(f"range {tok.text} has {hi - lo + 1} values; at most {MAX_RANGE}", tok)
            return tuple(range(lo, hi + 1))
        if tok.kind == "string":
            return _unquote(tok.text)
        if tok.kind == "name":
            if self.tok.text == ":":
                self.i += 1
                body = self.tok
                if body.kind != "string":
                    raise self.fail(f'expected a quoted string after {tok.text}:', body)
                self.i += 1
                return Prefixed(tok.text, _unquote(body.text))
            low = tok.text.lower()
            if low in ("true", "false"):
                return low == "true"
            return tok.text
        if tok.text == "[":
            if depth >= MAX_DEPTH:
                raise self.fail(f"lists nested more than {MAX_DEPTH} deep", tok)
            items: list[Any] = []
            if self.tok.text != "]":
                items.append(self.value(depth + 1))
                while self.tok.text == ",":
                    self.i += 1
                    items.append(self.value(depth + 1))
                    if len(items) > MAX_RANGE:
                        raise self.fail(f"a list has more than {MAX_RANGE} items", tok)
            self.expect("]", "to close the list")
            return tuple(items)
        self.i -= 1
        found = "end of spec" if tok.kind == "end" else repr(tok.text)
        raise self.fail(f"expected a value after '=', found {found}")


def parse_spec(spec: str) -> list[GraftCall]:
    """Parse a spec string into its graft calls; raises :class:`GraftSpecError` with a caret."""
    if not isinstance(spec, str):
        raise GraftSpecError(f"a spec is a string such as 'lora(q,v,r=16)', not {type(spec).__name__}")
    if len(spec) > MAX_SPEC:
        raise GraftSpecError(f"the spec is {len(spec)} characters long; at most {MAX_SPEC}")
    return _Parser(spec).parse()
