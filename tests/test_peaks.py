"""Significance maps, peak catalogues, matching and stacking (examples/skies.py, section 3)."""
import numpy as np
import scipy.ndimage
import pytest
from astropy.table import Table

import skies
import wlcnn

CENTER = (150.1, 2.2)  # a COSMOS-like field centre, degrees


def small_field(size_arcmin=16.0):
    """A field's output grid and WCS (11.52″ pixels) at CENTER."""
    geometry = skies.field_geometry(size_arcmin, wlcnn.PAPER)
    return geometry, skies.map_wcs(CENTER, geometry)


def _bilinear(field, x_arcsec, y_arcsec, pixel_arcsec):
    """A map at positions (arcsec from the lower-left corner), pixel (i, j) at (j + ½, i + ½)."""
    coords = np.stack([y_arcsec / pixel_arcsec - 0.5, x_arcsec / pixel_arcsec - 0.5])
    return scipy.ndimage.map_coordinates(field, coords, order=1, mode="nearest")


def catalog(geometry, rng, density=50.0, sigma_e=0.25, cluster=None):
    """Uniform sources over the field (x, y arcsec from the centre), shape noise, optional shear.

    ``cluster`` = (x0, y0, amplitude, width), arcsec: a Gaussian κ blob whose
    shear (wlcnn.shear_from_kappa on the field's input grid) is added to the
    intrinsic ellipticities (weak lensing, ε = ε_s + γ).
    """
    half = geometry.npix / 2 * geometry.pixel_arcsec
    n = rng.poisson(density * (2 * half / 60.0) ** 2)
    x, y = rng.uniform(-half, half, n), rng.uniform(-half, half, n)
    e1, e2 = rng.normal(0.0, sigma_e, (2, n))
    if cluster is not None:
        cfg = geometry.config
        npix = cfg.pool * geometry.npix
        c = (np.arange(npix) + 0.5) * cfg.pixel_arcsec - half  # input pixel centres
        x0, y0, amp, width = cluster
        kappa = amp * np.exp(-((c[None, :] - x0) ** 2 + (c[:, None] - y0) ** 2) / (2 * width**2))
        g1, g2 = wlcnn.shear_from_kappa(kappa)
        e1 = e1 + _bilinear(g1, x + half, y + half, cfg.pixel_arcsec)
        e2 = e2 + _bilinear(g2, x + half, y + half, cfg.pixel_arcsec)
    return x, y, e1, e2, np.full(n, sigma_e)


# ---------------------------------------------------------------------------
# Rotations and noise maps
# ---------------------------------------------------------------------------
def test_rotation_keeps_modulus_turns_phase_by_twice_a_uniform_angle():
    rng = np.random.default_rng(1)
    n = 200_000
    e1, e2 = 0.3 + 0.05 * rng.normal(size=n), -0.1 + 0.05 * rng.normal(size=n)
    r1, r2 = skies.rotate_shapes(e1, e2, np.random.default_rng(2))
    np.testing.assert_allclose(np.hypot(r1, r2), np.hypot(e1, e2), rtol=1e-12)
    # Spin 2: ε e^{2iψ} with ψ uniform in [0, π), the same draws as the function's.
    psi = np.random.default_rng(2).uniform(0.0, np.pi, n)
    np.testing.assert_allclose(r1 + 1j * r2, (e1 + 1j * e2) * np.exp(2j * psi), atol=1e-12)
    # The phase change is uniform over the full circle: ⟨e^{iΔ}⟩ = 0.  A spin-1
    # turn (e^{iψ}) would give 2i/π here.  5/sqrt(n): five standard errors.
    dphase = np.exp(1j * (np.angle(r1 + 1j * r2) - np.angle(e1 + 1j * e2)))
    assert abs(dphase.mean()) < 5 / np.sqrt(n)
    # A mean shear of (0.3, -0.1) is gone: ⟨ε_rot⟩ = 0 within five standard errors.
    assert abs(r1.mean()) < 5 * 0.32 / np.sqrt(n / 2) and abs(r2.mean()) < 5 * 0.32 / np.sqrt(n / 2)


