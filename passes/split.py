"""split: cut one model into N self-contained parts by node range (< 2 GB each).

The cut rules are :mod:`qvl_surgery.core.cutting`'s. The pass gives a
:class:`~qvl_surgery.core.values.Split` value; :func:`~qvl_surgery.core.values.write_value` writes the
parts and manifest.json into a staged sibling folder renamed at the end (an output folder is replaced
only with ``force`` and only when the toolkit wrote it)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from qvl_surgery.core.cutting import cut_model
from qvl_surgery.core.manifest import read_manifest
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.passbase import Context, Option, Pass, PassReport, PassResult
from qvl_surgery.core.values import check_output, split_dir_of, write_value

log = logging.getLogger(__name__)


@dataclass
class SplitReport(PassReport):
    cuts: list[str]
    candidates: int = 0
    parts: list[dict] = field(default_factory=list)   # per part: nodes, weight bytes, inputs, outputs
    written: list[str] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)   # the manifest's part entries, once written

    def summary(self) -> list[str]:
        out = [f"split into {len(self.cuts) + 1} parts at {', '.join(self.cuts) or '(no cut)'} "
               f"({self.candidates} candidate cut points)"]
        for k, p in enumerate(self.parts):
            out.append(f"  part{k:<8} {p['nodes']:5d} nodes  {p['weight_bytes'] / 1e9:7.3f} GB  "
                       f"{', '.join(p['inputs'])} -> {', '.join(p['outputs'])}")
        return out + self.written


def split(model: Model, out_dir: str | Path, *, parts: int | None = None, at: list[str] | None = None,
          max_part_bytes: float | None = None, force: bool = False, progress: bool = False) -> SplitReport:
    """:func:`split_model`, then the parts written to ``out_dir`` (:func:`qvl_surgery.core.values.write_value`)."""
    check_output("split", out_dir, overwrite=force)
    value, report = split_model(model, parts=parts, at=at, max_part_bytes=max_part_bytes)
    report.written = write_value(value, out_dir, overwrite=force, progress=progress)
    report.entries = read_manifest(split_dir_of(out_dir), verify_hashes=False).parts
    return report


class SplitPass(Pass):
    name = "split"
    help = "cut a model into N self-contained parts (< 2 GB each) + manifest.json"
    gives = "split"
    example = ("qvl-surgery split out/model.onnx --parts 3 -o out/parts\n"
               "  qvl-surgery split out/model.onnx --at 16,merger -o out/parts\n"
               "  qvl-surgery split out/model.onnx --max-part-bytes 1e9 -o out/parts")
    options = (
        Option("parts", int, None, "number of parts, balanced by weight bytes", metavar="N"),
        Option("at", list, None, "explicit cut points: block index K (the hidden state entering block K), "
               "'merger', or a tensor name; comma separated or repeated", metavar="CUT"),
        Option("max_part_bytes", float, None, "let the tool choose the fewest parts whose weights stay under this",
               metavar="BYTES"),
    )

    def apply(self, model: Model, context: Context) -> PassResult:
        value = cut_model(model, parts=self.o.parts, at=self.o.at or None, max_part_bytes=self.o.max_part_bytes)
        parts = [{"nodes": len(p.model.graph.node), "weight_bytes": p.model.weight_bytes(), "inputs": p.inputs,
                  "outputs": p.outputs} for p in value.parts]
        return PassResult(value, SplitReport(cuts=value.cuts, candidates=value.candidates, parts=parts))


split_model = SplitPass.function("split_model")
