"""Table 2 of Hong et al. (2021): every method on the same pixels.

Title: the CNN against KS93, a Wiener filter and Seitz & Schneider (1995)

    python examples/evaluate_table2.py --data data/quick --models examples/quick_model \
        --out reports/quick

Each test cluster's catalog is gridded once and given to every method: KS93 at the
smoothing the validation clusters prefer, a Wiener filter, the Seitz & Schneider (1995)
reduced-shear iteration and the CNN (the mean mosaic of its runs), all scored by the
paper's four metrics on the pixels the CNN mosaic covers. The report holds
table2.md/.csv, clusters.csv, ks93_smoothing.csv, mass_bias.csv (M_pred/M_truth binned
by the truth's mass), report.json and evaluation.npz (every method's mosaics, float32:
0.34 MB a cluster with KS93 and two CNNs), from which ``figures.py`` draws Figs. 2-8 and
10. ``--cache DIR`` keeps the CNN mosaics, so that a long evaluation resumes and a model
is predicted once however many reports use it.

2-core CPU, quick mosaic: 5.6 s a test cluster a run; 11 min for the shipped two-run
model on the 60 test clusters of data/quick, giving the CNN R 0.573, D 1.96, M ratio
0.983, Δ_peak 1.70 px against KS93 0.538, 4.01, 0.917, 1.82 px.  The paper's mosaic
(``--stride 3 --orientations 6``) takes about 210 s a cluster.
"""
# ## Setup
import argparse
import csv
import hashlib
import itertools
import json
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description="Table 2 on a dataset's test split")
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--models", required=True, nargs="+",
                   help="run directories or .keras files, pooled into one CNN row; "
                        "NAME=PATH makes a row of its own")
    p.add_argument("--out", type=cli.output_dir, required=True,
                   help="report directory (complete or absent), created with its parents "
                        "if missing")
    p.add_argument("--stride", type=int, default=12,
                   help="offset step in input pixels, a multiple of 3 (paper: 3 = 1,444 offsets)")
    p.add_argument("--orientations", type=int, default=1, choices=[1, 6], help="paper: 6")
    p.add_argument("--limit", type=int, default=None, help="first N test clusters")
    p.add_argument("--n-val-smoothing", type=int, default=50,
                   help="validation clusters that choose the KS93 smoothing")
    p.add_argument("--ks93-paper-like", type=float, nargs="+", default=(), metavar="FWHM",
                   help="extra KS93 rows smoothed by these FWHMs in arcmin (3 4: the smoothing "
                        "inferred to match the paper's KS93 R and M on these skies)")
    p.add_argument("--no-wiener", action="store_true")
    p.add_argument("--no-ss95", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--cache", default=None,
                   help="directory keeping the CNN mosaics: a rerun resumes and reuses them")
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import numpy as np  # noqa: E402  (after the command line: see above)
import scipy.fft  # noqa: E402
import scipy.ndimage  # noqa: E402

import wlcnn  # noqa: E402
# No public equivalents: the padded FFT grid and the Fourier multipliers of KS93,
# which the Wiener filter applies on the same grid as wlcnn.ks93; the progress bar.
from wlcnn import PAPER, ks_kernel, padded_shape, Progress


# ## Baselines beyond the paper: a Wiener filter and Seitz & Schneider (1995)
def _wavenumber(shape):
    """|k| in cycles per input pixel on the rfft2 grid of ``shape``."""
    k2 = scipy.fft.fftfreq(shape[0])[:, None]
    k1 = scipy.fft.rfftfreq(shape[1])[None, :]
    return np.sqrt(k1**2 + k2**2)


def _emode_spectrum(g1, g2, shape):
    """FFT of the Kaiser & Squires (1993) E mode of (g1, g2) zero-padded to ``shape``."""
    c, s = ks_kernel(shape)
    return c * scipy.fft.rfft2(g1, s=shape) + s * scipy.fft.rfft2(g2, s=shape)


