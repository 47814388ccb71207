"""El Gordo-like: a synthetic HST catalog of a merging cluster, reconstructed end to end.

Title: the §4.2 application on a synthetic El Gordo
Description: two NFW clumps at z = 0.87 in sky coordinates → reconstruct_catalog → are both
clumps found, how high are the peaks, how many spurious peaks?

§4.2 of Hong et al. (2021) applies the CNN, trained on 32′ fields at z_l = 0.5,
z_s = 1.5 and 25 sources/arcmin², to the HST catalog of El Gordo
(ACT-CL J0102−4915): a ~9′ field, z_l = 0.87, effective z_s ≈ 1.2, ~95
sources/arcmin².  That catalog is not public, so this example makes one like
it, with a known truth, and runs it through what an observer would run,
`python examples/reconstruct_catalog.py catalog.fits --models … --out kappa.fits`:

    python examples/el_gordo_like.py    # --models examples/ks93_start_run
    # the paper's mosaic:
    python examples/el_gordo_like.py --models runs/quick --stride 3 --orientations 6

Without a trained model it falls back to an untrained one, so that the chain
runs; its CNN numbers then mean nothing.  The last line printed is a JSON
object of the figures.

With the shipped KS93-start model (one run; 50 s on 2 cores, seed 2014): KS93
(smoothed 0.63′ by the density rule) finds both clumps, the CNN the NW one
(its SE peak lies 0.50′ off, a shoulder of the NW peak); peak κ CNN 0.259 / 0.199,
KS93 0.337 / 0.279, truth 0.516 / 0.439; spurious 3σ peaks CNN 0, KS93 1,
the CNN with the outside of the field left empty 0.
"""
# ## Setup
import argparse
import dataclasses
import json
import pathlib
import sys
import warnings

import cli  # the command-line conventions; no TensorFlow


