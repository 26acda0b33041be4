"""The weights shipped in fastdiff/pretrained/ (`make pretrained`) still sample what they sampled when shipped.

Each shipped model is scored again with the settings it was scored with (fastdiff.interop.pretrained.CHECK, on the
CPU, same n and seed): the evaluation classifier must label at least 95% of the samples as asked, and FD_cls must
stay within 10% of the shipped figure (eval.json). The sampling is deterministic given the seeds, so the margin
covers only the float rounding of other CPUs (convolution kernels differ between AVX2 and AVX-512 builds) — any
change to the model, sampler or ops code that changes samples materially fails here.
"""

import json

import pytest

from fastdiff import checkpoint as ckpt
from fastdiff.evaluate import evaluate_run
from fastdiff.interop.pretrained import CHECK, CHECK_N, CHECK_SEED

FD_MARGIN = 0.10

NAMES = ckpt.pretrained_names()


def test_the_package_ships_the_mnist_models():
    assert "mnist" in NAMES
    total = sum(f.stat().st_size for f in ckpt.PRETRAINED_DIR.rglob("*") if f.is_file())
    assert total <= 8 * 2**20, f"the shipped weights take {total / 2**20:.1f} MiB (at most 8)"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_still_samples_its_figures(name):
    shipped = json.loads((ckpt.PRETRAINED_DIR / name / "eval.json").read_text())
    settings = CHECK["-student" if name.endswith("-student") else ""]
    got = evaluate_run(f"pretrained:{name}", n=CHECK_N, seed=CHECK_SEED, device="cpu", **settings)
    assert got["cond_accuracy"] >= 0.95, got
    assert abs(got["fd_cls"] - shipped["fd_cls"]) <= FD_MARGIN * shipped["fd_cls"], (got["fd_cls"], shipped)
