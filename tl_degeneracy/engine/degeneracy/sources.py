"""The three sources of degeneracy of Paper A, measured with a finite-data cutoff ε
(docs/degeneracy.md).

For a weight map `W: R^{d_in} → R^{d_out}` (with a bias) between an input site and an output
(pre-activation) site:

1. activations: `k = d_in − rank_ε(G)` null directions of the input's centred Gram free
   `k · d_out` weights (a constant input direction is absorbed by the bias);
2. gradients: `k' = d_out − rank_ε(K)`, `K = Σ_x Jᵀ J` with J the Jacobian of the output
   (logits or a scalar metric) with respect to the map's output, free `k' · d_in` weights;
   jointly `k d_out + k' d_in − k k'`;
3. synchronised non-linearities: a group S of MLP neurons with identical on/off patterns over
   the data adds `|S|(|S| − 1)` free directions (always-on neurons form such a group: they are
   linear); dead neurons free all their weights; a group S of attention heads with the same
   patterns on the data adds `|S|(|S| − 1) d_head²` (their OV circuits can exchange weight).

`rank_ε` keeps eigenvalues `> ε · λ_max` (cutoff "relative", the default) or `> ε`
(cutoff "absolute"). Every count is also given as a curve over a log grid of ε.

The pure functions work on tensors; `measure_sources` is the TransformerLens glue: one forward
per batch (float64 Grams, neuron patterns, head patterns) and batched backward passes for K.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.compat import frozen_parameters, hook_names, model_cfg, run_with_hooks
from tl_degeneracy.engine.cotangents import exact_cotangents
from tl_degeneracy.engine.degeneracy.llc import state_dict_parameters
from tl_degeneracy.engine.linalg import symmetric_eigh
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import SiteStatistics, check_finite
from tl_degeneracy.engine.streaming import batch_generator, chunks, iter_batches

Cutoff = Literal["relative", "absolute"]

DEFAULT_EPS_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-16, 0))


# ---------------------------------------------------------------------------------------------
# Pure functions: ranks and counts
# ---------------------------------------------------------------------------------------------


def spectrum(matrix: Float[Tensor, "d d"]) -> Float[Tensor, " d"]:
    """Eigenvalues of a symmetric matrix in float64, descending."""
    m = matrix.to(torch.float64)
    return torch.linalg.eigvalsh((m + m.T) / 2).flip(0)


def threshold(eigenvalues: Float[Tensor, " d"], eps: float, cutoff: Cutoff = "relative") -> float:
    """The eigenvalue at or below which a direction counts as null."""
    if cutoff == "relative":
        top = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
        return eps * max(top, 0.0)
    if cutoff == "absolute":
        return eps
    raise ValueError(f"cutoff must be 'relative' or 'absolute', got {cutoff!r}")


def nullity(eigenvalues: Float[Tensor, " d"], eps: float, cutoff: Cutoff = "relative") -> int:
    """`d − rank_ε`: the number of eigenvalues ≤ the threshold."""
    return int((eigenvalues <= threshold(eigenvalues, eps, cutoff)).sum())


def nullity_curve(
    eigenvalues: Float[Tensor, " d"],
    eps_grid: Sequence[float] = DEFAULT_EPS_GRID,
    cutoff: Cutoff = "relative",
) -> Int[Tensor, " eps"]:
    """`nullity` at every ε of the grid."""
    return torch.tensor([nullity(eigenvalues, e, cutoff) for e in eps_grid], dtype=torch.int64)


def null_directions(
    matrix: Float[Tensor, "d d"], eps: float, cutoff: Cutoff = "relative"
) -> Float[Tensor, "d k"]:
    """Orthonormal eigenvectors of a symmetric matrix with eigenvalue ≤ the threshold."""
    m = matrix.to(torch.float64)
    evals, evecs = symmetric_eigh(m)
    return evecs[:, evals <= threshold(evals, eps, cutoff)]


def joint_free_weights(k: int, k_prime: int, d_in: int, d_out: int) -> int:
    """Weights of a `d_in → d_out` map freed by k null input directions and k' unread output
    directions: `k d_out + k' d_in − k k'` (the k k' weights in both sets counted once)."""
    return k * d_out + k_prime * d_in - k * k_prime


# ---------------------------------------------------------------------------------------------
# Pure functions: synchronised neurons and heads
# ---------------------------------------------------------------------------------------------


@dataclass
class NeuronGroups:
    """Neurons grouped by their on/off pattern over the data (one MLP layer)."""

    labels: Int[Tensor, " neurons"]
    """Group id of each neuron (equal ids: identical patterns); −1 for neurons that are not
    on/off switches on the data within the tolerance (smooth activations only)."""
    dead: Bool[Tensor, " neurons"]
    always_on: Bool[Tensor, " neurons"]
    weights_per_neuron: int = 0
    """Input + output weights (+ bias) of one neuron: what a dead neuron frees."""

    @property
    def groups(self) -> list[Int[Tensor, " size"]]:
        """Neuron indices of every group of two or more live neurons (always-on included)."""
        live = (self.labels >= 0) & ~self.dead
        ids, counts = torch.unique(self.labels[live], return_counts=True)
        return [torch.nonzero(self.labels == i).flatten() for i in ids[counts >= 2].tolist()]

    @property
    def group_sizes(self) -> list[int]:
        return sorted((len(g) for g in self.groups), reverse=True)

    @property
    def n_dead(self) -> int:
        return int(self.dead.sum())

    @property
    def n_always_on(self) -> int:
        return int(self.always_on.sum())

    @property
    def n_eligible(self) -> int:
        return int((self.labels >= 0).sum())

    @property
    def free_synchronised(self) -> int:
        """Σ_S |S|(|S| − 1) over groups of live neurons."""
        return sum(s * (s - 1) for s in self.group_sizes)

    @property
    def free_dead(self) -> int:
        """All weights of dead neurons."""
        return self.n_dead * self.weights_per_neuron


def pattern_groups(
    patterns: Bool[Tensor, "samples neurons"],
    eligible: Bool[Tensor, " neurons"] | None = None,
    weights_per_neuron: int = 0,
) -> NeuronGroups:
    """Group neurons whose boolean patterns over the samples are identical.

    Vectorised: the columns are bit-packed and grouped by `np.unique` (a sort), never compared
    pairwise. Neurons outside `eligible` get label −1.
    """
    bits = np.packbits(patterns.numpy().astype(bool), axis=0)
    return groups_from_bits(bits, ~patterns.any(0), patterns.all(0), eligible, weights_per_neuron)


def groups_from_bits(
    bits: np.ndarray,
    dead: Bool[Tensor, " neurons"],
    always_on: Bool[Tensor, " neurons"],
    eligible: Bool[Tensor, " neurons"] | None = None,
    weights_per_neuron: int = 0,
) -> NeuronGroups:
    """`pattern_groups` from bit-packed patterns `[bytes, neurons]` (any zero padding is the
    same for every neuron) and the neurons' dead / always-on flags."""
    n = bits.shape[1]
    labels = torch.zeros(n, dtype=torch.int64)
    if n:
        _, inverse = np.unique(bits.T, axis=0, return_inverse=True)
        labels = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
    dead, always_on = dead.clone(), always_on.clone()
    if eligible is not None:
        labels = torch.where(eligible, labels, torch.full_like(labels, -1))
        dead &= eligible
        always_on &= eligible
    return NeuronGroups(labels, dead, always_on, weights_per_neuron)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


def switch_pattern(
    pre: Float[Tensor, "samples neurons"],
    act_fn: str = "relu",
    tolerance: float = 0.01,
) -> tuple[Bool[Tensor, "samples neurons"], Bool[Tensor, " neurons"]]:
    """On/off pattern `pre > 0` and, per neuron, whether it acts as an on/off switch on every
    sample: always for ReLU; for a smooth activation when its derivative is within
    `tolerance` of 0 or of 1 on every sample (so the neuron is linear or off wherever it is
    evaluated, and neurons with equal patterns can mix like ReLU neurons)."""
    on = pre > 0
    if act_fn == "relu":
        return on, torch.ones(pre.shape[1], dtype=torch.bool)
    if act_fn not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act_fn!r}; known: {sorted(ACTIVATIONS)}")
    x = pre.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        (slope,) = torch.autograd.grad(ACTIVATIONS[act_fn](x).sum(), x)
    switch = (slope.abs() <= tolerance) | ((slope - 1).abs() <= tolerance)
    return on, switch.all(0)


