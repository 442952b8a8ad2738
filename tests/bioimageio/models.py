"""Small untrained bioflow models of every task, with generated data recorded as their split, for
the bioimage.io tests (the export reads their held-out test image; evaluation reads their data)."""

from __future__ import annotations

from pathlib import Path

import torch

from bioflow.testing import make_checkpoint

#: Overrides of a tiny model per task (seconds to export and to test).
TINY = {
    "segmentation": ("experiment=demo_unet", "model.depth=2", "model.base_channels=4"),
    "segmentation_3d": ("experiment=demo_unet", "data=synthetic_nuclei_3d", "data.source.shape=[24,40,40]",
                        "data.patch_size=[16,32,32]", "model.depth=1", "model.base_channels=4"),
    "stardist": ("experiment=demo_stardist", "model.depth=1", "model.base_channels=4", "task.n_rays=8",
                 "task.stem_channels=4", "task.features=4", "task.head_features=8"),
    "care": ("experiment=demo_care", "model.depth=1", "model.base_channels=4", "data.normalize.mode=dataset"),
    "n2v": ("experiment=demo_n2v", "model.depth=1", "model.base_channels=4"),
    "care_probabilistic": ("experiment=demo_care", "model.depth=1", "model.base_channels=4", "task.probabilistic=true",
                           "data.normalize.mode=dataset"),
    "n2v_probabilistic": ("experiment=demo_n2v", "model.depth=1", "model.base_channels=4", "task.probabilistic=true"),
    "stardist_3d": ("experiment=demo_stardist3d", "data.source.shape=[24,40,40]", "data.patch_size=[16,32,32]",
                    "model.depth=1", "model.base_channels=4", "task.n_rays=16", "task.stem_channels=4", "task.features=4",
                    "task.head_features=8"),
    "plugin": ("model=dilated_resnet", "model.width=4", "model.blocks=2", "loss=cross_entropy"),
    "plugin_task": ("task=field_classifier", "model.depth=1", "model.base_channels=4"),
}
_PREFIX = {"care": "restoration", "n2v": "restoration", "care_probabilistic": "restoration",
           "n2v_probabilistic": "restoration"}


def data_checkpoint(path: Path, kind: str, n_images: int = 4, seed: int = 0) -> Path:
    """An untrained checkpoint of ``kind`` (a key of :data:`TINY`) whose config generates
    ``n_images`` images, the last of them recorded as its test split."""
    dims = 3 if kind.endswith("_3d") else 2
    shape = [] if dims == 3 else ["data.source.shape=[96,96]"]
    make_checkpoint(path, *TINY[kind], f"data.source.n_images={n_images}", *shape, spatial_dims=dims,
                    pixel_size=[1.0] * dims, seed=seed)
    checkpoint = torch.load(path, weights_only=True)
    names = [f"{_PREFIX.get(kind, 'nuclei')}_{i:04d}" for i in range(n_images)]
    info = checkpoint["hyper_parameters"]["data_info"]
    info["split"] = {"train": names[:-2], "val": names[-2:-1], "test": names[-1:]}
    config = checkpoint["hyper_parameters"]["config"]
    if config["data"]["normalize"]["mode"] == "dataset":  # as training would have fitted it
        info["normalization"] = {"mode": "dataset", "low": 1.0, "high": 99.8, "fixed": {"low": [12.5], "high": [180.0]}}
    if kind.startswith("stardist"):
        _spread_stardist_head(checkpoint, dims)
    torch.save(checkpoint, path)
    return path


def _spread_stardist_head(checkpoint: dict, dims: int = 2) -> None:
    """Rescale the head of a random StarDist network so that its probabilities spread over (0, 1)
    and its distances are a few pixels, as a trained model's are: candidates then have distinct
    scores and polygons of several pixels (random weights give near-constant output)."""
    from bioflow.loading import task_from_checkpoint

    task = task_from_checkpoint(checkpoint, "model")
    image = nuclei((96, 96), seed=1) if dims == 2 else nuclei3d((24, 40, 40), seed=1)
    x = torch.from_numpy(task.normalizer().norm_for(image[None])(image[None]))[None]
    with torch.no_grad():
        out = task.model(x)
    state = checkpoint["state_dict"]
    axes = (0,) + tuple(range(2, 2 + dims))
    for head, channels, spread, centre in (("prob", out[:, :1], 3.0, 0.0), ("dist", out[:, 1:], 1.5, 4.0)):
        mean = channels.mean(dim=axes)
        gain = spread / channels.std(dim=axes).clamp(min=1e-8)
        weight = state[f"model.{head}.weight"]
        state[f"model.{head}.weight"] = weight * gain.reshape((-1,) + (1,) * (weight.dim() - 1))
        state[f"model.{head}.bias"] = (state[f"model.{head}.bias"] - mean) * gain + centre
    # Candidates well above the background's score (a uniform background gives equal, hence
    # arbitrarily ordered, scores)
    prob = torch.sigmoid((out[:, 0] - out[:, 0].mean()) * 3.0 / out[:, 0].std())
    state["thresholds"] = torch.tensor([min(0.95, round(float(prob.quantile(0.8)) + 0.1, 3)), 0.4])


def nuclei(shape, seed: int = 0):
    """One generated image of nuclei (Y, X), as the demo data are."""
    from bioflow.data.sources import synthetic_nuclei

    return synthetic_nuclei(n_images=1, shape=list(shape), seed=seed)[0].image[0]


def nuclei3d(shape, seed: int = 0):
    """One generated volume of nuclei (Z, Y, X), as the 3D demo data are."""
    from bioflow.data.sources import synthetic_nuclei

    return synthetic_nuclei(n_images=1, shape=list(shape), seed=seed, anisotropy=2.0)[0].image[0]
