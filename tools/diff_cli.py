"""``graftlib-diff``: what the passes inserted, as text, JSON, Graphviz or a self-contained HTML page.

    graftlib-diff GRAFT_DIR [--model BASE_DIR]             # a g.save(dir) directory against its base model
    graftlib-diff base.onnx grafted.onnx                   # two ONNX exports of the same model
    graftlib-diff GRAFT_DIR --format html -o diff.html     # --format text|json|dot|html

Exit codes: 0 ok, 2 usage, 1 failure with a one-line reason on stderr (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from graftlib.tools._cli import CliFailure as _Failure
from graftlib.tools._cli import named_base, run_guarded
from graftlib.tools.export_cli import _load_hf, _read_graft

__all__ = ["main", "build_parser"]

PROG = "graftlib-diff"
EXAMPLES = """examples:
  graftlib-diff graft-dir                              # against the base model graft.json names
  graftlib-diff graft-dir --model base-dir             # against another copy of the base model
  graftlib-diff graft-dir --format html -o diff.html   # module tree and each site's branch
  graftlib-diff base.onnx grafted.onnx --format json   # two ONNX exports of one model
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Show what graftlib's passes inserted into a model.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="a saved graft directory (g.save), or two .onnx files: base then grafted")
    parser.add_argument("--model", metavar="DIR", help="the base model directory (default: the one graft.json names)")
    parser.add_argument("--format", choices=("text", "json", "dot", "html"), default="text",
                        help="text: one line per site (default); json: every node, for scripts "
                             "(GraphDiff.from_dict reads it back); dot: Graphviz (dot -Tsvg); html: one "
                             "self-contained page with the module tree and each site's branch")
    parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE (atomically) instead of stdout")
    parser.add_argument("--verbose", action="store_true", help="text: every site and node, no collapsing")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="ANSI colours in text (auto: when stdout is a terminal and NO_COLOR is unset)")
    parser.add_argument("--debug", action="store_true", help="show warnings and tracebacks")
    return parser


def _graft_diff(directory: Path, model_dir: str | None) -> Any:
    import graftlib

    meta = _read_graft(str(directory))
    if model_dir is not None:
        base_dir, class_name = Path(model_dir), (meta.get("base_model") or {}).get("class")
        if not (base_dir / "config.json").is_file():
            raise _Failure(f"--model {model_dir} is not a Hugging Face model directory (no config.json)")
    else:
        base_dir, class_name = _named_base(directory, meta)
    grafted = graftlib.load(_load_hf(base_dir, class_name), directory)
    return grafted.diff()


def _named_base(graft_dir: Path, meta: dict[str, Any]) -> tuple[Path, str | None]:
    return named_base(graft_dir, meta, f"pass it with {PROG} {graft_dir} --model BASE_DIR")


def _onnx_diff(before: Path, after: Path) -> Any:
    from graftlib.diff import diff

    for path in (before, after):
        if not path.is_file():
            raise _Failure(f"{path} does not exist")
    return diff(str(before), str(after))


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from graftlib.io import atomic_write

    sources = [Path(s) for s in args.sources]
    if len(sources) == 2 and all(s.suffix == ".onnx" for s in sources):
        result = _onnx_diff(*sources)
    elif len(sources) == 1 and sources[0].suffix != ".onnx":
        if not sources[0].is_dir():
            raise _Failure(f"{sources[0]} is not a directory: give a directory written by g.save(dir)")
        result = _graft_diff(sources[0], args.model)
    else:
        parser.error("give one saved graft directory, or two .onnx files (base, then grafted)")
    color = args.color == "always" or (args.color == "auto" and args.output is None and sys.stdout.isatty()
                                       and not os.environ.get("NO_COLOR"))
    text = result.format(args.format, color=color, verbose=args.verbose)
    if args.output:
        atomic_write(args.output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"{PROG}: wrote {args.output} ({result.format_text().splitlines()[-1]})", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_guarded(PROG, args.debug, lambda: _run(args, parser))


if __name__ == "__main__":
    sys.exit(main())
