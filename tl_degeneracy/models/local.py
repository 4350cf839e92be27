"""Load a Hugging Face-format checkpoint folder into TransformerLens, offline.

A folder holds `config.json`, the weights as `*.safetensors` (one file, or shards listed in
`model.safetensors.index.json`) and tokenizer files, as `save_pretrained` writes them. It is
read with `transformers` (`local_files_only`, never the hub) and wrapped as a
`HookedTransformer` (TransformerLens 3.x: the config is built from the folder's own
`config.json`, see `architectures`) or a `TransformerBridge` (3.x and 4.x: Hugging Face's modules
behind TransformerLens hooks). A `transformers` model already in memory takes the same way
from there (`from_hf`).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tl_degeneracy.engine.compat import (
    as_dtype,
    available_apis,
    model_cfg,
    require_hooked_transformer,
    usable_device,
)
from tl_degeneracy.engine.identity import set_weight_processing
from tl_degeneracy.models.architectures import (
    Architecture,
    UnsupportedArchitectureError,
    architecture_of,
)
from tl_degeneracy.models.rmsnorm import round_rmsnorm_like_hugging_face
from tl_degeneracy.models.weight_layout import store_weights_transposed

DEFAULT_MAX_CTX = 2048
"""Context length used when `n_ctx` is not given and the config allows more (rotary models):
HookedTransformer allocates an `n_ctx × n_ctx` mask per layer."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# Buffers a HookedTransformer computes itself rather than loading.
_TL_BUFFERS = ("mask", "IGNORE", "rotary_sin", "rotary_cos")


def _offline() -> None:
    """Forbid Hugging Face hub access before transformers is used."""
    os.environ["HF_HUB_OFFLINE"] = "1"


def check_folder(folder: str | os.PathLike[str], tokenizer: bool = True) -> dict[str, Any]:
    """The folder's `config.json`, after checking that the weights (and, with `tokenizer`,
    tokenizer files) are there. Raises `FileNotFoundError` naming what is missing and how to
    write it."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder; pass the directory that model.save_pretrained() wrote"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; save the model with model.save_pretrained({folder!s})"
        )
    config = read_config(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = _shards(index)
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: model.safetensors.index.json lists {len(shards)} shards but "
                f"{missing} are missing; copy every shard into the folder"
            )
    elif not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt*")
        )
        found = f" (found {pickled}: pickle files, which are never loaded)" if pickled else ""
        raise FileNotFoundError(
            f"{folder} has no *.safetensors weights{found}; write them with "
            "model.save_pretrained(folder) (transformers saves safetensors by default)"
        )
    if tokenizer and not _has_tokenizer_files(folder):
        raise FileNotFoundError(
            f"{folder} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); save "
            "them with tokenizer.save_pretrained(folder), or give one: tokenizer=<a tokenizer "
            "or a folder with its files> in Python, --tokenizer FOLDER on the command line"
        )
    return config


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's `config.json` as a dict; a file that is not a JSON object is named, with
    the fix."""
    return _read_json_object(Path(folder).expanduser() / "config.json", "model.save_pretrained")


def _read_json_object(path: Path, writer: str) -> dict[str, Any]:
    """A JSON object from `path`; anything else is named, with the fix (`writer`: what wrote
    the file, e.g. "tokenizer.save_pretrained")."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # a JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(
            f"{path} is not valid JSON ({error}); fix the file, or write it again with "
            f"{writer}(folder)"
        ) from error
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, not an object of settings; "
            f"write it again with {writer}(folder)"
        )
    return data


def _shards(index: Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` lists."""
    weight_map = _read_json_object(index, "model.save_pretrained").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(
            f"{index} has no 'weight_map' of tensor names to shard files; write the weights "
            "again with model.save_pretrained(folder)"
        )
    return sorted(set(weight_map.values()))


