"""Compatibility matrix: every kind of file this toolkit writes, through every client people feed it to.

    scripts/compat                          # tiny preset, 448x448 and 308x196, every client -> COMPAT.md
    scripts/compat --preset 3b --sizes 448x448 --clients openvino,mnn --kinds fp32,windowed
    scripts/compat --setup-only             # only build the client virtualenvs under .compat/

Each client lives in its own virtualenv under ``.compat/<client>/`` (their pins clash: rknn-toolkit2
wants numpy<=1.26.4 and onnx<=1.18, onnx2tf pins tensorflow 2.19) and runs ``scripts/compat_worker.py
JOB.json`` (the standard library, numpy and the client's own packages, nothing of the toolkit). The
catalogs are compat_catalog.py, a cell's run and reading compat_cells.py, COMPAT.md compat_markdown.py.
For each (file kind, client route) the parent:

1. copies the file (or the split folder) into the job folder: no client may modify an input, and the
   original's sha256 and mtime are checked after the run (a client that writes into its copy is noted);
2. runs the worker in the client's venv with a timeout, one at a time (the machine has 2 cores);
3. compares the client's output with onnxruntime on the fp32 export (same input): max abs, cosine.

A cell is a figure, or the client's own error text with its version. A figure is marked WRONG when
its relative L2 error exceeds 10x onnxruntime's on the same file and the client's own arithmetic floor:
that is a client silently computing something else. On a quantized file onnxruntime's error is the
quantization error: a client near 1x of it runs the same quantized arithmetic, one well below it (< 0.7x,
noted) ran part of it in float.

Rows of COMPAT.md that this run did not measure are kept as they were (the results files under .compat/
belong to one checkout; COMPAT.md is the record).

File kinds are data (``KINDS``): a kind names the toolkit commands that make it from other kinds and
the CLI options it needs; a kind whose option the CLI does not have yet is listed as "not yet
written by the toolkit", and appears once the option lands.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from compat_catalog import CLIENTS, COMPAT, KINDS, ROOT, Client, Kind
from compat_cells import feeds_for, fmt_cell, metrics, run_cell, run_onnxruntime
from compat_markdown import write_markdown
from compat_worker import np_load, worker
from harness.venv import make_venv


def log(msg: str) -> None:
    print(msg, flush=True)


def venv_python(client: Client) -> Path:
    return client.venv.interpreter


def setup_client(client: Client) -> None:
    """Create or update .compat/<client>; a stamp of the pip arguments skips pip when nothing changed."""
    make_venv(client.venv, client.name, log)


def cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("qvl-surgery")
    return subprocess.run([str(exe), *args], capture_output=True, text=True)


_HELP: dict[str, str] = {}


def has_option(command: str, option: str) -> bool:
    if command not in _HELP:
        _HELP[command] = cli(command, "--help").stdout
    return re.search(rf"(^|\s){re.escape(option)}\b", _HELP[command]) is not None


def model_path(d: Path, kind: Kind) -> Path:
    return d / kind.id if kind.split else d / kind.id / "model.onnx"


def make_files(preset: str, size: str, kinds: list[Kind], reuse: bool) -> tuple[dict[str, Path], dict[str, str]]:
    """Write every kind for one preset and size with the toolkit's CLI (``reuse``: keep files already
    written by an earlier run, e.g. a 3b export)."""
    d = COMPAT / "files" / f"{preset}-{size}"
    if not reuse and d.exists():
        shutil.rmtree(d)
    paths, skipped = {}, {}
    for kind in kinds:
        missing = [f"{c} {o}" for c, o in kind.needs if not has_option(c, o)]
        if missing:
            skipped[kind.id] = f"not yet written by the toolkit (`qvl-surgery {missing[0]}` does not exist yet)"
            continue
        out = model_path(d, kind)
        if out.exists():
            paths[kind.id] = out
            continue
        (d if kind.split else d / kind.id).mkdir(parents=True, exist_ok=True)
        if kind.id == "fp32":
            r = cli("export", "--random-init", preset, "--image-size", size, "-o", str(out), "-q")
        else:
            refs = {m for step in kind.steps for a in step for m in re.findall(r"\{([\w-]+)\}", a)}
            absent = sorted(refs - set(paths) - {"out", "preset", "size"})
            if absent:
                skipped[kind.id] = f"made from {absent[0]}, which was not written"
                continue
            for step in kind.steps:
                args = [a.replace("{out}", str(out)).replace("{preset}", preset).replace("{size}", size) for a in step]
                for k, v in paths.items():
                    args = [a.replace("{" + k + "}", str(v)) for a in args]
                r = cli(*args, "-q")
                if r.returncode:
                    break
        if r.returncode:
            shutil.rmtree(d / kind.id, ignore_errors=True)
            skipped[kind.id] = f"the toolkit failed to write it: {(r.stderr or r.stdout).strip().splitlines()[-1]}"
            continue
        log(f"wrote {out.relative_to(ROOT)}")
        paths[kind.id] = out
    return paths, skipped


def run_matrix(preset: str, sizes: list[str], kinds: list[Kind], clients: list[Client], timeout: int,
               reuse_files: bool = False, only_missing: bool = False, skip: set[tuple[str, str]] = frozenset()) -> dict:
    """``only_missing``: keep cells an earlier run measured; ``skip``: (kind id, client) pairs not to run
    (a client that cannot hold that file, e.g. onnx2tf on the 3b fp32: killed for memory at 24 GB)."""
    results_path = COMPAT / f"results-{preset}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for size in sizes:
        paths, skipped = make_files(preset, size, kinds, reuse_files)
        ref_feeds = feeds_for(paths["fp32"], size)
        ref = run_onnxruntime(paths["fp32"], ref_feeds)
        ref_out = next(iter(ref.values()))
        block = results.setdefault(size, {})
        block["_scale"] = float(np.abs(ref_out).max())
        for kind in kinds:
            row = block.setdefault(kind.id, {})
            row["_label"] = kind.label
            if kind.id in skipped:
                row["_skipped"] = skipped[kind.id]
                continue
            row.pop("_skipped", None)
            path = paths[kind.id]
            feeds = feeds_for(path, size)
            t0 = time.time()
            got = run_onnxruntime(path, feeds)
            row["onnxruntime:cpu"] = {"metrics": metrics(next(iter(got.values())), ref_out),
                                      "seconds": round(time.time() - t0, 1)}
            for client in clients:
                for route in client.routes:
                    key = f"{client.name}:{route}"
                    if only_missing and "metrics" in row.get(key, {}):
                        continue
                    if (kind.id, client.name) in skip:
                        continue
                    log(f"{preset} {size} {kind.id} {key} ...")
                    cell = run_cell(client, route, path, feeds,
                                    COMPAT / "jobs" / f"{preset}-{size}" / kind.id / key.replace(":", "-"), timeout)
                    if "outputs" in cell:
                        out = next(iter(cell.pop("outputs").values()))
                        cell["metrics"] = metrics(out, ref_out) if out.size == ref_out.size else {
                            "max_abs": float("inf"), "cosine": 0.0, "finite": False}
                        if out.size != ref_out.size:
                            cell["error"] = f"output has shape {list(out.shape)}, expected {list(ref_out.shape)}"
                        elif kind.quantized:   # the same file in onnxruntime: how far its arithmetic is from it
                            cell["vs_onnxruntime"] = metrics(out, next(iter(got.values())))
                    row[key] = cell
                    text = fmt_cell(cell, client.floor, row["onnxruntime:cpu"]["metrics"]["rel_l2"],
                                    quantized=kind.quantized)
                    log(f"    {text}  ({cell['seconds']} s)")
                    results_path.write_text(json.dumps(results, indent=1))
    results_path.write_text(json.dumps(results, indent=1))
    return results


def remeasure(preset: str) -> None:
    """Recompute every figure of .compat/results-PRESET.json from the outputs the jobs kept (out.npz) and a
    fresh onnxruntime run of each file: for a change of metric without rerunning the clients."""
    results_path = COMPAT / f"results-{preset}.json"
    results = json.loads(results_path.read_text())
    for size, block in results.items():
        d = COMPAT / "files" / f"{preset}-{size}"
        ref_path = model_path(d, next(k for k in KINDS if k.id == "fp32"))
        ref_out = next(iter(run_onnxruntime(ref_path, feeds_for(ref_path, size)).values()))
        for kid, row in block.items():
            kind = next((k for k in KINDS if k.id == kid), None)
            if kid.startswith("_") or kind is None or "_skipped" in row or not model_path(d, kind).exists():
                continue
            path = model_path(d, kind)
            got = run_onnxruntime(path, feeds_for(path, size))
            row["onnxruntime:cpu"]["metrics"] = metrics(next(iter(got.values())), ref_out)
            for key, cell in row.items():
                out = COMPAT / "jobs" / f"{preset}-{size}" / kid / key.replace(":", "-") / "out.npz"
                if key.startswith("_") or key == "onnxruntime:cpu" or "error" in cell or not out.exists():
                    continue
                cell["metrics"] = metrics(next(iter(np_load(out).values())), ref_out)
                if kind.quantized:
                    cell["vs_onnxruntime"] = metrics(next(iter(np_load(out).values())), next(iter(got.values())))
        log(f"remeasured {preset} {size}")
    results_path.write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "3b", "7b"])
    ap.add_argument("--sizes", default="448x448,308x196")
    ap.add_argument("--clients", default=",".join(CLIENTS), help="comma separated: " + ", ".join(CLIENTS))
    ap.add_argument("--kinds", default=None, help="comma separated kind ids: " + ", ".join(k.id for k in KINDS))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per client run (default 900)")
    ap.add_argument("--reuse-files", action="store_true", help="keep the files an earlier run wrote under .compat/files")
    ap.add_argument("--only-missing", action="store_true", help="keep the cells an earlier run measured")
    ap.add_argument("--skip", default="", help="KIND:CLIENT pairs not to run, comma separated (e.g. fp32:onnx2tf)")
    ap.add_argument("--setup-only", action="store_true", help="only create the client virtualenvs")
    ap.add_argument("--remeasure", action="store_true",
                    help="recompute the figures of --preset from the kept outputs, then rewrite COMPAT.md")
    ap.add_argument("--markdown-only", action="store_true", help="only rewrite COMPAT.md from .compat/results-*.json")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "COMPAT.md")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    if a.remeasure:
        remeasure(a.preset)
    if a.markdown_only or a.remeasure:
        write_markdown(a.output)
        return 0
    clients = [CLIENTS[c] for c in a.clients.split(",") if c]
    for c in clients:
        setup_client(c)
    if a.setup_only:
        return 0
    wanted = set(a.kinds.split(",")) if a.kinds else None
    kinds = [k for k in KINDS if a.preset in k.presets and (wanted is None or k.id in wanted or k.id == "fp32")]
    # kinds a wanted kind is made from
    if wanted is not None:
        need = {k.id for k in kinds}
        for k in list(kinds):
            for s in k.steps:
                for other in KINDS:
                    if "{" + other.id + "}" in " ".join(s) and other.id not in need:
                        need.add(other.id)
        kinds = [k for k in KINDS if k.id in need]
    skip = {tuple(p.split(":", 1)) for p in a.skip.split(",") if p}
    run_matrix(a.preset, a.sizes.split(","), kinds, clients, a.timeout, a.reuse_files, a.only_missing, skip)
    write_markdown(a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
