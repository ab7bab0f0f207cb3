"""One small exception hierarchy. The CLI maps BadInput -> exit 2, ToleranceFailed -> exit 1."""


class QvlError(Exception):
    """Base of every error this toolkit raises on purpose."""

    exit_code = 2


class BadInput(QvlError):
    """The input (file, directory, option) cannot be used; the message says what to do."""

    exit_code = 2


class ToleranceFailed(QvlError):
    """A comparison ran and its result is outside the tolerance."""

    exit_code = 1
