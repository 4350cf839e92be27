"""The prompt graph: which features carry one prediction on one prompt.

Nodes are each site's features at each position, the token embeddings, one rest node per site
and position (the mean and the truncated directions) and the target; edges run between
consecutive sites, gradient × activation, the per-prompt form of the interaction graph's edges.
It is built in three steps whose memory grows with the number of *kept* nodes:

1. one forward and one backward give every node's attribution to the target (`nodes.py`);
2. each site keeps as candidates the fewest features holding `candidate_share` of its
   |attribution| (at most `max_candidates`), and edges into the candidates come from batched
   vector-Jacobian products through each section alone (`edges.py`);
3. influence through all paths prunes the candidates to the nodes holding `node_share` of it,
   and each kept node's edges to those holding `edge_share` of its input (`prune.py`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.artifacts import Result, build_metadata
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.model_match import check_fits, warn_if_fitted_elsewhere
from tl_degeneracy.engine.prompt_graph.edges import (
    FEATURE,
    KIND_NAMES,
    CandidateGraph,
    prompt_edges,
)
from tl_degeneracy.engine.prompt_graph.nodes import check_prompt, node_attributions, site_chain
from tl_degeneracy.engine.prompt_graph.prune import (
    completeness,
    influence,
    prune_edges,
    prune_nodes,
    select_candidates,
)
from tl_degeneracy.engine.prompt_graph.target import Target, TargetLike, as_target
from tl_degeneracy.engine.sites import Positions, SiteLike
from tl_degeneracy.engine.tokens import validate_tokens


@dataclass(frozen=True)
class PromptGraphConfig:
    """How a prompt graph is built and pruned."""

    positions: Positions = "all"
    """Positions of the prompt that carry nodes at every site ("all", "last" or indices); the
    others keep their value (say, leave out position 0, the BOS token)."""
    sites: tuple[SiteLike, ...] | None = None
    """Sites of the basis to use (keys, hook names, short forms like `("resid_post", 0)`), in
    forward order; None: every residual-stream site of the basis (not the logits, nor MLP or
    attention sites)."""
    candidate_share: float = 0.9
    """Each site's candidate features hold this share of its |attribution| ..."""
    max_candidates: int = 100
    """... and are at most this many (edges are computed into candidates only)."""
    node_share: float = 0.8
    """Kept nodes hold this share of the total influence on the target."""
    edge_share: float = 0.9
    """Each kept node keeps the edges holding this share of its |input| from the graph."""
    freeze_final_norm: bool = False
    """Hold the final normalisation's scale at its value on the prompt, as direct logit
    attribution does (see `node_attributions`). Off by default: the model's own gradient
    found the nodes that carry a prediction better (docs/prompt_graphs.md, "Faithfulness")."""
    chunk_size: int = 64
    """Cotangents per batched vector-Jacobian product."""

    def __post_init__(self) -> None:
        for name in ("candidate_share", "node_share", "edge_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a share between 0 and 1, got {value}")
        if self.max_candidates < 1 or self.chunk_size < 1:
            raise ValueError(
                f"max_candidates and chunk_size must be at least 1, got {self.max_candidates} "
                f"and {self.chunk_size}"
            )


class NodeRef(NamedTuple):
    """A node: the site's hook, the absolute position, the feature (−1: the rest node)."""

    site: str
    position: int
    feature: int