@dataclass
class WienerFilter:
    """Isotropic Wiener filter W(k) = S(k) / (S(k) + N(k)) of the KS93 E mode.

    ``signal_power`` and ``noise_power``: mean |FFT|² of the truth κ and of the
    E mode of pure noise in annuli centred on ``k`` (cycles per input pixel), on
    the padded FFT grid ``shape`` of ``wlcnn.ks93``; ``n_clusters`` averaged.
    """
    k: np.ndarray
    signal_power: np.ndarray
    noise_power: np.ndarray
    shape: tuple
    n_clusters: int

    def transfer(self, k):
        """W at wavenumbers ``k`` (cycles per pixel), interpolated in log k; 0 at k = 0."""
        k = np.asarray(k, dtype=np.float64)
        total = self.signal_power + self.noise_power
        w = np.where(total > 0, self.signal_power / np.where(total > 0, total, 1.0), 0.0)
        # np.interp holds the end values beyond the first and last bins; k = 0 is
        # the mass sheet, which KS93 cannot recover
        out = np.interp(np.log(np.where(k > 0, k, 1.0)), np.log(self.k), w)
        return np.where(k > 0, out, 0.0)


def _radial_mean(power, kmod, edges):
    """Mean of ``power`` in annuli of |k| ``edges``, and the modes in each (on the rfft
    half-plane, which suffices: a mode and its conjugate carry the same power)."""
    idx = np.digitize(kmod.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < len(edges) - 1)
    sums = np.bincount(idx[ok], power.ravel()[ok], minlength=len(edges) - 1)
    counts = np.bincount(idx[ok], minlength=len(edges) - 1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts


def fit_wiener(clusters, config=PAPER, n_bins=40, limit=200, seed=0, progress=False):
    """The :class:`WienerFilter` of cluster records (``kappa``, ``catalog``) not in the test set.

    Parameters
    ----------
    n_bins : int
        Logarithmic |k| bins from the padded grid's fundamental mode to the corner.
    limit : int or None
        Clusters used (None: all); ``seed`` draws the rotations of the noise.

    Notes
    -----
    Signal: the power of the truth κ minus its mean (the sheet KS93 cannot
    see), zero-padded like ``wlcnn.ks93``.  Noise: that of the KS93 E mode of
    the catalog with every ellipticity rotated by a random angle, which keeps
    each source's noise, weight and gridding and destroys the lensing signal
    (Van Waerbeke 2000).  Both are averaged in annuli of |k|.
    """
    rng = np.random.default_rng(seed)
    shape = padded_shape((config.npix, config.npix), True)
    kmod = _wavenumber(shape)
    # the last edge a hair beyond the corner mode, so that it falls inside the last bin
    edges = np.geomspace(1.0 / max(shape), kmod.max() * (1 + 1e-9), n_bins + 1)
    s_sum, n_sum = np.zeros(n_bins), np.zeros(n_bins)
    bar = Progress(limit, "wiener spectra") if progress and limit else None
    n = 0
    for n, cluster in enumerate(itertools.islice(clusters, limit), start=1):
        kappa = np.asarray(cluster["kappa"], dtype=np.float64)
        power = np.abs(scipy.fft.rfft2(kappa - kappa.mean(), s=shape)) ** 2
        s_k, counts = _radial_mean(power, kmod, edges)
        cat = cluster["catalog"].copy()
        phase = np.exp(1j * rng.uniform(0, 2 * np.pi, len(cat)))
        e = (np.asarray(cat["e1"]) + 1j * np.asarray(cat["e2"])) * phase
        cat["e1"], cat["e2"] = e.real, e.imag
        g = wlcnn.grid_table(cat, config)
        n_k, _ = _radial_mean(np.abs(_emode_spectrum(g[0], g[1], shape)) ** 2, kmod, edges)
        s_sum += np.nan_to_num(s_k)
        n_sum += np.nan_to_num(n_k)
        if bar:
            bar.update()
    if n == 0:
        raise ValueError("no clusters to fit the Wiener filter on")
    centres = np.sqrt(edges[:-1] * edges[1:])
    filled = counts > 0  # the lowest annuli of a log grid can hold no mode
    return WienerFilter(centres[filled], s_sum[filled] / n, n_sum[filled] / n, shape, n)


def wiener_mosaic(grid, wiener, config=PAPER):
    """Wiener-filtered KS93 of a gridded catalog (≥2, npix, npix), on the mosaic grid.

    Notes
    -----
    κ̂_WF(k) = W(|k|) D̂*(k) ε̂(k): the Kaiser & Squires (1993) E mode times
    W = S / (S + N) on the same padded grid, then the block mean of
    ``wlcnn.mosaic_truth``.  The minimum-variance linear estimate of a
    Gaussian field: it damps the scales where noise dominates.
    """
    grid = np.asarray(grid, dtype=np.float64)
    shape = tuple(wiener.shape)
    f = _emode_spectrum(grid[0], grid[1], shape) * wiener.transfer(_wavenumber(shape))
    kappa = scipy.fft.irfft2(f, s=shape)[:config.npix, :config.npix]
    return wlcnn.mosaic_truth(kappa, config)


SS95_TOL = 1e-4        # max |Δκ| between iterations: 0.1 % of a typical cluster κ
SS95_MAX_ITER = 30     # cap on the iterations
SS95_MIN_FACTOR = 0.1  # floor of (1 − κ): caps the correction at 10× where κ → 1


def ks93_reduced_iterative(grid, config=PAPER, fwhm_arcmin=0.0, tol=SS95_TOL,
                           max_iter=SS95_MAX_ITER, min_factor=SS95_MIN_FACTOR, return_info=False):
    """Nonlinear KS93 inversion of the reduced shear (Seitz & Schneider 1995).

    ``grid`` (≥2, npix, npix): ε̄1, ε̄2 estimate the reduced shear g = γ / (1 − κ).
    ``fwhm_arcmin``: Gaussian smoothing S of κ at every step (the KS93 choice).
    Stops when max |κ_{n+1} − κ_n| < ``tol`` or after ``max_iter`` steps;
    ``return_info`` adds ``{"n_iter", "converged", "last_change"}``.

    Notes
    -----
    From κ_0 = KS93(g) (the weak limit γ ≈ g), iterate κ_{n+1} = S[KS93(g (1 − κ_n))],
    with (1 − κ) floored at ``min_factor`` where noise or a strong-lensing core
    drives κ to 1.  KS93 fixes the zero-mean mass sheet of the padded field;
    another sheet would give another fixed point (the mass-sheet degeneracy).
    """
    grid = np.asarray(grid, dtype=np.float64)
    g1, g2 = grid[0], grid[1]
    kappa = wlcnn.smooth_map(wlcnn.ks93(g1, g2), fwhm_arcmin, config)
    change, n_iter = np.inf, 0
    while n_iter < max_iter and change >= tol:
        factor = np.maximum(1.0 - kappa, min_factor)
        new = wlcnn.smooth_map(wlcnn.ks93(g1 * factor, g2 * factor), fwhm_arcmin, config)
        change = float(np.max(np.abs(new - kappa)))
        kappa, n_iter = new, n_iter + 1
    out = wlcnn.mosaic_truth(kappa, config)
    if return_info:
        return out, {"n_iter": n_iter, "converged": change < tol, "last_change": change}
    return out


def baseline_methods(config=PAPER, ks93_fwhm_arcmin=0.0, wiener=None, ss95=True,
                     ks93_paper_like=()):
    """The baselines as methods for ``wlcnn.evaluate_methods``: name -> ``fn(grid) -> map``.

    "KS93" smoothed at ``ks93_fwhm_arcmin``; "KS93 (F′, paper-like)" for each F of
    ``ks93_paper_like``; "Wiener" if a :class:`WienerFilter` is given; "KS93-SS95"
    (:func:`ks93_reduced_iterative`, the first smoothing) if ``ss95``.

    Notes
    -----
    The paper does not give its KS93 smoothing. On our skies a 3-4′ FWHM brings KS93's
    R and M_pred/M_truth to the paper's (0.25, 0.48): an inference, labelled as one.
    """
    methods = {"KS93": lambda grid: wlcnn.ks93_mosaic(grid, config, ks93_fwhm_arcmin)}
    for fwhm in ks93_paper_like:
        methods[f"KS93 ({fwhm:g}′, paper-like)"] = (
            lambda grid, f=float(fwhm): wlcnn.ks93_mosaic(grid, config, f))
    if wiener is not None:
        methods["Wiener"] = lambda grid: wiener_mosaic(grid, wiener, config)
    if ss95:
        methods["KS93-SS95"] = lambda grid: ks93_reduced_iterative(grid, config, ks93_fwhm_arcmin)
    return methods


# ## Tables
def _markdown_cells(row):
    def f(key, digits=3):
        return f"{row[key]:.{digits}f}".replace("-", "−")
    return (f"{f('R')} ± {f('R_err')}", f"{f('D', 2)} ± {f('D_err', 2)}",
            f"{f('M_ratio')} (+{f('M_plus')}/−{f('M_minus')})",
            f"{f('dpeak', 2)} (+{f('dpeak_plus', 2)}/−{f('dpeak_minus', 2)})",
            str(int(row["n_clusters"])))


def table_markdown(rows, paper=wlcnn.PAPER_TABLE2, notes=()):
    """Markdown of Table 2 rows (from ``wlcnn.table2``), the paper's rows below them.

    ``paper`` (``wlcnn.PAPER_TABLE2`` or None) rows are marked "(paper)";
    ``notes`` are listed under the table.
    """
    head = ("Method", "R", "D", "M_pred/M_truth", "Δ_peak [pixel]", "N")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    named = [(row["method"], row) for row in rows]
    named += [(f"{name} (paper)", row) for name, row in (paper or {}).items()]
    lines += ["| " + " | ".join((name,) + _markdown_cells(row)) + " |" for name, row in named]
    if notes:
        lines += [""] + [f"* {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_table(rows, out_dir, name="table2", paper=wlcnn.PAPER_TABLE2, notes=()):
    """Write Table 2 rows as ``{name}.csv`` and ``{name}.md`` in the existing ``out_dir``.

    The CSV holds this run's methods alone, one row each, with exactly
    ``wlcnn.TABLE2_COLUMNS``; the Markdown is :func:`table_markdown`.
    Returns the paths of the two files.
    """
    csv_path = _write_csv(rows, os.path.join(out_dir, f"{name}.csv"), wlcnn.TABLE2_COLUMNS)
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(md_path, "w") as fh:
        fh.write(table_markdown(rows, paper, notes))
    return csv_path, md_path


def _write_csv(rows, path, columns=None):
    """Rows (dicts) as CSV, floats to 6 digits; ``columns`` default: every key, first seen first."""
    columns = list(dict.fromkeys(k for row in rows for k in row)) if columns is None else columns
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v
                             for k, v in row.items()})
    return path


