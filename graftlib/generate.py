"""Generation: Hugging Face ``generate`` running the grafted graphs with a KV cache.

``g.generate(**inputs, max_new_tokens=.., do_sample=.., num_beams=.., streamer=..)`` is the model's own
``GenerationMixin.generate`` (greedy, sampling, beam search, logits processors, stopping criteria,
streamers: Hugging Face's code, not a copy) called on a *view* of the user's model whose forward runs
one traced *step graph*; the user's model is never mutated (the view is a shallow copy with its own
attribute dicts). The step graph is the model traced with a KV cache, flat tensors in and out::

    step(input_ids (B, S), attention_mask (B, P+S), position_ids (B, S),
         past_{i}_key / past_{i}_value (B, H_kv, P, D) for each layer i)
      -> (logits (B, S, V), present_{i}_key / present_{i}_value (B, H_kv, P+S, D) ...)

built around transformers' ``DynamicCache`` (holding the past tensors inside the traced forward),
with B, S and P dynamic: the prefill is the same graph at ``P = 0`` (empty past), each decoding step
at ``S = 1``. It is one more variant of the grafted module (``Grafted.graft_variant``): the grafts are
replayed on it with the parameters and adapter store shared, so training the module trains what
generates, and ONNX export with past (``graftlib.export``) is this graph under Optimum's names.

Methods on the cache path:
- LoRA, AdaLoRA, adapters, fusion, ...: replayed on the step graph (unmerged), or folded by
  ``g.merge()`` (the merged module's step graph is the source's step graph merged the same way).
- Prefix tuning: the prefix pass widens every self-attention's keys / values / mask, which in the step
  graph are ``[past; new]``: the learned prefix sits in front of the cache, as PEFT's prefix cache does.
- Prompt tuning / P-tuning: the virtual tokens enter at the prefill only (they land in the cache); each
  later step runs the graph with those adapters off and ``n`` ones prepended to the attention mask;
  positions count the cache (``arange``), as PEFT's prompt generation does.
- ``adapter_names=[...]``: one adapter (or ``"__base__"``) per row, the step graph's mixed-batch module
  (``graftlib.mixed``); beam search and ``num_return_sequences`` rows follow their prompt's name.

Encoder-decoders (T5, BART): two more variants, the encoder ``(input_ids, attention_mask) -> hidden``
run once, and a decoder step ``(decoder_input_ids, encoder_hidden_states, attention_mask, past self-
attention k/v) -> (logits, presents)``; the view's ``get_encoder()`` is the encoder graph. Cross-attention
keys / values are recomputed from the encoder states each step (the cross cache's "computed once" flag
is Python control flow one traced graph cannot hold): two projections per layer and token, no number
changes.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch
from torch import nn

from .errors import GraftError
from .registry import get_method
from .trace import BATCH, SEQ, Traced, trace
from .unpadded import assume_unpadded

if TYPE_CHECKING:
    from .protocols import GraftedModule

__all__ = ["generate", "step_graph", "StepKind", "step_kind", "StepLayout", "step_layout", "past_names",
           "past_inputs", "filled_cache", "user_model", "generation_view", "seq2seq_view", "seq2seq_layout", "prefill_inputs", "step_inputs_dynamic",
           "virtual_token_adapters", "verification_prompts"]

PAST = 5          # example cache length of the step trace (distinct from BATCH and SEQ: no duck-sizing)
STEP_CONTEXT = "kv-cache"  # Context.mask of the step variant in the grafted module's variants


# -- the step module -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepLayout:
    """The cache geometry of a decoder: layers, key/value heads, head dim."""

    layers: int
    kv_heads: int
    head_dim: int
    cache_arg: str      # the forward's cache keyword: "cache" (transformers >= 5.2x) or "past_key_values"

    @property
    def past(self) -> list[str]:
        return past_names(self.layers)


def past_names(layers: int) -> list[str]:
    return [f"past_{i}_{kv}" for i in range(layers) for kv in ("key", "value")]


def step_layout(model: nn.Module) -> StepLayout:
    """The cache layout of `model` (a Hugging Face causal LM), or a GraftError saying why it has none."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise GraftError(f"{type(model).__name__} is not a Hugging Face generative model (no config / generate): "
                         "g.generate needs a causal LM such as LlamaForCausalLM")
    if getattr(config, "is_encoder_decoder", False):
        raise GraftError("g.generate with a KV-cache step graph supports decoder-only causal LMs; "
                         f"{type(model).__name__} is an encoder-decoder")
    text = config.get_text_config(decoder=True)
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise GraftError(f"{type(model).__name__} has {sorted(layer_types)} layers; the step graph keeps a full "
                         "(not sliding-window or linear) cache for every layer")
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    if cache_arg not in params or "position_ids" not in params:
        raise GraftError(f"{type(model).__name__}.forward takes no {cache_arg} / position_ids: it cannot decode "
                         "with a KV cache")
    return StepLayout(int(text.num_hidden_layers), kv_heads, head_dim, cache_arg)


