"""Compatibility matrix: every kind of file this toolkit writes, through every client people feed it to.

    scripts/compat                          # tiny preset, 448x448 and 308x196, every client -> COMPAT.md
    scripts/compat --preset 3b --sizes 448x448 --clients openvino,mnn --kinds fp32,windowed
    scripts/compat --setup-only             # only build the client virtualenvs under .compat/

Each client lives in its own virtualenv under ``.compat/<client>/`` (their pins clash: rknn-toolkit2
wants numpy<=1.26.4 and onnx<=1.18, onnx2tf pins tensorflow 2.19) and runs this same file as a
worker (``--worker JOB.json``): so nothing above the worker section may import more than the
standard library and numpy. For each (file kind, client route) the parent:

1. copies the file (or the split folder) into the job folder: no client may modify an input, and the
   original's sha256 and mtime are checked after the run (a client that writes into its copy is noted);
2. runs the worker in the client's venv with a timeout, one at a time (the machine has 2 cores);
3. compares the client's output with onnxruntime on the fp32 export (same input): max abs, cosine.

A cell is a figure, or the client's own error text with its version. A figure is marked WRONG when
its relative L2 error exceeds 10x onnxruntime's on the same file and the client's own arithmetic floor:
that is a client silently computing something else. On a quantized file onnxruntime's error is the
quantization error: a client near 1x of it runs the same quantized arithmetic, one well below it (< 0.7x,
noted) ran part of it in float.

Rows of COMPAT.md that this run did not measure are kept as they were (the results files under .compat/
belong to one checkout; COMPAT.md is the record).

File kinds are data (``KINDS``): a kind names the toolkit commands that make it from other kinds and
the CLI options it needs; a kind whose option the CLI does not have yet is listed as "not yet
written by the toolkit", and appears once the option lands.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / ".compat"


# ============================================================================ clients (data)

@dataclass(frozen=True)
class Client:
    name: str
    pip: tuple[tuple[str, ...], ...]     # pip install argument lists, run in order in the client's venv
    routes: tuple[str, ...]              # matrix columns, "client:route"
    floor: float = 1e-4                  # relative L2 error its arithmetic alone gives on an fp32 file
    python: str = "3.11"                 # interpreter version of its venv
    note: str = ""                       # how the route is driven
    limits: str = ""                     # what the matrix shows about this client, and the file to give it


CLIENTS: dict[str, Client] = {c.name: c for c in (
    Client("openvino", (("openvino==2026.4.1", "openvino-telemetry==2025.2.0", "numpy==2.4.6"),),
           ("onnx", "ir"),
           note="`onnx`: Core.compile_model on the .onnx; `ir`: ov.convert_model -> ov.save_model(compress_to_fp16="
                "False) -> Core.compile_model on the IR (the ovc route). CPU, INFERENCE_PRECISION_HINT f32. "
                "openvino_telemetry is kept out of the process (convert_model sends usage data otherwise).",
           limits="Takes every kind, both routes. Its offline route's SDPAReshapeFusion rewrote the earlier heads-first "
                  "windowed layout into one full attention (1.5e-3 wrong at 448x448, an exception at 308x196); the "
                  "windows-first layout converts exactly. `ovc`/save_model default to fp16-compressed weights "
                  "(1.0e-4 on the tiny windowed model): pass compress_to_fp16=False for fp32 weights. Quantized: runs QDQ "
                  "int8/int16 and MatMulNBits as onnxruntime does (w8a8 qdq at 1.65x its error), but "
                  "DynamicQuantizeMatMul with float activations (bitwise the w8 weight-only output); refuses a "
                  "blocked int4 DequantizeLinear whose block does not divide the input dim (patch_embed: 1176 by 32)."),
    Client("rknn", (("--no-deps", "rknn-toolkit2==2.5.0"),
                    # its own pins, less torch<=2.4 (a CUDA build of GBs on PyPI): the CPU torch the
                    # main venv uses imports fine for ONNX conversion
                    ("torch==2.13.0", "numpy==1.26.4", "onnx==1.18.0", "onnxruntime==1.22.1", "protobuf==4.25.4",
                     "psutil==7.2.2", "ruamel.yaml==0.19.1", "scipy==1.17.1", "tqdm==4.70.1",
                     "opencv-python-headless==4.11.0.86", "fast-histogram==0.14", "setuptools<81")),
           ("rk3588",), floor=5e-3,   # an fp16 build: 8.5e-4 on the tiny fp32 export
           note="rknn-toolkit2: config(target_platform='rk3588'), load_onnx, build(do_quantization=False) (an fp16 "
                "model), init_runtime() with no target = the simulator, inference.",
           limits="Static files only: opset <= 19 (refuses the opset-23 Attention), no com.microsoft ops, no "
                  "dynamic graph (the dynamic export's grid Range needs constants). Every static fp32/fp16 file and "
                  "split chain runs within its fp16 build's error. No quantized file loads: an opset-17 QDQ file stops in "
                  "its fold_constant (IndexError), opset 21 (int16, blocked int4) is refused."),
    Client("mnn", (("MNN==3.6.1", "numpy==2.4.6"),), ("cpu",), floor=1e-3,   # its CPU kernels: 1.1e-4 on tiny fp32
           note="MNN's converter library (`_tools.mnnconvert`, what the `mnnconvert` CLI wraps; the CLI itself "
                "pip-installs a logger and sends usage logs), then MNN.nn.load_module_from_file on CPU.",
           limits="Misreads FLOAT16 initializers stored as external data: fp16 files with a .data file fail to load "
                  "(`Alloc memory for const tensor error`) or run silently wrong; give it fp16 files written with "
                  "--single-file (right). No MultiHeadAttention, no opset-23 Attention. Quantized: int8 weight-only QDQ "
                  "runs silently wrong (cosine 0.13 with external data, NaN --single-file), activation Q/DQ aborts "
                  "its converter (std::out_of_range), blocked int4 DQ fails shape inference; no com.microsoft "
                  "quantized ops."),
    # onnx2tf 2.x needs Python >= 3.12; the newest for 3.11 (1.29.24) turns our 4-D attention Transposes
    # into NHWC ones and stops at the first MatMul_qk ("Dimensions must be equal, but are 16 and 1024")
    Client("onnx2tf", (("onnx2tf[tensorflow]==2.6.9",),), ("litert",), python="3.12",
           note="onnx2tf 2.6.9 (Python 3.12: onnx2tf 2.x needs >= 3.12) with replace_to_pseudo_operators=['Erf'] "
                "(`-rtpo Erf`: the merger's exact GELU needs TF's Flex delegate otherwise), then the float32 "
                ".tflite in ai_edge_litert's Interpreter.",
           limits="Reads external data wrongly (its builtin lowering sees a rank-1 input at the first MLP Gemm, "
                  "falls back to CUSTOM ops LiteRT cannot run): give it --single-file files. Rewrites the .onnx it "
                  "is given (runs its own renaming and simplification in place) and leaves temporary *.data "
                  "files in the working directory: give it a copy. No com.microsoft ops, Attention only in its "
                  "3-input form. 3b: the fp32 export (2.7 GB, external data) got it killed for memory (exit -9 after "
                  "73 s on the 24 GB machine), so the 3b runs skip it on the external-data files; on the 1.3 GB "
                  "single-file windowed fp16 it was still growing at 16.5 GB resident when stopped with 0.8 GB of "
                  "the machine left. Quantized: every QDQ file it reads runs at 1.00x onnxruntime's error (the "
                  "opset-17 ones only --single-file, the opset-21 ones with external data too); no "
                  "DynamicQuantizeMatMul or MatMulNBits."),
)}
# NNCF is no client of the matrix: scripts/toolchains-proof gives it the toolkit's ignored scopes and
# scripts/bench --only quant runs its quantizers as anchors (OpenVINO beside it for its OpenVINO backend)
NNCF = Client("nncf", (("nncf==3.4.0", "openvino==2026.4.1", "openvino-telemetry==2025.2.0", "onnx==1.23.2",
                        "onnxruntime==1.32.0", "numpy==2.4.6"),), ())

ROUTE_LABELS = {"onnxruntime:cpu": "onnxruntime (the file itself)", "openvino:onnx": "OpenVINO compile_model(onnx)",
                "openvino:ir": "OpenVINO convert_model -> IR", "rknn:rk3588": "rknn-toolkit2 rk3588 (simulator)",
                "mnn:cpu": "MNN", "onnx2tf:litert": "onnx2tf -> LiteRT"}


# ============================================================================ file kinds (data)

@dataclass(frozen=True)
class Kind:
    id: str
    label: str
    steps: tuple[tuple[str, ...], ...] = ()   # qvl-surgery argument lists; {kind-id} = that kind's path, {out}
    needs: tuple[tuple[str, str], ...] = ()   # (command, option) that must appear in `qvl-surgery CMD --help`
    split: bool = False                        # output is a split folder (manifest.json), run as a chain
    presets: tuple[str, ...] = ("tiny", "3b")

    @property
    def quantized(self) -> bool:
        """Made by ``quantize``: onnxruntime's own error on it is the quantization error."""
        return any(step[0] == "quantize" for step in self.steps)


