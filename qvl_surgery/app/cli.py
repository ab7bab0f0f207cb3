"""``qvl-surgery``: a thin layer over the library. One function per subcommand maps its arguments
onto one library call and prints the report. Bad input: one line, exit 2. A failed tolerance: exit 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qvl_surgery import __version__
from qvl_surgery.core.errors import BadInput, QvlError

log = logging.getLogger("qvl_surgery")

# Examples of the commands that are not passes; a pass carries its own (Pass.example).
EXAMPLES = {
    "export": "qvl-surgery export ~/Qwen2.5-VL-3B-Instruct -o out/model.onnx --image-size 448x448\n"
              "  qvl-surgery export --random-init 3b --seed 0 -o out/model.onnx",
    "inspect": "qvl-surgery inspect out/model.onnx\n"
               "  qvl-surgery inspect out/model.onnx --activations --calibrate a.jpg,b.jpg",
    "sensitivity": "qvl-surgery sensitivity out/windowed.onnx out/smoothed.onnx out/rotated.onnx -o out/sens\n"
                   "  qvl-surgery sensitivity out/model.onnx -o out/sens --activations int8 --format qdq "
                   "--calibrate random:8 --per-linear",
    "toolchains": "qvl-surgery quantize out/smoothed.onnx -o out/q.onnx --activations int8 --format onnxruntime "
                  "--budget 0.9995\n"
                  "  qvl-surgery toolchains out/smoothed.onnx --keep-from out/q.onnx --dataset a.jpg,b.jpg -o out/configs\n"
                  "  qvl-surgery toolchains out/model.onnx --keep-node '/merger/*' -o out/configs",
    "run": "qvl-surgery run --random-init 3b -o out/run --passes attention,fp16:keep_silu_fp32,split:parts=3\n"
           "  qvl-surgery run -o out/run --recipe recipe.json   # source, image size and passes from the recipe",
    "package": "qvl-surgery package ~/Qwen2.5-VL-3B-Instruct --runtime onnxruntime-genai -o out/genai",
    "compare": "qvl-surgery compare out/model.onnx out/fp16.onnx --emulate-fp16 --per-block\n"
               "  qvl-surgery compare out/model.onnx out/parts --image cat.jpg --save-outputs ref.json",
}


def _epilog(example: str) -> str:
    return ("example:\n  " + example) if example else ""


DEFAULT_IMAGE_SIZE = "448x448"


# Shared option groups --------------------------------------------------------------------------

def add_write_options(p: argparse.ArgumentParser, *,
                      what: str = "output model (.onnx; its .onnx.data goes beside it)", model: bool = True) -> None:
    """-o/--output, --force, -q/--quiet (and --single-file where a model is written): shared by every
    subcommand that writes."""
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", required=True, type=Path, help=what)
    g.add_argument("--force", action="store_true", help="replace an existing output")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    if model:
        g.add_argument("--single-file", action="store_true",
                       help="one self-contained .onnx with every weight inline (models under 2 GB, e.g. the fp16 "
                            "encoder; MNN misreads fp16 external data), still written by streaming")


def add_source_options(p: argparse.ArgumentParser, *, source_help: str) -> None:
    """SOURCE, --random-init, --seed, --image-size: shared by export and run."""
    p.add_argument("source", nargs="?", type=Path, help=source_help)
    p.add_argument("--random-init", metavar="{tiny,3b,7b}", help="build from a published config with random weights")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    p.add_argument("--image-size", help="HEIGHTxWIDTH in pixels, multiples of 28 (default 448x448); static exports")
    p.add_argument("--dynamic", nargs="?", const="self", choices=["self", "host"],
                   help="one file for any image size, several images and video: inputs pixel_values + "
                        "image_grid_thw (self, the default), or pixel_values + grid tensors computed on the host "
                        "(host: qvl_surgery.core.hostinputs.host_inputs)")


def run_pass_command(a: argparse.Namespace) -> int:
    """Every pass subcommand: read the input value (a model, or a split), run the pass with the
    options its spec declares, write the output value, print the report."""
    from qvl_surgery.core.passbase import Context
    from qvl_surgery.app.pipeline import gen_script
    from qvl_surgery.core.publish import staging
    from qvl_surgery.core.values import check_output, read_value, split_dir_of, write_value
    cls = a.pass_cls
    p = cls(**{o.name: o.from_namespace(a) for o in cls.options})
    source = a.model if cls.takes == "model" else a.split_dir
    if a.gen_script:
        print(gen_script(source={cls.takes: source}, specs=[p], output=a.output,
                         single_file=getattr(a, "single_file", False),
                         force=a.force), end="")
        return 0
    single_file = getattr(a, "single_file", False)
    with read_value(source, cls.takes).checked() as src:
        check_output(cls.gives, a.output, overwrite=a.force, inputs=src.files, single_file=single_file)
        p.preflight({"dynamic": src.metadata.get("qvl_surgery.dynamic")})
        # scratch space a pass may need (simplify's result lives there), beside the output: for a split
        # named by its manifest.json, beside the folder, not in it (the folder must stay new or empty)
        out = split_dir_of(a.output) if cls.gives == "split" else a.output
        with staging(out) as work:
            context = Context(reference=source if cls.takes == "model" else None, progress=not a.quiet,
                              explain=a.verbose, workdir=work)
            result = p(src.value, context)
            wrote = write_value(result.value, a.output, overwrite=a.force, progress=not a.quiet,
                                single_file=single_file, inputs=src.files, before_publish=src.verify)
    print("\n".join(result.report.lines() + wrote))
    return 0


# Subcommands -----------------------------------------------------------------------------------

def check_model_file(path: Path) -> None:
    """A model file given as an argument: there, and a file (a folder is not 'no such file')."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path}: is a folder; this command takes a model file (.onnx)")
    if not path.is_file():
        raise BadInput(f"{path}: no such model file")


