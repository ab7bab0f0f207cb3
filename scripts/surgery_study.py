"""Issue 26's surgery study on tiny: does smooth / rotate close the gap to the no-outlier twin on
outlier stand-ins of every shape?

Per stand-in (qvl_surgery.core.weights.STAND_INS, tiny, seed 0, 448x448) and its twin (the same
random weights without the outliers): W8A8 with nothing kept (``quantize --activations int8 --format
onnxruntime``, dynamic, and static calibrated on the same photos as the surgery) on the file as it is
(naive), after smooth, after rotate, after rotate then smooth; surgery and static ranges calibrated
on four photos (scikit-image's rocket, immunohistochemistry, retina, hubble_deep_field), judged on
three others (astronaut, coffee, chelsea): token-centered cosine against the stand-in's fp32
output, the mean over the three. The gap is the twin's W8A8 cosine minus the stand-in's.

    .venv/bin/python scripts/surgery_study.py                     # the table (about 2 min on 2 cores)
    .venv/bin/python scripts/surgery_study.py --modes dynamic,static,token   # per-token scales too
    .venv/bin/python scripts/surgery_study.py --kinds spike --sweep --variants naive,smooth
                                               # shapes off the named ones (SWEEP: keywords of the stand-ins)
    .venv/bin/python scripts/surgery_study.py --diagnose spike    # per linear input, after smooth

``--diagnose`` lists, per linear input of the smoothed stand-in beside the twin's, the local int8
error (per-tensor activations, per-channel weights, on the judged photos, relative to the centered
output), the largest channel max over the median one (outlier channels left), and the share of the
input's energy in its mean over tokens (a constant offset left).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from photos import CALIB, JUDGE, save_photos

VARIANTS = ("naive", "smooth", "rotate", "rotate+smooth")
MODES = ("dynamic", "static")        # "token" too with --modes: dynamic, one scale per token
SMOOTHED = ("smooth", "rotate+smooth")   # what the gap is judged on


class Study:
    def __init__(self, work: Path):
        self.work = work
        self.photos = dict(zip(CALIB + JUDGE, save_photos(work, CALIB + JUDGE)))
        self.calib = ",".join(str(self.photos[n]) for n in CALIB)

    def export(self, kind: str) -> Path:
        from qvl_surgery.core.config import PRESETS
        from qvl_surgery.core.export import export
        from qvl_surgery.core.weights import STAND_INS
        out = self.work / f"{kind}.onnx"
        if not out.exists():
            export(STAND_INS[kind](PRESETS["tiny"], 0), out, (448, 448), progress=False)
        return out

    def feeds(self, src: Path) -> list[dict]:
        from qvl_surgery.core.inputs import load_inputs
        return [load_inputs(src, image=str(self.photos[n])) for n in JUDGE]

    def surgered(self, src: Path, how: str) -> Path:
        from passes.rotate import rotate_model
        from passes.smooth import smooth_model
        from qvl_surgery.core.modelfile import load_model
        from qvl_surgery.core.values import write_value
        if how == "naive":
            return src
        out = src.with_name(f"{src.stem}.{how.replace('+', '_')}.onnx")
        if not out.exists():
            model, prev = load_model(src), src
            for k, step in enumerate(how.split("+")):
                model = (rotate_model(model) if step == "rotate" else smooth_model(model, calibrate=self.calib))[0]
                prev = out.with_suffix(f".{k}.onnx") if k < how.count("+") else out
                write_value(model, prev)
                model = load_model(prev)
        return out

    def w8a8(self, path: Path, mode: str) -> Path:
        from passes.quantize import quantize_model
        from qvl_surgery.core.modelfile import load_model
        from qvl_surgery.core.values import write_value
        out = path.with_name(f"{path.stem}.w8a8_{mode}.onnx")
        if not out.exists():
            extra = {"static": {"calibrate": self.calib}, "token": {"activation_scale": "token"}}.get(mode, {})
            q, _ = quantize_model(load_model(path), activations="int8", format="onnxruntime", **extra)
            write_value(q, out)
        return out

    def cosine(self, ref: Path, cand: Path) -> float:
        from qvl_surgery.core.metrics import centered_cosine
        from qvl_surgery.core.runners import run_model
        got = []
        for f in self.feeds(ref):
            a, b = (next(iter(run_model(p, f).values())) for p in (ref, cand))
            got.append(centered_cosine(a, b))
        return float(np.mean(got))

    def row(self, kind: str, variants=VARIANTS, modes=MODES) -> dict:
        src = self.export(kind)
        return {(v, m): self.cosine(src, self.w8a8(self.surgered(src, v), m)) for v in variants for m in modes}


def table(study: Study, kinds: list[str], modes=MODES, variants=VARIANTS) -> list[str]:
    from qvl_surgery.core.config import PRESETS
    from qvl_surgery.core.weights import STAND_INS
    twin = study.row("random", ("naive",), modes)
    lines = ["| stand-in | " + " | ".join(f"{v} {m}" for v in variants for m in modes)
             + " | gap to the twin (smooth or rotate+smooth, the better) |",
             "|---|" + "---:|" * (len(variants) * len(modes) + 1)]
    lines.append("| twin (random) | " + " | ".join(f"{twin[('naive', m)]:.5f}" if v == "naive" else ""
                                                    for v in variants for m in modes) + " | |")
    notes = []
    for kind in kinds:
        r = study.row(kind, variants, modes)
        gaps = {m: twin[("naive", m)] - max(r[(v, m)] for v in SMOOTHED if v in variants) for m in modes}
        lines.append(f"| {kind} | " + " | ".join(f"{r[(v, m)]:.5f}" for v in variants for m in modes)
                     + " | " + ", ".join(f"{m} {g:+.5f}" for m, g in gaps.items()) + " |")
        notes.append(f"- {kind}: {STAND_INS[kind](PRESETS['tiny'], 0).description}")
        print(lines[-1], flush=True)
    return lines + [""] + notes


def diagnose(study: Study, kind: str, how: str = "smooth") -> list[str]:
    """Per linear input of the surgered stand-in and of the twin (the same surgery): the local int8
    error, outlier channels and constant offset left."""
    from qvl_surgery.core.linears import find_linears
    from qvl_surgery.core.modelfile import load_model, read_initializer
    from qvl_surgery.core.segments import run_segments

    def per_input(path: Path) -> dict[str, tuple]:
        m = load_model(path)
        lins = find_linears(m, [])
        inits = m.initializers()
        xs: dict[str, list] = {}
        run_segments(m, study.feeds(path), {lin.x for lin in lins}, lambda n, v: xs.setdefault(n, []).append(v))
        out = {}
        for lin in lins:
            w = np.asarray(read_initializer(inits[lin.weight], m.sources.get(lin.weight)), np.float64)
            w = w if lin.out_in else w.T
            x = np.concatenate([v.reshape(-1, lin.k) for v in xs[lin.x]]).astype(np.float64)
            amax = np.abs(x).max()
            xq = np.clip(np.rint(x / amax * 127), -127, 127) * amax / 127
            sw = np.abs(w).max(axis=1, keepdims=True) / 127
            ref = x @ w.T
            err = np.linalg.norm(xq @ (np.rint(w / sw) * sw).T - ref) / np.linalg.norm(ref - ref.mean(0))
            cmax = np.abs(x).max(axis=0)
            offset = np.linalg.norm(x.mean(0)) ** 2 * len(x) / max((x ** 2).sum(), 1e-30)
            out[lin.name] = (err, cmax.max() / np.median(cmax), offset)
        return out

    got, ref = per_input(study.surgered(study.export(kind), how)), per_input(study.surgered(study.export("random"), how))
    lines = [f"{kind} after {how}, per linear input (twin after {how} beside it): local int8 error / centered "
             "output, max channel / median channel max, energy share of the mean over tokens",
             "| linear | error | twin | max/median | twin | offset share | twin |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (e, r, o) in got.items():
        te, tr, to = ref.get(name, (float("nan"),) * 3)
        lines.append(f"| {name} | {e:.4f} | {te:.4f} | {r:.1f} | {tr:.1f} | {o:.3f} | {to:.3f} |")
    return lines


SWEEP = {   # name: (class name, shape keywords); the class's own shape where not given
    "outlier@0x1": ("OutlierWeights", dict(onset=0, channels=1)),
    "outlier@3x8": ("OutlierWeights", dict(onset=3, channels=8)),
    "outlier-40ch": ("OutlierWeights", dict(channels=40, value=100.0)),
    "outlier-1e4-flat": ("OutlierWeights", dict(value=1e4, row_scale=1.0)),
    "outlier-varying": ("OutlierWeights", dict(value=100.0, row_scale=400.0)),
    "spike@0": ("SpikeWeights", dict(onset=0)),
    "spike@2x4-100": ("SpikeWeights", dict(onset=2, channels=4, value=100.0)),
    "proj-offset@0": ("ProjOffsetWeights", dict(onset=0, value=2000.0)),
}


def _sweep():
    """Register the sweep's shapes in STAND_INS (for this process) and name them."""
    import functools
    from qvl_surgery.core import weights
    for name, (cls, shape) in SWEEP.items():
        weights.STAND_INS[name] = functools.partial(getattr(weights, cls), **shape)
        yield name


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="outlier,late-outlier,offset,early-outlier,wide-outlier,huge-outlier,proj-offset,spike")
    ap.add_argument("--modes", default=",".join(MODES), help="dynamic, static, token (default dynamic,static)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--sweep", action="store_true", help="also shapes off the named ones (keywords of the stand-ins)")
    ap.add_argument("--diagnose", metavar="KIND", help="per linear input after smooth instead of the table")
    ap.add_argument("--how", default="smooth", help="the surgery --diagnose looks after (default smooth)")
    ap.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    a = ap.parse_args()
    swept = list(_sweep())   # registered, so that --diagnose takes their names too
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        study = Study(work)
        lines = diagnose(study, a.diagnose, a.how) if a.diagnose else table(study, a.kinds.split(",") + (swept if a.sweep else []),
                                                                 a.modes.split(","), a.variants.split(","))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
