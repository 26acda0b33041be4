"""Plots of training runs' stats.jsonl: `plot_stats` draws one panel per key against images seen (kimg)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastdiff.errors import FastdiffError

DEFAULT_KEYS = ("loss", "images_per_sec", "lr")


def _records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "stats.jsonl"
    if not path.exists():
        raise FastdiffError(f"{run_dir} has no stats.jsonl; pass a run directory written by `fastdiff train`")
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if isinstance(record, dict):
            out.append(record)
    return out


def plot_stats(run_dirs: list, out_png, keys: tuple[str, ...] = DEFAULT_KEYS) -> Path:
    """One figure: a panel per key (loss, images/s, lr, ...) against kimg, one line per run; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without pyplot's global state
    from matplotlib.figure import Figure

    out_png = Path(out_png)
    fig = Figure(figsize=(4 * len(keys), 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    runs = [(Path(d), _records(Path(d))) for d in run_dirs]
    for ax, key in zip(axes, keys):
        for run_dir, records in runs:
            pts = [(r.get("kimg", r.get("step", 0)), r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=run_dir.name)
        ax.set_xlabel("images seen (kimg)")
        ax.set_title(key)
        if key == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, out_png)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FastdiffError(f"cannot write {out_png}: {e.strerror}")
    return out_png