@dataclass
class HeadGroups:
    """Attention heads of one layer grouped by agreeing patterns on the data."""

    labels: Int[Tensor, " heads"]
    max_difference: Float[Tensor, "heads heads"]
    """Largest absolute difference of the two heads' attention patterns over the data."""
    tolerance: float
    d_head: int

    @property
    def groups(self) -> list[list[int]]:
        ids, counts = torch.unique(self.labels, return_counts=True)
        out = [torch.nonzero(self.labels == i).flatten().tolist() for i in ids.tolist()]
        return [g for g, c in zip(out, counts.tolist()) if c >= 2]

    @property
    def free(self) -> int:
        """Σ_S |S|(|S| − 1) d_head²: OV weight the heads of a group can exchange."""
        return sum(len(g) * (len(g) - 1) for g in self.groups) * self.d_head**2


def head_groups(
    max_difference: Float[Tensor, "heads heads"], tolerance: float, d_head: int
) -> HeadGroups:
    """Connected components of the graph 'patterns agree within `tolerance`'."""
    from scipy.sparse.csgraph import connected_components

    agree = (max_difference <= tolerance).numpy()
    _, labels = connected_components(agree, directed=False)
    return HeadGroups(torch.from_numpy(labels.astype(np.int64)), max_difference, tolerance, d_head)


