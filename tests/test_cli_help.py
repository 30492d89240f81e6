"""`richkd --help` and every command's help: examples for each command and subcommand, help text for each option,
and examples that name files which exist (configs/, search_spaces/) or that `richkd demo` writes."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from richkd.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = {"teacher", "kd", "richkd"}      # what `richkd demo` writes to <out>/configs/ (richkd.demo)


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def all_commands() -> list[tuple[str, argparse.ArgumentParser]]:
    """("train", parser), ("clip init-tiny", parser), ...: every command and subcommand."""
    found = []

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for name, sub in _subparsers(parser).items():
            found.append((f"{prefix}{name}", sub))
            walk(f"{prefix}{name} ", sub)

    walk("", build_parser())
    return found


COMMANDS = all_commands()


def test_the_command_tree_is_what_the_readme_lists():
    names = {name for name, _ in COMMANDS}
    assert names == {"train", "models", "cache", "clip", "clip init-tiny", "clip prompts", "clip zeroshot", "demo",
                     "sweep", "export", "finalize", "ui", "evaluate", "report", "table", "table build",
                     "table from-sweep", "table info", "replay"}
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Commands")[1].split("```")[1]
    listed = {line.split()[1] for line in block.splitlines() if line.startswith("richkd ")}
    assert listed == {n for n in names if " " not in n}


@pytest.mark.parametrize("name, parser", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_command_has_examples_that_run_it(name, parser):
    epilog = parser.epilog or ""
    assert re.match(r"examples?:\n", epilog), f"`richkd {name} --help` has no examples"
    examples = [line.strip() for line in epilog.splitlines()[1:] if line.strip().startswith("richkd ")]
    assert any(e.startswith(f"richkd {name}") for e in examples), examples
    # RawDescriptionHelpFormatter keeps the example lines as written (a plain formatter would re-wrap them)
    assert "\n  richkd " in parser.format_help()


@pytest.mark.parametrize("name, parser", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_and_argument_has_help_text(name, parser):
    missing = [a.dest for a in parser._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and (not a.help or a.help == argparse.SUPPRESS)]
    assert missing == [], f"`richkd {name}`: no help text for {missing}"


def _named_files(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w/.-])((?:configs|search_spaces|tune_runs/demo/configs)/[\w.-]+\.yaml)", text))


def test_examples_name_files_that_exist_or_that_the_demo_writes():
    texts = [build_parser().epilog] + [p.epilog or "" for _, p in COMMANDS]
    named = set().union(*(_named_files(t) for t in texts))
    assert "configs/cifar100_resnet32x4_resnet8x4_richkd.yaml" in named    # the scan does see the examples
    assert "tune_runs/demo/configs/kd.yaml" in named
    for path in sorted(named):
        if path.startswith("tune_runs/demo/configs/"):
            assert Path(path).stem in DEMO_CONFIGS, path
        else:
            assert (REPO / path).is_file(), f"an example names {path}, which does not exist"


def test_readme_names_files_that_exist_or_that_the_demo_writes():
    readme = (REPO / "README.md").read_text()
    for path in sorted(_named_files(readme)):
        if path.startswith("tune_runs/demo/configs/"):
            assert Path(path).stem in DEMO_CONFIGS, path
        else:
            assert (REPO / path).is_file(), f"README.md names {path}, which does not exist"
