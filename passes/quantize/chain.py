"""The budget's fast measurements: a model run as a chain of its linear groups (the patch embed, each
block, the merger; :func:`~qvl_surgery.core.linears.group_of`), each group in two variants built once,
quantized and float, so that any plan (which groups stay float) runs without building anything.

Both variants are whole models built by the quantize pass (or a target's emulation) and cut at the
same places: before the first node of each group, the nodes between groups going with the group
before them. A plan's run is exact, the same arithmetic as the whole model built under that plan,
when every tensor crossing a cut has the same name in both variants (checked: :class:`GroupChain`
refuses otherwise, and the budget falls back to whole builds). Runs share work: a run starts from
the last run's state at the first group where their plans differ, per input set.

``local_errors``: each group quantized alone on the float chain's own inputs to that group, its
outputs' squared error: the budget ranks groups by it instead of one whole run per group."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qvl_surgery.core.graphinfo import elem_types
from qvl_surgery.core.linears import group_of
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.segments import Segment, segment_session, segments_at


class NotChainable(Exception):
    """The two variants cannot be cut at the same tensors: measure with whole builds."""


def group_starts(model: Model, groups: set[str]) -> list[tuple[int, str]]:
    """(node index, group) where each run of a group's nodes starts; nodes named in no group go with
    the run before them (the first run takes the nodes before it)."""
    starts: list[tuple[int, str]] = []
    for k, n in enumerate(model.graph.node):
        g = group_of(n.name)
        if g not in groups or (starts and starts[-1][1] == g):
            continue
        starts.append((0 if not starts else k, g))
    return starts


@dataclass
class _Part:
    group: str
    variants: dict[bool, tuple[Segment, object, object]]   # quantized? -> (segment, session, weights)


class GroupChain:
    """``quantized`` and ``floating``: the same model under two plans (every candidate group quantized;
    none). ``groups``: the candidate groups. ``feeds``: the input sets, ``outputs``: what a run returns."""

    def __init__(self, quantized: Model, floating: Model, groups: set[str], feeds: list[dict], outputs: list[str]):
        cuts = {}
        for flag, m in ((True, quantized), (False, floating)):
            starts = group_starts(m, groups)
            cuts[flag] = (starts, segments_at(m, [k for k, _ in starts]))
        if [g for _, g in cuts[True][0]] != [g for _, g in cuts[False][0]]:
            raise NotChainable("the groups run in a different order in the two variants")
        self.feeds, self.outputs = feeds, outputs
        self.parts: list[_Part] = []
        made: set[str] = set()
        for i, (_, g) in enumerate(cuts[True][0]):
            variants = {}
            for flag, m in ((True, quantized), (False, floating)):
                seg = cuts[flag][1][i]
                if any(x not in made and x not in feeds[0] for x in seg.inputs):
                    raise NotChainable(f"{g} reads a tensor its other variant does not make")
                sess, keep = segment_session(m, seg, elem_types(m), None)
                variants[flag] = (seg, sess, keep)
            made |= set(variants[True][0].outputs) & set(variants[False][0].outputs)
            self.parts.append(_Part(g, variants))
        missing = [o for o in outputs if o not in made]
        if missing:
            raise NotChainable(f"no variant makes the output {missing[0]}")
        self._trails: list[dict[bool, list[tuple[bool, dict]]]] = [{} for _ in feeds]   # float run?: trail

    def run(self, quantized: set[str], s: int) -> dict[str, np.ndarray]:
        """The outputs of input set ``s`` with the groups in ``quantized`` quantized, the rest float.
        Two runs per set are remembered, the float one and the last other: a run starts from the state
        of whichever shares more groups with it, at the first group where they differ."""
        plan = [p.group in quantized for p in self.parts]
        floating = not any(plan)
        best: list[tuple[bool, dict]] = []
        same = 0
        for trail in self._trails[s].values():
            k = 0
            while k < len(trail) and trail[k][0] == plan[k]:
                k += 1
            if k > same:
                best, same = trail, k
        trail = best[:same]
        state = trail[-1][1] if trail else self._inputs(s)
        for i in range(same, len(self.parts)):
            seg, sess, _ = self.parts[i].variants[plan[i]]
            outs = sess.run(seg.outputs, {x: state[x] for x in seg.inputs})
            state = {**state, **dict(zip(seg.outputs, outs))}
            trail.append((plan[i], state))
        self._trails[s][floating] = trail
        return {o: np.asarray(state[o], np.float32) for o in self.outputs}

    def float_state(self, s: int, i: int) -> dict:
        """The float run's state of input set ``s`` after part ``i`` (-1: the inputs)."""
        self.run(set(), s)
        return self._trails[s][True][i][1] if i >= 0 else self._inputs(s)

    def _inputs(self, s: int) -> dict:
        return {k: np.asarray(v) for k, v in self.feeds[s].items()}

    def local_errors(self, s: int) -> dict[str, float]:
        """Per group: the squared error of its outputs (every float tensor later groups or the model's
        outputs read) with the group quantized, on the float chain's inputs to it, input set ``s``."""
        err: dict[str, float] = {}
        for i, part in enumerate(self.parts):
            state = self.float_state(s, i - 1)
            seg_q, sess_q, _ = part.variants[True]
            seg_f, _, _ = part.variants[False]
            got = dict(zip(seg_q.outputs, sess_q.run(seg_q.outputs, {x: state[x] for x in seg_q.inputs})))
            ref = self.float_state(s, i)
            e = 0.0
            for name in seg_f.outputs:
                if name in got and np.issubdtype(np.asarray(ref[name]).dtype, np.floating):
                    d = np.asarray(got[name], np.float64) - np.asarray(ref[name], np.float64)
                    e += float(np.vdot(d, d))
            err[part.group] = err.get(part.group, 0.0) + e
        return err
