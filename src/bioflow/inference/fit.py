"""Does this input fit the training data? A fingerprint of the training images, and a score per input.

A network fails quietly on images unlike those it was trained on (another microscope, sample,
resolution, noise level). bioflow describes images as the network sees them, by features of
windows of the training patch size taken from the tiles of a prediction (normalised as for the
network; :class:`FitObserver`), so checking an input costs a few reductions on top of predicting
it, not another pass of the network:

- **intensity**: the 1st, 50th and 99th percentile of each channel (after the model's
  normalisation, so a pure intensity scaling is invisible to a model that normalises each image
  by its own percentiles, as it is to its network);
- **noise**: a robust estimate of each channel's pixel noise (the median absolute deviation of
  the difference of neighbouring pixels, relative to the window's 1-99 percentile range);
- **content**: the mean of each feature map at the network's deepest level (a module named
  ``bottom``, e.g. the U-Net's; other networks: each output channel's mean and spread), which
  sees structures at the scale of the receptive field, and at its second encoder level where it
  has one (``encoders[1]``), which sees structures a few pixels wide, so that a resampled image
  (another pixel size) stands out more.

After training, the training images are predicted the same way to make the fingerprint.

The fingerprint holds the mean and a regularised covariance of these features over training
windows. An input's **score** is the mean Mahalanobis distance of its windows' features; the
**threshold** is the 99th percentile of the scores of images the fingerprint did not see: the
validation images, and each training image scored against the fingerprint of the others (the
larger of the empirical percentile and that of a log-normal fitted to the scores, as few images
say little about the tail), so about 1% of images like them would be flagged. The **reason** named for a flagged input is the feature
group (intensity, noise, content) whose own distance is the most above what validation showed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bioflow.inference.fit_windows import _on_grid, window_content, window_features, windows_samples

log = logging.getLogger(__name__)

GROUPS = ("intensity", "noise", "content")
#: Patches drawn per image (fixed seed per image), and the most training images used.
PATCHES_PER_IMAGE = 16
MOST_IMAGES = 64
#: At least this many training windows in all (more per image when there are few images).
MOST_WINDOWS = 128
#: Training images from which each is also scored against the fingerprint of the others.
LEAVE_ONE_OUT_FROM = 4
#: The features' definition; a fingerprint of another version is not used (no check).
FINGERPRINT_VERSION = 3


def _patch_size(task, spatial_shape: Sequence[int]) -> list[int]:
    """The model's training patch size (64 per axis where unknown), within the image."""
    config = getattr(task, "config", None) or {}
    wanted = list((config.get("data") or {}).get("patch_size") or [64] * len(spatial_shape))
    if len(wanted) == 1:
        wanted = wanted * len(spatial_shape)
    return [max(1, min(int(w), int(s))) for w, s in zip(wanted, spatial_shape)]


def _deepest(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None, bool]:
    """The modules whose outputs describe content: the network's deepest level (a module named
    ``bottom``, e.g. the U-Net's, also inside a wrapper such as StarDist's) and, where it has one,
    its second encoder level beside it (``encoders[1]``, at half the resolution: structures the
    size of a few pixels, where a resampled image differs most); else the whole network (its
    output channels) and None. The flag says whether it is the deepest level."""
    for name, module in model.named_modules():
        if name == "bottom" or name.endswith(".bottom"):
            parent = model.get_submodule(name[: -len("bottom")].rstrip(".")) if name != "bottom" else model
            encoders = getattr(parent, "encoders", None)
            fine = encoders[1] if isinstance(encoders, torch.nn.ModuleList) and len(encoders) > 1 else None
            return module, fine, True
    return model, None, False


class FitUnavailable(Exception):
    """The task's prediction does not go through the shared tiled predictor, so nothing was observed."""


