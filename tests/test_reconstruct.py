"""§4.2: real shear catalogs in sky coordinates in, FITS mass maps out (``skies.reconstruct``
and its command line, examples/reconstruct_catalog.py)."""
import dataclasses
import functools
import sys

import keras
import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

import wlcnn
import reconstruct_catalog
import skies


#: The synthetic cluster field of these tests: a strong NFW clump at the
#: training redshifts (z_l = 0.5, z_s = 1.5), ~2,000 sources in 10′ (about the
#: training's 25 arcmin⁻²), so that KS93 alone finds the clump.
CENTER = (150.0, 2.2)            # RA, Dec of the field centre, degrees
CLUMP_OFFSET_ARCSEC = (-120.0, 90.0)  # (x West, y North): 2′ East, 1.5′ North of the centre
M200, C200 = 2e15, 4.0           # M☉, concentration: a strong clump
FIELD_ARCMIN = 10.0
N_SOURCES = 2000
SIGMA_E = 0.24                   # shape noise per component (§2.3.1)
SEED = 7
TEST_STRIDE = 36                 # 16 subfields a tile: the tiny untrained model needs no more


def reconstruct(catalog, models, out_path, **options):
    """:func:`skies.reconstruct` with its :class:`skies.ReconstructOptions` given by name."""
    return skies.reconstruct(catalog, models, out_path, skies.ReconstructOptions(**options))


def nfw_kappa_gamma(x, y, x0, y0, m200, c200, z_l, z_s):
    """Analytic κ, γ1, γ2 of an NFW halo at (x0, y0) arcsec, at positions (x, y) arcsec (x West)."""
    cosmo = wlcnn.cosmology()
    mpc_per_arcsec = cosmo.angular_diameter_distance(z_l).to_value(u.Mpc) * np.radians(1 / 3600)
    sc = wlcnn.sigma_crit(z_l, z_s, cosmo).value
    dx, dy = x - x0, y - y0
    r = np.maximum(np.hypot(dx, dy), 0.1) * mpc_per_arcsec
    kappa = wlcnn.nfw_sigma(r, m200, c200, z_l, cosmo) / sc
    delta_sigma = (wlcnn.nfw_mean_sigma(r, m200, c200, z_l, cosmo)
                   - wlcnn.nfw_sigma(r, m200, c200, z_l, cosmo))
    gamma_t = delta_sigma / sc
    phi = np.arctan2(dy, dx)
    # γ = −γ_t e^{2iφ} (README)
    return kappa, -gamma_t * np.cos(2 * phi), -gamma_t * np.sin(2 * phi)


def sky_catalog(n=N_SOURCES, seed=SEED, sigma_e=SIGMA_E, field_arcmin=FIELD_ARCMIN, center=CENTER):
    """Sources uniform in the field, lensed by one NFW clump (eq. 7), in sky coordinates.

    Returns the Table (ra, dec, e1, e2, weight; euclidean frame) and the clump's (RA, Dec).
    """
    rng = np.random.default_rng(seed)
    half = field_arcmin * 30.0
    x, y = rng.uniform(-half, half, n), rng.uniform(-half, half, n)
    kappa, g1, g2 = nfw_kappa_gamma(x, y, *CLUMP_OFFSET_ARCSEC, M200, C200,
                                    wlcnn.PAPER.z_lens, wlcnn.PAPER.z_source)
    g = wlcnn.reduced_shear(g1, g2, kappa)
    eps = wlcnn.lens_ellipticity(wlcnn.draw_intrinsic_ellipticity(n, sigma_e, rng), g)
    wcs = skies.tangent_plane_wcs(center)
    ra, dec = wcs.pixel_to_world_values(x, y)
    # plane frame -> local (West, North)
    eps = eps * np.exp(-2j * skies.local_north_angle(ra, dec, wcs))
    clump = wcs.pixel_to_world_values(*CLUMP_OFFSET_ARCSEC)
    # mixed case: names match case-insensitively
    table = Table({"RA": ra, "Dec": dec, "E1": eps.real, "E2": eps.imag,
                   "Weight": np.full(n, 1.0 / sigma_e**2)})
    return table, (float(clump[0]), float(clump[1]))


