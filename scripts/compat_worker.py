"""scripts/compat's worker: runs one job (a model, or a split folder as a chain, through one client
route) inside the client's own virtualenv and hands back one result line (harness.results).

    .compat/<client>/bin/python scripts/compat_worker.py JOB.json

It runs under the client's interpreter, beside pins that clash with the toolkit's: it imports the
standard library, numpy, harness.results and the client's own packages, nothing else (no qvl_surgery, no
other module of scripts/). The parent (scripts/compat.py, compat_cells.run_cell) writes JOB.json and
reads the result line from the job's log.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from harness.results import emit


def np_load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}

def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def _run_openvino(route: str, part: dict, feeds: dict, work: Path) -> dict:
    sys.modules.setdefault("openvino_telemetry", None)   # convert_model falls back to its no-op stub
    import openvino as ov
    core = ov.Core()
    src = part["path"]
    if route == "ir":
        src = str(work / "model.xml")
        ov.save_model(ov.convert_model(part["path"]), src, compress_to_fp16=False)
    compiled = core.compile_model(src, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    res = compiled(feeds)
    out = {}
    for name in part["outputs"]:
        port = next(o for o in compiled.outputs if name in o.get_names())
        out[name] = np.asarray(res[port])
    return out


def _run_rknn(route: str, part: dict, feeds: dict, work: Path) -> dict:
    from rknn.api import RKNN
    r = RKNN(verbose=False)
    try:
        r.config(target_platform=route)
        # rknn needs fixed shapes: a dynamic input gets the shape of the array we feed it
        sizes = ({"inputs": [i["name"] for i in part["inputs"]],
                  "input_size_list": [list(feeds[i["name"]].shape) for i in part["inputs"]]}
                 if any(-1 in i["shape"] for i in part["inputs"]) else {})
        for step, call in (("load_onnx", lambda: r.load_onnx(model=part["path"], **sizes)),
                           ("build", lambda: r.build(do_quantization=False)),
                           ("init_runtime", lambda: r.init_runtime())):
            if call() != 0:
                raise RuntimeError(f"rknn {step} returned an error")
        outs = r.inference(inputs=[feeds[i["name"]] for i in part["inputs"]])
        if outs is None:
            raise RuntimeError("rknn inference returned None")
        return {n: np.asarray(o).reshape(s) for n, o, s in zip(part["outputs"], outs, part["output_shapes"])}
    finally:
        r.release()


def _run_mnn(route: str, part: dict, feeds: dict, work: Path) -> dict:
    import _tools
    import MNN
    import MNN.expr as F
    mnn = str(work / "model.mnn")
    ok = _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", part["path"], "--MNNModel", mnn,
                            "--bizCode", "qvl-surgery"])
    if not ok or not Path(mnn).exists():
        raise RuntimeError("MNN converter failed")
    names = [i["name"] for i in part["inputs"]]
    net = MNN.nn.load_module_from_file(mnn, names, part["outputs"])
    def const(a: np.ndarray):
        if np.issubdtype(a.dtype, np.integer):   # MNN's integers are int32
            return F.const(np.ascontiguousarray(a, np.int32), list(a.shape), F.NCHW, F.int)
        return F.const(np.ascontiguousarray(a, np.float32), list(a.shape), F.NCHW)
    ys = net.forward([const(feeds[n]) for n in names])
    ys = ys if isinstance(ys, (list, tuple)) else [ys]
    return {n: np.array(y.read(), np.float32) for n, y in zip(part["outputs"], ys)}


def _run_onnx2tf(route: str, part: dict, feeds: dict, work: Path) -> dict:
    import onnx2tf
    import onnx2tf.tflite_builder as builder
    from ai_edge_litert.interpreter import Interpreter
    # onnx2tf 2.x retries a failed builtin lowering silently with CUSTOM ops LiteRT cannot run: keep the
    # first failure, it is the real reason
    first_failure: list[str] = []
    direct = builder.export_tflite_model_flatbuffer_direct

    def recorded(*args, **kwargs):
        try:
            return direct(*args, **kwargs)
        except Exception as e:
            first_failure.append(str(e).splitlines()[0])
            raise
    builder.export_tflite_model_flatbuffer_direct = recorded
    tf_dir = work / "tf"
    try:
        onnx2tf.convert(input_onnx_file_path=part["path"], output_folder_path=str(tf_dir),
                        replace_to_pseudo_operators=["Erf"], non_verbose=True, output_signaturedefs=True)
        return _run_tflite(Interpreter, tf_dir, part, feeds)
    except Exception as e:
        if first_failure:
            raise RuntimeError(f"{e} -- onnx2tf's builtin lowering had failed first: {first_failure[0]}") from e
        raise


def _run_tflite(Interpreter, tf_dir: Path, part: dict, feeds: dict) -> dict:
    stem = Path(part["path"]).stem
    it = Interpreter(model_path=str(tf_dir / f"{stem}_float32.tflite"))
    runner = it.get_signature_runner()
    sig = it.get_signature_list()["serving_default"]
    details = runner.get_input_details()
    args = {}
    for i, spec in enumerate(part["inputs"]):
        key = next((k for k in sig["inputs"] if k in (spec["name"], _safe(spec["name"]))), sig["inputs"][i])
        args[key] = np.ascontiguousarray(feeds[spec["name"]], details[key]["dtype"])
    res = runner(**args)
    out = {}
    for i, name in enumerate(part["outputs"]):
        key = next((k for k in res if k in (name, _safe(name))), None)
        if key is None and len(res) == len(part["outputs"]):
            key = sorted(res)[i]
        out[name] = np.asarray(res[key])
    return out


RUNNERS = {"openvino": _run_openvino, "rknn": _run_rknn, "mnn": _run_mnn, "onnx2tf": _run_onnx2tf}


def _client_versions(client: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    pkgs = {"openvino": ["openvino"], "rknn": ["rknn-toolkit2"], "mnn": ["MNN"],
            "onnx2tf": ["onnx2tf", "tensorflow", "ai-edge-litert"]}[client]
    out = {}
    for p in pkgs:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "?"
    return out


def worker(job_path: Path) -> int:
    job = json.loads(Path(job_path).read_text())
    work = Path(job["work"])
    result = {"ok": False, "versions": _client_versions(job["client"])}
    t0 = time.time()
    try:
        values = np_load(Path(job["feeds"]))
        for k, part in enumerate(job["parts"]):
            d = work / f"part{k}"
            d.mkdir(parents=True, exist_ok=True)
            feeds = {i["name"]: np.ascontiguousarray(values[i["name"]].astype(i["dtype"])) for i in part["inputs"]}
            values.update(RUNNERS[job["client"]](job["route"], part, feeds, d))
        np.savez(job["out"], **{n: values[n] for n in job["parts"][-1]["outputs"]})
        result["ok"] = True
    except BaseException as e:   # noqa: BLE001 - the client's own error is the result
        result["error"] = f"{type(e).__name__}: {e}"
    result["seconds"] = round(time.time() - t0, 1)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(worker(Path(sys.argv[1])))
