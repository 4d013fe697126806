"""graftlib.diff and graftlib-diff: sites and node counts from provenance, empty diffs, formats, the CLI.

Every expected count is computed independently: from the graft tags of the runtime graph, from the
ONNX node and initializer counts of the two exports, or from the weights themselves.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import graftlib
from graftlib.diff import GraphDiff, diff
from graftlib.tools.diff_cli import main as cli_main
from models import build

SITES = [f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


@pytest.fixture(scope="module")
def bert_lora():
    model, inputs = build("bert")
    return model, inputs, graftlib.apply(model, "lora(q,v,r=4)").eval()


def _tagged_per_site(g: graftlib.Grafted, calls_only: bool = False) -> Counter:
    """Inserted nodes per site, counted from the runtime graph's graft tags."""
    counts: Counter = Counter()
    for node in g.runtime_module().graph.nodes:
        tag = (node.meta.get("custom") or {}).get("graft")
        if tag and (node.op == "call_function" or not calls_only):
            counts[tag["site"]] += 1
    return counts


def _base(g: graftlib.Grafted) -> graftlib.Traced:
    return dataclasses.replace(g._traced, graph_module=g.base_graph_module)


# -- the diff object ---------------------------------------------------------------------------
def test_lora_on_q_and_v_is_two_sites_per_layer(bert_lora):
    _, _, g = bert_lora
    d = g.diff()
    assert sorted(s.site for s in d.sites) == sorted(SITES)
    for layer in range(2):
        assert len([s for s in d.sites if s.site.startswith(f"encoder.layer.{layer}.")]) == 2
    expected = _tagged_per_site(g)
    assert {s.site: len(s.inserted) for s in d.sites} == dict(expected)
    assert all(s.adapter == "default" and s.method == "lora" and not s.removed for s in d.sites)
    assert d.counts()["inserted"] == sum(expected.values()) == 20
    # the join's consumer (the attention's view of q / v) now reads the join: one reroute per site
    assert [len(s.rerouted) for s in d.sites] == [1, 1, 1, 1]
    assert all(r.node.op == "aten.view.default" and r.now[0].endswith(":add#0") for r in d.rerouted)
    assert [len(s.chain) for s in d.sites] == [_tagged_per_site(g, calls_only=True)[s.site] for s in d.sites]


def test_merged_and_identical_graphs(bert_lora):
    model, _, g = bert_lora
    merged = diff(_base(g), g.merge())
    assert merged.counts()["inserted"] == 0 and merged.counts()["removed"] == 0 and merged.empty
    same = diff(model, model)            # two independent traces: matched node for node
    assert same.empty and not same.sites
    assert str(same).splitlines()[-1].startswith("0 sites, 0 adapters: +0 inserted, -0 removed")
    assert diff(g, g).empty


def test_merge_with_trained_weights_changes_exactly_the_site_weights():
    model, inputs = build("bert")
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    with torch.no_grad():
        for name, param in g.store.named_parameters():
            if name.endswith("lora_B"):
                param.normal_()
    merged = g.merge()
    d = diff(_base(g), merged)
    changed = {w for s in d.sites for w in s.weights}
    expected = {t for t in (f"{s}.weight" for s in SITES)
                if not torch.equal(merged.graph_module.get_parameter(t), model.get_parameter(t))}
    assert changed == expected and len(changed) == 4
    assert d.counts()["inserted"] == 0 and d.counts()["removed"] == 0 and d.counts()["rerouted"] == 0
    torch.testing.assert_close(merged(**inputs).last_hidden_state, g(**inputs).last_hidden_state,
                               rtol=1e-4, atol=1e-5)


def test_adapters_against_each_other():
    model, _ = build("bert")
    a = graftlib.apply(model, "lora(q,name=a)")
    b = graftlib.apply(model, "lora(v,name=b)")
    d = diff(a, b)
    assert {(s.site, s.adapter, len(s.removed), len(s.inserted)) for s in d.sites} == {
        (f"encoder.layer.{i}.attention.self.query", "a", _tagged_per_site(a)[f"encoder.layer.{i}.attention.self.query"], 0)
        for i in range(2)} | {
        (f"encoder.layer.{i}.attention.self.value", "b", 0, _tagged_per_site(b)[f"encoder.layer.{i}.attention.self.value"])
        for i in range(2)}
    assert d.by_adapter().keys() == {"a", "b"}


