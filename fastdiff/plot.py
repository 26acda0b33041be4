"""Training curves: the stats.jsonl of one or more runs on one figure (`fastdiff plot`, and RUN/stats.png, which
training refreshes at each log interval).

One subplot per stat against images seen (kimg), one line per run, the legend naming each run's directory.
Drawn with matplotlib's Agg canvas on a standalone Figure (no pyplot state, no GUI backend), and written through
`fastdiff.images.save_png`, the one PNG writer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from fastdiff.errors import ConfigError, FastdiffError

DEFAULT_KEYS = ("loss", "images_per_sec", "lr")
WIDTH_IN, ROW_IN, DPI = 7.0, 2.2, 100  # the figure is WIDTH_IN x (ROW_IN per stat) inches at DPI
_AXES = ("step", "kimg", "time")  # bookkeeping fields, not stats to draw
_LABELS = {"loss": "loss", "images_per_sec": "images / s", "lr": "learning rate", "sec_per_kimg": "s / kimg",
           "peak_mem_mb": "peak memory (MB)", "grad_norm": "grad norm"}


def read_stats(run_dir) -> list[dict]:
    """The records of RUN/stats.jsonl in step order. A resumed run logs again the steps after the checkpoint it
    resumed from: a record whose step is not past the previous one replaces every record from that step on.
    A last line without its newline is a record still being written and is skipped."""
    path = Path(run_dir) / "stats.jsonl"
    if not path.is_file():
        raise FastdiffError(f"{run_dir} has no stats.jsonl; pass a run directory written by fastdiff train or "
                            "fastdiff distill")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise FastdiffError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    lines = text.splitlines()
    records: list[dict] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested too deep to decode
            if i == len(lines) and not text.endswith("\n"):
                break
            raise FastdiffError(f"{path} line {i} is not JSON; the file is corrupt") from None
        if not isinstance(record, dict) or not _number(record.get("kimg")):
            raise FastdiffError(f"{path} line {i} has no 'kimg' field; it is not a fastdiff stats file")
        step = record.get("step", record["kimg"])
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise FastdiffError(f"{path} line {i} has a 'step' that is no number ({step!r}); the file is corrupt")
        while records and records[-1].get("step", records[-1]["kimg"]) >= step:
            records.pop()
        records.append(record)
    if not records:
        raise FastdiffError(f"{path} holds no records yet; plot it after the first log interval")
    return records


def _number(value) -> bool:
    """A stat's value to draw: an int or float, not a bool (True was drawn as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float(value) -> float:
    """As a float: an int beyond the float range (a corrupt line) is inf, not an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(_float(r["kimg"]), _float(r[key])) for r in records if _number(r.get(key))]
    return np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)


def _run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name (of its resolved path: "." is the current folder's), or its full path where two
    runs share a name."""
    names = [p.resolve().name or str(p) for p in run_dirs]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(run_dirs, names)]


def plot_stats(run_dirs: list, out_png, keys=DEFAULT_KEYS) -> Path:
    """Draw `keys` of each run's stats.jsonl against kimg into the PNG `out_png` (WIDTH_IN*DPI pixels wide,
    ROW_IN*DPI per key high) and return its path. A key must be in at least one run's stats; a run without it
    has no line in that subplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastdiff.images import save_png

    run_dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(p) for p in run_dirs]
    keys = tuple(keys)
    out_png = Path(out_png)
    if not run_dirs:
        raise ConfigError("plot needs at least one run directory")
    if not keys:
        raise ConfigError("plot needs at least one stat to draw (e.g. loss,images_per_sec,lr)")
    if out_png.suffix.lower() != ".png":
        raise ConfigError(f"the plot is written as PNG: give a .png path, got {out_png}")
    stats = [read_stats(p) for p in run_dirs]
    present = {k for records in stats for r in records for k, v in r.items() if _number(v)}
    for key in keys:
        if key not in present:
            have = ", ".join(sorted(present - set(_AXES))) or "no numbers besides step and kimg"
            raise ConfigError(f"no run has the stat {key!r} as numbers; the stats hold: {have}")

    fig = Figure(figsize=(WIDTH_IN, ROW_IN * len(keys)), dpi=DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        values = []
        for name, records in zip(_run_names(run_dirs), stats):
            x, y = _series(records, key)
            ax.plot(x, y, marker=".", markersize=3, linewidth=1.2, label=name)
            values.append(y[np.isfinite(y)])
        finite = np.concatenate(values)
        if key.endswith("loss") and len(finite) and finite.min() > 0 and finite.max() > 10 * finite.min():
            ax.set_yscale("log")  # diffusion losses fall by orders of magnitude early on
        ax.set_ylabel(_LABELS.get(key, key), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("images seen (kimg)", fontsize=8)
    axes[0].legend(fontsize=7, loc="best")
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return save_png(rgb, out_png)
