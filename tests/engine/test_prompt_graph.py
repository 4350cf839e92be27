"""Prompt graphs on small float64 models: node attributions add up to gradient × activation,
edges equal brute-force Jacobians (and, in a deep linear network, products of weights),
influence equals a sum over enumerated paths, pruning keeps the shares it promises, and a
graph saves and loads."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from support import random_tokens, tiny_model

from tl_degeneracy.engine.artifacts import ArtifactError
from tl_degeneracy.engine.attribution import site_gradients
from tl_degeneracy.engine.bases import Truncation
from tl_degeneracy.engine.compat import has_hooked_transformer, hooked_state_dict
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.prompt_graph import (
    PromptGraph,
    Target,
    node_attributions,
    prompt_graph,
    site_chain,
)
from tl_degeneracy.engine.prompt_graph.edges import FEATURE, REST, TARGET, CandidateGraph
from tl_degeneracy.engine.prompt_graph.prune import (
    influence,
    prune_edges,
    prune_nodes,
    smallest_share,
)
from tl_degeneracy.engine.sections import Section, run_section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.models.rmsnorm import round_rmsnorm_like_hugging_face

TARGET_PAIR = (3, 4)


def _sites(n_layers: int, positions="all") -> tuple[Site, ...]:
    hooks = [f"blocks.{b}.hook_resid_{s}" for b in range(n_layers) for s in ("pre", "mid")]
    hooks.append(f"blocks.{n_layers - 1}.hook_resid_post")
    return (*(Site(h, positions) for h in hooks), Site("logits", "last"))


@functools.cache
def fitted(api: str, kind: str, truncate: bool = True):
    """A 2-layer float64 model, LIB fitted at every residual cut; with `truncate`, directions
    below 5% of the largest are dropped, so that rest nodes hold a real part."""
    model = tiny_model(api, kind, n_layers=2)
    trunc = Truncation(1e-15, 0.05) if truncate else Truncation()
    result = fit_basis(
        model, random_tokens(model, 100), LIBConfig(_sites(2), truncation=trunc, progress=False)
    )
    return model, result


def full_graph(model, result, tokens, **kw):
    """Every feature a candidate, so that every edge is computed."""
    return prompt_graph(
        model, result, tokens, Target.logit_difference(*TARGET_PAIR),
        candidate_share=1.0, max_candidates=10**6, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["mlp", "ln"])
def test_node_attributions_add_up_to_gradient_times_activation(api, kind):
    model, result = fitted(api, kind)
    assert any(b.k < b.d for b in result.bases.values() if b.kind == "lib"), "needs truncation"
    tokens = random_tokens(model, 1, seed=7)
    target = Target.logit_difference(*TARGET_PAIR)
    attrs = check_nodes_add_up(model, result, tokens, target)
    for rest in attrs.rest:
        assert rest.abs().max() > 1e-3  # the rest node is not trivially zero


def check_nodes_add_up(model, result, tokens, target):
    """Node attributions (features + rest) at every site equal gradient × activation there,
    `g_s · f_s`, computed on the independent path of engine.attribution (zero leaves at every
    site, one backward); returns the attributions."""
    chain = site_chain(model, result)
    attrs = node_attributions(model, chain, tokens, target, freeze_final_norm=False)
    acts, grads, value = site_gradients(
        model, [c.site for c in chain], tokens, lambda logits, t: target(logits)
    )
    assert attrs.value == pytest.approx(value, abs=1e-12)
    for layer, c in enumerate(chain):
        identity = (acts[c.site.name][0] * grads[c.site.name][0]).sum(-1)  # g_s · f_s
        nodes = attrs.attributions[layer].sum(-1) + attrs.rest[layer]
        assert torch.allclose(nodes, identity, rtol=0, atol=1e-10), c.name
    return attrs


def test_frozen_final_norm_makes_the_last_site_add_up_to_the_target(api):
    """With the final LayerNorm's scale frozen the logits are affine in the last residual
    stream: features + rest nodes there add up to the target minus the bias terms."""
    model, result = fitted(api, "ln")
    tokens = random_tokens(model, 1, seed=8)
    target = Target.logit_difference(*TARGET_PAIR)
    chain = site_chain(model, result)
    attrs = node_attributions(model, chain, tokens, target, freeze_final_norm=True)
    sd = hooked_state_dict(model)
    bias = sd["ln_final.b"] @ sd["unembed.W_U"] + sd["unembed.b_U"]
    offset = float(bias[TARGET_PAIR[0]] - bias[TARGET_PAIR[1]])
    last = attrs.attributions[-1].sum() + attrs.rest[-1].sum()
    assert float(last) == pytest.approx(attrs.value - offset, abs=1e-10)


@pytest.mark.skipif(not has_hooked_transformer(), reason="HookedTransformer needs TL < 4")
def test_frozen_final_rmsnorm_adds_up_with_hugging_face_rounding():
    """The same on a Llama-shaped `HookedTransformer` as `load_local` gives it: RMSNorm switched
    to Hugging Face's rounding, whose scale a detaching hook must still freeze."""
    model = tiny_model("hooked", "ln", n_layers=2, normalization_type="RMS")
    assert round_rmsnorm_like_hugging_face(model) == 5
    trunc = Truncation(1e-15, 0.05)
    tokens = random_tokens(model, 100)
    result = fit_basis(model, tokens, LIBConfig(_sites(2), truncation=trunc, progress=False))
    prompt = random_tokens(model, 1, seed=8)
    target = Target.logit_difference(*TARGET_PAIR)
    chain = site_chain(model, result)
    bias = hooked_state_dict(model)["unembed.b_U"]
    offset = float(bias[TARGET_PAIR[0]] - bias[TARGET_PAIR[1]])
    frozen = node_attributions(model, chain, prompt, target, freeze_final_norm=True)
    last = frozen.attributions[-1].sum() + frozen.rest[-1].sum()
    assert float(last) == pytest.approx(frozen.value - offset, abs=1e-10)
    free = node_attributions(model, chain, prompt, target, freeze_final_norm=False)
    free_last = free.attributions[-1].sum() + free.rest[-1].sum()
    assert abs(float(free_last) - (free.value - offset)) > 1e-3  # the freeze is what adds up


