"""Front end: turn a model into the aten-level fx graph the passes rewrite.

``torch.export.export(strict=False)`` is the tracer (``torch.fx.symbolic_trace`` fails on Hugging Face
models). The model is traced in one mode (its own by default; ``training=`` forces one): a graph records
what the forward did in that mode, so the grafted module traces each mode it runs in (see
``graftlib.grafted.Context``) instead of rewriting one mode's graph into the other. Weights are not
copied: the graph module holds the model's own parameter storage.

After tracing, the graph is checked against the eager model on the example inputs (and, with dynamic
dims, on one other shape); a mismatch raises a :class:`TraceError` naming the first diverging module
(see ``graftlib.verify``). Which axes are dynamic depends on the input's kind (``dynamic_axes``).

Tracing time is mostly torch.export's fake-tensor propagation under symbolic shapes (sympy arithmetic for
every op). Three things keep it down without changing the graph (see ``_fast_tracing``): the fake outputs of
composite ops (linear, SDPA, layer norm, ...) are memoised per fake mode instead of re-running their
decomposition in every layer, GraphModule code generation is lazy, and per-node stack traces are off.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx import config as fx_config
from torch._C import DispatchKey
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor
from torch.export import Dim
from torch.fx._lazy_graph_module import _use_lazy_graph_module
from torch.fx.experimental.sym_node import SymNode
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from .errors import TraceError
from .saved_hooks import paused_saved_tensors_hooks
from .names import sanitize_program, sanitize_targets
from .safety import exclusive_trace

__all__ = ["Traced", "trace", "example_inputs_for", "fake_call", "dynamic_axes", "DynamicSpec", "in_mode"]

BATCH, SEQ, DEC_SEQ = 2, 7, 5  # example sizes; unusual values so no model dim coincides with them


@dataclass
class Traced:
    """A traced model: the graph module plus how to call it."""

    graph_module: fx.GraphModule
    input_names: tuple[str, ...]          # tensor keyword inputs the graph takes
    constants: dict[str, Any]             # non-tensor keyword inputs baked in at trace time
    example_inputs: dict[str, Any]
    model_class: str
    dynamic: bool                         # some axis of some input is dynamic
    signature: inspect.Signature | None = None
    config: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    bound: frozenset[str] = frozenset()   # constants forward takes only via **kwargs: bound, not graph inputs
    training: bool = True                 # the mode the model was traced in
    dynamic_spec: Any = True              # the ``dynamic=`` argument, so a re-trace makes the same axes dynamic
    axes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # input -> its dynamic axes
    verify: bool = True                   # checked against the eager model (and re-traces are)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def graph_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """`inputs` as the graph module takes them (without the constants bound at trace time)."""
        return {k: v for k, v in inputs.items() if k not in self.bound}


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
    if "input_values" in params and main == "input_values":  # raw audio (wav2vec2, HuBERT, WavLM)
        inputs["input_values"] = torch.randn(batch, _audio_samples(config, seq), generator=generator)
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


def _audio_samples(config: Any, frames: int) -> int:
    """Raw-audio length whose convolutional feature encoder yields `frames` frames (at least the
    positional convolution's kernel, so every layer sees a full window)."""
    frames = max(frames, int(getattr(config, "num_conv_pos_embeddings", 0) or 0))
    kernels = list(getattr(config, "conv_kernel", ()) or ())
    strides = list(getattr(config, "conv_stride", ()) or ())
    samples = frames
    for kernel, stride in reversed(list(zip(kernels, strides))):  # invert each (L - k) // s + 1
        samples = (samples - 1) * int(stride) + int(kernel)
    return samples


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


# Dynamic axes by input kind: batch and sequence axes are dynamic; image height / width, audio feature
# length, patch counts and feature sizes are fixed by the model's config and stay static unless asked for.
_SEQUENCE_INPUTS = frozenset({
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "labels", "inputs_embeds",
    "decoder_input_ids", "decoder_attention_mask", "decoder_position_ids", "decoder_inputs_embeds",
    "special_tokens_mask", "global_attention_mask", "cache_position", "start_positions", "end_positions",
    "input_values",  # raw audio: (B, samples), any length
})
_FIXED_SIZE_INPUTS = frozenset({
    "pixel_values", "pixel_mask", "input_features", "bool_masked_pos", "image_embeds",
    "pixel_values_videos", "feature_attention_mask", "interpolate_pos_encoding",
})

#: ``dynamic=``: True (axes by input kind), False (static), or {input: spec} where spec is True (every
#: axis), False / None / () (static), a collection of axis numbers, or {axis: name}; inputs not named
#: keep their kind's default.
DynamicSpec = Any


def _default_axes(name: str, value: torch.Tensor) -> tuple[int, ...]:
    if value.dim() == 0:
        return ()
    if name in _SEQUENCE_INPUTS:
        return tuple(range(min(value.dim(), 2)))
    if name in _FIXED_SIZE_INPUTS:
        return (0,)
    integer = not (value.is_floating_point() or value.is_complex())
    sequence_like = (value.dim() == 2 and integer) or value.dim() == 3  # (B, S) ids, (B, S, D) vectors
    return (0, 1) if sequence_like else (0,)


def _axes_of(name: str, value: torch.Tensor, spec: Any) -> tuple[int, ...]:
    if spec is True:
        return tuple(range(value.dim()))
    if spec is None or spec is False:
        return ()
    axes = tuple(spec.keys()) if isinstance(spec, Mapping) else tuple(spec)
    for axis in axes:
        if not isinstance(axis, int) or isinstance(axis, bool) or not -value.dim() <= axis < value.dim():
            raise TraceError(f"dynamic={{{name!r}: {spec!r}}}: {axis!r} is not an axis of {name} "
                             f"(shape {tuple(value.shape)}); give axis numbers 0..{value.dim() - 1}")
    return tuple(sorted({a % value.dim() for a in axes}))


def dynamic_axes(kwargs: Mapping[str, Any], dynamic: DynamicSpec) -> dict[str, tuple[int, ...]]:
    """input name -> its dynamic axes, for a ``dynamic=`` argument (see ``DynamicSpec``)."""
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    if isinstance(dynamic, Mapping):
        unknown = sorted(set(dynamic) - set(tensors))
        if unknown:
            raise TraceError(f"dynamic= names {', '.join(map(repr, unknown))}, not tensor inputs of the trace "
                             f"({', '.join(tensors) or 'none'})")
        return {k: _axes_of(k, v, dynamic[k]) if k in dynamic else _default_axes(k, v) for k, v in tensors.items()}
    if not isinstance(dynamic, bool):
        raise TraceError(f"dynamic= takes True, False or {{input name: axes}}, got {type(dynamic).__name__}")
    return {k: _default_axes(k, v) if dynamic else () for k, v in tensors.items()}


def _dynamic_shapes(kwargs: Mapping[str, Any], axes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    if not any(axes.values()):
        return None
    return {name: {axis: Dim.AUTO for axis in axes[name]} if name in axes else None for name in kwargs}


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool | None) -> Iterator[None]:
    """``model`` (every submodule) in `training` mode for the block; None: as it is."""
    if training is None:
        yield
        return
    modes = {module: module.training for module in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)


@exclusive_trace  # one trace at a time per process; torch's global flags restored on every path
def trace(model: nn.Module, example_inputs: Any = None, dynamic: DynamicSpec = True, *,
          stack_traces: bool = False, training: bool | None = None, verify: bool = True) -> Traced:
    """Trace ``model`` into an aten-level graph module (torch.export, non-strict).

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs; for
    Hugging Face models it may be omitted and is synthesised from ``model.config``. ``dynamic`` chooses
    the symbolic axes (``DynamicSpec``: by default batch and sequence axes, images and audio static).
    ``training`` traces in that mode (default: the model's own); ``verify`` runs the graph against the
    eager model after tracing (``graftlib.verify``). ``stack_traces`` keeps each node's Python stack
    trace in ``node.meta["stack_trace"]`` (off by default: ~10% of tracing time).
    """
    if isinstance(model, Traced):
        return model
    if not isinstance(model, nn.Module):
        raise TraceError(f"graftlib traces torch.nn.Module instances, got {type(model).__name__}")
    kwargs = example_inputs_for(model) if example_inputs is None else _as_kwargs(model, example_inputs)
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor) and v is not None}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    signature = _safe_signature(model)
    bound = _var_keyword_only(signature, constants)
    kwargs = {k: v for k, v in kwargs.items() if k not in bound}
    axes = dynamic_axes(kwargs, dynamic)
    mode = model.training if training is None else training
    try:
        with in_mode(model, training), _fast_tracing(stack_traces), _bound_forward(model, bound), \
                paused_saved_tensors_hooks():  # the caller's pack hooks never see fake tensors (saved_hooks.py)
            program = torch.export.export(model, (), kwargs, dynamic_shapes=_dynamic_shapes(kwargs, axes),
                                          strict=False)
    except Exception as exc:  # torch raises many types; the user needs one short message
        from .verify import explain_trace_failure

        raise TraceError(explain_trace_failure(type(model).__name__, exc)) from exc
    with _use_lazy_graph_module(True):
        renamed = sanitize_program(program)  # user module names ('a"b') never reach generated source
        graph_module = program.module()
    sanitize_targets(graph_module, renamed)  # user module names ('a"b') never reach generated source
    if verify:
        from .verify import verify_trace

        with in_mode(model, training):
            verify_trace(model, graph_module, kwargs, bound, axes, mode)
    return Traced(
        graph_module=graph_module,
        input_names=tuple(k for k, v in kwargs.items() if isinstance(v, torch.Tensor)),
        constants=constants,
        example_inputs=kwargs,
        model_class=type(model).__name__,
        dynamic=any(axes.values()),
        signature=signature,
        config=_config(model),
        bound=frozenset(bound),
        training=mode,
        dynamic_spec=dynamic,
        axes=axes,
        verify=verify,
    )


