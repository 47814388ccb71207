"""§2.3.1 ray-traced maps: reading κ FITS, finding clusters, cutting 32′ fields.

The maps are synthetic stand-ins for MassiveNuS: 1.2° × 1.2° at 0.4′ pixels
(MassiveNuS: 3.5° at 0.41′), NFW halos at known positions plus weak noise,
written in the MassiveNuS layout (primary HDU image, side in degrees in ANGLE).
"""
import json
import re

import numpy as np
import pytest
import scipy.ndimage
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

import wlcnn
import ingest_raytraced as ingest

CFG = wlcnn.PAPER
PIXEL_ARCMIN = 0.4           # MassiveNuS: 3.5° / 512 = 0.41′
NPIX_MAP = 180               # 72′ = 1.2° on a side
SIDE_DEG = NPIX_MAP * PIXEL_ARCMIN / 60.0
CONCENTRATION = 4.0
NOISE_KAPPA = 1e-3           # per-pixel Gaussian noise, weak next to the halos
#: (M200c in M☉, x, y in arcmin from the map's lower-left corner), most massive first.
HALOS = [(8e14, 30.3, 25.1), (4e14, 50.2, 47.7), (2e14, 23.5, 50.6)]
#: A massive halo 7′ from the left edge: a 32′ field around it would leave the map.
EDGE_HALO = (6e14, 7.0, 36.0)


def _kappa_map(halos, npix=NPIX_MAP, seed=1):
    kappa = sum(wlcnn.nfw_kappa_map(m, CONCENTRATION, x * 60, y * 60, npix, PIXEL_ARCMIN * 60)
                for m, x, y in halos)
    return kappa + np.random.default_rng(seed).normal(0.0, NOISE_KAPPA, kappa.shape)


def _write(path, data, **header):
    hdu = fits.PrimaryHDU(data)
    for key, value in header.items():
        hdu.header[key] = value
    hdu.writeto(path)
    return path


def _index(x_or_y_arcmin):
    """Fractional map index of a position: pixel c is centred at (c + ½) pixels."""
    return x_or_y_arcmin / PIXEL_ARCMIN - 0.5


@pytest.fixture(scope="module")
def kappa_map():
    return _kappa_map(HALOS + [EDGE_HALO])


@pytest.fixture(scope="module")
def map_file(kappa_map, tmp_path_factory):
    # float32, as the ray-traced maps are distributed
    return _write(tmp_path_factory.mktemp("maps") / "WLconv_test.fits",
                  kappa_map.astype(np.float32), ANGLE=SIDE_DEG)


@pytest.fixture(scope="module")
def fields(map_file):
    return list(ingest.iter_ingested_fields([map_file]))


# -- reading ----------------------------------------------------------------
def test_read_returns_the_image_as_float64_and_the_side_in_degrees(map_file, kappa_map):
    kappa, side_deg = ingest.read_convergence_map(map_file)
    assert kappa.dtype == np.float64 and kappa.shape == (NPIX_MAP, NPIX_MAP)
    assert side_deg == pytest.approx(SIDE_DEG)
    # [y, x] as astropy gives it: row 0 is FITS row 1, the bottom of the map
    np.testing.assert_array_equal(kappa, kappa_map.astype(np.float32))


def test_read_takes_another_header_key_and_hdu(tmp_path, kappa_map):
    path = tmp_path / "ext.fits"
    image = fits.ImageHDU(kappa_map, name="KAPPA")
    image.header["SIDEDEG"] = SIDE_DEG
    fits.HDUList([fits.PrimaryHDU(), image]).writeto(path)
    kappa, side_deg = ingest.read_convergence_map(path, angle_key="SIDEDEG", hdu="KAPPA")
    np.testing.assert_array_equal(kappa, kappa_map)
    assert side_deg == SIDE_DEG


GOOD = np.zeros((NPIX_MAP, NPIX_MAP), dtype=np.float32)


def _with_nan():
    a = GOOD.copy()
    a[7, 11] = np.nan
    return a


def _with_inf():
    a = GOOD.copy()
    a[3, 5] = np.inf
    return a


