"""graftlib.diff and graftlib-diff: sites and node counts from provenance, empty diffs, formats, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

import graftlib
from graftlib.diff import GraphDiff, diff
from models import build


@pytest.fixture(scope="module")
def bert_lora():
    model, inputs = build("bert")
    return model, inputs, graftlib.apply(model, "lora(q,v,r=4)").eval()


def _tagged_per_site(g: graftlib.Grafted) -> Counter:
    """Inserted nodes per site, counted independently from the runtime graph's tags."""
    counts: Counter = Counter()
    for node in g.runtime_module().graph.nodes:
        tag = (node.meta.get("custom") or {}).get("graft")
        if tag:
            counts[tag["site"]] += 1
    return counts


def test_lora_on_q_and_v_is_two_sites_per_layer(bert_lora):
    _, _, g = bert_lora
    d = g.diff()
    assert sorted(s.site for s in d.sites) == sorted(
        f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value"))
    expected = _tagged_per_site(g)
    assert {s.site: len(s.inserted) for s in d.sites} == dict(expected)
    assert all(s.adapter == "default" and not s.removed for s in d.sites)
    assert d.counts()["inserted"] == sum(expected.values())
    assert d.counts()["rerouted"] == 4


def test_merged_and_identical_graphs(bert_lora):
    model, _, g = bert_lora
    merged = g.merge()
    d = diff(dataclass_base(g), merged)
    assert d.counts()["inserted"] == 0 and d.counts()["removed"] == 0
    same = diff(model, model)
    assert same.empty and not same.sites
    assert "0 sites" in str(same)


def dataclass_base(g):
    import dataclasses

    return dataclasses.replace(g._traced, graph_module=g.base_graph_module)


def test_json_round_trip(bert_lora):
    _, _, g = bert_lora
    d = g.diff()
    data = json.loads(d.to_json())
    assert data["format"] == "graftlib-diff"
    assert data["summary"] == d.counts()
    back = GraphDiff.from_dict(data)
    assert back.to_dict() == d.to_dict()


def test_text_and_dot(bert_lora):
    _, _, g = bert_lora
    d = g.diff()
    text = d.format_text()
    assert "+ encoder.layer.{0-1}.attention.self.query  lora[default]: linear(x,A) -> linear(.,B)" in text
    assert text.splitlines()[-1].startswith("4 sites, 1 adapter: +20 inserted")
    assert "\x1b[" not in text and "\x1b[" in d.format_text(color=True)
    dot = d.to_dot()
    assert dot.startswith("digraph") and dot.count("#e8590c") >= 4


def test_twelve_layers_fit_a_screen():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                                 intermediate_size=64)).eval()
    d = graftlib.apply(model, "lora(q,k,v,o,r=2)").diff()
    assert len(d.sites) == 48
    assert len(d.format_text().splitlines()) <= 12
    assert len(d.format_text(verbose=True).splitlines()) > 48


def test_onnx_files(tmp_path, bert_lora):
    model, inputs, g = bert_lora
    from graftlib.export import export_onnx

    with g.disable_adapters():
        export_onnx(g, tmp_path / "base.onnx", merge=False, verify=False, progress=False)
    export_onnx(g, tmp_path / "grafted.onnx", merge=False, verify=False, progress=False)
    d = diff(str(tmp_path / "base.onnx"), str(tmp_path / "grafted.onnx"))
    assert d.counts()["inserted"] > 0 and d.counts()["removed"] == 0
    assert {s.site for s in d.sites if s.inserted} == {
        f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")}
    assert diff(str(tmp_path / "base.onnx"), str(tmp_path / "base.onnx")).empty


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graftlib.tools.diff_cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def saved_graft(tmp_path_factory):
    from transformers import BertModel

    root = tmp_path_factory.mktemp("diffcli")
    model, _ = build("bert")
    model.save_pretrained(root / "base")
    model = BertModel.from_pretrained(root / "base")
    graftlib.apply(model, "lora(q,v,r=4)").save(root / "graft")
    return root


def test_cli_text_json_html(saved_graft):
    text = _cli(str(saved_graft / "graft"))
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == "--- BertModel [eval]"
    assert "4 sites, 1 adapter: +20 inserted" in text.stdout
    as_json = _cli(str(saved_graft / "graft"), "--format", "json")
    assert json.loads(as_json.stdout)["summary"]["sites"] == 4
    page = saved_graft / "out" / "diff.html"
    html = _cli(str(saved_graft / "graft"), "--model", str(saved_graft / "base"), "--format", "html", "-o", str(page))
    assert html.returncode == 0, html.stderr
    assert page.read_text().startswith("<!DOCTYPE html>")


def test_cli_errors(saved_graft, tmp_path):
    missing = _cli(str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert "is not a directory: give a directory written by g.save(dir)" in missing.stderr
    not_graft = _cli(str(saved_graft / "base"))
    assert not_graft.returncode == 1 and "graft.json is missing" in not_graft.stderr
    usage = _cli("a.onnx")
    assert usage.returncode == 2 and "two .onnx files" in usage.stderr
    bad_format = _cli(str(saved_graft / "graft"), "--format", "svg")
    assert bad_format.returncode == 2
    out = tmp_path / "x.txt"
    failed = _cli(str(tmp_path / "nowhere"), "-o", str(out))
    assert failed.returncode == 1 and not out.exists()
