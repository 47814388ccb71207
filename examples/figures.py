"""Figures 2-8 and 10 of Hong et al. (2021), drawn from an evaluate_table2.py report.

    python examples/evaluate_table2.py --data data/quick --models examples/quick_model \
        --out reports/quick
    python examples/figures.py reports/quick                 # Figs. 2-8 (10: masked skies)
    python examples/figures.py reports/quick --example 7 --pair KS93 "CNN paper"

The report keeps every method's mosaics (evaluation.npz) and the binned masses
(mass_bias.csv): the figures are drawn from them, so restyling a figure costs
seconds, not another evaluation.  Each PNG is written whole (then renamed) into the
report; a figure that fails is skipped with a warning and costs no other;
figures.json lists each one's status.  Needs matplotlib: ``pip install -e ".[plot]"``.
15 s for a report of 25 clusters and three methods (2 CPU cores shared with a training run).
"""
# ## Setup
import argparse
import csv
import json
import os
import sys
import warnings

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("report", help="report directory of evaluate_table2.py")
    p.add_argument("--example", type=int, default=None,
                   help="cluster (row of clusters.csv) of Fig. 2; default: M_truth nearest "
                        "the median")
    p.add_argument("--pair", nargs=2, default=("KS93", "CNN"), metavar=("X", "Y"),
                   help="methods compared in Figs. 8 and 10")
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import numpy as np  # noqa: E402  (after the command line: see above)
import scipy.ndimage  # noqa: E402

import wlcnn  # noqa: E402


# ## Data: what the report keeps
def read_report(report_dir):
    """(Evaluation, mass_bias rows) of an evaluate_table2.py report."""
    path = os.path.join(report_dir, "evaluation.npz")
    if not os.path.exists(path):
        raise ValueError(f"{report_dir}: no evaluation.npz (is it an evaluate_table2.py report?)")
    with open(os.path.join(report_dir, "mass_bias.csv"), newline="") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return wlcnn.load_evaluation(path), rows


# ## Figures 2-8 and 10 (matplotlib, object-oriented: no pyplot state, no display)
MAP_CMAP = "magma"
CONTOUR_LEVELS = (0.683, 0.954, 0.997)  # "1σ, 2σ and 3σ" of the joint distributions (Fig. 4)
N_MEDIAN_BINS = 5                       # equal-count bins of the binned medians (Figs. 4-6)
KAPPA_TILDE_RANGE = (-2.0, 6.0)         # colour scale of κ̃ maps: a few σ below, the peaks above
HIST_BINS = 80                          # bins of the Fig. 3 histograms
JOINT_BINS = 120                        # bins per axis of the Fig. 4-5 joint histograms
PLOT_RANGE_PERCENTILES = (0.05, 99.95)  # axis ranges: all but the most extreme pixels


def _figure(ncols, nrows=1, size=3.6):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size * ncols, size * nrows * 0.95), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path):
    """Write the PNG whole or not at all."""
    wlcnn.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


def default_example(results):
    """The cluster Fig. 2 shows: M_truth nearest the median (typical, not the best case)."""
    m_t, _ = wlcnn.cluster_masses(results.truth, results.truth)
    return int(np.argmin(np.abs(m_t - np.median(m_t))))


def figure_maps(results, path, example=None, methods=None):
    """Fig. 2 (and Fig. 12 with the Appendix A variants as methods): truth and reconstructions.

    Top row κ on the truth's colour scale (so lost amplitude shows), bottom row
    κ̃ (``wlcnn.normalized_kappa``) on a common scale; × marks each map's
    highest pixel.  ``example`` is the cluster's position in ``results``
    (default :func:`default_example`); axes in arcmin from the field centre.
    """
    i = default_example(results) if example is None else int(example)
    methods = results.methods if methods is None else list(methods)
    cfg = results.config
    panels = [("Truth", results.truth[i])] + [(m, results.maps[m][i]) for m in methods]
    ys, xs = np.nonzero(np.isfinite(results.truth[i]))
    rows, cols = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
    pix_arcmin = cfg.pixel_arcsec * cfg.pool / 60.0
    half = cfg.mosaic_npix / 2.0
    extent = (np.array([cols.start, cols.stop, rows.start, rows.stop]) - half) * pix_arcmin
    fig, axes = _figure(len(panels), 2)
    kappa_range = (np.nanmin(results.truth[i]), np.nanmax(results.truth[i]))
    for col, (name, kappa) in enumerate(panels):
        shown = ((kappa, kappa_range, "κ"),
                 (wlcnn.normalized_kappa(kappa), KAPPA_TILDE_RANGE, "κ̃"))
        for row, (a, lim, label) in enumerate(shown):
            ax = axes[row, col]
            im = ax.imshow(a[rows, cols], origin="lower", extent=extent, cmap=MAP_CMAP,
                           vmin=lim[0], vmax=lim[1])
            py, px = wlcnn.peak_pixel(a)
            ax.plot((px + 0.5 - half) * pix_arcmin, (py + 0.5 - half) * pix_arcmin, "x",
                    color="cyan", ms=10, mew=2)
            ax.set_title(f"{name}: {label}")
            ax.set_xlabel("x [arcmin]")
            if col == 0:
                ax.set_ylabel("y [arcmin]")
            if col == len(panels) - 1:
                fig.colorbar(im, ax=axes[row, :], shrink=0.8, label=label)
    return _save(fig, path)


