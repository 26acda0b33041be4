"""The fast sampling path: channels_last, bf16/fp16 autocast, torch.compile and CUDA graphs around the plain
model and sampler step. Every option can be switched off; with all of them off the plain loop runs.

`FastSampler`: the plain loop's denoising step (`fastdiff.diffusion.samplers.denoise_step`: model, classifier-free
guidance, `ops.sampler_step`) runs on static device buffers: the StepTable is copied once per run into a device
table, and the step reads its timestep, coefficients and step index through a device counter that the step itself
advances. With CUDA graphs the step is captured once and a run of n steps is n graph replays with no host syncs
in between. Compiled or graphed, batches are padded up to a bucket (the next power of two): one capture and one
compiled specialisation per bucket, at most 2x wasted work on unlucky sizes; a batch that a bucket already
prepared holds (a run's last, partial batch) runs in it rather than compiling and capturing a smaller one. Padded
rows get seed 0 and are dropped; a sample depends only on its own seed, so padding does not change the others (up
to the convolution algorithm the batch size selects). Eager (the CPU's default: channels_last and autocast only)
nothing is padded: a batch of 36 would otherwise run 64 rows.
Outputs live in the static buffers and are overwritten by the next replay, so everything handed out is a clone.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from fastdiff.diffusion.samplers import StepTable, check_batch, check_guidance_clip, denoise_step, model_output
from fastdiff.errors import ConfigError
from fastdiff.runtime import AccelOptions, amp_dtype, autocast, compile_fn, next_power_of_2, synchronize

# Dynamo keeps its compiled entries per code object and, past `recompile_limit` (8) entries, a fullgraph compile
# is an error. Every FastSampler's step is one code object, compiled once per bucket (static shapes) and per
# sampler setting (guidance, clip, model: constants to Dynamo), so its calls run under a higher limit (torch
# 2.11 has no per-function limit). The patch costs microseconds a call, against a UNet step's milliseconds, and none
# with CUDA graphs (a replay skips the call). The op benchmark meets the same limit with a Dynamo reset per case
# instead: a per-call patch there would slow the torch-compile baseline's microsecond calls, and a reset here
# would throw away every other sampler's compiled code.
RECOMPILE_LIMIT = 256


def bucket_size(n: int) -> int:
    """The padded batch size for n samples: the next power of two."""
    return next_power_of_2(n)


def autocast_model(model: Callable, device, amp: str) -> Callable:
    """model(x, t, labels) under autocast, returning float32 (guidance and the sampler step stay in fp32)."""
    if amp_dtype(amp) is None:
        return model

    def forward(x, t, labels=None):
        # cache_enabled=False: the autocast weight cache must not outlive a CUDA graph capture.
        with autocast(device, amp, cache_enabled=False):
            out = model_output(model(x, t, labels), x)
        return out.float()

    return forward


def chunked_model(model: Callable, max_rows: int) -> Callable:
    """model(x, t, labels) run on at most `max_rows` rows per call (0: all at once), the outputs concatenated.

    Why: on the CPU a call over many rows allocates activations beyond glibc malloc's largest reusable block
    (32 MiB), which the kernel then maps and zero-fills afresh on every call (`AccelOptions.max_rows`)."""
    if not max_rows:
        return model

    def forward(x, t, labels=None):
        if x.shape[0] <= max_rows:
            return model(x, t, labels)
        parts = [model(x[i : i + max_rows], t[i : i + max_rows], None if labels is None else labels[i : i + max_rows])
                 for i in range(0, x.shape[0], max_rows)]
        return torch.cat(parts)

    return forward


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

    The model (an nn.Module or any callable model(x, t, labels)) must be in eval mode; a module is converted to
    the options' layout in place (and again by `run` if something else changed its weights' storage since, with
    its buckets prepared afresh). `setup_s` accumulates the
    seconds spent compiling and capturing (each new bucket), `replays` counts CUDA graph replays.
    """

    def __init__(self, model: Callable, options: AccelOptions, *, device, shape, guidance: float = 1.0,
                 null_label: int | None = None, clip: float | None = None, capacity: int = 1000, warmup: int = 2,
                 conditional: bool | None = None):
        self.device = torch.device(device)
        self.options = options.check(self.device)
        guidance, clip = check_guidance_clip(guidance, clip)
        self.memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        self.module = model if isinstance(model, torch.nn.Module) else None  # a plain callable: inputs only
        self._convert()
        self.shape = tuple(shape)
        # A conditional model (default: one with a null label) gets its labels through a static buffer too.
        self.conditional = null_label is not None if conditional is None else conditional
        self.null_label = null_label
        forward = chunked_model(autocast_model(model, self.device, options.amp), options.max_rows)

        def step_fn(x, t, coefs, seeds, step, labels):
            return denoise_step(forward, x, t, coefs, seeds, step, labels, guidance=guidance, null_label=null_label,
                                clip=clip)

        self.step_fn = compile_fn(step_fn, options)
        if options.compile:
            compiled = self.step_fn

            def limited(*args):
                limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
                with torch._dynamo.config.patch(recompile_limit=limit):
                    return compiled(*args)

            self.step_fn = limited
        self.capacity = capacity
        self.warmup = warmup
        self.setup_s = 0.0
        self.replays = 0
        self._buckets: dict[int, _StaticStep] = {}

    def _weight_storage(self) -> tuple:
        """Where and how the module's weights and buffers live (a captured graph reads these addresses)."""
        if self.module is None:
            return ()
        return tuple((t.data_ptr(), t.stride(), t.dtype) for t in (*self.module.parameters(), *self.module.buffers()))

    def _convert(self) -> None:
        """The module in this sampler's layout, its weights still ordinary tensors (`run` is in inference mode,
        where a conversion would make them inference tensors, which a later training step cannot use)."""
        if self.module is not None:
            with torch.inference_mode(False):
                self.module.to(memory_format=self.memory_format)
        self._weights = self._weight_storage()

    def _check_weights(self) -> None:
        """Put the module back in this sampler's layout if something replaced its weights since the buckets were
        prepared (another sampler's layout on the same model, .half()): the graphs captured against the old
        storage would read freed memory, so they are dropped and captured again."""
        if self.module is None or self._weight_storage() == self._weights:
            return
        self._convert()
        self._buckets.clear()

    def _bucket(self, n: int, steps: int) -> _StaticStep:
        self._check_weights()
        if steps > self.capacity:  # a longer table than the buffers hold: new buffers, new captures
            self._buckets.clear()
            self.capacity = steps
        prepared = self.options.compile or self.options.cuda_graphs  # compiled or captured once per bucket
        size = bucket_size(n) if prepared else n
        if prepared and size not in self._buckets:
            # A prepared bucket that holds n already (a run's last, partial batch): its padded rows cost a fraction
            # of the compile and capture a new bucket would.
            size = min((s for s in self._buckets if s >= n), default=size)
        if size not in self._buckets:
            if not prepared:  # buffers that cost an allocation only: one set, not one per batch size ever seen
                self._buckets.clear()
            st = _StaticStep(size, self.shape, self.device, self.memory_format, self.conditional, self.capacity)
            if prepared:
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
            synchronize(self.device)
            return
        device = self.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(self.warmup):
                st.body(self.step_fn)
        torch.cuda.current_stream(device).wait_stream(side)
        st.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's sampling of another model (allocating, synchronizing) stays legal during
        # this capture, which torch's default "global" mode would make fail; this thread's unsafe calls still do
        with torch.cuda.device(device), torch.cuda.graph(st.graph, capture_error_mode="thread_local"):
            st.body(self.step_fn)
        torch.cuda.synchronize(device)
        st.index.zero_()

    @torch.inference_mode()
    def run(self, x: torch.Tensor, table: StepTable, *, seeds: torch.Tensor, labels: torch.Tensor | None = None,
            callback: Callable | None = None) -> torch.Tensor:
        """Sample from x_T; same contract as `run_table` (callback(i, t, x_prev, x0) gets clones). Its static
        buffers are shared by every call: one at a time (`fastdiff.sampling.sample` sees to it)."""
        n = x.shape[0]
        check_batch(x, seeds, labels)
        if self.conditional and labels is None:  # unconditional samples from a conditional model
            if self.null_label is None:
                raise ConfigError("labels are needed: the model is class-conditional and has no null class")
            labels = torch.full((n,), self.null_label, dtype=torch.int64)
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
