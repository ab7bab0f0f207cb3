"""Quantization-friendly surgery (rotate, smooth): exact in fp32 on static, windowed and dynamic exports,
no dtype changed; refusals; what it does to the outlier stand-ins, and (issue 26) smooth then W8A8
with nothing kept within 0.002 of the no-outlier twin on stand-ins of several shapes, judged on photos
the calibration did not see (scripts/surgery_study.py writes the whole table)."""
import json

import numpy as np
import onnx
import pytest

from conftest import TINY, check_written, cli, ort_run
from passes.rotate import hadamard, rotate_model, rotation
from qvl_surgery.analysis.compare import centered_cosine
from qvl_surgery.core.inputs import ModelKind, random_feeds
from qvl_surgery.core.modelfile import load_model, save_model
from qvl_surgery.core.runners import run_model


@pytest.fixture(scope="module")
def tiny_dynamic(tmp_path_factory):
    from qvl_surgery.core.dynamic import export_dynamic
    from qvl_surgery.core.weights import RandomWeights
    out = tmp_path_factory.mktemp("surgery_dyn") / "dynamic.onnx"
    export_dynamic(RandomWeights(TINY, seed=3), out, progress=False)
    return out


@pytest.mark.parametrize("n", [1, 2, 12, 20, 64, 1280])
def test_hadamard_constructions_are_orthogonal(n):
    h = hadamard(n)
    assert h is not None and np.array_equal(h @ h.T, n * np.eye(n))
    q, what = rotation(n, seed=1)
    assert np.allclose(q @ q.T, np.eye(n), atol=1e-12) and "Hadamard" in what
    q, what = rotation(100, seed=1)   # no construction here: a random orthogonal matrix, said so
    assert np.allclose(q @ q.T, np.eye(100), atol=1e-12) and "random orthogonal" in what


def _types(path):
    m = onnx.load(str(path), load_external_data=False)
    return sorted((t.name, t.data_type) for t in m.graph.initializer), [n.op_type for n in m.graph.node]


@pytest.mark.parametrize("which", ["static", "windowed", "dynamic"])
def test_rotate_is_exact_and_adds_nothing(which, tiny_448, windowed, tiny_dynamic, tmp_path):
    src = {"static": tiny_448, "windowed": windowed["random"], "dynamic": tiny_dynamic}[which]
    out = tmp_path / "rot.onnx"
    r = cli("rotate", src, "-o", out)
    assert r.returncode == 0, r.stderr
    check_written(out)
    feeds = random_feeds(ModelKind.of(src), seed=2)
    (a, *_), (b, *_) = run_model(src, feeds).values(), run_model(out, feeds).values()
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    (t0, ops0), (t1, ops1) = _types(src), _types(out)
    assert dict(t1).items() <= dict(t0).items()     # same tensors, same dtypes (the scales dropped)
    assert len(ops1) == len(ops0) - (TINY.depth * 2 + 1) and set(ops1) <= set(ops0)   # the scale Muls