def _var_keyword_only(signature: inspect.Signature | None, constants: Mapping[str, Any]) -> dict[str, Any]:
    """Constants that ``forward`` takes only through ``**kwargs`` (``output_hidden_states=True`` on
    transformers 5 models): torch.export's dynamic-shape check cannot place them, so they are bound."""
    if signature is None:
        return {}
    parameters = signature.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return {}
    return {k: v for k, v in constants.items() if k not in parameters}


@contextlib.contextmanager
def _bound_forward(model: nn.Module, bound: Mapping[str, Any]) -> Iterator[None]:
    """``model.forward`` with `bound` keyword arguments fixed, for the duration of one export."""
    if not bound:
        yield
        return
    own = model.__dict__.get("forward")
    model.forward = functools.partial(model.forward, **bound)
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _safe_signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------
# Tracing speed. Under dynamic dims every fake op pays for sympy arithmetic on symbolic sizes (~1.5 ms per op
# for bert-base on this machine). Composite ops (linear, SDPA, layer norm, matmul, dropout, reshape) stay one
# node in the pre-dispatch graph, yet their fake output is computed by running their whole decomposition:
# SDPA's math path is ~20 fake ops (~65 ms per call for bert-base), linear 3-4. Every layer calls them with the
# same symbolic shapes, so the first call's output metadata is kept and later calls only allocate a fresh fake
# tensor (or, for a reshape that is a view, take aten.view of the input). The graph is unchanged: same nodes,
# targets, arguments and meta["val"] (tests/test_trace.py); only some node names can differ, where export
# numbers the symbolic-size helper nodes it later removes differently.