def test_noise_maps_of_a_lensed_catalog_have_zero_mean_where_the_cluster_is():
    geometry, wcs = small_field()
    rng = np.random.default_rng(3)
    x, y, e1, e2, sigma = catalog(geometry, rng, cluster=(180.0, -120.0, 0.3, 60.0))
    map_fn = skies.ks93_map_fn(x, y, sigma, geometry, fwhm_arcmin=1.0)
    kappa = map_fn(e1, e2)
    noise = skies.noise_maps(map_fn, e1, e2, 24, np.random.default_rng(4))
    assert noise.shape == (24,) + kappa.shape
    iy, ix = np.unravel_index(np.argmax(kappa), kappa.shape)
    sig = skies.significance_map(kappa, noise)
    assert sig.snr[iy, ix] > 5  # the planted cluster, ~0.23 after smoothing, noise ~0.023
    # Its peak is where it was planted, 3′ West and 2′ South of the centre (the
    # 1″ tangent-plane WCS turns those offsets to the sky independently of
    # the map's WCS); 0.5′: the noise moves a peak of 9σ by ~2 pixels (23″).
    peak = skies.find_peaks(sig.snr, kappa, wcs, threshold=5.0)[0]
    ra0, dec0 = skies.tangent_plane_wcs(CENTER).pixel_to_world_values(180.0, -120.0)
    assert skies._separation_arcmin([peak["ra"]], [peak["dec"]], [ra0], [dec0])[0, 0] < 0.5
    # Mean of the rotated maps at the cluster: zero within 4 standard errors
    # (4: one pixel, a two-sided test that a fixed seed passes by a margin).
    assert abs(noise[:, iy, ix].mean()) < 4 * noise[:, iy, ix].std(ddof=1) / np.sqrt(24)


def test_snr_of_a_pure_noise_catalog_is_standard_normal():
    geometry, wcs = small_field()
    rng = np.random.default_rng(5)
    x, y, e1, e2, sigma = catalog(geometry, rng)
    map_fn = skies.ks93_map_fn(x, y, sigma, geometry, fwhm_arcmin=1.0)
    noise = skies.noise_maps(map_fn, e1, e2, 40, np.random.default_rng(6))
    border = 8  # KS93's noise is lower near the zero-padded edge; σ is per pixel: all but a rim
    snrs = []
    for seed in range(6):  # fresh shape noise at the same positions: independent pure-noise maps
        f1, f2 = np.random.default_rng(100 + seed).normal(0.0, 0.25, (2, len(x)))
        snr = skies.significance_map(map_fn(f1, f2), noise).snr
        snrs.append(snr[border:-border, border:-border].ravel())
    snrs = np.concatenate(snrs)
    # Per-pixel σ from 40 realisations: S/N ~ Student t, std sqrt(39/37) = 1.03.
    # 0.08: ~6 × 1,500 correlated pixels (1′ smoothing ≈ 5 pixels) leave ~300
    # independent values, a standard error of ~0.04 on the std and the mean.
    assert abs(snrs.mean()) < 0.1
    assert abs(snrs.std() - 1.03) < 0.08


def test_smoothed_noise_gives_the_same_snr_scale():
    rng = np.random.default_rng(7)
    noise = rng.normal(0.0, 0.02, (6, 60, 60))  # white noise, σ = 0.02 everywhere
    kappa = np.zeros((60, 60))
    kappa[30, 30] = 0.1
    sig = skies.significance_map(kappa, noise, smooth_pix=6.0)
    # 6 maps × ~(2·6)² pixels in the smoothing window: σ known to ~2 %; 5 % margin.
    assert sig.snr[30, 30] == pytest.approx(5.0, rel=0.05)
    assert np.nanmedian(sig.std) == pytest.approx(0.02, rel=0.05)


def test_significance_and_noise_maps_reject_bad_input():
    with pytest.raises(ValueError, match="n_realisations"):
        skies.noise_maps(lambda a, b: np.zeros((2, 2)), [0.1], [0.1], 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="noise must have shape"):
        skies.significance_map(np.zeros((4, 4)), np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="smooth_pix"):
        skies.significance_map(np.zeros((4, 4)), np.zeros((3, 4, 4)), smooth_pix=-1)