def cluster_rows(results):
    """Per-cluster values behind Figs. 6-8: index, M_truth, and each method's M and Δ_peak."""
    m_t, _ = wlcnn.cluster_masses(results.truth, results.truth)
    rows = [{"index": int(i), "M_truth": float(m)} for i, m in zip(results.index, m_t)]
    for name in results.methods:
        _, m_p = wlcnn.cluster_masses(results.truth, results.maps[name])
        d = wlcnn.centroid_offsets(results.truth, results.maps[name])
        for row, mp, dd in zip(rows, m_p, d):
            row[f"M_{name}"], row[f"dpeak_{name}"] = float(mp), float(dd)
    return rows


#: Equal-count bins of the truth's M_cl in mass_bias.csv (figures.py draws them as Fig. 6's
#: mass bias).
MASS_BINS = 5


def mass_bias_rows(results, n_bins=MASS_BINS):
    """M_pred/M_truth and catastrophic centroids of every method in equal-count bins of the
    truth's M_cl (§3.3-3.4, Figs. 6-8).

    One row a bin: its M_truth range and median, and for each method the median
    ratio with its 16th and 84th percentiles over the bin's clusters, and the fraction
    of its clusters with Δ_peak > ``wlcnn.CATASTROPHIC_PIX`` (``{method}_catastrophic``).
    """
    n_bins = int(n_bins)
    m_t, _ = wlcnn.cluster_masses(results.truth, results.truth)
    ratios = {name: wlcnn.cluster_masses(results.truth, results.maps[name])[1] / m_t
              for name in results.methods}
    offsets = {name: wlcnn.centroid_offsets(results.truth, results.maps[name])
               for name in results.methods}
    rows = []
    for chunk in np.array_split(np.argsort(m_t), n_bins):
        if not chunk.size:
            continue
        row = {"M_truth_min": float(m_t[chunk].min()), "M_truth_max": float(m_t[chunk].max()),
               "M_truth_median": float(np.median(m_t[chunk])), "n_clusters": int(chunk.size)}
        for name, ratio in ratios.items():
            lo, mid, hi = np.percentile(ratio[chunk], [16, 50, 84])
            row.update({f"{name}": float(mid), f"{name}_p16": float(lo),
                        f"{name}_p84": float(hi),
                        f"{name}_catastrophic": float(np.mean(
                            offsets[name][chunk] > wlcnn.CATASTROPHIC_PIX))})
        rows.append(row)
    return rows


