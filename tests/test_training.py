"""Tests of wlcnn.py: a tiny training, resume, skipping, bad input, reload.

The model is Table 1 shrunk (50^2 input, 16^2 output, 5x5 filters) and the
data a synthetic stand-in for ``wlcnn.training_data``, so that every test
trains in seconds on a CPU.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import h5py
import numpy as np
import pytest
import tensorflow as tf
import keras

import train  # examples/train.py: the training loop and its checkpoints
import wlcnn
from conftest import rewrite_zip_entry

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Table 1 shrunk: (50 - 3 + 1) / 3 = 16 output pixels.
CFG = dataclasses.replace(wlcnn.PAPER, subfield_npix=50, filter_size=5,
                          loss_border_pix=2)
TINY = train.TrainPreset("tiny", learning_rate=1e-3, batch_size=4,
                         steps_per_epoch=5, epochs=4, n_runs=2, clipnorm=1.0,
                         n_val=8)


def pairs(rng, n, channels=3, cfg=CFG):
    """Inputs of noise and targets the network can learn: 0.1 plus the
    block mean of channel 0 over each output pixel's 3x3 input block."""
    s, o = cfg.subfield_npix, cfg.output_npix
    x = rng.normal(size=(n, s, s, channels)).astype("float32")
    blocks = x[:, 1:1 + 3 * o, 1:1 + 3 * o, 0].reshape(n, o, 3, o, 3)
    y = 0.1 + 0.1 * blocks.mean(axis=(2, 4))[..., None]
    return x, y.astype("float32")


def synthetic_data(seed, channels=3, cfg=CFG, batch_size=4, n_val=8, n=32):
    """Stand-in for ``wlcnn.training_data``: an endless shuffled stream of
    ``n`` pairs and a validation set that does not depend on ``seed``."""
    x, y = pairs(np.random.default_rng(seed), n, channels, cfg)
    ds = (tf.data.Dataset.from_tensor_slices((x, y)).repeat()
          .shuffle(n, seed=seed).batch(batch_size, drop_remainder=True))
    return ds, pairs(np.random.default_rng(12345), n_val, channels, cfg)


class Recorder(keras.callbacks.Callback):
    """Records, for each fit, the first epoch, the optimizer's step count
    then, and every epoch's val_loss (with the predictions for ``x_val``
    if given)."""

    def __init__(self, x_val=None):
        super().__init__()
        self.x_val, self.fits = x_val, []

    def on_train_begin(self, logs=None):
        self.fits.append(dict(first=None, epochs=[]))

    def on_epoch_begin(self, epoch, logs=None):
        fit = self.fits[-1]
        if fit["first"] is None:  # BackupAndRestore has restored by now
            fit["first"] = epoch
            fit["iterations"] = int(self.model.optimizer.iterations)

    def on_epoch_end(self, epoch, logs=None):
        self.fits[-1]["epochs"].append(
            (epoch, logs["val_loss"], None if self.x_val is None else
             self.model(self.x_val, training=False).numpy()))


class Interrupt(Exception):
    pass


class Interrupter(keras.callbacks.Callback):
    """Raises at epoch ``epoch``: mid-epoch (after its second batch), or at
    its end after it is logged but before it is backed up; or once training
    is over, before ``train`` writes ``run.json``."""

    def __init__(self, epoch, where):
        super().__init__()
        self.epoch, self.where = epoch, where

    def on_train_batch_end(self, batch, logs=None):
        if self.where == "batch" and self._epoch == self.epoch and batch == 1:
            raise Interrupt

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.where == "epoch_end" and epoch == self.epoch:
            raise Interrupt

    def on_train_end(self, logs=None):
        if self.where == "train_end":
            raise Interrupt


# --------------------------------------------------------------------------
# A tiny training of two runs, shared by several tests
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    rec = Recorder(synthetic_data(0)[1][0])
    infos = train.train_runs(synthetic_data, out, CFG, TINY, "FocalLoss",
                             seed=7, verbose=0, callbacks=[rec])
    return out, infos, rec