# ---------------------------------------------------------------------------
# Peaks
# ---------------------------------------------------------------------------
def planted_maps(geometry):
    """Three κ peaks at known pixels (y, x) on a flat map; σ = 0.02 everywhere."""
    n = geometry.npix
    yy, xx = np.mgrid[0:n, 0:n]
    peaks = [((20, 60), 0.20), ((50, 15), 0.10), ((70, 70), 0.05)]
    kappa = np.zeros((n, n))
    for (py, px), amp in peaks:
        kappa += amp * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * 2.0**2))
    return kappa, kappa / 0.02, peaks


def test_find_peaks_recovers_planted_peaks_on_the_sky():
    geometry, wcs = small_field()
    kappa, snr, planted = planted_maps(geometry)
    table = skies.find_peaks(snr, kappa, wcs, threshold=4.0)
    # 0.05 / 0.02 = 2.5 < 4: the third peak is below threshold.
    assert len(table) == 2
    assert list(table["snr"]) == pytest.approx([10.0, 5.0], rel=1e-12)
    assert list(table["kappa"]) == pytest.approx([0.20, 0.10], rel=1e-12)
    for row, ((py, px), _) in zip(table, planted):
        assert (row["x"], row["y"]) == (px, py)
        ra, dec = (float(v) for v in wcs.pixel_to_world_values(px, py))
        assert (row["ra"], row["dec"]) == pytest.approx((ra, dec), abs=1e-10)
    # Sky orientation: x grows towards West (RA falls), y towards North.
    # The centre of the map is the corner at pixel npix/2 − 0.5 on both axes.
    c = geometry.npix / 2 - 0.5
    first = table[0]  # pixel x = 60 > c (West), y = 20 < c (South)
    assert first["ra"] < CENTER[0] and first["dec"] < CENTER[1]
    dx_arcsec = (60 - c) * geometry.pixel_arcsec
    dra = (CENTER[0] - first["ra"]) * np.cos(np.radians(CENTER[1])) * 3600.0
    assert dra == pytest.approx(dx_arcsec, rel=1e-3)  # 1e-3: TAN vs flat sky at 4′
    assert table["ra"].unit == "deg" and table["x"].unit == "pix"


def test_find_peaks_ignores_pixels_outside_the_footprint():
    geometry, wcs = small_field()
    kappa, snr, planted = planted_maps(geometry)
    footprint = np.ones_like(snr, dtype=bool)
    footprint[20, 60] = False  # the brightest peak's pixel
    table = skies.find_peaks(snr, kappa, wcs, threshold=4.0, footprint=footprint)
    # Its neighbours, now maxima of the remaining pixels, are > 4 (10 e^{-1/8} = 8.8).
    assert table[0]["snr"] == pytest.approx(10.0 * np.exp(-1 / 8))
    assert (20, 60) not in [(r["y"], r["x"]) for r in table]


@pytest.mark.parametrize("name", ["peaks.fits", "peaks.ecsv", "peaks.fits.gz"])
def test_peak_table_round_trips_with_units(tmp_path, name):
    geometry, wcs = small_field()
    kappa, snr, _ = planted_maps(geometry)
    table = skies.find_peaks(snr, kappa, wcs, threshold=2.0)
    path = skies.write_peaks(table, tmp_path / name)
    back = Table.read(path)
    assert len(back) == 3 and back["ra"].unit == "deg" and back["dec"].unit == "deg"
    np.testing.assert_allclose(back["snr"], table["snr"])
    with pytest.raises(FileExistsError):
        skies.write_peaks(table, path)
    with pytest.raises(ValueError, match="unknown peak-table format"):
        skies.write_peaks(table, tmp_path / "peaks.txt")


# ---------------------------------------------------------------------------
# Matching, completeness, purity, stacking
# ---------------------------------------------------------------------------
def offset(ra, dec, east_arcmin, north_arcmin):
    return ra + east_arcmin / 60.0 / np.cos(np.radians(dec)), dec + north_arcmin / 60.0


