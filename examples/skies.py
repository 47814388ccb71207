"""skies: simulated and real skies, the shared code of the example scripts.

Title: simulated and real skies for wlcnn
Description: the training-sky simulator, a shear catalog on the sky and its
tiled CNN/KS93 reconstruction, and the S/N maps and peaks of a mass map.

The example scripts import :mod:`wlcnn` and this module only.  Its sections:

1. **Simulated skies** (§2.3.1): the halo-model sky that stands in for the
   MassiveNuS ray-traced maps: ΛCDM theory tables (examples/theory/), truncated
   NFW halos painted on pixels, the halo population, the log-normal large-scale
   structure, one cluster field (:func:`simulate_cluster_field`) and the
   ``field_fn`` of the dataset writer :func:`write_dataset` (:func:`simulated_field`), which
   writes the shards and manifest that :class:`wlcnn.ClusterDataset` reads.
   Its command line is examples/simulate_skies.py; its statistics
   examples/sim_stats.py.
2. **Real skies** (§4.2): a shear catalog in sky coordinates
   (:func:`read_catalog`), its tangent plane and WCS (:func:`tangent_plane_wcs`,
   :func:`project_catalog`, :func:`map_wcs`), the field and its 32′ network
   tiles (:func:`field_geometry`, :func:`grid_field`, :func:`noise_fill`), the
   K runs of a model (:func:`check_models`), the KS93 and tiled CNN maps of
   the field, and the whole reconstruction into a FITS file and a Fig. 11-like
   PNG (:func:`reconstruct` with its :class:`ReconstructOptions`).  Its command
   line is examples/reconstruct_catalog.py.
3. **Mass peaks**: S/N maps from randomly rotated catalogs
   (:func:`noise_maps`, :func:`significance_map`), peak tables on the sky
   (:func:`find_peaks`, :func:`write_peaks`), and their completeness and purity
   against known objects (:func:`match_peaks`, :func:`completeness_purity`,
   :func:`stack_snr`), for examples/cosmos.py and examples/wide_field.py.

Tested in tests/test_simulation.py, tests/test_reconstruct.py and
tests/test_peaks.py.
"""
from __future__ import annotations

import concurrent.futures
import functools
import gzip
import json
import multiprocessing
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import astropy
import keras
import numpy as np
import scipy
import scipy.fft
import scipy.ndimage
import scipy.special
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.interpolate import RegularGridInterpolator

import wlcnn
from wlcnn import (MOSAIC_BATCH, PAPER, SIGMA_RANGE, Config, MosaicRuns, Progress, atomic_write,
                   config_from_dict, cosmology, grid_catalog, ks93, load_runs, model_info,
                   mosaic_coverage, mosaic_offsets, mosaic_orientations, predict_mosaic_runs,
                   sigma_crit, smooth_map)


# ## 1. Simulated skies: the training-sky simulator (§2.3.1)
_HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class SimulatorConfig:
    """Every choice of the simulator (frozen); masses M200c [M☉], distances physical Mpc.

    "Calibrated": tuned so that truth M_cl and peak κ match the paper's Figs. 2, 6, 7.
    """

    # -- theory tables (make_theory_tables.py) --------------------------------
    theory_dir: str | None = None          # None: examples/theory/
    # -- main cluster (§2.3.1, Figs. 2, 6, 7) ---------------------------------
    main_m200_min_msun: float = 3.0e14     # calibrated: M_cl 14-59 (5-95 %), median 26 (Figs. 6-7)
    main_m200_max_msun: float = 2.0e15     # the most massive clusters at z ≈ 0.5
    main_offset_max_arcmin: float = 2.0    # "approximately centered" (§2.3.1); uniform in a disc
    # Projected ellipticity ε = 1 − b/a ~ N(0.46, 0.20) clipped to
    # [0, ellipticity_max]: ⟨1 − b/a⟩ = 0.46 ± 0.04 from 2-D weak-lensing fits
    # of 18 clusters (Oguri et al. 2010, MNRAS 405, 2215); the spread is our
    # choice, about that of their individual clusters.
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
    # -- merging companions / substructure ------------------------------------
    merger_fraction: float = 0.3            # ~40 % of X-ray clusters show substructure
    #                                         (Jones & Forman 1999); we take the lower side
    n_companions: tuple = (2, 3)            # clumps per merging system, uniform (our choice)
    companion_mass_ratio: tuple = (0.1, 0.5)  # log-uniform M_comp / M_main (minor to major mergers)
    companion_separation_mpc: tuple = (0.3, 1.2)  # uniform projected distance from the main halo
    # -- field halos along the line of sight ----------------------------------
    field_m200_min_msun: float = 3.0e13    # groups and up; lighter halos are in the log-normal
    field_m200_max_msun: float = 3.0e15    # top of the mass-function table
    halo_dz: float = 0.01                  # redshift cells of the Poisson draw
    halo_dlog10m: float = 0.02             # mass cells of the Poisson draw
    # -- log-normal large-scale structure -------------------------------------
    kappa0: float | None = None             # None: Hilbert, Hartlap & Schneider 2011 eq. 38 at z_s
    pad_factor: int = 2                     # torus side / field side (≥ 2: the field's shear
    #                                         sees the mass up to half a field beyond its edge)
    large_scale_factor: int = 8             # modes below the torus's fundamental come from an
    #                                         8× larger torus (512′ for the paper's field)
    large_scale_grid: int = 32              # coarse grid per side for the shear of those modes
    lss_ell_max: float = 2.5e4              # taper exp(−(ℓ/ℓ_max)⁴) of the log-normal's power
    # -- resolution of the truth maps -----------------------------------------
    # Gaussian FWHM applied to every painted halo: the pixel of the paper's
    # truth maps (MassiveNuS: 512² pixels over 3.5°, 0.41′).  Calibrated: it
    # brings the mosaic peak κ to Fig. 2's 0.1-0.5; 0 keeps cuspy NFW cores.
    halo_smoothing_fwhm_arcsec: float = 24.6
    # -- pixel averaging ------------------------------------------------------
    oversample: int = 4                     # sub-samples per side near a halo centre
    oversample_radius_pix: float = 6.0      # ... within this radius [pix]; error (pix/r)²/6 beyond
    core_oversample: int = 16               # sub-samples per side in the 3 × 3 pixels at the cusp


SIMULATOR = SimulatorConfig()


