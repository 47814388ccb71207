"""
Title: Simulated training skies (cluster fields) for wlcnn
Description: Truth κ and γ of 32′ × 32′ cluster fields drawn from ΛCDM, written
as a wlcnn training dataset (paper §2.3.1).

The paper trains its network on cluster fields cut from the MassiveNuS
ray-traced convergence maps.  This script stands in for those maps with a
halo-model sky whose power spectrum and one-point PDF follow ΛCDM theory
(sim_stats.py: over 500 random fields the mean C_ℓ is within 2.1 % of theory
in every bin of ℓ = 500-10,000).  Each field, on a torus twice the field side, is

* a main cluster near the centre: a truncated, elliptical NFW halo with M200c
  drawn from the Tinker et al. (2008) mass function at z_l = 0.5, Duffy et al.
  (2008) concentrations with log-normal scatter, and in 30 % of the fields
  2-3 merging companions;
* field halos along the line of sight (3e13-3e15 M☉, 0 < z < z_s), a Poisson
  draw from the same mass function;
* a log-normal large-scale field carrying the rest of the halofit C_ℓ
  (the two-halo term and the halos below the mass cut);

and the shear is the Kaiser-Squires transform of κ on the torus (wlcnn's
``shear_from_kappa``), the modes larger than the torus added on a larger one.
The ΛCDM tables (C_ℓ and mass function) are in examples/theory/, made by
make_theory_tables.py.

Run (510 fields, about 0.6 s of CPU each: some 5 min on one free core):

    python examples/simulate_skies.py --out data/quick --n-train 400 --n-val 50 --n-test 60 --seed 1

The paper's split is the default (5,000 / 1,800 / 200); ``--workers`` runs
shards in parallel, ``--shard i/N`` one job of a batch array, and a rerun
resumes an interrupted dataset.
"""
# ## Setup
import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import astropy
import numpy as np
import scipy
import scipy.fft
import scipy.special
from astropy import constants as const
from astropy import units as u
from astropy.table import Table
from scipy.interpolate import RegularGridInterpolator

import wlcnn
from wlcnn import PAPER, Config

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


# ## ΛCDM theory tables
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


# ## Halos: truncated NFW profiles painted on pixels
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


def halo_scales(m200_msun, c200, z, cosmo):
    """r200, r_s [physical Mpc] and ρ_s [M☉/Mpc³]: M(< r) = 4π ρ_s r_s³ m(r / r_s)."""
    m = np.asarray(m200_msun, dtype=np.float64)
    c = np.asarray(c200, dtype=np.float64)
    rho_c = cosmo.critical_density(np.asarray(z, dtype=np.float64)).to_value(u.Msun / u.Mpc**3)
    r200 = (3.0 * m / (800.0 * np.pi * rho_c)) ** (1.0 / 3.0)
    rs = r200 / c
    rho_s = m / (4.0 * np.pi * rs**3 * _nfw_m(c))
    return r200, rs, rho_s


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
    _, rs, rho_s = halo_scales(m200_msun, c200, z, cosmo)
    x = np.asarray(r_mpc, dtype=np.float64) / rs
    with np.errstate(divide="ignore"):
        return 2.0 * rho_s * rs * _tnfw_g(x, truncation_r200 * c200)


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


def sigma_crit_array(z, z_s, cosmo):
    """Σ_c [M☉/Mpc²] of ``wlcnn.sigma_crit`` for an array of lens redshifts; inf for z ≥ z_s."""
    z = np.asarray(z, dtype=np.float64)
    d_l = cosmo.angular_diameter_distance(z).to_value(u.Mpc)
    d_s = cosmo.angular_diameter_distance(z_s).to_value(u.Mpc)
    d_ls = cosmo.angular_diameter_distance(np.minimum(z, z_s), z_s).to_value(u.Mpc)
    k = (const.c**2 / (4 * np.pi * const.G)).to_value(u.Msun / u.Mpc)
    with np.errstate(divide="ignore"):
        return np.where(z < z_s, k * d_s / (d_l * np.maximum(d_ls, 0.0)), np.inf)


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
    _, rs, rho_s = halo_scales(m200_msun, c200, z, cosmo)
    d_a = cosmo.angular_diameter_distance(z).to_value(u.Mpc)
    rs_pix = rs / (d_a * np.radians(pixel_arcsec / 3600.0))
    return 2.0 * rho_s * rs / sigma_crit_array(z, z_s, cosmo), rs_pix, sim.truncation_r200 * c200


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