# ---------------------------------------------------------------------------------------------
# Weight maps of a TransformerLens model
# ---------------------------------------------------------------------------------------------

TOKENS = "tokens"
POSITIONS = "positions"
LOGITS = "logits"


@dataclass(frozen=True)
class WeightMap:
    """A weight matrix (and its bias) from an input site to an output site.

    `input_site` is a hook name, or "tokens"/"positions" (one-hot inputs of the embeddings);
    `output_site` a hook name or "logits".
    """

    name: str
    section: str
    input_site: str
    output_site: str
    d_in: int
    d_out: int


def _first_hook(model: nn.Module, *names: str) -> str:
    valid = set(hook_names(model))
    for n in names:
        if n in valid:
            return n
    raise KeyError(f"none of the hooks {names} exists on this model")


def weight_maps(model: nn.Module) -> list[WeightMap]:
    """The weight maps of a standard TransformerLens model, grouped into sections
    `embed`, `blocks.L.attn`, `blocks.L.mlp`, `unembed`."""
    cfg = model_cfg(model)
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    normed = getattr(cfg, "normalization_type", None) is not None
    gated = bool(getattr(cfg, "gated_mlp", False))
    h_kv = getattr(cfg, "n_key_value_heads", None) or h  # grouped-query attention: fewer K, V
    maps = [WeightMap("W_E", "embed", TOKENS, "hook_embed", cfg.d_vocab, d)]
    if "hook_pos_embed" in set(hook_names(model)):
        maps.append(WeightMap("W_pos", "embed", POSITIONS, "hook_pos_embed", cfg.n_ctx, d))
    for layer in range(cfg.n_layers):
        b = f"blocks.{layer}"
        attn_in = (
            _first_hook(model, f"{b}.ln1.hook_normalized", f"{b}.ln1.hook_out")
            if normed
            else f"{b}.hook_resid_pre"
        )
        for x in "QKV":
            heads = h if x == "Q" else h_kv
            maps.append(
                WeightMap(
                    f"{b}.attn.W_{x}",
                    f"{b}.attn",
                    attn_in,
                    f"{b}.attn.hook_{x.lower()}",
                    d,
                    heads * dh,
                )
            )
        maps.append(
            WeightMap(
                f"{b}.attn.W_O", f"{b}.attn", f"{b}.attn.hook_z", f"{b}.hook_attn_out", h * dh, d
            )
        )
        if getattr(cfg, "attn_only", False):
            continue
        mlp_in = (
            _first_hook(model, f"{b}.ln2.hook_normalized", f"{b}.ln2.hook_out")
            if normed
            else f"{b}.hook_resid_mid"
        )
        dm = cfg.d_mlp
        if gated:  # act(x W_gate) * (x W_in): the gate's pre-activation is mlp.hook_pre
            maps.append(
                WeightMap(f"{b}.mlp.W_gate", f"{b}.mlp", mlp_in, f"{b}.mlp.hook_pre", d, dm)
            )
            maps.append(
                WeightMap(f"{b}.mlp.W_in", f"{b}.mlp", mlp_in, f"{b}.mlp.hook_pre_linear", d, dm)
            )
        else:
            maps.append(WeightMap(f"{b}.mlp.W_in", f"{b}.mlp", mlp_in, f"{b}.mlp.hook_pre", d, dm))
        maps.append(
            WeightMap(
                f"{b}.mlp.W_out", f"{b}.mlp", f"{b}.mlp.hook_post", f"{b}.hook_mlp_out", dm, d
            )
        )
    last = cfg.n_layers - 1
    unembed_in = (
        _first_hook(model, "ln_final.hook_normalized", "ln_final.hook_out")
        if normed
        else f"blocks.{last}.hook_resid_post"
    )
    d_vocab_out = cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab
    maps.append(WeightMap("W_U", "unembed", unembed_in, LOGITS, d, d_vocab_out))
    return maps


