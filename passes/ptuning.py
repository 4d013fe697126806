"""P-tuning: prompt tuning whose n virtual tokens come from a reparameterising encoder (Liu et al., 2021).

The virtual tokens are computed inside the graph from an (n, D) table ``E`` by PEFT's PromptEncoder,
then prepended exactly as :mod:`graftlib.passes.prompt` does (embeddings, mask, sizes, outputs):

    encoder=mlp:   P = W3 relu(W2 relu(W1 E + b1) + b2) + b3          # D -> H -> H -> D
    encoder=lstm:  P = W2 relu(W1 biLSTM(E) + b1) + b2                # D -> 2H (L layers) -> 2H -> D
    embedding(W, input_ids)  ->  pad(embedding(W, input_ids), n before) + pad(P, S after)

``hidden`` is H (default: the token dimension D); the LSTM has ``encoder_layers`` layers (PEFT's
``encoder_num_layers``, default 2) with ``dropout`` between them (``encoder_dropout``; a graph dropout
node, so eval mode drops it). Parameters are initialised as PEFT's modules are (nn.Embedding N(0, 1),
nn.Linear / nn.LSTM defaults), from ``seed``. Outputs gain n leading positions (``strip=true``
removes them), as with prompt tuning.

Export: :meth:`PTuning.freeze_for_export` replaces the encoder subgraph by its evaluated output, a
constant (n, D) buffer, so ONNX carries a constant and no encoder. PEFT saves P-tuning the same way
(``prompt_embeddings`` = the encoder's output): :func:`peft_export` writes that, and :func:`peft_import`
reads such a checkpoint back as a plain ``prompt(n=N)`` graft (the encoder weights are not saved by
PEFT). :func:`encoder_state_names` maps PEFT's ``PromptEncoder`` state-dict keys to this pass's
parameter names, for copying a trainable PEFT encoder in or out.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from graftlib.editor import STORE, Editor, escape, graft_tag
from graftlib.registry import Option, in_range, positive, register
from graftlib.runtime import eliminate_dead_code
from graftlib.sites import Site
from graftlib.spec import GraftCall

from .prompt import VirtualTokens, _tokens_node, peft_base_config, virtual_tokens_value
from .prompt import peft_import as _prompt_import

__all__ = ["PTuning", "peft_import", "peft_export", "encoder_state_names", "encoder_init"]

aten = torch.ops.aten


def _lstm_names(layers: int) -> list[str]:
    names = []
    for layer in range(layers):
        for suffix in ("", "_reverse"):
            names += [f"{kind}_l{layer}{suffix}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    return names


def encoder_state_names(config: dict[str, Any]) -> dict[str, str]:
    """PEFT ``PromptEncoder.state_dict()`` key -> parameter name in this pass's store."""
    names = {"embedding.weight": "embedding"}
    heads = (0, 2, 4) if config["encoder"] == "mlp" else (0, 2)
    for index in heads:
        for kind in ("weight", "bias"):
            names[f"mlp_head.{index}.{kind}"] = f"mlp_head_{index}_{kind}"
    if config["encoder"] == "lstm":
        names.update({f"lstm_head.{name}": f"lstm_head_{name}" for name in _lstm_names(config["encoder_layers"])})
    return names


def encoder_init(config: dict[str, Any], dim: int) -> dict[str, torch.Tensor]:
    """Initial parameters (store names), drawn as PEFT's PromptEncoder modules draw them, from ``seed``."""
    n, hidden = config["n"], config["hidden"] or dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        modules: dict[str, nn.Module] = {"embedding": nn.Embedding(n, dim)}
        if config["encoder"] == "lstm":
            modules["lstm_head"] = nn.LSTM(dim, hidden, num_layers=config["encoder_layers"],
                                           bidirectional=True, batch_first=True)
            modules["mlp_head"] = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                                nn.Linear(2 * hidden, dim))
        else:
            modules["mlp_head"] = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                                nn.ReLU(), nn.Linear(hidden, dim))
    state = {f"{prefix}.{key}": value for prefix, module in modules.items()
             for key, value in module.state_dict().items()}
    return {store: state[peft].detach().clone() for peft, store in encoder_state_names(config).items()}


