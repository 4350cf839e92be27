"""Edges required under ablation on SmolLM2, LIB against PCA, from a finished `fit-lm` folder.

    python benchmarks/lm_edges_required.py OUT [--blocks 5 15] [--tokens 256]
        [--tolerances 0.01 0.05] [--threads 1] [--json FILE]

For each block's attention section (resid_pre -> resid_mid) and MLP section (resid_mid ->
next resid_pre), and each basis, the edges into the top N output features (N as in the fit,
`--edge-outputs`) are ablated (tl_degeneracy.experiments.lm_edges_required) on the first `--tokens`
held-out tokens; the table gives the fewest edges whose loss stays within each tolerance of
the clean loss, the loss with no edge into those outputs kept, and the time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tl_degeneracy.engine.ablation import evaluate, next_token_loss
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.experiments.lm_edges_required import TopOutputAblator, top_output_edges_required
from tl_degeneracy.models import load_corpus, load_smollm2


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fit", help="a fit-lm output folder (lib/, pca/, edges_*.safetensors)")
    p.add_argument("--blocks", type=int, nargs="+", default=[5, 15])
    p.add_argument("--kinds", nargs="+", default=["lib", "pca"])
    p.add_argument("--tokens", type=int, default=256, help="held-out tokens (whole rows)")
    p.add_argument("--tolerances", type=float, nargs="+", default=[0.01, 0.05])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fit = Path(args.fit)
    model = load_smollm2(api="hooked")
    heldout = load_corpus(model.tokenizer, 128, "heldout")
    data = heldout[: max(1, args.tokens // heldout.shape[1])]
    baseline = evaluate(model, data, next_token_loss)
    print(f"{data.numel()} held-out tokens, clean loss {baseline:.4f}, load {os.getloadavg()}")
    rows = []
    for kind in args.kinds:
        bases = BasisResult.load(fit / kind, model).bases
        edges = load_file(str(fit / f"edges_{kind}.safetensors"))
        for block in args.blocks:
            for label, (a, b) in {
                "attention": (f"blocks.{block}.hook_resid_pre", f"blocks.{block}.hook_resid_mid"),
                "MLP": (f"blocks.{block}.hook_resid_mid", f"blocks.{block + 1}.hook_resid_pre"),
            }.items():
                e = edges[f"{a}->{b}/edges"]
                t0, c0 = time.perf_counter(), cpu_seconds()
                ablator = TopOutputAblator(model, data, bases[a], bases[b], e.shape[0])
                all_kept = ablator.loss(torch.ones(e.shape, dtype=torch.bool))
                none_kept = ablator.loss(torch.zeros(e.shape, dtype=torch.bool))
                scores: dict[int, float] = {0: none_kept, e.numel(): all_kept}
                required = {}
                for tol in args.tolerances:
                    r = top_output_edges_required(ablator, e, tol, baseline, kind, scores=scores)
                    scores = r.scores
                    required[str(tol)] = r.edges_required
                row = {
                    "block": block,
                    "section": label,
                    "basis": kind,
                    "outputs": e.shape[0],
                    "total_edges": e.numel(),
                    "loss_all_edges": all_kept,
                    "loss_no_edges": none_kept,
                    "edges_required": required,
                    "evaluations": len(scores),
                    "wall_s": time.perf_counter() - t0,
                    "cpu_s": cpu_seconds() - c0,
                    "scores": {str(k): v for k, v in sorted(scores.items())},
                }
                rows.append(row)
                print(
                    f"block {block:2d} {label:9s} {kind}: required {required} of {e.numel()}; "
                    f"loss all {all_kept:.4f}, none {none_kept:.4f}; {len(scores)} evaluations, "
                    f"{row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"baseline": baseline, "tokens": data.numel(), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
