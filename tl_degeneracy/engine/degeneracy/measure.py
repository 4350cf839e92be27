"""`measure_sources`: the three sources of degeneracy of a TransformerLens model on its data.

One forward per batch (float64 Grams of the input sites, neuron on/off patterns, head pattern
differences) and batched backward passes for the gradient Grams K.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.compat import frozen_parameters, model_cfg, run_with_hooks
from tl_degeneracy.engine.cotangents import exact_cotangents
from tl_degeneracy.engine.degeneracy.groups import (
    NeuronGroups,
    groups_from_bits,
    head_groups,
    switch_pattern,
)
from tl_degeneracy.engine.degeneracy.parameters import state_dict_parameters
from tl_degeneracy.engine.degeneracy.problems import check_model
from tl_degeneracy.engine.degeneracy.sources import (
    MapSources,
    SourcesConfig,
    SourcesResult,
    resolve_positions,
)
from tl_degeneracy.engine.degeneracy.spectra import spectrum
from tl_degeneracy.engine.degeneracy.weight_maps import (
    LOGITS,
    POSITIONS,
    TOKENS,
    WeightMap,
    section_filter,
    weight_maps,
)
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import SiteStatistics, check_finite
from tl_degeneracy.engine.streaming import batch_generator, chunks, iter_batches


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
        # the gradient source backpropagates from the logits: NaN there (a NaN W_U) would
        # reach the eigensolver as a NaN K
        check_finite(logits, Site(LOGITS), batch_index)
        for name, (flat,) in acts.items():
            check_finite(flat, Site(name), batch_index)
            if name not in self.grams:
                self.grams[name] = SiteStatistics.empty(Site(name), flat.shape[-1])
            self.grams[name].add(flat.reshape(-1, flat.shape[-1]))
        self.n_tokens += tokens.numel()
        counts = torch.bincount(tokens.flatten(), minlength=len(self.token_counts))
        self.token_counts += counts.cpu()
        self.position_counts[: tokens.shape[1]] += tokens.shape[0]
        self._add_jacobians(batch_index, tokens, logits, probes)

    def _add_pattern(self, name: str, pre: Tensor) -> None:
        flat = pre.reshape(-1, pre.shape[-1])
        on, switch = (
            t.cpu() for t in switch_pattern(flat, self.act_fn, self.config.sync_tolerance)
        )
        self.pattern_bits.setdefault(name, []).append(np.packbits(on.numpy(), axis=0))
        if name not in self.eligible:
            self.eligible[name], self.any_on[name], self.all_on[name] = switch, on.any(0), on.all(0)
        else:
            self.eligible[name] &= switch
            self.any_on[name] |= on.any(0)
            self.all_on[name] &= on.all(0)

    def _add_heads(self, name: str, pattern: Float[Tensor, "batch head q k"]) -> None:
        p = pattern.to(torch.float64).transpose(0, 1).reshape(pattern.shape[1], -1)
        diff = torch.stack([(p - p[i]).abs().amax(1) for i in range(p.shape[0])]).cpu()
        prev = self.head_diff.get(name)
        self.head_diff[name] = diff if prev is None else torch.maximum(prev, diff)

    def _add_jacobians(
        self, batch_index: int, tokens: Tensor, logits: Tensor, probes: dict[str, Tensor]
    ) -> None:
        cfg = self.config
        pos = torch.tensor(resolve_positions(cfg.positions, tokens.shape[1]))
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
            readout = torch.eye(v, dtype=out.dtype, device=out.device)
            cots = exact_cotangents(readout, batch, t_out, cfg.chunk_size)
        else:
            # Rademacher signs over (position, unit): what `stochastic_cotangents` gives with an
            # identity readout, without the v × v identity (9.7 GB for a 49k vocabulary)
            gen = batch_generator(cfg.seed, "sources", batch_index)
            signs = torch.randint(0, 2, (cfg.n_probes, batch, t_out, v), generator=gen)
            signs = (signs * 2 - 1).to(out.device, out.dtype)
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
        return spectrum(k.cpu() / n_seq)


def measure_sources(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    config: SourcesConfig | None = None,
    maps: Sequence[WeightMap] | None = None,
    sections: str | Sequence[str] | None = None,
) -> SourcesResult:
    """Measure the three sources of degeneracy of a TransformerLens model on `tokens`.

    Activations are accumulated in float64 whatever the model's dtype; K is exact (one
    cotangent per output unit, batched) up to `max_exact_outputs` units, else estimated with
    Rademacher probes (its range, hence its rank, is still found once enough tokens are seen).
    `sections` (e.g. `["blocks.15.mlp"]`, or one name) measures only those sections' maps: on
    a language model, one layer's sources cost one forward and a few backward passes to that
    layer.

    Gated MLPs (`act(x W_gate) ⊙ (x W_in)`): the maps are W_gate, W_in and W_out; a neuron is
    dead when its gate is off on every token (derivative within `sync_tolerance` of 0), which
    frees its three weight vectors. Synchronised groups are not counted for gated MLPs: a
    neuron's output is the product of two pre-activations, so on tokens where a group's gates
    are on the group computes a quadratic, not a linear, map and the |S|(|S| − 1) mixing
    directions of the ungated case do not exist.

    Every parameter of the model is counted, whatever its `requires_grad` (autograd's
    bookkeeping, often switched off in interpretability notebooks, not a choice of what to
    measure; `sections` chooses that); the flags are left as they were. Gradients are switched
    on inside (the K pass needs them), so a surrounding `torch.no_grad()` does no harm. The
    model must be float32 or float64 (float64 recommended; half precision cannot resolve the
    ranks): `measure_sources(copy.deepcopy(model).double(), tokens)`.
    """
    check_model(model, "measure_sources", "sources")
    sections = [sections] if isinstance(sections, str) else sections
    config = config or SourcesConfig()
    if isinstance(tokens, Tensor) and tokens.ndim == 2:  # fail before the first forward
        resolve_positions(config.positions, tokens.shape[1])
    with torch.enable_grad():
        return _measure(model, tokens, config, maps, sections)


def _measure(
    model: nn.Module,
    tokens: Tensor,
    config: SourcesConfig,
    maps: Sequence[WeightMap] | None,
    sections: Sequence[str] | None,
) -> SourcesResult:
    maps = list(maps) if maps is not None else weight_maps(model)
    if sections is not None:
        known = list(dict.fromkeys(m.section for m in maps))
        unknown = [s for s in sections if s not in known]
        if unknown:
            raise ValueError(f"unknown sections {unknown}; the model has {known}")
        maps = [m for m in maps if m.section in sections]
    col = _Collector(model, maps, config)
    for i, batch in enumerate(iter_batches(tokens, config.batch_size, model)):
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
