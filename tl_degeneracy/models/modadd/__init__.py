"""The modular-addition model zoo: data, checkpoints (the package's own and the reference's)
and the training script."""

from tl_degeneracy.models.modadd.checkpoints import (
    ModAddCheckpoint,
    default_checkpoint_dir,
    list_reference_checkpoints,
    load_checkpoint,
    save_checkpoint,
    shared_dir,
)
from tl_degeneracy.models.modadd.data import (
    ModAddDataset,
    accuracy,
    activations_on_all_inputs,
    all_inputs,
    all_labels,
    cross_entropy,
    evaluate,
    random_split,
)

__all__ = [
    "ModAddCheckpoint",
    "ModAddDataset",
    "accuracy",
    "activations_on_all_inputs",
    "all_inputs",
    "all_labels",
    "cross_entropy",
    "default_checkpoint_dir",
    "evaluate",
    "list_reference_checkpoints",
    "load_checkpoint",
    "random_split",
    "save_checkpoint",
    "shared_dir",
]
