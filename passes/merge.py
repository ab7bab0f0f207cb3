"""merge: join the parts of a split into one model with external data.

Rules: nodes are taken in chain order; a node whose outputs an earlier part already produces
(a constant subgraph that split repeated) is kept once; an initializer repeated in several
parts is stored once, and must be byte-identical in each (it is compared, it is small: only
constants are repeated). The result has part 0's inputs, the last part's outputs, the union of
value_info, and the source's metadata. Bytes are streamed by modelfile.save_model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from onnx import helper

from qvl_surgery.errors import BadInput
from qvl_surgery.graphinfo import with_graph
from qvl_surgery.modelfile import Model
from qvl_surgery.passbase import Context, Pass, PassReport, PassResult, run_pass
from qvl_surgery.values import Split, load_split, read_value, write_value

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


def merge_models(parts: list[Model], input_order: list[str] | None = None) -> tuple[Model, MergeReport]:
    """``input_order``: the chain's input names in the source model's order (a split records them)."""
    nodes, produced = [], set()
    inits, sources, vinfo = {}, {}, {}
    dropped = shared = 0
    for k, part in enumerate(parts):
        g = part.graph
        for n in g.node:
            if n.output and all(o in produced for o in n.output):
                dropped += 1
                continue
            nodes.append(n)
            produced.update(n.output)
        for t in g.initializer:
            if t.name in inits:
                a, b = parts[inits[t.name][0]].read_array(t.name), part.read_array(t.name)
                if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                    raise BadInput(f"initializer {t.name!r} differs between parts {inits[t.name][0]} and {k}; "
                                   "these parts do not come from one split")
                shared += 1
                continue
            inits[t.name] = (k, t)
            if t.name in part.sources:
                sources[t.name] = part.sources[t.name]
        for v in list(g.value_info) + (list(g.input) if k else []) + (list(g.output) if k < len(parts) - 1 else []):
            vinfo.setdefault(v.name, v)
    first, last = parts[0], parts[-1]
    init_names = set(inits)
    # the chain's inputs: part 0's, then side inputs a later part takes that no part before it makes
    # (a host-inputs export's reverse_index is first read by the merger)
    chain_inputs, made = [], set()
    for part in parts:
        for i in part.graph.input:
            if i.name not in init_names and i.name not in made and i.name not in {c.name for c in chain_inputs}:
                chain_inputs.append(i)
        made.update(o for n in part.graph.node for o in n.output)
    if input_order:
        rank = {n: k for k, n in enumerate(input_order)}
        chain_inputs.sort(key=lambda i: rank.get(i.name, len(rank)))
    g = helper.make_graph(nodes, first.graph.name.removesuffix("_part0"), chain_inputs, list(last.graph.output),
                          initializer=[t for _, t in inits.values()],
                          value_info=[v for name, v in vinfo.items() if name in produced])
    merged = with_graph(first, g, sources, drop_metadata=("qvl_surgery.part",))
    return merged, MergeReport(len(parts), len(nodes), dropped, shared)


def merge_split(value: Split) -> tuple[Model, MergeReport]:
    """The :class:`MergePass` on a split value."""
    return run_pass(MergePass, value)


def merge(split_dir: str | Path) -> tuple[Model, MergeReport]:
    """Read and verify a split (sizes and hashes), and join it into one weightless Model (the :class:`MergePass`)."""
    return run_pass(MergePass, load_split(split_dir))


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
    function = ("passes.merge", "merge_split")
    example = "qvl-surgery merge out/parts -o out/merged.onnx"

    def apply(self, value: Split, context: Context, **kw) -> PassResult:
        model, report = merge_models([p.model for p in value.parts], value.inputs)
        return PassResult(model, report)
