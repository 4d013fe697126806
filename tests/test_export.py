"""export_onnx: LoRA-grafted models exported to ONNX and checked against PyTorch with onnxruntime.

Per architecture one graft (random, non-zero LoRA weights) is exported three times: with its adapters
disabled (the base model's export), merged, and unmerged. The merged file must have exactly the base
file's op histogram and no LoRA initialisers; the unmerged one must carry the LoRA branches; all three
must match PyTorch within 1e-4 on fresh inputs at a shape other than the trace's.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.utils import _pytree as pytree

import graftlib
from graftlib.editor import graft_tag
from graftlib.export import ExportReport, export_onnx
from graftlib.registry import _METHODS, Method, register

from models import build, example_inputs, inputs_for

aten = torch.ops.aten
TOL = 1e-4
CASES = [
    ("bert", "lora(q,v,r=4)"),
    ("gpt2", "lora(q,v,r=4)"),
    ("llama", "lora(q,v,r=4)"),
    ("vit", "lora(q,v,r=4)"),
    ("resnet", "lora(conv,r=4)"),
]


@dataclass
class Exported:
    name: str
    g: graftlib.Grafted
    reports: dict[str, ExportReport]   # "base" / "merged" / "unmerged"
    missing_dir: Path


def _randomise(g: graftlib.Grafted, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in g.store.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _histogram(path: str | Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def _initialisers(path: str | Path) -> list[str]:
    return [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer]


def _torch_outputs(g: graftlib.Grafted, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    g.eval()
    with torch.no_grad():
        out = g(**inputs)
    return [t.numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _ort_outputs(path: str | Path, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {k: inputs[k].numpy() for k in names})


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(a, b))


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def exported(request: Any, tmp_path_factory: Any) -> Exported:
    name, spec = request.param
    model, _ = build(name)
    g = graftlib.apply(model, spec, example_inputs=example_inputs(name))
    _randomise(g)
    out = tmp_path_factory.mktemp(f"export_{name}")
    with g.disable_adapters():
        base = export_onnx(g, out / "base.onnx", merge=False, progress=False)
    merged = export_onnx(g, out / "new" / "dir" / "merged.onnx", merge=True, progress=False)
    unmerged = export_onnx(g, out / "unmerged.onnx", merge=False, progress=False)
    return Exported(name, g, {"base": base, "merged": merged, "unmerged": unmerged}, out / "new" / "dir")


def test_merged_export_has_the_base_ops(exported: Exported) -> None:
    base, merged = exported.reports["base"], exported.reports["merged"]
    assert _histogram(merged.path) == _histogram(base.path)
    assert merged.ops_added == {}
    assert merged.merged == ["default"] and merged.kept == []
    assert not [n for n in _initialisers(merged.path) if "lora" in n]
    # every base weight is exported once, merged in place: same initialiser count as the base
    assert merged.exported_parameters == base.exported_parameters


def test_unmerged_export_carries_the_lora_branches(exported: Exported) -> None:
    base, unmerged = exported.reports["base"], exported.reports["unmerged"]
    extra = _histogram(unmerged.path)
    extra.subtract(_histogram(base.path))
    sites = len(exported.g.sites("default"))
    branch_op = "Conv" if exported.name == "resnet" else "MatMul"
    assert extra[branch_op] == 2 * sites          # A and B per site
    assert extra["Add"] == sites                 # one join per site
    assert unmerged.ops_added == {op: n for op, n in sorted(extra.items()) if n}
    lora = [n for n in _initialisers(unmerged.path) if "lora_" in n]
    assert len(lora) == 2 * sites
    assert unmerged.kept == ["default"] and unmerged.merged == []
    adapters = sum(p.numel() for p in exported.g.store.parameters())
    assert unmerged.adapter_parameters == adapters
    assert unmerged.exported_parameters == base.exported_parameters + adapters


@pytest.mark.parametrize("which", ["base", "merged", "unmerged"])
def test_onnxruntime_matches_pytorch(exported: Exported, which: str) -> None:
    report = exported.reports[which]
    assert len(report.max_abs_diff) == 2 and max(report.max_abs_diff.values()) <= TOL
    inputs = inputs_for(exported.name, batch=3, seq=5, seed=11)
    if "attention_mask" in inputs:
        inputs["attention_mask"][1, -2:] = 0  # padding
    onnx_out = _ort_outputs(report.path, inputs)
    if which == "base":
        with exported.g.disable_adapters():
            torch_out = _torch_outputs(exported.g, inputs)
    else:
        torch_out = _torch_outputs(exported.g, inputs)
    assert _max_diff(onnx_out, torch_out) <= TOL
    if which != "base":  # the adapter really changes the output, so the match above means something
        with exported.g.disable_adapters():
            assert _max_diff(onnx_out, _torch_outputs(exported.g, inputs)) > 1e-3


def test_dynamic_dims_are_named(exported: Exported) -> None:
    for report in exported.reports.values():
        for name, shape in report.inputs.items():
            assert shape[0] == "batch"
            if name != "pixel_values":
                assert shape[1] == "sequence"
            else:
                assert shape[1:] == [3, 32, 32]


def test_missing_output_directory_is_created(exported: Exported) -> None:
    merged = exported.reports["merged"]
    assert Path(merged.path) == exported.missing_dir / "merged.onnx"
    assert [p.name for p in exported.missing_dir.iterdir()] == ["merged.onnx"]  # no temp files left
    assert merged.file_size == Path(merged.path).stat().st_size
    text = str(merged)
    assert "ops added vs base: none" in text and f"{merged.file_size / 1024:.1f} KB" in text


# -- a small hand-written model for the failure paths -----------------------------------------------
@pytest.fixture(scope="module")
def hand() -> graftlib.Grafted:
    model, _ = build("hand")
    g = graftlib.apply(model, "lora(q,v,r=2)", example_inputs=example_inputs("hand"))
    _randomise(g, seed=1)
    return g


def test_failed_verification_leaves_no_file(hand: graftlib.Grafted, tmp_path: Path) -> None:
    existing = tmp_path / "model.onnx"
    existing.write_text("previous export")
    with pytest.raises(graftlib.GraftError, match=r"verification failed: ONNX output 'output' differs from "
                       r"PyTorch by max-abs-diff [0-9.e-]+ > tolerance 0 at batch=3, sequence=8; no file was written"):
        export_onnx(hand, existing, merge=True, tolerance=0.0, progress=False)
    assert existing.read_text() == "previous export"   # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]   # no temp files either
    assert hand.training is False and hand.active_adapters == ("default",)


def test_external_data(hand: graftlib.Grafted, tmp_path: Path) -> None:
    report = export_onnx(hand, tmp_path / "model.onnx", merge=False, external_data=True, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert report.external_data and len(files) == 2 and files[0] == "model.onnx"
    assert report.file_size == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert (tmp_path / files[1]).stat().st_size > 4 * report.exported_parameters * 0.9
    inputs = inputs_for("hand", batch=4, seq=9, seed=5)
    assert _max_diff(_ort_outputs(report.path, inputs), _torch_outputs(hand, inputs)) <= TOL


def test_static_export_of_a_plain_module(tmp_path: Path) -> None:
    model, _ = build("hand")
    trace_inputs = example_inputs("hand")
    report = export_onnx(model, tmp_path / "static.onnx", dynamic=False, example_inputs=trace_inputs,
                         progress=False)
    assert report.inputs == {k: list(v.shape) for k, v in trace_inputs.items()}
    assert list(report.max_abs_diff) == ["static shape, draw 1", "static shape, draw 2"]
    assert report.merged == [] and report.ops_added == {} and report.adapter_parameters == 0
    inputs = inputs_for("hand", batch=2, seq=7, seed=9)
    with torch.no_grad():
        expected = model(**inputs).numpy()
    assert _max_diff(_ort_outputs(report.path, inputs), [expected]) <= TOL
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _ort_outputs(report.path, inputs_for("hand", batch=3, seq=7))


def test_static_trace_cannot_export_dynamic(tmp_path: Path) -> None:
    model, _ = build("hand")
    g = graftlib.apply(model, "lora(q,r=2)", example_inputs=example_inputs("hand"), dynamic=False)
    with pytest.raises(graftlib.GraftError, match=r"traced with dynamic=False.*export with dynamic=False"):
        export_onnx(g, tmp_path / "x.onnx", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(hand: graftlib.Grafted, tmp_path: Path) -> None:
    with pytest.raises(graftlib.GraftError, match="tolerance must be >= 0"):
        export_onnx(hand, tmp_path / "x.onnx", tolerance=-1.0)
    with pytest.raises(graftlib.GraftError, match="is a directory: give the output file name"):
        export_onnx(hand, tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- freeze_for_export: a reparameterised value folded to a constant ---------------------------------
class _TanhGate(Method):
    """y -> y * tanh(p): tanh(p) stands for a prompt encoder; freeze_for_export folds it."""

    name = "test_export_tanh_gate"
    site_kinds = ("linear",)

    def rewrite(self, editor: Any, site: Any, config: dict[str, Any]) -> None:
        raw = editor.param("raw", lambda: torch.linspace(-1.0, 1.0, site.out_features))
        gate = editor.call(aten.tanh.default, raw)
        base = editor.value_at(editor.anchor)
        editor.join(base, aten.mul.Tensor, base, gate)

    def freeze_for_export(self, grafted: graftlib.Grafted, record: Any) -> None:
        graph = grafted.graph
        for node in [n for n in graph.nodes if n.target == aten.tanh.default and graft_tag(n)
                     and graft_tag(n)["adapter"] == record.adapter]:
            name = f"frozen_{node.name}"
            raw = grafted.graph_module.get_parameter(node.args[0].target)
            grafted.graph_module.register_buffer(name, torch.tanh(raw.detach()))
            with graph.inserting_before(node):
                constant = graph.get_attr(name)
            constant.meta = dict(node.meta)
            node.replace_all_uses_with(constant)
        graph.eliminate_dead_code()
        record.extras["frozen"] = True
        grafted._finish()


@pytest.fixture()
def tanh_gate() -> Any:
    register(_TanhGate)
    yield
    _METHODS.pop(_TanhGate.name, None)


def test_freeze_for_export_hook(tanh_gate: Any, tmp_path: Path) -> None:
    model, _ = build("hand")
    g = graftlib.apply(model, "test_export_tanh_gate(q)", example_inputs=example_inputs("hand"))
    report = export_onnx(g, tmp_path / "gate.onnx", progress=False)
    assert report.frozen == ["default"] and report.kept == ["default"]
    assert "Tanh" not in _histogram(report.path)      # the "encoder" is gone, a constant remains
    assert report.ops_added == {"Mul": 2}
    inputs = inputs_for("hand", batch=3, seq=4, seed=3)
    assert _max_diff(_ort_outputs(report.path, inputs), _torch_outputs(g, inputs)) <= TOL
    # the hook ran on a private copy: the module keeps its encoder and its record is unchanged
    assert any(n.target == aten.tanh.default for n in g.graph.nodes)
    assert g.records[0].extras == {}
