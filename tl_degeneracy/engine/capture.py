"""Reading and writing site activations through the model's hook points, on any model.

Every tensor a site sees is `[batch, pos, d]`: activations without a position axis (`[batch, d]`,
an MLP on images) get one position, per-head activations (`[batch, pos, head, d_head]`) are
flattened, and a composite site concatenates its parts (`sites.site_parts`). This module is the
only place that knows how; everything else reads and writes sites through it:

- `capture_sites`: activations of several sites in one forward that stops after the last;
- `injection_hooks`: hooks that put known values (e.g. autograd leaves) at a site;
- `leaf_hooks`: hooks that replace a site by autograd leaves holding its clean value;
- `transform_hooks`: hooks that replace a site by a function of its clean value (`attach`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_degeneracy.engine.compat import (
    StopForward,
    is_transformer,
    model_cfg,
    replace_hooks,
    run_with_hooks,
)
from tl_degeneracy.engine.sites import Site, SiteError, carry_hook, site_parts

Hook = tuple[str, Callable[..., Any]]


class NonFiniteActivationError(FloatingPointError):
    """NaN or Inf in an activation: names the site, the batch and the offending positions."""


def as_positions(act: Tensor) -> Float[Tensor, "batch pos d"]:
    """A hook's activation as `[batch, pos, d]` (a view)."""
    if act.ndim == 2:
        return act[:, None]
    if act.ndim == 3:
        return act
    return act.flatten(2)


def _restore(flat: Tensor, like: Tensor) -> Tensor:
    """Inverse of `as_positions` for a tensor shaped like `as_positions(like)`."""
    return flat.reshape(like.shape)


def check_finite(act: Tensor, site: Site, batch_index: int) -> None:
    """Raise `NonFiniteActivationError` naming site, batch and positions of NaN/Inf values."""
    if torch.isfinite(act).all():
        return
    bad = (~torch.isfinite(act)).any(-1).nonzero().tolist()
    raise NonFiniteActivationError(
        f"NaN or Inf in the activation at site {site.name}, batch {batch_index}, "
        f"(row, position) {bad[:5]}{' ...' if len(bad) > 5 else ''}: check the model's weights "
        "(NaN or Inf in any?), its dtype (float16 overflows) and the inputs of that batch"
    )


@torch.no_grad()
def capture_sites(
    model: nn.Module,
    inputs: Tensor,
    sites: Sequence[Site],
    batch_index: int = 0,
    check: bool = True,
    all_positions: bool = False,
    check_order: bool = False,
) -> list[Float[Tensor, "batch site_pos d"]]:
    """Activations at each site for one batch, in one forward that stops after the last hook it
    needs (unless a site is the logits), checked for NaN/Inf unless `check=False`.

    Each is `[batch, site positions, d]` (every position with `all_positions`). A single-part
    site at all positions returns the model's own tensor, not a copy: read-only. With
    `check_order` the hooks must fire in the order of `sites` (cuts in forward order); a
    `SiteError` says otherwise (the Gram pass checks a non-transformer's sites this way).
    """
    parts = {s.name: site_parts(model, s) for s in sites if not s.is_logits}
    needed = list(dict.fromkeys(p for ps in parts.values() for p in ps))
    store: dict[str, Tensor] = {}
    fired: list[str] = []
    wants_logits = any(s.is_logits for s in sites)

    def make_hook(name: str):
        def hook(act: Tensor, hook: Any = None) -> None:
            store[name] = as_positions(act)
            fired.append(name)
            if not wants_logits and len(store) == len(needed):
                raise StopForward

        return hook

    # no `frozen_parameters`: under no_grad nothing is tracked (and it took 0.8 ms a forward)
    out = run_with_hooks(model, inputs, [(n, make_hook(n)) for n in needed], stop_early=True)
    silent = [n for n in needed if n not in store]
    if silent:
        raise SiteError(
            f"no activation passed through {silent} in a forward: the model lists "
            f"{'these hooks' if len(silent) > 1 else 'this hook'} but does not run "
            f"{'them' if len(silent) > 1 else 'it'} (a TransformerBridge adapter may list "
            "hooks its architecture has no place for). Choose sites whose hooks run, e.g. "
            "those `model.run_with_cache(tokens)` returns."
        )
    if len(fired) > len(store) and not is_transformer(model):  # a hook ran more than once
        repeated = sorted({n for n in fired if fired.count(n) > 1})
        raise SiteError(
            f"{repeated} ran {fired.count(repeated[0])} times in one forward (a module applied "
            "in a loop, or shared): a site must be a cut the forward passes once. Give each "
            "application its own HookPoint, or pick a hook that runs once"
        )
    if check_order:
        _check_order(sites, parts, fired)
    result = []
    for site in sites:
        if site.is_logits:
            assert out is not None  # no hook reads the logits, so no StopForward ended the pass
            act = as_positions(out)
            act = act if all_positions else site.select(act)
        else:
            acts = [store[p] for p in parts[site.name]]
            acts = acts if all_positions else [site.select(a) for a in acts]
            act = acts[0] if len(acts) == 1 else torch.cat(acts, -1)
        if check:
            check_finite(act, site, batch_index)
        result.append(act)
    return result


