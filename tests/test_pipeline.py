"""§2.3.2 input pipeline: the tf.data stream of (subfield, target) pairs."""
import numpy as np
import pytest

import wlcnn
from skies import write_dataset

tf = pytest.importorskip("tensorflow")


def _first_batches(path, k=2, **kw):
    train, val = wlcnn.training_data(path, batch_size=3, seed=5, n_val=4, **kw)
    it = iter(train)
    return [next(it) for _ in range(k)], val


def test_stream_has_the_network_shapes_and_finite_values(tiny_dataset):
    batches, (xv, yv) = _first_batches(tiny_dataset)
    x, y = batches[0]
    assert x.shape == (3, 386, 386, 3) and y.shape == (3, 128, 128, 1)
    assert x.dtype == tf.float32 and y.dtype == tf.float32
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(y))
    assert xv.shape == (4, 386, 386, 3) and yv.shape == (4, 128, 128, 1)
    # the targets are truth κ windows: the blobs peak at 0.4, most pixels ~0
    assert 0 < float(tf.reduce_max(y)) <= 0.4


def test_same_seed_same_stream(tiny_dataset):
    a = _first_batches(tiny_dataset, k=1)[0][0]
    b = _first_batches(tiny_dataset, k=1)[0][0]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_every_target_is_a_window_of_its_clusters_mosaic_truth(tiny_dataset):
    """Each target equals some (cluster, offset, orientation) window of a stored truth."""
    ds = wlcnn.ClusterDataset(tiny_dataset)
    mosaics = [wlcnn.mosaic_truth(c["kappa"]) for c in ds.clusters("train")]
    x, y = _first_batches(tiny_dataset, k=1)[0][0]
    for target in y.numpy()[..., 0]:
        # 1e-30: TensorFlow flushes float32 denormals (< 1.2e-38) to zero
        found = any(np.abs(wlcnn.orient_map(target, t_inv)
                           - mos[m_y:m_y + 128, m_x:m_x + 128]).max() < 1e-30
                    for mos in mosaics for t_inv in wlcnn.ORIENTATIONS
                    for m_y in range(38) for m_x in range(38)
                    if abs(mos[m_y, m_x] - wlcnn.orient_map(target, t_inv)[0, 0]) < 1e-30)
        assert found


def test_fresh_catalogs_change_the_input_not_the_target(tiny_dataset):
    fixed, _ = _first_batches(tiny_dataset, k=1)
    fresh, _ = _first_batches(tiny_dataset, k=1, fresh_catalogs=True)
    assert not np.array_equal(fixed[0][0], fresh[0][0])
    # same seed → same clusters, offsets and orientations: same targets
    np.testing.assert_array_equal(fixed[0][1], fresh[0][1])


def test_four_channel_stream_carries_the_density(tiny_dataset):
    x, _ = _first_batches(tiny_dataset, k=1, channels=4)[0][0]
    assert x.shape[-1] == 4
    inner = x.numpy()[:, 50:-50, 50:-50, 3]
    # density / (25 per arcmin²) averages to ~1: a 7″ kernel holds only 0.4 sources
    # on average, so the pixel values are very noisy but their mean is not;
    # 0.75-1.25 allows for star masks and Poisson noise over 3 subfields.
    assert 0.75 < inner.mean() < 1.25


def test_fixed_validation_set_is_reproducible_and_rejects_empty_splits(tiny_dataset, tmp_path):
    a = wlcnn.fixed_subfields(tiny_dataset, "val", n=3, seed=2)
    b = wlcnn.fixed_subfields(tiny_dataset, "val", n=3, seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    from conftest import blob_field
    write_dataset(tmp_path, {"train": 2, "val": 0}, field_fn=blob_field, progress=False)
    with pytest.raises(ValueError, match="no val clusters"):
        wlcnn.training_data(tmp_path, batch_size=2)
    with pytest.raises(ValueError, match="unknown split"):
        wlcnn.training_data(tiny_dataset, batch_size=2, split="training")
