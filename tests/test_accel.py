"""The fast paths (fastdiff.sampling.fast, fastdiff.train.step) against the plain ones: same samples, same steps.

CPU tests run the static-buffer sampler, compile (with the quick aot_eager backend) and the eager train step;
the CUDA-graph paths are `gpu` tests (bitwise equality in fp32, one replay per step, no host syncs, resume).
"""

import math

import pytest
import torch

from fastdiff.diffusion import NoiseSchedule, ddim_table, ddpm_table, initial_noise, make_timesteps, run_table
from fastdiff.errors import ConfigError
from fastdiff.models import UNet
from fastdiff.models.unet import UNetConfig
from fastdiff.ops import use_backend
from fastdiff.ops.dispatch import native_available
from fastdiff.runtime import AccelOptions, cpu_choice, train_defaults
from fastdiff.sampling.fast import FastSampler, autocast_model, bucket_size
from fastdiff.train.step import GraphedTrainStep, TrainStep

CFG = dict(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
           attn_resolutions=(4,), dropout=0.0, num_groups=4)


def tiny_unet(num_classes=10, device="cpu", dropout=0.0):
    torch.manual_seed(0)
    return UNet(UNetConfig(**{**CFG, "num_classes": num_classes, "dropout": dropout})).to(device).eval()


def tables(device="cpu"):
    schedule = NoiseSchedule("linear", 1000)
    ts = make_timesteps(1000, 3, "trailing")
    return schedule, {"ddim-eta0.5": ddim_table(schedule, ts, eta=0.5, device=device),
                      "ddpm": ddpm_table(schedule, ts, device=device)}


def sampling_inputs(n, device="cpu"):
    seeds = torch.arange(100, 100 + n)
    x = initial_noise(seeds, (1, 8, 8))
    labels = torch.arange(n) % 10
    return x.to(device), seeds.to(device), labels.to(device)


