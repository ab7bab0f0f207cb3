"""run pipeline end to end on the tiny config; the README's Python example."""
import json
import re

import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error, check_written, cli, tiny_pixels
from qvl_surgery.core.emulate import emulate
from qvl_surgery.core.manifest import read_manifest
from qvl_surgery.core.runners import run_model


@pytest.mark.slow
def test_run_export_to_split_parts_compared(tmp_path):
    out = tmp_path / "run"
    r = cli("run", "--random-init", "tiny", "-o", out, "--passes", "attention,fp16:keep_silu_fp32,split:parts=3",
                "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    m = read_manifest(out / "parts")
    assert len(m.parts) == 3
    for p in m.part_paths():
        check_written(p)
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["passed"] and cmp["outputs"][0]["cosine"] > 0.999
    # the same numbers independently: emulated chain against onnxruntime on the fp32 reference
    px = tiny_pixels((448, 448), seed=0)
    ref = run_model(out / "model.fp32.onnx", {"pixel_values": px})["image_embeds"]
    got = emulate(out / "parts", {"pixel_values": px})["image_embeds"].astype(np.float32)
    assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999
    summary = json.loads((out / "summary.json").read_text())
    assert [row["files"] for row in summary["table"]] == [2, 7]
    # no intermediate model files besides the reference and the result
    assert sorted(p.name for p in out.iterdir()) == [".qvl-surgery", "compare.json", "model.fp32.onnx", "model.fp32.onnx.data",
                                                     "parts", "summary.json"]


def test_run_from_existing_export_with_recipe(tiny_uneven, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"passes": [{"pass": "attention", "mode": "mha"}]}))
    r = cli("run", tiny_uneven, "-o", tmp_path / "r", "--recipe", recipe, "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    check_written(tmp_path / "r" / "model.onnx")
    assert not (tmp_path / "r" / "model.fp32.onnx").exists()  # the source export is the reference
    px = tiny_pixels((252, 364), seed=1)
    a = run_model(tiny_uneven, {"pixel_values": px})["image_embeds"]
    b = run_model(tmp_path / "r" / "model.onnx", {"pixel_values": px})["image_embeds"]
    assert np.abs(a - b).max() < 1e-5


def test_gen_script_runs(tmp_path):
    r = cli("run", "--random-init", "tiny", "-o", tmp_path / "g", "--passes",
                "attention,fp16:keep_silu_fp32,split:parts=2", "--gen-script")
    assert r.returncode == 0, r.stderr
    assert "Fp16Pass(keep_silu_fp32=True)(value, context)" in r.stdout
    ns: dict = {}
    exec(compile(r.stdout, "gen_script", "exec"), ns)
    assert len(read_manifest(tmp_path / "g" / "parts").parts) == 2


@pytest.mark.parametrize("args,needle", [
    (["--passes", "fp16,split:parts=2,attention"], "split must be the last pass"),
    (["--passes", "fp16:keep_everything"], "unknown option"),
    (["--passes", "nosuchpass"], "unknown pass"),
    (["--passes", "split:parts=x"], "not a int"),
])
def test_run_bad_input(tmp_path, args, needle):
    r = cli("run", "--random-init", "tiny", "-o", tmp_path / "o", *args)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "PASSED" in out
    assert len(read_manifest(tmp_path / "out" / "api" / "parts").parts) == 3


def test_run_refuses_what_it_would_ignore_before_exporting(tiny_448, tmp_path):
    out = tmp_path / "o"
    cases = [
        (["run", tiny_448, "--image-size", "252x364", "--passes", "fp16"], "--image-size"),
        (["run", tiny_448, "--dynamic", "--passes", "fp16"], "--dynamic"),
        (["run", "--random-init", "tiny", "--passes", "split:parts=2", "--single-file"], "--single-file"),
        (["run", "--random-init", "tiny", "--dynamic", "--passes", "attention"], "dynamic export"),
        (["run", "--random-init", "tiny", "--passes", f"fp16:calibrate={tmp_path / 'none.npz'}"], "no such file"),
    ]
    for args, needle in cases:
        assert_one_line_error(cli(*args, "-o", out), needle)
        assert not out.exists(), args
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"source": {"random_init": "tiny"}, "passes": [{"pass": "fp16"}]}))
    assert_one_line_error(cli("run", tiny_448, "--recipe", recipe, "-o", out), "source once")


@pytest.mark.slow
def test_run_force_replaces_the_previous_run_whole(tmp_path):
    out = tmp_path / "o"
    r = cli("run", "--random-init", "tiny", "-o", out, "--passes", "split:parts=2", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("run", "--random-init", "tiny", "-o", out, "--passes", "fp16", "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".qvl-surgery", "compare.json", "model.fp32.onnx", "model.fp32.onnx.data",
                                                     "model.onnx", "model.onnx.data", "summary.json"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert_one_line_error(cli("run", "--random-init", "tiny", "-o", tmp_path / "mine", "--passes", "fp16",
                                  "--force"), "did not write")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staging left


def _umask():
    import os
    m = os.umask(0)
    os.umask(m)
    return m
