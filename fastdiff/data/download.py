"""Downloads of the official dataset archives, verified by checksum and written atomically; files that the user
brings are checked against the same checksums (a warning when they differ)."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from fastdiff.errors import DataError, FastdiffWarning
from fastdiff.files import remove_stale_files

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


class DataWarning(FastdiffWarning):
    """A dataset file that fastdiff reads but that differs from the published one."""


def check_published(name: str, path: Path) -> None:
    """Warn when `path` is named like one of dataset `name`'s published archives but has another checksum.
    Files under other names (e.g. the uncompressed IDX files) have no published checksum and are not checked."""
    checksum = RESOURCES.get(name, {}).get("files", {}).get(path.name)
    if checksum is None:
        return
    algorithm, _, expected = checksum.partition(":")
    got = file_digest(path, algorithm)
    if got != expected:
        warnings.warn(f"{path} differs from the published {path.name} ({algorithm} {got}, expected {expected}); "
                      "results will not compare with runs on the official data", DataWarning, stacklevel=2)


def download_file(filename: str, mirrors: list[str], checksum: str, dest_dir: Path, timeout: float = 60) -> Path:
    """Fetch `filename` into the existing dest_dir from the first mirror that serves it with the right checksum;
    atomic write (a temporary file renamed into place, removed on any failure, Ctrl-C included)."""
    dest = dest_dir / filename
    # each process its own temporary file (a shared FILE.part was truncated by the next rank); a killed one's go
    part = dest_dir / f".{filename}.{os.getpid()}.tmp"
    remove_stale_files(dest_dir, names={filename}.__contains__)
    reasons = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        try:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
                    shutil.copyfileobj(response, out, 1 << 20)
                verify(part, checksum)
            except (urllib.error.URLError, http.client.HTTPException, OSError, DataError) as e:  # e.g. IncompleteRead
                reasons.append(f"{url}: {getattr(e, 'reason', e)}")
                continue
            os.replace(part, dest)
            return dest
        finally:
            part.unlink(missing_ok=True)
    raise DataError(f"could not download {filename} ({'; '.join(reasons)})")


def _new_folders(path: Path) -> list[Path]:
    """The folders that `path.mkdir(parents=True)` would create, deepest first."""
    new = []
    while not path.exists() and path != path.parent:
        new.append(path)
        path = path.parent
    return new


def fetch_dataset(name: str, dest_dir: Path, needed: list[str]) -> None:
    """Download the missing archives of dataset `name` into dest_dir, or explain where to put them. On failure,
    the folders this call created are removed again when empty (a failed download leaves nothing behind)."""
    res = RESOURCES[name]
    missing = [f for f in needed if not (dest_dir / f).exists()]
    created = _new_folders(dest_dir)
    try:
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create {dest_dir}: {e}; pass --data-dir to a writable folder") from None
        for filename in missing:
            try:
                download_file(filename, res["mirrors"], res["files"][filename], dest_dir)
            except DataError as e:
                files = ", ".join(f for f in missing if not (dest_dir / f).exists())
                raise DataError(
                    f"{e}. Without network, download {files} from {res['mirrors'][0]} yourself and put them in "
                    f"{dest_dir} (or pass --data-dir to a folder that holds them)"
                ) from None
    except BaseException:
        for folder in created:  # deepest first; stops at the first one that holds something
            try:
                folder.rmdir()
            except OSError:
                break
        raise
