"""Benchmark graftlib against PEFT and the bare base model, side by side in one process.

    python -m graftlib.tools.bench               # full run (bert-base + a Llama-shaped model), ~20 min
    python -m graftlib.tools.bench --quick       # tiny models, a smoke run
    python -m graftlib.tools.bench --only dora   # one section (DoRA vs PEFT DoRA vs graftlib LoRA)

    python -m graftlib.tools.bench --only checkpointing   # one section (saved-for-backward bytes, ~1 min)
    python -m graftlib.tools.bench --only blocks   # per-block runtime (g.blocks(), for FSDP2) vs flat
    python -m graftlib.tools.bench --only gpu   # CUDA rows (train step, peak memory, forward); tools/gpu_check.sh
    python -m graftlib.tools.bench --only decode   # generation: token parity, tokens/s, mixed, ORT with past

Contenders are interleaved (each repetition times every contender once, in rotating order) and the
table reports medians and ratios. Memory and the 1B-scale apply run in fresh subprocesses so their
peak RSS is theirs alone; torch.compile's compile time runs each contender in a fresh subprocess with
its own inductor cache directory, cold (empty) and warm (a second process on it), so neither reuses
the other's kernels or a cache left by earlier runs. Results: a markdown table on stdout and JSON in --json.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["main", "Row"]


@dataclass
class Row:
    section: str
    case: str
    graftlib: float | None
    peft: float | None = None
    base: float | None = None
    unit: str = "ms"
    note: str = ""

    @property
    def vs_peft(self) -> float | None:
        return self.graftlib / self.peft if self.graftlib and self.peft else None

    @property
    def vs_base(self) -> float | None:
        return self.graftlib / self.base if self.graftlib and self.base else None


@dataclass
class Models:
    name: str
    build: Callable[[], torch.nn.Module]
    targets: list[str]
    vocab: int
    token_types: bool = False


def _bert(quick: bool) -> Models:
    from transformers import BertConfig, BertModel

    cfg = BertConfig() if not quick else BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=128)
    return Models("bert-base" if not quick else "bert-tiny", lambda: BertModel(cfg).eval(), ["query", "value"],
                  cfg.vocab_size, token_types=True)


def _llama(quick: bool) -> Models:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=32000) if not quick else \
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000)
    return Models("llama-160m" if not quick else "llama-tiny", lambda: LlamaModel(cfg).eval(),
                  ["q_proj", "v_proj"], cfg.vocab_size)


def _inputs(m: "Models", batch: int, seq: int) -> dict[str, torch.Tensor]:
    """What the model's tokenizer would give: ids, mask (and token types for BERT)."""
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, m.vocab, (batch, seq), generator=gen),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if m.token_types:
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return inputs


def _median_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 2) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def _paired_ratio(a: Callable[[], Any], b: Callable[[], Any], reps: int, warmup: int = 2
                  ) -> tuple[float, float, float, float, float]:
    """(median ms of a, of b, median of the per-repetition ratios a/b, and its 95 % bootstrap interval).
    Each repetition times a and b back to back (alternating which goes first), so a slow spell of the
    machine hits both sides of a ratio: a bound of 1 % holds up where two separate medians drift by more."""
    import random

    for _ in range(warmup):
        a(), b()
    times_a, times_b = [], []
    for rep in range(reps):
        pair = {}
        for name, fn in ((("a", a), ("b", b)) if rep % 2 == 0 else (("b", b), ("a", a))):
            start = time.perf_counter()
            fn()
            pair[name] = time.perf_counter() - start
        times_a.append(pair["a"]), times_b.append(pair["b"])
    ratios = [x / y for x, y in zip(times_a, times_b)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return (1000 * statistics.median(times_a), 1000 * statistics.median(times_b), statistics.median(ratios),
            medians[50], medians[1949])


def _randomise_lora(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)


def _peft(model: torch.nn.Module, targets: list[str], r: int = 16):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0))


def bench_apply(m: Models, reps: int) -> list[Row]:
    import graftlib

    model = m.build()
    trace_t, apply_t, peft_t, unverified_t = [], [], [], []

    def timed(times: list[float], fn: Callable[[], Any]) -> None:
        gc.collect()  # the previous result's reference cycles are freed here, not inside the next timing
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)

    for _ in range(reps):
        timed(trace_t, lambda: graftlib.trace(model))
        timed(apply_t, lambda: graftlib.apply(model, "lora(q,v,r=16)"))
        timed(unverified_t, lambda: graftlib.apply(model, "lora(q,v,r=16)", verify=False))
        fresh = copy.deepcopy(model)
        timed(peft_t, lambda: _peft(fresh, m.targets))
    med = lambda v: 1000 * statistics.median(v)  # noqa: E731
    return [Row("1 apply", f"{m.name} lora(q,v,r=16), dynamic dims", med(apply_t), med(peft_t),
                note=f"trace alone {med(trace_t):.0f} ms (verified), verify=False {med(unverified_t):.0f} ms")]


