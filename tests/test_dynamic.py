"""The dynamic export (self-contained and host-inputs kinds) against transformers' visual forward."""
import json

import numpy as np
import onnx
import pytest
import torch

from conftest import TINY, check_written, hf_vision_model
from qvl_surgery.core.dynamic import (GRID_TENSORS, build_dynamic_encoder, check_grid, export_dynamic)
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.hostinputs import host_inputs
from qvl_surgery.core.modelfile import load_model, save_model
from qvl_surgery.core.weights import RandomWeights

# grid rows (t, h, w) in patches; 14 px per patch
CASES = {
    "448x448": [[1, 32, 32]],
    "252x364 (uneven windows)": [[1, 18, 26]],
    "28x896": [[1, 2, 64]],
    "896x56": [[1, 64, 4]],
    "3 images of one size": [[1, 18, 26]] * 3,
    "2 images of different sizes": [[1, 32, 32], [1, 18, 26]],
    "video grid_t 2": [[2, 18, 26]],
    "video grid_t 4": [[4, 16, 20]],
    "image + video": [[1, 18, 26], [2, 16, 20]],
}
SEED = 4


@pytest.fixture(scope="module")
def weights():
    return RandomWeights(TINY, seed=SEED)


@pytest.fixture(scope="module")
def hf(weights):
    return hf_vision_model(TINY, weights.state_dict())


@pytest.fixture(scope="module")
def dyn(tmp_path_factory, weights):
    d = tmp_path_factory.mktemp("dyn")
    export_dynamic(weights, d / "self.onnx", progress=False)
    export_dynamic(weights, d / "host.onnx", host_inputs=True, progress=False)
    return {"self": check_written(d / "self.onnx"), "host": check_written(d / "host.onnx"), "dir": d}


def _pixels(grid, seed=0):
    rows = int(np.prod(np.asarray(grid), axis=1).sum())
    return np.random.default_rng(seed).standard_normal((rows, TINY.patch_dim)).astype(np.float32) * 3


def _ref(hf, px, grid):
    with torch.no_grad():
        return hf(torch.from_numpy(px), torch.tensor(grid, dtype=torch.int64)).numpy()


@pytest.fixture(scope="module")
def case_ref(hf):
    """(pixels, grid, transformers' output) per case, computed once (transformers is the slow side)."""
    cache = {}

    def get(case):
        if case not in cache:
            grid = np.array(CASES[case], np.int64)
            px = _pixels(grid)
            cache[case] = px, grid, _ref(hf, px, grid)
        return cache[case]
    return get


def _rel(out, ref):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.abs(ref).max() > 0.05  # not a degenerate all-zero comparison
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", list(CASES))
def test_self_contained_equals_transformers(dyn, case_ref, case):
    px, grid, ref = case_ref(case)
    out, = dyn["self"].run(None, {"pixel_values": px, "image_grid_thw": grid})
    assert out.shape == (len(px) // 4, TINY.out_hidden_size)
    assert _rel(out, ref) <= 1e-4


@pytest.mark.parametrize("case", ["252x364 (uneven windows)", "image + video", "2 images of different sizes"])
def test_host_inputs_kind_equals_transformers(dyn, case_ref, case):
    px, grid, ref = case_ref(case)
    feeds = {"pixel_values": px, **host_inputs(TINY, grid, len(px))}
    assert [i.name for i in dyn["host"].get_inputs()] == ["pixel_values", *GRID_TENSORS]
    out, = dyn["host"].run(None, feeds)
    assert _rel(out, ref) <= 1e-4


def test_host_inputs_equal_the_in_graph_tensors(dyn):
    """numpy and the graph's own computation (qvl_surgery.core.grid's two forms) give the same grid tensors."""
    import onnxruntime as ort
    m = onnx.load(str(dyn["dir"] / "self.onnx"), load_external_data=False)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in GRID_TENSORS)
    probe = dyn["dir"] / "probe.onnx"
    onnx.save(m, str(probe))
    s = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    grid = np.array([[1, 18, 26], [2, 16, 20], [1, 2, 64]], np.int64)
    outs = s.run(GRID_TENSORS, {"pixel_values": _pixels(grid), "image_grid_thw": grid})
    for name, got in zip(GRID_TENSORS, outs):
        want = host_inputs(TINY, grid)[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if got.dtype == np.int64:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)


def test_processor_images_and_video(dyn, hf):
    """Inputs straight from transformers' processor: two images of different sizes, then a video."""
    from transformers import Qwen2VLImageProcessor
    rng = np.random.default_rng(0)
    proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=280 * 280)
    imgs = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((200, 300), (120, 90))]
    enc = proc(images=imgs, return_tensors="np")
    vid = proc(images=None, videos=[rng.integers(0, 255, (4, 100, 140, 3), dtype=np.uint8)], return_tensors="np")
    px = np.concatenate([enc["pixel_values"], vid["pixel_values_videos"]]).astype(np.float32)
    grid = np.concatenate([enc["image_grid_thw"], vid["video_grid_thw"]]).astype(np.int64)
    assert grid[-1, 0] == 2 and len({tuple(r[1:]) for r in grid.tolist()}) == 3
    out, = dyn["self"].run(None, {"pixel_values": px, "image_grid_thw": grid})
    assert _rel(out, _ref(hf, px, grid)) <= 1e-4


