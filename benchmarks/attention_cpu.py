"""The UNet's self-attention on the CPU: torch's fused kernel (F.scaled_dot_product_attention) against
`fastdiff.nn.attention` (two matmuls around a float32 softmax, what fastdiff runs on CPU tensors), interleaved.

    python benchmarks/attention_cpu.py [--preset mnist5k] [--batch 64] [--rounds 30] [--out DIR]

The shapes are the preset's attention calls, read off one UNet forward: the forward alone (under inference mode,
as the samplers run) at the rows a guided sampling step runs (2 * batch), forward+backward at the training
batch, each in float32 and in bfloat16 (the dtype of q, k and v under bf16 autocast), and with q, k and v the
views of a qkv convolution's output in NCHW or channels_last, as the UNet's attention block makes them. Both
providers of a case get the same tensors and are timed round by round in alternation
(`fastdiff.bench.timing.measure`); rows give the median and p20-p80 per call of all the attention calls of one
forward, the ratio to torch's kernel, and the largest error of the outputs against float64 attention on the
same inputs (`max_abs_error`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff.bench.native import preset_input_shapes
from fastdiff.bench.report import emit, new_doc
from fastdiff.bench.timing import measure
from fastdiff.config import PRESETS, preset_config
from fastdiff.models.unet import AttnBlock, split_heads
from fastdiff.nn import attention

PROVIDERS = {"torch-eager": F.scaled_dot_product_attention, "fastdiff": attention}


def attention_shapes(cfg, rows: int) -> list[tuple[int, ...]]:
    """[rows, channels, height, width] of the input of each attention block in one forward of the preset's UNet."""
    return [shape for _, shape in preset_input_shapes(cfg, AttnBlock, rows)]


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
    heads = cfg.model.num_heads
    for backward, rows in ((False, 2 * args.batch), (True, args.batch)):
        shapes = attention_shapes(cfg, rows)
        for layout in ("nchw", "channels_last"):
            memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            for dtype in (torch.float32, torch.bfloat16):
                qkv = [torch.randn((b, 3 * c, h, w), generator=gen).to(dtype).contiguous(memory_format=memory_format)
                       for b, c, h, w in shapes]
                grads = [torch.randn((b, heads, h * w, c // heads), generator=gen).to(dtype) for b, c, h, w in shapes]
                leaves = [t.clone().requires_grad_(backward) for t in qkv]

                def call(fn, leaves=leaves, grads=grads, backward=backward):
                    def run():
                        outs = []
                        with torch.set_grad_enabled(backward):
                            for x, g in zip(leaves, grads):
                                out = fn(*split_heads(x, heads))
                                if backward:
                                    torch.autograd.grad(out, x, g)
                                outs.append(out.detach())
                        return outs
                    return run

                fns = {name: call(fn) for name, fn in PROVIDERS.items()}
                truth = [F.scaled_dot_product_attention(*split_heads(x.double(), heads)) for x in qkv]
                error = {name: max((out.double() - want).abs().max().item() for out, want in zip(fn(), truth))
                         for name, fn in fns.items()}
                with torch.inference_mode(not backward):
                    timings = measure(fns, "cpu", rounds=args.rounds, warmup=3)
                b, c, h, w = shapes[0]
                case = (f"{'forward+backward' if backward else 'forward'} {len(shapes)}x"
                        f"[{b}, {heads}, {h * w}, {c // heads}] {layout}")
                for name, t in timings.items():
                    row = dict(section="attention", case=case, op=case, layout=layout, provider=name,
                               dtype="bf16" if dtype == torch.bfloat16 else "fp32")
                    if isinstance(t, str):
                        doc["rows"].append({**row, "status": t})
                        continue
                    doc["rows"].append({**row, **t.to_dict(), "status": "ok", "max_abs_error": error[name]})
    emit(doc, args.out)


if __name__ == "__main__":
    main()
