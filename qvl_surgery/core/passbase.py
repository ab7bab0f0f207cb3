"""The pass protocol: one shape for every graph pass, and one declarative option spec per pass.

A pass is a class in ``passes/`` with

- ``name`` and ``help`` (one line),
- ``takes`` / ``gives``: ``"model"`` (a weightless :class:`~qvl_surgery.core.modelfile.Model`) or
  ``"split"`` (a :class:`~qvl_surgery.splitvalue.Split`: parts plus what the manifest records),
- ``options``: a tuple of :class:`Option` (name, type, default, choices, help),
- ``apply(value, context) -> PassResult`` (the value and a :class:`PassReport`); the options are
  ``self.o``.

Calling a pass instance (``Fp16(keep_silu_fp32=True)(model)``) checks and coerces the options,
runs ``apply``, and records the pass in the result's ``qvl_surgery.passes`` metadata, so every
output tells how it was made. :class:`Sequential` runs several; a failure names the passes that ran
before it (as onnx-ir's passes do).

Everything else is derived from the option specs: the subcommand's CLI flags
(:meth:`Option.add_to_parser`), ``--passes``/recipe parsing (``passes.parse_spec``,
``passes.spec_from_dict``: the registry lives with the passes, this core module never imports
them), ``--gen-script`` (:meth:`Pass.call_source`), the library function
(:meth:`Pass.function`: ``convert_fp16 = Fp16Pass.function("convert_fp16")``) and the values
``apply`` reads (``self.o.keep_silu_fp32``: every option, defaults filled in). The spec is the only
place an option and its default exist: adding a pass is its module and its line in
``passes.PASSES``; adding an option is its ``Option(...)`` line.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, ClassVar

from qvl_surgery.core.errors import BadInput, QvlError

log = logging.getLogger(__name__)

PASSES_KEY = "qvl_surgery.passes"
JUDGEMENT_KEY = "qvl_surgery.judgement"

_TRUE = ("1", "true", "yes", "on", "")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Option:
    """One option of a pass, declared once: ``name`` is the recipe / ``--passes`` key, the library
    function's keyword, and gives the CLI flag (``keep_silu_fp32`` -> ``--keep-silu-fp32``). ``type`` is bool, int, float, str or list (of str; ``|`` separates items in
    ``--passes``, commas or repetition on the command line)."""

    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: tuple = ()
    metavar: str | None = None
    flag: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` (from a recipe, ``--passes`` text or a Python call) as this option's type."""
        typ = self.type
        try:
            if value is None:
                v = None
            elif typ is bool:
                if isinstance(value, bool):
                    v = value
                elif str(value).lower() in _TRUE:
                    v = True
                elif str(value).lower() in _FALSE:
                    v = False
                else:
                    raise ValueError
            elif typ is list:
                if isinstance(value, (list, tuple)):
                    v = [str(x) for x in value]
                else:
                    v = [x for x in str(value).replace(",", "|").split("|") if x]
            elif typ is int:
                if isinstance(value, bool):
                    raise ValueError
                f = float(value)
                if f != int(f):
                    raise ValueError
                v = int(f)
            elif typ is float:
                if isinstance(value, bool):
                    raise ValueError
                v = float(value)
            else:
                v = typ(value)
        except (TypeError, ValueError):
            raise BadInput(f"{where}: " + "{" + self.name + "}" + f" is not a {typ.__name__}",
                           **{self.name: value}) from None
        if self.choices and v is not None and v not in self.choices:
            raise BadInput(f"{where}: " + "{" + self.name + "}" + f": choose one of {', '.join(map(str, self.choices))}",
                           **{self.name: v})
        return v

    def add_to_parser(self, parser: argparse._ActionsContainer) -> None:
        """This option as a flag of the pass's own subcommand."""
        kw: dict[str, Any] = {"dest": self.name}
        help_text = self.help
        if self.type is bool:
            kw["action"] = "store_true"
        elif self.type is list:
            kw.update(action="append", metavar=self.metavar or self.name.upper())
        else:
            kw.update(default=None, metavar=self.metavar or (None if self.choices else self.name.upper()))
            if self.choices:
                kw["choices"] = list(self.choices)
            if self.default is not None:
                help_text += f" (default {self.default})"
        parser.add_argument(self.cli_flag, help=help_text, **kw)

    def from_namespace(self, a: argparse.Namespace) -> Any:
        v = getattr(a, self.name, None)
        if self.type is list and v:
            v = [x for item in v for x in str(item).split(",")]   # an empty item is refused by the pass, not dropped
        return v


