"""StarDist: nucleus instance segmentation with star-convex polygons (Schmidt et al., 2018).

For every pixel (on a grid, optionally subsampled) the network predicts the probability that it
lies inside an object, scaled by its distance to the object's boundary, and the distances to that
boundary along ``n_rays`` directions. Each pixel above a probability threshold proposes a polygon;
non-maximum suppression keeps the best non-overlapping ones. Touching and overlapping nuclei stay
apart, which dense semantic segmentation cannot do.

Targets are computed from the augmented instance labels of each batch on the training device
(ray distances with torch; the normalised distance transform with SciPy on the CPU). After
training, the probability and overlap thresholds are optimised on the validation split and stored
in the model.
"""

from __future__ import annotations

import functools

import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence

import numpy as np
import torch

from bioflow.errors import ConfigError, check_range
from bioflow.inference.outputs import OutputSpec, PredictionSession
from bioflow.metrics.instance import InstanceMatchingMetric
from bioflow.metrics.matching import DEFAULT_THRESHOLDS, match_dataset, match_instances
from bioflow.registry import registry
from bioflow.stardist.model import GridStem, StarDistNet
from bioflow.stardist.targets import object_probabilities, star_distances_batch
from bioflow.tasks.base import BaseTask
from bioflow.tasks.exchange import TASK_STATE, PackageOutput

log = logging.getLogger(__name__)

#: IoU thresholds whose mean accuracy selects the thresholds and the best checkpoint.
SELECTION_TAUS = (0.3, 0.5, 0.7)
#: Probability thresholds tried first (then refined around the best); overlap thresholds tried.
PROB_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
NMS_GRID = (0.3, 0.4, 0.5)


def stardist_loss_target(labels: torch.Tensor, n_rays: int, grid: Sequence[int]) -> torch.Tensor:
    """The loss target of a batch of label patches ``(N, H, W)`` (-1: padding): ``(N, 2 + R, H', W')``
    with the object probability, the ray distances and the validity, on the labels' device."""
    gy, gx = grid
    valid = (labels != -1)[:, ::gy, ::gx]
    labels = labels.clamp(min=0)
    dists = star_distances_batch(labels, n_rays, grid).permute(0, 3, 1, 2)
    prob = torch.stack([object_probabilities(lab, grid) for lab in labels])
    return torch.cat([prob[:, None], dists, valid[:, None].to(dists.dtype)], dim=1)


def metric_key(key: str) -> str:
    """``accuracy@0.5`` -> ``accuracy_0.5`` (MLflow metric names cannot hold ``@``)."""
    return key.replace("@", "_")


