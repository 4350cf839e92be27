"""LIB and PCA on SmolLM2 at every residual cut plus the MLP sites of two blocks (the MLP's
1,536 hidden neurons with the 576-wide stream that bypasses them): node-ablation curves at the
MLP sites, and how much of each top feature's norm lives in the MLP neurons.

    python benchmarks/lm_mlp_sites.py [--tokens 2048] [--blocks 5 20] [--threads 1]

Prints the numbers docs/language_models.md quotes ("MLP sites")."""

from __future__ import annotations

import argparse
import time

import torch

from tl_degeneracy.engine.composite import part_shares
from tl_degeneracy.engine.sites import residual_sites
from tl_degeneracy.experiments.study import StudyConfig, run_study
from tl_degeneracy.models import load_corpus, load_smollm2


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--blocks", type=int, nargs="+", default=[5, 20])
    p.add_argument("--top", type=int, default=16, help="top features summarised")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start, cpu = time.perf_counter(), time.process_time()
    model = load_smollm2(api="hooked")
    tokens = load_corpus(model.tokenizer, 128, "train", max_tokens=args.tokens)
    heldout = load_corpus(model.tokenizer, 128, "heldout")
    sites = residual_sites(model, positions="1:", mlp=tuple(args.blocks))
    mlp_sites = [s for s in sites if s.is_composite]
    config = StudyConfig(
        edge_tokens=0,
        ablation_tokens=256,
        ablation_sites=tuple(s.hook for s in mlp_sites),
        ablation_ks=(0, 16, 64, 256, 576, 1024, 2112),
        progress=False,
    )
    study = run_study(model, sites, tokens, config, heldout=heldout, log=lambda s: None)
    print(
        f"{tokens.numel()} tokens, {len(sites)} sites; {time.perf_counter() - start:.0f} s wall, "
        f"{time.process_time() - cpu:.0f} s CPU"
    )
    for site in mlp_sites:
        for kind in ("lib", "pca"):
            basis = study.bases[kind][site.name]
            shares = part_shares(model, basis)[:, 0]  # the MLP neurons' share
            top = shares[: args.top]
            curve = study.curves[site.name][kind]
            print(
                f"{site.name} {kind.upper()}: kept {basis.k} of {basis.d}; share of norm in the "
                f"MLP neurons, top {args.top} features: median {top.median():.3f}, min "
                f"{top.min():.3f}, max {top.max():.3f}; all features: median "
                f"{shares.median():.3f}"
            )
            print(
                f"  node ablation (held-out loss, baseline {curve.baseline:.3f}): "
                + ", ".join(f"k={k}: {v:.3f}" for k, v in sorted(curve.scores.items()))
                + f"; min k within 0.05 nats: {curve.min_k(0.05)}"
            )


if __name__ == "__main__":
    main()
