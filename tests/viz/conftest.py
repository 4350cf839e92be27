"""Fixtures for the visualisation tests: a demo page with hostile strings, and headless Chromium
(skipped with a reason when it is not installed; `scripts/install_browser.sh` installs it)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_degeneracy.viz import (
    Fragment,
    HtmlPage,
    feature_activations_view,
    figure_to_html,
    graph_widget_html,
    logit_effects_view,
    plot_spectra,
    synthetic_graph,
    topk_examples,
    topk_examples_view,
)
from tl_degeneracy.viz.screenshot import BrowserRun, dump_dom, find_chromium

HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_SCRIPT = "</script><script>alert(2)</script>"

# Runs in the test page only: records alert() calls and, once the graph is drawn, hovers and
# clicks the node with the hostile label and copies the tooltip and side-panel text.
PROBE = Fragment(
    """<div id="tld-probe"></div>
<script>
window.alert = window.confirm = window.prompt = function () {
  document.documentElement.setAttribute("data-alert", "1");
};
window.addEventListener("load", function () {
  setTimeout(function () {
    var probe = document.getElementById("tld-probe");
    var node = document.querySelector('.tld-node[data-id="hostile"]');
    if (!node) { probe.setAttribute("data-error", "no hostile node"); return; }
    node.dispatchEvent(new MouseEvent("mouseenter", {clientX: 20, clientY: 20}));
    probe.setAttribute("data-tooltip", document.querySelector(".tld-tooltip").textContent);
    node.dispatchEvent(new MouseEvent("click", {bubbles: true}));
    probe.setAttribute("data-panel", document.querySelector(".tld-panel").textContent);
  }, 0);
});
</script>"""
)


def demo_graph() -> dict:
    """The synthetic graph with hostile strings in a label, a site name and an example."""
    graph = synthetic_graph(n_features=8)
    feat = graph["layers"][1]["features"][0]
    old_id = feat["id"]
    feat.update(
        id="hostile",
        label=HOSTILE,
        examples=[HOSTILE_SCRIPT, {"tokens": [HOSTILE], "values": [1.0]}],
    )
    for e in graph["edges"]:
        e["source"] = "hostile" if e["source"] == old_id else e["source"]
        e["target"] = "hostile" if e["target"] == old_id else e["target"]
    graph["layers"][2]["site"] = '"><svg onload=alert(3)>'
    return graph


DEMO_TOKENS = ["The", " cat", " sat", HOSTILE, " on", " the", " mat", "."]


def build_demo_page(path: Path, probe: bool = True) -> Path:
    """A page with every kind of view: graph, coloured tokens, top-k examples, logit table,
    a plot. Used by the browser tests and for docs screenshots."""
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(len(DEMO_TOKENS), 3))
    feats = torch.from_numpy(rng.gamma(1.0, size=(6, 10, 4))).float()
    strs = [[f" w{s}{p}" for p in range(10)] for s in range(6)]
    strs[2][4] = HOSTILE
    page = HtmlPage("tl_degeneracy demo", "Synthetic data; every view renders offline.")
    if probe:
        page.add("", PROBE)
    page.add("Interaction graph", graph_widget_html(demo_graph(), features=8, selected="0:0"))
    page.add(
        "Feature activations",
        feature_activations_view(DEMO_TOKENS, acts, ["f0", "f1", HOSTILE_SCRIPT]),
    )
    page.add("Top-k examples", topk_examples_view(topk_examples(feats, strs, k=3), site="L1"))
    page.add(
        "Logit effects",
        logit_effects_view(
            {"f0": [(" cat", 1.5), (HOSTILE, 0.7)], "f1": [(" dog", 0.9)]},
            {"f0": [(" the", -0.4)], "f1": [("\n", -1.1)]},
        ),
    )
    spectra = {"LIB": np.exp(-np.arange(40) / 4), "PCA": np.exp(-np.arange(40) / 8)}
    page.add("Spectra", figure_to_html(plot_spectra(spectra, "Λ and variance"), alt="spectra"))
    return page.save(path)


class Element:
    def __init__(self, tag: str, attrs: dict[str, str | None]):
        self.tag, self.attrs, self.text = tag, attrs, ""

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


class DomIndex(HTMLParser):
    """Every element of a dumped DOM with its attributes and its full text content."""

    VOID = {
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
    }

    def __init__(self, html_text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(html_text)

    def handle_starttag(self, tag, attrs):
        el = Element(tag, dict(attrs))
        self.elements.append(el)
        if tag not in self.VOID:
            self._open.append(el)

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i].tag == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        if self._open and self._open[-1].tag in ("script", "style"):
            return
        for el in self._open:
            el.text += data

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Element]:
        return [
            e
            for e in self.elements
            if (tag is None or e.tag == tag)
            and (cls is None or cls in e.classes)
            and all(e.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


@pytest.fixture(scope="session")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("chromium not installed: run scripts/install_browser.sh")
    return path


@pytest.fixture(scope="session")
def demo_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_page(tmp_path_factory.mktemp("viz") / "demo.html")


@pytest.fixture(scope="session")
def rendered_demo(chromium: str, demo_page: Path) -> tuple[BrowserRun, DomIndex]:
    """The demo page loaded once in headless Chromium, offline."""
    run = dump_dom(demo_page, budget_ms=3000)
    return run, DomIndex(run.dom)


@pytest.fixture(scope="session")
def parse_dom():
    """`parse_dom(html_text)` -> a `DomIndex` of its elements."""
    return DomIndex


@pytest.fixture(scope="session")
def hostile() -> str:
    return HOSTILE


# ---------------------------------------------------------------------------------------------
# A small real study for the report: a random 2-block model over a word vocabulary
# ---------------------------------------------------------------------------------------------

REPORT_ABLATION_SITES = ("blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre")
REPORT_ATTRIBUTION_SITES = ("blocks.1.hook_resid_pre[1:]", "blocks.1.hook_resid_mid[1:]")


def build_small_study(out: Path):
    """Fit LIB and PCA with the language-model job on a random 2-block model (width 16) whose
    tokens are words, compare attribution with patching on IOI pairs, add the model's views,
    and write everything the `report` command reads into `out`. Returns (inputs, tokenizer)."""
    from support import available_apis, ioi_word_tokenizer, tiny_model

    from tl_degeneracy.engine.attribution import compare_attribution
    from tl_degeneracy.experiments.ioi import ioi_prompt_pairs
    from tl_degeneracy.experiments.lm_study import LMFitConfig, fit_lm
    from tl_degeneracy.experiments.report_views import add_model_views
    from tl_degeneracy.experiments.study_output import report_inputs, write_study

    tok = ioi_word_tokenizer(64, (" " + HOSTILE,))
    model = tiny_model(
        available_apis()[0], "ln", seed=5, n_layers=2, d_model=16, n_heads=4, d_head=4,
        d_mlp=32, n_ctx=16, d_vocab=len(tok.vocab),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, len(tok.vocab), (48, 16), generator=gen)
    heldout = torch.randint(1, len(tok.vocab), (24, 16), generator=gen)
    tokens[:, 0] = heldout[:, 0] = tok.bos_token_id
    config = LMFitConfig(
        seq_len=16,
        n_sources=2,
        batch_rows=8,
        edge_tokens=64,
        edge_outputs=12,
        ablation_tokens=128,
        ablation_sites=REPORT_ABLATION_SITES,
        ablation_ks=(0, 1, 2, 4, 8, 12, 16),
        progress=False,
    )
    fit = fit_lm(model, tokens, config, None, heldout, log=lambda s: None)
    fit.timings["total_s"] = sum(fit.timings.values())
    pairs = ioi_prompt_pairs(tok, 8)
    attribution = {}
    for kind, result in fit.bases.items():
        comp = compare_attribution(
            model,
            result,
            list(REPORT_ATTRIBUTION_SITES),
            pairs.clean_tokens,
            pairs.corrupted_tokens,
            pairs.logit_difference,
            metric_name="logit(IO) - logit(S) at the last position",
        )
        comp.metadata["example"] = (pairs.prompts[0], pairs.corrupted_prompts[0])
        attribution[kind] = comp
    inputs = report_inputs(fit, attribution=attribution)
    inputs = add_model_views(inputs, model, heldout, tok.decode, n_features=12, k=3)
    write_study(fit, out, inputs=inputs)
    return inputs, tok


@pytest.fixture(scope="session")
def small_study(tmp_path_factory: pytest.TempPathFactory):
    """(folder of the saved study, the inputs it was saved from, the tokenizer)."""
    out = tmp_path_factory.mktemp("study")
    inputs, tok = build_small_study(out)
    return out, inputs, tok
