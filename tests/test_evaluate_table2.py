"""examples/evaluate_table2.py (the Wiener and Seitz & Schneider baselines, report, command)
and examples/figures.py."""
import csv
import dataclasses
import json
import os
import sys

import numpy as np
import pytest

import wlcnn
from skies import write_dataset
import evaluate_table2
import figures
import paired_table2
from conftest import blob_field


CFG = wlcnn.PAPER
FIGURES = {"fig2_maps.png", "fig3_distributions.png", "fig4_joint_kappa.png",
           "fig5_joint_kappa_tilde.png", "fig6_mass.png", "fig6_mass_bias.png",
           "fig7_centroid_mass.png",
           "fig8_centroid_pair.png", "fig10_masked.png"}  # the tiny dataset has star masks
TABLES = {"table2.csv", "table2.md", "clusters.csv", "report.json", "evaluation.npz"}


# ---------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------
def _blob(peak=0.3, sigma_pix=25.0, n=CFG.npix):
    yy, xx = np.mgrid[0:n, 0:n]
    return peak * np.exp(-((xx - 250) ** 2 + (yy - 240) ** 2) / (2 * sigma_pix**2))


def test_ss95_iteration_undoes_the_reduced_shear_bias_of_ks93():
    """With g = γ/(1 − κ) of a κ = 0.4 blob, KS93(g) overshoots the core; the
    Seitz & Schneider iteration converges and lands closer to the truth."""
    kappa = _blob(0.4)
    g1, g2 = wlcnn.shear_from_kappa(kappa)
    grid = np.stack([g1 / (1 - kappa), g2 / (1 - kappa)])
    truth = wlcnn.mosaic_truth(kappa)
    ks = wlcnn.ks93_mosaic(grid, CFG)
    ss, info = evaluate_table2.ks93_reduced_iterative(grid, CFG, return_info=True)
    assert info["converged"] and info["n_iter"] < evaluate_table2.SS95_MAX_ITER
    err_ks = np.abs((ks - ks.mean()) - (truth - truth.mean())).max()
    err_ss = np.abs((ss - ss.mean()) - (truth - truth.mean())).max()
    assert err_ss < 0.25 * err_ks


def test_ss95_is_ks93_in_the_weak_limit():
    kappa = _blob(1e-4)
    g1, g2 = wlcnn.shear_from_kappa(kappa)
    grid = np.stack([g1, g2])
    # the correction g·κ is of order κ² = 1e-8, 1e-4 of the map's peak
    np.testing.assert_allclose(evaluate_table2.ks93_reduced_iterative(grid, CFG),
                               wlcnn.ks93_mosaic(grid, CFG), atol=kappa.max() ** 2)


def _flat_wiener(signal, noise):
    shape = wlcnn.padded_shape((CFG.npix, CFG.npix), True)
    k = np.geomspace(1e-3, 0.8, 10)
    return evaluate_table2.WienerFilter(k, np.full(10, signal), np.full(10, noise), shape, 1)


def test_wiener_filter_without_noise_is_ks93_and_with_equal_powers_halves_it():
    grid = np.random.default_rng(53).normal(0, 0.3, (2, CFG.npix, CFG.npix))
    ks = wlcnn.ks93_mosaic(grid, CFG)
    # 1e-12: the same FFTs, multiplied by exactly 1 or 0.5
    np.testing.assert_allclose(evaluate_table2.wiener_mosaic(grid, _flat_wiener(1.0, 0.0), CFG), ks,
                               atol=1e-12)
    np.testing.assert_allclose(evaluate_table2.wiener_mosaic(grid, _flat_wiener(1.0, 1.0), CFG),
                               ks / 2, atol=1e-12)


def test_fitted_wiener_filter_passes_large_scales_and_damps_small_ones(tiny_dataset):
    ds = wlcnn.ClusterDataset(tiny_dataset)
    wf = evaluate_table2.fit_wiener(ds.clusters("train"), ds.config, limit=3)
    assert wf.n_clusters == 3 and np.all(wf.signal_power >= 0) and np.all(wf.noise_power > 0)
    w = wf.transfer(np.array([0.0, wf.k[0], wf.k[-1]]))
    # k = 0 is the mass sheet; the largest scales hold signal comparable to the
    # noise (W ≈ 0.4 for these small blobs); at the grid scale noise is all there is
    assert w[0] == 0 and w[1] > 0.2 and w[2] < 0.01 and np.all((w >= 0) & (w <= 1))


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------
@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib as in an environment without the plot extra: every import of it fails."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def _report_json(out):
    with open(os.path.join(out, "report.json")) as fh:
        return json.load(fh)


