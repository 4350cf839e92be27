"""The registry of `tl-degeneracy` subcommands: each module of this package registers its
commands with `@command(name, help)(setup)` on the function that runs them."""

from __future__ import annotations

import argparse
from collections.abc import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help_text: str):
    """Register a subcommand: `setup(parser)` adds its arguments, the function runs it."""

    def wrap(setup: Callable[[argparse.ArgumentParser], None]):
        def register(run: Callable):
            COMMANDS[name] = (help_text, setup, run)
            return run

        return register

    return wrap
