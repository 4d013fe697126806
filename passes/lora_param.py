"""lora_param: LoRA on a raw parameter, wherever the graph reads it (PEFT's ``target_parameters``).

    get_attr W                       ->  add(W, mm(B, A), alpha=s)                  W (d0, d1): A (r, d1), B (d0, r)
    get_attr W  (E, d1, d2) experts  ->  add(W, bmm(B_e, A_e), alpha=s)            PEFT's ParamWrapper layout:
        A (r E, in) -> A_e (E, r, in);  B (out, r E) -> B_e = B.view(out, r, E).permute(2, 0, 1)  (E, out, r)
        not transposed (W is (E, out, in) as d1 = out):  delta_e = B_e @ A_e                    (E, d1, d2)
        transposed=true (W is (E, in, out)):              delta_e = (B_e @ A_e)^T = A_e^T B_e^T  (E, d1, d2)

with ``s = alpha / r`` (rsLoRA ``alpha / sqrt(r)``). This is PEFT's ``ParamWrapper``: the parameter is
replaced by ``W + delta`` for the forward (``nn.utils.parametrize``), so every op that reads it sees the
adapted value. Init as PEFT: A kaiming-uniform, B zero, so the graft starts as the base model exactly.
Targets are parameter paths (``"lin0.weight"``, a name ending, a quoted glob or ``re:"..."``).
Not mergeable here: the delta stays as nodes (one add per read of the parameter).

PEFT's format (``peft_type`` LORA with ``target_parameters``): ``base_model.model.<module>.lora_A.weight``
/ ``.lora_B.weight`` for the parameter's owner module; passes/lora_peft.py imports it (``peft_import_params``)
and this file exports it (``peft_export``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from graftlib.editor import Editor, graft_tag
from graftlib.errors import GraftError, GraftSpecError, LoadError, did_you_mean
from graftlib.peft import PREFIX, _float_text, _graph_parameters
from graftlib.registry import Method, Option, positive, register
from graftlib.select import Selection, SiteIndex, target_matches
from graftlib.sites import Site, weight_value
from graftlib.spec import GraftCall

if TYPE_CHECKING:
    from graftlib.protocols import GraftedModule, GraftRecord

__all__ = ["LoRAParam", "param_delta", "graft_param", "peft_param_targets", "peft_import_params", "peft_export"]

aten = torch.ops.aten


def _scale(config: Mapping[str, Any]) -> float:
    r = int(config["r"])
    alpha = float(r) if config.get("alpha") is None else float(config["alpha"])
    return alpha / math.sqrt(r) if config.get("rslora") else alpha / r


def _factor_shapes(shape: tuple[int, ...], r: int, transposed: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """PEFT's (A, B) shapes for a parameter of `shape` (ParamWrapper._get_in_out_features / update_layer)."""
    if len(shape) == 2:
        return (r, shape[1]), (shape[0], r)
    experts, d1, d2 = shape
    fan_in, fan_out = (d1, d2) if transposed else (d2, d1)
    return (r * experts, fan_in), (fan_out, r * experts)


def param_delta(shape: tuple[int, ...], a: torch.Tensor, b: torch.Tensor, scale: float,
                transposed: bool) -> torch.Tensor:
    """The parameter's change ``s * B A`` in its own shape (PEFT's ``ParamWrapper.get_delta_weight``)."""
    if len(shape) == 2:
        return scale * (b @ a)
    experts = shape[0]
    a_e = a.reshape(experts, -1, a.shape[-1])                      # (E, r, in)
    b_e = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)      # (E, out, r)
    delta = b_e @ a_e                                               # (E, out, in)
    return scale * (delta.transpose(1, 2) if transposed else delta)


def _kaiming(shape: tuple[int, int]) -> torch.Tensor:
    weight = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


