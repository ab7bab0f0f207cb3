"""split / merge / chain / simplify on tiny models."""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest

from conftest import assert_one_line_error, TINY, check_written, hf_forward, hf_vision_model, cli, tiny_pixels
from passes.split import split
from qvl_surgery.core.manifest import read_manifest
from qvl_surgery.core.modelfile import load_model
from qvl_surgery.core.runners import run_chain, run_model
from qvl_surgery.core.weights import RandomWeights

SIZE = (448, 448)


def _node_multiset(path):
    m = onnx.load(str(path), load_external_data=False)
    return Counter((n.op_type, tuple(n.input), tuple(n.output),
                    tuple(a.SerializeToString() for a in n.attribute)) for n in m.graph.node)


@pytest.mark.parametrize("fixture,size", [("tiny_448", (448, 448)), ("tiny_uneven", (252, 364))])
@pytest.mark.parametrize("parts", [2, 3, 5])
def test_split_chain_merge_round_trip(request, tmp_path, fixture, size, parts):
    src = request.getfixturevalue(fixture)
    r = cli("split", src, "--parts", parts, "-o", tmp_path / "parts", "-q")
    assert r.returncode == 0, r.stderr
    man = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert len(man["parts"]) == parts
    for k, p in enumerate(man["parts"]):
        path = tmp_path / "parts" / p["path"]
        check_written(path)
        assert onnx.load(str(path)).graph.node  # plain onnx.load, external data included
        assert p["data_bytes"] == (tmp_path / "parts" / p["data"]).stat().st_size
        assert len(p["data_hash"]["xxh3_128"]) == 32 and len(p["onnx_hash"]["xxh3_128"]) == 32
        assert p["inputs"] and p["outputs"]
        # chain order: each part's inputs are the previous part's outputs
        if k:
            assert p["inputs"] == man["parts"][k - 1]["outputs"]
    px = tiny_pixels(size, seed=7)
    whole = run_model(src, {"pixel_values": px})["image_embeds"]
    chain = run_chain(tmp_path / "parts", {"pixel_values": px})["image_embeds"]
    assert np.abs(whole - chain).max() <= 1e-6
    r = cli("merge", tmp_path / "parts", "-o", tmp_path / "merged.onnx", "-q")
    assert r.returncode == 0, r.stderr
    check_written(tmp_path / "merged.onnx")
    merged = run_model(tmp_path / "merged.onnx", {"pixel_values": px})["image_embeds"]
    assert np.array_equal(whole, merged)
    # the same nodes and weight bytes as before the split
    assert _node_multiset(tmp_path / "merged.onnx") == _node_multiset(src)
    a, b = load_model(src), load_model(tmp_path / "merged.onnx")
    assert set(a.initializers()) == set(b.initializers())
    for name in a.initializers():
        assert a.read_array(name).tobytes() == b.read_array(name).tobytes(), name
    assert (tmp_path / "merged.onnx.data").stat().st_size <= src.with_name("model.onnx.data").stat().st_size


def test_parts_hold_only_their_own_weights(tiny_448, tmp_path):
    report = split(load_model(tiny_448), tmp_path / "p", parts=2)
    names = [set(load_model(tmp_path / "p" / p["path"]).initializers()) for p in report.entries]
    weights = [{n for n in s if n.startswith(("blocks.", "merger.", "patch_embed."))} for s in names]
    assert not (weights[0] & weights[1])
    assert weights[0] | weights[1] == {n for n in load_model(tiny_448).initializers()
                                       if n.startswith(("blocks.", "merger.", "patch_embed."))}


def test_split_at_block_index_and_tensor(tiny_448, tmp_path):
    r = split(load_model(tiny_448), tmp_path / "a", at=["2", "merger"])
    assert r.cuts == ["blocks.1.output", "blocks.3.output"]
    r = split(load_model(tiny_448), tmp_path / "b", at=["blocks.0.output"])
    assert r.cuts == ["blocks.0.output"]
    px = tiny_pixels(SIZE)
    want = run_model(tiny_448, {"pixel_values": px})["image_embeds"]
    for d in ("a", "b"):
        assert np.abs(run_chain(tmp_path / d, {"pixel_values": px})["image_embeds"] - want).max() <= 1e-6


