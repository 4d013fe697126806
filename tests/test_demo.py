"""``graftlib-demo`` end to end, in subprocesses, checked against independent references.

- The real all-MiniLM-L6-v2 with a reduced step count: the accuracy after fine-tuning beats the honest
  "before" (frozen base + the same head trained alone) by ``MARGIN``; onnxruntime, run here on the
  exported file over the whole test split, reproduces the reported accuracy (so the file holds the
  trained head and merged adapter); the saved adapter + head, reloaded with ``graftlib.load``,
  reproduce the ONNX logits; every artefact exists with the size summary.json reports.
- ``--model`` with a tiny random DistilBERT checkpoint: two runs give bit-identical figures and
  adapter files (seeded, fixed data order), and ``--force`` replaces only the demo's own files.
- Refusals: a non-empty ``--out`` without ``--force``, an ``--out`` that is a file, a spec typo, a
  directory where an artefact goes (even with ``--force``): exit status != 0, a message that names
  the fix, and nothing on disk changed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from graftlib.tools import demo

MARGIN = 0.05        # accuracy points (as a fraction) the grafted model must gain over "before"
STEPS = 60           # measured: 84% before -> 94% after at 60 steps (seed 0)
ONNX_TOLERANCE = 1e-4


def run_demo(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "graftlib.tools.demo", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def ort_logits(path: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]


# -- the real model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = run_demo("--steps", str(STEPS), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text()), proc


@pytest.fixture(scope="module")
def minilm() -> tuple[object, object]:
    return demo.load_encoder(demo.default_model_dir())


def test_accuracy_rises_over_the_frozen_baseline(minilm_run: tuple) -> None:
    _, summary, proc = minilm_run
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    assert before >= 0.7, f"the baseline must be a real one (a trained probe), got {before}"
    assert after >= before + MARGIN, f"after {after} does not beat before {before} by {MARGIN}"
    assert summary["steps"] == STEPS and summary["test_sentences"] == 100
    assert "frozen base model + the same head" in summary["accuracy_before_means"]
    assert f"test accuracy before: {before:.1%}" in proc.stdout
    assert f"test accuracy after:  {after:.1%}" in proc.stdout


def test_onnx_file_reproduces_the_reported_accuracy(minilm_run: tuple, minilm: tuple) -> None:
    out, summary, _ = minilm_run
    tokenizer, _ = minilm
    _, test = demo.load_reviews()
    batch = demo.encode(tokenizer, [e.text for e in test])
    logits = ort_logits(out / "model.onnx", batch)                              # (100, 2)
    labels = np.array([e.label for e in test])
    ort_accuracy = float((logits.argmax(-1) == labels).mean())
    assert abs(ort_accuracy - summary["accuracy_after"]) <= 0.01  # merged vs unmerged may flip one tie
    onnx = summary["onnx"]
    assert onnx["verified"] and 0 <= onnx["max_abs_diff"] <= ONNX_TOLERANCE
    assert onnx["merged"] == ["default"] and onnx["kept"] == []
    assert summary["merged_same_ops_as_base"] and summary["merge_max_abs_diff"] < 1e-4


def test_example_sentences_match_onnxruntime_here(minilm_run: tuple, minilm: tuple) -> None:
    out, summary, proc = minilm_run
    tokenizer, _ = minilm
    logits = ort_logits(out / "model.onnx", demo.encode(tokenizer, demo.EXAMPLES))
    probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
    examples = summary["examples"]
    assert [e["text"] for e in examples] == list(demo.EXAMPLES)
    np.testing.assert_allclose([e["probabilities"] for e in examples], probs, atol=1e-5)
    np.testing.assert_allclose([e["torch_probabilities"] for e in examples], probs, atol=ONNX_TOLERANCE)
    assert [e["label"] for e in examples] == ["positive", "negative"]
    for e in examples:
        assert f"{e['label']:>8} p={e['probability']:.3f}" in proc.stdout


def test_saved_adapter_and_head_reload_to_the_onnx_logits(minilm_run: tuple, minilm: tuple) -> None:
    import graftlib

    out, summary, _ = minilm_run
    tokenizer, encoder = minilm
    classifier = demo.SentenceClassifier(encoder)
    head = load_file(str(out / "adapter" / "head.safetensors"))
    classifier.head.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
    batch = demo.encode(tokenizer, demo.EXAMPLES + ("Mediocre.",))
    g = graftlib.load(classifier, out / "adapter", example_inputs=batch).eval()
    with torch.no_grad():
        logits = g(**batch).numpy()
    np.testing.assert_allclose(logits, ort_logits(out / "model.onnx", batch), atol=ONNX_TOLERANCE)
    assert g.sites() == summary["sites"]
    tensors = load_file(str(out / "adapter" / "adapters.safetensors"))
    assert len(tensors) == 2 * len(summary["sites"]) == 24
    assert all(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_B"))  # trained from zero


def test_every_artefact_exists(minilm_run: tuple) -> None:
    out, summary, proc = minilm_run
    assert sorted(summary["files"]) == sorted(demo.ARTEFACTS)
    for name, info in summary["files"].items():
        path = out / name
        assert Path(info["path"]) == path and path.is_file() and path.stat().st_size > 0
        if info["bytes"] is not None:
            assert path.stat().st_size == info["bytes"]
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")], "staging directory left behind"
    text = (out / "diff.txt").read_text()
    html = (out / "diff.html").read_text()
    assert summary["diff"]["sites"] == len(summary["sites"]) == 12
    assert summary["diff"]["inserted"] > 0 and summary["diff"]["removed"] == 0
    for role in ("attention.self.query", "attention.self.value"):
        assert role in text and role in html
    assert html.startswith("<!DOCTYPE html>")
    assert all(line in proc.stdout for line in text.splitlines())    # the text summary was printed
    assert f"{summary['trainable_parameters']:,} of {summary['total_parameters']:,}" in proc.stdout
    assert summary["adapter_parameters"] == 12 * 2 * 16 * 384 and summary["head_parameters"] == 384 * 2 + 2


# -- --model, determinism, --force --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init DistilBERT (dim 32, 2 layers) saved like any HF checkpoint, MiniLM's tokenizer."""
    import shutil

    from transformers import DistilBertConfig, DistilBertModel

    directory = tmp_path_factory.mktemp("tiny") / "distilbert"
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=128)
    DistilBertModel(config).save_pretrained(directory)
    source = demo.default_model_dir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, directory / name)
    return directory


