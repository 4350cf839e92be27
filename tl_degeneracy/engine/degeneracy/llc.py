"""Local learning coefficient (LLC) by SGLD localised at trained weights (docs/degeneracy.md).

The behavioural loss `L_B(w) = (1/n) Σ_x D(f(x; w), f(x; w*))` is zero at the trained weights
`w*`. SGLD samples the localised tempered posterior `∝ exp(−nβ L(w) − γ/2 ‖w − w*‖²)` with

    w ← w − (ε/2) (nβ ∇L_batch(w) + γ (w − w*)) + N(0, ε),

and the estimate is `λ̂ = nβ (E[L] − L(w*))`, `N_eff = 2λ̂` (Lau et al.; Paper A). `β = 1/log n`
unless set. Several chains give a standard error (spread across chains) and a split R-hat.

Speed: the parameters are one flat vector. For a TransformerLens model the model's own
parameters are bound to views of that vector (and their `.grad` to views of one flat gradient),
so a step is one forward, one backward and one fused in-place update, with no per-parameter
Python work and no `functional_call` (which does not restore a `TransformerBridge` correctly).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from tl_degeneracy.engine.compat import hooked_state_dict, is_bridge
from tl_degeneracy.engine.structures.plain import PlainModel, is_plain

ParamFilter = None | str | Sequence[str] | Callable[[str], bool]
"""Which parameters to sample: None (all), a regex searched in each name, a list of exact
names, or a predicate on the name."""

LossFn = Callable[[Tensor, Tensor], Tensor]


class SGLDWarning(UserWarning):
    """SGLD chains diverged or did not converge: the estimate is not trustworthy."""


@dataclass(frozen=True)
class SGLDConfig:
    """Hyperparameters of the SGLD estimate of the LLC."""

    step_size: float = 1e-4
    """ε: SGLD step size (the noise has variance ε)."""
    gamma: float = 100.0
    """γ: strength of the localisation term γ/2 ‖w − w*‖²."""
    beta: float | None = None
    """Inverse temperature per sample; the posterior uses nβ. None: β = 1/log n."""
    n_chains: int = 4
    n_steps: int = 400
    """Steps per chain, burn-in included."""
    n_burnin: int = 100
    """Steps dropped from the start of each chain before averaging."""
    batch_size: int = 512
    """Minibatch size (the whole data set when ≥ n)."""
    seed: int = 0
    rhat_max: float = 1.1
    """Warn when the split R-hat of the loss traces exceeds this."""
    explode_factor: float = 10.0
    """A chain has diverged when nβ (L − L*) exceeds this times the number of parameters
    (a regular minimum has nβ (L − L*) ≈ d/2), or the loss is not finite."""

    def nbeta(self, n: int) -> float:
        """nβ for a data set of n points."""
        beta = self.beta if self.beta is not None else 1.0 / math.log(n)
        return n * beta


# ---------------------------------------------------------------------------------------------
# Problems: a loss of a flat parameter vector over indexed data
# ---------------------------------------------------------------------------------------------


class LLCProblem:
    """A loss `L(w)` of a flat parameter vector, averaged over n indexed data points.

    Subclasses give `value_and_grad(w, idx)`: the mean loss over the data points `idx` and its
    gradient. `bind(w)` is entered once per chain (a model binds its parameters to `w`).
    """

    w_star: Float[Tensor, " p"]
    n: int
    loss_at_star: float = 0.0
    param_names: tuple[str, ...] = ()
    batched: bool = False
    """True when `value_and_grad` takes all chains at once: w [chain, p], idx [chain, batch]."""

    @property
    def n_params(self) -> int:
        return int(self.w_star.numel())

    @contextmanager
    def bind(self, w: Tensor) -> Iterator[None]:
        yield

    def value_and_grad(self, w: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class FunctionProblem(LLCProblem):
    """A loss given as a function `loss_fn(w, idx)` of a flat parameter vector (autograd).

    With `batched=True` the function takes w of shape [chain, p] and idx [chain, batch] and
    returns one loss per chain, so that all chains advance in one call (small models).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        w_star: Float[Tensor, " p"],
        n: int,
        loss_at_star: float | None = None,
        batched: bool = False,
        param_names: Sequence[str] = (),
    ):
        self.loss_fn = loss_fn
        self.w_star = w_star.detach().reshape(-1)
        self.n = int(n)
        self.batched = batched
        self.param_names = tuple(param_names)
        if loss_at_star is None:
            with torch.no_grad():
                idx = torch.arange(self.n)
                w = self.w_star[None] if batched else self.w_star
                loss_at_star = float(loss_fn(w, idx[None] if batched else idx).reshape(-1)[0])
        self.loss_at_star = float(loss_at_star)

    def value_and_grad(self, w: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            w_ = w.detach().requires_grad_(True)
            loss = self.loss_fn(w_, idx)
            (grad,) = torch.autograd.grad(loss.sum(), w_)
        return loss.detach(), grad


# ---------------------------------------------------------------------------------------------
# The behavioural loss of a TransformerLens model
# ---------------------------------------------------------------------------------------------


def matches(params: ParamFilter, name: str) -> bool:
    """True when the parameter `name` is chosen by the filter `params`."""
    if params is None:
        return True
    if isinstance(params, str):
        return re.search(params, name) is not None
    if callable(params):
        return bool(params(name))
    return name in params


def select_parameters(model: nn.Module, params: ParamFilter = None) -> list[str]:
    """Names of the model's parameters chosen by `params` (see `ParamFilter`), in model order.

    Names are those of `model.state_dict()` (HookedTransformer names, or the Bridge's
    `blocks.0.attn.q.weight` style), so a filter such as `"^blocks.0.mlp."` (a regex) selects one
    MLP on either API.
    """
    names = list(state_dict_parameters(model))
    if params is not None and not isinstance(params, str) and not callable(params):
        unknown = [n for n in params if n not in names]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown[:5]}; the model has {names}")
    chosen = [n for n in names if matches(params, n)]
    if not chosen:
        raise ValueError(f"the filter {params!r} selects no parameter; the model has {names}")
    return chosen