def constructed_peaks():
    """Four objects; five peaks: three 0.5′ from one (S/N 6, 4, 3.5), two 10′ away (5, 3.2)."""
    objects = [offset(*CENTER, e, n) for e, n in ((-5, -5), (5, -5), (-5, 5), (5, 5))]
    near = [(offset(*objects[i], 0.5, 0.0), s) for i, s in ((0, 6.0), (1, 4.0), (2, 3.5))]
    far = [(offset(*CENTER, 0.0, 10.0), 5.0), (offset(*CENTER, 10.0, 0.0), 3.2)]
    rows = [(ra, dec, s) for (ra, dec), s in near + far]
    peaks = Table(rows=rows, names=("ra", "dec", "snr"))
    peaks.meta["THRESH"] = 3.0
    ra, dec = np.array(objects).T
    return peaks, ra, dec


def test_completeness_and_purity_of_a_constructed_catalogue():
    peaks, ra, dec = constructed_peaks()
    table = skies.completeness_purity(peaks, ra, dec, radius_arcmin=1.0, thresholds=[3, 4, 5])
    assert list(table["n_peaks"]) == [5, 3, 2]
    assert list(table["completeness"]) == pytest.approx([3 / 4, 2 / 4, 1 / 4])
    assert list(table["purity"]) == pytest.approx([3 / 5, 2 / 3, 1 / 2])
    # A radius below the 0.5′ offsets matches nothing.
    tight = skies.completeness_purity(peaks, ra, dec, radius_arcmin=0.4, thresholds=[3])
    assert tight["completeness"][0] == 0 and tight["purity"][0] == 0
    with pytest.raises(ValueError, match="below the peak table"):
        skies.completeness_purity(peaks, ra, dec, 1.0, thresholds=[2])


def test_match_radius_is_a_great_circle_distance():
    # 0.9′ of RA offset on the sky at Dec 60° is 1.8′ of RA coordinate: matched at 1′.
    peaks = Table({"ra": [offset(0.0, 60.0, 0.9, 0.0)[0]], "dec": [60.0]})
    true, found = skies.match_peaks(peaks, [0.0], [60.0], radius_arcmin=1.0)
    assert true[0] and found[0]
    true, found = skies.match_peaks(peaks, [0.0], [60.0], radius_arcmin=0.85)
    assert not true[0] and not found[0]


def test_objects_outside_the_footprint_error_or_are_skipped():
    geometry, wcs = small_field()
    footprint = np.ones((geometry.npix, geometry.npix), dtype=bool)
    footprint[:, :10] = False  # a hole along the East edge (small x)
    ra = np.array([CENTER[0], CENTER[0] + 1.0, wcs.pixel_to_world_values(3, 40)[0]])
    dec = np.array([CENTER[1], CENTER[1], wcs.pixel_to_world_values(3, 40)[1]])
    with pytest.raises(ValueError, match="2 of 3 known objects lie outside"):
        skies.objects_inside(ra, dec, wcs, footprint)
    keep = skies.objects_inside(ra, dec, wcs, footprint, outside="skip")
    assert list(keep) == [True, False, False]
    with pytest.raises(ValueError, match="none of the 1"):
        skies.objects_inside([CENTER[0] + 5], [CENTER[1]], wcs, footprint, outside="skip")
    with pytest.raises(ValueError, match="outside must be"):
        skies.objects_inside(ra, dec, wcs, footprint, outside="ignore")
    with pytest.raises(ValueError, match="NaN"):
        skies.objects_inside([np.nan], [0.0], wcs, footprint)


