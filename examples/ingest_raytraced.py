"""ingest_raytraced: TODO docstring."""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import astropy
import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal
import scipy.special
from astropy import constants as const
from astropy import units as u
from astropy.cosmology import FlatLambdaCDM
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

import keras
import tensorflow as tf


import wlcnn
from wlcnn import (
    FWHM_PER_SIGMA, PAPER, _check_map, _positive, shear_from_kappa, write_dataset,
)



# ---------------------------------------------------------------------------
# §2.3.1 Training data: clusters in ray-traced convergence maps (MassiveNuS)
# ---------------------------------------------------------------------------
#: Header keyword that holds a map's side in degrees.  MassiveNuS (Liu et al.
#: 2018, http://columbialensing.org) distributes each galaxy-lensing κ map as
#: one FITS file (e.g. ``Maps15/WLconv_z1.50_0001r.fits`` for z_s = 1.5) whose
#: primary HDU is the square image and whose header keyword ``ANGLE`` is the
#: side in degrees (3.5).  This is the layout LensTools reads:
#: ``lenstools.utils.defaults.load_fits_default_convergence`` (the loader
#: behind ``ConvergenceMap.load``) returns ``hdu[0].header["ANGLE"] * deg`` and
#: ``hdu[0].data`` (github.com/apetri/LensTools), and third-party MassiveNuS
#: readers do the same.
MASSIVENUS_ANGLE_KEY = "ANGLE"

#: σ of a Gaussian in units of its median absolute deviation, 1/Φ⁻¹(3/4).
MAD_TO_SIGMA = 1.0 / scipy.special.ndtri(0.75)


def read_convergence_map(path, angle_key=MASSIVENUS_ANGLE_KEY, hdu=0,
                         min_side_arcmin=PAPER.field_arcmin):
    """Read a square ray-traced convergence map and its side from FITS.

    Parameters
    ----------
    path : str or os.PathLike
        FITS file holding one κ map.
    angle_key : str
        Header keyword holding the side of the map in degrees.  The default,
        ``"ANGLE"``, is the MassiveNuS / LensTools layout (see
        ``MASSIVENUS_ANGLE_KEY``).
    hdu : int or str
        Index or name of the HDU holding the image (0, the primary HDU, for
        MassiveNuS).
    min_side_arcmin : float
        Smallest accepted side in arcmin: the map must hold at least one
        cluster field (32′, §2.3.1).

    Returns
    -------
    kappa : numpy.ndarray, float64, shape (n, n)
        Convergence, indexed [y, x].
    side_deg : float
        Side of the (square) map in degrees; its pixel is
        ``side_deg * 60 / n`` arcmin.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Naming the file and the problem: not a FITS file, no such HDU, no
        image, not 2-D, not square, no ``angle_key`` in the header, an angle
        that is not a positive finite number, NaN or infinite pixels, or a map
        smaller than ``min_side_arcmin``.

    Notes
    -----
    §2.3.1 starts from MassiveNuS κ maps of 3.5° × 3.5°.  astropy returns the
    image as ``data[NAXIS2, NAXIS1]``, i.e. [y, x] with FITS pixel (1, 1) --
    the lower-left corner in ds9 -- at [0, 0]: the convention of this module.
    A ray-traced map carries no sky orientation (no WCS), so its array axes
    are taken as the field's (x, y); γ is computed from κ in that same frame,
    so no sign convention is imported with the map.  The map should be the
    one for the sources the training assumes (z_s = 1.5, MassiveNuS's
    ``Maps15``); the header does not say, so this is not checked.
    """
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
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            raise ValueError(f"{name}: header {angle_key} = {value!r} is not a number "
                             "(the map's side in degrees)")
        side_deg = float(value)
        # A copy in native byte order (FITS is big-endian), detached from the file.
        kappa = np.array(data, dtype=np.float64)
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


def _detection_map(kappa, pixel_arcmin, smooth_fwhm_arcmin):
    """Smoothed κ, its background level (median) and robust σ (1.4826 MAD)."""
    if smooth_fwhm_arcmin > 0:
        sigma_pix = smooth_fwhm_arcmin / FWHM_PER_SIGMA / pixel_arcmin
        # 'reflect': a ray-traced map is not periodic, so never wrap its edges.
        smoothed = scipy.ndimage.gaussian_filter(kappa, sigma_pix, mode="reflect")
    else:
        smoothed = kappa.copy()
    background = float(np.median(smoothed))
    sigma = float(MAD_TO_SIGMA * np.median(np.abs(smoothed - background)))
    return smoothed, background, sigma


