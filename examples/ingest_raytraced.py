"""Training clusters cut from ray-traced convergence maps (MassiveNuS).

The paper trains on clusters found by SExtractor in the 3.5° ray-traced κ maps of MassiveNuS
(Liu et al. 2018, columbialensing.org), 32′ around each (§2.3.1).  This script finds each map's
peaks, computes γ on the whole map, cuts each cluster's field onto the 500² grid and writes it
with its source catalog as a dataset for `examples/train.py`:

    python examples/ingest_raytraced.py Maps15/WLconv_z1.50_*.fits \\
        --out data/massivenus --n-val 1800 --n-test 200 --seed 1

A map file holds the κ image (square, finite, ≥ 32′ a side) in its primary HDU (`--hdu`) and
the side in degrees under the header keyword `ANGLE` (`--angle-key`): the MassiveNuS layout
(`Maps15/WLconv_z1.50_0001r.fits`) that LensTools's `ConvergenceMap.load` reads.  Take the
maps of the training's source redshift (`Maps15`, z_s = 1.5); the header does not say it.

Time: a synthetic 3.5° map of 512² pixels with 79 peaks above 4σ is searched in 0.07 s and its
79 clusters are written in 63 s (24 s of CPU) on 2 busy CPU cores: 0.3 s of CPU a cluster.
"""
# ## Setup
import argparse
import functools
import os
import sys

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description="cut the clusters of ray-traced κ maps "
                                "into a training dataset (§2.3.1)")
    p.add_argument("maps", nargs="+", help="FITS κ maps (image + side in degrees in the header)")
    p.add_argument("--out", type=cli.output_dir, required=True,
                   help="dataset directory, created with its parents if missing")
    p.add_argument("--n-val", type=int, required=True, help="validation clusters")
    p.add_argument("--n-test", type=int, required=True, help="test clusters")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--masks", action="store_true", help="bright-star masks (§3.5)")
    p.add_argument("--workers", type=int, default=1, help="processes making shards")
    p.add_argument("--shard-size", type=int, default=25, help="clusters per shard file")
    p.add_argument("--angle-key", default=None,
                   help="header keyword of the map's side in degrees (default: MassiveNuS's, "
                        "ANGLE)")
    p.add_argument("--hdu", type=int, default=0, help="HDU holding the image")
    p.add_argument("--smooth-arcmin", type=float, default=1.0,
                   help="FWHM of the detection smoothing, arcmin")
    p.add_argument("--threshold-sigma", type=float, default=4.0,
                   help="detection threshold, in robust σ of the smoothed map")
    p.add_argument("--min-separation-arcmin", type=float, default=4.0,
                   help="closest distance of two clusters")
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import numpy as np  # noqa: E402  (after the command line: see above)
import scipy.ndimage  # noqa: E402
import scipy.special  # noqa: E402
from astropy.io import fits  # noqa: E402

from skies import write_dataset  # noqa: E402
from wlcnn import (FWHM_PER_SIGMA, PAPER, check_map, check_positive,  # noqa: E402
                   shear_from_kappa)

#: Header keyword of a map's side in degrees, as MassiveNuS and LensTools write it.
MASSIVENUS_ANGLE_KEY = "ANGLE"

#: σ of a Gaussian in units of its median absolute deviation, 1/Φ⁻¹(3/4) = 1.4826.
MAD_TO_SIGMA = 1.0 / scipy.special.ndtri(0.75)


