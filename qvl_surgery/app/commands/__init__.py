"""The ``qvl-surgery`` subcommands, one module each (polygraphy's tools): a :class:`~.args.Command`
adds its parser and argument groups (:mod:`.args`), runs, and prints its ``--gen-script``. The pass
subcommands come from the pass registry (:mod:`.pass_command`)."""
from __future__ import annotations

from .compare import Compare
from .export import Export
from .inspect import Inspect
from .package import Package
from .pass_command import PassCommand
from .run import Run
from .sensitivity import Sensitivity
from .toolchains import Toolchains

# the subcommands that are not passes, in --help's order; the pass subcommands go after inspect
BEFORE_PASSES = (Export(), Inspect())
AFTER_PASSES = (Compare(), Package(), Sensitivity(), Toolchains(), Run())


def commands() -> list:
    """Every subcommand, in --help's order."""
    from passes import PASSES
    return [*BEFORE_PASSES, *(PassCommand(cls) for cls in PASSES.values()), *AFTER_PASSES]
