"""The command registry (`cli.COMMAND_MODULES`): adding a command is one module and one entry, and
every command that runs a merge takes the same flags, declared once on `MergeOptions`."""

from __future__ import annotations

import argparse
import os

import pytest

from mergewise.cli import COMMAND_MODULES, build_parser, main
from mergewise.commands.merge import merge_options
from mergewise.options import MergeOptions

MERGING_COMMANDS = [("merge",), ("mediator", "build")]


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every runnable (sub-)command's parser, by its words on the command line."""
    groups = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
    for group in groups:
        for name, child in group.choices.items():
            yield from leaf_parsers(child, (*path, name))


def option_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_every_registered_command_has_a_handler_and_help(capsys):
    commands = dict(leaf_parsers(build_parser()))
    assert {path[0] for path in commands} == {name.replace("_", "-") for name in COMMAND_MODULES}
    for path, parser in commands.items():
        assert callable(parser.get_default("handler")), path
        with pytest.raises(SystemExit) as done:
            main([*path, "--help"])
        assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: mergewise " + " ".join(path))


def test_every_merging_command_takes_every_merge_option():
    flags = {f"--{option.name.replace('_', '-')}" for option in MergeOptions.flags()} - {"--model-card", "--compile"}
    flags |= {"--no-model-card", "--compile", "--no-compile"}
    commands = dict(leaf_parsers(build_parser()))
    merging = {path for path, parser in commands.items() if "--allow-pickle" in option_flags(parser)}
    # `search` runs trials with options of its own; `moe` reads mergekit-moe's recipes, not merge recipes
    assert merging - {("moe",)} == set(MERGING_COMMANDS)
    for path in MERGING_COMMANDS:
        assert flags <= option_flags(commands[path]), path
        args = build_parser().parse_args(
            [
                *path,
                "recipe.yml",
                "out",
                "--device",
                "cuda:1",
                "--threads",
                "3",
                "--shard-size",
                "1GB",
                "--allow-pickle",
                "--overwrite",
                "--seed",
                "7",
                "--quiet",
                "--no-compile",
                "--no-model-card",
                "--resume",
                "--strict",
            ]
        )
        assert MergeOptions(**merge_options(args)) == MergeOptions(
            device="cuda:1",
            threads=3,
            shard_size="1GB",
            allow_pickle=True,
            overwrite=True,
            seed=7,
            quiet=True,
            compile=False,
            model_card=False,
            resume=True,
            strict=True,
        )
        defaults = MergeOptions(**merge_options(build_parser().parse_args([*path, "recipe.yml", "out"])))
        assert defaults == MergeOptions(threads=os.cpu_count())  # the command line uses every core


def test_threads_zero_reaches_the_merge_to_be_refused_not_replaced_by_all_cores():
    args = build_parser().parse_args(["merge", "recipe.yml", "out", "--threads", "0"])
    assert merge_options(args)["threads"] == 0  # execute_plan: "--threads: must be at least 1, got 0"


def test_warm_up_readies_every_kernel_module_and_says_so(capsys):
    from mergewise.methods.kernel_loading import KERNEL_MODULES

    assert main(["warm-up"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(KERNEL_MODULES)
    assert main(["warm-up", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
