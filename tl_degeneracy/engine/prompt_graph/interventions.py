"""Interventions that check a prompt graph: set features at positions to their mean, to zero or
to a value, run the model, and measure the target.

A feature's value is `f̂_j = ((f − μ) C)_j`; setting it to `v` moves the activation by
`(v − f̂_j) C⁺_j` and leaves every other feature and the truncated part alone. "mean" is
`v = 0` (features are centred on the fit data's mean), "zero" is the value of the zero
activation, `v = −(μ C)_j` (the feature's direction removed entirely). Several nodes at several
sites are set in one forward; a node at a later site is set to its value on the *intervened*
forward (a clamp). Many interventions run side by side by repeating the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import frozen_parameters, run_with_hooks
from tl_degeneracy.engine.model_match import check_fits
from tl_degeneracy.engine.prompt_graph.graph import NodeRef, PromptGraph
from tl_degeneracy.engine.prompt_graph.nodes import check_prompt
from tl_degeneracy.engine.prompt_graph.site_io import _write_site
from tl_degeneracy.engine.prompt_graph.target import Target, TargetLike, as_target
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.tokens import validate_tokens

Mode = Literal["mean", "zero", "value"]


@dataclass
class InterventionResult:
    """The target before and after one intervention (one set of nodes)."""

    nodes: list[NodeRef]
    mode: str
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


def _bases_by_hook(basis: BasisResult | Mapping[str, SiteBasis]) -> dict[str, SiteBasis]:
    bases = basis.bases if isinstance(basis, BasisResult) else basis
    return {b.site.hook: b for b in bases.values() if not b.site.is_logits}


def _as_ref(node: NodeRef | tuple[str, int, int]) -> NodeRef:
    ref = NodeRef(str(node[0]), int(node[1]), int(node[2]))
    if ref.feature < 0:
        raise ValueError(f"{tuple(ref)}: interventions set features (feature index ≥ 0)")
    return ref


def intervene_many(
    model: nn.Module,
    basis: BasisResult | Mapping[str, SiteBasis],
    tokens: Int[Tensor, "1 pos"],
    target: TargetLike,
    groups: Sequence[Sequence[NodeRef | tuple[str, int, int]]],
    mode: Mode = "mean",
    values: Sequence[Sequence[float]] | None = None,
    max_rows: int = 64,
) -> tuple[float, Float[Tensor, " groups"]]:
    """The target on the prompt and after each group's intervention (one row per group,
    `max_rows` rows per forward): `(before, after)`."""
    tgt: Target = as_target(target)
    check_prompt(tokens)
    tokens = validate_tokens(model, tokens)
    if mode not in ("mean", "zero", "value"):
        raise ValueError(f"mode must be 'mean', 'zero' or 'value', got {mode!r}")
    if mode == "value" and (values is None or len(values) != len(groups)):
        raise ValueError("mode='value' needs one list of values per group (`values`)")
    by_hook = _bases_by_hook(basis)
    check_fits(model, list(by_hook.values()))
    refs = [[_as_ref(n) for n in g] for g in groups]
    n_pos = tokens.shape[1]
    for g in refs:
        for r in g:
            if r.site not in by_hook:
                raise KeyError(f"no basis at {r.site!r}; sites: {list(by_hook)}")
            if not -n_pos <= r.position < n_pos:
                raise IndexError(
                    f"{tuple(r)}: position {r.position} is outside the prompt's {n_pos} tokens "
                    f"(0 to {n_pos - 1}, or -{n_pos} to -1 from the end)"
                )
    with torch.no_grad(), frozen_parameters(model):
        before = float(tgt(model(tokens))[0])
        after = torch.empty(len(refs), dtype=torch.float64)
        for lo in range(0, len(refs), max_rows):
            part = refs[lo : lo + max_rows]
            vals = None if values is None else values[lo : lo + max_rows]
            hooks = []
            for hook, basis_ in by_hook.items():
                edit = _site_edit(basis_, part, vals, mode, n_pos)
                if edit is not None:
                    hooks += _write_site(model, Site(hook), edit)
            logits = run_with_hooks(model, tokens.expand(len(part), -1), hooks)
            after[lo : lo + len(part)] = tgt(logits).cpu()
    return before, after


def _site_edit(
    basis: SiteBasis,
    groups: list[list[NodeRef]],
    values: Sequence[Sequence[float]] | None,
    mode: Mode,
    n_pos: int,
):
    """The write at one site: rows × positions × features to set and their values."""
    hook = basis.site.hook
    mask = torch.zeros(len(groups), n_pos, basis.k, dtype=torch.bool)
    new = torch.zeros(len(groups), n_pos, basis.k, dtype=torch.float64)
    zero_value = -(basis.mean @ basis.C)  # the features of the zero activation
    for row, group in enumerate(groups):
        for n, ref in enumerate(group):
            if ref.site != hook:
                continue
            pos = ref.position % n_pos
            if not 0 <= ref.feature < basis.k:
                raise IndexError(f"{tuple(ref)}: the basis at {hook} has {basis.k} features")
            mask[row, pos, ref.feature] = True
            if mode == "zero":
                new[row, pos, ref.feature] = zero_value[ref.feature]
            elif mode == "value":
                assert values is not None
                new[row, pos, ref.feature] = float(values[row][n])
    if not mask.any():
        return None

    def edit(act: Tensor) -> Tensor:
        here = basis.to(act.device)
        feats = here.features(act)  # [rows, pos, k]
        change = torch.where(mask.to(act.device), new.to(act.device) - feats, 0.0)
        return act + (change @ here.C_pinv).to(act.dtype)

    return edit


def intervene(
    model: nn.Module,
    basis: BasisResult | Mapping[str, SiteBasis],
    tokens: Int[Tensor, "1 pos"],
    target: TargetLike,
    nodes: Sequence[NodeRef | tuple[str, int, int]],
    mode: Mode = "mean",
    values: Sequence[float] | None = None,
) -> InterventionResult:
    """Set `nodes` (site hook, position, feature) together to their mean, to zero or to
    `values`, run the model and report the target before and after."""
    vals = None if values is None else [list(values)]
    before, after = intervene_many(model, basis, tokens, target, [list(nodes)], mode, vals)
    return InterventionResult([_as_ref(n) for n in nodes], mode, before, float(after[0]))


@dataclass
class NodeEffects:
    """Measured effect of setting each node alone, next to the graph's estimates."""

    nodes: list[NodeRef]
    effect: Float[Tensor, " n"]
    """Target after − before, each node set alone."""
    attribution: Float[Tensor, " n"]
    """The graph's first-order estimate of setting the node to its mean: −attribution."""
    influence: Float[Tensor, " n"]
    before: float

    def rows(self) -> list[dict[str, float | int | str]]:
        """One row per node, by decreasing |effect|."""
        order = torch.argsort(self.effect.abs(), descending=True, stable=True)
        return [
            {
                "site": self.nodes[i].site,
                "position": self.nodes[i].position,
                "feature": self.nodes[i].feature,
                "effect": float(self.effect[i]),
                "estimate (−attribution)": float(-self.attribution[i]),
                "influence": float(self.influence[i]),
            }
            for i in order.tolist()
        ]


