"""quantize pass: each scheme on the tiny export (checker by path, onnxruntime, centered cosine vs fp32,
structure, onnxruntime's optimized graph), against onnxruntime.quantization's quantize_dynamic, on the
dynamic export, keeps, and the numerics (packing, streaming histograms)."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from conftest import TINY, check_written
from passes.quantize import check_scheme, quantize_model
from qvl_surgery.core import quant
from qvl_surgery.analysis.compare import centered_cosine, cosine
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile import load_model, pack_nibbles, save_model

N_LINEARS = 1 + 5 * TINY.depth + 2   # patch embed, qkv/proj/gate/up/down per block, merger's two
N_ACT = 1 + 4 * TINY.depth + 2       # distinct linear inputs (gate and up share theirs)
INTEGER_OPS = {"MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}

# (options, floor of the token-centered cosine vs fp32 on the tiny model, measured value in the comment)
SCHEMES = {
    "w8 qdq": (dict(), 0.9995),                                                        # 0.99991
    "w8a8 qdq": (dict(activations="int8", calibrate="random:2"), 0.999),               # 0.9997
    "w8a16 qdq": (dict(activations="int16", calibrate="random:2"), 0.9997),            # 0.99991
    "w8a8 ort dynamic": (dict(activations="int8", format="onnxruntime"), 0.999),      # 0.99975
    "w8a8 ort static": (dict(activations="int8", format="onnxruntime", calibrate="random:2"), 0.999),  # 0.9997
    "w8a8 ort per token": (dict(activations="int8", format="onnxruntime", activation_scale="token"), 0.999),  # 0.99976
    "w8 ort": (dict(format="onnxruntime"), 0.9995),                                   # 0.99985
    "w4 ort": (dict(weights="int4", block_size=32, format="onnxruntime"), 0.98),       # 0.9847
    "w4 qdq": (dict(weights="int4", block_size=32), 0.98),
}


def _session(path, optimized=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(tiny_448):
    x = np.random.default_rng(7).standard_normal((1024, TINY.patch_dim)).astype(np.float32)
    return x, _session(tiny_448).run(None, {"pixel_values": x})[0]


def _quantize(src, tmp_path, name, **opts):
    model, report = quantize_model(load_model(src), **opts)
    out = save_model(model, tmp_path / f"{name.replace(' ', '_')}.onnx")
    check_written(out)   # onnx.checker by path + an onnxruntime session
    return out, report


def _ops(path):
    m = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return m, counts


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scheme_runs_and_tracks_fp32(tiny_448, reference, tmp_path, scheme):
    opts, floor = SCHEMES[scheme]
    out, report = _quantize(tiny_448, tmp_path, scheme, **opts)
    x, ref = reference
    opt = tmp_path / "optimized.onnx"
    y = _session(out, opt).run(None, {"pixel_values": x})[0]
    c, cc = cosine(ref, y), centered_cosine(ref, y)
    print(f"{scheme}: cosine {c:.6f} centered {cc:.6f}")
    assert cc >= floor and c >= floor, (scheme, c, cc)
    qdq = opts.get("format", "qdq") == "qdq"
    # blocked QDQ keeps the patch embed float: its 1176 inputs are not whole blocks (OpenVINO refuses those)
    partial = ["/patch_embed/proj/Gemm"] if qdq and opts.get("block_size") else []
    n_q = N_LINEARS - len(partial)
    assert len(report.quantized) == n_q
    assert report.kept == ({f"input dim not a multiple of block {opts['block_size']}": partial} if partial else {})

    m, ops = _ops(out)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["qvl_surgery.dtype"] == opts.get("weights", "int8")
    rec = json.loads(meta["qvl_surgery.quantize"])
    assert len(rec["quantized"]) == n_q
    inits = {t.name: t for t in m.graph.initializer}
    if qdq:
        # weights: int8 initializers in the data file, one per-axis DequantizeLinear each, Gemm kept
        assert ops["Gemm"] == N_LINEARS and ops["DequantizeLinear"] >= n_q
        qw = [t for t in inits.values() if t.name.endswith("_quantized")]
        want = TensorProto.INT4 if opts.get("weights") == "int4" else TensorProto.INT8
        assert len(qw) == n_q and all(t.data_type == want for t in qw)
        assert all(t.data_location == TensorProto.EXTERNAL for t in qw if np.prod(t.dims) >= 1024)
        assert not any(t.data_type == TensorProto.FLOAT and t.name.endswith(".weight") and len(t.dims) == 2
                       and t.name not in ("merger.ln_q.weight", *(["patch_embed.proj.weight"] if partial else []))
                       for t in inits.values())
        acts = opts.get("activations", "none")
        assert ops.get("QuantizeLinear", 0) == (0 if acts == "none" else N_ACT)
        opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        assert opset == (21 if acts == "int16" or opts.get("block_size") else 17)
        if acts == "int16":
            zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear"]
            assert all(z.data_type == TensorProto.INT16 for z in zps)
    else:
        # onnxruntime format: every linear is an integer contrib op, in the file and after its optimizer
        assert "Gemm" not in ops and sum(ops.get(k, 0) for k in INTEGER_OPS) == N_LINEARS
        _, opt_ops = _ops(opt)
        assert "Gemm" not in opt_ops and "FusedGemm" not in opt_ops
        assert sum(opt_ops.get(k, 0) for k in INTEGER_OPS) == N_LINEARS
        # what float MatMuls remain are attention's (q k^T and p v per block)
        assert opt_ops.get("MatMul", 0) + opt_ops.get("FusedMatMul", 0) == 2 * TINY.depth
        if ops.get("MatMulIntegerToFloat"):
            # uint8 x uint8 (zero points 128): onnxruntime's int8 x int8 kernel ran 4.6x slower on AVX2
            mm = [n for n in m.graph.node if n.op_type == "MatMulIntegerToFloat"]
            assert all(inits[n.input[1]].data_type == TensorProto.UINT8 and inits[n.input[4]].data_type ==
                       TensorProto.UINT8 and inits[n.input[5]].data_type == TensorProto.UINT8 for n in mm)
        if opts.get("weights") == "int4":
            nb = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
            assert all({a.name: a.i for a in n.attribute}["bits"] == 4 for n in nb)
            assert sum(t.data_type == TensorProto.UINT8 for t in inits.values()) >= N_LINEARS


def test_as_accurate_as_onnxruntime_quantize_dynamic(tiny_448, reference, tmp_path):
    """onnxruntime.quantization's own dynamic int8 result on the same model, against ours."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    theirs = tmp_path / "ort_dynamic.onnx"
    quantize_dynamic(str(tiny_448), str(theirs), weight_type=QuantType.QInt8, per_channel=True)
    ours, _ = _quantize(tiny_448, tmp_path, "ours", activations="int8", format="onnxruntime")
    x, ref = reference
    c_theirs = centered_cosine(ref, _session(theirs).run(None, {"pixel_values": x})[0])
    c_ours = centered_cosine(ref, _session(ours).run(None, {"pixel_values": x})[0])
    print(f"centered cosine: quantize_dynamic {c_theirs:.6f}, ours {c_ours:.6f}")
    assert c_ours >= c_theirs - 1e-5


