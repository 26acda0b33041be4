"""Acceleration around the plain model, sampler and training step: channels_last, bf16/fp16 autocast,
torch.compile and CUDA graphs. Every option can be switched off; with all of them off the plain path runs.

Sampling (`FastSampler`). A denoising step (model, classifier-free guidance, `ops.sampler_step`) runs on static
device buffers: the StepTable is copied once per run into a device table, and the step reads its timestep,
coefficients and step index through a device counter that the step itself advances. With CUDA graphs the
step is captured once and a run of n steps is n graph replays with no host syncs in between. Batches are
padded up to a bucket (the next power of two): one capture and one compiled specialisation per bucket, at most
2x wasted work on unlucky sizes. Padded rows get seed 0 and are dropped; a sample depends only on its own
seed, so padding does not change the others (up to the convolution algorithm the batch size selects).
Outputs live in the static buffers and are overwritten by the next replay, so everything handed out is a clone.

Training (`TrainStep`, `GraphedTrainStep`). One optimisation step: loss, backward, gradient clipping, optimizer
step. The graphed step captures all four for a static batch; the learning rate is read from a device tensor
that is refreshed before each replay, the per-step generators of `fastdiff.train.loop` are re-seeded before
each replay (CUDA graphs read a generator's seed and offset at replay time), so the random numbers are those
of the eager step and a resumed run continues as the uninterrupted one would. The LR schedule and the EMA
update stay outside the graph. fp16 needs a dynamic loss scale with host-side decisions: it is never graphed.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from fastdiff import ops
from fastdiff.diffusion.samplers import StepTable, guided
from fastdiff.errors import ConfigError
from fastdiff.train.loop import amp_dtype, mix_seed, step_generator


@dataclass
class AccelOptions:
    """Which fast paths to use. `for_device` gives every fast path on a GPU and the plain path on the CPU."""

    channels_last: bool = False
    amp: str = "fp32"  # sampling autocast (training uses the run's own --amp)
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode; None is Inductor's default (we do our own graphs)
    compile_backend: str = "inductor"
    cuda_graphs: bool = False
    fullgraph: bool = True  # a graph break is an error: our ops are torch.library ops

    @classmethod
    def for_device(cls, device, **overrides) -> "AccelOptions":
        cuda = torch.device(device).type == "cuda"
        opts = cls(channels_last=cuda, amp="bf16" if cuda else "fp32", compile=cuda, cuda_graphs=cuda)
        return dataclasses.replace(opts, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def plain(self) -> bool:
        return not (self.channels_last or self.compile or self.cuda_graphs or self.amp != "fp32")

    def check(self, device) -> "AccelOptions":
        device = torch.device(device)
        amp_dtype(self.amp)  # raises on an unknown mode
        if device.type != "cuda" and self.cuda_graphs:
            raise ConfigError("CUDA graphs need a CUDA device; drop --cuda-graphs or use --device cuda")
        if device.type != "cuda" and self.amp == "fp16":
            raise ConfigError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or fp32")
        if self.compile and self.cuda_graphs and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError(f"--compile-mode {self.compile_mode} makes CUDA graphs of its own inside ours; use "
                              "max-autotune-no-cudagraphs (or the default mode), or --no-cuda-graphs")
        return self

    def describe(self) -> str:
        parts = [self.amp] + [name for name in ("channels_last", "compile", "cuda_graphs") if getattr(self, name)]
        return "+".join(parts)


def bucket_size(n: int) -> int:
    """The padded batch size for n samples: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def compile_fn(fn: Callable, options: AccelOptions) -> Callable:
    """torch.compile(fn) with the options' mode and backend, static shapes, and no graph breaks allowed."""
    if not options.compile:
        return fn
    return torch.compile(fn, fullgraph=options.fullgraph, dynamic=False, mode=options.compile_mode,
                         backend=options.compile_backend)


