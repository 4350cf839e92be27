"""What identifies a model in saved results: its configuration, its weight processing, and a
fingerprint of every weight (so that a result refuses a model it was not computed on, and a
change of any block's weights shows: a rescaling, a sign flip or a permutation of its
entries). Reading every weight costs one pass over it, once per state of the weights."""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tl_degeneracy.engine.compat import (
    api_of,
    has_hooked_weights,
    hooked_state_dict,
    is_bridge,
    is_transformer,
    model_cfg,
)

PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
"""TransformerLens's weight-processing flags, as its loaders and `process_weights` take them."""


def weight_processing(model: nn.Module) -> dict[str, Any]:
    """Weight-processing flags of a model, as far as they can be read from it.

    Loaders of this package set `model.tl_degeneracy_weight_processing` explicitly. Otherwise
    a TransformerBridge's own record is read (`bridge_processing`), and a HookedTransformer's
    config (`fold_ln` turns its `normalization_type` into "LNPre" or "RMSPre"). A Bridge
    processed after such a loader recorded no processing (`enable_compatibility_mode()` on a
    model `load_local` left unprocessed) reports the processing it has now.
    """
    explicit = getattr(model, "tl_degeneracy_weight_processing", None)
    processed = bridge_processing(model)
    if explicit is not None:
        if processed is not None and not any(explicit.get(k) for k in PROCESSING_FLAGS):
            return {**explicit, **processed}
        return dict(explicit)
    if processed is not None:
        return processed
    if not is_transformer(model):
        return {}
    cfg = model_cfg(model)
    return {
        "fold_ln": str(getattr(cfg, "normalization_type", None)).endswith("Pre"),
        "center_writing_weights": None,
        "center_unembed": None,
        "normalization_type": getattr(cfg, "normalization_type", None),
    }


def bridge_processing(model: nn.Module) -> dict[str, Any] | None:
    """The weight processing a TransformerBridge records of itself, or None when it has not
    processed its weights (or is no Bridge).

    `TransformerBridge.process_weights` (which `enable_compatibility_mode()` calls unless
    `no_processing=True`) sets `_weights_processed` and hands `fold_ln` to its architecture
    adapter (`adapter._fold_ln_requested`), whose `supports_fold_ln` says whether it folds at
    all; the same on TransformerLens 3.9 and 4.x. It keeps no record of the centring and value-
    bias flags (None here), and leaves `cfg.normalization_type` as it was: "Pre" is added to it
    here when the norms were folded, as `load_local` records it."""
    if not (is_transformer(model) and is_bridge(model)):
        return None
    if not getattr(model, "_weights_processed", False):
        return None
    adapter = getattr(model, "adapter", None)
    norm = getattr(model_cfg(model), "normalization_type", None)
    folded = (
        isinstance(norm, str)
        and bool(getattr(adapter, "_fold_ln_requested", True))
        and bool(getattr(adapter, "supports_fold_ln", True))
    )
    return {
        "fold_ln": folded,
        "center_writing_weights": None,
        "center_unembed": None,
        "fold_value_biases": None,
        "normalization_type": f"{str(norm).removesuffix('Pre')}Pre" if folded else norm,
        "processed_by": "TransformerBridge.process_weights (centring flags not recorded)",
    }


def model_identity(model: nn.Module) -> dict[str, Any]:
    """Config fields and a digest of every weight that identify a model; saved with every
    result, so that a result refuses a model it was not computed on."""
    return _identity(model, _weight_sums(model))


def identity_and_fingerprint(model: nn.Module) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """`model_identity` and `weight_fingerprint` together, the weights' state checked once
    (what every result's metadata records)."""
    sums = _weight_sums(model)
    return _identity(model, sums), _fingerprint(sums)


def _identity(model: nn.Module, sums: dict[str, tuple]) -> dict[str, Any]:
    if not is_transformer(model):
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        return {
            "model_name": type(model).__name__,
            "api": "module",
            "weight_shapes": shapes,
            "weight_digest": _digest(sums),
        }
    cfg = model_cfg(model)
    fields = {
        k: getattr(cfg, k, None)
        for k in (
            "model_name",
            "n_layers",
            "d_model",
            "n_heads",
            "d_head",
            "d_mlp",
            "d_vocab",
            "n_ctx",
        )
    }
    fields["act_fn"] = getattr(cfg, "act_fn", None)
    fields["api"] = api_of(model)
    fields["weight_digest"] = _digest(sums)
    return fields


