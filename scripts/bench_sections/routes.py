"""The quantization routes the quant and surgery sections compare, as data: what makes the file (the
toolkit's surgery and quantize options, or another tool's quantizer) and the runtime that runs it."""
from __future__ import annotations

from dataclasses import dataclass

W8A8 = ("--weights", "int8", "--activations", "int8")
CAL = ("--calibrate", "random:8")
PHOTOS = "PHOTOS"   # in a route's options: the table's calibration photos (quant.Photos), comma separated
CAL_PHOTOS = ("--calibrate", PHOTOS)
TOKEN_U8S8 = ("--activation-scale", "token", "--int8-kernel", "u8s8")
# per token: the linears whose inputs per-token int8 serves worst, kept float (2.7% + block 0's 3.1% of the
# multiply-adds on the 3b): the merger and the patch embed (the budget's costliest groups per multiply-add),
# block 0 (its next), and the full-attention blocks' attn proj (their inputs carry per-channel offsets about
# ten times their token-to-token content, which a symmetric per-token scale spends its range on)
FULL_ATTENTION_PROJ = "FULL_ATTENTION_PROJ"   # in a route's options: --keep-node /blocks.N/attn/proj/* per such block N
TOKEN_KEEP = ("--keep-node", "/merger/*", "--keep-node", "/patch_embed/*", "--keep-block", "0", FULL_ATTENTION_PROJ)

KEEP_MERGER = ("--keep-node", "/merger/*")
ORT_FMT, QDQ_FMT = ("--format", "onnxruntime"), ("--format", "qdq")
QUANTIZER_RSS_LIMIT_MB = 20500   # the machine has 24 GB: an anchor past this is stopped, not the machine

# surgery before quantize: its qvl-surgery command, and (chained) the surgery whose output it starts from
SURGERY_CMD = {"smooth": ("smooth", "--calibrate", "random:4"), "rotate": ("rotate",),
               "rotate+smooth": ("smooth", "--calibrate", "random:4")}
SURGERY_BASE = {"rotate+smooth": "rotate"}
ANCHORS = ("ort-dynamic", "ort-static", "nncf-weights", "nncf-quantize")


def expand(opts, win, calib: str | None) -> tuple[list[str], list[str]]:
    """A route's options for the windowed file ``win``: (to run, to show); PHOTOS becomes ``calib``
    (shown as PHOTOS), FULL_ATTENTION_PROJ a --keep-node per full-attention block (from its metadata)."""
    import json
    run, show = [], []
    for o in opts:
        if o == FULL_ATTENTION_PROJ:
            from qvl_surgery.core.signature import head_model
            extra = [a for b in json.loads(head_model(win).metadata()["qvl_surgery.fullatt_blocks"])
                     for a in ("--keep-node", f"/blocks.{b}/attn/proj/*")]
            run += extra
            show += extra
        else:
            assert o != PHOTOS or calib, "a route that calibrates on photos needs the table's photos"
            run.append(calib if o == PHOTOS else o)
            show.append(o)
    return run, show


@dataclass(frozen=True)
class Route:
    label: str
    runtime: str                              # scripts/ort_latency.py --runtime
    quantize: tuple[str, ...] | None = None   # `qvl-surgery quantize` options
    surgery: str | None = None                # a SURGERY_CMD key, run first (alone: the fp32 file it writes)
    anchor: str | None = None                 # another tool's quantizer (ANCHORS)

    def __post_init__(self):
        assert self.surgery is None or self.surgery in SURGERY_CMD, self.surgery
        assert self.anchor is None or (self.anchor in ANCHORS and self.quantize is None and self.surgery is None)

    @property
    def makes_file(self) -> bool:
        """False: the fp32 windowed file itself, in its runtime."""
        return self.quantize is not None or self.surgery is not None or self.anchor is not None


