"""The prompt graph's node attributions side by side with attribution patching.

On a clean/corrupted prompt pair, attribution patching (docs/attribution.md) estimates the
effect of patching an activation from corrupted to clean by `(a − a') · g'`, `g'` the target's
gradient on the corrupted prompt. The graph's nodes split it: with the corrupted prompt as the
baseline and the gradient taken there, feature `j` at position `s` scores
`((a_s − a'_s) C)_j (g'_s C⁺ᵀ)_j` and the rest node the truncated part of `a_s − a'_s`; per site
they add up to TransformerLens's value exactly. Next to it: the same split with the gradient on
the clean prompt (the graph's own orientation), the true effect of patching the whole site,
and, per node, the true effect of patching that one feature at that one position.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.artifacts import Result, check_saved
from tl_degeneracy.engine.attribution import spearman, tl_sites_attribution
from tl_degeneracy.engine.attribution.patching import (
    corrupted_baseline,
    feature_patching,
    site_patching,
)
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.capture import capture_sites
from tl_degeneracy.engine.model_match import check_fits, warn_if_fitted_elsewhere
from tl_degeneracy.engine.prompt_graph.nodes import check_prompt, node_attributions, site_chain
from tl_degeneracy.engine.prompt_graph.target import TargetLike, as_target
from tl_degeneracy.engine.sites import Positions, SiteLike
from tl_degeneracy.engine.tokens import validate_pair

_SITE_ROW = {
    "site": str,
    "nodes (attribution patching)": float,
    "TransformerLens": (float, None),
    "nodes (graph)": float,
    "site patching": float,
}
_NODE_ROW = {
    "site": str,
    "position": int,
    "feature": int,
    "attribution patching": float,
    "patching": float,
}
"""The entries of a saved comparison's rows that it reads (`artifacts.check_saved`)."""


