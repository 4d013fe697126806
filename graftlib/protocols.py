"""What the engine's lower modules see of a grafted module: a record type and a Protocol.

    grafted.py (Grafted, apply)  ──imports──>  merge, io, combine, mixed, peft, diff  ──>  protocols.py

``merge``, ``io``, ``combine``, ``mixed``, ``peft`` and ``diff`` take a :class:`GraftedModule` (anything
with these members; :class:`graftlib.grafted.Grafted` is the one implementation) and never import
``Grafted``, so each can be read and tested without the façade, and ``Grafted``'s methods (``g.merge()``,
``g.save(dir)``, ...) are thin delegations to them. Where a lower module must make a grafted module from a
plain model (``graftlib.load``, ``graftlib.from_peft``) it calls :func:`new_grafted` / :func:`graft`, which
use the implementation ``graftlib.grafted`` provides when it is imported (``import graftlib`` does).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from torch import fx, nn

from .registry import get_method
from .spec import parse_spec
from .trace import trace

if TYPE_CHECKING:
    from .editor import AdapterStore
    from .trace import Traced

__all__ = ["GraftRecord", "GraftedModule", "named_spec", "provide", "is_grafted", "new_grafted", "graft"]


@dataclass
class GraftRecord:
    """One applied graft: enough to replay it on a fresh trace and to save it."""

    method: str
    adapter: str
    spec: str                       # the call's text, e.g. "lora(q,v,r=8)"
    config: dict[str, Any]
    sites: list[str]
    extras: dict[str, Any] = field(default_factory=dict)


def named_spec(record: GraftRecord) -> str:
    """The spec that rebuilds `record` (save, re-trace), with its adapter name."""
    replay = get_method(record.method).replay_spec(record)
    if replay is not None:
        return replay
    call = parse_spec(record.spec)[0]
    if "name" in call.options:
        return record.spec
    inner = record.spec[record.spec.index("(") + 1 : record.spec.rindex(")")].strip()
    sep = ", " if inner else ""
    return f"{call.method}({inner}{sep}name={record.adapter})"


class GraftedModule(Protocol):
    """The members of a grafted module that merge, io, combine, mixed, peft and diff use.

    Underscored members are engine-internal (the façade's state the lower modules share); user code and
    passes should use the public ones.
    """

    records: list[GraftRecord]
    training: bool
    retraceable: bool
    _traced: "Traced"                       # the trace: config, model_class, example_inputs, constants
    _model: nn.Module | None                # the user's model (never modified)
    _active: tuple[str, ...]
    _unpadded: bool
    _runtimes: dict[tuple, fx.GraphModule]  # built modules per (mode, adapters); mixed adds its own

    @property
    def store(self) -> "AdapterStore": ...
    @property
    def graph(self) -> fx.Graph: ...
    @property
    def graph_module(self) -> fx.GraphModule: ...
    @property
    def base_graph_module(self) -> fx.GraphModule: ...
    @property
    def base_graph(self) -> fx.Graph: ...
    @property
    def input_names(self) -> tuple[str, ...]: ...
    @property
    def adapters(self) -> dict[str, GraftRecord]: ...
    @property
    def active_adapters(self) -> tuple[str, ...]: ...

    def add(self, spec: str) -> "GraftedModule": ...
    def delete_adapter(self, name: str) -> None: ...
    def set_active(self, names: str | Iterable[str]) -> None: ...
    def runtime_module(self) -> fx.GraphModule: ...
    def _check_names(self, names: Iterable[str]) -> None: ...
    def _invalidate(self) -> None: ...
    def _finish(self) -> None: ...
    def _derived(self, graph: fx.Graph) -> "GraftedModule": ...
    def _variant(self, inputs: dict[str, Any], unpadded: bool = False) -> "GraftedModule": ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


# -- the implementation, provided by graftlib.grafted ------------------------------------------------
_IMPLEMENTATION: dict[str, Any] = {}


def provide(cls: type, apply: Callable[..., Any]) -> None:
    """Called once by ``graftlib.grafted``: the class of grafted modules and its ``apply``."""
    _IMPLEMENTATION.update(cls=cls, apply=apply)


def _implementation(key: str) -> Any:
    if key not in _IMPLEMENTATION:  # only when graftlib.grafted was never imported (import graftlib does)
        raise RuntimeError("no grafted-module implementation: import graftlib (graftlib.grafted provides it)")
    return _IMPLEMENTATION[key]


def is_grafted(obj: Any) -> bool:
    """Whether `obj` is a grafted module (rather than a plain model, a graph module or a trace)."""
    return bool(_IMPLEMENTATION) and isinstance(obj, _IMPLEMENTATION["cls"])


def new_grafted(model: nn.Module, example_inputs: Any = None, dynamic: bool = True) -> GraftedModule:
    """`model` traced, as a grafted module with no grafts yet (the model is not modified)."""
    return _implementation("cls")(trace(model, example_inputs, dynamic), model)


def graft(model: nn.Module, spec: str, example_inputs: Any = None, dynamic: bool = True) -> GraftedModule:
    """``graftlib.apply(model, spec, ...)``: on a grafted module, adds the grafts to it."""
    return _implementation("apply")(model, spec, example_inputs=example_inputs, dynamic=dynamic)
