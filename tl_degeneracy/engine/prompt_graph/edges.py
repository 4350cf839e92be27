"""Edges of a prompt graph: gradient × activation between consecutive sites, on one prompt.

The edge from input node `(s, j)` of site `l` to output feature `(t, i)` of site `l + 1` is

    A_{(t,i),(s,j)} = ∂f̂^{l+1}_{t,i} / ∂f̂^l_{s,j} · f̂^l_{s,j},

the interaction graph's `A_{b,t,i,j}` (docs/concepts.md) before the sum over input positions
and the average over data. The section is the map from site `l` to site `l + 1` with everything
else held at its value on the prompt: one forward cuts the autograd graph at every site (the
activation arriving there is kept as the section's output, a fresh leaf carries on), so a
vector-Jacobian product from site `l + 1` to the leaf at site `l` runs through that section
alone. Edges are computed only *into* candidate feature nodes (one cotangent each, batched);
each row's total |input| over every input node is kept so that influence can be normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.compat import StopForward, frozen_parameters, run_with_hooks
from tl_degeneracy.engine.prompt_graph.nodes import NodeAttributions, embedding_sites
from tl_degeneracy.engine.prompt_graph.site_io import _write_site

EMBEDDING, FEATURE, REST, TARGET = 0, 1, 2, 3
KIND_NAMES = ("embedding", "feature", "rest", "target")


@dataclass
class CandidateGraph:
    """Candidate nodes (all embeddings and rest nodes, the candidate features, the target) and
    the edges into them. `layer` is −1 for embeddings, the site index for features and rest
    nodes, the number of sites for the target; `feature` is −1 but for features."""

    layer: Int[Tensor, " n"]
    position: Int[Tensor, " n"]
    feature: Int[Tensor, " n"]
    kind: Int[Tensor, " n"]
    activation: Float[Tensor, " n"]
    """Feature value; norm of the vector of an embedding or rest node; the target's value."""
    attribution: Float[Tensor, " n"]
    """Gradient × activation on the target (the target's own value for the target)."""
    src: Int[Tensor, " e"]
    dst: Int[Tensor, " e"]
    weight: Float[Tensor, " e"]
    input_abs: Float[Tensor, " n"]
    """Σ |edges into the node| over *all* input nodes, candidates or not."""

    @property
    def n_nodes(self) -> int:
        return int(self.layer.numel())


def _node_block(layer: int, pos: Tensor, feat: Tensor, kind: int, act: Tensor, attr: Tensor):
    n = pos.numel()
    return (
        torch.full((n,), layer, dtype=torch.long),
        pos.to(torch.long),
        feat.to(torch.long),
        torch.full((n,), kind, dtype=torch.long),
        act.to(torch.float64),
        attr.to(torch.float64),
    )


def candidate_nodes(
    attrs: NodeAttributions, candidates: list[Int[Tensor, " c"]]
) -> tuple[list[tuple[Tensor, ...]], list[Tensor], list[Tensor]]:
    """Node blocks in graph order (embeddings, then per site its candidate features and rest
    nodes, then the target); the node index of each site's candidates and rest nodes."""
    n_pos = attrs.embedding.numel()
    emb_norm = torch.zeros(n_pos, dtype=torch.float64)
    for v in attrs.embedding_values:
        emb_norm = emb_norm + v.pow(2).sum(-1)
    none = torch.full((n_pos,), -1)
    blocks = [
        _node_block(-1, torch.arange(n_pos), none, EMBEDDING, emb_norm.sqrt(), attrs.embedding)
    ]
    start = n_pos
    cand_index, rest_index = [], []
    for layer, flat in enumerate(candidates):
        k = attrs.features[layer].shape[1]
        p_local, j = flat // k, flat % k
        pos = attrs.positions[layer]
        feats = attrs.features[layer][p_local, j]
        blocks.append(
            _node_block(
                layer, pos[p_local], j, FEATURE, feats, attrs.attributions[layer][p_local, j]
            )
        )
        cand_index.append(torch.arange(start, start + flat.numel()))
        start += flat.numel()
        rest_norm = attrs.rest_values[layer].norm(dim=-1)
        blocks.append(
            _node_block(layer, pos, torch.full_like(pos, -1), REST, rest_norm, attrs.rest[layer])
        )
        rest_index.append(torch.arange(start, start + pos.numel()))
        start += pos.numel()
    return blocks, cand_index, rest_index


