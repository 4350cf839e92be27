from functools import partial

import pytest
import torch

from tl_degeneracy.engine import statistics
from tl_degeneracy.engine.sites import Site, validate_sites
from tl_degeneracy.engine.statistics import (
    GramAccumulator,
    GramStatistics,
    NonFiniteActivationError,
    SiteStatistics,
    StatisticsMismatchError,
    add_to_statistics,
    capture_sites,
    collect_statistics,
)
from tl_degeneracy.engine.streaming import Checkpointing, EmptyDataError
from tl_degeneracy.engine.synchronisation import HostTransfers

SITES = [
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.hook_resid_mid", "last"),
    Site("logits", "last"),
]


def test_mean_and_gram_match_direct_computation(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 50)
    stats = collect_statistics(model, SITES, toks, batch_size=7, progress=False)
    acts = capture_sites(model, toks, SITES)
    for site, act in zip(SITES, acts):
        x = act.reshape(-1, act.shape[-1]).double()
        xc = x - x.mean(0)
        assert stats[site].count == x.shape[0]
        torch.testing.assert_close(stats[site].mean, x.mean(0), rtol=0, atol=1e-13)
        torch.testing.assert_close(stats[site].gram, xc.T @ xc / x.shape[0], rtol=0, atol=1e-12)


def test_float32_model_accumulates_in_float64(tiny, tokens_for, api):
    model = tiny(api).to(torch.float32)
    stats = collect_statistics(model, SITES[:1], tokens_for(model, 9), progress=False)
    assert stats[SITES[0]].m2.dtype == torch.float64


def test_merge_equals_union(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 40)
    whole = collect_statistics(model, SITES, toks, batch_size=40, progress=False)
    a = collect_statistics(model, SITES, toks[:13], progress=False)
    b = collect_statistics(model, SITES, toks[13:], progress=False)
    merged = a.merge(b)
    for s in SITES:
        torch.testing.assert_close(merged[s].gram, whole[s].gram, rtol=0, atol=1e-12)
        assert merged[s].count == whole[s].count


def test_merging_different_sites_names_the_field(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 5)
    a = collect_statistics(model, SITES[:2], toks, progress=False)
    b = collect_statistics(model, SITES[1:], toks, progress=False)
    with pytest.raises(StatisticsMismatchError, match="sites"):
        a.merge(b)
    with pytest.raises(StatisticsMismatchError, match="different sites"):
        a[SITES[1]].merge(b[SITES[2]])
    with pytest.raises(StatisticsMismatchError, match="mean"):
        SiteStatistics.empty(SITES[0], 3).merge(SiteStatistics.empty(SITES[0], 4))


