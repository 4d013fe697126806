"""AdaLoRA: an SVD-form low-rank branch whose rank is pruned by importance while training.

    linear(x, W, b)          ->  linear(x, W, b) + linear(linear(dropout(x), A * E), B) * alpha / (ranknum + 1e-5)
    addmm(b, x, W)  (Conv1D) ->  addmm(b, x, W)  + linear(linear(dropout(x), A * E), B) * alpha / (ranknum + 1e-5)
    conv2d(x, W, ...)        ->  conv2d(x, W, ...) + conv2d(dropout(x), view(B @ (A * E), W.shape) * alpha / (ranknum + 1e-5), ...)
    embedding(T, i)          ->  embedding(T, i) + linear(embedding((A * E)^T, i), B) * alpha / (ranknum + 1e-5)

``A`` (r, in) holds right singular vectors (conv: (r, in/groups * kh * kw); embedding: (r, vocab)),
``E`` (r, 1) singular values, ``B`` (out, r) left singular vectors; ``ranknum`` is a (1,) buffer equal to
``init_r`` (PEFT keeps it at ``init_r`` after pruning, so pruning never rescales the kept triplets).
E starts at zero and A, B ~ N(0, 0.02), so the grafted model equals the base model at first.

Training (formulas of PEFT's ``RankAllocator``)::

    loss = task_loss + g.regularization_loss()   # orth_reg * mean(||A A^T - I||_F, ||B^T B - I||_F)
    loss.backward(); optimizer.step()
    g.update_and_allocate(step)                  # after backward, before zero_grad
    optimizer.zero_grad()

``update_and_allocate`` keeps, per entry w of A, E, B, the EMAs ``s = b1 s + (1-b1) |w grad|`` and
``u = b2 u + (1-b2) |(|w grad|) - s|``; the triplet score is ``s*u`` of its E entry + the mean over its
A row + the mean over its B column. The budget (total kept rank) follows the cubic schedule from
``init_r * sites`` (steps <= tinit) to ``target_r * sites`` (step total_steps - tfinal); every
``delta_t`` steps the ``init - budget`` lowest triplets over all sites get E = 0 (PEFT's global
kth-value threshold; ties at the threshold are broken by position so exactly that many are masked,
where PEFT's ``<=`` would mask every tied triplet, e.g. all of them while E is still zero). At step
``total_steps - tfinal`` a final allocation *shrinks* every branch to its kept rank: A, E, B become
smaller Parameters (rebuild the optimizer over ``g.trainable_parameters()`` then), a site left with
rank 0 loses its branch from the graph, the kept ranks are written into the spec as ``ranks=[...]``
(one per site, in sorted site-key order) so save/load and re-tracing rebuild the same shapes, and the
masks go to ``record.extras["rank_pattern"]``.

Merge: ``W += (B @ (A * E)) * alpha / (ranknum + 1e-5)`` (transposed for Conv1D and embeddings,
reshaped to the kernel for conv2d). ``peft_import`` / ``peft_export`` convert PEFT AdaLoRA checkpoints.
"""
from __future__ import annotations

import math
import operator
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from graftlib.editor import Editor, graft_tag
from graftlib.errors import GraftError, LoadError
from graftlib.registry import Method, Option, positive, register
from graftlib.select import Selection, SiteIndex
from graftlib.conv import conv_op
from graftlib.sites import Site
from graftlib.spec import GraftCall
from graftlib.passes.lora import LoRA

__all__ = ["AdaLoRA", "AllocatorState", "RankTable", "budget_schedule", "allocator_state",
           "triplet_scores", "peft_import", "peft_export"]

aten = torch.ops.aten
EPS = 1e-5
TRIPLET = ("lora_A", "lora_E", "lora_B")
_PEFT_PREFIX = "base_model.model."


def _open_unit(value: Any) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_steps: int, delta_t: int) -> tuple[int, bool]:
    """(total kept rank, whether to mask) at `step`: PEFT's cubic schedule."""
    if step <= tinit:
        return init_budget, False
    if step > total_steps - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_steps - tfinal - tinit)
    budget = int((init_budget - target_budget) * remaining ** 3 + target_budget)
    return budget, step % delta_t == 0


def _alpha(config: dict[str, Any]) -> float:
    return float(config["init_r"]) if config["alpha"] is None else config["alpha"]


