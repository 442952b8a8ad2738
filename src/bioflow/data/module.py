"""The Lightning data module: source -> checks -> split -> normalisation -> patches -> loaders."""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import lightning as L
from torch.utils.data import DataLoader, default_collate

from bioflow.data.augment import Augmenter, TargetKind
from bioflow.data.normalize import Normalizer, PercentileNorm
from bioflow.data.patches import PatchDataset, PatchIndex, WholeImageDataset
from bioflow.data.records import ImageRecord, check_informative, check_records, check_target_kind
from bioflow.data.views import select_channels
from bioflow.data.split import apply_split_names, split_names, split_records
from bioflow.config import component
from bioflow.errors import ConfigError, DataError
from bioflow.registry import registry
from bioflow.samplers.base import SeededSampler

log = logging.getLogger(__name__)


class BioflowDataModule(L.LightningDataModule):
    """Data for one task, built from the ``data`` and ``sampler`` sections of the config.

    Parameters
    ----------
    data
        The ``data`` section (source, split, patch size, loaders, normalisation, augmentation).
    sampler
        The ``sampler`` section: registry name plus keyword arguments.
    seed
        Seeds the patch draws and the augmentation.
    target_kind
        ``mask`` (label images), ``image`` (restoration targets) or ``none``.
    target_fn
        Converts a target patch into what the task trains on (e.g. instance labels to classes).
    split
        A recorded split (names per split) to reuse instead of drawing one, e.g. at evaluation.
    normalization
        A model's stored normalisation (:meth:`Normalizer.as_dict`) to apply instead of fitting one.
    task_name
        The task's name: when given, targets of the wrong kind for it are an error that says so.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        sampler: Mapping[str, Any],
        seed: int,
        target_kind: TargetKind = "mask",
        target_fn: Callable | None = None,
        split: Mapping[str, list[str]] | None = None,
        normalization: Mapping[str, Any] | None = None,
        task_name: str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = dict(data)
        self.sampler_cfg = dict(sampler)
        self.seed = seed
        self.target_kind = target_kind
        self.target_fn = target_fn
        #: Set by training: the task's loss target function for training batches (None: none).
        self.loader_target = None
        self.recorded_split = split
        #: The split that ``test_dataloader`` serves (``bioflow evaluate --split`` changes it).
        self.evaluation_split = "test"
        self.splits: dict[str, list[ImageRecord]] | None = None
        self.stored_normalization = normalization
        self._index: PatchIndex | None = None
        self.task_name = task_name
        self.normalizer: Normalizer | None = None
        #: Every record of the source (all splits), once read.
        self.records: list[ImageRecord] = []
        self._prepared = False

    # -- preparation, done once, before the model is built ---------------------------------
    def prepare(self) -> None:
        """Read the source, check it and split it (:meth:`read`), then, for a new model, check that
        the training data can teach something and index its patches; idempotent."""
        if self._prepared:
            return
        self.read()
        if self.recorded_split is None:  # a new model: can these images teach anything?
            check_informative(self.splits["train"], self.target_kind == "mask", self.target_fn)
            self.training_index()
        log.info(
            "data: %d train, %d val, %d test images",
            *(len(self.splits[s]) for s in ("train", "val", "test")),
        )
        self._prepared = True

    def read(self) -> None:
        """Read the source, check its records and split them; idempotent. What follows from the
        targets (``target_fn``) is not used yet, so a task can settle it from :attr:`records`."""
        if self.splits is not None:
            return
        name, kwargs = component(self.cfg["source"])
        records = registry.create("sources", name, where="data.source", **kwargs)
        if self.cfg.get("channels"):
            records = [select_channels(r, self.cfg["channels"]) for r in records]
        if self.task_name is not None:
            check_target_kind(records, self.target_kind, self.task_name)
        check_records(
            records, needs_target=self.target_kind in ("mask", "image"),
            allow_empty_targets=bool(self.cfg.get("allow_empty_masks", False)),
            mask_targets=self.target_kind == "mask",
        )
        self.records = records
        if self.recorded_split is not None:
            self.splits = apply_split_names(records, self.recorded_split)
        else:
            s = self.cfg["split"]
            self.splits = split_records(records, s["val"], s["test"], s["seed"], train=s.get("train"), by=s.get("by", "image"))
            if any("region" in r.meta for rs in self.splits.values() for r in rs):
                log.warning("data: too few images to hold whole images out; validation and test come from held-out "
                            "regions of each image (recorded in the run's split.json)")
        if self.stored_normalization is not None:
            self.normalizer = Normalizer.from_dict(self.stored_normalization, self.cfg["normalize"])
        else:
            self.normalizer = Normalizer.from_config(self.cfg["normalize"]).fitted([r.image for r in self.splits["train"]])
        dims = len(records[0].spatial_shape)
        patch = tuple(self.cfg["patch_size"])
        if len(patch) != dims:
            raise ConfigError(
                f"data.patch_size: {list(patch)} has {len(patch)} axes but the images have {dims} spatial axes"
            )

    @property
    def train_target_kind(self) -> TargetKind:
        """Targets used for training: optional (evaluation-only) targets are not."""
        return "none" if self.target_kind == "optional_image" else self.target_kind

    @property
    def split(self) -> dict[str, list[str]]:
        assert self.splits is not None, "call prepare() first"
        return split_names(self.splits)

    @property
    def in_channels(self) -> int:
        assert self.splits is not None, "call prepare() first"
        return self.splits["train"][0].channels

    @property
    def spatial_dims(self) -> int:
        assert self.splits is not None, "call prepare() first"
        return len(self.splits["train"][0].spatial_shape)

    @property
    def pixel_size(self) -> list[float] | None:
        assert self.splits is not None, "call prepare() first"
        size = self.splits["train"][0].pixel_size
        return None if size is None else [float(s) for s in size]

    def _norms(self, records: list[ImageRecord]) -> list[PercentileNorm]:
        return [self.normalizer.norm_for(r.image) for r in records]

    # -- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def training_index(self) -> PatchIndex:
        """The candidate training patches (those with enough foreground, if asked); built once."""
        if self._index is None:
            records = self.splits["train"]
            index = PatchIndex(records, tuple(self.cfg["patch_size"]),
                               to_classes=self.target_fn if self.target_kind == "mask" else None)
            min_fg = float(self.cfg.get("min_foreground", 0.0))
            if min_fg > 0:
                fractions = index.foreground_fractions()
                keep = fractions >= min_fg
                if keep.sum() < min(int(self.cfg["batch_size"]), len(index)) or not keep.any():
                    raise DataError(
                        f"data.min_foreground: only {int(keep.sum())} training patch position(s) have {min_fg:.0%} "
                        f"foreground or more (the best has {fractions.max():.1%}), fewer than one batch "
                        f"(data.batch_size={self.cfg['batch_size']}); lower it or enlarge data.patch_size"
                    )
                index.keep(keep)
            self._index = index
        return self._index

    def train_dataloader(self) -> DataLoader:
        records = self.splits["train"]
        index = self.training_index()
        name, kwargs = component(self.sampler_cfg)
        sampler = registry.create(
            "samplers", name, where="sampler", index=index, num_samples=self.cfg["patches_per_epoch"],
            seed=self.seed, **kwargs,
        )
        dataset = PatchDataset(
            index, self._norms(records), Augmenter(self.cfg.get("augment"), self.spatial_dims, self.train_target_kind),
            self.target_fn, use_targets=self.train_target_kind != "none",
        )
        collate = None if self.loader_target is None else WithLossTarget(self.loader_target)
        return self._loader(dataset, self.cfg["batch_size"], SeededSampler(sampler, self.seed), collate)

    def _whole(self, split: str) -> DataLoader:
        records = self.splits[split]
        dataset = WholeImageDataset(records, self._norms(records), self.target_fn)
        return self._loader(dataset, 1, _RankShard(len(dataset)))

    def val_dataloader(self) -> DataLoader:
        return self._whole("val")

    def val_dataloader_all(self) -> DataLoader:
        """Every validation image in this process, whatever the rank (for work done on each rank)."""
        return self.whole_images("val")

    def whole_images(self, split: str) -> DataLoader:
        """Every image of ``split``, whole and normalised, in this process whatever the rank."""
        records = self.splits[split]
        dataset = WholeImageDataset(records, self._norms(records), self.target_fn)
        return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return self._whole(self.evaluation_split)

    def _loader(self, dataset, batch_size: int, sampler, collate=None) -> DataLoader:
        workers = int(self.cfg["num_workers"])
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=False, collate_fn=collate,
        )


class WithLossTarget:
    """Collate training samples and add ``loss_target``, made from the batch's targets by the task's
    function (``BaseTask.loader_loss_target``) in the loader, beside the training step."""

    def __init__(self, make_target) -> None:
        self.make_target = make_target

    def __call__(self, samples):
        batch = default_collate(samples)
        batch["loss_target"] = self.make_target(batch["target"])
        return batch


class _RankShard:
    """Whole-image evaluation order for this rank: images rank, rank + world, ... (no padding).

    Unlike ``DistributedSampler`` nothing is repeated to even out the ranks, so no image counts
    twice in the synced metrics.
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def _share(self) -> range:
        from bioflow.samplers.base import rank_and_world

        rank, world = rank_and_world()
        return range(rank, self.n, world)

    def __len__(self) -> int:
        return len(self._share())

    def __iter__(self):
        return iter(self._share())
