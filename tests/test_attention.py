"""attention pass: windowed / mha / onnx-attention against the unrewritten model and transformers."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_one_line_error, TINY, check_written, hf_forward, hf_vision_model, cli, tiny_pixels
from passes.attention import find_attention
from qvl_surgery.core.emulate import emulate
from qvl_surgery.core.modelfile import load_model, save_model
from qvl_surgery.core.runners import run_model
from qvl_surgery.core.weights import RandomWeights

CASES = [("tiny_448", (448, 448), 0), ("tiny_uneven", (252, 364), 1)]


def _rewrite(src, tmp_path, mode):
    r = cli("attention", src, "-o", tmp_path / f"{mode}.onnx", "--mode", mode, "--upgrade-opset", "-q")
    assert r.returncode == 0, r.stderr
    check_written(tmp_path / f"{mode}.onnx")
    return tmp_path / f"{mode}.onnx", r.stdout


@pytest.mark.parametrize("mode", ["windowed", "mha", "onnx-attention"])
@pytest.mark.parametrize("fixture,size,seed", CASES)
def test_rewrite_equals_original_and_transformers(request, tmp_path, fixture, size, seed, mode):
    src = request.getfixturevalue(fixture)
    out, stdout = _rewrite(src, tmp_path, mode)
    px = tiny_pixels(size, seed=5) * 2
    ref = run_model(src, {"pixel_values": px})["image_embeds"]
    got = run_model(out, {"pixel_values": px})["image_embeds"]
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-5 * max(scale, 1.0)
    hf = hf_forward(hf_vision_model(TINY, RandomWeights(TINY, seed=seed).state_dict()), px, size)
    assert np.abs(got - hf).max() <= 1e-4
    m = load_model(out)
    ops = [n.op_type for n in m.graph.node]
    S = (size[0] // 14) * (size[1] // 14)
    # no S x S anything left: the mask construction is gone and nothing is dense
    assert "Equal" not in ops and "window_id" not in m.initializers()
    for t in m.graph.initializer:
        assert np.prod(t.dims) < S * S
    uneven = fixture == "tiny_uneven"
    if mode == "windowed":
        assert ops.count("Softmax") == TINY.depth
        assert ("Gather" in ops and ops.count("Gather") > 2) == uneven  # padding only for uneven windows
        assert "padded" in stdout if uneven else "16 windows of 64" in stdout
    elif mode == "mha":
        assert ops.count("MultiHeadAttention") == TINY.depth and "Softmax" not in ops
    else:
        assert ops.count("Attention") == TINY.depth
        assert max(o.version for o in m.proto.opset_import if o.domain in ("", "ai.onnx")) == 23


def test_windowed_scores_are_per_window(tiny_448, tmp_path):
    out, _ = _rewrite(tiny_448, tmp_path, "windowed")
    m = onnx.shape_inference.infer_shapes(onnx.load(str(out), load_external_data=False))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    window_sm = [n for n in m.graph.node if n.op_type == "Softmax" and "windowed" in n.name]
    assert len(window_sm) == TINY.depth - len(TINY.fullatt_block_indexes)
    for n in window_sm:
        assert shapes[n.output[0]] == [16, TINY.num_heads, 64, 64]   # windows first (the OpenVINO-safe layout)


@pytest.mark.parametrize("order", ["attention-fp16", "fp16-attention"])
def test_composes_with_fp16_and_split(tiny_uneven, tmp_path, order):
    size = (252, 364)
    if order == "attention-fp16":
        assert cli("attention", tiny_uneven, "-o", tmp_path / "a.onnx", "-q").returncode == 0
        assert cli("fp16", tmp_path / "a.onnx", "-o", tmp_path / "b.onnx", "--keep-silu-fp32", "-q").returncode == 0
    else:
        assert cli("fp16", tiny_uneven, "-o", tmp_path / "a.onnx", "--keep-silu-fp32", "-q").returncode == 0
        r = cli("attention", tmp_path / "a.onnx", "-o", tmp_path / "b.onnx", "-q")
        assert r.returncode == 0, r.stderr
    check_written(tmp_path / "b.onnx")
    r = cli("split", tmp_path / "b.onnx", "--parts", "2", "-o", tmp_path / "parts", "-q")
    assert r.returncode == 0, r.stderr
    px = tiny_pixels(size, seed=3)
    ref = run_model(tiny_uneven, {"pixel_values": px})["image_embeds"]
    whole = emulate(tmp_path / "b.onnx", {"pixel_values": px})["image_embeds"]
    chain = emulate(tmp_path / "parts", {"pixel_values": px})["image_embeds"]
    assert np.array_equal(whole, chain)
    got = whole.astype(np.float32)
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert np.isfinite(got).all() and cos > 0.999




def test_attention_bad_input(tiny_448, tmp_path):
    # no attention at all
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "relu.onnx"))
    assert "no attention pattern" in assert_one_line_error(cli("attention", tmp_path / "relu.onnx", "-o", tmp_path / "o.onnx"))
    # a mode the input cannot take without upgrading
    err = assert_one_line_error(cli("attention", tiny_448, "-o", tmp_path / "o.onnx", "--mode", "onnx-attention"))
    assert "opset 23" in err and "--upgrade-opset" in err
    assert not (tmp_path / "o.onnx").exists()


def test_mask_that_is_not_block_diagonal_is_refused(tiny_448, tmp_path):
    m = load_model(tiny_448)
    wid = m.read_array("window_id").copy()
    wid[:64] = wid[::-1][:64]  # window ids that are not contiguous runs
    t = next(t for t in m.graph.initializer if t.name == "window_id")
    t.CopyFrom(numpy_helper.from_array(wid, "window_id"))
    m.sources.pop("window_id", None)
    save_model(m, tmp_path / "scrambled.onnx")
    err = assert_one_line_error(cli("attention", tmp_path / "scrambled.onnx", "-o", tmp_path / "o.onnx"))
    assert "not block-diagonal" in err
    assert not (tmp_path / "o.onnx").exists()


def test_matcher_explains_a_miss(tiny_448):
    m = load_model(tiny_448)
    # break one attention: Softmax on the wrong axis
    sm = next(n for n in m.graph.node if n.op_type == "Softmax")
    sm.attribute[0].i = 2
    from passes.attention import AttentionReport
    rep = AttentionReport("windowed")
    found = find_attention(m, rep)
    assert len(found) == TINY.depth - 1
    assert any("axis" in line and sm.name in line for line in rep.misses)


def test_full_attention_in_query_chunks(tiny_448, tmp_path):
    r = cli("attention", tiny_448, "-o", tmp_path / "c.onnx", "--full-chunk-mb", "1", "-q")
    assert r.returncode == 0, r.stderr
    assert "queries in 17 chunks of 61 rows" in r.stdout
    check_written(tmp_path / "c.onnx")
    m = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "c.onnx"), load_external_data=False))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    chunk_sm = [n for n in m.graph.node if n.op_type == "Softmax" and "chunked" in n.name]
    assert len(chunk_sm) == 17 * len(TINY.fullatt_block_indexes)
    assert max(shapes[n.output[0]][2] for n in chunk_sm) == 61  # no [S, S] score tensor is left
    px = tiny_pixels((448, 448), seed=8)
    a = run_model(tiny_448, {"pixel_values": px})["image_embeds"]
    b = run_model(tmp_path / "c.onnx", {"pixel_values": px})["image_embeds"]
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())


@pytest.mark.slow
def test_mha_then_fp16_runs_in_onnxruntime_and_emulation_says_why_not(tiny_448, tmp_path):
    out, _ = _rewrite(tiny_448, tmp_path, "mha")
    r = cli("fp16", out, "-o", tmp_path / "mha16.onnx", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("compare", tiny_448, tmp_path / "mha16.onnx", "--atol", "0.05", "--rtol", "0.05")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("compare", tiny_448, tmp_path / "mha16.onnx", "--emulate-fp16")
    assert_one_line_error(r, "emulation cannot run", "MultiHeadAttention")
    # split after the fused op, in fp32 and fp16 (cut tensors get their types past com.microsoft ops)
    for name in ("mha.onnx", "mha16.onnx"):
        r = cli("split", tmp_path / name, "--parts", "3", "-o", tmp_path / f"parts_{name}", "-q")
        assert r.returncode == 0, r.stderr
        r = cli("compare", tiny_448, tmp_path / f"parts_{name}", "--atol", "0.05", "--rtol", "0.05")
        assert r.returncode == 0, r.stdout + r.stderr


def test_many_full_attention_chunks_load_in_onnxruntime(tiny_448, tmp_path):
    """171 query chunks make a Split-sizes table over 1 KB: it must stay inline (onnxruntime
    refuses Split sizes read from external data)."""
    out = tmp_path / "c.onnx"
    r = cli("attention", tiny_448, "-o", out, "--full-chunk-mb", "0.1", "-q")
    assert r.returncode == 0, r.stderr
    check_written(out)
    px = tiny_pixels((448, 448))
    a = run_model(tiny_448, {"pixel_values": px})["image_embeds"]
    b = run_model(out, {"pixel_values": px})["image_embeds"]
    assert np.abs(a - b).max() < 1e-5
