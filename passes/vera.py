"""VeRA: one frozen random pair (A, B) shared by every adapted projection, trained scaling vectors per site.

    linear(x, W, b)  ->  add(linear(x, W, b), linear(linear(dropout(x), d·A_s), b_vec·B_s))
    addmm(b, x, W)   ->  the same on GPT-2's Conv1D (W stored (in, out))

``A`` (r, max in) and ``B`` (max out, r) are drawn exactly as PEFT does: a CPU ``torch.Generator`` seeded
with ``seed`` (PEFT's ``projection_prng_key``), kaiming-uniform A then B, at the largest in / out size of
the selected projections; each site uses the slices ``A_s = A[:, :in]`` and ``B_s = B[:out]`` (frozen
buffers). ``d·A_s`` and ``b_vec·B_s`` scale rows; PEFT's ``lambda_b * B(lambda_d * A x)`` is the same
product. Init: ``vera_lambda_b`` zeros, ``vera_lambda_d`` = ``d_initial`` (0.1), so the graft is the base
model exactly. The scaled factors read only parameters: eval mode computes them once (graftlib/cache.py).

Merge: ``W += (b_vec·B_s) @ (d·A_s)`` (Conv1D: its transpose). ``save_projection=false`` keeps A and B
out of PEFT checkpoints (``from_peft`` regenerates them from the seed, as PEFT does).
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from graftlib.editor import Editor, graft_tag
from graftlib.errors import GraftError, LoadError
from graftlib.registry import Method, Option, in_range, positive, register
from graftlib.select import Selection, SiteIndex
from graftlib.sites import Site
from graftlib.spec import GraftCall

__all__ = ["VeRA", "projections", "peft_import", "peft_export"]

aten = torch.ops.aten
PREFIX = "base_model.model."


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``vera.model._kaiming_init``: uniform(+-sqrt(3) * sqrt(2) / sqrt(fan_in)), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


_PROJECTIONS: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (A (r, max_in), B (max_out, r)) PEFT draws for ``projection_prng_key = seed``."""
    key = (seed, r, max_in, max_out)
    if key not in _PROJECTIONS:
        if len(_PROJECTIONS) > 8:
            _PROJECTIONS.clear()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        a = _kaiming((r, max_in), generator)
        _PROJECTIONS[key] = (a, _kaiming((max_out, r), generator))
    return _PROJECTIONS[key]


def _dims(site: Site) -> tuple[int, int]:
    return site.in_features, site.out_features


