"""Writes a :class:`~passes.quantize.plan.QuantPlan`: per linear, QuantizeLinear / DequantizeLinear
around the unchanged Gemm/MatMul (``qdq``), or onnxruntime's integer ops (``MatMulNBits``,
``DynamicQuantizeMatMul``, ``QuantizeLinear`` + ``MatMulIntegerToFloat``); then the opsets the
result needs. Weight codes and scales are Computed sources, made while the file is written."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_surgery.core import quant
from qvl_surgery.core.graphinfo import with_graph
from qvl_surgery.core.linears import Linear
from qvl_surgery.core.modelfile import Model, read_initializer

from passes.quantize.plan import QuantPlan, model_opset
from passes.quantize.report import QuantizeReport

F32 = TensorProto.FLOAT
MS = "com.microsoft"


class _QuantEmitter:
    """Rebuilds the graph under a plan; every new weight tensor is a Computed source of one
    :class:`~qvl_surgery.core.quant.LazyQuant` per linear."""

    def __init__(self, model: Model, plan: QuantPlan, report: QuantizeReport):
        self.model, self.plan, self.report = model, plan, report
        self.inits = {t.name: t for t in model.graph.initializer}
        self.by_output = {lin.node.output[0]: lin for lin in plan.linears}
        self.new_inits: list[TensorProto] = []
        self.sources: dict[str, object] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.act_q: dict[str, str] = {}     # activation tensor -> its quantized / fake-quantized name
        self.used_weights: set[str] = set()

    # helpers -----------------------------------------------------------------------------
    def _count(self, op: str) -> None:
        self.report.ops[op] = self.report.ops.get(op, 0) + 1

    def _node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        self._count(op)

    def _const(self, name: str, value: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def _computed(self, name: str, dtype: int, dims: list[int], lazy: quant.LazyQuant, part: str,
                  nbytes: int) -> str:
        tp = TensorProto(name=name, data_type=dtype, dims=dims)
        tp.data_location = TensorProto.EXTERNAL
        self.new_inits.append(tp)
        self.sources[name] = lazy.source(part, nbytes)
        return name

    def _read_nk(self, lin: Linear):
        t, src = self.inits[lin.weight], self.model.sources.get(lin.weight)

        def read() -> np.ndarray:
            w = read_initializer(t, src)
            return np.asarray(w, np.float32) if lin.out_in else np.ascontiguousarray(np.asarray(w, np.float32).T)
        return read

    # activations ---------------------------------------------------------------------------
    def _fake_quant(self, x: str) -> str:
        """qdq: one QuantizeLinear -> DequantizeLinear per activation tensor."""
        if x in self.act_q:
            return self.act_q[x]
        r = self.plan.ranges[x]
        dt = np.int16 if self.plan.scheme.activations == "int16" else np.int8
        base = x.lstrip("/")
        s = self._const(f"{base}/act_scale", np.array(r.scale, np.float32))
        z = self._const(f"{base}/act_zero_point", np.array(0, dt))
        self._node("QuantizeLinear", [x, s, z], [f"{x}/quantized"], f"{x}/QuantizeLinear")
        self._node("DequantizeLinear", [f"{x}/quantized", s, z], [f"{x}/dequantized"], f"{x}/DequantizeLinear")
        self.act_q[x] = f"{x}/dequantized"
        return self.act_q[x]

    def _static_int8(self, x: str) -> tuple[str, str, str]:
        """onnxruntime static: one QuantizeLinear per activation tensor; (uint8 x, scale, zero point).
        The symmetric int8 grid shifted by 128 (the same values): onnxruntime's x86 kernels multiply
        uint8 by uint8 (the form DynamicQuantizeMatMul uses) at full speed, while int8 x int8 took 4.6x
        as long as that on an AVX2 CPU without VNNI (a 4-block model of the 3b's width)."""
        base = x.lstrip("/")
        s, z = f"{base}/act_scale", f"{base}/act_zero_point"
        if x not in self.act_q:
            self._const(s, np.array(self.plan.ranges[x].scale, np.float32))
            self._const(z, np.array(128, np.uint8))
            self._node("QuantizeLinear", [x, s, z], [f"{x}/quantized"], f"{x}/QuantizeLinear")
            self.act_q[x] = f"{x}/quantized"
        return self.act_q[x], s, z

    def _per_token_int8(self, x: str, rank2: bool = False) -> tuple[str, str, str]:
        """onnxruntime per token: each row's scale max|row| / 127 computed at run time ([M, 1]), the
        row quantized symmetric and shifted by 128 to uint8 (uint8 activations, as :meth:`_static_int8`);
        MatMulIntegerToFloat takes the [M, 1] scale with the scalar zero point. A 2-D input (a Gemm's)
        is quantized by one per-axis QuantizeLinear (its scale and zero point [M], made at run time),
        the others by Div, Round, Add, Clip, Cast: on the 3b's [1024, 3420] that chain took 8.5 ms,
        QuantizeLinear 5.9 ms (2 threads, AVX512-VNNI CPU), both equal to numpy's codes."""
        base = x.lstrip("/")
        s, z = f"{x}/token_scale", f"{base}/act_zero_point"
        if x in self.act_q:
            return self.act_q[x], s, z
        c = {k: self._const(f"{base}/{k}", np.array(v, np.float32))
             for k, v in (("inv127", 1 / 127), ("neg_inv127", -1 / 127), ("tiny", 1e-30), ("shift", 128.0),
                          ("low", 0.0), ("high", 255.0))
             if not rank2 or k in ("inv127", "neg_inv127", "tiny")}
        self._const(z, np.array(128, np.uint8))
        row = f"{x}/token_scale_row" if rank2 else s
        # max |row| as max(ReduceMax, -ReduceMin): two reductions that read x, where Abs wrote a copy of
        # it first (on the 3b, 2 threads, AMX Xeon: 53 ms against Abs + ReduceMax's 106 ms a run)
        axes = self._const(f"{base}/last_axis", np.array([-1], np.int64)) if self.plan.opset >= 18 else None
        for op, tag in (("ReduceMax", "rowmax"), ("ReduceMin", "rowmin")):
            if axes:
                self._node(op, [x, axes], [f"{x}/{tag}"], f"{x}/token_scale/{op}", keepdims=1)
            else:
                self._node(op, [x], [f"{x}/{tag}"], f"{x}/token_scale/{op}", axes=[-1], keepdims=1)
        self._node("Mul", [f"{x}/rowmax", c["inv127"]], [f"{x}/scale_of_max"], f"{x}/token_scale/Mul_max")
        self._node("Mul", [f"{x}/rowmin", c["neg_inv127"]], [f"{x}/scale_of_min"], f"{x}/token_scale/Mul_min")
        self._node("Max", [f"{x}/scale_of_max", f"{x}/scale_of_min", c["tiny"]], [s], f"{x}/token_scale/Max")
        if rank2:
            flat = self._const(f"{base}/flat", np.array([-1], np.int64))
            self._node("Reshape", [s, flat], [row], f"{x}/token_scale/Reshape")
            self._node("Shape", [row], [f"{x}/rows"], f"{x}/token_quant/Shape")
            self._node("ConstantOfShape", [f"{x}/rows"], [f"{x}/row_zero_point"], f"{x}/token_quant/ConstantOfShape",
                       value=helper.make_tensor("value", TensorProto.UINT8, [1], [128]))
            self._node("QuantizeLinear", [x, row, f"{x}/row_zero_point"], [f"{x}/quantized"],
                       f"{x}/token_quant/QuantizeLinear", axis=0)
        else:
            self._node("Div", [x, s], [f"{x}/scaled"], f"{x}/token_quant/Div")
            self._node("Round", [f"{x}/scaled"], [f"{x}/rounded"], f"{x}/token_quant/Round")
            self._node("Add", [f"{x}/rounded", c["shift"]], [f"{x}/shifted"], f"{x}/token_quant/Add")
            self._node("Clip", [f"{x}/shifted", c["low"], c["high"]], [f"{x}/clipped"], f"{x}/token_quant/Clip")
            self._node("Cast", [f"{x}/clipped"], [f"{x}/quantized"], f"{x}/token_quant/Cast", to=TensorProto.UINT8)
        self.act_q[x] = f"{x}/quantized"
        return self.act_q[x], s, z

    # one linear ------------------------------------------------------------------------------
    def _qdq(self, lin: Linear) -> None:
        p, n = self.plan, lin.node
        read = self._read_nk(lin)
        w = lin.weight
        if p.block is None:
            def quantize(a: np.ndarray) -> dict[str, np.ndarray]:
                q, s = quant.quantize_per_channel(a)
                return {"q": q if lin.out_in else np.ascontiguousarray(q.T), "s": s}
            scale_dims = [lin.n]
            attrs = {"axis": 0 if lin.out_in else 1}
        else:
            nb = quant.n_blocks(lin.k, p.block)

            def quantize(a: np.ndarray) -> dict[str, np.ndarray]:
                q, s = quant.quantize_blocked(a, p.bits, p.block, search=p.bits == 4)
                if not lin.out_in:
                    q, s = np.ascontiguousarray(q.T), np.ascontiguousarray(s.T)
                return {"q": q, "s": s}
            scale_dims = [lin.n, nb] if lin.out_in else [nb, lin.n]
            attrs = {"axis": 1 if lin.out_in else 0, "block_size": p.block}
        lazy = quant.LazyQuant(read, quantize)
        dims = [lin.n, lin.k] if lin.out_in else [lin.k, lin.n]
        count = lin.n * lin.k
        qtype = TensorProto.INT4 if p.bits == 4 else TensorProto.INT8
        # INT4 is stored packed, two codes a byte (ONNX's layout): the source makes the codes, the
        # writer packs them into (count + 1) // 2 bytes
        qname = self._computed(f"{w}_quantized", qtype, dims, lazy, "q", count if p.bits == 8 else (count + 1) // 2)
        sname = self._computed(f"{w}_scale", F32, scale_dims, lazy, "s", 4 * int(np.prod(scale_dims)))
        wf = f"{w}_dequantized"
        self._node("DequantizeLinear", [qname, sname], [wf], f"{lin.name}/DequantizeLinear_weight", **attrs)
        nn = onnx.NodeProto()
        nn.CopyFrom(n)
        nn.input[1] = wf
        if p.scheme.activations != "none":
            nn.input[0] = self._fake_quant(lin.x)
        self.nodes.append(nn)

    def _nbits(self, lin: Linear) -> None:
        p = self.plan
        bits, block = p.bits, p.block
        nb = quant.n_blocks(lin.k, block)
        blob = block * bits // 8

        def quantize(a: np.ndarray) -> dict[str, np.ndarray]:
            q, s = quant.quantize_blocked(a, bits, block, search=bits == 4, signed_scale=bits == 4)
            return {"q": quant.pack_nbits(q, bits, block), "s": s}
        lazy = quant.LazyQuant(self._read_nk(lin), quantize)
        w = lin.weight
        qname = self._computed(f"{w}_q{bits}", TensorProto.UINT8, [lin.n, nb, blob], lazy, "q", lin.n * nb * blob)
        sname = self._computed(f"{w}_scales", F32, [lin.n, nb], lazy, "s", 4 * lin.n * nb)
        self._node("MatMulNBits", [lin.x, qname, sname, "", "", lin.bias], [lin.node.output[0]],
                   f"{lin.name}_MatMulNBits", domain=MS, K=lin.k, N=lin.n, bits=bits, block_size=block,
                   accuracy_level=4)

    def _integer(self, lin: Linear) -> None:
        """Symmetric int8 weights [K, N] for DynamicQuantizeMatMul or MatMulIntegerToFloat: stored as
        uint8 with zero point 128 (int8_kernel u8u8: uint8 x uint8), or as int8 with no zero point
        (u8s8: uint8 activations x int8 weights, VNNI's instruction)."""
        signed = self.plan.scheme.int8_kernel == "u8s8"

        def quantize(a: np.ndarray) -> dict[str, np.ndarray]:
            q, s = quant.quantize_per_channel(a)
            q = np.ascontiguousarray(q.T)
            return {"q": q.astype(np.int8) if signed else (q.astype(np.int16) + 128).astype(np.uint8), "s": s}
        lazy = quant.LazyQuant(self._read_nk(lin), quantize)
        w = lin.weight
        qname = self._computed(f"{w}_quantized_kn", TensorProto.INT8 if signed else TensorProto.UINT8,
                               [lin.k, lin.n], lazy, "q", lin.k * lin.n)
        sname = self._computed(f"{w}_scale", F32, [lin.n], lazy, "s", 4 * lin.n)
        zp = "" if signed else self._const(f"{w}_zero_point", np.full(lin.n, 128, np.uint8))
        out = lin.node.output[0]
        if self.plan.dynamic_activations:
            self._node("DynamicQuantizeMatMul", [lin.x, qname, sname, zp, lin.bias], [out],
                       f"{lin.name}_DynamicQuantizeMatMul", domain=MS)
        elif self.plan.scheme.per_token and lin.bias:
            # onnxruntime 1.32 scales MatMulIntegerToFloat's bias by a per-row A scale (bias * a_scale[m]:
            # measured, 2.4% of the output's max on a random layer): the bias is added after it instead
            xq, s, z = self._per_token_int8(lin.x, lin.node.op_type == "Gemm")
            self._node("MatMulIntegerToFloat", [xq, qname, s, sname, z, zp], [f"{out}/no_bias"],
                       f"{lin.name}_MatMulIntegerToFloat", domain=MS)
            self._node("Add", [f"{out}/no_bias", lin.bias], [out], f"{lin.name}_bias")
        else:
            xq, s, z = (self._per_token_int8(lin.x, lin.node.op_type == "Gemm") if self.plan.scheme.per_token
                        else self._static_int8(lin.x))
            self._node("MatMulIntegerToFloat", [xq, qname, s, sname, z, zp, lin.bias], [out],
                       f"{lin.name}_MatMulIntegerToFloat", domain=MS)

    # the graph -------------------------------------------------------------------------------
    def emit(self) -> Model:
        g, p = self.model.graph, self.plan
        for n in g.node:
            lin = self.by_output.get(n.output[0]) if n.output else None
            if lin is None:
                self.nodes.append(n)
            elif p.scheme.format == "qdq":
                self._qdq(lin)
            elif p.scheme.activations == "none":
                self._nbits(lin)
            else:
                self._integer(lin)
        read = {i for n in self.nodes for i in n.input}
        gone = {lin.weight for lin in p.linears} - read   # float weights the quantized copies replace
        for t in g.initializer:
            if t.name in gone:
                continue
            self.new_inits.append(t)
            if t.name in self.model.sources:
                self.sources[t.name] = self.model.sources[t.name]
        inputs = [i for i in g.input if i.name not in gone]
        ng = helper.make_graph(self.nodes, g.name, inputs, list(g.output), initializer=self.new_inits)
        out = with_graph(self.model, ng, self.sources)
        _set_opsets(out, p)
        return out


def _set_opsets(model: Model, plan: QuantPlan) -> None:
    proto = model.proto
    if model_opset(model) < plan.opset:
        from onnx import version_converter
        converted = version_converter.convert_version(proto, plan.opset)
        del converted.graph.value_info[:]
        for k, n in enumerate(converted.graph.node):
            if not n.name:
                n.name = f"/quantize/opset{plan.opset}/{n.op_type}_{k}"
        proto.CopyFrom(converted)
    if plan.opset >= 21 or plan.bits == 4:
        proto.ir_version = max(proto.ir_version, 10)
    if plan.scheme.format == "onnxruntime" and not any(o.domain == MS for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS, 1))
