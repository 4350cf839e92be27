"""The three sources of degeneracy: pure functions and planted TransformerLens models."""

from __future__ import annotations

import pytest
import torch

from tl_degeneracy.engine.compat import hooked_state_dict
from tl_degeneracy.engine.degeneracy.groups import pattern_groups, switch_pattern
from tl_degeneracy.engine.degeneracy.measure import measure_sources
from tl_degeneracy.engine.degeneracy.sources import SourcesConfig
from tl_degeneracy.engine.degeneracy.spectra import (
    joint_free_weights,
    null_directions,
    nullity,
    nullity_curve,
)


def test_nullity_relative_and_absolute():
    evals = torch.tensor([10.0, 1.0, 1e-3, 1e-9, 0.0], dtype=torch.float64)
    assert nullity(evals, 1e-6, "relative") == 2  # ≤ 1e-5
    assert nullity(evals, 1e-6, "absolute") == 2
    assert nullity(evals, 1e-2, "relative") == 3  # ≤ 0.1
    assert nullity(evals, 1e-2, "absolute") == 3
    assert nullity(evals, 2.0, "absolute") == 4
    curve = nullity_curve(evals, [1e-12, 1e-6, 1e-2, 0.5])
    assert curve.tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="cutoff"):
        nullity(evals, 1e-3, "bogus")  # type: ignore[arg-type]


def test_null_directions_span_the_planted_null_space():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))[0]
    x = torch.randn(200, 4, generator=gen, dtype=torch.float64) @ basis[:, :4].T
    gram = x.T @ x / 200
    null = null_directions(gram, 1e-10)
    assert null.shape == (6, 2)
    assert torch.allclose(null @ null.T, basis[:, 4:] @ basis[:, 4:].T, atol=1e-10)


def test_joint_count_removes_the_overlap():
    assert joint_free_weights(2, 3, 10, 20) == 2 * 20 + 3 * 10 - 6
    assert joint_free_weights(0, 0, 10, 20) == 0
    assert joint_free_weights(10, 20, 10, 20) == 200  # everything free, counted once


def test_pattern_groups_recover_planted_groups():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(300, 12, generator=gen) > 0.5
    patterns = torch.cat(
        [
            base,
            base[:, [0, 0, 3]],  # two copies of neuron 0, one of neuron 3
            torch.zeros(300, 2, dtype=torch.bool),  # dead
            torch.ones(300, 3, dtype=torch.bool),  # always on
        ],
        1,
    )
    groups = pattern_groups(patterns, weights_per_neuron=7)
    assert groups.n_dead == 2
    assert groups.n_always_on == 3
    assert groups.group_sizes == [3, 3, 2]  # {0, 12, 13}, always-on {17, 18, 19}, {3, 14}
    assert groups.free_synchronised == 3 * 2 + 3 * 2 + 2 * 1
    assert groups.free_dead == 2 * 7
    assert sorted(map(sorted, (g.tolist() for g in groups.groups))) == [
        [0, 12, 13],
        [3, 14],
        [17, 18, 19],
    ]


def test_smooth_activations_group_only_switch_like_neurons():
    pre = torch.tensor([[-8.0, -9.0, 0.1], [7.0, 9.0, -0.2], [6.0, 5.0, 2.0]], dtype=torch.float64)
    on, switch = switch_pattern(pre, "gelu", tolerance=0.01)
    assert switch.tolist() == [True, True, False]
    assert on[:, 0].tolist() == on[:, 1].tolist()
    groups = pattern_groups(on, switch)
    assert groups.group_sizes == [2]
    on_relu, switch_relu = switch_pattern(pre, "relu")
    assert bool(switch_relu.all())


# ---------------------------------------------------------------------------------------------
# Planted TransformerLens models
# ---------------------------------------------------------------------------------------------


def _load(model, state: dict[str, torch.Tensor]) -> None:
    """Write HookedTransformer-named weights into a model of either API."""
    from tl_degeneracy.engine.compat import hooked_to_bridge_state_dict, is_bridge

    if is_bridge(model):
        cfg = {k: getattr(model.cfg, k) for k in ("n_layers",)}
        model.load_state_dict(hooked_to_bridge_state_dict(state, cfg), strict=False)
    else:
        model.load_state_dict(state, strict=False)


