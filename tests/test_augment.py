"""§2.3.2 augmentation: subfields, the six orientations (spin 2), mosaic truth."""
import numpy as np
import pytest

import wlcnn

CFG = wlcnn.PAPER


def _expected_position(y, x, n, orientation):
    """Where pixel (y, x) of an n × n map goes, written out by hand per orientation."""
    return {"rot0": (y, x), "rot90": (n - 1 - x, y), "rot180": (n - 1 - y, n - 1 - x),
            "rot270": (x, n - 1 - y), "flip_x": (y, n - 1 - x),
            "flip_y": (n - 1 - y, x)}[orientation]


@pytest.mark.parametrize("orientation", wlcnn.ORIENTATIONS)
def test_ks93_commutes_with_every_augmentation(orientation):
    """KS93(augment(shear)) = augment(KS93(shear)): the spin-2 signs are right."""
    rng = np.random.default_rng(30)
    g1, g2 = rng.normal(size=(2, 60, 60))
    a1, a2 = wlcnn.orient_shear(g1, g2, orientation)
    got = wlcnn.ks93(np.ascontiguousarray(a1), np.ascontiguousarray(a2))
    # 1e-12: the padded grid is odd, so the identity is exact up to round-off.
    np.testing.assert_allclose(got, wlcnn.orient_map(wlcnn.ks93(g1, g2), orientation), atol=1e-12)


def test_a_wrong_spin2_rule_would_fail():
    """Guard of the test above: treating γ as a scalar under 90° breaks KS93."""
    rng = np.random.default_rng(31)
    g1, g2 = rng.normal(size=(2, 40, 40))
    wrong = wlcnn.ks93(np.rot90(g1).copy(), np.rot90(g2).copy())
    assert np.abs(wrong - np.rot90(wlcnn.ks93(g1, g2))).max() > 0.1


def test_mosaic_truth_is_the_mean_over_each_output_pixels_footprint():
    rng = np.random.default_rng(32)
    kappa = rng.normal(size=(CFG.npix, CFG.npix))
    mosaic = wlcnn.mosaic_truth(kappa)
    assert mosaic.shape == (166, 166)
    for J, K in [(0, 0), (165, 165), (17, 101)]:
        block = kappa[3 * J + 1:3 * J + 4, 3 * K + 1:3 * K + 4]
        assert mosaic[J, K] == pytest.approx(block.mean(), abs=1e-14)


def test_point_source_lands_on_the_expected_output_pixel_for_every_offset_and_orientation():
    """One source at input pixel (py, px) and a κ spike there: in every one of
    the 1,444 × 6 subfields, input and target put them where hand-written
    index arithmetic says, and the target pixel is the input pixel's 3×3 block."""
    py, px = 250, 262
    x, y = (px + 0.5) * CFG.pixel_arcsec, (py + 0.5) * CFG.pixel_arcsec
    grid = wlcnn.grid_catalog([x], [y], [0.1], [0.0], [0.3])
    kappa = np.zeros((CFG.npix, CFG.npix))
    kappa[py, px] = 1.0
    mosaic = wlcnn.mosaic_truth(kappa)
    s, o = CFG.subfield_npix, CFG.output_npix
    for m_y in range(CFG.n_offsets):
        for m_x in range(CFG.n_offsets):
            ky, kx = (py - 1) // 3 - m_y, (px - 1) // 3 - m_x
            for t in wlcnn.ORIENTATIONS:
                xin, target = wlcnn.subfield(grid, mosaic, m_y, m_x, t, channels=4)
                got_in = np.unravel_index(np.argmax(xin[..., 3]), (s, s))
                want_in = _expected_position(py - 3 * m_y, px - 3 * m_x, s, t)
                assert got_in == want_in
                if 0 <= ky < o and 0 <= kx < o:
                    got_out = np.unravel_index(np.argmax(target[..., 0]), (o, o))
                    assert got_out == _expected_position(ky, kx, o, t)
                    assert ((got_in[0] - 1) // 3, (got_in[1] - 1) // 3) == got_out
                else:
                    assert target.max() == 0


def test_subfield_rotates_the_shear_components():
    grid = np.zeros((4, CFG.npix, CFG.npix))
    grid[0], grid[1], grid[2], grid[3] = 0.1, 0.2, 0.3, CFG.source_density_arcmin2
    for t in wlcnn.ORIENTATIONS:
        xin, _ = wlcnn.subfield(grid, None, 5, 7, t, channels=4)
        s1, s2 = wlcnn.spin2_sign(t)
        # exact: a constant field only changes sign; Δε is a scalar; n is scaled to the
        # nominal density
        np.testing.assert_allclose(xin[0, 0], [0.1 * s1, 0.2 * s2, 0.3, 1.0], rtol=1e-7)
    assert xin.dtype == np.float32 and xin.shape == (386, 386, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(m_y=38, m_x=0), "offset"), (dict(m_y=0, m_x=-1), "offset"),
    (dict(m_y=0, m_x=0, orientation="rot45"), "orientation"),
    (dict(m_y=0, m_x=0, channels=2), "channels"),
])
def test_subfield_rejects_bad_arguments(kwargs, match):
    grid = np.zeros((4, CFG.npix, CFG.npix))
    with pytest.raises(ValueError, match=match):
        wlcnn.subfield(grid, None, **kwargs)


def test_block_mean_is_each_blocks_mean_and_refuses_ragged_sides():
    a = np.random.default_rng(8).normal(size=(2, 6, 9))
    want = np.array([[[a[k, 3 * i:3 * i + 3, 3 * j:3 * j + 3].mean() for j in range(3)]
                      for i in range(2)] for k in range(2)])
    # the same sums in another order: equal to round-off
    np.testing.assert_allclose(wlcnn.block_mean(a, 3), want, rtol=1e-13)
    with pytest.raises(ValueError, match="multiples of 4"):
        wlcnn.block_mean(a, 4)
