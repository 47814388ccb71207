"""Benchmark: gridding a 25,600-source catalog and KS93 of a 500² map.

    python examples/bench_gridding.py [--repeat 30]

Times, in one run and on one thread, ``wlcnn.grid_catalog`` (the Cython
extension) against the vectorised NumPy stencil ``wlcnn.grid_catalog_numpy``
(np.bincount over the kernel's offsets: the same numbers) and against a 2-D
histogram + scipy.ndimage.gaussian_filter (snaps sources to pixel centres: a
speed reference, not an equivalent), and KS93 with zero padding.  The last line
is one JSON object of the figures.
"""
# ## Setup
import argparse
import json
import time

import cli  # the command-line conventions; no TensorFlow

# The command line before TensorFlow loads: --help and usage errors answer at once.
parser = argparse.ArgumentParser(description="benchmark: gridding and KS93")
parser.add_argument("--repeat", type=int, default=30)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
args = parser.parse_args()
cli.quiet_tensorflow(args.verbose)
import numpy as np  # noqa: E402
import scipy.ndimage  # noqa: E402

import wlcnn  # noqa: E402

cfg = wlcnn.PAPER


def best_ms(fn, repeat):
    """Best of ``repeat`` wall-clock timings in ms (the least disturbed run)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


# ## Data: the paper's catalog of one field
rng = np.random.default_rng(args.seed)
zero = np.zeros((cfg.npix, cfg.npix))
cat = wlcnn.simulate_catalog(zero, zero, zero, cfg, rng)
cols = [np.asarray(cat[k]) for k in ("x", "y", "e1", "e2", "sigma")]
out = np.empty((4, cfg.npix, cfg.npix))


def scipy_hist():
    x, y, e1, e2, s = cols
    w = 1 / s**2
    edges = np.linspace(0, cfg.field_arcmin * 60, cfg.npix + 1)
    sig = cfg.sigma_w_arcsec / cfg.pixel_arcsec
    maps = [np.histogram2d(y, x, bins=[edges, edges], weights=v)[0] for v in (w, w * e1, w * e2)]
    sw, s1, s2 = (scipy.ndimage.gaussian_filter(m, sig, truncate=cfg.kernel_cut_sigma)
                  for m in maps)
    with np.errstate(invalid="ignore", divide="ignore"):
        return s1 / sw, s2 / sw


# ## Measure
grid_ms = best_ms(lambda: wlcnn.grid_catalog(*cols, out=out), args.repeat)
numpy_ms = best_ms(lambda: wlcnn.grid_catalog_numpy(*cols), max(3, args.repeat // 10))
hist_ms = best_ms(scipy_hist, max(3, args.repeat // 3))
np.testing.assert_allclose(wlcnn.grid_catalog(*cols), wlcnn.grid_catalog_numpy(*cols), atol=1e-10)
g1, g2 = out[0].copy(), out[1].copy()
ks_ms = best_ms(lambda: wlcnn.ks93(g1, g2), max(3, args.repeat // 3))

# ## Report
print(f"{len(cat)} sources onto {cfg.npix}² pixels, kernel FWHM {cfg.fwhm_arcsec}″ cut at "
      f"{cfg.kernel_cut_sigma}σ")
print(f"grid_catalog (Cython)      {grid_ms:8.2f} ms")
print(f"NumPy bincount stencil     {numpy_ms:8.2f} ms   ({numpy_ms / grid_ms:.1f}× slower)")
print(f"histogram + gaussian_filter{hist_ms:8.2f} ms   "
      f"({hist_ms / grid_ms:.1f}× slower, approximate)")
print(f"KS93, 500² padded to {wlcnn.padded_shape((cfg.npix,), True)[0]}²  {ks_ms:8.2f} ms")
print(json.dumps({"grid_ms": round(grid_ms, 3), "numpy_stencil_ms": round(numpy_ms, 3),
                  "scipy_hist_ms": round(hist_ms, 3),
                  "speedup_vs_numpy": round(numpy_ms / grid_ms, 2),
                  "ks93_ms": round(ks_ms, 3)}))
