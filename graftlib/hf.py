"""Hugging Face ``Trainer`` compatibility: column dropping, loss kwargs, adapter-only checkpoints.

``Trainer`` reads three things off a model that is neither a ``PreTrainedModel`` nor a ``PeftModel``:

- ``inspect.signature(model.forward)`` names the dataset columns it keeps. Each grafted module gets its
  own ``forward`` (the class's function, bound per instance) whose ``__signature__`` is the base model's
  forward signature plus ``adapter_names``, so ``input_ids``, ``attention_mask``, ``labels`` ... survive.
- ``accepts_loss_kwargs``: False, so no ``num_items_in_batch`` reaches the graph (the loss is the
  model's own mean, as with gradient accumulation 1).
- ``model.state_dict()`` is what a checkpoint holds (``model.safetensors``) and ``load_state_dict(sd,
  False)`` what ``resume_from_checkpoint`` calls. A grafted module's state dict holds only its own
  state: the adapter store's tensors, any base parameter set to train, and ``_extra_state``, the graft's
  config (graft.json's content, as a uint8 tensor). Base weights belong to the model and are left out
  (a load reports them as neither missing nor unexpected). ``graftlib.load(model, checkpoint_dir)``
  reads such a checkpoint like a ``g.save`` directory; ``g.save_pretrained(dir)`` is ``g.save(dir)``.
- ``config`` / ``generation_config`` (the base model's own objects) and ``add_model_tags``: what TRL's
  ``SFTTrainer`` (trl 1.14) reads and sets besides Trainer's.
- ``activation_checkpointing_enable(kwargs, every_n_layers, offload)`` (what transformers 5's Trainer
  calls for ``TrainingArguments(gradient_checkpointing=True)``) and the older ``gradient_checkpointing_enable``:
  per-block checkpointing (checkpoint.py); a model that had it enabled before grafting keeps it.
"""
from __future__ import annotations

import inspect
import json
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .editor import STORE
from .errors import LoadError
from .io import EXTRA_STATE, TRAINER_WEIGHTS_NAME, config_dict, decode_config

if TYPE_CHECKING:
    from .protocols import GraftedModule

__all__ = ["install", "add_model_tags", "forward_signature", "config_bytes", "check_config", "TRAINER_WEIGHTS_NAME"]


def forward_signature(grafted: "GraftedModule") -> inspect.Signature | None:
    """The base model's forward signature with ``adapter_names`` (keyword-only) added."""
    base = grafted._traced.signature
    if base is None:
        return None
    params = [p for p in base.parameters.values() if p.name != "adapter_names"]
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    return base.replace(parameters=params[:at] + [extra] + params[at:])


def _bind_forward(grafted: "GraftedModule") -> None:
    signature = forward_signature(grafted)
    if signature is None:
        return
    function = type(grafted).forward
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__doc__ = function.__doc__
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    copy.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])
    object.__setattr__(grafted, "forward", types.MethodType(copy, grafted))


def install(grafted: "GraftedModule") -> None:
    """Give `grafted` its per-instance forward signature and the adapter-only state-dict hooks."""
    _bind_forward(grafted)
    object.__setattr__(grafted, "accepts_loss_kwargs", False)
    object.__setattr__(grafted, "_keys_to_ignore_on_save", None)
    for name in _HF_ATTRIBUTES:  # TRL's SFTTrainer reads and sets these (pad / eos token ids), as on a PeftModel
        if getattr(grafted._model, name, None) is not None:
            object.__setattr__(grafted, name, getattr(grafted._model, name))
    if _model_checkpoints(grafted._model):  # enabled on the model before grafting
        grafted.__dict__["_checkpointing"] = {}
    grafted.register_state_dict_post_hook(_keep_own_state)
    grafted.register_load_state_dict_post_hook(_forgive_base_keys)


#: the base model's Hugging Face objects a grafted module shares (the same objects, as PeftModel does)
_HF_ATTRIBUTES = ("config", "generation_config")


def add_model_tags(grafted: "GraftedModule", tags: Any) -> None:
    """``model.add_model_tags`` (TRL's trainers call it): kept on the grafted module, the user's model untouched."""
    tags = [tags] if isinstance(tags, str) else list(tags)
    current = grafted.__dict__.setdefault("model_tags", [])
    current.extend(t for t in map(str, tags) if t not in current)


def _model_checkpoints(model: nn.Module) -> bool:
    """Whether `model` had Hugging Face checkpointing enabled (transformers 5's name first: the old one warns)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return False


def _own_names(grafted: "GraftedModule") -> tuple[str, set[str]]:
    """(store prefix, trainable base parameter names) relative to `grafted`."""
    store = f"graph_module.{STORE}."
    trainable = {n for n, p in grafted.named_parameters() if p.requires_grad and not n.startswith(store)}
    return store, trainable


def _keep_own_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    store, trainable = _own_names(module)  # type: ignore[arg-type]
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix):]
        if not (name.startswith(store) or name in trainable or name == EXTRA_STATE):
            del state_dict[key]


def _forgive_base_keys(module: nn.Module, incompatible: Any) -> None:
    """Base weights are not in a grafted module's state dict: do not report them as missing."""
    base = {n for n, _ in module.named_parameters(remove_duplicate=False)} \
        | {n for n, _ in module.named_buffers(remove_duplicate=False)}
    store, trainable = _own_names(module)  # type: ignore[arg-type]
    base = {n for n in base if not n.startswith(store) and n not in trainable}
    keep = [k for k in incompatible.missing_keys if not _has_suffix_in(k, base)]
    incompatible.missing_keys[:] = keep


def _has_suffix_in(key: str, names: set[str]) -> bool:
    if key in names:
        return True
    return any(key[i + 1:] in names for i, ch in enumerate(key) if ch == ".")


def config_bytes(grafted: "GraftedModule") -> torch.Tensor:
    """graft.json's content (plus the state-dict key of every saved tensor) as a uint8 tensor."""
    meta = config_dict(grafted)
    keys = {}
    for adapter in grafted.adapters:
        for escaped, site in grafted.store[adapter].items():
            for pname, _ in list(site.named_parameters()) + list(site.named_buffers()):
                keys[f"graph_module.{STORE}.{adapter}.{escaped}.{pname}"] = f"{adapter}/{site.site_key}/{pname}"
    meta["state_dict_keys"] = keys
    data = json.dumps(meta).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def check_config(grafted: "GraftedModule", state: Any) -> None:
    """``set_extra_state``: the checkpoint must hold this module's adapters."""
    meta = decode_config(state, "the state dict's _extra_state")
    saved = [a.get("name") for a in meta.get("adapters", []) if isinstance(a, Mapping)]
    if sorted(map(str, saved)) != sorted(grafted.adapters):
        raise LoadError(f"the state dict holds adapters {saved}, this module has {sorted(grafted.adapters)}: "
                        "load it onto a module grafted with the same spec (graftlib.load(model, checkpoint_dir))")
