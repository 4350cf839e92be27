"""LIB on every architecture shape, on every API: tiny random float64 checkpoints written by
`transformers` and loaded offline (`models.tiny`).

At the residual-stream sites (`hook_resid_pre/mid/post` where the block has them) and the
logits: `Cᵀ G C = diag(Λ)` with G from the captured activations, `C⁺ C = I`, every section's
`M'` equal to a brute-force `torch.autograd.functional.jacobian` through plain hooks, the fitted
basis whitening that brute-force `M'`, and the logits unchanged when every site is rotated
into its basis and back or the bases are attached.
"""

from __future__ import annotations

import functools

import pytest
import torch
from support import APIS

from tl_degeneracy import (
    JacobianConfig,
    LIBConfig,
    Section,
    Site,
    SiteError,
    Truncation,
    attach,
    fit_basis,
    jacobian_gram,
    validate_sites,
)
from tl_degeneracy.engine.attach import feature_hook_name
from tl_degeneracy.engine.compat import hook_names, replace_hooks
from tl_degeneracy.engine.statistics import capture_sites
from tl_degeneracy.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ("gpt2", "neox", "llama", "gemma", "attn_only", "processed")
CASES = [(arch, api) for arch in ARCHS for api in APIS]
N_ROWS, N_POS = 4, 8
CUT = Truncation(relative=1e-10)
"""Directions with Λ below 1e-10 of the top one are rounding noise (e.g. the all-ones direction
that LayerNorm ignores, at Λ ~ 1e-16); whitening would amplify it."""


def residual_sites(model) -> list[Site]:
    """Every residual-stream cut the model has, in forward order, then the last logits."""
    names = set(hook_names(model))
    sites = [
        Site(f"blocks.{layer}.hook_resid_{part}")
        for layer in range(model.cfg.n_layers)
        for part in ("pre", "mid", "post")
        if f"blocks.{layer}.hook_resid_{part}" in names
    ]
    return [*sites, Site("logits", "last")]


@functools.cache
def fitted(arch: str, api: str):
    """The tiny model, its tokens, sites and exact-Jacobian LIB fit (built once per case)."""
    torch.manual_seed(0)
    model = tiny_model(arch, api, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (N_ROWS, N_POS), generator=gen)
    sites = residual_sites(model)
    config = LIBConfig(
        tuple(sites),
        kind="lib",
        jacobian=JacobianConfig(method="exact"),
        truncation=CUT,
        progress=False,
    )
    return model, tokens, sites, fit_basis(model, tokens, config)


def brute_force_m_prime(model, tokens, section: Section, out_basis):
    """`M'` from the full Jacobian of each row (input positions matched, output positions and
    units summed, normalised by the number of input positions)."""
    total, count = 0, 0
    for row in range(tokens.shape[0]):
        jac = row_jacobian(model, tokens[row : row + 1], section, out_basis)
        total = total + torch.einsum("tksi,tksj->ij", jac, jac)
        count += jac.shape[2]
    return total / count


def row_jacobian(model, tok, section: Section, out_basis):
    """`∂ out[t, k] / ∂ in[s, i]` for one row: write the input site with the model's own hook
    (`compat.replace_hooks`, which also carries a Bridge `hook_resid_mid` write into the
    residual), read the output site with a plain hook, differentiate with
    `torch.autograd.functional.jacobian`."""
    seen = {}

    def read(act, hook=None, key="x"):
        seen[key] = act

    with torch.no_grad():
        model.run_with_hooks(tok, fwd_hooks=[(section.inp.hook, read)])
    x0 = seen["x"].detach().clone()

    def forward(x):
        hooks = replace_hooks(model, section.inp.hook, lambda act: x)
        if not section.out.is_logits:
            hooks.append((section.out.hook, functools.partial(read, key="y")))
        with model.hooks(fwd_hooks=hooks):
            logits = model(tok)
        y = logits[:, -1:] if section.out.is_logits else seen["y"]
        return y if out_basis is None else y @ out_basis

    jac = torch.autograd.functional.jacobian(forward, x0, vectorize=True)
    return jac[0, :, :, 0]  # [out pos, out unit, in pos, in unit]


