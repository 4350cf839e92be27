"""Losses the SGLD sampler estimates the learning coefficient of: `L(w)` of a flat parameter
vector over indexed data points.

`FunctionProblem` wraps any function of `w` (the ground truths); `ModelProblem` is the
behavioural loss `L_B(w) = (1/n) Σ_x D(f(x; w), f(x; w*))` of a TransformerLens model,
zero at the trained weights `w*`, over the parameters a filter chooses.

Speed: for a model, the parameters are bound to views of one flat vector (and their `.grad`
to views of one flat gradient), so a step is one forward, one backward and one fused in-place
update, with no per-parameter Python work and no `functional_call` (which does not restore a
`TransformerBridge` correctly).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.compat import is_bridge, temporary_hooks
from tl_degeneracy.engine.degeneracy.parameters import (
    ParamFilter,
    parameter_masks,
    select_parameters,
    state_dict_parameters,
)
from tl_degeneracy.engine.degeneracy.sources import check_positions, resolve_positions
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import LOGITS, Site
from tl_degeneracy.engine.streaming import chunks
from tl_degeneracy.engine.structures import INPUTS, structure_of
from tl_degeneracy.engine.structures.plain import PlainModel
from tl_degeneracy.engine.structures.written_out import PlainForward
from tl_degeneracy.engine.synchronisation import device_index
from tl_degeneracy.engine.tokens import validate_tokens

LossFn = Callable[[Tensor, Tensor], Tensor]
Divergence = Literal["kl", "mse"]
Positions = Literal["last", "all"] | tuple[int, ...]


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
    index_device: torch.device = torch.device("cpu")
    """Where `value_and_grad` wants its data indices `idx` (the CPU unless the data lives on
    the model's device)."""

    @property
    def n_params(self) -> int:
        return int(self.w_star.numel())

    @property
    def sample_size(self) -> int:
        """The n of the posterior's `nβ = n β` (default `n / log n`): how many loss terms the
        mean `L` is over. One per data point unless a data point holds several."""
        return self.n

    def entry_sizes(self) -> list[int]:
        """How many entries of w each of `param_names` has (in order)."""
        if len(self.param_names) != self.n_params:
            raise ValueError("this problem names no parameter groups: give param_names per entry")
        return [1] * self.n_params

    def step_vector(self, scales: Sequence[tuple[str, float]]) -> Float[Tensor, " p"]:
        """Per-entry multipliers of the step size: the factor of the first pattern that a
        parameter's name matches (`re.search`), 1 where none does."""
        factors = [
            next((f for pattern, f in scales if re.search(pattern, name)), 1.0)
            for name in self.param_names
        ]
        sizes = torch.tensor(self.entry_sizes())
        out = torch.repeat_interleave(torch.tensor(factors, dtype=torch.float64), sizes)
        return out.to(self.w_star.device, self.w_star.dtype)

    @contextmanager
    def bind(self, w: Tensor) -> Iterator[None]:
        yield

    def value_and_grad(self, w: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class FunctionProblem(LLCProblem):
    """A loss given as a function `loss_fn(w, idx)` of a flat parameter vector (autograd).

    With `batched=True` the function takes w of shape [chain, p] and idx [chain, batch] and
    returns one loss per chain, so that all chains advance in one call (small models).
    `index_device`: where the function wants `idx` (where its data lives; the CPU by default).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        w_star: Float[Tensor, " p"],
        n: int,
        loss_at_star: float | None = None,
        batched: bool = False,
        param_names: Sequence[str] = (),
        index_device: torch.device | str = "cpu",
    ):
        self.loss_fn = loss_fn
        self.index_device = torch.device(index_device)
        self.w_star = w_star.detach().reshape(-1)
        self.n = int(n)
        self.batched = batched
        self.param_names = tuple(param_names)
        if loss_at_star is None:
            with torch.no_grad():
                idx = torch.arange(self.n, device=self.index_device)
                w = self.w_star[None] if batched else self.w_star
                loss_at_star = float(loss_fn(w, idx[None] if batched else idx).reshape(-1)[0])
        self.loss_at_star = float(loss_at_star)

    def value_and_grad(self, w: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            w_ = w.detach().requires_grad_(True)
            loss = self.loss_fn(w_, idx)
            (grad,) = torch.autograd.grad(loss.sum(), w_)
        return loss.detach(), grad


HALF_PRECISION = (torch.float16, torch.bfloat16)


def check_model(model: nn.Module, what: str, purpose: str) -> None:
    """A clear error for a model these functions cannot measure: one without a TransformerLens
    `cfg` (a bare `HookedRootModule` or `nn.Module`), or one in half precision."""
    if getattr(model, "cfg", None) is None:
        raise TypeError(
            f"{what} needs a TransformerLens model (HookedTransformer or TransformerBridge, "
            f"with a `cfg`); {type(model).__name__} has no `cfg`. measure_sources, model_llc "
            "and degeneracy_report do not support other models: for the SGLD estimate of any "
            "other model, write its loss as a function of a flat parameter vector and run "
            "`estimate_llc(FunctionProblem(loss_fn, w_star, n))`"
        )
    half = sorted({str(p.dtype) for p in model.parameters() if p.dtype in HALF_PRECISION})
    if half:
        fix = (
            "measure a float64 copy: `measure_sources(copy.deepcopy(model).double(), tokens)`, "
            "or `degeneracy_report(copy.deepcopy(model).double(), tokens, "
            "sgld_dtype=torch.float32)` (sources in float64, SGLD on a float32 copy)"
            if purpose == "sources"
            else "sample a float32 copy: `model_llc(copy.deepcopy(model).float(), tokens)`, or "
            "`degeneracy_report(model, tokens, sgld_dtype=torch.float32)`"
        )
        why = (
            "half precision cannot resolve the ranks the sources count"
            if purpose == "sources"
            else "SGLD steps are below half precision's resolution of the weights"
        )
        raise ValueError(
            f"{what} needs a float32 or float64 model, got {', '.join(half)} ({why}): {fix}"
        )


def written_out_forward(model: nn.Module) -> Callable[[], PlainModel] | None:
    """The forward the sampler runs instead of the model's own, or None for the model's own:
    the whole model's structure (`structure_of(model, Section(INPUTS, logits))`) decides. A
    plain model (no normalisation; modular addition) runs `PlainForward.written_out`, read on
    every call from the model's own parameters (so it follows the views `bind` points them
    at, on either API); under `autograd_only()` every model runs its own forward."""
    structure = structure_of(model, Section(INPUTS, Site(LOGITS)))
    return structure.written_out if isinstance(structure, PlainForward) else None


class ModelProblem(LLCProblem):
    """The behavioural loss of a TransformerLens model on `tokens`, as a function of the
    parameters chosen by `params` (the others stay at their trained values).

    `divergence`: "kl" — KL(p(·|x; w*) ‖ p(·|x; w)) of the softmax of the logits, for language
    models and classifiers; "mse" — ½‖f(x; w) − f(x; w*)‖² of the logits. Averaged over the
    selected `positions` ("last", "all" or a tuple of indices) of each sequence; n is the number
    of sequences (minibatches draw rows), and the posterior's nβ counts every loss term the mean
    is over, rows × read positions (`sample_size`): the loss at all positions of 32 rows of 16
    tokens is a mean over 512 next-token predictions, nβ = 512 / log 512 = 82, not
    32 / log 32 = 9.2. The last position only (modular addition) is one term per row.
    Reference outputs are cached when they hold at most `cache_limit` numbers,
    otherwise recomputed at w* for every batch.

    Speed: a plain model runs its written-out forward (`written_out_forward`), the last block
    at the read positions only (within `autograd_only()` the model's own forward runs
    instead; tests hold the two equal). Otherwise, when only some positions are read, a
    HookedTransformer runs its last MLP and the unembedding at those positions only (the
    residual stream is cut to them after the last attention layer).

    The parameters sampled are those `params` chooses, whatever their `requires_grad`
    (autograd's bookkeeping, not a choice of what to measure; the flags are restored after
    each chain). The model must be a TransformerLens model in float32 or float64.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: Int[Tensor, "n pos"],
        params: ParamFilter = None,
        positions: Positions = "last",
        divergence: Divergence = "kl",
        cache_limit: int = 50_000_000,
        chunk_size: int = 1024,
    ):
        check_model(model, "ModelProblem (model_llc, degeneracy_report)", "SGLD")
        if divergence not in ("kl", "mse"):
            raise ValueError(f"divergence must be 'kl' or 'mse', got {divergence!r}")
        check_positions(positions)
        self.model: Any = model  # a HookedTransformer or TransformerBridge
        self.tokens = tokens = validate_tokens(model, tokens)  # on its device (for the Bridge)
        self.divergence = divergence
        named = state_dict_parameters(model)
        self.param_names = tuple(select_parameters(model, params))
        self.params = [named[n] for n in self.param_names]
        self.others = [p for n, p in named.items() if n not in self.param_names]
        self.masks: list[Tensor | None] = [None] * len(self.params)
        if isinstance(params, Mapping):  # some entries of some parameters
            masks = parameter_masks(model, params)
            self.masks = [None if bool(masks[n].all()) else masks[n] for n in self.param_names]
        self.full_star = [
            None if m is None else p.detach().clone() for p, m in zip(self.params, self.masks)
        ]
        self.w_star = torch.cat(
            [
                p.detach().reshape(-1) if m is None else p.detach()[m]
                for p, m in zip(self.params, self.masks)
            ]
        ).clone()
        self.n = int(tokens.shape[0])
        self.loss_at_star = 0.0
        n_pos = tokens.shape[1]
        self.query_positions: tuple[int, ...] = resolve_positions(positions, n_pos)
        # on the tokens' device, made once: an index copied from the host at every step would
        # make a GPU wait for the step before
        self.pos = device_index(self.query_positions, tokens.device)
        self.index_device = tokens.device
        self.chunk_size = chunk_size
        self.written_out = written_out_forward(model)
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
                [self._reference(tokens[sl]) for sl in chunks(self.n, chunk_size)]
            )
        self.start_layer, self.prefix = self._cache_prefix(cache_limit, chunk_size)

    @property
    def plain(self) -> bool:
        """True when the sampler runs the written-out forward."""
        return self.written_out is not None

    @property
    def sample_size(self) -> int:
        """Loss terms the behavioural loss averages: rows × read positions."""
        return self.n * len(self.query_positions)

    def entry_sizes(self) -> list[int]:
        return [p.numel() if m is None else int(m.sum()) for p, m in zip(self.params, self.masks)]

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
                for sl in chunks(self.n, chunk_size)
            ]
        return start, torch.cat(parts)

    def _outputs(self, tokens: Tensor, idx: Tensor | None = None) -> Tensor:
        """Logits at the selected positions (from the cached residual stream when there is
        one and the data points `idx` are given)."""
        prefix: Tensor | None = getattr(self, "prefix", None)  # None while it is being built
        if self.written_out is not None:
            plain = self.written_out()
            if idx is not None and prefix is not None:
                return plain.logits(None, self.query_positions, prefix[idx], self.start_layer)
            return plain.logits(tokens, self.query_positions)
        if idx is not None and prefix is not None:
            with temporary_hooks(self.model, self.hooks):
                out = self.model(prefix[idx], start_at_layer=self.start_layer)
            return out if self.hooks else out[:, self.pos]
        if self.hooks:
            with temporary_hooks(self.model, self.hooks):
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
            for p, mask, full in zip(self.params, self.masks, self.full_star):
                k = p.numel() if mask is None else int(mask.sum())
                p.data = full if full is not None else self.w_star[offset : offset + k].view_as(p)
                offset += k
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
        buffer) for the duration; restore the model afterwards. A masked parameter gets a
        copy of its trained value whose chosen entries are written from `w` at every step."""
        self._grad = torch.zeros_like(w)
        self._masked: list[tuple[nn.Parameter, Tensor, slice]] = []
        saved = [(p.data, p.grad, p.requires_grad) for p in self.params]
        frozen = [(p, p.requires_grad) for p in self.others]
        offset = 0
        try:
            for p, mask, full in zip(self.params, self.masks, self.full_star):
                k = p.numel() if mask is None else int(mask.sum())
                if mask is None:
                    p.data = w[offset : offset + k].view_as(p)
                    p.grad = self._grad[offset : offset + k].view_as(p)
                else:
                    assert full is not None
                    p.data, p.grad = full.clone(), torch.zeros_like(full)
                    # the chosen entries as flat indices, found once: a boolean mask would
                    # make a GPU wait at every step to count them
                    entries = mask.reshape(-1).nonzero().squeeze(1)
                    self._masked.append((p, entries, slice(offset, offset + k)))
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
        for p, entries, at in self._masked:
            p.data.view(-1)[entries] = w[at]
            assert p.grad is not None
            p.grad.zero_()
        with torch.enable_grad():
            loss = self.loss(idx)
            loss.backward()
        for p, entries, at in self._masked:
            assert p.grad is not None
            self._grad[at] = p.grad.view(-1)[entries]
        return loss.detach(), self._grad
