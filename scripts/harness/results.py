"""A child hands its result to its parent as one line of JSON on stdout, marked so that whatever else
the child (or a library it loads) prints cannot be taken for it; the parent reads the last such line."""
from __future__ import annotations

import json
import sys

MARK = "@qvl-result "


def emit(result: dict, stream=None) -> None:
    """Print ``result`` as the child's one result line."""
    stream = stream or sys.stdout
    stream.write(MARK + json.dumps(result) + "\n")
    stream.flush()


def parse(text: str) -> dict | None:
    """The result line of a child's output, or None when it printed none (it failed before)."""
    for line in reversed(text.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return None
