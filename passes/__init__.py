"""One module per graph pass; each defines a :class:`qvl_surgery.passbase.Pass` subclass.

Adding a pass: write its module with a Pass subclass (name, help, takes/gives, options, apply)
and list it here; the CLI subcommand, ``--passes``/recipe parsing and ``--gen-script`` follow.
"""
from .attention import AttentionPass
from .fp16 import Fp16Pass
from .merge import MergePass
from .quantize import QuantizePass
from .simplify import SimplifyPass
from .split import SplitPass

PASSES = {p.name: p for p in (AttentionPass, Fp16Pass, SplitPass, MergePass, SimplifyPass, QuantizePass)}

__all__ = ["PASSES", "AttentionPass", "Fp16Pass", "MergePass", "SimplifyPass", "SplitPass"]