def test_full_attention_in_query_chunks(tmp_path, weights, case_ref):
    """A tiny score budget forces many non-empty chunks (and an empty tail): still exact; so is one chunk."""
    model = build_dynamic_encoder(TINY, weights, full_chunk_mb=0.02)
    save_model(model, tmp_path / "c.onnx", progress=None)
    s = check_written(tmp_path / "c.onnx")
    save_model(build_dynamic_encoder(TINY, weights, full_chunks=1), tmp_path / "one.onnx", progress=None)
    one = check_written(tmp_path / "one.onnx")
    assert not any(n.op_type == "Slice" and "/attn/" in n.name for n in load_model(tmp_path / "one.onnx").graph.node)
    for case in ("252x364 (uneven windows)", "2 images of different sizes"):
        px, grid, ref = case_ref(case)
        for sess in (s, one):
            out, = sess.run(None, {"pixel_values": px, "image_grid_thw": grid})
            assert _rel(out, ref) <= 1e-4


def test_no_sequence_squared_tensor(dyn):
    """Run with every intermediate exposed: no tensor has two axes as long as the sequence.

    Three images and a video: full attention is per frame ([F, H, L, L], L < S), window
    attention per padded window ([W, H, 64, 64])."""
    import onnxruntime as ort
    m = onnx.load(str(dyn["dir"] / "self.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert not {"Loop", "If", "Scan", "TopK", "Equal", "ScatterElements", "ScatterND"} & set(ops)
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    assert ops.count("Softmax") == 32 * len(TINY.fullatt_block_indexes) + TINY.depth - len(TINY.fullatt_block_indexes)
    names = [o for n in m.graph.node for o in n.output if o]
    del m.graph.output[:]
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    probe = dyn["dir"] / "all.onnx"
    onnx.save(m, str(probe))
    s = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    grid = np.array([[1, 18, 26]] * 2 + [[1, 8, 8], [2, 16, 20]], np.int64)
    px = _pixels(grid)
    S = len(px)
    worst = 0
    for name, v in zip(names, s.run(names, {"pixel_values": px, "image_grid_thw": grid})):
        long_axes = [d for d in np.shape(v) if d >= S]
        assert len(long_axes) <= 1, (name, np.shape(v))
        worst = max(worst, np.size(v))
    # the largest tensor is the full-attention scores of 5 frames padded to the largest (468 patches)
    assert worst == 5 * TINY.num_heads * 468 * 468 < TINY.num_heads * S * S


def test_structure_and_metadata(dyn):
    for kind in ("self", "host"):
        path = dyn["dir"] / f"{kind}.onnx"
        onnx.checker.check_model(str(path))
        m = load_model(path)
        meta = m.metadata()
        assert meta["qvl_surgery.dynamic"] == kind
        assert json.loads(meta["qvl_surgery.passes"]) == ["export"]
        assert json.loads(meta["qvl_surgery.fullatt_blocks"]) == list(TINY.fullatt_block_indexes)
        assert json.loads(meta["qvl_surgery.block_outputs"]) == ["patch_embed.output"] + [
            f"blocks.{i}.output" for i in range(TINY.depth)]
        assert "qvl_surgery.image_size" not in meta and "qvl_surgery.grid" not in meta
        assert meta["qvl_surgery.dtype"] == "float32"
        produced = {o for n in m.graph.node for o in n.output}
        assert set(json.loads(meta["qvl_surgery.block_outputs"])) <= produced
        names = {n.name for n in m.graph.node}
        assert "/blocks.3/mlp/down_proj/Gemm" in names and "/blocks.0/mlp/act/Sigmoid" in names
        assert [o.name for o in m.graph.output] == ["image_features"]
        assert m.proto.opset_import[0].version == 17
        assert sorted(p.name for p in dyn["dir"].glob(f"{kind}.onnx*")) == [f"{kind}.onnx", f"{kind}.onnx.data"]


@pytest.mark.parametrize("rows,grid,needle", [
    (468, [[1, 18, 26], [1, 2, 2]], "covers 472 patches"),
    (442, [[1, 17, 26]], "multiples of spatial_merge_size 2"),
    (0, [[0, 18, 26]], "must all be positive"),
    (468, [[1, -18, -26]], "must all be positive"),
    (468, [1, 18, 26], "must be [num_images, 3]"),
    (468, np.zeros((0, 3), np.int64), "must be [num_images, 3]"),
    (468, [[1.0, 18.0, 26.0]], "must be integer"),
])
def test_check_grid_refuses(rows, grid, needle):
    with pytest.raises(BadInput) as e:
        check_grid(TINY, rows, grid)
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BadInput):
        host_inputs(TINY, grid, rows)


def test_check_grid_accepts():
    g = check_grid(TINY, 468 + 2 * 320, np.array([[1, 18, 26], [2, 16, 20]], np.int32))
    assert g.dtype == np.int64 and g.tolist() == [[1, 18, 26], [2, 16, 20]]
