"""The native extension fastdiff._C against the plain-PyTorch reference on the CPU, end to end and per op.

For the `digits` and `mnist` presets with random-initialised UNets (`cpu_rows`):
- e2e: DDIM sampling as the presets sample (guidance 2, so the UNet sees twice the batch; clip 1; eta 0, so the
  sampler step draws no noise, and eta 1, so it does), images/s per provider and layout;
- op: one UNet forward; all GroupNorm+SiLU calls of one forward (the shapes recorded from the model), in float32
  and as a bf16 UNet makes them under autocast; the same calls forward+backward in channels_last (as `fastdiff
  train` runs them); the sampler step with and without noise; and a profile row per provider saying where a
  forward's time goes.
Providers: `torch-eager` (use_backend("torch")) and `fastdiff-native` (use_backend("native")), interleaved
by `timing.measure`; every timed row's ratio is to torch-eager NCHW of the same case (`report.add_ratios`). On a
GPU the native CUDA kernels are providers of the op benchmarks (`fastdiff.bench.ops`), which this defers to.
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch

import fastdiff.ops as fops
from fastdiff.bench import PRESETS
from fastdiff.bench.e2e import base_unet
from fastdiff.bench.ops import run_op_benchmarks
from fastdiff.bench.providers import backend_of, with_backend
from fastdiff.bench.timing import measure
from fastdiff.config import preset_config
from fastdiff.diffusion import NoiseSchedule, initial_noise, sample_ddim, seeds_for
from fastdiff.errors import ConfigError
from fastdiff.nn import GroupNormSiLU
from fastdiff.ops import native, use_backend
from fastdiff.runtime import autocast

PROVIDERS = ("torch-eager", "fastdiff-native")
LAYOUTS = ("nchw", "channels_last")
GUIDANCE = 2.0


def input_shapes(model: torch.nn.Module, kind: type, *inputs) -> list[tuple[torch.nn.Module, tuple]]:
    """(module, shape of its first input) of every call of a `kind` module in one forward of model(*inputs)."""
    calls: list[tuple[torch.nn.Module, tuple]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: calls.append((m, tuple(args[0].shape))))
             for m in model.modules() if isinstance(m, kind)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def preset_input_shapes(cfg, kind: type, rows: int) -> list[tuple[torch.nn.Module, tuple]]:
    """`input_shapes` of the preset's UNet (`e2e.base_unet`) on `rows` rows of random images, t = 0 and label 0."""
    mc = cfg.model
    labels = torch.zeros(rows, dtype=torch.long) if mc.num_classes else None
    return input_shapes(base_unet(cfg).eval(), kind, torch.randn(rows, mc.in_channels, mc.image_size, mc.image_size),
                        torch.zeros(rows), labels)


def group_norm_shapes(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels) -> list[tuple]:
    """(shape, num_groups) of every GroupNormSiLU call in one forward of `model`."""
    return [(shape, m.num_groups) for m, shape in input_shapes(model, GroupNormSiLU, x, t, labels)]


# Groups of the profiler's op names (self CPU time) for `profile_shares`, first match wins.
OP_GROUPS = (("convolution", ("conv",)), ("group_norm_silu", ("group_norm", "silu")),
             ("matmul_attention", ("mm", "linear", "softmax", "scaled_dot_product")),
             ("sampler_step", ("sampler_step",)))