def test_tiny_training_writes_a_complete_run(trained):
    out, infos, _ = trained
    assert len(infos) == TINY.n_runs
    for i, info in enumerate(infos):
        d = out / f"run_{i:02d}"
        assert sorted(os.listdir(d)) == ["best.keras", "history.csv",
                                         "run.json"]  # backup removed
        assert json.loads((d / "run.json").read_text()) == info
        assert info["status"] == "complete" and info["stopped"] == "epochs"
        assert info["epochs_done"] == TINY.epochs
        assert (info["run_index"], info["seed"]) == (i, 7)
        assert info["samples_per_s"] > 0 and info["wall_s"] > 0
        assert {"numpy", "tensorflow", "keras"} <= set(info["versions"])
        rows = wlcnn.read_history(d / "history.csv")
        assert [r["epoch"] for r in rows] == list(range(TINY.epochs))
        val = [r["val_loss"] for r in rows]
        # ~8e-3 after the first epoch, ~2e-3 after the next ones (the 0.1
        # offset and the block means being learnt); a factor 2 is margin
        assert min(val[1:]) < 0.5 * val[0]
        assert info["best_epoch"] == int(np.argmin(val)) + 1  # counted from 1
        # best.keras re-read and re-evaluated gives the logged minimum; the
        # two sums differ in batching only (float32 round-off ~1e-7)
        assert info["best_val_loss"] == pytest.approx(min(val), rel=1e-5)


def test_runs_are_independent_but_reproducible(trained):
    _, infos, rec = trained
    w0, w1 = (np.concatenate([w.ravel() for w in m.get_weights()])
              for m in wlcnn.load_runs(trained[0]))
    assert not np.allclose(w0, w1)  # other seeds: other weights
    # the same seed again reproduces run 0's first epoch (CPU: deterministic
    # kernels; 1e-6 allows oneDNN's reordered sums)
    rec2 = Recorder()
    train.train_runs(synthetic_data, trained[0] / "again", CFG,
                     dataclasses.replace(TINY, epochs=1), seed=7, runs=1,
                     verbose=0, callbacks=[rec2])
    assert rec2.fits[0]["epochs"][0][1] == pytest.approx(
        rec.fits[0]["epochs"][0][1], rel=1e-6)


def test_finished_runs_are_skipped(trained):
    out, infos, _ = trained

    def no_data(seed):
        raise AssertionError("a complete run asked for data")
    assert train.train_runs(no_data, out, CFG, TINY, "FocalLoss", seed=7,
                            verbose=0) == infos
    # but a run of other settings in the same place is refused
    with pytest.raises(ValueError, match="other settings.*seed"):
        train.train_runs(no_data, out, CFG, TINY, "FocalLoss", seed=8,
                         verbose=0)


def test_reloaded_models_predict_as_at_their_best_epoch(trained):
    out, infos, rec = trained
    models = wlcnn.load_runs(out)
    assert len(models) == TINY.n_runs
    for model, info, fit in zip(models, infos, rec.fits):
        assert wlcnn.model_info(model)["config"]["learning_rate"] == \
            TINY.learning_rate  # the description records the schedule
        epoch, _, pred = fit["epochs"][info["best_epoch"] - 1]
        # the same weights through the same ops: round-off only
        np.testing.assert_allclose(model.predict(rec.x_val, verbose=0), pred,
                                   rtol=0, atol=1e-6)
    # a directory holding model files, and one file, load as well
    single = out / "run_01" / "best.keras"
    assert len(wlcnn.load_runs(single)) == 1
    assert len(wlcnn.load_runs(out / "run_01")) == 1


def test_snapshots_hold_the_weights_of_their_epoch(tmp_path):
    preset = dataclasses.replace(TINY, epochs=4, n_runs=1)
    data = synthetic_data(2)
    rec = Recorder(data[1][0])
    train.train(*data, tmp_path, CFG, preset, seed=3, verbose=0, callbacks=[rec],
                snapshot_every=2)
    d = tmp_path / "run_00"
    assert sorted(p.name for p in d.glob("snapshot-*")) == [
        "snapshot-0002.weights.h5", "snapshot-0004.weights.h5"]  # kept after the run
    model = wlcnn.build_model(CFG)
    for n in (2, 4):
        model.load_weights(d / f"snapshot-{n:04d}.weights.h5")
        # the same weights through the same ops: round-off only
        np.testing.assert_allclose(model(rec.x_val, training=False).numpy(),
                                   rec.fits[0]["epochs"][n - 1][2], rtol=0, atol=1e-6)
    assert not list(d.glob(".tmp-*"))  # written then renamed
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="snapshot_every"):
            train.train(*data, tmp_path / "bad", CFG, preset, verbose=0, snapshot_every=bad)