def _brute_force_section(model, tokens, inp: Site, out: Site):
    """The Jacobian of site `out` (all positions) by site `inp` (all positions) through
    `engine.sections.run_section`: [P_out, d_out, P_in, d_in]."""
    (x0,) = [None]

    def f(x):
        return run_section(model, tokens, Section(inp, out), lambda a: x[None].to(a.dtype))[0]

    with torch.no_grad():
        from tl_degeneracy.engine.statistics import capture_sites

        (x0,) = capture_sites(model, tokens, [inp])
    return torch.autograd.functional.jacobian(f, x0[0].to(torch.float64)), x0[0]


@pytest.mark.parametrize("kind", ["mlp", "ln"])
def test_edges_equal_brute_force_jacobians(api, kind):
    model, result = fitted(api, kind)
    tokens = random_tokens(model, 1, seed=9)
    graph = full_graph(model, result, tokens)
    c = graph.candidates
    chain = site_chain(model, result)
    n_checked = 0
    for layer in range(1, len(chain)):
        b_in, b_out = chain[layer - 1].basis, chain[layer].basis
        jac, x = _brute_force_section(model, tokens, chain[layer - 1].site, chain[layer].site)
        feats = b_in.features(x)  # [P, k_in]
        rest = x - feats @ b_in.C_pinv
        # ∂f̂_out[t, i] / ∂x[s, :] = C_outᵀ J
        d_out = torch.einsum("tesd,ei->tisd", jac, b_out.C)
        expected_feat = torch.einsum("tisd,jd,sj->tisj", d_out, b_in.C_pinv, feats)
        expected_rest = torch.einsum("tisd,sd->tis", d_out, rest)
        into = torch.nonzero((c.layer[c.dst] == layer) & (c.kind[c.dst] == FEATURE))[:, 0]
        for e in into.tolist():
            src, dst = int(c.src[e]), int(c.dst[e])
            t, i = int(c.position[dst]), int(c.feature[dst])
            s, j = int(c.position[src]), int(c.feature[src])
            want = expected_rest[t, i, s] if c.kind[src] == REST else expected_feat[t, i, s, j]
            assert float(c.weight[e]) == pytest.approx(float(want), abs=1e-10)
            n_checked += 1
        # every row's total |input| is over all input nodes
        rows = torch.nonzero((c.layer == layer) & (c.kind == FEATURE))[:, 0]
        for r in rows.tolist():
            t, i = int(c.position[r]), int(c.feature[r])
            total = expected_feat[t, i].abs().sum() + expected_rest[t, i].abs().sum()
            assert float(c.input_abs[r]) == pytest.approx(float(total), rel=1e-10, abs=1e-12)
    assert n_checked > 100