# ## Report
def _warn(notes, message):
    """Warn now and keep the message for the report."""
    warnings.warn(message, stacklevel=3)
    notes.append(message)


def write_report(results, out_dir, meta=None, notes=(), paper=wlcnn.PAPER_TABLE2,
                 extra_tables=None, overwrite=False):
    """Write the report of an Evaluation: Table 2, per-cluster values, report.json and the
    evaluation itself (evaluation.npz, ``wlcnn.save_evaluation``) for ``figures.py``.

    ``meta`` (facts) and ``notes`` (caveats, also listed under Table 2) go to
    ``report.json``; ``extra_tables`` (name -> rows) to CSV files.  Everything is
    written into a temporary directory beside ``out_dir``, then renamed: a crash
    leaves no half-written report.  With ``overwrite`` the old report is deleted
    once the new one is in place.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} exists (pass overwrite=True to replace it)")
    notes = list(notes)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        rows = wlcnn.table2(results)
        write_table(rows, tmp, "table2", paper, notes=notes)
        for name, extra_rows in (extra_tables or {}).items():
            _write_csv(extra_rows, os.path.join(tmp, f"{name}.csv"))
        _write_csv(cluster_rows(results), os.path.join(tmp, "clusters.csv"))
        wlcnn.save_evaluation(results, os.path.join(tmp, "evaluation.npz"))
        summary = {"table": rows, "n_clusters": len(results.truth),
                   "n_pixels": int(np.isfinite(results.truth).sum()), "methods": results.methods,
                   "notes": notes, "meta": meta or {}}
        with open(os.path.join(tmp, "report.json"), "w") as fh:
            json.dump(summary, fh, indent=1, default=str)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        old = tmp + ".old"  # as unique as tmp, and hidden beside out_dir like it
        if os.path.exists(out_dir):
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ## Evaluate: a dataset's test split, every method on the same pixels
def _model_groups(paths):
    """Method name -> models for the ``--models`` paths.

    A path written ``NAME=PATH`` is a row of its own, named NAME (a quick and a
    paper-scale model side by side).  The other paths are pooled: "CNN" when
    they share one variant (their runs averaged), else a row per variant (Table 3
    of Appendix A).
    """
    labelled, pooled = {}, {}
    for path in map(os.fspath, paths):
        name, sep, where = path.partition("=")
        if sep and not os.path.exists(path):
            if not name or name in labelled:
                raise ValueError(f"--models {path!r}: a row needs a name of its own")
            labelled[name] = wlcnn.load_runs(where)
        else:
            models = wlcnn.load_runs(path)
            pooled.setdefault(wlcnn.model_info(models[0])["variant"], []).extend(models)
    if len(pooled) == 1:
        pooled = {"CNN": sum(pooled.values(), [])}
    clash = set(pooled) & set(labelled)
    if clash:
        raise ValueError(f"--models: row name(s) {sorted(clash)} given twice")
    return {**pooled, **labelled}


def models_sha256(models):
    """SHA-256 of the models' weights, in order: what a CNN mosaic depends on besides its grid."""
    h = hashlib.sha256()
    for model in models:
        for w in model.get_weights():
            h.update(repr(w.shape).encode() + np.ascontiguousarray(w, np.float32).tobytes())
    return h.hexdigest()


