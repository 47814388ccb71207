"""reconstruct_catalog: TODO docstring."""
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
    MOSAIC_BATCH, PAPER, SIGMA_RANGE, _Progress, __version__, _atomic_write,
    _check_border, _check_rng, _mosaic_runs, _positive, config_from_dict, cosmology,
    grid_catalog, ks93, load_runs, model_info, mosaic_offsets, mosaic_orientations,
    predict_mosaic_runs, sigma_crit, smooth_map,
)



# ---------------------------------------------------------------------------
# §4.2 Real catalogs: sky coordinates in, FITS mass maps out
# ---------------------------------------------------------------------------
#: Frames of a catalog's (e1, e2), with CLMM's names (arXiv:1407.7676 §5.1).
#: "euclidean" is DESIGN.md's: e1 > 0 along x (West), e2 > 0 along the line
#: x = y (North-West).  "celestial" has x towards East (RA increasing), so
#: the mirrored axis flips the sign of e2 (DESIGN.md "Lensing": a mirror
#: flips g2).  Either way the axes are the local West/East and North at
#: each source, as shear catalogs are published.
MAP_CMAP = "magma"
COORDINATE_SYSTEMS = ("euclidean", "celestial")

#: Rows whose |ε| reaches this are dropped (and counted).  Eq. 5's
#: (a − b)/(a + b) is below 1 for every ellipse, so |ε| ≥ 1 is a failed shape
#: measurement rather than a noisy one (shape catalogs usually cut such rows
#: or give them zero weight), and a wild value of a few shifts the mean
#: ellipticity of its 7″ pixels by more than the shear being measured.
#: Dropping keeps the rest of the catalog usable; nothing left is an error.
#: (The simulated training catalogs, with N(0, σ_meas) noise added to ε,
#: have a fraction ~1e-3 of such rows: dropping them changes nothing there.)
MAX_ELLIPTICITY = 1.0

#: Default FWHM (arcmin) of the Gaussian smoothing of the KAPPA_KS93 map.
#: Fig. 11 does not state its KS93 smoothing.  The §3 validation choice
#: (:func:`choose_ks93_smoothing`) picked 1.25′ on the quick dataset's
#: 25 arcmin⁻² fields (examples/quick_model/ks93_smoothing.csv; 0.75′ on
#: an earlier dataset).  The noise of smoothed KS93 goes as
#: 1 / (FWHM sqrt(n)), so the same noise at the ~95 arcmin⁻² of an HST
#: catalog like El Gordo's (§4.2) needs 1.25′ sqrt(25/95) = 0.64′: 0.75′
#: is that, on the validation grid's 0.25′ steps, rounded up.  It keeps two
#: clumps 0.7 Mpc (1.5′) apart at z = 0.87, El Gordo's, resolved; its noise
#: on the El Gordo-like catalog is 0.024 in κ (examples/el_gordo_like.py).
#: Ground-based catalogs (~25 arcmin⁻²) want ``--ks93-fwhm 1.25``.
KS93_MAP_FWHM_ARCMIN = 0.75

#: Least overlap of neighbouring tiles of a field wider than one tile, as a
#: fraction of the part of a tile the mosaic covers (26.1′ at stride 12).
#: Half: every pixel away from the field's edge is predicted by two tiles
#: along each axis, so no pixel sits near the edge of every tile that sees it.
TILE_OVERLAP = 0.5

#: What the network sees where the catalog has no source (beyond a field
#: smaller than the 32′ input, or in holes of its footprint).  "empty": the
#: no-data pixels of :func:`grid_catalog` (ε̄ = 0, Δε = ``empty_pixel_error``),
#: which the training skies, with sources everywhere, never contain; "noise"
#: (default): shear-free shape noise at the catalog's own density
#: (:func:`noise_fill`), which they do.  See :func:`reconstruct` for the
#: measured difference.
OUTSIDE_MODES = ("noise", "empty")

#: Noise fills averaged per run in "noise" mode: each is a fresh draw of the
#: fill sources, so the fill's own noise in KAPPA_CNN falls as 1/sqrt(N).
NOISE_FILLS = 4

#: Sources a fill cell of the catalog's density holds on average (at least):
#: a cell with no source at all is then no-data, not a Poisson gap (e^-10 ≈
#: 5e-5 of data cells are empty by chance, and filling one merely adds noise).
FILL_CELL_SOURCES = 10.0

#: Names of the image extensions of a reconstruction file, in order.
MAP_EXTENSIONS = ("KAPPA_CNN", "KAPPA_CNN_STD", "KAPPA_KS93", "DENSITY")

#: Config fields that fix the grids a catalog is put on: models that differ
#: in any of them cannot share one gridded catalog.
GRID_FIELDS = ("field_arcmin", "npix", "fwhm_arcsec", "kernel_cut_sigma", "empty_pixel_error",
               "subfield_npix", "offset_step", "n_offsets", "first_kernel", "pool", "output_npix",
               "mosaic_npix")
#: Config fields of the training skies: an ensemble mixing them is no
#: "K independent runs" of one model (§2.3.2).
TRAINING_FIELDS = ("H0", "Om0", "z_lens", "z_source")

#: Step (arcsec) towards North used to find the direction of local North at
#: a source in the tangent plane: the angle it gives differs from a 0.01″
#: step's by < 1e-8 rad half a degree from the centre.
_NORTH_STEP_ARCSEC = 1.0

#: Panel size (inches) and resolution of the Fig. 11-like PNG.
RECON_PANEL_INCH = 4.0
RECON_DPI = 110


class CatalogWarning(UserWarning):
    """Rows of a catalog were dropped (NaN, bad weight, |ε| ≥ 1, outside the field)."""


class SkyCatalog(NamedTuple):
    """A shear catalog read by :func:`read_catalog`, in the euclidean frame."""
    ra: np.ndarray     #: (n,) right ascension, degrees (ICRS)
    dec: np.ndarray    #: (n,) declination, degrees
    e1: np.ndarray     #: (n,) ellipticity along local West (euclidean frame)
    e2: np.ndarray     #: (n,) ellipticity along local North-West
    sigma: np.ndarray  #: (n,) per-component ellipticity error σ_i
    counts: dict       #: rows read and dropped: rows, dropped_nan, dropped_weight, dropped_ellipticity
    source: str        #: file name, or "table"


def _load_table(catalog):
    """An astropy Table from a path (FITS, CSV, ECSV or other ASCII) or a Table."""
    if isinstance(catalog, Table):
        return catalog, "table"
    path = os.fspath(catalog)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such catalog file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (0 bytes), no catalog in it")
    from astropy.io.registry import IORegistryError
    try:
        try:
            table = Table.read(path)
        except IORegistryError:
            # No known extension (e.g. .cat, .txt): let astropy guess the ASCII layout.
            table = Table.read(path, format="ascii")
    except Exception as exc:  # astropy raises many types for unreadable files
        raise ValueError(f"{path}: could not read it as a table (FITS, CSV or ECSV): {exc}") from exc
    return table, os.path.basename(path)


def _find_column(table, name, option):
    """The column of ``table`` called ``name``, matched case-insensitively."""
    if name in table.colnames:
        return name
    matches = [c for c in table.colnames if c.lower() == name.lower()]
    if len(matches) > 1:
        raise ValueError(f"{option} {name!r} matches several columns {matches}: give the exact name")
    return matches[0] if matches else None


def _float_column(table, name, angle=False):
    """A column as float64, masked entries as NaN; angles converted to degrees."""
    col = table[name]
    if not (np.issubdtype(col.dtype, np.number) or np.issubdtype(col.dtype, np.bool_)):
        raise ValueError(f"column {name!r} is not numeric (dtype {col.dtype})"
                         + ("; give RA and Dec in degrees" if angle else ""))
    if np.ndim(col) != 1:
        raise ValueError(f"column {name!r} holds arrays of shape {col.shape[1:]} per row, not one number")
    values = np.ma.masked_array(col, dtype=np.float64).filled(np.nan)
    unit = getattr(col, "unit", None)
    if angle and unit is not None:
        if not u.Unit(unit).is_equivalent(u.deg):
            raise ValueError(f"column {name!r} has unit {unit}, not an angle")
        values = (values * u.Unit(unit)).to_value(u.deg)
    return values