def _check_order(sites: Sequence[Site], parts: dict[str, tuple[str, ...]], fired: list[str]):
    """Sites must fire in the order given (each site's last part marks its place)."""
    where = {name: i for i, name in enumerate(fired)}
    last = [max(where[p] for p in parts[s.name]) for s in sites if not s.is_logits]
    if last != sorted(last):
        order = [s.name for _, s in sorted(zip(last, [s for s in sites if not s.is_logits]))]
        raise SiteError(f"sites must be in forward order; the model computes them as {order}")


def _positions_write(site: Site, act: Tensor, value: Callable[[Tensor], Tensor]) -> Tensor:
    """`act` (a hook's own shape) with the site's positions replaced by `value(selected)`."""
    flat = as_positions(act)
    idx = site.index(flat.shape[1], flat.device)
    new = value(flat[:, idx])
    return _restore(flat.index_copy(1, idx, new.to(flat.dtype)), act)


def injection_hooks(
    model: nn.Module, site: Site, values: Float[Tensor, "batch site_pos d"]
) -> list[Hook]:
    """Hooks that put `values` at the site's positions (part by part for a composite site;
    later parts overwrite what the model computed from the earlier ones, so the values given
    are exactly what the rest of the model sees). `values` may require grad."""
    offsets = _offsets(model, site, values.shape[-1])
    hooks: list[Hook] = []
    for part, lo in offsets.items():

        def write(act: Tensor, lo: int = lo) -> Tensor:
            width = as_positions(act).shape[-1]
            return _positions_write(site, act, lambda _: values[..., lo : lo + width])

        hooks += replace_hooks(model, part, write)
    return hooks


def _offsets(model: nn.Module, site: Site, total: int) -> dict[str, int]:
    """Start of each part in the site's vector: the stream part is the last `d_model` entries
    of a composite site."""
    parts = site_parts(model, site)
    if len(parts) == 1:
        return {parts[0]: 0}
    d_stream = int(model_cfg(model).d_model)
    return {parts[0]: 0, parts[1]: total - d_stream}


def leaf_hooks(model: nn.Module, site: Site, leaves: list[Tensor]) -> list[Hook]:
    """Hooks that replace the site's positions by autograd leaves holding their clean values,
    appended to `leaves` in part order as the forward creates them (concatenated, they are the
    site's vector)."""
    parts = site_parts(model, site)
    slots: dict[str, Tensor] = {}
    hooks: list[Hook] = []

    def make(part: str):
        def write(act: Tensor) -> Tensor:
            def leaf(clean: Tensor) -> Tensor:
                x = clean.detach().clone().requires_grad_(True)
                slots[part] = x
                if len(slots) == len(parts):
                    leaves.extend(slots[p] for p in parts)
                return x

            return _positions_write(site, act, leaf)

        return write

    for part in parts:
        hooks += replace_hooks(model, part, make(part))
    return hooks


