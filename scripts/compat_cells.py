"""One cell of scripts/compat's matrix: the job a client's worker runs (a copy of the file, its parts
and inputs), the run itself under a timeout and a memory watchdog, and what the parent makes of it: the
figures against onnxruntime, or the client's own error text."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from compat_catalog import Client
from compat_worker import np_load
from harness import results, snapshot, supervise

WORKER = Path(__file__).resolve().with_name("compat_worker.py")


def parts_of(path: Path) -> list[dict]:
    """Parts in chain order with their inputs (name, dtype), outputs and output shapes (-1: not fixed),
    read by the toolkit's one signature reader."""
    from qvl_surgery.core.signature import signature

    def io(p: Path) -> dict:
        sig = signature(p)
        def dims(t):
            return [d if isinstance(d, int) else -1 for d in t.shape]
        return {"file": p.name, "inputs": [{"name": t.name, "shape": dims(t), "dtype": t.dtype.name} for t in sig.inputs],
                "outputs": sig.output_names, "output_shapes": [dims(t) for t in sig.outputs]}
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text())
        return [io(path / p["path"]) for p in manifest["parts"]]
    return [io(path)]


def copy_input(path: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    if path.is_dir():
        shutil.copytree(path, dst)
        return dst
    dst.mkdir(parents=True)
    for p in path.parent.glob(path.name + "*"):
        shutil.copy2(p, dst / p.name)
    return dst / path.name


def feeds_for(path: Path, size: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the first part: pixel_values from a fixed seed; image_grid_thw from the size."""
    h, w = (int(v) for v in size.split("x"))
    gh, gw = h // 14, w // 14
    rng = np.random.default_rng(seed)
    feeds = {"pixel_values": rng.standard_normal((gh * gw, 1176)).astype(np.float32)}
    names = [i["name"] for i in parts_of(path)[0]["inputs"]]
    if "image_grid_thw" in names:
        feeds["image_grid_thw"] = np.array([[1, gh, gw]], np.int64)
    return {n: feeds[n] for n in names}


def run_onnxruntime(path: Path, feeds: dict) -> dict[str, np.ndarray]:
    from qvl_surgery.core.runners import run_chain, run_model
    return run_chain(path, feeds) if path.is_dir() else run_model(path, feeds)


def metrics(got: np.ndarray, ref: np.ndarray) -> dict:
    from qvl_surgery.core.metrics import cosine, max_abs, relative_l2
    return {"max_abs": max_abs(ref, got), "cosine": cosine(got, ref), "rel_l2": relative_l2(ref, got),
            "finite": bool(np.isfinite(got).all())}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


ERROR_LINES = {"rknn": r"^E\s", "mnn": r"Not Support|[Ee]rror|Failed", "openvino": r"$^",
               "onnx2tf": r"ERROR|Error:"}


def error_text(result: dict | None, log_path: Path, client: str) -> str:
    """The client's own words: its error lines from the log (rknn logs 'E ...', MNN prints its reasons),
    then the exception the worker caught."""
    text = _ANSI.sub("", log_path.read_text(errors="replace")) if log_path.exists() else ""
    text = "\n".join(line for line in text.splitlines() if not line.startswith(results.MARK))   # the worker's own
    # MNN prefixes its lines with a clock and a source line number: "[23:48:57] :220: "
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] :\d+: ", "", l.strip()) for l in re.split(r"[\r\n]+", text) if l.strip()]
    picked = [l.replace("Traceback (most recent call last):", "").strip() for l in lines
              if re.search(ERROR_LINES.get(client, r"$^"), l) and "rknn-toolkit2 version" not in l]
    exc_lines = [l.strip() for l in (result or {}).get("error", "").splitlines() if l.strip()]
    # a traceback inside the message (rknn re-raises with one): its last line says what went wrong
    exc = " ".join(exc_lines)
    if exc_lines and re.match(r"^\w+(Error|Exception)\b", exc_lines[-1]) and len(exc_lines) > 1:
        frames = re.findall(r"line \d+, in (\S+)", exc)
        exc = exc_lines[-1] + (f" (in {frames[-1]})" if frames else "")
    picked = [l for l in picked if not re.fullmatch(r"E \w+:", l)]
    if client == "rknn" and picked:   # its E lines say it; the exception repeats them with a traceback
        exc = ""
    parts = list(dict.fromkeys(picked[-3:] + ([exc] if exc else [])))
    return (" | ".join(parts) or " | ".join(lines[-3:]) or "no output")[:700]


MIN_FREE_GB = 1.5


def run_cell(client: Client, route: str, path: Path, feeds: dict, job_dir: Path, timeout: int) -> dict:
    if job_dir.exists():
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True)
    before = snapshot(path)
    copy = copy_input(path, job_dir / "input")
    copy_before = snapshot(copy)
    parts = parts_of(path)
    for p in parts:
        p["path"] = str((copy if copy.is_dir() else copy.parent) / p["file"])
    np.savez(job_dir / "feeds.npz", **feeds)
    job = {"client": client.name, "route": route, "parts": parts, "feeds": str(job_dir / "feeds.npz"),
           "out": str(job_dir / "out.npz"), "work": str(job_dir / "work")}
    (job_dir / "job.json").write_text(json.dumps(job, indent=1))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="2")
    log_path = job_dir / "log.txt"
    t0 = time.time()
    rc, stopped = supervise([str(client.venv.interpreter), str(WORKER), str(job_dir / "job.json")], log_path,
                            timeout=timeout, min_free_gb=MIN_FREE_GB, who="scripts/compat", env=env, cwd=job_dir)
    cell: dict = {"seconds": round(time.time() - t0, 1)}
    result = results.parse(log_path.read_text(errors="replace")) if log_path.exists() else None
    if result is not None:   # kept beside job.json and log.txt
        (job_dir / "result.json").write_text(json.dumps(result))
    cell["versions"] = (result or {}).get("versions") or {}
    if snapshot(path) != before:
        cell["input_modified"] = True
    if snapshot(copy) != copy_before:
        cell["wrote_into_its_input"] = True
    if rc is None:
        cell["error"] = stopped
    elif result is None or not result.get("ok"):
        cell["error"] = error_text(result, log_path, client.name)
        if rc and result is None:
            cell["error"] = f"worker exited {rc}: " + cell["error"]
    else:
        cell["outputs"] = np_load(job_dir / "out.npz")
    # keep job.json, log.txt and result.json; the copies and converted models can be GBs (3b)
    for p in ("input", "work"):
        shutil.rmtree(job_dir / p, ignore_errors=True)
    return cell


# a client this far below onnxruntime's error on a quantized file ran part of it in float: OpenVINO runs
# DynamicQuantizeMatMul with float activations (tiny w8a8: 0.59x, bitwise its w8 weight-only output)
IGNORED_QUANT = 0.7


def fmt_cell(cell: dict, floor: float, ort_rel: float | None, *, quantized: bool = False,
             reference: bool = False) -> str:
    """A figure, or the client's error. WRONG: relative L2 error above 10x onnxruntime's on the same file
    and above the client's own arithmetic floor. On a quantized file onnxruntime's error is the quantization
    error: the cell adds its relative L2 (``reference``: onnxruntime's own cell) or the client's as a multiple
    of onnxruntime's, and notes a client far below it (< IGNORED_QUANT x, where onnxruntime's is above the
    client's floor): it did not run the quantized arithmetic, e.g. dequantized weights or Q/DQ pairs run
    in float."""
    if "error" in cell:
        err = re.sub(r"\[\d\d:\d\d:\d\d\] :\d+: ", "", cell["error"])
        err = err.replace("|", "\\|").replace("\n", " ")
        return f"**fails**: `{err}`"
    m = cell["metrics"]
    rel = m.get("rel_l2", 0.0)
    text = f"{m['max_abs']:.1e} / {m['cosine']:.6f}"
    if not m["finite"] or rel > max(10 * (ort_rel or 0.0), floor):
        text = f"**WRONG** {text}"
    notes = []
    if quantized and reference:
        notes.append(f"rel {rel:.1e}")
    elif quantized and ort_rel and m["finite"]:
        if rel < IGNORED_QUANT * ort_rel and ort_rel > floor:
            notes.append(f"**{rel / ort_rel:.2f}x: below the file's quantization error**, ran part of it in float")
        else:
            ratio = rel / ort_rel
            notes.append(f"{ratio:.2f}x" if ratio < 100 else f"{ratio:.0e}x")
    if cell.get("wrote_into_its_input"):
        notes.append("rewrote its input file")
    if cell.get("input_modified"):
        notes.append("**modified the original**")
    return text + (f" ({'; '.join(notes)})" if notes else "")