def _site_rank(site_key: str, config: dict[str, Any]) -> int:
    return (config.get("site_ranks") or {}).get(site_key, config["init_r"])


def _a_columns(site: Site) -> int:
    if site.kind == "conv":
        return site.in_features // site.conv["groups"] * math.prod(site.conv["kernel"])
    return site.in_features


# -- allocator state (per record, outside the graph) ------------------------------------------------
@dataclass
class AllocatorState:
    """What ``update_and_allocate`` remembers between steps for one adapter."""

    last_step: int | None = None
    sensitivity: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # EMA of |w grad|
    uncertainty: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # EMA of |ipt - s|
    masks: dict[str, torch.Tensor] = field(default_factory=dict)   # site -> kept triplets (bool (r,))
    budget: int | None = None
    watch: dict[str, torch.Tensor] = field(default_factory=dict)   # E right after the shrink


_STATES: dict[int, AllocatorState] = {}


def _state(record: Any) -> AllocatorState:
    key = id(record)
    state = _STATES.get(key)
    if state is None:
        state = _STATES[key] = AllocatorState()
        weakref.finalize(record, _STATES.pop, key, None)
    return state


def allocator_state(grafted: Any, adapter: str = "default") -> AllocatorState:
    """The allocator state of AdaLoRA adapter `adapter` of `grafted`."""
    grafted._check_names([adapter])
    record = grafted.adapters[adapter]
    if record.method != AdaLoRA.name:
        raise GraftError(f"adapter {adapter!r} is {record.method}, not adalora")
    return _state(record)


def triplet_scores(state: AllocatorState, sites: list[str]) -> dict[str, torch.Tensor]:
    """Importance of each triplet, per site: s*u of E_i + mean_j s*u of A_ij + mean_k s*u of B_ki."""
    def score(key: str, name: str) -> torch.Tensor:
        return state.sensitivity[(key, name)] * state.uncertainty[(key, name)]

    return {key: score(key, "lora_E").view(-1) + score(key, "lora_A").mean(dim=1)
            + score(key, "lora_B").mean(dim=0) for key in sites}


# -- the rank report --------------------------------------------------------------------------------
@dataclass
class RankTable:
    """Kept rank per site of one AdaLoRA adapter; ``print`` shows it as a table."""

    adapter: str
    rows: list[tuple[str, int, int]]      # (site, kept rank, initial rank)
    target: int                           # target budget: target_r * sites

    @property
    def total(self) -> int:
        return sum(kept for _, kept, _ in self.rows)

    def as_dict(self) -> dict[str, int]:
        return {site: kept for site, kept, _ in self.rows}

    def __str__(self) -> str:
        width = max([len("site"), len("total")] + [len(s) for s, _, _ in self.rows])
        lines = [f"adalora {self.adapter!r}: kept rank per site", f"{'site':<{width}}  kept / init"]
        lines += [f"{site:<{width}}  {kept:>4} / {init}" for site, kept, init in self.rows]
        initial = sum(init for _, _, init in self.rows)
        lines.append(f"{'total':<{width}}  {self.total:>4} / {initial}  (target {self.target})")
        return "\n".join(lines)

    __repr__ = __str__