def _pooled(results, name, normalised):
    """The evaluated pixels of every cluster of map ``name`` (None: the truth), as κ or κ̃."""
    out = []
    for ti, pi in zip(results.truth, results.maps[name] if name else results.truth):
        ok = np.isfinite(ti) & np.isfinite(pi)
        out.append(wlcnn.normalized_kappa(pi[ok]) if normalised else pi[ok])
    return np.concatenate(out)


def figure_distributions(results, path):
    """Fig. 3: the distribution of κ (left) and κ̃ (right) over all evaluated pixels.

    Histogram densities on a log scale, truth in black.  The paper's shaded
    run-to-run spread is not drawn: the mosaics kept are the runs' means.
    """
    fig, axes = _figure(2)
    for ax, normalised, label in ((axes[0, 0], False, "κ"), (axes[0, 1], True, "κ̃")):
        data = [("Truth", _pooled(results, None, normalised), "k")]
        data += [(m, _pooled(results, m, normalised), f"C{j % 10}")
                 for j, m in enumerate(results.methods)]
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


def _contour_levels(h):
    """Density thresholds enclosing the CONTOUR_LEVELS fractions of histogram ``h``."""
    flat = np.sort(h.ravel())[::-1]
    cum = np.cumsum(flat) / flat.sum()
    levels = [flat[min(np.searchsorted(cum, f), flat.size - 1)] for f in CONTOUR_LEVELS]
    return np.unique(levels)  # increasing, as contour() wants


def _binned_medians(ax, x, y, ms):
    """Medians of x and y, with their 16-84 % ranges, in equal-count bins of x (orange)."""
    for chunk in np.array_split(np.argsort(x), N_MEDIAN_BINS):
        if chunk.size:
            px = np.percentile(x[chunk], [16, 50, 84])
            py = np.percentile(y[chunk], [16, 50, 84])
            ax.errorbar(px[1], py[1], xerr=[[px[1] - px[0]], [px[2] - px[1]]],
                        yerr=[[py[1] - py[0]], [py[2] - py[1]]], fmt="o", color="C1", ms=ms,
                        capsize=2)


def _joint_panel(ax, t, p, label, r_stat=None):
    lo, hi = np.percentile(np.concatenate([t, p]), PLOT_RANGE_PERCENTILES)
    bins = np.linspace(lo, hi, JOINT_BINS)
    h, xe, ye = np.histogram2d(t, p, bins=[bins, bins])
    xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
    h = scipy.ndimage.gaussian_filter(h, 1.0)  # a 1-bin blur so the contours are not pixel noise
    ax.contour(xc, yc, h.T, levels=_contour_levels(h), colors="k", linewidths=1)
    _binned_medians(ax, t, p, ms=6)
    xs = np.array([lo, hi])
    ax.plot(xs, xs, ":", color="0.5", lw=1)
    if r_stat is not None:
        ax.plot(xs, r_stat.value * xs, "--", color="0.4",
                label=f"R = {r_stat.value:.3f} ± {r_stat.err:.3f}")
        ax.fill_between(xs, (r_stat.value - r_stat.err) * xs, (r_stat.value + r_stat.err) * xs,
                        color="0.6", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"{label} truth")
    ax.set_ylabel(f"{label} pred")


def figure_joint(results, path, normalised=False):
    """Fig. 4 (κ) or Fig. 5 (κ̃, ``normalised=True``): prediction against truth, pixel by pixel.

    Contours enclose 68.3, 95.4 and 99.7 % of the pixels; orange points are
    binned medians; the dashed line and band are R ± its error
    (``wlcnn.metric_R``, Fig. 4 only).
    """
    fig, axes = _figure(len(results.methods))
    for ax, name in zip(axes[0], results.methods):
        t, p = _pooled(results, None, normalised), _pooled(results, name, normalised)
        r = None if normalised else wlcnn.metric_R(results.truth, results.maps[name])
        _joint_panel(ax, t, p, "κ̃" if normalised else "κ", r)
        ax.set_title(name)
    return _save(fig, path)


