"""Issue 23: every subcommand misused the ways a new user misuses it. Each refusal is one line and
exit 2 (130 / 143 for SIGINT / SIGTERM), the inputs' bytes are unchanged, and nothing is left at
the output or beside it (no staging, no folder, no half-written file). In this process
(``qvl_surgery.app.cli.main``): the signals are real (SIGTERM is sent to this process while the command
publishes; SIGINT is Python's KeyboardInterrupt raised at the same point)."""
import hashlib
import os
import signal
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import TINY, cli
from passes.split import split
from qvl_surgery.core.export import export
from qvl_surgery.core.modelfile import load_model
from qvl_surgery.core.weights import RandomWeights

SIZE = (112, 168)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """The user's folder: a model, its split, a folder of their own, bad inputs."""
    h = tmp_path_factory.mktemp("home")
    export(RandomWeights(TINY, seed=0), h / "model.onnx", SIZE, progress=False)
    split(load_model(h / "model.onnx"), h / "parts", parts=2)
    (h / "user").mkdir()
    (h / "user" / "notes.txt").write_text("the user's own file")
    (h / "user" / "garbage.onnx").write_bytes(b"the user's own bytes")
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])), h / "user" / "plain.onnx")
    (h / "garbage.onnx").write_bytes(os.urandom(512))
    rows = SIZE[0] // 14 * SIZE[1] // 14
    np.savez(h / "rows.npz", pixel_values=np.zeros((rows + 4, 1176), np.float32))
    np.savez(h / "nan.npz", pixel_values=np.full((rows, 1176), np.nan, np.float32))
    np.savez(h / "int.npz", pixel_values=np.zeros((rows, 1176), np.int64))
    return h


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (hidden ones too) with its bytes' hash: what must not change."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(home, args, code=2, needle=None) -> str:
    before = snapshot(home)
    r = cli(*args)
    err = r.stderr.strip()
    assert r.returncode == code, (args, r.returncode, r.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, (args, err)
    if needle:
        assert needle in err, (args, err)
    assert snapshot(home) == before, f"{args}: the user's folder changed"
    return err


# subcommand -> how to call it with (home, the output it writes); None: the subcommand writes nothing
MODEL_PASSES = {"fp16": [], "attention": ["--mode", "mha"], "simplify": [], "quantize": [], "smooth": [],
                "rotate": []}


def calls(h: Path) -> dict:
    m, parts = h / "model.onnx", h / "parts"
    c = {name: (lambda src, out, extra=extra, name=name: [name, src, "-o", out, "-q", *extra])
         for name, extra in MODEL_PASSES.items()}
    c.update({
        "split": lambda src, out: ["split", src, "--parts", "2", "-o", out, "-q"],
        "merge": lambda src, out: ["merge", src, "-o", out, "-q"],
        "sensitivity": lambda src, out: ["sensitivity", src, "-o", out, "-q"],
        "toolchains": lambda src, out: ["toolchains", src, "--keep-block", "0", "-o", out, "-q"],
        "run": lambda src, out: ["run", src, "--passes", "fp16", "-o", out, "-q"],
        "compare": lambda src, out: ["compare", m, src, "--json", out],
        "inspect": lambda src, out: ["inspect", src],
        "export": lambda src, out: ["export", src, "-o", out, "-q"],
        "package": lambda src, out: ["package", src, "-o", out, "-q"],
    })
    return c


SOURCE = {"merge": "parts", "export": None, "package": None}            # what each takes (default the model)
FOLDER_OUT = {"split", "sensitivity", "toolchains", "run", "package"}   # writes a folder
OUT_NAME = {"compare": "report.json"}


def source_of(h, cmd):
    s = SOURCE.get(cmd, "model.onnx")
    return h / s if s else h / "user"    # export / package take a checkpoint folder: the user's is not one


def out_of(h, cmd):
    return h / ("out" if cmd in FOLDER_OUT else OUT_NAME.get(cmd, "out.onnx"))


ALL = ["export", "inspect", "split", "merge", "fp16", "attention", "simplify", "quantize", "smooth", "rotate",
       "compare", "sensitivity", "toolchains", "run", "package"]


@pytest.mark.parametrize("cmd", ALL)
def test_missing_input(cmd, home):
    refused(home, calls(home)[cmd](home / "no_such_thing.onnx", out_of(home, cmd)))


WRONG_KIND = {"merge": "model.onnx", "export": "model.onnx", "package": "model.onnx", "inspect": "garbage.onnx",
              "compare": "garbage.onnx", "sensitivity": "parts", "toolchains": "parts", "run": "garbage.onnx"}


@pytest.mark.parametrize("cmd", ALL)
def test_wrong_kind_of_model(cmd, home):
    refused(home, calls(home)[cmd](home / WRONG_KIND.get(cmd, "parts"), out_of(home, cmd)))


BAD_OPTION = {"export": ["--random-init", "tiny", "--image-size", "100x100"], "inspect": ["--calibrate", "random:2"],
              "split": ["--parts", "0"], "merge": ["--single-file", "--gen-script", "--bogus"],
              "fp16": ["--dtype", "float8"], "attention": ["--mode", "bogus"], "simplify": ["--method", "bogus"],
              "quantize": ["--budget", "nan", "--activations", "int8"], "smooth": ["--alpha", "2"],
              "rotate": ["--seed", "-1"], "compare": ["--min-cosine", "2"],
              "sensitivity": ["--weights", "int4", "--activations", "int8"],
              "toolchains": ["--rknn-residual-int8"], "run": ["--recipe", "nope.json"],
              "package": ["--fp16"]}


@pytest.mark.parametrize("cmd", ALL)
def test_bad_option_value(cmd, home):
    src = home / "model.onnx" if cmd != "merge" else home / "parts"
    args = calls(home)[cmd](src, out_of(home, cmd)) if cmd not in ("export", "package") else \
        [cmd] + ([] if cmd == "export" else [home / "user"]) + ["-o", out_of(home, cmd)]
    refused(home, args + BAD_OPTION[cmd])


CALIBRATED = {"inspect": ["--activations", "--calibrate"], "fp16": ["--calibrate"],
              "quantize": ["--activations", "int8", "--calibrate"], "smooth": ["--calibrate"],
              "sensitivity": ["--inputs"], "toolchains": ["--dataset"], "compare": ["--inputs"]}


@pytest.mark.parametrize("bad", ["rows.npz", "nan.npz", "int.npz", "random:0", "user"])
@pytest.mark.parametrize("cmd", sorted(CALIBRATED))
def test_bad_calibration_set(cmd, bad, home):
    if bad == "random:0" and cmd in ("toolchains", "compare", "fp16"):
        pytest.skip("random inputs are refused there anyway (tested below)")
    value = bad if bad.startswith("random") else str(home / bad)
    flag = CALIBRATED[cmd][-1]
    err = refused(home, calls(home)[cmd](home / "model.onnx", out_of(home, cmd)) + CALIBRATED[cmd] + [value])
    assert flag in err   # the option the user typed is named


def test_random_is_refused_where_files_are_needed(home):
    for args in (["fp16", home / "model.onnx", "-o", home / "o.onnx", "--calibrate", "random:4"],
                 ["toolchains", home / "model.onnx", "--keep-block", "0", "--dataset", "random:4", "-o", home / "o"]):
        refused(home, args, needle="random")


OVER_INPUT = {"compare": "model.onnx", "merge": "parts/part0.onnx"}


@pytest.mark.parametrize("cmd", [c for c in ALL if c not in ("inspect", "export", "package")])
def test_output_over_an_input(cmd, home):
    c = calls(home)[cmd]
    src = source_of(home, cmd)
    targets = [home / OVER_INPUT.get(cmd, "model.onnx")]
    if cmd in FOLDER_OUT:
        targets = [home / "model.onnx", home / "model.onnx.data", home, home / "model.onnx" / "sub"]
    elif cmd != "compare":
        targets.append(home / "model.onnx.data")
    for t in targets:
        refused(home, c(src, t) + (["--force"] if cmd != "compare" else []))


@pytest.mark.parametrize("cmd", sorted(FOLDER_OUT - {"package"}))
def test_force_never_replaces_a_users_folder(cmd, home):
    err = refused(home, calls(home)[cmd](source_of(home, cmd), home / "user") + ["--force"])
    assert "did not write" in err


@pytest.mark.parametrize("cmd", [c for c in ALL if c not in FOLDER_OUT | {"inspect", "compare", "export"}])
def test_a_folder_where_a_model_file_goes(cmd, home):
    refused(home, calls(home)[cmd](source_of(home, cmd), home / "user") + ["--force"])


MODEL_FILE_OUT = [c for c in ALL if c not in FOLDER_OUT | {"inspect", "compare", "export"}]


@pytest.mark.parametrize("cmd", MODEL_FILE_OUT)
def test_force_never_replaces_a_users_model_file(cmd, home):
    """A file the toolkit did not write (no qvl_surgery.* metadata: here the user's garbage.onnx and a
    plain ONNX model of their own) is not replaced by --force."""
    for name in ("garbage.onnx", "plain.onnx"):
        err = refused(home, calls(home)[cmd](source_of(home, cmd), home / "user" / name) + ["--force"])
        assert "not written by qvl-surgery" in err


def test_inspect_of_a_split_folder_names_a_part(home):
    err = refused(home, ["inspect", home / "parts"])
    assert "part0.onnx" in err and "merge" in err


SIGNALLED = ["fp16", "attention", "quantize", "smooth", "rotate", "split", "merge", "simplify", "sensitivity",
             "toolchains", "run", "compare"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("cmd", SIGNALLED)
def test_signal_while_publishing_leaves_nothing(cmd, sig, home, monkeypatch):
    """The signal arrives as the command publishes its staged output (its first rename)."""
    hit = []

    def interrupt(real):
        def wrapped(src, dst, *a, **kw):
            if not hit:
                hit.append(str(dst))
                if sig == "SIGINT":
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)   # the handler raises before this returns
                raise AssertionError("SIGTERM did not interrupt")
            return real(src, dst, *a, **kw)
        return wrapped
    monkeypatch.setattr(os, "replace", interrupt(os.replace))
    monkeypatch.setattr(os, "rename", interrupt(os.rename))
    args = calls(home)[cmd](source_of(home, cmd), out_of(home, cmd))
    handler = signal.getsignal(signal.SIGTERM)
    err = refused(home, args, code=130 if sig == "SIGINT" else 143)
    assert hit and "no output was left behind" in err
    assert signal.getsignal(signal.SIGTERM) == handler   # main() put the caller's handler back


def test_stale_staging_of_a_killed_run_is_removed(home, tmp_path):
    """A process killed outright (SIGKILL) leaves its staging; the next write beside it removes it."""
    dead = 2 ** 22 + 12345   # above pid_max's default: no such process
    stale = [tmp_path / f".o.onnx.tmp-{dead}-abc", tmp_path / f".out.tmp-{dead}-x", tmp_path / f".out.old-{dead}"]
    for s in stale:
        s.mkdir()
        (s / "model.fp32.onnx.data").write_bytes(b"\0" * 1024)
    assert cli("fp16", home / "model.onnx", "-o", tmp_path / "o.onnx", "-q").returncode == 0
    assert cli("toolchains", home / "model.onnx", "--keep-block", "0", "-o", tmp_path / "out",
               "-q").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "o.onnx.data", "out"]


