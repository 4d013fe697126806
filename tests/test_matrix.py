"""The architecture matrix: 43 transformers families x {trace, lora(q,v), adapter(ffn), prefix, prompt,
merge+ONNX, save/load}, each cell checked with numbers (graftlib/tools/matrix.py holds the checks and
prints the README's table: ``python -m graftlib.tools.matrix``).

The default run covers the families the dataflow discovery is about (fused q/k/v cut by chunk /
select / slice / index, ``x @ W.T``, ffn and norms found by structure) on the fast cells; the rest
of the matrix is marked ``slow`` (``pytest -m slow tests/test_matrix.py``; not run by CI yet).
Known refusals are strict xfails whose reason is the README's exception text: a fix fails the test
until the table is updated.
"""
from __future__ import annotations

import pytest

from graftlib.preview import select
from graftlib.tools import matrix
from graftlib.tools.matrix_families import FAMILIES

FAST_FAMILIES = ["llama", "gpt-neox", "bloom", "phi3", "falcon", "albert", "gemma2", "convnext", "roberta",
                 "deberta-v2", "hand-ffn"]
FAST_CELLS = {"trace", "lora", "adapter", "prefix", "prompt"}
FAST_EXTRA = {("gpt-neox", "merge+onnx"), ("falcon", "merge+onnx"), ("phi3", "save/load"), ("mixtral", "merge+onnx")}


def _cases() -> list:
    cases = []
    for family in FAMILIES:
        for cell in matrix.CELLS:
            if not matrix.applicable(family, cell):
                continue
            marks = []
            if (family, cell) in matrix.EXCEPTIONS:
                marks.append(pytest.mark.xfail(strict=True, reason=matrix.EXCEPTIONS[family, cell]))
            fast = (family in FAST_FAMILIES and cell in FAST_CELLS) or (family, cell) in FAST_EXTRA
            if not fast:
                marks.append(pytest.mark.slow)
            cases.append(pytest.param(family, cell, marks=marks, id=f"{family}-{cell}"))
    return cases


def test_at_least_forty_families_of_every_kind():
    kinds = {f.kind for f in FAMILIES.values()}
    assert len(FAMILIES) >= 40
    assert {"encoder", "decoder", "encoder-decoder", "vision", "audio", "multimodal", "moe", "hand"} <= kinds


@pytest.mark.parametrize("family, cell", _cases())
def test_cell(family: str, cell: str) -> None:
    figures = matrix.run_cell(family, cell)
    assert figures["diff"] <= 1e-4


@pytest.mark.parametrize("family", ["gpt-neox", "bloom", "phi3", "falcon"])
def test_fused_qkv_selects_as_many_sites_as_llama(family: str) -> None:
    """lora(q,v) finds one q and one v per layer however the fused projection is cut."""
    def selected(name: str) -> list:
        _, traced = matrix.traced(name)
        return select(traced.graph_module, "lora(q,v)")[0].sites

    llama, fused = selected("llama"), selected(family)
    assert len(fused) == len(llama) == 4
    assert [s.role for s in fused] == [s.role for s in llama] == ["q", "v", "q", "v"]
    for site in fused:  # each part covers its own columns of the fused weight, none shared
        assert site.columns is not None and len(site.columns) == site.out_features
    q, v = fused[0], fused[1]
    assert not set(q.columns) & set(v.columns)


def test_x_at_w_transpose_is_a_linear_site() -> None:
    _, traced = matrix.traced("falcon")
    sites = select(traced.graph_module, "lora(all-linear)")[0].sites
    paths = {s.path for s in sites}
    assert {"h.0.self_attention.dense", "h.0.mlp.dense_h_to_4h", "h.0.mlp.dense_4h_to_h"} <= paths
