"""The weights shipped in fastdiff/pretrained/ (`make pretrained`) still sample what they sampled when shipped.

Each shipped model is scored again with the settings it was scored with (fastdiff.interop.pretrained.CHECK, on the
CPU, same n and seed): the evaluation classifier must label at least 95% of the samples as asked, and FD_cls must
stay within 10% of the shipped figure (eval.json). The sampling is deterministic given the seeds, so the margin
covers only the float rounding of other CPUs (convolution kernels differ between AVX2 and AVX-512 builds) — any
change to the model, sampler or ops code that changes samples materially fails here.
"""

import json
from pathlib import Path

import pytest
import torch

from fastdiff import checkpoint as ckpt
from fastdiff import evaluate
from fastdiff.data import load_dataset
from fastdiff.evaluate import evaluate_run
from fastdiff.interop.pretrained import CHECK_N, CHECK_SEED, check_of

FD_MARGIN = 0.10

NAMES = ckpt.pretrained_names()


def test_the_package_ships_the_mnist_models():
    assert {"mnist", "mnist-student", "mnist-student-refiner"} <= set(NAMES)
    total = sum(f.stat().st_size for f in ckpt.PRETRAINED_DIR.rglob("*") if f.is_file())
    assert total <= 8 * 2**20, f"the shipped weights take {total / 2**20:.1f} MiB (at most 8)"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_still_samples_its_figures(name):
    shipped = json.loads((ckpt.PRETRAINED_DIR / name / "eval.json").read_text())
    checkpoint, settings = check_of(name)  # a refiner is scored on the samples of the student it refines
    got = evaluate_run(checkpoint, n=CHECK_N, seed=CHECK_SEED, device="cpu", **settings)
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


def test_the_classifier_cache_is_never_the_installed_package(tmp_path, monkeypatch):
    # eval of pretrained:NAME with other --classifier-steps trained a classifier into fastdiff/pretrained/,
    # replacing the shipped one; it goes to the user's cache. A checkpoint folder outside a run caches beside it.
    from fastdiff.config import load_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = ckpt.resolve_checkpoint("pretrained:mnist")
    cfg = load_config(folder / "config.json")
    assert evaluate.classifier_cache_dir(folder, cfg) == tmp_path / "cache" / "fastdiff"
    assert evaluate.classifier_cache_dir(tmp_path / "downloads" / "ck", cfg) == tmp_path / "downloads"
    assert evaluate.classifier_cache_dir(tmp_path / "run" / "checkpoints" / "step-000000004", cfg) == tmp_path / "run"
    # an exported diffusers folder is no run: its classifier went into the folder holding it (the current folder)
    from fastdiff.interop import export_run

    export_run("pretrained:mnist", tmp_path / "exported")
    assert evaluate.classifier_cache_dir(tmp_path / "exported", cfg) == tmp_path / "cache" / "fastdiff"


def test_other_classifier_steps_and_a_read_only_run_keep_their_own_cache(tmp_path, monkeypatch):
    """--classifier-steps 3 replaced the default's cached classifier (one file per dataset and size); a run this
    user may not write trained the classifier for minutes, then failed to cache it."""
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train = load_dataset("digits", "train")
    run = tmp_path / "run"
    run.mkdir()
    evaluate.load_or_train_classifier(train, run, steps=3)
    assert sorted(p.name for p in run.iterdir()) == ["classifier-digits-1x8-steps3.json",
                                                      "classifier-digits-1x8-steps3.safetensors"]
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != tmp_path / "ro" and real_access(p, mode))
    (tmp_path / "ro").mkdir()
    logs = []
    first = evaluate.load_or_train_classifier(train, tmp_path / "ro", steps=2, log=logs.append)
    assert any(f"{tmp_path / 'ro'} is not writable" in line for line in logs) and not list((tmp_path / "ro").iterdir())
    cached = tmp_path / "cache" / "fastdiff" / "classifier-digits-1x8-steps2.safetensors"
    assert cached.exists()
    monkeypatch.setattr(evaluate, "train_classifier", lambda *a, **k: pytest.fail("trained a classifier again"))
    logs.clear()
    again = evaluate.load_or_train_classifier(train, tmp_path / "ro", steps=2, log=logs.append)
    assert logs == [f"using the cached evaluation classifier {cached}"]
    assert all(torch.equal(again.state_dict()[k], v) for k, v in first.state_dict().items())


