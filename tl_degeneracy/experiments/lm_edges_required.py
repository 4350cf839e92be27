"""Edges required under ablation (docs/concepts.md, "Ablations") for one section of a language
model, on a budget: only the edges into the section's top `N` output features are ablated.

Keeping the `n` largest of those `N · k_in` edges, each of the `N` output features is
recomputed from the input features with its dropped edges zeroed,
`f̂_out,i = f̂_out,i(F(μ + (f̂_in ⊙ m_i) C⁺))`, the other output features keep their clean
values, and the model runs on from the output site. The held-out loss (next-token
cross-entropy) is the score; bisection finds the fewest edges within `tolerance` nats of the
clean loss.

Why it is affordable on SmolLM2: the section input and clean output are captured once, the `N`
masked inputs run through the section's structure (`structures.structure_of`: the block's
attention or MLP alone on a `HookedTransformer`), batched, and each score costs one forward on a
small held-out slice. The generic
`engine.edge_ablation` path recomputes every output feature with a section pass over the
model prefix per chunk, ~2 CPU-hours a section at 256 tokens. Both give the same score when the
non-top rows of the generic mask keep all their edges (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.ablation import next_token_loss
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.capture import capture_sites, injection_hooks
from tl_degeneracy.engine.compat import frozen_parameters, run_with_hooks
from tl_degeneracy.engine.edge_ablation import fewest_passing, keep_mask
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.structures import structure_of


@dataclass
class TopOutputEdgeAblation:
    """Scores by number of kept edges into the top `n_outputs` output features of a section,
    and the fewest edges within `tolerance` of the clean loss (None if even all fail)."""

    section: str
    basis: str
    n_outputs: int
    total_edges: int
    baseline: float
    tolerance: float
    scores: dict[int, float] = field(default_factory=dict)
    edges_required: int | None = None

    @property
    def fraction_required(self) -> float | None:
        """`edges_required` as a fraction of the ablated edges."""
        return None if self.edges_required is None else self.edges_required / self.total_edges

    def to_json(self) -> dict:
        return {
            "section": self.section,
            "basis": self.basis,
            "n_outputs": self.n_outputs,
            "total_edges": self.total_edges,
            "baseline": self.baseline,
            "tolerance": self.tolerance,
            "edges_required": self.edges_required,
            "scores": {str(k): v for k, v in sorted(self.scores.items())},
        }


class TopOutputAblator:
    """The held-out loss of a model whose section outputs are recomputed under edge masks.

    Captures the section's input and output on `tokens` once; `loss(mask)` then costs one
    batched block-local section pass and one forward.
    """

    @torch.no_grad()
    def __init__(
        self,
        model: nn.Module,
        tokens: Int[Tensor, "n pos"],
        basis_in: SiteBasis,
        basis_out: SiteBasis,
        n_outputs: int,
        metric: Callable[[Tensor, Tensor], Tensor] = next_token_loss,
    ):
        self.section = Section(basis_in.site, basis_out.site)
        self.structure = structure_of(model, self.section)
        self.model, self.tokens, self.metric = model, tokens, metric
        self.n_outputs = min(n_outputs, basis_out.k)
        (full,) = capture_sites(model, tokens, [self.section.inp], all_positions=True)
        self.basis_in, self.basis_out = basis_in.to(full.device), basis_out.to(full.device)
        basis_in = self.basis_in
        self.full_in = full if self.structure.needs_activation else None
        (act_out,) = capture_sites(model, tokens, [self.section.out])
        act_in = self.section.inp.select(full)
        self.features_in: Float[Tensor, "n pos k_in"] = basis_in.features(act_in)
        self.act_out: Float[Tensor, "n pos d"] = act_out.clone()
        self.clean_out: Float[Tensor, "n pos n_top"] = basis_out.features(act_out)[
            ..., : self.n_outputs
        ]

    @torch.no_grad()
    def ablated_output(self, mask: Bool[Tensor, "n_top k_in"]) -> Float[Tensor, "n pos d"]:
        """The section's output activation with each top output feature recomputed under its
        row of `mask` (float64)."""
        n_top, (n, pos, _) = self.n_outputs, self.features_in.shape
        mask = mask.to(self.features_in.device, torch.float64)
        masked = self.features_in[None] * mask[:, None, None, :]
        x = self.basis_in.reconstruct(masked).reshape(n_top * n, pos, -1)
        full = None if self.full_in is None else self.full_in.repeat(n_top, 1, 1)
        with frozen_parameters(self.model):
            inputs = self.tokens.repeat(n_top, 1)
            y = self.structure.forward(inputs, full, x.to(self.act_out.dtype))
        out = self.basis_out
        feats = ((y.to(torch.float64) - out.mean) @ out.C[:, :n_top]).reshape(n_top, n, pos, -1)
        top = torch.arange(n_top)
        new = feats[top, :, :, top].permute(1, 2, 0)  # [n, pos, n_top]: output i under row i
        delta = (new - self.clean_out) @ self.basis_out.C_pinv[:n_top]
        return self.act_out.to(torch.float64) + delta

    @torch.no_grad()
    def loss(self, mask: Bool[Tensor, "n_top k_in"]) -> float:
        """Mean metric with the top output features recomputed under `mask`."""
        new = self.ablated_output(mask).to(self.act_out.dtype)
        hooks = injection_hooks(self.model, self.section.out, new)
        logits = run_with_hooks(self.model, self.tokens, hooks)
        return float(self.metric(logits, self.tokens).mean())


def top_output_edges_required(
    ablator: TopOutputAblator,
    edges: Float[Tensor, "n_top k_in"],
    tolerance: float,
    baseline: float,
    basis_name: str = "",
    log: Callable[[str], None] | None = None,
    scores: dict[int, float] | None = None,
) -> TopOutputEdgeAblation:
    """Fewest of the largest `edges` (into the top outputs) whose loss stays within
    `tolerance` of `baseline`: halve down from all edges until the loss fails, then bisect
    (the protocol of `edge_ablation.edges_required`; 0 edges counts as failing).
    Pass the `scores` of an earlier call on the same edges to reuse them at another tolerance.
    """
    edges = edges[: ablator.n_outputs]
    total = edges.numel()
    result = TopOutputEdgeAblation(
        ablator.section.name, basis_name, ablator.n_outputs, total, baseline, tolerance
    )
    if scores:
        result.scores.update(scores)

    def ok(n: int) -> bool:
        if n not in result.scores:
            result.scores[n] = ablator.loss(keep_mask(edges, n))
            if log:
                log(f"  {ablator.section.name} {basis_name}: {n} edges -> {result.scores[n]:.4f}")
        return result.scores[n] - baseline <= tolerance

    result.edges_required = fewest_passing(total, ok)
    return result
