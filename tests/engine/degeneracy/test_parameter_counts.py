"""N, the free directions and the bound per section on tiny random checkpoints written by
`transformers`: GPT-2 (fused qkv on the Bridge, tied embeddings, learned positions) and Llama
(rotary, no `W_pos`, RMSNorm, gated MLP, grouped-query attention), on every API.

N counts the parameters of the model as TransformerLens holds them, each tensor once
(`state_dict_parameters`): on a Bridge those of the checkpoint (and the zero `b_U` a
TransformerLens 3 Bridge adds), on a HookedTransformer also the untied `W_U` and the zero biases
its conversion adds. docs/degeneracy.md, "What N counts".
"""

from __future__ import annotations

import pytest
import torch
from support import APIS

from tl_degeneracy.engine.compat import is_bridge
from tl_degeneracy.engine.degeneracy import SourcesConfig, measure_sources, section_filter
from tl_degeneracy.engine.degeneracy.parameters import select_parameters, state_dict_parameters
from tl_degeneracy.engine.degeneracy.spectra import tied_free_weights
from tl_degeneracy.engine.degeneracy.weight_maps import weight_maps
from tl_degeneracy.models.local import load_local
from tl_degeneracy.models.tiny import D_VOCAB, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ("gpt2", "llama")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("counts")
    return {arch: tiny_checkpoint(arch, root / arch, seed=0) for arch in (*ARCHS, "neox")}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, D_VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))


_MODELS: dict = {}


def model_of(folders, arch: str, api: str):
    if (arch, api) not in _MODELS:
        _MODELS[arch, api] = load_local(folders[arch], api=api, dtype=torch.float64)
    return _MODELS[arch, api]


_SOURCES: dict = {}


def sources_of(folders, tokens, arch: str, api: str):
    if (arch, api) not in _SOURCES:
        model = model_of(folders, arch, api)
        _SOURCES[arch, api] = measure_sources(
            model, tokens, SourcesConfig(eps=1e-6, positions="all", batch_size=8)
        )
    return _SOURCES[arch, api]


