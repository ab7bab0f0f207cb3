"""Calibration for fp16: run the fp32 model, record each tensor's max |value|, and name the nodes
whose inputs or outputs come within a margin of fp16's range (65504).

Runs onnxruntime once per input set on a copy of the graph (a hidden temporary .onnx beside the
model, same data file) where every float tensor also feeds a ReduceMax(Abs(.)) scalar output, so
memory stays that of one inference. Additive-mask sentinels (values <= -1e30, such
as the window mask's float32 min) are not magnitudes: they are left out of the measurement. A node is kept when any of its float inputs or
outputs reaches ``margin * 65504`` (default margin 0.5): an fp16 node reading such a tensor would
see it overflow through its input Cast, so the readers of a large tensor are kept too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile import load_model, sibling_model
from qvl_surgery.core.runners import ort_session
from qvl_surgery.core.signature import model_signature

log = logging.getLogger(__name__)

FP16_MAX = 65504.0


@dataclass
class Calibration:
    tensor_max: dict[str, float]
    keep: dict[str, str]   # node name -> why
    margin: float

    def lines(self) -> list[str]:
        top = sorted(self.tensor_max.items(), key=lambda kv: -kv[1])[:3]
        out = [f"calibration: {len(self.tensor_max)} tensors measured, largest "
               + ", ".join(f"{n} {v:.3g}" for n, v in top),
               f"  {len(self.keep)} nodes reach {self.margin:g} x 65504 and stay fp32"]
        out += [f"    {n}: {why}" for n, why in list(self.keep.items())[:12]]
        if len(self.keep) > 12:
            out.append(f"    ... and {len(self.keep) - 12} more")
        return out


MASK_SENTINEL = -1e30


def _magnitude(v: np.ndarray) -> float:
    """max |value|, ignoring additive-mask sentinels (<= -1e30, e.g. float32 min): fp16 conversion
    maps those to -65504 / -inf on purpose and softmax still gives 0 there."""
    if not v.size:
        return 0.0
    v = v[v > MASK_SENTINEL] if v.min() <= MASK_SENTINEL else v
    return float(np.abs(v).max()) if v.size else 0.0


def calibrate(model_path: str | Path, feeds_list: list[Mapping[str, np.ndarray]], *, margin: float = 0.5) -> Calibration:
    model_path = Path(model_path)
    model = load_model(model_path)
    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model.proto).graph
    ftypes = {v.name for v in list(inferred.value_info) + list(inferred.output) + list(inferred.input)
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    if not ftypes:
        raise BadInput(f"{model_path}: no float32 tensors to calibrate; calibrate on the fp32 model")
    inits = {t.name for t in g.initializer}
    names = [o for n in g.node for o in n.output if o in ftypes and o not in inits]
    sig = model_signature(model)   # from the graph: symbolic dims (a dynamic export's num_patches) take any size
    for feeds in feeds_list:
        sig.check_feeds(feeds, "calibration inputs")
    tmax: dict[str, float] = {}
    for i in g.input:
        if i.name in ftypes and i.name not in inits:
            tmax[i.name] = max(_magnitude(np.asarray(f[i.name], np.float32)) for f in feeds_list)
    # One run per input set: each float tensor gets ReduceMax(Abs(Where(t < -1e30, 0, t))) as an extra
    # scalar output, so onnxruntime frees activations as usual and memory stays that of one inference.
    proto = onnx.load(str(model_path), load_external_data=False)
    pg = proto.graph
    del pg.output[:]
    neg = onnx.numpy_helper.from_array(np.array(MASK_SENTINEL, np.float32), "qvl_calib_sentinel")
    zero = onnx.numpy_helper.from_array(np.array(0.0, np.float32), "qvl_calib_zero")
    pg.initializer.extend([neg, zero])
    outs = []
    probe_of: dict[str, list] = {}
    for k, n in enumerate(names):
        p = f"qvl_calib/{k}"
        probe_of[n] = [
            onnx.helper.make_node("Less", [n, neg.name], [p + "/lt"]),
            onnx.helper.make_node("Where", [p + "/lt", zero.name, n], [p + "/masked"]),
            onnx.helper.make_node("Abs", [p + "/masked"], [p + "/abs"]),
            onnx.helper.make_node("ReduceMax", [p + "/abs"], [p + "/max"], keepdims=0)]
        pg.output.append(onnx.helper.make_tensor_value_info(p + "/max", onnx.TensorProto.FLOAT, []))
        outs.append(p + "/max")
    # each probe right after the node that makes its tensor, so the tensor is not kept alive to the end
    nodes = []
    for node in pg.node:
        nodes.append(node)
        for o in node.output:
            nodes.extend(probe_of.get(o, []))
    del pg.node[:]
    pg.node.extend(nodes)
    with sibling_model(model_path, proto) as tmp:
        # priority-based order runs each probe right after its tensor; the default order kept
        # every activation of the 3b encoder alive (18.5 GB peak instead of 3.5 GB)
        sess = ort_session(tmp, execution_order="PRIORITY_BASED")
    for feeds in feeds_list:
        vals = sess.run(outs, sig.cast(feeds))
        for n, v in zip(names, vals):
            v = float(v)
            tmax[n] = max(tmax.get(n, 0.0), v if np.isfinite(v) else float("inf"))
    del sess
    limit = margin * FP16_MAX
    keep: dict[str, str] = {}
    for n in g.node:
        touched = [(t, tmax[t]) for t in list(n.input) + list(n.output) if t in tmax]
        big = [(t, v) for t, v in touched if v >= limit]
        if big:
            t, v = max(big, key=lambda tv: tv[1])
            keep[n.name or n.output[0]] = f"|{t}| reaches {v:.3g}"
    return Calibration(tmax, keep, margin)


def check_calibration_source(source: str, *, random_ok: bool = False, option: str = "calibrate") -> list[str]:
    """The files of a calibration source, checked for form before any work (:class:`InputSource`);
    with ``random_ok``, ``random[:N]`` (no files) is accepted too."""
    from qvl_surgery.core.inputs import InputSource
    return list(InputSource.parse(source, option, random_ok=random_ok).files)


def calibration_inputs(model_path: Path, source: str, option: str = "calibrate") -> list[dict[str, np.ndarray]]:
    """Input sets from comma-separated files: each .npz is one set of the model's inputs (a dynamic
    export's: ``pixel_values`` + ``image_grid_thw``, several images in one call), each image file
    one set, at the export size (static) or its own size (dynamic). Each set checked."""
    from qvl_surgery.core.inputs import InputSource
    return InputSource.parse(source, option, random_ok=False).sets(model_path)


def calibration_sets(model, source: str, default_count: int = 8, option: str = "calibrate") -> tuple[list[dict[str, np.ndarray]], str]:
    """Input sets for calibrating ``model`` (a :class:`~qvl_surgery.core.modelfile.Model`) and how they
    were made (:class:`~qvl_surgery.core.inputs.InputSource`): ``random[:N]`` (default
    ``default_count``), or comma-separated .npz and image files. Each set is checked against the model."""
    from qvl_surgery.core.inputs import InputSource
    src = InputSource.parse(source, option, default_count=default_count)
    return src.sets(model), src.describe()
