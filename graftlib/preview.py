"""``graftlib.select(model, spec)``: the sites each graft of a spec would touch, changing nothing.

A dry run over the method registry: it sits above ``select.py`` (site discovery, which methods use)
and ``registry.py`` (the methods), so neither needs the other's caller.
"""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from .protocols import is_grafted
from .registry import get_method
from .select import Selection, SiteIndex
from .spec import parse_spec
from .trace import trace

__all__ = ["select"]


def select(model_or_graph: nn.Module | fx.GraphModule, spec: str, example_inputs: Any = None) -> list[Selection]:
    """The sites each graft of ``spec`` would touch, without changing anything (a dry run)."""
    if is_grafted(model_or_graph):
        gm = model_or_graph.base_graph_module
    elif isinstance(model_or_graph, fx.GraphModule):
        gm = model_or_graph
    else:
        gm = trace(model_or_graph, example_inputs).graph_module
    index = SiteIndex.build(gm)
    out = []
    for call in parse_spec(spec):
        method = get_method(call)
        config = method.configure(call, index)
        out.append(method.select(call, index, config))
    return out
