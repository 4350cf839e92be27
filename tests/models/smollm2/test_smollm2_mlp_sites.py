"""LIB at SmolLM2's MLP sites (1,536 hidden neurons + the 576-wide stream that bypasses them)
next to its residual sites: the method's identities, the rank bound, node ablation at both MLP
sites, and the features read back part by part (slow: the real model)."""

from __future__ import annotations

import pytest
import torch
from support import require_smollm2

from tl_degeneracy.engine.ablation import next_token_loss
from tl_degeneracy.engine.composite import part_shares
from tl_degeneracy.engine.sites import residual_sites
from tl_degeneracy.experiments.study import StudyConfig, run_study

pytestmark = pytest.mark.slow
BLOCKS = (5, 20)


def test_mlp_sites_on_smollm2():
    require_smollm2()
    from tl_degeneracy.models import load_corpus, load_smollm2

    torch.set_num_threads(1)
    model = load_smollm2()
    tokens = load_corpus(model.tokenizer, 64, "train", max_tokens=512)
    heldout = load_corpus(model.tokenizer, 64, "heldout")[:2]
    sites = residual_sites(model, n_blocks=21, positions="1:", mlp=BLOCKS)
    mlp_sites = [s for s in sites if s.is_composite]
    assert [s.hook for s in mlp_sites] == [f"blocks.{b}.mlp.hook_post" for b in BLOCKS]
    config = StudyConfig(
        edge_tokens=0,
        ablation_tokens=128,
        ablation_sites=tuple(s.hook for s in mlp_sites),
        ablation_ks=(0, 64, 4096),
        progress=False,
    )
    study = run_study(model, sites, tokens, config, heldout=heldout, log=lambda s: None)
    baseline = None
    for site in mlp_sites:
        lib = study.bases["lib"][site.name]
        d_mlp, d_model = model.cfg.d_mlp, model.cfg.d_model
        assert lib.d == d_mlp + d_model
        # M' of the section out of the site has the rank of the next residual stream at most
        assert 0 < lib.k <= d_model
        torch.testing.assert_close(lib.C_pinv @ lib.C, torch.eye(lib.k, dtype=torch.float64))
        shares = part_shares(model, lib)
        torch.testing.assert_close(shares.sum(1), torch.ones(lib.k, dtype=torch.float64))
        for kind in ("lib", "pca"):
            curve = study.curves[site.name][kind]
            baseline = curve.baseline if baseline is None else baseline
            assert curve.baseline == pytest.approx(baseline)
            full = max(curve.scores)
            assert curve.scores[0] > curve.baseline + 1.0  # the site matters
            # every kept feature recovers most of it (the rest is the directions 504 training
            # samples do not span, which held-out text uses)
            lost = curve.scores[full] - curve.baseline
            assert -1e-6 < lost < 0.5 * (curve.scores[0] - curve.baseline)
    assert baseline is not None and baseline == pytest.approx(
        float(next_token_loss(model(heldout), heldout).mean()), rel=1e-6
    )
