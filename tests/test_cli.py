"""The command line end to end at tiny settings, and one clear line (exit status 2) for each bad input."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fastdiff.cli import main
from fastdiff.runtime import glibc_version

TINY = ["--steps", "4", "--batch-size", "16", "--log-every", "2", "--ckpt-every", "2", "--no-progress"]


FP32 = ["--amp", "fp32", "--no-channels-last", "--max-rows", "0"]  # the plain fp32 path, whatever the CPU's defaults


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--preset", "digits", "--out", str(run_dir), *TINY]) == 0
    return run_dir


def test_train_writes_a_run(trained):
    assert (trained / "config.json").exists() and (trained / "stats.jsonl").exists()
    assert (trained / "checkpoints" / "step-000000004" / "ema.safetensors").exists()


def test_dry_run_prints_resolved_config(capsys, tmp_path):
    code, out, _ = run(["train", "--preset", "mnist", "--out", str(tmp_path), "--lr", "1e-3", "--dry-run"], capsys)
    cfg = json.loads(out)
    assert code == 0 and cfg["train"]["lr"] == 1e-3 and cfg["data"]["dataset"] == "mnist"
    assert not (tmp_path / "config.json").exists()


def test_sample_grid_npz_trajectory(trained, tmp_path, capsys):
    out_png = tmp_path / "s.png"
    code, out, _ = run(["sample", "--checkpoint", str(trained), "--n", "12", "--steps", "3", "--labels", "3", "7",
                        "--guidance", "2", "--out", str(out_png), "--trajectory", "--seed", "5", *FP32], capsys)
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert out_png.exists() and (tmp_path / "s_trajectory.png").exists()
    data = np.load(result["samples"])
    assert data["images"].shape == (12, 8, 8, 1) and data["labels"].tolist()[:4] == [3, 7, 3, 7]
    assert data["seeds"].tolist()[:2] == [5, 6]
    # Sample k depends only on its own seed and label: the first 4 again, alone, in a smaller batch.
    out2 = tmp_path / "again.png"
    assert main(["sample", "--checkpoint", str(trained), "--n", "4", "--steps", "3", "--labels", "3", "7",
                 "--guidance", "2", "--out", str(out2), "--seed", "5", "--batch-size", "3", *FP32]) == 0
    # At fp32 (the bf16 default of an AMX CPU rounds every step to bf16, so samples then depend on the batch size at
    # bf16 rounding, as on a GPU), equal up to float32 rounding: oneDNN picks its convolution algorithm by batch
    # size, so results move in the last bits (~1e-5 here), while another seed moves them by O(1).
    np.testing.assert_allclose(np.load(tmp_path / "again.npz")["samples"], data["samples"][:4], atol=1e-4)


def test_sample_ddpm(trained, tmp_path, capsys):
    code, out, _ = run(["sample", "--checkpoint", str(trained), "--n", "2", "--sampler", "ddpm", "--steps", "5",
                        "--out", str(tmp_path / "d.png")], capsys)
    assert code == 0 and json.loads(out)["sampler"] == "ddpm"


def test_sample_checks_every_output_before_sampling(trained, tmp_path, capsys):
    # Each output path that cannot be written is one error before the sampling: no grid or .npz is left (or
    # replaced) by a run that then fails, and a refused run leaves no folders it created.
    common = ["sample", "--checkpoint", str(trained), "--n", "2", "--steps", "2"]
    (tmp_path / "g.npz").mkdir()
    (tmp_path / "imgs").write_text("a file")
    (tmp_path / "k_trajectory.png").mkdir()
    for extra, message in ((["--out", str(tmp_path / "g.png")], r"raw samples \(beside --out\) .*g.npz is a folder"),
                           (["--out", str(tmp_path / "h.png"), "--save-images", str(tmp_path / "imgs")],
                            "--save-images .*imgs is a file, not a folder"),
                           (["--out", str(tmp_path / "h.png"), "--save-images", str(tmp_path / "h.npz")],
                            "--save-images .*h.npz is also the raw samples \\(beside --out\\)'s file"),
                           (["--out", str(tmp_path / "k.png"), "--trajectory"], "the trajectory figure .* is a folder"),
                           (["--out", str(tmp_path / "shots" / "grid.png"), "--save-images", str(tmp_path / "shots")],
                            "--save-images .*shots would hold --out .*grid.png among the samples"),
                           (["--out", str(tmp_path / ".png")], "must be a .png file name, e.g. grid.png")):
        code, _, err = run([*common, *extra], capsys)
        assert code == 2 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npz", "imgs", "k_trajectory.png"]
    code, _, err = run([*common, "--out", str(tmp_path / "new" / "deep" / "x.png"), "--labels", "99"], capsys)
    assert code == 2 and "outside 0..9" in err and not (tmp_path / "new").exists()


def test_a_refiner_is_checked_before_any_sampling(trained, tmp_path, capsys, monkeypatch):
    # A refiner for other images (MNIST's 28x28 on 8x8 digits ran silently) or none at all: one error before
    # the sampling, and before eval trains its classifier.
    from fastdiff import evaluate

    out = str(tmp_path / "g.png")
    code, _, err = run(["sample", "--checkpoint", str(trained), "--n", "2", "--steps", "2", "--out", out,
                        "--refine", "pretrained:mnist-student-refiner"], capsys)
    assert code == 2 and "refines images [1, 28, 28], not" in err and not list(tmp_path.iterdir())
    monkeypatch.setattr(evaluate, "train_classifier", lambda *a, **k: pytest.fail("trained a classifier"))
    code, _, err = run(["eval", "--checkpoint", str(trained), "--n", "8", "--steps", "2", "--refine",
                        str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err


def test_sample_save_images(trained, tmp_path, capsys):
    from PIL import Image

    common = ["sample", "--checkpoint", str(trained), "--steps", "2", "--labels", "4"]
    code, out, _ = run([*common, "--n", "3", "--seed", "41", "--out", str(tmp_path / "g.png"), "--save-images",
                        str(tmp_path / "each")], capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["images"] == str(tmp_path / "each")
    names = ["seed000041-label4.png", "seed000042-label4.png", "seed000043-label4.png"]
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [".fastdiff-samples.json", *names]
    images = np.load(result["samples"])["images"]  # the same uint8 conversion as the .npz archive
    for name, want in zip(names, images):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "each" / name))[..., None], want)
    # another sampling (here more steps) into the folder would mix with it: refused, before sampling
    (tmp_path / "each" / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in (tmp_path / "each").iterdir()}
    code, _, err = run([*common, "--n", "2", "--seed", "44", "--steps", "3", "--out", str(tmp_path / "g2.png"),
                        "--save-images", str(tmp_path / "each")], capsys)
    assert code == 2 and "holds the samples of another sampling (steps 2 there, 3 now)" in err, err
    assert "Traceback" not in err and not (tmp_path / "g2.png").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "each").iterdir()} == before
    # a shard of the same sampling (other seeds, the same weights read from the checkpoint folder), and the same
    # seeds again, go into it
    from fastdiff import checkpoint as ckpt

    code, _, err = run(["sample", "--checkpoint", str(ckpt.latest_checkpoint(trained)), "--steps", "2", "--labels",
                        "4", "--n", "2", "--seed", "44", "--out", str(tmp_path / "g3.png"), "--save-images",
                        str(tmp_path / "each")], capsys)
    assert code == 0, err
    assert code == 0 and run([*common, "--n", "3", "--seed", "41", "--out", str(tmp_path / "g4.png"),
                              "--save-images", str(tmp_path / "each")], capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "each").iterdir() if p.suffix == ".png") == [
        *names, "seed000044-label4.png", "seed000045-label4.png"]
    # sample images of unknown origin (no manifest) that this run would not replace: refused
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "seed000001.png").write_bytes(b"")
    code, _, err = run([*common, "--n", "1", "--seed", "7", "--out", str(tmp_path / "g5.png"), "--save-images",
                        str(tmp_path / "theirs")], capsys)
    assert code == 2 and "1 sample image(s) of an unknown sampling that this run would not replace (e.g. " \
                         "seed000001.png)" in err, err


def test_eval_prints_json_last(trained, capsys):
    code, out, err = run(["eval", "--checkpoint", str(trained), "--n", "40", "--steps", "2", "--classifier-steps",
                          "20"], capsys)
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert {"fd_cls", "fd_cls_floor", "fd_ratio", "cond_accuracy", "classifier_test_accuracy"} <= set(result)
    assert result["fd_cls"] >= 0 and 0 <= result["cond_accuracy"] <= 1
    assert "FD_cls" in out and "floor" in out
    assert {"kid", "kid_std", "kid_floor", "kid_floor_std", "precision", "recall", "precision_floor",
            "recall_floor"} <= set(result) and "KID" in out and "precision" in out
    assert result["kid_std"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall_floor"] <= 1
    # 40 images in 64 feature dimensions: singular covariances, said (and not at 1500, below)
    assert "--n 40 is not above the classifier's 64 feature dimensions" in err, err


def test_resume_extends_and_guards_flags(trained, capsys):
    code, _, err = run(["train", "--out", str(trained), "--resume", "--seed", "1"], capsys)
    assert code == 2 and "--seed cannot change on --resume" in err  # (--lr may: tests/test_loop.py)
    assert main(["train", "--out", str(trained), "--resume", "--steps", "6", "--no-progress"]) == 0
    assert (trained / "checkpoints" / "step-000000006").exists()


def test_resume_checks_flags_against_the_runs_own_values(trained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    same = ["--seed", str(saved["train"]["seed"]), "--batch-size", str(saved["train"]["batch_size"])]
    code, out, _ = run(["train", "--out", str(run_dir), "--resume", *same, "--dry-run"], capsys)
    assert code == 0 and json.loads(out) == saved  # repeating the run's own values changes nothing
    # RUN/config.json lost: the newest checkpoint's config is the run's, and the same flags are refused
    (run_dir / "config.json").unlink()
    code, _, err = run(["train", "--out", str(run_dir), "--resume", "--prediction", "x0", "--dry-run"], capsys)
    assert code == 2 and "--prediction cannot change on --resume" in err
    code, out, _ = run(["train", "--out", str(run_dir), "--resume", "--steps", "9", "--dry-run"], capsys)
    assert code == 0 and json.loads(out)["diffusion"] == saved["diffusion"] and json.loads(out)["train"]["steps"] == 9


def test_resume_errors_name_flags_that_exist(capsys):
    # The resumable flags' list names each by its flag (--warmup, whose dest is warmup_steps), as --help does.
    from fastdiff.cli.args import flag_name
    from fastdiff.cli.training import DISTILL_FLAGS, REFINER_FLAGS, TRAIN_FLAGS

    for command, dests in (("train", TRAIN_FLAGS), ("distill", DISTILL_FLAGS), ("train-refiner", REFINER_FLAGS)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        options = set(re.findall(r"--[a-z0-9-]+", capsys.readouterr().out))
        assert {flag_name(d) for d in dests} <= options, (command, {flag_name(d) for d in dests} - options)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "imagenet-xl", "--out", "{tmp}/r"], "unknown preset 'imagenet-xl'"),
        (["train", "--dataset", "imagenet", "--out", "{tmp}/r", *TINY], "data.dataset 'imagenet' is not one of digits"),
        (["train", "--dataset", "mnist", "--data-dir", "{tmp}/corrupt", "--out", "{tmp}/r", *TINY],
         "not an IDX file"),
        (["sample", "--checkpoint", "{tmp}/missing", "--out", "{tmp}/x.png"], "does not exist"),
        (["sample", "--checkpoint", "{tmp}", "--out", "{tmp}/x.png"], "is neither a fastdiff run directory"),
        (["eval", "--checkpoint", "{tmp}/missing"], "does not exist"),
        (["train", "--out", "{tmp}/blocker/run", *TINY], "cannot write to the run directory"),
        (["sample", "--checkpoint", "{run}", "--out", "{tmp}/blocker/x.png", "--n", "1", "--steps", "1"],
         "blocker is not a writable folder"),
        (["sample", "--checkpoint", "{run}", "--out", "{tmp}/x.jpg"], "must be a .png"),
        (["sample", "--checkpoint", "{run}", "--out", "{tmp}/x.png", "--labels", "12"], "outside 0..9"),
        (["train", "--image-size", "10", "--out", "{tmp}/r", *TINY], "not divisible"),
        (["train", "--amp", "fp16", "--device", "cpu", "--out", "{tmp}/r", *TINY], "needs a CUDA device"),
    ],
)
def test_bad_inputs_give_one_clear_line(args, message, tmp_path, trained, capsys):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    corrupt = tmp_path / "corrupt" / "mnist"
    corrupt.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (corrupt / name).write_bytes(b"\x01\x02\x03\x04garbage")
    args = [a.format(tmp=tmp_path, run=trained) for a in args]
    code, _, err = run(args, capsys)
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "fastdiff.cli", "env"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["torch"] and "native_extension" in info


def test_env_prints_each_cpu_default_on_a_line_of_its_own(capsys):
    code, out, _ = run(["env"], capsys)
    info = json.loads(out.strip().splitlines()[-1])
    if info["device"] != "cpu":
        pytest.skip("cpu_defaults are reported on the CPU")
    lines = [line.strip() for line in out.splitlines()[:-1]]
    assert code == 0 and "cpu_defaults:" in lines
    for key, value in info["cpu_defaults"].items():
        assert f"{key}: {value}" in lines, (key, out)
    assert f"cpu_features: {', '.join(info['cpu_features'])}".strip() in lines


def test_env_names_the_cpu_ops_in_effect(monkeypatch):
    # `fastdiff env` says which op backend CPU tensors run: the automatic choice, or the forced one.
    from fastdiff.envinfo import collect
    from fastdiff.ops import dispatch, use_backend

    if collect()["device"] != "cpu":
        pytest.skip("cpu_ops is reported on the CPU")
    monkeypatch.setattr(dispatch, "CPU_NATIVE", True)
    assert collect()["cpu_ops"] == ("native (fastdiff._C)" if not dispatch.triton_interpreting() else "triton")
    monkeypatch.setattr(dispatch, "CPU_NATIVE", False)
    with use_backend("torch"):
        assert collect()["cpu_ops"] == "torch (forced by FASTDIFF_BACKEND)"


def test_env_says_why_the_extension_does_not_run(monkeypatch):
    # built against another torch (a torch upgrade): env names the reason and the fix, not "not built"
    from fastdiff.envinfo import collect
    from fastdiff.ops import native

    why = "fastdiff._C was built against torch 2.0.0 but torch 9.9.9 is running; rebuild it"
    monkeypatch.setattr(native, "_STATE", (None, why))
    assert collect()["native_extension"] == f"unavailable (optional): {why} (make ext, see README)"
    monkeypatch.setattr(native, "_STATE", ({"with_cuda": False}, None))
    assert collect()["native_extension"] == "built (fastdiff._C, CPU kernels)"


FAULTS = """
import resource, sys, torch
torch.set_num_threads(1)  # OpenMP's threads, made at the first fill, moved the heap: keep then faulted 25k
from fastdiff import runtime
if sys.argv[1] == "keep":
    assert runtime.keep_freed_memory(), "glibc refused the setting"
