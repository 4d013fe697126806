"""prompt(...) and ptuning(...): virtual tokens prepended by graph rewrite.

References: the eager model called the way PEFT calls it (``inputs_embeds = cat(P, embed(ids))``, mask
``cat(ones, mask)``, token types ``cat(zeros, types)``; a forward hook on the embedding for the
hand-written model, which takes no inputs_embeds), PEFT itself (get_peft_model with the same weights,
and PEFT loading our exported checkpoints), the base model (disabled adapters), hand-computed init
rules, and onnxruntime. Each architecture is traced once; its adapters are stacked on one module and
chosen with ``set_active``.
"""
from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import graftlib
from graftlib.passes.prompt import peft_export as prompt_export
from graftlib.passes.prompt import peft_import as prompt_import
from graftlib.passes.prompt import site_params, virtual_tokens_value
from graftlib.passes.ptuning import encoder_state_names
from graftlib.passes.ptuning import peft_export as ptuning_export
from graftlib.passes.ptuning import peft_import as ptuning_import
from graftlib.registry import get_method
from graftlib.runtime import copy_graph, specialise
from graftlib.tools.matrix import flat  # every tensor of a model output
from models import VOCAB, build, example_inputs, inputs_for

aten = torch.ops.aten
ARCHS = ["bert", "gpt2", "llama", "t5", "hand"]
CAUSAL = ["gpt2", "llama"]
N = 3
SPECS = {  # adapter name -> spec; all stacked on one module per architecture
    "prompt": "prompt(n=3, init=vocab, seed=1)",
    "mlp": "ptuning(n=3, hidden=16)",
    "lstm": "ptuning(n=3, encoder=lstm, hidden=8, dropout=0.1)",
    "strip": "prompt(n=3, strip=true, seed=2)",
}


# -- helpers -----------------------------------------------------------------------------------------
def padded_inputs(arch: str, batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    inputs = inputs_for(arch, batch, seq, seed=seed)
    inputs["attention_mask"][-1, -2:] = 0  # the last row's final two tokens are padding
    return inputs


def reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor], tokens: torch.Tensor) -> Any:
    """The base model run as PEFT runs it: the (n, D) `tokens` before the embedded input tokens."""
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    batch, n = ids.shape[0], tokens.shape[0]
    prompts = tokens.expand(batch, -1, -1)
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        inputs["attention_mask"] = torch.cat([torch.ones(batch, n, dtype=mask.dtype), mask], 1)
    if "token_type_ids" in inputs:
        inputs["token_type_ids"] = torch.cat([torch.zeros(batch, n, dtype=torch.long), inputs["token_type_ids"]], 1)
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False
    if "inputs_embeds" in inspect.signature(model.forward).parameters:
        embeds = model.get_input_embeddings()(ids)
        return model(inputs_embeds=torch.cat([prompts, embeds], 1), **inputs)
    hook = model.embed.register_forward_hook(lambda module, args, out: torch.cat([prompts, out], 1))
    try:
        return model(input_ids=ids, **inputs)
    finally:
        hook.remove()