def weight_shapes(folder: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a folder's weights (`model.safetensors`, or the shards its
    index lists), read from the headers only. A file that is not safetensors (a truncated
    copy, a pickle: never unpickled) is named, with the fix."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder).expanduser()
    index = folder / "model.safetensors.index.json"
    files = (
        [folder / s for s in _shards(index)] if index.is_file() else [folder / "model.safetensors"]
    )
    shapes: dict[str, tuple[int, ...]] = {}
    for path in (f for f in files if f.is_file()):
        try:
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():
                    shapes[key] = tuple(weights.get_slice(key).get_shape())
        except SafetensorError as error:
            raise ValueError(
                f"{path} is not a safetensors file ({error}): a truncated copy, or another "
                "format (pickles are never loaded); copy it again, or write the weights with "
                "model.save_pretrained(folder)"
            ) from error
    return shapes


def _has_tokenizer_files(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in `folder` (`tokenizer.save_pretrained`), read offline: for a
    checkpoint saved without one, say its base model's folder."""
    folder = Path(folder).expanduser()
    if not _has_tokenizer_files(folder):
        raise FileNotFoundError(
            f"{folder} is not a folder with tokenizer files (looked for "
            f"{', '.join(TOKENIZER_FILES)}); write them with tokenizer.save_pretrained(folder)"
        )
    _offline()
    return _read_tokenizer(folder)


def load_hf(
    folder: str | os.PathLike[str],
    dtype: torch.dtype | str = torch.float32,
    n_ctx: int | None = None,
    tokenizer: Any | None = None,
    api: Literal["hooked", "bridge"] = "bridge",
) -> tuple[nn.Module, Any]:
    """The `transformers` causal LM (eager attention, eval mode) and tokenizer of a folder,
    read from local files only. `dtype` is a `torch.dtype` or its name ("bfloat16"); `n_ctx`
    overrides a rotary model's context length (capped at 2048 by default when `api` is the
    HookedTransformer it will be converted to); `tokenizer` (a tokenizer, or a folder with
    one) replaces the folder's own."""
    dtype = as_dtype(dtype)
    folder = Path(folder).expanduser()
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    config = check_folder(folder, tokenizer=tokenizer is None)
    arch = architecture_of(config, api="bridge")
    _offline()
    import transformers

    overrides = _context_override(arch, config, n_ctx, api)
    hf_class = getattr(transformers, arch.hf_class)
    _check_config_fits_weights(folder, hf_class, overrides)
    with quiet_transformers():
        try:
            model = hf_class.from_pretrained(
                folder,
                local_files_only=True,
                use_safetensors=True,
                dtype=dtype,
                attn_implementation="eager",
                **overrides,
            )
        except _LOAD_ERRORS as error:
            raise ValueError(
                f"{folder}: transformers cannot load {arch.hf_class} from config.json and the "
                f"weights ({_one_line(error)}); write the folder again with "
                "model.save_pretrained(folder)"
            ) from error
    return model.eval(), tokenizer if tokenizer is not None else _read_tokenizer(folder)


def _one_line(error: BaseException, limit: int = 400) -> str:
    """`Type: message` of an error on one line, cut at `limit` characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit] + " …"


def _config_errors() -> tuple[type[BaseException], ...]:
    """What building a `transformers` config or model from bad settings raises."""
    from huggingface_hub.errors import StrictDataclassError

    return (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError, RuntimeError)


_LOAD_ERRORS = (ValueError, TypeError, KeyError, RuntimeError, OSError)
"""What `from_pretrained` raises on files it cannot use (after the checks above)."""


def _check_config_fits_weights(folder: Path, hf_class: Any, overrides: dict) -> None:
    """Refuse, naming the file and key, a `config.json` that `transformers` cannot build a
    model from (a size given as text, a negative one) or that gives the weights other shapes
    than the safetensors headers, and weights that are not safetensors: before
    `from_pretrained`, whose own errors name neither (and whose mismatch report is a table)."""
    config_path = folder / "config.json"
    shapes = weight_shapes(folder)
    try:
        hf_config = hf_class.config_class.from_pretrained(
            folder, local_files_only=True, **overrides
        )
        with torch.device("meta"), quiet_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = {k: tuple(v.shape) for k, v in hf_class(hf_config).state_dict().items()}
    except _config_errors() as error:
        raise ValueError(
            f"{config_path} does not describe a {hf_class.__name__} ({_one_line(error)}); fix "
            "the setting, or write the file again with model.save_pretrained(folder)"
        ) from error
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if wrong:
        key = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise ValueError(
            f"{config_path} does not fit the weights beside it: {key} has shape "
            f"{list(shapes[key])} in the safetensors, but config.json gives it "
            f"{list(expected[key])}{more}; give the checkpoint's own config.json, or write "
            "both again with model.save_pretrained(folder)"
        )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No `transformers` progress bars (loading and writing weights) inside the block."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


TOKENIZER_JSON = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
)
"""Tokenizer files that are JSON, checked by name before `transformers` reads them."""


def _read_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """The tokenizer in `folder`; a damaged file is named, with the fix."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    for name in TOKENIZER_JSON:
        if (folder / name).is_file():
            _read_json_object(folder / name, "tokenizer.save_pretrained")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # the tokenizers library raises bare Exceptions
        raise ValueError(
            f"{folder}: transformers cannot read the tokenizer files ({_one_line(error)}); write "
            "them again with tokenizer.save_pretrained(folder), or give another tokenizer "
            "(--tokenizer FOLDER; tokenizer= in Python)"
        ) from error


def _context_override(
    arch: Architecture, config: dict[str, Any], n_ctx: int | None, api: str
) -> dict:
    """The config override that sets the context length (rotary models; learned position
    tables fix it). Only a HookedTransformer caps it at `DEFAULT_MAX_CTX` by default: it
    allocates an n_ctx × n_ctx mask per layer; the Bridge keeps the folder's own."""
    if arch.name == "gpt2":
        if n_ctx is not None and n_ctx != config["n_positions"]:
            raise ValueError(
                f"n_ctx={n_ctx}: a GPT-2 checkpoint's learned position table fixes the context "
                f"at {config['n_positions']}; leave n_ctx unset"
            )
        return {}
    if api != "hooked" or not arch.hooked:  # the Bridge allocates nothing per position
        return {} if n_ctx is None else {"max_position_embeddings": n_ctx}
    limit = config.get("max_position_embeddings", DEFAULT_MAX_CTX)
    return {"max_position_embeddings": n_ctx or min(limit, DEFAULT_MAX_CTX)}


def load_local(
    folder: str | os.PathLike[str],
    api: Literal["auto", "hooked", "bridge"] = "auto",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    n_ctx: int | None = None,
    model_name: str | None = None,
    tokenizer: Any | None = None,
    verify: bool = True,
) -> nn.Module:
    """A Hugging Face-format folder as a TransformerLens model, without the hub.

    `api="auto"` gives a `HookedTransformer` where TransformerLens still has one (3.x) and the
    architecture is one of `architectures.ARCHITECTURES`, else a `TransformerBridge`, which
    also loads any other causal LM TransformerLens has a Bridge adapter for (run through its
    hooks only; docs/models.md). By default no weight processing is applied, so activations
    are those of the stored weights; `fold_ln=True, center_writing_weights=True,
    center_unembed=True, fold_value_biases=True` is TransformerLens's `from_pretrained`
    default. Rotary models loaded as a HookedTransformer get `n_ctx =
    min(max_position_embeddings, 2048)` unless `n_ctx` says otherwise (the Bridge keeps the
    folder's own). An unsupported architecture is named in the error.
    `tokenizer` (a tokenizer, or a folder with its files) replaces the folder's own, e.g. for
    a fine-tuned checkpoint saved without one. `dtype` is a `torch.dtype` or its name
    ("float32", "bfloat16", ...; `compat.as_dtype`). With `verify` the loaded model must give
    `transformers`' log-probabilities on a probe batch to rounding (`check_reproduces`), else
    the load is refused.
    """
    dtype = as_dtype(dtype)
    folder = Path(folder).expanduser()
    _check_api(api)
    device = usable_device(device)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    arch, api = _resolve_api(check_folder(folder, tokenizer=tokenizer is None), api)
    hf_model, tokenizer = load_hf(folder, dtype=dtype, n_ctx=n_ctx, tokenizer=tokenizer, api=api)
    processing = _processing(fold_ln, center_writing_weights, center_unembed, fold_value_biases)
    name = model_name or folder.resolve().name
    return _to_transformer_lens(
        hf_model,
        tokenizer,
        arch,
        api,
        dtype,
        device,
        processing,
        name,
        str(folder.resolve()),
        verify,
    )


def from_hf(
    hf_model: nn.Module,
    tokenizer: Any | None = None,
    api: Literal["auto", "hooked", "bridge"] = "auto",
    device: str | torch.device | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    n_ctx: int | None = None,
    model_name: str | None = None,
    verify: bool = True,
    in_place: bool = False,
) -> nn.Module:
    """A `transformers` causal LM already in memory (fine-tuned, adapters merged, edited) as a
    TransformerLens model, as `load_local` would load it from its folder.

    The model keeps its dtype (convert it with `hf_model.to(dtype)` first) and, unless `device`
    says otherwise, its device; it is left as it was. A `HookedTransformer` gets converted
    copies of its weights. The Bridge rebuilds the model it wraps in place (its layers become
    Bridge modules, and `save_pretrained` fails), so it wraps a copy, in eval mode with eager
    attention; `in_place=True` wraps `hf_model` itself (no second copy in memory; use it
    through the returned model only). `tokenizer` defaults to the one saved in the model's
    own folder (`name_or_path`), if any. `n_ctx` caps a `HookedTransformer`'s context, which
    defaults to `min(max_position_embeddings, 2048)` for rotary models, as in `load_local`.
    """
    _check_api(api)
    config: Any = getattr(hf_model, "config", None)
    if not isinstance(hf_model, nn.Module) or not hasattr(config, "to_dict"):
        raise TypeError(
            f"from_hf needs a transformers model (an nn.Module with a .config), got "
            f"{type(hf_model).__name__}; for a checkpoint folder use load_local(folder)"
        )
    if hasattr(hf_model, "merge_and_unload"):
        raise TypeError(
            f"from_hf got a {type(hf_model).__name__} with adapters; merge them into the "
            "model first: from_hf(peft_model.merge_and_unload(), tokenizer)"
        )
    hf_class = type(hf_model).__name__
    # the class names the architecture, whatever the config says
    arch, api = _resolve_api({**config.to_dict(), "architectures": [hf_class]}, api)
    source = str(getattr(hf_model, "name_or_path", "") or "")
    if tokenizer is None:
        folder = Path(source).expanduser()
        if not _has_tokenizer_files(folder):
            raise ValueError(
                f"from_hf: no tokenizer given, and the model's name_or_path ({source!r}) is not "
                "a folder with tokenizer files; pass tokenizer=AutoTokenizer.from_pretrained(...)"
            )
        _offline()
        tokenizer = _read_tokenizer(folder)
    overrides = _context_override(arch, config.to_dict(), n_ctx, api) if api == "hooked" else {}
    if overrides:  # the HookedTransformer's context; the user's model stays as it is
        config = copy.deepcopy(config)
        config.__dict__.update(overrides)
    was_training = hf_model.training  # restored after a conversion (the Bridge keeps eval)
    if api == "bridge":
        hf: Any = hf_model if in_place else copy.deepcopy(hf_model)
        if hasattr(hf, "set_attn_implementation"):  # hooks see the attention pattern
            hf.set_attn_implementation("eager")
        hf_model = hf
    processing = _processing(fold_ln, center_writing_weights, center_unembed, fold_value_biases)
    device = usable_device(device) if device is not None else next(hf_model.parameters()).device
    name = model_name or (Path(source).name if source else hf_class)
    try:
        return _to_transformer_lens(
            hf_model.eval(),
            tokenizer,
            arch,
            api,
            next(hf_model.parameters()).dtype,
            device,
            processing,
            name,
            source or f"a {hf_class} in memory",
            verify,
            config,
            n_ctx if api == "bridge" else None,
        )
    finally:
        if api == "hooked":
            hf_model.train(was_training)


def _processing(
    fold_ln: bool, center_writing_weights: bool, center_unembed: bool, fold_value_biases: bool
) -> dict[str, bool]:
    """TransformerLens's weight-processing flags, as its loaders take them by name."""
    return {
        "fold_ln": fold_ln,
        "center_writing_weights": center_writing_weights,
        "center_unembed": center_unembed,
        "fold_value_biases": fold_value_biases,
    }


def _check_api(api: str) -> None:
    if api not in ("auto", "hooked", "bridge"):
        raise ValueError(f"api must be 'auto', 'hooked' or 'bridge', got {api!r}")
    if api == "hooked":
        require_hooked_transformer()


def _resolve_api(
    config: dict[str, Any], api: str
) -> tuple[Architecture, Literal["hooked", "bridge"]]:
    """The architecture a config names and the API to load it on (`"auto"`: a
    `HookedTransformer` where there is one and the architecture has a conversion)."""
    arch = architecture_of(config, api="hooked" if api == "hooked" else "bridge")
    if api == "auto":
        api = available_apis()[0] if arch.hooked else "bridge"
    return arch, "hooked" if api == "hooked" else "bridge"


def _to_transformer_lens(
    hf_model: nn.Module,
    tokenizer: Any,
    arch: Architecture,
    api: str,
    dtype: torch.dtype,
    device: str | torch.device,
    processing: dict[str, bool],
    name: str,
    source: str,
    verify: bool,
    hf_config: Any = None,
    n_ctx: int | None = None,
) -> nn.Module:
    """The one conversion behind `load_local` and `from_hf`: wrap or convert an eval-mode
    `transformers` model, record what was done, and check that it computes what `transformers`
    computes (`verify`). `hf_config` is the config to convert (default: the model's)."""
    if processing["center_writing_weights"] and arch.uses_rms:
        warnings.warn(
            "center_writing_weights does nothing for RMSNorm models (RMSNorm does not subtract "
            "the mean, so TransformerLens skips it); recorded as False.",
            stacklevel=3,
        )
        processing = {**processing, "center_writing_weights": False}
    rotary = getattr(hf_model.base_model, "rotary_emb", None)  # before the Bridge wraps it
    probe, reference = _reference_log_probs(hf_model) if verify else (None, None)
    with _tokenizer_in_a_folder(tokenizer) as tokenizer:
        if api == "hooked":
            model = _hooked_from_hf(
                hf_model,
                hf_config or hf_model.config,
                arch,
                tokenizer,
                name,
                dtype,
                device,
                processing,
            )
        else:
            model = _bridge_from_hf(hf_model, tokenizer, dtype, device, processing, n_ctx)
            model_cfg(model).model_name = name
    # after building: the Bridge's adapter may have declined to fold (`processing` says so)
    set_weight_processing(model, _record(rotary, arch, api, processing, source))
    if probe is not None and reference is not None:
        check_reproduces(model.eval(), probe, reference, arch.hf_class, api)
    return model.eval()


PROBE_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-3}
"""Largest |Δ log-probability| `load_local` accepts between the loaded model and
`transformers` on its probe batch. Faithful loads differ by rounding (at most 2e-7 in float64
on the tested shapes; ~2e-6 with weight processing); an adapter that computes another
function differs by far more (TransformerLens's StableLM adapter: 0.45 to 1.8). 16-bit dtypes
are not checked: their rounding of rare tokens' log-probabilities is of that size; load in
float32 to check."""


