"""The README of a package: training data, validation scores, inputs and outputs, caveats, citation."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from bioflow.bioimageio.description import _SPATIAL_IDS, Geometry, Layout


def format_source(config: Mapping[str, Any]) -> str:
    from bioflow.config import component

    name, kwargs = component(config["data"]["source"])
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)
    return f"`{name}`" + (f" ({args})" if args else "")


def readme(task, config, lay: Layout, geo: Geometry, *, name: str, origin: str, metrics: Mapping[str, float],
           metrics_origin: str, authors, license_id: str, cites, weights: Sequence[str], weight_notes: Sequence[str]) -> str:
    from bioflow.version import __version__

    info = task.data_info
    split = {k: len(v) for k, v in (info.split or {}).items()}
    pixel = "x".join(f"{p:g}" for p in info.pixel_size) + " µm" if info.pixel_size else "not recorded"
    lines = [
        f"# {name}", "",
        f"A {task.title()} model ({info.spatial_dims}D, {info.in_channels} input channel(s)) trained with bioflow "
        f"{__version__} and exported as a BioImage Model Zoo package.", "",
        "## Training data", "",
        f"- source: {format_source(config)}",
        f"- split (images): {', '.join(f'{k} {v}' for k, v in split.items()) or 'not recorded'}",
        f"- pixel size: {pixel}",
        f"- patches of {config['data']['patch_size']}, {config['trainer'].get('max_epochs')} epoch(s); seed {config['seed']}",
        "", "## Validation", "",
        "Scores on the held-out test split, which took no part in training or in choosing checkpoints and thresholds.", "",
    ]
    if metrics:
        lines += [f"From {metrics_origin}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k.split('/', 1)[-1]} | {v:.4f} |" for k, v in metrics.items()]
    else:
        lines.append("None recorded with the model (run `bioflow evaluate model.zip` where its data can be read).")
    lines += ["", "## Inputs, outputs and processing", ""] + [f"- {n}" for n in lay.notes] + [
        f"- Input axes: batch, channel, {', '.join(_SPATIAL_IDS[info.spatial_dims])}; valid sizes {geo.minimum} + n × {geo.step} "
        "pixels per spatial axis.",
        f"- Receptive field {geo.receptive_field} pixels: each output pixel sees {geo.receptive_field} input pixels along each "
        f"axis; the halo of {geo.halo} pixels is what tiled prediction discards at inner tile edges.",
        f"- Test tensors: from {origin}, predicted by bioflow with the original checkpoint.",
        f"- Weights: {', '.join(weights)}." + "".join(f" {n}" for n in weight_notes),
        "", "## Caveats", "",
        *([f"- {task.caveat}"] if task.caveat else []),
        "- Resolution: a CNN is not scale invariant. Apply the model at the pixel size it was trained on "
        f"({pixel}); objects at another scale than in training are missed or split.",
        f"- Image borders: the network zero-pads its convolutions, so predictions within {geo.halo} pixels of the image border "
        "differ slightly between tools that pad the image first (by the halo, as bioimageio.core does) and those that do not "
        "(bioflow).",
        "", "## Licence, authors and citation", "",
        f"Licence: {license_id}. Authors: {', '.join(a['name'] for a in authors)}.", "", "Cite:", "",
    ]
    lines += [f"- {c['text']}" + (f" (doi: {c['doi']})" if c.get("doi") else f" ({c['url']})" if c.get("url") else "") for c in cites]
    lines += ["", "## Use", "",
              "- Check it: `bioimageio test model.zip`.",
              "- Predict with bioflow: `bioflow predict model.zip images/ --out results/` (tiled, any image size).",
              "- Open it in napari, Fiji/deepImageJ or any tool that reads bioimage.io models.", ""]
    return "\n".join(lines)
