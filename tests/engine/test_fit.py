"""`engine.fit`: a fit's configuration is checked when it is made, not deep inside a pass."""

from __future__ import annotations

import pytest
import torch

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


def test_given_statistics_must_be_of_this_model_these_sites_and_these_tokens(api, tiny, tokens_for):
    """Statistics of another model, without a site of the fit, or counting other tokens were
    used as they were (the Gram of one model with the Jacobians of another); each is refused
    naming what does not match. Matching ones give the fit's own bases."""
    from tl_degeneracy.engine.fit import fit_basis
    from tl_degeneracy.engine.statistics import StatisticsMismatchError, collect_statistics

    model = tiny(api)
    toks = tokens_for(model, 12)
    sites = (Site("blocks.0.hook_resid_mid"), Site("logits"))
    config = LIBConfig(sites, batch_size=4, progress=False)
    other = collect_statistics(tiny(api, seed=7), sites, toks, progress=False)
    with pytest.raises(StatisticsMismatchError, match=r"other weights: \S+ differs"):
        fit_basis(model, toks, config, statistics=other)
    partial = collect_statistics(model, sites[:1], toks, progress=False)
    with pytest.raises(
        StatisticsMismatchError,
        match=r"have no site logits .*collect statistics at all of config.sites",
    ):
        fit_basis(model, toks, config, statistics=partial)
    fewer = collect_statistics(model, sites, toks[:4], progress=False)
    with pytest.raises(
        StatisticsMismatchError, match=r"count 16 token positions at blocks.0.hook_resid_mid.*48"
    ):
        fit_basis(model, toks, config, statistics=fewer)
    own = collect_statistics(model, sites, toks, progress=False)
    given, fitted = fit_basis(model, toks, config, statistics=own), fit_basis(model, toks, config)
    assert given.metadata["statistics"] == "given" and fitted.metadata["statistics"] == "computed"
    assert given.metadata["n_tokens"] == fitted.metadata["n_tokens"] == 48
    torch.testing.assert_close(given[sites[0]].C, fitted[sites[0]].C)


def test_a_truncation_that_keeps_nothing_says_so(api, tiny, tokens_for):
    """Cut-offs above every eigenvalue leave no feature; the warning blames them, not the
    data (which varies: the default keeps features there)."""
    from tl_degeneracy.engine.bases import Truncation
    from tl_degeneracy.engine.fit import fit_basis

    model = tiny(api)
    sites = (Site("blocks.0.hook_resid_mid"), Site("logits"))
    config = LIBConfig(sites, truncation=Truncation(absolute=1e6), progress=False)
    with pytest.warns(
        UserWarning, match=r"Truncation\(absolute=1000000.0, relative=0.0\) keeps no"
    ):
        result = fit_basis(model, tokens_for(model, 6), config)
    assert result[sites[0]].k == 0


def test_an_automatic_store_goes_to_disk_when_the_run_checkpoints(tmp_path):
    """`store="auto"` kept a small store in memory even in a checkpointed run, so an
    interruption lost it and the resumed `M'` passes re-ran the model prefix per section
    (35 s against 6 s on SmolLM2). On the CPU a checkpointed run now keeps it on disk."""
    from tl_degeneracy.engine.fit import make_store

    sites = [Site("blocks.0.hook_resid_mid")]
    batches = [torch.zeros(2, 4, dtype=torch.int64)]
    widths = {sites[0].name: 8}
    folder = tmp_path / "activations"
    assert make_store("auto", sites, batches, widths, folder, 8).root == folder
    assert make_store("auto", sites, batches, widths, None, 8).root is None  # memory
    assert make_store("memory", sites, batches, widths, folder, 8).root is None
