"""Facility scale: OME-Zarr in and out, prediction over two processes, resuming a killed job.

The OME-Zarr stores here are written by ome-zarr-py (another tool than bioflow), with anisotropic
pixel sizes and NGFF labels, in both NGFF versions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("ome_zarr")
import zarr  # noqa: E402

from bioflow.data.synthetic_nuclei import synthetic_nuclei_image  # noqa: E402
from bioflow.testing import make_checkpoint  # noqa: E402
from tests.helpers import BIOFLOW, run_cli, write_ome_zarr  # noqa: E402

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SMALL = ("model.depth=2", "model.base_channels=4")


def read_output(path: Path) -> np.ndarray:
    return zarr.open_array(str(path / "0"), mode="r")[...] if path.name.endswith(".zarr") else tifffile.imread(path)


def outputs_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read_output(p) for p in sorted(folder.iterdir()) if not p.name.startswith(".")
            and p.suffix != ".csv"}


@pytest.fixture(scope="module")
def care2d(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("care") / "care.ckpt", "experiment=demo_care", *SMALL)


@pytest.fixture(scope="module")
def unet3d(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("unet3d") / "u.ckpt", "data=synthetic_nuclei_3d", *SMALL,
                           spatial_dims=3, pixel_size=[2.0, 0.5, 0.5])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder of TIFFs and OME-Zarr stores of several sizes (one of many blocks)."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(90, 70), (130, 150), (64, 64)]):
        tifffile.imwrite(folder / f"t{i}.tif", rng.gamma(2.0, 200.0, shape).astype(np.uint16))
    write_ome_zarr(folder / "big.ome.zarr", rng.gamma(2.0, 200.0, (300, 260)).astype(np.uint16), "yx",
                   {"y": 0.5, "x": 0.5}, chunks=(64, 64))
    write_ome_zarr(folder / "old.ome.zarr", rng.gamma(2.0, 200.0, (2, 96, 80)).astype(np.uint16), "tyx",
                   {"t": 1.0, "y": 0.5, "x": 0.5}, version="0.4", chunks=(1, 48, 48))
    return folder


def predict(model: Path, inputs: Path, out: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    args = ["predict", str(model), str(inputs), "--out", str(out), "--no-progress", "--block-size", "64", *extra]
    if processes == 1:
        return run_cli(*args)
    command = [TORCHRUN, "--standalone", f"--nproc_per_node={processes}", BIOFLOW, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_two_processes_write_the_same_bytes_as_one(care2d, inputs, tmp_path):
    one = predict(care2d, inputs, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = predict(care2d, inputs, tmp_path / "two", processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    first, second = outputs_of(tmp_path / "one"), outputs_of(tmp_path / "two")
    assert sorted(first) == ["big.ome.zarr", "old.ome.zarr", "t0.tif", "t1.tif", "t2.tif"]
    assert sorted(second) == sorted(first)
    for name in first:
        assert first[name].dtype == second[name].dtype and np.array_equal(first[name], second[name]), name
    assert two.stdout.count("big.ome.zarr ->") == 1  # one report line per input, from the first process
    shares = two.stdout.split("pieces of work (inputs and blocks): ")[1].splitlines()[0].split(" + ")
    assert len(shares) == 2 and all(int(n) > 0 for n in shares)  # both processes predicted
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.endswith((".partial", ".blocks"))]


def test_blocks_give_the_whole_image_prediction(care2d, inputs, tmp_path):
    """An OME-Zarr output predicted in 64-pixel blocks equals the TIFF output predicted whole."""
    result = predict(care2d, inputs / "big.ome.zarr", tmp_path / "z")
    assert result.returncode == 0, result.stderr[-3000:]
    result = predict(care2d, inputs / "big.ome.zarr", tmp_path / "t", "--out-format", "tiff")
    assert result.returncode == 0, result.stderr[-3000:]
    blocked, whole = read_output(tmp_path / "z" / "big.ome.zarr"), read_output(tmp_path / "t" / "big.tif")
    assert blocked.shape == (1, 300, 260) and whole.shape == (300, 260)  # tifffile drops the C axis of 1
    whole = whole[None]
    np.testing.assert_allclose(blocked, whole, rtol=1e-4, atol=1e-3 * float(np.abs(whole).max()))
    # the input's chunks, version and pixel size carry over
    out = zarr.open_group(str(tmp_path / "z" / "big.ome.zarr"), mode="r")
    assert out["0"].chunks == (1, 64, 64)
    multiscale = out.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["c", "y", "x"]
    assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.5, 0.5]
    assert out.attrs["bioflow"]["source"] == str((inputs / "big.ome.zarr").resolve())


def test_killed_job_resumes_to_the_bytes_of_an_uninterrupted_one(care2d, inputs, tmp_path):
    reference = predict(care2d, inputs, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "out"
    command = [BIOFLOW, "predict", str(care2d), str(inputs), "--out", str(out), "--no-progress", "--block-size", "64",
               "--tile-size", "32", "--overlap", "16"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    blocks = out / ".big.ome.zarr.blocks"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None and len(list(blocks.glob("*"))) < 3:
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be killed: " + job.stderr.read().decode()[-2000:]
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert (out / ".big.ome.zarr.partial").is_dir() and not (out / "big.ome.zarr").exists()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # same tiles as the reference? no: other tile sizes give other float rounding, so compare a
    # third, uninterrupted run with the same options
    uninterrupted = subprocess.run(command[:5] + [str(tmp_path / "plain")] + command[6:], capture_output=True,
                                   text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    resumed, plain = outputs_of(out), outputs_of(tmp_path / "plain")
    assert sorted(resumed) == sorted(plain) == sorted(outputs_of(tmp_path / "reference"))
    for name in plain:
        assert np.array_equal(resumed[name], plain[name]), name
    assert not [p for p in out.iterdir() if p.name.endswith((".partial", ".blocks"))]
    # a finished job run again does nothing and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "5 of 5 input(s) done in an earlier run" in rerun.stdout, rerun.stdout + rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".prediction-job.json"} == \
        {k: v for k, v in before.items() if k != ".prediction-job.json"}


def test_another_command_into_a_finished_folder_is_refused(care2d, inputs, tmp_path):
    first = predict(care2d, inputs / "t0.tif", tmp_path / "o")
    assert first.returncode == 0, first.stderr
    other = predict(care2d, inputs / "t0.tif", tmp_path / "o", "--tta")
    assert other.returncode == 2
    assert "exists already" in other.stderr and "--overwrite" in other.stderr


def nuclei_volumes(folder: Path, n: int, version: str) -> None:
    for i in range(n):
        image, labels = synthetic_nuclei_image((16, 64, 48), seed=5, index=i, anisotropy=2.0)
        write_ome_zarr(folder / f"vol{i}.ome.zarr", image.astype(np.float32), "zyx", {"z": 2.0, "y": 0.5, "x": 0.5},
                       labels={"nuclei": labels.astype(np.int32)}, version=version, chunks=(8, 32, 32))


def test_a_foreign_3d_ome_zarr_with_labels_trains_and_predicts(tmp_path):
    stores = tmp_path / "stores"
    stores.mkdir()
    nuclei_volumes(stores, 5, "0.4")
    result = run_cli(
        "train", "data=ome_zarr", f"data.source.images={stores}", "data.source.labels=nuclei",
        "data.patch_size=[8,32,32]", "data.patches_per_epoch=8", "data.batch_size=2", "data.num_workers=0",
        "data.split.val=[vol3]", "data.split.test=[vol4]", *SMALL, "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "logger.experiment_name=zarr3d", f"project_dir={tmp_path / 'project'}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = next((tmp_path / "project" / "outputs").glob("*/*/checkpoints/best-*.ckpt"))
    saved = __import__("torch").load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["hyper_parameters"]["data_info"]["pixel_size"] == [2.0, 0.5, 0.5]
    out = tmp_path / "out"
    predicted = run_cli("predict", str(checkpoint), str(stores / "vol0.ome.zarr"), "--out", str(out), "--no-progress")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    labels = zarr.open_group(str(out / "vol0.ome.zarr"), mode="r")
    assert labels["0"].shape == (16, 64, 48) and labels["0"].dtype == np.uint8
    assert "image-label" in labels.attrs  # NGFF 0.4, as the input
    scale = labels.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [2.0, 0.5, 0.5]
    # the same prediction as the same volume given as a TIFF
    tif = tmp_path / "vol0.ome.tif"
    tifffile.imwrite(tif, zarr.open_array(str(stores / "vol0.ome.zarr" / "s0"))[...], ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeY": 0.5, "PhysicalSizeX": 0.5})
    as_tiff = run_cli("predict", str(checkpoint), str(tif), "--out", str(tmp_path / "tiff"), "--no-progress")
    assert as_tiff.returncode == 0, as_tiff.stderr[-3000:]
    assert (labels["0"][...] == tifffile.imread(tmp_path / "tiff" / "vol0.tif")).mean() > 0.999


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_source_reads_axes_pixel_sizes_and_labels_lazily(tmp_path, version):
    from bioflow.data.omezarr import LazyZarr
    from bioflow.data.sources import ome_zarr

    nuclei_volumes(tmp_path, 2, version)
    records = ome_zarr(tmp_path, labels="auto")
    assert [r.name for r in records] == ["vol0", "vol1"]
    assert isinstance(records[0].image, LazyZarr) and isinstance(records[0].target, LazyZarr)
    assert records[0].image.shape == (1, 16, 64, 48) and records[0].pixel_size == (2.0, 0.5, 0.5)
    image, labels = synthetic_nuclei_image((16, 64, 48), seed=5, index=0, anisotropy=2.0)
    np.testing.assert_array_equal(records[0].image[0, 3:9, 10:40, 5:20], image[3:9, 10:40, 5:20].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(records[0].target), labels)


def test_bad_ome_zarr_inputs_give_one_line(tmp_path, care2d):
    from bioflow.data.sources import ome_zarr
    from bioflow.errors import DataError

    nuclei_volumes(tmp_path, 1, "0.5")
    with pytest.raises(DataError, match="no label image 'nucleus'; did you mean 'nuclei'"):
        ome_zarr(tmp_path, labels="nucleus")
    with pytest.raises(DataError, match="no resolution level 3"):
        ome_zarr(tmp_path, level=3)
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w")
    with pytest.raises(DataError, match="without NGFF multiscales metadata"):
        ome_zarr(plain)
    (tmp_path / "broken.ome.zarr").mkdir()
    (tmp_path / "broken.ome.zarr" / "zarr.json").write_text("{not json")
    result = run_cli("predict", str(care2d), str(tmp_path / "broken.ome.zarr"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "broken.ome.zarr" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) <= 3, result.stderr
    assert not (tmp_path / "o").exists()


def test_job_record_lists_what_was_written(tmp_path, care2d, inputs):
    """A prediction with --project-dir of an existing store is recorded there."""
    from mlflow.tracking import MlflowClient

    from bioflow.tracking.store import Store

    Store.create(tmp_path / "project").prepare()
    result = predict(care2d, inputs / "t1.tif", tmp_path / "o", "--project-dir", str(tmp_path / "project"))
    assert result.returncode == 0, result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("predictions").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["model"] == str(care2d) and run.data.params["out"] == str(tmp_path / "o")
    assert run.data.metrics["images"] == 1 and run.data.metrics["pixels"] == 130 * 150
    assert run.data.metrics["pixels_per_second"] > 0
    listed = Path(client.download_artifacts(run.info.run_id, "outputs.csv", str(tmp_path))).read_text()
    assert str(tmp_path / "o" / "t1.tif") in listed and "done" in listed
    assert json.loads((tmp_path / "o" / ".prediction-job.json").read_text())["identity"]["model"] == str(care2d.resolve())


def test_two_slurm_tasks_share_the_work_like_torchrun(care2d, inputs, tmp_path):
    """Under SLURM (srun, one task per GPU or core) the ranks come from SLURM's variables, through
    Lightning's cluster environment; here two tasks on one node are simulated."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "slurm"
    command = [BIOFLOW, "predict", str(care2d), str(inputs), "--out", str(out), "--no-progress", "--block-size", "64"]
    tasks = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_STEP_ID": "0",
               "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "predict",
               "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        tasks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ended = [task.communicate(timeout=600) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], ended[0][1][-2000:] + ended[1][1][-2000:]
    assert ended[0][0].count(" -> ") == 5 and ended[1][0].count(" -> ") == 0  # reported once, by rank 0
    assert "2 processes shared" in ended[0][0]
    single = predict(care2d, inputs, tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    first, second = outputs_of(tmp_path / "single"), outputs_of(out)
    assert sorted(first) == sorted(second)
    assert all(np.array_equal(first[k], second[k]) for k in first)


def with_foreground(path: Path, image: np.ndarray) -> Path:
    """The untrained segmentation model at ``path``, its head's bias moved so that about half of
    ``image`` is foreground (a random network calls everything background)."""
    import torch

    from bioflow.checkpoint import load_checkpoint
    from bioflow.loading import task_from_checkpoint

    task = task_from_checkpoint(load_checkpoint(path), str(path))
    checkpoint = torch.load(path, weights_only=False)
    with torch.no_grad():
        norm = task.normalizer().norm_for(image[None])
        logits = task.predict_image(torch.from_numpy(norm(image[None]))).numpy()
    margin = logits[1] - logits[0]
    checkpoint["state_dict"]["model.head.bias"][1] -= float(np.median(margin))
    torch.save(checkpoint, path)
    return path


def test_outputs_of_the_whole_image_meet_in_one_session_across_processes(tmp_path):
    """Instances of a post-processor (as StarDist's global NMS) need the whole image: the blocks'
    raw output is spooled and replayed through one session; 1 and 2 processes agree byte for byte,
    and with the whole-image TIFF prediction up to float ties."""
    image, _ = synthetic_nuclei_image((300, 260), seed=1, index=0)
    model = make_checkpoint(tmp_path / "cc.ckpt", *SMALL, "postprocessor=connected_components")
    with_foreground(model, image)
    store = write_ome_zarr(tmp_path / "in" / "n.ome.zarr", image.astype(np.float32), "yx", {"y": 1.0, "x": 1.0},
                           chunks=(64, 64))
    one = predict(model, store, tmp_path / "one")
    two = predict(model, store, tmp_path / "two", processes=2)
    whole = predict(model, store, tmp_path / "whole", "--out-format", "tiff")
    for result in (one, two, whole):
        assert result.returncode == 0, result.stderr[-3000:]
    first, second = outputs_of(tmp_path / "one"), outputs_of(tmp_path / "two")
    assert sorted(first) == ["n.ome.zarr", "n_instances.ome.zarr"] == sorted(second)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    instances = first["n_instances.ome.zarr"]
    assert 5 < instances.max() and 0.2 < (instances > 0).mean() < 0.8
    assert (instances == tifffile.imread(tmp_path / "whole" / "n_instances.tif")).mean() > 0.999
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.endswith((".partial", ".blocks"))]


