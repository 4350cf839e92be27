"""Cotangents for edges (`engine.cotangents.edge_cotangents`): which output feature each one
reads, its values, independence from the chunk size, and nothing made on the host."""

import pytest
import torch

from tl_degeneracy.engine.cotangents import edge_cotangents
from tl_degeneracy.engine.synchronisation import HostTransfers


def _all(method: str, chunk: int, readout: torch.Tensor, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    parts = list(edge_cotangents(readout, 2, 3, method, 4, gen, chunk))
    idx = torch.cat([i for i, _, _ in parts])
    v = torch.cat([v for _, v, _ in parts])
    return idx, v, {w for _, _, w in parts}


@pytest.mark.parametrize("method", ["exact", "stochastic"])
def test_edge_cotangents_read_each_output_feature(method):
    """Exact: unit (t, i) is output feature i's readout row at position t and zero elsewhere;
    stochastic: unit (r, i) is that row times a sign per (row, position), weight 1/R. Chunks
    of any size give the same cotangents, and no index is made on the host (a GPU sync)."""
    readout = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    k_out, outer = 5, 3 if method == "exact" else 4
    with HostTransfers() as seen:
        idx, v, weights = _all(method, 3, readout)
    assert seen.calls == []
    assert idx.tolist() == [i for _ in range(outer) for i in range(k_out)]
    assert v.shape == (outer * k_out, 2, 3, 7)
    for u, i in enumerate(idx.tolist()):
        if method == "exact":
            expected = torch.zeros(2, 3, 7, dtype=torch.float64)
            expected[:, u // k_out] = readout[i]
            torch.testing.assert_close(v[u], expected, rtol=0, atol=0)
        else:
            signs = v[u] @ readout[i] / readout[i].dot(readout[i])
            torch.testing.assert_close(signs.abs(), torch.ones(2, 3, dtype=torch.float64))
            torch.testing.assert_close(v[u], signs.round()[..., None] * readout[i], rtol=0, atol=0)
    assert weights == ({1.0} if method == "exact" else {0.25})
    again = _all(method, 100, readout)
    assert torch.equal(again[0], idx) and torch.equal(again[1], v)
