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
from .errors import QvlError

log = logging.getLogger("qvl_surgery")

EXAMPLES = {
    "export": "qvl-surgery export ~/Qwen2.5-VL-3B-Instruct -o out/model.onnx --image-size 448x448\n"
              "  qvl-surgery export --random-init 3b --seed 0 -o out/model.onnx",
    "inspect": "qvl-surgery inspect out/model.onnx",
    "split": "qvl-surgery split out/model.onnx --parts 3 -o out/parts",
    "merge": "qvl-surgery merge out/parts -o out/merged.onnx",
    "simplify": "qvl-surgery simplify out/model.onnx -o out/model.sim.onnx",
    "fp16": "qvl-surgery fp16 out/model.onnx -o out/fp16.onnx --keep-silu-fp32\n"
            "  qvl-surgery fp16 out/model.onnx -o out/fp16.onnx --keep-rmsnorm-fp32 --keep-node '/blocks.31/mlp/down_proj/*'\n"
            "  qvl-surgery fp16 out/model.onnx -o out/fp16.onnx --calibrate calib.npz",
    "run": "qvl-surgery run --random-init 3b -o out/run --passes attention,fp16:keep_silu_fp32,split:parts=3\n"
           "  qvl-surgery run ~/Qwen2.5-VL-3B-Instruct -o out/run --recipe recipe.json",
    "attention": "qvl-surgery attention out/model.onnx -o out/windowed.onnx\n"
                 "  qvl-surgery attention out/model.onnx -o out/mha.onnx --mode mha",
    "compare": "qvl-surgery compare out/model.onnx out/fp16.onnx --emulate-fp16 --per-block\n"
               "  qvl-surgery compare out/model.onnx out/parts --image cat.jpg --save-outputs ref.json",
}


def _epilog(cmd: str) -> str:
    return "example:\n  " + EXAMPLES[cmd]


# Shared option groups --------------------------------------------------------------------------

def add_write_options(p: argparse.ArgumentParser, *,
                      what: str = "output model (.onnx; its .onnx.data goes beside it)") -> None:
    """-o/--output, --force and -q/--quiet: shared by every subcommand that writes."""
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", required=True, type=Path, help=what)
    g.add_argument("--force", action="store_true", help="replace an existing output")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_source_options(p: argparse.ArgumentParser, *, source_help: str) -> None:
    """SOURCE, --random-init, --seed, --image-size: shared by export and run."""
    p.add_argument("source", nargs="?", type=Path, help=source_help)
    p.add_argument("--random-init", metavar="{tiny,3b,7b}", help="build from a published config with random weights")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    p.add_argument("--image-size", default="448x448", help="HEIGHTxWIDTH in pixels, multiples of 28 (default 448x448)")


def _write_pass(a: argparse.Namespace, apply) -> int:
    """Load a.model, apply the pass (model -> (model, report)), save to a.output, print the report."""
    from .modelfile import check_output_path, load_model, save_model
    model = load_model(a.model)
    check_output_path(a.output, [a.model] + sorted(model.data_files()))
    out, report = apply(model)
    save_model(out, a.output, progress=None if a.quiet else a.command, overwrite=a.force)
    print("\n".join(report.lines() + [f"wrote {a.output} ({a.output.name}.data beside it)"]))
    return 0


# Subcommands -----------------------------------------------------------------------------------

def cmd_export(a: argparse.Namespace) -> int:
    from .config import check_image_size, parse_image_size, preset
    from .export import export
    from .weights import CheckpointWeights, RandomWeights
    from .errors import BadInput
    if (a.source is None) == (a.random_init is None):
        raise BadInput("export: give a CHECKPOINT_DIR or --random-init {tiny,3b,7b}, not both or neither")
    size = parse_image_size(a.image_size)
    if a.random_init is not None:
        weights = RandomWeights(preset(a.random_init), seed=a.seed)
    else:
        weights = CheckpointWeights(a.source)
    check_image_size(weights.cfg, size)
    report = export(weights, a.output, size, progress=not a.quiet, overwrite=a.force)
    print("\n".join(report.lines()))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect import inspect_model
    r = inspect_model(a.model)
    print(json.dumps(r.to_dict(), indent=1) if a.json else "\n".join(r.lines()))
    return 0


