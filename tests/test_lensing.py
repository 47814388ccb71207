"""§2.1-2.2: Σ_c, eq. 7, shear from convergence (eq. 8-9) and KS93 (eq. 10)."""
import numpy as np
import pytest
import scipy.signal
from astropy import constants as const
from astropy import units as u
from scipy.integrate import quad

import wlcnn


# -- eq. 4 --------------------------------------------------------------------
def test_sigma_crit_matches_hand_calculation():
    """Σ_c from distances integrated here by hand, flat ΛCDM, H0 = 70, Ωm = 0.3."""
    h0, om = 70.0, 0.3
    d_h = (const.c / (h0 * u.km / u.s / u.Mpc)).to(u.Mpc)

    def chi(z):
        def integrand(zz):
            return 1.0 / np.sqrt(om * (1 + zz) ** 3 + 1 - om)
        return quad(integrand, 0, z, epsabs=0, epsrel=1e-12)[0] * d_h

    z_l, z_s = 0.5, 1.5
    d_l = chi(z_l) / (1 + z_l)
    d_s = chi(z_s) / (1 + z_s)
    d_ls = (chi(z_s) - chi(z_l)) / (1 + z_s)  # flat universe
    expect = (const.c**2 / (4 * np.pi * const.G) * d_s / (d_l * d_ls)).to(u.Msun / u.Mpc**2)
    got = wlcnn.sigma_crit(z_l, z_s)
    assert got.unit == u.Msun / u.Mpc**2
    # 1e-8: both sides are exact up to quadrature error (epsrel 1e-12).
    assert got.value == pytest.approx(expect.value, rel=1e-8)
    # A literature anchor: ~2.3e15 M☉/Mpc² for z_l = 0.5, z_s = 1.5 (0.1 % rounding).
    assert got.value == pytest.approx(2.3285e15, rel=1e-3)


@pytest.mark.parametrize("z_l, z_s", [(0.5, 0.5), (0.5, 0.3), (0.0, 1.0), (np.nan, 1.0),
                                      ([0.3, 1.6], 1.5)])
def test_sigma_crit_rejects_unphysical_redshifts(z_l, z_s):
    with pytest.raises(ValueError):
        wlcnn.sigma_crit(z_l, z_s)


def test_sigma_crit_and_nfw_scale_of_arrays_are_those_of_each_element():
    z = np.array([0.1, 0.5, 1.2])
    many = wlcnn.sigma_crit(z, 1.5)
    assert many.shape == (3,) and many.unit == u.Msun / u.Mpc**2
    m, c = np.array([1e14, 5e14, 2e15]), np.array([5.0, 4.0, 3.0])
    r_s, sigma_s = wlcnn.nfw_scale(m, c, z)
    for i in range(3):
        # the same arithmetic element by element: equal to round-off
        assert many[i].value == pytest.approx(wlcnn.sigma_crit(z[i], 1.5).value, rel=1e-12)
        one = wlcnn.nfw_scale(m[i], c[i], z[i])
        assert (r_s[i], sigma_s[i]) == pytest.approx(one, rel=1e-12)
    with pytest.raises(ValueError, match="positive"):
        wlcnn.nfw_scale(m, np.array([5.0, -1.0, 3.0]), z)


# -- eq. 7 ------------------------------------------------------------------------
def test_lens_ellipticity_inverts_to_intrinsic_ellipticity():
    rng = np.random.default_rng(1)
    e = wlcnn.draw_intrinsic_ellipticity(10_000, 0.3, rng)
    g = 0.9 * np.sqrt(rng.uniform(size=e.size)) * np.exp(2j * np.pi * rng.uniform(size=e.size))
    eps = wlcnn.lens_ellipticity(e, g)
    back = (eps - g) / (1 - np.conj(g) * eps)  # eq. 7 solved for e
    # 1e-12: eq. 7 and its inverse are exact; only round-off remains.
    np.testing.assert_allclose(back, e, atol=1e-12)


