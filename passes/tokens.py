"""tokens: learned rows for chosen token ids of an embedding (PEFT's TrainableTokens).

    get_attr E  (vocab, dim)  ->  index_copy(E, 0, ids, R)        R (len(ids), dim) starts as E[ids]

Every op that reads the embedding matrix sees the new rows: the lookup, and a tied output projection
(``lm_head`` sharing ``E``), as PEFT's tied TrainableTokens layer does. Only the rows of ``ids`` change;
the rest of the matrix is the base's exactly, and with the adapter off the graph reads ``E`` itself.
Targets are embedding modules (names, quoted globs, re:"..."); ``ids=[0, 10]`` or ``ids=5-9``.
Not mergeable here: the rows stay as nodes (one index_copy per read of the matrix).

PEFT's format: LoRA's ``trainable_token_indices={"emb": [0, 10]}`` with
``base_model.model.emb.token_adapter.trainable_tokens_delta`` (len(ids), dim) - the new rows themselves,
not a difference. ``graftlib.from_peft`` loads it as a second graft ``<adapter>_tokens`` beside the LoRA
(``peft_companion``); ``save_peft(g, dir, "<adapter>")`` writes both (``peft_export_companion``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from graftlib.editor import Editor, graft_tag
from graftlib.errors import GraftSpecError, LoadError, did_you_mean
from graftlib.peft import PREFIX
from graftlib.registry import Method, Option, register
from graftlib.select import Selection, SiteIndex, target_matches
from graftlib.sites import Site, weight_value
from graftlib.spec import GraftCall

if TYPE_CHECKING:
    from graftlib.protocols import GraftedModule, GraftRecord

__all__ = ["TrainableTokens", "peft_companion", "peft_export_companion", "peft_export", "SUFFIX", "DELTA"]

aten = torch.ops.aten
SUFFIX = "_tokens"
DELTA = "token_adapter.trainable_tokens_delta"


def _ids(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return "must be token ids: an id, a list like [0, 10] or a range like 5-9"
    if len(value) > 100_000:
        return f"lists {len(value)} token ids; at most 100000"
    if len(set(value)) != len(value):
        return "lists a token id twice"
    return None


@register
class TrainableTokens(Method):
    """``tokens(embed, ids=[0, 10])``: the embedding rows of those ids replaced by learned rows."""

    name = "tokens"
    needs_targets = False
    mergeable = False
    options = {"ids": Option(None, (tuple, int), _ids, help="token ids whose rows are learned, e.g. [0, 10]")}

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        if not call.targets:
            raise call.error("tokens(...) needs the embedding whose rows it learns, e.g. tokens(embed, ids=[0, 10])")
        if config.get("ids") is None:
            raise call.error("tokens(...) needs ids=[...]: the token ids whose rows are learned")

    def select(self, call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> Selection:
        embeddings = {s.path: s for s in index.sites if s.kind == "embedding" and s.part is None}
        ids = _as_tuple(config["ids"])
        matched: dict[str, list[str]] = {}
        for target in call.targets:
            hits = sorted(p for p in embeddings if target_matches(target, p) or (target.kind == "name" and
                                                                         embeddings[p].role == target.text))
            if not hits:
                raise call.error(f"tokens: {target.text!r} names no embedding of this model; "
                                 f"{did_you_mean(target.text, list(embeddings), 'embeddings')}", target.column)
            for path in hits:
                vocab = embeddings[path].in_features
                if max(ids) >= vocab:
                    raise call.error(f"tokens: id {max(ids)} is out of range for {path} ({vocab} tokens)",
                                     call.option_columns.get("ids"))
            matched[target.text] = [embeddings[p].weight for p in hits]
        return Selection(call, [], matched)

    def rewrite_graph(self, gm: fx.GraphModule, selection: Selection, config: dict[str, Any],
                      index: SiteIndex) -> None:
        ids = list(_as_tuple(config["ids"]))
        weights = sorted({w for found in selection.matched.values() for w in found})
        getters = [n for n in gm.graph.nodes if n.op == "get_attr" and not graft_tag(n)]
        for target in weights:
            matrix = weight_value(gm, target)                                    # (vocab, dim)
            site = Site(target, "weights", target, matrix.shape[0], matrix.shape[1])
            for node in [n for n in getters if n.target == target]:
                editor = Editor(gm, self.name, config["name"], site, node)
                rows = editor.param(_ROWS, lambda m=matrix: m.detach()[ids].clone())  # (len(ids), dim)
                where = editor.param("token_ids", lambda: torch.tensor(ids, dtype=torch.long), trainable=False)
                editor.join(node, aten.index_copy.default, node, 0, where, rows)


_ROWS = "trainable_tokens_delta"


def _as_tuple(value: Any) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


# -- PEFT's format -------------------------------------------------------------------------------
def peft_companion(config: Mapping[str, Any], state: dict[str, torch.Tensor], grafted: "GraftedModule",
                   source: str) -> tuple[str, str, dict[str, dict[str, torch.Tensor]], str] | None:
    """(suffix, spec, tensors, "tokens") of the ``tokens`` graft for LoRA's ``trainable_token_indices``, taking its
    tensors out of `state`; None when the config has none."""
    wanted = config.get("trainable_token_indices")
    if not wanted:
        return None
    if isinstance(wanted, list):
        model = grafted._model
        embed = model.get_input_embeddings() if model is not None and hasattr(model, "get_input_embeddings") else None
        name = next((n for n, m in model.named_modules() if m is embed), None) if embed is not None else None
        if name is None:
            raise LoadError(f"{source}: trainable_token_indices is a list, which PEFT applies to the model's input "
                            "embedding, and this model has no get_input_embeddings(); was it saved from another model?")
        wanted = {name: wanted}
    if not isinstance(wanted, Mapping) or len(wanted) != 1:
        raise LoadError(f"{source}: not supported: trainable_token_indices={str(wanted)[:80]} (graftlib loads the "
                        "token rows of one embedding)")
    (module, ids), = wanted.items()
    if not isinstance(module, str) or _ids(ids) is not None:
        raise LoadError(f"{source}: trainable_token_indices[{str(module)[:60]!r}] {_ids(ids) or 'is not a name'}")
    sites = [s for s in SiteIndex.build(grafted.base_graph_module).sites if s.kind == "embedding" and
             s.part is None and (s.path == module or s.path.endswith("." + module))]
    if len(sites) != 1:
        raise LoadError(f"{source}: trainable_token_indices names {module!r}, which is {len(sites)} embeddings of "
                        f"{grafted._traced.model_class}; was the adapter saved from another base model?")
    path, weight = sites[0].path, sites[0].weight
    key = f"{PREFIX}{path}.{DELTA}"
    matrix = weight_value(grafted.base_graph_module, weight)
    want = (len(ids), matrix.shape[1])
    if key not in state:
        raise LoadError(f"{source}: tensor {key!r} is missing (expected shape {want}); the config has "
                        "trainable_token_indices")
    rows = state.pop(key)
    if tuple(rows.shape) != want:
        raise LoadError(f"{source}: tensor {key!r} has shape {tuple(rows.shape)} but {len(ids)} rows of {path} "
                        f"need {want}; was the adapter saved from another base model?")
    if max(ids) >= matrix.shape[0]:
        raise LoadError(f"{source}: trainable_token_indices: id {max(ids)} is out of range for {path}")
    spec = f'tokens("{path}", ids=[{", ".join(str(int(i)) for i in ids)}])'
    where = torch.tensor([int(i) for i in ids], dtype=torch.long)
    return SUFFIX, spec, {weight: {_ROWS: rows, "token_ids": where}}, "tokens"


def peft_export_companion(grafted: "GraftedModule", record: "GraftRecord", config: dict[str, Any],
                          state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Add a ``tokens`` graft to its LoRA's PEFT config and state (``trainable_token_indices``)."""
    tensors = grafted.store.tensors(record.adapter)
    ids = [int(i) for i in _as_tuple(record.config["ids"])]
    indices = {}
    owners = {s.weight: s.path for s in SiteIndex.build(grafted.base_graph_module).sites if s.kind == "embedding"}
    for weight, params in tensors.items():
        path = owners.get(weight, weight.rsplit(".", 1)[0])
        state[f"{PREFIX}{path}.{DELTA}"] = params[_ROWS].detach()
        indices[path] = ids
    return {**config, "trainable_token_indices": indices}, state


def peft_export(grafted: "GraftedModule", record: "GraftRecord") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A tokens graft alone has no PEFT form: PEFT stores trainable tokens with a LoRA adapter."""
    from graftlib.errors import GraftError

    raise GraftError(f"not supported: saving the tokens adapter {record.adapter!r} alone in PEFT's format (PEFT "
                     "writes trainable tokens as a LoRA adapter's trainable_token_indices); load it from PEFT "
                     "with its LoRA, or use g.save(dir)")
