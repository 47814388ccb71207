"""wlcnn: weak-lensing mass reconstruction of galaxy clusters with a CNN.

A single-module reference implementation of Hong, Park, Jee, Bak & Cha (2021),
"Weak-lensing Mass Reconstruction of Galaxy Clusters with Convolutional Neural
Network" (ApJ 923, 266).  The module reads in the paper's order:

* the paper's numbers (``Config``);
* §2.1   weak-lensing basics: Σ_c (eq. 4), reduced shear (eq. 2), lensed
         ellipticity (eq. 7);
* §2.2   shear from convergence (eq. 8-9) and the Kaiser & Squires (1993)
         inversion (eq. 10);
* §2.3.1 training data: NFW halos, the simulated cluster fields (ΛCDM theory
         tables, halos along the line of sight, a log-normal large-scale
         field), clusters cut from ray-traced maps, source catalogs with shape
         and measurement noise, bright-star masks, dataset files;
* §2.3.2 gridding of a catalog onto the network's input pixels (the Cython
         extension ``_grid``), augmentation and the tf.data input pipeline,
         the CNN of Table 1 with FFT convolutions, its loss (eq. 11-12, A1),
         and training;
* §3     evaluation: mosaics, the baselines, the metrics R, D, M_cl and
         Δ_peak (eq. 13-16), Table 2 and the figures;
* the command line (``python -m wlcnn --help``).

Conventions (``DESIGN.md``): arrays are indexed ``[row, col] = [y, x]``; pixel
``(i, j)`` has its centre at ``x = (j + 1/2) * pixel``, ``y = (i + 1/2) * pixel``
arcsec from the field's lower-left corner; x grows to the right (West on the
sky), y grows up (North).  Complex shear ``g = g1 + i g2``: ``g1 > 0`` stretches
along x, ``g2 > 0`` along the line x = y.
"""
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

try:  # the compiled gridder; the NumPy reference below is the fallback
    import _grid
except ImportError:  # pragma: no cover - exercised only without a build
    _grid = None

__version__ = "0.1.0"