def test_lens_ellipticity_strong_branch_inverts_and_is_continuous():
    rng = np.random.default_rng(2)
    e = wlcnn.draw_intrinsic_ellipticity(1000, 0.3, rng)
    g = (1.0 + 2.0 * rng.uniform(size=e.size)) * np.exp(2j * np.pi * rng.uniform(size=e.size))
    eps = wlcnn.lens_ellipticity(e, g)
    back = (1 - g * np.conj(eps)) / (np.conj(eps) - np.conj(g))  # |g| > 1 branch solved for e
    np.testing.assert_allclose(back, e, atol=1e-12)  # exact algebra, round-off only
    # Both branches equal g at |g| = 1, so ε is continuous across the critical curve.
    g1 = np.exp(0.7j)
    lo = wlcnn.lens_ellipticity(e, g1 * (1 - 1e-9))
    hi = wlcnn.lens_ellipticity(e, g1 * (1 + 1e-9))
    np.testing.assert_allclose(lo, hi, atol=1e-7)  # slope O(1) times the 2e-9 step, with margin


def test_mean_lensed_ellipticity_is_reduced_shear():
    """⟨ε⟩ = g for |g| < 1 and 1/g* for |g| > 1 over isotropic sources (§2.1)."""
    rng = np.random.default_rng(3)
    e = wlcnn.draw_intrinsic_ellipticity(400_000, 0.24, rng)
    err = 0.24 / np.sqrt(e.size) * 5  # 5 standard errors of the mean
    for g in (0.1 - 0.05j, 0.3 + 0.2j):
        assert abs(wlcnn.lens_ellipticity(e, g).mean() - g) < err
    g = 1.5 + 0.5j
    assert abs(wlcnn.lens_ellipticity(e, g).mean() - 1 / np.conj(g)) < err


def test_lens_ellipticity_rejects_unphysical_intrinsic_shapes():
    with pytest.raises(ValueError, match=r"\|e\| < 1"):
        wlcnn.lens_ellipticity(np.array([1.0 + 0j]), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        wlcnn.lens_ellipticity(np.array([np.nan + 0j]), 0.1)
    with pytest.raises(TypeError):
        wlcnn.lens_ellipticity(np.array(["a"]), 0.1)


def test_reduced_shear_divides_by_one_minus_kappa_and_rejects_critical_curve():
    g = wlcnn.reduced_shear(0.1, -0.2, 0.5)
    assert g == pytest.approx(0.2 - 0.4j, abs=1e-15)
    with pytest.raises(ValueError, match="critical"):
        wlcnn.reduced_shear(0.1, 0.0, 1.0)


# -- eq. 8-10: signs, axes and factors --------------------------------------------
N = 64
YY, XX = np.mgrid[0:N, 0:N]


def test_shear_of_plane_waves_fixes_sign_and_axes():
    """κ varying along x only gives γ1 = κ, along y only γ1 = −κ, along x = y γ2 = κ.

    (k1² − k2²)/k² and 2 k1 k2/k² are exactly ±1 for these waves, so any sign,
    axis swap or factor 2 in eq. 8-9 fails.  Periodic inversion only: a plane
    wave is not an isolated mass.
    """
    k = 2 * np.pi * 3 / N
    for kappa, want1, want2 in (
        (np.cos(k * XX), np.cos(k * XX), 0 * XX),
        (np.cos(k * YY), -np.cos(k * YY), 0 * XX),
        (np.cos(k * (XX + YY)), 0 * XX, np.cos(k * (XX + YY))),
        (np.cos(k * (XX - YY)), 0 * XX, -np.cos(k * (XX - YY))),
    ):
        g1, g2 = wlcnn.shear_from_kappa(kappa, pad=False)
        np.testing.assert_allclose(g1, want1, atol=1e-12)  # exact multipliers: round-off only
        np.testing.assert_allclose(g2, want2, atol=1e-12)


def test_tangential_shear_around_a_mass_is_positive_in_this_frame():
    """A mass stretches sources tangentially: right of it along y (γ1 < 0),
    above it along x (γ1 > 0), on the line x = y along x = −y (γ2 < 0)."""
    kappa = np.exp(-((XX - 32) ** 2 + (YY - 32) ** 2) / (2 * 2.0**2))
    g1, g2 = wlcnn.shear_from_kappa(kappa)
    assert g1[32, 42] < 0 and g1[42, 32] > 0          # right of, and above, the mass
    assert g2[40, 40] < 0 and g2[40, 24] > 0          # on x = y, and on x = −y
    assert abs(g2[32, 42]) < 1e-3 * abs(g1[32, 42])   # on the axis γ2 vanishes by symmetry


def _ks93_lenspack(g1, g2):
    """Brute-force reference: the classic complex-FFT KS93 (as in lenspack)."""
    k1, k2 = np.meshgrid(np.fft.fftfreq(g1.shape[1]), np.fft.fftfreq(g1.shape[0]))
    p1, p2, ksq = k1**2 - k2**2, 2 * k1 * k2, k1**2 + k2**2
    ksq[0, 0] = 1.0
    f1, f2 = np.fft.fft2(g1), np.fft.fft2(g2)
    return (np.fft.ifft2((p1 * f1 + p2 * f2) / ksq).real,
            np.fft.ifft2((p1 * f2 - p2 * f1) / ksq).real)


@pytest.mark.parametrize("shape", [(40, 40), (48, 40), (41, 39)])
def test_ks93_unpadded_equals_classic_complex_fft_implementation(shape):
    rng = np.random.default_rng(7)
    g1, g2 = rng.normal(size=(2,) + shape)
    got = wlcnn.ks93(g1, g2, pad=False, return_bmode=True)
    want = _ks93_lenspack(g1, g2)
    # 1e-12: same linear map, different FFT algorithms (round-off ~1e-15).
    np.testing.assert_allclose(got[0], want[0], atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], atol=1e-12)


