"""The one report writer of every fastdiff benchmark: the environment, ratios taken within one run, a markdown
table, and bench.json + bench.md (rewritten after every row, so an interrupted run keeps what it measured).

Rows are dicts. A row's `case` names what it measured (its providers are compared within a case); `section`
groups the rows into the markdown's tables.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from fastdiff.checkpoint import atomic_write_all
from fastdiff.envinfo import collect
from fastdiff.images import writable
from fastdiff.runtime import command_line

# Columns in this order where any row has them; other scalar keys follow, except the JSON-only ones.
COLUMNS = [
    ("preset", "preset"), ("kind", "kind"), ("op", "op"), ("shape", "shape"), ("batch", "batch"),
    ("sampler", "sampler"), ("timed_steps", "timed steps"), ("layout", "layout"), ("note", "note"),
    ("provider", "provider"), ("dtype", "dtype"), ("median_ms", "ms/call"), ("spread", "p20-p80"),
    ("images_per_s", "img/s"), ("gb_per_s", "GB/s"), ("frac_copy_bw", "of copy"), ("vs_torch_eager", "vs eager"),
    ("vs_torch_compile", "vs compile"), ("vs_diffusers", "vs diffusers"), ("peak_mem_mb", "peak MiB"),
    ("warmup_s", "warm-up s"), ("power", "W"), ("clock", "SM MHz"), ("util", "util %"), ("options", "options"),
    ("status", "status"),
]
JSON_ONLY = {"case", "section", "p20_ms", "p80_ms", "rounds", "reps", "telemetry", "bytes", "byte_formula",
             "copy_gb_per_s", "extrapolated", "weights", "step", "device", "threads", "suite", "timer_clock"}
TELEMETRY = {"power": "power_w_mean", "clock": "sm_clock_mhz_mean", "util": "util_pct_mean"}
# ratio column -> (provider of the reference row, whether it must have the row's dtype)
RATIOS = {"vs_torch_eager": ("torch-eager", False), "vs_torch_compile": ("torch-compile", True),
          "vs_diffusers": ("diffusers", True)}


SOURCE_SUFFIXES = (".py", ".sh", ".cpp", ".cu", ".h", ".cuh", ".txt", ".toml")  # new files that change a run
RESULTS = "benchmarks/results/"  # ... except there: a results folder's lscpu.txt or logs


def git_commit(path: Path | None = None) -> dict:
    """{commit, dirty} of the checkout holding `path` (this package by default): dirty where a tracked file is
    changed or a source file (not a result) is new, as a module a run imports before it is added. Outside git (a
    copy of the working tree sent to a GPU machine, without .git) the commit is FASTDIFF_COMMIT's, as the sender
    names it, with dirty unknown (None); None values without either."""
    where = Path(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("FASTDIFF_COMMIT") or None, "dirty": None}
    changed = [line for line in status.splitlines()
               if not line.startswith("??") or (line.endswith(SOURCE_SUFFIXES) and not line[3:].startswith(RESULTS))]
    return {"commit": commit, "dirty": bool(changed)}


def cpu_model() -> str:
    """The CPU's model name from lscpu, else what `platform` knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
    return names[0] if names else platform.processor() or platform.machine()


def environment(device) -> dict:
    """Device, driver, versions, git commit, CPU model and machine load: what every report names."""
    device = torch.device(device)
    env = collect()
    env.update(git_commit())
    env.update(date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), bench_device=str(device),
               cpu_model=cpu_model(), cpu_count=os.cpu_count(),  # the load: other processes share the machine
               load_avg=[round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None)
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return env


def add_ratios(rows: list[dict]) -> None:
    """Each RATIOS column: the reference row's median time over this row's, both of the same case in this run and
    of the same job (`job`: the bench's job index; timed interleaved with it, not minutes apart in another job).
    The reference is the first row of its provider in the case: of the row's dtype where RATIOS says so; otherwise
    (vs eager) the fp32 one for an end-to-end row (the plain PyTorch reference, whatever other eager rows a later
    job adds to the case; none without it) and preferably the row's dtype for an op row (eager bf16 for a bf16
    op), else any."""
    timed = [r for r in rows if r.get("median_ms") and r.get("case") is not None]
    for column, (provider, _) in RATIOS.items():
        first: dict = {}
        for r in timed:
            if r["provider"] == provider:
                first.setdefault((r.get("job"), r["case"], r.get("dtype")), r["median_ms"])
                first.setdefault((r.get("job"), r["case"], None), r["median_ms"])
        for r in timed:
            ref = next((first[(r.get("job"), *k)] for k in reference_keys(r, column) if (r.get("job"), *k) in first),
                       None)
            if ref is not None:
                r[column] = ref / r["median_ms"]


def reference_keys(row: dict, column: str) -> list[tuple]:
    """(case, dtype) keys of the row a RATIOS column divides by, in preference order; dtype None: any (the rule
    of `add_ratios`)."""
    same_dtype = RATIOS[column][1]
    if not same_dtype and row.get("section") in ("sample", "train"):
        return [(row.get("case"), "fp32")]
    return [(row.get("case"), row.get("dtype"))] + ([] if same_dtype else [(row.get("case"), None)])