def run(g: graftlib.Grafted, adapter: str | None, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    g.set_active([adapter] if adapter else [])
    g.eval()
    with torch.no_grad():
        return flat(g(**inputs))


def seq_outputs(outs: list[torch.Tensor], length: int) -> Iterator[tuple[int, torch.Tensor]]:
    return ((i, o) for i, o in enumerate(outs) if o.dim() >= 2 and o.shape[1] == length)


def graph_ops(graph: torch.fx.Graph) -> list[tuple[str, str]]:
    return [(node.op, str(node.target)) for node in graph.nodes]


@pytest.fixture(scope="module")
def zoo() -> dict[str, tuple[torch.nn.Module, graftlib.Grafted]]:
    """arch -> (model, grafted with every adapter of SPECS), traced lazily once per architecture."""
    class Lazy(dict):
        def __missing__(self, arch: str) -> tuple[torch.nn.Module, graftlib.Grafted]:
            model, _ = build(arch)
            spec = " + ".join(f"{s[:-1]}, name={name})" for name, s in SPECS.items())
            self[arch] = (model, graftlib.apply(model, spec, example_inputs=example_inputs(arch)))
            return self[arch]

    return Lazy()


# -- outputs, dynamic shapes, deactivation -------------------------------------------------------------
@pytest.mark.parametrize("adapter", ["prompt", "mlp", "lstm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_peft_semantics_at_new_batch_and_length(zoo, arch: str, adapter: str) -> None:
    model, g = zoo[arch]
    inputs = padded_inputs(arch, batch=3, seq=5)  # traced at (2, 7)
    outs = run(g, adapter, inputs)
    with torch.no_grad():
        expected = flat(reference(model, inputs, virtual_tokens_value(g, adapter)))
    assert [o.shape for o in outs] == [e.shape for e in expected]
    assert any(o.shape[1] == N + 5 for o in outs if o.dim() >= 2)  # outputs gained n positions
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_strip_removes_the_virtual_positions(zoo, arch: str) -> None:
    model, g = zoo[arch]
    inputs = padded_inputs(arch, batch=2, seq=6)
    outs = run(g, "strip", inputs)
    with torch.no_grad():
        expected = flat(reference(model, inputs, virtual_tokens_value(g, "strip")))
    for out, ref in zip(outs, expected):
        if ref.dim() >= 2 and ref.shape[1] == N + 6:
            ref = ref[:, N:]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_disabled_is_the_base_graph(zoo, arch: str) -> None:
    model, g = zoo[arch]
    inputs = padded_inputs(arch, batch=2, seq=6)
    for training in (True, False):
        g.train(training)
        with g.disable_adapters():
            base = g._mode_target().base_graph  # each mode runs its own trace (Context, grafted.py)
            assert graph_ops(g.runtime_module().graph) == graph_ops(specialise(base, (), training))
    outs = run(g, None, inputs)
    with torch.no_grad():
        base = flat(model(**inputs, **({"use_cache": False} if arch in CAUSAL else {})))
    for out, ref in zip(outs, base):
        assert torch.equal(out, ref)


# -- masking -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_padding_receives_no_attention(zoo, arch: str) -> None:
    _, g = zoo[arch]
    inputs = padded_inputs(arch, batch=2, seq=6)
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][1, 4:] = (changed["input_ids"][1, 4:] + 11) % (VOCAB - 3) + 3  # padded tokens
    real = dict(inputs, input_ids=inputs["input_ids"].clone())
    real["input_ids"][1, 1] = (real["input_ids"][1, 1] + 11) % (VOCAB - 3) + 3  # a real token
    for adapter in ("prompt", "lstm"):
        base, padded, other = (run(g, adapter, x) for x in (inputs, changed, real))
        for i, out in enumerate(base):
            if out.dim() >= 2 and out.shape[1] == N + 6:  # visible: virtual + real positions
                torch.testing.assert_close(padded[i][0], out[0], atol=1e-6, rtol=0)
                torch.testing.assert_close(padded[i][1, :N + 4], out[1, :N + 4], atol=1e-6, rtol=0)
            else:  # pooled / decoder outputs see the padded row only through attention
                torch.testing.assert_close(padded[i], out, atol=1e-6, rtol=0)
        # the check is sensitive: a real token's change reaches the row's last real position
        last = next(o for _, o in seq_outputs(other, N + 6))
        first = next(o for _, o in seq_outputs(base, N + 6))
        assert (last[1, N + 3] - first[1, N + 3]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", CAUSAL)
def test_causal_tokens_never_see_later_ones(zoo, arch: str) -> None:
    _, g = zoo[arch]
    inputs = inputs_for(arch, 2, 6)
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][:, 4] = (changed["input_ids"][:, 4] + 11) % (VOCAB - 3) + 3
    for adapter in ("prompt", "mlp"):
        (out,), (after,) = run(g, adapter, inputs), run(g, adapter, changed)
        torch.testing.assert_close(after[:, :N + 4], out[:, :N + 4], atol=1e-6, rtol=0)  # incl. virtual
        assert (after[:, N + 4:] - out[:, N + 4:]).abs().max() > 1e-4


# -- training --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,adapter", [(a, "prompt") for a in ARCHS] + [("bert", "mlp"), ("llama", "lstm")])
def test_training_changes_only_the_prompt(zoo, arch: str, adapter: str) -> None:
    model, g = zoo[arch]
    inputs = padded_inputs(arch, batch=2, seq=6)
    g.set_active([adapter])
    g.train()
    trainable = g.train_only(adapter)
    assert trainable and all(f".{adapter}." in f".{name}" for name in trainable)
    before = {name: p.detach().clone() for name, p in g.named_parameters()}
    model_before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    try:
        for _ in range(3):
            loss = sum(o.float().pow(2).mean() for o in flat(g(**inputs)) if o.is_floating_point())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for name, param in g.named_parameters():
            assert torch.equal(param, before[name]) != (name in trainable), name
        for name, value in model.state_dict().items():
            assert torch.equal(value, model_before[name]), name
    finally:
        with torch.no_grad():
            for name, param in g.named_parameters():
                param.copy_(before[name])
        g.eval()


# -- initialisation ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[CLS]", "[SEP]", "classify", "if", "the", "review", "is", "positive"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(path)
    return str(path)


def _table(g: graftlib.Grafted) -> torch.Tensor:
    return g.graph_module.get_parameter("embed.weight").detach()


@pytest.mark.parametrize("n", [4, 12])
def test_text_init_tiles_or_truncates_like_peft(zoo, tokenizer_dir: str, n: int) -> None:
    from peft import PromptTuningConfig
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    _, g = zoo["hand"]
    text = "classify if the review is positive"  # -> [1, 3, 4, 5, 6, 7, 8, 2]: 8 ids
    g.add(f'prompt(n={n}, init=text:"{text}", tokenizer="{tokenizer_dir}", name=text{n})')
    ids = ([1, 3, 4, 5, 6, 7, 8, 2] * 2)[:n]
    tokens = site_params(g, f"text{n}").embedding.detach()
    assert torch.equal(tokens, _table(g)[ids])
    config = PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=n, token_dim=32,
                                num_transformer_submodules=1, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text=text, tokenizer_name_or_path=tokenizer_dir)
    words = torch.nn.Embedding.from_pretrained(_table(g))
    assert torch.equal(tokens, PromptEmbedding(config, words).embedding.weight.detach())


def test_a_text_init_adapter_loads_without_its_tokenizer(tokenizer_dir: str, tmp_path) -> None:
    import shutil

    model, _ = build("hand")
    moved = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, moved)
    g = graftlib.apply(model, f'prompt(n=5, init=text:"classify if", tokenizer="{moved}")',
                       example_inputs=example_inputs("hand"))
    with torch.no_grad():
        for param in g.store.parameters():
            param.add_(0.5)  # "trained": no longer the text init
    g.save(str(tmp_path / "saved"))
    shutil.rmtree(moved)  # the adapter is shipped; the tokenizer directory is not
    loaded = graftlib.load(model, str(tmp_path / "saved"), example_inputs=example_inputs("hand")).eval()
    inputs = padded_inputs("hand", batch=2, seq=6)
    for got, want in zip(flat(loaded(**inputs)), flat(g.eval()(**inputs))):
        assert torch.equal(got, want)
    with pytest.raises(graftlib.GraftError, match="could not load a tokenizer"):  # a new graft still needs it
        graftlib.apply(model, f'prompt(n=5, init=text:"classify if", tokenizer="{moved}")',
                       example_inputs=example_inputs("hand"))


