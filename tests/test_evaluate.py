import pytest
import torch

from fastdiff.models.classifier import _augment


def test_augment_shifts_within_bounds():
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 4, 4] = 1
    y = _augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and (y.sum(dim=(1, 2, 3)) == 1).all()


def test_score_samples_reports_each_metric_beside_its_real_vs_real_value():
    from fastdiff.data import load_dataset
    from fastdiff.evaluate import real_reference, score_samples
    from fastdiff.models.classifier import train_classifier

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    model = train_classifier(train.float_images(), train.labels, 10, steps=30, device="cpu").eval()  # ~85% held out
    n = 300
    ref = real_reference(model, train, test, n, "cpu")
    assert {"floor", "kid_floor", "kid_floor_std", "precision_floor", "recall_floor"} <= set(ref)
    # Training images the floor did not draw score like the floor: another real sample of the same size.
    g = torch.Generator().manual_seed(1234)
    unused = torch.randperm(len(train), generator=g)[n : 2 * n]
    real = score_samples(model, train.float_images()[unused], None, ref, "cpu")
    assert abs(real["kid"]) < 4 * real["kid_std"] and abs(ref["kid_floor"]) < 4 * ref["kid_floor_std"]
    assert abs(real["precision"] - ref["precision_floor"]) < 0.1 and abs(real["recall"] - ref["recall_floor"]) < 0.1
    # Noise: far from the floor on every metric.
    noise = score_samples(model, torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, None, ref, "cpu")
    assert noise["kid"] > 8 * noise["kid_std"] > 0 and noise["kid"] > 10 * ref["kid_floor_std"]
    assert noise["precision"] < ref["precision_floor"] / 2 and noise["fd_cls"] > noise["fd_cls_floor"]
    assert {"kid", "kid_std", "kid_floor", "kid_floor_std", "precision", "recall", "precision_floor",
            "recall_floor", "fd_cls", "fd_cls_floor", "fd_ratio"} == set(noise)


def test_evaluate_run_checks_n_and_classifier_steps_first(monkeypatch):
    """n=20.5 was a TypeError after the classifier had trained; classifier_steps 0 one from torch's OneCycleLR."""
    from fastdiff import evaluate
    from fastdiff.errors import ConfigError

    monkeypatch.setattr(evaluate, "load_run", lambda *a, **k: pytest.fail("loaded the run"))
    for kwargs, says in (({"n": 20.5}, "n=20.5 is not a whole number"), ({"n": 0}, "n=0 must be at least 1"),
                         ({"classifier_steps": 0}, "classifier_steps=0 must be at least 1")):
        with pytest.raises(ConfigError, match=says):
            evaluate.evaluate_run("pretrained:mnist", **kwargs)


def test_evaluate_run_records_its_sampling_and_refuses_one_class(monkeypatch):
    """The JSON left out the seed, eta, spacing and clip, which change the numbers; a dataset of one class (an image
    folder of one class folder) was scored in the features of a classifier that one class cannot train (its
    cross-entropy is 0), as if it had been."""
    import dataclasses

    from fastdiff import evaluate
    from fastdiff.errors import DataError

    got = evaluate.evaluate_run("pretrained:mnist", n=8, seed=3, device="cpu", steps=2, eta=0.5, spacing="linspace",
                                clip="none")
    assert {k: got[k] for k in ("n", "seed", "sampler", "steps", "eta", "spacing", "clip")} == {
        "n": 8, "seed": 3, "sampler": "ddim", "steps": 2, "eta": 0.5, "spacing": "linspace", "clip": None}
    sets = evaluate.evaluation_sets

    def small_test_set(cfg, n):
        train, test = sets(cfg, n)
        return train, dataclasses.replace(test, images=test.images[:20], labels=test.labels[:20])

    monkeypatch.setattr(evaluate, "evaluation_sets", small_test_set)  # n 70 was all the singular-size check read
    said = []
    evaluate.evaluate_run("pretrained:mnist", n=70, device="cpu", steps=2, log=said.append)
    assert any("the held-out set's 20 images is not above the classifier's 64 feature dimensions" in s for s in said)

    def one_class(cfg, n):
        return tuple(dataclasses.replace(d, labels=d.labels * 0, class_names=["blobs"]) for d in sets(cfg, n))

    monkeypatch.setattr(evaluate, "evaluation_sets", one_class)
    monkeypatch.setattr(evaluate, "load_or_train_classifier", lambda *a, **k: pytest.fail("trained a classifier"))
    with pytest.raises(DataError, match="has 1 class, and FD_cls, KID and precision/recall are measured in the"):
        evaluate.evaluate_run("pretrained:mnist", n=8, device="cpu", steps=2)