def stardist_with_objects(path: Path, image: np.ndarray) -> Path:
    """An untrained StarDist model at ``path`` made to find objects: every ray 6 pixels long, and
    the object probability above its threshold on about 3% of the grid (a random network finds
    none)."""
    import torch

    from bioflow.checkpoint import load_checkpoint
    from bioflow.loading import task_from_checkpoint

    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["state_dict"]
    state["model.dist.weight"].zero_()
    state["model.dist.bias"].fill_(6.0)
    torch.save(checkpoint, path)
    task = task_from_checkpoint(load_checkpoint(path), str(path))
    with torch.no_grad():
        norm = task.normalizer().norm_for(image[None])
        logits = task.predict_image(torch.from_numpy(norm(image[None])))[0].numpy()
    state["model.prob.bias"] -= float(np.quantile(logits, 0.97))
    state["thresholds"] = torch.tensor([0.5, 0.4])
    torch.save(checkpoint, path)
    return path


def test_stardist_blocks_of_two_processes_meet_in_one_global_nms(tmp_path):
    """StarDist's candidates from the blocks of every process go into one NMS: labels and object
    table of two processes are those of one, and those of the whole image predicted as a TIFF."""
    image, _ = synthetic_nuclei_image((200, 180), seed=9, index=1)
    model = make_checkpoint(tmp_path / "sd.ckpt", "task=stardist", *SMALL, "task.n_rays=16")
    stardist_with_objects(model, image)
    store = write_ome_zarr(tmp_path / "in" / "nuclei.ome.zarr", image.astype(np.float32), "yx", chunks=(64, 64))
    one = predict(model, store, tmp_path / "one")
    two = predict(model, store, tmp_path / "two", processes=2)
    whole = predict(model, store, tmp_path / "whole", "--out-format", "tiff")
    for result in (one, two, whole):
        assert result.returncode == 0, result.stderr[-3000:]
    first, second = (read_output(tmp_path / o / "nuclei.ome.zarr") for o in ("one", "two"))
    assert first.max() > 10 and np.array_equal(first, second)
    table = (tmp_path / "one" / "nuclei_objects.csv").read_text()
    assert table == (tmp_path / "two" / "nuclei_objects.csv").read_text() and len(table.splitlines()) == first.max() + 1
    assert (first == tifffile.imread(tmp_path / "whole" / "nuclei.tif")).mean() > 0.99


