"""matplotlib plots write PNGs and embed in pages."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from tl_degeneracy.viz import (
    figure_to_html,
    plot_ablation_curves,
    plot_edges_required,
    plot_scatter,
    plot_spectra,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plots(tmp_path):
    yield (
        "spectra",
        lambda p: plot_spectra(
            {
                "LIB": np.exp(-np.arange(50) / 5.0),
                "PCA": np.r_[np.linspace(3, 0.1, 20), 0.0, -1e-9],
            },
            "site 3",
            path=p,
        ),
    )
    curves = {
        f"blocks.{i}.hook_resid_pre": {
            "LIB": {k: 3.0 + 2.0 / k for k in (1, 2, 4, 8, 16)},
            "PCA": {k: 3.0 + 4.0 / k for k in (1, 2, 4, 8, 16)},
        }
        for i in range(4)
    }
    yield "ablation", lambda p: plot_ablation_curves(curves, baseline=3.0, log_x=True, path=p)
    yield (
        "edges",
        lambda p: plot_edges_required(
            {"0→1": {"LIB": 40, "PCA": 95}, "1→2": {"LIB": 31, "PCA": 120}}, path=p
        ),
    )
    yield (
        "scatter",
        lambda p: plot_scatter(
            np.arange(1, 11),
            np.arange(1, 11) ** 1.5,
            [f"<f{i}>" for i in range(10)],
            log=True,
            diagonal=True,
            path=p,
        ),
    )


def test_plots_write_pngs(tmp_path):
    for name, make in _plots(tmp_path):
        path = tmp_path / "png" / f"{name}.png"
        fig = make(path)
        assert isinstance(fig, Figure)
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name


def test_figure_to_html_embeds_png():
    fig = plot_scatter([1, 2, 3], [3, 1, 2])
    frag = figure_to_html(fig, alt='"><script>alert(1)</script>')
    assert "<script" not in frag.html
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', frag.html)
    assert m and base64.b64decode(m.group(1)).startswith(PNG_MAGIC)


def test_scatter_checks_lengths():
    with pytest.raises(ValueError):
        plot_scatter([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        plot_scatter([1, 2], [1, 2], labels=["a"])


@pytest.fixture
def ipython_shell(tmp_path, monkeypatch):
    """The IPython shell a notebook kernel runs (a plain one: no pyplot, no inline backend),
    without history or a profile in the home folder; removed afterwards."""
    interactiveshell = pytest.importorskip("IPython.core.interactiveshell")
    from traitlets.config import Config

    shell_class = interactiveshell.InteractiveShell
    if shell_class.initialized():
        pytest.skip("another IPython shell is running")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    config = Config()
    config.HistoryManager.enabled = False
    yield shell_class.instance(config=config)
    shell_class.clear_instance()


def test_figures_display_as_png_in_ipython(tmp_path, ipython_shell):
    """What a notebook cell shows for every plot: an `image/png` beside the text, without the
    user importing pyplot or running `%matplotlib inline`."""
    for name, make in _plots(tmp_path):
        data, _ = ipython_shell.display_formatter.format(make(None))
        assert sorted(data) == ["image/png", "text/plain"], name
        png = data["image/png"]
        png = png if isinstance(png, bytes) else base64.b64decode(png)
        assert png.startswith(PNG_MAGIC) and len(png) > 5_000, name


def test_edges_required_bars_start_at_zero_and_log_axes_get_points():
    """A bar's length is its count: bars stand on a linear axis from 0; on a log axis (whose
    bottom depends on the data) the counts are points."""
    data = {"0→1": {"LIB": 165, "PCA": 190}, "1→2": {"LIB": 170, "PCA": 205}}
    (ax,) = plot_edges_required(data).axes
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0 and len(ax.patches) == 4
    (ax,) = plot_edges_required(data, log_y=True).axes
    assert ax.get_yscale() == "log" and not ax.patches
    assert {line.get_label(): list(line.get_ydata()) for line in ax.lines} == {
        "LIB": [165.0, 170.0],
        "PCA": [190.0, 205.0],
    }
