"""Proof of the image-in export (issue 25) in rknn-toolkit2's rk3588 simulator: the tiny preset's
``pixel_values`` export and its image-in (nchw) export at 448x448 and 448x672, each built by
rknn-toolkit2 (fp16; the image-in file also w8a8 and hybrid int8) and run on real photos
(scikit-image's astronaut, coffee, chelsea, resized to the size) against transformers' processor +
model.visual. Per build: max |diff| / max |ref|, the token-centered cosine, and where each op runs
(rknn's "Network Layer Information Table": NPU vs CPU, the CPU ones named). The results go into
COMPAT.md between ``<!-- imagein proof -->`` markers (the rest of the file is kept).

    scripts/imagein-proof            # tiny, about 10 min on 2 cores
    scripts/imagein-proof --3b       # once: the 3b image-in fp16 build at 448x448 (2.7 GB export,
                                     # stopped when the machine has under 3 GB left; deleted after)

rknn-toolkit2 runs in its own virtualenv (.compat/rknn/, scripts/compat's client, made on first use)
and runs this file as a worker (``--worker JOB.json``): above the worker section only the standard
library and numpy are imported. Every tiny model rknn sees is a copy; the 3b file is hash-checked.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".compat" / "imagein"
SIZES = ((448, 448), (448, 672))
EVAL = ("astronaut", "coffee", "chelsea")
CALIB = ("rocket", "immunohistochemistry", "retina", "hubble_deep_field", "colorwheel", "stereo_motorcycle")
BUDGET = "0.9995"
MIN_FREE_GB = 3.0
MARK_BEGIN, MARK_END = "<!-- imagein proof -->", "<!-- /imagein proof -->"
TABLE = re.compile(r"\]\s+(\d+)\s+(\S+)\s+(\S+)\s+(NPU|CPU)\s.*\s(\S+)\s*$")


# ============================================================================ worker (rknn venv)

def placement(log: str) -> dict:
    """rknn's layer table (the last one in the build log): op counts on NPU and CPU, the CPU ones named
    (its Input/OutputOperator rows are left out: they run on the CPU in every model)."""
    tables = log.split("Network Layer Information Table")
    rows = [m.groups() for line in (tables[-1].splitlines() if len(tables) > 1 else [])
            if (m := TABLE.search(re.sub(r"\x1b\[[0-9;]*m", "", line)))]
    rows = [r for r in rows if r[1] not in ("InputOperator", "OutputOperator")]
    return {"npu": sum(r[3] == "NPU" for r in rows), "cpu": sum(r[3] == "CPU" for r in rows),
            "cpu_ops": [f"{r[1]} {r[4]}" for r in rows if r[3] == "CPU"]}


def _rknn_job(job: dict) -> dict:
    import os
    import resource
    from rknn.api import RKNN
    from harness.hashing import snapshot
    os.chdir(job["dir"])   # hybrid step 1 writes its files into the working directory
    before = snapshot(Path(job["model"])) if job.get("model") else None
    r = RKNN(verbose=True)
    image = job["image"]
    norm = {"mean_values": [job.get("mean", [0, 0, 0])], "std_values": [job.get("std", [1, 1, 1])]}
    r.config(target_platform="rk3588", **(norm if image else {}))

    def ok(ret, step):
        if ret != 0:
            raise RuntimeError(f"rknn {step} returned {ret}")
    if job["step"] != "step2":
        ok(r.load_onnx(model=job["model"]), "load_onnx")
    if job["step"] == "step1":
        ok(r.hybrid_quantization_step1(dataset=job["dataset"]), "hybrid_quantization_step1")
    elif job["step"] == "step2":
        ok(r.hybrid_quantization_step2(model_input=job["model_file"], data_input=job["data_file"],
                                       model_quantization_cfg=job["cfg"]), "hybrid_quantization_step2")
    else:
        int8 = job["step"] == "int8"
        ok(r.build(do_quantization=int8, dataset=job["dataset"] if int8 else None), "build")
    result = {}
    if job["step"] != "step1":
        ok(r.init_runtime(), "init_runtime")
        for name, feed in job["feeds"].items():
            y = r.inference(inputs=[np.load(feed)], **({"data_format": "nchw"} if image else {}))
            if y is None:
                raise RuntimeError("rknn inference returned None")
            np.save(Path(job["dir"]) / f"out_{name}.npy", np.asarray(y[0]))
    r.release()
    if before is not None:
        result["input_unchanged"] = snapshot(Path(job["model"])) == before
    result["peak_rss_gb"] = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF,
                                                                            resource.RUSAGE_CHILDREN)) / 2**20
    return result


def worker(job_path: Path) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness.results import emit
    emit(_rknn_job(json.loads(job_path.read_text())))
    return 0


# ============================================================================ parent (main venv)

def run_job(job: dict, timeout: float = 1800) -> dict:
    """One rknn job in its venv, stopped past ``timeout`` or when the machine runs short; the worker's
    result, or {"error": the last error line}."""
    from compat_catalog import CLIENTS
    from harness.process import supervise
    from harness.results import parse
    d = Path(job["dir"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "job.json").write_text(json.dumps(job))
    code, stopped = supervise([str(CLIENTS["rknn"].venv.interpreter), str(Path(__file__).resolve()), "--worker",
                               str(d / "job.json")], d / "log.txt", timeout=timeout, min_free_gb=MIN_FREE_GB,
                              who="scripts/imagein-proof")
    text = (d / "log.txt").read_text(errors="replace")
    res = parse(text)
    if code == 0 and res is not None:
        return {**res, "placement": placement(text)}
    lines = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()
    why = stopped or next((l for l in reversed(lines) if "Error" in l or l.startswith("E ")), lines[-1] if lines else "")
    return {"error": why[:300]}


def photos(names, size) -> dict[str, np.ndarray]:
    from skimage import data
    from qvl_surgery.core.imagein import resize_image
    out = {}
    for n in names:
        img = getattr(data, n)()
        out[n] = resize_image(img[0] if isinstance(img, tuple) else img, size)
    return out


def processor_pixels(px: np.ndarray) -> np.ndarray:
    from PIL import Image
    from transformers import Qwen2VLImageProcessor
    h, w = px.shape[:2]
    proc = Qwen2VLImageProcessor(min_pixels=h * w, max_pixels=h * w)
    return proc(images=[Image.fromarray(px)], return_tensors="np")["pixel_values"].astype(np.float32)


def transformers_model(weights):
    """transformers' vision tower (model.visual) holding these weights."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    model = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**weights.cfg.to_dict())).eval()
    model.load_state_dict(weights.state_dict())
    return model