def bench_apply_swin(quick: bool, reps: int) -> list[Row]:
    """Swin (drop_path_rate 0.1): images keep static sizes, batch dynamic; then the eval graph's trace."""
    import graftlib
    import transformers as T

    config = T.SwinConfig() if not quick else T.SwinConfig(image_size=32, patch_size=4, embed_dim=16,
                                                           depths=[1, 1], num_heads=[2, 2], window_size=4)
    model = T.SwinModel(config).train()
    apply_t, eval_t = [], []
    for _ in range(reps):
        gc.collect()
        start = time.perf_counter()
        g = graftlib.apply(model, "lora(q,v,r=16)")
        apply_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        g.eval()  # traces the eval-mode graph and replays the graft
        eval_t.append(time.perf_counter() - start)
    med = lambda v: 1000 * statistics.median(v)  # noqa: E731
    name = "swin-tiny" if not quick else "swin (tiny config)"
    return [Row("1 apply", f"{name} lora(q,v,r=16), train mode, batch dynamic", med(apply_t),
                note=f"first eval() {med(eval_t):.0f} ms")]


def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off in every contender (set before tracing, so the graph records p = 0 too)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
    for module in model.modules():  # attention modules copy the probability at construction
        for attr in ("dropout_prob", "attention_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model


def _graftlib_contender(base: torch.nn.Module) -> torch.nn.Module:
    import graftlib

    g = graftlib.apply(base, "lora(q,v,r=16)").eval()
    _randomise_lora(g)
    return g


def _peft_contender(base: torch.nn.Module, m: Models) -> torch.nn.Module:
    peft_model = _peft(copy.deepcopy(base), m.targets).eval()
    _randomise_lora(peft_model)
    return peft_model


def _contenders(m: Models):
    base = _no_dropout(m.build())
    return base, _graftlib_contender(base), _peft_contender(base, m)


def bench_forward(m: Models, shapes: list[tuple[int, int]], reps: int) -> list[Row]:
    base, g, peft_model = _contenders(m)
    merged = g.merge().eval()
    rows = []
    for batch, seq in shapes:
        x = _inputs(m, batch, seq)
        with torch.inference_mode():
            t = _median_interleaved({"graftlib": lambda: g(**x), "peft": lambda: peft_model(**x),
                                     "base": lambda: base(**x), "merged": lambda: merged(**x)}, reps)
        rows.append(Row("2 forward, unmerged", f"{m.name} {batch}x{seq}", t["graftlib"], t["peft"], t["base"]))
        rows.append(Row("4 forward, merged", f"{m.name} {batch}x{seq}", t["merged"], None, t["base"]))
    return rows


def _train_step(module, x, optimizer, embeds_grad: bool = False):
    def step():
        out = module(**x)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        hidden.float().pow(2).mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def bench_train(m: Models, shapes: list[tuple[int, int]], reps: int, compiled: bool = False) -> list[Row]:
    base, g, peft_model = _contenders(m)
    g.train()
    peft_model.train()
    g_opt = torch.optim.AdamW(g.trainable_parameters().values(), lr=1e-4)
    p_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    rows = []
    g_run, p_run = g, peft_model
    note = ""
    if compiled:  # steady state only: compile time is measured in fresh processes (bench_compile_time)
        g_run = torch.compile(g, fullgraph=True)
        p_run = torch.compile(peft_model)
    section = "5 torch.compile: train step" if compiled else "3 train step (fwd+bwd+AdamW)"
    for batch, seq in shapes:
        x = _inputs(m, batch, seq)
        fns = {"graftlib": _train_step(g_run, x, g_opt), "peft": _train_step(p_run, x, p_opt)}
        if not compiled:
            fns["base"] = _base_backward(base, x)
            note = "base = fwd+bwd of the frozen model (grad to the embeddings), no optimiser"
        t = _median_interleaved(fns, reps, warmup=2 if not compiled else 3)
        rows.append(Row(section, f"{m.name} {batch}x{seq}", t["graftlib"], t["peft"], t.get("base"), note=note))
    return rows


def _base_backward(base, x):
    embeddings = base.get_input_embeddings()
    for p in base.parameters():
        p.requires_grad_(False)

    def step():
        embeds = embeddings(x["input_ids"]).detach().requires_grad_(True)
        rest = {k: v for k, v in x.items() if k != "input_ids"}
        out = base(inputs_embeds=embeds, **rest)
        out.last_hidden_state.pow(2).mean().backward()
    return step


def bench_mixed(m: Models, shapes: list[tuple[int, int]], reps: int, n_adapters: int = 8) -> list[Row]:
    import graftlib
    from peft import LoraConfig

    base = m.build()
    spec = " + ".join(f"lora(q,v,r=16,name=a{i})" for i in range(n_adapters))
    g = graftlib.apply(base, spec).eval()
    _randomise_lora(g)
    peft_model = _peft(copy.deepcopy(base), m.targets)
    for i in range(n_adapters):
        peft_model.add_adapter(f"a{i}", LoraConfig(r=16, lora_alpha=16, target_modules=m.targets))
    _randomise_lora(peft_model)
    peft_model.eval()
    rows = []
    for batch, seq in shapes:
        x = _inputs(m, batch, seq)
        names = [f"a{i % n_adapters}" for i in range(batch)]
        with torch.inference_mode():
            t = _median_interleaved({"graftlib": lambda: g(**x, adapter_names=names),
                                     "peft": lambda: peft_model(**x, adapter_names=names),
                                     "base": lambda: base(**x)}, reps)
        rows.append(Row("5b mixed-adapter batch", f"{m.name} {batch}x{seq}, {n_adapters} adapters",
                        t["graftlib"], t["peft"], t["base"]))
    return rows


def bench_onnx(m: Models, reps: int) -> list[Row]:
    import onnxruntime as ort

    import graftlib
    from graftlib.export import export_onnx

    base = m.build()
    g = graftlib.apply(base, "lora(q,v,r=16)").eval()
    _randomise_lora(g)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_onnx(g, os.path.join(tmp, "merged.onnx"), merge=True, verify=False, progress=False)
        export_time = time.perf_counter() - start
        export_onnx(graftlib.apply(base, "lora(q,r=1)").merge(), os.path.join(tmp, "base.onnx"), merge=True,
                    verify=False, progress=False)
        rows.append(Row("6 ONNX export (merged)", m.name, export_time * 1000, unit="ms"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        sessions = {k: ort.InferenceSession(os.path.join(tmp, f"{k}.onnx"), options) for k in ("merged", "base")}
        x = {k: v.numpy() for k, v in _inputs(m, 8, 128).items()}
        feeds = {k: {i.name: x[i.name] for i in s.get_inputs() if i.name in x} for k, s in sessions.items()}
        t = _median_interleaved({k: (lambda k=k: sessions[k].run(None, feeds[k])) for k in sessions}, reps)
        rows.append(Row("6 onnxruntime latency", f"{m.name} 8x128, merged vs base export", t["merged"],
                        base=t["base"]))
    return rows


def _dora_contenders(m: Models) -> tuple[torch.nn.Module, ...]:
    """graftlib DoRA, PEFT DoRA, graftlib LoRA and the bare base model (HF eager, no adapters) on one base,
    q,v r=16, B random (DoRA's norm is not trivial)."""
    import graftlib
    from peft import LoraConfig, get_peft_model

    base = _no_dropout(m.build())
    dora = graftlib.apply(base, "lora(q,v,r=16,dora=true)").eval()
    lora = graftlib.apply(base, "lora(q,v,r=16)").eval()
    peft_dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=16, target_modules=m.targets,
                                                               lora_dropout=0.0, use_dora=True)).eval()
    for module in (dora, lora, peft_dora):
        _randomise_lora(module)
    return dora, peft_dora, lora, base.eval()


def bench_dora(m: Models, shapes: list[tuple[int, int]], reps: int) -> list[Row]:
    """DoRA unmerged: eval forward (PEFT uncached and with ENABLE_DORA_CACHING) and train step; the base
    column holds graftlib LoRA at the same sites and rank. The floor row times the bare base model (no
    adapters at all) against PEFT's DoRA: no DoRA, however fused, can run below it unmerged."""
    import peft.tuners.lora.dora as peft_dora_module

    dora, peft_dora, lora, bare = _dora_contenders(m)
    rows = []
    for batch, seq in shapes:
        x = _inputs(m, batch, seq)
        with torch.inference_mode():
            t = _median_interleaved({"graftlib": lambda: dora(**x), "peft": lambda: peft_dora(**x),
                                     "base": lambda: lora(**x), "bare": lambda: bare(**x)}, reps)
            peft_dora_module.ENABLE_DORA_CACHING = True
            try:
                cached = _median_interleaved({"graftlib": lambda: dora(**x), "peft": lambda: peft_dora(**x)}, reps)
            finally:
                peft_dora_module.ENABLE_DORA_CACHING = False
                for module in peft_dora.modules():
                    if hasattr(module, "_cache_clear"):
                        module._cache_clear()
        rows.append(Row("9 DoRA forward, unmerged", f"{m.name} {batch}x{seq}", t["graftlib"], t["peft"], t["base"],
                        note="base column = graftlib LoRA; PEFT default (no DoRA cache)"))
        rows.append(Row("9 DoRA forward, unmerged", f"{m.name} {batch}x{seq}, floor", t["bare"], t["peft"],
                        note="graftlib column = the base model with no adapters (HF eager): the lowest ratio any "
                             "unmerged DoRA can reach"))
        rows.append(Row("9 DoRA forward, unmerged", f"{m.name} {batch}x{seq}, PEFT cached", cached["graftlib"],
                        cached["peft"], note="PEFT with ENABLE_DORA_CACHING = True"))
    dora.train()
    lora.train()
    peft_dora.train()
    optimisers = {k: torch.optim.AdamW([p for p in v.parameters() if p.requires_grad], lr=1e-4)
                  for k, v in (("graftlib", dora), ("peft", peft_dora), ("base", lora))}
    for batch, seq in shapes:
        x = _inputs(m, batch, seq)
        t = _median_interleaved({"graftlib": _train_step(dora, x, optimisers["graftlib"]),
                                 "peft": _train_step(peft_dora, x, optimisers["peft"]),
                                 "base": _train_step(lora, x, optimisers["base"])}, max(5, reps // 2))
        rows.append(Row("9 DoRA train step (fwd+bwd+AdamW)", f"{m.name} {batch}x{seq}", t["graftlib"], t["peft"],
                        t["base"], note="base column = graftlib LoRA train step"))
    return rows


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time, torch
    sys.path.insert(0, {root!r})
    from graftlib.tools.bench import _bert, _llama
    import graftlib
    what, quick = sys.argv[1], sys.argv[2] == "1"
    def status(key):  # MiB; ru_maxrss would carry the parent's peak across fork + exec
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    def reset_peak():
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    rss = lambda: status("VmHWM:")  # peak since the last reset
    if what == "scale":
        from transformers import LlamaConfig, LlamaForCausalLM
        layers = 2 if quick else 22
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=4, vocab_size=32000)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        params = sum(p.numel() for p in model.parameters())
        reset_peak(); before = status("VmRSS:"); start = time.perf_counter()
        graftlib.apply(model, "lora(q,v,r=16)")
        print(json.dumps(dict(seconds=time.perf_counter() - start, peak_mib=rss(), before_mib=before, params=params)))
    else:
        model = _bert(quick).build()
        reset_peak(); base = status("VmRSS:")
        g = graftlib.apply(model, "lora(q,v,r=16)")
        apply_peak, after_apply = rss(), status("VmRSS:")
        merge_peak = None
        if what == "merge":
            reset_peak()
            merged = g.merge(inplace=False)
            merge_peak = rss()
        print(json.dumps(dict(base=base, apply_peak=apply_peak, after_apply=after_apply, merge_peak=merge_peak)))
""")


def _subprocess_json(what: str, quick: bool, script: str = _MEMORY_SCRIPT,
                     env: dict[str, str] | None = None) -> dict[str, Any]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script.format(root=root), what, "1" if quick else "0"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    sys.path.insert(0, {root!r})
    from torch._dynamo.utils import counters
    from graftlib.tools.bench import _bert, _graftlib_contender, _inputs, _no_dropout, _peft_contender, _train_step
    who, quick = sys.argv[1], sys.argv[2] == "1"
    torch.manual_seed(0)
    m = _bert(quick)
    base = _no_dropout(m.build())
    module = (_graftlib_contender(base) if who == "graftlib" else _peft_contender(base, m)).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    run = torch.compile(module, fullgraph=who == "graftlib")
    x = _inputs(m, 1, 16)
    start = time.perf_counter()
    _train_step(run, x, optimizer)()
    seconds = time.perf_counter() - start
    print(json.dumps(dict(seconds=seconds, cache_hits=counters["aot_autograd"]["autograd_cache_hit"])))
""")


def bench_compile_time(m: Models, quick: bool, rounds: int) -> list[Row]:
    """First compiled train step, each contender in its own process: cold (empty inductor cache) and warm.

    In one process the contender compiled second reuses the first one's C++ kernels (both graphs lower
    to the same kernels) and its one-time costs, and a shared on-disk cache can hold one contender's
    graph and not the other's; separate processes with their own cache directory compare like for like.
    """
    seconds: dict[tuple[str, str], list[float]] = {}
    hits: dict[tuple[str, str], int] = {}
    names = ["graftlib", "peft"]
    for r in range(rounds):
        order = names[r % 2:] + names[:r % 2]
        with tempfile.TemporaryDirectory() as g_dir, tempfile.TemporaryDirectory() as p_dir:
            dirs = {"graftlib": g_dir, "peft": p_dir}
            for state in ("cold", "warm"):  # warm: a second process on the cache the cold one filled
                for who in order:
                    out = _subprocess_json(who, quick, _COMPILE_SCRIPT, {"TORCHINDUCTOR_CACHE_DIR": dirs[who]})
                    seconds.setdefault((who, state), []).append(1000 * out["seconds"])
                    hits[(who, state)] = hits.get((who, state), 0) + (out["cache_hits"] > 0)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    hit_note = lambda state: (f"graph cache hits: graftlib {hits[('graftlib', state)]}/{rounds}, "  # noqa: E731
                              f"PEFT {hits[('peft', state)]}/{rounds}")
    case = f"{m.name} first train step (1x16)"
    return [
        Row("5 torch.compile: compile time, cold", case, med[("graftlib", "cold")], med[("peft", "cold")],
            note=f"own process and empty inductor cache each; median of {rounds}; graftlib fullgraph=True; "
                 + hit_note("cold")),
        Row("5 torch.compile: compile time, warm", case, med[("graftlib", "warm")], med[("peft", "warm")],
            note=f"a second process on that cache; {hit_note('warm')}"),
    ]


def bench_memory(quick: bool) -> list[Row]:
    applied = _subprocess_json("apply", quick)
    merged = _subprocess_json("merge", quick)
    scale = _subprocess_json("scale", quick)
    return [
        Row("7 memory: peak RSS added by apply", "bert lora(q,v,r=16)", applied["apply_peak"] - applied["base"],
            unit="MiB", note=f"process with the model: {applied['base']:.0f} MiB"),
        Row("7 memory: peak RSS added by merge(inplace=False)", "bert lora(q,v,r=16)",
            merged["merge_peak"] - merged["after_apply"], unit="MiB",
            note="new weights for the merged sites only (q, v: 24 x 2.25 MiB)"),
        Row("8 scale: apply on a meta-device Llama", f"{scale['params'] / 1e9:.2f} B params",
            scale["seconds"] * 1000, unit="ms",
            note=f"peak RSS {scale['peak_mib']:.0f} MiB (process before apply: {scale['before_mib']:.0f} MiB)"),
    ]


def saved_for_backward_bytes(module: torch.nn.Module, inputs: dict[str, Any]) -> int:
    """Bytes autograd keeps for backward after one forward: every tensor saved by an op (through
    ``saved_tensors_hooks``, unique storages) plus the block inputs a checkpointed block keeps to recompute
    (non-reentrant checkpointing stores those outside the hooks, so they are counted where it takes them)."""
    from graftlib import checkpoint as ckpt

    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def keep(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        keep(tensor)
        return tensor

    original = ckpt.Checkpointed.forward

    def counted(self: Any, *args: Any) -> Any:
        for arg in args:
            if isinstance(arg, torch.Tensor) and torch.is_grad_enabled():
                keep(arg)
        return original(self, *args)

    ckpt.Checkpointed.forward = counted
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(**inputs)
        del out
    finally:
        ckpt.Checkpointed.forward = original
    return sum(storages.values())


def bench_checkpointing(quick: bool) -> list[Row]:
    """Saved-for-backward bytes with and without per-block checkpointing: 12 layers, batch 8 x 512."""
    import graftlib
    from transformers import BertConfig, BertModel

    hidden, seq = (64, 128) if quick else (256, 512)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=12, num_attention_heads=4, intermediate_size=4 * hidden,
                     max_position_embeddings=max(512, seq))
    torch.manual_seed(0)
    base = BertModel(cfg).eval()
    g = graftlib.apply(base, "lora(q,v,r=16)").train()
    m = Models("bert-12", lambda: base, ["query", "value"], cfg.vocab_size, token_types=True)
    x = _inputs(m, 8, seq)
    with torch.no_grad():
        g(**x)  # builds the graph for unpadded batches outside the measurement
    without = saved_for_backward_bytes(g, x)
    g.gradient_checkpointing_enable()
    with_ckpt = saved_for_backward_bytes(g, x)
    peft = _peft(copy.deepcopy(base), m.targets).train()
    peft_bytes = saved_for_backward_bytes(peft, x)
    mib = 1024 * 1024
    case = f"bert 12 x {hidden}, batch 8 x {seq}, lora(q,v,r=16)"
    return [
        Row("9 checkpointing: saved for backward, no checkpointing", case, without / mib, peft=peft_bytes / mib,
            unit="MiB", note="saved_tensors_hooks, unique storages; PEFT the same model without checkpointing"),
        Row("9 checkpointing: saved for backward, g.gradient_checkpointing_enable()", case, with_ckpt / mib,
            base=without / mib, unit="MiB",
            note=f"block inputs included; x{with_ckpt / without:.3f} of no checkpointing (graftlib/base column)"),
    ]


def _cuda_timed(fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    """Median ms of `fn` on the GPU (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _cuda_peak(fn: Callable[[], Any]) -> float:
    """Peak GPU memory (MiB) allocated during one call of `fn`, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - start) / (1024 * 1024)


def bench_gpu(quick: bool, reps: int) -> list[Row]:
    """On a CUDA device: Llama (12 x 768) at batch 8 x 512, bf16 autocast: training step time and peak memory
    (graftlib vs PEFT, and with per-block checkpointing), eval forward time. No rows without CUDA."""
    if not torch.cuda.is_available():
        print("   gpu: no CUDA device, section skipped", file=sys.stderr, flush=True)
        return []
    m = _llama(quick)
    batch, seq = (2, 32) if quick else (8, 512)
    base, g, peft_model = _contenders(m)
    device = torch.device("cuda")
    g.to(device).train()
    peft_model.to(device).train()
    x = {k: v.to(device) for k, v in _inputs(m, batch, seq).items()}
    g_opt = torch.optim.AdamW(g.trainable_parameters().values(), lr=1e-4)
    p_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)

    def autocast(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn()
        return run

    g_step, p_step = autocast(_train_step(g, x, g_opt)), autocast(_train_step(peft_model, x, p_opt))
    case = f"{m.name} {batch}x{seq}, lora(q,v,r=16), bf16 autocast"
    g_ms, p_ms = _cuda_timed(g_step, reps), _cuda_timed(p_step, reps)
    g_mib, p_mib = _cuda_peak(g_step), _cuda_peak(p_step)
    g.gradient_checkpointing_enable()
    ck_ms, ck_mib = _cuda_timed(g_step, reps), _cuda_peak(g_step)
    g.gradient_checkpointing_disable()
    g.eval(), peft_model.eval()
    with torch.inference_mode():
        f_g, f_p = _cuda_timed(autocast(lambda: g(**x)), reps), _cuda_timed(autocast(lambda: peft_model(**x)), reps)
    gpu = torch.cuda.get_device_name()
    return [
        Row("10 GPU: train step (fwd+bwd+AdamW)", case, g_ms, p_ms, note=gpu),
        Row("10 GPU: train step peak memory", case, g_mib, p_mib, unit="MiB", note="above the weights"),
        Row("10 GPU: train step, g.gradient_checkpointing_enable()", case, ck_ms, base=g_ms,
            note="base column: graftlib without checkpointing"),
        Row("10 GPU: train step peak memory, checkpointing", case, ck_mib, base=g_mib, unit="MiB",
            note="base column: graftlib without checkpointing"),
        Row("10 GPU: eval forward", case, f_g, f_p),
    ]


def _causal_lm(arch: str, quick: bool = True) -> torch.nn.Module:
    """Tiny causal LMs for token parity; ``llama-160m`` (quick False) for speed."""
    import transformers as T

    text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=256)  # PEFT's prompt generate grows its cache 5 tokens a step
    if arch == "llama" and not quick:
        text = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                    vocab_size=32000, max_position_embeddings=512)
    factories = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**text, num_key_value_heads=4 if not quick else 2)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**text, num_key_value_heads=2)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4,
                                                       n_positions=256, bos_token_id=0, eos_token_id=0)),
    }
    torch.manual_seed(0)
    model = factories[arch]().eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # every row runs all its new tokens (as the reference loop)
    return model


