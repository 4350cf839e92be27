"""`engine.streaming.iter_batches`: every form of data becomes batches of at most `batch_size`
rows, checked against the model."""

from __future__ import annotations

import numpy as np
import torch

from tl_degeneracy.engine.streaming import iter_batches


def test_a_numpy_array_is_rows_like_a_tensor(api, tiny, tokens_for):
    """A 2-D array used to be read as a list of one-row batches (and refused with advice to
    add a batch axis); it is split like the tensor it holds."""
    model = tiny(api)
    toks = tokens_for(model, 10)
    batches = iter_batches(toks.numpy(), 4, model)
    assert [tuple(b.shape) for b in batches] == [(4, 4), (4, 4), (2, 4)]
    assert torch.equal(torch.cat(batches), toks)


def test_items_of_more_than_batch_size_rows_are_split(api, tiny, tokens_for):
    """`batch_size` applies to pre-batched data too: a larger item is split in order, smaller
    items (of other lengths, say) are kept as they are."""
    model = tiny(api)
    toks = tokens_for(model, 10)
    short = toks[:3, :2]
    batches = iter_batches([toks, short, np.asarray(toks[:2])], 4, model)
    assert [tuple(b.shape) for b in batches] == [(4, 4), (4, 4), (2, 4), (3, 2), (2, 4)]
    assert torch.equal(torch.cat(batches[:3]), toks) and torch.equal(batches[3], short)