def test_planted_null_activation_directions(api, tiny, tokens_for):
    """k directions missing from the embeddings are null at resid_pre: exactly k·d_out weights
    of W_Q, W_K and W_V are free."""
    k = 3
    model = tiny(api, "mlp", d_model=12, d_vocab=20)
    sd = hooked_state_dict(model)
    sd["embed.W_E"][:, -k:] = 0
    sd["pos_embed.W_pos"][:, -k:] = 0
    _load(model, sd)
    res = measure_sources(model, tokens_for(model, 256), SourcesConfig(batch_size=128))
    by_name = {m.map.name: m for m in res.maps}
    d_out = model.cfg.n_heads * model.cfg.d_head
    for x in "QKV":
        free = by_name[f"blocks.0.attn.W_{x}"].free(1e-10)
        assert free["k"] == k
        assert free["activations"] == k * d_out
    # the curve is flat over many decades around the cutoff
    curve = by_name["blocks.0.attn.W_Q"].curves([1e-14, 1e-12, 1e-10, 1e-8])["k"]
    assert curve.tolist() == [k] * 4


def _resid_mid(model, tokens) -> torch.Tensor:
    store = {}

    def read(act, hook=None):
        store["x"] = act.detach().reshape(-1, act.shape[-1])

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", read)]):
        model(tokens)
    return store["x"]


def test_planted_synchronised_dead_and_unread_neurons(api, tiny, tokens_for):
    """Groups of ReLU neurons with proportional input weights, dead neurons, always-on neurons
    and neurons whose output is never read are all counted exactly."""
    model = tiny(api, "mlp", d_model=8, d_mlp=24, d_vocab=30)
    tokens = tokens_for(model, 512)
    sd = hooked_state_dict(model)
    groups_planted = ([0, 1, 2], [3, 4])
    dead, always, unread = [5, 6, 7, 8], [9, 10], [11]
    w_in, b_in, w_out = sd["blocks.0.mlp.W_in"], sd["blocks.0.mlp.b_in"], sd["blocks.0.mlp.W_out"]
    x = _resid_mid(model, tokens)
    live = [0, 3, *range(11, 24)]
    b_in[live] = -(x.mean(0) @ w_in[:, live])  # hyperplanes through the data's mean
    for group in groups_planted:  # scaled copies of a leader: the same on/off pattern
        for j, scale in zip(group[1:], (2.0, 0.5)):
            w_in[:, j] = scale * w_in[:, group[0]]
            b_in[j] = scale * b_in[group[0]]
    w_in[:, dead + always] = 0
    b_in[dead] = -1.0
    b_in[always] = 1.0
    w_out[unread] = 0
    _load(model, sd)
    res = measure_sources(model, tokens, SourcesConfig(batch_size=256))
    groups = res.neurons["blocks.0.mlp"]
    assert groups.n_dead == len(dead)
    assert groups.n_always_on == len(always)
    assert groups.group_sizes == [3, 2, 2]
    assert groups.free_synchronised == 6 + 2 + 2
    by_name = {m.map.name: m for m in res.maps}
    # W_in's unread outputs: dead neurons (zero slope) and the neuron whose W_out row is zero
    assert by_name["blocks.0.mlp.W_in"].k_prime(1e-10) == len(dead) + len(unread)
    # W_out's null inputs: dead neurons (constant 0), always-on neurons with zero W_in
    # (constant 1 after ReLU), and |S| − 1 per group of scaled copies (proportional outputs)
    copies = sum(len(g) - 1 for g in groups_planted)
    assert by_name["blocks.0.mlp.W_out"].k(1e-10) == len(dead) + len(always) + copies
    free = res.section_free("blocks.0.mlp")
    assert free["synchronised"] == 10
    assert free["dead"] == len(dead) * (2 * 8 + 1)
    assert free["total"] == free["joint"] + 10 + len(dead)


