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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tl_degeneracy.engine import compat, identity
from tl_degeneracy.models.modadd.data import ModAddDataset

NO_WEIGHT_PROCESSING = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False}
SHARED_ENV = "TL_DEGENERACY_SHARED"
REWRITE = (
    "write the checkpoint again with tl_degeneracy.models.modadd.save_checkpoint(folder, model, "
    "meta)"
)
"""The fix every refused checkpoint file names."""
_REQUIRED_SIZES = ("d_model", "d_head", "n_layers", "n_ctx", "d_vocab")
_SIZES = (*_REQUIRED_SIZES, "d_mlp", "n_heads")


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
        config = read_checkpoint_config(path / "config.json")
        return cls(path, config, read_weights(path / "model.safetensors"))

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
        model = self._build(api, dtype)
        identity.set_weight_processing(model, dict(NO_WEIGHT_PROCESSING))
        return model

    def _build(self, api: compat.API | Literal["auto"], dtype: torch.dtype) -> nn.Module:
        """`compat.build_model` on the checkpoint; weights that do not fit the config (a wrong
        shape, a missing or extra tensor) name both files."""
        self._check_shapes()
        try:
            return compat.build_model(
                self.model_config,
                self.state_dict,
                api=api,
                dtype=dtype,
                model_name=f"modadd-{self.path.name}",
            )
        except compat.NoHookedTransformerError:
            raise
        except (RuntimeError, ValueError) as error:  # load_state_dict: shapes, names
            detail = " ".join(str(error).split())
            detail = detail if len(detail) <= 400 else detail[:400] + " …"
            raise ValueError(
                f"{self.path / 'model.safetensors'} does not fit {self.path / 'config.json'} "
                f"({detail}); give the checkpoint's own config.json, or {REWRITE}"
            ) from error

    def _check_shapes(self) -> None:
        """Each weight's shape against the one `config.json` gives it (either API builds from
        these HookedTransformer names; a mismatch is named here, not deep inside a load)."""
        want = _expected_shapes(self.model_config)
        for key, tensor in self.state_dict.items():
            shape = want.get(key.split(".", 2)[-1] if key.startswith("blocks.") else key)
            if shape is not None and tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{self.path / 'model.safetensors'}: {key} has shape {list(tensor.shape)}, "
                    f"but {self.path / 'config.json'} gives it {list(shape)}; give the "
                    f"checkpoint's own config.json, or {REWRITE}"
                )


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes a (checked) model config gives the weights, by HookedTransformer name (a
    block's weights without their `blocks.<i>.` prefix)."""
    d, v, h = cfg["d_model"], cfg["d_vocab"], cfg["d_head"]
    heads, mlp = cfg.get("n_heads") or d // h, cfg.get("d_mlp") or 4 * d
    out: int = cfg.get("d_vocab_out") or -1
    out = out if _is_int(out) and out > 0 else v  # TransformerLens's -1: d_vocab
    return {
        "embed.W_E": (v, d),
        "pos_embed.W_pos": (cfg["n_ctx"], d),
        **{f"attn.W_{x}": (heads, d, h) for x in "QKV"},
        **{f"attn.b_{x}": (heads, h) for x in "QKV"},
        "attn.W_O": (heads, h, d),
        "attn.b_O": (d,),
        "mlp.W_in": (d, mlp),
        "mlp.b_in": (mlp,),
        "mlp.W_out": (mlp, d),
        "mlp.b_out": (d,),
        "unembed.W_U": (d, out),
        "unembed.b_U": (out,),
    }


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's `model.safetensors`; anything else (a pickle, a truncated
    copy) is refused by name, never unpickled."""
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a safetensors file ({error}): a truncated copy, or another format "
            f"(pickles are never loaded); copy it again, or {REWRITE}"
        ) from error


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    """A checkpoint's `config.json`, checked: a `model` object whose sizes are whole numbers,
    and a `dataset` object whose modulus, split fraction and seed fit it. Errors name the
    file, the key and the fix."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # a JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(
            f"{path} is not valid JSON ({error}); fix the file, or {REWRITE}"
        ) from error
    problem = _config_problem(config)
    if problem is not None:
        raise ValueError(f"{path}: {problem}; fix it, or {REWRITE}")
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _config_problem(config: Any) -> str | None:
    """What is wrong with a checkpoint's config (None: nothing found)."""
    if not isinstance(config, dict):
        return f"holds a JSON {_json_type(config)}, not an object with a 'model' section"
    model = config.get("model")
    if model is None:
        return "has no 'model' section (the TransformerLens config: d_model, d_vocab, ...)"
    if not isinstance(model, dict):
        return f"'model' is a JSON {_json_type(model)}, not an object of TransformerLens settings"
    for key in _SIZES:
        if model.get(key) is None:  # d_mlp, n_heads: TransformerLens's defaults
            if key in _REQUIRED_SIZES:
                return f"model.{key} is missing or null; give it as a whole number"
            continue
        value = model[key]
        if not _is_int(value) or value < 1:
            return f"model.{key} is {value!r}; it must be a whole number of at least 1"
    if model["d_vocab"] < 3:
        return f"model.d_vocab is {model['d_vocab']}; it must be the modulus + 1, at least 3"
    for key in ("act_fn", "normalization_type"):
        if model.get(key) is not None and not isinstance(model[key], str):
            return f"model.{key} is {model[key]!r}; it must be a string (e.g. 'relu') or null"
    dataset = config.get("dataset", {})
    if not isinstance(dataset, dict):
        return f"'dataset' is a JSON {_json_type(dataset)}, not an object (modulus, seed, ...)"
    p = model["d_vocab"] - 1
    if "modulus" in dataset and (not _is_int(dataset["modulus"]) or dataset["modulus"] != p):
        return (
            f"dataset.modulus is {dataset['modulus']!r}, but model.d_vocab {p + 1} makes the "
            f"modulus {p} (d_vocab is the modulus + 1, for '=')"
        )
    frac = dataset.get("frac_train", 0.3)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < frac < 1.0:
        return f"dataset.frac_train is {frac!r}; it must be a number between 0 and 1"
    if not _is_int(dataset.get("seed", 0)):
        return f"dataset.seed is {dataset['seed']!r}; it must be a whole number"
    return None


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