def test_rotate_refuses_a_split_part_in_one_line(tiny_448, tmp_path):
    r = cli("split", tiny_448, "--parts", "2", "-o", tmp_path / "parts")
    assert r.returncode == 0, r.stderr
    r = cli("rotate", tmp_path / "parts" / "part1.onnx", "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and "rotate the whole model, then split" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()


def test_rotate_spreads_massive_channels(stand_ins, tmp_path):
    """On the outlier stand-in, the few massive channels carry nearly all of a normed linear input's
    energy; after rotation no channel carries much more than its share (the fp32 output unchanged).
    Spreading alone does not make per-tensor int8 work there: the massive part is nearly constant
    over tokens, which a rotation keeps (it needs a shift: smooth)."""
    from qvl_surgery.core.segments import run_segments
    src = stand_ins["outlier"]
    rot = save_model(rotate_model(load_model(src))[0], tmp_path / "rot.onnx")
    x = {"pixel_values": np.random.default_rng(0).standard_normal((1024, TINY.patch_dim)).astype(np.float32)}

    def top_share(path):
        from qvl_surgery.core.linears import find_linears
        m = load_model(path)
        name = next(lin.x for lin in find_linears(m, []) if lin.name.startswith("/blocks.2/attn/qkv"))
        got = {}
        run_segments(m, [x], [name], lambda n, v: got.setdefault(n, v))
        energy = np.sort((got[name].astype(np.float64) ** 2).sum(axis=0))[::-1]
        return energy[:4].sum() / energy.sum(), energy[0] / energy.mean()

    (share0, peak0), (share1, peak1) = top_share(src), top_share(rot)
    assert share0 > 0.99 and share1 < 0.5 and peak0 / peak1 > 4, (share0, share1, peak0, peak1)
    a, b = run_model(src, x)["image_embeds"], run_model(rot, x)["image_embeds"]
    assert centered_cosine(a, b) > 0.99999


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_smooth_is_exact_and_changes_no_dtype(which, tiny_448, tiny_dynamic, tmp_path):
    src = {"static": tiny_448, "dynamic": tiny_dynamic}[which]
    out = tmp_path / "smooth.onnx"
    r = cli("smooth", src, "-o", out, "--calibrate", "random:2")
    assert r.returncode == 0, r.stderr
    assert json.loads(load_model(out).metadata()["qvl_surgery.smooth"])["alphas"]   # linear inputs smoothed
    check_written(out)
    feeds = random_feeds(ModelKind.of(src), seed=5)
    (a, *_), (b, *_) = run_model(src, feeds).values(), run_model(out, feeds).values()
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    (t0, ops0), (t1, ops1) = _types(src), _types(out)
    assert {n: d for n, d in t1 if n in dict(t0)} == {n: d for n, d in t0 if n in dict(t1)}
    # one Sub per RMSNorm (its scale takes 1/t), a Mul and a Sub before each other linear
    assert set(ops1) == set(ops0) | {"Sub"} and len(ops1) > len(ops0)


def test_smooth_refuses_a_bad_alpha(tiny_448, tmp_path):
    r = cli("smooth", tiny_448, "-o", tmp_path / "x.onnx", "--alpha", "1.5")
    assert r.returncode == 2 and "--alpha" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_smooth_removes_the_outlier_penalty(tiny_448, stand_ins, tmp_path):
    """Issue 17's measure, on the tiny stand-in: naive W8A8 with every linear quantized collapses on
    the outlier model; after smooth it reaches what the same scheme reaches on the same weights
    without the outliers (within 0.002) and >= 0.99."""
    from passes.quantize import quantize_model
    from passes.smooth import smooth_model
    src = stand_ins["outlier"]
    x = {"pixel_values": np.random.default_rng(0).standard_normal((1024, TINY.patch_dim)).astype(np.float32)}

    def w8a8(path, name):
        q = save_model(quantize_model(load_model(path), activations="int8", format="onnxruntime")[0],
                       tmp_path / f"{name}.onnx")
        return run_model(q, x)["image_embeds"]

    ref = run_model(src, x)["image_embeds"]
    clean = centered_cosine(run_model(tiny_448, x)["image_embeds"], w8a8(tiny_448, "clean"))
    naive = centered_cosine(ref, w8a8(src, "naive"))
    smoothed, report = smooth_model(load_model(src), calibrate="random:2")
    sm = save_model(smoothed, tmp_path / "smoothed.onnx")
    after = centered_cosine(ref, w8a8(sm, "after"))
    assert naive < 0.5 and after >= 0.99 and after >= clean - 0.002, (naive, after, clean)
    assert max(n["max_after"] for n in report.norms) * 3 < max(n["max_before"] for n in report.norms)


CALIBRATED = ("rocket", "immunohistochemistry", "retina", "hubble_deep_field")
JUDGED = ("astronaut", "coffee", "chelsea")


@pytest.fixture(scope="module")
def photo_judge(tmp_path_factory, tiny_448):
    """Issue 26's measure: surgery and static ranges calibrated on four photos, W8A8 with nothing kept
    (onnxruntime format) judged on three others by the mean token-centered cosine against fp32.
    ``judge(fp32, surgered, tag, **quantize options)``; ``.calibrate`` names the four photos."""
    from PIL import Image
    from skimage import data
    from passes.quantize import quantize_model
    from qvl_surgery.core.inputs import load_inputs
    from qvl_surgery.core.values import write_value
    d = tmp_path_factory.mktemp("photo_judge")
    for name in CALIBRATED + JUDGED:
        Image.fromarray(getattr(data, name)()).save(d / f"{name}.png")
    feeds = [load_inputs(tiny_448, image=str(d / f"{n}.png")) for n in JUDGED]   # every 448x448 export's input

    def judge(ref, model, tag, **options):
        q, _ = quantize_model(load_model(model), activations="int8", format="onnxruntime", **options)
        write_value(q, d / f"{tag}.onnx")
        return float(np.mean([centered_cosine(ort_run(ref, f)[0], ort_run(d / f"{tag}.onnx", f)[0]) for f in feeds]))
    judge.calibrate = ",".join(str(d / f"{n}.png") for n in CALIBRATED)
    return judge


MODES = {"dynamic": {}, "static": "calibrate", "token": {"activation_scale": "token"}}


@pytest.fixture(scope="module")
def twin(photo_judge, tiny_448):
    """The no-outlier twin of every stand-in (random weights, seed 0): its W8A8 cosine per mode."""
    return {m: photo_judge(tiny_448, tiny_448, f"twin_{m}", **_options(m, photo_judge)) for m in MODES}


@pytest.fixture(scope="module")
def smoothed(photo_judge, tmp_path_factory):
    """``smoothed(kind)``: a stand-in's export, the same smoothed on the calibration photos, and the
    smooth report; each made once."""
    from passes.smooth import smooth_model
    from qvl_surgery.core.export import export
    from qvl_surgery.core.values import write_value
    from qvl_surgery.core.weights import STAND_INS
    d = tmp_path_factory.mktemp("smoothed")
    made = {}

    def get(kind):
        if kind not in made:
            src, sm = d / f"{kind}.onnx", d / f"{kind}_smoothed.onnx"
            export(STAND_INS[kind](TINY, 0), src, (448, 448), progress=False)
            model, report = smooth_model(load_model(src), calibrate=photo_judge.calibrate)
            write_value(model, sm)
            made[kind] = src, sm, report
        return made[kind]
    return get


def _options(mode, judge):
    return {"calibrate": judge.calibrate} if MODES[mode] == "calibrate" else MODES[mode]


# stand-in -> the modes smooth must reach the twin in (issue 26: within 0.002). spike: massive values in
# a few tokens, which no per-channel surgery moves out of a per-tensor scale set at run time (dynamic
# stays at naive's 0.9949, twin 0.9998); static ranges clip it and per-token scales isolate it.
SHAPES = {"early-outlier": ("dynamic", "static"),       # onset block 0, two channels
          "late-outlier": ("dynamic", "static"),        # onset block 2, ten channels, 3e3
          "wide-outlier": ("dynamic", "static"),        # 24 of 64 channels, 300
          "huge-outlier": ("dynamic", "static"),        # 3e4
          "proj-offset": ("dynamic", "static"),         # a constant bias-driven offset from attn.proj
          "spike": ("static", "token")}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in ("late-outlier", "proj-offset")
                                  else k for k in SHAPES])
