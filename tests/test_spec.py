"""The spec language: what parses, and the errors (with a caret under the right column)."""
from __future__ import annotations

import pytest

import graftlib
from graftlib.spec import Prefixed, parse_spec
from models import build

PARSES = [
    ("lora(q,v,r=16)", "lora", ["q", "v"], {"r": 16}),
    ("lora(q,k,v,o,ffn, r=8, alpha=16, dropout=0.05)", "lora", ["q", "k", "v", "o", "ffn"],
     {"r": 8, "alpha": 16, "dropout": 0.05}),
    ('lora("encoder.layer.*.attention.self.query", r=4)', "lora", ["encoder.layer.*.attention.self.query"], {"r": 4}),
    (r'lora(re:"h\.[0-3]\.attn\.c_attn")', "lora", [r"h\.[0-3]\.attn\.c_attn"], {}),
    ("lora(all-linear)", "lora", ["all-linear"], {}),
    ("lora(q,v, layers=0-5)", "lora", ["q", "v"], {"layers": (0, 1, 2, 3, 4, 5)}),
    ("lora(q, layers=[0, 2])", "lora", ["q"], {"layers": (0, 2)}),
    ("lora(embed, r=4, rslora=true, name=emb)", "lora", ["embed"], {"r": 4, "rslora": True, "name": "emb"}),
    ('prompt(n=20, init=text:"Classify if \\"good\\"")', "prompt", [], {"n": 20, "init": Prefixed("text", 'Classify if "good"')}),
    ("lora(q, alpha=1e-1)", "lora", ["q"], {"alpha": 0.1}),
]


@pytest.mark.parametrize("spec,method,targets,options", PARSES, ids=[p[0] for p in PARSES])
def test_parses(spec, method, targets, options):
    (call,) = parse_spec(spec)
    assert call.method == method
    assert [t.text for t in call.targets] == targets
    assert call.options == options
    assert call.text == spec


def test_several_grafts():
    calls = parse_spec("lora(q,v) + adapter(ffn, m=16, name=task)")
    assert [c.method for c in calls] == ["lora", "adapter"]
    assert calls[1].text == "adapter(ffn, m=16, name=task)"
    assert calls[1].column == 12


def _caret_column(message: str) -> int:
    lines = message.splitlines()
    return lines[-1].index("^") - 2


SYNTAX_ERRORS = [
    ("lora(q,v,r=16", 13, "expected ')'"),
    ("lora(q v)", 7, "expected ')'"),
    ("lora(q,r=)", 9, "expected a value"),
    ("lora(q,r=1,r=2)", 11, "given twice"),
    ('lora(q,"abc)', 7, "unterminated string"),
    ("lora(q;v)", 6, "unexpected character ';'"),
    ("lora(q,v) lora(k)", 10, "expected '+'"),
    ("(q,v)", 0, "expected a method name"),
    ("", 0, "empty spec"),
    ('lora(re:"(unclosed")', 5, "invalid regular expression"),
    ("lora(q, layers=5-2)", 15, "runs backwards"),
]


@pytest.mark.parametrize("spec,column,text", SYNTAX_ERRORS, ids=[s[0] or "empty" for s in SYNTAX_ERRORS])
def test_syntax_errors_point_at_the_column(spec, column, text):
    with pytest.raises(graftlib.GraftSpecError) as err:
        parse_spec(spec)
    assert isinstance(err.value, ValueError)
    assert text in str(err.value)
    assert spec in str(err.value)
    assert _caret_column(str(err.value)) == column


@pytest.fixture(scope="module")
def bert_graph():
    model, _ = build("bert")
    return graftlib.trace(model).graph_module


SEMANTIC_ERRORS = [
    ("lorra(q,v)", 0, "unknown method 'lorra'; did you mean 'lora'"),
    ("lora(q,vv)", 7, "target 'vv' matches no alias or module"),
    ("lora(querry)", 5, "did you mean 'query'? all "),
    ("lora(q, rank=4)", 8, "lora has no option 'rank'; did you mean 'r'? "
                           "all 8 options of lora: alpha, bias, dora, dropout, layers, name, r, rslora"),
    ("lora(q, r=0)", 8, "r=0 must be > 0"),
    ("lora(q, r=-2)", 8, "r=-2 must be > 0"),
    ("lora(q, alpha=0)", 8, "alpha=0.0 must be > 0"),
    ("lora(q, dropout=1.0)", 8, "dropout=1.0 must be in [0.0, 1.0)"),
    ("lora(q, dropout=-0.1)", 8, "must be in [0.0, 1.0)"),
    ("lora(q, r=2.5)", 8, "r=2.5: expected an integer"),
    ("lora(q, rslora=yes)", 8, "expected true or false"),
    ("lora(q, layers=0-5)", 8, "layers [2, 3, 4, 5] out of range: this model has layers 0-1"),
    ("lora(conv)", 5, "alias 'conv' matches no"),
    ("lora()", 0, "needs at least one target"),
    ("lora(q) + lora(v)", 10, "adapter 'default' already exists"),
]


@pytest.mark.parametrize("spec,column,text", SEMANTIC_ERRORS, ids=[s[0] for s in SEMANTIC_ERRORS])
def test_semantic_errors(bert_graph, spec, column, text):
    with pytest.raises(graftlib.GraftSpecError) as err:
        graftlib.select(bert_graph, spec) if "+" not in spec else _apply_on_graph(spec)
    assert text in str(err.value)
    assert _caret_column(str(err.value)) == column


def _apply_on_graph(spec):
    model, _ = build("hand")
    from models import example_inputs
    graftlib.apply(model, spec, example_inputs("hand"))


def test_select_is_a_dry_run(bert_graph):
    before = [n.format_node() for n in bert_graph.graph.nodes]
    (selection,) = graftlib.select(bert_graph, "lora(q,v,layers=1)")
    assert [s.path for s in selection.sites] == ["encoder.layer.1.attention.self.query",
                                                  "encoder.layer.1.attention.self.value"]
    assert ["encoder.layer.1.attention.self.query", "linear", "32", "->", "32", "q", "1"] in \
        [line.split() for line in str(selection).splitlines()]
    assert [n.format_node() for n in bert_graph.graph.nodes] == before


def test_targets_by_glob_regex_and_name(bert_graph):
    glob, regex, name = graftlib.select(
        bert_graph, 'lora("encoder.layer.*.attention.self.query") + lora(re:"encoder\\.layer\\.0\\..*", name=b)'
                    ' + lora(key, name=c)')
    assert [s.path for s in glob.sites] == [f"encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert {s.path for s in regex.sites} == {
        "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"}
    assert [s.path for s in name.sites] == [f"encoder.layer.{i}.attention.self.key" for i in range(2)]


def test_gpt2_fused_projection_parts():
    model, _ = build("gpt2")
    q, v, *rest = graftlib.select(model, "lora(q,v)")[0].sites
    assert len(rest) == 2  # layer 1
    assert (q.key, q.span) == ("h.0.attn.c_attn[q]", (0, 32))
    assert (v.key, v.span) == ("h.0.attn.c_attn[v]", (64, 96))
