"""What a new user hit (issue 15), one short test each, on tiny models through the CLI
(``qvl_surgery.app.cli.main`` in this process, or the console scripts where the tool is another one)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import TINY, assert_one_line_error, check_written, cli, import_client
from passes.fp16 import Fp16Pass
from passes.split import split
from qvl_surgery.app.cli import main
from qvl_surgery.core.dynamic import export_dynamic
from qvl_surgery.core.export import export
from qvl_surgery.core.modelfile import load_model
from qvl_surgery.core.weights import RandomWeights

SIZE = (112, 168)   # 8x12 patches: two windows of uneven size, so the attention pass has work


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("small")
    export(RandomWeights(TINY, seed=0), d / "model.onnx", SIZE, progress=False)
    return d / "model.onnx"


@pytest.fixture(scope="module")
def small_split(small, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("small_split") / "parts"
    split(load_model(small), d, parts=2)
    return d


def test_flipped_byte_in_a_repeated_constant_is_a_hash_mismatch(small, small_split, tmp_path):
    damaged = shutil.copytree(small_split, tmp_path / "parts")
    first = {t.name for t in onnx.load(str(damaged / "part0.onnx"), load_external_data=False).graph.initializer}
    part1 = onnx.load(str(damaged / "part1.onnx"), load_external_data=False)
    repeated = next(t for t in part1.graph.initializer if t.name in first and t.external_data)
    offset = int(next(e.value for e in repeated.external_data if e.key == "offset"))
    data = bytearray((damaged / "part1.onnx.data").read_bytes())
    data[offset + 5] ^= 0x01
    (damaged / "part1.onnx.data").write_bytes(bytes(data))
    err = assert_one_line_error(cli("merge", damaged, "-o", tmp_path / "m.onnx"), "does not match")
    assert "part1.onnx.data" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]   # nothing written, no staging left
    assert_one_line_error(cli("compare", small, damaged), "part1.onnx.data", "does not match")


def test_compare_per_block_on_a_split_says_what_it_cannot_see(small, small_split):
    r = cli("compare", small, small_split, "--per-block")
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stdout.splitlines() if "not visible" in line]
    assert len(said) == 1 and f"3 of {TINY.depth} hidden states" in said[0], r.stdout


@pytest.mark.parametrize("name", ["X", "X/manifest.json"])
def test_split_output_folder_named_either_way_and_readable(small, tmp_path, name):
    r = cli("split", small, "--parts", "2", "-o", tmp_path / name, "-q")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "X"
    assert sorted(p.name for p in out.iterdir()) == [".qvl-surgery", "manifest.json", "part0.onnx", "part0.onnx.data", "part1.onnx",
                                                     "part1.onnx.data"]
    assert [p.name for p in tmp_path.iterdir()] == ["X"]   # no staging folder left beside it
    check_written(out / "part1.onnx")
    # the folder has a new folder's mode, not mkdtemp's 0700: whoever can read the files can list them
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    for p in out.iterdir():
        assert p.stat().st_mode & 0o444 == out.stat().st_mode & 0o444, p


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("raised", [KeyboardInterrupt, _Interrupted])
@pytest.mark.parametrize("command", ["run", "fp16"])
def test_interrupted_pass_leaves_nothing_behind(small, tmp_path, monkeypatch, raised, command):
    def interrupted(self, model, context, **kw):
        raise raised()

    monkeypatch.setattr(Fp16Pass, "apply", interrupted)
    work = tmp_path / "work"
    work.mkdir()
    if command == "run":
        argv = ["run", "--random-init", "tiny", "--image-size", "56x56", "--passes", "fp16", "-q",
                "-o", work / "new" / "run"]
    else:
        argv = ["fp16", small, "-q", "-o", work / "new" / "fp16.onnx"]
    if raised is KeyboardInterrupt:
        r = cli(*argv)
        assert r.returncode == 130 and "interrupted" in r.stderr
    else:
        with pytest.raises(Exception) as raised_here:   # run names the pass that failed around it
            main([str(a) for a in argv])
        assert isinstance(raised_here.value, _Interrupted) or isinstance(raised_here.value.__cause__, _Interrupted)
    assert list(work.iterdir()) == []   # no output, no staging folder, not even the folder made for them


def test_attention_on_a_windowed_model_is_refused(small, tmp_path):
    r = cli("attention", small, "-o", tmp_path / "w.onnx", "-q")
    assert r.returncode == 0 and "2 rewritten" in r.stdout, r.stdout + r.stderr
    err = assert_one_line_error(cli("attention", tmp_path / "w.onnx", "-o", tmp_path / "again.onnx"),
                                "already rewritten")
    assert "windowed" in err
    # the same file without its metadata (a tool that drops metadata_props): told by the graph
    proto = onnx.load(str(tmp_path / "w.onnx"), load_external_data=False)
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    assert_one_line_error(cli("attention", tmp_path / "bare.onnx", "-o", tmp_path / "again.onnx"),
                          "already rewritten", "windowed attention")
    assert not list(tmp_path.glob("again*"))


@pytest.fixture(scope="module")
def dynamic_split(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dynamic")
    export_dynamic(RandomWeights(TINY, seed=0), d / "model.onnx", progress=False)
    split(load_model(d / "model.onnx"), d / "parts", parts=2)
    return d


@pytest.mark.parametrize("target,runner", [("parts/manifest.json", "--qvl-chain"),
                                           ("model.onnx", "--qvl-emulate-fp16")])
def test_polygraphy_plugin_on_a_dynamic_model_refuses_random_grids(dynamic_split, target, runner):
    poly = Path(sys.executable).with_name("polygraphy")
    r = subprocess.run([str(poly), "run", str(dynamic_split / target), runner], capture_output=True, text=True)
    said = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Traceback" not in said and "division by zero" not in said, said[-3000:]
    refusal = [line for line in said.splitlines() if line.startswith("[!]")]
    assert len(refusal) == 1 and "image_grid_thw" in refusal[0] and "--load-inputs" in refusal[0], said[-3000:]


def test_no_module_shadows_the_standard_library():
    root = Path(__file__).resolve().parents[1]
    ours = {p.stem for pkg in ("qvl_surgery", "passes") for p in (root / pkg).glob("*.py")}
    assert not ours & set(sys.stdlib_module_names)


def test_vision_config_defaults_are_transformers_defaults():
    """A field a checkpoint's config.json leaves out reads as transformers reads it."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from qvl_surgery.core.config import VisionConfig
    theirs = Qwen2_5_VLVisionConfig().to_dict()
    ours = {k: v for k, v in VisionConfig().to_dict().items() if k in theirs}
    assert len(ours) >= 12 and ours == {k: theirs[k] for k in ours}


def test_a_missing_client_fails_instead_of_skipping():
    with pytest.raises(pytest.fail.Exception, match="scripts/setup"):
        import_client("qvl_surgery_no_such_client")


def test_builder_env_is_one_cached_folder_per_set_of_pins(tmp_path, monkeypatch):
    from qvl_surgery.app import package
    monkeypatch.delenv(package.BUILDER_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    where = package.builder_env_dir()
    assert where.parent == tmp_path / "cache" / "qvl-surgery"   # not in this checkout: clones share it
    assert package.builder_env_dir() == where
    # one made earlier (by any checkout) is used as it is, not made again
    (where / "bin").mkdir(parents=True)
    (where / "bin" / "python").write_text("")
    (where / package._STAMP).write_text(package._want_stamp() + "\n")
    assert package.builder_env(create=False) == where / "bin" / "python"
    # other pins, another folder
    monkeypatch.setattr(package, "BUILDER_REQUIREMENTS", package.BUILDER_REQUIREMENTS + ("onnx-ir==9.9.9",))
    assert package.builder_env_dir() != where and package.builder_env_dir().parent == where.parent