def tiny_model(seed, config=wlcnn.PAPER, variant="Fiducial"):
    """An untrained Table 1 model with 5×5 filters: the paper's grids, fast to predict."""
    keras.utils.set_random_seed(seed)
    return wlcnn.build_model(dataclasses.replace(config, filter_size=5), variant)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two tiny untrained runs saved as .keras files (a directory load_runs reads)."""
    path = tmp_path_factory.mktemp("runs")
    for i in range(2):
        wlcnn.save_model(tiny_model(i), path / f"run_{i:02d}.keras")
    return path


@pytest.fixture(scope="module")
def models(run_dir):
    return wlcnn.load_runs(run_dir)


@pytest.fixture(scope="module")
def catalog():
    return sky_catalog()


def valid_table(n=50, seed=0):
    """A small clean catalog for the bad-catalog tests (only reading is exercised)."""
    rng = np.random.default_rng(seed)
    return Table({"ra": CENTER[0] + rng.uniform(-0.05, 0.05, n),
                  "dec": CENTER[1] + rng.uniform(-0.05, 0.05, n),
                  "e1": rng.normal(0, 0.2, n), "e2": rng.normal(0, 0.2, n),
                  "weight": np.full(n, 16.0)})


# ---------------------------------------------------------------------------
# Tangent plane: x towards West, y towards North
# ---------------------------------------------------------------------------
def test_source_east_of_centre_gets_smaller_x_and_north_larger_y():
    wcs = skies.tangent_plane_wcs(CENTER)
    one_arcmin_ra = 1 / 60 / np.cos(np.radians(CENTER[1]))  # 1′ on the sky along RA
    x_east, y_east = wcs.world_to_pixel_values(CENTER[0] + one_arcmin_ra, CENTER[1])
    x_north, y_north = wcs.world_to_pixel_values(CENTER[0], CENTER[1] + 1 / 60)
    # 1′ = 60″; TAN departs from the arc by θ²/3 relative, 3e-8 at 1′: 1e-4″ is ample.
    assert x_east == pytest.approx(-60.0, abs=1e-4)
    assert y_north == pytest.approx(60.0, abs=1e-4)
    # A parallel curves towards the pole: y = θ² tan δ / 2 = 3e-4″ at 1′; a meridian is straight.
    assert abs(y_east) < 1e-3 and abs(x_north) < 1e-9


def test_map_wcs_puts_west_at_larger_column_and_centre_on_a_pixel_corner():
    geometry = skies.field_geometry(FIELD_ARCMIN)
    wcs = skies.map_wcs(CENTER, geometry)
    # RA decreases with the column: North up, East left
    assert wcs.wcs.cdelt[0] < 0 < wcs.wcs.cdelt[1]
    px, py = wcs.world_to_pixel_values(*CENTER)
    half = geometry.npix / 2 - 0.5  # corner between pixels npix/2 − 1 and npix/2
    assert (px, py) == pytest.approx((half, half), abs=1e-9)  # exact up to round-off


def test_local_north_rotation_is_minus_ra_offset_times_sin_dec():
    """Meridians converge towards the pole: a source Δα East sees North tilted by −Δα sin δ."""
    center = (30.0, 60.0)
    wcs = skies.tangent_plane_wcs(center)
    d_ra = 0.5  # degrees of RA
    ra = np.array([center[0] + d_ra, center[0] - d_ra, center[0]])
    psi = skies.local_north_angle(ra, np.full(3, center[1]), wcs)
    want = np.radians(d_ra) * np.sin(np.radians(center[1]))
    # The small-angle form is exact to O(Δα³): 1e-3 relative at 0.5°.
    np.testing.assert_allclose(psi, [-want, want, 0.0], rtol=1e-3, atol=1e-12)


def test_default_centre_is_the_middle_of_the_extent_even_across_ra_zero():
    rng = np.random.default_rng(SEED)
    ra = rng.uniform(-0.1, 0.1, 500) % 360.0  # a field straddling RA = 0
    dec = rng.uniform(-30.1, -29.9, 500)
    ra_c, dec_c = skies.catalog_center(ra, dec)
    # The bounding box's middle: within 0.001° (the extreme sources of 500 fall that close
    # to the ±0.1° edges), and RA near 0/360 — not the 180° of a naive mean.
    assert min(ra_c, 360.0 - ra_c) < 1e-3 and dec_c == pytest.approx(-30.0, abs=1e-3)


def test_celestial_frame_negates_e2():
    table = valid_table()
    euc = skies.read_catalog(table)
    cel = skies.read_catalog(table, coordinate_system="celestial")
    np.testing.assert_array_equal(cel.e1, euc.e1)
    np.testing.assert_array_equal(cel.e2, -euc.e2)


def test_weights_become_sigma_and_sigma_column_is_used_as_is():
    table = valid_table()
    table["w"] = table["weight"] * 4.0
    table["sig"] = np.full(len(table), 0.3)
    by_weight = skies.read_catalog(table, weight_col="w")
    np.testing.assert_allclose(by_weight.sigma, 1 / np.sqrt(64.0))
    by_sigma = skies.read_catalog(table, sigma_col="sig")
    np.testing.assert_array_equal(by_sigma.sigma, 0.3)


# ---------------------------------------------------------------------------
# Geometry: one tile for a §4.2-sized field, overlapping tiles beyond
# ---------------------------------------------------------------------------
def test_small_field_is_one_tile_in_the_middle_of_the_input():
    g = skies.field_geometry(9.0)  # the HST field of §4.2
    assert g.n_tiles == 1
    assert g.npix == 48  # 9′ = 540″ = 46.9 pixels of 11.52″, rounded up to an even number
    # The field centre is the 32′ input's centre: the input grid starts 16′ East and South of it.
    assert g.tile_origin_arcsec(g.tile_starts[0]) == pytest.approx(-16 * 60.0)


@pytest.mark.parametrize("size", [26.0, 32.0, 40.0, 75.0])
def test_tiles_cover_every_pixel_and_abut_on_one_lattice_of_subfields(size):
    g = skies.field_geometry(size)
    line = np.zeros(g.npix, dtype=int)
    cover = wlcnn.mosaic_coverage(g.config, g.stride)[g.config.mosaic_npix // 2] > 0
    for a in g.tile_starts:
        idx = a + np.flatnonzero(cover)
        line[idx[(idx >= 0) & (idx < g.npix)]] += 1
    assert line.min() >= 1
    # Tiles start N offsets × the offset step apart: their subfields continue one lattice,
    # none predicted twice (10 offsets of 4 output pixels at stride 12).
    assert np.all(np.diff(g.tile_starts) == 40)


@pytest.mark.parametrize("size", [10.0, 40.0])
def test_tiled_mosaic_lands_on_the_right_sky_pixels(catalog, size):
    """A 'network' that returns each output pixel's own input Δε must give, through
    tiles, offsets and averaging, exactly the field grid's Δε on every pixel: the
    tiles' pixels are the output grid's (no shift, no resampling)."""
    cfg = wlcnn.PAPER
    g = skies.field_geometry(size, cfg, stride=TEST_STRIDE)
    sky = skies.read_catalog(catalog[0])
    x, y, e1, e2 = skies.project_catalog(sky, CENTER)
    scale = size / FIELD_ARCMIN  # spread the sources over the field
    src = (x * scale, y * scale, e1, e2, sky.sigma)

    def footprint_delta_eps(batch):
        lo = (cfg.first_kernel - 1) // 2
        block = batch[:, lo:lo + cfg.pool * cfg.output_npix, lo:lo + cfg.pool * cfg.output_npix, 2]
        return wlcnn.block_mean(block, cfg.pool)[..., None]

    res = skies.cnn_field_map(*src, [footprint_delta_eps], g)
    want = wlcnn.block_mean(skies.grid_field(*src, g)[2], cfg.pool)
    assert res.count.min() > 0
    # Subfields are float32: agreement to float32 round-off.
    np.testing.assert_allclose(res.mean, want, rtol=1e-6)


# ---------------------------------------------------------------------------
# Bad catalogs and models: clear ValueErrors
# ---------------------------------------------------------------------------
def test_missing_columns_are_named_with_the_available_ones():
    table = valid_table()
    del table["e2"], table["weight"]
    with pytest.raises(ValueError, match=r"missing column.*'e2'.*'weight'.*\['ra', 'dec', 'e1'\]"):
        skies.read_catalog(table)


def test_columns_match_case_insensitively(catalog):
    sky = skies.read_catalog(catalog[0])  # columns RA, Dec, E1, E2, Weight
    assert len(sky.ra) == N_SOURCES


def test_nan_rows_are_dropped_and_counted():
    table = valid_table()
    table["e1"][[3, 7]] = np.nan
    table["dec"][11] = np.nan
    with pytest.warns(skies.CatalogWarning, match="dropped 3 of 50 rows.*3 with NaN"):
        sky = skies.read_catalog(table)
    assert sky.counts["dropped_nan"] == 3 and len(sky.ra) == 47


def test_empty_entries_of_a_csv_count_as_nan(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text("ra,dec,e1,e2,weight\n150.0,2.2,0.1,,16\n150.01,2.21,0.1,0.2,16\n")
    with pytest.warns(skies.CatalogWarning):
        sky = skies.read_catalog(path)
    assert sky.counts["dropped_nan"] == 1 and len(sky.ra) == 1


def test_all_nan_rows_is_an_error():
    table = valid_table()
    table["e1"] = np.nan
    with pytest.raises(ValueError, match="no usable row among 50 .*50 with NaN"):
        skies.read_catalog(table)


def test_rows_with_abs_e_at_least_one_are_dropped_and_counted():
    table = valid_table()
    table["e1"][0], table["e2"][0] = 0.8, 0.6   # |e| = 1 exactly: dropped
    table["e1"][1] = 1.7
    with pytest.warns(skies.CatalogWarning, match="2 with \\|e\\| ≥ 1"):
        sky = skies.read_catalog(table)
    assert sky.counts["dropped_ellipticity"] == 2 and len(sky.ra) == 48


def test_all_rows_with_abs_e_at_least_one_is_an_error():
    table = valid_table()
    table["e1"] = 1.5
    with pytest.raises(ValueError, match="no usable row.*50 with \\|e\\| ≥ 1"):
        skies.read_catalog(table)


def test_zero_weight_rows_are_dropped_as_flagged():
    table = valid_table()
    table["weight"][:5] = 0.0
    with pytest.warns(skies.CatalogWarning, match="5 with weight ≤ 0"):
        sky = skies.read_catalog(table)
    assert sky.counts["dropped_weight"] == 5


def test_every_source_outside_the_field_is_an_error(tmp_path, run_dir):
    table = valid_table()
    with pytest.raises(ValueError, match="none of the 50 sources lies inside the 1.15′ field"):
        reconstruct(table, run_dir, tmp_path / "k.fits",
                    center=(CENTER[0] + 1.0, CENTER[1]),
                    size_arcmin=1.0, png=False)
    assert not (tmp_path / "k.fits").exists()


def test_empty_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        skies.read_catalog(empty)


def test_header_only_csv_is_an_error(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("ra,dec,e1,e2,weight\n")
    with pytest.raises(ValueError, match="no rows"):
        skies.read_catalog(path)


def test_unknown_coordinate_system_is_an_error():
    with pytest.raises(ValueError,
                       match="unknown coordinate_system 'galactic'.*euclidean.*celestial"):
        skies.read_catalog(valid_table(), coordinate_system="galactic")


def test_weight_and_sigma_columns_together_are_an_error(tmp_path, run_dir):
    table = valid_table()
    table["sig"] = 0.3
    with pytest.raises(ValueError, match="a weight column or a sigma column, not both"):
        skies.read_catalog(table, weight_col="w", sigma_col="sig")
    path = tmp_path / "cat.fits"
    table.write(path)
    with pytest.raises(SystemExit) as exc:  # argparse: mutually exclusive options
        reconstruct_catalog.main([str(path), "--models", str(run_dir),
                                  "--out", str(tmp_path / "k.fits"),
                                  "--weight-col", "weight", "--sigma-col", "sig"])
    assert exc.value.code == 2


def test_center_option_takes_degrees_or_sexagesimal():
    parse = reconstruct_catalog._parse_center
    assert parse("15.72,-49.25") == (15.72, -49.25)
    ra, dec = parse("01:02:53,-49:15:19")  # El Gordo
    assert (ra, dec) == pytest.approx((15.720833, -49.255278), abs=1e-6)  # 1e-6° = 4 mas
    with pytest.raises(Exception, match="RA,DEC"):
        parse("15.72")


def test_non_numeric_positions_are_an_error():
    table = valid_table(3)
    table["ra"] = ["01:02:53", "01:02:54", "01:02:55"]
    with pytest.raises(ValueError, match="column 'ra' is not numeric.*degrees"):
        skies.read_catalog(table)


def test_a_column_with_no_number_names_the_file_the_column_and_its_first_entry(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text("ra,dec,e1,e2,weight\n"
                    "01:02:53,2.2,0.1,0.2,16\n01:02:54,2.21,0.1,0.2,16\n")
    with pytest.raises(ValueError, match=r"cat.csv: column 'ra' is not numeric: its first "
                                         r"entry, row 1, is '01:02:53'"):
        skies.read_catalog(path)


def test_a_text_entry_drops_its_row_as_a_nan_does_and_names_it(tmp_path):
    """One policy for unusable rows: a text entry costs its row, like NaN, with a note that
    names the first such row and column."""
    path = tmp_path / "cat.csv"
    rows = [f"{150 + 0.001 * i},2.2,0.1,0.2,16" for i in range(5)]
    rows[2] = "150.002,2.2,bad,0.2,16"    # text in e1: row 3 of the data
    rows[4] = "150.004,2.2,0.1,0.2,"      # empty weight: NaN
    path.write_text("ra,dec,e1,e2,weight\n" + "\n".join(rows) + "\n")
    with pytest.warns(skies.CatalogWarning, match=r"dropped 2 of 5 rows \(1 with an entry that "
                                                 r"is not a number \(first: row 3, column 'e1': "
                                                 r"'bad'\), 1 with NaN"):
        sky = skies.read_catalog(path)
    assert (sky.counts["dropped_text"], sky.counts["dropped_nan"], len(sky.ra)) == (1, 1, 3)
    assert sky.ra == pytest.approx([150.0, 150.001, 150.003], abs=1e-12)  # the other rows kept


def test_a_missing_model_path_says_not_found(tmp_path, capsys):
    with pytest.raises(ValueError, match="nomodel: model not found"):
        wlcnn.load_runs(tmp_path / "nomodel")
    cat = tmp_path / "cat.csv"
    cat.write_text("ra,dec,e1,e2,weight\n150.0,2.2,0.1,0.2,16\n")
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error, before any work
        reconstruct_catalog.parse_args([str(cat), "--models", str(tmp_path / "nomodel"),
                                        "--out", str(tmp_path / "k.fits")])
    assert exit_.value.code == 2
    assert "--models: " in capsys.readouterr().err and not (tmp_path / "k.fits").exists()


def test_the_help_states_the_policy_for_unusable_rows():
    text = " ".join(reconstruct_catalog.build_parser().format_help().split())
    assert "Unusable rows (an entry that is NaN, empty or not a number" in text


def test_model_built_for_another_grid_is_an_error(tmp_path, models):
    other = dataclasses.replace(wlcnn.PAPER, field_arcmin=30.0)  # 3.6″ pixels, not 3.84″
    with pytest.raises(ValueError, match="another grid than the data's.*field_arcmin"):
        reconstruct(valid_table(), models, tmp_path / "k.fits",
                    config=other, png=False)
    with pytest.raises(ValueError, match="differ in grid.*field_arcmin"):
        skies.check_models([models[0], tiny_model(5, other)])


def test_models_of_another_channel_count_are_an_error(models):
    with pytest.raises(ValueError, match="differ in input channels \\(3 and 4\\)"):
        skies.check_models([models[0], tiny_model(6, variant="4Channel")])
    # A model that wants a channel the gridding does not make (hand-built description).
    info = dict(wlcnn.model_info(models[0]), channels=5)
    inputs = keras.Input((386, 386, 5))
    odd = keras.Model(inputs, wlcnn.ModelInfo(info, name=wlcnn.INFO_LAYER)(inputs))
    with pytest.raises(ValueError, match="expects 5 input channels; the gridded catalog has 4"):
        skies.check_models(odd)


def test_existing_output_is_not_overwritten_without_asking(tmp_path, models):
    out = tmp_path / "k.fits"
    out.write_text("keep me")
    with pytest.raises(FileExistsError):
        reconstruct(valid_table(), models, out, png=False)
    assert out.read_text() == "keep me"


# ---------------------------------------------------------------------------
# No-data regions: shear-free noise at the catalog's density (noise_fill)
# ---------------------------------------------------------------------------
HOLE = (60.0, 240.0, -180.0, 0.0)  # x0, x1, y0, y1 arcsec: a 3′ × 3′ hole in the 10′ field
FILL_FIELD_ARCMIN = 54 * 11.52 / 60  # field_geometry(10′).side_arcmin: sources fill its cells


def holed_catalog(n=8000, shear=(0.2, -0.1), seed=3):
    """Plane-frame sources uniform over the 10′ field's output grid (10.37′ = 54
    pixels of 11.52″) but for HOLE, with a constant shear (ε = g + noise) and
    per-source σ in 0.2-0.4, as (x, y, e1, e2, sigma)."""
    rng = np.random.default_rng(seed)
    half = FILL_FIELD_ARCMIN * 30.0
    x, y = rng.uniform(-half, half, n), rng.uniform(-half, half, n)
    keep = ~((x > HOLE[0]) & (x < HOLE[1]) & (y > HOLE[2]) & (y < HOLE[3]))
    x, y = x[keep], y[keep]
    m = len(x)
    e1, e2 = shear[0] + rng.normal(0, SIGMA_E, m), shear[1] + rng.normal(0, SIGMA_E, m)
    return x, y, e1, e2, rng.uniform(0.2, 0.4, m)


def test_noise_fill_covers_every_tile_beyond_the_field_and_the_holes_only():
    geo = skies.field_geometry(FIELD_ARCMIN, stride=TEST_STRIDE)
    src = holed_catalog()
    fx, fy = skies.noise_fill(*src, geo, np.random.default_rng(0))[:2]
    half = geo.npix / 2 * geo.pixel_arcsec
    in_field = (np.abs(fx) <= half) & (np.abs(fy) <= half)
    # Inside the field, fill sources lie only in the fill cells that cover the hole:
    # cells are 2 output pixels (23″) here, so the filled area reaches at most one
    # cell beyond the hole's edges, and not at all into cells that hold data.
    cell = 2 * geo.pixel_arcsec
    assert np.all((fx[in_field] > HOLE[0] - cell) & (fx[in_field] < HOLE[1] + cell)
                  & (fy[in_field] > HOLE[2] - cell) & (fy[in_field] < HOLE[3] + cell))
    # The catalog's density (8000 sources over 107.5 arcmin², less the hole: 70 arcmin⁻²)
    # in the hole's inner 2′ × 2′ and over the outside, to 5 Poisson σ (sqrt(280) and
    # sqrt(70,000) sources: 30 % and 1.9 % of the counts).
    density = len(src[0]) / (FILL_FIELD_ARCMIN**2 - 9.0) / 3600.0  # per arcsec²
    inner = (fx > HOLE[0] + 30) & (fx < HOLE[1] - 30) & (fy > HOLE[2] + 30) & (fy < HOLE[3] - 30)
    assert inner.sum() == pytest.approx(density * 120.0**2, rel=5 / np.sqrt(density * 120.0**2))
    cfg = geo.config
    lo = geo.tile_origin_arcsec(geo.tile_starts[0])
    hi = lo + cfg.npix * cfg.pixel_arcsec  # the 32′ input of the one tile
    out_input = ~in_field & (fx > lo) & (fx < hi) & (fy > lo) & (fy < hi)
    want = density * ((hi - lo) ** 2 - (2 * half) ** 2)
    assert out_input.sum() == pytest.approx(want, rel=5 / np.sqrt(want))
    # ... and on the input's corner pixels too (the whole input is covered).
    grid = skies.grid_tile(fx, fy, *np.zeros((2, len(fx))),
                           np.full(len(fx), 0.3), geo,
                           geo.tile_starts[0], geo.tile_starts[0])
    assert grid[3][[0, 0, -1, -1], [0, -1, 0, -1]].min() > 0


def test_noise_fill_keeps_the_catalogs_noise_and_removes_its_shear():
    geo = skies.field_geometry(FIELD_ARCMIN, stride=TEST_STRIDE)
    x, y, e1, e2, sig = holed_catalog()
    fx, fy, f1, f2, fs = skies.noise_fill(x, y, e1, e2, sig, geo,
                                          np.random.default_rng(1))
    # The catalog's mean ε is the shear (0.2, −0.1); the fill's is zero, to 5 standard
    # errors (|ε| rms ~0.4 over ~80,000 fill sources: 0.007).  A fill that kept the
    # phase, or turned ε by ψ instead of 2ψ (⟨e^{iψ}⟩ = 2i/π), would be off by ≥ 0.1.
    se = np.sqrt(np.mean(f1**2 + f2**2) / 2 / len(f1))
    assert abs(np.mean(f1)) < 5 * se and abs(np.mean(f2)) < 5 * se
    # Each fill source is a catalog source turned: its |ε| and σ are that source's.
    # (to 1e-12: the turn e^{2iψ} changes |ε| by round-off only)
    e_abs, f_abs = np.sort(np.hypot(e1, e2)), np.hypot(f1, f2)
    i = np.clip(np.searchsorted(e_abs, f_abs), 1, len(e_abs) - 1)
    assert np.all(np.minimum(abs(f_abs - e_abs[i]), abs(f_abs - e_abs[i - 1])) < 1e-12)
    assert np.isin(fs, sig).all()
    # The turn is uniform: the fill's position angles are flat (to 5 Poisson σ in 8
    # bins), while the catalog's, sheared by |g| = 0.22, are not.
    counts = np.histogram(np.angle(f1 + 1j * f2), bins=8, range=(-np.pi, np.pi))[0]
    assert np.all(np.abs(counts - len(f1) / 8) < 5 * np.sqrt(len(f1) / 8))


def test_noise_fill_is_reproducible_and_needs_a_source_in_the_field():
    geo = skies.field_geometry(FIELD_ARCMIN, stride=TEST_STRIDE)
    src = holed_catalog(n=500)
    a = skies.noise_fill(*src, geo, np.random.default_rng(5))
    b = skies.noise_fill(*src, geo, np.random.default_rng(5))
    c = skies.noise_fill(*src, geo, np.random.default_rng(6))
    for u_, v in zip(a, b):
        np.testing.assert_array_equal(u_, v)
    assert len(a[0]) != len(c[0]) or not np.array_equal(a[0], c[0])
    far = (src[0] + 3600.0,) + src[1:]  # every source a degree West of the field
    with pytest.raises(ValueError, match="no source inside the field"):
        skies.noise_fill(*far, geo, np.random.default_rng(0))
    with pytest.raises(TypeError):
        skies.noise_fill(*src, geo, 5)  # a seed is not a Generator


def test_reconstruct_fills_no_data_with_noise_by_default_and_says_so(tmp_path, models, catalog):
    kw = dict(stride=TEST_STRIDE, png=False)
    run = functools.partial(reconstruct, catalog[0], models)
    a = run(tmp_path / "a.fits", n_fills=2, seed=4, **kw)
    b = run(tmp_path / "b.fits", n_fills=2, seed=4, **kw)
    c = run(tmp_path / "c.fits", n_fills=2, seed=5, **kw)
    e = run(tmp_path / "e.fits", outside="empty", **kw)
    np.testing.assert_array_equal(a.kappa_cnn, b.kappa_cnn)  # same seed, same map
    assert not np.array_equal(a.kappa_cnn, c.kappa_cnn)
    np.testing.assert_array_equal(a.kappa_ks93, e.kappa_ks93)  # KS93 never sees the fill
    h = fits.getheader(tmp_path / "a.fits")
    assert (h["OUTSIDE"], h["NFILLS"], h["FILLSEED"]) == ("noise", 2, 4)
    assert 0 < h["FILLERR"] < np.nanstd(a.kappa_cnn)
    assert fits.getheader(tmp_path / "e.fits")["OUTSIDE"] == "empty"
    assert "NFILLS" not in fits.getheader(tmp_path / "e.fits")
    # The empty mode is the network on the catalog alone.
    sky = skies.read_catalog(catalog[0])
    x, y, e1, e2 = skies.project_catalog(sky, e.center)
    sigma = sky.sigma / np.sqrt(e.weights["factor"])  # the weights as reconstruct rescaled them
    want = skies.cnn_field_map(x, y, e1, e2, sigma, models, e.geometry)
    np.testing.assert_array_equal(e.kappa_cnn, want.mean)
    # Each run's map is the mean over the same fills: the runs' spread is theirs alone.
    assert a.runs.shape == (2,) + a.kappa_cnn.shape
    np.testing.assert_allclose(a.kappa_cnn_std, a.runs.std(axis=0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("kw, match", [(dict(outside="zeros"), "unknown outside mode 'zeros'"),
                                       (dict(n_fills=0), "n_fills must be a whole number >= 1"),
                                       (dict(n_fills=2.5), "n_fills must be a whole number >= 1")])
def test_bad_fill_options_are_errors(tmp_path, models, kw, match):
    with pytest.raises(ValueError, match=match):
        reconstruct(valid_table(), models, tmp_path / "k.fits", png=False, **kw)


# ---------------------------------------------------------------------------
# End to end: FITS catalog in, FITS maps out, through the command line
# ---------------------------------------------------------------------------
def test_cli_writes_four_maps_whose_wcs_puts_the_clump_at_the_ks93_peak(tmp_path, run_dir,
                                                                         catalog, capsys):
    table, clump = catalog[0].copy(), catalog[1]
    table["E1"][:4] = np.nan  # 4 NaN rows: dropped and reported
    cat_path = tmp_path / "catalog.fits"
    table.write(cat_path)
    out = tmp_path / "kappa.fits"
    ks93_fwhm = 1.0  # arcmin: at ~20 sources/arcmin² the unsmoothed KS93 peak is noise-dominated
    rc = reconstruct_catalog.main([str(cat_path), "--models", str(run_dir), "--out", str(out),
                     "--stride", str(TEST_STRIDE), "--ks93-fwhm", str(ks93_fwhm),
                                      "--fills", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "dropped 4 of 2000 rows (4 with NaN" in captured.err
    assert (f"{N_SOURCES - 4} sources in the field of {N_SOURCES} rows (dropped: 4 NaN"
            in captured.out)
    with fits.open(out) as hdul:
        assert [h.name for h in hdul[1:]] == list(skies.MAP_EXTENSIONS)
        assert hdul[0].header["NDRNAN"] == 4 and hdul[0].header["NRUNS"] == 2
        shapes = {h.data.shape for h in hdul[1:]}
        assert len(shapes) == 1
        n = shapes.pop()[0]
        assert n * 11.52 / 60 >= FIELD_ARCMIN - 0.2  # the catalog's extent, rounded up to pixels
        for h in hdul[1:]:
            assert np.all(np.isfinite(h.data)), h.name
        for name in ("KAPPA_CNN", "KAPPA_CNN_STD", "KAPPA_KS93"):
            assert u.Unit(hdul[name].header["BUNIT"], format="fits") == u.dimensionless_unscaled
        assert u.Unit(hdul["DENSITY"].header["BUNIT"], format="fits") == u.arcmin**-2
        assert np.nanmax(hdul["KAPPA_CNN_STD"].data) > 0  # two different runs disagree
        # The mean density away from the edges is the catalog's, 20 arcmin⁻²: 10 % is
        # 3.5 × the Poisson error of the ~1,300 sources of the central 8′ (the
        # median would be lower: a pixel holds ~1 source, a skewed distribution).
        inner = hdul["DENSITY"].data[n // 10:-(n // 10), n // 10:-(n // 10)]
        assert inner.mean() == pytest.approx(N_SOURCES / FIELD_ARCMIN**2, rel=0.1)
        ks = hdul["KAPPA_KS93"].data
        wcs = WCS(hdul["KAPPA_KS93"].header)
        px, py = wcs.world_to_pixel_values(*clump)
        iy, ix = np.unravel_index(np.argmax(ks), ks.shape)
        # Within 1 mosaic pixel (11.5″): the quantisation of a peak to a pixel is up to
        # 0.71 px (half the diagonal); over seeds 0-19 of this catalog the offset was
        # 0.26-0.70 px.  A mirrored axis would put the peak ~10 px away, a shifted one 1+.
        assert np.hypot(ix - px, iy - py) <= 1.0
        assert hdul["KAPPA_KS93"].header["KS93FWHM"] == ks93_fwhm
    assert (tmp_path / "kappa.png").exists() or "matplotlib" in captured.err


def test_euclidean_and_celestial_catalogs_give_the_same_maps(tmp_path, models, catalog):
    table = catalog[0]
    cel = table.copy()
    cel["E2"] = -cel["E2"]
    kw = dict(stride=TEST_STRIDE, n_fills=1, png=False)
    a = reconstruct(table, models, tmp_path / "euclidean.fits", **kw)
    b = reconstruct(cel, models, tmp_path / "celestial.fits",
                    coordinate_system="celestial", **kw)
    # −(−e2) is exact, so the same numbers go through the same arithmetic.
    for name in ("kappa_cnn", "kappa_cnn_std", "kappa_ks93", "density"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.filterwarnings("error::astropy.io.fits.verify.VerifyWarning")  # no card truncated
def test_other_redshifts_are_recorded_not_used_to_rescale_kappa(tmp_path, models, catalog):
    """Shear measures κ of the catalog's own sources; z only changes Σ_c (see redshift_info)."""
    kw = dict(stride=TEST_STRIDE, n_fills=1, png=False)
    a = reconstruct(catalog[0], models, tmp_path / "a.fits", **kw)
    with pytest.warns(UserWarning, match="trained for z_l = 0.5, z_s = 1.5"):
        b = reconstruct(catalog[0], models, tmp_path / "b.fits",
                        z_lens=0.87, z_source=1.2, **kw)
    np.testing.assert_array_equal(a.kappa_cnn, b.kappa_cnn)
    np.testing.assert_array_equal(a.kappa_ks93, b.kappa_ks93)
    h = fits.getheader(tmp_path / "b.fits")
    assert (h["Z_LENS"], h["Z_SOURCE"], h["ZL_TRAIN"], h["ZS_TRAIN"]) == (0.87, 1.2, 0.5, 1.5)
    want = wlcnn.sigma_crit(0.87, 1.2).value
    assert h["SIGCRIT"] == pytest.approx(want, rel=1e-12)  # the same function, the same numbers
    assert h["SCRATIO"] == pytest.approx(wlcnn.sigma_crit(0.5, 1.5).value / want, rel=1e-12)
    assert "not rescaled" in str(h["HISTORY"])