def test_nan_names_site_and_batch(api, tiny, tokens_for):
    model = tiny(api)
    with torch.no_grad():
        embed = next(p for n, p in model.named_parameters() if "embed" in n and "pos" not in n)
        embed[3] = float("nan")
    toks = tokens_for(model, 30)
    toks[:, :] = 0
    toks[17, 1] = 3
    with pytest.raises(
        NonFiniteActivationError, match=r"blocks.0.hook_resid_pre, batch 2.*\[1, 1\]"
    ):
        collect_statistics(model, SITES, toks, batch_size=8, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_gram_update_refuses_non_finite_samples_and_stays_unchanged(bad):
    st = SiteStatistics.empty(SITES[0], 3)
    st.add(torch.ones(4, 3))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    x[2, 1] = bad
    with pytest.raises(NonFiniteActivationError, match="blocks.0.hook_resid_pre"):
        st.add(x)
    assert st.count == 4 and torch.equal(st.mean, torch.ones(3, dtype=torch.float64))
    assert torch.equal(st.m2, torch.zeros(3, 3, dtype=torch.float64))


def test_empty_data(api, tiny):
    model = tiny(api)
    with pytest.raises(EmptyDataError, match="no data"):
        collect_statistics(model, SITES, torch.zeros(0, 4, dtype=torch.long), progress=False)
    with pytest.raises(EmptyDataError):
        collect_statistics(model, SITES, [], progress=False)


def test_resume_after_interruption_equals_uninterrupted(api, tiny, tokens_for, tmp_path):
    model = tiny(api)
    toks = tokens_for(model, 60)
    full = collect_statistics(model, SITES, toks, batch_size=6, progress=False)
    ckpt = Checkpointing(tmp_path, every=2)

    calls = {"n": 0}
    original = model.forward

    def dying_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    model.forward = dying_forward
    with pytest.raises(KeyboardInterrupt):
        collect_statistics(model, SITES, toks, batch_size=6, checkpoint=ckpt, progress=False)
    model.forward = original
    resumed = collect_statistics(model, SITES, toks, batch_size=6, checkpoint=ckpt, progress=False)
    for s in SITES:
        torch.testing.assert_close(resumed[s].gram, full[s].gram, rtol=0, atol=1e-13)
        assert resumed[s].count == full[s].count


def test_state_dict_round_trip(api, tiny, tokens_for):
    model = tiny(api)
    stats = collect_statistics(model, SITES, tokens_for(model, 10), progress=False)
    again = GramStatistics(SITES)
    again.load_state_dict(stats.state_dict())
    for s in SITES:
        assert torch.equal(again[s].m2, stats[s].m2)


def _fold(batches, sites, batched, stats=None):
    stats = stats if stats is not None else GramStatistics(list(sites))
    for i, acts in enumerate(batches):
        add_to_statistics(stats, sites, acts, i, "cpu", batched=batched)
    return stats


def test_batched_update_equals_per_site_update():
    """The GPU's batched update (one buffer, one bmm, one merge per group of sites of one
    shape), run on the CPU: the same sums as one product per site, for sites in two groups of
    widths, a site read at one position, float32 and non-contiguous inputs, an uneven last
    batch, and continued from saved state."""
    gen = torch.Generator().manual_seed(0)
    sites = [Site("a"), Site("b", "last"), Site("c"), Site("d", "1:"), Site("e")]
    widths = {"a": 6, "b": 6, "c": 6, "d": 9, "e": 9}

    def batch(rows):
        out = []
        for s in sites:
            x = torch.randn(rows, 5, widths[s.hook], generator=gen, dtype=torch.float64) * 3 + 7
            x = x.float() if s.hook == "c" else x
            x = x.transpose(0, 1).contiguous().transpose(0, 1) if s.hook == "e" else x
            out.append(s.select(x))
        return out

    batches = [batch(4), batch(4), batch(3)]
    assert not batches[0][4].is_contiguous()
    per_site = _fold(batches, sites, batched=False)
    together = _fold(batches, sites, batched=True)
    resumed = GramStatistics(list(sites))
    resumed.load_state_dict(_fold(batches[:2], sites, batched=True).state_dict())
    _fold(batches[2:], sites, batched=True, stats=resumed)
    for s in sites:
        x = torch.cat([b[sites.index(s)].reshape(-1, widths[s.hook]).double() for b in batches])
        for got in (together[s], resumed[s]):
            assert got.count == per_site[s].count == x.shape[0]
            torch.testing.assert_close(got.mean, per_site[s].mean, rtol=1e-15, atol=0)
            torch.testing.assert_close(got.m2, per_site[s].m2, rtol=1e-13, atol=0)
        torch.testing.assert_close(together[s].gram, x.T.cov(correction=0), rtol=1e-12, atol=0)


def test_batched_update_refuses_non_finite_batch_and_stays_unchanged():
    sites = [Site("a"), Site("b")]
    good = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in sites]
    stats = _fold([good], sites, batched=True)
    before = {k: (v.count, v.mean.clone(), v.m2.clone()) for k, v in stats.per_site.items()}
    bad = [good[0].clone(), good[1].clone()]
    bad[1][1, 2, 0] = float("nan")
    with pytest.raises(
        NonFiniteActivationError, match=r"site b, batch 1, \(row, position\) \[\[1, 2\]\]"
    ):
        add_to_statistics(stats, sites, bad, 1, "cpu", batched=True)
    for k, (count, mean, m2) in before.items():
        assert stats[k].count == count
        assert torch.equal(stats[k].mean, mean) and torch.equal(stats[k].m2, m2)


