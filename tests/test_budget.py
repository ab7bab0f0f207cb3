"""The budget's group chain (passes/quantize/chain.py): each linear group's quantized and float
variants built once; a plan runs as a chain of them. It must be the same arithmetic as the whole model
built under that plan: every figure here is compared with a whole build."""
import json

import numpy as np
import pytest

from qvl_surgery.core.modelfile import load_model
from qvl_surgery.core.passbase import Context
from qvl_surgery.core.segments import segments_at

from passes.quantize import Evaluator, QuantizePass, prepare
from passes.quantize.chain import GroupChain, NotChainable, group_starts

PLANS = ([], ["merger"], ["patch_embed", "blocks.0"], ["blocks.1", "blocks.3", "merger"])


def _evaluator(path, **scheme):
    prep = prepare(load_model(path), Context(), QuantizePass(activations="int8", format="onnxruntime", **scheme).o)
    return Evaluator(prep, Context(), "random:2")


@pytest.mark.parametrize("scheme", [
    pytest.param({}, id="dynamic"),
    pytest.param({"calibrate": "random:2"}, id="static", marks=pytest.mark.slow),
    pytest.param({"activation_scale": "token"}, id="token", marks=pytest.mark.slow),
    pytest.param({"target": "rknn", "calibrate": "random:2"}, id="rknn"),
    pytest.param({"target": "rknn-int8", "calibrate": "random:2"}, id="rknn-int8", marks=pytest.mark.slow)])
