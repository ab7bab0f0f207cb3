"""run: one pipeline from a checkpoint (or random init, or an existing export) to deployable files.

Passes compose in one process on weightless values: the fp32 export is written once (it is the
reference of the final comparison), every later pass hands its value to the next without writing
an intermediate file, and only the final result is written (a model, or the parts of a split,
which must be the last pass). The run ends with a comparison of the result against the fp32
export, judged as the passes declare (:class:`~qvl_surgery.core.passbase.Judgement`: fp16 under
emulation, quantized results with their own tolerances), written to DIR/compare.json.

Everything is written into a hidden folder beside DIR and renamed into place at the end: an
interrupted or failed run leaves nothing, and ``force`` replaces an earlier run's folder whole.

Pass specs: ``attention``, ``attention:mode=mha``, ``fp16:keep_silu_fp32``,
``fp16:keep_silu_fp32+keep_rmsnorm_fp32``, ``split:parts=3``; joined with commas. A recipe file
(JSON) says the same: ``{"source": {"random_init": "3b", "seed": 0}, "image_size": "448x448",
"passes": [{"pass": "attention"}, {"pass": "fp16", "keep_silu_fp32": true}, {"pass": "split", "parts": 3}]}``.
This module is the app layer: it imports the passes' registry; the core never does.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from passes import parse_spec, spec_from_dict

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.passbase import Context, Judgement, Pass, Sequential
from qvl_surgery.core.publish import MARKER, check_new_dir

log = logging.getLogger(__name__)

RUN_FILES = ("summary.json", "compare.json")   # a folder holding one of these was written by run
DYNAMIC_COMPARE_SIZES = "448x448,252x364"


RECIPE_KEYS = {"source", "image_size", "passes"}
RECIPE_SOURCE_KEYS = {"checkpoint", "model", "random_init", "seed", "dynamic"}


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
    unknown = sorted(set(doc) - RECIPE_KEYS)
    if unknown:
        raise BadInput(f"{path}: unknown recipe key {unknown[0]!r} (known: {', '.join(sorted(RECIPE_KEYS))})")
    source = doc.get("source", {})
    if not isinstance(source, dict) or set(source) - RECIPE_SOURCE_KEYS:
        bad = sorted(set(source) - RECIPE_SOURCE_KEYS) if isinstance(source, dict) else [str(source)]
        raise BadInput(f"{path}: unknown source key {bad[0]!r} (a source is an object with one of "
                       f"{', '.join(sorted(RECIPE_SOURCE_KEYS))})")
    doc["passes"] = spec_from_dict(doc.get("passes", []), str(path))
    return doc


def resolve_run(*, recipe: str | Path | None = None, passes: str | None = None, source: Path | None = None,
                random_init: str | None = None, seed: int = 0, image_size: str | None = None,
                dynamic: str | None = None) -> tuple[dict, str | None, list[Pass]]:
    """``run``'s source, image size and passes, from a recipe and/or the command line (each given
    once): the source as a dict (``checkpoint``, ``model``, or ``random_init`` and ``seed``, and
    ``dynamic``), the image size, the passes."""
    src: dict = {}
    specs = None
    if recipe:
        doc = read_recipe(recipe)
        src = dict(doc.get("source", {}))
        if image_size is not None and "image_size" in doc:
            raise BadInput("{image_size}: the recipe sets image_size too; give it once", image_size=image_size)
        image_size = doc.get("image_size", image_size)
        specs = doc["passes"]
    if passes:
        if specs:
            raise BadInput("{passes}: the recipe lists passes too; give them once", passes=passes)
        specs = parse_passes(passes)
    if not specs:
        raise BadInput("run: give --passes or --recipe")
    given = [x for x in (random_init, source) if x is not None]
    if given and src:
        raise BadInput(f"run: the recipe names its source ({json.dumps(src)}) and the command line another; "
                       "give the source once")
    if len(given) > 1:
        raise BadInput("run: give a SOURCE or {random_init}, not both", random_init="PRESET")
    if random_init:
        src = {"random_init": random_init, "seed": seed}
    elif source is not None:
        src = {"model": source} if Path(source).suffix == ".onnx" else {"checkpoint": source}
    if dynamic:
        src["dynamic"] = dynamic
    if not src:
        raise BadInput("run: give a SOURCE (checkpoint directory or .onnx export) or --random-init PRESET")
    return src, image_size, specs


def weights_of(source: dict):
    """The weights of a source dict (``checkpoint``, or ``random_init``, ``seed`` and ``stand_in``)."""
    from qvl_surgery.core.config import preset
    from qvl_surgery.core.weights import STAND_INS, CheckpointWeights
    if source.get("checkpoint") is not None:
        return CheckpointWeights(source["checkpoint"])
    return STAND_INS[source.get("stand_in") or "random"](preset(source["random_init"]), int(source.get("seed", 0)))


def weights_script(source: dict) -> list[str]:
    """:func:`weights_of` in Python (``--gen-script``): ``weights = ...``."""
    if source.get("checkpoint"):
        return ["from qvl_surgery.core.weights import CheckpointWeights",
                f"weights = CheckpointWeights({str(source['checkpoint'])!r})"]
    if source.get("stand_in"):
        return ["from qvl_surgery.core.config import preset", "from qvl_surgery.core.weights import STAND_INS",
                f"weights = STAND_INS[{source['stand_in']!r}](preset({source['random_init']!r}), "
                f"{int(source.get('seed', 0))})"]
    return ["from qvl_surgery.core.config import preset", "from qvl_surgery.core.weights import RandomWeights",
            f"weights = RandomWeights(preset({source['random_init']!r}), seed={int(source.get('seed', 0))})"]


def judgement_of(specs: list[Pass]) -> Judgement:
    """How the chain's result is judged: its loosest pass."""
    return Judgement.loosest([p.judgement for p in specs])


