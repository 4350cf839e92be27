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
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"checkpoint_every": -1}, "checkpoint_every must be at least 1, got -1"),
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