@register
class PTuning(VirtualTokens):
    name = "ptuning"
    options = {
        "n": Option(20, (int,), positive, help="number of virtual tokens"),
        "encoder": Option("mlp", (str,), choices=("mlp", "lstm"), help="reparameterisation"),
        "hidden": Option(None, (int,), positive, help="encoder hidden size (default: token dim)"),
        "encoder_layers": Option(2, (int,), positive, help="LSTM layers"),
        "dropout": Option(0.0, (float,), in_range(0.0, 1.0), help="dropout between LSTM layers"),
        "seed": Option(0, (int,), help="seed of the encoder's initialisation"),
        "strip": Option(False, (bool,), help="slice the n virtual positions off sequence outputs"),
    }

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        super().validate(call, config)
        if config["encoder"] == "mlp" and "encoder_layers" in call.options:
            raise call.option_error("encoder_layers", "encoder_layers= applies to encoder=lstm; the MLP "
                                    "encoder always has 3 linear layers (as PEFT's)")
        if config["encoder"] == "mlp" and config["dropout"] > 0:
            raise call.option_error("dropout", "dropout= applies to encoder=lstm (between its layers); "
                                    "the MLP encoder has none (as PEFT's)")

    def virtual_tokens(self, editor: Editor, site: Site, config: dict[str, Any]) -> fx.Node:
        initial: dict[str, torch.Tensor] = {}

        def param(name: str) -> fx.Node:
            def init() -> torch.Tensor:
                if not initial:
                    initial.update(encoder_init(config, site.out_features))
                return initial[name]
            return editor.param(name, init)

        table = param("embedding")  # (n, D)
        if config["encoder"] == "mlp":
            h = table
            for index in (0, 2, 4):
                h = editor.call(aten.linear.default, h, param(f"mlp_head_{index}_weight"),
                                param(f"mlp_head_{index}_bias"))
                h = editor.call(aten.relu.default, h) if index < 4 else h
            return h
        h = editor.call(aten.unsqueeze.default, table, 0)  # (1, n, D)
        hidden = config["hidden"] or site.out_features
        zeros = editor.call(aten.zeros.default, [2, 1, hidden], dtype=torch.float32)  # (2 directions, 1, H)
        names = _lstm_names(config["encoder_layers"])
        for layer in range(config["encoder_layers"]):
            if layer and config["dropout"] > 0:
                h = editor.call(aten.dropout.default, h, config["dropout"], True)
            weights = [param(f"lstm_head_{name}") for name in names[8 * layer: 8 * layer + 8]]
            out = editor.call(aten.lstm.input, h, [zeros, zeros], weights, True, 1, 0.0, False, True, True)
            h = editor.call(operator.getitem, out, 0)  # (1, n, 2H)
        h = editor.call(aten.squeeze.dim, h, 0)  # (n, 2H)
        h = editor.call(aten.relu.default, editor.call(aten.linear.default, h, param("mlp_head_0_weight"),
                                                       param("mlp_head_0_bias")))
        return editor.call(aten.linear.default, h, param("mlp_head_2_weight"), param("mlp_head_2_bias"))

    def freeze_for_export(self, grafted: Any, record: Any) -> None:
        """Replace the encoder subgraph of `record`'s adapter by its evaluated output, a constant.

        Changes `grafted`'s graph in place (call it on the module being exported, or a derived copy):
        afterwards the virtual tokens are a frozen (n, D) buffer, the encoder no longer runs or trains,
        and the outputs are unchanged.
        """
        graph = grafted.graph
        tokens = _tokens_node(graph, record.adapter)
        if tokens.op == "get_attr":
            return  # already frozen
        value = virtual_tokens_value(grafted, record.adapter)
        target = f"{STORE}_frozen_{escape(record.adapter)}"
        grafted.graph_module.register_buffer(target, value)
        with graph.inserting_before(tokens):
            frozen = graph.get_attr(target)
        frozen.meta.update({k: tokens.meta[k] for k in ("val", "nn_module_stack", "stack_trace") if k in tokens.meta})
        frozen.meta["custom"] = {**(tokens.meta.get("custom") or {})}
        frozen.meta["custom"]["graft"] = {**graft_tag(tokens), "role": "frozen"}
        tokens.replace_all_uses_with(frozen)
        eliminate_dead_code(graph)  # the encoder, LSTM included (fx keeps unused random ops)
        grafted._finish()


def peft_export(grafted: Any, record: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's adapter_config.json dict and state dict for a P-tuning graft.

    PEFT saves P-tuning as the evaluated encoder output, ``prompt_embeddings`` (n, D), and loads it
    into ``PromptEncoder.embedding`` with ``inference_mode=True`` (no encoder); so does this.
    """
    tokens = virtual_tokens_value(grafted, record.adapter).float().contiguous()
    config = peft_base_config(grafted, record, "P_TUNING", tokens.shape[1])
    config.update({
        "encoder_reparameterization_type": record.config["encoder"].upper(),
        "encoder_hidden_size": record.config["hidden"] or tokens.shape[1],
        "encoder_num_layers": record.config["encoder_layers"],
        "encoder_dropout": record.config["dropout"],
    })
    return config, {"prompt_embeddings": tokens}


def peft_import(config: dict[str, Any], state: dict[str, torch.Tensor], model: Any
                ) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """A PEFT P-tuning checkpoint holds only the encoder's output, so it imports as ``prompt(n=N)``."""
    return _prompt_import(config, state, model)