def cmd_export(a: argparse.Namespace) -> int:
    from qvl_surgery.core.config import check_image_size, parse_image_size, preset
    from qvl_surgery.core.export import export
    from qvl_surgery.core.weights import CheckpointWeights, RandomWeights
    from qvl_surgery.core.errors import BadInput
    if (a.source is None) == (a.random_init is None):
        raise BadInput("export: give a CHECKPOINT_DIR or --random-init {tiny,3b,7b}, not both or neither")
    if a.dynamic and a.image_size is not None:
        raise BadInput("export: --image-size fixes one size; a --dynamic export takes any size (drop one of them)")
    size = parse_image_size(a.image_size or DEFAULT_IMAGE_SIZE)
    if a.random_init is not None:
        weights = RandomWeights(preset(a.random_init), seed=a.seed)
    else:
        weights = CheckpointWeights(a.source)
    if a.dynamic:
        from qvl_surgery.core.dynamic import export_dynamic
        report = export_dynamic(weights, a.output, host_inputs=a.dynamic == "host", progress=not a.quiet,
                                overwrite=a.force, single_file=a.single_file)
        print("\n".join(report.lines()))
        return 0
    check_image_size(weights.cfg, size)
    report = export(weights, a.output, size, progress=not a.quiet, overwrite=a.force, single_file=a.single_file)
    print("\n".join(report.lines()))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from qvl_surgery.analysis.inspection import inspect_model
    from qvl_surgery.core.values import read_value
    read_value(a.model)   # a missing path, a folder without a split, an unreadable file: one line
    r = inspect_model(a.model)
    acts = None
    if a.calibrate is not None and not a.activations:
        raise BadInput("{calibrate}: the inputs of --activations; add --activations or drop it", calibrate=a.calibrate)
    if a.activations:
        from qvl_surgery.core.calibrate import check_calibration_source
        from qvl_surgery.analysis.outliers import activation_report
        calibrate = a.calibrate or "random:2"
        check_calibration_source(calibrate, random_ok=True)
        acts = activation_report(a.model, calibrate=calibrate)
    if a.json:
        d = r.to_dict()
        if acts:
            d["activations"] = acts.to_dict()
        print(json.dumps(d, indent=1))
    else:
        print("\n".join(r.lines() + (acts.lines() if acts else [])))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from qvl_surgery.analysis.compare import check_tolerances, compare
    from qvl_surgery.core.inputs import load_inputs
    from qvl_surgery.core.publish import check_new_file
    check_tolerances(atol=a.atol or 0.0, rtol=a.rtol or 0.0, min_cosine=a.min_cosine,
                     min_centered_cosine=a.min_centered_cosine)
    models = [a.ref, a.cand]
    for name in ("json", "save_outputs", "save_inputs"):
        if getattr(a, name):
            check_new_file(Path(getattr(a, name)), inputs=models, option=name)
    feeds = load_inputs(a.ref, inputs=a.inputs, image=a.image, video=a.video, image_size=a.image_size, seed=a.seed)
    judged = judgement_of(a.cand)   # what CAND's passes declared: int8 is not judged at fp32's tolerances
    report = compare(a.ref, a.cand, feeds=feeds, emulate_fp16=a.emulate_fp16, runtime=a.runtime,
                     atol=a.atol if a.atol is not None else max(judged.atol, 1e-3),
                     rtol=a.rtol if a.rtol is not None else max(judged.rtol, 1e-3),
                     min_cosine=a.min_cosine if a.min_cosine is not None else min(judged.min_cosine, 0.999),
                     min_centered_cosine=a.min_centered_cosine if a.min_centered_cosine is not None
                     else judged.min_centered_cosine, per_block=a.per_block,
                     save_outputs=a.save_outputs,
                     save_inputs=a.save_inputs, verbose=a.verbose)
    print("\n".join(report.lines()))
    if a.json:
        from qvl_surgery.core.publish import write_text
        write_text(Path(a.json), json.dumps(report.to_dict(), indent=1))
    return 0 if report.passed else 1


