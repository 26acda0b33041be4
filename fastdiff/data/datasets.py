"""Datasets as in-memory uint8 tensors; batches come out as float in [-1, 1], NCHW, with int64 labels.

All supported datasets fit in host memory (CIFAR-10 is 180 MB as uint8), so there is no DataLoader: a batch
is an index into one tensor, moved to the device and scaled there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff.data import formats, mnist5k
from fastdiff.data.download import RESOURCES, check_published, fetch_dataset
from fastdiff.errors import ConfigError, DataError
from fastdiff.runlock import waiting_lock

DATASETS = ("digits", "mnist5k", "mnist", "fashion-mnist", "cifar10", "fer2013", "folder", "synthetic")
SPLITS = ("train", "test")

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = {
    "digits": [str(i) for i in range(10)],
    "mnist5k": [str(i) for i in range(10)],
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "fer2013": ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"],
}
NATIVE = {"digits": (1, 8), "mnist5k": (1, 28), "mnist": (1, 28), "fashion-mnist": (1, 28), "cifar10": (3, 32),
          "fer2013": (1, 48)}
DIGITS_TEST = 360  # the last 20% of a fixed permutation of scikit-learn's 1797 digits are held out


@dataclass
class ImageData:
    name: str
    split: str
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    class_names: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batch(self, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Images scaled to [-1, 1] as float32 on `device`, and their labels."""
        x = self.images[index].to(device, non_blocking=True)
        return x.float() / 127.5 - 1.0, self.labels[index].to(device, non_blocking=True)

    def float_images(self, device="cpu") -> torch.Tensor:
        return self.images.to(device).float() / 127.5 - 1.0


def default_data_dir() -> Path:
    return Path(os.environ.get("FASTDIFF_DATA_DIR", "data")).expanduser()