def find_clusters(kappa, pixel_arcmin, smooth_fwhm_arcmin=1.0, threshold_sigma=4.0,
                  threshold_kappa=None, min_separation_arcmin=4.0,
                  border_arcmin=PAPER.field_arcmin / 2, max_clusters=None,
                  return_details=False):
    """Cluster positions in a convergence map: the role SExtractor plays in §2.3.1.

    Parameters
    ----------
    kappa : array_like, shape (ny, nx)
        Convergence [y, x] (a whole ray-traced map).
    pixel_arcmin : float
        Side of a map pixel in arcmin (0.41′ for MassiveNuS: 3.5° / 512).
    smooth_fwhm_arcmin : float
        FWHM in arcmin of the Gaussian that smooths κ before detection (0: no
        smoothing).  1′ is a few map pixels: it suppresses pixel-scale noise of
        the ray tracing, as SExtractor's detection filter does, without merging
        clusters.
    threshold_sigma : float
        Detection threshold: a peak must exceed the smoothed map's background
        (its median) by ``threshold_sigma`` times its robust scatter
        σ = 1.4826 × MAD.  Used unless ``threshold_kappa`` is given.
    threshold_kappa : float, optional
        Absolute threshold on the smoothed κ instead (e.g. 0.1).
    min_separation_arcmin : float
        Two kept peaks are at least this far apart; of closer peaks only the
        highest is kept (greedy, highest first).  The default, 4′, is twice the
        1.92′ aperture of the cluster mass M_cl (§3.3), so the apertures of two
        kept clusters never overlap, and a cluster's own substructure is not
        counted as a second cluster.
    border_arcmin : float
        A kept peak is at least this far from every edge of the map.  The
        default, half the 32′ field, is what :func:`cut_field` needs for a
        field centred on the peak to lie inside the map.
    max_clusters : int, optional
        Return at most this many (the highest).
    return_details : bool
        Also return a dict with the smoothed map and the detection numbers.

    Returns
    -------
    peaks_yx_pix : numpy.ndarray of int, shape (n_clusters, 2)
        Map pixel indices (y, x) of the peaks, highest smoothed κ first (ties:
        lower y, then lower x, first).  A peak at index (i, j) lies at
        ((j + ½), (i + ½)) × ``pixel_arcmin`` from the map's lower-left corner.
    details : dict
        Only if ``return_details``: ``smoothed_kappa`` (ny, nx),
        ``background_kappa``, ``sigma_kappa``, ``threshold_kappa`` (floats),
        ``peak_kappa_smoothed`` and ``peak_significance`` (n_clusters,): the
        peaks' smoothed κ and their height above the background in σ.

    Notes
    -----
    §2.3.1: "We identified clusters by running SExtractor ... on the
    convergence field image and cropped a 32′ × 32′ region approximately
    centered on each cluster."  The paper gives no SExtractor settings; this
    is the same operation in its simplest form:

    1. smooth κ with a Gaussian (SExtractor's detection filter);
    2. keep local maxima (8 neighbours) above the threshold;
    3. among them, from the highest down, drop any peak closer than
       ``min_separation_arcmin`` to a peak already kept (deblending);
    4. then drop peaks closer than ``border_arcmin`` to an edge.

    Step 3 runs before step 4 so that a secondary peak of a cluster that sits
    on the border is not promoted to a cluster of its own.

    The threshold is in units of the map's σ by default because SExtractor's
    ``DETECT_THRESH`` is in units of the background RMS, so the selection
    adapts to the source redshift, smoothing and cosmology of the maps.  σ is
    the median absolute deviation scaled to a Gaussian σ: like SExtractor's
    κσ-clipped background RMS it is not inflated by the clusters themselves.
    The defaults (1′, 4σ, 4′) are our choice, not the paper's; raise the
    threshold (or set ``threshold_kappa``) for a purer, more massive sample.
    A σ threshold presumes a map full of structure, as a ray-traced map is:
    on a map that is mostly noise it finds noise peaks, and an absolute
    ``threshold_kappa`` is the right tool there.
    """
    kappa = _check_map("kappa", kappa)
    pixel_arcmin = _positive("pixel_arcmin", pixel_arcmin)
    for label, value in (("smooth_fwhm_arcmin", smooth_fwhm_arcmin),
                         ("min_separation_arcmin", min_separation_arcmin),
                         ("border_arcmin", border_arcmin)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{label} must be a finite number ≥ 0, got {value}")
    if max_clusters is not None and max_clusters < 0:
        raise ValueError(f"max_clusters must be ≥ 0 or None, got {max_clusters}")

    smoothed, background, sigma = _detection_map(kappa, pixel_arcmin, smooth_fwhm_arcmin)
    if threshold_kappa is None:
        threshold = background + threshold_sigma * sigma
    else:
        threshold = float(threshold_kappa)
    if not np.isfinite(threshold):
        raise ValueError(f"the detection threshold must be finite, got {threshold}")

    # Local maxima: a pixel equal to the maximum of its 3 × 3 neighbourhood.
    is_max = smoothed == scipy.ndimage.maximum_filter(smoothed, size=3, mode="nearest")
    cand_y, cand_x = np.nonzero(is_max & (smoothed > threshold))
    height = smoothed[cand_y, cand_x]
    order = np.lexsort((cand_x, cand_y, -height))     # highest first; ties by (y, x)
    cand_y, cand_x, height = cand_y[order], cand_x[order], height[order]

    # Greedy deblending, highest first.
    min_sep_pix = min_separation_arcmin / pixel_arcmin
    kept = np.zeros(cand_y.size, dtype=bool)
    for k in range(cand_y.size):
        dist2 = (cand_y[kept] - cand_y[k]) ** 2 + (cand_x[kept] - cand_x[k]) ** 2
        kept[k] = not np.any(dist2 < min_sep_pix**2)
    cand_y, cand_x, height = cand_y[kept], cand_x[kept], height[kept]

    # Border: a pixel centre lies at (index + ½) pixels from the lower-left corner.
    ny, nx = kappa.shape
    tol = 1e-9 * pixel_arcmin                        # float round-off, not a margin
    y_arcmin = (cand_y + 0.5) * pixel_arcmin
    x_arcmin = (cand_x + 0.5) * pixel_arcmin
    inside = ((y_arcmin >= border_arcmin - tol) & (ny * pixel_arcmin - y_arcmin >= border_arcmin - tol)
              & (x_arcmin >= border_arcmin - tol) & (nx * pixel_arcmin - x_arcmin >= border_arcmin - tol))
    cand_y, cand_x, height = cand_y[inside], cand_x[inside], height[inside]
    if max_clusters is not None:
        cand_y, cand_x, height = cand_y[:max_clusters], cand_x[:max_clusters], height[:max_clusters]

    peaks = np.stack([cand_y, cand_x], axis=1).astype(np.intp).reshape(-1, 2)
    if not return_details:
        return peaks
    details = {
        "smoothed_kappa": smoothed,
        "background_kappa": background,
        "sigma_kappa": sigma,
        "threshold_kappa": float(threshold),
        "peak_kappa_smoothed": height,
        # height above the background in σ (inf on a map with no scatter at all)
        "peak_significance": ((height - background) / sigma if sigma > 0
                              else np.full(height.shape, np.inf)),
    }
    return peaks, details


def cut_field(kappa, gamma1, gamma2, center_yx, pixel_arcmin, config=PAPER, spline_order=3):
    """Cut the 32′ cluster field centred on a map position onto the 500² grid.

    Parameters
    ----------
    kappa, gamma1, gamma2 : array_like, shape (ny, nx)
        Convergence and shear of the whole map [y, x] (γ computed on the whole
        map, see :func:`iter_ingested_fields`).
    center_yx : sequence of 2 floats
        Centre of the field in map pixel indices (y, x); integer values are
        pixel centres (the output of :func:`find_clusters`), fractions allowed.
    pixel_arcmin : float
        Side of a map pixel in arcmin.
    config : Config
        Field side ``field_arcmin`` (32′) and grid ``npix`` (500): the output
        pixel is ``config.pixel_arcsec`` (3.84″).
    spline_order : int
        Order of the interpolating spline (3: cubic; 1: bilinear).

    Returns
    -------
    dict
        ``kappa``, ``gamma1``, ``gamma2``: float64 arrays of shape
        (npix, npix).  Pixel (i, j) is the map's value at
        ((j + ½), (i + ½)) × 3.84″ from the field's lower-left corner, which
        lies ``field_arcmin / 2`` below and left of the centre, so the centre
        falls on the corner shared by pixels (npix/2 − 1, npix/2) and
        (npix/2, npix/2) of each axis.

    Raises
    ------
    ValueError
        If the maps differ in shape or hold NaN, or if the field would leave
        the map (its centre is closer than ``field_arcmin / 2`` to an edge).

    Notes
    -----
    §2.3.1 crops a 32′ × 32′ region around each cluster; §2.3.2 represents it
    by 500 × 500 arrays.  The ray-traced pixels (0.41′ for MassiveNuS) are
    about 6.4 times the 3.84″ grid pixel, so the field is interpolated, not
    cropped.  A cubic B-spline (``scipy.ndimage.map_coordinates``, order 3)
    passes through every map pixel value, is smooth (C²) and reproduces
    polynomials up to cubic exactly, so it keeps the mean and the gradients
    that γ and the lensed shapes depend on.  It does not invent small-scale
    power: the result holds no structure on scales below the map's pixel
    beyond the faint images of near-Nyquist modes that the spline kernel
    lets through (its response falls as sinc⁴), where nearest-neighbour
    steps or bilinear kinks would add spurious power at the 3.84″ scale.
    The truth κ of an ingested field therefore has the map's 0.4′ resolution,
    coarser than the network's 0.192′ output pixel -- a property of the
    paper's training data as well.  Between the outermost pixel centres and
    the map edge (reached only when the field touches the edge) the map is
    mirrored about the edge ("reflect").  κ, γ1 and γ2 are interpolated
    alike, so the cut γ is the whole-map γ at the field's pixels.
    """
    maps = {"kappa": _check_map("kappa", kappa),
            "gamma1": _check_map("gamma1", gamma1),
            "gamma2": _check_map("gamma2", gamma2)}
    shape = maps["kappa"].shape
    for label in ("gamma1", "gamma2"):
        if maps[label].shape != shape:
            raise ValueError(f"{label} has shape {maps[label].shape}, kappa {shape}: "
                             "the maps must share one grid")
    pixel_arcmin = _positive("pixel_arcmin", pixel_arcmin)
    center = np.asarray(center_yx, dtype=np.float64)
    if center.shape != (2,) or not np.all(np.isfinite(center)):
        raise ValueError(f"center_yx must be two finite map pixel indices (y, x), got {center_yx!r}")

    half_arcmin = config.field_arcmin / 2.0
    tol = 1e-9 * pixel_arcmin                        # float round-off, not a margin
    for axis, label in ((0, "y"), (1, "x")):
        c_arcmin = (center[axis] + 0.5) * pixel_arcmin    # from the map's lower-left corner
        side_arcmin = shape[axis] * pixel_arcmin
        if c_arcmin - half_arcmin < -tol or c_arcmin + half_arcmin > side_arcmin + tol:
            raise ValueError(
                f"the {config.field_arcmin:g}′ field centred at {label} = {c_arcmin:.4g}′ "
                f"(map pixel {center[axis]:g}) leaves the map, which spans 0-{side_arcmin:.4g}′ "
                f"along {label}: the centre must be ≥ {half_arcmin:g}′ from each edge "
                "(find_clusters' border_arcmin)")

    # Offsets of the output pixel centres from the field centre, in map pixels:
    # output pixel k sits at (k + ½) · pixel_arcsec from the field's lower-left
    # corner, i.e. at that minus field/2 from the centre; a map index c lies at
    # (c + ½) · pixel_arcmin, so an offset d arcmin from index c is index c + d / p.
    offsets_pix = ((np.arange(config.npix) + 0.5) * config.pixel_arcsec / 60.0
                   - half_arcmin) / pixel_arcmin
    coords = np.meshgrid(center[0] + offsets_pix, center[1] + offsets_pix, indexing="ij")
    return {label: scipy.ndimage.map_coordinates(m, coords, order=spline_order, mode="reflect",
                                                 output=np.float64)
            for label, m in maps.items()}


def iter_ingested_fields(paths, config=PAPER, angle_key=MASSIVENUS_ANGLE_KEY, hdu=0, **find_kwargs):
    """Cluster fields from ray-traced κ maps: the paper's training data path (§2.3.1).

    Parameters
    ----------
    paths : str, os.PathLike or iterable of them
        FITS κ maps (see :func:`read_convergence_map`), processed in the
        order given.
    config : Config
        Field and grid (32′, 500²); the maps must be at least
        ``config.field_arcmin`` on a side.
    angle_key : str
        Header keyword with the map's side in degrees ("ANGLE", MassiveNuS).
    hdu : int or str
        HDU holding the image.
    **find_kwargs
        Passed to :func:`find_clusters` (``smooth_fwhm_arcmin``,
        ``threshold_sigma``, ``threshold_kappa``, ``min_separation_arcmin``,
        ``border_arcmin`` -- default ``config.field_arcmin / 2`` --,
        ``max_clusters``).

    Yields
    ------
    dict
        ``kappa``, ``gamma1``, ``gamma2``: float64 (npix, npix) arrays on the
        paper's grid (:func:`cut_field`); ``meta``: a JSON-ready dict with
        ``source_file``, ``hdu``, ``rank`` (0 = the map's highest peak),
        ``peak_yx_pix`` (map pixel indices), ``peak_yx_arcmin`` (from the
        map's lower-left corner), ``peak_kappa`` (the map's κ at the peak
        pixel), ``peak_kappa_smoothed``, ``peak_significance`` (in σ),
        ``map_npix``, ``map_side_deg``, ``map_pixel_arcmin`` and
        ``detection`` (background, σ and threshold of the smoothed map).

    Notes
    -----
    Order is deterministic: maps in the order given (sort a glob first), and
    within a map the clusters highest first.  One map is in memory at a time;
    a map with no cluster yields nothing.

    γ is computed once on the WHOLE map, by eq. 8-9 with zero padding
    (``shear_from_kappa(kappa, pad=True)``), then cut: a 32′ cut alone would
    miss the shear of the mass around it, and a ray-traced cone is not
    periodic, so the FFT must not wrap it.  κ is a density contrast, so zero
    padding fills the outside with the cosmic mean; what it cannot supply is
    the structure beyond the map's edge, whose missing shear is largest near
    the edge -- raise ``border_arcmin`` to keep fields further in.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    find_kwargs = {"border_arcmin": config.field_arcmin / 2.0, **find_kwargs}
    for path in paths:
        kappa, side_deg = read_convergence_map(path, angle_key=angle_key, hdu=hdu,
                                               min_side_arcmin=config.field_arcmin)
        npix_map = kappa.shape[0]
        pixel_arcmin = side_deg * 60.0 / npix_map
        gamma1, gamma2 = shear_from_kappa(kappa, pad=True)
        peaks, det = find_clusters(kappa, pixel_arcmin, return_details=True, **find_kwargs)
        detection = {k: det[k] for k in ("background_kappa", "sigma_kappa", "threshold_kappa")}
        for rank, (iy, ix) in enumerate(peaks):
            field = cut_field(kappa, gamma1, gamma2, (iy, ix), pixel_arcmin, config)
            field["meta"] = {
                "source_file": os.fspath(path),
                "hdu": hdu,
                "rank": rank,
                "peak_yx_pix": (int(iy), int(ix)),
                "peak_yx_arcmin": (float((iy + 0.5) * pixel_arcmin), float((ix + 0.5) * pixel_arcmin)),
                "peak_kappa": float(kappa[iy, ix]),
                "peak_kappa_smoothed": float(det["peak_kappa_smoothed"][rank]),
                "peak_significance": float(det["peak_significance"][rank]),
                "map_npix": int(npix_map),
                "map_side_deg": side_deg,
                "map_pixel_arcmin": pixel_arcmin,
                "detection": detection,
            }
            yield field


def ingest_plan(paths, config=PAPER, angle_key=MASSIVENUS_ANGLE_KEY, hdu=0, **find_kwargs):
    """The clusters of ray-traced maps, without cutting them: a list of
    ``meta`` dicts as :func:`iter_ingested_fields` gives (first pass of
    :func:`ingest_dataset`; one map in memory at a time)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    find_kwargs = {"border_arcmin": config.field_arcmin / 2.0, **find_kwargs}
    plan = []
    for path in paths:
        kappa, side_deg = read_convergence_map(path, angle_key=angle_key, hdu=hdu,
                                               min_side_arcmin=config.field_arcmin)
        pixel_arcmin = side_deg * 60.0 / kappa.shape[0]
        peaks, det = find_clusters(kappa, pixel_arcmin, return_details=True, **find_kwargs)
        for rank, (iy, ix) in enumerate(peaks):
            plan.append({"source_file": os.fspath(path), "hdu": hdu, "angle_key": angle_key, "rank": rank,
                         "peak_yx_pix": (int(iy), int(ix)), "peak_kappa": float(kappa[iy, ix]),
                         "peak_significance": float(det["peak_significance"][rank]),
                         "map_npix": int(kappa.shape[0]), "map_side_deg": side_deg,
                         "map_pixel_arcmin": pixel_arcmin})
    return plan


@functools.lru_cache(maxsize=2)
def _map_and_shear(path, angle_key, hdu, min_side_arcmin):
    kappa, side_deg = read_convergence_map(path, angle_key=angle_key, hdu=hdu, min_side_arcmin=min_side_arcmin)
    return kappa, shear_from_kappa(kappa, pad=True), side_deg * 60.0 / kappa.shape[0]


class _IngestedFields:
    """Field generator of :func:`ingest_dataset`: cuts cluster ``index`` of
    ``split`` from its map (the last maps and their shear are cached)."""

    def __init__(self, by_split):
        self.by_split = by_split

    def __call__(self, config, rng, split, index):
        meta = self.by_split[split][index]
        kappa, (g1, g2), pixel_arcmin = _map_and_shear(meta["source_file"], meta["angle_key"], meta["hdu"],
                                                       config.field_arcmin)
        field = cut_field(kappa, g1, g2, meta["peak_yx_pix"], pixel_arcmin, config)
        field["meta"] = meta
        return field


def ingest_dataset(paths, out_dir, n_val, n_test, config=PAPER, seed=0, masks=False, shard_size=25,
                   workers=1, angle_key=MASSIVENUS_ANGLE_KEY, hdu=0, progress=True, **find_kwargs):
    """Clusters of ray-traced κ maps as a training dataset (the paper's path, §2.3.1).

    Parameters
    ----------
    paths : sequence of path
        FITS κ maps, in a fixed order (sort a glob first).
    out_dir : path
        Dataset directory, as :func:`write_dataset`.
    n_val, n_test : int
        Clusters for validation and test; the rest train.  Splits are
        contiguous in map order, so clusters of one map (whose line-of-sight
        structure they share) rarely straddle two splits.
    config, seed, masks, shard_size, workers, progress
        As :func:`write_dataset`; the seed draws the source catalogs and masks.
    angle_key, hdu, **find_kwargs
        As :func:`read_convergence_map` and :func:`find_clusters`.

    Returns
    -------
    dict
        The manifest.
    """
    plan = ingest_plan(paths, config, angle_key, hdu, **find_kwargs)
    n_val, n_test = int(n_val), int(n_test)
    if n_val < 0 or n_test < 0:
        raise ValueError("n_val and n_test must be non-negative")
    n_train = len(plan) - n_val - n_test
    if n_train < 1:
        raise ValueError(f"found {len(plan)} clusters in {len(list(paths))} map(s): too few for "
                         f"{n_val} validation + {n_test} test + at least one training cluster")
    by_split = {"train": plan[:n_train], "val": plan[n_train:n_train + n_val], "test": plan[n_train + n_val:]}
    return write_dataset(out_dir, {k: len(v) for k, v in by_split.items()}, config, seed,
                         _IngestedFields(by_split), masks, shard_size, workers, generator="ingest",
                         progress=progress)


def main(argv=None):
    """Cut clusters from ray-traced κ maps into a dataset (§2.3.1); returns the exit status."""
    p = argparse.ArgumentParser(description="cut clusters from ray-traced κ maps into a dataset")
    p.add_argument("maps", nargs="+", help="FITS κ maps (image + side in degrees in the header)")
    p.add_argument("--out", required=True, help="dataset directory")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--masks", action="store_true", help="bright-star masks (§3.5)")
    p.add_argument("--workers", type=int, default=1, help="processes making shards")
    p.add_argument("--shard-size", type=int, default=25, help="clusters per shard file")
    p.add_argument("--n-val", type=int, required=True)
    p.add_argument("--n-test", type=int, required=True)
    p.add_argument("--angle-key", default=MASSIVENUS_ANGLE_KEY, help="header key of the side in degrees")
    p.add_argument("--hdu", type=int, default=0)
    p.add_argument("--smooth-arcmin", type=float, default=1.0, help="FWHM of the detection smoothing")
    p.add_argument("--threshold-sigma", type=float, default=4.0, help="detection threshold")
    p.add_argument("--min-separation-arcmin", type=float, default=4.0)
    args = p.parse_args(argv)
    try:
        manifest = ingest_dataset(args.maps, args.out, args.n_val, args.n_test, PAPER, args.seed,
                                  args.masks, args.shard_size, args.workers, args.angle_key, args.hdu,
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
