"""Every command-line option and positional says what it is for (``--help`` is the user's manual)."""

from __future__ import annotations

import argparse

from gradroute.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", name, helps.get(name)
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield path, "/".join(action.option_strings) or action.dest, action.help


def test_every_option_positional_and_command_has_help():
    items = list(_walk(build_parser(), "gradroute"))
    assert len(items) > 30  # the walk reached the sub-commands' options
    missing = [f"{where}: {what}" for where, what, text in items if not (text and text.strip())]
    assert not missing, "no help text for:\n" + "\n".join(missing)
