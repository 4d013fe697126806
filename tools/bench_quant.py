"""Benchmark rows for quantised base weights (``quantize(...)``): memory, training step, a 1B model.

    python -m graftlib.tools.bench_quant [--json FILE] [--skip-1b | --only-1b] [--steps N] [--demo-steps N]

Each measurement runs in its own process so resident memory is that configuration's alone:

- memory: resident set size taken by the model (RSS with the model minus RSS before building it) in
  fp32, and by the grafted module once the fp32 model is dropped (``del model``; the graft holds
  packed weights only), for fp32 LoRA, int8 and NF4; llama-160m-shaped and TinyLlama-1.1B-shaped.
- train step (fwd + bwd + AdamW on LoRA q,v r=16, batch 1 x 64): median of N steps, NF4 / int8
  against fp32 LoRA in the same process, interleaved.
- demo (``--demo-steps 50``): the demo task's test accuracy and final train loss, LoRA vs int8 / NF4
  encoder + LoRA, same seed and steps.
- 1B: NF4 + LoRA trains 2 steps (batch 1 x 32); peak RSS (VmHWM, reset once the graft is built, so
  it is the training's) with the dequantised weights kept for backward and recomputed in backward.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from typing import Any

__all__ = ["main"]

SHAPES = {
    "llama-160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=32000),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000),
}
SPECS = {"fp32": "lora(q,v,r=16)", "int8": "quantize(all-linear, bits=8) + lora(q,v,r=16)",
         "nf4": "quantize(all-linear, bits=4) + lora(q,v,r=16)"}


def _rss_mib(field: str = "VmRSS:") -> float:
    with open("/proc/self/status") as status:
        line = next(l for l in status if l.startswith(field))
    return int(line.split()[1]) / 1024


def _trim() -> None:
    gc.collect()
    try:  # give freed heap pages back to the OS, so RSS shows what is still held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _model(shape: str):
    import torch
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(**SHAPES[shape], max_position_embeddings=256)
    return T.LlamaForCausalLM(config).eval()


def _example(vocab: int, length: int = 64) -> dict[str, Any]:
    import torch

    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def child_memory(shape: str, kind: str) -> dict[str, float]:
    """In a fresh process: RSS of the fp32 model, then of the graft alone (model dropped)."""
    import torch

    import graftlib

    torch.set_num_threads(2)
    _trim()
    before = _rss_mib()
    model = _model(shape)
    _trim()
    fp32 = _rss_mib() - before
    start = time.perf_counter()
    g = graftlib.apply(model, SPECS[kind])
    apply_s = time.perf_counter() - start
    del model
    _trim()
    grafted = _rss_mib() - before
    return {"model_fp32_mib": fp32, "graft_mib": grafted, "ratio": grafted / fp32, "apply_s": apply_s,
            "buffers_mib": sum(b.numel() * b.element_size() for b in g.buffers()) / 2**20}


def child_train(shape: str, steps: int) -> dict[str, Any]:
    """Train-step medians for every kind, interleaved, in one process."""
    import torch

    import graftlib

    torch.set_num_threads(2)
    model = _model(shape)
    batch = _example(model.config.vocab_size)
    grafts = {kind: graftlib.apply(model, spec).train() for kind, spec in SPECS.items()}
    optims = {k: torch.optim.AdamW(g.trainable_parameters().values(), lr=1e-4) for k, g in grafts.items()}
    times: dict[str, list[float]] = {k: [] for k in grafts}
    losses: dict[str, float] = {}
    for step in range(steps + 1):
        for kind, g in grafts.items():
            start = time.perf_counter()
            loss = g(**batch).loss
            loss.backward()
            optims[kind].step()
            optims[kind].zero_grad(set_to_none=True)
            if step:  # the first step builds graphs
                times[kind].append(time.perf_counter() - start)
            losses[kind] = float(loss)
    return {k: {"median_ms": 1e3 * statistics.median(v), "last_loss": losses[k]} for k, v in times.items()}


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux ``clear_refs`` 5), so the peak is the training's."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def child_1b(steps: int = 2, recompute: bool = True) -> dict[str, Any]:
    """NF4 + LoRA on the 1.1B shape; ``recompute=False`` keeps every dequantised weight for backward
    (the plain graph, as before training graphs used ``dequant_linear``)."""
    import torch

    import graftlib
    import graftlib.passes.quantize as quantize

    if not recompute:
        quantize.recompute_in_backward = lambda graph, adapter: False
    torch.set_num_threads(2)
    model = _model("llama-1.1b")
    batch = _example(model.config.vocab_size, length=32)
    g = graftlib.apply(model, SPECS["nf4"]).train()
    del model
    _trim()
    resting = _rss_mib()
    g(**batch)  # the training graph is built (traced) outside the measured steps
    _trim()
    _reset_peak()
    optim = torch.optim.AdamW(g.trainable_parameters().values(), lr=1e-4)
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = g(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - start)
    return {"recompute": recompute, "losses": losses, "step_s": times, "rss_at_rest_mib": resting,
            "train_peak_rss_mib": _rss_mib("VmHWM:")}


DEMO_SPECS = {"fp32": "lora(q,v,r=16)", "int8": 'quantize("encoder.*", bits=8) + lora(q,v,r=16)',
              "nf4": 'quantize("encoder.*", bits=4) + lora(q,v,r=16)'}  # the encoder: the head trains in fp32


def demo_rows(steps: int = 50) -> dict[str, Any]:
    """The demo task (graftlib-demo: all-MiniLM-L6-v2 reviews, seed 0) for LoRA, int8 + LoRA and NF4 + LoRA:
    test accuracy and final train loss after `steps` steps, each run in its own process."""
    import tempfile
    from pathlib import Path

    rows: dict[str, Any] = {}
    for kind, spec in DEMO_SPECS.items():
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, "-m", "graftlib.tools.demo", "--steps", str(steps), "--spec", spec,
                                   "--out", out, "--force"], capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"demo {spec} failed:\n{done.stderr[-3000:]}")
            summary = json.loads((Path(out) / "summary.json").read_text())
        rows[kind] = {"spec": spec, "steps": steps, "accuracy": summary["accuracy_after"],
                      "train_loss": summary["train_loss_after"]}
    return rows


def _run_child(call: str) -> dict[str, Any]:
    code = f"import json; from graftlib.tools import bench_quant as b; print(json.dumps(b.{call}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{call} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graftlib.tools.bench_quant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--skip-1b", action="store_true", help="leave out the 1.1B rows")
    parser.add_argument("--steps", type=int, default=7, help="train steps per kind (default 7)")
    parser.add_argument("--only-1b", action="store_true", help="only the 1.1B training rows (peak RSS)")
    parser.add_argument("--demo-steps", type=int, default=0, metavar="N",
                        help="also the demo task rows after N steps (accuracy, loss; e.g. 50: ~4 min)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"memory": {}, "train": {}}
    shapes = [] if args.only_1b else ["llama-160m"] + ([] if args.skip_1b else ["llama-1.1b"])
    for shape in shapes:
        for kind in SPECS:
            row = results["memory"][f"{shape} {kind}"] = _run_child(f"child_memory({shape!r}, {kind!r})")
            print(f"memory  {shape:11s} {kind:5s} model fp32 {row['model_fp32_mib']:8.1f} MiB  graft alone "
                  f"{row['graft_mib']:8.1f} MiB  x{row['ratio']:.3f}  apply {row['apply_s']:.1f} s", flush=True)
    if not args.only_1b:
        results["train"]["llama-160m"] = train = _run_child(f"child_train('llama-160m', {args.steps})")
        for kind, row in train.items():
            print(f"train   llama-160m  {kind:5s} {row['median_ms']:8.1f} ms  x{row['median_ms'] / train['fp32']['median_ms']:.3f}"
                  f" of fp32 LoRA  loss {row['last_loss']:.4f}", flush=True)
    if not args.skip_1b:
        for recompute in (False, True):
            row = results[f"1b recompute={recompute}"] = _run_child(f"child_1b(2, recompute={recompute})")
            print(f"1.1B nf4+lora (dequantised weights {'recomputed in backward' if recompute else 'kept'}): "
                  f"2 steps, losses {row['losses']}, step {row['step_s']} s, RSS at rest "
                  f"{row['rss_at_rest_mib']:.0f} MiB, training peak {row['train_peak_rss_mib']:.0f} MiB", flush=True)
    if args.demo_steps:
        results["demo"] = demo_rows(args.demo_steps)
        for kind, row in results["demo"].items():
            print(f"demo    {kind:5s} {row['steps']} steps: test accuracy {100 * row['accuracy']:.1f} %, "
                  f"train loss {row['train_loss']:.4f}   ({row['spec']})", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
