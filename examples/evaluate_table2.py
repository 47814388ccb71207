"""evaluate_table2: TODO docstring."""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import astropy
import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal
import scipy.special
from astropy import constants as const
from astropy import units as u
from astropy.cosmology import FlatLambdaCDM
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

import keras
import tensorflow as tf


import wlcnn
from wlcnn import (
    ClusterDataset, PAPER, PAPER_TABLE2, TABLE2_COLUMNS, _Progress, __version__,
    _ks_kernel, _padded_shape, _percentile_stat, centroid_offsets, choose_ks93_smoothing, cluster_masses,
    cnn_method, evaluate_methods, grid_table, ks93, ks93_mosaic, load_runs,
    metric_R, model_info, mosaic_truth, normalized_kappa, peak_pixel, smooth_map,
    table2,
)



def _wavenumber(shape):
    """|k| in cycles per input pixel on the rfft2 grid of ``shape``."""
    k2 = scipy.fft.fftfreq(shape[0])[:, None]
    k1 = scipy.fft.rfftfreq(shape[1])[None, :]
    return np.sqrt(k1**2 + k2**2)


def _emode_spectrum(g1, g2, shape):
    """Fourier transform of the KS93 E mode of (g1, g2) zero-padded to ``shape`` (eq. 10)."""
    c, s = _ks_kernel(shape)
    return c * scipy.fft.rfft2(g1, s=shape) + s * scipy.fft.rfft2(g2, s=shape)


@dataclass
class WienerFilter:
    """Isotropic Wiener filter W(k) = S(k) / (S(k) + N(k)) of the KS93 E mode.

    Attributes
    ----------
    k : numpy.ndarray, shape (n_bins,)
        Bin centres of |k| in cycles per input pixel.
    signal_power, noise_power : numpy.ndarray, shape (n_bins,)
        Mean |FFT|² of the truth κ and of the E mode of pure noise in each
        annulus, on the padded FFT grid of ``shape`` (same normalisation).
    shape : tuple of int
        The padded FFT grid (that of :func:`ks93` with ``pad=True``).
    n_clusters : int
        Training clusters averaged.
    """
    k: np.ndarray
    signal_power: np.ndarray
    noise_power: np.ndarray
    shape: tuple
    n_clusters: int

    def transfer(self, k):
        """W at wavenumbers ``k`` (cycles per pixel), interpolated in log k.

        W = 0 at k = 0: KS93 cannot recover the mean (mass sheet)."""
        k = np.asarray(k, dtype=np.float64)
        good = (self.signal_power + self.noise_power) > 0
        w = np.where(good, self.signal_power / np.where(good, self.signal_power + self.noise_power, 1.0), 0.0)
        # np.interp holds the end values beyond the first and last bins
        out = np.interp(np.log(np.where(k > 0, k, 1.0)), np.log(self.k), w)
        return np.where(k > 0, out, 0.0)


