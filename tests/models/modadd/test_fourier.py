"""Fourier labels: exact cases on synthetic features, and agreement with the reference's labels
of seed 0's LIB and PCA features (skipped without ../shared)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from tl_degeneracy.models.modadd import (
    ModAddCheckpoint,
    activations_on_all_inputs,
    all_inputs,
    list_reference_checkpoints,
)
from tl_degeneracy.models.modadd.fourier import fourier_labels, parse_label

P = 23


def grid(fn, p: int = P) -> torch.Tensor:
    """Values of `fn(x, y)` on all p² inputs, as a [p*p, 1] feature."""
    x, y = all_inputs(p)[:, 0].double(), all_inputs(p)[:, 1].double()
    return fn(x, y, 2 * math.pi / p)[:, None]


def share_of(result, name: str, feature: int = 0) -> float:
    return result.share(feature, name)


@pytest.mark.parametrize("phase", [0.0, 0.7, -2.0])
def test_single_variable_waves_are_axis_terms_of_any_phase(phase):
    r = fourier_labels(grid(lambda x, y, c: torch.cos(3 * c * x + phase)), P)
    assert share_of(r, "cos(3x) + cos(3y)") == pytest.approx(1.0, abs=1e-12)
    r = fourier_labels(grid(lambda x, y, c: torch.sin(5 * c * y + phase)), P)
    assert share_of(r, "cos(5x) + cos(5y)") == pytest.approx(1.0, abs=1e-12)
    assert r.dominant_frequency.tolist() == [5]


def test_travelling_waves_use_the_sum_difference_description():
    r = fourier_labels(grid(lambda x, y, c: torch.cos(4 * c * x + 7 * c * y + 0.3)), P)
    assert r.representation == ("sum",)
    assert share_of(r, "cos(4x + 7y)") == pytest.approx(1.0, abs=1e-12)
    # sum power 0.9 beats the leading product power (√0.9 + √0.1)² / 2 = 0.8
    r = fourier_labels(
        grid(lambda x, y, c: 3 * torch.cos(2 * c * (x + y)) + torch.cos(2 * c * (x - y))), P
    )
    assert r.representation == ("sum",)
    assert share_of(r, "cos(2x + 2y)") == pytest.approx(0.9, abs=1e-12)
    assert share_of(r, "cos(2x - 2y)") == pytest.approx(0.1, abs=1e-12)


def test_products_use_the_product_description_with_their_phases():
    r = fourier_labels(
        grid(lambda x, y, c: torch.cos(3 * c * x + 1.0) * torch.cos(8 * c * y - 0.4)), P
    )
    assert r.representation == ("product",)
    assert share_of(r, "cos(3x) * cos(8y)") == pytest.approx(1.0, abs=1e-12)
    # cos(x - y) = cos x cos y + sin x sin y: two equal rank-one parts
    r = fourier_labels(grid(lambda x, y, c: torch.cos(6 * c * (x - y))), P)
    assert r.representation == ("product",)
    assert share_of(r, "cos(6x) * cos(6y)") == pytest.approx(0.5, abs=1e-12)
    assert share_of(r, "sin(6x) * sin(6y)") == pytest.approx(0.5, abs=1e-12)
    forced = fourier_labels(grid(lambda x, y, c: torch.cos(6 * c * (x - y))), P, "sum")
    assert share_of(forced, "cos(6x - 6y)") == pytest.approx(1.0, abs=1e-12)


def test_mixture_shares_rows_and_vectorisation():
    def f(x, y, c):
        return 2 + 2 * torch.cos(5 * c * x) + torch.sin(5 * c * y + 1) + torch.cos(9 * c * (x + y))

    feats = torch.cat(
        [
            grid(f),
            grid(lambda x, y, c: torch.cos(2 * c * x) * torch.sin(2 * c * y)),
            torch.zeros(P * P, 1),
        ],
        dim=1,
    )
    r = fourier_labels(feats, P)
    # powers: const 4, axis 5: (4 + 1)/2, sum wave 1/2  → 4 : 2.5 : 0.5
    assert share_of(r, "const") == pytest.approx(4 / 7, abs=1e-12)
    assert share_of(r, "cos(5x) + cos(5y)") == pytest.approx(2.5 / 7, abs=1e-12)
    assert share_of(r, "cos(9x + 9y)") == pytest.approx(0.5 / 7, abs=1e-12)
    assert r.shares.sum(1).tolist() == pytest.approx([1.0, 1.0, 0.0], abs=1e-12)
    assert r.power[0].item() == pytest.approx(7.0, abs=1e-12)  # mean square
    assert r.dominant_frequency.tolist() == [5, 2, 0]
    one_by_one = torch.cat([fourier_labels(feats[:, i : i + 1], P).shares for i in range(3)])
    torch.testing.assert_close(one_by_one, r.shares, rtol=0, atol=1e-14)
    assert r.labels(0.05)[0] == "57% const|36% cos(5x) + cos(5y)|7% cos(9x + 9y)"


def test_positions_are_summed():
    feats = torch.randn(P * P, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(
        fourier_labels(feats, P).shares, fourier_labels(feats.sum(1), P).shares
    )
    with pytest.raises(ValueError):
        fourier_labels(torch.randn(P * P + 1, 2), P)


def test_parse_label_roundtrip():
    assert parse_label("51% cos(15x) + cos(15y)|0% const") == [
        ("cos(15x) + cos(15y)", 0.51),
        ("const", 0.0),
    ]


# --- agreement with the reference labels ---------------------------------------------------------

REFERENCE = list_reference_checkpoints()
NODE_LAYERS = {  # node layer: (hook, position)
    "ln1.0": ("blocks.0.hook_resid_pre", None),
    "ln2.0": ("blocks.0.hook_resid_mid", -1),
    "unembed": ("blocks.0.hook_resid_post", -1),
}


@pytest.fixture(scope="module")
def seed0_activations():
    if not REFERENCE:
        pytest.skip(
            "reference checkpoints not found (needs ../shared/reference/modadd or "
            "$TL_DEGENERACY_SHARED)"
        )
    ckpt = ModAddCheckpoint.open(REFERENCE[0])
    model = ckpt.model(dtype=torch.float64)
    raw = activations_on_all_inputs(model, [hook for hook, _ in NODE_LAYERS.values()], ckpt.p)
    acts = {}
    for node, (hook, pos) in NODE_LAYERS.items():
        act = raw[hook] if pos is None else raw[hook][:, pos]
        acts[node] = torch.cat([act, torch.ones_like(act[..., :1])], dim=-1)  # constant last
    return ckpt, acts


@pytest.mark.parametrize("basis", ["lib", "pca"])
def test_labels_match_reference_csv(seed0_activations, basis):
    from safetensors.torch import load_file

    ckpt, acts = seed0_activations
    ref = load_file(str(ckpt.path / f"{basis}_reference.safetensors"))
    with open(ckpt.path / f"{basis}_fourier_labels.csv") as fh:
        rows = list(csv.reader(fh))
    for line, node in enumerate(NODE_LAYERS):
        ref_labels = rows[line]
        features = acts[node] @ ref[f"{node}/C"][:, : len(ref_labels)]
        ours = fourier_labels(features, ckpt.p)
        for i, label in enumerate(ref_labels):
            expected = parse_label(label)
            top_name, top_share = expected[0]
            best = ours.shares[i].max().item()
            dominant = ours.term_names[ours.shares[i].argmax().item()]
            # dominant term: the same, or tied with ours within rounding
            assert dominant == top_name or best - share_of(ours, top_name, i) < 0.01, (
                node,
                i,
                label,
                ours.label(i),
            )
            for name, share in expected:
                assert abs(share_of(ours, name, i) - share) <= 0.01, (node, i, name, ours.label(i))