KINDS: list[Kind] = [
    Kind("fp32", "fp32 export"),
    Kind("fp32-single", "fp32 export, --single-file",
         (("export", "--random-init", "{preset}", "--image-size", "{size}", "--single-file", "-o", "{out}"),),
         needs=(("export", "--single-file"),)),
    Kind("windowed", "windowed attention", (("attention", "{fp32}", "-o", "{out}"),)),
    Kind("windowed-single", "windowed attention, --single-file",
         (("attention", "{fp32}", "-o", "{out}", "--single-file"),), needs=(("attention", "--single-file"),)),
    Kind("windowed-chunked", "windowed, full-attention queries in chunks (--full-chunk-mb 0.5)",
         (("attention", "{fp32}", "-o", "{out}", "--full-chunk-mb", "0.5"),)),
    Kind("mha", "mha (com.microsoft.MultiHeadAttention)", (("attention", "{fp32}", "-o", "{out}", "--mode", "mha"),)),
    Kind("onnx-attention", "ONNX Attention (opset 23)",
         (("attention", "{fp32}", "-o", "{out}", "--mode", "onnx-attention", "--upgrade-opset"),)),
    Kind("fp16", "fp16", (("fp16", "{fp32}", "-o", "{out}"),)),
    Kind("windowed-fp16", "windowed + fp16", (("fp16", "{windowed}", "-o", "{out}"),)),
    Kind("windowed-fp16-single", "windowed + fp16, --single-file",
         (("fp16", "{windowed}", "-o", "{out}", "--single-file"),), needs=(("fp16", "--single-file"),)),
    Kind("split-fp32", "fp32, split in 2 parts chained", (("split", "{fp32}", "--parts", "2", "-o", "{out}"),),
         split=True),
    Kind("split-windowed-fp16", "windowed + fp16, split in 2 parts chained",
         (("split", "{windowed-fp16}", "--parts", "2", "-o", "{out}"),), split=True),
    Kind("dynamic", "dynamic export", (("export", "--random-init", "{preset}", "--dynamic", "-o", "{out}"),),
         needs=(("export", "--dynamic"),)),
    Kind("dynamic-fp16", "dynamic export + fp16", (("fp16", "{dynamic}", "-o", "{out}"),),
         needs=(("export", "--dynamic"),)),
    Kind("dynamic-fp16-single", "dynamic export + fp16, --single-file",
         (("fp16", "{dynamic}", "-o", "{out}", "--single-file"),),
         needs=(("export", "--dynamic"), ("fp16", "--single-file"))),
    # quantized, all from the windowed file (what a deployment quantizes); random:4 calibration keeps
    # the tiny run short (quantize's default is 8 sets)
    *(Kind(kid, label, (("quantize", "{windowed}", "-o", "{out}", *args),), needs=(("quantize", "--weights"),))
      for kid, label, args in (
        ("w8a8-qdq", "windowed, w8a8 qdq (int8 weights per channel, int8 activations, --calibrate random:4)",
         ("--weights", "int8", "--activations", "int8", "--format", "qdq", "--calibrate", "random:4")),
        ("w8a16-qdq", "windowed, w8a16 qdq (int16 activations, --calibrate random:4; opset 21)",
         ("--weights", "int8", "--activations", "int16", "--format", "qdq", "--calibrate", "random:4")),
        ("w8-qdq", "windowed, w8 weight-only qdq (int8 per channel)",
         ("--weights", "int8", "--activations", "none", "--format", "qdq")),
        ("w4-qdq", "windowed, w4 weight-only qdq (int4 in blocks of 32; opset 21)",
         ("--weights", "int4", "--block-size", "32", "--activations", "none", "--format", "qdq")),
        ("w8a8-ort", "windowed, w8a8 onnxruntime format (com.microsoft DynamicQuantizeMatMul, dynamic activations)",
         ("--weights", "int8", "--activations", "int8", "--format", "onnxruntime")),
        ("w4-ort", "windowed, w4 onnxruntime format (com.microsoft MatMulNBits, blocks of 32)",
         ("--weights", "int4", "--block-size", "32", "--activations", "none", "--format", "onnxruntime")),
        # the opset-17 qdq files once more without external data (onnx2tf and MNN misread it elsewhere)
        ("w8a8-qdq-single", "windowed, w8a8 qdq, --single-file",
         ("--weights", "int8", "--activations", "int8", "--format", "qdq", "--calibrate", "random:4",
          "--single-file")),
        ("w8-qdq-single", "windowed, w8 weight-only qdq, --single-file",
         ("--weights", "int8", "--activations", "none", "--format", "qdq", "--single-file")),
    )),
]


