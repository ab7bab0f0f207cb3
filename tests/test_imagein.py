"""Image-in exports (issue 25): the resized photo in, normalization and patchify folded into the
graph. Judged by transformers' processor + model.visual on real photographs (scikit-image's)."""
import json

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import TINY, check_written, hf_forward, hf_vision_model, ort_run
from qvl_surgery.core import imagein
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.export import export
from qvl_surgery.core.inputs import ModelKind, load_inputs
from qvl_surgery.core.modelfile import load_model
from qvl_surgery.core.weights import RandomWeights

TILED = [(448, 448), (448, 672)]   # both sides multiples of 112: the windows tile the grid
UNEVEN = (252, 364)                # partial windows on the last row and column


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data
    d = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("astronaut", "coffee", "chelsea"):
        out[name] = d / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(out[name])
    return out


@pytest.fixture(scope="module")
def hf():
    w = RandomWeights(TINY, seed=0)
    return w, hf_vision_model(TINY, w.state_dict())


def processor_pixels(pixels_uint8: np.ndarray) -> np.ndarray:
    from transformers import Qwen2VLImageProcessor
    h, w = pixels_uint8.shape[:2]
    proc = Qwen2VLImageProcessor(min_pixels=h * w, max_pixels=h * w)
    return proc(images=[Image.fromarray(pixels_uint8)], return_tensors="np")["pixel_values"].astype(np.float32)


@pytest.mark.parametrize("size", TILED + [UNEVEN])
@pytest.mark.parametrize("layout", imagein.LAYOUTS)
def test_image_in_equals_processor_and_transformers_on_photos(size, layout, hf, photos, tmp_path):
    weights, model = hf
    out = tmp_path / "m.onnx"
    export(weights, out, size, progress=False, image_input=layout)
    check_written(out)
    proto = onnx.load(str(out), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == 1 and "MatMul" not in [n.op_type for n in proto.graph.node[:6]]
    assert ("Gather" in ops) == (size == UNEVEN)       # a Gather only where windows are partial
    x = proto.graph.input[0]
    assert x.name == "image" and x.type.tensor_type.elem_type == (onnx.TensorProto.UINT8 if layout == "nhwc"
                                                                    else onnx.TensorProto.FLOAT)
    for path in photos.values():
        px = imagein.resize_image(path, size)
        ref = hf_forward(model, processor_pixels(px), size)
        got = ort_run(out, {"image": imagein.image_feed(px, layout)})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), (path.name, np.abs(got - ref).max())


def test_folded_patch_embed_is_the_processor_then_conv3d():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((TINY.hidden_size, 3, 2, 14, 14))
    kernel, bias = imagein.folded_patch_embed(w, TINY)
    x = rng.integers(0, 256, (3, 14, 14)).astype(np.float64)
    normed = (x / 255 - np.asarray(imagein.IMAGE_MEAN)[:, None, None]) / np.asarray(imagein.IMAGE_STD)[:, None, None]
    want = np.einsum("octij,cij->o", w, normed)          # both frames of the patch are the image
    got = np.einsum("ocij,cij->o", kernel.astype(np.float64), x) + bias
    assert np.allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("hw", [(28, 28), (100, 300), (448, 448), (1080, 1920), (4000, 3000), (60, 5000),
                                (500, 333)])
def test_smart_resize_is_the_processors_rule(hw):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    assert imagein.smart_resize(*hw) == smart_resize(*hw, min_pixels=imagein.MIN_PIXELS,
                                                     max_pixels=imagein.MAX_PIXELS)


