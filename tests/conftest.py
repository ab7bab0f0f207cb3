import contextlib
import importlib
import io
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qvl_surgery.core.config import PRESETS
from qvl_surgery.core.export import export
from qvl_surgery.core.weights import STAND_INS, RandomWeights

ROOT = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]


def run_cli(*args, cwd=None):
    """Run the installed console script in a child process; returns CompletedProcess (text). For the
    tests about the process itself (signals, the console script, a real exit status, environment):
    everything else calls ``cli`` (the same main, in this process, without ~0.5 s of start-up)."""
    exe = Path(sys.executable).with_name("qvl-surgery")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def cli(*args) -> subprocess.CompletedProcess:
    """``qvl-surgery ARGS`` in this process (``qvl_surgery.app.cli.main``): stdout and stderr captured
    as text, and the log records the console script's ``logging.basicConfig`` would print on stderr
    (pytest's own handlers on the root logger make that call a no-op here); returns what ``run_cli``
    returns. Usable from fixtures of any scope (no capsys)."""
    from qvl_surgery.app.cli import main
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG if {"-v", "--verbose"} & set(argv) else logging.WARNING)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, handler.level))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(["qvl-surgery", *argv], rc, out.getvalue(), err.getvalue())


def import_client(module: str):
    """A client the tests run this toolkit's files through (pyproject.toml's 'clients' extra).
    Missing is a failure, not a skip: CI runs scripts/test, whose set-up installs the extra, so a
    skip would only hide that the client never ran."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"client {module} is not installed ({e}); scripts/setup installs it "
                    "(pip install -e '.[clients]')", pytrace=False)


def ort_run(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def check_written(path):
    """Every file written must pass the checker by path and run in onnxruntime."""
    onnx.checker.check_model(str(path))
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s


def tiny_pixels(size, seed=0):
    gh, gw = size[0] // 14, size[1] // 14
    return np.random.default_rng(seed).standard_normal((gh * gw, 1176)).astype(np.float32)


def hf_vision_model(cfg, state_dict):
    import torch
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    hc = Qwen2_5_VLVisionConfig(**cfg.to_dict())
    torch.manual_seed(0)
    m = Qwen2_5_VisionTransformerPretrainedModel(hc).eval()
    m.load_state_dict(state_dict)
    return m


def hf_forward(model, pixels, size):
    import torch
    gh, gw = size[0] // 14, size[1] // 14
    with torch.no_grad():
        return model(torch.from_numpy(pixels), torch.tensor([[1, gh, gw]])).numpy()


@pytest.fixture
def big_dir(tmp_path):
    """A test's own folder for multi-GB files, deleted as soon as the test ends."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_448(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny448")
    export(RandomWeights(TINY, seed=0), d / "model.onnx", (448, 448), progress=False)
    return d / "model.onnx"


@pytest.fixture(scope="session")
def tiny_uneven(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny252")
    export(RandomWeights(TINY, seed=1), d / "model.onnx", (252, 364), progress=False)
    return d / "model.onnx"


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    """The two stand-ins of a trained encoder (STAND_INS: tiny, seed 0, 448x448), by kind: 'outlier'
    (massive residual channels from block 1 on) and 'overflow' (the last block past fp16's range)."""
    d = tmp_path_factory.mktemp("stand_ins")
    out = {}
    for kind in ("outlier", "overflow"):
        out[kind] = d / f"{kind}.onnx"
        export(STAND_INS[kind](TINY, 0), out[kind], (448, 448), progress=False)
    return out


@pytest.fixture(scope="session")
def windowed(request, tmp_path_factory):
    """The windowed rewrite (``qvl-surgery attention``) of tiny_448 ('random') and of each stand-in,
    by kind; each made on first use."""
    d = tmp_path_factory.mktemp("windowed")

    class Windowed(dict):
        def __missing__(self, kind):
            src = request.getfixturevalue("tiny_448") if kind == "random" else \
                request.getfixturevalue("stand_ins")[kind]
            out = d / f"{kind}_win.onnx"
            r = cli("attention", src, "-o", out, "-q")
            assert r.returncode == 0, r.stderr
            self[kind] = out
            return out
    return Windowed()


def peak_rss_mb_of(code: str) -> tuple[float, str]:
    """Run python code in a fresh child; returns the child's own peak RSS (MB) and its stdout.

    VmHWM of the child's own address space, not ru_maxrss: Linux carries the forking parent's RSS
    into the child's ru_maxrss (the pytest process, with torch loaded, is ~500 MB)."""
    code += ("\nprint('PEAK_KB', next(int(l.split()[1]) for l in open('/proc/self/status') "
             "if l.startswith('VmHWM')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    return int(lines[-1].split()[1]) / 1024, "\n".join(lines[:-1])


def assert_one_line_error(r, *needles):
    """Bad input: exit 2, one line on stderr naming the problem, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err