# ---------------------------------------------------------------------------
# The paper's numbers
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Every number the paper fixes, in one place (frozen; use
    ``dataclasses.replace`` to change one).

    Each default names the section of Hong et al. (2021) or the DESIGN.md
    choice it comes from.  Angles are in arcsec or arcmin as the name says.
    """

    # -- cosmology and redshifts (§1, §2.3.1) --------------------------------
    H0: float = 70.0                    # km/s/Mpc, §1
    Om0: float = 0.3                    # flat ΛCDM, §1
    z_lens: float = 0.5                 # all lensing mass at z_l, §2.3.1
    z_source: float = 1.5               # all sources at z_s, §2.3.1
    # -- field and input grid (§2.3.1, §2.3.2) -------------------------------
    field_arcmin: float = 32.0          # side of a cluster field, §2.3.1
    npix: int = 500                     # input grid 500 x 500, §2.3.2
    fwhm_arcsec: float = 7.0            # Gaussian gridding kernel, §2.3.2
    kernel_cut_sigma: float = 4.0       # truncation radius in σ_W (DESIGN "Gridding")
    empty_pixel_error: float = 1.0      # Δε of a pixel with no source (DESIGN "Gridding")
    # -- sources and noise (§2.3.1, DESIGN "Sources and noise") ---------------
    source_density_arcmin2: float = 25.0  # §2.3.1 (25,600 in 32' x 32')
    sigma_e: float = 0.24               # intrinsic shape noise per component, §2.3.1
    mag_min: float = 21.5               # V-band distribution starts, §2.3.1 (Kim+2019)
    mag_peak: float = 25.5              # ... peaks, §2.3.1
    mag_max: float = 27.5               # ... is cut, §2.3.1
    count_slope: float = 0.3            # d log10 N / dm of faint galaxy counts (our choice)
    completeness_width_mag: float = 0.5  # width of the completeness roll-off (our choice)
    sigma_meas_floor: float = 0.03      # measurement error of bright sources (our choice)
    sigma_meas_at_cut: float = 0.25     # extra error at mag_max; scales as flux^-1 (our choice)
    # -- bright-star masks (§3.5) --------------------------------------------
    stars_per_400arcmin2: tuple = (1, 2)   # 1-2 per 20' x 20', §3.5
    star_radius_arcmin: tuple = (0.5, 2.0)  # uniform radius, §3.5
    star_near_peak_arcmin: float = 1.0  # one mask within 1' of the peak, §3.5
    # -- subfields, network output and mosaic (§2.3.2, Table 1) ---------------
    subfield_npix: int = 386            # network input, §2.3.2
    offset_step: int = 3                # offsets 0, 3, ..., 111 (DESIGN "Grids")
    n_offsets: int = 38                 # 38 x 38 = 1,444 offsets, §2.3.2
    first_kernel: int = 3               # Table 1 Conv2D-1
    pool: int = 3                       # Table 1 AvgPool
    output_npix: int = 128              # Table 1 output
    mosaic_npix: int = 166              # full-field output grid (DESIGN "Grids")
    # -- network (§2.3.2, Table 1, Appendix A) --------------------------------
    filter_size: int = 49               # TransConv2D-# / Conv2D-# filters, §2.3.2
    n_filters: int = 8                  # channels of every block, Table 1
    n_filters_final: int = 16           # TransConv2D-5, Table 1
    loss_border_pix: int = 14           # outer output pixels not scored, §2.3.2
    focal_floor: float = 0.01           # guard of eq. 12's denominator (DESIGN "Lessons")
    # -- training (§2.3.2) -----------------------------------------------------
    learning_rate: float = 1e-5         # Adam, §2.3.2
    batch_size: int = 50                # §2.3.2
    steps_per_epoch: int = 20           # §2.3.2
    epochs: int = 200                   # §2.3.2
    n_runs: int = 10                    # independent runs, §2.3.2
    clipnorm: float = 1.0               # gradient-norm clipping (DESIGN "Lessons")

    @property
    def pixel_arcsec(self) -> float:
        """Input pixel side in arcsec (3.84″ for the paper)."""
        return self.field_arcmin * 60.0 / self.npix

    @property
    def sigma_w_arcsec(self) -> float:
        """Standard deviation of the Gaussian gridding kernel in arcsec."""
        return self.fwhm_arcsec / FWHM_PER_SIGMA


PAPER = Config()

#: FWHM of a Gaussian in units of its standard deviation, 2 sqrt(2 ln 2).
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def config_from_dict(d):
    """A Config from a dict of its fields (as JSON stores it: lists back to tuples)."""
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def cosmology(config: Config = PAPER) -> FlatLambdaCDM:
    """The flat ΛCDM cosmology of the paper (§1) as an astropy object."""
    return FlatLambdaCDM(H0=config.H0, Om0=config.Om0)


# ---------------------------------------------------------------------------
# §2.1 Basic weak-lensing theory (eq. 1-7)
# ---------------------------------------------------------------------------
def sigma_crit(z_l, z_s, cosmo=None):
    """Critical surface mass density Σ_c.

    Parameters
    ----------
    z_l, z_s : float
        Lens and source redshifts; ``z_s`` must exceed ``z_l``.
    cosmo : astropy.cosmology.FLRW, optional
        Defaults to the paper's flat ΛCDM (H0 = 70, Ωm = 0.3).

    Returns
    -------
    astropy.units.Quantity
        Σ_c in M☉ / Mpc².

    Notes
    -----
    Eq. 4 of the paper: Σ_c = c² D_s / (4 π G D_l D_ls), with angular-diameter
    distances; D_ls is the lens-to-source distance of a flat universe.
    """
    z_l = float(z_l)
    z_s = float(z_s)
    if not (np.isfinite(z_l) and np.isfinite(z_s)) or z_l <= 0:
        raise ValueError(f"redshifts must be finite with z_l > 0, got z_l={z_l}, z_s={z_s}")
    if z_s <= z_l:
        raise ValueError(f"source redshift z_s={z_s} must exceed lens redshift z_l={z_l}")
    cosmo = cosmology() if cosmo is None else cosmo
    d_l = cosmo.angular_diameter_distance(z_l)
    d_s = cosmo.angular_diameter_distance(z_s)
    d_ls = cosmo.angular_diameter_distance(z_l, z_s)
    return (const.c**2 * d_s / (4 * np.pi * const.G * d_l * d_ls)).to(u.Msun / u.Mpc**2)


def reduced_shear(gamma1, gamma2, kappa):
    """Reduced shear g = γ / (1 − κ) (eq. 2), as a complex array.

    Parameters
    ----------
    gamma1, gamma2, kappa : array_like
        Shear components and convergence, same shape.

    Returns
    -------
    numpy.ndarray of complex128
        g = (γ1 + i γ2) / (1 − κ).  Where κ = 1 exactly (a critical curve)
        g is undefined: a ValueError is raised rather than returning inf.
    """
    gamma = np.asarray(gamma1, dtype=np.float64) + 1j * np.asarray(gamma2, dtype=np.float64)
    kappa = np.asarray(kappa, dtype=np.float64)
    if np.any(kappa == 1.0):
        raise ValueError("kappa == 1 (a critical curve): reduced shear is undefined there")
    return gamma / (1.0 - kappa)


def lens_ellipticity(e, g):
    """Lensed ellipticity ε of a source with intrinsic ellipticity e.

    Parameters
    ----------
    e : array_like of complex
        Intrinsic ellipticity e1 + i e2, |e| < 1, with the (a − b)/(a + b)
        definition (eq. 5).
    g : array_like of complex
        Reduced shear g1 + i g2 at the source, broadcastable to ``e``.

    Returns
    -------
    numpy.ndarray of complex128
        ε = (e + g) / (1 + g* e) where |g| ≤ 1 (eq. 7), and
        ε = (1 + g e*) / (e* + g*) where |g| > 1 (inside the critical curve;
        Seitz & Schneider 1997).
    """
    e = np.asarray(e)
    g = np.asarray(g)
    for name, a in (("e", e), ("g", g)):
        if not (np.issubdtype(a.dtype, np.complexfloating) or np.issubdtype(a.dtype, np.number)):
            raise TypeError(f"{name} must be a numeric (complex) array, got dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf")
    e = e.astype(np.complex128)
    g = g.astype(np.complex128)
    if np.any(np.abs(e) >= 1.0):
        raise ValueError("intrinsic ellipticity must satisfy |e| < 1")
    weak = np.abs(g) <= 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        eps_weak = (e + g) / (1.0 + np.conj(g) * e)
        eps_strong = (1.0 + g * np.conj(e)) / (np.conj(e) + np.conj(g))
    return np.where(weak, eps_weak, eps_strong)


# ---------------------------------------------------------------------------
# §2.2 Shear from convergence (eq. 8-9) and Kaiser & Squires (eq. 10)
# ---------------------------------------------------------------------------
def _odd_fast_len(n):
    """The smallest odd length ≥ n whose factors are 3, 5 and 7 (a fast FFT)."""
    m = n + 1 - n % 2
    while True:
        r = m
        for p in (3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


def _padded_shape(shape, pad):
    """FFT grid for a map of ``shape``: itself, or at least twice each side.

    Padded grids are odd (e.g. 1,029 for 500 pixels), so they have no Nyquist
    mode: the inversion is then exact and exactly equivariant under 90°
    rotations and mirrors (an even grid's Nyquist modes have no sign of k).
    """
    if not pad:
        return tuple(shape)
    return tuple(_odd_fast_len(2 * n) for n in shape)


@functools.lru_cache(maxsize=8)
def _ks_kernel(shape):
    """Fourier multipliers (cos 2φ_k, sin 2φ_k) on an rfft2 grid of ``shape``.

    With k1 along x (axis 1) and k2 along y (axis 0):
    D̂ = [(k1² − k2²) + 2i k1 k2] / k².  The k = 0 mode is set to zero: the
    mean convergence is not constrained by shear (mass-sheet degeneracy, §2.2).
    """
    k2 = scipy.fft.fftfreq(shape[0])[:, None]
    k1 = scipy.fft.rfftfreq(shape[1])[None, :]
    ksq = k1**2 + k2**2
    ksq[0, 0] = 1.0
    c = (k1**2 - k2**2) / ksq
    s = 2.0 * k1 * k2 / ksq
    c[0, 0] = 0.0
    s[0, 0] = 0.0
    # On an even grid the Nyquist row and column have an ambiguous sign of k,
    # so sin 2φ_k (odd in k) is set to zero there -- what taking the real part
    # of a complex inverse FFT does in the classic implementations (lenspack),
    # whose numbers ``pad=False`` reproduces.  Those modes are not invertible.
    if shape[0] % 2 == 0:
        s[shape[0] // 2, :] = 0.0
    if shape[1] % 2 == 0:
        s[:, -1] = 0.0
    if shape[0] % 2 == 0 and shape[1] % 2 == 0:
        s[shape[0] // 2, -1] = 1.0  # the self-conjugate corner, k1 = k2 = -1/2
    c.flags.writeable = s.flags.writeable = False  # cached: shared by every call
    return c, s


def _check_map(name, a):
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map [y, x], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def shear_from_kappa(kappa, pad=True):
    """Shear (γ1, γ2) of a convergence map.

    Parameters
    ----------
    kappa : array_like, shape (ny, nx)
        Convergence on a regular grid [y, x].
    pad : bool
        If True (default) the map is zero-padded to at least twice each side,
        i.e. the mass outside the map is taken to be zero (the isolated-field
        reading).  If False the map is treated as periodic.

    Returns
    -------
    gamma1, gamma2 : numpy.ndarray, shape (ny, nx)

    Notes
    -----
    Eq. 8-9 of the paper, γ = (1/π) D * κ with D = −1/(x1 − i x2)², evaluated
    in Fourier space as γ̂ = [(k1² − k2²) + 2i k1 k2] / k² κ̂ (Kaiser & Squires
    1993).  The mean of κ (k = 0) produces no shear.
    """
    kappa = _check_map("kappa", kappa)
    shape = _padded_shape(kappa.shape, pad)
    kk = scipy.fft.rfft2(kappa, s=shape)
    c, s = _ks_kernel(shape)
    ny, nx = kappa.shape
    gamma1 = scipy.fft.irfft2(c * kk, s=shape)[:ny, :nx]
    gamma2 = scipy.fft.irfft2(s * kk, s=shape)[:ny, :nx]
    return gamma1, gamma2


def ks93(g1, g2, pad=True, return_bmode=False):
    """Kaiser & Squires (1993) convergence from a shear map.

    Parameters
    ----------
    g1, g2 : array_like, shape (ny, nx)
        Shear (or, in the weak limit, reduced shear / mean ellipticity) [y, x].
    pad : bool
        True (default): zero-pad to at least twice each side against the
        periodic wrap-around of the FFT (§2.2's finite-field problem).  False:
        the plain periodic inversion, the same numbers as the classic
        reference implementations (e.g. lenspack's ``ks93``).
    return_bmode : bool
        Also return the B mode (curl part), a noise diagnostic.

    Returns
    -------
    kappa_e : numpy.ndarray, shape (ny, nx)
        E-mode convergence.
    kappa_b : numpy.ndarray, shape (ny, nx)
        Only if ``return_bmode``.

    Notes
    -----
    Eq. 10 of the paper, κ = (1/π) D* * γ, i.e. κ̂ = D̂* γ̂ in Fourier space.
    The k = 0 mode is set to zero, so the mean of the (padded) field is zero:
    KS93 fixes κ only up to the mass-sheet degeneracy κ → λκ + (1 − λ), and we
    choose the zero-mean sheet.  With ``pad=True`` it is the padded field that
    has zero mean, so the unpadded map keeps a small non-zero mean.
    """
    g1 = _check_map("g1", g1)
    g2 = _check_map("g2", g2)
    if g1.shape != g2.shape:
        raise ValueError(f"g1 and g2 differ in shape: {g1.shape} vs {g2.shape}")
    shape = _padded_shape(g1.shape, pad)
    f1 = scipy.fft.rfft2(g1, s=shape)
    f2 = scipy.fft.rfft2(g2, s=shape)
    c, s = _ks_kernel(shape)
    ny, nx = g1.shape
    kappa_e = scipy.fft.irfft2(c * f1 + s * f2, s=shape)[:ny, :nx]
    if not return_bmode:
        return kappa_e
    kappa_b = scipy.fft.irfft2(c * f2 - s * f1, s=shape)[:ny, :nx]
    return kappa_e, kappa_b


# ---------------------------------------------------------------------------
# §2.3.1 Training data: NFW clusters (Navarro, Frenk & White 1997)
# ---------------------------------------------------------------------------
def nfw_scale(m200_msun, c200, z, cosmo=None):
    """Scale radius and characteristic surface density of an NFW halo.

    Parameters
    ----------
    m200_msun : float
        Mass within r200, the radius enclosing 200 times the critical density
        at ``z`` (M200c), in M☉.
    c200 : float
        Concentration r200 / r_s.
    z : float
        Halo redshift.
    cosmo : astropy.cosmology.FLRW, optional

    Returns
    -------
    r_s_mpc : float
        Scale radius in physical Mpc.
    sigma_s : float
        r_s δ_c ρ_c in M☉/Mpc², the unit of the Wright & Brainerd profiles.
    """
    if not (m200_msun > 0 and c200 > 0):
        raise ValueError(f"m200_msun and c200 must be positive, got {m200_msun}, {c200}")
    cosmo = cosmology() if cosmo is None else cosmo
    rho_c = cosmo.critical_density(z).to_value(u.Msun / u.Mpc**3)
    r200 = (3.0 * m200_msun / (800.0 * np.pi * rho_c)) ** (1.0 / 3.0)
    delta_c = (200.0 / 3.0) * c200**3 / (np.log1p(c200) - c200 / (1.0 + c200))
    r_s = r200 / c200
    return r_s, r_s * delta_c * rho_c


def _nfw_f(x):
    """arccosh(1/x)/sqrt(1−x²) (x < 1), arccos(1/x)/sqrt(x²−1) (x > 1), 1 (x = 1)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.ones_like(x)
    lo = x < 1.0
    hi = x > 1.0
    out[lo] = np.arccosh(1.0 / x[lo]) / np.sqrt(1.0 - x[lo] ** 2)
    out[hi] = np.arccos(1.0 / x[hi]) / np.sqrt(x[hi] ** 2 - 1.0)
    return out


def nfw_sigma(r_mpc, m200_msun, c200, z, cosmo=None):
    """Projected surface density Σ(R) of an NFW halo.

    Parameters
    ----------
    r_mpc : array_like
        Projected radius in physical Mpc (> 0).
    m200_msun, c200, z, cosmo
        As in :func:`nfw_scale`.

    Returns
    -------
    numpy.ndarray
        Σ(R) in M☉/Mpc².

    Notes
    -----
    Wright & Brainerd (2000) eq. 11: Σ = 2 r_s δ_c ρ_c [1 − F(x)] / (x² − 1),
    x = R / r_s; at x = 1 the limit is 2 r_s δ_c ρ_c / 3 (a series is used
    within 1e-3 of it to avoid 0/0).
    """
    r_s, sigma_s = nfw_scale(m200_msun, c200, z, cosmo)
    x = np.asarray(r_mpc, dtype=np.float64) / r_s
    if np.any(x <= 0):
        raise ValueError("r_mpc must be positive")
    near = np.abs(x - 1.0) < 1e-3
    xs = np.where(near, 2.0, x)
    val = (1.0 - _nfw_f(xs)) / (xs**2 - 1.0)
    # d/dx [(1 - F)/(x^2 - 1)] at x = 1 is -2/5: first-order series.
    series = 1.0 / 3.0 - 0.4 * (x - 1.0)
    return 2.0 * sigma_s * np.where(near, series, val)


def nfw_mean_sigma(r_mpc, m200_msun, c200, z, cosmo=None):
    """Mean surface density Σ̄(<R) inside projected radius R of an NFW halo.

    Notes
    -----
    Wright & Brainerd (2000) eq. 13: Σ̄ = 4 r_s δ_c ρ_c [F(x) + ln(x/2)] / x².
    The NFW tangential shear is γ_t = [Σ̄(<R) − Σ(R)] / Σ_c.
    """
    r_s, sigma_s = nfw_scale(m200_msun, c200, z, cosmo)
    x = np.asarray(r_mpc, dtype=np.float64) / r_s
    if np.any(x <= 0):
        raise ValueError("r_mpc must be positive")
    return 4.0 * sigma_s * (_nfw_f(x) + np.log(x / 2.0)) / x**2


def nfw_kappa_map(m200_msun, c200, x0_arcsec, y0_arcsec, npix, pixel_arcsec,
                  z_l=PAPER.z_lens, z_s=PAPER.z_source, cosmo=None,
                  axis_ratio=1.0, angle_deg=0.0, oversample=4, core_oversample=32):
    """Pixel-averaged convergence map of an (elliptical) NFW halo.

    Parameters
    ----------
    m200_msun, c200 : float
        Halo mass M200c in M☉ and concentration.
    x0_arcsec, y0_arcsec : float
        Halo centre, arcsec from the lower-left corner of the map.
    npix : int
        Map side in pixels (the map is square, [y, x]).
    pixel_arcsec : float
        Pixel side in arcsec.
    z_l, z_s : float
        Halo and source redshifts.
    axis_ratio : float
        Projected minor/major axis ratio q ∈ (0, 1]; the elliptical radius
        r² = q x'² + y'²/q keeps the area inside an isodensity contour.
    angle_deg : float
        Position angle of the major axis, counter-clockwise from +x.
    oversample, core_oversample : int
        Sub-pixel samples per side everywhere and in the 7 × 7 pixels around
        the centre, so the cusp is averaged over the pixel rather than sampled
        at a pixel centre.

    Returns
    -------
    numpy.ndarray, shape (npix, npix)
        κ = Σ / Σ_c averaged over each pixel.
    """
    if not 0 < axis_ratio <= 1:
        raise ValueError(f"axis_ratio must be in (0, 1], got {axis_ratio}")
    cosmo = cosmology() if cosmo is None else cosmo
    sc = sigma_crit(z_l, z_s, cosmo).value
    mpc_per_arcsec = (cosmo.angular_diameter_distance(z_l).to_value(u.Mpc)
                      * (1 * u.arcsec).to_value(u.rad))
    cos_t, sin_t = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))

    def kappa_at(x, y):
        dx, dy = x - x0_arcsec, y - y0_arcsec
        xp = dx * cos_t + dy * sin_t
        yp = -dx * sin_t + dy * cos_t
        r = np.sqrt(axis_ratio * xp**2 + yp**2 / axis_ratio) * mpc_per_arcsec
        return nfw_sigma(np.maximum(r, 1e-9), m200_msun, c200, z_l, cosmo) / sc

    def averaged(i0, j0, n_i, n_j, s):
        sub = (np.arange(s) + 0.5) / s
        y = ((i0 + np.arange(n_i))[:, None] + sub[None, :]).ravel() * pixel_arcsec
        x = ((j0 + np.arange(n_j))[:, None] + sub[None, :]).ravel() * pixel_arcsec
        k = kappa_at(x[None, :], y[:, None])
        return k.reshape(n_i, s, n_j, s).mean(axis=(1, 3))

    kappa = averaged(0, 0, npix, npix, oversample)
    ic = int(np.floor(y0_arcsec / pixel_arcsec))
    jc = int(np.floor(x0_arcsec / pixel_arcsec))
    half = 3
    i0, i1 = max(ic - half, 0), min(ic + half + 1, npix)
    j0, j1 = max(jc - half, 0), min(jc + half + 1, npix)
    if i1 > i0 and j1 > j0:
        kappa[i0:i1, j0:j1] = averaged(i0, j0, i1 - i0, j1 - j0, core_oversample)
    return kappa


_HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------
# §2.3.1 Simulated cluster fields: choices
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SimulatorConfig:
    """Every choice of the cluster-field simulator (frozen; use
    ``dataclasses.replace`` to change one).

    Masses are M200c (200 × the critical density at the halo's redshift) in
    M☉; distances in physical Mpc unless the name says otherwise.  Each default
    names its source; "calibrated" marks the numbers tuned so that the truth
    aperture masses match the paper's Figs. 6-7 (see ``examples/sim_stats.py``).
    """

    # -- theory tables (make_theory_tables.py) --------------------------------
    theory_dir: str | None = None          # None: the tables shipped with wlcnn
    # -- main cluster (issue 3; paper §2.3.1, Figs. 2, 6, 7) ------------------
    main_m200_min_msun: float = 3.0e14     # calibrated: M_cl 14-59 (5-95 %), median 26 (Figs. 6-7)
    main_m200_max_msun: float = 2.0e15     # the most massive clusters at z ≈ 0.5
    main_offset_max_arcmin: float = 2.0    # "approximately centered" (§2.3.1); uniform in a disc
    # Projected ellipticity ε = 1 − b/a ~ N(0.46, 0.20) clipped to
    # [0, ellipticity_max]: mean ⟨1 − b/a⟩ = 0.46 ± 0.04 from 2-D weak-lensing
    # fits of 18 clusters (Oguri et al. 2010, MNRAS 405, 2215); the spread is
    # our choice, about that of their individual clusters.
    ellipticity_mean: float = 0.46
    ellipticity_std: float = 0.20
    ellipticity_max: float = 0.7           # keeps q = b/a ≥ 0.3 (our choice)
    # c(M): Duffy et al. (2008, MNRAS 390, L64) full sample, M200c:
    # c = A (M / M_pivot)^B (1 + z)^C with M_pivot = 2e12 M☉/h.
    duffy_a: float = 5.71
    duffy_b: float = -0.084
    duffy_c: float = -0.47
    duffy_pivot_msun_h: float = 2.0e12
    concentration_scatter_ln: float = 0.33  # σ_c/c ≈ 1/3, Bhattacharya et al. 2013 §4.3
    truncation_r200: float = 1.0            # sharp truncation at r200 (halo-model convention,
    #                                         Takada & Jain 2003); mass = M200 exactly
    # -- merging companions / substructure (issue 3) --------------------------
    merger_fraction: float = 0.3            # ~40 % of X-ray clusters show substructure
    #                                         (Jones & Forman 1999); we take the lower side
    n_companions: tuple = (2, 3)            # clumps per merging system, uniform (issue 3)
    companion_mass_ratio: tuple = (0.1, 0.5)  # log-uniform M_comp / M_main (minor to major mergers)
    companion_separation_mpc: tuple = (0.3, 1.2)  # uniform projected distance from the main halo
    # -- field halos along the line of sight (issue 7) ------------------------
    field_m200_min_msun: float = 3.0e13    # groups and up; lighter halos live in the log-normal field
    field_m200_max_msun: float = 3.0e15    # top of the mass-function table
    halo_dz: float = 0.01                  # redshift cells of the Poisson draw
    halo_dlog10m: float = 0.02             # mass cells of the Poisson draw
    # -- log-normal LSS (issue 7) ---------------------------------------------
    kappa0: float | None = None             # None: Hilbert, Hartlap & Schneider 2011 eq. 38 at z_s
    pad_factor: int = 2                     # torus side / field side (DESIGN "Lensing": ≥ 2)
    large_scale_factor: int = 8             # modes below the torus's fundamental come from an
    #                                         8× larger torus (512' for the paper's field)
    large_scale_grid: int = 32              # coarse grid per side for the shear of those modes
    lss_ell_max: float = 2.5e4              # taper exp(−(ℓ/ℓ_max)⁴) of the log-normal's power
    #                                         (see ``lss_cl``)
    # -- resolution of the truth maps -----------------------------------------
    # Gaussian FWHM applied to every painted halo: the pixel of the paper's
    # truth maps (MassiveNuS: 512² pixels over 3.5°, 0.41′).  Calibrated: it
    # brings the mosaic peak κ to Fig. 2's 0.1-0.5; 0 keeps cuspy NFW cores.
    halo_smoothing_fwhm_arcsec: float = 24.6
    # -- pixel averaging ------------------------------------------------------
    oversample: int = 4                     # sub-samples per side near a halo centre
    oversample_radius_pix: float = 6.0      # ... within this many pixels (error ∝ (pixel/r)²/6 beyond)
    core_oversample: int = 16               # sub-samples per side in the 3 × 3 pixels at the cusp


SIMULATOR = SimulatorConfig()


def kappa0_hilbert2011(z_s):
    """Shift parameter κ0 of the log-normal convergence of sources at ``z_s``.

    Parameters
    ----------
    z_s : float
        Source redshift.

    Returns
    -------
    float
        κ0 > 0; the log-normal κ is bounded below by −κ0.

    Notes
    -----
    Hilbert, Hartlap & Schneider (2011, A&A 536, A85) eq. 38, their fit to the
    minimum (empty-beam) convergence in the Millennium Simulation:
    κ0 = 0.008 z + 0.029 z² − 0.0079 z³ + 0.00065 z⁴ (0.0539 at z_s = 1.5).
    """
    z = float(z_s)
    return 0.008 * z + 0.029 * z**2 - 0.0079 * z**3 + 0.00065 * z**4


# ---------------------------------------------------------------------------
# §2.3.1 Simulated cluster fields: ΛCDM theory tables
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TheoryTables:
    """The tables of ``make_theory_tables.py``, as arrays.

    Attributes
    ----------
    ell, cl_kappa : ndarray, shape (n_ell,)
        Multipoles and the convergence power spectrum C_ℓ of sources at
        ``z_source`` (Limber, halofit).
    z : ndarray, shape (n_z,)
        Redshift nodes of the mass function.
    log10_m : ndarray, shape (n_m,)
        log10 M200c [M☉] nodes.
    dn_dlnm : ndarray, shape (n_z, n_m)
        Tinker et al. (2008) mass function, comoving Mpc⁻³ per ln M.
    meta : dict
        The tables' cosmology and the command that made them.
    """

    ell: np.ndarray
    cl_kappa: np.ndarray
    z: np.ndarray
    log10_m: np.ndarray
    dn_dlnm: np.ndarray
    meta: dict


@functools.lru_cache(maxsize=4)
def _read_theory(directory):
    cl = Table.read(os.path.join(directory, "theory_cl.ecsv"))
    mf = Table.read(os.path.join(directory, "theory_hmf.ecsv"))
    z = np.unique(np.asarray(mf["z"]))
    lm = np.unique(np.asarray(mf["log10_m200c_msun"]))
    n = np.asarray(mf["dn_dlnm_mpc3"], dtype=np.float64)
    if n.size != z.size * lm.size:
        raise ValueError(f"{directory}/theory_hmf.ecsv is not a full z × M grid")
    order = np.lexsort((np.asarray(mf["log10_m200c_msun"]), np.asarray(mf["z"])))
    return TheoryTables(ell=np.asarray(cl["ell"], dtype=np.float64),
                        cl_kappa=np.asarray(cl["cl_kappa"], dtype=np.float64),
                        z=z, log10_m=lm, dn_dlnm=n[order].reshape(z.size, lm.size),
                        meta=dict(cl.meta))


def theory_tables(config: Config = PAPER, sim: SimulatorConfig = SIMULATOR) -> TheoryTables:
    """Read the ΛCDM theory tables and check they match ``config``.

    Parameters
    ----------
    config : Config
        Cosmology (H0, Om0) and source redshift the tables must have.
    sim : SimulatorConfig
        ``theory_dir`` says where the tables are.

    Returns
    -------
    TheoryTables

    Raises
    ------
    ValueError
        If the tables were made for another cosmology or source redshift; the
        message gives the command that makes matching ones.
    """
    directory = sim.theory_dir or os.path.join(_HERE, "theory")
    t = _read_theory(os.path.abspath(directory))
    want = {"H0": config.H0, "Om0": config.Om0, "z_source": config.z_source}
    bad = {k: (t.meta.get(k), v) for k, v in want.items()
           if t.meta.get(k) is None or not np.isclose(t.meta[k], v, rtol=1e-6)}
    if bad:
        raise ValueError(
            f"theory tables in {directory} were made for "
            + ", ".join(f"{k}={a}" for k, (a, _) in bad.items())
            + " but the config has " + ", ".join(f"{k}={b}" for k, (_, b) in bad.items())
            + ". Regenerate them (needs pyccl and camb): python make_theory_tables.py "
            f"--h {config.H0 / 100} --omega-m {config.Om0} --z-source {config.z_source} "
            "--out-dir DIR, and set SimulatorConfig(theory_dir=DIR)")
    return t


def theory_cl(ell, config: Config = PAPER, sim: SimulatorConfig = SIMULATOR):
    """ΛCDM convergence power spectrum C_ℓ at arbitrary ℓ (log-log interpolation).

    Parameters
    ----------
    ell : array_like
        Multipoles; outside the table C_ℓ is extended as a power law in ℓ
        (constant slope of the last two nodes).

    Returns
    -------
    ndarray
        C_ℓ, same shape as ``ell`` (0 where ℓ ≤ 0).
    """
    t = theory_tables(config, sim)
    ell = np.asarray(ell, dtype=np.float64)
    out = np.zeros_like(ell)
    pos = ell > 0
    lx, ly = np.log(t.ell), np.log(t.cl_kappa)
    x = np.log(ell[pos])
    y = np.interp(x, lx, ly)
    lo, hi = x < lx[0], x > lx[-1]
    y[lo] = ly[0] + (x[lo] - lx[0]) * (ly[1] - ly[0]) / (lx[1] - lx[0])
    y[hi] = ly[-1] + (x[hi] - lx[-1]) * (ly[-1] - ly[-2]) / (lx[-1] - lx[-2])
    out[pos] = np.exp(y)
    return out


# ---------------------------------------------------------------------------
# §2.3.1 Simulated cluster fields: halos (truncated NFW)
# ---------------------------------------------------------------------------
def concentration_duffy08(m200_msun, z, sim: SimulatorConfig = SIMULATOR, h=PAPER.H0 / 100):
    """Median NFW concentration c200c of halos of mass M200c at redshift z.

    Parameters
    ----------
    m200_msun : array_like
        M200c in M☉.
    z : array_like
        Redshift.
    h : float
        H0 / (100 km/s/Mpc), for the fit's pivot mass 2e12 M☉/h.

    Returns
    -------
    ndarray
        c200c.

    Notes
    -----
    Duffy et al. (2008) Table 1, full sample, NFW, Δ = 200c, 0 ≤ z ≤ 2:
    c = 5.71 (M / 2e12 h⁻¹M☉)^-0.084 (1 + z)^-0.47.
    """
    m = np.asarray(m200_msun, dtype=np.float64)
    return (sim.duffy_a * (m / (sim.duffy_pivot_msun_h / h)) ** sim.duffy_b
            * (1.0 + np.asarray(z, dtype=np.float64)) ** sim.duffy_c)


def draw_concentration(m200_msun, z, rng, sim: SimulatorConfig = SIMULATOR, h=PAPER.H0 / 100):
    """c200c drawn log-normally about the Duffy et al. (2008) median.

    Parameters
    ----------
    m200_msun, z : array_like
        Masses [M☉] and redshifts, broadcastable.
    rng : numpy.random.Generator

    Returns
    -------
    ndarray
        c200c with ln c ~ N(ln c_Duffy, ``sim.concentration_scatter_ln``).
    """
    c = concentration_duffy08(m200_msun, z, sim, h)
    return c * np.exp(sim.concentration_scatter_ln * rng.standard_normal(np.shape(c)))


def _nfw_m(x):
    """m(x) = ln(1 + x) − x / (1 + x): NFW mass inside x r_s in units of 4π ρ_s r_s³."""
    return np.log1p(x) - x / (1.0 + x)


def halo_scales(m200_msun, c200, z, cosmo):
    """r200, r_s and ρ_s of NFW halos (vectorised).

    Parameters
    ----------
    m200_msun, c200, z : array_like
        M200c [M☉], concentration and redshift, broadcastable.
    cosmo : astropy.cosmology.FLRW

    Returns
    -------
    r200_mpc, rs_mpc : ndarray
        Physical Mpc.
    rho_s : ndarray
        Characteristic density δ_c ρ_c(z) [M☉/Mpc³], so that
        M(<r) = 4π ρ_s r_s³ m(r / r_s) and ``nfw_scale``'s Σ_s = ρ_s r_s.
    """
    m = np.asarray(m200_msun, dtype=np.float64)
    c = np.asarray(c200, dtype=np.float64)
    rho_c = cosmo.critical_density(np.asarray(z, dtype=np.float64)).to_value(u.Msun / u.Mpc**3)
    r200 = (3.0 * m / (800.0 * np.pi * rho_c)) ** (1.0 / 3.0)
    rs = r200 / c
    rho_s = m / (4.0 * np.pi * rs**3 * _nfw_m(c))
    return r200, rs, rho_s


def _tnfw_g(x, t):
    """Projected sphere-truncated NFW: Σ(x r_s) / (2 ρ_s r_s) for truncation at t r_s.

    Takada & Jain (2003, MNRAS 340, 580) eq. 27 with the truncation radius t
    in place of c; zero for x ≥ t.  Near x = 1 the two branches lose digits,
    so there the value is interpolated linearly across 1 ± 1e-3 (the profile
    is smooth there; error ~1e-6).
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), x.shape)
    out = np.zeros(np.broadcast(x, t).shape)
    eps = 1e-3

    def branch(xx, tt):
        s = np.sqrt(np.maximum(tt**2 - xx**2, 0.0))
        arg = (xx**2 + tt) / (xx * (1.0 + tt))
        res = np.empty_like(xx)
        lo = xx < 1.0
        a = 1.0 - xx[lo] ** 2
        res[lo] = (-s[lo] / (a * (1.0 + tt[lo]))
                   + np.arccosh(np.maximum(arg[lo], 1.0)) / a**1.5)
        hi = ~lo
        b = xx[hi] ** 2 - 1.0
        res[hi] = (s[hi] / (b * (1.0 + tt[hi]))
                   - np.arccos(np.clip(arg[hi], -1.0, 1.0)) / b**1.5)
        return res

    inside = x < t
    xi, ti = x[inside], t[inside]
    near = np.abs(xi - 1.0) < eps
    val = np.empty_like(xi)
    far = ~near
    val[far] = branch(xi[far], ti[far])
    if near.any():
        xn, tn = xi[near], ti[near]
        lo_v = branch(np.full_like(xn, 1.0 - eps), tn)
        hi_v = branch(np.full_like(xn, 1.0 + eps), tn)
        w = (xn - (1.0 - eps)) / (2 * eps)
        val[near] = (1 - w) * lo_v + w * hi_v
    out[inside] = val
    return out


def tnfw_sigma(r_mpc, m200_msun, c200, z, cosmo=None, truncation_r200=SIMULATOR.truncation_r200):
    """Surface density Σ(R) of an NFW halo truncated (sharply, in 3-D) at τ r200.

    Parameters
    ----------
    r_mpc : array_like
        Projected radius [physical Mpc], ≥ 0 (R = 0 gives +inf, the cusp).
    m200_msun, c200, z : float
        M200c [M☉], concentration, redshift.
    cosmo : astropy.cosmology.FLRW, optional
    truncation_r200 : float
        τ; the 3-D density is zero beyond τ r200.

    Returns
    -------
    ndarray
        Σ [M☉/Mpc²]; zero for R ≥ τ r200.

    Notes
    -----
    Takada & Jain (2003) eq. 27.  The projected mass is M200 m(τc)/m(c)
    (= M200 for τ = 1); inside τ r200 and for τ → ∞ it tends to the
    untruncated profile of Wright & Brainerd (2000), ``nfw_sigma``.
    """
    cosmo = cosmology() if cosmo is None else cosmo
    _, rs, rho_s = halo_scales(m200_msun, c200, z, cosmo)
    x = np.asarray(r_mpc, dtype=np.float64) / rs
    with np.errstate(divide="ignore"):
        return 2.0 * rho_s * rs * _tnfw_g(x, truncation_r200 * c200)


def tnfw_fourier(k_mpc, rs_mpc, rho_s, t):
    """Fourier transform of the sphere-truncated NFW density, ρ̃(k) [M☉].

    Parameters
    ----------
    k_mpc : array_like
        Physical wavenumber [1/Mpc].
    rs_mpc, rho_s : array_like
        Scale radius and characteristic density (``halo_scales``).
    t : array_like
        Truncation radius in units of r_s (τ c).

    Returns
    -------
    ndarray
        ρ̃(k) = Σ̃(k), the 2-D transform of the projected profile; → the
        truncated mass 4π ρ_s r_s³ m(t) as k → 0.

    Notes
    -----
    Cooray & Sheth (2002, Phys. Rep. 372, 1) eq. 81, with c → t.
    """
    kr = np.maximum(np.asarray(k_mpc, dtype=np.float64) * rs_mpc, 1e-8)
    si1, ci1 = scipy.special.sici((1.0 + t) * kr)
    si0, ci0 = scipy.special.sici(kr)
    bracket = (np.sin(kr) * (si1 - si0) - np.sin(t * kr) / ((1.0 + t) * kr)
               + np.cos(kr) * (ci1 - ci0))
    return 4.0 * np.pi * rho_s * rs_mpc**3 * bracket


def _sigma_crit_many(z, z_s, cosmo):
    """Σ_c(z, z_s) [M☉/Mpc²] for an array of lens redshifts (eq. 4); inf for z ≥ z_s."""
    z = np.asarray(z, dtype=np.float64)
    d_l = cosmo.angular_diameter_distance(z).to_value(u.Mpc)
    d_s = cosmo.angular_diameter_distance(z_s).to_value(u.Mpc)
    d_ls = cosmo.angular_diameter_distance(np.minimum(z, z_s), z_s).to_value(u.Mpc)
    k = (const.c**2 / (4 * np.pi * const.G)).to_value(u.Msun / u.Mpc)
    with np.errstate(divide="ignore"):
        return np.where(z < z_s, k * d_s / (d_l * np.maximum(d_ls, 0.0)), np.inf)


def paint_tnfw(kappa, x0_pix, y0_pix, m200_msun, c200, z, z_s, cosmo, pixel_arcsec,
               axis_ratio=1.0, angle_deg=0.0, sim: SimulatorConfig = SIMULATOR, wrap=True):
    """Add the pixel-averaged κ of one truncated (elliptical) NFW halo to a map.

    Parameters
    ----------
    kappa : ndarray, shape (ny, nx)
        Map [y, x], modified in place.
    x0_pix, y0_pix : float
        Halo centre in pixel units from the lower-left corner (pixel (i, j)
        spans [j, j+1) × [i, i+1); its centre is at (j + ½, i + ½)).
    m200_msun, c200, z : float
        M200c [M☉], concentration and redshift of the halo.
    z_s : float
        Source redshift.
    cosmo : astropy.cosmology.FLRW
    pixel_arcsec : float
    axis_ratio : float
        Projected minor/major axis ratio q ∈ (0, 1]; the elliptical radius
        r² = q x'² + y'²/q keeps the area (so the mass) of every isodensity
        contour.
    angle_deg : float
        Major-axis position angle, counter-clockwise from +x.
    sim : SimulatorConfig
        Truncation and oversampling settings.
    wrap : bool
        True: the map is periodic (the simulator's torus); False: the parts
        outside the map are dropped.

    Returns
    -------
    None

    Notes
    -----
    Σ is the sphere-truncated NFW of ``tnfw_sigma``; κ = Σ / Σ_c(z, z_s)
    (eq. 3-4).  Pixels are averaged over ``oversample``² sub-pixels within
    ``oversample_radius_pix`` of the centre and over ``core_oversample``²
    in the 3 × 3 pixels holding the cusp, so the logarithmic central cusp is
    never sampled at a pixel centre; elsewhere the centre sample is within
    (pixel / r)² / 6 of the pixel mean.
    """
    if not 0.0 < axis_ratio <= 1.0:
        raise ValueError(f"axis_ratio must be in (0, 1], got {axis_ratio}")
    amp, rs_pix, t = _halo_pixel_scales(m200_msun, c200, z, z_s, cosmo, pixel_arcsec, sim)
    if amp[()] > 0:
        _paint_stamp(kappa, x0_pix, y0_pix, float(amp), float(rs_pix), float(t), axis_ratio,
                     angle_deg, sim, wrap)


def _halo_pixel_scales(m200_msun, c200, z, z_s, cosmo, pixel_arcsec, sim):
    """Vectorised: κ amplitude 2 ρ_s r_s / Σ_c, r_s in pixels, truncation t = τ c."""
    c200 = np.asarray(c200, dtype=np.float64)
    _, rs, rho_s = halo_scales(m200_msun, c200, z, cosmo)
    sc = _sigma_crit_many(z, z_s, cosmo)
    d_a = cosmo.angular_diameter_distance(z).to_value(u.Mpc)
    rs_pix = rs / (d_a * np.radians(pixel_arcsec / 3600.0))
    return 2.0 * rho_s * rs / sc, rs_pix, sim.truncation_r200 * c200


def _paint_stamp(kappa, x0_pix, y0_pix, amp, rs_pix, t, q, angle_deg, sim, wrap):
    """Add one halo, given in pixel units, to ``kappa`` (see ``paint_tnfw``)."""
    ct, st = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    ny, nx = kappa.shape
    # The stamp must not overlap itself on the torus: at most the map side.
    half = int(min(np.ceil(t * rs_pix / np.sqrt(q)) + 1, (min(ny, nx) - 1) // 2))
    ic, jc = int(np.floor(y0_pix)), int(np.floor(x0_pix))
    di = np.arange(-half, half + 1)

    def kappa_at(dx, dy):  # offsets from the centre in pixels
        if q == 1.0:
            x = np.sqrt(dx**2 + dy**2) / rs_pix
        else:
            xp = dx * ct + dy * st
            yp = -dx * st + dy * ct
            x = np.sqrt(q * xp**2 + yp**2 / q) / rs_pix
        with np.errstate(divide="ignore"):
            return amp * _tnfw_g(x, t)

    dy = np.broadcast_to((ic + di + 0.5 - y0_pix)[:, None], (di.size, di.size))
    dx = np.broadcast_to((jc + di + 0.5 - x0_pix)[None, :], (di.size, di.size))
    dist2 = dx**2 + dy**2
    stamp = kappa_at(dx, dy)
    for radius, s in ((sim.oversample_radius_pix, sim.oversample), (1.5, sim.core_oversample)):
        sel = dist2 < radius**2
        sub = (np.arange(s) + 0.5) / s - 0.5
        sx = dx[sel][:, None, None] + sub[None, None, :]
        sy = dy[sel][:, None, None] + sub[None, :, None]
        stamp[sel] = kappa_at(sx, sy).mean(axis=(1, 2))
    rows, cols = ic + di, jc + di
    if wrap:
        kappa[np.ix_(rows % ny, cols % nx)] += stamp
    else:
        ri = (rows >= 0) & (rows < ny)
        ci = (cols >= 0) & (cols < nx)
        kappa[np.ix_(rows[ri], cols[ci])] += stamp[np.ix_(ri, ci)]


def tnfw_kappa_map(m200_msun, c200, x0_arcsec, y0_arcsec, npix, pixel_arcsec,
                   z_l=PAPER.z_lens, z_s=PAPER.z_source, cosmo=None, axis_ratio=1.0,
                   angle_deg=0.0, sim: SimulatorConfig = SIMULATOR):
    """Pixel-averaged κ map of one truncated, elliptical NFW halo.

    Parameters
    ----------
    m200_msun, c200 : float
        M200c [M☉] and concentration.
    x0_arcsec, y0_arcsec : float
        Centre, arcsec from the map's lower-left corner.
    npix : int
        Map side (square map, [y, x]).
    pixel_arcsec : float
    z_l, z_s : float
        Halo and source redshifts.
    cosmo : astropy.cosmology.FLRW, optional
    axis_ratio, angle_deg : float
        See ``paint_tnfw``.
    sim : SimulatorConfig

    Returns
    -------
    ndarray, shape (npix, npix)
        κ, zero outside τ r200 (non-periodic map).
    """
    cosmo = cosmology() if cosmo is None else cosmo
    kappa = np.zeros((npix, npix))
    paint_tnfw(kappa, x0_arcsec / pixel_arcsec, y0_arcsec / pixel_arcsec, m200_msun, c200,
               z_l, z_s, cosmo, pixel_arcsec, axis_ratio, angle_deg, sim, wrap=False)
    return kappa


# ---------------------------------------------------------------------------
# §2.3.1 Simulated cluster fields: the halo population
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class HaloGrid:
    """Cells of the Poisson draw of field halos (and of the one-halo integral).

    Attributes
    ----------
    z_edges, lnm_edges : ndarray
        Cell edges in redshift and ln M200c [M☉].
    counts_per_sr : ndarray, shape (n_z, n_m)
        Expected number of halos per steradian in each cell:
        n(M, z) dV/dz/dΩ Δz Δln M, midpoint rule.
    sigma_crit, d_a_mpc : ndarray, shape (n_z,)
        Σ_c(z_mid, z_s) [M☉/Mpc²] and D_A(z_mid) [Mpc].
    """

    z_edges: np.ndarray
    lnm_edges: np.ndarray
    counts_per_sr: np.ndarray
    sigma_crit: np.ndarray
    d_a_mpc: np.ndarray

    @property
    def z_mid(self):
        return 0.5 * (self.z_edges[1:] + self.z_edges[:-1])

    @property
    def m_mid(self):
        return np.exp(0.5 * (self.lnm_edges[1:] + self.lnm_edges[:-1]))


def _mass_function_at(t: TheoryTables, z, log10_m):
    """dn/dlnM [Mpc⁻³] at (z, log10 M) by bilinear interpolation of ln n."""
    from scipy.interpolate import RegularGridInterpolator
    f = RegularGridInterpolator((t.z, t.log10_m), np.log(t.dn_dlnm), bounds_error=False,
                                fill_value=None)
    zz, mm = np.broadcast_arrays(np.asarray(z, float), np.asarray(log10_m, float))
    return np.exp(f(np.stack([zz.ravel(), mm.ravel()], -1))).reshape(zz.shape)


@functools.lru_cache(maxsize=8)
def halo_grid(config: Config = PAPER, sim: SimulatorConfig = SIMULATOR,
              dz=None, dlog10m=None) -> HaloGrid:
    """Expected field-halo counts per steradian on (z, M) cells.

    Parameters
    ----------
    config, sim
        Cosmology, z_s, and the field-halo mass range.
    dz, dlog10m : float, optional
        Cell sizes; default ``sim.halo_dz`` and ``sim.halo_dlog10m``.

    Returns
    -------
    HaloGrid
    """
    t = theory_tables(config, sim)
    cosmo = cosmology(config)
    dz = sim.halo_dz if dz is None else dz
    dlog10m = sim.halo_dlog10m if dlog10m is None else dlog10m
    z_lo, z_hi = t.z[0], min(t.z[-1], config.z_source)
    nz = max(int(np.ceil((z_hi - z_lo) / dz)), 1)
    z_edges = np.linspace(z_lo, z_hi, nz + 1)
    lo, hi = np.log10(sim.field_m200_min_msun), np.log10(sim.field_m200_max_msun)
    if lo < t.log10_m[0] - 1e-4 or hi > t.log10_m[-1] + 1e-4:  # tables keep 6 digits
        raise ValueError(f"field-halo mass range 1e{lo:.2f}-1e{hi:.2f} M☉ exceeds the "
                         f"mass-function table (1e{t.log10_m[0]:.2f}-1e{t.log10_m[-1]:.2f})")
    nm = max(int(np.ceil((hi - lo) / dlog10m)), 1)
    lnm_edges = np.log(10.0) * np.linspace(lo, hi, nm + 1)
    z_mid = 0.5 * (z_edges[1:] + z_edges[:-1])
    lm_mid = 0.5 * (lnm_edges[1:] + lnm_edges[:-1]) / np.log(10.0)
    n = _mass_function_at(t, z_mid[:, None], lm_mid[None, :])
    dvdz = cosmo.differential_comoving_volume(z_mid).to_value(u.Mpc**3 / u.sr)
    counts = n * dvdz[:, None] * np.diff(z_edges)[:, None] * np.diff(lnm_edges)[None, :]
    return HaloGrid(z_edges, lnm_edges, counts, _sigma_crit_many(z_mid, config.z_source, cosmo),
                    cosmo.angular_diameter_distance(z_mid).to_value(u.Mpc))


def draw_field_halos(area_sr, rng, config: Config = PAPER, sim: SimulatorConfig = SIMULATOR):
    """Poisson draw of line-of-sight halos from the mass function.

    Parameters
    ----------
    area_sr : float
        Sky area [sr].
    rng : numpy.random.Generator
    config, sim

    Returns
    -------
    dict of ndarray, each shape (n,)
        ``m200_msun``, ``z``, ``c200`` (log-normal scatter about Duffy et al.
        2008).  Positions are drawn by the caller.

    Notes
    -----
    Halos are unclustered (a Poisson process per cell); their clustering (the
    two-halo term) is carried by the log-normal field, whose power is the
    total C_ℓ minus these halos' one-halo power (``halo_cl_1h``).  Within a
    cell z and ln M are uniform (cells of 0.01 × 0.02 dex).
    """
    _check_rng(rng)
    g = halo_grid(config, sim)
    counts = rng.poisson(g.counts_per_sr * area_sr)
    iz, im = np.nonzero(counts)
    reps = counts[iz, im]
    iz, im = np.repeat(iz, reps), np.repeat(im, reps)
    n = iz.size
    z = g.z_edges[iz] + np.diff(g.z_edges)[iz] * rng.uniform(size=n)
    lnm = g.lnm_edges[im] + np.diff(g.lnm_edges)[im] * rng.uniform(size=n)
    m = np.exp(lnm)
    c = draw_concentration(m, z, rng, sim, config.H0 / 100)
    return {"m200_msun": m, "z": z, "c200": c}


def draw_main_mass(rng, config: Config = PAPER, sim: SimulatorConfig = SIMULATOR, size=None):
    """M200c of main clusters drawn from the mass function at z_l.

    Parameters
    ----------
    rng : numpy.random.Generator
    config, sim
        z_l and the mass range [main_m200_min_msun, main_m200_max_msun].
    size : int, optional

    Returns
    -------
    float or ndarray
        M200c [M☉], distributed as dn/dlnM(z_l) within the range (inverse
        CDF on a 0.005-dex grid).
    """
    _check_rng(rng)
    t = theory_tables(config, sim)
    lm = np.arange(np.log10(sim.main_m200_min_msun), np.log10(sim.main_m200_max_msun) + 1e-9,
                   0.005)
    pdf = _mass_function_at(t, config.z_lens, lm)  # per ln M, so uniform steps in log M
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]))])
    return 10.0 ** np.interp(rng.uniform(0.0, cdf[-1], size), cdf, lm)


@functools.lru_cache(maxsize=8)
def _halo_power(config: Config, sim: SimulatorConfig, n_ell=160):
    """One-halo C_ℓ and mean κ of the field halos (see ``halo_cl_1h``)."""
    # A coarser grid than the draw's suffices: the integrand is smooth.
    g = halo_grid(config, sim, dz=0.03, dlog10m=0.05)
    cosmo = cosmology(config)
    ell = np.logspace(0, 6, n_ell)
    z, m = g.z_mid, g.m_mid
    ok = np.isfinite(g.sigma_crit)
    # Log-normal concentration scatter, Gauss-Hermite nodes in ln c.
    nodes, weights = np.polynomial.hermite_e.hermegauss(7)
    weights = weights / weights.sum()
    cl = np.zeros_like(ell)
    mean_kappa = 0.0
    for iz in np.nonzero(ok)[0]:
        c_med = concentration_duffy08(m, z[iz], sim, config.H0 / 100)
        for xn, wn in zip(nodes, weights):
            c = c_med * np.exp(sim.concentration_scatter_ln * xn)
            _, rs, rho_s = halo_scales(m, c, z[iz], cosmo)
            t = sim.truncation_r200 * c
            k = ell[None, :] / g.d_a_mpc[iz]
            kt = tnfw_fourier(k, rs[:, None], rho_s[:, None], t[:, None])
            kt /= g.sigma_crit[iz] * g.d_a_mpc[iz] ** 2  # κ̃(ℓ) [sr]
            cl += wn * np.sum(g.counts_per_sr[iz][:, None] * kt**2, axis=0)
            m_tot = 4 * np.pi * rho_s * rs**3 * _nfw_m(t)
            mean_kappa += wn * np.sum(g.counts_per_sr[iz] * m_tot) / (
                g.sigma_crit[iz] * g.d_a_mpc[iz] ** 2)
    return ell, cl, mean_kappa


def halo_cl_1h(ell, config: Config = PAPER, sim: SimulatorConfig = SIMULATOR):
    """One-halo power of the simulator's field halos, C_ℓ^{1h}.

    Parameters
    ----------
    ell : array_like
        Multipoles.

    Returns
    -------
    ndarray
        C_ℓ^{1h} = ∫ dz dV/dz/dΩ ∫ dlnM n(M, z) ⟨|κ̃_ℓ(M, z, c)|²⟩_c with
        κ̃_ℓ = ρ̃(ℓ / D_A) / (Σ_c D_A²) the transform of one halo's κ
        (Cooray & Sheth 2002 eq. 81 for the truncated NFW; Limber), averaged
        over the log-normal concentration scatter: exactly the power of the
        Poisson halos this simulator paints, times the transform
        exp(−ℓ²σ²) of the halo smoothing (``halo_smoothing_fwhm_arcsec``).
    """
    e, c, _ = _halo_power(config, sim)
    ell = np.asarray(ell, dtype=np.float64)
    sig = np.radians(sim.halo_smoothing_fwhm_arcsec / 3600.0) / FWHM_PER_SIGMA
    return np.interp(np.log(ell.clip(1.0)), np.log(e), c) * np.exp(-(ell * sig) ** 2)


def halo_mean_kappa(config: Config = PAPER, sim: SimulatorConfig = SIMULATOR):
    """Expected mean convergence of the field halos, ⟨κ_h⟩ (subtracted as a sheet)."""
    return _halo_power(config, sim)[2]


# ---------------------------------------------------------------------------
# §2.3.1 Simulated cluster fields: the log-normal large-scale structure
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LognormalPlan:
    """Precomputed spectra of the log-normal LSS on the simulator's torus.

    Attributes
    ----------
    n : int
        Torus side in pixels.
    pixel_rad : float
    kappa0 : float
        Shift of the log-normal (the LSS κ ≥ −kappa0).
    sqrt_cg : ndarray, shape (n, n // 2 + 1)
        √C_g / pixel: multiplies the rfft2 of unit white noise to give the
        Gaussian field g of the small-scale (torus) modes.
    var_g_small, var_g_large : float
        Variances of the small- and large-scale parts of g.
    large_m : ndarray
        Integer wavenumbers (in units of 2π / large torus) of the large modes.
    large_sd : ndarray, shape (len(large_m), len(large_m))
        Standard deviation of each large mode's cosine and sine amplitudes.
    large_factor : int
        Side of the large torus in units of the torus side.
    """

    n: int
    pixel_rad: float
    kappa0: float
    sqrt_cg: np.ndarray
    var_g_small: float
    var_g_large: float
    large_m: np.ndarray
    large_sd: np.ndarray
    large_factor: int


def lss_cl(ell, config: Config = PAPER, sim: SimulatorConfig = SIMULATOR):
    """Target power of the log-normal field.

    Parameters
    ----------
    ell : array_like
        Multipoles.

    Returns
    -------
    ndarray
        [C_ℓ(ΛCDM) − C_ℓ^{1h}(field halos)] exp(−(ℓ/ℓ_max)⁴), ≥ 0.

    Notes
    -----
    Beyond ℓ ~ 2e4 the power comes from galaxy- and group-scale halos below
    the field-halo mass cut.  A log-normal carrying it would put isolated
    pixels at κ ~ 1 (its pixel-scale σ/κ0 approaches 1), spikes that real
    halos of that mass (central κ ≲ 0.15) do not make; the paper's MassiveNuS
    maps (0.41′ pixels, ℓ_pix ≈ 2.6e4) do not resolve these scales either.
    The taper removes it: −2.5 % at ℓ = 1e4 for the default ℓ_max.
    """
    ell = np.asarray(ell, dtype=np.float64)
    taper = np.exp(-((ell / sim.lss_ell_max) ** 4))
    return np.maximum(theory_cl(ell, config, sim) - halo_cl_1h(ell, config, sim), 0.0) * taper


@functools.lru_cache(maxsize=4)
def lognormal_plan(config: Config = PAPER, sim: SimulatorConfig = SIMULATOR, n=None,
                   cl_func=None, kappa0=None) -> LognormalPlan:
    """Set up the log-normal field for a torus of ``n`` pixels a side.

    Parameters
    ----------
    config, sim
        Pixel size, κ0, pad and large-scale factors.
    n : int, optional
        Torus side; default ``sim.pad_factor * config.npix``.
    cl_func : callable, optional
        C_ℓ of the target κ field (ℓ array → array); default ``lss_cl``.
    kappa0 : float, optional
        Shift of the log-normal; default ``sim.kappa0`` (or Hilbert et al.
        2011 eq. 38) minus the field halos' mean κ (see below).

    Returns
    -------
    LognormalPlan

    Notes
    -----
    κ = κ0 [exp(g − σ_g²/2) − 1] is log-normal with ⟨κ⟩ = 0 and
    ξ_κ = κ0² [exp(ξ_g) − 1], so ξ_g = ln(1 + ξ_κ/κ0²) (e.g. Hilbert et al.
    2011 §5; Xavier et al. 2016).  ξ_κ is computed on the torus itself (the
    inverse FFT of the target C_ℓ on the torus's own modes), so the discrete
    field has exactly the target correlation wherever C_g ≥ 0.

    The torus's k = 0 cell (|ℓ_x|, |ℓ_y| < π / L) holds power the torus cannot
    carry (18 % of the variance of κ smoothed with a 1′ Gaussian for a 64′
    torus).  Those modes come from a torus ``large_scale_factor`` times
    larger, as a smooth Gaussian g_L added to g; the small-scale part is then
    Gaussianised with the shift κ0² + σ_L², which keeps the one-point
    variance ln(1 + σ²/κ0²) exact and ξ_g exact at separations much smaller
    or much larger than the torus.
    """
    n = sim.pad_factor * config.npix if n is None else int(n)
    cl_func = (lambda ell: lss_cl(ell, config, sim)) if cl_func is None else cl_func
    if kappa0 is None:
        kappa0 = kappa0_hilbert2011(config.z_source) if sim.kappa0 is None else sim.kappa0
        # The field halos' mean is subtracted as a sheet, which lowers the
        # total minimum by ⟨κ_h⟩; shifting the log-normal by κ0 − ⟨κ_h⟩ keeps
        # the total bounded by the empty-beam value −κ0.
        kappa0 -= halo_mean_kappa(config, sim)
    kappa0_ln = float(kappa0)
    pix = np.radians(config.pixel_arcsec / 3600.0)
    area = (n * pix) ** 2
    lx = 2 * np.pi * np.fft.fftfreq(n, d=pix)
    ell = np.hypot(lx[:, None], lx[None, :])
    cgrid = cl_func(ell)
    cgrid[0, 0] = 0.0
    # Large scales: modes of the F-times larger torus inside the k = 0 cell,
    # weighted by the fraction of their own cell that lies inside it.
    f = sim.large_scale_factor
    m = np.arange(-(f // 2), f // 2 + 1)
    w1 = np.clip(f / 2 + 0.5 - np.abs(m), 0.0, 1.0)
    w = w1[:, None] * w1[None, :]
    w[f // 2, f // 2] = 0.0
    ell_l = 2 * np.pi / (f * n * pix) * np.hypot(m[:, None], m[None, :])
    var_l_modes = np.where(w > 0, cl_func(np.maximum(ell_l, 1.0)) * w / (f**2 * area), 0.0)
    var_kappa_large = var_l_modes.sum()
    # Correlation of the small-scale modes on the torus: ξ = Σ_k C_k e^{ikx} / A.
    xi = np.fft.ifft2(cgrid).real * n**2 / area
    k0sq = kappa0_ln**2 + var_kappa_large
    xi_g = np.log1p(xi / k0sq)
    cg = np.fft.fft2(xi_g).real * area / n**2
    cg = np.maximum(cg, 0.0)  # negative Gaussian power cannot be realised
    var_g_small = cg.sum() / area
    var_g_large = np.log1p(var_kappa_large / kappa0_ln**2)
    # Each large mode pair (m, −m) is one cosine and one sine amplitude with
    # variance 2 v_m; scaling v_m by var_g_large / Σv Gaussianises them (the
    # log transform is linear to 1 % at these tiny variances).
    scale = var_g_large / var_kappa_large if var_kappa_large > 0 else 0.0
    large_sd = np.sqrt(2.0 * var_l_modes * scale)
    sqrt_cg = np.sqrt(cg[:, : n // 2 + 1]) / pix
    return LognormalPlan(n=n, pixel_rad=pix, kappa0=kappa0_ln, sqrt_cg=sqrt_cg,
                         var_g_small=float(var_g_small), var_g_large=float(var_g_large),
                         large_m=m, large_sd=large_sd, large_factor=f)


def _fourier_sum(coef, kx, ky, x, y):
    """Re Σ coef[a, b] exp(i (ky[a] y + kx[b] x)) on the grid y[:, None], x[None, :].

    Separable: two small matrix products instead of a sum over every pixel.
    """
    ey = np.exp(1j * np.outer(y, ky))
    ex = np.exp(1j * np.outer(kx, x))
    return (ey @ coef @ ex).real


def lognormal_gaussians(rng, plan: LognormalPlan):
    """The Gaussian fields behind one log-normal realisation.

    Parameters
    ----------
    rng : numpy.random.Generator
    plan : LognormalPlan

    Returns
    -------
    g_small : ndarray, shape (n, n)
        Gaussian field of the torus's own modes (periodic on the torus).
    coef : ndarray of complex, shape (len(large_m), len(large_m))
        Large modes: g_L(x, y) = Re Σ coef[a, b] exp(i k (m_a y + m_b x)),
        k = 2π / (large_factor n) per pixel, over half of the lattice (the
        other half is the complex conjugate).
    """
    _check_rng(rng)
    n = plan.n
    white = rng.standard_normal((n, n))
    g_small = scipy.fft.irfft2(scipy.fft.rfft2(white) * plan.sqrt_cg, s=(n, n))
    # Cosine and sine amplitudes of the half lattice (m_y > 0, or m_y = 0 < m_x).
    a = rng.standard_normal(plan.large_sd.shape) * plan.large_sd
    b = rng.standard_normal(plan.large_sd.shape) * plan.large_sd
    mm = plan.large_m
    half = (mm[:, None] > 0) | ((mm[:, None] == 0) & (mm[None, :] > 0))
    return g_small, np.where(half, a - 1j * b, 0.0)


def lognormal_lss(rng, plan: LognormalPlan, sim: SimulatorConfig = SIMULATOR):
    """One realisation of the log-normal LSS convergence on the torus.

    Parameters
    ----------
    rng : numpy.random.Generator
    plan : LognormalPlan
        From ``lognormal_plan``.
    sim : SimulatorConfig
        ``large_scale_grid``: coarse grid for the shear of the large modes.

    Returns
    -------
    kappa : ndarray, shape (n, n)
        κ of the LSS on the torus, ≥ −κ0 and zero-mean in expectation.
    kappa_large : ndarray, shape (n, n)
        The part of ``kappa`` that is not periodic on the torus,
        κ0 [exp(g_L − σ_L²/2) − 1] of the large modes alone.
    gamma1_large, gamma2_large : ndarray, shape (n, n)
        Shear of ``kappa_large``, computed on the large torus (where it is
        periodic).

    Notes
    -----
    κ = κ0 [exp(g + g_L − σ_g²/2 − σ_L²/2) − 1] = κ_s + κ_L + κ_s κ_L / κ0
    with κ_s, κ_L the log-normals of g and g_L alone.  ``kappa - kappa_large``
    = κ_s (1 + κ_L/κ0) is periodic on the torus up to the slow modulation
    1 + κ_L/κ0 (≈ 1 ± 0.15), so its shear is a periodic FFT; ``kappa_large``
    gets its shear on the large torus.
    """
    n = plan.n
    g_small, coef = lognormal_gaussians(rng, plan)
    k_large = 2 * np.pi / (plan.large_factor * n) * plan.large_m  # per torus pixel
    xpix = np.arange(n) + 0.5
    g_l = _fourier_sum(coef, k_large, k_large, xpix, xpix)
    kappa = plan.kappa0 * np.expm1(g_small + g_l - 0.5 * (plan.var_g_small + plan.var_g_large))
    kappa_large = plan.kappa0 * np.expm1(g_l - 0.5 * plan.var_g_large)
    # Shear of kappa_large: sample it on a coarse grid of the large torus,
    # apply eq. 8-9 there, and sum the Fourier series back on the torus.
    nc = sim.large_scale_grid
    side = plan.large_factor * n  # large torus side in torus pixels
    xc = (np.arange(nc) + 0.5) * side / nc
    kc = plan.kappa0 * np.expm1(_fourier_sum(coef, k_large, k_large, xc, xc)
                                - 0.5 * plan.var_g_large)
    kk = np.fft.fft2(kc) / nc**2
    mc = np.fft.fftfreq(nc, d=1.0 / nc)
    keep = np.abs(mc) < nc // 2  # drop the Nyquist row/column (not Hermitian-paired)
    kk = kk[np.ix_(keep, keep)]
    mc = mc[keep]
    k1, k2 = mc[None, :], mc[:, None]
    ksq = np.where((k1 == 0) & (k2 == 0), 1.0, k1**2 + k2**2)
    kcx = 2 * np.pi / side * mc
    # The coarse samples sit at half a coarse pixel: shift the phases to x = 0.
    shift = np.exp(-0.5j * kcx * side / nc)
    kk = kk * shift[:, None] * shift[None, :]
    gamma1_large = _fourier_sum(kk * (k1**2 - k2**2) / ksq, kcx, kcx, xpix, xpix)
    gamma2_large = _fourier_sum(kk * 2 * k1 * k2 / ksq, kcx, kcx, xpix, xpix)
    return kappa, kappa_large, gamma1_large, gamma2_large


# ---------------------------------------------------------------------------
# §2.3.1 Simulated cluster fields: one field
# ---------------------------------------------------------------------------
def _draw_ellipticity(rng, sim):
    eps = np.clip(rng.normal(sim.ellipticity_mean, sim.ellipticity_std), 0.0, sim.ellipticity_max)
    return 1.0 - eps, rng.uniform(0.0, 180.0)


def simulate_cluster_field(config: Config, rng, sim: SimulatorConfig = SIMULATOR, cluster=True):
    """Simulate one 32′ × 32′ field: truth κ and γ (paper §2.3.1).

    Parameters
    ----------
    config : Config
        Field size, grid, cosmology, z_l and z_s.
    rng : numpy.random.Generator
        All random draws come from it (same seed, same field).
    sim : SimulatorConfig
        Every simulator choice.
    cluster : bool
        True: a main cluster (and, in a fraction of fields, companions) near
        the field centre.  False: a random patch of sky (LSS and field halos
        only), for realism statistics.

    Returns
    -------
    dict
        ``kappa``, ``gamma1``, ``gamma2`` : ndarray, shape (npix, npix), [y, x]
            Truth convergence and shear of the field (the central part of the
            torus on which γ was computed).
        ``main`` : dict or None
            ``m200_msun``, ``c200``, ``z``, ``x_arcsec``, ``y_arcsec`` (from
            the field's lower-left corner), ``axis_ratio``, ``angle_deg``.
        ``companions`` : list of dict
            Same keys, for merging companions / substructure.
        ``field_halos`` : dict of ndarray
            ``m200_msun``, ``z``, ``c200``, ``x_arcsec``, ``y_arcsec`` of the
            line-of-sight halos (torus coordinates shifted to the field's
            frame; halos outside the field have coordinates outside
            [0, field side)).
        ``kappa0`` : float
            Shift of the log-normal LSS.

    Notes
    -----
    κ = κ_main + κ_companions + Σ κ_field halos − ⟨κ_h⟩ + κ_LSS on a torus of
    ``pad_factor`` × the field side.  γ is eq. 8-9 on the torus: a periodic
    FFT (``shear_from_kappa(..., pad=False)``) is exact for the periodic part
    (the LSS is generated on the torus's own modes and halos are painted with
    wrap-around), and the non-periodic large-scale modes get their shear on
    their own, larger torus.  Zero padding would instead cut the LSS off at
    the torus edge.  The main cluster's periodic images lie a torus side away;
    by symmetry their shear cancels at the centre to leading order.
    """
    _check_rng(rng)
    cosmo = cosmology(config)
    n_field = config.npix
    n = sim.pad_factor * n_field
    pix_arcsec = config.pixel_arcsec
    lo = (n - n_field) // 2  # torus pixel of the field's first pixel

    kappa_h = np.zeros((n, n))
    main, companions = None, []
    if cluster:
        m = float(draw_main_mass(rng, config, sim))
        c = float(draw_concentration(m, config.z_lens, rng, sim, config.H0 / 100))
        r = sim.main_offset_max_arcmin * 60.0 * np.sqrt(rng.uniform())
        phi = rng.uniform(0.0, 2 * np.pi)
        x0 = n_field * pix_arcsec / 2 + r * np.cos(phi)
        y0 = n_field * pix_arcsec / 2 + r * np.sin(phi)
        q, ang = _draw_ellipticity(rng, sim)
        main = dict(m200_msun=m, c200=c, z=config.z_lens, x_arcsec=x0, y_arcsec=y0,
                    axis_ratio=q, angle_deg=ang)
        if rng.uniform() < sim.merger_fraction:
            arcsec_per_mpc = 1.0 / (cosmo.angular_diameter_distance(config.z_lens).to_value(u.Mpc)
                                    * np.radians(1.0 / 3600.0))
            n_comp = rng.integers(sim.n_companions[0], sim.n_companions[1] + 1)
            for _ in range(n_comp):
                ratio = np.exp(rng.uniform(*np.log(sim.companion_mass_ratio)))
                mc = m * ratio
                cc = float(draw_concentration(mc, config.z_lens, rng, sim, config.H0 / 100))
                d = rng.uniform(*sim.companion_separation_mpc) * arcsec_per_mpc
                ph = rng.uniform(0.0, 2 * np.pi)
                qc, angc = _draw_ellipticity(rng, sim)
                companions.append(dict(m200_msun=mc, c200=cc, z=config.z_lens,
                                       x_arcsec=x0 + d * np.cos(ph), y_arcsec=y0 + d * np.sin(ph),
                                       axis_ratio=qc, angle_deg=angc))
        for h in [main] + companions:
            paint_tnfw(kappa_h, h["x_arcsec"] / pix_arcsec + lo, h["y_arcsec"] / pix_arcsec + lo,
                       h["m200_msun"], h["c200"], h["z"], config.z_source, cosmo, pix_arcsec,
                       h["axis_ratio"], h["angle_deg"], sim)

    area_sr = (n * np.radians(pix_arcsec / 3600.0)) ** 2
    halos = draw_field_halos(area_sr, rng, config, sim)
    nh = halos["m200_msun"].size
    xh = rng.uniform(0.0, n, nh)
    yh = rng.uniform(0.0, n, nh)
    amp, rs_pix, t = _halo_pixel_scales(halos["m200_msun"], halos["c200"], halos["z"],
                                        config.z_source, cosmo, pix_arcsec, sim)
    for k in np.nonzero(amp > 0)[0]:
        _paint_stamp(kappa_h, xh[k], yh[k], amp[k], rs_pix[k], t[k], 1.0, 0.0, sim, wrap=True)
    if sim.halo_smoothing_fwhm_arcsec > 0:
        # Periodic Gaussian smoothing on the torus (exact: halos were painted
        # with wrap-around).
        ell = 2 * np.pi * np.fft.fftfreq(n, d=np.radians(pix_arcsec / 3600.0))
        sig = np.radians(sim.halo_smoothing_fwhm_arcsec / 3600.0) / FWHM_PER_SIGMA
        gauss = np.exp(-0.5 * (ell[:, None] ** 2 + ell[None, : n // 2 + 1] ** 2) * sig**2)
        kappa_h = scipy.fft.irfft2(scipy.fft.rfft2(kappa_h) * gauss, s=(n, n))
    kappa = kappa_h - halo_mean_kappa(config, sim)
    halos["x_arcsec"] = (xh - lo) * pix_arcsec
    halos["y_arcsec"] = (yh - lo) * pix_arcsec

    plan = lognormal_plan(config, sim)
    k_lss, k_large, g1_large, g2_large = lognormal_lss(rng, plan, sim)
    kappa += k_lss
    g1, g2 = shear_from_kappa(kappa - k_large, pad=False)
    g1 += g1_large
    g2 += g2_large
    cut = (slice(lo, lo + n_field), slice(lo, lo + n_field))
    return {"kappa": kappa[cut].copy(), "gamma1": g1[cut].copy(), "gamma2": g2[cut].copy(),
            "main": main, "companions": companions, "field_halos": halos,
            "kappa0": plan.kappa0}


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


# ---------------------------------------------------------------------------
# §2.3.1 Training data: source catalogs with shape and measurement noise
# ---------------------------------------------------------------------------
def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed))")
    return rng


def draw_intrinsic_ellipticity(n, sigma_e, rng):
    """Intrinsic ellipticities e = e1 + i e2 of ``n`` sources.

    Each component is drawn from N(0, σ_e) and a source is redrawn until
    |e| < 1 (§2.3.1), since |e| ≥ 1 is no ellipse under eq. 5.

    Returns
    -------
    numpy.ndarray of complex128, shape (n,)
    """
    _check_rng(rng)
    e = rng.normal(0.0, sigma_e, n) + 1j * rng.normal(0.0, sigma_e, n)
    bad = np.abs(e) >= 1.0
    while np.any(bad):
        k = int(bad.sum())
        e[bad] = rng.normal(0.0, sigma_e, k) + 1j * rng.normal(0.0, sigma_e, k)
        bad = np.abs(e) >= 1.0
    return e


def magnitude_pdf(mag, config=PAPER):
    """Unnormalised V-band magnitude distribution of the sources.

    Notes
    -----
    The paper (§2.3.1) adopts Kim et al. (2019): it starts at 21.5, peaks at
    25.5 and is cut at 27.5 mag, without giving the form.  We take galaxy
    number counts rising as 10^(a m) (a = ``count_slope``) times a logistic
    completeness 1 / (1 + exp((m − m_c)/w)); m_c is solved so that the peak
    falls at ``mag_peak``, and the distribution is zero outside
    [``mag_min``, ``mag_max``].
    """
    a, w = config.count_slope * np.log(10.0), config.completeness_width_mag
    s_peak = a * w  # the logistic's value at the peak, from d ln p / dm = 0
    if not 0 < s_peak < 1:
        raise ValueError("count_slope * ln 10 * completeness_width_mag must lie in (0, 1)")
    m_c = config.mag_peak - w * np.log(s_peak / (1.0 - s_peak))
    mag = np.asarray(mag, dtype=np.float64)
    p = np.exp(a * (mag - config.mag_peak)) * scipy.special.expit(-(mag - m_c) / w)
    return np.where((mag >= config.mag_min) & (mag <= config.mag_max), p, 0.0)


@functools.lru_cache(maxsize=8)
def _magnitude_cdf(config):
    grid = np.linspace(config.mag_min, config.mag_max, 1025)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * np.diff(grid) * (
        magnitude_pdf(grid[1:], config) + magnitude_pdf(grid[:-1], config)))])
    return grid, cdf / cdf[-1]


def draw_magnitudes(n, config, rng):
    """``n`` V-band magnitudes from :func:`magnitude_pdf` (inverse CDF on a
    1,025-point grid: 0.006-mag steps, far below any photometric error)."""
    grid, cdf = _magnitude_cdf(config)
    return np.interp(rng.uniform(0.0, 1.0, n), cdf, grid)


def measurement_error(mag, config=PAPER):
    """Per-component ellipticity measurement error σ_meas of a source.

    Notes
    -----
    Monotonic in magnitude (§2.3.1 uses the relation of Kim et al. 2019, not
    given in numbers).  We take a floor plus a term ∝ 1/flux, the scaling of a
    background-limited shape measurement: σ_meas = σ_floor + σ_cut 10^{0.4 (m −
    m_max)}, i.e. 0.03 at 21.5, ≈0.07 at the 25.5 peak, 0.28 at the 27.5 cut.
    """
    mag = np.asarray(mag, dtype=np.float64)
    return config.sigma_meas_floor + config.sigma_meas_at_cut * 10.0 ** (0.4 * (mag - config.mag_max))


def draw_star_masks(config, rng, peak_xy_arcsec):
    """Bright-star masks of a field (§3.5).

    Parameters
    ----------
    config : Config
    rng : numpy.random.Generator
    peak_xy_arcsec : (float, float)
        Position of the cluster's mass peak (arcsec from the lower-left corner);
        the first mask lies within ``star_near_peak_arcmin`` of it.

    Returns
    -------
    astropy.table.Table
        Columns ``x``, ``y``, ``radius`` in arcsec.  1-2 masks per 20′ × 20′,
        scaled by the field's area; radii uniform in 0.5′-2′.
    """
    _check_rng(rng)
    side = config.field_arcmin * 60.0
    scale = config.field_arcmin**2 / 400.0
    lo, hi = config.stars_per_400arcmin2
    n = max(1, int(rng.integers(round(lo * scale), round(hi * scale) + 1)))
    r_near = config.star_near_peak_arcmin * 60.0 * np.sqrt(rng.uniform())
    phi = rng.uniform(0.0, 2 * np.pi)
    x = np.concatenate([[peak_xy_arcsec[0] + r_near * np.cos(phi)], rng.uniform(0, side, n - 1)])
    y = np.concatenate([[peak_xy_arcsec[1] + r_near * np.sin(phi)], rng.uniform(0, side, n - 1)])
    radius = rng.uniform(*config.star_radius_arcmin, n) * 60.0
    return Table({"x": x, "y": y, "radius": radius}, units={"x": u.arcsec, "y": u.arcsec, "radius": u.arcsec})


def sample_map(field, x_arcsec, y_arcsec, pixel_arcsec):
    """Bilinear interpolation of a [y, x] map at positions in arcsec."""
    coords = np.vstack([np.asarray(y_arcsec) / pixel_arcsec - 0.5,
                        np.asarray(x_arcsec) / pixel_arcsec - 0.5])
    return scipy.ndimage.map_coordinates(field, coords, order=1, mode="nearest")


def simulate_catalog(kappa, gamma1, gamma2, config=PAPER, rng=None, masks=None):
    """Simulate an observed source catalog behind a lens (§2.3.1).

    Parameters
    ----------
    kappa, gamma1, gamma2 : array_like, shape (npix, npix)
        Truth convergence and shear of the field on the input grid [y, x].
    config : Config
        Field size, source density, σ_e and the magnitude / error model.
    rng : numpy.random.Generator
        Source of every random draw (required: catalogs are reproducible).
    masks : astropy.table.Table, optional
        Bright-star masks with columns ``x``, ``y``, ``radius`` (arcsec);
        sources inside any mask are removed (§3.5).

    Returns
    -------
    astropy.table.Table
        Columns ``x``, ``y`` (arcsec from the lower-left corner), ``mag``
        (V band), ``sigma`` (per-component ellipticity error,
        sqrt(σ_e² + σ_meas²)), ``e1``, ``e2`` (observed lensed ellipticity).

    Notes
    -----
    Positions are uniform with a Poisson number of mean density × area.  κ and γ
    are interpolated (bilinearly) at each source, g = γ/(1 − κ) (eq. 2), the
    intrinsic e (N(0, σ_e) per component, |e| < 1) is lensed by eq. 7 (or its
    |g| > 1 branch), and Gaussian measurement noise N(0, σ_meas) is added to
    each component (DESIGN.md "Sources and noise").
    """
    _check_rng(rng)
    maps = [_check_map(n, a) for n, a in (("kappa", kappa), ("gamma1", gamma1), ("gamma2", gamma2))]
    for name, a in zip(("kappa", "gamma1", "gamma2"), maps):
        if a.shape != (config.npix, config.npix):
            raise ValueError(f"{name} has shape {a.shape}; the config's grid is "
                             f"({config.npix}, {config.npix})")
    side = config.field_arcmin * 60.0
    n = int(rng.poisson(config.source_density_arcmin2 * config.field_arcmin**2))
    x = rng.uniform(0.0, side, n)
    y = rng.uniform(0.0, side, n)
    mag = draw_magnitudes(n, config, rng)
    sigma_meas = measurement_error(mag, config)
    k, g1, g2 = (sample_map(a, x, y, config.pixel_arcsec) for a in maps)
    g = reduced_shear(g1, g2, k)
    eps = lens_ellipticity(draw_intrinsic_ellipticity(n, config.sigma_e, rng), g)
    e1 = eps.real + rng.normal(0.0, 1.0, n) * sigma_meas
    e2 = eps.imag + rng.normal(0.0, 1.0, n) * sigma_meas
    keep = np.ones(n, dtype=bool)
    if masks is not None:
        for row in masks:
            keep &= (x - row["x"]) ** 2 + (y - row["y"]) ** 2 > row["radius"] ** 2
    cat = Table({"x": x[keep], "y": y[keep], "mag": mag[keep],
                 "sigma": np.sqrt(config.sigma_e**2 + sigma_meas[keep] ** 2),
                 "e1": e1[keep], "e2": e2[keep]})
    cat["x"].unit = cat["y"].unit = u.arcsec
    cat["mag"].unit = u.mag
    return cat


# ---------------------------------------------------------------------------
# §2.3.1 Training data: dataset files (shards + manifest)
# ---------------------------------------------------------------------------
#: Splits of a dataset, in the order their seeds and shards are numbered.
SPLITS = ("train", "val", "test")
#: Config fields that define a dataset's content; a reader with other values
#: would misread it (the network's fields do not matter to the data).
DATA_FIELDS = ("H0", "Om0", "z_lens", "z_source", "field_arcmin", "npix", "fwhm_arcsec",
               "kernel_cut_sigma", "empty_pixel_error", "source_density_arcmin2", "sigma_e",
               "mag_min", "mag_peak", "mag_max", "count_slope", "completeness_width_mag",
               "sigma_meas_floor", "sigma_meas_at_cut", "stars_per_400arcmin2",
               "star_radius_arcmin", "star_near_peak_arcmin")
DATASET_FORMAT = "wlcnn-dataset"
DATASET_VERSION = 1
CATALOG_COLUMNS = ("x", "y", "mag", "sigma", "e1", "e2")


def _data_config(config):
    """The data-defining part of a Config, as JSON would write it."""
    return json.loads(json.dumps({k: getattr(config, k) for k in DATA_FIELDS}))


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def cluster_rng(seed, split, index):
    """The random generator of cluster ``index`` of ``split``.

    Derived from (seed, split, index) alone, so a cluster is the same whichever
    shard, job or worker makes it (numpy SeedSequence spawn keys).
    """
    key = (SPLITS.index(_check_split(split)), int(index))
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


def mosaic_truth(kappa, config=PAPER):
    """Truth κ at the network's output resolution, on the mosaic grid.

    Parameters
    ----------
    kappa : array_like, shape (..., npix, npix)

    Returns
    -------
    numpy.ndarray, shape (..., mosaic_npix, mosaic_npix)
        Mosaic pixel J is the mean of input pixels [3J + 1, 3J + 4) on each
        axis: the footprint of an output pixel through Table 1's 3×3 valid
        Conv2D-1 and 3×3 AvgPool (DESIGN.md "Grids").
    """
    kappa = np.asarray(kappa)
    p, m = config.pool, config.mosaic_npix
    lo = (config.first_kernel - 1) // 2
    block = kappa[..., lo:lo + p * m, lo:lo + p * m]
    return block.reshape(block.shape[:-2] + (m, p, m, p)).mean(axis=(-3, -1))


def make_cluster(field, config, rng, masks=False):
    """One cluster record: truth maps, star masks and the fixed catalog.

    Parameters
    ----------
    field : dict
        ``kappa``, ``gamma1``, ``gamma2`` arrays (npix, npix) and optional
        ``meta`` (JSON-serialisable dict).
    config : Config
    rng : numpy.random.Generator
        Draws the masks and the catalog (after whatever drew the field).
    masks : bool
        Draw bright-star masks (§3.5) around the truth's peak.
    """
    kappa = _check_map("kappa", field["kappa"])
    mosaic = mosaic_truth(kappa, config)
    j_peak = np.unravel_index(np.argmax(mosaic), mosaic.shape)
    pix = config.pixel_arcsec * config.pool
    lo = (config.first_kernel - 1) // 2 * config.pixel_arcsec
    peak_xy = (lo + (j_peak[1] + 0.5) * pix, lo + (j_peak[0] + 0.5) * pix)
    mask_table = draw_star_masks(config, rng, peak_xy) if masks else Table(
        {"x": np.zeros(0), "y": np.zeros(0), "radius": np.zeros(0)})
    catalog = simulate_catalog(kappa, field["gamma1"], field["gamma2"], config, rng,
                               mask_table if masks else None)
    return {"kappa": kappa, "gamma1": np.asarray(field["gamma1"]), "gamma2": np.asarray(field["gamma2"]),
            "catalog": catalog, "masks": mask_table, "meta": dict(field.get("meta", {}))}


def _pack_shard(clusters):
    """Arrays of a shard: maps stacked (float32), catalogs and masks ragged."""
    out = {k: np.stack([c[k] for c in clusters]).astype(np.float32) for k in ("kappa", "gamma1", "gamma2")}
    for prefix, key, cols in (("cat", "catalog", CATALOG_COLUMNS), ("mask", "masks", ("x", "y", "radius"))):
        lengths = [len(c[key]) for c in clusters]
        out[f"{prefix}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for col in cols:
            out[f"{prefix}_{col}"] = np.concatenate(
                [np.asarray(c[key][col], dtype=np.float64) for c in clusters]).astype(
                np.float32 if prefix == "cat" and col not in ("x", "y") else np.float64)
    out["meta"] = np.array([json.dumps(c["meta"], sort_keys=True) for c in clusters])
    return out


def _atomic_write(path, write):
    """Call ``write(tmp_path)`` then rename: a file is complete or absent."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shard_plan(counts, shard_size):
    """[(split, shard_index, first, n)] over all splits, in a fixed order."""
    plan = []
    for split in SPLITS:
        n = int(counts.get(split, 0))
        for k, first in enumerate(range(0, n, shard_size)):
            plan.append((split, k, first, min(shard_size, n - first)))
    return plan


def _shard_name(split, k):
    return f"{split}/shard-{k:05d}.npz"


def _write_one_shard(task):
    """Make and write one shard (a worker's unit of work); returns its sidecar."""
    out_dir, split, k, first, n, config, seed, masks, field_fn = task
    path = Path(out_dir) / _shard_name(split, k)
    clusters = []
    for i in range(first, first + n):
        rng = cluster_rng(seed, split, i)
        clusters.append(make_cluster(field_fn(config, rng, split, i), config, rng, masks))
    arrays = _pack_shard(clusters)
    arrays["index"] = np.arange(first, first + n, dtype=np.int64)
    # np.savez_compressed stamps zip entries with a fixed date: same seed, same bytes.
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    _atomic_write(path, write)
    side = {"file": _shard_name(split, k), "split": split, "first": first, "n": n, "sha256": _sha256(path)}
    _atomic_write_text(f"{path}.json", json.dumps(side))
    return side


def _shard_done(out_dir, split, k):
    side = Path(out_dir) / (_shard_name(split, k) + ".json")
    shard = Path(out_dir) / _shard_name(split, k)
    if not (side.exists() and shard.exists()):
        return None
    info = json.loads(side.read_text())
    return info if info.get("sha256") == _sha256(shard) else None


class _Progress:
    """A one-line progress bar on stderr (items done, rate, time left)."""

    def __init__(self, total, label, stream=None):
        self.total, self.label, self.done, self.t0 = total, label, 0, time.time()
        self.stream = sys.stderr if stream is None else stream

    def update(self, k=1):
        self.done += k
        elapsed = time.time() - self.t0
        left = elapsed / max(self.done, 1) * (self.total - self.done)
        bar = "#" * int(30 * self.done / max(self.total, 1))
        self.stream.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} "
                          f"{elapsed:6.0f}s elapsed, ~{left:5.0f}s left")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def _simulated_field(config, rng, split, index):
    """The default field generator of :func:`write_dataset`: a simulated
    cluster field whose main halo and companions are kept as metadata."""
    field = simulate_cluster_field(config, rng)

    def plain(h):
        return {k: float(v) for k, v in h.items()}

    field["meta"] = {"main": plain(field["main"]), "companions": [plain(h) for h in field["companions"]],
                     "n_field_halos": int(field["field_halos"]["m200_msun"].size),
                     "kappa0": float(field["kappa0"])}
    return field


def write_dataset(out_dir, counts, config=PAPER, seed=0, field_fn=None, masks=False,
                  shard_size=25, workers=1, shard=None, generator="simulate", progress=True):
    """Simulate clusters and write them as a sharded dataset with a manifest.

    Parameters
    ----------
    out_dir : path
        Dataset directory: ``{split}/shard-NNNNN.npz`` (+ ``.json`` sidecars)
        and ``manifest.json``.
    counts : dict
        Clusters per split, e.g. ``{"train": 5000, "val": 1800, "test": 200}``
        (the paper's split, §2.3.1).
    config : Config
    seed : int
        Everything random derives from it through :func:`cluster_rng`.
    field_fn : callable, optional
        ``field_fn(config, rng, split, index) -> {"kappa", "gamma1", "gamma2",
        "meta"}``; default: :func:`simulate_cluster_field` (which ignores split
        and index; :func:`ingest_dataset` uses them to look up its fields).
    masks : bool
        Bright-star masks (§3.5, the paper's BS case).
    shard_size : int
        Clusters per shard file.
    workers : int
        Processes making shards in parallel.
    shard : (int, int), optional
        ``(i, n)``: make only the shards whose position in the plan is i mod n
        (one job of a batch-scheduler array).  The manifest is written by
        whichever run finds every shard finished.
    generator : str
        Recorded in the manifest (``simulate`` or ``ingest``).

    Returns
    -------
    dict or None
        The manifest if the dataset is complete, else None.

    Notes
    -----
    Each shard is written to a temporary file and renamed, then its sidecar
    (with its SHA-256) likewise: a rerun skips every shard whose sidecar
    matches and redoes the rest, so an interrupted run resumes without losing
    or half-writing anything.
    """
    field_fn = _simulated_field if field_fn is None else field_fn
    for split, n in counts.items():
        _check_split(split)
        if int(n) < 0:
            raise ValueError(f"negative count for split {split!r}")
    if shard_size < 1 or workers < 1:
        raise ValueError("shard_size and workers must be positive")
    out = Path(out_dir)
    plan = _shard_plan(counts, shard_size)
    if not plan:
        raise ValueError("no clusters requested: every split count is zero")
    manifest_path = out / "manifest.json"
    header = {"format": DATASET_FORMAT, "version": DATASET_VERSION, "generator": generator,
              "seed": int(seed), "masks": bool(masks), "shard_size": int(shard_size),
              "counts": {s: int(counts.get(s, 0)) for s in SPLITS}, "config": _data_config(config)}
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if {k: old.get(k) for k in header} != header:
            raise ValueError(f"{out} holds a dataset made with other settings; use another --out")
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    mine = [t for j, t in enumerate(plan) if shard is None or j % shard[1] == shard[0]]
    todo = [t for t in mine if _shard_done(out, t[0], t[1]) is None]
    tasks = [(str(out), s, k, first, n, config, seed, masks, field_fn) for s, k, first, n in todo]
    bar = _Progress(len(tasks), "simulate shards") if progress and tasks else None
    if workers == 1 or len(tasks) <= 1:
        for t in tasks:
            _write_one_shard(t)
            bar and bar.update()
    else:
        # "spawn": forking a process that has imported TensorFlow can deadlock.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for _ in pool.map(_write_one_shard, tasks):
                bar and bar.update()
    sides = [_shard_done(out, s, k) for s, k, _, _ in plan]
    if any(side is None for side in sides):
        return None
    manifest = dict(header, shards={s: [d for d in sides if d["split"] == s] for s in SPLITS},
                    packages={"wlcnn": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
                              "astropy": astropy.__version__})
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return manifest


class ClusterDataset:
    """Read access to a dataset written by :func:`write_dataset`.

    Parameters
    ----------
    path : path
        The dataset directory.
    config : Config, optional
        If given, the dataset must have been made with the same data fields
        (grid, redshifts, noise model), else ValueError.
    verify : bool
        Check each shard's SHA-256 when it is loaded (a corrupt or truncated
        shard raises ValueError rather than being read).
    """

    def __init__(self, path, config=None, verify=True):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            raise ValueError(f"{self.path} is not a complete wlcnn dataset (no manifest.json)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{mpath} is corrupt: {exc}") from None
        if self.manifest.get("format") != DATASET_FORMAT or self.manifest.get("version") != DATASET_VERSION:
            raise ValueError(f"{self.path}: not a wlcnn dataset of format version {DATASET_VERSION}")
        self.config = dataclasses.replace(PAPER, **dataclasses.asdict(config_from_dict(self.manifest["config"])))
        if config is not None and _data_config(config) != self.manifest["config"]:
            diff = [k for k in DATA_FIELDS if _data_config(config)[k] != self.manifest["config"][k]]
            raise ValueError(f"{self.path} was made with another config (differs in {', '.join(diff)})")
        self.verify = verify

    def count(self, split):
        """Number of clusters in ``split``."""
        return int(self.manifest["counts"][_check_split(split)])

    def shards(self, split):
        """The shard entries (file, first, n, sha256) of ``split``."""
        return self.manifest["shards"][_check_split(split)]

    def load_shard(self, split, k):
        """All arrays of shard ``k`` of ``split`` (dict of numpy arrays)."""
        entry = self.shards(split)[k]
        path = self.path / entry["file"]
        if not path.exists():
            raise ValueError(f"missing shard {path}")
        if self.verify and _sha256(path) != entry["sha256"]:
            raise ValueError(f"corrupt shard {path}: checksum differs from the manifest")
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise ValueError(f"corrupt shard {path}: {exc}") from None

    def clusters(self, split, shard_ids=None):
        """Iterate over the clusters of ``split`` (one shard in memory at a time)."""
        ids = range(len(self.shards(split))) if shard_ids is None else shard_ids
        for k in ids:
            yield from unpack_shard(self.load_shard(split, k))


def unpack_shard(arrays):
    """The cluster records (dicts as :func:`make_cluster`) of a loaded shard."""
    co, mo = arrays["cat_offsets"], arrays["mask_offsets"]
    for i in range(len(arrays["kappa"])):
        cat = Table({c: arrays[f"cat_{c}"][co[i]:co[i + 1]].astype(np.float64) for c in CATALOG_COLUMNS})
        masks = Table({c: arrays[f"mask_{c}"][mo[i]:mo[i + 1]] for c in ("x", "y", "radius")})
        yield {"index": int(arrays["index"][i]), "kappa": arrays["kappa"][i], "gamma1": arrays["gamma1"][i],
               "gamma2": arrays["gamma2"][i], "catalog": cat, "masks": masks,
               "meta": json.loads(str(arrays["meta"][i]))}


# ---------------------------------------------------------------------------
# §2.3.2 Gridding the catalog onto the input pixels (the Cython extension)
# ---------------------------------------------------------------------------
def _as_1d(name, a):
    a = np.asarray(a)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
                                 or np.issubdtype(a.dtype, np.bool_)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per source), got shape {a.shape}")
    a = np.ascontiguousarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _positive(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


#: Accepted ranges of per-source values: outside them a source is no
#: ellipticity measurement (and its weight 1/σ² would overflow float64 sums).
SIGMA_RANGE = (1e-6, 1e6)
MAX_ABS_ELLIPTICITY = 1e3


def _check_grid_args(x, y, e1, e2, sigma, npix, pixel_arcsec, fwhm_arcsec, cut_sigma, empty_error):
    cols = [_as_1d(n, a) for n, a in (("x", x), ("y", y), ("e1", e1), ("e2", e2), ("sigma", sigma))]
    lengths = {len(c) for c in cols}
    if len(lengths) != 1:
        raise ValueError("x, y, e1, e2, sigma must have the same length, got "
                         + ", ".join(str(len(c)) for c in cols))
    if np.any(cols[4] <= 0):
        raise ValueError("sigma must be positive for every source")
    if np.any((cols[4] < SIGMA_RANGE[0]) | (cols[4] > SIGMA_RANGE[1])):
        raise ValueError(f"sigma must lie in [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}] for every source")
    if np.any(np.abs(cols[2]) > MAX_ABS_ELLIPTICITY) or np.any(np.abs(cols[3]) > MAX_ABS_ELLIPTICITY):
        raise ValueError(f"|e1|, |e2| above {MAX_ABS_ELLIPTICITY:g}: not an ellipticity")
    if isinstance(npix, (bool, np.bool_)) or not isinstance(npix, (int, np.integer)):
        raise TypeError(f"npix must be an integer, got {type(npix).__name__}")
    if npix <= 0:
        raise ValueError(f"npix must be positive, got {npix}")
    pixel_arcsec = _positive("pixel_arcsec", pixel_arcsec)
    fwhm_arcsec = _positive("fwhm_arcsec", fwhm_arcsec)
    cut_sigma = _positive("cut_sigma", cut_sigma)
    empty_error = _positive("empty_error", empty_error)
    s_pix = fwhm_arcsec / FWHM_PER_SIGMA / pixel_arcsec
    if not 0.05 <= s_pix <= npix:
        raise ValueError(f"the kernel's σ is {s_pix:g} pixels; it must lie between 0.05 pixel and "
                         f"the grid's side ({npix}): check fwhm_arcsec and pixel_arcsec")
    if cut_sigma > 10:
        raise ValueError(f"cut_sigma={cut_sigma} is beyond 10 σ, where the Gaussian is below e^-50")
    return cols, int(npix), pixel_arcsec, fwhm_arcsec, cut_sigma, empty_error


def _within_reach(xp, yp, npix, rcut):
    """Sources within the kernel's reach of the grid (the rest add nothing)."""
    return (xp >= -rcut - 1) & (xp <= npix + rcut) & (yp >= -rcut - 1) & (yp <= npix + rcut)


def grid_catalog_numpy(x, y, e1, e2, sigma, npix=PAPER.npix, pixel_arcsec=PAPER.pixel_arcsec,
                       fwhm_arcsec=PAPER.fwhm_arcsec, cut_sigma=PAPER.kernel_cut_sigma,
                       empty_error=PAPER.empty_pixel_error):
    """NumPy reference of :func:`grid_catalog` (same maths; slow).

    A vectorised stencil: for each offset (di, dj) of the truncated kernel,
    every source adds to the pixel at that offset from its nearest pixel with
    ``np.bincount``.  Kept for tests and as the fallback without the extension.
    """
    (x, y, e1, e2, sigma), npix, pixel_arcsec, fwhm_arcsec, cut_sigma, empty_error = _check_grid_args(
        x, y, e1, e2, sigma, npix, pixel_arcsec, fwhm_arcsec, cut_sigma, empty_error)
    s_pix = fwhm_arcsec / FWHM_PER_SIGMA / pixel_arcsec
    rcut = cut_sigma * s_pix
    xp, yp = x / pixel_arcsec - 0.5, y / pixel_arcsec - 0.5
    near = _within_reach(xp, yp, npix, rcut)
    xp, yp, e1, e2 = xp[near], yp[near], e1[near], e2[near]
    w = 1.0 / sigma[near] ** 2
    ic, jc = np.rint(yp).astype(np.int64), np.rint(xp).astype(np.int64)
    half = int(np.ceil(rcut + 0.5))
    acc = np.zeros((5, npix * npix))
    for di in range(-half, half + 1):
        for dj in range(-half, half + 1):
            i, j = ic + di, jc + dj
            d2 = (i - yp) ** 2 + (j - xp) ** 2
            ok = (np.abs(i - yp) <= rcut) & (np.abs(j - xp) <= rcut) & (i >= 0) & (i < npix) & (j >= 0) & (j < npix)
            if not ok.any():
                continue
            idx = (i * npix + j)[ok]
            ww = np.exp(-0.5 * d2[ok] / s_pix**2)
            wu = ww * w[ok]
            for k, vals in enumerate((wu, wu * e1[ok], wu * e2[ok], ww * wu, ww)):
                acc[k] += np.bincount(idx, vals, minlength=npix * npix)
    acc = acc.reshape(5, npix, npix)
    out = np.zeros((4, npix, npix))
    has = acc[0] > 0
    out[0][has] = acc[1][has] / acc[0][has]
    out[1][has] = acc[2][has] / acc[0][has]
    out[2] = empty_error
    out[2][has] = np.sqrt(acc[3][has]) / acc[0][has]
    out[3] = acc[4] * _density_norm(fwhm_arcsec)
    return out


def _density_norm(fwhm_arcsec):
    """1 / (2π σ_W²) in arcmin⁻²: Σ W times this is sources per arcmin²."""
    s_arcmin = fwhm_arcsec / FWHM_PER_SIGMA / 60.0
    return 1.0 / (2.0 * np.pi * s_arcmin**2)


def grid_catalog(x, y, e1, e2, sigma, npix=PAPER.npix, pixel_arcsec=PAPER.pixel_arcsec,
                 fwhm_arcsec=PAPER.fwhm_arcsec, cut_sigma=PAPER.kernel_cut_sigma,
                 empty_error=PAPER.empty_pixel_error, out=None):
    """Grid a source catalog onto the network's input pixels.

    Parameters
    ----------
    x, y : array_like, shape (n,)
        Source positions in arcsec from the field's lower-left corner.
        Sources outside the field are allowed: each adds to the pixels whose
        centres lie within the kernel's truncation radius, so a source just
        beyond an edge still informs the edge pixels, and one further away
        contributes nothing.
    e1, e2 : array_like, shape (n,)
        Observed ellipticity components (|ε| may exceed 1 after measurement
        noise; it is not clipped).
    sigma : array_like, shape (n,)
        Per-component ellipticity error σ_i > 0; weights are u_i = 1/σ_i².
    npix : int
        Output grid side (500 for the paper).
    pixel_arcsec : float
        Pixel side in arcsec (3.84″).
    fwhm_arcsec : float
        FWHM of the Gaussian kernel W in arcsec (7″, §2.3.2).
    cut_sigma : float
        W is set to zero where |Δx| or |Δy| exceeds ``cut_sigma`` σ_W (4σ_W =
        11.9″ for the paper, where W is e^{-8} ≈ 3e-4 of its peak).  The cut is
        square: W stays separable (one exp per source and axis, not per tap)
        and keeps the symmetries of the pixel grid (90° rotations, mirrors),
        all that the augmentations need.
    empty_error : float
        Δε of a pixel with no source within the truncation radius (its ε̄ is 0).
    out : numpy.ndarray, shape (4, npix, npix), float64, optional
        Buffer to write into (saves an allocation per call).

    Returns
    -------
    numpy.ndarray, shape (4, npix, npix), float64
        ``[ε̄1, ε̄2, Δε, n]``:
        ε̄_k = Σ W u ε_k / Σ W u; Δε = sqrt(Σ W² u² σ²) / Σ W u, the standard
        error of ε̄_k; n = Σ W / (2π σ_W²) in sources per arcmin².

    Notes
    -----
    DESIGN.md "Gridding"; §2.3.2 of the paper ("smoothing the source catalogs
    with a FWHM = 7″ Gaussian kernel").  An empty catalog is valid: every pixel
    is empty.  Computed by the compiled ``_grid`` extension when it is built,
    else by :func:`grid_catalog_numpy`.
    """
    (x, y, e1, e2, sigma), npix, pixel_arcsec, fwhm_arcsec, cut_sigma, empty_error = _check_grid_args(
        x, y, e1, e2, sigma, npix, pixel_arcsec, fwhm_arcsec, cut_sigma, empty_error)
    if _grid is None:
        result = grid_catalog_numpy(x, y, e1, e2, sigma, npix, pixel_arcsec, fwhm_arcsec,
                                    cut_sigma, empty_error)
        if out is not None:
            out[...] = result
            return out
        return result
    if out is None:
        out = np.empty((4, npix, npix))
    elif not (isinstance(out, np.ndarray) and out.shape == (4, npix, npix)
              and out.dtype == np.float64 and out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous float64 array of shape (4, {npix}, {npix})")
    s_pix = fwhm_arcsec / FWHM_PER_SIGMA / pixel_arcsec
    # The footprints, the first tap's W and the recurrence's ratios are
    # per-source arithmetic inside the extension: as separate NumPy passes
    # over the catalog (clip, ceil, masks, casts) they cost more than its loop.
    _grid.grid(x, y, e1, e2, sigma, pixel_arcsec, cut_sigma * s_pix, 0.5 / s_pix**2, empty_error,
               _density_norm(fwhm_arcsec), out)
    return out


def grid_table(catalog, config=PAPER, out=None):
    """:func:`grid_catalog` of a catalog table from :func:`simulate_catalog`."""
    return grid_catalog(catalog["x"], catalog["y"], catalog["e1"], catalog["e2"], catalog["sigma"],
                        config.npix, config.pixel_arcsec, config.fwhm_arcsec,
                        config.kernel_cut_sigma, config.empty_pixel_error, out=out)


# ---------------------------------------------------------------------------
# §2.3.2 Augmentation: subfields, orientations, and the input pipeline
# ---------------------------------------------------------------------------
#: The paper's six orientations (§2.3.2): four rotations and two mirrors.
ORIENTATIONS = ("rot0", "rot90", "rot180", "rot270", "flip_x", "flip_y")


def orient_map(a, orientation):
    """Rotate or mirror the last two axes [y, x] of a scalar map.

    ``rotK`` is ``np.rot90(a, K/90)``; ``flip_x`` mirrors x (columns),
    ``flip_y`` mirrors y (rows).  Returns a view where NumPy can.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; expected one of {ORIENTATIONS}")
    if orientation == "flip_x":
        return a[..., :, ::-1]
    if orientation == "flip_y":
        return a[..., ::-1, :]
    return np.rot90(a, ORIENTATIONS.index(orientation), axes=(-2, -1))


def spin2_sign(orientation):
    """(s1, s2) with (g1, g2) → (s1 g1, s2 g2) under ``orientation``.

    Notes
    -----
    A spin-2 field rotated by φ is multiplied by e^{2iφ}: 90° and 270° flip
    both components, 180° keeps them; a mirror flips g2 (DESIGN.md
    "Lensing").
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; expected one of {ORIENTATIONS}")
    return {"rot0": (1, 1), "rot90": (-1, -1), "rot180": (1, 1), "rot270": (-1, -1),
            "flip_x": (1, -1), "flip_y": (1, -1)}[orientation]


def orient_shear(g1, g2, orientation):
    """Rotate or mirror a shear field: positions as :func:`orient_map`,
    components by the spin-2 rule of :func:`spin2_sign`."""
    s1, s2 = spin2_sign(orientation)
    return s1 * orient_map(g1, orientation), s2 * orient_map(g2, orientation)


def subfield(grid, mosaic, m_y, m_x, orientation="rot0", config=PAPER, channels=3):
    """One network sample: a 386² input crop and its 128² target (§2.3.2).

    Parameters
    ----------
    grid : array_like, shape (4, npix, npix)
        Gridded catalog (ε̄1, ε̄2, Δε, n) from :func:`grid_catalog`.
    mosaic : array_like, shape (mosaic_npix, mosaic_npix)
        Truth on the mosaic grid (:func:`mosaic_truth`); None for no target.
    m_y, m_x : int
        Offset index, 0 ≤ m < n_offsets: the crop starts at input pixel
        o = 3m and its output pixel k lands on mosaic pixel m + k.
    orientation : str
        One of :data:`ORIENTATIONS`, applied to input and target alike.
    channels : int
        3 (ε̄1, ε̄2, Δε) or 4 (+ n / nominal density: the 4Channel variant).

    Returns
    -------
    x : numpy.ndarray, float32, shape (386, 386, channels)
    y : numpy.ndarray, float32, shape (128, 128, 1), or None
    """
    if channels not in (3, 4):
        raise ValueError(f"channels must be 3 or 4, got {channels}")
    if not (0 <= m_y < config.n_offsets and 0 <= m_x < config.n_offsets):
        raise ValueError(f"offset index ({m_y}, {m_x}) outside 0..{config.n_offsets - 1}")
    s, step = config.subfield_npix, config.offset_step
    oy, ox = step * m_y, step * m_x
    crop = np.asarray(grid)[:channels, oy:oy + s, ox:ox + s]
    e1, e2 = orient_shear(crop[0], crop[1], orientation)
    rest = orient_map(crop[2:], orientation)
    if channels == 4:
        rest = rest * np.array([1.0, 1.0 / config.source_density_arcmin2])[:, None, None]
    x = np.stack([e1, e2, *rest], axis=-1).astype(np.float32)
    if mosaic is None:
        return x, None
    o = config.output_npix
    y = orient_map(np.asarray(mosaic)[m_y:m_y + o, m_x:m_x + o], orientation)
    return x, np.ascontiguousarray(y, dtype=np.float32)[..., None]


def cluster_grid(cluster, config=PAPER, rng=None, fresh=False):
    """Gridded input of a cluster: its stored catalog, or a fresh draw.

    With ``fresh=True`` a new catalog (positions, magnitudes, shape and
    measurement noise) is drawn from the stored κ, γ with the stored masks —
    augmentation beyond the paper, which used one catalog per cluster.
    """
    if fresh:
        masks = cluster["masks"] if len(cluster["masks"]) else None
        cat = simulate_catalog(cluster["kappa"].astype(np.float64), cluster["gamma1"].astype(np.float64),
                               cluster["gamma2"].astype(np.float64), config, rng, masks)
    else:
        cat = cluster["catalog"]
    return grid_table(cat, config)


def _sample_stream(dataset, split, shard_id, seed, channels, fresh, samples_per_visit):
    """Samples of one shard: every cluster visited once, in random order,
    ``samples_per_visit`` random (offset, orientation) subfields each."""
    config = dataset.config
    # Two streams, so that fresh catalogs leave the clusters, offsets and
    # orientations drawn unchanged.
    rng, cat_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(
        int(seed) & 0x7FFFFFFFFFFFFFFF, spawn_key=(int(shard_id),)).spawn(2))
    clusters = list(dataset.clusters(split, [int(shard_id)]))
    for i in rng.permutation(len(clusters)):
        c = clusters[i]
        grid = cluster_grid(c, config, cat_rng, fresh)
        mosaic = mosaic_truth(c["kappa"], config)
        for _ in range(samples_per_visit):
            m_y, m_x = rng.integers(0, config.n_offsets, 2)
            t = ORIENTATIONS[rng.integers(len(ORIENTATIONS))]
            yield subfield(grid, mosaic, m_y, m_x, t, config, channels)


def fixed_subfields(data_dir, split="val", n=64, seed=0, channels=3, config=None):
    """A fixed set of subfields (the validation set of §2.3.2).

    Draws ``n`` (cluster, offset, orientation) triples with ``seed`` from the
    stored catalogs of ``split``; the same arguments give the same arrays.

    Returns
    -------
    x : numpy.ndarray, float32, shape (n, 386, 386, channels)
    y : numpy.ndarray, float32, shape (n, 128, 128, 1)
    """
    ds = data_dir if isinstance(data_dir, ClusterDataset) else ClusterDataset(data_dir, config)
    total = ds.count(split)
    if total == 0 or n < 1:
        raise ValueError(f"no {split} clusters (or n < 1) for a validation set in {ds.path}")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(SPLITS.index(split), 7)))
    which = np.sort(rng.integers(0, total, n))
    xs, ys = [], []
    for c in ds.clusters(split):
        for _ in range(int(np.sum(which == c["index"]))):
            grid = cluster_grid(c, ds.config)
            m_y, m_x = rng.integers(0, ds.config.n_offsets, 2)
            t = ORIENTATIONS[rng.integers(len(ORIENTATIONS))]
            x, y = subfield(grid, mosaic_truth(c["kappa"], ds.config), m_y, m_x, t, ds.config, channels)
            xs.append(x)
            ys.append(y)
    return np.stack(xs), np.stack(ys)


def training_data(data_dir, batch_size, seed=0, channels=3, fresh_catalogs=False, n_val=64,
                  split="train", val_split="val", samples_per_visit=4, shuffle_buffer=64,
                  parallel=2, config=None, val_seed=0):
    """The tf.data input pipeline of training (§2.3.2).

    Parameters
    ----------
    data_dir : path or ClusterDataset
    batch_size : int
    seed : int
        Fixes the shard order, clusters, offsets, orientations and fresh
        catalogs of the stream.
    channels : int
        3, or 4 for the 4Channel variant.
    fresh_catalogs : bool
        Draw a new source catalog at every cluster visit (see :func:`cluster_grid`).
    n_val : int
        Size of the fixed validation set from ``val_split``.
    val_seed : int
        Seed of that set, apart from ``seed``: every run and every resumption
        validates on the same subfields.
    samples_per_visit : int
        Subfields cut from one gridding of a cluster.
    shuffle_buffer : int
        Samples mixed across clusters and shards (1.8 MB each).
    parallel : int
        Shards read and gridded at once (the Cython gridder runs without the
        GIL, so these overlap on several cores).

    Returns
    -------
    train : tf.data.Dataset
        Infinite stream of batches (x (B, 386, 386, C), y (B, 128, 128, 1)),
        float32.  Memory holds ``parallel`` shards and the shuffle buffer, never
        the whole dataset.
    val : (numpy.ndarray, numpy.ndarray)
        :func:`fixed_subfields` of ``val_split``.
    """
    ds = data_dir if isinstance(data_dir, ClusterDataset) else ClusterDataset(data_dir, config)
    _check_split(split)
    n_shards = len(ds.shards(split))
    if ds.count(split) == 0 or n_shards == 0:
        raise ValueError(f"no {split} clusters in {ds.path}")
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    val = fixed_subfields(ds, val_split, n_val, val_seed, channels)
    cfg = ds.config
    sig = (tf.TensorSpec((cfg.subfield_npix, cfg.subfield_npix, channels), tf.float32),
           tf.TensorSpec((cfg.output_npix, cfg.output_npix, 1), tf.float32))

    def generate(shard_id, stream_seed):
        yield from _sample_stream(ds, split, int(shard_id), int(stream_seed), channels,
                                  fresh_catalogs, samples_per_visit)

    def shard_samples(shard_id, stream_seed):
        return tf.data.Dataset.from_generator(generate, output_signature=sig, args=(shard_id, stream_seed))

    shard_ids = tf.data.Dataset.range(n_shards).shuffle(n_shards, seed=seed, reshuffle_each_iteration=True)
    stream = tf.data.Dataset.zip(shard_ids.repeat(), tf.data.Dataset.random(seed=seed))
    train = (stream.interleave(lambda i, s: shard_samples(i, s), cycle_length=parallel,
                               num_parallel_calls=parallel, deterministic=True)
             .shuffle(shuffle_buffer, seed=seed)
             .batch(batch_size, drop_remainder=True)
             .prefetch(2))
    return train, val


# ---------------------------------------------------------------------------
# §2.3.2 The network: convolutions by FFT
# ---------------------------------------------------------------------------
# On a CPU, Keras's own 49x49 Conv2D/Conv2DTranspose spend ~5 s a sample in
# their backward pass; by FFT the cost no longer grows with the filter area.
# The gradients below reuse the forward spectra instead of differentiating
# through rfft2d/irfft2d (TF's RFFT gradient rebuilds a DFT matrix each call).
# Measured on the 2-core CPU (TF 2.21; bench_grad.py, fastest of 8 steps
# alternating the two versions; the machine was shared, so medians vary
# more), forward + backward, 49x49 filter, 8 -> 8 channels, batch 4:
#   Conv2D on 176^2:           built-in gradient 0.042 s, custom 0.029 s
#   Conv2DTranspose on 128^2:  built-in gradient 0.059 s, custom 0.044 s
#   Table 1 training step:     built-in gradient 0.43 s,  custom 0.33 s
# so the custom gradient is kept.


def _rfft(t, size):
    """2-D real FFT of the two innermost axes, zero-padded to ``size``."""
    pad = [[0, 0]] * (t.shape.rank - 2) + [[0, size[0] - t.shape[-2]],
                                           [0, size[1] - t.shape[-1]]]
    return tf.signal.rfft2d(tf.pad(t, pad), fft_length=size)


def _irfft(t, size):
    return tf.signal.irfft2d(t, fft_length=size)


@tf.custom_gradient
def _correlate_valid(x, k):
    """Valid 2-D cross-correlation summed over input channels (Keras Conv2D).

    Parameters
    ----------
    x : tf.Tensor, shape (B, C, H, W)
    k : tf.Tensor, shape (C, O, h, w)

    Returns
    -------
    tf.Tensor, shape (B, O, H - h + 1, W - w + 1)

    Notes
    -----
    A circular correlation of size (H, W) equals the linear one on the valid
    corner: the largest input index reached there is (H - h) + (h - 1) = H - 1.
    The custom gradient reuses the forward spectra X, K: with DY the spectrum
    of the zero-padded output gradient, dx = irfft(DY K) (a convolution) and
    dk = irfft(X conj(DY)) cropped to (h, w).
    """
    (H, W), (h, w) = x.shape[-2:], k.shape[-2:]
    X, K = _rfft(x, (H, W)), _rfft(k, (H, W))
    y = _irfft(tf.einsum("bcuv,couv->bouv", X, tf.math.conj(K)), (H, W))

    def grad(dy):
        # dy is zero-padded to (H, W): the wrapped-around lags of the
        # circular convolution then only meet the kernel's zero padding.
        DY = _rfft(dy, (H, W))
        dx = _irfft(tf.einsum("bouv,couv->bcuv", DY, K), (H, W))
        dk = _irfft(tf.einsum("bcuv,bouv->couv", X, tf.math.conj(DY)), (H, W))
        return dx, dk[..., :h, :w]

    return y[..., : H - h + 1, : W - w + 1], grad


@tf.custom_gradient
def _convolve_full(x, k):
    """Full 2-D linear convolution summed over input channels (Keras valid
    Conv2DTranspose with stride 1).

    Parameters
    ----------
    x : tf.Tensor, shape (B, C, H, W)
    k : tf.Tensor, shape (C, O, h, w)

    Returns
    -------
    tf.Tensor, shape (B, O, H + h - 1, W + w - 1)

    Notes
    -----
    The transform size is the output size, so nothing wraps around. The
    custom gradient reuses the forward spectra X, K: dx = irfft(DY conj(K))
    and dk = irfft(conj(X) DY) (correlations), cropped to (H, W) and (h, w).
    """
    (H, W), (h, w) = x.shape[-2:], k.shape[-2:]
    size = (H + h - 1, W + w - 1)
    X, K = _rfft(x, size), _rfft(k, size)
    y = _irfft(tf.einsum("bcuv,couv->bouv", X, K), size)

    def grad(dy):
        DY = _rfft(dy, size)
        dx = _irfft(tf.einsum("bouv,couv->bcuv", DY, tf.math.conj(K)), size)
        dk = _irfft(tf.einsum("bcuv,bouv->couv", tf.math.conj(X), DY), size)
        return dx[..., :H, :W], dk[..., :h, :w]

    return y, grad


class _FFTConvBase(keras.layers.Layer):
    """Shared parts of the two FFT layers (valid padding, stride 1,
    channels last). Subclasses set ``_transpose``."""

    _transpose = False

    def __init__(self, filters, kernel_size, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        ks = kernel_size
        self.kernel_size = (ks, ks) if isinstance(ks, int) else tuple(ks)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        if None in input_shape[1:]:
            raise ValueError(f"{self.name}: FFT layers need static spatial "
                             f"size and channels, got {input_shape}")
        c_in = input_shape[-1]
        # Keras's layouts, so that weights move between the two versions:
        # Conv2D (h, w, in, out), Conv2DTranspose (h, w, out, in).
        io = (self.filters, c_in) if self._transpose else (c_in, self.filters)
        self.kernel = self.add_weight(name="kernel",
                                      shape=self.kernel_size + io,
                                      initializer=self.kernel_initializer)
        self.bias = (self.add_weight(name="bias", shape=(self.filters,),
                                     initializer=self.bias_initializer)
                     if self.use_bias else None)

    def compute_output_shape(self, input_shape):
        sign = 1 if self._transpose else -1
        b, h, w, _ = input_shape
        return (b, h + sign * (self.kernel_size[0] - 1),
                w + sign * (self.kernel_size[1] - 1), self.filters)

    def call(self, inputs):
        x = tf.transpose(inputs, (0, 3, 1, 2))  # rfft2d works on NCHW
        if self._transpose:
            k = tf.transpose(self.kernel, (3, 2, 0, 1))   # -> (in, out, h, w)
            y = _convolve_full(x, k)
        else:
            k = tf.transpose(self.kernel, (2, 3, 0, 1))   # -> (in, out, h, w)
            y = _correlate_valid(x, k)
        y = tf.transpose(y, (0, 2, 3, 1))
        if self.use_bias:
            y = y + self.bias
        return self.activation(y)

    def get_config(self):
        return {**super().get_config(),
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer":
                    keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer":
                    keras.initializers.serialize(self.bias_initializer)}


@keras.saving.register_keras_serializable(package="wlcnn")
class FFTConv2D(_FFTConvBase):
    """Drop-in for ``keras.layers.Conv2D(padding="valid", strides=1)``,
    computed with ``tf.signal.rfft2d``.

    Parameters
    ----------
    filters : int
        Output channels.
    kernel_size : int or (int, int)
        Filter size (h, w) in pixels.
    activation : str or callable, optional
    use_bias : bool

    Notes
    -----
    Input (B, H, W, C) -> output (B, H - h + 1, W - w + 1, filters). The
    weights ``kernel`` (h, w, C, filters) and ``bias`` (filters,) are those of
    Keras's Conv2D. The cost (C + filters transforms of size H x W and
    C * filters spectral products) does not depend on the filter size.
    Conv2D-2..5 and the Output layer of Table 1.
    """


@keras.saving.register_keras_serializable(package="wlcnn")
class FFTConv2DTranspose(_FFTConvBase):
    """Drop-in for ``keras.layers.Conv2DTranspose(padding="valid",
    strides=1)``, computed with ``tf.signal.rfft2d``.

    Parameters
    ----------
    filters : int
        Output channels.
    kernel_size : int or (int, int)
        Filter size (h, w) in pixels.
    activation : str or callable, optional
    use_bias : bool

    Notes
    -----
    Input (B, H, W, C) -> output (B, H + h - 1, W + w - 1, filters): the full
    linear convolution. The weights ``kernel`` (h, w, filters, C) and ``bias``
    (filters,) are those of Keras's Conv2DTranspose. TransConv2D-1..5 of
    Table 1.
    """

    _transpose = True


# ---------------------------------------------------------------------------
# §2.3.2 and Appendix A: the model of Table 1
# ---------------------------------------------------------------------------
FORMAT_VERSION = 1  # of the description stored in every saved model

# Appendix A. ``filter_size`` None: Config.filter_size (§2.3.2). Input
# channels: (eps1, eps2, delta eps) of §2.3.2, plus the smoothed source
# density for 4Channel.
VARIANTS = {
    "FocalLoss": dict(channels=3, filter_size=None, skip=True, focal=True),
    "Fiducial":  dict(channels=3, filter_size=None, skip=True, focal=False),
    "4Channel":  dict(channels=4, filter_size=None, skip=True, focal=False),
    "19Filter":  dict(channels=3, filter_size=19, skip=True, focal=False),
    "29Filter":  dict(channels=3, filter_size=29, skip=True, focal=False),
    "NoSkip":    dict(channels=3, filter_size=None, skip=False, focal=False),
}

# Table 1, column "Multiplied to". Multiply-4 takes Multiply-1, not
# Multiply-3 as the pattern of the rows above it would suggest; we follow
# the table. The skip tensor is the raw Multiply-# output, not its batch-
# normalised copy: the table names Multiply-# layers and lists no BN layer,
# so BN (§2.3.2: "batch normalization to the output of each Multiply-#")
# sits on the main path only, as in the Keras code the table reads like.
MULTIPLIED_TO = {1: "avgpool", 2: "multiply_1", 3: "multiply_2",
                 4: "multiply_1"}


def resolve_conv(conv="auto"):
    """Which convolution implementation ``build_model`` uses.

    Parameters
    ----------
    conv : {"auto", "fft", "direct"}

    Returns
    -------
    str
        "fft" or "direct".

    Notes
    -----
    "auto" is "fft" on every device. On this project's 2-core CPU a Table 1
    training step at batch 2 took 164 s direct and 0.50 s by FFT
    (bench_train.py; the direct backward pass of a 49x49 layer is ~200x its
    forward pass). On a GPU it was not measured here; the FFT cost does not
    grow with the filter area while cuDNN's does, so FFT is the default
    there too; pass "direct" to use Keras's own layers.
    """
    if conv not in ("auto", "fft", "direct"):
        raise ValueError(
            f"conv must be 'auto', 'fft' or 'direct', got {conv!r}")
    return "fft" if conv == "auto" else conv


@keras.saving.register_keras_serializable(package="wlcnn")
class ModelInfo(keras.layers.Layer):
    """Weightless pass-through layer whose config is the model's description
    (variant, input channels, filter size, grids, format version), so that
    it travels inside every ``.keras`` file.

    Parameters
    ----------
    info : dict
        JSON-serialisable description, see ``build_model``.
    """

    def __init__(self, info, **kwargs):
        super().__init__(**kwargs)
        self.info = dict(info)

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "info": self.info}


INFO_LAYER = "wlcnn_info"


def build_model(config=PAPER, variant="FocalLoss", conv="auto"):
    """The CNN of Table 1 (channels last), or one of its Appendix A variants.

    Parameters
    ----------
    config : Config
        Grids, filter counts and filter size (``filter_size`` is overridden
        by the 19Filter/29Filter variants).
    variant : str
        A key of ``VARIANTS``: "FocalLoss" (the paper's model), "Fiducial",
        "4Channel", "19Filter", "29Filter" or "NoSkip".
    conv : {"auto", "fft", "direct"}
        FFT layers or Keras's Conv2D/Conv2DTranspose (same weights), see
        ``resolve_conv``.

    Returns
    -------
    keras.Model
        Uncompiled; input (B, subfield_npix, subfield_npix, channels) of
        gridded (eps1, eps2, delta eps[, n]), output (B, output_npix,
        output_npix, 1) of kappa. ``model_info(model)`` gives its description.

    Notes
    -----
    Table 1: Conv2D-1 (3x3) -> AvgPool (3x3) -> four blocks of
    TransConv2D-# -> Conv2D-# -> Multiply-# -> BatchNorm -> TransConv2D-5 ->
    Output. tanh on every Conv2D-# and TransConv2D-# (§2.3.2). The Output
    layer is linear: the table names it apart from the Conv2D-# layers, and
    kappa exceeds 1 in cluster cores, beyond tanh's range. NoSkip drops the
    Multiply layers and keeps the batch normalisation.
    """
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown variant {variant!r}; one of {list(VARIANTS)}")
    spec = VARIANTS[variant]
    f = spec["filter_size"] or config.filter_size
    n_conv1 = config.subfield_npix - config.first_kernel + 1
    if n_conv1 % config.pool or n_conv1 // config.pool != config.output_npix:
        raise ValueError(
            f"subfield_npix={config.subfield_npix}, first_kernel="
            f"{config.first_kernel} and pool={config.pool} give no "
            f"{config.output_npix}^2 output grid")
    conv = resolve_conv(conv)
    Conv, TransConv = ((FFTConv2D, FFTConv2DTranspose) if conv == "fft" else
                       (keras.layers.Conv2D, keras.layers.Conv2DTranspose))
    info = dict(format_version=FORMAT_VERSION, variant=variant,
                channels=spec["channels"], filter_size=f, skip=spec["skip"],
                loss="focal" if spec["focal"] else "mse", conv=conv,
                config=dataclasses.asdict(config))

    L = keras.layers
    inputs = keras.Input((config.subfield_npix, config.subfield_npix,
                          spec["channels"]), name="input")
    x = ModelInfo(info, name=INFO_LAYER)(inputs)
    # A 3x3 filter is cheap directly, and by FFT would need 386^2 transforms.
    x = L.Conv2D(config.n_filters, config.first_kernel, activation="tanh",
                 name="conv2d_1")(x)
    x = L.AveragePooling2D(config.pool, name="avgpool")(x)
    skips = {"avgpool": x}
    for i in range(1, len(MULTIPLIED_TO) + 1):
        x = TransConv(config.n_filters, f, activation="tanh",
                      name=f"transconv2d_{i}")(x)
        x = Conv(config.n_filters, f, activation="tanh",
                 name=f"conv2d_{i + 1}")(x)
        if spec["skip"]:
            x = L.Multiply(name=f"multiply_{i}")([x, skips[MULTIPLIED_TO[i]]])
            skips[f"multiply_{i}"] = x
        x = L.BatchNormalization(name=f"batchnorm_{i}")(x)
    x = TransConv(config.n_filters_final, f, activation="tanh",
                  name=f"transconv2d_{len(MULTIPLIED_TO) + 1}")(x)
    outputs = Conv(1, f, activation=None, name="output")(x)
    return keras.Model(inputs, outputs, name=f"wlcnn_{variant}")


def model_info(model):
    """The description stored in a model by ``build_model``.

    Parameters
    ----------
    model : keras.Model

    Returns
    -------
    dict
        Keys format_version, variant, channels, filter_size, skip, loss
        ("focal" or "mse"), conv ("fft" or "direct") and config (the
        ``Config`` fields as a dict).

    Raises
    ------
    ValueError
        If the model carries no description or one of another format.
    """
    try:
        info = model.get_layer(INFO_LAYER).info
    except ValueError:
        raise ValueError(f"model {model.name!r} carries no wlcnn description "
                         f"(no {INFO_LAYER!r} layer)") from None
    _check_version(info.get("format_version"), model.name)
    return dict(info)


def _check_version(version, where):
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: wlcnn model format {version}, this code "
                         f"reads format {FORMAT_VERSION}")