def read_catalog(catalog, ra_col="ra", dec_col="dec", e1_col="e1", e2_col="e2", weight_col="weight",
                 sigma_col=None, coordinate_system="euclidean"):
    """Read a shear catalog in sky coordinates and clean it (§4.2).

    Parameters
    ----------
    catalog : str, os.PathLike or astropy.table.Table
        A FITS, CSV or ECSV file (read by ``astropy.table.Table.read``; other
        ASCII layouts are guessed), or a Table.
    ra_col, dec_col : str
        Position columns, degrees (ICRS); a column with an angle unit is
        converted.  Names are matched case-insensitively.
    e1_col, e2_col : str
        Ellipticity components, (a − b)/(a + b) (eq. 5), in the frame named by
        ``coordinate_system``.
    weight_col : str or None
        Inverse-variance weight w per source; σ = 1/sqrt(w) per component.
        Used only when ``sigma_col`` is None.
    sigma_col : str, optional
        Per-component ellipticity error σ (shape noise and measurement error
        together, as the gridding's u = 1/σ² needs).  Giving it together with
        a ``weight_col`` other than the default "weight" is an error.
    coordinate_system : {"euclidean", "celestial"}
        Frame of (e1, e2), CLMM's names: euclidean (default) has x towards
        West, as DESIGN.md; celestial has x towards East, so e2 is negated
        here (arXiv:1407.7676 §5.1).

    Returns
    -------
    SkyCatalog
        Clean rows only, e1/e2 in the euclidean frame.  ``counts`` has
        ``rows`` (read), ``dropped_nan`` (NaN or inf in a used column, masked
        entries included), ``dropped_weight`` (w ≤ 0, i.e. flagged, or σ
        outside the gridder's accepted range) and ``dropped_ellipticity``
        (|ε| ≥ :data:`MAX_ELLIPTICITY`).

    Raises
    ------
    ValueError
        Unknown coordinate system; both a weight and a sigma column; an
        empty or unreadable file; missing columns (named, with the columns
        the file has); non-numeric columns; |Dec| > 90°; nothing left after
        the drops.

    Warns
    -----
    CatalogWarning
        When rows are dropped, with the counts.
    """
    if coordinate_system not in COORDINATE_SYSTEMS:
        raise ValueError(f"unknown coordinate_system {coordinate_system!r}; one of {COORDINATE_SYSTEMS} "
                         "(euclidean: e1 along West as DESIGN.md; celestial: e1 along East, e2 negated)")
    if sigma_col is not None and weight_col not in (None, "weight"):
        raise ValueError(f"give a weight column or a sigma column, not both (weight_col={weight_col!r}, "
                         f"sigma_col={sigma_col!r})")
    err_col, err_option = (sigma_col, "sigma_col") if sigma_col is not None else (weight_col or "weight",
                                                                                  "weight_col")
    table, source = _load_table(catalog)
    if not table.colnames:
        raise ValueError(f"{source}: empty catalog (no columns)")
    wanted = {"ra_col": ra_col, "dec_col": dec_col, "e1_col": e1_col, "e2_col": e2_col, err_option: err_col}
    found = {opt: _find_column(table, name, opt) for opt, name in wanted.items()}
    missing = [f"{wanted[opt]!r} ({opt})" for opt, col in found.items() if col is None]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; the catalog has "
                         f"{table.colnames}.  Name them with the --*-col options (case is ignored).")
    if len(table) == 0:
        raise ValueError(f"{source}: the catalog has columns {table.colnames} but no rows")
    ra = _float_column(table, found["ra_col"], angle=True)
    dec = _float_column(table, found["dec_col"], angle=True)
    e1 = _float_column(table, found["e1_col"])
    e2 = _float_column(table, found["e2_col"])
    err = _float_column(table, found[err_option])
    counts = {"rows": len(table)}

    finite = np.isfinite(ra) & np.isfinite(dec) & np.isfinite(e1) & np.isfinite(e2) & np.isfinite(err)
    counts["dropped_nan"] = int((~finite).sum())
    if np.any(np.abs(dec[finite]) > 90.0):
        raise ValueError(f"{source}: column {found['dec_col']!r} has values beyond ±90°: "
                         "not a declination in degrees")
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = err if sigma_col is not None else 1.0 / np.sqrt(err)
    good_err = finite & (sigma >= SIGMA_RANGE[0]) & (sigma <= SIGMA_RANGE[1])
    counts["dropped_weight"] = int((finite & ~good_err).sum())
    good_e = good_err & (np.hypot(e1, e2) < MAX_ELLIPTICITY)
    counts["dropped_ellipticity"] = int((good_err & ~good_e).sum())
    keep = good_e
    n_dropped = counts["rows"] - int(keep.sum())
    detail = (f"{counts['dropped_nan']} with NaN/inf or empty entries, {counts['dropped_weight']} with "
              f"weight ≤ 0 or σ outside [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}], "
              f"{counts['dropped_ellipticity']} with |e| ≥ {MAX_ELLIPTICITY:g}")
    if not keep.any():
        raise ValueError(f"{source}: no usable row among {counts['rows']} ({detail})")
    if n_dropped:
        warnings.warn(f"{source}: dropped {n_dropped} of {counts['rows']} rows ({detail})",
                      CatalogWarning, stacklevel=2)
    e2 = e2 if coordinate_system == "euclidean" else -e2
    return SkyCatalog(ra[keep], dec[keep], e1[keep], e2[keep], sigma[keep], counts, source)


def tangent_plane_wcs(center, pixel_arcsec=1.0, crpix=(1.0, 1.0)):
    """A gnomonic (TAN) WCS about ``center`` whose x axis points West.

    Parameters
    ----------
    center : (float, float)
        (RA, Dec) of the tangent point, degrees (ICRS).
    pixel_arcsec : float
        Pixel side, arcsec.  With the default 1″ and ``crpix`` (1, 1), the
        0-based pixel coordinates of a source are its (x, y) in arcsec from
        the centre.
    crpix : (float, float)
        FITS (1-based) pixel of the tangent point.

    Returns
    -------
    astropy.wcs.WCS
        CTYPE RA---TAN / DEC--TAN, CDELT1 = −pixel (RA decreases as x
        grows: x towards West, DESIGN.md "Lensing"), CDELT2 = +pixel (y
        towards North).  This is also the usual orientation of sky images:
        North up, East left.
    """
    ra0, dec0 = (float(v) for v in center)
    if not (np.isfinite(ra0) and np.isfinite(dec0) and -90.0 <= dec0 <= 90.0):
        raise ValueError(f"center must be a finite (RA, Dec) in degrees with |Dec| ≤ 90, got {center}")
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [ra0 % 360.0, dec0]
    w.wcs.crpix = list(crpix)
    w.wcs.cdelt = [-pixel_arcsec / 3600.0, pixel_arcsec / 3600.0]
    w.wcs.radesys = "ICRS"
    return w


def local_north_angle(ra, dec, wcs):
    """Angle ψ from the tangent plane's y axis to local North at each source.

    Parameters
    ----------
    ra, dec : array_like, degrees
    wcs : astropy.wcs.WCS
        From :func:`tangent_plane_wcs`.

    Returns
    -------
    numpy.ndarray, radians
        Counter-clockwise (from x towards y) angle of local North in the
        plane, minus 90°.  An ellipticity measured along the local (West,
        North) axes is ε_plane = ε_local e^{2iψ} in the plane's (x, y).  ψ = 0
        on the central meridian; elsewhere the meridians converge, ψ ≈ −Δα
        sin δ for a source Δα East of the centre: 0.1° at 5′ from El Gordo's
        centre, so 0.2° of shear angle.
    """
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    step = _NORTH_STEP_ARCSEC / 3600.0
    sign = np.where(dec + step <= 90.0, 1.0, -1.0)  # step South at the pole, and turn the vector round
    x0, y0 = wcs.world_to_pixel_values(ra, dec)
    x1, y1 = wcs.world_to_pixel_values(ra, dec + sign * step)
    return np.arctan2(sign * (y1 - y0), sign * (x1 - x0)) - np.pi / 2


