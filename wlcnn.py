"""wlcnn: weak-lensing mass reconstruction of galaxy clusters with a CNN.

The reference implementation of Hong, Park, Jee, Bak & Cha (2021), "Weak-lensing Mass
Reconstruction of Galaxy Clusters with Convolutional Neural Network" (ApJ 923, 266).

Reading list: the method, in the paper's order (the file's order)
-----------------------------------------------------------------
* ``Config``: every number the paper fixes (``PAPER``).
* §2.1 ``sigma_crit`` (eq. 4), ``reduced_shear`` (eq. 2), ``lens_ellipticity`` (eq. 7).
* §2.2 ``shear_from_kappa`` (eq. 8; its kernel, eq. 9, in ``ks_kernel``) and its inverse,
  ``ks93`` (eq. 10, Kaiser & Squires 1993).
* §2.3.1 training data: ``nfw_kappa_map`` (an NFW halo's κ), ``simulate_catalog`` (sources
  with shape and measurement noise), ``draw_star_masks`` (§3.5), ``mosaic_truth`` (the
  target) and ``make_cluster`` (one cluster record). The training skies themselves (halos,
  large-scale structure) come from ``examples/simulate_skies.py``, which also writes them
  as dataset files.
* §2.3.2 the network: ``grid_catalog`` (the 7″ Gaussian gridding of a catalog),
  ``subfield`` and ``orient_shear`` (crops and the six orientations), ``training_data`` (the
  tf.data input pipeline), ``FFTConv2D`` and ``FFTConv2DTranspose`` (its large
  convolutions), ``build_model`` (Table 1 and the variants of Appendix A), ``KappaLoss``
  (eq. 11, eq. 12, eq. A1), ``compile_model``.
* §3 evaluation: ``predict_mosaic``, ``ks93_mosaic``, ``normalized_kappa`` (eq. 13),
  ``metric_R`` (eq. 14), ``metric_D`` (eq. 15, its weights eq. 16), ``mass_ratio`` (§3.3),
  ``peak_centroid`` (§3.4), ``paper_metrics``; the KS93 smoothing chosen on validation
  clusters (``choose_ks93_smoothing``) and methods scored on a test set
  (``evaluate_methods``, ``table2``, with paired errors by ``bootstrap_scores``).

The final section, "Machinery: running the method at scale", holds what runs it: files
written whole or not at all (``atomic_write``, ``Progress``), dataset files
(``ClusterDataset``), saving and loading (``save_model``, ``load_model``), a start of the
weights from KS93 (``initialize_as_ks93``, beyond the paper), run files read back
(``read_history``, ``load_runs``) and evaluations kept on disk (``cached_method``,
``save_evaluation``). The training loop and its checkpoints (presets, run
directories that resume, ``train``) are ``examples/train.py``'s, as in nanoGPT's split of
model.py and train.py.

Conventions (everywhere below)
------------------------------
* Frames: arrays are indexed ``[row, col] = [y, x]``; pixel (i, j) of side p has its centre
  at x = (j + 1/2) p, y = (i + 1/2) p, positions in arcsec from the field's lower-left
  corner. x grows to the right (West on the sky), y grows up (North).
* Signs: shear and ellipticity are complex, g = g1 + i g2, with g1 > 0 stretching along x
  and g2 > 0 along the line x = y; ellipticity is (a − b)/(a + b) (eq. 5). Around a mass
  (κ > 0) the shear is tangential: γ1 < 0 on the x axis through it. Rotating a field by φ
  multiplies g by e^{2iφ} (90° flips both components, 180° keeps them); a mirror flips g2.
* Grids: a field is 32′ × 32′ on 500 × 500 input pixels of 3.84″. The network reads the
  386 × 386 subfield at input pixel o = 3m (m = 0..37 on each axis: 1,444 offsets) and
  returns 128 × 128 output pixels of 11.52″ (a 3 × 3 valid convolution, then a 3 × 3 pool):
  output pixel k covers input pixels [o + 1 + 3k, o + 4 + 3k). The full-field output grid,
  the mosaic, is 166 × 166: mosaic pixel J covers input pixels [3J + 1, 3J + 4), and output
  pixel k of subfield m lands on mosaic pixel m + k. The truth at output resolution is the
  mean of the truth κ over those 3 × 3 blocks. The loss and the mosaics leave out the 14
  outer output pixels on each side.
* FFTs: ``shear_from_kappa`` and ``ks93`` zero-pad each side to an odd length of at least
  twice the map, so the mass outside the field is zero and nothing wraps around; with
  ``pad=False`` they are the periodic transforms of the classic implementations.
* Mass-sheet degeneracy: shear fixes κ only up to κ → λκ + (1 − λ). KS93 sets the k = 0 mode
  to zero (a zero-mean padded field); the CNN takes the level from its training skies. Of
  the metrics, D normalises each map to (κ − ⟨κ⟩)/Δκ and so ignores both the sheet and the
  amplitude; R and M_cl compare κ itself, so a sheet missing from a prediction biases them;
  Δ_peak depends on positions alone.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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

#: The public names, in the file's order.
__all__ = [
    "Config", "DERIVED_SIZES", "PAPER", "FWHM_PER_SIGMA", "config_from_dict", "config_dict",
    "cosmology", "sigma_crit", "reduced_shear", "lens_ellipticity", "padded_shape", "ks_kernel",
    "check_map", "shear_from_kappa", "ks93", "nfw_scale", "nfw_sigma", "nfw_mean_sigma",
    "nfw_kappa_map", "check_rng", "draw_intrinsic_ellipticity", "magnitude_pdf",
    "draw_magnitudes", "measurement_error", "draw_star_masks", "simulate_catalog", "block_mean",
    "mosaic_truth", "make_cluster", "check_positive", "SIGMA_RANGE", "grid_catalog_numpy",
    "grid_catalog", "grid_table", "ORIENTATIONS", "orient_map", "spin2_sign", "orient_shear",
    "subfield", "cluster_grid", "fixed_subfields", "training_data", "FFTConv2D",
    "FFTConv2DTranspose", "FORMAT_VERSION", "VARIANTS", "MULTIPLIED_TO", "INFO_LAYER",
    "resolve_conv", "ModelInfo", "build_model", "model_info", "KappaLoss", "make_loss",
    "compile_model", "INVERSE_ORIENTATION", "MOSAIC_BATCH", "mosaic_offsets",
    "mosaic_orientations", "mosaic_coverage", "predict_mosaic", "MosaicRuns",
    "predict_mosaic_runs", "KS93_FWHM_GRID", "smooth_map", "ks93_mosaic", "METRIC_BINS",
    "CLIP_SIGMA", "CLIP_MAX_ITER", "MASS_RADIUS_PIX", "CENTROID_WINDOW_PIX", "CATASTROPHIC_PIX",
    "PERCENTILES", "WeightedStat", "PercentileStat", "metric_R", "normalized_kappa", "metric_D",
    "peak_pixel", "aperture_mass", "cluster_masses", "mass_ratio", "peak_centroid",
    "centroid_offsets", "centroid_offset", "paper_metrics", "SMOOTHING_LOSSES",
    "choose_ks93_smoothing", "TABLE2_COLUMNS", "PAPER_TABLE2", "Evaluation", "star_mask_mosaic",
    "evaluate_methods", "cnn_method", "table2", "BOOTSTRAP_SCORES",
    "LIGHT_FRACTION", "bootstrap_scores", "TMP_PREFIX", "atomic_write",
    "atomic_write_text", "read_json", "file_sha256", "Progress", "SPLITS", "DATA_FIELDS",
    "DATASET_FORMAT", "DATASET_VERSION", "CATALOG_COLUMNS", "MASK_COLUMNS", "data_config",
    "check_split", "cluster_rng", "ClusterDataset", "save_model", "load_model", "KS93Start",
    "ks93_kernels", "pooled_input", "truncated_ks93", "initialize_as_ks93", "validation_sha256",
    "read_history", "load_runs", "cached_method", "save_evaluation", "load_evaluation"
]


# ---------------------------------------------------------------------------
# The paper's numbers
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Every number of Hong et al. (2021), with the section it comes from.

    Frozen: change one with ``dataclasses.replace``. Angles in arcsec or arcmin as named.
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
    kernel_cut_sigma: float = 4.0       # kernel cut (ours): W is 3e-4 of its peak there
    empty_pixel_error: float = 1.0      # Δε of a pixel with no source (ours): ~4 σ_e
    # -- sources and noise (§2.3.1; the forms are ours, the paper gives none) --
    source_density_arcmin2: float = 25.0  # §2.3.1 (25,600 in 32' x 32')
    sigma_e: float = 0.24               # intrinsic shape noise per component, §2.3.1
    mag_min: float = 21.5               # V-band distribution starts, §2.3.1 (Kim+2019)
    mag_peak: float = 25.5              # ... peaks, §2.3.1
    mag_max: float = 27.5               # ... is cut, §2.3.1
    count_slope: float = 0.3            # d log10 N / dm of faint galaxy counts
    completeness_width_mag: float = 0.5  # width of the completeness roll-off
    sigma_meas_floor: float = 0.03      # measurement error of bright sources
    sigma_meas_at_cut: float = 0.25     # extra error at mag_max; scales as flux^-1
    # -- bright-star masks (§3.5) --------------------------------------------
    stars_per_400arcmin2: tuple = (1, 2)   # 1-2 per 20' x 20', §3.5
    star_radius_arcmin: tuple = (0.5, 2.0)  # uniform radius, §3.5
    star_near_peak_arcmin: float = 1.0  # one mask within 1' of the peak, §3.5
    # -- subfields, network output and mosaic (§2.3.2, Table 1) ---------------
    subfield_npix: int = 386            # network input, §2.3.2
    offset_step: int = 3                # offsets 0, 3, ..., 111: one output pixel
    n_offsets: int = 38                 # 38 x 38 = 1,444 offsets, §2.3.2
    first_kernel: int = 3               # Table 1 Conv2D-1
    pool: int = 3                       # Table 1 AvgPool
    # -- network (§2.3.2, Table 1, Appendix A) --------------------------------
    filter_size: int = 49               # TransConv2D-# / Conv2D-# filters, §2.3.2
    n_filters: int = 8                  # channels of every block, Table 1
    n_filters_final: int = 16           # TransConv2D-5, Table 1
    loss_border_pix: int = 14           # outer output pixels not scored, §2.3.2
    focal_floor: float = 0.01           # floor of the focal weights' denominator (KappaLoss)
    # -- training (§2.3.2) -----------------------------------------------------
    learning_rate: float = 1e-5         # Adam, §2.3.2
    batch_size: int = 50                # §2.3.2
    steps_per_epoch: int = 20           # §2.3.2
    epochs: int = 200                   # §2.3.2
    n_runs: int = 10                    # independent runs, §2.3.2
    clipnorm: float = 1.0               # gradient-norm clipping (ours): the focal loss needs it

    @property
    def pixel_arcsec(self) -> float:
        """Input pixel side in arcsec (3.84″ for the paper)."""
        return self.field_arcmin * 60.0 / self.npix

    @property
    def sigma_w_arcsec(self) -> float:
        """Standard deviation of the Gaussian gridding kernel in arcsec."""
        return self.fwhm_arcsec / FWHM_PER_SIGMA

    @property
    def output_npix(self) -> int:
        """Side of the network's output in output pixels, Conv2D-1 (valid) then the pool of
        Table 1: (386 - 2) // 3 = 128 for the paper."""
        return (self.subfield_npix - self.first_kernel + 1) // self.pool

    @property
    def mosaic_npix(self) -> int:
        """Side of the full-field output grid, the mosaic, in output pixels: the same layers
        over the whole field, (500 - 2) // 3 = 166 for the paper."""
        return (self.npix - self.first_kernel + 1) // self.pool


#: Config's sizes derived from its fields, which saved models and run.json files record
#: beside the fields (:func:`config_dict`).
DERIVED_SIZES = ("output_npix", "mosaic_npix")


PAPER = Config()


#: FWHM of a Gaussian in units of its standard deviation, 2 sqrt(2 ln 2).
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def config_from_dict(d):
    """A Config from a dict of its fields (as JSON stores it: lists back to tuples).

    The derived sizes of :data:`DERIVED_SIZES` that the dict may record are checked against
    the fields, not taken: ValueError if one disagrees.
    """
    config = Config(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in d.items() if k not in DERIVED_SIZES})
    wrong = {k: d[k] for k in DERIVED_SIZES if k in d and d[k] != getattr(config, k)}
    if wrong:
        raise ValueError(f"the recorded sizes {wrong} disagree with the fields, which give "
                         f"{ {k: getattr(config, k) for k in wrong} }")
    return config


def config_dict(config):
    """``config`` as saved models and run.json files record it: its fields, then the
    derived sizes of :data:`DERIVED_SIZES` (for readers of those files)."""
    return {**dataclasses.asdict(config), **{k: getattr(config, k) for k in DERIVED_SIZES}}


def cosmology(config: Config = PAPER) -> FlatLambdaCDM:
    """The flat ΛCDM cosmology of the paper (§1) as an astropy object."""
    return FlatLambdaCDM(H0=config.H0, Om0=config.Om0)


