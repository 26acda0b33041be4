"""Property-based fuzzing of the CLI's argument space and of every file reader a run directory feeds.

Whatever the arguments or the bytes in a file, fastdiff either succeeds or exits non-zero with exactly one
`error:` line on stderr (the last one) and no traceback, and an error never changes the run directory.
The run directory is built without training: a tiny random UNet written as a checkpoint.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdiff import checkpoint as ckpt
from fastdiff import state_dicts
from fastdiff.cli import main
from fastdiff.config import apply_overrides, load_config, preset_config
from fastdiff.errors import FastdiffError
from fastdiff.models import UNet

# FASTDIFF_FUZZ_EXAMPLES=2000 for a long local hunt; CI runs 25 per test (about 10 s each on an idle 2-core CPU).
# The per-example deadline catches a hang, not slowness: the CI machines are shared.
FUZZ = settings(max_examples=int(os.environ.get("FASTDIFF_FUZZ_EXAMPLES", 25)), deadline=timedelta(seconds=60),
                database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def write_run(run_dir: Path) -> Path:
    """A digits run at step 2 with random weights, in the layout `fastdiff train` writes."""
    torch.manual_seed(0)
    cfg = apply_overrides(preset_config("digits"), {"model.base_channels": 8, "model.num_groups": 4,
                                                    "train.steps": 4, "train.ckpt_every": 2})
    model = UNet(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    opt_tensors, opt_meta = state_dicts.optimizer_tensors(opt)
    state = {"step": 2, "images_seen": 32, "optimizer": opt_meta, "lr_scheduler": sched.state_dict(),
             "grad_scaler": None, "kind": "ddpm"}
    run_dir.mkdir(parents=True)
    ckpt.write_json_atomic(run_dir / "config.json", cfg.to_dict())
    (run_dir / "log.txt").write_text("")
    (run_dir / "stats.jsonl").write_text("")
    return ckpt.save_checkpoint(run_dir, 2, tensors={"model": model.state_dict(), "ema": model.state_dict(),
                                                     "optimizer": opt_tensors}, state=state, config=cfg.to_dict())


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    write_run(run_dir)
    return run_dir


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


def assert_clean_outcome(code, err: str, args) -> None:
    assert "Traceback" not in err, (args, err)
    if code != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        errors = [line for line in lines if "error:" in line]
        assert len(errors) == 1 and lines[-1] == errors[0], (args, err)


# --- the argument space -------------------------------------------------------------------------------------------

JUNK = st.one_of(
    st.sampled_from(["0", "-1", "1", "2", "nan", "inf", "-inf", "1e309", "abc", "", "99999999999999999999", "1.5",
                     "-0", "0x10", "1e-400", "3.", " 2", "--n"]),
    st.integers(-5, 5).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)
SMALL = st.one_of(st.integers(-3, 6).map(str), JUNK)  # counts whose valid values must stay cheap

SAMPLE_FLAGS = {"--n": SMALL, "--steps": SMALL, "--eta": JUNK, "--guidance": JUNK, "--seed": JUNK,
                "--batch-size": SMALL, "--sampler": st.sampled_from(["ddim", "ddpm", "student", "euler", ""]),
                "--labels": JUNK, "--trajectory-rows": SMALL, "--amp": st.sampled_from(["fp32", "bf16", "fp16", "x"]),
                "--device": st.sampled_from(["cpu", "cuda", "cuda:7", "tpu", "", "auto"])}
EVAL_FLAGS = {k: v for k, v in SAMPLE_FLAGS.items() if k not in ("--labels", "--trajectory-rows", "--amp")}
TRAIN_FLAGS = {f: JUNK for f in ("--steps", "--batch-size", "--lr", "--warmup", "--ema-decay", "--seed",
                                 "--ckpt-every", "--log-every", "--image-size", "--channels", "--num-classes")}
TRAIN_FLAGS.update({"--preset": st.sampled_from(["digits", "mnist", "cifar10-ddpm", "nope", ""]),
                    "--prediction": st.sampled_from(["eps", "v", "x0", "score"]),
                    "--schedule": st.sampled_from(["linear", "cosine", "sigmoid"]),
                    "--dataset": st.sampled_from(["digits", "mnist", "folder", "imagenet"])})
DISTILL_FLAGS = {f: JUNK for f in ("--steps", "--batch-size", "--lr", "--adv-weight", "--distill-weight",
                                   "--teacher-t-min", "--teacher-t-max", "--teacher-guidance", "--r1-gamma",
                                   "--disc-lr", "--disc-steps", "--backbone-steps", "--disc-heads", "--disc-mbstd")}
DISTILL_FLAGS["--student-timesteps"] = st.lists(JUNK, min_size=1, max_size=4).map(" ".join)


def command(name: str, flags: dict):
    """Valid base arguments with 1-3 flags replaced by random or boundary values (and sometimes a stray one)."""
    chosen = st.dictionaries(st.sampled_from(sorted(flags)), st.none(), min_size=1, max_size=3)

    @st.composite
    def build(draw):
        values = {k: draw(flags[k]) for k in draw(chosen)}
        extra = draw(st.sampled_from([[], [], [], ["--bogus"], ["extra-positional"]]))
        return name, values, extra
    return build()


CLI = st.one_of(command("sample", SAMPLE_FLAGS), command("eval", EVAL_FLAGS), command("train", TRAIN_FLAGS),
                command("train-resume", TRAIN_FLAGS), command("distill", DISTILL_FLAGS))


def argv(name, values, extra, run_dir: Path, tmp: Path) -> list[str]:
    base = {"sample": ["sample", "--checkpoint", str(run_dir), "--out", str(tmp / "s.png"), "--n", "2",
                       "--steps", "2"],
            "eval": ["eval", "--checkpoint", str(run_dir), "--n", "4", "--steps", "2", "--classifier-steps", "1"],
            "train": ["train", "--out", str(tmp / "new"), "--dry-run"],
            "train-resume": ["train", "--out", str(run_dir), "--resume", "--dry-run"],
            "distill": ["distill", "--teacher", str(run_dir), "--out", str(tmp / "student"), "--dry-run"]}[name]
    args = list(base)
    for flag, value in values.items():
        if flag in args:  # replace the base value
            i = args.index(flag)
            args[i + 1 : i + 2] = value.split(" ") if flag in ("--labels", "--student-timesteps") else [value]
        else:
            args += [flag, *(value.split(" ") if flag in ("--labels", "--student-timesteps") else [value])]
    return args + extra


@FUZZ
@given(case=CLI)
def test_cli_arguments(fixture_run, tmp_path_factory, case):
    tmp = tmp_path_factory.mktemp("out")
    args = argv(*case, fixture_run, tmp)
    before = tree_hash(fixture_run)
    code, err = run_cli(args)
    assert_clean_outcome(code, err, args)
    if code != 0:
        assert tree_hash(fixture_run) == before, args


def test_eval_with_too_few_images_writes_nothing(tmp_path):
    # The example that made test_cli_arguments flaky: eval trained and cached its classifier in the run directory
    # before finding --n too small, so the run changed when that was the first eval of the session.
    run_dir = tmp_path / "run"
    write_run(run_dir)
    before = tree_hash(run_dir)
    code, err = run_cli(["eval", "--checkpoint", str(run_dir), "--n", "1", "--steps", "2", "--classifier-steps", "1"])
    assert code != 0 and "needs at least 4" in err
    assert tree_hash(run_dir) == before


# --- file readers -------------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                                                       max_size=4), max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_json(draw, original: dict) -> bytes:
    """Random bytes, a random JSON value, or the original with one field replaced or deleted."""
    kind = draw(st.sampled_from(["bytes", "value", "replace", "replace", "delete"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "value":
        return json.dumps(draw(JSON_VALUES)).encode()
    obj = json.loads(json.dumps(original))
    path = draw(st.sampled_from([p for p in _paths(obj) if p]))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return json.dumps(obj).encode()


@st.composite
def mutated_safetensors(draw, original: bytes) -> bytes:
    raw = bytearray(original)
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    kind = draw(st.sampled_from(["truncate", "data", "header", "length"]))
    if kind == "truncate":
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    if kind == "length":
        raw[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
        return bytes(raw)
    lo, hi = (header, len(raw)) if kind == "data" and header < len(raw) else (8, header)
    at = draw(st.integers(lo, hi - 1))
    patch = draw(st.binary(min_size=1, max_size=16))
    raw[at : at + len(patch)] = patch
    return bytes(raw[: len(original)])


FILES = ["config.json", "checkpoints/step-000000002/config.json", "checkpoints/step-000000002/state.json",
         "checkpoints/step-000000002/model.safetensors", "checkpoints/step-000000002/ema.safetensors",
         "checkpoints/step-000000002/optimizer.safetensors"]


@FUZZ
@given(name=st.sampled_from(FILES), data=st.data())
def test_file_readers(fixture_run, tmp_path_factory, name, data):
    run_dir = tmp_path_factory.mktemp("mut") / "run"
    shutil.copytree(fixture_run, run_dir)
    target = run_dir / name
    original = target.read_bytes()
    if name.endswith(".json"):
        content = data.draw(mutated_json(json.loads(original)))
    else:
        content = data.draw(mutated_safetensors(original))
    target.write_bytes(content)

    # The readers themselves: success or one FastdiffError, nothing else.
    step = run_dir / "checkpoints" / "step-000000002"
    for read in (lambda: load_config(target if name.endswith("config.json") else run_dir / "config.json"),
                 lambda: ckpt.verify_checkpoint(step), lambda: ckpt.latest_good_checkpoint(run_dir),
                 lambda: ckpt.load_tensors(step, Path(name).stem) if name.endswith(".safetensors") else None):
        try:
            read()
        except FastdiffError as e:
            assert str(e).strip(), type(e)
    # And the commands that read them.
    out = tmp_path_factory.mktemp("out")
    before = tree_hash(run_dir)
    for args in (["sample", "--checkpoint", str(run_dir), "--n", "2", "--steps", "2", "--out", str(out / "s.png")],
                 ["train", "--out", str(run_dir), "--resume", "--dry-run"]):
        code, err = run_cli(args)
        assert_clean_outcome(code, err, args)
        if code != 0:
            assert tree_hash(run_dir) == before, args
        elif args[0] == "sample":  # weights that load are finite, so are the samples drawn from them
            assert np.isfinite(np.load(out / "s.npz")["samples"]).all()
