"""The 8×8 digits preset: data (scikit-learn's `load_digits`, fixed split), a ReLU MLP written
as a `HookedRootModule` that declares its sections' closed forms, its training recipe and the
package's five checkpoints."""

from tl_degeneracy.models.digits.checkpoints import (
    SEEDS,
    checkpoint_dir,
    load_checkpoint,
    load_digits_model,
    training_record,
)
from tl_degeneracy.models.digits.data import DigitsDataset, labelled_accuracy
from tl_degeneracy.models.digits.model import DigitsMLP, DigitsMLPConfig, init_weights

__all__ = [
    "SEEDS",
    "DigitsDataset",
    "DigitsMLP",
    "DigitsMLPConfig",
    "checkpoint_dir",
    "init_weights",
    "labelled_accuracy",
    "load_checkpoint",
    "load_digits_model",
    "training_record",
]
