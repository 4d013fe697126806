"""Prefix tuning / P-tuning v2 on BERT, GPT-2, Llama (GQA), T5, the hand-written SDPA models, and eager
attention that is not SDPA: BLOOM (baddbmm + ALiBi), Gemma2 (soft-capping, sliding windows), DeBERTa-v2
(3-D bmm + disentangled terms), MPNet (relative position bias).

References: the base model (deactivation is exact), a hand-written forward with the prefix concatenated
by hand (hand models, explicit causal mask; DeBERTa-v2 and MPNet attention patched by hand), PEFT's
PrefixTuning model with the same weights (BERT, Llama, GPT-2, BLOOM, Gemma2, Mistral and Falcon with
sliding windows / ALiBi; SDPA and eager attention), onnxruntime (exported graphs), and properties
checked on outputs (padding gets no attention, no attention to later tokens, the prefix is visible).
"""
from __future__ import annotations

import dataclasses
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graftlib
from graftlib.editor import escape, graft_tag
from graftlib.errors import GraftError, GraftSpecError, LoadError
from graftlib.passes.prefix import peft_export, peft_import
from graftlib.registry import get_method
from graftlib.runtime import copy_graph, op_histogram, specialise
from models import build, example_inputs, inputs_for

N = 3
SPECS = {
    "bert": f"prefix(n={N}, peft_positions=true)",
    "gpt2": f"prefix(n={N}, peft_positions=true)",
    "llama": f"prefix(n={N}, peft_positions=true)",
    "t5": f"prefix(n={N})",                       # relative positions: nothing for peft_positions to offset
    "hand": f"prefix(n={N})",
    "hand_preln": f"prefix(n={N})",               # F.scaled_dot_product_attention(is_causal=True)
}
ARCHS = list(SPECS)
CAUSAL = {"gpt2", "llama", "t5", "hand_preln"}    # t5: the decoder
MASKED = {"bert", "gpt2", "llama", "t5", "hand"}
SITES = {
    "bert": ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"],
    "gpt2": ["h.0.attn", "h.1.attn"],
    "llama": ["layers.0.self_attn", "layers.1.self_attn"],
    "t5": ["encoder.block.0.layer.0.SelfAttention", "encoder.block.1.layer.0.SelfAttention",
           "decoder.block.0.layer.0.SelfAttention", "decoder.block.1.layer.0.SelfAttention"],
    "hand": ["blocks.0", "blocks.1"],
    "hand_preln": ["blocks.0", "blocks.1"],
}
_cache: dict[str, tuple] = {}


def _grafted(arch: str) -> tuple[torch.nn.Module, graftlib.Grafted]:
    if arch not in _cache:
        model, _ = build(arch.removesuffix("_eager"))
        if arch.endswith("_eager"):
            for module in model.modules():
                if hasattr(module, "config"):
                    module.config._attn_implementation = "eager"
        spec = SPECS.get(arch, f"prefix(n={N}, peft_positions=true)")
        _cache[arch] = (model, graftlib.apply(model, spec, example_inputs(arch)).eval())
    return _cache[arch]


