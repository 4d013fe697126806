"""OFT: orthogonal fine-tuning, a learned block-diagonal rotation of the weight's input side.

    linear(x, W, b)     ->  linear(x, W', b)          W' = W @ blockdiag(R_1..R_r)^T
    conv2d(x, W, ...)   ->  conv2d(x, W', ...)        same on W viewed (out, in*kh*kw)
    embedding(E, i)     ->  embedding(E', i)          E' = E @ blockdiag(R_1..R_r)   (rotates the outputs)

    R_j = cayley(Q_j),  Q_j = skew(q_j)   (q_j: the b(b-1)/2 upper-triangle entries, oft_R (r, b(b-1)/2))
    cayley(Q) = I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1)  (Neumann series, n = neumann_terms; PEFT's default)
              = (I - Q)(I + Q)^-1                          (neumann=false: exact, a linear solve)

The join sits on the weight read (``get_attr`` W -> W'), so the op runs once with the rotated weight:
``linear(x, W R^T) == linear(x R, W)``, PEFT's unmerged form (it rotates x), to float rounding. Block
size ``b`` (``block_size``) or block count ``r`` (exactly one non-zero, as PEFT) is adjusted per site to
a divisor of the rotated dimension exactly as PEFT does. ``block_share``: one R for every block.
``coft``: constrained OFT, each Q projected onto ``||Q||_F <= eps / sqrt(blocks)`` in the forward
(straight-through gradient, as PEFT's in-place projection). Initialisation is PEFT's: q zero, so R = I
and W' = W exactly. Merge: ``W += W' - W`` (the delta reads the base weight); OFT is multiplicative,
so it is not mixed per row, and one weight takes one OFT adapter.

PEFT (``peft_type`` OFT, tensors ``<module>.oft_R.weight`` / ``oft_embedding_R.weight``): ``peft_import`` /
``peft_export`` below. PEFT OFT on a k x k Conv2d unfolds, rotates and folds the *input* in its unmerged
forward, which is neither its own merged model nor the base model at init; ``peft_conv=true`` reproduces
that forward exactly (passes/oft_conv.py; not mergeable) and ``from_peft`` loads k x k conv checkpoints
with it. Refused: grouped convs, dilation, ``bias`` other than "none". ``module_dropout`` is
accepted and has no effect, as in PEFT 0.21.2 (which builds its MultiplicativeDropoutLayer but never
calls it in forward).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

from graftlib.editor import Editor, graft_tag
from graftlib.errors import GraftError, LoadError
from graftlib.registry import Method, Option, positive, register
from graftlib.sites import Site
from graftlib.spec import GraftCall

from .oft_conv import unfold_rotate_fold
from ._weight_delta import (PEFT_PREFIX, check_options, float_text, peft_sites, peft_spec_regex, site_paths,
                            target_modules)

__all__ = ["OFT", "oft_blocks", "oft_rotation", "peft_import", "peft_export"]

aten = torch.ops.aten
_WEIGHT_ARG = {"linear": 1, "conv": 1, "embedding": 0}


# -- block geometry (PEFT's OFTLayer.update_layer / adjust_oft_parameters) ----------------------
def _adjust(dim: int, value: int) -> int:
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and dim % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def rotated_dim(site: Site) -> int:
    """The dimension OFT rotates: in features, in*kh*kw for conv2d, the embedding dim."""
    if site.kind == "embedding":
        return site.out_features
    if site.kind == "conv":
        kh, kw = site.conv["kernel"]
        return site.in_features * kh * kw
    return site.in_features


def oft_blocks(site: Site, config: dict[str, Any]) -> tuple[int, int]:
    """(number of blocks r, block size b) at `site`, ``r * b`` = the rotated dimension."""
    dim, r, size = rotated_dim(site), config["r"], config["block_size"]
    if r == 0:
        size = size if dim % size == 0 and size <= dim else _adjust(dim, size)
        return dim // size, size
    r = r if dim % r == 0 and r <= dim else _adjust(dim, r)
    return r, dim // r


# -- the rotation, eager (merge, tests) ---------------------------------------------------------
def _skew(vec: torch.Tensor, size: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    matrix = vec.new_zeros(vec.shape[0], size, size)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def oft_rotation(vec: torch.Tensor, size: int, config: dict[str, Any]) -> torch.Tensor:
    """R (blocks, b, b) from oft_R (blocks, b(b-1)/2), as PEFT's OFTRotationModule computes it."""
    q = _skew(vec, size)
    if config["coft"]:
        eps = config["eps"] / math.sqrt(q.shape[0])
        norm = torch.linalg.norm(q, dim=(1, 2), keepdim=True)
        q = torch.where(norm <= eps, q, eps * (q / norm))
    eye = torch.eye(size, dtype=vec.dtype, device=vec.device).repeat(q.shape[0], 1, 1)
    if not config["neumann"]:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    terms, rotation = config["neumann_terms"], eye
    if terms > 1:
        rotation = rotation + 2.0 * q
        if terms > 2:
            power = q @ q
            rotation = rotation + 2.0 * power
            for _ in range(3, terms - 1):
                power = power @ q
                rotation = rotation + 2.0 * power
            rotation = rotation + power @ q
    return rotation


