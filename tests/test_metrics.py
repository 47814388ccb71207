"""§3 evaluation: mosaics, baselines, the paper's metrics (eq. 13-16, §3.3-3.4), the report."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wlcnn


CFG = wlcnn.PAPER
#: A self-consistent small grid (62 → 50 → 16 output pixels, 5 offsets a side,
#: a 20-pixel mosaic), for the exhaustive stride-3 × 6-orientation mosaic.
SMALL = dataclasses.replace(CFG, npix=62, subfield_npix=50, n_offsets=5,
                            loss_border_pix=2)


# ---------------------------------------------------------------------------
# Mosaics
# ---------------------------------------------------------------------------
def _blocky_field(config, seed):
    """κ constant on each output pixel's 3×3 footprint, integer-valued: its mosaic
    truth is exact in float32, so a correct mosaic reproduces it bit for bit."""
    rng = np.random.default_rng(seed)
    vals = rng.integers(0, 1000, (config.mosaic_npix, config.mosaic_npix)).astype(float)
    kappa = np.zeros((config.npix, config.npix))
    lo, p = (config.first_kernel - 1) // 2, config.pool
    side = slice(lo, lo + p * config.mosaic_npix)
    kappa[side, side] = np.kron(vals, np.ones((p, p)))
    grid = np.stack([rng.normal(size=kappa.shape), rng.normal(size=kappa.shape), kappa])
    return grid, vals


def _truth_predictor(config):
    """Stand-in network: the block mean of the (oriented) κ it finds in channel 2,
    i.e. exactly the oriented truth window of the subfield it is given."""
    o, p, lo = config.output_npix, config.pool, (config.first_kernel - 1) // 2

    def predict(x):
        b = x[:, lo:lo + p * o, lo:lo + p * o, 2].reshape(len(x), o, p, o, p).mean(axis=(2, 4))
        return b[..., None]
    return predict


@pytest.mark.parametrize("config, stride, orientations", [
    (CFG, 12, 6), (CFG, 3, 1), (CFG, 36, ("rot90", "flip_y")),
    (SMALL, 3, 6), (SMALL, 6, 6), (SMALL, 12, ("rot270",))])
def test_mosaic_of_the_truth_predictor_is_the_truth(config, stride, orientations):
    """Orientation undone and output pixel k of offset m put on mosaic pixel m + k:
    every covered pixel equals mosaic_truth exactly; uncovered ones are NaN."""
    grid, vals = _blocky_field(config, 50)
    assert np.array_equal(wlcnn.mosaic_truth(grid[2], config), vals)
    mean, count = wlcnn.predict_mosaic(_truth_predictor(config), grid, config, stride=stride,
                                    orientations=orientations, batch_size=64)
    covered = count > 0
    np.testing.assert_array_equal(mean[covered], vals[covered])
    assert np.all(np.isnan(mean[~covered]))
    n_orient = len(wlcnn.mosaic_orientations(orientations))
    np.testing.assert_array_equal(count, n_orient * wlcnn.mosaic_coverage(config, stride))


def test_a_wrong_inverse_orientation_would_fail(monkeypatch):
    """Guard of the test above: undoing rot90 by rot90 misplaces the predictions."""
    grid, vals = _blocky_field(CFG, 51)
    monkeypatch.setitem(wlcnn.INVERSE_ORIENTATION, "rot90", "rot90")
    mean, count = wlcnn.predict_mosaic(_truth_predictor(CFG), grid, CFG, stride=36,
                                       orientations=("rot90",))
    assert not np.array_equal(mean[count > 0], vals[count > 0])


def test_paper_mosaic_has_1444_offsets_and_the_quick_one_100():
    assert len(wlcnn.mosaic_offsets(CFG)) ** 2 == 1444
    assert len(wlcnn.mosaic_offsets(CFG, 12)) ** 2 == 100
    assert wlcnn.mosaic_orientations(6) == wlcnn.ORIENTATIONS
    assert wlcnn.mosaic_orientations(1) == ("rot0",)


def test_paper_mosaic_covers_the_central_137_pixels():
    """Offsets 0..37 and trained output pixels 14..113 reach mosaic pixels 14..150."""
    line = wlcnn.mosaic_coverage(CFG)[CFG.mosaic_npix // 2]
    assert np.flatnonzero(line).tolist() == list(range(14, 151))
    line = wlcnn.mosaic_coverage(CFG, border_pix=0)[80]
    assert np.flatnonzero(line).tolist() == list(range(0, 165))


@pytest.mark.parametrize("kwargs", [dict(stride=4), dict(stride=0), dict(orientations=2),
                                    dict(orientations=("rot45",)), dict(border_pix=64)])
def test_bad_mosaic_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        wlcnn.predict_mosaic(lambda x: np.zeros((len(x), 128, 128, 1)), np.zeros((3, 500, 500)),
                             **kwargs)


def test_a_predictor_of_the_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="returned shape"):
        wlcnn.predict_mosaic(lambda x: np.zeros((len(x), 64, 64, 1)), np.zeros((3, 500, 500)),
                             stride=111)


def test_keras_model_mosaic_equals_the_average_written_out():
    """A (5×5-filter) Table 1 model, batched with a padded last batch, gives the
    mean of its one-at-a-time predictions placed by hand."""
    cfg = dataclasses.replace(CFG, filter_size=5)
    model = wlcnn.build_model(cfg, "Fiducial", conv="direct")
    grid = np.random.default_rng(52).normal(0, 0.3, (4, cfg.npix, cfg.npix))
    mean, count = wlcnn.predict_mosaic(model, grid, cfg, stride=111, orientations=("rot0", "rot90"),
                                       batch_size=3)
    total, n = np.zeros((166, 166)), np.zeros((166, 166))
    b = cfg.loss_border_pix
    for t in ("rot0", "rot90"):
        for my in (0, 37):
            for mx in (0, 37):
                x, _ = wlcnn.subfield(grid, None, my, mx, t, cfg, 3)
                y = model(x[None], training=False).numpy()[0, ..., 0]
                y = np.rot90(y, -1 if t == "rot90" else 0)
                total[my + b:my + 128 - b, mx + b:mx + 128 - b] += y[b:128 - b, b:128 - b]
                n[my + b:my + 128 - b, mx + b:mx + 128 - b] += 1
    np.testing.assert_array_equal(count, n)
    # 1e-5: float32 network, batched vs single-sample kernels (oneDNN reorders sums)
    np.testing.assert_allclose(mean[n > 0], total[n > 0] / n[n > 0], rtol=1e-5, atol=1e-6)


def test_runs_give_the_mean_and_the_sample_std():
    grid = np.zeros((3, CFG.npix, CFG.npix))
    levels = (0.1, 0.2, 0.6)
    runs = [lambda x, c=c: np.full((len(x), 128, 128, 1), c) for c in levels]
    out = wlcnn.predict_mosaic_runs(runs, grid, CFG, stride=111, orientations=1)
    covered = out.count > 0
    # 1e-12: a handful of float64 sums of identical values
    np.testing.assert_allclose(out.mean[covered], np.mean(levels), rtol=1e-12)
    np.testing.assert_allclose(out.std[covered], np.std(levels, ddof=1), rtol=1e-12)
    assert out.runs.shape == (3, 166, 166) and np.all(np.isnan(out.std[~covered]))


def test_each_run_of_a_multi_run_mosaic_is_its_own_mosaic():
    """Runs share each cut subfield; run k's mosaic must still be predict_mosaic of run k."""
    grid, vals = _blocky_field(CFG, 56)
    truth = _truth_predictor(CFG)
    out = wlcnn.predict_mosaic_runs([truth, lambda x: 2.0 * truth(x)], grid, CFG, stride=36,
                                    orientations=6)
    covered = out.count > 0
    np.testing.assert_array_equal(out.runs[0][covered], vals[covered])
    np.testing.assert_array_equal(out.runs[1][covered], 2.0 * vals[covered])
    np.testing.assert_array_equal(out.count, wlcnn.predict_mosaic(truth, grid, CFG, stride=36)[1])


