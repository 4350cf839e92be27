"""Real result pages in headless Chromium, offline: the docs screenshots and the degeneracy
report.

The screenshots in docs/img (`widget_graph.png`, `report_attribution.png`,
`report_basis.png`) are taken here from pages saved by the package's own result objects on the
modular-addition model (LIB fitted after attention and after the MLP): each page is rendered
offline, checked (nothing requested from the network, the content in the DOM, the image not
blank) and copied into docs/img, so the docs always show what the code renders.
"""

from __future__ import annotations

import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_degeneracy.viz import HtmlPage
from tl_degeneracy.viz.html import Fragment
from tl_degeneracy.viz.screenshot import REPORT_PARTS, dump_dom, report_screenshots, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.once]

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"


def _modadd_checkpoint() -> Path | None:
    """The package's own checkpoint, else the reference seed 0; None without either."""
    from tl_degeneracy.models.modadd import default_checkpoint_dir, list_reference_checkpoints

    own = default_checkpoint_dir()
    if (own / "model.safetensors").is_file():
        return own
    refs = list_reference_checkpoints()
    return refs[0] if refs else None


@pytest.fixture(scope="module")
def modadd_pages(tmp_path_factory) -> dict[str, Path]:
    """Saved pages of a LIB fit, its interaction graph and an attribution comparison."""
    path = _modadd_checkpoint()
    if path is None:
        pytest.skip("no modular-addition checkpoint (packaged or ../shared reference)")
    from tl_degeneracy.engine.attribution import compare_attribution
    from tl_degeneracy.engine.edges import interaction_graph
    from tl_degeneracy.engine.fit import LIBConfig, fit_basis
    from tl_degeneracy.engine.modularity import find_modules
    from tl_degeneracy.engine.sites import Site
    from tl_degeneracy.models.modadd import all_inputs, load_checkpoint

    model, data = load_checkpoint(path, dtype=torch.float64)
    p = data.p
    train, _ = data.train()
    sites = (
        Site("blocks.0.hook_resid_mid", "last"),
        Site("blocks.0.hook_resid_post", "last"),
        Site("logits", "last"),
    )
    lib = fit_basis(model, train, LIBConfig(sites, batch_size=4096, progress=False))
    graph = interaction_graph(model, train[:512], lib, batch_size=512, progress=False)
    edges = {(e.section.inp.name, e.section.out.name): e.edges for e in graph.sections.values()}
    graph.modules = find_modules(edges, top_k={name: 12 for name in lib.bases}).by_site()
    gen = torch.Generator().manual_seed(0)
    clean = all_inputs(p)[torch.randperm(p * p, generator=gen)[:48]]
    corrupted = clean.clone()
    corrupted[:, 0] = (clean[:, 0] + torch.randint(1, p, (48,), generator=gen)) % p
    right, wrong = (clean[:, 0] + clean[:, 1]) % p, (corrupted[:, 0] + corrupted[:, 1]) % p

    def logit_difference(logits, tokens):
        last = logits[:, -1].to(torch.float64)
        return last.gather(1, right[:, None])[:, 0] - last.gather(1, wrong[:, None])[:, 0]

    comparison = compare_attribution(
        model, lib, ["blocks.0.hook_resid_mid[-1]"], clean, corrupted, logit_difference
    )
    folder = tmp_path_factory.mktemp("pages")
    return {
        "graph": graph.save_html(folder / "graph.html", title="Interaction graph (LIB)"),
        "basis": lib.save_html(folder / "basis.html", title="LIB fit, modular addition"),
        "attribution": comparison.save_html(folder / "attribution.html"),
    }


def _pixels(png: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(png))


def _check_png(png: Path, size: tuple[int, int], min_colours: int = 9) -> None:
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == size
    rgb = _pixels(png)[..., :3]
    # not a blank page: a good share of pixels differ from the background, in several colours
    background = np.median(rgb.reshape(-1, 3), axis=0)
    drawn = np.abs(rgb - background).sum(-1) > 0.1
    assert drawn.mean() > 0.01
    assert len(np.unique((rgb[drawn] * 8).astype(int), axis=0)) >= min_colours


