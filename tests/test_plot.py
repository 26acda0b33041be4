"""fastdiff plot / plot_stats: the PNG is read back and its pixels checked, not only its existence."""

import json

import numpy as np
import pytest
from PIL import Image

from fastdiff.cli import main
from fastdiff.errors import FastdiffError
from fastdiff.plot import DPI, ROW_IN, WIDTH_IN, plot_stats, read_stats

C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


def write_stats(run_dir, records, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run_dir


def records(n=20, scale=1.0):
    return [{"step": s, "kimg": s * 0.064, "loss": scale * (0.05 + 1.0 / s), "images_per_sec": 900 + 10 * s,
             "lr": 1e-3 * min(1, s / 5), "time": 1e9 + s} for s in range(1, n + 1)]


def pixels(path):
    img = Image.open(path)
    img.load()
    return img, np.asarray(img.convert("RGB"))


def has_colour(a, rgb):
    return bool((a == np.array(rgb, np.uint8)).all(axis=-1).any())


def test_one_and_two_runs(tmp_path):
    a = write_stats(tmp_path / "run-a", records())
    b = write_stats(tmp_path / "run-b", records(scale=2.0))
    one = plot_stats([a], tmp_path / "one.png")
    img, px = pixels(one)
    assert img.format == "PNG" and img.size == (round(WIDTH_IN * DPI), round(3 * ROW_IN * DPI))
    assert px.std() > 10 and len(np.unique(px.reshape(-1, 3), axis=0)) > 20  # axes, text and a line, not blank
    assert has_colour(px, C0) and not has_colour(px, C1)
    two = plot_stats([a, b], tmp_path / "two.png")
    _, px2 = pixels(two)
    assert px2.shape == px.shape and has_colour(px2, C0) and has_colour(px2, C1)
    assert (px2 != px).any(axis=-1).mean() > 0.01
    # One subplot per key: the height follows the number of keys.
    img1, _ = pixels(plot_stats([a, b], tmp_path / "loss.png", keys=["loss"]))
    assert img1.size == (round(WIDTH_IN * DPI), round(ROW_IN * DPI))


def test_a_value_beyond_the_float_range_and_the_current_folder_plot(tmp_path, monkeypatch):
    """An integer of 400 digits in a stats line was an OverflowError; `fastdiff plot .` named its line "."."""
    import matplotlib.axes

    run = write_stats(tmp_path / "my-run", records(3) + [{"step": 4, "kimg": 0.3, "loss": 10**400}])
    labels = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: (labels.append(k.get("label")),
                                                                           real(ax, *a, **k))[1])
    monkeypatch.chdir(run)
    assert plot_stats(["."], tmp_path / "p.png", ["loss"]).exists()
    assert labels == ["my-run"]


def test_read_stats_keeps_the_resumed_records_and_skips_a_partial_line(tmp_path):
    first = records(6)
    again = [dict(r, loss=-1.0) for r in records(8)[3:]]  # resumed from step 3: steps 4..8 logged again
    run = write_stats(tmp_path / "r", first + again, tail='{"step": 9, "kimg"')
    got = read_stats(run)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got[3:]] == [-1.0] * 5 and got[2]["loss"] == first[2]["loss"]


@pytest.mark.parametrize("setup, keys, message", [
    (lambda d: d.mkdir(), ["loss"], "has no stats.jsonl"),
    (lambda d: write_stats(d, records()), ["los"],
     "no run has the stat 'los' as numbers; the stats hold: images_per_sec, loss, lr"),
    # a stat of strings or booleans only: the list of stats ended empty ("the stats hold: ")
    (lambda d: write_stats(d, [{"step": 1, "kimg": 0.1, "loss": "x", "ok": True}]), ["loss"],
     "no run has the stat 'loss' as numbers; the stats hold: no numbers besides step and kimg"),
    (lambda d: write_stats(d, []), ["loss"], "holds no records yet"),
    (lambda d: write_stats(d, records(2), tail="oops\n" + json.dumps(records(3)[2]) + "\n"), ["loss"],
     "line 3 is not JSON"),
    (lambda d: write_stats(d, [{"step": 1, "loss": 1.0}]), ["loss"], "no 'kimg' field"),
    # a line nested too deep to decode, and a step that is no number: they were tracebacks
    (lambda d: write_stats(d, records(2), tail="[" * 100_000 + "\n" + json.dumps(records(3)[2]) + "\n"), ["loss"],
     "line 3 is not JSON"),
    (lambda d: write_stats(d, [{"kimg": 1, "loss": 1.0, "step": "a"}]), ["loss"], "has a 'step' that is no number"),
    (lambda d: write_stats(d, records()), [], "at least one stat"),
])
def test_errors(tmp_path, setup, keys, message):
    setup(tmp_path / "run")
    with pytest.raises(FastdiffError, match=message):
        plot_stats([tmp_path / "run"], tmp_path / "p.png", keys)


def test_cli_plot_of_a_real_run(tmp_path, capsys, tiny_overrides):
    from fastdiff.config import apply_overrides, preset_config
    from fastdiff.train import train_ddpm

    cfg = apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": 2})
    train_ddpm(cfg, tmp_path / "a", device="cpu", progress=False, echo=lambda s: None)  # a real run's stats.jsonl
    write_stats(tmp_path / "b", [dict(r, grad_norm=0.5) for r in records(4)])
    capsys.readouterr()
    out = tmp_path / "cmp.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--keys", "loss,grad_norm"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == {"plot": str(out), "runs": [str(tmp_path / "a"), str(tmp_path / "b")],
                      "keys": ["loss", "grad_norm"]}
    img, px = pixels(out)
    assert img.size == (round(WIDTH_IN * DPI), round(2 * ROW_IN * DPI)) and has_colour(px, C0) and has_colour(px, C1)
    # Bad input: one line on stderr, exit status 2.
    assert main(["plot", str(tmp_path / "a"), "--out", str(out), "--keys", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastdiff plot: error: no run has the stat 'nope'" in err
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 2
    assert "has no stats.jsonl" in capsys.readouterr().err