def project_catalog(sky, center):
    """Positions and ellipticities of a catalog on the tangent plane about ``center``.

    Parameters
    ----------
    sky : SkyCatalog
    center : (float, float)
        Tangent point (RA, Dec), degrees.

    Returns
    -------
    x, y : numpy.ndarray
        Arcsec from the centre, x towards West, y towards North (DESIGN.md);
        NaN for a source on the far hemisphere (no TAN image).
    e1, e2 : numpy.ndarray
        Ellipticity in the plane's (x, y) frame: the local frame rotated by
        :func:`local_north_angle`.
    """
    wcs = tangent_plane_wcs(center)
    with np.errstate(invalid="ignore"):
        x, y = wcs.world_to_pixel_values(sky.ra, sky.dec)
        psi = local_north_angle(sky.ra, sky.dec, wcs)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    behind = _angular_distance_deg(sky.ra, sky.dec, center) >= 90.0
    x[behind] = y[behind] = np.nan
    eps = (sky.e1 + 1j * sky.e2) * np.exp(2j * np.where(np.isfinite(psi), psi, 0.0))
    return x, y, eps.real, eps.imag


def _angular_distance_deg(ra, dec, center):
    ra, dec, ra0, dec0 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (ra, dec, *center))
    c = np.sin(dec) * np.sin(dec0) + np.cos(dec) * np.cos(dec0) * np.cos(ra - ra0)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def catalog_center(ra, dec):
    """Default field centre: the middle of the catalog's extent on the sky.

    Parameters
    ----------
    ra, dec : array_like, degrees

    Returns
    -------
    (float, float)
        (RA, Dec) in degrees: the midpoint of the bounding box of the
        sources in the tangent plane about their mean direction (a mean of
        unit vectors, so a field across RA = 0 is handled).
    """
    r, d = np.radians(ra), np.radians(dec)
    v = np.array([np.mean(np.cos(d) * np.cos(r)), np.mean(np.cos(d) * np.sin(r)), np.mean(np.sin(d))])
    norm = np.linalg.norm(v)
    if norm < 1e-6:
        raise ValueError("the sources cover the whole sky around: no field centre; give center")
    mean = (np.degrees(np.arctan2(v[1], v[0])) % 360.0, np.degrees(np.arcsin(v[2] / norm)))
    wcs = tangent_plane_wcs(mean)
    x, y = wcs.world_to_pixel_values(ra, dec)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        raise ValueError("no source projects onto the tangent plane about the catalog's mean position")
    xm = 0.5 * (np.min(x[ok]) + np.max(x[ok]))
    ym = 0.5 * (np.min(y[ok]) + np.max(y[ok]))
    ra_c, dec_c = wcs.pixel_to_world_values(xm, ym)
    return float(ra_c) % 360.0, float(dec_c)


class FieldGeometry(NamedTuple):
    """The output grid of a reconstruction and the network tiles that cover it.

    The output grid is square, ``npix`` mosaic pixels of ``pixel_arcsec``
    (11.52″) a side, centred on the field centre, which lies on a pixel
    corner: pixel (i, j) spans x ∈ [(j − npix/2) p, (j − npix/2 + 1) p)
    arcsec from the centre (x towards West) and y likewise (North).  Tile
    ``a`` (one value per axis, in ``tile_starts``) is a 32′ network input
    whose mosaic pixel J is output pixel a + J (DESIGN.md "Grids"), so every
    tile's pixels are the output grid's own: nothing is resampled.
    """
    npix: int             #: output side, mosaic pixels (even)
    pixel_arcsec: float   #: mosaic pixel side, arcsec (pool × input pixel)
    tile_starts: tuple    #: output index of mosaic pixel 0 of each tile, per axis
    config: object        #: the Config of the grids (the models')
    stride: int           #: offset step of the mosaic, input pixels (mosaic_offsets)
    border_pix: int       #: output pixels left out on each side of each subfield

    @property
    def side_arcmin(self):
        """Side of the field (the output grid), arcmin."""
        return self.npix * self.pixel_arcsec / 60.0

    @property
    def n_tiles(self):
        """Network inputs (32′ tiles) the field needs."""
        return len(self.tile_starts) ** 2

    def tile_origin_arcsec(self, start):
        """Lower-left corner (x or y, arcsec from the centre) of the input grid of tile ``start``."""
        cfg = self.config
        lo = (cfg.first_kernel - 1) // 2  # mosaic pixel 0 starts at input pixel lo
        return (start - self.npix / 2) * self.pixel_arcsec - lo * cfg.pixel_arcsec


def _covered_range(config, stride, border):
    """[c0, c1): the mosaic pixels (one axis) that the subfields of ``stride`` predict."""
    line = np.zeros(config.mosaic_npix, dtype=bool)
    for m in mosaic_offsets(config, stride):
        line[m + border:m + config.output_npix - border] = True
    covered = np.flatnonzero(line)
    c0, c1 = int(covered[0]), int(covered[-1]) + 1
    if not line[c0:c1].all():
        raise ValueError(f"stride {stride} with a {border}-pixel border leaves gaps between subfields")
    return c0, c1


def field_geometry(size_arcmin, config=PAPER, stride=12, border_pix=None):
    """Output grid and network tiles of a square field of ``size_arcmin``.

    Parameters
    ----------
    size_arcmin : float
        Side of the field; rounded up to an even number of mosaic pixels
        (11.52″) so that the centre is a pixel corner.
    config : Config
        The models' grids.
    stride : int
        Offset step of each tile's mosaic, input pixels (:func:`mosaic_offsets`).
    border_pix : int, optional
        Output pixels left out of each subfield (default
        ``config.loss_border_pix``, as :func:`predict_mosaic`).

    Returns
    -------
    FieldGeometry

    Notes
    -----
    A 32′ network input predicts only the central part of its mosaic, mosaic
    pixels [c0, c1) with c0 = 14 (26.1′ at stride 12, 26.3′ at the paper's
    stride 3; :func:`mosaic_coverage`).  A field that fits in it is one tile
    centred on the field (a 9′ HST field, §4.2, sits in the middle of the 32′
    input; the input pixels around it hold the shear-free noise of
    :func:`noise_fill`, or with ``outside="empty"`` no source and the
    documented no-data values ε̄ = 0, Δε = ``empty_pixel_error``, n = 0).  A
    wider field is covered by tiles overlapping by at least
    :data:`TILE_OVERLAP` of that width, the first flush with the field's
    lower edge, the last with its upper edge, the others evenly between;
    their mosaics are averaged with every subfield prediction counting once
    (:func:`cnn_field_map`).
    """
    size = _positive("size_arcmin", size_arcmin)
    border = _check_border(border_pix, config)
    stride = int(stride)
    p = config.pixel_arcsec * config.pool
    half = max(int(np.ceil(size * 60.0 / 2.0 / p - 1e-9)), 1)  # 1e-9: an exact multiple stays
    npix = 2 * half
    c0, c1 = _covered_range(config, stride, border)
    lo = (config.first_kernel - 1) // 2
    centre = int(round((config.npix / 2 - lo) / config.pool))  # the mosaic corner at the input's centre
    # A tile starting at output pixel a covers [a + c0, a + c1): the field
    # [0, npix) needs a <= -c0 (first) and a >= npix - c1 (last).
    first, last = -c0, npix - c1
    if last <= first:  # one tile: as near the middle of the input as the coverage allows
        starts = (min(max(half - centre, last), first),)
    else:
        step = max(int((c1 - c0) * (1.0 - TILE_OVERLAP)), 1)
        n = int(np.ceil((last - first) / step)) + 1
        starts = tuple(int(round(first + i * (last - first) / (n - 1))) for i in range(n))
    return FieldGeometry(npix, p, starts, config, stride, border)


def _grid_at(x, y, e1, e2, sigma, x0, y0, npix, config):
    return grid_catalog(x - x0, y - y0, e1, e2, sigma, npix=npix, pixel_arcsec=config.pixel_arcsec,
                        fwhm_arcsec=config.fwhm_arcsec, cut_sigma=config.kernel_cut_sigma,
                        empty_error=config.empty_pixel_error)


