"""Every pass subcommand, generated from the pass registry (:data:`passes.PASSES`): the input (a
model, or a split), the options the pass's spec declares, the write options, ``--gen-script``."""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import Command, WriteArgs


class PassCommand(Command):
    """The subcommand of one pass class."""

    def __init__(self, cls):
        self.cls, self.example = cls, cls.example
        self.write = (WriteArgs("output folder for partK.onnx(.data) and manifest.json", model=False)
                      if cls.gives == "split" else WriteArgs())
        self.after = (self.write,)

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def help(self) -> str:
        return self.cls.help

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        cls = self.cls
        if cls.takes == "model":
            p.add_argument("model", type=Path)
        else:
            p.add_argument("split_dir", type=Path, help="folder written by split (or its manifest.json)")
        g = p.add_argument_group(f"{cls.name} options")
        for o in cls.options:
            o.add_to_parser(g)

    def _pass(self, a: argparse.Namespace):
        """The pass with its options from the command line, and what it reads."""
        cls = self.cls
        p = cls(**{o.name: o.from_namespace(a) for o in cls.options})
        return p, (a.model if cls.takes == "model" else a.split_dir)

    def run(self, a: argparse.Namespace) -> int:
        """Read the input value, run the pass, write the output value, print the report."""
        from qvl_surgery.core.buckets import Buckets
        from qvl_surgery.core.passbase import Context
        from qvl_surgery.core.publish import staging
        from qvl_surgery.core.values import check_output, read_value, split_dir_of, write_value
        cls = self.cls
        p, source = self._pass(a)
        w = self.write.values(a)
        single_file = w.get("single_file", False)
        with read_value(source, cls.takes).checked() as src:
            gives = "buckets" if isinstance(src.value, Buckets) else cls.gives
            check_output(gives, a.output, overwrite=a.force, inputs=src.files, single_file=single_file)
            p.preflight({"dynamic": src.metadata.get("qvl_surgery.dynamic")})
            # scratch space a pass may need (simplify's result lives there), beside the output: for a split
            # named by its manifest.json, beside the folder, not in it (the folder must stay new or empty)
            out = split_dir_of(a.output) if cls.gives == "split" else a.output
            with staging(out) as work:
                context = Context(reference=source if cls.takes == "model" else None, progress=w["progress"],
                                  explain=a.verbose, workdir=work)
                result = p(src.value, context)
                wrote = write_value(result.value, a.output, before_publish=src.verify, inputs=src.files, **w)
        print("\n".join(result.report.lines() + wrote))
        return 0

    def script(self, a: argparse.Namespace) -> list[str]:
        from qvl_surgery.app.pipeline import gen_script
        p, source = self._pass(a)
        w = self.write.values(a)
        return gen_script(source={self.cls.takes: source}, specs=[p], output=a.output,
                          single_file=w.get("single_file", False), force=w["overwrite"]).splitlines()
