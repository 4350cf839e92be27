"""Composite sites read back part by part (engine.composite)."""

from __future__ import annotations

import torch

from tl_degeneracy.engine.composite import part_shares, part_widths
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.sites import Site

SITES = (Site("blocks.0.hook_resid_mid"), Site("blocks.0.mlp.hook_post"), Site("logits"))


def test_part_shares_of_an_mlp_site(api, tiny, tokens_for):
    model = tiny(api, "ln")
    toks = tokens_for(model, 20)
    for kind in ("lib", "neuron"):
        result = fit_basis(model, toks, LIBConfig(SITES, kind=kind, progress=False))
        basis = result["blocks.0.mlp.hook_post"]
        widths = part_widths(model, basis)
        assert list(widths.values()) == [model.cfg.d_mlp, model.cfg.d_model]
        shares = part_shares(model, basis)
        torch.testing.assert_close(shares.sum(1), torch.ones(basis.k, dtype=torch.float64))
        rows = basis.C_pinv
        mlp = rows[:, : model.cfg.d_mlp].square().sum(1) / rows.square().sum(1)
        torch.testing.assert_close(shares[:, 0], mlp)
        if kind == "neuron":  # each feature is one coordinate: all of it in one part
            assert set(shares.flatten().tolist()) <= {0.0, 1.0}
    plain = fit_basis(model, toks, LIBConfig(SITES[:1] + SITES[2:], progress=False))
    assert part_shares(model, plain["blocks.0.hook_resid_mid"]).shape[1] == 1