# ---------------------------------------------------------------------------
# §2.3.2 Losses: eq. 11-12 and A1
# ---------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="wlcnn")
class KappaLoss(keras.losses.Loss):
    """Focal-weighted (eq. 11-12) or plain (eq. A1) squared error of kappa,
    without the outer ``border_pix`` pixels of each side (§2.3.2).

    Parameters
    ----------
    border_pix : int
        Output pixels left out on each side.
    focal : bool
        True: eq. 11 with the weights of eq. 12 (FocalLoss); False: eq. A1.
    focal_floor : float
        Smallest denominator of eq. 12 (dimensionless kappa).

    Notes
    -----
    ``call(y_true, y_pred)`` takes (B, N, N) or (B, N, N, 1) kappa maps and
    returns one value per sample: the *mean* over the N - 2 border_pix squared
    pixels rather than eq. 11's sum, so the value does not depend on the grid
    size; Adam is invariant to the constant factor (up to its epsilon and the
    gradient-norm clipping of Config.clipnorm, which were set for the mean).
    """

    def __init__(self, border_pix=PAPER.loss_border_pix, focal=True,
                 focal_floor=PAPER.focal_floor, name=None, **kwargs):
        super().__init__(name=name or ("focal_loss" if focal else "mse_loss"),
                         **kwargs)
        self.border_pix = int(border_pix)
        self.focal = bool(focal)
        self.focal_floor = float(focal_floor)

    def call(self, y_true, y_pred):
        t, p = _inner(y_true, self.border_pix), _inner(y_pred, self.border_pix)
        err = tf.square(p - tf.cast(t, p.dtype))
        if self.focal:
            # eq. 12: w = 1 + |kappa| / max(kappa) over the sample's scored
            # window. A 128^2 window that misses the cluster has max(kappa)
            # near zero or negative, and the literal weights blow up (a
            # sketch run diverged, DESIGN.md "Lessons"): the denominator is
            # max(max|kappa|, focal_floor), so 1 <= w <= 2.
            a = tf.abs(tf.cast(t, p.dtype))
            peak = tf.reduce_max(a, axis=(1, 2), keepdims=True)
            err = (1.0 + a / tf.maximum(peak, self.focal_floor)) * err
        return tf.reduce_mean(err, axis=(1, 2))

    def get_config(self):
        return {**super().get_config(), "border_pix": self.border_pix,
                "focal": self.focal, "focal_floor": self.focal_floor}


