"""The package's digits checkpoints (`assets/digits/seed{S}`, trained with
`tl_degeneracy.models.digits.train`) and a loader that returns a model with its data."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from tl_degeneracy.models.digits.data import DigitsDataset
from tl_degeneracy.models.digits.model import DigitsMLP

SEEDS = (0, 1, 2, 3, 4)


def checkpoint_dir(seed: int = 0) -> Path:
    """The folder of the package's checkpoint for training seed `seed`."""
    return Path(str(resources.files("tl_degeneracy") / "assets" / "digits" / f"seed{seed}"))


def load_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float64
) -> tuple[DigitsMLP, DigitsDataset]:
    """Model (in `dtype`, eval mode) and data set (inputs in `dtype`, the split recorded in the
    checkpoint) of a checkpoint folder. Refuses a split other than the one it was trained on."""
    path = Path(path)
    model = DigitsMLP.load(path, dtype=dtype)
    spec = json.loads((path / "config.json").read_text()).get("dataset", {})
    data = DigitsDataset.load(spec.get("split_seed", 0), spec.get("test_fraction", 0.25), dtype)
    recorded = spec.get("split_digest")
    if recorded is not None and recorded != data.split_digest():
        raise ValueError(
            f"{path}: the data split differs from the one the model was trained on (digest "
            f"{data.split_digest()} vs {recorded}); the torch or scikit-learn version changed "
            "how the split is drawn. Retrain with `python -m tl_degeneracy.models.digits.train`."
        )
    return model, data


def load_digits_model(
    seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[DigitsMLP, DigitsDataset]:
    """The package's checkpoint for training seed `seed` (0…4) and its data set."""
    path = checkpoint_dir(seed)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no packaged digits checkpoint for seed {seed} (have seeds {list(SEEDS)}); train "
            f"one with `python -m tl_degeneracy.models.digits.train --seed {seed} --out DIR` "
            "and load it with `load_checkpoint(DIR)`"
        )
    return load_checkpoint(path, dtype)


def training_record(path: str | Path) -> dict:
    """The `training.json` of a checkpoint folder (accuracy, epochs, seconds, recipe)."""
    return json.loads((Path(path) / "training.json").read_text())