def _out(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.last_hidden_state


def _run(g, inputs) -> torch.Tensor:
    with torch.no_grad():
        return _out(g(**inputs))


def _prefix_params(g, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    return {f"{holder.site_key}.{name}": p for holder in g.store[adapter].values()
            for name, p in holder.named_parameters()}


def _padded(arch: str, batch: int = 2, seq: int = 6, seed: int = 1) -> tuple[dict, int]:
    """Inputs with row 1 padded at one position (left for causal models, right otherwise)."""
    inputs = inputs_for(arch, batch, seq, seed)
    pos = 0 if arch in CAUSAL and arch != "t5" else seq - 1
    if "attention_mask" in inputs:
        inputs["attention_mask"][1, pos] = 0
    return inputs, pos


# -- structure and deactivation ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_sites_and_exact_deactivation(arch):
    model, g = _grafted(arch)
    assert g.records[0].sites == SITES[arch]          # T5: no prefix on EncDecAttention (cross-attention)
    inputs, _ = _padded(arch)
    base = _run(model, inputs)
    assert (_run(g, inputs) - base).abs().max() > 1e-3
    with g.disable_adapters():
        assert torch.equal(_run(g, inputs), base)
    off = specialise(g.graph, (), False)
    reference = specialise(g.base_graph, (), False)
    assert op_histogram(off) == op_histogram(reference)
    assert len(off.nodes) == len(reference.nodes)
    tags = [graft_tag(n) for n in g.graph.nodes if graft_tag(n)]
    assert tags and all(t["adapter"] == "default" for t in tags)


# -- training ------------------------------------------------------------------------------------
def _check_training_changes_only_prefix(g, inputs: dict, layers: int) -> None:
    """Two SGD steps in training mode change the prefix parameters (a key and a value per layer) only."""
    prefix = _prefix_params(g)
    assert set(map(id, g.trainable_parameters().values())) == set(map(id, prefix.values()))
    before = {name: p.detach().clone() for name, p in g.named_parameters()}
    optimizer = torch.optim.SGD(g.trainable_parameters().values(), lr=0.1)
    weights = torch.randn(_run(g, inputs).shape[-1], generator=torch.Generator().manual_seed(5))
    g.train()
    try:
        for _ in range(2):
            optimizer.zero_grad()
            (_out(g(**inputs)) @ weights).pow(2).mean().backward()   # (layer-normed outputs: not |out|^2)
            optimizer.step()
    finally:
        g.eval()
    changed = {name for name, p in g.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name, p in g.named_parameters() if any(p is q for q in prefix.values())}
    assert len(changed) == 2 * layers                 # a key and a value per layer
    with torch.no_grad():
        for name, p in g.named_parameters():
            p.copy_(before[name])


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_prefix(arch):
    _, g = _grafted(arch)
    _check_training_changes_only_prefix(g, inputs_for(arch, 2, 6, seed=4), len(SITES[arch]))


# -- dynamic shapes ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_batch_and_length(arch):
    model, g = _grafted(arch)
    inputs = inputs_for(arch, batch=3, seq=9, seed=3)   # traced at batch 2, length 7
    full = _run(g, inputs)
    assert full.shape[:2] == (3, inputs.get("decoder_input_ids", inputs["input_ids"]).shape[1])
    for row in range(3):
        single = _run(g, {k: v[row:row + 1] for k, v in inputs.items()})
        torch.testing.assert_close(full[row:row + 1], single, atol=1e-5, rtol=1e-5)
    assert (full - _run(model, inputs)).abs().max() > 1e-3


# -- masking, checked on outputs -------------------------------------------------------------------
def _swap_token(inputs: dict, key: str, row: int, pos: int) -> dict:
    other = {k: v.clone() for k, v in inputs.items()}
    other[key][row, pos] = (other[key][row, pos] + 7) % 90 + 3
    return other


@pytest.mark.parametrize("arch", sorted(MASKED))
def test_padding_gets_no_attention(arch):
    _, g = _grafted(arch)
    inputs, pos = _padded(arch)
    real = inputs["attention_mask"][1].bool()
    changed = _swap_token(inputs, "input_ids", 1, pos)
    with torch.no_grad():
        a, b = g(**inputs), g(**changed)
    if arch == "t5":  # encoder padding: the decoder (cross-attention) and the encoder's real positions
        torch.testing.assert_close(_out(a), _out(b), atol=1e-6, rtol=0)
        a, b = a.encoder_last_hidden_state, b.encoder_last_hidden_state
    a, b = _out(a), _out(b)
    torch.testing.assert_close(a[1, real], b[1, real], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    unmasked = {k: v.clone() for k, v in inputs.items()}
    unmasked["attention_mask"][1] = 1   # the same swap without padding is visible: the check can fail
    shown = _run(g, _swap_token(unmasked, "input_ids", 1, pos)) - _run(g, unmasked)
    if arch != "t5":  # t5: the decoder output, every position
        shown = shown[:, real & (torch.arange(real.numel()) != pos)]
    assert shown[1].abs().max() > 1e-4


@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_causal_never_attends_to_later_tokens(arch):
    _, g = _grafted(arch)
    inputs = inputs_for(arch, 2, 6, seed=2)
    key = "decoder_input_ids" if arch == "t5" else "input_ids"
    j = inputs[key].shape[1] - 2
    a, b = _run(g, inputs), _run(g, _swap_token(inputs, key, 0, j))
    torch.testing.assert_close(a[:, :j], b[:, :j], atol=1e-6, rtol=0)
    assert (a[0, j:] - b[0, j:]).abs().amax(-1).min() > 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_is_visible_everywhere(arch):
    _, g = _grafted(arch)
    inputs, _ = _padded(arch)
    before = _run(g, inputs)
    params = _prefix_params(g)
    saved = {k: p.detach().clone() for k, p in params.items()}
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen))
    try:
        after = _run(g, inputs)
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])
    per_position = (after - before).abs().amax(-1)     # (B, S)
    if arch != "t5" and "attention_mask" in inputs:
        per_position = per_position[inputs["attention_mask"].bool()]
    assert per_position.min() > 1e-5


# -- a forward written by hand ---------------------------------------------------------------------
def _heads(p: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    n = p.shape[0]
    return p.view(n, heads, -1).permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H, n, D)


