"""simplify: onnxsim on a model of any size.

onnxsim's python API given a ModelProto needs the whole model as one protobuf, which fails above
2 GB. This pass hands onnxsim a *path* instead (onnxsim >= 0.8 reads external data itself) and,
if onnxsim still fails on the whole model, splits it into parts under ``max_part_bytes`` (the 3b
fp32 encoder: 2 parts), simplifies each part and merges the results with external data.

Rules and limits:
- Constant subgraphs whose result would be large (the window mask: S x S floats, 340 MB at
  1344x1344) are protected from constant folding: the int tables feeding them (``window_id``)
  are lifted to graph inputs while onnxsim runs and put back afterwards. So the no-dense-mask
  contract survives simplification.
- Names onnxsim creates in one part are prefixed with the part's name before merging, so two
  parts cannot clash.
- Peak memory is what onnxsim needs for the whole model (about 3 GB for the 3b encoder) or for one
  part on the fallback.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.cutting import cut_model, join_parts
from qvl_surgery.core.graphinfo import constant_tensors
from qvl_surgery.core.modelfile import Model, load_model, sibling_model, write_model_files
from qvl_surgery.core.passbase import Context, Option, Pass, PassReport, PassResult


log = logging.getLogger(__name__)

LARGE_FOLD_BYTES = 1 << 20
LIFT_MIN_ELEMENTS = 64


@dataclass
class SimplifyReport(PassReport):
    parts: int
    nodes_before: int
    nodes_after: int
    protected: list[str]
    how: str = ""
    written: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        out = [f"simplified in {self.parts} part(s) with onnxsim ({self.how}): {self.nodes_before} -> "
                f"{self.nodes_after} nodes",
               f"  kept from constant folding (would make large constants): {', '.join(self.protected) or 'none'}"]
        return out + self.written


def _large_constant_roots(model: Model) -> list[str]:
    """Small initializer tables that feed a constant subgraph whose result is large."""
    g = model.graph
    constant = constant_tensors(g)
    inferred = onnx.shape_inference.infer_shapes(model.proto)
    sizes = {}
    for v in inferred.graph.value_info:
        t = v.type.tensor_type
        if all(d.HasField("dim_value") for d in t.shape.dim):
            n = int(np.prod([d.dim_value for d in t.shape.dim], dtype=np.int64))
            sizes[v.name] = n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    roots: set[str] = set()
    for n in g.node:
        if all(i in constant for i in n.input) and any(sizes.get(o, 0) > LARGE_FOLD_BYTES for o in n.output):
            stack = list(n.input)
            while stack:
                t = stack.pop()
                if t in inits:
                    if int(np.prod(inits[t].dims, dtype=np.int64)) >= LIFT_MIN_ELEMENTS:
                        roots.add(t)
                elif t in producer:
                    stack.extend(producer[t].input)
    return sorted(roots)


def _lift(model: Model, names: list[str]) -> dict[str, onnx.TensorProto]:
    """Move initializers to graph inputs (onnxsim cannot fold through inputs); returns them."""
    g = model.graph
    lifted = {}
    keep = []
    for t in g.initializer:
        if t.name in names:
            lifted[t.name] = t
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    return lifted


def _restore(part: Model, lifted: dict[str, onnx.TensorProto], original: Model) -> None:
    g = part.graph
    ins = [i for i in g.input if i.name not in lifted]
    present = {i.name for i in g.input if i.name in lifted}
    del g.input[:]
    g.input.extend(ins)
    for name in sorted(present):
        t = onnx.TensorProto()
        t.CopyFrom(lifted[name])
        g.initializer.append(t)
        if name in original.sources:
            part.sources[name] = original.sources[name]


def _prefix_new_names(part: Model, k: int, keep: set[str]) -> None:
    """Prefix initializers and node outputs onnxsim created, so parts cannot clash when merged."""
    g = part.graph
    boundary = {i.name for i in g.input} | {o.name for o in g.output}
    rename = {}
    for t in g.initializer:
        if t.name not in keep:
            rename[t.name] = f"part{k}/{t.name}"
    for n in g.node:
        for o in n.output:
            if o not in keep and o not in boundary:
                rename[o] = f"part{k}/{o}"
    for t in g.initializer:
        if t.name in rename:
            if t.name in part.sources:
                part.sources[rename[t.name]] = part.sources.pop(t.name)
            t.name = rename[t.name]
    for n in g.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
    for v in g.value_info:
        v.name = rename.get(v.name, v.name)


def _run_onnxsim(path: Path, what: str) -> onnx.ModelProto:
    import onnxsim
    try:
        proto, ok = onnxsim.simplify(str(path))  # path API: onnxsim reads the external data itself
    except Exception as e:
        raise _OnnxsimFailed(f"onnxsim failed on {what} ({type(e).__name__}: {str(e)[:150]})") from None
    if not ok:
        raise _OnnxsimFailed(f"onnxsim could not validate its result for {what}")
    return proto


class _OnnxsimFailed(BadInput):
    pass


def _save_sim(proto: onnx.ModelProto, d: Path) -> Model:
    d.mkdir()
    onnx.save_model(proto, str(d / "part.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="part.onnx.data", size_threshold=1024)
    return load_model(d / "part.onnx")


def _simplify_whole(model: Model, model_path: Path, work: Path) -> tuple[Model, list[str]]:
    """onnxsim's path API on the whole model, with the mask tables lifted to inputs. The lifted
    graph is a hidden temporary .onnx beside the model that reads the model's own data file."""
    roots = _large_constant_roots(model)
    # the file's own proto, whose external-data entries still point at the model's data file
    raw = Model(onnx.load(str(model_path), load_external_data=False))
    lifted = _lift(raw, roots)
    with sibling_model(model_path, raw.proto) as tmp:
        proto = _run_onnxsim(tmp, "the whole model")
    result = _save_sim(proto, work / "whole")
    del proto
    _restore(result, lifted, model)
    return result, roots