@pytest.mark.parametrize(
    "page, png, size, needles",
    [
        ("graph", "widget_graph.png", (1100, 700), ['class="tld-node', "blocks.0.hook_resid_mid"]),
        ("attribution", "report_attribution.png", (1200, 900), ["Summary", "rho"]),
        ("basis", "report_basis.png", (1200, 800), ["blocks.0.hook_resid_post"]),
    ],
)
def test_docs_screenshots(chromium, modadd_pages, parse_dom, tmp_path, page, png, size, needles):
    html_path = modadd_pages[page]
    run = dump_dom(html_path, budget_ms=3000)
    assert run.remote_page_requests == []
    for needle in needles:
        assert needle in run.dom
    for graph in parse_dom(run.dom).find("div", "tld-graph"):
        assert graph.attrs.get("data-rendered") == "true"
    shot = screenshot(html_path, tmp_path / png, width=size[0], height=size[1], budget_ms=3000)
    _check_png(shot, size)
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, DOCS_IMG / png)


def test_graph_page_draws_every_node(chromium, modadd_pages, parse_dom):
    dom = parse_dom(dump_dom(modadd_pages["graph"], budget_ms=3000).dom)
    graph = dom.find("div", "tld-graph")[0]
    assert graph.attrs.get("data-rendered") == "true"
    assert len(dom.find("g", "tld-node")) == int(graph.attrs["data-nodes"]) == 3 * 12


def test_degeneracy_report_offline(chromium, tiny, tokens_for, tmp_path, parse_dom, hostile):
    """The degeneracy report's page opens offline, shows its table, and escapes names."""
    from tl_degeneracy.engine.degeneracy import SourcesConfig, degeneracy_report

    model = tiny("hooked" if "hooked" in _apis() else "bridge", "mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = degeneracy_report(
            model, tokens_for(model, 48), SourcesConfig(batch_size=48), llc="none"
        )
    report.model["model_name"] = hostile
    path = tmp_path / "degeneracy.html"
    if hasattr(report, "save_html"):
        report.save_html(path)
    else:  # a report without its own page: its notebook view in a page
        HtmlPage("Degeneracy report").add("Report", Fragment(report._repr_html_())).save(path)
    run = dump_dom(path, budget_ms=2000)
    assert run.remote_page_requests == []
    dom = parse_dom(run.dom)
    text = dom.find("body")[0].text
    assert "blocks.0.mlp" in text and "total" in text and "bound N − free" in text
    assert f"{report.total.upper_bound:,}" in text
    assert hostile in text  # as text, not as an element
    assert not [i for i in dom.find("img") if i.attrs.get("src") == "x"]
    assert "data-alert" not in dom.find("html")[0].attrs


def test_report_screenshots(chromium, small_study, tmp_path):
    """The study report's parts as PNGs (`report_screenshots`). With `TLD_REPORT_PAGE` set to a
    report page (the demo's `out/demo/lm/report.html`), they are taken from that page and
    written to docs/img/report_*.png; otherwise from the small test study, into a temporary
    folder."""
    page_env = os.environ.get("TLD_REPORT_PAGE")
    if page_env:
        page, out = Path(page_env), DOCS_IMG
    else:
        from tl_degeneracy import cli

        page, out = tmp_path / "report.html", tmp_path / "img"
        assert cli.main(["report", str(small_study[0]), "--page", str(page)]) == 0
    shots = report_screenshots(page, out)
    assert set(shots) == set(REPORT_PARTS)
    for part, png in shots.items():
        assert png == out / REPORT_PARTS[part][0]
        text_only = part in ("summary", "attribution")  # black text and grey rules
        _check_png(png, (1400, REPORT_PARTS[part][1]), 3 if text_only else 9)


def _apis() -> list[str]:
    from support import APIS

    return APIS
