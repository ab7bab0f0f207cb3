"""smooth: shift and scale each normed linear input per channel, folded into the weights (exact in fp32).

Massive activations of a trained encoder sit in a few residual channels and are nearly constant
over tokens; after RMSNorm they set every per-tensor int8 scale and the rest of the channels fall
below one step. A rotation spreads them but keeps the constant. This pass changes what the
linears that read an RMSNorm see, per channel ``j`` of the norm's output ``X``:

    X' = (X - s) / t        s_j: the middle of the channel's calibrated range (Outlier Suppression+),
                                 or its mean over tokens (searched)
                            t_j: max|X - s|_j^alpha / max|W_:,j|^(1-alpha) (SmoothQuant)

and every reader absorbs it: ``X W^T + b = X' (W diag(t))^T + (b + W s)``. ``1/t`` is folded into the
norm's scale (``g -> g / t``), the shift is one Sub after it (the only op added, one per norm).
Readers: qkv, gate/up (sharing one input), and the merger's first linear through its 4-token
Reshape (the shift and scale repeat per token slot). The shift and ``alpha`` are searched per linear
input, over a grid, by the int8 error they leave on a sample of the calibration rows (activations
per tensor, weights per output channel, as ``quantize`` does), unless given; an input where leaving
it as is leaves less error is left as is. The error is measured against the token-centered output
(each row minus the mean row, as the centered cosine judges), and the sample holds the rows with the
largest values beside random ones: a massive constant would hide every error in the plain relative
error, and a spike in a few tokens (a trained ViT's massive activations start that way, in
down_proj's input) is what a random sample misses and what sets a per-tensor scale. On the mean
shift: a channel that is near zero in most tokens and large in a few has its range's middle far
from every token; shifting by it puts a constant into every token.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import with_graph
from qvl_surgery.core.patterns import consumers
from qvl_surgery.core.modelfile import Model, read_initializer
from qvl_surgery.core.passbase import Context, Judgement, Option, Pass, PassReport, PassResult, refuse_split_part

from qvl_surgery.core.residual import Norm, StreamLinear, hidden_norms, norm_readers, refolded, stream_linear

log = logging.getLogger(__name__)

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SAMPLE_ROWS = 64         # random rows per input set kept per site for the search
TOP_ROWS = 8             # and the rows with the largest |value|
SHIFTS = ("range", "mean")   # the middle of each channel's calibrated range, or its mean over tokens
SEARCH_ROWS = 256        # output channels of each reader the search quantizes
DEFAULT_CALIB = "random:4"


@dataclass(kw_only=True)
class SmoothReport(PassReport):
    calibration: str = ""
    norms: list[dict] = field(default_factory=list)   # per linear input: name, alpha, max |X| before -> after
    left: list[str] = field(default_factory=list)     # linear inputs where smoothing measured worse than none

    def summary(self) -> list[str]:
        if not self.norms:
            return ["smooth: nothing to do" + (f" ({len(self.left)} linear inputs measured worse smoothed, left as is)"
                                               if self.left else "")]
        before = max(n["max_before"] for n in self.norms)
        after = max(n["max_after"] for n in self.norms)
        alphas = sorted({n["alpha"] for n in self.norms})
        normed = sum(1 for n in self.norms if n.get("rmsnorm"))
        left = f"; {len(self.left)} left as is (smoothing measured worse there)" if self.left else ""
        return [f"smooth: {len(self.norms)} linear inputs ({normed} of them RMSNorm outputs) shifted and scaled "
                "into their readers "
                f"(alpha {', '.join(map(str, alphas))}); largest |linear input| {before:.3g} -> {after:.3g}{left}",
                f"  calibration: {self.calibration}"]


@dataclass
class _Site:
    tensor: str                          # what the readers read (before any Reshape)
    width: int                           # channels of that tensor
    norm: Norm | None                   # an RMSNorm's output: the scale folds into its weight
    readers: list[tuple[StreamLinear, int]]   # linear, tokens per row (merger: 4)


def _sites(model: Model, norms: list[Norm], c: int) -> list[_Site]:
    """Every linear input that only linears read: RMSNorm outputs (qkv, gate/up, the merger through
    its Reshape) and the rest (attention output into proj, the MLP's hidden state into down_proj,
    the merger's GELU into its second linear)."""
    cons = consumers(model.graph)
    sites = []
    norm_outs = set()
    for norm in norms:
        readers, other = norm_readers(model, cons, norm, c)
        if other is not None:
            log.info("smooth: %s is read by %s %s: left as is", norm.out, other.op_type, other.name)
        norm_outs.add(norm.out)
        if other is None and readers:
            sites.append(_Site(norm.out, c, norm, readers))
    reshaped = {n.output[0] for n in model.graph.node if n.op_type == "Reshape" and n.input[0] in norm_outs}
    seen = set(norm_outs) | reshaped
    for n in model.graph.node:
        lin = stream_linear(model, n)
        x = n.input[0] if lin is not None else None
        if x is None or x in seen:
            continue
        seen.add(x)
        readers = [(stream_linear(model, m), 1) for m in cons.get(x, [])]
        if all(r is not None and m.input[0] == x for (r, _), m in zip(readers, cons.get(x, []))):
            sites.append(_Site(x, readers[0][0].k_dim(model), None, readers))
    return sites


@dataclass
class _Stats:
    lo: np.ndarray
    hi: np.ndarray
    rows: list[np.ndarray] = field(default_factory=list)
    total: np.ndarray | float = 0.0
    count: int = 0

    def add(self, x: np.ndarray, c: int, seed: int) -> None:
        """Range and sum per channel; a few random rows and the largest ones kept for the search."""
        x = np.asarray(x, np.float32).reshape(-1, c)
        self.lo = np.minimum(self.lo, x.min(axis=0))
        self.hi = np.maximum(self.hi, x.max(axis=0))
        self.total = self.total + x.sum(axis=0, dtype=np.float64)
        self.count += x.shape[0]
        pick = np.random.default_rng(seed).choice(x.shape[0], size=min(SAMPLE_ROWS, x.shape[0]), replace=False)
        pick = np.union1d(pick, np.argsort(np.abs(x).max(axis=1))[-TOP_ROWS:])
        self.rows.append(x[pick])

    def shift(self, kind: str) -> np.ndarray:
        if kind == "none":
            return np.zeros_like(self.lo, dtype=np.float64)
        return (self.hi.astype(np.float64) + self.lo) / 2.0 if kind == "range" else self.total / max(self.count, 1)

    def amax(self, shift: np.ndarray) -> np.ndarray:
        """max |X - shift| per channel over the calibration."""
        return np.maximum(np.abs(self.hi - shift), np.abs(self.lo - shift))


def _int8_error(x: np.ndarray, w: np.ndarray, amax: float) -> float:
    """|error| of a per-tensor int8 x (scale from its calibrated max) times per-channel int8 w."""
    sx = max(amax, 1e-30) / 127.0
    xq = np.clip(np.rint(x / sx), -127, 127) * sx
    sw = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-30) / 127.0
    wq = np.rint(w / sw) * sw
    return float(np.linalg.norm(xq @ wq.T - x @ w.T))