@functools.cache
def linear_setting(api: str):
    """The deep linear network: attention only, one position, no normalisation."""
    model = tiny_model(api, "linear")
    sites = (
        *(Site(f"blocks.{b}.hook_resid_pre") for b in range(3)),
        Site("blocks.2.hook_resid_post"),
    )
    result = fit_basis(
        model, random_tokens(model, 400), LIBConfig((*sites, Site("logits")), progress=False)
    )
    return model, result


def test_linear_network_edges_are_products_of_weights(api):
    model, result = linear_setting(api)
    tokens = random_tokens(model, 1, seed=3)
    graph = full_graph(model, result, tokens)
    c = graph.candidates
    sd = {k: v.to(torch.float64) for k, v in hooked_state_dict(model).items()}
    chain = site_chain(model, result)
    x = sd["embed.W_E"][tokens[0, 0]] + sd["pos_embed.W_pos"][0]
    acts = [x]
    for b in range(3):  # x ← x + Σ_h (x W_V^h + b_V^h) W_O^h + b_O (the pattern is 1)
        ov = torch.einsum("hde,hem->dm", sd[f"blocks.{b}.attn.W_V"], sd[f"blocks.{b}.attn.W_O"])
        acts.append(acts[-1] @ (torch.eye(ov.shape[0], dtype=ov.dtype) + ov))
        bias = torch.einsum("he,hem->m", sd[f"blocks.{b}.attn.b_V"], sd[f"blocks.{b}.attn.W_O"])
        acts[-1] = acts[-1] + bias + sd[f"blocks.{b}.attn.b_O"]
    weights = []
    for b in range(3):
        ov = torch.einsum("hde,hem->dm", sd[f"blocks.{b}.attn.W_V"], sd[f"blocks.{b}.attn.W_O"])
        weights.append(torch.eye(ov.shape[0], dtype=ov.dtype) + ov)
    checked = 0
    for e in range(c.src.numel()):
        src, dst = int(c.src[e]), int(c.dst[e])
        ls, ld = int(c.layer[src]), int(c.layer[dst])
        if c.kind[dst] == TARGET:
            w_u = sd["unembed.W_U"]
            read = w_u[:, TARGET_PAIR[0]] - w_u[:, TARGET_PAIR[1]]
            b_in = chain[ls].basis
            if c.kind[src] == FEATURE:
                j = int(c.feature[src])
                want = b_in.features(acts[ls])[j] * (b_in.C_pinv[j] @ read)
            else:
                want = (acts[ls] - b_in.features(acts[ls]) @ b_in.C_pinv) @ read
        elif c.kind[src] == FEATURE or c.kind[src] == REST:
            b_in, b_out = chain[ls].basis, chain[ld].basis
            i = int(c.feature[dst])
            if c.kind[src] == FEATURE:
                j = int(c.feature[src])
                product = b_in.C_pinv[j] @ weights[ls] @ b_out.C[:, i]  # C⁺ W C, analytically
                want = b_in.features(acts[ls])[j] * product
            else:
                rest = acts[ls] - b_in.features(acts[ls]) @ b_in.C_pinv
                want = rest @ weights[ls] @ b_out.C[:, i]
        else:  # the embedding into the first site: the identity
            want = acts[0] @ chain[0].basis.C[:, int(c.feature[dst])]
        assert float(c.weight[e]) == pytest.approx(float(want), abs=1e-10), (ls, ld)
        checked += 1
    assert checked > 100
    assert graph.value == pytest.approx(
        float(
            (acts[-1] @ sd["unembed.W_U"] + sd["unembed.b_U"])[list(TARGET_PAIR)]
            @ torch.tensor([1.0, -1.0], dtype=torch.float64)
        ),
        abs=1e-10,
    )