BAD_FILES = [
    # (id, data, header, message)
    ("1-D", np.zeros(NPIX_MAP, np.float32), {"ANGLE": SIDE_DEG}, "expected a 2-D image, got a 1-D"),
    ("3-D", np.zeros((2, NPIX_MAP, NPIX_MAP), np.float32), {"ANGLE": SIDE_DEG},
     "expected a 2-D image, got a 3-D"),
    ("non-square", np.zeros((NPIX_MAP, NPIX_MAP + 20), np.float32), {"ANGLE": SIDE_DEG},
     "not square"),
    ("missing key", GOOD, {}, "has no 'ANGLE' key"),
    ("NaN", _with_nan(), {"ANGLE": SIDE_DEG},
     "1 of 32400 pixels are NaN or inf (the first at [y, x] = (7, 11))"),
    ("inf", _with_inf(), {"ANGLE": SIDE_DEG}, "NaN or inf"),
    ("too small", np.zeros((60, 60), np.float32), {"ANGLE": 0.4}, "too small: 24′ on a side"),
    ("zero angle", GOOD, {"ANGLE": 0.0}, "must be positive"),
    ("negative angle", GOOD, {"ANGLE": -SIDE_DEG}, "must be positive"),
    ("text angle", GOOD, {"ANGLE": "3.5 deg"}, "is not a number"),
    ("no image", None, {"ANGLE": SIDE_DEG}, "holds no image data"),
]


@pytest.mark.parametrize("data, header, message", [b[1:] for b in BAD_FILES],
                         ids=[b[0] for b in BAD_FILES])
def test_bad_fits_input_raises_a_value_error_naming_file_and_problem(tmp_path, data, header,
                                                                     message):
    path = _write(tmp_path / "bad.fits", data, **header)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        ingest.read_convergence_map(path)
    assert str(path) in str(err.value)


def test_missing_hdu_and_non_fits_files_raise_value_errors(tmp_path, map_file):
    with pytest.raises(ValueError, match=r"no HDU 3 \(the file has 1 HDUs\)"):
        ingest.read_convergence_map(map_file, hdu=3)
    junk = tmp_path / "junk.fits"
    junk.write_text("not a FITS file\n")
    with pytest.raises(ValueError, match="not a readable FITS file"):
        ingest.read_convergence_map(junk)
    with pytest.raises(FileNotFoundError):
        ingest.read_convergence_map(tmp_path / "absent.fits")


def test_a_bad_map_stops_the_ingestion_with_its_name(tmp_path, map_file):
    bad = _write(tmp_path / "nan.fits", _with_nan(), ANGLE=SIDE_DEG)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: 1 of")):
        list(ingest.iter_ingested_fields([map_file, bad]))


# -- finding clusters -------------------------------------------------------
def test_find_clusters_recovers_the_halos_highest_first(kappa_map):
    peaks, det = ingest.find_clusters(kappa_map, PIXEL_ARCMIN, return_details=True)
    assert peaks.shape == (len(HALOS), 2) and peaks.dtype.kind == "i"
    # in mass order (same concentration: the more massive halo is higher) ...
    for (m, x, y), (iy, ix) in zip(HALOS, peaks):
        # ... each within one map pixel of its true centre
        assert np.hypot(iy - _index(y), ix - _index(x)) <= 1.0, (m, iy, ix)
    assert np.all(np.diff(det["peak_kappa_smoothed"]) < 0)
    assert np.all(det["peak_significance"] > 4.0)
    want = det["background_kappa"] + 4.0 * det["sigma_kappa"]
    assert det["threshold_kappa"] == pytest.approx(want)


def test_the_border_drops_a_halo_whose_field_would_leave_the_map(kappa_map):
    _, x, y = EDGE_HALO
    edge = (round(_index(y)), round(_index(x)))
    everywhere = ingest.find_clusters(kappa_map, PIXEL_ARCMIN, border_arcmin=0.0)
    assert any(np.hypot(iy - _index(y), ix - _index(x)) <= 1.0 for iy, ix in everywhere), edge
    peaks = ingest.find_clusters(kappa_map, PIXEL_ARCMIN)
    centres_arcmin = (peaks + 0.5) * PIXEL_ARCMIN
    half = CFG.field_arcmin / 2
    assert np.all(centres_arcmin >= half)
    assert np.all(centres_arcmin <= NPIX_MAP * PIXEL_ARCMIN - half)
    assert len(peaks) == len(everywhere) - 1


def test_min_separation_keeps_the_higher_of_two_close_peaks(kappa_map):
    # Pairwise distances of the three halos: 30.1′ (1-2), 26.4′ (1-3), 26.9′ (2-3).
    peaks = ingest.find_clusters(kappa_map, PIXEL_ARCMIN, min_separation_arcmin=27.0)
    assert len(peaks) == 2
    for (m, x, y), (iy, ix) in zip(HALOS[:2], peaks):
        assert np.hypot(iy - _index(y), ix - _index(x)) <= 1.0
    # a close pair (2′ apart) counts as one cluster under the default 4′ (an absolute
    # threshold: on a map that is nearly all noise, σ units would pick noise peaks too)
    pair = _kappa_map([(5e14, 30.0, 30.0), (3e14, 32.0, 30.0)], npix=150)
    found = ingest.find_clusters(pair, PIXEL_ARCMIN, threshold_kappa=0.05)
    assert len(found) == 1 and abs(found[0][1] - _index(30.0)) <= 1.0
    apart = ingest.find_clusters(pair, PIXEL_ARCMIN, threshold_kappa=0.05,
                                 min_separation_arcmin=1.0)
    assert len(apart) == 2