def test_a_refiner_ships_in_fp16_for_its_student_only(tmp_path):
    import dataclasses

    from fastdiff.config import preset_config
    from fastdiff.errors import FastdiffError
    from fastdiff.interop.pretrained import write_refiner
    from fastdiff.models.refiner import Refiner, load_refiner, refiner_unet_config
    from fastdiff.train.refiner import RefinerConfig

    cfg = RefinerConfig(generator="pretrained:x-student", base_channels=8)
    torch.manual_seed(0)  # its own weights and input, whatever ran before (an unlucky draw exceeded fp16's 2e-3)
    refiner = Refiner(refiner_unet_config(preset_config("digits").model, cfg))
    torch.nn.init.normal_(refiner.net.conv_out.weight, std=0.1)
    config = cfg.to_dict(model=dataclasses.asdict(refiner.net.config))
    ckpt.save_checkpoint(tmp_path / "run", 1, tensors={"model": refiner.state_dict()}, state={"step": 1},
                         config=config)
    out = write_refiner(tmp_path / "run", "x-student-refiner", tmp_path / "shipped")
    assert {t.dtype for t in ckpt.read_tensors(out / "model.safetensors").values()} == {torch.float16}
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(load_refiner(out)(x), refiner.eval()(x), atol=2e-3, rtol=0)  # fp16 weights
    with pytest.raises(FastdiffError, match="not a refiner of pretrained:y-student"):
        write_refiner(tmp_path / "run", "y-student-refiner", tmp_path / "shipped")


def test_a_refiner_is_not_sampled_on_its_own(capsys, tmp_path):
    # It said its config.json was "not a config.json that fastdiff wrote"
    from fastdiff.cli import main

    code = main(["sample", "--checkpoint", "pretrained:mnist-student-refiner", "--n", "2", "--out",
                 str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code != 0 and not (tmp_path / "g.png").exists()
    assert "pretrained:mnist-student-refiner is a refiner (fastdiff train-refiner), not a diffusion run" in err
    assert "fastdiff sample --checkpoint pretrained:mnist-student --refine pretrained:mnist-student-refiner" in err
    assert "Traceback" not in err


def test_two_image_folders_of_one_size_and_count_do_not_share_a_classifier(tmp_path, monkeypatch):
    """Every folder dataset is named "folder": a classifier cached for one (in the user's cache, say) served another
    of the same image size and count, with another number of classes."""
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for root, classes, per_class in ((tmp_path / "a", 2, 9), (tmp_path / "b", 3, 6)):
        for c in range(classes):
            (root / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((8, 8), 10 * i + 60 * c, np.uint8)).save(root / f"c{c}" / f"{i}.png")
    a, b = (load_dataset("folder", data_dir=tmp_path / name, image_size=8, channels=1) for name in ("a", "b"))
    assert (a.name, len(a), a.shape) == (b.name, len(b), b.shape) and a.num_classes != b.num_classes
    first = evaluate.load_or_train_classifier(a, tmp_path / "cache" / "fastdiff", steps=3)
    logs = []
    second = evaluate.load_or_train_classifier(b, tmp_path / "run", steps=3, log=logs.append)
    assert any("training the evaluation classifier" in line for line in logs), logs
    assert first.config_dict()["num_classes"] == 2 and second.config_dict()["num_classes"] == 3


def test_a_copy_of_a_shipped_folder_loads_as_the_shipped_model(tmp_path, capsys):
    """A copy of fastdiff/pretrained/mnist was read as a run's checkpoint: "ema.safetensors is missing; the
    checkpoint is incomplete, delete it". It holds the shipped model's one set of weights, as the shipped folder
    does; a run's checkpoint without its EMA weights is still incomplete."""
    import shutil

    import fastdiff
    from fastdiff.cli import main

    copy = tmp_path / "mymnist"
    shutil.copytree(ckpt.PRETRAINED_DIR / "mnist", copy)
    kwargs = dict(n=2, seed=3, steps=2, device="cpu")
    assert torch.equal(fastdiff.load(copy, device="cpu").sample(**kwargs),
                       fastdiff.load("pretrained:mnist", device="cpu").sample(**kwargs))
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(copy), "--out", str(tmp_path / "s.png"), "--no-ema"]) == 2
    assert "holds one set of weights" in capsys.readouterr().err
    (copy / "state.json").write_text(json.dumps({"step": 10}))  # now a run's checkpoint, whose EMA file is missing
    with pytest.raises(fastdiff.FastdiffError, match="ema.safetensors is missing; the checkpoint is incomplete"):
        fastdiff.load(copy, device="cpu")
