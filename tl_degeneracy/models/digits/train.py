"""Train the digits MLP: seconds on one CPU thread, and the same weights for the same seed.

Recipe (the LIB authors' CIFAR-10 MLP recipe, `rib_scripts/train_mlp/cifar.yaml`: Adam, learning
rate 1e-3, minibatches of 64, cross-entropy, no weight decay), on the 1,348 standardised training
digits of the fixed split, for 50 epochs (22 steps each). The seed fixes the initialisation
(`init_weights`) and the minibatch order (a private generator); training runs in float32 on
one thread, so a seed gives identical weights on a given machine and torch version.

Run: `python -m tl_degeneracy.models.digits.train --seed S --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tl_degeneracy.models.digits.data import DigitsDataset
from tl_degeneracy.models.digits.model import DigitsMLP, DigitsMLPConfig, init_weights


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved with the checkpoint)."""

    seed: int = 0
    hidden: tuple[int, ...] = (100, 100)
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 50
    split_seed: int = 0
    test_fraction: float = 0.25

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "hidden": list(self.hidden)}


@dataclass
class TrainResult:
    """A trained model, its data and the training record."""

    model: DigitsMLP
    dataset: DigitsDataset
    config: TrainConfig
    record: dict[str, Any]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread (deterministic reductions), restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def accuracy(model: DigitsMLP, inputs: Tensor, labels: Tensor) -> float:
    """Fraction of `inputs` whose argmax logit is the label."""
    return float((model(inputs).argmax(-1) == labels).to(torch.float64).mean())


def train(
    config: TrainConfig | None = None,
    dataset: DigitsDataset | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train one model with `config` (the dataset is loaded from the config's split unless
    given) and return it in eval mode with its record."""
    config = config or TrainConfig()
    data = dataset or DigitsDataset.load(config.split_seed, config.test_fraction)
    if (data.split_seed, data.test_fraction) != (config.split_seed, config.test_fraction):
        raise ValueError("dataset's split does not match config.split_seed / test_fraction")
    data = data.to(torch.float32)
    start, cpu_start = time.perf_counter(), time.process_time()
    with one_thread():
        model = init_weights(DigitsMLP(DigitsMLPConfig(hidden=config.hidden)), config.seed)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        order = torch.Generator().manual_seed(config.seed)
        x, y = data.train()
        loss = torch.tensor(float("nan"))
        for epoch in range(1, config.epochs + 1):
            perm = torch.randperm(len(y), generator=order)
            for i in range(0, len(y), config.batch_size):
                idx = perm[i : i + config.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if epoch % 10 == 0 or epoch == config.epochs:
                log(f"epoch {epoch}: last minibatch loss {loss.item():.5f}")
        model.eval()
        with torch.no_grad():
            train_loss = float(F.cross_entropy(model(x), y))
        record = {
            "seed": config.seed,
            "epochs": config.epochs,
            "steps": config.epochs * -(-len(y) // config.batch_size),
            "train_accuracy": accuracy(model, x, y),
            "train_loss": train_loss,
            "test_accuracy": accuracy(model, *data.test()),
            "seconds": round(time.perf_counter() - start, 3),
            "cpu_seconds": round(time.process_time() - cpu_start, 3),
            "threads": 1,
            "recipe": {
                "optimizer": "Adam (betas 0.9, 0.999, eps 1e-8, no weight decay)",
                "loss": "cross-entropy",
                "init": "U(±1/sqrt(fan_in)) for weights and biases (torch's nn.Linear default)",
                "dtype": "float32",
                "config": config.to_json(),
            },
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        }
    return TrainResult(model, data, config, record)


def save_result(result: TrainResult, out: str | Path) -> Path:
    """Write the checkpoint folder: `model.safetensors`, `config.json` (model, dataset,
    train config) and `training.json` (the record)."""
    out = Path(out)
    meta = {"dataset": result.dataset.spec(), "train": result.config.to_json()}
    result.model.save(out, meta)
    (out / "training.json").write_text(json.dumps(result.record, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = TrainConfig()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--hidden", type=int, nargs="+", default=list(d.hidden))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--split-seed", type=int, default=d.split_seed)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    args = p.parse_args(argv)
    config = TrainConfig(
        seed=args.seed,
        hidden=tuple(args.hidden),
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        split_seed=args.split_seed,
        test_fraction=args.test_fraction,
    )
    result = train(config)
    save_result(result, args.out)
    r = result.record
    print(f"seed {config.seed}: test accuracy {r['test_accuracy']:.4f} in {r['seconds']} s")
    print(json.dumps({k: r[k] for k in ("seed", "epochs", "test_accuracy", "seconds")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
