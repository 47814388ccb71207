"""Mass maps of a real shear catalog: sky coordinates in, FITS out (§4.2).

Title: reconstruct a cluster from a shear catalog
Description: the §4.2 application of Hong et al. (2021) as a command; the library
is examples/skies.py (:func:`skies.reconstruct`).

§4.2 applies the CNN, trained on 32′ fields, to the ~9′ HST catalog of El Gordo.
This script does the same for any catalog of (RA, Dec, e1, e2, weight):

    python examples/reconstruct_catalog.py catalog.fits --models examples/ks93_start_run \\
        --out kappa.fits

It writes KAPPA_CNN (mean of the runs), KAPPA_CNN_STD (their spread),
KAPPA_KS93 and DENSITY on one grid of 11.52″ pixels with a celestial WCS
(North up, East left), and a Fig. 11-like PNG beside it.  On a 10′ catalog
of 95 sources/arcmin² with the shipped KS93-start model it takes under a minute
(examples/el_gordo_like.py).  A catalog that fits one 32′ network input is
reconstructed from that one input: the default field is then the 26.1′ one
input predicts (at the default stride), the sources beyond it the input's
context; wider catalogs are mosaics of abutting inputs.

Conventions it reads:

* (e1, e2) in the "euclidean" frame (default): e1 > 0 along x = local West,
  e2 > 0 along x = y (North-West).  `--coordinate-system celestial` reads
  x towards East (RA increasing): the mirrored axis flips e2 (CLMM's names,
  arXiv:1407.7676 §5.1).  Either way the axes are the local West/East and
  North at each source, as shear catalogs are published.
* weight w = 1/σ², σ the per-component ellipticity error (shape noise and
  measurement error), or `--sigma-col`.  The network reads σ (its Δε input
  channel), so the weights' absolute scale matters: it is checked against
  the catalog's own dispersion, ⟨w (e1² + e2²)/2⟩ = 1, and rescaled to it
  unless `--keep-weights`.
* Every catalog source inside a network input is used, also beyond the
  output field; where the catalog has none the input holds shear-free noise
  at the catalog's density (`--outside noise`, default) or no-data pixels
  (`--outside empty`).
"""
# ## Setup
import argparse
import os
import sys
import warnings

import cli  # the command-line conventions; no TensorFlow


def _parse_center(text):
    """``--center``: "RA,DEC" in degrees, or sexagesimal "HH:MM:SS.s,±DD:MM:SS"."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--center takes RA,DEC, got {text!r}")
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    from astropy import units as u  # sexagesimal only: astropy loads in a second
    from astropy.coordinates import SkyCoord
    try:
        c = SkyCoord(parts[0], parts[1], unit=(u.hourangle, u.deg))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--center: cannot read {text!r} as degrees or "
                                         "HH:MM:SS,±DD:MM:SS") from None
    return float(c.ra.deg), float(c.dec.deg)


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(
        description="mass maps of a shear catalog in sky coordinates (§4.2)",
        epilog="Unusable rows (an entry that is NaN, empty or not a number, weight <= 0, "
               "|e| >= 1) are dropped and counted by reason in one note and the FITS header; "
               "a missing column, or one with no number at all, is an error that names it.")
    p.add_argument("catalog",
                   help="FITS, CSV or ECSV table: RA, Dec (deg), e1, e2, weight or sigma")
    p.add_argument("--models", required=True, nargs="+", help="run directories or .keras files")
    p.add_argument("--out", required=True, type=cli.output_file,
                   help="output FITS (KAPPA_CNN, KAPPA_CNN_STD, KAPPA_KS93, DENSITY); "
                        "a PNG like Fig. 11 goes beside it")
    p.add_argument("--ra-col", default="ra",
                   help="RA column in degrees (names match case-insensitively)")
    p.add_argument("--dec-col", default="dec", help="Dec column in degrees")
    p.add_argument("--e1-col", default="e1")
    p.add_argument("--e2-col", default="e2")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weight-col", default=None,
                   help="inverse-variance weight, σ = 1/sqrt(w) (default: weight)")
    g.add_argument("--sigma-col", default=None,
                   help="per-component ellipticity error instead of a weight")
    p.add_argument("--keep-weights", action="store_true",
                   help="use the weights as given "
                        "(default: scale them so that <w (e1²+e2²)/2> = 1)")
    p.add_argument("--coordinate-system", default="euclidean", choices=("euclidean", "celestial"),
                   help="frame of e1, e2 (CLMM): euclidean = x West (default), celestial = x East")
    p.add_argument("--center", type=_parse_center, default=None,
                   help="field centre RA,DEC in degrees or HH:MM:SS,DD:MM:SS (default: the "
                        "catalog's; write --center=RA,-DEC for a negative first value)")
    p.add_argument("--size", type=float, default=None,
                   help="field side in arcmin (default: the catalog's extent; a catalog that "
                        "fits one 32′ network input gets the 26.1′ that input predicts, "
                        "one tile)")
    p.add_argument("--z-lens", type=float, default=None,
                   help="cluster redshift (default: the training's)")
    p.add_argument("--z-source", type=float, default=None,
                   help="effective source redshift (default: the training's)")
    p.add_argument("--stride", type=int, default=12,
                   help="offset step in input pixels, a multiple of 3 (paper: 3 = 1,444 offsets)")
    p.add_argument("--orientations", type=int, default=1, choices=[1, 6], help="paper: 6")
    p.add_argument("--ks93-fwhm", type=float, default=None,
                   help="Gaussian smoothing of KAPPA_KS93, arcmin (default: 1.25 sqrt(25/n), n the "
                        "catalog's density in arcmin^-2)")
    p.add_argument("--outside", default="noise", choices=("noise", "empty"),
                   help="what the CNN sees where the catalog has no source: shear-free noise "
                        "at the catalog's density (default) or empty no-data pixels")
    p.add_argument("--fills", type=int, default=None,
                   help="noise fills averaged per run where a fill adds a source "
                        "(default: skies.NOISE_FILLS, 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise fills")
    p.add_argument("--no-png", action="store_true", help="skip the figure")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


def parse_args(argv=None):
    """The command line, with ``--out``'s directory and the inputs checked before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for path in (args.catalog, *args.models):  # before TensorFlow loads, not after
        if not os.path.exists(path):
            what = "catalog" if path == args.catalog else "--models"
            parser.error(f"{what}: {path} not found (no such file or directory)")
    return args


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import skies  # noqa: E402  (after the command line: see above)