class _Net(nn.Module):
    """Two linears; `extra` puts a relu between them (an untagged difference at the root module)."""

    def __init__(self, extra: bool):
        super().__init__()
        self.inner, self.head, self.extra = nn.Linear(4, 4), nn.Linear(4, 2), extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        return self.head(torch.relu(h) if self.extra else h)


def test_untagged_differences_match_by_module_and_op():
    plain, extra = _Net(False), _Net(True)
    extra.load_state_dict(plain.state_dict())
    x = (torch.randn(3, 4),)
    twin = _Net(False)
    twin.load_state_dict(plain.state_dict())
    assert diff(plain, twin, example_inputs=x).empty
    d = diff(plain, extra, example_inputs=x)
    assert [(s.site, s.adapter, [n.op for n in s.inserted]) for s in d.sites] == [("", None, ["aten.relu.default"])]
    (reroute,) = d.rerouted
    assert reroute.node.module == "head" and reroute.node.op == "aten.linear.default"
    assert reroute.was[0] == "inner:linear#0" and reroute.now[0] == ".:relu#0"
    other = _Net(False)                  # same graph, other weights: only the weights differ
    d = diff(plain, other, example_inputs=x)
    assert sorted(w for s in d.sites for w in s.weights) == sorted(n for n, _ in plain.named_parameters())
    assert d.counts()["inserted"] == d.counts()["removed"] == d.counts()["rerouted"] == 0


def test_json_round_trip(bert_lora):
    _, _, g = bert_lora
    d = g.diff()
    data = json.loads(d.to_json())
    assert data["format"] == "graftlib-diff"
    assert data["summary"] == d.counts()
    assert GraphDiff.from_dict(data) == d
    with pytest.raises(graftlib.GraftError, match="not a graftlib diff"):
        GraphDiff.from_dict({"format": "other"})


def test_text_and_dot(bert_lora):
    _, _, g = bert_lora
    d = g.diff()
    text = d.format_text()
    lines = text.splitlines()
    assert lines[:2] == ["--- BertModel [eval]", "+++ BertModel + lora[default] [eval]"]
    assert lines[2] == ("+ encoder.layer.{0-1}.attention.self.query  lora[default]: linear(x,A) -> linear(.,B) "
                        "-> add scale=1.0  (x2, +5 nodes each, 1 rerouted each)")
    assert lines[-1] == ("4 sites, 1 adapter: +20 inserted, -0 removed, ~4 rerouted, 0 changed, "
                         "0 weights changed")
    assert "\x1b[" not in text and "\x1b[32m+" in d.format_text(color=True)
    verbose = d.format_text(verbose=True)
    assert sum(line.startswith("    + ") for line in verbose.splitlines()) == 20
    dot = d.to_dot()
    steps = sum(_tagged_per_site(g, calls_only=True).values())
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert dot.count('fillcolor="#e8590c"') == steps and dot.count("subgraph cluster_") == 4


def test_twelve_layers_fit_a_screen():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                                 intermediate_size=64)).eval()
    g = graftlib.apply(model, "lora(q,k,v,o,r=2)")
    d = g.diff()
    assert len(d.sites) == 48 and d.counts()["inserted"] == sum(_tagged_per_site(g).values())
    text = d.format_text().splitlines()
    assert len(text) == 2 + 4 + 1                    # header, one line per projection, summary
    assert any(line.startswith("+ encoder.layer.{0-11}.attention.self.key ") for line in text)
    assert len(d.format_text(verbose=True).splitlines()) > 48 * 6