@register
class LoRAParam(Method):
    """``lora_param("lin0.weight", r=4)``: W + s * B @ A at every read of the parameter (PEFT's ParamWrapper)."""

    name = "lora_param"
    needs_targets = False
    mergeable = False
    options = {
        "r": Option(8, (int,), positive, help="rank (per expert for a 3-D parameter)"),
        "alpha": Option(None, (float,), positive, help="scale numerator (default: r)"),
        "rslora": Option(False, (bool,), help="scale alpha/sqrt(r) instead of alpha/r"),
        "transposed": Option(False, (bool,), help="a 3-D parameter is (experts, in, out) (PEFT's is_transposed)"),
    }

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        if not call.targets:
            raise call.error('lora_param(...) needs the parameters it adapts, e.g. lora_param("lin0.weight", r=4)')

    def select(self, call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> Selection:
        kinds = _graph_parameters(index.graph_module)
        params = sorted(t for t, kind in kinds.items() if kind == "parameter")
        matched: dict[str, list[str]] = {}
        for target in call.targets:
            hits = [p for p in params if target_matches(target, p)]
            if not hits:
                raise call.error(f"lora_param: {target.text!r} names no parameter the graph reads; "
                                 f"{did_you_mean(target.text, params, 'parameters')}", target.column)
            for path in hits:
                ndim = weight_value(index.graph_module, path).dim()
                if ndim not in (2, 3):
                    raise call.error(f"lora_param: not supported: {path} is {ndim}-D; LoRA on a parameter needs a "
                                     "2-D matrix or a 3-D (experts, ., .) stack", target.column)
            matched[target.text] = hits
        return Selection(call, [], matched)

    def rewrite_graph(self, gm: fx.GraphModule, selection: Selection, config: dict[str, Any],
                      index: SiteIndex) -> None:
        targets = sorted({p for params in selection.matched.values() for p in params})
        getters = [n for n in gm.graph.nodes if n.op == "get_attr" and not graft_tag(n)]
        r, scale, transposed = int(config["r"]), _scale(config), bool(config["transposed"])
        for target in targets:
            shape = tuple(weight_value(gm, target).shape)
            a_shape, b_shape = _factor_shapes(shape, r, transposed)
            site = Site(target, "weights", target, a_shape[1], b_shape[0])
            for node in [n for n in getters if n.target == target]:
                graft_param(Editor(gm, self.name, config["name"], site, node), shape, r, scale, transposed)


def graft_param(editor: Editor, shape: tuple[int, ...], r: int, scale: float, transposed: bool) -> None:
    """At the parameter read ``editor.anchor``: ``add(W, delta(B, A), alpha=s)``, A kaiming and B zero (PEFT)."""
    a_shape, b_shape = _factor_shapes(shape, r, transposed)
    a = editor.param("lora_A", lambda: _kaiming(a_shape))
    b = editor.param("lora_B", lambda: torch.zeros(b_shape))
    node = editor.anchor
    editor.join(node, aten.add.Tensor, node, _delta_nodes(editor, shape, a, b, transposed), alpha=scale)


def _delta_nodes(editor: Editor, shape: tuple[int, ...], a: fx.Node, b: fx.Node, transposed: bool) -> fx.Node:
    """``param_delta`` as graph nodes (without the scale, which the join's alpha applies)."""
    if len(shape) == 2:
        return editor.call(aten.mm.default, b, a)                                     # (d0, d1)
    experts = shape[0]
    a_e = editor.call(aten.view.default, a, [experts, -1, a.meta["val"].shape[-1]])    # (E, r, in)
    b_e = editor.call(aten.view.default, b, [b.meta["val"].shape[0], -1, experts])     # (out, r, E)
    b_e = editor.call(aten.permute.default, b_e, [2, 0, 1])                          # (E, out, r)
    delta = editor.call(aten.bmm.default, b_e, a_e)                                  # (E, out, in)
    return editor.call(aten.transpose.int, delta, 1, 2) if transposed else delta


# -- PEFT's format -------------------------------------------------------------------------------
def peft_param_targets(config: Mapping[str, Any], params: list[str]) -> list[str]:
    """The parameter paths PEFT's ``target_parameters`` select (``key == t`` or ``key.endswith('.' + t)``)."""
    wanted = config.get("target_parameters") or []
    if not isinstance(wanted, list) or not all(isinstance(t, str) and 0 < len(t) <= 1000 for t in wanted) or \
            len(wanted) > 10_000:
        raise LoadError(f"target_parameters={str(wanted)[:80]!r} must be a list of parameter names")
    return sorted(p for p in params if any(p == t or p.endswith("." + t) for t in wanted))


def peft_import_params(config: Mapping[str, Any], paths: list[str], state: Mapping[str, torch.Tensor],
                       grafted: "GraftedModule", source: str, r: int, alpha: float) -> tuple[str, dict, dict]:
    """``lora_param(...)`` spec and tensors for PEFT LoRA on raw parameters `paths` (one rank and alpha)."""
    owners = [p.rsplit(".", 1)[0] for p in paths]
    if len(set(owners)) != len(owners):
        raise LoadError(f"{source}: not supported: target_parameters with two parameters of one module ({paths})")
    model = grafted._model
    flags = {bool(getattr(model.get_submodule(o), "is_transposed", False)) if model is not None else False
             for o, p in zip(owners, paths) if weight_value(grafted.graph_module, p).dim() == 3}
    if len(flags) > 1:
        raise LoadError(f"{source}: not supported: target_parameters on expert stacks of both layouts (is_transposed)")
    transposed = bool(flags and flags.pop())
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    seen = set()
    for path, owner in zip(paths, owners):
        shape = tuple(weight_value(grafted.graph_module, path).shape)
        a_shape, b_shape = _factor_shapes(shape, r, transposed)
        found = {}
        for name, want in (("lora_A", a_shape), ("lora_B", b_shape)):
            key = f"{PREFIX}{owner}.{name}.weight"
            if key not in state:
                raise LoadError(f"{source}: tensor {key!r} is missing (expected shape {want}); the config targets "
                                f"the parameter {path}")
            if tuple(state[key].shape) != want:
                raise LoadError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)} but LoRA on "
                                f"{path} {shape} with r={r} needs {want}; was the adapter saved from another base "
                                "model?")
            found[name] = state[key]
            seen.add(key)
        tensors[path] = found
    stray = sorted(set(state) - seen)
    if stray:
        raise LoadError(f"{source}: unexpected tensor {stray[0]!r}: not a LoRA factor of the target_parameters "
                        f"{paths}; the checkpoint does not match its config or this model")
    regex = "|".join(p.replace(".", "\\.") for p in paths)
    rslora = "true" if config.get("use_rslora") else "false"
    spec = (f're:"{regex}", r={r}, alpha={_float_text(alpha)}, rslora={rslora}, '
            f"transposed={'true' if transposed else 'false'}")
    return f"lora_param({spec})", tensors, {}