def _inner(maps, border):
    """(B, N, N[, 1]) -> (B, N - 2 border, N - 2 border)."""
    maps = tf.convert_to_tensor(maps)
    if maps.shape.rank == 4:
        maps = maps[..., 0]
    n, m = maps.shape[1], maps.shape[2]
    return maps[:, border:n - border, border:m - border]


def make_loss(config=PAPER, variant="FocalLoss"):
    """The loss of ``variant``: eq. 11-12 for FocalLoss, eq. A1 otherwise
    (Appendix A), both over the pixels inside ``config.loss_border_pix``."""
    return KappaLoss(config.loss_border_pix, VARIANTS[variant]["focal"],
                     config.focal_floor)


def compile_model(model, config=PAPER, variant=None, learning_rate=None):
    """Compile with Adam (§2.3.2) and the variant's loss.

    Parameters
    ----------
    model : keras.Model
        From ``build_model``.
    config : Config
        ``learning_rate`` and ``clipnorm`` (gradient-norm clipping, needed
        by eq. 12 in practice, DESIGN.md "Lessons"), ``loss_border_pix`` and
        ``focal_floor``.
    variant : str, optional
        Default: the one stored in the model.
    learning_rate : float or keras.optimizers.schedules.LearningRateSchedule, optional
        Default: ``config.learning_rate``, constant (§2.3.2).

    Returns
    -------
    keras.Model
        The same model, compiled.
    """
    variant = variant or model_info(model)["variant"]
    lr = config.learning_rate if learning_rate is None else learning_rate
    model.compile(optimizer=keras.optimizers.Adam(lr, clipnorm=config.clipnorm),
                  loss=make_loss(config, variant))
    return model