def kappa0_hilbert2011(z_s):
    """Shift κ0 of the log-normal κ of sources at ``z_s`` (κ ≥ −κ0; 0.0539 at z_s = 1.5).

    Hilbert, Hartlap & Schneider (2011, A&A 536, A85) eq. 38, the Millennium
    Simulation's empty beam: κ0 = 0.008 z + 0.029 z² − 0.0079 z³ + 0.00065 z⁴.
    """
    z = float(z_s)
    return 0.008 * z + 0.029 * z**2 - 0.0079 * z**3 + 0.00065 * z**4


# ### ΛCDM theory tables
@dataclass(frozen=True)
class TheoryTables:
    """The tables of make_theory_tables.py: C_ℓ(ℓ) of sources at z_s (Limber, halofit)
    and the Tinker et al. (2008) dn/dlnM [comoving Mpc⁻³] on (z, log10 M [M☉]) nodes."""

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
    """Read the ΛCDM tables from ``sim.theory_dir``; ValueError (with the command that
    makes matching ones) if they were made for another H0, Ωm or z_s than ``config``'s."""
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
    """ΛCDM convergence C_ℓ at any ℓ: log-log interpolation of the table, power laws
    beyond it (0 for ℓ ≤ 0)."""
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


# ### Halos: truncated NFW profiles painted on pixels
def concentration_duffy08(m200_msun, z, sim: SimulatorConfig = SIMULATOR, h=PAPER.H0 / 100):
    """Median c200c of halos of mass M200c [M☉] at redshift z.

    Duffy et al. (2008) Table 1, full sample, Δ = 200c:
    c = 5.71 (M / 2e12 h⁻¹M☉)^-0.084 (1 + z)^-0.47.
    """
    m = np.asarray(m200_msun, dtype=np.float64)
    return (sim.duffy_a * (m / (sim.duffy_pivot_msun_h / h)) ** sim.duffy_b
            * (1.0 + np.asarray(z, dtype=np.float64)) ** sim.duffy_c)


def draw_concentration(m200_msun, z, rng, sim: SimulatorConfig = SIMULATOR, h=PAPER.H0 / 100):
    """c200c with ln c ~ N(ln c_Duffy, ``sim.concentration_scatter_ln``)."""
    c = concentration_duffy08(m200_msun, z, sim, h)
    return c * np.exp(sim.concentration_scatter_ln * rng.standard_normal(np.shape(c)))


def _nfw_m(x):
    """m(x) = ln(1 + x) − x / (1 + x): NFW mass inside x r_s in units of 4π ρ_s r_s³."""
    return np.log1p(x) - x / (1.0 + x)


def _tnfw_g(x, t):
    """Σ(x r_s) / (2 ρ_s r_s) of an NFW truncated at t r_s (zero for x ≥ t).

    Takada & Jain (2003, MNRAS 340, 580) eq. 27 with t for c.  Both branches
    lose digits at x = 1: within 1 ± 1e-3, linear interpolation (error ~1e-6).
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
    val[~near] = branch(xi[~near], ti[~near])
    if near.any():
        xn, tn = xi[near], ti[near]
        w = (xn - (1.0 - eps)) / (2 * eps)
        val[near] = ((1 - w) * branch(np.full_like(xn, 1.0 - eps), tn)
                     + w * branch(np.full_like(xn, 1.0 + eps), tn))
    out[inside] = val
    return out


def tnfw_sigma(r_mpc, m200_msun, c200, z, cosmo=None, truncation_r200=SIMULATOR.truncation_r200):
    """Σ(R) [M☉/Mpc²] of an NFW halo truncated in 3-D at τ r200 (+inf at R = 0).

    Takada & Jain (2003) eq. 27; projected mass M200 m(τc)/m(c).  τ → ∞ gives
    Wright & Brainerd (2000), ``wlcnn.nfw_sigma``.
    """
    cosmo = wlcnn.cosmology() if cosmo is None else cosmo
    rs, sigma_s = wlcnn.nfw_scale(m200_msun, c200, z, cosmo)  # sigma_s = ρ_s r_s
    x = np.asarray(r_mpc, dtype=np.float64) / rs
    with np.errstate(divide="ignore"):
        return 2.0 * sigma_s * _tnfw_g(x, truncation_r200 * c200)


def tnfw_fourier(k_mpc, rs_mpc, rho_s, t):
    """ρ̃(k) [M☉] of the NFW density truncated at t r_s, also the 2-D transform of Σ.

    Cooray & Sheth (2002, Phys. Rep. 372, 1) eq. 81 with c → t.
    """
    kr = np.maximum(np.asarray(k_mpc, dtype=np.float64) * rs_mpc, 1e-8)
    si1, ci1 = scipy.special.sici((1.0 + t) * kr)
    si0, ci0 = scipy.special.sici(kr)
    bracket = (np.sin(kr) * (si1 - si0) - np.sin(t * kr) / ((1.0 + t) * kr)
               + np.cos(kr) * (ci1 - ci0))
    return 4.0 * np.pi * rho_s * rs_mpc**3 * bracket


def paint_tnfw(kappa, x0_pix, y0_pix, m200_msun, c200, z, z_s, cosmo, pixel_arcsec,
               axis_ratio=1.0, angle_deg=0.0, sim: SimulatorConfig = SIMULATOR, wrap=True):
    """Add the pixel-averaged κ = Σ / Σ_c of one truncated, elliptical NFW halo to a map.

    Parameters
    ----------
    kappa : ndarray, shape (ny, nx)
        Map [y, x], modified in place; pixel (i, j) spans [j, j+1) × [i, i+1).
    x0_pix, y0_pix : float
        Halo centre in pixels from the lower-left corner.
    axis_ratio, angle_deg : float
        q = b/a in (0, 1] and the major axis from +x; r² = q x'² + y'²/q keeps
        every contour's area, so the mass.
    wrap : bool
        True: the map is a torus; False: what falls outside is dropped.
    """
    if not 0.0 < axis_ratio <= 1.0:
        raise ValueError(f"axis_ratio must be in (0, 1], got {axis_ratio}")
    amp, rs_pix, t = _halo_pixel_scales(m200_msun, c200, z, z_s, cosmo, pixel_arcsec, sim)
    if amp[()] > 0:
        _paint_stamp(kappa, x0_pix, y0_pix, float(amp), float(rs_pix), float(t), axis_ratio,
                     angle_deg, sim, wrap)


def _halo_pixel_scales(m200_msun, c200, z, z_s, cosmo, pixel_arcsec, sim):
    """κ amplitude 2 ρ_s r_s / Σ_c, r_s in pixels and truncation t = τ c (arrays)."""
    c200 = np.asarray(c200, dtype=np.float64)
    rs, sigma_s = wlcnn.nfw_scale(m200_msun, c200, z, cosmo)  # sigma_s = ρ_s r_s
    d_a = cosmo.angular_diameter_distance(z).to_value(u.Mpc)
    rs_pix = rs / (d_a * np.radians(pixel_arcsec / 3600.0))
    sigma_c = wlcnn.sigma_crit(z, z_s, cosmo).to_value(u.Msun / u.Mpc**2)
    return 2.0 * sigma_s / sigma_c, rs_pix, sim.truncation_r200 * c200


def _paint_stamp(kappa, x0_pix, y0_pix, amp, rs_pix, t, q, angle_deg, sim, wrap):
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
    """κ map (npix, npix) of one halo centred at (x0, y0) arcsec; see ``paint_tnfw``."""
    cosmo = wlcnn.cosmology() if cosmo is None else cosmo
    kappa = np.zeros((npix, npix))
    paint_tnfw(kappa, x0_arcsec / pixel_arcsec, y0_arcsec / pixel_arcsec, m200_msun, c200,
               z_l, z_s, cosmo, pixel_arcsec, axis_ratio, angle_deg, sim, wrap=False)
    return kappa


# ### The halo population: mass function and one-halo power
@dataclass(frozen=True)
class HaloGrid:
    """(z, ln M200c) cells of the field-halo draw: ``counts_per_sr`` = n dV/dz/dΩ Δz Δln M;
    ``sigma_crit`` [M☉/Mpc²] and ``d_a_mpc`` at the cells' mid redshifts."""

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
    """dn/dlnM [Mpc⁻³] at (z, log10 M), bilinear in ln n."""
    f = RegularGridInterpolator((t.z, t.log10_m), np.log(t.dn_dlnm), bounds_error=False,
                                fill_value=None)
    zz, mm = np.broadcast_arrays(np.asarray(z, float), np.asarray(log10_m, float))
    return np.exp(f(np.stack([zz.ravel(), mm.ravel()], -1))).reshape(zz.shape)