def test_every_pair_of_kept_peaks_respects_the_minimum_separation():
    noisy = np.random.default_rng(5).normal(0.0, 1.0, (200, 200))
    for sep in (0.0, 2.0, 5.0):
        peaks = ingest.find_clusters(noisy, PIXEL_ARCMIN, smooth_fwhm_arcmin=0.8,
                                     threshold_sigma=1.0, min_separation_arcmin=sep,
                                     border_arcmin=0.0)
        assert len(peaks) > 5
        d = np.hypot(*(peaks[:, None, :] - peaks[None, :, :]).transpose(2, 0, 1)) * PIXEL_ARCMIN
        assert np.all(d[np.triu_indices(len(peaks), 1)] >= sep)


def test_threshold_and_max_clusters(kappa_map):
    peaks, det = ingest.find_clusters(kappa_map, PIXEL_ARCMIN, return_details=True)
    # an absolute threshold between the 2nd and 3rd peaks keeps two
    cut = det["peak_kappa_smoothed"][1:3].mean()
    assert len(ingest.find_clusters(kappa_map, PIXEL_ARCMIN, threshold_kappa=cut)) == 2
    first = ingest.find_clusters(kappa_map, PIXEL_ARCMIN, max_clusters=1)
    np.testing.assert_array_equal(first, peaks[:1])
    assert ingest.find_clusters(np.zeros((100, 100)), PIXEL_ARCMIN).shape == (0, 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"pixel_arcmin": 0.0}, "pixel_arcmin must be positive"),
    ({"pixel_arcmin": -0.4}, "pixel_arcmin must be positive"),
    ({"min_separation_arcmin": -1.0}, "min_separation_arcmin must be"),
    ({"border_arcmin": np.nan}, "border_arcmin must be"),
    ({"smooth_fwhm_arcmin": -1.0}, "smooth_fwhm_arcmin must be"),
])
def test_find_clusters_rejects_bad_arguments(kwargs, message):
    args = {"pixel_arcmin": PIXEL_ARCMIN, **kwargs}
    with pytest.raises(ValueError, match=message):
        ingest.find_clusters(np.zeros((50, 50)), **args)


def test_find_clusters_rejects_a_map_that_is_not_2d_or_finite():
    with pytest.raises(ValueError, match="2-D"):
        ingest.find_clusters(np.zeros((2, 50, 50)), PIXEL_ARCMIN)
    with pytest.raises(ValueError, match="NaN"):
        ingest.find_clusters(np.full((50, 50), np.nan), PIXEL_ARCMIN)


# -- cutting fields ---------------------------------------------------------
def test_fields_are_on_the_paper_grid_with_the_peak_at_the_centre(fields):
    assert len(fields) == len(HALOS)
    map_pixel_in_cut_pixels = PIXEL_ARCMIN * 60 / CFG.pixel_arcsec     # 6.25
    centre = CFG.npix / 2 - 0.5                                       # between pixels 249 and 250
    for field, (m, x, y) in zip(fields, HALOS):
        for key in ("kappa", "gamma1", "gamma2"):
            assert field[key].shape == (CFG.npix, CFG.npix) and field[key].dtype == np.float64
        i, j = np.unravel_index(np.argmax(field["kappa"]), field["kappa"].shape)
        assert np.hypot(i - centre, j - centre) <= map_pixel_in_cut_pixels
        # and the cut centre is the detected peak's pixel centre, within a map pixel of the halo
        py, px = field["meta"]["peak_yx_arcmin"]
        assert np.hypot(py - y, px - x) <= PIXEL_ARCMIN


