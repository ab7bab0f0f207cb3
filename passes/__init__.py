"""The graph passes and their registry: one module per pass, each a :class:`qvl_surgery.core.passbase.Pass`.

Adding a pass: write its module with a Pass subclass (name, help, example, takes/gives, options,
apply) and list it in ``PASSES`` below; its CLI subcommand, ``--passes``/recipe parsing,
``--gen-script`` text and metadata record all follow from that class. Layering: this package
imports the core (``qvl_surgery`` below the app), and the core never imports it.
"""
from __future__ import annotations

from typing import Any

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.passbase import Pass, check_chain

from .attention import AttentionPass
from .fp16 import Fp16Pass
from .merge import MergePass
from .quantize import QuantizePass
from .rotate import RotatePass
from .simplify import SimplifyPass
from .smooth import SmoothPass
from .split import SplitPass

PASSES: dict[str, type[Pass]] = {p.name: p for p in (
    AttentionPass,
    Fp16Pass,
    SplitPass,
    MergePass,
    SimplifyPass,
    QuantizePass,
    RotatePass,
    SmoothPass,
)}


def register(cls: type[Pass]) -> type[Pass]:
    """Add a pass to the registry (a plug-in, or a test's own pass); returns it, so it decorates."""
    if not cls.name or cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} is empty or taken")
    PASSES[cls.name] = cls
    return cls


def get_pass(name: str | None, where: str = "passes") -> type[Pass]:
    if name not in PASSES:
        raise BadInput(f"{where}: unknown pass {name!r} (known: {', '.join(PASSES)})")
    return PASSES[name]


def _is_option_of(name: str, segment: str) -> bool:
    cls = PASSES.get(name)
    return cls is not None and segment.partition("=")[0].strip() in {o.name for o in cls.options}


def _pass_items(text: str) -> list[str]:
    """``--passes`` text cut into one item per pass. A comma starts a new pass where a pass name
    follows; before another option of the same pass it separates options
    (``quantize:activations=int8,format=onnxruntime``); elsewhere it belongs to the value before it
    (``fp16:calibrate=a.png,b.png``)."""
    items: list[str] = []
    for piece in text.split(","):
        piece = piece.strip()
        head = piece.partition(":")[0]
        current = items[-1].partition(":")[0] if items else ""
        if not items or head in PASSES:
            items.append(piece)
        elif _is_option_of(current, piece):
            items[-1] += ("+" if ":" in items[-1] else ":") + piece
        else:
            items[-1] += "," + piece
    return [i for i in items if i]


def _option_items(name: str, rest: str) -> list[str]:
    """A pass's option text cut into options: ``+`` separates them, and ``:`` where an option name
    follows (elsewhere a colon is part of the value: ``calibrate=random:8``)."""
    out: list[str] = []
    for chunk in rest.split("+"):
        segments = chunk.split(":")
        current = segments[0]
        for seg in segments[1:]:
            if _is_option_of(name, seg):
                out.append(current)
                current = seg
            else:
                current += ":" + seg
        out.append(current)
    return [o for o in out if o]


def parse_spec(text: str) -> list[Pass]:
    """``attention,fp16:keep_silu_fp32+keep_op=Softmax|Pow,split:parts=3`` -> pass instances."""
    out = []
    for item in _pass_items(text):
        name, _, rest = item.partition(":")
        cls = get_pass(name, "--passes")
        opts: dict[str, Any] = {}
        for o in _option_items(name, rest):
            k, eq, v = o.partition("=")
            opts[k] = v if eq else True
        out.append(cls(**cls.check_options(opts, where=f"pass {name}")))
    check_chain(out)
    return out


def spec_from_dict(items: list[dict], where: str) -> list[Pass]:
    """A recipe's ``passes`` list: ``[{"pass": "fp16", "keep_silu_fp32": true}, ...]``."""
    if not isinstance(items, list):
        raise BadInput(f"{where}: 'passes' must be a list like [{{\"pass\": \"fp16\"}}]")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise BadInput(f"{where}: each pass must be an object like {{\"pass\": \"fp16\"}}")
        item = dict(item)
        name = item.pop("pass", None)
        cls = get_pass(name, where)
        out.append(cls(**cls.check_options(item, where=f"{where}: pass {name}")))
    check_chain(out)
    return out


def option_flag(name: str) -> str | None:
    """The CLI flag of a pass option named ``name``."""
    for cls in PASSES.values():
        for o in cls.options:
            if name == o.name:
                return o.cli_flag
    return None


__all__ = ["PASSES", "register", "get_pass", "parse_spec", "spec_from_dict", "option_flag", "AttentionPass",
           "Fp16Pass", "MergePass", "QuantizePass", "RotatePass", "SimplifyPass", "SmoothPass", "SplitPass"]
