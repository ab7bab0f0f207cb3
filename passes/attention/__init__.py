"""attention: rewrite explicit attention so window layers stop computing S x S scores.

Pattern (each Softmax is tried; a miss is explained at debug level and in the report):

    MatMul(q, Transpose(k, perm=[0,1,3,2])) -> Div|Mul(scalar) -> [Add(mask)] -> Softmax(-1) -> MatMul(., v)

with q, k, v of shape ``[1, H, S, D]``. Declared variants (tests/test_matchers.py builds each): the
scale as Div(scores, c), Mul(scores, c) or Mul(c, scores); the mask added on either side
(Add(scores, mask), Add(mask, scores)); a constant is an initializer or a Constant node. The mask
tells the windows: this toolkit's export builds it from one int64 ``window_id`` vector
(``Where(Equal(id_col, id_row), 0, min)``), and a constant dense mask is read directly; either way
the windows must be contiguous runs (block-diagonal) or the pass refuses. Without a mask the layer is full attention of a single image. The export's
``qvl_surgery.window_layout`` metadata, when present, must agree.

Modes:
- ``windowed`` (default): window layers become batched attention over ``[windows, H, w, D]``,
  windows first and a Transpose right before each MatMul: the layout OpenVINO's offline route
  (``convert_model``/``ovc``, whose SDPAReshapeFusion folds a Reshape-fed per-window attention
  into one unmasked full attention), rknn-toolkit2, MNN, onnx2tf and onnxruntime all run
  correctly. Uniform windows need no mask; uneven ones (edge windows of e.g. 252x364) are padded
  to the largest window with a Gather, get a small per-window key mask ``[windows, 1, 1, w]``,
  and are gathered back. Full-attention layers are left as they are or chunked by queries.
- ``mha``: every attention becomes onnxruntime's ``com.microsoft.MultiHeadAttention`` (windows
  as the batch), for onnxruntime.
- ``onnx-attention``: the ONNX ``Attention`` op (opset 23); a model below opset 23 is refused
  unless ``upgrade_opset

Modules: ``match`` (the pattern), ``plan`` (what to do with each), ``edit`` (the graph edit and its
clean-ups), ``emit`` (what emitters share), ``windowed``, ``fused`` (one emitter per mode), ``report``.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from onnx import helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import cleanup
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.passbase import Context, Option, Pass, PassResult

from passes.attention.edit import apply_edit, cancel_transposes, Edit, upgrade_to_23
from passes.attention.emit import Emitter, WindowPadding
from passes.attention.fused import MhaEmitter, OnnxAttentionEmitter
from passes.attention.match import AttentionMatch, find_attention, rewritten_attention
from passes.attention.plan import AttentionPlan, tensor_shapes, plan_attention
from passes.attention.report import AttentionReport
from passes.attention.windowed import ChunkedFullEmitter, WindowedEmitter

__all__ = ["AttentionPass", "rewrite_attention", "AttentionReport", "AttentionMatch", "AttentionPlan",
           "find_attention", "rewritten_attention", "plan_attention", "WindowPadding", "WindowedEmitter",
           "ChunkedFullEmitter", "MhaEmitter", "OnnxAttentionEmitter", "EMITTERS", "MODES", "DYNAMIC_REFUSAL"]

MODES = ("windowed", "mha", "onnx-attention")

EMITTERS: dict[str, type[Emitter]] = {"windowed": WindowedEmitter, "mha": MhaEmitter,
                                      "onnx-attention": OnnxAttentionEmitter}


DYNAMIC_REFUSAL = ("this is a dynamic export: its attention is already per window (padded windows [windows, heads, "
                   "64, head_dim] with a key mask, full attention per frame) and has no S x S mask to drop; the "
                   "attention pass rewrites static exports (fused modes included)")


def _rewrite_attention(model: Model, o: SimpleNamespace) -> tuple[Model, AttentionReport]:
    """match (find_attention) -> plan (plan_attention) -> emit (one emitter per mode); ``o``: the
    pass's options (``self.o``; ``full_chunk_mb``: the option's help, a ceiling)."""
    mode = o.mode
    if mode not in MODES:
        raise BadInput("{mode}: choose one of " + ", ".join(MODES), mode=mode)
    if model.metadata().get("qvl_surgery.dynamic"):
        raise BadInput(DYNAMIC_REFUSAL)
    done = model.metadata().get("qvl_surgery.attention") or rewritten_attention(model.graph)
    if done:
        raise BadInput(f"attention was already rewritten here ({done}); the pass rewrites an export's attention "
                       "once: run it on the fp32 export")
    model = model.copy()
    g = model.graph
    report = AttentionReport(mode)
    opset = next((imp.version for imp in model.proto.opset_import if imp.domain in ("", "ai.onnx")), 0)
    if mode == "onnx-attention" and opset < 23 and not o.upgrade_opset:
        raise BadInput("{mode} needs opset 23 (the ONNX Attention op); this model is opset "
                       f"{opset}: add {{upgrade_opset}}, or use mode windowed or mha", mode=mode, upgrade_opset=True)
    matches = find_attention(model, report)
    if not matches:
        hint = f" ({report.misses[0]})" if report.misses else ""
        raise BadInput(f"no attention pattern (MatMul(q, k^T) -> scale -> [mask] -> Softmax -> MatMul(v)) in this "
                       f"model{hint}")
    shapes = tensor_shapes(model)
    e = Edit(model, shapes[matches[0].q].elem_type)
    itemsize = np.dtype(e.np_dtype).itemsize
    for plan in plan_attention(model, matches, o, itemsize, shapes):
        m, H, S = plan.match, plan.heads, plan.seq
        if plan.action == "keep":
            report.unchanged.append(f"{m.name}: full attention, no mask (nothing to drop)")
        elif plan.action == "chunk":
            em = ChunkedFullEmitter(e, plan)
            em.emit()
            report.rewritten.append(f"{m.name}: full attention, queries in {em.chunks} chunks of {plan.rows} rows "
                                    f"(scores {H * plan.rows * S * itemsize / 1e6:.0f} MB instead of "
                                    f"{H * S * S * itemsize / 1e6:.0f} MB)")
        elif plan.action == "drop_mask":
            e.new_nodes[m.softmax.output[0]] = [helper.make_node("Softmax", [m.scale.output[0]], [m.softmax.output[0]],
                                                                 name=m.softmax.name, axis=-1)]
            e.drop |= {m.mask_add.output[0], m.softmax.output[0]}
            report.rewritten.append(f"{m.name}: dropped an all-true mask")
        else:
            EMITTERS[mode](e, plan).emit()
            w = plan.windows
            kind = "full" if m.windows is None else (f"{len(w)} windows of {w[0]}" if plan.uniform
                                                      else f"{len(w)} windows of {min(w)}..{max(w)}, padded to {max(w)}")
            report.rewritten.append(f"{m.name}: {kind}")
    apply_edit(model, e)
    if mode != "windowed":
        cancel_transposes(g)
    if mode == "mha" and not any(imp.domain == "com.microsoft" for imp in model.proto.opset_import):
        model.proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if mode == "onnx-attention" and opset < 23:
        upgrade_to_23(model)
    model, report.removed_nodes = cleanup(model)
    model.set_metadata("qvl_surgery.attention", mode)
    return model, report


class AttentionPass(Pass):
    name = "attention"
    help = "rewrite attention: windowed blocks without dense masks, or fused ops"
    example = ("qvl-surgery attention out/model.onnx -o out/windowed.onnx\n"
               "  qvl-surgery attention out/model.onnx -o out/mha.onnx --mode mha")
    options = (
        Option("mode", str, "windowed", "windowed: batched per-window attention; mha: "
               "com.microsoft.MultiHeadAttention for onnxruntime; onnx-attention: the ONNX Attention op (opset 23)",
               choices=MODES),
        Option("upgrade_opset", bool, False, "with mode onnx-attention: raise the model to opset 23"),
        Option("full_chunk_mb", float, 256.0, "windowed mode: ceiling in MB on one chunk of full-attention scores; "
               "layers whose S x S scores exceed it compute their queries in chunks under it (0: never chunk)",
               metavar="MB"),
    )

    def preflight(self, facts: dict) -> None:
        if facts.get("dynamic"):
            raise BadInput(DYNAMIC_REFUSAL)

    def apply(self, model: Model, context: Context) -> PassResult:
        out, report = _rewrite_attention(model, self.o)
        return PassResult(out, report)


rewrite_attention = AttentionPass.function("rewrite_attention")
