"""The speed targets fastdiff is held to (issue 15), checked against the rows of one `fastdiff bench` run.

A target names the row that measures it (the fields a row must have) and a threshold on one of its values, or on
its speed over another row of the same run (a ratio is only meaningful between rows timed in the same rounds).
`evaluate` gives each target's measured value and status (met, not met, or not measured and why); the bench
writes them into bench.json and as the last section of bench.md after every row, and prints them at the end, so
a GPU run cut short still says which targets it reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdiff.bench.report import RATIOS, reference_keys
from fastdiff.runtime import cpu_choice


@dataclass(frozen=True)
class Target:
    what: str  # the target as the issue states it
    row: dict  # the fields of the row that measures it
    at_least: float
    metric: str = "images_per_s"  # the row's value (or, with `over`, the ratio's name)
    over: dict | None = None  # fields of the reference row: the value is the reference's median time over the row's


def _gpu_targets() -> list[Target]:
    train = dict(section="train", preset="cifar10-ddpm", batch=128, provider="fastdiff", dtype="bf16")
    ddpm = dict(section="sample", preset="cifar10-ddpm", batch=1024, sampler="ddpm-1000", provider="fastdiff",
                dtype="bf16")
    mnist = dict(section="sample", preset="mnist", batch=64, sampler="ddim-20", provider="fastdiff", dtype="bf16")
    gn = dict(section="op", op="group_norm_silu", shape=[32, 256, 64, 64], dtype="bfloat16", provider="fastdiff")
    step = dict(section="op", op="sampler_step", shape=[512, 3, 128, 128], provider="fastdiff")
    return [
        Target("cifar10-ddpm training, bf16, batch 128: images/s", train, 9000),
        Target("cifar10-ddpm training: x torch-eager fp32", train, 3.0, "vs_torch_eager"),
        Target("cifar10-ddpm training: x torch-compile bf16", train, 1.25, "vs_torch_compile"),
        Target("DDPM-1000 sampling, cifar10-ddpm, batch 1024: images/s", ddpm, 40),
        Target("DDPM-1000 sampling, batch 1024: x torch-compile", ddpm, 1.25, "vs_torch_compile"),
        Target("mnist sampling, batch 64: x torch-eager", mnist, 5.0, "vs_torch_eager"),
        Target("GroupNorm+SiLU (32x256x64x64 bf16): share of copy bandwidth", {**gn, "note": ""}, 0.80,
               "frac_copy_bw"),
        Target("GroupNorm+SiLU, channels_last: share of copy bandwidth", {**gn, "note": "channels_last"}, 0.80,
               "frac_copy_bw"),
        Target("sampler step (512x3x128x128 fp32): share of copy bandwidth", {**step, "dtype": "float32"}, 0.85,
               "frac_copy_bw"),
        Target("sampler step, bf16: share of copy bandwidth", {**step, "dtype": "bfloat16"}, 0.85, "frac_copy_bw"),
    ]


def _cpu_targets() -> list[Target]:
    """Against diffusers on the same weights, mnist5k at batch 64 (DDIM-20; a training step), at each library's
    default precision (fastdiff's is this CPU's, `runtime.cpu_choice`; diffusers' fp32) and at the same one."""
    choice = cpu_choice()
    out = []
    for section, ratio, amp, what in (("sample", 1.5, choice.sample_amp, "DDIM-20 sampling"),
                                      ("train", 1.3, choice.train_amp, "training step")):
        row = dict(section=section, preset="mnist5k", batch=64, provider="fastdiff")
        if section == "sample":
            row["sampler"] = "ddim-20"
        ref = {**row, "provider": "diffusers"}
        out.append(Target(f"mnist5k {what}, batch 64, default precisions ({amp} / fp32): x diffusers",
                          {**row, "dtype": amp}, ratio, "vs_diffusers", {**ref, "dtype": "fp32"}))
        if amp != "fp32":
            out.append(Target(f"mnist5k {what}, same precision ({amp}): x diffusers", {**row, "dtype": amp}, ratio,
                              "vs_diffusers", {**ref, "dtype": amp}))
    return out


def targets_for(device) -> list[Target]:
    return _gpu_targets() if torch.device(device).type == "cuda" else _cpu_targets()


def _find(rows: list[dict], fields: dict) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in fields.items())), None)