# ---------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------
def _blob(peak=0.3, sigma_pix=25.0, n=CFG.npix):
    yy, xx = np.mgrid[0:n, 0:n]
    return peak * np.exp(-((xx - 250) ** 2 + (yy - 240) ** 2) / (2 * sigma_pix**2))


def test_unsmoothed_ks93_mosaic_of_noiseless_shear_recovers_the_truth():
    kappa = _blob(0.05)
    g1, g2 = wlcnn.shear_from_kappa(kappa)
    got = wlcnn.ks93_mosaic(np.stack([g1, g2]), CFG, 0.0)
    want = wlcnn.mosaic_truth(kappa)
    # The shear beyond the 32' field is lost (KS93's finite-field problem, §2.2):
    # a smooth residual, 2.3 % of the peak at the field's corners and below 1 %
    # over the central half; the mean is not recovered at all (k = 0, mass sheet).
    err = (got - got.mean()) - (want - want.mean())
    assert np.abs(err).max() < 0.03 * kappa.max()
    assert np.abs(err[42:124, 42:124]).max() < 0.01 * kappa.max()


def test_smoothing_kernel_has_the_requested_fwhm():
    delta = np.zeros((201, 201))
    delta[100, 100] = 1.0
    fwhm = 1.0  # arcmin = 15.6 input pixels
    prof = wlcnn.smooth_map(delta, fwhm, CFG)[100]
    above = np.flatnonzero(prof >= prof.max() / 2)
    # linear interpolation of the two half-maximum crossings
    x = np.arange(201.0)
    left = np.interp(prof.max() / 2, prof[above[0] - 1:above[0] + 1], x[above[0] - 1:above[0] + 1])
    tail = slice(above[-1], above[-1] + 2)
    right = np.interp(prof.max() / 2, prof[tail][::-1], x[tail][::-1])
    # 1 %: linear interpolation between samples of a Gaussian 6.6 pixels in σ
    assert (right - left) * CFG.pixel_arcsec / 60 == pytest.approx(fwhm, rel=0.01)
    np.testing.assert_array_equal(wlcnn.smooth_map(delta, 0.0, CFG), delta)  # FWHM 0: unchanged


