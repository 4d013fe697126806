"""ONNX export of a grafted module, verified against PyTorch before the file appears.

    g = lora(q,v) on W             merge          freeze_for_export           torch.onnx (dynamo)
    linear(x, W) + s * B(A(x))  ----------->  linear(x, W + s * B @ A)  ------------------>  model.onnx
    prompt MLP(E) (P-tuning)        kept          constant E' = MLP(E)        batch, sequence dynamic

then onnxruntime runs the file on fresh inputs at two shapes other than the trace's and every output is
compared with the grafted module in PyTorch (the unmerged original: the check covers the merge too).

- Mergeable adapters (LoRA, AdaLoRA) fold into the weights (``merge=True``); the others (adapters,
  fusion, prefix, prompt) stay as graph nodes. A Method may define ``freeze_for_export(grafted,
  record)``; it is called on a private copy of the module to replace a reparameterising encoder by its
  value.
- The eval-mode runtime graph is exported with ``torch.onnx.export(dynamo=True, optimize=False)``
  (the legacy exporter silently produced wrong decoder outputs; ``optimize`` merges equal initialisers
  and loses names). Input names are the traced keyword inputs, output names the model output's fields.
- Batch (dim 0 of every input) and sequence (dim 1 of id / mask / ``*_embeds`` inputs; ``decoder_*``
  inputs get ``decoder_sequence``) are dynamic unless ``dynamic=False``; other dims stay static.
- The file is written to a temporary directory beside ``path``, verified there, then renamed into
  place: a failed export or verification leaves nothing at ``path``. Models above
  ``EXTERNAL_DATA_BYTES`` of weights (or ``external_data=True``) keep their weights in
  ``<name>.data`` next to the ``.onnx`` file.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import glob
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import GraftError
from .grafted import Grafted
from .io import clean_staging
from .onnx_ops import onnx_translations
from .registry import get_method
from .runtime import build_module, copy_graph, op_histogram, specialise
from .safety import TRACE_LOCK
from .trace import trace

__all__ = ["export_onnx", "ExportReport", "DEFAULT_TOLERANCE", "EXTERNAL_DATA_BYTES"]

DEFAULT_TOLERANCE = 1e-4
EXTERNAL_DATA_BYTES = 1_500_000_000  # weights above this go to an external data file
_BASE_OPS: "weakref.WeakKeyDictionary[fx.Graph, dict[tuple, dict[str, int]]]" = weakref.WeakKeyDictionary()


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how it checked it."""

    path: str
    file_size: int                      # bytes, .onnx plus any external data file
    external_data: bool
    opset: int
    merged: list[str]                   # adapters folded into the weights
    kept: list[str]                     # adapters exported as graph nodes
    frozen: list[str]                   # adapters whose encoders were folded to constants
    inputs: dict[str, list[int | str]]  # ONNX input shapes ("batch", "sequence" are dynamic)
    outputs: list[str]
    ops: dict[str, int]                 # ONNX op-type histogram of the export
    ops_added: dict[str, int]           # ops minus the base model's export (negative: removed)
    base_parameters: int
    adapter_parameters: int             # of the exported (active) adapters, before merging
    exported_parameters: int            # elements of the ONNX initialisers
    buffers: dict[str, int] = field(default_factory=dict)  # initialisers that are buffers -> elements
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # shape label -> max |ORT - torch|
    tolerance: float = DEFAULT_TOLERANCE
    timings: dict[str, float] = field(default_factory=dict)       # step -> seconds

    @property
    def verified(self) -> bool:
        return bool(self.max_abs_diff)

    def _exported_note(self) -> str:
        """What the exported count holds besides parameters: buffers (position ids, batch-norm statistics);
        merged adapters are inside the base weights."""
        notes = []
        if self.merged:
            notes.append("merged adapters are inside the base weights")
        if self.buffers:
            names = ", ".join(name.rsplit(".", 1)[-1] for name in list(self.buffers)[:3])
            more = ", ..." if len(self.buffers) > 3 else ""
            notes.append(f"includes {sum(self.buffers.values()):,} buffer elements ({names}{more})")
        return f" ({'; '.join(notes)})" if notes else ""

    def __str__(self) -> str:
        added = ", ".join(f"{op} {n:+d}" for op, n in self.ops_added.items()) or "none (same ops as the base)"
        lines = [
            f"wrote {self.path} ({format_size(self.file_size)}{', external data' if self.external_data else ''}, "
            f"opset {self.opset})",
            f"  inputs:      {', '.join(f'{k} {_shape(v)}' for k, v in self.inputs.items())}",
            f"  outputs:     {', '.join(self.outputs)}",
            f"  merged:      {', '.join(self.merged) or '-'}; kept as nodes: {', '.join(self.kept) or '-'}"
            + (f"; frozen: {', '.join(self.frozen)}" if self.frozen else ""),
            f"  ops added vs base: {added}  ({sum(self.ops.values())} nodes)",
            f"  parameters:  base {self.base_parameters:,}, adapters {self.adapter_parameters:,}, "
            f"exported {self.exported_parameters:,}{self._exported_note()}",
        ]
        if self.max_abs_diff:
            diffs = "; ".join(f"{label}: {diff:.2e}" for label, diff in self.max_abs_diff.items())
            lines.append(f"  verified with onnxruntime (tolerance {self.tolerance:g}): max-abs-diff {diffs}")
        else:
            lines.append("  not verified (verify=False)")
        lines.append("  time:        " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


def format_size(n: float) -> str:
    """Bytes as a short human-readable size: 512 B, 88.4 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _shape(dims: list[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


# -- progress -----------------------------------------------------------------------------------
class _Steps:
    """Timed steps on stderr when `show`: a tqdm line redrawn in place on a terminal; elsewhere (a log
    file, a pipe, CI) one plain line per step, so a log holds no carriage-return fragments."""

    def __init__(self, show: bool, total: int):
        self.timings: dict[str, float] = {}
        self.total, self.index = total, 0
        self._bar = None
        self._lines = show and not _is_terminal(sys.stderr)
        if show and not self._lines:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, leave=False, bar_format="{desc} [{elapsed}]")

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.index += 1
        if self._bar is not None:
            self._bar.set_description_str(f"graftlib export: {name}")
        elif self._lines:
            print(f"graftlib export: [{self.index}/{self.total}] {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            if self._bar is not None:
                self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence torch.onnx's per-step prints and its torchvision/deprecation warnings (and onnx_ir's notes on
    empty attribute lists, e.g. the MoE models' ``new_ones(x, [])`` in their causal masks)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# -- preparing the module -------------------------------------------------------------------------
def _as_grafted(module: nn.Module, example_inputs: Any, dynamic: bool) -> Grafted:
    if isinstance(module, Grafted):
        if dynamic and not module._traced.dynamic:
            raise GraftError("this module was traced with dynamic=False, so its graph only runs at the "
                             "trace's shapes: export with dynamic=False (graftlib-export --static) or "
                             "graft with dynamic=True")
        return module
    if not isinstance(module, nn.Module):
        raise GraftError(f"export_onnx takes a graftlib.Grafted or torch.nn.Module, got {type(module).__name__}")
    return Grafted(trace(module, example_inputs, dynamic), module)


def _export_copy(g: Grafted, merge: bool) -> tuple[Grafted, list[str], list[str]]:
    """A private eval-mode copy: merged (if asked) and with prompt encoders frozen to constants.

    Returns the copy, the adapters merged into weights and those whose ``freeze_for_export`` changed
    the graph. Records are deep-copied first so a hook's bookkeeping stays on the copy.
    """
    target = g.merge(inplace=False) if merge else g._derived(copy_graph(g.graph))
    target.records = [dataclasses.replace(r, config=copy.deepcopy(r.config), extras=copy.deepcopy(r.extras))
                      for r in target.records]
    target.eval()
    frozen = []
    for record in list(target.records):
        method = get_method(record.method)
        if hasattr(method, "freeze_for_export"):
            before = op_histogram(target.graph)
            method.freeze_for_export(target, record)
            if op_histogram(target.graph) != before:
                frozen.append(record.adapter)
    target._invalidate()
    merged = [a for a in g.adapters if a not in target.adapters]
    return target, merged, frozen


def _export_inputs(g: Grafted, example_inputs: Any) -> dict[str, Any]:
    if isinstance(example_inputs, Mapping):
        kwargs = {k: v for k, v in example_inputs.items() if k in g.input_names}
        missing = [k for k in g.input_names if k not in kwargs]
        if missing:
            raise GraftError(f"example_inputs lack {', '.join(missing)}: the module was traced with "
                             f"inputs ({', '.join(g.input_names)})")
    else:
        kwargs = {k: g._traced.example_inputs[k] for k in g.input_names}
    return g._traced.graph_inputs({**kwargs, **g._traced.constants})


def _dim_names(name: str, value: torch.Tensor) -> dict[int, str]:
    """Which dims of an input are dynamic, and their names."""
    dims = {0: "batch"} if value.dim() >= 1 else {}
    token_like = value.dim() == 2 and not value.is_floating_point()
    if token_like or (value.dim() == 3 and name.endswith("embeds")):
        dims[1] = "decoder_sequence" if name.startswith("decoder_") else "sequence"
    return dims


def _dynamic_shapes(kwargs: Mapping[str, Any], named: bool) -> dict[str, Any]:
    dims = {name: Dim(name) for name in ("batch", "sequence", "decoder_sequence")}
    shapes: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            shapes[key] = {axis: dims[label] if named else Dim.AUTO
                           for axis, label in _dim_names(key, value).items()}
        else:
            shapes[key] = None
    return shapes


def _output_names(module: nn.Module, kwargs: Mapping[str, Any]) -> list[str]:
    with torch.no_grad():
        out = module(**kwargs)
    leaves = pytree.tree_flatten_with_path(out)[0]
    names = []
    for path, value in leaves:
        if not isinstance(value, torch.Tensor):
            continue
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        name = ".".join(parts) or "output"
        if name[0].isdigit():
            name = f"output_{name}"
        while name in names:
            name += "_"
        names.append(name)
    return names


# -- export ---------------------------------------------------------------------------------------
def _to_onnx(module: fx.GraphModule, kwargs: dict[str, Any], opset: int | None, dynamic: bool,
             output_names: list[str] | None) -> Any:
    """torch.onnx (dynamo) export; named batch/sequence dims, falling back to Dim.AUTO on a constraint."""
    attempts = [True, False] if dynamic else [None]
    for named in attempts:
        shapes = _dynamic_shapes(kwargs, named) if named is not None else None
        try:
            with TRACE_LOCK, _quiet_exporter():  # torch.onnx runs torch.export: one at a time
                program = torch.onnx.export(module, (), kwargs=kwargs, dynamo=True, optimize=False,
                                            opset_version=opset, dynamic_shapes=shapes, verbose=False,
                                            output_names=output_names,
                                            custom_translation_table=onnx_translations())  # MoE grouped mm
        except Exception as exc:  # noqa: BLE001 - the retry or the message below handles it
            if named:
                continue
            raise GraftError(f"torch.onnx could not export the graph: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from exc
        if dynamic:
            _rename_dims(program.model, kwargs)
        return program
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _rename_dims(model: Any, kwargs: Mapping[str, Any]) -> None:
    """Give the exporter's symbols (s18, s41) the names batch / sequence in every value's shape."""
    import onnx_ir as ir

    mapping: dict[str, str] = {}
    for value in model.graph.inputs:
        example = kwargs.get(value.name)
        if not isinstance(example, torch.Tensor) or value.shape is None:
            continue
        for axis, label in _dim_names(value.name, example).items():
            dim = value.shape[axis]
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in mapping:
                mapping[dim.value] = label if label not in mapping.values() else f"{value.name}_{axis}"

    def rename(value: Any) -> None:
        if value is None or value.shape is None:
            return
        dims = [ir.SymbolicDim(mapping.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d
                for d in value.shape]
        value.shape = ir.Shape(dims)

    for value in list(model.graph.inputs) + list(model.graph.outputs):
        rename(value)
    for node in model.graph.all_nodes():
        for value in node.outputs:
            rename(value)


def _histogram(model: Any) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.all_nodes()).items()))


def _base_histogram(g: Grafted, runtime: fx.GraphModule, ops: dict[str, int], kwargs: dict[str, Any],
                    opset: int | None, dynamic: bool) -> dict[str, int]:
    """ONNX ops of the base model (the unmodified trace, eval mode).

    When the exported graph has the base graph's aten ops (everything merged) it translates to the
    same ONNX ops, so the base is not exported again; otherwise it is, once per base graph (cached).
    """
    base_graph = specialise(g.base_graph, (), False)
    cache = _BASE_OPS.setdefault(g.base_graph, {})
    key = (opset, dynamic)
    if op_histogram(base_graph) == op_histogram(runtime.graph):
        return cache.setdefault(key, ops)
    if key not in cache:
        base = build_module(g.graph_module, base_graph, False)
        cache[key] = _histogram(_to_onnx(base, kwargs, opset, dynamic, None).model)
    return cache[key]


def _ops_added(ops: dict[str, int], base: dict[str, int]) -> dict[str, int]:
    diff = {op: ops.get(op, 0) - base.get(op, 0) for op in sorted(set(ops) | set(base))}
    return {op: n for op, n in diff.items() if n}


def _parameter_counts(g: Grafted) -> tuple[int, int]:
    store = {id(p) for p in g.store.parameters()}
    base = sum(p.numel() for p in g.parameters() if id(p) not in store)
    adapters = sum(p.numel() for name in g.active_adapters for p in g.store[name].parameters())
    return base, adapters


def _initialiser_elements(model: Any) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.shape is not None:
            total += math.prod(int(d) for d in value.shape)
    return total


def _initialiser_buffers(model: Any, module: nn.Module) -> dict[str, int]:
    """ONNX initialisers that are the module's buffers (not parameters): name -> elements."""
    buffers = dict(module.named_buffers())
    return {name: math.prod(int(d) for d in value.shape) for name, value in model.graph.initializers.items()
            if name in buffers and value.shape is not None}


def _weight_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# -- verification ----------------------------------------------------------------------------------
def _vocab_size(g: Grafted, name: str) -> int | None:
    config = g._traced.config
    if config is None:
        return None
    config = getattr(config, "text_config", None) or config
    key = "type_vocab_size" if name == "token_type_ids" else "vocab_size"
    size = getattr(config, key, None)
    return int(size) if isinstance(size, int) and size > 0 else None


def _fresh_input(g: Grafted, name: str, example: torch.Tensor, shape: tuple[int, ...],
                 gen: torch.Generator) -> torch.Tensor:
    """A random input like `example` at `shape`: ids in the vocabulary, masks with right padding."""
    if "mask" in name and example.dim() == 2:
        mask = torch.ones(shape, dtype=torch.long)
        seq = shape[1]
        for row in range(shape[0]):
            pad = min((row + 1) % 3, seq - 1)
            if pad:
                mask[row, seq - pad:] = 0
        return mask.to(example.dtype)
    if example.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if not example.is_floating_point():
        high = _vocab_size(g, name) if name.endswith(("input_ids", "token_type_ids")) else None
        low = int(example.min()) if example.numel() else 0
        high = high if high is not None else int(example.max()) + 1 if example.numel() else 2
        return torch.randint(low, max(high, low + 1), shape, generator=gen, dtype=example.dtype)
    return torch.randn(shape, generator=gen).to(example.dtype)


def _verify_sizes(session: Any, kwargs: Mapping[str, Any]) -> list[dict[str, int]]:
    """Two sizes for each symbolic ONNX dim, both other than the export's: n + 1, then batch 1 and
    n - 2 (n + 3 for short dims). A static export gets two fresh draws at its own shape."""
    sizes: dict[str, int] = {}
    for spec in session.get_inputs():
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str) and isinstance(kwargs.get(spec.name), torch.Tensor):
                sizes.setdefault(dim, int(kwargs[spec.name].shape[axis]))
    first = {dim: n + 1 for dim, n in sizes.items()}
    second = {dim: 1 if dim == "batch" else n - 2 if n > 3 else n + 3 for dim, n in sizes.items()}
    return [first, second]


