"""``qvl-surgery inspect``: sizes, ops, metadata and patterns of a model, and with --activations
what its activations do to fp16 and int8."""
from __future__ import annotations

import argparse
import json

from qvl_surgery.core.errors import BadInput

from .args import Command, ModelArgs, py


class Inspect(Command):
    """sizes, ops, metadata and patterns of a model (reads no weights)"""
    example = ("qvl-surgery inspect out/model.onnx\n"
               "  qvl-surgery inspect out/model.onnx --activations --calibrate a.jpg,b.jpg")
    model = ModelArgs()

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self.model.add(p)
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.add_argument("--activations", action="store_true",
                       help="also run the fp32 model (one segment at a time) and report, per block, max |x| of the "
                       "residual and of the linear layers' inputs, fp16 headroom, and the share of values a per-tensor "
                       "int8 scale rounds to zero; flags what would overflow fp16 or be crushed by int8")
        p.add_argument("--calibrate", default=None, metavar="SRC",
                       help="inputs for --activations: .npz or image file(s), comma separated, or random:N "
                       "(default random:2)")

    @staticmethod
    def _calibrate(a: argparse.Namespace) -> str | None:
        """--activations' inputs, checked (None: no --activations)."""
        if a.calibrate is not None and not a.activations:
            raise BadInput("{calibrate}: the inputs of --activations; add --activations or drop it",
                           calibrate=a.calibrate)
        if not a.activations:
            return None
        from qvl_surgery.core.calibrate import check_calibration_source
        calibrate = a.calibrate or "random:2"
        check_calibration_source(calibrate, random_ok=True)
        return calibrate

    def run(self, a: argparse.Namespace) -> int:
        from qvl_surgery.analysis.inspection import inspect_model
        from qvl_surgery.core.values import read_value
        read_value(a.model)   # a missing path, a folder without a split, an unreadable file: one line
        r = inspect_model(a.model)
        calibrate = self._calibrate(a)
        acts = None
        if calibrate is not None:
            from qvl_surgery.analysis.outliers import activation_report
            acts = activation_report(a.model, calibrate=calibrate)
        if a.json:
            d = r.to_dict()
            if acts:
                d["activations"] = acts.to_dict()
            print(json.dumps(d, indent=1))
        else:
            print("\n".join(r.lines() + (acts.lines() if acts else [])))
        return 0

    def script(self, a: argparse.Namespace) -> list[str]:
        from qvl_surgery.core.values import read_value
        read_value(a.model)
        calibrate = self._calibrate(a)
        lines = ["from qvl_surgery.analysis.inspection import inspect_model",
                 f"report = inspect_model({py(a.model)})"]
        if calibrate is not None:
            lines += ["from qvl_surgery.analysis.outliers import activation_report",
                      f"acts = activation_report({py(a.model)}, calibrate={calibrate!r})"]
        if a.json:
            extra = ", 'activations': acts.to_dict()" if calibrate is not None else ""
            return ["import json"] + lines + [f"print(json.dumps({{**report.to_dict(){extra}}}, indent=1))"]
        return lines + ["print('\\n'.join(report.lines()" + (" + acts.lines()" if calibrate is not None else "") + "))"]
