"""Limits the exports promise: full_chunk_mb is a ceiling on one chunk of attention scores (the
attention pass and the dynamic export alike), and a static export refuses a size no processor
output has."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import TINY, assert_one_line_error, cli
from passes.attention import rewrite_attention
from qvl_surgery.core.dynamic import build_dynamic_encoder
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.export import build_encoder
from qvl_surgery.core.modelfile import load_model, save_model
from qvl_surgery.core.weights import RandomWeights


def _chunk_scores(model) -> list[str]:
    return [n.output[0] for n in model.graph.node if n.op_type == "Softmax" and "chunk" in n.name]


@pytest.mark.parametrize("mb", [1.0, 0.3])
def test_attention_pass_chunks_stay_under_full_chunk_mb(tiny_448, mb):
    out, _ = rewrite_attention(load_model(tiny_448), full_chunk_mb=mb)
    inferred = onnx.shape_inference.infer_shapes(out.proto).graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.value_info}
    sizes = [int(np.prod(dims[name])) * 4 for name in _chunk_scores(out)]
    assert len(sizes) > len(TINY.fullatt_block_indexes)              # the 1024 x 1024 scores were chunked
    assert max(sizes) <= mb * 1e6 < 2 * max(sizes)                   # under the ceiling, not far under


@pytest.fixture(scope="module")
def weights():
    return RandomWeights(TINY, seed=2)


def _run_chunk_scores(tmp_path, weights, grid, **kw) -> list[np.ndarray]:
    """The dynamic export's full-attention chunk scores for ``grid``, from onnxruntime."""
    save_model(build_dynamic_encoder(TINY, weights, **kw), tmp_path / "m.onnx", progress=None)
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    names = _chunk_scores(m)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    onnx.save(m, str(tmp_path / "probe.onnx"))
    grid = np.array(grid, np.int64)
    px = np.zeros((int(np.prod(grid, axis=1).sum()), TINY.patch_dim), np.float32)
    session = ort.InferenceSession(str(tmp_path / "probe.onnx"), providers=["CPUExecutionProvider"])
    return session.run(names, {"pixel_values": px, "image_grid_thw": grid})


@pytest.mark.parametrize("mb,grid", [(1.0, [[1, 32, 32]]), (2.0, [[1, 32, 32], [2, 18, 26]])])
def test_dynamic_chunks_stay_under_full_chunk_mb(tmp_path, weights, mb, grid):
    scores = [s for s in _run_chunk_scores(tmp_path, weights, grid, full_chunk_mb=mb) if s.size]
    assert len(scores) > len(TINY.fullatt_block_indexes)             # chunked, not one piece
    assert max(s.nbytes for s in scores) <= mb * 1e6 < 2 * max(s.nbytes for s in scores)


def test_dynamic_chunks_past_the_slices_and_zero(tmp_path, weights):
    """Where the frame needs more chunks than the graph has Slices, each takes ceil(L / full_chunks)
    rows (the documented limit); full_chunk_mb=0 means no chunks, as in the attention pass."""
    scores = [s for s in _run_chunk_scores(tmp_path, weights, [[1, 32, 32]], full_chunk_mb=0.1) if s.size]
    assert {s.shape for s in scores} == {(1, TINY.num_heads, 1024 // 32, 1024)}
    assert not any("chunk" in n.name for n in build_dynamic_encoder(TINY, weights, full_chunk_mb=0).graph.node)


def test_static_export_refuses_a_size_no_processor_output_has(tmp_path, weights):
    with pytest.raises(BadInput, match=r"image size 28x28: .* resizes a 28x28 image to 56x56\); export at 56x56"):
        build_encoder(TINY, weights, (28, 28))
    build_encoder(TINY, weights, (28, 112))                          # 3136 pixels: the processor's smallest
    r = cli("export", "--random-init", "tiny", "--image-size", "28x84", "-o", tmp_path / "m.onnx", "-q")
    assert_one_line_error(r, "image size 28x84", "min_pixels 3136", "export at 56x112")
    assert not (tmp_path / "m.onnx").exists()