def test_a_plan_run_as_a_chain_equals_its_whole_build(stand_ins, scheme):
    ev = _evaluator(stand_ins["outlier"], **scheme)
    assert ev.chain is not None and [p.group for p in ev.chain.parts] == \
        ["patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "merger"]
    chained = [ev.all_but(keep) for keep in PLANS]
    ev.chain = None                                   # the same plans, each emitted and run whole
    whole = [ev.all_but(keep) for keep in PLANS]
    assert np.allclose(chained, whole, atol=1e-6, rtol=0), (chained, whole)
    assert len(set(np.round(whole, 4))) > 1            # the plans differ: the comparison means something


def test_a_chain_run_starts_where_the_plans_differ(stand_ins, monkeypatch):
    """Runs share the last run's state up to the first group whose choice changed: a plan that differs
    only in the merger runs the merger alone."""
    ev = _evaluator(stand_ins["outlier"])
    every = set(ev.groups)
    ev.chain.run(every, 0)
    calls = []
    for part in ev.chain.parts:
        for flag, (seg, sess, keep) in list(part.variants.items()):
            class Counting:
                def __init__(self, s, g):
                    self.s, self.g = s, g

                def run(self, *a):
                    calls.append(self.g)
                    return self.s.run(*a)
            part.variants[flag] = (seg, Counting(sess, part.group), keep)
    ev.chain.run(every - {"merger"}, 0)
    assert calls == ["merger"]
    calls.clear()
    ev.chain.run(every - {"blocks.2"}, 0)
    assert calls == ["blocks.2", "blocks.3", "merger"]


def test_the_chain_refuses_variants_it_cannot_cut_alike(stand_ins):
    """A quantized variant whose group reads a tensor the float variant never makes (here: a renamed
    block output) is refused, and the evaluator falls back to whole builds."""
    ev = _evaluator(stand_ins["outlier"])
    m = ev.prep.model
    quantized = ev.build(dict(ev.prep.kept))
    starts = group_starts(quantized, set(ev.groups))
    block1 = segments_at(quantized, [k for k, _ in starts])[2]
    victim = next(i for i in block1.inputs if i.startswith("blocks.0"))   # the export names it blocks.0.output
    for n in quantized.graph.node:
        for k, i in enumerate(n.input):
            if i == victim:
                n.input[k] = victim + "_renamed"
        for k, o in enumerate(n.output):
            if o == victim:
                n.output[k] = victim + "_renamed"
    with pytest.raises(NotChainable):
        GroupChain(quantized, m, set(ev.groups), ev.feeds, ev.outputs)


@pytest.mark.parametrize("scheme", [pytest.param({}, id="dynamic"),
                                    pytest.param({"activation_scale": "token"}, id="token")])
def test_budget_through_the_chain_is_what_the_file_delivers(stand_ins, tmp_path, scheme):
    """quantize --budget measured through the chain: the report says so, and the written file, run
    whole in onnxruntime on the same input sets, has the centered cosine the budget promised. Per-token
    scales take --calibrate with a budget (the inputs it measures on; nothing static is recorded)."""
    from passes.quantize import quantize_model
    from qvl_surgery.core.calibrate import calibration_sets
    from qvl_surgery.core.metrics import centered_cosine
    from qvl_surgery.core.modelfile import save_model
    import onnxruntime as ort
    src = stand_ins["outlier"]
    q, report = quantize_model(load_model(src), activations="int8", format="onnxruntime", budget=0.9995,
                               calibrate="random:3", **scheme)
    b = report.budget
    if scheme:
        rec = json.loads(q.metadata()["qvl_surgery.quantize"])
        assert rec["activation_scale"] == "token" and rec["calibrate"] is None, rec
    assert b["measured_by"] == "group chain" and b["achieved"] >= 0.9995 and b["groups_kept"]
    save_model(q, tmp_path / "q.onnx")
    feeds, _ = calibration_sets(load_model(src), "random:3", 3)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    worst = min(centered_cosine(ref.run(None, f)[0], got.run(None, f)[0]) for f in feeds)
    assert abs(worst - b["achieved"]) < 1e-5, (worst, b["achieved"])


def test_estimated_alone_errors_rank_like_the_measured_ones(stand_ins):
    """The budget's sensitivity comes from one float run, each group quantized on its float inputs and
    three groups measured end to end: on the outlier stand-in it ranks the groups that matter (measured
    error above 1e-7: merger, patch_embed, blocks.1) as one end-to-end run per group does, each estimate
    within 4x of the measured error where that is above 1e-8 (measured: blocks.0 3.4x under)."""
    ev = _evaluator(stand_ins["outlier"])
    est, measured = ev.estimated_alone_errors(measure=0)   # the estimate alone, no group measured after it
    exact = ev.alone_errors(1)
    assert set(est) == set(exact) and measured == {"patch_embed", "blocks.3", "merger"}
    big = [g for g in exact if exact[g] > 1e-7]
    assert sorted(big, key=lambda g: -est[g]) == sorted(big, key=lambda g: -exact[g]) and len(big) >= 3
    assert all(est[g] < min(exact[b] for b in big) for g in exact if g not in big)
    for g in exact:
        if exact[g] > 1e-8:
            assert 0.25 < est[g] / exact[g] < 4.0, (g, est[g], exact[g])


def test_16_bit_targets_fake_quantize_on_an_unsigned_16_bit_grid(stand_ins):
    """pulsar2-u16 / qnn-w8a16: each activation rknn would quantize lies on its tensor's unsigned
    16-bit grid (min..max, zero included), and the emulation tracks fp32 far closer than 8 bits."""
    from qvl_surgery.core.calibrate import calibration_sets
    from qvl_surgery.core.segments import run_segments
    from passes.quantize.target import _grid, emulator, record_min_max, activation_tensors
    m = load_model(stand_ins["outlier"])
    prep = prepare(m, Context(), QuantizePass(activations="int8", format="onnxruntime").o)
    feeds, _ = calibration_sets(m, "random:2", 2)
    emulated = emulator(m, feeds, "qnn-w8a16", prep.linears)({})
    tensors = activation_tensors(m)
    ranges = record_min_max(m, feeds, tensors)
    watch = [t for t in tensors if t in {o for n in emulated.graph.node for o in n.output}][::7][:12]
    got = {}
    run_segments(emulated, feeds[:1], watch, lambda name, v: got.setdefault(name, np.asarray(v, np.float64)))
    assert len(got) == len(watch) >= 8
    for t, v in got.items():
        scale, zp = _grid(*ranges[t], 16)
        q = v / np.float64(scale) + zp
        assert np.abs(q - np.rint(q)).max() < 2e-2 and q.min() > -0.5 and q.max() < 65535.5, t
    ev = {t: _evaluator(stand_ins["outlier"], target=t, calibrate="random:2") for t in ("qnn-w8a16", "rknn-int8")}
    wide, narrow = (ev[t].all_but(list(ev[t].groups)) for t in ("qnn-w8a16", "rknn-int8"))
    assert wide > 0.99 > narrow, (wide, narrow)