@dataclass(kw_only=True)
class PassReport:
    """What a pass did. Every pass's report is one of these (its own subclass adds the fields it
    needs); ``misses`` (patterns tried that did not match, and why) and ``skipped`` (options that
    found nothing to act on) are shared, and :meth:`lines` / :meth:`to_dict` print and save it."""

    pass_name: str = ""
    misses: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        return [f"{self.pass_name}: done"]

    def lines(self) -> list[str]:
        return self.summary()

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, dict):
                return {str(k): plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


@dataclass
class PassResult:
    value: Any            # a Model, or a Split
    report: PassReport


@dataclass(frozen=True)
class Judgement:
    """How a pass's result is judged against its input (``run``'s comparison, tests): tolerances,
    the cosine floor (plain and token-centered), and the emulation that shows the error where
    onnxruntime's CPU provider would hide it (``"fp16"``). A chain is judged by its loosest pass."""

    atol: float = 1e-4
    rtol: float = 1e-4
    min_cosine: float = 0.99999
    emulate: str | None = None
    label: str = "fp32"
    min_centered_cosine: float | None = None   # token-centered cosine floor (lossy passes: see compare)

    @staticmethod
    def loosest(judgements: "list[Judgement]") -> "Judgement":
        out = Judgement()
        for j in judgements:
            floors = [f for f in (out.min_centered_cosine, j.min_centered_cosine) if f is not None]
            out = Judgement(max(out.atol, j.atol), max(out.rtol, j.rtol), min(out.min_cosine, j.min_cosine),
                            out.emulate or j.emulate, j.label if j.label != "fp32" else out.label,
                            min(floors) if floors else None)
        return out


EXACT = Judgement()


@dataclass
class Context:
    """What a pass may need beyond its value and options: where the fp32 reference lives (fp16
    calibration runs it), whether to show progress, whether to explain misses."""

    reference: Path | None = None
    progress: bool = False
    explain: bool = False
    workdir: Path | None = None   # scratch space that outlives the pass (simplify writes its result there)


class Pass:
    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    takes: ClassVar[str] = "model"
    gives: ClassVar[str] = "model"
    options: ClassVar[tuple[Option, ...]] = ()
    # the subcommand's example command line(s) (help epilog, README)
    example: ClassVar[str] = ""
    # how the result is judged against the input (lossless passes: EXACT)
    judgement: ClassVar[Judgement] = EXACT

    def __init__(self, **options: Any):
        self.values = self.check_options(options, where=f"pass {self.name}")

    # options ---------------------------------------------------------------------------------
    @classmethod
    def option(cls, name: str) -> Option:
        for o in cls.options:
            if o.name == name:
                return o
        raise KeyError(name)

    @classmethod
    def check_options(cls, given: dict[str, Any], *, where: str) -> dict[str, Any]:
        """Options by name, coerced; the ones not given are left out."""
        out: dict[str, Any] = {}
        for key, value in given.items():
            try:
                opt = cls.option(key)
            except KeyError:
                known = ", ".join(o.name for o in cls.options) or "none"
                raise BadInput(f"{where}: unknown option {key!r} (known: {known})") from None
            v = opt.coerce(value, where)
            if v is not None and v != [] and v is not False and v != opt.default:
                out[opt.name] = v
        return out

    def kwargs(self) -> dict[str, Any]:
        """Every option by name, defaults filled in."""
        kw = {o.name: o.default for o in self.options}
        kw.update(self.values)
        return kw

    @property
    def o(self) -> SimpleNamespace:
        """Every option as an attribute, defaults filled in (list options default to ``[]``): what
        ``apply`` reads."""
        return SimpleNamespace(**{k: ([] if v is None and self.option(k).type is list else v)
                                  for k, v in self.kwargs().items()})

    def text(self) -> str:
        """This pass as ``--passes`` text: ``fp16:keep_silu_fp32+keep_op=Softmax|Pow``."""
        if not self.values:
            return self.name
        items = []
        for k, v in self.values.items():
            items.append(k if v is True else f"{k}={'|'.join(v) if isinstance(v, list) else v}")
        return self.name + ":" + "+".join(items)

    # running ---------------------------------------------------------------------------------
    def preflight(self, facts: dict[str, Any]) -> None:
        """Refuse, before anything runs (``run`` checks every pass before it exports), what this pass
        will refuse anyway. ``facts``: what the input will be (``dynamic``: None, "self" or "host")."""

    def apply(self, value: Any, context: Context) -> PassResult:
        raise NotImplementedError

    def __call__(self, value: Any, context: Context | None = None) -> PassResult:
        from qvl_surgery.core.buckets import Buckets
        context = context or Context()
        if isinstance(value, Buckets):
            return self._each_bucket(value, context)
        result = self.apply(value, context)
        result.report.pass_name = self.name
        record_pass(result.value, self.text(), self.judgement)
        return result

    def _each_bucket(self, value: Any, context: Context) -> PassResult:
        """A model pass on every size of a bucket folder (each size's own file is its reference);
        the report is the first size's, with a line per other size."""
        from dataclasses import replace
        from qvl_surgery.core.buckets import Buckets
        if self.takes != "model" or self.gives != "model":
            raise BadInput(f"{self.name}: a bucket folder runs model-to-model passes, size by size; {self.name} "
                           "each size's file on its own (DIR/HxW.onnx)")
        models, first = {}, None
        for key, model in value.models.items():
            r = self(model, replace(context, reference=model.path or context.reference))
            models[key] = r.value
            if first is None:
                first = r.report
                first.skipped.append(f"bucket folder: the report of {key}; the same pass ran on "
                                     f"{', '.join(k for k in value.models if k != key) or 'no other size'}")
        return PassResult(Buckets(models, value.max_pixels), first)

    def call_source(self) -> tuple[str, str]:
        """This pass in Python (``--gen-script``): the import line and the constructor call."""
        cls = type(self)
        args = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"from {cls.__module__} import {cls.__name__}", f"{cls.__name__}({args})"

    @classmethod
    def function(cls, name: str) -> Callable[..., tuple[Any, PassReport]]:
        """The pass as a library function ``name(value, *, reference=None, progress=False,
        explain=False, workdir=None, **options) -> (value, report)``: the :class:`Context` fields
        and this pass's options by name (``convert_fp16(model, keep_silu_fp32=True)``)."""
        def run(value: Any, *, reference: str | Path | None = None, progress: bool = False, explain: bool = False,
                workdir: str | Path | None = None, **options: Any) -> tuple[Any, PassReport]:
            context = Context(reference=Path(reference) if reference else None, progress=progress, explain=explain,
                              workdir=Path(workdir) if workdir else None)
            r = cls(**options)(value, context)
            return r.value, r.report
        run.__name__ = run.__qualname__ = name
        run.__module__ = cls.__module__
        run.__doc__ = (f"The {cls.name} pass ({cls.__name__}) as a function: {cls.help}. Options (default):\n"
                       + "\n".join(f"    {o.name} ({o.default!r}): {o.help}" for o in cls.options))
        return run


def record_pass(value: Any, text: str, judgement: Judgement = EXACT) -> None:
    """Append ``text`` to ``qvl_surgery.passes`` of a Model, or of every part of a Split, and keep
    the loosest judgement so far in ``qvl_surgery.judgement`` (``compare`` judges the file by it)."""
    models = [value] if hasattr(value, "set_metadata") else [p.model for p in getattr(value, "parts", [])]
    for m in models:
        meta = m.metadata()
        done = json.loads(meta.get(PASSES_KEY, "[]") or "[]")
        m.set_metadata(PASSES_KEY, json.dumps(done + [text]))
        j = Judgement.loosest([judgement_of_metadata(meta), judgement])
        if j != EXACT:
            m.set_metadata(JUDGEMENT_KEY, json.dumps(asdict(j)))


def judgement_of_metadata(meta: dict[str, str]) -> Judgement:
    """The judgement a file's passes recorded (EXACT when none did)."""
    raw = meta.get(JUDGEMENT_KEY)
    if not raw:
        return EXACT
    try:
        return Judgement(**json.loads(raw))
    except (TypeError, ValueError):
        return EXACT


class Sequential:
    """Run passes in order, each on the value the one before gave. A pass whose input kind does not
    match (a model pass after split) is refused before anything runs; a failure names the passes
    that ran before it."""

    def __init__(self, passes: list[Pass], *, first: str = "model"):
        self.passes = list(passes)
        check_chain(self.passes, first=first)

    def __call__(self, value: Any, context: Context | None = None,
                 on_report=None) -> tuple[Any, list[PassReport]]:
        reports = []
        done: list[str] = []
        for p in self.passes:
            try:
                r = p(value, context)
            except QvlError:
                raise
            except Exception as e:  # a bug: say where it happened
                raise RuntimeError(f"pass {p.text()} failed after [{', '.join(done)}]: {e}") from e
            value = r.value
            reports.append(r.report)
            if on_report:
                on_report(p, r.report)
            done.append(p.text())
        return value, reports


def check_chain(passes: list[Pass], *, first: str = "model") -> None:
    if not passes:
        raise BadInput("no pass given (e.g. attention,fp16:keep_silu_fp32,split:parts=3)")
    kind = first
    prev = None
    for p in passes:
        if p.takes != kind:
            if kind == "split":
                raise BadInput(f"pass {p.name} takes a model but {prev.name} gives a split: split must be the "
                               "last pass (it writes the parts), or be followed by merge")
            raise BadInput(f"pass {p.name} takes a split; put split (or nothing) before it")
        kind, prev = p.gives, p


def refuse_split_part(model, what: str) -> None:
    """A pass that rewrites the whole residual stream (smooth, rotate) refuses one part of a split:
    the rest of the chain would not match it."""
    import json
    part = model.metadata().get("qvl_surgery.part")
    if part:
        p = json.loads(part)
        raise BadInput(f"{what}: the model is part {p.get('index')} of a split of {p.get('of')}; {what} the whole "
                       f"model, then split (qvl-surgery merge joins the parts)")