def _mass_panel(ax, m_t, m_p, err=None, ylabel="M_cl pred"):
    ax.errorbar(m_t, m_p, yerr=err, fmt="o", color="k", ms=3, elinewidth=0.8, alpha=0.7)
    _binned_medians(ax, m_t, m_p, ms=7)
    lo, ratio, hi = np.percentile(m_p / m_t, [16, 50, 84])
    xs = np.array([0.0, m_t.max() * 1.05])
    ax.plot(xs, xs, ":", color="0.5")
    ax.plot(xs, ratio * xs, "--", color="C0",
            label=f"ratio {ratio:.3f} +{hi - ratio:.3f}/−{ratio - lo:.3f}")
    ax.fill_between(xs, lo * xs, hi * xs, color="C0", alpha=0.2)
    ax.set_xlabel("M_cl truth (Σκ, r ≤ 10 px)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper left")


def figure_mass(results, path):
    """Fig. 6: M_cl of the prediction against the truth (§3.3).

    Error bars: the standard deviation of a cluster's M_cl over runs, where
    the method has runs; orange: binned medians; dashed line and band: the
    median ratio and its 16-84 % range.
    """
    fig, axes = _figure(len(results.methods))
    for ax, name in zip(axes[0], results.methods):
        m_t, m_p = wlcnn.cluster_masses(results.truth, results.maps[name])
        _mass_panel(ax, m_t, m_p, results.run_mass_std.get(name))
        ax.set_title(name)
    return _save(fig, path)


def figure_mass_bias(results, path, rows):
    """M_pred/M_truth against M_cl truth, every method on one panel (Fig. 6 as a ratio).

    Points: the median ratio in equal-count bins of M_cl truth; bars: its 16-84 %
    range over the bin's clusters: ``rows``, the report's mass_bias.csv.
    """
    fig, axes = _figure(1, size=5.0)
    ax = axes[0, 0]
    x = np.array([r["M_truth_median"] for r in rows])
    shift = 1.0 + 0.015 * (np.arange(len(results.methods)) - (len(results.methods) - 1) / 2)
    for j, name in enumerate(results.methods):
        mid = np.array([r[name] for r in rows])
        err = [mid - [r[f"{name}_p16"] for r in rows], [r[f"{name}_p84"] for r in rows] - mid]
        ax.errorbar(x * shift[j], mid, yerr=err, fmt="o-", ms=4, capsize=2, label=name,
                    color=f"C{j % 10}")
    ax.axhline(1.0, ls=":", color="0.5")
    ax.set_xscale("log")
    ax.set_xlabel("M_cl truth (Σκ, r ≤ 10 px)")
    ax.set_ylabel("M_cl pred / M_cl truth")
    ax.legend(fontsize=8)
    return _save(fig, path)


def figure_centroid_mass(results, path):
    """Fig. 7: Δ_peak against the true cluster mass M_cl (§3.4)."""
    m_t, _ = wlcnn.cluster_masses(results.truth, results.truth)
    fig, axes = _figure(len(results.methods))
    for ax, name in zip(axes[0], results.methods):
        d = wlcnn.centroid_offsets(results.truth, results.maps[name])
        ax.plot(m_t, d, "o", color="k", ms=3, alpha=0.7)
        ax.axhline(np.median(d), ls="--", color="C0", label=f"median {np.median(d):.2f} px")
        ax.set_xlabel("M_cl truth")
        ax.set_ylabel("Δ_peak [pixel]")
        ax.set_title(name)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _offsets_panel(fig, ax, dx, dy, m_t, x_method, y_method):
    sc = ax.scatter(dx, dy, c=m_t, s=14, cmap="viridis")
    top = max(dx.max(), dy.max()) * 1.05 + 1
    ax.plot([0, top], [0, top], ":", color="0.5")
    ax.set_xlim(-0.02 * top, top)  # a margin, so that Δ = 0 is not hidden under the axes
    ax.set_ylim(-0.02 * top, top)
    ax.set_xlabel(f"Δ_peak {x_method} [pixel]")
    ax.set_ylabel(f"Δ_peak {y_method} [pixel]")
    fig.colorbar(sc, ax=ax, label="M_cl truth")