def cmd_split(a: argparse.Namespace) -> int:
    from passes.split import split
    from .modelfile import load_model
    from .errors import BadInput
    given = sum(x is not None for x in (a.parts, a.at, a.max_part_bytes))
    if given != 1:
        raise BadInput("split: give exactly one of --parts N, --at CUT[,CUT...], --max-part-bytes BYTES")
    at = [c for item in a.at for c in item.split(",") if c] if a.at else None
    report = split(load_model(a.model), a.output, parts=a.parts, at=at,
                   max_part_bytes=int(float(a.max_part_bytes)) if a.max_part_bytes else None,
                   force=a.force, progress=not a.quiet)
    print("\n".join(report.lines()))
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from passes.merge import merge_to_file
    report = merge_to_file(a.split_dir, a.output, overwrite=a.force, progress=not a.quiet)
    print("\n".join(report.lines() + [f"wrote {a.output} ({a.output.name}.data beside it)"]))
    return 0


def cmd_simplify(a: argparse.Namespace) -> int:
    from passes.simplify import simplify
    report = simplify(a.model, a.output, max_part_bytes=int(float(a.max_part_bytes)), method=a.method,
                      overwrite=a.force)
    print("\n".join(report.lines()))
    return 0


def cmd_fp16(a: argparse.Namespace) -> int:
    from passes.fp16 import convert_fp16

    def apply(model):
        keep_cal = None
        if a.calibrate:
            from .calibrate import calibrate, calibration_inputs
            cal = calibrate(a.model, calibration_inputs(a.model, a.calibrate), margin=a.calibrate_margin)
            print("\n".join(cal.lines()))
            keep_cal = cal.keep
        return convert_fp16(model, keep_silu=a.keep_silu_fp32, keep_rmsnorm=a.keep_rmsnorm_fp32,
                            keep_ops=a.keep_op or [], keep_nodes=a.keep_node or [], keep_calibrated=keep_cal,
                            keep_io_types=a.keep_io_types, explain=a.verbose)
    return _write_pass(a, apply)


def cmd_compare(a: argparse.Namespace) -> int:
    from .compare import compare, load_inputs
    feeds = load_inputs(a.ref, inputs=a.inputs, image=a.image, seed=a.seed)
    report = compare(a.ref, a.cand, feeds=feeds, emulate_fp16=a.emulate_fp16, atol=a.atol, rtol=a.rtol,
                     min_cosine=a.min_cosine, per_block=a.per_block, save_outputs=a.save_outputs,
                     save_inputs=a.save_inputs, verbose=a.verbose)
    print("\n".join(report.lines()))
    if a.json:
        Path(a.json).write_text(json.dumps(report.to_dict(), indent=1))
    return 0 if report.passed else 1