SECTION_PARAMS: dict[str, str] = {
    "embed": r"^(embed|pos_embed)\.",
    "unembed": r"^(unembed|ln_final)\.",
}


def section_filter(section: str) -> str:
    """Regex selecting a section's parameters on both APIs (layer norms go with the section
    that reads them)."""
    if section in SECTION_PARAMS:
        return SECTION_PARAMS[section]
    block, kind = section.rsplit(".", 1)
    ln = "ln1" if kind == "attn" else "ln2"
    return rf"^{re.escape(block)}\.({kind}|{ln})\."


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class MapSources:
    """Activation and gradient sources of one weight map, as spectra (counts follow)."""

    map: WeightMap
    gram_spectrum: Float[Tensor, " d_in"]
    """Eigenvalues of the input's centred Gram (for one-hot inputs: token frequencies)."""
    grad_spectrum: Float[Tensor, " d_out"]
    """Eigenvalues of K = (1/N) Σ_x JᵀJ at the output site."""

    def k(self, eps: float, cutoff: Cutoff = "relative") -> int:
        return nullity(self.gram_spectrum, eps, cutoff)

    def k_prime(self, eps: float, cutoff: Cutoff = "relative") -> int:
        return nullity(self.grad_spectrum, eps, cutoff)

    def free(self, eps: float, cutoff: Cutoff = "relative") -> dict[str, int]:
        """Free weights by activations, by gradients, and jointly."""
        k, kp = self.k(eps, cutoff), self.k_prime(eps, cutoff)
        d_in, d_out = self.map.d_in, self.map.d_out
        return {
            "k": k,
            "k_prime": kp,
            "activations": k * d_out,
            "gradients": kp * d_in,
            "joint": joint_free_weights(k, kp, d_in, d_out),
        }

    def curves(self, eps_grid: Sequence[float], cutoff: Cutoff = "relative") -> dict[str, Tensor]:
        k = nullity_curve(self.gram_spectrum, eps_grid, cutoff)
        kp = nullity_curve(self.grad_spectrum, eps_grid, cutoff)
        d_in, d_out = self.map.d_in, self.map.d_out
        return {"k": k, "k_prime": kp, "joint": k * d_out + kp * d_in - k * kp}


@dataclass
class SourcesConfig:
    """Settings of `measure_sources`."""

    eps: float = 1e-10
    """The finite-data cutoff reported as 'the' count (curves cover `eps_grid`)."""
    cutoff: Cutoff = "relative"
    eps_grid: tuple[float, ...] = DEFAULT_EPS_GRID
    positions: Literal["last", "all"] | tuple[int, ...] = "last"
    """Output positions whose logits (or metric) define J."""
    metric: Callable[[Tensor, Tensor], Tensor] | None = None
    """Optional scalar metric per sequence, `metric(logits, tokens) -> [batch]`; J is then its
    gradient instead of the logits' Jacobian."""
    max_exact_outputs: int = 32
    """Exact K (one cotangent per output unit) up to this many output units (positions ×
    vocabulary), else `n_probes` Rademacher cotangents per sequence: the estimate has the
    same range (so the same null space) once enough tokens are seen, at a fraction of the
    cost (modular addition: 114 outputs, 16 probes, 7× faster)."""
    n_probes: int = 16
    chunk_size: int = 1
    """Cotangents per backward pass; 1 (a plain loop) measured fastest on 2 CPU cores."""
    sync_tolerance: float = 0.01
    """Smooth activations: a neuron is an on/off switch when its derivative is within this of
    0 or 1 on every token."""
    head_tolerance: float = 1e-6
    """Heads agree when their attention patterns differ by at most this anywhere."""
    batch_size: int = 256
    seed: int = 0