@functools.lru_cache(maxsize=8)
def halo_grid(config: Config = PAPER, sim: SimulatorConfig = SIMULATOR,
              dz=None, dlog10m=None) -> HaloGrid:
    """Expected field-halo counts per sr on cells of ``dz`` × ``dlog10m`` (default: ``sim``'s)."""
    t = theory_tables(config, sim)
    cosmo = wlcnn.cosmology(config)
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
    sigma_c = wlcnn.sigma_crit(z_mid, config.z_source, cosmo).to_value(u.Msun / u.Mpc**2)
    return HaloGrid(z_edges, lnm_edges, counts, sigma_c,
                    cosmo.angular_diameter_distance(z_mid).to_value(u.Mpc))


def draw_field_halos(area_sr, rng, config: Config = PAPER, sim: SimulatorConfig = SIMULATOR):
    """Poisson draw of line-of-sight halos over ``area_sr`` sr: arrays ``m200_msun``, ``z``,
    ``c200`` (positions are the caller's).

    Unclustered: their two-halo term is in the log-normal field.
    """
    wlcnn.check_rng(rng)
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
    """M200c [M☉] of main clusters: dn/dlnM(z_l) within the main mass range (inverse CDF)."""
    wlcnn.check_rng(rng)
    t = theory_tables(config, sim)
    lm = np.arange(np.log10(sim.main_m200_min_msun), np.log10(sim.main_m200_max_msun) + 1e-9,
                   0.005)
    pdf = _mass_function_at(t, config.z_lens, lm)  # per ln M, so uniform steps in log M
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]))])
    return 10.0 ** np.interp(rng.uniform(0.0, cdf[-1], size), cdf, lm)


@functools.lru_cache(maxsize=8)
def _halo_power(config: Config, sim: SimulatorConfig, n_ell=160):
    """(ℓ, one-halo C_ℓ, mean κ) of the field halos, unsmoothed."""
    # A coarser grid than the draw's suffices: the integrand is smooth.
    g = halo_grid(config, sim, dz=0.03, dlog10m=0.05)
    cosmo = wlcnn.cosmology(config)
    ell = np.logspace(0, 6, n_ell)
    z, m = g.z_mid, g.m_mid
    # Log-normal concentration scatter: Gauss-Hermite nodes in ln c.
    nodes, weights = np.polynomial.hermite_e.hermegauss(7)
    weights = weights / weights.sum()
    cl = np.zeros_like(ell)
    mean_kappa = 0.0
    for iz in range(g.sigma_crit.size):
        c_med = concentration_duffy08(m, z[iz], sim, config.H0 / 100)
        to_kappa = 1.0 / (g.sigma_crit[iz] * g.d_a_mpc[iz] ** 2)  # M☉ → κ̃ [sr]
        for xn, wn in zip(nodes, weights):
            c = c_med * np.exp(sim.concentration_scatter_ln * xn)
            rs, sigma_s = wlcnn.nfw_scale(m, c, z[iz], cosmo)
            rho_s = sigma_s / rs
            t = sim.truncation_r200 * c
            kt = tnfw_fourier(ell[None, :] / g.d_a_mpc[iz], rs[:, None], rho_s[:, None],
                              t[:, None]) * to_kappa
            cl += wn * np.sum(g.counts_per_sr[iz][:, None] * kt**2, axis=0)
            m_tot = 4 * np.pi * rho_s * rs**3 * _nfw_m(t)
            mean_kappa += wn * np.sum(g.counts_per_sr[iz] * m_tot) * to_kappa
    return ell, cl, mean_kappa


def halo_cl_1h(ell, config: Config = PAPER, sim: SimulatorConfig = SIMULATOR):
    """One-halo C_ℓ of the field halos as painted (Poisson, smoothed by σ).

    C_ℓ^{1h} = ∫ dz dV/dz/dΩ ∫ dln M n ⟨|κ̃_ℓ|²⟩_c exp(−ℓ²σ²),
    κ̃_ℓ = ρ̃(ℓ / D_A) / (Σ_c D_A²) (Limber), ⟨⟩_c over the concentration scatter.
    """
    e, c, _ = _halo_power(config, sim)
    ell = np.asarray(ell, dtype=np.float64)
    sig = np.radians(sim.halo_smoothing_fwhm_arcsec / 3600.0) / wlcnn.FWHM_PER_SIGMA
    return np.interp(np.log(ell.clip(1.0)), np.log(e), c) * np.exp(-(ell * sig) ** 2)