faults = 0
for mib in range(16, 25):  # each larger than the last: glibc's own rules map every one afresh
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(mib * 2**18)  # float32, every page touched
    del x
    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(faults)
"""


def test_keep_freed_memory_reuses_freed_pages():
    # keep: the freed blocks stay in the heap, so the next, larger one faults in only its growth; glibc's rules
    # unmap each and fault all of the next one in again (180 MiB in all against 24). Measured on a 2-core Zen 4:
    # default 46,125 faults; keep 10,228-12,021 in 20 processes of one thread, but 10k or 25k, by chance, with
    # torch's threads (whose creation moves the heap); sizes of 4-14 MiB had left keep within a few hundred of
    # half of default's 13,877, which a loaded machine crossed.
    if not glibc_version():
        pytest.skip("mallopt is glibc's")
    # the fewest of three processes each: a loaded machine once added 4,500 faults to one "keep" process in CI
    faults = {s: min(int(subprocess.run([sys.executable, "-c", FAULTS, s], capture_output=True, text=True,
                                        check=True).stdout) for _ in range(3)) for s in ("keep", "default")}
    assert faults["keep"] < faults["default"] / 2, faults


@pytest.mark.parametrize("env, says", [({}, "keep freed memory"), ({"FASTDIFF_MALLOC": "default"}, "glibc default"),
                                       ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "MALLOC_TRIM_THRESHOLD_")])
def test_every_command_sets_malloc_and_env_says_how(env, says):
    import os

    if not glibc_version():
        pytest.skip("mallopt is glibc's")
    out = subprocess.run([sys.executable, "-m", "fastdiff.cli", "env"], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k not in ("FASTDIFF_MALLOC",
                              "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")} | env)
    assert says in json.loads(out.stdout.strip().splitlines()[-1])["malloc"]


@pytest.mark.parametrize("command", [["env"], ["train", "--preset", "digits", "--steps", "1", "--out", "run"]])
def test_a_bad_backend_setting_is_one_line_before_the_command(command, tmp_path):
    """It used to surface at the first op call (a training run's first step, its folder made) or, in env, as a
    report line under exit 0."""
    import os

    out = subprocess.run([sys.executable, "-m", "fastdiff.cli", *command], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env={**os.environ, "FASTDIFF_BACKEND": "cuda-magic"})
    assert out.returncode == 2 and out.stdout == "" and not (tmp_path / "run").exists(), out.stderr
    assert out.stderr.strip().splitlines() == [f"fastdiff {command[0]}: error: FASTDIFF_BACKEND='cuda-magic' is not "
                                               "a backend; use one of torch, triton, native or auto"]


def test_a_bad_malloc_setting_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("FASTDIFF_MALLOC", "jemalloc")
    code, _, err = run(["env"], capsys)
    assert code == 2 and "FASTDIFF_MALLOC='jemalloc'" in err and "keep" in err and "default" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("env, says", [({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
                                       ({"WORLD_SIZE": "2"}, "RANK is not set"),
                                       ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 is outside 0..1"),
                                       ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be 1 or more")])
def test_a_bad_torchrun_environment_is_one_line(env, says, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, _, err = run(["train", "--preset", "digits", "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert code == 2 and says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_flag_the_command_lacks_is_the_commands_error(capsys):
    """It was the top-level parser's ("fastdiff: error: ... (see fastdiff --help)"), whose help lists no flags."""
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", "x", "--labels", "3"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("fastdiff eval: error: unrecognized arguments: --labels 3 (see fastdiff eval "
                                       "--help)\n")


def test_sample_removes_the_temporary_files_a_killed_sampling_left(trained, tmp_path, capsys):
    """kill -9 of `fastdiff sample` while it wrote left .s.npz.PID.tmp (as large as the samples) for good. The next
    sampling into those names removes them; other files, and a running process's, stay."""
    import os

    dead = 2**22 + 11  # above Linux's largest pid: no such process
    (tmp_path / "each").mkdir()
    stale = [tmp_path / f".s.png.{dead}.tmp", tmp_path / f".s.npz.{dead}.tmp",
             tmp_path / f".s_trajectory.png.{dead}.tmp", tmp_path / "each" / f".seed000001.png.{dead}.tmp",
             tmp_path / "each" / f".seed000002-label3.png.{dead}.tmp"]
    stay = [tmp_path / f".other.png.{dead}.tmp", tmp_path / f".s.npz.{os.getppid()}.tmp",
            tmp_path / "each" / f".notes.txt.{dead}.tmp"]
    for p in (*stale, *stay):
        p.write_bytes(b"x")
    code, _, err = run(["sample", "--checkpoint", str(trained), "--n", "2", "--steps", "2", "--trajectory",
                        "--out", str(tmp_path / "s.png"), "--save-images", str(tmp_path / "each")], capsys)
    assert code == 0, err
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in stay)


