"""Prompt graphs of SmolLM2 on indirect-object prompts, checked by intervention.

For each clean IOI prompt ("When Kate and Sam went to the market, Kate gave a drink to" →
" Sam") the target is the logit difference `logit(IO) − logit(S)` at the last position. A
prompt graph is built in a LIB and in a PCA basis fitted at every residual-stream cut on the
default corpus; its 10 most influential kept feature nodes that support the prediction are set
to their mean together, and the change of the logit difference is compared with that of 10
feature nodes drawn at random among the nodes whose |activation| is at least the smallest of
the top 10's.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_degeneracy.engine.artifacts import ArtifactError
from tl_degeneracy.engine.basis_result import BasisResult

__all__ = ["Faithfulness", "PairResult", "ioi_bases", "ioi_faithfulness", "random_nodes_like"]


def ioi_bases(
    model: nn.Module,
    n_tokens: int = 2048,
    n_sources: int = 4,
    skip_bos: bool = True,
    folder: str | Path | None = None,
    log: Any = print,
) -> dict[str, BasisResult]:
    """LIB and PCA bases at every residual-stream cut of `model` (SmolLM2), fitted with the
    language-model job on `n_tokens` tokens of the default corpus, cached in `folder` (default:
    the user cache, `prompt_graph/…`). With `skip_bos` position 0 (BOS) is left out of the fit,
    so that its massive activation does not set the mean and the leading directions."""
    from tl_degeneracy.experiments.lm_study import LMFitConfig, fit_lm
    from tl_degeneracy.models import cache_dir, load_corpus

    tag = f"smollm2_{n_tokens}tok_R{n_sources}{'_nobos' if skip_bos else ''}"
    root = Path(folder) if folder is not None else cache_dir("prompt_graph", tag)
    kinds = ("lib", "pca")
    if all((root / k / "metadata.json").exists() for k in kinds):
        try:
            return {k: BasisResult.load(root / k, model) for k in kinds}
        except ArtifactError as error:  # a cache of another model or an older package: refit
            log(f"refitting the cached bases in {root}: {error}")
    tokens = load_corpus(model.tokenizer, 128, "train", max_tokens=n_tokens)
    config = LMFitConfig(
        n_tokens=n_tokens,
        n_sources=n_sources,
        edge_tokens=0,
        ablation_tokens=0,
        skip_bos=skip_bos,
        progress=False,
    )
    fit = fit_lm(model, tokens, config, work_dir=root / "work", log=log)
    for kind in kinds:
        fit.bases[kind].save(root / kind)
    shutil.rmtree(root / "work", ignore_errors=True)
    return {k: fit.bases[k] for k in kinds}


@dataclass
class PairResult:
    """One prompt, one basis: the top nodes' ablation against random ablations."""

    kind: str
    pair: int
    prompt: str
    value: float
    """The logit difference on the clean prompt."""
    top_nodes: list[tuple[str, int, int]]
    """The kept feature nodes of largest influence that support the prediction."""
    top_delta: float
    """Change of the logit difference with the top nodes set to their mean together."""
    random_deltas: list[float]
    """The same for each random draw."""
    pool: int
    """Feature nodes with |activation| at least the top nodes' smallest."""
    unsigned_top_delta: float
    """The same as `top_delta` for the kept nodes of largest influence of either sign."""
    kept: int
    seconds: float
    """CPU seconds of the graph (build and prune)."""

    @property
    def random_median(self) -> float:
        """Median |change| of the random draws (NaN without draws)."""
        if not self.random_deltas:
            return float("nan")
        return float(torch.tensor(self.random_deltas).abs().median())

    @property
    def beaten(self) -> float:
        """Share of random draws whose |change| is below the top nodes'."""
        if not self.random_deltas:
            return 0.0
        r = torch.tensor(self.random_deltas).abs()
        return float((r < abs(self.top_delta)).double().mean())

    @property
    def passed(self) -> bool:
        """The top nodes moved the target more than the median random draw (False without
        top nodes)."""
        return bool(self.top_nodes) and abs(self.top_delta) > self.random_median


