"""`tl-degeneracy`: the command-line entry point (`python -m tl_degeneracy.cli` too, e.g. under
`torchrun`).

Subcommands (`tl-degeneracy COMMAND --help`, docs/cli.md):
  demo              the main job on the embedded defaults (see README)
  fit               any model (a preset or a folder), any sites, data, device and dtype
  fit-lm            the `fit` preset for SmolLM2-135M at every residual cut
  fit-modadd        LIB and PCA on a modular-addition checkpoint, node ablation, plots
  report            re-render a study's report.html from its saved artifacts
  replicate-modadd  the LIB paper's modular-addition study per checkpoint
  replicate-mlp     LIB vs PCA on the digits MLP (the paper's image-classifier setting)
  degeneracy        the degeneracy report: three sources, SGLD N_eff, modularity
"""

from __future__ import annotations

import argparse
import sys

from tl_degeneracy.cli import fit, report, studies  # noqa: F401  (they register their commands)
from tl_degeneracy.cli.fit import demo_checkpoint
from tl_degeneracy.cli.registry import COMMANDS, command

ORDER = ("demo", "fit", "fit-lm", "fit-modadd", "report", "replicate-modadd", "replicate-mlp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-degeneracy",
        description="Interaction bases (LIB/IB/PCA), interaction graphs and degeneracy "
        "measures for TransformerLens models.",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the full trace of an input error"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [n for n in ORDER if n in COMMANDS] + [n for n in COMMANDS if n not in ORDER]
    for name in names:
        help_text, setup, _ = COMMANDS[name]
        setup(sub.add_parser(name, help=help_text, description=help_text))
    return parser


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError)
"""What bad input raises (the package's own errors are ValueErrors naming the problem and the
fix: `TokenError`, `SiteError`, `ArtifactError`, ...; missing files; NaN activations): shown as
one line, not a traceback, unless `--traceback`."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _, _, run = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except USER_ERRORS as error:
        if args.traceback:
            raise
        name = type(error).__name__
        print(f"tl-degeneracy {args.command}: {name}: {error}", file=sys.stderr)
        print("(--traceback shows where it was raised)", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "USER_ERRORS", "build_parser", "command", "demo_checkpoint", "main"]