# -- ONNX --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_pair(bert_lora, tmp_path_factory):
    """The base and the grafted runtime graphs exported with torch.onnx (names kept: optimize=False)."""
    _, inputs, g = bert_lora
    kwargs = {**inputs, **g._traced.constants}
    root = tmp_path_factory.mktemp("onnx")
    with g.disable_adapters():
        base = g.runtime_module()
    for name, module in (("base", base), ("grafted", g.runtime_module())):
        torch.onnx.export(module, (), kwargs=kwargs, dynamo=True, optimize=False).save(str(root / f"{name}.onnx"))
    return root / "base.onnx", root / "grafted.onnx"


def _onnx_size(path: Path) -> int:
    model = onnx.load(str(path))
    return len(model.graph.node) + len(model.graph.initializer)


def test_onnx_files(onnx_pair, bert_lora):
    base, grafted = onnx_pair
    d = diff(str(base), str(grafted))
    assert d.counts()["inserted"] == _onnx_size(grafted) - _onnx_size(base)
    assert d.counts()["removed"] == 0 and d.counts()["rerouted"] == 4
    assert sorted(s.site for s in d.sites) == sorted(SITES)
    assert len({len(s.inserted) for s in d.sites}) == 1          # the same branch at every site
    graft_inits = [i.name for i in onnx.load(str(grafted)).graph.initializer if i.name.startswith("graft.")]
    assert sum(n.kind == "param" for n in d.inserted) == len(graft_inits) == 8
    assert all(s.adapter == "default" and s.method == "lora" for s in d.sites)
    fx_chain = [item.label for item in bert_lora[2].diff().sites[0].chain]
    assert [item.label for item in d.sites[0].chain] == [label.replace(" scale=1.0", "") for label in fx_chain]
    assert diff(str(base), str(base)).empty


