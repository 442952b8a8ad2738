"""The ``bioflow`` command.

Heavy libraries (torch, Lightning, MLflow, Hydra) are imported inside the sub-commands that need
them, so that ``bioflow --help`` and ``bioflow plugins`` start instantly.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from bioflow.version import __version__
from bioflow.errors import BioflowError
from bioflow.precision import PREDICTION_PRECISIONS

def _project_dir_default() -> str:
    from bioflow.tracking.store import default_project_dir

    return default_project_dir()


def fail(message: str, code: int = 2) -> int:
    print(f"bioflow: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return code


# -- train ----------------------------------------------------------------------------------------
def _multi_process(trainer_cfg) -> bool:
    """Whether a trainer config starts several processes (DDP on several devices or nodes)."""
    devices = trainer_cfg.get("devices", 1)
    several = devices in (-1, "auto") or (isinstance(devices, (list, tuple)) and len(devices) > 1)
    several = several or (isinstance(devices, int) and devices > 1) or int(trainer_cfg.get("num_nodes", 1) or 1) > 1
    return several and "ddp" in str(trainer_cfg.get("strategy", ""))


#: Hydra's options that take a value (``--info`` takes an optional one).
_HYDRA_VALUE_OPTIONS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                        "--config-dir", "-cd", "--experimental-rerun")
_INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def hydra_arguments(arguments: list[str]) -> list[str]:
    """Hydra's options first, then the overrides: options may come anywhere on the command line
    (``bioflow train experiment=x --cfg job`` works), which Hydra's own parser refuses."""
    options, overrides = [], []
    i = 0
    while i < len(arguments):
        arg = arguments[i]
        if arg.startswith("-"):  # overrides never do (key=v, +key=v, ++key=v, ~key)
            options.append(arg)
            takes = arg in _HYDRA_VALUE_OPTIONS or (arg in ("--info", "-i") and i + 1 < len(arguments)
                                                     and arguments[i + 1] in _INFO_TOPICS)
            if takes and i + 1 < len(arguments):
                options.append(arguments[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return options + overrides


_HYDRA_FLAGS_WITHOUT_RUN = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")


def _prevalidate(overrides: list[str]) -> dict:
    """Compose and validate the config before Hydra starts a job, so errors come as one line."""
    from bioflow.config import compose
    from bioflow.validation import validate

    config = compose(overrides)
    validate(config)
    return config


def _missing_folders(project_dir: str) -> list[Path]:
    """The project folder and its outputs folder, where they do not exist yet (deepest first)."""
    project = Path(project_dir).expanduser().resolve()
    return [p for p in (project / "outputs", project) if not p.exists()]


def _remove_failed_job_folder(run_dir: Path, created: list[Path]) -> None:
    """A job that failed before training leaves no folder behind: Hydra's job folder (holding
    only Hydra's own record and log) and the folders it made for it, when they are empty."""
    import shutil

    if not run_dir.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in [run_dir.parent, *created]:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass


def train_command(overrides: list[str]) -> int:
    """``bioflow train [overrides]``: compose the config with Hydra and run the training job."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from bioflow.config import PRIMARY_CONFIG

    original_argv = list(sys.argv)
    from bioflow.config import plugin_searchpath

    overrides = hydra_arguments(list(overrides) + plugin_searchpath(overrides))
    is_info = any(o in _HYDRA_FLAGS_WITHOUT_RUN for o in overrides)
    multirun = any(o in ("-m", "--multirun") for o in overrides)
    created: list[Path] = []
    if not is_info and not multirun:
        try:
            created = _missing_folders(_prevalidate(overrides)["project_dir"])
        except BioflowError as exc:
            return fail(exc.one_line())

    outcome = {"code": 0}

    @hydra.main(version_base="1.3", config_path="pkg://bioflow.configs", config_name=PRIMARY_CONFIG)
    def job(cfg) -> float | None:
        from omegaconf.errors import OmegaConfBaseException

        from bioflow.config import first_lines
        from bioflow.training import print_summary, run_training

        hydra_cfg = HydraConfig.get()
        # Lightning's DDP launcher starts the other ranks with sys.argv (plus this job's output folder):
        # give it this job's own overrides, never a sweep, so each rank runs exactly this job.
        job_argv = [original_argv[0], "train", *hydra_cfg.overrides.task]
        sys.argv = job_argv
        if str(hydra_cfg.mode) == "RunMode.MULTIRUN" and _multi_process(cfg.trainer):
            # A sweep job with several ranks runs in a fresh process of its own: ranks and process
            # groups of one job never meet those of the next.
            run_dir = f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"'
            command = [sys.executable, *job_argv, run_dir, "hydra.output_subdir=null"]
            code = subprocess.call(command)
            outcome["code"] = outcome["code"] or code
            return None
        run_dir = Path(hydra_cfg.runtime.output_dir)
        try:
            container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
            summary = run_training(container, run_dir, list(hydra_cfg.overrides.task))
        except BioflowError as exc:
            _remove_failed_job_folder(run_dir, created)
            outcome["code"] = fail(exc.one_line())
            return None
        except OmegaConfBaseException as exc:
            _remove_failed_job_folder(run_dir, created)
            outcome["code"] = fail(f"config: {first_lines(str(exc))}")
            return None
        if summary["is_global_zero"]:
            print_summary(summary)
        return summary["best_score"]

    sys.argv = [original_argv[0]] + overrides
    try:
        job()
    except SystemExit as exc:  # Hydra exits on its own errors after printing them
        return int(exc.code or 0) if not isinstance(exc.code, str) else fail(exc.code)
    finally:
        sys.argv = original_argv
    return outcome["code"]


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
        tta=args.tta, blend=args.blend, rescale=args.rescale, device=args.device, overwrite=args.overwrite,
        progress=not args.no_progress, precision=args.precision,
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


# -- dashboard ----------------------------------------------------------------------------------
def dashboard_command(args: argparse.Namespace) -> int:
    """``bioflow dashboard``: an MLflow server on 127.0.0.1 for the project's store, until Ctrl+C."""
    import shutil
    import signal

    from bioflow.tracking.store import Store

    store = Store.create(args.project_dir)
    if not (store.project_dir / "mlflow.db").is_file():
        return fail(f"{store.project_dir}: no MLflow store here (mlflow.db); train first or pass --project-dir")
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if mlflow is None:
        return fail("the mlflow command is not installed in this environment")
    cmd = [
        mlflow, "server", "--backend-store-uri", store.tracking_uri,
        "--default-artifact-root", store.artifact_location, "--host", "127.0.0.1", "--port", str(args.port),
        "--workers", "1",
    ]
    print(f"MLflow dashboard for {store.project_dir} at http://127.0.0.1:{args.port} (Ctrl+C stops it)", flush=True)
    for name, page in _experiment_pages(store, args.port):
        print(f"  {name}: {page}", flush=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    # The server runs in a process group of its own, and the whole group is stopped on Ctrl+C or
    # SIGTERM: stopping only the mlflow process can leave its web worker listening.
    server = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(*_args) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(server)


def _experiment_pages(store, port: int) -> list[tuple[str, str]]:
    """The runs page of every experiment in the store, in the model-training view."""
    from mlflow.tracking import MlflowClient

    from bioflow.tracking.run import runs_page

    try:
        experiments = MlflowClient(store.tracking_uri).search_experiments()
    except Exception:  # the links are a courtesy; the dashboard works without them
        return []
    return [(e.name, runs_page(store.dashboard_url(port), e.experiment_id)) for e in experiments if e.name != "Default"]


def _stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to ``process``'s process group, SIGKILL after ``grace`` seconds if it lingers."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# -- main -------------------------------------------------------------------------------------------
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
    ev.add_argument("model", help="a checkpoint file, the id of an MLflow run (its best checkpoint is used), or a "
                    "bioimage.io package written by bioflow export")
    ev.add_argument("--split", default="test", choices=["test", "val", "train"], help="split to evaluate (default: test)")
    ev.add_argument("--project-dir", help="project folder of the embedded store (default: where the run was trained)")
    ev.add_argument("--tracking-uri", default=None, help="MLflow tracking server, instead of the embedded store")
    ev.add_argument("--no-log", action="store_true", help="do not log the metrics into the MLflow run")
    pr = sub.add_parser("predict", help="apply a model to TIFF files (tiled, any image size)")
    pr.add_argument("model", help="a checkpoint file, the id of an MLflow run (its best checkpoint is used), or a "
                    "bioimage.io model package (.zip, rdf.yaml)")
    pr.add_argument("inputs", nargs="+", help="TIFF files, or folders of TIFF files")
    pr.add_argument("--out", required=True, help="output folder (created; inputs are never overwritten)")
    pr.add_argument("--axes", help="axes of the input files when their metadata does not say (e.g. ZYX, CYX, YXC)")
    pr.add_argument("--tile-size", type=int, nargs="+", metavar="N", help="tile size (one value, or one per axis); default: from free memory")
    pr.add_argument("--overlap", type=int, nargs="+", metavar="N", help="tile overlap; default: the network's receptive field")
    pr.add_argument("--batch-size", type=int, help="tiles per forward pass")
    pr.add_argument("--tta", action="store_true", help="test-time augmentation: average over flips and 90-degree rotations")
    pr.add_argument("--blend", choices=["cosine", "none"], default="cosine", help="how overlapping tiles are combined")
    pr.add_argument("--rescale", action="store_true", help="resample images whose pixel size differs from training")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    pr.add_argument("--precision", choices=PREDICTION_PRECISIONS, default=None,
                    help="the network's precision (default: the model's predict.precision, 32-true unless set); "
                         "auto: bfloat16 where the CPU (AMX) or GPU computes it natively")
    pr.add_argument("--overwrite", action="store_true", help="replace existing output files (never inputs)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--project-dir", help="project folder of the embedded store, for run ids (default: where the run was trained)")
    pr.add_argument("--tracking-uri", default=None, help="MLflow tracking server (for run ids)")
    ex = sub.add_parser("export", help="write a model as a bioimage.io package (BioImage Model Zoo, spec v0.5)")
    ex.add_argument("model", help="a checkpoint file, or the id of an MLflow run (its best checkpoint is used)")
    ex.add_argument("--out", required=True, help="the package to write (.zip)")
    ex.add_argument("--author", action="append", help="an author's name (repeat for several; default: your login name)")
    ex.add_argument("--license", help="SPDX licence id of the model (default: CC-BY-4.0)")
    ex.add_argument("--cite", action="append", metavar="TEXT=DOI", help="a citation, TEXT=DOI or TEXT=URL (repeatable; "
                    "the method's paper is always cited)")
    ex.add_argument("--name", help="the model's name (default: from the task and the experiment)")
    ex.add_argument("--test", action="store_true", help="run bioimageio.core's test on the package afterwards")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.add_argument("--project-dir", help="project folder of the embedded store, for run ids (default: where the run was trained)")
    ex.add_argument("--tracking-uri", default=None, help="MLflow tracking server (for run ids)")
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
