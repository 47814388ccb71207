"""The demo: its scoring of a mass map, its figure, and a small run of the whole script."""
import importlib
import json
import sys

import numpy as np
import pytest

import wlcnn
import demo

N = wlcnn.PAPER.mosaic_npix


def _cluster(x0=80.0, y0=70.0):
    """A smooth peaked map on the mosaic grid: a Gaussian of 6 pixels σ on a floor of 0.01."""
    yy, xx = np.indices((N, N))
    return 0.01 + 0.3 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 6.0**2))


def test_score_returns_the_four_metrics_and_the_truth_scores_perfectly():
    truth = _cluster()
    s = demo.score(truth, truth)
    assert set(s) == {"R", "D", "M_ratio", "dpeak"}
    # exact up to round-off: every ratio is 1, every normalised difference 0
    assert s["R"] == pytest.approx(1.0, abs=1e-12)
    assert s["D"] == pytest.approx(0.0, abs=1e-12)
    assert s["M_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert s["dpeak"] == pytest.approx(0.0, abs=1e-12)


def test_score_reads_amplitude_shape_mass_and_offset_in_the_right_direction():
    truth = _cluster()
    # twice the truth: R and M are 2 (not ½: the estimate is the numerator), while D,
    # invariant under κ -> aκ + b, and the centroid do not move
    s = demo.score(truth, 2 * truth)
    assert s["R"] == pytest.approx(2.0, abs=1e-12)
    assert s["M_ratio"] == pytest.approx(2.0, abs=1e-12)
    assert s["D"] == pytest.approx(0.0, abs=1e-12)
    assert s["dpeak"] == pytest.approx(0.0, abs=1e-12)
    # the same cluster 3 pixels right and 4 up: the centroids are 5 pixels apart (the
    # 21-pixel window lies inside the map for both, so the moment is exact)
    s = demo.score(truth, _cluster(83.0, 74.0))
    assert s["dpeak"] == pytest.approx(5.0, abs=1e-9)
    assert s["D"] > 0.1


def test_score_leaves_out_pixels_that_are_nan():
    truth = _cluster()
    estimate = 1.5 * truth
    estimate[:20] = np.nan          # e.g. outside the CNN's mosaic
    s = demo.score(np.where(np.isnan(estimate), np.nan, truth), estimate)
    assert s["R"] == pytest.approx(1.5, abs=1e-12)
    assert s["M_ratio"] == pytest.approx(1.5, abs=1e-12)


def test_the_figure_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    truth = _cluster()
    maps = {"KS93": 0.8 * truth, "CNN": truth}
    scores = {name: demo.score(truth, m) for name, m in maps.items()}
    out = tmp_path / "sub" / "demo.png"
    demo.draw(truth, maps, scores, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_demo_runs_without_matplotlib_and_ends_with_a_json_line(monkeypatch, capsys):
    # a None entry makes any import of matplotlib fail, as on a machine without it
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    module = importlib.reload(demo)
    # stride 48: 3 × 3 subfields instead of the demo's 10 × 10, so the test is quick
    assert module.main(["--seed", "0", "--no-figure", "--stride", "48"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["seed"] == 0 and result["n_sources"] > 20_000
    for name in ("KS93", "CNN"):
        assert set(result[name]) == {"R", "D", "M_ratio", "dpeak"}
        assert all(np.isfinite(v) for v in result[name].values())