def test_options_defaults_and_checks():
    # The CPU's defaults follow its features and whether the native ops run (runtime.cpu_choice): with bf16
    # instructions (AMX or AVX-512 BF16) bf16, channels_last with the native ops and NCHW without them; without
    # bf16 instructions (AVX-512 without its BF16 extension included) fp32 channels_last either way.
    for flags in ({"avx512f", "amx_bf16"}, {"avx2", "avx512f", "avx512_bf16"}):
        for native in (True, False):
            bf16 = cpu_choice(frozenset(flags), native=native)
            assert (bf16.sample_amp, bf16.sample_channels_last, bf16.train_amp, bf16.train_channels_last) == (
                "bf16", native, "bf16", native), (flags, native)
            assert ("channels_last and the native" in bf16.why) == native
    assert "AVX-512 BF16" in cpu_choice(frozenset({"avx512_bf16"})).why
    for native in (True, False):
        assert cpu_choice(frozenset({"avx2", "avx512f"}), native=native).sample_amp == "fp32"
        other = cpu_choice(frozenset({"avx2"}), native=native)
        assert (other.sample_amp, other.sample_channels_last, other.train_amp, other.train_channels_last) == (
            "fp32", True, "fp32", True)
    # native=None asks whether the native ops run here now.
    bf16 = frozenset({"avx512_bf16"})
    with use_backend("torch"):
        assert not cpu_choice(bf16).sample_channels_last
    if native_available():
        with use_backend("native"):
            assert cpu_choice(bf16).sample_channels_last
    # Sampling calls chunked to 64 rows, 128 with AMX and the native ops (measured faster there), and said so.
    for flags in ({"amx_bf16"}, {"avx512_bf16"}, {"avx2", "avx512f"}, {"avx2"}):
        for native in (True, False):
            choice = cpu_choice(frozenset(flags), native=native)
            rows = 128 if native and flags == {"amx_bf16"} else 64
            assert choice.sample_max_rows == rows and f"at most {rows} rows" in choice.why, (flags, native)
    # The choice's row limit holds for its own precision and layout only: --amp fp32 on an AMX CPU took 128 rows,
    # which fault in fp32 (the sampling settings pass their overrides to for_device, which sees them).
    from fastdiff import runtime
    from fastdiff.sampling import load_run, resolve_settings

    amx = cpu_choice(frozenset({"amx_bf16"}), native=True)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(runtime, "cpu_choice", lambda: amx)
        rows = {over: AccelOptions.for_device("cpu", **dict(over)).max_rows
                for over in ((), (("amp", "bf16"),), (("amp", "fp32"),), (("channels_last", False),),
                             (("amp", "fp32"), ("max_rows", 128)))}
        assert list(rows.values()) == [128, 128, 64, 64, 128], rows
        run = load_run("pretrained:mnist", "cpu")
        assert resolve_settings(run, "cpu", amp="fp32").accel.max_rows == 64
        assert resolve_settings(run, "cpu").accel.max_rows == 128
    choice = cpu_choice()
    cpu = AccelOptions.for_device("cpu")
    assert (cpu.amp, cpu.channels_last, cpu.compile, cpu.cuda_graphs, cpu.max_rows) == (
        choice.sample_amp, choice.sample_channels_last, False, False, choice.sample_max_rows)
    assert train_defaults("cpu") == (choice.train_amp, choice.train_channels_last)
    assert train_defaults("cuda") == ("fp32", True)
    gpu = AccelOptions.for_device("cuda")
    assert gpu.compile and gpu.cuda_graphs and gpu.channels_last and gpu.amp == "bf16"
    assert not AccelOptions.for_device("cuda", compile=False, cuda_graphs=None).compile
    assert AccelOptions.for_device("cuda", cuda_graphs=False).cuda_graphs is False
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        AccelOptions(cuda_graphs=True).check("cpu")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        AccelOptions(amp="fp16").check("cpu")
    with pytest.raises(ConfigError, match="unknown --amp"):
        AccelOptions(amp="fp8").check("cpu")
    assert AccelOptions(amp="bf16", compile=True).describe() == "bf16+compile"
    assert AccelOptions(max_rows=64).describe() == "fp32+rows<=64" and not AccelOptions(max_rows=64).plain
    assert AccelOptions.for_device("cuda").max_rows == 0 and AccelOptions.for_device("cpu", max_rows=0).max_rows == 0
    for bad in (-3, 2.5, True, "64", None):
        with pytest.raises(ConfigError, match="max_rows=.* must be a whole number"):
            AccelOptions(max_rows=bad).check("cpu")
    with pytest.raises(ConfigError, match="max-autotune-no-cudagraphs"):
        AccelOptions(compile=True, cuda_graphs=True, compile_mode="reduce-overhead").check("cuda")
    # a mode torch.compile does not know was its RuntimeError (a traceback); without --compile it was ignored
    with pytest.raises(ConfigError, match="unknown --compile-mode 'bogus'; use one of default, .*max-autotune"):
        AccelOptions(compile=True, compile_mode="bogus").check("cpu")
    with pytest.raises(ConfigError, match="add --compile or drop --compile-mode"):
        AccelOptions(compile_mode="max-autotune").check("cpu")
    assert AccelOptions(compile=True, compile_mode="max-autotune-no-cudagraphs").check("cpu").compile


def test_devices_fastdiff_runs_on():
    from fastdiff.runtime import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto").type in ("cpu", "cuda")
    # mps, xpu and meta passed, and ended in tracebacks (torch's assertions) once a run used them
    for name, message in (("meta", "is not one fastdiff runs on"), ("xpu", "is not one fastdiff runs on"),
                          ("bogus", "unknown device 'bogus'")):
        with pytest.raises(ConfigError, match=message):
            resolve_device(name)


def test_bucket_sizes():
    assert [bucket_size(n) for n in (1, 2, 3, 5, 8, 9, 1000)] == [1, 2, 4, 8, 8, 16, 1024]


@pytest.mark.parametrize("name", ["ddim-eta0.5", "ddpm"])
def test_static_sampler_is_bitwise_the_plain_loop(name):
    model = tiny_unet()
    _, tabs = tables()
    x, seeds, labels = sampling_inputs(4)
    kw = dict(seeds=seeds, labels=labels, guidance=2.0, null_label=10, clip=1.0)
    plain_frames, fast_frames = [], []
    want = run_table(model, x, tabs[name], callback=lambda *a: plain_frames.append(a), **kw)
    fast = FastSampler(model, AccelOptions(), device="cpu", shape=(1, 8, 8), guidance=2.0, null_label=10, clip=1.0)
    got = fast.run(x, tabs[name], seeds=seeds, labels=labels, callback=lambda *a: fast_frames.append(a))
    assert torch.equal(got, want)
    assert len(fast_frames) == len(plain_frames) == len(tabs[name])
    for (i, t, xp, x0), (j, t2, xp2, x02) in zip(fast_frames, plain_frames):
        assert i == j and torch.equal(t, t2) and torch.equal(xp, xp2) and torch.equal(x0, x02)
    # The frames handed out are copies: the static buffers moved on, the frames did not.
    assert not torch.equal(fast_frames[0][2], fast_frames[-1][2])
    assert fast.replays == 0 and fast.setup_s == 0.0


