"""Methods (lora, adapter, prefix, ...) and their option schemas.

A method is a pass: ``configure`` validates the spec's options, ``select`` picks sites (pure),
``rewrite`` edits the graph at one site through an :class:`~graftlib.editor.Editor`, and mergeable
methods give ``delta`` (the weight change to fold in).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .errors import GraftSpecError, did_you_mean
from .names import name_check
from .safety import option_bound_problem, shorten
from .spec import GraftCall

if TYPE_CHECKING:
    from .editor import Editor
    from .select import Selection, SiteIndex
    from .sites import Site

__all__ = ["Option", "Method", "register", "get_method", "methods", "positive", "in_range"]


@dataclass(frozen=True)
class Option:
    """One ``key=value`` a method accepts."""

    default: Any
    types: tuple[type, ...]
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def in_range(lo: float, hi: float, hi_open: bool = True) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = lo <= value < hi if hi_open else lo <= value <= hi
        return None if ok else f"must be in [{lo}, {hi}{')' if hi_open else ']'}"
    return check


COMMON_OPTIONS: dict[str, Option] = {
    "name": Option("default", (str,), check=name_check, help="adapter name ([A-Za-z_][A-Za-z0-9_-]{0,63})"),
    "layers": Option(None, (int, tuple), help="layer indices: 3, 0-5 or [0,2,4]"),
}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a name or string",
               tuple: "a range like 0-5 or a list like [0,2]"}


class Method:
    """Base class of a graft method; subclasses set the class attributes and override the hooks."""

    name: ClassVar[str]
    site_kinds: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, Option]] = {}
    mergeable: ClassVar[bool] = False
    needs_targets: ClassVar[bool] = True
    #: True for rewrites of the base model itself (quantisation): no joins, kept when adapters are
    #: disabled, not deletable; their nodes that stand for a weight are tagged ``role="weight"``.
    base_rewrite: ClassVar[bool] = False
    #: False when the adapter's tensors are derived from the base weights (quantised weights): a save
    #: leaves them out and a load rebuilds them from the model.
    saves_tensors: ClassVar[bool] = True

    # -- configure -----------------------------------------------------------------------------
    def configure(self, call: GraftCall, index: "SiteIndex | None" = None) -> dict[str, Any]:
        schema = {**COMMON_OPTIONS, **self.options}
        for key in call.options:
            if key not in schema:
                raise call.option_error(
                    key, f"{self.name} has no option {key!r}; "
                         f"{did_you_mean(key, schema, f'options of {self.name}')}")
        config: dict[str, Any] = {}
        for key, option in schema.items():
            value = call.options.get(key, option.default)
            if key in call.options:
                value = self._coerce(call, key, value, option)
            config[key] = value
        if self.needs_targets and not call.targets:
            raise call.error(f"{self.name}(...) needs at least one target, e.g. {self.name}(q,v)")
        if config["layers"] is not None:
            layers = (config["layers"],) if isinstance(config["layers"], int) else tuple(config["layers"])
            known = index.layers if index is not None else None
            if known is not None:
                missing = [layer for layer in layers if layer not in known]
                if missing:
                    span = f"{known[0]}-{known[-1]}" if known else "none"
                    raise call.option_error(
                        "layers", f"layers {missing} out of range: this model has layers {span}")
            config["layers"] = layers
        self.validate(call, config)
        return config

    @staticmethod
    def _coerce(call: GraftCall, key: str, value: Any, option: Option) -> Any:
        if float in option.types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in option.types:
            ok = False
        else:
            ok = isinstance(value, option.types)
        if not ok:
            wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in option.types)
            raise call.option_error(key, f"{key}={value!r}: expected {wanted}")
        if option.choices is not None and value not in option.choices:
            raise call.option_error(
                key, f"{key}={value!r} is not one of {', '.join(option.choices)}")
        if option.check is not None:
            problem = option.check(value)
            if problem:
                raise call.option_error(key, f"{key}={value!r} {problem}")
        bound = option_bound_problem(key, value)  # after the method's own check: its message comes first
        if bound:
            raise call.option_error(key, f"{key}={shorten(repr(value), 60)} {bound}")
        return value

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        """Cross-option checks; raise ``call.option_error(...)``."""

    # -- select / rewrite / merge ----------------------------------------------------------------
    def select(self, call: GraftCall, index: "SiteIndex", config: dict[str, Any]) -> "Selection":
        from .select import resolve_targets

        return resolve_targets(call, index, self.site_kinds, config.get("layers"))

    def check_site(self, call: GraftCall, site: "Site", config: dict[str, Any]) -> None:
        """Refuse a selected site the method cannot handle (raise ``call.error``)."""

    def rewrite(self, editor: "Editor", site: "Site", config: dict[str, Any]) -> None:
        raise NotImplementedError

    def replay_spec(self, record: Any) -> str | None:
        """The spec that rebuilds `record`'s graft when it is saved or re-traced, where it must differ from
        the one the user wrote (a graft that read outside data to find its sites); None: that one."""
        return None

    def depends_on(self, spec: str) -> list[str]:
        """Names of other adapters a graft of this method reads (fusion reads the adapters it fuses)."""
        return []

    def delta(self, site: "Site", params: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
        """The change to ``site``'s weight (same layout as the stored weight, or its ``span`` slice)."""
        raise NotImplementedError(f"{self.name} is not mergeable")

    def merge_deltas(self, site: "Site", params: dict[str, torch.Tensor], config: dict[str, Any],
                     weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight change, bias change or None) given the site's current weight and bias (its ``span``
        slice; bias None when the op has none). Multiplicative methods (DoRA, IA3) override this; the
        default is the additive ``delta`` (which reads the weight where ``delta_reads_weight``: OFT)."""
        reads = {"weight": weight} if getattr(self, "delta_reads_weight", False) else {}
        return self.delta(site, params, config, **reads), None


_METHODS: dict[str, Method] = {}
_PASS_MODULES = ("lora", "adalora", "adapter", "fusion", "prompt", "ptuning", "prefix", "replace", "quantize",
                 "loha", "lokr", "oft", "ia3", "vera", "lora_param", "tokens")


def register(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls()
    return cls


def _load_passes() -> None:
    for module in _PASS_MODULES:
        try:
            importlib.import_module(f"graftlib.passes.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"graftlib.passes.{module}":
                raise


_LOADED: list[bool] = []


def methods() -> dict[str, Method]:
    # a flag, not "if not _METHODS": importing one pass (or registering a method) first must not
    # hide the others
    if not _LOADED:
        _load_passes()
        _LOADED.append(True)
    return _METHODS


def get_method(call: GraftCall | str) -> Method:
    name = call.method if isinstance(call, GraftCall) else call
    table = methods()
    if name not in table:
        message = f"unknown method {name!r}; {did_you_mean(name, table, 'methods')}"
        if isinstance(call, GraftCall):
            raise call.error(message)
        raise GraftSpecError(message)
    return table[name]
