"""The SGLD estimate of the local learning coefficient, localised at the trained weights.

SGLD samples the tempered posterior `∝ exp(−nβ L(w) − γ/2 ‖w − w*‖²)` with

    w ← w − (ε/2) (nβ ∇L_batch(w) + γ (w − w*)) + N(0, ε),

and the estimate is `λ̂ = nβ (E[L] − L(w*))`, `N_eff = 2λ̂` (Lau et al.; see the
degeneracy page of the docs). `β = 1/log n` unless set. Several chains give a standard error
(spread across chains) and a split R-hat; chains can be continued (`continue_llc`), which is
the same as one longer run.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from tl_degeneracy.engine.degeneracy.config import SGLDConfig, SGLDWarning
from tl_degeneracy.engine.degeneracy.diagnostics import LLCResult, split_rhat
from tl_degeneracy.engine.degeneracy.parameters import ParamFilter
from tl_degeneracy.engine.degeneracy.problems import Divergence, LLCProblem, ModelProblem


@dataclass
class ChainState:
    """Where a run's chains stopped: their weights, random streams and which are alive."""

    w: list[Tensor]
    """One weight vector per chain, or a single [chain, p] tensor for a batched problem."""
    generators: list[torch.Generator]
    """Each chain's minibatch stream (CPU), or one for a batched problem."""
    alive: Bool[Tensor, " chain"]
    noise_generators: list[torch.Generator] | None = None
    """The noise streams on the weights' device; None: the minibatch streams (CPU weights)."""

    @property
    def noise(self) -> list[torch.Generator]:
        return self.generators if self.noise_generators is None else self.noise_generators

    def copy(self) -> ChainState:
        """An independent copy (continuing a copy leaves this state where it is)."""

        def clone(g: torch.Generator) -> torch.Generator:
            out = torch.Generator(device=g.device)
            out.set_state(g.get_state())
            return out

        noise = None if self.noise_generators is None else [clone(g) for g in self.noise_generators]
        return ChainState(
            [w.clone() for w in self.w],
            [clone(g) for g in self.generators],
            self.alive.clone(),
            noise,
        )


def estimate_llc(
    problem: LLCProblem,
    config: SGLDConfig | None = None,
    progress: bool = False,
    warn: bool = True,
) -> LLCResult:
    """Run SGLD chains localised at `problem.w_star` and return λ̂ with diagnostics.

    Warns (`SGLDWarning`, unless `warn=False`; the messages are kept in the result either way)
    when chains diverge, when the split R-hat exceeds `rhat_max`, or when λ̂ < 0 (w* is not a
    local minimum, or the step is too large). `progress` shows a tqdm bar over all chains'
    steps.
    """
    cfg = config or SGLDConfig()
    if not 0 <= cfg.n_burnin < cfg.n_steps:
        raise ValueError(f"need 0 ≤ n_burnin < n_steps, got {cfg.n_burnin}, {cfg.n_steps}")
    c = cfg.n_chains
    streams = [0] if problem.batched else list(range(c))
    if problem.batched:
        w0 = [problem.w_star.detach()[None].repeat(c, 1)]
    else:
        w0 = [problem.w_star.detach().clone() for _ in range(c)]
    gens = [_chain_generator(cfg.seed, chain) for chain in streams]
    device = problem.w_star.device
    noise = None
    if device.type != "cpu":  # the noise is drawn where the weights live: reproducible per device
        noise = [_chain_generator(cfg.seed, chain, device) for chain in streams]
    state = ChainState(w0, gens, torch.ones(c, dtype=torch.bool), noise)
    return _sample(problem, cfg, state, None, cfg.n_steps, progress, warn)


