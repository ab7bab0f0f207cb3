"""rotate: an orthogonal rotation of the residual stream, folded into the weights (exact in fp32).

Massive activations live in a few fixed channels of the residual stream; after RMSNorm they set
every per-tensor int8 scale and the other channels fall below one step. Rotating the stream by an
orthogonal ``Q`` (``h -> h Q``) spreads each channel over all of them, and nothing is added at run
time, because every place that touches the stream absorbs ``Q``:

- RMSNorm without its scale commutes with ``Q`` (``rms(h Q) = rms(h)``), so each norm's scale ``g``
  is first folded into the linears that read the norm (``W -> W diag(g)``) and its Mul removed;
- a linear that writes the stream (patch embed, attention proj, down_proj; an image-in export's patch
  Conv through its token reorders) computes ``y Q``:
  ``W -> Q^T W``, ``b -> Q^T b`` (weights ``[N, K]``; ``[K, N]`` MatMul weights: ``B -> B Q``);
- a linear that reads a norm gets ``x Q``: ``W -> W diag(g) Q``; the merger reads four tokens
  at once through a Reshape (``[T, C] -> [T/4, 4C]``): ``Q`` block-diagonally, four times;
- residual Adds and token reorders (Gather on the token axis) commute with ``Q``.

``Q`` is a randomized Hadamard matrix (``diag(+-1) H / sqrt(C)``: 1280 = 20 x 64, a Paley matrix of
order 20 times a Sylvester one; a power of two is Sylvester alone), or a seeded random orthogonal
matrix where no Hadamard construction here fits ``C``. Anything else that reads or writes the
stream (a graph input or output in it, an op that does not commute) is refused in one line naming
it: rotate before split. The MLP's inner space (3420) is not rotated.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import constant_value, with_graph
from qvl_surgery.core.patterns import consumers, producers
from qvl_surgery.core.residual import (Norm, StreamLinear, conv_writer, hidden_norms, is_token_gather, norm_readers,
                                      refolded, stream_linear)
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.passbase import Context, Judgement, Option, Pass, PassReport, PassResult, refuse_split_part


log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RotateReport(PassReport):
    rotation: str = ""
    norms: int = 0
    writers: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        return [f"rotate: residual stream rotated by {self.rotation}; {self.norms} RMSNorm scales folded, "
                f"{len(self.writers)} writers and {len(self.readers)} readers rewritten, no op added"]


# ----------------------------------------------------------------------------- the rotation

def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _paley(q: int) -> np.ndarray:
    """Hadamard matrix of order q + 1 (Paley I; q prime, q = 3 mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in squares else -1 for i in range(1, q)])
    jac = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return s + np.eye(q + 1)


