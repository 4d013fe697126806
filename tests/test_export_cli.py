"""graftlib-export end to end, in a subprocess, on a saved graft directory that names its base model.

A tiny BERT is saved with ``save_pretrained``, reloaded from that directory (so its config names it),
grafted with LoRA (random non-zero weights) and saved with ``g.save``. Each case runs the command and
checks the exit code, the message and that no partial file is left; successful exports are compared
with the in-process grafted module under onnxruntime.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils import _pytree as pytree

import graftlib
from graftlib.tools.export_cli import build_parser, default_model_dir

from models import build, inputs_for

TOL = 1e-4
CLI = [sys.executable, "-m", "graftlib.tools.export_cli"]


@dataclass
class Saved:
    root: Path
    base: Path      # save_pretrained directory
    graft: Path     # g.save directory, naming `base`
    g: graftlib.Grafted


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, timeout=600)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("graftlib-export: error: ")
    return lines[0]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    import transformers

    root = tmp_path_factory.mktemp("export_cli")
    model, _ = build("bert")
    model.save_pretrained(root / "base")
    model = transformers.BertModel.from_pretrained(str(root / "base")).eval()
    g = graftlib.apply(model, "lora(q,v,r=4)")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in g.store.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    g.save(root / "graft")
    g.eval()
    return Saved(root, root / "base", root / "graft", g)


def ort_vs_torch(path: Path, g: graftlib.Grafted, batch: int, seq: int) -> float:
    inputs = inputs_for("bert", batch=batch, seq=seq, seed=21)
    inputs["attention_mask"][-1, -1] = 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {i.name: inputs[i.name].numpy() for i in session.get_inputs()})
    with torch.no_grad():
        torch_out = [t.numpy() for t in pytree.tree_leaves(g(**inputs)) if isinstance(t, torch.Tensor)]
    assert [o.shape for o in onnx_out] == [t.shape for t in torch_out]
    return max(float(np.abs(o - t).max()) for o, t in zip(onnx_out, torch_out))


def test_console_script_is_declared() -> None:
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("graftlib-export") == "graftlib.tools.export_cli:main"


def test_merge_export_of_a_saved_graft_into_a_missing_directory(saved: Saved) -> None:
    out = saved.root / "exports" / "nested" / "model.onnx"
    result = run(["--model", str(saved.graft), "--merge", str(out)], cwd=saved.root)
    assert result.returncode == 0, result.stderr
    assert files_under(saved.root / "exports") == ["nested/model.onnx"]
    stdout = result.stdout
    assert f"wrote {out} (" in stdout
    assert "ops added vs base: none (same ops as the base)" in stdout
    assert "merged:      default; kept as nodes: -" in stdout
    assert "parameters:  base 23,520, adapters 1,024, exported " in stdout
    diffs = [float(d) for d in re.findall(r"sequence=\d+: ([0-9.e+-]+)", stdout)]
    assert len(diffs) == 2 and max(diffs) <= TOL
    size = out.stat().st_size
    assert f"({size / 1024:.1f} KB" in stdout
    assert f"loading {saved.base}" in result.stderr and f"applying {saved.graft}" in result.stderr
    assert ort_vs_torch(out, saved.g, batch=4, seq=9) <= TOL
    with saved.g.disable_adapters():  # the merged LoRA really is in the file
        assert ort_vs_torch(out, saved.g, batch=4, seq=9) > 1e-3


def test_adapter_and_spec_on_a_base_model_static_unmerged(saved: Saved) -> None:
    out = saved.root / "static.onnx"
    result = run(["--model", str(saved.base), "--adapter", str(saved.graft), "--spec", "lora(k,r=2,name=extra)",
                  "--static", "--quiet", str(out)], cwd=saved.root)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # q, v (graft dir) and k (spec) in 2 layers: one join and two matmuls per site
    assert "ops added vs base: Add +6, MatMul +12, Transpose +12" in result.stdout
    assert "inputs:      input_ids (2, 7), attention_mask (2, 7), token_type_ids (2, 7)" in result.stdout
    assert "merged:      -; kept as nodes: default, extra" in result.stdout
    assert "static shape, draw 1" in result.stdout
    assert ort_vs_torch(out, saved.g, batch=2, seq=7) <= TOL   # extra's B is zero: equals the saved graft


def test_forced_verification_failure_leaves_nothing(saved: Saved) -> None:
    target = saved.root / "failed" / "model.onnx"
    result = run(["--model", str(saved.graft), "--merge", "--tolerance", "0", "--quiet", str(target)], cwd=saved.root)
    assert result.returncode == 1
    line = one_error_line(result)
    assert re.fullmatch(r"graftlib-export: error: verification failed: ONNX output '\w+' differs from PyTorch by "
                        r"max-abs-diff [0-9.e-]+ > tolerance 0 at batch=3, sequence=8; no file was written", line)
    assert not (saved.root / "failed").exists()
    assert result.stdout == ""


def test_unreadable_adapter(saved: Saved) -> None:
    broken = saved.root / "broken"
    broken.mkdir()
    (broken / "graft.json").write_text((saved.graft / "graft.json").read_text())
    (broken / "adapters.safetensors").write_bytes(b"\x00\xffnot safetensors")
    out = saved.root / "never" / "model.onnx"
    result = run(["--model", str(saved.base), "--adapter", str(broken), str(out)], cwd=saved.root)
    assert result.returncode == 1
    assert re.fullmatch(rf"graftlib-export: error: {re.escape(str(broken))}/adapters.safetensors is not a "
                        r"readable safetensors file \(.*\); re-save the adapter", one_error_line(result))
    assert not (saved.root / "never").exists()


@pytest.mark.parametrize("args, message", [
    (["--adapter", "{root}/missing"], "adapter directory {root}/missing does not exist"),
    (["--model", "{root}/base", "--adapter", "{root}/base"],
     "{root}/base is not a saved graft: graft.json is missing (save one with g.save(dir))"),
    (["--model", "{root}"], "{root} has neither config.json (a Hugging Face model) nor graft.json (a saved graft)"),
], ids=["missing-adapter", "adapter-is-not-a-graft", "model-is-neither"])
def test_bad_directories(saved: Saved, args: list[str], message: str) -> None:
    root = str(saved.root)
    result = run([a.format(root=root) for a in args] + ["--quiet", "out.onnx"], cwd=saved.root)
    assert result.returncode == 1
    assert one_error_line(result) == "graftlib-export: error: " + message.format(root=root)
    assert not (saved.root / "out.onnx").exists()


def test_spec_that_matches_nothing(saved: Saved) -> None:
    result = run(["--model", str(saved.graft), "--spec", "lora(nothing_here,name=x)", "--quiet", "out.onnx"],
                 cwd=saved.root)
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith("graftlib-export: error: target 'nothing_here' matches no alias or module that lora "
                           "can graft")
    assert line.endswith("(in 'lora(nothing_here,name=x)' at column 5)")
    assert not (saved.root / "out.onnx").exists()


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: output"),
    (["--tolerance", "-1", "x.onnx"], "--tolerance must be >= 0, got -1.0"),
    (["--opset", "eighteen", "x.onnx"], "argument --opset: invalid int value: 'eighteen'"),
    (["."], "output . is a directory: give a file name such as model.onnx"),
])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = run(args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: graftlib-export")
    assert result.stderr.rstrip().endswith("graftlib-export: error: " + message)
    assert list(tmp_path.iterdir()) == []


def test_default_model_is_the_bundled_minilm() -> None:
    directory = default_model_dir()
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == 384
    assert (directory / "model.safetensors").is_file()
    assert build_parser().parse_args(["out.onnx"]).model is None   # no --model: the default is used
