"""
Title: Simulated training skies (cluster fields) for wlcnn
Description: Truth κ and γ of 32′ × 32′ cluster fields drawn from ΛCDM, written
as a wlcnn training dataset (paper §2.3.1).

The paper trains its network on cluster fields cut from the MassiveNuS
ray-traced convergence maps.  This script stands in for those maps with a
halo-model sky whose power spectrum and one-point PDF follow ΛCDM theory
(sim_stats.py: over 500 random fields the mean C_ℓ is within 2.1 % of theory
in every bin of ℓ = 500-10,000).  Each field, on a torus twice the field side, is

* a main cluster near the centre: a truncated, elliptical NFW halo with M200c
  drawn from the Tinker et al. (2008) mass function at z_l = 0.5, Duffy et al.
  (2008) concentrations with log-normal scatter, and in 30 % of the fields
  2-3 merging companions;
* field halos along the line of sight (3e13-3e15 M☉, 0 < z < z_s), a Poisson
  draw from the same mass function;
* a log-normal large-scale field carrying the rest of the halofit C_ℓ
  (the two-halo term and the halos below the mass cut);

and the shear is the Kaiser-Squires transform of κ on the torus (wlcnn's
``shear_from_kappa``), the modes larger than the torus added on a larger one.
The simulator is section 1 of examples/skies.py (:func:`skies.simulated_field`);
this script is its command line.  The ΛCDM tables (C_ℓ and mass function) are in
examples/theory/, made by make_theory_tables.py.

Run (510 fields, about 0.6 s of CPU each: some 5 min on one free core):

    python examples/simulate_skies.py --out data/quick --n-train 400 --n-val 50 --n-test 60 --seed 1

Lower-mass skies (issue 21's candidate c; the paper's range starts at 3e14 M☉):

    python examples/simulate_skies.py --out data/lowmass --main-m200-min 1e14 \
        --n-train 2000 --n-val 200 --n-test 0 --seed 7

The paper's split is the default (5,000 / 1,800 / 200); ``--workers`` runs
shards in parallel, ``--shard i/N`` one job of a batch array, and a rerun
resumes an interrupted dataset.
"""
# ## Setup
import argparse
import dataclasses
import functools
import sys

import cli  # the command-line conventions; no TensorFlow


def _shard_arg(text):
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/N, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/N needs 0 <= i < N, got {text!r}")
    return i, n


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description="simulate cluster fields into a wlcnn dataset (§2.3.1)")
    p.add_argument("--out", type=cli.output_dir, required=True,
                   help="dataset directory, created with its parents if missing; "
                        "a rerun resumes it")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--masks", action="store_true", help="bright-star masks (§3.5)")
    p.add_argument("--workers", type=int, default=1, help="processes making shards")
    p.add_argument("--shard-size", type=int, default=25, help="clusters per shard file")
    p.add_argument("--n-train", type=int, default=5000, help="paper: 5,000")
    p.add_argument("--n-val", type=int, default=1800, help="paper: 1,800")
    p.add_argument("--n-test", type=int, default=200, help="paper: 200")
    p.add_argument("--main-m200-min", type=float, default=None, metavar="MSUN",
                   help="lightest main cluster, M200c in M☉ (default 3e14, the paper-like "
                        "range); the manifest records it")
    p.add_argument("--shard", type=_shard_arg, default=None,
                   help="i/N: make only every N-th shard starting at i (a job of a batch array)")
    p.add_argument("--verbose", action="store_true", help="TensorFlow's C++ log")
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose)
import skies  # noqa: E402  (after the command line: see above)
import wlcnn  # noqa: E402


# ## Data
def main(argv=None):
    """Simulate cluster fields into a dataset; returns the exit status."""
    args = build_parser().parse_args(argv)
    counts = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    field_fn, generator = skies.simulated_field, "simulate"
    if args.main_m200_min is not None:
        sim = dataclasses.replace(skies.SIMULATOR, main_m200_min_msun=args.main_m200_min)
        field_fn = functools.partial(skies.simulated_field, sim=sim)
        # in the manifest's header: a rerun with another mass range is refused
        generator = f"simulate main_m200_min_msun={args.main_m200_min:g}"
    try:
        if args.main_m200_min is not None and not (
                0 < args.main_m200_min < skies.SIMULATOR.main_m200_max_msun):
            raise ValueError(f"--main-m200-min must lie in (0, "
                             f"{skies.SIMULATOR.main_m200_max_msun:g}) M☉")
        manifest = skies.write_dataset(args.out, counts, wlcnn.PAPER, args.seed,
                                       field_fn=field_fn, masks=args.masks,
                                       shard_size=args.shard_size, workers=args.workers,
                                       shard=args.shard, generator=generator)
    except (ValueError, TypeError, OSError) as exc:
        print(f"simulate_skies: error: {exc}", file=sys.stderr)
        return 2
    if manifest is None:
        print(f"{args.out}: this job's shards are done; the manifest follows when every shard is")
    else:
        print(f"{args.out}: complete, {sum(manifest['counts'].values())} clusters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