def test_without_matplotlib_the_fits_is_written_and_the_png_skipped(tmp_path, models, catalog,
                                                                    monkeypatch):
    # `from matplotlib.figure import …` fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.warns(UserWarning, match="matplotlib is not installed: no PNG"):
        res = reconstruct(catalog[0], models[:1], tmp_path / "k.fits",
                          stride=TEST_STRIDE, n_fills=1)
    assert res.png_path is None and not (tmp_path / "k.png").exists()
    assert fits.getheader(tmp_path / "k.fits", "KAPPA_CNN")["NRUNS"] == 1


# ---------------------------------------------------------------------------
# Passes: a tile runs once per fill only where a fill adds a source
# ---------------------------------------------------------------------------
def covering_table(side_arcmin, density, hole=None, seed=11):
    """Shear-free sources uniform over a square of ``side_arcmin`` about CENTER, but for
    ``hole`` = (x0, x1, y0, y1) arcsec; weights 1/σ_e², ellipticities N(0, σ_e)."""
    rng = np.random.default_rng(seed)
    n = int(density * side_arcmin**2)
    x, y = rng.uniform(-30 * side_arcmin, 30 * side_arcmin, (2, n))
    if hole is not None:
        keep = ~((x > hole[0]) & (x < hole[1]) & (y > hole[2]) & (y < hole[3]))
        x, y = x[keep], y[keep]
    ra, dec = skies.tangent_plane_wcs(CENTER).pixel_to_world_values(x, y)
    e1, e2 = rng.normal(0.0, SIGMA_E, (2, len(x)))
    return Table({"ra": ra, "dec": dec, "e1": e1, "e2": e2, "weight": np.full(len(x), SIGMA_E**-2)})


