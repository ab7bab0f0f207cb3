"""The measured side of quantize: :func:`prepare` (the scheme checked, the linears matched and
kept, the activation ranges calibrated), :class:`Evaluator` (quantize-and-run measurements of one
preparation: ``qvl-surgery sensitivity`` uses it too) and :func:`allocate_budget` (``budget``:
the fewest multiply-adds kept float that reach a token-centered cosine)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from qvl_surgery.core import quant
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.linears import Linear, block_numbers, find_linears, group_of, linear_macs, select_kept
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.passbase import Context

from passes.quantize.calibration import calibrate_ranges
from passes.quantize.emit import _QuantEmitter
from passes.quantize.plan import QuantPlan, plan_quantize
from passes.quantize.report import QuantizeReport
from passes.quantize.scheme import Scheme, check_budget_and_method

log = logging.getLogger(__package__)   # "passes.quantize": the pass's name in --verbose output
MEASURED_TOP = 4   # the groups the estimate ranks costliest per multiply-add, then measured end to end


@dataclass
class Prepared:
    """What a quantization of ``model`` is made from: the scheme checked, the linears found, the ones
    kept float and why, the calibrated activation ranges; ``build(kept)`` emits the quantized model
    in memory (weights computed when read) for measurements."""
    model: Model
    scheme: Scheme
    linears: list[Linear]
    kept: dict[str, str]
    ranges: dict
    report: QuantizeReport

    def plan(self, kept: dict[str, str]) -> QuantPlan:
        return plan_quantize(self.model, self.scheme, self.linears, kept, self.ranges)

    def build(self, kept: dict[str, str]) -> Model:
        return _QuantEmitter(self.model, self.plan(kept), QuantizeReport()).emit()


def prepare(model: Model, context: Context, o: SimpleNamespace) -> Prepared:
    """match (find_linears, select_kept) -> calibrate. ``o``: the quantize pass's options (its
    ``self.o``: the scheme, ``keep_node``, ``keep_block``)."""
    scheme = Scheme.of(o)
    block = scheme.block
    check_budget_and_method(vars(o))   # the library path too (the CLI ran both in preflight)
    blocks = block_numbers(o.keep_block)
    report = QuantizeReport(format=scheme.format, method=scheme.method)
    linears = find_linears(model, report.misses)
    if context.explain:
        for line in report.misses:
            log.debug("quantize: no match at %s", line)
    if not linears:
        raise BadInput("quantize: the model has no linear layer (Gemm/MatMul with a float32 initializer weight); "
                       "is it already quantized?")
    kept = select_kept(linears, keep_nodes=o.keep_node, keep_blocks=blocks)
    if block and scheme.format == "qdq":   # a partial last block is valid ONNX, but OpenVINO refuses it
        for lin in linears:
            if lin.k % block and lin.name not in kept:
                kept[lin.name] = f"input dim not a multiple of block {block}"
    ranges: dict[str, quant.ActivationRange] = {}
    todo = [lin for lin in linears if lin.name not in kept]
    if not todo:
        raise BadInput(f"quantize: every one of the {len(linears)} linear layers is kept float "
                       "({keep_node} / {keep_block}); nothing would be quantized", keep_node="GLOB", keep_block="N")
    if scheme.static:
        if not scheme.calibrate:
            raise BadInput("{activations}: static ranges in qdq format need {calibrate} (an .npz, image files, or "
                           "random:N for random inputs)", activations=scheme.activations, calibrate="SRC")
        tensors = list(dict.fromkeys(lin.x for lin in todo))
        ranges = calibrate_ranges(model, tensors, scheme, progress=context.progress, report=report)
    elif scheme.calibrate and getattr(o, "budget", None) is None:   # with a budget: the inputs it measures on
        report.skipped.append(f"calibrate={scheme.calibrate}: no static activations in this scheme")
    return Prepared(model, scheme, linears, kept, ranges, report)


# ----------------------------------------------------------------------------- budget

class Evaluator:
    """Quantize-and-run measurements of one prepared quantization: the token-centered cosine of the
    outputs against fp32 on the calibration inputs, with a chosen set of linear groups (each block,
    the merger, the patch embed; :func:`~qvl_surgery.core.linears.group_of`) quantized. Nothing is
    estimated: a plan of whole groups runs as a :class:`~passes.quantize.chain.GroupChain` (each
    group's quantized and float variants built once, exact), any other set of linears emits the model
    and runs it whole (onnxruntime segments), as does a model the chain cannot cut."""

    def __init__(self, prep: Prepared, context: Context, inputs: str | None, option: str = "calibrate"):
        from qvl_surgery.core.calibrate import calibration_sets
        self.prep = prep
        self.feeds, self.what = calibration_sets(prep.model, inputs or "random:4", 4, option=option)
        self.build = prep.build
        if prep.scheme.target != "onnxruntime":   # the activations' ranges on the same sets, fake quantization
            from passes.quantize.target import emulator
            self.build = emulator(prep.model, self.feeds, prep.scheme.target, prep.linears)
            self.what += f", measured in an emulation of {prep.scheme.target}'s arithmetic"
        self.outputs = [o.name for o in prep.model.graph.output]
        self.todo = [lin for lin in prep.linears if lin.name not in prep.kept]
        self.groups: dict[str, list[Linear]] = {}
        for lin in self.todo:
            self.groups.setdefault(group_of(lin.name), []).append(lin)
        macs, self.counted_by = linear_macs(prep.model, prep.linears)
        total = sum(macs.values()) or 1
        self.share = {lin.name: macs[lin.name] / total for lin in prep.linears}
        self.group_share = {g: sum(self.share[lin.name] for lin in ls) for g, ls in self.groups.items()}
        clock = time.perf_counter()
        self.chain = self._chain()
        log.info("budget: chain built: %s (%.1f s)", self.chain is not None, time.perf_counter() - clock)
        self._ref: list[dict[str, np.ndarray] | None] = [None] * len(self.feeds)
        if self.chain is None or prep.scheme.target != "onnxruntime":
            self._ref = self._outputs_of(prep.model, self.feeds)

    def ref(self, s: int) -> dict[str, np.ndarray]:
        """fp32's outputs on input set ``s`` (through the chain's float variant, which is the model
        itself in onnxruntime, when first asked)."""
        if self._ref[s] is None:
            self._ref[s] = self.chain.run(set(), s)
        return self._ref[s]

    def _chain(self):
        from passes.quantize.chain import GroupChain, NotChainable
        every = {lin.name: "float" for lin in self.prep.linears}
        floating = self.prep.model if self.prep.scheme.target == "onnxruntime" else self.build(every)
        try:
            return GroupChain(self.build(dict(self.prep.kept)), floating, set(self.groups), self.feeds, self.outputs)
        except NotChainable as e:
            log.info("budget: measuring with whole builds (%s)", e)
            return None

    def _outputs_of(self, m: Model, sets) -> list[dict[str, np.ndarray]]:
        from qvl_surgery.core.segments import run_segments
        got: list[dict[str, np.ndarray]] = [{} for _ in sets]
        idx = {o: 0 for o in self.outputs}

        def rec(name: str, v: np.ndarray) -> None:
            got[idx[name]][name] = np.asarray(v, np.float32)
            idx[name] += 1
        run_segments(m, sets, self.outputs, rec)
        return got

    def _score(self, s: int, got: dict[str, np.ndarray]) -> float:
        from qvl_surgery.core.metrics import centered_cosine
        return min(centered_cosine(self.ref(s)[o], got[o]) for o in self.outputs)

    def cosine(self, quantized: list[Linear], sets: int | None = None, stop_below: float | None = None) -> float:
        """The worst centered cosine over the input sets (the first ``sets``) with exactly ``quantized``
        quantized; with ``stop_below``, the first set's figure under it is returned at once."""
        names = {lin.name for lin in quantized}
        n = len(self.feeds) if sets is None else sets
        whole = {g for g, ls in self.groups.items() if all(lin.name in names for lin in ls)}
        if self.chain is not None and names == {lin.name for g in whole for lin in self.groups[g]}:
            worst = 1.0
            for s in range(n):
                self.ref(s)                          # first: the candidate's run then starts from its state
                worst = min(worst, self._score(s, self.chain.run(whole, s)))
                if stop_below is not None and worst < stop_below:
                    break
            return worst
        keep = {lin.name: self.prep.kept.get(lin.name, "budget") for lin in self.prep.linears if lin.name not in names}
        got = self._outputs_of(self.build(keep), self.feeds[:n])
        return min(self._score(s, g) for s, g in enumerate(got))

    def all_but(self, keep_groups: list[str], sets: int | None = None, stop_below: float | None = None) -> float:
        keep = set(keep_groups)
        return self.cosine([lin for lin in self.todo if group_of(lin.name) not in keep], sets, stop_below)

    def _alone(self, g: str, sets: int, floor: float) -> float:
        """1 - the centered cosine with group ``g`` alone quantized, less ``floor`` (:meth:`_floor`)."""
        return 1.0 - self.cosine(self.groups[g], sets) - floor

    def _floor(self, sets: int) -> float:
        """The error with none quantized: 0 in onnxruntime, a target's own in its arithmetic."""
        return 1.0 - self.all_but(list(self.groups), sets)

    def alone_errors(self, sets: int = 1) -> dict[str, float]:
        """Per group, 1 - the centered cosine with that group alone quantized (worst of the first
        ``sets``), less the error with none quantized (0 in onnxruntime; a target's arithmetic has its
        own); through the chain, each run starts at its group from the float run's state."""
        floor = self._floor(sets)
        return {g: self._alone(g, sets, floor) for g in self.groups}

    def estimated_alone_errors(self, measure: int = MEASURED_TOP) -> tuple[dict[str, float], set[str]]:
        """:meth:`alone_errors` on the first input set, estimated in about three runs of the model instead
        of one per group: each group quantized alone on the float run's own inputs to it gives the
        squared error of its outputs (``chain.local_errors``). The first group's and the last two groups'
        alone errors are measured end to end (the last two are next to the outputs: cheap); the ratio of
        alone error to local error, the gain of the residual stream they all feed, is measured at the
        first group and the second-last and interpolated in log between them. Then the ``measure``
        groups estimated to cost the most per multiply-add are measured end to end too. Returns the
        errors and the groups measured end to end; without a chain, every group is measured."""
        if self.chain is None:
            exact = self.alone_errors(1)
            return exact, set(exact)
        local = self.chain.local_errors(0)
        floor = self._floor(1)
        parts = list(dict.fromkeys(p.group for p in self.chain.parts))
        exact = {g: self._alone(g, 1, floor) for g in dict.fromkeys([*parts[-1:], *parts[-2:-1], parts[0]])}
        # the stream's gain from a group's squared error to the outputs' error, measured at the first
        # group and the second-last, in between interpolated in log over the groups' positions
        ends = [i for i in (0, len(parts) - 2) if i >= 0 and local.get(parts[i], 0) > 0 and exact[parts[i]] > 0]
        est = dict(exact)
        if ends:
            a, b = ends[0], ends[-1]
            ga, gb = (np.log(exact[parts[i]] / local[parts[i]]) for i in (a, b))
            for i, g in enumerate(parts):
                if g not in est:
                    t = 0.0 if a == b else min(max((i - a) / (b - a), 0.0), 1.0)
                    est[g] = float(np.exp(ga + t * (gb - ga))) * local[g]
        est = {g: est.get(g, 0.0) for g in parts}
        top = sorted(parts, key=lambda g: -est[g] / max(self.group_share[g], 1e-12))[:measure]
        for g in sorted((g for g in top if g not in exact), key=parts.index, reverse=True):
            exact[g] = est[g] = self._alone(g, 1, floor)
        return est, set(exact)


