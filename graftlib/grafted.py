"""The grafted module: a traced model plus named adapters, called exactly like the original.

One mechanism serves every context a call can need. A :class:`Context` (mode, input keys, mask kind) is
the key of one traced graph; the module's own trace is one context, and any other the module meets is a
variant: the model traced for that context, the same grafts replayed on it (``add_records``), the
parameters and the adapter store shared (``_adopt_parameters``)::

    Context(training=False, inputs={input_ids, attention_mask}, mask="padded")  -> eval-mode trace
    Context(training=True,  inputs={input_ids, attention_mask}, mask="padded")  -> train-mode trace
    Context(training=True,  inputs={..., labels},               mask="padded")  -> trace with labels
    Context(training=False, inputs={input_ids, attention_mask}, mask=UNPADDED)  -> HF's mask skip forced

So an eval graph is an eval-mode trace, exact by construction (stochastic depth, ``if self.training:``
branches and batch norm are recorded as eval runs them), rather than a train graph with dropout removed.
``train()`` / ``eval()`` / ``set_active`` build the current context's graph eagerly, so ``torch.compile``
only looks graphs up. A module that cannot re-trace (merged in place, or built without its model) runs
its own graph in either mode, specialised by op name (``runtime.specialise``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import fx, nn

from .editor import STORE, AdapterStore, Editor
from .errors import GraftError, GraftSpecError, did_you_mean, near_names, require_eager
from .guards import call_checked
from .protocols import GraftRecord, named_spec, provide
from .registry import Method, get_method
from .runtime import build_module, copy_graph, flat_module, op_histogram, specialise
from .select import Selection, SiteIndex
from .spec import GraftCall, parse_spec
import graftlib.bnb as bnb
import graftlib.blocks as block_runtime
import graftlib.checkpoint as checkpoint  # module imports: `from . import` would read as importing the package
import graftlib.hf as hf
import graftlib.retarget as retarget
import graftlib.folding as folding
from .inputs import conform_inputs, input_defaults
from .trace import Traced, trace
from .unpadded import UNPADDED, assume_unpadded, is_unpadded_call, masked_attention_count

__all__ = ["Grafted", "GraftRecord", "Context", "apply"]


class Context(NamedTuple):
    """What one traced graph is for: the key of a Grafted's graphs (see the module docstring)."""

    training: bool
    inputs: frozenset[str]          # the call's keyword inputs, constants included
    mask: str = "padded"            # UNPADDED: traced with Hugging Face's mask skip (unpadded.py)


@dataclass
class _Plan:
    call: GraftCall
    method: Method
    config: dict[str, Any]
    selection: Selection