def test_dynamic_export_keeps_symbolic_dims(tmp_path_factory):
    from qvl_surgery.core.dynamic import export_dynamic
    from qvl_surgery.core.weights import RandomWeights
    d = tmp_path_factory.mktemp("qdyn")
    export_dynamic(RandomWeights(TINY, seed=4), d / "m.onnx", progress=False)
    fp32 = _session(d / "m.onnx")
    for opts, floor in ((dict(activations="int8", format="onnxruntime"), 0.999),
                        (dict(activations="int8", format="onnxruntime", activation_scale="token"), 0.999),
                        (dict(weights="int4", format="onnxruntime"), 0.98),
                        (dict(activations="int8", calibrate="random:1"), 0.999)):
        out, _ = _quantize(d / "m.onnx", d, "_".join(map(str, opts.values())).replace(":", ""), **opts)
        m = onnx.load(str(out), load_external_data=False)
        assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "num_patches"
        assert m.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "num_tokens"
        s = _session(out)
        for grid in ([[1, 16, 16]], [[1, 18, 26], [1, 8, 8]]):
            grid = np.array(grid, np.int64)
            px = np.random.default_rng(3).standard_normal((int(np.prod(grid, 1).sum()), TINY.patch_dim)).astype(np.float32)
            feeds = {"pixel_values": px, "image_grid_thw": grid}
            ref, y = fp32.run(None, feeds)[0], s.run(None, feeds)[0]
            assert y.shape == ref.shape and centered_cosine(ref, y) >= floor, (opts, grid.tolist())