@dataclass(repr=False)
class PatchingComparison(Result):
    """Per site and per node: the graph's attributions, attribution patching, true patching."""

    sites: list[dict[str, Any]]
    nodes: list[dict[str, Any]]
    clean_value: float
    corrupted_value: float
    metadata: dict[str, Any] = field(default_factory=dict)

    ARTIFACT = "patching_comparison"

    def _tensors(self) -> dict[str, Tensor]:
        return {"values": torch.tensor([self.clean_value, self.corrupted_value])}

    def _metadata(self) -> dict[str, Any]:
        return {**self.metadata, "site_rows": self.sites, "node_rows": self.nodes}

    @classmethod
    def _check_artifact(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any], folder: Path
    ) -> None:
        """The rows the tables, plot and correlations read, and the two target values."""
        keys = {"site_rows": [_SITE_ROW], "node_rows": [_NODE_ROW]}
        check_saved(folder, cls.ARTIFACT, meta, tensors, keys, {"values": (2,)})

    @classmethod
    def _from_artifact(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> PatchingComparison:
        clean, corrupted = (float(v) for v in tensors["values"])
        rest = {k: v for k, v in meta.items() if k not in ("site_rows", "node_rows")}
        return cls(meta["site_rows"], meta["node_rows"], clean, corrupted, rest)

    def correlation(self, site: str | None = None) -> float:
        """Spearman ρ between per-node attribution patching and true patching (all nodes, or
        one site's)."""
        rows = [r for r in self.nodes if site is None or r["site"] == site]
        a = torch.tensor([r["attribution patching"] for r in rows], dtype=torch.float64)
        p = torch.tensor([r["patching"] for r in rows], dtype=torch.float64)
        return spearman(a, p)

    def max_site_discrepancy(self) -> float:
        """Largest |Σ nodes − TransformerLens| over sites, relative to the largest |value|."""
        diffs = [
            abs(r["nodes (attribution patching)"] - r["TransformerLens"])
            for r in self.sites
            if r["TransformerLens"] is not None
        ]
        scale = max([abs(r["TransformerLens"] or 0.0) for r in self.sites] + [1e-300])
        return max(diffs, default=0.0) / scale

    def sites_table(self) -> str:
        """The per-site comparison as a Markdown table."""
        head = (
            "| site | Σ nodes, gradient at corrupted | TransformerLens | Σ nodes, gradient at "
            "clean | site patching |"
        )
        lines = [head, "|---|---:|---:|---:|---:|"]
        for r in self.sites:
            tl = r["TransformerLens"]
            lines.append(
                f"| `{r['site']}` | {r['nodes (attribution patching)']:.4g} | "
                f"{'–' if tl is None else format(tl, '.4g')} | {r['nodes (graph)']:.4g} | "
                f"{r['site patching']:.4g} |"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "sites": self.sites,
            "nodes": self.nodes,
            "clean_value": self.clean_value,
            "corrupted_value": self.corrupted_value,
            "metadata": self.metadata,
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    def _html_title(self) -> str:
        return "Prompt graph against attribution patching"

    def _html_sections(self) -> list:
        from tl_degeneracy.viz.graph_widget import short_site_label
        from tl_degeneracy.viz.html import PageSection, table
        from tl_degeneracy.viz.plots import figure_to_html, plot_scatter

        a = [r["attribution patching"] for r in self.nodes]
        p = [r["patching"] for r in self.nodes]
        labels = [
            f"{short_site_label(r['site'])}@{r['position']}:{r['feature']}" for r in self.nodes
        ]  # as the attribution comparison: the 12 points farthest out, short site names
        fig = plot_scatter(
            a, p, labels, "attribution patching", "patching", diagonal=True, max_labels=12
        )
        intro = (
            f"target: clean {self.clean_value:.4g}, corrupted {self.corrupted_value:.4g}; "
            f"Spearman ρ over {len(self.nodes)} nodes: {self.correlation():.3f}"
        )
        prompts = [(k, self.metadata.get(f"{k}_prompt")) for k in ("clean", "corrupted")]
        if all(text is not None for _, text in prompts):  # as the caller recorded them
            intro += "".join(f"; {k} prompt: {text!r}" for k, text in prompts)
        return [
            PageSection("Per site", table(self.sites), intro),
            PageSection(
                "Per node",
                [figure_to_html(fig, "attribution vs patching"), table(self.nodes)],
                "Each node's attribution patching against true patching (dashed: y = x); the 12 "
                "points farthest from the median are labelled block site@position:feature.",
            ),
        ]


PATCH_ROWS = 4096
"""Most patched copies of the prompt per forward when a site's nodes are patched each alone,
side by side."""


def compare_with_patching(
    model: nn.Module,
    basis: BasisResult | Mapping[str, SiteBasis],
    clean_tokens: Int[Tensor, "1 pos"],
    corrupted_tokens: Int[Tensor, "1 pos"],
    target: TargetLike,
    sites: Sequence[SiteLike] | None = None,
    positions: Positions = "all",
    top: int = 10,
    tl_check: bool = True,
) -> PatchingComparison:
    """Per-site sums of node attributions against TransformerLens's attribution patching and
    true site patching, and each site's `top` nodes (largest |attribution patching|, none
    that is exactly 0: where the two prompts agree) against true patching of that feature at
    that position (`feature_patching_effects`)."""
    tgt = as_target(target)
    metric = tgt.metric()
    for prompt in (clean_tokens, corrupted_tokens):
        check_prompt(prompt)
    clean_tokens, corrupted_tokens = validate_pair(model, clean_tokens, corrupted_tokens)
    chain = site_chain(model, basis, sites, positions)
    check_fits(model, [c.basis for c in chain])
    warn_if_fitted_elsewhere(model, basis)
    # gradient at the corrupted prompt, values relative to the clean one: minus attribution
    # patching
    at_corrupted = node_attributions(model, chain, corrupted_tokens, tgt, clean_tokens, False)
    at_clean = node_attributions(model, chain, clean_tokens, tgt, corrupted_tokens, False)
    # every site's activations, the unpatched corrupted run and TransformerLens's cache are
    # shared by all sites: per site there remain one forward for the site and one for its nodes
    site_list = [c.site for c in chain]
    clean_acts = capture_sites(model, clean_tokens, site_list)
    corrupt_acts = capture_sites(model, corrupted_tokens, site_list)
    baseline = corrupted_baseline(model, corrupted_tokens, metric)
    tl_values: list[float | None] = (
        list(tl_sites_attribution(model, site_list, clean_tokens, corrupted_tokens, metric))
        if tl_check
        else [None] * len(chain)
    )
    site_rows, node_rows = [], []
    for layer, c in enumerate(chain):
        clean, corrupt = clean_acts[layer], corrupt_acts[layer]
        ap = -at_corrupted.attributions[layer]  # [p, k]
        ap_rest = -at_corrupted.rest[layer]
        graph_sum = float(at_clean.attributions[layer].sum() + at_clean.rest[layer].sum())
        site_rows.append(
            {
                "site": c.name,
                "nodes (attribution patching)": float(ap.sum() + ap_rest.sum()),
                "rest (attribution patching)": float(ap_rest.sum()),
                "TransformerLens": tl_values[layer],
                "nodes (graph)": graph_sum,
                "site patching": site_patching(
                    model, c.site, corrupted_tokens, metric, clean, corrupt, baseline
                ),
            }
        )
        k = ap.shape[1]
        flat = ap.flatten()
        order = torch.argsort(flat.abs(), descending=True)[:top].tolist()
        order = [i for i in order if flat[i] != 0]  # a node the prompts share says nothing
        nodes = sorted((i // k, n, i % k) for n, i in enumerate(order))  # by position
        if not nodes:
            continue
        b = replace(c.basis, site=c.site).to(clean.device)  # at the graph's positions
        dfeat = (clean.to(torch.float64) - corrupt.to(torch.float64)) @ b.C
        masks = torch.zeros(len(nodes), *dfeat.shape[1:], dtype=torch.float64, device=dfeat.device)
        for row, (p_local, _, f) in enumerate(nodes):
            masks[row, p_local, f] = 1.0  # that feature at that position alone
        effects = feature_patching(
            model, b, corrupted_tokens, metric, corrupt, dfeat, masks, PATCH_ROWS, baseline
        )
        pos_abs = at_corrupted.positions[layer]
        for (p_local, _, f), e in zip(nodes, effects.tolist()):
            node_rows.append(
                {
                    "site": c.name,
                    "position": int(pos_abs[p_local]),
                    "feature": f,
                    "attribution patching": float(ap[p_local, f]),
                    "graph attribution": float(at_clean.attributions[layer][p_local, f]),
                    "patching": e,
                }
            )
    return PatchingComparison(
        site_rows,
        node_rows,
        at_clean.value,
        at_corrupted.value,
        {"target": tgt.to_json(), "top": top, "positions": str(positions)},
    )
