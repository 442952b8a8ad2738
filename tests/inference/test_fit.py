"""Does an input fit the training data: the fingerprint flags shifted inputs, not unshifted ones."""

from __future__ import annotations

import numpy as np
import pytest

from bioflow.inference.fit import GROUPS, FitReference


def features(rng, n, shift=None):
    """Patch features of three groups (2 intensity, 1 noise, 3 content), correlated within groups."""
    base = rng.normal(size=(n, 6)) @ np.diag([1, 1, 0.5, 2, 1, 1])
    if shift is not None:
        base[:, shift] += 6.0
    return base


GROUP_OF = ["intensity", "intensity", "noise", "content", "content", "content"]


def test_unshifted_images_pass_and_a_shift_is_flagged_with_its_group_named():
    rng = np.random.default_rng(0)
    reference = FitReference.fitted(features(rng, 2000), GROUP_OF, [features(rng, 16) for _ in range(30)])
    flagged = [not reference.verdict(features(rng, 16))["fits"] for _ in range(200)]
    assert np.mean(flagged) <= 0.05
    for column, group in ((0, "intensity"), (2, "noise"), (4, "content")):
        verdict = reference.verdict(features(rng, 16, shift=column))
        assert not verdict["fits"] and verdict["reason"] == group, (group, verdict)
    assert set(GROUPS) <= set(reference.record["group_thresholds"])


def test_the_fingerprint_is_plain_data_that_round_trips():
    import json

    rng = np.random.default_rng(1)
    reference = FitReference.fitted(features(rng, 500), GROUP_OF, [])
    again = FitReference(json.loads(json.dumps(reference.record)))  # what a checkpoint stores
    sample = features(rng, 16)
    assert again.verdict(sample) == reference.verdict(sample)


def test_a_trained_model_flags_an_image_unlike_its_training_images_and_not_a_brighter_one():
    """CARE demo data, per-image normalisation: a brighter copy fits (the network never sees the
    scale), a textured image of another kind does not."""
    from bioflow.inference.fit import fit_reference, image_features
    from tests.helpers import task_and_data

    task, data = task_and_data("experiment=demo_care", "data.source.n_images=8", "data.source.shape=[96,96]",
                          "data.patch_size=[32,32]", "model.base_channels=4", "model.depth=1")
    reference = FitReference(fit_reference(task, data))
    image = np.asarray(data.splits["test"][0].image)
    assert reference.verdict(image_features(task, image)[0])["fits"]
    assert reference.verdict(image_features(task, image * 4)[0])["fits"]
    yy, xx = np.mgrid[:96, :96]
    texture = (np.sin(xx / 3.0) * np.cos(yy / 5.0) * 60 + 100)[None].astype(np.float32)
    verdict = reference.verdict(image_features(task, texture)[0])
    assert not verdict["fits"] and verdict["reason"] in GROUPS


def test_a_second_prediction_into_the_same_folder_keeps_the_first_ones_rows(tmp_path):
    from bioflow.prediction import write_fit_report

    row = {"score": 0.1, "threshold": 0.2, "fits": True, "reason": "", "intensity": 0.1, "noise": 0.1, "content": 0.1}
    write_fit_report(tmp_path / "r.csv", [{"file": "a, b.tif", **row}, {"file": "c.tif", **row}])
    write_fit_report(tmp_path / "r.csv", [{"file": "c.tif", **row, "fits": False, "reason": "noise"}])
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[1:] == ['"a, b.tif",0.1,0.2,True,,0.1,0.1,0.1', "c.tif,0.1,0.2,False,noise,0.1,0.1,0.1"]
    assert not list(tmp_path.glob(".*partial"))


