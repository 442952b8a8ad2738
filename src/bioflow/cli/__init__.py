"""The ``bioflow`` command: the parser and the small sub-commands here, ``train``
(:mod:`.train`) and ``dashboard`` (:mod:`.dashboard`) in modules of their own.

Heavy libraries (torch, Lightning, MLflow, Hydra) are imported inside the sub-commands that need
them, so that ``bioflow --help`` and ``bioflow plugins`` start instantly.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from bioflow.cli.common import fail
from bioflow.cli.dashboard import dashboard_command
from bioflow.cli.train import train_command
from bioflow.errors import BioflowError
from bioflow.inference.options import BLENDS, OUT_FORMATS
from bioflow.precision import PREDICTION_PRECISIONS
from bioflow.version import __version__


def _project_dir_default() -> str:
    from bioflow.tracking.store import default_project_dir

    return default_project_dir()


# -- plugins ----------------------------------------------------------------------------------------
def plugins_command(args: argparse.Namespace) -> int:
    from bioflow.registry import KINDS, registry

    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        if kind not in KINDS:
            return fail(f"unknown kind '{kind}'; kinds are: {', '.join(KINDS)}")
    for kind in kinds:
        comps = registry.components(kind)
        clashes = registry.clashes(kind)
        print(f"{kind} ({KINDS[kind]}):")
        if not comps:
            print("  (none)")
        width = max((len(c.name) for c in comps), default=0)
        for c in comps:
            flag = "  [name clash: use " + c.qualified_name + "]" if c.name in clashes else ""
            print(f"  {c.name:<{width}}  {c.distribution} {c.version}  ({c.target}){flag}")
    if not args.check:
        return 0
    problems = registry.problems()
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print("\nall plugins load; no name clashes")
    return 0


# -- evaluate -----------------------------------------------------------------------------------
def evaluate_command(args: argparse.Namespace) -> int:
    from bioflow.evaluation import evaluate, print_evaluation

    result = evaluate(
        args.model, project_dir=args.project_dir, tracking_uri=args.tracking_uri, split=args.split,
        log_to_run=not args.no_log,
    )
    print_evaluation(result)
    return 0


# -- predict ------------------------------------------------------------------------------------
def predict_command(args: argparse.Namespace) -> int:
    from bioflow.prediction import predict

    predict(
        args.model, args.inputs, args.out, project_dir=args.project_dir, tracking_uri=args.tracking_uri,
        axes=args.axes, tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
        tta=args.tta, tta_spread=args.tta_spread, blend=args.blend, rescale=args.rescale, device=args.device, overwrite=args.overwrite,
        progress=not args.no_progress, precision=args.precision, confidence=args.confidence,
        out_format=args.out_format, level=args.level, block_size=args.block_size, record=not args.no_record,
    )
    return 0


# -- export -------------------------------------------------------------------------------------
def export_command(args: argparse.Namespace) -> int:
    from bioflow.bioimageio.export import check_package, export_model

    result = export_model(
        args.model, args.out, project_dir=args.project_dir, tracking_uri=args.tracking_uri, authors=args.author or (),
        license_id=args.license, cites=args.cite or (), name=args.name, overwrite=args.overwrite,
    )
    print(f"bioflow: {result.path}: bioimage.io package '{result.name}' (weights: {', '.join(result.weights)}; "
          f"test tensors from {result.test_origin})", flush=True)
    for note in result.notes:
        print(f"bioflow: note: {note}", file=sys.stderr)
    if not args.test:
        return 0
    passed, line = check_package(result.path)
    print(line, flush=True)
    return 0 if passed else 1


# -- main -------------------------------------------------------------------------------------------
def _model_argument(command: argparse.ArgumentParser, more: str) -> None:
    """The model a command takes and where run ids are found: one resolver for every command
    (``bioflow.loading.load_model``), so one spelling of its arguments."""
    command.add_argument("model", help="a checkpoint file, the id of an MLflow run (its best checkpoint is used)"
                         + (f", {more}" if more else ""))
    command.add_argument("--project-dir", help="project folder of the embedded store, for run ids (default: where the "
                         "run was trained)")
    command.add_argument("--tracking-uri", default=None, help="MLflow tracking server, for run ids (instead of the "
                         "embedded store)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bioflow",
        description="Train and apply CNNs for bioimage analysis (U-Net, StarDist, CARE, Noise2Void).",
    )
    parser.add_argument("--version", action="version", version=f"bioflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "train", add_help=False,
        help="train a model from the Hydra config (`bioflow train --help` lists the config groups)",
    )
    ev = sub.add_parser("evaluate", help="test-split metrics of a checkpoint or MLflow run, logged into its run")
    _model_argument(ev, "or a bioimage.io package written by bioflow export")
    ev.add_argument("--split", default="test", choices=["test", "val", "train"], help="split to evaluate (default: test)")
    ev.add_argument("--no-log", action="store_true", help="do not log the metrics into the MLflow run")
    pr = sub.add_parser("predict", help="apply a model to TIFF files and OME-Zarr stores (tiled, any image size; "
                        "several processes under torchrun or SLURM)")
    _model_argument(pr, "or a bioimage.io model package (.zip, rdf.yaml)")
    pr.add_argument("inputs", nargs="+", help="TIFF files, OME-Zarr stores, or folders of them")
    pr.add_argument("--out", required=True, help="output folder (created; inputs are never overwritten; the same "
                    "command again resumes an interrupted job)")
    pr.add_argument("--out-format", choices=OUT_FORMATS, default="auto",
                    help="tiff or ome-zarr (default auto: the input's format)")
    pr.add_argument("--level", type=int, default=0, help="resolution level of OME-Zarr inputs (default 0: full resolution)")
    pr.add_argument("--block-size", type=int, nargs="+", metavar="N",
                    help="OME-Zarr outputs are predicted in blocks of whole chunks about this big (default: 2048 in "
                         "2D, 64 256 256 in 3D); the blocks are shared out between processes")
    pr.add_argument("--axes", help="axes of the input files when their metadata does not say (e.g. ZYX, CYX, YXC)")
    pr.add_argument("--tile-size", type=int, nargs="+", metavar="N", help="tile size (one value, or one per axis); default: from free memory")
    pr.add_argument("--overlap", type=int, nargs="+", metavar="N", help="tile overlap; default: the network's receptive field")
    pr.add_argument("--batch-size", type=int, help="tiles per forward pass")
    pr.add_argument("--tta", action="store_true", help="test-time augmentation: average over flips and 90-degree rotations")
    pr.add_argument("--tta-spread", action="store_true",
                    help="with --tta (implied), also write <name>_tta_spread.tif: per pixel, how much the predictions "
                         "of the flipped and turned image disagree (any model)")
    pr.add_argument("--confidence", action="store_true",
                    help="segmentation: also write name_confidence.tif, the probability of each pixel's class")
    pr.add_argument("--blend", choices=BLENDS, default="cosine", help="how overlapping tiles are combined")
    pr.add_argument("--rescale", action="store_true", help="resample images whose pixel size differs from training")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    pr.add_argument("--precision", choices=PREDICTION_PRECISIONS, default=None,
                    help="the network's precision (default: the model's predict.precision, 32-true unless set); "
                         "auto: bfloat16 where the CPU (AMX) or GPU computes it natively")
    pr.add_argument("--overwrite", action="store_true", help="replace existing output files (never inputs)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--no-record", action="store_true",
                    help="do not record this job as a run of the 'predictions' experiment in the model's MLflow store")
    ex = sub.add_parser("export", help="write a model as a bioimage.io package (BioImage Model Zoo, spec v0.5)")
    _model_argument(ex, "")
    ex.add_argument("--out", required=True, help="the package to write (.zip)")
    ex.add_argument("--author", action="append", help="an author's name (repeat for several; default: your login name)")
    ex.add_argument("--license", help="SPDX licence id of the model (default: CC-BY-4.0)")
    ex.add_argument("--cite", action="append", metavar="TEXT=DOI", help="a citation, TEXT=DOI or TEXT=URL (repeatable; "
                    "the method's paper is always cited)")
    ex.add_argument("--name", help="the model's name (default: from the task and the experiment)")
    ex.add_argument("--test", action="store_true", help="run bioimageio.core's test on the package afterwards")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    pl = sub.add_parser("plugins", help="list installed components (models, losses, ...) by kind")
    pl.add_argument("--kind", help="list one kind only")
    pl.add_argument("--check", action="store_true", help="import every plugin; exit 1 on a clash or a broken plugin")
    db = sub.add_parser("dashboard", help="open the MLflow dashboard on the project's store (127.0.0.1)")
    db.add_argument("--project-dir", default=_project_dir_default(), help="project folder (default: %(default)s)")
    db.add_argument("--port", type=int, default=5000)
    return parser


def _log_warnings_to_stderr() -> None:
    """bioflow's warnings as one line each on stderr (`bioflow train` uses Hydra's logging instead)."""
    import logging

    logger = logging.getLogger("bioflow")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("bioflow: warning: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def _quiet_libraries() -> None:
    """tifffile logs every odd tag it meets; bioflow reports unreadable files itself, in one line."""
    import logging

    logging.getLogger("tifffile").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    if argv and argv[0] == "train":
        return train_command(argv[1:])
    _log_warnings_to_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)
    from bioflow.quiet import quiet_dependencies

    quiet_dependencies(progress=not getattr(args, "no_progress", False))
    handlers = {
        "evaluate": evaluate_command, "predict": predict_command, "plugins": plugins_command,
        "dashboard": dashboard_command, "export": export_command,
    }
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return handlers[args.command](args)
    except BioflowError as exc:
        return fail(exc.one_line(), exc.exit_code)
    except BrokenPipeError:  # output piped into a command that stopped reading (e.g. `| head`)
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
