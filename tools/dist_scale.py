"""A 1B-parameter Llama-shaped model, grafted on meta, sharded over 2 processes, loaded, trained (#20).

    python -m graftlib.tools.dist_scale                 # 1.1B (TinyLlama's shape), 2 gloo ranks on CPU
    python -m graftlib.tools.dist_scale --layers 2      # a smoke run

1. writes random base weights to one safetensors file, tensor by tensor (this process never holds them all);
2. each rank: builds the model on the meta device, ``graft_on_meta`` (LoRA on q, v), ``shard`` (fully_shard
   per block, per unit outside them (token embeddings, head), then the root), ``load_base`` (its own rows
   of each weight only), then 2 AdamW steps;
3. prints, per rank: local / full base bytes, the most base bytes gathered at once (seen as each block and
   unit starts its forward; FSDP2 frees a unit after its forward), seconds per step, the loss, and the
   rank's peak RSS (VmHWM) until the base is loaded (it counts the file pages read) and during the steps.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _config(layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)


def write_random_weights(path: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int = 0) -> int:
    """A safetensors file of random tensors with these names and shapes, written one tensor at a time;
    returns its size in bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for name, (shape, dtype) in shapes.items():
            scale = 1.0 if name.endswith("norm.weight") else 0.02
            value = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(scale).to(dtype)
            if name.endswith("norm.weight"):
                value.fill_(1.0)
            fh.write(value.contiguous().view(torch.uint8).numpy().tobytes())
    return 8 + len(text) + offset


def _rank(rank: int, world: int, port: int, folder: str, layers: int, seq: int, steps: int) -> None:
    import torch.distributed as dist
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    import graftlib.distributed as gd
    from graftlib.blocks import units as units_of

    gd.init(rank, world, port, timeout_s=1800)
    try:
        torch.manual_seed(0)
        config = _config(layers)
        ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(rank))
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        with torch.device("meta"):
            model = LlamaForCausalLM(config).train()
        start = time.perf_counter()
        g = gd.graft_on_meta(model, "lora(q_proj, v_proj, r=16)",
                             example_inputs={**{k: v.to("meta") for k, v in x.items()}, "use_cache": False})
        graft_s = time.perf_counter() - start
        blocks = gd.shard(g).blocks()
        rotary = LlamaRotaryEmbedding(config)
        buffers = {f"model.rotary_emb.{k}": v for k, v in rotary.named_buffers()}
        start = time.perf_counter()
        gd.load_base(g, Path(folder) / "model.safetensors", buffers=buffers)
        load_s = time.perf_counter() - start
        load_peak, loaded = gd.peak_rss_mib(), gd.rss_mib()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the training steps' peak
        local, full = gd.shard_bytes(g)
        units = units_of(g)
        peaks: list[int] = []
        for module in blocks + units:  # after FSDP's own pre-forward hook: the gathered weights are in place
            module.register_forward_pre_hook(lambda *_: peaks.append(gd.gathered_bytes(g)))
        optimiser = torch.optim.AdamW([p for p in g.parameters() if p.requires_grad], lr=1e-4)
        losses, step_s = [], []
        for _ in range(steps):
            start = time.perf_counter()
            loss = g(**x).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            step_s.append(time.perf_counter() - start)
            losses.append(loss.item())
        size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
        report = dict(rank=rank, local_base_bytes=local, full_base_bytes=full, gathered_peak_bytes=max(peaks),
                      largest_block_bytes=max(map(size, blocks)), unit_bytes=[size(u) for u in units],
                      graft_s=round(graft_s, 1), load_s=round(load_s, 1),
                      step_s=[round(s, 1) for s in step_s], losses=losses, peak_rss_until_loaded_mib=round(load_peak),
                      rss_loaded_mib=round(loaded),
                      peak_rss_training_mib=round(gd.peak_rss_mib()))
        print(json.dumps(report), flush=True)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: 1.1B parameters)")
    parser.add_argument("--seq", type=int, default=32, help="tokens per rank per step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)
    from transformers import LlamaForCausalLM

    import graftlib.distributed as gd

    with torch.device("meta"):
        model = LlamaForCausalLM(_config(args.layers))
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        size = write_random_weights(Path(folder) / "model.safetensors", shapes)
        print(json.dumps(dict(params=params, file_bytes=size, write_s=round(time.perf_counter() - start, 1),
                              writer_peak_rss_mib=round(gd.peak_rss_mib()))), flush=True)
        gd.launch(_rank, args.nproc, args=(folder, args.layers, args.seq, args.steps), timeout_s=3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
