"""Reading and writing site activations: the one place the prompt graph touches hooks.

Every module of this package reads a site through `_read_site` and writes one through
`_write_site`, so that sites of another shape (say an MLP's hidden layer concatenated with the
residual stream that bypasses it) need a change here only.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxtyping import Float
from torch import Tensor, nn

from tl_degeneracy.engine.compat import HookFn, replace_hooks
from tl_degeneracy.engine.sites import Site

SiteFn = Callable[[Float[Tensor, "batch site_pos d"]], None]
SiteEdit = Callable[[Float[Tensor, "batch site_pos d"]], Float[Tensor, "batch site_pos d"]]


def _read_site(model: nn.Module, site: Site, fn: SiteFn) -> list[tuple[str, HookFn]]:
    """Forward hooks that hand `fn` the site's activation at its positions, `[batch, P, d]`
    (the model's own tensor when the site has every position: read-only)."""
    del model  # composite sites will need it

    def read(act: Tensor, hook: object = None) -> None:
        fn(site.select(act))

    return [(site.hook, read)]


def _write_site(model: nn.Module, site: Site, fn: SiteEdit) -> list[tuple[str, HookFn]]:
    """Forward hooks that replace the site's activation at its positions by `fn(activation)`
    (which may add autograd leaves or cut the graph); other positions are left as they are. A
    write means the same on both APIs (see `compat.replace_hooks`)."""

    def write(act: Tensor) -> Tensor:
        idx = site.index(act.shape[1]).to(act.device)
        return act.index_copy(1, idx, fn(act[:, idx]).to(act.dtype))

    return replace_hooks(model, site.hook, write)
