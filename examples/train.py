"""Train the CNN of Table 1 on a dataset (§2.3.2): the training loop and its checkpoints.

    python examples/train.py --data data/quick --out runs/quick --preset quick --fresh-catalogs
    python examples/train.py --data data/paper --out runs/paper --preset paper

The output directory holds one ``run_XX/`` per independent run (``best.keras``,
``history.csv``, ``run.json``). Every epoch is backed up: a run stopped at any
moment (Ctrl-C, kill, a lost machine) resumes at its last finished epoch when
the same command is run again; a command with other settings is refused.
Each epoch prints a line with the samples seen, the losses and the rate.

wlcnn.py holds the model, its loss and ``compile_model``; this script holds the loop
(nanoGPT's split of model.py and train.py). Imported (``import train``, as
``train_quick.py`` and the tests do) it gives ``PRESETS`` (the schedules), ``train`` (one
run into ``run_XX``, resuming it), ``train_runs`` and ``train_from_directory`` (K runs),
and ``carry_run`` (what resuming needs, copied to another machine).
"""
import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cli  # the command-line conventions; no TensorFlow

#: Options that replace a field of the preset.
OVERRIDES = {"epochs": int, "steps_per_epoch": int, "batch_size": int, "n_val": int,
             "learning_rate": float, "init": str}
#: PRESETS and wlcnn.VARIANTS by name, so that the command line answers before TensorFlow
#: loads (tests/test_cli.py checks that they agree); the starts of the weights.
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
import keras  # noqa: E402  (after the command line: see above)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from wlcnn import (PAPER, TMP_PREFIX, VARIANTS, FFTConv2D, FFTConv2DTranspose,  # noqa: E402
                   KS93Start, atomic_write, atomic_write_text, build_model, compile_model,
                   config_dict, config_from_dict, initialize_as_ks93, load_model, make_loss,
                   read_history, read_json, resolve_conv, save_model, training_data,
                   validation_sha256)


