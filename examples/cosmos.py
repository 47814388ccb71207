"""COSMOS: the HST/ACS shape catalogue as mass maps, S/N maps, peaks, and the X-ray groups.

Title: the whole COSMOS field with the CNN and KS93
Description: 413,467 HST shapes over 1.64 deg² (Schrabback et al. 2010) → tiled mass maps
(KAPPA_CNN, KAPPA_KS93) and their S/N from randomly rotated shapes → κ stacked at the X-ray
groups of Finoguenov et al. (2007) against random positions, and the peaks matched to the groups.

The field (~82′ a side) is wider than the network's 32′ input, so it is tiled
(``skies.field_geometry``: 36 overlapping tiles); the data are
in examples/data/cosmos/ (README there: source, licence, citation).  The shape
weights are relative (median 1), so they are rescaled to ⟨w (e1² + e2²)/2⟩ = 1
before anything else: w is then 1/σ² per component, as the gridding needs.

    python examples/cosmos.py --quick    # the central 26′, one tile: 20 s on 2 cores
    python examples/cosmos.py            # the whole field, 64 tiles: 5 min on 2 cores
    python examples/cosmos.py --from-maps out/cosmos/cosmos_maps.fits   # redo peaks and stacks

Outputs in ``--out`` (default out/cosmos): cosmos_maps.fits (KAPPA_CNN, KAPPA_KS93,
SNR_CNN, SNR_KS93, DENSITY, FOOTPRINT; one celestial WCS), peaks_cnn.ecsv and
peaks_ks93.ecsv (S/N >= 3), completeness.ecsv and cosmos.png (S/N maps with the
groups, like the COSMOS map of Massey et al. 2007).  The last line printed is a
JSON object: stack S/N, completeness and purity per method and threshold.

Result of the default run (shipped KS93-start model, stride 36, 4 CNN and 16 KS93
noise realisations; 337 s on 2 cores beside a background job): 60 of the 72 groups
lie in the footprint, 46 of them at 0.1 < z < 0.9.  Stacked κ at those 46 against random
sets of 46 positions: S/N 10.8 for the CNN (κ −0.0011 against −0.0165 ± 0.0014) and 8.0 for
KS93 (0.0429 against −0.0001 ± 0.0054); CNN − KS93 +2.8 ± 1.1 (bootstrap over the groups).
Peaks within 2′ of a group (chance level 0.14):

    method  S/N >= 3       S/N >= 4       S/N >= 5      (completeness / purity, n peaks)
    CNN     0.57 / 0.31 127   0.48 / 0.41 76   0.37 / 0.43 51
    KS93    0.50 / 0.42  83   0.07 / 0.50  4   0.00 / —     0

The CNN's S/N is not Gaussian (the network's reply to noise has a heavy positive
tail), so its thresholds are not KS93's: at about the same purity (0.41-0.42) the CNN
finds 0.48 of the groups (S/N >= 4) and KS93 0.50 (S/N >= 3).

``--quick`` checks that the chain runs; it measures nothing.  The central 26′
(one tile, 3 CNN noise realisations) holds 7 groups at 0.1 < z < 0.9, and a
stack of 7 scatters: its S/N came out KS93 2.58 against CNN 1.82, the reverse
of the whole field's, but the difference, −0.75, has a bootstrap scatter over
the 7 groups of 0.74 (the CNN higher in 15 % of resamplings): not significant.
Completeness on 7 groups moves in steps of 0.14.  The JSON's
``stack_snr_bootstrap`` and ``note`` say this for any run; the whole field
(46 groups) is the measurement.
"""
# ## Setup
import argparse
import json
import os
import pathlib
import sys
import time
import warnings

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description="COSMOS mass maps, S/N, peaks and X-ray groups")
    p.add_argument("--models", default=None,
                   help="run directory or .keras file(s) (default: examples/ks93_start_run)")
    p.add_argument("--out", type=cli.output_dir, default="out/cosmos",
                   help="output directory, created with its parents if missing")
    p.add_argument("--quick", action="store_true",
                   help="the central 26′ (one tile), fewer realisations")
    p.add_argument("--size", type=float, default=None,
                   help="field side, arcmin (default: all of it)")
    p.add_argument("--cnn-noise", type=int, default=None,
                   help="CNN noise realisations (default 4; quick 3)")
    p.add_argument("--ks93-noise", type=int, default=None,
                   help="KS93 noise realisations (default 16)")
    p.add_argument("--stride", type=int, default=None,
                   help="mosaic stride, input pixels (default 36)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-maps", default=None,
                   help="a previous run's cosmos_maps.fits: redo only the peaks, stacks and figure")
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import numpy as np  # noqa: E402  (after the command line: see above)
from astropy.io import fits  # noqa: E402
from astropy.table import Table  # noqa: E402

