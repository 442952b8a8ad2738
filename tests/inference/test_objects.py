"""Per-object tables: counted block by block, equal to whole-image measurements, and StarDist's
objects carry the probability of the candidate that made them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bioflow.conventions import Blocks
from bioflow.inference.objects import ObjectTable, write_csv


def blocks_of(labels: np.ndarray, step: int) -> Blocks:
    return Blocks(labels.shape, labels.dtype, lambda: ((s, labels[s:s + step]) for s in range(0, labels.shape[0], step)))


@pytest.mark.parametrize("shape", [(40, 30), (6, 20, 24)])
def test_sizes_and_centroids_counted_in_blocks_equal_those_of_the_whole_image(shape):
    rng = np.random.default_rng(0)
    labels = ndimage.label(ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.55)[0].astype(np.int32)
    labels[labels == 2] = 0  # a label without pixels is no object
    table = ObjectTable(len(shape), probabilities=np.linspace(0.99, 0.5, labels.max()))
    seen = table.watch(blocks_of(labels, 7))
    assert np.array_equal(np.asarray(seen), labels)
    np.asarray(seen)  # a second pass counts again, not twice
    rows = table.rows()
    present = [k for k in range(1, labels.max() + 1) if (labels == k).any()]
    assert list(rows["label"]) == present and 2 not in rows["label"]
    size = "area" if len(shape) == 2 else "volume"
    assert list(rows[size]) == [int((labels == k).sum()) for k in present]
    centroids = ndimage.center_of_mass(labels > 0, labels, present)
    for axis, name in enumerate(f"centroid_{a}" for a in "zyx"[-len(shape):]):
        np.testing.assert_allclose(rows[name], [c[axis] for c in centroids])
    np.testing.assert_allclose(rows["probability"], np.linspace(0.99, 0.5, labels.max())[np.array(present) - 1], rtol=1e-6)


def test_the_csv_has_a_header_a_row_per_object_and_a_frame_column_for_time_lapses(tmp_path):
    table = ObjectTable(2)
    table.add(0, np.array([[0, 1, 1], [2, 0, 0]]))
    rows = table.rows()
    assert np.isnan(rows["probability"]).all()  # no confidence given: NaN, not 0
    write_csv(tmp_path / "t.csv", [rows, rows[:1]], frames=True)
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "frame,label,probability,area,centroid_y,centroid_x"
    assert lines[1:] == ["0,1,nan,2,0,1.5", "0,2,nan,1,1,0", "1,1,nan,2,0,1.5"]


def test_stardist_objects_are_ranked_by_probability_and_match_the_label_image(tmp_path):
    import bioflow
    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
    from bioflow.prediction import predict_array
    from bioflow.testing import make_checkpoint

    path = make_checkpoint(tmp_path / "m.ckpt", "experiment=demo_stardist", "model.depth=1", "model.base_channels=4",
                           "task.head_features=8", "task.n_rays=16", seed=3)
    task = bioflow.load_model(str(path)).task
    task.thresholds[0] = 0.3  # random weights: probabilities about 0.5, so plenty of candidates
    image, _ = synthetic_nuclei_image((96, 96), seed=1, index=0)
    out = predict_array(task, image[None].astype(np.float32), tile_size=[64])
    labels, objects = out["labels"], out["objects"]
    assert len(objects) > 3 and list(objects["label"]) == sorted(set(np.unique(labels).tolist()) - {0})
    assert list(objects["area"]) == [int((labels == k).sum()) for k in objects["label"]]
    probabilities = objects["probability"]
    assert np.all(probabilities > 0.3) and np.all(probabilities <= 1)
    assert np.all(np.diff(probabilities) <= 1e-6)  # label k is the k-th most probable object


def test_bioflow_predict_writes_the_table_beside_the_labels(tmp_path):
    import tifffile

    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
    from bioflow.testing import make_checkpoint
    from tests.helpers import run_cli

    path = make_checkpoint(tmp_path / "m.ckpt", "experiment=demo_stardist", "model.depth=1", "model.base_channels=4",
                           "task.head_features=8", "task.n_rays=16", "task.prob_thresh=0.3", seed=3)
    image, _ = synthetic_nuclei_image((96, 96), seed=1, index=0)
    tifffile.imwrite(tmp_path / "a b.tif", np.stack([image, image[::-1]]).astype(np.float32), metadata={"axes": "TYX"})
    result = run_cli("predict", str(path), str(tmp_path / "a b.tif"), "--out", str(tmp_path / "out"), "--axes", "TYX",
                     "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    labels = tifffile.imread(tmp_path / "out" / "a b.tif")
    lines = (tmp_path / "out" / "a b_objects.csv").read_text().splitlines()
    assert lines[0] == "frame,label,probability,area,centroid_y,centroid_x"
    rows = [line.split(",") for line in lines[1:]]
    for t in (0, 1):
        assert sorted(int(r[1]) for r in rows if r[0] == str(t)) == sorted(set(np.unique(labels[t]).tolist()) - {0})
    assert not list((tmp_path / "out").glob(".*partial"))