def judgement_of(path: Path):
    """The judgement recorded in a model's (or a split's part 0's) metadata."""
    from qvl_surgery.core.passbase import judgement_of_metadata
    from qvl_surgery.core.signature import head_model
    return judgement_of_metadata(head_model(path).metadata())


def cmd_package(a: argparse.Namespace) -> int:
    from qvl_surgery.app.package import package
    report = package(a.checkpoint, a.output, runtime=a.runtime, fp16=a.fp16, passes=a.passes, overwrite=a.force,
                     progress=not a.quiet, builder_python=a.builder_python)
    print("\n".join(report.lines()))
    return 0


QUANT_SCHEME_OPTIONS = ("weights", "activations", "format", "block_size", "calibrate", "calibrate_method")
# where a command measures with quantize's scheme (sensitivity, toolchains), the default is w8a8 dynamic in
# onnxruntime format (weight-only with int4 weights)
SCHEME_DEFAULTS = {"activations": "int8", "format": "onnxruntime"}


def _scheme_options():
    import dataclasses
    from passes.quantize import QuantizePass
    return [dataclasses.replace(o, default=SCHEME_DEFAULTS.get(o.name, o.default),
                                help=o.help + ("; none with --weights int4" if o.name == "activations" else ""))
            for o in QuantizePass.options if o.name in QUANT_SCHEME_OPTIONS]


def add_scheme_options(p: argparse.ArgumentParser, title: str) -> None:
    """quantize's scheme options on a subcommand that measures with them (sensitivity, toolchains)."""
    g = p.add_argument_group(title)
    for o in _scheme_options():
        o.add_to_parser(g)


def _scheme(a: argparse.Namespace, budget: float | None = None) -> dict:
    """quantize's scheme options from a subcommand that shares them (sensitivity, toolchains), checked
    as quantize checks them, before any work."""
    from passes.quantize import check_budget_and_method, check_scheme
    given = {o.name: getattr(a, o.name, None) for o in _scheme_options()}
    out = {o.name: o.default if given[o.name] is None else given[o.name] for o in _scheme_options()}
    if out["weights"] == "int4" and given["activations"] is None:
        out["activations"] = "none"
    check_scheme(weights=out["weights"], activations=out["activations"], format=out["format"],
                 block_size=out["block_size"])
    check_budget_and_method({**out, "budget": budget})
    return out


