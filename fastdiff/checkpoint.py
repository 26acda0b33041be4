"""Checkpoints: safetensors weights + JSON, written atomically; resolving, verifying and loading them back.

A run directory holds checkpoints/step-<N>/ folders, each complete or absent: a checkpoint is written into a
hidden temporary folder, flushed to disk, then renamed into place, so a killed run never leaves a partial one.

    step-000001000/model.safetensors      the trained weights
    step-000001000/ema.safetensors        the EMA weights (used for sampling by default)
    step-000001000/optimizer.safetensors  optimizer tensors (its scalars and groups are in state.json)
    step-000001000/state.json             step, images seen, optimizer groups, grad-scaler state, ...
    step-000001000/config.json            the resolved run config

Every tensor load checks that the tensors are finite, every JSON read that the file holds a JSON object, and
pruning never removes the newest checkpoint that passes both checks. One writer at a time:
`fastdiff.runlock.lock_run_dir`. Restoring live objects (model, optimizer, schedulers) from what is loaded here,
checked: `fastdiff.state_dicts`. Files are written by `fastdiff.files` (whose `_write_file`, where the full-disk
tests inject faults, writes a checkpoint's files too).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from fastdiff import files
from fastdiff.errors import CheckpointError, access_error
from fastdiff.files import atomic_write, atomic_write_all, read_json, write_error, write_json_atomic  # noqa: F401

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# --- writing files (fastdiff.files; re-exported here) -----------------------------------------------------------

def save_tensors(path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    """One safetensors file, written atomically (the caches kept beside runs); with `meta`, its JSON beside it
    (path.json) in the same `atomic_write_all`, so that a kill between them cannot leave a new file beside an old
    description."""
    out = {path: safetensors_bytes(_cpu(tensors))}
    if meta is not None:
        out[Path(path).with_suffix(".json")] = files.json_bytes(meta)
    return atomic_write_all(out)[0]


# --- finding checkpoints ------------------------------------------------------------------------------------------

def checkpoint_path(run_dir, step: int) -> Path:
    """Where the checkpoint of `step` goes: RUN/checkpoints/step-<step, 9 digits>."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:09d}"


def checkpoint_dirs(run_dir) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in _listing(root) if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def _listing(folder: Path) -> list[Path]:
    """The entries of a checkpoints folder; one AccessError where this user may not list it."""
    try:
        return list(folder.iterdir())
    except PermissionError:
        raise access_error(folder, "list") from None


def latest_checkpoint(run_dir) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1][1] if dirs else None


# The models shipped inside the package (`make pretrained`): NAME/{model.safetensors, config.json}, one set of
# weights each (a run's EMA weights in fp16), addressed as `pretrained:NAME`.
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def pretrained_names() -> list[str]:
    """The pretrained models shipped in this install (fastdiff/pretrained/NAME/)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").exists())


def is_pretrained(ckpt_dir) -> bool:
    return Path(ckpt_dir).resolve().parent == PRETRAINED_DIR


def holds_one_set(ckpt_dir) -> bool:
    """A folder of one set of weights: a shipped pretrained model, or a copy of its folder (model.safetensors and
    config.json alone). A run's checkpoint has its state.json, and ema.safetensors where the run keeps an EMA."""
    p = Path(ckpt_dir)
    return is_pretrained(p) or not any((p / f).exists() for f in ("state.json", "ema.safetensors",
                                                                   "optimizer.safetensors"))


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from a run directory (its latest checkpoint), a checkpoint folder itself, or
    `pretrained:NAME` (a model shipped in the package)."""
    if str(path).startswith("pretrained:"):
        name = str(path)[len("pretrained:"):]
        folder = PRETRAINED_DIR / name
        if name not in pretrained_names() or not (folder / "model.safetensors").exists():  # "/abs", "../x": no
            names = pretrained_names()
            have = f"available: {', '.join(names)}" if names else "this install ships none"
            raise CheckpointError(f"unknown pretrained model {name!r} ({have}); pass pretrained:NAME or a run "
                                  "directory")
        return folder
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; pass a run directory written by `fastdiff train`")
    if (p / "model.safetensors").exists():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        from fastdiff.interop.diffusers import is_diffusers_folder

        if is_diffusers_folder(p):  # `sample` and `fastdiff.load` read it (they look for one before this)
            raise CheckpointError(f"{p} is a diffusers folder, which fastdiff samples but cannot train from: pass the "
                                  "fastdiff run it was exported from")
        raise CheckpointError(
            f"{p} holds no checkpoint (no {CHECKPOINTS}/step-*/model.safetensors); train a model into it first"
        )
    return latest


def verify_checkpoint(ckpt_dir) -> None:
    """Raise CheckpointError unless every tensor file of the checkpoint loads and is finite and its state.json and
    config.json are JSON objects with a valid step."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "model.safetensors").exists():
        raise CheckpointError(f"{ckpt_dir / 'model.safetensors'} is missing; the checkpoint is incomplete")
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        load_tensors(ckpt_dir, f.name[: -len(".safetensors")], _hint=False)
    load_state(ckpt_dir, keys=TRAINING_STATE if (ckpt_dir / "optimizer.safetensors").exists() else ("step",))
    read_json(ckpt_dir / "config.json")