# ---------------------------------------------------------------------------
# §2.3.2 Training: starting from KS93 (eq. 10) instead of random weights
# (beyond the paper)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class KS93Start:
    """How ``initialize_as_ks93`` sets a Table 1 network (not in the paper).

    Parameters
    ----------
    fwhm_arcmin : float
        Gaussian smoothing (FWHM, arcmin) folded into the KS93 kernel of the
        Output layer.
    input_gain : float
        Conv2D-1 passes ``input_gain`` x eps1, eps2 (its centre tap) to its
        channels 0 and 1: small enough that tanh stays linear (|eps| ~ 0.3
        a pixel gives tanh(0.15) = 0.149, 1 % short).
    final_gain : float
        TransConv2D-5 passes ``final_gain`` x the standardised channels 0
        and 1 (rms 1) on: again tanh's linear range (2 % short at 1 sigma).
    gate : float
        tanh value of the Conv2D-2..5 gates: each block multiplies its skip
        tensor by ~``gate`` (bias arctanh(gate)), and batch normalisation
        removes the factor, so the four blocks start as the identity.
    random_scale : float
        Every other weight is Glorot-uniform times this: small enough to
        leave the KS93 map alone (0.1 and 0.02 give the same correlation
        with :func:`truncated_ks93`, 0.99994, in tests/test_model.py's
        network), non-zero so that gradients reach every layer from the
        first step.
    """

    fwhm_arcmin: float = 1.0
    input_gain: float = 0.5
    final_gain: float = 0.2
    gate: float = 0.5
    random_scale: float = 0.1


def ks93_kernels(filter_size, fwhm_arcmin=0.0, pixel_arcmin=PAPER.pixel_arcsec * PAPER.pool / 60.0):
    """The KS93 inversion (eq. 10) as two real-space convolution kernels.

    Parameters
    ----------
    filter_size : int
        Odd side of the kernels in pixels.
    fwhm_arcmin : float
        Gaussian smoothing (FWHM, arcmin) applied to the inversion; 0: none.
    pixel_arcmin : float
        Pixel scale (default: the network's output pixel, 0.192').

    Returns
    -------
    k1, k2 : numpy.ndarray, float64, shape (filter_size, filter_size)
        Cross-correlation kernels (the layout of Keras's Conv2D):
        ``kappa[j] = sum_u k1[u] g1[j + u - h] + k2[u] g2[j + u - h]`` with
        h = filter_size // 2, [row (y), column (x)] axes as everywhere.

    Notes
    -----
    Each kernel is the response of :func:`ks93` to a unit shear at one pixel
    of a field 4x the kernel's side, so it carries exactly the conventions
    and the discrete k-space kernel of eq. 10; far from its centre it is
    D1 = (y^2 - x^2) / (pi r^4), D2 = -2xy / (pi r^4) in pixel units. It is
    cut at the kernel's edge: a truncated inversion, blind to the mass-sheet
    and to structures wider than the kernel (its k = 0 mode is not zero).
    """
    filter_size = int(filter_size)
    if filter_size < 1 or filter_size % 2 == 0:
        raise ValueError(f"filter_size must be a positive odd integer, got {filter_size}")
    if not fwhm_arcmin >= 0 or not pixel_arcmin > 0:
        raise ValueError(f"need fwhm_arcmin >= 0 and pixel_arcmin > 0, got {fwhm_arcmin}, {pixel_arcmin}")
    n = 4 * filter_size + 1
    c, h = n // 2, filter_size // 2
    kernels = []
    for comp in (0, 1):
        g = np.zeros((2, n, n))
        g[comp, c, c] = 1.0
        response = ks93(g[0], g[1])
        if fwhm_arcmin > 0:
            response = scipy.ndimage.gaussian_filter(
                response, fwhm_arcmin / pixel_arcmin / FWHM_PER_SIGMA, mode="constant")
        # response[c + v] = D(v); a cross-correlation reads D(h - u) at u
        kernels.append(response[c - h:c + h + 1, c - h:c + h + 1][::-1, ::-1].copy())
    return tuple(kernels)


def pooled_input(x, config=PAPER):
    """The input's channels on the output grid, as Conv2D-1 + AvgPool see them.

    Parameters
    ----------
    x : array_like, shape (B, subfield_npix, subfield_npix, C)

    Returns
    -------
    numpy.ndarray, shape (B, output_npix, output_npix, C)
        Output pixel k is the mean of input pixels [3k + 1, 3k + 4) on each
        axis (the footprint of :func:`mosaic_truth`).
    """
    x = np.asarray(x)
    p, o = config.pool, config.output_npix
    lo = (config.first_kernel - 1) // 2
    b = x[:, lo:lo + p * o, lo:lo + p * o]
    return b.reshape(b.shape[0], o, p, o, p, -1).mean(axis=(2, 4))


def truncated_ks93(x, filter_size, fwhm_arcmin=0.0, config=PAPER):
    """KS93 of a batch of network inputs with the truncated kernels of
    :func:`ks93_kernels`, on the output grid (zero shear outside the input):
    the map a KS93-initialised network computes.

    Parameters
    ----------
    x : array_like, shape (B, subfield_npix, subfield_npix, ≥2)
    filter_size : int
    fwhm_arcmin : float

    Returns
    -------
    numpy.ndarray, shape (B, output_npix, output_npix, 1)
    """
    g = pooled_input(x, config)
    k1, k2 = ks93_kernels(filter_size, fwhm_arcmin, config.pixel_arcsec * config.pool / 60.0)
    h = filter_size // 2
    out = np.empty(g.shape[:3] + (1,))
    for b in range(len(g)):
        out[b, ..., 0] = sum(
            scipy.signal.correlate(np.pad(g[b, :, :, c], h), k, mode="valid", method="fft")
            for c, k in ((0, k1), (1, k2)))
    return out


def initialize_as_ks93(model, x, start=KS93Start(), seed=0, batch_size=8):
    """Set a Table 1 network's weights so that it computes a smoothed KS93.

    Parameters
    ----------
    model : keras.Model
        From :func:`build_model` with skips (not NoSkip); changed in place.
    x : array_like, shape (B, subfield_npix, subfield_npix, channels)
        Training inputs that calibrate the batch-normalisation statistics
        and the output gain (a few tens of subfields).
    start : KS93Start
    seed : int
        Seed of the small random weights.
    batch_size : int

    Returns
    -------
    numpy.ndarray, shape (2,)
        The output gains of the eps1 and eps2 paths (fitted by least squares
        to :func:`truncated_ks93` of ``x`` over the scored pixels).

    Notes
    -----
    Beyond the paper, which starts from random weights. The architecture is
    untouched; the weights are: Conv2D-1 copies eps1, eps2 (x input_gain)
    into channels 0, 1 (so that with the pool it sees :func:`pooled_input`);
    each block's gate is ~constant, so that Multiply-# scales its skip
    tensor and batch normalisation (moving statistics set from ``x``)
    standardises it again; TransConv2D-5 passes channels 0, 1 on
    through a delta at its centre; the Output layer holds the two kernels of
    :func:`ks93_kernels`. The network then returns eq. 10 truncated to the
    Output layer's 49 x 49 pixels (9.4') and smoothed by ``fwhm_arcmin``;
    training starts from there. Other channels and weights are small random
    numbers, so the gates, the Delta-eps channel and the extra features learn
    from the first step.
    """
    info = model_info(model)
    if not info["skip"]:
        raise ValueError("initialize_as_ks93 needs the Multiply skips (not NoSkip)")
    config = config_from_dict(info["config"])
    x = np.asarray(x, dtype=np.float32)
    want = (config.subfield_npix, config.subfield_npix, info["channels"])
    if x.ndim != 4 or x.shape[1:] != want or len(x) < 2:
        raise ValueError(f"x must be (B >= 2,) + {want} network inputs, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x holds NaN or infinite values")
    rng = np.random.default_rng(seed)
    layer = model.get_layer

    def small_random(shape):  # Glorot-uniform x random_scale
        limit = np.sqrt(6.0 / (shape[0] * shape[1] * (shape[2] + shape[3])))
        return start.random_scale * rng.uniform(-limit, limit, shape)

    def set_conv(name, kernel, bias):
        ly = layer(name)
        ly.kernel.assign(kernel.astype(np.float32))
        ly.bias.assign(np.broadcast_to(bias, ly.bias.shape).astype(np.float32))

    k = small_random(layer("conv2d_1").kernel.shape)  # (h, w, in, out)
    k[:, :, :, :2] = 0.0
    # the centre tap alone: with the 3 x 3 pool it averages exactly the
    # input pixels [3k + 1, 3k + 4) of output pixel k (pooled_input)
    c = k.shape[0] // 2
    k[c, c, 0, 0] = k[c, c, 1, 1] = start.input_gain
    set_conv("conv2d_1", k, 0.0)
    for i in range(1, len(MULTIPLIED_TO) + 1):
        set_conv(f"transconv2d_{i}", small_random(layer(f"transconv2d_{i}").kernel.shape), 0.0)
        set_conv(f"conv2d_{i + 1}", small_random(layer(f"conv2d_{i + 1}").kernel.shape),
                 np.arctanh(start.gate))
    last = f"transconv2d_{len(MULTIPLIED_TO) + 1}"
    k = small_random(layer(last).kernel.shape)  # (h, w, out, in)
    k[:, :, :2, :] = 0.0
    k[:, :, :, :2] = 0.0
    h = k.shape[0] // 2
    k[h, h, 0, 0] = k[h, h, 1, 1] = start.final_gain
    set_conv(last, k, 0.0)
    # batch-normalisation statistics in order: each depends on those before
    for i in range(1, len(MULTIPLIED_TO) + 1):
        bn = layer(f"batchnorm_{i}")
        # float64: a mixed-precision model predicts float16
        t = keras.Model(model.inputs, bn.input).predict(
            x, batch_size=batch_size, verbose=0).astype(np.float64)
        bn.moving_mean.assign(t.mean(axis=(0, 1, 2)).astype(np.float32))
        bn.moving_variance.assign(t.var(axis=(0, 1, 2)).astype(np.float32))
    f = layer("output").kernel.shape[0]
    kernels = ks93_kernels(f, start.fwhm_arcmin, config.pixel_arcsec * config.pool / 60.0)
    shape = layer("output").kernel.shape
    b, o = config.loss_border_pix, config.output_npix
    inner = (slice(None), slice(b, o - b), slice(b, o - b), 0)  # the scored pixels
    parts = []
    for c in (0, 1):
        k = np.zeros(shape)
        k[:, :, c, 0] = kernels[c]
        set_conv("output", k, 0.0)
        parts.append(model.predict(x, batch_size=batch_size, verbose=0)[inner]
                     .ravel().astype(np.float64))
    ref = truncated_ks93(x, f, start.fwhm_arcmin, config)[inner].ravel()
    gains = np.linalg.lstsq(np.stack(parts, axis=1), ref, rcond=None)[0]
    k = np.zeros(shape)
    for c in (0, 1):
        k[:, :, c, 0] = gains[c] * kernels[c]
    set_conv("output", k, 0.0)
    return gains


# ---------------------------------------------------------------------------
# §2.3.2 Saving and loading models
# ---------------------------------------------------------------------------
def save_model(model, path):
    """Write ``model`` to a ``.keras`` file atomically (a temporary file in
    the same folder, then ``os.replace``), so that a crash mid-write never
    leaves a truncated model under ``path``.

    Parameters
    ----------
    model : keras.Model
        Must carry a description (``build_model``).
    path : str or os.PathLike
        Ends in ``.keras``.
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"{path}: model files end in .keras")
    model_info(model)
    fd, tmp = tempfile.mkstemp(suffix=".keras",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        model.save(tmp, overwrite=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_model(path, compile=True):
    """Read a model written by ``save_model``.

    Parameters
    ----------
    path : str or os.PathLike
    compile : bool
        Restore the optimizer and loss too.

    Returns
    -------
    keras.Model
        ``model_info(model)`` tells its variant, channels and filter size.

    Raises
    ------
    ValueError
        If the file holds no wlcnn description or one of another format
        version; checked before Keras rebuilds any layer.
    """
    path = os.fspath(path)
    with zipfile.ZipFile(path) as zf:
        config = json.loads(zf.read("config.json"))
    layers = config.get("config", {}).get("layers", [])
    info = next((layer["config"].get("info") for layer in layers
                 if layer.get("config", {}).get("name") == INFO_LAYER), None)
    if not isinstance(info, dict):
        raise ValueError(f"{path}: not a wlcnn model (no {INFO_LAYER!r} "
                         "description)")
    _check_version(info.get("format_version"), path)
    return keras.saving.load_model(path, compile=compile)


# ---------------------------------------------------------------------------
# §2.3.2 Training: presets
# ---------------------------------------------------------------------------
#: Learning-rate schedules a ``TrainPreset`` may name.
LR_SCHEDULES = ("constant", "cosine")
#: Starting weights a ``TrainPreset`` may name.
INITS = ("glorot", "ks93")


@dataclass(frozen=True)
class TrainPreset:
    """A training schedule.

    Parameters
    ----------
    name : str
    learning_rate : float
        Adam's step size.
    batch_size : int
        Subfields a step (the global batch when several GPUs share it).
    steps_per_epoch : int
        Steps between two validations (and checkpoints).
    epochs : int
    n_runs : int
        Independent runs; their mean and standard deviation are the estimate
        and its error (§2.3.2, §3).
    clipnorm : float or None
        Norm above which Adam clips each gradient tensor (Keras ``clipnorm``).
    n_val : int
        Subfields of the fixed validation set, evaluated after every epoch.
    time_limit_s : float or None
        Wall-clock budget of a run (summed over resumptions): training stops
        after the epoch that would leave less than one more epoch's time.
    lr_schedule : {"constant", "cosine"}
        "constant": ``learning_rate`` throughout (§2.3.2). "cosine": linear
        warm-up, then a half-cosine decay (see ``learning_rate_schedule``).
    warmup_steps : int
        Steps of the linear warm-up ("cosine" only).
    final_lr_fraction : float
        Step size at the last planned step, as a fraction of
        ``learning_rate`` ("cosine" only).
    init : {"glorot", "ks93"}
        Starting weights: "glorot", Keras's default (the paper's), or
        "ks93", the network set to compute KS93 smoothed by
        ``init_fwhm_arcmin`` (:func:`initialize_as_ks93`, beyond the paper).
    init_fwhm_arcmin : float
        Smoothing of the KS93 start ("ks93" only).
    n_init : int
        Training subfields that calibrate the KS93 start ("ks93" only).
    """

    name: str
    learning_rate: float
    batch_size: int
    steps_per_epoch: int
    epochs: int
    n_runs: int
    clipnorm: float | None
    n_val: int
    time_limit_s: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    init: str = "glorot"
    init_fwhm_arcmin: float = KS93Start.fwhm_arcmin
    n_init: int = 32

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, "
                             f"got {self.lr_schedule!r}")
        if not 0 <= self.warmup_steps < self.epochs * self.steps_per_epoch:
            raise ValueError("warmup_steps must be >= 0 and fewer than the "
                             "run's steps")

    def learning_rate_schedule(self):
        """Adam's step size as Keras takes it: a float ("constant"), or a
        ``keras.optimizers.schedules.CosineDecay`` ("cosine") that rises
        linearly from 0 over ``warmup_steps`` to ``learning_rate`` and then
        falls as a half cosine to ``final_lr_fraction * learning_rate`` at
        the run's last planned step.

        The schedule is a function of the optimizer's step count, which
        ``BackupAndRestore`` saves with the weights: a resumed run continues
        on the same curve.
        """
        if self.lr_schedule == "constant":
            return self.learning_rate
        total = self.epochs * self.steps_per_epoch
        return keras.optimizers.schedules.CosineDecay(
            0.0 if self.warmup_steps else self.learning_rate,
            decay_steps=total - self.warmup_steps,
            alpha=self.final_lr_fraction,
            warmup_target=self.learning_rate if self.warmup_steps else None,
            warmup_steps=self.warmup_steps)

    def apply(self, config):
        """``config`` with this schedule's training fields (so a saved
        model's description records the schedule it was trained with)."""
        return dataclasses.replace(
            config, learning_rate=self.learning_rate,
            batch_size=self.batch_size, steps_per_epoch=self.steps_per_epoch,
            epochs=self.epochs, clipnorm=self.clipnorm)


PRESETS = {
    # §2.3.2 as published, from Config: Adam at 1e-5, batches of 50, 20 steps
    # an epoch, 200 epochs (200,000 samples), 10 runs, best validation
    # weights kept. Not in the paper: the gradient clipping of Config
    # (DESIGN "Lessons": eq. 12 without it diverged; at this learning rate it
    # rarely engages) and the validation size, which the paper does not give:
    # 400 subfields of the 1,800 validation clusters (1.8 MB each as float32,
    # 0.7 GB in all; a standard error of the mean loss of 5 % of its spread).
    "paper": TrainPreset(
        "paper", PAPER.learning_rate, PAPER.batch_size, PAPER.steps_per_epoch,
        PAPER.epochs, PAPER.n_runs, PAPER.clipnorm, n_val=400),
    # A 2-core CPU, training <= 30 min: ~13,000 samples at 7-10 samples/s,
    # a fifteenth of the paper's 200,000. From Glorot weights that is too
    # few (the run shipped before, Adam 3e-4: validation loss 0.00127,
    # behind KS93 on all four metrics), so the quick preset starts the
    # network at KS93 smoothed by 1' (initialize_as_ks93, beyond the paper;
    # validation loss 0.0019 at the start) and trains from there at 5e-5
    # (the random-start trials blew up above ~1e-4 and the KS93 start
    # should not be thrown away in the first epoch): validation loss 0.00096
    # after 6,400 samples, 0.00095 at the 30-minute limit (README, Table 2).
    # 100 steps (800 samples) an epoch, 64 validation subfields; the time
    # limit stops the run at 30 min with the best epoch so far. One run: the
    # quick chain has time for one; pass runs=K for an error estimate.
    "quick": TrainPreset(
        "quick", learning_rate=5e-5, batch_size=8, steps_per_epoch=100,
        epochs=25, n_runs=1, clipnorm=1.0, n_val=64, time_limit_s=30 * 60,
        init="ks93", init_fwhm_arcmin=1.0),
}


def get_preset(preset):
    """A ``TrainPreset`` from itself or its name in ``PRESETS``."""
    if isinstance(preset, TrainPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {list(PRESETS)}")
    return PRESETS[preset]


# ---------------------------------------------------------------------------
# Checks of the data
# ---------------------------------------------------------------------------
def check_data(train_ds, val, config, channels, batch_size, steps_needed):
    """Raise ValueError unless the data fit the model and are finite.

    Parameters
    ----------
    train_ds : tf.data.Dataset
        Batches (x (B, S, S, C), y (B, O, O, 1)), float32.
    val : (ndarray, ndarray)
        Validation inputs (N, S, S, C) and targets (N, O, O, 1).
    config : Config
        S = ``subfield_npix``, O = ``output_npix``.
    channels : int
        C of the model.
    batch_size : int
        B expected (a dataset built for another preset is refused).
    steps_needed : int
        Batches one run draws; a finite dataset must hold as many.

    Notes
    -----
    Only the first training batch is looked at (the stream may be endless);
    ``keras.callbacks.TerminateOnNaN`` guards the rest during training.
    """
    S, O = config.subfield_npix, config.output_npix

    def check(x, y, what):
        x, y = np.asarray(x), np.asarray(y)
        for arr, name, shape in [(x, "inputs", (S, S, channels)),
                                 (y, "targets", (O, O, 1))]:
            if arr.ndim != 4 or arr.shape[1:] != shape:
                # name the mismatch a user can act on: channels or grid
                kind = ("channels" if arr.ndim == 4 and arr.shape[1:3]
                        == shape[:2] else "grid")
                raise ValueError(
                    f"{what} {name} have shape {arr.shape}; the model takes "
                    f"(N, {', '.join(map(str, shape))}) ({kind} differ: "
                    f"was the dataset made for another variant or Config?)")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{what} {name} contain NaN or infinite "
                                 "values")
        if len(x) != len(y):
            raise ValueError(f"{what}: {len(x)} inputs but {len(y)} targets")
        return len(x)

    if len(val) != 2:
        raise ValueError("val must be a pair (x_val, y_val)")
    if check(*val, "validation") == 0:
        raise ValueError("the validation set is empty")
    n = int(train_ds.cardinality())
    if 0 <= n < steps_needed:  # negative: infinite or unknown
        raise ValueError(f"the training dataset holds {n} batches, a run "
                         f"needs {steps_needed}: repeat it")
    first = next(iter(train_ds.take(1)), None)
    if first is None:
        raise ValueError("the training dataset yields no batches")
    if not isinstance(first, tuple) or len(first) != 2:
        raise ValueError("training batches must be pairs (x, y)")
    if check(*first, "training") != batch_size:
        raise ValueError(f"training batches hold {len(first[0])} subfields, "
                         f"the preset asks for {batch_size}")


def _fingerprint(val):
    """SHA-256 of the validation set: a resumed run must validate on the
    same subfields, or its best-model choice would mix two yardsticks."""
    h = hashlib.sha256()
    for a in val:
        a = np.ascontiguousarray(a, np.float32)
        h.update(repr(a.shape).encode())
        h.update(a.data)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Files of a run
# ---------------------------------------------------------------------------
def run_path(out_dir, run_index):
    """``out_dir/run_XX``."""
    return Path(out_dir) / f"run_{run_index:02d}"


def _readable(path):
    """Give ``path`` the mode of a newly created file (``mkstemp`` makes
    them private, 0600, and ``os.replace`` keeps that)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _atomic_write_text(path, text):
    """Write ``text`` to ``path`` atomically (:func:`_atomic_write`)."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def read_history(path):
    """Rows of a ``history.csv`` as dicts of floats (``epoch`` an int); []
    if there is none."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):  # Keras writes "NA" for a gap
            return float("nan")
    return [{k: int(v) if k == "epoch" else num(v) for k, v in r.items()}
            for r in rows]


def _trim_history(path, first_epoch):
    """Drop the rows of epochs >= ``first_epoch`` (logged after the last
    backup, then lost with the interruption, and about to be redone)."""
    path = Path(path)
    if not path.exists():
        return
    if first_epoch == 0:  # even the header may be cut short: start afresh
        path.unlink()
        return
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.split(",", 1)[0].isdigit()
                        and int(ln.split(",", 1)[0]) < first_epoch]
    if len(keep) != len(lines):
        _atomic_write_text(path, "".join(keep))


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _settings(config, preset, variant, run_index, seed, conv, mixed):
    """What a run's results depend on; a re-invocation must match it.
    ``n_runs`` is left out so that more runs can be added later."""
    p = dataclasses.asdict(preset)
    p.pop("n_runs")
    return _jsonable(dict(preset=p, variant=variant, run_index=run_index,
                          seed=seed, conv=resolve_conv(conv),
                          mixed_precision=bool(mixed),
                          config=dataclasses.asdict(config)))


def _check_settings(run_dir, settings):
    """The run's ``run.json`` if any, after checking it was started with
    ``settings``."""
    info = _read_json(Path(run_dir) / "run.json")
    if info is not None and {k: info.get(k) for k in settings} != settings:
        diff = sorted(k for k in settings if info.get(k) != settings[k])
        raise ValueError(f"{run_dir} was started with other settings "
                         f"({', '.join(diff)}); use another output directory")
    return info


def _median_finite(values):
    v = [x for x in values if np.isfinite(x)]  # NaN: a one-step epoch
    return float(np.median(v)) if v else None


def _versions():
    mods = ["numpy", "tensorflow", "keras"]
    return dict(python=platform.python_version(),
                wlcnn=getattr(sys.modules.get("wlcnn"), "__version__", None),
                **{m: __import__(m).__version__ for m in mods})


# ---------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------
class _EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_s`` (wall seconds, validation included) and
    ``samples_per_s`` (training steps only) to the epoch logs, for the CSV
    log, and stops training when the run's time budget would be exceeded.
    Placed first, so that the callbacks after it log these keys."""

    def __init__(self, batch_size, time_limit_s=None, prior_s=0.0):
        super().__init__()
        self.batch_size = batch_size
        self.limit, self.spent = time_limit_s, prior_s
        self.time_limited = False

    def on_epoch_begin(self, epoch, logs=None):
        self.t0, self.t_first, self.steps = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch, logs=None):
        # timed from the end of the first step: the first step of a fit
        # traces the training function (seconds), which is no throughput
        t = time.perf_counter()
        if self.t_first is None:
            self.t_first = t
        else:
            self.t_last, self.steps = t, self.steps + 1

    def on_epoch_end(self, epoch, logs=None):
        logs["epoch_s"] = time.perf_counter() - self.t0
        logs["samples_per_s"] = (self.steps * self.batch_size /
                                 (self.t_last - self.t_first)
                                 if self.steps else float("nan"))
        self.spent += logs["epoch_s"]
        # stop unless another epoch as long as this one fits the budget
        if (self.limit is not None
                and self.spent + logs["epoch_s"] > self.limit):
            self.model.stop_training = self.time_limited = True


class _History(keras.callbacks.CSVLogger):
    """``CSVLogger(append=True)`` that, before appending, drops the rows of
    epochs about to be redone.

    The file is opened at the first epoch rather than at ``on_train_begin``:
    by then ``BackupAndRestore`` has restored the model, and the first epoch
    number is the one it restored. Rows past it were logged after the last
    backup (or by an epoch interrupted after logging) and are redone now, so
    the log keeps each epoch exactly once.
    """

    def __init__(self, filename):
        super().__init__(filename, append=True)

    def on_train_begin(self, logs=None):
        self._opened = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._opened:
            _trim_history(self.filename, epoch)
            super().on_train_begin()
            self._opened = True

    def on_train_end(self, logs=None):
        if self._opened:
            super().on_train_end(logs)


class _BestModel(keras.callbacks.Callback):
    """``ModelCheckpoint(save_best_only=True, monitor="val_loss")`` that
    survives interruptions: written atomically, committed with the epoch,
    and continuing across a resume from the best ``val_loss`` logged.

    ``ModelCheckpoint`` writes in place (an interruption mid-write leaves a
    broken file), forgets its best value on resume, and would save Adam's
    moments (3x the size) and a mixed-precision model's float16 layers.
    Here an improved epoch is written (``save_model``: temporary file,
    then ``os.replace``) from a float32 twin without optimizer state to
    ``best.pending-EEEE.keras``; ``commit`` (called after the epoch's backup)
    renames it to ``best.keras``. At the next start a pending file of a
    backed-up epoch is committed, one of an epoch to be redone deleted, so
    ``best.keras`` always belongs to an epoch of ``history.csv``.
    """

    def __init__(self, run_dir, twin):
        super().__init__()
        self.dir, self.twin = Path(run_dir), twin
        self.best = None

    def settle(self, first_epoch):
        """Commit or drop pending files, knowing that the epochs before
        ``first_epoch`` are backed up; take the best ``val_loss`` so far."""
        for p in sorted(self.dir.glob("best.pending-*.keras")):
            if int(p.name[len("best.pending-"):-len(".keras")]) < first_epoch:
                os.replace(p, self.dir / "best.keras")
            else:
                p.unlink()
        self.best = min((r["val_loss"] for r in
                         read_history(self.dir / "history.csv")
                         if r["epoch"] < first_epoch
                         and np.isfinite(r["val_loss"])), default=np.inf)

    def on_epoch_begin(self, epoch, logs=None):
        if self.best is None:  # the first epoch of this fit
            self.settle(epoch)

    def on_epoch_end(self, epoch, logs=None):
        v = logs.get("val_loss")
        if v is not None and np.isfinite(v) and v < self.best:
            self.best = float(v)
            self.twin.set_weights(self.model.get_weights())
            pending = self.dir / f"best.pending-{epoch:04d}.keras"
            save_model(self.twin, pending)
            _readable(pending)

    def commit(self):
        """A callback that commits the pending file at the end of an epoch
        (place it after ``BackupAndRestore``)."""
        def on_epoch_end(epoch, logs=None):
            pending = self.dir / f"best.pending-{epoch:04d}.keras"
            if pending.exists():
                os.replace(pending, self.dir / "best.keras")
        return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------