def figure_centroid_pair(results, path, x_method="KS93", y_method="CNN"):
    """Fig. 8: Δ_peak of two methods for the same clusters, coloured by M_cl truth."""
    m_t, _ = wlcnn.cluster_masses(results.truth, results.truth)
    dx = wlcnn.centroid_offsets(results.truth, results.maps[x_method])
    dy = wlcnn.centroid_offsets(results.truth, results.maps[y_method])
    fig, axes = _figure(1, size=4.5)
    _offsets_panel(fig, axes[0, 0], dx, dy, m_t, x_method, y_method)
    return _save(fig, path)


def figure_masked(results, path, method="CNN", reference_method="KS93"):
    """Fig. 10: the reconstruction under bright-star masks (§3.5).

    Left: κ of ``method`` against truth over the pixels inside the masks
    (``results.star_mask``), as Fig. 4; middle: M_cl as Fig. 6; right: its
    Δ_peak against that of ``reference_method`` (the paper: KS93 without masks).
    """
    fig, axes = _figure(3)
    inside = results.star_mask & np.isfinite(results.truth)
    t, p = results.truth[inside], results.maps[method][inside]
    if t.size:
        _joint_panel(axes[0, 0], t, p, "κ")
    axes[0, 0].set_title(f"{method}: pixels inside the masks")
    m_t, m_p = wlcnn.cluster_masses(results.truth, results.maps[method])
    _mass_panel(axes[0, 1], m_t, m_p, results.run_mass_std.get(method), f"M_cl {method}")
    d_ref = wlcnn.centroid_offsets(results.truth, results.maps[reference_method])
    d = wlcnn.centroid_offsets(results.truth, results.maps[method])
    _offsets_panel(fig, axes[0, 2], d_ref, d, m_t, reference_method, method)
    return _save(fig, path)


def write_figures(results, out_dir, example=None, pair=("KS93", "CNN"), mass_bias=()):
    """Figs. 2-8 (and 10 for masked catalogs) as PNG files; returns file name -> "written" or error.

    Figs. 8 and 10 compare the methods of ``pair`` when both are evaluated.  A
    figure that fails is skipped with a warning: one broken figure costs no other.
    """
    jobs = [("fig2_maps.png", figure_maps, {"example": example}),
            ("fig3_distributions.png", figure_distributions, {}),
            ("fig4_joint_kappa.png", figure_joint, {}),
            ("fig5_joint_kappa_tilde.png", figure_joint, {"normalised": True}),
            ("fig6_mass.png", figure_mass, {}),
            ("fig6_mass_bias.png", figure_mass_bias, {"rows": mass_bias}),
            ("fig7_centroid_mass.png", figure_centroid_mass, {})]
    if all(m in results.maps for m in pair):
        jobs.append(("fig8_centroid_pair.png", figure_centroid_pair,
                     {"x_method": pair[0], "y_method": pair[1]}))
        if (results.star_mask & np.isfinite(results.truth)).any():
            jobs.append(("fig10_masked.png", figure_masked,
                         {"method": pair[1], "reference_method": pair[0]}))
    status = {}
    for name, draw, kwargs in jobs:
        try:
            draw(results, os.path.join(out_dir, name), **kwargs)
            status[name] = "written"
        except Exception as exc:  # reported, not raised: the tables are worth more than a figure
            status[name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"{name} not drawn: {status[name]}", stacklevel=2)
    return status


# ## Draw
def main(argv=None):
    """Draw the figures of a report; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        import matplotlib.figure  # noqa: F401  (only that it imports)
    except ImportError as exc:
        print(f"figures: error: matplotlib cannot be imported ({exc}); "
              'pip install -e ".[plot]"', file=sys.stderr)
        return 2
    try:
        results, rows = read_report(args.report)
        n = len(results.truth)
        if args.example is not None and not 0 <= args.example < n:
            raise ValueError(f"--example must be a cluster 0..{n - 1}, got {args.example}")
        if not set(args.pair) <= set(results.methods):
            raise ValueError(f"--pair {' '.join(args.pair)}: the report's methods are "
                             f"{results.methods}")
        status = write_figures(results, args.report, args.example, tuple(args.pair), rows)
    except (ValueError, OSError) as exc:
        print(f"figures: error: {exc}", file=sys.stderr)
        return 2
    wlcnn.atomic_write_text(os.path.join(args.report, "figures.json"),
                            json.dumps(status, indent=1))
    for name, state in status.items():
        print(f"{name}: {state}")
    return 0 if all(v == "written" for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