def gradient_hooks(model: nn.Module, site: Site, leaves: list[Tensor]) -> list[Hook]:
    """Hooks that make the gradient at the site's positions readable: zero autograd leaves
    added to a single-part site (its total derivative, leaving every path intact, so several
    sites can share a forward), and for a composite site each part replaced by a leaf of its
    clean value (the partial derivatives of a cut: the component does not see the stream
    leaf). `leaves` receives them in part order."""
    if len(site_parts(model, site)) > 1:
        return leaf_hooks(model, site, leaves)

    def add_zero(act: Tensor) -> Tensor:
        def leaf(clean: Tensor) -> Tensor:
            zero = torch.zeros_like(clean, requires_grad=True)
            leaves.append(zero)
            return clean + zero

        return _positions_write(site, act, leaf)

    return replace_hooks(model, site.hook, add_zero)


def transform_hooks(
    model: nn.Module, site: Site, fn: Callable[[Tensor], Tensor | None]
) -> list[Hook]:
    """Hooks that replace the site's positions by `fn(clean)` (`[batch, site_pos, d]`, float64
    or the model's dtype); `fn` may return None or its own input to leave the forward as is.

    A composite site is known whole only when its component fires, after its stream part: the
    component's part is written there and the stream part's change is added at the next
    residual hook (`sites.carry_hook`). That is exact in sequential blocks, but for the stream
    part of an attention site read at some positions and not at a later one, which attention
    there would read unchanged (`_check_attention_carry` refuses it); in a parallel-
    attention model the stream also feeds the other component (`rewritable`), so there `fn`
    only reads, and a change it returns raises `SiteError` (write known values with
    `injection_hooks` instead, as node ablation does)."""
    parts = site_parts(model, site)
    if len(parts) == 1:

        def rewrite(act: Tensor) -> Tensor:
            flat = as_positions(act)
            idx = site.index(flat.shape[1], flat.device)
            clean = flat[:, idx]
            new = fn(clean)
            if new is None or new is clean:
                return act
            return _restore(flat.index_copy(1, idx, new.to(flat.dtype)), act)

        return replace_hooks(model, parts[0], rewrite)
    if not rewritable(model, site):
        return _read_only_hooks(model, site, fn)
    component, stream = parts
    attention = component.endswith("attn.hook_z")
    state: dict[str, Tensor] = {}

    def read_stream(act: Tensor, hook: Any = None) -> None:
        flat = as_positions(act)
        state["stream"] = flat[:, site.index(flat.shape[1], flat.device)]

    def write_component(act: Tensor) -> Tensor:
        flat = as_positions(act)
        idx = site.index(flat.shape[1], flat.device)
        comp = flat[:, idx]
        stream_clean = state.pop("stream")
        clean = torch.cat([comp, stream_clean.to(comp.dtype)], -1)
        new = fn(clean)
        if new is None or new is clean:
            return act
        width = comp.shape[-1]
        delta = new[..., width:].to(stream_clean.dtype) - stream_clean
        if bool(delta.any()):
            if attention:
                _check_attention_carry(site, idx, delta, flat.shape[1])
            state["delta"] = delta
        return _restore(flat.index_copy(1, idx, new[..., :width].to(flat.dtype)), act)

    def carry(act: Tensor) -> Tensor:
        delta = state.pop("delta", None)
        if delta is None:
            return act
        return _positions_write(site, act, lambda clean: clean + delta.to(clean.dtype))

    after = carry_hook(model, site)
    assert after is not None
    return [
        (stream, read_stream),
        *replace_hooks(model, component, write_component),
        *replace_hooks(model, after, carry),
    ]