@pytest.mark.parametrize("arch,api", CASES)
def test_lib_identities_and_m_prime_against_brute_force(arch, api):
    model, tokens, sites, result = fitted(arch, api)
    acts = capture_sites(model, tokens, sites[:-1])
    for site, nxt, act in zip(sites, sites[1:], acts):
        b = result[site]
        x = act.reshape(-1, act.shape[-1]).to(torch.float64)
        gram = (x - x.mean(0)).T @ (x - x.mean(0)) / x.shape[0]
        lam, eye = b.importance, torch.eye(b.k, dtype=torch.float64)
        torch.testing.assert_close(
            b.C.T @ gram @ b.C, torch.diag(lam), rtol=1e-10, atol=1e-10 * float(lam[0])
        )
        torch.testing.assert_close(b.C_pinv @ b.C, eye, rtol=0, atol=1e-10)
        out_basis = None if nxt.is_logits else result[nxt].C
        section = Section(site, nxt)
        engine = jacobian_gram(
            model, tokens, section, out_basis, JacobianConfig(method="exact"), progress=False
        ).matrix
        brute = brute_force_m_prime(model, tokens, section, out_basis)
        error = float(torch.linalg.norm(engine - brute) / torch.linalg.norm(brute))
        assert error < 1e-10, f"{section.name}: M' off by {error:.1e}"
        # the fitted basis whitens the brute-force M' (on the kept block)
        torch.testing.assert_close(b.C_pinv @ brute @ b.C_pinv.T, eye, rtol=0, atol=1e-8)


@pytest.mark.parametrize("arch,api", CASES)
def test_logits_unchanged_through_the_basis_and_when_attached(arch, api):
    model, tokens, sites, result = fitted(arch, api)
    hooks = []
    for site in sites[:-1]:
        b = result[site]
        hooks += replace_hooks(model, site.hook, lambda a, b=b: b.reconstruct(b.features(a)))
    with torch.no_grad():
        base = model(tokens)
        rotated = model.run_with_hooks(tokens, fwd_hooks=hooks)
        with attach(model, result):
            attached, cache = model.run_with_cache(tokens)
    scale = float(base.abs().max())
    assert float((rotated - base).abs().max()) <= 1e-10 * scale
    assert float((attached - base).abs().max()) <= 1e-12 * scale
    first = result[sites[0]]
    torch.testing.assert_close(
        cache[feature_hook_name(first)], first.features(capture_sites(model, tokens, sites[:1])[0])
    )


@pytest.mark.parametrize("arch", ["neox", "attn_only"])
@pytest.mark.parametrize("api", APIS)
def test_blocks_without_resid_mid_say_why(arch, api):
    model = fitted(arch, api)[0]
    reason = "parallel" if arch == "neox" else "attention-only"
    with pytest.raises(SiteError, match=reason) as error:
        validate_sites(model, [Site("blocks.1.hook_resid_mid"), Site("logits")])
    assert "blocks.1.hook_resid_post" in str(error.value)


@pytest.mark.skipif(len(APIS) < 2, reason="HookedTransformer needs TransformerLens < 4")
@pytest.mark.parametrize("arch", ARCHS)
def test_both_apis_find_the_same_features(arch):
    """The same checkpoint on both APIs: the same Λ at every site."""
    hooked, bridge = (fitted(arch, api) for api in ("hooked", "bridge"))
    for site in hooked[2][:-1]:
        lam = hooked[3][site].importance
        # RMSNorm models run in float32 inside the Bridge (as in transformers)
        torch.testing.assert_close(
            bridge[3][site].importance, lam, rtol=1e-6, atol=1e-9 * float(lam[0])
        )
