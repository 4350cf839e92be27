"""One place for the differences between TransformerLens 3.9 (`HookedTransformer`) and 4.x
(`TransformerBridge` only).

Everything else in the package talks to a model through the hook surface both APIs share:
`model.hook_dict`, `model.hooks(fwd_hooks=...)`, `model.cfg` and `model(tokens)`.
`HookedTransformer` is only ever imported inside functions.
"""

from __future__ import annotations

import importlib.metadata
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Literal, overload

import einops
import torch
from torch import nn

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint

API = Literal["hooked", "bridge"]


def tl_version() -> str:
    """The installed TransformerLens version string."""
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def has_hooked_transformer() -> bool:
    """True when `HookedTransformer` can be imported (TransformerLens < 4)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except Exception:
        return False
    return True


class NoHookedTransformerError(ValueError, RuntimeError):
    """`api="hooked"` asked of a TransformerLens without `HookedTransformer` (4.x). A
    ValueError, so the command line shows it as one line; a RuntimeError too, as it was."""


def require_hooked_transformer() -> None:
    """Raise `NoHookedTransformerError` (naming the fix) unless `HookedTransformer` exists."""
    if not has_hooked_transformer():
        raise NoHookedTransformerError(
            f"HookedTransformer needs TransformerLens < 4 (this is {tl_version()}); use "
            "api='bridge' (--api bridge on the command line)"
        )


def available_apis() -> list[API]:
    """The model APIs this TransformerLens offers, preferred first."""
    return ["hooked", "bridge"] if has_hooked_transformer() else ["bridge"]


def is_bridge(model: nn.Module) -> bool:
    """True for a `TransformerBridge`, False for a `HookedTransformer`."""
    return type(model).__name__ == "TransformerBridge" or hasattr(model, "original_model")


def api_of(model: nn.Module) -> API:
    return "bridge" if is_bridge(model) else "hooked"


# ---------------------------------------------------------------------------------------------
# Building models from a HookedTransformer-style config and state dict
# ---------------------------------------------------------------------------------------------

_CONFIG_KEYS = (
    "d_model",
    "d_head",
    "n_heads",
    "d_mlp",
    "n_layers",
    "n_ctx",
    "d_vocab",
    "act_fn",
    "normalization_type",
    "attn_only",
    "gated_mlp",
    "positional_embedding_type",
    "n_key_value_heads",
    "d_vocab_out",
    "seed",
    "rotary_dim",
    "final_rms",
    "eps",
)


def build_model(
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
    api: API | Literal["auto"] = "auto",
    dtype: torch.dtype = torch.float32,
    model_name: str = "custom",
) -> nn.Module:
    """Build a TransformerLens model from a `HookedTransformerConfig`-style dict.

    `state_dict` uses HookedTransformer parameter names (`blocks.0.attn.W_Q`, ...); it is
    converted for the Bridge. No weight processing is applied (no `fold_ln`, no centring),
    so activations are those of the stored weights.
    """
    if api == "auto":
        api = available_apis()[0]
    cfg = {
        k: v
        for k, v in config.items()
        if k in _CONFIG_KEYS and (v is not None or k == "normalization_type")
    }
    if api == "hooked":
        require_hooked_transformer()
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model: nn.Module = HookedTransformer(
            HookedTransformerConfig(**cfg, dtype=dtype, model_name=model_name, device="cpu")
        )
        if state_dict is not None:
            sd = {k: v.to(dtype) for k, v in state_dict.items()}
            result = model.load_state_dict(sd, strict=False)
            missing = [k for k in result.missing_keys if not k.endswith(("mask", "IGNORE"))]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"state dict does not fit the config: missing {missing[:5]}, "
                    f"unexpected {result.unexpected_keys[:5]}"
                )
        model.eval()
        return model
    if api != "bridge":
        raise ValueError(f"api must be 'hooked', 'bridge' or 'auto', got {api!r}")
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_native(dict(cfg), dtype=dtype, model_name=model_name)
    if state_dict is not None:
        bridge_sd = hooked_to_bridge_state_dict(state_dict, cfg)
        target = model.state_dict()
        missing = sorted(set(target) - set(bridge_sd))
        unexpected = sorted(set(bridge_sd) - set(target))
        if missing or unexpected:
            raise ValueError(
                f"state dict does not fit the config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        model.load_state_dict({k: v.to(dtype) for k, v in bridge_sd.items()}, strict=True)
    model.eval()
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """The HookedTransformerConfig-style fields `build_model` needs to rebuild `model`."""
    cfg = model_cfg(model)
    return {k: getattr(cfg, k) for k in _CONFIG_KEYS if hasattr(cfg, k)}


def rebuild(model: nn.Module, api: API, dtype: torch.dtype | None = None) -> nn.Module:
    """The same weights held in the other (or the same) API: e.g. a HookedTransformer as a
    TransformerBridge."""
    dtype = dtype or next(model.parameters()).dtype
    return build_model(model_config(model), hooked_state_dict(model), api=api, dtype=dtype)


def hooked_to_bridge_state_dict(
    sd: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename and reshape HookedTransformer weights to the native TransformerBridge layout."""
    out: dict[str, torch.Tensor] = {}
    out["embed.weight"] = sd["embed.W_E"]
    if "pos_embed.W_pos" in sd:
        out["pos_embed.weight"] = sd["pos_embed.W_pos"]
    out["unembed.weight"] = sd["unembed.W_U"].T
    if "unembed.b_U" in sd:
        out["unembed.bias"] = sd["unembed.b_U"]
    for layer in range(cfg["n_layers"]):
        p = f"blocks.{layer}."
        for x in "QKV":
            w = sd[f"{p}attn.W_{x}"] if f"{p}attn.W_{x}" in sd else sd[f"{p}attn._W_{x}"]
            out[f"{p}attn.{x.lower()}.weight"] = einops.rearrange(w, "h m d -> (h d) m")
            b_key = f"{p}attn.b_{x}" if f"{p}attn.b_{x}" in sd else f"{p}attn._b_{x}"
            out[f"{p}attn.{x.lower()}.bias"] = einops.rearrange(sd[b_key], "h d -> (h d)")
        out[f"{p}attn.o.weight"] = einops.rearrange(sd[f"{p}attn.W_O"], "h d m -> m (h d)")
        out[f"{p}attn.o.bias"] = sd[f"{p}attn.b_O"]
        for ln in ("ln1", "ln2"):
            if f"{p}{ln}.w" in sd:
                out[f"{p}{ln}.weight"] = sd[f"{p}{ln}.w"]
            if f"{p}{ln}.b" in sd:
                out[f"{p}{ln}.bias"] = sd[f"{p}{ln}.b"]
        if f"{p}mlp.W_in" in sd:
            out[f"{p}mlp.in.weight"] = sd[f"{p}mlp.W_in"].T
            out[f"{p}mlp.out.weight"] = sd[f"{p}mlp.W_out"].T
            if f"{p}mlp.b_in" in sd:
                out[f"{p}mlp.in.bias"] = sd[f"{p}mlp.b_in"]
            if f"{p}mlp.b_out" in sd:
                out[f"{p}mlp.out.bias"] = sd[f"{p}mlp.b_out"]
            if f"{p}mlp.W_gate" in sd:
                out[f"{p}mlp.gate.weight"] = sd[f"{p}mlp.W_gate"].T
    if "ln_final.w" in sd:
        out["ln_final.weight"] = sd["ln_final.w"]
    if "ln_final.b" in sd:
        out["ln_final.bias"] = sd["ln_final.b"]
    return out