def test_cut_shear_is_the_whole_map_shear_interpolated_not_the_cuts_own(fields, kappa_map):
    # What the file holds: float32
    kappa = kappa_map.astype(np.float32).astype(np.float64)
    whole_g1, whole_g2 = wlcnn.shear_from_kappa(kappa, pad=True)
    q_arcmin = CFG.pixel_arcsec / 60
    for field in fields:
        py, px = field["meta"]["peak_yx_arcmin"]
        # independent geometry: output pixel k at (k + ½) q from the lower-left corner
        pos = (np.arange(CFG.npix) + 0.5) * q_arcmin - CFG.field_arcmin / 2
        rows = (py + pos) / PIXEL_ARCMIN - 0.5
        cols = (px + pos) / PIXEL_ARCMIN - 0.5
        grid = np.meshgrid(rows, cols, indexing="ij")
        for whole, key in ((whole_g1, "gamma1"), (whole_g2, "gamma2")):
            want = scipy.ndimage.map_coordinates(whole, grid, order=3, mode="reflect")
            # the same spline of the same whole-map γ: equal up to round-off
            np.testing.assert_allclose(field[key], want, rtol=0, atol=1e-12)
        # the shear of the cut alone misses the mass around it: off by several 1e-3
        # (the shape-noise-free signal of the field's outskirts) near the cut's edges
        own_g1, _ = wlcnn.shear_from_kappa(field["kappa"], pad=True)
        assert np.max(np.abs(own_g1 - field["gamma1"])) > 3e-3


def test_resampled_kappa_keeps_the_mean_within_the_window(fields, kappa_map):
    kappa = kappa_map.astype(np.float32).astype(np.float64)
    edges = np.arange(NPIX_MAP + 1) * PIXEL_ARCMIN

    def overlap(centre):  # each map pixel's share of the window (pixels are top hats)
        lo, hi = centre - CFG.field_arcmin / 2, centre + CFG.field_arcmin / 2
        width = np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo)
        return np.clip(width, 0, None) / CFG.field_arcmin

    for field in fields:
        py, px = field["meta"]["peak_yx_arcmin"]
        want = overlap(py) @ kappa @ overlap(px)
        # 1 %: point samples of the spline against top-hat pixel means differ through the
        # curvature of κ within a map pixel (0.15 % for the third halo, the largest)
        assert field["kappa"].mean() == pytest.approx(want, rel=0.01)


@settings(max_examples=15, deadline=None, derandomize=True)  # the same examples every run
@given(cy=st.floats(20.0, 60.0), cx=st.floats(20.0, 60.0))
def test_cut_geometry_is_exact_for_a_linear_field(cy, cx):
    """A cubic spline reproduces a plane exactly, so this tests the ½-pixel bookkeeping."""
    n = 200  # 80′ map; centres ≥ 10 pixels inside the border
    c = (np.arange(n) + 0.5) * PIXEL_ARCMIN             # map pixel centres, arcmin
    plane = lambda y, x: 0.1 + 0.002 * x - 0.003 * y    # noqa: E731
    kappa = plane(c[:, None], c[None, :])
    centre = (cy / PIXEL_ARCMIN - 0.5, cx / PIXEL_ARCMIN - 0.5)
    out = ingest.cut_field(kappa, kappa, kappa, centre, PIXEL_ARCMIN)
    q = (np.arange(CFG.npix) + 0.5) * CFG.pixel_arcsec / 60 - CFG.field_arcmin / 2
    want = plane(cy + q[:, None], cx + q[None, :])
    # 1e-9: round-off of the spline prefilter on a 200² map, κ ~ 0.1-0.3
    np.testing.assert_allclose(out["kappa"], want, rtol=0, atol=1e-9)


def test_cubic_resampling_adds_no_power_beyond_the_map_resolution(kappa_map):
    g1, g2 = wlcnn.shear_from_kappa(kappa_map)
    centre = (round(_index(HALOS[0][2])), round(_index(HALOS[0][1])))
    taper = np.hanning(CFG.npix)
    freq = np.abs(np.fft.fftfreq(CFG.npix, d=CFG.pixel_arcsec / 60))    # cycles / arcmin
    beyond = np.maximum(freq[:, None], freq[None, :]) > 0.5 / PIXEL_ARCMIN  # beyond the map's band

    def fraction(order):
        cut = ingest.cut_field(kappa_map, g1, g2, centre, PIXEL_ARCMIN, spline_order=order)
        f = cut["kappa"]
        power = np.abs(np.fft.fft2((f - f.mean()) * taper[:, None] * taper[None, :])) ** 2
        return power[beyond].sum() / power.sum()

    cubic, nearest = fraction(3), fraction(0)
    assert cubic < 1e-3                  # it is 6e-4, mostly the taper's leakage
    assert nearest > 10 * cubic          # steps at the map pixels: 3 %


