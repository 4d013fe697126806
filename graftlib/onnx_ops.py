"""ONNX translations for ops torch.onnx has none for, passed to it as ``custom_translation_table``.

    transformers::grouped_mm_fallback(x (S, K), W (G, K, N), offs (G,))     (the MoE experts' grouped matmul:
        rows of x sorted by expert, offs[g] = end row of expert g)          Mixtral, Qwen2-MoE, OLMoE, ...)
    ->  Concat_g( MatMul( Gather(x, Range(offs[g-1], offs[g])), W[g] ) )    (S, N)

The number of experts ``G`` is static, so the op unrolls into one ``MatMul`` per expert over its rows:
no ``(S, K, N)`` gather of per-row weights, and each expert's product is the plain matmul PyTorch's
fallback computes (``torch.mm`` per expert block). transformers traces this custom op when its
``grouped_mm`` experts implementation cannot use ``torch._grouped_mm`` (CPU, float32): without a
translation torch.onnx stops at "No ONNX function found for transformers.grouped_mm_fallback".
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["onnx_translations", "grouped_mm_onnx"]


def grouped_mm_onnx(mat_a: Any, mat_b: Any, offs: Any) -> Any:
    """ONNX graph of ``out[r] = mat_a[r] @ mat_b[group(r)]`` (onnxscript, traced by torch.onnx)."""
    from onnxscript.onnx_opset import opset18 as op

    experts = mat_b.shape[0]
    if not isinstance(experts, int):
        raise ValueError("grouped_mm: the number of experts (weight dim 0) must be static")

    def per_expert(value: Any) -> list[Any]:
        return list(op.Split(value, axis=0, num_outputs=experts)) if experts > 1 else [value]

    axes = op.Constant(value_ints=[0])
    one = op.Constant(value_int=1)
    ends, weights = per_expert(op.Cast(offs, to=7)), per_expert(mat_b)      # int64 (1,) each; (1, K, N) each
    start = op.Constant(value_ints=[0])
    outputs = []
    for g in range(experts):
        rows = op.Range(op.Squeeze(start, axes), op.Squeeze(ends[g], axes), one)          # expert g's rows
        outputs.append(op.MatMul(op.Gather(mat_a, rows, axis=0), op.Squeeze(weights[g], axes)))  # (n_g, N)
        start = ends[g]
    return op.Concat(*outputs, axis=0)                                                    # (S, N)


def onnx_translations() -> dict[Any, Callable[..., Any]]:
    """The table for ``torch.onnx.export(custom_translation_table=...)``: only ops registered in this process."""
    table: dict[Any, Callable[..., Any]] = {}
    namespace = getattr(torch.ops, "transformers")
    if hasattr(namespace, "grouped_mm_fallback"):
        table[namespace.grouped_mm_fallback.default] = grouped_mm_onnx
    return table