@torch.no_grad()
def _reference_log_probs(hf_model: nn.Module) -> tuple[Tensor, Tensor]:
    """A fixed probe batch (2 rows of up to 8 tokens) and `transformers`' log-probabilities
    on it, taken before TransformerLens converts or wraps the model."""
    hf: Any = hf_model
    vocab = int(hf.config.vocab_size)
    limit: Any = getattr(hf.config, "max_position_embeddings", None)
    n = max(2, min(8, int(limit or getattr(hf.config, "n_positions", 8))))
    row = (torch.arange(n) * 7 + 3) % vocab
    probe = torch.stack([row, row.flip(0)])
    logits = hf(probe.to(hf.device)).logits
    return probe, logits.double().log_softmax(-1).cpu()


@torch.no_grad()
def check_reproduces(
    model: nn.Module, probe: Tensor, reference: Tensor, hf_class: str, api: str
) -> None:
    """Raise `UnsupportedArchitectureError` when `model` does not compute what `transformers`
    computed on `probe` (`reference` log-probabilities), beyond `PROBE_TOLERANCE`."""
    dtype = next(model.parameters()).dtype
    tolerance = PROBE_TOLERANCE.get(dtype)
    if tolerance is None:
        return
    try:
        logits = model(probe.to(next(model.parameters()).device))
    except Exception as error:  # TransformerLens's conversion cannot even run a forward
        raise UnsupportedArchitectureError(
            f"the {api} model TransformerLens built for {hf_class} fails on a probe batch "
            f"that transformers runs: {type(error).__name__}: {error}"
        ) from error
    got = logits.double().log_softmax(-1).cpu()
    gap = float((got - reference).abs().max())
    if not gap <= tolerance:
        raise UnsupportedArchitectureError(
            f"the {api} model TransformerLens built for {hf_class} does not compute what "
            f"transformers computes: log-probabilities differ by up to {gap:.2g} on a probe "
            f"batch (rounding allows {tolerance:g} in {dtype}), so results on it would "
            "describe another function. This is TransformerLens's conversion of the "
            "architecture; try the other api, or load_local(..., verify=False) to proceed "
            "at your own risk."
        )


