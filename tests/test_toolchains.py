"""Issue 17's measurements and hand-offs on tiny stand-ins: the outlier report (inspect
--activations), the sensitivity report (JSON + PNG), rotate then smooth, and one keep-list written
for every toolchain (checked with onnxruntime's own quantizer, which reads nodes_to_exclude)."""
import json
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import TINY, assert_one_line_error, check_written, cli
from qvl_surgery.analysis.compare import centered_cosine
from qvl_surgery.core.runners import run_model
from qvl_surgery.analysis.toolchains import edit_rknn_cfg


@pytest.fixture(scope="module")
def models(windowed, tmp_path_factory):
    """The tiny outlier and overflow stand-ins, windowed, and the outlier one smoothed."""
    sm = tmp_path_factory.mktemp("smoothed") / "outlier_smoothed.onnx"
    r = cli("smooth", windowed["outlier"], "-o", sm, "-q", "--calibrate", "random:2")
    assert r.returncode == 0, r.stderr
    return {"outlier": windowed["outlier"], "overflow": windowed["overflow"], "smoothed": sm}


def _feeds(seed=0):
    return {"pixel_values": np.random.default_rng(seed).standard_normal((1024, TINY.patch_dim)).astype(np.float32)}


def test_activation_report_flags_the_outliers_and_clears_after_smooth(models):
    r = cli("inspect", models["outlier"], "--activations", "--json")
    assert r.returncode == 0, r.stderr
    acts = json.loads(r.stdout)["activations"]
    flagged = acts["flagged"]
    # the massive channels start in block 1's residual: every normed linear input after it is crushed
    assert {"blocks.2", "blocks.3", "merger"} <= set(flagged), flagged
    assert all(any("int8 per-tensor rounds" in f for f in fl) for fl in flagged.values())
    res = {g: next(t for t in ts if t["role"] == "residual") for g, ts in acts["blocks"].items() if g != "merger"}
    assert res["blocks.2"]["max_abs"] > 100 * res["blocks.0"]["max_abs"]
    qkv = next(t for t in acts["blocks"]["blocks.2"] if "qkv" in t["role"])
    assert qkv["int8_per_tensor_zeroed"] > 0.5
    # after smooth: the same fp32 function, no linear input left for int8 to crush
    r = cli("inspect", models["smoothed"], "--activations", "--json")
    after = json.loads(r.stdout)["activations"]
    assert not after["flagged"], after["flagged"]
    big = lambda a: max(t["max_abs"] for ts in a["blocks"].values() for t in ts if t["role"] != "residual")
    assert big(acts) > 3 * big(after)
    # the overflow stand-in: the last block's residual is flagged against fp16's limit
    r = cli("inspect", models["overflow"], "--activations")
    assert r.returncode == 0, r.stderr
    last = next(l for l in r.stdout.splitlines() if l.strip().startswith(f"blocks.{TINY.depth - 1} "))
    assert "fp16" in last, r.stdout


def test_activation_report_refuses_a_missing_calibration_file(models, tmp_path):
    r = cli("inspect", models["outlier"], "--activations", "--calibrate", str(tmp_path / "no.npz"))
    assert_one_line_error(r, "no such file")


@pytest.mark.slow
def test_sensitivity_writes_json_and_png_and_sees_the_merger(models, tmp_path):
    out = tmp_path / "sens"
    r = cli("sensitivity", models["outlier"], models["smoothed"], "--label", "as is", "--label",
                "smoothed", "--inputs", "random:1", "--per-linear", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "sensitivity.json").read_text())
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before, after = doc["models"]
    groups = [g["group"] for g in before["groups"]]
    assert groups == ["patch_embed", *[f"blocks.{i}" for i in range(TINY.depth)], "merger"]
    assert abs(sum(g["share"] for g in before["groups"]) - 1) < 1e-4
    err = lambda m, g: next(x["alone_error"] for x in m["groups"] if x["group"] == g)
    # on the outlier stand-in the merger's input is the one int8 crushes; smooth removes that
    assert err(before, "merger") > 0.1 and err(after, "merger") < 1e-2, (before, after)
    assert before["all_quantized_centered_cosine"] < 0.5 < 0.99 < after["all_quantized_centered_cosine"]
    assert len(before["linears"]) == 5 * TINY.depth + 3
    # per linear agrees with per group where a group has one linear
    pe = next(x for x in before["linears"] if x["group"] == "patch_embed")
    assert pe["alone_error"] == pytest.approx(err(before, "patch_embed"), rel=1e-3, abs=1e-9)
    r = cli("sensitivity", models["outlier"], "-o", out, "-q")
    assert_one_line_error(r, "already holds an earlier output")