def test_ks93_inverts_shear_from_kappa_exactly_on_a_periodic_grid():
    # odd sides: an even grid's Nyquist modes carry no direction and are not invertible
    rng = np.random.default_rng(4)
    kappa = rng.normal(size=(47, 41))
    g1, g2 = wlcnn.shear_from_kappa(kappa, pad=False)
    kappa_e, kappa_b = wlcnn.ks93(g1, g2, pad=False, return_bmode=True)
    # The k = 0 mode is set to zero: the inversion returns κ − ⟨κ⟩ (mass sheet).
    np.testing.assert_allclose(kappa_e, kappa - kappa.mean(), atol=1e-12)  # round-off only
    np.testing.assert_allclose(kappa_b, 0, atol=1e-12)


def test_ks93_of_pure_rotated_shear_is_b_mode():
    """Rotating every shear by 45° (γ → −i γ) turns an E field into a B field."""
    rng = np.random.default_rng(5)
    kappa = rng.normal(size=(33, 31))
    g1, g2 = wlcnn.shear_from_kappa(kappa, pad=False)
    kappa_e, kappa_b = wlcnn.ks93(g2, -g1, pad=False, return_bmode=True)
    np.testing.assert_allclose(kappa_e, 0, atol=1e-12)
    np.testing.assert_allclose(kappa_b, -(kappa - kappa.mean()), atol=1e-12)


def test_ks93_padded_recovers_an_isolated_mass():
    """Shear of an isolated blob (zero-padded) inverted with padding: the peak
    and profile come back, up to the small sheet the finite field misses."""
    n = 128
    yy, xx = np.mgrid[0:n, 0:n]
    kappa = 0.5 * np.exp(-((xx - 60.3) ** 2 + (yy - 70.1) ** 2) / (2 * 3.0**2))
    g1, g2 = wlcnn.shear_from_kappa(kappa, pad=True)
    rec = wlcnn.ks93(g1, g2, pad=True)
    rec -= np.median(rec[:10, :10])  # remove the mass sheet, measured far from the blob
    # 1 % of the peak: the shear outside the map (∝ M/r² beyond 60 px) is lost.
    np.testing.assert_allclose(rec, kappa, atol=0.01 * kappa.max())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ks93_is_equivariant_under_rotation_and_mirror(k):
    """Rotating the shear map by 90°k with γ → γ e^{2iφ} rotates the KS93 map;
    mirroring x flips γ2 (spin 2)."""
    rng = np.random.default_rng(6)
    g1, g2 = rng.normal(size=(2, 40, 40))
    kappa = wlcnn.ks93(g1, g2)
    rot = np.exp(2j * np.pi / 2 * k)  # e^{2iφ}, φ = 90° k
    gr = (g1 + 1j * g2) * rot
    got = wlcnn.ks93(np.rot90(gr.real, k), np.rot90(gr.imag, k))
    np.testing.assert_allclose(got, np.rot90(kappa, k), atol=1e-12)  # exact symmetry of the grid
    mirrored = wlcnn.ks93(g1[:, ::-1], -g2[:, ::-1])
    np.testing.assert_allclose(mirrored, kappa[:, ::-1], atol=1e-12)