def cmd_attention(a: argparse.Namespace) -> int:
    from passes.attention import rewrite_attention
    return _write_pass(a, lambda model: rewrite_attention(model, mode=a.mode, upgrade_opset=a.upgrade_opset,
                                                          full_chunk_mb=a.full_chunk_mb))


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
    if not source:
        raise BadInput("run: give a SOURCE (checkpoint directory or .onnx export) or --random-init PRESET")
    if a.gen_script:
        print(gen_script(source, image_size, specs, a.output))
        return 0
    result = run_pipeline(out_dir=a.output, specs=specs, checkpoint=source.get("checkpoint"),
                          random_init=source.get("random_init"), seed=int(source.get("seed", 0)),
                          model=source.get("model"), image_size=image_size, force=a.force, progress=not a.quiet)
    print("\n".join(result.lines()))
    return 0 if result.compare.get("passed") else 1


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

    s = sub.add_parser("split", help="cut a model into N self-contained parts (< 2 GB each) + manifest.json",
                       epilog=_epilog("split") + "\n  qvl-surgery split out/model.onnx --at 16,merger -o out/parts"
                       "\n  qvl-surgery split out/model.onnx --max-part-bytes 1e9 -o out/parts",
                       formatter_class=fmt)
    s.add_argument("model", type=Path)
    s.add_argument("--parts", type=int, help="number of parts, balanced by weight bytes")
    s.add_argument("--at", action="append", help="explicit cut points: block index K (the hidden state entering "
                   "block K), 'merger', or a tensor name; comma separated or repeated")
    s.add_argument("--max-part-bytes", help="let the tool choose the fewest parts whose weights stay under this")
    add_write_options(s, what="output folder for partK.onnx(.data) and manifest.json")
    s.set_defaults(func=cmd_split)

    m = sub.add_parser("merge", help="join a split back into one model with external data", epilog=_epilog("merge"),
                       formatter_class=fmt)
    m.add_argument("split_dir", type=Path, help="folder written by split (or its manifest.json)")
    add_write_options(m)
    m.set_defaults(func=cmd_merge)

    si = sub.add_parser("simplify", help="onnxsim on a model of any size, part by part", epilog=_epilog("simplify"),
                        formatter_class=fmt)
    si.add_argument("model", type=Path)
    si.add_argument("--method", default="auto", choices=["auto", "whole", "parts"],
                    help="whole: onnxsim's path API on the whole model; parts: part by part; auto: whole, then parts "
                         "if onnxsim fails (default)")
    si.add_argument("--max-part-bytes", default="1.5e9", help="largest part handed to onnxsim (default 1.5e9)")
    add_write_options(si)
    si.set_defaults(func=cmd_simplify)

    f = sub.add_parser("fp16", help="convert to fp16 with whole-pattern fp32 islands", formatter_class=fmt,
                       epilog=_epilog("fp16"))
    f.add_argument("model", type=Path)
    f.add_argument("--keep-silu-fp32", action="store_true", help="keep each x*sigmoid(x) (Sigmoid + Mul) in fp32")
    f.add_argument("--keep-rmsnorm-fp32", action="store_true",
                   help="keep each RMSNorm (Pow, ReduceMean, Add eps, Sqrt, Div, scale) in fp32")
    f.add_argument("--keep-op", action="append", metavar="TYPE", help="keep every node of this op type (repeatable)")
    f.add_argument("--keep-node", action="append", metavar="GLOB",
                   help="keep nodes whose name matches, e.g. '/blocks.31/mlp/down_proj/*' (repeatable)")
    f.add_argument("--keep-io-types", action="store_true", help="keep float32 graph inputs and outputs")
    f.add_argument("--calibrate", metavar="INPUTS",
                   help="an .npz of inputs or image file(s), comma separated: keep in fp32 every node whose values "
                        "come within --calibrate-margin of fp16's range on the fp32 model")
    f.add_argument("--calibrate-margin", type=float, default=0.5, help="fraction of 65504 (default 0.5)")
    add_write_options(f)
    f.set_defaults(func=cmd_fp16)

    c = sub.add_parser("compare", help="compare two models or splits on the same inputs (polygraphy)",
                       formatter_class=fmt, epilog=_epilog("compare"))
    c.add_argument("ref", type=Path, help="reference model, or split folder / manifest.json")
    c.add_argument("cand", type=Path, help="candidate model, or split folder / manifest.json")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--inputs", help=".npz with one array per model input")
    src.add_argument("--image", help="an image, resized to the export size and run through transformers' processor")
    c.add_argument("--seed", type=int, default=0, help="seed of the random input when neither is given")
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

    at = sub.add_parser("attention", help="rewrite attention: windowed blocks without dense masks, or fused ops",
                        formatter_class=fmt, epilog=_epilog("attention"))
    at.add_argument("model", type=Path)
    at.add_argument("--mode", default="windowed", choices=["windowed", "mha", "onnx-attention"],
                    help="windowed: batched per-window attention (default); mha: com.microsoft.MultiHeadAttention "
                         "for onnxruntime; onnx-attention: the ONNX Attention op (opset 23)")
    at.add_argument("--upgrade-opset", action="store_true", help="with onnx-attention: raise the model to opset 23")
    at.add_argument("--full-chunk-mb", type=float, default=256,
                    help="windowed mode: full-attention layers whose S x S scores exceed this many MB compute their "
                         "queries in chunks under it (default 256; 0: never)")
    add_write_options(at)
    at.set_defaults(func=cmd_attention)

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