def test_a_rank_killed_mid_job_is_resumed_by_the_same_command(care2d, inputs, tmp_path):
    """kill -9 of one of two processes: torchrun stops the other; the same command finishes the job
    with the bytes of an uninterrupted run."""
    out = tmp_path / "out"
    predict_args = [BIOFLOW, "predict", str(care2d), str(inputs), "--no-progress", "--block-size", "64",
                    "--tile-size", "32", "--overlap", "16"]
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", *predict_args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    blocks = out / ".big.ome.zarr.blocks"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None and len(list(blocks.glob("*"))) < 3:
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be killed: " + job.stderr.read().decode()[-2000:]
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    assert job.wait(timeout=120) != 0
    assert not (out / "big.ome.zarr").exists()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    plain = subprocess.run(predict_args + ["--out", str(tmp_path / "plain")], capture_output=True, text=True,
                           timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    resumed, expected = outputs_of(out), outputs_of(tmp_path / "plain")
    assert sorted(resumed) == sorted(expected) and len(expected) == 5
    assert all(np.array_equal(resumed[k], expected[k]) for k in expected)
    assert not [p for p in out.iterdir() if p.name.endswith((".partial", ".blocks"))]


def test_pieces_of_another_job_are_never_taken_up(care2d, inputs, tmp_path):
    """Partial outputs and block marks left by another command (here: all blocks marked done over a
    store of zeros) are discarded, not finished; other inputs with the same names are refused."""
    import shutil

    first = predict(care2d, inputs / "big.ome.zarr", tmp_path / "plain")
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(tmp_path / "plain" / "big.ome.zarr", out / ".big.ome.zarr.partial")
    zarr.open_array(str(out / ".big.ome.zarr.partial" / "0"), mode="r+")[...] = 0
    (out / ".big.ome.zarr.blocks").mkdir()
    for b in range(25):
        (out / ".big.ome.zarr.blocks" / f"0-{b}").touch()
    record = json.loads((tmp_path / "plain" / ".prediction-job.json").read_text())
    record["identity"]["options"]["tta"] = True  # another command's
    (out / ".prediction-job.json").write_text(json.dumps(record))
    again = predict(care2d, inputs / "big.ome.zarr", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert np.array_equal(read_output(out / "big.ome.zarr"), read_output(tmp_path / "plain" / "big.ome.zarr"))
    # the same names from another folder: refused, not "done before"
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(inputs / "big.ome.zarr", other / "big.ome.zarr")
    refused = predict(care2d, other / "big.ome.zarr", out)
    assert refused.returncode == 2 and "exists already" in refused.stderr


def test_ngff_layouts_of_other_tools(tmp_path):
    """A single Z plane (bioformats2raw writes TCZYX) is a 2D image; a multiscale-level scale
    multiplies the level's; hidden stores (unfinished outputs) are no inputs."""
    from bioflow.data.images import find_images
    from bioflow.data.omezarr import read_zarr_frames

    plane = np.arange(2 * 48 * 40, dtype=np.uint16).reshape(1, 2, 1, 48, 40)
    write_ome_zarr(tmp_path / "plane.ome.zarr", plane, "tczyx", {"t": 1.0, "c": 1.0, "z": 3.0, "y": 0.5, "x": 0.5},
                   version="0.4")
    frames = read_zarr_frames(tmp_path / "plane.ome.zarr", channels=True)
    assert frames[0].array.shape == (2, 48, 40) and frames[0].pixel_size == (0.5, 0.5)
    np.testing.assert_array_equal(frames[0].array[1], plane[0, 1, 0])
    group = zarr.open_group(str(tmp_path / "plane.ome.zarr"), mode="r+")
    multiscales = group.attrs["multiscales"]
    multiscales[0]["coordinateTransformations"] = [{"type": "scale", "scale": [1.0, 1.0, 1.0, 2.0, 2.0]}]
    group.attrs["multiscales"] = multiscales
    assert read_zarr_frames(tmp_path / "plane.ome.zarr", channels=True)[0].pixel_size == (1.0, 1.0)
    (tmp_path / ".plane.ome.zarr.partial").mkdir()
    (tmp_path / ".plane.ome.zarr.partial" / "zarr.json").write_text("{}")
    assert [p.name for p in find_images(tmp_path)] == ["plane.ome.zarr"]


def test_a_block_size_for_other_axes_is_one_line(care2d, inputs, tmp_path):
    result = predict(care2d, inputs / "big.ome.zarr", tmp_path / "o", "--block-size", "64", "64", "64")
    assert result.returncode == 2 and "--block-size 64 64 64: one value or one per spatial axis" in result.stderr
    assert "Traceback" not in result.stderr