def _hand_reference(model, inputs: dict, adapters: list[dict[str, dict[str, torch.Tensor]]],
                    causal: bool) -> torch.Tensor:
    """HandAttention / HandPreLN forward with each adapter's K/V concatenated in front (explicit mask)."""
    ids = inputs["input_ids"]
    batch, seq = ids.shape
    x = model.embed(ids)
    total = sum(next(iter(a.values()))["key"].shape[0] for a in adapters)
    if causal:
        mask = torch.cat([torch.ones(seq, total, dtype=torch.bool),
                          torch.ones(seq, seq, dtype=torch.bool).tril()], dim=1)
    else:
        mask = torch.cat([torch.ones(batch, 1, 1, total, dtype=torch.bool),
                          inputs["attention_mask"][:, None, None, :].bool()], dim=-1)
    for layer, block in enumerate(model.blocks):
        h = block.ln1(x) if causal else x
        q_w, k_w, v_w, o_w = ((block.q_proj, block.k_proj, block.v_proj, block.o_proj) if causal
                              else (block.wq, block.wk, block.wv, block.proj))
        split = lambda t: t.view(batch, seq, block.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q_w(h)), split(k_w(h)), split(v_w(h))
        for adapter in adapters:   # in application order: later adapters end up in front
            p = adapter[f"blocks.{layer}"]
            k = torch.cat([_heads(p["key"], batch, block.heads), k], dim=2)
            v = torch.cat([_heads(p["value"], batch, block.heads), v], dim=2)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, seq, -1)
        if causal:
            x = x + o_w(att)
            x = x + block.down_proj(F.gelu(block.up_proj(block.ln2(x))))
        else:
            x = block.norm1(x + o_w(att))
            x = block.norm2(x + block.fc_out(F.gelu(block.fc_in(x))))
    return model.norm(x) if causal else model.head(x)


@pytest.mark.parametrize("arch", ["hand", "hand_preln"])
def test_hand_formula_and_stacked_adapters(arch):
    model, g = _grafted(arch)
    inputs, _ = _padded(arch, batch=3, seq=8)
    causal = arch == "hand_preln"
    with torch.no_grad():
        expected = _hand_reference(model, inputs, [g.store.tensors("default")], causal)
    torch.testing.assert_close(_run(g, inputs), expected, atol=1e-5, rtol=1e-5)
    g.add("prefix(n=2, name=second)")
    try:
        with torch.no_grad():
            both = _hand_reference(model, inputs, [g.store.tensors("default"), g.store.tensors("second")], causal)
            second = _hand_reference(model, inputs, [g.store.tensors("second")], causal)
        torch.testing.assert_close(_run(g, inputs), both, atol=1e-5, rtol=1e-5)
        g.set_active(["second"])
        torch.testing.assert_close(_run(g, inputs), second, atol=1e-5, rtol=1e-5)
    finally:
        g.delete_adapter("second")
        g.set_active(["default"])
    torch.testing.assert_close(_run(g, inputs), expected, atol=1e-5, rtol=1e-5)


class _EagerCausal(torch.nn.Module):
    """Hand-written eager attention: q @ k^T, masked_fill(causal), where(padding), softmax, @ v; with
    `inplace`, the padding is an additive bias written in place (``zeros(B, 1, 1, S).masked_fill_(~pad,
    min)``): its producers, the in-place write included, are replayed on the widened mask."""

    def __init__(self, dim: int = 32, heads: int = 4, inplace: bool = False):
        super().__init__()
        self.heads, self.inplace = heads, inplace
        self.embed = torch.nn.Embedding(100, dim)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict(
            {name: torch.nn.Linear(dim, dim) for name in ("wq", "wk", "wv", "wo")}) for _ in range(2))

    def forward(self, input_ids, attention_mask, prefixes=None):
        x = self.embed(input_ids)
        b, s, d = x.shape
        pad = attention_mask[:, None, None, :].bool()                          # (B, 1, 1, S)
        hidden = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)   # True: a later token
        bias = torch.zeros(input_ids.shape[0], 1, 1, input_ids.shape[1]).masked_fill_(~pad, torch.finfo(x.dtype).min)
        for layer, block in enumerate(self.blocks):
            split = lambda t: t.view(b, s, self.heads, -1).transpose(1, 2)     # noqa: E731
            q, k, v = split(block["wq"](x)), split(block["wk"](x)), split(block["wv"](x))
            causal, visible, additive = hidden, pad, bias
            if prefixes is not None:   # the reference: concatenate by hand, widen both masks by hand
                p = prefixes[f"blocks.{layer}"]
                n = p["key"].shape[0]
                k = torch.cat([_heads(p["key"], b, self.heads), k], dim=2)
                v = torch.cat([_heads(p["value"], b, self.heads), v], dim=2)
                causal = torch.cat([torch.zeros(s, n, dtype=torch.bool), hidden], dim=1)
                visible = torch.cat([torch.ones(b, 1, 1, n, dtype=torch.bool), pad], dim=-1)
                additive = F.pad(bias, (n, 0))
            scores = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
            if self.inplace:
                scores = scores.masked_fill(causal, float("-inf")) + additive
            else:
                scores = torch.where(visible, scores.masked_fill(causal, float("-inf")), torch.finfo(x.dtype).min)
            att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
            x = x + block["wo"](att)
        return x


