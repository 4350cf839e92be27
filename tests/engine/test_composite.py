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


def _inject(model, toks, site, direction, read):
    """`read` (a hook name, or the logits) with `direction` added to `site`'s activation at
    every position, minus the same without (the composite's parts written as the engine's
    injection hooks write them: later parts overwrite what the earlier ones changed)."""
    from tl_degeneracy.engine.capture import capture_sites, injection_hooks
    from tl_degeneracy.engine.compat import run_with_hooks

    clean_act = capture_sites(model, toks, [site])[0]
    out = {}

    def keep(act, hook=None):
        out["act"] = act.detach().clone()

    def run(values):
        hooks = injection_hooks(model, site, values) if values is not None else []
        logits = run_with_hooks(model, toks, [*hooks, *([(read, keep)] if read else [])])
        return out["act"] if read else logits

    with torch.no_grad():
        return run(clean_act + direction) - run(None)


def test_stream_directions_are_what_a_feature_writes(api, tiny, tokens_for):
    """A composite feature's direction added to the site moves the next residual site by
    `stream_directions` (attention heads: through W_O; MLP neurons: through W_out) and, in a
    model without normalisation whose MLP is last, the logits by `direct_logit_effects`."""
    from tl_degeneracy.engine.composite import stream_directions
    from tl_degeneracy.engine.logit_effects import direct_logit_effects

    model = tiny(api, "mlp")
    toks = tokens_for(model, 6)
    sites = (
        Site("blocks.0.attn.hook_z"),
        Site("blocks.0.hook_resid_mid"),
        Site("blocks.0.mlp.hook_post"),
        Site("logits"),
    )
    result = fit_basis(model, toks, LIBConfig(sites, kind="lib", progress=False))
    for site, read in ((sites[0], "blocks.0.hook_resid_mid"), (sites[2], None)):
        basis = result[site.name]
        writes = stream_directions(model, basis, [0, 1, 2])
        effects = direct_logit_effects(model, basis, [0, 1, 2])
        for j in range(3):
            moved = _inject(model, toks, site, 0.5 * basis.C_pinv[j], read)
            expected = 0.5 * (writes[j] if read else effects[j])
            torch.testing.assert_close(moved, expected.expand_as(moved), rtol=1e-9, atol=1e-12)
    plain = result["blocks.0.hook_resid_mid"]
    torch.testing.assert_close(stream_directions(model, plain), plain.C_pinv.double())