def test_samples_overflowed_by_guidance_name_it(trained, tmp_path, capsys, monkeypatch):
    """They blamed the weights alone ("damaged or diverged"). The non-finite samples are made here: whether a huge
    guidance gives NaN (inf times an exactly equal conditional and unconditional output) or clips its infinities
    to +-1 depends on the weights and the precision (it varied with the module's earlier resume on an AMX CPU)."""
    import torch

    import fastdiff.sampling as sampling

    monkeypatch.setattr(sampling, "run_table", lambda model, x, *a, **k: torch.full_like(x, float("nan")))
    code, _, err = run(["sample", "--checkpoint", str(trained), "--n", "2", "--steps", "2", "--guidance", "1e300",
                        "--amp", "fp32", "--no-channels-last", "--max-rows", "0", "--out", str(tmp_path / "g.png")],
                       capsys)
    assert code == 2 and "guidance 1e+300 amplified its output past the float range (lower --guidance)" in err, err
    assert not (tmp_path / "g.png").exists()


def test_eval_says_when_the_floor_has_fewer_images_than_n(trained, capsys):
    """The floor quietly took min(n, the training images): a smaller sample than FD_cls's, whose bias is larger."""
    code, _, err = run(["eval", "--checkpoint", str(trained), "--n", "1500", "--steps", "1", "--classifier-steps",
                        "20"], capsys)
    assert code == 0 and "the real-vs-real floors use all 1437 training images, fewer than --n 1500" in err, err
    assert "feature dimensions" not in err


def test_a_stop_that_an_import_wrapped_is_still_a_stop(monkeypatch, capsys):
    """SIGTERM inside matplotlib's first import (at a run's first stats.png) came out as "ImportError:
    initialization failed", a traceback and exit 1 (CI, test_sigterm_stops_training_as_ctrl_c_does)."""
    import fastdiff.cli as cli
    from fastdiff.errors import Terminated

    def wrapped(args):
        try:
            raise Terminated()
        except Terminated as stop:
            raise ImportError("initialization failed") from stop

    monkeypatch.setitem(cli.COMMANDS, "env", wrapped)
    assert main(["env"]) == 143 and capsys.readouterr().err == "fastdiff env: terminated\n"
    monkeypatch.setitem(cli.COMMANDS, "env", lambda args: (_ for _ in ()).throw(ImportError("a bug")))
    with pytest.raises(ImportError, match="a bug"):  # any other error keeps its traceback
        main(["env"])
