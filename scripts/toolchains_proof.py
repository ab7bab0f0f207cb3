"""Proof that the toolkit's toolchain configs help: NNCF and rknn-toolkit2 quantize the tiny stand-ins
(the plain export and the smoothed file) with and without the configs `qvl-surgery toolchains` writes
from one `--budget` measurement; the token-centered cosine of each result against onnxruntime fp32
goes into COMPAT.md (its "toolchain configs" section, between markers; the rest of the file is kept).

    scripts/toolchains-proof                  # about 15 min on 2 cores; run it alone
    scripts/toolchains-proof --only targets   # the "targets" table alone (about 4 min)
    scripts/toolchains-proof --3b             # the targets row of the 3b outlier stand-in, smoothed (once;
                                              # about an hour, stopped when the machine has under 3 GB free)

The "targets" table (issue 26): per file, ``qvl-surgery toolchains FILE --budget 0.99 --target rknn``
calibrated on four scikit-image photos, its rknn hybrid config built by rknn-toolkit2's simulator, and
the centered cosine against onnxruntime fp32 on three other photos, beside the figure of the
emulation the budget measured in (passes/quantize/target.py) for the same keep-list and photos.

Each client runs in its own virtualenv under .compat/<client>/ (made on first use, as scripts/compat
does) and runs this file as a worker (``--worker JOB.json``): above the worker section only the
standard library and numpy are imported. Every model a client sees is a copy.

rknn-toolkit2's hybrid quantization is two calls with a hand edit between them: step 1 writes its own
graph (``.model``) and a ``.quantization.cfg``; ``qvl-surgery toolchains ... --rknn-step1 DIR`` writes
the edited cfg (its layer names are read from that ``.model``); step 2 builds from it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from photos import CALIB as CALIB_PHOTOS, JUDGE as EVAL_PHOTOS, save_photos

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".compat" / "toolchains"
BUDGET = "0.9995"
CALIB = 8
MARK_BEGIN, MARK_END = "<!-- toolchain configs: begin -->", "<!-- toolchain configs: end -->"
TARGETS_BEGIN, TARGETS_END = "<!-- toolchain targets: begin -->", "<!-- toolchain targets: end -->"
TARGET_BUDGET = "0.99"
TARGETS_3B_BEGIN, TARGETS_3B_END = "<!-- toolchain targets 3b: begin -->", "<!-- toolchain targets 3b: end -->"
PEAK = "peak_rss_mb="
MIN_FREE_GB = 3.0


def _eval_input() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1024, 1176)).astype(np.float32)


# ============================================================================ worker (client venv)

def _nncf_job(job: dict) -> None:
    import nncf
    import onnx
    import onnxruntime as ort
    calib = [np.load(p) for p in job["calib"]]
    scope = None
    if job.get("scope"):
        scope = nncf.IgnoredScope(**json.loads(Path(job["scope"]).read_text()))
    model = onnx.load(job["model"])
    q = nncf.quantize(model, nncf.Dataset(calib, lambda x: {"pixel_values": x}), subset_size=len(calib),
                      model_type=nncf.ModelType.TRANSFORMER, **({"ignored_scope": scope} if scope else {}))
    out = Path(job["dir"]) / "q.onnx"
    onnx.save(q, str(out), save_as_external_data=True, location="q.onnx.data")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.save(job["out"], sess.run(None, {"pixel_values": np.load(job["eval"])})[0])


def _rknn_job(job: dict) -> None:
    import os
    from rknn.api import RKNN
    os.chdir(job["dir"])   # step 1 writes its files into the working directory
    r = RKNN(verbose=False)
    r.config(target_platform="rk3588", **({"quantized_dtype": job["dtype"]} if job.get("dtype") else {}))

    def ok(ret, step):
        if ret != 0:
            raise RuntimeError(f"rknn {step} returned {ret}")
    if job["step"] == "step1":
        ok(r.load_onnx(model=job["model"]), "load_onnx")
        ok(r.hybrid_quantization_step1(dataset=job["dataset"]), "hybrid_quantization_step1")
        _peak()
        return
    if job["step"] == "w8a8":
        ok(r.load_onnx(model=job["model"]), "load_onnx")
        ok(r.build(do_quantization=True, dataset=job["dataset"]), "build")
    else:   # step2 from step 1's files and the edited cfg
        ok(r.hybrid_quantization_step2(model_input=job["model_file"], data_input=job["data_file"],
                                       model_quantization_cfg=job["cfg"]), "hybrid_quantization_step2")
    ok(r.init_runtime(), "init_runtime")
    for x, out in zip(job.get("evals") or [job["eval"]], job.get("outs") or [job["out"]]):
        y = r.inference(inputs=[np.load(x)])
        if y is None:
            raise RuntimeError("rknn inference returned None")
        np.save(out, np.asarray(y[0]))
    r.release()
    _peak()


def _peak() -> None:
    """The worker's peak resident memory, as its last line (read by :func:`run_job`)."""
    import resource
    print(PEAK + json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), flush=True)


