"""What one run reads of another run's checkpoints (a student its teacher's, a refiner its generator's, eval a
student's teacher's classifier): the checkpoint pinned when it started, that checkpoint as it stands now, the
fingerprint that caches of its samples are keyed by, and the user's cache for what is derived from shipped models.
The checkpoints themselves: `fastdiff.checkpoint`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from fastdiff.checkpoint import CHECKPOINTS, resolve_checkpoint


def weights_fingerprint(folder) -> str:
    """A short sha256 of a checkpoint folder's weight files (model.safetensors, and ema.safetensors where it has
    one): what a cache of samples of its model is keyed by, so that a folder whose weights changed in place (a
    re-shipped pretrained model, a run trained again into the same directory) is never read stale."""
    digest = hashlib.sha256()
    for name in ("model.safetensors", "ema.safetensors"):
        path = Path(folder) / name
        if path.exists():
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def tensors_fingerprint(named) -> str:
    """A short sha256 of named tensors' names and values, whatever their layout or device: a loaded model's
    weights (`module.state_dict().items()`: the model whose samples a folder holds, wherever it was read from),
    or a dataset's images and labels (which training an evaluation classifier read)."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model) -> str | None:
    """`tensors_fingerprint` of a module's state dict (the weights a sampling reads, wherever they were loaded
    from: a run, pretrained:NAME, a diffusers folder); None for a model that is no torch module."""
    if not isinstance(model, torch.nn.Module):
        return None
    return tensors_fingerprint(model.state_dict().items())


def user_cache_dir() -> Path:
    """fastdiff's folder in the user's cache ($XDG_CACHE_HOME/fastdiff, else ~/.cache/fastdiff): what is derived
    from a shipped model (its evaluation classifier, a student's backbone and teacher pairs), which is never
    written into the installed package."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastdiff"


def pin_checkpoint(path) -> str:
    """The checkpoint folder `path` (a run directory, a checkpoint folder or pretrained:NAME) resolves to now, as an
    absolute path: what a run that reads another run's weights (a student's teacher, a refiner's generator) records
    when it starts, so that a resume reads the same weights after the other run has trained on. pretrained:NAME
    stays a name (its folder moves with the install; a cache of its samples is keyed by `weights_fingerprint`, as
    a newer install may ship other weights under the name)."""
    if str(path).startswith("pretrained:"):
        return str(path)
    return str(resolve_checkpoint(path).resolve())


def pinned_or_its_run(path: str) -> str:
    """A recorded checkpoint (`pin_checkpoint`) as it stands now: itself while it exists, else (its run pruned it,
    keeping only its newest few) its run directory; anything else unchanged."""
    pinned = Path(path)
    if str(path).startswith("pretrained:") or pinned.exists() or pinned.parent.name != CHECKPOINTS:
        return str(path)
    return str(pinned.parent.parent)


__all__ = ["model_fingerprint", "pin_checkpoint", "pinned_or_its_run", "tensors_fingerprint", "user_cache_dir",
           "weights_fingerprint"]
