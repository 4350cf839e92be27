"""Modules that survive a change of coordinates (Paper A's central point).

A network whose computation splits into independent modules keeps that structure under any
rotation of its internal coordinates that is folded into the weights: the function, and so
every statement about its degeneracy, is unchanged. Modules read off the neuron basis (the
network's own coordinates) are not invariant; modules read off the LIB basis are, because LIB
is built from the site's Gram `G` and Jacobian Gram `M'`, which transform covariantly
(`G → Rᵀ G R`, `M' → Rᵀ M' R`), so the LIB features and their edges are the same.

This module builds the test case and the measurement:

- `planted_modules_model`: a TransformerLens model (no normalisation, one position, ReLU MLPs)
  whose residual stream, heads, neurons and logits split into `n_modules` blocks with no cross
  weights, on data that makes the blocks statistically independent (every token is a tuple of
  one digit per module and the data set is the full grid of tuples);
- `rotate_residual_stream`: the same function with its residual stream rotated by an
  orthogonal `R`, folded into every weight that reads or writes the stream (in a residual
  network every residual site shares one coordinate system, so the rotation applies to all);
- `basis_modules`: fit a basis at every residual cut, compute the interaction graph and its
  modules (`tl_degeneracy.engine.modularity.find_modules`, default setting or any other);
- `same_partition` / `adjusted_rand_index` / `refines` (from
  `tl_degeneracy.engine.module_finding`): compare two partitions up to relabelling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.brief_repr import BriefRepr
from tl_degeneracy.engine.compat import (
    API,
    build_model,
    hooked_state_dict,
    hooked_to_bridge_state_dict,
    is_bridge,
    model_cfg,
    model_config,
)
from tl_degeneracy.engine.degeneracy.parameters import state_dict_parameters
from tl_degeneracy.engine.edges import InteractionGraph, interaction_graph
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.modularity import ModuleConfig, Modules, Node, find_modules
from tl_degeneracy.engine.module_finding import (
    adjusted_rand_index,
    refines,
    same_partition,
)
from tl_degeneracy.engine.sites import LOGITS, Site

__all__ = [
    "BasisModules",
    "PlantedModules",
    "PlantedModulesConfig",
    "adjusted_rand_index",
    "basis_modules",
    "block_shares",
    "planted_labels",
    "planted_modules_model",
    "planted_sections",
    "random_orthogonal",
    "refines",
    "residual_sites",
    "rotate_residual_state_dict",
    "rotate_residual_stream",
    "same_partition",
]


@dataclass(frozen=True)
class PlantedModulesConfig:
    """Shape of the planted-module network."""

    n_modules: int = 3
    width: int = 4
    """Residual dimensions per module (also the head dimension: one head per module)."""
    mlp_width: int = 8
    """ReLU neurons per module and layer."""
    n_values: int = 6
    """Distinct inputs per module; the vocabulary is `n_values ** n_modules` tuples."""
    logits_per_module: int = 4
    n_layers: int = 2
    seed: int = 0

    @property
    def d_model(self) -> int:
        return self.n_modules * self.width

    @property
    def d_vocab(self) -> int:
        return self.n_values**self.n_modules


@dataclass(repr=False)
class PlantedModules(BriefRepr):
    """The planted network, its data and the module of every residual dimension and logit."""

    model: nn.Module
    tokens: Int[Tensor, "n 1"]
    config: PlantedModulesConfig

    def residual_module(self, direction: Float[Tensor, " d_model"]) -> int:
        """The module that carries a residual-stream direction (the block with most of its
        norm); in the planted coordinates a direction of one block has all of it."""
        blocks = direction.reshape(self.config.n_modules, self.config.width)
        return int(blocks.square().sum(-1).argmax())

    def logit_module(self, index: int) -> int:
        return index // self.config.logits_per_module

    def parameter_masks(self, module: int) -> dict[str, Tensor]:
        """The weights module `module` owns (its residual block, head, neurons and logits),
        as masks over the model's parameters, named and laid out as the model holds them (a
        HookedTransformer's `blocks.0.attn.W_Q`, a Bridge's `blocks.0.attn.q.weight`); the
        cross-module weights (zero) belong to no module. Independent modules: their learning
        coefficients add. A weight the model holds as a buffer is no parameter and has no mask
        (TransformerLens 4's Bridge holds the unembedding bias so)."""
        masks = self._hooked_masks(module)
        if not is_bridge(self.model):
            return masks
        parameters = state_dict_parameters(self.model)
        bridge = hooked_to_bridge_state_dict(masks, model_config(self.model))
        return {name: mask for name, mask in bridge.items() if name in parameters}

    def _hooked_masks(self, module: int) -> dict[str, Tensor]:
        """`parameter_masks` under HookedTransformer names and layouts."""
        c, i = self.config, module
        res = torch.zeros(c.d_model, dtype=torch.bool)
        res[i * c.width : (i + 1) * c.width] = True
        neurons = torch.zeros(c.n_modules * c.mlp_width, dtype=torch.bool)
        neurons[i * c.mlp_width : (i + 1) * c.mlp_width] = True
        head = torch.zeros(c.n_modules, dtype=torch.bool)
        head[i] = True
        logits = torch.zeros(c.n_modules * c.logits_per_module, dtype=torch.bool)
        logits[i * c.logits_per_module : (i + 1) * c.logits_per_module] = True
        every = torch.ones(c.width, dtype=torch.bool)

        def outer(*axes: Tensor) -> Tensor:
            out = axes[0]
            for ax in axes[1:]:
                out = out[..., None] & ax
            return out

        masks = {
            "embed.W_E": outer(torch.ones(c.d_vocab, dtype=torch.bool), res),
            "pos_embed.W_pos": outer(torch.ones(1, dtype=torch.bool), res),
            "unembed.W_U": outer(res, logits),
            "unembed.b_U": logits,
        }
        for layer in range(c.n_layers):
            p = f"blocks.{layer}."
            for x in "QKV":
                masks[f"{p}attn.W_{x}"] = outer(head, res, every)
                masks[f"{p}attn.b_{x}"] = outer(head, every)
            masks[f"{p}attn.W_O"] = outer(head, every, res)
            masks[f"{p}attn.b_O"] = res
            masks[f"{p}mlp.W_in"] = outer(res, neurons)
            masks[f"{p}mlp.b_in"] = neurons
            masks[f"{p}mlp.W_out"] = outer(neurons, res)
            masks[f"{p}mlp.b_out"] = res
        return masks


def _block_diagonal(blocks: Sequence[Tensor]) -> Tensor:
    return torch.block_diag(*blocks)


def planted_modules_model(
    config: PlantedModulesConfig = PlantedModulesConfig(),
    api: API | Literal["auto"] = "auto",
    dtype: torch.dtype = torch.float64,
) -> PlantedModules:
    """A random network whose modules share no weights, with independent inputs per module.

    Token `t` has digits `t = Σ_i v_i n_values^i`; module `i`'s embedding reads only `v_i`.
    Head `i` reads and writes only residual block `i` (with one position its pattern is 1),
    MLP neurons of module `i` read and write only block `i`, logits of module `i` read only
    block `i`. On the full grid of tokens the modules' activations are independent, so every
    site's Gram and Jacobian Gram are block-diagonal.
    """
    c = config
    gen = torch.Generator().manual_seed(c.seed)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    m, w, h = c.n_modules, c.width, c.mlp_width
    digits = torch.stack(
        [(torch.arange(c.d_vocab) // c.n_values**i) % c.n_values for i in range(m)], -1
    )
    tables = [rand(c.n_values, w) for _ in range(m)]
    w_e = torch.cat([tables[i][digits[:, i]] for i in range(m)], -1)
    sd: dict[str, Tensor] = {
        "embed.W_E": w_e,
        "pos_embed.W_pos": rand(1, c.d_model, scale=0.1),
        "unembed.W_U": _block_diagonal(
            [rand(w, c.logits_per_module, scale=w**-0.5) for _ in range(m)]
        ),
        "unembed.b_U": rand(m * c.logits_per_module, scale=0.1),
    }
    for layer in range(c.n_layers):
        p = f"blocks.{layer}."
        for x in "QKV":
            full = torch.zeros(m, c.d_model, w, dtype=torch.float64)
            for i in range(m):
                full[i, i * w : (i + 1) * w] = rand(w, w, scale=w**-0.5)
            sd[f"{p}attn.W_{x}"] = full
            sd[f"{p}attn.b_{x}"] = rand(m, w, scale=0.1)
        w_o = torch.zeros(m, w, c.d_model, dtype=torch.float64)
        for i in range(m):
            w_o[i, :, i * w : (i + 1) * w] = rand(w, w, scale=w**-0.5)
        sd[f"{p}attn.W_O"] = w_o
        sd[f"{p}attn.b_O"] = rand(c.d_model, scale=0.1)
        sd[f"{p}mlp.W_in"] = _block_diagonal([rand(w, h, scale=w**-0.5) for _ in range(m)])
        sd[f"{p}mlp.b_in"] = rand(m * h, scale=0.3)
        sd[f"{p}mlp.W_out"] = _block_diagonal([rand(h, w, scale=h**-0.5) for _ in range(m)])
        sd[f"{p}mlp.b_out"] = rand(c.d_model, scale=0.1)
    model_cfg = dict(
        d_model=c.d_model,
        d_head=w,
        n_heads=m,
        d_mlp=m * h,
        n_layers=c.n_layers,
        n_ctx=1,
        d_vocab=c.d_vocab,
        d_vocab_out=m * c.logits_per_module,
        act_fn="relu",
        normalization_type=None,
    )
    model = build_model(model_cfg, sd, api=api, dtype=dtype, model_name="planted-modules")
    tokens = torch.arange(c.d_vocab)[:, None]
    return PlantedModules(model, tokens, config)


def planted_sections(
    n_blocks: int = 3,
    size: int = 4,
    n_sites: int = 3,
    noise: float = 1e-6,
    decay: float = 1.0,
    seed: int = 0,
) -> tuple[dict[tuple[str, str], Float[Tensor, "k k"]], Int[Tensor, " k"]]:
    """Edges of a chain of `n_sites` sites whose features fall in `n_blocks` blocks of `size`:
    within a block, edges uniform in [0.5, 1.5]; across blocks, `noise` × U[0, 1]. Feature `i`
    of each site is scaled by `decay**i` (both ends of its edges), so importances can span many
    orders of magnitude as in a fitted basis (features in decreasing importance, blocks
    interleaved: feature i lies in block `i % n_blocks`). Returns the sections and each
    feature's block."""
    gen = torch.Generator().manual_seed(seed)
    k = n_blocks * size
    block = torch.arange(k) % n_blocks
    same = (block[:, None] == block[None, :]).to(torch.float64)
    scale = decay ** torch.arange(k, dtype=torch.float64)
    sections = {}
    for layer in range(n_sites - 1):
        strong = 0.5 + torch.rand(k, k, generator=gen, dtype=torch.float64)
        weak = noise * torch.rand(k, k, generator=gen, dtype=torch.float64)
        e = (same * strong + (1 - same) * weak) * scale[:, None] * scale[None, :]
        sections[(f"site{layer}", f"site{layer + 1}")] = e
    return sections, block


def random_orthogonal(d: int, seed: int = 0) -> Float[Tensor, "d d"]:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix with the signs fixed)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rotate_residual_state_dict(
    state_dict: Mapping[str, Tensor], rotation: Float[Tensor, "d_model d_model"]
) -> dict[str, Tensor]:
    """HookedTransformer weights of the same function with residual stream `x' = x R`.

    Writers (`W_E`, `W_pos`, `W_O`, `b_O`, `W_out`, `b_out`) are multiplied by `R` on the
    right, readers (`W_Q`, `W_K`, `W_V`, `W_in`, `W_U`) by `Rᵀ` on the left, since
    `x W = x' Rᵀ W`. Valid only without normalisation (LayerNorm's centring and per-dimension
    weights do not commute with a general rotation); anything else is copied unchanged.
    """
    if any(".ln" in k or k.startswith("ln_final") for k in state_dict):
        raise ValueError("rotating the residual stream needs a model without normalisation")
    r = rotation.to(torch.float64)
    out: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        v = value.to(torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("W_E", "W_pos", "b_O", "W_out", "b_out", "W_O"):
            v = v @ r
        elif leaf in ("W_Q", "W_K", "W_V", "W_in", "W_U"):
            v = r.T @ v
        out[name] = v.to(value.dtype)
    return out


def rotate_residual_stream(
    model: nn.Module, rotation: Float[Tensor, "d_model d_model"], api: API | None = None
) -> nn.Module:
    """A new model computing the same function as `model` with its residual stream rotated
    by the orthogonal matrix `rotation` (see `rotate_residual_state_dict`)."""
    from tl_degeneracy.engine.compat import api_of

    sd = rotate_residual_state_dict(hooked_state_dict(model), rotation)
    dtype = next(model.parameters()).dtype
    return build_model(
        model_config(model), sd, api=api or api_of(model), dtype=dtype, model_name="rotated"
    )


def residual_sites(model: nn.Module) -> list[Site]:
    """Every distinct residual cut in forward order, then the logits."""
    sites = [Site("blocks.0.hook_resid_pre")]
    for layer in range(model_cfg(model).n_layers):
        sites += [Site(f"blocks.{layer}.hook_resid_mid"), Site(f"blocks.{layer}.hook_resid_post")]
    return [*sites, Site(LOGITS)]


@dataclass(repr=False)
class BasisModules(BriefRepr):
    """Modules of the interaction graph in one basis, with the graph they came from."""

    graph: InteractionGraph
    modules: Modules

    @property
    def modularity_q(self) -> float:
        return self.modules.modularity_q


def basis_modules(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    kind: Literal["lib", "ib", "pca", "neuron"],
    sites: Sequence[Site] | None = None,
    config: ModuleConfig | None = None,
) -> BasisModules:
    """Fit `kind` bases at `sites` (default: every residual cut and the logits), compute the
    interaction graph and its modules (`config`: default `ModuleConfig()`; the reference's
    setting is `REFERENCE_MODULES`)."""
    sites = list(sites) if sites is not None else residual_sites(model)
    basis = fit_basis(model, tokens, LIBConfig(tuple(sites), kind=kind, progress=False))
    graph = interaction_graph(model, tokens, basis, progress=False)
    modules = find_modules(graph, config)
    graph.modules = modules.by_site()
    return BasisModules(graph, modules)


def planted_labels(planted: PlantedModules, found: BasisModules) -> dict[Node, int]:
    """The planted module of every feature that took part in module finding: the block
    carrying its reconstruction direction (row of `C⁺`) at residual sites, the logit's block
    at the logits. Meaningful only when each feature lies in one block (LIB and neuron bases
    of the unrotated model)."""
    labels: dict[Node, int] = {}
    taking_part = found.modules.assignment
    for name, basis in found.graph.basis.bases.items():
        for i in range(basis.k):
            if (name, i) not in taking_part:
                continue
            direction = basis.C_pinv[i]
            if name == LOGITS:
                labels[(name, i)] = planted.logit_module(int(direction.abs().argmax()))
            else:
                labels[(name, i)] = planted.residual_module(direction)
    return labels


def block_shares(
    planted: PlantedModules,
    found: BasisModules,
    rotation: Float[Tensor, "d_model d_model"] | None = None,
) -> Float[Tensor, " features"]:
    """For every residual-site feature, the largest share of its reconstruction direction
    (row of `C⁺`, unit-normalised) that falls in one planted block: 1 when the feature lives
    in one module. `rotation`: the `R` the model's residual stream was rotated by, so that
    directions are mapped back to the planted coordinates (`x = x' Rᵀ`)."""
    shares = []
    for name, basis in found.graph.basis.bases.items():
        if name == LOGITS:
            continue
        rows = basis.C_pinv if rotation is None else basis.C_pinv @ rotation.T
        rows = rows / rows.norm(dim=-1, keepdim=True)
        blocks = rows.reshape(rows.shape[0], planted.config.n_modules, planted.config.width)
        shares.append(blocks.square().sum(-1).max(-1).values)
    return torch.cat(shares)
