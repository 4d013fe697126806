"""TRL's ``SFTTrainer`` (trl 1.14.2, pinned in the test extra) trains a grafted tiny Llama as it trains PEFT.

The same base weights, LoRA init (graftlib's A and B copied into PEFT's), text dataset, tokenizer (a word-level
tokenizer built here: no hub), seed and ``SFTConfig``; rows of different lengths, so batches are padded.
``loss_type="nll"``: the loss comes from the model's forward. (TRL's default ``"chunked_nll"`` patches the
forward to run the backbone and ``get_output_embeddings()`` separately; a grafted module is one graph.)
"""
from __future__ import annotations

import copy

import torch

import graftlib

#: max abs difference allowed between per-step losses. Measured: see test_sft_trainer_tracks_peft's message.
LOSS_TOL = 1e-5


def _tokenizer():
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _dataset(n: int = 16):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        length = int(torch.randint(5, 12, (1,), generator=gen))
        rows.append({"text": " ".join(f"t{int(i)}" for i in torch.randint(3, 100, (length,), generator=gen))})
    return Dataset.from_list(rows)


def _llama():
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, num_key_value_heads=2,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return T.LlamaForCausalLM(config).eval()


def _sft(model, out, steps: int) -> list[float]:
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
                     report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, loss_type="nll")
    trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=_tokenizer())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_tracks_peft(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    model = _llama()
    g = graftlib.apply(model, "lora(q,v,r=4)")
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                                 lora_alpha=4))
    pairs = []
    for site in g.store["default"].values():
        layer = peft_model.base_model.model.get_submodule(site.site_key)
        pairs += [(site.lora_A, layer.lora_A["default"].weight), (site.lora_B, layer.lora_B["default"].weight)]
    with torch.no_grad():
        for ours, theirs in pairs:
            theirs.copy_(ours)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second intra-op thread only waits for the other core
    try:
        ours = _sft(g, tmp_path / "graftlib", steps=8)
        theirs = _sft(peft_model, tmp_path / "peft", steps=8)
    finally:
        torch.set_num_threads(threads)
    assert len(ours) == len(theirs) == 8
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    assert diff <= LOSS_TOL, f"per-step losses differ by {diff}: {ours} vs {theirs}"
    assert ours[0] != ours[-1], "the adapters trained"
    for ours_param, theirs_param in pairs:
        torch.testing.assert_close(ours_param.detach(), theirs_param.detach(), rtol=0, atol=1e-4)
    assert all(p.abs().max() > 0 for n, p in g.store.named_parameters() if n.endswith("lora_B"))
    assert {"trl", "sft"} <= set(g.model_tags) and not getattr(model, "model_tags", None), "tags on the graft only"
    print(f"SFTTrainer 8 steps: max |loss diff| {diff}")
