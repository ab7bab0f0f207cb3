"""scripts/compat's catalogs, as data: the clients (each with its virtualenv's pins, its matrix columns and
what the matrix shows about it) and the file kinds (each with the toolkit commands that make it from other
kinds and the CLI options it needs). Standard library only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.venv import Venv

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

    @property
    def venv(self) -> Venv:
        """Its virtualenv, ``.compat/<name>/``."""
        return Venv(COMPAT / self.name, self.python, self.pip)


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
