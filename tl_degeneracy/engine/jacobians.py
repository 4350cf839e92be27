"""The Jacobian Gram `M'` of a section (method.md §3 step 3, §4).

`M' = (1/(N·P_in)) Σ_b Σ_{t,i} Σ_s J_{b,t,i,s,:}ᵀ J_{b,t,i,s,:}`, with J the Jacobian of the
output site's features `(F(f) − μ) C_out` with respect to the input site's raw activation.
A cotangent `c` on the output gives `Jᵀc` by one backward pass, so

- exact: one cotangent per output (position t, feature i), batched with `is_grads_batched`
  in chunks (never a Python loop over units);
- stochastic (Hutchinson): Rademacher cotangents over (t, i), over t only or over i only,
  `E[g gᵀ] = Σ JᵀJ`, one backward per source;
- closed forms where the section has structure: a ReLU MLP with residual and no norm
  (`J = I + W_in D W_out`, only the neurons' co-activation Gram is needed), a linear
  unembedding (constant Jacobian) and a LayerNorm-free attention block
  (`attention_gram.py`: value, key and query paths, head-sized sums only).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.attention_gram import attention_jacobian_gram
from tl_degeneracy.engine.compat import (
    StopForward,
    frozen_parameters,
    hooked_state_dict,
    model_cfg,
    run_with_hooks,
)
from tl_degeneracy.engine.plain_forward import PlainBlock, is_plain
from tl_degeneracy.engine.sections import Section, section_with_input
from tl_degeneracy.engine.sites import LOGITS
from tl_degeneracy.engine.statistics import StatisticsMismatchError, check_finite
from tl_degeneracy.engine.streaming import (
    Checkpointing,
    EmptyDataError,
    batch_generator,
    chunks,
    iter_batches,
    stream,
)

Method = Literal["auto", "exact", "stochastic"]
SourcesOver = Literal["both", "positions", "units"]


@dataclass(frozen=True)
class JacobianConfig:
    """How `M'` is estimated."""

    method: Method = "auto"
    """'auto': a closed form where the section has one, else exact; 'exact'; 'stochastic'."""
    n_sources: int = 4
    """Rademacher sources per data point (stochastic)."""
    sources_over: SourcesOver = "both"
    """Draw random signs over output positions and units ('both'), positions only (exact over
    units) or units only (exact over positions)."""
    chunk_size: int = 32
    """Cotangents per batched backward pass (memory ∝ chunk · batch · P_in · d_in)."""
    seed: int = 0


@dataclass
class JacobianGram:
    """`M'` as a float64 sum and a count (mergeable), with a split-half error estimate."""

    section: Section
    total: Float[Tensor, "d d"]
    count: int
    halves: Float[Tensor, "2 d d"]
    method: str

    @property
    def matrix(self) -> Float[Tensor, "d d"]:
        if self.count == 0:
            raise EmptyDataError(f"section {self.section.name}: no tokens were accumulated")
        return self.total / self.count

    @property
    def split_half_rel_error(self) -> float:
        """‖M'_even − M'_odd‖ / ‖M'_even + M'_odd‖ over batches: the relative standard error
        of `matrix` from data and source sampling (0 for a single batch)."""
        a, b = self.halves
        denom = float(torch.linalg.norm(a + b))
        return float(torch.linalg.norm(a - b)) / denom if denom > 0 else 0.0

    def merge(self, other: JacobianGram) -> JacobianGram:
        if other.section != self.section:
            raise StatisticsMismatchError(
                f"cannot merge Jacobian Grams of different sections: {self.section.name} vs "
                f"{other.section.name}"
            )
        if other.total.shape != self.total.shape:
            raise StatisticsMismatchError(
                f"section {self.section.name}: shapes {tuple(self.total.shape)} vs "
                f"{tuple(other.total.shape)} (field 'total')"
            )
        return JacobianGram(
            self.section,
            self.total + other.total,
            self.count + other.count,
            self.halves + other.halves,
            self.method,
        )


# ---------------------------------------------------------------------------------------------
# Cotangent sets
# ---------------------------------------------------------------------------------------------


def output_readout(out_basis: Tensor | None, d_out: int, dtype: torch.dtype) -> Tensor:
    """Rows are the raw-space cotangents of the output features: `C_outᵀ`, or I for raw
    coordinates. Shape [k_out, d_out]."""
    if out_basis is None:
        return torch.eye(d_out, dtype=dtype)
    return out_basis.T.to(dtype)


def exact_cotangents(
    readout: Tensor, batch: int, n_pos: int, chunk: int
) -> Iterator[tuple[Tensor, float]]:
    """One-hot cotangents over (output position, output feature), `chunk` at a time."""
    k, d = readout.shape
    units = [(t, i) for t in range(n_pos) for i in range(k)]
    for sl in chunks(len(units), chunk):
        part = units[sl]
        v = readout.new_zeros(len(part), n_pos, d)
        ts = torch.tensor([t for t, _ in part])
        v[torch.arange(len(part)), ts] = readout[torch.tensor([i for _, i in part])]
        yield v[:, None].expand(len(part), batch, n_pos, d), 1.0


def stochastic_cotangents(
    readout: Tensor,
    batch: int,
    n_pos: int,
    n_sources: int,
    over: SourcesOver,
    gen: torch.Generator,
    chunk: int,
) -> Iterator[tuple[Tensor, float]]:
    """Rademacher cotangents with weight 1/R, so that Σ w g gᵀ is unbiased for Σ JᵀJ."""
    k, d = readout.shape
    weight = 1.0 / n_sources

    def signs(*shape: int) -> Tensor:
        return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(readout.dtype)

    if over == "both":
        r = signs(n_sources, batch, n_pos, k)
        v = r @ readout
    elif over == "positions":
        r = signs(n_sources, k, batch, n_pos)
        v = (r[..., None] * readout[None, :, None, None, :]).reshape(-1, batch, n_pos, d)
    elif over == "units":
        r = signs(n_sources, n_pos, batch, k) @ readout
        v = readout.new_zeros(n_sources, n_pos, batch, n_pos, d)
        for t in range(n_pos):
            v[:, t, :, t] = r[:, t]
        v = v.reshape(-1, batch, n_pos, d)
    else:
        raise ValueError(f"sources_over must be 'both', 'positions' or 'units', got {over!r}")
    for sl in chunks(v.shape[0], chunk):
        yield v[sl], weight


def vjp_batches(
    x: Tensor, y: Tensor, cotangents: Iterable[tuple[Tensor, float]]
) -> Iterator[tuple[Tensor, float]]:
    """`Jᵀv` for each chunk of cotangents, batched over the chunk with one backward pass."""
    for v, w in cotangents:
        (g,) = torch.autograd.grad(y, x, v.to(y.dtype), is_grads_batched=True, retain_graph=True)
        yield g, w


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


def closed_form_kind(model: nn.Module, section: Section) -> str | None:
    """'relu_mlp', 'linear_unembed' or 'attention' where `M'` has a closed form, else None."""
    cfg = model_cfg(model)
    plain = getattr(cfg, "normalization_type", None) is None
    inp, out = section.inp.hook, section.out.hook
    last = cfg.n_layers - 1
    if (
        plain
        and out == LOGITS
        and inp in (f"blocks.{last}.hook_resid_post",)
        and section.inp.positions == section.out.positions
    ):
        return "linear_unembed"
    if (
        plain
        and str(getattr(cfg, "act_fn", "")) == "relu"
        and not getattr(cfg, "gated_mlp", False)
        and not getattr(cfg, "attn_only", False)
        and inp.endswith("hook_resid_mid")
        and out == inp.replace("hook_resid_mid", "hook_resid_post")
    ):
        return "relu_mlp"
    if (
        plain
        and inp.endswith("hook_resid_pre")
        and out == inp.replace("hook_resid_pre", "hook_resid_mid")
        and is_plain(model)
    ):
        return "attention"
    return None


def _matched_positions(section: Section, n_pos: int) -> tuple[Tensor, Tensor]:
    """Indices (into the input's and output's selections) of positions present in both."""
    pin, pout = section.inp.index(n_pos).tolist(), section.out.index(n_pos).tolist()
    common = [p for p in pin if p in pout]
    return torch.tensor([pin.index(p) for p in common]), torch.tensor(
        [pout.index(p) for p in common]
    )


class _JacobianAccumulator:
    def __init__(
        self,
        model: nn.Module,
        section: Section,
        out_basis: Tensor | None,
        config: JacobianConfig,
    ):
        self.model = model
        self.section = section
        self.out_basis = out_basis
        self.config = config
        self.kind = closed_form_kind(model, section) if config.method == "auto" else None
        self.total: Tensor | None = None
        self.halves: Tensor | None = None
        self.count = 0
        if self.kind == "relu_mlp":
            layer = int(section.inp.hook.split(".")[1])
            sd = hooked_state_dict(model)
            self.w_in = sd[f"blocks.{layer}.mlp.W_in"].to(torch.float64)
            self.w_out = sd[f"blocks.{layer}.mlp.W_out"].to(torch.float64)
            self.pre_hook = f"blocks.{layer}.mlp.hook_pre"
            self.m_sum = torch.zeros(self.w_in.shape[1], dtype=torch.float64)
            self.mm_sum = torch.zeros(self.w_in.shape[1], self.w_in.shape[1], dtype=torch.float64)
            self.n_matched = 0
        if self.kind == "linear_unembed":
            self.n_matched = 0
        if self.kind == "attention":
            self.layer = int(section.inp.hook.split(".")[1])
            block = PlainBlock.of(model, self.layer)
            assert block is not None  # closed_form_kind checked is_plain
            self.attn = block

    @property
    def method(self) -> str:
        if self.kind is not None:
            return f"closed_form:{self.kind}"
        return "exact" if self.config.method in ("auto", "exact") else "stochastic"

    def _add(self, batch_index: int, m: Tensor, n: int) -> None:
        if self.total is None:
            self.total = torch.zeros_like(m)
            self.halves = torch.zeros(2, *m.shape, dtype=m.dtype)
        self.total += m
        assert self.halves is not None
        self.halves[batch_index % 2] += m
        self.count += n

    def update(self, batch_index: int, tokens: Tensor) -> None:
        n_pos = tokens.shape[1]
        n_in = tokens.shape[0] * self.section.inp.n_positions(n_pos)
        if self.kind == "attention":
            self._update_attention(batch_index, tokens, n_in)
            return
        if self.kind is not None:
            self._update_closed_form(batch_index, tokens, n_in)
            return
        with frozen_parameters(self.model):
            x, y = section_with_input(self.model, tokens, self.section)
        check_finite(y.detach(), self.section.out, batch_index)
        readout = output_readout(self.out_basis, y.shape[-1], y.dtype)
        batch, t_out = y.shape[0], y.shape[1]
        cfg = self.config
        if cfg.method in ("auto", "exact"):
            cots = exact_cotangents(readout, batch, t_out, cfg.chunk_size)
        else:
            gen = batch_generator(cfg.seed, self.section.name, batch_index)
            cots = stochastic_cotangents(
                readout, batch, t_out, cfg.n_sources, cfg.sources_over, gen, cfg.chunk_size
            )
        d_in = x.shape[-1]
        m = torch.zeros(d_in, d_in, dtype=torch.float64)
        for g, w in vjp_batches(x, y, cots):
            flat = g.reshape(-1, d_in).to(torch.float64)
            m += w * (flat.T @ flat)
        self._add(batch_index, m, n_in)

    def _update_attention(self, batch_index: int, tokens: Tensor, n_in: int) -> None:
        store: dict[str, Tensor] = {}

        def read(act: Tensor, hook=None) -> None:
            store["x"] = act.detach()
            raise StopForward

        with torch.no_grad(), frozen_parameters(self.model):
            run_with_hooks(self.model, tokens, [(self.section.inp.hook, read)], stop_early=True)
        x = store["x"]
        check_finite(self.section.inp.select(x), self.section.inp, batch_index)
        n_pos = tokens.shape[1]
        k = self._readout_gram(x.shape[-1])
        pin, pout = self.section.inp.index(n_pos), self.section.out.index(n_pos)
        self._add(batch_index, attention_jacobian_gram(x, self.attn, k, pin, pout), n_in)

    def _update_closed_form(self, batch_index: int, tokens: Tensor, n_in: int) -> None:
        n_pos = tokens.shape[1]
        _, out_idx = _matched_positions(self.section, n_pos)
        positions = self.section.out.index(n_pos)[out_idx]
        if self.kind == "linear_unembed":
            self.n_matched += tokens.shape[0] * len(positions)
            self.count += n_in
            return
        store: dict[str, Tensor] = {}

        def read(act: Tensor, hook=None) -> None:
            store["mask"] = (act[:, positions] > 0).reshape(-1, act.shape[-1]).to(torch.float64)
            raise StopForward

        with torch.no_grad(), frozen_parameters(self.model):
            run_with_hooks(self.model, tokens, [(self.pre_hook, read)], stop_early=True)
        mask = store["mask"]
        self.m_sum += mask.sum(0)
        self.mm_sum += mask.T @ mask
        self.n_matched += mask.shape[0]
        self.count += n_in

    def finalize(self) -> JacobianGram:
        if self.kind in ("relu_mlp", "linear_unembed"):
            self.total = self._closed_form_total()
            self.halves = torch.stack([self.total / 2, self.total / 2])
        if self.total is None or self.count == 0:
            raise EmptyDataError(f"section {self.section.name}: no data")
        assert self.halves is not None
        return JacobianGram(self.section, self.total, self.count, self.halves, self.method)

    def _readout_gram(self, d_out: int) -> Tensor:
        """K = C_out C_outᵀ, the output features' metric on raw output space."""
        if self.out_basis is None:
            return torch.eye(d_out, dtype=torch.float64)
        c = self.out_basis.to(torch.float64)
        return c @ c.T

    def _closed_form_total(self) -> Tensor:
        if self.kind == "linear_unembed":
            w_u = hooked_state_dict(self.model)["unembed.W_U"].to(torch.float64)
            k = self._readout_gram(w_u.shape[1])
            return self.n_matched * (w_u @ k @ w_u.T)
        k = self._readout_gram(self.w_in.shape[0])
        a = self.w_in * self.m_sum  # W_in diag(Σm)
        cross = a @ (self.w_out @ k)
        inner = (self.w_out @ k @ self.w_out.T) * self.mm_sum
        return self.n_matched * k + cross + cross.T + self.w_in @ inner @ self.w_in.T

    def state_dict(self) -> dict[str, Tensor]:
        state = {"count": torch.tensor([self.count])}
        if self.kind == "relu_mlp":
            state |= {"m_sum": self.m_sum, "mm_sum": self.mm_sum}
        if self.kind in ("relu_mlp", "linear_unembed"):
            state["n_matched"] = torch.tensor([self.n_matched])
        elif self.total is not None:
            assert self.halves is not None
            state |= {"total": self.total, "halves": self.halves}
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.count = int(state["count"][0])
        if "m_sum" in state:
            self.m_sum, self.mm_sum = state["m_sum"], state["mm_sum"]
        if "n_matched" in state:
            self.n_matched = int(state["n_matched"][0])
        if "total" in state:
            self.total, self.halves = state["total"], state["halves"]


def jacobian_gram(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    section: Section,
    out_basis: Float[Tensor, "d_out k_out"] | None = None,
    config: JacobianConfig | None = None,
    batch_size: int = 256,
    checkpoint: Checkpointing | None = None,
    progress: bool = True,
) -> JacobianGram:
    """Stream `M'` of `section` over the data: the Gram of Jacobians of the output features
    `(F(f) − μ) out_basis` (raw output coordinates when `out_basis` is None)."""
    config = config or JacobianConfig()
    acc = _JacobianAccumulator(model, section, out_basis, config)
    stream(
        acc,
        iter_batches(tokens, batch_size),
        f"M' {section.name} ({acc.method})",
        checkpoint,
        key=f"jacobian.{section.name}",
        progress=progress,
    )
    return acc.finalize()