class StarDistTask(BaseTask):
    """StarDist 2D on top of any registered backbone (U-Net by default).

    Settings (``task`` section): ``n_rays``, ``grid`` (output subsampling), ``pool_first`` (pool
    to the grid before the backbone, which then runs at the grid's resolution), ``stem_channels``
    (channels of that pooling stem), ``features`` (channels the backbone hands to the head),
    ``head_features`` (channels of the head's 3×3 convolution), ``prob_thresh``, ``nms_thresh``,
    ``criterion`` (``min_area`` or ``iou``), ``optimize_thresholds``, ``monitor``, ``monitor_mode``.
    """

    target_kind: ClassVar[str] = "mask"
    bioflow_targets: ClassVar[tuple[str, ...]] = ("stardist",)
    #: The data this task takes (2D images; :class:`~bioflow.tasks.stardist3d.StarDist3DTask` takes volumes).
    bioflow_spatial_dims: ClassVar[tuple[int, ...]] = (2,)
    #: The registered post-processor that turns predictions into labels.
    postprocessor_name: ClassVar[str] = "stardist_nms"
    headline_metrics: ClassVar[tuple[str, ...]] = ("test/accuracy_0.5", "test/accuracy_0.7", "test/f1_0.5",
                                                   "test/panoptic_quality_0.5")
    #: Values of settings added later, for models saved before they existed (the network then
    #: is rebuilt as it was trained).
    legacy_settings: ClassVar[dict[str, Any]] = {"pool_first": False, "head_features": 32}
    exchange_title: ClassVar[str] = "StarDist"
    citations: ClassVar[tuple[dict[str, str], ...]] = (
        {"text": "Schmidt, Weigert, Broaddus and Myers. Cell Detection with Star-Convex Polygons. MICCAI 2018",
         "doi": "10.1007/978-3-030-00934-2_30"},)
    exchange_tags: ClassVar[tuple[str, ...]] = ("instance-segmentation", "stardist", "nuclei")
    caveat: ClassVar[str] = (
        "StarDist assumes star-convex objects (nuclei and similar): other shapes are cut into star-convex pieces "
        "or merged. Objects much larger than the receptive field are not found whole.")

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any], inference: bool = False, *,
                 n_rays: int = 32, grid: Sequence[int] = (2, 2), pool_first: bool = True, stem_channels: int = 32,
                 features: int = 32, head_features: int = 128, prob_thresh: float = 0.5, nms_thresh: float = 0.4,
                 criterion: Literal["min_area", "iou"] = "min_area", optimize_thresholds: bool = True,
                 monitor: str = "val/mean_accuracy", monitor_mode: Literal["max", "min"] = "max") -> None:
        self.check_dimensions(data_info, grid)
        check_range("task.prob_thresh", prob_thresh, low=0.0, high=1.0, low_open=True, high_open=True,
                    allowed="a probability in (0, 1)")
        check_range("task.nms_thresh", nms_thresh, low=0.0, high=1.0, allowed="an overlap in [0, 1]")
        check_range("task.n_rays", n_rays, low=3, allowed="a number of rays >= 3")
        for key, value in (("features", features), ("stem_channels", stem_channels)):
            check_range(f"task.{key}", value, low=1, allowed="a number of channels >= 1")
        check_range("task.head_features", head_features, low=0, allowed="a number of channels >= 0 (0: no head convolution)")
        super().__init__(config, data_info, inference)
        # Thresholds live in the state dict, so the optimised values travel with the checkpoint.
        self.register_buffer("thresholds", torch.tensor([float(prob_thresh), float(nms_thresh)]))
        dims = self.bioflow_spatial_dims[0]  # volumes are matched as a whole, never plane by plane
        self.metrics = torch.nn.ModuleDict({
            "val": InstanceMatchingMetric(SELECTION_TAUS, spatial_dims=dims),
            "test": InstanceMatchingMetric(DEFAULT_THRESHOLDS, spatial_dims=dims),
        })

    @classmethod
    def check_dimensions(cls, data_info: Mapping[str, Any], grid: Sequence[int]) -> None:
        dims = cls.bioflow_spatial_dims[0]
        if data_info["spatial_dims"] != dims:
            other = "task=stardist3d" if dims == 2 else "task=stardist"
            raise ConfigError(f"task: this StarDist task is {dims}D and the data are {data_info['spatial_dims']}D "
                              f"(use {other})")
        if len(grid) != dims or min(int(g) for g in grid) < 1:
            raise ConfigError(f"task.grid: {dims} positive integers, got {list(grid)}")

    # -- network ------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(int(g) for g in self.task_settings["grid"])  # type: ignore[return-value]

    @property
    def n_rays(self) -> int:
        return int(self.task_settings["n_rays"])

    def out_channels(self) -> int:
        return int(self.task_settings["features"])

    def build_model(self) -> torch.nn.Module:
        s = self.task_settings
        stem = None
        if s["pool_first"] and any(g > 1 for g in self.grid):
            stem = GridStem(self.data_info.in_channels, int(s["stem_channels"]), self.grid)
        in_channels = int(s["stem_channels"]) if stem is not None else self.data_info.in_channels
        backbone = super().build_model(in_channels, self.out_channels())
        return StarDistNet(backbone, self.out_channels(), self.n_rays, self.grid, int(s["head_features"]), stem)

    def output_stride(self) -> tuple[int, ...]:
        return self.grid

    # -- targets -------------------------------------------------------------------------------
    def loss_target(self, labels: torch.Tensor) -> torch.Tensor:
        """``(N, 2 + R, H', W')``: object probability, ray distances and validity, on the labels' device."""
        return stardist_loss_target(labels, self.n_rays, self.grid)

    def loader_loss_target(self):
        # The targets (about 15 ms per batch of four 128² patches on one CPU thread, more as many
        # small kernels on a GPU) are made by the data loader's workers, beside the training step.
        return functools.partial(stardist_loss_target, n_rays=self.n_rays, grid=self.grid)

    # -- predictions -------------------------------------------------------------------------------
    def nms_arguments(self) -> dict[str, Any]:
        """Arguments of the post-processor besides thresholds, grid and shape."""
        return {}

    def nms(self, shape: Sequence[int] | None = None, prob_thresh: float | None = None, nms_thresh: float | None = None):
        """The registered post-processor (``stardist_nms``) with this model's thresholds."""
        return registry.create(
            "postprocessors", self.postprocessor_name, where="task",
            prob_thresh=float(self.thresholds[0]) if prob_thresh is None else prob_thresh,
            nms_thresh=float(self.thresholds[1]) if nms_thresh is None else nms_thresh,
            criterion=self.task_settings["criterion"], grid=list(self.grid),
            shape=None if shape is None else list(shape), **self.nms_arguments(),
        )

    @staticmethod
    def activate(output: torch.Tensor) -> torch.Tensor:
        """Raw output -> (probability, non-negative distances)."""
        return torch.cat([torch.sigmoid(output[:1]), output[1:].clamp(min=0)])

    def decode(self, output: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The label image of one raw output, by the ``stardist_nms`` post-processor."""
        return torch.from_numpy(self.nms(shape)(self.activate(output).detach().cpu()))

    def evaluate_image(self, stage: str, batch: dict[str, Any]) -> None:
        image, labels = batch["image"][0], batch["target"][0]
        output = self.predict_image(image)
        self.mean_loss[stage].update(self.loss_fn(output[None], self.loss_target(labels[None])))
        prediction = self.decode(output, labels.shape)
        self.metrics[stage].update(labels.cpu().numpy(), prediction.numpy())
        if self.wants_figure_sample(stage):
            stats = match_instances(labels.cpu().numpy(), prediction.numpy(), [0.5])[0.5]
            scores = {"accuracy@0.5": stats.accuracy, "objects": float(stats.n_pred), "true": float(stats.n_true)}
            self.collect_figure_sample(stage, batch, image, labels, prediction, scores)

    def log_metrics(self, stage: str) -> None:
        scores = {metric_key(k): v for k, v in self.metrics[stage].compute().items()}
        self.log_scores(stage, scores)
        self.metrics[stage].reset()

    def tta_channel_map(self):
        return _ray_permutation_map(self.n_rays)

    def spread_quantity(self, raw: torch.Tensor) -> torch.Tensor:
        """``--tta-spread`` measures how the object probability varies (on the grid)."""
        return torch.sigmoid(raw[:, :1].float())

    def prediction_outputs(self) -> list[OutputSpec]:
        # the label image, and a table of its objects (label, probability, size, centroid)
        return [OutputSpec("labels", None, np.int32, streamed=False), OutputSpec("objects", None, None, False, table=True)]

    def prediction_session(self, shape, workdir=None) -> PredictionSession:
        return _StarDistSession(self, tuple(shape), workdir)

    # -- model exchange ---------------------------------------------------------------------------------
    def package_outputs(self) -> list[PackageOutput]:
        return [PackageOutput("prob", ["object_probability"], [{"id": "sigmoid"}], "object probability on the grid"),
                PackageOutput("dist", [f"ray{i}" for i in range(self.n_rays)], [{"id": "clip", "kwargs": {"min": 0.0}}],
                              "distances to the object boundary along each ray (full-resolution pixels)")]

    def package_notes(self) -> list[str]:
        grid = "x".join(str(g) for g in self.grid)
        shapes = "polyhedra" if len(self.grid) == 3 else "polygons"
        return [f"Outputs: object probability and {self.n_rays} ray distances on a grid of {grid} pixels (the outputs are "
                f"{grid} times smaller than the input). The star-convex {shapes} need StarDist's non-maximum "
                "suppression, which the format cannot express: its thresholds, rays and grid are in `config.stardist`; "
                "`bioflow predict` runs it and writes label images."]

    def package_config(self) -> dict[str, Any]:
        """StarDist's post-processing parameters, in the layout of StarDist's own exporter."""
        prob, nms = (float(t) for t in self.thresholds)
        dims = len(self.grid)
        config = {"n_dim": dims, "axes": "ZYXC"[-dims - 1:], "n_channel_in": self.data_info.in_channels,
                  "n_channel_out": 1 + self.n_rays, "n_rays": self.n_rays, "grid": list(self.grid),
                  "nms_criterion": self.task_settings["criterion"], "backbone": "unet", "exported_by": "bioflow",
                  **{k: v for k, v in self.nms_arguments().items() if k != "n_rays"}}
        return {"stardist": {"thresholds": {"prob": prob, "nms": nms}, "config": config}}

    def load_package_config(self, package: Mapping[str, Any]) -> None:
        super().load_package_config(package)
        thresholds = (package.get("stardist") or {}).get("thresholds")
        if not (package.get("bioflow") or {}).get(TASK_STATE) and thresholds:  # packages without a task state
            self.thresholds.copy_(torch.tensor([float(thresholds["prob"]), float(thresholds["nms"])]))

    # -- after training ------------------------------------------------------------------------------
    def after_fit(self, data) -> dict[str, float]:
        """Choose ``prob_thresh`` and ``nms_thresh`` on the validation split (mean accuracy at IoU 0.3/0.5/0.7)."""
        if not self.task_settings["optimize_thresholds"] or not data.splits["val"]:
            return {}
        self.eval()
        loader = data.val_dataloader_all()
        outputs, truths = [], []
        with torch.no_grad():
            for batch in loader:
                image = batch["image"][0].to(self.device)
                outputs.append(self.activate(self.predict_image(image)).cpu())
                truths.append(batch["target"][0].numpy())

        def score(prob_thresh: float, nms_thresh: float) -> float:
            preds = [self.nms(t.shape, prob_thresh, nms_thresh)(o) for o, t in zip(outputs, truths)]
            pooled = match_dataset(list(zip(truths, preds)), SELECTION_TAUS)
            return float(np.mean([pooled[tau].accuracy for tau in SELECTION_TAUS]))

        def best() -> tuple[float, float]:
            return max(results, key=lambda k: (results[k], -abs(k[0] - 0.5), -abs(k[1] - 0.4)))

        results = {(p, n): score(p, n) for p in PROB_GRID for n in NMS_GRID}
        for step in (0.025, 0.0125):  # refine the probability threshold around the best
            best_p, best_n = best()
            for p in (round(best_p - step, 4), round(best_p + step, 4)):
                if 0.0 < p < 1.0 and (p, best_n) not in results:
                    results[(p, best_n)] = score(p, best_n)
        best_p, best_n = best()
        self.thresholds.copy_(torch.tensor([best_p, best_n]))
        log.info("StarDist thresholds from the validation split: prob_thresh=%.3f nms_thresh=%.2f "
                 "(mean accuracy %.4f)", best_p, best_n, results[(best_p, best_n)])
        return {"stardist.prob_thresh": best_p, "stardist.nms_thresh": best_n,
                "val/optimized_mean_accuracy": results[(best_p, best_n)]}

    def report_figures(self, metrics: Mapping[str, float], folder) -> list:
        """A plot of the test matching scores over the IoU threshold."""
        from pathlib import Path

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        prefix = next((k.split("/")[0] for k in metrics if "accuracy_" in k), None)
        if prefix is None:
            return []
        taus = sorted({float(k.rsplit("_", 1)[1]) for k in metrics if k.startswith(f"{prefix}/accuracy_")})
        fig, ax = plt.subplots(figsize=(6, 4))
        for score in ("precision", "recall", "accuracy", "f1", "mean_matched_score", "panoptic_quality"):
            values = [metrics.get(f"{prefix}/{score}_{tau:g}") for tau in taus]
            if all(v is not None for v in values):
                ax.plot(taus, values, marker="o", label=score)
        ax.set_xlabel("IoU threshold τ")
        ax.set_ylabel("score")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"StarDist matching scores ({prefix} split)")
        fig.tight_layout()
        path = Path(folder) / f"{prefix}_matching_over_iou.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]


class _StarDistSession(PredictionSession):
    """Collects candidates from every strip; one global NMS over all of them at the end.

    The candidates above ``prob_thresh`` (4 × (1 + D + R) bytes each: probability, centre,
    distances) are appended to a temporary file as they come, so that nothing accumulates in
    memory while the image streams through; they are read back for the NMS. The label image is
    rendered at the end, strip by strip as it is written.
    """

    def __init__(self, task: StarDistTask, shape: tuple[int, ...], workdir=None) -> None:
        import tempfile

        super().__init__(task.prediction_outputs(), lambda raw: {})
        self.task = task
        self.shape = shape
        fd, name = tempfile.mkstemp(prefix=".bioflow-", suffix=".candidates", dir=workdir)
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        self.count = 0

    def block(self, start: int, raw: torch.Tensor) -> dict[str, np.ndarray]:
        """Candidates of one strip (``start``: its first row, or plane in 3D, on the output grid)."""
        act = self.task.activate(raw)
        where = torch.nonzero(act[0] > float(self.task.thresholds[0]))
        index = tuple(where.T)
        offset = torch.zeros(where.shape[1], dtype=where.dtype, device=where.device)
        offset[0] = start
        step = torch.tensor(self.task.grid, dtype=where.dtype, device=where.device)
        rows = torch.cat([act[0][index][:, None].float(), ((where + offset) * step).float(),
                          act[1:][(slice(None), *index)].T.float()], dim=1)  # centres < 2**24: exact
        rows.cpu().numpy().tofile(self.file)
        self.count += rows.shape[0]
        return {}

    def finish(self) -> dict[str, Any]:
        from bioflow.inference.objects import ObjectTable

        self.file.close()
        dims = len(self.shape)
        if not self.count:
            return {"labels": np.zeros(self.shape, np.int32), "objects": ObjectTable(dims).rows}
        table = torch.from_numpy(np.fromfile(self.path, dtype=np.float32).reshape(self.count, -1))
        self.path.unlink(missing_ok=True)
        probs, points, dists = table[:, 0].clone(), table[:, 1:1 + dims].to(torch.int64), table[:, 1 + dims:]
        nms = self.task.nms(self.shape)
        if hasattr(nms, "kept_candidates"):  # label k is the k-th most probable object kept
            points, dists, probs = nms.kept_candidates(points, dists, probs)
            ranked = probs[torch.sort(-probs, stable=True).indices].numpy()
            objects = ObjectTable(dims, ranked)
            return {"labels": objects.watch(nms.blocks_from_candidates(points, dists, probs, kept=True)),
                    "objects": objects.rows}
        objects = ObjectTable(dims)  # a post-processor of a plugin: sizes and centroids only
        labels = nms.from_candidates(points, dists, probs)
        objects.add(0, labels)
        return {"labels": labels, "objects": objects.rows}

    def close(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _ray_permutation_map(n_rays: int):
    """Test-time augmentation for ray distances: the channel permutation each flip/turn implies.

    A network applied to a flipped or turned image predicts distances along the turned rays; once
    the output is turned back, channel ``j`` holds the distance along the original-frame direction
    ``L^-1 u_j``, which is ray ``m`` of the original frame. The linear map ``L`` is measured by
    transforming a one-pixel probe exactly as the image is transformed.
    """
    angles = 2 * np.pi * np.arange(n_rays) / n_rays
    rays = np.stack([np.sin(angles), np.cos(angles)], axis=1)  # (y, x)
    cache: dict[tuple[int, bool], torch.Tensor] = {}

    def linear_map(k: int, flip: bool) -> np.ndarray:
        columns = []
        for e in ((1, 0), (0, 1)):
            probe = torch.zeros(1, 1, 3, 3)
            probe[0, 0, 1 + e[0], 1 + e[1]] = 1
            x = torch.flip(probe, (3,)) if flip else probe
            x = torch.rot90(x, k, (2, 3))
            y, xx = (int(v) for v in torch.nonzero(x[0, 0])[0])
            columns.append((y - 1, xx - 1))
        return np.array(columns, dtype=float).T  # L such that L @ e = transformed e

    def permutation(k: int, flip: bool) -> torch.Tensor:
        if (k, flip) not in cache:
            inverse = np.linalg.inv(linear_map(k, flip))
            mapped = rays @ inverse.T  # L^-1 u_j for every j
            source = np.argmax(mapped @ rays.T, axis=0)  # for original ray m: the j with L^-1 u_j == u_m
            if not np.allclose(mapped[source], rays, atol=1e-6):
                raise ConfigError(f"test-time augmentation needs n_rays divisible by 4, got {n_rays}")
            cache[(k, flip)] = torch.as_tensor(source)
        return cache[(k, flip)]

    def channel_map(output: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
        if k == 0 and not flip:
            return output
        order = permutation(k, flip).to(output.device)
        return torch.cat([output[:, :1], output[:, 1:].index_select(1, order)], dim=1)

    return channel_map
