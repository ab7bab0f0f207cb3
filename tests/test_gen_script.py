"""--gen-script on every command that does work: it prints a Python script that does the same
through the library (and writes nothing itself); executed on the tiny model, the script writes the
output the command would have written. Each command's argument checks run before the script is
printed."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import check_written
from qvl_surgery.app.cli import main


def cli(capsys, *args) -> SimpleNamespace:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out, stderr=err)


def script_of(capsys, *args) -> str:
    r = cli(capsys, *args, "--gen-script")
    assert r.returncode == 0, r.stderr
    compile(r.stdout, "gen_script", "exec")
    return r.stdout


def run_script(capsys, text: str) -> str:
    exec(compile(text, "gen_script", "exec"), {})
    return capsys.readouterr().out


@pytest.mark.parametrize("args", [["--image-size", "56x84"], ["--dynamic"]])
def test_export(capsys, tmp_path, args):
    out = tmp_path / "m.onnx"
    text = script_of(capsys, "export", "--random-init", "tiny", "--seed", "3", "-o", out, "-q", *args)
    assert not out.exists() and "RandomWeights(preset('tiny'), seed=3)" in text
    assert "wrote" in run_script(capsys, text) or out.exists()
    check_written(out)


def test_export_checks_its_arguments_first(capsys, tmp_path):
    r = cli(capsys, "export", "--random-init", "tiny", "--dynamic", "--image-size", "56x56", "-o", tmp_path / "m.onnx",
            "--gen-script")
    assert r.returncode == 2 and not r.stdout and len(r.stderr.strip().splitlines()) == 1


def test_inspect(capsys, tiny_448):
    text = script_of(capsys, "inspect", tiny_448)
    assert run_script(capsys, text) == cli(capsys, "inspect", tiny_448).stdout
    text = script_of(capsys, "inspect", tiny_448, "--json", "--activations", "--calibrate", "random:1")
    assert "activations" in json.loads(run_script(capsys, text))


def test_compare(capsys, tiny_448, tmp_path):
    rep = tmp_path / "c.json"
    text = script_of(capsys, "compare", tiny_448, tiny_448, "--json", rep, "--per-block")
    assert not rep.exists() and "judged" in text
    run_script(capsys, text)
    assert json.loads(rep.read_text())["passed"]
    text = script_of(capsys, "compare", tiny_448, tiny_448, "--atol", "1e-4", "--rtol", "1e-4", "--min-cosine", "0.9",
                     "--min-centered-cosine", "0.9")
    assert "judged" not in text and "atol=0.0001" in text


def test_split_and_merge(capsys, tiny_448, tmp_path):
    from qvl_surgery.core.manifest import read_manifest
    parts, merged = tmp_path / "p", tmp_path / "m.onnx"
    run_script(capsys, script_of(capsys, "split", tiny_448, "--parts", "2", "-o", parts, "-q"))
    assert len(read_manifest(parts).parts) == 2
    text = script_of(capsys, "merge", parts, "-o", merged, "--single-file")
    assert "single_file=True" in text
    run_script(capsys, text)
    check_written(merged)


def test_run(capsys, tiny_448, tmp_path):
    text = script_of(capsys, "run", tiny_448, "-o", tmp_path / "r", "--passes", "fp16", "-q")
    assert "compare(" in text
    assert "PASSED" in run_script(capsys, text)
    check_written(tmp_path / "r" / "model.onnx")


def test_sensitivity(capsys, tiny_448, tmp_path):
    out = tmp_path / "sens"
    text = script_of(capsys, "sensitivity", tiny_448, "-o", out, "--inputs", "random:1", "--label", "tiny", "-q")
    assert not out.exists()
    printed = run_script(capsys, text)
    assert "worst alone" in printed
    doc = json.loads((out / "sensitivity.json").read_text())
    assert doc["models"][0]["label"] == "tiny"


def test_sensitivity_checks_its_arguments_first(capsys, tiny_448, tmp_path):
    r = cli(capsys, "sensitivity", tiny_448, "-o", tmp_path / "s", "--label", "a", "--label", "b", "--gen-script")
    assert r.returncode == 2 and not r.stdout and "--label" in r.stderr


@pytest.mark.parametrize("way", [["--keep-block", "0"], ["--keep-node", "/merger/*"],
                                 ["--budget", "0.9", "--calibrate", "random:1"]])
def test_toolchains(capsys, tiny_448, tmp_path, way):
    from conftest import TINY
    np.savez(tmp_path / "a.npz", pixel_values=np.zeros((1024, TINY.patch_dim), np.float32))
    out = tmp_path / "configs"
    text = script_of(capsys, "toolchains", tiny_448, *way, "--dataset", tmp_path / "a.npz", "-o", out, "-q")
    assert not out.exists()
    run_script(capsys, text)
    keep = json.loads((out / "keep.json").read_text())
    assert "kept" in keep and (out / "onnxruntime.json").exists()


def test_toolchains_keep_from_what_it_wrote(capsys, tiny_448, tmp_path):
    assert cli(capsys, "toolchains", tiny_448, "--keep-block", "1", "-o", tmp_path / "a", "-q").returncode == 0
    text = script_of(capsys, "toolchains", tiny_448, "--keep-from", tmp_path / "a" / "keep.json", "-o", tmp_path / "b")
    run_script(capsys, text)
    assert json.loads((tmp_path / "b" / "keep.json").read_text())["kept"] == \
        json.loads((tmp_path / "a" / "keep.json").read_text())["kept"]


def test_package_prints_its_call(capsys, tmp_path):
    """package builds onnxruntime-genai's builder virtualenv (tests/test_package.py runs it): here
    only the script, which names every option."""
    text = script_of(capsys, "package", tmp_path / "ckpt", "-o", tmp_path / "out", "--passes", "simplify", "-q")
    assert "package(" in text and "passes='simplify'" in text and "progress=False" in text
    assert not (tmp_path / "out").exists()
