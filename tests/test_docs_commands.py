"""The command lines in docs/ and README.md run as written.

Every ``bioflow train`` line of a code block composes and passes the config checks as written
(placeholders such as ``<run id>`` or ``...`` stand for a value), every line of another command
parses with the command-line parser, and every argument a built-in component takes is a key of
its config file, so that a documented argument is set as ``key=value`` (no ``+``).
"""

from __future__ import annotations

import inspect
import re
import shlex

import pytest
from omegaconf import OmegaConf

from bioflow.config import _compose_node, compose
from tests.helpers import REPO

PLACEHOLDER = "placeholder"
#: (file, line) of every bioflow command in a code block of the docs.
COMMAND = re.compile(r"^(?:\$ )?(?:\S*/)?bioflow (train|predict|evaluate|export|plugins|dashboard)\b(.*)$")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, command, arguments) of every bioflow command line in a code block of docs/ or README.md."""
    found = []
    for path in sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]:
        text = path.read_text()
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                match = COMMAND.match(line.strip())
                if not match:
                    continue
                rest = re.sub(r"\s+#.*$", "", match.group(2))  # a comment after the command
                rest = re.sub(r"<[^>]*>", PLACEHOLDER, rest)  # <run id>, <images or folder>
                if match.group(1) != "train":  # a synopsis: [--optional value], [options]
                    rest = re.sub(r"\[(-[^\]]*)\]", r"\1", rest).replace("[options]", "")
                arguments = [a.replace("...", PLACEHOLDER) for a in shlex.split(rest)]
                found.append((f"{path.relative_to(REPO)}: {line.strip()}", match.group(1), arguments))
    return found


def test_enough_commands_are_found():
    commands = {c for _, c, _ in documented_commands()}
    assert len(documented_commands()) >= 30 and {"train", "predict", "evaluate", "export"} <= commands


TRAIN = [(w, a) for w, c, a in documented_commands() if c == "train" and not any(x.startswith("-") for x in a)]


@pytest.mark.parametrize("arguments", [a for _, a in TRAIN], ids=[w for w, _ in TRAIN])
def test_a_documented_training_command_composes_and_passes_the_checks(arguments):
    from bioflow.training.validation import validate

    assert PLACEHOLDER not in arguments, "a bare '...' or <...> stands for what? write the arguments out"
    validate(compose(arguments))


OTHERS = [(w, c, a) for w, c, a in documented_commands() if c != "train"]


@pytest.mark.parametrize(("command", "arguments"), [(c, a) for _, c, a in OTHERS], ids=[w for w, _, _ in OTHERS])
def test_a_documented_command_parses(command, arguments):
    from bioflow.cli import build_parser

    args = build_parser().parse_args([command, *arguments])
    assert args.command == command


#: Component arguments that are no config key on purpose, with the reason.
NOT_IN_CONFIG = {
    ("batch_transform", "seed"): "Noise2Void seeds its masking per rank from the run's seed",
}
GROUPS = {"model": "models", "loss": "losses", "sampler": "samplers", "postprocessor": "postprocessors",
          "batch_transform": "batch_transforms"}
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((REPO / "configs" / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_argument_of_a_component_is_a_key_of_its_config(group, option):
    from bioflow.kinds import kind
    from bioflow.registry import registry

    needs = ["task=n2v"] if group == "batch_transform" else []
    section = OmegaConf.to_container(_compose_node([*needs, f"{group}={option}"]))[group]
    factory = registry.load(GROUPS[group], section["name"])
    parameters = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory).parameters.values()
    provided = kind(GROUPS[group]).provided
    missing = [p.name for p in parameters if p.name not in section and p.name != "self" and p.name not in provided
               and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and (group, p.name) not in NOT_IN_CONFIG]
    assert not missing, f"configs/{group}/{option}.yaml lacks {missing}: documented as {group}.<arg>=..., they need '+'"
