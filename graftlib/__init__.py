"""graftlib: parameter-efficient fine-tuning as graph surgery.

    g = graftlib.apply(model, "lora(q,v,r=16)")   # trace, select sites, graft
    g.merge()                                      # fold deltas into the weights
"""
from __future__ import annotations

from . import diff  # the package is callable: graftlib.diff(before, after) -> GraphDiff
from .errors import GraftError, GraftSpecError, LoadError, TraceError
from .export import export_onnx
from .grafted import Grafted, GraftRecord, apply
from .onnx_generate import onnx_generate
from .io import load, save
from .peft import from_peft, save_peft
from .preview import select
from .spec import parse_spec
from .trace import Traced, example_inputs_for, trace

__all__ = [
    "apply", "trace", "select", "load", "save", "parse_spec", "example_inputs_for", "from_peft", "save_peft",
    "export_onnx", "diff", "onnx_generate",
    "Grafted", "GraftRecord", "Traced",
    "GraftError", "GraftSpecError", "LoadError", "TraceError",
]
__version__ = "0.1.0"
