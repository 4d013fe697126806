"""PEFT's own test table as the referee for graftlib.from_peft.

    python -m graftlib.tools.peft_referee PATH/TO/peft/tests/test_custom_models.py [--method lora ...]
                                          [--rows N] [--verbose] [--json FILE]

Imports `TEST_CASES` and the model classes from PEFT's ``tests/test_custom_models.py`` (its relative
imports of PEFT's test helpers are stubbed: only the table and the models are used) and drives every
LoRA / IA3 / LoHa / LoKr / OFT / VeRA / AdaLoRA row through

    MockTransformerWrapper.from_pretrained(model_id) -> get_peft_model -> random non-zero adapter weights
    -> save_pretrained -> graftlib.from_peft(fresh copy) -> outputs compared with PEFT's (eval mode)

on PEFT's test input ``X = arange(90).view(9, 10)``. A row *passes* when the max abs difference is
<= 1e-5, gives a *wrong number* above that, and is *refused* when graftlib raises (the reason is the
error's first line). Prints per-method counts and the refusal reasons; exit status 1 if any row gave a
wrong number. Nothing here is graftlib's test suite: it reads a file from outside the project.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import sys
import tempfile
import traceback
import types
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_table", "run_row", "main", "METHODS"]

#: PEFT config class name -> method label
METHODS = {"LoraConfig": "LoRA", "IA3Config": "IA3", "LoHaConfig": "LoHa", "LoKrConfig": "LoKr",
           "OFTConfig": "OFT", "VeraConfig": "VeRA", "AdaLoraConfig": "AdaLoRA"}
TOL = 1e-5


def _stub_package(name: str) -> None:
    """A package `name` with the two helper modules test_custom_models.py imports relatively."""
    package = types.ModuleType(name)
    package.__path__ = []
    common = types.ModuleType(f"{name}.testing_common")

    class PeftCommonTester:  # the tests' base class; the referee never runs its tests
        pass

    common.PeftCommonTester = PeftCommonTester
    common._skip_if_deleting_adapter_not_supported = lambda *a, **k: None
    common._skip_if_merging_not_supported = lambda *a, **k: None
    utils = types.ModuleType(f"{name}.testing_utils")
    utils.get_state_dict = lambda *a, **k: {}
    utils.require_non_cpu = lambda f: f
    utils.set_init_weights_false = lambda cls, kwargs: kwargs
    sys.modules.update({name: package, f"{name}.testing_common": common, f"{name}.testing_utils": utils})


def load_table(path: str | Path) -> types.ModuleType:
    """PEFT's test_custom_models.py imported as a module (TEST_CASES, MockTransformerWrapper, models)."""
    package = "_peft_referee_tests"
    _stub_package(package)
    spec = importlib.util.spec_from_file_location(f"{package}.test_custom_models", str(path))
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.loader.exec_module(module)
    return module


