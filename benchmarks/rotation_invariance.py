"""Modules before and after a rotation of the residual stream, in the LIB, PCA and neuron
bases, on the planted-module network of `tl_degeneracy.engine.degeneracy.invariance`.

    python benchmarks/rotation_invariance.py [--out docs/img/rotation_invariance.png]
        [--setting default|reference]

Prints one table row per basis (Q before / after, modules, whether the partition is the same,
the adjusted Rand index of the two partitions, the smallest and mean share of a feature in
one planted module) and draws the edges of one section before and after, features ordered
by module.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from tl_degeneracy.engine.degeneracy.invariance import (
    adjusted_rand_index,
    basis_modules,
    block_shares,
    planted_labels,
    planted_modules_model,
    random_orthogonal,
    refines,
    rotate_residual_stream,
    same_partition,
)
from tl_degeneracy.engine.modularity import REFERENCE_MODULES

SECTION = "blocks.0.hook_resid_mid->blocks.0.hook_resid_post"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/rotation_invariance.png")
    parser.add_argument("--seed", type=int, default=1, help="seed of the rotation")
    parser.add_argument(
        "--setting",
        choices=("default", "reference"),
        default="default",
        help="module finding: the package default or the reference's log(E/ε) setting",
    )
    args = parser.parse_args()
    config = REFERENCE_MODULES if args.setting == "reference" else None
    torch.set_num_threads(1)
    start = time.time()
    planted = planted_modules_model()
    rotation = random_orthogonal(planted.config.d_model, seed=args.seed)
    rotated = rotate_residual_stream(planted.model, rotation)
    with torch.no_grad():
        a, b = planted.model(planted.tokens), rotated(planted.tokens)
    print(
        f"largest logit change {float((a - b).abs().max()):.1e} (logits up to "
        f"{float(a.abs().max()):.1f})"
    )
    print(
        "| basis | Q before | Q after | modules | same partition | ARI | refines planted "
        "| block share min / mean after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    panels = []
    for kind in ("lib", "pca", "neuron"):
        before = basis_modules(planted.model, planted.tokens, kind, config=config)
        after = basis_modules(rotated, planted.tokens, kind, config=config)
        shares = block_shares(planted, after, rotation)
        print(
            f"| {kind} | {before.modularity_q:.4f} | {after.modularity_q:.4f} | "
            f"{before.modules.n_modules} → {after.modules.n_modules} | "
            f"{same_partition(before.modules.assignment, after.modules.assignment)} | "
            f"{adjusted_rand_index(before.modules.assignment, after.modules.assignment):.3f} | "
            f"{refines(before.modules.assignment, planted_labels(planted, before))} | "
            f"{float(shares.min()):.3f} / {float(shares.mean()):.3f} |"
        )
        if kind in ("lib", "neuron"):
            panels.append((kind, before, after))
    plot(panels, args.out)
    print(f"wrote {args.out} ({time.time() - start:.1f} s)")
    return 0


def _ordered(found, section: str) -> torch.Tensor:
    """The section's edges with input and output features sorted by module label."""
    se = found.graph.sections[section]
    src, dst = se.section.inp.name, se.section.out.name
    labels = found.modules.by_site()
    rows = torch.argsort(torch.tensor(labels[dst]), stable=True)
    cols = torch.argsort(torch.tensor(labels[src]), stable=True)
    e = se.edges[rows][:, cols]
    return torch.log10(e / e.max()).clamp(min=-6)


def plot(panels, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
    for ax, (title, found, section) in zip(
        axes,
        [
            (f"{k}, {when} (Q = {f.modularity_q:.2f})", f, SECTION)
            for k, b, a in panels
            for when, f in (("before", b), ("after", a))
        ],
    ):
        im = ax.imshow(_ordered(found, section).numpy(), cmap="viridis", vmin=-6, vmax=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("resid_mid feature (by module)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel("resid_post feature (by module)", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="log10 E / max E")
    fig.suptitle(
        "Edges of the MLP section of block 0, before and after rotating the residual stream",
        fontsize=10,
    )
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
