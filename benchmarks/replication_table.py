"""Markdown tables of a `tl-degeneracy replicate-modadd` run: LIB vs PCA per checkpoint
(smallest k within 0.001 / 0.01 of the unablated test accuracy per site; edges required per
section) and the spread over checkpoints (median, min–max). Used for docs/replication.md.

    python benchmarks/replication_table.py OUT [OUT/seed0 reference JSON folder]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SITES = {
    "blocks.0.hook_resid_pre": "resid_pre",
    "blocks.0.hook_resid_mid[-1]": "resid_mid",
    "blocks.0.hook_resid_post[-1]": "resid_post",
}
SECTIONS = {
    "blocks.0.hook_resid_pre->blocks.0.hook_resid_mid[-1]": "attention",
    "blocks.0.hook_resid_mid[-1]->blocks.0.hook_resid_post[-1]": "MLP",
    "blocks.0.hook_resid_post[-1]->logits[-1]": "unembed",
}


def columns(result: dict) -> dict[str, int | None]:
    """One row of the table: every number LIB vs PCA."""
    row: dict[str, int | None] = {}
    for site, short in SITES.items():
        for tol in ("0.001", "0.01"):
            for kind in ("lib", "pca"):
                row[f"{short} k@{tol} {kind.upper()}"] = result["sites"][site][kind]["min_k"][tol]
    for section, short in SECTIONS.items():
        for kind in ("lib", "pca"):
            row[f"{short} edges {kind.upper()}"] = result["sections"][section][kind][
                "edges_required"
            ]
    return row


def table(rows: dict[str, dict], keys: list[str]) -> list[str]:
    lines = ["| | " + " | ".join(rows) + " | median | min–max |", "|---" * (len(rows) + 3) + "|"]
    for key in keys:
        values = [r[key] for r in rows.values()]
        present = [v for v in values if v is not None]
        med = statistics.median(present) if present else None
        spread = f"{min(present)}–{max(present)}" if present else "–"
        lines.append(
            f"| {key} | " + " | ".join(str(v) for v in values) + f" | {med:g} | {spread} |"
        )
    return lines


def main(out: str) -> None:
    results = {
        p.parent.name: json.loads(p.read_text())
        for p in sorted(Path(out).glob("*/replication.json"))
    }
    rows = {name: columns(r) for name, r in results.items()}
    keys = list(next(iter(rows.values())))
    print("| | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    print(
        "| baseline test accuracy | "
        + " | ".join(f"{r['baseline_test_accuracy']:.5f}" for r in results.values())
        + " |"
    )
    print()
    print("\n".join(table(rows, [k for k in keys if " k@" in k])))
    print()
    print("\n".join(table(rows, [k for k in keys if "edges" in k])))
    print()
    for name, r in results.items():
        cpu = r.get("cpu_timings_s", {})
        print(f"- {name}: {r['total_s']} s wall; phases {r['timings_s']}; CPU {cpu}")


if __name__ == "__main__":
    main(sys.argv[1])
