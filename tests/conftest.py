import os
import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The tests write no user's cache and nothing into the checkout: what fastdiff derives from shipped models
# (`sources.user_cache_dir`), Triton's compiled kernels (~/.triton/cache: a second run of the sm_90 compile tests
# found them there and compiled nothing) and Hypothesis's storage (./.hypothesis, although its database is off;
# written as the fuzz tests are collected, so set in pytest_configure) go to a folder of the session, removed after.
CACHES = {"XDG_CACHE_HOME": "xdg-cache", "TRITON_CACHE_DIR": "triton-cache",
          "HYPOTHESIS_STORAGE_DIRECTORY": "hypothesis"}


def _isolate_caches(config) -> None:
    root = tempfile.mkdtemp(prefix="fastdiff-tests-")
    old = {name: os.environ.get(name) for name in CACHES}
    for name, folder in CACHES.items():
        os.environ[name] = os.path.join(root, folder)
        os.mkdir(os.environ[name])

    def restore():
        for name, value in old.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
        shutil.rmtree(root, ignore_errors=True)

    config.add_cleanup(restore)


@pytest.fixture
def no_tf32():
    """fp32 convolutions without TF32 on a GPU, so that two paths through the same model agree to fp32 rounding
    (TF32 rounds each convolution's inputs to 10 mantissa bits, which turns a last-bit difference into 1e-3)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def tiny_overrides():
    """A digits run small enough for a few training steps in a test."""
    return {
        "model.base_channels": 16, "model.num_groups": 4, "train.batch_size": 16, "train.log_every": 1,
        "train.ckpt_every": 2, "train.warmup_steps": 2, "train.sample_every": 0,  # grids: tests/test_monitor.py
    }


@pytest.fixture
def nan_batches(monkeypatch):
    """Every training batch after the third is NaN, so a tiny_overrides run diverges at step 4, after its step-2
    checkpoint; call the returned function to make the data fine again (for the resume the NaN guard advises)."""
    from fastdiff.data import datasets

    real_batch = datasets.ImageData.batch
    calls = {"n": 0}

    def poisoned(self, index, device):
        calls["n"] += 1
        x, y = real_batch(self, index, device)
        return (x * float("nan") if calls["n"] > 3 else x), y

    monkeypatch.setattr(datasets.ImageData, "batch", poisoned)
    return lambda: monkeypatch.setattr(datasets.ImageData, "batch", real_batch)


def pytest_configure(config):
    """The caches of `CACHES` in a folder of the session. FASTDIFF_TEST_CPU_FLAGS="avx2 avx512f" runs this process's
    tests as on a CPU with those flags (the CPU defaults of `fastdiff.runtime.cpu_choice` follow them): the suite
    can check the other CPU class's defaults on this machine. Subprocesses keep the real flags."""
    _isolate_caches(config)
    flags = os.environ.get("FASTDIFF_TEST_CPU_FLAGS")
    if flags is not None:
        import fastdiff.runtime

        fastdiff.runtime.cpu_flags = lambda: frozenset(flags.split())


@pytest.fixture
def lock_is_held():
    """`waiting_lock_is_held` (a fixture: test modules of two folders cannot import one conftest by name)."""
    return waiting_lock_is_held


def waiting_lock_is_held(name: str, key) -> bool:
    """Whether a process holds `fastdiff.runlock.waiting_lock(name, key)` now (this one included: a new open file
    description of the lock file is refused while another holds it)."""
    import errno
    import fcntl

    from fastdiff.runlock import waiting_lock_path

    fd = os.open(waiting_lock_path(name, key), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as e:
        assert e.errno in (errno.EWOULDBLOCK, errno.EAGAIN), e
        return True
    finally:
        os.close(fd)