def test_table2_csv_has_one_row_a_method_with_exactly_the_table2_columns(evaluation, tmp_path):
    rows = wlcnn.table2(evaluation)
    assert [r["method"] for r in rows] == ["KS93", "CNN"]
    assert all(tuple(r) == wlcnn.TABLE2_COLUMNS for r in rows)
    csv_path, md_path = evaluate_table2.write_table(rows, tmp_path)
    lines = open(csv_path).read().splitlines()
    assert lines[0] == ",".join(wlcnn.TABLE2_COLUMNS) and len(lines) == 3
    md = open(md_path).read()
    assert "KS93 (paper)" in md and "0.253 ± 0.131" in md and "3.10 (+25.64/−2.00)" in md


def test_report_is_written_whole(evaluation, tmp_path):
    out = evaluate_table2.write_report(evaluation, tmp_path / "report", meta={"stride": 12})
    assert set(os.listdir(out)) == TABLES
    assert _report_json(out)["meta"] == {"stride": 12}
    with pytest.raises(ValueError, match="exists"):
        evaluate_table2.write_report(evaluation, out)
    evaluate_table2.write_report(evaluation, out, meta={"stride": 6}, overwrite=True)
    assert _report_json(out)["meta"] == {"stride": 6} and os.listdir(tmp_path) == ["report"]