def grid_field(x, y, e1, e2, sigma, geometry):
    """The catalog gridded on the field's own input-resolution grid (§2.3.2).

    Parameters
    ----------
    x, y : array_like, shape (n,)
        Arcsec from the field centre (x West, y North).
    e1, e2, sigma : array_like, shape (n,)
        Plane-frame ellipticity and per-component error.
    geometry : FieldGeometry

    Returns
    -------
    numpy.ndarray, shape (4, pool·npix, pool·npix)
        (ε̄1, ε̄2, Δε, n) of :func:`grid_catalog`; output pixel k covers input
        pixels [pool·k, pool·(k + 1)), so :func:`block_mean` puts any channel
        on the output grid.
    """
    cfg = geometry.config
    origin = -geometry.npix / 2 * geometry.pixel_arcsec
    return _grid_at(x, y, e1, e2, sigma, origin, origin, cfg.pool * geometry.npix, cfg)


def grid_tile(x, y, e1, e2, sigma, geometry, start_y, start_x):
    """The catalog gridded on the 32′ network input of one tile (``config.npix``²).

    Sources beyond the tile add nothing; input pixels without a source carry
    the no-data values of :func:`grid_catalog`.
    """
    cfg = geometry.config
    return _grid_at(x, y, e1, e2, sigma, geometry.tile_origin_arcsec(start_x),
                    geometry.tile_origin_arcsec(start_y), cfg.npix, cfg)


def noise_fill(x, y, e1, e2, sigma, geometry, rng):
    """Shear-free noise sources wherever the catalog has none, over every tile's input.

    Parameters
    ----------
    x, y, e1, e2, sigma : array_like, shape (n,)
        The field's sources, as :func:`grid_field` (arcsec from the centre,
        plane-frame ellipticity, per-component error); sources outside the
        field are ignored.
    geometry : FieldGeometry
    rng : numpy.random.Generator

    Returns
    -------
    tuple of numpy.ndarray, shape (m,)
        ``(x, y, e1, e2, sigma)`` of the fill sources.

    Notes
    -----
    Where: everywhere outside the field that a tile's 32′ input (plus the
    gridding kernel's reach) covers, and inside the field every cell that
    holds no source.  The cells tile the field from its lower-left corner
    with a side of whole output pixels big enough to hold
    :data:`FILL_CELL_SOURCES` sources at the catalog's density (the last
    cell of a row or column ends at the field's edge), so a cell without a
    source is a hole of the footprint (a masked star, a chip gap, a round
    field's corners) rather than a Poisson gap.

    What: Poisson(n̄ A) sources uniform in each area A, n̄ the catalog's
    density (over the cells whose eight neighbours hold data too: a cell on
    the edge of a hole or of the footprint is only partly covered);
    each takes the ellipticity and error of a random catalog source, turned
    by a random angle ψ (ε → ε e^{2iψ}, ψ uniform in [0, π)).  That keeps the
    catalog's noise (the distribution of |ε| and σ) and removes its shear:
    ⟨ε⟩ = 0 in the fill, the same assumption, γ = 0 beyond the data, as the
    zero padding of KS93 (eq. 10).  Rotated galaxies are the usual
    weak-lensing noise realisation (e.g. Van Waerbeke et al. 2000).
    """
    _check_rng(rng)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    e = np.asarray(e1, np.float64) + 1j * np.asarray(e2, np.float64)
    sigma = np.asarray(sigma, np.float64)
    cfg, p = geometry.config, geometry.pixel_arcsec
    half = geometry.npix / 2 * p
    with np.errstate(invalid="ignore"):
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    n_field = int(inside.sum())
    if n_field == 0:
        raise ValueError("noise_fill: no source inside the field")
    x, y, e, sigma = x[inside], y[inside], e[inside], sigma[inside]

    # Cells of the field: the side from the density over the whole field (an
    # upper bound on the cell the true density needs); a last cell shorter
    # than half a side joins its neighbour.
    side = max(1, int(np.ceil(np.sqrt(FILL_CELL_SOURCES * (2 * half) ** 2 / n_field) / p)))
    k = list(range(0, geometry.npix, side)) + [geometry.npix]
    if len(k) > 2 and k[-1] - k[-2] < side / 2:
        del k[-2]
    edges = np.asarray(k) * p - half
    counts, _, _ = np.histogram2d(y, x, bins=(edges, edges))
    widths = np.diff(edges)
    area = widths[:, None] * widths[None, :]
    # Density over the cells wholly inside the data: a cell on the edge of a
    # hole or of the footprint holds data over only part of its area.
    occupied = counts > 0
    interior = scipy.ndimage.binary_erosion(occupied, np.ones((3, 3), bool), border_value=0)
    use = interior if interior.any() else occupied
    density = counts[use].sum() / area[use].sum()  # per arcsec²

    reach = cfg.kernel_cut_sigma * cfg.sigma_w_arcsec  # a source beyond this adds nothing to a tile
    lo = min(geometry.tile_origin_arcsec(a) for a in geometry.tile_starts) - reach
    hi = max(geometry.tile_origin_arcsec(a) for a in geometry.tile_starts) + cfg.npix * cfg.pixel_arcsec + reach
    n_box = rng.poisson(density * (hi - lo) ** 2)
    bx, by = rng.uniform(lo, hi, n_box), rng.uniform(lo, hi, n_box)
    out = (np.abs(bx) > half) | (np.abs(by) > half)
    iy, ix = np.nonzero(counts == 0)
    n_hole = rng.poisson(density * area[iy, ix])
    hx = np.repeat(edges[ix], n_hole) + rng.uniform(0.0, 1.0, n_hole.sum()) * np.repeat(widths[ix], n_hole)
    hy = np.repeat(edges[iy], n_hole) + rng.uniform(0.0, 1.0, n_hole.sum()) * np.repeat(widths[iy], n_hole)
    fx, fy = np.concatenate([bx[out], hx]), np.concatenate([by[out], hy])
    pick = rng.integers(0, n_field, len(fx))
    fe = e[pick] * np.exp(2j * rng.uniform(0.0, np.pi, len(fx)))
    return fx, fy, fe.real, fe.imag, sigma[pick]


