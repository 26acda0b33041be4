"""Downloads of the official dataset archives, verified by checksum and written atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from fastdiff.errors import DataError

# Each file: "md5:<hex>" or "sha256:<hex>" of the archive as published.
RESOURCES: dict[str, dict] = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        "files": {
            "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "files": {
            "train-images-idx3-ubyte.gz": "sha256:08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
            "train-labels-idx1-ubyte.gz": "sha256:b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
            "t10k-images-idx3-ubyte.gz": "sha256:78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
            "t10k-labels-idx1-ubyte.gz": "sha256:42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
        },
    },
    "cifar10": {
        "mirrors": ["https://www.cs.toronto.edu/~kriz/"],
        "files": {"cifar-10-python.tar.gz": "md5:c58f30108f718f92721af3b95e74349a"},
    },
}


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, checksum: str) -> None:
    algorithm, _, expected = checksum.partition(":")
    got = file_digest(path, algorithm)
    if got != expected:
        raise DataError(f"{path.name} failed its {algorithm} check (expected {expected}, got {got})")


def download_file(filename: str, mirrors: list[str], checksum: str, dest_dir: Path, timeout: float = 60) -> Path:
    """Fetch `filename` from the first mirror that serves it with the right checksum; atomic write."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / filename
    part = dest_dir / (filename + ".part")
    reasons = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
            verify(part, checksum)
        except (urllib.error.URLError, OSError, DataError) as e:
            reasons.append(f"{url}: {getattr(e, 'reason', e)}")
            part.unlink(missing_ok=True)
            continue
        os.replace(part, dest)
        return dest
    raise DataError(f"could not download {filename} ({'; '.join(reasons)})")


def fetch_dataset(name: str, dest_dir: Path, needed: list[str]) -> None:
    """Download the missing archives of dataset `name` into dest_dir, or explain where to put them."""
    res = RESOURCES[name]
    missing = [f for f in needed if not (dest_dir / f).exists()]
    for filename in missing:
        try:
            download_file(filename, res["mirrors"], res["files"][filename], dest_dir)
        except DataError as e:
            files = ", ".join(missing)
            raise DataError(
                f"{e}. Without network, download {files} from {res['mirrors'][0]} yourself and put them in "
                f"{dest_dir} (or pass --data-dir to a folder that holds them)"
            ) from None
