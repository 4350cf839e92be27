"""Checks of command-line values, made before anything is loaded: integer options get their
lower bound at parse time (argparse names the flag), and the output folder, devices and model
folder are checked at the start of a command, each error naming the flag and the fix."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def count(minimum: int, meaning: str = "") -> Callable[[str], int]:
    """An argparse `type=`: an integer of at least `minimum` (`meaning`, e.g. " (0 skips
    edges)", follows the bound in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer: give a whole number of at least {minimum}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{meaning}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


SEQ_LEN = count(2, " (BOS plus at least one token per row)")
THREADS = count(1)


def check_out(out: str | None) -> None:
    """Refuse an `--out` that names an existing file (it would fail late, inside a pass)."""
    if out is not None:
        path = Path(out).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {out} is a file: give a folder")


def check_device(flag: str, device: str | None) -> None:
    """Refuse a device this machine lacks, naming the flag that asked for it."""
    if device is None:
        return
    from tl_degeneracy.engine.compat import usable_device

    try:
        usable_device(device)
    except ValueError as error:
        raise ValueError(f"{flag} {device} cannot be used here: {error}") from error


def check_model_folder(spec: str | None) -> None:
    """A modular-addition checkpoint folder's `config.json` must be JSON, named by path
    (`fit-modadd` reads it with its own loader; the presets read it with `read_config`)."""
    if spec is None:
        return
    folder = Path(spec).expanduser()
    if (folder / "config.json").is_file():
        from tl_degeneracy.models.local import read_config

        read_config(folder)


_COMMON_FLAGS = {
    "settings.kinds": "--kinds",
    "settings.jacobian": "--sources",
    "settings.jacobian.stats_device": "--stats-device",
    "settings.edges.stats_device": "--stats-device",
    "settings.stats_device": "--stats-device",
    "settings.batch_rows": "--batch-rows",
    "settings.edge_tokens": "--edge-tokens",
    "settings.edge_outputs": "--edge-outputs",
    "settings.ablation_tokens": "--ablation-tokens",
    "settings.store": "--store",
    "model": "the model: --model or --api",
    "model.weight_digest": "the model's weights: --model, or --api (each API names them apart)",
    "model_dtype": "--dtype",
    "world_size": "processes: torchrun --nproc_per_node; absent for one process",
}
SETTING_FLAGS: dict[str, dict[str, str]] = {
    "fit": {
        **_COMMON_FLAGS,
        "sites": "--sites, --mlp-sites, --attn-sites or --keep-bos",
        "data": "the data: --text or --tokens, --n-tokens, --seq-len",
    },
    "fit-lm": {
        **_COMMON_FLAGS,
        "model": "--api or --blocks",
        "model.weight_digest": "--api (each API names the weights apart)",
        "sites": "--blocks or --keep-bos",
        "data": "the data: --tokens",
    },
}
"""What the command line calls each setting a checkpoint folder records, by command, so that
a refused resume names the flags that differ (`CheckpointMismatchError.labelled`)."""
SETTING_FLAGS["demo"] = SETTING_FLAGS["fit-lm"]