@pytest.mark.parametrize("compiled", [False, True])
def test_padding_to_a_bucket_keeps_each_sample(compiled):
    # Compiled (here with the eager backend: the padding, not Inductor, is under test) batches pad to a bucket;
    # eager they run at their own size, in one set of buffers (a set per size ever seen grew without bound).
    model = tiny_unet()
    _, tabs = tables()
    x, seeds, labels = sampling_inputs(5)
    options = AccelOptions(compile=True, compile_backend="eager") if compiled else AccelOptions()
    fast = FastSampler(model, options, device="cpu", shape=(1, 8, 8), guidance=2.0, null_label=10, clip=1.0)
    first = fast.run(x[:3], tabs["ddpm"], seeds=seeds[:3], labels=labels[:3])
    got = fast.run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    assert sorted(fast._buckets) == ([4, 8] if compiled else [5])
    # A batch that a prepared bucket holds runs in it (a run's last, partial batch): no compile for it.
    fresh = FastSampler(model, options, device="cpu", shape=(1, 8, 8), guidance=2.0, null_label=10, clip=1.0)
    fresh.run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    setup = fresh.setup_s
    last = fresh.run(x[:2], tabs["ddpm"], seeds=seeds[:2], labels=labels[:2])
    assert sorted(fresh._buckets) == ([8] if compiled else [2]) and fresh.setup_s == setup
    want = run_table(model, x, tabs["ddpm"], seeds=seeds, labels=labels, guidance=2.0, null_label=10, clip=1.0)
    # oneDNN picks its convolution algorithm by batch size: equal up to float32 rounding, not bitwise.
    for out in (got, first, last):
        torch.testing.assert_close(out, want[: len(out)], atol=1e-4, rtol=0)


def test_compiled_sampler_compiles_past_dynamos_recompile_limit():
    # one compile per bucket (static shapes), all samplers' steps one code object to Dynamo: past its recompile
    # limit a fullgraph compile is an error, so the sampler compiles under a higher one (here the limit is 2)
    model = tiny_unet()
    _, tabs = tables()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        fast = FastSampler(model, AccelOptions(compile=True, compile_backend="eager"), device="cpu",
                           shape=(1, 8, 8), guidance=2.0, null_label=10, clip=1.0)
        for n in (1, 2, 3):  # buckets 1, 2, 4: three compiles
            x, seeds, labels = sampling_inputs(n)
            assert fast.run(x, tabs["ddpm"], seeds=seeds, labels=labels).shape == (n, 1, 8, 8)
    torch._dynamo.reset()


def test_a_sampler_whose_model_another_sampler_converted_prepares_again():
    # Two samplers on one model in two layouts (the pipeline caches one per setting): each converts the model in
    # place, so the first finds its weights replaced; graphs captured against the old storage would read freed
    # memory, so it converts back and prepares its buckets again (with CUDA graphs: tests below)
    model = tiny_unet()
    _, tabs = tables()
    x, seeds, labels = sampling_inputs(4)
    kw = dict(device="cpu", shape=(1, 8, 8), guidance=2.0, null_label=10, clip=1.0)
    torch._dynamo.reset()
    cl = FastSampler(model, AccelOptions(compile=True, compile_backend="eager", channels_last=True), **kw)
    first = cl.run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    prepared = cl.setup_s
    FastSampler(model, AccelOptions(compile=True, compile_backend="eager"), **kw).run(x, tabs["ddpm"], seeds=seeds,
                                                                                      labels=labels)
    assert not model.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    again = cl.run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    assert model.conv_out.weight.is_contiguous(memory_format=torch.channels_last) and cl.setup_s > prepared
    torch.testing.assert_close(again, first, rtol=0, atol=1e-6)
    # converted back inside run's inference mode, the weights are still ordinary tensors: the model still trains
    assert not any(p.is_inference() for p in model.parameters())
    model(x, torch.zeros(4), labels).sum().backward()
    torch._dynamo.reset()


