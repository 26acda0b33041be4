"""AdamW's step on a preset's UNet: torch's per-tensor loop, its foreach and its fused kernel, interleaved.

    python benchmarks/optimizer_step.py [--preset mnist5k] [--rounds 40] [--device cpu]

Each variant steps its own copy of the UNet (seed 0) with fixed random gradients; the three are timed round by
round in alternation (`fastdiff.bench.timing.measure`). Prints the median and p20-p80 ms per step, the ratio to
the per-tensor loop (torch's default on the CPU), and the largest weight difference from it after the rounds,
as JSON. `fastdiff.train.step.adamw` builds the fused one.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from fastdiff.bench.timing import measure
from fastdiff.config import preset_config
from fastdiff.models import UNet

VARIANTS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mnist5k")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    cfg = preset_config(args.preset)
    models, fns = {}, {}
    for name, kw in VARIANTS.items():
        torch.manual_seed(0)
        model = UNet(cfg.model).to(args.device)
        gen = torch.Generator().manual_seed(1)
        for param in model.parameters():
            param.grad = (torch.randn(param.shape, generator=gen) * 1e-3).to(args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kw)
        models[name], fns[name] = model, opt.step
    load = os.getloadavg()
    timings = measure(fns, args.device, rounds=args.rounds, warmup=3)
    base = timings["for-loop"].median_ms
    ref = list(models["for-loop"].parameters())
    out = {"preset": args.preset, "device": args.device, "rounds": args.rounds, "load_avg_start": load,
           "params": sum(q.numel() for q in ref), "tensors": len(ref)}
    for name, t in timings.items():
        diff = max((a - b).abs().max().item() for a, b in zip(models[name].parameters(), ref))
        out[name] = dict(median_ms=round(t.median_ms, 3), p20_p80=[round(t.p20_ms, 3), round(t.p80_ms, 3)],
                         vs_for_loop=round(base / t.median_ms, 2), max_weight_diff=diff)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
