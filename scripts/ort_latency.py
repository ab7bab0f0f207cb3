"""Time one model in one runtime: session (compile) creation, then RUNS inferences on a random input.
Answers one JSON result line (scripts/harness/results.py): {"median_s", "first_s", "session_s"} in seconds.
Used by scripts/bench in a child process so that its peak RSS is the model's own. A dynamic export gets one random image of
IMAGE_SIZE (HxW, default 448x448) with its grid (host-inputs kind: the grid tensors).

    python scripts/ort_latency.py MODEL [RUNS] [IMAGE_SIZE] [--runtime onnxruntime|openvino|openvino-bf16|openvino-dq128]
                                  [--threads N] [--save OUT.npy] [--inputs-of MODEL.onnx]
                                  [--images A.png,B.png,...]

--inputs-of: the ONNX file whose inputs MODEL has (for an OpenVINO IR, MODEL.xml, made from it).
--profile (OpenVINO): the result also has "linears_s" and "linear_kernels" (a list), the FullyConnected
nodes' time in the last run and their kernels, from OpenVINO's own per-node counters (PERF_COUNT).

--save writes the first output of the last run (float32), for accuracy against another run's.
--images: the runs are on the first photo instead of random pixels; --save then writes the outputs on
every photo stacked (the first's from the last timed run, each other's from one run of its own).
"""
import argparse
import time

import numpy as np

from harness.results import emit
from qvl_surgery.core.inputs import ModelKind, parse_sizes, random_feeds
from qvl_surgery.core.runners import cast_feeds, openvino_compiled, ort_session

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("runs", nargs="?", type=int, default=3)
ap.add_argument("image_size", nargs="?")
ap.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "openvino", "openvino-bf16", "openvino-dq128"))
ap.add_argument("--threads", type=int, default=None)
ap.add_argument("--save")
ap.add_argument("--inputs-of")
ap.add_argument("--profile", action="store_true")
ap.add_argument("--images")
a = ap.parse_args()
src = a.inputs_of or a.model
if a.images:
    from qvl_surgery.core.inputs import load_inputs
    xs = [cast_feeds(src, load_inputs(src, image=png)) for png in a.images.split(",")]
else:
    kind = ModelKind.of(src)
    xs = [cast_feeds(src, random_feeds(kind, seed=0, image_sizes=parse_sizes(a.image_size) if a.image_size else None))]
x = xs[0]
t0 = time.perf_counter()
if a.runtime == "onnxruntime":
    sess = ort_session(a.model, threads=a.threads)
    run = lambda x=x: sess.run(None, x)[0]  # noqa: E731
else:
    # openvino-dq128: OpenVINO quantizes a weight-compressed linear's activations in groups of 128 (default 32)
    compiled = openvino_compiled(a.model, precision="bf16" if a.runtime == "openvino-bf16" else "f32",
                                 dynamic_group=128 if a.runtime == "openvino-dq128" else None,
                                 threads=a.threads, profile=a.profile)
    request = compiled.create_infer_request()
    run = lambda x=x: request.infer(x)[compiled.outputs[0]]  # noqa: E731
t1 = time.perf_counter()
times = []
for _ in range(a.runs):
    s = time.perf_counter()
    y = run()
    times.append(time.perf_counter() - s)
if a.save:
    ys = [np.array(y, np.float32)] + [np.array(run(other), np.float32) for other in xs[1:]]
    np.save(a.save, np.stack(ys) if a.images else ys[0])
result = {"median_s": round(float(np.median(times[1:] if len(times) > 1 else times)), 4),
          "first_s": round(times[0], 4), "session_s": round(t1 - t0, 4)}
if a.profile and a.runtime != "onnxruntime":
    linears = [p for p in request.profiling_info if p.node_type.startswith("FullyConnected")]
    result["linears_s"] = round(sum(p.real_time.total_seconds() for p in linears), 4)
    result["linear_kernels"] = sorted({f"{p.node_type}:{p.exec_type}" for p in linears})
emit(result)