@pytest.mark.parametrize("max_rows", [1, 3, 8])
def test_chunked_calls_keep_each_sample(max_rows):
    # Guidance makes 5 images 10 rows: the model sees at most max_rows of them per call, and every sample is the
    # plain loop's up to the convolutions' rounding (oneDNN's algorithm depends on the batch size).
    model = tiny_unet()
    _, tabs = tables()
    x, seeds, labels = sampling_inputs(5)
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    fast = FastSampler(model, AccelOptions(max_rows=max_rows), device="cpu", shape=(1, 8, 8), guidance=2.0,
                       null_label=10, clip=1.0)
    got = fast.run(x, tabs["ddim-eta0.5"], seeds=seeds, labels=labels)
    per_step = [max_rows] * (10 // max_rows) + ([10 % max_rows] if 10 % max_rows else [])
    assert rows == per_step * len(tabs["ddim-eta0.5"])
    rows.clear()
    want = run_table(model, x, tabs["ddim-eta0.5"], seeds=seeds, labels=labels, guidance=2.0, null_label=10,
                     clip=1.0)
    assert rows == [10] * len(tabs["ddim-eta0.5"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_channels_last_and_bf16_stay_close():
    model = tiny_unet()
    _, tabs = tables()
    x, seeds, labels = sampling_inputs(4)
    want = run_table(model, x, tabs["ddpm"], seeds=seeds, labels=labels, guidance=2.0, null_label=10, clip=1.0)
    cl = FastSampler(tiny_unet(), AccelOptions(channels_last=True), device="cpu", shape=(1, 8, 8), guidance=2.0,
                     null_label=10, clip=1.0)
    torch.testing.assert_close(cl.run(x, tabs["ddpm"], seeds=seeds, labels=labels), want, atol=1e-4, rtol=0)
    # bf16: the model runs under autocast and hands float32 to guidance and the sampler step, exactly as the
    # plain loop over the autocast model does.
    bf = FastSampler(tiny_unet(), AccelOptions(amp="bf16"), device="cpu", shape=(1, 8, 8), guidance=2.0,
                     null_label=10, clip=1.0)
    got = bf.run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    ref = run_table(autocast_model(tiny_unet(), "cpu", "bf16"), x, tabs["ddpm"], seeds=seeds, labels=labels,
                    guidance=2.0, null_label=10, clip=1.0)
    assert torch.equal(got, ref) and not torch.equal(got, want)


def test_compiled_sampler_has_no_graph_breaks_and_matches():
    model = tiny_unet()
    _, tabs = tables()
    x, seeds, labels = sampling_inputs(4)
    want = run_table(model, x, tabs["ddpm"], seeds=seeds, labels=labels, guidance=2.0, null_label=10, clip=1.0)
    torch._dynamo.reset()
    opts = AccelOptions(compile=True, compile_backend="aot_eager")  # fullgraph: a graph break raises
    fast = FastSampler(model, opts, device="cpu", shape=(1, 8, 8), guidance=2.0, null_label=10, clip=1.0)
    got = fast.run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert fast.setup_s > 0
    torch._dynamo.reset()


def test_sampler_input_errors():
    fast = FastSampler(tiny_unet(), AccelOptions(), device="cpu", shape=(1, 8, 8), null_label=10)
    _, tabs = tables()
    x, seeds, labels = sampling_inputs(4)
    with pytest.raises(ConfigError, match="seeds must have shape"):
        fast.run(x, tabs["ddpm"], seeds=seeds[:2], labels=labels)
    with pytest.raises(ConfigError, match="built for images"):
        fast.run(torch.zeros(4, 1, 16, 16), tabs["ddpm"], seeds=seeds, labels=labels)
    # No labels for a conditional model: unconditional samples (the null label), as the plain loop gives.
    want = run_table(fast_model := tiny_unet(), x, tabs["ddpm"], seeds=seeds)
    got = FastSampler(fast_model, AccelOptions(), device="cpu", shape=(1, 8, 8), null_label=10).run(
        x, tabs["ddpm"], seeds=seeds)
    assert torch.equal(got, want)


def test_graphed_train_step_needs_cuda():
    model = tiny_unet()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        GraphedTrainStep(model.parameters(), opt, lambda gen, x: x.sum(), grad_clip=1.0, seed=0, device="cpu")


def _loss_fn(model):
    schedule = NoiseSchedule("linear", 1000, device=next(model.parameters()).device)

    def loss_fn(gen, x0, labels):
        from fastdiff.train.ddpm import diffusion_loss

        return diffusion_loss(model, schedule, x0, labels, gen, prediction="eps", p_uncond=0.1, null_label=10,
                              device=x0.device, amp="fp32")

    return loss_fn


def test_compiled_train_step_matches_eager():
    batch = (torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 10)
    results = []
    for compile_ in (False, True):
        torch._dynamo.reset()
        model = tiny_unet().train()
        forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compile_ else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step = TrainStep(model.parameters(), opt, _loss_fn(forward), grad_clip=1.0, seed=3, device="cpu",
                         timed_first_call=compile_)
        losses = [float(step(k, *batch)[0].detach()) for k in range(3)]
        results.append((losses, [p.detach().clone() for p in model.parameters()], step.take_setup_seconds()))
    torch._dynamo.reset()
    (l0, p0, s0), (l1, p1, s1) = results
    assert s0 == 0 and s1 > 0
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_loss_scale_overflow_skips_the_step_and_reports_a_finite_norm():
    """fp16's dynamic loss scale overflows now and then by design: the step is skipped and the scale lowered, and
    the gradient norm the step reports (which the NaN guard reads) stays finite. (GradScaler on the CPU stands in
    for the GPU's, which is the same code; fp16 training itself needs CUDA.)"""
    from fastdiff.train.meter import check_finite
    from fastdiff.train.step import adamw

    w = torch.nn.Parameter(torch.ones(4))
    opt = adamw([w], "cpu", lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    def loss_fn(gen, step):  # step 1: gradients of 1e34, times the scale 2^16, overflow float32
        return (w * 1e34).sum() if int(step) == 1 else (w * w).sum()

    step = TrainStep([w], opt, loss_fn, grad_clip=1.0, seed=0, device="cpu", scaler=scaler)
    step(0, torch.tensor(0))
    before = w.detach().clone()
    loss, norm = step(1, torch.tensor(1))
    assert torch.equal(w.detach(), before) and scaler.get_scale() == 2.0**15  # skipped, scale halved
    assert float(norm) == 0.0 and check_finite(float(loss) + float(norm), 0, 2, "") is not None
    _, norm = step(2, torch.tensor(2))
    assert 0 < float(norm) and not torch.equal(w.detach(), before)  # the next step trains
    # overflow step after step: the scale halves below MIN_LOSS_SCALE, and then the norm says so (the guard stops)
    step = TrainStep([w], opt, lambda gen, k: torch.sqrt(w - w.detach()).sum(),  # loss 0, gradient inf
                     grad_clip=1.0, seed=0, device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0))
    norms = [float(step(k, torch.tensor(k))[1]) for k in range(3)]  # scales after each: 1, 0.5, 0.25
    assert norms[0] == 0.0 and not math.isfinite(norms[1]) and not math.isfinite(norms[2])


# ---------------------------------------------------------------- CUDA graphs (run on a GPU machine)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["ddim-eta0.5", "ddpm"])
def test_graphed_sampler_bitwise_equals_ungraphed(amp, name):
    _, tabs = tables("cuda")
    x, seeds, labels = sampling_inputs(8, "cuda")
    kw = dict(device="cuda", shape=(1, 8, 8), guidance=2.0, null_label=10, clip=1.0)
    plain = FastSampler(tiny_unet(device="cuda"), AccelOptions(amp=amp), **kw)
    graphed = FastSampler(tiny_unet(device="cuda"), AccelOptions(amp=amp, cuda_graphs=True), **kw)
    want = plain.run(x, tabs[name], seeds=seeds, labels=labels)
    got = graphed.run(x, tabs[name], seeds=seeds, labels=labels)
    assert graphed.replays == len(tabs[name]) and graphed.setup_s > 0
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item()}"
    if amp == "fp32":  # and the plain run_table loop itself (same kernels, NCHW, fp32)
        ref = run_table(tiny_unet(device="cuda"), x, tabs[name], seeds=seeds, labels=labels, guidance=2.0,
                        null_label=10, clip=1.0)
        assert torch.equal(got, ref), f"max diff {(got - ref).abs().max().item()}"
    # A second run replays the same graph from a fresh table and batch.
    again = graphed.run(x, tabs[name], seeds=seeds, labels=labels)
    assert torch.equal(again, want) and graphed.replays == 2 * len(tabs[name])


@pytest.mark.gpu
def test_two_threads_capture_and_replay_samplers_of_two_models_at_once():
    """Each thread captures fresh graphed samplers of its own model while the other captures, replays, allocates
    and synchronizes: in torch's default capture mode ("global") those calls of the other thread are errors."""
    import threading

    _, tabs = tables("cuda")
    x, seeds, labels = sampling_inputs(8, "cuda")
    kw = dict(device="cuda", shape=(1, 8, 8), guidance=2.0, null_label=10, clip=1.0)
    want = FastSampler(tiny_unet(device="cuda"), AccelOptions(), **kw).run(x, tabs["ddpm"], seeds=seeds,
                                                                         labels=labels)
    models = [tiny_unet(device="cuda"), tiny_unet(device="cuda")]
    start, results, errors = threading.Barrier(2), [[], []], []

    def work(i):
        try:
            start.wait()
            for _ in range(4):
                fast = FastSampler(models[i], AccelOptions(cuda_graphs=True), **kw)
                results[i].append(fast.run(x, tabs["ddpm"], seeds=seeds, labels=labels))
                torch.cuda.synchronize()
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got in results[0] + results[1]:
        assert torch.equal(got, want), f"max diff {(got - want).abs().max().item()}"


@pytest.mark.gpu
def test_graphed_sampler_makes_no_host_syncs():
    _, tabs = tables("cuda")
    x, seeds, labels = sampling_inputs(8, "cuda")
    fast = FastSampler(tiny_unet(device="cuda"), AccelOptions(cuda_graphs=True, channels_last=True, amp="bf16"),
                       device="cuda", shape=(1, 8, 8), guidance=2.0, null_label=10, clip=1.0)
    fast.run(x, tabs["ddpm"], seeds=seeds, labels=labels)  # capture first (capture synchronises once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fast.run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["fp32", "bf16"])  # bf16: the GPU default, the bench's headline rows
def test_compiled_graphed_sampler_bitwise_equals_compiled(amp):
    _, tabs = tables("cuda")
    x, seeds, labels = sampling_inputs(8, "cuda")
    kw = dict(device="cuda", shape=(1, 8, 8), guidance=2.0, null_label=10, clip=1.0)
    torch._dynamo.reset()
    model = tiny_unet(device="cuda")
    compiled = FastSampler(model, AccelOptions(compile=True, channels_last=True, amp=amp), **kw)
    graphed = FastSampler(model, AccelOptions(compile=True, channels_last=True, cuda_graphs=True, amp=amp), **kw)
    want = compiled.run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    got = graphed.run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item()}"
    torch._dynamo.reset()


@pytest.mark.gpu
def test_graphed_sampler_after_another_layout_on_its_model_replays_the_live_weights():
    _, tabs = tables("cuda")
    x, seeds, labels = sampling_inputs(8, "cuda")
    kw = dict(device="cuda", shape=(1, 8, 8), guidance=2.0, null_label=10, clip=1.0)
    model = tiny_unet(device="cuda")
    cl = FastSampler(model, AccelOptions(channels_last=True, cuda_graphs=True), **kw)
    first = cl.run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    FastSampler(model, AccelOptions(cuda_graphs=True), **kw).run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    torch.cuda.empty_cache()  # the old weights' memory goes back to the allocator (a stale graph would read it)
    torch.randn(1 << 20, device="cuda")
    again = cl.run(x, tabs["ddpm"], seeds=seeds, labels=labels)
    assert torch.equal(again, first), f"max diff {(again - first).abs().max().item()}"


def _train(model, step_cls, steps, start=0, opt_state=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    step = step_cls(model.parameters(), opt, _loss_fn(model), grad_clip=1.0, seed=5, device="cuda")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1, torch.arange(8) % 10) for _ in range(steps)]
    losses = []
    for k in range(start, steps):
        loss, _ = step(k, batches[k][0].cuda(), batches[k][1].cuda())
        losses.append(loss.clone())
    return torch.stack(losses), opt