def evaluate_directory(data_dir, model_paths, out_dir, stride=12, orientations=1, limit=None,
                       n_val_smoothing=50, wiener=True, ss95=True, overwrite=False,
                       progress=True, command=None, cache=None, ks93_paper_like=()):
    """Table 2 for a dataset's test split, its report written to ``out_dir``.

    ``model_paths``: run directories or model files (``wlcnn.load_runs``),
    several variants giving a row each.  ``stride`` and ``orientations`` 12 and 1
    make the quick mosaic (100 subfields a cluster), 3 and 6 the paper's (8,664).
    ``limit``: the first test clusters only.  ``cache``: a directory keeping each
    CNN mosaic (``wlcnn.cached_method``), keyed by the weights, stride and
    orientations; a rerun reads them back.  The KS93 smoothing is chosen on
    ``n_val_smoothing`` validation clusters (``ks93_paper_like``: rows at other FWHMs,
    :func:`baseline_methods`), the Wiener spectra fitted on the
    training clusters (else the validation ones, with a warning).  Returns the
    Table 2 rows.
    """
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} exists (pass overwrite=True to replace it)")
    notes = []
    ds = wlcnn.ClusterDataset(data_dir)
    config = ds.config
    groups = _model_groups(model_paths)
    grid = {"subfield_npix": config.subfield_npix, "output_npix": config.output_npix}
    for name, models in groups.items():
        if any({k: wlcnn.model_info(m)["config"][k] for k in grid} != grid for m in models):
            raise ValueError(f"model {name} was built for another grid than the dataset's")
    n_test = ds.count("test")
    if n_test == 0:
        raise ValueError(f"{ds.path} has no test clusters")
    fwhm, smoothing_rows = wlcnn.choose_ks93_smoothing(ds.clusters("val"), config=config,
                                                       limit=n_val_smoothing, progress=progress)
    wiener_split, wf = None, None
    if wiener:
        # the validation clusters chose the KS93 smoothing already: never the test clusters
        wiener_split = "train" if ds.count("train") else "val"
        if wiener_split == "val":
            _warn(notes, "Wiener spectra fitted on the validation clusters: the dataset has no "
                         "training split.")
        wf = fit_wiener(ds.clusters(wiener_split), config, progress=progress)
    methods = baseline_methods(config, fwhm, wf, ss95, ks93_paper_like)
    for name, models in groups.items():
        methods[name] = wlcnn.cnn_method(models, config, stride=stride, orientations=orientations)
        if cache is not None:
            key = f"{models_sha256(models)[:16]}-stride{stride}-orient{orientations}"
            methods[name] = wlcnn.cached_method(methods[name], os.path.join(cache, key))
    total = n_test if limit is None else min(limit, n_test)
    clusters = itertools.islice(ds.clusters("test"), total)
    results = wlcnn.evaluate_methods(clusters, methods, config, total=total, progress=progress)
    meta = {"command": command, "data": os.fspath(data_dir),
            "models": [os.fspath(p) for p in model_paths], "stride": stride,
            "orientations": orientations, "ks93_fwhm_arcmin": fwhm,
            "ks93_paper_like_fwhm_arcmin": list(ks93_paper_like), "wiener_split": wiener_split,
            "n_test_clusters": total, "wlcnn": wlcnn.__version__}
    write_report(results, out_dir, meta=meta, notes=notes, overwrite=overwrite,
                 extra_tables={"ks93_smoothing": smoothing_rows,
                               "mass_bias": mass_bias_rows(results)})
    return wlcnn.table2(results)


def main(argv=None):
    """Evaluate models against the baselines on a dataset's test split; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        rows = evaluate_directory(
            args.data, args.models, args.out, stride=args.stride, orientations=args.orientations,
            limit=args.limit, n_val_smoothing=args.n_val_smoothing, wiener=not args.no_wiener,
            ss95=not args.no_ss95, overwrite=args.overwrite,
            cache=args.cache, ks93_paper_like=args.ks93_paper_like,
            command="python examples/evaluate_table2.py " + shlex.join(argv))
    except (ValueError, TypeError, OSError) as exc:
        print(f"evaluate_table2: error: {exc}", file=sys.stderr)
        return 2
    print(table_markdown(rows, paper=None))
    print(f"report: {args.out}; its figures: python examples/figures.py {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
