"""Prompt tuning on models whose position ids are computed from input_ids (RoBERTa, XLM-R, MPNet).

Their embeddings compute ``cumsum(input_ids != pad) * (input_ids != pad) + pad``; PEFT calls them with
``inputs_embeds`` (virtual tokens in front), where the positions are ``pad+1 .. pad+n+S`` for every
position. The graft replaces the padding test by "every position is a token" widened to n+S
(passes/prompt.py); each family is checked against PEFT itself with the same virtual tokens, padded
and unpadded, and disabled against the base model bit for bit.
"""
from __future__ import annotations

import copy

import pytest
import torch

import graftlib
from graftlib.tools.matrix import max_diff
from graftlib.tools.matrix_families import build_family, family_inputs

N = 3
FAMILIES = ["roberta", "xlm-roberta", "mpnet"]


@pytest.fixture(scope="module")
def grafts() -> dict[str, tuple[torch.nn.Module, graftlib.Grafted]]:
    out = {}
    for family in FAMILIES:
        model = build_family(family)
        g = graftlib.apply(model, f"prompt(n={N})").eval()     # the (n, D) tokens: random init, N(0, 1)
        out[family] = (model, g)
    return out


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_equals_peft_prompt_tuning(grafts, family: str, pad: bool) -> None:
    from peft import PromptTuningConfig, get_peft_model

    model, g = grafts[family]
    inputs = family_inputs(family, pad=pad)
    peft_model = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="FEATURE_EXTRACTION",
                                                                         num_virtual_tokens=N)).eval()
    ((tokens,),) = [list(p.values()) for p in g.store.tensors("default").values()]
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(tokens)
        ours, theirs = g(**inputs), peft_model(**inputs)
    assert ours.last_hidden_state.shape[1] == N + inputs["input_ids"].shape[1]
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, atol=1e-5, rtol=0)
    if pad:  # the right-padded row's real tokens equal the row alone (positions do not depend on padding)
        alone = {k: v[1:2, :-2] for k, v in inputs.items()}
        with torch.no_grad():
            single = g(**alone).last_hidden_state
        torch.testing.assert_close(ours.last_hidden_state[1:2, :single.shape[1]], single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_is_the_base_model(grafts, family: str) -> None:
    model, g = grafts[family]
    inputs = family_inputs(family, pad=True)
    with g.disable_adapters(), torch.no_grad():
        assert max_diff(g(**inputs), model(**inputs)) == 0.0