def test_cut_field_rejects_a_window_leaving_the_map_and_mismatched_maps(kappa_map):
    z = np.zeros_like(kappa_map)
    half_pix = CFG.field_arcmin / 2 / PIXEL_ARCMIN       # 40 map pixels
    # the centre exactly half a field from the lower-left corner is allowed ...
    ingest.cut_field(kappa_map, z, z, (half_pix - 0.5, half_pix - 0.5), PIXEL_ARCMIN)
    # ... a hair closer is not
    with pytest.raises(ValueError, match="leaves the map"):
        ingest.cut_field(kappa_map, z, z, (half_pix - 0.6, 90), PIXEL_ARCMIN)
    with pytest.raises(ValueError, match="leaves the map"):
        ingest.cut_field(kappa_map, z, z, (90, NPIX_MAP - half_pix - 0.4), PIXEL_ARCMIN)
    with pytest.raises(ValueError, match="must share one grid"):
        ingest.cut_field(kappa_map, z[:-1], z, (90, 90), PIXEL_ARCMIN)
    with pytest.raises(ValueError, match="two finite map pixel indices"):
        ingest.cut_field(kappa_map, z, z, (90, np.nan), PIXEL_ARCMIN)


# -- the whole path ---------------------------------------------------------
def test_ingestion_is_deterministic_and_ordered_by_file_then_peak(tmp_path, map_file, fields,
                                                                  kappa_map):
    second = _write(tmp_path / "second.fits", _kappa_map(HALOS[1:2], seed=2).astype(np.float32),
                    ANGLE=SIDE_DEG)
    run = list(ingest.iter_ingested_fields([map_file, second], max_clusters=2,
                                           threshold_kappa=0.05))
    assert [(f["meta"]["source_file"], f["meta"]["rank"]) for f in run] == [
        (str(map_file), 0), (str(map_file), 1), (str(second), 0)]
    for a, b in zip(run[:2], fields[:2]):
        for key in ("kappa", "gamma1", "gamma2"):
            np.testing.assert_array_equal(a[key], b[key])
        assert a["meta"]["peak_yx_pix"] == b["meta"]["peak_yx_pix"]
    again = list(ingest.iter_ingested_fields([map_file]))
    for a, b in zip(again, fields):
        np.testing.assert_array_equal(a["kappa"], b["kappa"])
        assert a["meta"] == b["meta"]
    meta = fields[0]["meta"]
    assert meta["map_npix"] == NPIX_MAP and meta["map_pixel_arcmin"] == pytest.approx(PIXEL_ARCMIN)
    iy, ix = meta["peak_yx_pix"]
    assert meta["peak_kappa"] == float(np.float32(kappa_map[iy, ix]))
    assert meta["peak_kappa_smoothed"] > meta["detection"]["threshold_kappa"]
    assert meta["peak_significance"] > 4.0
    json.dumps(meta)                       # ready for a dataset manifest


def test_a_map_without_clusters_yields_no_field(tmp_path):
    flat = _write(tmp_path / "flat.fits", GOOD, ANGLE=SIDE_DEG)
    assert list(ingest.iter_ingested_fields(flat)) == []


def test_ingest_command_writes_a_dataset_of_the_maps_clusters(tmp_path, map_file, fields):
    plan = ingest.ingest_plan([map_file])
    assert len(plan) >= 2
    assert plan == [f["meta"] for f in fields]  # the plan is the fields' meta, uncut
    out = tmp_path / "ds"
    rc = ingest.main([str(map_file), "--out", str(out), "--n-val", "1", "--n-test", "0",
                      "--seed", "3"])
    assert rc == 0
    ds = wlcnn.ClusterDataset(out, config=wlcnn.PAPER)
    assert ds.manifest["generator"] == "ingest"
    assert ds.count("train") == len(plan) - 1 and ds.count("val") == 1
    (first,) = list(ds.clusters("val"))
    # the last cluster of the plan is the validation one; its cut κ peaks at the centre
    assert first["meta"]["peak_yx_pix"] == list(plan[-1]["peak_yx_pix"])
    centre = wlcnn.PAPER.npix // 2
    iy, ix = np.unravel_index(np.argmax(first["kappa"]), first["kappa"].shape)
    # within one 0.4′ map pixel (6.25 grid pixels)
    assert abs(iy - centre) < 8 and abs(ix - centre) < 8


def test_ingest_rejects_too_few_clusters(tmp_path, map_file):
    with pytest.raises(ValueError, match="too few"):
        ingest.ingest_dataset([map_file], tmp_path, n_val=100, n_test=0, progress=False)
    args = [str(map_file), "--out", str(tmp_path), "--n-val", "100", "--n-test", "0"]
    assert ingest.main(args) == 2
