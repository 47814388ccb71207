"""mass_peaks: significance maps, peak catalogues and their completeness and purity.

What a survey wants from a mass map: an S/N map, the peaks above a threshold
as a table on the sky, how many known objects (X-ray groups, simulated halos)
those peaks find (completeness) and how many peaks are real (purity), and
the stacked κ at the known objects against random positions.  Library code
for ``examples/cosmos.py`` and ``examples/wide_field.py``; every function
works on any map on the sky, KAPPA_KS93 or KAPPA_CNN alike.

The noise of a map is measured by the standard method: the map of the same
catalogue with every ellipticity turned by a random angle, which keeps the
shape noise and the positions and removes the shear (e.g. Van Waerbeke
et al. 2000).  Tested in tests/test_peaks.py; no command line of its own.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import scipy.ndimage
from astropy import units as u
from astropy.table import Table

import reconstruct_catalog as rc
import wlcnn

#: How a known object outside the map's footprint is treated: "error" (a
#: ValueError naming the objects) or "skip" (left out of the statistics, counted).
OUTSIDE_POLICIES = ("error", "skip")

#: Peak-table formats by file-name ending.
PEAK_FORMATS = {".fits": "fits", ".fits.gz": "fits", ".ecsv": "ascii.ecsv"}


# ## Noise realisations and S/N
def rotate_shapes(e1, e2, rng):
    """Every ellipticity turned by its own random angle: ε → ε e^{2iψ}, ψ uniform in [0, π).

    Returns
    -------
    e1, e2 : numpy.ndarray
        Same |ε| per source, ⟨ε⟩ = 0 whatever the shear (a spin-2 field turned
        by ψ changes phase by 2ψ, so ψ in [0, π) covers every phase once).
    """
    wlcnn.check_rng(rng)
    e = np.asarray(e1, np.float64) + 1j * np.asarray(e2, np.float64)
    e = e * np.exp(2j * rng.uniform(0.0, np.pi, e.shape))
    return e.real, e.imag


def noise_maps(map_fn, e1, e2, n_realisations, rng, progress=False):
    """Maps of ``n_realisations`` randomly rotated copies of the catalogue.

    Parameters
    ----------
    map_fn : callable
        ``map_fn(e1, e2) -> (ny, nx) map``: the estimator (KS93, the CNN)
        with the positions and errors of the catalogue fixed.
    e1, e2 : array_like, shape (n,)
    n_realisations : int
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray, shape (n_realisations, ny, nx)
    """
    n = n_realisations
    if isinstance(n, bool) or int(n) != n or n < 2:
        raise ValueError(f"n_realisations must be a whole number >= 2 (a spread needs two), "
                         f"got {n_realisations!r}")
    bar = wlcnn.Progress(int(n_realisations), "noise realisations") if progress else None
    maps = []
    for _ in range(int(n_realisations)):
        maps.append(np.asarray(map_fn(*rotate_shapes(e1, e2, rng)), np.float64))
        if bar:
            bar.update()
    return np.asarray(maps)


def ks93_map_fn(x, y, sigma, geometry, fwhm_arcmin=None):
    """``(e1, e2) -> KAPPA_KS93`` of the field for fixed sources (x, y arcsec from the centre).

    ``fwhm_arcmin`` None: the smoothing of the catalog's density, 1.25′ √(25/n)
    (:func:`reconstruct_catalog.ks93_fwhm_for_density`).
    """
    if fwhm_arcmin is None:
        fwhm_arcmin = rc.ks93_fwhm_for_density(rc.source_density(x, y, geometry))

    def map_fn(e1, e2):
        grid = rc.grid_field(x, y, e1, e2, sigma, geometry)
        return rc.ks93_field_map(grid, geometry, fwhm_arcmin)
    return map_fn


def cnn_map_fn(x, y, sigma, models, geometry, rng, n_fills=1, orientations=1):
    """``(e1, e2) -> KAPPA_CNN`` (mean of the runs, no-data regions noise-filled) of the field."""
    def map_fn(e1, e2):
        res, _ = rc.filled_cnn_map(x, y, e1, e2, sigma, models, geometry, rng, n_fills,
                                   orientations=orientations)
        return res.mean
    return map_fn


def _smooth_finite(a, sigma_pix):
    """Gaussian smoothing over the finite pixels only (normalised convolution); NaN stays NaN."""
    ok = np.isfinite(a)
    if not sigma_pix:
        return np.where(ok, a, np.nan)
    num = scipy.ndimage.gaussian_filter(np.where(ok, a, 0.0), sigma_pix, mode="constant")
    den = scipy.ndimage.gaussian_filter(ok.astype(np.float64), sigma_pix, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, num / den, np.nan)


class Significance(NamedTuple):
    """An S/N map and the noise it was measured against (all (ny, nx))."""
    snr: np.ndarray    #: (κ − mean) / std
    mean: np.ndarray   #: mean of the noise maps (the estimator's reply to pure noise)
    std: np.ndarray    #: standard deviation of the noise maps (ddof = 1)


def significance_map(kappa, noise, smooth_pix=0.0):
    """S/N of a map against its noise realisations.

    Parameters
    ----------
    kappa : array_like, shape (ny, nx)
    noise : array_like, shape (n, ny, nx)
        From :func:`noise_maps`, n >= 2.
    smooth_pix : float
        σ (pixels) of a Gaussian smoothing of the noise mean and variance
        maps: a few realisations give a noisy σ per pixel (relative error
        1/sqrt(2(n − 1))), while the noise itself varies only with the source
        density, slowly.  0: none.

    Returns
    -------
    Significance

    Notes
    -----
    S/N = (κ − ⟨κ_noise⟩) / σ_noise.  For a linear estimator (KS93)
    ⟨κ_noise⟩ = 0; a network can answer pure noise with a non-zero map, which
    is the part of κ that is not signal.
    """
    kappa = np.asarray(kappa, np.float64)
    noise = np.asarray(noise, np.float64)
    if noise.ndim != 3 or noise.shape[1:] != kappa.shape or noise.shape[0] < 2:
        raise ValueError(f"noise must have shape (n >= 2, {kappa.shape[0]}, {kappa.shape[1]}), "
                         f"got {noise.shape}")
    if smooth_pix < 0:
        raise ValueError(f"smooth_pix must be >= 0, got {smooth_pix}")
    mean = _smooth_finite(noise.mean(axis=0), smooth_pix)
    std = np.sqrt(_smooth_finite(noise.var(axis=0, ddof=1), smooth_pix))
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(std > 0, (kappa - mean) / std, np.nan)
    return Significance(snr, mean, std)


# ## Peaks
def find_peaks(snr, kappa, wcs, threshold, footprint=None, size=3):
    """Local maxima of an S/N map at or above ``threshold``, as a table on the sky.

    Parameters
    ----------
    snr, kappa : array_like, shape (ny, nx)
    wcs : astropy.wcs.WCS
        Celestial WCS of the maps.
    threshold : float
    footprint : array_like of bool, shape (ny, nx), optional
        Pixels with data; a peak must lie in it, and pixels outside it
        never hide a peak.  Default: the finite pixels of ``snr``.
    size : int
        Side (pixels) of the square a peak is the maximum of (3: its eight
        neighbours).

    Returns
    -------
    astropy.table.Table
        Columns id, ra, dec (deg), x, y (0-based pixel, pix), kappa, snr;
        highest S/N first; ``meta`` has the threshold.
    """
    snr = np.asarray(snr, np.float64)
    kappa = np.asarray(kappa, np.float64)
    if snr.ndim != 2 or kappa.shape != snr.shape:
        raise ValueError(f"snr and kappa must be 2-D maps of one shape, got {snr.shape} and "
                         f"{kappa.shape}")
    inside = _footprint(footprint, snr)
    s = np.where(inside, snr, -np.inf)
    is_max = s == scipy.ndimage.maximum_filter(s, size=int(size), mode="constant", cval=-np.inf)
    iy, ix = np.nonzero(is_max & (s >= threshold))
    order = np.argsort(-s[iy, ix], kind="stable")
    iy, ix = iy[order], ix[order]
    ra, dec = wcs.pixel_to_world_values(ix, iy)
    table = Table({"id": np.arange(1, len(ix) + 1), "ra": np.atleast_1d(ra) * u.deg,
                   "dec": np.atleast_1d(dec) * u.deg, "x": ix.astype(np.float64) * u.pix,
                   "y": iy.astype(np.float64) * u.pix, "kappa": kappa[iy, ix], "snr": s[iy, ix]})
    table["kappa"].description = "convergence at the peak pixel"
    table["snr"].description = "signal-to-noise at the peak pixel"
    table.meta["THRESH"] = float(threshold)
    return table


def write_peaks(table, path, overwrite=False):
    """Write a peak table as FITS (.fits, .fits.gz) or ECSV (.ecsv), units kept; atomic."""
    path = os.fspath(path)
    ext = next((e for e in sorted(PEAK_FORMATS, key=len, reverse=True) if path.endswith(e)), None)
    if ext is None:
        raise ValueError(f"{path}: unknown peak-table format; name it {', '.join(PEAK_FORMATS)}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")

    def write(tmp):
        if ext == ".fits.gz":
            import gzip
            with gzip.open(tmp, "wb") as f:
                table.write(f, format="fits")
        else:
            table.write(tmp, format=PEAK_FORMATS[ext], overwrite=True)
    wlcnn.atomic_write(path, write)
    return path


# ## Known objects: footprint, matching, completeness and purity, stacking
def _footprint(footprint, like):
    if footprint is None:
        return np.isfinite(like)
    footprint = np.asarray(footprint, dtype=bool)
    if footprint.shape != like.shape:
        raise ValueError(f"footprint has shape {footprint.shape}, the map {like.shape}")
    return footprint & np.isfinite(like)


def in_footprint(ra, dec, wcs, footprint):
    """Whether each position falls on a pixel of ``footprint`` (bool per position)."""
    x, y = wcs.world_to_pixel_values(np.asarray(ra, np.float64), np.asarray(dec, np.float64))
    ix = np.round(np.atleast_1d(x)).astype(np.int64)
    iy = np.round(np.atleast_1d(y)).astype(np.int64)
    ny, nx = footprint.shape
    on = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    out = np.zeros(ix.shape, dtype=bool)
    out[on] = footprint[iy[on], ix[on]]
    return out


def objects_inside(ra, dec, wcs, footprint, outside="error", what="known objects"):
    """The known objects inside the footprint, or a ValueError naming those outside.

    Returns
    -------
    numpy.ndarray of bool
        True for the objects inside; with ``outside="skip"`` the others are
        to be left out of completeness and stacks (the caller reports how many).
    """
    if outside not in OUTSIDE_POLICIES:
        raise ValueError(f"outside must be one of {OUTSIDE_POLICIES}, got {outside!r}")
    ra, dec = np.atleast_1d(np.asarray(ra, np.float64)), np.atleast_1d(np.asarray(dec, np.float64))
    if ra.shape != dec.shape or ra.ndim != 1:
        raise ValueError(f"ra and dec must be 1-D of one length, got {ra.shape} and {dec.shape}")
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        raise ValueError(f"{what}: NaN or infinite positions")
    keep = in_footprint(ra, dec, wcs, np.asarray(footprint, dtype=bool))
    if outside == "error" and not keep.all():
        bad = np.flatnonzero(~keep)
        first = ", ".join(f"({ra[i]:.5f}, {dec[i]:.5f})" for i in bad[:3])
        raise ValueError(f"{len(bad)} of {len(ra)} {what} lie outside the map's footprint, e.g. "
                         f"RA, Dec = {first} deg; pass outside='skip' to leave them out")
    if not keep.any():
        raise ValueError(f"none of the {len(ra)} {what} lies inside the map's footprint")
    return keep


def _separation_arcmin(ra1, dec1, ra2, dec2):
    """(n1, n2) great-circle separations (haversine), arcmin."""
    r1, d1, r2, d2 = (np.radians(np.asarray(a, np.float64)) for a in (ra1, dec1, ra2, dec2))
    h = (np.sin((d1[:, None] - d2[None, :]) / 2) ** 2
         + np.cos(d1)[:, None] * np.cos(d2)[None, :] * np.sin((r1[:, None] - r2[None, :]) / 2) ** 2)
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))) * 60.0


def match_peaks(peaks, ra, dec, radius_arcmin):
    """Which peaks lie near a known object, and which objects near a peak.

    Returns
    -------
    peak_matched : numpy.ndarray of bool, (n_peaks,)
        A known object within ``radius_arcmin`` (the peak is true).
    object_matched : numpy.ndarray of bool, (n_objects,)
        A peak within ``radius_arcmin`` (the object is detected).

    Notes
    -----
    Either side may match several of the other: two peaks on one cluster
    are both true, one peak between two groups detects both.
    """
    if radius_arcmin <= 0:
        raise ValueError(f"radius_arcmin must be > 0, got {radius_arcmin}")
    ra, dec = np.atleast_1d(np.asarray(ra, np.float64)), np.atleast_1d(np.asarray(dec, np.float64))
    sep = _separation_arcmin(np.asarray(peaks["ra"]), np.asarray(peaks["dec"]), ra, dec)
    close = sep <= radius_arcmin
    return close.any(axis=1), close.any(axis=0)


def completeness_purity(peaks, ra, dec, radius_arcmin, thresholds):
    """Completeness and purity of the peaks at or above each S/N threshold.

    Parameters
    ----------
    peaks : astropy.table.Table
        From :func:`find_peaks` (columns ra, dec, snr), its threshold at or
        below the lowest of ``thresholds``.
    ra, dec : array_like, degrees
        The known objects, all inside the footprint (:func:`objects_inside`).
    radius_arcmin : float
    thresholds : sequence of float

    Returns
    -------
    astropy.table.Table
        One row per threshold: threshold, n_peaks, n_true (peaks near an
        object), n_objects, n_detected, completeness = n_detected / n_objects,
        purity = n_true / n_peaks (NaN without peaks).
    """
    ra = np.atleast_1d(np.asarray(ra, np.float64))
    if ra.size == 0:
        raise ValueError("no known objects to match")
    peak_thresh = peaks.meta.get("THRESH", -np.inf)
    rows = []
    for t in thresholds:
        if t < peak_thresh:
            raise ValueError(f"threshold {t} is below the peak table's own ({peak_thresh})")
        sel = peaks[np.asarray(peaks["snr"]) >= t]
        true, found = match_peaks(sel, ra, dec, radius_arcmin)
        n = len(sel)
        rows.append((float(t), n, int(true.sum()), ra.size, int(found.sum()), found.sum() / ra.size,
                     true.sum() / n if n else np.nan))
    return Table(rows=rows, names=("threshold", "n_peaks", "n_true", "n_objects", "n_detected",
                                   "completeness", "purity"))


def values_at(kappa, wcs, ra, dec):
    """A map at sky positions, bilinearly interpolated between pixel centres."""
    x, y = wcs.world_to_pixel_values(np.asarray(ra, np.float64), np.asarray(dec, np.float64))
    return scipy.ndimage.map_coordinates(np.asarray(kappa, np.float64), np.vstack([np.atleast_1d(y),
                                         np.atleast_1d(x)]), order=1, mode="nearest")


def random_positions(wcs, footprint, n, rng):
    """``n`` positions (ra, dec in deg) uniform over the pixels of ``footprint``."""
    wlcnn.check_rng(rng)
    iy, ix = np.nonzero(np.asarray(footprint, dtype=bool))
    if iy.size == 0:
        raise ValueError("the footprint is empty: no random positions")
    pick = rng.integers(0, iy.size, n)
    x = ix[pick] + rng.uniform(-0.5, 0.5, n)
    y = iy[pick] + rng.uniform(-0.5, 0.5, n)
    ra, dec = wcs.pixel_to_world_values(x, y)
    return np.asarray(ra), np.asarray(dec)


class Stack(NamedTuple):
    """κ stacked at known objects against random positions in the footprint."""
    n: int               #: objects stacked
    kappa: float         #: mean κ at the objects
    random_mean: float   #: mean over random sets of n positions
    random_std: float    #: spread (ddof = 1) of those sets' means
    snr: float           #: (kappa − random_mean) / random_std


def stack_snr(kappa, wcs, ra, dec, footprint, rng, n_random=2000):
    """S/N of the mean κ at ``n`` known objects against ``n_random`` random sets of n.

    Notes
    -----
    The null distribution is measured, not assumed: each random set has as
    many positions as objects, uniform over ``footprint``, so the map's own
    correlations and any offset of its mean (mass-sheet freedom, a network's
    bias) enter the reference as they enter the stack.
    """
    kappa = np.asarray(kappa, np.float64)
    ra = np.atleast_1d(np.asarray(ra, np.float64))
    if ra.size == 0:
        raise ValueError("no objects to stack")
    stacked = float(np.mean(values_at(kappa, wcs, ra, dec)))
    rra, rdec = random_positions(wcs, footprint, ra.size * int(n_random), rng)
    sets = values_at(kappa, wcs, rra, rdec).reshape(int(n_random), ra.size).mean(axis=1)
    mean, std = float(sets.mean()), float(sets.std(ddof=1))
    return Stack(ra.size, stacked, mean, std, (stacked - mean) / std)