def worker(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    {"nncf": _nncf_job, "rknn": _rknn_job}[job["client"]](job)
    return 0


# ============================================================================ parent (main venv)

def _clients():
    from compat_catalog import CLIENTS, NNCF
    return {"nncf": NNCF, "rknn": CLIENTS["rknn"]}


def qvl(*args) -> str:
    exe = Path(sys.executable).with_name("qvl-surgery")
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"qvl-surgery {' '.join(map(str, args))} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def run_job(client, job: dict, timeout: int = 900) -> tuple[bool, str, float]:
    """Run one job in the client's venv, stopped past ``timeout`` or when the machine has under
    MIN_FREE_GB left; (ok, the client's last error line or why it was stopped, seconds). The job's
    peak resident memory (MB, from the worker's last line) goes into ``job["peak_mb"]``."""
    from harness.process import supervise
    d = Path(job["dir"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "job.json").write_text(json.dumps(job))
    t0 = time.perf_counter()
    code, stopped = supervise([str(client.venv.interpreter), str(Path(__file__).resolve()), "--worker",
                               str(d / "job.json")], d / "log.txt", timeout=timeout, min_free_gb=MIN_FREE_GB,
                              who="scripts/toolchains-proof")
    text = (d / "log.txt").read_text(errors="replace").strip().splitlines()
    job["peak_mb"] = next((json.loads(l[len(PEAK):]) for l in reversed(text) if l.startswith(PEAK)), None)
    why = stopped or next((l for l in reversed(text) if "Error" in l or l.startswith("E ")), text[-1] if text else "")
    return code == 0, why[:300], time.perf_counter() - t0


def copy_model(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for p in (src, Path(str(src) + ".data")):
        shutil.copyfile(p, dst_dir / p.name)
    return dst_dir / src.name


def stand_in_files(d: Path, stand_in: str, calibrate: str, preset: str = "tiny") -> tuple[Path, Path]:
    """The stand-in's windowed export and its smoothed form (``smooth --calibrate calibrate``); the
    export's own file deleted once windowed."""
    src = d / f"{stand_in}.onnx"
    qvl("export", "--random-init", preset, *(("--stand-in", stand_in) if stand_in != "random" else ()), "-o", src,
        "-q")
    win, sm = d / f"{stand_in}_windowed.onnx", d / f"{stand_in}_smoothed.onnx"
    qvl("attention", src, "-o", win, "-q")
    for p in (src, Path(f"{src}.data")):
        p.unlink()
    qvl("smooth", win, "-o", sm, "-q", "--calibrate", calibrate)
    return win, sm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, default=ROOT / "COMPAT.md")
    ap.add_argument("--clients", default="nncf,rknn")
    ap.add_argument("--only", choices=("configs", "targets"), help="one of the two tables (the other is kept)")
    ap.add_argument("--3b", dest="big", action="store_true",
                    help="the targets row of the 3b outlier stand-in (smoothed) instead, once (the rest is kept)")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    clients = {k: v for k, v in _clients().items() if k in a.clients.split(",")}
    if a.big:
        from harness.process import mem_available_gb, mem_total_gb
        from harness.venv import make_venv
        make_venv(clients["rknn"].venv, "rknn")
        memory = f"{mem_available_gb():.1f} GB free of {mem_total_gb():.0f} GB"
        write_section(a.output, targets_3b_lines(targets(clients["rknn"], "3b", BIG_CASES, BIG_BUDGETS), memory),
                      TARGETS_3B_BEGIN, TARGETS_3B_END)
        return 0
    if a.only != "configs" and "rknn" in clients:
        from harness.venv import make_venv
        make_venv(clients["rknn"].venv, "rknn")
        write_section(a.output, targets_lines(targets(clients["rknn"])), TARGETS_BEGIN, TARGETS_END)
    if a.only == "targets":
        return 0
    from harness.venv import make_venv
    from qvl_surgery.core.metrics import centered_cosine, cosine
    from qvl_surgery.core.runners import run_model
    for c in clients.values():
        make_venv(c.venv, c.name)
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    x = _eval_input()
    np.save(WORK / "eval.npy", x)
    calib_npz = []
    for s in range(1, CALIB + 1):
        p = WORK / f"calib{s}.npz"
        np.savez(p, pixel_values=np.random.default_rng(s).standard_normal((1024, 1176)).astype(np.float32))
        calib_npz.append(p)
    rows = []
    for stand_in in ("outlier", "random"):
        win, sm = stand_in_files(WORK, stand_in, "random:4")
        for label, model in (("plain export (windowed)", win), ("smoothed", sm)):
            ref = run_model(model, {"pixel_values": x})["image_embeds"]
            cfg = WORK / f"{model.stem}.configs"
            summary = qvl("toolchains", model, "--budget", BUDGET, "--dataset", ",".join(map(str, calib_npz)),
                          "-o", cfg).splitlines()[0]
            keep = json.loads((cfg / "keep.json").read_text())
            dataset = cfg / "calib" / "rknn" / "dataset.txt"
            calib_npy = sorted(str(p) for p in (cfg / "calib" / "rknn").glob("*.npy"))
            cells = {}

            def score(out: Path, ok: bool, why: str, secs: float) -> str:
                if not ok or not out.exists():
                    return f"fails: {why}"
                y = np.load(out).reshape(ref.shape)
                return f"{centered_cosine(ref, y):.5f} ({cosine(ref, y):.5f})"
            if "nncf" in clients:
                for with_cfg in (False, True):
                    d = WORK / "jobs" / f"nncf-{model.stem}-{'cfg' if with_cfg else 'none'}"
                    m = copy_model(model, d / "in")
                    job = {"client": "nncf", "dir": str(d), "model": str(m), "calib": calib_npy,
                           "eval": str(WORK / "eval.npy"), "out": str(d / "out.npy"),
                           "scope": str(cfg / "nncf_ignored_scope.json") if with_cfg and keep["kept"] else None}
                    cells[("nncf", with_cfg)] = score(d / "out.npy", *run_job(clients["nncf"], job))
            if "rknn" in clients:
                d = WORK / "jobs" / f"rknn-{model.stem}-w8a8"
                m = copy_model(model, d / "in")
                job = {"client": "rknn", "step": "w8a8", "dir": str(d), "model": str(m), "dataset": str(dataset),
                       "eval": str(WORK / "eval.npy"), "out": str(d / "out.npy")}
                cells[("rknn", False)] = score(d / "out.npy", *run_job(clients["rknn"], job))
                d = WORK / "jobs" / f"rknn-{model.stem}-w16"
                m = copy_model(model, d / "in")
                job = {"client": "rknn", "step": "w8a8", "dtype": "w16a16i_dfp", "dir": str(d), "model": str(m),
                       "dataset": str(dataset), "eval": str(WORK / "eval.npy"), "out": str(d / "out.npy")}
                cells[("rknn", "w16")] = score(d / "out.npy", *run_job(clients["rknn"], job))
                d1 = WORK / "jobs" / f"rknn-{model.stem}-step1"
                m = copy_model(model, d1 / "in")
                ok, why, secs = run_job(clients["rknn"], {"client": "rknn", "step": "step1", "dir": str(d1),
                                                          "model": str(m), "dataset": str(dataset)})
                if not ok:
                    cells[("rknn", True)] = f"fails: {why}"
                else:
                    hyb = WORK / f"{model.stem}.rknn-configs"
                    qvl("toolchains", model, "--keep-from", cfg / "keep.json", "--rknn-step1", d1, "-o", hyb)
                    d2 = WORK / "jobs" / f"rknn-{model.stem}-step2"
                    job = {"client": "rknn", "step": "step2", "dir": str(d2),
                           "model_file": str(next(d1.glob("*.model"))), "data_file": str(next(d1.glob("*.data"))),
                           "cfg": str(hyb / "rknn.quantization.cfg"), "eval": str(WORK / "eval.npy"),
                           "out": str(d2 / "out.npy")}
                    cells[("rknn", True)] = score(d2 / "out.npy", *run_job(clients["rknn"], job))
            rows.append((stand_in, label, summary, keep, cells))
            print(stand_in, label, cells, flush=True)
    write_section(a.output, configs_lines(rows))
    return 0


def configs_lines(rows) -> list[str]:
    from compat_catalog import CLIENTS
    lines = ["## Toolchain configs (issue 17): with and without the toolkit's keep-list", "",
             "Written by `scripts/toolchains-proof` (do not edit by hand). The tiny stand-ins (outlier: four residual "
             "channels ~1e3 from block 1 on; random weights), each as the plain windowed export and after `smooth "
             "--calibrate random:4`. For each file `qvl-surgery toolchains FILE --budget " + BUDGET + " --dataset "
             f"{CALIB} .npz` measures one keep-list (w8a8 dynamic in onnxruntime) and writes every toolchain's config "
             "and calibration set; each toolchain then quantizes the file without and with it. Cells: token-centered "
             "cosine (plain cosine) against onnxruntime fp32 on the same random input (seed 0, not in the "
             "calibration set).", "",
             "- **NNCF** (" + _version("nncf") + "): `nncf.quantize(onnx model, model_type=TRANSFORMER, subset_size="
             f"{CALIB})`, with `ignored_scope=nncf.IgnoredScope(**nncf_ignored_scope.json)`; run in onnxruntime.",
             "- **rknn-toolkit2** (" + CLIENTS["rknn"].pip[0][-1].split("==")[-1] + ", rk3588 simulator): without: "
             "`build(do_quantization=True, dataset=calib/rknn/dataset.txt)` (w8a8); with: `hybrid_quantization_step1` "
             "on the same dataset, the cfg edited by `qvl-surgery toolchains ... --rknn-step1 DIR`, "
             "`hybrid_quantization_step2` (the config: the kept linears and the residual stream, i.e. the residual "
             "Adds and RMSNorms, in int16 (`--rknn-dtype`, float16 on request): rknn quantizes every activation, and "
             "a residual carrying ~1e3 gets an int8 step of ~4); and `config(quantized_dtype='w16a16i_dfp')`, rk3588's 16-bit integer route "
             "(w8a16 and w4a16 are refused for rk3588).", "",
             "| stand-in | file | keep-list (--budget " + BUDGET + ") | NNCF, none | NNCF, with config | rknn w8a8 | "
             "rknn hybrid, with config | rknn w16a16i_dfp |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for stand_in, label, summary, keep, cells in rows:
        kept = ", ".join(sorted({k.split("/")[1] for k in keep["kept"]})) or "nothing"
        lines.append(f"| {stand_in} | {label} | {kept} ({100 * keep['kept_share']:.1f}% of the multiply-adds) | "
                     + " | ".join(cells.get(k, "not run") for k in (("nncf", False), ("nncf", True), ("rknn", False),
                                                                  ("rknn", True), ("rknn", "w16"))) + " |")
    return lines + [""]


def write_section(path: Path, lines: list[str], begin: str = MARK_BEGIN, end: str = MARK_END) -> None:
    """``lines`` between ``begin`` and ``end`` in ``path`` (the configs table between the section's
    own markers, keeping the targets table nested in it; the targets table between its markers,
    inside the section); the rest of the file kept."""
    text = path.read_text() if path.exists() else ""
    if MARK_BEGIN not in text:
        text = text.rstrip() + "\n\n" + MARK_BEGIN + "\n" + MARK_END + "\n"
    head, rest = text.split(MARK_BEGIN, 1)
    section, tail = rest.split(MARK_END, 1)
    if begin == MARK_BEGIN:   # the configs table: the targets tables nested in the section survive
        nested = "".join(b + section.split(b, 1)[1].split(e, 1)[0] + e + "\n"
                         for b, e in ((TARGETS_BEGIN, TARGETS_END), (TARGETS_3B_BEGIN, TARGETS_3B_END)) if b in section)
        section = "\n" + "\n".join(lines) + "\n" + nested
    else:
        block = begin + "\n" + "\n".join(lines) + "\n" + end
        if begin in section:
            before, after = section.split(begin, 1)
            section = before + block + after.split(end, 1)[1]
        else:
            section = section.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(head + MARK_BEGIN + section + MARK_END + tail)
    print(f"wrote {path}")


# ============================================================================ targets (issue 26)

def _emulated(model: Path, keep: dict, calib: list[dict], evals: list[dict], ref: list[np.ndarray]) -> list[float]:
    """The centered cosine on ``evals`` of the emulation --budget measured in, for ``keep``'s list."""
    from passes.quantize.target import emulator
    from qvl_surgery.core.linears import find_linears
    from qvl_surgery.core.metrics import centered_cosine
    from qvl_surgery.core.modelfile import load_model
    from qvl_surgery.core.segments import run_segments
    m = load_model(model)
    emu = emulator(m, calib, "rknn", find_linears(m, []))(keep["kept"])
    got: list[np.ndarray] = []
    run_segments(emu, evals, ["image_embeds"], lambda name, v: got.append(np.asarray(v, np.float32)))
    return [centered_cosine(r, g) for r, g in zip(ref, got)]


TINY_CASES = (("random", ("plain (windowed)", "smoothed")), ("outlier", ("plain (windowed)", "smoothed")))
BIG_CASES = (("outlier", ("smoothed",)),)
BIG_BUDGETS = (TARGET_BUDGET, "0.98")   # on the 3b the calibration photos' ceiling may sit below 0.99


def targets(rknn, preset: str = "tiny", cases=TINY_CASES, budgets=(TARGET_BUDGET,)) -> list[dict]:
    """Per file: toolchains --budget --target rknn on photos, rknn's simulator with the written hybrid
    config, the emulation's figure; on the photos the calibration did not see. ``budgets``: tried in
    order, the first the emulation reaches is used (a row of refusals where none is). Each step's wall time
    (and the rknn steps' peak memory) in the row. The reference and the emulation run in this process
    after rknn's jobs, so that nothing of a 3b model is held here while rknn builds."""
    from qvl_surgery.core.inputs import InputSource
    from qvl_surgery.core.metrics import centered_cosine
    from qvl_surgery.core.runners import run_model
    work = WORK / ("targets" if preset == "tiny" else f"targets-{preset}")
    if work.exists():
        shutil.rmtree(work)
    calib_png, eval_png = save_photos(work / "photos", CALIB_PHOTOS), save_photos(work / "photos", EVAL_PHOTOS)
    calib = ",".join(map(str, calib_png))
    rows = []
    for stand_in, labels in cases:
        files = dict(zip(("plain (windowed)", "smoothed"), stand_in_files(work, stand_in, calib, preset)))
        for label in labels:
            model, secs = files[label], {}
            cfg = work / f"{model.stem}.configs"
            refused = []
            for budget in budgets:   # the first the emulation can reach; each refusal kept for the row
                t0 = time.perf_counter()
                r = subprocess.run([str(Path(sys.executable).with_name("qvl-surgery")), "toolchains", str(model),
                                    "--budget", budget, "--target", "rknn", "--activations", "int8", "--calibrate",
                                    calib, "--dataset", calib, "-o", str(cfg), "-q"], capture_output=True, text=True)
                secs[f"budget {budget}"] = time.perf_counter() - t0
                if r.returncode == 0:
                    break
                if "not reachable" not in r.stderr:
                    raise SystemExit(f"qvl-surgery toolchains {model} --budget {budget} failed:\n{r.stderr[-2000:]}")
                refused.append(r.stderr.strip().splitlines()[-1].split(": ", 2)[-1])   # "--budget B: not reachable ..."
            else:
                rows.append({"stand_in": stand_in, "file": label, "refused": refused, "secs": secs})
                continue
            keep = json.loads((cfg / "keep.json").read_text())
            feeds = InputSource.parse(",".join(map(str, eval_png)), "dataset", random_ok=False).sets(model)
            evals = []
            for png, f in zip(eval_png, feeds):
                evals.append(work / f"{model.stem}.{png.stem}.npy")
                np.save(evals[-1], f["pixel_values"])
            d1 = work / "jobs" / f"{model.stem}-step1"
            m = copy_model(model, d1 / "in")
            job1 = {"client": "rknn", "step": "step1", "dir": str(d1), "model": str(m),
                    "dataset": str(cfg / "calib" / "rknn" / "dataset.txt")}
            ok, why, secs["step1"] = run_job(rknn, job1, timeout=3 * 3600)
            peaks = {"step1": job1["peak_mb"]}
            sim = why
            if ok:
                hyb = work / f"{model.stem}.rknn-configs"
                qvl("toolchains", model, "--keep-from", cfg / "keep.json", "--rknn-step1", d1, "-o", hyb, "-q")
                d2 = work / "jobs" / f"{model.stem}-step2"
                outs = [str(d2 / f"out.{p.stem}.npy") for p in eval_png]
                job2 = {"client": "rknn", "step": "step2", "dir": str(d2),
                        "model_file": str(next(d1.glob("*.model"))), "data_file": str(next(d1.glob("*.data"))),
                        "cfg": str(hyb / "rknn.quantization.cfg"), "evals": list(map(str, evals)), "outs": outs}
                ok, why, secs["step2"] = run_job(rknn, job2, timeout=3 * 3600)
                peaks["step2"] = job2["peak_mb"]
                sim = [np.load(o) for o in outs] if ok else why
            for d in (work / "jobs").glob("*"):   # rknn's logs kept beside the results
                if (d / "log.txt").exists():
                    shutil.copyfile(d / "log.txt", WORK / f"{preset}-{d.name}-log.txt")
            shutil.rmtree(work / "jobs", ignore_errors=True)   # rknn's copies and its multi-GB build files
            ref = [run_model(model, f)["image_embeds"] for f in feeds]
            if isinstance(sim, list):
                sim = [centered_cosine(r, y.reshape(r.shape)) for r, y in zip(ref, sim)]
            calib_feeds = InputSource.parse(calib, "calibrate", random_ok=False).sets(model)
            t0 = time.perf_counter()
            emulated = _emulated(model, keep, calib_feeds, feeds, ref)
            secs["emulation"] = time.perf_counter() - t0
            rows.append({"stand_in": stand_in, "file": label, "keep": keep, "emulation": emulated, "simulator": sim,
                         "secs": secs, "peak_mb": peaks, "budget": budget, "refused": refused})
            print(stand_in, label, sorted(keep["kept"]), emulated, sim, secs, peaks, flush=True)
    if preset != "tiny":
        shutil.rmtree(work, ignore_errors=True)
    return rows


def targets_lines(rows: list[dict]) -> list[str]:
    worst = lambda v: f"{min(v):.5f}" if isinstance(v, list) else f"fails: {v}"   # noqa: E731
    lines = ["### Targets (issue 26): the budget measured in rknn's arithmetic, checked in rknn's simulator", "",
             f"`qvl-surgery toolchains FILE --budget {TARGET_BUDGET} --target rknn --activations int8 --calibrate "
             f"PHOTOS --dataset PHOTOS` (photos: scikit-image's {', '.join(CALIB_PHOTOS)}) measures the keep-list in "
             "the emulation of rknn-toolkit2's arithmetic (passes/quantize/target.py) and writes the configs; "
             "`hybrid_quantization_step1` on the same photos, `toolchains --keep-from keep.json --rknn-step1` (the kept "
             "linears and the residual stream in int16), `hybrid_quantization_step2`, the rk3588 simulator. Cells: "
             f"token-centered cosine against onnxruntime fp32, worst of {', '.join(EVAL_PHOTOS)} (not calibrated on); "
             "the emulation on the same photos with the same keep-list.", "",
             "| stand-in | file | kept (share of multiply-adds) | emulation | rknn simulator | difference |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if "keep" not in r:
            lines.append(f"| {r['stand_in']} | {r['file']} | {'; '.join(r['refused'])} | - | - | - |")
            continue
        kept = ", ".join(sorted({k.split("/")[1] for k in r["keep"]["kept"]})) or "nothing"
        diff = (f"{abs(min(r['emulation']) - min(r['simulator'])):.5f}" if isinstance(r["simulator"], list) else "-")
        lines.append(f"| {r['stand_in']} | {r['file']} | {kept} ({100 * r['keep']['kept_share']:.1f}%) | "
                     f"{worst(r['emulation'])} | {worst(r['simulator'])} | {diff} |")
    return lines


def targets_3b_lines(rows: list[dict], memory: str) -> list[str]:
    """The 3b row(s) of the targets table, with what each step took: written by ``--3b`` (once)."""
    lines = []
    for r in rows:
        head = (f"3b {r['stand_in']} stand-in (random weights seed 0, 448x448), {r['file']} (`smooth --calibrate` on "
                f"the calibration photos), the same steps (`scripts/toolchains-proof --3b`, {memory} before): ")
        refused = "; ".join(r["refused"]) + ("; " if r["refused"] else "")
        took = ", ".join(f"{k} {v:.0f} s" + (f" (peak {r['peak_mb'][k] / 1024:.1f} GB)" if r.get("peak_mb", {}).get(k)
                                             else "") for k, v in r["secs"].items())
        if "keep" not in r:
            lines.append(f"{head}{refused}nothing built. Took: {took}.")
            continue
        kept = ", ".join(sorted({k.split("/")[1] for k in r["keep"]["kept"]})) or "nothing"
        sim = r["simulator"]
        if isinstance(sim, list) and not all(np.isfinite(sim)):
            cell, diff = f"outputs not finite (NaN/inf) on {sum(not np.isfinite(v) for v in sim)} of {len(sim)} photos", ""
        elif isinstance(sim, list):
            cell = f"{min(sim):.5f} (each photo {', '.join(f'{v:.5f}' for v in sim)})"
            diff = f"; difference {abs(min(r['emulation']) - min(sim)):.5f}"
        else:
            cell, diff = f"not run to the end: {sim}", ""
        lines.append(f"{head}{refused}--budget {r['budget']}: "
                     f"kept {kept} ({100 * r['keep']['kept_share']:.2f}% of the multiply-adds); emulation "
                     f"{min(r['emulation']):.5f}; rknn simulator {cell}{diff}. Took: {took}.")
    return lines


def _version(pkg: str) -> str:
    try:
        out = subprocess.run([str(ROOT / ".compat" / pkg / "bin" / "python"), "-c",
                              f"import importlib.metadata as m; print(m.version({pkg!r}))"], capture_output=True, text=True)
        return f"{pkg} {out.stdout.strip()}"
    except OSError:
        return pkg


if __name__ == "__main__":
    sys.exit(main())
