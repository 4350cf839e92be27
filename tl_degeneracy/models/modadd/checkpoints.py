"""Modular-addition checkpoints: load them into either TransformerLens API, list them, save them.

A checkpoint is a directory with `model.safetensors` (a HookedTransformer state dict, attention
masks left out) and `config.json` (`model`: the config; `dataset`: modulus, frac_train, seed;
`train`: how it was trained). Its split is `split.safetensors` in the directory, or in its
parent (the reference layout, one split for `seed0 … seed4`); without one, the split is
regenerated from `dataset.frac_train` and `dataset.seed` (`ModAddDataset.random`).

Models are loaded with no weight processing (no `fold_ln`, no centring), because processing
would change every statistic, and carry that fact in `model.tl_degeneracy_weight_processing`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tl_degeneracy.engine import compat, identity
from tl_degeneracy.models.modadd.data import ModAddDataset

NO_WEIGHT_PROCESSING = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False}
SHARED_ENV = "TL_DEGENERACY_SHARED"


def default_checkpoint_dir() -> Path:
    """The package's own p = 113 checkpoint (trained with `tl_degeneracy.models.modadd.train`)."""
    return Path(str(resources.files("tl_degeneracy") / "assets" / "modadd"))


def shared_dir() -> Path | None:
    """The project's `shared/` folder: `$TL_DEGENERACY_SHARED`, else `../shared` beside the
    checkout. None when absent (a user's installation never has it)."""
    env = os.environ.get(SHARED_ENV)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared")
    for path in candidates:
        if path.is_dir():
            return path
    return None


def _reference_root(shared: str | Path | None) -> Path | None:
    root = Path(shared) if shared is not None else shared_dir()
    if root is None:
        return None
    for candidate in (root / "reference" / "modadd", root / "modadd", root):
        if (candidate / "seed0").is_dir() or any(candidate.glob("seed*/model.safetensors")):
            return candidate
    return None


def list_reference_checkpoints(shared: str | Path | None = None) -> list[Path]:
    """The reference checkpoints `…/reference/modadd/seed{0..4}`, sorted by seed; `shared` may
    be the shared folder or the modadd folder itself. Empty when not found."""
    root = _reference_root(shared)
    if root is None:
        return []
    dirs = [
        d
        for d in root.glob("seed*")
        if (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    ]
    return sorted(dirs, key=lambda d: int(d.name[4:]) if d.name[4:].isdigit() else 1 << 30)


@dataclass(frozen=True)
class ModAddCheckpoint:
    """A checkpoint directory, read: its config, weights and split."""

    path: Path
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    @classmethod
    def open(cls, path: str | Path | None = None) -> ModAddCheckpoint:
        """Read a checkpoint directory (default: the package's own)."""
        path = Path(path) if path is not None else default_checkpoint_dir()
        if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} needs model.safetensors and config.json")
        config = json.loads((path / "config.json").read_text())
        if "model" not in config:
            raise ValueError(f"{path}/config.json has no 'model' section")
        return cls(path, config, load_file(str(path / "model.safetensors")))

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.config["model"])

    @property
    def p(self) -> int:
        return self.model_config["d_vocab"] - 1

    @property
    def split_path(self) -> Path | None:
        """`split.safetensors` beside the weights, else in the parent folder; None if neither."""
        for candidate in (self.path / "split.safetensors", self.path.parent / "split.safetensors"):
            if candidate.is_file():
                return candidate
        return None

    def dataset(self) -> ModAddDataset:
        """The inputs with the split this checkpoint was trained on."""
        split = self.split_path
        if split is not None:
            return ModAddDataset.from_split_file(split, self.p)
        ds = self.config.get("dataset", {})
        return ModAddDataset.random(self.p, ds.get("frac_train", 0.3), ds.get("seed", 0))

    def model(
        self,
        api: compat.API | Literal["auto"] = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> nn.Module:
        """The model as a `HookedTransformer` or `TransformerBridge`, in `dtype`, no weight
        processing, in eval mode."""
        model = compat.build_model(
            self.model_config,
            self.state_dict,
            api=api,
            dtype=dtype,
            model_name=f"modadd-{self.path.name}",
        )
        identity.set_weight_processing(model, dict(NO_WEIGHT_PROCESSING))
        return model


def load_checkpoint(
    path: str | Path | None = None,
    api: compat.API | Literal["auto"] = "auto",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, ModAddDataset]:
    """Model and data set of a checkpoint directory (default: the package's own)."""
    ckpt = ModAddCheckpoint.open(path)
    return ckpt.model(api=api, dtype=dtype), ckpt.dataset()


def save_checkpoint(
    out: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    dataset: ModAddDataset | None = None,
) -> Path:
    """Write a model (either API) as a checkpoint directory in the reference format.

    `meta` holds the non-model sections of config.json (`dataset`, `train`, …); the weights are
    stored in float32 under HookedTransformer names, and `dataset`'s split beside them.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = compat.model_cfg(model)
    model_cfg = {
        "act_fn": cfg.act_fn,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "n_heads": cfg.n_heads,
        "n_layers": cfg.n_layers,
        "normalization_type": cfg.normalization_type,
    }
    weights = {
        k: v.detach().to(torch.float32).contiguous()
        for k, v in compat.hooked_state_dict(model).items()
    }
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model": model_cfg, **meta}, indent=1) + "\n")
    if dataset is not None:
        dataset.save_split(out / "split.safetensors")
    return out
