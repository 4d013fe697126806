"""Unpadded batches: trace Hugging Face attention the way it runs eagerly when no token is padded.

Eager Hugging Face code looks at the attention mask's values: when every token is kept it calls SDPA with
no mask at all (``attn_mask=None``, ``is_causal=True`` for decoders), which selects a faster kernel. A
traced graph cannot branch on values, so torch.export always records the masked path::

    mask = build_mask(attention_mask)            sdpa(q, k, v, attn_mask=mask)        # traced graph
    attention_mask.all()  ->                     sdpa(q, k, v, is_causal=True)        # unpadded variant

The grafted module keeps both: the masked graph for padded batches, ONNX and ``torch.compile``, and a
second trace, made on the first unpadded call, with Hugging Face's mask skip forced on. Forcing it is
sound because the variant only ever runs on batches whose mask is all ones, the case where Hugging Face
itself skips. Sliding-window (local) attention keeps its mask, as it does eagerly.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any
from unittest import mock

import torch
from torch import fx

__all__ = ["UNPADDED", "assume_unpadded", "is_unpadded_call", "masked_attention_count"]

UNPADDED = "<unpadded>"  # marks a variant key; never an input name
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def is_unpadded_call(config: Any, inputs: Mapping[str, Any]) -> bool:
    """True when a Hugging Face model is called eagerly with a 2-D attention mask of all ones."""
    mask = inputs.get("attention_mask")
    if config is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False  # a compiled graph must not branch on values: it keeps the masked graph
    return bool(mask.all())


def _skip_causal_mask(padding_mask: Any, q_length: Any, kv_length: Any, q_offset: Any, kv_offset: Any,
                      local_attention_size: int | None = None) -> bool:
    return local_attention_size is None  # no padding and no cache: SDPA's is_causal is exact


def _skip_bidirectional_mask(padding_mask: Any, kv_length: Any, local_attention_size: int | None = None) -> bool:
    return local_attention_size is None


@contextlib.contextmanager
def assume_unpadded() -> Iterator[None]:
    """While tracing, make Hugging Face's mask builders skip the mask as they do for unpadded batches."""
    try:
        from transformers import masking_utils
    except ImportError:  # no transformers: nothing to patch
        yield
        return
    with contextlib.ExitStack() as stack:
        for name, replacement in (("_ignore_causal_mask_sdpa", _skip_causal_mask),
                                  ("_ignore_bidirectional_mask_sdpa", _skip_bidirectional_mask)):
            if hasattr(masking_utils, name):
                stack.enter_context(mock.patch.object(masking_utils, name, replacement))
        yield


def masked_attention_count(graph: fx.Graph) -> int:
    """How many SDPA calls in `graph` take an explicit attention mask."""
    count = 0
    for node in graph.nodes:
        if node.target is _SDPA:
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            count += mask is not None
    return count
