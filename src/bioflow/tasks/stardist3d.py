"""StarDist 3D: nuclei in volumes as star-convex polyhedra (Weigert et al., 2020).

The 2D method with rays on the sphere: every voxel (on a grid, e.g. 1×2×2 for stacks whose z step
is larger than the pixel size) predicts its object probability (the normalised, anisotropy-aware
distance transform) and the distances to the object's boundary along ``n_rays`` golden-spiral
directions, which are scaled by the voxels' anisotropy. Non-maximum suppression of polyhedra keeps
the best non-overlapping ones; candidates of every tile of a large stack take part in one global
suppression. Thresholds are optimised on the validation split, as in 2D.

The anisotropy comes from ``task.anisotropy`` (z, y, x) or, when that is not set, from the
training data's voxel size (TIFF metadata or ``data.source.pixel_size``); it is stored in the model.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Literal, Optional, Sequence

import torch

from bioflow.errors import BioflowError, ConfigError
from bioflow.stardist.rays3d import golden_spiral_rays, normalize_anisotropy
from bioflow.stardist.targets3d import object_probabilities_3d, star_distances_3d_batch
from bioflow.tasks.stardist import StarDistTask


def stardist3d_loss_target(labels: torch.Tensor, rays, grid: Sequence[int], anisotropy: Sequence[float]) -> torch.Tensor:
    """The loss target of a batch of label volumes ``(N, Z, Y, X)`` (-1: padding): probability,
    distances along ``rays`` and validity, ``(N, 2 + R, Z', Y', X')``."""
    gz, gy, gx = grid
    valid = (labels != -1)[:, ::gz, ::gy, ::gx]
    labels = labels.clamp(min=0)
    dists = star_distances_3d_batch(labels, rays, grid).permute(0, 4, 1, 2, 3)
    prob = torch.stack([object_probabilities_3d(lab, grid, anisotropy) for lab in labels])
    return torch.cat([prob[:, None], dists, valid[:, None].to(dists.dtype)], dim=1)


class StarDist3DTask(StarDistTask):
    """StarDist 3D on top of any registered 3D backbone (U-Net by default).

    Settings (``task`` section): those of 2D StarDist (``n_rays``, ``grid`` as ``(z, y, x)``,
    ``pool_first``, ``stem_channels``, ``features``, ``head_features``, ``prob_thresh``,
    ``nms_thresh``, ``criterion``, ``optimize_thresholds``, ``monitor``, ``monitor_mode``) and
    ``anisotropy`` (voxel size ratios z, y, x; None: from the data's voxel size, else isotropic).
    """

    bioflow_spatial_dims: ClassVar[tuple[int, ...]] = (3,)
    postprocessor_name: ClassVar[str] = "stardist_nms_3d"
    legacy_settings: ClassVar[dict[str, Any]] = {}
    exchange_title: ClassVar[str] = "StarDist 3D"
    citations: ClassVar[tuple[dict[str, str], ...]] = StarDistTask.citations + (
        {"text": "Weigert, Schmidt, Haase, Sugawara and Myers. Star-convex Polyhedra for 3D Object Detection and "
                 "Segmentation in Microscopy. WACV 2020", "doi": "10.1109/WACV45572.2020.9093435"},)

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any], inference: bool = False, *,
                 n_rays: int = 64, grid: Sequence[int] = (1, 2, 2), anisotropy: Optional[list[float]] = None,
                 pool_first: bool = True, stem_channels: int = 16, features: int = 32, head_features: int = 64,
                 prob_thresh: float = 0.5, nms_thresh: float = 0.4, criterion: Literal["min_area", "iou"] = "min_area",
                 optimize_thresholds: bool = True, monitor: str = "val/mean_accuracy",
                 monitor_mode: Literal["max", "min"] = "max") -> None:
        if n_rays < 4:
            raise ConfigError(f"task.n_rays: a number of rays >= 4 on the sphere, got {n_rays}")
        try:
            pixel_size = data_info.get("pixel_size")
            self_anisotropy = normalize_anisotropy(
                anisotropy, None if anisotropy is not None or not pixel_size or len(pixel_size) != 3 else pixel_size)
        except ValueError as exc:
            raise ConfigError(f"task.anisotropy: {exc}") from None
        super().__init__(config, data_info, inference, n_rays=n_rays, grid=grid, pool_first=pool_first,
                         stem_channels=stem_channels, features=features, head_features=head_features,
                         prob_thresh=prob_thresh, nms_thresh=nms_thresh, criterion=criterion,
                         optimize_thresholds=optimize_thresholds, monitor=monitor, monitor_mode=monitor_mode)
        # The anisotropy the rays were made for travels with the model (in its hyperparameters).
        self.task_settings["anisotropy"] = list(self_anisotropy)
        self.rays = golden_spiral_rays(n_rays, anisotropy=self_anisotropy)

    @property
    def anisotropy(self) -> tuple[float, float, float]:
        return tuple(float(a) for a in self.task_settings["anisotropy"])  # type: ignore[return-value]

    def loss_target(self, labels: torch.Tensor) -> torch.Tensor:
        """``(N, 2 + R, Z', Y', X')``: object probability, ray distances and validity."""
        return stardist3d_loss_target(labels, self.rays, self.grid, self.anisotropy)

    def loader_loss_target(self):
        return functools.partial(stardist3d_loss_target, rays=self.rays, grid=self.grid, anisotropy=self.anisotropy)

    def nms_arguments(self) -> dict[str, Any]:
        return {"n_rays": self.n_rays, "anisotropy": list(self.anisotropy)}

    def tta_channel_map(self):
        def refuse(output, k, flip):
            raise BioflowError("tta: not available for 3D StarDist (its rays on the sphere do not map onto each "
                               "other under flips and turns); predict without --tta and --tta-spread")

        return refuse
