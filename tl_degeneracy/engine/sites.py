"""Sites: a hook point name plus a position selection (docs/concepts.md, "Sites and sections").

A site is where a basis lives, and it must be a *cut* of the computation: everything after it
depends on the input only through the site. In a TransformerLens transformer the cuts are the
residual stream (`blocks.L.hook_resid_pre/mid/post`), the logits, and two *composite* sites that
pair a component's activation with the stream that bypasses it:

- `blocks.L.mlp.hook_post` (or `hook_pre`): the MLP's hidden neurons, then `hook_resid_mid`
  (`hook_resid_pre` in parallel-attention models, which have no `hook_resid_mid`);
- `blocks.L.attn.hook_z`: every head's output before `W_O` (heads flattened), then
  `hook_resid_pre`.

A composite site's vector is the concatenation of its parts (`site_parts`), hidden part first.

Any other `HookedRootModule` (an MLP written with `HookPoint`s, say) takes sites by hook name:
the user asserts they are cuts, the statistics pass checks they fire in the order given, and the
final site `logits` is the model's output.
"""

from __future__ import annotations

import difflib
import numbers
import operator
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tl_degeneracy.engine.compat import hook_names, is_transformer, model_cfg
from tl_degeneracy.engine.synchronisation import device_index

LOGITS = "logits"
"""Name of the final, non-hook site: the model's output (the logits of a language model)."""

Positions = str | tuple[int, ...]
"""'all', 'last', a slice 'start:' or 'start:stop' (e.g. '1:' leaves out position 0, the BOS
token), or a tuple of indices (negative ones count from the end)."""

_SLICE = re.compile(r"^(-?\d*):(-?\d*)$")

_RESIDUAL = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")
_COMPOSITE = re.compile(r"^blocks\.(\d+)\.(mlp\.hook_post|mlp\.hook_pre|attn\.hook_z)$")
_STAGE = {
    "hook_resid_pre": 0,
    "attn.hook_z": 1,
    "hook_resid_mid": 2,
    "mlp.hook_pre": 3,
    "mlp.hook_post": 4,
    "hook_resid_post": 5,
}
_SHORT_NAMES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
    "pre": "mlp.hook_pre",
    "post": "mlp.hook_post",
    "mlp_pre": "mlp.hook_pre",
    "mlp_post": "mlp.hook_post",
    "pattern": "attn.hook_pattern",
    "z": "attn.hook_z",
}


class SiteError(ValueError):
    """A site that does not exist on the model or is not a cut of its computation."""


