"""``bioflow export``: a trained model as a BioImage Model Zoo package (bioimage.io, spec v0.5).

The package holds the network as ``pytorch_state_dict`` (with a torch-only architecture source,
for bioflow's U-Net and StarDist networks), ``torchscript`` and, where the network exports,
``onnx``; the input normalisation and the output mapping in the format's own operations; axes with
a parametrised size (the network's size multiple) and a halo (half its receptive field); test
tensors (an image of the held-out test split when the data can be read, else a generated image)
with bioflow's own prediction of them; a sample image per tensor, a cover and a README.

Every task exports, built-in or from a plugin: what a method contributes (its outputs and their
post-processing, title, citations, tags, caveat, config sections such as StarDist's non-maximum
suppression parameters) comes from the task's exchange hooks (:mod:`bioflow.tasks.exchange`).
Under ``config.bioflow`` the package keeps the training config, data info, receptive field and the
task's state, which ``bioflow predict`` and ``bioflow evaluate`` use to rebuild the task around the
package's weights (:mod:`bioflow.bioimageio.runtime`).

The parts live by concern: :mod:`~bioflow.bioimageio.description` (rdf.yaml), :mod:`~.readme`,
:mod:`~.images` (test tensors, samples, cover), :mod:`~.weights` and :mod:`~.networks`.
"""

from __future__ import annotations

import datetime
import getpass
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bioflow.bioimageio.description import (
    ExportError, description, geometry, layout, package_config, save_package, validated, write_yaml,
)
from bioflow.bioimageio.images import normalized, reference_outputs, sample_image, write_cover, write_sample
from bioflow.bioimageio.package import first_error, require_core
from bioflow.bioimageio.readme import format_source, readme
from bioflow.bioimageio.weights import write_weights

DEFAULT_LICENSE = "CC-BY-4.0"


@dataclass
class ExportResult:
    path: Path
    name: str
    weights: list[str]
    test_origin: str
    notes: list[str]


def export_model(
    model: str,
    out: str,
    *,
    project_dir: str,
    tracking_uri: str | None = None,
    authors: Sequence[str] = (),
    license_id: str | None = None,
    cites: Sequence[str] = (),
    name: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the bioimage.io package of ``model`` (a checkpoint file or an MLflow run id, found in
    the store it was trained into unless ``project_dir``/``tracking_uri`` name one) to ``out``."""
    target = Path(out)
    if target.suffix.lower() != ".zip":
        raise ExportError(f"--out {out}: a bioimage.io package is a .zip file; name it e.g. model.zip")
    if target.exists() and not overwrite:
        raise ExportError(f"{target}: exists already; choose another --out or pass --overwrite")
    if target.is_dir():
        raise ExportError(f"{target}: is a folder")
    require_core()
    citations = [parse_cite(c) for c in cites]
    from bioflow.loading import load_model
    from bioflow.tracking.store import Store, default_project_dir

    store = Store.create(project_dir or default_project_dir(), tracking_uri).check_intact()
    loaded = load_model(model, store, explicit_store=project_dir is not None or tracking_uri is not None)
    if loaded.package is not None:
        raise ExportError(f"{model}: is a bioimage.io package already; export a checkpoint or an MLflow run id")
    store = loaded.store or store
    task = loaded.task.cpu().eval()
    config = loaded.config
    info = task.data_info
    lay = layout(task)
    geo = geometry(task)
    image, origin = sample_image(task, config, geo)
    outputs = reference_outputs(task, image, lay)
    metrics = run_metrics(loaded.run_id, store)
    metrics_origin = f"MLflow run {loaded.run_id}" if metrics else ""
    title = name or f"bioflow {task.title()} {config['logger'].get('experiment_name') or ''}".strip()
    author_list = [{"name": a} for a in (authors or [default_author()])]
    license_id = license_id or DEFAULT_LICENSE
    cite_list = citations + [dict(c) for c in task.citations]

    with tempfile.TemporaryDirectory(prefix=".bioflow-export-", dir=target.parent if target.parent.exists() else None) as tmp:
        folder = Path(tmp)
        weights, weight_notes = write_weights(task, folder, lay, normalized(task, image)[None])
        np.save(folder / "test_input.npy", image[None])
        write_sample(folder / "sample_input.tif", image[None])
        for out_t, tensor in zip(lay.outputs, outputs):
            np.save(folder / f"test_output_{out_t.id}.npy", tensor)
            write_sample(folder / f"sample_output_{out_t.id}.tif", tensor)
        write_cover(folder / "cover.png", image, outputs[0][0], lay.outputs[0].id)
        (folder / "README.md").write_text(readme(
            task, config, lay, geo, name=title, origin=origin, metrics=metrics, metrics_origin=metrics_origin,
            authors=author_list, license_id=license_id, cites=cite_list, weights=list(weights), weight_notes=weight_notes,
        ))
        rdf = description(
            task, name=title, summary=f"{task.title()} ({info.spatial_dims}D) trained with bioflow on {format_source(config)}",
            authors=author_list, cites=cite_list, license_id=license_id,
            tags=["bioflow", "pytorch", f"{info.spatial_dims}d", "fluorescence-light-microscopy", *task.exchange_tags],
            lay=lay, geo=geo, weights=weights, config=package_config(task, loaded, geo, lay),
            timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        write_yaml(folder / "rdf.yaml", rdf)
        save_package(validated(folder / "rdf.yaml"), target)
    return ExportResult(target, title, list(weights), origin, weight_notes)


def run_metrics(run_id: str | None, store) -> dict[str, float]:
    """The held-out test figures of the model's MLflow run, if the store has the run."""
    if run_id is None:
        return {}
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(store.tracking_uri).get_run(run_id)
    except Exception:
        return {}
    return {k: float(v) for k, v in sorted(run.data.metrics.items()) if k.startswith("test/")}


def parse_cite(item: str) -> dict[str, str]:
    """``TEXT=DOI`` or ``TEXT=URL`` (a bare DOI or URL is its own text)."""
    text, sep, ref = item.rpartition("=")
    if not sep:
        text, ref = item, item
    text, ref = text.strip() or ref.strip(), ref.strip()
    if ref.startswith(("http://", "https://")):
        return {"text": text, "url": ref}
    if ref.startswith("10.") and "/" in ref:
        return {"text": text, "doi": ref}
    raise ExportError(f"--cite {item!r}: give TEXT=DOI (e.g. 10.1234/abcd) or TEXT=URL")


def default_author() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def check_package(path: Path) -> tuple[bool, str]:
    """``bioimageio test`` of a package: whether it passed and its summary line."""
    from bioimageio.core import test_model

    summary = test_model(str(path))
    passed = summary.status == "passed"
    line = f"bioimageio test {path.name}: {summary.status}"
    if not passed:
        line += f" ({first_error(summary)})"
    return passed, line
