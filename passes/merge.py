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
from qvl_surgery.manifest import Manifest, read_manifest
from qvl_surgery.modelfile import Model, load_model

log = logging.getLogger(__name__)


@dataclass
class MergeReport:
    parts: int
    nodes: int
    dropped_nodes: int
    shared_initializers: int

    def lines(self) -> list[str]:
        return [f"merged {self.parts} parts: {self.nodes} nodes ({self.dropped_nodes} repeated constant nodes "
                f"kept once), {self.shared_initializers} repeated initializers stored once"]


def merge_models(parts: list[Model]) -> tuple[Model, MergeReport]:
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
    g = helper.make_graph(nodes, first.graph.name.removesuffix("_part0"),
                          [i for i in first.graph.input if i.name not in init_names], list(last.graph.output),
                          initializer=[t for _, t in inits.values()],
                          value_info=[v for name, v in vinfo.items() if name in produced])
    proto = helper.make_model(g, opset_imports=list(first.proto.opset_import), producer_name=first.proto.producer_name,
                              producer_version=first.proto.producer_version)
    proto.ir_version = first.proto.ir_version
    for p in first.proto.metadata_props:
        if p.key != "qvl_surgery.part":
            proto.metadata_props.add(key=p.key, value=p.value)
    return Model(proto, sources), MergeReport(len(parts), len(nodes), dropped, shared)


def load_parts(manifest: Manifest) -> list[Model]:
    return [load_model(p) for p in manifest.part_paths()]


def merge(split_dir: str | Path) -> tuple[Model, MergeReport]:
    """Read and verify a split (sizes and sha256), and join it into one weightless Model."""
    m = read_manifest(split_dir)
    return merge_models(load_parts(m))


def merge_to_file(split_dir: str | Path, out: str | Path, *, overwrite: bool = False,
                  progress: bool = False) -> MergeReport:
    """merge + save. The sha256 check of the parts runs in the background while the bytes are
    copied; a mismatch stops the publish, so nothing is left behind."""
    from concurrent.futures import ThreadPoolExecutor
    from qvl_surgery.manifest import hash_checks, verify_files
    from qvl_surgery.modelfile import save_model
    m = read_manifest(split_dir, verify_hashes=False)  # sizes, paths and chain checked here
    with ThreadPoolExecutor(max_workers=1) as pool:
        verified = pool.submit(verify_files, hash_checks(m))
        try:
            model, report = merge_models(load_parts(m))
            save_model(model, out, progress="merge" if progress else None, overwrite=overwrite,
                       inputs=m.part_paths(), before_publish=verified.result)
        except BaseException:
            verified.cancel()
            raise
    return report
