"""The language-model job on small random models: the block-local fast path (activation
store) equals the core accumulators, artifacts are written, and stale checkpoints are refused."""

from __future__ import annotations

import json

import pytest
import torch
from support import random_tokens, tiny_model

from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.engine.edges import EdgeConfig, section_edges
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.jacobians import JacobianConfig
from tl_degeneracy.engine.sections import Section, run_section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.experiments.lm_study import (
    LMFitConfig,
    block_local_output,
    block_local_supported,
    fit_lm,
    lm_sites,
    top_outputs,
    write_lm_fit,
)

CFG = LMFitConfig(
    n_sources=3,
    batch_rows=4,
    edge_tokens=16,
    edge_outputs=5,
    ablation_tokens=24,
    ablation_sites=("blocks.1.hook_resid_mid",),
    ablation_ks=(0, 2, 8),
    seed=7,
    progress=False,
    checkpoint_every=1,
)


API = available_apis()[0]
NEEDS_HOOKED = pytest.mark.skipif(
    API != "hooked", reason="block-local sections need HookedTransformer"
)


def _model():
    return tiny_model(API, "ln", seed=2, n_layers=2, n_ctx=6)


def test_lm_sites():
    names = [s.name for s in lm_sites(30)]
    assert len(names) == 61 and names[0] == "blocks.0.hook_resid_pre"
    assert names[-2:] == ["blocks.29.hook_resid_mid", "blocks.29.hook_resid_post"]
    assert [s.name for s in lm_sites(30, 1)] == [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_mid",
        "blocks.0.hook_resid_post",
    ]


