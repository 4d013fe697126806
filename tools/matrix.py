"""The architecture matrix: every family of ``matrix_families`` x every capability, checked with numbers.

    python -m graftlib.tools.matrix                 # the README's supported-models table (markdown)
    python -m graftlib.tools.matrix llama bloom     # some families only
    python -m graftlib.tools.matrix --cells lora,prefix

Each cell returns its measured figures or raises; tests/test_matrix.py runs the same checks. A cell is
"n/a" when the capability does not apply to the family (prompt tuning without a token embedding,
``lora(q,v)`` without attention); ``EXCEPTIONS`` lists applicable cells graftlib refuses today, with
the reason - the test asserts that those fail with a graftlib error, so a fix shows up as a failure
to update the table.

References: the eager model (trace, zero-initialised adapters, disabled adapters: bit for bit), the
eager model with the LoRA delta folded into a copy of its weights by hand (``lora``), the eager model
fed ``inputs_embeds`` with the virtual tokens in front (``prompt``, PEFT's semantics), the same row
alone without padding (``prefix``, ``prompt``: padded batches exact), the unmerged graph
(``merge``), onnxruntime (``onnx``) and a fresh model loaded from the saved directory (``save/load``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .matrix_families import FAMILIES, build_family, family_inputs

__all__ = ["CELLS", "EXCEPTIONS", "applicable", "run_cell", "flat", "main"]

CELLS = ("trace", "lora", "adapter", "prefix", "prompt", "merge+onnx", "save/load")
NO_TOKENS = {"vision", "audio"}
NO_ATTENTION = {"resnet", "convnext"}

#: (family, cell) -> why graftlib refuses it today (the README lists these)
_MOE = ("experts are one 3-D parameter and no 2-D projection (a shared expert) leads to the MoE block's residual add; "
        "lora(experts) adapts the stacks themselves")
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("mixtral", "adapter"): _MOE,
    ("olmoe", "adapter"): _MOE,
}

SPECS = {"lora": "lora(q,v,r=4)", "adapter": "adapter(ffn,m=4)", "prefix": "prefix(n=2)", "prompt": "prompt(n=2)"}


def lora_spec(family: str) -> str:
    return "lora(conv,r=2)" if family in NO_ATTENTION else SPECS["lora"]


def applicable(family: str, cell: str) -> bool:
    kind = FAMILIES[family].kind
    if cell == "prompt":
        return FAMILIES[family].inputs in ("text", "seq2seq", "clip", "hand")
    if cell in ("lora", "prefix"):
        return family not in NO_ATTENTION
    if cell == "adapter":
        return family != "resnet"
    return True


# -- helpers -------------------------------------------------------------------------------------------
def flat(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model output, in order (ModelOutput, tuple, dict or tensor)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in out for t in flat(item)] if isinstance(out, (list, tuple)) else []


def max_diff(a: Any, b: Any) -> float:
    xs, ys = flat(a), flat(b)
    if len(xs) != len(ys):
        raise AssertionError(f"{len(xs)} outputs vs {len(ys)}")
    worst = 0.0
    for x, y in zip(xs, ys):
        if x.shape != y.shape:
            raise AssertionError(f"shape {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.is_floating_point():
            worst = max(worst, float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
        elif not torch.equal(x, y):
            worst = float("inf")
    return worst


def _call(module: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    with torch.no_grad():
        return module(**inputs)


def eager(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    kwargs = dict(inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return _call(model, kwargs)


_traces: dict[str, tuple[nn.Module, Any]] = {}


def traced(family: str) -> tuple[nn.Module, Any]:
    """(model, Traced) of a family, traced once per process."""
    from graftlib.trace import trace

    if family not in _traces:
        model = build_family(family)
        example = family_inputs(family, seq=7, seed=2) if FAMILIES[family].kind == "hand" else None
        _traces[family] = (model, trace(model, example))
    return _traces[family]


def grafted(family: str, spec: str | None) -> tuple[nn.Module, Any]:
    """A fresh Grafted over a copy of the family's trace (parameters shared with the model)."""
    from torch import fx

    from graftlib.grafted import Grafted
    from graftlib.runtime import copy_graph

    model, tr = traced(family)
    gm = fx.GraphModule(tr.graph_module, copy_graph(tr.graph_module.graph))
    g = Grafted(dataclasses.replace(tr, graph_module=gm), model)
    if spec:
        g.add(spec)
    return model, g.eval()


@contextmanager
def randomised(g: Any, std: float = 0.2, seed: int = 0) -> Iterator[None]:
    gen = torch.Generator().manual_seed(seed)
    saved = []
    with torch.no_grad():
        for adapter in g.adapters:
            for params in g.store.tensors(adapter).values():
                for tensor in params.values():
                    if not tensor.is_floating_point():
                        continue
                    saved.append((tensor, tensor.detach().clone()))
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)
    g._invalidate()
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
        g._invalidate()


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)


def _other(family: str) -> dict[str, torch.Tensor]:
    return family_inputs(family, batch=3, seq=5, seed=3)