@pytest.mark.parametrize("inplace", [False, True], ids=["where", "inplace-bias"])
def test_eager_hand_written_masks(inplace):
    torch.manual_seed(0)
    model = _EagerCausal(inplace=inplace).eval()
    trace_inputs = inputs_for("hand", 2, 7, seed=2)
    g = graftlib.apply(model, f"prefix(n={N})", trace_inputs).eval()
    assert g.records[0].sites == ["blocks.0", "blocks.1"]
    inputs, _ = _padded("hand", batch=3, seq=8)
    inputs["attention_mask"][2, :3] = 0
    with torch.no_grad():
        expected = model(**inputs, prefixes=g.store.tensors("default"))
    torch.testing.assert_close(_run(g, inputs), expected, atol=1e-5, rtol=1e-5)
    with g.disable_adapters():
        assert torch.equal(_run(g, inputs), _run(model, inputs))


def test_ptuning_v2_is_prefix_without_projection():
    model, g = _grafted("hand")
    inputs, _ = _padded("hand")
    g.add(f"ptuning_v2(n={N}, name=v2)")
    try:
        assert g.adapters["v2"].method == "ptuning_v2"
        with torch.no_grad():
            for key, params in g.store.tensors("default").items():
                for name, value in params.items():
                    getattr(g.store["v2"][escape(key)], name).copy_(value)
        g.set_active(["v2"])
        torch.testing.assert_close(_run(g, inputs), _run_active(g, "default", inputs), atol=0, rtol=0)
    finally:
        g.delete_adapter("v2")
        g.set_active(["default"])


def _run_active(g, adapter: str, inputs: dict) -> torch.Tensor:
    saved = g.active_adapters
    g.set_active([adapter])
    try:
        return _run(g, inputs)
    finally:
        g.set_active(saved)


def test_projection_save_load_and_freeze():
    model, g = _grafted("hand")
    inputs, _ = _padded("hand")
    g.add("prefix(n=2, projection=true, hidden=8, name=proj)")
    try:
        g.set_active(["proj"])
        enc = g.store.tensors("proj")["prefix_encoder"]
        with torch.no_grad():   # PEFT's formula: tanh(E W0^T + b0) W2^T + b2, slot l = [K_l | V_l]
            flat = torch.tanh(enc["embedding"] @ enc["transform_0_weight"].T + enc["transform_0_bias"])
            flat = flat @ enc["transform_2_weight"].T + enc["transform_2_bias"]
            adapters = [{f"blocks.{l}": {"key": flat[:, 64 * l:64 * l + 32], "value": flat[:, 64 * l + 32:64 * l + 64]}
                         for l in range(2)}]
            expected = _hand_reference(model, inputs, adapters, causal=False)
        out = _run(g, inputs)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        with tempfile.TemporaryDirectory() as directory:
            g.save(directory)
            loaded = graftlib.load(model, directory, example_inputs=example_inputs("hand")).eval()
        loaded.set_active(["proj"])
        assert torch.equal(_run(loaded, inputs), out)
        frozen = g._derived(copy_graph(g.graph))           # what export does: freeze a private copy
        frozen.records = [dataclasses.replace(r, config=dict(r.config)) for r in frozen.records]
        for record in list(frozen.records):
            get_method(record.method).freeze_for_export(frozen, record)
        assert frozen.records[-1].spec == "prefix(n=2, name=proj)" and frozen.active_adapters == ("proj",)
        assert "prefix_encoder" not in frozen.store.tensors("proj")
        assert not any(graft_tag(n) and graft_tag(n).get("prefix") == "encoder" for n in frozen.graph.nodes)
        torch.testing.assert_close(_run(frozen, inputs), out, atol=1e-6, rtol=0)
        assert "prefix_encoder" in g.store.tensors("proj"), "freezing a copy leaves the original alone"
    finally:
        g.delete_adapter("proj")
        g.set_active(["default"])


# -- PEFT -----------------------------------------------------------------------------------------
def _peft(model, **options):
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=N, **options)
    return get_peft_model(model, config).eval()