# ============================================================================ worker (client venv)

def _np_load(path: Path) -> dict[str, np.ndarray]:
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
    job = json.loads(job_path.read_text())
    work = Path(job["work"])
    result = {"ok": False, "versions": _client_versions(job["client"])}
    t0 = time.time()
    try:
        values = _np_load(Path(job["feeds"]))
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
    Path(job["result"]).write_text(json.dumps(result))
    return 0


# ============================================================================ parent (main venv)

def log(msg: str) -> None:
    print(msg, flush=True)


def venv_python(client: Client) -> Path:
    return COMPAT / client.name / "bin" / "python"


def find_python(version: str) -> str:
    """An interpreter of this version: on PATH, or one pyenv installed but does not expose."""
    import glob
    for cand in [shutil.which(f"python{version}")] + sorted(glob.glob(
            os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")), reverse=True):
        if cand and subprocess.run([cand, "-c", ""], capture_output=True).returncode == 0:
            return cand
    raise SystemExit(f"no Python {version} here (needed by a client's virtualenv); install it or drop that client "
                     "with --clients")


def setup_client(client: Client) -> None:
    """Create or update .compat/<client>; a stamp of the pip arguments skips pip when nothing changed."""
    d = COMPAT / client.name
    stamp = d / ".qvl-compat-stamp"
    want = hashlib.sha256(json.dumps([client.python, client.pip]).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    log(f"setup {client.name}: {d} (Python {client.python})")
    py = venv_python(client)
    if py.exists():
        have = subprocess.run([str(py), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True).stdout.strip()
        if have != client.python:
            shutil.rmtree(d)
    if not py.exists():
        subprocess.run([find_python(client.python), "-m", "venv", str(d)], check=True)
    for args in client.pip:
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"setup {client.name}: pip install {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    stamp.write_text(want)


def cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("qvl-surgery")
    return subprocess.run([str(exe), *args], capture_output=True, text=True)


_HELP: dict[str, str] = {}


def has_option(command: str, option: str) -> bool:
    if command not in _HELP:
        _HELP[command] = cli(command, "--help").stdout
    return re.search(rf"(^|\s){re.escape(option)}\b", _HELP[command]) is not None


def model_path(d: Path, kind: Kind) -> Path:
    return d / kind.id if kind.split else d / kind.id / "model.onnx"


def make_files(preset: str, size: str, kinds: list[Kind], reuse: bool) -> tuple[dict[str, Path], dict[str, str]]:
    """Write every kind for one preset and size with the toolkit's CLI (``reuse``: keep files already
    written by an earlier run, e.g. a 3b export)."""
    d = COMPAT / "files" / f"{preset}-{size}"
    if not reuse and d.exists():
        shutil.rmtree(d)
    paths, skipped = {}, {}
    for kind in kinds:
        missing = [f"{c} {o}" for c, o in kind.needs if not has_option(c, o)]
        if missing:
            skipped[kind.id] = f"not yet written by the toolkit (`qvl-surgery {missing[0]}` does not exist yet)"
            continue
        out = model_path(d, kind)
        if out.exists():
            paths[kind.id] = out
            continue
        (d if kind.split else d / kind.id).mkdir(parents=True, exist_ok=True)
        if kind.id == "fp32":
            r = cli("export", "--random-init", preset, "--image-size", size, "-o", str(out), "-q")
        else:
            refs = {m for step in kind.steps for a in step for m in re.findall(r"\{([\w-]+)\}", a)}
            absent = sorted(refs - set(paths) - {"out", "preset", "size"})
            if absent:
                skipped[kind.id] = f"made from {absent[0]}, which was not written"
                continue
            for step in kind.steps:
                args = [a.replace("{out}", str(out)).replace("{preset}", preset).replace("{size}", size) for a in step]
                for k, v in paths.items():
                    args = [a.replace("{" + k + "}", str(v)) for a in args]
                r = cli(*args, "-q")
                if r.returncode:
                    break
        if r.returncode:
            shutil.rmtree(d / kind.id, ignore_errors=True)
            skipped[kind.id] = f"the toolkit failed to write it: {(r.stderr or r.stdout).strip().splitlines()[-1]}"
            continue
        log(f"wrote {out.relative_to(ROOT)}")
        paths[kind.id] = out
    return paths, skipped


def parts_of(path: Path) -> list[dict]:
    """Parts in chain order with their inputs (name, dtype), outputs and output shapes (-1: not fixed),
    read by the toolkit's one signature reader."""
    from qvl_surgery.core.signature import signature

    def io(p: Path) -> dict:
        sig = signature(p)
        def dims(t):
            return [d if isinstance(d, int) else -1 for d in t.shape]
        return {"file": p.name, "inputs": [{"name": t.name, "shape": dims(t), "dtype": t.dtype.name} for t in sig.inputs],
                "outputs": sig.output_names, "output_shapes": [dims(t) for t in sig.outputs]}
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text())
        return [io(path / p["path"]) for p in manifest["parts"]]
    return [io(path)]


def snapshot(path: Path) -> dict[str, tuple[str, int]]:
    files = sorted(path.rglob("*")) if path.is_dir() else sorted(path.parent.glob(path.name + "*"))
    return {str(p.relative_to(path if path.is_dir() else path.parent)): (
        hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files if p.is_file()}


def copy_input(path: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    if path.is_dir():
        shutil.copytree(path, dst)
        return dst
    dst.mkdir(parents=True)
    for p in path.parent.glob(path.name + "*"):
        shutil.copy2(p, dst / p.name)
    return dst / path.name


def feeds_for(path: Path, size: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the first part: pixel_values from a fixed seed; image_grid_thw from the size."""
    h, w = (int(v) for v in size.split("x"))
    gh, gw = h // 14, w // 14
    rng = np.random.default_rng(seed)
    feeds = {"pixel_values": rng.standard_normal((gh * gw, 1176)).astype(np.float32)}
    names = [i["name"] for i in parts_of(path)[0]["inputs"]]
    if "image_grid_thw" in names:
        feeds["image_grid_thw"] = np.array([[1, gh, gw]], np.int64)
    return {n: feeds[n] for n in names}


def run_onnxruntime(path: Path, feeds: dict) -> dict[str, np.ndarray]:
    from qvl_surgery.core.runners import run_chain, run_model
    return run_chain(path, feeds) if path.is_dir() else run_model(path, feeds)


def metrics(got: np.ndarray, ref: np.ndarray) -> dict:
    from qvl_surgery.core.metrics import cosine, max_abs, relative_l2
    return {"max_abs": max_abs(ref, got), "cosine": cosine(got, ref), "rel_l2": relative_l2(ref, got),
            "finite": bool(np.isfinite(got).all())}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


ERROR_LINES = {"rknn": r"^E\s", "mnn": r"Not Support|[Ee]rror|Failed", "openvino": r"$^",
               "onnx2tf": r"ERROR|Error:"}


def error_text(result: dict | None, log_path: Path, client: str) -> str:
    """The client's own words: its error lines from the log (rknn logs 'E ...', MNN prints its reasons),
    then the exception the worker caught."""
    text = _ANSI.sub("", log_path.read_text(errors="replace")) if log_path.exists() else ""
    # MNN prefixes its lines with a clock and a source line number: "[23:48:57] :220: "
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] :\d+: ", "", l.strip()) for l in re.split(r"[\r\n]+", text) if l.strip()]
    picked = [l.replace("Traceback (most recent call last):", "").strip() for l in lines
              if re.search(ERROR_LINES.get(client, r"$^"), l) and "rknn-toolkit2 version" not in l]
    exc_lines = [l.strip() for l in (result or {}).get("error", "").splitlines() if l.strip()]
    # a traceback inside the message (rknn re-raises with one): its last line says what went wrong
    exc = " ".join(exc_lines)
    if exc_lines and re.match(r"^\w+(Error|Exception)\b", exc_lines[-1]) and len(exc_lines) > 1:
        frames = re.findall(r"line \d+, in (\S+)", exc)
        exc = exc_lines[-1] + (f" (in {frames[-1]})" if frames else "")
    picked = [l for l in picked if not re.fullmatch(r"E \w+:", l)]
    if client == "rknn" and picked:   # its E lines say it; the exception repeats them with a traceback
        exc = ""
    parts = list(dict.fromkeys(picked[-3:] + ([exc] if exc else [])))
    return (" | ".join(parts) or " | ".join(lines[-3:]) or "no output")[:700]


MIN_FREE_GB = 1.5


def _meminfo(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def mem_available_gb() -> float:
    return _meminfo("MemAvailable")


def mem_total_gb() -> float:
    return _meminfo("MemTotal")


def rss_gb(pid: int) -> float:
    try:
        return int(next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if l.startswith("VmRSS")).split()[1]) / 2**20
    except (OSError, StopIteration):
        return 0.0


def run_cell(client: Client, route: str, path: Path, feeds: dict, job_dir: Path, timeout: int) -> dict:
    if job_dir.exists():
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True)
    before = snapshot(path)
    copy = copy_input(path, job_dir / "input")
    copy_before = snapshot(copy)
    parts = parts_of(path)
    for p in parts:
        p["path"] = str((copy if copy.is_dir() else copy.parent) / p["file"])
    np.savez(job_dir / "feeds.npz", **feeds)
    job = {"client": client.name, "route": route, "parts": parts, "feeds": str(job_dir / "feeds.npz"),
           "out": str(job_dir / "out.npz"), "result": str(job_dir / "result.json"), "work": str(job_dir / "work")}
    (job_dir / "job.json").write_text(json.dumps(job, indent=1))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="2")
    t0 = time.time()
    stopped = None
    with open(job_dir / "log.txt", "w") as logf:
        proc = subprocess.Popen([str(venv_python(client)), str(Path(__file__).resolve()), "--worker",
                                 str(job_dir / "job.json")], stdout=logf, stderr=subprocess.STDOUT, env=env,
                                cwd=job_dir)
        # the machine is shared: stop a client before it makes the kernel kill someone else's process
        while proc.poll() is None:
            time.sleep(2)
            if time.time() - t0 > timeout:
                stopped = f"timeout after {timeout} s"
            elif mem_available_gb() < MIN_FREE_GB:
                stopped = (f"stopped by scripts/compat at {rss_gb(proc.pid):.1f} GB resident: less than "
                           f"{MIN_FREE_GB} GB of the machine's {mem_total_gb():.0f} GB left")
            if stopped:
                proc.kill()
                proc.wait()
        rc = None if stopped else proc.returncode
    cell: dict = {"seconds": round(time.time() - t0, 1)}
    result = json.loads((job_dir / "result.json").read_text()) if (job_dir / "result.json").exists() else None
    cell["versions"] = (result or {}).get("versions") or {}
    if snapshot(path) != before:
        cell["input_modified"] = True
    if snapshot(copy) != copy_before:
        cell["wrote_into_its_input"] = True
    if rc is None:
        cell["error"] = stopped
    elif result is None or not result.get("ok"):
        cell["error"] = error_text(result, job_dir / "log.txt", client.name)
        if rc and result is None:
            cell["error"] = f"worker exited {rc}: " + cell["error"]
    else:
        cell["outputs"] = _np_load(job_dir / "out.npz")
    # keep job.json, log.txt and result.json; the copies and converted models can be GBs (3b)
    for p in ("input", "work"):
        shutil.rmtree(job_dir / p, ignore_errors=True)
    return cell


# a client this far below onnxruntime's error on a quantized file ran part of it in float: OpenVINO runs
# DynamicQuantizeMatMul with float activations (tiny w8a8: 0.59x, bitwise its w8 weight-only output)
IGNORED_QUANT = 0.7


def fmt_cell(cell: dict, floor: float, ort_rel: float | None, *, quantized: bool = False,
             reference: bool = False) -> str:
    """A figure, or the client's error. WRONG: relative L2 error above 10x onnxruntime's on the same file
    and above the client's own arithmetic floor. On a quantized file onnxruntime's error is the quantization
    error: the cell adds its relative L2 (``reference``: onnxruntime's own cell) or the client's as a multiple
    of onnxruntime's, and notes a client far below it (< IGNORED_QUANT x, where onnxruntime's is above the
    client's floor): it did not run the quantized arithmetic, e.g. dequantized weights or Q/DQ pairs run
    in float."""
    if "error" in cell:
        err = re.sub(r"\[\d\d:\d\d:\d\d\] :\d+: ", "", cell["error"])
        err = err.replace("|", "\\|").replace("\n", " ")
        return f"**fails**: `{err}`"
    m = cell["metrics"]
    rel = m.get("rel_l2", 0.0)
    text = f"{m['max_abs']:.1e} / {m['cosine']:.6f}"
    if not m["finite"] or rel > max(10 * (ort_rel or 0.0), floor):
        text = f"**WRONG** {text}"
    notes = []
    if quantized and reference:
        notes.append(f"rel {rel:.1e}")
    elif quantized and ort_rel and m["finite"]:
        if rel < IGNORED_QUANT * ort_rel and ort_rel > floor:
            notes.append(f"**{rel / ort_rel:.2f}x: below the file's quantization error**, ran part of it in float")
        else:
            ratio = rel / ort_rel
            notes.append(f"{ratio:.2f}x" if ratio < 100 else f"{ratio:.0e}x")
    if cell.get("wrote_into_its_input"):
        notes.append("rewrote its input file")
    if cell.get("input_modified"):
        notes.append("**modified the original**")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def run_matrix(preset: str, sizes: list[str], kinds: list[Kind], clients: list[Client], timeout: int,
               reuse_files: bool = False, only_missing: bool = False, skip: set[tuple[str, str]] = frozenset()) -> dict:
    """``only_missing``: keep cells an earlier run measured; ``skip``: (kind id, client) pairs not to run
    (a client that cannot hold that file, e.g. onnx2tf on the 3b fp32: killed for memory at 24 GB)."""
    results_path = COMPAT / f"results-{preset}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for size in sizes:
        paths, skipped = make_files(preset, size, kinds, reuse_files)
        ref_feeds = feeds_for(paths["fp32"], size)
        ref = run_onnxruntime(paths["fp32"], ref_feeds)
        ref_out = next(iter(ref.values()))
        block = results.setdefault(size, {})
        block["_scale"] = float(np.abs(ref_out).max())
        for kind in kinds:
            row = block.setdefault(kind.id, {})
            row["_label"] = kind.label
            if kind.id in skipped:
                row["_skipped"] = skipped[kind.id]
                continue
            row.pop("_skipped", None)
            path = paths[kind.id]
            feeds = feeds_for(path, size)
            t0 = time.time()
            got = run_onnxruntime(path, feeds)
            row["onnxruntime:cpu"] = {"metrics": metrics(next(iter(got.values())), ref_out),
                                      "seconds": round(time.time() - t0, 1)}
            for client in clients:
                for route in client.routes:
                    key = f"{client.name}:{route}"
                    if only_missing and "metrics" in row.get(key, {}):
                        continue
                    if (kind.id, client.name) in skip:
                        continue
                    log(f"{preset} {size} {kind.id} {key} ...")
                    cell = run_cell(client, route, path, feeds,
                                    COMPAT / "jobs" / f"{preset}-{size}" / kind.id / key.replace(":", "-"), timeout)
                    if "outputs" in cell:
                        out = next(iter(cell.pop("outputs").values()))
                        cell["metrics"] = metrics(out, ref_out) if out.size == ref_out.size else {
                            "max_abs": float("inf"), "cosine": 0.0, "finite": False}
                        if out.size != ref_out.size:
                            cell["error"] = f"output has shape {list(out.shape)}, expected {list(ref_out.shape)}"
                        elif kind.quantized:   # the same file in onnxruntime: how far its arithmetic is from it
                            cell["vs_onnxruntime"] = metrics(out, next(iter(got.values())))
                    row[key] = cell
                    text = fmt_cell(cell, client.floor, row["onnxruntime:cpu"]["metrics"]["rel_l2"],
                                    quantized=kind.quantized)
                    log(f"    {text}  ({cell['seconds']} s)")
                    results_path.write_text(json.dumps(results, indent=1))
    results_path.write_text(json.dumps(results, indent=1))
    return results


def remeasure(preset: str) -> None:
    """Recompute every figure of .compat/results-PRESET.json from the outputs the jobs kept (out.npz) and a
    fresh onnxruntime run of each file: for a change of metric without rerunning the clients."""
    results_path = COMPAT / f"results-{preset}.json"
    results = json.loads(results_path.read_text())
    for size, block in results.items():
        d = COMPAT / "files" / f"{preset}-{size}"
        ref_path = model_path(d, next(k for k in KINDS if k.id == "fp32"))
        ref_out = next(iter(run_onnxruntime(ref_path, feeds_for(ref_path, size)).values()))
        for kid, row in block.items():
            kind = next((k for k in KINDS if k.id == kid), None)
            if kid.startswith("_") or kind is None or "_skipped" in row or not model_path(d, kind).exists():
                continue
            path = model_path(d, kind)
            got = run_onnxruntime(path, feeds_for(path, size))
            row["onnxruntime:cpu"]["metrics"] = metrics(next(iter(got.values())), ref_out)
            for key, cell in row.items():
                out = COMPAT / "jobs" / f"{preset}-{size}" / kid / key.replace(":", "-") / "out.npz"
                if key.startswith("_") or key == "onnxruntime:cpu" or "error" in cell or not out.exists():
                    continue
                cell["metrics"] = metrics(next(iter(_np_load(out).values())), ref_out)
                if kind.quantized:
                    cell["vs_onnxruntime"] = metrics(next(iter(_np_load(out).values())), next(iter(got.values())))
        log(f"remeasured {preset} {size}")
    results_path.write_text(json.dumps(results, indent=1))


_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def read_markdown(path: Path) -> tuple[dict[str, dict[str, dict[str, str]]], dict[str, str], list[str]]:
    """What an earlier COMPAT.md holds: its tables ("preset, size" -> row label -> column label -> cell text,
    in its order), each client's version text, and its "not in the matrix yet" lines. The results files
    under .compat/ are per checkout; a row none of them holds is carried over from here as it was."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    versions: dict[str, str] = {}
    failures: list[str] = []
    if not path.exists():
        return tables, versions, failures
    section, header = "", []
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip(), []
            continue
        if section == "Clients":
            m = re.match(r"- \*\*([\w-]+)\*\* \((.*?)\): ", line)
            if m and m.group(2) != "not run":
                versions[m.group(1)] = m.group(2)
        elif section == "Not in the matrix yet" and line.startswith("- "):
            failures.append(line)
        elif line.startswith("| ") and section:
            cells = [c.strip() for c in _CELL_SPLIT.split(line.strip())[1:-1]]
            if not header:
                header = cells
            elif set(cells) != {"---"}:
                tables.setdefault(section, {})[cells[0]] = dict(zip(header[1:], cells[1:]))
    return tables, versions, failures


def write_markdown(out: Path) -> None:
    """COMPAT.md from .compat/results-*.json, merged into the tables the earlier COMPAT.md holds: a measured
    row replaces the row of the same label (a cell no client ran this time keeps its earlier text), a new
    row goes at the end of its table, every other row (and table) stays as it was."""
    routes = ["onnxruntime:cpu"] + [f"{c.name}:{r}" for c in CLIENTS.values() for r in c.routes]
    columns = [ROUTE_LABELS.get(r, r) for r in routes]
    tables, old_versions, old_failures = read_markdown(out)
    versions: dict[str, dict] = {}
    failures: list[str] = []
    measured: set[str] = set()   # "preset size, label"
    for preset_file in sorted(COMPAT.glob("results-*.json")):
        preset = preset_file.stem.split("-", 1)[1]
        results = json.loads(preset_file.read_text())
        for size, block in results.items():
            table = tables.setdefault(f"{preset}, {size}", {})
            for kid, row in block.items():
                if kid.startswith("_"):
                    continue
                measured.add(f"{preset} {size}, {row['_label']}")
                if "_skipped" in row:
                    table[row["_label"]] = dict.fromkeys(columns, "—")
                    failures.append(f"- {preset} {size}, {row['_label']}: {row['_skipped']}")
                    continue
                kind = next((k for k in KINDS if k.id == kid), None)
                quantized = kind is not None and kind.quantized
                ort_rel = row.get("onnxruntime:cpu", {}).get("metrics", {}).get("rel_l2")
                cells = {}
                earlier = table.get(row["_label"], {})
                for r, col in zip(routes, columns):
                    cell = row.get(r)
                    if cell is None:   # a client this run left out (--clients, --skip): its earlier cell stays
                        cells[col] = earlier.get(col, "not run")
                        continue
                    client = r.split(":")[0]
                    cells[col] = fmt_cell(cell, CLIENTS[client].floor if client in CLIENTS else 1e-4, ort_rel,
                                          quantized=quantized, reference=r == "onnxruntime:cpu")
                    if cell.get("versions"):
                        versions.setdefault(client, cell["versions"])
                table[row["_label"]] = cells
    failures += [f for f in old_failures if not any(f.startswith(f"- {m}:") for m in measured)]
    lines = ["# Compatibility matrix", "",
             "Written by `scripts/compat` (do not edit by hand). Every kind of file the toolkit writes, through each "
             "client in its own virtualenv (`.compat/<client>/`), each given a copy of the file. Each cell: max abs / "
             "cosine against onnxruntime on the fp32 export, same input (random pixel_values, seed 0); or the "
             "client's own error. **WRONG** marks a relative L2 error (||out - ref|| / ||ref||) above both 10x "
             "onnxruntime's on the same file and the client's own arithmetic floor (1e-4; MNN's CPU kernels 1e-3; "
             "rknn's fp16 build 5e-3): a client silently computing something else.", "",
             "Quantized files (`windowed, w...` rows, all made by `qvl-surgery quantize` from the windowed file) are "
             "still compared with the fp32 export, so onnxruntime's own figure on them is the quantization error "
             "(its cell adds that relative L2 error, `rel`), and the WRONG rule still holds: 10x the quantization "
             "error. Each client's cell adds its relative L2 error as a multiple of onnxruntime's. About 1x: the "
             "client runs the same quantized arithmetic. Above 1x: its quantized arithmetic is coarser than "
             "onnxruntime's. Well below 1x (under "
             f"{IGNORED_QUANT}x, noted in the cell): it got closer to fp32 than the file allows, so it ran part of "
             "it in float (activations not quantized, or Q/DQ pairs dropped). Weights cannot be run better than "
             "their stored int8/int4 codes, so on a weight-only file a client that reads them right is about 1x "
             "whatever its arithmetic, and a client that drops only the activation quantization of a w8a8 file "
             "lands at the w8 weight-only figure.", ""]
    for section, table in tables.items():
        lines += [f"## {section}", "", "| file | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
        lines += [f"| {label} | " + " | ".join(cells.get(c, "not run") for c in columns) + " |"
                  for label, cells in table.items()]
        lines.append("")
    lines += ["## Clients", ""]
    for c in CLIENTS.values():
        v = ", ".join(f"{k} {val}" for k, val in versions.get(c.name, {}).items()) or old_versions.get(c.name)
        lines.append(f"- **{c.name}** ({v or 'not run'}): {c.note}" + (f" **Limits:** {c.limits}" if c.limits else ""))
    if failures:
        lines += ["", "## Not in the matrix yet", ""] + failures
    lines += ["", "Rerun: `scripts/compat` (tiny, 448x448 and 308x196, every client; about 25 min on 2 cores). The "
              "quantized rows alone: `scripts/compat --sizes 448x448 --kinds w8a8-qdq,w8a16-qdq,w8-qdq,w4-qdq,"
              "w8a8-ort,w4-ort,w8a8-qdq-single,w8-qdq-single` (under 2 min). The 3b section: `scripts/compat --preset 3b --sizes 448x448 --kinds "
              "windowed-fp16-single --clients openvino,mnn,onnx2tf --skip fp32:onnx2tf,windowed:onnx2tf --timeout "
              "1500` (\"not run\": rknn-toolkit2 was not tried on the 3b; onnx2tf is skipped on the 2.7 GB "
              "external-data files, see its limits). A run rewrites the rows it measured and keeps every other row "
              "of this file as it was. `--remeasure` recomputes the figures from the kept outputs. Each job's folder "
              "keeps the client's full log: `.compat/jobs/`.", ""]
    out.write_text("\n".join(lines))
    log(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "3b", "7b"])
    ap.add_argument("--sizes", default="448x448,308x196")
    ap.add_argument("--clients", default=",".join(CLIENTS), help="comma separated: " + ", ".join(CLIENTS))
    ap.add_argument("--kinds", default=None, help="comma separated kind ids: " + ", ".join(k.id for k in KINDS))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per client run (default 900)")
    ap.add_argument("--reuse-files", action="store_true", help="keep the files an earlier run wrote under .compat/files")
    ap.add_argument("--only-missing", action="store_true", help="keep the cells an earlier run measured")
    ap.add_argument("--skip", default="", help="KIND:CLIENT pairs not to run, comma separated (e.g. fp32:onnx2tf)")
    ap.add_argument("--setup-only", action="store_true", help="only create the client virtualenvs")
    ap.add_argument("--remeasure", action="store_true",
                    help="recompute the figures of --preset from the kept outputs, then rewrite COMPAT.md")
    ap.add_argument("--markdown-only", action="store_true", help="only rewrite COMPAT.md from .compat/results-*.json")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "COMPAT.md")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    if a.remeasure:
        remeasure(a.preset)
    if a.markdown_only or a.remeasure:
        write_markdown(a.output)
        return 0
    clients = [CLIENTS[c] for c in a.clients.split(",") if c]
    for c in clients:
        setup_client(c)
    if a.setup_only:
        return 0
    wanted = set(a.kinds.split(",")) if a.kinds else None
    kinds = [k for k in KINDS if a.preset in k.presets and (wanted is None or k.id in wanted or k.id == "fp32")]
    # kinds a wanted kind is made from
    if wanted is not None:
        need = {k.id for k in kinds}
        for k in list(kinds):
            for s in k.steps:
                for other in KINDS:
                    if "{" + other.id + "}" in " ".join(s) and other.id not in need:
                        need.add(other.id)
        kinds = [k for k in KINDS if k.id in need]
    skip = {tuple(p.split(":", 1)) for p in a.skip.split(",") if p}
    run_matrix(a.preset, a.sizes.split(","), kinds, clients, a.timeout, a.reuse_files, a.only_missing, skip)
    write_markdown(a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