_DECODE_PEFT = {
    "lora": lambda arch: __import__("peft").LoraConfig(
        target_modules=["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"], r=4, lora_alpha=8),
    "prefix": lambda arch: __import__("peft").PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt": lambda arch: __import__("peft").PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


def _same_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters are `model`'s tensors (the modules are its own, to wrap). Two
    copies of one model decode up to ~3 % apart (measured: llama-160m, batch 8, two deep copies, interleaved;
    memory placement), which would decide a comparison of contenders that each got their own copy."""
    twin = copy.deepcopy(model)
    weights = dict(model.named_parameters())
    for name, param in twin.named_parameters():
        param.data = weights[name].data
    return twin


def _decode_prompts(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts (row b has b % seq pads)."""
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, :b % seq] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _greedy_no_cache(model: torch.nn.Module, x: dict[str, torch.Tensor], new: int,
                     offset: int | None) -> torch.Tensor:
    """The whole sequence through `model` per token; positions from the mask (as generate makes them)
    plus `offset` (PEFT's forward adds a prefix's n itself), or none given (None: PEFT's prompt tuning
    ignores position ids)."""
    ids, mask = x["input_ids"], x["attention_mask"]
    for _ in range(new):
        positions = None if offset is None else (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) + offset
        token = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


def _decode_parity() -> list[Row]:
    """% of greedy tokens equal: graftlib's g.generate vs PEFT's generate (and, for prefix / prompt,
    PEFT's forward over the whole sequence per token), and adapters off vs the eager model's generate."""
    import peft

    import graftlib

    rows, new, x = [], 16, _decode_prompts(100, 3, 6)
    for arch in ("llama", "gpt2", "qwen2"):
        for kind, config in _DECODE_PEFT.items():
            pm = peft.get_peft_model(_causal_lm(arch), config(arch)).eval()
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_" in name or "prompt_encoder" in name:
                        p.normal_(0, 0.3)
            with tempfile.TemporaryDirectory() as tmp:
                pm.save_pretrained(tmp)
                g = graftlib.from_peft(_causal_lm(arch), tmp).eval()
            with torch.inference_mode():
                ours = g.generate(**x, max_new_tokens=new, do_sample=False)[:, 6:]
                theirs = pm.generate(**x, max_new_tokens=new, do_sample=False)[:, 6:]
                loop = _greedy_no_cache(pm, x, new, {"lora": 0, "prefix": 0, "prompt": None}[kind])[:, 6:]
                with g.disable_adapters():
                    off = g.generate(**x, max_new_tokens=new, do_sample=False)[:, 6:]
                eager = _causal_lm(arch).generate(**x, max_new_tokens=new, do_sample=False)[:, 6:]
            note = f"PEFT forward per token: {100 * (ours == loop).float().mean():.0f}%; adapters off vs HF " \
                   f"generate: {100 * (off == eager).float().mean():.0f}%"
            rows.append(Row("11 decode parity", f"{arch} {kind}, greedy 3x{new} tokens: % equal to PEFT generate",
                            100 * (ours == theirs).float().mean().item(), unit="%", note=note))
    return rows