def _cell(row: dict, key: str) -> str:
    if key == "spread":
        return f"{_cell(row, 'p20_ms')}-{_cell(row, 'p80_ms')}" if "p20_ms" in row else ""
    if key in TELEMETRY:
        tel = row.get("telemetry") or {}
        return f"{tel[TELEMETRY[key]]:.0f}" if TELEMETRY[key] in tel else ""
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    if key.startswith("vs_"):
        return f"{value:.2f}x"
    if key == "frac_copy_bw":
        return f"{value:.0%}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


# The columns of the targets' table (fastdiff.bench.targets.evaluate's entries)
TARGET_COLUMNS = [("target", "target"), ("measured", "measured"), ("at_least", "at least"), ("status", "status"),
                  ("other paths", "other paths")]


def table(rows: list[dict], columns: list[tuple[str, str]] | None = None) -> str:
    """A markdown table of the rows: the COLUMNS any row has, then the rows' other scalar keys (or, given
    `columns`, those of them any row has)."""
    present = {k for r in rows for k, v in r.items() if v is not None and not isinstance(v, dict)}
    present |= {"spread"} if "p20_ms" in present else set()
    present |= {k for k, name in TELEMETRY.items() if any(name in (r.get("telemetry") or {}) for r in rows)}
    columns = [(k, title) for k, title in columns or COLUMNS if k in present]
    known = {k for k, _ in COLUMNS} | JSON_ONLY
    columns += [(k, k) for k in dict.fromkeys(k for r in rows for k in r) if k in present and k not in known
                and k not in dict(columns)]
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, k).replace("|", "/") for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


SECTION_TITLES = {
    "sample": "Sampling (images/s for the whole run of `steps`, extrapolated where fewer steps were timed; "
              "ms per timed call)",
    "train": "Training (one optimisation step: loss, backward, clip, AdamW, LR schedule, EMA)",
    "op": "Ops (GB/s from each row's byte formula; `of copy`: share of the copy bandwidth measured in this run)",
}


def _dirty(env: dict) -> str:
    if env.get("dirty"):
        return " (uncommitted changes)"
    return " (no .git: uncommitted changes unknown)" if env.get("dirty") is None and env.get("commit") else ""


def render_markdown(doc: dict) -> str:
    env = doc["environment"]
    load = env.get("load_avg")
    head = [
        f"# {doc.get('title', 'fastdiff bench')}",
        "",
        f"- device: {env.get('gpu') or env.get('cpu_model')} ({env.get('bench_device')}), "
        f"driver {env.get('driver', '-')}; CPU {env.get('cpu_model')} ({env.get('cpu_count')} threads), "
        f"load {'/'.join(map(str, load)) if load else 'unknown'} at the start"
        + (f", {'/'.join(map(str, doc['load_avg_end']))} at the last write" if doc.get("load_avg_end") else ""),
        f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
        f"python {env.get('python')}",
        f"- commit {env.get('commit') or 'unknown'}{_dirty(env)}, "
        f"{env.get('date_utc')}",
    ]
    if doc.get("command"):
        head.append(f"- command: `{doc['command']}`")
    if doc.get("complete") is False:  # (a report from before 2026-12-07 has no such field)
        head.append("- **incomplete**: the run stopped (interrupted, killed or timed out) before its last job; these "
                    "are the rows it had")
    head += [f"- {note}" for note in doc.get("notes", [])]
    parts = ["\n".join(head)]
    sections = dict.fromkeys(r.get("section", "rows") for r in doc["rows"])
    for section in sections:
        rows = [r for r in doc["rows"] if r.get("section", "rows") == section]
        parts.append(f"## {SECTION_TITLES.get(section, section)}\n\n{table(rows)}")
    if doc.get("targets"):  # last, so that a log's tail shows it (fastdiff.bench.targets)
        parts.append(f"## Targets (this run's rows against fastdiff's speed targets)\n\n"
                     f"{table(doc['targets'], TARGET_COLUMNS)}")
    return "\n\n".join(parts) + "\n"


def new_doc(device, title: str = "fastdiff bench", **fields) -> dict:
    return {"title": title, "command": command_line(), "environment": environment(device), "rows": [], **fields}


def report_paths(out_dir, stem: str = "bench") -> tuple[Path, Path]:
    """out_dir/<stem>.json and <stem>.md: where `write_reports` writes."""
    return Path(out_dir) / f"{stem}.json", Path(out_dir) / f"{stem}.md"


def write_reports(doc: dict, out_dir: Path, stem: str = "bench") -> tuple[Path, Path]:
    """Fill in the ratios and the load average now, and write `report_paths(out_dir, stem)`."""
    add_ratios(doc["rows"])
    if hasattr(os, "getloadavg"):
        doc["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path, md_path = report_paths(out_dir, stem)
    json_path = writable(json_path)
    atomic_write_all({json_path: (json.dumps(doc, indent=1, default=str) + "\n").encode(),  # the two together
                      md_path: render_markdown(doc).encode()})
    return json_path, md_path


def emit(doc: dict, out_dir: Path | None = None) -> None:
    """What the benchmarks/ scripts print: the rows' table, then the whole document as one JSON line (last);
    with out_dir, the report files too."""
    add_ratios(doc["rows"])
    print(table(doc["rows"]))
    if out_dir is not None:
        write_reports(doc, out_dir)
    print(json.dumps(doc, default=str))