HOOKED_FORM_MODELS = frozenset(
    {
        "NativeModel",  # a Bridge built from a HookedTransformer config (`build_model`)
        "GPT2LMHeadModel",
        "GPTNeoXForCausalLM",
        "LlamaForCausalLM",
        "GemmaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
    }
)
"""The models a Bridge may wrap whose blocks compute exactly what a HookedTransformer block
with the same weights computes, so that `hooked_state_dict` describes them (checked per
architecture in tests/engine/test_compat.py). A Bridge around any other architecture (post-
norms, query/key norms, residual multipliers, fused or expert layers, ...) runs through its
hooks only."""


class WeightsUnavailableError(ValueError):
    """The model's weights cannot be read as a HookedTransformer holds them."""


def wrapped_model_name(model: nn.Module) -> str:
    """The class of the model a Bridge wraps (e.g. "Qwen3ForCausalLM"), or "" otherwise."""
    original = getattr(model, "original_model", None)
    return type(original).__name__ if original is not None else ""


def has_hooked_weights(model: nn.Module) -> bool:
    """True when `hooked_state_dict` describes the model exactly: any model that is not a
    Bridge, and a Bridge around one of `HOOKED_FORM_MODELS`. Closed-form sections, what a
    composite feature writes into the stream and direct logit effects need it; everything
    computed through hooks does not."""
    return not is_bridge(model) or wrapped_model_name(model) in HOOKED_FORM_MODELS


