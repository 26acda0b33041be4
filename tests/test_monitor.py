"""What a run shows while it trains: EMA sample grids with fixed seeds, stats.png, TensorBoard events; each read
back and checked for its content."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff import checkpoint as ckpt
from fastdiff import state_dicts
from fastdiff.config import apply_overrides, preset_config
from fastdiff.diffusion import NoiseSchedule, ddim_table, make_timesteps
from fastdiff.models import UNet
from fastdiff.plot import plot_stats
from fastdiff.train import train_ddpm
from fastdiff.train.monitor import GRID_STEPS, sample_grid

QUIET = dict(progress=False, echo=lambda s: None)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """A tiny DDPM run with a grid every 2 steps and TensorBoard, killed after 2 of 4 steps and resumed."""
    root = tmp_path_factory.mktemp("monitor")
    over = {"model.base_channels": 16, "model.num_groups": 4, "train.batch_size": 16, "train.log_every": 1,
            "train.ckpt_every": 2, "train.warmup_steps": 2, "train.lr": 3e-3, "train.sample_every": 2,
            "train.tensorboard": True}
    cfg = apply_overrides(preset_config("digits"), over)
    train_ddpm(apply_overrides(cfg, {"train.steps": 4}), root / "straight", **QUIET)
    train_ddpm(apply_overrides(cfg, {"train.steps": 2}), root / "run", **QUIET)
    train_ddpm(apply_overrides(cfg, {"train.steps": 4}), root / "run", resume=True, **QUIET)
    return root


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sample_grids_are_the_ema_samples_of_fixed_seeds(monitored):
    run = monitored / "run"
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == ["step-000000002.png", "step-000000004.png"]
    g2, g4 = _png(run / "samples" / grids[0]), _png(run / "samples" / grids[1])
    # 4 rows of 10 classes, 8x8 digits upscaled 8x, 1 px borders
    assert g4.shape == (4 * 65 + 1, 10 * 65 + 1) and g4.dtype == np.uint8
    assert g4.std() > 20 and not np.array_equal(g2, g4)  # images, not a blank; training moved them
    # The grid is the sampler's output for seeds 0..39, labels i % 10, from the checkpoint's EMA weights.
    path = ckpt.latest_checkpoint(run)
    cfg = json.loads((path / "config.json").read_text())
    from fastdiff.config import RunConfig

    rc = RunConfig.from_dict(cfg)
    model = UNet(rc.model)
    state_dicts.load_model_weights(model, ckpt.load_tensors(path, "ema"), path)
    schedule = NoiseSchedule.from_config(rc.diffusion)
    table = ddim_table(schedule, make_timesteps(1000, GRID_STEPS, rc.sample.spacing), prediction="eps")
    want = sample_grid(model.eval(), table, shape=(1, 8, 8), num_classes=10, guidance=rc.sample.guidance,
                       null_label=model.null_label, clip=rc.sample.clip, device=torch.device("cpu"))
    assert np.abs(want[..., 0].astype(int) - g4.astype(int)).max() <= 1  # uint8 rounding of conv algorithms
    assert np.array_equal(_png(monitored / "straight" / "samples" / grids[1]), g4)  # resumed == uninterrupted


def test_stats_png_plots_the_records(monitored, tmp_path):
    img = _png(monitored / "run" / "stats.png")
    assert img.shape[1] >= 600 and img.shape[0] >= 3 * 200  # fastdiff.plot: one panel per key (three), stacked
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20  # axes, text and lines, not a blank
    # Two runs on one figure differ from one run alone: the second run's line is drawn.
    one = _png(plot_stats([monitored / "run"], tmp_path / "one.png"))
    two = _png(plot_stats([monitored / "run", monitored / "straight"], tmp_path / "two.png"))
    assert one.shape == two.shape and not np.array_equal(one, two)


def test_tensorboard_events_hold_the_stats_and_grids_once(monitored):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = monitored / "run"
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in records] == [1, 2, 3, 4]  # no repeats after the resume
    np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in records], rtol=1e-6)
    assert {"train/lr", "train/images_per_sec", "train/grad_norm"} <= set(acc.Tags()["scalars"])
    images = acc.Images("samples")
    assert [e.step for e in images] == [2, 4]
    assert (images[-1].width, images[-1].height) == (10 * 65 + 1, 4 * 65 + 1)
    import io

    tb_grid = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)))
    png = _png(run / "samples" / "step-000000004.png")
    assert np.array_equal(tb_grid.reshape(png.shape[0], png.shape[1], -1)[..., 0], png)