@contextmanager
def _tokenizer_in_a_folder(tokenizer: Any) -> Iterator[Any]:
    """The tokenizer, read back from a temporary folder if it was built in memory: both APIs
    reload it from its `name_or_path` (to add a BOS token)."""
    if (getattr(tokenizer, "init_kwargs", None) or {}).get("name_or_path"):
        yield tokenizer
        return
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        yield _read_tokenizer(tmp)


def _record(
    rotary: nn.Module | None,
    arch: Architecture,
    api: str,
    processing: dict[str, bool],
    source: str,
) -> dict[str, Any]:
    """What `identity.weight_processing` reports for a loaded model (`rotary`: the Hugging
    Face model's rotary embedding, if it has one; `source`: its folder)."""
    norm = "RMS" if arch.uses_rms else "LN"
    flags: dict[str, Any] = {
        **processing,
        "normalization_type": norm + ("Pre" if processing["fold_ln"] else ""),
        "source": source,
        "architecture": arch.hf_class,
    }
    if rotary is not None:
        flags["rotary_tables"] = f"Hugging Face {type(rotary).__name__} (float32 angles)"
    if arch.uses_rms:
        flags["rmsnorm_rounding"] = (
            "x / sqrt(mean(x^2) + eps), folded (TransformerLens RMSNormPre)"
            if api == "hooked" and processing["fold_ln"]
            else "x * rsqrt(mean(x^2) + eps), as Hugging Face"
        )
    return flags