def normalises_block_outputs(model: nn.Module) -> bool:
    """True when a block normalises what attention or the MLP writes before adding it to the
    stream (HookedTransformer's `use_normalization_before_and_after`, Gemma 2/3, and its
    post-norm architectures, OLMo 2/3): the stream then changes nonlinearly in the heads' and
    neurons' outputs, so `W_O` and `W_out` alone do not say what they write."""
    cfg = model_cfg(model)
    if getattr(cfg, "use_normalization_before_and_after", False):
        return True
    try:
        from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES
    except ImportError:  # TransformerLens 4: no HookedTransformer blocks
        return False
    return getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES


def hooked_state_dict(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """HookedTransformer-named weights of either API (inverse of the Bridge conversion).

    `keep_vars=True` returns the parameters themselves (HookedTransformer) or differentiable
    views of them (Bridge), so that a forward written out in these weights back-propagates
    into the model's own parameters. Raises `WeightsUnavailableError` for a Bridge whose
    blocks are not HookedTransformer blocks (`has_hooked_weights`)."""
    if not has_hooked_weights(model):
        raise WeightsUnavailableError(
            f"{wrapped_model_name(model)} runs on the TransformerBridge through its hooks "
            "only: its blocks are not HookedTransformer blocks (supported: "
            f"{', '.join(sorted(HOOKED_FORM_MODELS - {'NativeModel'}))}), so its weights "
            "cannot be read in HookedTransformer form. What needs them is unavailable on it: "
            "what a composite feature writes into the stream, direct logit effects (pass "
            "unembed= to give a readout), rebuilding or saving it in HookedTransformer form. "
            "Fits, Jacobians, edges, ablation, attribution and part shares work "
            "(docs/models.md, 'Any other architecture')."
        )
    if not is_bridge(model):
        sd = model.state_dict(keep_vars=keep_vars)
        return {k: v for k, v in sd.items() if not k.endswith(("mask", "IGNORE"))}
    sd = model.state_dict(keep_vars=keep_vars)
    cfg = model_cfg(model)
    # GPT-2's Conv1D holds [in, out] where nn.Linear holds [out, in]: bring every projection to
    # nn.Linear's layout first, by the layer the Bridge wraps (square ones cannot be told apart
    # by shape)
    for key in [k for k in sd if k.startswith("blocks.") and k.endswith(".weight")]:
        try:
            module = model.get_submodule(key.removesuffix(".weight"))
        except AttributeError:
            continue
        if type(getattr(module, "original_component", None)).__name__ == "Conv1D":
            sd[key] = sd[key].T
    gemma = _hf_model_type(model).startswith("gemma")
    # Gemma scales the embedding by √d_model and its RMSNorm multiplies by (1 + w); a
    # HookedTransformer holds both folded in (its W_E and ln weights)
    embed = sd["embed.weight"] * cfg.d_model**0.5 if gemma else sd["embed.weight"]
    out: dict[str, torch.Tensor] = {"embed.W_E": embed}
    if "pos_embed.weight" in sd:
        out["pos_embed.W_pos"] = sd["pos_embed.weight"]
    out["unembed.W_U"] = sd["unembed.weight"].T
    if "unembed.bias" in sd:
        out["unembed.b_U"] = sd["unembed.bias"]
    h = cfg.n_heads
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        for x in "QKV":
            w = sd[f"{p}attn.{x.lower()}.weight"]
            out[f"{p}attn.W_{x}"] = einops.rearrange(
                w, "(h d) m -> h m d", h=w.shape[0] // cfg.d_head
            )
            b = sd.get(f"{p}attn.{x.lower()}.bias")
            if b is not None:
                out[f"{p}attn.b_{x}"] = einops.rearrange(
                    b, "(h d) -> h d", h=b.shape[0] // cfg.d_head
                )
        out[f"{p}attn.W_O"] = einops.rearrange(sd[f"{p}attn.o.weight"], "m (h d) -> h d m", h=h)
        if f"{p}attn.o.bias" in sd:
            out[f"{p}attn.b_O"] = sd[f"{p}attn.o.bias"]
        if f"{p}mlp.in.weight" in sd:
            out[f"{p}mlp.W_in"] = sd[f"{p}mlp.in.weight"].T
            out[f"{p}mlp.W_out"] = sd[f"{p}mlp.out.weight"].T
            if f"{p}mlp.gate.weight" in sd:
                out[f"{p}mlp.W_gate"] = sd[f"{p}mlp.gate.weight"].T
            for a, b_ in (("in", "b_in"), ("out", "b_out")):
                if f"{p}mlp.{a}.bias" in sd:
                    out[f"{p}mlp.{b_}"] = sd[f"{p}mlp.{a}.bias"]
        for ln in ("ln1", "ln2"):  # normalisation weights (inverse of hooked_to_bridge_...)
            for src, dst in (("weight", "w"), ("bias", "b")):
                if f"{p}{ln}.{src}" in sd:
                    w = sd[f"{p}{ln}.{src}"]
                    out[f"{p}{ln}.{dst}"] = 1 + w if gemma and src == "weight" else w
    for src, dst in (("weight", "w"), ("bias", "b")):
        if f"ln_final.{src}" in sd:
            w = sd[f"ln_final.{src}"]
            out[f"ln_final.{dst}"] = 1 + w if gemma and src == "weight" else w
    return out


def _hf_model_type(model: nn.Module) -> str:
    """The `transformers` model type a Bridge wraps (e.g. "gpt2", "gemma"), or ""."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    return str(getattr(config, "model_type", "") or "")


# ---------------------------------------------------------------------------------------------
# Running with hooks
# ---------------------------------------------------------------------------------------------


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the last needed site is read."""


HookFn = Callable[[torch.Tensor, Any], Any]


def hook_names(model: nn.Module) -> list[str]:
    """All hook point names the model exposes (aliases included on the Bridge)."""
    hook_dict: Any = model.hook_dict
    return list(hook_dict.keys())


@contextmanager
def parameters_requiring_grad(model: nn.Module, flag: bool) -> Iterator[None]:
    """Temporarily set `requires_grad` of every parameter to `flag`, restoring each after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, old in flags:
            p.requires_grad_(old)


def frozen_parameters(model: nn.Module) -> AbstractContextManager[None]:
    """Temporarily stop autograd from tracking the model's parameters (we differentiate
    with respect to activations only)."""
    return parameters_requiring_grad(model, False)


@overload
def run_with_hooks(
    model: nn.Module,
    tokens: torch.Tensor,
    fwd_hooks: Sequence[tuple[str, HookFn]],
    stop_early: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def run_with_hooks(
    model: nn.Module,
    tokens: torch.Tensor,
    fwd_hooks: Sequence[tuple[str, HookFn]],
    stop_early: bool,
) -> torch.Tensor | None: ...


def run_with_hooks(
    model: nn.Module,
    tokens: torch.Tensor,
    fwd_hooks: Sequence[tuple[str, HookFn]],
    stop_early: bool = False,
) -> torch.Tensor | None:
    """Run `model(tokens)` with temporary forward hooks on both APIs.

    With `stop_early`, a hook may raise `StopForward` to end the pass; the function then
    returns None. Hooks are always removed, also on error.
    """
    with temporary_hooks(model, fwd_hooks):
        try:
            return model(tokens)
        except StopForward:
            if not stop_early:
                raise
            return None


def temporary_hooks(
    model: nn.Module, fwd_hooks: Sequence[tuple[str, HookFn]]
) -> AbstractContextManager[Any]:
    """`model.hooks(fwd_hooks=...)`: forward hooks for the duration of a `with` block.

    A `HookedTransformer` (or any `HookedRootModule`) gets them at a level of their own, and
    on exit they are removed from the hook points they were put on only. TransformerLens's own
    context walks every hook point of the model on exit (785 in a 30-block model: 2.4 ms
    against 0.3 ms for 61 hooks; on an H100 the bfloat16 Gram pass took 1.26× the forward with
    it, 1.14× with this, docs/devices.md). A Bridge, which removes only its own hooks, keeps
    its own context."""
    hooked: Any = model  # `hooks` is a method of both APIs, not of nn.Module
    own = not is_bridge(model) and hasattr(model, "mod_dict") and hasattr(model, "context_level")
    if not own or not all(isinstance(name, str) for name, _ in fwd_hooks):
        return hooked.hooks(fwd_hooks=list(fwd_hooks))  # name filters: TransformerLens's way
    return _hooks_at_own_level(hooked, fwd_hooks)


_OWN_LEVELS = itertools.count(-1, -1)
"""Hook levels of `temporary_hooks` contexts: negative, so never the level of one of
TransformerLens's own contexts (0, 1, 2, ...)."""


