"""Weightless model files: round trip, refusals, atomic writes."""
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import check_written, ort_run, tiny_pixels
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile import FileRange, load_model, save_model, single_file_size


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
    import qvl_surgery.core.modelfile as mf

    def no_kernel_copy(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")
    monkeypatch.setattr(mf.os, "copy_file_range", no_kernel_copy)
    out = save_model(load_model(tiny_448), tmp_path / "c.onnx")
    a, b = load_model(tiny_448), load_model(out)
    for name in a.sources:
        assert a.read_array(name).tobytes() == b.read_array(name).tobytes()


# ----------------------------------------------------------------------------- one self-contained file

def _save_both(model, d):
    ext = save_model(model, d / "ext.onnx")
    single = save_model(model, d / "single.onnx", single_file=True)
    return ext, single


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_single_file_runs_like_external_data(tiny_448, tmp_path, dtype):
    from passes.fp16 import convert_fp16
    model = load_model(tiny_448)
    if dtype == "fp16":
        model = convert_fp16(model)[0]   # Computed sources: converted while written
    ext, single = _save_both(model, tmp_path)
    assert not single.with_name("single.onnx.data").exists()
    assert single.stat().st_size == single_file_size(model)
    check_written(single)
    loaded = onnx.load(str(single))  # plain onnx.load: every weight inline
    assert all(t.data_location != TensorProto.EXTERNAL and not t.external_data for t in loaded.graph.initializer)
    assert {t.data_type for t in loaded.graph.initializer} >= ({TensorProto.FLOAT16} if dtype == "fp16" else {1})
    px = tiny_pixels((448, 448), seed=3).astype(np.float16 if dtype == "fp16" else np.float32)
    a, = ort_run(ext, {"pixel_values": px})
    b, = ort_run(single, {"pixel_values": px})
    assert a.dtype == b.dtype and np.array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "single.onnx"]


def test_single_file_is_what_onnx_save_writes(tiny_448, tmp_path):
    """The hand-written wire format is byte for byte protobuf's serialization of the same model."""
    single = save_model(load_model(tiny_448), tmp_path / "single.onnx", single_file=True)
    whole = onnx.load(str(tiny_448))  # weights read into raw_data
    for t in whole.graph.initializer:
        t.ClearField("data_location")  # onnx.load sets it to DEFAULT explicitly
    assert single.read_bytes() == whole.SerializeToString()


def chain_model(n, count, make):
    """x + w0 + w1 + ... (Add nodes): ``count`` float weights of ``n`` each, external, computed by
    ``make(k)`` when written. Self-contained: test_single_file_write_streams runs its source in a child."""
    from onnx import TensorProto, helper
    from qvl_surgery.core.modelfile import Computed, Model
    ws, nodes, cur = [], [], "x"
    for k in range(count):
        t = TensorProto(name=f"w{k}", data_type=TensorProto.FLOAT, dims=[n])
        t.data_location = TensorProto.EXTERNAL
        ws.append(t)
        nodes.append(helper.make_node("Add", [cur, f"w{k}"], [f"h{k}"], name=f"add{k}"))
        cur = f"h{k}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [n])], initializer=ws)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return Model(proto, {f"w{k}": Computed(lambda k=k: make(k), n * 4) for k in range(count)})


