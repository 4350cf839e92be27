"""Nodes of a prompt graph and their attributions to the target (gradient × activation).

At a site with activation `f_s` at position `s`, basis `f̂ = (f − μ) C`, `f = μ + f̂ C⁺ + r`
(`r` the part in truncated directions) and the target's gradient `g_s` (through every later
path: the site is a cut), feature `j` at `s` is attributed `a_{s,j} = (g_s C⁺ᵀ)_j f̂_{s,j}` and
the site's *rest node* at `s` (the mean and the truncated directions) `g_s · (μ + r_s)`. They add
up to `g_s · f_s`, the gradient × activation of the whole site. Token embeddings are nodes too
(`g · e_s`, the position embedding included where the model has one).

With a baseline prompt every value is taken relative to the baseline's (`f̂ − f̂'`, and the
rest node holds only the truncated part of `f − f'`): the attribution-patching form.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import frozen_parameters, hook_names, run_with_hooks
from tl_degeneracy.engine.prompt_graph.site_io import _read_site, _write_site
from tl_degeneracy.engine.prompt_graph.target import Target
from tl_degeneracy.engine.sites import (
    Positions,
    Site,
    SiteError,
    SiteLike,
    as_site,
    site_parts,
    validate_sites,
)
from tl_degeneracy.engine.tokens import validate_tokens

EMBEDDING_HOOKS = ("hook_embed", "hook_pos_embed")
"""Where the token (and, where the model has one, position) embeddings are read."""

FINAL_SCALE_HOOK = "ln_final.hook_scale"


@dataclass(frozen=True)
class ChainSite:
    """One site of the graph: where it is read (`site`, with the graph's positions) and the
    basis of its features."""

    site: Site
    basis: SiteBasis

    @property
    def name(self) -> str:
        return self.site.hook


def site_chain(
    model: nn.Module,
    basis: BasisResult | Mapping[str, SiteBasis],
    sites: Sequence[SiteLike] | None = None,
    positions: Positions = "all",
) -> list[ChainSite]:
    """The graph's sites in forward order: every residual-stream site of `basis` (MLP and
    attention sites, composites with the stream, are left out; so are the logits), or those
    named in `sites` (basis key, hook name, short form like `("resid_post", 0)` or `Site`),
    each read at `positions` of the prompt."""
    if not isinstance(positions, str) and len(positions) == 0:
        raise ValueError(
            "positions is empty: a graph needs at least one position with nodes ('all', "
            "'last', a slice like '1:' that leaves out BOS, or a list of indices)"
        )
    bases = basis.bases if isinstance(basis, BasisResult) else dict(basis)
    by_hook = {b.site.hook: b for b in bases.values()}
    if sites is None:
        chosen = [
            b
            for b in bases.values()
            if not b.site.is_logits and len(site_parts(model, b.site)) == 1
        ]
    else:
        chosen = []
        for name in sites:
            key = name if isinstance(name, str) else as_site(name).hook
            found = bases.get(key) or by_hook.get(key)
            if found is None:
                raise KeyError(f"no basis at site {name!r}; sites: {list(bases)}")
            chosen.append(found)
    if not chosen:
        raise SiteError(
            "a prompt graph needs at least one residual-stream site with a basis (not the "
            f"logits, nor an MLP or attention site); the basis has {list(bases)}"
        )
    if any(b.site.is_logits for b in chosen):
        raise SiteError("the logits are the target's input, not a site of the graph")
    graph_sites = validate_sites(model, [Site(b.site.hook, positions) for b in chosen])
    return [ChainSite(s, b) for s, b in zip(graph_sites, chosen)]


def embedding_sites(model: nn.Module) -> list[Site]:
    """The embedding hooks the model runs, at every position. A Bridge lists `hook_pos_embed`
    on a rotary model too, where nothing passes through it; one forward of one token tells
    (once per model)."""
    names = set(hook_names(model))
    present = tuple(h for h in EMBEDDING_HOOKS if h in names)
    if len(present) < 2:
        return [Site(h) for h in present]
    if model not in _EMBEDDINGS_RUN:
        fired: set[str] = set()

        def seen(name: str):
            return lambda act, hook=None: fired.add(name)

        device = next(model.parameters()).device
        with torch.no_grad():
            one = torch.zeros(1, 1, dtype=torch.long, device=device)
            run_with_hooks(model, one, [(h, seen(h)) for h in present])
        _EMBEDDINGS_RUN[model] = tuple(h for h in present if h in fired)
    return [Site(h) for h in _EMBEDDINGS_RUN[model]]


_EMBEDDINGS_RUN: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()
"""Per model, the embedding hooks a forward runs through (a property of its structure)."""


@dataclass
class NodeAttributions:
    """Per site: feature values, their attributions, the rest nodes; and the embeddings."""

    chain: list[ChainSite]
    positions: list[Int[Tensor, " p"]]
    """The absolute positions of each site's nodes."""
    activations: list[Float[Tensor, "p d"]]
    """The site's activation (minus the baseline's, with a baseline), float64."""
    gradients: list[Float[Tensor, "p d"]]
    """The target's gradient at the site, float64."""
    features: list[Float[Tensor, "p k"]]
    attributions: list[Float[Tensor, "p k"]]
    rest: list[Float[Tensor, " p"]]
    """Attribution of each position's rest node (mean and truncated directions)."""
    rest_values: list[Float[Tensor, "p d"]]
    """The rest nodes' vectors, `f − f̂ C⁺` (with a baseline: the truncated part of `f − f'`)."""
    embedding: Float[Tensor, " pos"]
    """Attribution of each position's embedding node."""
    embedding_values: list[Float[Tensor, "pos d"]]
    embedding_gradients: list[Float[Tensor, "pos d"]]
    value: float
    """The target at the prompt."""

    @property
    def site_totals(self) -> Float[Tensor, " n_sites"]:
        """`Σ_s g_s · f_s` per site: what features and rest nodes add up to."""
        return torch.stack([(g * f).sum() for g, f in zip(self.gradients, self.activations)])