def _model_and_data(paths: list[Path]) -> list[Path]:
    """Model files given as arguments, checked, with their data files: what an output must not touch."""
    from qvl_surgery.core.modelfile import load_model
    out: list[Path] = []
    for m in paths:
        check_model_file(m)
        out += [m, *sorted(load_model(m).data_files())]
    return out


def cmd_sensitivity(a: argparse.Namespace) -> int:
    from qvl_surgery.analysis.sensitivity import sensitivity
    from qvl_surgery.core.inputs import InputSource
    from qvl_surgery.core.modelfile import load_model
    from qvl_surgery.analysis.plots import plot_sensitivity
    from qvl_surgery.core.publish import check_new_dir, new_dir
    labels = a.label or []
    if labels and len(labels) != len(a.models):
        raise BadInput(f"--label: give one per model ({len(a.models)}), or none")
    guard = _model_and_data(a.models)
    scheme = _scheme(a)
    for option, text in (("calibrate", a.calibrate), ("inputs", a.inputs)):
        if text:
            guard += [Path(f) for f in InputSource.parse(text, option).files]
    check_new_dir(a.output, overwrite=a.force, inputs=guard)
    results = []
    for i, m in enumerate(a.models):
        r = sensitivity(load_model(m), inputs=a.inputs, per_linear=a.per_linear, progress=not a.quiet, **scheme)
        results.append({"model": str(m), "label": labels[i] if labels else m.stem, **r})
        worst = sorted(r["groups"], key=lambda g: -g["alone_error"])[:4]
        print(f"{m}: {r['scheme']} ({r['format']}), every linear quantized: centered cosine "
              f"{r['all_quantized_centered_cosine']:.6f}; worst alone: "
              + ", ".join(f"{g['group']} {g['alone_error']:.2e}" for g in worst))
    out = Path(a.output)
    with new_dir(out, overwrite=a.force, inputs=guard, command="sensitivity") as tmp:
        (tmp / "sensitivity.json").write_text(json.dumps({"models": results}, indent=1, allow_nan=False) + "\n")
        png = plot_sensitivity(results, tmp / "sensitivity.png")
    print(f"wrote {out}/sensitivity.json" + (f" and {out}/sensitivity.png" if png else
                                             " (no plot: matplotlib is not installed; pip install matplotlib)"))
    return 0