def autocast_model(model: Callable, device, amp: str) -> Callable:
    """model(x, t, labels) under autocast, returning float32 (guidance and the sampler step stay in fp32)."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return model
    device_type = torch.device(device).type

    def forward(x, t, labels=None):
        # cache_enabled=False: the autocast weight cache must not outlive a CUDA graph capture.
        with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
            out = model(x, t, labels)
        return out.float()

    return forward


def denoise_step(model, x, t, coefs, seeds, step, labels, *, guidance: float, null_label: int | None, clip):
    """One step of `run_table` with every per-step value on the device: t [n], coefs [5], step a 0-d int64."""
    n = x.shape[0]
    out = guided(model, x, t, labels, guidance, null_label)
    p, q, A, B, sigma = [c.expand(n) for c in coefs.unbind(0)]
    return ops.sampler_step(x, out, p, q, A, B, sigma, seeds, step, clip=clip, return_x0=True)


class _StaticStep:
    """Static buffers of one padded batch size and the step that reads and advances them."""

    def __init__(self, size: int, shape, device, memory_format, conditional: bool, capacity: int):
        self.size = size
        self.x = torch.zeros((size, *shape), device=device).contiguous(memory_format=memory_format)
        self.x0 = torch.zeros_like(self.x)
        self.t = torch.zeros(size, device=device)
        self.seeds = torch.zeros(size, dtype=torch.int64, device=device)
        self.labels = torch.zeros(size, dtype=torch.int64, device=device) if conditional else None
        self.timesteps = torch.zeros(capacity, device=device)
        self.coefs = torch.zeros(capacity, 5, device=device)
        self.index = torch.zeros((), dtype=torch.int64, device=device)
        self.graph = None

    def load(self, x, table: StepTable, seeds, labels) -> None:
        """Copy a batch (padded with zeros) and a table into the buffers; reset the step counter. No host sync."""
        n, steps = x.shape[0], len(table)
        self.x[:n].copy_(x)
        self.x[n:].zero_()
        self.seeds[:n].copy_(seeds)
        self.seeds[n:].zero_()
        if self.labels is not None:
            self.labels[:n].copy_(labels)
            self.labels[n:].zero_()
        self.timesteps[:steps].copy_(table.timesteps)
        self.coefs[:steps].copy_(table.coefs)
        self.index.zero_()

    def body(self, step_fn) -> None:
        idx = self.index.view(1)
        t = self.timesteps.index_select(0, idx).expand(self.size)
        coefs = self.coefs.index_select(0, idx)[0]
        x_prev, x0 = step_fn(self.x, t, coefs, self.seeds, self.index, self.labels)
        self.x.copy_(x_prev)
        self.x0.copy_(x0)
        self.t.copy_(t)
        self.index.add_(1)

    def step(self, step_fn) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body(step_fn)


class FastSampler:
    """Runs StepTables like `fastdiff.diffusion.run_table`, through the fast paths that `options` enable.

    The model must be in eval mode; with channels_last it is converted in place. `setup_s` accumulates the
    seconds spent compiling and capturing (each new bucket), `replays` counts CUDA graph replays.
    """

    def __init__(self, model: torch.nn.Module, options: AccelOptions, *, device, shape, guidance: float = 1.0,
                 null_label: int | None = None, clip: float | None = None, capacity: int = 1000, warmup: int = 2):
        self.device = torch.device(device)
        self.options = options.check(self.device)
        self.memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        model.to(memory_format=self.memory_format)
        self.shape = tuple(shape)
        self.conditional = null_label is not None  # then labels are a static buffer too
        self.null_label = null_label
        forward = autocast_model(model, self.device, options.amp)

        def step_fn(x, t, coefs, seeds, step, labels):
            return denoise_step(forward, x, t, coefs, seeds, step, labels, guidance=guidance, null_label=null_label,
                                clip=clip)

        self.step_fn = compile_fn(step_fn, options)
        self.capacity = capacity
        self.warmup = warmup
        self.setup_s = 0.0
        self.replays = 0
        self._buckets: dict[int, _StaticStep] = {}

    def _bucket(self, n: int, steps: int) -> _StaticStep:
        if steps > self.capacity:  # a longer table than the buffers hold: new buffers, new captures
            self._buckets.clear()
            self.capacity = steps
        size = bucket_size(n)
        if size not in self._buckets:
            st = _StaticStep(size, self.shape, self.device, self.memory_format, self.conditional, self.capacity)
            if self.options.compile or self.options.cuda_graphs:
                t0 = time.perf_counter()
                self._prepare(st)
                self.setup_s += time.perf_counter() - t0
            self._buckets[size] = st
        return self._buckets[size]

    def _prepare(self, st: _StaticStep) -> None:
        """Compile (first calls), then capture one step as a CUDA graph when enabled."""
        if not self.options.cuda_graphs:
            st.body(self.step_fn)
            st.index.zero_()
            _synchronize(self.device)
            return
        device = self.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(self.warmup):
                st.body(self.step_fn)
        torch.cuda.current_stream(device).wait_stream(side)
        st.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(st.graph):
            st.body(self.step_fn)
        torch.cuda.synchronize(device)
        st.index.zero_()

    @torch.no_grad()
    def run(self, x: torch.Tensor, table: StepTable, *, seeds: torch.Tensor, labels: torch.Tensor | None = None,
            callback: Callable | None = None) -> torch.Tensor:
        """Sample from x_T; same contract as `run_table` (callback(i, t, x_prev, x0) gets clones)."""
        n = x.shape[0]
        if seeds.shape != (n,):
            raise ConfigError(f"seeds must have shape [{n}] (one per sample), got {list(seeds.shape)}")
        if self.conditional and labels is None:  # unconditional samples from a conditional model
            labels = torch.full((n,), self.null_label, dtype=torch.int64)
        if self.conditional and labels.shape != (n,):
            raise ConfigError(f"labels must have shape [{n}] (one per sample), got {list(labels.shape)}")
        if tuple(x.shape[1:]) != self.shape:
            raise ConfigError(f"the sampler was built for images {list(self.shape)}, got {list(x.shape[1:])}")
        st = self._bucket(n, len(table))
        st.load(x.to(self.device), table, seeds.to(self.device),
                labels.to(self.device) if self.conditional else None)
        for i in range(len(table)):
            st.step(self.step_fn)
            self.replays += st.graph is not None
            if callback is not None:
                callback(i, st.t[:n].clone(), st.x[:n].clone(), st.x0[:n].clone())
        return st.x[:n].clone(memory_format=torch.contiguous_format)


class TrainStep:
    """One optimisation step: loss_fn(gen, *batch), backward, gradient clipping, optimizer step.

    Randomness as in `fastdiff.train.loop`: `gen` is seeded with mix_seed(seed, step) and the global generators
    with mix_seed(seed, step, 1) (dropout). Returns (loss, grad_norm) as device tensors. The LR schedule and the
    EMA are the caller's. `setup_s` is the time of the first (compiling) call when the model is compiled.
    """

    def __init__(self, params, opt, loss_fn: Callable, *, grad_clip: float, seed: int, device, scaler=None,
                 timed_first_call: bool = False):
        self.params = [p for p in params if p.requires_grad]
        self.opt, self.loss_fn, self.grad_clip, self.seed = opt, loss_fn, grad_clip, seed
        self.device = torch.device(device)
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.device.type, enabled=False)
        self.setup_s = 0.0
        self._time_next = timed_first_call

    def take_setup_seconds(self) -> float:
        """Setup seconds not yet reported (so that throughput can exclude them); resets the count."""
        s, self.setup_s = self.setup_s, 0.0
        return s

    def __call__(self, step: int, *batch):
        t0 = time.perf_counter() if self._time_next else None
        gen = step_generator(self.seed, step, self.device)
        torch.manual_seed(mix_seed(self.seed, step, stream=1))  # dropout masks
        loss = self.loss_fn(gen, *batch)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        if t0 is not None:
            _synchronize(self.device)
            self.setup_s += time.perf_counter() - t0
            self._time_next = False
        return loss, grad_norm


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GraphedTrainStep(TrainStep):
    """`TrainStep` captured as one CUDA graph for a static batch shape (re-captured if the shape changes).

    The optimizer must support `capturable` (Adam, AdamW; fused or foreach). Capture runs `warmup` real steps
    on a side stream first (compiling and initialising optimizer state), then restores the weights and the
    optimizer state, so the run continues exactly from where it was. Outputs are static tensors overwritten by
    the next call: read or clone them before calling again.
    """

    def __init__(self, params, opt, loss_fn: Callable, *, grad_clip: float, seed: int, device, warmup: int = 2):
        super().__init__(params, opt, loss_fn, grad_clip=grad_clip, seed=seed, device=device)
        if self.device.type != "cuda":
            raise ConfigError("a graphed training step needs a CUDA device; use --no-cuda-graphs")
        if "capturable" not in opt.defaults:
            raise ConfigError(f"{type(opt).__name__} cannot be captured in a CUDA graph; use AdamW or --no-cuda-graphs")
        self.warmup = warmup
        self.gen = torch.Generator(self.device)
        self.graph = None
        self.static: list[torch.Tensor] = []
        self.lr_buffers = [torch.zeros((), dtype=torch.float32, device=self.device) for _ in opt.param_groups]
        self.loss = self.grad_norm = None

    def _body(self):
        loss = self.loss_fn(self.gen, *self.static)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        return loss.detach(), grad_norm

    def _snapshot(self):
        params = [p.detach().clone() for p in self.params]
        state = {p: {k: v.clone() for k, v in self.opt.state[p].items() if torch.is_tensor(v)}
                 for p in self.params if p in self.opt.state}
        return params, state

    @torch.no_grad()
    def _restore(self, snapshot) -> None:
        params, state = snapshot
        for p, saved in zip(self.params, params):
            p.copy_(saved)
        for p in self.params:  # state created by the warm-up steps goes back to a fresh optimizer's zeros
            for k, v in self.opt.state.get(p, {}).items():
                if not torch.is_tensor(v):
                    continue
                if p in state:
                    v.copy_(state[p][k])
                else:
                    v.zero_()

    def _capture(self, batch) -> None:
        t0 = time.perf_counter()
        self.static = [b.detach().clone() for b in batch]
        for p in self.params:  # a capturable step counter lives on the device (a CPU run saves it on the host)
            st = self.opt.state.get(p, {})
            if torch.is_tensor(st.get("step")) and st["step"].device != p.device:
                st["step"] = st["step"].to(p.device)
        snapshot = self._snapshot()
        groups = self.opt.param_groups
        saved = [(g["lr"], g.get("capturable", False)) for g in groups]
        for g, buf in zip(groups, self.lr_buffers):  # the graph reads the LR from a device tensor
            buf.fill_(float(g["lr"]))
            g["lr"], g["capturable"] = buf, True
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*capturable.*")
                for i in range(self.warmup):
                    self.gen.manual_seed(mix_seed(self.seed, i))
                    self.opt.zero_grad(set_to_none=True)
                    self._body()
            torch.cuda.current_stream(self.device).wait_stream(side)
            # Gradients are allocated inside the capture, in the graph's pool, and rewritten by every replay.
            self.opt.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            self.graph.register_generator_state(self.gen)
            with torch.cuda.device(self.device), torch.cuda.graph(self.graph):
                self.loss, self.grad_norm = self._body()
        finally:
            for g, (lr, capturable) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, capturable
        self._restore(snapshot)
        torch.cuda.synchronize(self.device)
        self.setup_s += time.perf_counter() - t0

    def __call__(self, step: int, *batch):
        if self.graph is None or [b.shape for b in batch] != [s.shape for s in self.static]:
            self._capture(batch)
        self.gen.manual_seed(mix_seed(self.seed, step))
        torch.manual_seed(mix_seed(self.seed, step, stream=1))  # dropout masks: the default generator
        for s, b in zip(self.static, batch):
            s.copy_(b)
        for g, buf in zip(self.opt.param_groups, self.lr_buffers):
            buf.fill_(float(g["lr"]))
        self.graph.replay()
        return self.loss, self.grad_norm


def make_train_step(model: torch.nn.Module, opt, loss_fn: Callable, *, grad_clip: float, seed: int, device,
                    amp: str, options: AccelOptions, scaler=None, log: Callable[[str], None] | None = None):
    """The training step the options ask for: graphed where possible (CUDA, not fp16), else eager."""
    device = torch.device(device)
    if options.cuda_graphs and device.type == "cuda" and amp != "fp16":
        return GraphedTrainStep(model.parameters(), opt, loss_fn, grad_clip=grad_clip, seed=seed, device=device)
    if options.cuda_graphs and log is not None:
        log("CUDA graphs are off for this run: fp16 needs a dynamic loss scale (use --amp bf16 to graph the step)")
    return TrainStep(model.parameters(), opt, loss_fn, grad_clip=grad_clip, seed=seed, device=device, scaler=scaler,
                     timed_first_call=options.compile)


def compile_model(model: torch.nn.Module, options: AccelOptions) -> Callable:
    """The callable to train or evaluate with: `model` itself, or torch.compile(model) sharing its parameters."""
    return compile_fn(model, options)