def check_prompt(tokens: Tensor | Sequence) -> None:
    """Refuse anything but one prompt, `[1, pos]` (a tensor, array or nested lists; before
    `validate_tokens` checks the ids)."""
    if isinstance(tokens, str):
        raise TypeError(
            "a prompt graph takes token ids, not text: tokens = model.to_tokens(text) "
            "(or tokenizer(text, return_tensors='pt').input_ids)"
        )
    try:
        shape = tuple(torch.as_tensor(tokens).shape)
    except (TypeError, ValueError):  # ragged lists: `validate_tokens` names the problem
        return
    if len(shape) != 2 or shape[0] != 1:
        raise ValueError(
            f"a prompt graph explains one prompt: tokens must be [1, pos], got {shape} "
            "(index a batch with tokens[i : i + 1]; one list of ids: [ids])"
        )


def capture(
    model: nn.Module, sites: Sequence[Site], tokens: Int[Tensor, "batch pos"]
) -> dict[str, Tensor]:
    """Activations at `sites` (keyed by hook), float64 copies, one forward."""
    store: dict[str, Tensor] = {}
    hooks = []
    for site in sites:

        def keep(act: Tensor, name: str = site.hook) -> None:
            store[name] = act.detach().to(torch.float64).clone()

        hooks += _read_site(model, site, keep)
    with torch.no_grad(), frozen_parameters(model):
        run_with_hooks(model, tokens, hooks)
    return store


def node_attributions(
    model: nn.Module,
    chain: list[ChainSite],
    tokens: Int[Tensor, "1 pos"],
    target: Target,
    baseline_tokens: Int[Tensor, "1 pos"] | None = None,
    freeze_final_norm: bool = False,
) -> NodeAttributions:
    """Gradient × activation of every node on the target, from one forward and one backward.

    A zero leaf is added at each site's positions and at the embeddings, so each leaf's gradient
    is the total gradient through every later path. With `freeze_final_norm` the final
    normalisation's scale is held at its value on the prompt (as direct logit attribution
    does): the target is then linear in the last residual stream, and gradient × activation at
    the last site adds up to the target's value (up to biases). Without it (the default) the
    gradient is the model's own, which predicts interventions better.
    """
    check_prompt(tokens)
    tokens = validate_tokens(model, tokens)
    embeds = embedding_sites(model)
    all_sites = [c.site for c in chain] + embeds
    acts: dict[str, Tensor] = {}
    leaves: dict[str, Tensor] = {}
    hooks = []
    for site in all_sites:

        def add_leaf(sel: Tensor, name: str = site.hook) -> Tensor:
            acts[name] = sel.detach()[0].to("cpu", torch.float64)
            leaves[name] = torch.zeros_like(sel, requires_grad=True)
            return sel + leaves[name]

        hooks += _write_site(model, site, add_leaf)
    if freeze_final_norm and FINAL_SCALE_HOOK in hook_names(model):

        def freeze(act: Tensor, hook: object = None) -> Tensor:
            return act.detach()

        hooks.append((FINAL_SCALE_HOOK, freeze))
    names = [s.hook for s in all_sites]
    with frozen_parameters(model), torch.enable_grad():
        logits = run_with_hooks(model, tokens, hooks)
        value = target(logits)[0]
        got = torch.autograd.grad(value, [leaves[n] for n in names], allow_unused=True)
    grads = {  # one prompt's worth: the rest of the graph is computed on the CPU
        n: torch.zeros_like(acts[n]) if g is None else g[0].to("cpu", torch.float64)
        for n, g in zip(names, got)
    }
    if baseline_tokens is not None:
        check_prompt(baseline_tokens)
        baseline_tokens = validate_tokens(model, baseline_tokens)
        if baseline_tokens.shape != tokens.shape:
            raise ValueError("the baseline prompt must have as many tokens as the prompt")
        base = capture(model, all_sites, baseline_tokens)
        acts = {n: a - base[n][0].cpu() for n, a in acts.items()}
    out = NodeAttributions(
        chain=chain,
        positions=[],
        activations=[],
        gradients=[],
        features=[],
        attributions=[],
        rest=[],
        rest_values=[],
        embedding=torch.zeros(tokens.shape[1], dtype=torch.float64),
        embedding_values=[],
        embedding_gradients=[],
        value=float(value.detach()),
    )
    for c in chain:
        f, g, basis = acts[c.name], grads[c.name], c.basis
        feats = f @ basis.C if baseline_tokens is not None else basis.features(f)
        attr = (g @ basis.C_pinv.T) * feats
        rest_vec = f - feats @ basis.C_pinv
        out.positions.append(c.site.index(tokens.shape[1]))
        out.activations.append(f)
        out.gradients.append(g)
        out.features.append(feats)
        out.attributions.append(attr)
        out.rest.append((g * rest_vec).sum(-1))
        out.rest_values.append(rest_vec)
    for site in embeds:
        out.embedding += (grads[site.hook] * acts[site.hook]).sum(-1)
        out.embedding_values.append(acts[site.hook])
        out.embedding_gradients.append(grads[site.hook])
    return out