# -- cells -----------------------------------------------------------------------------------------------
def cell_trace(family: str) -> dict[str, Any]:
    model, g = grafted(family, None)
    figures = {}
    for label, inputs in (("at trace size", family_inputs(family)), ("other size", _other(family))):
        diff = max_diff(_call(g, inputs), eager(model, inputs))
        _check(diff == 0.0, f"graph != eager {label}: {diff:g}")
        figures[label] = diff
    return {"diff": 0.0}


def _fold_lora(model: nn.Module, g: Any, sites: list[Any]) -> nn.Module:
    """A deep copy of `model` with each site's ``s * B @ A`` added to its weight rows (by hand)."""
    from graftlib.passes.lora import lora_scale

    record = next(iter(g.adapters.values()))
    scale = lora_scale(record.config)
    ref = copy.deepcopy(model)
    tensors = g.store.tensors(record.adapter)
    with torch.no_grad():
        for site in sites:
            params = tensors[site.key]
            a, b = params["lora_A"].detach(), params["lora_B"].detach()
            weight = ref.get_submodule(site.path).weight
            if site.kind == "conv":
                delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(weight.shape) * scale  # any dims
                weight += delta
                continue
            delta = scale * (b @ a)                     # (out, in)
            rows = site_rows(site)
            if site.kind == "conv1d":                   # GPT-2 Conv1D stores (in, out)
                weight[:, rows] += delta.T
            else:
                weight[rows] += delta
    return ref


def site_rows(site: Any) -> Any:
    """The weight rows a site's output covers: a slice, a list of columns (fused heads), or all."""
    columns = getattr(site, "columns", None)
    if columns is not None:
        return torch.tensor(columns)
    return slice(*site.span) if site.span else slice(None)


def _index(g: Any) -> Any:
    from graftlib.select import SiteIndex
    return SiteIndex.build(g.base_graph_module)


def cell_lora(family: str) -> dict[str, Any]:
    model, g = grafted(family, lora_spec(family))
    inputs = family_inputs(family)
    base = eager(model, inputs)
    zero = max_diff(_call(g, inputs), base)
    _check(zero == 0.0, f"B = 0 output != base: {zero:g}")
    keys = set(g.sites())
    sites = [s for s in _index(g).sites if s.key in keys]
    with randomised(g):
        out = _call(g, inputs)
        ref = eager(_fold_lora(model, g, sites), inputs)
        diff = max_diff(out, ref)
        moved = max_diff(out, base)
    _check(diff < 1e-4, f"lora vs folded eager reference: {diff:g}")
    _check(moved > 1e-4, "random LoRA weights did not change the output")
    return {"sites": len(sites), "diff": diff}


def cell_adapter(family: str) -> dict[str, Any]:
    model, g = grafted(family, SPECS["adapter"])
    inputs = family_inputs(family)
    base = eager(model, inputs)
    init = max_diff(_call(g, inputs), base)
    _check(init == 0.0, f"adapter at init != base: {init:g}")
    with randomised(g):
        moved = max_diff(_call(g, inputs), base)
        with g.disable_adapters():
            off = max_diff(_call(g, inputs), base)
    _check(moved > 1e-4, "random adapter weights did not change the output")
    _check(off == 0.0, f"disabled adapter != base: {off:g}")
    return {"sites": len(g.sites()), "diff": 0.0}


def _row(inputs: dict[str, torch.Tensor], row: int, keep: int | None) -> dict[str, torch.Tensor]:
    """Row `row` alone, its first `keep` tokens (no padding)."""
    out = {}
    for key, value in inputs.items():
        v = value[row:row + 1]
        if keep is not None and key in ("input_ids", "attention_mask"):
            v = v[:, :keep]
        out[key] = v
    return out


def _row_diffs(run: Callable[[dict[str, torch.Tensor]], Any], family: str, n_virtual: int) -> list[float | None]:
    """Per output: row 1 right-padded by two tokens vs the same row alone, at its real tokens (None where
    the output cannot be compared)."""
    seq = 6
    inputs = family_inputs(family, seq=seq)
    inputs["attention_mask"][1, -2:] = 0
    padded = flat(run(inputs))
    alone = flat(run(_row(inputs, 1, seq - 2)))
    diffs: list[float | None] = []
    for full, single in zip(padded, alone):
        diffs.append(None)
        if full.dim() < 2 or not full.is_floating_point():
            continue
        full = full[1:2]
        if full.dim() >= 3 and full.shape[1] == seq + n_virtual and single.shape[1] == seq - 2 + n_virtual:
            full = full[:, :seq - 2 + n_virtual]
        elif full.dim() >= 3 and full.shape[1] == seq and single.shape[1] == seq - 2:
            full = full[:, :seq - 2]
        if full.shape == single.shape:
            diffs[-1] = float((full - single).abs().max())
    return diffs


def _padded_exact(g: Any, model: nn.Module, family: str, n_virtual: int) -> float:
    """Row 1 right-padded vs the row alone, worst over the outputs for which the eager model itself is
    padding-invariant (SigLIP pools its text at the last position, pads included: not comparable)."""
    base = _row_diffs(lambda inputs: eager(model, inputs), family, 0)
    grafted_diffs = _row_diffs(lambda inputs: _call(g, inputs), family, n_virtual)
    return max((d for d, b in zip(grafted_diffs, base) if d is not None and b is not None and b < 1e-5),
               default=0.0)