# ---------------------------------------------------------------------------
# Training: presets and checks of the data
# ---------------------------------------------------------------------------
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainPreset:
    """A training schedule.

    ``batch_size`` is the global batch (over all GPUs); an epoch is
    ``steps_per_epoch`` steps, then a validation on ``n_val`` fixed subfields
    and a backup; ``clipnorm`` is Keras's per-tensor gradient clipping.
    ``time_limit_s`` (summed over resumptions) stops a run after the epoch
    that leaves less than one more epoch's time. ``lr_schedule`` "cosine":
    a linear warm-up over ``warmup_steps``, then a half cosine down to
    ``final_lr_fraction * learning_rate``. ``init`` "glorot" is Keras's default
    (the paper's); "ks93" sets the network to compute KS93 smoothed by
    ``init_fwhm_arcmin``, calibrated on ``n_init`` subfields
    (:func:`initialize_as_ks93`, beyond the paper).
    """

    name: str
    learning_rate: float
    batch_size: int
    steps_per_epoch: int
    epochs: int
    n_runs: int
    clipnorm: float | None
    n_val: int
    time_limit_s: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    init: str = "glorot"
    init_fwhm_arcmin: float = KS93Start.fwhm_arcmin
    n_init: int = KS93Start.n_init

    def __post_init__(self):
        if self.init not in INIT_NAMES:
            raise ValueError(f"init must be one of {INIT_NAMES}, got {self.init!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, "
                             f"got {self.lr_schedule!r}")
        if not 0 <= self.warmup_steps < self.epochs * self.steps_per_epoch:
            raise ValueError("warmup_steps must be >= 0 and fewer than the run's steps")

    def learning_rate_schedule(self):
        """Adam's step size: a float, or a Keras ``CosineDecay`` of the
        optimizer's step count (which the backup saves, so a resumed run
        continues on the same curve)."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        return keras.optimizers.schedules.CosineDecay(
            0.0 if self.warmup_steps else self.learning_rate,
            decay_steps=self.epochs * self.steps_per_epoch - self.warmup_steps,
            alpha=self.final_lr_fraction,
            warmup_target=self.learning_rate if self.warmup_steps else None,
            warmup_steps=self.warmup_steps)

    def apply(self, config):
        """``config`` with this schedule's training fields (a saved model's
        description then records them)."""
        return dataclasses.replace(
            config, learning_rate=self.learning_rate, batch_size=self.batch_size,
            steps_per_epoch=self.steps_per_epoch, epochs=self.epochs, clipnorm=self.clipnorm)


PRESETS = {
    # §2.3.2 as published: Adam at 1e-5, batches of 50, 20 steps an epoch,
    # 200 epochs (200,000 samples), 10 runs, the weights of minimum
    # validation loss kept. Not in the paper: Config's gradient clipping,
    # which guards eq. 12's division by max κ (at 1e-5 it rarely engages),
    # and the validation size: 400 subfields of the validation clusters
    # (0.7 GB as float32), so the mean validation loss has a standard error
    # of 5 % of its spread (1/√400).
    "paper": TrainPreset(
        "paper", PAPER.learning_rate, PAPER.batch_size, PAPER.steps_per_epoch,
        PAPER.epochs, PAPER.n_runs, PAPER.clipnorm, n_val=400),
    # A 30-minute CPU budget: ~13,000 samples at 7-10 samples/s on two cores,
    # a fifteenth of the paper's. From Glorot weights that is too few to beat
    # KS93, so the network starts as KS93 smoothed by 1′ (validation loss
    # 0.0019) and trains at 5e-5, slow enough to keep that start in the
    # first epochs: 0.00095 at the time limit (examples/quick_model).
    "quick": TrainPreset(
        "quick", learning_rate=5e-5, batch_size=8, steps_per_epoch=100,
        epochs=25, n_runs=1, clipnorm=1.0, n_val=64, time_limit_s=30 * 60,
        init="ks93", init_fwhm_arcmin=1.0),
}


def get_preset(preset):
    """A ``TrainPreset`` from itself or its name in ``PRESETS``."""
    if isinstance(preset, TrainPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {list(PRESETS)}")
    return PRESETS[preset]


def check_data(train_ds, val, config, channels, batch_size, steps_needed):
    """Raise ValueError unless the data fit the model and are finite.

    Only the first training batch is looked at (the stream is endless);
    ``TerminateOnNaN`` guards the rest during training.
    """
    S, O = config.subfield_npix, config.output_npix

    def check(x, y, what):
        for arr, name, shape in [(np.asarray(x), "inputs", (S, S, channels)),
                                 (np.asarray(y), "targets", (O, O, 1))]:
            if arr.ndim != 4 or arr.shape[1:] != shape:
                # name the mismatch a user can act on: channels or grid
                kind = "channels" if arr.ndim == 4 and arr.shape[1:3] == shape[:2] else "grid"
                raise ValueError(
                    f"{what} {name} have shape {arr.shape}; the model takes "
                    f"(N, {', '.join(map(str, shape))}) ({kind} differ: "
                    f"was the dataset made for another variant or Config?)")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{what} {name} contain NaN or infinite values")
        if len(x) != len(y):
            raise ValueError(f"{what}: {len(x)} inputs but {len(y)} targets")
        return len(x)

    if len(val) != 2 or check(*val, "validation") == 0:
        raise ValueError("the validation set is empty (or not a pair (x_val, y_val))")
    n = int(train_ds.cardinality())
    if 0 <= n < steps_needed:  # negative: infinite or unknown
        raise ValueError(f"the training dataset holds {n} batches, a run needs "
                         f"{steps_needed}: repeat it")
    first = next(iter(train_ds.take(1)), None)
    if first is None:
        raise ValueError("the training dataset yields no batches")
    if not isinstance(first, tuple) or len(first) != 2:
        raise ValueError("training batches must be pairs (x, y)")
    if check(*first, "training") != batch_size:
        raise ValueError(f"training batches hold {len(first[0])} subfields, "
                         f"the preset asks for {batch_size}")


# ---------------------------------------------------------------------------
# Training: one run, run_XX/{run.json, history.csv, best.keras} and, while it
# runs, backup/ (Keras's BackupAndRestore) and best-NNNN.weights.h5
# ---------------------------------------------------------------------------
def run_path(out_dir, run_index):
    """``out_dir/run_XX``."""
    return Path(out_dir) / f"run_{run_index:02d}"


def _epochs_backed_up(run_dir):
    """Epochs that ``BackupAndRestore`` holds, where ``fit`` resumes."""
    meta = read_json(Path(run_dir) / "backup" / "training_metadata.json")
    return 0 if meta is None else int(meta["epoch"])


def _best_files(run_dir):
    """(epochs done, path) of the best-weights files, oldest first."""
    return sorted((int(p.name[5:9]), p) for p in Path(run_dir).glob("best-*.weights.h5"))


def _drop_unfinished(run_dir, done):
    """Forget what epochs >= ``done`` wrote before an interruption (their log
    rows and best weights, possibly half written): they are redone. The hidden
    temporaries of ``atomic_write`` left by a writer killed mid-write go too."""
    for tmp in Path(run_dir).glob(TMP_PREFIX + "*"):
        tmp.unlink()
    history = Path(run_dir) / "history.csv"
    if history.exists():
        lines = history.read_text().splitlines(keepends=True)
        keep = [ln for ln in lines[1:] if ln.split(",", 1)[0].isdigit()
                and int(ln.split(",", 1)[0]) < done]
        if not keep:  # even the header may be cut short
            history.unlink()
        elif len(keep) + 1 != len(lines):
            atomic_write_text(history, "".join(lines[:1] + keep))
    for n, p in _best_files(run_dir):
        if n > done:
            p.unlink()


def _settings(config, preset, variant, run_index, seed, conv, mixed):
    """What a run's results depend on; a resumption must match it. ``n_runs``
    is left out so that runs can be added later."""
    p = dataclasses.asdict(preset)
    p.pop("n_runs")
    return json.loads(json.dumps(dict(
        preset=p, variant=variant, run_index=run_index, seed=seed, conv=resolve_conv(conv),
        mixed_precision=bool(mixed), config=config_dict(config))))


def _check_settings(run_dir, settings):
    """The run's ``run.json``, if any, after checking it has ``settings``.

    An unfinished run at a constant learning rate may be resumed for more (or fewer)
    epochs: its first epochs do not depend on the number planned. A cosine schedule's do.
    """
    info = read_json(Path(run_dir) / "run.json")

    def compared(s):
        s = {k: s.get(k) for k in settings}
        if (settings["preset"]["lr_schedule"] == "constant" and isinstance(s["preset"], dict)
                and info.get("status") != "complete"):
            s = json.loads(json.dumps(s))
            for part in ("preset", "config"):
                s[part].pop("epochs", None)
        return s
    if info is not None and compared(info) != compared(settings):
        diff = sorted(k for k in settings if compared(info)[k] != compared(settings)[k])
        raise ValueError(f"{run_dir} was started with other settings ({', '.join(diff)}); "
                         "rerun with those or use another output directory")
    return info


class _EpochLog(keras.callbacks.Callback):
    """Adds ``epoch_s`` and ``samples_per_s`` to the epoch logs (for the CSV
    log), prints a line an epoch with the samples seen, and stops training
    when another epoch would overrun the time budget."""

    def __init__(self, name, preset, spent_s, verbose):
        super().__init__()
        self.name, self.preset, self.spent, self.verbose = name, preset, spent_s, verbose
        self.time_limited = False

    def on_epoch_begin(self, epoch, logs=None):
        self.t0, self.t_first, self.steps = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch, logs=None):
        # timed from the end of the first step: the first step of a fit traces
        # the training function (seconds), which is no throughput
        t = time.perf_counter()
        if self.t_first is None:
            self.t_first = t
        else:
            self.t_last, self.steps = t, self.steps + 1

    def on_epoch_end(self, epoch, logs=None):
        p = self.preset
        logs["epoch_s"] = time.perf_counter() - self.t0
        logs["samples_per_s"] = (self.steps * p.batch_size / (self.t_last - self.t_first)
                                 if self.steps else float("nan"))
        self.spent += logs["epoch_s"]
        if self.verbose:
            seen = (epoch + 1) * p.steps_per_epoch * p.batch_size
            print(f"{self.name} epoch {epoch + 1}/{p.epochs}: {seen:,} samples seen, "
                  f"loss {logs.get('loss', np.nan):.4g}, val_loss "
                  f"{logs.get('val_loss', np.nan):.4g}, {logs['samples_per_s']:.1f} "
                  f"samples/s, {logs['epoch_s']:.0f} s", flush=True)
        if p.time_limit_s is not None and self.spent + logs["epoch_s"] > p.time_limit_s:
            self.model.stop_training = self.time_limited = True


def _model_to_train(config, variant, conv, mixed):
    """The model to train; with ``mixed``, in mixed_float16 except the FFT
    layers (``rfft2d`` has no float16 kernel) and the output (κ and the loss
    stay float32)."""
    model = build_model(config, variant, conv)
    if not mixed:
        return model
    fft = (FFTConv2D, FFTConv2DTranspose)

    def clone(layer):
        cfg = layer.get_config()
        if isinstance(layer, fft) or layer.name == "output":
            cfg["dtype"] = "float32"
        return layer.__class__.from_config(cfg)
    return keras.models.clone_model(model, clone_function=clone)


def _save_best(float32_copy, run_dir):
    """The newest best weights, as a float32 model without optimizer, to best.keras."""
    files = _best_files(run_dir)
    if files:
        float32_copy.load_weights(files[-1][1])
        save_model(float32_copy, run_dir / "best.keras")


def _save_weights(model, float32_copy, path):
    """``model``'s weights without Adam's state (a third of the bytes), atomically."""
    float32_copy.set_weights(model.get_weights())
    atomic_write(path, float32_copy.save_weights)


class _BestWeights(keras.callbacks.Callback):
    """Keeps the weights of a new lowest validation loss (best-NNNN.weights.h5,
    NNNN epochs done), as ``ModelCheckpoint(save_best_only=True)`` would, but
    through ``float32_copy`` so that the file holds no optimizer state."""

    def __init__(self, run_dir, float32_copy, best_so_far):
        super().__init__()
        self.run_dir, self.float32_copy = Path(run_dir), float32_copy
        self.best = np.inf if best_so_far is None else best_so_far

    def on_epoch_end(self, epoch, logs=None):
        loss = logs.get("val_loss", np.nan)
        if np.isfinite(loss) and loss < self.best:
            self.best = loss
            _save_weights(self.model, self.float32_copy,
                          self.run_dir / f"best-{epoch + 1:04d}.weights.h5")


class _Snapshots(keras.callbacks.Callback):
    """Keeps the weights after every ``every``-th epoch (snapshot-NNNN.weights.h5)."""

    def __init__(self, run_dir, every, float32_copy=None):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"snapshot_every must be a whole number of epochs >= 1, "
                             f"got {every!r}")
        self.run_dir, self.every, self.float32_copy = Path(run_dir), int(every), float32_copy

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            _save_weights(self.model, self.float32_copy,
                          self.run_dir / f"snapshot-{epoch + 1:04d}.weights.h5")


def train(train_ds, val, out_dir, config=PAPER, preset="paper", variant="FocalLoss",
          run_index=0, seed=0, conv="auto", mixed_precision=False, strategy=None,
          verbose=1, callbacks=(), snapshot_every=None):
    """Train one run (§2.3.2) into ``out_dir/run_XX``, resuming it if it was interrupted.

    ``train_ds`` is an endless stream of float32 batches (x (B, S, S, C), y (B,
    O, O, 1)) with S, O of ``config`` and B of the preset; ``val`` = (x, y) the
    fixed validation set. Weights are drawn with seed + run_index.
    ``mixed_precision`` trains in mixed_float16 but for the FFT and output
    layers. ``strategy`` defaults to ``MirroredStrategy`` over several GPUs.
    ``verbose``: 0 silent, 1 a line an epoch, 2 Keras's progress bar too.
    ``callbacks`` run before each epoch's backup. ``snapshot_every`` = N keeps
    the weights after every N-th epoch, snapshot-NNNN.weights.h5, for a learning
    curve; it is no setting of the run (it may change on resumption).

    Returns ``run.json``: the settings, ``epochs_done``, ``best_epoch`` (counted from 1,
    as in the weight files' names),
    ``best_val_loss`` (of best.keras, re-read), ``samples_per_s`` (median),
    ``wall_s``, ``stopped`` ("epochs" or "time_limit"), versions.

    Notes
    -----
    Keras's ``BackupAndRestore`` saves weights, Adam's state and the epoch
    count after each epoch: an epoch is finished once backed up. Before that,
    ``CSVLogger`` appends it to history.csv and the weights of a new lowest
    validation loss go to best-NNNN.weights.h5 (NNNN epochs done). A resumption drops the
    rows and files of unfinished epochs, so the log holds each epoch once and the best
    weights belong to it.
    """
    preset = get_preset(preset)
    config = preset.apply(config)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {list(VARIANTS)}")
    run_dir = run_path(out_dir, run_index)
    if snapshot_every is not None:  # refused before any work
        _Snapshots(run_dir, snapshot_every)
    settings = _settings(config, preset, variant, run_index, seed, conv, mixed_precision)
    info = _check_settings(run_dir, settings)
    if info is not None and info.get("status") == "complete":
        return info
    check_data(train_ds, val, config, VARIANTS[variant]["channels"], preset.batch_size,
               preset.steps_per_epoch * preset.epochs)
    val_sha = validation_sha256(val)
    if info is not None and info.get("val_sha256") != val_sha:
        raise ValueError(f"{run_dir} was validated on another validation set; "
                         "use another output directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "run.json", json.dumps(
        dict(settings, status="running", val_sha256=val_sha), indent=1))
    done = _epochs_backed_up(run_dir)
    _drop_unfinished(run_dir, done)
    history = run_dir / "history.csv"
    rows = read_history(history)
    best_so_far = min((r["val_loss"] for r in rows if np.isfinite(r["val_loss"])), default=None)

    keras.utils.set_random_seed(seed + run_index)
    gpus = tf.config.list_logical_devices("GPU")
    if strategy is None:  # all GPUs share each batch
        strategy = (tf.distribute.MirroredStrategy() if len(gpus) > 1
                    else tf.distribute.get_strategy())
    policy = keras.mixed_precision.global_policy()
    try:
        if mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        with strategy.scope():
            model = compile_model(_model_to_train(config, variant, conv, mixed_precision), config,
                                  variant, preset.learning_rate_schedule())
    finally:
        keras.mixed_precision.set_global_policy(policy)
    float32_copy = build_model(config, variant, conv)  # float32, no optimizer: what is saved
    if preset.init == "ks93" and done == 0:  # on resumption the backup has the weights
        # take() iterates the dataset anew: fit still sees these batches
        n_batches = -(-preset.n_init // preset.batch_size)
        x_init = np.concatenate([x.numpy() for x, _ in train_ds.take(n_batches)])
        gains = initialize_as_ks93(model, x_init, KS93Start(fwhm_arcmin=preset.init_fwhm_arcmin),
                                   seed=seed + run_index, batch_size=preset.batch_size)
        if verbose:
            print(f"{run_dir.name}: KS93 start, output gains {gains[0]:.3f}, {gains[1]:.3f}")
    elif verbose and done:
        print(f"{run_dir.name}: resuming after epoch {done}")

    log = _EpochLog(run_dir.name, preset, sum(r["epoch_s"] for r in rows), verbose)
    drop_older_best = keras.callbacks.LambdaCallback(  # the finished best and the new one
        on_epoch_end=lambda epoch, logs: [p.unlink() for _, p in _best_files(run_dir)[:-2]])
    cbs = [log,
           keras.callbacks.TerminateOnNaN(raise_error=True),  # no NaN epoch is backed up
           keras.callbacks.CSVLogger(history, append=True),
           _BestWeights(run_dir, float32_copy, best_so_far), drop_older_best,
           *([] if snapshot_every is None else [_Snapshots(run_dir, snapshot_every, float32_copy)]),
           *callbacks,
           # two generations: a backup broken mid-write falls back to the previous one
           keras.callbacks.BackupAndRestore(run_dir / "backup", double_checkpoint=True,
                                            delete_checkpoint=False)]
    t0 = time.perf_counter()
    try:
        model.fit(train_ds, epochs=preset.epochs, steps_per_epoch=preset.steps_per_epoch,
                  validation_data=tuple(val), validation_batch_size=preset.batch_size,
                  shuffle=False, callbacks=cbs, verbose=int(verbose >= 2))
    except RuntimeError as err:
        if "NaN or Inf loss" not in str(err):
            raise
        _save_best(float32_copy, run_dir)
        raise FloatingPointError(
            f"{run_dir.name}: the training loss became NaN or infinite ({err}); the run "
            "resumes from its last finished epoch: lower the learning rate or check the "
            "data") from err

    rows = read_history(history)
    if len(rows) < preset.epochs and not log.time_limited:
        raise ValueError(f"{run_dir.name}: the training dataset ran out after {len(rows)} "
                         "epochs; it must be endless")
    _save_best(float32_copy, run_dir)
    if not (run_dir / "best.keras").exists():
        raise ValueError(f"{run_dir.name}: no finite validation loss, no model saved")
    # the number reported is that of the file, re-read: it also proves it loads
    pred = load_model(run_dir / "best.keras", compile=False).predict(
        val[0], batch_size=preset.batch_size, verbose=0)
    val_losses = [r["val_loss"] for r in rows]
    info = dict(settings, status="complete", val_sha256=val_sha,
                epochs_done=len(rows), epochs_planned=preset.epochs,
                stopped="time_limit" if log.time_limited else "epochs",
                best_epoch=int(np.nanargmin(val_losses)) + 1,  # 1-based, as the files
                best_val_loss=float(make_loss(config, variant)(val[1], pred)),
                samples_per_s=float(np.nanmedian([r["samples_per_s"] for r in rows])),
                wall_s=float(sum(r["epoch_s"] for r in rows)),
                wall_s_this_call=time.perf_counter() - t0,
                replicas=strategy.num_replicas_in_sync,
                devices=[d.name for d in gpus] or ["CPU"],
                versions=dict(python=platform.python_version(), **{
                    m: __import__(m).__version__ for m in ("numpy", "tensorflow", "keras")}))
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=1))
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    for _, p in _best_files(run_dir):
        p.unlink()
    return info


# ---------------------------------------------------------------------------
# Training: several runs, from a dataset directory
# ---------------------------------------------------------------------------
def carry_run(run_dir, dest_dir):
    """Copy what resuming an unfinished run needs to ``dest_dir`` (a new run_XX).

    Parameters
    ----------
    run_dir : path
        A run directory of ``train``, its training stopped.
    dest_dir : path
        Replaced by: run.json, history.csv, the newest best-NNNN.weights.h5 and
        backup/{latest.weights.h5, training_metadata.json}. The same ``train``
        call with ``dest_dir`` as its run directory goes on from the last
        finished epoch, Adam's state included.

    Returns
    -------
    list of Path
        The files copied, relative to ``dest_dir``.

    Notes
    -----
    For a run that must outlive its machine: the copy leaves out the snapshots
    and the previous backup generation, so it is the backup (weights and Adam's
    moments, three times the weights) plus the best weights. A copy taken
    while ``train`` writes may hold a half-written backup: stop it first.
    """
    run_dir, dest_dir = Path(run_dir), Path(dest_dir)
    info = read_json(run_dir / "run.json")
    if info is not None and info.get("status") == "complete":
        raise ValueError(f"{run_dir} is complete: its best.keras is the model to keep")
    if info is None or _epochs_backed_up(run_dir) == 0:
        raise ValueError(f"{run_dir} holds no backed-up epoch of a run to carry")
    files = [Path("run.json"), Path("history.csv"), Path("backup/latest.weights.h5"),
             Path("backup/training_metadata.json")]
    best = _best_files(run_dir)
    files += [best[-1][1].relative_to(run_dir)] if best else []
    tmp = dest_dir.with_name(f"{TMP_PREFIX}{os.getpid()}-{dest_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in files:
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run_dir / f, tmp / f)
    shutil.rmtree(dest_dir, ignore_errors=True)
    os.replace(tmp, dest_dir)
    return files


def train_runs(data_fn, out_dir, config=PAPER, preset="paper", variant="FocalLoss", seed=0,
               runs=None, **kwargs):
    """Train runs 0..K-1 (§2.3.2: "10 independent runs"), skipping complete
    ones and resuming unfinished ones.

    ``data_fn(seed) -> (train_ds, (x_val, y_val))`` gives the data as ``train``
    takes them, the validation set independent of ``seed``; ``runs`` (K)
    defaults to the preset's ``n_runs``; ``kwargs`` go to ``train``. Returns
    each run's ``run.json``.
    """
    preset = get_preset(preset)
    runs = preset.n_runs if runs is None else int(runs)
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    results = []
    for i in range(runs):
        settings = _settings(preset.apply(config), preset, variant, i, seed,
                             kwargs.get("conv", "auto"), kwargs.get("mixed_precision", False))
        info = _check_settings(run_path(out_dir, i), settings)
        if info is not None and info.get("status") == "complete":
            if kwargs.get("verbose", 1):
                print(f"run_{i:02d}: complete, skipped")
            results.append(info)
            continue
        # tf.data's random ops draw on the global seed when they are built
        keras.utils.set_random_seed(seed + i)
        # the stream's seed differs between runs and resumptions: a resumed run
        # draws new subfields rather than replaying its first epochs'
        done = _epochs_backed_up(run_path(out_dir, i))
        train_ds, val = data_fn(int(np.random.SeedSequence([seed, i, done]).generate_state(1)[0]))
        results.append(train(train_ds, val, out_dir, config, preset, variant, i, seed,
                             **kwargs))
    return results


def train_from_directory(data_dir, out_dir, preset="quick", variant="FocalLoss", runs=None,
                         seed=0, *, config=PAPER, data_fn=None, fresh_catalogs=False,
                         **kwargs):
    """Train K runs on a dataset directory (``train_runs`` on :func:`training_data`).

    The Config fields of the dataset's ``manifest.json`` replace ``config``'s.
    ``data_fn(data_dir, config, batch_size, seed, channels=, n_val=)`` replaces
    :func:`training_data`, whose ``fresh_catalogs`` draws a new source catalog
    at every cluster visit.
    """
    preset = get_preset(preset)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {list(VARIANTS)}")
    manifest = read_json(Path(data_dir) / "manifest.json")
    if manifest is None:
        raise ValueError(f"{data_dir}: no manifest.json, not a dataset")
    try:
        config = config_from_dict({**dataclasses.asdict(config), **manifest.get("config", {})})
    except TypeError as err:
        raise ValueError(f"{data_dir}: manifest config does not fit this Config ({err})") from None
    channels = VARIANTS[variant]["channels"]
    if manifest.get("channels", channels) < channels:
        raise ValueError(f"{data_dir} holds {manifest['channels']} input channels; "
                         f"variant {variant} needs {channels}")
    if data_fn is None:
        def data_fn(data_dir, config, batch_size, seed, channels, n_val):
            return training_data(data_dir, batch_size, seed, channels=channels, n_val=n_val,
                                 fresh_catalogs=fresh_catalogs, config=config)

    def make(s):
        return data_fn(data_dir, config, preset.batch_size, s, channels=channels,
                       n_val=preset.n_val)
    return train_runs(make, out_dir, config, preset, variant, seed, runs, **kwargs)


def main(argv=None):
    """Train K runs of the CNN on a dataset; returns the exit status."""
    args = build_parser().parse_args(argv)
    changes = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    try:
        preset = dataclasses.replace(get_preset(args.preset), **changes)
        infos = train_from_directory(
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
