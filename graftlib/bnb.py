"""Models already quantised by bitsandbytes: their ``Linear4bit`` layers become graftlib's NF4.

    Linear4bit(weight=Params4bit(packed, quant_state))  ->  linear(x, dequant(packed, qabsmax, absmax2, offset), b)

``graftlib.apply(bnb_model, "lora(q,v,r=16)")`` traces a copy of the model in which every 4-bit
layer is a plain ``nn.Linear`` whose weight is a stand-in of one element carrying the layer's own
packed codes and double-quantised absmax (no re-quantisation: bitsandbytes' tensors are read as
they are, they are the same layout graftlib stores), and grafts ``quantize("<layer>", ..., bits=4)``
in front of the spec, which reads those tensors. The user's model is not modified. bitsandbytes is
not imported: layers are recognised by their weight's ``quant_state``.

Supported: NF4, block size 64, double quantisation (``bnb_4bit_use_double_quant=True``), the
layout before bitsandbytes' CPU inference repacking (an eval-mode forward on CPU repacks the weight
and rounds the absmax to bf16 in place; load the model again and graft before running it).
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from .errors import GraftError, GraftSpecError
from .spec import GraftCall, parse_spec

__all__ = ["PREQUANTISED", "prequantised_layers", "from_bitsandbytes", "with_bitsandbytes_layers"]

#: attribute of a stand-in weight holding the NF4 tensors the quantize pass stores as they are
PREQUANTISED = "_graftlib_nf4_state"

_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def prequantised_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> bitsandbytes 4-bit layer (a module whose ``weight`` has a ``quant_state``)."""
    return {path: module for path, module in model.named_modules()
            if getattr(getattr(module, "weight", None), "quant_state", None) is not None}


def _state(path: str, module: nn.Module) -> tuple[dict[str, torch.Tensor], tuple[int, int], torch.dtype]:
    """The layer's NF4 tensors in graftlib's names, its (out, in) shape and dtype; GraftError naming
    the layer for anything graftlib's NF4 does not hold."""
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise GraftError(f"{path}: bitsandbytes repacked this layer for CPU inference (an eval-mode forward "
                         "on CPU; its absmax is bf16 now): load the model again and graft it before running it")
    problems = [f"{name} {got!r} (graftlib reads {want!r})" for name, got, want in (
        ("quant_type", state.quant_type, "nf4"), ("blocksize", state.blocksize, 64),
        ("double quantisation", bool(state.nested), True))
        if got != want]
    if not problems and (state.state2.blocksize != 256 or len(state.shape) != 2):
        problems.append(f"second-level block size {state.state2.blocksize} / shape {tuple(state.shape)}")
    if problems:
        raise GraftError(f"{path}: bitsandbytes layer with {', '.join(problems)}: quantise it with "
                         "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
                         "bnb_4bit_use_double_quant=True), or graft the full-precision model with quantize(...)")
    packed = module.weight.data
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    tensors = {"packed": packed.reshape(-1), "qabsmax": state.absmax.reshape(-1),
               "absmax2": state.state2.absmax.reshape(-1).float(), "offset": state.offset.float().reshape(())}
    return tensors, (int(state.shape[0]), int(state.shape[1])), state.dtype


def _stand_in(path: str, module: nn.Module) -> nn.Linear:
    tensors, (out_features, in_features), dtype = _state(path, module)
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    weight = nn.Parameter(torch.zeros((), dtype=dtype).expand(out_features, in_features), requires_grad=False)
    setattr(weight, PREQUANTISED, tensors)
    linear.weight = weight
    bias = getattr(module, "bias", None)
    if bias is not None:
        linear.bias = bias
    else:
        linear.register_parameter("bias", None)
    return linear


def from_bitsandbytes(model: nn.Module) -> tuple[nn.Module, list[str]] | None:
    """A copy of `model` (sharing every other tensor) whose 4-bit layers are stand-in ``nn.Linear``s,
    and their paths; None when the model has no bitsandbytes 4-bit layer."""
    layers = prequantised_layers(model)
    if not layers:
        return None
    for path in layers:
        if not _PATH.fullmatch(path):
            raise GraftError(f"bitsandbytes layer {path[:80]!r}: graftlib reads layers whose path is made of "
                             "letters, digits, '_' and '.'")
    memo: dict[int, Any] = {id(module): _stand_in(path, module) for path, module in layers.items()}
    for tensor in list(model.parameters()) + list(model.buffers()):
        memo.setdefault(id(tensor), tensor)
    return copy.deepcopy(model, memo), list(layers)


def with_bitsandbytes_layers(spec: str, paths: list[str]) -> str:
    """`spec` with the quantize call that reads the layers' own tensors in front (unless a saved graft
    already starts with it)."""
    call = "quantize(" + ", ".join(f'"{path}"' for path in paths) + ", bits=4)"
    calls = parse_spec(spec)
    if calls and _reads_layers(calls[0], paths):  # a saved graft of a bitsandbytes model
        return spec
    for parsed in calls:
        if parsed.method == "quantize":
            raise GraftSpecError("the model's bitsandbytes 4-bit layers are quantised already (graftlib reads "
                                 "their NF4 tensors as they are): leave quantize(...) out of the spec",
                                 parsed.source, parsed.column)
    return f"{call} + {spec}"


def _reads_layers(call: GraftCall, paths: list[str]) -> bool:
    """Whether `call` is the quantize call :func:`with_bitsandbytes_layers` writes (as g.save stores it)."""
    return (call.method == "quantize" and [(t.kind, t.text) for t in call.targets] == [("glob", p) for p in paths]
            and call.options.get("bits") == 4 and call.options.get("name", "quantize") == "quantize"
            and set(call.options) <= {"bits", "name"})
