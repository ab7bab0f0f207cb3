"""OpenVINO, both routes users take, on the files this toolkit writes (tiny preset):

- ``onnx``: ``Core.compile_model`` straight on the .onnx (OpenVINO's ONNX frontend at load time);
- ``ir``: ``ov.convert_model`` -> ``ov.save_model`` (the ``ovc`` route: offline, to IR .xml/.bin)
  -> ``Core.compile_model`` on the IR. ``convert_model`` runs OpenVINO's common transformations
  (SDPAFusion, SDPAReshapeFusion), which the ``onnx`` route does not.

Each output is compared with onnxruntime on the fp32 export, with the f32 inference precision hint
(OpenVINO's CPU default is bf16 where the CPU has it). OpenVINO reads a copy of the file: no client
may modify an input, and the test checks that the original's bytes and mtime did not change.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import TINY, import_client, cli, tiny_pixels
from qvl_surgery.core.export import export
from qvl_surgery.core.runners import run_model
from qvl_surgery.core.weights import RandomWeights

# convert_model sends usage statistics through openvino_telemetry unless a consent file says no;
# without the module it falls back to its own no-op stub.
sys.modules.setdefault("openvino_telemetry", None)
ov = import_client("openvino")

SIZES = [(448, 448), (308, 196)]
TOL = 1e-4
HEADS_FIRST_BUG = ("OpenVINO's convert_model (SDPAReshapeFusion) folds a windowed attention whose q is a Reshape "
                   "[H, windows, w, D] back into one full attention: wrong at 448x448, an exception at 308x196; "
                   "windows first ([windows, H, w, D] through a Transpose) converts exactly")


def _q_is_reshaped(model: Path) -> bool:
    """True when some attention's q (first input of the MatMul whose scores reach a Softmax) is
    produced by a Reshape: the pattern SDPAReshapeFusion wrongly removes."""
    g = onnx.load(str(model), load_external_data=False).graph
    prod = {o: n for n in g.node for o in n.output}
    for sm in (n for n in g.node if n.op_type == "Softmax"):
        n = prod.get(sm.input[0])
        while n is not None and n.op_type in ("Add", "Div", "Mul"):
            n = prod.get(n.input[0])
        if n is not None and n.op_type == "MatMul":
            q = prod.get(n.input[0])
            if q is not None and q.op_type == "Reshape":
                return True
    return False


def _snapshot(onnx_path: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of the .onnx and every file beside it that shares its stem (the .data)."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(onnx_path.parent.glob(onnx_path.name + "*"))}


def _copy_model(onnx_path: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in onnx_path.parent.glob(onnx_path.name + "*"):
        shutil.copy2(p, dst / p.name)
    return dst / onnx_path.name


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def exported(request, tmp_path_factory):
    """(size, fp32 export, its windowed rewrite)."""
    size = request.param
    d = tmp_path_factory.mktemp(f"ov{size[0]}x{size[1]}")
    src = d / "model.onnx"
    export(RandomWeights(TINY, seed=0), src, size, progress=False)
    win = d / "windowed.onnx"
    r = cli("attention", src, "-o", win, "-q")
    assert r.returncode == 0, r.stderr
    return size, src, win


def _openvino_run(model: Path, route: str, feeds: dict[str, np.ndarray], work: Path) -> np.ndarray:
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if route == "ir":
        xml = work / "ir" / "model.xml"
        xml.parent.mkdir()
        ov.save_model(ov.convert_model(str(model)), str(xml), compress_to_fp16=False)
        compiled = core.compile_model(str(xml), "CPU", config)
    else:
        compiled = core.compile_model(str(model), "CPU", config)
    return compiled(feeds)[compiled.outputs[0]]


@pytest.mark.parametrize("route", ["onnx", "ir"])
@pytest.mark.parametrize("kind", ["fp32", "windowed"])
def test_openvino_matches_onnxruntime(exported, kind, route, tmp_path, request):
    size, src, win = exported
    model = src if kind == "fp32" else win
    # windows first: no attention's q comes straight from a Reshape (the pattern SDPAReshapeFusion
    # folds into one full attention: wrong at 448x448, an exception at 308x196)
    assert not _q_is_reshaped(model), HEADS_FIRST_BUG
    px = tiny_pixels(size, seed=3) * 2
    ref = run_model(src, {"pixel_values": px})["image_embeds"]
    before = _snapshot(model)
    copy = _copy_model(model, tmp_path / "input")
    got = _openvino_run(copy, route, {"pixel_values": px}, tmp_path)
    assert _snapshot(model) == before, "the input model changed"
    assert got.shape == ref.shape and got.dtype == np.float32
    err = float(np.abs(got - ref).max())
    assert err <= TOL * max(1.0, float(np.abs(ref).max())), f"{kind} via {route}: max abs {err:.3g}"
