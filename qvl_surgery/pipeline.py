"""run: one pipeline from a checkpoint (or random init, or an existing export) to deployable files.

Passes compose in one process on weightless models: the fp32 export is written once (it is the
reference of the final comparison), every later pass hands its Model to the next without
writing an intermediate file, and only the final result is written (a model, or the parts of a
split, which must be the last pass). The run ends with a comparison of the result against the
fp32 export (under fp16 emulation where the result is fp16), written to DIR/compare.json.

Pass specs: ``attention``, ``attention:mode=mha``, ``fp16:keep_silu_fp32``,
``fp16:keep_silu_fp32+keep_rmsnorm_fp32``, ``split:parts=3``; joined with commas. A recipe file
(JSON) says the same: ``{"source": {"random_init": "3b", "seed": 0}, "image_size": "448x448",
"passes": [{"pass": "attention"}, {"pass": "fp16", "keep_silu_fp32": true}, {"pass": "split", "parts": 3}]}``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInput

log = logging.getLogger(__name__)

# pass name -> {option: (type, python keyword)}
PASS_OPTIONS: dict[str, dict[str, tuple[type, str]]] = {
    "attention": {"mode": (str, "mode"), "upgrade_opset": (bool, "upgrade_opset"),
                  "full_chunk_mb": (float, "full_chunk_mb")},
    "fp16": {"keep_silu_fp32": (bool, "keep_silu"), "keep_rmsnorm_fp32": (bool, "keep_rmsnorm"),
             "keep_op": (list, "keep_ops"), "keep_node": (list, "keep_nodes"), "keep_io_types": (bool, "keep_io_types"),
             "calibrate": (str, "calibrate")},
    "split": {"parts": (int, "parts"), "at": (list, "at"), "max_part_bytes": (float, "max_part_bytes")},
}


@dataclass
class PassSpec:
    name: str
    options: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        """The options as the pass function's keyword arguments."""
        return {PASS_OPTIONS[self.name][k][1]: v for k, v in self.options.items()}

    def text(self) -> str:
        if not self.options:
            return self.name
        opts = []
        for k, v in self.options.items():
            opts.append(k if v is True else f"{k}={'|'.join(v) if isinstance(v, list) else v}")
        return self.name + ":" + "+".join(opts)


def _coerce(pass_name: str, key: str, value) -> tuple[str, object]:
    table = PASS_OPTIONS[pass_name]
    if key not in table:
        raise BadInput(f"pass {pass_name}: unknown option {key!r} (known: {', '.join(table)})")
    typ, kw = table[key]
    try:
        if typ is bool:
            v = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "")
        elif typ is list:
            v = value if isinstance(value, list) else [x for x in str(value).split("|") if x]
        elif typ is float:
            v = int(float(value))
        else:
            v = typ(value)
    except ValueError:
        raise BadInput(f"pass {pass_name}: option {key}={value!r} is not a {typ.__name__}") from None
    return key, v


def parse_passes(text: str) -> list[PassSpec]:
    specs = []
    for item in [p.strip() for p in text.split(",") if p.strip()]:
        name, _, rest = item.partition(":")
        if name not in PASS_OPTIONS:
            raise BadInput(f"--passes: unknown pass {name!r} (known: {', '.join(PASS_OPTIONS)})")
        opts = {}
        for o in [o for o in rest.replace(":", "+").split("+") if o]:
            k, _, v = o.partition("=")
            k, val = _coerce(name, k, v if "=" in o else True)
            opts[k] = val
        specs.append(PassSpec(name, opts))
    _check_order(specs)
    return specs


def _check_order(specs: list[PassSpec]) -> None:
    if not specs:
        raise BadInput("--passes: no pass given (e.g. attention,fp16:keep_silu_fp32,split:parts=3)")
    for s in specs[:-1]:
        if s.name == "split":
            raise BadInput("--passes: split must be the last pass (it writes the parts)")


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable JSON recipe ({e})") from None
    specs = []
    for p in doc.get("passes", []):
        p = dict(p)
        name = p.pop("pass", None)
        if name not in PASS_OPTIONS:
            raise BadInput(f"{path}: unknown pass {name!r} (known: {', '.join(PASS_OPTIONS)})")
        specs.append(PassSpec(name, dict(_coerce(name, k, v) for k, v in p.items())))
    _check_order(specs)
    doc["passes"] = specs
    return doc