# -- NFW (Wright & Brainerd 2000) ----------------------------------------------
def test_nfw_map_tangential_shear_matches_analytic_profile():
    """Azimuthal mean of γ_t from the FFT shear of a pixel-averaged NFW map equals
    [Σ̄(<R) − Σ(R)] / Σ_c within 2 % at 0.5′-10′."""
    m200, c200, npix, pix = 8e14, 4.0, 340, wlcnn.PAPER.pixel_arcsec
    centre = npix * pix / 2
    kappa = wlcnn.nfw_kappa_map(m200, c200, centre, centre, npix, pix)
    g1, g2 = wlcnn.shear_from_kappa(kappa, pad=True)
    yy, xx = (np.mgrid[0:npix, 0:npix] + 0.5) * pix - centre
    r, phi = np.hypot(xx, yy), np.arctan2(yy, xx)
    gamma_t = -(g1 * np.cos(2 * phi) + g2 * np.sin(2 * phi))
    cosmo = wlcnn.cosmology()
    mpc_per_arcsec = cosmo.angular_diameter_distance(0.5).to_value(u.Mpc) * np.pi / 180 / 3600
    sc = wlcnn.sigma_crit(0.5, 1.5).value
    for r_arcmin in (0.5, 1.0, 2.0, 5.0, 10.0):
        ring = np.abs(r - 60 * r_arcmin) < 2.0
        r_mpc = r[ring] * mpc_per_arcsec
        delta_sigma = (wlcnn.nfw_mean_sigma(r_mpc, m200, c200, 0.5)
                       - wlcnn.nfw_sigma(r_mpc, m200, c200, 0.5))
        want = (delta_sigma / sc).mean()
        assert gamma_t[ring].mean() == pytest.approx(want, rel=0.02)


def test_nfw_profiles_are_continuous_at_scale_radius_and_enclose_m200():
    r_s, _ = wlcnn.nfw_scale(1e15, 4.0, 0.5)
    x = r_s * np.array([1 - 2e-3, 1 - 5e-4, 1.0, 1 + 5e-4, 1 + 2e-3])
    sig = wlcnn.nfw_sigma(x, 1e15, 4.0, 0.5)
    # smooth through x = 1 (series vs closed form): second differences tiny
    assert abs(sig[0] - 2 * sig[2] + sig[4]) < 1e-5 * sig[2]
    assert abs(sig[1] - 2 * sig[2] + sig[3]) < 1e-5 * sig[2]
    # the projected mass inside R is π R² Σ̄ and must exceed the 3-D M200 inside r200
    r200 = 4.0 * r_s
    m2d = np.pi * r200**2 * wlcnn.nfw_mean_sigma(r200, 1e15, 4.0, 0.5)
    assert 1e15 < m2d < 1.6e15


@pytest.mark.parametrize("bad", [np.ones(5), np.ones((3, 3)) * np.nan, np.ones((3, 3), complex),
                                 np.ones((0, 3))])
def test_shear_and_ks93_reject_bad_maps(bad):
    with pytest.raises((ValueError, TypeError)):
        wlcnn.shear_from_kappa(bad)
    with pytest.raises((ValueError, TypeError)):
        wlcnn.ks93(bad, bad)


def test_ks93_rejects_mismatched_components():
    with pytest.raises(ValueError, match="shape"):
        wlcnn.ks93(np.zeros((4, 4)), np.zeros((4, 5)))