_CIA = DispatchKey.CompositeImplicitAutograd
_aten = torch.ops.aten
_MEMO_OPS = (
    _aten.scaled_dot_product_attention.default,
    _aten.linear.default,
    _aten.layer_norm.default,
    _aten.matmul.default,
    _aten.dropout.default,
    _aten.reshape.default,  # usually a view of its input: replayed as aten.view (its meta skips infer_size)
)
_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)
_SCALARS = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)
_NO_MEMO = object()  # a key whose outputs alias an input (or are otherwise unusual): always decompose


class _Uncacheable(Exception):
    pass


@dataclass
class _KeyState:
    """The symbolic sizes met while building a key, so outputs can reuse the inputs' SymInt objects."""

    mode: Any
    positions: dict[int, int] = field(default_factory=dict)   # id(SymNode) -> index in symbols
    symbols: list[torch.SymInt] = field(default_factory=list)

    def sym(self, value: Any) -> Any:
        if isinstance(value, torch.SymInt):
            self.positions.setdefault(id(value.node), len(self.symbols))
            self.symbols.append(value)
        return ("sym", value.node.pytype, value.node.expr) if isinstance(value, _SYM) else value


def _arg_key(value: Any, state: _KeyState) -> Any:
    if isinstance(value, torch.Tensor):
        t = value
        if type(t) is not FakeTensor or t.fake_mode is not state.mode or t.constant is not None \
                or t.layout is not torch.strided:
            raise _Uncacheable
        return ("tensor", tuple(state.sym(s) for s in t.shape), tuple(state.sym(s) for s in t.stride()),
                state.sym(t.storage_offset()), t.dtype, t.device, t.requires_grad, t.is_conj(), t.is_neg())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_arg_key(v, state) for v in value))
    if isinstance(value, _SYM):
        return state.sym(value)
    if isinstance(value, _SCALARS):
        return (type(value).__name__, value)
    raise _Uncacheable


