"""`report`: re-render a study's page from its saved artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path

from tl_degeneracy.cli.registry import command


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="folder of a saved study (e.g. out/demo/lm)")
    p.add_argument(
        "--page", default=None, help="where to write the page (default: OUT_DIR/report.html)"
    )


@command("report", "re-render a study's report.html from its saved artifacts, without refitting")(
    _report_args
)
def run_report(args: argparse.Namespace) -> int:
    from tl_degeneracy.experiments.study_output import load_study_artifacts
    from tl_degeneracy.viz.report import study_report

    out = Path(args.out_dir)
    if not (out / "summary.json").is_file():
        print(
            f"{out} is not a saved study (no summary.json): write one with "
            f"tl-degeneracy fit --out {out} (or demo) first"
        )
        return 2
    page = study_report(load_study_artifacts(out))
    path = page.save(Path(args.page) if args.page else out / "report.html")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0