def _install(g, adapter: str, tensors: dict) -> None:
    with torch.no_grad():
        for key, params in tensors.items():
            for name, value in params.items():
                getattr(g.store[adapter][escape(key)], name).copy_(value)
    g._invalidate()


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2", "bert_eager", "llama_eager"])
def test_peft_equivalence(arch):
    model, g = _grafted(arch)
    name = arch.split("_")[0]
    pm = _peft(model)
    embeddings = pm.prompt_encoder["default"].embedding.weight.detach()
    config = pm.peft_config["default"].to_dict()
    spec, tensors = peft_import(config, {"prompt_embeddings": embeddings}, g)
    assert spec == f"prefix(n={N}, peft_positions=true)" and list(tensors) == g.records[0].sites
    _install(g, "default", tensors)
    inputs, _ = _padded(name, batch=3, seq=7)
    inputs.pop("token_type_ids", None)               # PEFT drops them for prompt learning
    with torch.no_grad():
        expected = pm(**inputs).last_hidden_state
    torch.testing.assert_close(_run(g, inputs), expected, atol=1e-5, rtol=1e-5)
    exported, state = peft_export(g, g.records[0])
    assert torch.equal(state["prompt_embeddings"], embeddings)
    for key in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"):
        assert exported[key] == config[key], key


def test_peft_projection_equivalence():
    model, g = _grafted("llama")
    pm = _peft(model, prefix_projection=True, encoder_hidden_size=8)
    encoder = pm.prompt_encoder["default"]
    g.add(f"prefix(n={N}, projection=true, hidden=8, peft_positions=true, name=proj)")
    try:
        g.set_active(["proj"])
        holder = g.store["proj"]["prefix_encoder"]
        with torch.no_grad():
            holder.embedding.copy_(encoder.embedding.weight)
            for i in (0, 2):
                getattr(holder, f"transform_{i}_weight").copy_(encoder.transform[i].weight)
                getattr(holder, f"transform_{i}_bias").copy_(encoder.transform[i].bias)
        g._invalidate()
        inputs, _ = _padded("llama", batch=3, seq=7)
        with torch.no_grad():
            expected = pm(**inputs).last_hidden_state
        torch.testing.assert_close(_run(g, inputs), expected, atol=1e-5, rtol=1e-5)
        config, state = peft_export(g, g.adapters["proj"])
        assert config["prefix_projection"] and config["inference_mode"] and config["encoder_hidden_size"] == 8
        torch.testing.assert_close(state["prompt_embeddings"], pm.get_prompt_embedding_to_save("default"),
                                   atol=1e-6, rtol=0)
    finally:
        g.delete_adapter("proj")
        g.set_active(["default"])


def test_from_peft_and_save_peft_round_trip(tmp_path):
    from peft import PeftModel

    model, _ = build("llama")
    pm = _peft(model)
    pm.save_pretrained(str(tmp_path / "peft"))
    inputs, _ = _padded("llama", batch=3, seq=7)
    with torch.no_grad():
        expected = pm(**inputs).last_hidden_state
    g = graftlib.from_peft(build("llama")[0], str(tmp_path / "peft")).eval()
    assert g.records[0].spec.startswith(f"prefix(n={N}, peft_positions=true")
    torch.testing.assert_close(_run(g, inputs), expected, atol=1e-5, rtol=1e-5)
    g.save_peft(str(tmp_path / "back"))
    again = PeftModel.from_pretrained(build("llama")[0], str(tmp_path / "back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


# -- ONNX ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "hand_preln"])
def test_onnx_matches_pytorch(arch, tmp_path):
    import onnxruntime as ort
    from torch.export import Dim

    _, g = _grafted(arch)
    kwargs = {**inputs_for(arch, 2, 7), **g._traced.constants}
    kwargs = {k: v for k, v in kwargs.items() if k in g.input_names or k in g._traced.constants}
    batch, seq = Dim("batch"), Dim("seq")
    shapes = {k: ({0: batch, 1: seq} if isinstance(v, torch.Tensor) else None) for k, v in kwargs.items()}
    program = torch.onnx.export(g.runtime_module(), (), kwargs=kwargs, dynamo=True, optimize=False,
                                dynamic_shapes=shapes, verbose=False)
    path = str(tmp_path / f"{arch}.onnx")
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs, _ = _padded(arch, batch=3, seq=9, seed=6)   # other sizes than the export's
    got = session.run(None, {i.name: inputs[i.name].numpy() for i in session.get_inputs()})[0]
    np.testing.assert_allclose(got, _run(g, inputs).numpy(), atol=1e-4, rtol=0)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("prefix(n=0)", "n=0 must be > 0"),
    ("prefix(n=-4)", "n=-4 must be > 0"),
    ("ptuning_v2(n=0)", "n=0 must be > 0"),
    ("prefix(n=4, hidden=8)", "hidden= only applies with projection=true"),
    ("ptuning_v2(n=4, projection=true)", "ptuning_v2 has no option 'projection'"),
])
def test_bad_options(spec, message):
    _, g = _grafted("hand")
    with pytest.raises(GraftSpecError, match=message):
        g.add(spec.replace(")", ", name=bad)"))
    assert "bad" not in g.adapters


