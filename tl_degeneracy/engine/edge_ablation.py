"""Edge ablation (docs/concepts.md, "Ablations"): keep the n largest edges of one section;
every output feature i is recomputed from the input features with its dropped edges zeroed,
`x_i = μ + (f̂ ⊙ m_i) C⁺`, and the model runs on from the output site. Bisection finds the
fewest edges whose score stays within a tolerance of the unablated one ("edges required").

The section's structure (`structures.structure_of`) computes the ablated outputs: the generic
path replicates the batch once per output feature; the closed forms touch only the edges that
differ between masks. When the rest of the model from the output site is written out (a site
of the last block of a model without normalisation) and the metric reads only the last
position, it runs there too; otherwise the model runs on its hooks with the output site
written. Tests hold every fast path to the generic one (`structures.autograd_only`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.ablation import Metric, evaluate, per_sequence, reads_last_position_only
from tl_degeneracy.engine.artifacts import NUMBER_OR_NAN, Result, check_saved, saved_float
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.capture import as_positions, capture_sites, injection_hooks
from tl_degeneracy.engine.compat import frozen_parameters, run_with_hooks
from tl_degeneracy.engine.edges import SectionEdges
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import LOGITS, Site
from tl_degeneracy.engine.store import ActivationSource
from tl_degeneracy.engine.streaming import iter_batches


def keep_mask(edges: Float[Tensor, "k_out k_in"], n: int) -> Bool[Tensor, "k_out k_in"]:
    """True on the `n` largest edges (ties broken by index)."""
    flat = torch.zeros(edges.numel(), dtype=torch.bool, device=edges.device)
    if n > 0:
        flat[edges.flatten().topk(min(n, edges.numel())).indices] = True
    return flat.reshape(edges.shape)


def output_rows(
    model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    basis_in: SiteBasis,
    basis_out: SiteBasis,
    source: ActivationSource | None = None,
) -> Any:
    """Capture the input features of one batch and prepare the section's ablated outputs."""
    from tl_degeneracy.engine.structures import structure_of

    section = Section(basis_in.site, basis_out.site)
    structure = structure_of(model, section)
    source = source or ActivationSource(model)
    full = source.activation(section.inp, 0, tokens) if structure.needs_activation else None
    act = (
        section.inp.select(full)
        if full is not None
        else capture_sites(model, tokens, [section.inp])[0]
    )
    feats = basis_in.features(act)  # [B, P_in, k_in]
    return structure.output_rows(tokens, full, basis_in, basis_out, feats)


@torch.no_grad()
def ablated_output_features(
    model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    basis_in: SiteBasis,
    basis_out: SiteBasis,
    mask: Bool[Tensor, "k_out k_in"],
) -> Float[Tensor, "batch p_out k_out"]:
    """Output features with each output's dropped input edges zeroed (float64)."""
    tokens = iter_batches(tokens, tokens.shape[0], model)[0]
    with frozen_parameters(model):
        return output_rows(model, tokens, basis_in, basis_out).outputs(mask)


class EdgeAblationScorer:
    """Scores edge-ablation masks of one section on fixed data.

    Built once per section and reused by the bisection: the input features of every batch
    and everything about the section that does not depend on the mask are kept. Memory: the
    input features of all data, float64.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: Int[Tensor, "n pos"],
        basis_in: SiteBasis,
        basis_out: SiteBasis,
        metric: Metric,
        batch_size: int = 2048,
    ):
        from tl_degeneracy.engine.structures import PlainTailStructure, structure_of

        self.model, self.basis_out, self.metric = model, basis_out, metric
        out = basis_out.site
        self.tail = None
        if reads_last_position_only(metric):
            rest = structure_of(model, Section(out.with_positions("all"), Site(LOGITS, "last")))
            if isinstance(rest, PlainTailStructure):
                self.tail = rest.tail
        self.batches = []
        with torch.no_grad(), frozen_parameters(model):
            for batch in iter_batches(tokens, batch_size, model):
                rows = output_rows(model, batch, basis_in, basis_out)
                clean = None
                if self.tail is not None and not out.is_logits:
                    (clean,) = capture_sites(model, batch, [Site(out.hook, "all")])
                    clean = clean.to(torch.float64)
                self.batches.append((batch, rows, clean))

    @torch.no_grad()
    def score(self, mask: Bool[Tensor, "k_out k_in"]) -> float:
        """Mean metric with the section's output features recomputed under `mask`."""
        total, n = 0.0, 0
        out_site = self.basis_out.site
        for batch, rows, clean in self.batches:
            new = self.basis_out.reconstruct(rows.outputs(mask))  # [B, p_out, d_out]
            if self.tail is not None:  # a transformer's last block: positions are the tokens'
                n_pos = batch.shape[1]
                idx = out_site.index(n_pos, new.device)
                last = [n_pos - 1]
                if out_site.is_logits:
                    slot = (idx == n_pos - 1).nonzero()[:, 0]
                    logits = new[:, slot] if len(slot) else self.model(batch)[:, last]
                else:
                    assert clean is not None  # captured in __init__ for a tail before the logits
                    act = clean.index_copy(1, idx, new)
                    logits = self.tail.logits(out_site.hook, act, last)
            elif out_site.is_logits:
                out = self.model(batch)
                logits = as_positions(out).clone()
                logits[:, out_site.index(logits.shape[1], new.device)] = new.to(logits.dtype)
                logits = logits.reshape(out.shape)
            else:
                hooks = injection_hooks(self.model, out_site, new)
                logits = run_with_hooks(self.model, batch, hooks)
            total += float(per_sequence(self.metric(logits, batch), batch.shape[0]).sum())
            n += batch.shape[0]
        return total / n


