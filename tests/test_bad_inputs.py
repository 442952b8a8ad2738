"""The bad-input catalogue: every case ends with one clean line, a non-zero exit, and nothing touched.

Each case runs a ``bioflow`` command (in this process, through ``bioflow.cli.main``, the code the
console script runs) on inputs made here, and checks that

* the exit status is not 0 and no traceback was printed,
* stderr carries one ``bioflow: error:`` line, under 200 characters, naming the file, option or
  config key at fault,
* no file in the case's folder was changed or removed, and nothing was created there (no output
  folder, no MLflow store).

A few cases run the real console script in a subprocess as well. The fuzz tests corrupt a valid
TIFF and a valid checkpoint at random (fixed seeds) and require a clean error or a correct result,
never a traceback or a hang. With ``BIOFLOW_CATALOGUE=<file>`` set, each case's message is appended
to that file (case id, tab, the line), to read the whole catalogue at once.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile

from bioflow.cli import main
from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
from bioflow.testing import make_checkpoint
from tests.helpers import run_cli

TINY_TRAIN = ["trainer.max_epochs=1", "data.patches_per_epoch=8", "data.batch_size=2", "model.depth=1",
              "model.base_channels=4", "data.num_workers=0", "trainer.enable_progress_bar=false"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return int(code or 0), out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Valid inputs the cases break: image/mask folders, a model, a 3D file, a store-less folder."""
    root = tmp_path_factory.mktemp("world")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(4):
        image, labels = synthetic_nuclei_image((48, 48), seed=21, index=i)
        tifffile.imwrite(images / f"n{i}.tif", (image * 1000).astype(np.uint16))
        tifffile.imwrite(masks / f"n{i}.tif", labels.astype(np.uint16))
    model = make_checkpoint(root / "model.ckpt", "experiment=demo_unet", "model.depth=1", "model.base_channels=4")
    make_checkpoint(root / "care.ckpt", "experiment=demo_care", "model.depth=1", "model.base_channels=4")
    tifffile.imwrite(root / "stack.tif", np.zeros((3, 32, 32), np.uint16), photometric="minisblack")
    tifffile.imwrite(root / "rgb.tif", np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(root / "good.tif", (synthetic_nuclei_image((48, 48), seed=3)[0] * 1000).astype(np.uint16))
    from bioflow.tracking.store import Store

    Store.create(root / "truncated").prepare()  # a real store, then cut short (a copy gone wrong)
    database = root / "truncated" / "mlflow.db"
    database.write_bytes(database.read_bytes()[: database.stat().st_size // 3])
    return {"root": root, "images": images, "masks": masks, "model": model}


def folder_with(tmp_path: Path, world, change: Callable[[Path, Path], None] | None = None) -> tuple[Path, Path]:
    """A copy of the image and mask folders with one thing broken."""
    import shutil

    images, masks = tmp_path / "images", tmp_path / "masks"
    shutil.copytree(world["images"], images)
    shutil.copytree(world["masks"], masks)
    if change is not None:
        change(images, masks)
    return images, masks


def _mismatched_mask(images: Path, masks: Path) -> None:
    tifffile.imwrite(masks / "n2.tif", np.ones((48, 40), np.uint16))


def _missing_mask(images: Path, masks: Path) -> None:
    (masks / "n1.tif").unlink()


def _not_a_tiff(images: Path, masks: Path) -> None:
    (images / "n3.tif").write_bytes(b"this is no TIFF file, just text")


def _truncated(images: Path, masks: Path) -> None:
    data = (images / "n0.tif").read_bytes()
    (images / "n0.tif").write_bytes(data[: len(data) // 2])


def _nan_image(images: Path, masks: Path) -> None:
    image = np.random.default_rng(0).random((48, 48)).astype(np.float32)
    image[5, 5] = np.nan
    tifffile.imwrite(images / "n1.tif", image)


def _empty_masks(images: Path, masks: Path) -> None:
    for p in masks.iterdir():
        tifffile.imwrite(p, np.zeros((48, 48), np.uint16))


def _constant_images(images: Path, masks: Path) -> None:
    for p in images.iterdir():
        tifffile.imwrite(p, np.full((48, 48), 7, np.uint16))


def _float_mask(images: Path, masks: Path) -> None:
    tifffile.imwrite(masks / "n0.tif", np.full((48, 48), 0.5, np.float32))


def _no_tiffs(images: Path, masks: Path) -> None:
    for p in images.iterdir():
        p.rename(p.with_suffix(".png"))


def _many_labels(images: Path, masks: Path) -> None:
    m = tifffile.imread(masks / "n0.tif")
    tifffile.imwrite(masks / "n0.tif", np.where(m > 0, m + 99, 0).astype(np.uint16))  # labels 100, 101, ...


def _three_classes(images: Path, masks: Path) -> None:
    for i, p in enumerate(sorted(masks.iterdir())):
        m = tifffile.imread(p)
        tifffile.imwrite(p, np.where(m > 0, 1 + (i == 1), 0).astype(np.uint8))  # n1 holds class 2


# (id, how the folders are broken, extra overrides, what the message must name)
TRAIN_DATA_CASES = [
    ("mask-shape", _mismatched_mask, [], "masks/n2.tif"),
    ("missing-mask", _missing_mask, [], "n1.tif"),
    ("not-a-tiff", _not_a_tiff, [], "n3.tif"),
    ("truncated", _truncated, [], "n0.tif"),
    ("nan-pixels", _nan_image, [], "n1.tif"),
    ("all-masks-empty", _empty_masks, [], "n"),
    ("all-masks-empty-allowed", _empty_masks, ["data.allow_empty_masks=true"], "foreground"),
    ("constant-images", _constant_images, [], "constant"),
    ("float-mask", _float_mask, [], "masks/n0.tif"),
    ("no-tiffs", _no_tiffs, [], "images"),
    ("unknown-channel", None, ["data.channels=[5]"], "data.channels"),
    ("unknown-split-entry", None, ["data.split.test=[nope]"], "data.split.test"),
    ("too-few-foreground-patches", None, ["data.min_foreground=0.99"], "data.min_foreground"),
    ("n2v-given-masks", None, ["task=n2v"], "data.source.masks"),
    ("care-given-masks", None, ["task=care"], "care"),
    ("patch-not-multiple", None, ["model.depth=3", "data.patch_size=[36,36]"], "data.patch_size"),
    ("instance-labels-as-classes", _many_labels, ["task.target=classes"], "task.target=binary"),
    ("class-beyond-num-classes", _three_classes, ["task.target=classes", "task.num_classes=2"], "masks/n1.tif"),
    ("class-names-miscounted", _three_classes, ["task.target=classes", "task.class_names=[a,b]"], "task.class_names"),
]


@pytest.mark.parametrize(("broken", "extra", "named"), [c[1:] for c in TRAIN_DATA_CASES], ids=[c[0] for c in TRAIN_DATA_CASES])
def test_training_on_bad_data(broken, extra, named, world, tmp_path, monkeypatch):
    images, masks = folder_with(tmp_path, world, broken)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    argv = ["train", "experiment=unet_own_data", f"data.source.images={images}", f"data.source.masks={masks}",
            f"project_dir={tmp_path / 'project'}", "data.patch_size=[32,32]", *TINY_TRAIN, *extra]
    check_failure(run(argv), named)
    assert snapshot(tmp_path) == before


CONFIG_CASES = [
    ("unknown-key", ["model.dept=2"], "model.dept"),
    ("unknown-group-option", ["loss=focall"], "loss=focall"),
    ("wrong-type", ["trainer.max_epochs=abc"], "trainer.max_epochs"),
    ("endless-epochs", ["trainer.max_epochs=-1"], "trainer.max_epochs"),
    ("fraction-out-of-range", ["data.split.val=1.5"], "data.split.val"),
    ("loss-for-another-task", ["task=n2v", "loss=ce_dice"], "loss=ce_dice"),
    ("unused-batch-transform", ["batch_transform=n2v"], "batch_transform=n2v"),
    ("unknown-architecture", ["model.name=unett"], "unett"),
    ("threshold-out-of-range", ["task=stardist", "task.prob_thresh=1.5"], "task.prob_thresh"),
    ("percentiles-reversed", ["data.normalize.low=99", "data.normalize.high=10"], "data.normalize.high"),
    ("zero-learning-rate", ["optimizer.lr=0"], "optimizer.lr"),
    ("missing-folder", ["data=tiff_folder", "data.source.images=/no/such/folder", "data.source.masks=/no/such"], "/no/such"),
    ("missing-ome-zarr", ["data=ome_zarr", "data.source.images=/no/such.ome.zarr", "data.source.labels=auto"], "/no/such.ome.zarr"),
    ("ome-zarr-level-not-a-number", ["data=ome_zarr", "data.source.images=/x.ome.zarr", "data.source.level=high"], "data.source.level"),
    ("resume-nothing", ["resume=last", "logger.experiment_name=nothing"], "nothing"),
    ("init-from-garbage", ["init_from=garbage.ckpt"], "garbage.ckpt"),
    ("unquoted-non-ascii-name", ["data.split.test=[细胞 3]"], "\"data.split.test=['细胞 3']\""),
    ("unclosed-list", ["data.split.test=[a,b"], "data.split.test=[a,b"),
    ("an-unknown-option", ["--frobnicate"], "--frobnicate"),
    ("likelihood-loss-not-probabilistic", ["experiment=demo_care", "loss=laplace_nll"], "task.probabilistic=true"),
    ("probabilistic-without-likelihood", ["experiment=demo_care", "task.probabilistic=true", "loss=ce_dice"], "loss"),
    ("maxout-of-one-piece", ["model.activation=maxout", "model.maxout_pieces=1"], "maxout_pieces"),
]


@pytest.mark.parametrize(("overrides", "named"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_training_with_bad_config(overrides, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00" * 64)
    before = snapshot(tmp_path)
    check_failure(run(["train", f"project_dir={tmp_path / 'project'}", *TINY_TRAIN, *overrides]), named)
    assert snapshot(tmp_path) == before


def _crafted_checkpoint(path: Path) -> None:
    import torch

    class Payload:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    torch.save({"state_dict": {}, "bioflow": {}, "hyper_parameters": Payload()}, path)


PREDICT_CASES = [
    ("out-is-a-file", ["{model}", "{good}", "--out", "{afile}"], "--out"),
    ("tile-size-zero", ["{model}", "{good}", "--out", "{out}", "--tile-size", "0"], "--tile-size"),
    ("tile-size-negative", ["{model}", "{good}", "--out", "{out}", "--tile-size", "-5"], "--tile-size"),
    ("batch-size-zero", ["{model}", "{good}", "--out", "{out}", "--batch-size", "0"], "--batch-size"),
    ("device-banana", ["{model}", "{good}", "--out", "{out}", "--device", "banana"], "--device banana"),
    ("device-missing-gpu", ["{model}", "{good}", "--out", "{out}", "--device", "cuda:99"], "--device cuda:99"),
    ("not-a-checkpoint", ["{garbage}", "{good}", "--out", "{out}"], "garbage.ckpt"),
    ("crafted-checkpoint", ["{evil}", "{good}", "--out", "{out}"], "evil.ckpt"),
    ("missing-input", ["{model}", "{root}/nothing.tif", "--out", "{out}"], "nothing.tif"),
    ("3d-without-axes", ["{model}", "{stack}", "--out", "{out}"], "--axes"),
    ("channels-do-not-fit", ["{model}", "{rgb}", "--out", "{out}"], "rgb.tif"),
    ("bad-axes-option", ["{model}", "{good}", "--out", "{out}", "--axes", "QYX"], "--axes"),
    ("unknown-run", ["0123456789abcdef0123456789abcdef", "{good}", "--out", "{out}", "--project-dir", "{root}"], "0123456789abcdef"),
    ("neither-file-nor-run", ["mymodel", "{good}", "--out", "{out}"], "mymodel"),
    ("confidence-of-a-restoration", ["{care}", "{good}", "--out", "{out}", "--confidence"], "--confidence"),
    ("tta-spread-output-exists", ["{model}", "{good}", "--out", "{taken}", "--tta-spread"], "good_tta_spread.tif"),
    ("level-of-a-tiff", ["{model}", "{good}", "--out", "{out}", "--level", "1"], "--level"),
    ("level-negative", ["{model}", "{good}", "--out", "{out}", "--level", "-1"], "--level"),
    ("block-size-zero", ["{model}", "{good}", "--out", "{out}", "--block-size", "0"], "--block-size"),
    ("level-not-in-store", ["{model}", "{store}", "--out", "{out}", "--level", "3"], "no resolution level 3"),
    ("zarr-without-ngff", ["{model}", "{plainzarr}", "--out", "{out}"], "plain.zarr"),
    ("broken-ome-zarr", ["{model}", "{brokenzarr}", "--out", "{out}"], "broken.ome.zarr"),
    ("ome-zarr-of-another-dimensionality", ["{model}", "{volume}", "--out", "{out}"], "volume.ome.zarr"),
]


def _zarr_stores(folder: Path) -> None:
    """A good 2D OME-Zarr store, a 3D one, a zarr group without NGFF metadata, and a store whose
    metadata is not JSON (made only where the zarr extra is installed)."""
    try:
        import zarr

        from tests.helpers import write_ome_zarr
    except ImportError:
        return
    rng = np.random.default_rng(0)
    write_ome_zarr(folder / "good.ome.zarr", rng.integers(0, 4000, (48, 40), dtype=np.uint16), "yx", {"y": 0.5, "x": 0.5})
    write_ome_zarr(folder / "volume.ome.zarr", rng.integers(0, 4000, (4, 48, 40), dtype=np.uint16), "zyx")
    zarr.open_group(str(folder / "plain.zarr"), mode="w").create_array("0", shape=(8, 8), dtype="u2")
    (folder / "broken.ome.zarr").mkdir()
    (folder / "broken.ome.zarr" / "zarr.json").write_text("{not json")


@pytest.fixture
def predict_world(world, tmp_path) -> dict[str, str]:
    import shutil

    for name in ("good.tif", "stack.tif", "rgb.tif"):
        shutil.copy(world["root"] / name, tmp_path / name)
    shutil.copy(world["model"], tmp_path / "model.ckpt")
    shutil.copy(world["root"] / "care.ckpt", tmp_path / "care.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "damaged").mkdir()  # a project whose store was overwritten
    (tmp_path / "damaged" / "mlflow.db").write_bytes(b"not a database, overwritten by mistake\n" * 100)
    shutil.copytree(world["root"] / "truncated", tmp_path / "truncated")
    _crafted_checkpoint(tmp_path / "evil.ckpt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "good_tta_spread.tif").write_bytes(b"a spread map of an earlier run")
    _zarr_stores(tmp_path)
    names = {"model": "model.ckpt", "good": "good.tif", "stack": "stack.tif", "rgb": "rgb.tif", "garbage": "garbage.ckpt",
             "evil": "evil.ckpt", "afile": "afile", "out": "out", "care": "care.ckpt",
             "taken": "taken", "store": "good.ome.zarr", "plainzarr": "plain.zarr", "brokenzarr": "broken.ome.zarr",
             "volume": "volume.ome.zarr", "damaged": "damaged", "truncated": "truncated"}
    return {"root": str(tmp_path), **{k: str(tmp_path / v) for k, v in names.items()}}


@pytest.mark.parametrize(("argv", "named"), [c[1:] for c in PREDICT_CASES], ids=[c[0] for c in PREDICT_CASES])
def test_prediction_with_bad_input(argv, named, predict_world, monkeypatch):
    root = Path(predict_world["root"])
    monkeypatch.setenv("BIOFLOW_STATE_DIR", str(root / ".." / f"{root.name}-state"))
    before = snapshot(root)
    check_failure(run(["predict", *[a.format(**predict_world) for a in argv], "--no-progress"]), named)
    assert snapshot(root) == before


OTHER_CASES = [
    ("evaluate-garbage", ["evaluate", "{garbage}", "--no-log"], "garbage.ckpt"),
    ("evaluate-unknown-run", ["evaluate", "0123456789abcdef0123456789abcdef", "--project-dir", "{root}"], "0123456789abcdef"),
    ("evaluate-crafted", ["evaluate", "{evil}", "--no-log"], "evil.ckpt"),
    ("export-garbage", ["export", "{garbage}", "--out", "{root}/model.zip"], "garbage.ckpt"),
    ("export-over-a-file", ["export", "{model}", "--out", "{afile}"], "afile"),
    ("plugins-unknown-kind", ["plugins", "--kind", "losss"], "losss"),
    ("dashboard-without-store", ["dashboard", "--project-dir", "{root}/nothing"], "nothing"),
    # a damaged store: one line naming the file, before any work, in every command
    ("train-damaged-store", ["train", "experiment=demo_unet", "project_dir={damaged}", *TINY_TRAIN], "damaged/mlflow.db"),
    ("predict-damaged-store", ["predict", "{model}", "{good}", "--out", "{out}", "--project-dir", "{damaged}"],
     "damaged/mlflow.db"),
    ("evaluate-damaged-store", ["evaluate", "0123456789abcdef0123456789abcdef", "--project-dir", "{damaged}"],
     "damaged/mlflow.db"),
    ("evaluate-truncated-store", ["evaluate", "0123456789abcdef0123456789abcdef", "--project-dir", "{truncated}"],
     "truncated/mlflow.db"),
    ("export-damaged-store", ["export", "0123456789abcdef0123456789abcdef", "--out", "{root}/model.zip",
                              "--project-dir", "{damaged}"], "damaged/mlflow.db"),
    ("dashboard-damaged-store", ["dashboard", "--project-dir", "{damaged}"], "damaged/mlflow.db"),
]


@pytest.mark.parametrize(("argv", "named"), [c[1:] for c in OTHER_CASES], ids=[c[0] for c in OTHER_CASES])
def test_other_commands_with_bad_input(argv, named, predict_world, monkeypatch):
    root = Path(predict_world["root"])
    monkeypatch.setenv("BIOFLOW_STATE_DIR", str(root / ".." / f"{root.name}-state"))
    before = snapshot(root)
    check_failure(run([a.format(**predict_world) for a in argv]), named)
    assert snapshot(root) == before


def check_failure(result: tuple[int, str, str], named: str) -> None:
    code, out, err = result
    assert code != 0, f"exit 0; stdout: {out[-500:]}"
    assert "Traceback" not in err + out, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("bioflow: error:")]
    assert len(lines) == 1, err[-2000:]
    assert len(lines[0]) < 200, f"{len(lines[0])} characters: {lines[0]}"
    assert named in lines[0], lines[0]
    catalogue = os.environ.get("BIOFLOW_CATALOGUE")  # a file to collect the messages in, for reading them all
    if catalogue:
        case = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
        with open(catalogue, "a") as fh:
            fh.write(f"{case}\t{lines[0]}\n")


def test_a_folder_with_one_bad_file_predicts_the_others(predict_world):
    root = Path(predict_world["root"])
    inputs = root / "inputs"
    inputs.mkdir()
    for name in ("a.tif", "b.tif"):
        (inputs / name).write_bytes(Path(predict_world["good"]).read_bytes())
    (inputs / "bad.tif").write_bytes(b"not a tiff")
    code, out, err = run(["predict", predict_world["model"], str(inputs), "--out", predict_world["out"], "--no-progress"])
    assert code == 2 and "Traceback" not in err
    made = sorted(p.name for p in Path(predict_world["out"]).iterdir())
    assert made == [".prediction-job.json", "a.tif", "b.tif"]  # no partial file (the job's record, to resume it)
    assert "bad.tif" in err and "1 of 3" in err


def test_the_console_script_prints_the_same_one_line(predict_world):
    """The same path through the real executable (a subprocess), for two commands."""
    result = run_cli("predict", predict_world["model"], predict_world["good"], "--out", predict_world["out"],
                     "--tile-size", "0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--tile-size" in result.stderr
    result = run_cli("train", "model.dept=2", "trainer.max_epochs=1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "model.dept" in result.stderr


# -- fuzzing -----------------------------------------------------------------------------------
def corruptions(data: bytes, seed: int) -> bytes:
    """One random corruption of ``data``: flipped bytes, a truncation, or an overwritten header."""
    rng = np.random.default_rng(seed)
    raw = bytearray(data)
    kind = seed % 3
    if kind == 0:
        for pos in rng.integers(0, len(raw), size=int(rng.integers(1, 12))):
            raw[pos] = int(rng.integers(0, 256))
    elif kind == 1:
        raw = raw[: int(rng.integers(0, len(raw)))]
    else:
        end = min(len(raw), 512)
        start = int(rng.integers(0, end))
        raw[start:end] = bytes(rng.integers(0, 256, end - start, dtype=np.uint8))
    return bytes(raw)


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")
def test_corrupted_tiffs_give_a_clean_error_or_a_result(world, tmp_path):
    from bioflow.errors import BioflowError
    from bioflow.prediction import predict

    original = (world["root"] / "good.tif").read_bytes()
    outcomes = {"error": 0, "predicted": 0}
    for seed in range(60):
        target = tmp_path / f"fuzz{seed}.tif"
        target.write_bytes(corruptions(original, seed))
        with time_limit(60):
            try:
                predict(str(world["model"]), [str(target)], str(tmp_path / f"out{seed}"), progress=False, device="cpu")
                outcomes["predicted"] += 1
            except BioflowError as exc:
                assert len(exc.one_line()) < 300
                outcomes["error"] += 1
    assert outcomes["error"] >= 20  # most corruptions are caught, the rest still read as images
    assert sum(outcomes.values()) == 60


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")
def test_corrupted_checkpoints_give_a_clean_error_or_a_model(world, tmp_path):
    from bioflow.loading import load_model
    from bioflow.errors import BioflowError
    from bioflow.tracking.store import Store

    original = Path(world["model"]).read_bytes()
    errors = 0
    for seed in range(60):
        target = tmp_path / f"fuzz{seed}.ckpt"
        target.write_bytes(corruptions(original, seed))
        with time_limit(60):
            try:
                load_model(str(target), Store.create(tmp_path), inference=True)
            except BioflowError as exc:
                assert len(exc.one_line()) < 300
                errors += 1
    assert errors >= 30
    assert not (tmp_path / "mlflow.db").exists()
