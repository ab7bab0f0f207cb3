"""What scripts/bench times in a child process, other than the toolkit's own CLI: the baselines and
anchors (other tools doing the same job). One function per step, run by name:

    python scripts/bench_sections/children.py STEP ARG...

Each imports what it needs inside itself, so that a child's peak RSS and start-up are its step's own.
"""
from __future__ import annotations

import os
import sys


def calib_sets(npz: str | None = None) -> list[dict]:
    """The calibration input sets a calibrating anchor gets: 8 random ones, or those of ``npz`` (the
    photos' ``pixel_values`` stacked, one set per row: bench_sections.quant.Photos)."""
    import numpy as np
    if npz:
        return [{"pixel_values": x} for x in np.load(npz)["pixel_values"]]
    return [{"pixel_values": np.random.default_rng(s).standard_normal((1024, 1176)).astype(np.float32)}
            for s in range(8)]


def transformers_init() -> None:
    """transformers' init of the 3b vision tower (the weights alone, before any ONNX work)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel as M
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig as C
    from qvl_surgery.core.config import PRESETS
    import torch
    torch.manual_seed(0)
    m = M(C(**PRESETS['3b'].to_dict()))
    print(sum(p.numel() for p in m.parameters()))


def onnx_load_count(model: str) -> None:
    import collections
    import onnx
    m = onnx.load(model)
    print(collections.Counter(n.op_type for n in m.graph.node))


def hash_data(data: str, algo: str) -> None:
    from qvl_surgery.core.modelfile import hash_file
    hash_file(data, algo)


def extract_half(model: str, half: str) -> None:
    import onnx.utils
    onnx.utils.extract_model(model, half, ['pixel_values'], ['blocks.15.output'])


def ort_fp16(model: str, out: str) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16 as c
    m = onnx.load(model)
    m = c(m, disable_shape_infer=True, node_block_list=['Sigmoid'])
    onnx.save(m, out, save_as_external_data=True, location='ort16.onnx.data')


def hot_export(out: str) -> None:
    """The 3b whose block-31 down_proj drives the residual to ~4.9e4 (random weights otherwise)."""
    from qvl_surgery.core.config import PRESETS
    from qvl_surgery.core.export import export
    from qvl_surgery.core.weights import RandomWeights

    class Hot(RandomWeights):
        def array(self, name):
            a = super().array(name)
            if name == 'blocks.31.mlp.down_proj.bias':
                a[:16] = 4.9e4
            return a
    export(Hot(PRESETS['3b'], 0), out, (448, 448), progress=False)


def stand_in_export(stand_in: str, preset: str, out: str) -> None:
    from qvl_surgery.core.config import PRESETS
    from qvl_surgery.core.export import export
    from qvl_surgery.core.weights import STAND_INS
    export(STAND_INS[stand_in](PRESETS[preset], 0), out, (448, 448), progress=False, overwrite=True)


def onnxsim_path(model: str, out: str) -> None:
    import onnx
    import onnxsim
    m, ok = onnxsim.simplify(model)
    onnx.save(m, out, save_as_external_data=True, location='onnxsim.onnx.data')


def onnxsim_proto(model: str) -> None:
    """Answers {"error": ...} and exits 3 where onnxsim fails on the loaded ModelProto."""
    import onnx
    import onnxsim
    from harness.results import emit
    try:
        onnxsim.simplify(onnx.load(model))
    except Exception as e:   # noqa: BLE001 - its failure is the figure
        emit({"error": f"{type(e).__name__} {str(e)[:100]}"})
        sys.exit(3)


def ort_dynamic(src: str, dst: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, use_external_data_format=True)


def ort_static(src: str, dst: str, npz: str | None = None) -> None:
    """As released, quantize_static cannot calibrate the 3b on 8 inputs in 24 GB: its calibrator keeps every
    inference's intermediate outputs (about 10 GB per 448x448 inference here) until all have run, and its
    CalibMaxIntermediateOutputs, meant to bound that, drops the outputs it collected instead of merging
    their ranges (onnxruntime 1.32 calibrate.py collect_data). Two changes, nothing else: the calibrator
    is fed one input at a time (each collect_data call merges its ranges into the earlier ones), and its
    session runs without onnxruntime's memory arena (with it, one inference passed 18 GB)."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import MinMaxCalibrater
    collect = MinMaxCalibrater.collect_data

    class One(CalibrationDataReader):
        def __init__(self, x):
            self.x = [x]

        def get_next(self):
            return self.x.pop() if self.x else None

    def collect_one_at_a_time(self, reader):
        while (x := reader.get_next()):
            collect(self, One(x))
    MinMaxCalibrater.collect_data = collect_one_at_a_time
    session_class = onnxruntime.InferenceSession

    def session(path, sess_options=None, **kw):
        sess_options = sess_options or onnxruntime.SessionOptions()
        sess_options.enable_cpu_mem_arena = False
        sess_options.enable_mem_pattern = False
        return session_class(path, sess_options=sess_options, **kw)
    onnxruntime.InferenceSession = session

    class Random(CalibrationDataReader):
        def __init__(self):
            self.sets = iter(calib_sets(npz))

        def get_next(self):
            return next(self.sets, None)
    quantize_static(src, dst, Random(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QInt8, use_external_data_format=True)


def nncf_anchor(mode: str, src: str, dst: str, npz: str | None = None) -> None:
    """Run in the NNCF venv (compat_catalog.NNCF): its OpenVINO backend on the windowed file, saved as IR;
    quantize calibrates on ``npz``'s sets where given (else 8 random ones), all of them."""
    import nncf
    import openvino as ov
    model = ov.Core().read_model(src)
    if mode == "weights":
        model = nncf.compress_weights(model)   # its default: int8 asymmetric weights, per output channel
    else:
        sets = calib_sets(npz)
        model = nncf.quantize(model, nncf.Dataset(sets), subset_size=len(sets), model_type=nncf.ModelType.TRANSFORMER)
    ov.save_model(model, dst, compress_to_fp16=False)


def imagein_vs_transformers(bucket_dir: str, preset: str) -> None:
    """Each size of a bucket folder (image-in, RandomWeights(preset, seed 0)) against transformers'
    processor + model.visual on scikit-image's astronaut resized to that size (imagein-proof's
    reference, the model built once): answers, per size, max |diff| / max |ref| and the token-centered
    cosine."""
    import json
    from pathlib import Path
    from harness.results import emit
    from imagein_proof import photos, processor_pixels, score, transformers_model, visual
    from qvl_surgery.core.config import PRESETS
    from qvl_surgery.core.imagein import image_feed, layout_of
    from qvl_surgery.core.modelfile import load_model
    from qvl_surgery.core.runners import run_model
    from qvl_surgery.core.weights import RandomWeights
    folder = Path(bucket_dir)
    doc = json.loads((folder / "buckets.json").read_text())
    model = transformers_model(RandomWeights(PRESETS[preset], 0))
    out = {}
    for key, name in doc["files"].items():
        size = tuple(int(x) for x in key.split("x"))
        px = photos(("astronaut",), size)["astronaut"]
        ref = visual(model, processor_pixels(px), size)
        layout = layout_of(load_model(folder / name).metadata())
        got = run_model(folder / name, {"image": image_feed(px, layout)})["image_embeds"]
        s = score({"astronaut": ref}, {"astronaut": got})
        out[key] = {"max_abs_over_max": s["rel"], "centered_cosine": s["ccos"]}
    emit(out)


STEPS = {f.__name__.replace("_", "-"): f for f in (
    transformers_init, onnx_load_count, hash_data, extract_half, ort_fp16, hot_export, stand_in_export, onnxsim_path,
    onnxsim_proto, ort_dynamic, ort_static, nncf_anchor, imagein_vs_transformers)}


def argv(python: str, step: str, *args) -> list[str]:
    """The command line that runs ``step`` in a child of ``python``."""
    assert step in STEPS, step
    return [python, __file__, step, *map(str, args)]


if __name__ == "__main__":
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # scripts/, for harness
    STEPS[sys.argv[1]](*sys.argv[2:])