def visual(model, pixel_values: np.ndarray, size) -> np.ndarray:
    """``model`` (:func:`transformers_model`) on one image's pixel_values of ``size``."""
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(pixel_values), torch.tensor([[1, size[0] // 14, size[1] // 14]])).numpy()


def transformers_reference(weights, pixel_values: np.ndarray, size) -> np.ndarray:
    """model.visual of transformers with these weights on the processor's pixel_values."""
    return visual(transformers_model(weights), pixel_values, size)


def score(ref: np.ndarray, outs: dict[str, np.ndarray]) -> dict:
    """Worst over the photos: max |diff| / max |ref| and the token-centered cosine."""
    from qvl_surgery.core.metrics import centered_cosine
    rel, cos = [], []
    for name, y in outs.items():
        y = y.reshape(ref[name].shape)
        rel.append(float(np.abs(y - ref[name]).max() / np.abs(ref[name]).max()))
        cos.append(centered_cosine(ref[name], y))
    return {"rel": max(rel), "ccos": min(cos)}


def channel_last_variant(src: Path, dst: Path) -> bool:
    """A copy of an image-in export whose window reorder keeps the channels last (Transpose to NHWC
    first, then Reshape/Transpose of ranks 4 and 6), the form rknn-toolkit2 2.5.0 rewrites correctly;
    False when ``src`` has no tiled window reorder to replace."""
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(str(src))
    names = ["/patch_embed/Reshape_windows", "/patch_embed/Transpose_windows", "/patch_embed/Reshape_groups",
             "/patch_embed/Transpose_groups", "/patch_embed/Reshape_tokens"]
    by = {n.name: n for n in m.graph.node}
    if not all(n in by for n in names):
        return False
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    c, nwh, side, nww, _ = init[by[names[0]].input[1]]
    _, _, ws, mg, _, _ = init[by[names[2]].input[1]]
    conv_out, tokens = by[names[0]].input[0], by[names[4]].output[0]
    k = lambda n, v: numpy_helper.from_array(np.array(v, np.int64), f"/patch_embed/cl/{n}")   # noqa: E731
    m.graph.initializer.extend([k("s1", [nwh, side, nww, side * c]), k("s2", [nwh * nww, ws, mg, ws, mg, c]),
                                k("s3", [nwh * nww * side * side, c])])
    p = "/patch_embed/cl/"
    new = [helper.make_node("Transpose", [conv_out], [p + "nhwc"], p + "Transpose_nhwc", perm=[0, 2, 3, 1]),
           helper.make_node("Reshape", [p + "nhwc", p + "s1"], [p + "r1"], p + "Reshape_windows"),
           helper.make_node("Transpose", [p + "r1"], [p + "t1"], p + "Transpose_windows", perm=[0, 2, 1, 3]),
           helper.make_node("Reshape", [p + "t1", p + "s2"], [p + "r2"], p + "Reshape_groups"),
           helper.make_node("Transpose", [p + "r2"], [p + "t2"], p + "Transpose_groups", perm=[0, 1, 3, 2, 4, 5]),
           helper.make_node("Reshape", [p + "t2", p + "s3"], [tokens], p + "Reshape_tokens")]
    nodes = []
    for n in m.graph.node:
        if n.name == names[0]:
            nodes += new
        elif n.name not in names:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return True


def qvl_retry(*args) -> None:
    """qvl-surgery, tried three times: other work edits this working tree while the proof runs."""
    from toolchains_proof import qvl
    for attempt in range(3):
        try:
            qvl(*args)
            return
        except SystemExit:
            if attempt == 2:
                raise
            time.sleep(20)


def builds(label: str, model: Path, image: bool, feeds: dict, d: Path, calib: list[Path] | None,
           layout: str = "nchw") -> dict:
    """rknn builds of one file: fp16, and for an image-in file w8a8 and hybrid (step 1, the project's
    cfg edit, step 2). Label -> the worker's result."""
    from toolchains_proof import copy_model
    out = {}
    steps = ["fp16"] + (["int8", "hybrid"] if calib else [])
    dataset = None
    if calib:
        dataset = d / "dataset.txt"
        dataset.write_text("".join(f"{p}\n" for p in calib))
        pngs = ",".join(str(p.with_suffix(".png")) for p in calib)
    for step in steps:
        jd = d / f"{label}-{step}"
        m = copy_model(model, jd / "in")
        from qvl_surgery.core.imagein import toolchain_mean_std
        mean, std = toolchain_mean_std(layout)   # rknn normalizes the 0..255 feeds for nchw-normalized
        base = {"image": image, "feeds": {k: str(v) for k, v in feeds.items()}, "mean": mean, "std": std}
        if step != "hybrid":
            out[step] = run_job({**base, "step": step, "dir": str(jd), "model": str(m), "dataset": str(dataset)})
            out[step]["dir"] = jd
            continue
        s1 = run_job({**base, "step": "step1", "dir": str(jd), "model": str(m), "dataset": str(dataset)})
        if "error" in s1:
            out[step] = s1
            continue
        cfg, hyb = jd.with_name(jd.name + "-keep"), jd.with_name(jd.name + "-cfg")   # outside step 1's folder
        qvl_retry("toolchains", m, "--budget", BUDGET, "--dataset", pngs, "-o", cfg, "-q")
        qvl_retry("toolchains", m, "--keep-from", cfg / "keep.json", "--rknn-step1", jd, "-o", hyb, "-q")
        kept = json.loads((cfg / "keep.json").read_text())["kept"]
        j2 = jd / "step2"
        out[step] = run_job({**base, "step": "step2", "dir": str(j2), "model_file": str(next(jd.glob("*.model"))),
                             "data_file": str(next(jd.glob("*.data"))), "cfg": str(hyb / "rknn.quantization.cfg")})
        out[step].update(dir=j2, kept=sorted(kept), input_unchanged=s1.get("input_unchanged"))
    return out


def tiny(a) -> list[dict]:
    from PIL import Image
    from qvl_surgery.core.config import PRESETS
    from qvl_surgery.core.export import export
    from qvl_surgery.core.imagein import image_feed
    from qvl_surgery.core.runners import run_model
    from qvl_surgery.core.weights import RandomWeights
    weights = RandomWeights(PRESETS["tiny"], seed=0)
    rows = []
    for size in SIZES:
        tag = f"{size[0]}x{size[1]}"
        d = WORK / tag
        d.mkdir(parents=True)
        pv, img, cl = d / "pixel_values.onnx", d / "image_nchw.onnx", d / "image_nchw_channel_last.onnx"
        nrm = d / "image_nchw_normalized.onnx"
        export(weights, pv, size, progress=False)
        export(weights, img, size, progress=False, image_input="nchw")
        export(weights, nrm, size, progress=False, image_input="nchw-normalized")
        has_cl = channel_last_variant(img, cl)
        ref, feeds_pv, feeds_img, feeds_nrm = {}, {}, {}, {}
        for name, px in photos(EVAL, size).items():
            x = processor_pixels(px)
            ref[name] = transformers_reference(weights, x, size)
            np.save(feeds_pv.setdefault(name, d / f"{name}_pixel_values.npy"), x)
            np.save(feeds_img.setdefault(name, d / f"{name}_image.npy"), image_feed(px, "nchw"))
            np.save(feeds_nrm.setdefault(name, d / f"{name}_image_normalized.npy"), image_feed(px, "nchw-normalized"))
        calib = []
        for name, px in photos(CALIB, size).items():
            np.save(d / f"calib_{name}.npy", image_feed(px, "nchw"))
            Image.fromarray(px).save(d / f"calib_{name}.png")
            calib.append(d / f"calib_{name}.npy")
        # (label, file, image input?, rknn's feeds (0..255: rknn normalizes), onnxruntime's feeds, calibration, layout)
        files = [("pixel_values export", pv, False, feeds_pv, feeds_pv, None, "nchw"),
                 ("image-in nchw export", img, True, feeds_img, feeds_img, calib, "nchw"),
                 ("image-in nchw-normalized export (rknn's mean/std)", nrm, True, feeds_img, feeds_nrm, calib,
                  "nchw-normalized")]
        if has_cl:
            files.append(("image-in nchw, channel-last reorder (hand-edited copy)", cl, True, feeds_img, feeds_img,
                          calib, "nchw"))
        for label, model, image, feeds, ort_feeds, cal, layout in files:
            ort = score(ref, {n: run_model(model, {("image" if image else "pixel_values"): np.load(f)})["image_embeds"]
                              for n, f in ort_feeds.items()})
            rows.append({"size": tag, "file": label, "build": "onnxruntime (the file itself)", **ort})
            for build, res in builds(model.stem, model, image, feeds, d / "jobs", cal, layout).items():
                row = {"size": tag, "file": label, "build": build, **{k: v for k, v in res.items() if k != "dir"}}
                if "error" not in res:
                    row.update(score(ref, {n: np.load(res["dir"] / f"out_{n}.npy") for n in feeds}))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "placement"}), row.get("placement"), flush=True)
    return rows


