"""More than one device: FSDP2 per block, a graft on the meta device loaded into shards, launching.

The standard recipe (torchtune's lora_finetune_distributed) on a grafted module::

    with torch.device("meta"):
        model = LlamaForCausalLM(config)                 # no memory
    g = graftlib.distributed.graft_on_meta(model, "lora(q,v,r=16)")   # adapters real, base on meta
    graftlib.distributed.shard(g)                        # fully_shard per layer and unit, then fully_shard(g)
    graftlib.distributed.load_base(g, "model.safetensors", buffers=...)  # each rank reads its rows only
    ... train ...
    g.save("out")                                        # every rank calls it; rank 0 writes one graft dir

- ``shard`` = ``for b in g.blocks(): fully_shard(b)``, the same for each unit outside the blocks
  (``blocks.units``: token embeddings, head), then ``fully_shard(g)``: each block's base weights are one
  FSDP unit, each embedding / head another; adapters, norms and the rest of the glue the root unit.
- ``load_base`` reads each parameter's local rows (plain file reads) into a DTensor with the
  placement FSDP gave it: the full model is never materialised on one rank. Buffers a meta model could
  not compute (rotary ``inv_freq``) come from the file or ``buffers=``.
- ``load_adapters`` puts a single-process graft directory into a sharded module (each rank keeps its rows).
- DDP: wrap ``DDP(g)``; adapters that are inactive get no gradient, so freeze them first
  (``g.train_only("adapters:<active ones>")``) or pass ``find_unused_parameters=True``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .editor import STORE, Editor
from .errors import GraftError, LoadError

if TYPE_CHECKING:
    from .protocols import GraftedModule

__all__ = ["graft_on_meta", "shard", "load_base", "load_adapters", "init", "backend", "launch", "free_port",
           "shard_bytes", "gathered_bytes", "is_sharded", "rank_zero", "barrier", "peak_rss_mib", "rss_mib"]


# -- grafting on meta ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _adapters_on(device: torch.device) -> Iterator[None]:
    """New adapter tensors stay on `device` while the base weights are on meta (Editor puts them beside
    the base weight otherwise). An initialiser that reads the base weight gives a meta tensor: kept."""
    original = Editor._like_base

    def like_base(editor: Editor, value: torch.Tensor) -> torch.Tensor:
        placed = original(editor, value)
        if placed.is_meta and not value.is_meta:
            return value.to(device=device, dtype=placed.dtype)
        return placed

    Editor._like_base = like_base  # type: ignore[method-assign]
    try:
        yield
    finally:
        Editor._like_base = original  # type: ignore[method-assign]


def graft_on_meta(model: nn.Module, spec: str, example_inputs: Any = None, device: str | torch.device = "cpu",
                  seed: int = 0, dynamic: Any = True) -> "GraftedModule":
    """``graftlib.apply`` on a meta-device `model`, its adapters initialised on `device` from `seed` (so
    every rank starts from the same adapters), its graph computing on `device` once loaded (load_base).

    The model has no weights, so the module cannot trace again: graft it in the mode and with the inputs
    it will be called with (``model.train()``, ``example_inputs`` with ``labels``, on meta). Refuses
    initialisers that read the base weights (they are not there yet)."""
    from .protocols import graft

    with _adapters_on(torch.device(device)), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grafted = graft(model, spec, example_inputs=example_inputs, dynamic=dynamic)
    on_meta = [name for name, p in grafted.store.named_parameters() if p.is_meta]
    if on_meta:
        raise GraftError(f"adapter tensors {on_meta[:3]} are initialised from the base weights, which are on "
                         "the meta device: graft a loaded model, or use an initialiser that does not read them")
    grafted.retraceable = False
    for graph in (grafted.graph, grafted.base_graph):
        _compute_on(graph, torch.device(device))
    grafted.graph_module.recompile()
    grafted._invalidate()
    return grafted


def _compute_on(graph: "torch.fx.Graph", device: torch.device) -> None:
    """Every ``device=meta`` argument of a graph traced on meta (arange, to, new tensors) -> `device`."""
    from torch.fx.node import map_aggregate

    def move(value: Any) -> Any:
        return device if isinstance(value, torch.device) and value.type == "meta" else value

    for node in graph.nodes:
        node.args = map_aggregate(node.args, move)
        node.kwargs = map_aggregate(node.kwargs, move)


# -- sharding -----------------------------------------------------------------------------------------
def shard(grafted: "GraftedModule", **fsdp_options: Any) -> "GraftedModule":
    """``fully_shard`` each block, each unit outside them (token embeddings, output head: see
    ``graftlib.blocks.units``), then the module (FSDP2's recipe); `fsdp_options` go to every call."""
    from torch.distributed.fsdp import fully_shard

    from .blocks import units

    for block in grafted.blocks():
        fully_shard(block, **fsdp_options)
    for unit in units(grafted):
        fully_shard(unit, **fsdp_options)
    fully_shard(grafted, **fsdp_options)
    return grafted


def is_sharded(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def _base_parameters(grafted: "GraftedModule") -> dict[str, list[tuple[nn.Module, str]]]:
    """Each base parameter's name (first path) -> every (owner, leaf) holding it (tied weights share)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    names: dict[int, str] = {}
    gm = grafted.graph_module
    for path, module in gm.named_modules(remove_duplicate=False):
        if path == STORE or path.startswith(STORE + "."):
            continue
        for leaf, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, leaf))
                names.setdefault(id(param), f"{path}.{leaf}" if path else leaf)
    return {names[key]: holders for key, holders in owners.items()}


def shard_bytes(grafted: "GraftedModule") -> tuple[int, int]:
    """(bytes of the base parameters this rank holds, bytes of the whole base model)."""
    local = full = 0
    for name, holders in _base_parameters(grafted).items():
        owner, leaf = holders[0]
        param = owner._parameters[leaf]
        size = param.element_size()
        full += param.numel() * size
        local += (param.to_local().numel() if is_sharded(param) else param.numel()) * size
    return local, full


def gathered_bytes(grafted: "GraftedModule", modules: list[nn.Module] | None = None) -> int:
    """Bytes of base parameters gathered (unsharded) right now, in `modules` (None: the whole model, the
    root unit's own parameters included). FSDP2 frees a block's after its forward, so inside block k's
    forward this is about block k's size plus what the root unit keeps (norms)."""
    if modules is None:
        params = [holders[0][0]._parameters[holders[0][1]] for holders in _base_parameters(grafted).values()]
    else:
        params = [param for module in modules for param in module.parameters()]
    return sum(param.untyped_storage().nbytes() for param in params if not is_sharded(param))


# -- loading into shards ------------------------------------------------------------------------------
def _placed(value: torch.Tensor, like: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """`value` (this rank's rows, or the full tensor when `like` is not sharded) as `like`'s parameter."""
    if not is_sharded(like):
        return nn.Parameter(value.to(dtype=like.dtype), requires_grad=requires_grad)
    from torch.distributed.tensor import DTensor

    local = DTensor.from_local(value.to(dtype=like.dtype), like.device_mesh, like.placements, run_check=False,
                               shape=like.shape, stride=like.stride())
    return nn.Parameter(local, requires_grad=requires_grad)


def _rows(like: torch.Tensor) -> slice | None:
    """The rows of dimension 0 this rank holds of `like` (None: not sharded, all of it)."""
    if not is_sharded(like):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(p, Shard) or p.dim != 0 for p in like.placements):
        raise GraftError(f"only dim-0 sharding (FSDP2's default) is loaded; got {like.placements}")
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return slice(offset[0], offset[0] + shape[0]) if shape else None


def load_base(grafted: "GraftedModule", files: str | os.PathLike | list[str | os.PathLike],
              buffers: dict[str, torch.Tensor] | None = None, device: str | torch.device = "cpu") -> list[str]:
    """Read the base weights of `grafted` (sharded or not) from safetensors `files`, each rank only the rows
    it holds; returns the names loaded. Names are the model's (``model.layers.0.mlp.up_proj.weight``)."""
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    readers = [_Rows(Path(p)) for p in paths]
    where = {key: r for r in readers for key in r.header}
    params = _base_parameters(grafted)
    missing = [n for n in params if n not in where]
    if missing:
        raise LoadError(f"{', '.join(map(str, paths))}: no tensor for {missing[:3]} ({len(missing)} missing); "
                        "is the file from another model?")
    buffer_plan = _buffer_plan(grafted, where, buffers or {})
    for name, holders in params.items():
        owner, leaf = holders[0]
        like = owner._parameters[leaf]
        shape = where[name].shape(name)
        if shape != tuple(like.shape):
            raise LoadError(f"{name}: the file's shape {shape} is not the model's {tuple(like.shape)}")
        new = _placed(where[name].read(name, _rows(like)).to(device), like, like.requires_grad)
        for module, key in holders:
            module._parameters[key] = new
    for module, leaf, value in buffer_plan:
        module._buffers[leaf] = value().to(device)
    grafted._invalidate()
    return list(params)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class _Rows:
    """Reads rows of a safetensors file's tensors with plain file reads (no memory map: a rank's memory
    holds the rows it asked for, not the file pages it read them from)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size < 100_000_000:
                raise LoadError(f"{path} is not a safetensors file (header size {size})")
            header = json.loads(fh.read(size))
        self.start = 8 + size
        self.header = {k: v for k, v in header.items() if k != "__metadata__"}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        info = self.header[name]
        shape, dtype = list(info["shape"]), _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise LoadError(f"{self.path}: {name} has dtype {info['dtype']}, which graftlib does not read")
        begin = info["data_offsets"][0]
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
            begin += rows.start * row_bytes
            shape[0] = rows.stop - rows.start
        out = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as fh:
            fh.seek(self.start + begin)
            buffer = out.reshape(-1).view(torch.uint8).numpy()
            if fh.readinto(buffer) != buffer.size:
                raise LoadError(f"{self.path} is truncated: {name} ends past the end of the file")
        return out


def _buffer_plan(grafted: "GraftedModule", where: dict[str, Any], given: dict[str, torch.Tensor]
                 ) -> list[tuple[nn.Module, str, Callable[[], torch.Tensor]]]:
    """(owner, leaf, value) for every meta buffer, from `given` or the files; raises before anything loads
    when one has neither."""
    plan, pending = [], []
    for path, module in grafted.graph_module.named_modules():
        for leaf, buffer in module._buffers.items():
            name = f"{path}.{leaf}" if path else leaf
            if buffer is None or not buffer.is_meta:
                continue
            if name in given:
                plan.append((module, leaf, lambda v=given[name], b=buffer: v.to(dtype=b.dtype)))
            elif name in where:
                plan.append((module, leaf, lambda h=where[name], n=name, b=buffer: h.read(n).to(dtype=b.dtype)))
            else:
                pending.append(name)
    if pending:
        raise LoadError(f"buffers {pending[:3]} are on the meta device and in no file: pass their values, "
                        "e.g. buffers={name: model_on_cpu.get_buffer(name)}")
    return plan


def load_adapters(grafted: "GraftedModule", directory: str | os.PathLike) -> None:
    """Put the adapters saved in `directory` (one process or many) into `grafted`'s existing adapters of
    the same names, sharded as they are (each rank copies its rows)."""
    from .io import _check_saved_adapters, install_tensors, read_config, read_tensors

    meta, tensors = read_config(directory), read_tensors(directory)
    _check_saved_adapters(meta, tensors, str(directory))
    names = [r["name"] for r in meta["adapters"]]
    absent = [n for n in names if n not in grafted.adapters]
    if absent:
        raise LoadError(f"{directory}: adapters {absent} are not grafted here: graft the saved spec first "
                        "(graftlib.load(meta_model, directory) does both)")
    install_tensors(grafted, tensors, [n for n in names if any(k.startswith(n + "/") for k in tensors)],
                    source=str(directory))


# -- processes ----------------------------------------------------------------------------------------
def backend() -> str:
    """NCCL on CUDA devices, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init(rank: int, world_size: int, port: int, timeout_s: float = 60.0) -> torch.device:
    """Join the process group on 127.0.0.1:`port`; returns this rank's device."""
    import datetime

    import torch.distributed as dist

    kind = backend()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if kind == "nccl" else torch.device("cpu")
    if kind == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(kind, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return device


def launch(fn: Callable[..., None], nproc: int, args: tuple = (), timeout_s: float = 300.0) -> None:
    """Run ``fn(rank, nproc, port, *args)`` in `nproc` spawned processes; each calls :func:`init`. Raises
    GraftError when one fails or the whole run exceeds `timeout_s` (the processes are then killed)."""
    import torch.multiprocessing as mp

    port = free_port()
    context = mp.start_processes(fn, args=(nproc, port, *args), nprocs=nproc, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise GraftError(f"the {nproc} processes did not finish within {timeout_s:.0f} s")
    except mp.ProcessRaisedException as exc:
        raise GraftError(f"a process failed:\n{exc}") from None
    except mp.ProcessExitedException as exc:
        raise GraftError(f"a process exited: {exc}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    return _status_mib("VmHWM:")


def rss_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    return _status_mib("VmRSS:")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")
