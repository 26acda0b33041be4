"""Sample quality: Frechet distance in the feature space of a classifier trained on the dataset (FD_cls), its
real-vs-real floor, and class-conditional accuracy.

FD_cls follows FID (Heusel et al. 2017) with fastdiff's own small classifier in place of Inception, which
knows nothing of 8x8 digits. Every FD_cls is reported beside the floor: the FD between the held-out real
images and an equal number of training images, i.e. what a perfect generator would score at this sample size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastdiff.checkpoint import read_json, read_tensors, resolve_checkpoint, save_tensors, write_json_atomic
from fastdiff.data import ImageData, load_dataset
from fastdiff.errors import CheckpointError
from fastdiff.models.classifier import Classifier, ClassifierConfig, train_classifier
from fastdiff.runtime import resolve_device
from fastdiff.sampling import load_run, resolve_settings, sample


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between the Gaussians fitted to rows of a and b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), a symmetric PSD matrix: stable with eigh.
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_cross = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross)


def classifier_path(cache_dir: Path, data: ImageData) -> Path:
    c, h, _ = data.shape
    return Path(cache_dir) / f"classifier-{data.name}-{c}x{h}.safetensors"


def load_or_train_classifier(train: ImageData, cache_dir, device="cpu", log=None, steps: int = 1500) -> Classifier:
    """The evaluation classifier for this dataset and size, trained once and cached in cache_dir."""
    path = classifier_path(cache_dir, train)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        try:
            meta = read_json(meta_path)
            model = Classifier(ClassifierConfig(**meta["config"]))
            model.load_state_dict(read_tensors(path))
        except Exception as e:  # noqa: BLE001 - any failure to read the cache means: retrain
            if log:
                log(f"cached classifier {path} unreadable ({e}); retraining")
        else:
            if meta.get("steps") == steps:
                return model.to(device).eval()
    if log:
        log(f"training the evaluation classifier for {train.name} at {train.shape} (cached as {path})")
    model = train_classifier(train.float_images(), train.labels, train.num_classes, steps=steps, device=device, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, model.state_dict())
    write_json_atomic(meta_path, {"config": model.config_dict(), "steps": steps,
                                  "train_images": len(train)})
    return model


@torch.no_grad()
def features_and_logits(model: Classifier, images: torch.Tensor, device, batch_size: int = 512):
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float()
        f = model.features(x)
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(feats).numpy(), torch.cat(logits)


def real_reference(model: Classifier, train: ImageData, test: ImageData, n: int, device) -> dict:
    """Held-out features, the real-vs-real floor at sample size n, and the classifier's held-out accuracy."""
    if len(test) < 2 or n < 2:
        raise CheckpointError("FD_cls needs at least 2 held-out and 2 generated images")
    test_f, test_logits = features_and_logits(model, test.float_images(), device)
    g = torch.Generator().manual_seed(1234)
    idx = torch.randperm(len(train), generator=g)[: min(n, len(train))]
    train_f, _ = features_and_logits(model, train.float_images()[idx], device)
    return {
        "test_features": test_f,
        "floor": frechet_distance(train_f, test_f),
        "classifier_test_accuracy": float((test_logits.argmax(1) == test.labels).float().mean()),
    }


def score_samples(model: Classifier, samples: torch.Tensor, labels: torch.Tensor | None, reference: dict,
                  device) -> dict:
    """FD_cls of float samples in [-1, 1] against the held-out set, and accuracy for their intended labels."""
    feats, logits = features_and_logits(model, samples.clamp(-1, 1), device)
    out = {"fd_cls": frechet_distance(feats, reference["test_features"]), "fd_cls_floor": reference["floor"]}
    out["fd_ratio"] = out["fd_cls"] / max(reference["floor"], 1e-12)
    if labels is not None:
        out["cond_accuracy"] = float((logits.argmax(1) == labels.cpu()).float().mean())
    return out


def evaluate_run(checkpoint, *, n: int = 1000, seed: int = 0, device=None, classifier_steps: int = 1500, log=None,
                 **sampling) -> dict:
    """Sample n images from a run and score them: FD_cls, its floor, and class-conditional accuracy.

    sampling: the overrides of `fastdiff.sampling.resolve_settings` (sampler, steps, guidance, eta, spacing, clip,
    batch_size, refiner, acceleration keys); None or absent is the run's own setting.
    """
    device = resolve_device(device)
    run = load_run(checkpoint, device)
    settings = resolve_settings(run, device, **sampling)  # bad settings fail before the classifier trains
    cfg = run.config
    kw = dict(data_dir=cfg.data.data_dir, image_size=cfg.model.image_size, channels=cfg.model.in_channels)
    train = load_dataset(cfg.data.dataset, "train", **kw)
    test = load_dataset(cfg.data.dataset, "test", **kw)
    run_dir = Path(run.path).parent.parent
    if cfg.is_student and Path(cfg.distill.teacher).exists():
        # score a student with its teacher's cached classifier, so that their FD_cls compare
        run_dir = resolve_checkpoint(cfg.distill.teacher).parent.parent
    cache = Path(cfg.data.data_dir) if cfg.data.data_dir and Path(cfg.data.data_dir).is_dir() else run_dir
    classifier = load_or_train_classifier(train, cache, device, log, steps=classifier_steps)
    ref = real_reference(classifier, train, test, n, device)
    res = sample(run, settings, n=n, seed=seed)
    result = {"checkpoint": run.path, "dataset": cfg.data.dataset, "n": n, "sampler": settings.sampler,
              "steps": settings.steps, "guidance": settings.guidance if res.labels is not None else None,
              "refiner": settings.refiner}
    result.update(score_samples(classifier, res.images, res.labels, ref, device))
    result["classifier_test_accuracy"] = ref["classifier_test_accuracy"]
    result["images_per_sec"] = res.images_per_sec
    result["accel"] = settings.accel.describe()
    result["device"] = str(device)
    return result
