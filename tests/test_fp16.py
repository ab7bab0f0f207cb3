"""fp16 pass: island structure, weight dtypes, numerics under emulation, calibration, compare."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_one_line_error, TINY, check_written, cli, tiny_pixels
from passes.fp16 import convert_fp16
from qvl_surgery.core.emulate import emulate
from qvl_surgery.core.export import export
from qvl_surgery.core.modelfile import load_model, save_model
from qvl_surgery.core.runners import run_model
from qvl_surgery.core.weights import RandomWeights

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
SIZE = (448, 448)


def _cos(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _types(path):
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    t = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    t.update({i.name: i.data_type for i in m.graph.initializer})
    return m, t


def _convert(src, tmp_path, name="f16.onnx", **opts):
    model, report = convert_fp16(load_model(src), **opts)
    out = save_model(model, tmp_path / name)
    check_written(out)
    return out, report


def test_keep_silu_islands_are_whole_patterns(tiny_448, tmp_path):
    out, report = _convert(tiny_448, tmp_path, keep_silu_fp32=True)
    m, types = _types(out)
    prod = {o: n for n in m.graph.node for o in n.output}
    sigs = [n for n in m.graph.node if n.op_type == "Sigmoid"]
    assert len(sigs) == TINY.depth and len(report.kept["silu"]) == 2 * TINY.depth
    for sig in sigs:
        x = sig.input[0]
        mul = next(n for n in m.graph.node if n.op_type == "Mul" and sig.output[0] in n.input)
        # one Cast into fp32 feeds both Sigmoid and Mul; no Cast between them
        assert x in mul.input
        cast_in = prod[x]
        assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == F32
        assert types[sig.output[0]] == F32 and types[mul.output[0]] == F32
        # one Cast back after the Mul, and nothing else reads the fp32 product
        readers = [n for n in m.graph.node if mul.output[0] in n.input]
        assert len(readers) == 1 and readers[0].op_type == "Cast" and readers[0].attribute[0].i == F16
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2 * TINY.depth  # exactly in + out per island: none inside, none redundant
    # every weight is fp16; non-float tables untouched
    for t in m.graph.initializer:
        assert t.data_type in (F16, TensorProto.INT64), (t.name, t.data_type)


def test_rmsnorm_and_silu_islands_merge_and_keep_scales_fp32(tiny_448, tmp_path):
    out, report = _convert(tiny_448, tmp_path, keep_silu_fp32=True, keep_rmsnorm_fp32=True)
    m, types = _types(out)
    n_norm = 2 * TINY.depth + 1
    assert len(report.kept["rmsnorm"]) == 6 * n_norm
    inits = {t.name: t for t in m.graph.initializer}
    for b in range(TINY.depth):
        assert inits[f"blocks.{b}.norm1.weight"].data_type == F32
        assert inits[f"blocks.{b}.attn.qkv.weight"].data_type == F16
    prod = {o: n for n in m.graph.node for o in n.output}
    # no Cast inside an island: every input of an island node is fp32 and comes from an
    # island node, a Cast into fp32, or an fp32 initializer
    kept = report.kept_nodes
    for n in m.graph.node:
        if n.name in kept:
            for i in n.input:
                assert types.get(i) == F32, (n.name, i)
                if i in prod and prod[i].op_type == "Cast":
                    assert prod[i].attribute[0].i == F32
    assert len([n for n in m.graph.node if n.op_type == "Cast"]) == report.casts


def test_weight_read_by_fp16_and_fp32_nodes_is_stored_in_both(tmp_path):
    w = np.linspace(-2, 2, 64, dtype=np.float32).reshape(8, 8)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
         helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),
         helper.make_node("Mul", ["a", "s"], ["silu"], name="mul"),
         helper.make_node("Add", ["silu", "w"], ["y"], name="add_w")], "g",
        [helper.make_tensor_value_info("x", F32, [8, 8])], [helper.make_tensor_value_info("y", F32, [8, 8])],
        initializer=[numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    model, report = convert_fp16(load_model(tmp_path / "m.onnx"), keep_node=["add_w"], keep_io_types=True)
    assert report.duplicated_weights == ["w"]
    out = save_model(model, tmp_path / "h.onnx")
    inits = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert inits["w"].data_type == F16 and inits["w__fp32"].data_type == F32
    assert np.array_equal(numpy_helper.to_array(inits["w__fp32"]), w)
    x = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    ref = run_model(tmp_path / "m.onnx", {"x": x})["y"]
    got = emulate(out, {"x": x})["y"]
    assert np.abs(got.astype(np.float32) - ref).max() < 2e-2


def test_constants_clamped_and_counted_inf_kept(tmp_path):
    big = np.array([1e6, -1e6, 3.0, np.inf, -np.inf, 1e-6], np.float32)
    g = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"], name="add")], "g",
                          [helper.make_tensor_value_info("x", F32, [6])], [helper.make_tensor_value_info("y", F32, [6])],
                          initializer=[numpy_helper.from_array(big, "c")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    model, report = convert_fp16(load_model(tmp_path / "m.onnx"))
    save_model(model, tmp_path / "h.onnx")
    c = numpy_helper.to_array(onnx.load(str(tmp_path / "h.onnx")).graph.initializer[0])
    assert report.clamped == {"c": 2}
    assert c[0] == 65504 and c[1] == -65504 and c[2] == 3 and np.isposinf(c[3]) and np.isneginf(c[4])
    assert c[5] != 0  # eps 1e-6 keeps its meaning (an fp16 subnormal)


@pytest.mark.parametrize("opts,min_cos", [({}, 0.999), ({"keep_silu_fp32": True}, 0.999),
                                          ({"keep_silu_fp32": True, "keep_rmsnorm_fp32": True}, 0.999)])
def test_fp16_numerics_under_emulation(tiny_448, tmp_path, opts, min_cos):
    out, _ = _convert(tiny_448, tmp_path, **opts)
    px = tiny_pixels(SIZE, seed=4)
    ref = run_model(tiny_448, {"pixel_values": px})["image_embeds"]
    got = emulate(out, {"pixel_values": px})["image_embeds"]
    assert got.dtype == np.float16
    got = got.astype(np.float32)
    assert np.isfinite(got).all() and _cos(ref, got) >= min_cos
    assert 0 < np.abs(ref - got).max() < 5e-3  # rounded (not bit-equal to fp32) yet close


def test_emulation_rounds_where_onnxruntime_cpu_does_not(tmp_path):
    # Cast fp32 -> fp16 -> Relu -> Cast fp32: onnxruntime's CPU provider may return unrounded values.
    g = helper.make_graph([helper.make_node("Cast", ["x"], ["h"], to=F16), helper.make_node("Relu", ["h"], ["r"]),
                           helper.make_node("Cast", ["r"], ["y"], to=F32)], "g",
                          [helper.make_tensor_value_info("x", F32, [4])], [helper.make_tensor_value_info("y", F32, [4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "c.onnx"))
    x = np.array([1.0001, 2.0003, 3.1416, 1000.1], np.float32)
    y = emulate(tmp_path / "c.onnx", {"x": x})["y"]
    assert np.array_equal(y, x.astype(np.float16).astype(np.float32))


class _HotWeights(RandomWeights):
    """Weights that drive the residual stream past 1e4 (as the real checkpoint's block 31 does)."""

    def array(self, name):
        a = super().array(name)
        if name in ("blocks.1.mlp.down_proj.bias", "blocks.2.mlp.down_proj.bias"):
            a[:8] = 4.0e4  # two blocks: the residual reaches 8e4, past fp16's 65504
        return a


@pytest.fixture(scope="module")
def hot_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("hot")
    export(_HotWeights(TINY, seed=0), d / "hot.onnx", SIZE, progress=False)
    return d / "hot.onnx"


@pytest.mark.slow
def test_overflow_plain_fp16_breaks_and_calibrate_keeps_it_finite(hot_model, tmp_path):
    px = tiny_pixels(SIZE, seed=1)
    np.savez(tmp_path / "calib.npz", pixel_values=px)
    ref = run_model(hot_model, {"pixel_values": px})["image_embeds"]
    assert np.isfinite(ref).all()
    r = cli("fp16", hot_model, "-o", tmp_path / "plain.onnx", "-q")
    assert r.returncode == 0, r.stderr
    assert "calibration" not in json.loads(load_model(tmp_path / "plain.onnx").metadata()["qvl_surgery.fp16_kept"])
    plain = emulate(tmp_path / "plain.onnx", {"pixel_values": px})["image_embeds"].astype(np.float32)
    assert not np.isfinite(plain).all()
    r = cli("fp16", hot_model, "-o", tmp_path / "cal.onnx", "-q", "--calibrate", tmp_path / "calib.npz")
    assert r.returncode == 0, r.stderr
    assert json.loads(load_model(tmp_path / "cal.onnx").metadata()["qvl_surgery.fp16_kept"])["calibration"] > 0
    cal = emulate(tmp_path / "cal.onnx", {"pixel_values": px})["image_embeds"].astype(np.float32)
    assert np.isfinite(cal).all() and _cos(ref, cal) > 0.999
    # the compare command says the same: exit 1 for plain, 0 for calibrated
    assert cli("compare", hot_model, tmp_path / "plain.onnx", "--emulate-fp16", "--inputs",
                   tmp_path / "calib.npz").returncode == 1
    r = cli("compare", hot_model, tmp_path / "cal.onnx", "--emulate-fp16", "--inputs", tmp_path / "calib.npz",
                "--atol", "0.05", "--rtol", "0.05")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_compare_per_block_and_polygraphy_round_trip(tiny_448, tmp_path):
    r = cli("fp16", tiny_448, "-o", tmp_path / "h.onnx", "--keep-silu-fp32", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("compare", tiny_448, tmp_path / "h.onnx", "--emulate-fp16", "--per-block", "--save-outputs",
                tmp_path / "out.json", "--save-inputs", tmp_path / "in.json", "--json", tmp_path / "rep.json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert [b["name"] for b in rep["per_block"]] == [f"blocks.{b}.output" for b in range(TINY.depth)]
    assert rep["outputs"][0]["cosine"] > 0.999
    poly = os.path.join(os.path.dirname(sys.executable), "polygraphy")
    p = subprocess.run([poly, "run", str(tiny_448), "--onnxrt", "--load-inputs", str(tmp_path / "in.json"),
                        "--load-outputs", str(tmp_path / "out.json"), "--atol", "1e-3", "--rtol", "1e-3"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # the plugin's runners inside polygraphy run itself
    p = subprocess.run([poly, "run", str(tmp_path / "h.onnx"), "--onnxrt", "--qvl-emulate-fp16",
                        "--atol", "1e-2", "--rtol", "1e-2"], capture_output=True, text=True)
    assert p.returncode == 0 and "qvl-emulate-fp16" in p.stdout + p.stderr, p.stdout[-3000:] + p.stderr[-3000:]


def test_tight_tolerance_fails_with_exit_1(tiny_448, tmp_path):
    cli("fp16", tiny_448, "-o", tmp_path / "h.onnx", "-q")
    r = cli("compare", tiny_448, tmp_path / "h.onnx", "--emulate-fp16", "--atol", "1e-9", "--rtol", "1e-9")
    assert r.returncode == 1, r.stdout + r.stderr


def test_fp16_then_split_chain_under_emulation(tiny_448, tmp_path):
    cli("fp16", tiny_448, "-o", tmp_path / "h.onnx", "--keep-silu-fp32", "-q")
    r = cli("split", tmp_path / "h.onnx", "--parts", "3", "-o", tmp_path / "parts", "-q")
    assert r.returncode == 0, r.stderr
    px = tiny_pixels(SIZE, seed=2)
    whole = emulate(tmp_path / "h.onnx", {"pixel_values": px})["image_embeds"]
    chain = emulate(tmp_path / "parts", {"pixel_values": px})["image_embeds"]
    assert np.array_equal(whole, chain)




def test_fp16_bad_input(tiny_448, tmp_path):
    out = tmp_path / "o.onnx"
    assert "not an ONNX op type" in assert_one_line_error(cli("fp16", tiny_448, "-o", out, "--keep-op", "Sigmoidd"))
    assert "matches no node" in assert_one_line_error(cli("fp16", tiny_448, "-o", out, "--keep-node", "/nope/*"))
    assert "overwrite the input" in assert_one_line_error(cli("fp16", tiny_448, "-o", tiny_448, "--force"))
    assert "no such file" in assert_one_line_error(cli("fp16", tmp_path / "missing.onnx", "-o", out))
    np.savez(tmp_path / "bad.npz", pixel_values=np.zeros((3, 1176), np.float32))
    assert "shape" in assert_one_line_error(cli("fp16", tiny_448, "-o", out, "--calibrate", tmp_path / "bad.npz"))
    assert "shape" in assert_one_line_error(cli("compare", tiny_448, tiny_448, "--inputs", tmp_path / "bad.npz"))
    assert not out.exists() and not (tmp_path / "o.onnx.data").exists()


def test_image_inputs_for_compare_and_calibrate(tiny_448, tmp_path):
    from PIL import Image
    img = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)).save(img)
    from qvl_surgery.core.inputs import ModelKind, image_feeds
    px = image_feeds(ModelKind.of(tiny_448), [str(img)])["pixel_values"]
    assert px.shape == (1024, 1176) and px.dtype == np.float32
    r = cli("fp16", tiny_448, "-o", tmp_path / "h.onnx", "--calibrate", img, "-q")
    assert r.returncode == 0 and "calibration:" in r.stdout, r.stderr
    r = cli("compare", tiny_448, tmp_path / "h.onnx", "--image", img, "--emulate-fp16")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("compare", tiny_448, tmp_path / "h.onnx", "--image", tmp_path / "missing.png")
    assert_one_line_error(r, "no such image file")
