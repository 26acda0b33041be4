"""The teacher's deterministic samples for the student's regression loss: pairs (noise, label) -> teacher x0.

ADD's two losses let a 1-step student drop its noise: at the first student timestep (999) its input is almost
pure noise, the teacher-initialised student maps every noise of a class to nearly the same image, and neither
the adversarial nor the distillation loss pays it to spread out again (README, "Few-step students"). DMD (Yin
et al. 2024) adds a regression loss on pairs of a noise and the teacher's deterministic sample from that noise,
which ties each noise to its own digit. Here the pairs are DDIM (eta 0) samples of the frozen teacher at the
teacher guidance, drawn once through the sampling entry point and cached beside the teacher like the ViT
backbone, keyed by the teacher's checkpoint and the settings. Only the seeds, labels and images are kept: a
pair's noise is `initial_noise` of its seed. The seeds start at PAIR_SEED, far from the 0, 1, ... that sample
and eval use, so a student is never scored on the noises it regressed on.

A multi-step student's later steps start from its own x0 re-noised to a later student timestep s, which ADD alone
trains to forget its input as the first step did. With `states_at` the pairs also keep the teacher's DDIM state of
each noise at those timesteps (the input of the DDIM step at s, on the same deterministic trajectory), so the
regression loss can tie each state to the same sample: the probability-flow map from x_s to x0 that consistency
models learn, here on cached pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdiff import checkpoint as ckpt
from fastdiff.config import RunConfig
from fastdiff.diffusion import make_timesteps
from fastdiff.errors import ConfigError
from fastdiff.runlock import waiting_lock
from fastdiff.runtime import isolated_rng
from fastdiff.sampling import Denoiser, resolve_settings, sample
from fastdiff.sources import weights_fingerprint

PAIR_SEED = 1 << 40


@dataclass
class Pairs:
    seeds: torch.Tensor  # int64 (n,)
    labels: torch.Tensor | None  # int64 (n,) on a conditional teacher
    images: torch.Tensor  # float32 (n, C, H, W): the teacher's sample of each seed's noise
    states: torch.Tensor | None = None  # float32 (n, len(states_at), C, H, W): its DDIM state at each of states_at
    states_at: tuple[int, ...] = ()

    def to(self, device) -> "Pairs":
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return Pairs(move(self.seeds), move(self.labels), move(self.images), move(self.states), self.states_at)


def teacher_pairs(teacher: Denoiser, cfg: RunConfig, cache_dir, *, device, log=None, n: int | None = None,
                  seed: int = PAIR_SEED, purpose: str = "the regression loss", states_at=(),
                  progress: bool = False) -> Pairs:
    """n (default cfg.distill.regress_pairs) teacher samples of seeds seed, seed + 1, ... (DDIM-regress_steps,
    eta 0, teacher guidance), with their DDIM states at the timesteps `states_at` where asked; cached. progress:
    the sampling's bar (`sample`)."""
    dc = cfg.distill
    n = dc.regress_pairs if n is None else n
    states_at = tuple(int(t) for t in states_at)
    settings = resolve_settings(teacher, device, sampler="ddim", steps=dc.regress_steps, eta=0.0,
                                guidance=dc.teacher_guidance)
    meta = {"teacher": teacher.path, "weights": weights_fingerprint(teacher.path), "n": n, "seed": seed,
            "sampler": "ddim",
            "steps": settings.steps, "guidance": settings.guidance, "spacing": settings.spacing,
            "clip": settings.clip, "amp": settings.accel.amp}
    tag = "" if seed == PAIR_SEED else f"-seed{seed - PAIR_SEED}"
    if states_at:
        meta["states_at"] = list(states_at)
        tag += "-states" + "-".join(map(str, states_at))
    path = Path(cache_dir) / f"pairs-ddim{settings.steps}-n{n}{tag}.safetensors"
    # what the pairs are of travels inside their file (one rename writes both): a separate .json beside them, as
    # until 2026-12-07, could be another sampling's after a kill -9 between the two writes, or after two
    # distillations of other checkpoints of one teacher wrote the cache at once, and was then read as theirs
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    grid = make_timesteps(teacher.schedule.num_timesteps, settings.steps, settings.spacing).tolist()
    check_states(states_at, grid, settings.steps, settings.spacing)
    # two samplings of one teacher's pairs at once (two distillations): the second waits, then reads the first's
    with waiting_lock("cache", path):
        if path.exists():
            t = ckpt.read_tensors(path)
            if "meta" in t and bytes(t["meta"].numpy()) == meta_bytes:
                return Pairs(t["seeds"], t.get("labels"), t["images"], t.get("states"), states_at).to(device)
        if log:
            log(f"sampling {n} teacher pairs for {purpose} (DDIM-{settings.steps}, guidance "
                f"{settings.guidance:g}{f', states at t={list(states_at)}' if states_at else ''}; cached as {path})")
        with isolated_rng(device):
            pairs = _sample_pairs(teacher, settings, n, seed, states_at, [grid.index(t) for t in states_at],
                                  progress)
        tensors = {k: v for k, v in (("seeds", pairs.seeds), ("images", pairs.images), ("labels", pairs.labels),
                                     ("states", pairs.states)) if v is not None}
        tensors["meta"] = torch.frombuffer(bytearray(meta_bytes), dtype=torch.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt.save_tensors(path, tensors)
        return pairs.to(device)


def check_states(states_at, grid: list[int], steps: int, spacing: str) -> None:
    """The teacher's DDIM (its timesteps `grid`, `steps` of `spacing`) steps from every timestep of `states_at`,
    whose states the regression loss reads."""
    missing = [t for t in states_at if t not in grid[1:]]  # step 0's input is the noise itself
    if missing:
        raise ConfigError(f"the teacher's DDIM-{steps} ({spacing} spacing) never steps from student timesteps "
                          f"{missing}, so distill.regress_at 'all' has no state there to regress on; pick "
                          "--regress-steps so that it does (with trailing spacing, 20 visits 999, 749, 499 and 249) "
                          "or --regress-at first")


def regress_states(cfg: RunConfig) -> tuple[int, ...]:
    """The student timesteps whose teacher states the regression loss reads (regress_at 'all': each after the
    first)."""
    dc = cfg.distill
    return tuple(dc.student_timesteps[1:]) if dc.regress_weight and dc.regress_at == "all" else ()


def _sample_pairs(teacher: Denoiser, settings, n: int, seed: int, states_at: tuple[int, ...],
                  steps: list[int], progress: bool) -> Pairs:
    """`sample` of the n seeds; with `steps` (the DDIM steps from the timesteps `states_at`), keeping the input x
    of each of those steps (the output of the step before it), from the step callback of every batch."""
    kept: list[dict[int, torch.Tensor]] = []  # per batch, in order: step -> x

    def keep(i, t, x, x0):
        if i == 0:  # a batch's first step
            kept.append({})
        if i + 1 in steps:
            kept[-1][i + 1] = x.float().cpu().contiguous()

    res = sample(teacher, settings, n=n, seed=seed, callback=keep if steps else None, callback_rows=n,
                 progress=progress)
    if not steps:
        return Pairs(res.seeds, res.labels, res.images)
    states = torch.cat([torch.stack([batch[k] for k in steps], dim=1) for batch in kept])
    return Pairs(res.seeds, res.labels, res.images, states, states_at)