def cmd_toolchains(a: argparse.Namespace) -> int:
    from qvl_surgery.core.inputs import InputSource
    from qvl_surgery.core.modelfile import load_model
    from qvl_surgery.core.publish import check_new_dir
    from qvl_surgery.analysis.toolchains import allocation_by_hand, allocation_from_quantized, allocation_of, write_toolchain_configs
    ways = [x for x in (a.keep_from, a.budget, a.keep_node or a.keep_block or None) if x is not None]
    if len(ways) != 1:
        raise BadInput("toolchains: give one of --keep-from QUANTIZED.onnx, --budget COSINE, or --keep-node / "
                       "--keep-block")
    if a.rknn_residual_int8 and a.rknn_step1 is None:
        raise BadInput("--rknn-residual-int8: applies to the cfg written with --rknn-step1 DIR; add it or drop this")
    scheme_given = [o.cli_flag for o in _scheme_options() if getattr(a, o.name, None) is not None]
    if scheme_given and a.budget is None:
        raise BadInput(f"{scheme_given[0]}: the scheme options apply to --budget (the measurement); drop them")
    for flag, path in (("--keep-from", a.keep_from), ("--rknn-step1", a.rknn_step1)):
        if path is not None and not path.exists():
            raise BadInput(f"{flag} {path}: no such file or folder")
    guard = _model_and_data([a.model]) + [p for p in (a.keep_from, a.rknn_step1) if p is not None]
    scheme = _scheme(a, a.budget) if a.budget is not None else None
    dataset_source = InputSource.parse(a.dataset, "dataset", random_ok=False) if a.dataset else None
    if dataset_source:
        guard += [Path(f) for f in dataset_source.files]
    if scheme and scheme["calibrate"]:
        guard += [Path(f) for f in InputSource.parse(scheme["calibrate"], "calibrate").files]
    check_new_dir(a.output, overwrite=a.force, inputs=guard)
    model = load_model(a.model)
    dataset = dataset_source.sets(a.model) if dataset_source else None   # checked before the measurement
    if a.keep_from is not None:
        alloc = allocation_from_quantized(a.keep_from, model)
    elif a.budget is not None:
        from passes.quantize import quantize_model
        _, report = quantize_model(model, budget=a.budget, progress=not a.quiet, **scheme)
        kept = {n: why for why, names in report.kept.items() for n in names}
        alloc = allocation_of(model, kept, f"quantize --budget {a.budget} ({report.scheme}, {report.format})",
                              {"budget": report.budget})
    else:
        alloc = allocation_by_hand(model, a.keep_node or [], a.keep_block or [])
    report = write_toolchain_configs(a.model, a.output, alloc, dataset=dataset, rknn_step1=a.rknn_step1,
                                     rknn_residual=not a.rknn_residual_int8, overwrite=a.force, inputs=guard)
    print("\n".join(report.lines()))
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from qvl_surgery.app.pipeline import gen_script, parse_passes, read_recipe, run_pipeline
    source: dict = {}
    image_size, specs = a.image_size, None
    if a.recipe:
        doc = read_recipe(a.recipe)
        source = dict(doc.get("source", {}))
        if image_size is not None and "image_size" in doc:
            raise BadInput("{image_size}: the recipe sets image_size too; give it once", image_size=image_size)
        image_size = doc.get("image_size", image_size)
        specs = doc["passes"]
    if a.passes:
        if specs:
            raise BadInput("{passes}: the recipe lists passes too; give them once", passes=a.passes)
        specs = parse_passes(a.passes)
    if not specs:
        raise BadInput("run: give --passes or --recipe")
    given = [x for x in (a.random_init, a.source) if x is not None]
    if given and source:
        raise BadInput(f"run: the recipe names its source ({json.dumps(source)}) and the command line another; "
                       "give the source once")
    if len(given) > 1:
        raise BadInput("run: give a SOURCE or {random_init}, not both", random_init="PRESET")
    if a.random_init:
        source = {"random_init": a.random_init, "seed": a.seed}
    elif a.source is not None:
        source = {"model": a.source} if a.source.suffix == ".onnx" else {"checkpoint": a.source}
    if a.dynamic:
        source["dynamic"] = a.dynamic
    if not source:
        raise BadInput("run: give a SOURCE (checkpoint directory or .onnx export) or --random-init PRESET")
    if a.gen_script:
        print(gen_script(source=source, specs=specs, output=a.output, image_size=image_size,
                         single_file=a.single_file, compare=True), end="")
        return 0
    result = run_pipeline(out_dir=a.output, specs=specs, checkpoint=source.get("checkpoint"),
                          random_init=source.get("random_init"), seed=int(source.get("seed", 0)),
                          model=source.get("model"), image_size=image_size, dynamic=source.get("dynamic"),
                          force=a.force, progress=not a.quiet, single_file=a.single_file)
    print("\n".join(result.lines()))
    return 0 if result.compare.get("passed") else 1