# ---------------------------------------------------------------------------
# eq. 10 in real space: the kernels of the KS93 start of the network
# ---------------------------------------------------------------------------
def test_ks93_kernels_are_kaisers_real_space_kernel():
    # kappa = D1 * g1 + D2 * g2 with D1 = (y^2 - x^2) / (pi r^4),
    # D2 = -2 x y / (pi r^4) in pixel units (Kaiser & Squires 1993), x the
    # column and y the row axis. Smoothed by 1' (sigma = 2.2 pixels of
    # 0.192') the discrete kernel's Nyquist ringing is gone; at r = 10-22
    # pixels the smoothed and the analytic kernel differ by r^-2 corrections
    # of (sigma / r)^2 ~ 5 % times the Gaussian's vanishing second moment
    # terms: measured 1.3e-4 and 3.4e-4 of the annulus's largest value. 1e-3
    # allows that; a sign error, swapped components or a swapped axis is 2.
    h = 24
    k1, k2 = wlcnn.ks93_kernels(2 * h + 1, fwhm_arcmin=1.0)
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    r2 = (xx**2 + yy**2).astype(float)
    r2[h, h] = 1.0
    d1 = (yy**2 - xx**2) / (np.pi * r2**2)
    d2 = -2.0 * xx * yy / (np.pi * r2**2)
    annulus = (r2 >= 10**2) & (r2 <= 22**2)
    scale = np.abs(d1[annulus]).max()
    assert np.abs(k1 - d1)[annulus].max() < 1e-3 * scale
    assert np.abs(k2 - d2)[annulus].max() < 1e-3 * scale


def test_ks93_kernels_reproduce_ks93_of_a_compact_shear_field():
    # A shear field that is non-zero only in a 15^2 patch: every pixel of the
    # patch sees all of it within the kernel's 49^2 reach, so correlating
    # with the kernels is eq. 10 itself there. The kernels come from ks93 on
    # a 197^2 field, the reference from ks93 on a 120^2 one: their padded
    # FFT grids differ, and so do the far periodic images; 1e-3 of the map's
    # largest value covers that; a misplaced tap or a
    # swapped component shows up at order 1.
    rng = np.random.default_rng(10)
    g = np.zeros((2, 120, 120))
    g[:, 50:65, 50:65] = rng.normal(0.0, 0.1, (2, 15, 15))
    ref = wlcnn.ks93(g[0], g[1])
    k1, k2 = wlcnn.ks93_kernels(49)
    got = (scipy.signal.correlate(np.pad(g[0], 24), k1, mode="valid")
           + scipy.signal.correlate(np.pad(g[1], 24), k2, mode="valid"))
    patch = (slice(50, 65), slice(50, 65))
    assert np.abs(got[patch] - ref[patch]).max() < 1e-3 * np.abs(ref[patch]).max()


@pytest.mark.parametrize("size", [0, 4, -3])
def test_ks93_kernels_reject_even_or_empty_sizes(size):
    with pytest.raises(ValueError, match="odd"):
        wlcnn.ks93_kernels(size)


@pytest.mark.parametrize("fwhm, pixel", [(-1.0, 0.192), (float("nan"), 0.192), (1.0, 0.0)])
def test_ks93_kernels_reject_negative_smoothing_or_pixels(fwhm, pixel):
    with pytest.raises(ValueError, match="fwhm_arcmin"):
        wlcnn.ks93_kernels(9, fwhm, pixel)


def test_public_names_exist_and_are_listed_in_file_order():
    import re
    source = open(wlcnn.__file__).read()

    def position(name):
        # a def, a class or a module-level assignment (annotated or not) at column 0
        m = re.search(rf"^(?:def |class )?{name}\b(?:\s*[:=(]|\()", source, re.M)
        assert m, f"{name} of __all__ is not defined at module level"
        return m.start()
    assert all(hasattr(wlcnn, n) for n in wlcnn.__all__)
    assert len(set(wlcnn.__all__)) == len(wlcnn.__all__)
    places = [position(n) for n in wlcnn.__all__]
    assert places == sorted(places), [n for n, a, b in zip(wlcnn.__all__[1:], places, places[1:])
                                      if b < a]
