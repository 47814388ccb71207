"""
Title: Benchmark of the training data: simulated skies and the input pipeline
Description: Time to simulate one cluster field, and throughput of the tf.data
pipeline that feeds the network.

Measures, in one run on this machine: the median time to simulate one 32′
cluster field on one core (``skies.simulate_cluster_field``: halos,
line-of-sight structure, shear on the torus), and the samples per second of
``wlcnn.training_data(..., fresh_catalogs=True)``, which draws fresh source
catalogs, grids them and cuts augmented subfields.  The last line is one JSON
object of the figures.

Run (about 30 s on 2 cores; longer when other jobs share them):

    python examples/bench_data.py
"""
# ## Setup
import argparse
import json
import statistics
import sys
import tempfile
import time

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description="benchmark: simulated fields and the input pipeline")
    p.add_argument("--fields", type=int, default=3, help="fields simulated for the timing")
    p.add_argument("--clusters", type=int, default=4, help="clusters in the scratch dataset")
    p.add_argument("--batches", type=int, default=20, help="batches timed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


def parse_args(argv=None):
    """The command line, checked."""
    p = build_parser()
    args = p.parse_args(argv)
    if min(args.fields, args.clusters, args.batches, args.batch_size) < 1:
        p.error("every count must be >= 1")
    return args


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import numpy as np  # noqa: E402  (after the command line: see above)

import skies  # noqa: E402
import wlcnn  # noqa: E402


def main(argv=None):
    """Run the benchmark; the last printed line is one JSON object."""
    args = parse_args(argv)
    cfg = wlcnn.PAPER

    # ## Simulation: one field at a time, one core
    skies.simulate_cluster_field(cfg, np.random.default_rng(0))  # fills the caches
    times = []
    for seed in range(1, args.fields + 1):
        t0 = time.perf_counter()
        skies.simulate_cluster_field(cfg, np.random.default_rng(seed))
        times.append(time.perf_counter() - t0)
    sim_s = statistics.median(times)
    print(f"simulate_cluster_field: median {sim_s:.3f} s of {[round(t, 3) for t in times]}")

    # ## Pipeline: fresh catalogs, gridding, subfields, batches
    with tempfile.TemporaryDirectory() as tmp:
        skies.write_dataset(tmp, {"train": args.clusters, "val": 2}, cfg, seed=1,
                            field_fn=skies.simulated_field, shard_size=2,
                            progress=False)
        train, _ = wlcnn.training_data(tmp, args.batch_size, seed=0, n_val=2,
                                       fresh_catalogs=True)
        it = iter(train)
        for _ in range(3):  # warm-up: tracing, first shard loads
            next(it)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        rate = args.batches * args.batch_size / (time.perf_counter() - t0)
        # Stop the pipeline's reader threads before their shards are deleted:
        # left running past the `with`, they fail on the missing files and
        # the interpreter's exit then waits on them for ever.
        del it, train
    print(f"pipeline with fresh catalogs: {rate:.1f} samples/s (batch {args.batch_size})")
    print(json.dumps({"sim_field_s": round(sim_s, 4), "pipeline_samples_per_s": round(rate, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
