"""The pass protocol: one option spec per pass drives the CLI, --passes/recipes and --gen-script;
every pass records itself in the output's metadata; library errors name parameters, the CLI its flags."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, assert_one_line_error, check_written, cli, tiny_pixels
from passes import PASSES
from passes.split import split_model
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile import load_model
from passes import parse_spec, spec_from_dict
from qvl_surgery.core.passbase import Context, Sequential
from qvl_surgery.app.pipeline import read_recipe
from qvl_surgery.core.runners import run_chain, run_model


def _passes_of(path):
    return json.loads(load_model(path).metadata()["qvl_surgery.passes"])


@pytest.mark.parametrize("make", ["text", "recipe"])
def test_float_option_keeps_its_fraction_and_reaches_the_pass(tiny_448, tmp_path, make):
    if make == "text":
        specs = parse_spec("attention:full_chunk_mb=0.5")
    else:
        (tmp_path / "r.json").write_text(json.dumps({"passes": [{"pass": "attention", "full_chunk_mb": 0.5}]}))
        specs = read_recipe(tmp_path / "r.json")["passes"]
    assert specs[0].kwargs()["full_chunk_mb"] == 0.5
    model, reports = Sequential(specs)(load_model(tiny_448), Context())
    # 0.5 MB is below the tiny model's full-attention scores (heads x 1024 x 1024 floats): they are chunked.
    # A truncated option (0) would mean "never chunk".
    chunked = [r for r in reports[0].rewritten if "chunks of" in r]
    assert len(chunked) == len(TINY.fullatt_block_indexes), reports[0].rewritten
    rows = TINY.num_heads * 1024 * 4
    assert all(f"chunks of {int(0.5e6 // rows)} rows" in r for r in chunked)


def test_option_types_are_checked():
    with pytest.raises(BadInput, match="not a float"):
        parse_spec("attention:full_chunk_mb=lots")
    with pytest.raises(BadInput, match="choose one of windowed"):
        parse_spec("attention:mode=sparse")
    with pytest.raises(BadInput, match="not a int"):
        spec_from_dict([{"pass": "split", "parts": 2.5}], "recipe")
    assert parse_spec("split:max_part_bytes=1e9")[0].kwargs()["max_part_bytes"] == 1e9


def test_every_option_of_every_pass_is_a_flag_of_its_subcommand():
    for name, cls in PASSES.items():
        r = cli(name, "--help")
        assert r.returncode == 0, r.stderr
        for o in cls.options:
            assert o.cli_flag in r.stdout, (name, o.cli_flag)
        assert "--gen-script" in r.stdout


def test_every_output_records_its_passes(tiny_448, windowed, tmp_path):
    assert _passes_of(tiny_448) == ["export"]
    assert _passes_of(windowed["random"]) == ["export", "attention"]
    r = cli("fp16", windowed["random"], "-o", tmp_path / "h.onnx", "--keep-silu-fp32", "--keep-op", "Softmax", "-q")
    assert r.returncode == 0, r.stderr
    assert _passes_of(tmp_path / "h.onnx") == ["export", "attention", "fp16:keep_silu_fp32+keep_op=Softmax"]
    assert cli("split", tmp_path / "h.onnx", "--parts", "2", "-o", tmp_path / "p", "-q").returncode == 0
    for k in range(2):
        assert _passes_of(tmp_path / "p" / f"part{k}.onnx")[-1] == "split:parts=2"
    assert cli("merge", tmp_path / "p", "-o", tmp_path / "m.onnx", "-q").returncode == 0
    assert _passes_of(tmp_path / "m.onnx")[-2:] == ["split:parts=2", "merge"]
    r = cli("simplify", tiny_448, "-o", tmp_path / "s.onnx", "-q")
    assert r.returncode == 0, r.stderr
    check_written(tmp_path / "s.onnx")
    assert _passes_of(tmp_path / "s.onnx") == ["export", "simplify"]


def test_library_errors_name_parameters_and_the_cli_its_flags(tiny_448, tmp_path):
    with pytest.raises(BadInput) as e:
        split_model(load_model(tiny_448), parts=0)
    assert str(e.value).startswith("parts=0: need at least 1 part")
    assert_one_line_error(cli("split", tiny_448, "--parts", "0", "-o", tmp_path / "p"), "--parts 0: need at least")
    with pytest.raises(BadInput, match="keep_node='nope'"):
        from passes.fp16 import convert_fp16
        convert_fp16(load_model(tiny_448), keep_node=["nope"])
    assert_one_line_error(cli("fp16", tiny_448, "--keep-node", "nope", "-o", tmp_path / "h.onnx"),
                          "--keep-node nope: matches no node")


def test_pass_gen_script_runs(tiny_448, tmp_path):
    r = cli("fp16", tiny_448, "-o", tmp_path / "h.onnx", "--keep-silu-fp32", "--gen-script")
    assert r.returncode == 0, r.stderr
    assert "Fp16Pass(keep_silu_fp32=True)(value, context)" in r.stdout and not (tmp_path / "h.onnx").exists()
    exec(compile(r.stdout, "gen_script", "exec"), {})
    check_written(tmp_path / "h.onnx")
    r = cli("split", tiny_448, "-o", tmp_path / "p", "--at", "1,merger", "--gen-script")
    exec(compile(r.stdout, "gen_script", "exec"), {})
    px = tiny_pixels((448, 448))
    a = run_model(tiny_448, {"pixel_values": px})["image_embeds"]
    b = run_chain(tmp_path / "p", {"pixel_values": px})["image_embeds"]
    assert np.abs(a - b).max() < 1e-5


def test_sequential_refuses_a_model_pass_after_split():
    with pytest.raises(BadInput, match="split must be the last pass"):
        parse_spec("split:parts=2,fp16")
    assert [p.name for p in parse_spec("split:parts=2,merge")] == ["split", "merge"]


def test_polygraphy_runs_a_manifest_without_model_type(tiny_448, tmp_path):
    assert cli("split", tiny_448, "--parts", "2", "-o", tmp_path / "p", "-q").returncode == 0
    poly = os.path.join(os.path.dirname(sys.executable), "polygraphy")
    for target in (tmp_path / "p" / "manifest.json", tmp_path / "p"):
        r = subprocess.run([poly, "run", str(target), "--qvl-chain"], capture_output=True, text=True)
        assert r.returncode == 0 and "PASSED" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]


def test_single_file_on_every_command_that_writes_a_model(tiny_448, tmp_path):
    """--single-file: one self-contained .onnx (plain onnx.load with no data file beside it)."""
    import onnx
    outs = {"export": ["export", "--random-init", "tiny", "-o", tmp_path / "e.onnx"],
            "export --dynamic": ["export", "--random-init", "tiny", "--dynamic", "-o", tmp_path / "d.onnx"],
            "fp16": ["fp16", tiny_448, "-o", tmp_path / "h.onnx"],
            "attention": ["attention", tiny_448, "-o", tmp_path / "w.onnx"]}
    for name, args in outs.items():
        r = cli(*args, "--single-file", "-q")
        assert r.returncode == 0, (name, r.stderr)
        out = args[args.index("-o") + 1]
        assert not out.with_name(out.name + ".data").exists(), name
        check_written(out)
        assert len(onnx.load(str(out)).graph.initializer) > 0
    px = tiny_pixels((448, 448))
    a = run_model(tiny_448, {"pixel_values": px})["image_embeds"]
    b = run_model(tmp_path / "w.onnx", {"pixel_values": px})["image_embeds"]
    assert np.abs(a - b).max() < 1e-5
    assert cli("split", tiny_448, "--parts", "2", "-o", tmp_path / "p", "-q").returncode == 0
    r = cli("merge", tmp_path / "p", "-o", tmp_path / "m.onnx", "--single-file", "-q")
    assert r.returncode == 0 and not (tmp_path / "m.onnx.data").exists(), r.stderr
    r = cli("run", "--random-init", "tiny", "-o", tmp_path / "run", "--passes", "fp16", "--single-file", "-q")
    assert r.returncode == 0 and not (tmp_path / "run" / "model.onnx.data").exists(), r.stdout + r.stderr