def test_vocab_and_random_init(zoo) -> None:
    _, g = zoo["hand"]
    g.add("prompt(n=8, init=vocab, seed=5, name=v1) + prompt(n=8, init=vocab, seed=5, name=v2) + "
          "prompt(n=64, seed=3, name=r1) + prompt(n=64, seed=4, name=r2)")
    table = _table(g)
    vocab = site_params(g, "v1").embedding.detach()
    assert bool((vocab[:, None, :] == table[None]).all(-1).any(1).all())  # every row is a vocabulary row
    assert torch.equal(vocab, site_params(g, "v2").embedding)             # seeded
    random = site_params(g, "r1").embedding.detach()                       # nn.Embedding's N(0, 1)
    assert random.shape == (64, 32) and abs(random.mean()) < 0.1 and abs(random.std() - 1) < 0.1
    assert not torch.equal(random, site_params(g, "r2").embedding)


# -- PEFT equivalence and interop --------------------------------------------------------------------------
def _llama_lm() -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=64, max_position_embeddings=64)).eval()


@pytest.fixture(scope="module")
def peft_models(zoo) -> dict[str, tuple[torch.nn.Module, graftlib.Grafted, dict[str, torch.Tensor], str]]:
    """bert: BertModel (PEFT FEATURE_EXTRACTION); llama: LlamaForCausalLM with labels (CAUSAL_LM)."""
    bert, g_bert = zoo["bert"]
    llama = _llama_lm()
    inputs = padded_inputs("llama", batch=2, seq=6)
    inputs["labels"] = inputs_for("llama", 2, 6, seed=5)["input_ids"]
    spec = " + ".join(f"{s[:-1]}, name={name})" for name, s in SPECS.items() if name != "strip")
    g_llama = graftlib.apply(llama, spec, example_inputs={**inputs, "use_cache": False})
    return {"bert": (bert, g_bert, padded_inputs("bert", 2, 6), "FEATURE_EXTRACTION"),
            "llama": (llama, g_llama, inputs, "CAUSAL_LM")}


