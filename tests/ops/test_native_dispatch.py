"""The native extension through the rest of fastdiff: use_backend("native") and the per-op CPU preference
through fastdiff.ops (the UNet, the samplers), the fastdiff-native provider of `fastdiff bench` and its profile
rows, loading and dispatch errors. Tests that need the extension skip (with the reason) when it is not built."""

import importlib.util
import json
import os
import types
from pathlib import Path

import pytest
import torch

from fastdiff import reference
from fastdiff.bench.e2e import Job, SampleCase, sample_rows
from fastdiff.bench.native import cpu_rows, profile_shares, run_native_benchmarks
from fastdiff.bench.ops import default_cases
from fastdiff.bench.report import add_ratios, table
from fastdiff.bench.suite import Budget, plan, run_job
from fastdiff.diffusion import NoiseSchedule, initial_noise, sample_ddim, seeds_for
from fastdiff.errors import ConfigError
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.nn import GroupNormSiLU
from fastdiff.ops import dispatch, native, use_backend

requires_native = pytest.mark.skipif(not native.available(), reason=f"{native.load_error()} (build it: make ext)")
# The automatic choice sends CPU tensors to Triton in a process that interprets it.
compiled_triton = pytest.mark.skipif(dispatch.triton_interpreting(), reason="CPU tensors go to Triton here")


def _coefs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(n, generator=g) for _ in range(5))

