"""Tests of examples/screen_recipes.py (issue 21's screening): its scores on the clusters
themselves are Table 2's, its differences are paired, and its off-simulator sky has another
concentration-mass relation than the training simulator."""
import numpy as np
import pytest

import screen_recipes
import skies
import wlcnn


def synthetic_evaluation(n=30, npix=40, seed=0):
    """Truth blobs of several amplitudes and two methods: A is the truth plus noise, B is A
    plus a little more noise (so that A and B differ far less than each differs over
    clusters)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:npix, 0:npix]
    amp = rng.uniform(0.1, 0.5, n)[:, None, None]
    cy, cx = rng.uniform(15, 25, (2, n))[:, :, None, None]
    truth = amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0**2)) \
        + 0.01 * rng.normal(size=(n, npix, npix))
    a = truth + 0.05 * rng.normal(size=truth.shape)
    b = a + 0.01 * rng.normal(size=truth.shape)
    return wlcnn.Evaluation(truth=truth, maps={"A": a, "B": b}, run_std={}, run_mass_std={},
                            star_mask=np.zeros(truth.shape, bool), index=np.arange(n))


def test_scores_on_the_clusters_themselves_are_table2s(evaluation):
    rows = screen_recipes.bootstrap(evaluation, 3, np.random.default_rng(0), ["KS93"])
    for row, ref in zip(rows, wlcnn.table2(evaluation)):
        assert row["method"] == ref["method"]
        # draw 0 is the clusters themselves, scored by the same functions: equal to
        # round-off
        for k in ("R", "D", "M_ratio", "dpeak"):
            assert row[k] == pytest.approx(ref[k], rel=1e-12)
        offsets = wlcnn.centroid_offsets(evaluation.truth, evaluation.maps[row["method"]])
        assert row["cat10"] == np.mean(offsets > wlcnn.CATASTROPHIC_PIX)


def test_differences_are_paired_and_tighter_than_the_scores_errors():
    ev = synthetic_evaluation()
    rows = screen_recipes.bootstrap(ev, 200, np.random.default_rng(1), ["A"])
    a, b = rows
    for k in screen_recipes.METRICS:
        value, err = b["diff"]["A"][k]
        # the difference of the two scores on the clusters themselves, to round-off
        assert value == pytest.approx(b[k] - a[k], abs=1e-12)
        # a method against itself differs by zero in every resampling
        assert a["diff"]["A"][k] == (0.0, 0.0)
    for k in ("R", "D", "M_ratio"):
        # B is A plus a little noise: resampling the same clusters for both cancels the
        # spread over clusters, so the paired error is far below the unpaired
        # √(σ_A² + σ_B²); a factor 3 holds with room at this noise (≈ 10 measured)
        assert b["diff"]["A"][k][1] < np.hypot(a[k + "_err"], b[k + "_err"]) / 3


def test_off_simulator_concentrations_are_another_relation():
    m = np.array([1e14, 5e14, 2e15])
    on = skies.draw_concentration(m, 0.5, np.random.default_rng(3), skies.SIMULATOR)
    off = skies.draw_concentration(m, 0.5, np.random.default_rng(3),
                                   screen_recipes.OFF_SIMULATOR)
    h = wlcnn.PAPER.H0 / 100
    pivot = skies.SIMULATOR.duffy_pivot_msun_h / h
    # same draws of the scatter: the ratio is the two relations' ratio, 1.3 (M/M_pivot)^Δb
    expected = 1.3 * (m / pivot) ** (-0.088 - skies.SIMULATOR.duffy_b)
    np.testing.assert_allclose(off / on, expected, rtol=1e-12)  # round-off of the powers


def test_a_candidate_names_a_snapshot_or_a_model():
    assert screen_recipes.parse_candidate("b=runs/b/run_00@25")[1:] == (
        screen_recipes.Path("runs/b/run_00"), 25)
    assert screen_recipes.parse_candidate("q=m.keras")[2] is None
    assert screen_recipes.parse_candidate("e=mean:a+b")[1] == ("a", "b")
    assert screen_recipes.parse_candidate("k=ks93:1.5") == ("k", "ks93:", 1.5)
    for bad in ("runs/b@25", "b=runs/b/run_00", "q=m.keras@3", "b=runs/b@x", "e=mean:a",
                "e=mean:a+", "k=ks93:x", "k=ks93:-1", "k=ks93:nan"):
        with pytest.raises(ValueError, match="--candidate"):
            screen_recipes.parse_candidate(bad)


def test_an_ensemble_averages_every_run_of_its_members():
    one = lambda g: np.full((1, 4, 4), 1.0)  # noqa: E731  (a method of one run)
    two = lambda g: np.stack([np.full((4, 4), 2.0), np.full((4, 4), 6.0)])  # noqa: E731
    runs = screen_recipes.mean_method([one, two])(np.zeros((3, 8, 8)))
    assert runs.shape == (3, 4, 4)
    # evaluate_methods averages the stacked runs: (1 + 2 + 6) / 3, exact in binary
    np.testing.assert_array_equal(runs.mean(axis=0), 3.0)
