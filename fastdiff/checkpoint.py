"""Checkpoints: safetensors weights + JSON, written atomically; resolving and loading them back.

A run directory holds checkpoints/step-<N>/ folders, each complete or absent: a checkpoint is written into a
hidden temporary folder, flushed to disk, then renamed into place, so a killed run never leaves a partial one.

    step-000001000/model.safetensors      the trained weights
    step-000001000/ema.safetensors        the EMA weights (used for sampling by default)
    step-000001000/optimizer.safetensors  optimizer tensors (its scalars and groups are in state.json)
    step-000001000/state.json             step, images seen, optimizer groups, grad-scaler state, ...
    step-000001000/config.json            the resolved run config
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastdiff.errors import CheckpointError

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1][1] if dirs else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from a run directory (its latest checkpoint) or a checkpoint folder itself."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; pass a run directory written by `fastdiff train`")
    if (p / "model.safetensors").exists():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(
            f"{p} holds no checkpoint (no {CHECKPOINTS}/step-*/model.safetensors); train a model into it first"
        )
    return latest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_checkpoint(run_dir, step: int, *, tensors: dict[str, dict[str, torch.Tensor]], state: dict, config: dict,
                    keep: int = 2) -> Path:
    """Write checkpoints/step-<step>/ atomically and keep only the newest `keep` checkpoints."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, group in tensors.items():
        save_file(_cpu(group), str(tmp / f"{name}.safetensors"))
    for name, obj in (("state", state), ("config", config)):
        with open(tmp / f"{name}.json", "w") as f:
            json.dump(obj, f, indent=2)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # re-saving a step (a resumed run that stops where it started): swap, then delete
        old = root / f".old-step-{step:09d}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(root)
    for _, stale in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir) -> None:
    """Leftovers of a run killed while writing a checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-step-", ".old-step-")):
                shutil.rmtree(p, ignore_errors=True)


def load_tensors(ckpt_dir, name: str, device="cpu") -> dict[str, torch.Tensor]:
    path = Path(ckpt_dir) / f"{name}.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, delete {ckpt_dir} to use an older one")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); delete {ckpt_dir} to resume from an older checkpoint")


def load_json(ckpt_dir, name: str) -> dict:
    path = Path(ckpt_dir) / f"{name}.json"
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from None


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state does not match the model: {e}") from None


def load_model_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where) -> None:
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{where} does not fit this model ({first}); was it written with another config?")