def test_a_failed_table_leaves_nothing_behind(evaluation, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(evaluate_table2, "cluster_rows", broken)
    with pytest.raises(RuntimeError):
        evaluate_table2.write_report(evaluation, tmp_path / "report")
    assert os.listdir(tmp_path) == []


def test_a_saved_evaluation_loads_back_as_its_float32_maps(evaluation, tmp_path):
    wlcnn.save_evaluation(evaluation, tmp_path / "e.npz")
    back = wlcnn.load_evaluation(tmp_path / "e.npz")
    assert back.methods == evaluation.methods and back.config == evaluation.config
    assert set(back.run_std) == set(evaluation.run_std) == {"CNN"}
    for name in evaluation.methods:  # exactly the float32 rounding, NaNs where they were
        np.testing.assert_array_equal(back.maps[name],
                                      evaluation.maps[name].astype(np.float32).astype(float))
    np.testing.assert_array_equal(back.truth, evaluation.truth.astype(np.float32).astype(float))
    np.testing.assert_array_equal(back.star_mask, evaluation.star_mask)
    np.testing.assert_array_equal(back.index, evaluation.index)


@pytest.fixture
def report(evaluation, tmp_path):
    """A report of the evaluation fixture, as evaluate_table2.py writes it."""
    return evaluate_table2.write_report(evaluation, tmp_path / "report", extra_tables={
        "mass_bias": evaluate_table2.mass_bias_rows(evaluation, n_bins=2)})


def test_figures_draws_every_figure_from_a_report(report, capsys):
    assert figures.main([report]) == 0
    assert FIGURES <= set(os.listdir(report))
    with open(os.path.join(report, "figures.json")) as fh:
        assert json.load(fh) == dict.fromkeys(FIGURES, "written")
    assert not [f for f in os.listdir(report) if f.startswith(".")]  # no temporaries left


def test_a_failing_figure_costs_only_itself(report, monkeypatch):
    """Fig. 6 raises: the other figures are drawn, the error is in figures.json and a
    warning, and the command's status says a figure is missing."""
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(figures, "figure_mass", broken)
    with pytest.warns(UserWarning, match="fig6_mass.png not drawn: RuntimeError: disk full"):
        assert figures.main([report]) == 1
    expected = TABLES | FIGURES | {"mass_bias.csv", "figures.json"}
    assert set(os.listdir(report)) == expected - {"fig6_mass.png"}
    with open(os.path.join(report, "figures.json")) as fh:
        drawn = json.load(fh)
    assert drawn.pop("fig6_mass.png") == "RuntimeError: disk full"
    assert drawn == dict.fromkeys(FIGURES - {"fig6_mass.png"}, "written")


def test_figures_without_matplotlib_says_how_to_get_it(report, no_matplotlib, capsys):
    assert figures.main([report]) == 2
    assert 'pip install -e ".[plot]"' in capsys.readouterr().err
    assert set(os.listdir(report)) == TABLES | {"mass_bias.csv"}  # the report as it was


@pytest.mark.parametrize("args, message", [(["--example", "99"], "--example"),
                                           (["--pair", "KS93", "Wiener"], "methods are")])
def test_figures_refuses_a_cluster_or_method_the_report_lacks(report, args, message, capsys):
    assert figures.main([report, *args]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_refuses_an_existing_report_before_the_long_work(tmp_path):
    (tmp_path / "report").mkdir()
    with pytest.raises(ValueError, match="exists"):  # the dataset is not even opened
        evaluate_table2.evaluate_directory(tmp_path / "none", [], tmp_path / "report")


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """An untrained Table 1 model of the paper's grid (5×5 filters, to be quick), saved."""
    path = tmp_path_factory.mktemp("model") / "m.keras"
    wlcnn.save_model(wlcnn.build_model(dataclasses.replace(CFG, filter_size=5), "Fiducial"), path)
    return path


def _table(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_evaluate_command_writes_table2_for_a_saved_model(tiny_dataset, saved_model, tmp_path):
    """End to end: a saved model is evaluated against the baselines on the test split."""
    out = tmp_path / "report"
    rc = evaluate_table2.main(["--data", str(tiny_dataset), "--models", str(saved_model),
                               "--out", str(out), "--stride", "48", "--limit", "1",
                               "--n-val-smoothing", "2", "--no-wiener"])
    assert rc == 0
    rows = _table(out / "table2.csv")
    assert [r["method"] for r in rows] == ["KS93", "KS93-SS95", "CNN"]
    assert list(rows[0]) == list(wlcnn.TABLE2_COLUMNS)
    assert all(r["n_clusters"] == "1" for r in rows)
    assert "--no-wiener" in _report_json(out)["meta"]["command"]
    # a second run into the same directory is refused (the report is never overwritten by accident)
    assert evaluate_table2.main(["--data", str(tiny_dataset), "--models", str(saved_model),
                                 "--out", str(out), "--limit", "1", "--no-wiener"]) == 2


def test_evaluate_without_a_training_split_fits_wiener_on_validation_and_says_so(saved_model,
                                                                                 tmp_path):
    data = tmp_path / "data"
    write_dataset(data, {"val": 2, "test": 1}, seed=3, field_fn=blob_field, progress=False)
    out = tmp_path / "report"
    with pytest.warns(UserWarning, match="no training split"):
        rows = evaluate_table2.evaluate_directory(data, [saved_model], out, stride=48,
                                                  n_val_smoothing=2, ss95=False,
                                                  progress=False)
    assert [r["method"] for r in rows] == ["KS93", "Wiener", "CNN"]
    report = _report_json(out)
    assert report["meta"]["wiener_split"] == "val"
    assert any("validation clusters" in note for note in report["notes"])
    assert "no training split" in open(out / "table2.md").read()


# ---------------------------------------------------------------------------
# Mass bias, named rows, the mosaic cache
# ---------------------------------------------------------------------------
def test_mass_bias_bins_hold_each_methods_exact_ratio(evaluation):
    truth = evaluation.truth
    scaled = dataclasses.replace(evaluation, maps={"half": 0.5 * truth, "same": truth.copy()})
    rows = evaluate_table2.mass_bias_rows(scaled, n_bins=2)
    m_t, _ = wlcnn.cluster_masses(truth, truth)
    assert [r["n_clusters"] for r in rows] == [1, 1]  # the two test clusters, one a bin
    # bins in increasing truth mass, each its own cluster's M_cl
    assert [r["M_truth_median"] for r in rows] == pytest.approx(sorted(m_t), rel=1e-12)
    for r in rows:
        # M_cl is a sum of κ: a map of half the truth has half its mass, to round-off
        assert r["half"] == r["half_p16"] == r["half_p84"] == pytest.approx(0.5, rel=1e-12)
        assert r["same"] == pytest.approx(1.0, rel=1e-12)
        assert r["same_catastrophic"] == r["half_catastrophic"] == 0.0  # same peaks


def test_mass_bias_bins_count_catastrophic_centroids(evaluation):
    truth = evaluation.truth
    spiked = truth.copy()
    for k, t in enumerate(truth):  # a spike 30 pixels from the truth's peak in cluster 0 only
        if k == 0:
            i, j = wlcnn.peak_pixel(t)
            ii, jj = np.argwhere(np.isfinite(t) & (np.hypot(*np.indices(t.shape)
                                                   - np.array([i, j])[:, None, None]) > 30))[0]
            spiked[k, ii, jj] = 10 * np.nanmax(t)
    ev = dataclasses.replace(evaluation, maps={"spiked": spiked})
    offsets = wlcnn.centroid_offsets(truth, spiked)
    assert offsets[0] > 30 - 2 and offsets[1] == 0.0  # the spike holds the centroid's window
    rows = evaluate_table2.mass_bias_rows(ev, n_bins=2)
    m_t, _ = wlcnn.cluster_masses(truth, truth)
    want = [1.0 if np.argsort(m_t)[b] == 0 else 0.0 for b in range(2)]
    assert [r["spiked_catastrophic"] for r in rows] == want


def test_cached_method_computes_each_grid_once(tmp_path):
    calls = []

    def fn(grid):
        calls.append(1)
        return grid[..., 0] * 2.0

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    cached = wlcnn.cached_method(fn, tmp_path / "m")
    first = cached(a)
    np.testing.assert_array_equal(cached(a), first)  # read back bit for bit
    np.testing.assert_array_equal(first, a[..., 0] * 2.0)
    assert len(calls) == 1
    np.testing.assert_array_equal(cached(b), b[..., 0] * 2.0)  # another grid: computed
    assert len(calls) == 2
    assert len(os.listdir(tmp_path / "m")) == 2  # no temporary file left


def test_named_model_rows_are_evaluated_apart_and_read_back_from_the_cache(
        tiny_dataset, saved_model, tmp_path, monkeypatch):
    other = tmp_path / "other.keras"
    wlcnn.save_model(wlcnn.build_model(dataclasses.replace(CFG, filter_size=5), "Fiducial"), other)
    cache = tmp_path / "cache"
    kwargs = dict(stride=48, limit=1, n_val_smoothing=2, wiener=False, ss95=False, progress=False,
                  cache=cache)
    rows = evaluate_table2.evaluate_directory(
        tiny_dataset, [f"first={saved_model}", f"second={other}"], tmp_path / "a",
        ks93_paper_like=(3.0,), **kwargs)
    assert [r["method"] for r in rows] == ["KS93", "KS93 (3′, paper-like)", "first", "second"]
    # a wider kernel flattens the peak: the paper-like row's mass is the smaller
    assert rows[1]["M_ratio"] < rows[0]["M_ratio"]
    # two weight sets, one mosaic each (one cluster): two cache directories of one file
    assert sorted(len(os.listdir(cache / d)) for d in os.listdir(cache)) == [1, 1]
    assert rows[2]["R"] != rows[3]["R"]  # other weights, other maps

    def no_prediction(*args, **kwargs):
        raise AssertionError("a cached mosaic was predicted again")
    monkeypatch.setattr(wlcnn, "predict_mosaic_runs", no_prediction)
    again = evaluate_table2.evaluate_directory(
        tiny_dataset, [f"second={other}", f"first={saved_model}"], tmp_path / "b",
        ks93_paper_like=(3.0,), **kwargs)
    by_name = {r["method"]: r for r in again}
    for r in rows:
        assert by_name[r["method"]] == r  # the same numbers, from the cache
    with pytest.raises(ValueError, match="name of its own"):
        evaluate_table2.evaluate_directory(
            tiny_dataset, [f"x={saved_model}", f"x={other}"], tmp_path / "c", **kwargs)


# ---------------------------------------------------------------------------
# Paired differences between methods (examples/paired_table2.py)
# ---------------------------------------------------------------------------
def _with_maps(results, **maps):
    return dataclasses.replace(results, maps={**results.maps, **maps})


def test_paired_losses_on_all_clusters_are_table2s_metrics(evaluation):
    row = wlcnn.paper_metrics(evaluation.truth, evaluation.maps["CNN"])
    scores = wlcnn.bootstrap_scores(evaluation, 2, np.random.default_rng(0), ["CNN"])
    got = paired_table2.losses(scores["CNN"])[0]  # draw 0: the clusters themselves
    want = [abs(row["R"] - 1), row["D"], abs(row["M_ratio"] - 1), row["dpeak"]]
    np.testing.assert_allclose(got, want, rtol=1e-12)  # the same arithmetic, reordered sums


def test_a_method_against_its_copy_differs_by_zero_with_zero_error(evaluation):
    results = _with_maps(evaluation, copy=evaluation.maps["CNN"].copy())
    rows = paired_table2.paired_differences(results, ["CNN"], ["copy"], n_boot=4, seed=3)
    assert [r["metric"] for r in rows] == list(paired_table2.METRICS)
    assert all(r["diff"] == 0 and r["err"] == 0 and r["z"] == 0 for r in rows)
    assert not paired_table2.verdict(rows, "copy", "CNN")["replace"]


def test_swapping_method_and_reference_negates_the_difference_and_keeps_its_error(evaluation):
    ab = paired_table2.paired_differences(evaluation, ["KS93"], ["CNN"], n_boot=6, seed=5)
    ba = paired_table2.paired_differences(evaluation, ["CNN"], ["KS93"], n_boot=6, seed=5)
    for x, y in zip(ab, ba):
        assert x["diff"] == -y["diff"] and x["err"] == pytest.approx(y["err"], rel=1e-12)


def test_paired_error_of_R_and_M_is_the_standard_error_over_clusters():
    """40 identical clusters; the method is the truth times 1.3 + 0.1 ε_i per cluster, the
    reference the truth times 1.3. R (equal weights per cluster) is then the mean and M the
    median of 1.3 + 0.1 ε_i, D and Δ_peak are 0 for both, and the bootstrap spread of the
    R difference is the standard error of the mean of 0.1 ε_i."""
    n, size = 40, 32
    yy, xx = np.mgrid[0:size, 0:size]
    blob = 0.5 * np.exp(-((xx - 16) ** 2 + (yy - 15) ** 2) / (2 * 4.0**2))
    truth = np.repeat(blob[None], n, axis=0)
    eps = np.random.default_rng(21).standard_normal(n)
    factor = 1.3 + 0.1 * eps
    results = wlcnn.Evaluation(
        truth=truth, maps={"ref": 1.3 * truth, "cnn": factor[:, None, None] * truth},
        run_std={}, run_mass_std={}, star_mask=np.zeros((size, size), bool),
        index=np.arange(n))
    n_boot = 300
    rows = {r["metric"]: r for r in paired_table2.paired_differences(
        results, ["ref"], ["cnn"], n_boot=n_boot, seed=0)}
    # exact up to round-off in the weighted sums (all ratios lie within 3σ: none is clipped)
    assert rows["R"]["diff"] == pytest.approx(0.1 * eps.mean(), abs=1e-12)
    assert rows["M"]["diff"] == pytest.approx(0.1 * np.median(eps), abs=1e-12)
    assert rows["D"]["diff"] == pytest.approx(0, abs=1e-12)
    assert rows["dpeak"]["diff"] == pytest.approx(0, abs=1e-12)
    # the bootstrap's standard error is s √((n−1)/n) / √n; its spread over 300 draws is
    # 1/√(2·299) = 4 % of it, so 15 % is more than 3σ and still fails a wrong √n or √2
    sem = 0.1 * eps.std(ddof=0) / np.sqrt(n)
    assert rows["R"]["err"] == pytest.approx(sem, rel=0.15)


def test_the_verdict_needs_three_better_metrics_and_none_much_worse():
    def rows(*z):
        return [{"method": "a", "reference": "b", "metric": k, "z": v}
                for k, v in zip(paired_table2.METRICS, z)]
    assert paired_table2.verdict(rows(-1.1, -1.1, -1.1, 0.0), "a", "b")["replace"]
    assert not paired_table2.verdict(rows(-1.1, -1.1, -0.9, 0.0), "a", "b")["replace"]
    assert not paired_table2.verdict(rows(-5, -5, -5, 2.1), "a", "b")["replace"]
    assert paired_table2.verdict(rows(-5, -5, -5, 1.9), "a", "b")["worse"] == []


def test_paired_command_writes_its_table_and_ends_with_its_json(report, capsys):
    args = [report, "--reference", "KS93", "--methods", "CNN", "--n-boot", "3"]
    assert paired_table2.main(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(os.path.join(report, "paired.json")) as fh:
        assert json.load(fh) == last
    with open(os.path.join(report, "paired.csv"), newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(paired_table2.METRICS)
    assert last["verdicts"][0]["method"] == "CNN" and last["n_boot"] == 3


@pytest.mark.parametrize("args, message", [
    (["--reference", "KS93", "--methods", "nope"], "nope"),
    (["--reference", "KS93", "--methods", "CNN", "--n-boot", "1"], "n_boot")])
def test_paired_command_refuses_an_unknown_method_or_too_few_draws(report, args, message,
                                                                   capsys):
    assert paired_table2.main([report, *args]) == 2
    assert message in capsys.readouterr().err
