"""Tiny random-init models for the test suite (hidden 32, 2 layers), built from configs: no hub access.

``build(name)`` returns ``(model, inputs)`` with the model in eval mode and inputs a dict of keyword
tensors; ``other_inputs(name)`` gives a different batch size and length for dynamic-shape checks.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHS", "TEXT_ARCHS", "build", "build_with_head", "inputs_for", "HandAttention", "HandPreLN"]

H, LAYERS, HEADS, FFN, VOCAB = 32, 2, 4, 64, 100


class HandAttention(nn.Module):
    """A hand-written transformer: nn.Linear projections + F.scaled_dot_product_attention, post-LN."""

    def __init__(self, vocab: int = VOCAB, dim: int = H, heads: int = HEADS, layers: int = LAYERS):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_HandBlock(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].bool()
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)


class _HandBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc_in, self.fc_out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, D)
        att = F.scaled_dot_product_attention(split(self.wq(x)), split(self.wk(x)), split(self.wv(x)),
                                             attn_mask=mask)
        att = att.transpose(1, 2).reshape(b, n, d)
        x = self.norm1(x + self.drop(self.proj(att)))
        return self.norm2(x + self.drop(self.fc_out(F.gelu(self.fc_in(x)))))


class HandPreLN(nn.Module):
    """A hand-written pre-LN block stack (GPT/ViT style): x + attn(LN(x)), x + mlp(LN(x))."""

    def __init__(self, vocab: int = VOCAB, dim: int = H, heads: int = HEADS, layers: int = LAYERS):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_PreLNBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class _PreLNBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.up_proj, self.down_proj = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.ln1(x)
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, D)
        att = F.scaled_dot_product_attention(split(self.q_proj(h)), split(self.k_proj(h)),
                                             split(self.v_proj(h)), is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.down_proj(F.gelu(self.up_proj(self.ln2(x))))


class SmallConvNet(nn.Module):
    """Plain convs with stride, padding, dilation and groups, plus batch norm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.head = nn.Linear(16, 4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(pixel_values)))
        x = F.relu(self.grouped(F.relu(self.dilated(x))))
        return self.head(x.mean(dim=(2, 3)))


def _hf(name: str) -> nn.Module:
    import transformers as T

    text = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=FFN, max_position_embeddings=64)
    vision = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                  image_size=32, patch_size=8, num_channels=3)
    factories: dict[str, Callable[[], nn.Module]] = {
        "bert": lambda: T.BertModel(T.BertConfig(**text)),
        "roberta": lambda: T.RobertaModel(T.RobertaConfig(**text, pad_token_id=1, type_vocab_size=1)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(
            vocab_size=VOCAB, dim=H, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=64)),
        "gpt2": lambda: T.GPT2Model(T.GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS,
                                                 n_positions=64, bos_token_id=0, eos_token_id=0)),
        "llama": lambda: T.LlamaModel(T.LlamaConfig(**text, num_key_value_heads=2)),
        "mistral": lambda: T.MistralModel(T.MistralConfig(**text, num_key_value_heads=2)),
        "qwen2": lambda: T.Qwen2Model(T.Qwen2Config(**text, num_key_value_heads=2)),
        "t5": lambda: T.T5Model(T.T5Config(vocab_size=VOCAB, d_model=H, d_ff=FFN, num_layers=LAYERS,
                                           num_heads=HEADS, d_kv=H // HEADS, decoder_start_token_id=0)),
        "bart": lambda: T.BartModel(T.BartConfig(
            vocab_size=VOCAB, d_model=H, encoder_layers=LAYERS, decoder_layers=LAYERS,
            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
            decoder_ffn_dim=FFN, max_position_embeddings=64)),
        "vit": lambda: T.ViTModel(T.ViTConfig(**vision)),
        "clip": lambda: T.CLIPModel(T.CLIPConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             intermediate_size=FFN, max_position_embeddings=64, bos_token_id=0, eos_token_id=2),
            vision_config=vision, projection_dim=16)),
        "resnet": lambda: T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                       num_channels=3)),
        "convnext": lambda: T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1],
                                                             num_stages=2, num_channels=3, image_size=32)),
    }
    return factories[name]()


HAND = {"hand": HandAttention, "hand_preln": HandPreLN, "convnet": SmallConvNet}
TEXT_ARCHS = ["bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "t5", "bart", "hand"]
ARCHS = TEXT_ARCHS + ["vit", "clip", "resnet", "convnext", "hand_preln", "convnet"]
IMAGE = {"vit", "resnet", "convnext", "convnet"}


def inputs_for(name: str, batch: int = 2, seq: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """Keyword inputs for `name`, with an all-ones attention mask (tests pad where they need padding)."""
    g = torch.Generator().manual_seed(seed)
    if name in IMAGE:
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    if name == "hand_preln":
        return {"input_ids": ids}
    mask = torch.ones(batch, seq, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name in ("t5", "bart"):
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, max(seq - 2, 2)), generator=g)
    if name == "clip":
        inputs["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=g)
    if name == "bert":
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def build(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = HAND[name]() if name in HAND else _hf(name)
    model.eval()
    return model, inputs_for(name)


def build_with_head(name: str, seed: int = 0) -> nn.Module:
    """`name`'s tiny config under a task head with a loss, in eval mode, default dropout:
    "llama" -> LlamaForCausalLM (labels = ids), "bert" -> BertForSequenceClassification (3 labels)."""
    import transformers as T

    text = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=FFN, max_position_embeddings=64)
    factories: dict[str, Callable[[], nn.Module]] = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**text, num_key_value_heads=2)),
        "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**text, num_labels=3)),
    }
    torch.manual_seed(seed)
    return factories[name]().eval()


def example_inputs(name: str) -> dict[str, torch.Tensor] | None:
    """Trace inputs for hand-written models (HF models synthesise their own)."""
    return inputs_for(name, batch=2, seq=7, seed=2) if name in HAND else None


def run_with_site_deltas(model: nn.Module, deltas: list[tuple[object, Callable]], inputs: dict) -> object:
    """The eager reference for additive methods: run `model` (no grad) with forward hooks that add
    ``delta(module, x)`` to each site's output, or to its column span for a slice of a fused projection.

    `deltas` holds ``(site, delta)`` pairs; a site has ``path`` and ``span`` (see graftlib.sites).
    """
    def hook_for(site: object, delta: Callable) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            if site.span is None:
                return out + delta(module, args[0])
            out[..., site.span[0]:site.span[1]] += delta(module, args[0])
            return out
        return hook

    handles = [model.get_submodule(site.path).register_forward_hook(hook_for(site, delta))
               for site, delta in deltas]
    try:
        with torch.no_grad():
            return model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