def add_pass_command(sub, cls) -> None:
    """A pass's subcommand, from its spec: input, the pass's options, output options, --gen-script."""
    p = sub.add_parser(cls.name, help=cls.help, epilog=_epilog(cls.example), formatter_class=argparse.RawDescriptionHelpFormatter)
    if cls.takes == "model":
        p.add_argument("model", type=Path)
    else:
        p.add_argument("split_dir", type=Path, help="folder written by split (or its manifest.json)")
    g = p.add_argument_group(f"{cls.name} options")
    for o in cls.options:
        o.add_to_parser(g)
    if cls.gives == "split":
        add_write_options(p, what="output folder for partK.onnx(.data) and manifest.json", model=False)
    else:
        add_write_options(p)
    p.add_argument("--gen-script", action="store_true", help="print the equivalent Python API calls and exit")
    p.set_defaults(func=run_pass_command, pass_cls=cls)


# CLI-level parameters that are not pass options; pass options come from their specs
CLI_FLAGS = {"overwrite": "--force", "force": "--force", "random_init": "--random-init", "image_size": "--image-size",
             "inputs": "--inputs", "image": "--image", "video": "--video", "per_block": "--per-block",
             "runtime": "--runtime", "fp16": "--fp16", "passes": "--passes", "single_file": "--single-file",
             "dynamic": "--dynamic", "dataset": "--dataset", "keep_from": "--keep-from", "rknn_step1": "--rknn-step1",
             "label": "--label", "calibrate": "--calibrate", "output": "-o", "atol": "--atol", "rtol": "--rtol",
             "min_cosine": "--min-cosine", "min_centered_cosine": "--min-centered-cosine", "json": "--json",
             "save_outputs": "--save-outputs", "save_inputs": "--save-inputs"}


def flag_of(name: str) -> str | None:
    """The CLI flag of a library parameter (errors name parameters; the CLI shows its flags)."""
    from passes import option_flag
    return CLI_FLAGS.get(name) or option_flag(name)