@dataclass
class SourcesResult:
    """All three sources for a model on a data set."""

    maps: list[MapSources]
    neurons: dict[str, NeuronGroups]
    """Per MLP section name."""
    heads: dict[str, HeadGroups]
    """Per attention section name."""
    section_params: dict[str, int]
    """Nominal parameter count per section."""
    n_tokens: int
    config: SourcesConfig
    act_fn: str = "relu"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sections(self) -> list[str]:
        return list(self.section_params)

    def section_free(self, section: str, eps: float | None = None) -> dict[str, int]:
        """Free directions of a section by source at ε, and in total (see module docstring
        for the overlap rule: joint per map, dead neurons add only their bias beyond it)."""
        eps = self.config.eps if eps is None else eps
        cut = self.config.cutoff
        out = {"activations": 0, "gradients": 0, "joint": 0, "synchronised": 0, "dead": 0}
        for m in self.maps:
            if m.map.section == section:
                f = m.free(eps, cut)
                for key in ("activations", "gradients", "joint"):
                    out[key] += f[key]
        extra = 0
        if section in self.neurons:
            g = self.neurons[section]
            out["synchronised"] = g.free_synchronised
            out["dead"] = g.free_dead
            # a dead neuron's W_in column and W_out row are already free by gradients and
            # activations (its pre-activation is unread, its output is constant zero); only
            # its bias b_in is new
            extra = g.free_synchronised + g.n_dead
        if section in self.heads:
            out["synchronised"] = self.heads[section].free
            extra = self.heads[section].free
        out["total"] = min(out["joint"] + extra, self.section_params[section])
        return out

    def upper_bound(self, section: str | None = None, eps: float | None = None) -> int:
        """`N − free`: the upper bound on N_eff of a section (or the whole model)."""
        names = [section] if section is not None else self.sections
        return sum(self.section_params[s] - self.section_free(s, eps)["total"] for s in names)

    def bound_curve(self, section: str | None = None) -> Int[Tensor, " eps"]:
        return torch.tensor([self.upper_bound(section, e) for e in self.config.eps_grid])


# ---------------------------------------------------------------------------------------------
# TransformerLens glue
# ---------------------------------------------------------------------------------------------


