"""The architecture matrix's families: tiny random-init `transformers` models built from configs.

``FAMILIES[name]`` is a :class:`Family`: how to build the model (no hub access), its kind (encoder,
decoder, encoder-decoder, vision, audio, multimodal, moe, hand) and the call inputs. Every model is
hidden 32 (or close), 2 layers, 4 heads, so a trace takes about a second.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Family", "FAMILIES", "HandFFNBlock", "build_family", "family_inputs"]

H, LAYERS, HEADS, FFN, VOCAB, POS = 32, 2, 4, 64, 100, 64


@dataclass(frozen=True)
class Family:
    name: str
    kind: str                         # encoder | decoder | encoder-decoder | vision | audio | multimodal | moe | hand
    build: Callable[[], nn.Module]
    inputs: str = "text"              # text | image | audio | seq2seq | clip | whisper | hand
    notes: dict[str, str] = field(default_factory=dict)


class HandFFNBlock(nn.Module):
    """A hand-written pre-LN transformer whose names match no alias table (ff_in / ff_out, att_*)."""

    def __init__(self, vocab: int = VOCAB, dim: int = H, heads: int = HEADS, layers: int = LAYERS):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.stack = nn.ModuleList(_HandFFNLayer(dim, heads) for _ in range(layers))
        self.final = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok(input_ids)
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        for layer in self.stack:
            x = layer(x, mask)
        return self.final(x)


class _HandFFNLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.att_a, self.att_b, self.att_c, self.att_d = (nn.Linear(dim, dim) for _ in range(4))
        self.ff_in, self.ff_out = nn.Linear(dim, 3 * dim), nn.Linear(3 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.n1(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, D)
        att = F.scaled_dot_product_attention(heads(self.att_a(h)), heads(self.att_b(h)), heads(self.att_c(h)),
                                             attn_mask=mask)
        x = x + self.att_d(att.transpose(1, 2).reshape(b, n, d))
        return x + self.ff_out(F.gelu(self.ff_in(self.n2(x))))


def _text(**extra) -> dict:
    base = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=FFN, max_position_embeddings=POS)
    base.update(extra)
    return base


def _vision(**extra) -> dict:
    base = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                image_size=32, patch_size=8, num_channels=3)
    base.update(extra)
    return base


def _t():
    import transformers
    return transformers


def _families() -> dict[str, Family]:
    T = _t
    kv = dict(num_key_value_heads=2)
    fams = [
        # encoders
        Family("bert", "encoder", lambda: T().BertModel(T().BertConfig(**_text()))),
        Family("roberta", "encoder", lambda: T().RobertaModel(T().RobertaConfig(**_text(pad_token_id=1, type_vocab_size=1)))),
        Family("xlm-roberta", "encoder", lambda: T().XLMRobertaModel(T().XLMRobertaConfig(**_text(pad_token_id=1, type_vocab_size=1)))),
        Family("distilbert", "encoder", lambda: T().DistilBertModel(T().DistilBertConfig(
            vocab_size=VOCAB, dim=H, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=POS))),
        Family("albert", "encoder", lambda: T().AlbertModel(T().AlbertConfig(**_text(embedding_size=16)))),
        Family("electra", "encoder", lambda: T().ElectraModel(T().ElectraConfig(**_text(embedding_size=16)))),
        Family("deberta-v2", "encoder", lambda: T().DebertaV2Model(T().DebertaV2Config(
            **_text(relative_attention=True, position_buckets=8, max_relative_positions=16,
                    pos_att_type=["p2c", "c2p"], type_vocab_size=0)))),
        Family("mpnet", "encoder", lambda: T().MPNetModel(T().MPNetConfig(**_text()))),
        # decoders
        Family("gpt2", "decoder", lambda: T().GPT2Model(T().GPT2Config(
            vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=POS, bos_token_id=0, eos_token_id=0))),
        Family("gpt-neo", "decoder", lambda: T().GPTNeoModel(T().GPTNeoConfig(
            vocab_size=VOCAB, hidden_size=H, num_layers=LAYERS, num_heads=HEADS, intermediate_size=FFN,
            attention_types=[[["global", "local"], 1]], window_size=4, max_position_embeddings=POS))),
        Family("gpt-neox", "decoder", lambda: T().GPTNeoXModel(T().GPTNeoXConfig(**_text()))),
        Family("gptj", "decoder", lambda: T().GPTJModel(T().GPTJConfig(
            vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=POS, rotary_dim=4))),
        Family("opt", "decoder", lambda: T().OPTModel(T().OPTConfig(
            vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
            max_position_embeddings=POS, word_embed_proj_dim=H))),
        Family("bloom", "decoder", lambda: T().BloomModel(T().BloomConfig(
            vocab_size=VOCAB, hidden_size=H, n_layer=LAYERS, n_head=HEADS))),
        Family("falcon", "decoder", lambda: T().FalconModel(T().FalconConfig(
            vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            new_decoder_architecture=False, multi_query=True, alibi=False, bias=True))),
        Family("llama", "decoder", lambda: T().LlamaModel(T().LlamaConfig(**_text(**kv)))),
        Family("mistral", "decoder", lambda: T().MistralModel(T().MistralConfig(**_text(**kv)))),
        Family("qwen2", "decoder", lambda: T().Qwen2Model(T().Qwen2Config(**_text(**kv)))),
        Family("qwen3", "decoder", lambda: T().Qwen3Model(T().Qwen3Config(**_text(**kv, head_dim=8)))),
        Family("gemma", "decoder", lambda: T().GemmaModel(T().GemmaConfig(**_text(**kv, head_dim=8)))),
        Family("gemma2", "decoder", lambda: T().Gemma2Model(T().Gemma2Config(
            **_text(**kv, head_dim=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    sliding_window=16)))),
        Family("phi", "decoder", lambda: T().PhiModel(T().PhiConfig(**_text()))),
        Family("phi3", "decoder", lambda: T().Phi3Model(T().Phi3Config(**_text(**kv, pad_token_id=0)))),
        Family("starcoder2", "decoder", lambda: T().Starcoder2Model(T().Starcoder2Config(**_text(**kv)))),
        Family("olmo", "decoder", lambda: T().OlmoModel(T().OlmoConfig(**_text(**kv, pad_token_id=0)))),
        Family("granite", "decoder", lambda: T().GraniteModel(T().GraniteConfig(**_text(**kv)))),
        Family("stablelm", "decoder", lambda: T().StableLmModel(T().StableLmConfig(**_text(**kv)))),
        # mixture of experts
        Family("mixtral", "moe", lambda: T().MixtralModel(T().MixtralConfig(
            **_text(**kv, num_local_experts=4, num_experts_per_tok=2)))),
        Family("qwen2-moe", "moe", lambda: T().Qwen2MoeModel(T().Qwen2MoeConfig(
            **_text(**kv, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32)))),
        Family("olmoe", "moe", lambda: T().OlmoeModel(T().OlmoeConfig(
            **_text(**kv, num_experts=4, num_experts_per_tok=2, pad_token_id=0)))),
        # encoder-decoders
        Family("t5", "encoder-decoder", lambda: T().T5Model(T().T5Config(
            vocab_size=VOCAB, d_model=H, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS, d_kv=H // HEADS,
            decoder_start_token_id=0)), inputs="seq2seq"),
        Family("bart", "encoder-decoder", lambda: T().BartModel(T().BartConfig(
            vocab_size=VOCAB, d_model=H, encoder_layers=LAYERS, decoder_layers=LAYERS,
            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
            decoder_ffn_dim=FFN, max_position_embeddings=POS)), inputs="seq2seq"),
        Family("pegasus", "encoder-decoder", lambda: T().PegasusModel(T().PegasusConfig(
            vocab_size=VOCAB, d_model=H, encoder_layers=LAYERS, decoder_layers=LAYERS,
            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
            decoder_ffn_dim=FFN, max_position_embeddings=POS)), inputs="seq2seq"),
        # vision
        Family("vit", "vision", lambda: T().ViTModel(T().ViTConfig(**_vision())), inputs="image"),
        Family("deit", "vision", lambda: T().DeiTModel(T().DeiTConfig(**_vision())), inputs="image"),
        Family("dinov2", "vision", lambda: T().Dinov2Model(T().Dinov2Config(**_vision(mlp_ratio=2))), inputs="image"),
        Family("swin", "vision", lambda: T().SwinModel(T().SwinConfig(
            image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
            window_size=4, mlp_ratio=2.0)), inputs="image"),
        Family("resnet", "vision", lambda: T().ResNetModel(T().ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3)), inputs="image"),
        Family("convnext", "vision", lambda: T().ConvNextModel(T().ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_channels=3, image_size=32)), inputs="image"),
        # audio
        Family("whisper", "audio", lambda: T().WhisperModel(T().WhisperConfig(
            vocab_size=VOCAB, d_model=H, encoder_layers=LAYERS, decoder_layers=LAYERS,
            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
            decoder_ffn_dim=FFN, num_mel_bins=8, max_source_positions=16, max_target_positions=POS,
            pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)), inputs="whisper"),
        Family("wav2vec2", "audio", lambda: T().Wav2Vec2Model(T().Wav2Vec2Config(
            **_text(conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                    num_conv_pos_embedding_groups=4, mask_time_prob=0.0))), inputs="audio"),
        # multimodal
        Family("clip", "multimodal", lambda: T().CLIPModel(T().CLIPConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             intermediate_size=FFN, max_position_embeddings=POS, bos_token_id=0, eos_token_id=2),
            vision_config=_vision(), projection_dim=16)), inputs="clip"),
        Family("siglip", "multimodal", lambda: T().SiglipModel(T().SiglipConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             intermediate_size=FFN, max_position_embeddings=POS),
            vision_config=_vision())), inputs="clip"),
        # hand-written
        Family("hand-ffn", "hand", HandFFNBlock, inputs="hand"),
    ]
    return {f.name: f for f in fams}


FAMILIES: dict[str, Family] = _families()


def build_family(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[name].build()
    return model.eval()


def family_inputs(name: str, batch: int = 2, seq: int = 6, seed: int = 1, pad: bool = False) -> dict[str, torch.Tensor]:
    """Keyword inputs; ``pad`` right-pads row 1 (left-pads for decoders) by two tokens."""
    fam = FAMILIES[name]
    g = torch.Generator().manual_seed(seed)
    if fam.inputs == "image":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    if fam.inputs == "audio":
        return {"input_values": torch.randn(batch, 400, generator=g)}
    if fam.inputs == "whisper":
        return {"input_features": torch.randn(batch, 8, 32, generator=g),
                "decoder_input_ids": torch.randint(3, VOCAB, (batch, seq), generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1:
        if fam.kind in ("decoder", "moe"):
            mask[1, :2] = 0
        else:
            mask[1, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if fam.inputs == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, max(seq - 2, 2)), generator=g)
    if fam.inputs == "clip":
        inputs["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=g)
    return inputs
