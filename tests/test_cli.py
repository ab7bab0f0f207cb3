"""Bad input: exit 2, one line, no traceback, nothing written."""

import json

import pytest
from safetensors.numpy import save_file

from conftest import TINY, assert_one_line_error, check_written, cli, run_cli
from qvl_surgery.core.weights import RandomWeights


def test_export_random_tiny_and_inspect(tmp_path):
    """The installed console script, as a user runs it (a process of its own); then inspect."""
    out = tmp_path / "o" / "m.onnx"
    r = run_cli("export", "--random-init", "tiny", "--seed", "3", "-o", out, "--image-size", "56x84", "-q")
    assert r.returncode == 0, r.stderr
    check_written(out)
    r = cli("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["attention_patterns"] == 4 and rep["sigmoid_mul_patterns"] == 4 and rep["fits_protobuf_2gb"]


@pytest.mark.parametrize("args,needle", [
    (["export", "{tmp}/nope", "-o", "{tmp}/o/m.onnx"], "no such checkpoint directory"),
    (["export", "{tmp}/empty", "-o", "{tmp}/o/m.onnx"], "no config.json"),
    (["export", "{tmp}/novis", "-o", "{tmp}/o/m.onnx"], "no vision-tower weights"),
    (["export", "--random-init", "tiny", "--image-size", "450x448", "-o", "{tmp}/o/m.onnx"], "multiples of 28"),
    (["export", "--random-init", "13b", "-o", "{tmp}/o/m.onnx"], "unknown preset"),
    (["export", "-o", "{tmp}/o/m.onnx"], "not both or neither"),
    (["inspect", "{tmp}/nope.onnx"], "no such file"),
    (["inspect", "{tmp}/garbage.onnx"], "not an ONNX model"),
])
def test_bad_input(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    nv = tmp_path / "novis"
    nv.mkdir()
    (nv / "config.json").write_text('{"model_type": "qwen2_5_vl", "vision_config": {"depth": 1}}')
    import numpy as np
    save_file({"model.embed_tokens.weight": np.zeros((2, 2), np.float32)}, str(nv / "model.safetensors"))
    (tmp_path / "garbage.onnx").write_bytes(b"not a model at all")
    r = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_one_line_error(r, needle)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "m.onnx"
    assert cli("export", "--random-init", "tiny", "--image-size", "56x56", "-o", out, "-q").returncode == 0
    before = out.read_bytes()
    r = cli("export", "--random-init", "tiny", "--seed", "9", "--image-size", "56x56", "-o", out, "-q")
    assert_one_line_error(r, "already exists", "--force")
    assert out.read_bytes() == before
    r = cli("export", "--random-init", "tiny", "--seed", "9", "--image-size", "56x56", "-o", out, "-q", "--force")
    assert r.returncode == 0, r.stderr
    check_written(out)


def test_export_into_the_checkpoint_directory_is_refused(tmp_path):
    # a checkpoint export accepts (an empty folder would be refused earlier, for having no config.json)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "vision_config": TINY.to_dict()}))
    w = RandomWeights(TINY, seed=0)
    save_file({"visual." + n: w.array(n) for n in w.shapes}, str(ckpt / "model.safetensors"))
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    r = cli("export", ckpt, "-o", ckpt, "-q")
    assert_one_line_error(r, str(ckpt), "must end in .onnx")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = cli("export", "--random-init", "tiny", "--image-size", "56x56", "-o", blocker / "m.onnx", "-q")
    assert_one_line_error(r, "nothing was written")