def test_force_replaces_what_the_toolkit_wrote(home, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        r = cli("toolchains", home / "model.onnx", "--keep-block", "0", "-o", out, "-q", "--force")
        assert r.returncode == 0, r.stderr
    assert (out / ".qvl-surgery").is_file() and (out / "keep.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ the defects of issue 23, one each

def test_static_budget_on_a_model_run_in_segments(home, tmp_path, monkeypatch):
    """The 3b (> 256 MB of weights) runs in segments; a static-activation budget failed there with
    'Type (tensor(uint8)) of output arg ...': the tiny model cut into 20 kB segments reproduces it."""
    import qvl_surgery.core.segments as segments
    monkeypatch.setattr(segments, "DEFAULT_SEGMENT_BYTES", 20_000)
    r = cli("quantize", home / "model.onnx", "-o", tmp_path / "q.onnx", "--activations", "int8", "--format",
            "onnxruntime", "--calibrate", "random:2", "--budget", "0.99", "-q")
    assert r.returncode == 0, r.stderr
    assert len(segments.plan_segments(load_model(home / "model.onnx"), [])) > 5


@pytest.mark.parametrize("text, want", [
    ("smooth,quantize:activations=int8,format=onnxruntime", ["smooth", "quantize:activations=int8+format=onnxruntime"]),
    ("quantize:activations=int8,calibrate=random:8", ["quantize:activations=int8+calibrate=random:8"]),
    ("fp16:calibrate=a.png,b.png,split:parts=3", ["fp16:calibrate=a.png,b.png", "split:parts=3"]),
    ("attention,fp16:keep_silu_fp32,split:parts=3", ["attention", "fp16:keep_silu_fp32", "split:parts=3"]),
])
def test_passes_text_in_the_readme_forms(text, want):
    from qvl_surgery.app.pipeline import parse_passes
    got = [p.text() for p in parse_passes(text)]
    assert got == want
    assert [p.text() for p in parse_passes(",".join(got))] == want   # the text a pass records parses back


def test_compare_refuses_models_of_two_kinds_either_way(home, tmp_path):
    from qvl_surgery.core.dynamic import export_dynamic
    dyn = tmp_path / "dyn.onnx"
    export_dynamic(RandomWeights(TINY, seed=0), dyn, progress=False)
    for a, b in ((dyn, home / "model.onnx"), (home / "model.onnx", dyn)):
        refused(home, ["compare", a, b])


def test_emulating_a_quantized_fp16_file_is_one_line(home, tmp_path):
    q, h = tmp_path / "q.onnx", tmp_path / "h.onnx"
    assert cli("quantize", home / "model.onnx", "-o", q, "--activations", "int8", "--calibrate", "random:2",
               "-q").returncode == 0
    assert cli("fp16", q, "-o", h, "-q").returncode == 0
    refused(home, ["compare", home / "model.onnx", h, "--emulate-fp16"], needle="emulation cannot run")


def test_per_block_on_a_rotated_model_says_why_blocks_differ(home, tmp_path):
    r = tmp_path / "r.onnx"
    assert cli("rotate", home / "model.onnx", "-o", r, "-q").returncode == 0
    out = cli("compare", home / "model.onnx", r, "--per-block")
    assert out.returncode == 0 and "rotated basis" in out.stdout


def test_small_image_for_a_dynamic_model(tmp_path):
    from PIL import Image
    from qvl_surgery.core.dynamic import export_dynamic
    dyn = tmp_path / "dyn.onnx"
    export_dynamic(RandomWeights(TINY, seed=0), dyn, progress=False)
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "small.png")
    refused(tmp_path, ["quantize", dyn, "-o", tmp_path / "q.onnx", "--activations", "int8", "--calibrate",
                               tmp_path / "small.png"], needle="at least 28")


@pytest.mark.parametrize("args, needle", [
    (["quantize", "{m}", "-o", "{o}.onnx", "--keep-node", ""], "empty pattern"),
    (["quantize", "{m}", "-o", "{o}.onnx", "--keep-node", "*"], "nothing would be quantized"),
    (["quantize", "{m}", "-o", "{o}.onnx", "--calibrate-method", "minmax"], "--calibrate-method"),
    (["quantize", "{m}", "-o", "{o}.onnx", "--calibrate", "random:2"], "weight-only"),
    (["smooth", "{h}/parts/part0.onnx", "-o", "{o}.onnx"], "part 0 of a split"),
    (["compare", "{m}", "{m}", "--atol", "-1"], "--atol -1"),
    (["compare", "{m}", "{m}", "--min-centered-cosine", "nan"], "--min-centered-cosine nan"),
    (["compare", "{m}", "{m}", "--json", "{h}/no_dir/x.json"], "does not exist"),
    (["sensitivity", "{m}", "-o", "{h}/model.onnx.data/x", "-q"], None),
    (["toolchains", "{m}", "--keep-block", "0", "--calibrate", "random:2", "-o", "{o}"], "apply to --budget"),
    (["run", "{m}", "-o", ".", "--passes", "fp16", "--force"], "current folder"),
    (["run", "{m}", "-o", "{o}", "--recipe", "{h}/recipe_bad_key.json"], "unknown recipe key"),
])
def test_each_misuse_is_refused_before_work(args, needle, home, tmp_path, monkeypatch):
    (home / "recipe_bad_key.json").write_text('{"passes": [{"pass": "fp16"}], "sourc": {}}')
    monkeypatch.chdir(tmp_path)
    args = [a.format(m=home / "model.onnx", h=home, o=tmp_path / "out") for a in args]
    refused(home, args, needle=needle)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_in_a_real_process_removes_staging(home, tmp_path):
    """The console script, killed with SIGTERM while run stages its folder: 143, one line, nothing left."""
    import subprocess
    import sys
    exe = Path(sys.executable).with_name("qvl-surgery")
    p = subprocess.Popen([str(exe), "run", "--random-init", "tiny", "--passes", "fp16", "-o", str(tmp_path / "r"),
                          "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(x.name.startswith(".r.tmp-") for x in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert p.returncode == 143 and "no output was left behind" in err, (p.returncode, err)
    assert list(tmp_path.iterdir()) == []