def test_no_attention_is_a_clear_error():
    model, _ = build("convnet")
    with pytest.raises(GraftSpecError, match="found no attention in this model"):
        graftlib.apply(model, "prefix(n=4)", example_inputs("convnet"))


def test_peft_positions_without_positions_is_a_clear_error():
    _, g = _grafted("hand")
    with pytest.raises(GraftSpecError, match="peft_positions=true found no position ids to offset"):
        g.add("prefix(n=2, peft_positions=true, name=bad)")
    assert "bad" not in g.adapters and g.records[0].adapter == "default"


def test_peft_interop_errors():
    _, llama = _grafted("llama")                # rotary positions: PEFT offsets them, the graft must too
    llama.add(f"prefix(n={N}, name=unshifted)")
    try:
        with pytest.raises(GraftError, match="without peft_positions=true"):
            peft_export(llama, llama.adapters["unshifted"])
    finally:
        llama.delete_adapter("unshifted")
        llama.set_active(["default"])
    _, g = _grafted("hand")                      # no positions: nothing for PEFT to offset, exports as is
    assert peft_export(g, g.records[0])[0]["num_virtual_tokens"] == N
    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "token_dim": 32, "num_layers": 2,
              "num_attention_heads": 4, "num_transformer_submodules": 1}
    with pytest.raises(LoadError, match=r"prompt_embeddings has shape \(3, 100\)"):
        peft_import(config, {"prompt_embeddings": torch.zeros(3, 100)}, g)
    with pytest.raises(LoadError, match="the checkpoint has 3 layers, the model 2"):
        peft_import({**config, "num_layers": 3}, {"prompt_embeddings": torch.zeros(3, 192)}, g)
    with pytest.raises(LoadError, match="num_transformer_submodules=2"):
        peft_import({**config, "num_transformer_submodules": 2}, {"prompt_embeddings": torch.zeros(3, 128)}, g)


# -- eager attention that is not SDPA ---------------------------------------------------------------
# (family, options): BLOOM 3-D baddbmm + ALiBi from the mask; Gemma2 tanh soft-capping, GQA, sliding
# windows (16: wider than prefix + tokens; 4: hides the prefix from later queries); DeBERTa-v2 3-D bmm
# over batch x heads + c2p / p2c relative terms and explicit key-length views; MPNet matmul + in-place
# relative position bias; and two SDPA masks recomputed the same way: Mistral's with a 4-token sliding
# window, Falcon's with ALiBi folded in. References: PEFT's prefix tuning where the model takes a cache
# (BLOOM, Gemma2, Mistral, Falcon); by hand where it does not (DeBERTa-v2 and MPNet ignore or reject
# past_key_values).
EAGER_CASES = [("bloom", {}), ("gemma2", {}), ("gemma2", {"sliding_window": 4}), ("deberta-v2", {}), ("mpnet", {}),
               ("mistral", {"sliding_window": 4}), ("falcon", {"alibi": True})]
EAGER_IDS = ["bloom", "gemma2", "gemma2-window4", "deberta-v2", "mpnet", "mistral-sdpa-window4", "falcon-sdpa-alibi"]
PEFT_FAMILIES = {"bloom", "gemma2", "mistral", "falcon"}
DECODERS = {"bloom", "gemma2", "mistral", "falcon"}
ROTARY = {"gemma2", "mistral", "falcon"}         # position ids PEFT offsets: peft_positions=true
_eager_cache: dict[tuple, tuple] = {}


def _family_model(family: str, options: dict) -> torch.nn.Module:
    from graftlib.tools.matrix_families import build_family

    model = build_family(family)
    if options:
        config = model.config
        for key, value in options.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = type(model)(config).eval()
    return model


def _eager_grafted(family: str, options: dict) -> tuple[torch.nn.Module, graftlib.Grafted]:
    key = (family, tuple(sorted(options.items())))
    if key not in _eager_cache:
        model = _family_model(family, options)
        spec = f"prefix(n={N}, peft_positions=true)" if family in ROTARY else f"prefix(n={N})"
        _eager_cache[key] = (model, graftlib.apply(model, spec).eval())
    return _eager_cache[key]


def _family_padded(family: str, batch: int = 3, seq: int = 9) -> dict:
    """Row 1 padded by two (left for decoders, as generation pads; right for encoders), row 2 by one."""
    from graftlib.tools.matrix_families import family_inputs

    inputs = family_inputs(family, batch=batch, seq=seq, seed=3)
    mask = inputs["attention_mask"]
    for row, pads in ((1, 2), (2, 1))[:batch - 1]:
        mask[row, :pads] = 0 if family in DECODERS else 1
        mask[row, -pads:] = 1 if family in DECODERS else 0
    return inputs