def test_max_part_bytes_chooses_the_number_of_parts(tiny_448, tmp_path):
    total = load_model(tiny_448).weight_bytes()
    r = split(load_model(tiny_448), tmp_path / "p", max_part_bytes=total // 2)
    assert len(r.parts) >= 2
    assert all(p["data_bytes"] <= total // 2 + 4096 for p in r.entries)


def test_split_foreign_model_without_cut_point(tmp_path):
    # two branches that meet at the end: no place where a single activation crosses
    from onnx import TensorProto, helper
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"]),
         helper.make_node("Sigmoid", ["a"], ["c"]), helper.make_node("Add", ["b", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "f.onnx"))
    r = cli("split", tmp_path / "f.onnx", "--parts", "2", "-o", tmp_path / "out")
    assert r.returncode == 2 and "--at" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()




def test_split_bad_input(tiny_448, tmp_path):
    out = tmp_path / "out"
    assert "at least 1" in assert_one_line_error(cli("split", tiny_448, "--parts", "0", "-o", out))
    assert "at most" in assert_one_line_error(cli("split", tiny_448, "--parts", "9", "-o", out))
    assert "not a clean cut point" in assert_one_line_error(cli("split", tiny_448, "--at", "no_such_tensor", "-o", out))
    assert not out.exists()
    assert cli("split", tiny_448, "--parts", "2", "-o", out, "-q").returncode == 0
    before = sorted(os.listdir(out))
    assert "already holds an earlier output" in assert_one_line_error(cli("split", tiny_448, "--parts", "3", "-o", out))
    assert sorted(os.listdir(out)) == before
    assert cli("split", tiny_448, "--parts", "3", "-o", out, "-q", "--force").returncode == 0
    assert len(read_manifest(out).parts) == 3
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("user file")
    assert "did not write" in assert_one_line_error(cli("split", tiny_448, "--parts", "2", "-o", other, "--force"))
    assert (other / "keep.txt").read_text() == "user file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("damage", ["size", "hash", "missing", "escape"])
def test_merge_refuses_damaged_split(tiny_448, tmp_path, damage):
    split(load_model(tiny_448), tmp_path / "p", parts=2)
    man = tmp_path / "p" / "manifest.json"
    data = tmp_path / "p" / "part1.onnx.data"
    if damage == "size":
        with open(data, "ab") as f:
            f.write(b"\0" * 10)
    elif damage == "hash":
        b = bytearray(data.read_bytes())
        b[100] ^= 0xFF
        data.write_bytes(bytes(b))
    elif damage == "missing":
        data.unlink()
    elif damage == "escape":
        doc = json.loads(man.read_text())
        doc["parts"][0]["data"] = "../../etc/passwd"
        man.write_text(json.dumps(doc))
    err = assert_one_line_error(cli("merge", tmp_path / "p", "-o", tmp_path / "m.onnx"))
    assert "manifest" in err or "split" in err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.data").exists()


def test_merge_output_onto_a_part_is_refused(tiny_448, tmp_path):
    split(load_model(tiny_448), tmp_path / "p", parts=2)
    before = (tmp_path / "p" / "part0.onnx").read_bytes()
    assert_one_line_error(cli("merge", tmp_path / "p", "-o", tmp_path / "p" / "part0.onnx", "--force"))
    assert (tmp_path / "p" / "part0.onnx").read_bytes() == before


def test_simplify_equals_input_and_keeps_mask_compact(tiny_448, tmp_path):
    total = load_model(tiny_448).weight_bytes()
    for method, parts in (("parts", "2 part(s)"), ("whole", "1 part(s)")):
        out = tmp_path / f"s_{method}.onnx"
        r = cli("simplify", tiny_448, "-o", out, "--method", method, "--max-part-bytes", str(total * 0.7))
        assert r.returncode == 0, r.stderr
        assert parts in r.stdout and "window_id" in r.stdout
        check_written(out)
        px = tiny_pixels(SIZE, seed=3)
        a = run_model(tiny_448, {"pixel_values": px})["image_embeds"]
        b = run_model(out, {"pixel_values": px})["image_embeds"]
        assert np.abs(a - b).max() <= 1e-6
        S = 1024
        for t in load_model(out).graph.initializer:
            assert np.prod(t.dims) < S * S, t.name  # onnxsim did not fold the window mask into S x S
    assert not [p for p in tiny_448.parent.iterdir() if p.name.startswith(".")]  # temporaries gone


def test_split_of_uneven_windows_matches_transformers(tiny_uneven, tmp_path):
    split(load_model(tiny_uneven), tmp_path / "p", parts=3)
    px = tiny_pixels((252, 364), seed=2)
    hf = hf_vision_model(TINY, RandomWeights(TINY, seed=1).state_dict())
    ref = hf_forward(hf, px, (252, 364))
    out = run_chain(tmp_path / "p", {"pixel_values": px})["image_embeds"]
    assert np.abs(out - ref).max() <= 1e-4


@pytest.mark.slow
def test_each_part_runs_under_polygraphy(tiny_448, tmp_path):
    split(load_model(tiny_448), tmp_path / "p", parts=3)
    poly = os.path.join(os.path.dirname(sys.executable), "polygraphy")
    for k in range(3):
        r = subprocess.run([poly, "run", str(tmp_path / "p" / f"part{k}.onnx"), "--onnxrt"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "PASSED" in r.stdout + r.stderr


def test_streamed_hash_matches_the_written_files(tiny_448, tmp_path):
    from passes.fp16 import convert_fp16
    from qvl_surgery.core.modelfile import hash_file
    # computed sources (fp16 conversion while writing), file ranges and alignment gaps all hashed in stream
    for name, model in (("fp32", load_model(tiny_448)), ("fp16", convert_fp16(load_model(tiny_448))[0])):
        r = split(model, tmp_path / name, parts=3)
        for p in r.entries:
            assert p["data_hash"] == {"xxh3_128": hash_file(tmp_path / name / p["data"], "xxh3_128")}
