"""The same LLC estimate by devinterp's sampler, for cross-checking ours.

devinterp (an optional dependency: `pip install -e ".[compare]"`) samples a plain `nn.Module`
on a `datasets.Dataset`. `devinterp_llc` gives it our behavioural loss — KL of the read
position's softmax against the trained model's — and our hyperparameters (`SGLDConfig`: ε, γ,
nβ, chains, steps and burn-in, batch size), so that the two estimates differ only by the
samplers. Used by `benchmarks/llc_vs_devinterp.py` and
`tests/engine/degeneracy/test_against_devinterp.py`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.degeneracy.config import SGLDConfig


@dataclass(frozen=True)
class DevinterpEstimate:
    """devinterp's λ̂ with the standard error across chains (ours: `LLCResult.llc_se`)."""

    llc: float
    llc_se: float
    llc_per_chain: list[float]
    nbeta: float


def devinterp_llc(
    model: nn.Module, tokens: Int[Tensor, "n pos"], config: SGLDConfig
) -> DevinterpEstimate:
    """devinterp's SGLD estimate of the LLC of the KL at the last position of `model` on
    `tokens`, with the hyperparameters of `config` (`n_burnin` burn-in steps, then
    `n_steps − n_burnin` draws per chain; devinterp averages the minibatch loss of every draw,
    as `estimate_llc` does). The model is left at its trained weights."""
    from datasets import Dataset
    from devinterp.slt.llc import compute_llc
    from devinterp.slt.sampling import sample

    n = int(tokens.shape[0])
    nbeta = config.nbeta(n)
    with torch.no_grad():
        reference = torch.log_softmax(model(tokens)[:, -1], -1)
    row_of = _row_lookup(tokens)

    def kl(model: nn.Module, input_ids: Tensor) -> Tensor:
        ref = reference[row_of(input_ids)]
        logp = torch.log_softmax(model(input_ids)[:, -1], -1)
        per_seq = (ref.exp() * (ref - logp)).sum(-1, keepdim=True)
        return per_seq.expand(-1, input_ids.shape[1] - 1)  # devinterp wants (batch, seq − 1)

    data = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # devinterp warns that its draws go to a temp store
        tree = sample(
            model,
            data,
            {},
            lr=config.step_size,
            n_beta=nbeta,
            localization=config.gamma,
            num_chains=config.n_chains,
            num_draws=config.n_steps - config.n_burnin,
            num_burnin_steps=config.n_burnin,
            batch_size=config.batch_size,
            num_init_loss_batches=1,
            loss_fn=kl,
        )
    summary = compute_llc(tree)
    per_chain = [float(x) for x in summary["llc_per_chain"].values]
    return DevinterpEstimate(
        llc=float(summary["llc_mean"]),
        llc_se=float(summary["llc_std"]) / math.sqrt(config.n_chains),
        llc_per_chain=per_chain,
        nbeta=nbeta,
    )


def _row_lookup(tokens: Int[Tensor, "n pos"]) -> Callable[[Tensor], Tensor]:
    """A map from a batch of rows of `tokens` to their indices: vectorised (exact integer keys
    and a binary search) when a row fits in 62 bits, a dictionary otherwise."""
    n_pos = tokens.shape[1]
    base = int(tokens.max()) + 1
    if n_pos * math.log2(max(base, 2)) < 62:
        weights = base ** torch.arange(n_pos, dtype=torch.int64)
        keys = (tokens.to(torch.int64) * weights).sum(1)
        order = keys.argsort()
        sorted_keys = keys[order]
        return lambda ids: order[
            torch.searchsorted(sorted_keys, (ids.to(torch.int64) * weights).sum(1))
        ]
    rows = {tuple(t): i for i, t in enumerate(tokens.tolist())}
    return lambda ids: torch.tensor([rows[tuple(t)] for t in ids.tolist()])
