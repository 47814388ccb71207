"""
Title: Realism of the simulated skies against ΛCDM theory
Description: Power spectrum, one-point PDF and cluster calibration of wlcnn's
cluster-field simulator (paper §2.3.1; issues 3 and 7).

The paper trains on ray-traced MassiveNuS convergence maps.  wlcnn's embedded
simulator (NFW halos drawn from the mass function + a log-normal large-scale
field) must make skies with the same statistics.  This example measures, over
random fields that are *not* centred on a cluster:

* the binned convergence power spectrum C_ℓ against the theory table
  (Limber, halofit; within 15 % at ℓ = 500-10,000 is the target);
* the one-point PDF of κ smoothed with a 1′ Gaussian: its variance (target:
  within 10 % of theory) and skewness (target: positive, within 30 % of the
  log-normal prediction 3(σ/κ0) + (σ/κ0)³);

and, over cluster-centred fields, the truth aperture mass M_cl and the peak
κ on the mosaic grid, which the paper's Figs. 2, 6 and 7 put at M_cl ≈ 10-60
(median 15-35) and peak κ ≈ 0.1-0.5.

Run: ``python sim_stats.py --n-fields 100 --n-cluster-fields 200 --plot cl.png``
"""

"""
## Setup
"""
import argparse
import json
import time

import numpy as np
import scipy.ndimage
import scipy.signal

import wlcnn as wl
import simulate_skies

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--n-fields", type=int, default=20, help="random (non-cluster) fields")
parser.add_argument("--n-cluster-fields", type=int, default=40, help="cluster-centred fields")
parser.add_argument("--seed", type=int, default=2021)
parser.add_argument("--smooth-arcmin", type=float, default=1.0,
                    help="σ of the Gaussian for the one-point PDF")
parser.add_argument("--plot", default=None, help="write a PNG of C_ℓ and the PDF here")
args = parser.parse_args()

config = wl.PAPER
sim = simulate_skies.SIMULATOR
pixel_rad = np.radians(config.pixel_arcsec / 3600.0)
npix = config.npix

"""
## Data: random fields and cluster fields
"""
rng = np.random.default_rng(args.seed)
t0 = time.perf_counter()
fields = [simulate_skies.simulate_cluster_field(config, rng, sim, cluster=False)["kappa"]
          for _ in range(args.n_fields)]
t_field = (time.perf_counter() - t0) / max(args.n_fields, 1)
print(f"{args.n_fields} random fields, {t_field:.3f} s a field")

t0 = time.perf_counter()
clusters = [simulate_skies.simulate_cluster_field(config, rng, sim, cluster=True)
            for _ in range(args.n_cluster_fields)]
t_cluster = (time.perf_counter() - t0) / max(args.n_cluster_fields, 1)
print(f"{args.n_cluster_fields} cluster fields, {t_cluster:.3f} s a field")

"""
## Evaluate: binned C_ℓ

Each field is tapered by a separable Tukey window (20 % cosine edges) so the
non-periodic edges do not leak power to high ℓ.  The theory goes through the
same window exactly: the expected tapered periodogram is the Fourier
transform of ξ(r) A_w(r), with ξ the theory correlation function on the
pixel lags and A_w the window's autocorrelation.
"""
taper = scipy.signal.windows.tukey(npix, alpha=0.2)
window = np.outer(taper, taper)
norm = np.sum(window**2) * pixel_rad**2  # so that ⟨P⟩ = C_ℓ for a flat spectrum


def tapered_power(kappa):
    """|FFT(w κ)|² pixel⁴ / (Σw² pixel²): an estimate of C_ℓ on the FFT modes.

    The field mean is not subtracted: its expectation is zero, and the theory
    below goes through exactly the same estimator.
    """
    f = np.fft.fft2(window * kappa) * pixel_rad**2
    return np.abs(f) ** 2 / norm


