"""Weightless model files: round trip, refusals, atomic writes."""
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import check_written, ort_run, tiny_pixels
from qvl_surgery.errors import BadInput
from qvl_surgery.modelfile import FileRange, load_model, save_model


def _small_external_model(d, n=3, size=4096):
    """y = x + w0 + w1 + ... with external weights, written by plain onnx."""
    ws = [numpy_helper.from_array(np.full((size,), k + 1, np.float32), f"w{k}") for k in range(n)]
    nodes, cur = [], "x"
    for k in range(n):
        nodes.append(helper.make_node("Add", [cur, f"w{k}"], [f"a{k}"], name=f"add{k}"))
        cur = f"a{k}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [size])], initializer=ws)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(d / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
              size_threshold=0)
    return d / "m.onnx"


def test_round_trip_keeps_bytes_and_numerics(tiny_448, tmp_path):
    m = load_model(tiny_448)
    assert m.sources and all(isinstance(s, FileRange) for s in m.sources.values())
    out = save_model(m, tmp_path / "copy.onnx")
    check_written(out)
    px = tiny_pixels((448, 448))
    a, = ort_run(tiny_448, {"pixel_values": px})
    b, = ort_run(out, {"pixel_values": px})
    assert np.array_equal(a, b)
    m2 = load_model(out)
    for name in m.sources:
        assert np.array_equal(m.read_array(name), m2.read_array(name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "copy.onnx.data"]


def test_foreign_model_with_onnx_external_data(tmp_path):
    p = _small_external_model(tmp_path / "src")
    out = save_model(load_model(p), tmp_path / "o" / "m2.onnx")
    x = np.zeros(4096, np.float32)
    assert np.array_equal(ort_run(p, {"x": x})[0], ort_run(out, {"x": x})[0])


def _edit_location(p, location=None, offset=None):
    m = onnx.load(str(p), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location" and location is not None:
            e.value = location
        if e.key == "offset" and offset is not None:
            e.value = str(offset)
    onnx.save(m, str(p))


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink", "missing", "short", "offset"])
def test_untrusted_external_data_is_refused(tmp_path, case):
    p = _small_external_model(tmp_path / "m")
    outside = tmp_path / "outside.data"
    shutil.copy(tmp_path / "m" / "m.onnx.data", outside)
    if case == "absolute":
        _edit_location(p, location=str(outside))
    elif case == "dotdot":
        _edit_location(p, location="../outside.data")
    elif case == "symlink":
        os.symlink(outside, tmp_path / "m" / "link.data")
        _edit_location(p, location="link.data")
    elif case == "missing":
        os.unlink(tmp_path / "m" / "m.onnx.data")
    elif case == "short":
        with open(tmp_path / "m" / "m.onnx.data", "r+b") as f:
            f.truncate(1000)
    elif case == "offset":
        _edit_location(p, offset=10**9)
    with pytest.raises(BadInput) as e:
        load_model(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg


def test_not_onnx_is_refused(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(BadInput, match="not an ONNX model"):
        load_model(p)
    with pytest.raises(BadInput, match="no such file"):
        load_model(tmp_path / "none.onnx")


def test_output_onto_input_is_refused_and_input_untouched(tiny_448):
    before = tiny_448.read_bytes(), os.stat(tiny_448.with_name("model.onnx.data")).st_mtime_ns
    m = load_model(tiny_448)
    for target in (tiny_448, tiny_448.parent / "model.onnx"):
        with pytest.raises(BadInput, match="overwrite the input"):
            save_model(m, target)
    assert (tiny_448.read_bytes(), os.stat(tiny_448.with_name("model.onnx.data")).st_mtime_ns) == before


def test_failed_save_leaves_nothing(tmp_path, tiny_448):
    m = load_model(tiny_448)
    m.graph.node[0].op_type = "NoSuchOp"  # the checker rejects it before anything is published
    with pytest.raises(Exception):
        save_model(m, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_copy_falls_back_to_chunks_where_the_kernel_cannot(tiny_448, tmp_path, monkeypatch):
    import errno
    import qvl_surgery.modelfile as mf

    def no_kernel_copy(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")
    monkeypatch.setattr(mf.os, "copy_file_range", no_kernel_copy)
    out = save_model(load_model(tiny_448), tmp_path / "c.onnx")
    a, b = load_model(tiny_448), load_model(out)
    for name in a.sources:
        assert a.read_array(name).tobytes() == b.read_array(name).tobytes()