# --------------------------------------------------------------------------
# Resume after an interruption
# --------------------------------------------------------------------------
@pytest.mark.parametrize("where,epoch", [
    ("batch", 2),        # mid-epoch: epochs 0-1 kept, epoch 2 redone
    ("epoch_end", 1),    # logged, not backed up: its row dropped, redone
    ("train_end", 4),    # all 4 epochs done, run.json not yet written
])
def test_resume_after_interruption(tmp_path, where, epoch):
    preset = dataclasses.replace(TINY, epochs=4, steps_per_epoch=3)
    data = synthetic_data(3)
    rec = Recorder()
    with pytest.raises(Interrupt):
        train.train(*data, tmp_path, CFG, preset, seed=1, verbose=0,
                    callbacks=[rec, Interrupter(epoch, where)])
    d = tmp_path / "run_00"
    assert json.loads((d / "run.json").read_text())["status"] == "running"
    assert (d / "backup").exists()
    logged = [r["epoch"] for r in wlcnn.read_history(d / "history.csv")]
    assert logged == list(range(epoch + (where == "epoch_end")))
    xv, yv = data[1]
    with pytest.raises(ValueError, match="another validation set"):
        train.train(data[0], (xv[::-1], yv[::-1]), tmp_path, CFG, preset,
                    seed=1, verbose=0)

    info = train.train(*data, tmp_path, CFG, preset, seed=1, verbose=0,
                       callbacks=[rec])
    resumed = rec.fits[1]
    # it continues with the interrupted epoch, weights and Adam restored
    if where == "train_end":
        assert resumed["first"] is None  # nothing left to train
    else:
        assert resumed["first"] == epoch
        assert resumed["iterations"] == epoch * preset.steps_per_epoch
    rows = wlcnn.read_history(d / "history.csv")
    assert [r["epoch"] for r in rows] == list(range(preset.epochs))
    assert info["status"] == "complete"
    assert info["epochs_done"] == preset.epochs
    assert not (d / "backup").exists()
    assert not list(d.glob("best-*.weights.h5"))  # the best epoch lives in best.keras
    # best.keras is the minimum of the log, across the two invocations
    # (batching round-off only, as above)
    assert info["best_val_loss"] == pytest.approx(
        min(r["val_loss"] for r in rows), rel=1e-5)


def test_carry_run_refuses_a_complete_run(trained, tmp_path):
    out, _, _ = trained
    with pytest.raises(ValueError, match="is complete"):
        train.carry_run(out / "run_00", tmp_path / "run_00")
    assert not (tmp_path / "run_00").exists()