def peft_export(grafted: "GraftedModule", record: "GraftRecord") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's adapter_config (LORA with target_parameters) and state dict for a lora_param(...) graft."""
    tensors = grafted.store.tensors(record.adapter)
    if record.config.get("transposed"):
        raise GraftError("not supported: saving lora_param(transposed=true) in PEFT's format (PEFT reads the "
                         "layout from the module's is_transposed attribute, which graftlib cannot write)")
    state = {}
    for path, params in tensors.items():
        owner = path.rsplit(".", 1)[0]
        state[f"{PREFIX}{owner}.lora_A.weight"] = params["lora_A"].detach()
        state[f"{PREFIX}{owner}.lora_B.weight"] = params["lora_B"].detach()
    original = dict((record.extras.get("peft") or {}).get("config") or {})
    r = int(record.config["r"])
    alpha = float(r) if record.config.get("alpha") is None else float(record.config["alpha"])
    keep = {k: v for k, v in original.items() if k in ("task_type", "base_model_name_or_path", "revision",
                                                      "auto_mapping")}
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None, **keep,
              "inference_mode": True, "r": r, "lora_alpha": alpha, "target_modules": None,
              "target_parameters": sorted(tensors), "exclude_modules": None, "lora_dropout": 0.0,
              "fan_in_fan_out": False, "bias": "none", "use_rslora": bool(record.config.get("rslora")),
              "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
              "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
              "lora_bias": False}
    return config, state
