"""Proof that the toolkit's toolchain configs help: NNCF and rknn-toolkit2 quantize the tiny stand-ins
(the plain export and the smoothed file) with and without the configs `qvl-surgery toolchains` writes
from one `--budget` measurement; the token-centered cosine of each result against onnxruntime fp32
goes into COMPAT.md (its "toolchain configs" section, between markers; the rest of the file is kept).

    scripts/toolchains-proof            # about 10 min on 2 cores; run it alone

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

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".compat" / "toolchains"
BUDGET = "0.9995"
CALIB = 8
MARK_BEGIN, MARK_END = "<!-- toolchain configs: begin -->", "<!-- toolchain configs: end -->"


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
        return
    if job["step"] == "w8a8":
        ok(r.load_onnx(model=job["model"]), "load_onnx")
        ok(r.build(do_quantization=True, dataset=job["dataset"]), "build")
    else:   # step2 from step 1's files and the edited cfg
        ok(r.hybrid_quantization_step2(model_input=job["model_file"], data_input=job["data_file"],
                                       model_quantization_cfg=job["cfg"]), "hybrid_quantization_step2")
    ok(r.init_runtime(), "init_runtime")
    y = r.inference(inputs=[np.load(job["eval"])])
    if y is None:
        raise RuntimeError("rknn inference returned None")
    np.save(job["out"], np.asarray(y[0]))
    r.release()


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
    """Run one job in the client's venv; (ok, the client's last error line, seconds)."""
    d = Path(job["dir"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "job.json").write_text(json.dumps(job))
    t0 = time.perf_counter()
    with open(d / "log.txt", "w") as log:
        p = subprocess.run([str(client.venv.interpreter), str(Path(__file__).resolve()), "--worker", str(d / "job.json")],
                           stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    text = (d / "log.txt").read_text(errors="replace").strip().splitlines()
    why = next((l for l in reversed(text) if "Error" in l or l.startswith("E ")), text[-1] if text else "")
    return p.returncode == 0, why[:300], time.perf_counter() - t0


def copy_model(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for p in (src, Path(str(src) + ".data")):
        shutil.copyfile(p, dst_dir / p.name)
    return dst_dir / src.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, default=ROOT / "COMPAT.md")
    ap.add_argument("--clients", default="nncf,rknn")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    clients = {k: v for k, v in _clients().items() if k in a.clients.split(",")}
    from harness.venv import make_venv
    from qvl_surgery.core.metrics import centered_cosine, cosine
    from qvl_surgery.core.config import PRESETS
    from qvl_surgery.core.export import export
    from qvl_surgery.core.runners import run_model
    from qvl_surgery.core.weights import STAND_INS
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
        src = WORK / f"{stand_in}.onnx"
        export(STAND_INS[stand_in](PRESETS["tiny"], 0), src, (448, 448), progress=False)
        win = WORK / f"{stand_in}_windowed.onnx"
        qvl("attention", src, "-o", win, "-q")
        sm = WORK / f"{stand_in}_smoothed.onnx"
        qvl("smooth", win, "-o", sm, "-q", "--calibrate", "random:4")
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
    write_section(a.output, rows, clients)
    return 0


def write_section(path: Path, rows, clients) -> None:
    from compat_catalog import CLIENTS
    lines = [MARK_BEGIN, "## Toolchain configs (issue 17): with and without the toolkit's keep-list", "",
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
             "Adds and RMSNorms, in float16: rknn quantizes every activation, and a residual carrying ~1e3 gets an "
             "int8 step of ~4); and `config(quantized_dtype='w16a16i_dfp')`, rk3588's 16-bit integer route "
             "(w8a16 and w4a16 are refused for rk3588).", "",
             "| stand-in | file | keep-list (--budget " + BUDGET + ") | NNCF, none | NNCF, with config | rknn w8a8 | "
             "rknn hybrid, with config | rknn w16a16i_dfp |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for stand_in, label, summary, keep, cells in rows:
        kept = ", ".join(sorted({k.split("/")[1] for k in keep["kept"]})) or "nothing"
        lines.append(f"| {stand_in} | {label} | {kept} ({100 * keep['kept_share']:.1f}% of the multiply-adds) | "
                     + " | ".join(cells.get(k, "not run") for k in (("nncf", False), ("nncf", True), ("rknn", False),
                                                                  ("rknn", True), ("rknn", "w16"))) + " |")
    lines += ["", MARK_END]
    text = path.read_text() if path.exists() else ""
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + "\n".join(lines) + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    path.write_text(text)
    print(f"wrote {path}")


def _version(pkg: str) -> str:
    try:
        out = subprocess.run([str(ROOT / ".compat" / pkg / "bin" / "python"), "-c",
                              f"import importlib.metadata as m; print(m.version({pkg!r}))"], capture_output=True, text=True)
        return f"{pkg} {out.stdout.strip()}"
    except OSError:
        return pkg


if __name__ == "__main__":
    sys.exit(main())
