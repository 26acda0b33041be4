"""Sample quality in the feature space of a classifier trained on the dataset: Frechet distance (FD_cls), KID and
precision/recall (fastdiff.metrics), each beside its real-vs-real value, and class-conditional accuracy.

FD_cls follows FID (Heusel et al. 2017) with fastdiff's own small classifier in place of Inception, which
knows nothing of 8x8 digits. Every FD_cls is reported beside the floor: the FD between the whole held-out set
and n training images (all of them where there are fewer), i.e. what a perfect generator would score at this
sample size. KID and precision/recall get the same real-vs-real values (kid_floor, precision_floor,
recall_floor). FD's small-sample bias makes FD_cls, its floor and their ratio fd_ratio depend on n and on the
held-out set's size: compare them between runs at the same n and dataset only, never with published FIDs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastdiff.checkpoint import (
    CHECKPOINTS,
    PRETRAINED_DIR,
    is_pretrained,
    read_json,
    read_tensors,
    resolve_checkpoint,
    save_tensors,
)
from fastdiff.config_checks import count
from fastdiff.data import ImageData, load_dataset
from fastdiff.errors import CheckpointError, ConfigError, DataError, FastdiffError
from fastdiff.images import check_writable
from fastdiff.metrics import frechet_distance, kid, knn_radii, precision_recall
from fastdiff.models.classifier import Classifier, ClassifierConfig, train_classifier
from fastdiff.runlock import waiting_lock
from fastdiff.runtime import resolve_device
from fastdiff.sampling import load_run, resolve_settings, sample
from fastdiff.sources import pinned_or_its_run, tensors_fingerprint, user_cache_dir

PR_K = 3  # nearest neighbours of the precision/recall manifolds (Kynkaanniemi et al. 2019)
MIN_IMAGES = PR_K + 1  # fewer and a point has no k-th neighbour


CLASSIFIER_STEPS = 1500  # the evaluation classifier's default training steps (`make pretrained` ships them)


def classifier_path(cache_dir: Path, data: ImageData, steps: int = CLASSIFIER_STEPS) -> Path:
    """Its cache file: one per dataset, image size and steps (other steps do not replace the default's)."""
    c, h, _ = data.shape
    tag = "" if steps == CLASSIFIER_STEPS else f"-steps{steps}"
    return Path(cache_dir) / f"classifier-{data.name}-{c}x{h}{tag}.safetensors"


def load_or_train_classifier(train: ImageData, cache_dir, device="cpu", log=None, steps: int = CLASSIFIER_STEPS,
                             progress: bool = False) -> Classifier:
    """The evaluation classifier for this dataset, size and steps, trained once and cached in cache_dir (in the
    user's cache, `user_cache_dir`, where cache_dir is not writable: a read-only run). One cached in the user's
    cache or shipped (fastdiff/pretrained, `make pretrained`) is the same training already done, so it serves any
    run of that dataset that has none of its own. progress: a bar of its training (`fit_classifier`)."""
    path = classifier_path(cache_dir, train, steps)
    user = classifier_path(user_cache_dir(), train, steps)
    shipped = classifier_path(PRETRAINED_DIR, train, steps)
    data = data_fingerprint(train)
    with waiting_lock("cache", path):  # two evaluations at once: the second waits, then reads the first's
        for candidate in dict.fromkeys((path, user, shipped)):
            model = _cached_classifier(candidate, steps, len(train), data, log)
            if model is not None:
                if candidate != path and log:
                    which = "shipped" if candidate == shipped else "cached"
                    log(f"using the {which} evaluation classifier {candidate}")
                return model.to(device).eval()
        try:  # checked before the minutes of training, not when it is written
            check_writable(path, what="the evaluation classifier")
        except FastdiffError:
            if log:
                log(f"{path.parent} is not writable; caching the evaluation classifier in {user.parent}")
            path = user
        if log:
            log(f"training the evaluation classifier for {train.name} at {train.shape} (cached as {path})")
        model = train_classifier(train.float_images(), train.labels, train.num_classes, steps=steps, device=device,
                                 log=log, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, model.state_dict(), meta={"config": model.config_dict(), "steps": steps,
                                                     "train_images": len(train), "data": data})
        return model


def data_fingerprint(data: ImageData) -> str:
    """The training images and labels' digest: two datasets of one name, size and count (every image folder is
    "folder") do not share a cached classifier."""
    return tensors_fingerprint((("images", data.images), ("labels", data.labels)))


def _cached_classifier(path: Path, steps: int, train_images: int, data: str, log) -> Classifier | None:
    """The classifier cached at path if it is there, readable and trained for `steps` steps on `train_images`
    images whose `data_fingerprint` is `data` (a cache written before either was recorded is taken without it),
    else None."""
    meta_path = path.with_suffix(".json")
    if not (path.exists() and meta_path.exists()):
        return None
    try:
        meta = read_json(meta_path)
        model = Classifier(ClassifierConfig(**meta["config"]))
        model.load_state_dict(read_tensors(path))
    except Exception as e:  # noqa: BLE001 - any failure to read the cache means: the next candidate, or train
        if log:
            log(f"cached classifier {path} unreadable ({e}); passing it over")
        return None
    same = (meta.get("steps") == steps and meta.get("train_images", train_images) == train_images
            and meta.get("data", data) == data)
    return model if same else None


@torch.no_grad()
def features_and_logits(model: Classifier, images: torch.Tensor, device, batch_size: int = 512):
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float()
        f = model.features(x)
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(feats).numpy(), torch.cat(logits)


def evaluation_sets(cfg, n: int) -> tuple[ImageData, ImageData]:
    """The training and held-out images of a run's dataset at its image size, checked for an evaluation of n
    generated images before anything is trained or written (the classifier's cache lives in the run directory)."""
    kw = dict(data_dir=cfg.data.data_dir, image_size=cfg.model.image_size, channels=cfg.model.in_channels)
    train, test = load_dataset(cfg.data.dataset, "train", **kw), load_dataset(cfg.data.dataset, "test", **kw)
    if min(len(train), len(test), n) < MIN_IMAGES:
        raise CheckpointError(f"fastdiff eval needs at least {MIN_IMAGES} training, held-out and generated images "
                              f"(precision/recall uses {PR_K} nearest neighbours); got {len(train)}, {len(test)} "
                              f"and --n {n}")
    return train, test


def real_reference(model: Classifier, train: ImageData, test: ImageData, n: int, device) -> dict:
    """Held-out features, the real-vs-real values at sample size n (FD_cls floor, KID, precision/recall of n
    training images against the held-out set), and the classifier's held-out accuracy. The sets are
    `evaluation_sets`' (checked there)."""
    test_f, test_logits = features_and_logits(model, test.float_images(), device)
    g = torch.Generator().manual_seed(1234)
    idx = torch.randperm(len(train), generator=g)[: min(n, len(train))]
    train_f, _ = features_and_logits(model, train.float_images()[idx], device)
    kid_floor, kid_floor_std = kid(train_f, test_f)
    test_radii = knn_radii(torch.as_tensor(test_f, dtype=torch.float64), PR_K)  # the real manifold, for every score
    precision_floor, recall_floor = precision_recall(test_f, train_f, k=PR_K, real_radii=test_radii)
    return {
        "test_features": test_f,
        "test_radii": test_radii,
        "floor": frechet_distance(train_f, test_f),
        "kid_floor": kid_floor, "kid_floor_std": kid_floor_std,
        "precision_floor": precision_floor, "recall_floor": recall_floor,
        "classifier_test_accuracy": float((test_logits.argmax(1) == test.labels).float().mean()),
    }


def score_samples(model: Classifier, samples: torch.Tensor, labels: torch.Tensor | None, reference: dict,
                  device) -> dict:
    """FD_cls, KID and precision/recall of float samples in [-1, 1] against the held-out set, each beside its
    real-vs-real value, and accuracy for their intended labels."""
    feats, logits = features_and_logits(model, samples.clamp(-1, 1), device)
    test_f = reference["test_features"]
    out = {"fd_cls": frechet_distance(feats, test_f), "fd_cls_floor": reference["floor"]}
    out["fd_ratio"] = out["fd_cls"] / max(reference["floor"], 1e-12)
    out["kid"], out["kid_std"] = kid(feats, test_f)
    out["kid_floor"], out["kid_floor_std"] = reference["kid_floor"], reference["kid_floor_std"]
    out["precision"], out["recall"] = precision_recall(test_f, feats, k=PR_K, real_radii=reference["test_radii"])
    out["precision_floor"], out["recall_floor"] = reference["precision_floor"], reference["recall_floor"]
    if labels is not None:
        out["cond_accuracy"] = float((logits.argmax(1) == labels.cpu()).float().mean())
    return out


def classifier_cache_dir(checkpoint_dir, cfg) -> Path:
    """Where the evaluation classifier is cached: --data-dir when given; a student's teacher run, so that their
    FD_cls compare; the run directory; for a checkpoint folder outside a run, the folder holding it. For a shipped
    model or a diffusers folder (`fastdiff export`'s), the user's cache (`user_cache_dir`): neither the installed
    package nor a folder that is no run is written to (the shipped classifier, which `load_or_train_classifier`
    reads from there, serves the default steps)."""
    if cfg.data.data_dir and Path(cfg.data.data_dir).is_dir():
        return Path(cfg.data.data_dir)
    if cfg.is_student:
        teacher = pinned_or_its_run(cfg.distill.teacher)  # the checkpoint it started from, or its run if pruned
        if teacher.startswith("pretrained:") or Path(teacher).exists():
            checkpoint_dir = resolve_checkpoint(teacher)
    from fastdiff.interop.diffusers import is_diffusers_folder

    if is_pretrained(checkpoint_dir) or is_diffusers_folder(checkpoint_dir):  # not a run's: not written into
        return user_cache_dir()
    path = Path(checkpoint_dir)
    return path.parent.parent if path.parent.name == CHECKPOINTS else path.parent


def evaluate_run(checkpoint, *, n: int = 1000, seed: int = 0, device=None, classifier_steps: int = CLASSIFIER_STEPS,
                 log=None, progress: bool = False, **sampling) -> dict:
    """Sample n images from a run and score them: FD_cls, its floor, and class-conditional accuracy.

    sampling: the overrides of `fastdiff.sampling.resolve_settings` (sampler, steps, guidance, eta, spacing, clip,
    batch_size, refiner, acceleration keys); None or absent is the run's own setting. progress: progress bars on
    stderr of the classifier's training where it is not cached yet, and of the sampling (`fastdiff.sampling.sample`).
    """
    n, classifier_steps = count("n", n), count("classifier_steps", classifier_steps)  # before minutes of training
    device = resolve_device(device)
    run = load_run(checkpoint, device)
    settings = resolve_settings(run, device, **sampling)  # bad settings fail before the classifier trains
    cfg = run.config
    if cfg.preset == "diffusers":  # load_diffusers' config of a folder without a fastdiff run's
        raise ConfigError(f"{run.path} is a diffusers folder that names no dataset to score it against; evaluate the "
                          "fastdiff run it came from, or a folder `fastdiff export` wrote (it keeps the run's config, "
                          "used while the folder's UNet and scheduler are still the run's)")
    train, test = evaluation_sets(cfg, n)
    if train.num_classes < 2:  # a cross-entropy of one class is 0: the classifier kept its random features
        raise DataError(f"{cfg.data.dataset} has {train.num_classes} class, and FD_cls, KID and precision/recall are "
                        "measured in the features of a classifier trained to tell its classes apart, which one class "
                        "cannot train; evaluate a dataset of 2 classes or more (an image folder's class folders)")
    if n > len(train) and log:  # the floor's training images number min(n, len(train)) (`real_reference`)
        log(f"the real-vs-real floors use all {len(train)} training images, fewer than --n {n}: they are measured "
            "at a smaller sample size than the scores, and FD's bias grows as the sample shrinks, so fd_ratio reads "
            "low (precision and recall also depend on the set sizes)")
    cache = classifier_cache_dir(run.path, cfg)
    classifier = load_or_train_classifier(train, cache, device, log, steps=classifier_steps, progress=progress)
    sizes = {f"--n {n}": n, f"the held-out set's {len(test)} images": len(test)}
    if len(train) < n:
        sizes[f"the floor's {len(train)} training images"] = len(train)
    small = [name for name, size in sizes.items() if size <= classifier.cfg.feature_dim]
    if small and log:  # a held-out set as small as that was as singular, without a word
        log(f"{' and '.join(small)} {'is' if len(small) == 1 else 'are'} not above the classifier's "
            f"{classifier.cfg.feature_dim} feature dimensions: "
            "the Fréchet distance's covariances are singular at that size, so FD_cls, its floor and fd_ratio are "
            "mostly the draw's chance; score at --n 1000 (with 1000 held-out images) to compare runs (the README's "
            "tables do)")
    ref = real_reference(classifier, train, test, n, device)
    res = sample(run, settings, n=n, seed=seed, progress=progress)
    result = {"checkpoint": run.path, "dataset": cfg.data.dataset, "n": n, "seed": seed, "sampler": settings.sampler,
              "steps": settings.steps, "eta": settings.eta, "spacing": settings.spacing, "clip": settings.clip,
              "guidance": settings.guidance if res.labels is not None else None, "refiner": settings.refiner}
    result.update(score_samples(classifier, res.images, res.labels, ref, device))
    result["classifier_test_accuracy"] = ref["classifier_test_accuracy"]
    result["images_per_sec"] = res.images_per_sec
    result["accel"] = settings.accel.describe()
    result["device"] = str(device)
    return result
