"""Readers for the on-disk formats: IDX (MNIST, Fashion-MNIST), the CIFAR-10 python pickles, the FER-2013 CSV,
and image folders. Every reader returns uint8 images [N, C, H, W] and int64 labels [N], and raises DataError
naming the file and the fix when the input is malformed."""

from __future__ import annotations

import csv
import gzip
import math
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from fastdiff.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IDX_TYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
# Images of an image folder are decoded only up to this many pixels (8192 x 8192; 200 MB as RGB): a larger one,
# or a decompression bomb, is refused before it is decoded. PIL's own limit (89M, a warning) is above it.
MAX_IMAGE_PIXELS = 1 << 26


def parse_pixels(fields: list[str], count: int, where: str) -> np.ndarray:
    """`count` integer pixel values in 0..255 from the fields of one CSV row; `where` names the file and line."""
    if len(fields) != count:
        raise DataError(f"{where} has {len(fields)} pixel values, expected {count}")
    try:
        values = np.asarray(fields, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(f for f in fields if not _is_int(f))
        raise DataError(f"{where}: pixel value {bad.strip()!r} is not an integer in 0..255") from None
    if values.min() < 0 or values.max() > 255:
        bad = values[(values < 0) | (values > 255)][0]
        raise DataError(f"{where}: pixel value {bad} is outside 0..255")
    return values.astype(np.uint8)


def parse_label(field: str | None, num_classes: int, where: str) -> int:
    """One class label in 0..num_classes-1 from a CSV field."""
    if field is None or not _is_int(field) or not 0 <= int(field) < num_classes:
        raise DataError(f"{where}: label {field!r} is not an integer in 0..{num_classes - 1}")
    return int(field)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """Labels read from a binary file must be integers in 0..num_classes-1; the error names the first bad record."""
    labels = np.asarray(labels)
    if labels.size and labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels are {labels.dtype}, expected integers 0..{num_classes - 1}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{where}: record {bad[0]} has label {labels[bad[0]]}, outside 0..{num_classes - 1}")
    return labels.astype(np.int64)


def check_pixels(data, where: str) -> np.ndarray:
    """Pixel data as uint8: a uint8 array, or integers in 0..255 (never wrapped or clipped)."""
    arr = np.asarray(data)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind not in "iu":
        raise DataError(f"{where}: pixel values are {arr.dtype}, expected uint8 (integers 0..255)")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DataError(f"{where}: pixel values span {arr.min()}..{arr.max()}, outside 0..255")
    return arr.astype(np.uint8)


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


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
    if len(raw) >= 4 and raw[0] == 0 and raw[1] == 0 and raw[2] in IDX_TYPES and raw[2] != 0x08:
        raise DataError(f"{path} holds {IDX_TYPES[raw[2]]} values, but images and labels must be unsigned bytes "
                        f"(0..255); convert it to uint8 or {fix}")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (bad magic number); {fix}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; {fix}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)  # Python ints: numpy's int64 product wraps (2^31 * 2^31 * 4 gives 0)
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
        ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
        ("numpy._core.numeric", "_frombuffer"),
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
        data = np.asarray(d[b"data"] if b"data" in d else d["data"])
        labels = np.asarray(d[b"labels"] if b"labels" in d else d["labels"])
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path} is not a valid CIFAR-10 batch ({e}); delete it: the next run extracts it again "
                        "from the archive, or downloads the archive where it is gone")
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: expected data [N, 3072] and N labels, found {data.shape} and {len(labels)} labels")
    data, labels = check_pixels(data, str(path)), check_labels(labels, 10, str(path))
    return data.reshape(-1, 3, 32, 32), labels