def _hooked_from_hf(
    hf_model: nn.Module,
    hf_config: Any,
    arch: Architecture,
    tokenizer: Any,
    name: str,
    dtype: torch.dtype,
    device: str | torch.device,
    processing: dict[str, bool],
) -> nn.Module:
    """A `HookedTransformer` from a `transformers` model, via TransformerLens's converter for
    its architecture (from `hf_config`), with Hugging Face's rotary tables and RMSNorm
    rounding."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    assert arch.hooked_config is not None, f"{arch.hf_class} loads on the Bridge only"
    cfg = HookedTransformerConfig(
        **arch.hooked_config(hf_config),
        model_name=name,
        original_architecture=arch.hf_class,
        init_weights=False,
        dtype=dtype,
        device=str(device),
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    if cfg.positional_embedding_type == "rotary":
        use_hf_rotary_tables(model, hf_model)
    weights = arch.convert(hf_model, cfg)
    if any(processing.values()):
        model.load_and_process_state_dict(
            weights, refactor_factored_attn_matrices=False, **processing
        )
    else:  # one load_state_dict call: TransformerLens's loader above goes key by key (slow)
        for key, value in model.state_dict().items():  # biases the checkpoint has not (b_U)
            if key not in weights and key.rsplit(".", 1)[-1].startswith("b_"):
                weights[key] = torch.zeros_like(value)
        result = model.load_state_dict(weights, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(_TL_BUFFERS)]
        if missing or result.unexpected_keys:
            raise ValueError(f"weights do not fit: {missing[:5]} {result.unexpected_keys[:5]}")
    round_rmsnorm_like_hugging_face(model)
    store_weights_transposed(model)  # TransformerLens stops copying every weight per forward
    return model if torch.device(device).type == "cpu" else model.to(device)


def use_hf_rotary_tables(model: nn.Module, hf_model: nn.Module) -> None:
    """Give every attention layer of a `HookedTransformer` the rotary cos/sin tables of the
    Hugging Face model it was converted from.

    Both compute the angles in float32, but differently (TransformerLens `pos / base^(2i/d)`,
    Hugging Face `pos * inv_freq` with `inv_freq` rounded to float32 first), so at position 127
    they differ by ~7e-6 rad. That is a small change of the model, not rounding: on
    SmolLM2-135M it moved the logits by 4e-5 in float64 and, with the RMSNorm rounding
    (`models.rmsnorm`), by up to 2.7e-4 in float32 on held-out rows of 128 tokens. With both
    aligned the float32 logits equal Hugging Face's bit for bit.
    """
    cfg = model_cfg(model)
    hf: Any = hf_model
    blocks: Any = model.blocks
    positions = torch.arange(cfg.n_ctx, device=hf.device)[None]
    probe = torch.zeros(1, dtype=cfg.dtype, device=hf.device)
    cos, sin = hf.base_model.rotary_emb(probe, positions)
    for block in blocks:
        block.attn.rotary_cos.copy_(cos[0].to(block.attn.rotary_cos))
        block.attn.rotary_sin.copy_(sin[0].to(block.attn.rotary_sin))


def _boot_name(name_or_path: str) -> str:
    """The name a Bridge is booted under: an existing folder as its absolute path (never a
    TransformerLens alias such as "neox"), anything else as it is."""
    folder = Path(name_or_path).expanduser()
    return str(folder.resolve()) if name_or_path and folder.is_dir() else name_or_path


def _bridge_from_hf(
    hf_model: nn.Module,
    tokenizer: Any,
    dtype: torch.dtype,
    device: str | torch.device,
    processing: dict[str, bool],
    n_ctx: int | None = None,
) -> nn.Module:
    """A `TransformerBridge` around a `transformers` model, processed only if asked to.

    Booted under the model's own folder as an absolute path: a relative one that happens to be
    a TransformerLens alias (a folder "neox" loaded from its parent) makes TransformerLens 4
    warn that it will load a hub model ("EleutherAI/gpt-neox-20b") in its place. The name
    shown (`cfg.model_name`) is set by the caller."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        _boot_name(str(hf_model.name_or_path)),
        hf_model=hf_model.to(device),
        tokenizer=tokenizer,
        dtype=dtype,
        device=device,
        n_ctx=n_ctx,
    )
    if any(processing.values()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bridge.enable_compatibility_mode(disable_warnings=True, **processing)
        for warning in caught:  # e.g. "Olmo2ArchitectureAdapter does not support fold_ln"
            if "does not support fold_ln" in str(warning.message):
                processing["fold_ln"] = False
                warnings.warn(
                    f"TransformerLens does not fold the norms of {type(hf_model).__name__}: "
                    "its norm weights stay unfolded; recorded as fold_ln=False.",
                    stacklevel=3,
                )
            else:
                warnings.warn_explicit(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
        # TransformerLens processes in float32 and leaves some of those weights so (GPT-J's);
        # a float64 forward would then fail on mixed dtypes
        with torch.no_grad():
            for param in bridge.parameters():
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
    return bridge
