"""Shared fixtures: a tiny dataset of cheap Gaussian-blob clusters."""
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

# The applications of the method (sky simulator, ray-traced ingestion, catalog
# reconstruction, the evaluation report) are example scripts; their tests
# import them from examples/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import wlcnn
from skies import write_dataset


def blob_field(config, rng, *_):
    """A cheap stand-in for a cluster field: a Gaussian κ blob and its shear."""
    n = config.npix
    yy, xx = np.mgrid[0:n, 0:n]
    cy, cx = rng.uniform(0.4 * n, 0.6 * n, 2)
    kappa = 0.4 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.03 * n) ** 2))
    g1, g2 = wlcnn.shear_from_kappa(kappa)
    return {"kappa": kappa, "gamma1": g1, "gamma2": g2, "meta": {"cx": float(cx), "cy": float(cy)}}


def rewrite_zip_entry(src, dst, entry, old, new):
    """Copy the zip file ``src`` (a .keras model) to ``dst`` with the bytes ``old`` of member
    ``entry`` replaced by ``new``: a file as another release would write it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == entry:
                data = data.replace(old, new)
            zout.writestr(item, data)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """6 train / 3 val / 2 test clusters in shards of 2, with star masks."""
    path = tmp_path_factory.mktemp("tiny")
    write_dataset(path, {"train": 6, "val": 3, "test": 2}, seed=1, field_fn=blob_field,
                  shard_size=2, masks=True, progress=False)
    return path


@pytest.fixture(scope="session")
def evaluation(tiny_dataset):
    """KS93 and a stand-in CNN (KS93 at two smoothings as two "runs", cut to the CNN's
    region) evaluated on the tiny dataset's test clusters."""
    ds = wlcnn.ClusterDataset(tiny_dataset)
    region = wlcnn.mosaic_coverage(ds.config) > 0

    def cnn(grid):
        return np.stack([np.where(region, wlcnn.ks93_mosaic(grid, ds.config, f), np.nan)
                         for f in (1.0, 1.5)])
    methods = {"KS93": lambda grid: wlcnn.ks93_mosaic(grid, ds.config, 1.0), "CNN": cnn}
    return wlcnn.evaluate_methods(ds.clusters("test"), methods, ds.config,
                                  total=ds.count("test"), progress=False)
