"""More than one device (#20): block modules (``g.blocks()``), DDP and FSDP2 over 2 gloo processes on CPU
against a single-process run with the same global batch, meta graft -> shard -> load, distributed saves.

Every check compares numbers: the live (per-block) runtime against the flat one bit for bit, the 2-process
runs against one process (losses and adapter tensors within 1e-5), a sharded save against the single-
process module's outputs."""
from __future__ import annotations

import pytest
import torch

import graftlib
import graftlib.blocks as block_runtime
from models import build, build_with_head, inputs_for
from test_training import _hidden, _randomise  # the same helpers: hidden states, random adapters


# -- 1. g.blocks(): the live runtime equals the flat one bit for bit ------------------------------------
#: (architecture, spec, gradient checkpointing)
LIVE = [
    ("llama", "lora(q_proj, v_proj, r=4, name=a) + lora(o_proj, r=2, name=b)", False),
    ("llama", "lora(q_proj, v_proj, r=4)", True),
    ("gpt2", "lora(c_attn, r=4)", False),
    ("bert", "lora(query, value, r=4, name=a) + adapter(output.dense, reduction=4, name=b)", False),
]


def _pair(arch: str, spec: str) -> tuple[graftlib.Grafted, graftlib.Grafted, dict]:
    model, x = build(arch)
    flat, live = graftlib.apply(model, spec), graftlib.apply(model, spec)
    _randomise(flat), _randomise(live)
    return flat, live, x


@pytest.mark.parametrize("arch,spec,checkpointed", LIVE, ids=[f"{a}-{s[:24]}-{c}" for a, s, c in LIVE])
def test_blocks_equal_flat_runtime(arch: str, spec: str, checkpointed: bool) -> None:
    flat, live, x = _pair(arch, spec)
    blocks = live.blocks()
    assert [type(b).__name__ for b in blocks] == ["Block"] * len(blocks) and len(blocks) >= 2
    names = dict(blocks[0].named_parameters())  # the model's own names, relative to the block
    assert any(n.endswith("weight") and "." in n for n in names)
    for g in (flat, live):
        if checkpointed:
            g.gradient_checkpointing_enable()
        g.train()
    out_flat, out_live = _seeded(flat, x), _seeded(live, x)  # the same dropout masks
    assert torch.equal(out_flat, out_live)
    out_flat.square().mean().backward()
    out_live.square().mean().backward()
    for (name, a), b in zip(flat.store.named_parameters(), live.store.parameters()):
        assert a.grad is not None and torch.equal(a.grad, b.grad), name
    flat.eval(), live.eval()
    assert torch.equal(_hidden(flat(**x)), _hidden(live(**x)))
    live.set_active(live.active_adapters[:1])  # another adapter set: another runtime, the same blocks
    flat.set_active(flat.active_adapters[:1])
    assert torch.equal(_hidden(flat(**x)), _hidden(live(**x)))


#: (model, spec, the units expected: weight matrices outside the blocks, untied)
UNITS = [
    ("llama-lm", "lora(q_proj, v_proj, lm_head, r=4)", ["model.embed_tokens", "lm_head"]),
    ("bert-cls", "lora(query, value, r=4)", ["bert.embeddings.word_embeddings",
                                             "bert.embeddings.position_embeddings",
                                             "bert.embeddings.token_type_embeddings", "bert.pooler.dense",
                                             "classifier"]),
    ("gpt2", "lora(c_attn, r=4)", ["wte", "wpe"]),
    ("gpt2-lm", "lora(c_attn, r=4)", ["transformer.wpe"]),  # wte is tied to lm_head: left in the root unit
]


def _gpt2_lm() -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


@pytest.mark.parametrize("arch,spec,expected", UNITS, ids=[u[0] for u in UNITS])
def test_units_equal_flat_runtime(arch: str, spec: str, expected: list[str]) -> None:
    """Ops reading a unit's weight run through the unit's module (what FSDP2 hooks), numbers unchanged."""
    from graftlib.blocks import unit_paths, units

    if arch == "gpt2-lm":
        model, x = _gpt2_lm(), inputs_for("gpt2")
    elif arch.endswith(("-lm", "-cls")):
        model, x = build_with_head(arch.split("-")[0]), inputs_for(arch.split("-")[0])
    else:
        model, x = build(arch)
    flat, live = graftlib.apply(model, spec), graftlib.apply(model, spec)
    _randomise(flat), _randomise(live)
    found = units(live)
    assert unit_paths(live.graph, live.graph_module) == expected
    assert [type(u).__name__ for u in found] == ["Block"] * len(expected)
    calls = []
    hooks = [u.register_forward_pre_hook(lambda module, args: calls.append(module)) for u in found]
    flat.train(), live.train()
    out_flat, out_live = _seeded(flat, x), _seeded(live, x)
    assert torch.equal(out_flat, out_live) and {id(m) for m in calls} == {id(u) for u in found}
    out_flat.square().mean().backward()
    out_live.square().mean().backward()
    for (name, a), b in zip(flat.store.named_parameters(), live.store.parameters()):
        assert a.grad is not None and torch.equal(a.grad, b.grad), name
    for hook in hooks:
        hook.remove()


