"""Every command-line option that a message or hint names exists.

An error that tells the user to pass ``--download`` when no command has that option sends them
in a circle (issue 23, item 7). This test reads every string literal in device/ and fleet/,
picks out the ``--option`` words, and checks that each is an option of one of the project's
command lines: ``fleet`` (click, every command and group), ``fleet-device`` and the two
``python -m`` entry points (argparse). A new message that names an option of another program
(mosquitto, docker, pip) goes into ``FOREIGN`` with the program it belongs to.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterator
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

#: Options of other programs that the code legitimately names, with the program.
FOREIGN = {
    "--python": "protoc (device/wire/gen.py regenerates the protobuf code)",
    "--pyi": "protoc (device/wire/gen.py)",
}


def _click_options(command: click.Command) -> Iterator[str]:
    for param in command.params:
        yield from param.opts
        yield from param.secondary_opts
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _click_options(sub)


def _argparse_options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _argparse_options(sub)


def _known_options() -> set[str]:
    from device.cli import build_parser as device_parser
    from fleet.cli import cli
    from fleet.ops.health import build_parser as health_parser
    from fleet.runtime.aggregator import build_parser as aggregator_parser

    known = set(_click_options(cli))
    for parser in (device_parser(), health_parser(), aggregator_parser()):
        known.update(_argparse_options(parser))
    return known


def _named_options() -> dict[str, list[str]]:
    """Each ``--option`` in a string literal of device/ or fleet/, with where it appears."""
    named: dict[str, list[str]] = {}
    for package in ("device", "fleet"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "pb" in path.relative_to(ROOT).parts:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    for option in OPTION.findall(node.value):
                        where = f"{path.relative_to(ROOT)}:{node.lineno}"
                        named.setdefault(option, []).append(where)
    return named


def test_every_option_named_in_a_message_exists() -> None:
    known = _known_options() | set(FOREIGN)
    unknown = {option: places for option, places in _named_options().items() if option not in known}
    assert unknown == {}, f"messages name options that no command has: {unknown}"


def test_the_scan_sees_options_in_messages() -> None:
    """Guards the guard: the scanner finds options in real messages, and a made-up one would
    be reported."""
    named = _named_options()
    assert "--state-dir" in named and "--devices" in named
    assert "--no-such-option" not in _known_options()
