"""Screening training recipes at a fixed budget: the §3 metrics with bootstrap errors,
in distribution and on skies our simulator did not make.

    python examples/screen_recipes.py --data data/paper --out examples/screening \
        --candidate b=runs/screen_b/run_00@25 --candidate d=runs/screen_d/run_00@25 \
        --candidate quick=examples/quick_model/quick_focalloss.keras

A candidate is ``NAME=RUN_DIR@EPOCH`` (the run's ``snapshot-EPOCH.weights.h5``, its
history and settings from run.json), ``NAME=MODEL.keras``, ``NAME=ks93-start`` (the
KS93 start of ``train.py --init ks93`` before any training: KS93 smoothed by 1′ and cut
to the Output layer's 49 × 49 filter, what the network can hold), ``NAME=ks93:FWHM``
(full-field KS93 smoothed by FWHM arcmin: beside ``ks93-start`` it measures what the
cut costs) or ``NAME=mean:A+B`` (the mean of earlier candidates A and B's mosaics: an
ensemble, §2.3.2's mean of runs, each model predicted once).  Each one reconstructs

* the first ``--n-clusters`` validation clusters of ``--data`` (in distribution), and
* ``--n-clusters`` fields of the **off-simulator sky** (:data:`OFF_SIMULATOR`): the
  training simulator with another concentration-mass relation, halos truncated at
  2.5 r200 instead of r200, rounder halos, more mergers and a more Gaussian
  large-scale field.  No model is trained on it; it asks whether a recipe learned
  clusters or learned our simulator.

Mosaics have stride ``--stride`` and one orientation; KS93 is smoothed at the FWHM the
validation clusters choose (``wlcnn.choose_ks93_smoothing``), the same FWHM on both skies.
Errors are bootstrap standard deviations over clusters (``--n-boot`` resamplings), and a
difference between two methods is bootstrapped on the same resampled clusters (paired),
so that it is judged against its own error, not the sum of two.  Writes screening.md and
screening.json (one row a method and sky); the last line printed is that JSON.  2 CPU cores: ~2.5 min a candidate a sky at 100 clusters, stride 18.
"""
# ## Setup
import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import sys
from pathlib import Path

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset of the runs (its val split is scored)")
    p.add_argument("--candidate", action="append", required=True, metavar="NAME=PATH",
                   help="NAME=RUN_DIR@EPOCH, NAME=MODEL.keras, NAME=ks93-start, NAME=ks93:FWHM "
                        "or NAME=mean:A+B (earlier candidates); repeat for each")
    p.add_argument("--out", type=cli.output_dir, required=True,
                   help="directory of the tables, created with its parents if missing")
    p.add_argument("--n-clusters", type=int, default=100, help="clusters of each sky")
    p.add_argument("--stride", type=int, default=18, help="mosaic offset step (paper: 3)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamplings")
    p.add_argument("--seed", type=int, default=0, help="off-simulator skies and bootstrap")
    p.add_argument("--cache", default=None,
                   help="directory keeping each candidate's mosaics (keyed by its NAME=PATH and "
                        "the stride): a rerun with more candidates predicts only the new ones")
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import numpy as np  # noqa: E402  (after the command line: see above)

import skies  # noqa: E402
import wlcnn  # noqa: E402

#: The off-simulator sky: every change moves the truth away from what the training skies
#: hold, within what clusters do.
OFF_SIMULATOR = dataclasses.replace(
    skies.SIMULATOR,
    # c(M) of Dutton & Macciò (2014, MNRAS 441, 3359) at z = 0.5 is ~30 % above
    # Duffy et al. (2008) at cluster masses, with a slightly steeper slope
    duffy_a=1.3 * skies.SIMULATOR.duffy_a, duffy_b=-0.088,
    # mass beyond r200 (the outskirts of a BMO-like profile).  With the c(M) above, the
    # truth M_cl (§3.3) of the same seeds' fields is 16 % higher (median of 12)
    truncation_r200=2.5,
    ellipticity_mean=0.30,   # rounder than Oguri et al. (2010)'s 0.46
    merger_fraction=0.5,     # more disturbed systems
    # twice the log-normal shift of Hilbert et al. (2011) at z_s = 1.5 (0.054): a more
    # Gaussian large-scale field of the same power
    kappa0=0.11,
)
METRICS = wlcnn.BOOTSTRAP_SCORES
KS93_START = "ks93-start"
MEAN = "mean:"
KS93_AT = "ks93:"


