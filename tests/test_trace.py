"""Tracing speed-ups keep the graph: composite-op memo, lazy code generation, stack traces off by default.

The memo (graftlib/trace.py) reuses the fake output of linear / SDPA / layer norm / matmul / dropout /
reshape across layers instead of re-running their decompositions. References here are independent of it:
the same model traced with the memo switched off (node for node, meta["val"] for meta["val"], and the same
outputs under the same seed), and the eager model on other batch and sequence sizes.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import graftlib
from graftlib.errors import TraceError
from models import build, example_inputs, inputs_for

T = importlib.import_module("graftlib.trace")  # the module: graftlib.trace is also the function
aten = torch.ops.aten
CIA = torch._C.DispatchKey.CompositeImplicitAutograd


class MemoProbe(nn.Module):
    """Repeated composite ops with the same shapes, reshapes that differ only in their target shape,
    in-place ops on memoised outputs, SDPA with and without mask and dropout."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.lins = nn.ModuleList(nn.Linear(dim, dim) for _ in range(4))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        y = self.lins[0](x)
        y.mul_(0.5)                                            # in place on a first-call output
        z = self.lins[1](y)
        z.add_(1.0)                                            # in place on a replayed output
        q = self.lins[2](z).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)   # (B, H, N, D)
        k = self.lins[3](z).reshape(b, n, d // self.heads, self.heads).permute(0, 3, 1, 2)  # (B, H, N, D)
        a = F.scaled_dot_product_attention(q, k, q, attn_mask=mask[:, None, None, :].bool())
        c = F.scaled_dot_product_attention(q, k, q, dropout_p=0.0)
        out = (a + c).transpose(1, 2).reshape(b, n, d)
        out = self.norms[0](out) + self.norms[1](F.dropout(out, 0.0, self.training))
        return out.reshape(b, -1) @ out.reshape(b * n, d)[:1].T.reshape(d, 1).repeat(n, 1)


def _probe() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    return MemoProbe().eval(), {"x": torch.randn(2, 7, 32, generator=g), "mask": torch.ones(2, 7, dtype=torch.long)}


def _model(name: str) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    if name == "probe":
        model, inputs = _probe()
        return model, inputs
    model, _ = build(name)
    return model, example_inputs(name)


def _other_inputs(name: str) -> dict[str, torch.Tensor]:
    if name == "probe":
        g = torch.Generator().manual_seed(4)
        mask = torch.ones(3, 5, dtype=torch.long)
        mask[0, -2:] = 0
        return {"x": torch.randn(3, 5, 32, generator=g), "mask": mask}
    return inputs_for(name, batch=3, seq=5, seed=5)


def _canonical(gm: fx.GraphModule) -> list[tuple]:
    """Every node as (op, target, args by node position, kwargs, value metadata, module stack)."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}

    def arg(a):
        return ("node", index[a]) if isinstance(a, fx.Node) else repr(a)

    def meta(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(map(str, v.shape)), tuple(map(str, v.stride())), str(v.storage_offset()),
                    v.dtype, str(v.device), v.requires_grad)
        if isinstance(v, (list, tuple)):
            return tuple(meta(x) for x in v)
        return repr(v)

    return [(n.op, str(n.target), tuple(fx.node.map_aggregate(n.args, arg)),
             tuple(sorted((k, str(fx.node.map_aggregate(v, arg))) for k, v in n.kwargs.items())),
             meta(n.meta.get("val")), repr(n.meta.get("nn_module_stack")))
            for n in gm.graph.nodes]


def _run(traced: T.Traced, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    torch.manual_seed(7)  # the graphs are training-mode: dropout draws from the same seed
    with torch.no_grad():
        out = traced.graph_module(**inputs, **traced.constants)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


CASES = [
    ("probe", None),
    ("bert", "lora(q,v,r=2)"),
    ("llama", "lora(q,v,r=2)"),       # GQA: repeat_kv reshapes are copies, the rest views
    ("t5", "lora(q,v,r=2)"),          # encoder-decoder: cross attention has other shapes
    ("gpt2", "lora(q,v,r=2)"),        # fused c_attn (addmm, not linear)
    ("vit", "lora(q,v,r=2)"),
]


@pytest.fixture(scope="module", params=[c[0] for c in CASES])
def traced_pair(request):
    """(name, model, memoised trace, trace with the memo off)."""
    model, example = _model(request.param)
    memo = T.trace(model, example)
    saved = T._MEMO_OPS
    T._MEMO_OPS = ()
    try:
        plain = T.trace(model, example)
    finally:
        T._MEMO_OPS = saved
    return request.param, model, memo, plain


def test_memo_keeps_the_graph_node_for_node(traced_pair):
    name, _, memo, plain = traced_pair
    a, b = _canonical(memo.graph_module), _canonical(plain.graph_module)
    assert len(a) == len(b), name
    mismatch = next(((i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    assert mismatch is None, f"{name}: node {mismatch}"
    assert sum(n.op == "call_function" for n in memo.graph.nodes) > 10


def test_memo_graph_computes_what_the_plain_graph_computes(traced_pair):
    name, _, memo, plain = traced_pair
    inputs = _other_inputs(name)
    outs_memo, outs_plain = _run(memo, inputs), _run(plain, inputs)
    assert len(outs_memo) == len(outs_plain) > 0
    for x, y in zip(outs_memo, outs_plain):
        assert x.shape == y.shape and torch.equal(x, y), name


@pytest.mark.parametrize("name,spec", [c for c in CASES if c[1]])
def test_applied_model_matches_eager_on_other_sizes(name, spec):
    model, example = _model(name)
    g = graftlib.apply(model, spec, example_inputs=example).eval() if example is not None else \
        graftlib.apply(model, spec).eval()
    inputs = _other_inputs(name)
    with torch.no_grad():
        ref = model.eval()(**inputs)
        got = g(**inputs)
    ref_leaves = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    got_leaves = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    assert ref_leaves and len(ref_leaves) == len(got_leaves)
    for r, o in zip(ref_leaves, got_leaves):
        assert r.shape == o.shape and torch.allclose(r, o, atol=1e-5, rtol=1e-5), name


def test_probe_graph_matches_eager_with_in_place_ops_on_memoised_outputs():
    model, inputs = _probe()
    traced = T.trace(model, inputs)
    other = _other_inputs("probe")
    with torch.no_grad():
        ref = model.train()(**other)   # dropout p = 0: train mode is deterministic
    model.eval()
    (got,) = _run(traced, other)
    assert got.shape == ref.shape == (3, 1)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    hits = T._MEMOS[traced.graph.find_nodes(op="placeholder")[0].meta["val"].fake_mode].table
    assert sum(k[0] is aten.linear.default for k in hits) < 4, "4 same-shape linears: fewer than 4 keys"
    assert any(isinstance(v, T._ViewOf) for k, v in hits.items() if k[0] is aten.reshape.default)


def test_memo_kernels_and_flags_are_restored_even_when_tracing_fails():
    before = {op: op.py_kernels.get(CIA) for op in T._MEMO_OPS}
    flag = fx.config.do_not_emit_stack_traces

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            if y.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return y
            return -y

    with pytest.raises(TraceError, match="torch.export could not trace Broken"):
        T.trace(Broken(), (torch.randn(2, 4),))
    T.trace(_probe()[0], _probe()[1])
    assert {op: op.py_kernels.get(CIA) for op in T._MEMO_OPS} == before
    assert before[aten.linear.default] is None and before[aten.matmul.default] is not None
    assert fx.config.do_not_emit_stack_traces == flag


def test_nested_blocks_share_one_installation_and_restore_it():
    before = {op: op.py_kernels.get(CIA) for op in T._MEMO_OPS}
    model, inputs = _probe()
    reference = _canonical(T.trace(model, inputs).graph_module)
    with T._memoised_composites():
        installed = {op: op.py_kernels.get(CIA) for op in T._MEMO_OPS}
        nested = _canonical(T.trace(model, inputs).graph_module)
        assert {op: op.py_kernels.get(CIA) for op in T._MEMO_OPS} == installed, "inner block re-installed"
    assert nested == reference
    assert all(installed[op] is not before[op] for op in T._MEMO_OPS)
    assert {op: op.py_kernels.get(CIA) for op in T._MEMO_OPS} == before
    assert T._users == 0 and not T._installed


def test_stack_traces_only_when_asked():
    model, inputs = _probe()
    plain = T.trace(model, inputs)
    assert not any("test_trace.py" in (n.meta.get("stack_trace") or "") for n in plain.graph.nodes)
    kept = T.trace(model, inputs, stack_traces=True)
    traces = [n.meta.get("stack_trace") or "" for n in kept.graph.nodes if n.op == "call_function"]
    assert sum("test_trace.py" in t for t in traces) >= len(traces) // 2
    assert _canonical(kept.graph_module) == _canonical(plain.graph_module)


def test_fake_call_gives_the_plain_fake_result():
    model, inputs = _probe()
    traced = T.trace(model, inputs)
    node = next(n for n in traced.graph.nodes if n.target is aten.linear.default)
    x, w, b = (a.meta["val"] for a in node.args)
    mode = x.fake_mode
    with mode:
        plain = aten.linear.default(x, w, b)
    for _ in range(2):  # first call fills the memo, second replays it
        got = T.fake_call(mode, aten.linear.default, x, w, b)
        assert (tuple(got.shape), got.stride(), got.dtype, got.requires_grad) == \
            (tuple(plain.shape), plain.stride(), plain.dtype, plain.requires_grad)
    assert got is not plain and got.untyped_storage()._cdata != x.untyped_storage()._cdata


def test_raw_audio_inputs_are_synthesised_with_a_dynamic_length():
    """wav2vec2 takes raw audio (B, samples): graftlib invents it from the conv feature encoder's config,
    and the length axis stays dynamic (audio clips differ in length), so other lengths run exactly."""
    from graftlib.tools.matrix_families import build_family

    model = build_family("wav2vec2")
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    assert g._traced.axes["input_values"] == (0, 1)
    for batch, samples in ((1, 400), (3, 1234)):
        audio = torch.randn(batch, samples, generator=torch.Generator().manual_seed(samples))
        with torch.no_grad():
            ref, got = model(input_values=audio).last_hidden_state, g(input_values=audio).last_hidden_state
        assert ref.shape == got.shape and torch.equal(ref, got)  # B = 0 at init: the base model exactly
