"""The SmolLM2 IOI table of docs/attribution.md: attribution patching per feature against true
feature patching and Λ, in LIB and PCA bases at three residual-stream sites.

    python benchmarks/lm_ioi_attribution.py [--pairs 32] [--fit 128] [--features 32] [--out DIR]

Prints the Markdown correlation tables (all kept features, and the 10 of largest |patching|)
and writes `ioi_<kind>.json` and `ioi_<kind>.html` (AttributionComparison) to `--out`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tl_degeneracy.engine.attribution import format_correlation_table
from tl_degeneracy.experiments.ioi import IOI_SITES, ioi_attribution_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--fit", type=int, default=128)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--sites", default=",".join(IOI_SITES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="out/ioi")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    comparisons = ioi_attribution_demo(
        n_pairs=args.pairs,
        n_fit=args.fit,
        sites=args.sites.split(","),
        n_features=args.features,
        n_sources=args.sources,
        seed=args.seed,
        progress=True,
    )
    total = time.perf_counter() - start
    out = Path(args.out)
    for kind, comparison in comparisons.items():
        comparison.save_json(out / f"ioi_{kind}.json")
        comparison.save_html(out / f"ioi_{kind}.html")
        meta = comparison.metadata
        print(
            f"{kind}: clean {comparison.clean_metric:.4f}, corrupted "
            f"{comparison.corrupted_metric:.4f}; kept {meta['kept_features']}; statistics "
            f"{meta['statistics_seconds']:.1f} s, fit {meta['fit_seconds']:.1f} s, comparison "
            + ", ".join(f"{sa.seconds:.1f} s" for sa in comparison.sites.values())
        )
    print(f"example: {comparisons[next(iter(comparisons))].metadata['example']}")
    print(f"total {total:.1f} s\n")
    print(format_correlation_table(comparisons))
    print()
    print(format_correlation_table(comparisons, top=10))


if __name__ == "__main__":
    main()
