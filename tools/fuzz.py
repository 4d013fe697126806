"""Grammar-aware fuzz of graftlib's untrusted inputs (#15): specs, saved grafts and PEFT checkpoints.

    python -m graftlib.tools.fuzz --specs 10000 --checkpoints 1000 --seed 0

Every case runs against one existing graft on a tiny BERT (built from a config, no download) under a
2 s alarm, and is checked for: only GraftSpecError / LoadError / GraftError escape; no hang (> 2 s);
no code ran (hostile names carry a payload that would create a marker file); nothing half-applied (the
graft's adapters, active set, every tensor and its output are unchanged after a failure, and after a
success once the added adapters are deleted); the user's model unchanged. Prints the counts as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["main", "random_spec", "corrupt_checkpoint"]

BOUND_S = 2.0


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


# -- specs ---------------------------------------------------------------------------------------------
def _payload(marker: Path) -> str:
    return f'x"+str(open({str(marker)!r},"w"))+"'


def random_spec(rng: random.Random, marker: Path) -> str:
    """A spec that is mostly well formed, with hostile leaves, or such a spec cut or mangled."""
    from graftlib.registry import COMMON_OPTIONS, methods

    table = methods()
    names = list(table) + ["nope", "1x", ""]
    targets = ["q", "k", "v", "o", "ffn", "attn", "embed", "all-linear", "query", "dense", "conv", "x.y",
               '"encoder.layer.*.attention.self.query"', '"*"', 're:"(.*)*x"', 're:"a{4294967296}"',
               're:"(unclosed"', 're:".*query"', 're:"(a|aa)*b"', "内容", '"' + _payload(marker) + '"']
    numbers = ["0", "1", "2", "-1", "4.7", "1e309", "-1e309", "1e308", "9" * 25, "9223372036854775807",
               "18446744073709551617", "0.5", ".5", "1.", "0-1", "0-30000000", "0-99999999999", "5-1",
               "[0,1]", "[" * 30 + "]" * 30, "[]", "nan", "inf"]
    strings = ["true", "false", "task", '"a b"', "a.b", '"\\x00"', '"º"', '""', "a" * 70, "class",
               '"' + _payload(marker) + '"', 'text:"hello"', "random", "vocab", "mlp", "lstm", "houlsby",
               "pfeiffer", "relu", '"/nonexistent"']

    def call() -> str:
        method = rng.choice(names)
        schema = list(getattr(table.get(method), "options", {}) or {}) + list(COMMON_OPTIONS) + ["bogus"]
        items = [rng.choice(targets) for _ in range(rng.randint(0, 3))]
        sane = rng.random() < 0.5  # half the calls stay close to valid, so passes and loads run too
        if sane:
            items = [rng.choice(["q", "v", "ffn", "embed", "query", "attn"]) for _ in range(rng.randint(0, 2))]
        for key in rng.sample(schema, min(len(schema), rng.randint(0, 4))):
            value = rng.choice(numbers if rng.random() < 0.6 else strings)
            if sane:
                value = rng.choice(["1", "2", "4", "0.1", "0.5", "0-1", "[0,1]", "true", "random"])
            if key == "name" and rng.random() < 0.5:
                value = rng.choice(['"' + _payload(marker) + '"', "a.b", '""', '"\\x00"', "º", "keys",
                                    "__base__", "base", "ok_name", "a-b"])
            items.append(f"{key}={value}")
        rng.shuffle(items)
        sep = rng.choice([", ", ",", ",\n\t", " ,  "])
        return f"{method}({sep.join(items)})"

    spec = " + ".join(call() for _ in range(rng.randint(1, 3)))
    roll = rng.random()
    if roll < 0.1:
        spec = spec[: rng.randint(0, len(spec))]
    elif roll < 0.2:
        i = rng.randint(0, len(spec))
        spec = spec[:i] + rng.choice(["(", ")", "=", ",", '"', "\\", "\x00", "\t", "\n", "内", "+", ":"]) + spec[i:]
    return spec


# -- checkpoints -----------------------------------------------------------------------------------------
def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def corrupt_checkpoint(rng: random.Random, good: Path, peft: bool, out: Path, marker: Path) -> str:
    """Copy the good checkpoint into `out` with one corruption of the kinds #15 lists; returns its kind."""
    from safetensors.torch import load_file

    config_name, weights_name = ("adapter_config.json", "adapter_model.safetensors") if peft else \
        ("graft.json", "adapters.safetensors")
    out.mkdir(parents=True)
    config = json.loads((good / config_name).read_text())
    tensors = load_file(str(good / weights_name))
    config_text: str | bytes | None = None
    weights_bytes: bytes | None = None
    key = rng.choice(sorted(tensors))
    kinds: list[tuple[str, Callable[[], None]]] = []

    def set_config(**changes: Any) -> Callable[[], None]:
        return lambda: config.update(changes)

    def tensor(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        return lambda: tensors.__setitem__(key, fn(tensors[key]))

    kinds += [("nan", tensor(lambda t: t * float("nan"))), ("inf", tensor(lambda t: t + float("inf"))),
              ("int64", tensor(lambda t: t.long())), ("bool", tensor(lambda t: t > 0)),
              ("float16", tensor(lambda t: t.half())), ("shape", tensor(lambda t: torch.zeros(3, 5))),
              ("scalar", tensor(lambda t: torch.tensor(1.0))),
              ("missing tensor", lambda: tensors.pop(key)), ("extra tensor", lambda: tensors.__setitem__(
                  "second/zz/extra" if not peft else "base_model.model.zz.lora_A.weight", torch.zeros(2))),
              ("no tensors", lambda: tensors.clear() or tensors.__setitem__("x", torch.zeros(1)))]
    if peft:
        kinds += [(f"config {k}={v!r}"[:60], set_config(**{k: v})) for k, v in [
            ("r", 4.7), ("r", "abc"), ("r", 0), ("r", 2**63), ("r", None), ("lora_alpha", "x"),
            ("lora_alpha", 1e308), ("target_modules", "(.*.*)*x"), ("target_modules", "(unclosed"),
            ("target_modules", 5), ("target_modules", [1, 2]), ("target_modules", None),
            ("rank_pattern", {"(": 2}), ("rank_pattern", {".*": 4.5}), ("rank_pattern", [1]),
            ("alpha_pattern", {"query": "x"}), ("peft_type", "NOPE"), ("peft_type", 5),
            ("layers_to_transform", ["a"]), ("layers_to_transform", 10**9), ("layers_pattern", "(((("),
            ("modules_to_save", ["(.*)*x"]), ("modules_to_save", 5), ("exclude_modules", "(.*)*"),
            ("use_dora", True), ("bias", "all"), ("init_lora_weights", "gaussian"), ("lora_dropout", 7),
            ("num_virtual_tokens", 10**9)]]
    else:
        adapter = config["adapters"][0]
        kinds += [
            ("version 999", set_config(version=999)), ("version str", set_config(version="1")),
            ("active string", set_config(active=config["adapters"][0]["name"])),
            ("active unknown", set_config(active=["nope"])), ("active int", set_config(active=5)),
            ("format", set_config(format="other")), ("adapters list empty", set_config(adapters=[])),
            ("adapters dict", set_config(adapters={})),
            ("hostile name", lambda: adapter.update(name=_payload(marker),
                                                   spec=f"lora(q, r=2, name={json.dumps(_payload(marker))})")),
            ("name a.b", lambda: adapter.update(name="a.b")), ("name int", lambda: adapter.update(name=5)),
            ("spec two grafts", lambda: adapter.update(spec=adapter["spec"] + " + lora(v, r=2, name=other)")),
            ("spec broken", lambda: adapter.update(spec=adapter["spec"][:-1])),
            ("spec other method", lambda: adapter.update(spec=adapter["spec"].replace("lora", "adapter", 1))),
            ("spec huge rank", lambda: adapter.update(spec=adapter["spec"].replace("r=2", "r=2147483647"))),
            ("spec regex", lambda: adapter.update(spec='lora(re:"(.*)*x(.*)*y", r=2, name=second)')),
            ("method missing", lambda: adapter.pop("method")), ("extras list", lambda: adapter.update(extras=[1])),
            ("sites junk", lambda: adapter.update(sites=[{"a": 1}])), ("config junk", lambda: adapter.update(
                config=[1, 2])), ("inputs junk", set_config(inputs={"x": 1}))]
    kinds += [("top-level list", lambda: None), ("deep nesting", lambda: None), ("invalid utf-8", lambda: None),
              ("truncated weights", lambda: None), ("bit-flipped weights", lambda: None),
              ("garbage config", lambda: None), ("empty files", lambda: None), ("missing weights file", lambda: None)]
    kind, apply = rng.choice(kinds)
    apply()
    if kind == "top-level list":
        config_text = json.dumps([config])
    elif kind == "deep nesting":
        depth = rng.choice([40, 1000, 100_000])
        config_text = "[" * depth + "]" * depth
    elif kind == "invalid utf-8":
        config_text = json.dumps(config).encode() + b"\xff\xfe"
    elif kind == "garbage config":
        config_text = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    elif kind == "empty files":
        config_text, weights_bytes = b"", b""
    if config_text is None:
        config_text = json.dumps(config)
    (out / config_name).write_bytes(config_text.encode() if isinstance(config_text, str) else config_text)
    if kind != "missing weights file":
        _write_safetensors(out / weights_name, tensors)
        data = (out / weights_name).read_bytes()
        if kind == "truncated weights":
            weights_bytes = data[: rng.randint(0, len(data) - 1)]
        elif kind == "bit-flipped weights":
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(flipped))
                flipped[i] ^= 1 << rng.randrange(8)
            weights_bytes = bytes(flipped)
        if weights_bytes is not None:
            (out / weights_name).write_bytes(weights_bytes)
    return kind