# ----------------------------------------------------------------------------- --gen-script

def gen_script(*, source: dict, specs: list[Pass], output: Path, image_size: str | None = None,
               single_file: bool = False, force: bool = False, compare: bool = False) -> str:
    """The Python API calls equivalent to a command line: ``run`` (export or an existing export,
    the passes, the result, the comparison) and every pass subcommand (``source`` {"model": path}
    or {"split": path}, no comparison). One generator for both: each pass prints itself
    (:meth:`Pass.call_source`), reading and writing go through :mod:`qvl_surgery.core.values`."""
    lines = ["import tempfile", "from pathlib import Path", "",
             "from qvl_surgery.core.passbase import Context",
             "from qvl_surgery.core.values import read_value, write_value"]
    lines += sorted({p.call_source()[0] for p in specs}) + [""]
    reference = None
    if "model" in source or "split" in source:
        src = Path(source.get("model") or source.get("split"))
        reference = src if "model" in source else None
        lines.append(f"value = read_value({str(src)!r}).value")
    else:
        reference = Path(output) / "model.fp32.onnx"
        lines += weights_script(source)
        if source.get("dynamic"):
            lines += ["from qvl_surgery.core.dynamic import build_dynamic_encoder",
                      f"value = build_dynamic_encoder(weights.cfg, weights, host_inputs={source['dynamic'] == 'host'})"]
        else:
            lines += ["from qvl_surgery.core.config import check_image_size, parse_image_size",
                      "from qvl_surgery.core.export import build_encoder",
                      "value = build_encoder(weights.cfg, weights, check_image_size(weights.cfg, "
                      f"parse_image_size({image_size or '448x448'!r})))"]
        lines += [f"print('\\n'.join(write_value(value, {str(reference)!r}, overwrite=True)))   # the reference",
                  f"value = read_value({str(reference)!r}).value"]
    result = Path(output)
    if compare:
        result = result / ("parts" if specs[-1].gives == "split" else "model.onnx")
    ref_arg = f"Path({str(reference)!r})" if reference else "None"
    lines += ["with tempfile.TemporaryDirectory() as work:   # scratch space a pass may need until the result is written",
              f"    context = Context(reference={ref_arg}, workdir=Path(work))"]
    for p in specs:
        lines += [f"    result = {p.call_source()[1]}(value, context)",
                  "    print('\\n'.join(result.report.lines()))",
                  "    value = result.value"]
    extra = (", overwrite=True" if force or compare else "") + (", single_file=True" if single_file else "")
    lines.append(f"    print('\\n'.join(write_value(value, {str(result)!r}{extra})))")
    if compare:
        j = judgement_of(specs)
        lines += ["", "from qvl_surgery.analysis.compare import compare", "from qvl_surgery.core.inputs import load_inputs",
                  f"feeds = load_inputs({str(reference)!r}, seed=0"
                  + (f", image_size={(image_size or DYNAMIC_COMPARE_SIZES)!r}" if source.get("dynamic") else "") + ")",
                  f"report = compare({str(reference)!r}, {str(result)!r}, feeds=feeds, emulate_fp16="
                  f"{bool(j.emulate)}, atol={j.atol}, rtol={j.rtol}, min_cosine={j.min_cosine}, "
                  f"min_centered_cosine={j.min_centered_cosine})",
                  "print('\\n'.join(report.lines()))"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- run

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
        out.append(f"{'artifact':<28} {'files':>5} {'size GB':>8} {'max abs':>10} {'cosine':>9} {'centered':>9} "
                   f"{'ORT s':>7}")
        for row in self.table:
            out.append(f"{row['artifact']:<28} {row['files']:>5} {row['size_gb']:>8.3f} "
                       f"{_fmt(row.get('max_abs')):>10} {_fmt(row.get('cosine'), 6):>9} "
                       f"{_fmt(row.get('centered_cosine'), 6):>9} {_fmt(row.get('ort_s'), 2):>7}")
        verdict = "PASSED" if self.compare.get("passed") else "FAILED: " + "; ".join(self.compare.get("reasons", []))
        out.append(f"comparison against the fp32 export: {verdict} (written to {self.out_dir / 'compare.json'})")
        return out


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if digits != 3 else f"{v:.3e}"


def _files(path: Path) -> tuple[int, int]:
    if path.is_dir():
        fs = [p for p in path.iterdir() if p.is_file() and p.name != MARKER]
    else:
        fs = [path, path.with_name(path.name + ".data")]
    fs = [f for f in fs if f.exists()]
    return len(fs), sum(f.stat().st_size for f in fs)


def _latency(path: Path, feeds: dict) -> float | None:
    from qvl_surgery.core.manifest import is_manifest_path
    from qvl_surgery.core.runners import ort_session, run_chain
    from qvl_surgery.core.signature import signature
    if is_manifest_path(path):
        run_chain(path, feeds)
        t = time.perf_counter()
        run_chain(path, feeds)
        return time.perf_counter() - t
    try:
        sess = ort_session(path)
    except Exception as e:  # a file onnxruntime's CPU provider cannot run (bf16): the comparison said so
        log.info("no onnxruntime latency for %s: %s", path, e)
        return None
    x = signature(path).cast(feeds)
    sess.run(None, x)
    t = time.perf_counter()
    sess.run(None, x)
    return time.perf_counter() - t


def _preflight(specs: list[Pass], facts: dict) -> None:
    for p in specs:
        p.preflight(facts)


def run_pipeline(*, out_dir: str | Path, specs: list[Pass], checkpoint: str | Path | None = None,
                 random_init: str | None = None, seed: int = 0, model: str | Path | None = None,
                 image_size: str | None = None, dynamic: str | None = None, force: bool = False,
                 progress: bool = True, latency: bool = True, single_file: bool = False) -> RunResult:
    """Export (static at ``image_size``, or ``dynamic`` "self"/"host") or take an fp32 export, run
    the passes, write the result, compare it with the export. For a dynamic model ``image_size``
    lists the sizes of the comparison's images (one call, default 448x448,252x364). ``single_file``:
    the result as one self-contained .onnx (not with split)."""
    from qvl_surgery.analysis.compare import compare
    from qvl_surgery.core.config import check_image_size, parse_image_size
    from qvl_surgery.core.export import build_encoder
    from qvl_surgery.core.inputs import load_inputs
    from qvl_surgery.core.publish import publish_dir, staging
    from qvl_surgery.core.values import check_output, read_value, write_value

    out_dir = Path(out_dir)
    given = sum(x is not None for x in (checkpoint, random_init, model))
    if given != 1:
        raise BadInput("run: give exactly one source: a checkpoint directory, {random_init}, or an .onnx export",
                       random_init="PRESET")
    chain = Sequential(specs)
    if specs[-1].gives == "split" and single_file:
        check_output("split", out_dir / "parts", single_file=single_file)   # refuses --single-file
    judge = judgement_of(specs)
    source_files: list[Path] = []
    loaded = None
    if model is not None:
        loaded = read_value(model, "model")
        meta = loaded.value.metadata()
        if meta.get("qvl_surgery.dtype", "float32") != "float32":
            raise BadInput(f"{model}: run needs the fp32 export as its source (it is the reference of the comparison)")
        if dynamic:
            raise BadInput("{dynamic}: " + f"{model} is already an export; --dynamic chooses what to export from a "
                           "checkpoint (drop it, or export from the checkpoint)", dynamic=dynamic)
        if image_size and not meta.get("qvl_surgery.dynamic"):
            raise BadInput("{image_size}: " + f"{model} is a static export of one size "
                           f"({meta.get('qvl_surgery.image_size', '?')}); the size is chosen at export", image_size=image_size)
        source_files = loaded.files
        facts = {"dynamic": meta.get("qvl_surgery.dynamic")}
    else:
        facts = {"dynamic": dynamic}
        if checkpoint is not None:
            source_files = [Path(checkpoint)]
    check_new_dir(out_dir, overwrite=force, inputs=source_files, own_files=RUN_FILES)
    _preflight(specs, facts)   # what the passes can refuse before the export runs
    reports: list[tuple[str, list[str]]] = []
    with staging(out_dir) as stage:
        if loaded is not None:
            reference = Path(model)
            current = loaded.value
            final_reference = reference
        else:
            weights = weights_of({"checkpoint": checkpoint, "random_init": random_init, "seed": seed})
            if dynamic:
                from qvl_surgery.core.dynamic import build_dynamic_encoder
                exported = build_dynamic_encoder(weights.cfg, weights, host_inputs=dynamic == "host")
            else:
                size = check_image_size(weights.cfg, parse_image_size(image_size or "448x448"))
                exported = build_encoder(weights.cfg, weights, size)
            reference = stage / "model.fp32.onnx"
            final_reference = out_dir / "model.fp32.onnx"
            write_value(exported, reference, progress=progress)
            reports.append(("export", [f"exported {final_reference} ({weights.description})"]))
            current = read_value(reference, "model").value
        with staging(stage / "work") as work:
            context = Context(reference=reference, progress=progress, workdir=work)
            current, _ = chain(current, context, on_report=lambda p, r: reports.append((p.text(), r.lines())))
            name = "parts" if specs[-1].gives == "split" else "model.onnx"
            result = stage / name
            write_value(current, result, progress=progress, single_file=single_file, inputs=source_files)
            reports.append(("write", [f"wrote {out_dir / name}"]))
        is_dynamic = bool(facts.get("dynamic"))
        feeds = load_inputs(reference, seed=0, image_size=(image_size or DYNAMIC_COMPARE_SIZES) if is_dynamic else None)
        cmp = compare(reference, result, feeds=feeds, emulate_fp16=bool(judge.emulate), atol=judge.atol,
                      rtol=judge.rtol, min_cosine=judge.min_cosine, min_centered_cosine=judge.min_centered_cosine)
        cmp.ref_name, cmp.cand_name = str(final_reference), cmp.cand_name.replace(str(result), str(out_dir / name))
        table = []
        for label, path, final, stats in (("fp32 export (reference)", reference, final_reference, None),
                                          (f"result ({judge.label}{', emulated' if judge.emulate else ''})", result,
                                           out_dir / name, cmp.outputs[0])):
            n, size_b = _files(path)
            table.append({"artifact": label, "path": str(final), "files": n, "size_gb": size_b / 1e9,
                          "max_abs": stats.max_abs if stats else None, "cosine": stats.cosine if stats else None,
                          "centered_cosine": stats.centered_cosine if stats else None,
                          "ort_s": _latency(path, feeds) if latency else None})
        (stage / "compare.json").write_text(json.dumps(cmp.to_dict(), indent=1))
        (stage / "summary.json").write_text(json.dumps({"table": table, "compare": cmp.to_dict(),
                                                        "passes": [s.text() for s in specs]}, indent=1))
        publish_dir(stage, out_dir, "run")
    return RunResult(out_dir, final_reference, out_dir / name, reports, cmp.to_dict(), table)