def _fresh_inputs(g: Grafted, session: Any, kwargs: Mapping[str, Any], sizes: Mapping[str, int],
                  seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {spec.name: spec.shape for spec in session.get_inputs()}
    inputs = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            onnx_shape = shapes.get(key, ())
            shape = tuple(sizes[d] if isinstance(d, str) and d in sizes else n
                          for d, n in zip(onnx_shape, value.shape)) if onnx_shape else tuple(value.shape)
            inputs[key] = _fresh_input(g, key, value, shape, gen)
    return inputs


def _shape_label(sizes: Mapping[str, int], draw: int) -> str:
    if sizes:
        return ", ".join(f"{k}={v}" for k, v in sizes.items())
    return f"static shape, draw {draw}"


def _leaves(output: Any) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def _max_abs_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    expected, actual = expected.astype(np.float64), np.asarray(actual).astype(np.float64)
    if expected.shape != actual.shape:
        return math.inf
    both_nan = np.isnan(expected) & np.isnan(actual)
    diff = np.abs(np.where(both_nan, 0.0, expected - actual))
    return float(np.nan_to_num(diff, nan=math.inf).max()) if diff.size else 0.0


def _verify(g: Grafted, onnx_path: str, kwargs: Mapping[str, Any], output_names: list[str],
            tolerance: float, steps: _Steps) -> dict[str, float]:
    """Run onnxruntime at two fresh shapes and compare every output with `g` in PyTorch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    onnx_inputs = [i.name for i in session.get_inputs()]
    results: dict[str, float] = {}
    for draw, sizes in enumerate(_verify_sizes(session, kwargs), start=1):
        inputs = _fresh_inputs(g, session, kwargs, sizes, seed=1000 + draw)
        label = _shape_label(sizes, draw)
        with steps.step("verify"):
            with torch.no_grad():
                expected = _leaves(g(**inputs))
            actual = session.run(None, {k: inputs[k].numpy() for k in onnx_inputs})
        if len(actual) != len(expected):
            raise GraftError(f"verification failed at {label}: the ONNX model has {len(actual)} outputs, "
                             f"PyTorch {len(expected)}; no file was written")
        diffs = [_max_abs_diff(e, a) for e, a in zip(expected, actual)]
        results[label] = max(diffs, default=0.0)
        worst = max(range(len(diffs)), key=diffs.__getitem__) if diffs else None
        if worst is not None and not diffs[worst] <= tolerance:
            name = output_names[worst] if worst < len(output_names) else f"output {worst}"
            shapes = "" if expected[worst].shape == np.shape(actual[worst]) else \
                f" (ONNX shape {tuple(np.shape(actual[worst]))}, PyTorch {expected[worst].shape})"
            raise GraftError(f"verification failed: ONNX output {name!r} differs from PyTorch by "
                             f"max-abs-diff {diffs[worst]:.3g} > tolerance {tolerance:g} at {label}{shapes}; "
                             "no file was written")
    return results


# -- writing ----------------------------------------------------------------------------------------
@contextmanager
def _staging(path: Path) -> Iterator[Path]:
    """A temp directory beside `path` (same filesystem); its files are renamed into place on success.

    External data gets a name of its own generation (``model.onnx.<token>.data``, named inside the .onnx
    file) and is moved in before the .onnx file, so the .onnx file a reader opens always names a complete
    data file of its own generation; data files no .onnx names any more are removed afterwards, and so are
    the staging folders of killed exports. On failure the temp directory, and any parent directories this
    call created, are removed.
    """
    created = [p for p in reversed(path.parent.parents) if not p.exists()]
    created += [path.parent] if not path.parent.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_staging(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.graftlib-{os.getpid()}-", dir=path.parent))
    try:
        yield staging / path.name
        data_files = _name_generation(staging / path.name, path.name)
        for data in data_files:  # external data first, so a .onnx file never points at nothing
            os.replace(data, path.parent / data.name)
        os.replace(staging / path.name, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in reversed(created):
            with _suppress_oserror():
                directory.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    _remove_stale_data(path)


def _external_tensors(model: Any) -> Iterator[Any]:
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _name_generation(onnx_path: Path, name: str) -> list[Path]:
    """Rename the staged external data files to ``<name>.<token>.data`` and point the .onnx file at them."""
    data_files = [f for f in onnx_path.parent.iterdir() if f.name != onnx_path.name]
    if not data_files:
        return []
    import onnx

    token = secrets.token_hex(4)
    renames = {f.name: f"{name}.{token}.data" if i == 0 else f"{name}.{token}.{i}.data"
               for i, f in enumerate(sorted(data_files))}
    model = onnx.load(str(onnx_path), load_external_data=False)
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value in renames:
                entry.value = renames[entry.value]
    onnx.save_model(model, str(onnx_path))
    moved = []
    for old, new in renames.items():
        os.replace(onnx_path.parent / old, onnx_path.parent / new)
        moved.append(onnx_path.parent / new)
    return moved


def _written_size(path: Path) -> int:
    """Bytes of the .onnx file plus the external data files it names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    used = {e.value for t in _external_tensors(model) for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in used)


def _remove_stale_data(path: Path) -> None:
    """External data files of earlier generations of `path` that its .onnx file no longer names."""
    import onnx

    generation = re.compile(re.escape(path.name) + r"(\.[0-9a-f]{8}(\.\d+)?)?\.data")
    try:
        model = onnx.load(str(path), load_external_data=False)
        used = {e.value for t in _external_tensors(model) for e in t.external_data if e.key == "location"}
    except Exception:
        return
    for candidate in path.parent.glob(f"{glob.escape(path.name)}.*data"):
        if candidate.name not in used and generation.fullmatch(candidate.name):
            with _suppress_oserror():
                candidate.unlink()


@contextmanager
def _suppress_oserror() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


def export_onnx(module: nn.Module, path: str | os.PathLike, merge: bool = True, verify: bool = True,
                opset: int | None = None, dynamic: bool = True, example_inputs: Any = None,
                progress: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                external_data: bool | None = None, with_past: bool = False) -> ExportReport:
    """Export `module` (a :class:`graftlib.Grafted`, or a plain module, traced first) to ONNX at `path`.

    ``merge`` folds mergeable adapters into the weights (the module itself is not changed);
    ``verify`` compares onnxruntime with PyTorch on fresh inputs at two shapes and raises
    :class:`graftlib.GraftError` above ``tolerance`` (max abs diff); ``dynamic`` keeps batch and
    sequence dims symbolic; ``example_inputs`` (keyword tensors) are the export's example inputs
    (default: the trace's); ``external_data`` (default: weights above 1.5 GB) stores weights in
    ``<name>.data``. ``with_past`` exports the decoding step instead (a causal LM's KV-cache graph in
    Optimum's layout, see ``graftlib.onnx_generate``), verified by a greedy generation in onnxruntime
    equal to PyTorch's token for token. Returns an :class:`ExportReport`; prints nothing except a
    progress bar on stderr.
    """
    if tolerance < 0 or math.isnan(tolerance):
        raise GraftError(f"tolerance must be >= 0, got {tolerance}")
    path = Path(path)
    if path.is_dir():
        raise GraftError(f"{path} is a directory: give the output file name, e.g. {path / 'model.onnx'}")
    steps = _Steps(progress, total=7 if verify else 5)
    try:
        with steps.step("trace" if not isinstance(module, Grafted) else "prepare"):
            g = _as_grafted(module, example_inputs, dynamic)
        training = g.training
        g.eval()
        try:
            if with_past:
                return _export_with_past(g, path, merge, verify, opset, tolerance, external_data, steps)
            return _export(g, path, merge, verify, opset, dynamic, example_inputs, tolerance,
                           external_data, steps)
        finally:
            g.train(training)
    finally:
        steps.close()


def _export(g: Grafted, path: Path, merge: bool, verify: bool, opset: int | None, dynamic: bool,
            example_inputs: Any, tolerance: float, external_data: bool | None, steps: _Steps) -> ExportReport:
    g = g._mode_target()  # the graph traced in eval mode (g is in eval mode here)
    base_parameters, adapter_parameters = _parameter_counts(g)
    with steps.step("merge" if merge else "copy"):
        target, merged, frozen = _export_copy(g, merge)
        runtime = target.runtime_module()
    kwargs = _export_inputs(g, example_inputs if isinstance(example_inputs, Mapping) else None)
    output_names = _output_names(runtime, kwargs)
    with steps.step("export"):
        program = _to_onnx(runtime, kwargs, opset, dynamic, output_names)
    ops = _histogram(program.model)
    with steps.step("base ops"):
        base_ops = _base_histogram(g, runtime, ops, kwargs, opset, dynamic)
    big = _weight_bytes(runtime) > EXTERNAL_DATA_BYTES if external_data is None else external_data
    diffs: dict[str, float] = {}
    with _staging(path) as staged:
        with steps.step("save"):
            with _quiet_exporter():
                program.save(str(staged), external_data=big)
        if verify:
            diffs = _verify(g, str(staged), kwargs, output_names, tolerance, steps)
    size = _written_size(path)
    model = program.model
    return ExportReport(
        path=str(path), file_size=size, external_data=big,
        opset=int(model.opset_imports.get("", 0)),
        merged=merged, kept=list(target.active_adapters), frozen=frozen,
        inputs={v.name: [d if isinstance(d, int) else str(d) for d in v.shape] for v in model.graph.inputs},
        outputs=[v.name for v in model.graph.outputs],
        ops=ops, ops_added=_ops_added(ops, base_ops),
        base_parameters=base_parameters, adapter_parameters=adapter_parameters,
        exported_parameters=_initialiser_elements(model), buffers=_initialiser_buffers(model, runtime),
        max_abs_diff=diffs, tolerance=tolerance, timings=steps.timings,
    )


# -- decoding step with past (Optimum's layout) -------------------------------------------------------
VERIFY_NEW_TOKENS = 8


def _export_with_past(g: Grafted, path: Path, merge: bool, verify: bool, opset: int | None, tolerance: float,
                      external_data: bool | None, steps: _Steps) -> ExportReport:
    """The KV-cache step graph (``graftlib.generate``) as ONNX with past inputs and present outputs."""
    from .generate import step_graph, step_inputs_dynamic, virtual_token_adapters
    from .onnx_generate import past_input_names, present_output_names

    with steps.step("step graph"):
        step = step_graph(g)
        prompts = virtual_token_adapters(step)
        if prompts:
            raise GraftError(f"with_past: {', '.join(prompts)} prepend virtual tokens at the prefill only, which "
                             "one decoding graph cannot express; export without with_past, or without them")
    layout = step._traced.extras["step_layout"]
    base_parameters, adapter_parameters = _parameter_counts(step)
    with steps.step("merge" if merge else "copy"):
        target, merged, frozen = _export_copy(step, merge)
        runtime = target.runtime_module()
    kwargs = dict(step._traced.example_inputs)
    output_names = ["logits"] + present_output_names(layout.layers)
    shapes = {k: {axis: Dim.AUTO for axis in axes} for k, axes in step_inputs_dynamic(layout).items()}
    with steps.step("export"):
        try:
            with TRACE_LOCK, _quiet_exporter():
                program = torch.onnx.export(runtime, (), kwargs=kwargs, dynamo=True, optimize=False,
                                            opset_version=opset, dynamic_shapes=shapes, verbose=False,
                                            output_names=output_names)
        except Exception as exc:  # noqa: BLE001 - one message for the many types torch raises
            raise GraftError(f"torch.onnx could not export the decoding step: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from exc
    _past_names(program.model, dict(zip(layout.past, past_input_names(layout.layers))))
    big = _weight_bytes(runtime) > EXTERNAL_DATA_BYTES if external_data is None else external_data
    diffs: dict[str, float] = {}
    with _staging(path) as staged:
        with steps.step("save"), _quiet_exporter():
            program.save(str(staged), external_data=big)
        if verify:
            with steps.step("verify"):
                diffs = _verify_generation(g, str(staged), tolerance)
    model = program.model
    return ExportReport(
        path=str(path), file_size=_written_size(path), external_data=big,
        opset=int(model.opset_imports.get("", 0)), merged=merged, kept=list(target.active_adapters),
        frozen=frozen,
        inputs={v.name: [d if isinstance(d, int) else str(d) for d in v.shape] for v in model.graph.inputs},
        outputs=[v.name for v in model.graph.outputs], ops=_histogram(model), ops_added={},
        base_parameters=base_parameters, adapter_parameters=adapter_parameters,
        exported_parameters=_initialiser_elements(model), buffers=_initialiser_buffers(model, runtime),
        max_abs_diff=diffs, tolerance=tolerance, timings=steps.timings,
    )


def _past_names(model: Any, names: Mapping[str, str]) -> None:
    """Optimum's input names, and named dims: batch, sequence, past_sequence."""
    import onnx_ir as ir

    symbols: dict[str, str] = {}
    for value in model.graph.inputs:
        value.name = names.get(value.name, value.name)
        labels = {0: "batch", 1: "sequence"} if value.name in ("input_ids", "position_ids") else \
            {0: "batch", 1: "total_sequence"} if value.name == "attention_mask" else \
            {0: "batch", 2: "past_sequence"} if value.name in names.values() else {}
        for axis, label in labels.items():
            dim = value.shape[axis]
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                symbols.setdefault(dim.value, label)
    pattern = re.compile("|".join(re.escape(k) for k in sorted(symbols, key=len, reverse=True))) if symbols else None

    def rename(value: Any) -> None:
        if value is None or value.shape is None or pattern is None:
            return
        value.shape = ir.Shape([ir.SymbolicDim(pattern.sub(lambda m: symbols[m.group(0)], d.value))
                                if isinstance(d, ir.SymbolicDim) and d.value else d for d in value.shape])

    for value in list(model.graph.inputs) + list(model.graph.outputs):
        rename(value)


def _verify_generation(g: Grafted, onnx_path: str, tolerance: float) -> dict[str, float]:
    """Greedy generation in onnxruntime equals ``g.generate`` in PyTorch token for token, and the
    prefill's logits (at the prompt's tokens, not its padding) agree within `tolerance` (GraftError if
    not); returns the logits' max abs diff."""
    from .generate import prefill_inputs, step_graph, verification_prompts
    from .onnx_generate import onnx_generate, past_input_names, session_for

    session = session_for(onnx_path)
    prompts, eos, pad = verification_prompts(g)
    step = step_graph(g)
    layout = step._traced.extras["step_layout"]
    feed = prefill_inputs(step, prompts["input_ids"], prompts["attention_mask"])
    with torch.no_grad():
        expected = g.generate(**prompts, max_new_tokens=VERIFY_NEW_TOKENS, do_sample=False, num_beams=1).numpy()
        logits = step._run(feed)[0]
    rename = dict(zip(layout.past, past_input_names(layout.layers)))
    ort_logits = session.run(["logits"], {rename.get(k, k): v.numpy() for k, v in feed.items()})[0]
    keep = prompts["attention_mask"].bool().numpy()  # padded rows' logits are not defined
    diff = _max_abs_diff(logits.numpy()[keep], ort_logits[keep])
    actual = onnx_generate(session, prompts["input_ids"], prompts["attention_mask"], VERIFY_NEW_TOKENS,
                           eos_token_id=eos, pad_token_id=pad)
    if expected.shape != actual.shape or not np.array_equal(expected, actual) or not diff <= tolerance:
        raise GraftError(f"verification failed: greedy generation in onnxruntime gave {actual.tolist()}, PyTorch "
                         f"{expected.tolist()} (prefill logits max-abs-diff {diff:.3g}, tolerance {tolerance:g}); "
                         "no file was written")
    return {f"prefill logits, batch {expected.shape[0]} (greedy {VERIFY_NEW_TOKENS} tokens equal)": diff}
