"""Streaming over token batches with progress, periodic checkpoints and resume.

Every statistic of the package is an accumulator: `update(batch_index, tokens)` folds one
batch in, `state_dict()`/`load_state_dict()` save and restore it. `stream` drives one over the
data, writes a checkpoint every few batches, and on a restart skips the batches already in it,
so a killed run resumes and ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Int
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm


@runtime_checkable
class Accumulator(Protocol):
    """Folds batches into a state of float64 sums and int64 counts of one element (a resume
    refuses a saved state of anything else, `stream`)."""

    def update(self, batch_index: int, tokens: Int[Tensor, "batch pos"]) -> None: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class EmptyDataError(ValueError):
    """No data reached an accumulator."""


def iter_batches(
    tokens: Int[Tensor, "n pos"] | np.ndarray | Iterable[Tensor],
    batch_size: int = 256,
    model: nn.Module | None = None,
) -> list[Tensor]:
    """Split a token tensor or NumPy array (or any model's inputs, batch first) into batches
    of `batch_size` rows, or take an iterable of batches, splitting any item of more than
    `batch_size` rows the same way (its rows stay in order; smaller items are kept as they
    are, not merged). With `model`, each batch is checked against it (`tokens.validate_tokens`:
    ids in the vocabulary, length within the context) and moved to its device."""
    if isinstance(tokens, np.ndarray):  # one array of rows, as `validate_tokens` reads it
        tokens = torch.as_tensor(tokens)
    if isinstance(tokens, Tensor):
        if tokens.ndim < 1 or tokens.shape[0] == 0:
            raise EmptyDataError("no data: the token tensor has zero rows")
        batches = list(tokens.split(batch_size))
    else:
        items = list(tokens)
        first = items[0] if items else None
        if isinstance(first, (list, tuple)) and first and isinstance(first[0], int):
            raise TypeError(
                "data that is not a tensor is read as a sequence of batches, and its first "
                "item is one row of ids, not a batch [batch, pos]: for rows of token ids in "
                "lists, pass one tensor, torch.tensor(rows)"
            )
        batches = [part for item in items for part in _split_item(item, batch_size)]
    if not batches:
        raise EmptyDataError("no data: the batch iterable is empty")
    if model is None:
        return batches
    from tl_degeneracy.engine.tokens import validate_tokens

    return [validate_tokens(model, b) for b in batches]


def _split_item(item: Any, batch_size: int) -> list[Any]:
    """One item of an iterable of batches in batches of at most `batch_size` rows (a tensor
    or array with more rows is split; anything else is left to `validate_tokens`)."""
    if isinstance(item, np.ndarray):
        item = torch.as_tensor(item)
    if isinstance(item, Tensor) and item.ndim >= 1 and item.shape[0] > batch_size:
        return list(item.split(batch_size))
    return [item]


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a long computation saves its state."""

    path: str | os.PathLike
    every: int = 10
    """Save after every `every` batches."""


def _save_checkpoint(
    path: Path, key: str, done: int, state: dict[str, Tensor], fingerprint: object = None
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f"{key}.safetensors.tmp"
    # The batch count travels inside the state file, so that one atomic replace updates both
    # (the JSON beside it is for people; a kill between the two replaces used to resume with
    # the new state and the old count, folding the last batches in twice).
    meta = {"batches_done": str(done)}
    if fingerprint is not None:
        meta["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path / f"{key}.safetensors")
    meta_path = path / f"{key}.json"
    tmp_meta = path / f"{key}.json.tmp"
    tmp_meta.write_text(json.dumps({"batches_done": done}))
    os.replace(tmp_meta, meta_path)


def _saved_header(path: Path, key: str) -> tuple[int, object] | None:
    """(batches done, the fingerprint it was saved with or None) of a state saved under
    `key`, from the state file's header alone; None when there is none. A file that cannot
    be read back is refused (`CheckpointDamagedError`), never resumed from."""
    meta, tensors = path / f"{key}.json", path / f"{key}.safetensors"
    if not tensors.exists():
        return None
    try:
        with safe_open(str(tensors), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointDamagedError(
            tensors, f"it is not a readable safetensors file ({error})"
        ) from error
    stored: object = header.get("batches_done")
    source = tensors
    if stored is None:  # a checkpoint written before the count moved into the state file
        if not meta.exists():
            return None
        source = meta
        try:
            record = json.loads(meta.read_text())
            stored = record["batches_done"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointDamagedError(
                meta, f"its batch count cannot be read ({error!r})"
            ) from error
    done = _batch_count(stored)
    if done is None:
        raise CheckpointDamagedError(
            source, f"batches_done is {stored!r}, not a whole number of at least 0"
        )
    saved = header.get("fingerprint")
    if saved is None:
        return done, None
    try:
        return done, json.loads(saved)
    except ValueError as error:
        raise CheckpointDamagedError(tensors, f"its fingerprint is not JSON ({error})") from error


def _batch_count(stored: object) -> int | None:
    """A saved `batches_done` as an int (digits in a header, an int in JSON); None if it is
    anything else."""
    if isinstance(stored, str) and re.fullmatch(r"[0-9]+", stored):
        return int(stored)
    if isinstance(stored, int) and not isinstance(stored, bool) and stored >= 0:
        return stored
    return None


def _load_checkpoint(path: Path, key: str) -> tuple[int, dict[str, Tensor], object] | None:
    """(batches done, state, the fingerprint it was saved with or None) of a saved state."""
    header = _saved_header(path, key)
    if header is None:
        return None
    done, fingerprint = header
    file = path / f"{key}.safetensors"
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointDamagedError(file, f"its tensors cannot be read ({error})") from error
    return done, state, fingerprint


def _check_state(
    file: Path,
    state: Mapping[str, Tensor],
    fresh: Mapping[str, Tensor],
    done: int,
    batches: Sequence[Tensor],
) -> None:
    """Refuse a saved state that its accumulator did not write: a batch count outside
    `0..len(batches)`, a tensor a fresh state has in another dtype or shape (or lacks), a sum
    that is not float64 and finite or a count that is not one int64, or a token count larger
    than the `done` batches hold."""
    if done > len(batches):
        raise CheckpointDamagedError(
            file, f"batches_done is {done}, but this pass has only {len(batches)} batches"
        )
    for name, tensor in fresh.items():
        if name not in state:
            raise CheckpointDamagedError(file, f"it has no tensor {name!r}")
        if state[name].dtype != tensor.dtype or state[name].shape != tensor.shape:
            raise CheckpointDamagedError(
                file,
                f"tensor {name!r} is {_spec(state[name])}, the accumulator keeps {_spec(tensor)}",
            )
    tokens = sum(int(b.numel()) for b in batches[:done])
    for name, tensor in state.items():
        count = tensor.dtype == torch.int64 and tensor.numel() == 1
        if not count and tensor.dtype != torch.float64:
            raise CheckpointDamagedError(
                file,
                f"tensor {name!r} is {_spec(tensor)}, not a float64 sum or one int64 count",
            )
        if not count and not bool(torch.isfinite(tensor).all()):
            raise CheckpointDamagedError(file, f"tensor {name!r} holds NaN or infinite values")
        if count and name.rsplit("/", 1)[-1] == "count" and not 0 <= int(tensor) <= tokens:
            raise CheckpointDamagedError(
                file,
                f"tensor {name!r} counts {int(tensor)} tokens, but its {done} batches hold "
                f"{tokens}",
            )


def _spec(tensor: Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"


def saved_batches(checkpoint: Checkpointing | None, key: str) -> int:
    """Batches a saved state under `key` has folded in (0: none saved); reads only the
    state file's header."""
    header = None if checkpoint is None else _saved_header(Path(checkpoint.path), key)
    return 0 if header is None else header[0]


def stream(
    accumulator: Accumulator,
    batches: list[Tensor],
    description: str,
    checkpoint: Checkpointing | None = None,
    key: str = "state",
    progress: bool = True,
    fingerprint: Callable[[], dict[str, Any]] | None = None,
) -> Accumulator:
    """Fold every batch into `accumulator`, with a progress bar (tokens/s and ETA).

    With `checkpoint`, the state is saved every `checkpoint.every` batches under `key` and a
    previous run's state is resumed from. `fingerprint` (called only when needed) describes
    what the state is of (`run_fingerprint`: model, data, settings): a state saved for
    anything else is refused (`CheckpointMismatchError`) rather than returned as this call's
    result. A folder a fit stamped as a whole (`claim_checkpoint_folder`) is checked there.
    A damaged state (unreadable, a batch count out of range, tensors the accumulator does not
    keep) is refused too (`CheckpointDamagedError`).
    """
    start = 0
    ckpt_dir = Path(checkpoint.path) if checkpoint else None
    expected = None
    resumed: dict[str, str] | None = None  # the resumed state's tensors, checked once
    file = Path()
    if ckpt_dir is not None:
        if fingerprint is not None and not (ckpt_dir / STAMP_FILE).exists():
            expected = jsonable_roundtrip(fingerprint())
        loaded = _load_checkpoint(ckpt_dir, key)
        if loaded is not None:
            start, state, saved = loaded
            if expected is not None and saved != expected:
                old = saved if isinstance(saved, dict) else {}
                raise CheckpointMismatchError(
                    f"{ckpt_dir} (state {key!r})", _differences(old, expected)
                )
            file = ckpt_dir / f"{key}.safetensors"
            _check_state(file, state, accumulator.state_dict(), start, batches)
            try:
                accumulator.load_state_dict(state)
            except (KeyError, IndexError, ValueError, RuntimeError, TypeError) as error:
                raise CheckpointDamagedError(
                    file, f"its state cannot be restored ({error!r})"
                ) from error
            resumed = {k: _spec(v) for k, v in state.items()}
            if progress and start:
                tqdm.write(
                    f"{description}: resumed from its checkpoint at batch {start} of "
                    f"{len(batches)}",
                    file=sys.stderr,  # beside the bars
                )
    n_tokens = sum(int(b.numel()) for b in batches)
    bar = tqdm(
        total=n_tokens,
        desc=description,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        initial=sum(int(b.numel()) for b in batches[:start]),
    )
    for i in range(start, len(batches)):
        if resumed is None:
            accumulator.update(i, batches[i])
        else:  # the first batch after a resume: a saved sum of another shape fails here
            try:
                accumulator.update(i, batches[i])
            except torch.cuda.OutOfMemoryError:  # not the checkpoint's fault
                raise
            except RuntimeError as error:
                raise CheckpointDamagedError(
                    file, f"the next batch cannot be folded into its state ({error})"
                ) from error
        bar.update(int(batches[i].numel()))
        if resumed is not None:  # ... or broadcasts silently
            now = {k: _spec(v) for k, v in accumulator.state_dict().items()}
            changed = [k for k in resumed if now.get(k) != resumed[k]]
            if changed:
                raise CheckpointDamagedError(
                    file,
                    f"tensor {changed[0]!r} is {resumed[changed[0]]}, the accumulator keeps "
                    f"{now.get(changed[0], '(none)')}",
                )
            resumed = None
        if ckpt_dir is not None and checkpoint is not None:
            if (i + 1) % checkpoint.every == 0 or i + 1 == len(batches):
                _save_checkpoint(ckpt_dir, key, i + 1, accumulator.state_dict(), expected)
    bar.close()
    return accumulator


def batch_generator(
    seed: int, *parts: int | str, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator seeded by `seed` and a batch's identity, so stochastic estimates do not
    depend on where a run was interrupted or how it was sharded. On a GPU it draws there
    (reproducible per device; a CPU and a GPU run draw different signs)."""
    text = "/".join(str(p) for p in (seed, *parts))
    h = 1469598103934665603
    for ch in text.encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 63)
    return torch.Generator(device=device).manual_seed(h)


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


STAMP_FILE = "fingerprint.json"
"""The stamp a checkpoint folder carries: what run wrote it (`claim_checkpoint_folder`)."""
STAMP_FORMAT = 2
"""Version of `fingerprint.json`. 2: the data digest covers every batch's shape and dtype, not
only the bytes of the data (format 1 took a reshaped tensor or moved batch boundaries for the
same data)."""


def finish_checkpoint_folder(folder: str | os.PathLike) -> None:
    """Remove a finished run's checkpoints but keep its stamp (`fingerprint.json`): a later run
    into the same output folder with other settings, model or data is then refused, naming
    what differs, rather than writing its results beside this run's; a run of the same
    settings recomputes and rewrites the same results."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name == STAMP_FILE:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


class CheckpointMismatchError(ValueError):
    """A checkpoint folder stamped by a run of other settings, model or data: it cannot be
    resumed. `differences` holds (dotted setting, that run's value, this run's value);
    `labelled` names the settings as a caller knows them (the command line: its flags)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        differences: Sequence[tuple[str, object, object]],
        labels: Mapping[str, str] | None = None,
    ):
        self.folder, self.differences, self.labels = Path(folder), list(differences), labels
        lines = [
            f"  {_label(path, labels)}: {_show(old, path)} -> {_show(new, path)}"
            for path, old, new in self.differences
        ]
        super().__init__(
            f"checkpoint folder {folder} was written by a run with other settings, model or "
            "data, so it cannot be resumed (setting: that run -> this run):\n"
            + "\n".join(lines or ["  (the stamp's fingerprint does not match its settings)"])
            + "\nto resume it, run again with that run's settings, model and data; to start "
            "over, use another folder (another --out on the command line) or delete this one"
        )

    def labelled(self, labels: Mapping[str, str]) -> CheckpointMismatchError:
        """The same refusal with each setting followed by its label (`labels` maps a dotted
        setting or a prefix of one, such as "model", to e.g. a command-line flag)."""
        return CheckpointMismatchError(self.folder, self.differences, labels)


class CheckpointDamagedError(CheckpointMismatchError):
    """A checkpoint file that cannot be read back as what it claims to be (truncated, not
    safetensors, a batch count out of range, tensors of another dtype or shape): refused,
    naming the file, rather than resumed into wrong numbers."""

    def __init__(self, file: str | os.PathLike, problem: str, fix: str | None = None):
        self.file, self.problem = Path(file), problem
        self.folder, self.differences, self.labels = self.file.parent, [], None
        if fix is None:
            fix = (
                f"delete {file} to compute that pass again, or run again without resuming "
                f"(another folder, another --out on the command line, or delete {self.folder})"
            )
        ValueError.__init__(self, f"checkpoint file {file} is damaged: {problem}; {fix}")

    def labelled(self, labels: Mapping[str, str]) -> CheckpointDamagedError:
        """Itself: a damaged file names no settings."""
        return self


def _label(path: str, labels: Mapping[str, str] | None) -> str:
    """`path`, with the label of its longest labelled prefix in parentheses."""
    if not labels:
        return path
    parts = path.replace("[", ".[").split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n]).replace(".[", "[")
        if key in labels:
            return f"{path} ({labels[key]})"
    return path


def claim_checkpoint_folder(
    folder: str | os.PathLike, settings: dict, barrier: Callable[[], None] | None = None
) -> Path:
    """Stamp `folder` with a fingerprint of `settings` (JSON data: config, model identity,
    sites, `data_fingerprint` of the data), or check the stamp a previous run left: a folder
    written by a run of other settings, model or data is refused, naming what differs, rather
    than resumed silently; so is a folder stamped by an older format, whose data digest cannot
    be checked. With several processes, rank 0 writes the stamp between two `barrier()` calls."""
    import hashlib

    folder = Path(folder)
    plain = jsonable_roundtrip(settings)  # tuples become lists, as they will be read back
    text = json.dumps(plain, sort_keys=True)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:20]
    stamp = folder / STAMP_FILE
    if stamp.exists():
        try:
            saved = json.loads(stamp.read_text())
        except (OSError, ValueError) as error:
            saved = error
        if not isinstance(saved, dict):
            problem = f"it is not a JSON object ({saved!r})"[:200]
            raise CheckpointDamagedError(
                stamp,
                problem,
                "use another folder (another --out on the command line), or delete "
                f"{folder} to start over",
            )
        if saved.get("format") != STAMP_FORMAT:
            raise ValueError(
                f"checkpoint folder {folder} was written by an older tl_degeneracy (checkpoint "
                f"format {saved.get('format', 1)}, this one writes {STAMP_FORMAT}) whose data "
                "digest ignored the shape and boundaries of the batches, so it cannot be checked "
                "against this run's data; use another folder (another --out on the command "
                "line), or delete this one to start over"
            )
        if saved.get("fingerprint") != fingerprint:
            raise CheckpointMismatchError(folder, _differences(saved.get("settings", {}), plain))
        return folder
    if barrier is not None:
        barrier()
    if barrier is None or int(os.environ.get("RANK", "0")) == 0:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{STAMP_FILE}.tmp"  # a kill mid-write leaves no half stamp
        record = {"format": STAMP_FORMAT, "fingerprint": fingerprint, "settings": plain}
        tmp.write_text(json.dumps(record))
        os.replace(tmp, stamp)
    if barrier is not None:
        barrier()
    return folder


_MISSING = object()


def _differences(old: object, new: object, path: str = "") -> list[tuple[str, object, object]]:
    """(dotted path, old value, new value) of every leaf where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, object, object]] = []
        for key in [*old, *(k for k in new if k not in old)]:
            sub = f"{path}.{key}" if path else str(key)
            out += _differences(old.get(key, _MISSING), new.get(key, _MISSING), sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{path}[{i}]")
        ]
    return [] if old == new else [(path, old, new)]


def _show(value: object, path: str = "", limit: int = 80) -> str:
    """A value for a refusal message: JSON, digests cut to 12 characters, long values cut."""
    if value is _MISSING:
        return "(absent)"
    if path.endswith("sha256") and isinstance(value, str):
        return value[:12] + "…"
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def jsonable_roundtrip(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


def data_digest(batches: Iterable[Tensor]) -> str:
    """A digest of the data (token ids or inputs) as the passes see it, for checkpoint
    fingerprints: every batch's dtype, shape and bytes in order, so reshaped data or moved
    batch boundaries with the same bytes digest differently (a resume on them would count
    other tokens and skip or repeat rows). One pass of SHA-256 over the data, no copy of it
    beyond a move to the CPU."""
    import hashlib

    h = hashlib.sha256(b"tl_degeneracy data digest v2")
    for batch in batches:
        flat = batch.detach().cpu().contiguous().reshape(-1)
        h.update(f"|{flat.dtype}{list(batch.shape)}|".encode())
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def describe_batches(batches: Sequence[Tensor], limit: int = 4) -> str:
    """The batches' shapes and dtypes for people, runs of equal ones counted:
    '11 x [2, 4] int64, 1 x [1, 4] int64'."""
    runs: list[list] = []
    for b in batches:
        key = f"{list(b.shape)} {str(b.dtype).removeprefix('torch.')}"
        if runs and runs[-1][0] == key:
            runs[-1][1] += 1
        else:
            runs.append([key, 1])
    text = ", ".join(f"{n} x {key}" for key, n in runs[:limit])
    return text + (f", ... ({len(runs) - limit} more runs)" if len(runs) > limit else "")


def rounded_digest(values: Tensor, digits: int = 8) -> str:
    """A digest of `values` rounded to `digits` significant digits: the same for tensors that
    differ by float64 rounding (a basis computed again on another thread count), different
    for any real change."""
    import hashlib

    x = values.detach().to("cpu", torch.float64).flatten()
    exponent = torch.zeros_like(x)
    nonzero = x != 0
    exponent[nonzero] = torch.floor(torch.log10(x[nonzero].abs()))
    mantissa = torch.round(x / 10 ** (exponent - (digits - 1)))
    h = hashlib.sha256(f"{list(values.shape)}".encode())
    h.update(mantissa.to(torch.int64).numpy().tobytes())
    h.update(exponent.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def run_fingerprint(model: nn.Module, batches: Sequence[Tensor], **settings: Any) -> dict:
    """What a checkpointed pass depends on: the model (identity and weight digest), its dtype,
    the data (`data_fingerprint`) and `settings` (JSON data; tensors by `rounded_digest`)."""
    from tl_degeneracy.engine.compat import model_dtype
    from tl_degeneracy.engine.identity import model_identity

    identity = {k: v for k, v in model_identity(model).items() if k != "api"}
    plain = {k: rounded_digest(v) if isinstance(v, Tensor) else v for k, v in settings.items()}
    return {
        "model": identity,
        "model_dtype": str(model_dtype(model)),
        "data": data_fingerprint(batches),
        **plain,
    }


def data_fingerprint(batches: Sequence[Tensor]) -> dict[str, str]:
    """What a checkpoint folder records of its data: the digest, and the batches' shapes so
    that a refusal can say how the data differs."""
    return {"batches": describe_batches(batches), "sha256": data_digest(batches)}