def test_rotate_then_smooth_is_exact_and_quantizes_like_smooth(models, tmp_path):
    rot, rs = tmp_path / "rot.onnx", tmp_path / "rs.onnx"
    assert cli("rotate", models["outlier"], "-o", rot, "-q").returncode == 0
    r = cli("smooth", rot, "-o", rs, "-q", "--calibrate", "random:2")
    assert r.returncode == 0, r.stderr
    check_written(rs)
    x = _feeds(3)
    a, b = run_model(models["outlier"], x)["image_embeds"], run_model(rs, x)["image_embeds"]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    cos = {}
    for name, path in (("rotated", rot), ("rotated+smoothed", rs)):
        q = tmp_path / f"q_{name}.onnx"
        assert cli("quantize", path, "-o", q, "-q", "--activations", "int8", "--format", "onnxruntime").returncode == 0
        cos[name] = centered_cosine(a, run_model(q, x)["image_embeds"])
    # a rotation keeps the constant channel offset (it needs smooth's shift): measured 0.43 vs 0.9998
    assert cos["rotated"] < 0.9 and cos["rotated+smoothed"] > 0.999, cos


@pytest.mark.slow
def test_toolchain_configs_from_a_budget(models, tmp_path):
    """quantize --budget records its keep-list; toolchains turns it into each quantizer's config. The
    onnxruntime one is proven with onnxruntime's own quantize_dynamic: the named nodes stay float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src = models["outlier"]
    q = tmp_path / "q.onnx"
    r = cli("quantize", src, "-o", q, "-q", "--activations", "int8", "--format", "onnxruntime",
                "--budget", "0.99")
    assert r.returncode == 0, r.stderr
    kept = _meta(q)["kept"]
    assert kept and all(k.startswith("/merger/") for k in kept), kept
    np.savez(tmp_path / "a.npz", **_feeds(1))
    np.savez(tmp_path / "b.npz", **_feeds(2))
    out = tmp_path / "configs"
    r = cli("toolchains", src, "--keep-from", q, "--dataset", f"{tmp_path / 'a.npz'},{tmp_path / 'b.npz'}",
                "-o", out)
    assert r.returncode == 0, r.stderr
    ort_cfg = json.loads((out / "onnxruntime.json").read_text())
    # quantize_dynamic renames each Gemm <name>_MatMul before it matches: both names are listed
    assert sorted(ort_cfg["nodes_to_exclude"]) == sorted([*kept, *(k + "_MatMul" for k in kept)])
    assert json.loads((out / "nncf_ignored_scope.json").read_text()) == {"names": list(kept)}
    keep = json.loads((out / "keep.json").read_text())
    assert 0 < keep["kept_share"] < 0.2 and keep["budget"]["target_centered_cosine"] == 0.99
    p2 = json.loads((out / "pulsar2_config.json").read_text())
    assert p2["quant"]["layer_configs"] == [{"layer_names": list(kept), "data_type": "U16"}]
    assert p2["quant"]["input_configs"][0]["tensor_name"] == "pixel_values"
    # calibration sets in the model's own layout
    lines = (out / "calib" / "rknn" / "dataset.txt").read_text().split("\n")
    assert [l for l in lines if l] == ["0000_pixel_values.npy", "0001_pixel_values.npy"]
    arr = np.load(out / "calib" / "rknn" / "0001_pixel_values.npy")
    assert arr.shape == (1024, TINY.patch_dim) and np.array_equal(arr, _feeds(2)["pixel_values"])
    with tarfile.open(out / p2["quant"]["input_configs"][0]["calibration_dataset"]) as t:
        assert sorted(t.getnames()) == ["0000.npy", "0001.npy"]
    rk = json.loads((out / "rknn_hybrid.json").read_text())
    assert rk["int16"] == list(kept) and rk["dataset"] == "calib/rknn/dataset.txt"
    # onnxruntime's own quantizer, given the config: the kept linears stay float (a MatMul, not MatMulInteger)
    dq = tmp_path / "ort.onnx"
    quantize_dynamic(str(src), str(dq), weight_type=QuantType.QInt8, **ort_cfg)
    nodes = {n.name: n.op_type for n in onnx.load(str(dq)).graph.node}
    assert all(nodes.get(k + "_MatMul") == "MatMul" for k in kept), {k: nodes.get(k + "_MatMul") for k in kept}
    x = _feeds(0)
    ref = run_model(src, x)["image_embeds"]
    plain = tmp_path / "ort_plain.onnx"
    quantize_dynamic(str(src), str(plain), weight_type=QuantType.QInt8)
    with_cfg, without = (centered_cosine(ref, run_model(p, x)["image_embeds"]) for p in (dq, plain))
    assert with_cfg > 0.99 > without, (with_cfg, without)


def _meta(path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    return json.loads(next(p.value for p in m.metadata_props if p.key == "qvl_surgery.quantize"))


def test_toolchains_refusals(models, tmp_path):
    src = models["outlier"]
    assert_one_line_error(cli("toolchains", src, "-o", tmp_path / "c"), "--keep-from")
    assert_one_line_error(cli("toolchains", src, "--keep-node", "/nope/*", "-o", tmp_path / "c"), "/nope/*")
    assert_one_line_error(cli("toolchains", src, "--keep-from", src, "-o", tmp_path / "c"),
                          "qvl_surgery.quantize")
    assert not (tmp_path / "c").exists()
    r = cli("toolchains", src, "--keep-block", "1", "-o", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "c" / "nncf_ignored_scope.json").read_text())["names"]) == 5
    assert_one_line_error(cli("toolchains", src, "--keep-block", "1", "-o", tmp_path / "c"), "--force")


def test_rknn_hybrid_cfg_names_rknns_own_layers(models, tmp_path):
    """rknn-toolkit2 2.5.0's hybrid_quantization_step1 output for this very file, kept in
    tests/data/rknn_step1 (its graph, with every weight stripped but the three Convs it splits each
    full-attention qkv into, and its cfg): the kept linears and the residual stream map onto rknn's
    own tensor names, every one an entry of its cfg (rknn refuses unknown names)."""
    import shutil
    step1 = tmp_path / "step1"
    shutil.copytree(Path(__file__).parent / "data" / "rknn_step1", step1)
    original = (step1 / "outlier_windowed.quantization.cfg").read_text()

    def layers(*extra, dtype="int16"):
        out = tmp_path / f"c{len(extra)}"
        r = cli("toolchains", models["outlier"], "--keep-node", "/merger/*", "--keep-node",
                    "/blocks.1/attn/qkv/*", "--rknn-step1", step1, "-o", out, *extra)
        assert r.returncode == 0, r.stderr
        cfg = (out / "rknn.quantization.cfg").read_text()
        head, rest = cfg.split("quantize_parameters:", 1)
        assert rest == original.split("quantize_parameters:", 1)[1]   # only custom_quantize_layers changed
        assert all(line.endswith(f": {dtype}") for line in head.splitlines()[1:])
        return {line.split('"')[1] for line in head.splitlines() if line.endswith(f": {dtype}")}
    got = layers()
    linears = {"/merger/mlp.0/Gemm_output_0_mm", "merger.output_mm", "/blocks.1/norm1/Div_output_0_tp_rs_mm",
               "/blocks.1/norm1/Div_output_0_tp_rs_mm#1", "/blocks.1/norm1/Div_output_0_tp_rs_mm#2"}
    tail = {"image_embeds_int8", "image_embeds-rs", "merger.output_rs_sw"}
    adds = {f"/blocks.{i}/Add_attn_output_0-rs" for i in range(TINY.depth)} | {
        f"blocks.{i}.output-rs" for i in range(TINY.depth)}
    norms = {f"/blocks.{i}/norm1/Div_output_0_tp_rs" for i in range(TINY.depth)} | {
        f"/blocks.{i}/norm2/Mul_output_0_tp#1-rs" for i in range(TINY.depth)} | {"blocks.3.output_tp_rs_sw"}
    # what carries a kept linear's input from the last compute layer (else it is rounded to int8 first)
    inputs = {"/merger/ln_q/Div_output_0_sw_sw", "/merger/Reshape_output_0_rs", "/merger/Reshape_output_0_tp_rs",
              "/merger/gelu/Mul_half_output_0-rs_sw_sw"}
    assert got == linears | tail | adds | norms | inputs, got ^ (linears | tail | adds | norms | inputs)
    # without the residual stream the kept linears' own inputs stay 16-bit (the norms feeding them)
    assert layers("--rknn-residual-int8") == linears | tail | inputs | {
        "/blocks.1/norm1/Div_output_0_tp_rs", "blocks.3.output_tp_rs_sw"}
    assert all(f"    {name}:" in original for name in got)
    assert layers("--rknn-dtype", "float16", dtype="float16") == got   # float16 on request


def test_edit_rknn_cfg_sets_the_layers_and_keeps_the_rest():
    cfg = "custom_quantize_layers: {}\nquantize_parameters:\n    a:\n        dtype: asymmetric_quantized-8\n"
    out = edit_rknn_cfg(cfg, ["x.out", "y/z"])
    assert out.splitlines()[:3] == ["custom_quantize_layers:", '    "x.out": int16', '    "y/z": int16']
    assert "quantize_parameters:" in out and "asymmetric_quantized-8" in out