def edge_ablation_score(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    basis_in: SiteBasis,
    basis_out: SiteBasis,
    mask: Bool[Tensor, "k_out k_in"],
    metric: Metric,
    batch_size: int = 2048,
) -> float:
    """Mean metric with the section's output features recomputed under `mask` (one mask;
    use `EdgeAblationScorer` to score several)."""
    scorer = EdgeAblationScorer(model, tokens, basis_in, basis_out, metric, batch_size)
    return scorer.score(mask)


@dataclass(repr=False)
class EdgeAblation(Result):
    """Scores by number of kept edges, and the bisection's answer."""

    section: str
    total_edges: int
    baseline: float
    scores: dict[int, float] = field(default_factory=dict)
    edges_required: int | None = None
    tolerance: float = 0.001
    metadata: dict[str, Any] = field(default_factory=dict)

    ARTIFACT = "edge_ablation"

    def to_json(self) -> dict:
        return {
            "section": self.section,
            "total_edges": self.total_edges,
            "baseline": self.baseline,
            "tolerance": self.tolerance,
            "edges_required": self.edges_required,
            "scores": {str(k): v for k, v in sorted(self.scores.items())},
        }

    def _tensors(self) -> dict[str, Tensor]:
        ns = sorted(self.scores)
        return {
            "n": torch.tensor(ns, dtype=torch.int64),
            "score": torch.tensor([self.scores[n] for n in ns], dtype=torch.float64),
        }

    def _metadata(self) -> dict[str, Any]:
        return {**self.metadata, **self.to_json()}

    @classmethod
    def _check_artifact(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any], folder: Path
    ) -> None:
        """What `to_json` wrote and the page reads, and the tensors `n` and `score`, one per
        score."""
        keys = {
            "section": str,
            "total_edges": int,
            "baseline": NUMBER_OR_NAN,
            "tolerance": float,
            "edges_required": (int, None),
            "scores": {"*": NUMBER_OR_NAN},
        }

        def shapes(meta: dict[str, Any]) -> dict[str, tuple[int | str, ...]]:
            return {"n": (len(meta["scores"]),), "score": (len(meta["scores"]),)}

        check_saved(folder, cls.ARTIFACT, meta, tensors, keys, shapes)

    @classmethod
    def _from_artifact(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> EdgeAblation:
        scores = {int(k): saved_float(v) for k, v in meta["scores"].items()}
        return cls(
            meta["section"],
            meta["total_edges"],
            saved_float(meta["baseline"]),
            scores,
            meta["edges_required"],
            meta["tolerance"],
            meta,
        )

    def _html_sections(self) -> list:
        from tl_degeneracy.viz.html import PageSection, table

        rows = [{"kept edges": n, "score": v} for n, v in sorted(self.scores.items())]
        info = (
            f"{self.section}: {self.edges_required} of {self.total_edges} edges keep the score "
            f"within {self.tolerance} of {self.baseline:.5f}"
        )
        return [PageSection("Edge ablation", table(rows), info)]


def edges_required(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    edges: SectionEdges,
    basis_in: SiteBasis,
    basis_out: SiteBasis,
    metric: Metric,
    tolerance: float = 0.001,
    baseline: float | None = None,
    batch_size: int = 2048,
    higher_is_better: bool = True,
    log: Callable[[str], None] | None = None,
) -> EdgeAblation:
    """Fewest kept edges whose score is within `tolerance` of the unablated score: halve
    down from all edges until the score fails, then bisect (the reference's protocol)."""
    e = edges.edges
    total = e.numel()
    if baseline is None:
        baseline = evaluate(model, tokens, metric, batch_size)
    result = EdgeAblation(edges.section.name, total, baseline, tolerance=tolerance)
    scorer = EdgeAblationScorer(model, tokens, basis_in, basis_out, metric, batch_size)

    def ok(n: int) -> bool:
        if n not in result.scores:
            result.scores[n] = scorer.score(keep_mask(e, n))
            if log:
                log(f"  {edges.section.name}: {n} edges -> {result.scores[n]:.5f}")
        gap = baseline - result.scores[n]
        return (gap if higher_is_better else -gap) <= tolerance

    result.edges_required = fewest_passing(total, ok)
    return result


def fewest_passing(total: int, ok: Callable[[int], bool]) -> int | None:
    """The fewest n in 1…total with `ok(n)`, searched as the reference does: halve from `total`
    until a count fails, then bisect between the last pass and that failure (0 counts as
    failing). None when even `ok(total)` fails (the bases are truncated too much)."""
    if not ok(total):
        return None
    hi, lo = total, 0  # ok(hi) holds; lo fails
    n = (total + 1) // 2
    while n >= 1:
        if not ok(n):
            lo = n
            break
        hi = n
        n = (n + 1) // 2 if n > 1 else 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
