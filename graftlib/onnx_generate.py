"""Greedy generation in onnxruntime with a decoder exported with past (``export_onnx(with_past=True)``).

The model has Optimum's layout: inputs ``input_ids (B, S)``, ``attention_mask (B, P+S)``,
``position_ids (B, S)``, ``past_key_values.{i}.key / .value (B, H_kv, P, D)``; outputs
``logits (B, S, V)``, ``present.{i}.key / .value (B, H_kv, P+S, D)``. The first call is the prefill
(empty past, ``P = 0``), every later call feeds one token and the presents back::

    session = onnxruntime.InferenceSession("decoder.onnx")
    ids = graftlib.onnx_generate(session, input_ids, attention_mask, max_new_tokens=32, eos_token_id=2)

Positions and the finished-row handling follow Hugging Face's greedy search: position ids are the
attention mask's cumulative sum minus one (0 on left padding), a row that produced ``eos_token_id``
continues with ``pad_token_id`` and the loop stops when every row has finished.
``past_free_generate`` is the same loop for a model without past inputs (it re-runs the whole sequence
each token): the benchmark's comparison.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["onnx_generate", "past_free_generate", "past_input_names", "present_output_names", "session_for"]


def past_input_names(layers: int) -> list[str]:
    """Optimum's past input names, key then value per layer."""
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_output_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def session_for(model: Any) -> Any:
    """An onnxruntime CPU session for a path (or the session itself)."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _positions(mask: np.ndarray) -> np.ndarray:
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 0, positions).astype(np.int64)


def _empty_past(session: Any, batch: int) -> dict[str, np.ndarray]:
    past = {}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            _, heads, _, dim = value.shape
            if not (isinstance(heads, int) and isinstance(dim, int)):
                raise ValueError(f"{value.name} has shape {value.shape}: heads and head dim must be static")
            dtype = np.float16 if "float16" in value.type else np.float32
            past[value.name] = np.zeros((batch, heads, 0, dim), dtype=dtype)
    if not past:
        raise ValueError("the ONNX model has no past_key_values.* inputs: export it with with_past=True")
    return past


def _pick(logits: np.ndarray, unfinished: np.ndarray, pad: int) -> np.ndarray:
    token = logits[:, -1].argmax(-1).astype(np.int64)
    return np.where(unfinished, token, pad)


def _stops(eos_token_id: int | Iterable[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, (int, np.integer)) else {int(t) for t in eos_token_id}


def onnx_generate(model: Any, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 20,
                  eos_token_id: int | Iterable[int] | None = None, pad_token_id: int = 0) -> np.ndarray:
    """Greedy decoding with the KV cache: the prompt once, then one token per call. Returns the prompt
    followed by the new tokens, ``(B, S + new)`` int64 (as Hugging Face's ``generate``)."""
    session = session_for(model)
    ids = _numpy(input_ids).astype(np.int64)
    mask = np.ones_like(ids) if attention_mask is None else _numpy(attention_mask).astype(np.int64)
    stops, names = _stops(eos_token_id), [o.name for o in session.get_outputs()]
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": _positions(mask),
            **_empty_past(session, ids.shape[0])}
    unfinished = np.ones(ids.shape[0], dtype=bool)
    out = ids
    for _ in range(max_new_tokens):
        results = dict(zip(names, session.run(None, feed)))
        token = _pick(results["logits"], unfinished, pad_token_id)
        out = np.concatenate([out, token[:, None]], axis=1)
        unfinished &= ~np.isin(token, list(stops))
        if not unfinished.any():
            break
        mask = np.concatenate([mask, np.ones_like(token)[:, None]], axis=1)
        feed = {"input_ids": token[:, None], "attention_mask": mask,
                "position_ids": feed["position_ids"][:, -1:] + 1}
        feed.update({k.replace("present.", "past_key_values."): v for k, v in results.items()
                     if k.startswith("present.")})  # (B, H_kv, P + 1, D)
    return out


def past_free_generate(model: Any, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 20,
                       eos_token_id: int | Iterable[int] | None = None, pad_token_id: int = 0) -> np.ndarray:
    """The same greedy loop for a model exported without past: the whole sequence every token."""
    session = session_for(model)
    ids = _numpy(input_ids).astype(np.int64)
    mask = np.ones_like(ids) if attention_mask is None else _numpy(attention_mask).astype(np.int64)
    inputs, stops = {i.name for i in session.get_inputs()}, _stops(eos_token_id)
    unfinished = np.ones(ids.shape[0], dtype=bool)
    for _ in range(max_new_tokens):
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": _positions(mask)}
        logits = session.run(None, {k: v for k, v in feed.items() if k in inputs})[0]
        token = _pick(logits, unfinished, pad_token_id)
        ids = np.concatenate([ids, token[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(token)[:, None]], axis=1)
        unfinished &= ~np.isin(token, list(stops))
        if not unfinished.any():
            break
    return ids