def continue_llc(
    problem: LLCProblem,
    result: LLCResult,
    n_steps: int,
    n_burnin: int | None = None,
    progress: bool = False,
    warn: bool = True,
) -> LLCResult:
    """Run the chains of `result` (on the same `problem`) for `n_steps` more steps each, from
    where they stopped and with their own random streams: the same traces as one run of the
    total length. `n_burnin` (default: the same fraction of the longer chains) is dropped
    from the start of each chain."""
    if result.state is None:
        raise ValueError("this result has no chain state (a loaded result): run estimate_llc")
    total = result.config.n_steps + n_steps
    if n_burnin is None:
        n_burnin = total * result.config.n_burnin // result.config.n_steps
    cfg = replace(result.config, n_steps=total, n_burnin=n_burnin)
    if not 0 <= cfg.n_burnin < cfg.n_steps:
        raise ValueError(f"need 0 ≤ n_burnin < n_steps, got {cfg.n_burnin}, {cfg.n_steps}")
    return _sample(problem, cfg, result.state.copy(), result, n_steps, progress, warn)


def _sample(
    problem: LLCProblem,
    cfg: SGLDConfig,
    state: ChainState,
    before: LLCResult | None,
    n_steps: int,
    progress: bool,
    warn: bool,
) -> LLCResult:
    nbeta = cfg.nbeta(problem.sample_size)
    start = time.perf_counter()
    _keep_heap_memory()
    desc = f"SGLD ε={cfg.step_size:g} nβ={nbeta:.4g} ({problem.n_params:,} parameters)"
    with tqdm(total=cfg.n_chains * n_steps, desc=desc, disable=not progress) as bar:
        if problem.batched:
            traces, diverged, w = _run_batched(problem, cfg, nbeta, state, n_steps, bar)
            state = ChainState([w], state.generators, ~diverged, state.noise_generators)
        else:
            runs = []
            streams = zip(state.w, state.generators, state.noise)
            for chain, (w, gen, noise_gen) in enumerate(streams):
                if bool(state.alive[chain]):
                    runs.append(_run_chain(problem, cfg, nbeta, w, gen, noise_gen, n_steps, bar))
                else:  # diverged in an earlier run: stays stopped
                    runs.append((torch.full((n_steps,), math.nan, dtype=torch.float64), True))
                    bar.update(n_steps)
            traces = torch.stack([r[0] for r in runs])
            diverged = torch.tensor([r[1] for r in runs])
            state = ChainState(state.w, state.generators, ~diverged, state.noise_generators)
    seconds = time.perf_counter() - start
    if before is not None:
        traces = torch.cat([before.loss_traces, traces], 1)
        seconds += before.seconds
    result = _summarise(problem, cfg, nbeta, traces, diverged, seconds, warn)
    result.state = state
    return result


def _keep_heap_memory() -> None:
    """Free one 8 MiB buffer, so that the C allocator keeps the memory of every step's tensors.

    glibc gives memory at the top of its heap back to the system once more than its trim
    threshold (at first 128 KiB) is free, and a step's tensors then fault their pages in again
    on every step; it raises that threshold when a memory-mapped chunk is freed. Whether that
    has happened depends on what the process allocated before: measured on modular addition,
    ~220 page faults per step and 9.4 ms per step without, none and 7.9 ms with. Other
    allocators ignore it; the buffer is freed at once."""
    torch.empty(1 << 21, dtype=torch.float32)


MINIBATCH_BLOCK = 16
"""Steps whose minibatch indices are drawn and moved to the problem's device together."""


