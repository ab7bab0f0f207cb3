"""compare: two models (or splits) on the same inputs, through polygraphy's Comparator.

Runners are polygraphy ``BaseRunner`` subclasses, so the results are ordinary ``RunResults``
(``--save-outputs`` files work with ``polygraphy run other.onnx --onnxrt --load-outputs FILE``),
and the pass/fail verdict is polygraphy's ``CompareFunc.simple`` with the given atol/rtol, plus
a cosine-similarity floor. Outputs are returned as float32 so fp16 and fp32 models compare.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.manifest import is_manifest_path, read_manifest
from qvl_surgery.core.metrics import centered_cosine, cosine  # noqa: F401  (re-exported: compare.cosine is public API)
from qvl_surgery.core.modelfile import sibling_model
from qvl_surgery.core.signature import head_model, signature

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _with_extra_outputs(path: Path, names: list[str]):
    """The model with more graph outputs, as a hidden temporary .onnx beside it (same data file),
    removed once onnxruntime has loaded it."""
    if not names:
        yield path
        return
    proto = onnx.load(str(path), load_external_data=False)
    have = {o.name for o in proto.graph.output}
    for n in names:
        if n not in have:
            proto.graph.output.append(onnx.ValueInfoProto(name=n))
    with sibling_model(path, proto) as tmp:
        yield tmp


class QvlRunner(BaseRunner):
    """Runs a model file or a split: onnxruntime (``mode='onnxrt'``), OpenVINO's CPU plugin
    (``mode='openvino'``, a model file) or fp16 emulation (``mode='emulate-fp16'``: the rounding of
    the file's own reduced type, fp16 or bf16). Inputs are cast to the model's input dtypes; outputs
    come back as float32. ``extra_outputs`` names intermediate tensors to return too (e.g. block outputs)."""

    def __init__(self, path: str | Path, mode: str = "onnxrt", extra_outputs: list[str] | None = None,
                 name: str | None = None):
        self.path = Path(path)
        self.mode = mode
        self.extra = list(extra_outputs or [])
        kind = "chain" if is_manifest_path(self.path) else "model"
        super().__init__(name=name, prefix=f"qvl-{mode}-{kind}")
        self.signature = signature(self.path)
        self.kind = None   # what the model takes (dynamic or not), read on the first inference
        self.inputs, self.outputs = self.signature.inputs, self.signature.output_names

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for t in self.inputs:
            # polygraphy has no bfloat16: a bf16 input is fed fp32 numbers, which infer rounds
            dtype = np.dtype(np.float32) if t.dtype.name == "bfloat16" else t.dtype
            meta.add(t.name, dtype=DataType.from_dtype(dtype), shape=list(t.shape))
        return meta

    def _run(self, feeds: dict) -> dict:
        from qvl_surgery.core.runners import ort_session
        if self.mode == "emulate-fp16":
            from qvl_surgery.core.emulate import Emulator, emulate
            if is_manifest_path(self.path):
                out = emulate(self.path, feeds, keep_intermediate=bool(self.extra))
            else:
                out = Emulator(self.path).run(feeds, self.outputs + self.extra)
            return out
        if self.mode == "openvino":
            if is_manifest_path(self.path):
                raise BadInput(f"{self.path}: OpenVINO runs a model file; merge the split first")
            from qvl_surgery.core.runners import run_openvino
            return run_openvino(self.path, feeds, self.extra)
        if is_manifest_path(self.path):
            from qvl_surgery.core.runners import run_chain
            return run_chain(self.path, feeds, keep_intermediate=bool(self.extra))
        with _with_extra_outputs(self.path, self.extra) as p:
            sess = ort_session(p)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))

    def infer_impl(self, feed_dict):
        feeds = self.signature.cast(feed_dict)
        if self.kind is None:
            from qvl_surgery.core.inputs import ModelKind
            self.kind = ModelKind.of(self.path)
        try:
            from qvl_surgery.core.inputs import check_feeds
            check_feeds(self.kind, feeds)
        except BadInput as e:
            # polygraphy's own data loader makes random integers: a dynamic export's grid must describe
            # the pixel rows. One line, polygraphy's way, instead of a crash inside the graph.
            from polygraphy.logger import G_LOGGER
            G_LOGGER.critical(f"{e}. polygraphy's random inputs cannot feed a dynamic export: save valid ones "
                              f"with 'qvl-surgery compare {self.path} {self.path} --image-size 448x448 "
                              "--save-inputs in.json' and pass --load-inputs in.json")
        import time
        t0 = time.perf_counter()
        out = self._run(feeds)
        self.inference_time = time.perf_counter() - t0
        result = OrderedDict()
        for n in self.outputs + [e for e in self.extra if e in out]:
            v = np.asarray(out[n])
            # fp16 and bf16 outputs compare as float32
            result[n] = v.astype(np.float32) if v.dtype.kind == "f" and v.dtype != np.float32 or v.dtype.name == "bfloat16" else v
        return result

    def deactivate_impl(self):
        pass


@dataclass
class OutputStats:
    name: str
    max_abs: float
    mean_abs: float
    cosine: float
    ref_max: float
    finite: bool
    centered_cosine: float = float("nan")

    def line(self) -> str:
        return (f"{self.name:<28} max abs {self.max_abs:11.4e}  mean abs {self.mean_abs:11.4e}  "
                f"cosine {self.cosine:.6f} (centered {self.centered_cosine:.6f})  (ref max {self.ref_max:.3g})"
                f"{'' if self.finite else '  NON-FINITE'}")


def _digits(value: float, floor: float) -> int:
    for d in range(6, 16):
        if round(value, d) < floor:
            return d
    return 16


def stats(name: str, ref: np.ndarray, cand: np.ndarray) -> OutputStats:
    r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    finite = bool(np.isfinite(c).all())
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(r - c)
    cos = cosine(r, c) if finite else float("nan")
    ccos = centered_cosine(ref, cand) if finite and ref.shape == cand.shape else float("nan")
    return OutputStats(name, float(np.nanmax(d)) if finite else float("inf"),
                       float(np.nanmean(d)) if finite else float("inf"), cos, float(np.abs(r).max()), finite, ccos)


@dataclass
class CompareReport:
    outputs: list[OutputStats]
    per_block: list[OutputStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passed: bool = True
    reasons: list[str] = field(default_factory=list)
    ref_name: str = ""
    cand_name: str = ""

    def lines(self) -> list[str]:
        out = [f"compare {self.cand_name} against {self.ref_name}"]
        out += ["  " + s.line() for s in self.outputs]
        if self.per_block:
            out.append("  per block (hidden state after each block):")
            out += ["    " + s.line() for s in self.per_block]
        out += ["  " + n for n in self.notes]
        out.append("PASSED" if self.passed else "FAILED: " + "; ".join(self.reasons))
        return out

    def to_dict(self) -> dict:
        return {"ref": self.ref_name, "cand": self.cand_name, "passed": self.passed, "reasons": self.reasons,
                "outputs": [s.__dict__ for s in self.outputs], "per_block": [s.__dict__ for s in self.per_block]}


def block_output_names(path: Path) -> list[str]:
    raw = head_model(path).metadata().get("qvl_surgery.block_outputs")
    if not raw:
        raise BadInput(f"{path}: no qvl_surgery.block_outputs metadata; --per-block needs a qvl-surgery export")
    return json.loads(raw)[1:]


def check_tolerances(*, atol: float, rtol: float, min_cosine: float, min_centered_cosine: float | None) -> None:
    """Refuse a tolerance no comparison can mean (before anything runs)."""
    import math
    for name, v in (("atol", atol), ("rtol", rtol)):
        if not (math.isfinite(v) and v >= 0):
            raise BadInput("{" + name + "}: a tolerance is a finite number >= 0", **{name: v})
    for name, v in (("min_cosine", min_cosine), ("min_centered_cosine", min_centered_cosine)):
        if v is not None and not (math.isfinite(v) and -1.0 <= v <= 1.0):
            raise BadInput("{" + name + "}: a cosine floor lies in [-1, 1], e.g. 0.999", **{name: v})


def compare(ref: str | Path, cand: str | Path, *, feeds: dict[str, np.ndarray], emulate_fp16: bool = False,
            runtime: str = "onnxruntime",
            atol: float = 1e-3, rtol: float = 1e-3, min_cosine: float = 0.999,
            min_centered_cosine: float | None = None, per_block: bool = False,
            save_outputs: str | Path | None = None, save_inputs: str | Path | None = None,
            verbose: bool = False) -> CompareReport:
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER
    # polygraphy's own log is long (histograms per tensor); this command prints a summary instead.
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.CRITICAL
    ref, cand = Path(ref), Path(cand)
    check_tolerances(atol=atol, rtol=rtol, min_cosine=min_cosine, min_centered_cosine=min_centered_cosine)
    from qvl_surgery.core.inputs import ModelKind, check_feeds
    check_feeds(ModelKind.of(ref), feeds)
    r_out, c_out = signature(ref).output_names, signature(cand).output_names
    if r_out != c_out:
        raise BadInput(f"{ref} gives {r_out}, {cand} gives {c_out}: compare two models of one kind (both static "
                       "exports, or both dynamic)")
    signature(cand).check_feeds(feeds, f"CAND {cand}")   # one line, before polygraphy runs anything (REF: above)
    for path in (ref, cand):
        if is_manifest_path(path):
            read_manifest(path, verify_hashes=True)   # a damaged part is a hash mismatch, not a wrong number
    extra = block_output_names(ref) if per_block else []
    if per_block and is_manifest_path(ref):
        raise BadInput("--per-block needs REF to be a single model, not a split")
    r_runner = QvlRunner(ref, "onnxrt", extra, name="ref")
    if emulate_fp16 and runtime != "onnxruntime":
        raise BadInput("--emulate-fp16 emulates onnxruntime's file in numpy; it does not combine with --runtime")
    cand_mode = "emulate-fp16" if emulate_fp16 else {"onnxruntime": "onnxrt", "openvino": "openvino"}[runtime]
    from qvl_surgery.core.runners import refuse_bf16_in_onnxruntime
    for path, mode in ((ref, "onnxrt"), (cand, cand_mode)):
        if mode == "onnxrt":
            refuse_bf16_in_onnxruntime(path)
    c_runner = QvlRunner(cand, cand_mode, extra, name="cand")
    results = Comparator.run([r_runner, c_runner], data_loader=[feeds])
    if save_inputs:
        from polygraphy.json import save_json
        save_json([feeds], str(save_inputs), description="qvl-surgery compare inputs")
    r_out, c_out = results["ref"][0], results["cand"][0]
    # The verdict is on the model's outputs only; block outputs are for locating error.
    finals = RunResults()
    for name, out in (("ref", r_out), ("cand", c_out)):
        finals.append((name, [IterationResult({n: out[n] for n in r_runner.outputs}, runner_name=name)]))
    if save_outputs:
        finals.save(str(save_outputs))
    accuracy = Comparator.compare_accuracy(finals, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    report = CompareReport([stats(n, r_out[n], c_out[n]) for n in r_runner.outputs],
                           ref_name=str(ref), cand_name=f"{cand} ({cand_mode})")
    report.per_block = [stats(n, r_out[n], c_out[n]) for n in extra if n in r_out and n in c_out]
    if per_block and len(report.per_block) < len(extra):
        report.notes.append(f"per block: {len(extra) - len(report.per_block)} of {len(extra)} hidden states are not "
                            "visible in CAND (a split in onnxruntime shows those at its cuts only; merge it, or "
                            "compare with --emulate-fp16, to see every block)")
    if per_block:
        from qvl_surgery.core.signature import head_model
        rotated = [p for p in (ref, cand) if "qvl_surgery.rotate" in head_model(p).metadata()]
        if len(rotated) == 1:
            report.notes.append(f"per block: {rotated[0]} is rotated, so its hidden states are in the rotated basis "
                                "and their cosines against the other model mean nothing; only the outputs compare")
    if not bool(accuracy):
        report.passed = False
        report.reasons.append(f"polygraphy: outside atol {atol} / rtol {rtol}")
    for s in report.outputs:
        if not s.finite:
            report.passed = False
            report.reasons.append(f"{s.name} has inf/NaN")
        else:
            for label, value, floor in (("cosine", s.cosine, min_cosine),
                                        ("token-centered cosine", s.centered_cosine, min_centered_cosine)):
                if floor is not None and value == value:  # centered: nan where the shapes differ
                    if not value >= floor:
                        report.passed = False
                        # as many digits as it takes to show the difference (never "1.000000 < 0.9999999")
                        report.reasons.append(f"{s.name} {label} {value:.{_digits(value, floor)}f} < {floor}")
    return report