def _peft_reference(model, embeddings: torch.Tensor, inputs: dict) -> torch.Tensor:
    """PEFT's prefix tuning of `model` holding `embeddings` ((n, L * 2 * H_kv * D), PEFT's layout)."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=embeddings.shape[0])
    pm = get_peft_model(model, config).eval()    # prompt learning leaves the model's modules as they are
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(embeddings)
        return pm(**inputs).last_hidden_state


def _heads_3d(p: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(n, H*D) -> (B*H, n, D), batch-major as the models flatten (B, H, n, D)."""
    return _heads(p, batch, heads).reshape(batch * heads, p.shape[0], -1)


def _deberta_forward(prefix: dict[str, torch.Tensor]):
    """DisentangledSelfAttention.forward with the prefix concatenated by hand: c2c over [Pk; k], the
    model's own c2p / p2c terms (over the real keys) 0 on the prefix columns, prefix visible."""
    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                relative_pos=None, rel_embeddings=None):
        heads, batch = self.num_attention_heads, hidden_states.shape[0]
        q = self.transpose_for_scores(self.query_proj(hidden_states), heads)     # (B*H, S, D)
        k = self.transpose_for_scores(self.key_proj(hidden_states), heads)
        v = self.transpose_for_scores(self.value_proj(hidden_states), heads)
        pk, pv = (_heads_3d(prefix[name], batch, heads) for name in ("key", "value"))
        factor = 1 + len(self.pos_att_type)
        scale = (q.shape[-1] * factor) ** 0.5
        scores = torch.bmm(q, torch.cat([pk, k], 1).transpose(-1, -2) / scale)  # (B*H, S, n+S)
        rel = self.disentangled_attention_bias(q, k, relative_pos, self.pos_dropout(rel_embeddings), factor)
        scores = scores + F.pad(rel, (N, 0))
        scores = scores.view(batch, heads, scores.shape[-2], scores.shape[-1])
        mask = F.pad(attention_mask.bool(), (N, 0), value=True)
        scores = scores.masked_fill(~mask, torch.finfo(q.dtype).min)
        probs = torch.softmax(scores, -1).view(batch * heads, scores.shape[-2], -1)
        out = torch.bmm(probs, torch.cat([pv, v], 1)).view(batch, heads, -1, v.shape[-1])
        return out.permute(0, 2, 1, 3).reshape(batch, -1, heads * v.shape[-1]), None
    return forward


def _mpnet_forward(prefix: dict[str, torch.Tensor]):
    """MPNetSelfAttention.forward with [Pk; k], [Pv; v]; its relative position bias 0 on the prefix."""
    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        batch, heads = hidden_states.shape[0], self.num_attention_heads
        q, k, v = (proj(hidden_states).view(batch, -1, heads, self.attention_head_size).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))                        # (B, H, S, D)
        k = torch.cat([_heads(prefix["key"], batch, heads), k], 2)
        v = torch.cat([_heads(prefix["value"], batch, heads), v], 2)
        scores = q @ k.transpose(-1, -2) / self.attention_head_size ** 0.5     # (B, H, S, n+S)
        scores = scores + F.pad(position_bias, (N, 0)) + F.pad(attention_mask, (N, 0))
        out = torch.softmax(scores, -1) @ v
        return (self.o(out.permute(0, 2, 1, 3).reshape(batch, -1, heads * self.attention_head_size)),)
    return forward


def _hand_eager_reference(family: str, model, g, inputs: dict) -> torch.Tensor:
    from unittest import mock

    tensors = g.store.tensors("default")
    if family == "deberta-v2":
        from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention as cls
        make = _deberta_forward
    else:
        from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention as cls
        make = _mpnet_forward
    by_module = {model.get_submodule(key): {k: t.detach() for k, t in tensors[key].items()} for key in tensors}

    def dispatch(self, *args, **kwargs):
        return make(by_module[self])(self, *args, **kwargs)
    with mock.patch.object(cls, "forward", dispatch), torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("family, options", EAGER_CASES, ids=EAGER_IDS)
