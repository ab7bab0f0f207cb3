"""One small exception hierarchy. The CLI maps a QvlError to its ``exit_code`` (BadInput: 2; a failed
comparison is a report with exit 1, not an exception).

Library errors speak of the library's parameters: a message names an option as ``{parts}``
in its template and the option's value goes beside it, so ``str(error)`` reads
``parts=0: need at least 1 part`` for a Python caller, while the CLI renders the same error
with its own flag (``--parts 0: need at least 1 part``), from the pass's option specs.
"""
from __future__ import annotations

from typing import Callable


class QvlError(Exception):
    """Base of every error this toolkit raises on purpose."""

    exit_code = 2


class BadInput(QvlError):
    """The input (file, directory, option) cannot be used; the message says what to do.

    ``BadInput("{parts}: need at least 1 part", parts=0)``: each ``{name}`` is a library parameter,
    rendered ``name=value`` here and ``--flag value`` by the CLI (:meth:`render`).
    """

    exit_code = 2

    def __init__(self, message: str, **params: object):
        self.template = message
        self.params = params
        super().__init__(self.render(None))

    def render(self, flag_of: Callable[[str], str | None] | None) -> str:
        """The message with each parameter written as a CLI flag (``flag_of(name)``), or as
        ``name=value`` where ``flag_of`` is None or knows no flag for it."""
        words = {}
        for name, value in self.params.items():
            flag = flag_of(name) if flag_of else None
            if flag is None:
                words[name] = f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"
            elif value is True:
                words[name] = flag
            else:
                words[name] = f"{flag} {value}"
        text = self.template
        for name, word in words.items():  # only the named parameters: other braces stay as they are
            text = text.replace("{" + name + "}", word)
        return text