def _chain_generator(seed: int, chain: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A chain's random stream on `device`."""
    return torch.Generator(device=device).manual_seed(1_000_003 * seed + chain)


def _step_coefficients(cfg: SGLDConfig, nbeta: float) -> tuple[float, float, float]:
    eps = cfg.step_size
    return eps * cfg.gamma / 2, eps * nbeta / 2, math.sqrt(eps)


def _scaled_step(
    problem: LLCProblem, cfg: SGLDConfig, nbeta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-entry coefficients of the preconditioned step (`SGLDConfig.step_scales`)."""
    eps = cfg.step_size * problem.step_vector(cfg.step_scales)
    return eps * cfg.gamma / 2, eps * nbeta / 2, eps.sqrt()


def _run_chain(
    problem: LLCProblem,
    cfg: SGLDConfig,
    nbeta: float,
    w: Tensor,
    gen: torch.Generator,
    noise_gen: torch.Generator,
    n_steps: int,
    bar: tqdm,
) -> tuple[Tensor, bool]:
    """`n_steps` steps of one chain from `w` (updated in place); minibatches from `gen` (CPU,
    on `problem.index_device` when used), noise from `noise_gen` (on `w`'s device)."""
    w_star = problem.w_star.detach()
    noise = torch.empty_like(w)
    pull, drift, scale = _step_coefficients(cfg, nbeta)
    scaled = _scaled_step(problem, cfg, nbeta) if cfg.step_scales else None
    limit = problem.loss_at_star + cfg.explode_factor * problem.n_params / nbeta
    full = cfg.batch_size >= problem.n
    trace = torch.full((n_steps,), float("nan"), dtype=torch.float64)
    values = torch.empty(n_steps, dtype=w.dtype, device=w.device)
    diverged = False
    done = 0
    # minibatches drawn for several steps at once and moved to the problem's device in one
    # copy (each copy makes a GPU wait); the same draws as one per step, unless the noise comes
    # from the same stream (CPU weights), which then needs its draws in between
    per_copy = MINIBATCH_BLOCK if noise_gen is not gen else 1
    with problem.bind(w):
        all_idx = torch.arange(problem.n, device=problem.index_device)
        block = all_idx[None]
        for t in range(n_steps):
            if not full and t % per_copy == 0:
                rows = (min(per_copy, n_steps - t), cfg.batch_size)
                block = torch.randint(0, problem.n, rows, generator=gen)
                block = block.to(problem.index_device)
            idx = all_idx if full else block[t % per_copy]
            loss, grad = problem.value_and_grad(w, idx)
            values[t] = loss
            if t % 16 == 15 or t == n_steps - 1:
                # check for divergence in blocks, so that the hot loop does not synchronise
                block = values[t - t % 16 : t + 1]
                if not bool(torch.isfinite(block).all()) or bool((block > limit).any()):
                    bad = t - t % 16 + int((~torch.isfinite(block) | (block > limit)).nonzero()[0])
                    trace[:bad] = values[:bad].to("cpu", torch.float64)
                    diverged = True
                    break
            with torch.no_grad():
                noise.normal_(generator=noise_gen)
                if scaled is None:
                    w.mul_(1 - pull).add_(w_star, alpha=pull).add_(grad, alpha=-drift)
                    w.add_(noise, alpha=scale)
                else:
                    pulls, drifts, scales = scaled
                    w.sub_(pulls * (w - w_star) + drifts * grad - scales * noise)
            bar.update()
            done += 1
        else:
            trace[:] = values.to("cpu", torch.float64)
    bar.update(n_steps - done)  # a diverged chain's remaining steps
    return trace, diverged


def _run_batched(
    problem: LLCProblem,
    cfg: SGLDConfig,
    nbeta: float,
    state: ChainState,
    n_steps: int,
    bar: tqdm,
) -> tuple[Tensor, Tensor, Tensor]:
    """`n_steps` steps of all chains at once; returns traces, diverged flags and the weights."""
    (gen,) = state.generators
    (noise_gen,) = state.noise
    (w,) = state.w
    c = cfg.n_chains
    w_star = problem.w_star.detach()[None]
    noise = torch.empty_like(w)
    coefficients: tuple[Tensor | float, ...] = _step_coefficients(cfg, nbeta)
    if cfg.step_scales:
        coefficients = _scaled_step(problem, cfg, nbeta)
    pull, drift, scale = coefficients
    limit = problem.loss_at_star + cfg.explode_factor * problem.n_params / nbeta
    full = cfg.batch_size >= problem.n
    values = torch.empty(n_steps, c, dtype=torch.float64, device=w.device)
    dead_before = ~state.alive
    alive = state.alive.to(w.device, copy=True)
    # as in `_run_chain`: minibatches of several steps drawn and copied together when the noise
    # has its own stream. A diverged chain is stopped by a mask (it stays at w*; its trace is
    # cut where it first diverged, below), so that no step reads the device; on the CPU, where
    # reading a flag waits for nothing, the mask is skipped while every chain is alive
    per_copy = MINIBATCH_BLOCK if noise_gen is not gen else 1
    masked = w.device.type != "cpu" or not bool(alive.all())
    block = torch.arange(problem.n, device=problem.index_device).expand(1, c, problem.n)
    for t in range(n_steps):
        if not full and t % per_copy == 0:
            rows = (min(per_copy, n_steps - t), c, cfg.batch_size)
            block = torch.randint(0, problem.n, rows, generator=gen).to(problem.index_device)
        idx = block[0 if full else t % per_copy]
        loss, grad = problem.value_and_grad(w, idx)
        values[t] = loss.to(torch.float64)
        ok = torch.isfinite(loss) & (loss <= limit)
        noise.normal_(generator=noise_gen)
        w = w * (1 - pull) + w_star * pull - drift * grad + scale * noise
        if masked or not bool(ok.all()):
            masked = True
            alive &= ok
            w = torch.where(alive[:, None], w, w_star)
        bar.update(c)
    traces = values.T.contiguous().cpu()
    diverged = (~alive).cpu()
    traces[dead_before] = float("nan")
    for i in (diverged & ~dead_before).nonzero().flatten().tolist():
        first = int((~torch.isfinite(traces[i]) | (traces[i] > limit)).nonzero()[0])
        traces[i, first:] = float("nan")
    return traces, diverged, w


def _summarise(
    problem: LLCProblem,
    cfg: SGLDConfig,
    nbeta: float,
    traces: Tensor,
    diverged: Tensor,
    seconds: float,
    warn: bool = True,
) -> LLCResult:
    post = traces[:, cfg.n_burnin :]
    per_chain = nbeta * (post.mean(1) - problem.loss_at_star)
    ok = ~diverged
    messages: list[str] = []
    if bool(diverged.any()):
        messages.append(
            f"{int(diverged.sum())} of {len(diverged)} SGLD chains diverged (loss not finite or "
            f"nβ·(L − L*) above {cfg.explode_factor:g} × {problem.n_params} parameters) at step "
            f"size ε = {cfg.step_size:g}: lower step_size (try {cfg.step_size / 10:g}) or raise "
            f"gamma; λ̂ uses the {int(ok.sum())} remaining chains"
        )
    good = per_chain[ok]
    llc = float(good.mean()) if len(good) else float("nan")
    se = float(good.std() / math.sqrt(len(good))) if len(good) > 1 else float("nan")
    rhat = split_rhat(post[ok]) if int(ok.sum()) >= 1 else float("nan")
    if math.isfinite(rhat) and rhat > cfg.rhat_max:
        messages.append(
            f"SGLD chains did not converge: split R-hat of the loss traces is {rhat:.3f} > "
            f"{cfg.rhat_max:g} (ε = {cfg.step_size:g}, γ = {cfg.gamma:g}); the loss is still "
            "drifting or the chains disagree: run more steps (n_steps, n_burnin), raise gamma "
            "or lower step_size"
        )
    if math.isfinite(llc) and llc < 0:
        messages.append(
            f"negative LLC estimate λ̂ = {llc:.3g}: w* is not a local minimum of the loss, or "
            f"the step size ε = {cfg.step_size:g} is too large"
        )
    if warn:
        for msg in messages:
            warnings.warn(msg, SGLDWarning, stacklevel=4)
    return LLCResult(
        llc=llc,
        llc_se=se,
        llc_per_chain=per_chain,
        loss_traces=traces,
        diverged=diverged,
        rhat=rhat,
        loss_at_star=problem.loss_at_star,
        n=problem.n,
        nbeta=nbeta,
        n_params=problem.n_params,
        config=cfg,
        seconds=seconds,
        param_names=tuple(problem.param_names),
        messages=messages,
    )


def model_llc(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    config: SGLDConfig | None = None,
    params: ParamFilter = None,
    positions: Literal["last", "all"] | tuple[int, ...] = "last",
    divergence: Divergence = "kl",
    progress: bool = False,
) -> LLCResult:
    """λ̂ of a TransformerLens model's behavioural loss on `tokens`, over the parameters chosen
    by `params` (all by default). Runs in the model's dtype; the model is left unchanged."""
    problem = ModelProblem(model, tokens, params, positions, divergence)
    return estimate_llc(problem, config, progress)