QUANT_ROUTES = [
    Route("onnxruntime fp32 windowed (baseline)", "onnxruntime"),
    Route("OpenVINO fp32", "openvino"),
    Route("OpenVINO, bf16 inference hint", "openvino-bf16"),
    Route("w8a8 dynamic, format onnxruntime (DynamicQuantizeMatMul)", "onnxruntime", W8A8 + ORT_FMT),
    Route("w8a8 static, format onnxruntime (MatMulIntegerToFloat)", "onnxruntime", W8A8 + ORT_FMT + CAL),
    Route("w8a8 per token, format onnxruntime (MatMulIntegerToFloat, per-row scale)", "onnxruntime",
          W8A8 + ORT_FMT + ("--activation-scale", "token")),
    Route("w8a8 per token, u8s8 kernel (VNNI), format onnxruntime", "onnxruntime",
          W8A8 + ORT_FMT + ("--activation-scale", "token", "--int8-kernel", "u8s8")),
    Route("w8a8 per token, u8s8 kernel (VNNI), --budget 0.998 (random inputs), format onnxruntime", "onnxruntime",
          W8A8 + ORT_FMT + ("--activation-scale", "token", "--int8-kernel", "u8s8", "--budget", "0.998")),
    Route("w8a8 dynamic, merger kept float, format onnxruntime", "onnxruntime", W8A8 + ORT_FMT + KEEP_MERGER),
    Route("smooth, fp32 (exactness)", "onnxruntime", surgery="smooth"),
    Route("rotate, fp32 (exactness)", "onnxruntime", surgery="rotate"),
    Route("smooth, then w8a8 dynamic (nothing kept), format onnxruntime", "onnxruntime", W8A8 + ORT_FMT, "smooth"),
    Route("w8a8 qdq, in OpenVINO", "openvino", W8A8 + QDQ_FMT + CAL),
    Route("smooth, then w8a8 qdq (nothing kept), in OpenVINO", "openvino", W8A8 + QDQ_FMT + CAL, "smooth"),
    Route("w8a8 qdq, merger kept float, in OpenVINO", "openvino", W8A8 + QDQ_FMT + CAL + KEEP_MERGER),
    Route("w8a16 qdq, in OpenVINO", "openvino", ("--weights", "int8", "--activations", "int16") + QDQ_FMT + CAL),
    Route("w8 weight-only, format onnxruntime (MatMulNBits)", "onnxruntime", ("--weights", "int8") + ORT_FMT),
    Route("w4 block 32 weight-only, format onnxruntime (MatMulNBits)", "onnxruntime",
          ("--weights", "int4", "--block-size", "32") + ORT_FMT),
    Route("anchor: onnxruntime quantize_dynamic (QInt8)", "onnxruntime", anchor="ort-dynamic"),
    Route("anchor: onnxruntime quantize_static (QDQ, 8 random inputs, calibrated one at a time), in onnxruntime",
          "onnxruntime", anchor="ort-static"),
    Route("anchor: NNCF compress_weights (int8 weights), OpenVINO bf16 hint", "openvino-bf16", anchor="nncf-weights"),
    Route("anchor: NNCF quantize (int8, TRANSFORMER, 8 random inputs), in OpenVINO", "openvino",
          anchor="nncf-quantize"),
]
# on the stand-ins: accuracy of the routes that matter there (latency is the random-weights table's)
STAND_IN_ROUTES = [r for r in QUANT_ROUTES if r.label.startswith((
    "onnxruntime fp32", "w8a8 dynamic", "w8a8 qdq", "smooth", "rotate", "w8a16", "w8 weight",
    "anchor: onnxruntime quantize_dynamic", "anchor: NNCF"))]