def _build(config, variant, conv, mixed):
    """The model to train; with ``mixed``, in mixed_float16 except the FFT
    layers (``tf.signal.rfft2d`` has no float16 kernel) and the output layer
    (kappa and the loss stay float32)."""
    model = build_model(config, variant, conv)
    if not mixed:
        return model
    fft = (FFTConv2D, FFTConv2DTranspose)

    def clone(layer):
        cfg = layer.get_config()
        if isinstance(layer, fft) or layer.name == "output":
            cfg["dtype"] = "float32"
        return layer.__class__.from_config(cfg)
    return keras.models.clone_model(model, clone_function=clone)


def default_strategy():
    """``MirroredStrategy`` over all GPUs when there are several, else the
    default (one device)."""
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def train(train_ds, val, out_dir, config=PAPER, preset="paper",
          variant="FocalLoss", run_index=0, seed=0, conv="auto",
          mixed_precision=False, strategy=None, verbose=1, callbacks=()):
    """Train one run (§2.3.2), resuming it if it was interrupted.

    Parameters
    ----------
    train_ds : tf.data.Dataset
        Endless stream of batches (x (B, S, S, C), y (B, O, O, 1)), float32:
        gridded (eps1, eps2, delta eps[, n]) subfields and their kappa at
        output resolution; S = ``config.subfield_npix``, O =
        ``config.output_npix``, B = the preset's ``batch_size``.
    val : (ndarray, ndarray)
        Fixed validation set, x (N, S, S, C) and y (N, O, O, 1). It must be
        the same on every re-invocation of the run.
    out_dir : str or os.PathLike
        The run is written to ``out_dir/run_XX`` (XX = ``run_index``).
    config : Config
        Grid and network fields; the preset's training fields replace its
        own.
    preset : TrainPreset or str
    variant : str
        A key of ``VARIANTS``.
    run_index : int
    seed : int
        Weights are initialised with seed + run_index
        (``keras.utils.set_random_seed``): runs differ, reproducibly.
    conv : {"auto", "fft", "direct"}
    mixed_precision : bool
        Train in mixed_float16 (loss scaling by Keras); the FFT and output
        layers stay float32. Pays off on GPUs with conv="direct".
    strategy : tf.distribute.Strategy, optional
        Default: ``default_strategy()``.
    verbose : int
        Keras's progress bar: 0 silent, 1 a bar, 2 a line an epoch.
    callbacks : sequence of keras.callbacks.Callback
        Extra callbacks, called before the backup of each epoch.

    Returns
    -------
    dict
        The content of ``run.json``: settings, ``epochs_done``,
        ``best_epoch`` (0-based), ``best_val_loss`` (of ``best.keras``
        re-read and re-evaluated), ``samples_per_s`` (median over epochs),
        ``wall_s`` (summed over resumptions), ``stopped`` ("epochs" or
        "time_limit"), versions. A complete run is returned as it is.

    Raises
    ------
    ValueError
        Data that do not fit the model or are not finite, an empty or short
        dataset, or a run directory started with other settings.
    FloatingPointError
        The training loss became NaN or infinite; the run stays resumable
        from its last finished epoch.

    Notes
    -----
    Resume. ``keras.callbacks.BackupAndRestore`` (``run_XX/backup``) saves
    weights, optimizer state and the number of finished epochs at the end of
    every epoch, and at the start of ``fit`` restores them and makes ``fit``
    start at the next epoch. An epoch counts as finished once backed up:
    before the backup the epoch is logged (``history.csv``) and, if its
    validation loss is the lowest, saved as a pending best model; after it,
    the pending model is committed to ``best.keras``. On resume, log rows
    and pending models of epochs after the backup are dropped (their epochs
    are redone), so that the log holds each epoch once and ``best.keras``
    the best epoch of the log. Finished runs are recognised by ``run.json``
    and returned without training. The data stream restarts where the caller
    built it (``train_runs`` seeds it by the epochs already done), so a
    resumed run is not bit-identical to an uninterrupted one.
    """
    preset = get_preset(preset)
    config = preset.apply(config)
    channels = VARIANTS[variant]["channels"] if variant in VARIANTS else None
    if channels is None:
        raise ValueError(f"unknown variant {variant!r}; one of "
                         f"{list(VARIANTS)}")
    run_dir = run_path(out_dir, run_index)
    settings = _settings(config, preset, variant, run_index, seed, conv,
                         mixed_precision)
    info = _check_settings(run_dir, settings)
    if info is not None and info.get("status") == "complete":
        return info
    check_data(train_ds, val, config, channels, preset.batch_size,
               preset.steps_per_epoch * preset.epochs)
    val_sha = _fingerprint(val)
    if info is not None and info.get("val_sha256") != val_sha:
        raise ValueError(f"{run_dir} was validated on another validation "
                         "set; use another output directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(run_dir / "run.json", json.dumps(
        dict(settings, status="running", val_sha256=val_sha), indent=1))

    keras.utils.set_random_seed(seed + run_index)
    strategy = strategy or default_strategy()
    policy = keras.mixed_precision.global_policy()
    try:
        if mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        with strategy.scope():
            model = compile_model(
                _build(config, variant, conv, mixed_precision), config,
                variant, preset.learning_rate_schedule())
    finally:
        keras.mixed_precision.set_global_policy(policy)
    twin = build_model(config, variant, conv)  # float32, what is saved
    if preset.init == "ks93" and not (run_dir / "backup").exists():
        # a fresh run only: on resumption BackupAndRestore loads the weights.
        # take() iterates the dataset anew, so fit still sees these batches.
        n_batches = -(-preset.n_init // preset.batch_size)
        x_init = np.concatenate([x.numpy() for x, _ in train_ds.take(n_batches)])
        gains = initialize_as_ks93(
            model, x_init, KS93Start(fwhm_arcmin=preset.init_fwhm_arcmin),
            seed=seed + run_index, batch_size=preset.batch_size)
        if verbose:
            print(f"{run_dir.name}: KS93 start ({preset.init_fwhm_arcmin}' FWHM), "
                  f"output gains {gains[0]:.3f}, {gains[1]:.3f}")

    history, best = run_dir / "history.csv", run_dir / "best.keras"
    prior = read_history(history)
    checkpoint = _BestModel(run_dir, twin)
    timer = _EpochTimer(preset.batch_size, preset.time_limit_s,
                        sum(r["epoch_s"] for r in prior))
    cbs = [timer,
           # raise at the bad batch: no NaN epoch reaches the backup
           keras.callbacks.TerminateOnNaN(raise_error=True),
           _History(history), checkpoint, *callbacks,
           # An epoch is done once backed up: the log and the best model
           # are written before, the best model committed after. Two
           # generations, as Keras writes in place: a broken latest file
           # falls back to the previous epoch's.
           keras.callbacks.BackupAndRestore(run_dir / "backup",
                                            double_checkpoint=True,
                                            delete_checkpoint=False),
           checkpoint.commit()]
    if verbose and (run_dir / "backup").exists():
        print(f"{run_dir.name}: resuming from its last finished epoch")
    t0 = time.perf_counter()
    try:
        model.fit(train_ds, epochs=preset.epochs,
                  steps_per_epoch=preset.steps_per_epoch,
                  validation_data=tuple(val),
                  validation_batch_size=preset.batch_size, shuffle=False,
                  callbacks=cbs, verbose=verbose)
    except RuntimeError as err:
        if "NaN or Inf loss" not in str(err):
            raise
        raise FloatingPointError(
            f"{run_dir.name}: the training loss became NaN or infinite "
            f"({err}); its last finished epoch stays in {run_dir / 'backup'}"
            ": lower the learning rate or check the data") from err

    rows = read_history(history)
    checkpoint.settle(len(rows))  # a fit that ran no epoch left it pending
    if len(rows) < preset.epochs and not timer.time_limited:
        raise ValueError(f"{run_dir.name}: the training dataset ran out "
                         f"after {len(rows)} epochs; it must be endless")
    if not best.exists():
        raise ValueError(f"{run_dir.name}: no finite validation loss, no "
                         "model saved")
    # The number reported is that of the file, re-read: it also proves
    # that best.keras loads.
    x_val, y_val = val
    pred = load_model(best, compile=False).predict(
        x_val, batch_size=preset.batch_size, verbose=0)
    best_val = float(make_loss(config, variant)(y_val, pred))
    vl = [r["val_loss"] for r in rows]
    info = dict(settings, status="complete", val_sha256=val_sha,
                epochs_done=len(rows), epochs_planned=preset.epochs,
                stopped="time_limit" if timer.time_limited else "epochs",
                best_epoch=int(np.nanargmin(vl)), best_val_loss=best_val,
                samples_per_s=_median_finite([r["samples_per_s"]
                                              for r in rows]),
                wall_s=float(sum(r["epoch_s"] for r in rows)),
                wall_s_this_call=time.perf_counter() - t0,
                replicas=strategy.num_replicas_in_sync,
                devices=[d.name for d in
                         tf.config.list_logical_devices("GPU")] or ["CPU"],
                versions=_versions())
    _atomic_write_text(run_dir / "run.json", json.dumps(info, indent=1))
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    return info


# ---------------------------------------------------------------------------
# Several runs, from a dataset directory, and loading them back
# ---------------------------------------------------------------------------
def data_seed(seed, run_index, epochs_done):
    """Seed of a run's data stream: differs between runs and between
    resumptions (a resumed run draws new subfields rather than replaying
    those of its first epochs)."""
    return int(np.random.SeedSequence(
        [seed, run_index, epochs_done]).generate_state(1)[0])


def train_runs(data_fn, out_dir, config=PAPER, preset="paper",
               variant="FocalLoss", seed=0, runs=None, **kwargs):
    """Train runs 0..K-1 (§2.3.2: "10 independent runs"), skipping complete
    ones and resuming an interrupted one.

    Parameters
    ----------
    data_fn : callable
        ``data_fn(seed) -> (train_ds, (x_val, y_val))`` as ``train`` takes
        them; the validation set must not depend on ``seed``.
    out_dir : str or os.PathLike
    config, preset, variant, seed
        As for ``train``.
    runs : int, optional
        K; default the preset's ``n_runs``.
    **kwargs
        Passed to ``train`` (conv, mixed_precision, strategy, verbose, ...).

    Returns
    -------
    list of dict
        The ``run.json`` of each run.
    """
    preset = get_preset(preset)
    runs = preset.n_runs if runs is None else int(runs)
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    results = []
    for i in range(runs):
        settings = _settings(preset.apply(config), preset, variant, i, seed,
                             kwargs.get("conv", "auto"),
                             kwargs.get("mixed_precision", False))
        info = _check_settings(run_path(out_dir, i), settings)
        if info is not None and info.get("status") == "complete":
            if kwargs.get("verbose", 1):
                print(f"run_{i:02d}: complete, skipped")
            results.append(info)
            continue
        done = len(read_history(run_path(out_dir, i) / "history.csv"))
        # tf.data's random ops draw on the global seed when they are built
        keras.utils.set_random_seed(seed + i)
        train_ds, val = data_fn(data_seed(seed, i, done))
        results.append(train(train_ds, val, out_dir, config, preset, variant,
                             i, seed, **kwargs))
    return results


def train_from_directory(data_dir, out_dir, preset="quick",
                         variant="FocalLoss", runs=None, seed=0, *,
                         config=PAPER, data_fn=None, fresh_catalogs=False, **kwargs):
    """``python -m wlcnn train``: train K runs on a dataset directory.

    Parameters
    ----------
    data_dir : str or os.PathLike
        A dataset with a ``manifest.json`` (keys ``config``: the Config
        fields it was made with, and ``channels`` if it limits them).
    out_dir, preset, variant, runs, seed
        As for ``train_runs``.
    config : Config
        Base configuration; the manifest's fields replace its own.
    data_fn : callable, optional
        ``data_fn(data_dir, config, batch_size, seed, channels=, n_val=)
        -> (train_ds, (x_val, y_val))``; default :func:`training_data`.
    fresh_catalogs : bool
        With the default data: draw a new source catalog at every cluster
        visit (see :func:`cluster_grid`).

    Returns
    -------
    list of dict
        The ``run.json`` of each run.
    """
    preset = get_preset(preset)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of "
                         f"{list(VARIANTS)}")
    manifest = _read_json(Path(data_dir) / "manifest.json")
    if manifest is None:
        raise ValueError(f"{data_dir}: no manifest.json, not a dataset")
    fields = {k: tuple(v) if isinstance(v, list) else v  # JSON made them lists
              for k, v in manifest.get("config", {}).items()}
    try:
        config = dataclasses.replace(config, **fields)
    except TypeError as err:
        raise ValueError(f"{data_dir}: manifest config does not fit this "
                         f"Config ({err})") from None
    channels = VARIANTS[variant]["channels"]
    if manifest.get("channels", channels) < channels:
        raise ValueError(f"{data_dir} holds {manifest['channels']} input "
                         f"channels; variant {variant} needs {channels}")
    if data_fn is None:
        def data_fn(data_dir, config, batch_size, seed, channels, n_val):
            return training_data(data_dir, batch_size, seed, channels=channels, n_val=n_val,
                                 fresh_catalogs=fresh_catalogs, config=config)

    def make(s):
        return data_fn(data_dir, config, preset.batch_size, s,
                       channels=channels, n_val=preset.n_val)
    return train_runs(make, out_dir, config, preset, variant, seed, runs,
                      **kwargs)


