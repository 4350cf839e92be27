"""Fixtures for every test: the available TransformerLens APIs, small random models, and the
reference data in ../shared (tests that need it skip cleanly without it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import APIS, REFERENCE, random_tokens, tiny_model


@pytest.fixture(params=APIS)
def api(request) -> str:
    return request.param


@pytest.fixture
def reference_dir() -> Path:
    if not (REFERENCE / "seed0" / "lib_reference.safetensors").exists():
        pytest.skip(f"reference data not found at {REFERENCE} (../shared is only in CI)")
    return REFERENCE


@pytest.fixture
def tiny():
    """Factory fixture: `tiny(api, kind, seed, **overrides)` builds a small float64 model."""
    return tiny_model


@pytest.fixture
def tokens_for():
    """Factory fixture: `tokens_for(model, n, seed)` draws random token batches."""
    return random_tokens


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: on a busy machine, idle OpenMP
    workers spinning around millisecond ops cost several times the CPU time (7x measured on
    tests/engine/test_architectures.py). Use with `pytestmark = usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def drawn_figures(monkeypatch):
    """The matplotlib figures the package embeds in HTML during the test, in order (to read
    their axes, labels and lines)."""
    import tl_degeneracy.viz.plots as plots

    seen: list = []
    original = plots.figure_to_html

    def keep(fig, *args, **kwargs):
        seen.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(plots, "figure_to_html", keep)
    return seen