# ---------------------------------------------------------------------------
# §2.1 Basic weak-lensing theory (eq. 1-7)
# ---------------------------------------------------------------------------
def sigma_crit(z_l, z_s, cosmo=None):
    """Critical surface density Σ_c = c² D_s / (4π G D_l D_ls) in M☉/Mpc² (eq. 4).

    D are angular-diameter distances; ``cosmo`` defaults to the paper's flat ΛCDM. ``z_l``
    and ``z_s`` may be arrays (broadcast together): Σ_c of many lens planes at once.
    """
    z_l = np.asarray(z_l, dtype=np.float64)
    z_s = np.asarray(z_s, dtype=np.float64)
    if not (np.all(np.isfinite(z_l)) and np.all(np.isfinite(z_s))) or np.any(z_l <= 0):
        raise ValueError(f"redshifts must be finite with z_l > 0, got z_l={z_l}, z_s={z_s}")
    if np.any(z_s <= z_l):
        raise ValueError(f"source redshift z_s={z_s} must exceed lens redshift z_l={z_l}")
    z_l, z_s = (float(z) if z.ndim == 0 else z for z in (z_l, z_s))
    cosmo = cosmology() if cosmo is None else cosmo
    d_l = cosmo.angular_diameter_distance(z_l)
    d_s = cosmo.angular_diameter_distance(z_s)
    d_ls = cosmo.angular_diameter_distance(z_l, z_s)
    return (const.c**2 * d_s / (4 * np.pi * const.G * d_l * d_ls)).to(u.Msun / u.Mpc**2)


def reduced_shear(gamma1, gamma2, kappa):
    """Reduced shear g = (γ1 + i γ2) / (1 − κ) as a complex array (eq. 2).

    κ = 1 exactly (a critical curve) raises ValueError: g is undefined there.
    """
    gamma = np.asarray(gamma1, dtype=np.float64) + 1j * np.asarray(gamma2, dtype=np.float64)
    kappa = np.asarray(kappa, dtype=np.float64)
    if np.any(kappa == 1.0):
        raise ValueError("kappa == 1 (a critical curve): reduced shear is undefined there")
    return gamma / (1.0 - kappa)


def lens_ellipticity(e, g):
    """Lensed ellipticity ε = (e + g) / (1 + g* e) of intrinsic ellipticity e (eq. 7).

    Where |g| > 1 (inside the critical curve) ε = (1 + g e*) / (e* + g*) (Seitz & Schneider
    1997). ``e`` and ``g`` are complex and broadcast; |e| < 1.
    """
    e = np.asarray(e)
    g = np.asarray(g)
    for name, a in (("e", e), ("g", g)):
        if not np.issubdtype(a.dtype, np.number):
            raise TypeError(f"{name} must be a numeric (complex) array, got dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf")
    e = e.astype(np.complex128)
    g = g.astype(np.complex128)
    if np.any(np.abs(e) >= 1.0):
        raise ValueError("intrinsic ellipticity must satisfy |e| < 1")
    with np.errstate(divide="ignore", invalid="ignore"):
        eps_weak = (e + g) / (1.0 + np.conj(g) * e)
        eps_strong = (1.0 + g * np.conj(e)) / (np.conj(e) + np.conj(g))
    return np.where(np.abs(g) <= 1.0, eps_weak, eps_strong)


# ---------------------------------------------------------------------------
# §2.2 Shear from convergence (eq. 8-9) and Kaiser & Squires (eq. 10)
# ---------------------------------------------------------------------------
def padded_shape(shape, pad):
    """FFT grid of a map: itself, or the smallest odd 3-5-7-smooth lengths ≥ twice each side.

    Odd grids have no Nyquist mode, so the inversion is exact and commutes exactly with
    90° rotations and mirrors (an even grid's Nyquist mode has no sign of k).
    """
    if not pad:
        return tuple(shape)
    out = []
    for n in shape:
        m = 2 * n + 1
        while True:
            r = m
            for p in (3, 5, 7):
                while r % p == 0:
                    r //= p
            if r == 1:
                break
            m += 2
        out.append(m)
    return tuple(out)


@functools.lru_cache(maxsize=8)
def ks_kernel(shape):
    """The kernel D (eq. 9) in Fourier space: (cos 2φ_k, sin 2φ_k) on an rfft2 grid.

    With k1 along x (axis 1), k2 along y (axis 0): D̂ = [(k1² − k2²) + 2i k1 k2] / k².
    D̂(0) = 0: the mean convergence makes no shear (the mass-sheet degeneracy).
    """
    k2 = scipy.fft.fftfreq(shape[0])[:, None]
    k1 = scipy.fft.rfftfreq(shape[1])[None, :]
    ksq = k1**2 + k2**2
    ksq[0, 0] = 1.0
    c = (k1**2 - k2**2) / ksq
    s = 2.0 * k1 * k2 / ksq
    c[0, 0] = 0.0
    s[0, 0] = 0.0
    # An even grid's Nyquist row and column have no sign of k, so sin 2φ_k (odd in k) is
    # zero there, as taking the real part of a complex inverse FFT makes it in the classic
    # implementations (lenspack), whose numbers ``pad=False`` reproduces.
    if shape[0] % 2 == 0:
        s[shape[0] // 2, :] = 0.0
    if shape[1] % 2 == 0:
        s[:, -1] = 0.0
    if shape[0] % 2 == 0 and shape[1] % 2 == 0:
        s[shape[0] // 2, -1] = 1.0  # the self-conjugate corner, k1 = k2 = -1/2
    c.flags.writeable = s.flags.writeable = False  # cached: shared by every call
    return c, s


def check_map(name, a):
    """``a`` as a float64 array; ValueError or TypeError unless it is a finite real 2-D map."""
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
    """Shear (γ1, γ2) of a convergence map, γ = (1/π) D * κ (eq. 8).

    In Fourier space γ̂ = D̂ κ̂ (:func:`ks_kernel`). ``pad``: zero-pad (no mass outside the
    map); False treats the map as periodic.
    """
    kappa = check_map("kappa", kappa)
    shape = padded_shape(kappa.shape, pad)
    kk = scipy.fft.rfft2(kappa, s=shape)
    c, s = ks_kernel(shape)
    ny, nx = kappa.shape
    gamma1 = scipy.fft.irfft2(c * kk, s=shape)[:ny, :nx]
    gamma2 = scipy.fft.irfft2(s * kk, s=shape)[:ny, :nx]
    return gamma1, gamma2


def ks93(g1, g2, pad=True, return_bmode=False):
    """Kaiser & Squires (1993) convergence κ = (1/π) D* * γ of a shear map (eq. 10).

    κ̂ = D̂* γ̂ in Fourier space. ``pad=True`` zero-pads against the wrap-around of the FFT
    (§2.2's finite field); ``pad=False`` gives the periodic inversion of the classic
    implementations (lenspack's ``ks93``). ``return_bmode`` also returns the B mode (the
    curl part, a noise diagnostic). With padding it is the padded field that has zero mean,
    so the map keeps a small non-zero mean.
    """
    g1 = check_map("g1", g1)
    g2 = check_map("g2", g2)
    if g1.shape != g2.shape:
        raise ValueError(f"g1 and g2 differ in shape: {g1.shape} vs {g2.shape}")
    shape = padded_shape(g1.shape, pad)
    f1 = scipy.fft.rfft2(g1, s=shape)
    f2 = scipy.fft.rfft2(g2, s=shape)
    c, s = ks_kernel(shape)
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
    """Scale radius r_s (physical Mpc) and r_s δ_c ρ_c (M☉/Mpc²) of an NFW halo.

    ``m200_msun`` is M200c (the mass within 200 times the critical density at z), ``c200``
    the concentration r200 / r_s; r_s δ_c ρ_c is the unit of Wright & Brainerd (2000).
    Arguments may be arrays (broadcast together); r200 is ``c200 * r_s`` and the density
    scale ρ_s = δ_c ρ_c is the second value over the first.
    """
    m200_msun = np.asarray(m200_msun, dtype=np.float64)
    c200 = np.asarray(c200, dtype=np.float64)
    if not (np.all(m200_msun > 0) and np.all(c200 > 0)):
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


def _nfw_x(r_mpc, m200_msun, c200, z, cosmo):
    r_s, sigma_s = nfw_scale(m200_msun, c200, z, cosmo)
    x = np.asarray(r_mpc, dtype=np.float64) / r_s
    if np.any(x <= 0):
        raise ValueError("r_mpc must be positive")
    return x, sigma_s


def nfw_sigma(r_mpc, m200_msun, c200, z, cosmo=None):
    """NFW surface density Σ(R) in M☉/Mpc², R in Mpc (Wright & Brainerd 2000, equation 11).

    Σ = 2 r_s δ_c ρ_c [1 − F(x)] / (x² − 1), x = R / r_s; within 1e-3 of x = 1 a first-order
    series replaces the 0/0.
    """
    x, sigma_s = _nfw_x(r_mpc, m200_msun, c200, z, cosmo)
    near = np.abs(x - 1.0) < 1e-3
    xs = np.where(near, 2.0, x)
    val = (1.0 - _nfw_f(xs)) / (xs**2 - 1.0)
    series = 1.0 / 3.0 - 0.4 * (x - 1.0)  # the derivative at x = 1 is -2/5
    return 2.0 * sigma_s * np.where(near, series, val)


def nfw_mean_sigma(r_mpc, m200_msun, c200, z, cosmo=None):
    """NFW mean surface density Σ̄(<R) in M☉/Mpc² (Wright & Brainerd 2000, equation 13).

    Σ̄ = 4 r_s δ_c ρ_c [F(x) + ln(x/2)] / x²; the tangential shear is γ_t = (Σ̄ − Σ) / Σ_c.
    """
    x, sigma_s = _nfw_x(r_mpc, m200_msun, c200, z, cosmo)
    return 4.0 * sigma_s * (_nfw_f(x) + np.log(x / 2.0)) / x**2


def nfw_kappa_map(m200_msun, c200, x0_arcsec, y0_arcsec, npix, pixel_arcsec,
                  z_l=PAPER.z_lens, z_s=PAPER.z_source, cosmo=None,
                  axis_ratio=1.0, angle_deg=0.0, oversample=4, core_oversample=32):
    """Pixel-averaged convergence κ = Σ / Σ_c of an elliptical NFW halo, (npix, npix).

    The halo is centred at (x0, y0) arcsec. The elliptical radius r² = q x'² + y'²/q keeps
    the area inside a contour (q = ``axis_ratio`` ≤ 1, major axis ``angle_deg`` counter-
    clockwise from +x). Each pixel averages ``oversample``² samples, the 7 × 7 pixels about
    the centre ``core_oversample``², so the cusp is averaged rather than sampled.
    """
    if not 0 < axis_ratio <= 1:
        raise ValueError(f"axis_ratio must be in (0, 1], got {axis_ratio}")
    cosmo = cosmology() if cosmo is None else cosmo
    sc = sigma_crit(z_l, z_s, cosmo).value
    mpc_per_arcsec = (cosmo.angular_diameter_distance(z_l).to_value(u.Mpc)
                      * (1 * u.arcsec).to_value(u.rad))
    cos_t, sin_t = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))

    def averaged(i0, j0, n_i, n_j, s):
        sub = (np.arange(s) + 0.5) / s
        y = ((i0 + np.arange(n_i))[:, None] + sub[None, :]).ravel() * pixel_arcsec - y0_arcsec
        x = ((j0 + np.arange(n_j))[:, None] + sub[None, :]).ravel() * pixel_arcsec - x0_arcsec
        xp = x[None, :] * cos_t + y[:, None] * sin_t
        yp = -x[None, :] * sin_t + y[:, None] * cos_t
        r = np.sqrt(axis_ratio * xp**2 + yp**2 / axis_ratio) * mpc_per_arcsec
        k = nfw_sigma(np.maximum(r, 1e-9), m200_msun, c200, z_l, cosmo) / sc
        return k.reshape(n_i, s, n_j, s).mean(axis=(1, 3))

    kappa = averaged(0, 0, npix, npix, oversample)
    ic = int(np.floor(y0_arcsec / pixel_arcsec))
    jc = int(np.floor(x0_arcsec / pixel_arcsec))
    i0, i1 = max(ic - 3, 0), min(ic + 4, npix)
    j0, j1 = max(jc - 3, 0), min(jc + 4, npix)
    if i1 > i0 and j1 > j0:
        kappa[i0:i1, j0:j1] = averaged(i0, j0, i1 - i0, j1 - j0, core_oversample)
    return kappa


# ---------------------------------------------------------------------------
# §2.3.1 Training data: source catalogs with shape and measurement noise
# ---------------------------------------------------------------------------
def check_rng(rng):
    """TypeError unless ``rng`` is a numpy Generator (every random draw takes one)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed))")
    return rng


def draw_intrinsic_ellipticity(n, sigma_e, rng):
    """``n`` complex intrinsic ellipticities, N(0, σ_e) per component, redrawn until |e| < 1.

    |e| ≥ 1 is no ellipse under the (a − b)/(a + b) definition (§2.3.1).
    """
    check_rng(rng)
    e = rng.normal(0.0, sigma_e, n) + 1j * rng.normal(0.0, sigma_e, n)
    bad = np.abs(e) >= 1.0
    while np.any(bad):
        k = int(bad.sum())
        e[bad] = rng.normal(0.0, sigma_e, k) + 1j * rng.normal(0.0, sigma_e, k)
        bad = np.abs(e) >= 1.0
    return e


def magnitude_pdf(mag, config=PAPER):
    """Unnormalised V-band magnitude distribution of the sources (§2.3.1).

    The paper (after Kim et al. 2019) says only: it starts at 21.5, peaks at 25.5 and is cut
    at 27.5 mag. We take counts rising as 10^(a m) (a = ``count_slope``) times a logistic
    completeness 1 / (1 + exp((m − m_c)/w)), with m_c placing the peak at ``mag_peak``.
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
    # 1,025 points: 0.006-mag steps, far below any photometric error
    grid = np.linspace(config.mag_min, config.mag_max, 1025)
    p = magnitude_pdf(grid, config)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * np.diff(grid) * (p[1:] + p[:-1]))])
    return grid, cdf / cdf[-1]


