"""Train the CNN of Table 1 on a dataset (§2.3.2), from the command line.

    python examples/train.py --data data/quick --out runs/quick --preset quick --fresh-catalogs
    python examples/train.py --data data/paper --out runs/paper --preset paper

A run directory holds ``run_XX/`` per independent run; rerunning the same
command resumes every unfinished run at its last finished epoch.
"""
import argparse
import dataclasses
import sys

import wlcnn


def main(argv=None):
    """Train K runs of the CNN on a dataset; returns the exit status."""
    p = argparse.ArgumentParser(description="train the CNN on a dataset (§2.3.2); resumes where it stopped")
    p.add_argument("--data", required=True, help="dataset directory (simulate_skies / ingest_raytraced)")
    p.add_argument("--out", required=True, help="run directory: run_XX/best.keras, history.csv, run.json")
    p.add_argument("--preset", default="quick", choices=sorted(wlcnn.PRESETS),
                   help="quick: 30 min on a 2-core CPU; paper: §2.3.2 as published")
    p.add_argument("--variant", default="FocalLoss", choices=list(wlcnn.VARIANTS),
                   help="Appendix A variant")
    p.add_argument("--runs", type=int, default=None, help="independent runs (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh-catalogs", action="store_true",
                   help="a new source catalog at every cluster visit (beyond the paper)")
    p.add_argument("--init", default=None, choices=wlcnn.INITS,
                   help="starting weights (default: the preset's): glorot as in the paper, "
                        "or ks93, the network set to compute smoothed KS93 (beyond the paper)")
    p.add_argument("--conv", default="auto", choices=["auto", "fft", "direct"])
    p.add_argument("--mixed-precision", action="store_true")
    args = p.parse_args(argv)
    preset = wlcnn.get_preset(args.preset)
    if args.init is not None:
        preset = dataclasses.replace(preset, init=args.init)
    try:
        infos = wlcnn.train_from_directory(args.data, args.out, preset, args.variant, args.runs,
                                           args.seed, fresh_catalogs=args.fresh_catalogs,
                                           conv=args.conv, mixed_precision=args.mixed_precision)
    except (ValueError, TypeError, OSError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    for i, info in enumerate(infos):
        print(f"run_{i:02d}: best val_loss {info.get('best_val_loss')}, "
              f"{info.get('epochs_done')} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