def load_runs(path):
    """The trained models of a run directory, for prediction.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.keras`` file; a directory holding ``.keras`` files (e.g. a
        shipped model); or a ``train`` output directory, whose complete runs
        ``run_XX/best.keras`` are loaded.

    Returns
    -------
    list of keras.Model
        In file-name order; ``model_info`` gives each one's description.

    Raises
    ------
    ValueError
        No model found, or a file that is not a wlcnn model of this format
        version (from ``load_model``).
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.keras"))
    if not files:
        runs = sorted(path.glob("run_*"))
        files = [d / "best.keras" for d in runs if (_read_json(
            d / "run.json") or {}).get("status") == "complete"]
        if len(files) < len(runs):
            warnings.warn(f"{path}: {len(runs) - len(files)} unfinished "
                          "run(s) left out")
    if not files:
        raise ValueError(f"{path}: no .keras model and no complete run")
    return [load_model(f, compile=False) for f in files]


# ---------------------------------------------------------------------------
# §3 Mosaics: every subfield's prediction on the full-field output grid
# ---------------------------------------------------------------------------
#: The orientation that undoes each of :data:`ORIENTATIONS`: a rotation is
#: undone by the opposite rotation (90° ↔ 270°), a mirror by itself.
INVERSE_ORIENTATION = {"rot0": "rot0", "rot90": "rot270", "rot180": "rot180", "rot270": "rot90",
                       "flip_x": "flip_x", "flip_y": "flip_y"}

#: Subfields predicted at once unless told otherwise.  On the 2-core CPU the
#: Table 1 model took 0.082 s a subfield one at a time, 0.027 at 8, 0.024 at 16
#: and 0.022 at 32 (examples/bench_inference.py); 16 wastes less on the
#: zero-padded last batch of a 100-subfield mosaic.
MOSAIC_BATCH = 16


def mosaic_offsets(config=PAPER, stride=None):
    """Offset indices m (one axis) of the subfields a mosaic averages.

    Parameters
    ----------
    config : Config
    stride : int, optional
        Step between subfield origins in input pixels, a multiple of
        ``config.offset_step`` (3).  Default: ``offset_step``, the paper's set
        (§2.3.2: all 38 per axis, 1,444 in all); 12 gives 10 per axis (100).

    Returns
    -------
    numpy.ndarray of int
        m = 0, s, 2s, ... < n_offsets with s = stride / offset_step; the
        subfield starts at input pixel o = offset_step · m.
    """
    step = config.offset_step
    stride = step if stride is None else int(stride)
    if stride < step or stride % step:
        raise ValueError(f"stride must be a positive multiple of {step} input pixels, got {stride}")
    return np.arange(0, config.n_offsets, stride // step)


def mosaic_orientations(orientations=6):
    """The orientations a mosaic averages.

    Parameters
    ----------
    orientations : int, str or sequence of str
        1: ``("rot0",)``, the catalog as observed; 6: all of
        :data:`ORIENTATIONS` (the paper, §2.3.2); or names from it.

    Returns
    -------
    tuple of str
    """
    if isinstance(orientations, (int, np.integer)) and not isinstance(orientations, bool):
        if orientations == 1:
            return ("rot0",)
        if orientations == len(ORIENTATIONS):
            return ORIENTATIONS
        raise ValueError(f"orientations must be 1 or {len(ORIENTATIONS)} (or names), got {orientations}")
    names = (orientations,) if isinstance(orientations, str) else tuple(orientations)
    bad = [t for t in names if t not in ORIENTATIONS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"orientations must be distinct names from {ORIENTATIONS}, got {names}")
    return names


def _check_border(border_pix, config):
    border = config.loss_border_pix if border_pix is None else int(border_pix)
    if not 0 <= border < config.output_npix // 2:
        raise ValueError(f"border_pix must be in [0, {config.output_npix // 2}), got {border}")
    return border


def mosaic_coverage(config=PAPER, stride=None, border_pix=None):
    """How many subfields of one orientation predict each mosaic pixel.

    Parameters
    ----------
    config : Config
    stride : int, optional
        As :func:`mosaic_offsets`.
    border_pix : int, optional
        Output pixels left out on each side of every prediction; default
        ``config.loss_border_pix`` (see :func:`predict_mosaic`).

    Returns
    -------
    numpy.ndarray of int, shape (mosaic_npix, mosaic_npix)
        Zero where no subfield reaches.  With the paper's offsets and a
        14-pixel border the covered square is mosaic pixels [14, 151) on each
        axis, 137 pixels = 26.3′ (the paper shows "the central 26.6′", Fig. 2).
    """
    border = _check_border(border_pix, config)
    n = config.mosaic_npix
    line = np.zeros(n, dtype=np.int64)
    for m in mosaic_offsets(config, stride):
        line[m + border:m + config.output_npix - border] += 1
    return np.outer(line, line)


def _predictor(predict_fn, batch_size):
    """A callable (B, n, n, C) -> (B, N, N[, 1]) from a Keras model or a callable.

    A Keras model is run with ``predict_on_batch`` (its compiled predict
    function) on batches zero-padded to ``batch_size``, so that the last,
    shorter batch does not trace the graph a second time.
    """
    if isinstance(predict_fn, keras.Model):
        model = predict_fn

        def run(x):
            b = len(x)
            if b < batch_size:
                x = np.concatenate([x, np.zeros((batch_size - b,) + x.shape[1:], x.dtype)])
            return np.asarray(model.predict_on_batch(x))[:b]
        return run
    if not callable(predict_fn):
        raise TypeError("predict_fn must be a keras.Model or a callable on batches of subfields")
    return predict_fn


def _model_channels(predict_fn, channels):
    if channels is not None:
        return int(channels)
    if isinstance(predict_fn, keras.Model):
        return int(predict_fn.input_shape[-1])
    return 3


def predict_mosaic(predict_fn, grid, config=PAPER, stride=None, orientations=6, channels=None,
                   batch_size=MOSAIC_BATCH, border_pix=None):
    """Average the predictions of every (offset, orientation) subfield on the mosaic grid.

    Parameters
    ----------
    predict_fn : keras.Model or callable
        Maps a batch of subfields, float32 (B, 386, 386, C), to κ (B, 128, 128,
        1) or (B, 128, 128).
    grid : array_like, shape (≥C, npix, npix)
        Gridded catalog (ε̄1, ε̄2, Δε, n) from :func:`grid_catalog`.
    config : Config
    stride : int, optional
        Offset step in input pixels, a multiple of 3 (:func:`mosaic_offsets`).
        Default 3: the paper's 1,444 offsets; 12 gives 100.
    orientations : int, str or sequence of str
        1 (as observed), 6 (the paper's set) or names (:func:`mosaic_orientations`).
    channels : int, optional
        Input channels, 3 or 4 (4Channel).  Default: the model's, else 3.
    batch_size : int
        Subfields per call of ``predict_fn``.
    border_pix : int, optional
        Output pixels left out on each side of every prediction.  Default
        ``config.loss_border_pix`` (14): training never scored them, "the
        convergence estimates near the field boundary can easily be
        influenced by the nonvanishing filter size" (§2.3.2).  0 averages
        every pixel.

    Returns
    -------
    mean : numpy.ndarray, float64, shape (mosaic_npix, mosaic_npix)
        Mean κ over the contributions to each mosaic pixel; NaN where none.
    count : numpy.ndarray, int, shape (mosaic_npix, mosaic_npix)
        Number of contributions (:func:`mosaic_coverage` × orientations).

    Notes
    -----
    §3: "one mosaic convergence image for each cluster by taking average of
    the multiple mass maps".  Output pixel k of the subfield at offset index m
    lands on mosaic pixel m + k (DESIGN.md "Grids"), after the orientation the
    input was given is undone (:data:`INVERSE_ORIENTATION`).  The paper's
    mosaic is 1,444 × 6 = 8,664 predictions; the mean has no less noise than
    one prediction would, since all come from one catalog (§3, footnote 2).
    """
    means, count = _mosaics([predict_fn], grid, config, stride, orientations, channels, batch_size, border_pix)
    return means[0], count


def _mosaics(predict_fns, grid, config, stride, orientations, channels, batch_size, border_pix):
    """Mosaics of several predictors from one pass over the subfields (each crop is cut once)."""
    offsets = mosaic_offsets(config, stride)
    orients = mosaic_orientations(orientations)
    border = _check_border(border_pix, config)
    channels = _model_channels(predict_fns[0], channels)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    grid = np.asarray(grid)
    if grid.ndim != 3 or grid.shape[0] < channels or grid.shape[1:] != (config.npix, config.npix):
        raise ValueError(f"grid must have shape (>={channels}, {config.npix}, {config.npix}), "
                         f"got {grid.shape}")
    runs = [_predictor(fn, batch_size) for fn in predict_fns]
    o, n = config.output_npix, config.mosaic_npix
    keep = slice(border, o - border)
    total = np.zeros((len(runs), n, n))
    count = np.zeros((n, n), dtype=np.int64)
    tasks = [(my, mx, t) for t in orients for my in offsets for mx in offsets]
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start:start + batch_size]
        x = np.stack([subfield(grid, None, my, mx, t, config, channels)[0] for my, mx, t in chunk])
        for r, run in enumerate(runs):
            y = np.asarray(run(x), dtype=np.float64)
            if y.shape[:3] != (len(chunk), o, o) or y.ndim not in (3, 4):
                raise ValueError(f"predict_fn returned shape {y.shape} for {len(chunk)} subfields; "
                                 f"expected ({len(chunk)}, {o}, {o}, 1)")
            for (my, mx, t), pred in zip(chunk, y.reshape(len(chunk), o, o)):
                window = (slice(my + border, my + o - border), slice(mx + border, mx + o - border))
                total[r][window] += orient_map(pred, INVERSE_ORIENTATION[t])[keep, keep]
        for my, mx, _ in chunk:
            count[my + border:my + o - border, mx + border:mx + o - border] += 1
    has = count > 0
    means = np.full(total.shape, np.nan)
    means[:, has] = total[:, has] / count[has]
    return means, count


class MosaicRuns(NamedTuple):
    """Mosaics of K independent training runs (:func:`predict_mosaic_runs`)."""
    mean: np.ndarray   #: (mosaic_npix, mosaic_npix), mean over runs: the estimate
    std: np.ndarray    #: (mosaic_npix, mosaic_npix), sample std over runs (ddof=1): its error
    count: np.ndarray  #: (mosaic_npix, mosaic_npix), contributions per run
    runs: np.ndarray   #: (K, mosaic_npix, mosaic_npix), each run's mosaic


def _mosaic_runs(runs, count):
    """MosaicRuns of K runs' maps (K, n, n): their mean and spread (ddof = 1; 0 for
    one run), NaN where no subfield reached."""
    std = runs.std(axis=0, ddof=1) if len(runs) > 1 else np.where(np.isnan(runs[0]), np.nan, 0.0)
    return MosaicRuns(runs.mean(axis=0), std, count, runs)


def predict_mosaic_runs(models, grid, config=PAPER, **kwargs):
    """Mosaics of K runs, their mean and standard deviation (§2.3.2).

    Parameters
    ----------
    models : sequence of keras.Model or callable
        The K independently trained runs (the paper: 10).
    grid : array_like, shape (≥C, npix, npix)
    config : Config
    **kwargs
        stride, orientations, channels, batch_size, border_pix, as
        :func:`predict_mosaic`.  Each subfield is cut once and given to every
        run.

    Returns
    -------
    MosaicRuns
        ``std`` is the sample standard deviation (ddof = 1); with one run it
        is 0 wherever the mosaic is covered (one run shows no spread).

    Notes
    -----
    §2.3.2: "the standard deviations from the 10 runs are used as error
    estimates"; Fig. 11 shows such a mean and standard deviation.
    """
    models = list(models)
    if not models:
        raise ValueError("no models")
    kw = dict(stride=None, orientations=6, channels=None, batch_size=MOSAIC_BATCH, border_pix=None)
    unknown = set(kwargs) - set(kw)
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}")
    kw.update(kwargs)
    return _mosaic_runs(*_mosaics(models, grid, config, **kw))


# ---------------------------------------------------------------------------
# §3 Baselines on the same gridded catalogs: KS93, Wiener, Seitz & Schneider
# ---------------------------------------------------------------------------
#: FWHMs (arcmin) offered to the validation choice of the KS93 smoothing.
KS93_FWHM_GRID = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


def smooth_map(kappa, fwhm_arcmin, config=PAPER):
    """Gaussian smoothing of an input-resolution map.

    Parameters
    ----------
    kappa : array_like, shape (npix, npix)
    fwhm_arcmin : float
        FWHM of the Gaussian in arcmin; 0 returns the map unchanged.
    config : Config
        ``pixel_arcsec`` converts the FWHM to pixels.

    Returns
    -------
    numpy.ndarray, float64, shape (npix, npix)

    Notes
    -----
    Mirror boundary (``mode="reflect"``): near the field edge the kernel
    averages the map with its own reflection instead of with zeros, so the
    edge is not diluted towards κ = 0.
    """
    if fwhm_arcmin < 0:
        raise ValueError(f"fwhm_arcmin must be >= 0, got {fwhm_arcmin}")
    kappa = np.asarray(kappa, dtype=np.float64)
    if fwhm_arcmin == 0:
        return kappa
    sigma_pix = fwhm_arcmin * 60.0 / config.pixel_arcsec / FWHM_PER_SIGMA
    return scipy.ndimage.gaussian_filter(kappa, sigma_pix, mode="reflect")


def ks93_mosaic(grid, config=PAPER, fwhm_arcmin=0.0):
    """KS93 of the gridded catalog, smoothed and block-averaged onto the mosaic grid.

    Parameters
    ----------
    grid : array_like, shape (≥2, npix, npix)
        Gridded catalog; channels 0 and 1 are ε̄1, ε̄2 (the reduced-shear
        estimate the network sees).
    config : Config
    fwhm_arcmin : float
        Gaussian smoothing FWHM (0: none).  The paper does not give its KS93
        smoothing; choose it on the validation set with
        :func:`choose_ks93_smoothing`.

    Returns
    -------
    numpy.ndarray, float64, shape (mosaic_npix, mosaic_npix)

    Notes
    -----
    Eq. 10 with zero padding (:func:`ks93`), then :func:`smooth_map`, then
    the 3 × 3 block mean of :func:`mosaic_truth`, so that KS93, the truth and
    the CNN share the mosaic's pixels (DESIGN.md "Evaluation").  The k = 0
    mode is zero (mass-sheet degeneracy).
    """
    grid = np.asarray(grid)
    return mosaic_truth(smooth_map(ks93(grid[0], grid[1]), fwhm_arcmin, config), config)


def _wavenumber(shape):
    """|k| in cycles per input pixel on the rfft2 grid of ``shape``."""
    k2 = scipy.fft.fftfreq(shape[0])[:, None]
    k1 = scipy.fft.rfftfreq(shape[1])[None, :]
    return np.sqrt(k1**2 + k2**2)


def _emode_spectrum(g1, g2, shape):
    """Fourier transform of the KS93 E mode of (g1, g2) zero-padded to ``shape`` (eq. 10)."""
    c, s = _ks_kernel(shape)
    return c * scipy.fft.rfft2(g1, s=shape) + s * scipy.fft.rfft2(g2, s=shape)


@dataclass
class WienerFilter:
    """Isotropic Wiener filter W(k) = S(k) / (S(k) + N(k)) of the KS93 E mode.

    Attributes
    ----------
    k : numpy.ndarray, shape (n_bins,)
        Bin centres of |k| in cycles per input pixel.
    signal_power, noise_power : numpy.ndarray, shape (n_bins,)
        Mean |FFT|² of the truth κ and of the E mode of pure noise in each
        annulus, on the padded FFT grid of ``shape`` (same normalisation).
    shape : tuple of int
        The padded FFT grid (that of :func:`ks93` with ``pad=True``).
    n_clusters : int
        Training clusters averaged.
    """
    k: np.ndarray
    signal_power: np.ndarray
    noise_power: np.ndarray
    shape: tuple
    n_clusters: int

    def transfer(self, k):
        """W at wavenumbers ``k`` (cycles per pixel), interpolated in log k.

        W = 0 at k = 0: KS93 cannot recover the mean (mass sheet)."""
        k = np.asarray(k, dtype=np.float64)
        good = (self.signal_power + self.noise_power) > 0
        w = np.where(good, self.signal_power / np.where(good, self.signal_power + self.noise_power, 1.0), 0.0)
        # np.interp holds the end values beyond the first and last bins
        out = np.interp(np.log(np.where(k > 0, k, 1.0)), np.log(self.k), w)
        return np.where(k > 0, out, 0.0)


def _radial_mean(power, kmod, edges):
    """Mean of ``power`` in annuli of |k| ``edges`` (rfft half-plane: every mode and its
    conjugate carry the same power, so the half-plane average equals the full one)."""
    idx = np.digitize(kmod.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < len(edges) - 1)
    sums = np.bincount(idx[ok], power.ravel()[ok], minlength=len(edges) - 1)
    counts = np.bincount(idx[ok], minlength=len(edges) - 1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts


def fit_wiener(train_clusters, config=PAPER, grid_fn=None, n_bins=40, limit=200, seed=0, progress=False):
    """Signal and noise power of the Wiener filter, from training clusters.

    Parameters
    ----------
    train_clusters : iterable of dict
        Cluster records (``ClusterDataset.clusters("train")``): ``kappa`` and
        ``catalog``.
    config : Config
    grid_fn : callable, optional
        ``grid_fn(catalog) -> grid (4, npix, npix)``; default :func:`grid_table`.
    n_bins : int
        Logarithmic |k| bins from the fundamental mode of the padded grid to
        the corner of the Fourier plane.
    limit : int or None
        Clusters used (None: all); each costs a gridding and three padded
        FFTs, about 0.1 s.
    seed : int
        Seed of the random rotations of the noise realisations.
    progress : bool
        Show a progress bar (needs ``limit``).

    Returns
    -------
    WienerFilter

    Notes
    -----
    Beyond the paper.  Signal: the power of the truth κ minus its field mean
    (the sheet KS93 cannot see), zero-padded like :func:`ks93`.  Noise: the
    power of the KS93 E mode of the same catalog with every ellipticity
    rotated by a uniform random angle, which destroys the lensing signal and
    keeps the noise of each source, its weight and the 7″ gridding (standard
    in weak lensing, e.g. Van Waerbeke 2000).  Both are averaged in annuli of
    |k|, so W is isotropic, as the statistics of random cluster fields are.
    """
    grid_fn = (lambda cat: grid_table(cat, config)) if grid_fn is None else grid_fn
    rng = np.random.default_rng(seed)
    shape = _padded_shape((config.npix, config.npix), True)
    kmod = _wavenumber(shape)
    # the last edge a hair beyond the corner mode, so that it falls inside the last bin
    edges = np.geomspace(1.0 / max(shape), kmod.max() * (1 + 1e-9), n_bins + 1)
    s_sum = np.zeros(n_bins)
    n_sum = np.zeros(n_bins)
    bar = _Progress(limit, "wiener spectra") if progress and limit else None
    n = 0
    for cluster in train_clusters:
        if limit is not None and n >= limit:
            break
        kappa = np.asarray(cluster["kappa"], dtype=np.float64)
        s_k, counts = _radial_mean(np.abs(scipy.fft.rfft2(kappa - kappa.mean(), s=shape)) ** 2, kmod, edges)
        cat = cluster["catalog"].copy()
        phase = np.exp(1j * rng.uniform(0, 2 * np.pi, len(cat)))
        e = (np.asarray(cat["e1"]) + 1j * np.asarray(cat["e2"])) * phase
        cat["e1"], cat["e2"] = e.real, e.imag
        g = grid_fn(cat)
        n_k, _ = _radial_mean(np.abs(_emode_spectrum(g[0], g[1], shape)) ** 2, kmod, edges)
        s_sum += np.nan_to_num(s_k)
        n_sum += np.nan_to_num(n_k)
        n += 1
        if bar:
            bar.update()
    if n == 0:
        raise ValueError("no training clusters for the Wiener filter")
    centres = np.sqrt(edges[:-1] * edges[1:])
    filled = counts > 0  # the lowest annuli of a log grid can hold no mode
    return WienerFilter(centres[filled], s_sum[filled] / n, n_sum[filled] / n, shape, n)


def wiener_mosaic(grid, wiener, config=PAPER):
    """Wiener-filtered KS93 of the gridded catalog, on the mosaic grid.

    Parameters
    ----------
    grid : array_like, shape (≥2, npix, npix)
    wiener : WienerFilter
        From :func:`fit_wiener` (same config).
    config : Config

    Returns
    -------
    numpy.ndarray, float64, shape (mosaic_npix, mosaic_npix)

    Notes
    -----
    κ̂_WF(k) = W(|k|) D̂*(k) ε̂(k): the KS93 E mode (eq. 10) multiplied by
    W = S / (S + N) in Fourier space on the same padded grid, then the block
    mean of :func:`mosaic_truth`.  The minimum-variance linear estimate for
    a Gaussian field; it damps the scales where noise dominates rather than
    smoothing every scale alike.
    """
    grid = np.asarray(grid, dtype=np.float64)
    shape = tuple(wiener.shape)
    f = _emode_spectrum(grid[0], grid[1], shape) * wiener.transfer(_wavenumber(shape))
    n = config.npix
    return mosaic_truth(scipy.fft.irfft2(f, s=shape)[:n, :n], config)


#: Convergence criterion and cap of the reduced-shear iteration.
SS95_TOL = 1e-4       # max |Δκ| between iterations (0.1 % of a typical cluster κ)
SS95_MAX_ITER = 30
SS95_MIN_FACTOR = 0.1  # floor of (1 − κ): caps the correction at 10× where κ → 1


def ks93_reduced_iterative(grid, config=PAPER, fwhm_arcmin=0.0, tol=SS95_TOL, max_iter=SS95_MAX_ITER,
                           min_factor=SS95_MIN_FACTOR, return_info=False):
    """Nonlinear KS inversion of the reduced shear (Seitz & Schneider 1995).

    Parameters
    ----------
    grid : array_like, shape (≥2, npix, npix)
        Gridded catalog; ε̄1, ε̄2 estimate the reduced shear g (eq. 2, 7).
    config : Config
    fwhm_arcmin : float
        Gaussian smoothing applied to κ at every step (0: none); the KS93
        choice of :func:`choose_ks93_smoothing` is the natural value.
    tol : float
        Stop when max |κ_{n+1} − κ_n| over the input pixels is below ``tol``.
    max_iter : int
        Cap on the iterations; the last iterate is returned if it is reached.
    min_factor : float
        Floor of the factor (1 − κ), where noise or a strong-lensing core
        drives κ towards or beyond 1.
    return_info : bool
        Also return ``{"n_iter": int, "converged": bool, "last_change": float}``.

    Returns
    -------
    numpy.ndarray, float64, shape (mosaic_npix, mosaic_npix)
        (and the info dict if ``return_info``)

    Notes
    -----
    Eq. 2 gives γ = g (1 − κ).  Starting from κ_0 = KS93(g) (the weak limit
    γ ≈ g), iterate κ_{n+1} = S[KS93(g (1 − κ_n))] with S the smoothing.
    The map contracts with a factor of order κ, so a few steps suffice for
    cluster fields.  KS93 sets the mean of the padded field to zero, so the
    iteration runs on the zero-mean mass sheet; another sheet λ would give a
    different fixed point (the mass-sheet degeneracy, Seitz & Schneider 1995).
    """
    grid = np.asarray(grid, dtype=np.float64)
    g1, g2 = grid[0], grid[1]
    kappa = smooth_map(ks93(g1, g2), fwhm_arcmin, config)
    change, n_iter = np.inf, 0
    while n_iter < max_iter and change >= tol:
        factor = np.maximum(1.0 - kappa, min_factor)
        new = smooth_map(ks93(g1 * factor, g2 * factor), fwhm_arcmin, config)
        change = float(np.max(np.abs(new - kappa)))
        kappa, n_iter = new, n_iter + 1
    out = mosaic_truth(kappa, config)
    if return_info:
        return out, {"n_iter": n_iter, "converged": change < tol, "last_change": change}
    return out


# ---------------------------------------------------------------------------
# §3.2-3.4 The paper's metrics: R, D (eq. 13-16), M_cl and Δ_peak
# ---------------------------------------------------------------------------
METRIC_BINS = 50            # histogram bins of the weights, eq. 16 (§3.2)
CLIP_SIGMA = 3.0            # clipping of eq. 14 (§3.2)
CLIP_MAX_ITER = 100         # cap on the clipping iterations
MASS_RADIUS_PIX = 10        # aperture of M_cl: 10 mosaic pixels = 1.92′ (§3.3)
CENTROID_WINDOW_PIX = 21    # top-hat window of the centroid, 21 × 21 pixels (§3.4)
PERCENTILES = (16.0, 84.0)  # the "1σ" range of the medians (§3.3, §3.4)


class WeightedStat(NamedTuple):
    """A weighted mean and weighted standard deviation (R, D of Table 2)."""
    value: float
    err: float
    n_pixels: int  #: pixels in the final sum
    n_iter: int    #: clipping iterations (0 where there is no clipping)


class PercentileStat(NamedTuple):
    """A median with its 16th/84th percentiles, as value −minus +plus (Table 2)."""
    value: float
    minus: float          #: median − 16th percentile
    plus: float           #: 84th percentile − median
    values: np.ndarray    #: the per-cluster values summarised


def _stack_maps(maps, name):
    a = np.asarray(maps, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a map (ny, nx) or a list of maps (n, ny, nx), got shape {a.shape}")
    return a


def _pairs(truth_maps, pred_maps):
    t = _stack_maps(truth_maps, "truth_maps")
    p = _stack_maps(pred_maps, "pred_maps")
    if t.shape != p.shape:
        raise ValueError(f"truth and prediction maps differ in shape: {t.shape} vs {p.shape}")
    return t, p


def _histogram_weights(values, bins=METRIC_BINS):
    """ω = 1 / f(value): f the ``bins``-bin histogram density of ``values`` (eq. 16)."""
    density, edges = np.histogram(values, bins=bins, density=True)
    idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    return 1.0 / density[idx]  # every occupied bin has density > 0


def _weighted_mean_std(x, w):
    mean = np.sum(w * x) / np.sum(w)
    return mean, np.sqrt(np.sum(w * (x - mean) ** 2) / np.sum(w))


def metric_R(truth_maps, pred_maps, bins=METRIC_BINS, clip_sigma=CLIP_SIGMA, max_iter=CLIP_MAX_ITER):
    """The weighted, clipped mean ratio R of predicted to true κ (eq. 14, 16).

    Parameters
    ----------
    truth_maps, pred_maps : array_like, shape (n, ny, nx) or (ny, nx)
        Truth and prediction on the same mosaic pixels; NaN marks pixels not
        evaluated (they are left out of both).
    bins : int
        Histogram bins of the weights (50, §3.2).
    clip_sigma : float
        Clipping threshold in weighted standard deviations (3, §3.2).
    max_iter : int
        Cap on the clipping iterations.

    Returns
    -------
    WeightedStat
        R and its weighted standard deviation (Table 2: "0.407 ± 0.288").

    Notes
    -----
    ω_p = 1 / f(κ_truth) with f the 50-bin histogram density of κ_truth over
    every evaluated pixel of every map, pooled (eq. 16), so that each range
    of κ_truth counts alike rather than the many pixels near zero.  R is the
    ω-weighted mean of κ_pred/κ_truth (eq. 14), iterated: the pixels within
    ``clip_sigma`` weighted standard deviations of the previous step's
    weighted mean are kept, until the kept set no longer changes (§3.2).
    Pixels with κ_truth = 0 exactly have no ratio and are left out.  1 is
    perfect.
    """
    t, p = _pairs(truth_maps, pred_maps)
    ok = np.isfinite(t) & np.isfinite(p)
    t, p = t[ok], p[ok]
    if t.size == 0:
        raise ValueError("no pixel is evaluated in both maps")
    w = _histogram_weights(t, bins)
    nz = t != 0
    r, w = p[nz] / t[nz], w[nz]
    keep = np.ones(r.size, dtype=bool)
    n_iter = 0
    mean, std = _weighted_mean_std(r, w)
    while n_iter < max_iter:
        # a spread at round-off level has nothing left to clip (and would clip all)
        if std <= 8 * np.finfo(float).eps * max(1.0, abs(mean)):
            break
        new = np.abs(r - mean) <= clip_sigma * std
        n_iter += 1
        if np.array_equal(new, keep):
            break
        keep = new
        mean, std = _weighted_mean_std(r[keep], w[keep])
    return WeightedStat(float(mean), float(std), int(keep.sum()), n_iter)


def normalized_kappa(kappa):
    """κ̃ = (κ − ⟨κ⟩) / Δκ over the finite pixels of one map (eq. 13).

    Parameters
    ----------
    kappa : array_like, shape (ny, nx)
        NaN marks pixels not evaluated (they stay NaN).

    Returns
    -------
    numpy.ndarray, float64, shape (ny, nx)
        ⟨κ⟩ and Δκ are the mean and standard deviation (ddof = 0) within the
        field.  A constant map has no scale: its κ̃ is 0.
    """
    kappa = np.asarray(kappa, dtype=np.float64)
    mean, std = np.nanmean(kappa), np.nanstd(kappa)
    return (kappa - mean) / std if std > 0 else np.where(np.isnan(kappa), np.nan, 0.0)


def metric_D(truth_maps, pred_maps, bins=METRIC_BINS):
    """The weighted mean absolute difference D of normalised κ (eq. 13, 15, 16).

    Parameters
    ----------
    truth_maps, pred_maps : array_like, shape (n, ny, nx) or (ny, nx)
        As :func:`metric_R`.
    bins : int
        Histogram bins of the weights (50, §3.2).

    Returns
    -------
    WeightedStat
        D and its weighted standard deviation (Table 2: "4.36 ± 3.77").

    Notes
    -----
    Each map is normalised by :func:`normalized_kappa` over the pixels
    evaluated in both of its pair (eq. 13); ω̃_p = 1 / f(κ̃_truth) with f
    the 50-bin histogram density of κ̃_truth pooled over all maps (eq. 16);
    D = Σ ω̃ |κ̃_pred − κ̃_truth| / Σ ω̃ (eq. 15), without clipping (§3.2
    clips eq. 14 only).  κ̃ is invariant under κ → aκ + b (a > 0), so D
    ignores the amplitude and the mass sheet: 0 is perfect.
    """
    t, p = _pairs(truth_maps, pred_maps)
    tt, pp = [], []
    for ti, pi in zip(t, p):
        ok = np.isfinite(ti) & np.isfinite(pi)
        if ok.any():
            tt.append(normalized_kappa(ti[ok]))
            pp.append(normalized_kappa(pi[ok]))
    if not tt:
        raise ValueError("no pixel is evaluated in both maps")
    tt, pp = np.concatenate(tt), np.concatenate(pp)
    w = _histogram_weights(tt, bins)
    mean, std = _weighted_mean_std(np.abs(pp - tt), w)
    return WeightedStat(float(mean), float(std), int(tt.size), 0)


def peak_pixel(kappa):
    """(row, col) of the highest finite pixel of a map."""
    kappa = np.asarray(kappa, dtype=np.float64)
    if not np.isfinite(kappa).any():
        raise ValueError("the map has no finite pixel")
    return np.unravel_index(np.nanargmax(kappa), kappa.shape)


def aperture_mass(kappa, centre, radius_pix=MASS_RADIUS_PIX):
    """Sum of κ over the pixels within ``radius_pix`` of ``centre`` (M_cl, §3.3).

    Parameters
    ----------
    kappa : array_like, shape (ny, nx)
        Mosaic map; NaN pixels (not evaluated) add nothing.
    centre : (float, float)
        (row, col) of the aperture centre, in pixels.
    radius_pix : float
        Aperture radius in mosaic pixels (10 = 1.92′, §3.3).

    Returns
    -------
    float
        Σ κ over pixels whose centre is at distance ≤ ``radius_pix``
        (dimensionless; × Σ_c × pixel area gives a projected mass).
    """
    kappa = np.asarray(kappa, dtype=np.float64)
    yy, xx = np.indices(kappa.shape)
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius_pix ** 2
    return float(np.nansum(kappa[inside]))


def _percentile_stat(values, percentiles=PERCENTILES):
    values = np.asarray(values, dtype=np.float64)
    lo, med, hi = np.percentile(values, [percentiles[0], 50.0, percentiles[1]])
    return PercentileStat(float(med), float(med - lo), float(hi - med), values)


def cluster_masses(truth_maps, pred_maps, radius_pix=MASS_RADIUS_PIX):
    """M_cl of truth and prediction for each cluster, both about the truth's peak (§3.3).

    Parameters
    ----------
    truth_maps, pred_maps : array_like, shape (n, ny, nx) or (ny, nx)
    radius_pix : float

    Returns
    -------
    m_truth, m_pred : numpy.ndarray, shape (n,)
        Aperture sums (:func:`aperture_mass`) over the pixels evaluated in
        both maps, centred on the highest pixel of the truth.
    """
    t, p = _pairs(truth_maps, pred_maps)
    m_t, m_p = np.empty(len(t)), np.empty(len(t))
    for i, (ti, pi) in enumerate(zip(t, p)):
        ok = np.isfinite(ti) & np.isfinite(pi)
        ti, pi = np.where(ok, ti, np.nan), np.where(ok, pi, np.nan)
        centre = peak_pixel(ti)
        m_t[i], m_p[i] = aperture_mass(ti, centre, radius_pix), aperture_mass(pi, centre, radius_pix)
    return m_t, m_p


def mass_ratio(truth_maps, pred_maps, radius_pix=MASS_RADIUS_PIX, percentiles=PERCENTILES):
    """Median of M_pred / M_truth with its 16th and 84th percentiles (§3.3).

    Parameters
    ----------
    truth_maps, pred_maps : array_like, shape (n, ny, nx) or (ny, nx)
    radius_pix : float
        Aperture radius in mosaic pixels (10, §3.3).
    percentiles : (float, float)

    Returns
    -------
    PercentileStat
        Table 2: "0.867 +0.327 −0.296"; ``values`` holds each cluster's ratio.
    """
    m_t, m_p = cluster_masses(truth_maps, pred_maps, radius_pix)
    return _percentile_stat(m_p / m_t, percentiles)


def peak_centroid(kappa, window_pix=CENTROID_WINDOW_PIX):
    """Centroid of the highest peak: its pixel, then the first moment around it (§3.4).

    Parameters
    ----------
    kappa : array_like, shape (ny, nx)
        Mosaic map; NaN pixels weigh nothing.
    window_pix : int
        Side of the square top-hat window (21, odd), centred on the highest
        pixel and clipped to the map where the peak is near an edge.

    Returns
    -------
    (float, float)
        (row, col) of the centroid in pixel units of the map.

    Notes
    -----
    §3.4: the pixel with the largest κ, then the first moment of κ in the
    21 × 21 window about it.  Where the window holds negative κ (KS93 noise),
    its minimum is subtracted first ("rescaled ... such that the minimum
    value within the window becomes zero"), so that every weight is ≥ 0 and
    the centroid cannot leave the window.  A window clipped by the map edge
    is no longer centred on the peak, which pulls the centroid inwards.  If
    every weight is zero (a flat window) the peak pixel is returned.
    """
    if window_pix < 1 or window_pix % 2 == 0:
        raise ValueError(f"window_pix must be a positive odd integer, got {window_pix}")
    kappa = np.asarray(kappa, dtype=np.float64)
    i, j = peak_pixel(kappa)
    h = window_pix // 2
    r0, r1 = max(i - h, 0), min(i + h + 1, kappa.shape[0])
    c0, c1 = max(j - h, 0), min(j + h + 1, kappa.shape[1])
    w = kappa[r0:r1, c0:c1]
    lowest = np.nanmin(w)
    if lowest < 0:
        w = w - lowest
    w = np.nan_to_num(w, nan=0.0)
    total = w.sum()
    if total <= 0:
        return float(i), float(j)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    return float((w * yy).sum() / total), float((w * xx).sum() / total)


def centroid_offsets(truth_maps, pred_maps, window_pix=CENTROID_WINDOW_PIX):
    """Δ_peak of each cluster: distance between the predicted and true centroids (§3.4).

    Parameters
    ----------
    truth_maps, pred_maps : array_like, shape (n, ny, nx) or (ny, nx)
    window_pix : int

    Returns
    -------
    numpy.ndarray, shape (n,)
        Distances in mosaic pixels (0.192′ each).  Each map's centroid is
        found over the pixels evaluated in both maps (:func:`peak_centroid`).
    """
    t, p = _pairs(truth_maps, pred_maps)
    out = np.empty(len(t))
    for i, (ti, pi) in enumerate(zip(t, p)):
        ok = np.isfinite(ti) & np.isfinite(pi)
        ct = peak_centroid(np.where(ok, ti, np.nan), window_pix)
        cp = peak_centroid(np.where(ok, pi, np.nan), window_pix)
        out[i] = np.hypot(ct[0] - cp[0], ct[1] - cp[1])
    return out


def centroid_offset(truth_maps, pred_maps, window_pix=CENTROID_WINDOW_PIX, percentiles=PERCENTILES):
    """Median Δ_peak with its 16th and 84th percentiles (§3.4, Table 2).

    Returns
    -------
    PercentileStat
        In mosaic pixels (Table 2: "3.10 +25.64 −2.00"); ``values`` holds
        each cluster's Δ_peak (:func:`centroid_offsets`).
    """
    return _percentile_stat(centroid_offsets(truth_maps, pred_maps, window_pix), percentiles)


def paper_metrics(truth_maps, pred_maps):
    """The four metrics of Table 2 as a row dict (see :data:`TABLE2_COLUMNS`)."""
    t, p = _pairs(truth_maps, pred_maps)
    r, d = metric_R(t, p), metric_D(t, p)
    m, dp = mass_ratio(t, p), centroid_offset(t, p)
    return {"R": r.value, "R_err": r.err, "D": d.value, "D_err": d.err,
            "M_ratio": m.value, "M_minus": m.minus, "M_plus": m.plus,
            "dpeak": dp.value, "dpeak_minus": dp.minus, "dpeak_plus": dp.plus, "n_clusters": len(t)}


# ---------------------------------------------------------------------------
# §3 The KS93 smoothing, chosen on the validation set
# ---------------------------------------------------------------------------
#: How each metric is turned into a loss (0 is perfect) by the "rank_sum"
#: criterion: R and M_cl are ratios whose ideal is 1, so their distance from
#: 1 counts in log (×2 and ×½ are equally wrong); D and Δ_peak are 0 at best.
SMOOTHING_LOSSES = {
    "R": lambda row: abs(np.log(row["R"])) if row["R"] > 0 else np.inf,
    "D": lambda row: row["D"],
    "M_ratio": lambda row: abs(np.log(row["M_ratio"])) if row["M_ratio"] > 0 else np.inf,
    "dpeak": lambda row: row["dpeak"],
}


def _rank(values):
    """Ranks 1..n (ties share the mean rank)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        ranks[values == v] = ranks[values == v].mean()
    return ranks


def choose_ks93_smoothing(val_clusters, grid_fn=None, fwhm_grid=KS93_FWHM_GRID, criterion="rank_sum",
                          config=PAPER, mask=None, limit=None, progress=False):
    """Choose the KS93 smoothing FWHM on the validation set by the paper's metrics.

    Parameters
    ----------
    val_clusters : iterable of dict
        Cluster records (``ClusterDataset.clusters("val")``).
    grid_fn : callable, optional
        ``grid_fn(cluster) -> grid``; default: :func:`grid_table` of the
        stored catalog.
    fwhm_grid : sequence of float
        Candidate FWHMs in arcmin (0 = unsmoothed).
    criterion : {"rank_sum", "R", "D", "M_ratio", "dpeak"}
        "rank_sum" (default): rank the candidates on each of the four metrics
        of Table 2 (:data:`SMOOTHING_LOSSES`) and take the smallest sum of
        ranks; ties go to the smaller D.  A metric name: minimise that
        metric's loss alone.
    config : Config
    mask : array_like of bool, shape (mosaic_npix, mosaic_npix), optional
        Mosaic pixels evaluated; default the paper mosaic's coverage
        (:func:`mosaic_coverage` > 0), the pixels the CNN is scored on.
    limit : int, optional
        Use the first ``limit`` clusters.  Memory: 8 bytes × 166² × (1 +
        len(fwhm_grid)) a cluster (2.2 MB for the default grid).
    progress : bool

    Returns
    -------
    fwhm : float
        The chosen FWHM in arcmin.
    rows : list of dict
        One per candidate: ``fwhm_arcmin``, the Table 2 columns, the rank of
        each metric, ``rank_sum`` and ``chosen``.

    Notes
    -----
    Why not pixel correlation: it rewards the removal of noise and never
    penalises the loss of the peak, so it picks the widest kernel offered
    (DESIGN.md "Lessons").  The paper's four metrics pull apart instead:
    smoothing flattens the cluster (R and M_cl fall away from 1) and removes
    noise peaks (Δ_peak and D improve, until D, whose weights stress the rare
    high-κ̃ pixels, sees the peak flattened too).  Ranks put the four on one
    footing without choosing relative units for a ratio, a normalised
    difference and a distance in pixels; the smallest sum of ranks (a Borda
    count) is the candidate best overall.  Were R and M_cl best unsmoothed
    and D and Δ_peak best at the widest kernel, every candidate would tie and
    D alone would decide.  On 100 simulated validation clusters R was best at
    0.5′, M_cl unsmoothed, D at 1.0′ and Δ_peak at 0.75′; 0.5′ and 0.75′
    tied on ranks and D chose 0.75′.
    """
    if criterion != "rank_sum" and criterion not in SMOOTHING_LOSSES:
        raise ValueError(f"criterion must be 'rank_sum' or one of {list(SMOOTHING_LOSSES)}, "
                         f"got {criterion!r}")
    fwhm_grid = [float(f) for f in fwhm_grid]
    if not fwhm_grid:
        raise ValueError("empty fwhm_grid")
    grid_fn = (lambda c: grid_table(c["catalog"], config)) if grid_fn is None else grid_fn
    mask = (mosaic_coverage(config) > 0) if mask is None else np.asarray(mask, dtype=bool)
    truths, maps = [], {f: [] for f in fwhm_grid}
    bar = _Progress(limit, "ks93 smoothing") if progress and limit else None
    for cluster in val_clusters:
        if limit is not None and len(truths) >= limit:
            break
        grid = np.asarray(grid_fn(cluster))
        kappa_e = ks93(grid[0], grid[1])  # once; only the smoothing changes
        truths.append(np.where(mask, mosaic_truth(np.asarray(cluster["kappa"], np.float64), config), np.nan))
        for f in fwhm_grid:
            maps[f].append(np.where(mask, mosaic_truth(smooth_map(kappa_e, f, config), config), np.nan))
        if bar:
            bar.update()
    if not truths:
        raise ValueError("no validation clusters")
    rows = [{"fwhm_arcmin": f, **paper_metrics(truths, maps[f])} for f in fwhm_grid]
    losses = {name: [fn(row) for row in rows] for name, fn in SMOOTHING_LOSSES.items()}
    for name, values in losses.items():
        for row, rank in zip(rows, _rank(values)):
            row[f"rank_{name}"] = float(rank)
    for row in rows:
        row["rank_sum"] = sum(row[f"rank_{name}"] for name in SMOOTHING_LOSSES)
    if criterion == "rank_sum":
        key = [(row["rank_sum"], row["D"]) for row in rows]
    else:
        key = [(v, 0.0) for v in losses[criterion]]
    best = min(range(len(rows)), key=lambda i: key[i])
    for i, row in enumerate(rows):
        row["chosen"] = i == best
    return fwhm_grid[best], rows


# ---------------------------------------------------------------------------
# §3 Evaluating methods on a test set; Table 2
# ---------------------------------------------------------------------------
#: Columns of table2.csv, in order (issue "Evaluation").
TABLE2_COLUMNS = ("method", "R", "R_err", "D", "D_err", "M_ratio", "M_minus", "M_plus",
                  "dpeak", "dpeak_minus", "dpeak_plus", "n_clusters")


def _paper_row(r, r_err, d, d_err, m, m_plus, m_minus, dp, dp_plus, dp_minus):
    return {"R": r, "R_err": r_err, "D": d, "D_err": d_err, "M_ratio": m, "M_minus": m_minus,
            "M_plus": m_plus, "dpeak": dp, "dpeak_minus": dp_minus, "dpeak_plus": dp_plus, "n_clusters": 200}


#: Table 2 of the paper (200 test clusters of MassiveNuS; ours differ in truth).
PAPER_TABLE2 = {
    "KS93": _paper_row(0.253, 0.131, 6.26, 4.57, 0.484, 0.218, 0.149, 22.26, 44.94, 20.55),
    "CNN": _paper_row(0.407, 0.288, 4.36, 3.77, 0.867, 0.327, 0.296, 3.10, 25.64, 2.00),
    "CNN-BS": _paper_row(0.276, 0.179, 3.66, 3.22, 0.554, 0.257, 0.211, 7.95, 21.94, 5.94),
}
#: Table 3 (Appendix A): the variants without masks.
PAPER_TABLE3 = {
    "KS93": PAPER_TABLE2["KS93"],
    "Fiducial": _paper_row(0.363, 0.267, 4.59, 4.12, 0.762, 0.305, 0.266, 2.88, 21.82, 1.90),
    "4Channel": _paper_row(0.360, 0.272, 4.62, 4.50, 0.789, 0.289, 0.263, 3.05, 19.08, 1.92),
    "19Filter": _paper_row(0.329, 0.261, 4.09, 4.32, 0.720, 0.314, 0.238, 3.81, 6.22, 2.07),
    "29Filter": _paper_row(0.359, 0.278, 4.32, 4.16, 0.754, 0.305, 0.245, 3.49, 38.08, 2.31),
    "FocalLoss": PAPER_TABLE2["CNN"],
    "NoSkip": _paper_row(-0.361, 0.221, 5.04, 3.79, -1.329, 0.457, 0.842, 3.81, 6.22, 2.07),
}
#: Table 4 (Appendix A): the variants with bright-star masks (§3.5).
PAPER_TABLE4 = {
    "Fiducial-BS": _paper_row(0.216, 0.140, 4.22, 3.50, 0.448, 0.217, 0.182, 13.56, 21.28, 11.05),
    "4Channel-BS": _paper_row(0.180, 0.117, 4.93, 3.93, 0.400, 0.178, 0.135, 21.85, 23.34, 19.12),
    "19Filter-BS": _paper_row(0.193, 0.142, 4.91, 3.90, 0.386, 0.191, 0.149, 31.51, 26.00, 28.56),
    "29Filter-BS": _paper_row(0.209, 0.144, 4.29, 3.55, 0.421, 0.188, 0.193, 13.30, 31.72, 10.97),
    "FocalLoss-BS": PAPER_TABLE2["CNN-BS"],
}


@dataclass
class Evaluation:
    """Truth and every method's mosaics for a set of clusters (:func:`evaluate_methods`).

    Attributes
    ----------
    truth : numpy.ndarray, shape (n, mosaic_npix, mosaic_npix)
        :func:`mosaic_truth` of each cluster; NaN outside the evaluated pixels.
    maps : dict of str -> numpy.ndarray, shape (n, mosaic_npix, mosaic_npix)
        Each method's mosaic (the mean over runs where it has several), NaN
        on the same pixels as ``truth``.
    run_std : dict of str -> numpy.ndarray, shape (n, mosaic_npix, mosaic_npix)
        Standard deviation over runs, for methods that returned runs.
    run_mass_std : dict of str -> numpy.ndarray, shape (n,)
        Standard deviation over runs of M_cl (Fig. 6's error bars).
    star_mask : numpy.ndarray of bool, shape (n, mosaic_npix, mosaic_npix)
        Mosaic pixels whose centre lies in a bright-star mask (§3.5).
    index : numpy.ndarray of int, shape (n,)
        The clusters' indices in their split.
    config : Config
    """
    truth: np.ndarray
    maps: dict
    run_std: dict
    run_mass_std: dict
    star_mask: np.ndarray
    index: np.ndarray
    config: object = PAPER

    @property
    def methods(self):
        """Method names, in the order they were given."""
        return list(self.maps)


def star_mask_mosaic(masks, config=PAPER):
    """Mosaic pixels whose centre lies inside any bright-star mask.

    Parameters
    ----------
    masks : table-like with columns x, y, radius (arcsec, field frame)
    config : Config

    Returns
    -------
    numpy.ndarray of bool, shape (mosaic_npix, mosaic_npix)
        Mosaic pixel J is centred on input pixel 3J + 2, i.e. at
        (3J + 2.5) × 3.84″ from the field's lower-left corner.
    """
    n = config.mosaic_npix
    out = np.zeros((n, n), dtype=bool)
    if masks is None or len(masks) == 0:
        return out
    lo = (config.first_kernel - 1) // 2
    centres = (lo + config.pool * np.arange(n) + config.pool / 2.0) * config.pixel_arcsec
    for x, y, r in zip(masks["x"], masks["y"], masks["radius"]):
        out |= (centres[:, None] - y) ** 2 + (centres[None, :] - x) ** 2 <= r**2
    return out


def evaluate_methods(clusters, methods, config=PAPER, grid_fn=None, total=None, progress=True):
    """Truth and every method's mosaic for each cluster, on common pixels.

    Parameters
    ----------
    clusters : iterable of dict
        Cluster records (``ClusterDataset.clusters("test")``); read once,
        one at a time.
    methods : dict of str -> callable
        ``fn(grid) -> map`` with ``grid`` the gridded catalog (4, npix, npix)
        and ``map`` a mosaic (mosaic_npix, mosaic_npix), NaN where it has no
        estimate, or (K, mosaic_npix, mosaic_npix) for K runs (see
        :func:`cnn_method`).  The keys name the rows of Table 2 ("KS93",
        "CNN", ...).
    config : Config
    grid_fn : callable, optional
        ``grid_fn(cluster) -> grid``; default :func:`grid_table` of the
        stored catalog, gridded once and given to every method.
    total : int, optional
        Number of clusters, for the progress bar (default ``len(clusters)``
        where it has one).
    progress : bool

    Returns
    -------
    Evaluation

    Notes
    -----
    "Over the same pixels" (DESIGN.md "Evaluation"): a pixel is evaluated
    for every method if every method and the truth have a finite value
    there; elsewhere every map is NaN.  The CNN's mosaic fixes the region
    (:func:`mosaic_coverage`); KS93 and the other baselines are cut to it.
    """
    if not methods:
        raise ValueError("no methods to evaluate")
    grid_fn = (lambda c: grid_table(c["catalog"], config)) if grid_fn is None else grid_fn
    if total is None and hasattr(clusters, "__len__"):
        total = len(clusters)
    bar = _Progress(total, "evaluate") if progress and total else None
    n = config.mosaic_npix
    truths, index, stars = [], [], []
    maps = {name: [] for name in methods}
    stds = {name: [] for name in methods}
    mass_std = {name: [] for name in methods}
    for cluster in clusters:
        grid = grid_fn(cluster)
        truth = mosaic_truth(np.asarray(cluster["kappa"], dtype=np.float64), config)
        outs = {}
        for name, fn in methods.items():
            out = np.asarray(fn(grid), dtype=np.float64)
            if out.shape[-2:] != (n, n) or out.ndim not in (2, 3):
                raise ValueError(f"method {name!r} returned shape {out.shape}; "
                                 f"expected ({n}, {n}) or (K, {n}, {n})")
            outs[name] = out
        ok = np.isfinite(truth)
        for out in outs.values():
            ok &= np.all(np.isfinite(out), axis=0) if out.ndim == 3 else np.isfinite(out)
        if not ok.any():
            raise ValueError(f"cluster {cluster.get('index')}: no pixel is evaluated by every method")
        truth = np.where(ok, truth, np.nan)
        centre = peak_pixel(truth)
        for name, out in outs.items():
            if out.ndim == 3:
                maps[name].append(np.where(ok, out.mean(axis=0), np.nan))
                spread = out.std(axis=0, ddof=1) if len(out) > 1 else np.zeros((n, n))
                stds[name].append(np.where(ok, spread, np.nan))
                masses = [aperture_mass(np.where(ok, run, np.nan), centre) for run in out]
                mass_std[name].append(np.std(masses, ddof=1) if len(out) > 1 else 0.0)
            else:
                maps[name].append(np.where(ok, out, np.nan))
                stds[name].append(None)
                mass_std[name].append(None)
        truths.append(truth)
        index.append(int(cluster.get("index", len(index))))
        masks = cluster.get("masks")
        stars.append(star_mask_mosaic(masks, config))
        if bar:
            bar.update()
    if not truths:
        raise ValueError("no clusters to evaluate")
    has_runs = {name: all(s is not None for s in stds[name]) for name in methods}
    return Evaluation(
        truth=np.stack(truths),
        maps={name: np.stack(v) for name, v in maps.items()},
        run_std={name: np.stack(stds[name]) for name in methods if has_runs[name]},
        run_mass_std={name: np.asarray(mass_std[name]) for name in methods if has_runs[name]},
        star_mask=np.stack(stars), index=np.asarray(index), config=config)


def cnn_method(models, config=PAPER, **kwargs):
    """A method for :func:`evaluate_methods`: the mosaics of K runs (:func:`predict_mosaic_runs`).

    Parameters
    ----------
    models : sequence of keras.Model or callable
    config : Config
    **kwargs
        stride, orientations, batch_size, border_pix (:func:`predict_mosaic`).
    """
    models = list(models)
    return lambda grid: predict_mosaic_runs(models, grid, config, **kwargs).runs


def baseline_methods(config=PAPER, ks93_fwhm_arcmin=0.0, wiener=None, ss95=True):
    """The baselines as methods for :func:`evaluate_methods`.

    Parameters
    ----------
    config : Config
    ks93_fwhm_arcmin : float
        KS93 smoothing (from :func:`choose_ks93_smoothing`); SS95 uses it too.
    wiener : WienerFilter, optional
        Adds "Wiener" (:func:`wiener_mosaic`).
    ss95 : bool
        Adds "KS93-SS95" (:func:`ks93_reduced_iterative`).

    Returns
    -------
    dict of str -> callable
    """
    methods = {"KS93": lambda grid: ks93_mosaic(grid, config, ks93_fwhm_arcmin)}
    if wiener is not None:
        methods["Wiener"] = lambda grid: wiener_mosaic(grid, wiener, config)
    if ss95:
        methods["KS93-SS95"] = lambda grid: ks93_reduced_iterative(grid, config, ks93_fwhm_arcmin)
    return methods


def table2(results, methods=None):
    """Table 2: the four metrics of each method over the evaluated clusters.

    Parameters
    ----------
    results : Evaluation
    methods : sequence of str, optional
        Rows, in order; default every method of ``results``.

    Returns
    -------
    list of dict
        One per method, with exactly the keys :data:`TABLE2_COLUMNS`: R and
        R_err (eq. 14), D and D_err (eq. 15), M_ratio with M_minus/M_plus
        (median − 16th, 84th − median percentile, §3.3), dpeak with
        dpeak_minus/dpeak_plus (mosaic pixels, §3.4), n_clusters.
    """
    methods = results.methods if methods is None else list(methods)
    return [{"method": name, **paper_metrics(results.truth, results.maps[name])} for name in methods]


def _fmt(v, digits=3):
    return f"{v:.{digits}f}".replace("-", "−")


def _markdown_cells(row):
    return (f"{_fmt(row['R'])} ± {_fmt(row['R_err'])}", f"{_fmt(row['D'], 2)} ± {_fmt(row['D_err'], 2)}",
            f"{_fmt(row['M_ratio'])} (+{_fmt(row['M_plus'])}/−{_fmt(row['M_minus'])})",
            f"{_fmt(row['dpeak'], 2)} (+{_fmt(row['dpeak_plus'], 2)}/−{_fmt(row['dpeak_minus'], 2)})",
            str(int(row["n_clusters"])))


def table_markdown(rows, paper=PAPER_TABLE2, title=None):
    """Markdown of Table 2 rows, the paper's rows below them for reference.

    Parameters
    ----------
    rows : list of dict
        From :func:`table2`.
    paper : dict of str -> dict, optional
        The paper's rows (:data:`PAPER_TABLE2`, 3 or 4), marked "(paper)".
    title : str, optional

    Returns
    -------
    str
    """
    head = ("Method", "R (eq. 14)", "D (eq. 15)", "M_pred/M_truth", "Δ_peak [pixel]", "N")
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join((row["method"],) + _markdown_cells(row)) + " |" for row in rows]
    for name, row in (paper or {}).items():
        lines.append("| " + " | ".join((f"{name} (paper)",) + _markdown_cells(row)) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows, out_dir, name="table2", paper=PAPER_TABLE2, title=None):
    """Write Table 2 rows as ``{name}.csv`` and ``{name}.md`` in ``out_dir``.

    Parameters
    ----------
    rows : list of dict
        From :func:`table2`.
    out_dir : path
        Existing directory.
    name : str
        File stem ("table2", "table3", "table4").
    paper : dict, optional
        The paper's rows, added to the Markdown only (the CSV holds this run's
        methods alone, one row each, with exactly :data:`TABLE2_COLUMNS`).
    title : str, optional
        Heading line of the Markdown.

    Returns
    -------
    (str, str)
        Paths of the CSV and Markdown files.
    """
    csv_path = os.path.join(out_dir, f"{name}.csv")
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TABLE2_COLUMNS)
        for row in rows:
            writer.writerow([row["method"]] + [int(row[c]) if c == "n_clusters" else f"{row[c]:.6g}"
                                               for c in TABLE2_COLUMNS[1:]])
    with open(md_path, "w") as fh:
        fh.write(table_markdown(rows, paper, title))
    return csv_path, md_path


