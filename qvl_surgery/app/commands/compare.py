"""``qvl-surgery compare``: two models or splits on the same inputs (polygraphy), judged as CAND's
passes declared unless a tolerance is given."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import Command, FeedArgs, kwargs_source, print_report, py

# a tolerance not given: CAND's declared one, no tighter than this floor (None: as declared)
TOLERANCE_FLOORS = (("atol", max, 1e-3), ("rtol", max, 1e-3), ("min_cosine", min, 0.999),
                    ("min_centered_cosine", None, None))


def judgement_of(path: Path):
    """The judgement recorded in a model's (or a split's part 0's) metadata."""
    from qvl_surgery.core.passbase import judgement_of_metadata
    from qvl_surgery.core.signature import head_model
    return judgement_of_metadata(head_model(path).metadata())


def tolerances(a: argparse.Namespace, judged=None) -> dict:
    """The tolerances given, the others from ``judged`` (CAND's judgement) with their floors; with
    ``judged`` None, those others as Python reading ``judged`` (``--gen-script``)."""
    out = {}
    for name, pick, floor in TOLERANCE_FLOORS:
        given = getattr(a, name)
        if given is not None:
            out[name] = given if judged is not None else repr(given)
        elif judged is None:
            out[name] = f"judged.{name}" if pick is None else f"{pick.__name__}(judged.{name}, {floor!r})"
        else:
            out[name] = getattr(judged, name) if pick is None else pick(getattr(judged, name), floor)
    return out


class Compare(Command):
    """compare two models or splits on the same inputs (polygraphy)"""
    example = ("qvl-surgery compare out/model.onnx out/fp16.onnx --emulate-fp16 --per-block\n"
               "  qvl-surgery compare out/model.onnx out/parts --image cat.jpg --save-outputs ref.json")
    feeds = FeedArgs()

    def add_arguments(self, c: argparse.ArgumentParser) -> None:
        c.add_argument("ref", type=Path, help="reference model, or split folder / manifest.json")
        c.add_argument("cand", type=Path, help="candidate model, or split folder / manifest.json")
        self.feeds.add(c)
        c.add_argument("--emulate-fp16", action="store_true",
                       help="run CAND with its fp16 (or bf16) rounding emulated (onnxruntime's CPU provider hides "
                       "fp16 error and runs no bf16)")
        c.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                       help="run CAND in this runtime (REF always in onnxruntime); openvino: its CPU plugin at f32 "
                       "precision, from the 'clients' extra (quantized QDQ files run in integer arithmetic there)")
        c.add_argument("--atol", type=float, default=None, help="default 1e-3, or looser where CAND's passes declare "
                       "it (qvl_surgery.judgement metadata: quantized files)")
        c.add_argument("--rtol", type=float, default=None, help="default as --atol")
        c.add_argument("--min-cosine", type=float, default=None, help="floor of the plain cosine (default 0.999, or "
                       "CAND's declared floor)")
        c.add_argument("--min-centered-cosine", type=float, default=None,
                       help="floor of the token-centered cosine (each output row minus the mean row; reported always; "
                            "default: the floor CAND's passes declare, e.g. 0.95 for a quantized file, else not "
                            "judged): a constant component keeps the plain cosine near 1 when the content is gone")
        c.add_argument("--per-block", action="store_true", help="also compare the hidden state after each block")
        c.add_argument("--save-outputs", metavar="FILE",
                       help="save both runs as polygraphy RunResults (use with polygraphy run --load-outputs FILE)")
        c.add_argument("--save-inputs", metavar="FILE",
                       help="save the inputs used (use with polygraphy run --load-inputs FILE)")
        c.add_argument("--json", metavar="FILE", help="write the report as JSON")

    @staticmethod
    def _options(a: argparse.Namespace) -> dict:
        """compare()'s keywords other than the feeds and the tolerances."""
        return {"emulate_fp16": a.emulate_fp16, "runtime": a.runtime, "per_block": a.per_block,
                "save_outputs": a.save_outputs, "save_inputs": a.save_inputs, "verbose": a.verbose}

    @staticmethod
    def _check(a: argparse.Namespace) -> None:
        from qvl_surgery.analysis.compare import check_tolerances
        from qvl_surgery.core.publish import check_new_file
        check_tolerances(atol=a.atol or 0.0, rtol=a.rtol or 0.0, min_cosine=a.min_cosine,
                         min_centered_cosine=a.min_centered_cosine)
        for name in ("json", "save_outputs", "save_inputs"):
            if getattr(a, name):
                check_new_file(Path(getattr(a, name)), inputs=[a.ref, a.cand], option=name)

    def run(self, a: argparse.Namespace) -> int:
        from qvl_surgery.analysis.compare import compare
        from qvl_surgery.core.inputs import load_inputs
        self._check(a)
        feeds = load_inputs(a.ref, **self.feeds.values(a), also_for=a.cand)   # one picture for both input forms
        judged = judgement_of(a.cand)   # what CAND's passes declared: int8 is not judged at fp32's tolerances
        report = compare(a.ref, a.cand, feeds=feeds, **tolerances(a, judged), **self._options(a))
        print("\n".join(report.lines()))
        if a.json:
            from qvl_surgery.core.publish import write_text
            write_text(Path(a.json), json.dumps(report.to_dict(), indent=1))
        return 0 if report.passed else 1

    def script(self, a: argparse.Namespace) -> list[str]:
        self._check(a)
        tol = tolerances(a)
        lines = ["from qvl_surgery.analysis.compare import compare", "from qvl_surgery.core.inputs import load_inputs",
                 f"feeds = load_inputs({py(a.ref)}, {self.feeds.render(a)}, also_for={py(a.cand)})"]
        if any(v.startswith(("judged", "max", "min")) for v in tol.values()):
            lines += ["from qvl_surgery.core.passbase import judgement_of_metadata",
                      "from qvl_surgery.core.signature import head_model",
                      f"judged = judgement_of_metadata(head_model({py(a.cand)}).metadata())   # what CAND's passes "
                      "declared"]
        lines += [f"report = compare({py(a.ref)}, {py(a.cand)}, feeds=feeds, "
                  + ", ".join(f"{k}={v}" for k, v in tol.items()) + f", {kwargs_source(self._options(a))})",
                  print_report()]
        if a.json:
            lines += ["import json", "from pathlib import Path", "from qvl_surgery.core.publish import write_text",
                      f"write_text(Path({a.json!r}), json.dumps(report.to_dict(), indent=1))"]
        return lines