def _peft_config(adapter: str, task: str) -> Any:
    from peft import PromptEncoderConfig, PromptTuningConfig

    if adapter == "prompt":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB")
    kind = {"mlp": ("MLP", 16, 0.0), "lstm": ("LSTM", 8, 0.1)}[adapter]
    return PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_reparameterization_type=kind[0],
                               encoder_hidden_size=kind[1], encoder_dropout=kind[2])


def _compare(outs: list[torch.Tensor], peft_out: Any) -> None:
    expected = [peft_out[k] for k in ("loss", "logits", "last_hidden_state", "pooler_output") if k in peft_out]
    assert len(outs) == len(expected)
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapter", ["prompt", "mlp", "lstm"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_equals_peft_with_the_same_weights(peft_models, arch: str, adapter: str) -> None:
    from peft import get_peft_model

    model, g, inputs, task = peft_models[arch]
    peft_model = get_peft_model(copy.deepcopy(model), _peft_config(adapter, task)).eval()
    names = {"embedding.weight": "embedding"} if adapter == "prompt" else \
        encoder_state_names(g.adapters[adapter].config)
    holder = site_params(g, adapter)
    saved = {name: p.detach().clone() for name, p in holder.named_parameters()}
    try:
        with torch.no_grad():
            for key, value in peft_model.prompt_encoder["default"].state_dict().items():
                getattr(holder, names[key]).copy_(value)
        with torch.no_grad():
            _compare(run(g, adapter, inputs), peft_model(**inputs))
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                getattr(holder, name).copy_(value)


