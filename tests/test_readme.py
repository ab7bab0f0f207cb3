"""Every command line in README.md and every example in a subcommand's --help runs as written, on
the tiny config: ``--random-init 3b`` becomes ``tiny``, a checkpoint path a tiny checkpoint, the
files the examples name (out/model.onnx, a.jpg, calib.npz, recipe.json, ...) are made first, and
``--force`` is added where an earlier example wrote the same output. Only ``package`` is left out
(it builds onnxruntime-genai's builder virtualenv: tests/test_package.py runs it)."""
import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, TINY
from qvl_surgery.app.cli import EXAMPLES, build_parser, main
from qvl_surgery.core.export import export
from qvl_surgery.core.weights import RandomWeights

CHECKPOINTS = ("~/Qwen2.5-VL-3B-Instruct", "path/to/Qwen2.5-VL-3B-Instruct")
# the 3b's 32 blocks in the examples, the tiny config's 4 here
TINY_SUBSTITUTES = {"--random-init 3b": "--random-init tiny", "--at 16,": "--at 2,", "blocks.31": "blocks.3"}


def _command(line: str) -> str:
    """A command line without its trailing comment."""
    return line.split("  #")[0].split(" # ")[0].strip()


def _blocks(text: str, lang: str = "") -> list[str]:
    """The fenced blocks of ``lang`` ("" for those without one)."""
    out, current, open_lang = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, open_lang = [], line[3:].strip()
            else:
                if open_lang == lang:
                    out.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return out


def readme_commands() -> list[str]:
    out = []
    for block in _blocks((ROOT / "README.md").read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("qvl-surgery "):
                out.append(_command(line))
    return out


def help_examples() -> list[str]:
    from passes import PASSES
    texts = list(EXAMPLES.values()) + [cls.example for cls in PASSES.values()]
    return [_command(line) for t in texts for line in t.splitlines() if line.strip().startswith("qvl-surgery ")]


def test_the_readme_has_its_commands():
    cmds = readme_commands()
    assert len(cmds) > 30
    subcommands = {shlex.split(c)[1] for c in cmds}
    assert {"run", "export", "inspect", "split", "merge", "fp16", "quantize", "smooth", "rotate", "sensitivity",
            "toolchains", "compare", "attention", "simplify", "package"} <= subcommands


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    from PIL import Image
    from qvl_surgery.app.testing import make_tiny_checkpoint
    d = tmp_path_factory.mktemp("readme")
    (d / "out").mkdir()
    export(RandomWeights(TINY, seed=0), d / "out" / "model.onnx", (448, 448), progress=False)
    export(RandomWeights(TINY, seed=0), d / "model.onnx", (448, 448), progress=False)
    make_tiny_checkpoint(d / "ckpt")
    rng = np.random.default_rng(0)
    for i, name in enumerate(("a.jpg", "b.jpg", "cat.jpg")):
        Image.fromarray(rng.integers(0, 256, (300 + 40 * i, 400, 3), dtype=np.uint8)).save(d / name)
    np.savez(d / "calib.npz", pixel_values=rng.standard_normal((1024, 1176)).astype(np.float32))
    recipe = json.loads(_blocks((ROOT / "README.md").read_text(), "json")[0])
    recipe["source"] = {"random_init": "tiny", "seed": 0}
    (d / "recipe.json").write_text(json.dumps(recipe))
    return d


def _as_tiny(line: str, sandbox: Path) -> list[str]:
    for c in CHECKPOINTS:
        line = line.replace(c, str(sandbox / "ckpt"))
    for a, b in TINY_SUBSTITUTES.items():
        line = line.replace(a, b)
    args = shlex.split(line)[1:]
    parser = build_parser()
    a = parser.parse_args(args)   # SystemExit here: the line does not parse
    if hasattr(a, "force") and not a.force and not getattr(a, "gen_script", False):
        args.append("--force")
    if hasattr(a, "quiet"):
        args.append("-q")
    return args


def _run_all(lines: list[str], sandbox: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(sandbox)
    todo = [line for line in lines if shlex.split(line)[1] != "package"]
    failed: list[tuple[str, SimpleNamespace]] = []
    for _ in range(2):   # an example may read what a later one writes (sensitivity reads attention's output)
        failed = []
        for line in todo:
            rc = main(_as_tiny(line, sandbox))
            out, err = capsys.readouterr()
            if rc != 0:
                failed.append((line, SimpleNamespace(rc=rc, err=err.strip(), out=out[-400:])))
        todo = [line for line, _ in failed]
    assert not failed, "\n".join(f"{line}\n  -> exit {r.rc}: {r.err or r.out}" for line, r in failed)


@pytest.mark.slow
def test_every_readme_command_runs(sandbox, capsys, monkeypatch):
    _run_all(readme_commands(), sandbox, capsys, monkeypatch)


@pytest.mark.slow
def test_every_help_example_runs(sandbox, capsys, monkeypatch):
    _run_all(help_examples(), sandbox, capsys, monkeypatch)