def test_cli_onnx(onnx_pair, capsys, tmp_path):
    base, grafted = onnx_pair
    assert cli_main([str(base), str(grafted), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["inserted"] == _onnx_size(grafted) - _onnx_size(base)
    out = tmp_path / "d.dot"
    assert cli_main([str(base), str(grafted), "--format", "dot", "-o", str(out)]) == 0
    assert out.read_text().startswith("digraph") and not list(tmp_path.glob(".d.dot.*"))
    assert cli_main([str(base), str(tmp_path / "missing.onnx")]) == 1
    assert "missing.onnx does not exist" in capsys.readouterr().err


# -- the command line ----------------------------------------------------------------------------
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
    unnamed, _ = build("bert")                      # built from a config: graft.json names no base
    graftlib.apply(unnamed, "lora(q,r=2)").save(root / "unnamed")
    return root


def test_cli_text_json_html(saved_graft):
    text = _cli(str(saved_graft / "graft"))
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == "--- BertModel [eval]"
    assert "\x1b[" not in text.stdout                # not a terminal: no colour
    assert text.stdout.splitlines()[-1].startswith("4 sites, 1 adapter: +20 inserted")
    as_json = _cli(str(saved_graft / "graft"), "--format", "json")
    assert json.loads(as_json.stdout)["summary"]["sites"] == 4
    page = saved_graft / "out" / "diff.html"
    html = _cli(str(saved_graft / "graft"), "--model", str(saved_graft / "base"), "--format", "html", "-o", str(page))
    assert html.returncode == 0, html.stderr
    assert page.read_text().startswith("<!DOCTYPE html>")


def test_cli_errors(saved_graft, tmp_path, capsys):
    assert cli_main([str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory: give a directory written by g.save(dir)" in err
    assert cli_main([str(saved_graft / "base")]) == 1
    assert "graft.json is missing" in capsys.readouterr().err
    assert cli_main([str(saved_graft / "unnamed")]) == 1
    assert "does not name its base model: pass it with graftlib-diff" in capsys.readouterr().err
    assert cli_main([str(saved_graft / "unnamed"), "--model", str(tmp_path)]) == 1
    assert "is not a Hugging Face model directory (no config.json)" in capsys.readouterr().err
    out = tmp_path / "x.txt"
    assert cli_main([str(tmp_path / "nowhere"), "-o", str(out)]) == 1 and not out.exists()
    usage = _cli("a.onnx")
    assert usage.returncode == 2 and "two .onnx files" in usage.stderr
    assert _cli(str(saved_graft / "graft"), "--format", "svg").returncode == 2


# -- the documented call and the labels (#23) --------------------------------------------------------
def _linear_lora(spec: str) -> graftlib.Grafted:
    torch.manual_seed(0)
    return graftlib.apply(nn.Sequential(nn.Linear(8, 8)), spec, example_inputs=(torch.randn(2, 8),)).eval()


def test_graftlib_diff_is_the_function_and_the_package():
    g = _linear_lora('lora("0", r=2)')
    called = graftlib.diff(g.base_graph_module, g)
    assert isinstance(called, GraphDiff) and graftlib.diff.GraphDiff is GraphDiff
    assert called.to_dict() == graftlib.diff.diff(g.base_graph_module, g).to_dict()
    assert called.sites == diff(_base(g), g).sites
    assert called.counts()["inserted"] == sum(_tagged_per_site(g).values()) == 5
    with pytest.raises(TypeError):
        graftlib.diff(g)                                   # both sides are needed, as for diff.diff


@pytest.mark.parametrize("spec,scale", [('lora("0", r=4, alpha=8)', 8 / 4), ('lora("0", r=2)', 2 / 2),
                                        ('lora("0", r=4, alpha=6, rslora=true)', 6 / 4 ** 0.5)])
def test_join_label_shows_the_scale(spec: str, scale: float):
    g = _linear_lora(spec)
    (site,) = g.diff().sites
    join = site.chain[-1]
    text = format(scale, ".6g")
    text = text if "." in text or "e" in text else text + ".0"          # 2.0, 1.0, 3.0: a float
    assert join.role == "join" and join.label == f"add scale={text}" and "alpha" not in str(g.diff())
    (node,) = [n for n in g.runtime_module().graph.nodes if (n.meta.get("custom") or {}).get("graft", {}).get(
        "role") == "join"]
    assert node.kwargs["alpha"] == pytest.approx(scale)    # the label is aten.add's alpha: the LoRA scale


def test_html_count_pill_separates_ops_from_parameters():
    g = _linear_lora('lora("0", r=2)')
    tags = [(n.op, (n.meta.get("custom") or {}).get("graft")) for n in g.runtime_module().graph.nodes]
    ops = sum(1 for op, tag in tags if tag and op == "call_function")
    params = sum(1 for n in g.runtime_module().graph.nodes if n.op == "get_attr" and str(n.target).startswith("graft."))
    (site,) = g.diff().sites
    assert (ops, params) == (len(site.chain), 2) == (3, 2)  # one pill per op is drawn beside the count
    page = g.diff().to_html()
    assert f">+{ops} ops +{params} params</text>" in page and ">+5</text>" not in page


def test_html_assets_are_package_data():
    from importlib import resources

    files = resources.files("graftlib.diff")
    css, js = files.joinpath("html.css").read_text(), files.joinpath("html.js").read_text()
    page = _linear_lora('lora("0", r=2)').diff().to_html()
    assert css.strip() in page and js.strip() in page and "var(--highlight)" in css
    assert f"--highlight:{graftlib.diff.HIGHLIGHT}" in page


def test_cli_help_describes_every_option_and_shows_examples():
    from graftlib.tools.diff_cli import build_parser

    parser = build_parser()
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    text = parser.format_help()
    assert "--format {text,json,dot,html}" in text and "examples:" in text
    assert "graftlib-diff graft-dir --format html -o diff.html" in text


def test_every_cli_help_ends_with_examples():
    from graftlib.tools import demo, diff_cli, export_cli

    def runs(line: str, prog: str, module) -> bool:  # the program itself, or its module under torchrun
        return line.startswith(f"  {prog}") or (line.startswith("  torchrun ") and f"-m {module.__name__} " in line)

    for module, prog in ((diff_cli, "graftlib-diff"), (export_cli, "graftlib-export"), (demo, "graftlib-demo")):
        text = module.build_parser().format_help()
        examples = text[text.index("\nexamples:\n"):].splitlines()[2:]
        assert len(examples) >= 2 and all(runs(line, prog, module) for line in examples if line), prog
