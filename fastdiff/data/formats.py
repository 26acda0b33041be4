"""Readers for the on-disk formats: IDX (MNIST, Fashion-MNIST), the CIFAR-10 python pickles, the FER-2013 CSV,
and image folders. Every reader returns uint8 images [N, C, H, W] and int64 labels [N], and raises DataError
naming the file and the fix when the input is malformed."""

from __future__ import annotations

import csv
import gzip
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from fastdiff.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}; the file is corrupt or truncated, delete it and download it again")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x00 0x00 0x08 ndim, then big-endian int32 sizes, then data)."""
    raw = _read_bytes(path)
    fix = "delete it and download it again, or replace it with the official file"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (bad magic number); {fix}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; {fix}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path} has {len(raw)} bytes but its header {dims} needs {expected}; {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def find_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.exists():
            return candidate
    return None


class _CifarUnpickler(pickle.Unpickler):
    """Loads only what a CIFAR-10 batch holds (dicts, lists, bytes and numpy arrays): no arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch file")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"] if b"data" in d else d["data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"] if b"labels" in d else d["labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path} is not a valid CIFAR-10 batch ({e}); delete it and download the archive again")
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected data [N, 3072] and N labels, found {data.shape} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def extract_tar(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz, refusing members that would land outside dest."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            root = dest.resolve()
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if root not in target.parents and target != root:
                    raise DataError(f"{archive} has a member outside the target folder: {member.name}")
                if not (member.isfile() or member.isdir()):
                    raise DataError(f"{archive} has an unexpected member type: {member.name}")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: refuse links and special files too
                tar.extractall(dest, filter="data")
            else:
                tar.extractall(dest)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot extract {archive}: {e}; delete it and download it again")


FER_SIZE = 48


def read_fer2013(path: Path, usages: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """The Kaggle FER-2013 CSV: columns emotion (0-6), pixels (2304 space-separated values), Usage."""
    images, labels = [], []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = {name.strip(): name for name in (reader.fieldnames or [])}
            for col in ("emotion", "pixels", "Usage"):
                if col not in fields:
                    raise DataError(f"{path} has no {col!r} column (found {list(fields)}); expected the FER-2013 CSV")
            for row_no, row in enumerate(reader, start=2):
                if row[fields["Usage"]].strip() not in usages:
                    continue
                pixels = row[fields["pixels"]].split()
                if len(pixels) != FER_SIZE * FER_SIZE:
                    raise DataError(f"{path} line {row_no} has {len(pixels)} pixel values, expected {FER_SIZE**2}")
                images.append(np.asarray(pixels, dtype=np.uint8).reshape(1, FER_SIZE, FER_SIZE))
                labels.append(int(row[fields["emotion"]]))
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}")
    if not images:
        raise DataError(f"{path} has no rows with Usage in {sorted(usages)}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def list_class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_folder(root: Path, class_names: list[str], channels: int, size: int, keep=lambda i: True):
    """Images under root/<class>/ for each class name, center-cropped to a square and resized to size."""
    from PIL import Image, UnidentifiedImageError

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"image folders load as 1 or 3 channels, not {channels}")
    images, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for i, file in enumerate(files):
            if not keep(i):
                continue
            try:
                with Image.open(file) as im:
                    im = im.convert(mode)
                    w, h = im.size
                    s = min(w, h)
                    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
                    arr = np.asarray(im, dtype=np.uint8)
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"cannot read image {file}: {e}; remove or replace it")
            images.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in the class folders of {root}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


__all__ = ["extract_tar", "find_file", "list_class_folders", "read_cifar_batch", "read_fer2013", "read_folder",
           "read_idx"]