def test_model_option_is_deterministic_and_force_keeps_other_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    second.mkdir()
    (second / "notes.txt").write_text("mine")
    (second / "model.onnx").write_text("stale")
    (second / "adapter").mkdir()
    (second / "adapter" / "mine.txt").write_text("also mine")
    runs = [run_demo("--model", str(tiny_checkpoint), "--steps", "5", "--spec", "lora(q,v,r=4)", "--out", str(out),
                     *extra) for out, extra in ((first, ()), (second, ("--force",)))]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((out / "summary.json").read_text()) for out in (first, second))
    assert a["model_class"] == "DistilBertModel" and len(a["sites"]) == 4
    assert all(s.endswith(("q_lin", "v_lin")) for s in a["sites"])
    figures = ("accuracy_before", "accuracy_after", "train_loss_before", "train_loss_after", "examples",
               "adapter_parameters", "merge_max_abs_diff")
    assert {k: a[k] for k in figures} == {k: b[k] for k in figures}
    for name in ("adapter/adapters.safetensors", "adapter/head.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert a["onnx"]["verified"] and a["onnx"]["max_abs_diff"] <= ONNX_TOLERANCE
    assert (second / "notes.txt").read_text() == "mine"
    assert (second / "adapter" / "mine.txt").read_text() == "also mine"
    assert (second / "model.onnx").stat().st_size == b["files"]["model.onnx"]["bytes"] > 1000


# -- refusals ---------------------------------------------------------------------------------------
REFUSALS = [
    # (case, how to prepare --out, extra args, exit code, phrases in stderr)
    ("non-empty --out", "dir", (), 2, ("already exists and is not empty", "nothing was changed", "--force")),
    ("--out is a file", "file", (), 2, ("is a file, not a directory", "choose another --out")),
    ("spec typo", "none", ("--spec", "lora(q,v"), 1, ("GraftSpecError", "lora(q,v", "^")),
    ("--force, an artefact's name taken by a directory", "blocked", ("--force",), 2,
     ("has a directory or file where the demo writes model.onnx", "move it away")),
]


@pytest.mark.parametrize("case,prepare,extra,code,phrases", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_change_nothing(tmp_path: Path, case: str, prepare: str, extra: tuple, code: int,
                                 phrases: tuple) -> None:
    out = tmp_path / "out"
    if prepare == "dir":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
        (out / "adapter").mkdir()
        (out / "adapter" / "graft.json").write_text("{}")
    elif prepare == "file":
        out.write_text("a file")
    elif prepare == "blocked":
        (out / "model.onnx").mkdir(parents=True)
        (out / "model.onnx" / "inside.txt").write_text("precious")
    before = snapshot(tmp_path)
    proc = run_demo("--steps", "1", "--out", str(out), *extra, timeout=300)
    assert proc.returncode == code, proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if prepare != "none" else [])
    assert proc.stdout == ""
