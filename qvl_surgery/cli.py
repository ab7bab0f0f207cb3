"""``qvl-surgery``: a thin layer over the library. One function per subcommand maps its arguments
onto one library call and prints the report. Bad input: one line, exit 2. A failed tolerance: exit 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import BadInput, QvlError

log = logging.getLogger("qvl_surgery")

EXAMPLES = {
    "export": "qvl-surgery export ~/Qwen2.5-VL-3B-Instruct -o out/model.onnx --image-size 448x448\n"
              "  qvl-surgery export --random-init 3b --seed 0 -o out/model.onnx",
    "inspect": "qvl-surgery inspect out/model.onnx",
    "split": "qvl-surgery split out/model.onnx --parts 3 -o out/parts\n"
             "  qvl-surgery split out/model.onnx --at 16,merger -o out/parts\n"
             "  qvl-surgery split out/model.onnx --max-part-bytes 1e9 -o out/parts",
    "merge": "qvl-surgery merge out/parts -o out/merged.onnx",
    "simplify": "qvl-surgery simplify out/model.onnx -o out/model.sim.onnx",
    "fp16": "qvl-surgery fp16 out/model.onnx -o out/fp16.onnx --keep-silu-fp32\n"
            "  qvl-surgery fp16 out/model.onnx -o out/fp16.onnx --keep-rmsnorm-fp32 --keep-node '/blocks.31/mlp/down_proj/*'\n"
            "  qvl-surgery fp16 out/model.onnx -o out/fp16.onnx --calibrate calib.npz\n"
            "  qvl-surgery fp16 out/model.onnx -o out/fp16.onnx --keep-silu-fp32 --gen-script   # print the Python",
    "run": "qvl-surgery run --random-init 3b -o out/run --passes attention,fp16:keep_silu_fp32,split:parts=3\n"
           "  qvl-surgery run ~/Qwen2.5-VL-3B-Instruct -o out/run --recipe recipe.json",
    "package": "qvl-surgery package ~/Qwen2.5-VL-3B-Instruct --runtime onnxruntime-genai -o out/genai",
    "attention": "qvl-surgery attention out/model.onnx -o out/windowed.onnx\n"
                 "  qvl-surgery attention out/model.onnx -o out/mha.onnx --mode mha",
    "compare": "qvl-surgery compare out/model.onnx out/fp16.onnx --emulate-fp16 --per-block\n"
               "  qvl-surgery compare out/model.onnx out/parts --image cat.jpg --save-outputs ref.json",
}


def _epilog(cmd: str) -> str:
    return "example:\n  " + EXAMPLES[cmd]


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
                        "(host: qvl_surgery.hostinputs.host_inputs)")


def run_pass_command(a: argparse.Namespace) -> int:
    """Every pass subcommand: read the input (a model, or a split), run the pass with the options
    its spec declares, write the output (a model, or a split), print the report."""
    from passes.merge import background_verify, load_split
    from passes.split import prepare_output_dir, save_split
    from .modelfile import load_model, save_model
    from .passbase import Context
    from .publish import check_new_output, staging
    cls = a.pass_cls
    p = cls(**{o.name: o.from_namespace(a) for o in cls.options})
    source = a.model if cls.takes == "model" else a.split_dir
    if a.gen_script:
        print(pass_script(p, source, a.output))
        return 0
    verify = None
    if cls.takes == "model":
        value = load_model(source)
        inputs = [source] + sorted(value.data_files())
    else:
        value = load_split(source, verify_hashes=False)   # sizes and chain now; hashes while copying
        verify = background_verify(value)
        inputs = value.manifest.part_paths()
    if cls.gives == "model":
        check_new_output(a.output, inputs=inputs, overwrite=a.force)
    else:
        prepare_output_dir(a.output, a.force)
    with staging(a.output) as work:
        context = Context(reference=source if cls.takes == "model" else None, progress=not a.quiet,
                          explain=a.verbose, workdir=work)
        result = p(value, context)
        report = result.report
        if cls.gives == "model":
            save_model(result.value, a.output, progress=None if a.quiet else cls.name, overwrite=a.force,
                       inputs=inputs, before_publish=verify, single_file=a.single_file)
            wrote = [f"wrote {a.output}" + ("" if a.single_file else f" ({a.output.name}.data beside it)")]
        else:
            report.out_dir = a.output
            report.parts = save_split(result.value, a.output, overwrite=a.force, progress=not a.quiet)
            wrote = []
    print("\n".join(report.lines() + wrote))
    return 0


def pass_script(p, source: Path, output: Path) -> str:
    """``--gen-script`` of a pass subcommand: the same in Python API calls."""
    lines = ["from qvl_surgery.modelfile import load_model, save_model"]
    if p.takes == "model":
        lines.append(f"model = load_model({str(source)!r})")
    else:
        lines += ["from passes.merge import load_split", f"parts = load_split({str(source)!r})"]
    if p.gives == "split":
        args = "".join(f", {p.option(n).param}={v!r}" for n, v in p.values.items())
        lines += ["from passes.split import split", f"report = split(model, {str(output)!r}{args})"]
    else:
        lines += p.call_source("model" if p.takes == "model" else "parts")
        lines.append(f"save_model(model, {str(output)!r})")
    lines.append("print('\\n'.join(report.lines()))")
    return "\n".join(line.replace("REFERENCE", repr(str(source))) for line in lines)


# Subcommands -----------------------------------------------------------------------------------

def cmd_export(a: argparse.Namespace) -> int:
    from .config import check_image_size, parse_image_size, preset
    from .export import export
    from .weights import CheckpointWeights, RandomWeights
    from .errors import BadInput
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
        from .dynamic import export_dynamic
        report = export_dynamic(weights, a.output, host_inputs=a.dynamic == "host", progress=not a.quiet,
                                overwrite=a.force, single_file=a.single_file)
        print("\n".join(report.lines()))
        return 0
    check_image_size(weights.cfg, size)
    report = export(weights, a.output, size, progress=not a.quiet, overwrite=a.force, single_file=a.single_file)
    print("\n".join(report.lines()))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect import inspect_model
    r = inspect_model(a.model)
    print(json.dumps(r.to_dict(), indent=1) if a.json else "\n".join(r.lines()))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .compare import compare, load_inputs
    feeds = load_inputs(a.ref, inputs=a.inputs, image=a.image, video=a.video, image_size=a.image_size, seed=a.seed)
    report = compare(a.ref, a.cand, feeds=feeds, emulate_fp16=a.emulate_fp16, atol=a.atol, rtol=a.rtol,
                     min_cosine=a.min_cosine, per_block=a.per_block, save_outputs=a.save_outputs,
                     save_inputs=a.save_inputs, verbose=a.verbose)
    print("\n".join(report.lines()))
    if a.json:
        Path(a.json).write_text(json.dumps(report.to_dict(), indent=1))
    return 0 if report.passed else 1


def cmd_package(a: argparse.Namespace) -> int:
    from .package import package
    report = package(a.checkpoint, a.output, runtime=a.runtime, fp16=a.fp16, passes=a.passes, overwrite=a.force,
                     progress=not a.quiet, builder_python=a.builder_python)
    print("\n".join(report.lines()))
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .pipeline import gen_script, parse_passes, read_recipe, run_pipeline
    from .errors import BadInput
    source: dict = {}
    image_size, specs = a.image_size, None
    if a.recipe:
        doc = read_recipe(a.recipe)
        source = dict(doc.get("source", {}))
        image_size = doc.get("image_size", image_size)
        specs = doc["passes"]
    if a.passes:
        specs = parse_passes(a.passes)
    if specs is None:
        raise BadInput("run: give --passes or --recipe")
    if a.random_init:
        source = {"random_init": a.random_init, "seed": a.seed}
    elif a.source is not None:
        source = {"model": a.source} if a.source.suffix == ".onnx" else {"checkpoint": a.source}
    if a.dynamic:
        source["dynamic"] = a.dynamic
    if not source:
        raise BadInput("run: give a SOURCE (checkpoint directory or .onnx export) or --random-init PRESET")
    if a.gen_script:
        print(gen_script(source, image_size, specs, a.output))
        return 0
    result = run_pipeline(out_dir=a.output, specs=specs, checkpoint=source.get("checkpoint"),
                          random_init=source.get("random_init"), seed=int(source.get("seed", 0)),
                          model=source.get("model"), image_size=image_size, dynamic=source.get("dynamic"),
                          force=a.force, progress=not a.quiet, single_file=a.single_file)
    print("\n".join(result.lines()))
    return 0 if result.compare.get("passed") else 1


def add_pass_command(sub, cls) -> None:
    """A pass's subcommand, from its spec: input, the pass's options, output options, --gen-script."""
    p = sub.add_parser(cls.name, help=cls.help, epilog=_epilog(cls.name), formatter_class=argparse.RawDescriptionHelpFormatter)
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
             "runtime": "--runtime", "fp16": "--fp16", "passes": "--passes", "single_file": "--single-file"}


def flag_of(name: str) -> str | None:
    """The CLI flag of a library parameter (errors name parameters; the CLI shows its flags)."""
    if name in CLI_FLAGS:
        return CLI_FLAGS[name]
    from .passbase import flag_of as pass_flag
    return pass_flag(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvl-surgery", description="Export the Qwen2.5-VL vision encoder to ONNX once "
                                "and run graph passes on that file.")
    p.add_argument("--version", action="version", version=f"qvl-surgery {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug log (passes explain what did not match)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    e = sub.add_parser("export", help="export the fp32 encoder (one .onnx + one .onnx.data)", epilog=_epilog("export"),
                       formatter_class=fmt)
    add_source_options(e, source_help="local transformers Qwen2.5-VL checkpoint directory")
    add_write_options(e)
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="sizes, ops, metadata and patterns of a model (reads no weights)",
                       epilog=_epilog("inspect"), formatter_class=fmt)
    i.add_argument("model", type=Path)
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=cmd_inspect)

    from passes import PASSES
    for cls in PASSES.values():
        add_pass_command(sub, cls)

    c = sub.add_parser("compare", help="compare two models or splits on the same inputs (polygraphy)",
                       formatter_class=fmt, epilog=_epilog("compare"))
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
                   help="run CAND with fp16 rounding emulated (onnxruntime's CPU provider hides fp16 error)")
    c.add_argument("--atol", type=float, default=1e-3)
    c.add_argument("--rtol", type=float, default=1e-3)
    c.add_argument("--min-cosine", type=float, default=0.999)
    c.add_argument("--per-block", action="store_true", help="also compare the hidden state after each block")
    c.add_argument("--save-outputs", metavar="FILE",
                   help="save both runs as polygraphy RunResults (use with polygraphy run --load-outputs FILE)")
    c.add_argument("--save-inputs", metavar="FILE",
                   help="save the inputs used (use with polygraphy run --load-inputs FILE)")
    c.add_argument("--json", metavar="FILE", help="write the report as JSON")
    c.set_defaults(func=cmd_compare)

    pk = sub.add_parser("package", help="a folder a runtime loads as it is (onnxruntime-genai: vision, embedding "
                        "and text models, configs, tokenizer)", formatter_class=fmt, epilog=_epilog("package"))
    pk.add_argument("checkpoint", type=Path, help="local Qwen2.5-VL checkpoint directory (only read)")
    pk.add_argument("--runtime", default="onnxruntime-genai", choices=["onnxruntime-genai"],
                    help="the runtime to package for (default onnxruntime-genai)")
    pk.add_argument("--passes", help="passes for the vision model (the dynamic export), e.g. simplify")
    pk.add_argument("--fp16", action="store_true", help="fp16 models (refused for onnxruntime-genai's CPU build)")
    pk.add_argument("--builder-python", type=Path, help="a Python that imports onnxruntime-genai's model builder "
                    "(default: its own virtualenv, .compat/genai-builder, made on first use)")
    add_write_options(pk, what="output folder", model=False)
    pk.set_defaults(func=cmd_package)

    r = sub.add_parser("run", help="one pipeline: export -> passes -> deployable files, compared to the fp32 export",
                       formatter_class=fmt, epilog=_epilog("run"))
    add_source_options(r, source_help="checkpoint directory or an existing fp32 .onnx export")
    r.add_argument("--passes", help="e.g. attention,fp16:keep_silu_fp32,split:parts=3")
    r.add_argument("--recipe", type=Path, help="a JSON recipe with source, image_size and passes")
    r.add_argument("--gen-script", action="store_true", help="print the equivalent Python API calls and exit")
    add_write_options(r, what="output folder")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
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
    except KeyboardInterrupt:
        print(f"qvl-surgery {a.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