def allocate_budget(prep: Prepared, context: Context, budget: float) -> dict[str, str]:
    """Keep the fewest multiply-adds float that bring the token-centered cosine of the outputs (against
    fp32, on the calibration inputs) to ``budget``. Sensitivity, per group of linears (each block, the
    merger, the patch embed): the error that group alone quantized adds on the first input set, estimated
    (:meth:`Evaluator.estimated_alone_errors`; the ``MEASURED_TOP`` that look costliest per multiply-add
    measured end to end). Groups are ranked by that error per multiply-add; the shortest prefix of the ranking that meets the budget on every input set is found by a search up
    from none (one group more at a time up to four, then doubling) and bisection, each candidate run
    end to end (its input sets in turn, until one misses); then each kept group, the largest first, is
    quantized again where the budget holds without it."""
    if not 0.0 < budget < 1.0:
        raise BadInput("{budget}: a token-centered cosine between 0 and 1, e.g. 0.9995", budget=budget)
    clock = time.perf_counter()
    ev = Evaluator(prep, context, prep.scheme.calibrate)
    log.info("budget: %d groups, chain %s, measurements ready: %.1f s", len(ev.groups), ev.chain is not None,
             time.perf_counter() - clock)
    groups, share = ev.groups, ev.group_share
    gain, measured = ev.estimated_alone_errors()
    log.info("budget: sensitivity: %.1f s", time.perf_counter() - clock)
    order = sorted(groups, key=lambda g: -gain[g] / max(share[g], 1e-12))
    tried: dict[int, float] = {}

    def meets(k: int) -> bool:
        tried[k] = ev.all_but(order[:k], stop_below=budget)
        log.info("budget: %d groups kept float: %.6f (%.1f s)", k, tried[k], time.perf_counter() - clock)
        return tried[k] >= budget

    k = 0
    if not meets(0):
        n = len(order)
        # every linear float: the file is fp32 again, except in a target's arithmetic, which quantizes
        # every activation: measure that ceiling
        tried[n] = 1.0 if prep.scheme.target == "onnxruntime" else ev.all_but(order)
        if tried[n] < budget:
            raise BadInput("{budget}" + f": not reachable in {prep.scheme.target}'s arithmetic: with every linear "
                           f"float the token-centered cosine is {tried[n]:.5f} (nothing kept: {tried[0]:.5f}); the "
                           "activations' own quantization sets it: smooth or rotate first, or keep the residual "
                           "stream float (toolchains' rknn hybrid config does)", budget=budget)
        # the fewest groups: one more at a time up to four, then doubling (a budget usually keeps few, and
        # a candidate that misses costs one input set, one that meets costs all), then bisection
        lo, hi = 0, n
        while lo + 1 < n:
            nxt = lo + 1 if lo < 4 else min(2 * lo, n)
            if nxt >= n:
                break
            if meets(nxt):
                hi = nxt
                break
            lo = nxt
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if meets(mid) else (mid, hi)
        k = hi
    kept, achieved = order[:k], tried[k]
    # the ranking is an estimate: each kept group, the largest first, goes back to quantized where the
    # budget still holds without it (one end-to-end candidate each)
    pruned: dict[str, float] = {}
    for g in sorted(kept, key=lambda g: -share[g]) if len(kept) > 1 else []:
        rest = [x for x in kept if x != g]
        pruned[g] = ev.all_but(rest, stop_below=budget)
        log.info("budget: without %s: %.6f (%.1f s)", g, pruned[g], time.perf_counter() - clock)
        if pruned[g] >= budget:
            kept, achieved = rest, pruned[g]
    chosen = dict(prep.kept)
    chosen.update({lin.name: "budget" for g in kept for lin in groups[g]})
    prep.report.budget = {
        "target_centered_cosine": budget, "achieved": round(achieved, 6), "groups_kept": kept,
        "kept_share_of_multiply_adds": round(sum(share[g] for g in kept), 5), "calibration": ev.what,
        "measured_by": "group chain" if ev.chain is not None else "whole builds",
        "evaluations": {str(n): round(v, 6) for n, v in sorted(tried.items())},
        "without": {g: round(v, 6) for g, v in pruned.items()},
        "sensitivity": [{"group": g, "alone_error": float(f"{gain[g]:.3e}"),
                         "measured": "end to end" if g in measured else "estimated", "share": round(share[g], 5)}
                        for g in sorted(groups, key=lambda g: -gain[g])],
    }
    return chosen