def test_one_pass_where_the_catalog_covers_the_input_and_n_fills_with_a_hole(tmp_path, models):
    # 34′ of sources cover the 10′ field's whole 32.4′ input (with the kernel's reach).
    kw = dict(size_arcmin=FIELD_ARCMIN, center=CENTER, stride=TEST_STRIDE, n_fills=3, png=False)
    full = reconstruct(covering_table(34.0, 4.0), models[:1],
                       tmp_path / "full.fits", **kw)
    h = fits.getheader(tmp_path / "full.fits")
    assert (h["NPASSES"], h["NFILLS"], h["FILLERR"]) == (1, 3, 0.0)
    assert (h["NCONTEXT"], h["NUNUSED"]) == (full.counts["context"], full.counts["unused"])
    assert full.counts["context"] > 8 * full.counts["used"]  # the input beyond the field is data
    holed = reconstruct(covering_table(34.0, 4.0, hole=(-200, 100, -100, 200)),
                        models[:1], tmp_path / "hole.fits", **kw)
    h = fits.getheader(tmp_path / "hole.fits")
    assert h["NPASSES"] == 3 and h["FILLERR"] > 0
    assert np.all(np.isfinite(holed.kappa_cnn))


def test_a_32_arcmin_catalog_is_one_input_and_runs_once_per_fill(tmp_path, models):
    """The paper's field is one network input: a 32′ catalog gives one tile, 26.1′ wide
    (what one input predicts), not the four tiles of a 32.3′ field."""
    one = skies.single_tile_arcmin(wlcnn.PAPER, TEST_STRIDE)
    assert one == pytest.approx(136 * 11.52 / 60, rel=1e-12)  # 136 px: 10 offsets' coverage
    assert skies.field_geometry(one, stride=TEST_STRIDE).n_tiles == 1
    res = reconstruct(covering_table(32.0, 4.0), models[:1],
                                          tmp_path / "k.fits", stride=TEST_STRIDE, n_fills=2,
                                          png=False)
    assert res.geometry.n_tiles == 1 and res.geometry.side_arcmin == pytest.approx(one)
    # One tile: one pass per fill at most (4 tiles could take 8).  Whether a fill reaches
    # the input's 0.4′ strip beyond the catalog (the input sits 11.5″ off the field's
    # centre) depends on the fill cells' size; here (1.6′ cells at 4 arcmin⁻²) none does.
    assert 1 <= res.fill["passes"] <= 2 and res.fill["skipped"] == 0
    assert res.counts["unused"] == 0 and res.counts["context"] > 0  # all of it is the input
    h = fits.getheader(tmp_path / "k.fits")
    assert (h["NTILES"], h["NPASSES"]) == (1, res.fill["passes"])
    # An explicit size keeps its meaning: 32′ is 32.26′ of pixels, more than one input
    # predicts, so 4 tiles.
    given = reconstruct(covering_table(32.0, 4.0), models[:1],
                                            tmp_path / "g.fits", size_arcmin=32.0,
                                            stride=TEST_STRIDE, outside="empty", png=False)
    assert given.geometry.n_tiles == 4