@dataclass(frozen=True)
class _OutputMeta:
    shape: tuple[Any, ...]          # each an int, ("in", i): the key's i-th input SymInt, or a SymNode to copy
    stride: tuple[Any, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool


def _stub(value: Any, state: _KeyState) -> Any:
    if not isinstance(value, torch.SymInt):
        return int(value)
    index = state.positions.get(id(value.node))
    return ("in", index) if index is not None else value.node


def _unstub(value: Any, state: _KeyState) -> Any:
    if isinstance(value, int):
        return value
    if isinstance(value, tuple):
        return state.symbols[value[1]]
    node = value  # a size computed by the decomposition: same expression, a fresh SymNode (as fake tensor's cache)
    return torch.SymInt(SymNode(node._expr, state.mode.shape_env, node.pytype, node._hint, node.constant,
                                node.fx_node))


@dataclass(frozen=True)
class _ViewOf:
    """A reshape that came out as a view of its input: replay ``aten.view(input, shape)``."""

    shape: tuple[Any, ...]


def _record(op: Any, out: Any, inputs: list[torch.Tensor], state: _KeyState, n_symbols: int) -> Any:
    """The outputs' metadata, or _NO_MEMO unless every output is a fresh fake tensor with backed sizes
    (or a reshape is a view of its input that aten.view reproduces exactly)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    storages = {t.untyped_storage()._cdata for t in inputs}
    if len(state.mode.shape_env.var_to_range) != n_symbols or not outs:
        return _NO_MEMO  # the decomposition made symbols (backed or not): replaying would share them
    if op is _aten.reshape.default and isinstance(out, torch.Tensor) and inputs \
            and out.untyped_storage()._cdata == inputs[0].untyped_storage()._cdata:
        return _view_entry(out, inputs[0], state)
    grad_in = any(t.requires_grad for t in inputs)
    metas = []
    for t in outs:
        if (type(t) is not FakeTensor or t.fake_mode is not state.mode or t.constant is not None
                or t.layout is not torch.strided or type(t.storage_offset()) is not int or t.storage_offset()
                or t.is_conj() or t.is_neg()
                or t.untyped_storage()._cdata in storages or free_unbacked_symbols(t)
                or (t.requires_grad and (t.grad_fn is None or not grad_in))):
            return _NO_MEMO
        storages.add(t.untyped_storage()._cdata)
        metas.append(_OutputMeta(tuple(_stub(s, state) for s in t.shape), tuple(_stub(s, state) for s in t.stride()),
                                 t.dtype, t.device, t.requires_grad))
    return (type(out) if isinstance(out, (tuple, list)) else None, tuple(metas))


class _Fresh(torch.autograd.Function):
    """Fresh outputs with a grad_fn, like the decomposition's; trace time only, never differentiated."""

    @staticmethod
    def forward(ctx: Any, make: Callable[[], tuple[torch.Tensor, ...]], metas: tuple[_OutputMeta, ...],
                *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = make()
        ctx.mark_non_differentiable(*(t for t, m in zip(outs, metas) if not m.requires_grad))
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError("graftlib: a trace-time fake output was differentiated")


def _view_entry(out: torch.Tensor, source: torch.Tensor, state: _KeyState) -> Any:
    entry = _ViewOf(tuple(_stub(s, state) for s in out.shape))
    if free_unbacked_symbols(out) or not out._is_view():
        return _NO_MEMO
    again = _replay(entry, [source], state)
    same = all(tuple(map(_key_expr, f(again))) == tuple(map(_key_expr, f(out)))
               for f in (torch.Tensor.size, torch.Tensor.stride, lambda t: (t.storage_offset(),)))
    return entry if same and again.requires_grad == out.requires_grad else _NO_MEMO


def _key_expr(value: Any) -> Any:
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _replay(entry: Any, inputs: list[torch.Tensor], state: _KeyState) -> Any:
    if isinstance(entry, _ViewOf):
        return _aten.view.default(inputs[0], [_unstub(s, state) for s in entry.shape])
    kind, metas = entry

    def make() -> tuple[torch.Tensor, ...]:
        return tuple(torch.empty_strided(tuple(_unstub(s, state) for s in m.shape),
                                         tuple(_unstub(s, state) for s in m.stride), dtype=m.dtype, device=m.device)
                     for m in metas)

    outs = _Fresh.apply(make, metas, *inputs) if any(m.requires_grad for m in metas) else make()
    return kind(outs) if kind is not None else outs[0]


def _autocast_on(tensors: list[torch.Tensor]) -> bool:
    kinds = {t.device.type for t in tensors if t.device.type != "meta"} | {"cpu"}
    return any(torch.is_autocast_enabled(kind) for kind in kinds)


class _CompositeMemo:
    """One per fake mode: (op, inputs' symbolic metadata, scalars, grad mode) -> the fresh outputs' metadata."""

    def __init__(self) -> None:
        self.table: dict[Any, Any] = {}

    def call(self, op: Any, decompose: Callable[..., Any], mode: Any, tensors: list[torch.Tensor],
             args: tuple, kwargs: dict) -> Any:
        state = _KeyState(mode)
        try:
            key = (op, torch.is_grad_enabled(), _arg_key(args, state), _arg_key(sorted(kwargs.items()), state))
        except _Uncacheable:
            return decompose(*args, **kwargs)
        entry = self.table.get(key)
        if entry is None:
            n_symbols = len(mode.shape_env.var_to_range)
            out = decompose(*args, **kwargs)
            self.table[key] = _record(op, out, tensors, state, n_symbols)
            return out
        return decompose(*args, **kwargs) if entry is _NO_MEMO else _replay(entry, tensors, state)


_MEMOS: weakref.WeakKeyDictionary[Any, _CompositeMemo] = weakref.WeakKeyDictionary()


def _kernel(op: Any, decompose: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        mode = getattr(tensors[0], "fake_mode", None) if tensors else None
        if mode is None or mode.shape_env is None or _autocast_on(tensors):
            return decompose(*args, **kwargs)
        memo = _MEMOS.get(mode)
        if memo is None:
            memo = _MEMOS[mode] = _CompositeMemo()
        return memo.call(op, decompose, mode, tensors, args, kwargs)
    return run


_INSTALL_LOCK = threading.Lock()
_installed: list[tuple[Any, Any]] = []   # (op, the kernel it had before); non-empty while any block runs
_users = 0


@contextlib.contextmanager
def _memoised_composites() -> Iterator[None]:
    """Route the composite ops in _MEMO_OPS through their fake mode's memo while the block runs.

    The kernels are Python-dispatcher kernels (``OpOverload.py_kernels``), process-wide while installed and
    counted, so nested blocks (fake_call inside a trace) share one installation; they only act on fake
    tensors with a shape environment and decompose as before for anything else. (torch.export itself is not
    thread-safe: two threads tracing at once fail inside torch, with or without this.)
    """
    global _users
    with _INSTALL_LOCK:
        if _users == 0:
            for op in _MEMO_OPS:
                previous = op.py_kernels.get(_CIA)  # matmul and dropout have Python decompositions already
                decompose = previous or (lambda *a, _op=op, **k: _op._op_dk(_CIA, *a, **k))
                op.py_kernels[_CIA] = _kernel(op, decompose)
                op._dispatch_cache.clear()
                _installed.append((op, previous))
        _users += 1
    try:
        yield
    finally:
        with _INSTALL_LOCK:
            _users -= 1
            if _users == 0:
                while _installed:
                    op, previous = _installed.pop()
                    if previous is None:
                        op.py_kernels.pop(_CIA, None)
                    else:
                        op.py_kernels[_CIA] = previous
                    op._dispatch_cache.clear()


def fake_call(mode: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """``op(*args, **kwargs)`` on fake values under ``mode`` (a traced graph's fake mode), with the same
    composite-op memo as tracing: a pass inserting the same op at every layer pays for one decomposition."""
    with mode, enable_python_dispatcher(), _memoised_composites(), paused_saved_tensors_hooks():  # saved_hooks.py
        return op(*args, **kwargs)


@contextlib.contextmanager
def _fast_tracing(stack_traces: bool) -> Iterator[None]:
    """Memoised composites; lazy GraphModule code generation (export recompiles its graph ~35 times, only
    the last code is ever run); per-node Python stack traces only when asked for (graftlib never reads them,
    and capturing them is ~10% of a 1B Llama's trace)."""
    previous = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = previous or not stack_traces
    try:
        with _memoised_composites(), _use_lazy_graph_module(True):
            yield
    finally:
        fx_config.do_not_emit_stack_traces = previous
