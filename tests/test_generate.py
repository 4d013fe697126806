"""``g.generate``: Hugging Face generation through the grafted KV-cache step graph.

References: the eager model's own ``generate`` (adapters off), PEFT's ``generate`` on the same adapter
(loaded into graftlib with ``graftlib.from_peft``), and each row generated alone (mixed batches).
Tiny causal LMs (hidden 32, 2 layers) of three families: Llama (GQA, rotary), GPT-2 (Conv1D, learned
positions), Qwen2 (GQA, q/k/v biases). Prompts are left-padded.
"""
from __future__ import annotations

import tempfile

import pytest
import torch

import graftlib
from graftlib.errors import GraftError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, NEW = 100, 8
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def causal_lm(arch: str, seed: int = 0) -> torch.nn.Module:
    T = transformers
    configs = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_TEXT, num_key_value_heads=2)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_TEXT, num_key_value_heads=2)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                       n_positions=64, bos_token_id=0, eos_token_id=0,
                                                       initializer_range=0.2)),
    }
    torch.manual_seed(seed)
    model = configs[arch]().eval()
    model.generation_config.pad_token_id = 0
    return model


def prompts(batch: int = 3, seq: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """Left-padded prompts: row b has b padding positions."""
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, :b] = 0
        ids[b, :b] = 0
    return {"input_ids": ids, "attention_mask": mask}


ARCHS = ["llama", "gpt2", "qwen2"]
LORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
                "gpt2": ["c_attn", "c_fc"]}
MODES = {  # generation kwargs checked against PEFT token for token
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20, temperature=0.8),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


def _peft_lora(arch: str, seed: int = 0) -> "peft.PeftModel":
    config = peft.LoraConfig(target_modules=LORA_TARGETS[arch], r=4, lora_alpha=8, lora_dropout=0.0)
    model = peft.get_peft_model(causal_lm(arch), config).eval()
    torch.manual_seed(seed + 7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)  # non-zero B: the adapter changes the tokens
    return model


_LORA: dict[str, tuple] = {}


def lora_pair(arch: str) -> tuple["peft.PeftModel", graftlib.Grafted]:
    """(PEFT model, graftlib module over a fresh copy of the base) with the same random LoRA factors."""
    if arch not in _LORA:
        pm = _peft_lora(arch)
        with tempfile.TemporaryDirectory() as directory:
            pm.save_pretrained(directory)
            g = graftlib.from_peft(causal_lm(arch), directory).eval()
        _LORA[arch] = (pm, g)
    return _LORA[arch]


def _generate(model, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**prompts(), max_new_tokens=NEW, **kwargs)


# -- adapters off: the eager model's own generate -----------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_off_equal_eager_generate(arch):
    _, g = lora_pair(arch)
    model = causal_lm(arch)
    with g.disable_adapters():
        for mode in ("greedy", "beam"):
            assert torch.equal(_generate(g, **MODES[mode]), _generate(model, **MODES[mode])), mode


@pytest.mark.parametrize("rows", [1, 3], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_off_logits_bit_equal_eager(arch, rows):
    """Every step's logits equal the eager model's generate bit for bit: each step runs the graph traced
    along the attention path eager code takes for it (no mask when nothing is padded, GQA on the key /
    value heads for one new token, the prefill's last logits only)."""
    from graftlib.generate import StepKind, generation_view

    _, g = lora_pair(arch)
    kwargs = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    view = generation_view(g)
    with torch.no_grad(), g.disable_adapters():
        ours = view.generate(**prompts(rows), **kwargs).logits
        theirs = causal_lm(arch).generate(**prompts(rows), **kwargs).logits
    assert len(ours) == len(theirs) == NEW
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max().item():.2e}"
    unpadded = rows == 1
    assert view.graft_step.kinds == [StepKind(unpadded=unpadded, last=True)] + \
        [StepKind(decode=True, unpadded=unpadded)] * (NEW - 1)


def test_one_token_prompt_bit_equal_eager():
    """A one-token prompt's prefill is a one-new-token step with an empty cache: the decode graph."""
    from graftlib.generate import StepKind, generation_view

    _, g = lora_pair("llama")
    x = {"input_ids": torch.tensor([[5], [7]]), "attention_mask": torch.ones(2, 1, dtype=torch.long)}
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    view = generation_view(g)
    with torch.no_grad(), g.disable_adapters():
        ours, theirs = view.generate(**x, **kwargs), causal_lm("llama").generate(**x, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))
    assert view.graft_step.kinds == [StepKind(decode=True, unpadded=True)] * 4