@contextmanager
def _hooks_at_own_level(model: Any, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[Any]:
    """`HookedRootModule.hooks` for named forward hooks, undone where they were put. Each
    context's hooks carry a level of their own and `model.context_level` is left alone, so
    contexts closed out of order (an `attach` and a `model.hooks` of the caller's) each remove
    their own hooks and nothing else."""
    level = next(_OWN_LEVELS)
    touched: dict[int, Any] = {}
    try:
        for name, fn in fwd_hooks:
            point = model.mod_dict.get(name)
            if not hasattr(point, "add_hook"):
                raise KeyError(
                    f"{name!r} is not a hook point of this model"
                    if point is None
                    else f"{name!r} is a {type(point).__name__}, not a hook point"
                )
            point.add_hook(fn, dir="fwd", level=level)
            touched[id(point)] = point
        yield model
    finally:
        for point in touched.values():
            point.remove_hooks("fwd", including_permanent=False, level=level)


def forward_hooks_on(model: nn.Module) -> list[str]:
    """The modules of `model` that carry forward hooks right now: a caller's (steering,
    caching, permanent), an enclosing `attach`'s or `ablate_nodes`'s. While there are any,
    the sections that compute from the weights step aside (`structures.structure_of`), so
    that every pass sees the model as it runs, hooks included."""
    return [name for name, module in model.named_modules() if module._forward_hooks]


def replace_hooks(
    model: nn.Module, hook: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> list[tuple[str, HookFn]]:
    """Hooks that replace the residual stream at `hook` by `fn(act)`, on both APIs.

    On the Bridge `blocks.L.hook_resid_mid` is an alias of `blocks.L.ln2.hook_in`: writing to
    it changes only the MLP's input, not the residual that bypasses the MLP. There the change
    is carried into `hook_resid_post` as well, so that a write means the same on both APIs.
    """
    if is_bridge(model) and hook.endswith("hook_resid_mid"):
        state: dict[str, torch.Tensor] = {}

        def write(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
            new = fn(act)
            state["delta"] = new - act
            return new

        def carry(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
            return act + state.pop("delta")

        return [(hook, write), (hook.replace("hook_resid_mid", "hook_resid_post"), carry)]

    def rewrite(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        return fn(act)

    return [(hook, rewrite)]


def register_hook_point(model: nn.Module, name: str, hook_point: HookPoint) -> HookPoint | None:
    """Make an extra HookPoint visible to `run_with_cache` and `hooks()` under `name`; returns
    the one registered under that name before (an `attach` inside another), for
    `unregister_hook_point` to put back."""
    hook_point.name = name
    hooked: Any = model  # the registries below are attributes of either API, not of nn.Module
    if is_bridge(model):
        previous = hooked._hook_registry.get(name)
        hooked._hook_registry[name] = hook_point
    else:
        previous = hooked.mod_dict.get(name)
        hooked.hook_dict[name] = hook_point
        hooked.mod_dict[name] = hook_point
    return previous


def unregister_hook_point(model: nn.Module, name: str, previous: HookPoint | None = None) -> None:
    """Undo `register_hook_point`: remove `name`, or put back the hook point it replaced."""
    if previous is not None:
        register_hook_point(model, name, previous)
        return
    hooked: Any = model
    if is_bridge(model):
        hooked._hook_registry.pop(name, None)
    else:
        hooked.hook_dict.pop(name, None)
        hooked.mod_dict.pop(name, None)


# ---------------------------------------------------------------------------------------------
# Typed access to attributes both APIs have but nn.Module does not declare
# ---------------------------------------------------------------------------------------------


def is_transformer(model: nn.Module) -> bool:
    """True for a TransformerLens transformer (either API): a `cfg` with layers and a width.
    Any other `HookedRootModule` is a generic hooked module."""
    cfg = getattr(model, "cfg", None)
    return cfg is not None and hasattr(cfg, "n_layers") and hasattr(cfg, "d_model")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (float32 for a model without any)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def usable_device(device: torch.device | str) -> torch.device:
    """`device` as a `torch.device`, once this machine is known to have it: an error that
    names the problem, where torch would fail inside the first copy."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{device!r} is not a device: use cpu, cuda, cuda:N or mps") from error
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device {str(dev)!r}: CUDA is not available here ({why}); use cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(
                f"device {str(dev)!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps': Apple's Metal backend is not available here; use cpu")
    return dev


FLOAT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The dtypes a model may be loaded in, by the names the command line and `load_local` take."""


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """`dtype` as a floating `torch.dtype`, given as one or by name ("float32", "bfloat16",
    also "torch.float32"): the one conversion of dtype names, checked before anything is
    loaded, where TransformerLens would fail deep inside building the model."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in FLOAT_DTYPES:
        return FLOAT_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(
        f"dtype {dtype!r} is not a floating dtype a model can be loaded in: give a torch.dtype "
        f"such as torch.float32, or one of the names {', '.join(FLOAT_DTYPES)}"
    )


def move_model(
    model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """`model` on `device` and in `dtype`, on either API (`HookedTransformer.to` takes one
    positional argument and keeps its config's device and dtype in step)."""
    hooked: Any = model
    if device is not None:
        device = usable_device(device)
        hooked.to(device) if is_transformer(model) else model.to(device=device)
    if dtype is not None:
        hooked.to(dtype) if is_transformer(model) else model.to(dtype=dtype)
    return model


def model_cfg(model: nn.Module) -> Any:
    """`model.cfg` of either API (a `HookedTransformerConfig` or the Bridge's config).

    Typed `Any`: through `nn.Module.__getattr__` a type checker sees `Tensor | Module`."""
    return model.cfg
