"""Running models: one file in onnxruntime (or OpenVINO), or the parts of a split as a chain.

bf16 files (``fp16 --dtype bfloat16``) do not run in onnxruntime: its CPU provider has no bf16
kernel for Add, MatMul, Gemm, Sigmoid, ReduceMax... (the session does not load), and its Python
binding takes no ml_dtypes array. :func:`ort_session` refuses them in one line; OpenVINO runs them
(bf16 travels through its Python API as raw bits, see :func:`run_openvino`).
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Callable, Mapping

import ml_dtypes
import numpy as np
import onnx

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.manifest import read_manifest
from qvl_surgery.core.signature import head_model, signature

log = logging.getLogger(__name__)


def uses_bf16(graph: onnx.GraphProto) -> bool:
    """True when a graph's weights, inputs, outputs or Casts are bfloat16 (no weight is read)."""
    bf16 = onnx.TensorProto.BFLOAT16
    return (any(t.data_type == bf16 for t in graph.initializer)
            or any(v.type.tensor_type.elem_type == bf16 for v in list(graph.input) + list(graph.output))
            or any(a.name == "to" and a.i == bf16 for n in graph.node if n.op_type == "Cast" for a in n.attribute))


def refuse_bf16_in_onnxruntime(path: str | Path) -> None:
    """One line, before onnxruntime is asked to run a bf16 model file or split."""
    if uses_bf16(head_model(path).graph):
        raise BadInput(f"{path}: a bfloat16 model does not run in onnxruntime (its CPU provider has no bf16 "
                       "arithmetic); compare it with --runtime openvino, or with --emulate-fp16 (which emulates "
                       "the file's bf16 rounding)")


def ort_session(path: str | Path, providers: list[str] | None = None, execution_order: str | None = None,
                threads: int | None = None):
    refuse_bf16_in_onnxruntime(path)
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if execution_order:
        so.execution_order = getattr(ort.ExecutionOrder, execution_order)
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


OPENVINO_MISSING = ("OpenVINO is not installed: pip install 'qvl-surgery[clients]' (or openvino) into this "
                    "environment")


def openvino_compiled(path: str | Path, extra_outputs: list[str] | None = None, precision: str = "f32",
                      threads: int | None = None, profile: bool = False, dynamic_group: int | None = None):
    """OpenVINO's CPU plugin on a model file (its ONNX frontend reads the file; nothing is written).
    ``precision`` is the inference precision hint: f32 by default, since OpenVINO's CPU default is
    bf16 where the CPU has it, which would hide or add error; "bf16" asks for it. ``dynamic_group``:
    DYNAMIC_QUANTIZATION_GROUP_SIZE, the group of input values OpenVINO quantizes a weight-compressed
    linear's activations in at run time (its CPU default: 32; 0: off)."""
    try:
        import sys
        sys.modules.setdefault("openvino_telemetry", None)   # no usage statistics from a comparison
        import openvino as ov
    except ImportError:
        raise BadInput(OPENVINO_MISSING) from None
    core = ov.Core()
    model = core.read_model(str(path))
    if extra_outputs:
        model.add_outputs(list(extra_outputs))
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if profile:
        config["PERF_COUNT"] = True   # per-node counters, read from an infer request's profiling_info
    if dynamic_group is not None:
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = str(dynamic_group)
    return core.compile_model(model, "CPU", config)


def run_openvino(path: str | Path, feeds: Mapping[str, np.ndarray], extra_outputs: list[str] | None = None,
                 compiled=None) -> dict[str, np.ndarray]:
    """One inference in OpenVINO; outputs by every name OpenVINO knows them by (float32).

    OpenVINO's Python API shows a bf16 tensor as float16 numbers made of its bits, and reads an
    ml_dtypes bfloat16 array as wrong numbers without a word: bf16 goes in as an ``ov.Tensor`` of the
    raw bits and comes out reinterpreted."""
    compiled = compiled or openvino_compiled(path, extra_outputs)
    import openvino as ov   # importable: openvino_compiled checked it
    x = {k: ov.Tensor(np.ascontiguousarray(v).view(np.uint16), ov.Shape(list(v.shape)), ov.Type.bf16)
         if v.dtype.name == "bfloat16" else v for k, v in cast_feeds(path, feeds).items()}
    res = compiled(x)
    out = {}
    for port in compiled.outputs:
        v = np.asarray(res[port])
        if port.get_element_type() == ov.Type.bf16:
            v = v.view(np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
        for name in port.get_names():
            out[name] = v.astype(np.float32) if v.dtype.kind == "f" else v
    return out


def cast_feeds(path: str | Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's inputs from feeds, cast to the dtypes its graph declares (an fp16 model takes fp32 pixels)."""
    return signature(path).cast(feeds)


def run_model(path: str | Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = cast_feeds(path, feeds)
    s = ort_session(path)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, x)))


def chain(split_dir: str | Path, feeds: Mapping[str, np.ndarray], run_part: Callable[[Path, dict], dict], *,
          verify_hashes: bool = False, keep_intermediate: bool = False) -> dict[str, np.ndarray]:
    """The parts of a split in order, each fed by the ones before: ``run_part(path, values)`` runs
    one part (onnxruntime, fp16 emulation, ...) and returns its outputs; one part alive at a time.

    Returns the last part's outputs (plus every part's outputs with ``keep_intermediate``).
    """
    m = read_manifest(split_dir, verify_hashes=verify_hashes)
    values = dict(feeds)
    result: dict[str, np.ndarray] = {}
    for path in m.part_paths():
        outs = run_part(path, values)
        gc.collect()
        values.update(outs)
        if keep_intermediate:
            result.update(outs)
    last = [o["name"] for o in m.parts[-1]["outputs"]]
    result.update({n: values[n] for n in last})
    return result


def _run_part(path: Path, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    sig = signature(path)
    missing = [n for n in sig.input_names if n not in values]
    if missing:
        raise BadInput(f"{path}: needs input {missing[0]!r}, which nothing before it provides")
    x = sig.cast(values)
    s = ort_session(path)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, x)))


def run_chain(split_dir: str | Path, feeds: Mapping[str, np.ndarray], *, verify_hashes: bool = False,
              keep_intermediate: bool = False) -> dict[str, np.ndarray]:
    """Run the parts of a split in onnxruntime, in order (:func:`chain`)."""
    return chain(split_dir, feeds, _run_part, verify_hashes=verify_hashes, keep_intermediate=keep_intermediate)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays of an .npz by name (compare's --inputs, calibration sets)."""
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except Exception as e:
        raise BadInput(f"{path}: not a readable .npz ({type(e).__name__})") from None
