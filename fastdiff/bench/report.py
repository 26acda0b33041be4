"""Benchmark reports: the environment (device, driver, versions, git commit), ratios computed within one run,
a printed table, and the JSON and markdown files (rewritten after every row, so an interrupted run keeps what
it measured)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

SAMPLE_COLUMNS = [
    ("preset", "preset"), ("batch", "batch"), ("sampler", "sampler"), ("timed_steps", "timed steps"),
    ("provider", "provider"), ("dtype", "dtype"),
    ("median_ms", "ms/call"), ("spread", "p20-p80"), ("images_per_s", "img/s"), ("vs_torch_eager", "vs eager"),
    ("vs_torch_compile", "vs compile"), ("peak_mem_mb", "peak MiB"), ("setup_s", "setup s"),
    ("power", "W"), ("clock", "SM MHz"), ("util", "util %"), ("options", "options"), ("status", "status"),
]
TRAIN_COLUMNS = [c for c in SAMPLE_COLUMNS if c[0] not in ("sampler", "timed_steps")]


def git_commit(path: Path | None = None) -> dict:
    """{commit, dirty} of the checkout holding `path` (this package by default); None values outside git."""
    where = Path(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def environment(device: torch.device) -> dict:
    from fastdiff.envinfo import collect

    env = collect()
    env.update(git_commit())
    env["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    env["bench_device"] = str(device)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return env


def add_ratios(rows: list[dict]) -> None:
    """vs_torch_eager: images/s over the torch-eager fp32 row of the same case in this run; vs_torch_compile:
    over the torch-compile row of the same case and dtype."""
    def key(r):
        return (r.get("section"), r.get("preset"), r.get("batch"), r.get("sampler"))

    eager = {key(r): r["images_per_s"] for r in rows
             if r.get("provider") == "torch-eager" and r.get("dtype") == "fp32" and r.get("images_per_s")}
    compiled = {key(r) + (r.get("dtype"),): r["images_per_s"] for r in rows
                if r.get("provider") == "torch-compile" and r.get("images_per_s")}
    for r in rows:
        if not r.get("images_per_s"):
            continue
        if key(r) in eager:
            r["vs_torch_eager"] = r["images_per_s"] / eager[key(r)]
        if key(r) + (r.get("dtype"),) in compiled:
            r["vs_torch_compile"] = r["images_per_s"] / compiled[key(r) + (r.get("dtype"),)]


def _cell(row: dict, key: str) -> str:
    tel = row.get("telemetry") or {}
    if key == "spread":
        return f"{_cell(row, 'p20_ms')}-{_cell(row, 'p80_ms')}" if "p20_ms" in row else ""
    if key in ("power", "clock", "util"):
        name = {"power": "power_w_mean", "clock": "sm_clock_mhz_mean", "util": "util_pct_mean"}[key]
        return f"{tel[name]:.0f}" if name in tel else ""
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    if key.startswith("vs_"):
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, k).replace("|", "/") for k, _ in columns) + " |")
    return "\n".join(lines)


def generic_table(rows: list[dict]) -> str:
    """A table of whatever keys the rows have (the op micro-benchmarks define their own)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and not isinstance(r[k], dict)]
    return markdown_table(rows, [(k, k) for k in keys])


def render_markdown(doc: dict) -> str:
    env = doc["environment"]
    commit = env.get("commit") or "unknown"
    head = [
        f"# fastdiff bench{' --quick' if doc.get('quick') else ''}",
        "",
        f"- device: {env.get('gpu') or env.get('platform')} ({env.get('bench_device')}), "
        f"driver {env.get('driver', '-')}",
        f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
        f"python {env.get('python')}",
        f"- commit {commit}{' (uncommitted changes)' if env.get('dirty') else ''}, {env.get('date_utc')}",
        f"- {doc.get('note', '')}",
    ]
    parts = ["\n".join(head)]
    sample = [r for r in doc["rows"] if r.get("section") == "sample"]
    train = [r for r in doc["rows"] if r.get("section") == "train"]
    if sample:
        parts.append("## Sampling (images/s for the whole run of `steps`; ms per timed call)\n\n"
                     + markdown_table(sample, SAMPLE_COLUMNS))
    if train:
        parts.append("## Training (one optimisation step: loss, backward, clip, AdamW, LR schedule, EMA)\n\n"
                     + markdown_table(train, TRAIN_COLUMNS))
    ops = doc.get("ops")
    if ops is not None:
        parts.append("## Op micro-benchmarks\n\n" + (generic_table(ops["rows"]) if ops.get("rows")
                                                      else ops.get("status", "")))
    return "\n\n".join(parts) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(doc: dict, out_dir: Path, stem: str = "bench") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    add_ratios(doc["rows"])
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    _write_atomic(json_path, json.dumps(doc, indent=1, default=str) + "\n")
    _write_atomic(md_path, render_markdown(doc))
    return json_path, md_path