# ## The halo population: mass function and one-halo power
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
    return HaloGrid(z_edges, lnm_edges, counts, sigma_crit_array(z_mid, config.z_source, cosmo),
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
    for iz in np.nonzero(np.isfinite(g.sigma_crit))[0]:
        c_med = concentration_duffy08(m, z[iz], sim, config.H0 / 100)
        to_kappa = 1.0 / (g.sigma_crit[iz] * g.d_a_mpc[iz] ** 2)  # M☉ → κ̃ [sr]
        for xn, wn in zip(nodes, weights):
            c = c_med * np.exp(sim.concentration_scatter_ln * xn)
            _, rs, rho_s = halo_scales(m, c, z[iz], cosmo)
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


# ## The log-normal large-scale structure
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


# ## One field
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


# ## Dataset
# ---------------------------------------------------------------------------
# Dataset files: the simulated clusters as {split}/shard-NNNNN.npz and a manifest
# (wlcnn.ClusterDataset reads them)
# ---------------------------------------------------------------------------
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
    under a temporary name and renamed, so a rerun makes only the missing shards. ``shard=(i, n)`` makes the shards
    numbered i mod n (one job of a batch array). The run that finds every shard written adds
    ``manifest.json`` (with each shard's SHA-256) and returns it; the others return None.
    """
    if not callable(field_fn):
        raise TypeError("write_dataset needs field_fn(config, rng, split, index), e.g. "
                        "simulate_skies.simulated_field (examples/) or a ray-traced reader")
    for split, n in counts.items():
        wlcnn._check_split(split)
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
              "config": wlcnn._data_config(config)}
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
                          "sha256": wlcnn._sha256(out / _shard_name(s, k))})
    packages = {"wlcnn": wlcnn.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
                "astropy": astropy.__version__}
    manifest = dict(header, shards=shards, packages=packages)
    wlcnn._atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return manifest


def simulated_field(config, rng, split, index):
    """``field_fn`` of :func:`write_dataset`: a cluster field, its halos kept as metadata."""
    field = simulate_cluster_field(config, rng)
    field["meta"] = {"main": {k: float(v) for k, v in field["main"].items()},
                     "companions": [{k: float(v) for k, v in h.items()}
                                    for h in field["companions"]],
                     "n_field_halos": int(field["field_halos"]["m200_msun"].size),
                     "kappa0": float(field["kappa0"])}
    return field


def _shard_arg(text):
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/N, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/N needs 0 <= i < N, got {text!r}")
    return i, n


def main(argv=None):
    """Simulate cluster fields into a dataset; returns the exit status."""
    p = argparse.ArgumentParser(description="simulate cluster fields into a wlcnn dataset (§2.3.1)")
    p.add_argument("--out", required=True, help="dataset directory")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--masks", action="store_true", help="bright-star masks (§3.5)")
    p.add_argument("--workers", type=int, default=1, help="processes making shards")
    p.add_argument("--shard-size", type=int, default=25, help="clusters per shard file")
    p.add_argument("--n-train", type=int, default=5000, help="paper: 5,000")
    p.add_argument("--n-val", type=int, default=1800, help="paper: 1,800")
    p.add_argument("--n-test", type=int, default=200, help="paper: 200")
    p.add_argument("--shard", type=_shard_arg, default=None,
                   help="i/N: make only every N-th shard starting at i (a job of a batch array)")
    args = p.parse_args(argv)
    counts = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    try:
        manifest = write_dataset(args.out, counts, PAPER, args.seed,
                                       field_fn=simulated_field, masks=args.masks,
                                       shard_size=args.shard_size, workers=args.workers,
                                       shard=args.shard)
    except (ValueError, TypeError, OSError) as exc:
        print(f"simulate_skies: error: {exc}", file=sys.stderr)
        return 2
    if manifest is None:
        print(f"{args.out}: this job's shards are done; the manifest follows when every shard is")
    else:
        print(f"{args.out}: complete, {sum(manifest['counts'].values())} clusters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