def _rotate_eager(site: Site, weight: torch.Tensor, rotation: torch.Tensor, blocks: int) -> torch.Tensor:
    if site.kind == "embedding":
        vocab, dim = weight.shape
        parts = weight.reshape(vocab, blocks, -1).permute(1, 0, 2)                      # (r, vocab, b)
        return torch.bmm(parts, rotation).permute(1, 0, 2).reshape(vocab, dim)
    flat = weight.reshape(weight.shape[0], -1)                                          # (out, in*k*k)
    parts = flat.reshape(flat.shape[0], blocks, -1).permute(1, 0, 2)                   # (r, out, b)
    return torch.bmm(parts, rotation.transpose(1, 2)).permute(1, 0, 2).reshape(weight.shape)


@register
class OFT(Method):
    name = "oft"
    site_kinds = ("linear", "conv", "embedding")
    mergeable = True
    delta_reads_weight = True
    options = {
        "block_size": Option(32, (int,), help="rotation block size b (0: give r); adjusted to a divisor"),
        "r": Option(0, (int,), help="number of blocks (0: from block_size); adjusted to a divisor"),
        "block_share": Option(False, (bool,), help="one rotation shared by all blocks"),
        "coft": Option(False, (bool,), help="constrained OFT: ||Q|| <= eps"),
        "eps": Option(6e-5, (float,), positive, help="COFT's bound"),
        "neumann": Option(True, (bool,), help="Cayley by a Neumann series (PEFT's use_cayley_neumann)"),
        "neumann_terms": Option(5, (int,), positive, help="terms of the Neumann series"),
        "peft_conv": Option(False, (bool,), help="k x k Conv2d: PEFT's unmerged forward (unfold, rotate and fold "
                                                 "the input; passes/oft_conv.py), not mergeable"),
    }

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        if config["r"] < 0 or config["block_size"] < 0 or (config["r"] == 0) == (config["block_size"] == 0):
            key = "r" if "r" in call.options else "block_size"
            raise call.option_error(key, f"give exactly one of block_size (> 0) and r (> 0), the other 0 "
                                         f"(got block_size={config['block_size']}, r={config['r']})")

    def check_site(self, call: GraftCall, site: Site, config: dict[str, Any]) -> None:
        if site.part is not None:
            raise call.error(f"cannot graft oft on {site.key}: a slice of a fused projection")
        if site.kind == "conv":
            conv = site.conv
            if conv["dims"] != 2:
                raise call.error(f"not supported: oft on the Conv{conv['dims']}d {site.path} (graftlib's oft "
                                 "handles Linear, Conv2d and Embedding)")
            if conv["groups"] != 1 or tuple(conv["dilation"]) != (1, 1) or conv["kernel"][0] != conv["kernel"][1]:
                raise call.error(f"cannot graft oft on {site.path}: grouped, dilated or non-square convolutions "
                                 "are not supported (as in PEFT)")

    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        anchor = editor.anchor
        weight = anchor.args[_WEIGHT_ARG[site.kind]]
        tag = graft_tag(weight)
        if tag and tag.get("pass") == self.name:
            if tag.get("adapter") == editor.adapter:
                return  # a module called twice: its weight is already rotated
            raise GraftError(f"{site.path} already has the OFT adapter {tag.get('adapter')!r}; one weight takes "
                             "one OFT adapter (rotations compose, their deltas do not add)")
        _check_private(weight, site)
        blocks, size = oft_blocks(site, config)
        with editor.before(anchor):
            vec = editor.param("oft_R", lambda: torch.zeros(1 if config["block_share"] else blocks,
                                                            size * (size - 1) // 2))    # (r or 1, b(b-1)/2)
            rotation = self._rotation(editor, vec, size, config)                    # (r or 1, b, b)
            if config["block_share"]:
                rotation = editor.call(aten.expand.default, rotation, [blocks, size, size])
            if _input_side(site, config):
                return unfold_rotate_fold(editor, site, rotation, blocks, size)
            rotated = self._rotate(editor, site, weight, rotation, blocks, size)
            editor.join(weight, aten.expand_as.default, rotated, weight)           # W' stands for W

    @staticmethod
    def _rotation(editor: Editor, vec: fx.Node, size: int, config: dict[str, Any]) -> fx.Node:
        call = editor.call
        device, dtype = vec.meta["val"].device, vec.meta["val"].dtype
        count = vec.meta["val"].shape[0]
        upper = call(aten.triu_indices.default, size, size, 1, device=device)           # (2, n)
        flat_index = call(aten.add.Tensor, call(aten.mul.Tensor, call(aten.select.int, upper, 0, 0), size),
                          call(aten.select.int, upper, 0, 1))
        zeros = call(aten.new_zeros.default, vec, [count, size * size])
        matrix = call(aten.view.default, call(aten.index_copy.default, zeros, 1, flat_index, vec),
                      [count, size, size])
        q = call(aten.sub.Tensor, matrix, call(aten.transpose.int, matrix, 1, 2))       # skew (r, b, b)
        if config["coft"]:
            eps = config["eps"] / math.sqrt(count)
            norm = call(aten.linalg_vector_norm.default, q, 2, [1, 2], True)
            projected = call(aten.where.self, call(aten.le.Scalar, norm, eps), q,
                             call(aten.mul.Tensor, call(aten.div.Tensor, q, norm), eps))
            # forward value: the projection; gradient: straight through (PEFT projects the weight in place)
            q = call(aten.add.Tensor, q, call(aten.detach.default, call(aten.sub.Tensor, projected, q)))
        eye = call(aten.expand.default, call(aten.eye.default, size, dtype=dtype, device=device),
                   [count, size, size])
        if not config["neumann"]:
            return call(aten.linalg_solve.default, call(aten.add.Tensor, eye, q), call(aten.sub.Tensor, eye, q),
                        left=False)
        terms, rotation = config["neumann_terms"], eye
        if terms > 1:
            rotation = call(aten.add.Tensor, rotation, q, alpha=2.0)
            if terms > 2:
                power = call(aten.bmm.default, q, q)
                rotation = call(aten.add.Tensor, rotation, power, alpha=2.0)
                for _ in range(3, terms - 1):
                    power = call(aten.bmm.default, power, q)
                    rotation = call(aten.add.Tensor, rotation, power, alpha=2.0)
                rotation = call(aten.add.Tensor, rotation, call(aten.bmm.default, power, q))
        return rotation

    @staticmethod
    def _rotate(editor: Editor, site: Site, weight: fx.Node, rotation: fx.Node, blocks: int, size: int) -> fx.Node:
        call = editor.call
        shape = list(weight.meta["val"].shape)
        rows = shape[0]
        if site.kind == "embedding":
            parts = call(aten.permute.default, call(aten.view.default, weight, [rows, blocks, size]), [1, 0, 2])
            turned = call(aten.bmm.default, parts, rotation)                                # (r, vocab, b)
        else:
            parts = call(aten.permute.default, call(aten.view.default, weight, [rows, blocks, size]), [1, 0, 2])
            turned = call(aten.bmm.default, parts, call(aten.transpose.int, rotation, 1, 2))  # (r, out, b)
        back = call(aten.permute.default, turned, [1, 0, 2])
        return call(aten.reshape.default, back, shape)

    def delta(self, site: Site, params: dict[str, torch.Tensor], config: dict[str, Any],
              weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise GraftError("oft's delta needs the base weight (W' - W)")
        if _input_side(site, config):
            raise GraftError(f"oft(peft_conv=true) on {site.path} is not mergeable: PEFT's unmerged k x k conv "
                             "forward (unfold, rotate, fold the input) is no weight change; keep it unmerged")
        blocks, size = oft_blocks(site, config)
        rotation = oft_rotation(params["oft_R"].detach(), size, config)
        if config["block_share"]:
            rotation = rotation.expand(blocks, size, size)
        weight = weight.detach()
        return _rotate_eager(site, weight, rotation, blocks) - weight


def _input_side(site: Site, config: dict[str, Any]) -> bool:
    """PEFT's unfold-rotate-fold of the input (a k x k conv with peft_conv), rather than a weight rotation."""
    return site.kind == "conv" and bool(config.get("peft_conv")) and tuple(site.conv["kernel"]) != (1, 1)


def _check_private(weight: fx.Node, site: Site) -> None:
    """The weight read must feed only this site's op(s): a tied weight would rotate elsewhere too."""
    for user in weight.users:
        stack = user.meta.get("nn_module_stack") or {}
        path = str(list(stack.values())[-1][0]) if stack else ""
        if path != site.path and not graft_tag(user):
            raise GraftError(f"cannot graft oft on {site.path}: its weight {site.weight} is also read by "
                             f"{path or user.name} (tied weights)")


# -- PEFT conversion -------------------------------------------------------------------------------
_HANDLED = {"r", "oft_block_size", "block_share", "coft", "eps", "use_cayley_neumann", "num_cayley_neumann_terms",
            "init_weights", "fan_in_fan_out", "bias"}


def peft_import(config: dict[str, Any], state: dict[str, torch.Tensor],
                model: nn.Module) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """A PEFT OFT checkpoint as ``oft(re:"...", block_size=|r=, ...)`` plus its tensors."""
    check_options(config, _HANDLED | {"module_dropout"}, "OFT checkpoint")  # inert in PEFT 0.21.2's forward
    if config.get("bias", "none") != "none":
        raise LoadError(f"OFT checkpoint: not supported: bias={config['bias']!r} (trained biases of the base model)")
    paths = peft_sites(config, model, (nn.Linear, nn.Conv2d, nn.Embedding), "oft")
    modules = dict(model.named_modules())
    peft_conv = any(isinstance(modules[p], nn.Conv2d) and tuple(modules[p].kernel_size) != (1, 1) for p in paths)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    wanted = {f"{PEFT_PREFIX}{p}.{'oft_embedding_R' if isinstance(modules[p], nn.Embedding) else 'oft_R'}.weight": p
              for p in paths}
    for key, tensor in state.items():
        if key not in wanted:
            raise LoadError(f"unexpected tensor {key!r}: not the oft_R of a module the config targets")
        tensors[wanted[key]] = {"oft_R": tensor}
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise LoadError(f"tensor {missing[0]!r} is missing; the config targets {wanted[missing[0]]}")
    r, size = int(config.get("r", 0) or 0), int(config.get("oft_block_size", 0) or 0)
    options = [peft_spec_regex(paths), f"block_size={size}", f"r={r}",
               f"block_share={'true' if config.get('block_share') else 'false'}",
               f"coft={'true' if config.get('coft') else 'false'}", f"eps={float_text(config.get('eps', 6e-5))}",
               f"neumann={'true' if config.get('use_cayley_neumann', True) else 'false'}",
               f"neumann_terms={int(config.get('num_cayley_neumann_terms', 5))}"]
    if peft_conv:  # PEFT's unmerged k x k conv forward (passes/oft_conv.py)
        options.append("peft_conv=true")
    return f"oft({', '.join(options)})", tensors


def peft_export(grafted: Any, record: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One OFT adapter as PEFT's adapter_config dict and ``adapter_model`` tensors."""
    from graftlib.select import SiteIndex

    paths = site_paths(record)
    index = SiteIndex.build(grafted.base_graph_module)
    tensors = grafted.store.tensors(record.adapter)
    state = {}
    for path in paths:
        site = index.by_key(path)
        if site.kind == "conv" and tuple(site.conv["kernel"]) != (1, 1) and not record.config.get("peft_conv"):
            raise GraftError(f"not supported: saving OFT on the k x k convolution {path} in PEFT's format (PEFT's "
                             "unmerged forward there is not this rotation); use g.save(dir)")
        name = "oft_embedding_R" if site.kind == "embedding" else "oft_R"
        state[f"{PEFT_PREFIX}{path}.{name}.weight"] = tensors[path]["oft_R"].detach()
    config = record.config
    return {"peft_type": "OFT", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "r": config["r"], "oft_block_size": config["block_size"], "module_dropout": 0.0,
            "target_modules": target_modules(grafted, paths), "fan_in_fan_out": False, "bias": "none",
            "exclude_modules": None, "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "modules_to_save": None, "coft": bool(config["coft"]), "eps": config["eps"],
            "block_share": bool(config["block_share"]), "use_cayley_neumann": bool(config["neumann"]),
            "num_cayley_neumann_terms": config["neumann_terms"], "peft_version": _peft_version()}, state


def _peft_version() -> str:
    """PEFT warns on Cayley-Neumann checkpoints below 0.18.0; write the version they follow."""
    return "0.21.2"
