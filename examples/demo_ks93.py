"""Demo: one NFW cluster, its source catalog, the gridded shear and KS93.

Title: from a simulated cluster to a Kaiser-Squires mass map
Runs in a few seconds on a laptop CPU:

    python examples/demo_ks93.py --out out/demo_ks93.png

It simulates the paper's observation of one cluster (§2.3.1: 32' field,
25 sources/arcmin², σ_e = 0.24, measurement noise), grids the catalog with the
7" Gaussian (§2.3.2), inverts it with KS93 (§2.2) and draws truth beside KS93.
"""
# ## Setup
import argparse
import pathlib

import numpy as np
import scipy.ndimage

import wlcnn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--m200", type=float, default=1e15, help="cluster M200c in M☉")
parser.add_argument("--seed", type=int, default=2021)
parser.add_argument("--smooth-arcmin", type=float, default=1.5, help="FWHM of the KS93 display smoothing")
parser.add_argument("--out", default="out/demo_ks93.png")
args = parser.parse_args()
cfg = wlcnn.PAPER
rng = np.random.default_rng(args.seed)

# ## Data: a cluster, its shear, and a source catalog
side = cfg.field_arcmin * 60
kappa = wlcnn.nfw_kappa_map(args.m200, 4.0, side / 2, side / 2, cfg.npix, cfg.pixel_arcsec,
                            axis_ratio=0.7, angle_deg=30.0)
gamma1, gamma2 = wlcnn.shear_from_kappa(kappa)
catalog = wlcnn.simulate_catalog(kappa, gamma1, gamma2, cfg, rng)
print(f"{len(catalog)} sources, peak κ = {kappa.max():.3f}")

# ## Reconstruct: grid the shapes, invert with KS93, smooth for display
eps1, eps2, d_eps, density = wlcnn.grid_table(catalog, cfg)
kappa_ks = wlcnn.ks93(eps1, eps2)
sigma_pix = args.smooth_arcmin * 60 / wlcnn.FWHM_PER_SIGMA / cfg.pixel_arcsec
kappa_ks_smooth = scipy.ndimage.gaussian_filter(kappa_ks, sigma_pix)
truth_smooth = scipy.ndimage.gaussian_filter(kappa, sigma_pix)
r = np.corrcoef(truth_smooth.ravel(), kappa_ks_smooth.ravel())[0, 1]
print(f"KS93 ({args.smooth_arcmin}' smoothing) vs smoothed truth: pixel correlation {r:.3f}")

# ## Plot
import matplotlib  # noqa: E402  (optional dependency: pip install -e ".[plot]")

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), constrained_layout=True)
extent = [0, cfg.field_arcmin, 0, cfg.field_arcmin]
panels = [(kappa, "truth κ"), (truth_smooth, f"truth, {args.smooth_arcmin}′ smoothing"),
          (kappa_ks_smooth, f"KS93, {args.smooth_arcmin}′ smoothing")]
for ax, (img, title) in zip(axes, panels):
    im = ax.imshow(img, origin="lower", extent=extent, cmap="magma",
                   vmin=np.percentile(img, 1), vmax=np.percentile(img, 99.9))
    ax.set(title=title, xlabel="x [arcmin] (West →)", ylabel="y [arcmin] (North ↑)")
    fig.colorbar(im, ax=ax, shrink=0.8)
out = pathlib.Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(out, dpi=90)
print(f"wrote {out}")