def weight_digest(model: nn.Module) -> str:
    """A digest of every weight, stable across the two APIs and across dtypes and devices.

    Per tensor (HookedTransformer names and layouts on either API) four sums rounded to 5
    significant digits, so that the same weights held in float32 or float64, on any device,
    as a HookedTransformer or a Bridge, agree, and a change of any block's weights shows.
    """
    return _digest(_weight_sums(model))


def _digest(sums: dict[str, tuple]) -> str:
    h = hashlib.sha256()
    for key, (total, l1, l2sq, head, *_) in sums.items():
        h.update(key.encode())
        h.update(" ".join(f"{x:.5g}" for x in (total, l1, l2sq, head)).encode())
    return h.hexdigest()[:16]


def weight_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """Per weight tensor (HookedTransformer names on either API), `FINGERPRINT_FIELDS`: mean
    |w| and root mean square (what a rescaling changes), mean w (a sign flip), and the means of
    w weighted by its row's and its column's relative position (a permutation of rows or
    columns, e.g. of neurons or heads), to 12 significant digits. Stable across APIs,
    devices and dtypes up to the dtypes' rounding (`fingerprint_difference`)."""
    return _fingerprint(_weight_sums(model))


FINGERPRINT_FIELDS = ("mean |w|", "rms", "mean w", "row-weighted mean", "column-weighted mean")
"""What `weight_fingerprint` records per tensor, in order. Fingerprints saved by earlier
versions hold only the first two (to 6 significant digits), which a sign flip or a
permutation leaves unchanged (`artifacts.check_model` then also compares the digest)."""


def _fingerprint(sums: dict[str, tuple]) -> dict[str, list[float]]:
    return {
        key: [
            float(f"{x:.12g}")
            for x in (l1 / n, math.sqrt(l2sq / n), total / n, by_row / n, by_col / n)
        ]
        for key, (total, l1, l2sq, _, by_row, by_col, n) in sums.items()
        if n
    }


def _weight_sums(model: nn.Module) -> dict[str, tuple[float, ...]]:
    """Per floating-point weight tensor, sorted by name: Σw, Σ|w|, Σw², the sum of its first
    64 entries, Σ (r/R) w and Σ (c/C) w for the entry's row r of R and column c of C (the
    tensor viewed as rows along its last dimension), and its size; in float64, read once per
    state of the weights (`_cached`)."""
    return _cached(model, "sums", _read_weight_sums)


def _read_weight_sums(model: nn.Module) -> dict[str, tuple[float, ...]]:
    readable = is_transformer(model) and has_hooked_weights(model)
    state = hooked_state_dict(model) if readable else model.state_dict()
    keys = [k for k in sorted(state) if state[k].is_floating_point()]
    per_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for key in keys:
        per_device.setdefault(state[key].device, []).append((key, _sums(state[key])))
    read = {}  # one transfer (one synchronisation) per device, not one per tensor
    for pairs in per_device.values():
        values = torch.stack([s for _, s in pairs]).tolist()
        read.update({key: v for (key, _), v in zip(pairs, values)})
    return {key: (*read[key], state[key].numel()) for key in keys}


def _sums(weight: Tensor) -> Tensor:
    """The six float64 sums of `_weight_sums` for one tensor, on its device. The position-
    weighted sums take one pass: the tensor's rows times [1, c/C] give each row's sum and its
    column-weighted sum (a position-weighted sum over the flattened tensor would need a
    vector as long as it)."""
    t = weight.detach().flatten().to(torch.float64)
    if t.numel() == 0:
        return t.new_zeros(6)
    width = weight.shape[-1] if weight.ndim else 1
    matrix = t.view(-1, width)
    rows = matrix.shape[0]
    ones_and_ramp = torch.stack(
        [t.new_ones(width), torch.arange(width, dtype=torch.float64, device=t.device) / width], 1
    )
    per_row = matrix @ ones_and_ramp  # [rows, 2]: Σ_c w_rc and Σ_c (c/C) w_rc
    row_ramp = torch.arange(rows, dtype=torch.float64, device=t.device) / rows
    return torch.stack(
        [
            t.sum(),  # these four as before: the digest of results saved earlier stays valid
            t.abs().sum(),
            t.dot(t),
            t[:64].sum(),
            per_row[:, 0].dot(row_ramp),
            per_row[:, 1].sum(),
        ]
    )