# -- the driver --------------------------------------------------------------------------------------------
def _snapshot(g: Any) -> tuple[list[str], tuple[str, ...], dict[str, torch.Tensor]]:
    return list(g.adapters), g.active_adapters, {k: v.detach().clone() for k, v in g.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Driver:
    def __init__(self, marker: Path):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from models import build  # tests/models.py: tiny Hugging Face models from configs

        import graftlib

        self.graftlib = graftlib
        self.model, self.inputs = build("bert")
        self.g = graftlib.apply(self.model, "lora(q, v, r=2, name=base)")
        with torch.no_grad():
            for p in self.g.trainable_parameters().values():
                p.normal_()
        self.model_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.reference = self.g(**self.inputs)
        self.pristine = copy.deepcopy(self.g)  # to undo grafts that cannot be deleted (quantize)
        self.marker = marker
        self.counts: Counter[str] = Counter()
        self.others: list[str] = []
        self.slowest = 0.0

    def _output(self) -> torch.Tensor:
        return self.g(**self.inputs).last_hidden_state

    def run(self, label: str, action: Callable[[], Any]) -> None:
        from graftlib.errors import GraftError
        from graftlib.registry import get_method

        before = _snapshot(self.g)
        out_before = self.reference.last_hidden_state
        signal.setitimer(signal.ITIMER_REAL, BOUND_S + 0.5)
        start = time.perf_counter()
        outcome = "ok"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                action()
        except Hang:
            outcome = "hang"
        except GraftError:
            outcome = "graftlib error"
        except Exception as exc:  # noqa: BLE001 - this is what the fuzz counts
            outcome = "other exception"
            self.others.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.perf_counter() - start
        self.slowest = max(self.slowest, elapsed)
        if elapsed > BOUND_S and outcome != "hang":
            self.counts["over 2 s"] += 1
            self.others.append(f"{label}: took {elapsed:.2f} s")
        self.counts[outcome] += 1
        if outcome == "ok":  # undo a success, then check the undo restored everything
            added = [n for n in self.g.adapters if n not in before[0]][::-1]
            if any(get_method(self.g.adapters[n].method).base_rewrite for n in added):
                self.g = copy.deepcopy(self.pristine)  # a base rewrite cannot be deleted: start again
            else:
                for name in added:
                    self.g.delete_adapter(name)
            self.g.set_active(list(before[1]))
        after = _snapshot(self.g)
        if after[0] != before[0] or after[1] != before[1] or not _same(after[2], before[2]) \
                or not torch.equal(self._output(), out_before):
            self.counts["half-applied or changed"] += 1
            self.others.append(f"{label}: graft changed after {outcome}")
            raise SystemExit(f"graft changed by {label}; stopping (it would poison every later case)")
        if not _same(self.model_state, self.model.state_dict()):
            self.counts["model mutated"] += 1
        if self.marker.exists():
            self.counts["code executed"] += 1
            self.marker.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graftlib.tools.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, default=10_000)
    parser.add_argument("--checkpoints", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=20, help="how many unexpected outcomes to print")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        marker = root / "pwned"
        driver = Driver(marker)
        start = time.perf_counter()
        for i in range(args.specs):
            spec = random_spec(rng, marker)
            driver.run(f"spec {spec[:120]!r}", lambda s=spec: driver.g.add(s))
        spec_counts = dict(driver.counts)
        driver.counts.clear()
        second = driver.graftlib.apply(driver.model, "lora(q, r=2, name=second)")
        with torch.no_grad():
            for p in second.trainable_parameters().values():
                p.normal_()
        second.save(root / "good_graft")
        second.save_peft(root / "good_peft")
        kinds: Counter[str] = Counter()
        for i in range(args.checkpoints):
            peft = i % 2 == 1
            out = root / f"case{i}"
            kind = corrupt_checkpoint(rng, root / ("good_peft" if peft else "good_graft"), peft, out, marker)
            kinds[("peft " if peft else "graft ") + kind.split("=")[0]] += 1
            if peft:
                driver.run(f"peft {kind}", lambda d=out: driver.graftlib.from_peft(driver.g, d, adapter_name="second"))
            else:
                driver.run(f"graft {kind}", lambda d=out: driver.graftlib.load(driver.g, d))
        report = {"specs": args.specs, "spec_outcomes": spec_counts, "checkpoints": args.checkpoints,
                  "checkpoint_outcomes": dict(driver.counts), "checkpoint_kinds": len(kinds),
                  "slowest_case_s": round(driver.slowest, 3), "seconds": round(time.perf_counter() - start, 1),
                  "unexpected": driver.others[: args.show]}
        print(json.dumps(report, indent=2))
    bad = {"other exception", "hang", "over 2 s", "half-applied or changed", "model mutated", "code executed"}
    return 1 if bad & (set(spec_counts) | set(report["checkpoint_outcomes"])) else 0


if __name__ == "__main__":
    raise SystemExit(main())
