"""Run a model in onnxruntime one segment at a time, to watch tensors inside it with bounded memory.

A segment is a run of consecutive nodes (the graph's order is topological) whose weights add up to at
most ``max_segment_bytes``. Each segment becomes its own small graph: its inputs are the tensors it
reads that earlier nodes made (or the model's inputs), its outputs the tensors later nodes read plus
the watched tensors it makes. Weights reach onnxruntime through ``add_external_initializers``: a
file-backed weight is a memory map of the model's own data file (nothing is written anywhere, the
input's folder is never touched), a computed one is made when its segment is built. All input sets
go through one segment before the next is built, so one segment's weights are in memory at a time,
plus the input sets' live tensors at a boundary (a few hidden states each).

Used by calibration: ``watch`` names the tensors, ``on_value(name, array)`` receives each watched
tensor of each input set as soon as its segment has run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import elem_types
from qvl_surgery.core.modelfile import FOUR_BIT, FileRange, Model, dtype_of, pack_nibbles, read_initializer

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 256 << 20
_NOWHERE = "qvl-surgery-segment-weight"   # never read: every external weight is handed over in memory


@dataclass
class Segment:
    nodes: list[onnx.NodeProto]
    inputs: list[str]                  # activations read from earlier segments or the model's inputs
    outputs: list[str]                 # carried to later segments, and the watched tensors made here
    weights: list[str] = field(default_factory=list)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    names: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            made = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                names |= {i for i in n.input if i and i not in made}
                names |= _subgraph_inputs(n)
                made |= set(n.output)
    return names


def _reads(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] + sorted(_subgraph_inputs(node))


def _reads_and_last_read(model: Model) -> tuple[list[list[str]], dict[str, int]]:
    """Each node's inputs (its subgraphs' outer reads included), and the index of the last node that
    reads each tensor (the model's outputs: one past the last node)."""
    reads = [_reads(n) for n in model.graph.node]
    last_read: dict[str, int] = {}
    for k, r in enumerate(reads):
        for name in r:
            last_read[name] = k
    for o in model.graph.output:
        last_read[o.name] = len(reads)
    return reads, last_read


def plan_segments(model: Model, watch: Iterable[str], max_segment_bytes: int | None = None) -> list[Segment]:
    if max_segment_bytes is None:   # read at call time: a test makes segments small to cut a tiny model
        max_segment_bytes = DEFAULT_SEGMENT_BYTES
    inits = model.initializers()
    nodes = list(model.graph.node)
    reads, last_read = _reads_and_last_read(model)
    watch = set(watch)
    # cut points: close a segment before the node whose weights would overflow it (a segment's own
    # weights are listed by _segments)
    ranges: list[tuple[int, int]] = []
    start, size, seen = 0, 0, set()
    for k, r in enumerate(reads):
        new = [i for i in r if i in inits and i not in seen]
        add = sum(model.tensor_nbytes(inits[i]) for i in new)
        if k > start and size + add > max_segment_bytes:
            ranges.append((start, k))
            start, size, seen = k, 0, set()
            new = [i for i in r if i in inits]
            add = sum(model.tensor_nbytes(inits[i]) for i in dict.fromkeys(new))
        seen.update(new)
        size += add
    ranges.append((start, len(nodes)))
    return _segments(model, ranges, watch, reads, last_read)


def _segments(model: Model, ranges: list[tuple[int, int]], watch: set[str], reads: list[list[str]],
              last_read: dict[str, int]) -> list[Segment]:
    """One Segment per node range [a, b): its inputs, the outputs later ranges (or the model's outputs,
    or ``watch``) read, its weights."""
    inits = model.initializers()
    nodes = list(model.graph.node)
    segments = []
    for a, b in ranges:
        made: list[str] = []
        needed: dict[str, None] = {}
        weights: dict[str, None] = {}
        for k in range(a, b):
            for i in reads[k]:
                if i in inits:
                    weights.setdefault(i)
                elif i not in made:
                    needed.setdefault(i)
            made += [o for o in nodes[k].output if o]
        outputs = [o for o in made if last_read.get(o, -1) >= b or o in watch]
        segments.append(Segment(nodes[a:b], list(needed), list(dict.fromkeys(outputs)), list(weights)))
    return segments


def segments_at(model: Model, starts: list[int]) -> list[Segment]:
    """The model cut before each node index in ``starts`` (the first segment starts at node 0)."""
    reads, last_read = _reads_and_last_read(model)
    bounds = sorted({0, *starts, len(reads)})
    return _segments(model, list(zip(bounds, bounds[1:])), set(), reads, last_read)


def _weight_array(model: Model, t: TensorProto) -> np.ndarray:
    src = model.sources[t.name]
    if isinstance(src, FileRange) and t.data_type not in FOUR_BIT:
        return np.memmap(src.path, dtype=dtype_of(t), mode="r", offset=src.offset, shape=tuple(t.dims))
    if isinstance(src, FileRange):
        return read_initializer(t, src)
    return np.ascontiguousarray(np.asarray(src.make()).reshape(tuple(t.dims)))


def segment_session(model: Model, seg: Segment, types: dict[str, int], threads: int | None):
    import onnxruntime as ort

    inits = model.initializers()
    g = helper.make_graph(
        seg.nodes, "segment",
        [helper.make_tensor_value_info(i, types.get(i, TensorProto.FLOAT), None) for i in seg.inputs],
        [helper.make_tensor_value_info(o, types.get(o, 0), None) for o in seg.outputs])
    names, arrays = [], []
    for w in seg.weights:
        t = TensorProto()
        t.CopyFrom(inits[w])
        if w in model.sources and t.data_type in FOUR_BIT:   # no numpy dtype for onnxruntime: inline, packed
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]
            t.raw_data = pack_nibbles(_weight_array(model, inits[w])).tobytes()
        elif w in model.sources:
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.add(key="location", value=_NOWHERE)
            names.append(w)
            arrays.append(_weight_array(model, inits[w]))
        g.initializer.append(t)
    proto = helper.make_model(g, opset_imports=list(model.proto.opset_import), ir_version=model.proto.ir_version)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False   # its arena outlives the session: memory would grow segment by segment
    if threads:
        so.intra_op_num_threads = threads
    if names:
        so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, arrays   # the arrays back the session's weights: keep them alive with it