def _share_parameters(gm: fx.GraphModule) -> None:
    """Give the graph its own Parameter objects over the model's storage (frozen), and own buffers.

    Storage is shared (no copy of the weights) while ``requires_grad`` and buffer updates (batch-norm
    statistics) stay the graph's own, so the user's model is not changed by grafting or training.
    """
    memo: dict[int, nn.Parameter] = {}
    for name, param in list(gm.named_parameters(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        new = memo.setdefault(id(param), nn.Parameter(param.detach(), requires_grad=False))
        if hasattr(param, bnb.PREQUANTISED):  # a bitsandbytes layer's stand-in: its NF4 tensors travel
            setattr(new, bnb.PREQUANTISED, getattr(param, bnb.PREQUANTISED))
        module._parameters[leaf] = new
    buffers: dict[int, torch.Tensor] = {}
    for name, buffer in list(gm.named_buffers(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        module._buffers[leaf] = buffers.setdefault(id(buffer), buffer.clone())


class Grafted(nn.Module):
    """A model's traced graph with adapters grafted in.

    Call it like the original model. Only adapter parameters require grad; ``train()``/``eval()``
    switch dropout and batch norm; ``set_active`` and ``disable_adapters`` choose adapters.
    """

    def __init__(self, traced: Traced, model: nn.Module | None = None):
        super().__init__()
        gm = traced.graph_module
        self._eager_grad = folding.eager_grad_targets(gm)  # before freezing: eager's matmuls fold on these
        _share_parameters(gm)
        if retarget.strip_metadata_asserts(gm.graph):  # dtype / device checks only; autocast trips them
            gm.recompile()
        if not isinstance(getattr(gm, STORE, None), AdapterStore):
            gm.add_submodule(STORE, AdapterStore())
        self.graph_module = gm
        object.__setattr__(self, "_model", model)
        self._traced = traced
        self._base_graph = copy_graph(gm.graph)
        self.records: list[GraftRecord] = []
        self._active: tuple[str, ...] = ()
        self._runtimes: dict[tuple, fx.GraphModule] = {}
        self._variants: dict[Context, "Grafted"] = {}
        self._no_gain: set[Context] = set()  # unpadded contexts whose trace would equal the masked graph
        self.retraceable = model is not None
        self._input_defaults = input_defaults(traced, model)  # omitted inputs the model computes (inputs.py)
        hf.install(self)  # Trainer: forward's signature, adapter-only state dict (hf.py)
        self.train(traced.training)

    # -- structure ---------------------------------------------------------------------------
    @property
    def store(self) -> AdapterStore:
        return getattr(self.graph_module, STORE)

    @property
    def graph(self) -> fx.Graph:
        """The canonical graph: every adapter, in the mode the model was traced in (``traced_training``)."""
        return self.graph_module.graph

    @property
    def traced_training(self) -> bool:
        """The mode of this module's own trace; the other mode is a variant traced on first use."""
        return self._traced.training

    @property
    def base_graph_module(self) -> fx.GraphModule:
        return fx.GraphModule(self.graph_module, copy_graph(self._base_graph))

    @property
    def base_graph(self) -> fx.Graph:
        return self._base_graph

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._traced.input_names

    @property
    def adapters(self) -> dict[str, GraftRecord]:
        return {r.adapter: r for r in self.records}

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self._active

    def sites(self, adapter: str | None = None) -> list[str]:
        return [key for r in self.records if adapter in (None, r.adapter) for key in r.sites]

    def runtime_module(self) -> fx.GraphModule:
        """The graph module that runs now (this mode, these active adapters), with the model's names."""
        return self._mode_target()._runtime_pair()[0]

    def _runtime_pair(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        """(named, flat) runtime modules for the current mode and active adapters; forward calls flat."""
        key = (self.training, self._active)
        pair = self._runtimes.get(key)
        if pair is None:
            require_eager("the runtime graph for this mode and these active adapters",
                          "call g.train() / g.eval() / g.set_active(...) before compiling")
            graph = specialise(self.graph, self._active, self.training, self._eager_grad)
            named = build_module(self.graph_module, graph, self.training)
            flat = flat_module(named)
            if self.training:  # e.g. quantize: dequantised weights recomputed in backward, not kept
                self._delegate("training_runtime", flat)
            pair = self._runtimes[key] = (named, block_runtime.runtime(self, named, flat, self.training))
        return pair

    def _invalidate(self) -> None:
        """Drop every built module; the current runtime is rebuilt now, so forward (and torch.compile)
        only looks it up."""
        self._runtimes.clear()
        self._variants.clear()
        self._no_gain.clear()
        if self.records:
            self.runtime_module()

    def _apply(self, fn, recurse=True):  # .to(), .half(), .float(), share_memory()
        before = retarget.placement(self)
        result = super()._apply(fn, recurse)
        retarget.follow(self, before)  # the graph's dtype / device arguments follow the weights
        self._invalidate()
        return result

    def train(self, mode: bool = True) -> "Grafted":
        self.training = mode
        if self.records:
            self.runtime_module()  # built now (a trace on the first switch), so torch.compile only looks it up
        return self

    # -- adding grafts ---------------------------------------------------------------------------
    def add(self, spec: str) -> "Grafted":
        """Graft every call of `spec` into this module (all or nothing)."""
        calls = parse_spec(spec)
        index = SiteIndex.build(self.graph_module)
        plans = self._plan(calls, index)
        saved_graph = copy_graph(self.graph)
        try:
            for plan in plans:
                self._rewrite(plan, index)
        except Exception:
            self.graph_module.graph = saved_graph
            for plan in plans:
                if plan.config["name"] in self.store:
                    del self.store[plan.config["name"]]
            self.graph_module.recompile()
            raise
        added = [GraftRecord(plan.method.name, plan.config["name"], plan.call.text, plan.config,
                             [s.key for s in plan.selection.sites]) for plan in plans]
        self.records.extend(added)
        self._active = tuple(dict.fromkeys(self._active + tuple(p.config["name"] for p in plans)))
        self._delegate("after_add")  # e.g. quantize releases the weights it replaced
        self._finish(lambda variant: variant.add_records(added))
        return self

    def _plan(self, calls: list[GraftCall], index: SiteIndex) -> list[_Plan]:
        plans, names = [], set(self.adapters)
        for call in calls:
            method = get_method(call)
            config = method.configure(call, index)
            name = config["name"]
            if name in names or name == "__base__":
                column = call.option_columns.get("name", call.column)
                raise GraftSpecError(
                    f"adapter {name!r} already exists: give this graft another name, e.g. name={name}2",
                    call.source, column)
            names.add(name)
            selection = method.select(call, index, config)
            if method.needs_targets and not selection.sites:
                raise call.error(f"{call.text} selects no site (check layers=)")
            for site in selection.sites:
                method.check_site(call, site, config)
            plans.append(_Plan(call, method, config, selection))
        return plans

    def _rewrite(self, plan: _Plan, index: SiteIndex) -> None:
        for site in plan.selection.sites:
            for anchor in index.anchors.get(site.key, []):
                editor = Editor(self.graph_module, plan.method.name, plan.config["name"], site, anchor)
                plan.method.rewrite(editor, site, plan.config)
        if hasattr(plan.method, "rewrite_graph"):
            plan.method.rewrite_graph(self.graph_module, plan.selection, plan.config, index)

    def _finish(self, update_variant: Any = None) -> None:
        """After the graph changed: rebuild runtimes; `update_variant` replays the change on each variant
        (a variant it fails on is dropped and traced again when next needed)."""
        self.graph.lint()
        self.graph_module.recompile()
        variants = dict(self._variants) if update_variant is not None else {}
        self._runtimes.clear()
        self._variants.clear()
        for context, variant in variants.items():
            try:
                update_variant(variant)
            except Exception:
                continue
            self._variants[context] = variant
        self.runtime_module()  # also with no grafts left (delete_adapter)

    def delete_adapter(self, name: str) -> None:
        self._check_names([name])
        from .runtime import deactivate, eliminate_dead_code

        if get_method(self.adapters[name].method).base_rewrite:
            raise GraftError(f"{name!r} ({self.adapters[name].method}) rewrote the base model itself and cannot be "
                             "deleted: graft the original model again")
        users = [r.adapter for r in self.records if name in get_method(r.method).depends_on(r.spec)]
        if users:
            raise GraftError(f"adapter {name!r} is used by {', '.join(map(repr, users))}: delete "
                             f"{'that' if len(users) == 1 else 'those'} first")
        deactivate(self.graph, [a for a in self.adapters if a != name])
        eliminate_dead_code(self.graph)
        if name in self.store:  # a variant shares the store: its owner deleted the parameters already
            del self.store[name]
        self.records = [r for r in self.records if r.adapter != name]
        self._active = tuple(a for a in self._active if a != name)
        self._finish(lambda variant: variant.delete_adapter(name))

    # -- adapters on/off -------------------------------------------------------------------------
    def _check_names(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.adapters:
                raise GraftError(f"no adapter named {name!r}; {did_you_mean(name, self.adapters, 'adapters')}")

    def set_active(self, names: str | Iterable[str]) -> None:
        names = (names,) if isinstance(names, str) else tuple(names)
        self._check_names(names)
        self._active = tuple(dict.fromkeys(names))
        self.runtime_module()

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator["Grafted"]:
        saved = self._active
        self._active = ()
        self.runtime_module()
        try:
            yield self
        finally:
            self._active = saved

    # -- parameters --------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def train_only(self, selector: str = "adapters") -> dict[str, nn.Parameter]:
        """Freeze everything except the selected adapter parameters; returns what trains.

        ``"adapters"`` (every adapter), ``"adapters:a,b"`` (those adapters), a method name
        (``"fusion"``, ``"lora"``: every adapter of that method) or an adapter name.
        """
        if selector == "adapters":
            chosen = set(self.adapters)
        elif selector.startswith("adapters:"):
            chosen = {n.strip() for n in selector.split(":", 1)[1].split(",") if n.strip()}
            self._check_names(chosen)
        elif selector in self.adapters:
            chosen = {selector}
        else:
            chosen = {r.adapter for r in self.records if r.method == selector}
            if not chosen:
                options = list(self.adapters) + sorted({r.method for r in self.records}) + ["adapters"]
                raise GraftError(f"train_only({selector!r}) selects nothing; try: {near_names(selector, options)}")
        for param in self.parameters():
            param.requires_grad_(False)
        for name in chosen:
            for param in self.store[name].parameters():
                param.requires_grad_(True)
        return self.trainable_parameters()

    def _delegate(self, hook: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``Method.<hook>(self, record, ...)`` for every adapter whose method defines it."""
        results = []
        for record in list(self.records):
            method = get_method(record.method)
            if hasattr(method, hook):
                results.append(getattr(method, hook)(self, record, *args, **kwargs))
        return results

    def regularization_loss(self) -> torch.Tensor:
        """Sum of the adapters' regularisers (AdaLoRA's orthogonality penalty); 0 when none."""
        terms = self._delegate("regularization_loss")
        return sum(terms, torch.zeros(())) if terms else torch.zeros(())

    def update_and_allocate(self, step: int) -> None:
        """AdaLoRA rank allocation, to call after ``loss.backward()`` every step."""
        if not self._delegate("update_and_allocate", step):
            raise GraftError("update_and_allocate needs an adalora(...) graft; this module has none")

    def rank_allocation(self) -> Any:
        """Kept rank per site for AdaLoRA adapters."""
        results = self._delegate("rank_allocation")
        if not results:
            raise GraftError("rank_allocation needs an adalora(...) graft; this module has none")
        return results[0] if len(results) == 1 else results

    def combine(self, weights: dict[str, float], how: str = "cat", rank: int | None = None,
                name: str = "combined") -> str:
        """Combine LoRA adapters into a new adapter `name` (see graftlib.combine)."""
        from .combine import combine

        return combine(self, weights, how=how, rank=rank, name=name)

    def save_peft(self, directory: str, adapter: str | None = None) -> None:
        """Write `adapter` in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
        from .peft import save_peft

        save_peft(self, directory, adapter=adapter)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Hugging Face ``generate`` through the grafted graphs with a KV cache (see graftlib.generate)."""
        from .generate import generate

        return generate(self, *args, adapter_names=adapter_names, **kwargs)

    def diff(self, other: Any = None) -> Any:
        """What the passes inserted: ``graftlib.diff(base, self)`` (or against `other`)."""
        from .diff import diff

        base = dataclasses.replace(self._traced, graph_module=self.base_graph_module)  # titled by class
        return diff(base if other is None else other, self)

    # -- calling ---------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if args:
            kwargs = self._bind(args, kwargs)
        kwargs = conform_inputs(self._traced, self._input_defaults, kwargs)
        if adapter_names is not None:  # one adapter (or "__base__") per batch row
            from .mixed import mixed_forward

            return mixed_forward(self, kwargs, adapter_names)
        inputs = {k: v for k, v in kwargs.items() if v is not None}
        constants = self._traced.constants
        for key, value in constants.items():
            if inputs.get(key, value) == value:
                inputs[key] = value
        return self._variant(inputs)._run(inputs)

    def _run(self, inputs: dict[str, Any]) -> Any:
        """Call this module's own graph (its context, current adapters)."""
        return call_checked(self._runtime_pair()[1], self._traced.graph_inputs(inputs))  # misfit -> GraftError

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        signature = self._traced.signature
        if signature is None:
            raise TypeError("this grafted module takes keyword arguments only")
        return dict(signature.bind_partial(*args, **kwargs).arguments)

    _unpadded = False  # True on a variant traced for unpadded batches (see unpadded.py)

    def _own_context(self) -> Context:
        return Context(self._traced.training, frozenset(self._traced_keys()),
                       UNPADDED if self._unpadded else "padded")

    def _mode_traceable(self) -> bool:
        """Whether another mode can be traced (else this graph runs in both, specialised by op name)."""
        source = getattr(self, "_merged_from", None)
        return self.retraceable or (source is not None and source[0]._mode_traceable())

    def _mode_target(self) -> "Grafted":
        """The module whose graph runs a call with the traced inputs in the current mode."""
        return self._resolve(self._own_context()._replace(training=self.training), None)

    def _variant(self, inputs: dict[str, Any], unpadded: bool | None = None) -> "Grafted":
        """The module whose graph serves a call with `inputs` in the current mode: ``self`` or a variant
        (another mode, other inputs such as ``labels``, unpadded batches; `unpadded` None: from the mask)."""
        if unpadded is None:
            unpadded = not self._unpadded and is_unpadded_call(self._traced.config, inputs)
        mask = UNPADDED if unpadded or self._unpadded else "padded"
        return self._resolve(Context(self.training, frozenset(inputs), mask), inputs)

    def _resolve(self, context: Context, inputs: dict[str, Any] | None) -> "Grafted":
        own = self._own_context()
        if context.training != own.training and not self._mode_traceable():
            context = context._replace(training=own.training)
        if context == own:
            return self
        if context in self._no_gain:
            return self._resolve(context._replace(mask="padded"), inputs)
        variant = self._variants.get(context)
        if variant is None:
            require_eager(f"the graph traced for {'training' if context.training else 'eval'} mode and inputs "
                          f"({', '.join(sorted(context.inputs))})",
                          "call g.train() / g.eval() before compiling, and the module once without "
                          "torch.compile on inputs with these keys")
            variant = self._make_variant(context, inputs)
            if variant is None:
                if context.mask == "padded":
                    return self  # no other trace possible: this graph, specialised by op name
                self._no_gain.add(context)
                return self._resolve(context._replace(mask="padded"), inputs)
            self._variants[context] = variant
        variant._active, variant.training = self._active, context.training
        return variant

    def _traced_keys(self) -> set[str]:
        return set(self._traced.input_names) | self._traced.constants.keys()

    def _make_variant(self, context: Context, inputs: dict[str, Any] | None) -> "Grafted | None":
        unpadded = context.mask == UNPADDED
        if inputs is None:
            inputs = {**self._traced.example_inputs, **self._traced.constants}
        traced_with = ", ".join(sorted(self._traced_keys()))
        source = getattr(self, "_merged_from", None)
        if source is not None:  # a merged module: trace its source for this context, merge the same way
            grafted, names, options = source
            traced = grafted._resolve(context, inputs)
            if traced is grafted:
                return None
            with warnings.catch_warnings():  # the merge this module came from reported already
                warnings.simplefilter("ignore", UserWarning)
                merged = traced.merge(adapters=names, **options)
            merged._unpadded = unpadded
            return merged
        if not self.retraceable:
            if unpadded or context.inputs == frozenset(self._traced_keys()):
                return None
            raise GraftError(
                f"this module was traced with inputs ({traced_with}) and got ({', '.join(sorted(inputs))}); "
                "a module merged in place cannot re-trace: call it with the traced inputs, or graft "
                "with example_inputs that include the others before merging")
        examples = examples_at_traced_sizes(inputs, self._traced.example_inputs)
        examples = retarget.to_placement(examples, retarget.placement(self._model))  # the model's own
        with assume_unpadded() if unpadded else contextlib.nullcontext():
            traced = trace(self._model, examples, dynamic=self._traced.dynamic_spec, training=context.training,
                           verify=self._traced.verify)
        if unpadded and masked_attention_count(traced.graph) >= masked_attention_count(self._base_graph):
            return None
        variant = self.graft_variant(traced, self._model)
        variant._unpadded = unpadded
        return variant

    def graft_variant(self, traced: Traced, model: nn.Module,
                      records: Iterable[GraftRecord] | None = None) -> "Grafted":
        """`traced` (a trace of `model`, whose parameters have this model's names, e.g. generation's
        KV-cache step module) as a variant: the grafts (or `records` of them) replayed, parameters and
        adapter store shared."""
        variant = Grafted(traced, model)
        checkpoint.inherit(variant, self)
        block_runtime.inherit(variant, self)
        _adopt_parameters(variant.graph_module, self.graph_module)
        variant.add_records(self.records if records is None else records)
        retarget.follow_model(variant, self._model)  # when this module moved after grafting
        return variant

    def add_records(self, records: Iterable[GraftRecord]) -> None:
        """Replay saved or existing grafts (their parameters are reused if already in the store)."""
        spec = " + ".join(_named_spec(r) for r in records)
        if spec:
            self.add(spec)
        extras = {r.adapter: r.extras for r in records}
        for record in self.records:
            record.extras = extras.get(record.adapter, record.extras)

    # -- merge -----------------------------------------------------------------------------------
    def merge(self, inplace: bool = False, adapters: Iterable[str] | None = None,
              requantize: bool = False) -> "Grafted":
        """Fold the deltas of mergeable adapters into the weights.

        The result's graph has the base graph's ops (plus any non-mergeable adapters). With
        ``inplace=False`` (default) merged weights are new tensors and the original model and this
        module are untouched; with ``inplace=True`` the weights are updated in their storage (which
        the original model shares) and this module is returned.
        Quantised weights are dequantised and merged in full precision, or quantised again with
        ``requantize=True`` (the error that adds is reported).
        """
        from .merge import merge_grafted

        return merge_grafted(self, inplace=inplace, adapters=adapters, requantize=requantize)

    def _derived(self, graph: fx.Graph) -> "Grafted":
        """A new Grafted over `graph` sharing this one's parameters (for merged modules)."""
        gm = fx.GraphModule(self.graph_module, graph)
        store = AdapterStore()
        for name, params in self.store.items():
            store[name] = params
        gm._modules[STORE] = store
        new = Grafted.__new__(Grafted)
        nn.Module.__init__(new)
        new.graph_module = gm
        object.__setattr__(new, "_model", self._model)
        new._traced = dataclasses.replace(self._traced, graph_module=gm)
        new._base_graph = self._base_graph
        new._eager_grad = self._eager_grad
        new.records = [dataclasses.replace(r) for r in self.records]
        new._active = self._active
        new._runtimes, new._variants, new._no_gain = {}, {}, set()
        new.retraceable = False
        new._input_defaults = self._input_defaults
        hf.install(new)
        new.training = self.training
        return new

    # -- saving ----------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        from .io import save

        save(self, directory)

    def blocks(self) -> list[nn.Module]:
        """One module per repeated layer, for ``fully_shard(block)``; runtimes then call them (blocks.py)."""
        return block_runtime.blocks(self)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute each block's forward in backward (per-block torch.utils.checkpoint; checkpoint.py)."""
        checkpoint.enable(self, gradient_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """``gradient_checkpointing_enable`` under transformers 5's name (what Trainer calls)."""
        checkpoint.enable(self, activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        checkpoint.disable(self)

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.__dict__.get("_checkpointing") is not None

    is_activation_checkpointing = is_gradient_checkpointing

    def save_pretrained(self, directory: str, **_: Any) -> None:
        """``g.save(directory)`` under the Hugging Face name (extra keyword arguments are ignored)."""
        self.save(directory)

    def add_model_tags(self, tags: str | list[str]) -> None:
        """Hugging Face's model tags (TRL's trainers add theirs); kept here, not on the user's model (hf.py)."""
        hf.add_model_tags(self, tags)

    def get_extra_state(self) -> torch.Tensor:
        """The graft's config in the state dict, so a Trainer checkpoint loads with graftlib.load (hf.py)."""
        return hf.config_bytes(self)

    def set_extra_state(self, state: Any) -> None:
        hf.check_config(self, state)

    def op_histogram(self) -> dict[str, int]:
        return op_histogram(self.runtime_module().graph)

    def __repr__(self) -> str:
        lines = [f"Grafted({self._traced.model_class}, inputs=({', '.join(self.input_names)}))"]
        for record in self.records:
            mark = "*" if record.adapter in self._active else " "
            lines.append(f" {mark} {record.adapter}: {record.spec}  [{len(record.sites)} sites]")
        return "\n".join(lines)


_named_spec = named_spec  # the spec that rebuilds a record (graftlib.protocols.named_spec)


def examples_at_traced_sizes(inputs: dict[str, Any], examples: dict[str, Any]) -> dict[str, Any]:
    """Trace inputs for a call with other keys (``labels=``) or for the unpadded twin.

    The keys the first trace saw take its example tensors; each new tensor is resized from the call's
    sizes to the examples' (labels ``(1, S) -> (B0, S0)``, filled with its first value: a trace reads
    shapes, not values), so a batch or length of 1 in the call is not baked into the new graph. When
    the call's sizes do not map one to one onto the examples', the call's own inputs are used.
    """
    sizes: dict[int, int] = {}
    for key, value in inputs.items():
        example = examples.get(key)
        if not (isinstance(value, torch.Tensor) and isinstance(example, torch.Tensor)):
            continue
        if value.dim() != example.dim():
            return dict(inputs)
        for call_size, example_size in zip(value.shape, example.shape):
            if sizes.setdefault(call_size, example_size) != example_size:
                return dict(inputs)
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        example = examples.get(key)
        if isinstance(value, torch.Tensor) and isinstance(example, torch.Tensor):
            out[key] = example
        elif isinstance(value, torch.Tensor) and value.numel() > 0:
            shape = [sizes.get(n, n) for n in value.shape]
            out[key] = value if list(value.shape) == shape else value.reshape(-1)[0].expand(shape).clone()
        else:
            out[key] = value
    return out


def _adopt_parameters(target: fx.GraphModule, source: fx.GraphModule) -> None:
    """Point `target` at `source`'s parameter and buffer objects (same names), and its adapter store:
    every graph of a module trains the same weights and updates the same batch-norm statistics."""
    for kind, named in (("_parameters", source.named_parameters), ("_buffers", source.named_buffers)):
        shared = dict(named(remove_duplicate=False))
        mine = target.named_parameters if kind == "_parameters" else target.named_buffers
        for name in [n for n, _ in mine(remove_duplicate=False)]:
            if name in shared:
                owner, _, leaf = name.rpartition(".")
                getattr(target.get_submodule(owner) if owner else target, kind)[leaf] = shared[name]
    target._modules[STORE] = getattr(source, STORE)


def apply(model: nn.Module, spec: str, example_inputs: Any = None, dynamic: Any = True,
          verify: bool = True) -> Grafted:
    """Trace `model` and graft `spec` into it; returns a new module, the model is not modified.

    The model is traced in its current mode (the other mode is traced on the first ``train()`` /
    ``eval()``). ``dynamic``: True (batch and sequence axes dynamic, image and audio sizes static),
    False, or ``{input: axes}`` (see ``graftlib.trace.DynamicSpec``). ``verify`` checks the traced graph
    against the eager model (TraceError naming the first diverging module). On a :class:`Grafted`
    module, adds the grafts to it and returns it.
    """
    if isinstance(model, Grafted):
        return model.add(spec)
    parse_spec(spec)  # fail on syntax before spending time tracing
    loaded = bnb.from_bitsandbytes(model)  # bitsandbytes 4-bit layers: graftlib's NF4 reading their tensors
    if loaded is not None:
        model, paths = loaded
        spec = bnb.with_bitsandbytes_layers(spec, paths)
    grafted = Grafted(trace(model, example_inputs, dynamic, verify=verify), model)
    return grafted.add(spec)


provide(Grafted, apply)  # merge, io, peft, ... reach Grafted only through graftlib.protocols