def test_gram_pass_reads_the_device_once_per_batch_before_its_products(
    monkeypatch, api, tiny, tokens_for
):
    """On a GPU every read of a value into Python waits for all queued work. A batch of the
    Gram pass (forward, position selection, batched update) reads once, for the NaN/Inf check
    of the batch means, before it queues its products, and makes no tensor from host data
    (a blocking copy): the products overlap the host's work on the next batch. The sums are
    those of the per-site update."""
    model = tiny(api, "ln")
    sites = validate_sites(
        model,
        [
            "blocks.0.hook_resid_pre",
            ("blocks.0.mlp.hook_post", "1:"),
            ("blocks.0.hook_resid_post", "last"),
        ],
    )
    toks = tokens_for(model, 8)
    together, per_site = GramAccumulator(model, sites, "cpu"), GramAccumulator(model, sites, "cpu")
    for i, batch in enumerate(toks.split(4)):
        with monkeypatch.context() as patch, HostTransfers() as seen:  # a GPU's update
            patch.setattr(statistics, "add_to_statistics", partial(add_to_statistics, batched=True))
            together.update(i, batch)
        per_site.update(i, batch)
        assert seen.reads == ["__bool__"] and "tensor" not in seen.calls
        assert seen.calls.index("__bool__") < seen.calls.index("bmm")
    for s in sites:
        torch.testing.assert_close(together.stats[s].m2, per_site.stats[s].m2, rtol=1e-13, atol=0)


def test_batched_update_of_sites_with_different_counts():
    """Sites of one width whose counts differ (statistics put together from elsewhere) are
    merged with their own weights: the same sums as the per-site update."""
    sites = [Site("a"), Site("b")]
    gen = torch.Generator().manual_seed(3)
    rows = [
        [torch.randn(n, 2, 4, generator=gen, dtype=torch.float64) for _ in sites] for n in (2, 5, 3)
    ]
    uneven = [GramStatistics(list(sites)) for _ in range(2)]
    for stats, batched in zip(uneven, (True, False)):
        add_to_statistics(stats, sites[:1], rows[0][:1], 0, "cpu", batched=batched)
        add_to_statistics(stats, sites, rows[1], 1, "cpu", batched=batched)
        assert (stats["a"].count, stats["b"].count) == (14, 10)
        add_to_statistics(stats, sites, rows[2], 2, "cpu", batched=batched)
    for s in sites:
        assert uneven[0][s].count == uneven[1][s].count
        torch.testing.assert_close(uneven[0][s].mean, uneven[1][s].mean, rtol=1e-15, atol=0)
        torch.testing.assert_close(uneven[0][s].m2, uneven[1][s].m2, rtol=1e-13, atol=0)


def test_sites_too_wide_for_memory_are_refused_before_allocating(monkeypatch, api, tiny):
    """A site set whose float64 Gram sums (plus one batch's product) exceed the free memory is
    refused up front, naming the widest sites and the way out; nothing was allocated."""
    import tl_degeneracy.engine.statistics as statistics
    from tl_degeneracy import LIBConfig, StatisticsMemoryError, fit_basis

    free = statistics._available_bytes("cpu")
    assert free is not None and free > 0  # Linux: MemAvailable
    model = tiny(api, "mlp")
    sites = (Site("blocks.0.hook_resid_pre"), Site("logits"))
    d, v = model.cfg.d_model, model.cfg.d_vocab
    need = 8 * (d * d + v * v + max(d, v) ** 2)
    monkeypatch.setattr(statistics, "_available_bytes", lambda device: need - 1)
    toks = torch.randint(0, v, (4, model.cfg.n_ctx))
    with pytest.raises(StatisticsMemoryError, match=f"logits: {v} units") as error:
        fit_basis(model, toks, LIBConfig(sites, progress=False))
    assert "residual_sites(model)" in str(error.value)
    monkeypatch.setattr(statistics, "_available_bytes", lambda device: need)
    fit_basis(model, toks, LIBConfig(sites, progress=False))  # exactly enough: runs


def test_a_statistics_device_this_machine_lacks_is_named_before_the_data(api, tiny, tokens_for):
    """`collect_statistics(device=...)` names a device this machine lacks (it ended in torch's
    `AssertionError: Torch not compiled with CUDA enabled` inside the first batch)."""
    from tl_degeneracy.engine.statistics import collect_statistics

    model = tiny(api)
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        collect_statistics(
            model, [Site("blocks.0.hook_resid_pre")], tokens_for(model, 4), device="gpu"
        )
