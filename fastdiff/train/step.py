"""One optimisation step of training: loss, backward, gradient clipping, optimizer step (`TrainStep`), and the
same step captured as one CUDA graph (`GraphedTrainStep`).

`loss_fn(gen, *batch)` returns the loss, or (loss, extras) with a tuple of further tensors (detached values the
caller logs or feeds to another step, e.g. ADD's student images for its discriminator update); the step returns
(loss, grad_norm, *extras).

The graphed step captures all four for a static batch; the learning rate is read from a device tensor that is
refreshed before each replay, and the per-step generators are re-seeded before each replay (CUDA graphs read a
generator's seed and offset at replay time), so the random numbers are those of the eager step and a resumed
run continues as the uninterrupted one would. The LR schedule and the EMA update stay outside the graph. fp16
needs a dynamic loss scale with host-side decisions: it is never graphed.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

import torch

from fastdiff.errors import ConfigError
from fastdiff.runtime import AccelOptions, mix_seed, step_generator, synchronize


def adamw(params, device, **kwargs) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel, on the GPU and the CPU alike. torch's default on the CPU is a loop over
    the tensors: on mnist5k's 167 parameter tensors it stepped 3.54x slower than fused (`benchmarks/
    optimizer_step.py`, in benchmarks/results/2026-12-03b-cpu2-xeon-avx512/optimizer/). Every training
    objective (and the bench's training step) builds its optimizer here; `state_dicts.load_optimizer` gives the
    moments back in their parameter's strides, which the fused kernel needs."""
    return torch.optim.AdamW(params, fused=torch.device(device).type in ("cuda", "cpu"), **kwargs)


# fp16's loss scale, once it falls below this, says the gradients themselves overflow fp16 (above 65504) step after
# step: no longer a routine skip but a run that diverges.
MIN_LOSS_SCALE = 1.0


class TrainStep:
    """One optimisation step: loss_fn(gen, *batch), backward, gradient clipping, optimizer step.

    Randomness as in `fastdiff.runtime`: `gen` is seeded with mix_seed(seed, step) and the global generators
    with mix_seed(seed, step, 1) (dropout). Returns (loss, grad_norm, *extras) as device tensors. The learning
    rate and the EMA are the caller's. `setup_s` is the time of the first (compiling) call when the model is compiled.
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
        loss, extras = _split(self.loss_fn(gen, *batch))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() >= MIN_LOSS_SCALE:
            # A dynamic loss scale overflows by design (it grows until it does): scaler.step then skipped the
            # update and update() lowered the scale, the weights are untouched. Such a step's gradient norm is
            # inf or NaN; it is reported as 0, so that the NaN guard stops a run on its loss, not on a routine skip.
            # Once the scale has halved below MIN_LOSS_SCALE the gradients overflow step after step: the norm is
            # left as it is and the guard stops the run. (get_scale syncs; so does scaler.step, and fp16 is eager.)
            grad_norm = torch.nan_to_num(grad_norm, nan=0.0, posinf=0.0, neginf=0.0)
        if t0 is not None:
            synchronize(self.device)
            self.setup_s += time.perf_counter() - t0
            self._time_next = False
        return (loss, grad_norm, *extras)


class GraphedTrainStep(TrainStep):
    """`TrainStep` captured as one CUDA graph for a static batch shape (re-captured if the shape changes).

    The optimizer must support `capturable` (Adam, AdamW; fused or foreach). Capture runs `warmup` real steps
    on a side stream first (compiling and initialising optimizer state), then restores the weights and the
    optimizer state, so the run continues exactly from where it was; `buffers` are further tensors the loss writes
    in place (spectral-norm vectors of a discriminator it runs), restored likewise. Outputs are static tensors
    overwritten by the next call: read or clone them before calling again.
    """

    def __init__(self, params, opt, loss_fn: Callable, *, grad_clip: float, seed: int, device, warmup: int = 2,
                 buffers=()):
        super().__init__(params, opt, loss_fn, grad_clip=grad_clip, seed=seed, device=device)
        self.buffers = list(buffers)
        if self.device.type != "cuda":
            raise ConfigError("a graphed training step needs a CUDA device; use --no-cuda-graphs")
        if "capturable" not in opt.defaults:
            raise ConfigError(f"{type(opt).__name__} cannot be captured in a CUDA graph; use AdamW or --no-cuda-graphs")
        self.warmup = warmup
        self.gen = torch.Generator(self.device)
        self.graph = None
        self.static: list[torch.Tensor] = []
        self.lr_buffers = [torch.zeros((), dtype=torch.float32, device=self.device) for _ in opt.param_groups]
        self.outputs: tuple[torch.Tensor, ...] = ()

    def _body(self):
        loss, extras = _split(self.loss_fn(self.gen, *self.static))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        return (loss.detach(), grad_norm, *extras)

    def _snapshot(self):
        params = [p.detach().clone() for p in self.params]
        state = {p: {k: v.clone() for k, v in self.opt.state[p].items() if torch.is_tensor(v)}
                 for p in self.params if p in self.opt.state}
        return params, state, [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def _restore(self, snapshot) -> None:
        params, state, buffers = snapshot
        for p, saved in zip(self.params + self.buffers, params + buffers):
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
            with torch.cuda.device(self.device), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self._body()
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
        return self.outputs


def _split(out) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A loss function's result as (loss, extras)."""
    if isinstance(out, tuple):
        loss, extras = out
        return loss, tuple(extras)
    return out, ()


def make_train_step(model: torch.nn.Module, opt, loss_fn: Callable, *, grad_clip: float, seed: int, device,
                    amp: str, options: AccelOptions, scaler=None, log: Callable[[str], None] | None = None,
                    buffers=()):
    """The training step the options ask for: graphed where possible (CUDA, not fp16), else eager.

    `model`'s parameters that require gradients are the ones stepped; `buffers` as in `GraphedTrainStep`.
    """
    device = torch.device(device)
    if options.cuda_graphs and device.type == "cuda" and amp != "fp16":
        return GraphedTrainStep(model.parameters(), opt, loss_fn, grad_clip=grad_clip, seed=seed, device=device,
                                buffers=buffers)
    if options.cuda_graphs and log is not None:
        log("CUDA graphs are off for this run: fp16 needs a dynamic loss scale (use --amp bf16 to graph the step)")
    return TrainStep(model.parameters(), opt, loss_fn, grad_clip=grad_clip, seed=seed, device=device, scaler=scaler,
                     timed_first_call=options.compile)