def _random_layered_graph(seed: int = 0) -> CandidateGraph:
    """Embeddings (2) → two sites of 3 features + 1 rest node each → target, random edges."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.tensor([-1, -1, 0, 0, 0, 0, 1, 1, 1, 1, 2])
    kind = torch.tensor([0, 0, 1, 1, 1, 2, 1, 1, 1, 2, 3])
    pos = torch.zeros_like(layer)
    feat = torch.tensor([-1, -1, 0, 1, 2, -1, 0, 1, 2, -1, -1])
    src, dst = [], []
    for s, d in itertools.product(range(11), range(11)):
        ok = layer[d] == layer[s] + 1 and kind[d] in (1, 3) and torch.rand(1, generator=gen) < 0.8
        if ok:
            src.append(s)
            dst.append(d)
    w = torch.randn(len(src), generator=gen, dtype=torch.float64)
    src_t, dst_t = torch.tensor(src), torch.tensor(dst)
    input_abs = torch.zeros(11, dtype=torch.float64).index_add_(0, dst_t, w.abs())
    input_abs = input_abs * 1.25  # inputs from nodes that are not candidates: not normalised by
    z = torch.zeros(11, dtype=torch.float64)
    return CandidateGraph(layer, pos, feat, kind, z, z, src_t, dst_t, w, input_abs)


def test_influence_is_the_sum_over_enumerated_paths():
    g = _random_layered_graph()
    into = {int(d): float(g.weight[g.dst == d].abs().sum()) for d in g.dst.unique()}
    norm = {(int(s), int(d)): abs(float(w)) / into[int(d)] for s, d, w in
            zip(g.src, g.dst, g.weight)}  # fmt: skip
    out: dict[int, list[int]] = {}
    for s, d in norm:
        out.setdefault(s, []).append(d)

    def paths(node: int) -> float:  # Σ over paths node → target of Π Â
        if g.kind[node] == TARGET:
            return 1.0
        return sum(norm[(node, d)] * paths(d) for d in out.get(node, []))

    u = influence(g)
    for n in range(10):
        assert float(u[n]) == pytest.approx(paths(n), rel=1e-12, abs=1e-15)
    assert float(u[10]) == 0.0


def test_a_whole_share_keeps_every_nonzero_entry_and_no_zero_one():
    """`share=1` keeps the nonzero entries, never the zeros, also where a separate sum of the
    magnitudes rounds above their running sum (it did here, and every zero was kept: a GPU and
    a CPU then kept different candidate nodes)."""
    values = torch.cat(
        [torch.rand(20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]
        + [torch.zeros(3, dtype=torch.float64)]
    )
    order = torch.argsort(values, descending=True, stable=True)
    assert float(values.sum()) > float(values[order].cumsum(0)[-1])  # the rounding case
    for v in (values, -values, values.flip(0)):
        kept = smallest_share(v, 1.0)
        assert sorted(kept.tolist()) == torch.nonzero(v)[:, 0].tolist()
    assert smallest_share(torch.zeros(4), 1.0).numel() == 0


def test_pruning_keeps_the_promised_shares():
    g = _random_layered_graph(1)
    u = influence(g)
    for share in (0.3, 0.6, 0.9):
        keep = prune_nodes(g, u, share)
        kept = keep & (g.kind != TARGET)
        assert u[kept].sum() >= share * u.sum() - 1e-12
        smallest = u[kept].min()  # dropping it would fall below the share
        assert u[kept].sum() - smallest < share * u.sum()
        edges = prune_edges(g, keep, 0.7)
        for node in torch.nonzero(keep)[:, 0].tolist():
            into = (g.dst == node) & keep[g.src]
            if not into.any():
                continue
            kept_w = g.weight[edges & (g.dst == node)].abs()
            possible = g.weight[into].abs().sum()
            graph_in = float(g.weight[g.dst == node].abs().sum())
            assert float(kept_w.sum()) >= min(0.7 * graph_in, float(possible)) - 1e-12
            if kept_w.numel() > 1:  # minimal: without its lightest edge it would be short
                assert float(kept_w.sum() - kept_w.min()) < 0.7 * graph_in


def test_save_and_load(api, tmp_path):
    model, result = fitted(api, "mlp")
    tokens = random_tokens(model, 1, seed=4)
    graph = prompt_graph(model, result, tokens, Target.logit(5), positions=(1, 2, 3))
    folder = graph.save(tmp_path / "g")
    back = PromptGraph.load(folder)
    assert back.sites == graph.sites and back.str_tokens == graph.str_tokens
    assert back.config == graph.config and back.target == graph.target
    for a, b in zip(back.attributions, graph.attributions):
        assert torch.equal(a, b)
    assert torch.equal(back.candidates.weight, graph.candidates.weight)
    assert torch.equal(back.kept_edges, graph.kept_edges)
    assert back.completeness() == graph.completeness()
    (folder / "tensors.safetensors").write_bytes(b"broken")
    with pytest.raises(ArtifactError, match="checksum"):
        PromptGraph.load(folder)


def test_positions_and_bad_input(api):
    model, result = fitted(api, "mlp")
    tokens = random_tokens(model, 2, seed=4)
    with pytest.raises(ValueError, match=r"\[1, pos\]"):
        prompt_graph(model, result, tokens, Target.logit(5))
    graph = prompt_graph(model, result, tokens[:1], Target.logit(5), positions=(2, 3))
    assert set(graph.candidates.position[graph.candidates.kind == FEATURE].tolist()) <= {2, 3}
    with pytest.raises(ValueError, match="node_share is a share"):
        prompt_graph(model, result, tokens[:1], Target.logit(5), node_share=1.5)
    with pytest.raises(TypeError, match="cannot make a target"):
        prompt_graph(model, result, tokens[:1], "logit 5")
    with pytest.raises(TypeError, match="pair of token ids"):
        prompt_graph(model, result, tokens[:1], (3, "4"))
    with pytest.raises(ValueError, match="one value per sequence"):
        prompt_graph(model, result, tokens[:1], Target.from_metric(lambda logits: logits.sum()))


def test_targets_from_tensors_and_numpy_integers():
    """A token id from `logits.argmax()` (a 0-d tensor) or NumPy (np.int64) is a token id; both
    used to be refused ("cannot make a target of tensor(1)")."""
    import numpy as np

    from tl_degeneracy.engine.prompt_graph.target import as_target

    assert as_target(torch.tensor(5)).spec == Target.logit(5).spec
    assert as_target(np.int64(5)).spec == Target.logit(5).spec
    pair = Target.logit_difference(3, 4).spec
    assert as_target((torch.tensor(3), np.int32(4))).spec == pair
    assert as_target([3, 4]).spec == pair
    for bad in (torch.tensor(5.0), torch.tensor([5]), torch.tensor(True), 5.0):
        with pytest.raises(TypeError, match="cannot make a target"):
            as_target(bad)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_rotary_models_on_the_bridge(arch):
    """A Bridge lists `hook_pos_embed` on a rotary model but runs nothing through it: the
    graph's embedding nodes are the token embeddings alone, node attributions add up to
    gradient × activation, and the graph builds (Llama: in the HookedTransformer table; Gemma
    2: on the Bridge only)."""
    from tl_degeneracy.engine.compat import hook_names
    from tl_degeneracy.engine.prompt_graph.nodes import embedding_sites
    from tl_degeneracy.engine.sites import residual_sites
    from tl_degeneracy.models.tiny import tiny_model as checkpoint_model

    model = checkpoint_model(arch, "bridge")
    assert "hook_pos_embed" in hook_names(model)
    assert [s.hook for s in embedding_sites(model)] == ["hook_embed"]
    tokens = torch.randint(3, 50, (24, 8), generator=torch.Generator().manual_seed(0))
    sites = (*residual_sites(model), Site("logits", "last"))
    trunc = Truncation(1e-15, 0.05)
    result = fit_basis(model, tokens, LIBConfig(sites, truncation=trunc, progress=False))
    prompt = tokens[:1]
    check_nodes_add_up(model, result, prompt, Target.logit_difference(*TARGET_PAIR))
    graph = full_graph(model, result, prompt)
    assert graph.kept_nodes.any() and "tld-pg" in graph._repr_html_()


def test_the_patching_scatter_labels_a_few_points_with_short_names(drawn_figures):
    """As the attribution comparison does: at most 12 labels, `0 pre@2:7` rather than
    `blocks.0.hook_resid_pre@2:7`, so 25 nodes do not pile their names into one block."""
    from tl_degeneracy.engine.prompt_graph.compare import PatchingComparison

    seen = drawn_figures

    def node(i: int) -> dict:
        site = f"blocks.{i % 2}.hook_resid_{'pre' if i % 3 else 'mid'}"
        value = 0.1 * i
        return {"site": site, "position": i % 7, "feature": i, "attribution patching": value,
                "graph attribution": value, "patching": value + 0.01 * (-1) ** i}  # fmt: skip

    PatchingComparison([], [node(i) for i in range(25)], 1.0, 0.5)._repr_html_()
    labels = [t.get_text() for t in seen[-1].axes[0].texts]
    assert len(labels) == 12 and not [t for t in labels if "blocks." in t or "hook_" in t]
    assert "0 mid@3:24" in labels  # farthest out: blocks.0.hook_resid_mid, position 3, feature 24