def profile_shares(fn: Callable[[], object]) -> dict:
    """Share of the self CPU time of one call of fn() per op group (OP_GROUPS, the rest as "other"), from
    torch.profiler; also the total in ms. Says where end-to-end time goes, e.g. how much is convolution."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    totals = dict.fromkeys([name for name, _ in OP_GROUPS] + ["other"], 0.0)
    for event in prof.key_averages():
        key = event.key.lower()
        group = next((name for name, needles in OP_GROUPS if any(n in key for n in needles)), "other")
        totals[group] += event.self_cpu_time_total
    total = sum(totals.values())
    return {"profiled_ms": total / 1e3, **{f"share_{k}": v / total for k, v in totals.items()}}


def _rows(timings: dict, base: dict, images: int | None = None) -> list[dict]:
    """Rows of timings keyed by provider or by (provider, layout), NCHW first (the ratios' baseline)."""
    out = []
    for key, t in timings.items():
        provider, layout = key if isinstance(key, tuple) else (key, None)
        row = {**base, "provider": provider, **({"layout": layout} if layout else {})}
        if isinstance(t, str):
            out.append({**row, "status": t})
            continue
        out.append({**row, **t.to_dict(), "status": "ok",
                    **({"images_per_s": images / (t.median_ms * 1e-3)} if images is not None else {})})
    return out


def cpu_rows(preset: str, *, batch: int = 64, steps: int = 10, rounds: int = 5, clock: str = "wall",
             etas: tuple[float, ...] = (0.0, 1.0), layouts: tuple[str, ...] = ("nchw",), op_rows: bool = True
             ) -> list[dict]:
    """The e2e and op rows of one preset on the CPU (see the module docstring). layouts: the memory formats of
    the e2e and UNet-forward rows ("nchw", "channels_last": the model's weights and the images), each provider
    in each, all against torch-eager NCHW; op_rows=False keeps the e2e rows alone."""
    cfg = preset_config(preset)
    model = base_unet(cfg).eval().requires_grad_(False)
    unknown = set(layouts) - set(LAYOUTS)
    if unknown or "nchw" not in layouts:
        raise ConfigError(f"layouts must include nchw (the baseline) and come from {', '.join(LAYOUTS)}; "
                          f"got {', '.join(layouts)}")
    models = {"nchw": model}
    if "channels_last" in layouts:
        models["channels_last"] = copy.deepcopy(model).to(memory_format=torch.channels_last)
    schedule = NoiseSchedule.from_config(cfg.diffusion, "cpu")
    seeds = seeds_for(0, batch)
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    x = initial_noise(seeds, shape)
    labels = torch.arange(batch) % cfg.model.num_classes
    null = model.null_label
    common = {"section": "native", "device": "cpu", "preset": preset, "threads": torch.get_num_threads(),
              "timer_clock": clock}
    rows: list[dict] = []

    def interleaved(fn_of_provider, reps=1):
        fns = {p: with_backend(p, fn_of_provider) for p in PROVIDERS}
        return measure(fns, "cpu", rounds=rounds, reps=reps, clock=clock)

    def interleaved_layouts(fn_of_layout, over=layouts):
        fns = {(p, layout): with_backend(p, functools.partial(fn_of_layout, layout))
               for layout in over for p in PROVIDERS}
        return measure(fns, "cpu", rounds=rounds, clock=clock)

    def case(base):  # the key of add_ratios: layouts are compared within a case, against torch-eager NCHW
        return {**base, "case": f"{preset} {base['kind']} {base['op']} {base['shape']}"}

    def images(layout, t):
        return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)

    for eta in etas:
        def sample(layout, eta=eta):
            with torch.no_grad():
                return sample_ddim(models[layout], images(layout, x), schedule, steps=steps, eta=eta, seeds=seeds,
                                   labels=labels, guidance=GUIDANCE, null_label=null, clip=1.0)
        base = {**common, "kind": "e2e", "op": f"ddim{steps} eta={eta:g} guidance={GUIDANCE:g}",
                "shape": [batch, *shape]}
        rows += _rows(interleaved_layouts(sample), case(base), images=batch)
    if not op_rows:
        return rows

    # One UNet forward at the batch the guided sampler feeds it, and its GroupNorm+SiLU calls alone.
    xx, tt, yy = torch.cat([x, x]), torch.full((2 * batch,), 500.0), torch.cat([labels, torch.full_like(labels, null)])
    gn_calls = [(torch.randn(s), g, torch.randn(s[1]), torch.randn(s[1]))
                for s, g in group_norm_shapes(model, xx, tt, yy)]

    def forward(layout="nchw"):
        with torch.no_grad():
            return models[layout](images(layout, xx), tt, yy)

    def gn_forward():
        for a, g, w, b in gn_calls:
            fops.group_norm_silu(a, g, w, b)

    rows += _rows(interleaved_layouts(forward), case({**common, "kind": "op", "op": "unet forward",
                                                     "shape": list(xx.shape)}))
    for provider in PROVIDERS:  # where the forward's time goes (after the timing: the profiler adds overhead)
        with use_backend(backend_of(provider)):
            rows.append({**common, "kind": "profile", "op": "unet forward", "shape": list(xx.shape),
                         "provider": provider, **profile_shares(forward)})
    rows += _rows(interleaved(gn_forward), case({**common, "kind": "op", "op": f"group_norm_silu x{len(gn_calls)}",
                                                 "shape": list(xx.shape)}))
    # The same calls as a bf16 UNet makes them under autocast: bf16 activations and float32 parameters (torch's
    # GroupNorm then runs in float32 on an upcast copy; the native op reads and writes bf16), in both layouts
    # (channels_last: how the CPU default samples on a CPU with bf16 instructions, `runtime.cpu_choice`).
    bf16_calls = {layout: [(images(layout, a.bfloat16()), g, w, b) for a, g, w, b in gn_calls] for layout in LAYOUTS}

    def gn_forward_bf16(layout):
        with autocast("cpu", "bf16"):
            for a, g, w, b in bf16_calls[layout]:
                fops.group_norm_silu(a, g, w, b)

    rows += _rows(interleaved_layouts(gn_forward_bf16, over=LAYOUTS),
                  case({**common, "kind": "op", "dtype": "bf16", "shape": list(xx.shape),
                        "op": f"group_norm_silu x{len(gn_calls)} bf16 autocast"}))
    # Training: forward+backward of the same calls (2 * batch = 128 is also the presets' training batch),
    # channels_last as `fastdiff train` runs.
    train_calls = []
    for a, g, w, b in gn_calls:
        a = a.to(memory_format=torch.channels_last).requires_grad_(True)
        train_calls.append((a, g, w.clone().requires_grad_(True), b.clone().requires_grad_(True), torch.randn_like(a)))

    def gn_train():
        for a, g, w, b, grad in train_calls:
            fops.group_norm_silu(a, g, w, b).backward(grad)

    rows += _rows(interleaved(gn_train), case({**common, "kind": "op", "layout": "channels_last",
                                               "op": f"group_norm_silu fwd+bwd x{len(gn_calls)}",
                                               "shape": list(xx.shape)}))
    # The sampler step on the images, without noise (sigma = 0: DDIM eta = 0) and with it.
    out = torch.randn_like(x)
    p, q, A, B = (torch.rand(batch) for _ in range(4))
    for name, sigma in (("sampler_step sigma=0", torch.zeros(batch)), ("sampler_step", torch.rand(batch))):
        def step(sigma=sigma):
            return fops.sampler_step(x, out, p, q, A, B, sigma, seeds, 7, clip=1.0, return_x0=True)
        rows += _rows(interleaved(step, reps=10), case({**common, "kind": "op", "op": name, "shape": [batch, *shape]}))
    return rows


