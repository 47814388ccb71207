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

import concurrent.futures
import csv
import dataclasses
import functools
import hashlib
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
from astropy.table import Table

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
        "meta"}``: the sky simulator (``examples/simulate_skies.py``) or the
        ray-traced fields (``examples/ingest_raytraced.py``).
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
    if not callable(field_fn):
        raise TypeError("write_dataset needs field_fn(config, rng, split, index), e.g. "
                        "simulate_skies.simulated_field (examples/) or a ray-traced reader")
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
# Keras's own 49x49 Conv2D/Conv2DTranspose cost ~2 h w = 4800 flops per pixel
# and channel pair, and on a CPU their backward pass is far slower still; by
# FFT the cost no longer grows with the filter area. The transforms and the
# sums over channels are XLA-compiled (jit_compile), so that the layout
# changes (channels last <-> the transforms' two innermost axes), zero
# padding, crops and conjugations fuse into the transforms' inputs and
# outputs. The sums over the few channels are unrolled into one fused loop;
# an einsum would instead transpose the spectra for a batched matmul of tiny
# matrices (one per frequency). XLA runs each transform on one thread, so on
# a CPU the batch is cut into one part per core and the parts run
# concurrently. The gradient is written out (custom gradient) so that it
# reuses the forward spectra instead of transforming again. Timings:
# python examples/bench_train.py.

# Keras kernel layout -> (in, out, h, w), and back; Conv2D keeps its kernel as
# (h, w, in, out), Conv2DTranspose as (h, w, out, in).
_TO_IOHW = {False: (2, 3, 0, 1), True: (3, 2, 0, 1)}
_FROM_IOHW = {False: (2, 3, 0, 1), True: (2, 3, 1, 0)}


def _rfft(t, size):
    """2-D real FFT of the two innermost axes, zero-padded to ``size``."""
    pad = [[0, 0]] * (t.shape.rank - 2) + [[0, size[0] - t.shape[-2]],
                                           [0, size[1] - t.shape[-1]]]
    return tf.signal.rfft2d(tf.pad(t, pad), fft_length=size)


def _irfft(t, size, crop):
    """Inverse of ``_rfft``: the ``crop`` corner of the size-``size`` map."""
    return tf.signal.irfft2d(t, fft_length=size)[..., :crop[0], :crop[1]]


def _sum_in(X, K):
    """sum_c X[b, c] K[c, o]: (B, C, U, V), (C, O, U, V) -> (B, O, U, V)."""
    return tf.add_n([X[:, c:c + 1] * K[c] for c in range(K.shape[0])])


def _sum_out(D, K):
    """sum_o D[b, o] K[c, o]: (B, O, U, V), (C, O, U, V) -> (B, C, U, V)."""
    return tf.add_n([D[:, o:o + 1] * K[:, o] for o in range(K.shape[1])])


def _geometry(x_hw, k_hw, transpose):
    """Transform and output sizes of a Conv2D or Conv2DTranspose."""
    (H, W), (h, w) = x_hw, k_hw
    if transpose:
        return (H + h - 1, W + w - 1), (H + h - 1, W + w - 1)
    return (H, W), (H - h + 1, W - w + 1)


@tf.function(jit_compile=True)
def _kernel_spectrum(kernel, size, transpose):
    """Kf: conj(K) for a correlation, K for a convolution, (C, O, U, V)."""
    K = _rfft(tf.transpose(kernel, _TO_IOHW[transpose]), size)
    return K if transpose else tf.math.conj(K)


@tf.function(jit_compile=True)
def _forward(x, Kf, size, out):
    """(B, H, W, C) -> output (B, H', W', O) and the input spectra X."""
    X = _rfft(tf.transpose(x, (0, 3, 1, 2)), size)
    y = _irfft(_sum_in(X, Kf), size, out)
    return tf.transpose(y, (0, 2, 3, 1)), X


@tf.function(jit_compile=True)
def _backward(dy, X, Kf, size, x_hw):
    """dL/dx (B, H, W, C) and this part's sum_b conj(X_b) DY_b."""
    DY = _rfft(tf.transpose(dy, (0, 3, 1, 2)), size)
    dx = _irfft(_sum_out(DY, tf.math.conj(Kf)), size, x_hw)
    G = tf.einsum("bcuv,bouv->couv", tf.math.conj(X), DY)
    return tf.transpose(dx, (0, 2, 3, 1)), G


@tf.function(jit_compile=True)
def _kernel_gradient(G, size, k_hw, transpose):
    """dL/dkernel in the Keras layout from dL/dKf = G."""
    dk = _irfft(G if transpose else tf.math.conj(G), size, k_hw)
    return tf.transpose(dk, _FROM_IOHW[transpose])


def _batch_parts(t):
    """``t`` cut along the batch into one part per CPU core (one on a GPU)."""
    n = 1 if tf.config.list_logical_devices("GPU") else os.cpu_count() or 1
    b = tf.shape(t)[0]
    return [t[b * i // n:b * (i + 1) // n] for i in range(n)]


def _fft_conv(transpose):
    """Valid Conv2D (``transpose`` False) or Conv2DTranspose (True) by FFT.

    Notes
    -----
    X, K, DY: spectra of the input, the kernel and the output gradient, each
    zero-padded to the transform size; Kf = conj(K) (Conv2D, a correlation)
    or K (a convolution). y = irfft(sum_c X_c Kf_co), dx = irfft(sum_o DY_o
    conj(Kf_co)), dKf_co = sum_b conj(X_bc) DY_bo. A correlation is
    transformed at the input size: the circular one equals the linear one on
    the valid corner (the largest input index reached is (H - h) + (h - 1) =
    H - 1), and dx's wrapped lags meet only the kernel's zero padding. A
    convolution is transformed at the output size: nothing wraps.
    """
    @tf.custom_gradient
    def conv(x, kernel):
        x_hw, k_hw = tuple(x.shape[1:3]), tuple(kernel.shape[:2])
        size, out = _geometry(x_hw, k_hw, transpose)
        Kf = _kernel_spectrum(kernel, size, transpose)
        parts = [_forward(p, Kf, size, out) for p in _batch_parts(x)]

        def grad(dy):
            back = [_backward(d, X, Kf, size, x_hw)
                    for d, (_, X) in zip(_batch_parts(dy), parts)]
            G = tf.add_n([g for _, g in back])
            return (tf.concat([d for d, _ in back], 0),
                    _kernel_gradient(G, size, k_hw, transpose))
        return tf.concat([y for y, _ in parts], 0), grad
    return conv


_correlate_valid = _fft_conv(transpose=False)
_convolve_full = _fft_conv(transpose=True)


class _FFTConvBase(keras.layers.Layer):
    """Shared parts of the two FFT layers (valid padding, stride 1,
    channels last). Subclasses set ``_transpose``.

    Parameters
    ----------
    filters : int
        Output channels.
    kernel_size : int or (int, int)
        Filter size (h, w) in pixels.
    """

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
        conv = _convolve_full if self._transpose else _correlate_valid
        y = conv(inputs, tf.convert_to_tensor(self.kernel))
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
    computed with ``tf.signal.rfft2d``; its arguments (filters, kernel_size,
    activation, use_bias) are Conv2D's.

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
    strides=1)``, computed with ``tf.signal.rfft2d``; its arguments (filters,
    kernel_size, activation, use_bias) are Conv2DTranspose's.

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