def test_stack_snr_detects_planted_bumps_and_not_random_positions():
    geometry, wcs = small_field(30.0)
    n = geometry.npix
    rng = np.random.default_rng(8)
    kappa = rng.normal(0.0, 0.02, (n, n))  # white noise, σ = 0.02
    px = rng.uniform(5, n - 5, (2, 30))
    ra, dec = wcs.pixel_to_world_values(px[0], px[1])
    footprint = np.ones((n, n), dtype=bool)
    null = skies.stack_snr(kappa, wcs, ra, dec, footprint, np.random.default_rng(9), n_random=500)
    # Pure noise at the objects: |S/N| < 3 (a 3σ two-sided test; this seed gives well below).
    assert abs(null.snr) < 3
    # Random sets of 30 pixel values (bilinear: < σ each): spread ≤ 0.02 / sqrt(30).
    assert null.random_std < 0.02 / np.sqrt(30) * 1.1
    iy, ix = np.round(px[1]).astype(int), np.round(px[0]).astype(int)
    kappa[iy, ix] += 0.05  # a bump at the nearest pixel of each object
    ra, dec = wcs.pixel_to_world_values(ix, iy)
    hit = skies.stack_snr(kappa, wcs, ra, dec, footprint, np.random.default_rng(9), n_random=500)
    assert hit.n == 30 and hit.kappa == pytest.approx(0.05, abs=0.02 / np.sqrt(30) * 4)
    assert hit.snr > 10  # 0.05 / (0.02 / sqrt(30)) ≈ 14


# ---------------------------------------------------------------------------
# The COSMOS data and its reading (examples/cosmos.py)
# ---------------------------------------------------------------------------
def test_cosmos_data_is_in_the_repository_as_documented():
    import cosmos
    table = Table.read(cosmos.CATALOG)
    assert len(table) == 417_117  # Schrabback et al. (2010)
    assert table.colnames == ["ra", "dec", "e1", "e2", "weight"]
    assert all(table[c].dtype.kind == "f" and table[c].dtype.itemsize == 4 for c in table.colnames)
    assert table["ra"].unit == "deg"
    assert cosmos.CATALOG.stat().st_size < 10 * 2**20
    groups = cosmos.read_groups()
    assert len(groups) == 72
    # First row of the file: ID 3 at (150.80244, 1.98985), z = 0.25 (column 7).
    first = (groups["id"][0], groups["ra"][0], groups["dec"][0], groups["z"][0])
    assert first == (3, 150.80244, 1.98985, 0.25)


def test_weight_rescaling_makes_the_weights_inverse_variances():
    import cosmos
    rng = np.random.default_rng(10)
    sigma_true = rng.uniform(0.2, 0.4, 100_000)
    e1, e2 = rng.normal(0.0, 1.0, (2, sigma_true.size)) * sigma_true
    relative = sigma_true * 3.4  # weights 1/11.6 of the inverse variance, as COSMOS's
    sigma, scale = cosmos.rescale_sigma(e1, e2, relative)
    assert np.mean((e1**2 + e2**2) / 2 / sigma**2) == pytest.approx(1.0, rel=1e-12)
    # The inverse variances come back to the sampling error of the mean of
    # 2 × 10⁵ χ²₁ values, sqrt(2 / 2e5) = 0.3 %: 1 % is three of those.
    assert scale == pytest.approx(3.4**2, rel=0.01)
    np.testing.assert_allclose(sigma, sigma_true, rtol=0.01)


def test_cosmos_table_prints_whole_with_fixed_decimals_and_writes_full_precision(tmp_path):
    import cosmos
    rng = np.random.default_rng(12)
    # 30 float columns × 60 rows: far beyond astropy's terminal-sized str (80 × 25).
    table = cosmos.FullTable({f"column_{i:02d}": rng.uniform(0, 1, 60) / 7 for i in range(30)})
    table["threshold"] = np.linspace(3.0, 5.0, 60)
    text = str(table)
    lines = text.splitlines()
    assert "..." not in text and len(lines) == 60 + 2  # header, dashes, every row
    assert lines[0].split() == table.colnames
    assert lines[2].split()[0] == f"{table['column_00'][0]:.3f}"
    assert lines[2].split()[-1] == "3.0"
    table.write(tmp_path / "t.ecsv")
    back = Table.read(tmp_path / "t.ecsv")
    np.testing.assert_array_equal(back["column_00"], table["column_00"])  # not the 3 decimals