def state_dict_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters keyed by their state-dict name (one entry per tensor, aliases dropped)."""
    by_ptr = {p.data_ptr(): p for p in model.parameters()}
    out: dict[str, nn.Parameter] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        p = by_ptr.pop(t.data_ptr(), None) if isinstance(t, nn.Parameter) else None
        if p is not None:
            out[name] = p
    return out


Divergence = Literal["kl", "mse"]


class ModelProblem(LLCProblem):
    """The behavioural loss of a TransformerLens model on `tokens`, as a function of the
    parameters chosen by `params` (the others stay at their trained values).

    `divergence`: "kl" — KL(p(·|x; w*) ‖ p(·|x; w)) of the softmax of the logits, for language
    models and classifiers; "mse" — ½‖f(x; w) − f(x; w*)‖² of the logits. Averaged over the
    selected `positions` ("last", "all" or a tuple of indices) of each sequence; n is the number
    of sequences. Reference outputs are cached when they hold at most `cache_limit` numbers,
    otherwise recomputed at w* for every batch.

    Speed: a plain model (no normalisation, see `plain_forward.is_plain`; modular addition)
    runs its written-out forward `PlainModel` on either API, the last block at the read
    positions only (`fast=False` runs the model's own forward instead; tests hold the two
    equal). Otherwise, when only some positions are read, a HookedTransformer runs its last
    MLP and the unembedding at those positions only (the residual stream is cut to them after
    the last attention layer).
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: Int[Tensor, "n pos"],
        params: ParamFilter = None,
        positions: Literal["last", "all"] | tuple[int, ...] = "last",
        divergence: Divergence = "kl",
        cache_limit: int = 50_000_000,
        chunk_size: int = 1024,
        fast: bool = True,
    ):
        if divergence not in ("kl", "mse"):
            raise ValueError(f"divergence must be 'kl' or 'mse', got {divergence!r}")
        self.model: Any = model  # a HookedTransformer or TransformerBridge
        self.tokens = tokens
        self.divergence = divergence
        named = state_dict_parameters(model)
        self.param_names = tuple(select_parameters(model, params))
        self.params = [named[n] for n in self.param_names]
        self.others = [p for n, p in named.items() if n not in self.param_names]
        self.w_star = torch.cat([p.detach().reshape(-1) for p in self.params]).clone()
        self.n = int(tokens.shape[0])
        self.loss_at_star = 0.0
        n_pos = tokens.shape[1]
        if positions == "last":
            self.pos = torch.tensor([n_pos - 1])
        elif positions == "all":
            self.pos = torch.arange(n_pos)
        else:
            self.pos = torch.tensor([p % n_pos for p in positions])
        self.chunk_size = chunk_size
        self.plain = fast and is_plain(model)
        self.hooks: list[tuple[str, Callable]] = []
        cfg: Any = model.cfg
        hook_dict: Any = model.hook_dict
        last = f"blocks.{cfg.n_layers - 1}"
        cut = next(
            (h for h in (f"{last}.hook_resid_mid", f"{last}.hook_resid_post") if h in hook_dict),
            None,
        )
        if len(self.pos) < n_pos and not is_bridge(model) and cut is not None and not self.plain:
            pos = self.pos
            self.hooks = [(cut, lambda act, hook=None: act[:, pos])]
        d_out = cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) > 0 else None
        d_out = d_out or cfg.d_vocab
        self.reference: Tensor | None = None
        if self.n * len(self.pos) * d_out <= cache_limit:
            self.reference = torch.cat(
                [self._reference(tokens[sl]) for sl in _chunks(self.n, chunk_size)]
            )
        self.start_layer, self.prefix = self._cache_prefix(cache_limit, chunk_size)

    def _cache_prefix(self, cache_limit: int, chunk_size: int) -> tuple[int, Tensor | None]:
        """When only blocks ≥ L move (HookedTransformer), the residual stream entering block L
        is the same at every SGLD step: cache it once and start each forward there
        (`start_at_layer`). On a language model restricted to one late block this skips most
        of the forward and backward pass."""
        layers = [re.match(r"^blocks\.(\d+)\.", n) for n in self.param_names]
        if is_bridge(self.model) or not layers or not all(layers):
            return 0, None
        start = min(int(m.group(1)) for m in layers if m is not None)
        if start == 0 or self.tokens.numel() * self.model.cfg.d_model > cache_limit:
            return 0, None
        with torch.no_grad():  # stop_at_layer=L returns the residual stream entering block L
            parts = [
                self.model(self.tokens[sl], stop_at_layer=start)
                for sl in _chunks(self.n, chunk_size)
            ]
        return start, torch.cat(parts)

    def _outputs(self, tokens: Tensor, idx: Tensor | None = None) -> Tensor:
        """Logits at the selected positions (from the cached residual stream when there is
        one and the data points `idx` are given). A plain model (`is_plain`) runs its
        written-out forward (`PlainModel`), differentiable in the bound parameters."""
        prefix: Tensor | None = getattr(self, "prefix", None)  # None while it is being built
        if self.plain:
            plain = PlainModel.of(
                self.model, hooked_state_dict(self.model, keep_vars=True), dtype=None
            )
            assert plain is not None
            if idx is not None and prefix is not None:
                return plain.logits(None, self.pos, prefix[idx], self.start_layer)
            return plain.logits(tokens, self.pos)
        if idx is not None and prefix is not None:
            with self.model.hooks(fwd_hooks=self.hooks):
                out = self.model(prefix[idx], start_at_layer=self.start_layer)
            return out if self.hooks else out[:, self.pos]
        if self.hooks:
            with self.model.hooks(fwd_hooks=self.hooks):
                return self.model(tokens)
        return self.model(tokens)[:, self.pos]

    @torch.no_grad()
    def _reference(self, tokens: Tensor, idx: Tensor | None = None) -> Tensor:
        out = self._outputs(tokens, idx)
        return torch.log_softmax(out, -1) if self.divergence == "kl" else out

    def _reference_at_star(self, tokens: Tensor, idx: Tensor) -> Tensor:
        """The trained model's outputs when they are not cached (too large): the sampled
        parameters are pointed at w* for one no-grad forward, then back at the chain."""
        current = [p.data for p in self.params]
        offset = 0
        try:
            for p in self.params:
                p.data = self.w_star[offset : offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
            return self._reference(tokens, idx)
        finally:
            for p, data in zip(self.params, current):
                p.data = data

    def loss(self, idx: Int[Tensor, " batch"]) -> Float[Tensor, ""]:
        """Mean behavioural loss over the data points `idx` at the model's current weights."""
        tokens = self.tokens[idx]
        if self.reference is not None:
            ref = self.reference[idx]
        else:
            ref = self._reference_at_star(tokens, idx)
        out = self._outputs(tokens, idx)
        if self.divergence == "kl":
            logp = torch.log_softmax(out, -1)
            per_token = (ref.exp() * (ref - logp)).sum(-1)
        else:
            per_token = 0.5 * (out - ref).square().sum(-1)
        return per_token.mean()

    @contextmanager
    def bind(self, w: Float[Tensor, " p"]) -> Iterator[None]:
        """Make the selected parameters views of `w` (and their grads views of one flat
        buffer) for the duration; restore the model afterwards."""
        self._grad = torch.zeros_like(w)
        saved = [(p.data, p.grad, p.requires_grad) for p in self.params]
        frozen = [(p, p.requires_grad) for p in self.others]
        offset = 0
        try:
            for p in self.params:
                k = p.numel()
                p.data = w[offset : offset + k].view_as(p)
                p.grad = self._grad[offset : offset + k].view_as(p)
                p.requires_grad_(True)
                offset += k
            for p, _ in frozen:
                p.requires_grad_(False)
            yield
        finally:
            for p, (data, grad, flag) in zip(self.params, saved):
                p.data, p.grad = data, grad
                p.requires_grad_(flag)
            for p, flag in frozen:
                p.requires_grad_(flag)

    def value_and_grad(self, w: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        self._grad.zero_()
        with torch.enable_grad():
            loss = self.loss(idx)
            loss.backward()
        return loss.detach(), self._grad


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------


@dataclass
class LLCResult:
    """An SGLD estimate of the LLC with its traces and diagnostics."""

    llc: float
    """λ̂ = nβ (E[L] − L(w*)), averaged over the chains that did not diverge."""
    llc_se: float
    """Standard error of λ̂: standard deviation across chains / √chains."""
    llc_per_chain: Float[Tensor, " chain"]
    loss_traces: Float[Tensor, "chain step"]
    """Minibatch loss at every step (before the update), NaN after a divergence."""
    diverged: Bool[Tensor, " chain"]
    rhat: float
    """Split R-hat of the post-burn-in loss traces (≈1 when the chains agree)."""
    loss_at_star: float
    n: int
    nbeta: float
    n_params: int
    config: SGLDConfig
    seconds: float
    param_names: tuple[str, ...] = ()
    messages: list[str] = field(default_factory=list)
    """The warnings issued for this estimate."""

    @property
    def n_eff(self) -> float:
        """Effective parameter count 2λ̂."""
        return 2 * self.llc

    @property
    def n_eff_se(self) -> float:
        return 2 * self.llc_se

    @property
    def llc_traces(self) -> Float[Tensor, "chain step"]:
        """nβ (L_t − L(w*)) per chain and step: the per-step LLC estimate."""
        return self.nbeta * (self.loss_traces - self.loss_at_star)

    @property
    def steps_per_second(self) -> float:
        steps = self.config.n_steps * self.config.n_chains
        return steps / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (
            f"λ̂ = {self.llc:.4g} ± {self.llc_se:.2g} (N_eff = {self.n_eff:.4g} ± "
            f"{self.n_eff_se:.2g} of {self.n_params} parameters); R-hat {self.rhat:.3f}; "
            f"{int(self.diverged.sum())}/{len(self.diverged)} chains diverged; "
            f"ε={self.config.step_size:g}, γ={self.config.gamma:g}, nβ={self.nbeta:.4g}, "
            f"{self.steps_per_second:.1f} steps/s"
        )

    def to_json(self) -> dict[str, Any]:
        """Scalars and settings (arrays go through `arrays()`)."""
        return {
            "llc": self.llc,
            "llc_se": self.llc_se,
            "rhat": self.rhat,
            "loss_at_star": self.loss_at_star,
            "n": self.n,
            "nbeta": self.nbeta,
            "n_params": self.n_params,
            "config": asdict(self.config),
            "seconds": self.seconds,
            "param_names": list(self.param_names),
            "messages": list(self.messages),
        }

    def arrays(self) -> dict[str, Tensor]:
        return {
            "llc_per_chain": self.llc_per_chain,
            "loss_traces": self.loss_traces,
            "diverged": self.diverged.to(torch.uint8),
        }

    @classmethod
    def from_parts(cls, meta: Mapping[str, Any], arrays: Mapping[str, Tensor]) -> LLCResult:
        meta = dict(meta)
        config = SGLDConfig(**meta.pop("config"))
        meta["param_names"] = tuple(meta.get("param_names", ()))
        return cls(
            llc_per_chain=arrays["llc_per_chain"],
            loss_traces=arrays["loss_traces"],
            diverged=arrays["diverged"].bool(),
            config=config,
            **meta,
        )


def split_rhat(traces: Float[Tensor, "chain step"]) -> float:
    """Gelman–Rubin R-hat on split chains (each chain cut in two halves)."""
    t = traces.shape[1] // 2
    if t < 2:
        return float("nan")
    halves = torch.cat([traces[:, :t], traces[:, t : 2 * t]]).to(torch.float64)
    within = halves.var(1).mean()
    between = t * halves.mean(1).var()
    if within <= 0:
        return 1.0 if between <= 0 else float("inf")
    var_hat = (t - 1) / t * within + between / t
    return float(torch.sqrt(var_hat / within))


def _chain_generator(seed: int, chain: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The chain's random stream (minibatches on the CPU; the noise on the parameters' device,
    so a GPU chain draws its noise there: reproducible per device)."""
    return torch.Generator(device=device).manual_seed(1_000_003 * seed + chain)


def estimate_llc(
    problem: LLCProblem, config: SGLDConfig | None = None, progress: bool = False
) -> LLCResult:
    """Run SGLD chains localised at `problem.w_star` and return λ̂ with diagnostics.

    Warns (`SGLDWarning`) when chains diverge, when the split R-hat exceeds `rhat_max`, or
    when λ̂ < 0 (w* is not a local minimum, or the step is too large). `progress` shows a
    tqdm bar over all chains' steps.
    """
    cfg = config or SGLDConfig()
    if not 0 <= cfg.n_burnin < cfg.n_steps:
        raise ValueError(f"need 0 ≤ n_burnin < n_steps, got {cfg.n_burnin}, {cfg.n_steps}")
    nbeta = cfg.nbeta(problem.n)
    start = time.perf_counter()
    desc = f"SGLD ε={cfg.step_size:g} nβ={nbeta:.4g} ({problem.n_params:,} parameters)"
    with tqdm(total=cfg.n_chains * cfg.n_steps, desc=desc, disable=not progress) as bar:
        if problem.batched:
            traces, diverged = _run_batched(problem, cfg, nbeta, bar)
        else:
            runs = [_run_chain(problem, cfg, c, nbeta, bar) for c in range(cfg.n_chains)]
            traces = torch.stack([r[0] for r in runs])
            diverged = torch.tensor([r[1] for r in runs])
    seconds = time.perf_counter() - start
    return _summarise(problem, cfg, nbeta, traces, diverged, seconds)


def _step_coefficients(cfg: SGLDConfig, nbeta: float) -> tuple[float, float, float]:
    eps = cfg.step_size
    return eps * cfg.gamma / 2, eps * nbeta / 2, math.sqrt(eps)


def _run_chain(
    problem: LLCProblem, cfg: SGLDConfig, chain: int, nbeta: float, bar: tqdm
) -> tuple[Tensor, bool]:
    gen = _chain_generator(cfg.seed, chain)
    w_star = problem.w_star.detach()
    w = w_star.clone()
    noise = torch.empty_like(w)
    noise_gen = gen if w.device.type == "cpu" else _chain_generator(cfg.seed, chain, w.device)
    pull, drift, scale = _step_coefficients(cfg, nbeta)
    limit = problem.loss_at_star + cfg.explode_factor * problem.n_params / nbeta
    full = cfg.batch_size >= problem.n
    trace = torch.full((cfg.n_steps,), float("nan"), dtype=torch.float64)
    values = torch.empty(cfg.n_steps, dtype=w.dtype, device=w.device)
    diverged = False
    with problem.bind(w):
        all_idx = torch.arange(problem.n)
        for t in range(cfg.n_steps):
            idx = all_idx if full else torch.randint(0, problem.n, (cfg.batch_size,), generator=gen)
            loss, grad = problem.value_and_grad(w, idx)
            values[t] = loss
            if t % 16 == 15 or t == cfg.n_steps - 1:
                # check for divergence in blocks, so that the hot loop does not synchronise
                block = values[t - t % 16 : t + 1]
                if not bool(torch.isfinite(block).all()) or bool((block > limit).any()):
                    bad = t - t % 16 + int((~torch.isfinite(block) | (block > limit)).nonzero()[0])
                    trace[:bad] = values[:bad].to("cpu", torch.float64)
                    diverged = True
                    break
            with torch.no_grad():
                noise.normal_(generator=noise_gen)
                w.mul_(1 - pull).add_(w_star, alpha=pull).add_(grad, alpha=-drift)
                w.add_(noise, alpha=scale)
            bar.update()
        else:
            trace[:] = values.to("cpu", torch.float64)
    bar.update(cfg.n_steps * (chain + 1) - bar.n)  # a diverged chain's remaining steps
    return trace, diverged


def _run_batched(
    problem: LLCProblem, cfg: SGLDConfig, nbeta: float, bar: tqdm
) -> tuple[Tensor, Tensor]:
    gen = _chain_generator(cfg.seed, 0)
    c = cfg.n_chains
    w_star = problem.w_star.detach()[None]
    w = w_star.repeat(c, 1)
    noise = torch.empty_like(w)
    noise_gen = gen if w.device.type == "cpu" else _chain_generator(cfg.seed, 0, w.device)
    pull, drift, scale = _step_coefficients(cfg, nbeta)
    limit = problem.loss_at_star + cfg.explode_factor * problem.n_params / nbeta
    full = cfg.batch_size >= problem.n
    values = torch.empty(cfg.n_steps, c, dtype=torch.float64, device=w.device)
    alive = torch.ones(c, dtype=torch.bool, device=w.device)
    all_idx = torch.arange(problem.n).expand(c, problem.n)
    for t in range(cfg.n_steps):
        if full:
            idx = all_idx
        else:
            idx = torch.randint(0, problem.n, (c, cfg.batch_size), generator=gen)
        loss, grad = problem.value_and_grad(w, idx)
        values[t] = loss.to(torch.float64)
        bad = ~torch.isfinite(loss) | (loss > limit)
        if bool(bad.any()):
            alive &= ~bad
            grad = torch.where(alive[:, None], grad, 0.0)
            w = torch.where(alive[:, None], w, w_star)
        noise.normal_(generator=noise_gen)
        w = w * (1 - pull) + w_star * pull - drift * grad + scale * noise
        bar.update(c)
    traces = values.T.contiguous().cpu()
    diverged = (~alive).cpu()
    for i in diverged.nonzero().flatten().tolist():
        first = int((~torch.isfinite(traces[i]) | (traces[i] > limit)).nonzero()[0])
        traces[i, first:] = float("nan")
    return traces, diverged


def _summarise(
    problem: LLCProblem,
    cfg: SGLDConfig,
    nbeta: float,
    traces: Tensor,
    diverged: Tensor,
    seconds: float,
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
    for msg in messages:
        warnings.warn(msg, SGLDWarning, stacklevel=3)
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


# ---------------------------------------------------------------------------------------------
# Calibration and sensitivity
# ---------------------------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    """λ̂ over a grid of step sizes, and the largest step size that can be trusted."""

    results: list[LLCResult]
    recommended: float | None
    """Largest step size whose chains neither diverged nor failed R-hat, and whose λ̂ agrees
    with the next smaller such step size within `tolerance` (relative) or 3 standard errors."""

    @property
    def step_sizes(self) -> list[float]:
        return [r.config.step_size for r in self.results]

    def table(self) -> str:
        rows = ["| ε | λ̂ | se | R-hat | diverged |", "|---|---|---|---|---|"]
        for r in self.results:
            rows.append(
                f"| {r.config.step_size:g} | {r.llc:.4g} | {r.llc_se:.2g} | {r.rhat:.3f} | "
                f"{int(r.diverged.sum())}/{len(r.diverged)} |"
            )
        return "\n".join(rows)


def calibrate_step_size(
    problem: LLCProblem,
    config: SGLDConfig | None = None,
    step_sizes: Sequence[float] = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
    tolerance: float = 0.1,
) -> CalibrationResult:
    """Estimate λ̂ at each step size (short chains are fine) and recommend the largest stable
    one. Each diverging or unconverged setting warns (`SGLDWarning`); so does a grid with no
    trustworthy step size."""
    cfg = config or SGLDConfig()
    results = [estimate_llc(problem, replace(cfg, step_size=s)) for s in sorted(step_sizes)]
    stable = [
        r
        for r in results
        if not bool(r.diverged.any()) and not (r.rhat > cfg.rhat_max) and math.isfinite(r.llc)
    ]
    recommended = None
    if len(stable) == 1:
        recommended = stable[0].config.step_size
    for small, big in zip(stable, stable[1:]):
        gap = abs(big.llc - small.llc)
        se = math.hypot(big.llc_se, small.llc_se) if math.isfinite(big.llc_se) else 0.0
        if gap <= max(tolerance * abs(small.llc), 3 * se):
            recommended = big.config.step_size
    if recommended is None:
        warnings.warn(
            "no step size in the grid gave converged, agreeing SGLD chains "
            f"({', '.join(f'{s:g}' for s in sorted(step_sizes))}): extend the grid to smaller "
            "step sizes or run longer chains",
            SGLDWarning,
            stacklevel=2,
        )
    return CalibrationResult(results, recommended)


def sensitivity_grid(
    problem: LLCProblem,
    config: SGLDConfig | None = None,
    step_sizes: Sequence[float] = (3e-5, 1e-4, 3e-4),
    nbetas: Sequence[float | None] = (None,),
    progress: bool = False,
    skip_own: bool = False,
) -> list[LLCResult]:
    """λ̂ for every (step size, nβ) pair: how much the estimate depends on its
    hyperparameters. An entry None in `nbetas` means the default β = 1/log n. `skip_own`
    leaves out the pair equal to `config`'s own setting (nβ within 0.1%), already estimated
    by the caller."""
    cfg = config or SGLDConfig()
    own = cfg.nbeta(problem.n)
    out = []
    for nbeta in nbetas:
        beta = None if nbeta is None else nbeta / problem.n
        for eps in step_sizes:
            run = replace(cfg, step_size=eps, beta=beta)
            if (
                skip_own
                and eps == cfg.step_size
                and math.isclose(run.nbeta(problem.n), own, rel_tol=1e-3)
            ):
                continue
            out.append(estimate_llc(problem, run, progress))
    return out


# ---------------------------------------------------------------------------------------------
# Modularity: do proposed modules add their λ?
# ---------------------------------------------------------------------------------------------


@dataclass
class ModularityResult:
    """λ̂ of the union of modules against the sum of the modules' own λ̂.

    If the loss near w* is a sum of functions of each module's parameters (independent
    modules), λ(whole) = Σ λ(module). Interactions make the two differ.
    """

    whole: LLCResult
    modules: dict[str, LLCResult]

    @property
    def sum_of_modules(self) -> float:
        return sum(r.llc for r in self.modules.values())

    @property
    def sum_se(self) -> float:
        return math.sqrt(sum(r.llc_se**2 for r in self.modules.values()))

    @property
    def gap(self) -> float:
        """Σ λ̂(module) − λ̂(whole)."""
        return self.sum_of_modules - self.whole.llc

    @property
    def gap_se(self) -> float:
        return math.hypot(self.sum_se, self.whole.llc_se)

    @property
    def ratio(self) -> float:
        """λ̂(whole) / Σ λ̂(module): 1 for independent modules."""
        return self.whole.llc / self.sum_of_modules

    def summary(self) -> str:
        parts = ", ".join(f"{k}: {r.llc:.4g} ± {r.llc_se:.2g}" for k, r in self.modules.items())
        return (
            f"λ̂(whole) = {self.whole.llc:.4g} ± {self.whole.llc_se:.2g}; Σ modules = "
            f"{self.sum_of_modules:.4g} ± {self.sum_se:.2g} ({parts}); gap "
            f"{self.gap:.3g} ± {self.gap_se:.2g}"
        )


def modularity(
    make_problem: Callable[[ParamFilter], LLCProblem],
    modules: Mapping[str, ParamFilter],
    config: SGLDConfig | None = None,
) -> ModularityResult:
    """Compare λ̂ over the union of `modules` (parameter filters) with the sum of λ̂ over each
    module alone (the rest held at w*). `make_problem(filter)` builds the loss restricted to a
    filter, e.g. `lambda f: ModelProblem(model, tokens, f)`."""
    filters = list(modules.values())
    per_module = {name: estimate_llc(make_problem(f), config) for name, f in modules.items()}
    whole = estimate_llc(make_problem(lambda name: any(matches(f, name) for f in filters)), config)
    return ModularityResult(whole, per_module)


@dataclass(frozen=True)
class TemperatureFit:
    """λ and the multiplicity m from λ̂ at several inverse temperatures t = nβ.

    Singular learning theory gives `E_t[t (L − L*)] ≈ λ − (m − 1)/log t`, so `λ̂_t log t` is
    linear in `log t` with slope λ and intercept −(m − 1). One temperature mixes the two; a fit
    over two or more separates them and removes the `(m − 1)/log t` bias of λ̂ (large for very
    singular models: −17% for `w1² w2²` at nβ ≈ 10⁴)."""

    llc: float
    llc_se: float
    multiplicity: float
    multiplicity_se: float


def temperature_fit(results: Sequence[LLCResult]) -> TemperatureFit:
    """Weighted least squares of `λ̂_t log t = λ log t − (m − 1)` over results at different nβ."""
    if len({round(r.nbeta, 9) for r in results}) < 2:
        raise ValueError("need estimates at two or more different inverse temperatures nβ")
    x = torch.tensor([math.log(r.nbeta) for r in results], dtype=torch.float64)
    y = torch.tensor([r.llc for r in results], dtype=torch.float64) * x
    se = torch.tensor([r.llc_se for r in results], dtype=torch.float64) * x
    w = 1 / se.clamp_min(1e-12).square() if bool(torch.isfinite(se).all()) else torch.ones_like(x)
    design = torch.stack([x, -torch.ones_like(x)], 1)
    cov = torch.linalg.inv(design.T @ (w[:, None] * design))
    slope, m_minus_1 = (cov @ design.T @ (w * y)).tolist()
    return TemperatureFit(slope, math.sqrt(cov[0, 0]), m_minus_1 + 1, math.sqrt(cov[1, 1]))