def hadamard(n: int) -> np.ndarray | None:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I) from Sylvester's and Paley's
    constructions, or None where neither fits (n = 2^k, 12 * 2^k, 20 * 2^k)."""
    for base, q in ((1, None), (12, 11), (20, 19)):
        if n % base == 0 and (n // base) & (n // base - 1) == 0:
            core = np.ones((1, 1)) if q is None else _paley(q)
            return np.kron(core, _sylvester(n // base))
    return None


def rotation(n: int, seed: int = 0, kind: str = "hadamard") -> tuple[np.ndarray, str]:
    """An orthogonal n x n matrix (float64) and its description."""
    rng = np.random.default_rng(seed)
    h = hadamard(n) if kind == "hadamard" else None
    if h is not None:
        signs = rng.choice([-1.0, 1.0], size=n)
        return signs[:, None] * h / np.sqrt(n), f"randomized Hadamard {n}x{n} (seed {seed})"
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    q *= np.sign(np.diag(r))
    why = "" if kind == "random" else f"; no Hadamard construction here for {n}"
    return q, f"random orthogonal {n}x{n} (seed {seed}{why})"


@dataclass
class _Plan:
    norms: list[Norm]
    writers: list[StreamLinear]
    readers: list[tuple[StreamLinear, Norm, int]]   # linear, the norm it reads, how many tokens a row holds
    removed: set[int]                           # id() of the scale Muls to drop


def plan_rotation(model: Model, norms: list[Norm], c: int) -> _Plan:
    g = model.graph
    cons, prod = consumers(g), producers(g)
    outputs = {o.name for o in g.output}
    inputs = {i.name for i in g.input}
    norm_nodes = {id(n) for norm in norms for n in norm.nodes}
    stream: set[str] = set()
    todo = [n.x for n in norms]
    writers: dict[str, StreamLinear] = {}

    def where(t: str) -> str:
        return f"tensor {t!r} of the residual stream"

    while todo:
        t = todo.pop()
        if t in stream:
            continue
        stream.add(t)
        if t in outputs:
            raise BadInput(f"rotate: {where(t)} is a graph output (a split part?); rotate the whole model, then split")
        if t in inputs:
            raise BadInput(f"rotate: {where(t)} is a graph input (a split part?); rotate the whole model, then split")
        p = prod.get(t)
        if p is None:
            raise BadInput(f"rotate: {where(t)} is a constant")
        if p.op_type == "Add":
            todo += [i for i in p.input if i not in stream]
        elif is_token_gather(model, p):
            todo.append(p.input[0])
        else:
            lin = stream_linear(model, p)
            if lin is None:
                lin = (conv_writer(model, t, prod, cons, c) or (None,))[0]   # an image-in export's patch embed
            if lin is None:
                raise BadInput(f"rotate: {where(t)} is made by {p.op_type} {p.name!r}, which a rotation cannot "
                               "be folded into (only linears, residual Adds and token Gathers)")
            writers[lin.weight] = lin
        for n in cons.get(t, []):
            if id(n) in norm_nodes:
                continue
            if n.op_type == "Add" or (is_token_gather(model, n) and n.input[0] == t):
                todo += [o for o in n.output if o not in stream]
                todo += [i for i in n.input if i not in stream and n.op_type == "Add"]
            else:
                raise BadInput(f"rotate: {where(t)} is read by {n.op_type} {n.name!r}, which does not commute with "
                               "a rotation")
    readers: list[tuple[StreamLinear, Norm, int]] = []
    for norm in norms:
        found, other = norm_readers(model, cons, norm, c)
        if other is not None:
            raise BadInput(f"rotate: the output of RMSNorm {norm.out!r} is read by {other.op_type} {other.name!r}; "
                           "only linears (directly or through a Reshape that groups whole tokens) can absorb the "
                           "rotation")
        readers += [(lin, norm, tokens) for lin, tokens in found]
    seen: dict[str, str] = {}
    for lin in list(writers.values()) + [r[0] for r in readers]:
        if lin.weight in seen and seen[lin.weight] != lin.node.name:
            raise BadInput(f"rotate: weight {lin.weight!r} is shared by two nodes; cannot rotate it for one only")
        seen[lin.weight] = lin.node.name
    if set(writers) & {r[0].weight for r in readers}:
        raise BadInput("rotate: a linear both reads a norm and writes the residual stream; not supported")
    return _Plan(norms, list(writers.values()), readers, {id(n.scale_node) for n in norms if n.scale_node is not None})


# ----------------------------------------------------------------------------- fold

def _check_seed(seed: int) -> None:
    if seed is not None and seed < 0:
        raise BadInput("{seed}: a seed is a whole number >= 0", seed=seed)


def _rotate(model: Model, o) -> tuple[Model, RotateReport]:
    seed, kind = o.seed, o.kind
    _check_seed(seed)
    refuse_split_part(model, "rotate")
    norms, c = hidden_norms(model, "rotate")
    inits = model.initializers()
    plan = plan_rotation(model, norms, c)
    q, described = rotation(c, seed, kind)
    sources = dict(model.sources)
    new_inits = {t.name: t for t in model.graph.initializer}

    def scale_of(norm: Norm) -> np.ndarray:
        if norm.scale is None:
            return np.ones(c)
        v = constant_value(model, norm.scale)
        if v is None:
            raise BadInput(f"rotate: the scale {norm.scale!r} of RMSNorm {norm.out!r} is not a constant")
        return np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (c,))

    def replace(name: str, fn) -> None:
        new_inits[name], sources[name] = refolded(model, inits[name], fn)

    for lin in plan.writers:   # y -> y Q (a Conv's weight [C, ...]: its output channels, as a Gemm's rows)
        replace(lin.weight, (lambda w: (q.T @ w.reshape(len(w), -1)).reshape(w.shape)) if lin.out_in
                else (lambda w: w @ q))
        if lin.bias:
            replace(lin.bias, lambda b: (b.reshape(-1) @ q).reshape(b.shape))
    for lin, norm, tokens in plan.readers:   # x -> x Q, scale folded: W diag(g) Q (per token group)
        g = np.asarray(scale_of(norm))   # the matrix is made when the weight is written, not held meanwhile

        def fold(w: np.ndarray, g=g, tokens=tokens, out_in=lin.out_in) -> np.ndarray:
            m = np.kron(np.eye(tokens), g[:, None] * q)
            return w @ m if out_in else m.T @ w
        replace(lin.weight, fold)
    # drop the scale Muls: their readers read the normalized tensor
    rename = {n.out: n.core_out for n in plan.norms if n.scale_node is not None}
    nodes = []
    for n in model.graph.node:
        if id(n) in plan.removed:
            continue
        nn = onnx.NodeProto()
        nn.CopyFrom(n)
        for k, i in enumerate(nn.input):
            if i in rename:
                nn.input[k] = rename[i]
        nodes.append(nn)
    used = {i for n in nodes for i in n.input}
    kept_inits = [t for name, t in new_inits.items() if name in used]
    sources = {k: v for k, v in sources.items() if k in used}
    g = model.graph
    ng = helper.make_graph(nodes, g.name, [i for i in g.input if i.name not in new_inits or i.name in used],
                           list(g.output), initializer=kept_inits)
    out = with_graph(model, ng, sources)
    out.set_metadata("qvl_surgery.rotate", json.dumps({"rotation": described, "seed": seed, "kind": kind,
                                                       "hidden": c}))
    report = RotateReport(rotation=described, norms=len(plan.norms),
                          writers=[lin.node.name for lin in plan.writers],
                          readers=[lin.node.name for lin, _, _ in plan.readers])
    return out, report


class RotatePass(Pass):
    name = "rotate"
    help = "rotate the residual stream by an orthogonal matrix folded into the weights (exact; spreads outliers)"
    example = ("qvl-surgery rotate out/model.onnx -o out/rotated.onnx\n"
               "  qvl-surgery run out/model.onnx -o out/w8a8 --passes rotate,quantize:activations=int8,format=onnxruntime")
    judgement = Judgement(atol=1e-4, rtol=1e-3, min_cosine=0.99999, label="fp32 (rotated)")
    options = (
        Option("seed", int, 0, "seed of the random signs (or of the random orthogonal matrix)"),
        Option("kind", str, "hadamard", "hadamard: randomized Hadamard (random orthogonal where no construction "
               "fits the hidden size); random: a random orthogonal matrix", choices=("hadamard", "random")),
    )

    def preflight(self, facts: dict) -> None:
        _check_seed(self.values.get("seed"))

    def apply(self, model: Model, context: Context) -> PassResult:
        out, report = _rotate(model, self.o)
        return PassResult(out, report)


rotate_model = RotatePass.function("rotate_model")
