"""Train the CNN of Table 1 on a dataset (§2.3.2), from the command line.

    python examples/train.py --data data/quick --out runs/quick --preset quick --fresh-catalogs
    python examples/train.py --data data/paper --out runs/paper --preset paper

The output directory holds one ``run_XX/`` per independent run (``best.keras``,
``history.csv``, ``run.json``). Every epoch is backed up: a run stopped at any
moment (Ctrl-C, kill, a lost machine) resumes at its last finished epoch when
the same command is run again; a command with other settings is refused.
Each epoch prints a line with the samples seen, the losses and the rate.
"""
import argparse
import dataclasses
import sys

import cli  # the command-line conventions; no TensorFlow

#: Options that replace a field of the preset.
OVERRIDES = {"epochs": int, "steps_per_epoch": int, "batch_size": int, "n_val": int,
             "learning_rate": float, "init": str}
#: wlcnn.PRESETS, wlcnn.VARIANTS and wlcnn.INITS by name, so that the command line answers
#: before TensorFlow loads (tests/test_cli.py checks that they agree).
PRESET_NAMES = ("paper", "quick")
VARIANT_NAMES = ("FocalLoss", "Fiducial", "4Channel", "19Filter", "29Filter", "NoSkip",
                 "FocalMass")
INIT_NAMES = ("glorot", "ks93")


def build_parser():
    """The command line of this script."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset directory (simulate_skies.py)")
    p.add_argument("--out", type=cli.output_dir, required=True,
                   help="output directory of the runs, created with its parents if missing")
    p.add_argument("--preset", default="quick", choices=PRESET_NAMES,
                   help="quick: 30 min on a CPU, from KS93; paper: §2.3.2 as published")
    p.add_argument("--variant", default="FocalLoss", choices=VARIANT_NAMES,
                   help="Appendix A variant")
    p.add_argument("--runs", type=int, default=None, help="independent runs (default: preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh-catalogs", action="store_true",
                   help="a new source catalog at every cluster visit (beyond the paper)")
    p.add_argument("--conv", default="auto", choices=["auto", "fft", "direct"])
    p.add_argument("--mixed-precision", action="store_true")
    p.add_argument("--snapshot-every", type=int, default=None, metavar="N",
                   help="keep the weights after every N-th epoch (a learning curve's points)")
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2],
                   help="0 silent, 1 a line an epoch, 2 Keras's progress bar and "
                        "TensorFlow's C++ log too")
    g = p.add_argument_group("changes to the preset (a resumed run must repeat them)")
    for name, kind in OVERRIDES.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       choices=INIT_NAMES if name == "init" else None)
    return p


if __name__ == "__main__":  # --help and usage errors answer before TensorFlow loads
    ARGS = build_parser().parse_args()
    cli.quiet_tensorflow(ARGS.verbose == 2)
import wlcnn  # noqa: E402  (after the command line: see above)


def main(argv=None):
    """Train K runs of the CNN on a dataset; returns the exit status."""
    args = build_parser().parse_args(argv)
    changes = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    try:
        preset = dataclasses.replace(wlcnn.get_preset(args.preset), **changes)
        infos = wlcnn.train_from_directory(
            args.data, args.out, preset, args.variant, args.runs, args.seed,
            fresh_catalogs=args.fresh_catalogs, conv=args.conv,
            mixed_precision=args.mixed_precision, verbose=args.verbose,
            snapshot_every=args.snapshot_every)
    except (ValueError, TypeError, OSError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train: interrupted; the same command resumes at the last finished epoch",
              file=sys.stderr)
        return 130
    for i, info in enumerate(infos):
        print(f"run_{i:02d}: best val_loss {info['best_val_loss']:.4g} at epoch "
              f"{info['best_epoch']} of {info['epochs_done']}, "
              f"{info['samples_per_s']:.1f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