@pytest.mark.parametrize("side, tiles", [(9.0, 1), (20.0, 1), (32.0, 1), (32.3, 1), (34.0, 4),
                                         (40.0, 9)])
def test_default_field_is_one_input_up_to_32_arcmin_then_the_catalogs_extent(side, tiles):
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-30 * side, 30 * side, (2, 5000))
    x[:4], y[:4] = [-30 * side, 30 * side, 0, 0], [0, 0, -30 * side, 30 * side]  # the full extent
    size = skies.default_size_arcmin(x, y, stride=TEST_STRIDE)
    one = skies.single_tile_arcmin(stride=TEST_STRIDE)
    # Catalogs within one tile's field keep their extent; up to one input's 32′ (give or
    # take SINGLE_TILE_TOLERANCE: 32.3′ is 9″ beyond the input on each side, within its
    # 19″) they are one tile's field; wider ones keep their extent: abutting tiles.
    assert size == pytest.approx(min(side, one) if side <= 32.3 else side, rel=1e-12)
    assert skies.field_geometry(size, stride=TEST_STRIDE).n_tiles == tiles


def test_ks93_smoothing_follows_the_catalogs_density_unless_given(tmp_path, models):
    # 1.25′ at the training's 25 arcmin⁻², 0.625′ at 100: the same KS93 noise at both.
    assert skies.ks93_fwhm_for_density(25.0) == pytest.approx(1.25, rel=1e-12)
    assert skies.ks93_fwhm_for_density(100.0) == pytest.approx(0.625, rel=1e-12)
    with pytest.raises(ValueError, match="density must be positive"):
        skies.ks93_fwhm_for_density(0.0)
    kw = dict(size_arcmin=FIELD_ARCMIN, center=CENTER, stride=TEST_STRIDE, outside="empty",
              png=False)
    res = reconstruct(covering_table(12.0, 16.0), models[:1],
                      tmp_path / "k.fits", **kw)
    h = fits.getheader(tmp_path / "k.fits")
    # The density is the catalog's, 16 arcmin⁻², to 5 Poisson σ of its ~1,700 sources
    # in the field's interior cells (12 %).
    assert h["DENSITY"] == pytest.approx(16.0, rel=5 / np.sqrt(16.0 * FIELD_ARCMIN**2))
    assert h["KS93FWHM"] == res.ks93_fwhm_arcmin == pytest.approx(
        skies.ks93_fwhm_for_density(h["DENSITY"]), rel=1e-12)
    assert h["KS93RULE"] == "density"
    reconstruct(covering_table(12.0, 16.0), models[:1], tmp_path / "g.fits",
                ks93_fwhm_arcmin=0.8, **kw)
    h = fits.getheader(tmp_path / "g.fits")
    assert (h["KS93FWHM"], h["KS93RULE"]) == (0.8, "given")