def _simplify_parts(model: Model, work: Path, max_part_bytes: int) -> tuple[Model, list[str], int]:
    original_names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    # split and merge here are steps of simplify, not passes of their own: the output records
    # "simplify" alone in qvl_surgery.passes
    value = cut_model(model, parts=None, at=None, max_part_bytes=max_part_bytes)
    simplified, protected = [], []
    for k, p in enumerate(value.parts):
        part = p.model
        roots = _large_constant_roots(part)
        protected += [r for r in roots if r not in protected]
        lifted = _lift(part, roots)
        d = work / f"lift{k}"
        d.mkdir()
        proto = _run_onnxsim(write_model_files(part, d, "lifted.onnx"), f"part {k}")
        part_out = _save_sim(proto, work / f"sim{k}")
        del proto
        _restore(part_out, lifted, part)
        _prefix_new_names(part_out, k, original_names)
        simplified.append(part_out)
    merged, _ = join_parts(simplified)
    return merged, protected, len(simplified)


def _on_disk(model: Model, work: Path, progress: bool) -> Path:
    """A path onnxsim can read for ``model``: its own file when the graph is the file's, else the
    model written into the work folder (onnxsim needs a file; this copies the weights once)."""
    if model.path is not None:
        try:
            same = load_model(model.path).proto.SerializeToString() == model.proto.SerializeToString()
        except BadInput:
            same = False
        if same:
            return Path(model.path)
    d = work / "input"
    d.mkdir()
    return write_model_files(model, d, "model.onnx", progress="simplify-input" if progress else None)


def _simplify_model(model: Model, context: Context, o) -> tuple[Model, SimplifyReport]:
    """onnxsim on ``model``. ``method``: ``whole`` (onnxsim's path API on the whole model), ``parts``
    (part by part under ``max_part_bytes``), or ``auto`` (whole, and parts if onnxsim fails on the
    whole). The result's weights live in ``workdir``, which the caller keeps until the result is
    saved and removes afterwards."""
    import onnxsim
    method, workdir, progress = o.method, context.workdir, context.progress
    if method not in METHODS:
        raise BadInput("{method}: choose auto, whole or parts", method=method)
    work = Path(workdir)
    max_part_bytes = int(o.max_part_bytes)
    result, parts, note = None, 1, ""
    if method in ("auto", "whole"):
        try:
            result, protected = _simplify_whole(model, _on_disk(model, work, progress), work)
            note = "whole model, onnxsim path API"
        except _OnnxsimFailed as e:
            if method == "whole":
                raise
            log.info("%s; falling back to part by part", e)
            note = f"whole model failed ({e}); "
    if result is None:
        result, protected, parts = _simplify_parts(model, work, max_part_bytes)
        note += f"{parts} parts under {max_part_bytes / 1e9:.2f} GB"
    result.set_metadata("qvl_surgery.simplified", "onnxsim " + getattr(onnxsim, "__version__", ""))
    return result, SimplifyReport(parts=parts, nodes_before=len(model.graph.node), nodes_after=len(result.graph.node),
                                 protected=protected, how=note)


METHODS = ("auto", "whole", "parts")


class SimplifyPass(Pass):
    name = "simplify"
    help = "onnxsim on a model of any size, part by part"
    example = "qvl-surgery simplify out/model.onnx -o out/model.sim.onnx"
    options = (
        Option("method", str, "auto", "whole: onnxsim's path API on the whole model; parts: part by part; auto: "
               "whole, then parts if onnxsim fails", choices=METHODS),
        Option("max_part_bytes", float, 1.5e9, "largest part handed to onnxsim", metavar="BYTES"),
    )

    def apply(self, model: Model, context: Context) -> PassResult:
        if context.workdir is None:
            raise BadInput("simplify needs a work folder that outlives the pass (Context(workdir=...)): its result's "
                           "weights are written there")
        out, report = _simplify_model(model, context, self.o)
        return PassResult(out, report)


simplify_model = SimplifyPass.function("simplify_model")
