"""replace(modules): a module's parameters replaced by the adapter's own copies (PEFT's modules_to_save).

    op(.., W, ..)  ->  op(.., expand_as(W', W), ..)      (W' starts as a copy of W)

``graftlib.from_peft`` loads a checkpoint's ``modules_to_save`` as this graft, named
``<adapter>_modules``; ``save_peft`` writes it back with its adapter. Not mergeable: it stays as nodes.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

from graftlib.editor import Editor, graft_tag
from graftlib.errors import GraftSpecError, did_you_mean
from graftlib.peft import _graph_parameters, _module_params
from graftlib.registry import Method, register
from graftlib.select import Selection, SiteIndex, target_matches
from graftlib.sites import Site, weight_value
from graftlib.spec import GraftCall

__all__ = ["Replace"]

aten = torch.ops.aten


@register
class Replace(Method):
    """``replace("classifier", name=x)``: the module's parameters replaced by the adapter's own copies.

        op(.., W, ..)  ->  op(.., expand_as(W', W), ..)      (W' starts as a copy of W)

    The join returns W' itself (a view, no copy per call), so a disabled adapter reads W again. This is
    how PEFT's ``modules_to_save`` are loaded; targets are module paths (names, quoted globs, re:"...").
    """

    name = "replace"
    needs_targets = False
    mergeable = False

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        if not call.targets:
            raise call.error('replace(...) needs the modules whose weights it replaces, e.g. replace("classifier")')

    def select(self, call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> Selection:
        kinds = _graph_parameters(index.graph_module)
        modules = sorted({t.rsplit(".", 1)[0] for t in kinds if "." in t})
        matched: dict[str, list[str]] = {}
        for target in call.targets:
            hits = [m for m in modules if target_matches(target, m)]
            if not hits:
                raise call.error(f"replace: {target.text!r} names no module with weights in this model; "
                                 f"{did_you_mean(target.text, modules, 'modules with weights')}", target.column)
            params = sorted({p for m in hits for p in _module_params(kinds, m)})
            buffers = [p for p in params if kinds[p] == "buffer"]
            if buffers:
                raise call.error(f"replace: not supported: {target.text!r} has buffers ({', '.join(buffers[:3])}); "
                                 "only parameters can be replaced", target.column)
            matched[target.text] = params
        return Selection(call, [], matched)

    def rewrite_graph(self, gm: fx.GraphModule, selection: Selection, config: dict[str, Any],
                      index: SiteIndex) -> None:
        targets = sorted({p for params in selection.matched.values() for p in params})
        getters = [n for n in gm.graph.nodes if n.op == "get_attr" and not graft_tag(n)]
        for target in targets:
            value = weight_value(gm, target)
            site = Site(target, "weights", target, 0, 0)
            for node in [n for n in getters if n.target == target]:
                editor = Editor(gm, self.name, config["name"], site, node)
                new = editor.param("value", lambda v=value: v.detach().clone())
                editor.join(node, aten.expand_as.default, new, node)
