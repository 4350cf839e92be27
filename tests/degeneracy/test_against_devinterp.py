"""Our SGLD estimate against devinterp's on the same model, data, loss and hyperparameters
(modular addition seed 0; needs ../shared and the optional `devinterp`; slow)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tl_degeneracy.compat import available_apis, build_model
from tl_degeneracy.degeneracy import ModelProblem, SGLDConfig, estimate_llc

pytest.importorskip("devinterp", reason="devinterp is an optional dependency")
pytest.importorskip("datasets", reason="devinterp's samplers take a datasets.Dataset")

P, STEP, GAMMA, BATCH, CHAINS, STEPS, BURNIN = 113, 1e-4, 100.0, 512, 4, 400, 100


@pytest.mark.slow
@pytest.mark.skipif("hooked" not in available_apis(), reason="devinterp runs a plain nn.Module")
def test_llc_agrees_with_devinterp_within_the_standard_error(reference_dir):
    from datasets import Dataset
    from devinterp.slt.llc import compute_llc
    from devinterp.slt.sampling import sample

    cfg = json.loads((reference_dir / "seed0" / "config.json").read_text())["model"]
    weights = load_file(str(reference_dir / "seed0" / "model.safetensors"))
    model = build_model(cfg, weights, api="hooked", dtype=torch.float32)
    every = torch.tensor([[a, b, P] for a in range(P) for b in range(P)])
    tokens = every[load_file(str(reference_dir / "split.safetensors"))["train_indices"]]
    n = tokens.shape[0]

    ours = estimate_llc(
        ModelProblem(model, tokens),
        SGLDConfig(STEP, GAMMA, None, CHAINS, STEPS, BURNIN, BATCH),
    )

    with torch.no_grad():
        reference = torch.log_softmax(model(every)[:, -1], -1)

    def kl(model, input_ids):  # the same behavioural loss: KL at the last position
        ref = reference[input_ids[:, 0] * P + input_ids[:, 1]]
        logp = torch.log_softmax(model(input_ids)[:, -1], -1)
        per_seq = (ref.exp() * (ref - logp)).sum(-1, keepdim=True)
        return per_seq.expand(-1, input_ids.shape[1] - 1)  # devinterp wants (batch, seq − 1)

    data = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = sample(
            model,
            data,
            {},
            lr=STEP,
            n_beta=n / math.log(n),
            localization=GAMMA,
            num_chains=CHAINS,
            num_draws=STEPS - BURNIN,
            num_burnin_steps=BURNIN,
            batch_size=BATCH,
            num_init_loss_batches=1,
            loss_fn=kl,
        )
    theirs = compute_llc(tree)
    theirs_llc = float(theirs["llc_mean"])
    theirs_se = float(theirs["llc_std"]) / math.sqrt(CHAINS)
    assert ours.nbeta == pytest.approx(n / math.log(n))
    se = math.hypot(ours.llc_se, theirs_se)
    assert abs(ours.llc - theirs_llc) < 3 * se, (ours.llc, ours.llc_se, theirs_llc, theirs_se)
    assert 300 < ours.llc < 700  # measured: 498.1 ± 5.9 against devinterp's 497.7 ± 3.8