def parse_candidate(text):
    """``NAME=RUN_DIR@EPOCH``, ``NAME=MODEL.keras``, ``NAME=ks93-start``, ``NAME=ks93:FWHM``
    or ``NAME=mean:A+B`` → (name, path, "ks93-start", "ks93:" or the tuple of names A, B;
    epoch, FWHM or None)."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise ValueError(f"--candidate {text!r}: expected NAME=RUN_DIR@EPOCH, NAME=MODEL.keras, "
                         "NAME=ks93-start, NAME=ks93:FWHM or NAME=mean:A+B")
    if spec == KS93_START:
        return name, KS93_START, None
    if spec.startswith(KS93_AT):
        try:
            fwhm = float(spec[len(KS93_AT):])
        except ValueError:
            fwhm = -1.0
        if not fwhm >= 0:
            raise ValueError(f"--candidate {text!r}: ks93: needs a FWHM in arcmin >= 0")
        return name, KS93_AT, fwhm
    if spec.startswith(MEAN):
        parts = tuple(spec[len(MEAN):].split("+"))
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"--candidate {text!r}: mean: needs two or more names, A+B")
        return name, parts, None
    path, _, epoch = spec.partition("@")
    if path.endswith(".keras"):
        if epoch:
            raise ValueError(f"--candidate {text!r}: a .keras model takes no @EPOCH")
        return name, Path(path), None
    if not epoch.isdigit():
        raise ValueError(f"--candidate {text!r}: a run directory needs @EPOCH (a snapshot)")
    return name, Path(path), int(epoch)


def load_candidate(path, epoch, data_dir):
    """The model of a candidate and what its run says of it: samples seen, training time
    (s, the sum of history.csv's epoch_s) and the eq. 11-12 validation loss at ``epoch``."""
    if path == KS93_START:  # as train.py --init ks93 sets it, from training inputs
        model = wlcnn.build_model(wlcnn.PAPER, "FocalLoss")
        start = wlcnn.KS93Start()
        x, _ = wlcnn.fixed_subfields(data_dir, "train", start.n_init)
        wlcnn.initialize_as_ks93(model, x, start)
        return model, {"recipe": f"KS93 start ({start.fwhm_arcmin:g}′, 49 × 49), untrained",
                       "samples": 0, "train_s": 0, "val_loss": None}
    if epoch is None:
        model = wlcnn.load_model(path, compile=False)
        return model, {"recipe": str(path), "samples": None, "train_s": None, "val_loss": None}
    info = json.loads((path / "run.json").read_text())
    snap = path / f"snapshot-{epoch:04d}.weights.h5"
    if not snap.exists():
        raise ValueError(f"{snap} does not exist (train.py --snapshot-every N)")
    model = wlcnn.build_model(wlcnn.config_from_dict(info["config"]), info["variant"],
                              info["conv"])
    model.load_weights(snap)
    history = [r for r in wlcnn.read_history(path / "history.csv") if r["epoch"] < epoch]
    # the FocalMass variant's val_loss holds its mass term: eq. 12 alone is val_focal_loss
    key = "val_focal_loss" if "val_focal_loss" in history[-1] else "val_loss"
    pre = info["preset"]
    return model, {"recipe": f"{info['variant']}, init {pre['init']}, batch "
                             f"{pre['batch_size']}, lr {pre['learning_rate']:g}",
                   "samples": epoch * pre["steps_per_epoch"] * pre["batch_size"],
                   "train_s": round(sum(r["epoch_s"] for r in history)),
                   "val_loss": float(history[-1][key]), "val_sha256": info["val_sha256"]}


# ## Data: validation clusters and the off-simulator sky
def off_simulator_clusters(n, seed, config=wlcnn.PAPER):
    """``n`` cluster records of :data:`OFF_SIMULATOR`, each drawn from its own seed."""
    out = []
    for i in range(n):
        rng = wlcnn.cluster_rng(seed, "test", i)
        field = skies.simulate_cluster_field(config, rng, OFF_SIMULATOR)
        out.append(dict(wlcnn.make_cluster(field, config, rng), index=i))
    return out


# ## Evaluate
def ks93_in(grid, region, config, fwhm):
    """KS93 smoothed by ``fwhm`` arcmin, NaN outside the CNN mosaic's ``region``."""
    return np.where(region, wlcnn.ks93_mosaic(grid, config, fwhm), np.nan)


def mean_method(fns):
    """The ensemble of methods that each return K runs' mosaics (K, n, n): all their runs
    stacked, which :func:`wlcnn.evaluate_methods` averages."""
    def run(grid):
        outs = [np.asarray(f(grid), dtype=np.float64) for f in fns]
        return np.concatenate([o.reshape((-1,) + o.shape[-2:]) for o in outs])
    return run


def bootstrap(results, n_boot, rng, references):
    """Each method's scores with bootstrap errors (``wlcnn.bootstrap_scores``), and its paired
    differences from each of ``references`` (method names) with errors:
    ``row["diff"][ref][metric] = (value, err)``."""
    scores = wlcnn.bootstrap_scores(results, n_boot, rng)
    rows = []
    for name, v in scores.items():
        row = {"method": name, "diff": {}}
        for k in METRICS:  # draw 0 is the clusters themselves, the rest resamplings
            row[k], row[k + "_err"] = float(v[k][0]), float(np.nanstd(v[k][1:], ddof=1))
        for ref in references:
            d = {k: v[k] - scores[ref][k] for k in METRICS}
            row["diff"][ref] = {k: (float(d[k][0]), float(np.nanstd(d[k][1:], ddof=1)))
                                for k in METRICS}
        rows.append(row)
    return rows


def markdown(rows, info, fwhm, n, references):
    """The screening tables: recipe, samples, CPU time, validation loss and the metrics
    (± bootstrap errors) on each sky; then the paired differences from each reference."""
    head = "| " + " | ".join(("R", "D", "M_pred/M_truth", "Δ_peak px", "cat10", "M_low")) + " |"
    lines = [f"KS93 smoothed by {fwhm:g}′ (chosen on the validation clusters); {n} clusters "
             "a sky; ± one bootstrap standard deviation over clusters. "
             "cat10: fraction of Δ_peak > 10 px; M_low: M ratio of the lightest fifth.", "",
             "| sky | method | recipe | samples | train s | val loss (eq. 12) " + head,
             "|" + "---|" * 12]
    for r in rows:
        i = info.get(r["method"], {})
        cells = [f"{r[k]:.3f} ± {r[k + '_err']:.3f}" for k in METRICS]
        vl = i.get("val_loss")
        samples, train_s = (i.get(k) for k in ("samples", "train_s"))
        lines.append(f"| {r['sky']} | {r['method']} | {i.get('recipe', '')} | "
                     f"{'' if samples is None else f'{samples:,}'} | "
                     f"{'' if train_s is None else train_s} | "
                     f"{'' if vl is None else f'{vl:.5f}'} | " + " | ".join(cells) + " |")
    for ref in references:
        lines += ["", f"Paired differences, method − {ref} (same resampled clusters):", "",
                  "| sky | method " + head, "|" + "---|" * 8]
        for r in rows:
            if r["method"] != ref:
                lines.append(f"| {r['sky']} | {r['method']} | " + " | ".join(
                    f"{v:+.3f} ± {e:.3f}" for v, e in r["diff"][ref].values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Score every candidate beside KS93 on both skies; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        cands = [parse_candidate(t) for t in args.candidate]
    except ValueError as e:
        print(f"screen_recipes: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = wlcnn.PAPER
    models, info, means = {}, {}, {}
    for name, path, epoch in cands:
        if path == KS93_AT:
            info[name] = {"recipe": f"KS93 ({epoch:g}′), full field", "samples": None,
                          "train_s": None, "val_loss": None}
        elif isinstance(path, tuple):
            missing = [p for p in path if p not in info]
            if missing:
                print(f"screen_recipes: error: --candidate {name}: {missing} are not earlier "
                      "candidates", file=sys.stderr)
                return 2
            means[name] = path
            info[name] = {"recipe": "mean of " + ", ".join(path)} | {
                k: sum(info[p][k] for p in path) if all(info[p].get(k) is not None
                                                        for p in path) else None
                for k in ("samples", "train_s")} | {"val_loss": None}
        else:
            models[name], info[name] = load_candidate(path, epoch, args.data)
    shas = {i["val_sha256"] for i in info.values() if "val_sha256" in i}
    if len(shas) > 1:  # val losses on other subfields are not comparable
        print("screen_recipes: warning: the runs' validation subfields differ", file=sys.stderr)

    val = list(itertools.islice(wlcnn.ClusterDataset(args.data).clusters("val"), args.n_clusters))
    skies_ = {"validation": val, "off-simulator": off_simulator_clusters(
        args.n_clusters, args.seed, config)}
    region = wlcnn.mosaic_coverage(config, args.stride) > 0
    fwhm, _ = wlcnn.choose_ks93_smoothing(val, config=config, mask=region)
    methods = {f"KS93 ({fwhm:g}′)": functools.partial(ks93_in, region=region, config=config,
                                                      fwhm=fwhm)}
    for text, (name, path, fwhm_c) in zip(args.candidate, cands):
        if path == KS93_AT:
            methods[name] = functools.partial(ks93_in, region=region, config=config,
                                              fwhm=fwhm_c)
            continue
        if name in means:
            methods[name] = mean_method([methods[p] for p in means[name]])
            continue
        methods[name] = wlcnn.cnn_method([models[name]], config, stride=args.stride,
                                         orientations=1)
        if args.cache:
            key = hashlib.sha256(f"{text}|stride {args.stride}".encode()).hexdigest()[:16]
            methods[name] = wlcnn.cached_method(methods[name], Path(args.cache) / key)
    # paired differences from KS93 and from the first candidate
    references = list(methods)[:2]
    rows = []
    for sky, clusters in skies_.items():
        results = wlcnn.evaluate_methods(clusters, methods, config, progress=True)
        rng = np.random.default_rng(args.seed)
        for row in bootstrap(results, args.n_boot, rng, references):
            rows.append(dict(row, sky=sky))
            print(sky, row["method"], " ".join(f"{k} {row[k]:.3f}±{row[k + '_err']:.3f}"
                                               for k in METRICS), flush=True)
    table = markdown(rows, info, fwhm, args.n_clusters, references)
    wlcnn.atomic_write(out / "screening.md", lambda tmp: Path(tmp).write_text(table))
    summary = {"ks93_fwhm_arcmin": fwhm, "n_clusters": args.n_clusters, "stride": args.stride,
               "n_boot": args.n_boot, "candidates": info, "rows": rows}
    wlcnn.atomic_write(out / "screening.json",
                       lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    print(table)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