import skies  # noqa: E402
import wlcnn  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
DATA_DIR = HERE / "data" / "cosmos"
CATALOG = DATA_DIR / "cosmos_shapes.fits.gz"
GROUPS = DATA_DIR / "xray.txt"
MODEL_DIR = HERE / "ks93_start_run"

#: Groups stacked and counted for completeness: lensing by sources at z ~ 1
#: is weak for groups nearer than 0.1 and beyond 0.9.
Z_RANGE = (0.1, 0.9)
THRESHOLDS = (3.0, 4.0, 5.0)
#: Peak-group matching radius: about r500 of a 10¹⁴ M☉ group at z = 0.4
#: (0.6 Mpc = 1.8′), and 3 to 4 times a peak's positional scatter at 0.75′ smoothing.
MATCH_RADIUS_ARCMIN = 2.0
#: Footprint: pixels whose source density is at least this fraction of the
#: median, eroded by EDGE_ARCMIN (KS93 and the CNN are biased within ~1′ of an edge).
DENSITY_FRACTION = 0.5
EDGE_ARCMIN = 1.0
#: σ (arcmin) of the smoothing of the noise mean and variance maps: the noise
#: varies with the source density, on scales of masks (≳ 1′), and a handful
#: of CNN realisations give a per-pixel σ good to only ~30 %.
NOISE_SMOOTH_ARCMIN = 2.0
#: Mosaic stride (input pixels) of each tile: 36 gives 16 subfields per tile
#: (one batch) covering the same 26′ as the quick default 12 (100 subfields).
STRIDE = 36
#: A peak is the highest pixel within ±1′ (a square box): the CNN's blobs
#: have pixel-scale texture, and one structure should count once.
PEAK_SEPARATION_ARCMIN = 1.0
RANDOM_SETS = 2000
#: Bootstrap resamplings of the stacked groups (:func:`stack_bootstrap`): the
#: scatter of an S/N difference to ~2 % (1/sqrt(2 × 1000)), in milliseconds.
BOOTSTRAP_SETS = 1000


# ## Data
def read_groups(path=GROUPS):
    """The X-ray groups: Table of id, ra, dec (deg), z (columns 1, 2, 3, 7 of the file)."""
    rows = np.loadtxt(path, comments="#", ndmin=2)
    if rows.shape[1] < 7:
        raise ValueError(f"{path}: {rows.shape[1]} columns, need at least 7 (ID, RA, Dec, …, z)")
    t = Table({"id": rows[:, 0].astype(int), "ra": rows[:, 1], "dec": rows[:, 2], "z": rows[:, 6]})
    t["ra"].unit = t["dec"].unit = "deg"
    return t


def rescale_sigma(e1, e2, sigma):
    """σ of relative weights rescaled so that ⟨w (e1² + e2²)/2⟩ = 1 (w = 1/σ²).

    Notes
    -----
    A relative weight w' = 1/σ'² is proportional to the inverse variance;
    the factor s making s w' the inverse variance per component satisfies
    ⟨s w' (e1² + e2²)/2⟩ = 1 when the scatter of ε is all noise (shear is
    ≲ 1 % of it).  σ = σ' / sqrt(s).
    """
    w = 1.0 / np.asarray(sigma, np.float64) ** 2
    s = 1.0 / np.mean(w * (np.asarray(e1) ** 2 + np.asarray(e2) ** 2) / 2.0)
    return np.asarray(sigma, np.float64) / np.sqrt(s), float(s)