class _Collector:
    """One forward per batch: Grams of input sites, zero probes at output sites, neuron
    patterns and head pattern differences; then batched backward passes for K."""

    def __init__(self, model: nn.Module, maps: list[WeightMap], config: SourcesConfig):
        self.model, self.maps, self.config = model, maps, config
        cfg = model_cfg(model)
        self.act_fn = str(getattr(cfg, "act_fn", "relu"))
        self.grams: dict[str, SiteStatistics] = {}
        self.k_sums: dict[str, Tensor] = {}
        self.n_tokens = 0
        self.logit_positions = 1
        self.token_counts = torch.zeros(cfg.d_vocab, dtype=torch.float64)
        self.position_counts = torch.zeros(cfg.n_ctx, dtype=torch.float64)
        self.pattern_bits: dict[str, list[np.ndarray]] = {}
        self.any_on: dict[str, Tensor] = {}
        self.all_on: dict[str, Tensor] = {}
        self.eligible: dict[str, Tensor] = {}
        self.head_diff: dict[str, Tensor] = {}
        self.inputs = sorted(
            {m.input_site for m in maps if m.input_site not in (TOKENS, POSITIONS)}
        )
        self.outputs = sorted({m.output_site for m in maps if m.output_site != LOGITS})
        self.gated = bool(getattr(cfg, "gated_mlp", False))
        gate = "mlp.W_gate" if self.gated else "mlp.W_in"
        self.mlp_pre = [m.output_site for m in maps if m.name.endswith(gate)]
        attn = {m.section for m in maps if m.section.endswith(".attn")}
        self.patterns = [f"{s}.hook_pattern" for s in sorted(attn)]

    def update(self, batch_index: int, tokens: Tensor) -> None:
        probes: dict[str, Tensor] = {}
        acts: dict[str, list[Tensor]] = {}

        def make_hook(name: str):
            def hook(act: Tensor, hook: Any = None) -> Tensor:
                flat = act.detach().reshape(act.shape[0], act.shape[1], -1)
                if name in self.inputs and name not in acts:
                    # HookedTransformer applies ln1 once each for Q, K and V: keep the first
                    acts[name] = [flat]
                if name in self.mlp_pre:
                    self._add_pattern(name, flat)
                if name in self.patterns:
                    self._add_heads(name, act.detach())
                if name in self.outputs:
                    probe = torch.zeros_like(act, requires_grad=True)
                    probes[name] = probe
                    return act + probe
                return act

            return hook

        names = sorted(
            set(self.inputs) | set(self.outputs) | set(self.mlp_pre) | set(self.patterns)
        )
        with frozen_parameters(self.model), torch.enable_grad():
            logits = run_with_hooks(self.model, tokens, [(n, make_hook(n)) for n in names])
        assert logits is not None
        for name, (flat,) in acts.items():
            check_finite(flat, Site(name), batch_index)
            if name not in self.grams:
                self.grams[name] = SiteStatistics.empty(Site(name), flat.shape[-1])
            self.grams[name].add(flat.reshape(-1, flat.shape[-1]))
        self.n_tokens += tokens.numel()
        self.token_counts += torch.bincount(tokens.flatten(), minlength=len(self.token_counts))
        self.position_counts[: tokens.shape[1]] += tokens.shape[0]
        self._add_jacobians(batch_index, tokens, logits, probes)

    def _add_pattern(self, name: str, pre: Tensor) -> None:
        flat = pre.reshape(-1, pre.shape[-1])
        on, switch = switch_pattern(flat, self.act_fn, self.config.sync_tolerance)
        self.pattern_bits.setdefault(name, []).append(np.packbits(on.numpy(), axis=0))
        if name not in self.eligible:
            self.eligible[name], self.any_on[name], self.all_on[name] = switch, on.any(0), on.all(0)
        else:
            self.eligible[name] &= switch
            self.any_on[name] |= on.any(0)
            self.all_on[name] &= on.all(0)

    def _add_heads(self, name: str, pattern: Float[Tensor, "batch head q k"]) -> None:
        p = pattern.to(torch.float64).transpose(0, 1).reshape(pattern.shape[1], -1)
        diff = torch.stack([(p - p[i]).abs().amax(1) for i in range(p.shape[0])])
        prev = self.head_diff.get(name)
        self.head_diff[name] = diff if prev is None else torch.maximum(prev, diff)

    def _add_jacobians(
        self, batch_index: int, tokens: Tensor, logits: Tensor, probes: dict[str, Tensor]
    ) -> None:
        cfg = self.config
        n_pos = tokens.shape[1]
        if cfg.positions == "last":
            pos = torch.tensor([n_pos - 1])
        elif cfg.positions == "all":
            pos = torch.arange(n_pos)
        else:
            pos = torch.tensor([p % n_pos for p in cfg.positions])
        out = logits[:, pos]
        self.logit_positions = len(pos)
        # K at the logits themselves (the unembedding's gradient source) is t_out · I without a
        # metric (J = I): known, so not accumulated (a vocabulary² matrix on a language model)
        with_logits = cfg.metric is not None and any(m.output_site == LOGITS for m in self.maps)
        names = [*probes, LOGITS] if with_logits else list(probes)
        inputs = [*probes.values(), logits] if with_logits else list(probes.values())
        if not inputs:
            return
        if cfg.metric is not None:
            grads = torch.autograd.grad(cfg.metric(out, tokens).sum(), inputs, allow_unused=True)
            self._accumulate(names, [g[None] if g is not None else None for g in grads], 1.0)
            return
        batch, t_out, v = out.shape
        if t_out * v <= cfg.max_exact_outputs:
            readout = torch.eye(v, dtype=out.dtype)
            cots = exact_cotangents(readout, batch, t_out, cfg.chunk_size)
        else:
            # Rademacher signs over (position, unit): what `stochastic_cotangents` gives with an
            # identity readout, without the v × v identity (9.7 GB for a 49k vocabulary)
            gen = batch_generator(cfg.seed, "sources", batch_index)
            signs = torch.randint(0, 2, (cfg.n_probes, batch, t_out, v), generator=gen)
            signs = (signs * 2 - 1).to(out.dtype)
            cots = ((signs[sl], 1.0 / cfg.n_probes) for sl in chunks(cfg.n_probes, cfg.chunk_size))
        for cot, weight in cots:
            if cot.shape[0] == 1:  # one backward per cotangent: the fastest on a small CPU
                grads = torch.autograd.grad(
                    out, inputs, cot[0], retain_graph=True, allow_unused=True
                )
                grads = tuple(g[None] if g is not None else None for g in grads)
            else:
                grads = torch.autograd.grad(
                    out, inputs, cot, is_grads_batched=True, retain_graph=True, allow_unused=True
                )
            self._accumulate(names, list(grads), weight)

    def _accumulate(self, names: list[str], grads: list[Tensor | None], weight: float) -> None:
        """Add Σ g gᵀ over (cotangent, batch, position) for each site; g is [c, b, p, ...]."""
        for name, g in zip(names, grads):
            if g is None:
                continue
            flat = g.reshape(-1, int(np.prod(g.shape[3:]))).to(torch.float64)
            m = weight * (flat.T @ flat)
            self.k_sums[name] = self.k_sums[name] + m if name in self.k_sums else m

    # -- results ------------------------------------------------------------------------------

    def gram_spectrum(self, m: WeightMap) -> Tensor:
        if m.input_site == TOKENS:
            return self.token_counts / max(self.n_tokens, 1)
        if m.input_site == POSITIONS:
            return self.position_counts / max(self.position_counts.sum().item(), 1)
        return spectrum(self.grams[m.input_site].gram)

    def grad_spectrum(self, m: WeightMap, n_seq: int) -> Tensor:
        if m.output_site == LOGITS and self.config.metric is None:
            return torch.full((m.d_out,), float(self.logit_positions), dtype=torch.float64)
        k = self.k_sums.get(m.output_site)
        if k is None:
            return torch.zeros(m.d_out, dtype=torch.float64)
        return spectrum(k / n_seq)


