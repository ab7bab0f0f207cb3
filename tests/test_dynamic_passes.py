"""Every pass on the dynamic export, against transformers' visual forward: fp16 (emulated), split
(chain), merge, simplify, the CLI's inputs for dynamic models, and one-line refusals."""
import json

import numpy as np
import pytest
import torch

from conftest import TINY, assert_one_line_error, check_written, hf_vision_model, cli
from passes.fp16 import convert_fp16
from passes.merge import merge_to_file
from passes.split import split
from qvl_surgery.core.dynamic import export_dynamic
from qvl_surgery.core.emulate import emulate
from qvl_surgery.core.modelfile import load_model, save_model
from qvl_surgery.core.runners import run_chain, run_model
from qvl_surgery.core.weights import RandomWeights

SEED = 4
# one call each: a single uneven image, two sizes, image + video
CASES = {"252x364": [[1, 18, 26]], "2 sizes": [[1, 32, 32], [1, 18, 26]], "image + video": [[1, 18, 26], [2, 16, 20]]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dynpasses")
    weights = RandomWeights(TINY, seed=SEED)
    export_dynamic(weights, d / "m.onnx", progress=False)
    hf = hf_vision_model(TINY, weights.state_dict())
    refs = {}
    for name, grid in CASES.items():
        grid = np.array(grid, np.int64)
        px = np.random.default_rng(1).standard_normal((int(np.prod(grid, 1).sum()), TINY.patch_dim)).astype(np.float32)
        with torch.no_grad():
            refs[name] = (px, grid, hf(torch.from_numpy(px), torch.from_numpy(grid)).numpy())
    return d, refs


def _rel(out, ref):
    assert out.shape == ref.shape and np.abs(ref).max() > 0.05
    return float(np.abs(out.astype(np.float32) - ref).max() / np.abs(ref).max())


def _cos(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.slow
def test_split_chain_and_merge_equal_transformers(setup):
    d, refs = setup
    r = split(load_model(d / "m.onnx"), d / "parts", parts=3)
    assert len(r.parts) == 3
    man = json.loads((d / "parts" / "manifest.json").read_text())
    for p in man["parts"][1:]:  # each later part takes the activation and the grid, with symbolic dims
        assert [i["name"] for i in p["inputs"]][1:] == ["image_grid_thw"]
        assert p["inputs"][0]["shape"][0] == "num_patches"
    merge_to_file(d / "parts", d / "merged.onnx")
    check_written(d / "merged.onnx")
    for px, grid, ref in refs.values():
        feeds = {"pixel_values": px, "image_grid_thw": grid}
        assert _rel(run_chain(d / "parts", feeds)["image_features"], ref) <= 1e-4
        assert _rel(run_model(d / "merged.onnx", feeds)["image_features"], ref) <= 1e-4


@pytest.mark.slow
def test_fp16_emulated_and_its_split_track_transformers(setup):
    d, refs = setup
    model, report = convert_fp16(load_model(d / "m.onnx"), keep_silu_fp32=True)
    # the grid tables (rotary cos/sin computed from positions, masks) stay fp32, like the static
    # export's precomputed constants
    assert report.kept["grid tables"] and any("Cos" in n for n in report.kept["grid tables"])
    save_model(model, d / "h.onnx")
    split(load_model(d / "h.onnx"), d / "hparts", parts=2)
    for px, grid, ref in refs.values():
        feeds = {"pixel_values": px, "image_grid_thw": grid}
        whole = emulate(d / "h.onnx", feeds)["image_features"]
        chain = emulate(d / "hparts", feeds)["image_features"]
        assert _cos(whole, ref) > 0.9999 and _rel(whole, ref) < 2e-2
        assert np.array_equal(whole, chain)


def test_simplify_keeps_the_dynamic_model_exact(setup, tmp_path):
    d, refs = setup
    r = cli("simplify", d / "m.onnx", "-o", tmp_path / "s.onnx", "-q")
    assert r.returncode == 0, r.stderr
    check_written(tmp_path / "s.onnx")
    for px, grid, ref in refs.values():
        out = run_model(tmp_path / "s.onnx", {"pixel_values": px, "image_grid_thw": grid})["image_features"]
        assert _rel(out, ref) <= 1e-4


@pytest.mark.slow
def test_cli_compare_inputs_for_dynamic_models(setup, tmp_path):
    from PIL import Image
    d, _ = setup
    rng = np.random.default_rng(0)
    files = []
    for k, (h, w) in enumerate([(300, 500), (200, 160), (56, 84), (56, 84)]):
        files.append(tmp_path / f"i{k}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(files[-1])
    split(load_model(d / "m.onnx"), tmp_path / "p", parts=2)
    for args in (["--image", f"{files[0]},{files[1]}"], ["--image", str(files[0]), "--video", f"{files[2]},{files[3]}"],
                 ["--image-size", "448x448,252x364,56x84"]):
        r = cli("compare", d / "m.onnx", tmp_path / "p", *args, "--atol", "1e-5", "--rtol", "1e-5")
        assert r.returncode == 0, args + [r.stdout, r.stderr]
    grid = np.array([[1, 18, 26]], np.int64)
    np.savez(tmp_path / "ok.npz", pixel_values=np.zeros((468, TINY.patch_dim), np.float32), image_grid_thw=grid)
    r = cli("compare", d / "m.onnx", tmp_path / "p", "--inputs", tmp_path / "ok.npz")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("grid,needle", [
    ([[1, 18, 26], [1, 2, 2]], "covers 472 patches"),
    ([[1, 17, 26]], "multiples of spatial_merge_size"),
    ([[0, 18, 26]], "must all be positive"),
])
def test_bad_grids_are_refused_in_one_line(setup, tmp_path, grid, needle):
    d, _ = setup
    np.savez(tmp_path / "bad.npz", pixel_values=np.zeros((468, TINY.patch_dim), np.float32),
             image_grid_thw=np.array(grid, np.int64))
    assert_one_line_error(cli("compare", d / "m.onnx", d / "m.onnx", "--inputs", tmp_path / "bad.npz"), needle)


def test_what_does_not_apply_is_refused_in_one_line(setup, tmp_path):
    d, _ = setup
    assert_one_line_error(cli("attention", d / "m.onnx", "-o", tmp_path / "w.onnx"), "dynamic export")
    assert_one_line_error(cli("export", "--random-init", "tiny", "--dynamic", "--image-size", "448x448",
                                  "-o", tmp_path / "x.onnx"), "--image-size")
    assert not (tmp_path / "w.onnx").exists() and not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_run_dynamic_pipeline(tmp_path):
    r = cli("run", "--random-init", "tiny", "--dynamic", "-o", tmp_path / "run", "--passes",
                "fp16:keep_silu_fp32,split:parts=2", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "run" / "compare.json").read_text())["passed"]
    meta = load_model(tmp_path / "run" / "parts" / "part0.onnx").metadata()
    assert meta["qvl_surgery.dynamic"] == "self"
    r = cli("run", "--random-init", "tiny", "--dynamic", "-o", tmp_path / "g", "--passes", "fp16", "--gen-script")
    assert "build_dynamic_encoder" in r.stdout
    exec(compile(r.stdout, "gen_script", "exec"), {})
    check_written(tmp_path / "g" / "model.onnx")


@pytest.mark.slow
def test_fp16_calibrate_on_the_dynamic_export(setup, tmp_path):
    """Calibration reads what the model takes from its graph: symbolic dims take any size, the grid
    stays int64. From an .npz of two images of different sizes, and from image files each at its
    own size; the emulated result passes the comparison against the fp32 dynamic file."""
    from PIL import Image
    d, refs = setup
    px, grid, _ = refs["2 sizes"]
    np.savez(tmp_path / "cal.npz", pixel_values=px, image_grid_thw=grid)
    rng = np.random.default_rng(3)
    imgs = []
    for k, (h, w) in enumerate([(200, 300), (120, 90)]):
        imgs.append(tmp_path / f"c{k}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(imgs[-1])
    for src in (str(tmp_path / "cal.npz"), f"{imgs[0]},{imgs[1]}"):
        out = tmp_path / f"cal{len(src)}.onnx"
        r = cli("fp16", d / "m.onnx", "-o", out, "--calibrate", src, "-q")
        assert r.returncode == 0, r.stderr
        assert "calibration:" in r.stdout
        r = cli("compare", d / "m.onnx", out, "--emulate-fp16", "--image-size", "448x448,252x364",
                    "--atol", "5e-2", "--rtol", "5e-2")
        assert r.returncode == 0, r.stdout + r.stderr


def test_host_inputs_split_merges_compares_and_runs(tmp_path):
    """A later part of a host-inputs split takes grid tensors part 0 does not (reverse_index): the
    chain is whole, and merge, compare and run accept it."""
    export_dynamic(RandomWeights(TINY, seed=SEED), tmp_path / "h.onnx", host_inputs=True, progress=False)
    r = cli("split", tmp_path / "h.onnx", "--parts", "2", "-o", tmp_path / "p", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("merge", tmp_path / "p", "-o", tmp_path / "m.onnx", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("compare", tmp_path / "h.onnx", tmp_path / "p", "--image-size", "252x364", "--atol", "1e-5",
                "--rtol", "1e-5")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("compare", tmp_path / "p", tmp_path / "m.onnx", "--image-size", "252x364,448x448")
    assert r.returncode == 0, r.stdout + r.stderr
