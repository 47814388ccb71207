"""wlcnn: weak-lensing mass reconstruction of galaxy clusters with a CNN.

A single-module reference implementation of Hong, Park, Jee, Bak & Cha (2021),
"Weak-lensing Mass Reconstruction of Galaxy Clusters with Convolutional Neural
Network" (ApJ).  The module reads in the paper's order:

* §2.1   weak-lensing basics: Σ_c (eq. 4), reduced shear (eq. 2), lensed
         ellipticity (eq. 7);
* §2.2   shear from convergence (eq. 8-9) and the Kaiser & Squires (1993)
         inversion (eq. 10);
* §2.3.1 training data: NFW clusters, source catalogs with shape and
         measurement noise, bright-star masks;
* §2.3.2 gridding of a catalog onto the network's input pixels;
* command line.

Conventions (``DESIGN.md``): arrays are indexed ``[row, col] = [y, x]``; pixel
``(i, j)`` has its centre at ``x = (j + 1/2) * pixel``, ``y = (i + 1/2) * pixel``
arcsec from the field's lower-left corner; x grows to the right (West on the
sky), y grows up (North).  Complex shear ``g = g1 + i g2``: ``g1 > 0`` stretches
along x, ``g2 > 0`` along the line x = y.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import threading
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.special
from astropy import constants as const
from astropy import units as u
from astropy.cosmology import FlatLambdaCDM
from astropy.table import Table

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


def draw_magnitudes(n, config, rng):
    """``n`` V-band magnitudes from :func:`magnitude_pdf` (inverse CDF)."""
    grid = np.linspace(config.mag_min, config.mag_max, 4097)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * np.diff(grid) * (
        magnitude_pdf(grid[1:], config) + magnitude_pdf(grid[:-1], config)))])
    return np.interp(rng.uniform(0.0, cdf[-1], n), cdf, grid)


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
# §2.3.2 Gridding the catalog onto the input pixels (the Cython extension)
# ---------------------------------------------------------------------------
_workspace = threading.local()


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
            ok = (d2 <= rcut**2) & (i >= 0) & (i < npix) & (j >= 0) & (j < npix)
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
        W is set to zero beyond ``cut_sigma`` σ_W (4σ_W = 11.9″ for the paper:
        e^{-8} ≈ 3e-4 of the peak, and the kernel stays circular).
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
    acc = getattr(_workspace, "acc", None)
    if acc is None or acc.shape[:2] != (npix, npix):
        acc = _workspace.acc = np.empty((npix, npix, 5))
    s_pix = fwhm_arcsec / FWHM_PER_SIGMA / pixel_arcsec
    xp, yp = x / pixel_arcsec - 0.5, y / pixel_arcsec - 0.5
    near = _within_reach(xp, yp, npix, cut_sigma * s_pix)
    if not near.all():  # keeps the integer casts in the loop within range
        xp, yp, e1, e2, sigma = xp[near], yp[near], e1[near], e2[near], sigma[near]
    _grid.grid(xp, yp, e1, e2, 1.0 / sigma**2, s_pix, cut_sigma * s_pix, empty_error,
               _density_norm(fwhm_arcsec), acc, out)
    return out


def grid_table(catalog, config=PAPER, out=None):
    """:func:`grid_catalog` of a catalog table from :func:`simulate_catalog`."""
    return grid_catalog(catalog["x"], catalog["y"], catalog["e1"], catalog["e2"], catalog["sigma"],
                        config.npix, config.pixel_arcsec, config.fwhm_arcsec,
                        config.kernel_cut_sigma, config.empty_pixel_error, out=out)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _cmd_config(args):
    """Print the paper's numbers (the Config defaults) as JSON."""
    import json
    cfg = PAPER
    print(json.dumps({**dataclasses.asdict(cfg), "pixel_arcsec": cfg.pixel_arcsec}, indent=2))
    return 0


def build_parser():
    """The ``python -m wlcnn`` / ``wlcnn`` argument parser."""
    parser = argparse.ArgumentParser(prog="wlcnn", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wlcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the paper's numbers used as defaults")
    p.set_defaults(func=_cmd_config)
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
