"""Time onnxruntime (CPU) on one model: session creation, then RUNS inferences on a random input.
Prints 'median_s <seconds> first_s <seconds> session_s <seconds>'. Used by scripts/bench in a child
process so that its peak RSS is the model's own."""
import sys
import time

import numpy as np

from qvl_surgery.runners import ort_session

path, runs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
t0 = time.perf_counter()
sess = ort_session(path)
t1 = time.perf_counter()
inp = sess.get_inputs()[0]
dtype = np.float16 if "float16" in inp.type else np.float32
x = np.random.default_rng(0).standard_normal(inp.shape).astype(dtype)
times = []
for _ in range(runs):
    s = time.perf_counter()
    sess.run(None, {inp.name: x})
    times.append(time.perf_counter() - s)
print(f"median_s {float(np.median(times[1:] if len(times) > 1 else times)):.4f} first_s {times[0]:.4f} "
      f"session_s {t1 - t0:.4f}")