def _status_of_missing(rows: list[dict], fields: dict) -> str:
    """Why a planned row is absent: the status row its job left instead (op rows skipped for time, an op part's
    error), else that no such row was made."""
    if fields.get("section") == "op":
        stand_in = next((r for r in rows if r.get("section") == "op" and " op rows" in str(r.get("op", ""))), None)
        if stand_in is not None:
            return f"{stand_in['op']}: {stand_in['status']}"
    return "no such row in this run"


def _timed(row: dict | None) -> bool:
    return row is not None and row.get("status") == "ok" and (row.get("median_ms") or 0) > 0


def _value(target: Target, rows: list[dict]) -> tuple[float | None, str]:
    """(value, why not measured)."""
    row = _find(rows, target.row)
    if row is None:
        return None, _status_of_missing(rows, target.row)
    if not _timed(row):
        return None, row["status"] if row.get("status") != "ok" else "the row has no timing"
    if target.over is None:
        value = row.get(target.metric)
        if value is not None:
            return value, ""
        if target.metric in RATIOS:  # a ratio to a provider of the same case that has no timing
            provider = RATIOS[target.metric][0]
            ref = next((r for case, dtype in reference_keys(row, target.metric) for r in rows
                        if r.get("provider") == provider and r.get("case") == case
                        and dtype in (None, r.get("dtype"))), None)
            return None, f"{provider}: {ref['status'] if ref is not None else 'not in this run'}"
        return None, f"the row has no {target.metric}"
    ref = _find(rows, target.over)
    if not _timed(ref):
        why = "not in this run" if ref is None else ref["status"] if ref.get("status") != "ok" else "no timing"
        return None, f"reference row: {why}"
    return ref["median_ms"] / row["median_ms"], ""


def _alternatives(target: Target, rows: list[dict]) -> str:
    """Other ways of running the same op case (providers `fastdiff[<variant>]`) and their values."""
    if target.row.get("section") != "op" or target.over is not None:
        return ""
    fields = {k: v for k, v in target.row.items() if k != "provider"}
    found = [r for r in rows if r.get("provider", "").startswith("fastdiff[") and r.get("status") == "ok"
             and all(r.get(k) == v for k, v in fields.items()) and r.get(target.metric) is not None]
    return ", ".join(f"{r['provider']} {_show(target, r[target.metric])}" for r in found)


def _show(target: Target, value: float, threshold: bool = False) -> str:
    """A value with one digit more than a threshold shows, rounded down where it misses the target, so that a
    miss never reads as the threshold (1.4996 showed as 1.500x against 1.50x)."""
    more = 0 if threshold else 1
    digits = 2 + more  # decimals of the value (a percentage shows two fewer)
    if not threshold and value < target.at_least:
        value = math.floor(value * 10 ** digits) / 10 ** digits
    if target.metric == "frac_copy_bw":
        return f"{value:.{more}%}"
    if target.metric.startswith("vs_"):
        return f"{value:.{digits}f}x"
    return f"{value:,.{more}f}" if value >= 100 else f"{value:.{3 + more}g}"


def evaluate(rows: list[dict], device) -> list[dict]:
    """One entry per target of the device: what, measured, at least, status, and other paths of an op case."""
    out = []
    for target in targets_for(device):
        value, why = _value(target, rows)
        entry = {"target": target.what, "measured": _show(target, value) if value is not None else "",
                 "at_least": _show(target, target.at_least, threshold=True),
                 "status": ("met" if value >= target.at_least else "not met") if value is not None
                 else f"not measured: {why}"}
        alternatives = _alternatives(target, rows)
        if alternatives:
            entry["other paths"] = alternatives
        out.append(entry)
    return out