def halo_mean_kappa(config: Config = PAPER, sim: SimulatorConfig = SIMULATOR):
    """Expected mean κ of the field halos, ⟨κ_h⟩ (subtracted as a sheet)."""
    return _halo_power(config, sim)[2]


# ### The log-normal large-scale structure
@dataclass(frozen=True)
class LognormalPlan:
    """Spectra of the log-normal field on a torus of ``n`` pixels a side.

    ``sqrt_cg``: √C_g / pixel on the rfft2 modes; ``large_m``: large modes in
    units of 2π / (``large_factor`` n); ``large_sd``: their amplitudes' σ.
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
    """Target power of the log-normal field, [C_ℓ − C_ℓ^{1h}] exp(−(ℓ/ℓ_max)⁴) ≥ 0.

    Beyond ℓ ~ 2e4 the power is that of halos below the mass cut; a log-normal
    carrying it would put isolated pixels at κ ~ 1, which such halos (central
    κ ≲ 0.15) do not make, and MassiveNuS (0.41′ pixels) does not resolve it.
    The taper costs 2.5 % at ℓ = 1e4.
    """
    ell = np.asarray(ell, dtype=np.float64)
    taper = np.exp(-((ell / sim.lss_ell_max) ** 4))
    return np.maximum(theory_cl(ell, config, sim) - halo_cl_1h(ell, config, sim), 0.0) * taper


@functools.lru_cache(maxsize=4)
def lognormal_plan(config: Config = PAPER, sim: SimulatorConfig = SIMULATOR, n=None,
                   cl_func=None, kappa0=None) -> LognormalPlan:
    """Set up the log-normal field on a torus of ``n`` pixels a side.

    Parameters
    ----------
    n : int, optional
        Default ``sim.pad_factor * config.npix``.
    cl_func : callable, optional
        C_ℓ of the target κ; default ``lss_cl``.
    kappa0 : float, optional
        Default ``sim.kappa0`` (or Hilbert et al. 2011 eq. 38) minus ⟨κ_h⟩, so
        that the total, after the halos' mean sheet, stays ≥ the empty beam's −κ0.

    Notes
    -----
    κ = κ0 [exp(g − σ_g²/2) − 1] has ⟨κ⟩ = 0 and ξ_g = ln(1 + ξ_κ/κ0²)
    (Hilbert et al. 2011 §5), ξ_κ from the target C_ℓ on the torus's own modes.
    The torus's k = 0 cell (18 % of the variance of κ at 1′ for a 64′ torus)
    comes from a ``large_scale_factor`` times larger torus as a smooth g_L; the
    torus's part is Gaussianised with κ0² + σ_L², which keeps the variance exact.
    """
    n = sim.pad_factor * config.npix if n is None else int(n)
    cl_func = (lambda ell: lss_cl(ell, config, sim)) if cl_func is None else cl_func
    if kappa0 is None:
        kappa0 = kappa0_hilbert2011(config.z_source) if sim.kappa0 is None else sim.kappa0
        kappa0 -= halo_mean_kappa(config, sim)
    kappa0_ln = float(kappa0)
    pix = np.radians(config.pixel_arcsec / 3600.0)
    area = (n * pix) ** 2
    lx = 2 * np.pi * np.fft.fftfreq(n, d=pix)
    cgrid = cl_func(np.hypot(lx[:, None], lx[None, :]))
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
    xi_g = np.log1p(xi / (kappa0_ln**2 + var_kappa_large))
    cg = np.fft.fft2(xi_g).real * area / n**2
    cg = np.maximum(cg, 0.0)  # negative Gaussian power cannot be realised
    var_g_large = np.log1p(var_kappa_large / kappa0_ln**2)
    # Each large mode pair (m, −m) is one cosine and one sine amplitude of
    # variance 2 v_m; scaling v_m by var_g_large / Σ v Gaussianises them (the
    # log transform is linear to 1 % at these small variances).
    scale = var_g_large / var_kappa_large if var_kappa_large > 0 else 0.0
    return LognormalPlan(n=n, pixel_rad=pix, kappa0=kappa0_ln,
                         sqrt_cg=np.sqrt(cg[:, : n // 2 + 1]) / pix,
                         var_g_small=float(cg.sum() / area), var_g_large=float(var_g_large),
                         large_m=m, large_sd=np.sqrt(2.0 * var_l_modes * scale), large_factor=f)


def _fourier_sum(coef, kx, ky, x, y):
    """Re Σ coef[a, b] exp(i (ky[a] y + kx[b] x)) on the grid y[:, None], x[None, :]."""
    ey = np.exp(1j * np.outer(y, ky))
    ex = np.exp(1j * np.outer(kx, x))
    return (ey @ coef @ ex).real  # separable: two small matrix products


def lognormal_gaussians(rng, plan: LognormalPlan):
    """The Gaussian fields of one log-normal realisation: g on the torus's modes, (n, n),
    and the large modes' coefficients, g_L = Re Σ coef[a, b] exp(i k (m_a y + m_b x)),
    k = 2π / (large_factor n) per pixel, on half of the lattice."""
    wlcnn.check_rng(rng)
    n = plan.n
    white = rng.standard_normal((n, n))
    g_small = scipy.fft.irfft2(scipy.fft.rfft2(white) * plan.sqrt_cg, s=(n, n))
    # Cosine and sine amplitudes of the half lattice (m_y > 0, or m_y = 0 < m_x).
    a = rng.standard_normal(plan.large_sd.shape) * plan.large_sd
    b = rng.standard_normal(plan.large_sd.shape) * plan.large_sd
    mm = plan.large_m
    half = (mm[:, None] > 0) | ((mm[:, None] == 0) & (mm[None, :] > 0))
    return g_small, np.where(half, a - 1j * b, 0.0)


def lognormal_lss(rng, plan: LognormalPlan, sim: SimulatorConfig = SIMULATOR, shear=True):
    """One log-normal convergence field on the torus, and the shear of its large modes.

    Returns
    -------
    kappa : ndarray, shape (n, n)
        κ ≥ −κ0, zero-mean in expectation.
    kappa_large : ndarray, shape (n, n)
        κ_L = κ0 [exp(g_L − σ_L²/2) − 1], the large modes alone.
    gamma1_large, gamma2_large : ndarray, shape (n, n), or None if not ``shear``
        Shear of κ_L, computed on the large torus where κ_L is periodic.

    Notes
    -----
    κ − κ_L = κ_s (1 + κ_L/κ0), κ_s the log-normal of g alone, is periodic on
    the torus up to the slow 1 + κ_L/κ0 (≈ 1 ± 0.15): its shear is a periodic FFT.
    """
    n = plan.n
    g_small, coef = lognormal_gaussians(rng, plan)
    k_large = 2 * np.pi / (plan.large_factor * n) * plan.large_m  # per torus pixel
    xpix = np.arange(n) + 0.5
    g_l = _fourier_sum(coef, k_large, k_large, xpix, xpix)
    kappa = plan.kappa0 * np.expm1(g_small + g_l - 0.5 * (plan.var_g_small + plan.var_g_large))
    kappa_large = plan.kappa0 * np.expm1(g_l - 0.5 * plan.var_g_large)
    if not shear:
        return kappa, kappa_large, None, None
    # Sample κ_L on a coarse grid of the large torus, take its Kaiser-Squires
    # shear there, and sum that Fourier series on the torus's pixels.
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


# ### One field
def _draw_halo_shape(rng, sim):
    eps = np.clip(rng.normal(sim.ellipticity_mean, sim.ellipticity_std), 0.0, sim.ellipticity_max)
    return 1.0 - eps, rng.uniform(0.0, 180.0)


def _draw_cluster(config, rng, sim, cosmo):
    """The main halo near the field centre and, in a fraction of fields, its companions."""
    m = float(draw_main_mass(rng, config, sim))
    c = float(draw_concentration(m, config.z_lens, rng, sim, config.H0 / 100))
    r = sim.main_offset_max_arcmin * 60.0 * np.sqrt(rng.uniform())
    phi = rng.uniform(0.0, 2 * np.pi)
    x0 = config.npix * config.pixel_arcsec / 2 + r * np.cos(phi)
    y0 = config.npix * config.pixel_arcsec / 2 + r * np.sin(phi)
    q, ang = _draw_halo_shape(rng, sim)
    main = dict(m200_msun=m, c200=c, z=config.z_lens, x_arcsec=x0, y_arcsec=y0,
                axis_ratio=q, angle_deg=ang)
    companions = []
    if rng.uniform() < sim.merger_fraction:
        arcsec_per_mpc = 1.0 / (cosmo.angular_diameter_distance(config.z_lens).to_value(u.Mpc)
                                * np.radians(1.0 / 3600.0))
        for _ in range(rng.integers(sim.n_companions[0], sim.n_companions[1] + 1)):
            mc = m * np.exp(rng.uniform(*np.log(sim.companion_mass_ratio)))
            cc = float(draw_concentration(mc, config.z_lens, rng, sim, config.H0 / 100))
            d = rng.uniform(*sim.companion_separation_mpc) * arcsec_per_mpc
            ph = rng.uniform(0.0, 2 * np.pi)
            qc, angc = _draw_halo_shape(rng, sim)
            companions.append(dict(m200_msun=mc, c200=cc, z=config.z_lens,
                                   x_arcsec=x0 + d * np.cos(ph), y_arcsec=y0 + d * np.sin(ph),
                                   axis_ratio=qc, angle_deg=angc))
    return main, companions


def simulate_cluster_field(config: Config, rng, sim: SimulatorConfig = SIMULATOR, cluster=True,
                           shear=True):
    """Truth κ and γ of one field (paper §2.3.1).

    Parameters
    ----------
    config : Config
        Field size, grid, cosmology, z_l and z_s.
    rng : numpy.random.Generator
        Every random draw (same seed, same field).
    cluster : bool
        False: no main cluster, a random patch of sky (for sim_stats.py).
    shear : bool
        False: skip γ (``gamma1``, ``gamma2`` are None), for statistics of κ.

    Returns
    -------
    dict
        ``kappa``, ``gamma1``, ``gamma2``: (npix, npix) maps [y, x].
        ``main`` (None without a cluster) and ``companions`` (list): dicts of
        ``m200_msun``, ``c200``, ``z``, ``x_arcsec``, ``y_arcsec`` (from the
        field's lower-left corner), ``axis_ratio``, ``angle_deg``.
        ``field_halos``: arrays ``m200_msun``, ``z``, ``c200``, ``x_arcsec``,
        ``y_arcsec`` (many outside the field: they lie on the whole torus).
        ``kappa0``: shift of the log-normal.

    Notes
    -----
    κ = κ_cluster + Σ κ_field halo − ⟨κ_h⟩ + κ_LSS on a torus of ``pad_factor``
    × the field side, the field at its centre.  γ is a periodic FFT on the
    torus (halos wrap around, the LSS lives on its modes; zero padding would
    cut the LSS off) plus the large modes' shear.  The cluster's periodic
    images' shear cancels at the centre to leading order.
    """
    wlcnn.check_rng(rng)
    cosmo = wlcnn.cosmology(config)
    n_field = config.npix
    n = sim.pad_factor * n_field
    pix_arcsec = config.pixel_arcsec
    lo = (n - n_field) // 2  # torus pixel of the field's first pixel

    kappa = np.zeros((n, n))
    main, companions = _draw_cluster(config, rng, sim, cosmo) if cluster else (None, [])
    for h in ([main] if cluster else []) + companions:
        paint_tnfw(kappa, h["x_arcsec"] / pix_arcsec + lo, h["y_arcsec"] / pix_arcsec + lo,
                   h["m200_msun"], h["c200"], h["z"], config.z_source, cosmo, pix_arcsec,
                   h["axis_ratio"], h["angle_deg"], sim)

    halos = draw_field_halos((n * np.radians(pix_arcsec / 3600.0)) ** 2, rng, config, sim)
    nh = halos["m200_msun"].size
    xh = rng.uniform(0.0, n, nh)
    yh = rng.uniform(0.0, n, nh)
    amp, rs_pix, t = _halo_pixel_scales(halos["m200_msun"], halos["c200"], halos["z"],
                                        config.z_source, cosmo, pix_arcsec, sim)
    for k in np.nonzero(amp > 0)[0]:
        _paint_stamp(kappa, xh[k], yh[k], amp[k], rs_pix[k], t[k], 1.0, 0.0, sim, wrap=True)
    halos["x_arcsec"] = (xh - lo) * pix_arcsec
    halos["y_arcsec"] = (yh - lo) * pix_arcsec
    if sim.halo_smoothing_fwhm_arcsec > 0:
        # Periodic smoothing on the torus: exact, since halos wrap around.
        ell = 2 * np.pi * np.fft.fftfreq(n, d=np.radians(pix_arcsec / 3600.0))
        sig = np.radians(sim.halo_smoothing_fwhm_arcsec / 3600.0) / wlcnn.FWHM_PER_SIGMA
        gauss = np.exp(-0.5 * (ell[:, None] ** 2 + ell[None, : n // 2 + 1] ** 2) * sig**2)
        kappa = scipy.fft.irfft2(scipy.fft.rfft2(kappa) * gauss, s=(n, n))
    kappa -= halo_mean_kappa(config, sim)

    plan = lognormal_plan(config, sim)
    k_lss, k_large, g1_large, g2_large = lognormal_lss(rng, plan, sim, shear)
    kappa += k_lss
    cut = (slice(lo, lo + n_field), slice(lo, lo + n_field))
    g1 = g2 = None
    if shear:
        g1, g2 = wlcnn.shear_from_kappa(kappa - k_large, pad=False)
        g1 = (g1 + g1_large)[cut].copy()
        g2 = (g2 + g2_large)[cut].copy()
    return {"kappa": kappa[cut].copy(), "gamma1": g1, "gamma2": g2,
            "main": main, "companions": companions, "field_halos": halos,
            "kappa0": plan.kappa0}


# ### Dataset
def _shard_name(split, k):
    return f"{split}/shard-{k:05d}.npz"


def _write_shard(task):
    """Make clusters first, ..., first + n - 1 of a split and write them as one shard."""
    out_dir, split, k, first, n, config, seed, masks, field_fn = task
    clusters = []
    for i in range(first, first + n):
        rng = wlcnn.cluster_rng(seed, split, i)
        clusters.append(wlcnn.make_cluster(field_fn(config, rng, split, i), config, rng, masks))
    arrays = {"index": np.arange(first, first + n, dtype=np.int64)}
    for key in ("kappa", "gamma1", "gamma2"):
        arrays[key] = np.stack([c[key] for c in clusters]).astype(np.float32)
    # catalogs and masks are ragged: concatenated, with offsets
    for prefix, key, cols in (("cat", "catalog", wlcnn.CATALOG_COLUMNS),
                              ("mask", "masks", wlcnn.MASK_COLUMNS)):
        lengths = [len(c[key]) for c in clusters]
        arrays[f"{prefix}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for col in cols:
            # positions and masks keep float64; magnitudes and shapes need no more than float32
            dtype = np.float32 if prefix == "cat" and col not in ("x", "y") else np.float64
            values = [np.asarray(c[key][col], dtype=np.float64) for c in clusters]
            arrays[f"{prefix}_{col}"] = np.concatenate(values).astype(dtype)
    arrays["meta"] = np.array([json.dumps(c["meta"], sort_keys=True) for c in clusters])

    def write(tmp):
        # np.savez_compressed stamps zip entries with a fixed date: same seed, same bytes
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    wlcnn.atomic_write(Path(out_dir) / _shard_name(split, k), write)


def write_dataset(out_dir, counts, config=PAPER, seed=0, field_fn=None, masks=False,
                  shard_size=25, workers=1, shard=None, generator="simulate", progress=True):
    """Simulate clusters into ``out_dir`` as ``{split}/shard-NNNNN.npz`` files and a manifest.

    ``counts``: clusters per split (the paper's: train 5,000, val 1,800, test 200, §2.3.1).
    ``field_fn(config, rng, split, index)`` returns a cluster's ``kappa``, ``gamma1``,
    ``gamma2`` and ``meta`` (:func:`simulated_field`, ``examples/ingest_raytraced.py``);
    ``masks``: bright-star masks (§3.5). Every draw derives from ``seed``
    (:func:`wlcnn.cluster_rng`): the same seed writes the same bytes. A shard is written
    under a temporary name and renamed, so a rerun makes only the missing shards.
    ``shard=(i, n)`` makes the shards numbered i mod n (one job of a batch array). The run that finds every shard written adds
    ``manifest.json`` (with each shard's SHA-256) and returns it; the others return None.
    """
    if not callable(field_fn):
        raise TypeError("write_dataset needs field_fn(config, rng, split, index), e.g. "
                        "skies.simulated_field or a ray-traced reader (ingest_raytraced.py)")
    for split, n in counts.items():
        wlcnn.check_split(split)
        if int(n) < 0:
            raise ValueError(f"negative count for split {split!r}")
    if shard_size < 1 or workers < 1:
        raise ValueError("shard_size and workers must be positive")
    out = Path(out_dir)
    plan = [(split, k, first, min(shard_size, int(counts.get(split, 0)) - first))
            for split in wlcnn.SPLITS
            for k, first in enumerate(range(0, int(counts.get(split, 0)), shard_size))]
    if not plan:
        raise ValueError("no clusters requested: every split count is zero")
    manifest_path = out / "manifest.json"
    header = {"format": wlcnn.DATASET_FORMAT, "version": wlcnn.DATASET_VERSION,
              "generator": generator,
              "seed": int(seed), "masks": bool(masks), "shard_size": int(shard_size),
              "counts": {s: int(counts.get(s, 0)) for s in wlcnn.SPLITS},
              "config": wlcnn.data_config(config)}
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if {k: old.get(k) for k in header} != header:
            raise ValueError(f"{out} holds a dataset made with other settings; use another --out")
    for split in wlcnn.SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    tasks = [(str(out), s, k, first, n, config, seed, masks, field_fn)
             for j, (s, k, first, n) in enumerate(plan)
             if (shard is None or j % shard[1] == shard[0])
             and not (out / _shard_name(s, k)).exists()]
    bar = wlcnn.Progress(len(tasks), "simulate shards") if progress and tasks else None
    if workers == 1 or len(tasks) <= 1:
        for t in tasks:
            _write_shard(t)
            bar and bar.update()
    else:
        # "spawn": forking a process that has imported TensorFlow can deadlock
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for _ in pool.map(_write_shard, tasks):
                bar and bar.update()
    if not all((out / _shard_name(s, k)).exists() for s, k, _, _ in plan):
        return None
    shards = {s: [] for s in wlcnn.SPLITS}
    for s, k, first, n in plan:
        shards[s].append({"file": _shard_name(s, k), "split": s, "first": first, "n": n,
                          "sha256": wlcnn.file_sha256(out / _shard_name(s, k))})
    packages = {"wlcnn": wlcnn.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
                "astropy": astropy.__version__}
    manifest = dict(header, shards=shards, packages=packages)
    wlcnn.atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return manifest


def simulated_field(config, rng, split, index, sim: SimulatorConfig = SIMULATOR):
    """``field_fn`` of :func:`write_dataset`: a cluster field, its halos kept as metadata
    (another ``sim`` through ``functools.partial``, as ``simulate_skies.py`` does)."""
    field = simulate_cluster_field(config, rng, sim)
    field["meta"] = {"main": {k: float(v) for k, v in field["main"].items()},
                     "companions": [{k: float(v) for k, v in h.items()}
                                    for h in field["companions"]],
                     "n_field_halos": int(field["field_halos"]["m200_msun"].size),
                     "kappa0": float(field["kappa0"])}
    return field


# ## 2. Real skies: a shear catalog, its field and its tiled reconstruction (§4.2)
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


# ### Reading a catalog
class CatalogWarning(UserWarning):
    """Rows of a catalog were dropped, or its weights rescaled."""


class SkyCatalog(NamedTuple):
    """A shear catalog read by :func:`read_catalog`, in the euclidean frame."""
    ra: np.ndarray     #: (n,) right ascension, degrees (ICRS)
    dec: np.ndarray    #: (n,) declination, degrees
    e1: np.ndarray     #: (n,) ellipticity along local West
    e2: np.ndarray     #: (n,) ellipticity along local North-West
    sigma: np.ndarray  #: (n,) per-component ellipticity error σ
    counts: dict       #: rows, dropped_text, dropped_nan, dropped_weight, dropped_ellipticity
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


def _float_column(table, name, source, angle=False):
    """A column as float64, and its unreadable entries.

    Masked (empty) entries become NaN; so do entries that are not numbers (text
    in a numeric column), which :func:`read_catalog` drops with the rest of the
    unusable rows.  A column without a single number is no such column: a
    ValueError names the file, the column and its first entry.

    Returns
    -------
    values : (n,) float64 array
        Degrees for an angle column with a unit.
    text_rows : (k,) int array
        Row indices (0-based) of the entries that are not numbers.
    """
    col = table[name]
    if np.ndim(col) != 1:
        raise ValueError(f"{source}: column {name!r} holds arrays of shape {col.shape[1:]} per "
                         "row, not one number")
    text_rows = np.zeros(0, dtype=int)
    if np.issubdtype(col.dtype, np.number) or np.issubdtype(col.dtype, np.bool_):
        values = np.ma.masked_array(col, dtype=np.float64).filled(np.nan)
    else:  # text: read entry by entry, so that one bad entry costs only its row
        masked = np.ma.getmaskarray(col)
        values = np.full(len(col), np.nan)
        bad = []
        for i, entry in enumerate(np.ma.getdata(col)):
            if masked[i]:
                continue
            try:
                values[i] = float(entry)
            except (TypeError, ValueError):
                bad.append(i)
        text_rows = np.asarray(bad, dtype=int)
        if len(text_rows) and len(text_rows) == (~masked).sum():
            raise ValueError(
                f"{source}: column {name!r} is not numeric: its first entry, row "
                f"{text_rows[0] + 1}, is {str(col[text_rows[0]])!r}"
                + ("; give RA and Dec in degrees" if angle else ""))
    unit = getattr(col, "unit", None)
    if angle and unit is not None:
        if not u.Unit(unit).is_equivalent(u.deg):
            raise ValueError(f"{source}: column {name!r} has unit {unit}, not an angle")
        values = (values * u.Unit(unit)).to_value(u.deg)
    return values, text_rows


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
        Clean rows, in the euclidean frame.

    Notes
    -----
    One policy for unusable rows: a row is dropped, counted by reason and
    reported in one :class:`CatalogWarning` if any of its five entries is
    NaN/inf, empty (masked) or not a number (text in a numeric column: the
    first such row is named), its w ≤ 0 (σ outside ``wlcnn.SIGMA_RANGE``) or
    its |ε| ≥ 1.  A ValueError instead for what no row can mend: a missing
    column, a column with no number at all (named with its first entry), no
    usable row left, |Dec| > 90°.
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
    columns = {opt: _float_column(table, found[opt], source, angle=opt in ("ra_col", "dec_col"))
               for opt in wanted}
    ra, dec, e1, e2, err = (columns[opt][0] for opt in wanted)
    text = np.zeros(len(table), dtype=bool)
    first_text = None  # (row, column, entry) of the first entry that is not a number
    for opt, (_, rows) in columns.items():
        text[rows] = True
        if len(rows) and (first_text is None or rows[0] < first_text[0]):
            first_text = (int(rows[0]), found[opt], str(table[found[opt]][rows[0]]))

    finite = np.isfinite(ra) & np.isfinite(dec) & np.isfinite(e1) & np.isfinite(e2)
    finite &= np.isfinite(err)
    if np.any(np.abs(dec[finite]) > 90.0):
        raise ValueError(f"{source}: column {found['dec_col']!r} has values beyond ±90°: "
                         "not a declination in degrees")
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = err if sigma_col is not None else 1.0 / np.sqrt(err)
    good_err = finite & (sigma >= SIGMA_RANGE[0]) & (sigma <= SIGMA_RANGE[1])
    keep = good_err & (np.hypot(e1, e2) < MAX_ELLIPTICITY)
    counts = {"rows": len(table), "dropped_text": int(text.sum()),
              "dropped_nan": int((~finite & ~text).sum()),
              "dropped_weight": int((finite & ~good_err).sum()),
              "dropped_ellipticity": int((good_err & ~keep).sum())}
    detail = ((f"{counts['dropped_text']} with an entry that is not a number (first: row "
               f"{first_text[0] + 1}, column {first_text[1]!r}: {first_text[2]!r}), "
               if first_text else "")
              + f"{counts['dropped_nan']} with NaN/inf or empty entries, "
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


# ### The tangent plane (x West, y North)
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


# ### The field, its tiles and the noise fill
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
    [pool·k, pool·(k + 1)), so :func:`wlcnn.block_mean` puts a channel on the output grid.
    """
    cfg = geometry.config
    origin = -geometry.npix / 2 * geometry.pixel_arcsec
    return _grid_at(x, y, e1, e2, sigma, origin, origin, cfg.pool * geometry.npix, cfg)


def grid_tile(x, y, e1, e2, sigma, geometry, start_y, start_x):
    """The catalog gridded on the 32′ network input of one tile (``config.npix``²)."""
    cfg = geometry.config
    return _grid_at(x, y, e1, e2, sigma, geometry.tile_origin_arcsec(start_x),
                    geometry.tile_origin_arcsec(start_y), cfg.npix, cfg)


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


# ### The K runs of a model
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


# ### The KS93 and CNN maps of the field
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
    return wlcnn.block_mean(smooth_map(ks93(g[0], g[1]), fwhm_arcmin, cfg), cfg.pool)


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


# ### The FITS file and the figure
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
            ("NDRTEXT", "dropped_text", "rows dropped: an entry not a number"),
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


@dataclass(frozen=True)
class ReconstructOptions:
    """Options of :func:`reconstruct` (the command line's, examples/reconstruct_catalog.py).

    Attributes
    ----------
    ra_col, dec_col, e1_col, e2_col, weight_col, sigma_col : str or None
        Catalog columns, as :func:`read_catalog`: RA and Dec in degrees, the
        ellipticities (dimensionless), and an inverse-variance weight w = 1/σ²
        or, with ``sigma_col``, the per-component ellipticity error σ.
    coordinate_system : {"euclidean", "celestial"}
        Frame of (e1, e2), CLMM's names (:data:`COORDINATE_SYSTEMS`).
    center : (float, float), optional
        Field centre (RA, Dec), degrees; default :func:`catalog_center`.
    size_arcmin : float, optional
        Side of the square field, arcmin, rounded up to 11.52″ pixels.  Default
        :func:`default_size_arcmin`: the catalog's extent about the centre, but
        one tile's field (26.1′ at stride 12) for a catalog that fits one 32′
        network input (:func:`fits_one_input`), as a 32′ catalog does.
    z_lens, z_source : float, optional
        Lens and effective source redshifts, recorded with Σ_c (default the
        training's); κ is not rescaled (:func:`redshift_info`).
    stride : int
        Mosaic offset step in network-input pixels, a multiple of 3 (paper: 3).
    orientations : int
        Orientations averaged: 1 or the paper's 6.
    config : wlcnn.Config, optional
        The models' configuration; default the one they were trained with.
    ks93_fwhm_arcmin : float, optional
        Gaussian smoothing FWHM of KAPPA_KS93, arcmin; default
        :func:`ks93_fwhm_for_density` of the catalog's density.
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
        existing output; a progress bar over tiles and fills.
    """

    ra_col: str = "ra"
    dec_col: str = "dec"
    e1_col: str = "e1"
    e2_col: str = "e2"
    weight_col: str | None = "weight"
    sigma_col: str | None = None
    coordinate_system: str = "euclidean"
    center: tuple | None = None
    size_arcmin: float | None = None
    z_lens: float | None = None
    z_source: float | None = None
    stride: int = 12
    orientations: int = 1
    config: Config | None = None
    ks93_fwhm_arcmin: float | None = None
    outside: str = "noise"
    n_fills: int = NOISE_FILLS
    seed: int = 0
    rescale_weights: bool = True
    png: bool = True
    overwrite: bool = False
    progress: bool = False


def reconstruct(catalog, models, out_path, options=ReconstructOptions()):
    """Mass maps of a real shear catalog: the §4.2 application as one call.

    Parameters
    ----------
    catalog : str, os.PathLike or astropy.table.Table
        Sources in sky coordinates, read by :func:`read_catalog`.
    models : path, keras.Model, or a sequence of them
        The K runs: a train output directory, .keras files, or models.
    out_path : str or os.PathLike
        Output FITS (".fits" or ".fits.gz"), written atomically; the PNG beside it.
    options : ReconstructOptions
        Columns, field, mosaic, fills and output settings.

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
    if not isinstance(options, ReconstructOptions):
        raise TypeError(f"options must be a ReconstructOptions, got {type(options).__name__}")
    # The options under their own names: the body reads as the one-call function it is.
    o = options
    ra_col, dec_col, e1_col, e2_col = o.ra_col, o.dec_col, o.e1_col, o.e2_col
    weight_col, sigma_col, coordinate_system = o.weight_col, o.sigma_col, o.coordinate_system
    center, size_arcmin, z_lens, z_source = o.center, o.size_arcmin, o.z_lens, o.z_source
    stride, orientations, config = o.stride, o.orientations, o.config
    ks93_fwhm_arcmin, outside, n_fills, seed = o.ks93_fwhm_arcmin, o.outside, o.n_fills, o.seed
    rescale_weights, png, overwrite, progress = o.rescale_weights, o.png, o.overwrite, o.progress
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
    density = wlcnn.block_mean(field[3], config.pool)
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



# ## 3. Mass peaks: S/N maps, peak tables, matching to known objects
#: How a known object outside the map's footprint is treated: "error" (a
#: ValueError naming the objects) or "skip" (left out of the statistics, counted).
OUTSIDE_POLICIES = ("error", "skip")

#: Peak-table formats by file-name ending.
PEAK_FORMATS = {".fits": "fits", ".fits.gz": "fits", ".ecsv": "ascii.ecsv"}


# ### Noise realisations and S/N
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
    (:func:`ks93_fwhm_for_density`).
    """
    if fwhm_arcmin is None:
        fwhm_arcmin = ks93_fwhm_for_density(source_density(x, y, geometry))

    def map_fn(e1, e2):
        grid = grid_field(x, y, e1, e2, sigma, geometry)
        return ks93_field_map(grid, geometry, fwhm_arcmin)
    return map_fn


def cnn_map_fn(x, y, sigma, models, geometry, rng, n_fills=1, orientations=1):
    """``(e1, e2) -> KAPPA_CNN`` (mean of the runs, no-data regions noise-filled) of the field."""
    def map_fn(e1, e2):
        res, _ = filled_cnn_map(x, y, e1, e2, sigma, models, geometry, rng, n_fills,
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


# ### Peaks
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


# ### Known objects: footprint, matching, completeness and purity, stacking
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
    values: np.ndarray   #: (n,) κ at each object (their mean is ``kappa``)


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
    at_objects = values_at(kappa, wcs, ra, dec)
    stacked = float(np.mean(at_objects))
    rra, rdec = random_positions(wcs, footprint, ra.size * int(n_random), rng)
    sets = values_at(kappa, wcs, rra, rdec).reshape(int(n_random), ra.size).mean(axis=1)
    mean, std = float(sets.mean()), float(sets.std(ddof=1))
    return Stack(ra.size, stacked, mean, std, (stacked - mean) / std, at_objects)
