"""``qvl-surgery``: the top-level parser and the way out (exit codes, one-line errors, signals).
Each subcommand is a module of :mod:`qvl_surgery.app.commands`: its parser and argument groups, its
mapping onto one library call, its report and its ``--gen-script``. Bad input: one line, exit 2. A
failed tolerance: exit 1. Interrupted: 130 (SIGINT) or 143 (SIGTERM), nothing left behind.
"""
from __future__ import annotations

import argparse
import logging
import sys

from qvl_surgery import __version__
from qvl_surgery.app.commands import AFTER_PASSES, BEFORE_PASSES, commands
from qvl_surgery.core.errors import BadInput, QvlError

log = logging.getLogger("qvl_surgery")

# Examples of the commands that are not passes; a pass carries its own (Pass.example).
EXAMPLES = {c.name: c.example for c in (*BEFORE_PASSES, *AFTER_PASSES)}


# CLI-level parameters that are not pass options; pass options come from their specs
CLI_FLAGS = {"overwrite": "--force", "force": "--force", "random_init": "--random-init", "image_size": "--image-size",
             "inputs": "--inputs", "image": "--image", "video": "--video", "per_block": "--per-block",
             "runtime": "--runtime", "fp16": "--fp16", "passes": "--passes", "single_file": "--single-file",
             "dynamic": "--dynamic", "dataset": "--dataset", "keep_from": "--keep-from", "rknn_step1": "--rknn-step1",
             "label": "--label", "calibrate": "--calibrate", "output": "-o", "atol": "--atol", "rtol": "--rtol",
             "min_cosine": "--min-cosine", "min_centered_cosine": "--min-centered-cosine", "json": "--json",
             "save_outputs": "--save-outputs", "save_inputs": "--save-inputs", "buckets": "--buckets",
             "max_pixels": "--max-pixels", "image_layout": "--image-layout"}


def flag_of(name: str) -> str | None:
    """The CLI flag of a library parameter (errors name parameters; the CLI shows its flags)."""
    from passes import option_flag
    return CLI_FLAGS.get(name) or option_flag(name)


class _Parser(argparse.ArgumentParser):
    """argparse's refusals as every other refusal here: one line naming the problem, exit 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qvl-surgery", description="Export the Qwen2.5-VL vision encoder to ONNX once "
                                "and run graph passes on that file.")
    p.add_argument("--version", action="version", version=f"qvl-surgery {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug log (passes explain what did not match)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands():
        command.add_to(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except Exception as e:  # a pass whose spec cannot become flags: name it, not a traceback per subcommand
        print(f"qvl-surgery: error: cannot build the command line ({type(e).__name__}: {e}); a pass's spec is "
              "broken", file=sys.stderr)
        return 2
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:   # --help, --version, or argparse's one-line refusal (_Parser.error)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from qvl_surgery.core.publish import Terminated
    restore = _on_sigterm_raise(Terminated)
    try:
        return a.func(a)
    except BadInput as e:
        print(f"qvl-surgery {a.command}: error: {e.render(flag_of)}", file=sys.stderr)
        return e.exit_code
    except QvlError as e:
        print(f"qvl-surgery {a.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # unwritable folder, full disk, ...: the output was not published
        where = f"{e.filename}: " if e.filename else ""
        print(f"qvl-surgery {a.command}: error: {where}{e.strerror or e}; nothing was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every output is staged in a hidden folder and published by rename at the end
        print(f"qvl-surgery {a.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except Terminated:   # SIGTERM: the same way out as SIGINT (staging removed by the finally blocks)
        print(f"qvl-surgery {a.command}: terminated; no output was left behind", file=sys.stderr)
        return 143
    finally:
        restore()


def _on_sigterm_raise(exc: type[BaseException]):
    """SIGTERM raises ``exc`` in the main thread (as SIGINT raises KeyboardInterrupt), so staging
    folders are removed on the way out; returns what restores the previous handler."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise exc()
    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
