"""The study report: one self-contained offline page that reads top to bottom.

A view: it takes the engine's result objects, gathered in `StudyReportInputs`, and renders them
(the same sections in Jupyter, through `_repr_html_`, and as a saved page). It assumes no
particular model: sites, tokens and labels all come from the inputs. Sections, in order:

1. Summary: run size and time, features needed per ablated site (LIB vs PCA), edge sparsity,
   the dominant-direction check, the attribution check, each with what it means.
2. The interaction-graph widget across all fitted sites (one per basis kind with edges).
3. Features of a few sites: top-activating contexts (circuitsvis) and the tokens late features
   promote and suppress.
4. Node ablation curves; attribution vs patching on indirect-object pairs; edge sparsity per
   section; dominant directions; spectra.
5. Settings and timings.

`report_artifacts.load_study_artifacts(out_dir)` rebuilds the inputs from a saved study
(`tl-degeneracy report OUT_DIR`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tl_degeneracy.viz import report_summary as rs
from tl_degeneracy.viz.feature_views import logit_effects_view, topk_examples_view
from tl_degeneracy.viz.graph_data import (
    GRAPH_FEATURES,
    GRAPH_MAX_FEATURES,
    GRAPH_SHARE,
    result_graph_data,
    token_labels,
)
from tl_degeneracy.viz.graph_widget import graph_widget_html, short_site_label
from tl_degeneracy.viz.html import Fragment, HtmlPage, HtmlReprMixin, PageSection, table, text

if TYPE_CHECKING:
    from tl_degeneracy.engine.ablation import AblationCurve
    from tl_degeneracy.engine.attribution import AttributionComparison
    from tl_degeneracy.engine.basis_result import BasisResult
    from tl_degeneracy.engine.diagnostics import SinkDiagnostic
    from tl_degeneracy.engine.edges import SectionEdges
    from tl_degeneracy.viz.feature_views import LogitEffects, TopkExamples

__all__ = ["StudyReportInputs", "report_body", "report_sections", "study_report"]


@dataclass
class StudyReportInputs(HtmlReprMixin):
    """Everything the report shows. Only `bases` is required; a part without data is left out.

    Dicts are keyed by basis kind ("lib", "pca", ...) and then by site or section name, as the
    engine names them; feature `i` is column `i` of the site's basis (examples and logit effects
    hold some features, each found by its `row_of(i)`).
    """

    bases: dict[str, BasisResult]
    edges: dict[str, dict[str, SectionEdges]] = field(default_factory=dict)
    """{kind: {section name: edges}} between consecutive sites; an `InteractionGraph` per kind
    is accepted too (its sections are taken, and its modules when `modules` has none)."""
    curves: dict[str, dict[str, AblationCurve]] = field(default_factory=dict)
    """{site: {kind: node-ablation curve}}."""
    attribution: dict[str, AttributionComparison] = field(default_factory=dict)
    """{kind: attribution vs patching on indirect-object prompt pairs}."""
    examples: dict[str, dict[str, TopkExamples]] = field(default_factory=dict)
    """{kind: {site: top-activating contexts of the site's most important features}} (each
    feature's row found by `TopkExamples.row_of`)."""
    logit_effects: dict[str, dict[str, LogitEffects]] = field(default_factory=dict)
    """{kind: {site: tokens each feature promotes and suppresses}} (late sites; rows found by
    `LogitEffects.row_of`)."""
    diagnostic: SinkDiagnostic | None = None
    modules: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """{kind: {site: module label per feature}} (colours the graph)."""
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase; `total_s` is the wall time of the whole run."""
    title: str = ""
    feature_sites: list[str] | None = None
    """Sites whose features are shown in detail (default: up to three spread over the run)."""
    tolerance: float = 0.05
    """Tolerance on the ablation metric for "features needed" (nats for a loss)."""
    tolerances: tuple[float, ...] = (0.01, 0.05, 0.1)
    metric: str = "held-out loss (nats)"
    graph_features: int = GRAPH_FEATURES
    """Features per site the graph opens with."""
    graph_max_features: int = GRAPH_MAX_FEATURES
    """Features per site the page holds (the reader can show up to this many)."""
    graph_share: float = GRAPH_SHARE
    """Share of each feature's input its drawn edges carry when the graph opens."""

    def __post_init__(self) -> None:
        for kind, value in list(self.edges.items()):
            sections = getattr(value, "sections", None)  # an InteractionGraph
            if sections is not None:
                self.edges[kind] = dict(sections)
                modules = getattr(value, "modules", None)
                if modules and kind not in self.modules:
                    self.modules[kind] = dict(modules)

    def _html_title(self) -> str:
        if self.title:
            return self.title
        first = next(iter(self.bases.values()))
        name = first.metadata.get("model", {}).get("model_name") or "a model"
        return f"{' and '.join(k.upper() for k in rs.ordered_kinds(self.bases))} on {name}"

    def _html_sections(self) -> list[PageSection]:
        return report_sections(self)


def study_report(inputs: StudyReportInputs, body: list[PageSection] | None = None) -> HtmlPage:
    """The report as a page: `study_report(inputs).save(out / "report.html")`; `body` as in
    `report_sections`."""
    return HtmlPage(inputs._html_title()).extend(report_sections(inputs, body))


def _part(name: str, *content: Fragment | str) -> list[Fragment | str]:
    """Content marked with its part name (screenshots and tests find sections by it)."""
    return [f'<div class="tld-part" data-part="{name}">', *content, "</div>"]


def report_sections(
    inputs: StudyReportInputs, body: list[PageSection] | None = None
) -> list[PageSection]:
    """The summary, the body (`report_body`: the graphs, features, plots and tables, which take
    nearly all of the rendering time) and the settings and timings. A `body` built already
    lets a caller count its time in `inputs.timings` before the summary and the timings are
    written (`experiments.study_output.write_study`)."""
    body = report_body(inputs) if body is None else body
    return [_summary(inputs), *body, _settings(inputs)]


def report_body(inputs: StudyReportInputs) -> list[PageSection]:
    """The sections between the summary and the settings, those without data left out."""
    sections = [*_graphs(inputs), _features(inputs), _ablation(inputs), _attribution(inputs)]
    sections += [_edges(inputs), _diagnostic(inputs), _spectra(inputs)]
    return [s for s in sections if s is not None]


def _summary(inputs: StudyReportInputs) -> PageSection:
    first = next(iter(inputs.bases.values()))
    bases = list(first.bases.values())
    kinds = rs.ordered_kinds(inputs.edges)
    lead_edges = next((inputs.edges[k] for k in kinds if inputs.edges[k]), {})
    paragraphs = [
        rs.run_sentence(
            first.metadata.get("model", {}),
            rs.ordered_kinds(inputs.bases),
            len(bases),
            bases[0].d if bases else 0,
            first.metadata.get("n_tokens"),
            lead_edges,
            inputs.timings.get("total_s"),
        ),
        *rs.ablation_sentences(inputs.curves, inputs.tolerance, inputs.metric),
        *rs.edge_sentences(inputs.edges),
        rs.diagnostic_sentence(inputs.diagnostic),
        rs.attribution_sentence(inputs.attribution),
    ]
    body = [text(p, "p", "tld-summary-text") for p in paragraphs if p]
    rows = []
    for site, by_kind in rs.features_needed(inputs.curves, inputs.tolerance).items():
        row: dict[str, Any] = {"ablated site": site}
        for kind in rs.ordered_kinds(by_kind):
            k = by_kind[kind]
            row[f"{kind.upper()} features needed"] = "–" if k is None else k
        rows.append(row)
    if rows:
        body.append(table(rows))
    return PageSection("Summary", _part("summary", *body))


def _graphs(inputs: StudyReportInputs) -> list[PageSection]:
    out = []
    for kind in rs.ordered_kinds(inputs.edges):
        if not inputs.edges[kind] or kind not in inputs.bases:
            continue
        result = inputs.bases[kind]
        effects = inputs.logit_effects.get(kind, {})
        final = list(result.bases)[-1]
        labels = {final: token_labels(effects[final])} if final in effects else None
        data = result_graph_data(
            result,
            inputs.edges[kind],
            max_features=inputs.graph_max_features,
            modules=inputs.modules.get(kind),
            examples=inputs.examples.get(kind),
            logit_effects=effects,
            labels=labels,
        )
        widget = graph_widget_html(data, features=inputs.graph_features, share=inputs.graph_share)
        desc = (
            f"The top {kind.upper()} features of every site (columns, in forward order), and for "
            "each feature the strongest inputs that together carry the chosen share of its input "
            "from the site before. Edge width is proportional to the edge's weight within its "
            "section. Click a feature for its top-activating examples, the tokens it promotes "
            "and suppresses (late sites) and its inputs; change the number of features, the "
            "share and the blocks shown above the graph; scroll sideways for later sites."
        )
        if labels:
            desc += " The last site's features are labelled by the tokens they promote most."
        out.append(PageSection(f"Interaction graph ({kind.upper()})", _part("graph", widget), desc))
    return out


def _feature_sites(inputs: StudyReportInputs) -> list[str]:
    if inputs.feature_sites is not None:
        return list(inputs.feature_sites)
    kind = next((k for k in rs.ordered_kinds(inputs.examples) if inputs.examples[k]), None)
    if kind is None:
        return []
    have = list(inputs.examples[kind])
    picks = sorted({0, len(have) // 2, len(have) - 1}) if len(have) > 3 else range(len(have))
    return [have[i] for i in picks]


def _same_basis_groups(inputs: StudyReportInputs, site: str) -> list[list[str]]:
    """Kinds grouped by their basis at `site` (the final site is often one PCA basis for all)."""
    groups: list[list[str]] = []
    for kind in rs.ordered_kinds(inputs.bases):
        b = inputs.bases[kind].bases.get(site)
        if b is None:
            continue
        for g in groups:
            other = inputs.bases[g[0]].bases[site]
            if other.C.shape == b.C.shape and torch.equal(other.C, b.C):
                g.append(kind)
                break
        else:
            groups.append([kind])
    return groups


def _importance_order(inputs: StudyReportInputs, kind: str, site: str) -> list[int] | None:
    """The site's features from the most to the least important (`SiteBasis.importance_order`),
    or None without its basis."""
    b = inputs.bases.get(kind)
    basis = b.bases.get(site) if b is not None else None
    return None if basis is None else basis.importance_order().tolist()


def _shown_rows(
    views: TopkExamples | LogitEffects, order: list[int] | None, n_show: int
) -> tuple[list[int], list[int]]:
    """The features (and their rows in `views`) a feature table shows: the `n_show` most
    important of those `views` holds (in `order`; in row order without one)."""
    held = set(views.feature_ids)
    feats = order if order is not None else list(views.feature_ids)
    feats = [f for f in feats if f in held][: max(0, n_show)]
    rows = [views.row_of(f) for f in feats]
    return feats, [r for r in rows if r is not None]


def _features(inputs: StudyReportInputs, n_show: int = 8) -> PageSection | None:
    body: list[Fragment | str] = []
    for site in _feature_sites(inputs):
        for kinds in _same_basis_groups(inputs, site):
            kind = kinds[0]
            ex = inputs.examples.get(kind, {}).get(site)
            le = inputs.logit_effects.get(kind, {}).get(site)
            if ex is None and le is None:
                continue
            same = " (the same basis)" if len(kinds) > 1 else ""
            title = f"{' and '.join(k.upper() for k in kinds)} features at {site}{same}"
            body.append(text(title, "h3"))
            order = _importance_order(inputs, kind, site)
            if ex is not None:
                feats, rows = _shown_rows(ex, order, n_show)
                names = [f"{kind.upper()} {f}" for f in feats]
                body.append(topk_examples_view(ex.subset(rows), names, site=site))
            if le is not None:
                feats, rows = _shown_rows(le, order, n_show)
                body.append(
                    logit_effects_view(
                        [le.promoted[r][:8] for r in rows],
                        [le.suppressed[r][:8] for r in rows],
                        [f"{kind.upper()} {f}" for f in feats],
                    )
                )
    if not body:
        return None
    desc = (
        "For the most important features of a few sites: their top-activating contexts in the "
        "held-out text (pick a feature; tokens are coloured by its activation, one example per "
        "sequence) and, for late sites, the tokens whose logits the feature's direction raises "
        "and lowers through the unembedding (the final norm's scale left out)."
    )
    return PageSection("Features", _part("features", *body), desc)


def _ablation(inputs: StudyReportInputs) -> PageSection | None:
    if not inputs.curves:
        return None
    from tl_degeneracy.viz.plots import figure_to_html, plot_ablation_curves

    curves = {
        s: {k.upper(): dict(c.scores) for k, c in bk.items()} for s, bk in inputs.curves.items()
    }
    base = {s: next(iter(bk.values())).baseline for s, bk in inputs.curves.items()}
    fig = plot_ablation_curves(curves, inputs.metric, base, log_x=False)
    rows = []
    for site, by_kind in inputs.curves.items():
        for kind in rs.ordered_kinds(by_kind):
            c = by_kind[kind]
            row: dict[str, Any] = {"site": site, "basis": kind.upper(), "unablated": c.baseline}
            for t in inputs.tolerances:
                k = c.min_k(t)
                row[f"features for ±{t:g}"] = "–" if k is None else k
            rows.append(row)
    desc = (
        "Only the top k features of one site (plus the site's mean) are kept, the rest set to "
        "their mean, and the model runs on. A basis that needs fewer features for the same "
        "metric has put what matters first. '–': no evaluated k is within the tolerance, or "
        "a NaN score leaves it undecided."
    )
    return PageSection(
        "Node ablation",
        _part("ablation", figure_to_html(fig, "node ablation curves"), table(rows)),
        desc,
    )


def _attribution(inputs: StudyReportInputs) -> PageSection | None:
    if not inputs.attribution:
        return None
    rows = []
    meta: dict[str, Any] = {}
    for kind in rs.ordered_kinds(inputs.attribution):
        comp = inputs.attribution[kind]
        meta = comp.metadata
        for name, sa in comp.sites.items():
            rho = sa.correlations()
            rows.append(
                {
                    "basis": kind.upper(),
                    "site": name,
                    "features": sa.k,
                    "ρ attribution ~ patching": rho["attribution~patching"],
                    "ρ |attribution| ~ importance": rho["|attribution|~importance"],
                    "ρ |patching| ~ importance": rho["|patching|~importance"],
                    "site attribution": sa.site_attribution,
                    "Σ feature attributions": sa.feature_sum,
                    "site patching": sa.site_patching,
                }
            )
    first = inputs.attribution[rs.ordered_kinds(inputs.attribution)[0]]
    intro = (
        f"{rs.metric_intro(meta.get('metric'))}: clean {first.clean_metric:.4g}, corrupted "
        f"{first.corrupted_metric:.4g}, mean over {meta.get('n_pairs', '?')} prompt pairs."
    )
    example = meta.get("example")
    parts: list[Fragment | str] = [text(intro, "p")]
    if isinstance(example, (list, tuple)) and len(example) == 2:
        parts.append(text(f"Example pair: “{example[0]}” / “{example[1]}”.", "p"))
    parts += ['<div class="tld-attribution tld-scroll">', table(rows), "</div>"]
    desc = (
        "Attribution patching scores each feature by a first-order estimate of what patching "
        "it from the corrupted to the clean prompt does to the metric; patching does it. "
        "Spearman ρ near 1: the cheap estimate ranks features as patching does; the sum of "
        "feature attributions falls short of the site's by what the basis truncates."
    )
    return PageSection(
        "Attribution vs patching on indirect-object pairs", _part("attribution", *parts), desc
    )


def _edges(inputs: StudyReportInputs) -> PageSection | None:
    needed = rs.edges_needed(inputs.edges)
    if not needed:
        return None
    from tl_degeneracy.viz.plots import figure_to_html, plot_edges_required

    data = {
        short_site_label(s.split("->")[0]) + " →": {k.upper(): v for k, v in by.items()}
        for s, by in needed.items()
    }  # LIB and PCA in their colours and legend names
    fig = plot_edges_required(data, "edges for 99% of the weight", "Edges per section", True)
    fig.set_size_inches(max(8.0, 0.3 * len(data) * max(1, len(inputs.edges))), 4.0)
    rows = [{"section": s, **{k.upper(): v for k, v in by.items()}} for s, by in needed.items()]
    details = Fragment("<details><summary>per section</summary>") + table(rows)
    return PageSection(
        "Edge sparsity",
        _part("edges", figure_to_html(fig, "edges for 99% of the weight"), details, "</details>"),
        "Fewest edges that carry 99% of a section's edge weight, one point per section and "
        "basis (log scale; lower is sparser).",
    )


def _diagnostic(inputs: StudyReportInputs) -> PageSection | None:
    diag = inputs.diagnostic
    if diag is None:
        return None
    rows = [
        {
            "site": d.site,
            "share of variance": f"{d.share:.1%}",
            "next direction": f"{d.next_share:.2%}",
            "largest projections": ", ".join(f"{h.token!r} @{h.position}" for h in d.hits[:5])
            or "–",
            "why": d.explanation(),
        }
        for d in diag.directions
    ]
    body: list[Fragment | str] = [text(rs.diagnostic_sentence(diag), "p")]
    if rows:
        body.append(table(rows))
    share_rows = [
        {"site": s, "top direction's share": f"{v:.1%}"}
        for s, v in sorted(diag.shares.items(), key=lambda kv: -kv[1])[:5]
    ]
    body.append(text("The five largest shares:", "p"))
    body.append(table(share_rows))
    return PageSection(
        "Dominant directions",
        _part("diagnostic", *body),
        "A site where one direction carries most of the variance (often one token with a "
        "massive activation, an attention sink) has spectra and edges dominated by it.",
    )


def _spectra(inputs: StudyReportInputs) -> PageSection | None:
    from tl_degeneracy.viz.plots import figure_to_html, plot_spectra

    names = list(next(iter(inputs.bases.values())).bases)
    if len(names) < 2:
        return None
    show = [names[i] for i in sorted({1, len(names) // 2, len(names) - 2}) if i < len(names)]
    figs = []
    for name in show:
        spectra = {
            k.upper(): r.bases[name].importance.numpy()
            for k, r in inputs.bases.items()
            if name in r.bases
        }
        fig = plot_spectra(spectra, name, normalise=True)
        fig.set_size_inches(4.6, 3.4)
        figs.append(figure_to_html(fig, name))
    return PageSection(
        "Spectra",
        _part("spectra", '<div style="display:flex;flex-wrap:wrap">', *figs, "</div>"),
        "Importances (Λ for LIB, variance for PCA) of a few sites, each normalised to sum 1.",
    )


def _settings(inputs: StudyReportInputs) -> PageSection:
    first = next(iter(inputs.bases.values()))
    model = first.metadata.get("model", {})
    versions = first.metadata.get("versions", {})
    run = rs.setting_rows({"model": model, "versions": versions})
    parts: list[Fragment | str] = []
    if inputs.settings:
        parts += [text("Settings", "h3"), table(rs.setting_rows(inputs.settings))]
    if inputs.timings:
        parts += [text("Timings", "h3"), table(rs.timing_rows(inputs.timings))]
    parts += [text("Model and versions", "h3"), table(run)]
    return PageSection("Settings and timings", _part("settings", *parts))