# ## Evaluate
def _report(args, res):
    c, g, f = res.counts, res.geometry, res.fill
    print(f"{args.catalog}: {c['used']} sources in the field of {c['rows']} rows (dropped: "
          f"{c['dropped_nan']} NaN, {c['dropped_text']} not a number, {c['dropped_weight']} "
          f"bad weight, {c['dropped_ellipticity']} |e| >= {skies.MAX_ELLIPTICITY:g}; outside "
          f"the field: {c['context']} seen by the CNN, {c['unused']} unused)")
    print(f"field: {g.side_arcmin:.2f}′ about RA {res.center[0]:.5f}°, Dec {res.center[1]:.5f}° "
          f"({g.npix}² pixels of {g.pixel_arcsec:.2f}″, {g.n_tiles} tile(s), "
          f"{len(res.runs)} run(s))")
    w = res.weights
    print(f"weights: <w (e1²+e2²)/2> = {w['scale']:.3f}; multiplied by {w['factor']:.3f}")
    print(f"KAPPA_KS93 smoothed by {res.ks93_fwhm_arcmin:.2f}′ FWHM")
    if f["mode"] == "noise":
        print(f"no-data regions: shear-free noise at the catalog's density, {f['n']} fill(s) "
              f"where a fill adds (seed {f['seed']}; their noise left in KAPPA_CNN: "
              f"{f['err']:.4f} median)")
    else:
        print("no-data regions: empty (no-data pixels)")
    print(f"{f['passes']} mosaic pass(es) over tiles per run; {f['skipped']} tile(s) "
          "without sources skipped")
    print(f"wrote {res.path} ({', '.join(skies.MAP_EXTENSIONS)})"
          + (f" and {res.png_path}" if res.png_path else ""))


def options_from_args(args):
    """:class:`skies.ReconstructOptions` of the command line."""
    return skies.ReconstructOptions(
        ra_col=args.ra_col, dec_col=args.dec_col, e1_col=args.e1_col, e2_col=args.e2_col,
        weight_col=None if args.sigma_col else (args.weight_col or "weight"),
        sigma_col=args.sigma_col, coordinate_system=args.coordinate_system, center=args.center,
        size_arcmin=args.size, z_lens=args.z_lens, z_source=args.z_source, stride=args.stride,
        orientations=args.orientations, ks93_fwhm_arcmin=args.ks93_fwhm, outside=args.outside,
        n_fills=skies.NOISE_FILLS if args.fills is None else args.fills, seed=args.seed,
        rescale_weights=not args.keep_weights, png=not args.no_png, overwrite=args.overwrite,
        progress=True)


def main(argv=None):
    """Reconstruct a catalog into a FITS mass map; returns the exit status."""
    args = parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            res = skies.reconstruct(args.catalog, args.models, args.out, options_from_args(args))
    except (ValueError, TypeError, OSError) as exc:
        print(f"reconstruct_catalog: error: {exc}", file=sys.stderr)
        return 2
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"reconstruct_catalog: note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    _report(args, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