def test_the_check_rides_along_on_the_prediction_and_scores_as_a_separate_check_does():
    """Checking an input during its prediction runs the network no more often than predicting it,
    and gives the score that checking it on its own gives (same windows, same features)."""
    from bioflow.inference.fit import fit_reference, fit_verdict
    from bioflow.prediction import predict_array
    from tests.helpers import task_and_data

    task, data = task_and_data("experiment=demo_care", "data.source.n_images=6", "data.source.shape=[80,80]",
                          "data.patch_size=[32,32]", "model.base_channels=4", "model.depth=1",
                          "predict.tile_size=[48,48]")
    task.eval()
    task.fit_reference = FitReference(fit_reference(task, data))
    image = np.asarray(data.splits["test"][0].image)
    calls = []
    handle = task.inference_network().register_forward_hook(lambda *a: calls.append(1))
    try:
        plain = predict_array(task, image)
        passes = len(calls)
        checked = predict_array(task, image, check_fit=True)
    finally:
        handle.remove()
    assert passes > 1 and len(calls) == 2 * passes  # several tiles, and not one pass more for the check
    np.testing.assert_array_equal(plain["restored"], checked["restored"])
    assert checked["fit"]["score"] == fit_verdict(task, image)["score"]
    assert "fit" not in plain


def test_images_that_differ_from_each_other_are_not_flagged_for_it():
    """Windows of one image are alike, images differ: the threshold must come from whole images the
    fingerprint did not see (each training image against the others), not from windows."""
    rng = np.random.default_rng(3)

    def image_windows():
        return features(rng, 1)[0] * 1.5 + 0.2 * features(rng, 16)  # an image's own offset, small spread inside

    reference = FitReference.fitted([image_windows() for _ in range(12)], GROUP_OF, [])
    assert reference.record["held_out_images"] == 12
    flagged = [not reference.verdict(image_windows())["fits"] for _ in range(300)]
    assert np.mean(flagged) <= 0.05
    shifted = image_windows()
    shifted[:, 4] += 12.0
    assert not reference.verdict(shifted)["fits"]


def test_with_few_images_the_threshold_stays_near_what_unseen_images_score():
    """Two training images (64 windows each, as the fingerprint takes of few images) and one
    validation image: too few to score each training image against the others; a shifted image
    is still flagged, unshifted ones mostly not."""
    rng = np.random.default_rng(5)
    reference = FitReference.fitted([features(rng, 64) for _ in range(2)], GROUP_OF, [features(rng, 16)])
    assert reference.threshold < 3.0
    assert np.mean([not reference.verdict(features(rng, 16))["fits"] for _ in range(200)]) <= 0.1
    assert not reference.verdict(features(rng, 16, shift=4))["fits"]


def test_with_one_training_image_its_held_out_region_sets_the_threshold():
    """One training image: its windows are alike, so sets of them score low; the region held out
    for validation scores higher. The threshold must cover that region (it is data the model may
    see), not drown it among a hundred sets of windows: the training image itself then fits."""
    rng = np.random.default_rng(7)
    own = features(rng, 128) * 0.5
    region = features(rng, 16) * 0.5
    region[:, 3:] += 1.5  # content a little unlike the training windows
    reference = FitReference.fitted([own], GROUP_OF, [region])
    assert reference.threshold >= reference.score(region)["score"] - 1e-9
    assert reference.verdict(np.concatenate([own[:64], region]))["fits"]  # the whole image: training part and region
    far = features(rng, 16) * 0.5
    far[:, 4] += 12.0
    assert not reference.verdict(far)["fits"]


def test_a_fingerprint_of_other_features_is_not_used(tmp_path):
    """A checkpoint whose fingerprint was made with an older definition of the features predicts
    without a check rather than with a wrong one."""
    import torch

    from bioflow.checkpoint import load_checkpoint
    from bioflow.loading import task_from_checkpoint
    from bioflow.testing import make_checkpoint

    path = make_checkpoint(tmp_path / "m.ckpt", "experiment=demo_unet", "model.depth=1", "model.base_channels=4")
    saved = torch.load(path, weights_only=True)
    record = FitReference.fitted(features(np.random.default_rng(0), 64), GROUP_OF, []).record
    for version, expected in ((None, False), (record["version"], True)):
        fit = {k: v for k, v in record.items() if k != "version"} if version is None else record
        saved.setdefault("bioflow", {})["fit"] = fit
        torch.save(saved, path)
        task = task_from_checkpoint(load_checkpoint(path), "model")
        assert (getattr(task, "fit_reference", None) is not None) == expected


