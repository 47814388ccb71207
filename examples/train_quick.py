"""Train the CNN of Table 1 on simulated skies and score it against KS93.

    python examples/train_quick.py                         # the small default run
    python examples/train_quick.py --train 400 --val 50 --test 60 --epochs 16 --steps 100

The whole chain at a small size: simulate cluster fields with the sky simulator
(``simulate_skies.py``), train the Table 1 network from its KS93 start (the
quick preset, fewer steps), choose the KS93 smoothing on the validation
clusters by the paper's four metrics, and score both methods on held-out test
clusters by R (eq. 14), D (eq. 15), M_pred/M_truth and Δ_peak (§3). Prints a
table and, last, one JSON line. Rerunning the same command resumes the
simulation and the training where they stopped.

Default run (24 train / 8 validation / 8 test clusters, 3 epochs of 25 steps of
8 subfields, stride-12 mosaics with one orientation), 2 CPU cores:
192 CPU-s (156 s user, 36 s system); 363 s wall with the cores shared with
other jobs (33 s simulating, 243 s training: 600 samples, best validation loss
0.00113; 75 s evaluating).  It leaves 141 MB in ``--out``: the dataset (135 MB),
kept so that rerunning resumes, and the run (6 MB); delete the directory when
done.  KS93 (1.0′ chosen) R 0.642, D 3.36, M 1.039, Δ_peak 1.56; CNN R 0.479,
D 2.60, M 0.837, Δ_peak 2.72 pixels: 600 samples are too few, the CNN wins D only.

The full quick chain (simulate_skies.py with 400 / 50 / 60 clusters, train.py
--preset quick for two seeds, 30 minutes each, evaluate_table2.py on the 60 test
clusters; the runs are examples/quick_model): CNN R 0.573, D 1.96, M 0.983,
Δ_peak 1.70 pixels against KS93 (1.25′) R 0.538, D 4.01, M 0.917, Δ_peak 1.82.
"""
# ## Setup
import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=cli.output_dir, default="runs/train_quick",
                   help="work directory (data/, runs/), created with its parents if missing")
    p.add_argument("--train", type=int, default=24, help="training clusters")
    p.add_argument("--val", type=int, default=8, help="validation clusters")
    p.add_argument("--test", type=int, default=8, help="test clusters")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=25, help="steps of 8 subfields an epoch")
    p.add_argument("--n-val", type=int, default=32, help="validation subfields")
    p.add_argument("--stride", type=int, default=12, help="mosaic offset step (paper: 3)")
    p.add_argument("--orientations", type=int, default=1, choices=[1, 6], help="paper: 6")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import skies  # noqa: E402  (after the command line: see above)
import train  # noqa: E402  (the training loop and its checkpoints)
import wlcnn  # noqa: E402


def main(argv=None):
    """Simulate, train, evaluate; returns the exit status."""
    args = build_parser().parse_args(argv)
    out, config, t0 = Path(args.out), wlcnn.PAPER, time.perf_counter()

    # ## Data
    # Each cluster field: a main NFW halo, companions and line-of-sight
    # structure; its catalog of 25 sources per arcmin² is stored, and
    # training draws a new catalog at every visit (fresh_catalogs).
    counts = {"train": args.train, "val": args.val, "test": args.test}
    skies.write_dataset(out / "data", counts, config, args.seed,
                        field_fn=skies.simulated_field, shard_size=8)
    t_data = time.perf_counter()

    # ## Model
    # Table 1 (FocalLoss) with the quick preset: the KS93 start smoothed by 1′,
    # Adam 5e-5, batches of 8; here fewer steps and no time limit.
    preset = dataclasses.replace(train.PRESETS["quick"], epochs=args.epochs,
                                 steps_per_epoch=args.steps, n_val=args.n_val,
                                 time_limit_s=None)

    # ## Train
    (info,) = train.train_from_directory(out / "data", out / "runs", preset, runs=1,
                                         seed=args.seed, fresh_catalogs=True)
    models = wlcnn.load_runs(out / "runs")
    t_train = time.perf_counter()

    # ## Evaluate
    # KS93's smoothing is the paper's free parameter: chosen on the validation
    # clusters by the rank sum of the four metrics, as the CNN's best epoch is.
    ds = wlcnn.ClusterDataset(out / "data")
    fwhm, _ = wlcnn.choose_ks93_smoothing(ds.clusters("val"), config=config)
    methods = {"KS93": lambda grid: wlcnn.ks93_mosaic(grid, config, fwhm),
               "CNN": wlcnn.cnn_method(models, config, stride=args.stride,
                                       orientations=args.orientations)}
    results = wlcnn.evaluate_methods(itertools.islice(ds.clusters("test"), args.test),
                                     methods, config, total=args.test)
    rows = wlcnn.table2(results)
    t_eval = time.perf_counter()

    print(f"\nKS93 smoothing {fwhm}′ (chosen on {args.val} validation clusters); "
          f"{args.test} test clusters")
    print(f"{'method':8} {'R':>15} {'D':>13} {'M_pred/M_truth':>24} {'Δ_peak [px]':>24}")
    for r in rows:
        print(f"{r['method']:8} {r['R']:7.3f} ± {r['R_err']:5.3f} "
              f"{r['D']:5.2f} ± {r['D_err']:5.2f} "
              f"{r['M_ratio']:7.3f} (+{r['M_plus']:.3f}/−{r['M_minus']:.3f}) "
              f"{r['dpeak']:6.2f} (+{r['dpeak_plus']:.2f}/−{r['dpeak_minus']:.2f})")
    summary = {
        "ks93_fwhm_arcmin": fwhm, "best_val_loss": info["best_val_loss"],
        "epochs": info["epochs_done"], "samples_per_s": info["samples_per_s"],
        "data_s": round(t_data - t0), "train_s": round(t_train - t_data),
        "evaluate_s": round(t_eval - t_train),
        **{f"{r['method']}_{k}": round(r[k], 4)
           for r in rows for k in ("R", "D", "M_ratio", "dpeak")}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
