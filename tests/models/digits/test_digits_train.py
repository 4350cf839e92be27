"""Training is deterministic by seed, the CLI writes a loadable checkpoint, and the package's
five checkpoints load and reach their recorded accuracy."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn")

from tl_degeneracy.models.digits import (  # noqa: E402
    SEEDS,
    checkpoint_dir,
    load_checkpoint,
    load_digits_model,
    training_record,
)
from tl_degeneracy.models.digits.data import DigitsDataset  # noqa: E402
from tl_degeneracy.models.digits.train import TrainConfig, accuracy, main, train  # noqa: E402


@pytest.fixture(scope="module")
def data() -> DigitsDataset:
    return DigitsDataset.load()


def quiet(_: str) -> None:
    pass


def test_training_is_deterministic_by_seed(data):
    short = TrainConfig(seed=3, hidden=(16, 12), epochs=2)
    a = train(short, data, log=quiet)
    b = train(short, data, log=quiet)
    c = train(TrainConfig(seed=4, hidden=(16, 12), epochs=2), data, log=quiet)
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.record["test_accuracy"] == b.record["test_accuracy"]
    assert a.record["steps"] == 2 * 22 and a.record["threads"] == 1
    assert torch.get_num_threads() >= 1  # restored after training


def test_training_learns(data):
    result = train(TrainConfig(seed=0, hidden=(32,), epochs=10), data, log=quiet)
    assert result.record["test_accuracy"] > 0.9  # 10% is chance


def test_train_refuses_a_dataset_of_another_split(data):
    with pytest.raises(ValueError, match="split"):
        train(TrainConfig(split_seed=1), data, log=quiet)


def test_cli_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    main(["--seed", "2", "--out", str(out), "--hidden", "8", "--epochs", "1"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["seed"] == 2 and summary["epochs"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["hidden"] == [8] and config["train"]["seed"] == 2
    model, ds = load_checkpoint(out)
    assert model.W_out.dtype == torch.float64
    assert accuracy(model, *ds.test()) == pytest.approx(summary["test_accuracy"], abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_packaged_checkpoints_reach_their_recorded_accuracy(seed):
    model, ds = load_digits_model(seed)
    record = training_record(checkpoint_dir(seed))
    config = json.loads((checkpoint_dir(seed) / "config.json").read_text())
    assert config["model"]["hidden"] == [100, 100] and config["train"]["seed"] == seed
    assert record["test_accuracy"] > 0.95
    # the float64 model gives the float32 run's accuracy (a prediction may flip on a tie)
    assert accuracy(model, *ds.test()) == pytest.approx(record["test_accuracy"], abs=1 / 449)
    assert accuracy(model, *ds.train()) == pytest.approx(record["train_accuracy"], abs=1 / 1348)


def test_checkpoint_refuses_a_changed_split(tmp_path):
    src = checkpoint_dir(0)
    dst = tmp_path / "seed0"
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["dataset"]["split_digest"] = "0" * 16
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="split differs"):
        load_checkpoint(dst)
    with pytest.raises(FileNotFoundError, match="seed 7"):
        load_digits_model(7)


def test_recipe_reproduces_packaged_seed0(data):
    """Retraining seed 0 gives the packaged weights (same torch; one thread)."""
    recorded = training_record(checkpoint_dir(0))["versions"]["torch"]
    if recorded != torch.__version__:
        pytest.skip(f"checkpoints were trained with torch {recorded}, this is {torch.__version__}")
    result = train(TrainConfig(seed=0), data, log=quiet)
    model, _ = load_digits_model(0, dtype=torch.float32)
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=1e-5)