def run_segments(model: Model, feeds_list: Iterable[Mapping[str, np.ndarray]], watch: Iterable[str],
                 on_value: Callable[[str, np.ndarray], None], *, max_segment_bytes: int | None = None,
                 threads: int | None = None, progress: bool = False) -> int:
    """Run every input set through the model, segment by segment, handing each watched tensor to
    ``on_value``; returns the number of input sets."""
    watch = set(watch)
    inits = model.initializers()
    graph_inputs = [i.name for i in model.graph.input if i.name not in inits]
    carried: list[dict[str, np.ndarray]] = []
    for feeds in feeds_list:
        values = {}
        for name in graph_inputs:
            if name not in feeds:
                raise BadInput(f"calibration inputs: no array named {name!r}")
            values[name] = np.asarray(feeds[name])
            if name in watch:
                on_value(name, values[name])
        carried.append(values)
    segments = plan_segments(model, watch, max_segment_bytes)
    types = elem_types(model)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="calibration", total=len(segments) * len(carried), unit="run", leave=False, disable=None)
    for s, seg in enumerate(segments):
        try:
            sess, keep_alive = segment_session(model, seg, types, threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own message says what it cannot run
            raise BadInput(f"calibration: onnxruntime cannot run this model ({str(e).splitlines()[0][:200]})") from None
        later = set()
        for nxt in segments[s + 1:]:
            later |= set(nxt.inputs)
        for values in carried:
            outs = sess.run(seg.outputs, {i: values[i] for i in seg.inputs})
            for name, v in zip(seg.outputs, outs):
                if name in watch:
                    on_value(name, v)
                if name in later:
                    values[name] = v
            for name in [n for n in values if n not in later]:
                del values[name]
            if bar is not None:
                bar.update(1)
        del sess, keep_alive
    if bar is not None:
        bar.close()
    return len(carried)
