"""LIB on every architecture shape, on every API: tiny random float64 checkpoints written by
`transformers` and loaded offline (`models.tiny`).

At the residual-stream sites (`hook_resid_pre/mid/post` where the block has them) and the
logits: `Cᵀ G C = diag(Λ)` with G from the captured activations, `C⁺ C = I`, every section's
`M'` equal to a brute-force `torch.autograd.functional.jacobian` through plain hooks, the fitted
basis whitening that brute-force `M'`, and the logits unchanged when every site is rotated
into its basis and back or the bases are attached.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from support import APIS, Float64Throughout

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
from tl_degeneracy.models.tiny import TINY_BRIDGE_ONLY, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ("gpt2", "neox", "llama", "gemma", "attn_only", "processed")
BRIDGE_ONLY = tuple(TINY_BRIDGE_ONLY)
CASES = [(arch, api) for arch in ARCHS for api in APIS] + [(a, "bridge") for a in BRIDGE_ONLY]
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


def exactly(arch: str):
    """Float64 throughout for a Bridge-only model: `transformers`' own modules round RMSNorm
    and the softmax to float32, so a 1e-15 change of a float64 input moves their output by
    float32 rounding (measured: 7.5e-8 of the largest logit on Gemma 2)."""
    return Float64Throughout() if arch in BRIDGE_ONLY else contextlib.nullcontext()


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
    with torch.no_grad(), exactly(arch):
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


# ---------------------------------------------------------------------------------------------
# Architectures only the Bridge loads: run through their hooks, checked against `transformers`
# ---------------------------------------------------------------------------------------------


@functools.cache
def bridge_only_pair(arch: str):
    """The tiny Bridge-only model and the same checkpoint loaded by `transformers` alone."""
    import tempfile

    from tl_degeneracy.models.local import load_hf

    with tempfile.TemporaryDirectory() as folder:
        model = tiny_model(arch, "bridge", dtype=torch.float64, folder=folder)
        hf, _ = load_hf(folder, dtype=torch.float64)
    return model, hf


def hf_jacobian(hf, tok, layer_in: int, layer_out: int | None):
    """`∂ out[t, k] / ∂ in[s, i]` computed by `transformers` alone: `in` is the hidden state
    entering decoder layer `layer_in` (rewritten by a forward pre-hook), `out` the one entering
    `layer_out` (read by another), or the last position's logits for None."""
    layers = getattr(hf.base_model, "layers", None) or hf.base_model.h
    seen = {}

    def read(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = layers[layer_in].register_forward_pre_hook(read, with_kwargs=True)
    with torch.no_grad():
        hf(tok)
    handle.remove()
    x0 = seen.pop("x").detach().clone()

    def forward(x):
        def write(module, args, kwargs):
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": x}
            return (x, *args[1:]), kwargs

        handles = [layers[layer_in].register_forward_pre_hook(write, with_kwargs=True)]
        if layer_out is not None:
            handles.append(layers[layer_out].register_forward_pre_hook(read, with_kwargs=True))
        try:
            logits = hf(tok).logits
        finally:
            for h in handles:
                h.remove()
        return logits[:, -1:] if layer_out is None else seen["x"]

    return torch.autograd.functional.jacobian(forward, x0, vectorize=True)[0, :, :, 0]


@pytest.mark.parametrize("arch", BRIDGE_ONLY)
def test_bridge_only_sections_equal_transformers_own_jacobians(arch):
    """Independent of TransformerLens's hooks: `M'` of resid_pre 0 → resid_pre 1 and of
    resid_pre 1 → the logits equals the one `transformers` gives by rewriting its decoder
    layers' inputs; and the Jacobian through `hook_resid_mid` (into it, then out of it, with
    the writes `compat.replace_hooks` makes) composes to `transformers`' whole-block Jacobian,
    so `hook_resid_mid` is a cut of these blocks. Float64 throughout (`exactly`)."""
    with Float64Throughout():
        _sections_equal_transformers(arch)


def _sections_equal_transformers(arch: str):
    model, hf = bridge_only_pair(arch)
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(5))
    pre0, pre1 = Site("blocks.0.hook_resid_pre"), Site("blocks.1.hook_resid_pre")
    for section, (a, b) in (
        (Section(pre0, pre1), (0, 1)),
        (Section(pre1, Site("logits", "last")), (1, None)),
    ):
        engine = jacobian_gram(
            model, tokens, section, None, JacobianConfig(method="exact"), progress=False
        ).matrix
        total = 0
        for row in range(tokens.shape[0]):
            jac = hf_jacobian(hf, tokens[row : row + 1], a, b)
            total = total + torch.einsum("tksi,tksj->ij", jac, jac) / jac.shape[2]
        brute = total / tokens.shape[0]
        error = float(torch.linalg.norm(engine - brute) / torch.linalg.norm(brute))
        assert error < 1e-10, f"{section.name}: M' off by {error:.1e}"
    mid = Site("blocks.0.hook_resid_mid")
    if mid.hook not in hook_names(model):
        assert model.cfg.parallel_attn_mlp  # GPT-J: attention and MLP side by side
        return
    tok = tokens[:1]
    into = row_jacobian(model, tok, Section(pre0, mid), None)
    out_of = row_jacobian(model, tok, Section(mid, pre1), None)
    composed = torch.einsum("ultk,tksi->ulsi", out_of, into)
    whole = hf_jacobian(hf, tok, 0, 1)
    error = float(torch.linalg.norm(composed - whole) / torch.linalg.norm(whole))
    assert error < 1e-12, error