def _rows(x: np.ndarray, tokens: int, c: int) -> np.ndarray:
    """Sample rows as a reader sees them (the merger: ``tokens`` rows side by side)."""
    return x if tokens == 1 else x[: x.shape[0] // tokens * tokens].reshape(-1, tokens * c)


def _check_alpha(alpha: float | None) -> None:
    if alpha is not None and not 0.0 <= alpha <= 1.0:   # NaN fails this too
        raise BadInput("{alpha}: between 0 and 1 (0: only the shift; 1: all of the range moves into the weights)",
                       alpha=alpha)


def _smooth(model: Model, context: Context, o) -> tuple[Model, SmoothReport]:
    calibrate, alpha = o.calibrate, o.alpha
    from qvl_surgery.core.calibrate import calibration_sets
    from qvl_surgery.core.segments import run_segments
    _check_alpha(alpha)
    refuse_split_part(model, "smooth")
    norms, c = hidden_norms(model, "smooth")
    inits = model.initializers()
    sites = _sites(model, norms, c)
    if not sites:
        raise BadInput("smooth: no RMSNorm whose output only linears read")
    source = calibrate or DEFAULT_CALIB
    feeds, what = calibration_sets(model, source, 4)
    stats = {s.tensor: _Stats(np.full(s.width, np.inf, np.float32), np.full(s.width, -np.inf, np.float32))
             for s in sites}
    widths = {s.tensor: s.width for s in sites}
    count = [0]

    def record(name: str, v: np.ndarray) -> None:
        count[0] += 1
        stats[name].add(v, widths[name], count[0])
    run_segments(model, feeds, list(stats), record, progress=context.progress)
    report = SmoothReport(calibration=f"{what}{'' if calibrate else ' (default; give calibrate= for real images)'}")

    sources = dict(model.sources)
    new_inits = {t.name: t for t in model.graph.initializer}
    extra_nodes: dict[str, list[onnx.NodeProto]] = {}   # norm output -> nodes to add after it
    rename: dict[str, str] = {}
    add_bias: dict[int, str] = {}                         # id(Gemm without bias) -> its new bias

    def weight_of(lin: StreamLinear) -> np.ndarray:
        w = np.asarray(read_initializer(inits[lin.weight], model.sources.get(lin.weight)), np.float64)
        return w if lin.out_in else w.T   # [N, K]

    def computed(name: str, fn, like: TensorProto) -> None:
        new_inits[name], sources[name] = refolded(model, like, fn, name)

    for site in sites:
        st, c = stats[site.tensor], site.width
        shifts = {kind: st.shift(kind) for kind in SHIFTS}
        wmax = np.zeros(c)
        ws = []
        bias_adds: dict[str, list] = {kind: [] for kind in SHIFTS}   # W s: each weight is read once, here
        for lin, tokens in site.readers:
            w = weight_of(lin)
            for kind, shift in shifts.items():
                bias_adds[kind].append(w @ np.tile(shift, tokens))
            wmax = np.maximum(wmax, np.abs(w).reshape(w.shape[0], tokens, c).max(axis=(0, 1)))
            rows = np.random.default_rng(0).choice(w.shape[0], min(SEARCH_ROWS, w.shape[0]), replace=False)
            ws.append((w[np.sort(rows)].astype(np.float32), tokens))   # the search sees a sample of outputs
            del w
        wmax = np.maximum(wmax, 1e-12)
        sample = np.concatenate(st.rows).astype(np.float32)
        centered = sample - st.shift("mean").astype(np.float32)
        # what the error is judged against: the token-centered output, the same whatever the shift and scale
        ref_norms = [max(float(np.linalg.norm(_rows(centered, tokens, c) @ w.T)), 1e-30) for w, tokens in ws]

        def scales(kind: str, a: float | None) -> np.ndarray:
            if a is None:
                return np.ones(c)
            t = np.maximum(st.amax(shifts[kind]), 1e-12) ** a / wmax ** (1 - a)
            return np.where(np.isfinite(t) & (t > 0), t, 1.0)

        def error(choice: tuple[str, float | None]) -> float:
            kind, a = choice
            shift, t = st.shift(kind), scales(kind, a)
            xs = ((sample - shift) / t).astype(np.float32)
            amax = float(np.max(st.amax(shift) / t))   # calibrated range
            return sum(_int8_error(_rows(xs, tokens, c), w * np.tile(t, tokens).astype(np.float32), amax) / ref
                       for (w, tokens), ref in zip(ws, ref_norms))

        choices = [(kind, a) for kind in SHIFTS for a in ((alpha,) if alpha is not None else ALPHAS)]
        kind, best = min(choices, key=error)
        plain = error(("none", None))
        if alpha is None and plain <= error((kind, best)):
            report.left.append(site.tensor)
            continue
        shift, t = shifts[kind], scales(kind, best)
        report.norms.append({"norm": site.tensor, "rmsnorm": site.norm is not None, "alpha": best, "shift": kind,
                             "max_before": float(max(np.abs(st.hi).max(), np.abs(st.lo).max())),
                             "max_after": float(np.max(st.amax(shift) / t)), "int8_error": error((kind, best)),
                             "int8_error_no_smooth": plain})
        # readers: W -> W diag(t) (per token slot), b -> b + W s
        for (lin, tokens), bias_add in zip(site.readers, bias_adds[kind]):
            tt = np.tile(t, tokens)
            computed(lin.weight, (lambda w, tt=tt: w * tt) if lin.out_in else (lambda w, tt=tt: w * tt[:, None]),
                     inits[lin.weight])
            if lin.bias:
                computed(lin.bias, lambda b, add=bias_add: b + add.reshape(b.shape), inits[lin.bias])
            else:
                name = f"{lin.weight}__smooth_bias"
                new_inits[name] = numpy_helper.from_array(bias_add.astype(np.float32), name)
                if lin.node.op_type != "Gemm":
                    raise BadInput(f"smooth: {lin.node.name} is a MatMul without a bias; cannot fold the shift")
                add_bias[id(lin.node)] = name
        # the norm: g -> g / t, then Sub(s / t); elsewhere Mul(1 / t), Sub(s / t)
        norm = site.norm
        out = site.tensor
        shifted = f"{out}__smoothed"
        sname, gname = f"{out}__smooth_shift", f"{out}__smooth_scale"
        new_inits[sname] = numpy_helper.from_array((shift / t).astype(np.float32), sname)
        if norm is not None and norm.scale is not None and norm.scale in inits:
            computed(norm.scale, lambda g, t=t: g / t.reshape(g.shape) if g.size == t.size else g / t, inits[norm.scale])
            extra_nodes[out] = [helper.make_node("Sub", [out, sname], [shifted], name=f"{out}/smooth/Sub")]
        else:
            new_inits[gname] = numpy_helper.from_array((1.0 / t).astype(np.float32), gname)
            scaled = f"{out}__smooth_scaled"
            extra_nodes[out] = [helper.make_node("Mul", [out, gname], [scaled], name=f"{out}/smooth/Mul"),
                                helper.make_node("Sub", [scaled, sname], [shifted], name=f"{out}/smooth/Sub")]
        rename[out] = shifted

    nodes = []
    for n in model.graph.node:
        nn = onnx.NodeProto()
        nn.CopyFrom(n)
        for k, i in enumerate(nn.input):
            if i in rename:
                nn.input[k] = rename[i]
        if id(n) in add_bias:
            nn.input.append(add_bias[id(n)])
        nodes.append(nn)
        for o in n.output:
            nodes += extra_nodes.get(o, [])
    g = model.graph
    ng = helper.make_graph(nodes, g.name, list(g.input), list(g.output), initializer=list(new_inits.values()))
    out_model = with_graph(model, ng, sources)
    out_model.set_metadata("qvl_surgery.smooth", json.dumps({"calibrate": source, "alphas": {
        n["norm"]: n["alpha"] for n in report.norms}, "shifts": {n["norm"]: n["shift"] for n in report.norms},
        "left": report.left}))
    return out_model, report


class SmoothPass(Pass):
    name = "smooth"
    help = "shift and scale each RMSNorm output per channel into its readers (exact; removes outlier offsets)"
    example = ("qvl-surgery smooth out/model.onnx -o out/smoothed.onnx --calibrate a.jpg,b.jpg\n"
               "  qvl-surgery run out/model.onnx -o out/w8a8 --passes smooth,quantize:activations=int8,format=onnxruntime")
    judgement = Judgement(atol=1e-4, rtol=1e-3, min_cosine=0.99999, label="fp32 (smoothed)")
    options = (
        Option("calibrate", str, None, "channel ranges from an .npz, image file(s) (comma separated) or random:N "
               f"(default {DEFAULT_CALIB})", metavar="SRC"),
        Option("alpha", float, None, "SmoothQuant's migration strength, 0..1 (default: searched per norm over "
               f"{', '.join(map(str, ALPHAS))} by the int8 error it leaves)", metavar="A"),
    )

    def preflight(self, facts: dict) -> None:
        _check_alpha(self.values.get("alpha"))
        if self.values.get("calibrate"):
            from qvl_surgery.core.calibrate import check_calibration_source
            check_calibration_source(self.values["calibrate"], random_ok=True)

    def apply(self, model: Model, context: Context) -> PassResult:
        out, report = _smooth(model, context, self.o)
        return PassResult(out, report)


smooth_model = SmoothPass.function("smooth_model")