def extract_tar(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz, refusing members that would land outside dest. On failure, what this extraction
    created at the top of dest is removed again, so a truncated archive leaves no half-filled folder."""
    before = set(dest.iterdir()) if dest.is_dir() else set()
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
        _remove_new(dest, before)
        raise DataError(f"cannot extract {archive}: {e}; delete it and download it again") from None
    except BaseException:
        _remove_new(dest, before)
        raise


def _remove_new(dest: Path, before: set[Path]) -> None:
    import shutil

    for path in set(dest.iterdir()) - before if dest.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


FER_SIZE = 48


def read_fer2013(path: Path, usages: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """The Kaggle FER-2013 CSV: columns emotion (0-6), pixels (2304 space-separated values), Usage."""
    images, labels = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is no part of a name
            reader = csv.DictReader(f)
            fields = {name.strip(): name for name in (reader.fieldnames or [])}
            for col in ("emotion", "pixels", "Usage"):
                if col not in fields:
                    raise DataError(f"{path} has no {col!r} column (found {list(fields)}); expected the FER-2013 CSV")
            for row in reader:
                where = f"{path} line {reader.line_num}"
                usage, pixels = row[fields["Usage"]], row[fields["pixels"]]
                if usage is None or pixels is None:
                    raise DataError(f"{where} has too few columns; expected emotion, pixels, Usage")
                if usage.strip() not in usages:
                    continue
                images.append(parse_pixels(pixels.split(), FER_SIZE * FER_SIZE, where).reshape(1, FER_SIZE, FER_SIZE))
                labels.append(parse_label(row[fields["emotion"]], 7, where))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not images:
        raise DataError(f"{path} has no rows with Usage in {sorted(usages)}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def is_image_file(path: Path) -> bool:
    """A file an image folder's reader reads: an image suffix, not hidden (a zip made on a Mac holds a
    "._NAME.png" of metadata beside each image)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_class_folders(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot list the image folder {root}: {e}") from None


# Modes that convert to L / RGB without losing range; 16-bit and float images (I, I;16, F) would be clipped to 255.
EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def _read_image(file: Path, mode: str, size: int) -> np.ndarray:
    """One image, turned upright by its EXIF orientation (as a viewer shows it), center-cropped to a square and
    resized to size x size, as uint8 [H, W] or [H, W, 3]."""
    import warnings

    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as im:  # reads the header only: the size is known before decoding
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise DataError(f"image {file} is {w}x{h} pixels, more than fastdiff decodes "
                                    f"({MAX_IMAGE_PIXELS:,}); shrink it or remove it")
                if im.mode not in EIGHT_BIT_MODES:
                    raise DataError(f"image {file} has {im.mode} pixels (16-bit or float), which would be clipped "
                                    "to 0..255; save it as an 8-bit image")
                im = ImageOps.exif_transpose(im)  # a phone photo's pixels are stored sideways
                w, h = im.size
                if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
                    # transparent pixels as a viewer shows them, over white: convert() would drop the alpha and
                    # keep their colour, often black (a sprite of black strokes came out a black square)
                    im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
                im = im.convert(mode)
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((size, size), Image.Resampling.BICUBIC)
                return np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {file} is too large to decode safely ({e}); shrink it or remove it") from None
    except Exception as e:  # a damaged file: PIL's decoders raise OSError, SyntaxError, EOFError, struct.error...
        raise DataError(f"cannot read image {file}: {e}; remove or replace it") from None


def read_folder(root: Path, class_names: list[str], channels: int, size: int, keep=lambda i: True,
                split_rule: str = ""):
    """Images under root/<class>/ for each class name (the i-th of each where keep(i): a split, whose rule
    `split_rule` states for the error where it keeps none), center-cropped to a square and resized to size. Every
    class folder must hold at least one image."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"image folders load as 1 or 3 channels, not {channels}")
    images, labels, found = [], [], 0
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"class folder {folder} does not exist; every split needs the same class folders")
        try:
            files = sorted(p for p in folder.iterdir() if is_image_file(p))
        except OSError as e:
            raise DataError(f"cannot list the class folder {folder}: {e}") from None
        if not files:
            raise DataError(f"class folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "add images or remove the folder")
        found += len(files)
        for i, file in enumerate(files):
            if keep(i):
                arr = _read_image(file, mode, size)
                images.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
                labels.append(label)
    if not images and found:
        raise DataError(f"none of the {found} images in the class folders of {root} is in this split: {split_rule}")
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in the class folders of {root}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


__all__ = ["check_labels", "check_pixels", "extract_tar", "find_file", "list_class_folders", "parse_label",
           "parse_pixels", "read_cifar_batch", "read_fer2013", "read_folder", "read_idx"]
