"""Argument groups shared by the subcommands (polygraphy's ``tools/args``). A group adds its
arguments to a parser, turns the parsed namespace into the library's keyword arguments
(:meth:`ArgGroup.values`), and renders those same keywords as Python for ``--gen-script``
(:meth:`ArgGroup.render`): a command that calls the library with ``**group.values(a)`` and prints
``group.render(a)`` cannot drop an option from its script."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qvl_surgery.core.errors import BadInput

DEFAULT_IMAGE_SIZE = "448x448"
GEN_SCRIPT_HELP = "print the equivalent Python API calls and exit"


def epilog(example: str) -> str:
    return ("example:\n  " + example) if example else ""


def add_gen_script(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen-script", action="store_true", help=GEN_SCRIPT_HELP)


def py(value: Any) -> str:
    """A value as Python source (paths as their text)."""
    if isinstance(value, Path):
        return repr(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(py(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {py(v)}" for k, v in value.items()) + "}"
    return repr(value)


def kwargs_source(values: dict[str, Any]) -> str:
    """Keyword arguments as Python source: ``a=1, b='x'``."""
    return ", ".join(f"{k}={py(v)}" for k, v in values.items())


class Command:
    """One subcommand (polygraphy's Tool): its name is the class's, its help the class's docstring;
    its parser (:meth:`add_arguments`, then the groups in ``after``, then ``--gen-script``), its work
    (:meth:`run`) and, with ``--gen-script``, the Python that does the same (:meth:`script`, which
    makes the same argument checks as :meth:`run` before it prints anything)."""
    example = ""
    after: tuple = ()

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    @property
    def help(self) -> str:
        return " ".join((type(self).__doc__ or "").split())

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def run(self, a: argparse.Namespace) -> int:
        raise NotImplementedError

    def script(self, a: argparse.Namespace) -> list[str]:
        raise NotImplementedError

    def add_to(self, sub) -> argparse.ArgumentParser:
        p = sub.add_parser(self.name, help=self.help, epilog=epilog(self.example),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(p)
        for group in self.after:
            group.add(p)
        if p.get_default("gen_script") is None:   # where the command did not place it itself
            add_gen_script(p)
        p.set_defaults(func=self)
        return p

    def __call__(self, a: argparse.Namespace) -> int:
        if getattr(a, "gen_script", False):
            print("\n".join(self.script(a)))
            return 0
        return self.run(a)


def print_report(name: str = "report") -> str:
    return f"print('\\n'.join({name}.lines()))"


class ArgGroup:
    """A set of arguments that several subcommands share."""

    def add(self, p: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def values(self, a: argparse.Namespace) -> dict[str, Any]:
        """The library's keyword arguments these arguments give."""
        raise NotImplementedError

    def render(self, a: argparse.Namespace) -> str:
        """:meth:`values` as Python keyword arguments (``--gen-script``)."""
        return kwargs_source(self.values(a))


class WriteArgs(ArgGroup):
    """-o/--output, --force, -q/--quiet (and --single-file where a model is written): every
    subcommand that writes."""

    def __init__(self, what: str = "output model (.onnx; its .onnx.data goes beside it)", *, model: bool = True):
        self.what, self.model = what, model

    def add(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("output")
        g.add_argument("-o", "--output", required=True, type=Path, help=self.what)
        g.add_argument("--force", action="store_true", help="replace an existing output")
        g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        if self.model:
            g.add_argument("--single-file", action="store_true",
                           help="one self-contained .onnx with every weight inline (models under 2 GB, e.g. the fp16 "
                                "encoder; MNN misreads fp16 external data), still written by streaming")

    def values(self, a: argparse.Namespace) -> dict[str, Any]:
        out = {"overwrite": a.force, "progress": not a.quiet}
        if self.model:
            out["single_file"] = a.single_file
        return out


class SourceArgs(ArgGroup):
    """SOURCE, --random-init, --seed, --image-size, --dynamic: what export and run build from."""

    def __init__(self, source_help: str):
        self.source_help = source_help

    def add(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("source", nargs="?", type=Path, help=self.source_help)
        p.add_argument("--random-init", metavar="{tiny,3b,7b}", help="build from a published config with random weights")
        p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
        p.add_argument("--image-size", help="HEIGHTxWIDTH in pixels, multiples of 28 (default 448x448); static exports")
        p.add_argument("--dynamic", nargs="?", const="self", choices=["self", "host"],
                       help="one file for any image size, several images and video: inputs pixel_values + "
                            "image_grid_thw (self, the default), or pixel_values + grid tensors computed on the host "
                            "(host: qvl_surgery.core.hostinputs.host_inputs)")

    def values(self, a: argparse.Namespace) -> dict[str, Any]:
        """The source as :func:`~qvl_surgery.app.pipeline.weights_of` takes it (export: a checkpoint
        directory or a preset)."""
        if (a.source is None) == (a.random_init is None):
            raise BadInput("export: give a CHECKPOINT_DIR or --random-init {tiny,3b,7b}, not both or neither")
        if a.random_init is not None:
            return {"random_init": a.random_init, "seed": a.seed}
        return {"checkpoint": a.source}


def _scheme_options():
    from qvl_surgery.analysis.sensitivity import scheme_options
    return scheme_options()


def _scheme(a: argparse.Namespace, budget: float | None = None) -> dict:
    """quantize's scheme options from a subcommand that shares them (sensitivity, toolchains), with
    the measurement defaults (analysis.sensitivity), checked as quantize checks them, before any work."""
    import dataclasses
    from passes.quantize import SCHEME_OPTIONS, check_budget_and_method
    from qvl_surgery.analysis.sensitivity import measured_scheme
    scheme = measured_scheme({o.name: getattr(a, o.name, None) for o in SCHEME_OPTIONS})
    scheme.block   # runs check_scheme
    out = dataclasses.asdict(scheme)
    check_budget_and_method({**out, "budget": budget})
    return out


class SchemeArgs(ArgGroup):
    """quantize's scheme options on a subcommand that measures with them (sensitivity, toolchains)."""

    def __init__(self, title: str):
        self.title = title

    def add(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group(self.title)
        for o in _scheme_options():
            o.add_to_parser(g)

    def given(self, a: argparse.Namespace) -> list[str]:
        """The flags of the scheme options given on the command line."""
        return [o.cli_flag for o in _scheme_options() if getattr(a, o.name, None) is not None]

    def values(self, a: argparse.Namespace, budget: float | None = None) -> dict[str, Any]:
        return _scheme(a, budget)


class ModelArgs(ArgGroup):
    """The model file(s) a command reads (positional), checked before any work; with their data
    files they are what an output must not touch."""

    def __init__(self, dest: str = "model", *, many: bool = False, help: str | None = None):
        self.dest, self.many, self.help = dest, many, help

    def add(self, p: argparse.ArgumentParser) -> None:
        kw: dict[str, Any] = {"type": Path}
        if self.many:
            kw["nargs"] = "+"
        if self.help:
            kw["help"] = self.help
        p.add_argument(self.dest, **kw)

    def paths(self, a: argparse.Namespace) -> list[Path]:
        v = getattr(a, self.dest)
        return list(v) if self.many else [v]

    def values(self, a: argparse.Namespace) -> dict[str, Any]:
        return {self.dest: getattr(a, self.dest)}

    def guard(self, a: argparse.Namespace) -> list[Path]:
        return model_and_data(self.paths(a))


def check_model_file(path: Path) -> None:
    """A model file given as an argument: there, and a file (a folder is not 'no such file')."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path}: is a folder; this command takes a model file (.onnx)")
    if not path.is_file():
        raise BadInput(f"{path}: no such model file")


def model_and_data(paths: list[Path]) -> list[Path]:
    """Model files given as arguments, checked, with their data files: what an output must not touch."""
    from qvl_surgery.core.modelfile import load_model
    out: list[Path] = []
    for m in paths:
        check_model_file(m)
        out += [m, *sorted(load_model(m).data_files())]
    return out


class FeedArgs(ArgGroup):
    """What a model is fed (compare): an .npz, images, video frames, or random pixels at sizes."""

    def add(self, p: argparse.ArgumentParser) -> None:
        src = p.add_mutually_exclusive_group()
        src.add_argument("--inputs", help=".npz with one array per model input (a dynamic model: pixel_values and "
                         "image_grid_thw)")
        src.add_argument("--image", help="image file(s), comma separated, through transformers' processor: resized to "
                         "the export size (static), or each at its own size in one call (dynamic); an image-in "
                         "export takes the resized image itself (beside a pixel_values export: the same picture)")
        p.add_argument("--video", help="dynamic models: video frames (image files, comma separated; two per temporal "
                       "patch), after the --image images in the same call")
        p.add_argument("--image-size", help="dynamic models: random images of these sizes in one call, HxW[,HxW...] "
                       "(default 448x448)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random input when no file is given")

    def values(self, a: argparse.Namespace) -> dict[str, Any]:
        """:func:`~qvl_surgery.core.inputs.load_inputs`'s keywords."""
        return {"inputs": a.inputs, "image": a.image, "video": a.video, "image_size": a.image_size, "seed": a.seed}