def _cut_forward(
    model: nn.Module, attrs: NodeAttributions, tokens: Tensor
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One forward cut at every site and embedding: `(leaves, arrivals)` keyed by hook; the
    arrival at a site depends on the previous site's leaf only."""
    leaves: dict[str, Tensor] = {}
    arrivals: dict[str, Tensor] = {}
    sites = embedding_sites(model) + [c.site for c in attrs.chain]
    hooks = []
    for site in sites:

        def cut(sel: Tensor, name: str = site.hook) -> Tensor:
            arrivals[name] = sel
            leaves[name] = sel.detach().requires_grad_(True)
            return leaves[name]

        hooks += _write_site(model, site, cut)

    def stop(act: Tensor, hook: object = None) -> None:
        raise StopForward

    hooks.append((sites[-1].hook, stop))
    with frozen_parameters(model), torch.enable_grad():
        run_with_hooks(model, tokens, hooks, stop_early=True)
    return leaves, arrivals


def prompt_edges(
    model: nn.Module,
    tokens: Int[Tensor, "1 pos"],
    attrs: NodeAttributions,
    candidates: list[Int[Tensor, " c"]],
    target_position: int,
    chunk_size: int = 64,
) -> CandidateGraph:
    """The candidate graph: edges into every candidate feature (from all embeddings, or from the
    previous site's candidates and rest nodes) and into the target (from the last site's
    candidates and rest nodes, weighted by their attributions)."""
    blocks, cand_index, rest_index = candidate_nodes(attrs, candidates)
    n_pos = tokens.shape[1]
    n_sites = len(attrs.chain)
    blocks.append(
        _node_block(
            n_sites, torch.tensor([target_position]), torch.tensor([-1]), TARGET,
            torch.tensor([attrs.value]), torch.tensor([attrs.value]),
        )
    )  # fmt: skip
    layer, position, feature, kind, activation, attribution = (torch.cat(x) for x in zip(*blocks))
    n_nodes = layer.numel()
    target_index = n_nodes - 1
    input_abs = torch.zeros(n_nodes, dtype=torch.float64)
    srcs: list[Tensor] = []
    dsts: list[Tensor] = []
    weights: list[Tensor] = []
    leaves, arrivals = _cut_forward(model, attrs, tokens)
    emb_hooks = [s.hook for s in embedding_sites(model)]
    for lay, c in enumerate(attrs.chain):
        flat = candidates[lay]
        if flat.numel() == 0:
            continue
        k = attrs.features[lay].shape[1]
        p_local, j = flat // k, flat % k
        y = arrivals[c.name]
        readout = c.basis.C.T.to(y.device, y.dtype)  # [k, d]
        inputs = [leaves[h] for h in emb_hooks] if lay == 0 else [leaves[attrs.chain[lay - 1].name]]
        for lo in range(0, flat.numel(), chunk_size):
            rows = torch.arange(lo, min(lo + chunk_size, flat.numel()))
            v = y.new_zeros(rows.numel(), *y.shape)
            v[torch.arange(rows.numel()), 0, p_local[rows]] = readout[j[rows]]
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    y, inputs, v, is_grads_batched=True, retain_graph=True, allow_unused=True
                )
            dst = cand_index[lay][rows]
            if lay == 0:
                w = _embedding_rows(grads, attrs, rows.numel())
                src_index = torch.arange(n_pos)
                total = w.abs().sum(-1)
            else:
                w, total = _section_rows(
                    grads[0], attrs, lay - 1, candidates[lay - 1], rows.numel()
                )
                src_index = torch.cat([cand_index[lay - 1], rest_index[lay - 1]])
            input_abs[dst] = total
            srcs.append(src_index.repeat(rows.numel()))
            dsts.append(dst.repeat_interleave(src_index.numel()))
            weights.append(w.reshape(-1))
    last = n_sites - 1
    into_target = torch.cat([cand_index[last], rest_index[last]])
    srcs.append(into_target)
    dsts.append(torch.full_like(into_target, target_index))
    weights.append(attribution[into_target])
    input_abs[target_index] = attrs.attributions[last].abs().sum() + attrs.rest[last].abs().sum()
    src, dst, weight = torch.cat(srcs), torch.cat(dsts), torch.cat(weights)
    nonzero = weight != 0
    return CandidateGraph(
        layer, position, feature, kind, activation, attribution,
        src[nonzero], dst[nonzero], weight[nonzero], input_abs,
    )  # fmt: skip


def _embedding_rows(
    grads: tuple[Tensor | None, ...], attrs: NodeAttributions, rows: int
) -> Float[Tensor, "r pos"]:
    """Edges from every position's embedding node into `rows` of the first site's candidates:
    gradient × activation summed over the embedding hooks (token, and position if any)."""
    w = torch.zeros(rows, attrs.embedding.numel(), dtype=torch.float64)
    for g, value in zip(grads, attrs.embedding_values):
        if g is not None:
            w += (g[:, 0].to("cpu", torch.float64) * value).sum(-1)
    return w


def _section_rows(
    grad: Tensor | None, attrs: NodeAttributions, layer: int, cand: Tensor, rows: int
) -> tuple[Float[Tensor, "r c_plus_p"], Float[Tensor, " r"]]:
    """Edges from one site's candidates and rest nodes into `rows` of the next site's
    candidates, and each row's total |input| over all of the site's nodes."""
    basis = attrs.chain[layer].basis
    feats = attrs.features[layer]
    rest = attrs.rest_values[layer]
    if grad is None:  # the next site does not depend on this one at these positions
        n = cand.numel() + feats.shape[0]
        return torch.zeros(rows, n, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
    g = grad[:, 0].to("cpu", torch.float64)  # [r, p, d], beside the node values
    every = (g @ basis.C_pinv.T) * feats  # [r, p, k]
    from_rest = (g * rest).sum(-1)  # [r, p]
    total = every.abs().sum((1, 2)) + from_rest.abs().sum(-1)
    k = feats.shape[1]
    from_cand = every[:, cand // k, cand % k]
    return torch.cat([from_cand, from_rest], 1), total
