"""``qvl-surgery sensitivity``: per block (and per linear) the error quantizing it alone adds, for
one or several models, as sensitivity.json and a plot."""
from __future__ import annotations

import argparse
from pathlib import Path

from qvl_surgery.core.errors import BadInput

from .args import Command, ModelArgs, SchemeArgs, WriteArgs, model_and_data, py


class Sensitivity(Command):
    """per block (and per linear): the error quantizing it alone adds, as JSON and a plot; several
    models side by side (e.g. before and after smooth / rotate)"""
    example = ("qvl-surgery sensitivity out/windowed.onnx out/smoothed.onnx out/rotated.onnx -o out/sens\n"
               "  qvl-surgery sensitivity out/model.onnx -o out/sens --activations int8 --format qdq "
               "--calibrate random:8 --per-linear")
    models = ModelArgs("models", many=True, help="fp32 model(s), measured one after the other")
    scheme = SchemeArgs("scheme (as quantize; default w8a8 dynamic, format onnxruntime)")
    write = WriteArgs("output folder (sensitivity.json, sensitivity.png)", model=False)
    after = (scheme, write)

    def add_arguments(self, sv: argparse.ArgumentParser) -> None:
        self.models.add(sv)
        sv.add_argument("--label", action="append", help="a name per model for the plot (repeatable; default: file "
                        "names)")
        sv.add_argument("--inputs", metavar="SRC", help="the measurement's inputs: .npz or image file(s), comma "
                        "separated, or random:N (default: --calibrate's, else random:4)")
        sv.add_argument("--end-to-end", action="store_true", help="measure each group end to end on every input set "
                        "(one run per group and set; default: estimated in about three runs on the first set)")
        sv.add_argument("--per-linear", action="store_true", help="also each linear alone (one quantize-and-run "
                        "each: 5 per block)")

    def _checked(self, a: argparse.Namespace) -> tuple[list[Path], dict]:
        guard = checked_models(a.models, a.label)
        return guard, self.scheme.values(a)

    def run(self, a: argparse.Namespace) -> int:
        guard, scheme = self._checked(a)
        from qvl_surgery.analysis.sensitivity import sensitivity_study
        sensitivity_study(a.models, a.output, labels=a.label, inputs=a.inputs, per_linear=a.per_linear,
                          end_to_end=a.end_to_end, scheme=scheme, guard=guard, echo=print, **self.write.values(a))
        return 0

    def script(self, a: argparse.Namespace) -> list[str]:
        _, scheme = self._checked(a)
        return ["from qvl_surgery.analysis.sensitivity import sensitivity_study",
                f"sensitivity_study({py(a.models)}, {py(a.output)}, labels={py(a.label)}, inputs={a.inputs!r}, "
                f"per_linear={a.per_linear}, end_to_end={a.end_to_end}, scheme={py(scheme)}, echo=print, {self.write.render(a)})"]


def checked_models(models: list[Path], labels: list[str] | None) -> list[Path]:
    """The models (checked) and their data files; one label per model, or none."""
    if labels and len(labels) != len(models):
        raise BadInput(f"--label: give one per model ({len(models)}), or none")
    return model_and_data(models)