@dataclass
class RunResult:
    out_dir: Path
    reference: Path
    result: Path
    reports: list[tuple[str, list[str]]]
    compare: dict
    table: list[dict]

    def lines(self) -> list[str]:
        out = []
        for name, lines in self.reports:
            out += lines
        out.append("")
        out.append(f"{'artifact':<28} {'files':>5} {'size GB':>8} {'max abs':>10} {'cosine':>9} {'ORT s':>7}")
        for row in self.table:
            out.append(f"{row['artifact']:<28} {row['files']:>5} {row['size_gb']:>8.3f} "
                       f"{_fmt(row.get('max_abs')):>10} {_fmt(row.get('cosine'), 6):>9} {_fmt(row.get('ort_s'), 2):>7}")
        verdict = "PASSED" if self.compare.get("passed") else "FAILED: " + "; ".join(self.compare.get("reasons", []))
        out.append(f"comparison against the fp32 export: {verdict} (written to {self.out_dir / 'compare.json'})")
        return out


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if digits != 3 else f"{v:.3e}"


def _files(path: Path) -> tuple[int, int]:
    if path.is_dir():
        fs = [p for p in path.iterdir() if p.is_file()]
    else:
        fs = [path, path.with_name(path.name + ".data")]
    fs = [f for f in fs if f.exists()]
    return len(fs), sum(f.stat().st_size for f in fs)


def _latency(path: Path, feeds: dict) -> float:
    from .manifest import is_manifest_path
    from .runners import run_chain, ort_session
    if is_manifest_path(path):
        run_chain(path, feeds)
        t = time.perf_counter()
        run_chain(path, feeds)
        return time.perf_counter() - t
    sess = ort_session(path)
    inp = sess.get_inputs()[0]
    x = feeds[inp.name].astype(np.float16 if "float16" in inp.type else np.float32)
    sess.run(None, {inp.name: x})
    t = time.perf_counter()
    sess.run(None, {inp.name: x})
    return time.perf_counter() - t


def gen_script(source: dict, image_size: str, specs: list[PassSpec], out_dir: Path) -> str:
    """The Python API calls equivalent to a run."""
    lines = ["from qvl_surgery.config import PRESETS, parse_image_size",
             "from qvl_surgery.weights import CheckpointWeights, RandomWeights",
             "from qvl_surgery.export import build_encoder",
             "from qvl_surgery.modelfile import load_model, save_model", ""]
    if source.get("model"):
        lines.append(f"model = load_model({str(source['model'])!r})")
    else:
        if source.get("checkpoint"):
            lines.append(f"weights = CheckpointWeights({str(source['checkpoint'])!r})")
        else:
            lines.append(f"weights = RandomWeights(PRESETS[{source['random_init']!r}], seed={source.get('seed', 0)})")
        lines.append(f"model = build_encoder(weights.cfg, weights, parse_image_size({image_size!r}))")
        lines.append(f"save_model(model, {str(out_dir / 'model.fp32.onnx')!r})   # the reference")
    for s in specs:
        kw = s.kwargs()
        args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        if s.name == "attention":
            lines += ["from passes.attention import rewrite_attention",
                      f"model, report = rewrite_attention(model{', ' + args if args else ''})"]
        elif s.name == "fp16":
            cal = kw.pop("calibrate", None)
            if cal:
                lines += ["from qvl_surgery.calibrate import calibrate, calibration_inputs",
                          f"cal = calibrate(REF, calibration_inputs(REF, {cal!r}))"]
                kw["keep_calibrated"] = "@cal.keep"
            args = ", ".join(f"{k}={'cal.keep' if v == '@cal.keep' else repr(v)}" for k, v in kw.items())
            lines += ["from passes.fp16 import convert_fp16", f"model, report = convert_fp16(model, {args})"]
        elif s.name == "split":
            lines += ["from passes.split import split", f"split(model, {str(out_dir / 'parts')!r}, {args})"]
    if specs[-1].name != "split":
        lines.append(f"save_model(model, {str(out_dir / 'model.onnx')!r})")
    return "\n".join(l.replace("REF", repr(str(out_dir / "model.fp32.onnx"))) for l in lines)


