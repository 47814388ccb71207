"""Mass maps of a real shear catalog: sky coordinates in, FITS out (§4.2).

Title: reconstruct a cluster from a shear catalog
Description: the §4.2 application of Hong et al. (2021) as a library and a command.

§4.2 applies the CNN, trained on 32′ fields, to the ~9′ HST catalog of El Gordo.
This script does the same for any catalog of (RA, Dec, e1, e2, weight):

    python examples/reconstruct_catalog.py catalog.fits --models examples/quick_model \\
        --out kappa.fits

It writes KAPPA_CNN (mean of the runs), KAPPA_CNN_STD (their spread),
KAPPA_KS93 and DENSITY on one grid of 11.52″ pixels with a celestial WCS
(North up, East left), and a Fig. 11-like PNG beside it.  On a 10′ catalog
of 95 sources/arcmin² with the shipped quick model it takes about a minute
(examples/el_gordo_like.py).  A catalog that fits one 32′ network input is
reconstructed from that one input: the default field is then the 26.1′ one
input predicts (at the default stride), the sources beyond it the input's
context; wider catalogs are mosaics of abutting inputs.

Conventions it reads:

* (e1, e2) in the "euclidean" frame (default): e1 > 0 along x = local West,
  e2 > 0 along x = y (North-West).  `--coordinate-system celestial` reads
  x towards East (RA increasing): the mirrored axis flips e2 (CLMM's names,
  arXiv:1407.7676 §5.1).  Either way the axes are the local West/East and
  North at each source, as shear catalogs are published.
* weight w = 1/σ², σ the per-component ellipticity error (shape noise and
  measurement error), or `--sigma-col`.  The network reads σ (its Δε input
  channel), so the weights' absolute scale matters: it is checked against
  the catalog's own dispersion, ⟨w (e1² + e2²)/2⟩ = 1, and rescaled to it
  unless `--keep-weights`.
* Every catalog source inside a network input is used, also beyond the
  output field; where the catalog has none the input holds shear-free noise
  at the catalog's density (`--outside noise`, default) or no-data pixels
  (`--outside empty`).
"""
# ## Setup
import argparse
import gzip
import os
import sys
import time
import warnings
from typing import NamedTuple

import keras
import numpy as np
import scipy.ndimage
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

import wlcnn
from wlcnn import (MOSAIC_BATCH, PAPER, SIGMA_RANGE, MosaicRuns, atomic_write, Progress,
                   config_from_dict, cosmology, grid_catalog, ks93, load_runs, model_info,
                   mosaic_coverage, mosaic_offsets, mosaic_orientations, predict_mosaic_runs,
                   sigma_crit, smooth_map)

#: Frames of a catalog's (e1, e2), with CLMM's names.
COORDINATE_SYSTEMS = ("euclidean", "celestial")

#: Rows whose |ε| reaches this are dropped (and counted): eq. 5's (a − b)/(a + b)
#: is below 1 for every ellipse, so |ε| ≥ 1 is a failed shape measurement, and a
#: wild value shifts the mean ellipticity of its 7″ pixels more than the shear.
MAX_ELLIPTICITY = 1.0

#: Weights whose scale ⟨w (e1² + e2²)/2⟩ is off from 1 by more than this
#: fraction are reported with a warning.  The simulated training catalogs give
#: 1.00 ± 0.01; the shear itself adds ⟨|g|²⟩/(2σ²), a per cent in a cluster field.
WEIGHT_TOLERANCE = 0.1

#: KS93 smoothing rule: the §3 validation choice (:func:`wlcnn.choose_ks93_smoothing`)
#: is 1.25′ on the training's 25 arcmin⁻² fields (examples/quick_model/ks93_smoothing.csv).
#: The noise of smoothed KS93 goes as 1/(FWHM √n), so FWHM = 1.25′ √(25/n) keeps
#: it at any density n: 0.64′ at the ~95 arcmin⁻² of an HST catalog.
KS93_REFERENCE_FWHM_ARCMIN = 1.25
KS93_REFERENCE_DENSITY = 25.0

#: What the network sees where the catalog has no source: "noise", shear-free
#: shape noise at the catalog's density (:func:`noise_fill`), which the training
#: skies contain; or "empty", the no-data pixels of :func:`wlcnn.grid_catalog`
#: (ε̄ = 0, Δε = ``empty_pixel_error``), which they never do.
OUTSIDE_MODES = ("noise", "empty")

#: Noise fills averaged per run: the fill's own noise in KAPPA_CNN falls as 1/√N.
NOISE_FILLS = 4

#: Sources a fill cell holds on average at the catalog's density (at least): a
#: cell with no source is then a hole of the footprint, not a Poisson gap
#: (e^-10 ≈ 5e-5 of data cells are empty by chance).
FILL_CELL_SOURCES = 10.0

#: Slack, as a fraction of the network input's side, of "the catalog fits one
#: input" (:func:`fits_one_input`): 1 % is 19″ beyond the 32′ input (which already
#: counts the gridding kernel's 12″ reach), at most ~1 % of a 32′ catalog's sources
#: per side left unused (and reported).  It absorbs what makes a "32′" catalog a
#: hair wider in the tangent plane: a box cut in RA and Dec bulges at its corners
#: by 4.5″ tan δ (18″ at δ = 76°); the projection itself adds < 0.01″ at 16′.
#: Without it a catalog 0.1′ too wide would be 4 tiles and 4 × the passes.
SINGLE_TILE_TOLERANCE = 0.01

#: Image extensions of a reconstruction file, in order.
MAP_EXTENSIONS = ("KAPPA_CNN", "KAPPA_CNN_STD", "KAPPA_KS93", "DENSITY")

#: Config fields that fix the grids: models differing in one cannot share a gridded catalog.
GRID_FIELDS = ("field_arcmin", "npix", "fwhm_arcsec", "kernel_cut_sigma", "empty_pixel_error",
               "subfield_npix", "offset_step", "n_offsets", "first_kernel", "pool", "output_npix",
               "mosaic_npix")
#: Config fields of the training skies: an ensemble mixing them is no "K runs" of one model.
TRAINING_FIELDS = ("H0", "Om0", "z_lens", "z_source")

#: Step (arcsec) towards North that finds local North in the tangent plane: its
#: angle differs from a 0.01″ step's by < 1e-8 rad half a degree from the centre.
NORTH_STEP_ARCSEC = 1.0

#: Colour map, panel size (inches) and resolution of the Fig. 11-like PNG.
MAP_CMAP = "magma"
RECON_PANEL_INCH = 4.0
RECON_DPI = 110
#: RA ticks per panel of that PNG, at most (WCSAxes picks round values).
RECON_RA_TICKS = 3


# ## Data: reading a catalog
class CatalogWarning(UserWarning):
    """Rows of a catalog were dropped, or its weights rescaled."""


class SkyCatalog(NamedTuple):
    """A shear catalog read by :func:`read_catalog`, in the euclidean frame."""
    ra: np.ndarray     #: (n,) right ascension, degrees (ICRS)
    dec: np.ndarray    #: (n,) declination, degrees
    e1: np.ndarray     #: (n,) ellipticity along local West
    e2: np.ndarray     #: (n,) ellipticity along local North-West
    sigma: np.ndarray  #: (n,) per-component ellipticity error σ
    counts: dict       #: rows, dropped_nan, dropped_weight, dropped_ellipticity
    source: str        #: file name, or "table"


def _load_table(catalog):
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
            # no known extension (.cat, .txt): let astropy guess the ASCII layout
            table = Table.read(path, format="ascii")
    except Exception as exc:  # astropy raises many types for unreadable files
        raise ValueError(f"{path}: could not read it as a table (FITS, CSV or ECSV): "
                         f"{exc}") from exc
    return table, os.path.basename(path)