# -- LoRA: PEFT's generate, greedy / sampling / beam search ------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_equals_peft_generate(arch, mode):
    pm, g = lora_pair(arch)
    ours, theirs = _generate(g, **MODES[mode]), _generate(pm, **MODES[mode])
    assert torch.equal(ours, theirs)
    with g.disable_adapters():
        assert not torch.equal(_generate(g, **MODES[mode]), ours), "the adapter should change the tokens"


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_equals_peft_generate(arch):
    pm, g = lora_pair(arch)
    merged = g.merge()
    with g.disable_adapters():
        assert merged.op_histogram() == g.op_histogram()  # the deltas are folded: the base graph's ops
    assert torch.equal(_generate(merged, **MODES["greedy"]), _generate(pm, **MODES["greedy"]))


def test_decoding_uses_the_cache():
    """Prefill runs the step graph on the whole prompt with an empty past; every later call gets one new
    token and the cache so far."""
    _, g = lora_pair("llama")
    from graftlib.generate import generation_view

    view = generation_view(g)
    with torch.no_grad():
        view.generate(**prompts(), max_new_tokens=5, do_sample=False)
    seq = prompts()["input_ids"].shape[1]
    assert view.graft_step.calls == [(seq, 0)] + [(1, seq + i) for i in range(4)]


def test_user_model_untouched():
    model = causal_lm("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    _generate(g, **MODES["beam"])
    assert "forward" not in model.__dict__ and model.config.to_dict() == config
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_adapter_names():
    _, g = lora_pair("llama")
    with pytest.raises(GraftError, match="no adapter named"):
        g.generate(**prompts(), max_new_tokens=2, adapter_names=["nope", "default", "default"])
    with pytest.raises(GraftError, match="one adapter name"):
        g.generate(**prompts(), max_new_tokens=2, adapter_names="default")


# -- prefix and prompt tuning: PEFT's model, token for token -------------------------------------------
PROMPT_LEARNING = {"prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                   "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)}


def _peft_prompt_learning(arch: str, kind: str) -> tuple["peft.PeftModel", graftlib.Grafted]:
    torch.manual_seed(3)
    pm = peft.get_peft_model(causal_lm(arch), PROMPT_LEARNING[kind]()).eval()
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "prompt_encoder" in name:
                param.normal_(0, 0.3)
    with tempfile.TemporaryDirectory() as directory:
        pm.save_pretrained(directory)
        g = graftlib.from_peft(causal_lm(arch), directory).eval()
    return pm, g


def greedy_without_cache(model, ids: torch.Tensor, mask: torch.Tensor, new: int, offset: int | None) -> torch.Tensor:
    """The reference decoder: the whole sequence through `model`'s forward at every token, argmax. Position
    ids from the mask as generate makes them, plus `offset` (PEFT's forward adds a prefix's n itself); None:
    no position ids (PEFT's prompt tuning ignores them: positions count the virtual tokens too)."""
    for _ in range(new):
        positions = None if offset is None else (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) + offset
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@pytest.mark.parametrize("rows", [3, 1], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("kind", list(PROMPT_LEARNING))
@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_learning_equals_peft_model(arch, kind, rows):
    """Prefix tuning (learned keys / values in front of the cache) and prompt tuning (virtual tokens at
    the prefill only) decode PEFT's model token for token. The reference is PEFT's forward over the whole
    sequence per token: PEFT 0.21.2's own ``generate`` under transformers 5.24 and 5.25 re-injects the prompt
    every step (it looks for ``past_key_values``, which transformers now calls ``cache``)."""
    pm, g = _peft_prompt_learning(arch, kind)
    batch = prompts(rows)  # unpadded: the graphs traced without a mask (a prefix on is_causal attention)
    torch.manual_seed(0)
    with torch.no_grad():
        ours = g.generate(**batch, max_new_tokens=NEW, do_sample=False)
    offset = 0 if kind == "prefix" else None
    assert torch.equal(ours, greedy_without_cache(pm, batch["input_ids"], batch["attention_mask"], NEW, offset))
    with torch.no_grad(), g.disable_adapters():
        off = g.generate(**batch, max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(off, ours), "the adapter should change the tokens"


# -- mixed adapters: each row through its own adapter -------------------------------------------------
def _two_loras(arch: str) -> graftlib.Grafted:
    g = graftlib.apply(causal_lm(arch), "lora(q,v,r=4,name=a) + lora(q,v,r=2,name=b)").eval()
    torch.manual_seed(11)
    with torch.no_grad():
        for param in g.trainable_parameters().values():
            param.normal_(0, 0.5)
    return g


@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_adapters_equal_rows_alone(arch, mode):
    g = _two_loras(arch)
    names = ["a", "b", "__base__"]
    batch = prompts()
    mixed = _generate(g, adapter_names=names, **MODES[mode])
    rows = mixed.shape[0] // len(names)
    for b, name in enumerate(names):
        alone = {k: v[b:b + 1] for k, v in batch.items()}
        if name == "__base__":
            context = g.disable_adapters()
        else:
            g.set_active(name)
            context = torch.no_grad()
        with context, torch.no_grad():
            expected = g.generate(**alone, max_new_tokens=NEW, **MODES[mode])
        g.set_active(["a", "b"])
        assert torch.equal(mixed[b * rows:(b + 1) * rows], expected), name


# -- ONNX with past: onnxruntime's greedy loop equals PyTorch's --------------------------------------------
pytest.importorskip("onnxruntime")
from graftlib.onnx_generate import onnx_generate, past_input_names, present_output_names  # noqa: E402


def _check_onnx_with_past(g, path, merge: bool) -> None:
    report = graftlib.export_onnx(g, path, with_past=True, merge=merge, progress=False)
    assert list(report.inputs) == ["input_ids", "attention_mask", "position_ids", *past_input_names(2)]
    assert report.outputs == ["logits", *present_output_names(2)]
    assert report.inputs["past_key_values.0.key"][0::2] == ["batch", "past_sequence"]
    batch = prompts()
    with torch.no_grad():
        expected = g.generate(**batch, max_new_tokens=NEW, do_sample=False)
    eos = g._model.generation_config.eos_token_id
    actual = onnx_generate(str(path), batch["input_ids"], batch["attention_mask"], NEW, eos_token_id=eos)
    assert actual.tolist() == expected.tolist()
    assert max(report.max_abs_diff.values()) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_onnx_with_past_lora_merged(arch, tmp_path):
    _check_onnx_with_past(_two_loras(arch), tmp_path / "decoder.onnx", merge=True)


def test_onnx_with_past_prefix_unmerged(tmp_path):
    _, g = _peft_prompt_learning("llama", "prefix")
    _check_onnx_with_past(g, tmp_path / "decoder.onnx", merge=False)


def test_onnx_with_past_refuses_prompt_tuning(tmp_path):
    _, g = _peft_prompt_learning("gpt2", "prompt")
    with pytest.raises(GraftError, match="virtual tokens at the prefill only"):
        graftlib.export_onnx(g, tmp_path / "decoder.onnx", with_past=True, progress=False)
    assert not (tmp_path / "decoder.onnx").exists()


def test_export_cli_with_past(tmp_path, capsys):
    from graftlib.tools.export_cli import main

    causal_lm("gpt2").save_pretrained(tmp_path / "base")
    out = tmp_path / "decoder.onnx"
    assert main(["--model", str(tmp_path / "base"), "--spec", "lora(c_attn,r=2)", "--merge", "--with-past",
                 "--quiet", str(out)]) == 0
    assert "past_key_values.1.value" in capsys.readouterr().out and out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "base"), "--with-past", "--static", str(tmp_path / "x.onnx")])
    assert exit_info.value.code == 2


