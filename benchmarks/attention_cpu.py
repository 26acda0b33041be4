"""The UNet's self-attention on the CPU: torch's fused kernel (F.scaled_dot_product_attention) against
`fastdiff.nn.attention` (two matmuls around a float32 softmax, what fastdiff runs on CPU tensors), interleaved.

    python benchmarks/attention_cpu.py [--preset mnist5k] [--batch 64] [--rounds 30] [--out DIR]

The shapes are the preset's attention calls, read off one UNet forward: the forward alone at the rows a guided
sampling step runs (2 * batch), forward+backward at the training batch, each in float32 and in bfloat16 (the
dtype of q, k and v under bf16 autocast). Both providers of a case get the same tensors and are timed round by
round in alternation (`fastdiff.bench.timing.measure`); rows give the median and p20-p80 per call of all the
attention calls of one forward, the ratio to torch's kernel, and the largest error of the outputs against
float64 attention on the same inputs (`max_abs_error`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff.bench.report import emit, new_doc
from fastdiff.bench.timing import measure
from fastdiff.config import PRESETS, preset_config
from fastdiff.models import UNet
from fastdiff.models.unet import AttnBlock
from fastdiff.nn import attention

PROVIDERS = {"torch-eager": F.scaled_dot_product_attention, "fastdiff": attention}


def attention_shapes(cfg, rows: int) -> list[tuple[int, ...]]:
    """[rows, heads, tokens, channels per head] of each attention call of one forward of the preset's UNet."""
    model = UNet(cfg.model).eval()
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda m, args: shapes.append(
        (args[0].shape[0], m.num_heads, args[0].shape[2] * args[0].shape[3], args[0].shape[1] // m.num_heads)))
        for m in model.modules() if isinstance(m, AttnBlock)]
    size = cfg.model.image_size
    with torch.no_grad():
        labels = torch.zeros(rows, dtype=torch.long) if cfg.model.num_classes else None
        model(torch.randn(rows, cfg.model.in_channels, size, size), torch.zeros(rows), labels)
    for h in hooks:
        h.remove()
    return shapes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), default="mnist5k")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", type=Path, help="also write bench.json and bench.md into this folder")
    args = p.parse_args()
    cfg = preset_config(args.preset)
    doc = new_doc("cpu", title=f"attention on the CPU ({args.preset}, batch {args.batch})",
                  threads=torch.get_num_threads())
    gen = torch.Generator().manual_seed(0)
    for backward, rows in ((False, 2 * args.batch), (True, args.batch)):
        shapes = attention_shapes(cfg, rows)
        for dtype in (torch.float32, torch.bfloat16):
            qkv = [[torch.randn(s, generator=gen).to(dtype) for _ in range(3)] for s in shapes]
            grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
            leaves = [[t.clone().requires_grad_(backward) for t in c] for c in qkv]

            def call(fn, leaves=leaves, grads=grads, backward=backward):
                def run():
                    outs = []
                    with torch.set_grad_enabled(backward):
                        for (q, k, v), g in zip(leaves, grads):
                            out = fn(q, k, v)
                            if backward:
                                torch.autograd.grad(out, (q, k, v), g)
                            outs.append(out.detach())
                    return outs
                return run

            fns = {name: call(fn) for name, fn in PROVIDERS.items()}
            truth = [F.scaled_dot_product_attention(*(t.double() for t in c)) for c in qkv]
            error = {name: max((out.double() - want).abs().max().item() for out, want in zip(fn(), truth))
                     for name, fn in fns.items()}
            timings = measure(fns, "cpu", rounds=args.rounds, warmup=3)
            case = f"{'forward+backward' if backward else 'forward'} {len(shapes)}x{list(shapes[0])}"
            for name, t in timings.items():
                row = dict(section="attention", case=case, op=case, provider=name,
                           dtype="bf16" if dtype == torch.bfloat16 else "fp32")
                if isinstance(t, str):
                    doc["rows"].append({**row, "status": t})
                    continue
                doc["rows"].append({**row, **t.to_dict(), "status": "ok", "max_abs_error": error[name]})
    emit(doc, args.out)


if __name__ == "__main__":
    main()