def load_field(catalog=CATALOG, size_arcmin=None, config=wlcnn.PAPER, stride=STRIDE):
    """The catalogue on the tangent plane, cut to a square field; the field's geometry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", skies.CatalogWarning)  # the 3,650 |e| >= 1 rows (README)
        sky = skies.read_catalog(catalog)
    center = skies.catalog_center(sky.ra, sky.dec)
    x, y, e1, e2 = skies.project_catalog(sky, center)
    if size_arcmin is None:
        size_arcmin = 2.0 * np.max(np.maximum(np.abs(x), np.abs(y))) / 60.0
    geometry = skies.field_geometry(size_arcmin, config, stride)
    half = geometry.npix / 2 * geometry.pixel_arcsec
    inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    sigma, scale = rescale_sigma(e1[inside], e2[inside], sky.sigma[inside])
    src = (x[inside], y[inside], e1[inside], e2[inside], sigma)
    return src, geometry, center, scale


def footprint_map(density, geometry):
    """Pixels with data: smoothed density >= DENSITY_FRACTION × median, eroded by EDGE_ARCMIN."""
    import scipy.ndimage
    # An 11.5″ pixel holds ~2.6 sources at 70 arcmin⁻²: smooth over 0.5′ (σ)
    # before the cut, or Poisson gaps riddle the footprint.
    smooth = scipy.ndimage.gaussian_filter(density, 30.0 / geometry.pixel_arcsec, mode="constant")
    good = smooth >= DENSITY_FRACTION * np.median(smooth[smooth > 0])
    r = int(round(EDGE_ARCMIN * 60.0 / geometry.pixel_arcsec))
    disk = np.hypot(*np.mgrid[-r:r + 1, -r:r + 1]) <= r
    return scipy.ndimage.binary_erosion(good, disk, border_value=0)


# ## Model
def mass_maps(src, geometry, models, n_cnn, n_ks93, seed, progress=True):
    """KAPPA_CNN, KAPPA_KS93 and their Significance (skies section 3) from rotated-shape noise."""
    x, y, e1, e2, sigma = src
    rng = np.random.default_rng(seed)
    smooth = NOISE_SMOOTH_ARCMIN * 60.0 / geometry.pixel_arcsec
    out = {}
    for name, fn, n in (("ks93", skies.ks93_map_fn(x, y, sigma, geometry), n_ks93),
                        ("cnn", skies.cnn_map_fn(x, y, sigma, models, geometry, rng), n_cnn)):
        t0 = time.time()
        kappa = fn(e1, e2)
        noise = skies.noise_maps(fn, e1, e2, n, rng, progress=progress)
        out[name] = (kappa, skies.significance_map(kappa, noise, smooth))
        print(f"{name}: map and {n} noise realisations in {time.time() - t0:.0f} s",
              file=sys.stderr)
    return out


# ## Evaluate
class FullTable(Table):
    """A Table that prints whole, floats to 3 decimals: ``print(table)`` never cuts
    columns or rows to ``...`` (astropy's ``str`` fits the terminal); the values
    themselves, and what ``write`` stores, keep full precision."""

    def __str__(self):
        shown = Table(self, copy=True)
        for name in shown.colnames:
            if shown[name].dtype.kind == "f":
                shown[name].info.format = ".1f" if name == "threshold" else ".3f"
        return "\n".join(shown.pformat(max_lines=-1, max_width=-1))


def stack_bootstrap(stacks, rng, n_sets=BOOTSTRAP_SETS):
    """Scatter of the stacked S/N difference CNN − KS93 over the groups, by bootstrap.

    ``stacks``: {method: :class:`skies.Stack`} of the same groups (their
    ``values``, κ at each group, in the same order).  The groups
    are resampled with replacement, the same draw for both methods (their maps
    share the shapes), and each stack's S/N recomputed against its random sets,
    (mean κ − random mean) / random σ.  Returns a dict: ``difference`` (CNN −
    KS93 of the data), ``std`` (its bootstrap standard deviation),
    ``cnn_higher`` (fraction of resamplings with the CNN's S/N above KS93's).
    """
    v = {k: np.asarray(stacks[k].values, np.float64) for k in ("cnn", "ks93")}
    idx = rng.integers(0, v["cnn"].size, (int(n_sets), v["cnn"].size))
    snr = {k: (v[k][idx].mean(axis=1) - stacks[k].random_mean) / stacks[k].random_std
           for k in v}
    diff = snr["cnn"] - snr["ks93"]
    return {"difference": round(float(stacks["cnn"].snr - stacks["ks93"].snr), 2),
            "std": round(float(diff.std(ddof=1)), 2),
            "cnn_higher": round(float(np.mean(diff > 0)), 3)}


def stack_note(result):
    """What the stacked S/N of ``result`` (:func:`evaluate`) can and cannot show, one line."""
    b, n = result["stack_snr_bootstrap"], result["groups"]["in_z_range"]
    d, s = b["difference"], b["std"]
    verdict = ("not significant at 2 sigma"
               if abs(d) < 2 * s else "significant at 2 sigma")
    return (f"{n} groups stacked: S/N CNN - KS93 = {d:+.2f} +- {s:.2f} (bootstrap over the "
            f"groups; CNN higher in {100 * b['cnn_higher']:.0f} % of resamplings), {verdict}")


def evaluate(maps, wcs, footprint, groups, seed):
    """Stacks at the groups in Z_RANGE, peaks, and completeness / purity per method."""
    inside = skies.objects_inside(groups["ra"], groups["dec"], wcs, footprint, outside="skip",
                                  what="X-ray groups")
    in_z = inside & (groups["z"] > Z_RANGE[0]) & (groups["z"] < Z_RANGE[1])
    result = {"groups": {"total": len(groups), "in_footprint": int(inside.sum()),
                         "in_z_range": int(in_z.sum())},
              "stack_snr": {}, "stack_kappa": {}, "completeness": {}, "purity": {}}
    peaks, tables, stacks = {}, [], {}
    pixel_arcmin = wcs.proj_plane_pixel_scales()[0].to_value("arcmin")
    box = 2 * int(round(PEAK_SEPARATION_ARCMIN / pixel_arcmin)) + 1
    for name, (kappa, sig) in maps.items():
        rng = np.random.default_rng([seed, sorted(maps).index(name)])  # one stream per method
        st = skies.stack_snr(kappa, wcs, groups["ra"][in_z], groups["dec"][in_z], footprint, rng,
                             RANDOM_SETS)
        stacks[name] = st
        result["stack_snr"][name] = round(st.snr, 2)
        values = (st.kappa, st.random_mean, st.random_std)
        result["stack_kappa"][name] = [round(v, 5) for v in values]
        peaks[name] = skies.find_peaks(sig.snr, kappa, wcs, min(THRESHOLDS), footprint, size=box)
        # Completeness against the groups lensing can see; purity against every
        # group in the footprint (a peak on a z = 0.05 group is no false peak).
        comp = skies.completeness_purity(peaks[name], groups["ra"][in_z], groups["dec"][in_z],
                                         MATCH_RADIUS_ARCMIN, THRESHOLDS)
        pur = skies.completeness_purity(peaks[name], groups["ra"][inside], groups["dec"][inside],
                                        MATCH_RADIUS_ARCMIN, THRESHOLDS)
        comp["n_true"], comp["purity"] = pur["n_true"], pur["purity"]
        comp["method"] = name
        tables.append(comp)
        result["completeness"][name] = {f"{t:g}": round(float(c), 3) for t, c in
                                        zip(THRESHOLDS, comp["completeness"])}
        result["purity"][name] = {f"{t:g}": (round(float(p), 3) if np.isfinite(p) else None)
                                  for t, p in zip(THRESHOLDS, comp["purity"])}  # no peaks: null
    # Purity a random peak would reach: the footprint's fraction within the radius of a group.
    area = footprint.sum() * (wcs.proj_plane_pixel_scales()[0].to_value("arcmin")) ** 2
    chance = inside.sum() * np.pi * MATCH_RADIUS_ARCMIN**2 / area
    result["chance_purity"] = round(min(1.0, chance), 3)
    if set(stacks) == {"cnn", "ks93"}:
        result["stack_snr_bootstrap"] = stack_bootstrap(stacks, np.random.default_rng([seed, 2]))
        result["note"] = stack_note(result)
    from astropy.table import vstack
    return result, peaks, FullTable(vstack(tables))


def write_maps(path, maps, density, footprint, wcs, header_cards):
    """One FITS file: KAPPA_CNN, KAPPA_KS93, SNR_CNN, SNR_KS93, DENSITY, FOOTPRINT; atomic."""
    hdus = [fits.PrimaryHDU()]
    for key, value in header_cards.items():
        hdus[0].header[key] = value
    images = [("KAPPA_CNN", maps["cnn"][0], "convergence, CNN (mean of runs)"),
              ("KAPPA_KS93", maps["ks93"][0], "convergence, Kaiser & Squires 1993, smoothed"),
              ("SNR_CNN", maps["cnn"][1].snr, "(kappa - noise mean) / noise std, rotated shapes"),
              ("SNR_KS93", maps["ks93"][1].snr, "(kappa - noise mean) / noise std, rotated shapes"),
              ("DENSITY", density, "sources per arcmin2"),
              ("FOOTPRINT", footprint.astype(np.uint8), "1: pixel used for peaks and stacks")]
    for name, data, comment in images:
        h = wcs.to_header()
        h["COMMENT"] = comment
        dtype = np.uint8 if data.dtype == np.uint8 else np.float32
        hdus.append(fits.ImageHDU(np.asarray(data, dtype),
                                  header=h, name=name))
    wlcnn.atomic_write(path, lambda tmp: fits.HDUList(hdus).writeto(tmp))


def figure(path, maps, wcs, footprint, groups, peaks):
    """S/N maps of KS93 and the CNN with the X-ray groups and the S/N >= 4 peaks."""
    from matplotlib.figure import Figure  # optional dependency, imported only for the figure
    fig = Figure(figsize=(12, 5.6), layout="constrained")
    in_z = (groups["z"] > Z_RANGE[0]) & (groups["z"] < Z_RANGE[1])
    for i, name in enumerate(("ks93", "cnn")):
        ax = fig.add_subplot(1, 2, i + 1, projection=wcs)
        snr = np.where(footprint, maps[name][1].snr, np.nan)
        im = ax.imshow(snr, origin="lower", cmap=skies.MAP_CMAP, vmin=-3, vmax=6)
        ax.contour(np.nan_to_num(snr), levels=[3, 4, 5], colors="w", linewidths=0.5)
        tr = ax.get_transform("world")
        for sel, colour, label in ((in_z, "cyan", f"X-ray groups {Z_RANGE[0]} < z < {Z_RANGE[1]}"),
                                   (~in_z, "grey", "other X-ray groups")):
            ax.scatter(groups["ra"][sel], groups["dec"][sel], transform=tr, s=60, facecolors="none",
                       edgecolors=colour, label=label)
        p = peaks[name][peaks[name]["snr"] >= 4]
        ax.scatter(p["ra"], p["dec"], transform=tr, marker="+", c="lime", s=40,
                   label="peaks S/N ≥ 4")
        ax.set_xlim(-0.5, snr.shape[1] - 0.5)  # the map, not the groups beyond it
        ax.set_ylim(-0.5, snr.shape[0] - 0.5)
        ax.set_title(f"{'KS93' if name == 'ks93' else 'CNN'}: S/N")
        ax.coords[0].set_axislabel("RA")
        ax.coords[1].set_axislabel("Dec")
        fig.colorbar(im, ax=ax, shrink=0.8, label="S/N")
        if i == 0:
            ax.legend(loc="lower left", fontsize=7)
    fig.suptitle("COSMOS (Schrabback et al. 2010 shapes), X-ray groups of Finoguenov et al. (2007)")
    wlcnn.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def read_maps(path):
    """The maps of a previous run's cosmos_maps.fits: (maps, density, footprint, wcs, header)."""
    from astropy.wcs import WCS
    with fits.open(path) as h:
        maps = {n: (h[f"KAPPA_{n.upper()}"].data.astype(np.float64),
                    skies.Significance(h[f"SNR_{n.upper()}"].data.astype(np.float64), None, None))
                for n in ("cnn", "ks93")}
        return (maps, h["DENSITY"].data.astype(np.float64), h["FOOTPRINT"].data.astype(bool),
                WCS(h["KAPPA_CNN"].header), dict(h[0].header))


def main(argv=None):
    """Run the COSMOS analysis; the last line printed is the JSON result."""
    args = build_parser().parse_args(argv)
    args.models = str(MODEL_DIR) if args.models is None else args.models
    args.stride = STRIDE if args.stride is None else args.stride
    t0 = time.time()
    size = args.size if args.size is not None else (26.0 if args.quick else None)
    n_cnn = args.cnn_noise or (3 if args.quick else 4)
    n_ks93 = args.ks93_noise or 16
    out = pathlib.Path(args.out)
    try:
        groups = read_groups(GROUPS)
        if args.from_maps:
            maps, density, footprint, wcs, header = read_maps(args.from_maps)
            n_cnn, n_ks93 = header.get("NCNNNOIS"), header.get("NKSNOIS")
        else:
            models, config, _ = skies.check_models(args.models)
            src, geometry, center, scale = load_field(CATALOG, size, config, args.stride)
    except (ValueError, OSError, KeyError) as exc:
        print(f"cosmos: error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if not args.from_maps:
        print(f"COSMOS: {len(src[0])} sources in {geometry.side_arcmin:.1f}′ about "
              f"RA {center[0]:.4f}°, Dec {center[1]:.4f}° ({geometry.n_tiles} tiles); "
              f"weights × {scale:.2f}", file=sys.stderr)
        maps = mass_maps(src, geometry, models, n_cnn, n_ks93, args.seed)
        wcs = skies.map_wcs(center, geometry)
        density = wlcnn.block_mean(skies.grid_field(*src, geometry)[3], config.pool)
        footprint = footprint_map(density, geometry)
        write_maps(os.fspath(out / "cosmos_maps.fits"), maps, density, footprint, wcs,
                   {"NSOURCE": len(src[0]), "WSCALE": (scale, "weights multiplied by this"),
                    "NCNNNOIS": n_cnn, "NKSNOIS": n_ks93,
                    "NSMOOTH": (NOISE_SMOOTH_ARCMIN, "[arcmin] noise smoothing"),
                    "STRIDE": geometry.stride, "NRUNS": len(models)})
    result, peaks, table = evaluate(maps, wcs, footprint, groups, args.seed)
    for name, t in peaks.items():
        skies.write_peaks(t, out / f"peaks_{name}.ecsv", overwrite=True)
    table.write(out / "completeness.ecsv", overwrite=True)
    try:
        figure(os.fspath(out / "cosmos.png"), maps, wcs, footprint, groups, peaks)
    except ImportError:
        print("cosmos: matplotlib missing, no figure", file=sys.stderr)
    print(table, file=sys.stderr)
    if "note" in result:
        print(f"cosmos: {result['note']}; the whole field (no --quick) is the measurement"
              if args.quick else f"cosmos: {result['note']}", file=sys.stderr)
    side = footprint.shape[0] * wcs.proj_plane_pixel_scales()[0].to_value("arcmin")
    result.update(match_radius_arcmin=MATCH_RADIUS_ARCMIN,
                  noise_realisations={"cnn": n_cnn, "ks93": n_ks93},
                  field_arcmin=round(float(side), 2), seconds=round(time.time() - t0))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