@register
class VeRA(Method):
    name = "vera"
    site_kinds = ("linear", "conv1d")
    mergeable = True
    options = {
        "r": Option(256, (int,), positive, help="rank of the shared projections"),
        "seed": Option(0, (int,), help="PRNG key of the shared projections (PEFT's projection_prng_key)"),
        "d_initial": Option(0.1, (float,), help="initial value of vera_lambda_d"),
        "dropout": Option(0.0, (float,), in_range(0.0, 1.0), help="dropout on the branch input"),
        "save_projection": Option(True, (bool,), help="write A and B into PEFT checkpoints"),
    }

    def select(self, call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> Selection:
        selection = super().select(call, index, config)
        sites = selection.sites
        if sites:  # the shared projections' size: the largest in / out over the selected projections
            config["projection_shape"] = [max(s.out_features for s in sites), max(s.in_features for s in sites)]
        return selection

    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        anchor, r = editor.anchor, config["r"]
        max_out, max_in = config["projection_shape"]
        shared_a, shared_b = projections(config["seed"], r, max_in, max_out)
        x = self._branch_input(anchor, site)
        if config["dropout"] > 0:
            x = editor.call(aten.dropout.default, x, config["dropout"], True)
        a = editor.param("vera_A", lambda: shared_a[:, :site.in_features].clone(), trainable=False)
        b = editor.param("vera_B", lambda: shared_b[:site.out_features].clone(), trainable=False)
        lam_b = editor.param("vera_lambda_b", lambda: torch.zeros(site.out_features))
        lam_d = editor.param("vera_lambda_d", lambda: torch.full((r,), float(config["d_initial"])))
        a_eff = _cached(editor.call(aten.mul.Tensor, a, _cached(editor.call(aten.unsqueeze.default, lam_d, 1))))
        b_eff = _cached(editor.call(aten.mul.Tensor, b, _cached(editor.call(aten.unsqueeze.default, lam_b, 1))))
        delta = editor.call(aten.linear.default, editor.call(aten.linear.default, x, a_eff), b_eff)
        base = editor.value_at(anchor, same_shape=True)
        editor.join(base, aten.add.Tensor, base, delta)

    @staticmethod
    def _branch_input(anchor: Any, site: Site) -> Any:
        from .lora import LoRA

        return LoRA._branch_input(anchor, site)

    def delta(self, site: Site, params: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
        a = params["vera_A"].detach() * params["vera_lambda_d"].detach()[:, None]
        b = params["vera_B"].detach() * params["vera_lambda_b"].detach()[:, None]
        delta = b @ a                                                              # (out, in)
        return delta.T if site.kind == "conv1d" else delta


def _cached(node: Any) -> Any:
    graft_tag(node)["cache"] = True
    return node


# -- PEFT checkpoints ----------------------------------------------------------------------------
_HANDLED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "peft_version", "r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout",
            "d_initial", "fan_in_fan_out", "bias", "init_weights", "modules_to_save", "layers_to_transform",
            "layers_pattern"}


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _in_out(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w.shape[1]) if type(module).__name__ == "Conv1D" else (w.shape[1], w.shape[0])


def peft_import(config: dict[str, Any], state: dict[str, torch.Tensor],
                model: nn.Module) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """A PEFT VeRA checkpoint as ``vera(re:"...", r=, seed=, ...)`` plus per-site lambdas and A/B slices."""
    from graftlib.peft import _exact_regex, _float_text, peft_target_match

    for key, value in config.items():
        if key not in _HANDLED and value not in (None, False, {}, [], ""):
            raise LoadError(f"VeRA checkpoint: not supported: {key}={value!r}; graftlib refuses rather than "
                            "load a different model")
    if config.get("bias", "none") != "none":
        raise LoadError(f"VeRA checkpoint: not supported: bias={config['bias']!r} (trained biases of the base model)")
    modules = {n: m for n, m in model.named_modules() if n and _adaptable(m)}
    chosen = sorted(p for p in modules if peft_target_match(config, p))
    if not chosen:
        raise LoadError(f"VeRA checkpoint: target_modules {config.get('target_modules')!r} select no linear module "
                        f"of {type(model).__name__}; was it saved from another base model?")
    r = int(config.get("r", 256))
    max_in = max(_in_out(modules[p])[0] for p in chosen)
    max_out = max(_in_out(modules[p])[1] for p in chosen)
    shared = _shared_from(state, config, r, max_in, max_out)
    tensors: dict[str, dict[str, torch.Tensor]] = {p: {} for p in chosen}
    for key, tensor in state.items():
        if key in ("base_model.vera_A", "base_model.vera_B"):
            continue
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(vera_lambda_b|vera_lambda_d)", key)
        if match is None or match.group(1) not in tensors:
            raise LoadError(f"VeRA checkpoint: unexpected tensor {key!r}; the checkpoint does not match its config "
                            "or this model")
        tensors[match.group(1)][match.group(2)] = tensor
    for path in chosen:
        din, dout = _in_out(modules[path])
        for name, shape in (("vera_lambda_b", (dout,)), ("vera_lambda_d", (r,))):
            found = tensors[path].get(name)
            if found is None or tuple(found.shape) != shape:
                what = "missing" if found is None else f"of shape {tuple(found.shape)}"
                raise LoadError(f"VeRA checkpoint: tensor {PREFIX}{path}.{name} is {what}; {path} needs {shape}")
        tensors[path]["vera_A"] = shared[0][:, :din].clone()
        tensors[path]["vera_B"] = shared[1][:dout].clone()
    spec = (f're:"{_exact_regex(chosen)}", r={r}, seed={int(config.get("projection_prng_key", 0))}, '
            f'd_initial={_float_text(config.get("d_initial", 0.1))}, '
            f'dropout={_float_text(config.get("vera_dropout", 0.0) or 0.0)}, '
            f'save_projection={"true" if config.get("save_projection", True) else "false"}')
    return f"vera({spec})", tensors


def _shared_from(state: dict[str, torch.Tensor], config: dict[str, Any], r: int, max_in: int,
                 max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    saved = state.get("base_model.vera_A"), state.get("base_model.vera_B")
    if config.get("save_projection", True):
        if saved[0] is None or saved[1] is None:
            raise LoadError("VeRA checkpoint: save_projection=true but base_model.vera_A / vera_B are missing")
        if tuple(saved[0].shape) != (r, max_in) or tuple(saved[1].shape) != (max_out, r):
            raise LoadError(f"VeRA checkpoint: vera_A {tuple(saved[0].shape)} / vera_B {tuple(saved[1].shape)} do "
                            f"not match r={r} and this model's targets ({(r, max_in)} / {(max_out, r)})")
        return saved[0], saved[1]
    if saved[0] is not None or saved[1] is not None:
        raise LoadError("VeRA checkpoint: save_projection=false but the weights file holds vera_A / vera_B")
    return projections(int(config.get("projection_prng_key", 0)), r, max_in, max_out)


def peft_export(grafted: Any, record: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One VeRA adapter as PEFT's adapter_config dict and tensors (A / B at the shared size if saved)."""
    from graftlib.passes.lora_peft import _target_modules

    config = record.config
    index = SiteIndex.build(grafted.base_graph_module)
    tensors = grafted.store.tensors(record.adapter)
    state, paths, kinds = {}, [], set()
    for key in record.sites:
        site = index.by_key(key)
        if site.part is not None:
            raise GraftError(f"adapter {record.adapter!r} adapts {key}, a slice of a fused projection, which PEFT's "
                             "VeRA cannot represent; save it with graftlib's own g.save")
        for name in ("vera_lambda_b", "vera_lambda_d"):
            state[f"{PREFIX}{site.path}.{name}"] = tensors[key][name].detach()
        paths.append(site.path)
        kinds.add(site.kind)
    if config["save_projection"]:
        max_out, max_in = config["projection_shape"]
        a = next(t["vera_A"] for k, t in tensors.items() if k in record.sites and t["vera_A"].shape[1] == max_in)
        b = next(t["vera_B"] for k, t in tensors.items() if k in record.sites and t["vera_B"].shape[0] == max_out)
        state["base_model.vera_A"], state["base_model.vera_B"] = a.detach(), b.detach()
    peft_config = {
        "peft_type": "VERA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": config["r"], "target_modules": _target_modules(grafted, paths), "projection_prng_key": config["seed"],
        "save_projection": config["save_projection"], "vera_dropout": config["dropout"],
        "d_initial": config["d_initial"], "fan_in_fan_out": "conv1d" in kinds, "bias": "none",
        "modules_to_save": None, "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
    }
    return peft_config, state