def block_mean(a, pool):
    """Mean over ``pool`` × ``pool`` blocks of the last two axes (sides divisible by ``pool``)."""
    a = np.asarray(a, dtype=np.float64)
    ny, nx = a.shape[-2:]
    if ny % pool or nx % pool:
        raise ValueError(f"map sides {a.shape[-2:]} are not multiples of {pool}")
    return a.reshape(a.shape[:-2] + (ny // pool, pool, nx // pool, pool)).mean(axis=(-3, -1))


def ks93_field_map(field_grid, geometry, fwhm_arcmin=KS93_MAP_FWHM_ARCMIN):
    """KS93 of the field's gridded shear on the output grid (the KAPPA_KS93 map).

    Parameters
    ----------
    field_grid : array_like, shape (≥2, pool·npix, pool·npix)
        From :func:`grid_field`.
    geometry : FieldGeometry
    fwhm_arcmin : float
        Gaussian smoothing FWHM (:data:`KS93_MAP_FWHM_ARCMIN`; 0: none).

    Returns
    -------
    numpy.ndarray, shape (npix, npix)

    Notes
    -----
    As the §3 baseline (:func:`ks93_mosaic`): eq. 10 on the gridded ε̄ with
    zero padding to twice the field (the field is all the data: no tiles),
    :func:`smooth_map`, then the mean over each output pixel's input pixels.
    The k = 0 mode is zero over the padded field (mass-sheet degeneracy).
    """
    g = np.asarray(field_grid)
    cfg = geometry.config
    return block_mean(smooth_map(ks93(g[0], g[1]), fwhm_arcmin, cfg), cfg.pool)


def cnn_field_map(x, y, e1, e2, sigma, models, geometry, orientations=1, batch_size=MOSAIC_BATCH,
                  progress=False):
    """CNN mosaics of K runs on the field's output grid, tile by tile (§2.3.2, §4.2).

    Parameters
    ----------
    x, y, e1, e2, sigma : array_like, shape (n,)
        As :func:`grid_field`.
    models : sequence of keras.Model or callable
        The K runs (callables on batches of subfields, as :func:`predict_mosaic`).
    geometry : FieldGeometry
    orientations : int, str or sequence of str
        As :func:`predict_mosaic` (1: as observed; 6: the paper's).
    batch_size : int
    progress : bool
        A progress bar over tiles (when there are several).

    Returns
    -------
    MosaicRuns
        On the output grid (npix, npix): ``mean`` over runs, ``std`` (ddof
        = 1; 0 for one run), ``count`` of subfield predictions per pixel
        (all tiles together), ``runs`` (K, npix, npix).  NaN where no
        subfield reached (none, by construction of :func:`field_geometry`).

    Notes
    -----
    Each tile's mosaic (:func:`predict_mosaic_runs`) is the mean of its
    subfield predictions; tiles are combined as the sum of predictions over
    the sum of counts, so that every subfield prediction of every tile counts
    once, as inside one mosaic.
    """
    models = list(models)
    cfg, n, m = geometry.config, geometry.npix, geometry.config.mosaic_npix
    total = np.zeros((len(models), n, n))
    count = np.zeros((n, n), dtype=np.int64)
    tiles = [(sy, sx) for sy in geometry.tile_starts for sx in geometry.tile_starts]
    bar = _Progress(len(tiles), "tiles") if progress and len(tiles) > 1 else None
    for sy, sx in tiles:
        grid = grid_tile(x, y, e1, e2, sigma, geometry, sy, sx)
        res = predict_mosaic_runs(models, grid, cfg, stride=geometry.stride, orientations=orientations,
                                  batch_size=batch_size, border_pix=geometry.border_pix)
        oy = slice(max(sy, 0), min(sy + m, n))
        ox = slice(max(sx, 0), min(sx + m, n))
        ty = slice(oy.start - sy, oy.stop - sy)
        tx = slice(ox.start - sx, ox.stop - sx)
        c = res.count[ty, tx]
        total[:, oy, ox] += np.where(c > 0, res.runs[:, ty, tx], 0.0) * c
        count[oy, ox] += c
        if bar:
            bar.update()
    runs = np.full(total.shape, np.nan)
    has = count > 0
    runs[:, has] = total[:, has] / count[has]
    return _mosaic_runs(runs, count)


def _check_n_fills(n_fills):
    """``n_fills`` as an int, or a ValueError (a bool or a fraction is no count)."""
    if isinstance(n_fills, (bool, np.bool_)) or not isinstance(n_fills, (int, np.integer)) or n_fills < 1:
        raise ValueError(f"n_fills must be a whole number >= 1, got {n_fills!r}")
    return int(n_fills)


def filled_cnn_map(x, y, e1, e2, sigma, models, geometry, rng, n_fills=NOISE_FILLS, orientations=1,
                   batch_size=MOSAIC_BATCH, progress=False):
    """CNN mosaics of K runs with the catalog's gaps filled by shear-free noise (§4.2).

    Parameters
    ----------
    x, y, e1, e2, sigma : array_like, shape (n,)
        The field's sources, as :func:`grid_field`.
    models, geometry, orientations, batch_size
        As :func:`cnn_field_map`.
    rng : numpy.random.Generator
        Draws the fills (:func:`noise_fill`).
    n_fills : int
        Fills averaged for each run (:data:`NOISE_FILLS`).
    progress : bool
        A progress bar over fills.

    Returns
    -------
    MosaicRuns
        As :func:`cnn_field_map`, each run's map the mean over its fills.
    float
        The fill's own noise left in ``mean``: the median over pixels of the
        standard error of the mean over fills (NaN for one fill).

    Notes
    -----
    Every run sees the same fills, so the spread over runs (``std``) is the
    networks' alone, as in §2.3.2.
    """
    n_fills = _check_n_fills(n_fills)
    src = tuple(np.asarray(a, np.float64) for a in (x, y, e1, e2, sigma))
    bar = _Progress(n_fills, "noise fills") if progress else None
    maps, res = [], None
    for _ in range(n_fills):
        fill = noise_fill(*src, geometry, rng)
        res = cnn_field_map(*(np.concatenate([a, b]) for a, b in zip(src, fill)), models, geometry,
                            orientations=orientations, batch_size=batch_size)
        maps.append(res.runs)
        if bar:
            bar.update()
    maps = np.asarray(maps)  # (fills, K, npix, npix)
    fill_err = (float(np.nanmedian(maps.mean(axis=1).std(axis=0, ddof=1))) / np.sqrt(n_fills)
                if n_fills > 1 else float("nan"))
    return _mosaic_runs(maps.mean(axis=0), res.count), fill_err


def _as_models(models):
    """Keras models from a path, a model, or a sequence of either (:func:`load_runs`)."""
    if isinstance(models, (str, os.PathLike, keras.Model)):
        models = [models]
    out = []
    for item in models:
        out.extend([item] if isinstance(item, keras.Model) else load_runs(item))
    if not out:
        raise ValueError("no models")
    return out


def check_models(models, config=None):
    """Load the models and check that they can share one gridded catalog.

    Parameters
    ----------
    models : path, keras.Model, or a sequence of them
        Run directories, .keras files (:func:`load_runs`) or models.
    config : Config, optional
        The grid the caller means to use; default the models'.

    Returns
    -------
    models : list of keras.Model
    config : Config
    info : dict
        The first model's :func:`model_info`.

    Raises
    ------
    ValueError
        A model without a wlcnn description; input channels other than the
        3 (ε̄1, ε̄2, Δε) or 4 (+ n) the gridding makes, or differing from its
        input layer; models that differ in channels, grid (:data:`GRID_FIELDS`)
        or training skies (:data:`TRAINING_FIELDS`); a ``config`` whose grid
        is not the models'.
    """
    models = _as_models(models)
    infos = [model_info(mdl) for mdl in models]
    first = infos[0]
    for mdl, info in zip(models, infos):
        if info["channels"] not in (3, 4):
            raise ValueError(f"model {mdl.name!r} expects {info['channels']} input channels; the gridded "
                             "catalog has 4 (ε̄1, ε̄2, Δε, n) and models take 3 or 4 of them")
        if int(mdl.input_shape[-1]) != info["channels"]:
            raise ValueError(f"model {mdl.name!r}: its input layer has {mdl.input_shape[-1]} channels but "
                             f"its description says {info['channels']}")
        if info["channels"] != first["channels"]:
            raise ValueError(f"the models differ in input channels ({first['channels']} and "
                             f"{info['channels']}): give the runs of one variant")
        for names, what in ((GRID_FIELDS, "grid"), (TRAINING_FIELDS, "training skies")):
            diff = {k: (first["config"][k], info["config"][k]) for k in names
                    if first["config"][k] != info["config"][k]}
            if diff:
                raise ValueError(f"the models differ in {what}: {diff}")
    model_config = config_from_dict(first["config"])
    if config is None:
        config = model_config
    else:
        diff = {k: (getattr(config, k), getattr(model_config, k)) for k in GRID_FIELDS
                if getattr(config, k) != getattr(model_config, k)}
        if diff:
            raise ValueError(f"the models were built for another grid than the data's; (data, model): {diff}")
    return models, config, first


def redshift_info(config, z_lens=None, z_source=None):
    """Redshifts of the data and of the training, and their Σ_c (eq. 4).

    Parameters
    ----------
    config : Config
        The models' (training redshifts ``z_lens``, ``z_source``, cosmology).
    z_lens, z_source : float, optional
        The cluster's redshift and the catalog's (effective) source redshift;
        each defaults to the training one.

    Returns
    -------
    dict
        ``z_lens``, ``z_source``, ``z_lens_train``, ``z_source_train``,
        ``sigma_crit`` and ``sigma_crit_train`` (M☉/Mpc²), ``ratio`` =
        Σ_c(train) / Σ_c(data), and ``differs`` (bool).

    Notes
    -----
    The κ maps are *not* rescaled by this ratio.  A shear catalog measures
    κ = Σ/Σ_c of its own sources whatever the redshifts: γ and κ are both Σ
    over the same Σ_c, and KS93 (eq. 10) and the network, which learnt the
    same geometric map from shear to κ, never see Σ_c.  So KAPPA_* are the
    convergence of the catalog's sources, Σ = κ Σ_c(data); κ for the
    training's sources would be κ / ratio.  What the redshifts do change is
    the network's prior (cluster sizes and κ range of the training skies),
    one of the three mismatches §4.2 tests; a header note says so.
    """
    zl_t, zs_t = float(config.z_lens), float(config.z_source)
    zl = zl_t if z_lens is None else float(z_lens)
    zs = zs_t if z_source is None else float(z_source)
    cosmo = cosmology(config)
    sc = sigma_crit(zl, zs, cosmo).to_value(u.Msun / u.Mpc**2)
    sc_t = sigma_crit(zl_t, zs_t, cosmo).to_value(u.Msun / u.Mpc**2)
    return {"z_lens": zl, "z_source": zs, "z_lens_train": zl_t, "z_source_train": zs_t,
            "sigma_crit": sc, "sigma_crit_train": sc_t, "ratio": sc_t / sc,
            "differs": not (np.isclose(zl, zl_t) and np.isclose(zs, zs_t))}


class Reconstruction(NamedTuple):
    """What :func:`reconstruct` made (all maps on the output grid, [y, x])."""
    kappa_cnn: np.ndarray      #: (npix, npix) mean over runs
    kappa_cnn_std: np.ndarray  #: (npix, npix) standard deviation over runs (ddof = 1)
    kappa_ks93: np.ndarray     #: (npix, npix) smoothed KS93
    density: np.ndarray        #: (npix, npix) sources per arcmin²
    runs: np.ndarray           #: (K, npix, npix) each run's map
    wcs: object                #: astropy.wcs.WCS of the maps
    geometry: FieldGeometry
    center: tuple              #: (RA, Dec) of the field centre, degrees
    counts: dict               #: rows read, dropped (by reason), outside the field, used
    redshifts: dict            #: :func:`redshift_info`
    fill: dict                 #: how no-data regions were treated: mode; n, seed, err (noise)
    path: str                  #: the FITS file
    png_path: object           #: the PNG, or None


def map_wcs(center, geometry):
    """Celestial WCS of the output grid: TAN about ``center``, x (columns) towards West.

    The centre lies on the corner between pixels npix/2 − 1 and npix/2
    (0-based), i.e. FITS pixel npix/2 + 1/2.
    """
    c = geometry.npix / 2 + 0.5
    return tangent_plane_wcs(center, geometry.pixel_arcsec, crpix=(c, c))


def _map_hdus(result_maps, wcs, cards):
    """The four image extensions with their WCS, BUNIT and notes."""
    notes = {
        "KAPPA_CNN": ("", "convergence kappa = Sigma/Sigma_crit, mean of the runs",
                      "CNN of Hong et al. (2021), mean over independent runs (Sec. 2.3.2)"),
        "KAPPA_CNN_STD": ("", "standard deviation of kappa over the runs",
                          "sample std (ddof=1) over runs: the CNN's error estimate (Sec. 2.3.2)"),
        "KAPPA_KS93": ("", "convergence from Kaiser & Squires (1993), eq. 10",
                       "KS93 of the gridded shear, zero-padded, Gaussian-smoothed (KS93FWHM)"),
        "DENSITY": ((u.arcmin ** -2).to_string("fits"), "sources per arcmin2",
                    "7-arcsec-FWHM smoothed source density, mean over each pixel (Sec. 2.3.2)"),
    }
    hdus = []
    for name, data in zip(MAP_EXTENSIONS, result_maps):
        h = wcs.to_header()
        bunit, comment, note = notes[name]
        h["BUNIT"] = (bunit, comment)
        h["COMMENT"] = note
        for key, value in cards.get(name, []):
            h[key] = value
        hdus.append(fits.ImageHDU(np.asarray(data, dtype=np.float32), header=h, name=name))
    return hdus


def _write_fits(path, hdul):
    """Write ``hdul`` atomically (temporary file, then os.replace); gzip if ``path`` ends in .gz."""
    def write(tmp):
        if path.endswith(".gz"):
            with gzip.open(tmp, "wb") as f:
                hdul.writeto(f)
        else:
            hdul.writeto(tmp)
    _atomic_write(path, write)


def _png_path(path):
    stem = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(stem)[0] + ".png"


def figure_reconstruction(kappa_ks93, kappa_cnn, kappa_cnn_std, wcs, path, title=None):
    """A figure like Fig. 11: KS93, the CNN mean and its standard deviation.

    Parameters
    ----------
    kappa_ks93, kappa_cnn, kappa_cnn_std : array_like, shape (npix, npix)
    wcs : astropy.wcs.WCS
        Of the maps (RA/Dec axes; North up, East left).
    path : str
        PNG file, written atomically.
    title : str, optional

    Notes
    -----
    KS93 and the CNN share one colour scale, so the dynamic ranges compare
    directly (the first point §4.2 makes about Fig. 11).
    """
    from matplotlib.figure import Figure  # optional dependency: ImportError is the caller's to handle
    both = np.concatenate([np.ravel(kappa_ks93), np.ravel(kappa_cnn)])
    both = both[np.isfinite(both)]
    vmin, vmax = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    fig = Figure(figsize=(3 * RECON_PANEL_INCH, RECON_PANEL_INCH), layout="constrained")
    panels = (("KS93", kappa_ks93, (vmin, vmax), "κ"), ("CNN (mean of runs)", kappa_cnn, (vmin, vmax), "κ"),
              ("CNN standard deviation", kappa_cnn_std, (None, None), "σ_κ"))
    for i, (name, data, (lo, hi), label) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1, projection=wcs)
        im = ax.imshow(data, origin="lower", cmap=MAP_CMAP, vmin=lo, vmax=hi)
        ax.set_title(name)
        if i == 2 and not np.any(np.nan_to_num(data)):
            ax.text(0.5, 0.5, "one run: no spread", transform=ax.transAxes, ha="center", color="w")
        ax.coords[0].set_axislabel("RA")
        ax.coords[1].set_axislabel("Dec")
        fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    if title:
        fig.suptitle(title)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=RECON_DPI))
    return path