def test_resize_then_model_equals_processor_then_pixel_values_export(photos, tmp_path):
    """The host path a deployment runs (smart_resize, resize_image, image_feed) against the
    processor's own resize, on a photo whose size the processor changes."""
    from transformers import Qwen2VLImageProcessor
    photo = np.asarray(Image.open(photos["chelsea"]))        # 300 x 451
    size = imagein.smart_resize(*photo.shape[:2], max_pixels=320 * 480)
    w = RandomWeights(TINY, seed=0)
    export(w, tmp_path / "pv.onnx", size, progress=False)
    export(w, tmp_path / "im.onnx", size, progress=False, image_input="nhwc")
    proc = Qwen2VLImageProcessor(max_pixels=320 * 480)
    px = proc(images=[Image.fromarray(photo)], return_tensors="np")
    assert px["image_grid_thw"].tolist() == [[1, size[0] // 14, size[1] // 14]]
    ref = ort_run(tmp_path / "pv.onnx", {"pixel_values": px["pixel_values"].astype(np.float32)})[0]
    got = ort_run(tmp_path / "im.onnx", {"image": imagein.image_feed(imagein.resize_image(photo, size), "nhwc")})[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_compare_an_image_in_file_with_its_pixel_values_export(photos, tmp_path):
    from qvl_surgery.analysis.compare import compare
    w = RandomWeights(TINY, seed=0)
    export(w, tmp_path / "pv.onnx", (448, 448), progress=False)
    export(w, tmp_path / "im.onnx", (448, 448), progress=False, image_input="nchw")
    for image in (str(photos["astronaut"]), None):            # a photo, or one random uint8 image
        feeds = load_inputs(tmp_path / "pv.onnx", image=image, also_for=tmp_path / "im.onnx")
        assert set(feeds) == {"pixel_values", "image"}
        report = compare(tmp_path / "pv.onnx", tmp_path / "im.onnx", feeds=feeds, atol=1e-5, rtol=1e-3,
                         min_cosine=0.99999)
        assert report.passed, report.reasons
    export(w, tmp_path / "other.onnx", (448, 672), progress=False, image_input="nchw")
    with pytest.raises(BadInput, match="of its size"):
        load_inputs(tmp_path / "pv.onnx", also_for=tmp_path / "other.onnx")


def test_random_inputs_and_metadata_of_an_image_in_file(tmp_path):
    export(RandomWeights(TINY, seed=0), tmp_path / "m.onnx", (448, 448), progress=False, image_input="nhwc")
    kind = ModelKind.of(tmp_path / "m.onnx")
    assert kind.image_input == "nhwc" and kind.image_size == (448, 448)
    feeds = load_inputs(tmp_path / "m.onnx")
    assert feeds["image"].dtype == np.uint8 and feeds["image"].shape == (1, 448, 448, 3)
    meta = load_model(tmp_path / "m.onnx").metadata()
    assert meta["qvl_surgery.input"] == "image-nhwc" and json.loads(meta["qvl_surgery.passes"]) == ["export"]


def test_bad_layout_is_one_line():
    with pytest.raises(BadInput, match="nhwc"):
        imagein.check_layout("nwhc")


@pytest.mark.parametrize("size", [TILED[0], UNEVEN])
def test_every_pass_runs_on_an_image_in_file(size, photos, tmp_path):
    """fp16, quantize, smooth, rotate, attention and split take an image-in file as they take a
    pixel_values one; each result runs on the photo and stays as close to the source as the pass
    promises (exact ones to fp32 rounding)."""
    from passes.attention import rewrite_attention
    from passes.fp16 import convert_fp16
    from passes.quantize import quantize_model
    from passes.rotate import rotate_model
    from passes.smooth import smooth_model
    from passes.split import split_model
    from qvl_surgery.core.metrics import centered_cosine
    from qvl_surgery.core.runners import run_chain
    from qvl_surgery.core.values import write_value
    src = tmp_path / "m.onnx"
    export(RandomWeights(TINY, seed=0), src, size, progress=False, image_input="nhwc")
    feeds = load_inputs(src, image=str(photos["coffee"]))
    ref = ort_run(src, feeds)[0]
    floors = {"fp16": 0.9999, "w8a8": 0.999, "smooth": 0.99999, "rotate": 0.99999, "attention": 0.99999,
              "split": 0.99999}
    runs = {"fp16": lambda m: convert_fp16(m, keep_io_types=True),
            "w8a8": lambda m: quantize_model(m, activations="int8", format="onnxruntime"),
            "smooth": lambda m: smooth_model(m, calibrate="random:2"),
            "rotate": lambda m: rotate_model(m),
            "attention": lambda m: rewrite_attention(m, mode="mha"),
            "split": lambda m: split_model(m, parts=2)}
    for name, run in runs.items():
        value, _ = run(load_model(src))
        out = tmp_path / (name if name == "split" else f"{name}.onnx")
        write_value(value, out)
        got = run_chain(out / "manifest.json", feeds)["image_embeds"] if name == "split" else ort_run(out, feeds)[0]
        assert centered_cosine(np.asarray(got, np.float32), ref) >= floors[name], name


# ------------------------------------------------------------------------------------- buckets

def test_a_bucket_folder_stores_the_weights_once_and_each_size_equals_transformers(hf, photos, tmp_path):
    from qvl_surgery.core.buckets import BUCKETS, DATA, build_buckets, choose_bucket, load_buckets
    from qvl_surgery.core.values import write_value
    weights, model = hf
    sizes = [(448, 448), (448, 672), (672, 448), (252, 364)]
    export(weights, tmp_path / "one.onnx", (448, 448), progress=False, image_input="nhwc")
    write_value(build_buckets(weights, sizes, "nhwc"), tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert files == sorted([".qvl-surgery", BUCKETS, DATA] + [f"{h}x{w}.onnx" for h, w in sizes])
    one = (tmp_path / "one.onnx.data").stat().st_size
    shared = (tmp_path / "b" / DATA).stat().st_size
    # the weights once; what grows is each size's own rotary tables (a few % of a 3b, more of the tiny)
    per_size = sum(2 * (h // 14) * (w // 14) * TINY.head_dim * 4 for h, w in sizes[1:])   # rotary cos, sin
    assert shared <= one + per_size + 64 * 8
    for h, w in sizes:
        check_written(tmp_path / "b" / f"{h}x{w}.onnx")
        m = load_model(tmp_path / "b" / f"{h}x{w}.onnx")
        assert {f.name for f in m.data_files()} == {DATA}
    doc = json.loads((tmp_path / "b" / BUCKETS).read_text())
    assert doc["sizes"] == [list(s) for s in sizes] and "aspect ratio" in doc["rule"]
    # each photo goes to its bucket, and that file equals transformers at the bucket's size
    value = load_buckets(tmp_path / "b")
    for name, want in (("astronaut", (448, 448)), ("coffee", (448, 672)), ("chelsea", (448, 672))):
        photo = np.asarray(Image.open(photos[name]))
        size = choose_bucket(*photo.shape[:2], value.sizes)
        assert size == want, name
        px = imagein.resize_image(photo, size)
        ref = hf_forward(model, processor_pixels(px), size)
        got = ort_run(tmp_path / "b" / f"{size[0]}x{size[1]}.onnx", {"image": imagein.image_feed(px, "nhwc")})[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert choose_bucket(900, 500, value.sizes) == (672, 448)        # portrait
    assert choose_bucket(300, 300, [(448, 448), (252, 364)]) == (448, 448)


def test_bucket_sizes_for_a_pixel_budget():
    from qvl_surgery.core.buckets import bucket_sizes
    sizes = bucket_sizes(5, 448 * 448)
    assert len(sizes) == 5 and (448, 448) in sizes
    assert all(h % 28 == 0 and w % 28 == 0 and h * w <= 448 * 448 for h, w in sizes)
    ratios = [w / h for h, w in sizes]
    assert ratios == sorted(ratios) and ratios[0] < 0.6 and ratios[-1] > 1.9


def test_passes_run_on_a_bucket_folder_and_keep_the_weights_shared(tmp_path, capsys):
    from qvl_surgery.app.cli import main
    from qvl_surgery.core.buckets import DATA
    assert main(["export", "--random-init", "tiny", "-o", str(tmp_path / "b"), "--input", "image",
                 "--image-size", "448x448,448x672", "-q"]) == 0
    for cmd in (["fp16", "--keep-silu-fp32"], ["quantize"], ["rotate"]):
        out = tmp_path / cmd[0]
        assert main([cmd[0], str(tmp_path / "b"), "-o", str(out), "-q", *cmd[1:]]) == 0, capsys.readouterr().err
        for size in ("448x448", "448x672"):
            m = load_model(out / f"{size}.onnx")
            assert {f.name for f in m.data_files()} == {DATA}
            assert json.loads(m.metadata()["qvl_surgery.passes"])[-1].startswith(cmd[0])
            check_written(out / f"{size}.onnx")
        a = ort_run(tmp_path / "b" / "448x672.onnx", load_inputs(tmp_path / "b" / "448x672.onnx"))[0]
        b = ort_run(out / "448x672.onnx", load_inputs(tmp_path / "b" / "448x672.onnx"))[0]
        from qvl_surgery.core.metrics import centered_cosine
        assert centered_cosine(b.astype(np.float32), a) > 0.999, cmd
    capsys.readouterr()
    assert main(["split", str(tmp_path / "b"), "--parts", "2", "-o", str(tmp_path / "s")]) == 2
    assert "size's file on its own" in capsys.readouterr().err
    assert main(["export", "--random-init", "tiny", "-o", str(tmp_path / "x"), "--image-size", "448x448,448x672"]) == 2
    assert "--input image" in capsys.readouterr().err


@pytest.mark.parametrize("layout", imagein.LAYOUTS)
def test_toolchain_configs_of_an_image_in_file(layout, photos, tmp_path, capsys):
    """rknn's and pulsar2's configs say mean 0 / std 1 where the normalization is in the graph (255 x the
    processor's for nchw-normalized), and the calibration set is the resized photos themselves, as images."""
    import tarfile
    from qvl_surgery.app.cli import main
    export(RandomWeights(TINY, seed=0), tmp_path / "m.onnx", (448, 448), progress=False, image_input=layout)
    data = ",".join(str(photos[n]) for n in ("astronaut", "coffee"))
    assert main(["toolchains", str(tmp_path / "m.onnx"), "--keep-block", "0", "--dataset", data,
                 "-o", str(tmp_path / "tc"), "-q"]) == 0, capsys.readouterr().err
    rk = json.loads((tmp_path / "tc" / "rknn_hybrid.json").read_text())
    mean, std = imagein.toolchain_mean_std(layout)
    assert rk["config"] == {"mean_values": [mean], "std_values": [std]}
    assert (mean == [0, 0, 0]) == (layout != "nchw-normalized") and (std[0] > 60) == (layout == "nchw-normalized")
    lines = (tmp_path / "tc" / "calib" / "rknn" / "dataset.txt").read_text().split()
    assert lines == ["0000_image.png", "0001_image.png"]
    for line, name in zip(lines, ("astronaut", "coffee")):
        got = np.asarray(Image.open(tmp_path / "tc" / "calib" / "rknn" / line))
        assert np.array_equal(got, imagein.resize_image(photos[name], (448, 448)))
    p2 = json.loads((tmp_path / "tc" / "pulsar2_config.json").read_text())["quant"]["input_configs"][0]
    assert p2["calibration_format"] == "Image" and p2["calibration_mean"] == mean
    with tarfile.open(tmp_path / "tc" / p2["calibration_dataset"]) as t:
        assert t.getnames() == ["0000.png", "0001.png"]


def test_the_window_reorder_keeps_channels_last(tmp_path):
    """rknn-toolkit2 2.5.0 turns a window reorder that moves the channel axis into its exWindow and
    then mixes windows and channels (no error; output unrelated to transformers: scripts/imagein-proof).
    So the Conv's channels go last at once, and no later Transpose moves the last axis."""
    export(RandomWeights(TINY, seed=0), tmp_path / "m.onnx", (448, 672), progress=False, image_input="nchw")
    nodes = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.node
    conv = next(k for k, n in enumerate(nodes) if n.op_type == "Conv")
    end = next(k for k, n in enumerate(nodes) if "patch_embed.output" in n.output)
    perms = [list(n.attribute[0].ints) for n in nodes[conv + 1:end + 1] if n.op_type == "Transpose"]
    assert perms[0] == [0, 2, 3, 1] and all(p[-1] == len(p) - 1 for p in perms[1:])
    assert max(len(p) for p in perms) <= 6


@pytest.mark.parametrize("args, needle", [
    (["--input", "image", "--buckets", "0"], "--buckets 0"),
    (["--input", "image", "--buckets", "3", "--max-pixels", "10"], "--max-pixels 10"),
    (["--input", "image", "--image-size", "448x448,448x448"], "given twice"),
    (["--image-size", "448x448,448x672"], "--input image"),
    (["--image-layout", "nchw"], "--input image"),
    (["--input", "image", "--dynamic"], "static exports"),
])
def test_image_in_misuse_is_one_line_before_work(args, needle, tmp_path, capsys):
    from qvl_surgery.app.cli import main
    assert main(["export", "--random-init", "tiny", "-o", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_a_bucket_folder_never_replaces_a_users_folder_or_takes_an_onnx_name(tmp_path, capsys):
    from qvl_surgery.app.cli import main
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    for out in (tmp_path / "mine", tmp_path / "b.onnx"):
        assert main(["export", "--random-init", "tiny", "-o", str(out), "--input", "image", "--image-size",
                     "448x448,448x672", "--force"]) == 2
        assert capsys.readouterr().out == ""          # refused before any graph was built
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's" and not (tmp_path / "b.onnx").exists()