def user_model(g: "GraftedModule") -> nn.Module:
    """The model `g` was grafted on (a merged module's: its source's)."""
    source = getattr(g, "_merged_from", None)
    model = g._model if g._model is not None or source is None else source[0]._model
    if model is None:
        raise GraftError("g.generate needs the model this module was grafted on (it was built without it)")
    return model


def _shallow_view(model: nn.Module) -> nn.Module:
    """A new module object sharing `model`'s submodules, parameters, config (own attribute dicts, so
    setting an attribute on the view never reaches the model)."""
    view = copy.copy(model)
    view.__dict__ = dict(model.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        view.__dict__[key] = dict(model.__dict__[key])
    return view


def step_module(model: nn.Module, layout: StepLayout, last: bool = False) -> nn.Module:
    """`model` (same parameter names) whose forward is the flat KV-cache step (module docstring); `last`:
    logits of the last position only (generate's ``logits_to_keep=1``)."""
    from transformers import DynamicCache

    step = _shallow_view(model)
    names = layout.past
    forward = type(model).forward
    keep = {"logits_to_keep": 1} if last else {}

    def flat_forward(**inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = filled_cache(DynamicCache(), [inputs[name] for name in names])  # (B, H_kv, P, D) each
        out = forward(step, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      position_ids=inputs["position_ids"], use_cache=True, **{layout.cache_arg: cache}, **keep)
        return (out.logits,) + tuple(t for layer in cache.layers for t in (layer.keys, layer.values))

    kind = inspect.Parameter.KEYWORD_ONLY
    flat_forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, kind) for n in ("input_ids", "attention_mask", "position_ids", *names)])
    step.__dict__["forward"] = flat_forward
    return step


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def step_examples(model: nn.Module, layout: StepLayout, batch: int = BATCH, seq: int = SEQ,
                  past: int = PAST) -> dict[str, torch.Tensor]:
    """Trace inputs for the step module: `past` cached positions, `seq` new ones."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    vocab = int(getattr(model.config.get_text_config(decoder=True), "vocab_size", 100))
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1, max(vocab, 2), (batch, seq), generator=generator).to(device),
        "attention_mask": torch.ones(batch, past + seq, dtype=torch.long, device=device),
        "position_ids": torch.arange(past, past + seq, device=device).expand(batch, seq).clone(),
    }
    shape = (batch, layout.kv_heads, past, layout.head_dim)
    for name in layout.past:
        inputs[name] = torch.randn(shape, generator=generator).to(device=device, dtype=_dtype(model))
    return inputs


def step_inputs_dynamic(layout: StepLayout, decode: bool = False) -> dict[str, Any]:
    """The step inputs' dynamic axes: batch and sequence (batch only for a one-token `decode` step); batch
    and cache length for the past."""
    new = (0,) if decode else (0, 1)
    axes: dict[str, Any] = {"input_ids": new, "position_ids": new, "attention_mask": (0, 1)}
    axes.update({name: (0, 2) for name in layout.past})  # batch, cache length
    return axes


# -- which step graph: the attention path eager Hugging Face code takes -------------------------------
@dataclass(frozen=True)
class StepKind:
    """Which trace of the step serves a call. Eager Hugging Face attention looks at its inputs and takes
    one of several paths, each rounding its own way; a traced graph records one path, so each path the
    eager decoding loop takes gets its own graph, bit-equal to eager::

        general   any S, explicit mask, keys / values repeated per query head (GQA)   prefill, ONNX
        unpadded  no padding and (S = 1 or no cache): no mask, is_causal at S > 1, SDPA's enable_gqa
        decode    S = 1 with padding: the query folded onto the key/value heads (HF's pack_gqa)
        last      the prefill's logits for the last position only (generate's logits_to_keep=1)

    The repeated keys / values of the general graph are a copy of the whole cache per layer and token;
    the decode graphs read the cache in place, which is where eager decoding gets its speed.
    """

    decode: bool = False     # one new token (S = 1)
    unpadded: bool = False   # traced with Hugging Face's mask skip (unpadded.assume_unpadded)
    last: bool = False       # logits of the last position only (prefill; a decode step has one position)

    @property
    def tag(self) -> str:
        flags = (("decode", self.decode), ("unpadded", self.unpadded), ("last", self.last))
        return ":".join(["causal"] + [name for name, on in flags if on])


def step_kind(attention_mask: torch.Tensor, new_tokens: int, cached: int, logits_to_keep: Any = None
              ) -> StepKind:
    """The kind of step eager code runs for a call: `new_tokens` new positions after `cached` ones."""
    decode = new_tokens == 1
    unpadded = (decode or cached == 0) and bool(attention_mask.all())
    last = not decode and isinstance(logits_to_keep, int) and logits_to_keep == 1
    return StepKind(decode=decode, unpadded=unpadded, last=last)


@contextlib.contextmanager
def _eager_path(kind: StepKind) -> Iterator[None]:
    """While tracing, take the attention path eager code takes for `kind` (see StepKind)."""
    with contextlib.ExitStack() as stack:
        if kind.unpadded:
            stack.enter_context(assume_unpadded())
        if kind.decode:  # sdpa_attention's only use of the check: pack_gqa for one query token, which eager
            try:         # decoding takes; with S = 1 static it is a plain reshape in the graph
                from transformers.integrations import sdpa_attention
            except ImportError:
                pass
            else:
                stack.enter_context(mock.patch.object(sdpa_attention, "is_torchdynamo_compiling", lambda: False))
        yield


# -- the step graph: a variant of the grafted module ---------------------------------------------
def _cached_variant(g: "GraftedModule", tag: str, build: Any, examples: dict[str, torch.Tensor],
                    dynamic: dict[str, Any], path: StepKind | None = None) -> "GraftedModule":
    """`g`'s variant for the module `build()` makes (traced in eval mode on `examples`, along the eager
    attention `path`), kept among `g`'s variants under an eval ``Context`` of its own (so adding or
    deleting an adapter replays on it too)."""
    key = g._own_context()._replace(training=False, inputs=frozenset(examples), mask=f"{STEP_CONTEXT}:{tag}")
    variant = g._variants.get(key)
    if variant is None:
        module = build()
        with _eager_path(path or StepKind()):
            traced = trace(module, examples, dynamic=dynamic, training=False, verify=g._traced.verify)
        _drop_input_guards(traced)
        records = g.records
        if path is not None and path.decode:  # virtual tokens enter at the prefill, never at a decode step
            records = [r for r in records if not hasattr(get_method(r.method), "virtual_tokens")]
        variant = g._variants[key] = g.graft_variant(traced, module, records)
        variant._unpadded = bool(path and path.unpadded)  # mixed batches: no second unpadded twin of it
    variant._active, variant.training = g._active, False
    return variant


def step_graph(g: "GraftedModule", kind: StepKind = StepKind()) -> "GraftedModule":
    """The grafted step graph of `g` of `kind` (eval mode, `g`'s active adapters), traced on first use."""
    source = getattr(g, "_merged_from", None)
    if source is not None:  # a merged module: its source's step graph, merged the same way
        grafted, names, options = source
        merged = g.__dict__.setdefault("_step_merged", {})
        cached = merged.get(kind)
        if cached is None:
            cached = merged[kind] = step_graph(grafted, kind).merge(adapters=names, **options)
        cached._active, cached.training = g._active, False
        return cached
    model = g._model
    if model is None or not g.retraceable:
        raise GraftError("g.generate needs a module that can re-trace its model (this one was merged in place "
                         "or built without its model): generate from g.merge() (not inplace) or the unmerged g")
    layout = step_layout(model)
    examples = step_examples(model, layout, seq=1 if kind.decode else SEQ)
    variant = _cached_variant(g, kind.tag, lambda: step_module(model, layout, kind.last), examples,
                              step_inputs_dynamic(layout, kind.decode), kind)
    variant._traced.extras["step_layout"] = layout
    return variant


def _drop_input_guards(traced: Traced) -> None:
    """Remove torch.export's input-shape guard call from a step graph. Its checks tie the mask length to
    ``P + S`` as traced; with prompt tuning the prefill's mask also spans the virtual tokens (``n + S``,
    widened inside the graph by the prompt pass). Step graphs are only called with inputs built here."""
    graph = traced.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users:
            graph.erase_node(node)
    traced.graph_module.recompile()


# -- generate: Hugging Face's loop on a view whose forward runs the step graph ----------------------
def virtual_token_adapters(g: "GraftedModule") -> list[str]:
    return list(_virtual_tokens(g))


def verification_prompts(g: "GraftedModule", batch: int = 3, seq: int = 6
                         ) -> tuple[dict[str, torch.Tensor], Any, int]:
    """Left-padded prompts (row b has b pads) for checking a generation, with the eos and pad ids
    Hugging Face's generate uses for `g`'s model (pad: the generation config's, else the first eos)."""
    model = user_model(g)
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    ids = torch.randint(1, vocab, (batch, seq), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, :row] = 0
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    ids = ids.masked_fill(mask == 0, int(pad))
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, eos, int(pad)


def prefill_inputs(step: "GraftedModule", input_ids: torch.Tensor, attention_mask: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """The step graph's inputs for a prompt: positions from the mask (0 on left padding), empty past."""
    layout: StepLayout = step._traced.extras["step_layout"]
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    empty = torch.zeros(input_ids.shape[0], layout.kv_heads, 0, layout.head_dim, dtype=_dtype(step),
                        device=input_ids.device)  # (B, H_kv, 0, D)
    return {"input_ids": input_ids, "attention_mask": attention_mask.long(), "position_ids": positions,
            **{name: empty for name in layout.past}}


def _virtual_tokens(g: "GraftedModule") -> dict[str, int]:
    """Active adapters that prepend virtual tokens (prompt, P-tuning) -> their token count."""
    return {r.adapter: int(r.config["n"]) for r in g.records
            if r.adapter in g._active and hasattr(get_method(r.method), "virtual_tokens")}


class _StepForward:
    """The view's forward: cache -> flat past tensors -> step graph -> logits, cache updated."""

    def __init__(self, g: "GraftedModule", adapter_names: Sequence[str] | None):
        self.g = g
        self.layout = step_layout(user_model(g))
        self.prompts = _virtual_tokens(g)
        if adapter_names is not None and self.prompts:
            raise GraftError("adapter_names (mixed batches) supports LoRA adapters; prompt adapters "
                             f"{sorted(self.prompts)} are active: g.set_active([...]) without them")
        self.names = None if adapter_names is None else list(adapter_names)
        self.calls: list[tuple[int, int]] = []  # (new tokens S, cached P) per step: shows the cache is used
        self.kinds: list[StepKind] = []  # which step graph ran each call

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if inputs_embeds is not None or input_ids is None:
            raise GraftError("g.generate takes input_ids (inputs_embeds bypass the grafted embedding graph)")
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise GraftError("g.generate returns no attentions / hidden states (the step graph outputs logits "
                             "and the cache): generate without output_attentions / output_hidden_states")
        cache = kwargs.get(self.layout.cache_arg)
        if cache is None:
            cache = kwargs.get("past_key_values")
        _check_cache(cache)
        inputs = self._inputs(input_ids, attention_mask, position_ids, cache)
        outputs = self._run(inputs, cache.get_seq_length(), kwargs.get("logits_to_keep"))
        filled_cache(cache, outputs[1:])  # the presents: the whole cache, past included
        logits = outputs[0]
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, int) and keep > 1:
            logits = logits[:, -keep:]
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def _inputs(self, input_ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
                cache: Any) -> dict[str, torch.Tensor]:
        batch, seq = input_ids.shape
        device, past = input_ids.device, cache.get_seq_length()
        n = sum(self.prompts.values())  # virtual tokens: in the cache, or entering it at this prefill
        if mask is None:
            mask = torch.ones(batch, past - (n if past else 0) + seq, dtype=torch.long, device=device)
        if n:  # the mask input spans cache + new tokens (the prompt pass widens only length-S inputs)
            mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if self.prompts or positions is None:  # PEFT's prompt generation: positions count the cache
            positions = torch.arange(past, past + seq, device=device).expand(batch, seq)
        inputs = {"input_ids": input_ids, "attention_mask": mask.long(), "position_ids": positions}
        self.calls.append((seq, past))
        return {**inputs, **past_inputs(cache, self.layout, batch, _dtype(self.g), device)}

    def _run(self, inputs: dict[str, torch.Tensor], cached: int, logits_to_keep: Any
             ) -> tuple[torch.Tensor, ...]:
        kind = step_kind(inputs["attention_mask"], inputs["input_ids"].shape[1], cached, logits_to_keep)
        self.kinds.append(kind)
        step = step_graph(self.g, kind)
        active = step._active
        if self.prompts and cached:  # virtual tokens are in the cache already
            step._active = tuple(a for a in active if a not in self.prompts)
        try:
            if self.names is not None:
                from .mixed import mixed_forward

                return mixed_forward(step, inputs, self._row_names(inputs["input_ids"].shape[0]))
            return step._run(inputs)
        finally:
            step._active = active

    def _row_names(self, rows: int) -> list[str]:
        names = self.names or []
        if rows == len(names):
            return names
        if names and rows % len(names) == 0:  # beams / return sequences: rows repeat their prompt's name
            return [name for name in names for _ in range(rows // len(names))]
        raise GraftError(f"adapter_names has {len(names)} names but generation runs {rows} rows: give one name "
                         "per prompt row")


def past_inputs(cache: Any, layout: StepLayout, batch: int, dtype: torch.dtype, device: torch.device
                ) -> dict[str, torch.Tensor]:
    """`cache`'s keys / values as the step's past inputs; (B, H, 0, D) where a layer holds nothing yet."""
    empty = torch.zeros(batch, layout.kv_heads, 0, layout.head_dim, dtype=dtype, device=device)
    inputs = {}
    for i, name in enumerate(layout.past):
        layer = cache.layers[i // 2] if i // 2 < len(cache.layers) else None
        value = None if layer is None or not layer.is_initialized else (layer.keys, layer.values)[i % 2]
        inputs[name] = empty if value is None or value.numel() == 0 else value
    return inputs


def _check_cache(cache: Any) -> None:
    from transformers import DynamicCache

    if cache is None:
        raise GraftError("g.generate: the step needs a cache object (generate(use_cache=False) is not supported)")
    if not isinstance(cache, DynamicCache):
        raise GraftError(f"g.generate keeps a dynamic cache; generate passed a {type(cache).__name__} (drop "
                         "cache_implementation= / past_key_values= from the generate call)")


def filled_cache(cache: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """`cache` holding `tensors` (key, value per layer) as they are: no copy (``update`` would concatenate
    them onto an empty tensor, a second copy of the whole cache per step inside the step graph)."""
    from transformers.cache_utils import DynamicLayer

    for i in range(len(tensors) // 2):
        while len(cache.layers) <= i:
            cache.layers.append(DynamicLayer())
        layer = cache.layers[i]
        if type(layer) is not DynamicLayer:
            raise GraftError(f"g.generate keeps a dynamic cache; layer {i} is a {type(layer).__name__} "
                             "(pass no cache_implementation / past_key_values to generate)")
        key, value = tensors[2 * i], tensors[2 * i + 1]
        if not layer.is_initialized:
            layer.lazy_initialization(key, value)
        layer.keys, layer.values = key, value
    return cache



def generation_view(g: "GraftedModule", adapter_names: Sequence[str] | None = None) -> nn.Module:
    """A shallow view of `g`'s model (shared config, generation_config, weights) whose forward is the
    grafted step; ``view.generate(...)`` is Hugging Face's generate through the grafts."""
    model = user_model(g)
    view = _shallow_view(model)
    forward = _StepForward(g, adapter_names)
    signature = inspect.signature(model.forward)
    forward.__signature__ = signature  # type: ignore[attr-defined]  # generate reads position_ids, cache, ...
    view.__dict__["forward"] = forward
    view.__dict__["graft_step"] = forward
    view.eval()
    return view


def generate(g: "GraftedModule", *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
    """``g.generate(**inputs, **generation_kwargs)``: Hugging Face's ``generate`` through the grafted step
    graph (module docstring); `adapter_names` gives each prompt row its own adapter."""
    if adapter_names is not None:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise GraftError("adapter_names is a list with one adapter name (or '__base__') per prompt row")
        g._check_names([n for n in adapter_names if n != "__base__"])
    model = user_model(g)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        if adapter_names is not None:
            raise GraftError("adapter_names (mixed batches) in g.generate supports decoder-only models; "
                             "generate each adapter's rows with g.set_active(name)")
        view = seq2seq_view(g)
    else:
        view = generation_view(g, adapter_names)
    with torch.no_grad():
        return view.generate(*args, **kwargs)


# -- encoder-decoders ---------------------------------------------------------------------------------
ENCODED = 11  # example encoder length (distinct from BATCH, SEQ, PAST and PAST + SEQ)


def seq2seq_layout(model: nn.Module) -> StepLayout:
    """The decoder's self-attention cache geometry (T5: num_decoder_layers, d_kv; BART: decoder_layers)."""
    config = model.config
    layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) \
        or config.num_hidden_layers
    heads = getattr(config, "decoder_attention_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "d_kv", None) or config.d_model // heads
    return StepLayout(int(layers), int(heads), int(head_dim), "past_key_values")


def _encoder_module(model: nn.Module) -> nn.Module:
    view = _shallow_view(model)
    encoder = model.get_encoder()

    def encode(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    view.__dict__["forward"] = encode
    return view


def _step_module(model: nn.Module, layout: StepLayout) -> nn.Module:
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    step = _shallow_view(model)
    names, forward = layout.past, type(model).forward

    def flat_forward(**inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        own = filled_cache(DynamicCache(), [inputs[name] for name in names])  # (B, H, P, D) each
        cache = EncoderDecoderCache(own, DynamicCache())
        out = forward(step, encoder_outputs=BaseModelOutput(last_hidden_state=inputs["encoder_hidden_states"]),
                      attention_mask=inputs["attention_mask"], decoder_input_ids=inputs["decoder_input_ids"],
                      past_key_values=cache, use_cache=True, return_dict=True)
        return (out.logits,) + tuple(t for layer in own.layers for t in (layer.keys, layer.values))

    kind = inspect.Parameter.KEYWORD_ONLY
    flat_forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, kind) for n in ("decoder_input_ids", "encoder_hidden_states", "attention_mask",
                                              *names)])
    step.__dict__["forward"] = flat_forward
    return step


def _seq2seq_examples(model: nn.Module, layout: StepLayout
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Trace inputs: the encoder's, and the decoder step's (PAST cached self-attention positions)."""
    device, dtype = next(model.parameters()).device, _dtype(model)
    generator = torch.Generator().manual_seed(0)
    vocab, width = int(model.config.vocab_size), int(model.config.d_model)
    encoder = {"input_ids": torch.randint(1, vocab, (BATCH, ENCODED), generator=generator).to(device),
               "attention_mask": torch.ones(BATCH, ENCODED, dtype=torch.long, device=device)}
    step = {"decoder_input_ids": torch.randint(1, vocab, (BATCH, SEQ), generator=generator).to(device),
            "encoder_hidden_states": torch.randn(BATCH, ENCODED, width, generator=generator).to(device, dtype),
            "attention_mask": torch.ones(BATCH, ENCODED, dtype=torch.long, device=device)}
    for name in layout.past:
        step[name] = torch.randn(BATCH, layout.kv_heads, PAST, layout.head_dim, generator=generator).to(device, dtype)
    return encoder, step


def seq2seq_graphs(g: "GraftedModule") -> tuple["GraftedModule", "GraftedModule", StepLayout]:
    """(encoder graph, decoder step graph, layout) of an encoder-decoder grafted module."""
    model = g._model
    if model is None or not g.retraceable:
        raise GraftError("g.generate needs a module that can re-trace its model: generate from the unmerged g")
    if _virtual_tokens(g):
        raise GraftError("g.generate on an encoder-decoder supports adapters on the weights (LoRA, adapters, ...); "
                         f"prompt adapters {sorted(_virtual_tokens(g))} are active: g.set_active([...]) without them")
    layout = seq2seq_layout(model)
    encoder_examples, step_examples = _seq2seq_examples(model, layout)
    encoder = _cached_variant(g, "encoder", lambda: _encoder_module(model), encoder_examples,
                              {"input_ids": (0, 1), "attention_mask": (0, 1)})
    dynamic: dict[str, Any] = {"decoder_input_ids": (0, 1), "encoder_hidden_states": (0, 1),
                               "attention_mask": (0, 1), **{n: (0, 2) for n in layout.past}}
    step = _cached_variant(g, "decoder", lambda: _step_module(model, layout), step_examples, dynamic)
    return encoder, step, layout


class _Encoder(nn.Module):
    """What ``get_encoder()`` returns on the view: the grafted encoder graph, a ModelOutput back."""

    def __init__(self, graph: "GraftedModule"):
        super().__init__()
        object.__setattr__(self, "graph", graph)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        if input_ids is None or inputs_embeds is not None or output_attentions or output_hidden_states:
            raise GraftError("g.generate on an encoder-decoder takes input_ids (no inputs_embeds, attentions or "
                             "hidden states)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.graph._run({"input_ids": input_ids, "attention_mask": attention_mask.long()})
        return BaseModelOutput(last_hidden_state=hidden)


class _DecoderStep:
    """The view's forward: self-attention cache -> flat past -> step graph -> logits, cache updated."""

    def __init__(self, step: "GraftedModule", layout: StepLayout):
        self.step, self.layout = step, layout
        self.calls: list[tuple[int, int]] = []

    def __call__(self, decoder_input_ids: torch.Tensor | None = None, encoder_outputs: Any = None,
                 attention_mask: torch.Tensor | None = None, past_key_values: Any = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import Seq2SeqLMOutput

        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        if cache is None or decoder_input_ids is None or encoder_outputs is None:
            raise GraftError("g.generate: the decoder step needs decoder_input_ids, encoder_outputs and a cache")
        hidden = encoder_outputs[0]
        own = cache.self_attention_cache
        past = own.get_seq_length()
        batch = decoder_input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        inputs = {"decoder_input_ids": decoder_input_ids, "encoder_hidden_states": hidden,
                  "attention_mask": attention_mask.long()}
        inputs.update(past_inputs(own, self.layout, batch, hidden.dtype, hidden.device))
        self.calls.append((decoder_input_ids.shape[1], past))
        outputs = self.step._run(inputs)
        filled_cache(own, outputs[1:])
        return Seq2SeqLMOutput(logits=outputs[0], past_key_values=cache)


def seq2seq_view(g: "GraftedModule") -> nn.Module:
    """A shallow view of `g`'s encoder-decoder whose encoder and decoder steps run the grafted graphs."""
    encoder_graph, step, layout = seq2seq_graphs(g)
    model = g._model
    view = _shallow_view(model)
    encoder = _Encoder(encoder_graph)
    forward = _DecoderStep(step, layout)
    forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
    view.__dict__["forward"] = forward
    view.__dict__["graft_step"] = forward
    view.__dict__["get_encoder"] = lambda *args, **kwargs: encoder
    view.eval()
    return view
