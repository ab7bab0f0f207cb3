"""The pattern matchers' declared variants, each on a tiny graph built with onnx.helper: the pass
matches it, and onnxruntime gives the same output before and after.

RMSNorm (passes/fp16.py, keep_rmsnorm_fp32): normalized by Div(x, rms) or by Reciprocal(rms) times
x on either side; the scale Mul on either side; constants as initializers or Constant nodes.
Attention (passes/attention/): the scale as Div or Mul (either side); the mask added on either
side; the mask built from a window-id vector, or a dense constant (initializer or Constant node).
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import check_written, ort_run
from passes.attention import find_attention, rewrite_attention
from passes.fp16 import convert_fp16
from qvl_surgery.core.patterns import rmsnorm_patterns
from qvl_surgery.core.modelfile import load_model, save_model

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _save(tmp_path, nodes, inputs, outputs, inits, name="m.onnx"):
    g = helper.make_graph(nodes, "g", inputs, outputs,
                          initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    path = tmp_path / name
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    check_written(path)
    return path


def _constant(name, value):
    """A Constant node: the other way exporters write a constant."""
    return helper.make_node("Constant", [], [name], name=f"{name}/Constant",
                            value=numpy_helper.from_array(np.asarray(value), name))


# ----------------------------------------------------------------------------- RMSNorm

def _rmsnorm_graph(tmp_path, normalize, scale, constants):
    """x [4, 16] -> RMSNorm -> Relu. |x| up to ~1e3: x^2 overflows fp16, so only a kept island
    gives the fp32 answer."""
    x = (RNG.standard_normal((4, 16)) * 300).astype(np.float32)
    consts = {"two": np.array(2.0, np.float32), "eps": np.array(1e-6, np.float32),
              "w": RNG.uniform(0.5, 1.5, 16).astype(np.float32)}
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
             helper.make_node("ReduceMean", ["sq"], ["ms"], name="mean", axes=[-1], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
             helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt")]
    if normalize == "div":
        nodes.append(helper.make_node("Div", ["x", "rms"], ["n"], name="div"))
    else:
        nodes.append(helper.make_node("Reciprocal", ["rms"], ["inv"], name="reciprocal"))
        nodes.append(helper.make_node("Mul", ["x", "inv"] if normalize == "x*inv" else ["inv", "x"], ["n"],
                                      name="mul_inv"))
    nodes.append(helper.make_node("Mul", ["n", "w"] if scale == "n*w" else ["w", "n"], ["y"], name="scale"))
    nodes.append(helper.make_node("Relu", ["y"], ["out"], name="relu"))
    if constants == "Constant nodes":
        nodes = [_constant(k, v) for k, v in consts.items()] + nodes
        consts = {}
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", F32, [4, 16])],
                 [helper.make_tensor_value_info("out", F32, [4, 16])], consts)
    return path, x


@pytest.mark.parametrize("normalize,scale,constants", [
    ("div", "n*w", "initializers"),
    ("div", "w*n", "initializers"),
    ("x*inv", "n*w", "initializers"),
    ("inv*x", "w*n", "initializers"),
    ("inv*x", "n*w", "Constant nodes"),
])
def test_rmsnorm_variants_are_kept_whole(tmp_path, normalize, scale, constants):
    path, x = _rmsnorm_graph(tmp_path, normalize, scale, constants)
    model = load_model(path)
    pats = rmsnorm_patterns(model)
    assert len(pats) == 1
    want = {"div": ["Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]}.get(
        normalize, ["Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul"])
    ops = [n.op_type for n in pats[0]]
    assert [o for o in ops if o != "Constant"] == want   # the scale Mul included
    assert ops.count("Constant") == (3 if constants == "Constant nodes" else 0)
    out, report = convert_fp16(model, keep_rmsnorm_fp32=True, keep_io_types=True)
    assert sorted(report.kept["rmsnorm"]) == sorted(n.name for n in pats[0])
    f16 = save_model(out, tmp_path / "f16.onnx")
    check_written(f16)
    casts = [n for n in onnx.load(str(f16), load_external_data=False).graph.node if n.op_type == "Cast"]
    assert len(casts) == 2   # into the fp16 Relu and back to the fp32 output: none inside the island
    ref, = ort_run(path, {"x": x})
    got, = ort_run(f16, {"x": x})
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- attention

H, S, D = 2, 8, 4
WINDOWS = [3, 5]   # uneven: the windowed rewrite pads them
NEG = float(np.finfo(np.float32).min)


def _dense_mask() -> np.ndarray:
    ids = np.repeat(np.arange(len(WINDOWS)), WINDOWS)
    return np.where(ids[:, None] == ids[None, :], 0.0, NEG).astype(np.float32).reshape(1, 1, S, S)


def _attention_graph(tmp_path, scale, mask, mask_side):
    consts: dict = {}
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], name="/attn/Transpose", perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"], name="/attn/MatMul")]
    if scale == "Div(s, c)":
        consts["c"] = np.array(np.sqrt(D), np.float32)
        nodes.append(helper.make_node("Div", ["qk", "c"], ["scores"], name="/attn/Div"))
    else:
        consts["c"] = np.array(1 / np.sqrt(D), np.float32)
        nodes.append(helper.make_node("Mul", ["qk", "c"] if scale == "Mul(s, c)" else ["c", "qk"], ["scores"],
                                      name="/attn/Mul"))
    if mask == "window ids":   # the export's construction: Where(Equal(id_col, id_row), 0, min)
        consts.update(window_id=np.repeat(np.arange(len(WINDOWS)), WINDOWS).astype(np.int64),
                      ax0=np.array([0], np.int64), ax1=np.array([1], np.int64),
                      zero=np.array(0.0, np.float32), neg=np.array(NEG, np.float32))
        nodes += [helper.make_node("Unsqueeze", ["window_id", "ax1"], ["id_col"], name="/mask/Unsqueeze_col"),
                  helper.make_node("Unsqueeze", ["window_id", "ax0"], ["id_row"], name="/mask/Unsqueeze_row"),
                  helper.make_node("Equal", ["id_col", "id_row"], ["same"], name="/mask/Equal"),
                  helper.make_node("Where", ["same", "zero", "neg"], ["mask"], name="/mask/Where")]
    elif mask == "dense initializer":
        consts["mask"] = _dense_mask()
    elif mask == "dense Constant node":
        nodes.append(_constant("mask", _dense_mask()))
    if mask is not None:
        nodes.append(helper.make_node("Add", ["scores", "mask"] if mask_side == "right" else ["mask", "scores"],
                                      ["masked"], name="/attn/Add"))
    nodes += [helper.make_node("Softmax", ["masked" if mask else "scores"], ["probs"], name="/attn/Softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "v"], ["out"], name="/attn/MatMul_1")]
    ins = [helper.make_tensor_value_info(n, F32, [1, H, S, D]) for n in "qkv"]
    path = _save(tmp_path, nodes, ins, [helper.make_tensor_value_info("out", F32, [1, H, S, D])], consts)
    feeds = {n: RNG.standard_normal((1, H, S, D)).astype(np.float32) for n in "qkv"}
    return path, feeds


@pytest.mark.parametrize("scale,mask,mask_side,mode", [
    ("Div(s, c)", "window ids", "right", "windowed"),
    ("Div(s, c)", "window ids", "left", "windowed"),
    ("Mul(s, c)", "dense initializer", "right", "windowed"),
    ("Mul(c, s)", "dense initializer", "left", "windowed"),
    ("Div(s, c)", "dense Constant node", "left", "windowed"),
    ("Div(s, c)", "dense initializer", "left", "mha"),
])
def test_attention_variants_are_rewritten(tmp_path, scale, mask, mask_side, mode):
    path, feeds = _attention_graph(tmp_path, scale, mask, mask_side)
    model = load_model(path)
    found = find_attention(model)
    assert len(found) == 1 and found[0].mask == "mask" and found[0].scale_const == "c"
    out, report = rewrite_attention(model, mode=mode)
    assert report.rewritten == ["/attn: 2 windows of 3..5, padded to 5"] and not report.misses
    new = save_model(out, tmp_path / "new.onnx")
    check_written(new)
    g = onnx.load(str(new), load_external_data=False).graph
    assert "Where" not in [n.op_type for n in g.node]
    sizes = [int(np.prod(t.dims)) for t in g.initializer]
    sizes += [int(np.prod(a.t.dims)) for n in g.node if n.op_type == "Constant" for a in n.attribute]
    assert max(sizes) < S * S   # the dense mask is gone
    ref, = ort_run(path, feeds)
    got, = ort_run(new, feeds)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_attention_without_mask_is_left_alone_and_says_so(tmp_path):
    path, _ = _attention_graph(tmp_path, "Mul(c, s)", None, None)
    found = find_attention(load_model(path))
    assert len(found) == 1 and found[0].mask_add is None
    _, report = rewrite_attention(load_model(path), full_chunk_mb=0)
    assert report.unchanged == ["/attn: full attention, no mask (nothing to drop)"]