def rank_by_effect(
    model: nn.Module,
    graph: PromptGraph,
    basis: BasisResult | Mapping[str, SiteBasis] | None = None,
    nodes: Sequence[NodeRef] | None = None,
    mode: Mode = "mean",
    max_rows: int = 64,
    target: TargetLike | None = None,
) -> NodeEffects:
    """Set each of the graph's kept feature nodes (or `nodes`) alone, measure the change of
    the target, and return them by decreasing |effect| with the graph's estimates. `target`
    is needed only for a graph of a custom metric (`Target.from_metric`), which a graph keeps
    by name alone."""
    basis = basis if basis is not None else graph.basis
    if basis is None:
        raise ValueError("pass the basis the graph was built in (a loaded graph does not hold it)")
    refs = list(nodes) if nodes is not None else graph.top_nodes(n=graph.n_kept)
    target = graph_target(graph) if target is None else as_target(target)
    tokens = graph.tokens[None]
    before, after = intervene_many(model, basis, tokens, target, [[r] for r in refs], mode,
                                   max_rows=max_rows)  # fmt: skip
    idx = [graph.node_index(r) for r in refs]
    effect = after - before
    order = torch.argsort(effect.abs(), descending=True, stable=True)
    c = graph.candidates
    return NodeEffects(
        [refs[i] for i in order.tolist()],
        effect[order],
        c.attribution[idx][order],
        graph.influence[idx][order],
        before,
    )


def graph_target(graph: PromptGraph) -> Target:
    """The target a graph explains, rebuilt from its description (logit targets only)."""
    spec = graph.target
    if spec.get("kind") == "logit":
        return Target.logit(spec["token"], spec["position"])
    if spec.get("kind") == "logit_difference":
        return Target.logit_difference(spec["good"], spec["bad"], spec["position"])
    raise ValueError(
        f"the graph's target {spec.get('name')!r} is a custom metric, which a graph keeps by "
        "name only: pass it again as `target` (to `rank_by_effect` or `intervene`)"
    )
