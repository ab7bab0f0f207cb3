"""The export against transformers' own forward, layout and processor (tiny config)."""
import json

import numpy as np
import pytest
import torch

from conftest import TINY, check_written, hf_forward, hf_vision_model, ort_run, cli, tiny_pixels
from qvl_surgery.core.config import PRESETS, VisionConfig
from qvl_surgery.core.export import export
from qvl_surgery.core.layout import window_layout
from qvl_surgery.core.modelfile import load_model
from qvl_surgery.core.weights import CheckpointWeights, RandomWeights, StateDictWeights, parameter_count


def test_3b_parameter_count_matches_published_figure():
    assert parameter_count(PRESETS["3b"]) == 668_684_288


@pytest.mark.parametrize("size", [(448, 448), (252, 364), (56, 112)])
def test_layout_matches_transformers(size):
    hf = hf_vision_model(TINY, RandomWeights(TINY).state_dict())
    gh, gw = size[0] // 14, size[1] // 14
    thw = torch.tensor([[1, gh, gw]])
    win, cu = hf.get_window_index(thw)
    lay = window_layout(TINY, size)
    np.testing.assert_array_equal(lay.window_index, win.numpy())
    np.testing.assert_array_equal(lay.cu_window_seqlens, torch.unique_consecutive(torch.tensor(cu)).numpy())


@pytest.mark.parametrize("fixture,size", [("tiny_448", (448, 448)), ("tiny_uneven", (252, 364))])
def test_export_equals_transformers_forward(request, fixture, size):
    path = request.getfixturevalue(fixture)
    seed = 0 if fixture == "tiny_448" else 1
    hf = hf_vision_model(TINY, RandomWeights(TINY, seed=seed).state_dict())
    check_written(path)
    for k in range(2):
        px = tiny_pixels(size, seed=k) * 3
        ref = hf_forward(hf, px, size)
        out, = ort_run(path, {"pixel_values": px})
        assert out.shape == ref.shape == (size[0] // 28 * (size[1] // 28), TINY.out_hidden_size)
        assert np.abs(out - ref).max() <= 1e-4, np.abs(out - ref).max()
        assert np.abs(ref).max() > 0.05  # not a degenerate all-zero comparison


def test_export_structure(tiny_448):
    m = load_model(tiny_448)
    meta = m.metadata()
    for key in ("version", "vision_config", "image_size", "grid", "window_layout", "fullatt_blocks", "block_outputs"):
        assert "qvl_surgery." + key in meta
    assert json.loads(meta["qvl_surgery.fullatt_blocks"]) == list(TINY.fullatt_block_indexes)
    assert VisionConfig.from_dict(json.loads(meta["qvl_surgery.vision_config"])) == TINY
    S = 32 * 32
    ops = [n.op_type for n in m.graph.node]
    # explicit attention, no SDPA-style fused op, no S x S constant anywhere
    assert ops.count("Softmax") == TINY.depth
    for t in m.graph.initializer:
        assert np.prod(t.dims) < S * S, t.name
    # the mask is built once and shared by every window block
    assert ops.count("Equal") == 1
    window_blocks = TINY.depth - len(TINY.fullatt_block_indexes)
    assert sum(1 for n in m.graph.node if "window_attention_mask" in n.input) == window_blocks
    # exactly one .onnx and one .onnx.data
    assert sorted(p.name for p in tiny_448.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_export_input_is_what_the_processor_returns(tmp_path):
    from PIL import Image
    from transformers import Qwen2VLImageProcessor
    size = (252, 364)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[0], size[1], 3), dtype=np.uint8))
    proc = Qwen2VLImageProcessor()
    enc = proc(images=[img], return_tensors="np")
    assert enc["image_grid_thw"].tolist() == [[1, size[0] // 14, size[1] // 14]]
    w = RandomWeights(TINY, seed=3)
    export(w, tmp_path / "m.onnx", size, progress=False)
    px = enc["pixel_values"].astype(np.float32)
    out, = ort_run(tmp_path / "m.onnx", {"pixel_values": px})
    ref = hf_forward(hf_vision_model(TINY, w.state_dict()), px, size)
    assert np.abs(out - ref).max() <= 1e-4


def _tiny_checkpoint(path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = Qwen2_5_VLConfig(
        vision_config=TINY.to_dict(), vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]})
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make biases and norms non-trivial so a wrong mapping shows
        for n, p in model.visual.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="200KB")
    return model


def test_export_from_saved_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    model = _tiny_checkpoint(ckpt)
    assert (ckpt / "model.safetensors.index.json").exists()  # sharded
    r = cli("export", ckpt, "-o", tmp_path / "out" / "model.onnx", "--image-size", "252x364", "-q")
    assert r.returncode == 0, r.stderr
    check_written(tmp_path / "out" / "model.onnx")
    px = tiny_pixels((252, 364), seed=5)
    ref = hf_forward(model.visual, px, (252, 364))
    out, = ort_run(tmp_path / "out" / "model.onnx", {"pixel_values": px})
    assert np.abs(out - ref).max() <= 1e-4
    # only the visual tensors are read: the exported weights are exactly the vision tower's
    src = CheckpointWeights(ckpt)
    assert set(src.location) >= set(src.shapes)


def test_state_dict_source_equals_random_source(tmp_path):
    w = RandomWeights(TINY, seed=2)
    sd = StateDictWeights(TINY, w.state_dict())
    export(w, tmp_path / "a.onnx", (56, 56), progress=False)
    export(sd, tmp_path / "b.onnx", (56, 56), progress=False)
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()


def test_export_from_bf16_checkpoint(tmp_path):
    """Released checkpoints are bf16: the export upcasts each tensor to fp32 exactly."""
    ckpt = tmp_path / "ckpt"
    model = _tiny_checkpoint(ckpt)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    r = cli("export", tmp_path / "bf16", "-o", tmp_path / "out" / "m.onnx", "--image-size", "56x112", "-q")
    assert r.returncode == 0, r.stderr
    visual32 = model.visual.float()  # the bf16 weights, upcast: what the export must contain
    px = tiny_pixels((56, 112), seed=6)
    ref = hf_forward(visual32, px, (56, 112))
    out, = ort_run(tmp_path / "out" / "m.onnx", {"pixel_values": px})
    assert np.abs(out - ref).max() <= 1e-4
    w = CheckpointWeights(tmp_path / "bf16").array("blocks.0.attn.qkv.weight")
    assert w.dtype == np.float32
    assert np.array_equal(w, visual32.blocks[0].attn.qkv.weight.detach().numpy())


def test_export_stand_in_plants_the_outliers_the_library_plants(tmp_path):
    """export --random-init tiny --stand-in spike writes the library's stand-in (STAND_INS['spike'])
    byte for byte, records which in its metadata, and is refused without --random-init."""
    from qvl_surgery.core.weights import STAND_INS
    out, lib, plain = tmp_path / "spike.onnx", tmp_path / "lib.onnx", tmp_path / "plain.onnx"
    r = cli("export", "--random-init", "tiny", "--stand-in", "spike", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    export(STAND_INS["spike"](TINY, 0), lib, (448, 448), progress=False)
    export(RandomWeights(TINY, 0), plain, (448, 448), progress=False)
    data = lambda p: p.with_name(p.name + ".data").read_bytes()
    assert data(out) == data(lib) != data(plain)
    props = {p.key: p.value for p in load_model(out).proto.metadata_props}
    assert props["qvl_surgery.weights"] == STAND_INS["spike"](TINY, 0).description
    r = cli("export", str(tmp_path), "--stand-in", "spike", "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and "--random-init" in r.stderr and not (tmp_path / "x.onnx").exists()
