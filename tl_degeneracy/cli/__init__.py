"""`tl-degeneracy`: the command-line entry point (`python -m tl_degeneracy.cli` too, e.g. under
`torchrun`).

Subcommands (`tl-degeneracy COMMAND --help`, docs/cli.md):
  demo              the main job on the embedded defaults (see README)
  fit               any model (a preset or a folder), any sites, data, device and dtype
  fit-lm            the `fit` preset for SmolLM2-135M at every residual cut
  fit-modadd        LIB and PCA on a modular-addition checkpoint, node ablation, plots
  report            re-render a study's report.html from its saved artifacts
  prompt-graph      explain one prediction on your own prompt in a study's basis
  replicate-modadd  the LIB paper's modular-addition study per checkpoint
  replicate-mlp     LIB vs PCA on the digits MLP (the paper's image-classifier setting)
  degeneracy        the degeneracy report: three sources, SGLD N_eff, additivity of modules
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from tl_degeneracy.cli import fit, prompt, report, studies  # noqa: F401  (they register their commands)
from tl_degeneracy.cli.checks import SETTING_FLAGS, check_out
from tl_degeneracy.cli.fit import demo_checkpoint
from tl_degeneracy.cli.registry import COMMANDS, command

ORDER = (
    "demo",
    "fit",
    "fit-lm",
    "fit-modadd",
    "report",
    "prompt-graph",
    "replicate-modadd",
    "replicate-mlp",
)
RESUMABLE = ("demo", "fit", "fit-lm")
"""Commands that checkpoint into `--out` and resume when run again."""
TRACEBACK_HELP = "show the full trace of an input error (before or after COMMAND)"


class UsageError(Exception):
    """A command line argparse refuses (an unknown option, a value out of range)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{prog}: error: {message} ({prog} --help lists the options)")


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors `main` shows as one line that points to `--help` (not the
    usage, which runs to 17 lines for `fit`) and returns as exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tl-degeneracy",
        description="Interaction bases (LIB/IB/PCA), interaction graphs and degeneracy "
        "measures for TransformerLens models.",
    )
    parser.add_argument("--traceback", action="store_true", help=TRACEBACK_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [n for n in ORDER if n in COMMANDS] + [n for n in COMMANDS if n not in ORDER]
    for name in names:
        help_text, setup, _ = COMMANDS[name]
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        setup(command_parser)
        # after the command too; SUPPRESS: absent here, it leaves the one before the command
        command_parser.add_argument(
            "--traceback", action="store_true", default=argparse.SUPPRESS, help=TRACEBACK_HELP
        )
    return parser


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError)
"""What bad input raises (the package's own errors are ValueErrors naming the problem and the
fix: `TokenError`, `SiteError`, `ArtifactError`, ...; missing files; NaN activations): shown as
one line, not a traceback, unless `--traceback`."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    _, _, run = COMMANDS[args.command]
    try:
        check_out(getattr(args, "out", None))
        return int(run(args) or 0)
    except USER_ERRORS as error:
        if args.traceback:
            raise
        if args.command in SETTING_FLAGS:  # a refused resume names the flags that differ
            from tl_degeneracy.engine.streaming import CheckpointMismatchError

            if isinstance(error, CheckpointMismatchError):
                error = error.labelled(SETTING_FLAGS[args.command])
        name = type(error).__name__
        print(f"tl-degeneracy {args.command}: {name}: {error}", file=sys.stderr)
        print("(--traceback shows where it was raised)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.traceback:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per rank
            print(f"tl-degeneracy {args.command}: {interrupted(args)}", file=sys.stderr)
        return 130


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: a run to resume (`RESUMABLE` commands), or one to start again."""
    out = getattr(args, "out", None)
    if args.command in RESUMABLE and out is not None:
        return f"interrupted; run the same command again to resume from {out}"
    return "interrupted; this command does not resume: run it again to start over"


__all__ = [
    "COMMANDS",
    "RESUMABLE",
    "USER_ERRORS",
    "UsageError",
    "build_parser",
    "command",
    "demo_checkpoint",
    "main",
]