def _write_peft(directory, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(state, str(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("arch,adapter", [("bert", "prompt"), ("llama", "lstm"), ("llama", "mlp")])
def test_peft_loads_our_export(peft_models, tmp_path, arch: str, adapter: str) -> None:
    from peft import PeftModel

    model, g, inputs, task = peft_models[arch]
    export = prompt_export if adapter == "prompt" else ptuning_export
    config, state = export(g, g.adapters[adapter])
    assert config["task_type"] == task and set(state) == {"prompt_embeddings"}
    assert state["prompt_embeddings"].shape == (N, 32)
    _write_peft(tmp_path, config, state)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        _compare(run(g, adapter, inputs), peft_model(**inputs))


@pytest.mark.parametrize("adapter", ["prompt", "lstm"])
def test_we_load_peft_checkpoints(peft_models, tmp_path, adapter: str) -> None:
    from peft import get_peft_model

    model, g, inputs, task = peft_models["llama"]
    peft_model = get_peft_model(copy.deepcopy(model), _peft_config(adapter, task)).eval()
    peft_model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    spec, tensors = (prompt_import if adapter == "prompt" else ptuning_import)(config, state, model)
    assert spec == f"prompt(n={N})" and list(tensors) == ["model.embed_tokens"]  # the site key
    name = f"imported_{adapter}"
    g.add(f"{spec[:-1]}, name={name})")
    assert g.adapters[name].sites == ["model.embed_tokens"]
    with torch.no_grad():
        site_params(g, name).embedding.copy_(tensors["model.embed_tokens"]["embedding"])
        _compare(run(g, name, inputs), peft_model(**inputs))



def test_round_trip_through_save_peft_and_from_peft(zoo, tmp_path) -> None:
    from peft import PeftModel

    from graftlib.peft import from_peft, save_peft

    model, g = zoo["llama"]
    inputs = padded_inputs("llama", batch=2, seq=6)
    ours = run(g, "lstm", inputs)
    save_peft(g, str(tmp_path), adapter="lstm")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours[0], peft_model(**inputs)["last_hidden_state"], atol=1e-5, rtol=0)
    loaded = from_peft(model, str(tmp_path), adapter_name="back")
    assert loaded.adapters["back"].method == "prompt"  # PEFT keeps only the encoder's output
    torch.testing.assert_close(run(loaded, "back", inputs)[0], ours[0], atol=1e-6, rtol=0)

# -- export ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,adapter", [("bert", "mlp"), ("llama", "lstm")])
def test_frozen_encoder_exports_to_onnx(zoo, tmp_path, arch: str, adapter: str) -> None:
    import numpy as np
    import onnx
    import onnxruntime

    model, g = zoo[arch]
    inputs = padded_inputs(arch, batch=2, seq=6)
    expected = run(g, adapter, inputs)
    frozen = g._derived(copy_graph(g.graph))  # what graftlib.export does: freeze a private copy
    frozen.records = [copy.deepcopy(r) for r in frozen.records]
    get_method("ptuning").freeze_for_export(frozen, frozen.adapters[adapter])
    outs = run(frozen, adapter, inputs)
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    encoder_ops = {aten.lstm.input, aten.relu.default}
    tags = [(n.meta.get("custom") or {}).get("graft", {}) for n in frozen.runtime_module().graph.nodes
            if n.target in encoder_ops]
    assert not [t for t in tags if t.get("adapter") == adapter]         # the encoder is gone ...
    assert any(n.target in encoder_ops for n in g.graph.nodes)          # ... from the copy only
    program = torch.onnx.export(frozen.runtime_module(), (), kwargs={**inputs, **frozen._traced.constants},
                                dynamo=True, optimize=False)
    path = str(tmp_path / "model.onnx")
    program.save(path)
    initialisers = {i.name: tuple(i.dims) for i in onnx.load(path).graph.initializer}
    assert not [k for k in initialisers if "mlp_head" in k or "lstm_head" in k]
    assert [k for k, dims in initialisers.items() if "frozen" in k and dims == (N, 32)]
    session = onnxruntime.InferenceSession(path)
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    for got, ref in zip(session.run(None, feed), outs):
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=0)


# -- replay ----------------------------------------------------------------------------------------------
def test_position_ids_input_is_offset(zoo) -> None:
    _, g = zoo["llama"]
    inputs = padded_inputs("llama", batch=2, seq=6)
    positions = torch.arange(6).expand(2, -1)
    base = run(g, "prompt", inputs)
    given = run(g, "prompt", {**inputs, "position_ids": positions})  # re-traced with position_ids
    torch.testing.assert_close(given[0], base[0], atol=1e-6, rtol=0)


def test_save_and_load_replays_the_rewrite(zoo, tmp_path) -> None:
    model, g = zoo["hand"]
    inputs = padded_inputs("hand", batch=2, seq=6)
    g.set_active(["lstm"])
    g.save(str(tmp_path))
    loaded = graftlib.load(model, str(tmp_path), example_inputs=example_inputs("hand"))
    for out, ref in zip(run(loaded, "lstm", inputs), run(g, "lstm", inputs)):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)



