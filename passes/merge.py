"""merge: join the parts of a split into one model with external data (the rules are
:mod:`qvl_surgery.core.cutting`'s; bytes are streamed by the model writer)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from qvl_surgery.core.cutting import join_parts
from qvl_surgery.core.passbase import Context, Pass, PassReport, PassResult
from qvl_surgery.core.values import Split, read_value, write_value

log = logging.getLogger(__name__)


@dataclass
class MergeReport(PassReport):
    parts: int
    nodes: int
    dropped_nodes: int
    shared_initializers: int

    def summary(self) -> list[str]:
        return [f"merged {self.parts} parts: {self.nodes} nodes ({self.dropped_nodes} repeated constant nodes "
                f"kept once), {self.shared_initializers} repeated initializers stored once"]


def merge_to_file(split_dir: str | Path, out: str | Path, *, overwrite: bool = False,
                  progress: bool = False) -> MergeReport:
    """merge + write. The parts' hashes are checked in the background while the bytes are copied;
    a mismatch stops the publish, so nothing is left behind."""
    with read_value(split_dir, "split").checked() as src:
        result = MergePass()(src.value)
        write_value(result.value, out, overwrite=overwrite, progress=progress, inputs=src.files,
                    before_publish=src.verify)
    return result.report


class MergePass(Pass):
    name = "merge"
    help = "join a split back into one model with external data"
    takes = "split"
    example = "qvl-surgery merge out/parts -o out/merged.onnx"

    def apply(self, value: Split, context: Context) -> PassResult:
        model, stats = join_parts([p.model for p in value.parts], value.inputs)
        return PassResult(model, MergeReport(**vars(stats)))


merge_split = MergePass.function("merge_split")