def _find_column(table, name, option):
    """The column called ``name``, matched case-insensitively (None if absent)."""
    if name in table.colnames:
        return name
    matches = [c for c in table.colnames if c.lower() == name.lower()]
    if len(matches) > 1:
        raise ValueError(f"{option} {name!r} matches several columns {matches}: "
                         "give the exact name")
    return matches[0] if matches else None


def _float_column(table, name, angle=False):
    """A column as float64 (masked entries NaN); angles converted to degrees."""
    col = table[name]
    if not (np.issubdtype(col.dtype, np.number) or np.issubdtype(col.dtype, np.bool_)):
        raise ValueError(f"column {name!r} is not numeric (dtype {col.dtype})"
                         + ("; give RA and Dec in degrees" if angle else ""))
    if np.ndim(col) != 1:
        raise ValueError(f"column {name!r} holds arrays of shape {col.shape[1:]} per row, "
                         "not one number")
    values = np.ma.masked_array(col, dtype=np.float64).filled(np.nan)
    unit = getattr(col, "unit", None)
    if angle and unit is not None:
        if not u.Unit(unit).is_equivalent(u.deg):
            raise ValueError(f"column {name!r} has unit {unit}, not an angle")
        values = (values * u.Unit(unit)).to_value(u.deg)
    return values


def read_catalog(catalog, ra_col="ra", dec_col="dec", e1_col="e1", e2_col="e2",
                 weight_col="weight", sigma_col=None, coordinate_system="euclidean"):
    """Read a shear catalog in sky coordinates and drop unusable rows (§4.2).

    ``catalog``: FITS, CSV or ECSV (other ASCII layouts are guessed), or a
    Table.  Columns match case-insensitively; RA, Dec in degrees or with an
    angle unit; ``weight_col`` w = 1/σ², or ``sigma_col`` σ per component;
    ``coordinate_system`` "euclidean" (x West) or "celestial" (x East: e2 negated).

    Returns
    -------
    SkyCatalog
        Clean rows, in the euclidean frame.  Rows with NaN/inf or masked
        entries, w ≤ 0 (σ outside ``wlcnn.SIGMA_RANGE``) or |ε| ≥ 1 are
        dropped, counted and reported (:class:`CatalogWarning`); nothing
        left, missing or non-numeric columns, |Dec| > 90° are ValueErrors.
    """
    if coordinate_system not in COORDINATE_SYSTEMS:
        raise ValueError(f"unknown coordinate_system {coordinate_system!r}; one of "
                         f"{COORDINATE_SYSTEMS} (euclidean: e1 along West; celestial: e1 along "
                         "East, e2 negated)")
    if sigma_col is not None and weight_col not in (None, "weight"):
        raise ValueError(f"give a weight column or a sigma column, not both "
                         f"(weight_col={weight_col!r}, sigma_col={sigma_col!r})")
    if sigma_col is not None:
        err_option, err_col = "sigma_col", sigma_col
    else:
        err_option, err_col = "weight_col", weight_col or "weight"
    table, source = _load_table(catalog)
    if not table.colnames:
        raise ValueError(f"{source}: empty catalog (no columns)")
    wanted = {"ra_col": ra_col, "dec_col": dec_col, "e1_col": e1_col, "e2_col": e2_col,
              err_option: err_col}
    found = {opt: _find_column(table, name, opt) for opt, name in wanted.items()}
    missing = [f"{wanted[opt]!r} ({opt})" for opt, col in found.items() if col is None]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; the catalog has "
                         f"{table.colnames}.  Name them with the --*-col options "
                         "(case is ignored).")
    if len(table) == 0:
        raise ValueError(f"{source}: the catalog has columns {table.colnames} but no rows")
    ra = _float_column(table, found["ra_col"], angle=True)
    dec = _float_column(table, found["dec_col"], angle=True)
    e1 = _float_column(table, found["e1_col"])
    e2 = _float_column(table, found["e2_col"])
    err = _float_column(table, found[err_option])

    finite = np.isfinite(ra) & np.isfinite(dec) & np.isfinite(e1) & np.isfinite(e2)
    finite &= np.isfinite(err)
    if np.any(np.abs(dec[finite]) > 90.0):
        raise ValueError(f"{source}: column {found['dec_col']!r} has values beyond ±90°: "
                         "not a declination in degrees")
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = err if sigma_col is not None else 1.0 / np.sqrt(err)
    good_err = finite & (sigma >= SIGMA_RANGE[0]) & (sigma <= SIGMA_RANGE[1])
    keep = good_err & (np.hypot(e1, e2) < MAX_ELLIPTICITY)
    counts = {"rows": len(table), "dropped_nan": int((~finite).sum()),
              "dropped_weight": int((finite & ~good_err).sum()),
              "dropped_ellipticity": int((good_err & ~keep).sum())}
    detail = (f"{counts['dropped_nan']} with NaN/inf or empty entries, "
              f"{counts['dropped_weight']} with weight ≤ 0 or σ outside "
              f"[{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}], "
              f"{counts['dropped_ellipticity']} with |e| ≥ {MAX_ELLIPTICITY:g}")
    if not keep.any():
        raise ValueError(f"{source}: no usable row among {counts['rows']} ({detail})")
    n_dropped = counts["rows"] - int(keep.sum())
    if n_dropped:
        warnings.warn(f"{source}: dropped {n_dropped} of {counts['rows']} rows ({detail})",
                      CatalogWarning, stacklevel=2)
    e2 = e2 if coordinate_system == "euclidean" else -e2
    return SkyCatalog(ra[keep], dec[keep], e1[keep], e2[keep], sigma[keep], counts, source)


def weight_scale(e1, e2, sigma):
    """⟨w (e1² + e2²)/2⟩ with w = 1/σ²: 1 for inverse-variance weights of these ellipticities.

    Divide the weights by it (multiply σ by its square root) to put them on the
    scale the network was trained with.
    """
    e1, e2, sigma = (np.asarray(a, dtype=np.float64) for a in (e1, e2, sigma))
    return float(np.mean((e1**2 + e2**2) / (2.0 * sigma**2)))


# ## Data: the tangent plane (x West, y North)
def tangent_plane_wcs(center, pixel_arcsec=1.0, crpix=(1.0, 1.0)):
    """A gnomonic (TAN) WCS about ``center`` (RA, Dec in degrees) whose x axis points West.

    CDELT1 = −pixel (RA decreases as x grows), CDELT2 = +pixel (y North): the
    usual orientation of sky images, North up and East left.  With the default
    1″ pixel and ``crpix``, a source's 0-based pixel coordinates are its (x, y)
    in arcsec from the centre.
    """
    ra0, dec0 = (float(v) for v in center)
    if not (np.isfinite(ra0) and np.isfinite(dec0) and -90.0 <= dec0 <= 90.0):
        raise ValueError(f"center must be a finite (RA, Dec) in degrees with |Dec| ≤ 90, "
                         f"got {center}")
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [ra0 % 360.0, dec0]
    w.wcs.crpix = list(crpix)
    w.wcs.cdelt = [-pixel_arcsec / 3600.0, pixel_arcsec / 3600.0]
    w.wcs.radesys = "ICRS"
    return w


def local_north_angle(ra, dec, wcs):
    """Angle ψ (radians) from the tangent plane's y axis to local North at each source.

    An ellipticity along the local (West, North) axes is ε e^{2iψ} in the
    plane's (x, y).  Meridians converge: ψ ≈ −Δα sin δ for a source Δα East of
    the centre, 0.1° at 5′ from El Gordo's centre.
    """
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    step = NORTH_STEP_ARCSEC / 3600.0
    sign = np.where(dec + step <= 90.0, 1.0, -1.0)  # at the pole, step South and turn round
    x0, y0 = wcs.world_to_pixel_values(ra, dec)
    x1, y1 = wcs.world_to_pixel_values(ra, dec + sign * step)
    return np.arctan2(sign * (y1 - y0), sign * (x1 - x0)) - np.pi / 2