def _randomise(peft_model: torch.nn.Module, seed: int) -> None:
    """Random non-zero adapter weights: every trainable parameter moved off its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(peft_model.named_parameters()):
            if param.requires_grad and param.is_floating_point():
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.1)


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first(output[0])
    return output.logits if hasattr(output, "logits") else output[0]


def run_row(table: types.ModuleType, model_id: str, config_cls: type, kwargs: dict[str, Any],
            seed: int = 0) -> tuple[str, str, float | None]:
    """("pass" | "wrong" | "refused" | "peft-failed", reason or "", max abs diff)."""
    import graftlib
    from peft import get_peft_model

    inputs = {"X": torch.arange(90).view(9, 10)}
    try:
        model = table.MockTransformerWrapper.from_pretrained(model_id).eval()
        fresh = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, config_cls(**copy.deepcopy(kwargs)))
            _randomise(peft_model, seed)
            peft_model.eval()
            with torch.no_grad():
                want = _first(peft_model(**inputs))
            directory = tempfile.mkdtemp(prefix="peft-referee-")
            peft_model.save_pretrained(directory)
    except Exception as exc:  # PEFT itself cannot build or run the row here
        return "peft-failed", _first_line(exc), None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = graftlib.from_peft(fresh, directory, example_inputs=inputs).eval()
            with torch.no_grad():
                got = _first(g(**inputs))
    except Exception as exc:
        return "refused", _first_line(exc), None
    if got.shape != want.shape:
        return "wrong", f"shape {tuple(got.shape)} vs PEFT {tuple(want.shape)}", None
    diff = float((got.float() - want.float()).abs().max())
    if not diff <= TOL:
        return "wrong", f"max abs diff {diff:.3g}", diff
    return "pass", "", diff


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _reason_key(reason: str) -> str:
    """Group refusals: drop paths and numbers that differ per row."""
    reason = re.sub(r"/tmp/\S+", "<dir>", reason)
    reason = re.sub(r"'[^']*'", "'…'", reason)
    return reason[:160]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peft_referee", description=__doc__.split("\n\n")[0])
    parser.add_argument("table", help="path of PEFT's tests/test_custom_models.py")
    parser.add_argument("--method", action="append", help="only these methods (LoRA, IA3, LoHa, ...)")
    parser.add_argument("--rows", type=int, default=None, help="only the first N selected rows")
    parser.add_argument("--verbose", action="store_true", help="one line per row")
    parser.add_argument("--json", default=None, help="write per-row results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = load_table(args.table)
    wanted = {m.lower() for m in args.method} if args.method else None
    rows = [(name, model_id, cls, kwargs) for name, model_id, cls, kwargs in table.TEST_CASES
            if cls.__name__ in METHODS and (wanted is None or METHODS[cls.__name__].lower() in wanted)]
    if args.rows is not None:
        rows = rows[:args.rows]
    counts: dict[str, Counter] = defaultdict(Counter)
    reasons: dict[str, Counter] = defaultdict(Counter)
    results = []
    for i, (name, model_id, cls, kwargs) in enumerate(rows):
        method = METHODS[cls.__name__]
        try:
            outcome, reason, diff = run_row(table, model_id, cls, kwargs, seed=i)
        except Exception as exc:  # the referee itself must not stop on one row
            outcome, reason, diff = "refused", "referee error: " + _first_line(exc), None
            if args.verbose:
                traceback.print_exc()
        counts[method][outcome] += 1
        if reason:
            reasons[method][f"{outcome}: {_reason_key(reason)}"] += 1
        results.append(dict(name=name, model_id=model_id, method=method, kwargs=repr(kwargs),
                            outcome=outcome, reason=reason, diff=diff))
        if args.verbose:
            shown = f"{diff:.2g}" if diff is not None else reason
            print(f"{outcome:8s} {method:8s} {name}: {shown}", flush=True)
    _report(counts, reasons, len(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any(c["wrong"] for c in counts.values()) else 0


def _report(counts: dict[str, Counter], reasons: dict[str, Counter], total: int) -> None:
    print(f"\n{total} rows")
    print(f"{'method':8s} {'rows':>5s} {'pass':>5s} {'wrong':>6s} {'refused':>8s} {'peft-failed':>12s}")
    for method in [m for m in METHODS.values() if m in counts]:
        c = counts[method]
        print(f"{method:8s} {sum(c.values()):5d} {c['pass']:5d} {c['wrong']:6d} {c['refused']:8d} "
              f"{c['peft-failed']:12d}")
    everything = Counter()
    for c in counts.values():
        everything.update(c)
    print(f"{'all':8s} {total:5d} {everything['pass']:5d} {everything['wrong']:6d} {everything['refused']:8d} "
          f"{everything['peft-failed']:12d}")
    for method in [m for m in METHODS.values() if m in reasons]:
        print(f"\n{method}:")
        for reason, n in reasons[method].most_common():
            print(f"  {n:3d}  {reason}")


if __name__ == "__main__":
    sys.exit(main())