def test_stack_bootstrap_gives_the_scatter_of_the_snr_difference():
    import cosmos
    rng = np.random.default_rng(13)
    n = 50
    ks93 = rng.normal(0.0, 1.0, n)
    # Random sets of n positions on a map of unit per-position scatter: σ of their mean 1/√n.
    stack = {"ks93": skies.Stack(n, float(ks93.mean()), 0.0, 1 / np.sqrt(n),
                                 float(ks93.mean()) * np.sqrt(n), ks93)}
    same = cosmos.stack_bootstrap({"cnn": stack["ks93"], **stack}, np.random.default_rng(0))
    assert same == {"difference": 0.0, "std": 0.0, "cnn_higher": 0.0}  # one map: no difference
    cnn = rng.normal(0.0, 1.0, n)  # an independent map
    stack["cnn"] = skies.Stack(n, float(cnn.mean()), 0.0, 1 / np.sqrt(n),
                               float(cnn.mean()) * np.sqrt(n), cnn)
    res = cosmos.stack_bootstrap(stack, np.random.default_rng(0))
    # The result is rounded to 2 decimals (it goes into the JSON): half of 0.01.
    assert res["difference"] == pytest.approx(stack["cnn"].snr - stack["ks93"].snr, abs=0.005)
    # Each S/N scatters by ~1 over resampled groups, their difference by √2: 20 % is the
    # sample scatter of 50 values' σ (10 %) twice, and the 1,000 resamplings add 2 %.
    assert res["std"] == pytest.approx(np.sqrt(2), rel=0.2)
    assert 0.0 < res["cnn_higher"] < 1.0


# ---------------------------------------------------------------------------
# Wide-field detection statistics (examples/wide_field.py)
# ---------------------------------------------------------------------------
def test_wide_field_completeness_per_mass_bin_and_purity_on_constructed_halos():
    import wide_field as wf
    plane = skies.tangent_plane_wcs(wf.CENTER)
    # Halos (x, y arcsec from the centre, M200, z): two of 1.5e14, one of 3e14,
    # one of 3e14 beyond z = 1 (not a target), one 1.5e14 at the field's edge (left out).
    hx = np.array([-600.0, 600.0, 0.0, 900.0, 2950.0])
    hy = np.array([0.0, 0.0, 600.0, -900.0, 0.0])
    hra, hdec = plane.pixel_to_world_values(hx, hy)
    halos = Table({"ra": hra, "dec": hdec, "m200": [1.5e14, 1.5e14, 3e14, 3e14, 1.5e14],
                   "z": [0.5, 0.5, 0.3, 1.2, 0.5], "x": hx, "y": hy})
    # Peaks: 20″ from halo 0 (S/N 5), from halo 2 (S/N 3), from the z = 1.2 halo (S/N 3.5),
    # and one 10′ from every halo (S/N 4).
    px = np.array([-600.0, 20.0, 900.0, -1200.0])
    py = np.array([20.0, 600.0, -900.0, -1200.0])
    pra, pdec = plane.pixel_to_world_values(px, py)
    peaks = Table({"ra": pra, "dec": pdec, "snr": [5.0, 3.0, 3.5, 4.0]})
    table = wf.detection_tables(peaks, halos, half=3000.0)
    row3 = table[np.flatnonzero(table["threshold"] == 3.0)[0]]
    assert row3["n_1e+14"] == 2 and row3["c_1e+14"] == 0.5  # halo 0 found, halo 1 not
    assert row3["n_2e+14"] == 1 and row3["c_2e+14"] == 1.0  # halo 2 found at S/N 3
    assert row3["purity"] == pytest.approx(3 / 4)  # the z = 1.2 halo's peak is a true peak
    row45 = table[np.flatnonzero(table["threshold"] == 4.5)[0]]
    assert (row45["c_1e+14"], row45["c_2e+14"], row45["purity"]) == (0.5, 0.0, 1.0)
    assert np.isnan(row3["c_5e+14"])  # an empty bin has no completeness
    # The lowest threshold with purity >= 0.9 (and >= 1 peak) is 4.25 (peaks at 5 only).
    row, reached = wf.at_purity(table, 0.9, min_peaks=1)
    assert reached and row["threshold"] == 4.25
    row, reached = wf.at_purity(table, 0.9, min_peaks=2)  # never with two peaks: best purity
    assert not reached and row["purity"] == pytest.approx(3 / 4)