def run_pipeline(*, out_dir: str | Path, specs: list[PassSpec], checkpoint: str | Path | None = None,
                 random_init: str | None = None, seed: int = 0, model: str | Path | None = None,
                 image_size: str = "448x448", force: bool = False, progress: bool = True,
                 latency: bool = True) -> RunResult:
    from passes.attention import rewrite_attention
    from passes.fp16 import convert_fp16
    from passes.split import split
    from .compare import compare, load_inputs
    from .config import check_image_size, parse_image_size, preset
    from .export import build_encoder
    from .modelfile import load_model, save_model
    from .weights import CheckpointWeights, RandomWeights

    out_dir = Path(out_dir)
    given = sum(x is not None for x in (checkpoint, random_init, model))
    if given != 1:
        raise BadInput("run: give exactly one SOURCE: a checkpoint directory, --random-init PRESET, or an .onnx export")
    _check_order(specs)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise BadInput(f"{out_dir}: exists and is not empty; pass --force to write into it")
    out_dir.mkdir(parents=True, exist_ok=True)
    reports: list[tuple[str, list[str]]] = []
    if model is not None:
        reference = Path(model)
        current = load_model(reference)
        if current.metadata().get("qvl_surgery.dtype", "float32") != "float32":
            raise BadInput(f"{reference}: run needs the fp32 export as SOURCE (it is the reference of the comparison)")
    else:
        weights = CheckpointWeights(checkpoint) if checkpoint is not None else RandomWeights(preset(random_init), seed)
        size = check_image_size(weights.cfg, parse_image_size(image_size))
        reference = out_dir / "model.fp32.onnx"
        save_model(build_encoder(weights.cfg, weights, size), reference, progress="export" if progress else None,
                   overwrite=force)
        reports.append(("export", [f"exported {reference} ({weights.description})"]))
        current = load_model(reference)
    for spec in specs:
        kw = spec.kwargs()
        if spec.name == "attention":
            current, rep = rewrite_attention(current, **kw)
            reports.append((spec.text(), rep.lines()))
        elif spec.name == "fp16":
            cal = kw.pop("calibrate", None)
            if cal:
                from .calibrate import calibrate, calibration_inputs
                c = calibrate(reference, calibration_inputs(reference, cal))
                reports.append(("calibrate", c.lines()))
                kw["keep_calibrated"] = c.keep
            current, rep = convert_fp16(current, **kw)
            reports.append((spec.text(), rep.lines()))
    last = specs[-1]
    if last.name == "split":
        kw = last.kwargs()
        result = out_dir / "parts"
        rep = split(current, result, force=force, progress=progress, **kw)
        reports.append((last.text(), rep.lines()))
    else:
        result = out_dir / "model.onnx"
        save_model(current, result, progress="write" if progress else None, overwrite=force)
        # the fp16 report's clamp counts are filled while writing, so it is printed after
        reports.append(("write", [f"wrote {result}"]))
    fp16 = current.metadata().get("qvl_surgery.dtype") == "float16"
    feeds = load_inputs(reference, seed=0)
    cmp = compare(reference, result, feeds=feeds, emulate_fp16=fp16, atol=5e-2 if fp16 else 1e-4,
                  rtol=5e-2 if fp16 else 1e-4, min_cosine=0.999 if fp16 else 0.99999)
    (out_dir / "compare.json").write_text(json.dumps(cmp.to_dict(), indent=1))
    table = []
    for label, path, stats in (("fp32 export (reference)", reference, None),
                               (f"result ({'fp16, emulated' if fp16 else 'fp32'})", result, cmp.outputs[0])):
        n, size_b = _files(path)
        row = {"artifact": label, "path": str(path), "files": n, "size_gb": size_b / 1e9,
               "max_abs": stats.max_abs if stats else None, "cosine": stats.cosine if stats else None,
               "ort_s": _latency(path, feeds) if latency else None}
        table.append(row)
    (out_dir / "summary.json").write_text(json.dumps({"table": table, "compare": cmp.to_dict(),
                                                      "passes": [s.text() for s in specs]}, indent=1))
    return RunResult(out_dir, reference, result, reports, cmp.to_dict(), table)
