"""Benchmark: seconds per cluster of the §3 mosaic, FFT and direct convolutions.

    python examples/bench_inference.py [--batch-sizes 1 4 8 16 32] [--subset-stride 24]

The evaluation predicts every subfield of a test cluster and averages them on
the mosaic grid (``wlcnn.predict_mosaic``).  This times, for the paper's model
(Table 1, 49×49 filters; untrained weights, which cost the same):

1. the batch size: bare ``predict_on_batch`` per sample for each size tried;
2. the quick mosaic (stride 12, one orientation: 100 subfields), measured
   whole, gridding of a 25,600-source catalog included;
3. the paper's mosaic (1,444 offsets × 6 orientations = 8,664 subfields),
   *extrapolated* from a measured subset (stride ``--subset-stride``, all six
   orientations) at the same cost per subfield;
4. the same model with Keras's own Conv2D/Conv2DTranspose ("direct"), timed on
   a few subfields only and extrapolated alike (on a CPU it is ~5× slower).

The last line is one JSON object of the figures.
"""
# ## Setup
import argparse
import json
import os
import statistics
import time

import cli  # the command-line conventions; no TensorFlow

# The command line before TensorFlow loads: --help and usage errors answer at once.
parser = argparse.ArgumentParser(description="benchmark: inference of the network and the mosaic")
parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
parser.add_argument("--reps", type=int, default=3,
                    help="timed calls per batch size (after one warm-up)")
parser.add_argument("--subset-stride", type=int, default=24,
                    help="stride of the measured part of the paper mosaic")
parser.add_argument("--direct-batch", type=int, default=2,
                    help="subfields of the direct-convolution timing")
parser.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
args = parser.parse_args()
cli.quiet_tensorflow(args.verbose)
import numpy as np  # noqa: E402

import wlcnn  # noqa: E402

cfg = wlcnn.PAPER
n_paper = len(wlcnn.mosaic_offsets(cfg)) ** 2 * len(wlcnn.ORIENTATIONS)   # 8,664
n_quick = len(wlcnn.mosaic_offsets(cfg, 12)) ** 2                         # 100
print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (the machine is shared)",
      flush=True)

# ## A catalog to reconstruct: 25,600 sources of an empty field, gridded as in §2.3.2
zero = np.zeros((cfg.npix, cfg.npix))
catalog = wlcnn.simulate_catalog(zero, zero, zero, cfg, np.random.default_rng(0))
t0 = time.perf_counter()
grid = wlcnn.grid_table(catalog, cfg)
grid_s = time.perf_counter() - t0


# ## 1. Batch size: the bare network, seconds per subfield
def per_sample(model, batch, reps):
    """Median seconds per sample of ``predict_on_batch`` (one untimed warm-up call traces it)."""
    shape = (batch, cfg.subfield_npix, cfg.subfield_npix, 3)
    x = np.random.default_rng(1).normal(0, 0.3, shape).astype(np.float32)
    model.predict_on_batch(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model.predict_on_batch(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / batch


fft_model = wlcnn.build_model(cfg, "FocalLoss", conv="fft")
by_batch = {}
for b in args.batch_sizes:
    by_batch[b] = per_sample(fft_model, b, args.reps)
    print(f"fft    batch {b:3d}: {by_batch[b]:.4f} s/subfield", flush=True)


def best_batch(n):
    """The batch size with the least time for ``n`` subfields (the last batch is zero-padded)."""
    return min(by_batch, key=lambda b: -(-n // b) * b * by_batch[b])


batch = best_batch(n_quick)

# ## 2. The quick mosaic, measured whole
t0 = time.perf_counter()
wlcnn.predict_mosaic(fft_model, grid, cfg, stride=12, orientations=1, batch_size=batch)
quick_s = grid_s + time.perf_counter() - t0
print(f"quick mosaic ({n_quick} subfields, batch {batch}): {quick_s:.2f} s/cluster", flush=True)

# ## 3. The paper's mosaic, extrapolated from a measured subset
n_subset = len(wlcnn.mosaic_offsets(cfg, args.subset_stride)) ** 2 * len(wlcnn.ORIENTATIONS)
paper_batch = min(by_batch, key=by_batch.get)  # 8,664 subfields: padding is negligible
t0 = time.perf_counter()
wlcnn.predict_mosaic(fft_model, grid, cfg, stride=args.subset_stride, orientations=6,
                     batch_size=paper_batch)
# per subfield the network computed, the zero-padding of the last batch included
padded = lambda n: -(-n // paper_batch) * paper_batch  # noqa: E731
per_subfield = (time.perf_counter() - t0) / padded(n_subset)
paper_s = grid_s + padded(n_paper) * per_subfield
print(f"paper mosaic (batch {paper_batch}): {n_subset} subfields measured, "
      f"{per_subfield:.4f} s each -> "
      f"{n_paper} subfields: {paper_s:.0f} s/cluster (extrapolated)", flush=True)
# what the mosaic adds to the bare network: crops, orientations, sums
overhead = max(per_subfield - by_batch[paper_batch], 0.0)

# ## 4. Direct convolutions (Keras's Conv2D / Conv2DTranspose), a few subfields
direct_model = wlcnn.build_model(cfg, "FocalLoss", conv="direct")
direct_model.set_weights(fft_model.get_weights())
direct = per_sample(direct_model, args.direct_batch, reps=1)
print(f"direct batch {args.direct_batch:3d}: {direct:.4f} s/subfield", flush=True)
direct_quick = grid_s + n_quick * (direct + overhead)
direct_paper = grid_s + n_paper * (direct + overhead)
print(f"direct: quick {direct_quick:.1f} s/cluster, "
      f"paper {direct_paper:.0f} s/cluster (extrapolated)", flush=True)

print(json.dumps({"paper_mosaic_s_per_cluster": round(paper_s, 1),
                  "quick_mosaic_s_per_cluster": round(quick_s, 2),
                  "quick_batch_size": batch, "paper_batch_size": paper_batch,
                  "fft_s_per_subfield": round(by_batch[paper_batch], 4),
                  "mosaic_s_per_subfield": round(per_subfield, 4),
                  "paper_mosaic_measured_subfields": n_subset,
                  "direct_s_per_subfield": round(direct, 4),
                  "direct_paper_mosaic_s_per_cluster": round(direct_paper, 1),
                  "direct_quick_mosaic_s_per_cluster": round(direct_quick, 2),
                  "gridding_s": round(grid_s, 3), "device": "cpu", "cores": os.cpu_count(),
                  "load_average_1min": round(os.getloadavg()[0], 1)}))