def project_catalog(sky, center):
    """(x, y, e1, e2) of a :class:`SkyCatalog` on the tangent plane about ``center``.

    x, y in arcsec from the centre (x West, y North; NaN on the far hemisphere),
    e1, e2 turned from the local frame to the plane's by :func:`local_north_angle`.
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
    """Default field centre (RA, Dec): the middle of the catalog's extent on the sky.

    The bounding box is taken in the tangent plane about the sources' mean
    direction (a mean of unit vectors, so a field across RA = 0 is handled).
    """
    r, d = np.radians(ra), np.radians(dec)
    v = np.array([np.mean(np.cos(d) * np.cos(r)), np.mean(np.cos(d) * np.sin(r)),
                  np.mean(np.sin(d))])
    norm = np.linalg.norm(v)
    if norm < 1e-6:
        raise ValueError("the sources cover the whole sky around: no field centre; give center")
    mean = (np.degrees(np.arctan2(v[1], v[0])) % 360.0, np.degrees(np.arcsin(v[2] / norm)))
    wcs = tangent_plane_wcs(mean)
    x, y = wcs.world_to_pixel_values(ra, dec)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        raise ValueError("no source projects onto the tangent plane about the catalog's "
                         "mean position")
    xm = 0.5 * (np.min(x[ok]) + np.max(x[ok]))
    ym = 0.5 * (np.min(y[ok]) + np.max(y[ok]))
    ra_c, dec_c = wcs.pixel_to_world_values(xm, ym)
    return float(ra_c) % 360.0, float(dec_c)


# ## Data: the field, its tiles and the noise fill
class FieldGeometry(NamedTuple):
    """The output grid of a reconstruction and the 32′ network inputs (tiles) that cover it.

    The output grid is ``npix`` mosaic pixels of 11.52″ a side, centred on the
    field centre, which lies on a pixel corner: pixel j spans x ∈ [(j − npix/2) p,
    (j − npix/2 + 1) p) arcsec (x West; y likewise, North).  Tile ``a`` (per
    axis) is a network input whose mosaic pixel J is output pixel a + J, so
    every tile's pixels are the output grid's own: nothing is resampled.
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
        """Lower-left corner (x or y, arcsec from the centre) of tile ``start``'s input grid."""
        cfg = self.config
        lo = (cfg.first_kernel - 1) // 2  # mosaic pixel 0 starts at input pixel lo
        return (start - self.npix / 2) * self.pixel_arcsec - lo * cfg.pixel_arcsec

    def tile_span_arcsec(self, start):
        """(lo, hi), arcsec from the centre: where a source adds to the input of tile ``start``."""
        cfg = self.config
        reach = cfg.kernel_cut_sigma * cfg.sigma_w_arcsec  # the gridding kernel's cut
        lo = self.tile_origin_arcsec(start)
        return lo - reach, lo + cfg.npix * cfg.pixel_arcsec + reach

    def input_span_arcsec(self):
        """(lo, hi) of all tiles' inputs together (a square: tiles form a grid)."""
        spans = [self.tile_span_arcsec(a) for a in self.tile_starts]
        return min(s[0] for s in spans), max(s[1] for s in spans)