def _fake_big_model(nbytes_each, count):
    """A Model whose Computed weights declare their sizes and must never be made."""
    def never(k):
        raise AssertionError("a refused write must not compute weights")
    return chain_model(nbytes_each // 4, count, never)


def test_single_file_over_2gb_is_refused_before_anything_is_written(tmp_path):
    model = _fake_big_model(700 << 20, 3)   # 2.2 GB declared, nothing made
    assert single_file_size(model) > 2**31
    with pytest.raises(BadInput) as e:
        save_model(model, tmp_path / "big.onnx", single_file=True)
    msg = str(e.value)
    assert "\n" not in msg and "2 GB" in msg and "drop single_file=True" in msg
    assert e.value.render(lambda name: "--single-file" if name == "single_file" else None).endswith(
        "drop --single-file to write the weights to big.onnx.data")
    assert list(tmp_path.iterdir()) == []
    # just under the limit the same model shape is accepted by the size check
    assert single_file_size(_fake_big_model(600 << 20, 3)) < 2**31


def test_single_file_replaces_an_external_data_output(tiny_448, tmp_path):
    m = load_model(tiny_448)
    save_model(m, tmp_path / "o.onnx")
    with pytest.raises(BadInput, match="already exists"):
        save_model(m, tmp_path / "o.onnx", single_file=True)
    save_model(m, tmp_path / "o.onnx", single_file=True, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]  # the old weights went with the old model
    check_written(tmp_path / "o.onnx")


def test_failed_single_file_save_leaves_nothing(tmp_path, tiny_448):
    m = load_model(tiny_448)
    m.graph.node[0].op_type = "NoSuchOp"  # the checker rejects it before anything is published
    with pytest.raises(Exception, match="NoSuchOp"):
        save_model(m, tmp_path / "bad.onnx", single_file=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_single_file_write_streams(tmp_path):
    """A 320 MB model (64 weights of 5 MB) written as one file, from computed weights and from
    file ranges: the child's peak RSS stays far below the model (about 50 MB of imports plus a
    few tensors in flight; 90-115 MB measured)."""
    import inspect
    import textwrap
    from conftest import peak_rss_mb_of
    code = inspect.getsource(chain_model) + textwrap.dedent(f"""
        import numpy as np, os
        from qvl_surgery.core.modelfile import load_model, save_model
        N, K = 5 << 18, 64      # floats per weight (5 MB), weights
        m = chain_model(N, K, lambda k: np.full(N, k, np.float32))
        d = {str(tmp_path)!r}
        save_model(m, d + "/computed.onnx", single_file=True)
        save_model(m, d + "/ext.onnx")
        save_model(load_model(d + "/ext.onnx"), d + "/ranges.onnx", single_file=True)
        print(os.path.getsize(d + "/computed.onnx"))
    """)
    peak, out = peak_rss_mb_of(code)
    size_mb = int(out.split()[-1]) / 2**20
    print(f"single-file write of a {size_mb:.0f} MB model: peak RSS {peak:.0f} MB")
    assert size_mb > 300
    assert peak < 0.4 * size_mb, peak
    a, b = (tmp_path / "computed.onnx").read_bytes(), (tmp_path / "ranges.onnx").read_bytes()
    assert a == b
    t = onnx.load(str(tmp_path / "ranges.onnx")).graph.initializer[63]
    assert numpy_helper.to_array(t)[[0, -1]].tolist() == [63.0, 63.0]


# ----------------------------------------------------------------------------- integrity hashes

def test_streamed_digest_equals_file_hash_for_each_algorithm(tiny_448, tmp_path):
    from qvl_surgery.core.modelfile import HASH_ALGORITHMS, StreamDigest, hash_file, sha256_file, write_model_files
    import hashlib
    for algo in HASH_ALGORITHMS:
        d = StreamDigest(algo)
        (tmp_path / algo).mkdir()
        write_model_files(load_model(tiny_448), tmp_path / algo, "m.onnx", digest=d)
        data = tmp_path / algo / "m.onnx.data"
        assert d.record() == {algo: hash_file(data, algo)}
    assert sha256_file(data) == hashlib.sha256(data.read_bytes()).hexdigest()


def _old_style(manifest):
    """Rewrite a manifest as splits written before the hash change were: sha256 fields."""
    import json
    from qvl_surgery.core.modelfile import sha256_file
    doc = json.loads(manifest.read_text())
    for p in doc["parts"]:
        del p["data_hash"], p["onnx_hash"]
        p["data_sha256"] = sha256_file(manifest.parent / p["data"])
        p["onnx_sha256"] = sha256_file(manifest.parent / p["path"])
    manifest.write_text(json.dumps(doc))
    return doc


def test_manifests_with_sha256_are_still_verified(tiny_448, tmp_path):
    from conftest import assert_one_line_error, cli
    from passes.split import split
    from qvl_surgery.core.manifest import hash_checks, read_manifest
    split(load_model(tiny_448), tmp_path / "p", parts=2)
    man = tmp_path / "p" / "manifest.json"
    assert {algo for _, algo, _ in hash_checks(read_manifest(man))} == {"xxh3_128"}
    _old_style(man)
    assert {algo for _, algo, _ in hash_checks(read_manifest(man))} == {"sha256"}
    r = cli("merge", tmp_path / "p", "-o", tmp_path / "m.onnx", "-q")
    assert r.returncode == 0, r.stderr
    data = tmp_path / "p" / "part0.onnx.data"
    b = bytearray(data.read_bytes())
    b[-1] ^= 0xFF
    data.write_bytes(bytes(b))
    with pytest.raises(BadInput, match="sha256 does not match"):
        read_manifest(man)
    err = assert_one_line_error(cli("merge", tmp_path / "p", "-o", tmp_path / "m2.onnx"))
    assert "part0.onnx.data" in err
    assert not (tmp_path / "m2.onnx").exists()


def test_manifest_with_only_unknown_hashes_is_refused(tiny_448, tmp_path):
    import json
    from passes.split import split
    from qvl_surgery.core.manifest import read_manifest
    split(load_model(tiny_448), tmp_path / "p", parts=2)
    man = tmp_path / "p" / "manifest.json"
    doc = json.loads(man.read_text())
    doc["parts"][1]["data_hash"] = {"blake9": "00"}
    doc["parts"][0]["data_hash"]["blake9"] = "00"   # beside a known one: ignored
    man.write_text(json.dumps(doc))
    with pytest.raises(BadInput, match="part1.onnx records only 'blake9'") as e:
        read_manifest(man)
    assert "\n" not in str(e.value)


def _hand_laid_model(d, layout):
    """A model whose weights sit in one data file at the given (offset, nbytes) places, the bytes
    between them 0xAB (not zeros), referenced with onnx's external-data fields."""
    size = max(o + n for o, n in layout) + 100
    blob = bytearray(b"\xab" * size)
    ws, nodes, cur = [], [], "x"
    rng = np.random.default_rng(5)
    for k, (off, n) in enumerate(layout):
        arr = rng.standard_normal(n // 4).astype(np.float32)
        blob[off:off + n] = arr.tobytes()
        t = TensorProto(name=f"w{k}", data_type=TensorProto.FLOAT, dims=[n // 4])
        t.data_location = TensorProto.EXTERNAL
        for key, v in (("location", "src.data"), ("offset", str(off)), ("length", str(n))):
            t.external_data.add(key=key, value=v)
        ws.append(t)
        nodes.append(helper.make_node("ReduceSum", [f"w{k}"], [f"s{k}"], keepdims=0, name=f"sum{k}"))
    g = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(f"s{k}", TensorProto.FLOAT, [])
                                           for k in range(len(layout))], initializer=ws)
    d.mkdir(parents=True, exist_ok=True)
    (d / "src.data").write_bytes(bytes(blob))
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(d / "src.onnx"))
    return d / "src.onnx"


def test_data_layout_gathers_copies_page_congruent(tmp_path):
    """Consecutive ranges apart by alignment padding become one copy (padding copied along, so the
    streamed hash must hash the source's padding, here 0xAB); a copy of >= 1 MB starts at its
    source's offset within a page, in the first page of a 64 KB block; every weight stays 64-byte
    aligned and byte-identical; holes between copies are not copied."""
    from qvl_surgery.core.modelfile import StreamDigest, _DataLayout, hash_file, write_model_files
    mb = 1 << 20
    layout = [(64 * 7, mb - 40), (64 * 7 + mb, 3000 * 4),         # one run (40 bytes of padding), 1 MB+
              (3 * mb + 128, 256),                                # a hole: a new, short run
              (4 * mb + 4032, 2 * mb - 20), (6 * mb + 4032, 512 * 4)]  # a run starting 4032 into a page
    src = load_model(_hand_laid_model(tmp_path / "s", layout))
    tensors = list(src.proto.graph.initializer)
    plan = _DataLayout.plan(src, tensors)
    assert len(plan.copies) == 3
    for name in ("w0", "w3"):  # long copies: the source's offset within a page, first page of a 64 KB block
        assert plan.offsets[name] % 65536 == src.sources[name].offset % 4096
    assert all(o % 64 == 0 for o in plan.offsets.values())
    (tmp_path / "o").mkdir()
    digest = StreamDigest()
    out = write_model_files(src, tmp_path / "o", "m.onnx", digest=digest)
    data = tmp_path / "o" / "m.onnx.data"
    assert data.stat().st_size == plan.size < 3 * mb + 16384 + 2 * 65536  # 3 MB of weights, padding
    assert digest.record() == {"xxh3_128": hash_file(data)}
    copy = load_model(out)
    for t in tensors:
        assert copy.sources[t.name].offset == plan.offsets[t.name]
        assert copy.read_array(t.name).tobytes() == src.read_array(t.name).tobytes()
    a = ort_run(src.path, {})
    b = ort_run(out, {})
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
