"""Front end: turn a model into the aten-level fx graph the passes rewrite.

``torch.export.export(strict=False)`` is the tracer (``torch.fx.symbolic_trace`` fails on Hugging Face
models). The model is traced in training mode so dropout and batch norm appear as explicit nodes; the
grafted module derives its eval-mode graph from this one. Weights are not copied: the graph module holds
the model's own parameter storage.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from .errors import TraceError

__all__ = ["Traced", "trace", "example_inputs_for"]

BATCH, SEQ, DEC_SEQ = 2, 7, 5  # example sizes; unusual values so no model dim coincides with them


@dataclass
class Traced:
    """A traced model: the graph module plus how to call it."""

    graph_module: fx.GraphModule
    input_names: tuple[str, ...]          # tensor keyword inputs the graph takes
    constants: dict[str, Any]             # non-tensor keyword inputs baked in at trace time
    example_inputs: dict[str, Any]
    model_class: str
    dynamic: bool
    signature: inspect.Signature | None = None
    config: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def _config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _forward_params(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def example_inputs_for(model: nn.Module, batch: int = BATCH, seq: int = SEQ) -> dict[str, Any]:
    """Synthesise keyword inputs for a Hugging Face model from its config.

    Token ids stay inside the vocabulary; pixel values take the configured image size; encoder-decoder
    models get decoder ids; decoders get ``use_cache=False`` (graphs return no KV cache).
    """
    config = _config(model)
    if config is None:
        raise TraceError(
            f"{type(model).__name__} has no Hugging Face config, so graftlib cannot invent inputs for it: "
            "pass example_inputs=(tensor, ...) or example_inputs={'name': tensor}"
        )
    params = _forward_params(model)
    text_cfg = getattr(config, "text_config", None) or config
    vision_cfg = getattr(config, "vision_config", None) or config
    generator = torch.Generator().manual_seed(0)
    inputs: dict[str, Any] = {}
    main = getattr(model, "main_input_name", "input_ids")
    if "input_ids" in params and (main == "input_ids" or "pixel_values" in params):
        vocab = int(getattr(text_cfg, "vocab_size", 0) or 100)
        inputs["input_ids"] = torch.randint(1, max(vocab, 2), (batch, seq), generator=generator)
        if "attention_mask" in params:
            inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
        if "token_type_ids" in params and getattr(text_cfg, "type_vocab_size", 0) > 1:
            inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    if "pixel_values" in params:
        size = getattr(vision_cfg, "image_size", 32)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        channels = getattr(vision_cfg, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(batch, channels, *size, generator=generator)
    if "input_features" in params and main == "input_features":
        mels = getattr(config, "num_mel_bins", 80)
        frames = 2 * getattr(config, "max_source_positions", 1500)
        inputs["input_features"] = torch.randn(batch, mels, frames, generator=generator)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        vocab = int(getattr(text_cfg, "vocab_size", 100))
        inputs["decoder_input_ids"] = torch.randint(1, vocab, (batch, DEC_SEQ), generator=generator)
    if "use_cache" in params:
        inputs["use_cache"] = False
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if not any(isinstance(v, torch.Tensor) for v in inputs.values()):
        raise TraceError(
            f"could not synthesise inputs for {type(model).__name__} (main input {main!r}): "
            "pass example_inputs={'name': tensor, ...}"
        )
    return inputs


def _as_kwargs(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    params = _forward_params(model)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values()):
        raise TraceError(
            f"{type(model).__name__}.forward takes *args, so positional example inputs cannot be named: "
            "pass example_inputs as a dict of keyword arguments"
        )
    try:
        bound = inspect.signature(model.forward).bind(*example_inputs)
    except TypeError as exc:
        raise TraceError(f"example_inputs do not fit {type(model).__name__}.forward: {exc}") from None
    return dict(bound.arguments)


def _dynamic_shapes(kwargs: Mapping[str, Any], dynamic: bool) -> dict[str, Any] | None:
    if not dynamic:
        return None
    shapes: dict[str, Any] = {}
    for name, value in kwargs.items():
        if not isinstance(value, torch.Tensor):
            shapes[name] = None
        else:
            shapes[name] = {axis: Dim.AUTO for axis in range(value.dim())}
    return shapes


@contextlib.contextmanager
def _training_mode(model: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in model.modules()}
    model.train()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)


_HINTS = (
    "pass example_inputs matching how you call the model",
    "try dynamic=False (static shapes) if the error mentions a constraint or guard",
    "for decoders pass use_cache=False; for attention errors load the model with "
    "attn_implementation='eager'",
)


def trace(model: nn.Module, example_inputs: Any = None, dynamic: bool = True) -> Traced:
    """Trace ``model`` into an aten-level graph module (torch.export, non-strict, training mode).

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs; for
    Hugging Face models it may be omitted and is synthesised from ``model.config``. With ``dynamic``
    the batch and sequence dims stay symbolic so the result runs on other sizes.
    """
    if isinstance(model, Traced):
        return model
    if not isinstance(model, nn.Module):
        raise TraceError(f"graftlib traces torch.nn.Module instances, got {type(model).__name__}")
    kwargs = example_inputs_for(model) if example_inputs is None else _as_kwargs(model, example_inputs)
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor) and v is not None}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        with _training_mode(model):
            program = torch.export.export(
                model, (), kwargs, dynamic_shapes=_dynamic_shapes(kwargs, dynamic), strict=False
            )
    except Exception as exc:  # torch raises many types; the user needs one message
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hints = "; ".join(_HINTS)
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {reason}\n"
            f"what to try: {hints}"
        ) from exc
    graph_module = program.module()
    return Traced(
        graph_module=graph_module,
        input_names=tuple(k for k, v in kwargs.items() if isinstance(v, torch.Tensor)),
        constants=constants,
        example_inputs=kwargs,
        model_class=type(model).__name__,
        dynamic=dynamic,
        signature=_safe_signature(model),
        config=_config(model),
    )


def _safe_signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