# ---------------------------------------------------------------------------
# Metrics (eq. 13-16, §3.3, §3.4)
# ---------------------------------------------------------------------------
def _cluster_maps(n=4, seed=54, size=60):
    """Positive κ maps with one Gaussian peak each plus a lognormal background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    maps = []
    for _ in range(n):
        cy, cx = rng.uniform(20, 40, 2)
        peak = 0.3 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 4.0**2))
        maps.append(peak + 0.02 * rng.lognormal(0, 0.5, (size, size)))
    return np.stack(maps)


def test_perfect_prediction_scores_R1_D0_M1_and_no_offset():
    t = _cluster_maps()
    row = wlcnn.paper_metrics(t, t.copy())
    got = (row["R"], row["R_err"], row["D"], row["M_ratio"], row["dpeak"])
    assert got == (1.0, 0.0, 0.0, 1.0, 0.0)


def test_half_the_truth_scores_R_and_M_one_half_and_D_zero():
    """κ̃ (eq. 13) is scale-free, so D cannot see a global factor; R and M_cl do."""
    t = _cluster_maps()
    row = wlcnn.paper_metrics(t, 0.5 * t)
    assert row["R"] == 0.5 and row["M_ratio"] == 0.5 and row["dpeak"] == 0.0
    # D: round-off of (κ - mean)/std of a map and of half of it, ~1e-16 each
    assert row["D"] < 1e-12


def test_D_ignores_the_mass_sheet_but_not_the_shape():
    t = _cluster_maps()
    assert wlcnn.metric_D(t, 3.0 * t - 0.1).value < 1e-12  # round-off as above
    assert wlcnn.metric_D(t, t[::-1]).value > 0.1


def test_R_weights_are_the_inverse_histogram_density():
    """Eq. 16 by hand: 90 % of pixels at κ = 0.1 predicted exactly, 10 % at κ = 1
    predicted at half.  Unweighted the mean ratio is 0.95; with ω = 1/f each
    κ range weighs the same, R = (1 + 0.5)/2 = 0.75, std 0.25 (nothing clipped)."""
    t = np.full((1, 10, 100), 0.1)
    t[0, 9] = 1.0
    p = np.where(t == 1.0, 0.5, 0.1)
    r = wlcnn.metric_R(t, p)
    # 1e-12: sums of 1,000 float64 terms
    assert r.value == pytest.approx(0.75, abs=1e-12) and r.err == pytest.approx(0.25, abs=1e-12)
    assert r.n_pixels == 1000


def test_R_clipping_removes_an_outlier_by_hand():
    """Ten ratios of 1 and one of 10, equal weights: mean 20/11, std 2.59; 10 lies
    8.2 > 3 × 2.59 from the mean and goes; then the std is 0 and R = 1."""
    t = np.ones((1, 1, 11))
    p = t.copy()
    p[0, 0, 5] = 10.0
    r = wlcnn.metric_R(t, p)
    assert (r.value, r.err, r.n_pixels) == (1.0, 0.0, 10)


def test_R_clipping_converges_and_ignores_an_injected_outlier():
    rng = np.random.default_rng(55)
    t = _cluster_maps(8)
    p = 0.8 * t * (1 + 0.05 * rng.normal(size=t.shape))
    i = np.unravel_index(np.argmax(t), t.shape)  # the rarest κ: the largest weight (eq. 16)
    p[i] = 1000.0 * t[i]
    r = wlcnn.metric_R(t, p)
    assert 1 <= r.n_iter < wlcnn.CLIP_MAX_ITER
    # 0.005: the weighted mean of 28,800 ratios of scatter 0.04 (its error is ~1e-3
    # even if the weights concentrate on a few hundred pixels)
    assert r.value == pytest.approx(0.8, abs=0.005)
    unclipped = wlcnn.metric_R(t, p, clip_sigma=np.inf)
    assert unclipped.value > 0.9  # the outlier alone would have moved it this far


def test_peak_moved_by_a_known_vector_gives_that_offset():
    n = 80
    yy, xx = np.mgrid[0:n, 0:n]
    t = np.exp(-((xx - 40) ** 2 + (yy - 38) ** 2) / (2 * 3.0**2))
    for dy, dx in [(3, 4), (0, 7), (-5, 12), (0, 0)]:
        p = np.roll(t, (dy, dx), axis=(0, 1))
        # 1e-9: first moments of a window symmetric about the peak, round-off only
        assert wlcnn.centroid_offsets(t, p)[0] == pytest.approx(np.hypot(dy, dx), abs=1e-9)


def test_centroid_of_a_window_with_negative_values_by_hand():
    """Peak 1 at (20, 20), −0.5 at (20, 25), +0.5 at (20, 15), else 0: the window's
    minimum −0.5 is subtracted, so weights are 0.5 + κ; x̄ = 4425 / 221.5."""
    k = np.zeros((41, 41))
    k[20, 20], k[20, 25], k[20, 15] = 1.0, -0.5, 0.5
    cy, cx = wlcnn.peak_centroid(k)
    assert cy == pytest.approx(20.0, abs=1e-12) and cx == pytest.approx(4425 / 221.5, abs=1e-12)


@settings(max_examples=40, deadline=None, derandomize=True)  # the same examples every run
@given(st.integers(0, 2**31 - 1))
def test_centroid_never_leaves_its_window(seed):
    """With negative κ in the window a plain first moment can land anywhere (its
    weights may sum to ~0); after the rescaling of §3.4 it stays inside."""
    rng = np.random.default_rng(seed)
    k = rng.normal(-0.2, 0.5, (40, 40))
    i, j = wlcnn.peak_pixel(k)
    cy, cx = wlcnn.peak_centroid(k)
    assert max(i - 10, 0) <= cy <= min(i + 10, 39) and max(j - 10, 0) <= cx <= min(j + 10, 39)


def test_centroid_at_the_map_edge_uses_the_window_clipped_to_the_map():
    """Peak 2 at the corner (0, 0), 1 at (0, 4), 1 at (12, 0) beyond the clipped
    window [0, 11)²: the centroid is (0, 4/3)."""
    k = np.zeros((30, 30))
    k[0, 0], k[0, 4], k[12, 0] = 2.0, 1.0, 1.0
    cy, cx = wlcnn.peak_centroid(k)
    assert cy == 0.0 and cx == pytest.approx(4 / 3, abs=1e-12)


def test_aperture_of_10_pixels_holds_317_pixels():
    """Σ over the pixels within 10 of the centre (Gauss's circle problem: N(10) = 317)."""
    assert wlcnn.aperture_mass(np.ones((41, 41)), (20, 20), 10) == 317
    # centred on a corner: the origin, 10 + 10 on the two axes, and (317 - 1 - 40)/4
    # = 69 in the open quadrant
    assert wlcnn.aperture_mass(np.ones((41, 41)), (0, 0), 10) == 1 + 20 + 69


def test_mass_ratio_is_the_median_and_percentiles_of_the_per_cluster_ratios():
    t = _cluster_maps(5)
    a = np.array([0.5, 0.7, 0.9, 1.1, 2.0])
    stat = wlcnn.mass_ratio(t, a[:, None, None] * t)
    lo, med, hi = np.percentile(a, [16, 50, 84])
    # 1e-12: each ratio is a·Σκ/Σκ
    assert stat.value == pytest.approx(med, abs=1e-12)
    assert (stat.minus, stat.plus) == pytest.approx((med - lo, hi - med), abs=1e-12)
    np.testing.assert_allclose(stat.values, a, rtol=1e-12)


def test_metrics_use_only_pixels_evaluated_in_both_maps():
    t = _cluster_maps(2)
    p = 0.5 * t
    p[:, :5, :] = np.nan  # not evaluated: must not count, even where the truth exists
    assert wlcnn.metric_R(t, p).value == 0.5 and wlcnn.metric_D(t, p).value < 1e-12


# ---------------------------------------------------------------------------
# Evaluating methods (the `evaluation` fixture: tests/conftest.py)
# ---------------------------------------------------------------------------
def test_methods_are_scored_on_the_same_pixels(evaluation):
    region = wlcnn.mosaic_coverage(evaluation.config) > 0
    for maps in [evaluation.truth] + list(evaluation.maps.values()):
        assert np.array_equal(np.isfinite(maps), np.broadcast_to(region, maps.shape))
    assert set(evaluation.run_std) == {"CNN"} and evaluation.run_mass_std["CNN"].shape == (2,)


def test_ks93_smoothing_choice_follows_its_criterion(tiny_dataset):
    ds = wlcnn.ClusterDataset(tiny_dataset)
    fwhm, rows = wlcnn.choose_ks93_smoothing(ds.clusters("val"), config=ds.config,
                                             fwhm_grid=(0.5, 1.0, 2.0))
    assert [r["fwhm_arcmin"] for r in rows] == [0.5, 1.0, 2.0]
    assert sum(r["chosen"] for r in rows) == 1
    best = min(rows, key=lambda r: (r["rank_sum"], r["D"]))
    assert fwhm == best["fwhm_arcmin"] and best["chosen"]
    fwhm_d, rows_d = wlcnn.choose_ks93_smoothing(ds.clusters("val"), config=ds.config,
                                                 fwhm_grid=(0.5, 1.0, 2.0), criterion="D")
    assert fwhm_d == min(rows_d, key=lambda r: r["D"])["fwhm_arcmin"]


def test_star_masks_are_drawn_on_the_mosaic_grid():
    """Mosaic pixel J is centred at (3J + 2.5) × 3.84″ (11.52″ pixels); a 20″
    circle there holds its centre pixel, the 4 neighbours (11.5″) and the 4
    diagonals (16.3″), not the pixels 2 away (23.0″): 9 in all."""
    x = y = (3 * 80 + 2.5) * CFG.pixel_arcsec
    m = wlcnn.star_mask_mosaic({"x": [x], "y": [y], "radius": [20.0]}, CFG)
    assert m.sum() == 9 and m[79:82, 79:82].all()
