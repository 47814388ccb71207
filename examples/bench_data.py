"""Benchmark: simulating cluster fields and feeding the network.

    python examples/bench_data.py [--clusters 8] [--batches 40]

Measures, in one run on this machine: the time to simulate one 32′ cluster
field on one core (``simulate_cluster_field``: halos, line-of-sight
structure, shear on the padded field), and the throughput of the tf.data
pipeline drawing fresh source catalogs, gridding them with the Cython
gridder and cutting augmented subfields (``training_data(...,
fresh_catalogs=True)``).  The last line is one JSON object of the figures.
"""
# ## Setup
import argparse
import json
import statistics
import tempfile
import time

import numpy as np

import wlcnn
import simulate_skies

parser = argparse.ArgumentParser()
parser.add_argument("--clusters", type=int, default=8, help="training clusters in the scratch dataset")
parser.add_argument("--batches", type=int, default=40)
parser.add_argument("--batch-size", type=int, default=8)
args = parser.parse_args()
cfg = wlcnn.PAPER

# ## Simulation: one field at a time, one core
times = []
for seed in range(5):
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    simulate_skies.simulate_cluster_field(cfg, rng)
    times.append(time.perf_counter() - t0)
sim_s = statistics.median(times)
print(f"simulate_cluster_field: median {sim_s:.3f} s of {[round(t, 3) for t in times]}")

# ## Pipeline: fresh catalogs, gridding, subfields, batches
with tempfile.TemporaryDirectory() as tmp:
    wlcnn.write_dataset(tmp, {"train": args.clusters, "val": 2}, cfg, seed=1, field_fn=simulate_skies.simulated_field,
                            shard_size=4, progress=False)
    train, _ = wlcnn.training_data(tmp, args.batch_size, seed=0, n_val=2, fresh_catalogs=True)
    it = iter(train)
    for _ in range(3):  # warm-up: tracing, first shard loads
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    rate = args.batches * args.batch_size / (time.perf_counter() - t0)
    # Stop the pipeline's reader threads before their shards are deleted:
    # left running past the `with`, they fail on the missing files and the
    # interpreter's exit then waits on them for ever.
    del it, train
print(f"pipeline with fresh catalogs: {rate:.1f} samples/s (batch {args.batch_size})")
print(json.dumps({"sim_field_s": round(sim_s, 4), "pipeline_samples_per_s": round(rate, 1)}))
