"""The learning curve of a training run: validation loss and the §3 metrics against samples seen.

    python examples/learning_curve.py --run runs/paper/run_00 --data data/paper \
        --out examples/paper_run

A run trained with ``train.py --snapshot-every N`` keeps its weights after every
N-th epoch.  Each snapshot's CNN reconstructs the first ``--n-clusters``
validation clusters (mosaic of ``--stride``, one orientation), scored by R, D,
M_pred/M_truth and Δ_peak (§3) on the pixels the mosaic covers, beside KS93 at
the smoothing those clusters prefer (ks93_reference.json).  The validation loss
is the run's own, on its fixed validation subfields (history.csv), beside that
of the same KS93 cut to the Output layer's 49 × 49 filter.  Writes learning_curve.csv and
learning_curve.png into ``--out`` with the run's history.csv and run.json and,
once the run is complete, its best weights as paper_focalloss.keras (so that
``--models OUT`` works in evaluate_table2.py and reconstruct_catalog.py).
Rerunning scores only the snapshots not yet in learning_curve.csv.
Each snapshot costs ~70 s on 2 idle CPU cores (50 clusters, stride 18).
"""
# ## Setup
import argparse
import csv
import importlib
import itertools
import json
import shutil
import sys
from pathlib import Path

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run directory (run_XX) with snapshots")
    p.add_argument("--data", required=True, help="the run's dataset (its val split is scored)")
    p.add_argument("--out", type=cli.output_dir, required=True,
                   help="directory of the curve and the run's files, created with its "
                        "parents if missing")
    p.add_argument("--n-clusters", type=int, default=50, help="validation clusters scored")
    p.add_argument("--stride", type=int, default=18, help="mosaic offset step (paper: 3)")
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import numpy as np  # noqa: E402  (after the command line: see above)

import wlcnn  # noqa: E402

COLUMNS = ("epoch", "samples", "val_loss", "loss", "R", "D", "M_ratio", "dpeak")
METRIC_KEYS = ("R", "D", "M_ratio", "dpeak")
METRICS = (("val_loss", "validation loss (eq. 11)", None), ("R", "R (eq. 14)", 1.0),
           ("D", "D (eq. 15)", 0.0), ("M_ratio", "M_pred / M_truth", 1.0),
           ("dpeak", "Δ_peak [pixel]", 0.0))


def read_rows(path):
    """The rows of learning_curve.csv, as floats (epoch and samples ints)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [{k: int(v) if k in ("epoch", "samples") else float(v) for k, v in r.items()}
                for r in csv.DictReader(f)]


def write_rows(rows, path):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(sorted(rows, key=lambda r: r["epoch"]))
    wlcnn.atomic_write(path, write)


def run_config(info):
    """The Config and the model a run's ``run.json`` describes (its preset applied)."""
    config = wlcnn.config_from_dict(info["config"])
    return config, wlcnn.build_model(config, info["variant"], info["conv"])


def ks93_val_loss(data_dir, info, config, fwhm_arcmin):
    """The loss (eq. 11) of KS93 on the run's validation subfields: KS93 smoothed by
    ``fwhm_arcmin`` and cut to the Output layer's filter (``wlcnn.truncated_ks93``), the
    map a network of Table 1 can hold, and that of a zero map.  NaN if the subfields drawn
    again are not the run's."""
    x, y = wlcnn.fixed_subfields(data_dir, "val", info["preset"]["n_val"], 0,
                                 wlcnn.VARIANTS[info["variant"]]["channels"], config)
    if wlcnn.validation_sha256((x, y)) != info["val_sha256"]:
        return float("nan"), float("nan")
    pred = wlcnn.truncated_ks93(x, config.filter_size, fwhm_arcmin, config).astype(np.float32)
    loss = wlcnn.make_loss(config, info["variant"])
    return float(loss(y, pred)), float(loss(y, np.zeros_like(y)))


# ## Evaluate
def score(clusters, method, config):
    """The §3 metrics of ``method(grid)`` over the clusters, on the pixels it covers
    (``wlcnn.evaluate_methods``)."""
    return wlcnn.table2(wlcnn.evaluate_methods(clusters, {"m": method}, config,
                                               progress=False))[0]