def _resize(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def _digits(split: str):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    perm = np.random.default_rng(0).permutation(len(images))
    idx = perm[:-DIGITS_TEST] if split == "train" else perm[-DIGITS_TEST:]
    return images[idx], d.target[idx].astype(np.int64)


def _idx_dataset(name: str, root: Path, split: str, download: bool):
    """MNIST and Fashion-MNIST: the four IDX files (train and test), .gz or not. When the split's files are missing,
    all missing files of the four are named (downloaded, or asked for) at once."""
    folder = root / name
    stems = [s for pair in MNIST_FILES.values() for s in pair]
    with waiting_lock("data", folder):  # torchrun's ranks (or two runs) share the folder: one downloads at a time
        paths = {s: formats.find_file(folder, s) for s in stems}
        if any(paths[s] is None for s in MNIST_FILES[split]):
            missing = [s + ".gz" for s in stems if paths[s] is None]
            if not download:
                raise DataError(f"{name} needs the four IDX files (.gz or not) in {folder}; not found: "
                                f"{', '.join(missing)}. Get them from {RESOURCES[name]['mirrors'][0]} and put them "
                                "there (or pass --data-dir to a folder that holds them)")
            fetch_dataset(name, folder, missing)
            paths = {s: formats.find_file(folder, s) for s in stems}
    image_path, label_path = (paths[s] for s in MNIST_FILES[split])
    for path in (image_path, label_path):
        check_published(name, path)
    images = formats.read_idx(image_path, 3)[:, None]
    labels = formats.check_labels(formats.read_idx(label_path, 1), len(CLASS_NAMES[name]), str(label_path))
    if len(images) != len(labels):
        raise DataError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    return images, labels


def _cifar10(root: Path, split: str, download: bool):
    folder = root / "cifar10"
    batches = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    with waiting_lock("data", folder):  # a batch another rank is still unpacking was read truncated
        if not all((batches / n).exists() for n in names):
            archive = folder / "cifar-10-python.tar.gz"
            if not archive.exists():
                if not download:
                    raise DataError(f"CIFAR-10 batches not found in {batches} and no archive {archive}")
                fetch_dataset("cifar10", folder, [archive.name])
            check_published("cifar10", archive)
            formats.extract_tar(archive, folder)
            missing = [n for n in names if not (batches / n).exists()]
            if missing:
                raise DataError(f"{archive} does not contain {', '.join(missing)}; is it the CIFAR-10 python "
                                "archive?")
    parts = [formats.read_cifar_batch(batches / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _fer2013(root: Path, split: str):
    for candidate in (root / "fer2013" / "fer2013.csv", root / "fer2013.csv"):
        if candidate.exists():
            usages = {"Training"} if split == "train" else {"PublicTest", "PrivateTest"}
            return formats.read_fer2013(candidate, usages)
    if root.is_file():  # the CSV itself given as --data-dir
        raise DataError(f"--data-dir {root} is a file; pass the folder that holds fer2013.csv (or fer2013/fer2013.csv)")
    raise DataError(
        f"fer2013.csv not found in {root / 'fer2013'}; FER-2013 cannot be downloaded without a Kaggle account: "
        "get fer2013.csv from the Kaggle challenge page and put it there, or pass --data-dir"
    )


def _folder(root: Path, split: str, channels: int, size: int):
    if not root.is_dir():
        raise DataError(f"image folder {root} {'is a file' if root.exists() else 'does not exist'}; pass --data-dir "
                        "pointing at root/<class>/*.png")
    both = (root / "train").is_dir() and (root / "test").is_dir()
    if not both and _is_split_folder(root / "test"):
        raise DataError(f"{root} has a test/ folder of classes but no train/; add {root / 'train'}/<class>/ beside "
                        f"it, or move the class folders up into {root} (every 10th image is then held out)")
    if not both and _is_split_folder(root / "train"):  # train/<class>/ alone: every 10th image held out, as below
        root = root / "train"
    if both:
        # Both splits take the class names (and so the labels) of train/; test/ must have the same folders.
        classes = [p.name for p in formats.list_class_folders(root / "train")]
        extra = sorted({p.name for p in formats.list_class_folders(root / "test")} - set(classes))
        if extra:
            raise DataError(f"{root / 'test'} has class folders that {root / 'train'} lacks: {', '.join(extra)}")
        root, keep, rule = root / split, (lambda i: True), ""
    else:
        classes = [p.name for p in formats.list_class_folders(root)]
        # Without train/ and test/ folders, every 10th image of each class (in name order) is held out.
        keep = (lambda i: i % 10 != 9) if split == "train" else (lambda i: i % 10 == 9)
        rule = ("without train/ and test/ folders the 10th image of each class (in name order) and every 10th after "
                "it is held out, so a class needs 10 images; add images, or make train/ and test/ folders")
    if not classes:
        raise DataError(f"{root} has no class sub-folders; expected root/<class>/<image files>")
    images, labels = formats.read_folder(root, classes, channels, size, keep, rule)
    return images, labels, classes


def _is_split_folder(path: Path) -> bool:
    """path (root/train or root/test without the other) holds class folders and no images: a split, not a class
    named "train"."""
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    return (any(p.is_dir() and not p.name.startswith(".") for p in entries)
            and not any(formats.is_image_file(p) for p in entries))


def _synthetic(split: str, channels: int, size: int, num_classes: int = 10, n: int | None = None):
    n = n or (1024 if split == "train" else 256)
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return images, labels


def load_dataset(name: str, split: str = "train", *, data_dir=None, image_size: int | None = None,
                 channels: int | None = None, download: bool = True) -> ImageData:
    """Load a dataset split into memory, resized to image_size (None: native size)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use train or test")
    # "~/data" from a config file (the shell expands a flag's): a folder named "~" here would be made and filled
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    class_names = CLASS_NAMES.get(name)
    if name in NATIVE:
        native_c, native_size = NATIVE[name]
        if channels is not None and channels != native_c:
            others = [n for n, (c, _) in NATIVE.items() if c == channels] + ["folder"] * (channels in (1, 3))
            raise ConfigError(f"{name} images have {native_c} channel(s) but the model expects {channels}; "
                              f"set --channels {native_c} or pick a dataset of {channels}-channel images "
                              f"({', '.join(others + ['synthetic'])})")
        size = image_size or native_size
    else:
        size = image_size or 32
        channels = channels or 3
    if name == "digits":
        images, labels = _digits(split)
    elif name == "mnist5k":
        images, labels = mnist5k.load(split)
    elif name in ("mnist", "fashion-mnist"):
        images, labels = _idx_dataset(name, root, split, download)
    elif name == "cifar10":
        images, labels = _cifar10(root, split, download)
    elif name == "fer2013":
        images, labels = _fer2013(root, split)
    elif name == "folder":
        images, labels, class_names = _folder(root, split, channels, size)
    else:
        images, labels = _synthetic(split, channels, size)
        class_names = [str(i) for i in range(10)]
    labels = torch.as_tensor(labels, dtype=torch.int64)  # each reader checked them against its class count
    if len(labels) == 0:
        raise DataError(f"{name} ({split}) has no images")
    return ImageData(name, split, _resize(images, size), labels, list(class_names))