def _tokens_per_second(fns: dict[str, Callable[[], Any]], tokens: int, reps: int) -> dict[str, float]:
    return {k: tokens / (ms / 1000) for k, ms in _median_interleaved(fns, reps, warmup=1).items()}


def bench_decode(quick: bool, reps: int) -> list[Row]:
    """Generation: token parity (tiny models), tokens/s of g.generate vs PEFT / base HF generate, mixed
    adapters, onnxruntime with past vs without."""
    import graftlib

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 OpenMP threads time the neighbours, not the ops
    try:
        return _decode_rows(quick, reps)
    finally:
        torch.set_num_threads(threads)


def _decode_rows(quick: bool, reps: int) -> list[Row]:
    import graftlib

    rows = _decode_parity()
    new, name = (8, "llama-tiny") if quick else (64, "llama-160m")
    base = _causal_lm("llama", quick)
    vocab = base.config.vocab_size
    g = graftlib.apply(base, "lora(q,v,r=16)").eval()  # reads base's weight tensors
    _randomise_lora(g)
    merged = g.merge()
    peft_model = _peft(_same_weights(base), ["q_proj", "v_proj"]).eval()
    _randomise_lora(peft_model)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    for batch in (1, 8):
        x = _decode_prompts(vocab, batch, 16)
        with torch.inference_mode():
            t = _tokens_per_second({"graftlib": lambda: g.generate(**x, **kwargs),
                                    "peft": lambda: peft_model.generate(**x, **kwargs),
                                    "merged": lambda: merged.generate(**x, **kwargs),
                                    "base": lambda: base.generate(**x, **kwargs)}, batch * new, reps)
        rows.append(Row("11 decode tokens/s",
                        f"{name} greedy, batch {batch}, {new} new tokens, LoRA unmerged, 1 thread",
                        t["graftlib"], t["peft"], t["base"], unit="tok/s", note="higher is better"))
        rows.append(Row("11 decode tokens/s",
                        f"{name} greedy, batch {batch}, {new} new tokens, graftlib merged, 1 thread",
                        t["merged"], base=t["base"], unit="tok/s", note="higher is better"))
    rows.append(_decode_mixed(base, name, new, reps))
    rows += _decode_onnx(g, name, reps)
    return rows