@pytest.mark.gpu
def test_graphed_train_step_follows_the_eager_step_and_resumes():
    eager_model = tiny_unet(device="cuda", dropout=0.1).train()
    eager_losses, _ = _train(eager_model, TrainStep, 4)
    graphed_model = tiny_unet(device="cuda", dropout=0.1).train()
    graphed_losses, _ = _train(graphed_model, GraphedTrainStep, 4)
    # Same random numbers (re-seeded generators read at replay); the LR comes from a float32 device tensor, so
    # the weights agree to rounding rather than bitwise.
    torch.testing.assert_close(graphed_losses, eager_losses, atol=1e-5, rtol=1e-4)
    for a, b in zip(graphed_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # Killed after 2 steps and resumed with a new graph: continues as the uninterrupted graphed run.
    first = tiny_unet(device="cuda", dropout=0.1).train()
    _, opt = _train(first, GraphedTrainStep, 2)
    resumed = tiny_unet(device="cuda", dropout=0.1).train()
    resumed.load_state_dict(first.state_dict())
    resumed_losses, _ = _train(resumed, GraphedTrainStep, 4, start=2, opt_state=opt.state_dict())
    torch.testing.assert_close(resumed_losses, graphed_losses[2:], atol=1e-6, rtol=1e-5)
    for a, b in zip(resumed.parameters(), graphed_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
def test_train_ddpm_fast_path_runs_and_resumes(tmp_path, tiny_overrides):
    """`fastdiff train` defaults on a GPU (compile + graphed step): finite loss, checkpoints, resume."""
    from fastdiff import checkpoint as ckpt
    from fastdiff.config import apply_overrides, preset_config
    from fastdiff.train import train_ddpm

    def cfg(steps):
        over = {**tiny_overrides, "train.steps": steps, "model.dropout": 0.1}
        return apply_overrides(preset_config("digits"), over)

    rec = train_ddpm(cfg(6), tmp_path / "a", device="cuda", progress=False, echo=lambda s: None)
    assert rec["step"] == 6 and math.isfinite(rec["loss"])
    assert "GraphedTrainStep(compiled)" in (tmp_path / "a" / "log.txt").read_text()
    # and with --amp bf16 (the bench's headline training row: bf16 autocast traced by Dynamo, then graphed)
    rec = train_ddpm(apply_overrides(cfg(2), {"train.amp": "bf16"}), tmp_path / "bf16", device="cuda",
                     progress=False, echo=lambda s: None)
    assert rec["step"] == 2 and math.isfinite(rec["loss"])
    assert "GraphedTrainStep(compiled)" in (tmp_path / "bf16" / "log.txt").read_text()
    train_ddpm(cfg(4), tmp_path / "b", device="cuda", progress=False, echo=lambda s: None)
    train_ddpm(cfg(6), tmp_path / "b", device="cuda", resume=True, progress=False, echo=lambda s: None)
    a, b = ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / "a"), "model"), ckpt.load_tensors(
        ckpt.latest_checkpoint(tmp_path / "b"), "model")
    for k in a:  # same random numbers and state; GPU kernels with atomics make it close rather than bitwise
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.gpu
def test_sample_fast_path_matches_plain(tmp_path, tiny_overrides, no_tf32):
    from fastdiff.config import apply_overrides, preset_config
    from fastdiff.sampling import load_run, resolve_settings, sample
    from fastdiff.train import train_ddpm

    cfg = apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": 2})
    train_ddpm(cfg, tmp_path, device="cpu", progress=False, echo=lambda s: None)
    run = load_run(tmp_path, "cuda")
    kw = dict(steps=5, guidance=2.0, batch_size=4)
    plain = sample(run, resolve_settings(run, accel=AccelOptions(), **kw), n=10, labels=torch.arange(10)).images
    opts = AccelOptions.for_device("cuda", amp="fp32", compile=False)
    run = load_run(tmp_path, "cuda")
    res = sample(run, resolve_settings(run, accel=opts, **kw), n=10, labels=torch.arange(10))
    assert res.setup_s > 0 and res.seconds > 0
    torch.testing.assert_close(res.images, plain, atol=1e-4, rtol=0)  # channels_last convolutions: rounding only
