"""Offline visualisation: self-contained HTML pages, circuitsvis feature views, the interaction
graph widget (d3) and matplotlib plots. Nothing here loads from the network."""

from tl_degeneracy.viz.feature_views import (
    LogitEffects,
    TopkExamples,
    feature_activations_view,
    logit_effects_view,
    top_logit_effects,
    topk_examples,
    topk_examples_view,
)
from tl_degeneracy.viz.graph_widget import graph_widget_html, prepare_graph, synthetic_graph
from tl_degeneracy.viz.html import (
    Asset,
    Fragment,
    HtmlPage,
    HtmlReprMixin,
    PageSection,
    json_for_script,
    render_fragment,
    render_page,
    table,
    text,
)
from tl_degeneracy.viz.plots import (
    figure_to_html,
    plot_ablation_curves,
    plot_edges_required,
    plot_llc_traces,
    plot_scatter,
    plot_spectra,
    save_figure,
)
from tl_degeneracy.viz.report import StudyReportInputs, study_report

__all__ = [
    "LogitEffects",
    "StudyReportInputs",
    "study_report",
    "Asset",
    "Fragment",
    "HtmlPage",
    "HtmlReprMixin",
    "PageSection",
    "TopkExamples",
    "feature_activations_view",
    "figure_to_html",
    "graph_widget_html",
    "json_for_script",
    "logit_effects_view",
    "plot_ablation_curves",
    "plot_edges_required",
    "plot_llc_traces",
    "plot_scatter",
    "plot_spectra",
    "prepare_graph",
    "render_fragment",
    "render_page",
    "save_figure",
    "synthetic_graph",
    "table",
    "text",
    "top_logit_effects",
    "topk_examples",
    "topk_examples_view",
]