def prep_3b(d: Path) -> None:
    """(child process) The 3b image-in export at 448x448, the photo's feed, and onnxruntime fp32's output."""
    from qvl_surgery.core.config import PRESETS
    from qvl_surgery.core.export import export
    from qvl_surgery.core.imagein import image_feed
    from qvl_surgery.core.runners import run_model
    from qvl_surgery.core.weights import RandomWeights
    export(RandomWeights(PRESETS["3b"], seed=0), d / "image_nchw.onnx", (448, 448), progress=False, image_input="nchw")
    np.save(d / "feed.npy", image_feed(photos(EVAL[:1], (448, 448))[EVAL[0]], "nchw"))
    np.save(d / "ref.npy", run_model(d / "image_nchw.onnx", {"image": np.load(d / "feed.npy")})["image_embeds"])


def big(a) -> list[dict]:
    """The 3b image-in fp16 build at 448x448, once: peak memory, whether it builds and runs, and its
    accuracy on one photo against onnxruntime fp32 on the same file (the tiny rows show that file equal
    to transformers). The export and the reference run in a child; everything multi-GB is deleted after."""
    from harness.process import mem_available_gb, supervise
    d = WORK / "3b"
    d.mkdir(parents=True)
    row = {"size": "448x448", "file": "3b image-in nchw export", "build": "fp16"}
    try:
        code, stopped = supervise([sys.executable, str(Path(__file__).resolve()), "--prep3b", str(d)], d / "prep.txt",
                                  timeout=3600, min_free_gb=MIN_FREE_GB, who="scripts/imagein-proof")
        if code != 0:
            row["error"] = "export/reference: " + (stopped or (d / "prep.txt").read_text()[-300:])
            return [row]
        row["free_gb_before"] = mem_available_gb()
        res = run_job({"image": True, "step": "fp16", "dir": str(d / "job"), "model": str(d / "image_nchw.onnx"),
                       "feeds": {EVAL[0]: str(d / "feed.npy")}}, timeout=3600)
        row.update({k: v for k, v in res.items() if k != "dir"})
        if "error" not in res:
            row.update(score({EVAL[0]: np.load(d / "ref.npy")}, {EVAL[0]: np.load(d / "job" / f"out_{EVAL[0]}.npy")}))
        shutil.copyfile(d / "job" / "log.txt", WORK / "3b-rknn-log.txt")
        print(json.dumps({k: v for k, v in row.items() if k != "placement"}), row.get("placement"), flush=True)
        return [row]
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _cell(row: dict) -> str:
    if "error" in row:
        return f"fails: {row['error']}"
    return f"{row['rel']:.2e} | {row['ccos']:.5f}"