def test_a_carried_run_resumes_elsewhere_as_it_would_in_place(tmp_path):
    preset = dataclasses.replace(TINY, epochs=4, steps_per_epoch=3)
    with pytest.raises(Interrupt):
        train.train(*synthetic_data(3), tmp_path / "here", CFG, preset, seed=1, verbose=0,
                    callbacks=[Interrupter(2, "batch")])
    here, there = tmp_path / "here" / "run_00", tmp_path / "there" / "run_00"
    with pytest.raises(ValueError, match="no backed-up epoch"):
        train.carry_run(tmp_path / "nothing", there)
    (there / "backup").mkdir(parents=True)
    (there / "backup" / "stale.weights.h5").write_text("")  # replaced, not merged
    files = train.carry_run(here, there)
    best = [f.name for f in files if f.name.startswith("best-")]
    assert sorted(str(f) for f in files) == sorted(
        ["run.json", "history.csv", "backup/latest.weights.h5",
         "backup/training_metadata.json"] + best)
    assert len(best) == 1 and sorted(p.relative_to(there) for p in there.rglob("*")
                                     if p.is_file()) == sorted(files)
    # the best weights hold no Adam moments (a third of the backup's bytes)
    with h5py.File(there / "backup/latest.weights.h5") as backup, \
            h5py.File(there / best[0]) as weights:
        assert "optimizer" in backup and "optimizer" not in weights

    recs = {}
    for name in ("here", "there"):  # the same stream, built anew for each
        recs[name] = Recorder(synthetic_data(3)[1][0])
        info = train.train(*synthetic_data(3), tmp_path / name, CFG, preset, seed=1,
                           verbose=0, callbacks=[recs[name]])
        assert info["status"] == "complete" and info["epochs_done"] == 4
    first = recs["there"].fits[0]
    assert first["first"] == 2 and first["iterations"] == 2 * preset.steps_per_epoch
    for (e1, l1, p1), (e2, l2, p2) in zip(recs["here"].fits[0]["epochs"], first["epochs"]):
        # the same weights, Adam state and batches: the same epochs, up to the
        # threads' summation order on the CPU
        assert e1 == e2 and l1 == pytest.approx(l2, rel=1e-5)
        np.testing.assert_allclose(p1, p2, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------
def run_tiny(tmp_path, data, variant="FocalLoss", preset=TINY):
    return train.train(*data, tmp_path, CFG, preset, variant, verbose=0)


@pytest.mark.parametrize("variant,channels,cfg,match", [
    ("FocalLoss", 4, CFG, "channels differ"),
    ("4Channel", 3, CFG, "channels differ"),
    # a dataset of another grid: 53^2 inputs, 17^2 targets
    ("FocalLoss", 3, dataclasses.replace(wlcnn.PAPER, subfield_npix=53), "grid differ"),
])
def test_mismatched_dataset(tmp_path, variant, channels, cfg, match):
    with pytest.raises(ValueError, match=match):
        run_tiny(tmp_path, synthetic_data(0, channels, cfg), variant)


def test_mismatched_batch_and_val_shapes(tmp_path):
    ds, (xv, yv) = synthetic_data(0)
    with pytest.raises(ValueError, match="batches hold 4.*asks for 8"):
        run_tiny(tmp_path, (ds, (xv, yv)),
                 preset=dataclasses.replace(TINY, batch_size=8))
    with pytest.raises(ValueError, match="validation targets.*grid"):
        run_tiny(tmp_path, (ds, (xv, yv[:, :8, :8])))


def test_empty_datasets(tmp_path):
    ds, (xv, yv) = synthetic_data(0)
    with pytest.raises(ValueError, match="validation set is empty"):
        run_tiny(tmp_path, (ds, (xv[:0], yv[:0])))
    with pytest.raises(ValueError, match="holds 0 batches"):
        run_tiny(tmp_path, (ds.take(0), (xv, yv)))
    # a generator's length is unknown to tf.data: caught at the first batch
    empty = tf.data.Dataset.from_generator(
        lambda: iter(()), output_signature=ds.element_spec)
    with pytest.raises(ValueError, match="yields no batches"):
        run_tiny(tmp_path, (empty, (xv, yv)))
    with pytest.raises(ValueError, match="holds 3 batches.*needs 20"):
        run_tiny(tmp_path, (ds.take(3), (xv, yv)))


@pytest.mark.parametrize("what", ["x_val", "y_val", "x", "y"])
def test_nan_input(tmp_path, what):
    rng = np.random.default_rng(0)
    x, y = pairs(rng, 8)
    xv, yv = pairs(rng, 4)
    arr = {"x_val": xv, "y_val": yv, "x": x, "y": y}[what]
    arr[1, 3, 3, 0] = np.nan
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(4)
    with pytest.raises(ValueError, match="NaN"):
        run_tiny(tmp_path, (ds, (xv, yv)))


def test_nan_during_training_keeps_last_epoch(tmp_path):
    # finite for the first epoch (the check looks at the first batch only),
    # then NaN targets
    x, y = pairs(np.random.default_rng(0), 4 * TINY.steps_per_epoch)
    bad = y.copy()
    bad[:, 5, 5] = np.nan
    ds = (tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
          .concatenate(tf.data.Dataset.from_tensor_slices((x, bad))
                       .batch(4).repeat()))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        run_tiny(tmp_path, (ds, pairs(np.random.default_rng(1), 4)))
    d = tmp_path / "run_00"
    assert len(wlcnn.read_history(d / "history.csv")) == 1  # epoch 0 only
    assert (d / "best.keras").exists() and (d / "backup").exists()


def test_model_of_another_format_version(trained, tmp_path):
    src = trained[0] / "run_00" / "best.keras"
    (tmp_path / "run_00").mkdir()
    (tmp_path / "run_00" / "run.json").write_text('{"status": "complete"}')
    rewrite_zip_entry(src, tmp_path / "run_00" / "best.keras", "config.json",
                      b'"format_version": 1', b'"format_version": 2')
    with pytest.raises(ValueError, match="format 2"):
        wlcnn.load_runs(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .keras model"):
        wlcnn.load_runs(tmp_path / "empty")
    with pytest.raises(ValueError, match="model not found"):
        wlcnn.load_runs(tmp_path / "run_00" / "nothing")


# --------------------------------------------------------------------------
# Presets, the directory wrapper, strategy and mixed precision
# --------------------------------------------------------------------------
def test_presets():
    paper = train.PRESETS["paper"]
    assert paper.apply(wlcnn.PAPER) == wlcnn.PAPER  # the paper preset is §2.3.2
    assert paper.n_runs == wlcnn.PAPER.n_runs and paper.time_limit_s is None
    quick = train.PRESETS["quick"]
    samples = quick.epochs * quick.steps_per_epoch * quick.batch_size
    # planned 20,000 samples fit the 30-minute budget at 0.07 s a sample, the
    # fastest two CPU cores train; at 0.10-0.13 s the time limit ends the run
    assert 15_000 <= samples and samples * 0.07 < quick.time_limit_s
    # the paper's validation set: fixed, >= 256 subfields (the mean loss's
    # standard error <= 1/16 of its spread), in whole batches
    assert paper.n_val >= 256 and paper.n_val % paper.batch_size == 0
    # the quick preset starts from KS93; the paper's from Keras's Glorot weights
    assert quick.init == "ks93" and paper.init == "glorot"
    with pytest.raises(ValueError, match="unknown preset"):
        train.get_preset("slow")


def test_cosine_schedule_warms_up_peaks_and_ends_at_its_floor():
    p = dataclasses.replace(TINY, epochs=4, steps_per_epoch=5, lr_schedule="cosine",
                            warmup_steps=4, final_lr_fraction=0.1)
    lr = p.learning_rate_schedule()
    total = p.epochs * p.steps_per_epoch
    # float32 arithmetic inside Keras's schedule: 1e-6 relative
    assert float(lr(0)) == 0.0
    assert float(lr(2)) == pytest.approx(0.5 * p.learning_rate, rel=1e-6)  # linear warm-up
    assert float(lr(4)) == pytest.approx(p.learning_rate, rel=1e-6)        # the peak
    mid = 4 + (total - 4) / 2                                              # half-way down
    assert float(lr(mid)) == pytest.approx(p.learning_rate * (0.1 + 0.9 * 0.5), rel=1e-6)
    assert float(lr(total)) == pytest.approx(0.1 * p.learning_rate, rel=1e-6)
    steps = [float(lr(i)) for i in range(4, total + 1)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))                  # never rises again
    assert TINY.learning_rate_schedule() == TINY.learning_rate            # constant: a float
    with pytest.raises(ValueError, match="lr_schedule"):
        dataclasses.replace(TINY, lr_schedule="step")
    with pytest.raises(ValueError, match="warmup_steps"):
        dataclasses.replace(TINY, lr_schedule="cosine", warmup_steps=total)


def test_training_follows_the_presets_schedule(tmp_path):
    p = dataclasses.replace(TINY, epochs=2, steps_per_epoch=3, lr_schedule="cosine",
                            warmup_steps=2, final_lr_fraction=0.0)
    seen = []

    class LR(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            opt = self.model.optimizer
            seen.append((int(opt.iterations), float(opt.learning_rate)))
    train.train(*synthetic_data(5), tmp_path, CFG, p, seed=0, verbose=0, callbacks=[LR()])
    sched = p.learning_rate_schedule()
    # the optimizer's step size is the schedule's at its step count
    assert [i for i, _ in seen] == [3, 6]
    assert [v for _, v in seen] == pytest.approx([float(sched(3)), float(sched(6))], rel=1e-6)


def test_train_from_directory_with_time_limit(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "manifest.json").write_text(json.dumps(
        {"config": {"filter_size": 5, "output_npix": 16,
                    "subfield_npix": 50}, "channels": 3}))
    calls = []

    def data_fn(path, config, batch_size, seed, channels, n_val):
        calls.append((path, config, batch_size, channels, n_val))
        return synthetic_data(seed, channels, config, batch_size, n_val)
    base = dataclasses.replace(CFG, subfield_npix=386)
    # a budget that one epoch exceeds: stopped after it, the run complete
    preset = dataclasses.replace(TINY, epochs=50, time_limit_s=1e-3)
    infos = train.train_from_directory(data_dir, tmp_path / "out", preset,
                                       runs=1, config=base, data_fn=data_fn,
                                       verbose=0)
    assert calls == [(data_dir, CFG, 4, 3, 8)]  # grid from the manifest
    assert infos[0]["status"] == "complete"
    assert infos[0]["stopped"] == "time_limit"
    assert infos[0]["epochs_done"] == 1
    with pytest.raises(ValueError, match="holds 3 input channels"):
        train.train_from_directory(data_dir, tmp_path / "o2", preset,
                                   "4Channel", config=base, data_fn=data_fn)
    with pytest.raises(ValueError, match="no manifest"):
        train.train_from_directory(tmp_path, tmp_path / "o3", preset,
                                   data_fn=data_fn)


@pytest.mark.parametrize("init", ["glorot", "ks93"])  # the KS93 start predicts float16 here
def test_mixed_precision_trains_float16_and_saves_float32(tmp_path, init):
    # the default strategy: an explicit one (MirroredStrategy or OneDeviceStrategy on
    # "/cpu:0") segfaults inside TensorFlow now and then on a CPU (Keras evaluate's
    # iterator, about one run in three under load); train's several-GPU path needs GPUs
    preset = dataclasses.replace(TINY, epochs=2, init=init, n_init=8)
    info = train.train(*synthetic_data(5), tmp_path, CFG, preset, seed=2,
                       mixed_precision=True, verbose=0)
    assert keras.mixed_precision.global_policy().name == "float32"  # reset
    assert info["replicas"] == 1 and info["mixed_precision"]
    assert np.isfinite(info["best_val_loss"])
    model = wlcnn.load_runs(tmp_path)[0]
    # what is saved is float32 throughout
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    # what is trained: float16 but for the FFT layers and the output
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = train._model_to_train(CFG, "FocalLoss", "fft", mixed=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    policy = {layer.name: layer.dtype_policy.name for layer in mixed.layers}
    assert policy["conv2d_1"] == policy["batchnorm_1"] == "mixed_float16"
    assert policy["conv2d_2"] == policy["transconv2d_1"] == "float32"
    assert policy["output"] == "float32" and mixed.output.dtype == "float32"


def test_ks93_start_is_applied_to_a_fresh_run(tmp_path):
    # At learning rate 0 the saved model is the KS93 start itself: its
    # predictions must be truncated_ks93 of the validation inputs as
    # Conv2D-1 passes them, tanh(gain x) / gain (these inputs are white
    # noise of rms 1, not ~0.3 as gridded ellipticities, so tanh bends them
    # by up to 24 % at 2 sigma). What is left: tanh in TransConv2D-5 and
    # batch statistics from 8 samples, updated over 5 steps; the
    # correlation measured 0.99985; 0.999 holds that, while a run that kept
    # Glorot weights correlates at ~0.
    preset = dataclasses.replace(TINY, learning_rate=0.0, epochs=1, n_runs=1, init="ks93", n_init=8)
    train.train_runs(synthetic_data, tmp_path, CFG, preset, "FocalLoss", seed=3, verbose=0)
    model = wlcnn.load_model(tmp_path / "run_00" / "best.keras", compile=False)
    x_val = synthetic_data(0)[1][0]
    got = model.predict(x_val, verbose=0)[..., 0].ravel()
    gain = wlcnn.KS93Start.input_gain
    seen = np.tanh(gain * x_val) / gain
    ref = wlcnn.truncated_ks93(seen, CFG.filter_size, preset.init_fwhm_arcmin, CFG)[..., 0].ravel()
    corr = np.corrcoef(got, ref)[0, 1]
    assert corr > 0.999
    with pytest.raises(ValueError, match="init"):
        dataclasses.replace(TINY, init="zeros")


# --------------------------------------------------------------------------
# The command line: killed and resumed by rerunning it
# --------------------------------------------------------------------------
def test_train_script_resumes_after_kill_without_losing_an_epoch(tiny_dataset, tmp_path):
    # The paper preset cut to seconds: the full Table 1 network on the
    # conftest's tiny dataset, 2 subfields a step, 2 steps an epoch.
    out = tmp_path / "runs"
    cmd = [sys.executable, str(EXAMPLES / "train.py"), "--data", str(tiny_dataset),
           "--out", str(out), "--preset", "paper", "--runs", "1", "--epochs", "8",
           "--steps-per-epoch", "2", "--batch-size", "2", "--n-val", "2"]
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES.parent))
    history = out / "run_00" / "history.csv"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 600
    while len(wlcnn.read_history(history)) < 2 and proc.poll() is None:
        assert time.monotonic() < deadline, "no epoch finished in 10 minutes"
        time.sleep(0.05)
    proc.kill()
    first = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, first  # killed mid-run, not finished
    assert "samples seen" in first
    done = json.loads((out / "run_00" / "backup" / "training_metadata.json").read_text())
    assert done["epoch"] >= 1
    assert json.loads((out / "run_00" / "run.json").read_text())["status"] == "running"
    # what a kill during a weights write leaves (it may or may not have hit one)
    (out / "run_00" / ".tmp-999-best-0003.weights.h5").write_bytes(b"half an HDF5 file")

    # resumed for one epoch more than planned: allowed for an unfinished run at a
    # constant learning rate, whose first epochs do not depend on the plan
    cmd[cmd.index("--epochs") + 1] = "9"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    # it picks up after every backed-up epoch, none lost and none repeated
    assert f"resuming after epoch {done['epoch']}" in again.stdout
    assert f"epoch {done['epoch'] + 1}/9: {(done['epoch'] + 1) * 4:,} samples seen" \
        in again.stdout
    rows = wlcnn.read_history(history)
    assert [r["epoch"] for r in rows] == list(range(9))
    info = json.loads((out / "run_00" / "run.json").read_text())
    assert info["status"] == "complete" and info["epochs_done"] == 9
    assert info["preset"]["name"] == "paper" and info["preset"]["epochs"] == 9
    assert sorted(os.listdir(out / "run_00")) == ["best.keras", "history.csv", "run.json"]
    assert len(wlcnn.load_runs(out)) == 1
    # the same directory with other settings is refused, naming them
    other = subprocess.run(cmd[:-1] + ["4"], env=env, capture_output=True, text=True)
    assert other.returncode == 2 and "other settings (preset)" in other.stderr


# --------------------------------------------------------------------------
# The shipped model
# --------------------------------------------------------------------------
def _assert_predicts_as_recorded(model, want):
    """Mean, std, two pixels and sum |kappa| of the model's 128^2 prediction for a
    fixed input, against the values recorded when the file was written."""
    assert wlcnn.model_info(model)["variant"] == "FocalLoss"
    rng = np.random.default_rng(2021)
    x = np.concatenate([rng.normal(0, 0.3, (1, 386, 386, 2)),
                        np.full((1, 386, 386, 1), 0.3)], axis=-1).astype("float32")
    p = model.predict(x, verbose=0)[0, :, :, 0].astype(np.float64)
    got = (p.mean(), p.std(), p[64, 64], p[10, 100], np.abs(p).sum())
    # the same weights through the same ops agree to float32 round-off (~1e-7
    # relative; 1e-5 is margin for oneDNN's reordered sums, a changed weight or
    # layer moves them by > 1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_shipped_quick_model_loads_and_predicts_as_recorded():
    models = wlcnn.load_runs(EXAMPLES / "quick_model")
    assert len(models) == 2  # quick_focalloss.keras (seed 0), quick_focalloss_seed1.keras
    recorded = [(-0.025141862161824235, 0.0093837524261681, -0.029826944693922997,
                 -0.019245570525527, 412.39420236099977),
                (-0.03017003939091012, 0.008780091786885873, -0.035236380994319916,
                 -0.021637624129652977, 494.3059253806714)]
    for model, want in zip(models, recorded):
        _assert_predicts_as_recorded(model, want)


def test_shipped_paper_model_loads_and_predicts_as_recorded():
    models = wlcnn.load_runs(EXAMPLES / "paper_run")
    assert len(models) == 1  # paper_focalloss.keras: the best epoch of the paper-preset run
    info = json.loads((EXAMPLES / "paper_run" / "run.json").read_text())
    assert info["status"] == "complete" and info["preset"]["name"] == "paper"
    assert info["epochs_done"] == info["preset"]["epochs"] == 200
    _assert_predicts_as_recorded(models[0], (-0.026090754985061082, 0.010125545466446555,
                                             -0.031755413860082626, -0.011855082586407661,
                                             427.98063656993327))


def test_shipped_ks93_start_model_loads_and_predicts_as_recorded():
    models = wlcnn.load_runs(EXAMPLES / "ks93_start_run")
    assert len(models) == 1  # paper_focalloss.keras: the best epoch of the KS93-start run
    info = json.loads((EXAMPLES / "ks93_start_run" / "run.json").read_text())
    assert info["status"] == "complete" and info["preset"]["init"] == "ks93"
    assert info["epochs_done"] == info["preset"]["epochs"] == 200
    _assert_predicts_as_recorded(models[0], (-0.03345910713588296, 0.006072956216930417,
                                             -0.03764933720231056, -0.03424207493662834,
                                             548.1940113143064))


# --------------------------------------------------------------------------
# The learning curve of a run's snapshots (examples/learning_curve.py)
# --------------------------------------------------------------------------
def test_learning_curve_scores_each_snapshot_as_evaluate_methods_does(tiny_dataset, tmp_path):
    import learning_curve
    runs = tmp_path / "runs"
    # the paper preset cut to seconds, as above, with a snapshot after every epoch
    cmd = [sys.executable, str(EXAMPLES / "train.py"), "--data", str(tiny_dataset),
           "--out", str(runs), "--preset", "paper", "--runs", "1", "--epochs", "2",
           "--steps-per-epoch", "1", "--batch-size", "2", "--n-val", "2",
           "--snapshot-every", "1", "--verbose", "0"]
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES.parent))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    run, out = runs / "run_00", tmp_path / "curve"
    argv = ["--run", str(run), "--data", str(tiny_dataset), "--out", str(out),
            "--n-clusters", "2", "--stride", "36"]
    assert learning_curve.main(argv) == 0
    rows = learning_curve.read_rows(out / "learning_curve.csv")
    assert [(r["epoch"], r["samples"]) for r in rows] == [(1, 2), (2, 4)]  # 1 step of 2
    history = wlcnn.read_history(run / "history.csv")
    assert [r["val_loss"] for r in rows] == [h["val_loss"] for h in history]
    # the reference: the snapshot's model through evaluate_methods on the same clusters
    info = json.loads((run / "run.json").read_text())
    config, model = learning_curve.run_config(info)
    ds = wlcnn.ClusterDataset(tiny_dataset)
    for r in rows:
        model.load_weights(run / f"snapshot-{r['epoch']:04d}.weights.h5")
        ev = wlcnn.evaluate_methods(
            list(ds.clusters("val"))[:2], {"CNN": wlcnn.cnn_method([model], config, stride=36,
                                                         orientations=1)},
            config, progress=False)
        ref = wlcnn.table2(ev)[0]
        for k in learning_curve.METRIC_KEYS:
            # the same maps and pixels by two paths: float64 sums, round-off only
            assert r[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
    assert {"learning_curve.png", "history.csv", "run.json", "paper_focalloss.keras",
            "ks93_reference.json"} <= set(os.listdir(out))
    ref = json.loads((out / "ks93_reference.json").read_text())
    # the run's validation set drawn again (same fingerprint), so KS93's loss is on it
    x, y = wlcnn.fixed_subfields(tiny_dataset, "val", 2, 0, 3, config)
    pred = wlcnn.truncated_ks93(x, config.filter_size, ref["fwhm_arcmin"], config)
    loss = wlcnn.make_loss(config)
    assert ref["val_loss"] == pytest.approx(
        float(loss(y, pred.astype(np.float32))), rel=1e-6)  # float32 sums
    assert ref["zero_val_loss"] == pytest.approx(float(loss(y, 0 * y)), rel=1e-6)
    assert len(wlcnn.load_runs(out)) == 1  # --models OUT works
    # a rerun scores nothing again: the rows are read back, not recomputed
    (out / "learning_curve.csv").write_text(
        (out / "learning_curve.csv").read_text().replace(str(rows[0]["R"]), "0.5", 1))
    assert learning_curve.main(argv) == 0
    assert learning_curve.read_rows(out / "learning_curve.csv")[0]["R"] == 0.5