@pytest.mark.parametrize("spec", [
    "lora(embed, q, v, r=2, name=lora) + prompt(n=3, name=p)",
    "prompt(n=3, name=p) + lora(embed, q, v, r=2, name=lora)",  # LoRA's lookup delta joins before the prepend
    "prompt(n=3, name=p) + adalora(embed, q, v, init_r=2, name=lora)",
])
def test_composes_with_lora_on_the_lookup_and_attention(spec: str) -> None:
    model, _ = build("llama")
    g = graftlib.apply(model, spec)
    with torch.no_grad():
        for param in g.store["lora"].parameters():
            param.normal_(0, 0.2)
    g._invalidate()
    merged = g.merge(adapters=["lora"])  # reference weights: the LoRA deltas folded in
    eager = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in eager.named_parameters():
            param.copy_(merged.graph_module.get_parameter(name))
    inputs = padded_inputs("llama", batch=3, seq=5)
    g.set_active(["lora", "p"])
    with torch.no_grad():
        expected = flat(reference(eager, inputs, virtual_tokens_value(g, "p")))
    assert not torch.equal(expected[0], flat(reference(model, inputs, virtual_tokens_value(g, "p")))[0])
    assert run(g, "lora", inputs)[0].shape == (3, 5, 32)  # LoRA alone keeps the length
    g.set_active(["lora", "p"])
    g.eval()
    with torch.no_grad():
        torch.testing.assert_close(flat(g(**inputs))[0], expected[0], atol=1e-5, rtol=0)

# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,message", [
    ("prompt(n=0)", "n=0 must be > 0"),
    ("ptuning(n=-2)", "n=-2 must be > 0"),
    ('prompt(n=4, init=text:"Classify if")', "needs tokenizer=DIR"),
    ("prompt(n=4, init=zeros)", "init='zeros' is unknown"),
    ("prompt(q, n=4)", "takes no targets"),
    ("prompt(n=4, layers=0)", "no layers option"),
    ("ptuning(n=4, encoder=gru)", "is not one of mlp, lstm"),
    ("ptuning(n=4, dropout=0.1)", "dropout= applies to encoder=lstm"),
])
def test_bad_options(zoo, spec: str, message: str) -> None:
    _, g = zoo["hand"]
    with pytest.raises(graftlib.GraftSpecError, match=message):
        g.add(spec)


def test_missing_tokenizer_directory_changes_nothing(zoo, tmp_path) -> None:
    _, g = zoo["hand"]
    before = graph_ops(g.graph)
    with pytest.raises(graftlib.GraftError, match="could not load a tokenizer"):
        g.add(f'prompt(n=4, init=text:"hi", tokenizer="{tmp_path / "none"}", name=badtok)')
    assert graph_ops(g.graph) == before and "badtok" not in g.store


def test_model_without_token_embedding() -> None:
    model, inputs = build("convnet")
    with pytest.raises(graftlib.GraftSpecError, match="needs a token-embedding lookup fed by input_ids"):
        graftlib.apply(model, "prompt(n=4)", example_inputs=inputs)


def test_static_trace_is_refused() -> None:
    model, _ = build("hand")
    with pytest.raises(graftlib.GraftSpecError, match="needs a dynamically traced graph"):
        graftlib.apply(model, "ptuning(n=4)", example_inputs=example_inputs("hand"), dynamic=False)

