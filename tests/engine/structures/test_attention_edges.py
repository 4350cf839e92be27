"""The attention section's attributions written out (`attention_edges`) against autograd of
the block's forward, signs included, and their blocked squared sum against the full tensor."""

import pytest
import torch

from tl_degeneracy.engine.bases import pca_basis
from tl_degeneracy.engine.capture import capture_sites
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import collect_statistics
from tl_degeneracy.engine.structures import attention_edges
from tl_degeneracy.engine.structures.attention_edges import AttentionAttributions
from tl_degeneracy.engine.structures.plain import PlainBlock

PRE, MID = Site("blocks.0.hook_resid_pre"), Site("blocks.0.hook_resid_mid")


@pytest.fixture
def setup(api, tiny, tokens_for):
    model = tiny(api, n_ctx=6, n_heads=3)
    toks = tokens_for(model, 5, seed=1)
    stats = collect_statistics(model, [PRE, MID], toks, progress=False)
    b_in, b_out = (pca_basis(s, stats[s].mean, stats[s].gram) for s in (PRE, MID))
    (x,) = capture_sites(model, toks, [PRE], all_positions=True)
    block = PlainBlock.of(model, 0)
    assert block is not None
    return block, b_in, b_out.truncated(5), x.to(torch.float64)


def _autograd(block, b_in, b_out, x, queries):
    """`A_{b,t,i,j} = Σ_s φ_{s,j} ∂f̂^out_{t,i}/∂x_s · ρ_j` from the Jacobian of the block."""
    rows = torch.cat([b_in.C_pinv, b_in.mean[None]])  # [J, d]
    f = b_in.features(x)
    phi = torch.cat([f, f.new_ones(*f.shape[:-1], 1)], -1)  # [B, S, J]
    out = []
    for xb, pb in zip(x, phi):

        def read(xs):
            return (xs[queries] + block.attention(xs, queries)) @ b_out.C

        jac = torch.autograd.functional.jacobian(read, xb)  # [T, I, S, d]
        out.append(torch.einsum("tisd,jd,sj->tij", jac, rows, pb))
    return torch.stack(out)


@pytest.mark.parametrize("queries", [[0, 1, 2, 3, 4, 5], [5], [4, 1]])
def test_attributions_equal_autograd(setup, queries):
    block, b_in, b_out, x = setup
    q = torch.tensor(queries)
    att = AttentionAttributions(block, b_in, b_out)
    torch.testing.assert_close(
        att(x, q), _autograd(block, b_in, b_out, x, q), rtol=1e-10, atol=1e-10
    )


def test_blocked_squared_sum_equals_full_tensor(setup, monkeypatch):
    block, b_in, b_out, x = setup
    att = AttentionAttributions(block, b_in, b_out)
    queries = torch.arange(1, x.shape[1])
    want = att(x, queries).pow(2).sum((0, 1))
    monkeypatch.setattr(attention_edges, "PARTS_ELEMENTS", 1)  # one example at a time
    monkeypatch.setattr(attention_edges, "BLOCK_ELEMENTS", 2 * want.numel())  # two per block
    torch.testing.assert_close(att.squared_sum(x, queries), want, rtol=1e-12, atol=1e-12)