def _check_attention_carry(site: Site, idx: Tensor, delta: Tensor, n_pos: int) -> None:
    """The stream part's change at an attention site reaches the stream after attention
    (`transform_hooks`), so attention at a later position outside the site would still read
    the old stream there: refused, naming the positions (the inside of the site is exact, its
    heads' outputs being written)."""
    changed = idx[delta.flatten(2).ne(0).any(-1).any(0)]
    later = set(range(int(changed.min()), n_pos)) - set(idx.tolist())
    if later:
        raise SiteError(
            f"{site.name}: a change to the stream part of an attention site at position "
            f"{int(changed.min())} would be read by attention at position {min(later)}, which "
            "the site leaves out, before it is written (after attention), so this edit from "
            "inside the forward would be wrong. Read the site at every position from the "
            "first one edited on (e.g. positions '1:' or 'last'), edit only its heads' part, or "
            "use node_ablation_curve, feature_patching_effects or intervene, which write "
            "known values before the block"
        )


def rewritable(model: nn.Module, site: Site) -> bool:
    """Whether `transform_hooks` can rewrite `site` from inside the forward: every site but a
    composite one of a parallel-attention block, whose stream part also feeds the other
    component."""
    parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))  # type: ignore[union-attr]
    return not parallel or len(site_parts(model, site)) == 1


def not_rewritable_error(site: Site) -> SiteError:
    return SiteError(
        f"{site.name}: in a parallel-attention model the stream part of a composite site "
        "also feeds the other component, so it cannot be rewritten from inside the forward "
        "(its features can be read, not edited); use node_ablation_curve (which writes known "
        "values) or a residual site"
    )


def _read_only_hooks(
    model: nn.Module, site: Site, fn: Callable[[Tensor], Tensor | None]
) -> list[Hook]:
    """`transform_hooks` for a site it cannot rewrite: `fn` sees the clean value, and a
    change it returns raises `not_rewritable_error`."""
    component, stream = site_parts(model, site)
    state: dict[str, Tensor] = {}

    def read_stream(act: Tensor, hook: Any = None) -> None:
        flat = as_positions(act)
        state["stream"] = flat[:, site.index(flat.shape[1], flat.device)]

    def read_component(act: Tensor, hook: Any = None) -> None:
        flat = as_positions(act)
        comp = flat[:, site.index(flat.shape[1], flat.device)]
        clean = torch.cat([comp, state.pop("stream").to(comp.dtype)], -1)
        new = fn(clean)
        if new is not None and new is not clean:
            raise not_rewritable_error(site)

    return [(stream, read_stream), (component, read_component)]


def run_with_site_values(
    model: nn.Module,
    inputs: Tensor,
    site: Site,
    values: Float[Tensor, "batch site_pos d"],
    read: Site | None = None,
) -> Tensor:
    """The model's output (or `read`'s activation, stopping there) with `values` at `site`."""
    hooks = injection_hooks(model, site, values)
    if read is None or read.is_logits:
        out = run_with_hooks(model, inputs, hooks)
        return out if read is None else read.select(as_positions(out))
    store: dict[str, Tensor] = {}
    hooks += _read_hooks(model, read, store)
    run_with_hooks(model, inputs, hooks, stop_early=True)
    return store["out"]


def _read_hooks(model: nn.Module, site: Site, store: dict[str, Tensor]) -> list[Hook]:
    """Hooks that put `site`'s activation (all its parts) in `store['out']` and stop."""
    parts = site_parts(model, site)
    got: dict[str, Tensor] = {}

    def make(part: str):
        def hook(act: Tensor, hook: Any = None) -> None:
            got[part] = site.select(as_positions(act))
            if len(got) == len(parts):
                acts = [got[p] for p in parts]
                store["out"] = acts[0] if len(acts) == 1 else torch.cat(acts, -1)
                raise StopForward

        return hook

    return [(p, make(p)) for p in parts]
