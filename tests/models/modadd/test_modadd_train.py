"""The training script: its fast forward equals the TransformerLens forward, both backends take
the same steps, the CLI writes a loadable checkpoint, and a small model groks."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tl_degeneracy.engine.compat import available_apis, build_model
from tl_degeneracy.models.modadd import evaluate, load_checkpoint
from tl_degeneracy.models.modadd.train import (
    TrainConfig,
    init_state_dict,
    last_position_logits,
    main,
    model_config,
    train,
)

APIS = available_apis()


@pytest.mark.parametrize("api", APIS)
def test_fast_forward_equals_transformer_lens(api):
    cfg = model_config(17)
    weights = init_state_dict(cfg, seed=3, init_scale=4.0)
    gen = torch.Generator().manual_seed(0)
    weights = {
        k: (v + 0.05 * torch.randn(v.shape, generator=gen)).double() for k, v in weights.items()
    }
    model = build_model(cfg, weights, api=api, dtype=torch.float64)
    tokens = torch.randint(0, cfg["d_vocab"], (64, 3), generator=gen)  # any last token
    with torch.no_grad():
        expected = model(tokens)[:, -1]
    torch.testing.assert_close(last_position_logits(weights, tokens), expected, rtol=0, atol=1e-10)


def test_backends_take_the_same_steps():
    config = TrainConfig(p=11, frac_train=0.5, max_epochs=5, eval_every=5, init_scale=1.0)
    fast = train(config, log=lambda _: None)
    slow = train(TrainConfig(**{**config.__dict__, "backend": "model"}), log=lambda _: None)
    tokens = fast.dataset.tokens
    with torch.no_grad():
        torch.testing.assert_close(fast.model(tokens), slow.model(tokens), rtol=0, atol=1e-4)
    assert fast.epochs == slow.epochs == 5


def test_cli_writes_a_checkpoint(tmp_path, capsys):
    main(["--out", str(tmp_path / "ck"), "--p", "7", "--max-epochs", "3", "--eval-every", "1"])
    summary = json.loads(capsys.readouterr().out.split("\n", 3)[-1])
    assert summary["epochs"] == 3
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["dataset"]["modulus"] == 7 and config["train"]["epochs"] == 3
    model, ds = load_checkpoint(tmp_path / "ck")
    assert evaluate(model, *ds.test())["accuracy"] == pytest.approx(
        config["metrics"]["test"]["accuracy"], abs=1e-9
    )


@pytest.mark.slow
def test_small_model_learns_to_generalise():
    """p = 53 with 70% of the inputs for training: test accuracy 0.90 by epoch ~300 (train 1.0);
    about 5 minutes on the loaded 2-core machine, well under a minute unloaded."""
    start = time.perf_counter()
    result = train(
        TrainConfig(p=53, frac_train=0.7, max_epochs=1500, target_test_accuracy=0.9),
        log=lambda _: None,
    )
    assert result.test_metrics["accuracy"] >= 0.9, result.history[-1]
    assert result.train_metrics["accuracy"] >= 0.99
    print(f"p=53: test 0.9 at epoch {result.grokked_epoch}, {time.perf_counter() - start:.0f}s")