ell_1d = 2 * np.pi * np.fft.fftfreq(npix, d=pixel_rad)
ell_grid = np.hypot(ell_1d[:, None], ell_1d[None, :])
edges = np.logspace(np.log10(500), np.log10(10000), 9)
which = np.digitize(ell_grid, edges) - 1
inbin = (which >= 0) & (which < edges.size - 1)


def binned(power):
    return (np.bincount(which[inbin], power[inbin], edges.size - 1)
            / np.bincount(which[inbin], minlength=edges.size - 1))


cl_sim = np.mean([binned(tapered_power(k)) for k in fields], axis=0) if fields else None

# Expected tapered periodogram of the theory: ξ(r) from C_ℓ on a lattice 8×
# finer in ℓ than the field's, then × A_w(r) and back to the field's modes.
big = 8 * npix
ell_big = 2 * np.pi * np.fft.fftfreq(big, d=pixel_rad)
cl_big = simulate_skies.theory_cl(np.hypot(ell_big[:, None], ell_big[None, :]), config, sim)
xi = np.fft.ifft2(cl_big).real / pixel_rad**2          # ξ on pixel lags (periodic in big)
lags = np.r_[0:npix, big - npix + 1:big]
xi_lag = xi[np.ix_(lags, lags)]                          # lags −(npix−1) … npix−1
wpad = np.zeros((2 * npix - 1, 2 * npix - 1))
wpad[:npix, :npix] = window
aw = np.fft.ifft2(np.abs(np.fft.fft2(wpad)) ** 2).real    # autocorrelation on the same lags
# Fold the lags onto the field's period so that the n-point FFT evaluates the
# transform exactly at the field's modes (lag −r ≡ n − r).
def fold(a, axis):
    a = np.moveaxis(a, axis, 0)
    out = a[:npix].copy()
    out[1:] += a[npix:]
    return np.moveaxis(out, 0, axis)


expected = np.fft.fft2(fold(fold(xi_lag * aw, 0), 1)).real * pixel_rad**4 / norm
cl_theory = binned(expected)
ell_mid = np.sqrt(edges[1:] * edges[:-1])
print("\n  ℓ range        C_ℓ sim      C_ℓ theory   sim/theory")
for k in range(edges.size - 1):
    s = cl_sim[k] if cl_sim is not None else np.nan
    print(f"  {edges[k]:6.0f}-{edges[k + 1]:<6.0f} {s:11.4e}  {cl_theory[k]:11.4e}  "
          f"{s / cl_theory[k]:8.3f}")
cl_max_rel_dev = float(np.max(np.abs(cl_sim / cl_theory - 1))) if fields else None

"""
## Evaluate: one-point PDF of κ smoothed at 1′
"""
sig_pix = args.smooth_arcmin * 60.0 / config.pixel_arcsec
border = int(np.ceil(3 * sig_pix))  # drop the pixels the reflected edges reach
smoothed = np.concatenate([
    scipy.ndimage.gaussian_filter(k, sig_pix, mode="reflect")[border:-border, border:-border].ravel()
    for k in fields]) if fields else np.zeros(1)
mean = smoothed.mean()
var_sim = float(np.mean((smoothed - mean) ** 2))
skew_sim = float(np.mean((smoothed - mean) ** 3) / var_sim**1.5)
ell = np.logspace(0, 5.5, 4000)
sig_rad = np.radians(args.smooth_arcmin / 60.0)
var_theory = float(np.trapezoid(ell**2 * simulate_skies.theory_cl(ell) * np.exp(-(ell * sig_rad) ** 2)
                                / (2 * np.pi), np.log(ell)))
kappa0 = simulate_skies.kappa0_hilbert2011(config.z_source) if sim.kappa0 is None else sim.kappa0
r = np.sqrt(var_theory) / kappa0
skew_theory = float(3 * r + r**3)  # shifted log-normal with the theory variance
var_rel_dev = var_sim / var_theory - 1
print(f"\n1′-smoothed κ: mean {mean:+.2e}; variance sim {var_sim:.3e} theory {var_theory:.3e} "
      f"({var_rel_dev:+.1%}); skewness sim {skew_sim:.3f}, log-normal (κ0 = {kappa0:.4f}) "
      f"{skew_theory:.3f} ({skew_sim / skew_theory - 1:+.1%})")