def test_keeps_are_reported_and_recorded(tiny_448, tmp_path):
    out, report = _quantize(tiny_448, tmp_path, "keeps", format="onnxruntime", keep_block=[0],
                            keep_node=["/merger/*"])
    assert len(report.kept["block 0"]) == 5 and len(report.kept["node /merger/*"]) == 2
    assert len(report.quantized) == N_LINEARS - 7
    m, ops = _ops(out)
    assert ops["Gemm"] == 7 and ops["MatMulNBits"] == N_LINEARS - 7
    kept = json.loads({p.key: p.value for p in m.metadata_props}["qvl_surgery.quantize"])["kept"]
    assert kept["/blocks.0/mlp/down_proj/Gemm"] == "block 0"
    assert any("kept (block 0)" in line for line in report.lines())
    with pytest.raises(BadInput, match="matches no linear"):
        quantize_model(load_model(tiny_448), keep_node=["/nothing/*"])


@pytest.mark.parametrize("opts, needle", [
    (dict(weights="int4", activations="int8"), "weight-only"),
    (dict(activations="int16", format="onnxruntime"), "16-bit"),
    (dict(activations="int8"), "calibrate="),   # the library names its parameter; the CLI, its flag
    (dict(weights="int4", format="onnxruntime", block_size=48), "MatMulNBits takes"),
    (dict(activations="int8", activation_scale="token", calibrate="random:2"), "format onnxruntime"),
    (dict(activations="none", format="onnxruntime", activation_scale="token"), "per-token scales are for int8"),
    (dict(activations="int8", format="onnxruntime", activation_scale="token", calibrate="random:2"),
     "nothing to calibrate"),
])
def test_refusals_are_one_line(tiny_448, opts, needle):
    with pytest.raises(BadInput, match=needle):
        quantize_model(load_model(tiny_448), **opts)


# ----------------------------------------------------------------------------- numerics