def _radial_mean(power, kmod, edges):
    """Mean of ``power`` in annuli of |k| ``edges`` (rfft half-plane: every mode and its
    conjugate carry the same power, so the half-plane average equals the full one)."""
    idx = np.digitize(kmod.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < len(edges) - 1)
    sums = np.bincount(idx[ok], power.ravel()[ok], minlength=len(edges) - 1)
    counts = np.bincount(idx[ok], minlength=len(edges) - 1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts


def fit_wiener(train_clusters, config=PAPER, grid_fn=None, n_bins=40, limit=200, seed=0, progress=False):
    """Signal and noise power of the Wiener filter, from training clusters.

    Parameters
    ----------
    train_clusters : iterable of dict
        Cluster records (``ClusterDataset.clusters("train")``): ``kappa`` and
        ``catalog``.
    config : Config
    grid_fn : callable, optional
        ``grid_fn(catalog) -> grid (4, npix, npix)``; default :func:`grid_table`.
    n_bins : int
        Logarithmic |k| bins from the fundamental mode of the padded grid to
        the corner of the Fourier plane.
    limit : int or None
        Clusters used (None: all); each costs a gridding and three padded
        FFTs, about 0.1 s.
    seed : int
        Seed of the random rotations of the noise realisations.
    progress : bool
        Show a progress bar (needs ``limit``).

    Returns
    -------
    WienerFilter

    Notes
    -----
    Beyond the paper.  Signal: the power of the truth κ minus its field mean
    (the sheet KS93 cannot see), zero-padded like :func:`ks93`.  Noise: the
    power of the KS93 E mode of the same catalog with every ellipticity
    rotated by a uniform random angle, which destroys the lensing signal and
    keeps the noise of each source, its weight and the 7″ gridding (standard
    in weak lensing, e.g. Van Waerbeke 2000).  Both are averaged in annuli of
    |k|, so W is isotropic, as the statistics of random cluster fields are.
    """
    grid_fn = (lambda cat: grid_table(cat, config)) if grid_fn is None else grid_fn
    rng = np.random.default_rng(seed)
    shape = _padded_shape((config.npix, config.npix), True)
    kmod = _wavenumber(shape)
    # the last edge a hair beyond the corner mode, so that it falls inside the last bin
    edges = np.geomspace(1.0 / max(shape), kmod.max() * (1 + 1e-9), n_bins + 1)
    s_sum = np.zeros(n_bins)
    n_sum = np.zeros(n_bins)
    bar = _Progress(limit, "wiener spectra") if progress and limit else None
    n = 0
    for cluster in train_clusters:
        if limit is not None and n >= limit:
            break
        kappa = np.asarray(cluster["kappa"], dtype=np.float64)
        s_k, counts = _radial_mean(np.abs(scipy.fft.rfft2(kappa - kappa.mean(), s=shape)) ** 2, kmod, edges)
        cat = cluster["catalog"].copy()
        phase = np.exp(1j * rng.uniform(0, 2 * np.pi, len(cat)))
        e = (np.asarray(cat["e1"]) + 1j * np.asarray(cat["e2"])) * phase
        cat["e1"], cat["e2"] = e.real, e.imag
        g = grid_fn(cat)
        n_k, _ = _radial_mean(np.abs(_emode_spectrum(g[0], g[1], shape)) ** 2, kmod, edges)
        s_sum += np.nan_to_num(s_k)
        n_sum += np.nan_to_num(n_k)
        n += 1
        if bar:
            bar.update()
    if n == 0:
        raise ValueError("no training clusters for the Wiener filter")
    centres = np.sqrt(edges[:-1] * edges[1:])
    filled = counts > 0  # the lowest annuli of a log grid can hold no mode
    return WienerFilter(centres[filled], s_sum[filled] / n, n_sum[filled] / n, shape, n)


def wiener_mosaic(grid, wiener, config=PAPER):
    """Wiener-filtered KS93 of the gridded catalog, on the mosaic grid.

    Parameters
    ----------
    grid : array_like, shape (≥2, npix, npix)
    wiener : WienerFilter
        From :func:`fit_wiener` (same config).
    config : Config

    Returns
    -------
    numpy.ndarray, float64, shape (mosaic_npix, mosaic_npix)

    Notes
    -----
    κ̂_WF(k) = W(|k|) D̂*(k) ε̂(k): the KS93 E mode (eq. 10) multiplied by
    W = S / (S + N) in Fourier space on the same padded grid, then the block
    mean of :func:`mosaic_truth`.  The minimum-variance linear estimate for
    a Gaussian field; it damps the scales where noise dominates rather than
    smoothing every scale alike.
    """
    grid = np.asarray(grid, dtype=np.float64)
    shape = tuple(wiener.shape)
    f = _emode_spectrum(grid[0], grid[1], shape) * wiener.transfer(_wavenumber(shape))
    n = config.npix
    return mosaic_truth(scipy.fft.irfft2(f, s=shape)[:n, :n], config)


#: Convergence criterion and cap of the reduced-shear iteration.
SS95_TOL = 1e-4       # max |Δκ| between iterations (0.1 % of a typical cluster κ)
SS95_MAX_ITER = 30
SS95_MIN_FACTOR = 0.1  # floor of (1 − κ): caps the correction at 10× where κ → 1


def ks93_reduced_iterative(grid, config=PAPER, fwhm_arcmin=0.0, tol=SS95_TOL, max_iter=SS95_MAX_ITER,
                           min_factor=SS95_MIN_FACTOR, return_info=False):
    """Nonlinear KS inversion of the reduced shear (Seitz & Schneider 1995).

    Parameters
    ----------
    grid : array_like, shape (≥2, npix, npix)
        Gridded catalog; ε̄1, ε̄2 estimate the reduced shear g (eq. 2, 7).
    config : Config
    fwhm_arcmin : float
        Gaussian smoothing applied to κ at every step (0: none); the KS93
        choice of :func:`choose_ks93_smoothing` is the natural value.
    tol : float
        Stop when max |κ_{n+1} − κ_n| over the input pixels is below ``tol``.
    max_iter : int
        Cap on the iterations; the last iterate is returned if it is reached.
    min_factor : float
        Floor of the factor (1 − κ), where noise or a strong-lensing core
        drives κ towards or beyond 1.
    return_info : bool
        Also return ``{"n_iter": int, "converged": bool, "last_change": float}``.

    Returns
    -------
    numpy.ndarray, float64, shape (mosaic_npix, mosaic_npix)
        (and the info dict if ``return_info``)

    Notes
    -----
    Eq. 2 gives γ = g (1 − κ).  Starting from κ_0 = KS93(g) (the weak limit
    γ ≈ g), iterate κ_{n+1} = S[KS93(g (1 − κ_n))] with S the smoothing.
    The map contracts with a factor of order κ, so a few steps suffice for
    cluster fields.  KS93 sets the mean of the padded field to zero, so the
    iteration runs on the zero-mean mass sheet; another sheet λ would give a
    different fixed point (the mass-sheet degeneracy, Seitz & Schneider 1995).
    """
    grid = np.asarray(grid, dtype=np.float64)
    g1, g2 = grid[0], grid[1]
    kappa = smooth_map(ks93(g1, g2), fwhm_arcmin, config)
    change, n_iter = np.inf, 0
    while n_iter < max_iter and change >= tol:
        factor = np.maximum(1.0 - kappa, min_factor)
        new = smooth_map(ks93(g1 * factor, g2 * factor), fwhm_arcmin, config)
        change = float(np.max(np.abs(new - kappa)))
        kappa, n_iter = new, n_iter + 1
    out = mosaic_truth(kappa, config)
    if return_info:
        return out, {"n_iter": n_iter, "converged": change < tol, "last_change": change}
    return out


def baseline_methods(config=PAPER, ks93_fwhm_arcmin=0.0, wiener=None, ss95=True):
    """The baselines as methods for :func:`evaluate_methods`.

    Parameters
    ----------
    config : Config
    ks93_fwhm_arcmin : float
        KS93 smoothing (from :func:`choose_ks93_smoothing`); SS95 uses it too.
    wiener : WienerFilter, optional
        Adds "Wiener" (:func:`wiener_mosaic`).
    ss95 : bool
        Adds "KS93-SS95" (:func:`ks93_reduced_iterative`).

    Returns
    -------
    dict of str -> callable
    """
    methods = {"KS93": lambda grid: ks93_mosaic(grid, config, ks93_fwhm_arcmin)}
    if wiener is not None:
        methods["Wiener"] = lambda grid: wiener_mosaic(grid, wiener, config)
    if ss95:
        methods["KS93-SS95"] = lambda grid: ks93_reduced_iterative(grid, config, ks93_fwhm_arcmin)
    return methods


def _fmt(v, digits=3):
    return f"{v:.{digits}f}".replace("-", "−")


def _markdown_cells(row):
    return (f"{_fmt(row['R'])} ± {_fmt(row['R_err'])}", f"{_fmt(row['D'], 2)} ± {_fmt(row['D_err'], 2)}",
            f"{_fmt(row['M_ratio'])} (+{_fmt(row['M_plus'])}/−{_fmt(row['M_minus'])})",
            f"{_fmt(row['dpeak'], 2)} (+{_fmt(row['dpeak_plus'], 2)}/−{_fmt(row['dpeak_minus'], 2)})",
            str(int(row["n_clusters"])))


def table_markdown(rows, paper=PAPER_TABLE2, title=None):
    """Markdown of Table 2 rows, the paper's rows below them for reference.

    Parameters
    ----------
    rows : list of dict
        From :func:`table2`.
    paper : dict of str -> dict, optional
        The paper's rows (:data:`PAPER_TABLE2`, 3 or 4), marked "(paper)".
    title : str, optional

    Returns
    -------
    str
    """
    head = ("Method", "R (eq. 14)", "D (eq. 15)", "M_pred/M_truth", "Δ_peak [pixel]", "N")
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join((row["method"],) + _markdown_cells(row)) + " |" for row in rows]
    for name, row in (paper or {}).items():
        lines.append("| " + " | ".join((f"{name} (paper)",) + _markdown_cells(row)) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows, out_dir, name="table2", paper=PAPER_TABLE2, title=None):
    """Write Table 2 rows as ``{name}.csv`` and ``{name}.md`` in ``out_dir``.

    Parameters
    ----------
    rows : list of dict
        From :func:`table2`.
    out_dir : path
        Existing directory.
    name : str
        File stem ("table2", "table3", "table4").
    paper : dict, optional
        The paper's rows, added to the Markdown only (the CSV holds this run's
        methods alone, one row each, with exactly :data:`TABLE2_COLUMNS`).
    title : str, optional
        Heading line of the Markdown.

    Returns
    -------
    (str, str)
        Paths of the CSV and Markdown files.
    """
    csv_path = os.path.join(out_dir, f"{name}.csv")
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TABLE2_COLUMNS)
        for row in rows:
            writer.writerow([row["method"]] + [int(row[c]) if c == "n_clusters" else f"{row[c]:.6g}"
                                               for c in TABLE2_COLUMNS[1:]])
    with open(md_path, "w") as fh:
        fh.write(table_markdown(rows, paper, title))
    return csv_path, md_path