def build_parser():
    """The command line of this example."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None,
                   help="run directories or .keras files (default: examples/ks93_start_run)")
    p.add_argument("--field-arcmin", type=float, default=10.0,
                   help="side of the HST-like field (§4.2: ~9′)")
    p.add_argument("--density", type=float, default=95.0, help="sources per arcmin² (§4.2: ~95)")
    p.add_argument("--stride", type=int, default=12, help="mosaic offset step (paper: 3)")
    p.add_argument("--orientations", type=int, default=1, choices=[1, 6], help="paper: 6")
    p.add_argument("--seed", type=int, default=2014)
    p.add_argument("--out", type=cli.output_dir, default="out/el_gordo_like",
                   help="directory for the catalog, FITS and PNG, created with its parents if "
                        "missing")
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import keras  # noqa: E402  (after the command line: see above)
import numpy as np  # noqa: E402
import scipy.ndimage  # noqa: E402
from astropy import units as u  # noqa: E402
from astropy.table import Table  # noqa: E402

import skies  # noqa: E402
import wlcnn  # noqa: E402

EL_GORDO = (15.72, -49.25)      # RA, Dec of ACT-CL J0102−4915, degrees
Z_LENS, Z_SOURCE = 0.87, 1.2    # cluster; effective source redshift (§4.2)
# Jee et al. (2014, ApJ 785, 20), HST weak lensing: two subclusters 0.7 Mpc apart
# (projected) along the NW-SE axis, M200c = (1.38 ± 0.22) and (0.78 ± 0.20) × 10¹⁵ M☉.
CLUMPS = {"NW": 1.38e15, "SE": 0.78e15}
SEPARATION_MPC = 0.7
AXIS_DEG = 45.0                 # direction of NW from SE, counter-clockwise from West (x) to North
RECOVERED_ARCMIN = 0.5          # a clump is recovered if its map peak lies this close to the truth
OUTSKIRTS_ARCMIN = 2.0          # "outside the clumps": beyond 2′ (0.9 Mpc at z = 0.87) of both
# spurious peaks: local maxima this many σ above the outskirts' median
PEAK_SIGMA = 3.0
DEFAULT_MODELS = pathlib.Path(__file__).resolve().parent / "ks93_start_run"


# ## Data: two NFW clumps on the sky, and the catalog they lens
class Cluster:
    """The two clumps on the tangent plane about El Gordo (x West, y North, arcsec).

    They sit ±0.35 Mpc from El Gordo's position along the NW-SE axis;
    concentrations from Duffy et al. (2008) at z = 0.87.
    """

    def __init__(self, cosmo):
        self.cosmo = cosmo
        d_a = cosmo.angular_diameter_distance(Z_LENS).to_value(u.Mpc)
        self.arcsec_per_mpc = 1.0 / (d_a * np.radians(1 / 3600))
        axis = np.array([np.cos(np.radians(AXIS_DEG)), np.sin(np.radians(AXIS_DEG))])
        self.half_sep = 0.5 * SEPARATION_MPC * self.arcsec_per_mpc
        self.xy = {"NW": axis * self.half_sep, "SE": -axis * self.half_sep}
        self.c = {k: float(skies.concentration_duffy08(m, Z_LENS))
                  for k, m in CLUMPS.items()}
        self.plane = skies.tangent_plane_wcs(EL_GORDO)
        self.sky = {k: tuple(float(v) for v in self.plane.pixel_to_world_values(*xy))
                    for k, xy in self.xy.items()}

    def kappa_gamma(self, x, y):
        """Analytic κ and γ of both clumps at (x, y) arcsec (Wright & Brainerd 2000)."""
        sc = wlcnn.sigma_crit(Z_LENS, Z_SOURCE, self.cosmo).value
        kappa, gamma = 0.0, 0.0
        for k, m in CLUMPS.items():  # κ and γ add; the reduced shear does not
            dx, dy = x - self.xy[k][0], y - self.xy[k][1]
            r_mpc = np.maximum(np.hypot(dx, dy), 0.1) / self.arcsec_per_mpc  # 0.1″: a finite cusp
            sigma = wlcnn.nfw_sigma(r_mpc, m, self.c[k], Z_LENS, self.cosmo)
            gamma_t = (wlcnn.nfw_mean_sigma(r_mpc, m, self.c[k], Z_LENS, self.cosmo) - sigma) / sc
            kappa = kappa + sigma / sc
            gamma = gamma - gamma_t * np.exp(2j * np.arctan2(dy, dx))  # tangential about the clump
        return kappa, gamma


def write_catalog(cluster, args, rng, path, cfg=wlcnn.PAPER):
    """Sources lensed by eq. 7 with shape and measurement noise, at one source redshift.

    The real catalog has a redshift distribution and cluster members (§4.2's
    second mismatch), not modelled here.  Returns the number of sources.
    """
    half = args.field_arcmin * 30.0
    n = int(rng.poisson(args.density * args.field_arcmin**2))
    x, y = rng.uniform(-half, half, n), rng.uniform(-half, half, n)
    kappa, gamma = cluster.kappa_gamma(x, y)
    g = wlcnn.reduced_shear(gamma.real, gamma.imag, kappa)
    eps = wlcnn.lens_ellipticity(wlcnn.draw_intrinsic_ellipticity(n, cfg.sigma_e, rng), g)
    sigma_meas = wlcnn.measurement_error(wlcnn.draw_magnitudes(n, cfg, rng), cfg)
    eps = eps + (rng.normal(0.0, 1.0, n) + 1j * rng.normal(0.0, 1.0, n)) * sigma_meas
    ra, dec = cluster.plane.pixel_to_world_values(x, y)
    eps = eps * np.exp(-2j * skies.local_north_angle(ra, dec, cluster.plane))
    sigma = np.sqrt(cfg.sigma_e**2 + sigma_meas**2)
    Table({"ra": ra, "dec": dec, "e1": eps.real, "e2": eps.imag, "weight": 1.0 / sigma**2}).write(
        path, overwrite=True)
    return n


# ## Model: the shipped model, or an untrained stand-in
def load_models(paths, seed):
    paths = [pathlib.Path(p) for p in paths]
    if all(p.exists() for p in paths):
        return [m for p in paths for m in wlcnn.load_runs(p)], True
    print(f"note: no trained model at {', '.join(map(str, paths))}; using an UNTRAINED 5×5-filter "
          "model so that the example runs end to end: its CNN numbers mean nothing.  Train one "
          "with `python examples/train.py` and pass --models.", file=sys.stderr)
    keras.utils.set_random_seed(seed)
    return [wlcnn.build_model(dataclasses.replace(wlcnn.PAPER, filter_size=5), "Fiducial")], False


# ## Evaluate
def spurious_peaks(m, outskirts, sigma_noise):
    """Local maxima (3 × 3) in the outskirts more than PEAK_SIGMA σ above their median."""
    local_max = m == scipy.ndimage.maximum_filter(m, size=3, mode="constant", cval=-np.inf)
    high = m - np.median(m[outskirts]) > PEAK_SIGMA * sigma_noise
    return int(np.sum(local_max & outskirts & high))


def main(argv=None):
    """Make the catalog, reconstruct it twice, and compare with the truth; returns 0."""
    args = build_parser().parse_args(argv)
    args.models = [str(DEFAULT_MODELS)] if args.models is None else args.models
    rng = np.random.default_rng(args.seed)
    cfg = wlcnn.PAPER
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(wlcnn.cosmology(cfg))
    catalog_path = out / "catalog.fits"
    n = write_catalog(cluster, args, rng, catalog_path, cfg)
    sep_arcmin = 2 * cluster.half_sep / 60
    print(f"catalog: {n} sources in {args.field_arcmin:g}′ × {args.field_arcmin:g}′ "
          f"({n / args.field_arcmin**2:.1f} arcmin⁻²); clumps NW {CLUMPS['NW']:.2e} M☉ "
          f"(c = {cluster.c['NW']:.2f}), SE {CLUMPS['SE']:.2e} M☉ (c = {cluster.c['SE']:.2f}), "
          f"{SEPARATION_MPC} Mpc = {sep_arcmin:.2f}′ apart")
    models, trained = load_models(args.models, args.seed)
    info = wlcnn.model_info(models[0])
    print(f"models: {len(models)} run(s) of {info['variant']}{'' if trained else ' (untrained)'}")

    # Twice: as the command does by default (beyond the 10′ field the 32′ input
    # holds shear-free noise at the catalog's density, `--outside noise`), and
    # with the input left empty there (`--outside empty`), which the network
    # never saw in training: the difference is this example's lesson.
    opts = skies.ReconstructOptions(
        center=EL_GORDO, size_arcmin=args.field_arcmin, z_lens=Z_LENS, z_source=Z_SOURCE,
        stride=args.stride, orientations=args.orientations, seed=args.seed, overwrite=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        res = skies.reconstruct(catalog_path, models, out / "kappa.fits", opts)
        empty = skies.reconstruct(catalog_path, models, out / "kappa_empty.fits",
                                  dataclasses.replace(opts, outside="empty", png=False))
    for w in caught[:len(caught) // 2]:  # the second call repeats the first's notes
        print(f"note: {w.message}", file=sys.stderr)
    print(f"wrote {res.path}" + (f" and {res.png_path}" if res.png_path else "") + f", {empty.path}"
          f" (KAPPA_KS93 smoothed by {res.ks93_fwhm_arcmin:.2f}′, the catalog's density rule)")

    # Truth at the map's resolution: pixel-averaged NFW κ on the field's 3.84″
    # input pixels, then the mean over each 11.52″ map pixel, as the maps average.
    geo = res.geometry
    corner = geo.npix / 2 * geo.pixel_arcsec  # arcsec from the lower-left corner to the centre
    truth_fine = sum(wlcnn.nfw_kappa_map(CLUMPS[k], cluster.c[k], corner + cluster.xy[k][0],
                                         corner + cluster.xy[k][1], cfg.pool * geo.npix,
                                         cfg.pixel_arcsec, z_l=Z_LENS, z_s=Z_SOURCE,
                                         cosmo=cluster.cosmo) for k in CLUMPS)
    truth = wlcnn.block_mean(truth_fine, cfg.pool)
    maps = {"truth": truth, "CNN": res.kappa_cnn, "KS93": res.kappa_ks93,
            "CNN-empty": empty.kappa_cnn}

    # Are both clumps recovered?  Each clump's position goes through the FITS WCS
    # to map pixels; a map's peak for a clump is its highest pixel within half the
    # separation of it (the clumps never claim the same pixel).
    pix_arcmin = geo.pixel_arcsec / 60
    jj, ii = np.meshgrid(np.arange(geo.npix), np.arange(geo.npix))
    clump_pix = {k: res.wcs.world_to_pixel_values(*cluster.sky[k]) for k in CLUMPS}
    dist_arcmin = {k: np.hypot(jj - px, ii - py) * pix_arcmin for k, (px, py) in clump_pix.items()}
    summary = {"n_sources": res.counts["used"], "density_arcmin2": n / args.field_arcmin**2,
               "field_arcmin": geo.side_arcmin, "trained_model": trained, "n_runs": len(models),
               "variant": info["variant"], "ks93_fwhm_arcmin": res.ks93_fwhm_arcmin, "clumps": {}}
    print(f"\n{'clump':<6}{'map':<10}{'offset′':>9}{'found':>7}{'peak κ':>9}")
    for k in CLUMPS:
        near = dist_arcmin[k] <= 0.5 * sep_arcmin
        row = {"ra": cluster.sky[k][0], "dec": cluster.sky[k][1]}
        for name, m in maps.items():
            i, j = np.unravel_index(np.nanargmax(np.where(near, m, -np.inf)), m.shape)
            off = float(dist_arcmin[k][i, j])
            key = name.lower().replace("-", "_")
            row[f"kappa_{key}"] = float(m[i, j])
            if name != "truth":
                row[f"offset_{key}_arcmin"] = off
                row[f"recovered_{key}"] = off <= RECOVERED_ARCMIN
            found = "" if name == "truth" else ("yes" if off <= RECOVERED_ARCMIN else "NO")
            print(f"{k:<6}{name:<10}{off:>9.2f}{found:>7}{m[i, j]:>9.3f}")
        summary["clumps"][k] = row

    # Spurious peaks in the outskirts (beyond 2′ of both clumps; the truth has none
    # there).  σ: the KS93 noise of this catalog, from the same catalog with every
    # shape turned by 45° (ε → iε: the signal goes to the B mode, the noise stays).
    with warnings.catch_warnings():  # the same rows as above, already reported
        warnings.simplefilter("ignore", skies.CatalogWarning)
        sky = skies.read_catalog(catalog_path)
    px, py, e1, e2 = skies.project_catalog(sky, EL_GORDO)
    noise_grid = skies.grid_field(px, py, -e2, e1, sky.sigma, geo)
    sigma_noise = float(np.std(skies.ks93_field_map(noise_grid, geo,
                                                    res.ks93_fwhm_arcmin)))
    outskirts = np.logical_and.reduce([d > OUTSKIRTS_ARCMIN for d in dist_arcmin.values()])
    spurious = {name: spurious_peaks(m, outskirts, sigma_noise) for name, m in maps.items()}
    print(f"\nspurious peaks above {PEAK_SIGMA:g}σ (σ = {sigma_noise:.4f}, the KS93 noise) "
          f"beyond {OUTSKIRTS_ARCMIN:g}′ of both clumps ({outskirts.mean():.0%} of the field): "
          f"CNN {spurious['CNN']}, KS93 {spurious['KS93']} (truth {spurious['truth']}; "
          f"CNN with an empty outside {spurious['CNN-empty']})")
    medians = {k: float(np.median(m[outskirts])) for k, m in maps.items()}
    print("median κ over the outskirts: " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))
    summary.update(sigma_noise=sigma_noise, outskirts_fraction=float(outskirts.mean()),
                   fill_error=res.fill["err"],
                   **{f"spurious_{k.lower().replace('-', '_')}": v for k, v in spurious.items()},
                   **{f"outskirts_median_{k.lower().replace('-', '_')}": v
                      for k, v in medians.items()})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