@dataclass
class Faithfulness:
    """Per pair and basis: top nodes against random nodes of equal or larger activation."""

    rows: list[PairResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """One Markdown row per pair: both bases side by side."""
        kinds = list(dict.fromkeys(r.kind for r in self.rows))
        by = {(r.kind, r.pair): r for r in self.rows}
        pairs = sorted({r.pair for r in self.rows})
        head = "| pair | logit diff | " + " | ".join(
            f"{k.upper()} top 10 | {k.upper()} random (median \\|Δ\\|) | {k.upper()} beaten | "
            f"{k.upper()} top 10, either sign"
            for k in kinds
        )
        lines = [head + " |", "|---:|---:|" + "---:|---:|---:|---:|" * len(kinds)]
        for p in pairs:
            cells = []
            for k in kinds:
                r = by[(k, p)]
                mark = "" if r.passed else " ✗"
                cells.append(
                    f"{r.top_delta:+.3f}{mark} | {r.random_median:.3f} | {100 * r.beaten:.0f}% | "
                    f"{r.unsigned_top_delta:+.3f}"
                )
            first = by[(kinds[0], p)]
            lines.append(f"| {p} | {first.value:.3f} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per basis: pairs passed, exceptions, medians."""
        out: dict[str, dict[str, Any]] = {}
        for kind in dict.fromkeys(r.kind for r in self.rows):
            rows = [r for r in self.rows if r.kind == kind]
            top = torch.tensor([abs(r.top_delta) for r in rows])
            rnd = torch.tensor([r.random_median for r in rows])
            out[kind] = {
                "pairs": len(rows),
                "passed": sum(r.passed for r in rows),
                "exceptions": [r.pair for r in rows if not r.passed],
                "median |top delta|": float(top.median()),
                "median of random medians": float(rnd.median()),
                "median share of random draws beaten": float(
                    torch.tensor([r.beaten for r in rows]).median()
                ),
                "median |top delta|, either sign": float(
                    torch.tensor([abs(r.unsigned_top_delta) for r in rows]).median()
                ),
                "median kept nodes": float(torch.tensor([float(r.kept) for r in rows]).median()),
                "median graph CPU seconds": float(torch.tensor([r.seconds for r in rows]).median()),
            }
        return out


def random_nodes_like(
    graph: Any, top: list[Any], n_draws: int, gen: torch.Generator
) -> tuple[list[list[tuple[str, int, int]]], int]:
    """`n_draws` sets of `len(top)` feature nodes drawn uniformly among the graph's feature
    nodes (every site and position of the graph) whose |activation| is at least the smallest of
    the top nodes', the top nodes excluded (no draws without top nodes)."""
    if not top:
        return [], 0
    threshold = min(abs(float(graph.candidates.activation[graph.node_index(r)])) for r in top)
    chosen = {tuple(r) for r in top}
    pool: list[tuple[str, int, int]] = []
    for layer, feats in enumerate(graph.features):
        p_local, j = torch.nonzero(feats.abs() >= threshold, as_tuple=True)
        positions = graph.site_positions[layer][p_local]
        for p, f in zip(positions.tolist(), j.tolist()):
            node = (graph.sites[layer], int(p), int(f))
            if node not in chosen:
                pool.append(node)
    groups = []
    for _ in range(n_draws):
        pick = torch.randperm(len(pool), generator=gen)[: len(top)]
        groups.append([pool[i] for i in pick.tolist()])
    return groups, len(pool)


def ioi_faithfulness(
    model: nn.Module | None = None,
    n_pairs: int = 16,
    bases: dict[str, BasisResult] | None = None,
    n_top: int = 10,
    n_random: int = 20,
    seed: int = 0,
    drop_final_site: bool = True,
    tokenizer: Any = None,
    log: Any = print,
    **graph_settings: Any,
) -> Faithfulness:
    """Prompt graphs of `n_pairs` clean IOI prompts (seed `seed`) in each basis; the `n_top`
    kept feature nodes of largest influence that support the prediction (positive attribution
    to the logit difference) are set to their mean together and compared with `n_random` draws
    of as many nodes of equal or larger |activation| (see `random_nodes_like`). The kept nodes of
    largest influence of either sign are ablated too, for reference.

    Nodes sit at every position but BOS. With `drop_final_site` the final site
    (`blocks.29.hook_resid_post`, whose basis is the same PCA basis in both fits) is left out,
    so that every node of the graph is in the basis being compared. `tokenizer` defaults to
    `model.tokenizer`; `graph_settings` go to `prompt_graph`.
    """
    import time

    from tl_degeneracy.engine.prompt_graph import Target, prompt_graph
    from tl_degeneracy.engine.prompt_graph.interventions import intervene_many
    from tl_degeneracy.experiments.ioi import ioi_prompt_pairs

    if model is None:
        from tl_degeneracy.models import load_smollm2

        model = load_smollm2()
    bases = bases if bases is not None else ioi_bases(model, log=log)
    pairs = ioi_prompt_pairs(tokenizer or model.tokenizer, n_pairs, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for kind, basis in bases.items():
        sites = [b.site.hook for b in basis.bases.values() if not b.site.is_logits]
        if drop_final_site:
            sites = sites[:-1]
        for i in range(n_pairs):
            tokens = pairs.clean_tokens[i : i + 1]
            target = Target.logit_difference(int(pairs.io_tokens[i]), int(pairs.s_tokens[i]))
            start = time.process_time()
            graph = prompt_graph(
                model, basis, tokens, target,
                positions=tuple(range(1, tokens.shape[1])), sites=tuple(sites),
                **graph_settings,
            )  # fmt: skip
            seconds = time.process_time() - start
            top = graph.top_nodes(n_top, sign="supporting")
            unsigned = graph.top_nodes(n_top)
            draws, pool = random_nodes_like(graph, top, n_random, gen)
            before, after = intervene_many(model, basis, tokens, target, [top, unsigned, *draws])
            delta = (after - before).tolist()
            nodes = [(r.site, r.position, r.feature) for r in top]
            rows.append(
                PairResult(
                    kind, i, pairs.prompts[i], before, nodes, delta[0], delta[2:], pool, delta[1],
                    graph.n_kept, seconds,
                )
            )  # fmt: skip
            log(
                f"{kind} pair {i}: logit diff {before:.3f}, top {delta[0]:+.3f}, random median "
                f"|Δ| {rows[-1].random_median:.3f} (beaten {rows[-1].beaten:.0%}), {seconds:.1f} s"
            )
    settings = {
        "n_pairs": n_pairs, "n_top": n_top, "n_random": n_random, "seed": seed,
        "drop_final_site": drop_final_site, "graph": graph_settings,
    }  # fmt: skip
    return Faithfulness(rows, settings)
