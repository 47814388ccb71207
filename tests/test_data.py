"""§2.3.1 training data: source catalogs, their noise model and star masks."""
import numpy as np
import pytest

import wlcnn

CFG = wlcnn.PAPER
ZERO = np.zeros((CFG.npix, CFG.npix))


def _catalog(seed, kappa=0.0, g1=0.0, g2=0.0, masks=None):
    return wlcnn.simulate_catalog(ZERO + kappa, ZERO + g1, ZERO + g2, CFG, np.random.default_rng(seed), masks)


def test_catalog_has_the_paper_source_density_and_columns():
    cat = _catalog(20)
    expect = CFG.source_density_arcmin2 * CFG.field_arcmin**2   # 25,600
    assert abs(len(cat) - expect) < 4 * np.sqrt(expect)         # 4 Poisson σ
    assert cat.colnames == ["x", "y", "mag", "sigma", "e1", "e2"]
    side = CFG.field_arcmin * 60
    assert cat["x"].min() >= 0 and cat["x"].max() < side and cat["y"].max() < side
    # uniform positions: each quadrant holds a quarter, to 4 binomial σ
    q = np.mean((cat["x"] < side / 2) & (cat["y"] < side / 2))
    assert abs(q - 0.25) < 4 * np.sqrt(0.25 * 0.75 / len(cat))


def test_intrinsic_ellipticity_has_sigma_e_per_component_and_modulus_below_one():
    e = wlcnn.draw_intrinsic_ellipticity(200_000, CFG.sigma_e, np.random.default_rng(21))
    assert np.all(np.abs(e) < 1)
    # std to 4 × its sampling error sqrt(1/2N) (relative); truncation at |e| = 1 removes 2e-4
    for comp in (e.real, e.imag):
        assert comp.std() == pytest.approx(CFG.sigma_e, rel=4 * np.sqrt(0.5 / e.size) + 2e-4)


def test_observed_ellipticity_scatter_equals_the_reported_sigma():
    """Without lensing var(e_k) = ⟨σ_e² + σ_meas²⟩ = ⟨σ²⟩: the catalog's σ is honest."""
    cat = _catalog(22)
    want = np.mean(cat["sigma"] ** 2)
    tol = 4 * np.sqrt(2.0 / len(cat))  # 4 × the relative sampling error of a variance
    for k in ("e1", "e2"):
        assert np.var(cat[k]) == pytest.approx(want, rel=tol)
    assert np.all(cat["sigma"] >= CFG.sigma_e)


def test_magnitudes_start_peak_and_stop_where_the_paper_says():
    mag = _catalog(23)["mag"]
    assert mag.min() >= CFG.mag_min and mag.max() <= CFG.mag_max
    assert mag.min() < CFG.mag_min + 0.5  # the distribution does start at 21.5
    hist, edges = np.histogram(mag, bins=np.arange(CFG.mag_min, CFG.mag_max + 0.01, 0.25))
    peak = edges[hist.argmax()] + 0.125
    assert abs(peak - CFG.mag_peak) <= 0.25  # the mode, to one 0.25-mag bin


def test_measurement_error_grows_with_magnitude():
    m = np.linspace(CFG.mag_min, CFG.mag_max, 50)
    err = wlcnn.measurement_error(m, CFG)
    assert np.all(np.diff(err) > 0) and err[0] > 0


def test_mean_ellipticity_is_the_reduced_shear():
    """Uniform κ = 0.2, γ = (0.05, −0.03): ⟨ε⟩ = γ/(1 − κ) = (0.0625, −0.0375) (eq. 2, 7)."""
    cat = _catalog(24, kappa=0.2, g1=0.05, g2=-0.03)
    err = 5 * np.sqrt(np.mean(cat["sigma"] ** 2) / len(cat))  # 5 standard errors of the mean
    assert np.mean(cat["e1"]) == pytest.approx(0.0625, abs=err)
    assert np.mean(cat["e2"]) == pytest.approx(-0.0375, abs=err)


def test_fields_are_sampled_at_source_positions_along_the_right_axis():
    """γ1 growing with x (columns) only: sources on the right carry more shear."""
    ramp = np.tile(np.linspace(0.0, 0.2, CFG.npix), (CFG.npix, 1))
    cat = wlcnn.simulate_catalog(ZERO, ramp, ZERO, CFG, np.random.default_rng(25))
    side = CFG.field_arcmin * 60
    right, top = cat["x"] > side / 2, cat["y"] > side / 2
    err = 5 * 0.3 / np.sqrt(len(cat) / 2)  # 5 standard errors of a half-field mean
    assert np.mean(cat["e1"][right]) - np.mean(cat["e1"][~right]) == pytest.approx(0.1, abs=2 * err)
    assert abs(np.mean(cat["e1"][top]) - np.mean(cat["e1"][~top])) < 2 * err


def test_star_masks_remove_sources_and_follow_the_paper():
    rng = np.random.default_rng(26)
    peak = (900.0, 1000.0)
    masks = wlcnn.draw_star_masks(CFG, rng, peak)
    area_scale = CFG.field_arcmin**2 / 400
    assert round(1 * area_scale) <= len(masks) <= round(2 * area_scale)
    assert np.hypot(masks["x"][0] - peak[0], masks["y"][0] - peak[1]) <= 60.0
    assert np.all((masks["radius"] >= 30) & (masks["radius"] <= 120))
    cat = _catalog(27, masks=masks)
    for row in masks:
        assert not np.any(np.hypot(cat["x"] - row["x"], cat["y"] - row["y"]) < row["radius"])
    assert len(cat) < len(_catalog(27))


def test_same_seed_same_catalog():
    a, b = _catalog(28), _catalog(28)
    for k in a.colnames:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["x"], _catalog(29)["x"])


def test_simulate_catalog_rejects_bad_maps_and_missing_rng():
    with pytest.raises(ValueError, match="shape"):
        wlcnn.simulate_catalog(np.zeros((10, 10)), ZERO, ZERO, CFG, np.random.default_rng(0))
    with pytest.raises(ValueError, match="NaN"):
        wlcnn.simulate_catalog(ZERO + np.nan, ZERO, ZERO, CFG, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        wlcnn.simulate_catalog(ZERO, ZERO, ZERO, CFG, rng=None)
    with pytest.raises(TypeError, match="Generator"):
        wlcnn.simulate_catalog(ZERO, ZERO, ZERO, CFG, rng=42)