_GROUPED = re.compile(r"\.attn\._([Wb]_[KV])$")
_DERIVED_BUFFERS = ("rotary_sin", "rotary_cos")
"""Floating buffers a HookedTransformer computes from its config, which a Bridge lacks."""


def comparable_fingerprint(fingerprint: dict[str, list[float]]) -> dict[str, list[float]]:
    """A fingerprint under names both APIs share: grouped-query attention's key and value
    weights `attn._W_K` (HookedTransformer) are `attn.W_K` (Bridge); rotary tables computed
    from the config are left out."""
    out = {}
    for name, values in fingerprint.items():
        if name.endswith(_DERIVED_BUFFERS):
            continue
        out[_GROUPED.sub(r".attn.\1", name) if ".attn._" in name else name] = values
    return out


def rounding_tolerance(*dtypes: torch.dtype | str | None) -> float:
    """Relative tolerance of fingerprint fields between copies of the same weights held in
    `dtypes`: each entry is rounded at most once to the coarsest of them (relative error ≤
    eps/2), a loader's processing in that dtype may add a few roundings, and float64 sums
    differ by their order; so 16 eps of the coarsest dtype, within [1e-9, 1e-2]. An unknown
    dtype counts as the coarsest (1e-2)."""
    eps = 0.0
    for dtype in dtypes:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            return 1e-2
        eps = max(eps, torch.finfo(dtype).eps)
    return min(1e-2, max(1e-9, 16 * eps))


def fingerprint_difference(
    saved: list[float], here: list[float], rtol: float
) -> tuple[str, float, float] | None:
    """The first field (of `FINGERPRINT_FIELDS`) in which two fingerprints of one tensor
    differ beyond `rtol`, as (field, saved, here); None when they agree. Every field is
    compared on the scale of the tensor's mean |w|: each is a mean of entries weighted by at
    most 1, so rounding each entry by a relative ε moves it by at most ε·mean |w|."""
    scale = max(abs(saved[0]), abs(here[0]))
    for field, a, b in zip(FINGERPRINT_FIELDS, saved, here):
        if abs(a - b) > rtol * max(scale, abs(a), abs(b)) + 1e-300:
            return field, a, b
    return None


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)
"""Per model: the key of its weights when last read, and what was read then. Every result's
metadata asks for the digest and the fingerprint, and on a 135M-parameter model reading every
weight costs about a CPU second."""


def _weights_key(model: nn.Module) -> tuple:
    """What identifies the weights' current values cheaply (7 ms for SmolLM2's 574 tensors): each
    tensor's storage, version counter, dtype, device and shape, and its first and last entries
    (which catch writes through `.data` that the version counter does not see)."""
    meta = []
    corners: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        meta.append((name, t.data_ptr(), t._version, str(t.dtype), str(t.device), tuple(t.shape)))
        if t.numel() and t.is_floating_point():
            x = t.detach()
            group = corners.setdefault((x.device, x.dtype), [])
            group += [x[(0,) * x.ndim], x[tuple(n - 1 for n in x.shape)]]
    probe = [v for group in corners.values() for v in torch.stack(group).cpu().tolist()]
    return tuple(meta), tuple(probe)


def _cached(model: nn.Module, kind: str, compute: Callable[[nn.Module], Any]) -> Any:
    key = _weights_key(model)
    entry = _CACHE.get(model)
    if entry is None or entry[0] != key:
        entry = (key, {})
        _CACHE[model] = entry
    if kind not in entry[1]:
        entry[1][kind] = compute(model)
    return entry[1][kind]


def set_weight_processing(model: nn.Module, flags: dict[str, Any]) -> None:
    """Record how a loader processed the weights, as `model.tl_degeneracy_weight_processing`
    (read back by `weight_processing`)."""
    hooked: Any = model  # nn.Module.__setattr__ is typed for tensors and modules only
    hooked.tl_degeneracy_weight_processing = flags
