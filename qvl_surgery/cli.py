"""``qvl-surgery``: a thin layer over the library. One function per subcommand maps its arguments
onto one library call and prints the report. Bad input: one line, exit 2. A failed tolerance: exit 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import QvlError

log = logging.getLogger("qvl_surgery")

EXAMPLES = {
    "export": "qvl-surgery export ~/Qwen2.5-VL-3B-Instruct -o out/model.onnx --image-size 448x448\n"
              "  qvl-surgery export --random-init 3b --seed 0 -o out/model.onnx",
    "inspect": "qvl-surgery inspect out/model.onnx",
    "split": "qvl-surgery split out/model.onnx --parts 3 -o out/parts",
    "merge": "qvl-surgery merge out/parts -o out/merged.onnx",
    "simplify": "qvl-surgery simplify out/model.onnx -o out/model.sim.onnx",
}


def _epilog(cmd: str) -> str:
    return "example:\n  " + EXAMPLES[cmd]


# Shared option groups --------------------------------------------------------------------------

def add_output(p: argparse.ArgumentParser, *, what: str = "output model (.onnx; its .onnx.data goes beside it)") -> None:
    p.add_argument("-o", "--output", required=True, type=Path, help=what)


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace an existing output")


# Subcommands -----------------------------------------------------------------------------------

def cmd_export(a: argparse.Namespace) -> int:
    from .config import check_image_size, parse_image_size, preset
    from .export import export
    from .weights import CheckpointWeights, RandomWeights
    from .errors import BadInput
    if (a.checkpoint is None) == (a.random_init is None):
        raise BadInput("export: give a CHECKPOINT_DIR or --random-init {tiny,3b,7b}, not both or neither")
    size = parse_image_size(a.image_size)
    if a.random_init is not None:
        weights = RandomWeights(preset(a.random_init), seed=a.seed)
    else:
        weights = CheckpointWeights(a.checkpoint)
    check_image_size(weights.cfg, size)
    report = export(weights, a.output, size, progress=not a.quiet, overwrite=a.force)
    print("\n".join(report.lines()))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect import inspect_model
    r = inspect_model(a.model)
    print(json.dumps(r.to_dict(), indent=1) if a.json else "\n".join(r.lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvl-surgery", description="Export the Qwen2.5-VL vision encoder to ONNX once "
                                "and run graph passes on that file.")
    p.add_argument("--version", action="version", version=f"qvl-surgery {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug log (passes explain what did not match)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    e = sub.add_parser("export", help="export the fp32 encoder (one .onnx + one .onnx.data)", epilog=_epilog("export"),
                       formatter_class=fmt)
    e.add_argument("checkpoint", nargs="?", type=Path, help="local transformers Qwen2.5-VL checkpoint directory")
    e.add_argument("--random-init", choices=None, metavar="{tiny,3b,7b}", help="build from a published config with random weights")
    e.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    e.add_argument("--image-size", default="448x448", help="HEIGHTxWIDTH in pixels, multiples of 28 (default 448x448)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_output(e)
    add_force(e)
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="sizes, ops, metadata and patterns of a model (reads no weights)",
                       epilog=_epilog("inspect"), formatter_class=fmt)
    i.add_argument("model", type=Path)
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=cmd_inspect)

    for register in _EXTRA_COMMANDS:
        register(sub, fmt)
    return p


# Subcommands defined next to their passes register themselves here.
_EXTRA_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return a.func(a)
    except QvlError as e:
        print(f"qvl-surgery {a.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"qvl-surgery {a.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