@dataclass(frozen=True)
class Site:
    """A hook point and the token positions whose activations form the site's vector.

    `positions` is "all", "last", a slice "start:" / "start:stop" (e.g. "1:" leaves out the
    BOS token at position 0), or a tuple of indices (negative indices count from the end).
    Activations without a position axis (`[batch, d]`, e.g. an MLP on images) have one position.
    """

    hook: str
    positions: Positions = "all"

    def __post_init__(self) -> None:
        pos = self.positions
        if isinstance(pos, (list, tuple)):
            object.__setattr__(self, "positions", _index_list(self.hook, pos))
        elif not (pos in ("all", "last") or (isinstance(pos, str) and _SLICE.match(pos))):
            raise SiteError(
                f"positions must be 'all', 'last', a slice like '1:' or a list of ints, got {pos!r}"
            )

    @property
    def name(self) -> str:
        """A unique, readable key: the hook name, with the positions when not 'all'."""
        if self.positions == "all":
            return self.hook
        if self.positions == "last":
            return f"{self.hook}[-1]"
        if isinstance(self.positions, str):
            return f"{self.hook}[{self.positions}]"
        return f"{self.hook}[{','.join(str(p) for p in self.positions)}]"

    @property
    def is_logits(self) -> bool:
        return self.hook == LOGITS

    @property
    def is_composite(self) -> bool:
        """An MLP or attention site of a transformer, paired with its bypassing stream."""
        return _COMPOSITE.match(self.hook) is not None

    def window(self, n_pos: int) -> range | tuple[int, ...]:
        """The selected positions of a sequence of length `n_pos`: a range where they are
        consecutive, else the indices (negative ones resolved). Worked out in Python, so that
        selecting positions never waits on the device (a GPU sync per site and batch)."""
        if isinstance(self.positions, tuple):
            idx = tuple(p + n_pos if p < 0 else p for p in self.positions)
            if any(not 0 <= p < n_pos for p in idx):
                raise SiteError(
                    f"site {self.name}: positions {self.positions} out of range for length {n_pos}"
                )
            if len(set(idx)) < len(idx):  # e.g. 1 and -11 in a sequence of 12
                twice = sorted({p for p in idx if idx.count(p) > 1})
                raise SiteError(
                    f"site {self.name}: positions {self.positions} select position(s) {twice} "
                    f"more than once in a sequence of {n_pos}, which would weigh them several "
                    "times; list each position once"
                )
            return idx
        if self.positions == "all":
            return range(n_pos)
        bounds: tuple[int | None, ...] = (-1, None)  # "last"
        if self.positions != "last":
            m = _SLICE.match(self.positions)
            assert m is not None  # checked in __post_init__
            bounds = tuple(int(g) if g else None for g in m.groups())
        window = range(n_pos)[slice(*bounds)]
        if len(window) == 0:
            raise SiteError(f"site {self.name}: no positions in a sequence of {n_pos}")
        return window

    def index(self, n_pos: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The selected positions as an index tensor for a sequence of length `n_pos`."""
        window = self.window(n_pos)
        if isinstance(window, range):
            return torch.arange(window.start, window.stop, device=device)
        return device_index(window, device or "cpu")

    def n_positions(self, n_pos: int) -> int:
        return len(self.window(n_pos))

    def select(self, act: torch.Tensor) -> torch.Tensor:
        """Select this site's positions from `[batch, pos, d]`, keeping the pos axis.

        Consecutive positions ("all", "last", slices) give a view of `act`, not a copy (reading
        61 sites of a language model costs a fifth of a forward in copies): treat the result
        as read-only.
        """
        window = self.window(act.shape[1])
        if isinstance(window, range):
            return act if len(window) == act.shape[1] else act[:, window.start : window.stop]
        return act[:, device_index(window, act.device)]

    def with_positions(self, positions: Positions) -> Site:
        return Site(self.hook, positions)

    def to_json(self) -> dict:
        pos = self.positions if isinstance(self.positions, str) else list(self.positions)
        return {"hook": self.hook, "positions": pos}

    @classmethod
    def from_json(cls, d: dict) -> Site:
        pos: Positions | list[int] = d["positions"]  # a list when read from JSON
        return cls(d["hook"], pos if isinstance(pos, str) else tuple(pos))


def _index_list(hook: str, positions: Sequence) -> tuple[int, ...]:
    """A list of positions as a tuple of ints: at least one, each once (a repeated position
    would be weighted several times in every statistic)."""
    if not positions:
        raise SiteError(
            f"site {hook}: no positions selected (an empty list); give at least one index, "
            "'all', 'last' or a slice like '1:'"
        )
    try:
        idx = tuple(operator.index(p) for p in positions)
    except TypeError:
        raise SiteError(
            f"site {hook}: positions must be whole numbers, got {list(positions)!r}"
        ) from None
    twice = sorted({p for p in idx if idx.count(p) > 1})
    if twice:
        raise SiteError(
            f"site {hook}: positions {list(idx)} repeat {twice}, which would weigh them "
            "several times; list each position once"
        )
    return idx


SiteLike = Site | str | tuple


def _layer(value: object) -> int | None:
    """`value` as a layer index when it is an integer (Python, NumPy, or a 0-d integer
    tensor, as layers taken from `np.arange` or a tensor are), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        return None if value.dtype == torch.bool else int(value)
    return None


def resolve_hook_name(name: str | tuple) -> str:
    """Full hook name from a full name or a short form like `("resid_mid", 3)`."""
    if isinstance(name, tuple):
        layer = _layer(name[1]) if len(name) == 2 else None
        if layer is None:
            raise SiteError(
                f"short site names are (kind, layer), e.g. ('resid_mid', 3); got {name}"
            )
        kind = name[0]
        if kind not in _SHORT_NAMES:
            raise SiteError(f"unknown short name {kind!r}; known: {sorted(_SHORT_NAMES)}")
        return f"blocks.{layer}.{_SHORT_NAMES[kind]}"
    return name


def as_site(spec: SiteLike, positions: Positions | None = None) -> Site:
    """Accept a `Site`, a hook name, a short tuple `("resid_mid", 0)` (the layer an integer of
    Python, NumPy or a 0-d tensor), or a tuple `(name, positions)` such as
    `("blocks.0.hook_resid_mid", "last")`."""
    if isinstance(spec, Site):
        return spec if positions is None else Site(spec.hook, positions)
    short = (
        isinstance(spec, tuple)
        and len(spec) == 2
        and isinstance(spec[0], str)
        and spec[0] in _SHORT_NAMES
    )
    if isinstance(spec, tuple) and len(spec) == 2 and not short and _layer(spec[1]) is None:
        name, pos = spec
        return Site(resolve_hook_name(name), pos if positions is None else positions)
    return Site(resolve_hook_name(spec), "all" if positions is None else positions)


def site_key(spec: SiteLike, known: Collection[str], what: str = "basis") -> str:
    """The name under which `known` holds the site `spec`: a site name as it is (with its
    positions, e.g. `"blocks.0.hook_resid_mid[-1]"`), or any site spec `as_site` reads.
    Every lookup of a result by site goes through here, so each accepts the same forms.
    Raises `KeyError` naming the known sites (and the name with other positions, when the
    hook is known)."""
    if isinstance(spec, str) and spec in known:
        return spec
    site = as_site(spec)
    if site.name in known:
        return site.name
    same_hook = [k for k in known if k == site.hook or k.startswith(f"{site.hook}[")]
    hint = (
        f"; {same_hook} is at the same hook with other positions (a short form or a bare hook "
        "name selects all positions: pass that name, or Site(hook, positions))"
        if same_hook
        else ""
    )
    raise KeyError(f"no {what} at site {site.name!r}; sites: {list(known)}{hint}")


def _parallel(model: nn.Module) -> bool:
    return bool(getattr(model_cfg(model), "parallel_attn_mlp", False))


def site_parts(model: nn.Module, site: Site) -> tuple[str, ...]:
    """The hook names whose activations, concatenated in this order, form the site's vector:
    the hook itself, or for a composite site the component's hook and then the stream that
    bypasses it."""
    m = _COMPOSITE.match(site.hook) if is_transformer(model) else None
    if m is None:
        return (site.hook,)
    layer, component = m.group(1), m.group(2)
    if component.startswith("mlp") and not _parallel(model):
        return (site.hook, f"blocks.{layer}.hook_resid_mid")
    return (site.hook, f"blocks.{layer}.hook_resid_pre")


def carry_hook(model: nn.Module, site: Site) -> str | None:
    """Where a change of a composite site's stream part continues: the next residual hook
    after the component (`hook_resid_mid` after attention, `hook_resid_post` after the MLP).
    None for a site with one part. Writing a composite site from its own clean value (as
    `attach` does) adds the stream part's change there, which is exact when the stream feeds
    only the component and the residual (sequential blocks)."""
    parts = site_parts(model, site)
    if len(parts) == 1:
        return None
    layer = site.hook.split(".")[1]
    valid = set(hook_names(model))
    after_attn = f"blocks.{layer}.hook_resid_mid"
    if site.hook.endswith("attn.hook_z") and after_attn in valid and not _parallel(model):
        return after_attn
    return f"blocks.{layer}.hook_resid_post"


def _missing_resid_mid(model: nn.Module, hook: str) -> str | None:
    """Why a block has no `hook_resid_mid`, for models whose blocks have no such cut."""
    m = _RESIDUAL.match(hook)
    if m is None or m.group(2) != "mid" or not is_transformer(model):
        return None
    cfg, layer = model_cfg(model), m.group(1)
    if getattr(cfg, "parallel_attn_mlp", False):
        return (
            f"{hook!r} does not exist: this model runs attention and MLP in parallel "
            "(parallel_attn_mlp, as GPT-NeoX/Pythia), both reading hook_resid_pre, so there is "
            f"no residual stream between them. Use blocks.{layer}.hook_resid_pre or "
            f"blocks.{layer}.hook_resid_post."
        )
    if getattr(cfg, "attn_only", False):
        return (
            f"{hook!r} does not exist: this model is attention-only (attn_only), so a block's "
            f"residual stream after attention is blocks.{layer}.hook_resid_post; use that."
        )
    return None


def _unknown(model: nn.Module, hook: str, valid: set[str]) -> SiteError:
    missing = _missing_resid_mid(model, hook)
    if missing is not None:
        return SiteError(missing)
    layer = re.match(r"^blocks\.(\d+)\.", hook)
    n_layers = getattr(model_cfg(model), "n_layers", None) if is_transformer(model) else None
    if layer is not None and n_layers is not None and int(layer.group(1)) >= n_layers:
        return SiteError(
            f"{hook!r}: this model has {n_layers} layers (blocks.0 … blocks.{n_layers - 1}); "
            "the sites were probably written for another model. Pick sites of this model, "
            "e.g. the defaults of its preset."
        )
    close = difflib.get_close_matches(hook, sorted(valid), n=3, cutoff=0.5)
    hint = f"; nearest valid names: {close}" if close else ""
    return SiteError(f"unknown hook name {hook!r} on this model{hint}")


def _order_key(model: nn.Module, site: Site, valid: set[str]) -> tuple[int, int]:
    """(layer, stage) of a transformer site; raises `SiteError` for a site that is not a cut."""
    m = _RESIDUAL.match(site.hook)
    if m is not None:
        return int(m.group(1)), _STAGE[f"hook_resid_{m.group(2)}"]
    m = _COMPOSITE.match(site.hook)
    if m is None:
        raise SiteError(
            f"{site.hook!r} is not a cut of the computation: the residual stream bypasses it, "
            "so the next site is not a function of this activation alone. Use a residual-"
            "stream site (blocks.L.hook_resid_pre/mid/post), an MLP site "
            "(blocks.L.mlp.hook_post, paired with the stream that bypasses the MLP), per-head "
            "outputs (blocks.L.attn.hook_z, paired with hook_resid_pre), or 'logits' "
            "(docs/concepts.md, 'Sites and sections')."
        )
    for part in site_parts(model, site)[1:]:
        if part not in valid:
            raise SiteError(
                f"{site.hook!r} pairs the component with the stream at {part!r}, which this "
                "model does not have"
            )
    return int(m.group(1)), _STAGE[m.group(2)]


def _blocks(name: str, blocks: object) -> tuple[int, ...]:
    """`mlp=` or `attn=` of `residual_sites` as block indices: a sequence of integers."""
    scalar = isinstance(blocks, (str, bytes)) or (
        isinstance(blocks, torch.Tensor) and blocks.ndim == 0
    )
    items = [_layer(b) for b in blocks] if isinstance(blocks, Iterable) and not scalar else [None]
    if any(b is None for b in items):
        raise SiteError(
            f"{name} must be a sequence of block indices, e.g. {name}=(1,) or {name}=(1, 3); "
            f"got {blocks!r}"
        )
    return tuple(int(b) for b in items if b is not None)


def residual_sites(
    model: nn.Module,
    n_blocks: int | None = None,
    positions: Positions = "all",
    mlp: Sequence[int] = (),
    attn: Sequence[int] = (),
) -> list[Site]:
    """Every residual-stream cut of the first `n_blocks` blocks of a transformer, in forward
    order: `hook_resid_pre` and (where the model has it) `hook_resid_mid` of each block, an
    attention site (`attn.hook_z` with its stream) after `hook_resid_pre` of the blocks in
    `attn`, an MLP site (`mlp.hook_post` with its stream) after `hook_resid_mid` of the blocks
    in `mlp`, and the last block's `hook_resid_post` as the final site. Raises `SiteError` for
    `n_blocks` below 1, for `mlp`/`attn` that are not sequences of block indices (one block is
    `mlp=(1,)`), and for an MLP or attention block outside those blocks, or without an MLP."""
    cfg = model_cfg(model)
    mlp, attn = _blocks("mlp", mlp), _blocks("attn", attn)
    wanted = cfg.n_layers if n_blocks is None else _layer(n_blocks)
    if wanted is None or wanted < 1:
        raise SiteError(
            f"n_blocks must be a whole number of at least 1 (the sites span blocks 0 … "
            f"n_blocks - 1; None for all {cfg.n_layers}), got {n_blocks!r}"
        )
    n = min(wanted, cfg.n_layers)
    valid = set(hook_names(model))
    for what, blocks in (("MLP", mlp), ("attention", attn)):
        outside = [b for b in blocks if not 0 <= b < n]
        if outside:
            of = (
                f"the first {n} of its {cfg.n_layers} blocks" if n < cfg.n_layers else f"{n} blocks"
            )
            raise SiteError(
                f"{what} sites asked for block(s) {outside}, but the sites span {of} "
                f"(0 … {n - 1}); pick {what} blocks among them"
            )
    both = [b for b in attn if b in mlp]
    if both and _parallel(model):
        raise SiteError(_parallel_block_message(str(both[0])))
    no_mlp = [b for b in mlp if f"blocks.{b}.mlp.hook_post" not in valid]
    if no_mlp:
        raise SiteError(
            f"block(s) {no_mlp} have no MLP (no blocks.{no_mlp[0]}.mlp.hook_post; an "
            "attention-only model has none): leave out the MLP sites"
        )
    hooks: list[str] = []
    for b in range(n):
        hooks.append(f"blocks.{b}.hook_resid_pre")
        if b in attn:
            hooks.append(f"blocks.{b}.attn.hook_z")
        if f"blocks.{b}.hook_resid_mid" in valid:
            hooks.append(f"blocks.{b}.hook_resid_mid")
        if b in mlp:
            hooks.append(f"blocks.{b}.mlp.hook_post")
    hooks.append(f"blocks.{n - 1}.hook_resid_post")
    return [Site(h, positions) for h in hooks]


def validate_sites(model: nn.Module, sites: Sequence[SiteLike]) -> list[Site]:
    """Resolve and check sites against a model; they must be cuts, in forward order.

    Raises `SiteError` naming the nearest valid hook names for an unknown site, the layer
    count for a site of a deeper model, and explaining the composite alternative for a hook
    that the residual stream bypasses. Sites of a non-transformer `HookedRootModule` are taken
    as given (their order is checked when data flows).
    """
    resolved = [as_site(s) for s in sites]
    if not resolved:
        raise SiteError("no sites given: pass at least two, e.g. resid_mid of a block and logits")
    valid = set(hook_names(model))
    if LOGITS in [s.hook for s in resolved[:-1]]:
        raise SiteError("'logits' can only be the last site")
    for site in resolved:
        if not site.is_logits and site.hook not in valid:
            raise _unknown(model, site.hook, valid)
    if not is_transformer(model):
        names = [s.name for s in resolved]
        if len(set(names)) != len(names):
            raise SiteError(f"sites must not repeat: {names}")
        return resolved
    order = []
    for site in resolved:
        if site.is_logits:
            order.append((model_cfg(model).n_layers + 1, 0))
        else:
            order.append(_order_key(model, site, valid))
    for (a, sa), (b, sb) in zip(zip(order, resolved), zip(order[1:], resolved[1:])):
        if not a < b:
            raise SiteError(
                f"sites must be in forward order without repeats: {sa.name} does not come "
                f"before {sb.name}"
            )
        _check_attention_reaches_next(model, sa, sb)
    return resolved


def _parallel_block_message(layer: str) -> str:
    return (
        f"blocks.{layer}.attn.hook_z followed by blocks.{layer}.mlp.hook_post: this model runs "
        "attention and MLP in parallel (parallel_attn_mlp, as GPT-NeoX/Pythia), so the MLP "
        f"site carries blocks.{layer}.hook_resid_pre and the heads' outputs reach nothing "
        "through it (their features would all have Λ = 0). Use the attention site or the MLP "
        f"site of block {layer}, not both"
    )


def _check_attention_reaches_next(model: nn.Module, site: Site, following: Site) -> None:
    """Refuse an attention site followed by the MLP site of its own parallel block."""
    a, b = _COMPOSITE.match(site.hook), _COMPOSITE.match(following.hook)
    if (
        a is not None
        and b is not None
        and a.group(1) == b.group(1)
        and a.group(2) == "attn.hook_z"
        and b.group(2).startswith("mlp")
        and _parallel(model)
    ):
        raise SiteError(_parallel_block_message(a.group(1)))