def test_nbits_packing_round_trips():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 70)).astype(np.float32)
    for bits, block in ((4, 32), (8, 16)):
        q, s = quant.quantize_blocked(w, bits, block)
        packed = quant.pack_nbits(q, bits, block)
        assert packed.shape == (5, -(-70 // block), block * bits // 8)
        if bits == 4:
            codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(5, -1)
        else:
            codes = packed.reshape(5, -1)
        back = (codes[:, :70].astype(np.int16) - (1 << (bits - 1))) * np.repeat(s, block, 1)[:, :70]
        assert np.allclose(back, q * np.repeat(s, block, 1)[:, :70])
        assert np.abs(back - w).max() <= s.max() / 2 + 1e-6
    assert pack_nibbles(np.array([1, -1, -8], np.int8)).tolist() == [0xF1, 0x08]


def test_4_bit_clip_search_and_signed_scale_lower_the_weight_error():
    """4-bit weights: the clip searched per block and the extreme mapped to code -8 (a signed scale)
    leave less squared error than max/7, every code within int4's [-8, 7], and pack as before."""
    w = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)

    def err(**kw):
        q, s = quant.quantize_blocked(w, 4, 32, **kw)
        assert q.min() >= -8 and q.max() <= 7
        back = q * np.repeat(s, 32, 1)
        packed = quant.pack_nbits(q, 4, 32)
        codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(64, -1).astype(np.int16) - 8
        assert np.array_equal(codes, q)
        return float(np.square(back - w).sum())
    plain, search, signed, both = err(), err(search=True), err(signed_scale=True), err(search=True, signed_scale=True)
    assert both < min(search, signed) and max(search, signed) < plain, (plain, search, signed, both)
    assert both < 0.8 * plain


@pytest.mark.parametrize("single_file", [False, True])
def test_modelfile_writes_and_reads_4_bit_tensors_packed(tmp_path, single_file):
    """INT4 / UINT4 computed tensors go to disk two values a byte (ONNX's layout), onnxruntime reads
    them (a DequantizeLinear model), and load_model + read_initializer give the values back."""
    from onnx import helper
    from qvl_surgery.core.modelfile import Computed, Model, read_initializer
    rng = np.random.default_rng(0)
    codes = {"s4": rng.integers(-8, 8, size=(7, 5)).astype(np.int8), "u4": rng.integers(0, 16, size=(7, 5)).astype(np.uint8)}
    inits, sources, nodes, outs = [], {}, [], []
    for name, dt in (("s4", TensorProto.INT4), ("u4", TensorProto.UINT4)):
        t = TensorProto(name=name, data_type=dt, dims=[7, 5])
        t.data_location = TensorProto.EXTERNAL
        inits.append(t)
        sources[name] = Computed(lambda c=codes[name]: c, 18)
        inits.append(helper.make_tensor(name + "_scale", TensorProto.FLOAT, [], [0.5]))
        nodes.append(helper.make_node("DequantizeLinear", [name, name + "_scale"], [name + "_out"]))
        outs.append(helper.make_tensor_value_info(name + "_out", TensorProto.FLOAT, [7, 5]))
    g = helper.make_graph(nodes, "g", [], outs, initializer=inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    out = save_model(Model(proto, sources), tmp_path / "four.onnx", single_file=single_file)
    check_written(out)
    got = _session(out).run(None, {})
    for (name, c), y in zip(codes.items(), got):
        assert np.array_equal(y, c.astype(np.float32) * 0.5)
    back = load_model(out)
    for name, c in codes.items():
        t = back.initializers()[name]
        assert np.array_equal(np.asarray(read_initializer(t, back.sources.get(name))).astype(np.int16), c)



def test_streaming_histogram_merges_and_methods_clip():
    rng = np.random.default_rng(1)
    h = quant.AbsHistogram()
    parts = [(rng.standard_normal(10000) * s).astype(np.float32) for s in (0.1, 1.0, 30.0)]   # range grows twice
    for p in parts:
        h.add(p)
    allv = np.abs(np.concatenate(parts))
    assert h.counts.sum() == allv.size and h.amax == float(allv.max())
    assert h.clip("minmax", 127) == allv.max()
    pct = h.clip("percentile", 127)
    assert abs(pct / np.percentile(allv, quant.PERCENTILE) - 1) <= 2.0 ** -quant.MANTISSA_BITS
    assert 0 < h.clip("mse", 127) <= allv.max()


def test_calibration_records_only_what_it_is_asked(tiny_448):
    model = load_model(tiny_448)
    x = np.random.default_rng(0).standard_normal((1024, TINY.patch_dim)).astype(np.float32)
    names = ["/patch_embed/Gather_output_0", "/blocks.0/mlp/Mul_output_0"]
    rec = quant.record_ranges(model, [{"pixel_values": x}], names)
    assert set(rec.histograms) == set(names) and rec.inputs == 1
    # the recorded tensor is exactly onnxruntime's
    from qvl_surgery.core.modelfile import sibling_model
    proto = onnx.load(str(tiny_448), load_external_data=False)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(names[1], TensorProto.FLOAT, None))
    with sibling_model(tiny_448, proto) as tmp:
        v = _session(tmp).run([names[1]], {"pixel_values": x})[0]
    assert np.isclose(rec.histograms[names[1]].amax, np.abs(v).max(), rtol=1e-4)


@pytest.mark.parametrize("kind", ["outlier", "overflow"])
def test_stand_ins_defeat_naive_w8a8_and_the_merger_is_where(stand_ins, kind, tmp_path, reference):
    """What the stand-ins are for: the plain cosine stays near 1 while the token-centered one shows the
    content destroyed by per-tensor int8 activations. The merger's RMSNorm is where it happens (the
    blocks' residual carries the content past their own quantized linears): keeping its two linears
    float restores it. 16-bit activations survive the outliers (~1e3) but not the overflow (4.9e4,
    beyond int16's range over the normal channels)."""
    x = reference[0]
    src = stand_ins[kind]
    ref = _session(src).run(None, {"pixel_values": x})[0]
    if kind == "outlier":   # the residual carries ~1e3 in the chosen channels from block 1 on
        from qvl_surgery.analysis.compare import block_output_names
        after = block_output_names(src)
        rec = quant.record_ranges(load_model(src), [{"pixel_values": x}], after)
        assert rec.histograms[after[0]].amax < 50 and all(rec.histograms[n].amax > 500 for n in after[1:])
    naive, _ = _quantize(src, tmp_path, "naive", activations="int8", format="onnxruntime")
    y = _session(naive).run(None, {"pixel_values": x})[0]
    assert cosine(ref, y) > 0.999 and centered_cosine(ref, y) < 0.5
    kept, report = _quantize(src, tmp_path, "kept", activations="int8", format="onnxruntime", keep_node=["/merger/*"])
    y = _session(kept).run(None, {"pixel_values": x})[0]
    assert centered_cosine(ref, y) > 0.999 and 0 < report.kept_share[0] < 0.1
    a16, _ = _quantize(src, tmp_path, "a16", activations="int16", calibrate="random:2")
    y = _session(a16).run(None, {"pixel_values": x})[0]
    assert (centered_cosine(ref, y) > 0.999) == (kind == "outlier")


def test_compare_runs_a_qdq_file_in_openvino(tiny_448, tmp_path):
    from conftest import import_client, cli
    import_client("openvino")
    q, _ = _quantize(tiny_448, tmp_path, "ovq", activations="int8", calibrate="random:2")
    rep = tmp_path / "rep.json"
    r = cli("compare", tiny_448, q, "--runtime", "openvino", "--json", rep)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(rep.read_text())
    assert "(openvino)" in out["cand"] and 0.998 < out["outputs"][0]["centered_cosine"] < 1.0


@pytest.mark.slow
def test_budget_keeps_the_fewest_multiply_adds_that_meet_it(stand_ins, tmp_path, reference):
    """On the outlier stand-in, --budget finds that the merger alone decides the content: it keeps
    only the merger float, measures the cosine it promised, and the file delivers it."""
    src = stand_ins["outlier"]
    out, report = _quantize(src, tmp_path, "budget", activations="int8", format="onnxruntime", budget=0.9995)
    b = report.budget
    assert b["groups_kept"] == ["merger"] and b["achieved"] >= 0.9995 and 0 < b["kept_share_of_multiply_adds"] < 0.1
    assert b["evaluations"]["0"] < 0.5 and b["sensitivity"][0]["group"] == "merger"
    x = reference[0]
    ref = _session(src).run(None, {"pixel_values": x})[0]
    assert centered_cosine(ref, _session(out).run(None, {"pixel_values": x})[0]) >= 0.999
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    meta = json.loads(props["qvl_surgery.quantize"])
    assert meta["budget"]["groups_kept"] == ["merger"]


def test_per_token_scales_are_one_matmul_integer_to_float_per_linear(tiny_448, reference, tmp_path):
    """activation_scale=token: each distinct linear input quantized once, its [M, 1] scale computed at
    run time (max |row| / 127), MatMulIntegerToFloat on uint8 x uint8; equal to numpy's per-row
    fake quantization of the same weights, and recorded in the metadata."""
    out, report = _quantize(tiny_448, tmp_path, "token", activations="int8", format="onnxruntime",
                            activation_scale="token")
    m, ops = _ops(out)
    assert ops["MatMulIntegerToFloat"] == N_LINEARS and "DynamicQuantizeMatMul" not in ops
    assert ops["ReduceMax"] == N_ACT and ops.get("Cast", 0) + ops.get("QuantizeLinear", 0) >= N_ACT
    assert "per token" in report.scheme
    meta = json.loads({p.key: p.value for p in m.metadata_props}["qvl_surgery.quantize"])
    assert meta["activation_scale"] == "token" and meta["calibrate"] is None


def test_per_token_scales_add_the_bias_after_onnxruntimes_op(tiny_448, reference, tmp_path):
    """onnxruntime 1.32's MatMulIntegerToFloat scales its bias input by a per-row A scale: a biased
    linear's bias is a separate Add (without it the tiny model's plain cosine fell to 0.939). Per token
    tracks fp32 at least as well as the per-tensor dynamic scale on random weights (0.99976 vs 0.99976:
    the tiny model's tokens are alike; the stand-ins' outliers sit in channels, where a per-token scale
    cannot help)."""
    x, ref = reference
    got = {}
    for scale in ("tensor", "token"):
        out, _ = _quantize(tiny_448, tmp_path, scale, activations="int8", format="onnxruntime", activation_scale=scale)
        y = _session(out).run(None, {"pixel_values": x})[0]
        got[scale] = (cosine(ref, y), centered_cosine(ref, y))
    m, ops = _ops(tmp_path / "token.onnx")
    biased = [n for n in m.graph.node if n.op_type == "MatMulIntegerToFloat" and len(n.input) > 6 and n.input[6]]
    assert not biased and ops["Add"] > N_LINEARS
    assert got["token"][0] >= got["tensor"][0] - 1e-4 and got["token"][1] >= got["tensor"][1] - 1e-4, got


def test_per_token_u8s8_kernel_matches_numpy_and_u8u8(tiny_448, reference, tmp_path):
    """int8_kernel=u8s8: weights int8 without a zero point (VNNI's u8 x s8); a Gemm's input quantized
    by one per-axis QuantizeLinear whose codes equal numpy's round(x / (max|row| / 127)) + 128; the
    output equals the u8u8 file's (the same integers)."""
    x, ref = reference
    outs = {}
    for kernel in ("u8u8", "u8s8"):
        out, _ = _quantize(tiny_448, tmp_path, kernel, activations="int8", format="onnxruntime",
                           activation_scale="token", int8_kernel=kernel)
        outs[kernel] = _session(out).run(None, {"pixel_values": x})[0]
    m, ops = _ops(tmp_path / "u8s8.onnx")
    assert ops["QuantizeLinear"] >= 1
    inits = {t.name: t for t in m.graph.initializer}
    mm = [n for n in m.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.INT8 and not n.input[5] for n in mm)
    np.testing.assert_allclose(outs["u8s8"], outs["u8u8"], rtol=1e-4, atol=1e-4 * np.abs(outs["u8u8"]).max())
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
    full = onnx.load(str(tmp_path / "u8s8.onnx"))
    full.graph.output.extend([onnx.helper.make_tensor_value_info(t, dt, None)
                              for t, dt in ((q.input[0], TensorProto.FLOAT), (q.output[0], TensorProto.UINT8))])
    probe = tmp_path / "probe.onnx"
    onnx.save(full, str(probe))
    a, codes = _session(probe).run([q.input[0], q.output[0]], {"pixel_values": x})
    scale = np.maximum(np.abs(a).max(-1, keepdims=True) / np.float32(127), np.float32(1e-30))
    want = np.clip(np.rint(a / scale) + 128, 0, 255).astype(np.uint8)
    assert codes.dtype == np.uint8 and np.abs(codes.astype(int) - want).max() <= 1 and (codes == want).mean() > 0.999


def test_u8s8_kernel_is_refused_outside_int8_onnxruntime():
    with pytest.raises(BadInput, match="kernel choice"):
        check_scheme(weights="int8", activations="none", format="onnxruntime", block_size=None, int8_kernel="u8s8")


# ----------------------------------------------------------------------------- --target

def test_rknn_emulation_quantizes_what_rknn_quantizes(tiny_448, reference, tmp_path):
    """target rknn-int8: a Q/DQ after every computed float activation rknn quantizes (its step-1 graph,
    rknn-toolkit2 2.5.0): not after data movement (Reshape/Transpose/Gather, RoPE's Neg), not inside
    what rknn fuses (RMSNorm, SiLU's Sigmoid, GELU's chain, Q.K before its scale); weights rounded per
    channel; a kept linear's weight, output and input (back through data movement) stay float. Still
    close to fp32 on random weights."""
    from passes.quantize.target import (activation_tensors, emulate_rknn, fused_internals, kept_inputs,
                                        record_min_max, residual_stream)
    from qvl_surgery.core.linears import find_linears
    x, ref = reference
    model = load_model(tiny_448)
    tensors = activation_tensors(model)
    ops = {o: n.op_type for n in model.graph.node for o in n.output}
    assert tensors and not [t for t in tensors if ops.get(t) in ("Reshape", "Transpose", "Gather", "Neg")]
    inside = fused_internals(model)
    assert not inside & set(tensors)
    assert {ops[t] for t in inside} == {"Pow", "ReduceMean", "Add", "Sqrt", "Div", "Sigmoid", "Erf", "Mul", "MatMul"}
    assert {"/merger/gelu/Mul_half_output_0", "/blocks.0/mlp/act/Mul_output_0", "/blocks.0/norm1/Mul_output_0",
            "/blocks.1/attn/Softmax_output_0", "/blocks.1/attn/Div_scale_output_0"} <= set(tensors)
    assert {"/merger/gelu/Erf_output_0", "/merger/gelu/Mul_output_0", "/blocks.0/mlp/act/Sigmoid_output_0",
            "/blocks.0/norm1/Div_output_0", "/blocks.1/attn/MatMul_qk_output_0"} <= inside
    assert residual_stream(model) <= set(tensors)          # the residual Adds are activations too
    ranges = record_min_max(model, [{"pixel_values": x}], tensors)
    linears = find_linears(model, [])
    kept = {lin.name: "test" for lin in linears if lin.name.startswith("/merger/")}
    floated = kept_inputs(model, linears, kept)
    assert {"/merger/ln_q/Mul_output_0", "/merger/gelu/Mul_half_output_0"} <= floated
    emu = emulate_rknn(model, ranges, linears, kept)
    q = {n.name[:-len("/rknn/QuantizeLinear")] for n in emu.graph.node if n.op_type == "QuantizeLinear"}
    outs = {lin.node.output[0] for lin in linears if lin.name in kept}
    assert q == set(ranges) - floated - outs
    ins = {i for n in emu.graph.node for i in n.input}
    kept_lin = next(lin for lin in linears if lin.name in kept)
    assert kept_lin.weight in ins and f"{linears[1].weight}/rknn_int8" in ins
    y = _session(save_model(emu, tmp_path / "emu.onnx")).run(None, {"pixel_values": x})[0]
    assert 0.9 < centered_cosine(ref, y) < 0.99999


def test_rknn_budget_keeps_the_merger_of_the_outlier_stand_in(stand_ins):
    """The outlier stand-in in rknn's arithmetic (its residual stream at 16 bits): the merger's first
    linear writes a per-channel constant over a tiny image-dependent part, which int8 erases; the budget
    keeps the merger alone (rknn-toolkit2 2.5.0's simulator with that config: 0.998 centered on photos,
    scripts/toolchains-proof). rknn's default int8 build, the residual included, reaches no budget."""
    model = load_model(stand_ins["outlier"])
    _, report = quantize_model(model, activations="int8", format="onnxruntime", target="rknn", budget=0.99,
                               calibrate="random:1")
    b = report.budget
    assert b["groups_kept"] == ["merger"] and b["achieved"] >= 0.99 and b["evaluations"]["0"] < 0.5
    with pytest.raises(BadInput, match="without a budget"):
        quantize_model(model, activations="int8", format="onnxruntime", target="rknn")
    with pytest.raises(BadInput, match="not reachable in rknn-int8's arithmetic"):
        quantize_model(model, activations="int8", format="onnxruntime", target="rknn-int8", budget=0.995,
                       calibrate="random:1")