def _primary_header(source, coordinate_system, center, geometry, counts, info, n_runs, n_orient,
                    ks93_fwhm_arcmin, z, config, fill):
    """Primary header of a reconstruction: provenance, counts, mosaic settings, redshifts."""
    primary = fits.Header()
    primary["CREATOR"] = (f"wlcnn {__version__}", "Hong et al. (2021) CNN, Sec. 4.2 application")
    primary["DATE"] = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "UTC of the reconstruction")
    primary["CATALOG"] = (source, "input shear catalog")
    primary["ECOORD"] = (coordinate_system, "frame of the input e1, e2 (CLMM names)")
    primary["RA_CEN"] = (center[0], "[deg] field centre (ICRS), tangent point")
    primary["DEC_CEN"] = (center[1], "[deg] field centre (ICRS)")
    primary["FIELD"] = (geometry.side_arcmin, "[arcmin] side of the square field")
    primary["PIXSCALE"] = (geometry.pixel_arcsec, "[arcsec] map pixel (3 x 3.84 arcsec)")
    for key, name, comment in (("NROWS", "rows", "rows in the catalog"),
                               ("NDRNAN", "dropped_nan", "rows dropped: NaN/inf or empty entries"),
                               ("NDRWGT", "dropped_weight", "rows dropped: weight <= 0 or bad sigma"),
                               ("NDRELL", "dropped_ellipticity", f"rows dropped: |e| >= {MAX_ELLIPTICITY:g}"),
                               ("NOUTSIDE", "outside_field", "sources outside the field, not used"),
                               ("NSOURCE", "used", "sources used")):
        primary[key] = (counts[name], comment)
    primary["NRUNS"] = (n_runs, "CNN runs averaged (KAPPA_CNN, KAPPA_CNN_STD)")
    primary["VARIANT"] = (info["variant"], "network variant (Appendix A)")
    primary["CHANNELS"] = (info["channels"], "network input channels")
    primary["NTILES"] = (geometry.n_tiles, "32-arcmin network inputs covering the field")
    primary["STRIDE"] = (geometry.stride, "[input pix] mosaic offset step (paper: 3)")
    primary["NORIENT"] = (n_orient, "orientations averaged (paper: 6)")
    primary["KS93FWHM"] = (float(ks93_fwhm_arcmin), "[arcmin] Gaussian smoothing of KAPPA_KS93")
    primary["OUTSIDE"] = (fill["mode"], "CNN input without sources: noise fill or empty")
    if fill["mode"] == "noise":
        primary["NFILLS"] = (fill["n"], "shear-free noise fills averaged per run")
        primary["FILLSEED"] = (fill["seed"], "seed of the noise fills")
        primary["FILLERR"] = (fill["err"] if np.isfinite(fill["err"]) else "n/a",
                              "median std error of KAPPA_CNN from the fills")
    primary["Z_LENS"] = (z["z_lens"], "lens (cluster) redshift of the data")
    primary["Z_SOURCE"] = (z["z_source"], "effective source redshift of the data")
    primary["ZL_TRAIN"] = (z["z_lens_train"], "lens redshift of the training skies")
    primary["ZS_TRAIN"] = (z["z_source_train"], "source redshift of the training skies")
    primary["SIGCRIT"] = (z["sigma_crit"], "[Msun/Mpc2] Sigma_crit(Z_LENS, Z_SOURCE), eq. 4")
    primary["SIGCRTRN"] = (z["sigma_crit_train"], "[Msun/Mpc2] Sigma_crit of the training")
    primary["SCRATIO"] = (z["ratio"], "SIGCRTRN / SIGCRIT; kappa NOT rescaled by it")
    primary["H0"] = (config.H0, "[km/s/Mpc] flat LCDM of Sigma_crit")
    primary["OM0"] = (config.Om0, "matter density of Sigma_crit")
    for line in ("KAPPA_* are the convergence of the catalog's own sources: a shear",
                 "catalog measures kappa = Sigma/Sigma_crit(Z_LENS, Z_SOURCE) whatever",
                 "the redshifts, so the maps are not rescaled by SCRATIO.",
                 "Sigma = kappa * SIGCRIT; kappa for the training's sources would be",
                 "kappa / SCRATIO."):
        primary["HISTORY"] = line
    if z["differs"]:
        primary["HISTORY"] = "The data's redshifts differ from the training's: the network's prior"
        primary["HISTORY"] = "(cluster sizes, kappa range) is the training's (Hong+2021, Sec. 4.2)."
    return primary