def hf_parameter_count(folder) -> int:
    """What `transformers` counts: every tensor once (a tied unembedding is the embedding)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder).num_parameters()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("api", APIS)
def test_n_is_the_checkpoint_on_a_bridge_and_what_transformer_lens_holds_otherwise(
    folders, tokens, arch, api
):
    """A Bridge: N is the checkpoint's parameter count (its GPT-2 attention blocks no longer
    count the fused qkv beside q, k and v: 33,024 of 28,800 before on the tester's model);
    TransformerLens 3's Bridge adds a zero `unembed.bias` parameter, which is counted. A
    HookedTransformer: every tensor it holds once (untied W_U, zero biases)."""
    model = model_of(folders, arch, api)
    result = sources_of(folders, tokens, arch, api)
    n = sum(result.section_params.values())
    if is_bridge(model):
        extra = D_VOCAB if "unembed.bias" in state_dict_parameters(model) else 0
        assert n == hf_parameter_count(folders[arch]) + extra
    else:
        assert n == sum(p.numel() for p in model.parameters())
    # every parameter belongs to exactly one section
    named = state_dict_parameters(model)
    chosen = [select_parameters(model, section_filter(s)) for s in result.sections]
    flat = [name for names in chosen for name in names]
    assert sorted(flat) == sorted(named) and len(flat) == len(set(flat))


@pytest.mark.parametrize("api", APIS)
def test_a_bridge_moves_the_weights_its_forward_reads(folders, api):
    """What SGLD moves (`state_dict_parameters`) is what the forward reads: on a Bridge around
    GPT-2 the q, k, v views, not the fused qkv (which shares q's address: bound to a new
    tensor it changed nothing)."""
    model = model_of(folders, "gpt2", api)
    named = state_dict_parameters(model)
    d = model.cfg.d_model
    for name in select_parameters(model, section_filter("blocks.0.attn")):
        assert named[name].numel() <= d * d, name  # the fused qkv holds 3 d²
    x = torch.randint(0, D_VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(x)
        for name in ("blocks.0.attn.W_Q", "blocks.0.attn.q.weight"):
            if name in named:
                p = named[name]
                old = p.data
                p.data = old + 0.5
                changed = (model(x) - base).abs().max()
                p.data = old
                assert changed > 1e-3, name


@pytest.mark.parametrize("arch", ("llama", "neox"))
@pytest.mark.parametrize("api", APIS)
def test_rotary_models_have_no_positional_map(folders, arch, api):
    """A Bridge has a `hook_pos_embed` on rotary models too; there is no `W_pos` to count."""
    maps = weight_maps(model_of(folders, arch, api))
    assert "W_pos" not in [m.name for m in maps]
    assert [m.name for m in maps if m.section == "embed"] == ["W_E"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("api", APIS)
def test_free_is_at_most_n_in_every_section(folders, tokens, arch, api):
    """Before: the Bridge's rotary embed counted a 64 × 32 `W_pos` (free 9,888 of 9,600), its
    tied GPT-2 unembedding 300 free directions in a section of 64 parameters."""
    result = sources_of(folders, tokens, arch, api)
    for s in result.sections:
        free = result.section_free(s)
        assert free["joint"] + free["synchronised"] <= result.section_params[s], s
        assert result.upper_bound(s) > 0, s


@pytest.mark.parametrize("api", APIS)
def test_a_tied_unembedding_is_counted_once_with_the_embedding(folders, tokens, api):
    """On a Bridge around GPT-2 (tied): the matrix is `embed.weight`, in the embed section;
    `unembed` is the final LayerNorm (and TransformerLens 3's zero b_U); the matrix's free
    weights are those free for both uses, here (every logit read) u·k_U."""
    model = model_of(folders, "gpt2", api)
    result = sources_of(folders, tokens, "gpt2", api)
    maps = {m.map.name: m for m in result.maps}
    if not is_bridge(model):  # HookedTransformer unties W_U: two maps, two matrices
        assert maps["W_U"].map.tied_to is None and maps["W_U"].map.counted
        assert result.section_params["unembed"] == D_VOCAB * model.cfg.d_model + D_VOCAB + 32
        return
    assert maps["W_E"].map.tied_to == "W_U" and not maps["W_U"].map.counted
    b_u = D_VOCAB if "unembed.bias" in state_dict_parameters(model) else 0
    assert result.section_params["unembed"] == 2 * model.cfg.d_model + b_u
    assert result.section_free("unembed")["joint"] == 0
    eps = result.config.eps
    u, k_u = maps["W_E"].k(eps), maps["W_U"].k(eps)
    assert u > 0 and k_u > 0  # unseen tokens; LayerNorm's output is centred
    e_free = maps["W_E"].free(eps)["joint"]
    pos_free = maps["W_pos"].free(eps)["joint"]
    assert result.section_free("embed")["joint"] == u * k_u + pos_free < e_free + pos_free


def test_tied_free_weights():
    # every logit read: the unseen rows, each in the k_U null input directions
    assert tied_free_weights((5, 0), (2, 0), 50, 8) == 10
    # the embedding alone frees nothing: nothing is free for both uses
    assert tied_free_weights((0, 0), (3, 0), 50, 8) == 0
    # the unembedding reads every direction: nothing is free for both uses
    assert tied_free_weights((5, 0), (0, 0), 50, 8) == 0
    # one use frees everything: what the other frees
    assert tied_free_weights((50, 0), (2, 0), 50, 8) == 100


@pytest.mark.skipif(len(APIS) < 2, reason="needs HookedTransformer and the Bridge")
@pytest.mark.parametrize("arch", ARCHS)
def test_the_same_bound_on_both_apis(folders, tokens, arch):
    """Where both APIs hold the same weights the bound is the same; where a HookedTransformer
    holds more (zero biases, an untied W_U), it differs by exactly those parameters. Before:
    GPT-2's attention 6,272 on the Bridge against 4,160; Llama's embedding 0 against 1,760."""
    hooked, bridge = (sources_of(folders, tokens, arch, a) for a in ("hooked", "bridge"))
    assert hooked.sections == bridge.sections
    for s in hooked.sections:
        if arch == "gpt2" and s in ("embed", "unembed"):
            continue  # tied on the Bridge, untied by the HookedTransformer conversion
        extra = hooked.section_params[s] - bridge.section_params[s]
        if arch == "gpt2":
            assert extra == 0, s
        assert hooked.upper_bound(s) - bridge.upper_bound(s) == extra, s
    assert hooked.upper_bound("embed") == bridge.upper_bound("embed") or arch == "gpt2"