@pytest.mark.parametrize("experiment", ["demo_care", "demo_n2v"])
def test_evaluation_checks_the_fit_on_the_tests_own_predictions(experiment):
    """``bioflow evaluate`` scores each test image's fit while the test predicts it: no network pass
    more than the test alone (Noise2Void also predicts masked copies, which must not be what is
    checked), and the scores of a separate check of each image."""
    import lightning as L

    from bioflow.evaluation import fit_scores
    from bioflow.inference.fit import fit_reference, fit_verdict
    from tests.helpers import task_and_data

    task, data = task_and_data(f"experiment={experiment}", "data.source.n_images=6", "data.source.shape=[80,80]",
                               "data.patch_size=[32,32]", "model.base_channels=4", "model.depth=1",
                               "predict.tile_size=[48,48]")
    task.eval()
    task.fit_reference = FitReference(fit_reference(task, data))
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (task.model, task.inference_network())]

    def test(verdicts):
        task.fit_verdicts = verdicts
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).test(task, datamodule=data, verbose=False)
        task.fit_verdicts = None

    try:
        test(None)
        passes = len(calls)
        seen: dict = {}
        test(seen)
    finally:
        for handle in handles:
            handle.remove()
    assert passes > 0 and len(calls) == 2 * passes
    records = data.splits["test"]
    assert records and sorted(seen) == sorted(r.name for r in records)
    for record in records:  # the same windows of the same tiles (a masked copy differs by about 3e-5)
        assert seen[record.name]["score"] == pytest.approx(fit_verdict(task, np.asarray(record.image))["score"], rel=1e-7)
    assert fit_scores(task, records, seen) == pytest.approx(fit_scores(task, records), rel=1e-7)  # checked on their own


def test_window_quantiles_are_numpys():
    """The partial sort behind the intensity and noise features gives np.quantile's values exactly
    (a fingerprint's features must not change with how they are computed)."""
    from bioflow.inference.fit_windows import _median, _quantiles

    rng = np.random.default_rng(0)
    for shape in [(16, 1, 2048), (3, 2, 7), (5, 1, 1), (4, 3, 2)]:
        values = rng.normal(size=shape).astype(np.float32)
        for qs in [(0.01, 0.5, 0.99), (0.5,)]:
            for ours, numpys in zip(_quantiles(values, qs), (np.quantile(values, q, axis=-1) for q in qs)):
                np.testing.assert_allclose(ours, numpys, rtol=1e-6, atol=1e-7)
    for n in (2048, 2047, 2, 1, 7):  # the median from one partition, even and odd counts
        values = rng.normal(size=(5, 2, n)).astype(np.float32)
        np.testing.assert_allclose(_median(values), np.quantile(values, 0.5, axis=-1), rtol=1e-6, atol=1e-7)


def test_distances_are_the_mahalanobis_distances_of_each_group():
    """The scores' distances (products of factors in float32) equal the direct float64 formula
    ``sqrt(x^T A x / n)`` over all features and within each group, also for strongly correlated
    features (whose inverse covariance is ill-conditioned) far from the training mean."""
    from bioflow.inference.fit import GROUPS, FitReference

    rng = np.random.default_rng(3)
    groups = ["intensity"] * 6 + ["noise"] * 2 + ["content"] * 40
    mixing = rng.normal(size=(len(groups), len(groups))) * np.logspace(0, -3, len(groups))  # a range of scales
    train = rng.normal(size=(300, len(groups))) @ mixing + 5.0
    reference = FitReference._untested(train, groups)
    features = rng.normal(size=(16, len(groups))) @ mixing * rng.choice([0.5, 1.0, 8.0], size=(16, 1)) + 5.0
    every, per_group = reference._distances(features)
    centred = features - reference.mean
    direct = np.sqrt(np.einsum("wi,ij,wj->w", centred, reference.inverse["all"], centred) / len(groups))
    np.testing.assert_allclose(every, direct, rtol=1e-5)
    for j, g in enumerate(g for g in GROUPS if g in reference.inverse):
        index = [i for i, name in enumerate(groups) if name == g]
        part = centred[:, index]
        expected = np.sqrt(np.einsum("wi,ij,wj->w", part, reference.inverse[g], part) / len(index))
        np.testing.assert_allclose(per_group[:, j], expected, rtol=1e-5)