def measure_sources(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    config: SourcesConfig | None = None,
    maps: Sequence[WeightMap] | None = None,
    sections: Sequence[str] | None = None,
) -> SourcesResult:
    """Measure the three sources of degeneracy of a TransformerLens model on `tokens`.

    Activations are accumulated in float64 whatever the model's dtype; K is exact (one
    cotangent per output unit, batched) up to `max_exact_outputs` units, else estimated with
    Rademacher probes (its range, hence its rank, is still found once enough tokens are seen).
    `sections` (e.g. `["blocks.15.mlp"]`) measures only those sections' maps: on a language
    model, one layer's sources cost one forward and a few backward passes to that layer.

    Gated MLPs (`act(x W_gate) ⊙ (x W_in)`): the maps are W_gate, W_in and W_out; a neuron is
    dead when its gate is off on every token (derivative within `sync_tolerance` of 0), which
    frees its three weight vectors. Synchronised groups are not counted for gated MLPs: a
    neuron's output is the product of two pre-activations, so on tokens where a group's gates
    are on the group computes a quadratic, not a linear, map and the |S|(|S| − 1) mixing
    directions of the ungated case do not exist.
    """
    config = config or SourcesConfig()
    maps = list(maps) if maps is not None else weight_maps(model)
    if sections is not None:
        known = list(dict.fromkeys(m.section for m in maps))
        unknown = [s for s in sections if s not in known]
        if unknown:
            raise ValueError(f"unknown sections {unknown}; the model has {known}")
        maps = [m for m in maps if m.section in sections]
    col = _Collector(model, maps, config)
    for i, batch in enumerate(iter_batches(tokens, config.batch_size)):
        col.update(i, batch)
    n_seq = int(tokens.shape[0])
    map_sources = [MapSources(m, col.gram_spectrum(m), col.grad_spectrum(m, n_seq)) for m in maps]
    cfg = model_cfg(model)
    neurons: dict[str, NeuronGroups] = {}
    for name, bits in col.pattern_bits.items():
        section = name.rsplit(".", 1)[0]  # blocks.L.mlp
        eligible = col.eligible[name]
        if col.gated:  # only dead gates count (see the docstring)
            eligible = eligible & ~col.any_on[name]
        neurons[section] = groups_from_bits(
            np.concatenate(bits),
            ~col.any_on[name],
            col.all_on[name],
            eligible,
            # W_in column, W_out row, b_in entry (and the W_gate column when gated)
            weights_per_neuron=(3 if col.gated else 2) * cfg.d_model + 1,
        )
    heads = {
        name.rsplit(".", 1)[0]: head_groups(diff, config.head_tolerance, cfg.d_head)
        for name, diff in col.head_diff.items()
    }
    params = state_dict_parameters(model)
    sections = list(dict.fromkeys(m.section for m in maps))
    section_params = {
        s: sum(p.numel() for n, p in params.items() if re.search(section_filter(s), n))
        for s in sections
    }
    return SourcesResult(
        map_sources, neurons, heads, section_params, col.n_tokens, config, col.act_fn
    )