def reconstruct(catalog, models, out_path, ra_col="ra", dec_col="dec", e1_col="e1", e2_col="e2",
                weight_col="weight", sigma_col=None, coordinate_system="euclidean", center=None,
                size_arcmin=None, z_lens=None, z_source=None, stride=12, orientations=1, config=None,
                ks93_fwhm_arcmin=KS93_MAP_FWHM_ARCMIN, outside="noise", n_fills=NOISE_FILLS, seed=0,
                png=True, overwrite=False, progress=False):
    """Mass maps of a real shear catalog: the §4.2 application as one call.

    Parameters
    ----------
    catalog : str, os.PathLike or astropy.table.Table
        Sources in sky coordinates (:func:`read_catalog`): FITS, CSV or ECSV.
    models : path, keras.Model, or a sequence of them
        The K runs: a train output directory, a directory of .keras files, a
        .keras file (:func:`load_runs`), or models.
    out_path : str or os.PathLike
        Output FITS file (".fits" or ".fits.gz"); the PNG goes beside it
        with the suffix ".png".
    ra_col, dec_col, e1_col, e2_col, weight_col, sigma_col, coordinate_system
        Columns and the frame of (e1, e2), as :func:`read_catalog`.
    center : (float, float), optional
        Field centre (RA, Dec) in degrees; default :func:`catalog_center`.
    size_arcmin : float, optional
        Side of the square field, arcmin; default the catalog's extent about
        the centre (twice the largest |x| or |y|).  Rounded up to an even
        number of 11.52″ pixels.  Sources outside it are not used (counted).
    z_lens, z_source : float, optional
        Cluster and effective source redshift; default the training's.  Only
        recorded (with Σ_c) — see :func:`redshift_info` for why κ is not
        rescaled.
    stride : int
        Offset step of each tile's mosaic in input pixels, a multiple of 3:
        12 (default; 100 subfields a tile) or the paper's 3 (1,444).
    orientations : int
        1 (default) or the paper's 6 (:func:`mosaic_orientations`).
    config : Config, optional
        Grid of the data; default the models' (a different grid is an error).
    ks93_fwhm_arcmin : float
        Smoothing of KAPPA_KS93 (:data:`KS93_MAP_FWHM_ARCMIN`).
    outside : {"noise", "empty"}
        What the network sees where the catalog has no source
        (:data:`OUTSIDE_MODES`; see Notes).
    n_fills : int
        Noise fills averaged per run ("noise" only; :data:`NOISE_FILLS`).
    seed : int
        Seed of the fills: the same seed gives the same maps.
    png : bool
        Also draw the Fig. 11-like PNG (skipped, with a warning, without
        matplotlib).
    overwrite : bool
        Replace an existing ``out_path``.
    progress : bool
        A progress bar over tiles.

    Returns
    -------
    Reconstruction

    Raises
    ------
    ValueError
        Bad catalogs (:func:`read_catalog`), no source inside the field,
        models that do not fit the data (:func:`check_models`), bad stride or
        orientations.
    FileExistsError
        ``out_path`` exists and ``overwrite`` is False.

    Notes
    -----
    §4.2 applies the CNN, trained on 32′ fields, to the ~9′ HST field of El
    Gordo.  The catalog is projected on the tangent plane about the centre
    (TAN, x West, y North; ellipticities rotated to the plane's axes by
    :func:`local_north_angle`), gridded on each 32′ tile's input grid with
    the field in the middle (:func:`field_geometry`: a field wider than one
    tile's mosaic is tiled with overlapping tiles whose mosaics are
    averaged), and predicted by each run (:func:`cnn_field_map`).  KAPPA_KS93
    is the KS93 of the same gridding over the field (:func:`ks93_field_map`);
    DENSITY the mean of the gridded source density n over each pixel.  All
    four maps share the output grid (11.52″ pixels) and its celestial WCS.
    The file is written to a temporary name and renamed: complete or absent.

    Beyond the field (and in its holes) there are no sources.  The training
    skies have sources everywhere, and the network answers a no-data region
    (``outside="empty"``) with artefacts: on the 10′ El Gordo-like catalog
    of ``examples/el_gordo_like.py`` (95 arcmin⁻², the quick model), a
    lumpy +0.1 sheet over the outskirts and 9 local maxima above 3σ of the
    KS93 noise (KS93 itself: 1), and the same lumps on a shear-free catalog,
    so they are the network's reply to the data's edge.  By default
    (``outside="noise"``) those regions hold shear-free shape noise at the
    catalog's own density (:func:`noise_fill`), in-distribution for the
    network; KAPPA_CNN is the mean over ``n_fills`` fills (FILLERR in the
    header: the fill's noise left in it).  This assumes γ = 0 beyond the
    data, as the zero padding of KAPPA_KS93 does.
    """
    out_path = os.fspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f"{out_path} exists (pass overwrite=True / --overwrite to replace it)")
    if coordinate_system not in COORDINATE_SYSTEMS:  # before loading anything
        raise ValueError(f"unknown coordinate_system {coordinate_system!r}; one of {COORDINATE_SYSTEMS}")
    if outside not in OUTSIDE_MODES:
        raise ValueError(f"unknown outside mode {outside!r}; one of {OUTSIDE_MODES}")
    if outside == "noise":
        n_fills = _check_n_fills(n_fills)
    models, config, info = check_models(models, config)
    n_orient = len(mosaic_orientations(orientations))  # the cheap checks before any gridding
    z = redshift_info(config, z_lens, z_source)
    sky = read_catalog(catalog, ra_col, dec_col, e1_col, e2_col, weight_col, sigma_col, coordinate_system)
    center = catalog_center(sky.ra, sky.dec) if center is None else tuple(float(v) for v in center)
    if len(center) != 2:
        raise ValueError(f"center must be (RA, Dec) in degrees, got {center}")
    x, y, e1, e2 = project_catalog(sky, center)
    if size_arcmin is None:
        extent = 2.0 * np.nanmax(np.maximum(np.abs(x), np.abs(y))) / 60.0
        if not extent > 0:
            raise ValueError("the catalog has no extent on the sky (one position): give size_arcmin")
        size_arcmin = extent
    geometry = field_geometry(size_arcmin, config, stride)
    half = geometry.npix / 2 * geometry.pixel_arcsec
    with np.errstate(invalid="ignore"):
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    counts = dict(sky.counts, outside_field=int((~inside).sum()), used=int(inside.sum()))
    if not inside.any():
        raise ValueError(f"{sky.source}: none of the {len(x)} sources lies inside the "
                         f"{geometry.side_arcmin:.2f}′ field about RA {center[0]:.5f}°, "
                         f"Dec {center[1]:.5f}°")
    if counts["outside_field"]:
        warnings.warn(f"{sky.source}: {counts['outside_field']} sources lie outside the "
                      f"{geometry.side_arcmin:.2f}′ field and are not used", CatalogWarning, stacklevel=2)
    src = (x[inside], y[inside], e1[inside], e2[inside], sky.sigma[inside])

    field = grid_field(*src, geometry)
    kappa_ks93 = ks93_field_map(field, geometry, ks93_fwhm_arcmin)
    density = block_mean(field[3], config.pool)
    fill = {"mode": outside}
    if outside == "noise":
        rng = np.random.default_rng(seed)
        cnn, fill_err = filled_cnn_map(*src, models, geometry, rng, n_fills, orientations=orientations,
                                       progress=progress)
        fill.update(n=n_fills, seed=int(seed), err=fill_err)
    else:
        cnn = cnn_field_map(*src, models, geometry, orientations=orientations, progress=progress)
    if z["differs"]:
        warnings.warn(f"the models were trained for z_l = {z['z_lens_train']:g}, z_s = {z['z_source_train']:g}; "
                      f"the data are at z_l = {z['z_lens']:g}, z_s = {z['z_source']:g}.  κ is that of the "
                      "catalog's sources (not rescaled; see the FITS header)", UserWarning, stacklevel=2)
    wcs = map_wcs(center, geometry)

    primary = _primary_header(sky.source, coordinate_system, center, geometry, counts, info, len(models),
                              n_orient, ks93_fwhm_arcmin, z, config, fill)
    cnn_cards = [("NRUNS", (len(models), "CNN runs")),
                 ("STRIDE", (geometry.stride, "[input pix] mosaic offset step")),
                 ("NORIENT", (n_orient, "orientations averaged"))]
    hdul = fits.HDUList([fits.PrimaryHDU(header=primary)] + _map_hdus(
        (cnn.mean, cnn.std, kappa_ks93, density), wcs,
        {"KAPPA_CNN": cnn_cards, "KAPPA_CNN_STD": cnn_cards,
         "KAPPA_KS93": [("KS93FWHM", (float(ks93_fwhm_arcmin), "[arcmin] Gaussian smoothing FWHM"))]}))
    _write_fits(out_path, hdul)

    png_path = None
    if png:
        try:
            png_path = figure_reconstruction(kappa_ks93, cnn.mean, cnn.std, wcs, _png_path(out_path),
                                             title=f"{sky.source}: {counts['used']} sources, "
                                                   f"{len(models)} run(s)")
        except ImportError:
            warnings.warn("matplotlib is not installed: no PNG (pip install matplotlib, or the "
                          "'plot' extra)", UserWarning, stacklevel=2)
    return Reconstruction(cnn.mean, cnn.std, kappa_ks93, density, cnn.runs, wcs, geometry, center, counts,
                          z, fill, out_path, png_path)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _parse_center(text):
    """``--center``: "RA,DEC" in degrees, or sexagesimal "HH:MM:SS.s,±DD:MM:SS"."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--center takes RA,DEC, got {text!r}")
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    from astropy.coordinates import SkyCoord
    try:
        c = SkyCoord(parts[0], parts[1], unit=(u.hourangle, u.deg))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--center: cannot read {text!r} as degrees or "
                                         "HH:MM:SS,±DD:MM:SS") from None
    return float(c.ra.deg), float(c.dec.deg)


def _cmd_reconstruct(args):
    """Mass map of a shear catalog in sky coordinates (§4.2)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        res = reconstruct(args.catalog, args.models, args.out, ra_col=args.ra_col, dec_col=args.dec_col,
                          e1_col=args.e1_col, e2_col=args.e2_col,
                          weight_col=None if args.sigma_col else (args.weight_col or "weight"),
                          sigma_col=args.sigma_col, coordinate_system=args.coordinate_system,
                          center=args.center, size_arcmin=args.size, z_lens=args.z_lens,
                          z_source=args.z_source, stride=args.stride, orientations=args.orientations,
                          ks93_fwhm_arcmin=args.ks93_fwhm, outside=args.outside, n_fills=args.fills,
                          seed=args.seed, png=not args.no_png, overwrite=args.overwrite, progress=True)
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"reconstruct_catalog: note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    c, g = res.counts, res.geometry
    print(f"{args.catalog}: {c['used']} sources used of {c['rows']} rows (dropped: {c['dropped_nan']} NaN, "
          f"{c['dropped_weight']} bad weight, {c['dropped_ellipticity']} |e| >= {MAX_ELLIPTICITY:g}; "
          f"{c['outside_field']} outside the field)")
    print(f"field: {g.side_arcmin:.2f}′ about RA {res.center[0]:.5f}°, Dec {res.center[1]:.5f}° "
          f"({g.npix}² pixels of {g.pixel_arcsec:.2f}″, {g.n_tiles} tile(s), {len(res.runs)} run(s))")
    if res.fill["mode"] == "noise":
        print(f"no-data regions: shear-free noise at the catalog's density, {res.fill['n']} fill(s) "
              f"(seed {res.fill['seed']}; their noise left in KAPPA_CNN: {res.fill['err']:.4f} median)")
    else:
        print("no-data regions: empty (no-data pixels)")
    print(f"wrote {res.path} ({', '.join(MAP_EXTENSIONS)})" + (f" and {res.png_path}" if res.png_path else ""))
    return 0


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description="mass maps of a shear catalog in sky coordinates (§4.2)")
    p.add_argument("catalog", help="FITS, CSV or ECSV table: RA, Dec (deg), e1, e2, weight or sigma")
    p.add_argument("--models", required=True, nargs="+", help="run directories or .keras files")
    p.add_argument("--out", required=True, help="output FITS (KAPPA_CNN, KAPPA_CNN_STD, KAPPA_KS93, "
                                                "DENSITY); a PNG like Fig. 11 goes beside it")
    p.add_argument("--ra-col", default="ra", help="RA column in degrees (names match case-insensitively)")
    p.add_argument("--dec-col", default="dec", help="Dec column in degrees")
    p.add_argument("--e1-col", default="e1")
    p.add_argument("--e2-col", default="e2")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weight-col", default=None,
                   help="inverse-variance weight, σ = 1/sqrt(w) (default: weight)")
    g.add_argument("--sigma-col", default=None, help="per-component ellipticity error instead of a weight")
    p.add_argument("--coordinate-system", default="euclidean", choices=COORDINATE_SYSTEMS,
                   help="frame of e1, e2 (CLMM): euclidean = x West (default), celestial = x East")
    p.add_argument("--center", type=_parse_center, default=None,
                   help="field centre RA,DEC in degrees or HH:MM:SS,DD:MM:SS (default: the catalog's; "
                        "write --center=RA,-DEC for a negative first value)")
    p.add_argument("--size", type=float, default=None,
                   help="field side in arcmin (default: the catalog's extent)")
    p.add_argument("--z-lens", type=float, default=None, help="cluster redshift (default: the training's)")
    p.add_argument("--z-source", type=float, default=None,
                   help="effective source redshift (default: the training's)")
    p.add_argument("--stride", type=int, default=12,
                   help="offset step in input pixels, a multiple of 3 (paper: 3 = 1,444 offsets)")
    p.add_argument("--orientations", type=int, default=1, choices=[1, 6], help="paper: 6")
    p.add_argument("--ks93-fwhm", type=float, default=KS93_MAP_FWHM_ARCMIN,
                   help="Gaussian smoothing of KAPPA_KS93, arcmin")
    p.add_argument("--outside", default="noise", choices=OUTSIDE_MODES,
                   help="what the CNN sees where the catalog has no source: shear-free noise at the "
                        "catalog's density (default) or empty no-data pixels")
    p.add_argument("--fills", type=int, default=NOISE_FILLS,
                   help=f"noise fills averaged per run (default {NOISE_FILLS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise fills")
    p.add_argument("--no-png", action="store_true", help="skip the figure")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv=None):
    """Reconstruct a catalog into a FITS mass map; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _cmd_reconstruct(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"reconstruct_catalog: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