def _seeded(g: graftlib.Grafted, x: dict) -> torch.Tensor:
    torch.manual_seed(7)
    return _hidden(g(**x))


def test_blocks_read_weights_at_call_time() -> None:
    """FSDP2 assigns gathered parameters on the owning modules around a block's call: the live runtime
    must read them there, in every variant (here: a new trace for labels=), not a cached object."""
    model = build_with_head("llama")
    g = graftlib.apply(model, "lora(q_proj, v_proj, r=4)")
    _randomise(g)
    g.train()
    block = g.blocks()[1]
    x = inputs_for("llama")
    before = g(**x, labels=x["input_ids"]).loss
    owner = block.get_submodule("mlp.down_proj")
    original = owner._parameters["weight"]
    owner._parameters["weight"] = torch.nn.Parameter(torch.zeros_like(original), requires_grad=False)
    zeroed = g(**x, labels=x["input_ids"]).loss
    owner._parameters["weight"] = original
    eager_zeroed = _eager_loss_with_zero_down(model, g, x)
    assert not torch.equal(before, zeroed)
    torch.testing.assert_close(zeroed, eager_zeroed, rtol=0, atol=1e-6)
    assert torch.equal(g(**x, labels=x["input_ids"]).loss, before)


def _eager_loss_with_zero_down(model: torch.nn.Module, g: graftlib.Grafted, x: dict) -> torch.Tensor:
    """The same call on a module grafted from a copy of the model whose layers.1 down_proj is zero."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.zero_()
    twin = graftlib.apply(other, "lora(q_proj, v_proj, r=4)")
    with torch.no_grad():
        for a, b in zip(twin.store.parameters(), g.store.parameters()):
            a.copy_(b)
    twin.train()
    return twin(**x, labels=x["input_ids"]).loss


def test_blocks_refuse_a_model_without_repeated_layers() -> None:
    from graftlib.errors import GraftError

    from collections import OrderedDict

    model = torch.nn.Sequential(OrderedDict(inp=torch.nn.Linear(4, 4), act=torch.nn.ReLU(), out=torch.nn.Linear(4, 2)))
    g = graftlib.apply(model, "lora(inp, r=2)", example_inputs=(torch.randn(2, 4),))
    with pytest.raises(GraftError, match="no repeated blocks"):
        g.blocks()


# -- 2. two gloo processes on CPU against one process with the same global batch ----------------------
SPEC = "lora(q_proj, v_proj, r=4, name=a) + lora(o_proj, r=2, name=off)"  # "off" stays inactive


def _only_a(g: graftlib.Grafted) -> None:
    """Train adapter a; "off" is inactive and frozen, so DDP needs no find_unused_parameters."""
    g.set_active("a")
    g.train_only("adapters:a")
STEPS, LR, ROWS = 3, 0.5, 4  # global batch of 4 rows, 2 per rank


def _batch() -> dict[str, torch.Tensor]:
    x = inputs_for("llama", batch=ROWS, seq=6, seed=3)
    return {**x, "labels": x["input_ids"]}


def _rows(x: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    per = ROWS // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in x.items()}


def _train(g: graftlib.Grafted, run, x: dict[str, torch.Tensor], reduce=None) -> list[float]:
    """SGD steps; the loss of each step over the global batch (`reduce`: the mean over ranks)."""
    optimiser = torch.optim.SGD([p for p in g.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = run(**x).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(float(reduce(loss.detach()) if reduce else loss.detach()))
    return losses


def _adapters(g: graftlib.Grafted) -> dict[str, torch.Tensor]:
    from graftlib.distributed import is_sharded

    return {n: (p.full_tensor() if is_sharded(p) else p).detach().clone() for n, p in g.store.named_parameters()}


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def _worker(rank: int, world: int, port: int, mode: str, folder: str) -> None:
    """One rank: `mode` ddp (full model, DDP), fsdp (full model, per-block fully_shard) or meta (graft on
    meta, shard, load the base from the safetensors file and the adapters from the saved graft)."""
    import json
    from pathlib import Path

    import graftlib.distributed as gd
    import torch.distributed as dist

    gd.init(rank, world, port)
    try:
        x = _rows(_batch(), rank, world)
        report: dict = {}
        if mode == "meta":  # traced in training mode with labels: the module cannot trace again
            with torch.device("meta"):
                model = build_with_head("llama").train()
            g = gd.graft_on_meta(model, SPEC, example_inputs={**{k: v.to("meta") for k, v in x.items()},
                                                              "use_cache": False})
        else:
            g = graftlib.apply(build_with_head("llama").train(), SPEC, example_inputs={**x, "use_cache": False})
        g.train()
        _only_a(g)
        if mode == "ddp":
            gd.load_adapters(g, Path(folder) / "start")
            from torch.nn.parallel import DistributedDataParallel

            run = DistributedDataParallel(g)
        else:
            blocks = gd.shard(g)
            blocks = g.blocks()
            if mode == "meta":
                buffers = torch.load(Path(folder) / "buffers.pt")
                gd.load_base(g, Path(folder) / "model.safetensors", buffers=buffers)
            gd.load_adapters(g, Path(folder) / "start")
            report["local_bytes"], report["full_bytes"] = gd.shard_bytes(g)
            units = block_runtime.units(g)
            size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
            report["block_bytes"], report["unit_bytes"] = [size(b) for b in blocks], [size(u) for u in units]
            peaks: list[int] = []
            hooks = [m.register_forward_hook(lambda *_: peaks.append(gd.gathered_bytes(g))) for m in blocks + units]
            hooks += [m.register_forward_pre_hook(lambda *_: peaks.append(gd.gathered_bytes(g)))
                      for m in blocks + units]
            run = g
        report["losses"] = _train(g, run, x, _mean_over_ranks)
        if mode != "ddp":
            report["gathered_peak"] = max(peaks)
            for hook in hooks:
                hook.remove()
        adapters = _adapters(g)
        g.save(str(Path(folder) / "saved"))
        if rank == 0:
            torch.save(adapters, Path(folder) / "adapters.pt")
            (Path(folder) / "report.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def _reference(folder) -> tuple[graftlib.Grafted, list[float], torch.nn.Module]:
    """One process, the whole batch: the same model, adapters saved to `folder`/start before training."""
    model = build_with_head("llama")
    g = graftlib.apply(model, SPEC)
    _randomise(g)
    g.save(str(folder / "start"))
    g.train()
    _only_a(g)
    return g, _train(g, g, _batch()), model


@pytest.mark.parametrize("mode", ["ddp", "meta", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_train_like_one(tmp_path, mode: str) -> None:
    import json

    from safetensors.torch import save_file

    import graftlib.distributed as gd

    reference, losses, model = _reference(tmp_path)
    if mode == "meta":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
        torch.save(dict(model.named_buffers()), tmp_path / "buffers.pt")
    gd.launch(_worker, 2, args=(mode, str(tmp_path)), timeout_s=240)
    report = json.loads((tmp_path / "report.json").read_text())
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(losses), rtol=0, atol=1e-5)
    assert losses[-1] < losses[0]  # it trained
    trained = torch.load(tmp_path / "adapters.pt")
    expected = _adapters(reference)
    assert trained.keys() == expected.keys() and any(n.startswith("off.") for n in expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(trained[name], tensor, rtol=0, atol=1e-5, msg=name)
    loaded = graftlib.load(model, str(tmp_path / "saved"))  # the 2-process save, read by one process
    loaded.eval(), reference.eval()
    x = inputs_for("llama")
    torch.testing.assert_close(loaded(**x).logits, reference(**x).logits, rtol=0, atol=1e-5)
    if mode != "ddp":
        blocks = report["block_bytes"]
        assert abs(report["local_bytes"] - report["full_bytes"] / 2) <= 0.02 * report["full_bytes"]
        units = report["unit_bytes"]
        assert len(units) == 2  # the token embeddings and the head: units of their own
        root = report["full_bytes"] - sum(blocks) - sum(units)  # what the root unit keeps gathered (norms)
        assert report["gathered_peak"] == max(blocks + units) + root  # one unit at a time, never the model


# -- 3. graft on meta, load from safetensors (one process: the same path without sharding) --------------
def _meta_grafted(x: dict) -> graftlib.Grafted:
    import graftlib.distributed as gd

    with torch.device("meta"):
        model = build_with_head("llama").train()
    return gd.graft_on_meta(model, SPEC, example_inputs={**{k: v.to("meta") for k, v in x.items()},
                                                         "use_cache": False})


def test_meta_graft_loads_base_and_adapters_like_the_loaded_model(tmp_path) -> None:
    from safetensors.torch import save_file

    import graftlib.distributed as gd

    model = build_with_head("llama").train()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    reference = graftlib.apply(model, SPEC)
    _randomise(reference)
    reference.save(str(tmp_path / "graft"))
    x = _batch()
    g = _meta_grafted(x)
    assert all(p.is_meta for n, p in g.named_parameters() if ".graft." not in f".{n}")
    assert not any(p.is_meta for p in g.store.parameters())  # adapters are real from the start
    loaded = gd.load_base(g, tmp_path / "model.safetensors", buffers=dict(model.named_buffers()))
    assert len(loaded) == len(list(model.parameters()))
    gd.load_adapters(g, tmp_path / "graft")
    reference.train(), g.train()
    assert torch.equal(reference(**x).loss, g(**x).loss)


def test_meta_graft_same_adapters_on_every_rank() -> None:
    x = _batch()
    first, second = _meta_grafted(x), _meta_grafted(x)
    for (name, a), b in zip(first.store.named_parameters(), second.store.parameters()):
        assert torch.equal(a, b), name  # seeded: every rank starts from the same adapters


def test_load_base_names_what_is_missing(tmp_path) -> None:
    from safetensors.torch import save_file

    import graftlib.distributed as gd
    from graftlib.errors import LoadError

    model = build_with_head("llama")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    g = _meta_grafted(_batch())
    with pytest.raises(LoadError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        gd.load_base(g, tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadError, match="inv_freq.*pass their values"):
        gd.load_base(g, tmp_path / "model.safetensors")  # the rotary buffer is in no file