def field_geometry(size_arcmin, config=PAPER, stride=12, border_pix=None):
    """Output grid and network tiles of a square field of ``size_arcmin``.

    Parameters
    ----------
    size_arcmin : float
        Side of the field; rounded up to an even number of 11.52″ pixels (the
        centre is a pixel corner).
    config : Config
        The models' grids.
    stride : int
        Offset step of the subfields, input pixels (:func:`wlcnn.mosaic_offsets`).
    border_pix : int, optional
        Output pixels left out of each subfield (default ``config.loss_border_pix``).

    Returns
    -------
    FieldGeometry

    Notes
    -----
    One 32′ input predicts mosaic pixels [c0, c1) (26.1′ at stride 12,
    :func:`single_tile_arcmin`).  A field that fits is one tile, the field in
    the middle of the input, as the 9′ HST field of §4.2.  A wider field is
    one mosaic: the subfield origins form one lattice of step stride/pool
    output pixels over the whole field, cut into tiles that abut (tile starts
    N·stride/pool apart, N offsets per tile and axis), so every subfield is
    predicted once and the tiles leave no seam; the lattice is centred on the
    field.
    """
    if not (isinstance(size_arcmin, (int, float, np.number)) and np.isfinite(size_arcmin)
            and size_arcmin > 0):
        raise ValueError(f"size_arcmin must be positive and finite, got {size_arcmin}")
    stride = int(stride)
    offsets = mosaic_offsets(config, stride)
    covered = np.flatnonzero(mosaic_coverage(config, stride, border_pix)[config.mosaic_npix // 2])
    c0, c1 = int(covered[0]), int(covered[-1]) + 1
    border = c0  # the subfield at offset 0 predicts from its border on
    p = config.pixel_arcsec * config.pool
    half = max(int(np.ceil(size_arcmin * 60.0 / 2.0 / p - 1e-9)), 1)  # 1e-9: a multiple stays
    npix = 2 * half
    step = stride // config.offset_step       # output pixels between subfield origins
    window = config.output_npix - 2 * border  # output pixels one subfield predicts
    needed = max(int(np.ceil((npix - window) / step)) + 1, 1)  # origins per axis over the field
    n_tiles = int(np.ceil(needed / len(offsets)))
    if n_tiles == 1:  # as near the middle of the input as the coverage allows
        lo = (config.first_kernel - 1) // 2
        centre = int(round((config.npix / 2 - lo) / config.pool))  # mosaic corner at input centre
        starts = (min(max(half - centre, npix - c1), -c0),)
    else:
        excess = (n_tiles * len(offsets) - 1) * step - (npix - window)
        first = -border - excess // 2
        starts = tuple(first + t * len(offsets) * step for t in range(n_tiles))
    return FieldGeometry(npix, p, starts, config, stride, border)


def single_tile_arcmin(config=PAPER, stride=12, border_pix=None):
    """Side (arcmin) of the widest field one network input predicts: 26.1′ at stride 12.

    The mosaic pixels one 32′ input covers with subfield predictions (its
    subfields' borders left out), rounded down to an even number of pixels;
    :func:`field_geometry` of this side is one tile, the field in the middle of
    the input.
    """
    row = mosaic_coverage(config, int(stride), border_pix)[config.mosaic_npix // 2]
    covered = np.flatnonzero(row)
    npix = 2 * ((int(covered[-1]) + 1 - int(covered[0])) // 2)
    return npix * config.pixel_arcsec * config.pool / 60.0


def fits_one_input(x, y, config=PAPER, stride=12, tolerance=SINGLE_TILE_TOLERANCE):
    """Whether every source lies in the one network input of a :func:`single_tile_arcmin` field.

    x, y in arcsec from the field centre (NaN ignored).  The input's span
    counts the gridding kernel's reach (:meth:`FieldGeometry.input_span_arcsec`);
    ``tolerance`` (a fraction of the input's side, :data:`SINGLE_TILE_TOLERANCE`)
    is the slack beyond it.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    lo, hi = field_geometry(single_tile_arcmin(config, stride), config, stride).input_span_arcsec()
    slack = tolerance * config.field_arcmin * 60.0
    return bool(ok.any() and np.all((x[ok] >= lo - slack) & (x[ok] <= hi + slack)
                                    & (y[ok] >= lo - slack) & (y[ok] <= hi + slack)))


def default_size_arcmin(x, y, config=PAPER, stride=12):
    """The field side :func:`reconstruct` takes when none is given, arcmin.

    The catalog's extent about the centre, 2 max(|x|, |y|) (x, y arcsec from
    it), except for a catalog wider than one tile's field that still fits one
    network input (:func:`fits_one_input`): then the one tile's field,
    :func:`single_tile_arcmin` (26.1′ at stride 12), so that the whole catalog
    is the network's one input, as §4.2's HST field is.  A 32′ catalog is one
    tile (4 noise-filled passes), not the 4 tiles (16 passes) its 32.3′ would
    need; its sources beyond the field are the input's context.  Wider
    catalogs keep their extent: abutting tiles.
    """
    with np.errstate(invalid="ignore"):
        extent = 2.0 * np.nanmax(np.maximum(np.abs(x), np.abs(y))) / 60.0
    if not extent > 0:
        raise ValueError("the catalog has no extent on the sky (one position): give size_arcmin")
    one = single_tile_arcmin(config, stride)
    if extent > one and fits_one_input(x, y, config, stride):
        return one
    return float(extent)


def _grid_at(x, y, e1, e2, sigma, x0, y0, npix, config):
    return grid_catalog(x - x0, y - y0, e1, e2, sigma, npix=npix, pixel_arcsec=config.pixel_arcsec,
                        fwhm_arcsec=config.fwhm_arcsec, cut_sigma=config.kernel_cut_sigma,
                        empty_error=config.empty_pixel_error)


def grid_field(x, y, e1, e2, sigma, geometry):
    """The catalog gridded on the field at input resolution (§2.3.2).

    x, y in arcsec from the centre (x West), e1, e2 in the plane's frame, σ per
    component.  Returns (ε̄1, ε̄2, Δε, n) of :func:`wlcnn.grid_catalog`, shape
    (4, pool·npix, pool·npix): output pixel k covers input pixels
    [pool·k, pool·(k + 1)), so :func:`block_mean` puts a channel on the output grid.
    """
    cfg = geometry.config
    origin = -geometry.npix / 2 * geometry.pixel_arcsec
    return _grid_at(x, y, e1, e2, sigma, origin, origin, cfg.pool * geometry.npix, cfg)


def grid_tile(x, y, e1, e2, sigma, geometry, start_y, start_x):
    """The catalog gridded on the 32′ network input of one tile (``config.npix``²)."""
    cfg = geometry.config
    return _grid_at(x, y, e1, e2, sigma, geometry.tile_origin_arcsec(start_x),
                    geometry.tile_origin_arcsec(start_y), cfg.npix, cfg)


def block_mean(a, pool):
    """Mean over ``pool`` × ``pool`` blocks of the last two axes (sides divisible by ``pool``)."""
    a = np.asarray(a, dtype=np.float64)
    ny, nx = a.shape[-2:]
    if ny % pool or nx % pool:
        raise ValueError(f"map sides {a.shape[-2:]} are not multiples of {pool}")
    return a.reshape(a.shape[:-2] + (ny // pool, pool, nx // pool, pool)).mean(axis=(-3, -1))


def _fill_cells(x, y, geometry):
    """Cell edges (arcsec, per axis), sources per cell and the density (per arcsec²).

    Cells are whole output pixels, their edges on the field's edges, and extend
    over all tiles' inputs.  Their side holds FILL_CELL_SOURCES at the density
    over the field (a lower bound on the catalog's: the side is large enough).
    The density is counted over the cells whose eight neighbours hold data too
    (a cell on the edge of the footprint or of a hole is partly covered).
    """
    p, n = geometry.pixel_arcsec, geometry.npix
    half = n / 2 * p
    with np.errstate(invalid="ignore"):
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    n_field = int(inside.sum())
    if n_field == 0:
        raise ValueError("no source inside the field")
    side = max(1, int(np.ceil(np.sqrt(FILL_CELL_SOURCES * (2 * half) ** 2 / n_field) / p)))
    k = list(range(0, n, side)) + [n]
    if len(k) > 2 and k[-1] - k[-2] < side / 2:  # a short last cell joins its neighbour
        del k[-2]
    lo, hi = geometry.input_span_arcsec()
    n_out = int(np.ceil(max(-lo - half, hi - half, 0.0) / (side * p)))
    k = [-side * j for j in range(n_out, 0, -1)] + k + [n + side * j for j in range(1, n_out + 1)]
    edges = np.asarray(k) * p - half
    ok = np.isfinite(x) & np.isfinite(y)
    counts, _, _ = np.histogram2d(y[ok], x[ok], bins=(edges, edges))
    area = np.diff(edges)[:, None] * np.diff(edges)[None, :]
    occupied = counts > 0
    interior = scipy.ndimage.binary_erosion(occupied, np.ones((3, 3), bool), border_value=0)
    use = interior if interior.any() else occupied
    return edges, counts, counts[use].sum() / area[use].sum()


def source_density(x, y, geometry):
    """The catalog's source density, arcmin⁻², over the cells holding data (:func:`noise_fill`)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(_fill_cells(x, y, geometry)[2]) * 3600.0


def noise_fill(x, y, e1, e2, sigma, geometry, rng):
    """Shear-free noise sources wherever the catalog has none, over every tile's input.

    Parameters
    ----------
    x, y, e1, e2, sigma : array_like, shape (n,)
        The catalog on the tangent plane, as :func:`grid_field`.
    geometry : FieldGeometry
    rng : numpy.random.Generator

    Returns
    -------
    tuple of numpy.ndarray, shape (m,)
        ``(x, y, e1, e2, sigma)`` of the fill sources (m = 0 where the catalog
        covers every input).

    Notes
    -----
    Each cell of :func:`_fill_cells` without a source gets Poisson(n̄ A)
    sources uniform in its area A, n̄ the catalog's density; each takes the
    |ε| and σ of a random catalog source and a random position angle
    (ε e^{2iψ}, ψ uniform in [0, π)).  That keeps the catalog's noise and
    removes its shear: ⟨ε⟩ = 0, the assumption γ = 0 beyond the data that the
    zero padding of KS93 makes too.  Rotated galaxies are the usual weak-lensing
    noise realisation (e.g. Van Waerbeke et al. 2000).
    """
    wlcnn.check_rng(rng)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    e = np.asarray(e1, np.float64) + 1j * np.asarray(e2, np.float64)
    sigma = np.asarray(sigma, np.float64)
    edges, counts, density = _fill_cells(x, y, geometry)
    ok = np.isfinite(x) & np.isfinite(y)
    e, sigma = e[ok], sigma[ok]
    widths = np.diff(edges)
    iy, ix = np.nonzero(counts == 0)
    n_cell = rng.poisson(density * widths[iy] * widths[ix])
    ux = rng.uniform(0.0, 1.0, n_cell.sum())
    uy = rng.uniform(0.0, 1.0, n_cell.sum())
    fx = np.repeat(edges[ix], n_cell) + ux * np.repeat(widths[ix], n_cell)
    fy = np.repeat(edges[iy], n_cell) + uy * np.repeat(widths[iy], n_cell)
    pick = rng.integers(0, len(e), len(fx))
    fe = e[pick] * np.exp(2j * rng.uniform(0.0, np.pi, len(fx)))
    return fx, fy, fe.real, fe.imag, sigma[pick]


# ## Model: the K runs
def _as_models(models):
    """Keras models from a path, a model, or a sequence of either (:func:`wlcnn.load_runs`)."""
    if isinstance(models, (str, os.PathLike, keras.Model)):
        models = [models]
    out = []
    for item in models:
        out.extend([item] if isinstance(item, keras.Model) else load_runs(item))
    if not out:
        raise ValueError("no models")
    return out


def check_models(models, config=None):
    """Load the runs and check that they can share one gridded catalog.

    Returns (models, config, info): the Keras models, the grid's Config (the
    models' unless ``config`` is given) and the first model's
    :func:`wlcnn.model_info`.  A ValueError names the problem: channels other
    than 3 or 4, runs that differ in channels, grid (:data:`GRID_FIELDS`) or
    training skies (:data:`TRAINING_FIELDS`), a ``config`` of another grid.
    """
    models = _as_models(models)
    infos = [model_info(mdl) for mdl in models]
    first = infos[0]
    for mdl, info in zip(models, infos):
        if info["channels"] not in (3, 4):
            raise ValueError(f"model {mdl.name!r} expects {info['channels']} input channels; the "
                             "gridded catalog has 4 (ε̄1, ε̄2, Δε, n) and models take 3 or 4 "
                             "of them")
        if int(mdl.input_shape[-1]) != info["channels"]:
            raise ValueError(f"model {mdl.name!r}: its input layer has {mdl.input_shape[-1]} "
                             f"channels but its description says {info['channels']}")
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
        return models, model_config, first
    diff = {k: (getattr(config, k), getattr(model_config, k)) for k in GRID_FIELDS
            if getattr(config, k) != getattr(model_config, k)}
    if diff:
        raise ValueError(f"the models were built for another grid than the data's; "
                         f"(data, model): {diff}")
    return models, config, first


def redshift_info(config, z_lens=None, z_source=None):
    """Redshifts of the data and of the training, and their Σ_c (eq. 4).

    Returns a dict: ``z_lens``, ``z_source`` (default the training's),
    ``z_lens_train``, ``z_source_train``, ``sigma_crit``, ``sigma_crit_train``
    (M☉/Mpc²), ``ratio`` = Σ_c(train)/Σ_c(data), ``differs``.

    κ is *not* rescaled by the ratio: γ and κ are both Σ over the same Σ_c, and
    neither KS93 nor the network sees Σ_c, so the maps are κ of the catalog's own
    sources (Σ = κ Σ_c(data)).  What the redshifts change is the network's prior
    (cluster sizes and κ range of the training skies), one of §4.2's mismatches.
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


# ## Evaluate: the KS93 and CNN maps of the field
def ks93_fwhm_for_density(density_arcmin2):
    """KS93 smoothing FWHM (arcmin) for a catalog of ``density_arcmin2``: 1.25′ √(25/n)."""
    n = float(density_arcmin2)
    if not (np.isfinite(n) and n > 0):
        raise ValueError(f"source density must be positive and finite, got {density_arcmin2}")
    return KS93_REFERENCE_FWHM_ARCMIN * np.sqrt(KS93_REFERENCE_DENSITY / n)


def ks93_field_map(field_grid, geometry, fwhm_arcmin):
    """KS93 of the field's gridded shear on the output grid (the KAPPA_KS93 map).

    Kaiser & Squires (1993), eq. 10, on ε̄ of :func:`grid_field` zero-padded to
    twice the field, smoothed by a Gaussian of ``fwhm_arcmin`` (0: none), then
    averaged over each output pixel.  The k = 0 mode is zero over the padded
    field (mass-sheet degeneracy).
    """
    g = np.asarray(field_grid)
    cfg = geometry.config
    return block_mean(smooth_map(ks93(g[0], g[1]), fwhm_arcmin, cfg), cfg.pool)


class TiledCNN(NamedTuple):
    """The CNN maps of a field and what it took (:func:`filled_cnn_map`)."""
    maps: MosaicRuns   #: on the output grid: mean, std (ddof = 1), count, runs (K, npix, npix)
    fill_error: float  #: median std error of ``maps.mean`` from the fills (0: none added)
    passes: int        #: mosaic passes over tiles, per run (a filled tile runs once per fill)
    skipped: int       #: tiles without a catalog source in their input, not predicted


def _in_span(x, y, span_x, span_y):
    return bool(np.any((x > span_x[0]) & (x < span_x[1]) & (y > span_y[0]) & (y < span_y[1])))


def _tiled_cnn(src, fills, models, geometry, orientations, batch_size, progress):
    """CNN maps of the catalog ``src`` with each fill of ``fills`` (none: the catalog alone).

    A tile is run once per fill if some fill reaches its input, once otherwise,
    and not at all without a catalog source in its input.  Tiles are pooled as
    one mosaic: the sum of subfield predictions over their count.
    """
    cfg, n, m = geometry.config, geometry.npix, geometry.config.mosaic_npix
    n_fills = max(len(fills), 1)
    plan, skipped = [], 0
    for sy in geometry.tile_starts:
        for sx in geometry.tile_starts:
            span_x, span_y = geometry.tile_span_arcsec(sx), geometry.tile_span_arcsec(sy)
            if not _in_span(src[0], src[1], span_x, span_y):
                skipped += 1
                continue
            filled = any(_in_span(f[0], f[1], span_x, span_y) for f in fills)
            plan.append((sy, sx, filled))
    passes = sum(n_fills if filled else 1 for *_, filled in plan)
    total = np.zeros((len(models), n, n))       # Σ count × tile map, per run (fill-averaged)
    by_fill = np.zeros((n_fills, n, n))         # Σ count × tile map, per fill (run-averaged)
    count = np.zeros((n, n), dtype=np.int64)
    bar = Progress(passes, "mosaic passes over tiles") if progress and passes > 1 else None
    catalogs = [tuple(np.concatenate([a, b]) for a, b in zip(src, f)) for f in fills]
    for sy, sx, filled in plan:
        tile_runs = []
        for cat in (catalogs if filled else [src]):
            res = predict_mosaic_runs(models, grid_tile(*cat, geometry, sy, sx), cfg,
                                      stride=geometry.stride, orientations=orientations,
                                      batch_size=batch_size, border_pix=geometry.border_pix)
            tile_runs.append(np.nan_to_num(res.runs))
            if bar:
                bar.update()
        oy, ox = slice(max(sy, 0), min(sy + m, n)), slice(max(sx, 0), min(sx + m, n))
        ty, tx = slice(oy.start - sy, oy.stop - sy), slice(ox.start - sx, ox.stop - sx)
        c = res.count[ty, tx]
        tile_runs = np.asarray(tile_runs)[:, :, ty, tx] * c  # (passes, K, ...)
        total[:, oy, ox] += tile_runs.mean(axis=0)
        by_fill[:, oy, ox] += tile_runs.mean(axis=1)  # one pass: the same map for every fill
        count[oy, ox] += c
    has = count > 0
    runs = np.full(total.shape, np.nan)
    runs[:, has] = total[:, has] / count[has]
    std = runs.std(axis=0, ddof=1) if len(runs) > 1 else np.where(has, 0.0, np.nan)
    maps = MosaicRuns(runs.mean(axis=0), std, count, runs)
    if not any(filled for *_, filled in plan):
        fill_error = 0.0
    elif n_fills == 1:
        fill_error = float("nan")
    else:
        per_fill = by_fill[:, has] / count[has]
        fill_error = float(np.median(per_fill.std(axis=0, ddof=1))) / np.sqrt(n_fills)
    return TiledCNN(maps, fill_error, passes, skipped)


def cnn_field_map(x, y, e1, e2, sigma, models, geometry, orientations=1, batch_size=MOSAIC_BATCH,
                  progress=False):
    """CNN mosaics of K runs on the field's output grid, the catalog alone (§2.3.2, §4.2).

    ``x, y, e1, e2, sigma`` as :func:`grid_field`; ``models`` Keras models or
    callables on batches of subfields (:func:`wlcnn.predict_mosaic`).  Returns
    :class:`wlcnn.MosaicRuns` on the output grid: ``mean`` and ``std`` (ddof =
    1) over runs, ``count`` of subfield predictions per pixel, ``runs``; NaN
    where no subfield reached (tiles without a source are skipped).
    """
    src = tuple(np.asarray(a, np.float64) for a in (x, y, e1, e2, sigma))
    return _tiled_cnn(src, [], list(models), geometry, orientations, batch_size, progress).maps


def filled_cnn_map(x, y, e1, e2, sigma, models, geometry, rng, n_fills=NOISE_FILLS, orientations=1,
                   batch_size=MOSAIC_BATCH, progress=False):
    """CNN mosaics of K runs with the catalog's gaps filled by shear-free noise (§4.2).

    As :func:`cnn_field_map`, each run's map the mean over ``n_fills`` fills
    of :func:`noise_fill` drawn from ``rng``; a tile that no fill reaches runs
    once.  Every run sees the same fills, so the spread over runs is the
    networks' alone.  Returns (MosaicRuns, fill error): the median over
    pixels of the standard error of the mean over fills (0 where no fill was
    needed, NaN for one fill).
    """
    res = _filled(x, y, e1, e2, sigma, models, geometry, rng, n_fills, orientations, batch_size,
                  progress)
    return res.maps, res.fill_error


def _check_n_fills(n_fills):
    if isinstance(n_fills, (bool, np.bool_)) or not isinstance(n_fills, (int, np.integer)) \
            or n_fills < 1:
        raise ValueError(f"n_fills must be a whole number >= 1, got {n_fills!r}")
    return int(n_fills)


def _filled(x, y, e1, e2, sigma, models, geometry, rng, n_fills, orientations, batch_size,
            progress):
    n_fills = _check_n_fills(n_fills)
    src = tuple(np.asarray(a, np.float64) for a in (x, y, e1, e2, sigma))
    fills = [noise_fill(*src, geometry, rng) for _ in range(n_fills)]
    return _tiled_cnn(src, fills, list(models), geometry, orientations, batch_size, progress)


# ## Evaluate: the FITS file and the figure
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
    counts: dict               #: rows read, dropped; sources used, context, outside_field, unused
    redshifts: dict            #: :func:`redshift_info`
    fill: dict                 #: mode; n, seed, err (noise); passes, skipped tiles
    path: str                  #: the FITS file
    png_path: object           #: the PNG, or None
    ks93_fwhm_arcmin: float    #: smoothing of KAPPA_KS93
    weights: dict              #: scale (⟨w e²/2⟩ as read), factor applied, rescaled


def map_wcs(center, geometry):
    """Celestial WCS of the output grid: TAN about ``center``, x (columns) towards West.

    The centre is the corner between pixels npix/2 − 1 and npix/2 (0-based).
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
        "KAPPA_KS93": ("", "convergence from Kaiser & Squires (1993)",
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
    """Write ``hdul`` atomically (a temporary file, then a rename); gzip for ".gz"."""
    def write(tmp):
        if path.endswith(".gz"):
            with gzip.open(tmp, "wb") as f:
                hdul.writeto(f)
        else:
            hdul.writeto(tmp)
    atomic_write(path, write)


def _png_path(path):
    stem = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(stem)[0] + ".png"


def figure_reconstruction(kappa_ks93, kappa_cnn, kappa_cnn_std, wcs, path, title=None):
    """A figure like Fig. 11: KS93, the CNN mean and its standard deviation, on RA/Dec axes.

    KS93 and the CNN share one colour scale, so the dynamic ranges compare
    directly (the first point §4.2 makes about Fig. 11).  Written atomically.
    """
    from matplotlib.figure import Figure  # optional: the ImportError is the caller's to handle
    both = np.concatenate([np.ravel(kappa_ks93), np.ravel(kappa_cnn)])
    both = both[np.isfinite(both)]
    vmin, vmax = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    fig = Figure(figsize=(3 * RECON_PANEL_INCH, RECON_PANEL_INCH), layout="constrained")
    panels = (("KS93", kappa_ks93, (vmin, vmax), "κ"),
              ("CNN (mean of runs)", kappa_cnn, (vmin, vmax), "κ"),
              ("CNN standard deviation", kappa_cnn_std, (None, None), "σ_κ"))
    for i, (name, data, (lo, hi), label) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1, projection=wcs)
        im = ax.imshow(data, origin="lower", cmap=MAP_CMAP, vmin=lo, vmax=hi)
        ax.set_title(name)
        if i == 2 and not np.any(np.nan_to_num(data)):
            ax.text(0.5, 0.5, "one run: no spread", transform=ax.transAxes, ha="center", color="w")
        ra, dec = ax.coords[0], ax.coords[1]
        # RA labels in h m s are ~9 characters: more than 3 on a 4″ panel overlap
        # (a 32′ field got 5); any that still would are left out.
        ra.set_ticks(number=RECON_RA_TICKS)
        ra.set_ticklabel(exclude_overlapping=True)
        dec.set_ticklabel(exclude_overlapping=True)
        ra.set_axislabel("RA")
        dec.set_axislabel("Dec")
        fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    if title:
        fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=RECON_DPI))
    return path


def _primary_header(sky, coordinate_system, center, geometry, counts, info, n_runs, n_orient,
                    ks93, weights, z, config, fill):
    """Primary header: provenance, counts, weights, mosaic settings, fills, redshifts."""
    h = fits.Header()
    h["CREATOR"] = (f"wlcnn {wlcnn.__version__}", "Hong et al. (2021) CNN, Sec. 4.2 application")
    h["DATE"] = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "UTC of the reconstruction")
    h["CATALOG"] = (sky.source, "input shear catalog")
    h["ECOORD"] = (coordinate_system, "frame of the input e1, e2 (CLMM names)")
    h["RA_CEN"] = (center[0], "[deg] field centre (ICRS), tangent point")
    h["DEC_CEN"] = (center[1], "[deg] field centre (ICRS)")
    h["FIELD"] = (geometry.side_arcmin, "[arcmin] side of the square field")
    h["PIXSCALE"] = (geometry.pixel_arcsec, "[arcsec] map pixel (3 x 3.84 arcsec)")
    for key, name, comment in (
            ("NROWS", "rows", "rows in the catalog"),
            ("NDRNAN", "dropped_nan", "rows dropped: NaN/inf or empty entries"),
            ("NDRWGT", "dropped_weight", "rows dropped: weight <= 0 or bad sigma"),
            ("NDRELL", "dropped_ellipticity", f"rows dropped: |e| >= {MAX_ELLIPTICITY:g}"),
            ("NSOURCE", "used", "sources in the field"),
            ("NOUTSIDE", "outside_field", "sources outside the field"),
            ("NCONTEXT", "context", "of those, in the CNN input (CNN only)"),
            ("NUNUSED", "unused", "of those, beyond every CNN input (not used)")):
        h[key] = (counts[name], comment)
    h["DENSITY"] = (ks93["density"], "[arcmin-2] source density of the catalog")
    h["WSCALE"] = (weights["scale"], "<w (e1^2 + e2^2)/2> of the weights as read")
    h["WFACTOR"] = (weights["factor"], "weights multiplied by this (1/WSCALE or 1)")
    h["NRUNS"] = (n_runs, "CNN runs averaged (KAPPA_CNN, KAPPA_CNN_STD)")
    h["VARIANT"] = (info["variant"], "network variant (Appendix A)")
    h["CHANNELS"] = (info["channels"], "network input channels")
    h["NTILES"] = (geometry.n_tiles, "32-arcmin network inputs covering the field")
    h["NSKIPPED"] = (fill["skipped"], "tiles without a catalog source, not predicted")
    h["NPASSES"] = (fill["passes"], "mosaic passes over tiles per run")
    h["STRIDE"] = (geometry.stride, "[input pix] mosaic offset step (paper: 3)")
    h["NORIENT"] = (n_orient, "orientations averaged (paper: 6)")
    h["KS93FWHM"] = (ks93["fwhm"], "[arcmin] Gaussian smoothing of KAPPA_KS93")
    h["KS93RULE"] = (ks93["rule"], "1.25 arcmin sqrt(25/DENSITY), or as given")
    h["OUTSIDE"] = (fill["mode"], "CNN input without sources: noise fill or empty")
    if fill["mode"] == "noise":
        h["NFILLS"] = (fill["n"], "noise fills per run where a fill adds sources")
        h["FILLSEED"] = (fill["seed"], "seed of the noise fills")
        h["FILLERR"] = (fill["err"] if np.isfinite(fill["err"]) else "n/a",
                        "median std error of KAPPA_CNN from the fills")
    h["Z_LENS"] = (z["z_lens"], "lens (cluster) redshift of the data")
    h["Z_SOURCE"] = (z["z_source"], "effective source redshift of the data")
    h["ZL_TRAIN"] = (z["z_lens_train"], "lens redshift of the training skies")
    h["ZS_TRAIN"] = (z["z_source_train"], "source redshift of the training skies")
    h["SIGCRIT"] = (z["sigma_crit"], "[Msun/Mpc2] Sigma_crit(Z_LENS, Z_SOURCE), eq. 4")
    h["SIGCRTRN"] = (z["sigma_crit_train"], "[Msun/Mpc2] Sigma_crit of the training")
    h["SCRATIO"] = (z["ratio"], "SIGCRTRN / SIGCRIT; kappa NOT rescaled by it")
    h["H0"] = (config.H0, "[km/s/Mpc] flat LCDM of Sigma_crit")
    h["OM0"] = (config.Om0, "matter density of Sigma_crit")
    for line in ("KAPPA_* are the convergence of the catalog's own sources: a shear",
                 "catalog measures kappa = Sigma/Sigma_crit(Z_LENS, Z_SOURCE) whatever",
                 "the redshifts, so the maps are not rescaled by SCRATIO.",
                 "Sigma = kappa * SIGCRIT; kappa for the training's sources would be",
                 "kappa / SCRATIO."):
        h["HISTORY"] = line
    if z["differs"]:
        h["HISTORY"] = "The data's redshifts differ from the training's: the network's prior"
        h["HISTORY"] = "(cluster sizes, kappa range) is the training's (Hong+2021, Sec. 4.2)."
    return h


def reconstruct(catalog, models, out_path, ra_col="ra", dec_col="dec", e1_col="e1", e2_col="e2",
                weight_col="weight", sigma_col=None, coordinate_system="euclidean", center=None,
                size_arcmin=None, z_lens=None, z_source=None, stride=12, orientations=1,
                config=None, ks93_fwhm_arcmin=None, outside="noise", n_fills=NOISE_FILLS, seed=0,
                rescale_weights=True, png=True, overwrite=False, progress=False):
    """Mass maps of a real shear catalog: the §4.2 application as one call.

    Parameters
    ----------
    catalog : str, os.PathLike or astropy.table.Table
        Sources in sky coordinates; the ``*_col`` and ``coordinate_system``
        arguments as :func:`read_catalog`.
    models : path, keras.Model, or a sequence of them
        The K runs: a train output directory, .keras files, or models.
    out_path : str or os.PathLike
        Output FITS (".fits" or ".fits.gz"), written atomically; the PNG beside it.
    center : (float, float), optional
        Field centre (RA, Dec), degrees; default :func:`catalog_center`.
    size_arcmin : float, optional
        Side of the square field, rounded up to 11.52″ pixels.  Default
        :func:`default_size_arcmin`: the catalog's extent about the centre, but
        one tile's field (26.1′ at stride 12) for a catalog that fits one 32′
        network input (:func:`fits_one_input`), as a 32′ catalog does.
    z_lens, z_source : float, optional
        Recorded with Σ_c (default the training's); κ is not rescaled
        (:func:`redshift_info`).
    stride, orientations : int
        Mosaic offset step (input pixels, a multiple of 3; paper: 3) and
        orientations (1 or the paper's 6).
    ks93_fwhm_arcmin : float, optional
        Smoothing of KAPPA_KS93; default :func:`ks93_fwhm_for_density` of the
        catalog's density.
    outside : {"noise", "empty"}
        What the network sees where the catalog has no source (:data:`OUTSIDE_MODES`).
    n_fills, seed : int
        Noise fills averaged per run where a fill adds a source, and their seed.
    rescale_weights : bool
        Scale the weights so that ⟨w (e1² + e2²)/2⟩ = 1 (:func:`weight_scale`),
        with a warning when the factor is off from 1 by more than
        :data:`WEIGHT_TOLERANCE`; False keeps them as given.
    png, overwrite, progress : bool
        Draw the PNG (skipped with a warning without matplotlib); replace an
        existing ``out_path``; a progress bar over tiles and fills.

    Returns
    -------
    Reconstruction

    Notes
    -----
    Catalog sources beyond the field but inside a network input are given to
    the CNN too.  Where the catalog has none, the network sees shear-free
    noise by default: no-data pixels, absent from the training skies, draw
    artefacts from it (examples/el_gordo_like.py).
    """
    out_path = os.fspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f"{out_path} exists "
                              "(pass overwrite=True / --overwrite to replace it)")
    if coordinate_system not in COORDINATE_SYSTEMS:  # the cheap checks before loading anything
        raise ValueError(f"unknown coordinate_system {coordinate_system!r}; one of "
                         f"{COORDINATE_SYSTEMS}")
    if outside not in OUTSIDE_MODES:
        raise ValueError(f"unknown outside mode {outside!r}; one of {OUTSIDE_MODES}")
    if outside == "noise":
        n_fills = _check_n_fills(n_fills)
    models, config, info = check_models(models, config)
    n_orient = len(mosaic_orientations(orientations))
    z = redshift_info(config, z_lens, z_source)
    sky = read_catalog(catalog, ra_col, dec_col, e1_col, e2_col, weight_col, sigma_col,
                       coordinate_system)
    center = catalog_center(sky.ra, sky.dec) if center is None else tuple(float(v) for v in center)
    if len(center) != 2:
        raise ValueError(f"center must be (RA, Dec) in degrees, got {center}")
    x, y, e1, e2 = project_catalog(sky, center)
    if size_arcmin is None:
        size_arcmin = default_size_arcmin(x, y, config, stride)
    geometry = field_geometry(size_arcmin, config, stride)

    # Sources: in the field, in some network input (context), or beyond every input.
    half = geometry.npix / 2 * geometry.pixel_arcsec
    lo, hi = geometry.input_span_arcsec()
    with np.errstate(invalid="ignore"):
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
        seen = (x > lo) & (x < hi) & (y > lo) & (y < hi)
    counts = dict(sky.counts, used=int(inside.sum()), outside_field=int((~inside).sum()),
                  context=int((seen & ~inside).sum()), unused=int((~seen).sum()))
    if not inside.any():
        raise ValueError(f"{sky.source}: none of the {len(x)} sources lies inside the "
                         f"{geometry.side_arcmin:.2f}′ field about RA {center[0]:.5f}°, "
                         f"Dec {center[1]:.5f}°")
    if counts["unused"]:
        warnings.warn(f"{sky.source}: {counts['unused']} sources lie beyond every network input "
                      f"of the {geometry.side_arcmin:.2f}′ field and are not used", CatalogWarning,
                      stacklevel=2)
    # The CNN's sources: those seen plus a margin, so that the fill cells on the
    # inputs' edges are counted whole (a clipped cell would look like a hole).
    margin = 0.1 * (hi - lo)
    with np.errstate(invalid="ignore"):
        seen = (x > lo - margin) & (x < hi + margin) & (y > lo - margin) & (y < hi + margin)
    sigma = sky.sigma[seen]
    scale = weight_scale(e1[seen], e2[seen], sigma)
    factor = 1.0 / scale if rescale_weights else 1.0
    if rescale_weights:
        sigma = sigma * np.sqrt(scale)
        if abs(factor - 1.0) > WEIGHT_TOLERANCE:
            warnings.warn(f"{sky.source}: the weights are not 1/σ² of these ellipticities: "
                          f"⟨w (e1² + e2²)/2⟩ = {scale:.3g}, not 1; weights multiplied by "
                          f"{factor:.3g} (keep them with rescale_weights=False / --keep-weights)",
                          CatalogWarning, stacklevel=2)
    src = (x[seen], y[seen], e1[seen], e2[seen], sigma)

    field = grid_field(*src, geometry)
    n_density = source_density(src[0], src[1], geometry)
    rule = ks93_fwhm_arcmin is None
    fwhm = ks93_fwhm_for_density(n_density) if rule else float(ks93_fwhm_arcmin)
    kappa_ks93 = ks93_field_map(field, geometry, fwhm)
    if outside == "noise":
        tiled = _filled(*src, models, geometry, np.random.default_rng(seed), n_fills, orientations,
                        MOSAIC_BATCH, progress)
        fill = {"mode": outside, "n": n_fills, "seed": int(seed), "err": tiled.fill_error}
    else:
        tiled = _tiled_cnn(src, [], models, geometry, orientations, MOSAIC_BATCH, progress)
        fill = {"mode": outside}
    fill.update(passes=tiled.passes, skipped=tiled.skipped)
    cnn = tiled.maps
    if z["differs"]:
        warnings.warn(f"the models were trained for z_l = {z['z_lens_train']:g}, "
                      f"z_s = {z['z_source_train']:g}; the data are at z_l = {z['z_lens']:g}, "
                      f"z_s = {z['z_source']:g}.  κ is that of the catalog's sources (not "
                      "rescaled; see the FITS header)", UserWarning, stacklevel=2)

    wcs = map_wcs(center, geometry)
    weights = {"scale": scale, "factor": factor, "rescaled": bool(rescale_weights)}
    ks93_info = {"fwhm": fwhm, "density": n_density, "rule": "density" if rule else "given"}
    primary = _primary_header(sky, coordinate_system, center, geometry, counts, info, len(models),
                              n_orient, ks93_info, weights, z, config, fill)
    cnn_cards = [("NRUNS", (len(models), "CNN runs")),
                 ("STRIDE", (geometry.stride, "[input pix] mosaic offset step")),
                 ("NORIENT", (n_orient, "orientations averaged"))]
    density = block_mean(field[3], config.pool)
    hdus = _map_hdus((cnn.mean, cnn.std, kappa_ks93, density), wcs,
                     {"KAPPA_CNN": cnn_cards, "KAPPA_CNN_STD": cnn_cards,
                      "KAPPA_KS93": [("KS93FWHM", (fwhm, "[arcmin] Gaussian smoothing FWHM"))]})
    hdul = fits.HDUList([fits.PrimaryHDU(header=primary)] + hdus)
    _write_fits(out_path, hdul)

    png_path = None
    if png:
        try:
            png_path = figure_reconstruction(kappa_ks93, cnn.mean, cnn.std, wcs,
                                             _png_path(out_path),
                                             title=f"{sky.source}: {counts['used']} sources, "
                                                   f"{len(models)} run(s)")
        except ImportError:
            warnings.warn("matplotlib is not installed: no PNG (pip install matplotlib, or the "
                          "'plot' extra)", UserWarning, stacklevel=2)
    return Reconstruction(cnn.mean, cnn.std, kappa_ks93, density, cnn.runs, wcs, geometry, center,
                          counts, z, fill, out_path, png_path, fwhm, weights)


