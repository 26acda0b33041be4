"""Restoring live objects from a checkpoint's tensors and JSON, each checked first: the loaders of torch accept
malformed state and fail later otherwise. The model's weights, an optimizer (its tensors in safetensors, the rest
in JSON) and a scheduler's or grad scaler's state dict (`fastdiff.checkpoint` reads and writes the files).
"""

from __future__ import annotations

import math

import torch

from fastdiff.errors import CheckpointError


def _check_like(saved, fresh, where: str, required=None) -> None:
    """`saved` (from JSON) has the structure and value types of `fresh` (a live state_dict). Dict keys of `fresh`
    must all be present, or only those in `required` when given (optimizer groups of older torch versions lack
    newer options, which torch fills in)."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            raise CheckpointError(f"{where} is {type(saved).__name__}, expected an object")
        for k, v in fresh.items():
            if k not in saved:
                if required is None or k in required:
                    raise CheckpointError(f"{where}.{k} is missing")
                continue
            _check_like(saved[k], v, f"{where}.{k}", required)
    elif isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(fresh):
            raise CheckpointError(f"{where} should be a list of {len(fresh)}, got {repr(saved)[:60]}")
        for i, (s, f) in enumerate(zip(saved, fresh)):
            _check_like(s, f, f"{where}[{i}]", required)
    elif isinstance(fresh, bool):
        if not isinstance(saved, bool):
            raise CheckpointError(f"{where} should be true or false, got {repr(saved)[:60]}")
    elif isinstance(fresh, (int, float)):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)) or not math.isfinite(saved):
            raise CheckpointError(f"{where} should be a finite number, got {repr(saved)[:60]}")
    elif isinstance(fresh, str) and not isinstance(saved, str):
        raise CheckpointError(f"{where} should be a string, got {repr(saved)[:60]}")


def load_state_dict_checked(obj, saved, where) -> None:
    """obj.load_state_dict(saved) for an LR scheduler or grad scaler, after checking that `saved` has the structure
    of obj.state_dict() (the loaders accept anything and fail later otherwise)."""
    _check_like(saved, obj.state_dict(), str(where))
    try:
        obj.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where} does not load ({e})") from None


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


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                   where="state.json") -> None:
    _check_like(meta, {"param_groups": opt.state_dict()["param_groups"], "scalars": {}}, f"{where}: optimizer",
                required={"param_groups", "scalars", "params", "lr"})
    state: dict[int, dict] = {}
    try:
        for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
            idx, key = flat.split(".", 1)
            state.setdefault(int(idx), {})[key] = value
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"optimizer state in {where} does not match the model: {e}") from None
    # The moments in their parameter's strides: a file gives contiguous tensors, a channels_last conv weight's
    # moments were channels_last, and torch's fused AdamW on the CPU silently mixes up elements when the strides
    # of a parameter and its moments differ (a resumed run then drifts from the uninterrupted one).
    for group in opt.param_groups:
        for param in group["params"]:
            st = opt.state.get(param, {})
            for key, value in st.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    st[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def mismatch(e: RuntimeError) -> str:
    """What load_state_dict's error says does not fit (missing and unexpected keys, size mismatches), on one line:
    its first line only names the model."""
    lines = [" ".join(line.split()) for line in str(e).splitlines()[1:] if line.strip()]
    detail = "; ".join(lines) or " ".join(str(e).split())
    return detail if len(detail) <= 400 else detail[:400] + " ..."


def load_model_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where) -> None:
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{where} does not fit this model ({mismatch(e)}); was it written with another "
                              "config?") from None