# -- the method -------------------------------------------------------------------------------------
@register
class AdaLoRA(Method):
    name = "adalora"
    site_kinds = ("linear", "conv1d", "conv", "embedding")
    mergeable = True
    resizable = True
    options = {
        "init_r": Option(12, (int,), positive, help="initial rank per site"),
        "target_r": Option(8, (int,), positive, help="average rank per site after allocation (<= init_r)"),
        "alpha": Option(None, (float,), positive, help="scale numerator (default: init_r)"),
        "dropout": Option(0.0, (float,), lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
                          help="dropout on the branch input"),
        "tinit": Option(0, (int,), _non_negative, help="warm-up steps before pruning"),
        "tfinal": Option(0, (int,), _non_negative, help="steps of fine-tuning after the final allocation"),
        "delta_t": Option(1, (int,), positive, help="steps between allocations"),
        "beta1": Option(0.85, (float,), _open_unit, help="EMA coefficient of the sensitivity"),
        "beta2": Option(0.85, (float,), _open_unit, help="EMA coefficient of the uncertainty"),
        "orth_reg": Option(0.5, (float,), _non_negative, help="weight of the orthogonality penalty"),
        "total_steps": Option(None, (int,), positive, help="training length (needed by update_and_allocate)"),
        "ranks": Option(None, (tuple, int), help="kept rank per site in sorted site-key order "
                                                 "(written by the final allocation)"),
    }

    # -- configure / select ----------------------------------------------------------------------
    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        if config["target_r"] > config["init_r"] and "target_r" not in call.options:
            config["target_r"] = config["init_r"]  # the default 8 with a smaller init_r: keep every rank
        if config["target_r"] > config["init_r"]:
            raise call.option_error("target_r", f"target_r={config['target_r']} exceeds init_r="
                                    f"{config['init_r']}: AdaLoRA only prunes, lower target_r")
        total = config["total_steps"]
        if total is not None and config["tinit"] >= total - config["tfinal"]:
            raise call.option_error(
                "total_steps", f"total_steps={total} with tinit={config['tinit']} and tfinal="
                f"{config['tfinal']} leaves no budgeting phase: need tinit < total_steps - tfinal")
        ranks = config["ranks"]
        if ranks is not None:
            ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
            bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool)
                   or not 0 <= r <= config["init_r"]]
            if bad:
                raise call.option_error("ranks", f"ranks {bad} must be integers in [0, init_r="
                                                 f"{config['init_r']}]")
            config["ranks"] = ranks

    def select(self, call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> Selection:
        selection = super().select(call, index, config)
        # a fused projection selected whole is not also adapted per slice (the path matches both)
        whole = {s.path for s in selection.sites if s.part is None}
        sites = [s for s in selection.sites if s.part is None or s.path not in whole]
        ranks = config["ranks"]
        if ranks is not None:
            keys = sorted(s.key for s in sites)
            if len(ranks) != len(keys):
                raise call.option_error(
                    "ranks", f"ranks has {len(ranks)} entries but {call.text.split('(')[0]} selects "
                    f"{len(keys)} sites; give one rank per site in sorted site-key order")
            config["site_ranks"] = dict(zip(keys, ranks))
        return Selection(call, sites, selection.matched)

    # -- rewrite ---------------------------------------------------------------------------------
    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        r = _site_rank(site.key, config)
        shapes = {"lora_A": (r, _a_columns(site)), "lora_E": (r, 1), "lora_B": (site.out_features, r)}
        inits = {"lora_A": lambda: torch.randn(shapes["lora_A"]) * 0.02,
                 "lora_E": lambda: torch.zeros(shapes["lora_E"]),
                 "lora_B": lambda: torch.randn(shapes["lora_B"]) * 0.02,
                 "ranknum": lambda: torch.tensor([float(config["init_r"])])}
        if r == 0:  # a pruned-away site keeps (empty) tensors for merge and save, but no branch
            holder = editor.store.site_params(editor.adapter, site.key)
            for name, init in inits.items():
                if not hasattr(holder, name):
                    if name == "ranknum":
                        holder.register_buffer(name, init())
                    else:
                        holder.register_parameter(name, nn.Parameter(init()))
            return
        a, e, b = (editor.param(name, inits[name]) for name in TRIPLET)
        ranknum = editor.param("ranknum", inits["ranknum"], trainable=False)
        anchor = editor.anchor
        ae = editor.call(aten.mul.Tensor, a, e)  # (r, cols)
        denominator = editor.call(aten.add.Tensor, ranknum, EPS)
        alpha = _alpha(config)
        if site.kind == "conv":
            conv = site.conv
            x = LoRA._dropout(editor, anchor.args[0], config)
            kernel = [site.out_features, site.in_features // conv["groups"], *conv["kernel"]]
            w = editor.call(aten.view.default, editor.call(aten.mm.default, b, ae), kernel)
            w = editor.call(aten.div.Tensor, editor.call(aten.mul.Tensor, w, alpha), denominator)
            scaled = editor.call(conv_op(site), x, w, None, conv["stride"], conv["padding"],
                                 conv["dilation"], conv["groups"])
        else:
            if site.kind == "embedding":
                padding_idx = anchor.args[2] if len(anchor.args) > 2 else -1
                low = editor.call(aten.embedding.default, editor.call(aten.t.default, ae), anchor.args[1],
                                  padding_idx)
            else:
                x = LoRA._dropout(editor, LoRA._branch_input(anchor, site), config)
                low = editor.call(aten.linear.default, x, ae)
            delta = editor.call(aten.linear.default, low, b)
            scaled = editor.call(aten.div.Tensor, editor.call(aten.mul.Tensor, delta, alpha), denominator)
        base = editor.value_at(anchor, same_shape=True)  # before a prompt's prepend
        editor.join(base, aten.add.Tensor, base, scaled)

    def delta(self, site: Site, params: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
        a, e, b, ranknum = (params[n].detach() for n in (*TRIPLET, "ranknum"))
        w = b @ (a * e) * _alpha(config) / (ranknum + EPS)  # (out, cols)
        if site.kind == "conv":
            return w.reshape(site.out_features, site.in_features // site.conv["groups"], *site.conv["kernel"])
        return w.T if site.kind in ("conv1d", "embedding") else w

    # -- hooks Grafted delegates to ------------------------------------------------------------------
    def regularization_loss(self, grafted: Any, record: Any) -> torch.Tensor:
        """orth_reg * mean over A and B of ||A A^T - I||_F and ||B^T B - I||_F (PEFT's formula)."""
        tensors = grafted.store.tensors(record.adapter)
        terms = []
        for key in record.sites:
            a, b = tensors[key]["lora_A"], tensors[key]["lora_B"]
            for matrix, cov in ((a, a @ a.T), (b, b.T @ b)):
                if matrix.requires_grad:
                    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                    terms.append(torch.linalg.matrix_norm(cov - eye, "fro"))
        if not terms:
            return torch.zeros(())
        return record.config["orth_reg"] * torch.stack(terms).mean()

    def update_and_allocate(self, grafted: Any, record: Any, step: int) -> int | None:
        """Update importance, mask to the step's budget, shrink at the end; returns the budget."""
        config, adapter = record.config, record.adapter
        tensors = grafted.store.tensors(adapter)
        if not any(t[n].requires_grad for t in tensors.values() for n in TRIPLET):
            return None  # a frozen AdaLoRA adapter (e.g. imported for inference) does not allocate
        if config["total_steps"] is None:
            raise GraftError(f"adalora adapter {adapter!r} has no total_steps, which the rank schedule "
                             f"needs: graft it with adalora(..., total_steps=N) (N = training steps)")
        if isinstance(step, bool) or not hasattr(type(step), "__index__") or operator.index(step) < 0:
            raise GraftError(f"update_and_allocate(step={step!r}): step must be the global step, an int >= 0")
        step = operator.index(step)
        state = _state(record)
        if state.last_step is not None and step <= state.last_step:
            raise GraftError(f"update_and_allocate({step}) came after update_and_allocate({state.last_step}) "
                             f"for adapter {adapter!r}: steps must increase; pass the global optimizer step")
        end = config["total_steps"] - config["tfinal"]
        if config["ranks"] is not None:  # already allocated (here, or loaded with its final ranks)
            if step < end:
                raise GraftError(
                    f"adalora adapter {adapter!r} already has its final ranks (ranks={list(config['ranks'])}); "
                    f"step {step} is before the end of its schedule ({end}): graft without ranks= to allocate again")
            state.last_step = step
            self._check_optimizer(grafted, record, state)
            return None
        if step < end:
            self._update_importance(grafted, record, state)
        state.last_step = step
        init_budget = config["init_r"] * len(record.sites)
        budget, mask = budget_schedule(step, init_budget, config["target_r"] * len(record.sites),
                                       config["tinit"], config["tfinal"], config["total_steps"],
                                       config["delta_t"])
        state.budget = budget
        if step >= end:
            self._mask(grafted, record, state, budget)
            self._shrink(grafted, record, state)
        elif mask:
            self._mask(grafted, record, state, budget)
        return budget

    def rank_allocation(self, grafted: Any, record: Any) -> RankTable:
        state, tensors = _state(record), grafted.store.tensors(record.adapter)
        rows = []
        for key in record.sites:
            mask = state.masks.get(key)
            kept = int(mask.sum()) if mask is not None and record.config["ranks"] is None \
                else tensors[key]["lora_E"].shape[0]
            rows.append((key, kept, record.config["init_r"]))
        return RankTable(record.adapter, rows, record.config["target_r"] * len(record.sites))

    # -- allocation internals --------------------------------------------------------------------
    @staticmethod
    def _update_importance(grafted: Any, record: Any, state: AllocatorState) -> None:
        tensors = grafted.store.tensors(record.adapter)
        params = [(key, name, tensors[key][name]) for key in record.sites for name in TRIPLET]
        if all(p.grad is None for _, _, p in params):
            raise GraftError(f"adalora adapter {record.adapter!r} has no gradients: call "
                             "g.update_and_allocate(step) after loss.backward() and before optimizer.zero_grad(), "
                             "with the adapter active in the forward pass")
        beta1, beta2 = record.config["beta1"], record.config["beta2"]
        with torch.no_grad():
            for key, name, p in params:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                ipt = (p * grad).abs()
                s = state.sensitivity.get((key, name), torch.zeros_like(p))
                u = state.uncertainty.get((key, name), torch.zeros_like(p))
                s = beta1 * s + (1 - beta1) * ipt
                state.sensitivity[(key, name)] = s
                state.uncertainty[(key, name)] = beta2 * u + (1 - beta2) * (ipt - s).abs()

    @staticmethod
    def _mask(grafted: Any, record: Any, state: AllocatorState, budget: int) -> None:
        if not state.sensitivity:
            raise GraftError(f"adalora adapter {record.adapter!r} has no importance scores yet: call "
                             "g.update_and_allocate(step) after every backward() from the first step")
        scores = triplet_scores(state, record.sites)
        flat = torch.cat([scores[key] for key in record.sites])
        keep = torch.ones_like(flat, dtype=torch.bool)
        count = flat.numel() - budget
        if count > 0:  # the `count` lowest scores: kth-value threshold, ties broken by position
            keep[torch.argsort(flat, stable=True)[:count]] = False
        tensors = grafted.store.tensors(record.adapter)
        with torch.no_grad():
            for key, kept in zip(record.sites, keep.split([scores[k].numel() for k in record.sites])):
                tensors[key]["lora_E"].masked_fill_(~kept.view(-1, 1), 0.0)
                state.masks[key] = kept

    @staticmethod
    def _shrink(grafted: Any, record: Any, state: AllocatorState) -> None:
        """Replace A, E, B by their kept rows/columns; drop the branches of rank-0 sites."""
        adapter = record.adapter
        ranks: dict[str, int] = {}
        for key in record.sites:
            holder = grafted.store.site_params(adapter, key, create=False)
            index = state.masks[key].nonzero().view(-1)
            for name in TRIPLET:
                old = holder._parameters[name]
                value = old.detach()[:, index] if name == "lora_B" else old.detach()[index]
                holder._parameters[name] = nn.Parameter(value.clone(), requires_grad=old.requires_grad)
            ranks[key] = int(index.numel())
            if ranks[key]:
                state.watch[key] = holder.lora_E.detach().clone()
        _drop_branches(grafted, adapter, [k for k, r in ranks.items() if r == 0])
        _refresh_shapes(grafted.graph, adapter)
        ordered = [ranks[k] for k in sorted(ranks)]
        record.config = {**record.config, "ranks": tuple(ordered), "site_ranks": dict(sorted(ranks.items()))}
        record.spec = _with_ranks(record.spec, ordered)
        record.extras = {**record.extras,
                         "rank_pattern": {k: state.masks[k].tolist() for k in record.sites}}
        state.sensitivity.clear()
        state.uncertainty.clear()
        grafted._finish()

    @staticmethod
    def _check_optimizer(grafted: Any, record: Any, state: AllocatorState) -> None:
        """Warn once if the shrunk tensors have gradients but never change (a stale optimizer)."""
        if not state.watch:
            return
        tensors = grafted.store.tensors(record.adapter)
        watched, state.watch = state.watch, {}
        params = [tensors[key]["lora_E"] for key in watched]
        if all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params) and \
                all(torch.equal(p.detach(), watched[key]) for key, p in zip(watched, params)):
            warnings.warn(f"adalora adapter {record.adapter!r} shrank at step {record.config['total_steps'] - record.config['tfinal']} "
                          "but its new parameters are not being updated: rebuild the optimizer over "
                          "g.trainable_parameters() after the final allocation", stacklevel=3)


def _with_ranks(spec: str, ranks: list[int]) -> str:
    """The call text with ``ranks=[...]`` added (the call has no ranks yet: it was still allocating)."""
    close = spec.rindex(")")
    return f"{spec[:close].rstrip()}, ranks=[{','.join(str(r) for r in ranks)}])"


def _drop_branches(grafted: Any, adapter: str, sites: list[str]) -> None:
    if not sites:
        return
    graph, wanted = grafted.graph, set(sites)
    for node in list(graph.nodes):
        tag = graft_tag(node)
        if tag and tag.get("role") == "join" and tag["adapter"] == adapter and tag["site"] in wanted:
            node.replace_all_uses_with(node.args[tag["base"]])
            graph.erase_node(node)
    graph.eliminate_dead_code()


def _refresh_shapes(graph: fx.Graph, adapter: str) -> None:
    """Recompute ``meta["val"]`` of the adapter's nodes after its tensors changed shape."""
    gm = graph.owning_module
    for node in graph.nodes:
        tag = graft_tag(node)
        old = node.meta.get("val")
        if not tag or tag.get("adapter") != adapter or getattr(old, "fake_mode", None) is None:
            continue
        mode = old.fake_mode
        try:
            if node.op == "get_attr":
                value = gm
                for part in node.target.split("."):
                    value = getattr(value, part)
                node.meta["val"] = mode.from_tensor(value, static_shapes=True)
            elif node.op == "call_function":
                args, kwargs = tree_map(_fake_of, (node.args, node.kwargs))
                with mode:
                    node.meta["val"] = node.target(*args, **kwargs)
        except Exception:  # metadata only; the graph stays valid
            node.meta.pop("val", None)


def _fake_of(value: Any) -> Any:
    return value.meta.get("val") if isinstance(value, fx.Node) else value


# -- PEFT interop ---------------------------------------------------------------------------------
def _float_text(value: float) -> str:
    text = repr(float(value))
    return text if any(c in text for c in ".eE") else text + ".0"


def peft_import(config: dict[str, Any], state: dict[str, torch.Tensor],
                model: nn.Module) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """A PEFT AdaLoRA checkpoint (adapter_config.json as a dict, adapter_model tensors) as a graftlib
    spec plus tensors per site key (``{"lora_A", "lora_E", "lora_B", "ranknum"}``).

    Tensors saved at full ``init_r`` with a ``rank_pattern`` are cut to the kept triplets; a rank
    pattern makes the spec carry ``ranks=[...]`` so the branches are built at their pruned size.
    """
    if str(config.get("peft_type", "")).upper() != "ADALORA":
        raise LoadError(f"not an AdaLoRA checkpoint: peft_type={config.get('peft_type')!r} (expected 'ADALORA')")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_E)(?:\.[A-Za-z_]\w*)?", key)
        if match is None:
            unknown.append(key)
            continue
        groups.setdefault(match.group(1), {})[match.group(2)] = tensor
    if unknown:
        raise LoadError(f"AdaLoRA checkpoint has tensors graftlib cannot place: {sorted(unknown)[:5]}; "
                        "only lora_A / lora_B / lora_E are supported")
    if not groups:
        raise LoadError("AdaLoRA checkpoint holds no lora_A / lora_B / lora_E tensors")
    modules = dict(model.named_modules(remove_duplicate=False))
    init_r = int(config.get("init_r", 12))
    pattern = {_pattern_path(k): v for k, v in (config.get("rank_pattern") or {}).items()}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for path, parts in sorted(groups.items()):
        missing = [n for n in TRIPLET if n not in parts]
        if missing:
            raise LoadError(f"AdaLoRA checkpoint: {path} lacks {missing}")
        if path not in modules:
            raise LoadError(f"AdaLoRA checkpoint targets {path!r}, which {type(model).__name__} does not have; "
                            "was it saved from another model class?")
        a, e, b = (parts[n] for n in TRIPLET)
        if path in pattern:
            a, e, b = _apply_pattern(path, pattern[path], a, e, b)
        if not (a.shape[0] == e.shape[0] == b.shape[1] and e.shape[1:] == (1,)):
            raise LoadError(f"AdaLoRA checkpoint: {path} has inconsistent shapes A {tuple(a.shape)}, "
                            f"E {tuple(e.shape)}, B {tuple(b.shape)}")
        tensors[path] = {"lora_A": a, "lora_E": e, "lora_B": b,
                         "ranknum": torch.tensor([float(init_r)], dtype=e.dtype)}
    ranks = [t["lora_E"].shape[0] for t in tensors.values()]
    alpha = config.get("lora_alpha", 8)
    alpha = float(init_r) if not alpha or alpha <= 0 else float(alpha)
    regex = "|".join(re.escape(p) for p in tensors)
    options = [f're:"(?:{regex})"', f"init_r={init_r}", f"target_r={int(config.get('target_r', 8))}",
               f"alpha={_float_text(alpha)}", f"dropout={_float_text(config.get('lora_dropout', 0.0) or 0.0)}",
               f"tinit={int(config.get('tinit', 0))}", f"tfinal={int(config.get('tfinal', 0))}",
               f"delta_t={int(config.get('deltaT', 1))}", f"beta1={_float_text(config.get('beta1', 0.85))}",
               f"beta2={_float_text(config.get('beta2', 0.85))}",
               f"orth_reg={_float_text(config.get('orth_reg_weight', 0.5))}"]
    if config.get("total_step"):
        options.append(f"total_steps={int(config['total_step'])}")
    if pattern or any(r != init_r for r in ranks):
        options.append(f"ranks=[{','.join(str(r) for r in ranks)}]")
    return f"adalora({', '.join(options)})", tensors


def _pattern_path(key: str) -> str:
    """PEFT rank-pattern key (``<module>.lora_E`` or ``<module>.lora_E.<adapter>``) -> module path."""
    match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_E(?:\.[A-Za-z_]\w*)?", key)
    if match is None:
        raise LoadError(f"AdaLoRA rank_pattern key {key!r} does not name a lora_E tensor")
    return match.group(1)


def _apply_pattern(path: str, mask: list[bool], a: torch.Tensor, e: torch.Tensor,
                   b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kept = torch.tensor([bool(m) for m in mask], dtype=torch.bool)
    if e.shape[0] == int(kept.sum()):
        return a, e, b  # saved already cut to the pattern (what PEFT's save_pretrained does)
    if e.shape[0] == kept.numel():
        return a[kept], e[kept], b[:, kept]
    raise LoadError(f"AdaLoRA checkpoint: {path} has rank {e.shape[0]} but its rank_pattern keeps "
                    f"{int(kept.sum())} of {kept.numel()}")


def peft_export(grafted: Any, record: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One AdaLoRA adapter as PEFT's ``adapter_config.json`` dict and ``adapter_model`` tensors."""
    config = record.config
    index = SiteIndex.build(grafted.base_graph_module)
    tensors = grafted.store.tensors(record.adapter)
    state: dict[str, torch.Tensor] = {}
    pattern: dict[str, list[bool]] = {}
    saved_pattern = record.extras.get("rank_pattern") or {}
    kinds = set()
    for key in record.sites:
        site = index.by_key(key)
        kinds.add(site.kind)
        if site.part is not None or site.kind == "embedding" or \
                (site.kind == "conv" and site.conv["groups"] != 1):
            what = "a slice of a fused projection" if site.part else \
                "an embedding" if site.kind == "embedding" else "a grouped convolution"
            raise GraftError(f"adapter {record.adapter!r} adapts {key}, {what}, which PEFT's AdaLoRA cannot "
                             "represent; export it with graftlib's own g.save instead")
        for name in TRIPLET:
            state[f"{_PEFT_PREFIX}{site.path}.{name}"] = tensors[key][name].detach().contiguous().cpu()
        rank = tensors[key]["lora_E"].shape[0]
        if config["ranks"] is not None or rank != config["init_r"]:
            mask = saved_pattern.get(key)
            if mask is None or len(mask) != config["init_r"] or sum(mask) != rank:
                mask = [True] * rank + [False] * (config["init_r"] - rank)
            pattern[f"{site.path}.lora_E"] = [bool(m) for m in mask]
    total = config["total_steps"] or config["tinit"] + config["tfinal"] + 1  # PEFT requires one
    peft_config = {
        "peft_type": "ADALORA", "task_type": None, "base_model_name_or_path": None,
        "target_modules": sorted({index.by_key(k).path for k in record.sites}),
        "init_r": config["init_r"], "target_r": config["target_r"], "lora_alpha": _alpha(config),
        "lora_dropout": config["dropout"], "tinit": config["tinit"], "tfinal": config["tfinal"],
        "deltaT": config["delta_t"], "beta1": config["beta1"], "beta2": config["beta2"],
        "orth_reg_weight": config["orth_reg"], "total_step": total,
        "rank_pattern": pattern or None, "fan_in_fan_out": "conv1d" in kinds, "bias": "none",
        "inference_mode": True, "init_lora_weights": True,
    }
    return peft_config, state