@pytest.mark.parametrize("arch", BRIDGE_ONLY)
def test_bridge_only_composite_sites_run_through_hooks(arch):
    """An MLP site and a heads site of a Bridge-only model: no closed form is used (their
    blocks may normalise what the MLP and heads write), `M'` into and out of them equals a
    brute-force Jacobian through plain hooks, part shares read back, and what needs the
    weights in HookedTransformer form says so (float64 throughout: `exactly`)."""
    with Float64Throughout():
        _composite_sites(arch)


def _composite_sites(arch: str):
    from tl_degeneracy.engine.compat import WeightsUnavailableError, has_hooked_weights
    from tl_degeneracy.engine.composite import part_shares, stream_directions
    from tl_degeneracy.engine.identity import model_identity, weight_digest
    from tl_degeneracy.engine.logit_effects import direct_logit_effects
    from tl_degeneracy.engine.structures import structure_of

    model, _ = bridge_only_pair(arch)
    assert not has_hooked_weights(model)
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(6))
    names = set(hook_names(model))
    stream0 = "blocks.0.hook_resid_mid" if "blocks.0.hook_resid_mid" in names else None
    sites = [Site("blocks.0.attn.hook_z"), Site("blocks.0.mlp.hook_post")]
    if stream0 is None:  # parallel: both composites pair with resid_pre; take the MLP one
        sites = sites[1:]
    sites += [Site("blocks.1.hook_resid_pre"), Site("logits", "last")]
    config = LIBConfig(
        tuple(sites), jacobian=JacobianConfig(method="exact"), truncation=CUT, progress=False
    )
    result = fit_basis(model, tokens, config)
    for a, b in zip(sites, sites[1:]):
        section = Section(a, b)
        assert not structure_of(model, section).closed_form, section.name
        engine = jacobian_gram(
            model, tokens, section, None, JacobianConfig(method="exact"), progress=False
        ).matrix
        brute = composite_brute_force(model, tokens, section)
        error = float(torch.linalg.norm(engine - brute) / torch.linalg.norm(brute))
        assert error < 1e-10, f"{section.name}: M' off by {error:.1e}"
    mlp = result["blocks.0.mlp.hook_post"]
    torch.testing.assert_close(
        part_shares(model, mlp).sum(1), torch.ones(mlp.k, dtype=torch.float64)
    )
    with pytest.raises(WeightsUnavailableError, match="docs/models.md"):
        stream_directions(model, mlp, [0])
    with pytest.raises(WeightsUnavailableError, match="unembed="):
        direct_logit_effects(model, result["blocks.1.hook_resid_pre"], [0])
    assert len(weight_digest(model)) > 8 and model_identity(model)  # read from its own weights


def composite_brute_force(model, tokens, section: Section):
    """`M'` with every part of the input site rewritten through `compat.replace_hooks` and
    every part of the output site read by plain hooks (`sites.site_parts` gives the parts)."""
    from tl_degeneracy.engine.sites import site_parts

    def parts(site):
        if site.is_logits:
            return []
        widths = {}
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[:1])
        for h in site_parts(model, site):
            widths[h] = cache[h].flatten(2).shape[-1]
        return list(widths.items())

    p_in, p_out = parts(section.inp), parts(section.out)
    total, count, store = 0, 0, {}
    for row in range(tokens.shape[0]):
        tok = tokens[row : row + 1]
        with torch.no_grad():
            _, cache = model.run_with_cache(tok)
        x0 = torch.cat([cache[h].flatten(2) for h, _ in p_in], -1)

        def f(x, tok=tok):
            hooks, at = [], 0
            for h, width in p_in:
                part = x[..., at : at + width]
                hooks += replace_hooks(model, h, lambda act, p=part: p.reshape(act.shape))
                at += width
            for h, _ in p_out:
                hooks.append((h, lambda act, hook=None, h=h: store.__setitem__(h, act)))
            with model.hooks(fwd_hooks=hooks):
                logits = model(tok)
            if not p_out:
                return logits[:, -1:]
            return torch.cat([store[h].flatten(2) for h, _ in p_out], -1)

        jac = torch.autograd.functional.jacobian(f, x0)[0, :, :, 0]
        total = total + torch.einsum("tksi,tksj->ij", jac, jac)
        count += jac.shape[2]
    return total / count


def test_a_listed_hook_that_never_runs_is_named(tmp_path):
    """TransformerLens's Bridge adapter for OpenAI GPT (LayerNorm after the residual add)
    lists `hook_resid_post` but runs nothing through it: a fit there says so, naming the
    hook, instead of failing on a missing activation."""
    import transformers

    from tl_degeneracy.models.local import load_local
    from tl_degeneracy.models.tiny import randomize, tiny_tokenizer

    config = transformers.OpenAIGPTConfig(vocab_size=50, n_embd=16, n_layer=2, n_head=4)
    config.n_positions, config.architectures = 16, ["OpenAIGPTLMHeadModel"]
    with torch.random.fork_rng():
        hf = transformers.OpenAIGPTLMHeadModel(config)
    randomize(hf, 0).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model = load_local(tmp_path, dtype=torch.float64)
    assert "blocks.1.hook_resid_post" in hook_names(model)
    tokens = torch.randint(3, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    sites = (Site("blocks.1.hook_resid_pre"), Site("blocks.1.hook_resid_post"), Site("logits"))
    with pytest.raises(SiteError, match="blocks.1.hook_resid_post.*does not run it"):
        fit_basis(model, tokens, LIBConfig(sites, progress=False))
    fit_basis(model, tokens, LIBConfig((sites[0], sites[2]), progress=False))  # hooks that run