def test_planted_identical_heads(api, tiny, tokens_for):
    model = tiny(api, "mlp", d_model=8, n_heads=3, d_head=4)
    sd = hooked_state_dict(model)
    for name in ("W_Q", "W_K", "b_Q", "b_K"):
        sd[f"blocks.0.attn.{name}"][1] = sd[f"blocks.0.attn.{name}"][0]
    _load(model, sd)
    res = measure_sources(model, tokens_for(model, 64), SourcesConfig(batch_size=64))
    heads = res.heads["blocks.0.attn"]
    assert heads.groups == [[0, 1]]
    assert heads.free == 2 * 1 * 4**2


def test_bound_and_curves_are_consistent(tiny, tokens_for):
    model = tiny("hooked" if "hooked" in _apis() else "bridge", "mlp")
    res = measure_sources(model, tokens_for(model, 64), SourcesConfig(batch_size=64))
    total = sum(res.section_params.values())
    assert total == sum(p.numel() for p in model.parameters())
    curve = res.bound_curve()
    assert bool((curve[1:] <= curve[:-1]).all())  # more is null as ε grows
    assert 0 <= res.upper_bound() <= total


def test_both_apis_agree(tiny, tokens_for):
    """The same weights as a HookedTransformer and as a TransformerBridge: the same counts."""
    if len(_apis()) < 2:
        pytest.skip("only one TransformerLens API is installed")
    from support import tiny_config

    from tl_degeneracy.engine.compat import build_model

    hooked = tiny("hooked", "mlp", seed=3)
    bridge = build_model(tiny_config("mlp"), hooked_state_dict(hooked), "bridge", torch.float64)
    results = []
    for model in (hooked, bridge):
        res = measure_sources(model, tokens_for(model, 64), SourcesConfig(batch_size=64))
        results.append({m.map.name: m.free(1e-10) for m in res.maps})
        results[-1]["bound"] = res.upper_bound()
        results[-1]["params"] = res.section_params
    assert results[0] == results[1]


def _apis() -> list[str]:
    from tl_degeneracy.engine.compat import available_apis

    return list(available_apis())


LLAMA_LIKE = dict(
    n_layers=2,
    gated_mlp=True,
    act_fn="silu",
    normalization_type="RMS",
    n_key_value_heads=1,
    positional_embedding_type="rotary",
    rotary_dim=4,
)


def test_gated_grouped_query_model_one_section(api, tiny, tokens_for):
    """A Llama-like block (RMSNorm, rotary, grouped-query attention, gated SiLU MLP): the
    maps W_gate, W_in, W_out; K and V as wide as their shared heads; a neuron whose gate is
    zero (SiLU(0) = 0: output 0 on every token) frees its W_in column (unread) and W_out row
    (constant input); only the requested sections are measured."""
    from support import tiny_config

    from tl_degeneracy.engine.compat import build_model

    sd = hooked_state_dict(tiny(api, "ln", **LLAMA_LIKE))
    sd["blocks.1.mlp.W_gate"][:, 5] = 0
    model = build_model(tiny_config("ln", **LLAMA_LIKE), sd, api, torch.float64)
    res = measure_sources(
        model, tokens_for(model, 48), SourcesConfig(batch_size=48), sections=["blocks.1.mlp"]
    )
    assert res.sections == ["blocks.1.mlp"]
    free = {m.map.name: m.free(1e-10) for m in res.maps}
    assert list(free) == ["blocks.1.mlp.W_gate", "blocks.1.mlp.W_in", "blocks.1.mlp.W_out"]
    assert free["blocks.1.mlp.W_in"]["k_prime"] == 1  # the zero-gate neuron's column
    assert free["blocks.1.mlp.W_out"]["k"] == 1  # its output is constant (zero)
    assert free["blocks.1.mlp.W_gate"]["k_prime"] == 0  # SiLU'(0) = 1/2: the gate is read
    assert res.neurons["blocks.1.mlp"].free_synchronised == 0  # not counted for gated MLPs
    attn = measure_sources(
        model, tokens_for(model, 16), SourcesConfig(batch_size=16), sections=["blocks.0.attn"]
    )
    widths = {m.map.name.rsplit(".", 1)[1]: len(m.grad_spectrum) for m in attn.maps}
    assert widths == {"W_Q": 8, "W_K": 4, "W_V": 4, "W_O": 8}  # 2 query heads, 1 K/V head
    with pytest.raises(ValueError, match="unknown sections"):
        measure_sources(model, tokens_for(model, 4), sections=["blocks.9.mlp"])
