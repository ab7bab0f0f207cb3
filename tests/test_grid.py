"""The grid tables (qvl_surgery.core.grid): the graph form alone in onnxruntime equals the numpy form,
and the numpy form equals transformers' get_window_index, rot_pos_emb and cu_seqlens."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import TINY, check_written, hf_vision_model
from qvl_surgery.core.export import OPSET, GraphBuilder
from qvl_surgery.core.grid import GRID_TENSORS, grid_tables_graph, grid_tables_numpy, table_shapes
from qvl_surgery.core.weights import RandomWeights

# rows (t, h, w) in patches: merged sides 9x13 and 1x32 are not multiples of the 4-token window
GRIDS = {
    "one image": [[1, 32, 32]],
    "uneven windows": [[1, 18, 26]],
    "one merged row": [[1, 2, 64]],
    "smallest": [[1, 2, 2]],
    "images of different sizes": [[1, 32, 32], [1, 18, 26], [1, 2, 64], [1, 6, 4]],
    "video t=4": [[4, 16, 20]],
    "image, video, image": [[1, 18, 26], [3, 10, 14], [1, 64, 4]],
}


@pytest.fixture(scope="module")
def tables_model(tmp_path_factory):
    """A model holding only the graph form: image_grid_thw -> the ten tables."""
    g = GraphBuilder()
    names = grid_tables_graph(g, TINY, "image_grid_thw")
    shapes = table_shapes(TINY)
    graph = helper.make_graph(
        g.nodes, "grid_tables", [helper.make_tensor_value_info("image_grid_thw", TensorProto.INT64, ["num_images", 3])],
        [helper.make_tensor_value_info(names[n], *shapes[n]) for n in GRID_TENSORS], initializer=g.initializers)
    path = tmp_path_factory.mktemp("grid") / "tables.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    return check_written(path)


@pytest.mark.parametrize("case", list(GRIDS))
def test_graph_form_equals_numpy_form(tables_model, case):
    grid = np.array(GRIDS[case], np.int64)
    got = dict(zip(GRID_TENSORS, tables_model.run(None, {"image_grid_thw": grid})))
    want = grid_tables_numpy(TINY, grid)
    assert list(want) == list(GRID_TENSORS)
    for name in GRID_TENSORS:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        if want[name].dtype == np.int64:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def hf():
    return hf_vision_model(TINY, RandomWeights(TINY).state_dict())


@pytest.mark.parametrize("case", ["uneven windows", "images of different sizes", "image, video, image"])
def test_numpy_form_equals_transformers(hf, case):
    thw = torch.tensor(GRIDS[case])
    t = grid_tables_numpy(TINY, thw.numpy())
    mu, S = TINY.merge_unit, int(thw.prod(-1).sum())
    window_index, cu_window = hf.get_window_index(thw)
    window_index = window_index.numpy()
    np.testing.assert_array_equal(t["patch_order"], (window_index[:, None] * mu + np.arange(mu)).reshape(-1))
    np.testing.assert_array_equal(t["reverse_index"], np.argsort(window_index))
    rot = hf.rot_pos_emb(thw).reshape(-1, mu, TINY.head_dim // 2)[window_index].reshape(S, -1)
    emb = torch.cat([rot, rot], -1)
    np.testing.assert_allclose(t["rotary_cos"], emb.cos().numpy(), atol=1e-6)
    np.testing.assert_allclose(t["rotary_sin"], emb.sin().numpy(), atol=1e-6)
    # real slots per window / frame = transformers' cu_window_seqlens / cu_seqlens (patches)
    window_sizes = np.diff(torch.unique_consecutive(torch.tensor(cu_window)).numpy())
    np.testing.assert_array_equal((t["window_key_mask"] == 0).sum(axis=-1).reshape(-1), window_sizes)
    frame_sizes = torch.repeat_interleave(thw[:, 1] * thw[:, 2], thw[:, 0]).numpy()
    np.testing.assert_array_equal((t["frame_key_mask"] == 0).sum(axis=-1).reshape(-1), frame_sizes)
    # unpad undoes pad: every window-order row comes back from its slot
    for kind in ("window", "frame"):
        np.testing.assert_array_equal(t[f"{kind}_pad_index"][t[f"{kind}_unpad_index"]], np.arange(S), err_msg=kind)