def cell_prefix(family: str) -> dict[str, Any]:
    model, g = grafted(family, SPECS["prefix"])
    inputs = family_inputs(family)
    with torch.no_grad():
        g.set_active([])
        off = max_diff(_call(g, inputs), eager(model, inputs))
        g.set_active(list(g.adapters))
    _check(off == 0.0, f"disabled prefix != base: {off:g}")
    figures = {"sites": len(g.sites()), "diff": 0.0}
    if "attention_mask" in inputs:
        pad = _padded_exact(g, model, family, 0)
        _check(pad < 1e-5, f"padded row != the row alone: {pad:g}")
        figures["diff"] = pad
    return figures


def _prompt_reference(model: nn.Module, inputs: dict[str, torch.Tensor], tokens: torch.Tensor) -> Any:
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    batch, n = ids.shape[0], tokens.shape[0]
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        inputs["attention_mask"] = torch.cat([torch.ones(batch, n, dtype=mask.dtype), mask], 1)
    embeds = model.get_input_embeddings()(ids)
    return eager(model, dict(inputs, inputs_embeds=torch.cat([tokens.expand(batch, -1, -1), embeds], 1)))


def cell_prompt(family: str) -> dict[str, Any]:
    model, g = grafted(family, SPECS["prompt"])
    inputs = family_inputs(family)
    (params,) = g.store.tensors(next(iter(g.adapters))).values()
    tokens = next(iter(params.values())).detach()
    diff = 0.0
    if "inputs_embeds" in inspect.signature(model.forward).parameters:
        diff = max_diff(_call(g, inputs), _prompt_reference(model, inputs, tokens))
        _check(diff < 1e-5, f"prompt vs inputs_embeds reference: {diff:g}")
    pad = _padded_exact(g, model, family, tokens.shape[0])
    _check(pad < 1e-5, f"padded row != the row alone: {pad:g}")
    return {"diff": max(diff, pad)}


def cell_merge_onnx(family: str) -> dict[str, Any]:
    import graftlib

    model, g = grafted(family, lora_spec(family))
    inputs = family_inputs(family)
    with randomised(g):
        merged = g.merge()
        diff = max_diff(_call(merged, inputs), _call(g, inputs))
        _check(diff < 1e-4, f"merged != unmerged: {diff:g}")
        ops = merged.op_histogram()
        with g.disable_adapters():
            _check(ops == g.op_histogram(), "merged graph's ops differ from the base graph's")
        with tempfile.TemporaryDirectory() as tmp:
            report = graftlib.export_onnx(g, f"{tmp}/m.onnx", progress=False, tolerance=1e-4)
    onnx = max(report.max_abs_diff.values())
    return {"diff": diff, "onnx": onnx}


def cell_save_load(family: str) -> dict[str, Any]:
    import graftlib

    model, g = grafted(family, lora_spec(family))
    inputs = family_inputs(family)
    with randomised(g):
        expected = _call(g, inputs)
        with tempfile.TemporaryDirectory() as tmp:
            g.save(f"{tmp}/a")
            example = family_inputs(family, seq=7, seed=2) if FAMILIES[family].kind == "hand" else None
            loaded = graftlib.load(build_family(family, seed=0), f"{tmp}/a", example).eval()
        diff = max_diff(_call(loaded, inputs), expected)
    _check(diff == 0.0, f"loaded != saved: {diff:g}")
    return {"diff": diff}


RUNNERS: dict[str, Callable[[str], dict[str, Any]]] = {
    "trace": cell_trace, "lora": cell_lora, "adapter": cell_adapter, "prefix": cell_prefix,
    "prompt": cell_prompt, "merge+onnx": cell_merge_onnx, "save/load": cell_save_load,
}


def run_cell(family: str, cell: str) -> dict[str, Any]:
    return RUNNERS[cell](family)


# -- the table ---------------------------------------------------------------------------------------------
def _mark(family: str, cell: str) -> str:
    if not applicable(family, cell):
        return "n/a"
    try:
        figures = run_cell(family, cell)
    except Exception as exc:  # a table cell, not a crash
        reason = EXCEPTIONS.get((family, cell))
        return f"no ({reason})" if reason else f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
    sites = f" {figures['sites']}" if "sites" in figures else ""
    return f"yes{sites}"


def main(argv: list[str] | None = None) -> int:
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(prog="python -m graftlib.tools.matrix", description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="families (default: all)")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells")
    args = parser.parse_args(argv)
    families = args.families or list(FAMILIES)
    cells = [c for c in args.cells.split(",") if c]
    print("| family | kind | " + " | ".join(cells) + " |")
    print("|---|---|" + "---|" * len(cells))
    start = time.perf_counter()
    for family in families:
        row = [_mark(family, cell) for cell in cells]
        print(f"| {family} | {FAMILIES[family].kind} | " + " | ".join(row) + " |", flush=True)
        _traces.pop(family, None)
    print(f"\n{len(families)} families, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