def _decode_mixed(base: torch.nn.Module, name: str, new: int, reps: int, n: int = 8) -> Row:
    import graftlib

    g = graftlib.apply(base, " + ".join(f"lora(q,v,r=16,name=a{i})" for i in range(n))).eval()
    _randomise_lora(g)
    x = _decode_prompts(base.config.vocab_size, 8, 16)
    names = [f"a{i}" for i in range(8)]
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)

    def single() -> Any:
        g.set_active("a0")
        return g.generate(**x, **kwargs)

    with torch.inference_mode():
        t = _median_interleaved({"mixed": lambda: g.generate(**x, adapter_names=names, **kwargs),
                                 "single": single}, reps, warmup=1)
    return Row("11 decode mixed adapters", f"{name} batch 8, {n} adapters (one per row) vs one adapter, {new} tokens",
               t["mixed"], base=t["single"], note="graftlib/base = mixed / single-adapter time (target <= 1.10)")


def _decode_onnx(g: Any, name: str, reps: int, context: int = 128) -> list[Row]:
    """onnxruntime time per token at `context` cached tokens: the with-past step vs re-running the
    whole sequence (the export without past)."""
    import onnxruntime as ort

    from graftlib.export import export_onnx
    from graftlib.onnx_generate import past_input_names

    with tempfile.TemporaryDirectory() as tmp:
        past_path, full_path = os.path.join(tmp, "past.onnx"), os.path.join(tmp, "full.onnx")
        report = export_onnx(g, past_path, merge=True, with_past=True, progress=False)
        export_onnx(g, full_path, merge=True, verify=False, progress=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        past, full = ort.InferenceSession(past_path, options), ort.InferenceSession(full_path, options)
        shape = report.inputs[past_input_names(1)[0]]
        heads, dim = int(shape[1]), int(shape[3])
        layers = len(report.inputs) - 3
        rng = torch.Generator().manual_seed(0)
        step = {"input_ids": torch.randint(0, 100, (1, 1), generator=rng).numpy(),
                "attention_mask": torch.ones(1, context + 1, dtype=torch.long).numpy(),
                "position_ids": torch.tensor([[context]]).numpy(),
                **{n: torch.randn(1, heads, context, dim, generator=rng).numpy()  # (1, H_kv, context, D)
                   for n in past_input_names(layers // 2)}}
        ids = torch.randint(0, 100, (1, context + 1), generator=rng)
        whole = {i.name: v for i, v in zip(full.get_inputs(), (ids.numpy(), torch.ones_like(ids).numpy()))}
        t = _median_interleaved({"past": lambda: past.run(None, step), "full": lambda: full.run(None, whole)},
                                max(reps, 10))
    diff = max(report.max_abs_diff.values())
    return [Row("11 onnxruntime decode", f"{name} batch 1, context {context}: ms per token, with past vs without",
                t["past"], base=t["full"],
                note=f"export verified: greedy tokens equal PyTorch, prefill logits diff {diff:.1e}")]


def bench_blocks(m: Models, shapes: list[tuple[int, int]], reps: int) -> list[Row]:
    """Single process: the per-block runtime (``g.blocks()``, what FSDP2 shards) against the flat one."""
    base = _no_dropout(m.build())
    from graftlib.blocks import units

    flat, live = _graftlib_contender(base), _graftlib_contender(base)
    live.load_state_dict(flat.state_dict())
    live.blocks()
    units(live)  # what graftlib.distributed.shard calls through: blocks, embeddings and head as modules
    rows = []
    for batch, seq in shapes:
        x = _inputs(m, batch, seq)
        flat.eval(), live.eval()
        with torch.inference_mode():
            rows.append(_blocks_row("forward", m, batch, seq, lambda: live(**x), lambda: flat(**x), reps))
        flat.train(), live.train()
        rows.append(_blocks_row("fwd+bwd", m, batch, seq, _train_step(live, x, None), _train_step(flat, x, None),
                                reps))
    return rows


def _blocks_row(what: str, m: Models, batch: int, seq: int, live: Callable[[], Any], flat: Callable[[], Any],
                reps: int, budget_s: float = 60.0) -> Row:
    """Pairs: as many as fit `budget_s` (at least 2 x reps, at most 300): a 1 % bound needs many."""
    flat()  # warm
    start = time.perf_counter()
    flat()
    pairs = int(min(300, max(2 * reps, budget_s / (2 * (time.perf_counter() - start)))))
    blocks_ms, flat_ms, ratio, low, high = _paired_ratio(live, flat, pairs)
    return Row(f"12 blocks: {what}, g.blocks() vs flat", f"{m.name} {batch}x{seq}", blocks_ms, None, flat_ms,
               note=f"base column = the flat runtime; paired ratio x{ratio:.3f} (95 % interval x{low:.3f}-x{high:.3f}, "
                    f"{pairs} pairs; target <= x1.010)")


def to_markdown(rows: list[Row]) -> str:
    lines = ["| section | case | graftlib | PEFT | base | graftlib/PEFT | graftlib/base | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    fmt = lambda v, unit: "" if v is None else f"{v:,.1f} {unit}"  # noqa: E731
    ratio = lambda v: "" if v is None else f"x{v:.3f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r.section} | {r.case} | {fmt(r.graftlib, r.unit)} | {fmt(r.peft, r.unit)} | "
                     f"{fmt(r.base, r.unit)} | {ratio(r.vs_peft)} | {ratio(r.vs_base)} | {r.note} |")
    return "\n".join(lines)


def machine() -> str:
    import transformers

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, transformers {transformers.__version__}, Python {platform.python_version()}")


SECTIONS = ("apply", "forward", "train", "compile", "mixed", "onnx", "memory", "checkpointing", "dora", "gpu",
            "decode", "blocks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and few repetitions (smoke run)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per timing (default 15, quick 3)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {','.join(SECTIONS)}")
    parser.add_argument("--json", default="bench-results/bench.json", help="where to write the results")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    reps = args.reps or (3 if args.quick else 15)
    only = set(args.only.split(","))
    shapes = [(1, 16), (8, 128)] if not args.quick else [(1, 8), (2, 16)]
    mixed_shapes = [(8, 16), (8, 128)] if not args.quick else [(8, 8)]
    models = [_bert(args.quick), _llama(args.quick)]
    rows: list[Row] = []
    jobs: list[tuple[str, Callable[[], list[Row]]]] = []
    for m in models:
        jobs += [("apply", lambda m=m: bench_apply(m, max(3, reps // 3))
                  + (bench_apply_swin(args.quick, max(3, reps // 5)) if m is models[0] else [])),
                 ("forward", lambda m=m: bench_forward(m, shapes, reps)),
                 ("train", lambda m=m: bench_train(m, shapes, max(5, reps // 2))),
                 ("dora", lambda m=m: bench_dora(m, shapes, reps)),
                 ("blocks", lambda m=m: bench_blocks(m, shapes, reps))]
    jobs += [("compile", lambda: bench_compile_time(models[0], args.quick, max(1, reps // 5))
              + bench_train(models[0], shapes, max(5, reps // 2), compiled=True)),
             ("mixed", lambda: bench_mixed(models[0], mixed_shapes, reps)),
             ("onnx", lambda: bench_onnx(models[0], reps)),
             ("memory", lambda: bench_memory(args.quick)),
             ("checkpointing", lambda: bench_checkpointing(args.quick)),
             ("gpu", lambda: bench_gpu(args.quick, reps)),
             ("decode", lambda: bench_decode(args.quick, max(3, reps // 5)))]
    for section, job in jobs:
        if section not in only:
            continue
        print(f"-- {section} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rows += job()
        print(f"   done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    table = to_markdown(rows)
    print(f"Machine: {machine()}\n\n{table}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"machine": machine(), "quick": args.quick, "reps": reps,
                   "rows": [asdict(r) | {"vs_peft": r.vs_peft, "vs_base": r.vs_base} for r in rows]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
