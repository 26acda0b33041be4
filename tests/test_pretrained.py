"""The weights shipped in fastdiff/pretrained/ (`make pretrained`) still sample what they sampled when shipped.

Each shipped model is scored again with the settings it was scored with (fastdiff.interop.pretrained.CHECK, on the
CPU, same n and seed): the evaluation classifier must label at least 95% of the samples as asked, and FD_cls must
stay within 10% of the shipped figure (eval.json). The sampling is deterministic given the seeds, so the margin
covers only the float rounding of other CPUs (convolution kernels differ between AVX2 and AVX-512 builds) — any
change to the model, sampler or ops code that changes samples materially fails here.
"""

import json

import pytest
import torch

from fastdiff import checkpoint as ckpt
from fastdiff import evaluate
from fastdiff.data import load_dataset
from fastdiff.evaluate import evaluate_run
from fastdiff.interop.pretrained import CHECK, CHECK_N, CHECK_SEED

FD_MARGIN = 0.10

NAMES = ckpt.pretrained_names()


def test_the_package_ships_the_mnist_models():
    assert {"mnist", "mnist-student"} <= set(NAMES)
    total = sum(f.stat().st_size for f in ckpt.PRETRAINED_DIR.rglob("*") if f.is_file())
    assert total <= 8 * 2**20, f"the shipped weights take {total / 2**20:.1f} MiB (at most 8)"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_still_samples_its_figures(name):
    shipped = json.loads((ckpt.PRETRAINED_DIR / name / "eval.json").read_text())
    settings = CHECK["-student" if name.endswith("-student") else ""]
    got = evaluate_run(f"pretrained:{name}", n=CHECK_N, seed=CHECK_SEED, device="cpu", **settings)
    assert got["cond_accuracy"] >= 0.95, got
    assert abs(got["fd_cls"] - shipped["fd_cls"]) <= FD_MARGIN * shipped["fd_cls"], (got["fd_cls"], shipped)


def test_a_run_without_its_own_classifier_uses_the_shipped_one(tmp_path, monkeypatch):
    # The same training already done: no run of mnist5k trains the evaluation classifier again (3+ minutes on 2
    # CPU cores), while a run that has its own keeps it, and other steps or another dataset train their own.
    train = load_dataset("mnist5k", "train")
    monkeypatch.setattr(evaluate, "train_classifier", lambda *a, **k: pytest.fail("trained a classifier"))
    logs = []
    model = evaluate.load_or_train_classifier(train, tmp_path, log=logs.append)
    assert any("using the shipped evaluation classifier" in line for line in logs)
    want = ckpt.read_tensors(evaluate.classifier_path(ckpt.PRETRAINED_DIR, train))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    assert not list(tmp_path.iterdir())  # nothing copied into the run
    trained = []
    monkeypatch.setattr(evaluate, "train_classifier", lambda *a, **k: trained.append(1) or model)
    evaluate.load_or_train_classifier(train, tmp_path, steps=10)
    assert trained == [1]
