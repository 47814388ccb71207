"""Demo: one simulated cluster reconstructed by KS93 and by the shipped CNN.

    python examples/demo.py            # writes out/demo.png in ~20 s on 2 CPU cores

It simulates one 32′ × 32′ cluster field like the test set of the shipped model (a truncated
NFW cluster with line-of-sight halos and large-scale structure), its catalog of 25 sources per
arcmin² with shape noise (σ_e = 0.24) and measurement noise, and grids it with the 7″ Gaussian
(§2.3.2).  It reconstructs the mass map twice: KS93 smoothed by 1.25′ (the FWHM the validation
set chose for this source density) and the CNN of `examples/ks93_start_run` (the shipped model
that scores best on Table 2; the quick mosaic, 100 subfields in one orientation).  Both are scored against the
truth on the CNN's pixels with the paper's four metrics: R (§3.2, 1 is perfect), D (§3.2, 0),
M_pred/M_truth within 1.92′ of the truth's peak (§3.3, 1) and Δ_peak, the distance between
the peak centroids in 0.192′ pixels (§3.4, 0).  It draws truth, KS93 and CNN side by side and
prints a table and a JSON line.  On the default field (seed 0, a 4.4 × 10¹⁴ M☉ cluster):

    method      R      D  M_pred/M_truth  Δ_peak [pix]
    KS93    0.621   1.80           0.951         53.98
    CNN     0.624   1.44           1.036         53.96

The CNN recovers the shape (D) better, R alike and the mass within 4 %, KS93's within 5 %.
Δ_peak is 54 pixels for both: each map's highest peak is a compact halo 10′ from the
cluster that holds the truth's highest pixel, the kind of field behind the long upper tail of
Δ_peak in Table 2 of the README.
"""
# ## Setup
import argparse
import json
import os
import sys
import time
from pathlib import Path

import cli  # the command-line conventions; no TensorFlow

#: Where the figure goes without --out; its directory is made.
DEFAULT_OUT = "out/demo.png"


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description="one simulated cluster: truth, KS93 and the CNN")
    p.add_argument("--seed", type=int, default=0, help="seed of the field and its catalog")
    p.add_argument("--out", default=None,
                   help=f"figure file, in an existing directory (default {DEFAULT_OUT})")
    p.add_argument("--no-figure", action="store_true", help="skip the figure (no matplotlib)")
    p.add_argument("--stride", type=int, default=None,
                   help="mosaic stride in input pixels (default 12; 3: the paper's 1,444 "
                        "subfields)")
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


def parse_args(argv=None):
    """The command line, with ``--out``'s directory checked before any work."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.out is not None and not args.no_figure:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            p.error(f"--out: directory {out_dir} does not exist")
    return args


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import numpy as np  # noqa: E402  (after the command line: see above)

import skies  # noqa: E402
import wlcnn  # noqa: E402

CONFIG = wlcnn.PAPER
#: The shipped model, found from this file so that the demo runs from any directory.
MODEL_DIR = Path(__file__).resolve().parent / "ks93_start_run"
#: KS93 smoothing FWHM chosen on the validation set for 25 sources/arcmin² (README, Table 2).
KS93_FWHM_ARCMIN = 1.25
#: The quick mosaic: subfields every 12 input pixels (10 × 10), one orientation.
STRIDE = 12


# ## Data
def simulate_grid(seed, config=CONFIG):
    """A simulated cluster field (truth κ, γ; ``main``: the cluster), its gridded source
    catalog (4, npix, npix) (:func:`wlcnn.grid_table`) and its number of sources."""
    rng = np.random.default_rng(seed)
    field = skies.simulate_cluster_field(config, rng)
    catalog = wlcnn.simulate_catalog(field["kappa"], field["gamma1"], field["gamma2"],
                                     config, rng)
    return field, wlcnn.grid_table(catalog, config), len(catalog)


# ## Model
def reconstruct(grid, models, config=CONFIG, stride=STRIDE):
    """``{"KS93": map, "CNN": map}`` of a gridded catalog on the mosaic's 0.192′ pixels,
    both NaN where the CNN's mosaic has no subfield, so that they are scored alike."""
    cnn = wlcnn.predict_mosaic_runs(models, grid, config, stride=stride, orientations=1).mean
    ks93 = wlcnn.ks93_mosaic(grid, config, fwhm_arcmin=KS93_FWHM_ARCMIN)
    return {"KS93": np.where(np.isfinite(cnn), ks93, np.nan), "CNN": cnn}


