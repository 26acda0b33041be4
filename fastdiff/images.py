"""Image outputs: PNG grids, one PNG per sample, raw sample archives, and denoising-trajectory figures."""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from fastdiff.checkpoint import atomic_write, atomic_write_all, read_json
from fastdiff.errors import FastdiffError, access_error


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1], [N, C, H, W] -> uint8 [N, H, W, C]."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile N images into one uint8 [H, W, C] array, nrow images per row, each upscaled by `scale` (nearest)."""
    imgs = to_uint8(x)
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = imgs.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = imgs[i]
    return grid


def class_columns(n: int, classes: int) -> int | None:
    """Images per grid row for n samples of cycling labels (i % classes): a multiple of `classes`, so that each
    column holds one class, near a square grid (2 classes in 64 samples: 8 columns, not a strip of 2); None (a
    square grid) for an unconditional model or fewer than two samples a class."""
    if not classes or n < 2 * classes:
        return None
    return classes * max(1, round(math.sqrt(n) / classes))


def auto_scale(size: int) -> int:
    """Upscale factor so that small images (8x8 digits) are visible in a grid: at least ~64 px per image."""
    return max(1, 64 // size)


def writable(path: Path) -> Path:
    """`path` with its folder created; one FastdiffError when it cannot be (`check_writable` checks a path before the
    work that ends in writing it)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastdiffError(f"cannot create the output folder {path.parent}: {e.strerror}; choose a writable path")
    return path


def check_writable(path, *, folder: bool = False, what: str = "the output") -> None:
    """One FastdiffError now, before any work, where `path` (a file; with `folder`, a folder of files) could not be
    written: it is a folder (a file), or its nearest existing parent is no writable folder. Creates nothing, so a
    command refused later leaves no folders behind (`writable` creates them when the file is written)."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise FastdiffError(f"{what} {path} is a file, not a folder; choose a folder")
    if not folder and path.is_dir():
        raise FastdiffError(f"{what} {path} is a folder; choose a file name")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise FastdiffError(f"cannot write {what} {path}: {parent} is not a writable folder; choose a writable path")


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def save_png(array: np.ndarray, path) -> Path:
    """Every file here is written whole or not at all (`atomic_write`): a full disk leaves no 0-byte PNG."""
    return atomic_write(writable(path), png_bytes(array))


def grid_png(x: torch.Tensor, nrow: int | None = None) -> bytes:
    return png_bytes(make_grid(x, nrow, scale=auto_scale(x.shape[-1])))


def samples_npz(samples: torch.Tensor, labels: torch.Tensor | None, seeds: torch.Tensor) -> bytes:
    """Raw samples as .npz: images uint8 [N, H, W, C], float samples in [-1, 1], labels and per-sample seeds."""
    arrays = {"images": to_uint8(samples), "samples": samples.float().cpu().numpy(), "seeds": seeds.cpu().numpy()}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def save_grid_and_samples(x: torch.Tensor, labels, seeds, grid_path, samples_path, nrow: int | None = None):
    """The grid and its raw samples (`samples_npz`) written together (`atomic_write_all`): never a new grid beside
    an old .npz. Returns their paths."""
    return atomic_write_all({writable(grid_path): grid_png(x, nrow),
                             writable(samples_path): samples_npz(x, labels, seeds)})


def sample_name(seed: int, label: int | None) -> str:
    """`seed000123-label7.png`, or `seed000123.png` for an unconditional sample."""
    return f"seed{seed:06d}.png" if label is None else f"seed{seed:06d}-label{label}.png"


SAMPLE_NAME = re.compile(r"seed\d+(-label\d+)?\.png")  # every name `sample_name` gives


def _names(seeds, labels) -> list[str]:
    seeds = [int(s) for s in seeds]
    labels = [None] * len(seeds) if labels is None else [int(y) for y in labels]
    if len(seeds) != len(labels):
        raise ValueError(f"{len(seeds)} seeds and {len(labels)} labels")
    return [sample_name(s, y) for s, y in zip(seeds, labels)]


SAMPLES_MANIFEST = ".fastdiff-samples.json"  # in a folder of sample images: the sampling that wrote them


def is_sample_file(name: str) -> bool:
    """A file that `save_images` writes."""
    return name == SAMPLES_MANIFEST or SAMPLE_NAME.fullmatch(name) is not None


def check_images_folder(out_dir, seeds, labels, source: dict, what: str = "--save-images") -> None:
    """One FastdiffError now, before the sampling, where out_dir holds sample images of another sampling, which
    these would mix with (whatever reads the folder, a FID over it, would count both):
    - its manifest (`SAMPLES_MANIFEST`, which `save_images` writes) names another `source` (weights and settings;
      its "checkpoint", where they were read from, only says so): seeds of the same sampling are welcome, so
      shards of one FID set go into one folder;
    - without one, sample images (`SAMPLE_NAME`) that these seeds and labels would not replace, of unknown origin.
    Images of the same names are replaced whole; other files are ignored."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    source = json.loads(json.dumps(source))
    if (out_dir / SAMPLES_MANIFEST).exists():
        earlier = read_json(out_dir / SAMPLES_MANIFEST, error=FastdiffError)
        changed = sorted(k for k in set(earlier) | set(source) if k != "checkpoint" and earlier.get(k) != source.get(k))
        if changed:
            said = "; ".join(f"{k} {earlier.get(k)!r} there, {source.get(k)!r} now" for k in changed)
            if "weights" in changed:
                said += f"; the weights of {earlier.get('checkpoint')} there, of {source.get('checkpoint')} now"
            raise FastdiffError(f"{what} {out_dir} holds the samples of another sampling ({said}), which these would "
                                "mix with; choose a new or empty folder")
        return
    ours = set(_names(seeds, labels))
    try:
        stale = sorted(p.name for p in out_dir.iterdir() if SAMPLE_NAME.fullmatch(p.name) and p.name not in ours)
    except PermissionError:
        raise access_error(out_dir, "list") from None
    if stale:
        raise FastdiffError(f"{what} {out_dir} already holds {len(stale)} sample image(s) of an unknown sampling that "
                            f"this run would not replace (e.g. {stale[0]}), so it would mix two samplings; choose a "
                            "new or empty folder, or remove them")


def save_images(images: torch.Tensor, seeds, labels, out_dir, source: dict | None = None) -> list[Path]:
    """One PNG per sample in out_dir, at the model's resolution, named by its seed and label (`sample_name`):
    float images in [-1, 1] [N, C, H, W] become uint8 exactly as in the grids (`to_uint8`). With `source` (the
    sampling's checkpoint and settings) the folder's manifest records it first (`check_images_folder`)."""
    names = _names(seeds, labels)
    if len(images) != len(names):
        raise ValueError(f"{len(images)} images, {len(names)} seeds")
    out_dir = Path(out_dir)
    if source is not None:
        atomic_write(writable(out_dir / SAMPLES_MANIFEST), (json.dumps(source, indent=1) + "\n").encode())
    return [save_png(a, out_dir / name) for a, name in zip(to_uint8(images), names)]


def save_trajectory(frames: list[tuple[str, torch.Tensor, torch.Tensor]], path, title: str = "") -> Path:
    """The DDPM paper's figure: for each sample a row of x_t from noise to image, under it a row of the
    model's x0 prediction at the same steps. frames: [(column label, x [R, C, H, W], x0 [R, C, H, W]), ...],
    where x is the sample after that denoising step (the step's input was at timestep t)."""
    # a standalone Figure on the Agg canvas, as fastdiff.plot draws: matplotlib.use("Agg") switched a notebook's
    # backend for the whole process
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = writable(path)
    n_rows = frames[0][1].shape[0]
    cols = len(frames)
    fig = Figure(figsize=(1.1 * cols, 1.15 * 2 * n_rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * n_rows, cols, squeeze=False)
    for j, (t, xt, x0) in enumerate(frames):
        for r in range(n_rows):
            for k, img in enumerate((xt[r : r + 1], x0[r : r + 1])):
                ax = axes[2 * r + k][j]
                a = to_uint8(img)[0]
                ax.imshow(a[..., 0] if a.shape[-1] == 1 else a, cmap="gray", vmin=0, vmax=255,
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 and k == 0:
                    ax.set_title(t, fontsize=7)
                if j == 0:
                    ax.set_ylabel("sample" if k == 0 else "x0 pred", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    return atomic_write(path, buf.getvalue())