def _spy(monkeypatch, names=("sampler_step", "group_norm_silu")) -> dict:
    """Count the calls of fastdiff.ops.native.<name> (which fastdiff.ops looks up at call time)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*args, _name=name, _fn=getattr(native, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(native, name, counted)
    return calls


def _tiny_unet():
    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(), dropout=0.0, num_groups=4, num_classes=10)
    torch.manual_seed(0)
    return UNet(cfg).eval().requires_grad_(False)


@requires_native
def test_ddim_run_under_backend_native_matches_the_reference(monkeypatch):
    # use_backend("native") reaches the kernels through fastdiff.ops, i.e. through the UNet and the sampler.
    model, schedule = _tiny_unet(), NoiseSchedule("linear", 1000)
    seeds = seeds_for(0, 2)
    x = initial_noise(seeds, (1, 8, 8))
    labels = torch.tensor([1, 9])
    calls = _spy(monkeypatch)
    runs = {}
    for backend in ("torch", "native"):
        with use_backend(backend), torch.no_grad():
            runs[backend] = sample_ddim(model, x, schedule, steps=3, eta=1.0, seeds=seeds, labels=labels,
                                        guidance=2.0, null_label=10, clip=1.0)
    # Under native: one sampler step per step, every GroupNormSiLU once per (guided, batched) forward.
    group_norms = sum(isinstance(m, GroupNormSiLU) for m in model.modules())
    assert calls == {"sampler_step": 3, "group_norm_silu": 3 * group_norms} and group_norms > 0
    torch.testing.assert_close(runs["native"], runs["torch"], atol=1e-4, rtol=1e-4)


# --- fastdiff bench: the fastdiff-native provider ----------------------------------------------------------


def test_bench_native_provider_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(native, "unavailable_reason", lambda device: "the extension fastdiff._C is not built")
    cpu = torch.device("cpu")
    jobs = [j for j in plan(cpu, quick=True, presets=("mnist5k",), providers=["fastdiff-native"]) if j.section != "ops"]
    assert [j.section for j in jobs] == ["sample"]
    rows = list(run_job(jobs[0], cpu, quick=True, rounds=1, budget=Budget(60.0)))
    assert rows and all(r["status"] == "skipped: the extension fastdiff._C is not built" for r in rows)
    case = default_cases(cpu, quick=True, ops=("sampler_step",))[0]()
    assert "fastdiff-native" not in case.providers
    assert case.skipped == {"fastdiff-native": "skipped: the extension fastdiff._C is not built"}


@requires_native
def test_bench_native_provider_rows():
    cpu = torch.device("cpu")
    case = default_cases(cpu, quick=True, ops=("sampler_step",))[0]()
    assert case.skipped == {}
    torch.testing.assert_close(case.providers["fastdiff-native"](), case.providers["torch-eager"]())
    job = Job("sample", "digits", 2, (("fastdiff-native", "fp32"),), (SampleCase("ddim", 4, 1),))
    row = next(sample_rows(job, cpu, rounds=1, warmup=0))
    assert row["status"] == "ok" and row["images_per_s"] > 0 and row["options"].endswith("+native-ops")


# --- loading and dispatch ----------------------------------------------------------------------------------


def test_unbuilt_extension_is_reported(monkeypatch):
    monkeypatch.setattr(native.importlib.util, "find_spec", lambda name: None)
    assert native._probe() == (None, "the extension fastdiff._C is not built")


@pytest.mark.parametrize("record, says", [(None, "is missing"), ("[1]", "holds a JSON list, not an object"),
                                           ("{", "is not valid JSON")])
def test_unreadable_build_record_is_reported(monkeypatch, tmp_path, record, says):
    built_here(monkeypatch, tmp_path)
    path = tmp_path / "_C.json"
    if record is not None:
        path.write_text(record)
    info, error = native._probe()
    assert info is None and error.startswith("fastdiff._C has no readable build record") and says in error
    assert error.endswith("; rebuild it")


def built_here(monkeypatch, folder, library=None):
    """As if fastdiff._C were the library `library` (default: a name in `folder`, no file) with its record
    beside it: the loader reads the record of the library it finds, not one of its own tree."""
    origin = str(library or folder / "_C.abi3.so")
    monkeypatch.setattr(native.importlib.util, "find_spec", lambda name: types.SimpleNamespace(origin=origin))


def test_extension_built_for_another_torch_is_refused(monkeypatch, tmp_path):
    built_here(monkeypatch, tmp_path)
    (tmp_path / "_C.json").write_text('{"torch_version": "0.0.1", "with_cuda": false}')
    info, error = native._probe()
    assert info is None and "built against torch 0.0.1" in error and "rebuild" in error


@requires_native
def test_a_library_unsafe_to_load_or_run_here_is_refused_before_it_loads(monkeypatch, tmp_path):
    """A cut library killed `import fastdiff` with SIGBUS inside dlopen; one built from older kernel sources was
    taken (their bugs back); one compiled with -march=native for instructions this CPU lacks would die of SIGILL
    at its first kernel. Each is now refused, read from the file, and the torch ops run."""
    import shutil

    real = Path(importlib.util.find_spec("fastdiff._C").origin)
    tree = tmp_path / "tree"
    (tree / "fastdiff").mkdir(parents=True)
    lib = tree / "fastdiff" / real.name
    shutil.copy(real, lib)
    (tree / "fastdiff" / "_C.json").write_text(json.dumps({"torch_version": torch.__version__, "with_cuda": False}))
    assert native._library_problem(lib) is None
    needs = lib.read_bytes().split(native.ISA_MARK, 1)[1].split(b";", 1)[0].decode().split()
    assert "avx2" in needs or not {"avx2"} & native.hardware_flags()  # -march=native names this CPU's sets
    # another CPU: one without the library's instruction sets
    monkeypatch.setattr(native, "hardware_flags", lambda: frozenset({"sse2", "ssse3"}))
    assert "was compiled for instructions this CPU lacks (" in native._library_problem(lib)
    monkeypatch.undo()
    # kernel sources changed after the build (a git pull without make ext)
    (tree / "kernels" / "cpu").mkdir(parents=True)
    source = tree / "kernels" / "cpu" / "group_norm_silu.cpp"
    source.write_text("// newer")
    os.utime(source, (lib.stat().st_mtime + 10,) * 2)
    assert native._library_problem(lib) == ("is older than its kernel sources (kernels/cpu/group_norm_silu.cpp "
                                            "changed since)")
    os.utime(source, (lib.stat().st_mtime - 10,) * 2)
    (tree / "kernels" / "tests").mkdir()
    (tree / "kernels" / "tests" / "check.cpp").write_text("// not in the library")
    assert native._library_problem(lib) is None
    # cut short, or no library at all
    data = lib.read_bytes()
    for cut in (1000, len(data) // 2):
        lib.write_bytes(data[:cut])
        assert native._library_problem(lib).startswith(f"is cut short ({cut} of its ")
    lib.write_bytes(b"#!/bin/sh\n")
    assert native._library_problem(lib) == "is no 64-bit ELF library"
    # and _probe refuses it before dlopen, naming the library
    built_here(monkeypatch, tree / "fastdiff", lib)
    info, error = native._probe()
    assert info is None and error == f"fastdiff._C ({lib}) is no 64-bit ELF library; rebuild it"


def test_a_library_without_this_fastdiffs_ops_is_refused(monkeypatch, tmp_path):
    """A library that loads but registers another version's ops made `import fastdiff` raise a RuntimeError."""
    built_here(monkeypatch, tmp_path)
    (tmp_path / "_C.json").write_text(json.dumps({"torch_version": torch.__version__, "with_cuda": False}))
    monkeypatch.setattr(native, "_library_problem", lambda library: None)
    monkeypatch.setattr(native.importlib, "import_module", lambda name: None)

    def missing():
        raise RuntimeError("operator fastdiff_native::sampler_step does not exist")

    monkeypatch.setattr(native, "_register_fakes", missing)
    assert native._probe() == (None, "fastdiff._C lacks an op of this fastdiff (operator fastdiff_native::sampler_step "
                                     "does not exist); rebuild it")


