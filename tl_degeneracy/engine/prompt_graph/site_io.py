"""Reading and writing site activations: the one place the prompt graph touches hooks, on the
engine's site I/O (`engine.capture`).

Prompt graphs cut the forward at every site (each site's arrival depends on the previous
site's leaf only); a composite site (an MLP's neurons with the stream that bypasses them) would
need its stream part cut as well, which this version does not do: such sites are refused with
the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxtyping import Float
from torch import Tensor, nn

from tl_degeneracy.engine.capture import as_positions, transform_hooks
from tl_degeneracy.engine.compat import HookFn
from tl_degeneracy.engine.sites import Site, SiteError, site_parts

SiteFn = Callable[[Float[Tensor, "batch site_pos d"]], None]
SiteEdit = Callable[[Float[Tensor, "batch site_pos d"]], Float[Tensor, "batch site_pos d"]]


def _single_part(model: nn.Module, site: Site) -> None:
    if len(site_parts(model, site)) > 1:
        raise SiteError(
            f"{site.name}: prompt graphs take residual-stream sites (a composite MLP or "
            "attention site would need its stream part cut too); leave `sites` out to use "
            "the basis's residual-stream sites, or name hook_resid_* sites in it"
        )


def _read_site(model: nn.Module, site: Site, fn: SiteFn) -> list[tuple[str, HookFn]]:
    """Forward hooks that hand `fn` the site's activation at its positions, `[batch, P, d]`
    (the model's own tensor when the site has every position: read-only)."""
    _single_part(model, site)

    def read(act: Tensor, hook: Any = None) -> None:
        fn(site.select(as_positions(act)))

    return [(site.hook, read)]


def _write_site(model: nn.Module, site: Site, fn: SiteEdit) -> list[tuple[str, HookFn]]:
    """Forward hooks that replace the site's activation at its positions by `fn(activation)`
    (which may add autograd leaves or cut the graph); other positions are left as they are. A
    write means the same on both APIs (see `compat.replace_hooks`)."""
    _single_part(model, site)
    return transform_hooks(model, site, fn)
