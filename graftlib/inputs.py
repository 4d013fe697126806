"""Calls with fewer inputs, or other integer dtypes, than the trace: conform them to the existing graph.

A Hugging Face model traced with ``input_ids, attention_mask, token_type_ids`` is usually called with
the first two only; the model computes the omitted ones. Rather than tracing a new graph for that key
set (which ``torch.compile`` cannot do), the call is completed with the value the model would compute::

    g(input_ids=x, attention_mask=m)    ->  graph(input_ids=x, attention_mask=m,
                                                  token_type_ids=<model's buffer>[:, :S].expand(B, S))
    g(input_ids=x.int(), attention_mask=m.bool())  ->  graph(input_ids=x.long(), attention_mask=m.long())

Defaults are filled only where the model's own code provably computes that value when the input is
None (checked once, when the module is built, see :func:`input_defaults`):

- ``token_type_ids`` (BERT family): ``forward`` defaults it to None, and the embeddings then read their
  registered ``token_type_ids`` buffer, ``buffer[:, :S].expand(B, S)`` (all zeros in every released
  model); with no buffer, zeros.
- ``attention_mask``: ``forward`` defaults it to None, which Hugging Face treats as "every token kept",
  the same as an all-ones mask.

Integer and bool tensors are cast to the traced dtype (int32 ids, bool masks); a floating mask (1.0 /
0.0, as tokenizers' ``return_tensors`` may give) is cast to an integer traced mask. Anything else is
passed unchanged, so a real mismatch still fails loudly.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .trace import Traced

__all__ = ["InputDefault", "input_defaults", "conform_inputs"]

_INTEGRAL = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class InputDefault:
    """How to build an omitted input from the call's reference tensor's (B, S)."""

    kind: str                          # "buffer" (slice of the model's buffer), "zeros" or "ones"
    dtype: torch.dtype
    buffer: torch.Tensor | None = None  # (1, P) for kind == "buffer"

    def build(self, reference: torch.Tensor) -> torch.Tensor:
        batch, seq = reference.shape[0], reference.shape[1]
        if self.kind == "buffer":
            assert self.buffer is not None
            return self.buffer.to(reference.device)[:, :seq].expand(batch, seq)  # as BertEmbeddings does
        fill = torch.zeros if self.kind == "zeros" else torch.ones
        return fill((batch, seq), dtype=self.dtype, device=reference.device)


def _defaults_to_none(traced: Traced, name: str) -> bool:
    signature = traced.signature
    if signature is None or name not in signature.parameters:
        return False
    return signature.parameters[name].default is None


def _token_type_buffer(model: nn.Module) -> torch.Tensor | None:
    for name, buffer in model.named_buffers():
        if name.rpartition(".")[2] == "token_type_ids" and buffer.dim() == 2 and buffer.shape[0] == 1:
            return buffer
    return None


def input_defaults(traced: Traced, model: nn.Module | None) -> dict[str, InputDefault]:
    """The traced inputs a call may omit, with the value the model computes for them."""
    if traced.config is None or model is None:
        return {}
    defaults: dict[str, InputDefault] = {}
    for name in traced.input_names:
        example = traced.example_inputs.get(name)
        if not isinstance(example, torch.Tensor) or example.dim() != 2 or not _defaults_to_none(traced, name):
            continue
        if name == "token_type_ids":
            buffer = _token_type_buffer(model)
            if buffer is None:
                defaults[name] = InputDefault("zeros", example.dtype)
            elif not bool(buffer.any()):  # the released models' all-zero buffer: no tensor to keep
                defaults[name] = InputDefault("zeros", buffer.dtype)
            else:
                defaults[name] = InputDefault("buffer", buffer.dtype, buffer.detach().clone())
        elif name == "attention_mask":
            defaults[name] = InputDefault("ones", example.dtype)
    return defaults


def _reference(inputs: Mapping[str, Any]) -> torch.Tensor | None:
    for key in ("input_ids", "inputs_embeds"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value
    return None


def _compatible_cast(name: str, value: torch.Tensor, traced_dtype: torch.dtype) -> bool:
    """Integer ids and bool / integer / float masks convert as the eager model accepts them; an integer
    tensor for a float input (pixels, features) does not, and fails as it would eagerly."""
    if value.dtype in _INTEGRAL:
        return traced_dtype in _INTEGRAL or (traced_dtype.is_floating_point and name.endswith("mask"))
    return value.dtype.is_floating_point and traced_dtype in _INTEGRAL and name.endswith("mask")


def conform_inputs(traced: Traced, defaults: Mapping[str, InputDefault],
                   kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with omitted defaultable inputs filled in and integer / bool dtypes cast to the trace's."""
    out = dict(kwargs)
    missing = [n for n in defaults if out.get(n) is None]
    reference = _reference(out) if missing else None
    if reference is not None:
        for name in missing:
            out[name] = defaults[name].build(reference)
    for name, value in out.items():
        example = traced.example_inputs.get(name)
        if isinstance(value, torch.Tensor) and isinstance(example, torch.Tensor) \
                and value.dtype != example.dtype and _compatible_cast(name, value, example.dtype):
            out[name] = value.to(example.dtype)
    return out
