"""Closed-form learning coefficients (Aoyagi–Watanabe 2005, Aoyagi 2024)."""

from __future__ import annotations

import itertools

import pytest

from tl_degeneracy.engine.degeneracy.ground_truth import (
    deep_linear_network,
    reduced_rank_regression,
    regular,
)


def test_examples_from_the_papers():
    assert reduced_rank_regression(5, 3, 5, 0).llc == 6.5
    assert reduced_rank_regression(5, 3, 5, 0).multiplicity == 2
    assert deep_linear_network([10, 20, 20, 10], 3).llc == 50
    assert regular(7).llc == 3.5


@pytest.mark.parametrize(
    "shape, llc",
    [((4, 3, 4, 1), 6.0), ((2, 2, 8, 1), 5.0), ((8, 2, 2, 1), 5.0), ((2, 6, 2, 1), 2.0)],
)
def test_each_case_of_reduced_rank_regression(shape, llc):
    assert reduced_rank_regression(*shape).llc == llc


def test_two_layer_dln_is_reduced_rank_regression():
    for m, h, n in itertools.product(range(1, 8), repeat=3):
        for r in range(min(m, h, n) + 1):
            assert deep_linear_network([m, h, n], r) == reduced_rank_regression(m, h, n, r)


def test_dln_formula_defined_and_bounded():
    for widths in itertools.product(range(1, 6), repeat=4):
        for r in range(min(widths) + 1):
            lam = deep_linear_network(widths, r).llc
            d = sum(a * b for a, b in zip(widths, widths[1:]))
            assert 0 <= lam <= d / 2


def test_rank_out_of_range():
    with pytest.raises(ValueError, match="true rank"):
        reduced_rank_regression(2, 2, 2, 3)
