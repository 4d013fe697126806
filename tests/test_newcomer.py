"""A new user's first hour (#23): every dead end has a way out, every message says what it means.

- The demo's saved adapter goes through ``graftlib-export --model <out>/adapter`` and ``graftlib-diff
  <out>/adapter`` (graft.json records the classifier the demo built): the exported file's logits equal
  the demo's own model.onnx under onnxruntime, the diff equals the demo's diff.txt, and
  ``--model ENCODER --adapter <out>/adapter`` builds the same module.
- Error texts: unknown methods, options and targets say "did you mean" and then the whole list,
  labelled as the whole list (checked against the registry); a call that does not fit the traced
  graph names the input, both shapes and the fix, with torch's error chained; the README's sample error
  is the real one.
- ``print(graftlib.select(...))`` prints the table; ``graftlib.apply`` on a BERT prints no warning in
  a fresh interpreter with default filters; export progress off a terminal is one line per step.
- ``graftlib-export`` refuses an output path it cannot write before it loads anything.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import graftlib
from graftlib.registry import methods
from graftlib.tools import demo
from graftlib.tools import export_cli

from models import build

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def cli(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"graftlib.tools.{module}", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=900)


# -- 1: the demo's adapter through both command-line tools -----------------------------------------
@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short demo run on a tiny random DistilBERT checkpoint (dim 32, 2 layers, MiniLM's tokenizer)."""
    from transformers import DistilBertConfig, DistilBertModel

    root = tmp_path_factory.mktemp("newcomer")
    encoder_dir = root / "encoder"
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                     max_position_embeddings=128)).save_pretrained(encoder_dir)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (demo.default_model_dir() / name).is_file():
            shutil.copy(demo.default_model_dir() / name, encoder_dir / name)
    proc = cli("demo", "--model", str(encoder_dir), "--steps", "3", "--spec", "lora(q,v,r=4)",
               "--out", str(root / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"graftlib-export --model {root / 'out' / 'adapter'} --merge model.onnx" in proc.stdout
    return root / "out"


def onnx_logits(path: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]


def review_batch(encoder_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    _, test = demo.load_reviews()
    return demo.encode(tokenizer, [e.text for e in test[:7]])   # (7, S), padded


def test_graft_json_names_the_demo_classifier(demo_out: Path) -> None:
    base = json.loads((demo_out / "adapter" / "graft.json").read_text())["base_model"]
    assert base == {"class": "SentenceClassifier", "name_or_path": str(demo_out.parent / "encoder"),
                    "builder": "graftlib-demo", "head": "head.safetensors"}
    assert (demo_out / "adapter" / "head.safetensors").is_file()


def test_export_cli_exports_the_demo_adapter(demo_out: Path) -> None:
    proc = cli("export_cli", "--model", str(demo_out / "adapter"), "--merge", "cli/out.onnx", cwd=demo_out.parent)
    assert proc.returncode == 0, proc.stderr
    assert "verified with onnxruntime" in proc.stdout and "same ops as the base" in proc.stdout
    batch = review_batch(demo_out.parent / "encoder")
    ours, demos = onnx_logits(demo_out.parent / "cli" / "out.onnx", batch), onnx_logits(demo_out / "model.onnx", batch)
    assert ours.shape == (7, 2)
    np.testing.assert_allclose(ours, demos, atol=1e-5)
    # a log file, not a terminal: one line per export step, no carriage-return fragments
    assert "\r" not in proc.stderr
    steps = [line for line in proc.stderr.splitlines() if line.startswith("graftlib export: [")]
    assert [line.split("]")[0] for line in steps] == [f"graftlib export: [{i}/7" for i in range(1, 8)]


def test_diff_cli_shows_the_demo_diff(demo_out: Path) -> None:
    proc = cli("diff_cli", str(demo_out / "adapter"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (demo_out / "diff.txt").read_text().strip()


def test_encoder_plus_adapter_builds_the_same_module(demo_out: Path) -> None:
    """The other form the advice names: --model ENCODER_DIR --adapter <out>/adapter (built in-process)."""
    encoder_dir = demo_out.parent / "encoder"
    batch = review_batch(encoder_dir)
    args = export_cli.build_parser().parse_args(["--model", str(encoder_dir), "--adapter", str(demo_out / "adapter"),
                                                  "--quiet", "unused.onnx"])
    g = export_cli._build(args).eval()
    assert g.sites() == json.loads((demo_out / "summary.json").read_text())["sites"]
    with torch.no_grad():
        np.testing.assert_allclose(g(**batch).numpy(), onnx_logits(demo_out / "model.onnx", batch), atol=1e-5)


def test_a_graft_on_a_plain_module_says_how_to_load_it(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    graftlib.apply(model, 'lora("0")', example_inputs=(torch.randn(2, 8),)).save(tmp_path / "graft")
    proc = cli("export_cli", "--model", str(tmp_path / "graft"), str(tmp_path / "x.onnx"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"graftlib-export: error: {tmp_path / 'graft'} was saved on a Sequential, not a Hugging Face model, and "
        f"graft.json does not say how to build one: load it in Python with graftlib.load(model, "
        f"'{tmp_path / 'graft'}', example_inputs=...), then graftlib.export_onnx or g.diff()")


# -- 2: did you mean, and the whole list ------------------------------------------------------------
@pytest.fixture(scope="module")
def bert() -> nn.Module:
    model, _ = build("bert")
    return model


def spec_error(model: nn.Module, spec: str) -> str:
    with pytest.raises(graftlib.GraftSpecError) as err:
        graftlib.select(model, spec)
    return err.value.reason


def test_unknown_method_says_did_you_mean_then_every_method(bert: nn.Module) -> None:
    every = ", ".join(sorted(methods()))
    assert spec_error(bert, "lorra(q,v)") == f"unknown method 'lorra'; did you mean 'lora' or 'lora_param' or 'lokr'? " \
                                            f"all {len(methods())} methods: {every}"
    assert spec_error(bert, "foo(q)") == f"unknown method 'foo'; all {len(methods())} methods: {every}"


OPTION_CASES = [("lora(q,v,rank=8)", "'rank'; did you mean 'r'?"), ("lora(q,lora_alpha=16)", "'lora_alpha'; did you mean 'alpha'?"),
                ("lora(q,dropuot=0.1)", "'dropuot'; did you mean 'dropout'?"), ("lora(q,zzz=1)", "'zzz';")]


@pytest.mark.parametrize("spec,start", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_unknown_option_says_did_you_mean_then_every_option(bert: nn.Module, spec: str, start: str) -> None:
    options = ", ".join(sorted({"name", "layers", *methods()["lora"].options}))
    assert spec_error(bert, spec) == f"lora has no option {start} all {len(options.split(', '))} options of lora: {options}"


def test_unknown_target_lists_every_alias_and_module_name(bert: nn.Module) -> None:
    from graftlib.select import ALIASES

    message = spec_error(bert, "lora(querry)")
    assert message.startswith("target 'querry' matches no alias or module that lora can graft")
    hint = message.split("; ", 1)[1]
    assert hint.startswith("did you mean 'query'? all ")
    listed = hint.split(": ", 1)[1].split(", ")
    assert listed[:len(ALIASES)] == list(ALIASES)
    assert {"query", "key", "value", "dense", "word_embeddings"} <= set(listed[len(ALIASES):])


def test_readme_sample_error_is_the_real_one(bert: nn.Module) -> None:
    readme = (ROOT / "README.md").read_text()
    sample = re.search(r"Errors point at the column.*?```text\n(.*?)\n```", readme, re.S).group(1)
    spec = sample.splitlines()[1].strip()
    with pytest.raises(graftlib.GraftSpecError) as err:
        graftlib.select(bert, spec)
    assert sample == str(err.value)


# -- 3: select prints a table -------------------------------------------------------------------------
def test_print_select_prints_the_table(bert: nn.Module, capsys: pytest.CaptureFixture) -> None:
    print(graftlib.select(bert, "lora(q,v)"))
    assert capsys.readouterr().out == (
        "lora(q,v): 4 sites\n"
        "  site                                  kind    in -> out  role  layer\n"
        "  encoder.layer.0.attention.self.query  linear  32 -> 32   q     0\n"
        "  encoder.layer.0.attention.self.value  linear  32 -> 32   v     0\n"
        "  encoder.layer.1.attention.self.query  linear  32 -> 32   q     1\n"
        "  encoder.layer.1.attention.self.value  linear  32 -> 32   v     1\n")


# -- 5: a call that does not fit the traced graph -----------------------------------------------------
class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.q(x))


MISFITS = [
    # (call input, dynamic, message start, torch's error type)
    (lambda: torch.randn(2, 9), True,
     "input 'x' has shape (2, 9), but the graph takes (s0, 8) (s0 may vary): dim 1 must be 8. Sizes the model "
     "itself fixes", AssertionError),
    (lambda: torch.randn(2, 8, 1), True,
     "input 'x' has shape (2, 8, 1), but the graph takes (s0, 8) (s0 may vary): 3 dims instead of 2.", RuntimeError),
    (lambda: torch.randn(3, 8), False,
     "input 'x' has shape (3, 8), but the graph takes (2, 8): dim 0 must be 2.", AssertionError),
    (lambda: torch.ones(2, 8, dtype=torch.long), True,
     "input 'x' is int64, but the graph takes float32: pass x.to(torch.float32)", RuntimeError),
]


@pytest.mark.parametrize("make,dynamic,start,cause", MISFITS, ids=["width", "rank", "static-batch", "dtype"])
def test_a_misfit_call_names_the_input_and_both_shapes(make, dynamic: bool, start: str, cause: type) -> None:
    model = TwoLinear()
    g = graftlib.apply(model, "lora(q,v)", example_inputs=(torch.randn(2, 8),), dynamic=dynamic)
    with pytest.raises(graftlib.GraftError) as err:
        g(make())
    assert str(err.value).startswith(start)
    assert isinstance(err.value.__cause__, cause)   # torch's own error, chained
    if "Sizes" in start:
        assert "graftlib.apply(model, spec, example_inputs=" in str(err.value)
    x = torch.randn(2, 8)                            # a fitting call still equals the eager model (B = 0)
    assert torch.equal(g(x), model(x))


# -- 7: no warnings from graftlib's own calls ----------------------------------------------------------
WARNING_SCRIPT = """
import tempfile, warnings, torch, transformers
model = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64)).eval()
import graftlib
batch = {"input_ids": torch.randint(1, 64, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
batch["attention_mask"][0, -2:] = 0
g = graftlib.apply(model, "lora(q,v)")
g(**batch); g.train(); g(**batch); g.eval()
directory = tempfile.mkdtemp()
g.save(directory); graftlib.load(model, directory)(**batch); g.merge()(**batch)
with warnings.catch_warnings(record=True) as caught:      # stricter: every warning, not once per place
    warnings.simplefilter("always")
    graftlib.apply(model, "lora(q,v) + adapter(ffn,name=b)")(**batch)
print("recorded:", [f"{w.category.__name__}: {w.message}" for w in caught])
"""


def test_apply_on_a_bert_prints_no_warning() -> None:
    proc = subprocess.run([sys.executable, "-c", WARNING_SCRIPT], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "recorded: []"


def test_the_filter_is_scoped_to_graftlib() -> None:
    """The same torch warning from the user's own code still shows."""
    import warnings

    from torch.utils import _pytree as pytree

    from graftlib.quiet import torch_internals

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch_internals():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message)[:24] for w in caught] == ["`isinstance(treespec, Le", "something else"]
    assert pytree is not None


# -- 8: progress off a terminal -------------------------------------------------------------------
def test_steps_off_a_terminal_are_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    from graftlib.export import _Steps

    stream = io.StringIO()                       # isatty() is False, as for a log file or a pipe
    monkeypatch.setattr(sys, "stderr", stream)
    steps = _Steps(True, total=3)
    for name in ("trace", "export", "verify"):
        with steps.step(name):
            pass
    steps.close()
    assert stream.getvalue() == ("graftlib export: [1/3] trace\ngraftlib export: [2/3] export\n"
                                 "graftlib export: [3/3] verify\n")
    assert set(steps.timings) == {"trace", "export", "verify"}


# -- 6: output paths checked first --------------------------------------------------------------------
def test_export_refuses_an_unwritable_output_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "m.onnx.data").mkdir()
    cases = [("afile/x.onnx", f"output afile/x.onnx: {tmp_path / 'afile'} is a file, not a directory"),
             ("afile/deeper/x.onnx", f"output afile/deeper/x.onnx: {tmp_path / 'afile'} is a file"),
             (".", "output . is a directory: give a file name such as model.onnx"),
             ("m.onnx", "external data file m.onnx.data is a directory")]
    for output, message in cases:
        proc = cli("export_cli", "--model", "no-such-dir", output, cwd=tmp_path)
        assert proc.returncode == 2, (output, proc.stderr)
        assert message in proc.stderr, (output, proc.stderr)
        assert "loading" not in proc.stderr      # refused before --model was even looked at
    assert (tmp_path / "afile").read_text() == "a file"


def test_help_shows_examples() -> None:
    for module, example in (("export_cli", "graftlib-export --model graftlib-demo-out/adapter --merge model.onnx"),
                            ("demo", "graftlib-demo --spec")):
        parser = (export_cli if module == "export_cli" else demo).build_parser()
        text = parser.format_help()
        assert "examples:" in text and example in text, text


def test_diff_is_callable_after_a_plain_import() -> None:
    """#23 item 4 as a newcomer types it: ``import graftlib`` then ``graftlib.diff(before, after)``."""
    script = ("import torch, graftlib\n"
              "net = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()\n"
              "g = graftlib.apply(net, 'lora(\"0\")', example_inputs=(torch.randn(2, 4),))\n"
              "print(graftlib.diff(net, g).sites[0].method)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "lora"
