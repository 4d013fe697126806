"""SIGKILL at random points of g.save / g.save_peft / ONNX external-data writes (#15).

    python -m graftlib.tools.killtest --kills 40 --seed 0

For each writer a child process (forked after setup, so a kill costs no start-up) writes generation
after generation to one target, alternating two layouts whose files differ (graft: lora(fc1) vs
lora(fc1, fc2) with every tensor filled with the generation number; ONNX: two merged programs with
different weights). The parent SIGKILLs it at a random moment, then checks that the target loads and
that all its files are of one generation (config layout == tensor layout, one fill value; the ONNX
output equals one program's), and that the next write removes the staging folders the kill left.
Prints the counts as JSON; exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["main"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
LAYOUTS = ("lora(fc1, r=2, name=gen)", "lora(fc1, fc2, r=2, name=gen)")


def _fill(g: Any, value: float) -> None:
    with torch.no_grad():
        for p in g.trainable_parameters().values():
            p.fill_(value / 1000.0)


def _staging_left(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


# -- writers (run in the child, forever) ------------------------------------------------------------------
def _graft_writer(grafts: list[Any], target: Path, peft: bool) -> Callable[[int], None]:
    def write(gen: int) -> None:
        g = grafts[gen % 2]
        _fill(g, gen)
        g.records[0].extras = {"gen": gen}
        (g.save_peft if peft else g.save)(str(target))
    return write


def _onnx_writer(programs: list[Any], target: Path) -> Callable[[int], None]:
    from graftlib.export import _staging

    def write(gen: int) -> None:
        with _staging(target) as staged:
            programs[gen % 2].save(str(staged), external_data=True)
    return write


# -- checks (in the parent, after each kill) ------------------------------------------------------------
def _check_graft(model: nn.Module, target: Path, peft: bool) -> tuple[str | None, int | None]:
    import graftlib
    from safetensors.torch import load_file

    config_name, weights_name = ("adapter_config.json", "adapter_model.safetensors") if peft else \
        ("graft.json", "adapters.safetensors")
    if not target.exists():
        return "target missing", None
    config = json.loads((target / config_name).read_text())
    tensors = load_file(str(target / weights_name))
    fills = {round(float(t.flatten()[0]) * 1000) for t in tensors.values()}
    if len(fills) != 1 or any(not torch.all(t == t.flatten()[0]) for t in tensors.values()):
        return f"tensors of several generations {sorted(fills)}", None
    gen = fills.pop()
    modules = {k.split(".lora_")[0].split(".")[-1] if peft else k.split("/")[1] for k in tensors}
    layout = {"fc1"} if gen % 2 == 0 else {"fc1", "fc2"}
    if modules != layout:
        return f"tensors of generation {gen} have layout {sorted(modules)}", None
    if peft:
        targets = set(config["target_modules"]) if isinstance(config["target_modules"], list) else None
        if targets is not None and {t.split(".")[-1] for t in targets} != layout:
            return f"config layout {sorted(targets)} with tensors of generation {gen}", None
        loaded = graftlib.from_peft(model, target, example_inputs=(X,))
    else:
        if config["adapters"][0]["extras"].get("gen") != gen:
            return f"config of generation {config['adapters'][0]['extras'].get('gen')} with tensors of {gen}", None
        loaded = graftlib.load(model, target, example_inputs=(X,))
    if len(loaded.sites()) != len(layout):
        return "loaded graft has the wrong sites", None
    return None, gen % 2


def _check_onnx(target: Path, expected: list[Any]) -> tuple[str | None, int | None]:
    import numpy as np
    import onnxruntime as ort

    if not target.exists():
        return "target missing", None
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = session.run(None, {name: X.numpy()})[0]
    match = [i for i, e in enumerate(expected) if np.allclose(out, e, atol=1e-5)]
    if not match:
        return "output matches neither generation (files of two generations paired?)", None
    return None, match[0]


# -- the loop -------------------------------------------------------------------------------------------
def _kill_loop(name: str, write: Callable[[int], None], check: Callable[[], tuple[str | None, int | None]], kills: int,
               rng: random.Random, target: Path, max_delay: float) -> dict[str, Any]:
    write(0)
    gen, failures, left_behind, cleaned, writes = 1, [], 0, 0, 0
    for i in range(kills):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: write generations until killed
            os.close(read_end)
            os.write(write_end, b"r")
            g = gen
            while True:
                write(g)
                g += 1
                os.write(write_end, b"w")
        os.close(write_end)
        os.read(read_end, 1)
        time.sleep(rng.uniform(0, max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done = 0
        os.set_blocking(read_end, False)
        try:
            while chunk := os.read(read_end, 4096):
                done += len(chunk)
        except BlockingIOError:
            pass
        os.close(read_end)
        writes += done
        gen += done + 2  # the next child starts past anything the killed one may have written
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                problem, parity = check()
            except Exception as exc:  # noqa: BLE001 - a target that fails to load is what we count
                problem, parity = f"{type(exc).__name__}: {str(exc)[:200]}", None
        if parity is not None and gen % 2 == parity:
            gen += 1  # the next child's first write differs in layout from what the target holds
        if problem:
            failures.append(f"kill {i}: {problem}")
        if _staging_left(target):
            left_behind += 1
    write(gen)  # the next write removes what the last kill left
    cleaned = int(not _staging_left(target))
    return {"kills": kills, "completed_writes_in_children": writes, "target_failed_or_mixed": len(failures),
            "kills_that_left_staging": left_behind, "staging_cleaned_by_next_write": bool(cleaned),
            "failures": failures[:10]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graftlib.tools.killtest", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=40, help="kills per writer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.6, help="seconds; kills land uniformly before it")
    parser.add_argument("--naive", action="store_true",
                        help="control run: write the directory file by file (the old way) to show the check "
                             "catches mixed generations")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import graftlib

    if args.naive:
        import graftlib.io as gio
        import graftlib.peft as gpeft

        def file_by_file(directory: Any, files: dict[str, Callable[[str], None]]) -> None:
            for file_name, write in sorted(files.items(), reverse=True):  # weights before config, as before
                gio.atomic_write(Path(directory) / file_name, write)

        gio.write_directory = gpeft.write_directory = file_by_file

    rng = random.Random(args.seed)
    torch.manual_seed(0)
    model = Tiny()
    grafts = [graftlib.apply(model, spec, example_inputs=(X,)) for spec in LAYOUTS]
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, peft in (("save", False), ("save_peft", True)):
            target = root / name / "target"
            target.parent.mkdir()
            report[name] = _kill_loop(name, _graft_writer(grafts, target, peft),
                                      lambda t=target, p=peft: _check_graft(model, t, p), args.kills, rng,
                                      target, args.max_delay)
        from graftlib.export import _export_copy, _to_onnx

        programs, expected = [], []
        for i, g in enumerate(grafts):
            _fill(g, 7 + i)
            g.eval()
            merged, _, _ = _export_copy(g, merge=True)
            programs.append(_to_onnx(merged.runtime_module(), {"x": X}, None, False, None))
            expected.append(g(X).detach().numpy())
        target = root / "onnx" / "model.onnx"
        target.parent.mkdir()
        report["export_external_data"] = _kill_loop("export", _onnx_writer(programs, target),
                                                    lambda: _check_onnx(target, expected), args.kills, rng,
                                                    target, args.max_delay)
    print(json.dumps(report, indent=2))
    return 1 if any(r["target_failed_or_mixed"] or not r["staging_cleaned_by_next_write"]
                    for r in report.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