# ---------------------------------------------------------------------------
# §3 Figures 2-8 (matplotlib, object-oriented: no pyplot state, no display)
# ---------------------------------------------------------------------------
MAP_CMAP = "magma"
METHOD_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6")
CONTOUR_LEVELS = (0.683, 0.954, 0.997)  # "1σ, 2σ and 3σ" of the joint distributions (Fig. 4)
N_MEDIAN_BINS = 5                       # equal-count bins of the binned medians (Figs. 4-6)
KAPPA_TILDE_RANGE = (-2.0, 6.0)         # colour scale of κ̃ maps: a few σ below, the peaks above
HIST_BINS = 80                          # bins of the Fig. 3 histograms
JOINT_BINS = 120                        # bins per axis of the Fig. 4-5 joint histograms
PLOT_RANGE_PERCENTILES = (0.05, 99.95)  # axis ranges: all but the most extreme pixels


def _figure(ncols, nrows=1, size=3.6):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size * ncols, size * nrows * 0.95), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes


def _save(fig, path):
    fig.savefig(path, dpi=110)
    return path


def _bbox(finite):
    rows, cols = np.flatnonzero(finite.any(axis=1)), np.flatnonzero(finite.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def default_example(results):
    """The cluster Fig. 2 shows: M_truth nearest the median (typical, not the best case)."""
    m_t, _ = cluster_masses(results.truth, results.truth)
    return int(np.argmin(np.abs(m_t - np.median(m_t))))


def figure_maps(results, path, example=None, methods=None):
    """Fig. 2 (and Fig. 12 with the variants as methods): truth and reconstructions.

    Parameters
    ----------
    results : Evaluation
    path : path of the PNG
    example : int, optional
        Position of the cluster in ``results``; default :func:`default_example`.
    methods : sequence of str, optional
        Columns after the truth; default every method.

    Notes
    -----
    Top row κ on the truth's colour scale (so lost amplitude shows), bottom
    row κ̃ (eq. 13) on a common scale; × marks each map's highest pixel.
    Shown over the evaluated pixels, axes in arcmin from the field centre.
    """
    i = default_example(results) if example is None else int(example)
    methods = results.methods if methods is None else list(methods)
    cfg = results.config
    panels = [("Truth", results.truth[i])] + [(m, results.maps[m][i]) for m in methods]
    rows, cols = _bbox(np.isfinite(results.truth[i]))
    pix_arcmin = cfg.pixel_arcsec * cfg.pool / 60.0
    half = cfg.mosaic_npix / 2.0
    extent = [(cols.start - half) * pix_arcmin, (cols.stop - half) * pix_arcmin,
              (rows.start - half) * pix_arcmin, (rows.stop - half) * pix_arcmin]
    fig, axes = _figure(len(panels), 2)
    vmin, vmax = np.nanmin(results.truth[i]), np.nanmax(results.truth[i])
    for col, (name, kappa) in enumerate(panels):
        for row, (a, lim, label) in enumerate(((kappa, (vmin, vmax), "κ"),
                                               (normalized_kappa(kappa), KAPPA_TILDE_RANGE, "κ̃"))):
            ax = axes[row, col]
            im = ax.imshow(a[rows, cols], origin="lower", extent=extent, cmap=MAP_CMAP,
                           vmin=lim[0], vmax=lim[1])
            py, px = peak_pixel(a)
            ax.plot((px + 0.5 - half) * pix_arcmin, (py + 0.5 - half) * pix_arcmin, "x", color="cyan",
                    ms=10, mew=2)
            ax.set_title(f"{name}: {label}")
            ax.set_xlabel("x [arcmin]")
            if col == 0:
                ax.set_ylabel("y [arcmin]")
            if col == len(panels) - 1:
                fig.colorbar(im, ax=axes[row, :], shrink=0.8, label=label)
    return _save(fig, path)


def _pooled(results, name, normalised):
    t = results.truth
    p = results.maps[name] if name else results.truth
    out = []
    for ti, pi in zip(t, p):
        ok = np.isfinite(ti) & np.isfinite(pi)
        out.append(normalized_kappa(pi[ok]) if normalised else pi[ok])
    return np.concatenate(out)


def figure_distributions(results, path, methods=None):
    """Fig. 3: the distribution of κ (left) and κ̃ (right) over all evaluated pixels.

    Notes
    -----
    Histogram densities on a log scale, truth in black.  The paper's shaded
    run-to-run spread is not drawn: the mosaics kept are the runs' means.
    """
    methods = results.methods if methods is None else list(methods)
    fig, axes = _figure(2)
    for ax, normalised, label in ((axes[0, 0], False, "κ"), (axes[0, 1], True, "κ̃")):
        data = [("Truth", _pooled(results, None, normalised), "k")]
        data += [(m, _pooled(results, m, normalised), METHOD_COLORS[j % len(METHOD_COLORS)])
                 for j, m in enumerate(methods)]
        lo = min(np.percentile(d, PLOT_RANGE_PERCENTILES[0]) for _, d, _ in data)
        hi = max(np.percentile(d, PLOT_RANGE_PERCENTILES[1]) for _, d, _ in data)
        bins = np.linspace(lo, hi, HIST_BINS)
        for name, d, color in data:
            ax.hist(d, bins=bins, density=True, histtype="step", color=color, lw=1.5, label=name)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("probability density")
        ax.legend(fontsize=8)
    return _save(fig, path)


def _contour_levels(h, fractions=CONTOUR_LEVELS):
    """Density thresholds enclosing ``fractions`` of the counts of histogram ``h``."""
    flat = np.sort(h.ravel())[::-1]
    cum = np.cumsum(flat) / flat.sum()
    levels = [flat[min(np.searchsorted(cum, f), flat.size - 1)] for f in fractions]
    return np.unique(levels)  # increasing, as contour() wants


def _binned_medians(x, y, n_bins=N_MEDIAN_BINS):
    """Medians and 16/84 percentiles of x and y in ``n_bins`` equal-count bins of x."""
    order = np.argsort(x)
    out = []
    for chunk in np.array_split(order, n_bins):
        if chunk.size:
            px = np.percentile(x[chunk], [16, 50, 84])
            py = np.percentile(y[chunk], [16, 50, 84])
            out.append((px, py))
    return out


def _joint_panel(ax, t, p, label, r_stat=None):
    lo, hi = np.percentile(np.concatenate([t, p]), PLOT_RANGE_PERCENTILES)
    bins = np.linspace(lo, hi, JOINT_BINS)
    h, xe, ye = np.histogram2d(t, p, bins=[bins, bins])
    xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
    h = scipy.ndimage.gaussian_filter(h, 1.0)  # a 1-bin blur so the contours are not pixel noise
    ax.contour(xc, yc, h.T, levels=_contour_levels(h), colors="k", linewidths=1)
    for px, py in _binned_medians(t, p):
        ax.errorbar(px[1], py[1], xerr=[[px[1] - px[0]], [px[2] - px[1]]],
                    yerr=[[py[1] - py[0]], [py[2] - py[1]]], fmt="o", color="C1", ms=6, capsize=2)
    xs = np.array([lo, hi])
    ax.plot(xs, xs, ":", color="0.5", lw=1)
    if r_stat is not None:
        ax.plot(xs, r_stat.value * xs, "--", color="0.4", label=f"R = {r_stat.value:.3f} ± {r_stat.err:.3f}")
        ax.fill_between(xs, (r_stat.value - r_stat.err) * xs, (r_stat.value + r_stat.err) * xs,
                        color="0.6", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"{label} truth")
    ax.set_ylabel(f"{label} pred")


def figure_joint(results, path, normalised=False, methods=None):
    """Fig. 4 (κ) or Fig. 5 (κ̃, ``normalised=True``): prediction against truth, pixel by pixel.

    Notes
    -----
    Contours enclose 68.3, 95.4 and 99.7 % of the pixels; orange points are
    the medians of five equal-count bins of the truth with 16-84 % ranges;
    the dashed line and band are R ± its error (eq. 14, Fig. 4 only).
    """
    methods = results.methods if methods is None else list(methods)
    fig, axes = _figure(len(methods))
    for ax, name in zip(axes[0], methods):
        t, p = _pooled(results, None, normalised), _pooled(results, name, normalised)
        r = None if normalised else metric_R(results.truth, results.maps[name])
        _joint_panel(ax, t, p, "κ̃" if normalised else "κ", r)
        ax.set_title(name)
    return _save(fig, path)


def figure_mass(results, path, methods=None):
    """Fig. 6: M_cl of the prediction against the truth (§3.3).

    Notes
    -----
    Error bars of single clusters: the standard deviation of M_cl over runs,
    where the method has runs; orange: binned medians (five equal-count
    bins); dashed line and band: the median ratio and its 16-84 % range.
    """
    methods = results.methods if methods is None else list(methods)
    fig, axes = _figure(len(methods))
    for ax, name in zip(axes[0], methods):
        m_t, m_p = cluster_masses(results.truth, results.maps[name])
        _mass_panel(ax, m_t, m_p, results.run_mass_std.get(name))
        ax.set_title(name)
    return _save(fig, path)


def _mass_panel(ax, m_t, m_p, err=None, ylabel="M_cl pred"):
    ax.errorbar(m_t, m_p, yerr=err, fmt="o", color="k", ms=3, elinewidth=0.8, alpha=0.7)
    for px, py in _binned_medians(m_t, m_p):
        ax.errorbar(px[1], py[1], xerr=[[px[1] - px[0]], [px[2] - px[1]]],
                    yerr=[[py[1] - py[0]], [py[2] - py[1]]], fmt="o", color="C1", ms=7, capsize=2)
    stat = _percentile_stat(m_p / m_t)
    xs = np.array([0.0, m_t.max() * 1.05])
    ax.plot(xs, xs, ":", color="0.5")
    ax.plot(xs, stat.value * xs, "--", color="C0",
            label=f"ratio {stat.value:.3f} +{stat.plus:.3f}/−{stat.minus:.3f}")
    ax.fill_between(xs, (stat.value - stat.minus) * xs, (stat.value + stat.plus) * xs,
                    color="C0", alpha=0.2)
    ax.set_xlabel("M_cl truth (Σκ, r ≤ 10 px)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper left")


def figure_centroid_mass(results, path, methods=None):
    """Fig. 7: Δ_peak against the true cluster mass M_cl (§3.4)."""
    methods = results.methods if methods is None else list(methods)
    m_t, _ = cluster_masses(results.truth, results.truth)
    fig, axes = _figure(len(methods))
    for ax, name in zip(axes[0], methods):
        d = centroid_offsets(results.truth, results.maps[name])
        ax.plot(m_t, d, "o", color="k", ms=3, alpha=0.7)
        ax.axhline(np.median(d), ls="--", color="C0", label=f"median {np.median(d):.2f} px")
        ax.set_xlabel("M_cl truth")
        ax.set_ylabel("Δ_peak [pixel]")
        ax.set_title(name)
        ax.legend(fontsize=8)
    return _save(fig, path)


def figure_centroid_pair(results, path, x_method="KS93", y_method="CNN"):
    """Fig. 8: Δ_peak of two methods for the same clusters, coloured by M_cl truth."""
    m_t, _ = cluster_masses(results.truth, results.truth)
    dx = centroid_offsets(results.truth, results.maps[x_method])
    dy = centroid_offsets(results.truth, results.maps[y_method])
    fig, axes = _figure(1, size=4.5)
    ax = axes[0, 0]
    sc = ax.scatter(dx, dy, c=m_t, s=14, cmap="viridis")
    top = max(dx.max(), dy.max()) * 1.05 + 1
    ax.plot([0, top], [0, top], ":", color="0.5")
    ax.set_xlim(-0.02 * top, top)  # a margin, so that Δ = 0 is not hidden under the axes
    ax.set_ylim(-0.02 * top, top)
    ax.set_xlabel(f"Δ_peak {x_method} [pixel]")
    ax.set_ylabel(f"Δ_peak {y_method} [pixel]")
    fig.colorbar(sc, ax=ax, label="M_cl truth")
    return _save(fig, path)


def figure_masked(results, path, method="CNN", reference=None, reference_method="KS93"):
    """Fig. 10: the reconstruction under bright-star masks (§3.5).

    Parameters
    ----------
    results : Evaluation
        Of the masked catalogs (``results.star_mask`` marks the masked pixels).
    path : path of the PNG
    method : str
        The method shown (the paper: CNN-BS).
    reference : Evaluation, optional
        The same clusters without masks, whose ``reference_method`` Δ_peak is
        the right panel's x axis (the paper: KS93 without masking); default
        ``results`` itself.
    reference_method : str

    Notes
    -----
    Left: κ pred against truth over the pixels inside the masks (contours,
    binned medians as Fig. 4); middle: M_cl as Fig. 6; right: Δ_peak of
    ``method`` against that of the reference.
    """
    reference = results if reference is None else reference
    fig, axes = _figure(3)
    inside = results.star_mask & np.isfinite(results.truth)
    t, p = results.truth[inside], results.maps[method][inside]
    if t.size:
        _joint_panel(axes[0, 0], t, p, "κ")
    axes[0, 0].set_title(f"{method}: pixels inside the masks")
    m_t, m_p = cluster_masses(results.truth, results.maps[method])
    _mass_panel(axes[0, 1], m_t, m_p, results.run_mass_std.get(method), f"M_cl {method}")
    ax = axes[0, 2]
    d_ref = centroid_offsets(reference.truth, reference.maps[reference_method])
    d = centroid_offsets(results.truth, results.maps[method])
    sc = ax.scatter(d_ref, d, c=m_t, s=14, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="M_cl truth")
    top = max(d_ref.max(), d.max()) * 1.05 + 1
    ax.plot([0, top], [0, top], ":", color="0.5")
    ax.set_xlim(-0.02 * top, top)
    ax.set_ylim(-0.02 * top, top)
    ax.set_xlabel(f"Δ_peak {reference_method} [pixel]")
    ax.set_ylabel(f"Δ_peak {method} [pixel]")
    return _save(fig, path)


def write_figures(results, out_dir, example=None, pair=("KS93", "CNN")):
    """Figs. 2-8 (and 10 for masked catalogs) as PNG files in ``out_dir``; returns their paths.

    Fig. 8 needs both methods of ``pair``; it is skipped otherwise.  Fig. 10
    is drawn when some evaluated pixel lies in a star mask, for ``pair[1]``
    against ``pair[0]`` of the same (masked) catalogs; call
    :func:`figure_masked` to compare with an unmasked evaluation instead.
    Fig. 12 (the Appendix A variants) is :func:`figure_maps` with the
    variants as methods.
    """
    paths = [figure_maps(results, os.path.join(out_dir, "fig2_maps.png"), example),
             figure_distributions(results, os.path.join(out_dir, "fig3_distributions.png")),
             figure_joint(results, os.path.join(out_dir, "fig4_joint_kappa.png")),
             figure_joint(results, os.path.join(out_dir, "fig5_joint_kappa_tilde.png"), normalised=True),
             figure_mass(results, os.path.join(out_dir, "fig6_mass.png")),
             figure_centroid_mass(results, os.path.join(out_dir, "fig7_centroid_mass.png"))]
    if all(m in results.maps for m in pair):
        paths.append(figure_centroid_pair(results, os.path.join(out_dir, "fig8_centroid_pair.png"), *pair))
        if (results.star_mask & np.isfinite(results.truth)).any():
            paths.append(figure_masked(results, os.path.join(out_dir, "fig10_masked.png"), pair[1],
                                       reference_method=pair[0]))
    return paths


def cluster_rows(results):
    """Per-cluster values behind Figs. 6-8: index, M_truth, and each method's M_pred and Δ_peak."""
    m_t, _ = cluster_masses(results.truth, results.truth)
    rows = [{"index": int(i), "M_truth": float(m)} for i, m in zip(results.index, m_t)]
    for name in results.methods:
        _, m_p = cluster_masses(results.truth, results.maps[name])
        d = centroid_offsets(results.truth, results.maps[name])
        for row, mp, dd in zip(rows, m_p, d):
            row[f"M_{name}"], row[f"dpeak_{name}"] = float(mp), float(dd)
    return rows


def write_report(results, out_dir, meta=None, example=None, table_name="table2", paper=PAPER_TABLE2,
                 extra_tables=None, figures=True, overwrite=False):
    """Write the evaluation report: tables, per-cluster values, figures.

    Parameters
    ----------
    results : Evaluation
    out_dir : path
        Report directory, created complete or not at all.
    meta : dict, optional
        JSON-serialisable facts to keep beside the tables (command, stride,
        orientations, chosen KS93 FWHM, model files ...), written to
        ``report.json`` with the table rows.
    example : int, optional
        The cluster of Fig. 2.
    table_name : str
        Stem of the main table ("table2").
    paper : dict
        The paper's rows beside it (:data:`PAPER_TABLE2`).
    extra_tables : dict of str -> (rows, paper), optional
        Further tables (e.g. "table3", "ks93_smoothing") written alike; rows
        of a non-Table-2 shape are written as CSV only.
    figures : bool
        Also write the figures (:func:`write_figures`).
    overwrite : bool
        Replace an existing ``out_dir`` (else it is an error).

    Returns
    -------
    str
        ``out_dir``.

    Notes
    -----
    Everything is written into a fresh temporary directory beside
    ``out_dir`` which is then renamed to it, so a crash leaves no
    half-written report under ``out_dir``.  With ``overwrite`` the old report
    is first moved aside and deleted only after the new one is in place.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} exists (pass overwrite=True to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        rows = table2(results)
        write_table(rows, tmp, table_name, paper)
        for name, (extra_rows, extra_paper) in (extra_tables or {}).items():
            if extra_rows and set(TABLE2_COLUMNS) <= set(extra_rows[0]):
                write_table(extra_rows, tmp, name, extra_paper)
            else:
                _write_csv(extra_rows, os.path.join(tmp, f"{name}.csv"))
        _write_csv(cluster_rows(results), os.path.join(tmp, "clusters.csv"))
        n_pix = int(np.isfinite(results.truth).sum())
        summary = {"table": rows, "n_clusters": len(results.truth), "n_pixels": n_pix,
                   "methods": results.methods, "meta": meta or {}}
        with open(os.path.join(tmp, "report.json"), "w") as fh:
            json.dump(summary, fh, indent=1, default=_json_default)
        if figures:
            write_figures(results, tmp, example)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "report"))
        os.rename(tmp, out_dir)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    return str(v)


def _write_csv(rows, path):
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# ---------------------------------------------------------------------------
# §4.2 Real catalogs: sky coordinates in, FITS mass maps out
# ---------------------------------------------------------------------------
#: Frames of a catalog's (e1, e2), with CLMM's names (arXiv:1407.7676 §5.1).
#: "euclidean" is DESIGN.md's: e1 > 0 along x (West), e2 > 0 along the line
#: x = y (North-West).  "celestial" has x towards East (RA increasing), so
#: the mirrored axis flips the sign of e2 (DESIGN.md "Lensing": a mirror
#: flips g2).  Either way the axes are the local West/East and North at
#: each source, as shear catalogs are published.
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
            print(f"wlcnn reconstruct: note: {w.message}", file=sys.stderr)
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


def _add_reconstruct_parser(sub):
    """The ``reconstruct`` subcommand (call in build_parser after "evaluate")."""
    p = sub.add_parser("reconstruct", help="mass maps of a shear catalog in sky coordinates (§4.2)")
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
    p.set_defaults(func=_cmd_reconstruct)
    return p


def _cmd_config(args):
    """Print the paper's numbers (the Config defaults) as JSON."""
    cfg = PAPER
    print(json.dumps({**dataclasses.asdict(cfg), "pixel_arcsec": cfg.pixel_arcsec}, indent=2))
    return 0


def _shard_arg(text):
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/N, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/N needs 0 <= i < N, got {text!r}")
    return i, n


def _cmd_simulate(args):
    """Simulate cluster fields and write a dataset (§2.3.1)."""
    counts = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    manifest = write_dataset(args.out, counts, PAPER, args.seed, masks=args.masks, shard_size=args.shard_size,
                             workers=args.workers, shard=args.shard)
    if manifest is None:
        print(f"{args.out}: this job's shards are done; the manifest follows when every shard is")
    else:
        print(f"{args.out}: complete, {sum(manifest['counts'].values())} clusters")
    return 0


def _cmd_ingest(args):
    """Find clusters in ray-traced κ maps and write a dataset (§2.3.1)."""
    manifest = ingest_dataset(args.maps, args.out, args.n_val, args.n_test, PAPER, args.seed, args.masks,
                              args.shard_size, args.workers, args.angle_key, args.hdu,
                              smooth_fwhm_arcmin=args.smooth_arcmin, threshold_sigma=args.threshold_sigma,
                              min_separation_arcmin=args.min_separation_arcmin)
    print(f"{args.out}: complete, {manifest['counts']} clusters")
    return 0


def _cmd_train(args):
    """Train K runs of the CNN on a dataset (§2.3.2)."""
    preset = get_preset(args.preset)
    if args.init is not None:
        preset = dataclasses.replace(preset, init=args.init)
    infos = train_from_directory(args.data, args.out, preset, args.variant, args.runs, args.seed,
                                 fresh_catalogs=args.fresh_catalogs, conv=args.conv,
                                 mixed_precision=args.mixed_precision)
    for i, info in enumerate(infos):
        print(f"run_{i:02d}: best val_loss {info.get('best_val_loss')}, {info.get('epochs_done')} epochs")
    return 0


def _model_groups(paths):
    """Method name -> models for each ``--models`` path: "CNN" when all share
    one variant, else the variant names (Table 3 of Appendix A)."""
    groups = [(p, load_runs(p)) for p in paths]
    variants = [model_info(models[0])["variant"] for _, models in groups]
    if len(set(variants)) == 1:
        return {"CNN": [m for _, models in groups for m in models]}
    out = {}
    for (p, models), v in zip(groups, variants):
        out.setdefault(v, []).extend(models)
    return out


def evaluate_directory(data_dir, model_paths, out_dir, stride=12, orientations=1, limit=None,
                       n_val_smoothing=50, wiener=True, ss95=True, overwrite=False, progress=True,
                       command=None):
    """``python -m wlcnn evaluate``: Table 2 (and 3) with figures for a dataset's test split.

    Parameters
    ----------
    data_dir : path
        Dataset (:func:`write_dataset` / :func:`ingest_dataset`).
    model_paths : sequence of path
        Run directories or model files (:func:`load_runs`); several variants
        give one row each.
    out_dir : path
        Report directory (written complete or not at all).
    stride, orientations : int
        The mosaic (:func:`predict_mosaic`): the default stride 12 with one
        orientation is the quick mosaic (100 subfields a cluster); the paper's
        is stride 3 with 6 orientations (8,664).
    limit : int, optional
        Evaluate the first ``limit`` test clusters.
    n_val_smoothing : int
        Validation clusters on which the KS93 smoothing is chosen
        (:func:`choose_ks93_smoothing`).
    wiener, ss95 : bool
        Add the Wiener filter (fitted on up to 200 training clusters) and the
        Seitz & Schneider (1995) reduced-shear iteration as rows.

    Returns
    -------
    list of dict
        The Table 2 rows (also in ``out_dir/table2.csv``).
    """
    ds = ClusterDataset(data_dir)
    config = ds.config
    groups = _model_groups(model_paths)
    for name, models in groups.items():
        for m in models:
            info = model_info(m)
            if info["config"]["subfield_npix"] != config.subfield_npix or \
                    info["config"]["output_npix"] != config.output_npix:
                raise ValueError(f"model {name} was built for another grid than the dataset's")
    n_test = ds.count("test")
    if n_test == 0:
        raise ValueError(f"{ds.path} has no test clusters")
    fwhm, smoothing_rows = choose_ks93_smoothing(ds.clusters("val"), config=config, limit=n_val_smoothing,
                                                 progress=progress)
    wf = fit_wiener(ds.clusters("train"), config, progress=progress) if wiener else None
    methods = baseline_methods(config, fwhm, wf, ss95)
    for name, models in groups.items():
        methods[name] = cnn_method(models, config, stride=stride, orientations=orientations)
    total = n_test if limit is None else min(limit, n_test)
    clusters = itertools.islice(ds.clusters("test"), total)
    results = evaluate_methods(clusters, methods, config, total=total, progress=progress)
    meta = {"command": command, "data": os.fspath(data_dir), "models": [os.fspath(p) for p in model_paths],
            "stride": stride, "orientations": orientations, "ks93_fwhm_arcmin": fwhm,
            "n_test_clusters": total, "wlcnn": __version__}
    write_report(results, out_dir, meta=meta, extra_tables={"ks93_smoothing": (smoothing_rows, None)},
                 overwrite=overwrite)
    return table2(results)


def _cmd_evaluate(args):
    """Evaluate models against the baselines on the test split (§3)."""
    rows = evaluate_directory(args.data, args.models, args.out, args.stride, args.orientations, args.limit,
                              args.n_val_smoothing, not args.no_wiener, not args.no_ss95, args.overwrite,
                              command=" ".join(["python -m wlcnn"] + sys.argv[1:]))
    for r in rows:
        print(f"{r['method']:>10}: R {r['R']:.3f} ± {r['R_err']:.3f}  D {r['D']:.2f} ± {r['D_err']:.2f}  "
              f"M {r['M_ratio']:.3f} (+{r['M_plus']:.3f}/-{r['M_minus']:.3f})  "
              f"Δpeak {r['dpeak']:.2f} px  ({r['n_clusters']} clusters)")
    print(f"report: {args.out}")
    return 0


def build_parser():
    """The ``python -m wlcnn`` / ``wlcnn`` argument parser."""
    parser = argparse.ArgumentParser(prog="wlcnn", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wlcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the paper's numbers used as defaults")
    p.set_defaults(func=_cmd_config)

    def dataset_options(p):
        p.add_argument("--out", required=True, help="dataset directory")
        p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
        p.add_argument("--masks", action="store_true", help="bright-star masks (§3.5)")
        p.add_argument("--workers", type=int, default=1, help="processes making shards")
        p.add_argument("--shard-size", type=int, default=25, help="clusters per shard file")

    p = sub.add_parser("simulate", help="simulate cluster fields into a dataset (§2.3.1)")
    dataset_options(p)
    p.add_argument("--n-train", type=int, default=5000, help="paper: 5,000")
    p.add_argument("--n-val", type=int, default=1800, help="paper: 1,800")
    p.add_argument("--n-test", type=int, default=200, help="paper: 200")
    p.add_argument("--shard", type=_shard_arg, default=None,
                   help="i/N: make only every N-th shard starting at i (a job of a batch array)")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("ingest", help="cut clusters from ray-traced κ maps into a dataset (§2.3.1)")
    p.add_argument("maps", nargs="+", help="FITS κ maps (image + side in degrees in the header)")
    dataset_options(p)
    p.add_argument("--n-val", type=int, required=True)
    p.add_argument("--n-test", type=int, required=True)
    p.add_argument("--angle-key", default=MASSIVENUS_ANGLE_KEY, help="header key of the side in degrees")
    p.add_argument("--hdu", type=int, default=0)
    p.add_argument("--smooth-arcmin", type=float, default=1.0, help="FWHM of the detection smoothing")
    p.add_argument("--threshold-sigma", type=float, default=4.0, help="detection threshold")
    p.add_argument("--min-separation-arcmin", type=float, default=4.0)
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("train", help="train the CNN on a dataset (§2.3.2); resumes where it stopped")
    p.add_argument("--data", required=True, help="dataset directory (simulate / ingest)")
    p.add_argument("--out", required=True, help="run directory: run_XX/best.keras, history.csv, run.json")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="quick: this 2-core CPU in 30 min; paper: §2.3.2 as published")
    p.add_argument("--variant", default="FocalLoss", choices=list(VARIANTS), help="Appendix A variant")
    p.add_argument("--runs", type=int, default=None, help="independent runs (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh-catalogs", action="store_true",
                   help="a new source catalog at every cluster visit (beyond the paper)")
    p.add_argument("--init", default=None, choices=INITS,
                   help="starting weights (default: the preset's): glorot as in the paper, "
                        "or ks93, the network set to compute smoothed KS93 (beyond the paper)")
    p.add_argument("--conv", default="auto", choices=["auto", "fft", "direct"])
    p.add_argument("--mixed-precision", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="Table 2 and the figures on a dataset's test split (§3)")
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--models", required=True, nargs="+", help="run directories or .keras files")
    p.add_argument("--out", required=True, help="report directory (complete or absent)")
    p.add_argument("--stride", type=int, default=12,
                   help="offset step in input pixels, a multiple of 3 (paper: 3 = 1,444 offsets)")
    p.add_argument("--orientations", type=int, default=1, choices=[1, 6], help="paper: 6")
    p.add_argument("--limit", type=int, default=None, help="first N test clusters")
    p.add_argument("--n-val-smoothing", type=int, default=50,
                   help="validation clusters that choose the KS93 smoothing")
    p.add_argument("--no-wiener", action="store_true")
    p.add_argument("--no-ss95", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_evaluate)
    _add_reconstruct_parser(sub)
    return parser


def main(argv=None):
    """Entry point of the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"wlcnn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