def figure(rows, history, per_epoch, ks93, path, fwhm):
    """Five panels against samples seen: validation loss (every epoch) and the four metrics
    (every snapshot)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(16, 3.4), layout="constrained")
    axes = fig.subplots(1, len(METRICS))
    x = np.array([r["samples"] for r in rows])
    epochs = sorted(history)
    axes[0].plot([e * per_epoch for e in epochs], [history[e]["val_loss"] for e in epochs],
                 "-", color="C0", lw=1)
    if np.isfinite(ks93.get("zero_val_loss", np.nan)):
        axes[0].axhline(ks93["zero_val_loss"], ls="-.", color="0.4", label="κ = 0")
    for ax, (key, label, ideal) in zip(axes, METRICS):
        ax.plot(x, [r[key] for r in rows], "o-", color="C0", label="CNN")
        if np.isfinite(ks93.get(key, np.nan)):
            ax.axhline(ks93[key], ls="--", color="C3", label=f"KS93 ({fwhm:g}′)")
        if ideal is not None:
            ax.axhline(ideal, ls=":", color="0.5")
        ax.set_xlabel("samples seen")
        ax.set_xlim(left=0)
        ax.set_title(label)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    wlcnn.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))


def main(argv=None):
    """Score every snapshot of a run; returns the exit status."""
    args = build_parser().parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    info = json.loads((run / "run.json").read_text())
    snapshots = sorted(run.glob("snapshot-*.weights.h5"))
    if not snapshots:
        print(f"learning_curve: error: {run} has no snapshot-*.weights.h5 "
              "(train.py --snapshot-every N)", file=sys.stderr)
        return 2
    try:  # before the long work
        importlib.import_module("matplotlib.figure")
    except ImportError:
        print('learning_curve: error: the figure needs matplotlib: pip install -e ".[plot]"',
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    config, model = run_config(info)
    per_epoch = info["preset"]["steps_per_epoch"] * info["preset"]["batch_size"]
    history = {r["epoch"] + 1: r for r in wlcnn.read_history(run / "history.csv")}

    # ## Data: the validation clusters, read once
    ds = wlcnn.ClusterDataset(args.data)
    clusters = list(itertools.islice(ds.clusters("val"), args.n_clusters))
    region = wlcnn.mosaic_coverage(config, args.stride) > 0
    ref_path = out / "ks93_reference.json"
    key = {"n_clusters": len(clusters), "stride": args.stride, "val_sha256": info["val_sha256"]}
    ref = json.loads(ref_path.read_text()) if ref_path.exists() else {}
    if {k: ref.get(k) for k in key} != key:
        fwhm, _ = wlcnn.choose_ks93_smoothing(clusters, config=config, mask=region)
        ks93 = score(clusters, lambda g: np.where(
            region, wlcnn.ks93_mosaic(g, config, fwhm), np.nan), config)
        val_loss, zero_loss = ks93_val_loss(args.data, info, config, fwhm)
        ref = dict(key, fwhm_arcmin=fwhm, val_loss=val_loss, zero_val_loss=zero_loss,
                   **{k: ks93[k] for k in METRIC_KEYS})
        wlcnn.atomic_write(ref_path, lambda tmp: Path(tmp).write_text(json.dumps(ref, indent=1)))
    fwhm, ks93 = ref["fwhm_arcmin"], ref

    # ## Evaluate each snapshot not yet scored
    path = out / "learning_curve.csv"
    rows = read_rows(path)
    done = {r["epoch"] for r in rows}
    for snap in snapshots:
        epoch = int(snap.name[9:13])
        if epoch in done or epoch not in history:
            continue
        model.load_weights(snap)
        m = score(clusters, wlcnn.cnn_method([model], config, stride=args.stride,
                                             orientations=1), config)
        rows.append({"epoch": epoch, "samples": epoch * per_epoch,
                     "val_loss": history[epoch]["val_loss"], "loss": history[epoch]["loss"],
                     **{k: m[k] for k in METRIC_KEYS}})
        write_rows(rows, path)  # after each snapshot: an interruption loses none
        print(f"epoch {epoch}: {epoch * per_epoch:,} samples, val_loss "
              f"{history[epoch]['val_loss']:.4g}, R {m['R']:.3f}, D {m['D']:.2f}, "
              f"M {m['M_ratio']:.3f}, Δ_peak {m['dpeak']:.2f}", flush=True)
    rows = read_rows(path)
    figure(rows, history, per_epoch, ks93, out / "learning_curve.png", fwhm)
    for name in ("history.csv", "run.json"):
        shutil.copyfile(run / name, out / name)
    if info.get("status") == "complete":
        wlcnn.atomic_write(out / "paper_focalloss.keras",
                           lambda tmp: shutil.copyfile(run / "best.keras", tmp))
    summary = {"ks93": ks93, "curve": rows}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