def draw_magnitudes(n, config, rng):
    """``n`` V-band magnitudes from :func:`magnitude_pdf` (by its inverse CDF)."""
    grid, cdf = _magnitude_cdf(config)
    return np.interp(rng.uniform(0.0, 1.0, n), cdf, grid)


def measurement_error(mag, config=PAPER):
    """Per-component ellipticity measurement error σ_meas of a source of magnitude ``mag``.

    The paper uses Kim et al. (2019)'s relation without giving it. We take a floor plus a
    term ∝ 1/flux (a background-limited shape measurement): σ_floor + σ_cut 10^{0.4 (m −
    m_max)}, i.e. 0.03 at 21.5, ≈0.07 at the 25.5 peak, 0.28 at the 27.5 cut.
    """
    mag = np.asarray(mag, dtype=np.float64)
    flux_term = 10.0 ** (0.4 * (mag - config.mag_max))
    return config.sigma_meas_floor + config.sigma_meas_at_cut * flux_term


def draw_star_masks(config, rng, peak_xy_arcsec):
    """Bright-star masks of a field (§3.5): a Table of ``x``, ``y``, ``radius`` in arcsec.

    1-2 masks per 20′ × 20′ (scaled by area), radii uniform in 0.5′-2′; the first lies
    within ``star_near_peak_arcmin`` of the cluster's mass peak ``peak_xy_arcsec``.
    """
    check_rng(rng)
    side = config.field_arcmin * 60.0
    scale = config.field_arcmin**2 / 400.0
    lo, hi = config.stars_per_400arcmin2
    n = max(1, int(rng.integers(round(lo * scale), round(hi * scale) + 1)))
    r_near = config.star_near_peak_arcmin * 60.0 * np.sqrt(rng.uniform())
    phi = rng.uniform(0.0, 2 * np.pi)
    x = np.concatenate([[peak_xy_arcsec[0] + r_near * np.cos(phi)], rng.uniform(0, side, n - 1)])
    y = np.concatenate([[peak_xy_arcsec[1] + r_near * np.sin(phi)], rng.uniform(0, side, n - 1)])
    radius = rng.uniform(*config.star_radius_arcmin, n) * 60.0
    return Table({"x": x, "y": y, "radius": radius},
                 units={"x": u.arcsec, "y": u.arcsec, "radius": u.arcsec})