def run_native_benchmarks(device="cpu", quick: bool = False, *, presets=PRESETS, batch: int = 64, steps: int = 10,
                          rounds: int = 5, clock: str = "wall", **cpu_kw) -> list[dict]:
    """All rows for `device` (benchmarks/bench_native_cpu.py). quick: digits only, batch 4, one DDIM step (eta 1),
    both layouts, one round on the CPU (seconds); small tensors on a GPU, where the rows are the op benchmarks'
    (the native CUDA kernels are one of their providers). cpu_kw: etas, layouts, op_rows of `cpu_rows`."""
    if not native.available():
        raise ConfigError(f"the native benchmarks need the extension: {native.load_error()} (see README)")
    if torch.device(device).type == "cuda":
        if not native.cuda_available():
            raise ConfigError("fastdiff._C has no CUDA kernels: build it on a machine with a CUDA toolkit and a CUDA "
                              "torch")
        return run_op_benchmarks(device, quick, ops=("group_norm_silu", "sampler_step"))
    if quick:
        return cpu_rows("digits", batch=4, steps=1, rounds=1, clock=clock, etas=(1.0,), layouts=LAYOUTS)
    rows = []
    for preset in presets:
        rows += cpu_rows(preset, batch=batch, steps=steps, rounds=rounds, clock=clock, **cpu_kw)
    return rows