@pytest.mark.parametrize(
    "inp,out",
    [
        ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid"),
        ("blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"),
        ("blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre"),
    ],
)
@NEEDS_HOOKED
def test_block_local_section_equals_model_section(inp, out):
    model = _model()
    toks = random_tokens(model, 3)
    section = Section(Site(inp), Site(out))
    assert block_local_supported(model, section)
    with torch.no_grad():
        (x,) = [run_section(model, toks, Section(section.inp, section.inp), lambda a: a)]
        x = x + 0.1 * torch.randn_like(x)  # off the data: the section is a function of x alone
        want = run_section(model, toks, section, lambda a, x=x: x)
        got = block_local_output(model, section, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_not_supported_across_blocks_or_positions():
    model = _model()
    assert not block_local_supported(
        model, Section(Site("blocks.0.hook_resid_pre"), Site("blocks.1.hook_resid_pre"))
    )
    assert not block_local_supported(
        model, Section(Site("blocks.0.hook_resid_pre"), Site("blocks.0.hook_resid_mid", "last"))
    )


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    model = _model()
    tokens = random_tokens(model, 18, seed=3)
    heldout = random_tokens(model, 6, seed=9)
    fast = fit_lm(model, tokens, CFG, None, heldout, log=lambda s: None)
    slow = fit_lm(
        model,
        tokens,
        LMFitConfig(**{**CFG.__dict__, "cache_activations": False}),
        None,
        heldout,
        log=lambda s: None,
    )
    return model, tokens, fast, slow


def test_store_path_equals_core_path(fits):
    model, tokens, fast, slow = fits
    assert fast.used_store == (API == "hooked") and not slow.used_store
    for kind in ("lib", "pca"):
        for name, b in fast.bases[kind].bases.items():
            other = slow.bases[kind].bases[name]
            torch.testing.assert_close(b.importance, other.importance, rtol=1e-9, atol=1e-12)
            # columns are defined up to sign
            signs = torch.sign((b.C * other.C).sum(0))
            torch.testing.assert_close(b.C, other.C * signs, rtol=1e-7, atol=1e-9)
        for name, se in fast.edges[kind].items():
            torch.testing.assert_close(
                se.edges, slow.edges[kind][name].edges, rtol=1e-8, atol=1e-12
            )


def test_lib_equals_fit_basis(fits):
    model, tokens, fast, _ = fits
    sites = tuple(lm_sites(model.cfg.n_layers))
    ref = fit_basis(
        model,
        tokens,
        LIBConfig(
            sites,
            kind="lib",
            final_basis="pca",
            truncation=CFG.truncation,
            jacobian=JacobianConfig(method="stochastic", n_sources=3, seed=7),
            batch_size=CFG.batch_rows,
            progress=False,
        ),
    )
    for name, b in ref.bases.items():
        torch.testing.assert_close(
            fast.bases["lib"].bases[name].importance, b.importance, rtol=1e-9, atol=1e-12
        )


def test_edges_equal_core_section_edges(fits):
    model, tokens, fast, _ = fits
    lib = fast.bases["lib"]
    a, b = "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid"
    ref = section_edges(
        model,
        tokens[:3],
        lib[a],
        top_outputs(lib[b], 5),
        EdgeConfig(method="stochastic", n_sources=1, seed=7),
        batch_size=4,
        progress=False,
    )
    got = fast.edges["lib"][f"{a}->{b}"]
    assert got.count == ref.count == 3 * 6
    torch.testing.assert_close(got.edges, ref.edges, rtol=1e-9, atol=1e-12)


def test_artifacts_and_report(fits, tmp_path):
    from tl_degeneracy.engine.basis_result import BasisResult

    _, _, fast, _ = fits
    out = write_lm_fit(fast, tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["ablation"]["blocks.1.hook_resid_mid"]) == {"lib", "pca"}
    assert len(summary["edges"]) == 4  # sections of two blocks
    html = (out / "report.html").read_text()
    assert "<img" in html and "Node ablation" in html
    loaded = BasisResult.load(out / "lib")
    assert loaded.kind == "lib" and len(loaded.bases) == 5


def test_resume_and_stale_checkpoint(tmp_path):
    model = _model()
    tokens = random_tokens(model, 12, seed=3)
    cfg = LMFitConfig(**{**CFG.__dict__, "edge_tokens": 0, "ablation_tokens": 0})
    first = fit_lm(model, tokens, cfg, tmp_path, log=lambda s: None)
    again = fit_lm(model, tokens, cfg, tmp_path, log=lambda s: None)  # all passes resumed
    for name, b in first.bases["lib"].bases.items():
        torch.testing.assert_close(again.bases["lib"].bases[name].C, b.C, rtol=0, atol=0)
    # statistics resumed, store gone (cleared after success): inputs are recomputed
    for f in (tmp_path / "checkpoints").glob("jacobian.*"):
        f.unlink()
    assert not (tmp_path / "activations" / "rank0").exists()
    healed = fit_lm(model, tokens, cfg, tmp_path, log=lambda s: None)
    for name, b in first.bases["lib"].bases.items():
        torch.testing.assert_close(healed.bases["lib"].bases[name].C, b.C, rtol=0, atol=0)
    other = LMFitConfig(**{**cfg.__dict__, "n_sources": 5})
    with pytest.raises(RuntimeError, match="different job"):
        fit_lm(model, tokens, other, tmp_path, log=lambda s: None)


@pytest.mark.slow
@NEEDS_HOOKED
def test_block_local_sections_on_smollm2():
    """On the real model (rotary, grouped-query attention, RMSNorm, gated SiLU MLP)."""
    from test_smollm2 import require_smollm2

    from tl_degeneracy.models import load_smollm2

    require_smollm2()
    model = load_smollm2(api="hooked")
    toks = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    for inp, out in [
        ("blocks.7.hook_resid_pre", "blocks.7.hook_resid_mid"),
        ("blocks.7.hook_resid_mid", "blocks.8.hook_resid_pre"),
        ("blocks.29.hook_resid_mid", "blocks.29.hook_resid_post"),
    ]:
        section = Section(Site(inp), Site(out))
        assert block_local_supported(model, section)
        with torch.no_grad():
            x = run_section(model, toks, Section(section.inp, section.inp), lambda a: a)
            x = x * 1.01
            want = run_section(model, toks, section, lambda a, x=x: x)
            got = block_local_output(model, section, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@NEEDS_HOOKED  # bench_memory.py holds the model as a HookedTransformer
def test_gram_peak_memory_does_not_grow_with_tokens():
    """Peak RSS of streaming Gram statistics at all 61 SmolLM2 sites, 10x the tokens."""
    import subprocess
    import sys
    from pathlib import Path

    from test_smollm2 import require_smollm2

    require_smollm2()
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_memory.py"
    run = subprocess.run(
        [sys.executable, str(script), "--tokens", "2048", "20480", "--threads", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    ratio = float(run.stdout.split("streaming peak ratio ")[1].split(",")[0])
    assert ratio < 1.10, run.stdout


def test_skip_first_position(tmp_path):
    model = _model()
    tokens = random_tokens(model, 12, seed=3)
    cfg = LMFitConfig(**{**CFG.__dict__, "skip_first_position": True})
    held = random_tokens(model, 6, seed=9)
    fit = fit_lm(model, tokens, cfg, tmp_path / "work", held, log=lambda s: None)  # checkpoints
    assert not fit.used_store
    sites = [b.site for b in fit.bases["lib"].bases.values()]
    assert all(s.positions == (1, 2, 3, 4, 5) for s in sites)
    assert list(fit.curves) == ["blocks.1.hook_resid_mid[1,2,3,4,5]"]
    write_lm_fit(fit, tmp_path / "out")  # the report's section labels drop the position list


def test_checkpoint_keys_fit_in_a_file_name():
    from tl_degeneracy.experiments.lm_study import _key

    long = "jacobian." + "->".join(
        f"blocks.1.hook_resid_mid[{','.join(map(str, range(1, 128)))}]" for _ in "ab"
    )
    assert len(_key(long)) < 120 and _key(long) != _key(long + "x")
    assert _key("jacobian.a->b") == "jacobian.a->b"
