"""Benchmark: training steps of the Table 1 model, samples per second.

    python examples/bench_train.py [--batches 50 8] [--steps 3] [--direct-batch 2]

Times forward + backward + Adam of the paper's model (49×49 filters,
FocalLoss) with wlcnn's FFT layers at the paper's batch (50) and the quick
preset's batch (8): the median of ``--steps`` steps after an untimed one
(tracing and XLA compilation). Besides wall seconds it reports the process's
CPU seconds per sample, which depend less on other jobs sharing the machine.
``--direct-batch B`` also times one step of the same model built with Keras's
Conv2D / Conv2DTranspose (``conv="direct"``) at batch B; on a CPU that takes
about a minute a sample. The last line is one JSON object of the figures.

The default run takes under a minute on a 2-core CPU, where it gave
11-13 samples/s at batch 50 and 7.6-7.8 at batch 8 (0.08-0.09 CPU s a
sample), with other jobs on the machine.
"""
# ## Setup
import argparse
import json
import statistics
import time

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[50, 8])
    parser.add_argument("--steps", type=int, default=3,
                        help="timed FFT steps per batch size (median)")
    parser.add_argument("--direct-batch", type=int, default=0,
                        help="also time one Keras Conv2D step at this batch "
                             "(slow; 0: skip)")
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return parser


def parse_args(argv=None):
    """The command line, checked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or min(args.batches) < 1 or args.direct_batch < 0:
        parser.error("--steps and --batches must be >= 1, --direct-batch >= 0")
    return args


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import numpy as np  # noqa: E402  (after the command line: see above)
import tensorflow as tf  # noqa: E402

import wlcnn  # noqa: E402

CFG = wlcnn.PAPER


# ## Model
def step_function(conv, batch):
    """One traced training step of the Table 1 model on fixed random data."""
    model = wlcnn.compile_model(wlcnn.build_model(CFG, "FocalLoss", conv), CFG)
    model.optimizer.build(model.trainable_variables)
    n, m = CFG.subfield_npix, CFG.output_npix

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = model.loss(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, n, n, 3)), tf.float32)
    y = tf.constant(rng.normal(0, 0.1, (batch, m, m, 1)), tf.float32)
    return lambda: train_step(x, y).numpy()


# ## Train
def time_steps(conv, batch, steps, warm_up=True):
    """Wall and process-CPU seconds of ``steps`` training steps."""
    step = step_function(conv, batch)
    if warm_up:
        step()
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def main(argv=None):
    """Time the training steps; the last printed line is one JSON object."""
    args = parse_args(argv)
    result = {}
    batches = list(args.batches)
    if args.direct_batch and args.direct_batch not in batches:
        batches.append(args.direct_batch)
    for batch in batches:
        wall, cpu = time_steps("fft", batch, args.steps)
        step_s = statistics.median(wall)
        print(f"fft  batch {batch:3d}: steps {[round(t, 3) for t in wall]} s, "
              f"{batch / step_s:.2f} samples/s, "
              f"{statistics.median(cpu) / batch:.4f} CPU s a sample", flush=True)
        result[f"fft_step_s_b{batch}"] = round(step_s, 3)
        result[f"fft_samples_per_s_b{batch}"] = round(batch / step_s, 2)
        result[f"fft_cpu_s_per_sample_b{batch}"] = round(
            statistics.median(cpu) / batch, 4)
    if args.direct_batch:
        b = args.direct_batch
        (direct_s,), _ = time_steps("direct", b, 1, warm_up=False)
        print(f"direct batch {b:3d}: one step {direct_s:.1f} s", flush=True)
        fft_s = result[f"fft_step_s_b{b}"]
        result.update(batch=b, direct_step_s=round(direct_s, 2),
                      fft_step_s=fft_s, speedup=round(direct_s / fft_s, 1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