# ## Evaluate
def score(truth, estimate):
    """The paper's four metrics of a mosaic map against the truth, NaN pixels left out:
    ``R`` (1 is perfect), ``D`` (0), ``M_ratio`` (1) and ``dpeak`` (0, in pixels)."""
    return {"R": wlcnn.metric_R(truth, estimate).value,
            "D": wlcnn.metric_D(truth, estimate).value,
            "M_ratio": wlcnn.mass_ratio(truth, estimate).value,
            "dpeak": wlcnn.centroid_offset(truth, estimate).value}


def _title(name, s):
    return f"{name}\nR {s['R']:.2f}  D {s['D']:.2f}  M {s['M_ratio']:.2f}  Δ {s['dpeak']:.1f} px"


def draw(truth, maps, scores, path, config=CONFIG):
    """Truth and each map side by side on one colour scale, metrics in the titles (PNG)."""
    from matplotlib.figure import Figure  # optional dependency, needed for the figure only

    # Mosaic pixel J spans input pixels [3J + 1, 3J + 4) of the field's 3.84″ grid.
    lo = (config.first_kernel - 1) // 2 * config.pixel_arcsec / 60.0
    hi = lo + config.mosaic_npix * config.pool * config.pixel_arcsec / 60.0
    vmin, vmax = np.nanpercentile(truth, [0.5, 99.9])
    panels = [("truth", truth)] + [(_title(name, scores[name]), m) for name, m in maps.items()]
    fig = Figure(figsize=(4.2 * len(panels) + 1, 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (label, image) in zip(axes, panels):
        im = ax.imshow(image, origin="lower", extent=[lo, hi, lo, hi], cmap="magma",
                       vmin=vmin, vmax=vmax)
        ax.set(title=label, xlabel="x [arcmin]")
    axes[0].set_ylabel("y [arcmin]")
    fig.colorbar(im, ax=axes, shrink=0.85, label="κ")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main(argv=None):
    """Run the demo; returns the exit status."""
    args = parse_args(argv)
    out = DEFAULT_OUT if args.out is None else args.out
    stride = STRIDE if args.stride is None else args.stride
    start = time.time()

    field, grid, n_sources = simulate_grid(args.seed)
    main_halo = field["main"]
    print(f"cluster M200 = {main_halo['m200_msun']:.3g} M☉ at z = {main_halo['z']}; "
          f"{n_sources} sources")
    maps = reconstruct(grid, wlcnn.load_runs(MODEL_DIR), stride=stride)
    truth = wlcnn.mosaic_truth(field["kappa"], CONFIG)
    truth = np.where(np.isfinite(maps["CNN"]), truth, np.nan)
    scores = {name: score(truth, m) for name, m in maps.items()}

    print(f"{'method':<6} {'R':>6} {'D':>6} {'M_pred/M_truth':>15} {'Δ_peak [pix]':>13}")
    for name, s in scores.items():
        print(f"{name:<6} {s['R']:6.3f} {s['D']:6.2f} {s['M_ratio']:15.3f} {s['dpeak']:13.2f}")
    if not args.no_figure:
        draw(truth, maps, scores, out)
        print(f"wrote {out}")
    print(json.dumps({"seed": args.seed, "m200_msun": main_halo["m200_msun"],
                      "n_sources": n_sources, "ks93_fwhm_arcmin": KS93_FWHM_ARCMIN,
                      "stride": stride, **scores, "seconds": round(time.time() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
