"""Quantize: a frozen base weight stored packed and dequantised in the graph where it is read.

    linear(x, W, b)        ->  linear(x, dequant(Q), b)
    addmm(b, x, W) (Conv1D) -> addmm(b, x, dequant(Q))

``bits=4`` is QLoRA's NF4, stored exactly as bitsandbytes stores it: two 4-bit NormalFloat codes per
byte (high nibble first), one absmax per block of 64 weights (the last block may be partial), and the absmaxes double-quantised
(minus their mean, then 8-bit dynamic codes per block of 256 with an fp32 scale each):

    W[i]      = NF4[code[i]] * absmax[i // 64]                       # (out * in,) -> (out, in)
    absmax[j] = DYNAMIC[qabsmax[j]] * absmax2[j // 256] + offset

``bits=8`` is int8 weight-only, symmetric per output row: ``W[o, :] = q[o, :] * scale[o]`` with
``scale = max|W[o, :]| / 127``.

The dequantise subgraph is plain aten ops (integer div / remainder, index, mul, add), so it composes
with every other pass and exports to ONNX as Div / Mod / Gather / Mul. A LoRA branch on a quantised
projection (``quantize(all-linear, bits=4) + lora(q, v)``) is added beside the linear as usual and
trains in the compute dtype: that is QLoRA.

Quantisation belongs to the base, not to an adapter: ``disable_adapters()`` keeps it, and the fp32
weights it replaced are released from the grafted module (stand-ins of one element keep their shape;
re-traces use a skeleton of the model with the same stand-ins), so memory really drops once the caller lets go of the
original model. ``merge()`` dequantises and adds the deltas: the merged module holds full-precision
weights, or, with ``merge(requantize=True)``, the merged weights quantised again, with the
requantisation error reported (``merged.requantization_error``).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import fx, nn

from graftlib.bnb import PREQUANTISED
from graftlib.editor import Editor, graft_tag
from graftlib.errors import GraftError
from graftlib.registry import Method, Option, register
from graftlib.runtime import eliminate_dead_code
from graftlib.sites import Site, weight_value
from graftlib.spec import GraftCall

__all__ = ["Quantize", "dequant_linear", "recompute_in_backward", "NF4_CODE", "DYNAMIC_CODE", "quantize_nf4", "dequantize_nf4", "quantize_int8",
           "dequantize_int8", "quantize_weight", "dequantize_weight", "is_released", "skeleton"]

aten = torch.ops.aten

#: QLoRA's NormalFloat-4 levels (quantiles of N(0, 1) with an exact zero), as bitsandbytes has them.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)

BLOCK = 64          # weights per absmax (QLoRA)
ABSMAX_BLOCK = 256  # absmaxes per second-level scale (double quantisation)


def _dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``): 256 sorted levels in [-1, 1]."""
    data: list[float] = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        items = 2 ** (i + non_sign_bits - exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = _dynamic_code()


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of the sorted `code` for each value (ties go up, as bitsandbytes)."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)


LUT_SIZE = 65536  # bins of [-1, 1] in bitsandbytes' CPU 8-bit blockwise quantiser


def _dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``build_quantize_lut`` (csrc/cpu_ops.cpp, 0.50): bin ``i`` of [-1, 1] holds the
    index of the first level whose midpoint with the next is not below ``-1 + 2 i / 65535``."""
    midpoints = 0.5 * (code[:-1] + code[1:])                                    # (255,) fp32
    bins = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints, bins, side="left").to(torch.uint8)    # (65536,)


DYNAMIC_LUT = _dynamic_lut(DYNAMIC_CODE)


def _blockwise_dynamic(flat: torch.Tensor, block: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax per block) of a 1-D fp32 tensor exactly as bitsandbytes' CPU
    ``quantize_blockwise`` computes them: ``x * (1 / absmax)`` clamped to [-1, 1], put in one of
    65,536 bins (``uint16((v + 1) * 0.5 * 65535 + 0.5)``), and the bin's code read from the table;
    a block of zeros gets code 0. The table is not always the nearest level (up to one level off)."""
    numel = flat.numel()
    blocks = torch.cat([flat, flat.new_zeros(-numel % block)]).reshape(-1, block)  # (blocks, block)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax).view(-1, 1), -1, 1)
    bins = ((scaled + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).to(torch.int64)       # truncation, as the C cast
    lut = DYNAMIC_LUT if code is DYNAMIC_CODE else _dynamic_lut(code)
    codes = lut[bins.clamp(0, LUT_SIZE - 1)]
    codes = torch.where(absmax.view(-1, 1) == 0, torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:numel], absmax


def _nf4_blocks(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of NF4 as bitsandbytes' ``quantize_4bit`` (its torch kernel, the one CPU runs):
    full blocks scale by ``x * (1 / absmax)``, a last partial block by ``x / absmax`` with its absmax
    clamped to 1e-38; an odd count gets one zero code appended."""
    numel = flat.numel()
    full = numel - numel % BLOCK
    head = flat[:full].reshape(-1, BLOCK)                                        # (blocks, 64)
    absmax = head.abs().amax(dim=-1)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < numel:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    scaled = torch.cat([scaled, scaled.new_zeros(numel % 2)])
    return _nearest(scaled, NF4_CODE), absmax


def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """NF4 with double-quantised absmax; bit for bit the tensors bitsandbytes 0.50's CPU
    ``quantize_4bit(blocksize=64, quant_type="nf4", compress_statistics=True)`` produces: ``packed``
    (n/2,) uint8, ``qabsmax`` (blocks,) uint8, ``absmax2`` (ceil(blocks/256),), ``offset`` ()."""
    codes, absmax = _nf4_blocks(weight.detach().reshape(-1).float())
    packed = (codes[::2] << 4) | codes[1::2]                                     # (ceil(n/2),)
    offset = absmax.mean()
    qabsmax, absmax2 = _blockwise_dynamic(absmax - offset, ABSMAX_BLOCK, DYNAMIC_CODE)
    return {"packed": packed, "qabsmax": qabsmax, "absmax2": absmax2, "offset": offset}


def dequantize_nf4(state: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 weight of `shape` (eager twin of the graph's subgraph: the same ops, the same result)."""
    absmax = _absmax(state)
    packed = state["packed"]
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1).long()  # (n rounded up to even,)
    values = NF4_CODE.to(packed.device)[codes]
    values = torch.cat([values, values.new_zeros(absmax.numel() * BLOCK - values.numel())])
    weight = values.reshape(-1, BLOCK) * absmax.reshape(-1, 1)                  # (blocks, 64)
    return weight.reshape(-1)[: math.prod(shape)].reshape(shape)


def _absmax(state: dict[str, torch.Tensor]) -> torch.Tensor:
    qabsmax = state["qabsmax"]
    blocks = qabsmax.numel()
    levels = DYNAMIC_CODE.to(qabsmax.device)[qabsmax.long()]                     # (blocks,)
    levels = torch.cat([levels, levels.new_zeros(-blocks % ABSMAX_BLOCK)]).reshape(-1, ABSMAX_BLOCK)
    return (levels * state["absmax2"].reshape(-1, 1)).reshape(-1)[:blocks] + state["offset"]


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-row int8: ``q`` (out, in) int8 and ``scale`` (out, 1)."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-38) / 127.0
    q = torch.clamp(torch.round(rows / scale), -127, 127).to(torch.int8)
    return {"q": q, "scale": scale}


def dequantize_int8(state: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return (state["q"].float() * state["scale"]).reshape(shape)


def quantize_weight(weight: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    return quantize_nf4(weight) if bits == 4 else quantize_int8(weight)


def dequantize_weight(state: dict[str, torch.Tensor], shape: tuple[int, ...], bits: int) -> torch.Tensor:
    return dequantize_nf4(state, shape) if bits == 4 else dequantize_int8(state, shape)


def _bits(value: Any) -> str | None:
    return None if value in (4, 8) else "must be 4 (NF4) or 8 (int8)"


@register
class Quantize(Method):
    name = "quantize"
    site_kinds = ("linear", "conv1d")
    options = {"bits": Option(4, (int,), _bits, help="4: NF4 with double quantisation; 8: int8 per row")}
    base_rewrite = True    # part of the base model: kept when adapters are disabled, never deactivated
    saves_tensors = False  # g.save() stores the spec; a load quantises the base weights again (same bits)

    def configure(self, call: GraftCall, index: Any = None) -> dict[str, Any]:
        config = super().configure(call, index)
        if "name" not in call.options:
            config["name"] = "quantize"  # not "default": that is the adapter a lora(...) beside it takes
        return config

    def check_site(self, call: GraftCall, site: Site, config: dict[str, Any]) -> None:
        if site.part is not None:
            raise call.error(f"quantize stores whole weights; {site.key} is a slice of {site.path}: "
                             f"target the fused projection ({site.path.rsplit('.', 1)[-1]})")

    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        anchor = editor.anchor
        position = 2 if site.kind == "conv1d" else 1
        weight_node = anchor.args[position]
        if not (isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"):
            return  # already quantised (a second anchor of a shared weight reads the first's tensors)
        weight = weight_value(editor.gm, weight_node.target)
        shape, dtype = tuple(weight.shape), weight.dtype
        state: dict[str, torch.Tensor] = {}
        names = ("packed", "qabsmax", "absmax2", "offset") if config["bits"] == 4 else ("q", "scale")

        prequantised = getattr(weight, PREQUANTISED, None)  # a bitsandbytes layer's own NF4 tensors
        if prequantised is not None and config["bits"] != 4:
            raise GraftError(f"{site.key} holds bitsandbytes NF4 weights: quantize it with bits=4")

        def make(name: str):
            if prequantised is not None:
                return lambda: prequantised[name]
            return lambda: state.setdefault("all", quantize_weight(weight, config["bits"]))[name]

        with editor.before(anchor):
            params = {n: editor.param(n, make(n), trainable=False) for n in names}
            dequant = self._dequant_nodes(editor, params, shape, config["bits"])
            if dtype != torch.float32:
                dequant = editor.call(aten._to_copy.default, dequant, dtype=dtype)
        graft_tag(dequant).update(role="weight", weight=weight_node.target, shape=list(shape), bits=config["bits"],
                                  dtype=str(dtype).removeprefix("torch."), state=list(names))
        anchor.replace_input_with(weight_node, dequant)
        if not weight_node.users:
            editor.graph.erase_node(weight_node)

    @staticmethod
    def _dequant_nodes(editor: Editor, p: dict[str, fx.Node], shape: tuple[int, ...], bits: int) -> fx.Node:
        if bits == 8:
            q = editor.call(aten._to_copy.default, p["q"], dtype=torch.float32)
            return editor.call(aten.view.default, editor.call(aten.mul.Tensor, q, p["scale"]), list(shape))
        numel = math.prod(shape)
        blocks = -(-numel // BLOCK)
        padded = blocks + (-blocks % ABSMAX_BLOCK)
        dynamic = editor.param("dynamic_code", lambda: DYNAMIC_CODE.clone(), trainable=False)
        nf4 = editor.param("nf4_code", lambda: NF4_CODE.clone(), trainable=False)
        # absmax = DYNAMIC[qabsmax] * absmax2 (per 256 blocks) + offset           # (blocks,)
        levels = editor.call(aten.index.Tensor, dynamic,
                             [editor.call(aten._to_copy.default, p["qabsmax"], dtype=torch.int64)])
        if padded != blocks:
            levels = editor.call(aten.constant_pad_nd.default, levels, [0, padded - blocks], 0.0)
        levels = editor.call(aten.view.default, levels, [-1, ABSMAX_BLOCK])
        scaled = editor.call(aten.mul.Tensor, levels, editor.call(aten.view.default, p["absmax2"], [-1, 1]))
        scaled = editor.call(aten.view.default, scaled, [-1])
        if padded != blocks:
            scaled = editor.call(aten.slice.Tensor, scaled, 0, 0, blocks)
        absmax = editor.call(aten.add.Tensor, scaled, p["offset"])
        # codes: high nibble first, two per byte                                  # (n,)
        high = editor.call(aten.div.Scalar_mode, p["packed"], 16, rounding_mode="floor")  # packed >> 4
        low = editor.call(aten.remainder.Scalar, p["packed"], 16)                          # packed & 15
        codes = editor.call(aten.view.default, editor.call(aten.stack.default, [high, low], -1), [-1])
        codes = editor.call(aten._to_copy.default, codes, dtype=torch.int64)
        values = editor.call(aten.index.Tensor, nf4, [codes])                     # (n rounded up to even,)
        if blocks * BLOCK != numel + numel % 2:  # a last partial block
            values = editor.call(aten.constant_pad_nd.default, values, [0, blocks * BLOCK - numel - numel % 2], 0.0)
        values = editor.call(aten.view.default, values, [blocks, BLOCK])
        weight = editor.call(aten.mul.Tensor, values, editor.call(aten.view.default, absmax, [-1, 1]))
        weight = editor.call(aten.view.default, weight, [-1])
        if blocks * BLOCK != numel:
            weight = editor.call(aten.slice.Tensor, weight, 0, 0, numel)
        return editor.call(aten.view.default, weight, list(shape))

    # -- after grafting: release what the graph no longer reads -----------------------------------
    def after_add(self, grafted: Any, record: Any) -> None:
        """Drop the fp32 weights the canonical graph stopped reading and re-trace from a skeleton."""
        gm = grafted.graph_module
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        released = set()
        for node in gm.graph.nodes:
            tag = graft_tag(node)
            if tag and tag.get("pass") == self.name and tag.get("role") == "weight" and tag["weight"] not in read:
                released.add(tag["weight"])
        for target in released:
            owner, _, leaf = target.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            if leaf in module._parameters and not is_released(module._parameters[leaf]):
                module._parameters[leaf] = _released(module._parameters[leaf])
        model = grafted._model
        if model is not None and any(not is_released(weight_value(model, t)) for t in released):
            object.__setattr__(grafted, "_model", skeleton(model, released))

    def training_runtime(self, grafted: Any, record: Any, flat: fx.GraphModule) -> None:
        """The graph training runs: each linear over a dequantised weight becomes one
        :func:`dequant_linear` call, which keeps the packed tensors, not the weight, for backward."""
        if recompute_in_backward(flat.graph, record.adapter):
            flat.recompile()

    def quantized_state(self, weight: torch.Tensor, config: dict[str, Any]) -> dict[str, torch.Tensor]:
        return quantize_weight(weight, config["bits"])

    def dequantized_weight(self, params: dict[str, torch.Tensor], shape: tuple[int, ...],
                           config: dict[str, Any]) -> torch.Tensor:
        return dequantize_weight(params, shape, config["bits"])


def _released(param: torch.Tensor) -> nn.Parameter:
    """A stand-in of `param`'s shape, dtype and device holding one element (stride 0): tracing and
    shape lookups see the weight, memory does not."""
    return nn.Parameter(param.new_zeros(()).expand(param.shape), requires_grad=False)


def is_released(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1 and all(stride == 0 for stride in tensor.stride())


def skeleton(model: nn.Module, targets: set[str]) -> nn.Module:
    """A copy of `model` sharing every tensor except `targets` (parameter paths), which are released."""
    memo: dict[int, Any] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in targets:
            memo[id(param)] = _released(param)
        else:
            memo[id(param)] = param
    for buffer in model.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)



# -- training: the dequantised weight is recomputed in backward, not kept ---------------------------
class _DequantLinear(torch.autograd.Function):
    """``linear(x, dequant(state), bias)`` (``kind="linear"``) or ``addmm(bias, x, dequant(state))``
    (``"addmm"``, Conv1D): saves the packed state (buffers: no copy) and recomputes the weight in
    backward, so a training step holds one dequantised weight at a time instead of all of them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, kind: str, shape: tuple[int, ...],
                bits: int, dtype: torch.dtype, names: tuple[str, ...], *state: torch.Tensor) -> torch.Tensor:
        weight = _restore(state, names, shape, bits, dtype)
        ctx.save_for_backward(*state)
        ctx.recipe = (kind, shape, bits, dtype, names, x.dtype, bias is not None)
        if kind == "linear":
            return torch.nn.functional.linear(x, weight, bias)
        return torch.addmm(bias, x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        kind, shape, bits, dtype, names, x_dtype, has_bias = ctx.recipe
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _restore(ctx.saved_tensors, names, shape, bits, dtype).to(grad.dtype)
            grad_x = (grad @ weight if kind == "linear" else grad @ weight.T).to(x_dtype)  # (..., in)
        if has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return (grad_x, grad_bias) + (None,) * (5 + len(names))


def _restore(state: tuple[torch.Tensor, ...], names: tuple[str, ...], shape: tuple[int, ...], bits: int,
             dtype: torch.dtype) -> torch.Tensor:
    weight = dequantize_weight(dict(zip(names, state)), shape, bits)  # the graph's ops, the same values
    return weight if weight.dtype == dtype else weight.to(dtype)


def dequant_linear(x: torch.Tensor, bias: torch.Tensor | None, kind: str, shape: list[int], bits: int,
                   dtype: torch.dtype, names: list[str], *state: torch.Tensor) -> torch.Tensor:
    """The call training graphs make (see :class:`_DequantLinear`)."""
    return _DequantLinear.apply(x, bias, kind, tuple(shape), bits, dtype, tuple(names), *state)


def _state_nodes(dequant: fx.Node, names: list[str]) -> list[fx.Node] | None:
    """The get_attr nodes of the packed tensors the dequantise subgraph reads, in `names` order."""
    found: dict[str, fx.Node] = {}
    todo, seen = [dequant], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        tag = graft_tag(node) or {}
        if node.op == "get_attr" and tag.get("role") == "param":
            found[tag.get("param")] = node
        todo.extend(node.all_input_nodes)
    return [found[n] for n in names] if all(n in found for n in names) else None


def _linear_args(user: fx.Node, dequant: fx.Node) -> tuple[str, Any, Any] | None:
    """(kind, x, bias) when `user` is a plain linear / addmm reading `dequant` as its weight."""
    if user.kwargs:
        return None
    if user.target == aten.linear.default and len(user.args) in (2, 3) and user.args[1] is dequant \
            and user.args[0] is not dequant:
        return "linear", user.args[0], user.args[2] if len(user.args) == 3 else None
    if user.target == aten.addmm.default and len(user.args) == 3 and user.args[2] is dequant \
            and dequant not in user.args[:2]:
        return "addmm", user.args[1], user.args[0]
    return None


def recompute_in_backward(graph: fx.Graph, adapter: str) -> bool:
    """Rewrite `adapter`'s dequantised-weight linears into :func:`dequant_linear` calls (training
    graphs only: the exported and evaluated graphs keep the plain aten subgraph). True if changed."""
    changed = False
    for dequant in list(graph.nodes):
        tag = graft_tag(dequant) or {}
        if tag.get("pass") != "quantize" or tag.get("role") != "weight" or tag.get("adapter") != adapter \
                or "state" not in tag:
            continue
        state = _state_nodes(dequant, tag["state"])
        if state is None:
            continue
        dtype = getattr(torch, tag["dtype"])
        for user in list(dequant.users):
            parsed = _linear_args(user, dequant)
            if parsed is None:
                continue  # another reader (DoRA's norm, a tied weight) keeps the plain subgraph
            kind, x, bias = parsed
            with graph.inserting_before(user):
                call = graph.call_function(dequant_linear, (x, bias, kind, list(tag["shape"]), tag["bits"], dtype,
                                                            list(tag["state"]), *state))
            call.meta.update(user.meta)
            user.replace_all_uses_with(call)
            graph.erase_node(user)
            changed = True
    if changed:
        eliminate_dead_code(graph)
    return changed
