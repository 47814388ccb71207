"""§2.3.1 training data: source catalogs, their noise model and star masks."""
import numpy as np
import pytest

import wlcnn
from skies import write_dataset

CFG = wlcnn.PAPER
ZERO = np.zeros((CFG.npix, CFG.npix))


def _catalog(seed, kappa=0.0, g1=0.0, g2=0.0, masks=None):
    return wlcnn.simulate_catalog(ZERO + kappa, ZERO + g1, ZERO + g2, CFG,
                                  np.random.default_rng(seed), masks)


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


# -- dataset files ---------------------------------------------------------------
from conftest import blob_field  # noqa: E402


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_dataset_round_trip_keeps_maps_catalogs_and_manifest(tiny_dataset):
    ds = wlcnn.ClusterDataset(tiny_dataset, config=CFG)
    m = ds.manifest
    assert m["counts"] == {"train": 6, "val": 3, "test": 2} and m["seed"] == 1 and m["masks"]
    assert {"numpy", "scipy", "astropy", "wlcnn"} <= set(m["packages"])
    assert all(len(e["sha256"]) == 64 for e in m["shards"]["train"])
    clusters = list(ds.clusters("val"))
    assert [c["index"] for c in clusters] == [0, 1, 2]
    # the record is what make_cluster gives for the cluster's own seed
    rng = wlcnn.cluster_rng(1, "val", 1)
    want = wlcnn.make_cluster(blob_field(CFG, rng), CFG, rng, masks=True)
    got = clusters[1]
    np.testing.assert_array_equal(got["kappa"], want["kappa"].astype(np.float32))
    np.testing.assert_array_equal(got["catalog"]["x"], want["catalog"]["x"])
    np.testing.assert_array_equal(got["catalog"]["e1"], np.float32(want["catalog"]["e1"]))
    assert len(got["masks"]) == len(want["masks"]) > 0
    assert got["meta"] == want["meta"]


def test_same_seed_gives_byte_identical_files(tmp_path, tiny_dataset):
    write_dataset(tmp_path, {"train": 6, "val": 3, "test": 2}, seed=1, field_fn=blob_field,
                  shard_size=2, masks=True, progress=False)
    assert _files(tmp_path) == _files(tiny_dataset)


def test_shards_made_by_separate_jobs_form_one_dataset(tmp_path, tiny_dataset):
    kw = dict(counts={"train": 6, "val": 3, "test": 2}, seed=1, field_fn=blob_field, shard_size=2,
              masks=True, progress=False)
    assert write_dataset(tmp_path, shard=(1, 3), **kw) is None   # incomplete: no manifest yet
    assert not (tmp_path / "manifest.json").exists()
    assert write_dataset(tmp_path, shard=(0, 3), **kw) is None
    assert write_dataset(tmp_path, shard=(2, 3), workers=2, **kw) is not None
    assert _files(tmp_path) == _files(tiny_dataset)


def test_interrupted_run_resumes_without_redoing_finished_shards(tmp_path, tiny_dataset):
    calls = []

    def flaky(config, rng, *_):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed while making the third shard
        return blob_field(config, rng)

    kw = dict(counts={"train": 6, "val": 3, "test": 2}, seed=1, shard_size=2, masks=True,
              progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, field_fn=flaky, **kw)
    assert not list(tmp_path.rglob("*.tmp-*"))  # nothing half-written left behind
    shards = sorted(p.name for p in (tmp_path / "train").glob("*.npz"))
    assert shards == ["shard-00000.npz", "shard-00001.npz"]
    calls.clear()
    write_dataset(tmp_path, field_fn=blob_field_counting(calls), **kw)
    assert len(calls) == 11 - 4  # the two finished shards (4 clusters) are not redone
    assert _files(tmp_path) == _files(tiny_dataset)


def blob_field_counting(calls):
    def f(config, rng, *_):
        calls.append(1)
        return blob_field(config, rng)
    return f


def test_corrupt_or_missing_shard_is_a_clear_error(tmp_path, tiny_dataset):
    import shutil
    shutil.copytree(tiny_dataset, tmp_path / "d")
    shard = tmp_path / "d" / "train" / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:1000])
    ds = wlcnn.ClusterDataset(tmp_path / "d")
    ds.load_shard("train", 0)
    with pytest.raises(ValueError, match="corrupt"):
        ds.load_shard("train", 1)
    with pytest.raises(ValueError, match="corrupt"):  # without the checksum the zip itself fails
        wlcnn.ClusterDataset(tmp_path / "d", verify=False).load_shard("train", 1)
    shard.unlink()
    with pytest.raises(ValueError, match="missing"):
        ds.load_shard("train", 1)


def test_dataset_of_another_config_or_split_is_refused(tmp_path, tiny_dataset):
    import dataclasses
    with pytest.raises(ValueError, match="sigma_e"):
        wlcnn.ClusterDataset(tiny_dataset, config=dataclasses.replace(CFG, sigma_e=0.3))
    ds = wlcnn.ClusterDataset(tiny_dataset)
    with pytest.raises(ValueError, match="unknown split"):
        ds.count("training")
    with pytest.raises(ValueError, match="other settings"):
        write_dataset(tiny_dataset, {"train": 7}, seed=1, field_fn=blob_field, progress=False)
    with pytest.raises(ValueError, match="manifest"):
        wlcnn.ClusterDataset(tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        write_dataset(tmp_path, {"training": 2}, field_fn=blob_field, progress=False)
    with pytest.raises(ValueError, match="zero"):
        write_dataset(tmp_path, {"train": 0}, field_fn=blob_field, progress=False)
