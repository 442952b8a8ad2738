"""``bioflow train``: the glue between the command line, config validation and Hydra's own entry
(one composition checked before work, then ``@hydra.main`` runs the job)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bioflow.cli.common import fail
from bioflow.errors import BioflowError


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


def project_dir_option(arguments: list[str]) -> list[str]:
    """``--project-dir X`` (as the other commands take it) as the override ``project_dir=X``."""
    from bioflow.config import quoted_value

    out, i = [], 0
    while i < len(arguments):
        arg = arguments[i]
        if arg == "--project-dir" and i + 1 < len(arguments):
            out.append(f"project_dir={quoted_value(arguments[i + 1])}")
            i += 1
        elif arg.startswith("--project-dir="):
            out.append(f"project_dir={quoted_value(arg.split('=', 1)[1])}")
        else:
            out.append(arg)
        i += 1
    return out


_HYDRA_FLAGS_WITHOUT_RUN = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")


def _prevalidate(overrides: list[str]) -> dict:
    """Compose and validate the config before Hydra starts a job, so errors come as one line."""
    from bioflow.config import compose
    from bioflow.training.validation import validate

    from bioflow.tracking.store import Store

    config = compose(overrides)
    validate(config)
    Store.create(config["project_dir"], config["logger"]["tracking_uri"]).check_intact()  # before Hydra's job folder
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

    overrides = project_dir_option(list(overrides))
    overrides = hydra_arguments(overrides + plugin_searchpath(overrides))
    is_info = any(o in _HYDRA_FLAGS_WITHOUT_RUN for o in overrides)
    multirun = any(o in ("-m", "--multirun") for o in overrides)
    created: list[Path] = []
    if is_info:  # Hydra composes alone: its parser's errors still come as one line
        from bioflow.config import explain_parse_error

        problem = explain_parse_error([o for o in overrides if "=" in o and not o.startswith("-")])
        if problem:
            return fail(f"config: {problem}")
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
        from bioflow.training.job import print_summary, run_training

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