# -- encoder-decoders: the grafted encoder once, then the decoder step with a self-attention cache ------
SEQ2SEQ = {
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)), ["q", "v", "wo"]),
    "bart": (lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        init_std=0.2)), ["q_proj", "v_proj", "fc1"]),
}


@pytest.mark.parametrize("arch", ["t5", pytest.param("bart", marks=pytest.mark.slow)])
def test_encoder_decoder_equals_peft_generate(arch):
    build, targets = SEQ2SEQ[arch]
    torch.manual_seed(0)
    pm = peft.get_peft_model(build().eval(), peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8)).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    torch.manual_seed(0)
    base = build().eval()
    with tempfile.TemporaryDirectory() as directory:
        pm.save_pretrained(directory)
        g = graftlib.from_peft(base, directory).eval()
    for mode in ("greedy", "beam"):
        ours = _generate(g, **MODES[mode])
        assert torch.equal(ours, _generate(pm, **MODES[mode])), mode
        with g.disable_adapters():
            assert torch.equal(_generate(g, **MODES[mode]), _generate(base, **MODES[mode])), mode
    from graftlib.generate import seq2seq_view

    view = seq2seq_view(g)
    with torch.no_grad():
        view.generate(**prompts(), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert view.graft_step.calls == [(1, 0), (1, 1), (1, 2), (1, 3)]  # one decoder token per call, cache grows


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache_implementation="static"), "keeps a dynamic cache"),
    (dict(output_attentions=True, return_dict_in_generate=True), "no attentions"),
    (dict(use_cache=False), "needs a cache"),
])
def test_unsupported_generate_options(kwargs, message):
    _, g = lora_pair("llama")
    with pytest.raises(GraftError, match=message):
        g.generate(**prompts(), max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("rows", [1, 3], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("arch", ["t5", pytest.param("bart", marks=pytest.mark.slow)])
def test_encoder_decoder_adapters_off_logits_bit_equal_eager(arch, rows):
    build, _ = SEQ2SEQ[arch]
    torch.manual_seed(0)
    base = build().eval()
    g = graftlib.apply(base, "lora(q,v,r=4)").eval()
    kwargs = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), g.disable_adapters():
        ours = g.generate(**prompts(rows), **kwargs).logits
        theirs = base.generate(**prompts(rows), **kwargs).logits
    assert len(ours) == len(theirs) == NEW
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
