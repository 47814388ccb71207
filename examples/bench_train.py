"""Benchmark: one training step of the Table 1 model, Keras's convolutions vs FFT.

    python examples/bench_train.py [--batch 2]

Times forward + backward + Adam of the paper's model (49×49 filters,
FocalLoss) built with ``conv="direct"`` (Keras's Conv2D / Conv2DTranspose) and
``conv="fft"`` (wlcnn's rfft2d layers, the same weights), in one run.  On a
CPU the direct step takes about a minute a sample, so it is timed once; the
FFT step is the median of five after a warm-up.  The last line is one JSON
object of the figures.
"""
# ## Setup
import argparse
import json
import statistics
import time

import numpy as np
import tensorflow as tf

import wlcnn

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=2)
args = parser.parse_args()
cfg = wlcnn.PAPER


# ## Model and one traced training step
def step_seconds(conv, batch, reps):
    """Wall seconds of ``reps`` training steps (traced beforehand: no tracing timed)."""
    model = wlcnn.compile_model(wlcnn.build_model(cfg, "FocalLoss", conv), cfg)
    model.optimizer.build(model.trainable_variables)
    n, m = cfg.subfield_npix, cfg.output_npix

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = model.loss(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    step = train_step.get_concrete_function(tf.TensorSpec((batch, n, n, 3)), tf.TensorSpec((batch, m, m, 1)))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, n, n, 3)), tf.float32)
    y = tf.constant(rng.normal(0, 0.1, (batch, m, m, 1)), tf.float32)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(x, y).numpy()
        times.append(time.perf_counter() - t0)
    return times


# ## Measure
fft = step_seconds("fft", args.batch, reps=6)[1:]  # the first call warms up
print(f"fft    steps (s): {[round(t, 3) for t in fft]}", flush=True)
direct = step_seconds("direct", args.batch, reps=1)
print(f"direct step  (s): {[round(t, 1) for t in direct]}", flush=True)
fft_s, direct_s = statistics.median(fft), direct[0]
print(json.dumps({"batch": args.batch, "direct_step_s": round(direct_s, 2), "fft_step_s": round(fft_s, 3),
                  "speedup": round(direct_s / fft_s, 1)}))
