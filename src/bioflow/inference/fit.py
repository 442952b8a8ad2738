"""Does this input fit the training data? A fingerprint of the training images, and a score per input.

A network fails quietly on images unlike those it was trained on (another microscope, sample,
resolution, noise level). After training, bioflow describes the training images as the network
sees them by features of random patches (normalised as for the network):

- **intensity**: the 1st, 50th and 99th percentile of each channel (after the model's
  normalisation, so a pure intensity scaling is invisible to a model that normalises each image
  by its own percentiles, as it is to its network);
- **noise**: a robust estimate of each channel's pixel noise (the median absolute deviation of
  the difference of neighbouring pixels, relative to the patch's 1-99 percentile range);
- **content**: the mean of each feature map at the network's deepest level (``model.bottom``
  where the network has one, e.g. the U-Net; else each output channel's mean and spread),
  which sees structures at the scale of the receptive field.

The fingerprint holds the mean and a regularised covariance of these features over training
patches. An input's **score** is the mean Mahalanobis distance of its patches' features; the
**threshold**, chosen on the validation images, is the 99th percentile of scores of validation
images (and of random draws of validation patches, for few images), so about 1% of images like
the validation ones would be flagged. The **reason** named for a flagged input is the feature
group (intensity, noise, content) whose own distance is the most above what validation showed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

GROUPS = ("intensity", "noise", "content")
#: Patches drawn per image (fixed seed per image), and the most training images used.
PATCHES_PER_IMAGE = 16
MOST_IMAGES = 64


def _patch_size(task, spatial_shape: Sequence[int]) -> list[int]:
    """The model's training patch size (64 per axis where unknown), within the image."""
    config = getattr(task, "config", None) or {}
    wanted = list((config.get("data") or {}).get("patch_size") or [64] * len(spatial_shape))
    multiple = int(getattr(task, "size_multiple", 1) or 1)
    return [max(multiple, min(int(w), int(s)) // multiple * multiple) for w, s in zip(wanted, spatial_shape)]


def _content_features(task, batch: torch.Tensor) -> torch.Tensor:
    """Per patch, the mean of each feature map at the deepest level (or of each output channel)."""
    model = task.model
    deepest = getattr(model, "bottom", None)
    if deepest is None:
        out = task(batch).float()
        return torch.cat([out.mean(dim=tuple(range(2, out.ndim))), out.std(dim=tuple(range(2, out.ndim)))], dim=1)
    seen: list[torch.Tensor] = []
    handle = deepest.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        model(batch)
    finally:
        handle.remove()
    features = seen[-1].float()
    return features.mean(dim=tuple(range(2, features.ndim)))


def image_features(task, image: Any, seed: int = 0, patches: int = PATCHES_PER_IMAGE) -> tuple[np.ndarray, list[str]]:
    """Features ``(patches, F)`` of random patches of one raw channel-first image, and each feature's group."""
    image_shape = tuple(int(s) for s in image.shape[1:])
    size = _patch_size(task, image_shape)
    rng = np.random.default_rng(seed)
    norm = task.normalizer().norm_for(image)
    crops = []
    for _ in range(patches):
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(image_shape, size)]
        region = (slice(None), *(slice(a, a + p) for a, p in zip(start, size)))
        crops.append(np.asarray(norm(np.asarray(image[region], dtype=np.float32)), dtype=np.float32))
    batch = np.stack(crops)
    flat = batch.reshape(batch.shape[0], batch.shape[1], -1)
    low, mid, high = (np.percentile(flat, q, axis=2) for q in (1, 50, 99))
    step = np.diff(batch, axis=-1).reshape(batch.shape[0], batch.shape[1], -1)
    spread = np.maximum(high - low, 1e-6)
    noise = 1.4826 * np.median(np.abs(step - np.median(step, axis=2, keepdims=True)), axis=2) / np.sqrt(2) / spread
    device = next(task.parameters()).device
    with torch.no_grad():
        content = _content_features(task, torch.from_numpy(batch).to(device)).cpu().numpy()
    features = np.concatenate([low, mid, high, np.log(np.maximum(noise, 1e-6)), content], axis=1)
    channels = batch.shape[1]
    groups = ["intensity"] * (3 * channels) + ["noise"] * channels + ["content"] * content.shape[1]
    return features.astype(np.float64), groups


class FitReference:
    """The training data's fingerprint: feature mean, inverse covariance per group, thresholds."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.mean = np.asarray(record["mean"])
        self.groups = list(record["groups"])
        self.inverse = {g: np.asarray(m) for g, m in record["inverse"].items()}
        self.threshold = float(record["threshold"])
        self.group_thresholds = {g: float(v) for g, v in record["group_thresholds"].items()}

    def _distances(self, features: np.ndarray, group: str | None = None) -> np.ndarray:
        index = [i for i, g in enumerate(self.groups) if group is None or g == group]
        centred = features[:, index] - self.mean[index]
        inverse = self.inverse["all" if group is None else group]
        return np.sqrt(np.maximum(np.einsum("pi,ij,pj->p", centred, inverse, centred), 0.0) / len(index))

    def score(self, features: np.ndarray) -> dict[str, float]:
        """The image's score, and each group's, from its patches' features."""
        out = {"score": float(self._distances(features).mean())}
        for g in GROUPS:
            if g in self.inverse:
                out[g] = float(self._distances(features, g).mean())
        return out

    def verdict(self, features: np.ndarray) -> dict[str, Any]:
        """Score, threshold, whether the input fits, and the likely reason when it does not."""
        scores = self.score(features)
        fits = scores["score"] <= self.threshold
        ratios = {g: scores[g] / max(self.group_thresholds[g], 1e-9) for g in GROUPS if g in scores}
        reason = "" if fits else max(ratios, key=ratios.get)
        return {**scores, "threshold": self.threshold, "fits": fits, "reason": reason}

    @classmethod
    def fitted(cls, train: np.ndarray, groups: list[str], validation: list[np.ndarray]) -> "FitReference":
        """The fingerprint of training patch features ``train`` (P, F), its threshold from the
        validation images' patch features (a list of (P_i, F); training images when empty)."""
        mean = train.mean(axis=0)
        inverse = {}
        for g in ("all", *GROUPS):
            index = [i for i, name in enumerate(groups) if g == "all" or name == g]
            if not index:
                continue
            cov = np.atleast_2d(np.cov(train[:, index], rowvar=False))
            scale = np.trace(cov) / len(index) if np.trace(cov) > 0 else 1.0
            shrunk = 0.8 * cov + 0.2 * np.diag(np.diag(cov)) + 1e-3 * scale * np.eye(len(index))
            inverse[g] = np.linalg.inv(shrunk)
        reference = cls({"mean": mean.tolist(), "groups": groups, "inverse": {g: m.tolist() for g, m in inverse.items()},
                         "threshold": np.inf, "group_thresholds": {g: np.inf for g in GROUPS}})
        held = validation or [train]
        per_image = [reference.score(f) for f in held]
        pooled = np.concatenate(held)
        rng = np.random.default_rng(0)
        draws = [reference.score(pooled[rng.choice(len(pooled), PATCHES_PER_IMAGE)]) for _ in range(200)]
        keys = ["score", *[g for g in GROUPS if g in inverse]]
        limits = {k: float(max(np.percentile([s[k] for s in per_image], 99), np.percentile([s[k] for s in draws], 99)))
                  for k in keys}
        record = {**reference.record, "threshold": limits["score"],
                  "group_thresholds": {g: limits[g] for g in GROUPS if g in limits}}
        return cls(record)


def fit_reference(task, data) -> dict[str, Any] | None:
    """The fingerprint of a task's training images (a plain record for the checkpoint), or None."""
    train = data.splits["train"][:MOST_IMAGES]
    if not train:
        return None
    was_training = task.training
    task.eval()
    try:
        features, groups = [], None
        for i, record in enumerate(train):
            f, groups = image_features(task, record.image, seed=i)
            features.append(f)
        validation = [image_features(task, r.image, seed=10_000 + i)[0] for i, r in enumerate(data.splits["val"][:MOST_IMAGES])]
    finally:
        task.train(was_training)
    return FitReference.fitted(np.concatenate(features), groups, validation).record


def fit_verdict(task, image: Any) -> dict[str, Any] | None:
    """How one raw channel-first image fits the task's training data (:meth:`FitReference.verdict`),
    or None for a model without a fingerprint (written before the check, or a package)."""
    reference = getattr(task, "fit_reference", None)
    if reference is None:
        return None
    with torch.no_grad():
        return reference.verdict(image_features(task, image)[0])