def _where(row: dict) -> str:
    pl = row.get("placement")
    if not pl:
        return "- | -"
    cpu = "; ".join(f"`{c}`" for c in pl["cpu_ops"]) or "none"
    return f"{pl['npu']} / {pl['cpu']} | {cpu}"


def write_section(path: Path, results: dict) -> None:
    from compat_catalog import CLIENTS
    version = CLIENTS["rknn"].pip[0][-1].split("==")[-1]
    lines = [MARK_BEGIN, f"## Image in (issue 25): rknn-toolkit2 {version}, rk3588 simulator", "",
             "Written by `scripts/imagein-proof` (tiny) and `scripts/imagein-proof --3b` (do not edit by hand). "
             "The tiny preset (random weights, seed 0) exported three times per size: `export(...)` (input "
             "`pixel_values`), `export(..., image_input='nchw')` (float [1,3,H,W] in 0..255; the processor's rescale "
             "and mean/std folded into the patch-embed Conv) and `image_input='nchw-normalized'` (the Conv unfolded, "
             "rknn's input stage normalizing). rknn-toolkit2 builds each (`config(target_platform='rk3588')`, for the "
             "image input `mean_values`/`std_values` 0/1, or 255 x the processor's for nchw-normalized; rknn is fed "
             "the 0..255 image either way): fp16 = `build(do_quantization=False)`; "
             "int8 = `build(do_quantization=True)` on 6 other photos (rocket, immunohistochemistry, retina, "
             "hubble_deep_field, colorwheel, stereo_motorcycle, resized); hybrid = `hybrid_quantization_step1` on "
             f"them, the cfg edited by `qvl-surgery toolchains --budget {BUDGET}` + `--rknn-step1` (the kept linears "
             "and the residual stream in float16), `hybrid_quantization_step2`. Each runs in the simulator "
             "(`init_runtime()` without a target) on astronaut, coffee and chelsea resized to the size. Reference: "
             "transformers' `Qwen2VLImageProcessor` + `model.visual` on the same resized uint8 photos. Cells: worst "
             "photo's max |diff| / max |ref| and token-centered cosine; ops: rknn's layer table, NPU / CPU (its "
             "Input/OutputOperator left out), and the ops it placed on the CPU.", "",
             "| size | file | build | max\\|diff\\| / max\\|ref\\| | centered cosine | ops NPU / CPU | on CPU |",
             "|---|---|---|---:|---:|---:|---|"]
    for row in results.get("tiny", []):
        lines.append(f"| {row['size']} | {row['file']} | {row['build']} | {_cell(row)} | {_where(row)} |")
    lines += ["", "History: until commit 3ac064d the export's window reorder moved the channel axis in a rank-6 "
              "Transpose; rknn-toolkit2 " + version + " rewrote it into its `exWindow` followed by a plain Reshape, "
              "mixing windows and channels without an error or a warning (fp16, int8 and hybrid builds: 1.4 to 1.7 "
              "max |diff| / max |ref|, centered cosine about 0, while onnxruntime was exact; the first divergence "
              "was the first RMSNorm in rknn's `accuracy_analysis`). The export now moves the channels last "
              "first and no later Transpose moves the last axis (tests/test_imagein.py pins that form); rknn then "
              "places every op on the NPU. The image-in Gather form (252x364) ran within fp16 error then too "
              "(8.1e-4 against onnxruntime on a random image, checked by hand)."]
    for row in results.get("3b", []):
        lines += ["", "3b (random weights), image-in nchw 448x448, rknn fp16 build + simulator: "
                  + (f"fails: {row['error']}" if "error" in row else
                     f"built and ran; peak RSS of the rknn process {row['peak_rss_gb']:.1f} GB ({row['free_gb_before']:.1f} GB "
                     f"free before); on astronaut against onnxruntime fp32 on the same file: max |diff| / max |ref| "
                     f"{row['rel']:.2e}, centered cosine {row['ccos']:.5f}; ops NPU / CPU {_where(row)}") + "."]
    lines += ["", "Reproduce: `scripts/imagein-proof` (about 10 minutes on 2 cores), `scripts/imagein-proof --3b` "
              "(once; stopped when the machine has under " + f"{MIN_FREE_GB:.0f} GB free).", "", MARK_END]
    block, text = "\n".join(lines), path.read_text() if path.exists() else ""
    ours = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), re.S)   # the rest is kept verbatim
    path.write_text(ours.sub(lambda _: block, text, count=1) if ours.search(text) else f"{text.rstrip()}\n\n{block}\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--prep3b", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--3b", dest="big", action="store_true", help="the 3b image-in fp16 build instead (once)")
    ap.add_argument("--output", type=Path, default=ROOT / "COMPAT.md")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    if a.prep3b:
        prep_3b(a.prep3b)
        return 0
    from compat_catalog import CLIENTS
    from harness.venv import make_venv
    make_venv(CLIENTS["rknn"].venv, "rknn")
    results = WORK / "results.json"
    for p in WORK.glob("*") if WORK.exists() else ():
        if p.is_dir() and (a.big == (p.name == "3b")):
            shutil.rmtree(p)
    WORK.mkdir(parents=True, exist_ok=True)
    rows = big(a) if a.big else tiny(a)
    kept = json.loads(results.read_text()) if results.exists() else {}   # the other run's rows, read now
    kept["3b" if a.big else "tiny"] = rows
    results.write_text(json.dumps(kept, indent=1, default=str))
    write_section(a.output, kept)
    return 0


if __name__ == "__main__":
    sys.exit(main())
