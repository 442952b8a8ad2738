"""Prediction options: one typed object, checked once, before any work."""

from __future__ import annotations

import pytest

from bioflow.errors import ConfigError
from bioflow.inference.options import TILING, PredictionOptions


def test_defaults_and_the_tilers_share():
    opts = PredictionOptions.of(tile_size=256, overlap=[8, 16], tta=True, progress=None)
    assert opts.tile_size == (256,) and opts.overlap == (8, 16) and opts.progress is True  # None: the default
    assert opts.tiling() == {"tile_size": [256], "overlap": [8, 16], "batch_size": None, "tta": True, "tta_spread": False,
                             "blend": "cosine", "progress": True}
    assert set(opts.tiling()) == set(TILING)


@pytest.mark.parametrize(("given", "message"), [
    ({"tile_size": [0]}, "--tile-size 0: must be positive"),
    ({"overlap": [-1]}, "--overlap -1: must be 0 or more"),
    ({"tile_size": [1.5]}, "whole numbers"),
    ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
    ({"blend": "linear"}, "--blend linear: one of cosine, none"),
    ({"axes": "QYX"}, "--axes QYX: not an axes string"),
    ({"precision": "fp8"}, "--precision: 'fp8' is not one of"),
    ({"tile_sise": [64]}, "prediction option 'tile_sise' does not exist; did you mean 'tile_size'?"),
])
def test_bad_options_are_one_line_before_any_work(given, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")) as caught:
        PredictionOptions.of(**given)
    assert "\n" not in str(caught.value)


def test_options_a_caller_does_not_take_are_refused_by_name():
    with pytest.raises(ConfigError, match="prediction option 'device' does not exist"):
        PredictionOptions.of(allowed=TILING, device="cpu")


def test_the_predictor_contract_is_met_by_tasks():
    from bioflow.inference.predictor import Predictor
    from bioflow.tasks import create_task
    from bioflow.testing import compose_config

    config = compose_config("task=care", "model.depth=1", "model.base_channels=4")
    task = create_task(config, {"in_channels": 1, "spatial_dims": 2, "pixel_size": None, "split": {}}, inference=True)
    assert isinstance(task, Predictor)


def test_the_spread_of_augmented_predictions_implies_them():
    assert PredictionOptions.of(tta_spread=True).tiling()["tta"] is True
    assert PredictionOptions.of().tiling()["tta"] is False
