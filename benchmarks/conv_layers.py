"""Where a CPU training step's time goes, and how close its convolutions run to oneDNN's rate on a wide one.

    python benchmarks/conv_layers.py --out benchmarks/results/DIR              # mnist5k, batch 64, fp32 and bf16

Two parts, in one process:
- every convolution of the preset's UNet (the shapes of one forward, found by hooks), timed alone in
  channels_last and NCHW: forward, backward to the input and backward to the weight and bias
  (`aten.convolution_backward`), each as GFLOP/s (2 * output elements * input channels * kernel area per
  pass), all interleaved round by round (`fastdiff.bench.timing.measure`); a layer's row counts it as often as
  the forward calls it. The reference in the same rounds is a wide convolution, 3x3 with `--wide` channels in and
  out at 14x14 (channels_last, the same batch), a shape oneDNN handles well (torch's matmul would go through MKL,
  which ran well below oneDNN's convolutions on an AMD CPU): `vs_wide` is a pass's GFLOP/s over the wide
  convolution's forward.
- one training step of fastdiff's default for the precision (channels_last, the native ops where built) and of
  diffusers' UNet2DModel on the same weights (`cpu_defaults.build`), profiled with torch.profiler
  (`fastdiff.bench.native.profile_shares`): the share of self CPU time in convolutions, and so the step's time
  outside them. `ceiling_vs_diffusers` is diffusers' profiled step over fastdiff's convolutions alone: the ratio
  fastdiff would reach if everything but its convolutions took no time.

The process first frees one 31 MiB block, so that glibc reuses freed activations from the start, as in a
fastdiff command (README, "CPU defaults": a fresh process otherwise faults its first calls' pages in).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_allocator  # noqa: E402 - warm_malloc
import cpu_defaults  # noqa: E402 - the candidates and their callables

from fastdiff.bench.native import preset_input_shapes, profile_shares  # noqa: E402
from fastdiff.bench.report import new_doc, write_reports  # noqa: E402
from fastdiff.bench.timing import measure  # noqa: E402
from fastdiff.config import preset_config  # noqa: E402
from fastdiff.ops import native  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"cl": torch.channels_last, "nchw": torch.contiguous_format}


def conv_calls(cfg, batch: int) -> list[tuple[tuple, torch.nn.Conv2d, int]]:
    """(input shape, conv module, calls) of each distinct convolution in one forward of the preset's UNet."""
    seen: dict[tuple, list] = {}
    for conv, shape in preset_input_shapes(cfg, torch.nn.Conv2d, batch):
        key = (shape, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
        seen.setdefault(key, [shape, conv, 0])[2] += 1
    return [tuple(v) for v in seen.values()]


def layer_fns(shape, conv: torch.nn.Conv2d, dtype, layout) -> tuple[dict, float]:
    """{pass: callable} of one convolution in one dtype and layout, and its GFLOP per pass."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=layout)
    w = conv.weight.detach().to(dtype).contiguous(memory_format=layout)
    b = conv.bias.detach().to(dtype)
    args = dict(stride=conv.stride, padding=conv.padding)
    y = F.conv2d(x, w, b, **args)
    g = torch.randn(y.shape, generator=gen).to(dtype).contiguous(memory_format=layout)
    gflop = 2 * y.numel() * shape[1] * conv.kernel_size[0] * conv.kernel_size[1] / 1e9

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(g, x, w, [conv.out_channels], list(conv.stride),
                                                           list(conv.padding), [1, 1], False, [0, 0], 1, mask)

    return {"forward": lambda: F.conv2d(x, w, b, **args), "backward_input": backward([True, False, False]),
            "backward_weight": backward([False, True, True])}, gflop


def layer_rows(cfg, args, doc: dict) -> None:
    calls = conv_calls(cfg, args.batch)
    fns, flops = {}, {}
    wide = torch.nn.Conv2d(args.wide, args.wide, 3, padding=1)
    for amp in args.dtypes:
        passes, gflop = layer_fns((args.batch, args.wide, 14, 14), wide, DTYPES[amp], torch.channels_last)
        fns[("wide", amp, "cl", "forward")] = passes["forward"]
        flops[("wide", amp, "cl", "forward")] = gflop
        for layout in args.layouts:
            for i, (shape, conv, _) in enumerate(calls):
                passes, gflop = layer_fns(shape, conv, DTYPES[amp], LAYOUTS[layout])
                for name, fn in passes.items():
                    if i == 0 and name == "backward_input":
                        continue  # the first convolution's input is x_t, which a training step has no grad for
                    fns[(i, amp, layout, name)] = fn
                    flops[(i, amp, layout, name)] = gflop
    timings = measure(fns, "cpu", rounds=args.rounds, warmup=2)
    wide_rate = {amp: flops[("wide", amp, "cl", "forward")] / (timings[("wide", amp, "cl", "forward")].median_ms
                                                                 / 1e3) for amp in args.dtypes}
    totals: dict[tuple, float] = {}  # (dtype, layout, pass) -> ms of all calls
    total_flop: dict[tuple, float] = {}  # the same -> GFLOP
    for key, t in timings.items():
        if isinstance(t, str):
            doc["rows"].append(dict(section="layers", case=str(key), provider="conv", status=t))
            continue
        i, amp, layout, name = key
        rate = flops[key] / (t.median_ms / 1e3)
        row = dict(section="layers", case=f"{amp} {layout}", dtype=amp, layout=layout, provider=name,
                   median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, gflop_per_s=float(f"{rate:.3g}"),
                   vs_wide=round(rate / wide_rate[amp], 3), status="ok")
        if i == "wide":
            row.update(provider=f"wide 3x3 convolution, {args.wide} channels, 14x14", case=f"{amp} wide")
        else:
            shape, conv, count = calls[i]
            row.update(input=list(shape), out_channels=conv.out_channels, kernel=conv.kernel_size[0],
                       stride=conv.stride[0], calls=count)
            totals[(amp, layout, name)] = totals.get((amp, layout, name), 0.0) + t.median_ms * count
            total_flop[(amp, layout, name)] = total_flop.get((amp, layout, name), 0.0) + flops[key] * count
        doc["rows"].append(row)
    for (amp, layout, name), ms in sorted(totals.items()):
        rate = total_flop[(amp, layout, name)] / (ms / 1e3)
        doc["rows"].append(dict(section="totals", case=f"{amp} {layout}", dtype=amp, layout=layout,
                                provider=f"{name}, all layers", total_ms=round(ms, 2), gflop_per_s=float(f"{rate:.3g}"),
                                vs_wide=round(rate / wide_rate[amp], 3), status="ok"))


def step_rows(cfg, args, doc: dict) -> None:
    ops = "native" if native.available() else "torch"
    grid = {cpu_defaults.name(c): c for c in cpu_defaults.candidates(native.available(), False,
                                                                        torch.get_num_threads())}
    for amp in args.dtypes:
        rows, raw = {}, {}
        for label in (f"cl/{amp}/{ops}/{torch.get_num_threads()}t", f"diffusers/{amp}"):
            fn = cpu_defaults.build("train", grid[label], cfg, args.batch, 2)
            for _ in range(3):
                fn()
            runs = sorted((profile_shares(fn) for _ in range(args.profiles)), key=lambda s: s["profiled_ms"])
            s = raw[label] = runs[len(runs) // 2]  # the median step by profiled time
            rows[label] = dict(section="step", case=f"train {args.preset} {amp}", dtype=amp, provider=label,
                               profiled_ms=round(s["profiled_ms"], 1),
                               convolution_ms=round(s["profiled_ms"] * s["share_convolution"], 1),
                               **{k: round(v, 3) for k, v in s.items() if k.startswith("share_")}, status="ok")
        (ours, theirs), (mine, diffusers) = rows.values(), raw.values()
        ours["vs_diffusers"] = round(diffusers["profiled_ms"] / mine["profiled_ms"], 3)
        mine_conv_ms = mine["profiled_ms"] * mine["share_convolution"]
        ours["ceiling_vs_diffusers"] = round(diffusers["profiled_ms"] / mine_conv_ms, 3)
        doc["rows"] += [ours, theirs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist5k")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--wide", type=int, default=256, help="channels of the reference convolution (3x3, 14x14)")
    p.add_argument("--profiles", type=int, default=3, help="profiled training steps per library (the median)")
    p.add_argument("--out", type=Path, default=Path("runs/conv-layers"))
    args = p.parse_args(argv)
    malloc = cpu_allocator.warm_malloc()
    cfg = preset_config(args.preset)
    doc = new_doc("cpu", title=f"fastdiff convolutions and training step ({args.preset}, batch {args.batch})",
                  preset=args.preset, malloc=malloc, notes=[
                      f"layers: each convolution of one forward alone, {args.rounds} interleaved rounds, median "
                      "and p20-p80; GFLOP/s = 2 * output elements * input channels * kernel area per pass",
                      f"vs_wide: over the GFLOP/s of a 3x3 convolution of {args.wide} channels at 14x14 (forward, "
                      "channels_last) in the same rounds",
                      "totals: each pass over all layers, each counted as often as the forward calls it",
                      "step: torch.profiler self CPU time of one training step (the median of "
                      f"{args.profiles}), fastdiff's channels_last default and diffusers on the same weights; "
                      "ceiling_vs_diffusers: diffusers' step over fastdiff's convolutions alone"])
    layer_rows(cfg, args, doc)
    write_reports(doc, args.out, stem="conv_layers")
    step_rows(cfg, args, doc)
    doc["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_reports(doc, args.out, stem="conv_layers")
    print((args.out / "conv_layers.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
