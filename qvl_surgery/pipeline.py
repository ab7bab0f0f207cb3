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
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput
from .passbase import Context, Pass, Sequential, parse_spec, spec_from_dict

log = logging.getLogger(__name__)


def parse_passes(text: str) -> list[Pass]:
    """``--passes`` text, e.g. ``attention,fp16:keep_silu_fp32,split:parts=3`` (options from each pass's spec)."""
    return parse_spec(text)


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable JSON recipe ({e})") from None
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: a recipe is a JSON object with source, image_size and passes")
    doc["passes"] = spec_from_dict(doc.get("passes", []), str(path))
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
    from .runners import cast_feeds, run_chain, ort_session
    if is_manifest_path(path):
        run_chain(path, feeds)
        t = time.perf_counter()
        run_chain(path, feeds)
        return time.perf_counter() - t
    sess = ort_session(path)
    x = cast_feeds(sess, feeds)
    sess.run(None, x)
    t = time.perf_counter()
    sess.run(None, x)
    return time.perf_counter() - t


def gen_script(source: dict, image_size: str, specs: list[Pass], out_dir: Path) -> str:
    """The Python API calls equivalent to a run (each pass prints its own call: Pass.call_source)."""
    reference = out_dir / "model.fp32.onnx"
    lines = ["from qvl_surgery.config import PRESETS, parse_image_size",
             "from qvl_surgery.weights import CheckpointWeights, RandomWeights",
             "from qvl_surgery.export import build_encoder",
             "from qvl_surgery.modelfile import load_model, save_model", ""]
    if source.get("model"):
        reference = Path(source["model"])
        lines.append(f"model = load_model({str(reference)!r})")
    else:
        if source.get("checkpoint"):
            lines.append(f"weights = CheckpointWeights({str(source['checkpoint'])!r})")
        else:
            lines.append(f"weights = RandomWeights(PRESETS[{source['random_init']!r}], seed={source.get('seed', 0)})")
        if source.get("dynamic"):
            lines += ["from qvl_surgery.dynamic import build_dynamic_encoder",
                      f"model = build_dynamic_encoder(weights.cfg, weights, host_inputs={source['dynamic'] == 'host'})"]
        else:
            lines.append(f"model = build_encoder(weights.cfg, weights, parse_image_size({image_size or '448x448'!r}))")
        lines.append(f"save_model(model, {str(reference)!r}, overwrite=True)   # the reference")
    for k, p in enumerate(specs):
        if p.gives == "split" and k == len(specs) - 1:  # split ends the run: it writes the parts
            args = "".join(f", {p.option(n).param}={v!r}" for n, v in p.values.items())
            lines += ["from passes.split import split",
                      f"report = split(model, {str(out_dir / 'parts')!r}{args}, force=True)"]
            continue
        lines += p.call_source("model" if k == 0 or specs[k - 1].gives == "model" else "parts")
    if specs[-1].gives == "model":
        lines.append(f"save_model(model, {str(out_dir / 'model.onnx')!r}, overwrite=True)")
    return "\n".join(line.replace("REFERENCE", repr(str(reference))) for line in lines)


DYNAMIC_COMPARE_SIZES = "448x448,252x364"


def run_pipeline(*, out_dir: str | Path, specs: list[Pass], checkpoint: str | Path | None = None,
                 random_init: str | None = None, seed: int = 0, model: str | Path | None = None,
                 image_size: str | None = None, dynamic: str | None = None, force: bool = False,
                 progress: bool = True, latency: bool = True, single_file: bool = False) -> RunResult:
    """Export (static at ``image_size``, or ``dynamic`` "self"/"host") or take an fp32 export, run
    the passes, write the result, compare it with the export. For a dynamic model ``image_size``
    lists the sizes of the comparison's images (one call, default 448x448,252x364). ``single_file``:
    the result (unless a split) as one self-contained .onnx."""
    from passes.split import save_split
    from .compare import compare, load_inputs
    from .config import check_image_size, parse_image_size, preset
    from .export import build_encoder
    from .modelfile import load_model, save_model
    from .publish import staging
    from .weights import CheckpointWeights, RandomWeights

    out_dir = Path(out_dir)
    given = sum(x is not None for x in (checkpoint, random_init, model))
    if given != 1:
        raise BadInput("run: give exactly one source: a checkpoint directory, {random_init}, or an .onnx export",
                       random_init="PRESET")
    chain = Sequential(specs)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise BadInput(f"{out_dir}: exists and is not empty; pass " + "{overwrite} to write into it",
                           overwrite=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports: list[tuple[str, list[str]]] = []
    if model is not None:
        reference = Path(model)
        current = load_model(reference)
        if current.metadata().get("qvl_surgery.dtype", "float32") != "float32":
            raise BadInput(f"{reference}: run needs the fp32 export as its source (it is the reference of the comparison)")
    else:
        weights = CheckpointWeights(checkpoint) if checkpoint is not None else RandomWeights(preset(random_init), seed)
        reference = out_dir / "model.fp32.onnx"
        if dynamic:
            from .dynamic import build_dynamic_encoder
            exported = build_dynamic_encoder(weights.cfg, weights, host_inputs=dynamic == "host")
        else:
            size = check_image_size(weights.cfg, parse_image_size(image_size or "448x448"))
            exported = build_encoder(weights.cfg, weights, size)
        save_model(exported, reference, progress="export" if progress else None, overwrite=force)
        reports.append(("export", [f"exported {reference} ({weights.description})"]))
        current = load_model(reference)
    with staging(out_dir / "work") as work:
        context = Context(reference=reference, progress=progress, workdir=work)
        current, _ = chain(current, context, on_report=lambda p, r: reports.append((p.text(), r.lines())))
        if specs[-1].gives == "split":
            result = out_dir / "parts"
            entries = save_split(current, result, overwrite=force, progress=progress)
            reports.append(("write", [f"wrote {result}/manifest.json and {len(entries)} parts"]))
            current = current.parts[-1].model
        else:
            result = out_dir / "model.onnx"
            save_model(current, result, progress="write" if progress else None, overwrite=force,
                       single_file=single_file)
            # the fp16 report's clamp counts are filled while writing, so they print after
            reports.append(("write", [f"wrote {result}"]))
    fp16 = current.metadata().get("qvl_surgery.dtype") == "float16"
    is_dynamic = bool(current.metadata().get("qvl_surgery.dynamic"))
    feeds = load_inputs(reference, seed=0, image_size=(image_size or DYNAMIC_COMPARE_SIZES) if is_dynamic else None)
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