def test_eager_attention_matches_reference(family, options):
    model, g = _eager_grafted(family, options)
    inputs = _family_padded(family)
    real = inputs["attention_mask"].bool()
    if family in PEFT_FAMILIES:
        _, state = peft_export(g, g.records[0])
        expected = _peft_reference(model, state["prompt_embeddings"], inputs)
    else:
        expected = _hand_eager_reference(family, model, g, inputs)
    got = _run(g, inputs)
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
    assert (got - base)[real].abs().max() > 1e-2                      # the prefix is in effect
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, options", EAGER_CASES, ids=EAGER_IDS)
def test_eager_attention_padded_row_is_the_row_alone(family, options):
    _, g = _eager_grafted(family, options)
    from graftlib.tools.matrix_families import family_inputs

    inputs = family_inputs(family, batch=2, seq=7, seed=4)
    inputs["attention_mask"][1, -2:] = 0                              # right padding: positions stay put
    alone = {k: v[1:2, :5] for k, v in inputs.items()}
    torch.testing.assert_close(_run(g, inputs)[1, :5], _run(g, alone)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, options", EAGER_CASES, ids=EAGER_IDS)
def test_eager_attention_deactivates_bit_for_bit(family, options):
    model, g = _eager_grafted(family, options)
    inputs = _family_padded(family, batch=2, seq=5)
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
    with g.disable_adapters():
        assert torch.equal(_run(g, inputs), base)
    off, reference = specialise(g.graph, (), False), specialise(g.base_graph, (), False)
    assert op_histogram(off) == op_histogram(reference) and len(off.nodes) == len(reference.nodes)


@pytest.mark.parametrize("family", ["bloom", "gemma2", "deberta-v2", "mpnet"])
def test_eager_attention_training_changes_only_prefix(family):
    _, g = _eager_grafted(family, {})                  # the training-mode trace replays the graft
    _check_training_changes_only_prefix(g, _family_padded(family, batch=2, seq=6), 2)


def test_bloom_stacked_prefixes_compose_like_one_longer_prefix():
    """Two prefixes on ALiBi attention: together they equal PEFT with both (the later one in front,
    the ALiBi recomputed from n1 + n2 ones); each alone equals PEFT with it; none is the base."""
    model = _family_model("bloom", {})
    g = graftlib.apply(model, "prefix(n=2, name=a)").add("prefix(n=1, name=b)").eval()
    inputs = _family_padded("bloom", seq=7)
    real = inputs["attention_mask"].bool()
    rows = {name: peft_export(g, g.adapters[name])[1]["prompt_embeddings"] for name in ("a", "b")}
    for active, embeddings in ((["a", "b"], torch.cat([rows["b"], rows["a"]])), (["a"], rows["a"]),
                               (["b"], rows["b"])):
        g.set_active(active)
        expected = _peft_reference(model, embeddings, inputs)
        torch.testing.assert_close(_run(g, inputs)[real], expected[real], atol=1e-5, rtol=1e-5)
    g.set_active([])
    with torch.no_grad():
        assert torch.equal(_run(g, inputs), model(**inputs).last_hidden_state)


def test_bloom_peft_round_trip_needs_no_position_offset():
    """BLOOM has no position ids (ALiBi comes from the mask): PEFT checkpoints import as plain prefix."""
    model, g = _eager_grafted("bloom", {})
    config, state = peft_export(g, g.records[0])
    spec, tensors = peft_import(config, state, g)
    assert spec == f"prefix(n={N})" and list(tensors) == g.records[0].sites
    for key, params in tensors.items():
        for name, value in params.items():
            assert torch.equal(value, g.store.tensors("default")[key][name])


@pytest.mark.parametrize("family", ["deberta-v2", pytest.param("bloom", marks=pytest.mark.slow)])
def test_eager_attention_merge_and_onnx_export_verify(family, tmp_path):
    """A LoRA beside the prefix merges (the prefix stays) and the whole graft exports to ONNX verified:
    3-D bmm with grown view sizes (DeBERTa-v2), the ALiBi replay (BLOOM, ~15 s: slow)."""
    model, g = _eager_grafted(family, {})
    g.add("lora(q,v,r=2,name=l)")
    try:
        with torch.no_grad():
            for params in g.store.tensors("l").values():
                params["lora_B"].normal_(0, 0.2, generator=torch.Generator().manual_seed(7))
        g._invalidate()
        inputs = _family_padded(family, seq=7)
        real = inputs["attention_mask"].bool()
        merged = g.merge()
        assert "l" not in merged.adapters and "default" in merged.adapters
        unmerged = _run(g, inputs)
        torch.testing.assert_close(_run(merged, inputs)[real], unmerged[real], atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            assert (unmerged - model(**inputs).last_hidden_state)[real].abs().max() > 1e-2
        report = graftlib.export_onnx(g, tmp_path / "m.onnx", progress=False, tolerance=1e-4)
        assert max(report.max_abs_diff.values()) < 1e-4
    finally:
        g.delete_adapter("l")
        g.set_active(["default"])


def test_fixed_key_length_is_a_clear_error():
    from graftlib.tools.matrix_families import family_inputs

    model = _family_model("deberta-v2", {})
    with pytest.raises(GraftError, match="fixed key length.*dynamic sequence lengths"):
        graftlib.apply(model, f"prefix(n={N})", family_inputs("deberta-v2"), dynamic=False)