def test_forced_native_without_extension_names_the_build(monkeypatch):
    monkeypatch.setattr(dispatch, "native_available", lambda: False)
    build = "FASTDIFF_BUILD_EXT=1 pip install --no-build-isolation -e ."
    with use_backend("native"), pytest.raises(ConfigError, match=build):
        dispatch.backend_for(torch.zeros(1), dispatch.REGISTRY["group_norm_silu"])


@requires_native
@compiled_triton
def test_dispatch_picks_native():
    ops = dispatch.REGISTRY
    with use_backend("native"):
        assert dispatch.backend_for(torch.zeros(1), ops["group_norm_silu"]) == "native"
        assert dispatch.backend_for(torch.zeros(1), ops["timestep_embedding"]) == "torch"  # it has no native kernel
    # Chosen automatically for CPU tensors wherever the extension is built (every CPU measured prefers them),
    # for the ops that have a native kernel.
    assert dispatch.CPU_NATIVE == dispatch.native_available()
    for preferred in (True, False):
        with use_backend(None), pytest.MonkeyPatch.context() as mp:
            mp.setattr(dispatch, "CPU_NATIVE", preferred)
            picked = {op: dispatch.backend_for(torch.zeros(1), ops[op])
                      for op in ("sampler_step", "group_norm_silu", "timestep_embedding")}
        native = "native" if preferred else "torch"
        assert picked == {"sampler_step": native, "group_norm_silu": native, "timestep_embedding": "torch"}


def test_profile_shares_split_the_time_by_op_group():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 16, 16)

    def fn():
        with torch.no_grad():
            return reference.group_norm_silu(conv(x), 2) @ torch.randn(16, 16)

    shares = profile_shares(fn)
    assert shares["profiled_ms"] > 0 and sum(v for k, v in shares.items() if k.startswith("share_")) == pytest.approx(1)
    for group in ("convolution", "group_norm_silu", "matmul_attention"):
        assert shares[f"share_{group}"] > 0, group
    assert shares["share_sampler_step"] == 0
    row = {"preset": "digits", "kind": "profile", "op": "unet forward", "provider": "torch-eager", **shares}
    assert "share_convolution" in table([row])


@requires_native
def test_native_cpu_benchmark_quick():
    rows = run_native_benchmarks("cpu", quick=True)
    e2e = [(r["provider"], r["layout"]) for r in rows if r["kind"] == "e2e"]
    assert sorted(e2e) == sorted((p, layout) for p in ("torch-eager", "fastdiff-native")
                                 for layout in ("nchw", "channels_last"))
    eager = next(r for r in rows if r["kind"] == "e2e" and r["provider"] == "torch-eager" and r["layout"] == "nchw")
    add_ratios(rows)
    assert eager["vs_torch_eager"] == 1.0 and eager["images_per_s"] > 0
    assert {r["provider"] for r in rows if r["kind"] == "profile"} == {"torch-eager", "fastdiff-native"}
    text = table(rows)
    assert "channels_last" in text and "share_convolution" in text and "sampler_step" in text
    with pytest.raises(ConfigError, match="layouts must include nchw"):
        cpu_rows("digits", layouts=("channels_last",))