def simulate_catalog(kappa, gamma1, gamma2, config=PAPER, rng=None, masks=None):
    """An observed source catalog behind truth maps κ, γ1, γ2 on the input grid (§2.3.1).

    Positions are uniform, a Poisson number of mean density × area; κ and γ are interpolated
    bilinearly at each source, the intrinsic ellipticity (:func:`draw_intrinsic_ellipticity`)
    is lensed by :func:`reduced_shear` and :func:`lens_ellipticity`, and Gaussian measurement
    noise of σ_meas (:func:`measurement_error`) is added to each component. Sources inside
    ``masks`` (:func:`draw_star_masks`) are removed. ``rng`` is required.

    Returns
    -------
    astropy.table.Table
        ``x``, ``y`` (arcsec), ``mag``, ``sigma`` = sqrt(σ_e² + σ_meas²) per component, and
        the observed ``e1``, ``e2``.
    """
    check_rng(rng)
    names = ("kappa", "gamma1", "gamma2")
    maps = [check_map(n, a) for n, a in zip(names, (kappa, gamma1, gamma2))]
    for name, a in zip(names, maps):
        if a.shape != (config.npix, config.npix):
            raise ValueError(f"{name} has shape {a.shape}; the config's grid is "
                             f"({config.npix}, {config.npix})")
    side = config.field_arcmin * 60.0
    n = int(rng.poisson(config.source_density_arcmin2 * config.field_arcmin**2))
    x = rng.uniform(0.0, side, n)
    y = rng.uniform(0.0, side, n)
    mag = draw_magnitudes(n, config, rng)
    sigma_meas = measurement_error(mag, config)
    coords = np.vstack([y, x]) / config.pixel_arcsec - 0.5  # pixel centres at (i + 1/2) p
    k, g1, g2 = (scipy.ndimage.map_coordinates(a, coords, order=1, mode="nearest")
                 for a in maps)
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
# §2.3.1 Training data: a cluster record and its target κ at output resolution
# ---------------------------------------------------------------------------
def block_mean(a, pool):
    """Mean over ``pool`` × ``pool`` blocks of the last two axes (sides divisible by ``pool``)."""
    a = np.asarray(a)
    ny, nx = a.shape[-2:]
    if ny % pool or nx % pool:
        raise ValueError(f"map sides {a.shape[-2:]} are not multiples of {pool}")
    return a.reshape(a.shape[:-2] + (ny // pool, pool, nx // pool, pool)).mean(axis=(-3, -1))


def _block_mean(a, n, config):
    """Mean of the last two axes over 3 × 3 blocks [3J + 1, 3J + 4), J < n: the footprint of
    an output pixel through Conv2D-1 (3 × 3, valid) and the 3 × 3 AvgPool of Table 1."""
    p, lo = config.pool, (config.first_kernel - 1) // 2
    return block_mean(a[..., lo:lo + p * n, lo:lo + p * n], p)


def _mosaic_centres(config):
    """Centres of the mosaic pixels along one axis, in arcsec from the field's corner."""
    lo = (config.first_kernel - 1) // 2
    n = np.arange(config.mosaic_npix)
    return (lo + config.pool * (n + 0.5)) * config.pixel_arcsec


def mosaic_truth(kappa, config=PAPER):
    """Truth κ (..., npix, npix) at output resolution on the mosaic grid (the target)."""
    return _block_mean(np.asarray(kappa), config.mosaic_npix, config)


def make_cluster(field, config, rng, masks=False):
    """One cluster record: the truth maps of ``field``, its star masks and its catalog.

    ``field`` holds ``kappa``, ``gamma1``, ``gamma2`` (npix, npix) and an optional JSON
    ``meta``; ``rng`` draws the masks (if ``masks``, around the truth's peak) and the catalog.
    """
    kappa = check_map("kappa", field["kappa"])
    mosaic = mosaic_truth(kappa, config)
    i, j = np.unravel_index(np.argmax(mosaic), mosaic.shape)
    centres = _mosaic_centres(config)
    if masks:
        mask_table = draw_star_masks(config, rng, (centres[j], centres[i]))
    else:
        mask_table = Table({c: np.zeros(0) for c in MASK_COLUMNS})
    catalog = simulate_catalog(kappa, field["gamma1"], field["gamma2"], config, rng,
                               mask_table if masks else None)
    return {"kappa": kappa, "gamma1": np.asarray(field["gamma1"]),
            "gamma2": np.asarray(field["gamma2"]), "catalog": catalog, "masks": mask_table,
            "meta": dict(field.get("meta", {}))}


# ---------------------------------------------------------------------------
# §2.3.2 Gridding the catalog onto the input pixels (the Cython extension)
# ---------------------------------------------------------------------------
def _as_1d(name, a):
    a = np.asarray(a)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer)
                                 or np.issubdtype(a.dtype, np.floating)
                                 or np.issubdtype(a.dtype, np.bool_)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per source), got shape {a.shape}")
    a = np.ascontiguousarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def check_positive(name, value):
    """``value`` as a float; TypeError or ValueError unless it is a finite number > 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


#: Accepted σ of a source: outside it a source is no ellipticity measurement (and its
#: weight 1/σ² would overflow float64 sums).
SIGMA_RANGE = (1e-6, 1e6)


def _check_grid_args(x, y, e1, e2, sigma, npix, pixel_arcsec, fwhm_arcsec, cut_sigma,
                     empty_error):
    cols = [_as_1d(n, a) for n, a in
            (("x", x), ("y", y), ("e1", e1), ("e2", e2), ("sigma", sigma))]
    if len({len(c) for c in cols}) != 1:
        raise ValueError("x, y, e1, e2, sigma must have the same length, got "
                         + ", ".join(str(len(c)) for c in cols))
    if np.any(cols[4] <= 0):
        raise ValueError("sigma must be positive for every source")
    if np.any((cols[4] < SIGMA_RANGE[0]) | (cols[4] > SIGMA_RANGE[1])):
        raise ValueError(f"sigma must lie in [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}] "
                         "for every source")
    if np.any(np.abs(cols[2]) > 1e3) or np.any(np.abs(cols[3]) > 1e3):
        raise ValueError("|e1|, |e2| above 1000: not an ellipticity")
    if isinstance(npix, (bool, np.bool_)) or not isinstance(npix, (int, np.integer)):
        raise TypeError(f"npix must be an integer, got {type(npix).__name__}")
    if npix <= 0:
        raise ValueError(f"npix must be positive, got {npix}")
    pixel_arcsec = check_positive("pixel_arcsec", pixel_arcsec)
    fwhm_arcsec = check_positive("fwhm_arcsec", fwhm_arcsec)
    cut_sigma = check_positive("cut_sigma", cut_sigma)
    empty_error = check_positive("empty_error", empty_error)
    s_pix = fwhm_arcsec / FWHM_PER_SIGMA / pixel_arcsec
    if not 0.05 <= s_pix <= npix:
        raise ValueError(f"the kernel's σ is {s_pix:g} pixels; it must lie between 0.05 pixel "
                         f"and the grid's side ({npix}): check fwhm_arcsec and pixel_arcsec")
    with np.errstate(over="ignore", divide="ignore"):
        density_norm = _density_norm(fwhm_arcsec)
    if not np.isfinite(density_norm):  # a kernel of ~1e-150 arcsec: 1/(2πσ²) overflows
        raise ValueError(f"fwhm_arcsec={fwhm_arcsec:g} is too small for a source density "
                         "in arcmin⁻² (1/(2πσ²) overflows)")
    if cut_sigma > 10:
        raise ValueError(f"cut_sigma={cut_sigma} is beyond 10 σ, where the Gaussian is "
                         "below e^-50")
    return cols, int(npix), pixel_arcsec, s_pix, cut_sigma * s_pix, empty_error, density_norm


def _density_norm(fwhm_arcsec):
    """1 / (2π σ_W²) in arcmin⁻²: Σ W times this is sources per arcmin²."""
    s_arcmin = fwhm_arcsec / FWHM_PER_SIGMA / 60.0
    return 1.0 / (2.0 * np.pi * s_arcmin**2)


def grid_catalog_numpy(x, y, e1, e2, sigma, npix=PAPER.npix, pixel_arcsec=PAPER.pixel_arcsec,
                       fwhm_arcsec=PAPER.fwhm_arcsec, cut_sigma=PAPER.kernel_cut_sigma,
                       empty_error=PAPER.empty_pixel_error):
    """NumPy reference of :func:`grid_catalog` (same sums; slow; the fallback).

    For each tap (di, dj) of the truncated kernel, every source adds to the pixel at that
    offset from its nearest pixel with ``np.bincount``.
    """
    (x, y, e1, e2, sigma), npix, pixel_arcsec, s_pix, rcut, empty_error, density_norm = \
        _check_grid_args(x, y, e1, e2, sigma, npix, pixel_arcsec, fwhm_arcsec, cut_sigma,
                         empty_error)
    xp, yp = x / pixel_arcsec - 0.5, y / pixel_arcsec - 0.5  # in pixels, centres at integers
    near = (xp >= -rcut - 1) & (xp <= npix + rcut) & (yp >= -rcut - 1) & (yp <= npix + rcut)
    xp, yp, e1, e2 = xp[near], yp[near], e1[near], e2[near]
    w = 1.0 / sigma[near] ** 2
    ic, jc = np.rint(yp).astype(np.int64), np.rint(xp).astype(np.int64)
    half = int(np.ceil(rcut + 0.5))
    acc = np.zeros((5, npix * npix))
    for di in range(-half, half + 1):
        for dj in range(-half, half + 1):
            i, j = ic + di, jc + dj
            ok = ((np.abs(i - yp) <= rcut) & (np.abs(j - xp) <= rcut)
                  & (i >= 0) & (i < npix) & (j >= 0) & (j < npix))
            if not ok.any():
                continue
            idx = (i * npix + j)[ok]
            ww = np.exp(-0.5 * ((i - yp) ** 2 + (j - xp) ** 2)[ok] / s_pix**2)
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
    out[3] = acc[4] * density_norm
    return out


def grid_catalog(x, y, e1, e2, sigma, npix=PAPER.npix, pixel_arcsec=PAPER.pixel_arcsec,
                 fwhm_arcsec=PAPER.fwhm_arcsec, cut_sigma=PAPER.kernel_cut_sigma,
                 empty_error=PAPER.empty_pixel_error, out=None):
    """Grid a source catalog onto the network's input pixels (§2.3.2).

    Sources at ``x``, ``y`` (arcsec; outside the field too: they inform the pixels within
    the kernel's reach) with ellipticities ``e1``, ``e2`` (not clipped) and per-component
    errors ``sigma`` (weights u = 1/σ²) are smoothed by a Gaussian W of FWHM ``fwhm_arcsec``
    (7″), cut where |Δx| or |Δy| exceeds ``cut_sigma`` σ_W. The cut is square: W stays
    separable and keeps the symmetries of the pixel grid that the augmentations need.

    Returns
    -------
    numpy.ndarray, shape (4, npix, npix), float64
        [ε̄1, ε̄2, Δε, n]: ε̄_k = Σ W u ε_k / Σ W u; Δε = sqrt(Σ W² u² σ²) / Σ W u, the
        standard error of ε̄_k; n = Σ W / (2π σ_W²) in sources per arcmin². A pixel with no
        source in reach has ε̄ = 0 and Δε = ``empty_error``. Written into ``out`` if given.
    """
    (x, y, e1, e2, sigma), npix, pixel_arcsec, s_pix, rcut, empty_error, density_norm = \
        _check_grid_args(x, y, e1, e2, sigma, npix, pixel_arcsec, fwhm_arcsec, cut_sigma,
                         empty_error)
    if out is not None and not (isinstance(out, np.ndarray) and out.shape == (4, npix, npix)
                                and out.dtype == np.float64 and out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous float64 array of shape (4, {npix}, {npix})")
    if out is None:
        out = np.empty((4, npix, npix))
    if _grid is None:
        out[...] = grid_catalog_numpy(x, y, e1, e2, sigma, npix, pixel_arcsec, fwhm_arcsec,
                                      cut_sigma, empty_error)
        return out
    _grid.grid(x, y, e1, e2, sigma, pixel_arcsec, rcut, 0.5 / s_pix**2, empty_error,
               density_norm, out)
    return out


def grid_table(catalog, config=PAPER, out=None):
    """:func:`grid_catalog` of a catalog table from :func:`simulate_catalog`."""
    return grid_catalog(catalog["x"], catalog["y"], catalog["e1"], catalog["e2"],
                        catalog["sigma"], config.npix, config.pixel_arcsec, config.fwhm_arcsec,
                        config.kernel_cut_sigma, config.empty_pixel_error, out=out)


# ---------------------------------------------------------------------------
# §2.3.2 Augmentation: subfields, orientations, and the input pipeline
# ---------------------------------------------------------------------------
#: The paper's six orientations (§2.3.2): four rotations and two mirrors.
ORIENTATIONS = ("rot0", "rot90", "rot180", "rot270", "flip_x", "flip_y")


def _check_orientation(orientation):
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; expected one of {ORIENTATIONS}")


def orient_map(a, orientation):
    """Rotate (``rotK``: ``np.rot90`` K/90 times) or mirror (``flip_x``: columns, ``flip_y``:
    rows) the last two axes [y, x] of a scalar map; a view where NumPy can."""
    _check_orientation(orientation)
    if orientation == "flip_x":
        return a[..., :, ::-1]
    if orientation == "flip_y":
        return a[..., ::-1, :]
    return np.rot90(a, ORIENTATIONS.index(orientation), axes=(-2, -1))


def spin2_sign(orientation):
    """(s1, s2): a spin-2 field's (g1, g2) becomes (s1 g1, s2 g2) under ``orientation``."""
    _check_orientation(orientation)
    return {"rot0": (1, 1), "rot90": (-1, -1), "rot180": (1, 1), "rot270": (-1, -1),
            "flip_x": (1, -1), "flip_y": (1, -1)}[orientation]


def orient_shear(g1, g2, orientation):
    """Rotate or mirror a shear field: positions by :func:`orient_map`, components by
    :func:`spin2_sign`."""
    s1, s2 = spin2_sign(orientation)
    return s1 * orient_map(g1, orientation), s2 * orient_map(g2, orientation)


def subfield(grid, mosaic, m_y, m_x, orientation="rot0", config=PAPER, channels=3):
    """One network sample: the 386² input crop at offset index (m_y, m_x) and its 128² target.

    ``grid`` is a gridded catalog (:func:`grid_catalog`), ``mosaic`` the truth on the mosaic
    grid (:func:`mosaic_truth`) or None; ``orientation`` applies to both. ``channels``: 3
    (ε̄1, ε̄2, Δε) or 4 (+ n / the nominal density: the 4Channel variant).

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
    """Gridded input of a cluster record: its stored catalog, or with ``fresh`` a new draw
    from its κ, γ and masks (augmentation beyond the paper, which had one catalog each)."""
    if not fresh:
        return grid_table(cluster["catalog"], config)
    masks = cluster["masks"] if len(cluster["masks"]) else None
    maps = [cluster[k].astype(np.float64) for k in ("kappa", "gamma1", "gamma2")]
    return grid_table(simulate_catalog(*maps, config, rng, masks), config)


def _random_sample(grid, mosaic, rng, config, channels):
    """The subfield of a random offset and orientation, and its target."""
    m_y, m_x = rng.integers(0, config.n_offsets, 2)
    t = ORIENTATIONS[rng.integers(len(ORIENTATIONS))]
    return subfield(grid, mosaic, m_y, m_x, t, config, channels)


def _sample_stream(dataset, split, shard_id, seed, channels, fresh, samples_per_visit):
    """Samples of one shard: each cluster once, in random order, ``samples_per_visit``
    random subfields of one gridding each."""
    # two streams, so that fresh catalogs leave the clusters, offsets and orientations alone
    seq = np.random.SeedSequence(int(seed) & 0x7FFFFFFFFFFFFFFF, spawn_key=(int(shard_id),))
    rng, cat_rng = (np.random.default_rng(s) for s in seq.spawn(2))
    clusters = list(dataset.clusters(split, [int(shard_id)]))
    for i in rng.permutation(len(clusters)):
        grid = cluster_grid(clusters[i], dataset.config, cat_rng, fresh)
        mosaic = mosaic_truth(clusters[i]["kappa"], dataset.config)
        for _ in range(samples_per_visit):
            yield _random_sample(grid, mosaic, rng, dataset.config, channels)


def _dataset(data_dir, config=None):
    return data_dir if isinstance(data_dir, ClusterDataset) else ClusterDataset(data_dir, config)


def fixed_subfields(data_dir, split="val", n=64, seed=0, channels=3, config=None):
    """``n`` subfields of random (cluster, offset, orientation) of ``split``, the same for
    the same arguments: the validation set (§2.3.2). Returns x (n, 386, 386, channels) and
    y (n, 128, 128, 1), float32."""
    ds = _dataset(data_dir, config)
    total = ds.count(split)
    if total == 0 or n < 1:
        raise ValueError(f"no {split} clusters (or n < 1) for a validation set in {ds.path}")
    key = (SPLITS.index(split), 7)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))
    which = np.sort(rng.integers(0, total, n))
    samples = []
    for c in ds.clusters(split):
        for _ in range(int(np.sum(which == c["index"]))):
            grid, mosaic = cluster_grid(c, ds.config), mosaic_truth(c["kappa"], ds.config)
            samples.append(_random_sample(grid, mosaic, rng, ds.config, channels))
    return np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])


def training_data(data_dir, batch_size, seed=0, channels=3, fresh_catalogs=False, n_val=64,
                  split="train", val_split="val", samples_per_visit=4, shuffle_buffer=64,
                  parallel=2, config=None, val_seed=0):
    """The tf.data input pipeline of training (§2.3.2).

    Shards are read in a random order (``seed``), ``parallel`` at once (the gridder runs
    without the GIL, so they overlap on several cores); each cluster visit grids its catalog
    once (a fresh draw with ``fresh_catalogs``) and cuts ``samples_per_visit`` random
    subfields, mixed across clusters in a buffer of ``shuffle_buffer`` samples (1.8 MB each).
    Memory never holds the whole dataset.

    Returns
    -------
    train : tf.data.Dataset
        Infinite stream of float32 batches x (B, 386, 386, C), y (B, 128, 128, 1).
    val : (numpy.ndarray, numpy.ndarray)
        :func:`fixed_subfields` of ``val_split``, ``n_val`` of them, drawn with ``val_seed``
        (not ``seed``): every run and resumption validates on the same subfields.
    """
    ds = _dataset(data_dir, config)
    check_split(split)
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
        return tf.data.Dataset.from_generator(generate, output_signature=sig,
                                              args=(shard_id, stream_seed))

    shard_ids = tf.data.Dataset.range(n_shards).shuffle(n_shards, seed=seed,
                                                        reshuffle_each_iteration=True)
    stream = tf.data.Dataset.zip(shard_ids.repeat(), tf.data.Dataset.random(seed=seed))
    train = (stream.interleave(shard_samples, cycle_length=parallel,
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


# Appendix A. ``filter_size`` None: Config.filter_size (§2.3.2). Input channels: (ε̄1, ε̄2,
# Δε) of §2.3.2, plus the smoothed source density for 4Channel.
VARIANTS = {
    "FocalLoss": dict(channels=3, filter_size=None, skip=True, focal=True),
    "Fiducial":  dict(channels=3, filter_size=None, skip=True, focal=False),
    "4Channel":  dict(channels=4, filter_size=None, skip=True, focal=False),
    "19Filter":  dict(channels=3, filter_size=19, skip=True, focal=False),
    "29Filter":  dict(channels=3, filter_size=29, skip=True, focal=False),
    "NoSkip":    dict(channels=3, filter_size=None, skip=False, focal=False),
    # Beyond the paper: FocalLoss's network and eq. 11-12 plus a term on the aperture mass
    # M_cl (§3.3) about the truth's peak (KappaLoss), weighted by mass_weight.
    "FocalMass": dict(channels=3, filter_size=None, skip=True, focal=True, mass_weight=1.0),
}


def _loss_name(spec):
    """The loss a VARIANTS entry trains with, as model_info records it."""
    return ("focal" if spec["focal"] else "mse") + ("+mass" if spec.get("mass_weight") else "")


# Table 1, column "Multiplied to". Multiply-4 takes Multiply-1, not Multiply-3 as the
# pattern of the rows above it would suggest; we follow the table. The skip tensor is the
# raw Multiply-# output, not its batch-normalised copy: the table names Multiply-# layers
# and lists no BN layer, so BN (§2.3.2: "batch normalization to the output of each
# Multiply-#") sits on the main path only, as in the Keras code the table reads like.
MULTIPLIED_TO = {1: "avgpool", 2: "multiply_1", 3: "multiply_2", 4: "multiply_1"}


INFO_LAYER = "wlcnn_info"


def resolve_conv(conv="auto"):
    """The convolutions of :func:`build_model`: "fft" (FFTConv2D) or "direct" (Keras's).

    "auto" is "fft" on every device: by FFT the cost of a 49 × 49 filter does not grow with
    its area, while a direct layer's backward pass costs ~200 times its forward pass on a
    CPU (``examples/bench_train.py`` times a training step both ways).
    """
    if conv not in ("auto", "fft", "direct"):
        raise ValueError(f"conv must be 'auto', 'fft' or 'direct', got {conv!r}")
    return "fft" if conv == "auto" else conv


@keras.saving.register_keras_serializable(package="wlcnn")
class ModelInfo(keras.layers.Layer):
    """Weightless pass-through layer whose config, ``info``, describes the model (see
    :func:`model_info`), so that the description travels inside every ``.keras`` file."""

    def __init__(self, info, **kwargs):
        super().__init__(**kwargs)
        self.info = dict(info)

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "info": self.info}


def build_model(config=PAPER, variant="FocalLoss", conv="auto"):
    """The uncompiled CNN of Table 1 (channels last), or an Appendix A variant.

    ``variant``: a key of :data:`VARIANTS` ("FocalLoss" is the paper's model); ``conv``: see
    :func:`resolve_conv` (the same weights either way). Input (B, 386, 386, channels) of
    gridded (ε̄1, ε̄2, Δε[, n]), output (B, 128, 128, 1) of κ.

    Notes
    -----
    Conv2D-1 (3 × 3) → AvgPool (3 × 3) → four blocks of TransConv2D-# → Conv2D-# →
    Multiply-# → BatchNorm → TransConv2D-5 → Output, with tanh on every Conv2D-# and
    TransConv2D-# (§2.3.2). The Output layer is linear: the table names it apart from the
    Conv2D-# layers, and κ exceeds 1 in cluster cores, beyond tanh's range. NoSkip drops the
    Multiply layers and keeps the batch normalisation.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {list(VARIANTS)}")
    spec = VARIANTS[variant]
    f = spec["filter_size"] or config.filter_size
    if (config.subfield_npix - config.first_kernel + 1) % config.pool:
        raise ValueError(f"subfield_npix={config.subfield_npix}, first_kernel="
                         f"{config.first_kernel} and pool={config.pool} give no whole "
                         "output grid")
    conv = resolve_conv(conv)
    Conv, TransConv = ((FFTConv2D, FFTConv2DTranspose) if conv == "fft" else
                       (keras.layers.Conv2D, keras.layers.Conv2DTranspose))
    info = dict(format_version=FORMAT_VERSION, variant=variant, channels=spec["channels"],
                filter_size=f, skip=spec["skip"], loss=_loss_name(spec),
                conv=conv, config=config_dict(config))

    L = keras.layers
    n = config.n_filters
    inputs = keras.Input((config.subfield_npix, config.subfield_npix, spec["channels"]),
                         name="input")
    x = ModelInfo(info, name=INFO_LAYER)(inputs)
    # a 3 × 3 filter is cheap directly, and by FFT would need 386² transforms
    x = L.Conv2D(n, config.first_kernel, activation="tanh", name="conv2d_1")(x)
    x = L.AveragePooling2D(config.pool, name="avgpool")(x)
    skips = {"avgpool": x}
    for i in range(1, len(MULTIPLIED_TO) + 1):
        x = TransConv(n, f, activation="tanh", name=f"transconv2d_{i}")(x)
        x = Conv(n, f, activation="tanh", name=f"conv2d_{i + 1}")(x)
        if spec["skip"]:
            x = L.Multiply(name=f"multiply_{i}")([x, skips[MULTIPLIED_TO[i]]])
            skips[f"multiply_{i}"] = x
        x = L.BatchNormalization(name=f"batchnorm_{i}")(x)
    x = TransConv(config.n_filters_final, f, activation="tanh",
                  name=f"transconv2d_{len(MULTIPLIED_TO) + 1}")(x)
    outputs = Conv(1, f, activation=None, name="output")(x)
    return keras.Model(inputs, outputs, name=f"wlcnn_{variant}")


def model_info(model):
    """The description :func:`build_model` stored in ``model``: format_version, variant,
    channels, filter_size, skip, loss ("focal" or "mse"), conv and config (a dict)."""
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
# §2.3.2 The loss (eq. 11-12 and A1) and the optimizer
# ---------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="wlcnn")
class KappaLoss(keras.losses.Loss):
    """Squared error of κ (eq. 11) with the focal weights (eq. 12), or plain (eq. A1), and
    optionally a term on the aperture mass (beyond the paper: the FocalMass variant).

    The outer ``border_pix`` output pixels of each side are not scored (§2.3.2).
    ``call(y_true, y_pred)`` takes (B, N, N[, 1]) maps and returns one value a sample: the
    mean over the scored pixels rather than eq. 11's sum, so that it does not depend on the
    grid; Adam is invariant to the factor (up to its epsilon and ``Config.clipnorm``, which
    are set for the mean).

    Notes
    -----
    With ``mass_weight`` λ > 0 each sample adds λ (κ̄_pred − κ̄_true)², κ̄ the mean κ within
    ``mass_radius_pix`` output pixels of the truth's highest scored pixel: M_cl of §3.3 per
    pixel. A pixel loss alone is minimised by the posterior mean of each pixel, which
    spreads a peak whose position the noise blurs and so moves mass out of the aperture
    that §3.3 measures; the term asks for the aperture mass itself.
    """

    def __init__(self, border_pix=PAPER.loss_border_pix, focal=True,
                 focal_floor=PAPER.focal_floor, mass_weight=0.0, mass_radius_pix=None,
                 name=None, **kwargs):
        if mass_weight < 0 or (mass_weight > 0 and not (mass_radius_pix or 0) > 0):
            raise ValueError("mass_weight must be >= 0, and > 0 only with a positive "
                             f"mass_radius_pix; got {mass_weight}, {mass_radius_pix}")
        default = ("focal" if focal else "mse") + ("_mass" if mass_weight else "") + "_loss"
        super().__init__(name=name or default, **kwargs)
        self.border_pix = int(border_pix)
        self.focal = bool(focal)
        self.focal_floor = float(focal_floor)
        self.mass_weight = float(mass_weight)
        self.mass_radius_pix = None if mass_radius_pix is None else float(mass_radius_pix)

    def call(self, y_true, y_pred):
        t, p = _scored_window(y_true, self.border_pix), _scored_window(y_pred, self.border_pix)
        t = tf.cast(t, p.dtype)
        err = tf.square(p - t)
        if self.focal:
            # eq. 12: w = 1 + |κ| / max(κ) over the sample's scored window. A window that
            # misses the cluster has max(κ) near zero or negative, and the literal weights
            # blow up and make training diverge: the denominator is max(max|κ|,
            # focal_floor), so 1 <= w <= 2.
            a = tf.abs(t)
            peak = tf.reduce_max(a, axis=(1, 2), keepdims=True)
            err = (1.0 + a / tf.maximum(peak, self.focal_floor)) * err
        loss = tf.reduce_mean(err, axis=(1, 2))
        if self.mass_weight:
            inside = _aperture_about_peak(t, self.mass_radius_pix)
            mean_in = lambda k: tf.reduce_sum(inside * k, (1, 2)) / tf.reduce_sum(inside, (1, 2))
            loss = loss + self.mass_weight * tf.square(mean_in(p) - mean_in(t))
        return loss

    def get_config(self):
        return {**super().get_config(), "border_pix": self.border_pix,
                "focal": self.focal, "focal_floor": self.focal_floor,
                "mass_weight": self.mass_weight, "mass_radius_pix": self.mass_radius_pix}


def _aperture_about_peak(maps, radius_pix):
    """(B, N, M) -> (B, N, M) of 1 within ``radius_pix`` of each map's highest pixel, else 0
    (:func:`aperture_mass`'s disk; the first highest pixel where several tie)."""
    n, m = maps.shape[1], maps.shape[2]
    at = tf.argmax(tf.reshape(maps, (-1, n * m)), axis=1, output_type=tf.int32)
    row, col = (tf.cast(v, maps.dtype)[:, None, None] for v in (at // m, at % m))
    yy = tf.cast(tf.range(n), maps.dtype)[None, :, None]
    xx = tf.cast(tf.range(m), maps.dtype)[None, None, :]
    return tf.cast((yy - row) ** 2 + (xx - col) ** 2 <= radius_pix ** 2, maps.dtype)


def _scored_window(maps, border):
    """(B, N, N[, 1]) -> (B, N - 2 border, N - 2 border)."""
    maps = tf.convert_to_tensor(maps)
    if maps.shape.rank == 4:
        maps = maps[..., 0]
    n, m = maps.shape[1], maps.shape[2]
    return maps[:, border:n - border, border:m - border]


def make_loss(config=PAPER, variant="FocalLoss"):
    """The :class:`KappaLoss` of ``variant``: focal for FocalLoss, plain for the Appendix A
    variants, focal plus the aperture-mass term for FocalMass."""
    spec = VARIANTS[variant]
    return KappaLoss(config.loss_border_pix, spec["focal"], config.focal_floor,
                     spec.get("mass_weight", 0.0), MASS_RADIUS_PIX)


def compile_model(model, config=PAPER, variant=None, learning_rate=None):
    """Compile ``model`` with Adam (§2.3.2) and the loss of ``variant`` (default: the model's).

    ``learning_rate`` (a number or a Keras schedule) defaults to ``config.learning_rate``;
    the gradient norm is clipped at ``config.clipnorm``, which the focal loss needs.
    """
    variant = variant or model_info(model)["variant"]
    lr = config.learning_rate if learning_rate is None else learning_rate
    # A loss beyond eq. 11-12 also logs eq. 12 itself ("val_focal_loss" in history.csv),
    # the number that compares it with the paper's loss.
    extra = ([KappaLoss(config.loss_border_pix, True, config.focal_floor)]
             if VARIANTS[variant].get("mass_weight") else [])
    model.compile(optimizer=keras.optimizers.Adam(lr, clipnorm=config.clipnorm),
                  loss=make_loss(config, variant), metrics=extra)
    return model


# ---------------------------------------------------------------------------
# §3 Mosaics: every subfield's prediction on the full-field output grid
# ---------------------------------------------------------------------------
#: The orientation that undoes each of :data:`ORIENTATIONS` (90° ↔ 270°; a mirror itself).
INVERSE_ORIENTATION = {"rot0": "rot0", "rot90": "rot270", "rot180": "rot180",
                       "rot270": "rot90", "flip_x": "flip_x", "flip_y": "flip_y"}


#: Subfields predicted at once by default: on a CPU a batch of 16 predicts ~3× faster a
#: subfield than one at a time (``examples/bench_inference.py``), and wastes little on the
#: zero-padded last batch of a 100-subfield mosaic.
MOSAIC_BATCH = 16


def mosaic_offsets(config=PAPER, stride=None):
    """Offset indices m (one axis) of a mosaic's subfields, one every ``stride`` input pixels.

    ``stride`` is a multiple of ``offset_step``; the default, ``offset_step``, gives the
    paper's 38 a side (1,444 in all, §2.3.2); 12 gives 10 a side.
    """
    step = config.offset_step
    stride = step if stride is None else int(stride)
    if stride < step or stride % step:
        raise ValueError(f"stride must be a positive multiple of {step} input pixels, "
                         f"got {stride}")
    return np.arange(0, config.n_offsets, stride // step)


def mosaic_orientations(orientations=6):
    """The orientations a mosaic averages, from 1 (as observed), 6 (the paper's, §2.3.2) or
    distinct names of :data:`ORIENTATIONS`."""
    if isinstance(orientations, (int, np.integer)) and not isinstance(orientations, bool):
        if orientations == 1:
            return ("rot0",)
        if orientations == len(ORIENTATIONS):
            return ORIENTATIONS
        raise ValueError(f"orientations must be 1 or {len(ORIENTATIONS)} (or names), "
                         f"got {orientations}")
    names = (orientations,) if isinstance(orientations, str) else tuple(orientations)
    bad = [t for t in names if t not in ORIENTATIONS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"orientations must be distinct names from {ORIENTATIONS}, "
                         f"got {names}")
    return names


def _check_border(border_pix, config):
    border = config.loss_border_pix if border_pix is None else int(border_pix)
    if not 0 <= border < config.output_npix // 2:
        raise ValueError(f"border_pix must be in [0, {config.output_npix // 2}), got {border}")
    return border


def mosaic_coverage(config=PAPER, stride=None, border_pix=None):
    """How many subfields of one orientation predict each mosaic pixel (see
    :func:`predict_mosaic`). With the paper's offsets and border the covered square is
    mosaic pixels [14, 151), 26.3′ a side (the paper shows "the central 26.6′", Fig. 2)."""
    border = _check_border(border_pix, config)
    line = np.zeros(config.mosaic_npix, dtype=np.int64)
    for m in mosaic_offsets(config, stride):
        line[m + border:m + config.output_npix - border] += 1
    return np.outer(line, line)


def _predictor(predict_fn, batch_size):
    """A batch predictor from a Keras model or a callable. A model runs ``predict_on_batch``
    on batches zero-padded to ``batch_size``, so a shorter last batch traces no new graph."""
    if isinstance(predict_fn, keras.Model):
        def run(x):
            b = len(x)
            if b < batch_size:
                x = np.concatenate([x, np.zeros((batch_size - b,) + x.shape[1:], x.dtype)])
            return np.asarray(predict_fn.predict_on_batch(x))[:b]
        return run
    if not callable(predict_fn):
        raise TypeError("predict_fn must be a keras.Model or a callable on batches of "
                        "subfields")
    return predict_fn


def predict_mosaic(predict_fn, grid, config=PAPER, stride=None, orientations=6, channels=None,
                   batch_size=MOSAIC_BATCH, border_pix=None):
    """Average the predictions of every (offset, orientation) subfield on the mosaic grid (§3).

    ``predict_fn`` is a Keras model or a callable from float32 subfields (B, 386, 386, C) to
    κ (B, 128, 128[, 1]); ``grid`` a gridded catalog (:func:`grid_catalog`). ``stride`` and
    ``orientations``: :func:`mosaic_offsets`, :func:`mosaic_orientations`. ``channels``:
    default the model's, else 3. ``border_pix``: output pixels left out on each side, default
    the loss's, since "the convergence estimates near the field boundary can easily be
    influenced by the nonvanishing filter size" (§2.3.2).

    Returns the mean κ (NaN where no subfield reaches) and the number of predictions in each
    pixel. Each prediction's orientation is undone first. The paper's 8,664 predictions all
    come from one catalog: their mean has no less noise than one of them (§3, footnote 2).
    """
    means, count = _mosaics([predict_fn], grid, config, stride, orientations, channels,
                            batch_size, border_pix)
    return means[0], count


def _mosaics(predict_fns, grid, config, stride, orientations, channels, batch_size,
             border_pix):
    """Mosaics of several predictors in one pass over the subfields (each cut once)."""
    offsets = mosaic_offsets(config, stride)
    orients = mosaic_orientations(orientations)
    border = _check_border(border_pix, config)
    if channels is None:
        first = predict_fns[0]
        channels = first.input_shape[-1] if isinstance(first, keras.Model) else 3
    channels = int(channels)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    grid = np.asarray(grid)
    if grid.ndim != 3 or grid.shape[0] < channels or grid.shape[1:] != (config.npix,) * 2:
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
        x = np.stack([subfield(grid, None, my, mx, t, config, channels)[0]
                      for my, mx, t in chunk])
        for r, run in enumerate(runs):
            y = np.asarray(run(x), dtype=np.float64)
            if y.shape[:3] != (len(chunk), o, o) or y.ndim not in (3, 4):
                raise ValueError(f"predict_fn returned shape {y.shape} for {len(chunk)} "
                                 f"subfields; expected ({len(chunk)}, {o}, {o}, 1)")
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
    """MosaicRuns of K runs' maps (K, n, n); the spread of one run is 0 (NaN uncovered)."""
    std = runs.std(axis=0, ddof=1) if len(runs) > 1 else np.where(np.isnan(runs[0]), np.nan, 0.0)
    return MosaicRuns(runs.mean(axis=0), std, count, runs)


def predict_mosaic_runs(models, grid, config=PAPER, **kwargs):
    """Mosaics of the K independently trained runs, their mean and standard deviation.

    §2.3.2: "the standard deviations from the 10 runs are used as error estimates" (Fig. 11).
    ``kwargs``: stride, orientations, channels, batch_size, border_pix of
    :func:`predict_mosaic`; each subfield is cut once for every run.
    """
    models = list(models)
    if not models:
        raise ValueError("no models")
    kw = dict(stride=None, orientations=6, channels=None, batch_size=MOSAIC_BATCH,
              border_pix=None)
    unknown = set(kwargs) - set(kw)
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}")
    kw.update(kwargs)
    return _mosaic_runs(*_mosaics(models, grid, config, **kw))


# ---------------------------------------------------------------------------
# §3 The KS93 baseline on the same gridded catalogs
# ---------------------------------------------------------------------------
#: FWHMs (arcmin) offered to the validation choice of the KS93 smoothing.
KS93_FWHM_GRID = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


def smooth_map(kappa, fwhm_arcmin, config=PAPER):
    """Gaussian smoothing of an input-grid map (FWHM in arcmin; 0: unchanged).

    The boundary mirrors the map, so that the edge is not diluted towards κ = 0.
    """
    if fwhm_arcmin < 0:
        raise ValueError(f"fwhm_arcmin must be >= 0, got {fwhm_arcmin}")
    kappa = np.asarray(kappa, dtype=np.float64)
    if fwhm_arcmin == 0:
        return kappa
    sigma_pix = fwhm_arcmin * 60.0 / config.pixel_arcsec / FWHM_PER_SIGMA
    return scipy.ndimage.gaussian_filter(kappa, sigma_pix, mode="reflect")


def ks93_mosaic(grid, config=PAPER, fwhm_arcmin=0.0):
    """The KS93 baseline on the mosaic grid: :func:`ks93` of the gridded ε̄1, ε̄2, smoothed
    (:func:`smooth_map`; the paper gives no FWHM: :func:`choose_ks93_smoothing`), then
    averaged over the blocks of :func:`mosaic_truth`, so it shares the truth's pixels."""
    grid = np.asarray(grid)
    return mosaic_truth(smooth_map(ks93(grid[0], grid[1]), fwhm_arcmin, config), config)


# ---------------------------------------------------------------------------
# §3.2-3.4 The paper's metrics: R, D (eq. 13-16), M_cl and Δ_peak
# ---------------------------------------------------------------------------
METRIC_BINS = 50            # histogram bins of the weights (§3.2)


CLIP_SIGMA = 3.0            # clipping of R (§3.2)


CLIP_MAX_ITER = 100         # cap on the clipping iterations


MASS_RADIUS_PIX = 10        # aperture of M_cl: 10 mosaic pixels = 1.92′ (§3.3)


CENTROID_WINDOW_PIX = 21    # top-hat window of the centroid, 21 × 21 pixels (§3.4)

# A catastrophic centroid (Figs. 7-8): Δ_peak beyond 10 mosaic pixels (1.9′), where the
# paper's CNN centroids of its lightest clusters end (§3.4); the paper shows KS93's
# catastrophic errors at ≳ 50 pixels but gives no threshold, so the stricter one is ours.
CATASTROPHIC_PIX = 10.0


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
        raise ValueError(f"{name} must be a map (ny, nx) or a list of maps (n, ny, nx), "
                         f"got shape {a.shape}")
    return a


def _evaluated_pixels(truth_maps, pred_maps):
    """Truth and prediction maps (n, ny, nx), both NaN where either is: every metric uses
    only the pixels evaluated in both."""
    t = _stack_maps(truth_maps, "truth_maps")
    p = _stack_maps(pred_maps, "pred_maps")
    if t.shape != p.shape:
        raise ValueError(f"truth and prediction maps differ in shape: {t.shape} vs {p.shape}")
    ok = np.isfinite(t) & np.isfinite(p)
    return np.where(ok, t, np.nan), np.where(ok, p, np.nan)


def _histogram_weights(values, bins=METRIC_BINS):
    """Weights ω = 1 / f(value), f the ``bins``-bin histogram density of ``values`` (eq. 16).

    The histogram keeps ω finite where the density of the truth is noisy (§3.2).
    """
    density, edges = np.histogram(values, bins=bins, density=True)
    idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    return 1.0 / density[idx]  # every occupied bin has density > 0


def _weighted_mean_std(x, w):
    mean = np.sum(w * x) / np.sum(w)
    return mean, np.sqrt(np.sum(w * (x - mean) ** 2) / np.sum(w))


def metric_R(truth_maps, pred_maps, bins=METRIC_BINS, clip_sigma=CLIP_SIGMA,
             max_iter=CLIP_MAX_ITER):
    """R, the weighted mean of κ_pred/κ_truth, clipped at 3σ, and its weighted std (eq. 14).

    Over every pixel evaluated in both maps (NaN: not evaluated) of every cluster, pooled,
    with :func:`_histogram_weights` of κ_truth, so that each range of κ_truth counts alike
    rather than the many pixels near zero. The pixels within ``clip_sigma`` weighted stds of
    the previous weighted mean are kept until the kept set no longer changes (§3.2). Pixels
    with κ_truth = 0 have no ratio. 1 is perfect; Table 2: "0.407 ± 0.288".
    """
    t, p = _evaluated_pixels(truth_maps, pred_maps)
    ok = np.isfinite(t)
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
    """κ̃ = (κ − ⟨κ⟩) / Δκ, mean and std (ddof = 0) over the finite pixels of a map (eq. 13).

    NaN pixels stay NaN; a constant map has no scale, and its κ̃ is 0.
    """
    kappa = np.asarray(kappa, dtype=np.float64)
    mean, std = np.nanmean(kappa), np.nanstd(kappa)
    return (kappa - mean) / std if std > 0 else np.where(np.isnan(kappa), np.nan, 0.0)


def metric_D(truth_maps, pred_maps, bins=METRIC_BINS):
    """D, the weighted mean of |κ̃_pred − κ̃_truth|, and its weighted std (eq. 15).

    Each map is normalised (:func:`normalized_kappa`) over the pixels evaluated in both maps
    of its pair; the weights are :func:`_histogram_weights` of κ̃_truth over all clusters;
    no clipping (§3.2 clips R only). D ignores the amplitude and the mass sheet: 0 is
    perfect; Table 2: "4.36 ± 3.77".
    """
    t, p = _evaluated_pixels(truth_maps, pred_maps)
    tt, pp = [], []
    for ti, pi in zip(t, p):
        ok = np.isfinite(ti)
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
    """M_cl (§3.3): Σ κ over the pixels whose centre lies within ``radius_pix`` of ``centre``
    (row, col); NaN pixels add nothing. × Σ_c × pixel area gives a projected mass."""
    kappa = np.asarray(kappa, dtype=np.float64)
    yy, xx = np.indices(kappa.shape)
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius_pix ** 2
    return float(np.nansum(kappa[inside]))


def _percentile_stat(values, percentiles=PERCENTILES):
    values = np.asarray(values, dtype=np.float64)
    lo, med, hi = np.percentile(values, [percentiles[0], 50.0, percentiles[1]])
    return PercentileStat(float(med), float(med - lo), float(hi - med), values)


def cluster_masses(truth_maps, pred_maps, radius_pix=MASS_RADIUS_PIX):
    """M_cl of truth and prediction of each cluster, both about the truth's highest pixel,
    over the pixels evaluated in both maps (§3.3): two arrays (n,)."""
    t, p = _evaluated_pixels(truth_maps, pred_maps)
    centres = [peak_pixel(ti) for ti in t]
    m_t = np.array([aperture_mass(ti, c, radius_pix) for ti, c in zip(t, centres)])
    m_p = np.array([aperture_mass(pi, c, radius_pix) for pi, c in zip(p, centres)])
    return m_t, m_p


def mass_ratio(truth_maps, pred_maps, radius_pix=MASS_RADIUS_PIX, percentiles=PERCENTILES):
    """Median of M_pred / M_truth over clusters with its 16th and 84th percentiles (§3.3;
    Table 2: "0.867 +0.327 −0.296")."""
    m_t, m_p = cluster_masses(truth_maps, pred_maps, radius_pix)
    return _percentile_stat(m_p / m_t, percentiles)


def peak_centroid(kappa, window_pix=CENTROID_WINDOW_PIX):
    """(row, col) of a map's peak: the first moment of κ in the ``window_pix``² top-hat
    window about its highest pixel (§3.4).

    Where the window holds negative κ its minimum is subtracted first ("rescaled ... such
    that the minimum value within the window becomes zero"), so every weight is ≥ 0 and the
    centroid stays in the window. NaN pixels weigh nothing. A window clipped by the map's
    edge pulls the centroid inwards. A window with no weight returns the highest pixel.
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
    """Δ_peak of each cluster (§3.4): the distance in mosaic pixels between the centroids
    (:func:`peak_centroid`) of prediction and truth, over the pixels evaluated in both."""
    t, p = _evaluated_pixels(truth_maps, pred_maps)
    out = np.empty(len(t))
    for i, (ti, pi) in enumerate(zip(t, p)):
        ct, cp = peak_centroid(ti, window_pix), peak_centroid(pi, window_pix)
        out[i] = np.hypot(ct[0] - cp[0], ct[1] - cp[1])
    return out


def centroid_offset(truth_maps, pred_maps, window_pix=CENTROID_WINDOW_PIX,
                    percentiles=PERCENTILES):
    """Median Δ_peak over clusters with its 16th and 84th percentiles, in mosaic pixels
    (§3.4; Table 2: "3.10 +25.64 −2.00")."""
    return _percentile_stat(centroid_offsets(truth_maps, pred_maps, window_pix), percentiles)


def paper_metrics(truth_maps, pred_maps):
    """The four metrics of Table 2 as a row dict (see :data:`TABLE2_COLUMNS`)."""
    t, p = _evaluated_pixels(truth_maps, pred_maps)
    r, d = metric_R(t, p), metric_D(t, p)
    m, dp = mass_ratio(t, p), centroid_offset(t, p)
    return {"R": r.value, "R_err": r.err, "D": d.value, "D_err": d.err,
            "M_ratio": m.value, "M_minus": m.minus, "M_plus": m.plus,
            "dpeak": dp.value, "dpeak_minus": dp.minus, "dpeak_plus": dp.plus,
            "n_clusters": len(t)}


# ---------------------------------------------------------------------------
# §3 The KS93 smoothing, chosen on the validation set
# ---------------------------------------------------------------------------
#: Each metric as a loss (0 is perfect) for the "rank_sum" criterion: R and M_cl are ratios
#: whose ideal is 1, so their distance from 1 counts in log (×2 and ×½ are equally wrong).
SMOOTHING_LOSSES = {
    "R": lambda row: abs(np.log(row["R"])) if row["R"] > 0 else np.inf,
    "D": lambda row: row["D"],
    "M_ratio": lambda row: abs(np.log(row["M_ratio"])) if row["M_ratio"] > 0 else np.inf,
    "dpeak": lambda row: row["dpeak"],
}


def _default_grid_fn(grid_fn, config):
    return (lambda c: grid_table(c["catalog"], config)) if grid_fn is None else grid_fn


def choose_ks93_smoothing(val_clusters, grid_fn=None, fwhm_grid=KS93_FWHM_GRID,
                          criterion="rank_sum", config=PAPER, mask=None, limit=None,
                          progress=False):
    """Choose the KS93 smoothing FWHM (arcmin) on validation clusters by Table 2's metrics.

    ``grid_fn(cluster)`` grids a cluster (default: its stored catalog); ``mask``: the
    mosaic pixels scored, default those the CNN's mosaic covers; ``limit``: use the first
    ``limit`` clusters (each holds 8 × 166² × (1 + len(fwhm_grid)) bytes). "rank_sum" ranks
    the candidates on each metric's loss (:data:`SMOOTHING_LOSSES`) and takes the smallest
    sum of ranks, ties to the smaller D; a metric's name minimises that loss alone. Returns
    the FWHM and one row a candidate (its metrics, ranks and ``chosen``).

    Notes
    -----
    Pixel correlation would reward the removal of noise and never the peak, and so pick the
    widest kernel offered. The paper's metrics pull apart instead: smoothing flattens the
    cluster (R and M_cl fall away from 1) and removes noise peaks (Δ_peak and D improve,
    until D sees the peak flattened too). Ranks put a ratio, a normalised difference and a
    distance on one footing without choosing units between them.
    """
    if criterion != "rank_sum" and criterion not in SMOOTHING_LOSSES:
        raise ValueError(f"criterion must be 'rank_sum' or one of {list(SMOOTHING_LOSSES)}, "
                         f"got {criterion!r}")
    fwhm_grid = [float(f) for f in fwhm_grid]
    if not fwhm_grid:
        raise ValueError("empty fwhm_grid")
    grid_fn = _default_grid_fn(grid_fn, config)
    mask = (mosaic_coverage(config) > 0) if mask is None else np.asarray(mask, dtype=bool)
    truths, maps = [], {f: [] for f in fwhm_grid}
    bar = Progress(limit, "ks93 smoothing") if progress and limit else None
    for cluster in val_clusters:
        if limit is not None and len(truths) >= limit:
            break
        grid = np.asarray(grid_fn(cluster))
        kappa_e = ks93(grid[0], grid[1])  # once; only the smoothing changes
        truth = mosaic_truth(np.asarray(cluster["kappa"], np.float64), config)
        truths.append(np.where(mask, truth, np.nan))
        for f in fwhm_grid:
            kappa = mosaic_truth(smooth_map(kappa_e, f, config), config)
            maps[f].append(np.where(mask, kappa, np.nan))
        if bar:
            bar.update()
    if not truths:
        raise ValueError("no validation clusters")
    rows = [{"fwhm_arcmin": f, **paper_metrics(truths, maps[f])} for f in fwhm_grid]
    for name, fn in SMOOTHING_LOSSES.items():
        v = np.nan_to_num([fn(row) for row in rows], nan=np.inf, posinf=np.inf)
        # rank 1 is the smallest loss; ties share the mean of their ranks
        ranks = (v[:, None] > v).sum(axis=1) + ((v[:, None] == v).sum(axis=1) + 1) / 2
        for row, rank in zip(rows, ranks):
            row[f"rank_{name}"] = float(rank)
    for row in rows:
        row["rank_sum"] = sum(row[f"rank_{name}"] for name in SMOOTHING_LOSSES)
    if criterion == "rank_sum":
        key = [(row["rank_sum"], row["D"]) for row in rows]
    else:
        key = [(SMOOTHING_LOSSES[criterion](row), 0.0) for row in rows]
    best = min(range(len(rows)), key=lambda i: key[i])
    for i, row in enumerate(rows):
        row["chosen"] = i == best
    return fwhm_grid[best], rows


# ---------------------------------------------------------------------------
# §3 Evaluating methods on a test set; Table 2
# ---------------------------------------------------------------------------
#: Columns of table2.csv, in order.
TABLE2_COLUMNS = ("method", "R", "R_err", "D", "D_err", "M_ratio", "M_minus", "M_plus",
                  "dpeak", "dpeak_minus", "dpeak_plus", "n_clusters")


def _paper_row(r, r_err, d, d_err, m, m_plus, m_minus, dp, dp_plus, dp_minus):
    return {"R": r, "R_err": r_err, "D": d, "D_err": d_err, "M_ratio": m, "M_minus": m_minus,
            "M_plus": m_plus, "dpeak": dp, "dpeak_minus": dp_minus, "dpeak_plus": dp_plus,
            "n_clusters": 200}


#: Table 2 of the paper (200 test clusters of MassiveNuS; ours differ in truth).
PAPER_TABLE2 = {
    "KS93": _paper_row(0.253, 0.131, 6.26, 4.57, 0.484, 0.218, 0.149, 22.26, 44.94, 20.55),
    "CNN": _paper_row(0.407, 0.288, 4.36, 3.77, 0.867, 0.327, 0.296, 3.10, 25.64, 2.00),
    "CNN-BS": _paper_row(0.276, 0.179, 3.66, 3.22, 0.554, 0.257, 0.211, 7.95, 21.94, 5.94),
}


@dataclass
class Evaluation:
    """Truth and every method's mosaics of a set of clusters (:func:`evaluate_methods`),
    each (n, mosaic_npix, mosaic_npix) and NaN outside the pixels evaluated."""
    truth: np.ndarray       # :func:`mosaic_truth` of each cluster
    maps: dict              # method -> its mosaics (the mean over runs where it has several)
    run_std: dict           # method -> std over runs, for the methods that return runs
    run_mass_std: dict      # method -> std over runs of M_cl, (n,) (Fig. 6's error bars)
    star_mask: np.ndarray   # bool: mosaic pixels inside a bright-star mask (§3.5)
    index: np.ndarray       # (n,) the clusters' indices in their split
    config: object = PAPER

    @property
    def methods(self):
        """Method names, in the order they were given."""
        return list(self.maps)


def star_mask_mosaic(masks, config=PAPER):
    """Mosaic pixels (bool, mosaic_npix²) whose centre lies inside any bright-star mask
    (columns x, y, radius in arcsec)."""
    n = config.mosaic_npix
    out = np.zeros((n, n), dtype=bool)
    if masks is None or len(masks) == 0:
        return out
    centres = _mosaic_centres(config)
    for x, y, r in zip(masks["x"], masks["y"], masks["radius"]):
        out |= (centres[:, None] - y) ** 2 + (centres[None, :] - x) ** 2 <= r**2
    return out


def evaluate_methods(clusters, methods, config=PAPER, grid_fn=None, total=None, progress=True):
    """Truth and every method's mosaic of each cluster, on common pixels.

    ``clusters``: records (``ClusterDataset.clusters("test")``), read once, one at a time;
    ``methods``: name → ``fn(grid)``, the gridded catalog to a mosaic (NaN where it has no
    estimate) or to K runs' mosaics (:func:`cnn_method`); ``grid_fn``: as
    :func:`choose_ks93_smoothing`; ``total``: the number of clusters, for the progress bar.
    A pixel is evaluated where the truth and every method are finite, and NaN in every map
    elsewhere: the CNN's mosaic fixes the region, and the baselines are cut to it.
    """
    if not methods:
        raise ValueError("no methods to evaluate")
    grid_fn = _default_grid_fn(grid_fn, config)
    if total is None and hasattr(clusters, "__len__"):
        total = len(clusters)
    bar = Progress(total, "evaluate") if progress and total else None
    n = config.mosaic_npix
    truths, index, stars = [], [], []
    maps, stds, mass_std = ({name: [] for name in methods} for _ in range(3))
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
            raise ValueError(f"cluster {cluster.get('index')}: no pixel is evaluated by "
                             "every method")
        truth = np.where(ok, truth, np.nan)
        centre = peak_pixel(truth)
        for name, out in outs.items():
            runs = out if out.ndim == 3 else out[None]
            maps[name].append(np.where(ok, runs.mean(axis=0), np.nan))
            if out.ndim == 3:
                spread = runs.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros((n, n))
                stds[name].append(np.where(ok, spread, np.nan))
                masses = [aperture_mass(np.where(ok, run, np.nan), centre) for run in runs]
                mass_std[name].append(np.std(masses, ddof=1) if len(runs) > 1 else 0.0)
        truths.append(truth)
        index.append(int(cluster.get("index", len(index))))
        stars.append(star_mask_mosaic(cluster.get("masks"), config))
        if bar:
            bar.update()
    if not truths:
        raise ValueError("no clusters to evaluate")
    has_runs = [name for name in methods if len(stds[name]) == len(truths)]
    return Evaluation(
        truth=np.stack(truths), maps={name: np.stack(v) for name, v in maps.items()},
        run_std={name: np.stack(stds[name]) for name in has_runs},
        run_mass_std={name: np.asarray(mass_std[name]) for name in has_runs},
        star_mask=np.stack(stars), index=np.asarray(index), config=config)


def cnn_method(models, config=PAPER, **kwargs):
    """A method for :func:`evaluate_methods`: the K runs' mosaics of
    :func:`predict_mosaic_runs` (``kwargs`` as there)."""
    models = list(models)
    return lambda grid: predict_mosaic_runs(models, grid, config, **kwargs).runs


def table2(results, methods=None):
    """Table 2: one row (:data:`TABLE2_COLUMNS`) of the four metrics for each of ``methods``
    (default all) of an :class:`Evaluation`."""
    methods = results.methods if methods is None else list(methods)
    return [{"method": name, **paper_metrics(results.truth, results.maps[name])}
            for name in methods]


#: Scores of :func:`bootstrap_scores`: Table 2's four, the fraction of catastrophic
#: centroids, and the median M_pred/M_truth of the lightest clusters.
BOOTSTRAP_SCORES = ("R", "D", "M_ratio", "dpeak", "cat10", "M_low")

#: "M_low" of :func:`bootstrap_scores`: the lightest fifth of the clusters by the truth's
#: M_cl, the bins of evaluate_table2.py's mass_bias.csv.
LIGHT_FRACTION = 0.2


def bootstrap_scores(results, n_boot, rng, methods=None, light_fraction=LIGHT_FRACTION,
                     progress=False):
    """:data:`BOOTSTRAP_SCORES` of ``methods`` (default all) of an :class:`Evaluation` on its
    clusters and on ``n_boot`` resamplings of them with replacement, the same resamplings
    for every method: name -> {score: array (n_boot + 1,)}, entry 0 the clusters themselves.

    "M_low" is over the ``light_fraction`` of the clusters lightest in the truth's M_cl.

    Notes
    -----
    Beyond the paper (Table 2 gives spreads over clusters, not errors). R and D pool the
    pixels of all clusters and M and Δ_peak are medians, so neither a score's error nor a
    difference between methods has a per-cluster form; each score is recomputed on every
    resampling instead. Differences taken draw by draw are paired: the clusters hard for
    one method are hard for all. M_cl and Δ_peak of each cluster are computed once.
    """
    methods = results.methods if methods is None else list(methods)
    truth, n = results.truth, len(results.truth)
    m_truth, _ = cluster_masses(truth, truth)
    light = m_truth <= np.quantile(m_truth, light_fraction)
    per_cluster = {}
    for name in methods:
        m_t, m_p = cluster_masses(truth, results.maps[name])
        per_cluster[name] = (m_p / m_t, centroid_offsets(truth, results.maps[name]))
    draws = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(int(n_boot))]
    scores = {name: {k: [] for k in BOOTSTRAP_SCORES} for name in methods}
    bar = Progress(len(draws), "bootstrap") if progress else None
    for idx in draws:
        for name in methods:
            t, p = truth[idx], results.maps[name][idx]
            ratio, dpeak = (v[idx] for v in per_cluster[name])
            low = light[idx]
            for k, v in (("R", metric_R(t, p).value), ("D", metric_D(t, p).value),
                         ("M_ratio", np.median(ratio)), ("dpeak", np.median(dpeak)),
                         ("cat10", np.mean(dpeak > CATASTROPHIC_PIX)),
                         ("M_low", np.median(ratio[low]) if low.any() else np.nan)):
                scores[name][k].append(float(v))
        if bar:
            bar.update()
    return {name: {k: np.array(v) for k, v in s.items()} for name, s in scores.items()}


# ===========================================================================
# Machinery: running the method at scale
#
# Nothing below is the paper's method: files written whole or not at all, dataset
# files, saved models, the KS93 start of the weights, run files read back, and
# evaluations kept on disk. The training loop and its checkpoints (run directories,
# resumption) are examples/train.py's.
# ===========================================================================

# ---------------------------------------------------------------------------
# Files written whole or not at all, and a progress bar
# ---------------------------------------------------------------------------
#: Name prefix of the hidden temporaries written before a rename: a resumed run
#: removes the ones a writer killed mid-write left behind.
TMP_PREFIX = ".tmp-"


def atomic_write(path, write):
    """Call ``write(tmp_path)`` then rename: a file is complete or absent.

    The temporary file is hidden and ends as ``path`` does, for writers that
    read the format from the name (Keras, matplotlib)."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` whole or not at all (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path):
    """The JSON file at ``path`` (a run.json, a manifest), or None if there is none."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def file_sha256(path):
    """The SHA-256 hex digest of a file (a dataset manifest's record of each shard)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Progress:
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


# ---------------------------------------------------------------------------
# Dataset files: shards of clusters and their manifest (read side; they are written
# by examples/simulate_skies.py)
# ---------------------------------------------------------------------------
#: Splits of a dataset, in the order their seeds and shards are numbered.
SPLITS = ("train", "val", "test")


#: Config fields that define a dataset's content (the network's fields do not).
DATA_FIELDS = ("H0", "Om0", "z_lens", "z_source", "field_arcmin", "npix", "fwhm_arcsec",
               "kernel_cut_sigma", "empty_pixel_error", "source_density_arcmin2", "sigma_e",
               "mag_min", "mag_peak", "mag_max", "count_slope", "completeness_width_mag",
               "sigma_meas_floor", "sigma_meas_at_cut", "stars_per_400arcmin2",
               "star_radius_arcmin", "star_near_peak_arcmin")


DATASET_FORMAT = "wlcnn-dataset"


DATASET_VERSION = 1


CATALOG_COLUMNS = ("x", "y", "mag", "sigma", "e1", "e2")


MASK_COLUMNS = ("x", "y", "radius")


def data_config(config):
    """The data-defining part of a Config, as JSON would write it: the ``config`` of a
    dataset's manifest, which :class:`ClusterDataset` compares with the model's."""
    return json.loads(json.dumps({k: getattr(config, k) for k in DATA_FIELDS}))


def check_split(split):
    """``split`` if it is one of :data:`SPLITS`, else ValueError."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def cluster_rng(seed, split, index):
    """The random generator of cluster ``index`` of ``split``.

    It depends on (seed, split, index) alone, so a cluster is the same whichever shard, job
    or worker makes it.
    """
    key = (SPLITS.index(check_split(split)), int(index))
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


class ClusterDataset:
    """Read access to a dataset of ``simulate_skies.write_dataset`` (examples/).

    With ``config``, the dataset must have been made with the same data fields (ValueError
    otherwise); ``verify`` checks each shard's SHA-256 as it is loaded.
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
        if (self.manifest.get("format") != DATASET_FORMAT
                or self.manifest.get("version") != DATASET_VERSION):
            raise ValueError(f"{self.path}: not a wlcnn dataset of format version "
                             f"{DATASET_VERSION}")
        stored = self.manifest["config"]
        self.config = config_from_dict(stored)  # the other fields: the paper's
        if config is not None and data_config(config) != stored:
            diff = [k for k in DATA_FIELDS if data_config(config)[k] != stored[k]]
            raise ValueError(f"{self.path} was made with another config "
                             f"(differs in {', '.join(diff)})")
        self.verify = verify

    def count(self, split):
        """Number of clusters in ``split``."""
        return int(self.manifest["counts"][check_split(split)])

    def shards(self, split):
        """The shard entries (file, first, n, sha256) of ``split``."""
        return self.manifest["shards"][check_split(split)]

    def load_shard(self, split, k):
        """All arrays of shard ``k`` of ``split`` (dict of numpy arrays)."""
        entry = self.shards(split)[k]
        path = self.path / entry["file"]
        if not path.exists():
            raise ValueError(f"missing shard {path}")
        if self.verify and file_sha256(path) != entry["sha256"]:
            raise ValueError(f"corrupt shard {path}: checksum differs from the manifest")
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise ValueError(f"corrupt shard {path}: {exc}") from None

    def clusters(self, split, shard_ids=None):
        """The records of ``split`` (as :func:`make_cluster`, plus ``index``), one shard in
        memory at a time."""
        for k in range(len(self.shards(split))) if shard_ids is None else shard_ids:
            a = self.load_shard(split, k)
            co, mo = a["cat_offsets"], a["mask_offsets"]
            for i in range(len(a["kappa"])):
                cat = {c: a[f"cat_{c}"][co[i]:co[i + 1]].astype(np.float64)
                       for c in CATALOG_COLUMNS}
                masks = {c: a[f"mask_{c}"][mo[i]:mo[i + 1]] for c in MASK_COLUMNS}
                yield {"index": int(a["index"][i]), "kappa": a["kappa"][i],
                       "gamma1": a["gamma1"][i], "gamma2": a["gamma2"][i],
                       "catalog": Table(cat), "masks": Table(masks),
                       "meta": json.loads(str(a["meta"][i]))}


# ---------------------------------------------------------------------------
# Saving and loading models
# ---------------------------------------------------------------------------
def save_model(model, path):
    """Write a model of ``build_model`` to a ``.keras`` file atomically (a hidden
    temporary file renamed over ``path``: a crash never leaves a truncated model)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"{path}: model files end in .keras")
    model_info(model)  # refuses a model without its description
    atomic_write(path, lambda tmp: model.save(tmp, overwrite=True))


def load_model(path, compile=True):
    """Read a model written by ``save_model``; ``model_info`` describes it.

    Raises ValueError, before Keras rebuilds any layer, if the file holds no
    wlcnn description or one of another format version.
    """
    path = os.fspath(path)
    with zipfile.ZipFile(path) as zf:
        config = json.loads(zf.read("config.json"))
    layers = config.get("config", {}).get("layers", [])
    info = next((layer["config"].get("info") for layer in layers
                 if layer.get("config", {}).get("name") == INFO_LAYER), None)
    if not isinstance(info, dict):
        raise ValueError(f"{path}: not a wlcnn model (no {INFO_LAYER!r} description)")
    _check_version(info.get("format_version"), path)
    return keras.saving.load_model(path, compile=compile)


# ---------------------------------------------------------------------------
# Training: starting from KS93 instead of random weights (beyond the paper)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class KS93Start:
    """How :func:`initialize_as_ks93` sets a Table 1 network."""

    # Gaussian smoothing (FWHM) folded into the KS93 kernels of the Output layer
    fwhm_arcmin: float = 1.0
    # Conv2D-1 passes input_gain × ε̄1, ε̄2 to its channels 0, 1, small enough for tanh to
    # stay linear (|ε| ~ 0.3 in a pixel: tanh(0.15) = 0.149, 1 % short)
    input_gain: float = 0.5
    # TransConv2D-5 passes final_gain × the standardised channels 0, 1 (2 % short at 1 σ)
    final_gain: float = 0.2
    # tanh of the Conv2D-2..5 gates (bias arctanh(gate)): each block scales its skip tensor
    # by ~gate and batch normalisation undoes it, so the blocks start as the identity
    gate: float = 0.5
    # every other weight is Glorot-uniform × random_scale: small enough to leave the KS93 map
    # alone (0.1 and 0.02 give the same correlation with truncated_ks93, 0.99994), non-zero
    # so that gradients reach every layer from the first step
    random_scale: float = 0.1
    # training subfields on which the output gains are calibrated
    n_init: int = 32


def ks93_kernels(filter_size, fwhm_arcmin=0.0, pixel_arcmin=PAPER.pixel_arcsec * PAPER.pool / 60.0):
    """The :func:`ks93` inversion as two real-space kernels k1, k2 (filter_size², odd).

    Cross-correlation kernels, as Keras's Conv2D: κ[j] = Σ_u k1[u] g1[j + u − h] + k2[u]
    g2[j + u − h], h = filter_size // 2, optionally smoothed by a Gaussian of FWHM
    ``fwhm_arcmin`` (pixels of ``pixel_arcmin``, default the output pixel, 0.192′).

    Notes
    -----
    Each kernel is the response of :func:`ks93` to a unit shear at one pixel of a field four
    times its side, so it carries ks93's conventions exactly; far from its centre it is D1 =
    (y² − x²) / (π r⁴), D2 = −2xy / (π r⁴). The cut at its edge makes a truncated
    inversion, blind to structures wider than the kernel (its k = 0 mode is not zero).
    """
    filter_size = int(filter_size)
    if filter_size < 1 or filter_size % 2 == 0:
        raise ValueError(f"filter_size must be a positive odd integer, got {filter_size}")
    if not fwhm_arcmin >= 0 or not pixel_arcmin > 0:
        raise ValueError(f"need fwhm_arcmin >= 0 and pixel_arcmin > 0, got {fwhm_arcmin}, "
                         f"{pixel_arcmin}")
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
    """Network inputs (B, 386, 386, C) averaged on the output grid (B, 128, 128, C), over the
    blocks of :func:`mosaic_truth`: what Conv2D-1's centre tap and the pool see."""
    x = np.moveaxis(np.asarray(x), -1, 1)
    return np.moveaxis(_block_mean(x, config.output_npix, config), 1, -1)


def truncated_ks93(x, filter_size, fwhm_arcmin=0.0, config=PAPER):
    """The map a KS93-started network computes: :func:`ks93_kernels` applied to the pooled
    ε̄1, ε̄2 of inputs x (B, 386, 386, ≥2), zero outside them; (B, 128, 128, 1)."""
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
    """Set a Table 1 network's weights so that it computes a smoothed, truncated KS93.

    ``model`` (with skips) is changed in place; ``x``, a few tens of training inputs,
    calibrates the batch normalisation and the output gains; ``seed`` draws the small random
    weights. Returns the gains of the ε̄1 and ε̄2 paths, fitted by least squares to
    :func:`truncated_ks93` of ``x`` over the scored pixels.

    Notes
    -----
    The architecture is untouched. Conv2D-1 copies ε̄1, ε̄2 into channels 0, 1 (with the
    pool: :func:`pooled_input`); each block's gate is ~constant, so Multiply-# scales its skip
    tensor and batch normalisation (moving statistics from ``x``) standardises it again;
    TransConv2D-5 passes channels 0, 1 on through its centre tap; the Output layer holds the
    kernels of :func:`ks93_kernels`. Other weights are small and random, so that the gates,
    the Δε channel and the other features learn from the first step.
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

    def small_random(name):  # Glorot-uniform × random_scale
        shape = layer(name).kernel.shape
        limit = np.sqrt(6.0 / (shape[0] * shape[1] * (shape[2] + shape[3])))
        return start.random_scale * rng.uniform(-limit, limit, shape)

    def set_conv(name, kernel, bias):
        ly = layer(name)
        ly.kernel.assign(kernel.astype(np.float32))
        ly.bias.assign(np.broadcast_to(bias, ly.bias.shape).astype(np.float32))

    k = small_random("conv2d_1")  # (h, w, in, out)
    k[:, :, :, :2] = 0.0
    # the centre tap alone: with the 3 × 3 pool it averages exactly the input pixels
    # [3k + 1, 3k + 4) of output pixel k
    c = k.shape[0] // 2
    k[c, c, 0, 0] = k[c, c, 1, 1] = start.input_gain
    set_conv("conv2d_1", k, 0.0)
    for i in range(1, len(MULTIPLIED_TO) + 1):
        set_conv(f"transconv2d_{i}", small_random(f"transconv2d_{i}"), 0.0)
        set_conv(f"conv2d_{i + 1}", small_random(f"conv2d_{i + 1}"), np.arctanh(start.gate))
    last = f"transconv2d_{len(MULTIPLIED_TO) + 1}"
    k = small_random(last)  # (h, w, out, in)
    k[:, :, :2, :] = 0.0
    k[:, :, :, :2] = 0.0
    c = k.shape[0] // 2
    k[c, c, 0, 0] = k[c, c, 1, 1] = start.final_gain
    set_conv(last, k, 0.0)
    # batch-normalisation statistics in order: each depends on those before
    for i in range(1, len(MULTIPLIED_TO) + 1):
        bn = layer(f"batchnorm_{i}")
        # float64: a mixed-precision model predicts float16
        t = keras.Model(model.inputs, bn.input).predict(
            x, batch_size=batch_size, verbose=0).astype(np.float64)
        bn.moving_mean.assign(t.mean(axis=(0, 1, 2)).astype(np.float32))
        bn.moving_variance.assign(t.var(axis=(0, 1, 2)).astype(np.float32))
    shape = layer("output").kernel.shape
    kernels = ks93_kernels(shape[0], start.fwhm_arcmin, config.pixel_arcsec * config.pool / 60.0)
    b, o = config.loss_border_pix, config.output_npix
    inner = (slice(None), slice(b, o - b), slice(b, o - b), 0)  # the scored pixels
    parts = []
    for c in (0, 1):
        k = np.zeros(shape)
        k[:, :, c, 0] = kernels[c]
        set_conv("output", k, 0.0)
        parts.append(model.predict(x, batch_size=batch_size, verbose=0)[inner]
                     .ravel().astype(np.float64))
    ref = truncated_ks93(x, shape[0], start.fwhm_arcmin, config)[inner].ravel()
    gains = np.linalg.lstsq(np.stack(parts, axis=1), ref, rcond=None)[0]
    k = np.zeros(shape)
    for c in (0, 1):
        k[:, :, c, 0] = gains[c] * kernels[c]
    set_conv("output", k, 0.0)
    return gains


# ---------------------------------------------------------------------------
# Run files read back: validation sets, training logs and trained models
# ---------------------------------------------------------------------------
def validation_sha256(val):
    """SHA-256 of a validation set (x, y), run.json's ``val_sha256``: a resumed run must
    validate on the same subfields, or its choice of the best epoch would mix two yardsticks."""
    h = hashlib.sha256()
    for a in val:
        h.update(repr(np.shape(a)).encode() + np.ascontiguousarray(a, np.float32).tobytes())
    return h.hexdigest()


def read_history(path):
    """Rows of a ``history.csv`` as dicts of floats (``epoch`` an int); [] if none."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):  # Keras writes "NA" for a gap
            return float("nan")
    return [{k: int(v) if k == "epoch" else num(v) for k, v in r.items()} for r in rows]


def load_runs(path):
    """The trained models at ``path``, for prediction.

    ``path`` is a ``.keras`` file, a directory of them (a run_XX directory or
    a shipped model), or a training output directory, whose complete runs'
    ``run_XX/best.keras`` are read. Models come in file-name order; raises
    ValueError if there is none or one is not a wlcnn model of this format.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: model not found (no such file or directory)")
    files = [path] if path.is_file() else sorted(
        p for p in path.glob("*.keras") if not p.name.startswith("."))  # hidden: temporary
    if not files:
        runs = sorted(path.glob("run_*"))
        files = [d / "best.keras" for d in runs
                 if (read_json(d / "run.json") or {}).get("status") == "complete"]
        if len(files) < len(runs):
            warnings.warn(f"{path}: {len(runs) - len(files)} unfinished run(s) left out")
    if not files:
        raise ValueError(f"{path}: no .keras model and no complete run")
    return [load_model(f, compile=False) for f in files]


# ---------------------------------------------------------------------------
# Evaluations kept on disk: the mosaic cache and saved evaluations
# ---------------------------------------------------------------------------
def cached_method(fn, cache_dir):
    """``fn(grid)`` with each result kept in ``cache_dir`` under the SHA-256 of its grid.

    A long evaluation then resumes where it stopped, and a model evaluated once
    is not predicted again when rows are added.  Each file is written then
    renamed; ``cache_dir`` must be specific to ``fn`` (its name holds the key).
    """
    os.makedirs(cache_dir, exist_ok=True)

    def run(grid):
        key = hashlib.sha256(np.ascontiguousarray(grid, np.float32).tobytes()).hexdigest()
        path = os.path.join(cache_dir, f"{key[:32]}.npy")
        if os.path.exists(path):
            return np.load(path)
        out = np.asarray(fn(grid), dtype=np.float64)
        atomic_write(path, lambda tmp: np.save(tmp, out))
        return out
    return run


def save_evaluation(results, path):
    """Keep an :class:`Evaluation` in a compressed ``.npz`` file, its maps as float32.

    The figures of a report are drawn from this file (``examples/figures.py``), so that
    a figure is redrawn without predicting again; float32 halves the file and changes a
    map by less than 1e-7 of its value, below anything a figure shows. Written whole or
    not at all.
    """
    arrays = {"truth": results.truth, "star_mask": results.star_mask, "index": results.index}
    for i, name in enumerate(results.methods):
        arrays[f"map_{i}"] = results.maps[name]
        if name in results.run_std:
            arrays[f"run_std_{i}"] = results.run_std[name]
            arrays[f"run_mass_std_{i}"] = results.run_mass_std[name]
    arrays = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in arrays.items()}
    header = json.dumps({"methods": results.methods, "config": config_dict(results.config)})

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, header=np.array(header), **arrays)
    atomic_write(path, write)


def load_evaluation(path):
    """The :class:`Evaluation` of :func:`save_evaluation` (its maps float64 again)."""
    with np.load(path) as f:
        header = json.loads(str(f["header"]))
        methods = header["methods"]

        def per_method(key):
            return {name: f[f"{key}_{i}"].astype(np.float64)
                    for i, name in enumerate(methods) if f"{key}_{i}" in f}
        return Evaluation(
            truth=f["truth"].astype(np.float64), maps=per_method("map"),
            run_std=per_method("run_std"), run_mass_std=per_method("run_mass_std"),
            star_mask=f["star_mask"], index=f["index"],
            config=config_from_dict(header["config"]))