@dataclass
class PromptGraph(Result):
    """A pruned prompt graph with every node's attribution; see the module docstring."""

    ARTIFACT = "prompt_graph"

    tokens: Int[Tensor, " pos"]
    str_tokens: list[str]
    sites: list[str]
    target: dict[str, Any]
    value: float
    site_positions: list[Int[Tensor, " p"]]
    features: list[Float[Tensor, "p k"]]
    attributions: list[Float[Tensor, "p k"]]
    rest: list[Float[Tensor, " p"]]
    site_totals: Float[Tensor, " n_sites"]
    embedding: Float[Tensor, " pos"]
    candidates: CandidateGraph
    influence: Float[Tensor, " n"]
    kept_nodes: Bool[Tensor, " n"]
    kept_edges: Bool[Tensor, " e"]
    config: PromptGraphConfig
    metadata: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] | None = None
    """Per-feature contexts and logit effects for the viewer (see `with_details`)."""
    basis: BasisResult | None = field(default=None, repr=False)
    """The basis the graph was built in (kept in memory, not saved)."""

    # -- nodes ---------------------------------------------------------------------------------

    def node_ref(self, index: int) -> NodeRef:
        """The site, position and feature of a candidate node (embeddings: site "embedding")."""
        c = self.candidates
        layer = int(c.layer[index])
        site = (
            "embedding"
            if layer < 0
            else "target"
            if layer >= len(self.sites)
            else self.sites[layer]
        )
        return NodeRef(site, int(c.position[index]), int(c.feature[index]))

    def node_index(self, ref: NodeRef | tuple[str, int, int]) -> int:
        """The candidate index of a node (KeyError if it is not a candidate)."""
        site, pos, feat = ref
        layer = -1 if site == "embedding" else self.sites.index(site)
        c = self.candidates
        hit = (c.layer == layer) & (c.position == int(pos)) & (c.feature == int(feat))
        found = torch.nonzero(hit)
        if found.numel() == 0:
            raise KeyError(f"{tuple(ref)} is not a node of this graph")
        return int(found[0, 0])

    def top_nodes(
        self,
        n: int = 10,
        by: Literal["influence", "attribution"] = "influence",
        kept: bool = True,
        sign: Literal["any", "supporting", "opposing"] = "any",
    ) -> list[NodeRef]:
        """The `n` kept (or candidate) feature nodes of largest influence or |attribution|;
        with `sign`, only those whose attribution has the target's sign ("supporting": they
        push the target the way it goes on this prompt) or the opposite sign."""
        if sign not in ("any", "supporting", "opposing"):
            raise ValueError(f"sign must be 'any', 'supporting' or 'opposing', got {sign!r}")
        if by not in ("influence", "attribution"):
            raise ValueError(f"by must be 'influence' or 'attribution', got {by!r}")
        c = self.candidates
        mask = c.kind == FEATURE
        if kept:
            mask = mask & self.kept_nodes
        direction = 1.0 if self.value >= 0 else -1.0
        if sign == "supporting":
            mask = mask & (c.attribution * direction > 0)
        elif sign == "opposing":
            mask = mask & (c.attribution * direction < 0)
        score = self.influence if by == "influence" else c.attribution.abs()
        score = torch.where(mask, score, torch.full_like(score, -1.0))
        order = torch.argsort(score, descending=True, stable=True)[: int(mask.sum())]
        return [self.node_ref(int(i)) for i in order[:n]]

    def nodes_table(self, kept: bool = True) -> list[dict[str, Any]]:
        """One row per kept (or candidate) node, by decreasing influence."""
        c = self.candidates
        idx = torch.nonzero(self.kept_nodes if kept else torch.ones_like(self.kept_nodes))[:, 0]
        idx = idx[torch.argsort(self.influence[idx], descending=True, stable=True)]
        rows = []
        for i in idx.tolist():
            ref = self.node_ref(i)
            rows.append(
                {
                    "kind": KIND_NAMES[int(c.kind[i])],
                    "site": ref.site,
                    "position": ref.position,
                    "token": self.str_tokens[ref.position],
                    "feature": ref.feature,
                    "activation": float(c.activation[i]),
                    "attribution": float(c.attribution[i]),
                    "influence": float(self.influence[i]),
                }
            )
        return rows

    @property
    def n_kept(self) -> int:
        return int(self.kept_nodes.sum())

    # -- pruning and completeness --------------------------------------------------------------

    def prune(
        self, node_share: float | None = None, edge_share: float | None = None
    ) -> PromptGraph:
        """The same candidates pruned at other shares (no model run)."""
        config = replace(
            self.config,
            node_share=self.config.node_share if node_share is None else node_share,
            edge_share=self.config.edge_share if edge_share is None else edge_share,
        )
        nodes = prune_nodes(self.candidates, self.influence, config.node_share)
        edges = prune_edges(self.candidates, nodes, config.edge_share)
        return replace(self, kept_nodes=nodes, kept_edges=edges, config=config)

    def completeness(self) -> list[dict[str, Any]]:
        """Per site: the target's value, the attribution of the kept features and of the rest
        nodes, and the gap between them (see `prune.completeness`)."""
        return completeness(
            self.candidates, self.kept_nodes, self.sites, self.site_totals, self.rest, self.value
        )

    def completeness_summary(self) -> str:
        """One line: kept nodes and edges, and the range of the completeness gap over sites."""
        rows = self.completeness()
        gaps = [abs(float(r["relative gap"])) for r in rows]
        rest = [abs(float(r["rest"])) / abs(self.value) for r in rows] if self.value else [0.0]
        return (
            f"{self.n_kept} kept nodes, {int(self.kept_edges.sum())} edges; target "
            f"{self.target['name']} = {self.value:.4g}; the kept features and rest nodes of a "
            f"site miss it by {min(gaps):.3g}–{max(gaps):.3g} of its value over {len(rows)} "
            f"sites (the completeness gap); |rest| up to {max(rest):.3g} of the target"
        )

    # -- display -------------------------------------------------------------------------------

    def with_details(self, details: Mapping[str, Any]) -> PromptGraph:
        """Attach per-feature details for the viewer: `{"site:feature": {"examples": [...],
        "promoted": [[token, value], ...], "suppressed": [...]}}` (see
        `details.feature_details`)."""
        self.details = dict(details)
        return self

    def to_viewer_data(self) -> dict[str, Any]:
        """The plain dict the prompt-graph viewer draws (kept nodes and edges)."""
        from tl_degeneracy.engine.prompt_graph.viewer_data import viewer_data

        return viewer_data(self)

    def _html_title(self) -> str:
        return f"Prompt graph of {self.target['name']}"

    def _html_sections(self) -> list:
        from tl_degeneracy.viz.html import PageSection, table
        from tl_degeneracy.viz.prompt_graph import prompt_graph_html

        return [
            PageSection("Graph", prompt_graph_html(self.to_viewer_data())),
            PageSection("Completeness", table(self.completeness()), self.completeness_summary()),
            PageSection("Kept nodes", table(self.nodes_table()[:200])),
        ]

    def __repr__(self) -> str:
        return (
            f"PromptGraph(target={self.target['name']!r}, value={self.value:.4g}, "
            f"sites={len(self.sites)}, positions={len(self.str_tokens)}, "
            f"candidates={self.candidates.n_nodes}, kept={self.n_kept}, "
            f"edges={int(self.kept_edges.sum())})"
        )

    # -- the result protocol (`save(path)`, `load(path, model=None)`) ------------------------

    def _tensors(self) -> dict[str, Tensor]:
        from tl_degeneracy.engine.prompt_graph.persist import graph_tensors

        return graph_tensors(self)

    def _metadata(self) -> dict[str, Any]:
        from tl_degeneracy.engine.prompt_graph.persist import graph_metadata

        return graph_metadata(self)

    @classmethod
    def _from_artifact(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> PromptGraph:
        from tl_degeneracy.engine.prompt_graph.persist import graph_from_artifact

        return graph_from_artifact(tensors, meta)


def str_tokens_of(model: nn.Module, tokens: Tensor) -> list[str]:
    """Token strings of a prompt (the ids as text where the model has no tokenizer)."""
    if getattr(model, "tokenizer", None) is not None:
        to_str: Any = getattr(model, "to_str_tokens", None)
        if to_str is not None:
            return [str(t) for t in to_str(tokens)]
    return [str(int(t)) for t in tokens]


def prompt_graph(
    model: nn.Module,
    basis: BasisResult | Mapping[str, SiteBasis],
    tokens: Int[Tensor, "1 pos"],
    target: TargetLike,
    config: PromptGraphConfig | None = None,
    **overrides: Any,
) -> PromptGraph:
    """Build and prune the prompt graph of `target` on `tokens` in `basis` (fields of
    `PromptGraphConfig` may be passed as keywords)."""
    config = replace(config or PromptGraphConfig(), **overrides)
    tgt: Target = as_target(target)
    check_prompt(tokens)
    tokens = validate_tokens(model, tokens)
    start = time.process_time()
    chain = site_chain(model, basis, config.sites, config.positions)
    check_fits(model, [c.basis for c in chain])
    warn_if_fitted_elsewhere(model, basis)
    attrs = node_attributions(model, chain, tokens, tgt, None, config.freeze_final_norm)
    t_nodes = time.process_time() - start
    candidates = [
        select_candidates(a, config.candidate_share, config.max_candidates)
        for a in attrs.attributions
    ]
    n_pos = tokens.shape[1]
    target_pos = tgt.position % n_pos
    graph = prompt_edges(model, tokens, attrs, candidates, target_pos, config.chunk_size)
    t_edges = time.process_time() - start - t_nodes
    node_influence = influence(graph)
    nodes = prune_nodes(graph, node_influence, config.node_share)
    edges = prune_edges(graph, nodes, config.edge_share)
    t_prune = time.process_time() - start - t_nodes - t_edges
    kind = basis.kind if isinstance(basis, BasisResult) else chain[0].basis.kind
    metadata = {
        **build_metadata(model, [c.basis.site for c in chain]),
        "basis_kind": kind,
        "basis_sites": [c.basis.site.name for c in chain],
        "cpu_seconds": {"nodes": t_nodes, "edges": t_edges, "prune": t_prune},
    }
    return PromptGraph(
        tokens=tokens[0].detach().cpu().clone(),
        str_tokens=str_tokens_of(model, tokens[0]),
        sites=[c.name for c in chain],
        target={**tgt.to_json(), "position": target_pos},
        value=attrs.value,
        site_positions=attrs.positions,
        features=attrs.features,
        attributions=attrs.attributions,
        rest=attrs.rest,
        site_totals=attrs.site_totals,
        embedding=attrs.embedding,
        candidates=graph,
        influence=node_influence,
        kept_nodes=nodes,
        kept_edges=edges,
        config=config,
        metadata=metadata,
        basis=basis if isinstance(basis, BasisResult) else None,
    )