@pytest.mark.parametrize("spatial, box", [((40, 37), (16, 9)), ((9, 20, 21), (4, 8, 8)), ((30, 12), (10, 1))])
def test_windows_measured_together_equal_windows_measured_one_by_one(spatial, box):
    """Several windows gathered at once give each window's own samples exactly, and their content
    (feature-map means and spreads) as each window's own to float precision."""
    import torch

    from bioflow.inference.fit_windows import window_content, window_samples, windows_samples

    rng = np.random.default_rng(1)
    host = rng.normal(size=(2, *spatial)).astype(np.float32)
    corners = np.stack([rng.integers(0, n - b + 1, size=200) for n, b in zip(spatial, box)], axis=1)
    together = windows_samples(host, corners, box)
    for corner, measured in zip(corners, together):
        crop = host[(slice(None), *(slice(a, a + b) for a, b in zip(corner, box)))]
        np.testing.assert_array_equal(measured, window_samples(crop))

    maps = torch.from_numpy(rng.normal(2.0, 3.0, size=(3, *spatial)).astype(np.float32))
    for spread in (False, True):
        content = window_content(maps, corners, box, spread=spread)
        for corner, described in zip(corners, content):
            window = maps[(slice(None), *(slice(a, a + b) for a, b in zip(corner, box)))].flatten(1)
            direct = window.mean(dim=1)
            if spread:
                direct = torch.cat([direct, window.std(dim=1, unbiased=False)])
            np.testing.assert_allclose(described, direct.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_content_holds_the_deepest_level_and_the_second_encoder_level_over_each_windows_pixels(spatial_dims):
    """A U-Net's window is described by the means of its bottom's maps and of its second encoder
    level's maps, both over the window's own pixels (the finer maps averaged onto the coarser cells)."""
    import torch

    from bioflow.inference.fit import FitObserver
    from bioflow.registry import registry

    torch.manual_seed(0)
    net = registry.create("models", "unet", in_channels=1, out_channels=1, spatial_dims=spatial_dims, depth=2,
                          base_channels=4).eval()

    class Task:  # what the observer needs of a task: its network and its patch size
        model = net
        config = {"data": {"patch_size": [8] * spatial_dims}}

    seen = {}
    hooks = [net.bottom.register_forward_hook(lambda m, a, o: seen.__setitem__("bottom", o)),
             net.encoders[1].register_forward_hook(lambda m, a, o: seen.__setitem__("fine", o))]
    shape = (16,) * spatial_dims
    tile = torch.randn(1, *shape)
    with FitObserver(Task(), windows=6) as observer, torch.no_grad():
        read = observer.watch(lambda corner, size: tile, shape)
        net(read((0,) * spatial_dims, shape)[None])
        features, groups = observer.features()
    for hook in hooks:
        hook.remove()
    content = features[:, [i for i, g in enumerate(groups) if g == "content"]]
    bottom, fine = seen["bottom"][0], seen["fine"][0]
    assert content.shape[1] == bottom.shape[0] + fine.shape[0]
    expected = []
    for corner in (np.ndindex(*[b - 2 + 1 for b in bottom.shape[1:]])):  # every window of 2 cells (8 pixels)
        coarse = bottom[(slice(None), *(slice(c, c + 2) for c in corner))].flatten(1).mean(dim=1)
        detail = fine[(slice(None), *(slice(2 * c, 2 * c + 4) for c in corner))].flatten(1).mean(dim=1)
        expected.append(torch.cat([coarse, detail]).numpy())
    expected = np.stack(expected)
    for described in content:  # each window kept is one of these, to float precision
        assert np.abs(expected - described).max(axis=1).min() < 1e-5
    # and the windows kept are not all alike (the check would see nothing of the finer level otherwise)
    assert np.ptp(content[:, bottom.shape[0]:], axis=0).max() > 0
