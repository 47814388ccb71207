"""Wide field: halo detection completeness against mass, CNN vs KS93, on a simulated survey patch.

Title: cluster finding in a simulated 2° × 2° survey field
Description: the training simulator's sky (halos from the mass function down to 3 × 10¹³ M☉
plus the log-normal large-scale field, sources at its z_s = 1.5) over a wide field at
33 sources/arcmin² → tiled KAPPA_CNN and KAPPA_KS93 → S/N from rotated shapes → peaks →
completeness per M200 bin and purity, for each method.

A survey finds clusters as peaks of the S/N map.  The truth here is every
halo of the simulation; a halo is detected when a peak at or above the S/N
threshold lies within MATCH_RADIUS_ARCMIN of it, a peak is true when a halo
of at least PURITY_MIN_M200 lies that close.  The methods are compared at
the same purity: each at the lowest S/N threshold whose purity reaches
``--purity`` (default 0.5; ``reached`` in the result says whether it was).

    python examples/wide_field.py --size 60    # 1° × 1°, a check
    python examples/wide_field.py              # 2° × 2°, 144 tiles: 7 min on 2 cores

Outputs in ``--out`` (default out/wide_field): wide_field.ecsv (completeness per mass
bin and purity, each method, at each threshold) and wide_field.png; the last line
printed is a JSON object: threshold, purity and completeness per mass bin per method
at the common purity.

Result of the default run (seed 0, shipped KS93-start model, stride 36; KS93 smoothed
1.25′; 468 s on 2 cores): 476,098 sources, 203 target halos (0.05 < z < 1, ≥ 2′ from
the edge).  At purity 0.5 (chance level 0.08), completeness per M200 bin:

    M200 [M☉]          5e13-1e14  1e14-2e14  2e14-5e14  5e14-1e15   (halos 128 / 62 / 12 / 1)
    CNN  (S/N >= 6.25)    0.28       0.50       1.00       1.00      purity 0.50
    KS93 (S/N >= 3.25)    0.25       0.45       0.92       1.00      purity 0.51

The CNN finds at least as many halos as KS93 in every bin, but by 4, 3 and 1 halos: within
the binomial scatter of 128 and 62 halos (±0.04, ±0.06).  Its S/N has a heavy positive
tail (549 peaks at S/N >= 2.5 against KS93's 316), so at equal purity its threshold is high.
(The quick model of examples/quick_model: 0.23 / 0.39 / 1.00 / 1.00 at purity 0.51.)
"""
# ## Setup
import argparse
import dataclasses
import json
import pathlib
import sys
import time

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description="halo completeness vs mass and purity, CNN vs KS93")
    p.add_argument("--models", default=None,
                   help="run directory or .keras file(s) (default: examples/ks93_start_run)")
    p.add_argument("--out", type=cli.output_dir, default="out/wide_field",
                   help="output directory, created with its parents if missing")
    p.add_argument("--size", type=float, default=120.0, help="field side, arcmin (>= 120 for 2°)")
    p.add_argument("--purity", type=float, default=0.5, help="the common purity of the comparison")
    p.add_argument("--ks93-fwhm", type=float, default=None,
                   help="KS93 smoothing, arcmin (default 1.25)")
    p.add_argument("--cnn-noise", type=int, default=2, help="CNN noise realisations")
    p.add_argument("--ks93-noise", type=int, default=8, help="KS93 noise realisations")
    p.add_argument("--stride", type=int, default=None,
                   help="mosaic stride, input pixels (default 36)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import numpy as np  # noqa: E402  (after the command line: see above)
from astropy.table import Table  # noqa: E402

import skies  # noqa: E402
import wlcnn  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
MODEL_DIR = HERE / "ks93_start_run"
CENTER = (30.0, 0.0)           # an arbitrary field centre, degrees
DENSITY = 33.0                 # sources per arcmin²
#: M200c bin edges of the completeness, M☉.
MASS_EDGES = (5e13, 1e14, 2e14, 5e14, 1e15)
#: Halos counted for completeness: sources at z_s = 1.5 see little of a halo beyond z = 1.
Z_RANGE = (0.05, 1.0)
#: A peak is true if a halo this heavy (any z) lies within the radius.  There
#: are ~100 such halos per deg², so a peak placed at random is "true" with
#: probability ~0.09 at 1′ (``chance_purity`` in the result): 3 × 10¹³ M☉,
#: ~260 per deg², and 1.5′ would make half of all random peaks true.
PURITY_MIN_M200 = 5e13
MATCH_RADIUS_ARCMIN = 1.0
THRESHOLDS = tuple(np.round(np.arange(2.5, 7.01, 0.25), 2))
EDGE_ARCMIN = 2.0             # peaks and halos this close to the field's edge are left out
STRIDE = 36
PEAK_SEPARATION_ARCMIN = 1.0  # a peak is the highest pixel within ±1′, as examples/cosmos.py
#: KS93 smoothing for ground-based densities (skies.KS93_MAP_FWHM_ARCMIN's note).
KS93_FWHM_ARCMIN = 1.25
#: The noise of a simulated field is homogeneous (uniform sources): its
#: mean and variance maps are smoothed over 5′ (σ) to a near-global value.
NOISE_SMOOTH_ARCMIN = 5.0


# ## Data
def simulate_sky(size_arcmin, rng, model_config):
    """Truth κ, γ on the simulator's 3.84″ grid, its halos, and a 33 arcmin⁻² catalogue.

    Returns
    -------
    field : dict
        From ``skies.simulate_cluster_field(cluster=False)``.
    src : tuple of numpy.ndarray
        (x, y, e1, e2, sigma), x and y in arcsec from the field centre (x West).
    """
    npix = int(round(size_arcmin * 60.0 / model_config.pixel_arcsec))
    cfg = dataclasses.replace(model_config, field_arcmin=npix * model_config.pixel_arcsec / 60.0,
                              npix=npix, source_density_arcmin2=DENSITY)
    field = skies.simulate_cluster_field(cfg, rng, cluster=False)
    cat = wlcnn.simulate_catalog(field["kappa"], field["gamma1"], field["gamma2"], cfg, rng)
    half = cfg.field_arcmin * 30.0
    src = (np.asarray(cat["x"]) - half, np.asarray(cat["y"]) - half, np.asarray(cat["e1"]),
           np.asarray(cat["e2"]), np.asarray(cat["sigma"]))
    return field, src, half


def halo_table(field, half):
    """The simulation's halos on the sky (ra, dec in deg), with M200 and z."""
    h = field["field_halos"]
    x, y = h["x_arcsec"] - half, h["y_arcsec"] - half
    ra, dec = skies.tangent_plane_wcs(CENTER).pixel_to_world_values(x, y)
    return Table({"ra": ra, "dec": dec, "m200": h["m200_msun"], "z": h["z"], "x": x, "y": y})


# ## Evaluate
def detection_tables(peaks, halos, half):
    """Completeness per mass bin and purity at every threshold, one method."""
    inner = half - EDGE_ARCMIN * 60.0
    inside = (np.abs(halos["x"]) < inner) & (np.abs(halos["y"]) < inner)
    target = halos[inside & (halos["z"] > Z_RANGE[0]) & (halos["z"] < Z_RANGE[1])
                   & (halos["m200"] >= MASS_EDGES[0])]
    real = halos[halos["m200"] >= PURITY_MIN_M200]
    rows = []
    for t in THRESHOLDS:
        sel = peaks[np.asarray(peaks["snr"]) >= t]
        true, _ = skies.match_peaks(sel, real["ra"], real["dec"], MATCH_RADIUS_ARCMIN)
        _, found = skies.match_peaks(sel, target["ra"], target["dec"], MATCH_RADIUS_ARCMIN)
        row = {"threshold": float(t), "n_peaks": len(sel),
               "purity": float(true.mean()) if len(sel) else np.nan}
        for lo, hi in zip(MASS_EDGES[:-1], MASS_EDGES[1:]):
            b = (target["m200"] >= lo) & (target["m200"] < hi)
            row[f"n_{lo:.0e}"] = int(b.sum())
            row[f"c_{lo:.0e}"] = float(found[b].mean()) if b.any() else np.nan
        rows.append(row)
    return Table(rows=rows)


def at_purity(table, purity, min_peaks=5):
    """The row of the lowest threshold whose purity reaches ``purity``, and whether one does.

    A threshold with fewer than ``min_peaks`` peaks measures no purity; when
    no threshold reaches ``purity`` the row of the highest purity is returned.
    """
    p = np.where(np.asarray(table["n_peaks"]) >= min_peaks, np.asarray(table["purity"]), np.nan)
    ok = np.flatnonzero(np.nan_to_num(p, nan=-1.0) >= purity)
    if ok.size:
        return table[int(ok[0])], True
    return table[int(np.nanargmax(p))], False


def figure(path, tables, rows):
    """Completeness against M200 at the common purity, and purity against threshold."""
    from matplotlib.figure import Figure  # optional dependency, imported only for the figure
    from matplotlib.ticker import NullFormatter
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    mid = np.sqrt(np.array(MASS_EDGES[:-1]) * np.array(MASS_EDGES[1:]))
    for name, colour in (("cnn", "C3"), ("ks93", "C0")):
        r = rows[name]
        c = [r[f"c_{lo:.0e}"] for lo in MASS_EDGES[:-1]]
        ax1.plot(mid, c, "o-", color=colour,
                 label=f"{name.upper()} (S/N ≥ {r['threshold']:g}, purity {r['purity']:.2f})")
        ax2.plot(tables[name]["threshold"], tables[name]["purity"], "o-", color=colour,
                 label=name.upper())
    ax1.set_xscale("log")
    ax1.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of 2-5e14 overlap
    ax1.set_xlabel("M200c [M☉]")
    ax1.set_ylabel("completeness")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("S/N threshold")
    ax2.set_ylabel("purity")
    ax2.legend(fontsize=8)
    wlcnn.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def main(argv=None):
    """Simulate, reconstruct, detect; the last line printed is the JSON result."""
    args = build_parser().parse_args(argv)
    args.models = str(MODEL_DIR) if args.models is None else args.models
    args.stride = STRIDE if args.stride is None else args.stride
    args.ks93_fwhm = KS93_FWHM_ARCMIN if args.ks93_fwhm is None else args.ks93_fwhm
    t0 = time.time()
    try:
        models, config, _ = skies.check_models(args.models)
    except (ValueError, OSError) as exc:
        print(f"wide_field: error: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    field, src, half = simulate_sky(args.size, rng, config)
    halos = halo_table(field, half)
    halos.write(out / "halos.ecsv", overwrite=True)
    geometry = skies.field_geometry(2 * half / 60.0, config, args.stride)
    print(f"wide field: {2 * half / 60:.1f}′, {len(src[0])} sources, {len(halos)} halos, "
          f"{geometry.n_tiles} tiles ({time.time() - t0:.0f} s)", file=sys.stderr)
    wcs = skies.map_wcs(CENTER, geometry)
    x, y, e1, e2, sigma = src
    smooth = NOISE_SMOOTH_ARCMIN * 60.0 / geometry.pixel_arcsec
    edge = int(round(EDGE_ARCMIN * 60.0 / geometry.pixel_arcsec))
    footprint = np.zeros((geometry.npix, geometry.npix), dtype=bool)
    footprint[edge:-edge, edge:-edge] = True
    tables, rows, reached = {}, {}, {}
    methods = (("ks93", skies.ks93_map_fn(x, y, sigma, geometry, args.ks93_fwhm), args.ks93_noise),
               ("cnn", skies.cnn_map_fn(x, y, sigma, models, geometry, rng), args.cnn_noise))
    for name, fn, n in methods:
        t1 = time.time()
        kappa = fn(e1, e2)
        noise = skies.noise_maps(fn, e1, e2, n, rng, progress=True)
        sig = skies.significance_map(kappa, noise, smooth)
        box = 2 * int(round(PEAK_SEPARATION_ARCMIN * 60.0 / geometry.pixel_arcsec)) + 1
        peaks = skies.find_peaks(sig.snr, kappa, wcs, min(THRESHOLDS), footprint, size=box)
        skies.write_peaks(peaks, out / f"peaks_{name}.ecsv", overwrite=True)
        tables[name] = detection_tables(peaks, halos, half)
        rows[name], reached[name] = at_purity(tables[name], args.purity)
        print(f"{name}: {time.time() - t1:.0f} s, {len(peaks)} peaks at S/N >= {min(THRESHOLDS)}",
              file=sys.stderr)

    from astropy.table import vstack
    for name, t in tables.items():
        t["method"] = name
    table = vstack(list(tables.values()))
    table.write(out / "wide_field.ecsv", overwrite=True)
    try:
        figure(str(out / "wide_field.png"), tables, rows)
    except ImportError:
        print("wide_field: matplotlib missing, no figure", file=sys.stderr)

    def clean(v):
        return None if not np.isfinite(v) else round(float(v), 3)
    lows = MASS_EDGES[:-1]
    bins = [f"{lo:.0e}-{hi:.0e}" for lo, hi in zip(lows, MASS_EDGES[1:])]
    # Halos were drawn over the simulator's torus, twice the field's side.
    torus_arcmin2 = (2 * 2 * half / 60.0) ** 2
    n_real = np.sum(halos["m200"] >= PURITY_MIN_M200)
    chance = n_real * np.pi * MATCH_RADIUS_ARCMIN**2 / torus_arcmin2
    result = {"purity_target": args.purity, "reached": reached,
              "threshold": {k: float(r["threshold"]) for k, r in rows.items()},
              "purity": {k: clean(r["purity"]) for k, r in rows.items()},
              "completeness": {k: dict(zip(bins, (clean(r[f"c_{lo:.0e}"]) for lo in lows)))
                               for k, r in rows.items()},
              "halos_per_bin": dict(zip(bins, (int(rows["cnn"][f"n_{lo:.0e}"]) for lo in lows))),
              "chance_purity": round(chance, 3),
              "field_arcmin": round(2 * half / 60.0, 2), "seconds": round(time.time() - t0)}
    print(table, file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
