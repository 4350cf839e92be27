"""Sites: a hook point name plus a position selection (method.md §1).

A site is where a basis lives. Only *cuts* of the computation are valid sites: the residual
stream (`blocks.{i}.hook_resid_pre/mid/post`) and the logits. A hook that the residual stream
bypasses (say `blocks.0.mlp.hook_post`) does not determine the next site on its own, so it is
rejected with an explanation rather than silently giving a wrong Jacobian.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tl_degeneracy.engine.compat import hook_names, model_cfg

LOGITS = "logits"
"""Name of the final, non-hook site: the model's output logits."""

Positions = Literal["all", "last"] | tuple[int, ...]

_CUT_PATTERN = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")
_SHORT_NAMES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
    "pre": "mlp.hook_pre",
    "post": "mlp.hook_post",
    "pattern": "attn.hook_pattern",
    "z": "attn.hook_z",
}


class SiteError(ValueError):
    """A site that does not exist on the model or is not a cut of its computation."""


@dataclass(frozen=True)
class Site:
    """A hook point and the token positions whose activations form the site's vector.

    `positions` is "all", "last", or a tuple of indices (negative indices count from the end).
    """

    hook: str
    positions: Positions = "all"

    def __post_init__(self) -> None:
        pos = self.positions
        if isinstance(pos, list):
            object.__setattr__(self, "positions", tuple(int(p) for p in pos))
        elif not (pos in ("all", "last") or isinstance(pos, tuple)):
            raise SiteError(f"positions must be 'all', 'last' or a list of ints, got {pos!r}")

    @property
    def name(self) -> str:
        """A unique, readable key: the hook name, with the positions when not 'all'."""
        if self.positions == "all":
            return self.hook
        if self.positions == "last":
            return f"{self.hook}[-1]"
        return f"{self.hook}[{','.join(str(p) for p in self.positions)}]"

    @property
    def is_logits(self) -> bool:
        return self.hook == LOGITS

    def index(self, n_pos: int) -> torch.Tensor:
        """The selected positions as an index tensor for a sequence of length `n_pos`."""
        if self.positions == "all":
            return torch.arange(n_pos)
        if self.positions == "last":
            return torch.tensor([n_pos - 1])
        idx = torch.tensor(self.positions)
        idx = torch.where(idx < 0, idx + n_pos, idx)
        if (idx < 0).any() or (idx >= n_pos).any():
            raise SiteError(
                f"site {self.name}: positions {self.positions} out of range for length {n_pos}"
            )
        return idx

    def n_positions(self, n_pos: int) -> int:
        return int(self.index(n_pos).numel())

    def select(self, act: torch.Tensor) -> torch.Tensor:
        """Select this site's positions from `[batch, pos, d]`, keeping the pos axis.

        For `positions="all"` this is `act` itself, not a copy (reading 61 sites of a language
        model costs a fifth of a forward in copies): treat the result as read-only.
        """
        if self.positions == "all":
            return act
        return act[:, self.index(act.shape[1])]

    def to_json(self) -> dict:
        pos = self.positions if isinstance(self.positions, str) else list(self.positions)
        return {"hook": self.hook, "positions": pos}

    @classmethod
    def from_json(cls, d: dict) -> Site:
        pos: Positions | list[int] = d["positions"]  # a list when read from JSON
        return cls(d["hook"], pos if isinstance(pos, str) else tuple(pos))


SiteLike = Site | str | tuple


def resolve_hook_name(name: str | tuple) -> str:
    """Full hook name from a full name or a short form like `("resid_mid", 3)`."""
    if isinstance(name, tuple):
        if len(name) != 2 or not isinstance(name[1], int):
            raise SiteError(
                f"short site names are (kind, layer), e.g. ('resid_mid', 3); got {name}"
            )
        kind, layer = name
        if kind not in _SHORT_NAMES:
            raise SiteError(f"unknown short name {kind!r}; known: {sorted(_SHORT_NAMES)}")
        return f"blocks.{layer}.{_SHORT_NAMES[kind]}"
    return name


def as_site(spec: SiteLike, positions: Positions | None = None) -> Site:
    """Accept a `Site`, a hook name, a short tuple `("resid_mid", 0)`, or a tuple
    `(name, positions)` such as `("blocks.0.hook_resid_mid", "last")`."""
    if isinstance(spec, Site):
        return spec if positions is None else Site(spec.hook, positions)
    if isinstance(spec, tuple) and len(spec) == 2 and not isinstance(spec[1], int):
        name, pos = spec
        return Site(resolve_hook_name(name), pos if positions is None else positions)
    return Site(resolve_hook_name(spec), "all" if positions is None else positions)


def _missing_resid_mid(model: nn.Module, hook: str) -> str | None:
    """Why a block has no `hook_resid_mid`, for models whose blocks have no such cut."""
    m = _CUT_PATTERN.match(hook)
    if m is None or m.group(2) != "mid":
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


def validate_sites(model: nn.Module, sites: Sequence[SiteLike]) -> list[Site]:
    """Resolve and check sites against a model; they must be cuts, in forward order.

    Raises `SiteError` naming the nearest valid hook names for an unknown site, and explaining
    the composite alternative for a site that the residual stream bypasses.
    """
    resolved = [as_site(s) for s in sites]
    if not resolved:
        raise SiteError("no sites given: pass at least two, e.g. resid_mid of a block and logits")
    valid = set(hook_names(model))
    order = []
    for site in resolved:
        if site.is_logits:
            order.append((model_cfg(model).n_layers + 1, 0))
            continue
        if site.hook not in valid:
            close = difflib.get_close_matches(site.hook, sorted(valid), n=3, cutoff=0.5)
            hint = f"; nearest valid names: {close}" if close else ""
            raise SiteError(
                _missing_resid_mid(model, site.hook)
                or f"unknown hook name {site.hook!r} on this model{hint}"
            )
        m = _CUT_PATTERN.match(site.hook)
        if m is None:
            raise SiteError(
                f"{site.hook!r} is not a cut of the computation: the residual stream bypasses "
                "it, so the next site is not a function of this activation alone (method.md §1). "
                "Use a residual-stream site instead (blocks.L.hook_resid_pre/mid/post, which "
                "contain this component's output), or 'logits'."
            )
        order.append((int(m.group(1)), ["pre", "mid", "post"].index(m.group(2))))
    for (a, sa), (b, sb) in zip(zip(order, resolved), zip(order[1:], resolved[1:])):
        if not a < b:
            raise SiteError(
                f"sites must be in forward order without repeats: {sa.name} does not come "
                f"before {sb.name}"
            )
    if LOGITS in [s.hook for s in resolved[:-1]]:
        raise SiteError("'logits' can only be the last site")
    return resolved
