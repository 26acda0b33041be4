"""Benchmarks of the native extension fastdiff._C against the plain-PyTorch reference (and Triton on a GPU).

CPU (`run_native_benchmarks("cpu")`), for the `digits` and `mnist` presets with random-initialised UNets:
- e2e: DDIM sampling as the presets sample (guidance 2, so the UNet sees twice the batch; clip 1; eta 0, so the
  sampler step draws no noise, and eta 1, so it does), images/s per provider;
- op: one UNet forward; all GroupNorm+SiLU calls of one forward (the shapes recorded from the model); the same
  calls forward+backward in channels_last (as `fastdiff train` runs them); the sampler step with and without
  noise.
Providers: `torch-eager` (the reference ops, i.e. use_backend("torch"), no compile) and `fastdiff-native`
(the same model and sampler under use_backend("native"): `fastdiff.ops` runs the native kernels). Providers
are timed in alternation (see `timing.time_interleaved`); every row carries its ratio to torch-eager from the
same run.

GPU (`run_native_benchmarks("cuda")`): the CUDA C++ sampler step and GroupNorm+SiLU against torch-eager and,
where `fastdiff.ops` has them, the Triton kernels, at sizes that fill the GPU; GB/s from the stated bytes.
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch

import fastdiff.ops as fops
from fastdiff import reference
from fastdiff.bench.timing import time_fn, time_interleaved
from fastdiff.config import preset_config
from fastdiff.diffusion import NoiseSchedule, initial_noise, sample_ddim, seeds_for
from fastdiff.errors import ConfigError
from fastdiff.models import UNet
from fastdiff.nn import GroupNormSiLU
from fastdiff.ops import native, use_backend

PROVIDERS = ("torch-eager", "fastdiff-native")
LAYOUTS = ("nchw", "channels_last")
PRESETS = ("digits", "mnist")
GUIDANCE = 2.0


BACKEND_OF = {"torch-eager": "torch", "fastdiff-native": "native"}


def ops_provider(provider: str):
    """The ops backend of one provider while the block runs (`fastdiff.ops.use_backend`): the model's and the
    sampler's fused ops (`fastdiff.ops.<op>`) run exactly the implementation the provider names, whatever the
    automatic dispatch would pick (timestep_embedding has no native kernel and runs the reference under both)."""
    return use_backend(BACKEND_OF[provider])


def _with_provider(provider: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with ops_provider(provider):
            return fn()

    return run


def _unet(preset: str, device) -> tuple[torch.nn.Module, object]:
    cfg = preset_config(preset)
    torch.manual_seed(0)
    return UNet(cfg.model).to(device).eval(), cfg


def group_norm_shapes(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels) -> list[tuple]:
    """(shape, num_groups) of every GroupNormSiLU call in one forward of `model`."""
    shapes: list[tuple] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: shapes.append((tuple(args[0].shape), m.num_groups)))
             for m in model.modules() if isinstance(m, GroupNormSiLU)]
    try:
        with torch.no_grad():
            model(x, t, labels)
    finally:
        for h in hooks:
            h.remove()
    return shapes


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
    """Rows of timings keyed by provider or by (provider, layout); the ratio is to torch-eager (NCHW)."""
    timings = {k if isinstance(k, tuple) else (k, None): t for k, t in timings.items()}
    ref = (timings.get(("torch-eager", None)) or timings[("torch-eager", "nchw")]).median_ms
    out = []
    for (provider, layout), t in timings.items():
        row = {**base, "provider": provider, **({"layout": layout} if layout else {}), **t.to_dict(),
               "ratio_vs_torch_eager": ref / t.median_ms}
        if images is not None:
            row["images_per_s"] = images / (t.median_ms * 1e-3)
        out.append(row)
    return out


def cpu_rows(preset: str, *, batch: int = 64, steps: int = 10, rounds: int = 5, clock: str = "wall",
             etas: tuple[float, ...] = (0.0, 1.0), layouts: tuple[str, ...] = ("nchw",), op_rows: bool = True
             ) -> list[dict]:
    """The e2e and op rows of one preset on the CPU (see the module docstring). layouts: the memory formats of
    the e2e and UNet-forward rows ("nchw", "channels_last": the model's weights and the images), each provider
    in each, all against torch-eager NCHW; op_rows=False keeps the e2e rows alone."""
    model, cfg = _unet(preset, "cpu")
    model.requires_grad_(False)
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
    common = {"suite": "native", "device": "cpu", "preset": preset, "threads": torch.get_num_threads(),
              "clock": clock}
    rows: list[dict] = []

    def interleaved(fn_of_provider, reps=1):
        fns = {p: _with_provider(p, fn_of_provider) for p in PROVIDERS}
        return time_interleaved(fns, "cpu", rounds=rounds, reps_per_round=reps, clock=clock)

    def interleaved_layouts(fn_of_layout):
        fns = {(p, layout): _with_provider(p, functools.partial(fn_of_layout, layout))
               for layout in layouts for p in PROVIDERS}
        return time_interleaved(fns, "cpu", rounds=rounds, clock=clock)

    def images(layout, t):
        return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)

    for eta in etas:
        def sample(layout, eta=eta):
            with torch.no_grad():
                return sample_ddim(models[layout], images(layout, x), schedule, steps=steps, eta=eta, seeds=seeds,
                                   labels=labels, guidance=GUIDANCE, null_label=null, clip=1.0)
        base = {**common, "kind": "e2e", "op": f"ddim{steps} eta={eta:g} guidance={GUIDANCE:g}",
                "shape": [batch, *shape]}
        rows += _rows(interleaved_layouts(sample), base, images=batch)
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

    rows += _rows(interleaved_layouts(forward), {**common, "kind": "op", "op": "unet forward", "shape": list(xx.shape)})
    for provider in PROVIDERS:  # where the forward's time goes (after the timing: the profiler adds overhead)
        with ops_provider(provider):
            rows.append({**common, "kind": "profile", "op": "unet forward", "shape": list(xx.shape),
                         "provider": provider, **profile_shares(forward)})
    rows += _rows(interleaved(gn_forward), {**common, "kind": "op", "op": f"group_norm_silu x{len(gn_calls)}",
                                            "shape": list(xx.shape)})
    # Training: forward+backward of the same calls (2 * batch = 128 is also the presets' training batch),
    # channels_last as `fastdiff train` runs.
    train_calls = []
    for a, g, w, b in gn_calls:
        a = a.to(memory_format=torch.channels_last).requires_grad_(True)
        train_calls.append((a, g, w.clone().requires_grad_(True), b.clone().requires_grad_(True), torch.randn_like(a)))

    def gn_train():
        for a, g, w, b, grad in train_calls:
            fops.group_norm_silu(a, g, w, b).backward(grad)

    rows += _rows(interleaved(gn_train), {**common, "kind": "op", "op": f"group_norm_silu fwd+bwd x{len(gn_calls)}",
                                          "shape": list(xx.shape), "layout": "channels_last"})
    # The sampler step on the images, without noise (sigma = 0: DDIM eta = 0) and with it.
    out = torch.randn_like(x)
    p, q, A, B = (torch.rand(batch) for _ in range(4))
    for name, sigma in (("sampler_step sigma=0", torch.zeros(batch)), ("sampler_step", torch.rand(batch))):
        def step(sigma=sigma):
            return fops.sampler_step(x, out, p, q, A, B, sigma, seeds, 7, clip=1.0, return_x0=True)
        rows += _rows(interleaved(step, reps=10), {**common, "kind": "op", "op": name, "shape": [batch, *shape]})
    return rows


def _triton_impl(op: str):
    """fastdiff.ops.<op> when it runs Triton kernels on CUDA tensors, else None."""
    from fastdiff.ops.dispatch import REGISTRY, triton_available

    return getattr(fops, op) if op in REGISTRY and triton_available() else None


def gpu_rows(device="cuda", quick: bool = False) -> list[dict]:
    """CUDA C++ against torch-eager and Triton: sampler step and GroupNorm+SiLU forward at GPU-filling sizes."""
    if not native.cuda_available():
        raise ConfigError("fastdiff._C has no CUDA kernels: build it on a machine with a CUDA toolkit and a CUDA torch")
    device = torch.device(device)
    n = 64 if quick else 512
    rows = []
    x = torch.randn(n, 3, 128, 128, device=device)  # 4M elements per 64 samples: 201 MB per tensor at n = 512
    out = torch.randn_like(x)
    p, q, A, B, sigma = (torch.rand(n, device=device) for _ in range(5))
    seeds = torch.arange(n, device=device)
    step = torch.tensor(7, device=device)
    impls = {"torch-eager": reference.sampler_step, "fastdiff-native": native.sampler_step,
             "fastdiff-triton": _triton_impl("sampler_step")}
    rows += _gpu_op_rows("sampler_step", impls, lambda f: f(x, out, p, q, A, B, sigma, seeds, step, clip=1.0),
                         3 * x.numel() * x.element_size(), list(x.shape), device)  # read x, out; write x_prev
    h = torch.randn(n // 4 if not quick else n, 128, 32, 32, device=device)
    w, b = torch.randn(128, device=device), torch.randn(128, device=device)
    impls = {"torch-eager": reference.group_norm_silu, "fastdiff-native": native.group_norm_silu,
             "fastdiff-triton": _triton_impl("group_norm_silu")}
    rows += _gpu_op_rows("group_norm_silu", impls, lambda f: f(h, 32, w, b), 2 * h.numel() * h.element_size(),
                         list(h.shape), device)  # read x, write out
    return rows


def _gpu_op_rows(op: str, impls: dict, call: Callable, nbytes: int, shape: list, device) -> list[dict]:
    with use_backend(None):  # the Triton provider is fastdiff.ops' own choice on CUDA
        timings = {name: time_fn(lambda f=f: call(f), device) for name, f in impls.items() if f is not None}
    base = {"suite": "native", "device": torch.cuda.get_device_name(device), "kind": "op", "op": op, "shape": shape,
            "dtype": "float32"}
    rows = _rows(timings, base)
    for row in rows:
        row["gb_per_s"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
    return rows


def run_native_benchmarks(device="cpu", quick: bool = False, *, presets=PRESETS, batch: int = 64, steps: int = 10,
                          rounds: int = 5, clock: str = "wall", **cpu_kw) -> list[dict]:
    """All rows for `device` (benchmarks/bench_native_cpu.py). quick: digits only, batch 4, one DDIM step (eta 1),
    both layouts, one round on the CPU (seconds); small tensors on a GPU. cpu_kw: etas, layouts, op_rows of
    `cpu_rows`."""
    if not native.available():
        raise ConfigError(f"the native benchmarks need the extension: {native.load_error()} (see README)")
    if torch.device(device).type == "cuda":
        return gpu_rows(device, quick)
    if quick:
        return cpu_rows("digits", batch=4, steps=1, rounds=1, clock=clock, etas=(1.0,), layouts=LAYOUTS)
    rows = []
    for preset in presets:
        rows += cpu_rows(preset, batch=batch, steps=steps, rounds=rounds, clock=clock, **cpu_kw)
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of the rows, one line per provider."""
    lines = [f"{'preset/device':<14} {'kind':<4} {'op [layout]':<34} {'provider':<16} {'median ms':>10} "
             f"{'images/s':>9} {'GB/s':>7} {'vs torch':>8}"]
    for r in rows:
        where = r.get("preset", r.get("device", ""))
        if r["kind"] == "profile":
            shares = " ".join(f"{k[6:]} {v:.0%}" for k, v in r.items() if k.startswith("share_"))
            lines.append(f"{where:<14} prof {r['op']:<34} {r['provider']:<16} {r['profiled_ms']:>10.3f}  {shares}")
            continue
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else ""
        gbs = f"{r['gb_per_s']:.0f}" if "gb_per_s" in r else ""
        op = f"{r['op']} [{r['layout']}]" if r.get("layout", "nchw") != "nchw" else r["op"]
        lines.append(f"{where:<14} {r['kind']:<4} {op:<34} {r['provider']:<16} {r['median_ms']:>10.3f} "
                     f"{ips:>9} {gbs:>7} {r['ratio_vs_torch_eager']:>7.2f}x")
    return "\n".join(lines)
