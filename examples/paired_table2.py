"""Paired differences of Table 2's metrics between the methods of one report, with
cluster-bootstrap errors: is one CNN better than another, or than KS93, on the same clusters?

    python examples/paired_table2.py reports/table2_v2 --reference "CNN quick" KS93 \
        --methods "CNN KS93-start" "CNN quick" --n-boot 300

Table 2's R and D pool the pixels of every cluster, and its M and Δ_peak are medians over
clusters: none is a mean of per-cluster values, so a paired error does not follow from
per-cluster differences. The clusters are resampled with replacement instead, the same draw
for every method (that is what makes the errors paired: the clusters that are hard for one
method are hard for all), and each statistic is recomputed; the standard deviation over draws
of method − reference is the paired standard error of the difference.

Each metric is scored as a loss, 0 perfect (:data:`METRICS`): |R − 1|, D, |M − 1| and Δ_peak.
The verdict applies the rule fixed before the comparison (issue 21): a method replaces the
reference if its loss is lower on at least 3 of the 4 by more than one paired error, and higher
on none by more than two. Writes paired.csv and paired.json into the report (each whole or not
at all); the last line printed is paired.json's content.

Default run (50 draws): ~3 min for three methods of 200 clusters on 2 CPU cores. The full run
(300 draws) and its result are in examples/ks93_start_run/README.md.
"""
# ## Setup
import argparse
import csv
import json
import os
import sys

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("report", help="report directory of evaluate_table2.py (its evaluation.npz)")
    p.add_argument("--reference", nargs="+", required=True,
                   help="the methods the others are compared to")
    p.add_argument("--methods", nargs="+", required=True, help="methods compared to each reference")
    p.add_argument("--n-boot", type=int, default=50, help="bootstrap draws of the clusters")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import numpy as np  # noqa: E402  (after the command line: see above)

import wlcnn  # noqa: E402

#: The metrics of Table 2, each as a loss (0 perfect): R and M are ratios whose ideal is 1,
#: scored by their distance from 1 (as issue 21's goals state them); D and Δ_peak are 0
#: when perfect.
METRICS = ("R", "D", "M", "dpeak")

#: The rule of the verdict: better on at least ``BETTER_COUNT`` losses by more than
#: ``BETTER_SIGMA`` paired errors, worse on none by more than ``WORSE_SIGMA``.
BETTER_COUNT, BETTER_SIGMA, WORSE_SIGMA = 3, 1.0, 2.0


# ## Data and evaluation: the paired bootstrap
def losses(scores):
    """The :data:`METRICS` as losses, one row a draw: (n_draws, 4), from one method's
    ``wlcnn.bootstrap_scores``."""
    return np.stack([np.abs(scores["R"] - 1.0), scores["D"],
                     np.abs(scores["M_ratio"] - 1.0), scores["dpeak"]], axis=1)


def paired_differences(results, references, methods, n_boot=50, seed=0, progress=False):
    """Each method's loss minus each reference's, on all clusters and over ``n_boot``
    bootstrap draws of the clusters (``wlcnn.bootstrap_scores``: the same draws for every
    method).

    Returns one row a (method, reference ≠ method, metric): ``diff`` (on all clusters),
    ``err`` (the standard deviation of the difference over the draws, ddof = 1),
    ``z = diff / err``, and the two losses on all clusters. ``err`` is 0 where every draw
    gives the same difference (a method compared to itself).
    """
    references, methods = list(references), list(methods)
    names = list(dict.fromkeys(references + methods))
    missing = [m for m in names if m not in results.maps]
    if missing:
        raise ValueError(f"methods {missing} are not in the report; it has {results.methods}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2 (a spread needs two draws), got {n_boot}")
    scores = wlcnn.bootstrap_scores(results, n_boot, np.random.default_rng(seed), names,
                                    progress=progress)
    loss = {m: losses(scores[m]) for m in names}  # row 0: the clusters themselves
    rows = []
    for ref in references:
        for m in (m for m in methods if m != ref):
            spread = np.std(loss[m][1:] - loss[ref][1:], axis=0, ddof=1)
            for i, (k, err) in enumerate(zip(METRICS, spread)):
                diff = loss[m][0, i] - loss[ref][0, i]
                # a spread at round-off level is no spread: the methods agree on every draw
                err = 0.0 if err <= 1e-12 * max(1.0, abs(diff)) else float(err)
                z = diff / err if err > 0 else (0.0 if diff == 0 else np.sign(diff) * np.inf)
                rows.append({"method": m, "reference": ref, "metric": k,
                             "loss": float(loss[m][0, i]),
                             "reference_loss": float(loss[ref][0, i]),
                             "diff": float(diff), "err": err, "z": float(z)})
    return rows


def verdict(rows, method, reference):
    """Whether ``method`` replaces ``reference`` by the rule of :data:`BETTER_COUNT` etc.:
    a dict with the metrics it is better and worse on, and ``replace`` (bool)."""
    mine = [r for r in rows if r["method"] == method and r["reference"] == reference]
    better = [r["metric"] for r in mine if r["z"] < -BETTER_SIGMA]
    worse = [r["metric"] for r in mine if r["z"] > WORSE_SIGMA]
    return {"method": method, "reference": reference, "better": better, "worse": worse,
            "replace": len(better) >= BETTER_COUNT and not worse}


def write_paired(rows, verdicts, out_dir, meta):
    """paired.csv (one row a method and metric) and paired.json, each whole or not at all."""
    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v
                              for k, v in r.items()} for r in rows)
    wlcnn.atomic_write(os.path.join(out_dir, "paired.csv"), write_csv)
    summary = {**meta, "verdicts": verdicts}
    wlcnn.atomic_write_text(os.path.join(out_dir, "paired.json"), json.dumps(summary, indent=1))
    return summary


def main(argv=None):
    """Compare the methods of a report; returns the exit status."""
    args = build_parser().parse_args(argv)
    path = os.path.join(args.report, "evaluation.npz")
    try:
        if not os.path.exists(path):
            raise ValueError(f"{args.report}: no evaluation.npz (is it an evaluate_table2.py "
                             "report?)")
        results = wlcnn.load_evaluation(path)
        rows = paired_differences(results, args.reference, args.methods, args.n_boot,
                                  args.seed, progress=True)
    except (ValueError, OSError) as exc:
        print(f"paired_table2: error: {exc}", file=sys.stderr)
        return 2
    verdicts = [verdict(rows, m, ref) for ref in args.reference for m in args.methods
                if m != ref]
    for r in rows:
        print(f"{r['method']} − {r['reference']}: {r['metric']} loss "
              f"{r['diff']:+.4f} ± {r['err']:.4f} ({r['z']:+.1f} σ)")
    meta = {"references": args.reference, "n_clusters": len(results.truth),
            "n_boot": args.n_boot, "seed": args.seed, "rows": rows}
    print(json.dumps(write_paired(rows, verdicts, args.report, meta)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