def test_smooth_reaches_the_no_outlier_twin(kind, photo_judge, twin, smoothed):
    """Outlier stand-ins of several shapes, smoothed and W8A8 with nothing kept, judged on photos the
    calibration did not see: within 0.002 of what the same weights without the outliers reach (tiny,
    scripts/surgery_study.py: gaps -0.00006..+0.00027)."""
    src, sm, _ = smoothed(kind)
    got = {m: photo_judge(src, sm, f"{kind}_{m}", **_options(m, photo_judge)) for m in SHAPES[kind]}
    assert all(got[m] >= twin[m] - 0.002 for m in got), (got, twin)


def test_smooth_leaves_a_token_spike_as_is(photo_judge, smoothed):
    """A spike in a few tokens of down_proj's input (the spike stand-in): shifting by the middle of
    its range put a constant into every token and scaling it moved the spike into the weights (W8A8
    static 0.930 there, naive 0.9993); the search, judged against the centered output on a sample
    that keeps the largest rows, leaves that input as is, and smoothed W8A8 is no worse than naive."""
    src, sm, report = smoothed("spike")
    assert report.left == ["/blocks.1/mlp/Mul_output_0"], report.left
    assert "1 left as is" in report.summary()[0]
    naive, after = (photo_judge(src, p, f"spike_{p.stem}") for p in (src, sm))
    assert after >= naive - 1e-4, (naive, after)


def test_stand_in_shapes_are_parameters():
    """Every part of an outlier stand-in's shape is a keyword: onset, channels (indices or a count),
    value, row_scale, writer; the rest of the weights are the twin's."""
    from qvl_surgery.core.weights import OutlierWeights, RandomWeights
    w = OutlierWeights(TINY, 0, onset=-1, channels=3, value=7.0, row_scale=1.0, writer="attn.proj")
    twin = RandomWeights(TINY, 0)
    assert w.block == TINY.depth - 1 and len(w.channels) == 3 and "the same in every token" in w.description
    bias = w.array(f"blocks.{w.block}.attn.proj.bias")
    assert np.all(bias[w.channels] == 7.0)
    assert np.array_equal(np.delete(bias, w.channels), np.delete(twin.array(f"blocks.{w.block}.attn.proj.bias"),
                                                                 w.channels))
    assert np.array_equal(w.array("blocks.1.mlp.down_proj.bias"), twin.array("blocks.1.mlp.down_proj.bias"))
    with pytest.raises(ValueError):
        OutlierWeights(TINY, 0, writer="mlp.up_proj")