# ## Command line
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


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(
        description="mass maps of a shear catalog in sky coordinates (§4.2)")
    p.add_argument("catalog",
                   help="FITS, CSV or ECSV table: RA, Dec (deg), e1, e2, weight or sigma")
    p.add_argument("--models", required=True, nargs="+", help="run directories or .keras files")
    p.add_argument("--out", required=True,
                   help="output FITS (KAPPA_CNN, KAPPA_CNN_STD, KAPPA_KS93, DENSITY); "
                        "a PNG like Fig. 11 goes beside it")
    p.add_argument("--ra-col", default="ra",
                   help="RA column in degrees (names match case-insensitively)")
    p.add_argument("--dec-col", default="dec", help="Dec column in degrees")
    p.add_argument("--e1-col", default="e1")
    p.add_argument("--e2-col", default="e2")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weight-col", default=None,
                   help="inverse-variance weight, σ = 1/sqrt(w) (default: weight)")
    g.add_argument("--sigma-col", default=None,
                   help="per-component ellipticity error instead of a weight")
    p.add_argument("--keep-weights", action="store_true",
                   help="use the weights as given "
                        "(default: scale them so that <w (e1²+e2²)/2> = 1)")
    p.add_argument("--coordinate-system", default="euclidean", choices=COORDINATE_SYSTEMS,
                   help="frame of e1, e2 (CLMM): euclidean = x West (default), celestial = x East")
    p.add_argument("--center", type=_parse_center, default=None,
                   help="field centre RA,DEC in degrees or HH:MM:SS,DD:MM:SS (default: the "
                        "catalog's; write --center=RA,-DEC for a negative first value)")
    p.add_argument("--size", type=float, default=None,
                   help="field side in arcmin (default: the catalog's extent)")
    p.add_argument("--z-lens", type=float, default=None,
                   help="cluster redshift (default: the training's)")
    p.add_argument("--z-source", type=float, default=None,
                   help="effective source redshift (default: the training's)")
    p.add_argument("--stride", type=int, default=12,
                   help="offset step in input pixels, a multiple of 3 (paper: 3 = 1,444 offsets)")
    p.add_argument("--orientations", type=int, default=1, choices=[1, 6], help="paper: 6")
    p.add_argument("--ks93-fwhm", type=float, default=None,
                   help="Gaussian smoothing of KAPPA_KS93, arcmin (default: 1.25 sqrt(25/n), n the "
                        "catalog's density in arcmin^-2)")
    p.add_argument("--outside", default="noise", choices=OUTSIDE_MODES,
                   help="what the CNN sees where the catalog has no source: shear-free noise "
                        "at the catalog's density (default) or empty no-data pixels")
    p.add_argument("--fills", type=int, default=NOISE_FILLS,
                   help="noise fills averaged per run where a fill adds a source "
                        f"(default {NOISE_FILLS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise fills")
    p.add_argument("--no-png", action="store_true", help="skip the figure")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def _report(args, res):
    c, g, f = res.counts, res.geometry, res.fill
    print(f"{args.catalog}: {c['used']} sources in the field of {c['rows']} rows (dropped: "
          f"{c['dropped_nan']} NaN, {c['dropped_weight']} bad weight, {c['dropped_ellipticity']} "
          f"|e| >= {MAX_ELLIPTICITY:g}; outside the field: {c['context']} seen by the CNN, "
          f"{c['unused']} unused)")
    print(f"field: {g.side_arcmin:.2f}′ about RA {res.center[0]:.5f}°, Dec {res.center[1]:.5f}° "
          f"({g.npix}² pixels of {g.pixel_arcsec:.2f}″, {g.n_tiles} tile(s), "
          f"{len(res.runs)} run(s))")
    w = res.weights
    print(f"weights: <w (e1²+e2²)/2> = {w['scale']:.3f}; multiplied by {w['factor']:.3f}")
    print(f"KAPPA_KS93 smoothed by {res.ks93_fwhm_arcmin:.2f}′ FWHM")
    if f["mode"] == "noise":
        print(f"no-data regions: shear-free noise at the catalog's density, {f['n']} fill(s) "
              f"where a fill adds (seed {f['seed']}; their noise left in KAPPA_CNN: "
              f"{f['err']:.4f} median)")
    else:
        print("no-data regions: empty (no-data pixels)")
    print(f"{f['passes']} mosaic pass(es) over tiles per run; {f['skipped']} tile(s) "
          "without sources skipped")
    print(f"wrote {res.path} ({', '.join(MAP_EXTENSIONS)})"
          + (f" and {res.png_path}" if res.png_path else ""))


def main(argv=None):
    """Reconstruct a catalog into a FITS mass map; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            res = reconstruct(args.catalog, args.models, args.out, ra_col=args.ra_col,
                              dec_col=args.dec_col, e1_col=args.e1_col, e2_col=args.e2_col,
                              weight_col=None if args.sigma_col else (args.weight_col or "weight"),
                              sigma_col=args.sigma_col, coordinate_system=args.coordinate_system,
                              center=args.center, size_arcmin=args.size, z_lens=args.z_lens,
                              z_source=args.z_source, stride=args.stride,
                              orientations=args.orientations, ks93_fwhm_arcmin=args.ks93_fwhm,
                              outside=args.outside, n_fills=args.fills, seed=args.seed,
                              rescale_weights=not args.keep_weights, png=not args.no_png,
                              overwrite=args.overwrite, progress=True)
    except (ValueError, TypeError, OSError) as exc:
        print(f"reconstruct_catalog: error: {exc}", file=sys.stderr)
        return 2
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"reconstruct_catalog: note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    _report(args, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
