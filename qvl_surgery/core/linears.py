"""The weight-carrying linear layers of a graph (Gemm / MatMul with an initializer weight): found
once here for every pass and report that works on them (quantize, smooth's and the outlier report's
linear inputs, the toolchain keep-lists), with the multiply-adds each one does."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile import Model

F32 = TensorProto.FLOAT


@dataclass
class Linear:
    node: onnx.NodeProto
    weight: str
    bias: str          # "" when none
    out_in: bool       # weight stored [N, K] (Gemm transB=1) rather than [K, N]
    n: int
    k: int

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def x(self) -> str:
        return self.node.input[0]


def _attrs(n: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def find_linears(model: Model, misses: list[str]) -> list[Linear]:
    """Every Gemm / MatMul with an initializer weight that computes ``x @ W (+ b)``; the others that
    read an initializer are named in ``misses`` with the failed condition."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    found = []
    for n in g.node:
        if n.op_type not in ("Gemm", "MatMul") or n.domain not in ("", "ai.onnx"):
            continue
        if len(n.input) < 2 or n.input[1] not in inits:
            continue   # activation x activation (attention): not a linear
        w = inits[n.input[1]]
        where = f"{n.op_type} {n.name or n.output[0]}"
        if w.data_type != F32:
            misses.append(f"{where}: weight {w.name} is not float32")
            continue
        if len(w.dims) != 2:
            misses.append(f"{where}: weight {w.name} has shape {list(w.dims)}, not 2-D")
            continue
        bias = ""
        out_in = False
        if n.op_type == "Gemm":
            a = _attrs(n)
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                misses.append(f"{where}: transA/alpha/beta are not 0/1/1")
                continue
            out_in = bool(a.get("transB", 0))
            if len(n.input) > 2 and n.input[2]:
                b = inits.get(n.input[2])
                n_out = w.dims[0] if out_in else w.dims[1]
                if b is None or b.data_type != F32 or list(b.dims) not in ([n_out], [1, n_out]):
                    misses.append(f"{where}: bias {n.input[2]} is not a float32 [{n_out}] initializer")
                    continue
                bias = n.input[2]
        nn, kk = (w.dims[0], w.dims[1]) if out_in else (w.dims[1], w.dims[0])
        found.append(Linear(n, w.name, bias, out_in, int(nn), int(kk)))
    return found


def block_numbers(keep_block) -> list[int]:
    """``--keep-block`` values as block numbers; one line for one that is not."""
    blocks = []
    for b in keep_block:
        try:
            blocks.append(int(b))
        except ValueError:
            raise BadInput("{keep_block}: not a block number", keep_block=b) from None
    return blocks


def select_kept(linears: list[Linear], *, keep_nodes: list[str], keep_blocks: list[int]) -> dict[str, str]:
    """Linear name -> why it stays float."""
    kept: dict[str, str] = {}
    for pat in keep_nodes:
        hits = [lin for lin in linears if fnmatch.fnmatchcase(lin.name, pat)]
        if not hits:
            example = linears[len(linears) // 2].name if linears else "none"
            raise BadInput("{keep_node}: matches no linear layer (names look like " + repr(example) + ")",
                           keep_node=pat)
        for lin in hits:
            kept.setdefault(lin.name, f"node {pat}")
    for b in keep_blocks:
        hits = [lin for lin in linears if re.match(rf"^/?blocks\.{b}/", lin.name)]
        if not hits:
            raise BadInput("{keep_block}: no linear layer in block " + str(b), keep_block=b)
        for lin in hits:
            kept.setdefault(lin.name, f"block {b}")
    return kept


def linear_macs(model: Model, linears: list[Linear]) -> tuple[dict[str, int], str]:
    """Each linear's multiply-adds and what they were counted at: rows x K x N from the graph's static
    shapes, or K x N (weight size) for all of them where some row count is symbolic (dynamic export:
    the merger's rows are a quarter of the blocks', so that count overstates it)."""
    from qvl_surgery.core.graphinfo import value_types
    try:
        vt = value_types(model, {lin.x for lin in linears})
    except BadInput:
        vt = {}
    rows: dict[str, int] = {}
    for lin in linears:
        dims = vt[lin.x].type.tensor_type.shape.dim if lin.x in vt else []
        if dims and all(d.HasField("dim_value") for d in dims[:-1]):
            rows[lin.name] = int(np.prod([d.dim_value for d in dims[:-1]], dtype=np.int64))
    by_rows = len(rows) == len(linears)
    macs = {lin.name: (rows[lin.name] if by_rows else 1) * lin.n * lin.k for lin in linears}
    return macs, ("multiply-adds" if by_rows else "weight size (symbolic rows)")


def kept_share(model: Model, linears: list[Linear], kept: dict[str, str]) -> tuple[float, str]:
    """The kept linears' share of all the linears' work (:func:`linear_macs`), and how it was counted."""
    macs, by = linear_macs(model, linears)
    return sum(macs[n] for n in kept) / (sum(macs.values()) or 1), by


def group_of(name: str) -> str:
    """The group a linear belongs to for per-group measurements: ``blocks.N``, ``merger`` or
    ``patch_embed`` (a name outside them is its own group)."""
    m = re.match(r"^/?(blocks\.\d+|merger|patch_embed)/", name)
    return m.group(1) if m else name