# ---------------------------------------------------------------------------
# §3 Figures 2-8 (matplotlib, object-oriented: no pyplot state, no display)
# ---------------------------------------------------------------------------
MAP_CMAP = "magma"
METHOD_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6")
CONTOUR_LEVELS = (0.683, 0.954, 0.997)  # "1σ, 2σ and 3σ" of the joint distributions (Fig. 4)
N_MEDIAN_BINS = 5                       # equal-count bins of the binned medians (Figs. 4-6)
KAPPA_TILDE_RANGE = (-2.0, 6.0)         # colour scale of κ̃ maps: a few σ below, the peaks above
HIST_BINS = 80                          # bins of the Fig. 3 histograms
JOINT_BINS = 120                        # bins per axis of the Fig. 4-5 joint histograms
PLOT_RANGE_PERCENTILES = (0.05, 99.95)  # axis ranges: all but the most extreme pixels


def _figure(ncols, nrows=1, size=3.6):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size * ncols, size * nrows * 0.95), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes


def _save(fig, path):
    fig.savefig(path, dpi=110)
    return path


def _bbox(finite):
    rows, cols = np.flatnonzero(finite.any(axis=1)), np.flatnonzero(finite.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def default_example(results):
    """The cluster Fig. 2 shows: M_truth nearest the median (typical, not the best case)."""
    m_t, _ = cluster_masses(results.truth, results.truth)
    return int(np.argmin(np.abs(m_t - np.median(m_t))))


def figure_maps(results, path, example=None, methods=None):
    """Fig. 2 (and Fig. 12 with the variants as methods): truth and reconstructions.

    Parameters
    ----------
    results : Evaluation
    path : path of the PNG
    example : int, optional
        Position of the cluster in ``results``; default :func:`default_example`.
    methods : sequence of str, optional
        Columns after the truth; default every method.

    Notes
    -----
    Top row κ on the truth's colour scale (so lost amplitude shows), bottom
    row κ̃ (eq. 13) on a common scale; × marks each map's highest pixel.
    Shown over the evaluated pixels, axes in arcmin from the field centre.
    """
    i = default_example(results) if example is None else int(example)
    methods = results.methods if methods is None else list(methods)
    cfg = results.config
    panels = [("Truth", results.truth[i])] + [(m, results.maps[m][i]) for m in methods]
    rows, cols = _bbox(np.isfinite(results.truth[i]))
    pix_arcmin = cfg.pixel_arcsec * cfg.pool / 60.0
    half = cfg.mosaic_npix / 2.0
    extent = [(cols.start - half) * pix_arcmin, (cols.stop - half) * pix_arcmin,
              (rows.start - half) * pix_arcmin, (rows.stop - half) * pix_arcmin]
    fig, axes = _figure(len(panels), 2)
    vmin, vmax = np.nanmin(results.truth[i]), np.nanmax(results.truth[i])
    for col, (name, kappa) in enumerate(panels):
        for row, (a, lim, label) in enumerate(((kappa, (vmin, vmax), "κ"),
                                               (normalized_kappa(kappa), KAPPA_TILDE_RANGE, "κ̃"))):
            ax = axes[row, col]
            im = ax.imshow(a[rows, cols], origin="lower", extent=extent, cmap=MAP_CMAP,
                           vmin=lim[0], vmax=lim[1])
            py, px = peak_pixel(a)
            ax.plot((px + 0.5 - half) * pix_arcmin, (py + 0.5 - half) * pix_arcmin, "x", color="cyan",
                    ms=10, mew=2)
            ax.set_title(f"{name}: {label}")
            ax.set_xlabel("x [arcmin]")
            if col == 0:
                ax.set_ylabel("y [arcmin]")
            if col == len(panels) - 1:
                fig.colorbar(im, ax=axes[row, :], shrink=0.8, label=label)
    return _save(fig, path)


def _pooled(results, name, normalised):
    t = results.truth
    p = results.maps[name] if name else results.truth
    out = []
    for ti, pi in zip(t, p):
        ok = np.isfinite(ti) & np.isfinite(pi)
        out.append(normalized_kappa(pi[ok]) if normalised else pi[ok])
    return np.concatenate(out)


def figure_distributions(results, path, methods=None):
    """Fig. 3: the distribution of κ (left) and κ̃ (right) over all evaluated pixels.

    Notes
    -----
    Histogram densities on a log scale, truth in black.  The paper's shaded
    run-to-run spread is not drawn: the mosaics kept are the runs' means.
    """
    methods = results.methods if methods is None else list(methods)
    fig, axes = _figure(2)
    for ax, normalised, label in ((axes[0, 0], False, "κ"), (axes[0, 1], True, "κ̃")):
        data = [("Truth", _pooled(results, None, normalised), "k")]
        data += [(m, _pooled(results, m, normalised), METHOD_COLORS[j % len(METHOD_COLORS)])
                 for j, m in enumerate(methods)]
        lo = min(np.percentile(d, PLOT_RANGE_PERCENTILES[0]) for _, d, _ in data)
        hi = max(np.percentile(d, PLOT_RANGE_PERCENTILES[1]) for _, d, _ in data)
        bins = np.linspace(lo, hi, HIST_BINS)
        for name, d, color in data:
            ax.hist(d, bins=bins, density=True, histtype="step", color=color, lw=1.5, label=name)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("probability density")
        ax.legend(fontsize=8)
    return _save(fig, path)


def _contour_levels(h, fractions=CONTOUR_LEVELS):
    """Density thresholds enclosing ``fractions`` of the counts of histogram ``h``."""
    flat = np.sort(h.ravel())[::-1]
    cum = np.cumsum(flat) / flat.sum()
    levels = [flat[min(np.searchsorted(cum, f), flat.size - 1)] for f in fractions]
    return np.unique(levels)  # increasing, as contour() wants


def _binned_medians(x, y, n_bins=N_MEDIAN_BINS):
    """Medians and 16/84 percentiles of x and y in ``n_bins`` equal-count bins of x."""
    order = np.argsort(x)
    out = []
    for chunk in np.array_split(order, n_bins):
        if chunk.size:
            px = np.percentile(x[chunk], [16, 50, 84])
            py = np.percentile(y[chunk], [16, 50, 84])
            out.append((px, py))
    return out


def _joint_panel(ax, t, p, label, r_stat=None):
    lo, hi = np.percentile(np.concatenate([t, p]), PLOT_RANGE_PERCENTILES)
    bins = np.linspace(lo, hi, JOINT_BINS)
    h, xe, ye = np.histogram2d(t, p, bins=[bins, bins])
    xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
    h = scipy.ndimage.gaussian_filter(h, 1.0)  # a 1-bin blur so the contours are not pixel noise
    ax.contour(xc, yc, h.T, levels=_contour_levels(h), colors="k", linewidths=1)
    for px, py in _binned_medians(t, p):
        ax.errorbar(px[1], py[1], xerr=[[px[1] - px[0]], [px[2] - px[1]]],
                    yerr=[[py[1] - py[0]], [py[2] - py[1]]], fmt="o", color="C1", ms=6, capsize=2)
    xs = np.array([lo, hi])
    ax.plot(xs, xs, ":", color="0.5", lw=1)
    if r_stat is not None:
        ax.plot(xs, r_stat.value * xs, "--", color="0.4", label=f"R = {r_stat.value:.3f} ± {r_stat.err:.3f}")
        ax.fill_between(xs, (r_stat.value - r_stat.err) * xs, (r_stat.value + r_stat.err) * xs,
                        color="0.6", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"{label} truth")
    ax.set_ylabel(f"{label} pred")


def figure_joint(results, path, normalised=False, methods=None):
    """Fig. 4 (κ) or Fig. 5 (κ̃, ``normalised=True``): prediction against truth, pixel by pixel.

    Notes
    -----
    Contours enclose 68.3, 95.4 and 99.7 % of the pixels; orange points are
    the medians of five equal-count bins of the truth with 16-84 % ranges;
    the dashed line and band are R ± its error (eq. 14, Fig. 4 only).
    """
    methods = results.methods if methods is None else list(methods)
    fig, axes = _figure(len(methods))
    for ax, name in zip(axes[0], methods):
        t, p = _pooled(results, None, normalised), _pooled(results, name, normalised)
        r = None if normalised else metric_R(results.truth, results.maps[name])
        _joint_panel(ax, t, p, "κ̃" if normalised else "κ", r)
        ax.set_title(name)
    return _save(fig, path)


def figure_mass(results, path, methods=None):
    """Fig. 6: M_cl of the prediction against the truth (§3.3).

    Notes
    -----
    Error bars of single clusters: the standard deviation of M_cl over runs,
    where the method has runs; orange: binned medians (five equal-count
    bins); dashed line and band: the median ratio and its 16-84 % range.
    """
    methods = results.methods if methods is None else list(methods)
    fig, axes = _figure(len(methods))
    for ax, name in zip(axes[0], methods):
        m_t, m_p = cluster_masses(results.truth, results.maps[name])
        _mass_panel(ax, m_t, m_p, results.run_mass_std.get(name))
        ax.set_title(name)
    return _save(fig, path)


def _mass_panel(ax, m_t, m_p, err=None, ylabel="M_cl pred"):
    ax.errorbar(m_t, m_p, yerr=err, fmt="o", color="k", ms=3, elinewidth=0.8, alpha=0.7)
    for px, py in _binned_medians(m_t, m_p):
        ax.errorbar(px[1], py[1], xerr=[[px[1] - px[0]], [px[2] - px[1]]],
                    yerr=[[py[1] - py[0]], [py[2] - py[1]]], fmt="o", color="C1", ms=7, capsize=2)
    stat = _percentile_stat(m_p / m_t)
    xs = np.array([0.0, m_t.max() * 1.05])
    ax.plot(xs, xs, ":", color="0.5")
    ax.plot(xs, stat.value * xs, "--", color="C0",
            label=f"ratio {stat.value:.3f} +{stat.plus:.3f}/−{stat.minus:.3f}")
    ax.fill_between(xs, (stat.value - stat.minus) * xs, (stat.value + stat.plus) * xs,
                    color="C0", alpha=0.2)
    ax.set_xlabel("M_cl truth (Σκ, r ≤ 10 px)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper left")


def figure_centroid_mass(results, path, methods=None):
    """Fig. 7: Δ_peak against the true cluster mass M_cl (§3.4)."""
    methods = results.methods if methods is None else list(methods)
    m_t, _ = cluster_masses(results.truth, results.truth)
    fig, axes = _figure(len(methods))
    for ax, name in zip(axes[0], methods):
        d = centroid_offsets(results.truth, results.maps[name])
        ax.plot(m_t, d, "o", color="k", ms=3, alpha=0.7)
        ax.axhline(np.median(d), ls="--", color="C0", label=f"median {np.median(d):.2f} px")
        ax.set_xlabel("M_cl truth")
        ax.set_ylabel("Δ_peak [pixel]")
        ax.set_title(name)
        ax.legend(fontsize=8)
    return _save(fig, path)


def figure_centroid_pair(results, path, x_method="KS93", y_method="CNN"):
    """Fig. 8: Δ_peak of two methods for the same clusters, coloured by M_cl truth."""
    m_t, _ = cluster_masses(results.truth, results.truth)
    dx = centroid_offsets(results.truth, results.maps[x_method])
    dy = centroid_offsets(results.truth, results.maps[y_method])
    fig, axes = _figure(1, size=4.5)
    ax = axes[0, 0]
    sc = ax.scatter(dx, dy, c=m_t, s=14, cmap="viridis")
    top = max(dx.max(), dy.max()) * 1.05 + 1
    ax.plot([0, top], [0, top], ":", color="0.5")
    ax.set_xlim(-0.02 * top, top)  # a margin, so that Δ = 0 is not hidden under the axes
    ax.set_ylim(-0.02 * top, top)
    ax.set_xlabel(f"Δ_peak {x_method} [pixel]")
    ax.set_ylabel(f"Δ_peak {y_method} [pixel]")
    fig.colorbar(sc, ax=ax, label="M_cl truth")
    return _save(fig, path)


def figure_masked(results, path, method="CNN", reference=None, reference_method="KS93"):
    """Fig. 10: the reconstruction under bright-star masks (§3.5).

    Parameters
    ----------
    results : Evaluation
        Of the masked catalogs (``results.star_mask`` marks the masked pixels).
    path : path of the PNG
    method : str
        The method shown (the paper: CNN-BS).
    reference : Evaluation, optional
        The same clusters without masks, whose ``reference_method`` Δ_peak is
        the right panel's x axis (the paper: KS93 without masking); default
        ``results`` itself.
    reference_method : str

    Notes
    -----
    Left: κ pred against truth over the pixels inside the masks (contours,
    binned medians as Fig. 4); middle: M_cl as Fig. 6; right: Δ_peak of
    ``method`` against that of the reference.
    """
    reference = results if reference is None else reference
    fig, axes = _figure(3)
    inside = results.star_mask & np.isfinite(results.truth)
    t, p = results.truth[inside], results.maps[method][inside]
    if t.size:
        _joint_panel(axes[0, 0], t, p, "κ")
    axes[0, 0].set_title(f"{method}: pixels inside the masks")
    m_t, m_p = cluster_masses(results.truth, results.maps[method])
    _mass_panel(axes[0, 1], m_t, m_p, results.run_mass_std.get(method), f"M_cl {method}")
    ax = axes[0, 2]
    d_ref = centroid_offsets(reference.truth, reference.maps[reference_method])
    d = centroid_offsets(results.truth, results.maps[method])
    sc = ax.scatter(d_ref, d, c=m_t, s=14, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="M_cl truth")
    top = max(d_ref.max(), d.max()) * 1.05 + 1
    ax.plot([0, top], [0, top], ":", color="0.5")
    ax.set_xlim(-0.02 * top, top)
    ax.set_ylim(-0.02 * top, top)
    ax.set_xlabel(f"Δ_peak {reference_method} [pixel]")
    ax.set_ylabel(f"Δ_peak {method} [pixel]")
    return _save(fig, path)


def write_figures(results, out_dir, example=None, pair=("KS93", "CNN")):
    """Figs. 2-8 (and 10 for masked catalogs) as PNG files in ``out_dir``; returns their paths.

    Fig. 8 needs both methods of ``pair``; it is skipped otherwise.  Fig. 10
    is drawn when some evaluated pixel lies in a star mask, for ``pair[1]``
    against ``pair[0]`` of the same (masked) catalogs; call
    :func:`figure_masked` to compare with an unmasked evaluation instead.
    Fig. 12 (the Appendix A variants) is :func:`figure_maps` with the
    variants as methods.
    """
    paths = [figure_maps(results, os.path.join(out_dir, "fig2_maps.png"), example),
             figure_distributions(results, os.path.join(out_dir, "fig3_distributions.png")),
             figure_joint(results, os.path.join(out_dir, "fig4_joint_kappa.png")),
             figure_joint(results, os.path.join(out_dir, "fig5_joint_kappa_tilde.png"), normalised=True),
             figure_mass(results, os.path.join(out_dir, "fig6_mass.png")),
             figure_centroid_mass(results, os.path.join(out_dir, "fig7_centroid_mass.png"))]
    if all(m in results.maps for m in pair):
        paths.append(figure_centroid_pair(results, os.path.join(out_dir, "fig8_centroid_pair.png"), *pair))
        if (results.star_mask & np.isfinite(results.truth)).any():
            paths.append(figure_masked(results, os.path.join(out_dir, "fig10_masked.png"), pair[1],
                                       reference_method=pair[0]))
    return paths


def cluster_rows(results):
    """Per-cluster values behind Figs. 6-8: index, M_truth, and each method's M_pred and Δ_peak."""
    m_t, _ = cluster_masses(results.truth, results.truth)
    rows = [{"index": int(i), "M_truth": float(m)} for i, m in zip(results.index, m_t)]
    for name in results.methods:
        _, m_p = cluster_masses(results.truth, results.maps[name])
        d = centroid_offsets(results.truth, results.maps[name])
        for row, mp, dd in zip(rows, m_p, d):
            row[f"M_{name}"], row[f"dpeak_{name}"] = float(mp), float(dd)
    return rows


def write_report(results, out_dir, meta=None, example=None, table_name="table2", paper=PAPER_TABLE2,
                 extra_tables=None, figures=True, overwrite=False):
    """Write the evaluation report: tables, per-cluster values, figures.

    Parameters
    ----------
    results : Evaluation
    out_dir : path
        Report directory, created complete or not at all.
    meta : dict, optional
        JSON-serialisable facts to keep beside the tables (command, stride,
        orientations, chosen KS93 FWHM, model files ...), written to
        ``report.json`` with the table rows.
    example : int, optional
        The cluster of Fig. 2.
    table_name : str
        Stem of the main table ("table2").
    paper : dict
        The paper's rows beside it (:data:`PAPER_TABLE2`).
    extra_tables : dict of str -> (rows, paper), optional
        Further tables (e.g. "table3", "ks93_smoothing") written alike; rows
        of a non-Table-2 shape are written as CSV only.
    figures : bool
        Also write the figures (:func:`write_figures`).
    overwrite : bool
        Replace an existing ``out_dir`` (else it is an error).

    Returns
    -------
    str
        ``out_dir``.

    Notes
    -----
    Everything is written into a fresh temporary directory beside
    ``out_dir`` which is then renamed to it, so a crash leaves no
    half-written report under ``out_dir``.  With ``overwrite`` the old report
    is first moved aside and deleted only after the new one is in place.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} exists (pass overwrite=True to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        rows = table2(results)
        write_table(rows, tmp, table_name, paper)
        for name, (extra_rows, extra_paper) in (extra_tables or {}).items():
            if extra_rows and set(TABLE2_COLUMNS) <= set(extra_rows[0]):
                write_table(extra_rows, tmp, name, extra_paper)
            else:
                _write_csv(extra_rows, os.path.join(tmp, f"{name}.csv"))
        _write_csv(cluster_rows(results), os.path.join(tmp, "clusters.csv"))
        n_pix = int(np.isfinite(results.truth).sum())
        summary = {"table": rows, "n_clusters": len(results.truth), "n_pixels": n_pix,
                   "methods": results.methods, "meta": meta or {}}
        with open(os.path.join(tmp, "report.json"), "w") as fh:
            json.dump(summary, fh, indent=1, default=_json_default)
        if figures:
            write_figures(results, tmp, example)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "report"))
        os.rename(tmp, out_dir)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    return str(v)


def _write_csv(rows, path):
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _model_groups(paths):
    """Method name -> models for each ``--models`` path: "CNN" when all share
    one variant, else the variant names (Table 3 of Appendix A)."""
    groups = [(p, load_runs(p)) for p in paths]
    variants = [model_info(models[0])["variant"] for _, models in groups]
    if len(set(variants)) == 1:
        return {"CNN": [m for _, models in groups for m in models]}
    out = {}
    for (p, models), v in zip(groups, variants):
        out.setdefault(v, []).extend(models)
    return out


def evaluate_directory(data_dir, model_paths, out_dir, stride=12, orientations=1, limit=None,
                       n_val_smoothing=50, wiener=True, ss95=True, overwrite=False, progress=True,
                       command=None):
    """``python -m wlcnn evaluate``: Table 2 (and 3) with figures for a dataset's test split.

    Parameters
    ----------
    data_dir : path
        Dataset (:func:`write_dataset` / :func:`ingest_dataset`).
    model_paths : sequence of path
        Run directories or model files (:func:`load_runs`); several variants
        give one row each.
    out_dir : path
        Report directory (written complete or not at all).
    stride, orientations : int
        The mosaic (:func:`predict_mosaic`): the default stride 12 with one
        orientation is the quick mosaic (100 subfields a cluster); the paper's
        is stride 3 with 6 orientations (8,664).
    limit : int, optional
        Evaluate the first ``limit`` test clusters.
    n_val_smoothing : int
        Validation clusters on which the KS93 smoothing is chosen
        (:func:`choose_ks93_smoothing`).
    wiener, ss95 : bool
        Add the Wiener filter (fitted on up to 200 training clusters) and the
        Seitz & Schneider (1995) reduced-shear iteration as rows.

    Returns
    -------
    list of dict
        The Table 2 rows (also in ``out_dir/table2.csv``).
    """
    ds = ClusterDataset(data_dir)
    config = ds.config
    groups = _model_groups(model_paths)
    for name, models in groups.items():
        for m in models:
            info = model_info(m)
            if info["config"]["subfield_npix"] != config.subfield_npix or \
                    info["config"]["output_npix"] != config.output_npix:
                raise ValueError(f"model {name} was built for another grid than the dataset's")
    n_test = ds.count("test")
    if n_test == 0:
        raise ValueError(f"{ds.path} has no test clusters")
    fwhm, smoothing_rows = choose_ks93_smoothing(ds.clusters("val"), config=config, limit=n_val_smoothing,
                                                 progress=progress)
    wf = fit_wiener(ds.clusters("train"), config, progress=progress) if wiener else None
    methods = baseline_methods(config, fwhm, wf, ss95)
    for name, models in groups.items():
        methods[name] = cnn_method(models, config, stride=stride, orientations=orientations)
    total = n_test if limit is None else min(limit, n_test)
    clusters = itertools.islice(ds.clusters("test"), total)
    results = evaluate_methods(clusters, methods, config, total=total, progress=progress)
    meta = {"command": command, "data": os.fspath(data_dir), "models": [os.fspath(p) for p in model_paths],
            "stride": stride, "orientations": orientations, "ks93_fwhm_arcmin": fwhm,
            "n_test_clusters": total, "wlcnn": __version__}
    write_report(results, out_dir, meta=meta, extra_tables={"ks93_smoothing": (smoothing_rows, None)},
                 overwrite=overwrite)
    return table2(results)


def main(argv=None):
    """Evaluate models against the baselines on a dataset's test split (§3)."""
    p = argparse.ArgumentParser(description="Table 2 and the figures on a dataset's test split (§3)")
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--models", required=True, nargs="+", help="run directories or .keras files")
    p.add_argument("--out", required=True, help="report directory (complete or absent)")
    p.add_argument("--stride", type=int, default=12,
                   help="offset step in input pixels, a multiple of 3 (paper: 3 = 1,444 offsets)")
    p.add_argument("--orientations", type=int, default=1, choices=[1, 6], help="paper: 6")
    p.add_argument("--limit", type=int, default=None, help="first N test clusters")
    p.add_argument("--n-val-smoothing", type=int, default=50,
                   help="validation clusters that choose the KS93 smoothing")
    p.add_argument("--no-wiener", action="store_true")
    p.add_argument("--no-ss95", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        rows = evaluate_directory(args.data, args.models, args.out, args.stride, args.orientations,
                                  args.limit, args.n_val_smoothing, not args.no_wiener,
                                  not args.no_ss95, args.overwrite,
                                  command=" ".join(["python examples/evaluate_table2.py"] + sys.argv[1:]))
    except (ValueError, TypeError, OSError) as exc:
        print(f"evaluate_table2: error: {exc}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{r['method']:>10}: R {r['R']:.3f} ± {r['R_err']:.3f}  D {r['D']:.2f} ± {r['D_err']:.2f}  "
              f"M {r['M_ratio']:.3f} (+{r['M_plus']:.3f}/-{r['M_minus']:.3f})  "
              f"Δpeak {r['dpeak']:.2f} px  ({r['n_clusters']} clusters)")
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
