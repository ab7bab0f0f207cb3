"""Time onnxruntime (CPU) on one model: session creation, then RUNS inferences on a random input.
Prints 'median_s <seconds> first_s <seconds> session_s <seconds>'. Used by scripts/bench in a child
process so that its peak RSS is the model's own. A dynamic export gets one random image of
IMAGE_SIZE (HxW, default 448x448) with its grid (host-inputs kind: the grid tensors).

    python scripts/ort_latency.py MODEL [RUNS] [IMAGE_SIZE]
"""
import sys
import time

import numpy as np

from qvl_surgery.inputs import ModelKind, parse_sizes, random_feeds
from qvl_surgery.runners import cast_feeds, ort_session

path = sys.argv[1]
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
kind = ModelKind.of(path)
feeds = random_feeds(kind, seed=0, image_sizes=parse_sizes(sys.argv[3]) if len(sys.argv) > 3 else None)
t0 = time.perf_counter()
sess = ort_session(path)
t1 = time.perf_counter()
x = cast_feeds(path, feeds)
times = []
for _ in range(runs):
    s = time.perf_counter()
    sess.run(None, x)
    times.append(time.perf_counter() - s)
print(f"median_s {float(np.median(times[1:] if len(times) > 1 else times)):.4f} first_s {times[0]:.4f} "
      f"session_s {t1 - t0:.4f}")
