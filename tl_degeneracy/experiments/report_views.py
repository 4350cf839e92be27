"""The parts of a study report that need the model: top-activating examples of each site's most
important features (`SiteBasis.importance_order`, the features the report's views show) on
held-out text, the tokens late features promote and suppress through the
unembedding, and the dominant-direction diagnostic traced to its tokens.

    inputs = study_output.report_inputs(study)          # or study_output.load_study_artifacts(out)
    inputs = add_model_views(inputs, model, heldout, decode)
    study_report(inputs).save(out / "report.html")

Works for any model the engine fits: sites and positions come from the bases, token strings
from the caller's `decode(token_id)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.diagnostics import dominant_directions
from tl_degeneracy.engine.logit_effects import direct_logit_effects, logit_readout
from tl_degeneracy.engine.statistics import capture_sites
from tl_degeneracy.engine.streaming import iter_batches
from tl_degeneracy.viz.feature_views import LogitEffects, TopkExamples, topk_examples
from tl_degeneracy.viz.report import StudyReportInputs

__all__ = [
    "add_model_views",
    "all_feature_examples",
    "feature_examples",
    "feature_logit_effects",
    "top_features",
]

Decoder = Callable[[int], str]


def _bases(result: BasisResult | Mapping[str, SiteBasis]) -> Mapping[str, SiteBasis]:
    return result.bases if isinstance(result, BasisResult) else result


def top_features(basis: SiteBasis, n_features: int) -> list[int]:
    """The `n_features` most important features of a site (`SiteBasis.importance_order`): the
    first columns of a sorted basis (LIB, PCA, neuron), a raw site's coordinates of largest
    variance. The examples and logit effects below cover these, by feature id."""
    return basis.importance_order()[: max(0, min(n_features, basis.k))].tolist()


@torch.no_grad()
def all_feature_examples(
    model: nn.Module,
    results: Mapping[str, BasisResult],
    tokens: Int[Tensor, "n pos"],
    decode: Decoder,
    n_features: int = 16,
    k: int = 4,
    context: tuple[int, int] = (8, 2),
    batch_size: int = 8,
) -> dict[str, dict[str, TopkExamples]]:
    """`feature_examples` of every site of every basis kind, from one pass over `tokens`
    ({kind: {site: examples}})."""
    sites = {s.name: s for r in results.values() for s in r.sites}
    names = list(sites)
    parts: dict[tuple[str, str], list[Tensor]] = {}
    wanted: dict[tuple[str, str], list[int]] = {}
    for batch in iter_batches(tokens, batch_size, model):
        acts = dict(zip(names, capture_sites(model, batch, [sites[n] for n in names])))
        for kind, result in results.items():
            for name, b in result.bases.items():
                cols = wanted.setdefault((kind, name), top_features(b, n_features))
                feats = b.features(acts[name])[..., cols].float().cpu()
                parts.setdefault((kind, name), []).append(feats)
    strings = [[decode(int(t)) for t in row] for row in tokens.tolist()]
    out: dict[str, dict[str, TopkExamples]] = {kind: {} for kind in results}
    for (kind, name), chunks in parts.items():
        pos = sites[name].index(tokens.shape[1]).tolist()
        rows = [[row[p] for p in pos] for row in strings]
        out[kind][name] = topk_examples(
            torch.cat(chunks), rows, k=k, context=context, feature_ids=wanted[(kind, name)]
        )
    return out


@torch.no_grad()
def feature_examples(
    model: nn.Module,
    result: BasisResult | Mapping[str, SiteBasis],
    tokens: Int[Tensor, "n pos"],
    decode: Decoder,
    sites: Sequence[str] | None = None,
    n_features: int = 16,
    k: int = 4,
    context: tuple[int, int] = (8, 2),
    batch_size: int = 8,
) -> dict[str, TopkExamples]:
    """Top-`k` activating contexts of the `n_features` most important features of each site
    (`top_features`; their ids travel with the examples, `TopkExamples.row_of`), one example
    per sequence, at the site's own positions. Holds `n · pos · n_features` floats per site:
    pick `tokens` to fit (a few hundred sequences)."""
    bases = _bases(result)
    names = list(sites) if sites is not None else list(bases)
    objs = [bases[n].site for n in names]
    wanted = {n: top_features(bases[n], n_features) for n in names}
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    for batch in iter_batches(tokens, batch_size, model):
        for name, act in zip(names, capture_sites(model, batch, objs)):
            parts[name].append(bases[name].features(act)[..., wanted[name]].float().cpu())
    strings = [[decode(int(t)) for t in row] for row in tokens.tolist()]
    out = {}
    for name, site in zip(names, objs):
        pos = site.index(tokens.shape[1]).tolist()
        rows = [[row[p] for p in pos] for row in strings]
        out[name] = topk_examples(
            torch.cat(parts[name]), rows, k=k, context=context, feature_ids=wanted[name]
        )
    return out


def feature_logit_effects(
    model: nn.Module,
    result: BasisResult | Mapping[str, SiteBasis],
    decode: Decoder,
    sites: Sequence[str],
    n_features: int = 16,
    k: int = 8,
    readout: Tensor | None = None,
) -> dict[str, LogitEffects]:
    """The `k` tokens each of the `n_features` most important features of `sites`
    (`top_features`; their ids travel with the effects, `LogitEffects.row_of`) raises and lowers
    most, by its direct effect on the logits (`engine.logit_effects`; residual, MLP and
    attention sites alike, except composite sites of blocks that normalise their outputs,
    left out with a warning); `readout` defaults to `logit_readout(model)`."""
    bases = _bases(result)
    readout = readout if readout is not None else logit_readout(model)
    out = {}
    for name in sites:
        b = bases[name]
        feats = top_features(b, n_features)
        try:
            effects = direct_logit_effects(model, b, feats, readout)
        except ValueError as error:  # a composite site whose writes go through a norm
            warnings.warn(f"no logit effects at {name}: {error}", stacklevel=2)
            continue
        out[name] = LogitEffects.from_effects(effects, decode, k, feature_ids=feats)
    return out


def add_model_views(
    inputs: StudyReportInputs,
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    decode: Decoder,
    unembed: Tensor | None = None,
    logit_sites: Sequence[str] | None = None,
    n_features: int = 16,
    k: int = 4,
    batch_size: int = 8,
    threshold: float = 0.5,
) -> StudyReportInputs:
    """`inputs` with examples and logit effects of every fitted kind (of each site's
    `n_features` most important features, `top_features`) and the dominant-direction
    diagnostic (from the PCA fit when there is one), all on `tokens` (held-out text).

    Logit effects are computed at `logit_sites` (default: the last third of the sites);
    `unembed` defaults to `model.W_U` through the final normalisation's gain.
    """
    try:  # one readout for every kind and site; none for a model without an unembedding
        readout: Tensor | None = logit_readout(model, unembed)
    except ValueError as error:
        warnings.warn(f"the report has no logit effects: {error}", stacklevel=2)
        readout = None
    examples = all_feature_examples(
        model, inputs.bases, tokens, decode, n_features, k, batch_size=batch_size
    )
    effects = {}
    for kind, result in inputs.bases.items():
        names = list(result.bases)
        late = list(logit_sites) if logit_sites is not None else names[-max(1, len(names) // 3) :]
        if readout is not None:
            effects[kind] = feature_logit_effects(
                model, result, decode, late, n_features, readout=readout
            )
    source = inputs.bases.get("pca") or next(iter(inputs.bases.values()))
    diagnostic = dominant_directions(
        source, model, tokens, decode, threshold=threshold, batch_size=batch_size
    )
    return replace(inputs, examples=examples, logit_effects=effects, diagnostic=diagnostic)