# ## Data: read a map
def read_convergence_map(path, angle_key=MASSIVENUS_ANGLE_KEY, hdu=0,
                         min_side_arcmin=PAPER.field_arcmin):
    """Read a square ray-traced convergence map and its side from FITS.

    Returns
    -------
    kappa : numpy.ndarray, float64, shape (n, n)
        Convergence [y, x], FITS pixel (1, 1) at [0, 0].
    side_deg : float
        Side of the map in degrees (the header's ``angle_key``).
    """
    # A ray-traced map has no sky orientation (no WCS): its array axes are the field's (x, y)
    # and γ is computed from κ in that frame, so no sign convention comes with the map.
    name = os.fspath(path)
    try:
        hdul = fits.open(name, memmap=False)
    except FileNotFoundError:
        raise
    except OSError as err:  # astropy's answer to a file that is not FITS
        raise ValueError(f"{name}: not a readable FITS file ({err})") from err
    with hdul:
        try:
            unit = hdul[hdu]
        except (IndexError, KeyError) as err:
            raise ValueError(f"{name}: no HDU {hdu!r} (the file has {len(hdul)} HDUs)") from err
        if unit.data is None:
            raise ValueError(f"{name}: HDU {hdu!r} holds no image data")
        data = np.asarray(unit.data)
        if data.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D image, got a {data.ndim}-D array "
                             f"of shape {data.shape}")
        if data.shape[0] != data.shape[1]:
            raise ValueError(f"{name}: the map is not square: shape {data.shape} [y, x]; "
                             f"one side in '{angle_key}' needs a square map")
        if angle_key not in unit.header:
            raise ValueError(f"{name}: the header of HDU {hdu!r} has no {angle_key!r} key "
                             "(the map's side in degrees, the MassiveNuS layout); "
                             "name the key that holds it with angle_key=")
        value = unit.header[angle_key]
        # A copy in native byte order (FITS is big-endian), detached from the file.
        kappa = np.array(data, dtype=np.float64)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: header {angle_key} = {value!r} is not a number "
                         "(the map's side in degrees)")
    side_deg = float(value)
    if not (np.isfinite(side_deg) and side_deg > 0):
        raise ValueError(f"{name}: header {angle_key} = {side_deg} deg: the map's side "
                         "must be positive and finite")
    bad = ~np.isfinite(kappa)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: {int(bad.sum())} of {kappa.size} pixels are NaN or inf "
                         f"(the first at [y, x] = {first}); a ray-traced κ map has no "
                         "masked pixels -- fill or crop them before ingesting")
    if side_deg * 60.0 < min_side_arcmin:
        raise ValueError(f"{name}: the map is too small: {side_deg * 60.0:.4g}′ on a side "
                         f"({angle_key} = {side_deg:g} deg), smaller than one "
                         f"{min_side_arcmin:g}′ cluster field (§2.3.1)")
    return kappa, side_deg


