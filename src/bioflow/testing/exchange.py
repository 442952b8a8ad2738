"""The export round trip of the contract kit: a task's model through a bioimage.io package and back."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def check_exchange(task, image: np.ndarray, tile_size=None) -> None:
    """A task's model round-trips through a bioimage.io package: ``bioflow export`` writes a valid
    package of it, and the package, rebuilt as the task around its weights, predicts the model's
    raw output (to 1e-4 of its range) and the same output images.

    Skipped (not failed) where the optional extra ``bioflow[bioimageio]`` is not installed.
    """
    import tempfile

    import torch

    try:
        import bioimageio.core  # noqa: F401
    except ImportError:
        import warnings

        warnings.warn("check_exchange: bioimageio.core is not installed; the export round trip was not checked")
        return
    from bioflow.bioimageio.export import export_model
    from bioflow.bioimageio.runtime import load_package
    from bioflow.prediction import predict_array

    task = task.cpu().eval()
    with tempfile.TemporaryDirectory(prefix="bioflow-exchange-") as tmp:
        folder = Path(tmp)
        checkpoint = {"state_dict": task.state_dict(),
                      "hyper_parameters": {"config": task.config, "data_info": task.data_info.as_dict()}}
        task.on_save_checkpoint(checkpoint)
        torch.save(checkpoint, folder / "model.ckpt")
        export_model(str(folder / "model.ckpt"), str(folder / "model.zip"), project_dir=str(folder / "runs"))
        packaged = load_package(str(folder / "model.zip"))
        assert packaged is not None and hasattr(packaged, "config"), "the package does not rebuild as its task"

        def raw(model) -> np.ndarray:
            parts: list = []
            with torch.no_grad():
                model.predict_array(image, sink=lambda start, block: parts.append(block.float().cpu()), tile_size=tile_size)
            return torch.cat(parts, dim=1).numpy()

        expected, actual = raw(task), raw(packaged)
        scale = max(float(np.abs(expected).max()), 1e-6)
        assert float(np.abs(actual - expected).max()) <= 1e-4 * scale, "the package predicts another raw output"
        ours = predict_array(task, image, tile_size=tile_size)
        theirs = predict_array(packaged, image, tile_size=tile_size)
        for name, value in ours.items():
            if value.dtype.names:  # a table follows from the label image compared here
                continue
            assert name in theirs and theirs[name].shape == value.shape, f"the package gives no output '{name}'"
            if np.issubdtype(value.dtype, np.floating):
                assert np.allclose(theirs[name], value, rtol=1e-4, atol=1e-4 * max(float(np.abs(value).max()), 1e-6)), name
            else:  # labels: pixels where two objects meet may fall to either
                assert (theirs[name] == value).mean() > 0.99, f"output '{name}' differs from the model's"


#: The contract check of every kind that has one (named in :data:`bioflow.kinds.KINDS`).