class FitObserver:
    """Collects fit features from a prediction as it runs, at the cost of a few small reductions.

    While active (``with FitObserver(task) as seen:`` around ``task.predict_array``), it keeps the
    normalised tiles the predictor reads and catches the deepest level's activations of their
    (first, untransformed) forward pass. In each tile it places windows of the training patch size
    at random (seeded) positions inside the image, and keeps a uniform random sample of
    ``windows`` of them over the whole image (reservoir sampling: only windows kept at the time
    are measured). Training images are described the same way (:func:`image_features`), so a
    window's features mean the same at training and prediction, whatever the tiling.
    """

    def __init__(self, task, seed: int = 0, windows: int = PATCHES_PER_IMAGE) -> None:
        self.task = task
        networks = [task.model]  # and the copy that predicts without gradients, where the task has one
        if hasattr(task, "inference_network"):
            networks.append(task.inference_network())
        found = [_deepest(n) for n in networks]
        self.modules = list({id(m): m for m, _, _ in found}.values())
        self.fine_modules = list({id(f): f for _, f, _ in found if f is not None}.values())
        self.is_deepest = found[0][2]
        self.fine: torch.Tensor | None = None  # the finer level's output of the forward under way
        self.rng = np.random.default_rng(seed)
        from bioflow.inference.tiling import context_margin

        self.margin = context_margin(task.receptive_field()) if hasattr(task, "receptive_field") else 0
        self.windows = windows
        # per kind of window (with the network's full context or not): (samples, content) per window kept
        self.reservoirs: dict[bool, dict[str, Any]] = {True: {"kept": [], "seen": 0}, False: {"kept": [], "seen": 0}}
        self.seconds = 0.0  # spent measuring windows (not predicting)
        self.pending: list[tuple[tuple[int, ...], torch.Tensor, tuple[int, ...]]] = []
        self.handles: list = []
        self.expected: tuple | None = None  # see expect()

    def __enter__(self) -> "FitObserver":
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        self.handles += [m.register_forward_hook(self._fine_hook) for m in self.fine_modules]
        self.task._fit_observer = self
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.task._fit_observer = None
        self.pending.clear()
        self.fine = None

    def _fine_hook(self, module, args, out) -> None:
        # runs before the deepest level in the same forward; kept only while tiles are pending
        self.fine = (out[0] if isinstance(out, (tuple, list)) else out) if self.pending else None

    def expect(self, image: torch.Tensor) -> None:
        """Watch the next tiled prediction of this very tensor (its memory and shape) only: an
        evaluation also predicts masked or otherwise changed copies of its image."""
        self.expected = (image.data_ptr(), tuple(image.shape), tuple(image.stride()))

    def watch_if_expected(self, image: torch.Tensor):
        """:meth:`watch` for the prediction of ``image`` if it is the one expected (once), else None."""
        if self.expected is None or self.expected != (image.data_ptr(), tuple(image.shape), tuple(image.stride())):
            return None
        self.expected = None
        return self.watch

    def watch(self, read, image_shape: Sequence[int]):
        """The predictor's tile reader, noting each tile it reads (and where) for the next forward."""
        shape = tuple(int(s) for s in image_shape)

        def watched(corner, size):
            tile = read(corner, size)
            self.pending.append((tuple(int(a) for a in corner), tile, shape))
            return tile

        return watched

    def _hook(self, module, args, out) -> None:
        if not self.pending:  # a further (augmented) pass over the same tiles
            return
        start = time.perf_counter()
        out = out[0] if isinstance(out, (tuple, list)) else out
        if self.fine is not None and self.fine.shape[0] == out.shape[0]:
            # the finer level averaged onto the deepest level's cells: one set of maps, one window grid
            out = torch.cat([out.detach().float(), _on_grid(self.fine, out.shape[2:])], dim=1)
        self.fine = None
        for (corner, tile, shape), activations in zip(self.pending, out):
            self._take(corner, tile, shape, activations)
        self.pending.clear()
        self.seconds += time.perf_counter() - start

    def _take(self, corner, tile: torch.Tensor, shape, activations: torch.Tensor) -> None:
        tile_shape = tuple(tile.shape[1:])
        valid = [max(1, min(t, s - a)) for a, t, s in zip(corner, tile_shape, shape)]
        scale = [max(1, t // f) for t, f in zip(tile_shape, activations.shape[1:])]
        # windows where the tile has the network's full context: away from the tile's edges inside
        # the image (at the image's own edges every tiling sees the same padding); a tile too small
        # for a window there keeps its whole valid part
        low = [self.margin if a > 0 else 0 for a in corner]
        high = [v - (self.margin if a + t < s else 0) for a, t, s, v in zip(corner, tile_shape, shape, valid)]
        size = _patch_size(self.task, valid)
        full = all(h - lo >= min(p, v) for lo, h, p, v in zip(low, high, size, valid))
        if not full:  # used only when no tile of the image has room for a window with full context
            low, high = [0] * len(valid), list(valid)
        reservoir = self.reservoirs[full]
        offset = [-(-lo // g) for lo, g in zip(low, scale)]  # first whole activation cell inside
        inner = [max(1, (h - o * g)) for h, o, g in zip(high, offset, scale)]
        cells = [max(1, min(p, n) // g) for p, n, g in zip(size, inner, scale)]  # window, in activation cells
        room = [max(1, n // g) for n, g in zip(inner, scale)]
        # as many windows as fit side by side, and at least this tile's share of ``windows`` (they
        # may overlap then), so that a small image is described by as many windows as a large one
        share = self.windows * float(np.prod(valid)) / max(1.0, float(np.prod(shape)))
        count = max(1, int(np.prod([r / c for r, c in zip(room, cells)])), int(np.ceil(share)))
        chosen: dict[int, list[int]] = {}  # reservoir slot -> window corner, in activation cells
        for _ in range(count):
            n = reservoir["seen"]
            reservoir["seen"] += 1
            slot = n if n < self.windows else int(self.rng.integers(0, n + 1))
            starts = [o + int(self.rng.integers(0, max(0, r - c) + 1)) for o, r, c in zip(offset, room, cells)]
            if slot < self.windows:  # a later window of this tile in the same slot replaces the earlier
                chosen[slot] = starts
        if not chosen:
            return
        slots = sorted(chosen)
        # windows at the same place (a tile with room for one window gets its share all there)
        # are measured once
        places: dict[tuple[int, ...], int] = {}
        inverse = [places.setdefault(tuple(chosen[slot]), len(places)) for slot in slots]
        corners = np.array(list(places), dtype=np.int64)
        content = window_content(activations, corners, cells, spread=not self.is_deepest)
        host = tile.detach().float().cpu().numpy()  # the tile on the host once, for all its windows
        # windows clipped by the image's edge are smaller: measured by shape
        pixel_low = corners * np.array(scale)
        pixel_high = np.minimum((corners + np.array(cells)) * np.array(scale), np.array(valid))
        boxes = [tuple(int(b) for b in box) for box in pixel_high - pixel_low]
        samples: list[np.ndarray | None] = [None] * len(corners)
        for box in set(boxes):
            members = [i for i, b in enumerate(boxes) if b == box]
            for i, measured in zip(members, windows_samples(host, pixel_low[members], box)):
                samples[i] = measured
        for slot, at in zip(slots, inverse):
            kept = (samples[at], content[at])
            if slot < len(reservoir["kept"]):
                reservoir["kept"][slot] = kept
            else:
                reservoir["kept"].append(kept)

    @property
    def kept(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The windows measured: those with the network's full context, else (tiles too small for
        any) the others, and then :attr:`full_context` is False."""
        return self.reservoirs[True]["kept"] or self.reservoirs[False]["kept"]

    @property
    def full_context(self) -> bool:
        return bool(self.reservoirs[True]["kept"])

    def features(self) -> tuple[np.ndarray, list[str]]:
        """Features ``(windows, F)`` of the windows kept, and each feature's group."""
        if not self.kept:
            raise FitUnavailable("the prediction read no tiles through the task's tile reader")
        # windows measured once and kept several times (same place) are described once
        first: dict[int, int] = {}
        at = [first.setdefault(id(samples), len(first)) for samples, _ in self.kept]
        unique = [self.kept[at.index(i)] for i in range(len(first))]
        samples, content = (np.stack(part) for part in zip(*unique))
        features = window_features(samples, content)[at]
        channels = samples.shape[1]
        groups = ["intensity"] * (3 * channels) + ["noise"] * channels + ["content"] * content.shape[1]
        return features, groups

    def verdict(self) -> dict[str, Any] | None:
        """How the image predicted fits the task's training data (None: the model has no fingerprint)."""
        reference = getattr(self.task, "fit_reference", None)
        if reference is None or not self.kept:
            return None
        start = time.perf_counter()
        verdict = reference.verdict(self.features()[0])
        if not self.full_context:
            log.warning("fit check: the tiles leave no room for windows of the training patch size with the network's "
                        "full context; the check may flag inputs that fit (predict with a larger --tile-size)")
        return {**verdict, "seconds": self.seconds + time.perf_counter() - start}  # what the check cost


def image_features(task, image: Any, seed: int = 0, patches: int = PATCHES_PER_IMAGE) -> tuple[np.ndarray, list[str]]:
    """Features ``(patches, F)`` of windows of one raw channel-first image as a prediction sees
    them (:class:`FitObserver`; the image is predicted, its outputs dropped), and each feature's group."""
    with FitObserver(task, seed=seed, windows=patches) as seen, torch.no_grad():
        task.predict_array(image, sink=lambda start, block: None)
    return seen.features()


class FitReference:
    """The training data's fingerprint: feature mean, inverse covariance per group, thresholds."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.mean = np.asarray(record["mean"])
        self.groups = list(record["groups"])
        self.inverse = {g: np.asarray(m) for g, m in record["inverse"].items()}
        self.threshold = float(record["threshold"])
        self.group_thresholds = {g: float(v) for g, v in record["group_thresholds"].items()}
        # products on PyTorch's threads, which run anyway: NumPy's BLAS would wake a pool of its own
        # per image, spinning on the cores the next prediction needs (where NumPy was loaded before
        # bioflow set its wait). Each inverse is factored (``L L^T``, in float64) so that a distance
        # is a sum of squares of ``x L``, which float32 computes without cancellation and several
        # times faster; the groups' factors sit on one block diagonal beside the whole one: one product.
        size = len(self.groups)
        self._scored = [g for g in GROUPS if g in self.inverse]
        blocks = torch.zeros(size, size, dtype=torch.float64)
        members = torch.zeros(2 * size, 1 + len(self._scored), dtype=torch.float64)  # factor column -> distance
        members[:size, 0] = 1.0 / size
        for j, g in enumerate(self._scored):
            index = torch.tensor([i for i, name in enumerate(self.groups) if name == g])
            blocks[index[:, None], index[None, :]] = _factor(self.inverse[g])
            members[size + index, 1 + j] = 1.0 / len(index)
        self._factors = torch.cat([_factor(self.inverse["all"]), blocks], dim=1).float()
        self._members = members.float()

    def _distances(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per window ``features (W, F)``: the Mahalanobis distance over all features (W,), and
        within each scored group (W, groups), each per feature (divided by the number of features)."""
        centred = torch.from_numpy(np.asarray(features - self.mean, dtype=np.float32))
        squared = ((centred @ self._factors).square() @ self._members).sqrt().numpy().astype(np.float64)
        return squared[:, 0], squared[:, 1:]

    def score(self, features: np.ndarray) -> dict[str, float]:
        """The image's score, and each group's, from its patches' features."""
        every, per_group = self._distances(features)
        return {"score": float(every.mean()), **{g: float(per_group[:, j].mean()) for j, g in enumerate(self._scored)}}

    def verdict(self, features: np.ndarray) -> dict[str, Any]:
        """Score, threshold, whether the input fits, and the likely reason when it does not.

        It does not fit when its score, or one group's, is above its threshold: a shift in a few
        features of one group (e.g. content) is diluted in the score over all features."""
        scores = self.score(features)
        ratios = {g: scores[g] / max(self.group_thresholds[g], 1e-9) for g in GROUPS if g in scores}
        fits = scores["score"] <= self.threshold and all(r <= 1 for r in ratios.values())
        reason = "" if fits else max(ratios, key=ratios.get)
        return {**scores, "threshold": self.threshold, "fits": fits, "reason": reason}

    @classmethod
    def _untested(cls, train: np.ndarray, groups: list[str]) -> "FitReference":
        """Mean and inverse (shrunk) covariances of windows' features ``train`` (P, F), no thresholds yet."""
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
        return cls({"mean": mean.tolist(), "groups": groups, "inverse": {g: m.tolist() for g, m in inverse.items()},
                    "threshold": np.inf, "group_thresholds": {g: np.inf for g in GROUPS}})

    @classmethod
    def fitted(cls, train: np.ndarray | list[np.ndarray], groups: list[str], validation: list[np.ndarray]) -> "FitReference":
        """The fingerprint of the training images' window features (a list of (P_i, F), or one
        array), with thresholds from images it did not see: the validation images, and each
        training image scored by the fingerprint of the others. The threshold is the larger of
        the 99th percentile of these scores and a log-normal fit's 99th percentile (few images
        say little about the tail). With fewer than 4 training images, sets of held-out windows
        stand in as well; their tail and the unseen images' are taken apart, and the larger kept."""
        images = list(train) if isinstance(train, list) else [np.asarray(train)]
        reference = cls._untested(np.concatenate(images), groups)
        unseen = [reference.score(f) for f in validation]  # whole images it did not see
        windows: list[dict[str, float]] = []  # stand-ins where there are too few of those
        rng = np.random.default_rng(0)
        if len(images) >= LEAVE_ONE_OUT_FROM:  # with fewer, a fingerprint of the others is too thin to judge by
            for i in range(len(images)):
                others = cls._untested(np.concatenate(images[:i] + images[i + 1:]), groups)
                n = len(images[i])  # scored as an input is: an image's worth of its windows
                subsets = [images[i]] if n <= PATCHES_PER_IMAGE else [
                    images[i][rng.choice(n, PATCHES_PER_IMAGE, replace=False)] for _ in range(4)]
                unseen += [others.score(subset) for subset in subsets]
        elif len(np.concatenate(images)) >= 4 * PATCHES_PER_IMAGE:
            # few images: windows held out instead (two halves, each scored by a fingerprint of the
            # other in random sets of an image's worth of windows); blind to how images differ
            pooled = np.concatenate(images)
            order = rng.permutation(len(pooled))
            halves = [pooled[order[: len(order) // 2]], pooled[order[len(order) // 2:]]]
            for own, other in ((0, 1), (1, 0)):
                fingerprint = cls._untested(halves[other], groups)
                windows += [fingerprint.score(halves[own][rng.choice(len(halves[own]), PATCHES_PER_IMAGE, replace=False)])
                            for _ in range(50)]
        if len(unseen) + len(windows) < 3:
            pooled = np.concatenate(validation or images)
            windows += [reference.score(pooled[rng.choice(len(pooled), PATCHES_PER_IMAGE)]) for _ in range(200)]
        keys = ["score", *[g for g in GROUPS if g in reference.inverse]]
        # each kind on its own: a few held-out images must not be drowned by many sets of windows,
        # which are alike (windows of the same images) and so score low
        limits = {k: max(_upper_tail([h[k] for h in kind]) for kind in (unseen, windows) if kind) for k in keys}
        held = unseen + windows
        record = {**reference.record, "threshold": limits["score"],
                  "group_thresholds": {g: limits[g] for g in GROUPS if g in limits}, "held_out_images": len(held),
                  "version": FINGERPRINT_VERSION}
        return cls(record)


def _factor(inverse: Any) -> torch.Tensor:
    """``L`` with ``L L^T`` the (symmetric, positive definite) inverse covariance, in float64."""
    matrix = torch.as_tensor(np.asarray(inverse, dtype=np.float64))
    return torch.linalg.cholesky((matrix + matrix.T) / 2)


def _upper_tail(values: Sequence[float], z: float = 2.326) -> float:
    """The 99th percentile of scores of held-out images: empirical, or of a log-normal fitted to
    them, whichever is larger (the fit only from 8 images on: from fewer its spread is noise)."""
    values = np.maximum(np.asarray(values, np.float64), 1e-12)
    empirical = float(np.percentile(values, 99))
    if len(values) < 8:
        return empirical
    logs = np.log(values)
    return max(empirical, float(np.exp(logs.mean() + z * logs.std(ddof=1))))


def fit_reference(task, data) -> dict[str, Any] | None:
    """The fingerprint of a task's training images (a plain record for the checkpoint), or None."""
    train = data.splits["train"][:MOST_IMAGES]
    if not train:
        return None
    was_training = task.training
    task.eval()
    try:
        features, groups = [], None
        per_image = max(PATCHES_PER_IMAGE, -(-MOST_WINDOWS // len(train)))  # few images: more windows of each
        for i, record in enumerate(train):
            f, groups = image_features(task, record.image, seed=i, patches=per_image)
            features.append(f)
        validation = [image_features(task, r.image, seed=10_000 + i)[0] for i, r in enumerate(data.splits["val"][:MOST_IMAGES])]
    except FitUnavailable as why:
        log.warning("no fit check for this model: %s", why)
        return None
    finally:
        task.train(was_training)
    return FitReference.fitted(features, groups, validation).record


def fit_verdict(task, image: Any) -> dict[str, Any] | None:
    """How one raw channel-first image fits the task's training data (:meth:`FitReference.verdict`),
    or None for a model without a fingerprint (written before the check, or a package)."""
    reference = getattr(task, "fit_reference", None)
    if reference is None:
        return None
    return reference.verdict(image_features(task, image)[0])


#: Written beside the outputs: how well each input fits the model's training data.
FIT_REPORT = "fit_report.csv"


def write_fit_report(path: Path, rows: list[dict[str, Any]]) -> None:
    """The inputs' fit to the training data as CSV (written under a hidden name, then renamed);
    rows of other files from an earlier prediction into the same folder are kept."""
    import csv

    columns = ["file", "score", "threshold", "fits", "reason", "intensity", "noise", "content"]
    ours = {str(row["file"]) for row in rows}
    earlier = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            earlier = [r for r in csv.DictReader(fh) if r.get("file") not in ours]
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(earlier)
        writer.writerows({c: f"{row[c]:.4g}" if isinstance(row.get(c), float) else row.get(c, "") for c in columns}
                         for row in rows)
    os.replace(partial, path)