# ---------------------------------------------------------------------------
# Weights: their absolute scale is the network's noise level
# ---------------------------------------------------------------------------
def test_weight_scale_is_one_for_inverse_variance_weights():
    rng = np.random.default_rng(2)
    sigma = rng.uniform(0.2, 0.5, 200_000)
    e1, e2 = rng.normal(0.0, sigma, (2, len(sigma)))
    # ⟨w e²/2⟩ of 200,000 χ²₂/2 draws: 1 ± 0.0022; 1 % is 4.5 σ.
    assert skies.weight_scale(e1, e2, sigma) == pytest.approx(1.0, rel=0.01)
    assert skies.weight_scale(e1, e2, sigma / 3) == pytest.approx(9.0, rel=0.01)


@pytest.mark.parametrize("off", [10.0, 0.1])
def test_weights_off_by_ten_are_rescaled_with_a_warning_or_kept_on_request(tmp_path, models, off):
    table = covering_table(12.0, 16.0)
    kw = dict(size_arcmin=FIELD_ARCMIN, center=CENTER, stride=TEST_STRIDE, outside="empty",
              png=False)
    right = reconstruct(table, models[:1], tmp_path / "right.fits", **kw)
    assert abs(right.weights["factor"] - 1) < skies.WEIGHT_TOLERANCE
    wrong = table.copy()
    wrong["weight"] *= off
    with pytest.warns(skies.CatalogWarning, match="weights multiplied by"):
        fixed = reconstruct(wrong, models[:1], tmp_path / "fixed.fits", **kw)
    # The factor is the right catalog's over ``off`` (round-off only), and the maps agree
    # to the float32 round-off of the network's inputs (relative 1e-7; 1e-4 of the map's
    # range is ample, the untrained network's κ being ~1e-7 in all).
    assert fixed.weights["factor"] == pytest.approx(right.weights["factor"] / off, rel=1e-12)
    assert fits.getheader(tmp_path / "fixed.fits")["WFACTOR"] == pytest.approx(1 / off, rel=0.1)
    size = np.max(np.abs(right.kappa_cnn))
    np.testing.assert_allclose(fixed.kappa_cnn, right.kappa_cnn, rtol=0, atol=1e-4 * size)
    kept = reconstruct(wrong, models[:1], tmp_path / "kept.fits",
                       rescale_weights=False, **kw)
    h = fits.getheader(tmp_path / "kept.fits")
    assert h["WFACTOR"] == 1.0 and h["WSCALE"] == pytest.approx(off * right.weights["scale"])
    assert np.max(np.abs(kept.kappa_cnn - right.kappa_cnn)) > 0.5 * size  # the network reads σ
    # KS93 does not: its weighted means ignore the scale (to round-off).
    np.testing.assert_allclose(kept.kappa_ks93, right.kappa_ks93, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# Fields wider than one input: one mosaic over tiles, no seams
# ---------------------------------------------------------------------------
def ramped_network(batch):
    """A 'network' that returns the ε̄1 under each output pixel times a ramp across the
    subfield: edge effects a real network has, which tiles pooled badly turn into seams."""
    cfg = wlcnn.PAPER
    lo = (cfg.first_kernel - 1) // 2
    side = cfg.pool * cfg.output_npix
    g1 = wlcnn.block_mean(batch[:, lo:lo + side, lo:lo + side, 0], cfg.pool)
    ramp = 1.0 + np.linspace(0.0, 1.0, cfg.output_npix)
    return (g1 * ramp[None, None, :] * ramp[None, :, None])[..., None]


def test_constant_shear_gives_a_seamless_map_over_many_tiles(capsys):
    size, g1 = 45.0, 0.05
    geo = skies.field_geometry(size, stride=TEST_STRIDE)
    assert geo.n_tiles == 16
    step = 8.0  # arcsec: a noise-free source lattice, ε̄1 = g1 on every pixel of the field
    half = geo.npix / 2 * geo.pixel_arcsec
    x, y = np.meshgrid(np.arange(-half, half, step), np.arange(-half, half, step))
    x, y = x.ravel(), y.ravel()
    res = skies.cnn_field_map(x, y, np.full(x.size, g1), np.zeros(x.size),
                              np.full(x.size, 0.3), [ramped_network], geo,
                              progress=True)
    err = capsys.readouterr().err
    assert "mosaic passes over tiles" in err and "16/16" in err  # the progress bar, to its end
    # One lattice of subfields every 12 output pixels over the whole field: away from the
    # field's edges (one subfield's 100-pixel window) every pixel sees the same subfield
    # positions as the pixel 12 further on, whichever tiles they belong to, so the map
    # repeats with the lattice step to round-off.  Tiles pooled with gaps or double
    # counts break this at their edges (the ramp doubles a prediction's weight across it).
    inner = res.mean[100:-100, 100:-100]
    np.testing.assert_allclose(inner[12:], inner[:-12], rtol=1e-12)
    np.testing.assert_allclose(inner[:, 12:], inner[:, :-12], rtol=1e-12)
    np.testing.assert_array_equal(res.count[112:-100], res.count[100:-112])
    assert np.all(np.isfinite(res.mean))


def test_tiles_without_a_source_are_skipped_and_left_nan():
    geo = skies.field_geometry(45.0, stride=TEST_STRIDE)
    rng = np.random.default_rng(4)
    x, y = rng.uniform(-1300, -1100, (2, 300))  # a 3′ patch in the South-East corner only
    src = (x, y, *rng.normal(0, SIGMA_E, (2, 300)), np.full(300, SIGMA_E))
    res = skies._tiled_cnn(src, [], [ramped_network], geo, 1, 16, False)
    assert 0 < res.skipped < geo.n_tiles and res.passes == geo.n_tiles - res.skipped
    assert np.isnan(res.maps.mean[-1, -1]) and res.maps.count[-1, -1] == 0  # North-West corner
    assert np.isfinite(res.maps.mean[0, 0])


def test_all_weights_zero_is_an_error():
    table = valid_table()
    table["weight"] = 0.0
    with pytest.raises(ValueError, match="no usable row among 50 .*50 with weight ≤ 0"):
        skies.read_catalog(table)