SURGERY_ROUTES = [
    Route("onnxruntime fp32 windowed (baseline)", "onnxruntime"),
    Route("OpenVINO fp32", "openvino"),
    Route("naive: w8a8 dynamic, nothing kept", "onnxruntime", W8A8 + ORT_FMT),
    Route("smooth, then w8a8 dynamic, nothing kept", "onnxruntime", W8A8 + ORT_FMT, "smooth"),
    Route("rotate, then w8a8 dynamic, nothing kept", "onnxruntime", W8A8 + ORT_FMT, "rotate"),
    Route("rotate, then smooth, then w8a8 dynamic, nothing kept", "onnxruntime", W8A8 + ORT_FMT, "rotate+smooth"),
    Route("smooth, then w8a8 dynamic, --budget 0.9995", "onnxruntime", W8A8 + ORT_FMT + ("--budget", "0.9995"),
          "smooth"),
    Route("naive: w8a8 qdq, nothing kept, in OpenVINO", "openvino", W8A8 + QDQ_FMT + CAL),
    Route("smooth, then w8a8 qdq, nothing kept, in OpenVINO", "openvino", W8A8 + QDQ_FMT + CAL, "smooth"),
    Route("rotate, then w8a8 qdq, nothing kept, in OpenVINO", "openvino", W8A8 + QDQ_FMT + CAL, "rotate"),
    Route("rotate, then smooth, then w8a8 qdq, nothing kept, in OpenVINO", "openvino", W8A8 + QDQ_FMT + CAL,
          "rotate+smooth"),
]

# the activation-scale comparison on CPUs (issue 26), on photos: per tensor (dynamic, static), per token,
# MatMulNBits with accuracy_level 4 (A quantized per block at run time), and the two anchors
SCALE_ROUTES = [
    Route("onnxruntime fp32 windowed (baseline)", "onnxruntime"),
    Route("w8a8 dynamic, format onnxruntime (DynamicQuantizeMatMul)", "onnxruntime", W8A8 + ORT_FMT),
    Route("w8a8 dynamic, u8s8 kernel, format onnxruntime (DynamicQuantizeMatMul)", "onnxruntime",
          W8A8 + ORT_FMT + ("--int8-kernel", "u8s8")),
    Route("w8a8 static (calibrated on the photos), format onnxruntime (MatMulIntegerToFloat)", "onnxruntime",
          W8A8 + ORT_FMT + CAL_PHOTOS),
    Route("w8a8 per token, format onnxruntime (MatMulIntegerToFloat, per-row scale)", "onnxruntime",
          W8A8 + ORT_FMT + ("--activation-scale", "token")),
    Route("w8a8 per token, u8s8 kernel, format onnxruntime", "onnxruntime", W8A8 + ORT_FMT + TOKEN_U8S8),
    Route("w8a8 per token, u8s8 kernel; merger, patch embed, block 0 and the full-attention blocks' attn proj "
          "kept float", "onnxruntime", W8A8 + ORT_FMT + TOKEN_U8S8 + TOKEN_KEEP),
    Route("w8 weight-only, format onnxruntime (MatMulNBits)", "onnxruntime", ("--weights", "int8") + ORT_FMT),
    # per tensor where the fastest int8 kernels are (OpenVINO's AMX/VNNI FullyConnected): mse ranges measured
    # 0.99621 worst centered against percentile's 0.99582; smooth first 0.98663 (judged photos; 3b, random weights)
    Route("w8a8 static qdq (calibrated on the photos, mse ranges), in OpenVINO", "openvino",
          W8A8 + QDQ_FMT + CAL_PHOTOS + ("--calibrate-method", "mse")),
    Route("w8 weight-only qdq, in OpenVINO (its own dynamic int8 activations, groups of 32: its default)", "openvino",
          ("--weights", "int8") + QDQ_FMT),
    Route("w8 weight-only qdq, in OpenVINO (its own dynamic int8 activations, groups of 128)", "openvino-dq128",
          ("--weights", "int8") + QDQ_FMT),
    Route("anchor: onnxruntime quantize_dynamic (QInt8)", "onnxruntime", anchor="ort-dynamic"),
    Route("anchor: NNCF quantize (int8, TRANSFORMER, calibrated on the photos), in OpenVINO", "openvino",
          anchor="nncf-quantize"),
]