def latest_good_checkpoint(run_dir, log=None) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint` (None if none does); `log(line)` hears of each newer
    checkpoint skipped and why. Resume starts here, never from a corrupt newer checkpoint."""
    for _, path in reversed(checkpoint_dirs(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            if log is not None:
                log(f"skipping checkpoint {path}: {e}")
            continue
        return path
    return None


def set_aside_newer(run_dir, ckpt_dir) -> list[Path]:
    """Move the checkpoints newer than `ckpt_dir` (the resume point) into checkpoints/set-aside/, where nothing
    reads or prunes them: corrupt ones, or those of an abandoned trajectory, which must not later pass for the
    newest checkpoint of the resumed run. Returns their new paths (nothing is deleted)."""
    step = int(_STEP_DIR.match(Path(ckpt_dir).name).group(1))
    aside = Path(run_dir) / CHECKPOINTS / "set-aside"
    moved = []
    for s, path in checkpoint_dirs(run_dir):
        if s > step:
            aside.mkdir(exist_ok=True)
            dst, k = aside / path.name, 1
            while dst.exists():  # set aside before, at the same step: keep both (step-000000006.1, ...)
                dst, k = aside / f"{path.name}.{k}", k + 1
            os.rename(path, dst)
            moved.append(dst)
    return moved


# --- writing checkpoints ------------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity (one host sync), or None."""
    floats = [(k, v) for k, v in tensors.items() if v.is_floating_point() or v.is_complex()]
    if not floats:
        return None
    ok = torch.stack([torch.isfinite(v).all().to(floats[0][1].device) for _, v in floats])
    if bool(ok.all()):
        return None
    return floats[int((~ok).nonzero()[0, 0])][0]


def _prune(run_dir, n: int, skip_step: int | None = None, good: Path | None = None) -> None:
    """Remove the oldest checkpoints until at most `n` remain (not counting `skip_step`), never the newest good one
    (`good`, else found by `latest_good_checkpoint`)."""
    dirs = [(s, p) for s, p in checkpoint_dirs(run_dir) if s != skip_step]
    excess = dirs[: max(0, len(dirs) - n)]
    if not excess:
        return
    good = good or latest_good_checkpoint(run_dir)
    for _, path in excess:
        if path != good:  # out of sight first: a stop mid-delete left a half-deleted step-* folder among the good
            hidden = path.with_name(f".pruned-{path.name}-{os.getpid()}")
            try:
                os.rename(path, hidden)
            except OSError:
                hidden = path
            shutil.rmtree(hidden, ignore_errors=True)


def save_checkpoint(run_dir, step: int, *, tensors: dict[str, dict[str, torch.Tensor]], state: dict, config: dict,
                    keep: int = 2) -> Path:
    """Write checkpoints/step-<step>/ atomically and keep only the newest `keep` checkpoints (0: all).

    Tensors with NaN or inf are refused before anything is written. Old checkpoints beyond `keep - 1` are removed
    before the new one is written, so keeping k needs room for k checkpoints (2 when k = 1: the old one stays until
    the new one is complete); the newest good checkpoint is never removed. On any write error (a full disk) the
    temporary folder is removed, the earlier checkpoints stay, and one CheckpointError says what to do.
    """
    for name, group in tensors.items():
        bad = first_non_finite(group)
        if bad is not None:
            raise CheckpointError(f"not writing checkpoint step {step}: {name} tensor {bad!r} holds NaN or infinite "
                                  "values (the run diverged); the earlier checkpoints are kept")
    root = Path(run_dir) / CHECKPOINTS
    final = checkpoint_path(run_dir, step)
    tmp = root / f".tmp-step-{step:09d}-{os.getpid()}"
    old = root / f".old-step-{step:09d}-{os.getpid()}"
    if keep > 0:
        _prune(run_dir, keep - 1, skip_step=step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, group in tensors.items():
            files._write_file(tmp / f"{name}.safetensors", safetensors_bytes(_cpu(group)))
        for name, obj in (("state", state), ("config", config)):
            files._write_file(tmp / f"{name}.json", files.json_bytes(obj))
        _fsync(tmp)
        if final.exists():  # re-saving a step (resumed from an older checkpoint): swap, then delete
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)
        if isinstance(e, OSError):
            raise CheckpointError(write_error(final, e)) from None
        raise
    if keep > 0:
        _prune(run_dir, keep, good=final)
    return final


def remove_stale_temporaries(run_dir) -> None:
    """Leftovers of a run killed while writing or pruning a checkpoint (a checkpoint killed mid-swap is put back),
    and the temporary files of a process killed while writing the run's config, stats, plot or a grid (those of
    a process still running, e.g. a `fastdiff sample` into the run directory, are its own)."""
    for folder in (Path(run_dir), Path(run_dir) / "samples"):
        files.remove_stale_files(folder)
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in _listing(root):
            m = re.match(r"^\.old-(step-\d+)-\d+$", p.name)
            if m and not (root / m.group(1)).exists():
                os.rename(p, root / m.group(1))
            elif p.name.startswith((".tmp-step-", ".old-step-", ".pruned-step-")):
                shutil.rmtree(p, ignore_errors=True)


# --- loading ------------------------------------------------------------------------------------------------------

def _good_hint(ckpt_dir: Path) -> str:
    run_dir = ckpt_dir.parent.parent if ckpt_dir.parent.name == CHECKPOINTS else None
    good = latest_good_checkpoint(run_dir) if run_dir is not None else None
    if good is not None and good != ckpt_dir:
        return f"the newest intact checkpoint is {good} (pass it as --checkpoint; --resume starts from it)"
    return f"delete {ckpt_dir} or pass another checkpoint"


def read_tensors(path, device="cpu", advice=lambda: "") -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, all finite; else one CheckpointError naming the file and the tensor
    (and `advice()`, computed only then). A file this user may not read is an AccessError, not corrupt (safetensors
    reports it as a missing file)."""
    path = Path(path)
    if path.exists() and not os.access(path, os.R_OK):
        raise access_error(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is corrupt ({first}){advice()}") from None
    return check_finite(path, tensors, advice)


def check_finite(path, tensors: dict[str, torch.Tensor], advice=lambda: "") -> dict[str, torch.Tensor]:
    """`tensors`, read from `path`, if all are finite; else one CheckpointError naming the file and the tensor (and
    `advice()`). For files that are not safetensors (a .pth backbone); read_tensors applies it itself."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} holds NaN or infinite values, the file is corrupt{advice()}")
    return tensors


def load_tensors(ckpt_dir, name: str, device="cpu", *, _hint: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of <ckpt_dir>/<name>.safetensors, all finite; else one CheckpointError naming file and tensor
    and, for a checkpoint of a run, the newest intact one to use instead."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / f"{name}.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, delete {ckpt_dir} to use an older one")
    return read_tensors(path, device, (lambda: f"; {_good_hint(ckpt_dir)}") if _hint else (lambda: ""))


def load_json(ckpt_dir, name: str) -> dict:
    return read_json(Path(ckpt_dir) / f"{name}.json")


TRAINING_STATE = ("step", "images_seen", "optimizer")  # what train.loop writes for its first part


def load_state(ckpt_dir, keys: tuple[str, ...] = TRAINING_STATE) -> dict:
    """state.json of a checkpoint with `keys` present: step and images_seen non-negative integers, the rest objects."""
    path = Path(ckpt_dir) / "state.json"
    state = read_json(path)
    for key in keys:
        value = state.get(key)
        if key in ("step", "images_seen"):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            ok = isinstance(value, dict)
        if not ok:
            raise CheckpointError(f"{path}: field {key!r} is {'missing' if key not in state else repr(value)[:60]}; "
                                  "the checkpoint state is corrupt")
    return state
