"""`engine.fit`: a fit's configuration is checked when it is made, not deep inside a pass."""

from __future__ import annotations

import pytest

from tl_degeneracy.engine.fit import LIBConfig
from tl_degeneracy.engine.sites import Site

SITES = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"kind": "lbi"}, "kind must be one of lib, ib, pca, neuron; got 'lbi'"),
        ({"final_basis": "ica"}, "final_basis must be one of raw, pca; got 'ica'"),
        ({"store": "ram"}, "store must be one of auto, memory, disk, off; got 'ram'"),
        ({"batch_size": 0}, "batch_size must be a whole number of at least 1, got 0"),
        ({"batch_size": 16.0}, "batch_size must be a whole number of at least 1, got 16.0"),
        ({"checkpoint_every": -1}, "checkpoint_every must be a whole number of at least 1"),
        ({"stats_device": "gpu"}, "'gpu' is not a device"),
    ],
)
def test_a_setting_out_of_range_is_named(setting, message):
    with pytest.raises(ValueError, match=message):
        LIBConfig(SITES, **setting)


def test_sites_are_a_sequence_kept_as_a_tuple():
    """A list is kept as a tuple (the config stays hashable); one site, not in a sequence,
    would be read as its characters, and is refused."""
    config = LIBConfig(list(SITES))
    assert config.sites == SITES and hash(config)
    for one in (SITES[0], Site(SITES[0])):
        with pytest.raises(TypeError, match="sites must be a sequence of sites"):
            LIBConfig(one)  # type: ignore[arg-type]


def test_rows_as_lists_and_data_without_variation_are_named(api, tiny, tokens_for):
    """Token rows given as lists of ids would be read as batches of one row each; a fit on
    data that does not vary at a site keeps nothing there and says so."""
    import torch

    from tl_degeneracy.engine.fit import fit_basis

    model = tiny(api)
    toks = tokens_for(model, 6)
    sites = (Site("blocks.0.hook_resid_pre"), Site("blocks.0.hook_resid_post", "last"))
    config = LIBConfig(sites + (Site("logits", "last"),), progress=False)
    with pytest.raises(TypeError, match=r"pass one tensor, torch.tensor\(rows\)"):
        fit_basis(model, toks.tolist(), config)
    with pytest.warns(
        UserWarning, match=r"no feature kept at \[.*'blocks.0.hook_resid_post\[-1\]'\]"
    ):
        one = fit_basis(model, toks[:1], config)
    assert one[sites[1]].k == 0
    lists_of_batches = fit_basis(model, [toks[:3], toks[3:]], config)  # still batches
    torch.testing.assert_close(
        lists_of_batches[sites[0]].C.abs(), fit_basis(model, toks, config)[sites[0]].C.abs()
    )