"""
## Evaluate: cluster calibration (Figs. 2, 6, 7)

Mosaic grid: pixel J covers input pixels [3J + 1, 3J + 4) (DESIGN "Grids");
M_cl is the sum of the mosaic truth within 10 mosaic pixels of its highest
pixel (§3.3).
"""
nm = config.mosaic_npix


def mosaic(kappa):
    return kappa[1:1 + 3 * nm, 1:1 + 3 * nm].reshape(nm, 3, nm, 3).mean(axis=(1, 3))


jj, ii = np.meshgrid(np.arange(nm), np.arange(nm))
m_cl, peak = [], []
for f in clusters:
    mos = mosaic(f["kappa"])
    i0, j0 = np.unravel_index(np.argmax(mos), mos.shape)
    m_cl.append(mos[(ii - i0) ** 2 + (jj - j0) ** 2 <= 10**2].sum())
    peak.append(mos[i0, j0])
q = [5, 16, 50, 84, 95]
if clusters:
    m200 = np.array([f["main"]["m200_msun"] for f in clusters])
    print(f"\nmain-cluster M200c quantiles {q}%: " + " ".join(f"{v:.2e}" for v in np.percentile(m200, q)))
    print(f"M_cl quantiles {q}%: " + " ".join(f"{v:.1f}" for v in np.percentile(m_cl, q))
          + f" (min {np.min(m_cl):.1f}, max {np.max(m_cl):.1f})")
    print(f"mosaic peak κ quantiles {q}%: " + " ".join(f"{v:.3f}" for v in np.percentile(peak, q))
          + f"; fraction in 0.1-0.5: {np.mean((np.array(peak) > 0.1) & (np.array(peak) < 0.5)):.2f}")

if args.plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].loglog(ell, ell * (ell + 1) * simulate_skies.theory_cl(ell) / (2 * np.pi), "k-", label="theory (halofit)")
    ax[0].loglog(ell, ell * (ell + 1) * simulate_skies.halo_cl_1h(ell) / (2 * np.pi), "k:",
                 label="field halos, 1-halo (as painted)")
    ax[0].loglog(ell, ell * (ell + 1) * simulate_skies.lss_cl(ell) / (2 * np.pi), "k--",
                 label="log-normal field (target)")
    ax[0].loglog(ell_mid, ell_mid * (ell_mid + 1) * cl_theory / (2 * np.pi), "ks", mfc="none",
                 label="theory, binned through the taper")
    ax[0].loglog(ell_mid, ell_mid * (ell_mid + 1) * cl_sim / (2 * np.pi), "o", label="simulated")
    ax[0].set(xlim=(100, 1e5), ylim=(1e-6, 1e-3), xlabel="ℓ", ylabel="ℓ(ℓ+1)C_ℓ/2π")
    ax[0].legend(fontsize=8)
    bins = np.linspace(-4, 8, 61) * np.sqrt(var_theory)
    ax[1].hist(smoothed, bins=bins, density=True, histtype="step", label="simulated")
    s2 = np.log1p(var_theory / kappa0**2)
    x = bins[bins > -kappa0]
    lnpdf = np.exp(-(np.log1p(x / kappa0) + s2 / 2) ** 2 / (2 * s2)) / (
        (x + kappa0) * np.sqrt(2 * np.pi * s2))
    ax[1].plot(x, lnpdf, "k-", label="log-normal, theory σ² and κ0")
    ax[1].set(yscale="log", ylim=(1e-3, 1e2), xlabel="κ (1′ Gaussian σ)", ylabel="PDF")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")

print(json.dumps({"cl_max_rel_dev": round(cl_max_rel_dev, 4) if fields else None,
                  "var_rel_dev": round(float(var_rel_dev), 4),
                  "skew_sim": round(skew_sim, 4), "skew_theory": round(skew_theory, 4)}))
