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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastdiff import checkpoint as ckpt
from fastdiff.config import RunConfig
from fastdiff.sampling import Denoiser, resolve_settings, sample

PAIR_SEED = 1 << 40


@dataclass
class Pairs:
    seeds: torch.Tensor  # int64 (n,)
    labels: torch.Tensor | None  # int64 (n,) on a conditional teacher
    images: torch.Tensor  # float32 (n, C, H, W): the teacher's sample of each seed's noise

    def to(self, device) -> "Pairs":
        return Pairs(self.seeds.to(device), self.labels.to(device) if self.labels is not None else None,
                     self.images.to(device))


def teacher_pairs(teacher: Denoiser, cfg: RunConfig, cache_dir, *, device, log=None, n: int | None = None,
                  seed: int = PAIR_SEED, purpose: str = "the regression loss") -> Pairs:
    """n (default cfg.distill.regress_pairs) teacher samples of seeds seed, seed + 1, ... (DDIM-regress_steps,
    eta 0, teacher guidance), cached."""
    dc = cfg.distill
    n = dc.regress_pairs if n is None else n
    settings = resolve_settings(teacher, device, sampler="ddim", steps=dc.regress_steps, eta=0.0,
                                guidance=dc.teacher_guidance)
    meta = {"teacher": teacher.path, "n": n, "seed": seed, "sampler": "ddim",
            "steps": settings.steps, "guidance": settings.guidance, "spacing": settings.spacing,
            "clip": settings.clip, "amp": settings.accel.amp}
    tag = "" if seed == PAIR_SEED else f"-seed{seed - PAIR_SEED}"
    path = Path(cache_dir) / f"pairs-ddim{settings.steps}-n{n}{tag}.safetensors"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists() and ckpt.read_json(meta_path) == meta:
        t = ckpt.read_tensors(path)
        return Pairs(t["seeds"], t.get("labels"), t["images"]).to(device)
    if log:
        log(f"sampling {n} teacher pairs for {purpose} (DDIM-{settings.steps}, guidance "
            f"{settings.guidance:g}; cached as {path})")
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        result = sample(teacher, settings, n=n, seed=seed)  # the run's global RNG untouched
    tensors = {"seeds": result.seeds, "images": result.images}
    if result.labels is not None:
        tensors["labels"] = result.labels
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_tensors(path, tensors)
    ckpt.write_json_atomic(meta_path, meta)
    return Pairs(result.seeds, result.labels, result.images).to(device)