class _Parser(argparse.ArgumentParser):
    """argparse's refusals as every other refusal here: one line naming the problem, exit 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qvl-surgery", description="Export the Qwen2.5-VL vision encoder to ONNX once "
                                "and run graph passes on that file.")
    p.add_argument("--version", action="version", version=f"qvl-surgery {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug log (passes explain what did not match)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    e = sub.add_parser("export", help="export the fp32 encoder (one .onnx + one .onnx.data)", epilog=_epilog(EXAMPLES["export"]),
                       formatter_class=fmt)
    add_source_options(e, source_help="local transformers Qwen2.5-VL checkpoint directory")
    add_write_options(e)
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="sizes, ops, metadata and patterns of a model (reads no weights)",
                       epilog=_epilog(EXAMPLES["inspect"]), formatter_class=fmt)
    i.add_argument("model", type=Path)
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--activations", action="store_true",
                   help="also run the fp32 model (one segment at a time) and report, per block, max |x| of the "
                   "residual and of the linear layers' inputs, fp16 headroom, and the share of values a per-tensor "
                   "int8 scale rounds to zero; flags what would overflow fp16 or be crushed by int8")
    i.add_argument("--calibrate", default=None, metavar="SRC",
                   help="inputs for --activations: .npz or image file(s), comma separated, or random:N "
                   "(default random:2)")
    i.set_defaults(func=cmd_inspect)

    from passes import PASSES
    for cls in PASSES.values():
        add_pass_command(sub, cls)

    c = sub.add_parser("compare", help="compare two models or splits on the same inputs (polygraphy)",
                       formatter_class=fmt, epilog=_epilog(EXAMPLES["compare"]))
    c.add_argument("ref", type=Path, help="reference model, or split folder / manifest.json")
    c.add_argument("cand", type=Path, help="candidate model, or split folder / manifest.json")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--inputs", help=".npz with one array per model input (a dynamic model: pixel_values and "
                     "image_grid_thw)")
    src.add_argument("--image", help="image file(s), comma separated, through transformers' processor: resized to "
                     "the export size (static), or each at its own size in one call (dynamic)")
    c.add_argument("--video", help="dynamic models: video frames (image files, comma separated; two per temporal "
                   "patch), after the --image images in the same call")
    c.add_argument("--image-size", help="dynamic models: random images of these sizes in one call, HxW[,HxW...] "
                   "(default 448x448)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random input when no file is given")
    c.add_argument("--emulate-fp16", action="store_true",
                   help="run CAND with its fp16 (or bf16) rounding emulated (onnxruntime's CPU provider hides fp16 "
                   "error and runs no bf16)")
    c.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                   help="run CAND in this runtime (REF always in onnxruntime); openvino: its CPU plugin at f32 "
                   "precision, from the 'clients' extra (quantized QDQ files run in integer arithmetic there)")
    c.add_argument("--atol", type=float, default=None, help="default 1e-3, or looser where CAND's passes declare "
                   "it (qvl_surgery.judgement metadata: quantized files)")
    c.add_argument("--rtol", type=float, default=None, help="default as --atol")
    c.add_argument("--min-cosine", type=float, default=None, help="floor of the plain cosine (default 0.999, or "
                   "CAND's declared floor)")
    c.add_argument("--min-centered-cosine", type=float, default=None,
                   help="floor of the token-centered cosine (each output row minus the mean row; reported always; "
                        "default: the floor CAND's passes declare, e.g. 0.95 for a quantized file, else not judged): "
                        "a constant component keeps the plain cosine near 1 when the content is gone")
    c.add_argument("--per-block", action="store_true", help="also compare the hidden state after each block")
    c.add_argument("--save-outputs", metavar="FILE",
                   help="save both runs as polygraphy RunResults (use with polygraphy run --load-outputs FILE)")
    c.add_argument("--save-inputs", metavar="FILE",
                   help="save the inputs used (use with polygraphy run --load-inputs FILE)")
    c.add_argument("--json", metavar="FILE", help="write the report as JSON")
    c.set_defaults(func=cmd_compare)

    pk = sub.add_parser("package", help="a folder a runtime loads as it is (onnxruntime-genai: vision, embedding "
                        "and text models, configs, tokenizer)", formatter_class=fmt, epilog=_epilog(EXAMPLES["package"]))
    pk.add_argument("checkpoint", type=Path, help="local Qwen2.5-VL checkpoint directory (only read)")
    pk.add_argument("--runtime", default="onnxruntime-genai", choices=["onnxruntime-genai"],
                    help="the runtime to package for (default onnxruntime-genai)")
    pk.add_argument("--passes", help="passes for the vision model (the dynamic export), e.g. simplify")
    pk.add_argument("--fp16", action="store_true", help="fp16 models (refused for onnxruntime-genai's CPU build)")
    pk.add_argument("--builder-python", type=Path, help="a Python that imports onnxruntime-genai's model builder "
                    "(default: its own virtualenv in ~/.cache/qvl-surgery, made on first use)")
    add_write_options(pk, what="output folder", model=False)
    pk.set_defaults(func=cmd_package)

    sv = sub.add_parser("sensitivity", help="per block (and per linear): the error quantizing it alone adds, as "
                        "JSON and a plot; several models side by side (e.g. before and after smooth / rotate)",
                        formatter_class=fmt, epilog=_epilog(EXAMPLES["sensitivity"]))
    sv.add_argument("models", type=Path, nargs="+", help="fp32 model(s), measured one after the other")
    sv.add_argument("--label", action="append", help="a name per model for the plot (repeatable; default: file names)")
    sv.add_argument("--inputs", metavar="SRC", help="the measurement's inputs: .npz or image file(s), comma "
                    "separated, or random:N (default: --calibrate's, else random:4; on a 3b each set costs one whole "
                    "run per block)")
    sv.add_argument("--per-linear", action="store_true", help="also each linear alone (one quantize-and-run each: "
                    "5 per block)")
    add_scheme_options(sv, "scheme (as quantize; default w8a8 dynamic, format onnxruntime)")
    add_write_options(sv, what="output folder (sensitivity.json, sensitivity.png)", model=False)
    sv.set_defaults(func=cmd_sensitivity)

    tc = sub.add_parser("toolchains", help="one keep-list, every quantizer's config: onnxruntime nodes_to_exclude, "
                        "NNCF IgnoredScope, rknn-toolkit2 hybrid layers, pulsar2 layer_configs, and their calibration "
                        "sets", formatter_class=fmt, epilog=_epilog(EXAMPLES["toolchains"]))
    tc.add_argument("model", type=Path, help="the fp32 model the toolchain will quantize (export, or smoothed / "
                    "rotated)")
    way = tc.add_argument_group("where the keep-list comes from (one of)")
    way.add_argument("--keep-from", type=Path, metavar="QUANTIZED", help="a file written by qvl-surgery quantize "
                     "(e.g. with --budget): what it kept; or a keep.json written here before")
    way.add_argument("--budget", type=float, metavar="COSINE", help="measure now: quantize --budget's allocation "
                     "with the scheme below")
    way.add_argument("--keep-node", action="append", metavar="GLOB", help="linears by node name (repeatable)")
    way.add_argument("--keep-block", action="append", metavar="N", help="every linear of block N (repeatable)")
    tc.add_argument("--dataset", metavar="FILES", help="image or .npz file(s), comma separated: written as rknn's "
                    "dataset.txt of .npy files and pulsar2's tar of .npy, in the model's input layout")
    tc.add_argument("--rknn-step1", type=Path, metavar="DIR", help="the folder where rknn-toolkit2's "
                    "hybrid_quantization_step1 ran on MODEL (its .model and .quantization.cfg): writes "
                    "rknn.quantization.cfg with the kept layers and the residual stream (residual Adds, RMSNorms) in "
                    "float16, for hybrid_quantization_step2")
    tc.add_argument("--rknn-residual-int8", action="store_true", help="with --rknn-step1: leave the residual "
                    "stream int8 (only the kept linears float16)")
    add_scheme_options(tc, "scheme for --budget (as quantize; default w8a8 dynamic, format onnxruntime)")
    add_write_options(tc, what="output folder", model=False)
    tc.set_defaults(func=cmd_toolchains)

    r = sub.add_parser("run", help="one pipeline: export -> passes -> deployable files, compared to the fp32 export",
                       formatter_class=fmt, epilog=_epilog(EXAMPLES["run"]))
    add_source_options(r, source_help="checkpoint directory or an existing fp32 .onnx export")
    r.add_argument("--passes", help="e.g. attention,fp16:keep_silu_fp32,split:parts=3")
    r.add_argument("--recipe", type=Path, help="a JSON recipe with source, image_size and passes")
    r.add_argument("--gen-script", action="store_true", help="print the equivalent Python API calls and exit")
    add_write_options(r, what="output folder")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except Exception as e:  # a pass whose spec cannot become flags: name it, not a traceback per subcommand
        print(f"qvl-surgery: error: cannot build the command line ({type(e).__name__}: {e}); a pass's spec is "
              "broken", file=sys.stderr)
        return 2
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:   # --help, --version, or argparse's one-line refusal (_Parser.error)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from qvl_surgery.core.publish import Terminated
    restore = _on_sigterm_raise(Terminated)
    try:
        return a.func(a)
    except BadInput as e:
        print(f"qvl-surgery {a.command}: error: {e.render(flag_of)}", file=sys.stderr)
        return e.exit_code
    except QvlError as e:
        print(f"qvl-surgery {a.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # unwritable folder, full disk, ...: the output was not published
        where = f"{e.filename}: " if e.filename else ""
        print(f"qvl-surgery {a.command}: error: {where}{e.strerror or e}; nothing was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every output is staged in a hidden folder and published by rename at the end
        print(f"qvl-surgery {a.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except Terminated:   # SIGTERM: the same way out as SIGINT (staging removed by the finally blocks)
        print(f"qvl-surgery {a.command}: terminated; no output was left behind", file=sys.stderr)
        return 143
    finally:
        restore()


def _on_sigterm_raise(exc: type[BaseException]):
    """SIGTERM raises ``exc`` in the main thread (as SIGINT raises KeyboardInterrupt), so staging
    folders are removed on the way out; returns what restores the previous handler."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise exc()
    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
