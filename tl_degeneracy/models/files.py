"""A TransformerLens model as a folder (`config.json` with HookedTransformerConfig fields +
`model.safetensors` with HookedTransformer names), rebuilt on either API: how worker processes
of a distributed run and tests get the same model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tl_degeneracy.engine.compat import API, build_model, hooked_state_dict, model_config


def save_model_file(model: nn.Module, config: dict | None, folder: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` (HookedTransformer names) so that another
    process can rebuild the same model with `load_model_file`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in hooked_state_dict(model).items()}
    save_file(sd, str(folder / "model.safetensors"))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = dict(config if config is not None else model_config(model))
    (folder / "config.json").write_text(json.dumps({**config, "dtype": dtype}))
    return folder


def load_model_file(folder: str | Path, api: API | Literal["auto"] = "auto") -> nn.Module:
    """A model written by `save_model_file`."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    dtype = getattr(torch, config.pop("dtype", "float32"))
    sd = load_file(str(folder / "model.safetensors"))
    return build_model(config, sd, api=api, dtype=dtype)