# ## Data: find the clusters
def find_clusters(kappa, pixel_arcmin, smooth_fwhm_arcmin=1.0, threshold_sigma=4.0,
                  threshold_kappa=None, min_separation_arcmin=4.0,
                  border_arcmin=PAPER.field_arcmin / 2, max_clusters=None,
                  return_details=False):
    """Cluster positions in a convergence map: the role SExtractor plays in §2.3.1.

    Parameters
    ----------
    smooth_fwhm_arcmin : float
        Gaussian smoothing before detection (SExtractor's detection filter); 0: none.
    threshold_sigma, threshold_kappa : float
        A peak exceeds the smoothed map's median by ``threshold_sigma`` × 1.4826 MAD, or,
        if ``threshold_kappa`` is given, the smoothed κ exceeds it.
    min_separation_arcmin, border_arcmin : float
        Least distance between kept peaks (4′: twice the 1.92′ M_cl aperture) and from
        each edge (half a field, so that the field fits).

    Returns
    -------
    peaks_yx_pix : numpy.ndarray of int, shape (n_clusters, 2)
        Map indices (y, x), highest peak first (ties: lower y, then x).
    details : dict
        If ``return_details``: ``smoothed_kappa``, ``background_kappa``, ``sigma_kappa``,
        ``threshold_kappa``, ``peak_kappa_smoothed``, ``peak_significance`` (in σ).

    Notes
    -----
    The paper gives no SExtractor settings; this is its operation at its simplest: smooth,
    keep the local maxima above the threshold, deblend (highest first), drop the border.
    """
    kappa = check_map("kappa", kappa)
    pixel_arcmin = check_positive("pixel_arcmin", pixel_arcmin)
    for label, value in (("smooth_fwhm_arcmin", smooth_fwhm_arcmin),
                         ("min_separation_arcmin", min_separation_arcmin),
                         ("border_arcmin", border_arcmin)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{label} must be a finite number ≥ 0, got {value}")
    if max_clusters is not None and max_clusters < 0:
        raise ValueError(f"max_clusters must be ≥ 0 or None, got {max_clusters}")

    # 'reflect': a ray-traced map is not periodic, so its edges must not wrap.
    sigma_pix = smooth_fwhm_arcmin / FWHM_PER_SIGMA / pixel_arcmin
    smoothed = scipy.ndimage.gaussian_filter(kappa, sigma_pix, mode="reflect")
    # The median and MAD, like SExtractor's clipped background RMS, ignore the clusters
    # themselves; a σ threshold adapts to the maps' redshift, smoothing and cosmology.
    # On a map that is mostly noise it finds noise peaks: use threshold_kappa there.
    background = float(np.median(smoothed))
    sigma = float(MAD_TO_SIGMA * np.median(np.abs(smoothed - background)))
    if threshold_kappa is None:
        threshold = background + threshold_sigma * sigma
    else:
        threshold = float(threshold_kappa)
    if not np.isfinite(threshold):
        raise ValueError(f"the detection threshold must be finite, got {threshold}")

    is_max = smoothed == scipy.ndimage.maximum_filter(smoothed, size=3, mode="nearest")
    ys, xs = np.nonzero(is_max & (smoothed > threshold))
    height = smoothed[ys, xs]
    order = np.lexsort((xs, ys, -height))
    ys, xs, height = ys[order], xs[order], height[order]

    # Deblending runs before the border cut, so that the secondary peak of a cluster on the
    # border is not promoted to a cluster of its own.
    min_sep_pix = min_separation_arcmin / pixel_arcmin
    kept = np.zeros(ys.size, dtype=bool)
    for k in range(ys.size):
        dist2 = (ys[kept] - ys[k]) ** 2 + (xs[kept] - xs[k]) ** 2
        kept[k] = not np.any(dist2 < min_sep_pix**2)
    ys, xs, height = ys[kept], xs[kept], height[kept]

    inside = np.ones(ys.size, dtype=bool)
    tol = 1e-9 * pixel_arcmin  # float round-off, not a margin
    for index, n in ((ys, kappa.shape[0]), (xs, kappa.shape[1])):
        centre_arcmin = (index + 0.5) * pixel_arcmin
        inside &= centre_arcmin >= border_arcmin - tol
        inside &= n * pixel_arcmin - centre_arcmin >= border_arcmin - tol
    keep = np.flatnonzero(inside)[:max_clusters]
    ys, xs, height = ys[keep], xs[keep], height[keep]

    peaks = np.stack([ys, xs], axis=1).astype(np.intp).reshape(-1, 2)
    if not return_details:
        return peaks
    with np.errstate(divide="ignore", invalid="ignore"):  # a map without scatter (σ = 0)
        significance = (height - background) / sigma
    return peaks, {"smoothed_kappa": smoothed, "background_kappa": background,
                   "sigma_kappa": sigma, "threshold_kappa": float(threshold),
                   "peak_kappa_smoothed": height, "peak_significance": significance}


# ## Data: cut the fields
def cut_field(kappa, gamma1, gamma2, center_yx, pixel_arcmin, config=PAPER, spline_order=3):
    """Cut the 32′ cluster field centred on a map position onto the 500² grid.

    Parameters
    ----------
    kappa, gamma1, gamma2 : array_like, shape (ny, nx)
        Convergence and shear of the whole map [y, x].
    center_yx : sequence of 2 floats
        Field centre in map indices (y, x); integers are pixel centres, fractions allowed.

    Returns
    -------
    dict
        ``kappa``, ``gamma1``, ``gamma2``, float64 (npix, npix): pixel (i, j) holds the
        map at ((j + ½), (i + ½)) × ``config.pixel_arcsec`` from the field's lower-left
        corner, ``field_arcmin / 2`` below and left of the centre.
    """
    maps = {"kappa": check_map("kappa", kappa),
            "gamma1": check_map("gamma1", gamma1),
            "gamma2": check_map("gamma2", gamma2)}
    shape = maps["kappa"].shape
    for label in ("gamma1", "gamma2"):
        if maps[label].shape != shape:
            raise ValueError(f"{label} has shape {maps[label].shape}, kappa {shape}: "
                             "the maps must share one grid")
    pixel_arcmin = check_positive("pixel_arcmin", pixel_arcmin)
    center = np.asarray(center_yx, dtype=np.float64)
    if center.shape != (2,) or not np.all(np.isfinite(center)):
        raise ValueError("center_yx must be two finite map pixel indices (y, x), "
                         f"got {center_yx!r}")

    half_arcmin = config.field_arcmin / 2.0
    tol = 1e-9 * pixel_arcmin  # float round-off, not a margin
    for axis, label in ((0, "y"), (1, "x")):
        c_arcmin = (center[axis] + 0.5) * pixel_arcmin
        side_arcmin = shape[axis] * pixel_arcmin
        if c_arcmin - half_arcmin < -tol or c_arcmin + half_arcmin > side_arcmin + tol:
            raise ValueError(
                f"the {config.field_arcmin:g}′ field centred at {label} = {c_arcmin:.4g}′ "
                f"(map pixel {center[axis]:g}) leaves the map, which spans "
                f"0-{side_arcmin:.4g}′ along {label}: the centre must be ≥ {half_arcmin:g}′ "
                "from each edge (find_clusters' border_arcmin)")

    # Output pixel k lies (k + ½) q − field/2 from the centre (q the grid pixel), and map
    # index c lies at (c + ½) p from the corner, so an offset of d arcmin is d / p indices.
    offsets_pix = ((np.arange(config.npix) + 0.5) * config.pixel_arcsec / 60.0
                   - half_arcmin) / pixel_arcmin
    coords = np.meshgrid(center[0] + offsets_pix, center[1] + offsets_pix, indexing="ij")
    # The 0.41′ MassiveNuS pixel is 6.4 grid pixels: interpolate, not crop.  A cubic B-spline
    # passes through the map's values and reproduces polynomials up to cubic (the mean and the
    # gradients are kept); its response falls as sinc⁴, so it adds almost no power below the
    # map's pixel, where nearest neighbours would add steps.  The truth κ keeps the map's
    # resolution, as in the paper's training data.  'reflect' only acts between the outermost
    # pixel centres and the map edge.
    return {label: scipy.ndimage.map_coordinates(m, coords, order=spline_order,
                                                 mode="reflect", output=np.float64)
            for label, m in maps.items()}


def _as_paths(paths):
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def _map_clusters(path, config, angle_key, hdu, find_kwargs):
    """A map, its pixel side in arcmin and the ``meta`` dict of each of its clusters."""
    kappa, side_deg = read_convergence_map(path, angle_key, hdu, config.field_arcmin)
    pixel_arcmin = side_deg * 60.0 / kappa.shape[0]
    find_kwargs = {"border_arcmin": config.field_arcmin / 2.0, **find_kwargs}
    peaks, det = find_clusters(kappa, pixel_arcmin, return_details=True, **find_kwargs)
    detection = {k: det[k] for k in ("background_kappa", "sigma_kappa", "threshold_kappa")}
    metas = []
    for rank, (iy, ix) in enumerate(peaks):
        metas.append({
            "source_file": os.fspath(path), "hdu": hdu, "angle_key": angle_key, "rank": rank,
            "peak_yx_pix": (int(iy), int(ix)),
            "peak_yx_arcmin": (float((iy + 0.5) * pixel_arcmin),
                               float((ix + 0.5) * pixel_arcmin)),
            "peak_kappa": float(kappa[iy, ix]),
            "peak_kappa_smoothed": float(det["peak_kappa_smoothed"][rank]),
            "peak_significance": float(det["peak_significance"][rank]),
            "map_npix": kappa.shape[0], "map_side_deg": side_deg,
            "map_pixel_arcmin": pixel_arcmin, "detection": detection})
    return kappa, pixel_arcmin, metas


def iter_ingested_fields(paths, config=PAPER, angle_key=MASSIVENUS_ANGLE_KEY, hdu=0,
                         **find_kwargs):
    """Cluster fields of ray-traced κ maps, map by map, each map's highest cluster first.

    Parameters
    ----------
    paths : path or iterable of paths
        FITS κ maps (:func:`read_convergence_map`), in the order given (sort a glob first).
    **find_kwargs
        For :func:`find_clusters`; ``border_arcmin`` defaults to half a field.

    Yields
    ------
    dict
        ``kappa``, ``gamma1``, ``gamma2`` (:func:`cut_field`) and a JSON-ready ``meta``: file,
        HDU, rank (0: highest), peak (pixel, arcmin, κ, smoothed κ, σ), map size, detection.
    """
    for path in _as_paths(paths):
        kappa, pixel_arcmin, metas = _map_clusters(path, config, angle_key, hdu, find_kwargs)
        # γ of the whole map, then cut: a 32′ cut alone misses the shear of the mass around
        # it.  Zero padding (a ray-traced map is not periodic) puts the mean density outside;
        # the structure beyond the edge is missing, so raise border_arcmin to stay further in.
        gamma1, gamma2 = shear_from_kappa(kappa, pad=True)
        for meta in metas:
            field = cut_field(kappa, gamma1, gamma2, meta["peak_yx_pix"], pixel_arcmin, config)
            yield dict(field, meta=meta)


# ## Data: write a dataset
def ingest_plan(paths, config=PAPER, angle_key=MASSIVENUS_ANGLE_KEY, hdu=0, **find_kwargs):
    """The ``meta`` dicts of :func:`iter_ingested_fields`, without cutting the fields."""
    return [meta for path in _as_paths(paths)
            for meta in _map_clusters(path, config, angle_key, hdu, find_kwargs)[2]]


# Consecutive clusters share a map: keep the last maps and their shear.
@functools.lru_cache(maxsize=2)
def _map_and_shear(path, angle_key, hdu, min_side_arcmin):
    kappa, side_deg = read_convergence_map(path, angle_key, hdu, min_side_arcmin)
    return kappa, shear_from_kappa(kappa, pad=True), side_deg * 60.0 / kappa.shape[0]


def _planned_field(by_split, config, rng, split, index):
    """``write_dataset``'s field_fn: cluster ``index`` of ``split`` cut from its map."""
    meta = by_split[split][index]
    kappa, (gamma1, gamma2), pixel_arcmin = _map_and_shear(
        meta["source_file"], meta["angle_key"], meta["hdu"], config.field_arcmin)
    field = cut_field(kappa, gamma1, gamma2, meta["peak_yx_pix"], pixel_arcmin, config)
    return dict(field, meta=meta)


def ingest_dataset(paths, out_dir, n_val, n_test, config=PAPER, seed=0, masks=False,
                   shard_size=25, workers=1, angle_key=MASSIVENUS_ANGLE_KEY, hdu=0,
                   progress=True, **find_kwargs):
    """Write the clusters of ray-traced κ maps as a training dataset; returns its manifest.

    Parameters
    ----------
    n_val, n_test : int
        Clusters for validation and test, the last ones in map order; the rest train.
    config, seed, masks, shard_size, workers, progress
        As ``skies.write_dataset``; the seed draws the source catalogs and masks.
    angle_key, hdu, **find_kwargs
        As :func:`read_convergence_map` and :func:`find_clusters`.
    """
    paths = _as_paths(paths)
    # Contiguous splits keep the clusters of one map, which share its line-of-sight
    # structure, mostly in one split.
    plan = ingest_plan(paths, config, angle_key, hdu, **find_kwargs)
    n_val, n_test = int(n_val), int(n_test)
    if n_val < 0 or n_test < 0:
        raise ValueError("n_val and n_test must be non-negative")
    n_train = len(plan) - n_val - n_test
    if n_train < 1:
        raise ValueError(f"found {len(plan)} clusters in {len(paths)} map(s): too few for "
                         f"{n_val} validation + {n_test} test + at least one training cluster")
    by_split = {"train": plan[:n_train], "val": plan[n_train:n_train + n_val],
                "test": plan[n_train + n_val:]}
    counts = {split: len(metas) for split, metas in by_split.items()}
    return write_dataset(out_dir, counts, config, seed, functools.partial(_planned_field, by_split),
                         masks, shard_size, workers, generator="ingest", progress=progress)


# ## Command line
def main(argv=None):
    """Cut the clusters of ray-traced κ maps into a dataset; returns the exit status."""
    args = build_parser().parse_args(argv)
    args.angle_key = MASSIVENUS_ANGLE_KEY if args.angle_key is None else args.angle_key
    try:
        manifest = ingest_dataset(args.maps, args.out, args.n_val, args.n_test, PAPER,
                                  args.seed, args.masks, args.shard_size, args.workers,
                                  args.angle_key, args.hdu,
                                  smooth_fwhm_arcmin=args.smooth_arcmin,
                                  threshold_sigma=args.threshold_sigma,
                                  min_separation_arcmin=args.min_separation_arcmin)
    except (ValueError, TypeError, OSError) as exc:
        print(f"ingest_raytraced: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: complete, {manifest['counts']} clusters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
