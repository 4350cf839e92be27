"""Figures and tables of docs/language_models.md from a `fit-lm` output folder.

    python benchmarks/lm_lib_vs_pca.py OUT [--img docs/img]

Writes `lm_ablation.png`, `lm_edges.png`, `lm_spectra.png` and prints Markdown tables: node
ablation (held-out loss against kept features, LIB vs PCA) and edge sparsity (edges carrying
99% of each section's edge weight).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tl_degeneracy.engine.basis_result import BasisResult  # noqa: E402
from tl_degeneracy.viz import plot_ablation_curves, plot_spectra, save_figure  # noqa: E402


def plain(name: str) -> str:
    """A site or section name without its position list."""
    return re.sub(r"\[[^\]]*\]", "", name)


def per_row_edges(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[float, float, int]]:
    """Median (over output features and sections) of the inputs needed for 99% and 90% of one
    output feature's incoming edge weight, for attention and MLP sections."""
    parts: dict[str, list[tuple[int, int]]] = {"attention": [], "MLP": []}
    k_in = 0
    for name, e in tensors.items():
        if not name.endswith("/edges"):
            continue
        part = "attention" if "hook_resid_pre->" in plain(name) else "MLP"
        k_in = e.shape[1]
        srt = e.sort(dim=1, descending=True).values
        cum = srt.cumsum(1) / srt.sum(1, keepdim=True).clamp_min(1e-300)
        n99 = (cum < 0.99).sum(1) + 1
        n90 = (cum < 0.90).sum(1) + 1
        parts[part] += list(zip(n99.tolist(), n90.tolist()))
    return {
        p: (
            statistics.median(a for a, _ in v),
            statistics.median(b for _, b in v),
            k_in,
        )
        for p, v in parts.items()
        if v
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--img", default="docs/img")
    p.add_argument("--prefix", default="lm", help="file name prefix of the figures")
    args = p.parse_args()
    out, img = Path(args.out), Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    summary = json.loads((out / "summary.json").read_text())

    abl = summary["ablation"]
    if abl:
        curves = {
            plain(site).replace("blocks.", "block ").replace(".hook_", " "): {
                kind: {int(k): v for k, v in entry["loss"].items()} for kind, entry in by.items()
            }
            for site, by in abl.items()
        }
        base = {
            plain(site).replace("blocks.", "block ").replace(".hook_", " "): by["lib"][
                "baseline_loss"
            ]
            for site, by in abl.items()
        }
        fig = plot_ablation_curves(curves, "held-out loss (nats)", base)
        for ax in fig.axes:
            ax.set_yscale("log")
        save_figure(fig, img / f"{args.prefix}_ablation.png")
        print("\n| site | kept k | LIB loss | PCA loss |\n|---|---|---|---|")
        for site, by in abl.items():
            for k in by["lib"]["loss"]:
                print(f"| {site} | {k} | {by['lib']['loss'][k]:.3f} | {by['pca']['loss'][k]:.3f} |")
        print("\n| site | baseline | kind | min k (0.01) | min k (0.05) | min k (0.1) |")
        print("|---|---|---|---|---|---|")
        for site, by in abl.items():
            for kind, e in by.items():
                mk = e["min_k"]
                print(
                    f"| {site} | {e['baseline_loss']:.3f} | {kind} | {mk['0.01']} | "
                    f"{mk['0.05']} | {mk['0.1']} |"
                )

    edges = summary["edges"]
    if edges:
        names = list(edges)[::-1]  # forward order
        fig, ax = plt.subplots(figsize=(9, 3.6))
        for kind, colour in (("lib", "#d95f02"), ("pca", "#1b9e77")):
            ys = [edges[n][kind]["edges_for_99pct"] for n in names if kind in edges[n]]
            ax.plot(range(len(ys)), ys, marker="o", ms=3, color=colour, label=kind.upper())
        total = edges[names[0]]["lib"]["total"]
        ax.set_xticks(range(0, len(names), 4), [plain(n).split(".")[1] for n in names[::4]])
        ax.set_xlabel("block (two sections each: attention, MLP)")
        ax.set_ylabel(f"edges for 99% of weight (of {total})")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(img / f"{args.prefix}_edges.png", dpi=110)
        rows = []
        for kind in ("lib", "pca"):
            for part, sel in (("attention", "pre->"), ("MLP", "mid->")):
                vals = [
                    edges[n][kind]["edges_for_99pct"]
                    for n in names
                    if kind in edges[n] and sel in plain(n).replace("hook_resid_", "")
                ]
                frac = [
                    edges[n][kind]["edges_for_90pct"]
                    for n in names
                    if kind in edges[n] and sel in plain(n).replace("hook_resid_", "")
                ]
                rows.append((kind, part, statistics.median(vals), statistics.median(frac)))
        print("\n| basis | sections | median edges for 99% | for 90% | of |\n|---|---|---|---|---|")
        for kind, part, m99, m90 in rows:
            print(f"| {kind.upper()} | {part} | {m99:.0f} | {m90:.0f} | {total} |")
        row_median = {}
        for kind in ("lib", "pca"):
            path = out / f"edges_{kind}.safetensors"
            if path.exists():
                row_median[kind] = per_row_edges(load_file(str(path)))
        if row_median:
            print("\nPer output feature (each row normalised): median over rows and sections of")
            print("the edges carrying 99% / 90% of that feature's incoming weight\n")
            print("| basis | sections | 99% | 90% | of |\n|---|---|---|---|---|")
            for kind, by_part in row_median.items():
                for part, (m99, m90, k_in) in by_part.items():
                    print(f"| {kind.upper()} | {part} | {m99:.0f} | {m90:.0f} | {k_in} |")
        wins = sum(
            edges[n]["lib"]["edges_for_99pct"] < edges[n]["pca"]["edges_for_99pct"] for n in names
        )
        print(f"\nLIB sparser than PCA in {wins} of {len(names)} sections")

    sites = list(abl) or []
    if sites and (out / "lib").exists():
        lib, pca = BasisResult.load(out / "lib"), BasisResult.load(out / "pca")
        fig, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 3.4))
        for ax, site in zip(axes, sites):
            sub = plot_spectra(
                {
                    "lib": lib[site].importance.numpy(),
                    "pca": pca[site].importance.numpy(),
                },
                site,
                normalise=True,
            )
            for line in sub.axes[0].lines:
                ax.plot(*line.get_data(), color=line.get_color(), label=line.get_label())
            ax.set_yscale("log")
            ax.set_title(plain(site), fontsize=9)
            ax.set_xlabel("index")
            ax.legend(fontsize=7)
            plt.close(sub)
        axes[0].set_ylabel("fraction of total")
        fig.tight_layout()
        fig.savefig(img / f"{args.prefix}_spectra.png", dpi=110)


if __name__ == "__main__":
    main()
