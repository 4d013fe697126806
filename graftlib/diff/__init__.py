"""Graph diff: what the passes inserted, removed and rerouted, site by site.

    graftlib.diff(base, grafted)                           ->  GraphDiff
    + encoder.layer.{0-11}.attention.self.query  lora[default]: linear(x,A) -> linear(.,B) -> add scale=2.0

Each side may be an ``nn.Module`` (traced with :func:`graftlib.trace`), a :class:`~graftlib.Traced`, an
``fx.GraphModule``, a :class:`~graftlib.Grafted` (its runtime graph, merged modules included), an
``onnx.ModelProto`` or a ``.onnx`` path. Graphs are compared in eval mode unless ``training``. Formats:
``str(d)`` / :meth:`GraphDiff.format_text`, :meth:`~GraphDiff.to_json`, :meth:`~GraphDiff.to_dot`,
:meth:`~GraphDiff.to_html` (one self-contained page, inline SVG).

The package, one concern per module (arrows: imports)::

    build (diff(), the entry) -> views, match, chain, result
    result (GraphDiff)        -> text, dot, html -> model (records, DiffLike)
    views (fx / ONNX node lists) <- match, chain          html.css, html.js: package data of html

``graftlib.diff`` is this package and also callable: ``graftlib.diff(before, after)`` is
``graftlib.diff.diff(before, after)``.
"""
from __future__ import annotations

import sys
import types
from typing import Any

from .build import diff
from .model import HIGHLIGHT, ChainItem, Change, NodeRef, Reroute, SiteDiff
from .result import FORMAT_VERSION, GraphDiff

__all__ = ["diff", "GraphDiff", "SiteDiff", "NodeRef", "ChainItem", "Reroute", "Change", "HIGHLIGHT",
           "FORMAT_VERSION"]


class _CallablePackage(types.ModuleType):
    """``graftlib.diff(before, after)`` calls :func:`diff`; attributes are the package's."""

    def __call__(self, before: Any, after: Any, **options: Any) -> GraphDiff:
        return diff(before, after, **options)


sys.modules[__name__].__class__ = _CallablePackage
