import numpy as np
import pytest
import torch

from tl_degeneracy.engine.capture import capture_sites
from tl_degeneracy.engine.sites import (
    Site,
    SiteError,
    as_site,
    carry_hook,
    residual_sites,
    site_key,
    site_parts,
    validate_sites,
)
from tl_degeneracy.engine.synchronisation import HostTransfers


def test_short_forms_and_positions(api, tiny):
    model = tiny(api)
    sites = validate_sites(
        model,
        [
            ("resid_pre", 0),
            (("resid_mid", 0), "last"),
            ("blocks.0.hook_resid_post", [0, -1]),
            "logits",
        ],
    )
    assert [s.hook for s in sites] == [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_mid",
        "blocks.0.hook_resid_post",
        "logits",
    ]
    assert sites[1].positions == "last" and sites[2].positions == (0, -1)
    assert sites[2].index(4).tolist() == [0, 3]
    assert sites[1].name == "blocks.0.hook_resid_mid[-1]"
    assert Site.from_json(sites[2].to_json()) == sites[2]


def test_unknown_hook_names_nearest(api, tiny):
    with pytest.raises(SiteError, match="nearest valid names.*blocks.0.hook_resid_mid"):
        validate_sites(tiny(api), ["blocks.0.hook_resid_mdi", "logits"])


def test_non_cut_site_is_explained(api, tiny):
    with pytest.raises(SiteError, match="not a cut.*mlp.hook_post"):
        validate_sites(tiny(api), ["blocks.0.hook_mlp_out", "logits"])


def test_composite_sites_and_their_parts(api, tiny):
    model = tiny(api, n_layers=2)
    sites = validate_sites(
        model, [("resid_pre", 0), ("z", 0), ("resid_mid", 0), ("mlp_post", 0), ("resid_pre", 1)]
    )
    assert [s.hook for s in sites][1:4] == [
        "blocks.0.attn.hook_z",
        "blocks.0.hook_resid_mid",
        "blocks.0.mlp.hook_post",
    ]
    assert site_parts(model, sites[1]) == ("blocks.0.attn.hook_z", "blocks.0.hook_resid_pre")
    assert site_parts(model, sites[3]) == ("blocks.0.mlp.hook_post", "blocks.0.hook_resid_mid")
    assert carry_hook(model, sites[1]) == "blocks.0.hook_resid_mid"
    assert carry_hook(model, sites[3]) == "blocks.0.hook_resid_post"
    (act,) = capture_sites(model, torch.zeros(2, 4, dtype=torch.long), [sites[3]])
    assert act.shape == (2, 4, model.cfg.d_mlp + model.cfg.d_model)
    with pytest.raises(SiteError, match="forward order"):
        validate_sites(model, [("mlp_post", 0), ("resid_mid", 0)])


def test_sites_of_a_deeper_model_name_the_layer_count(api, tiny):
    with pytest.raises(SiteError, match="has 1 layers"):
        validate_sites(tiny(api), ["blocks.3.hook_resid_pre", "logits"])


def test_slice_positions():
    site = Site("blocks.0.hook_resid_pre", "1:")
    assert site.name == "blocks.0.hook_resid_pre[1:]"
    assert site.index(4).tolist() == [1, 2, 3]
    assert Site.from_json(site.to_json()) == site
    with pytest.raises(SiteError, match="no positions"):
        site.index(1)


def test_order_and_logits_last(api, tiny):
    model = tiny(api)
    with pytest.raises(SiteError, match="forward order"):
        validate_sites(model, ["blocks.0.hook_resid_post", "blocks.0.hook_resid_pre"])
    with pytest.raises(SiteError, match="no sites"):
        validate_sites(model, [])


def test_bad_positions():
    with pytest.raises(SiteError):
        Site("blocks.0.hook_resid_pre", "first")
    with pytest.raises(SiteError, match="out of range"):
        as_site(("blocks.0.hook_resid_pre", [5])).index(3)
    assert torch.equal(Site("x", "all").index(3), torch.arange(3))


def test_listed_positions_are_some_and_each_once():
    """An empty list selects nothing and a repeated position would be weighted several times
    in every statistic: both are refused when the site is made, naming the positions; two
    indices that meet in a sequence (1 and -3 of 4) are refused when they do."""
    with pytest.raises(SiteError, match=r"blocks.0.hook_resid_pre: no positions selected"):
        Site("blocks.0.hook_resid_pre", [])
    with pytest.raises(SiteError, match=r"positions \[1, 1, 1, 2\] repeat \[1\]"):
        Site("blocks.0.hook_resid_pre", [1, 1, 1, 2])
    with pytest.raises(SiteError, match="whole numbers"):
        Site("blocks.0.hook_resid_pre", [1.5])
    site = Site("blocks.0.hook_resid_pre", (1, -3))
    assert site.window(5) == (1, 2)
    with pytest.raises(SiteError, match=r"select position\(s\) \[1\] more than once.* of 4"):
        site.window(4)
    assert Site("x", [np.int64(2), torch.tensor(0)]).positions == (2, 0)


@pytest.mark.parametrize("layer", [np.int64(1), torch.tensor(1)], ids=["numpy", "tensor"])
def test_short_forms_read_integer_layers_of_numpy_and_torch(layer):
    """Layers taken from `np.arange` or a tensor are layers, not positions."""
    assert as_site(("resid_mid", layer)) == Site("blocks.1.hook_resid_mid")
    assert as_site((("resid_mid", layer), "last")) == Site("blocks.1.hook_resid_mid", "last")
    with pytest.raises(SiteError, match=r"short site names are \(kind, layer\)"):
        as_site(("resid_mid", 1.0))


def test_site_key_reads_every_form_and_names_the_known_sites():
    known = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid[1:]", "logits[-1]"]
    assert site_key("logits[-1]", known) == "logits[-1]"
    assert site_key(("resid_pre", 1), known) == "blocks.1.hook_resid_pre"
    assert site_key(Site("logits", "last"), known) == "logits[-1]"
    assert site_key((("resid_mid", 1), "1:"), known) == "blocks.1.hook_resid_mid[1:]"
    with pytest.raises(KeyError, match=r"no basis at site 'blocks.1.hook_resid_post'; sites: \["):
        site_key(("resid_post", 1), known)
    with pytest.raises(KeyError, match=r"\['blocks.1.hook_resid_mid\[1:\]'\] is at the same hook"):
        site_key(("resid_mid", 1), known, "comparison")


def test_select_all_is_the_activation_itself_and_others_index():
    act = torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(2, 4, 3)
    assert Site("blocks.0.hook_resid_pre").select(act) is act  # no copy (read-only)
    assert torch.equal(Site("blocks.0.hook_resid_pre", "last").select(act), act[:, 3:])
    assert torch.equal(Site("blocks.0.hook_resid_pre", [0, -1]).select(act), act[:, [0, 3]])


@pytest.mark.parametrize(
    "positions, expected",
    [("last", [3]), ("1:", [1, 2, 3]), ("1:3", [1, 2]), ("-2:", [2, 3]), ((0, -1), [0, 3])],
)
def test_select_reads_nothing_from_the_device(positions, expected):
    """Selecting positions never waits on the device (on a GPU, a sync per site and batch):
    consecutive positions are a view, listed ones index with a tensor made once per device."""
    act = torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(2, 4, 3)
    site = Site("blocks.0.hook_resid_pre", positions)
    site.select(act)  # a listed selection makes its index tensor here
    with HostTransfers() as seen:
        got = site.select(act)
        index = site.index(4, act.device)
    assert seen.calls == []
    assert torch.equal(got, act[:, expected]) and index.tolist() == expected
    assert site.n_positions(4) == len(expected)
    shares = got.untyped_storage().data_ptr() == act.untyped_storage().data_ptr()
    assert shares == isinstance(positions, str)  # a view, no copy


def test_residual_sites_with_mlp_sites_of_blocks_that_have_them(api, tiny):
    """MLP sites come after each asked block's `hook_resid_mid`; a block outside the sites'
    span, or without an MLP, is refused by name rather than left out."""
    from tl_degeneracy.engine.sites import residual_sites

    model = tiny(api, n_layers=2)
    hooks = [s.hook for s in residual_sites(model, mlp=(1,))]
    assert hooks[hooks.index("blocks.1.hook_resid_mid") + 1] == "blocks.1.mlp.hook_post"
    assert sum(".mlp." in h for h in hooks) == 1
    with pytest.raises(SiteError, match=r"block\(s\) \[7\].*2 blocks \(0 … 1\)"):
        residual_sites(model, mlp=(7,))
    with pytest.raises(SiteError, match=r"block\(s\) \[1\].*the first 1 of its 2 blocks"):
        residual_sites(model, n_blocks=1, mlp=(1,))
    with pytest.raises(SiteError, match=r"block\(s\) \[0\] have no MLP"):
        residual_sites(tiny(api, "linear"), mlp=(0,))


def test_residual_sites_with_attention_sites(api, tiny):
    """Attention sites come after each asked block's `hook_resid_pre`, before its MLP site;
    the list validates and every site fits."""
    from tl_degeneracy.engine.sites import residual_sites

    model = tiny(api, n_layers=2)
    sites = residual_sites(model, mlp=(0, 1), attn=(1,))
    hooks = [s.hook for s in sites]
    assert hooks[hooks.index("blocks.1.hook_resid_pre") + 1 :][:3] == [
        "blocks.1.attn.hook_z",
        "blocks.1.hook_resid_mid",
        "blocks.1.mlp.hook_post",
    ]
    assert validate_sites(model, sites) == sites
    with pytest.raises(SiteError, match=r"attention sites asked for block\(s\) \[2\]"):
        residual_sites(model, attn=(2,))


@pytest.mark.parametrize("api_name", ["hooked", "bridge"])
def test_parallel_blocks_refuse_an_attention_site_before_their_mlp_site(api_name):
    """In a parallel block (GPT-NeoX) the MLP site carries `hook_resid_pre`, so an attention
    site of the same block reaches nothing through it: refused by name, where the Bridge used
    to fail inside autograd and the HookedTransformer gave every head feature Λ = 0."""
    from tl_degeneracy.engine.compat import available_apis
    from tl_degeneracy.engine.sites import residual_sites
    from tl_degeneracy.models.tiny import tiny_model

    if api_name not in available_apis():
        pytest.skip(f"{api_name} needs TransformerLens < 4")
    model = tiny_model("neox", api_name)
    both = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"]
    with pytest.raises(SiteError, match="parallel.*Use the attention site or the MLP site"):
        validate_sites(model, [*both, "blocks.1.hook_resid_post"])
    with pytest.raises(SiteError, match="of block 1, not both"):
        residual_sites(model, mlp=(1,), attn=(1,))
    hooks = [s.hook for s in residual_sites(model, mlp=(0,), attn=(1,))]
    assert validate_sites(model, hooks)


def test_residual_sites_refuse_no_blocks_and_blocks_that_are_not_a_sequence(api, tiny):
    """`n_blocks=0` used to list `blocks.-1.hook_resid_post`; one block for `mlp` or `attn` is
    `(1,)`: a bare number is refused for both with the form to use (NumPy arrays are read)."""
    model = tiny(api, n_layers=2)
    with pytest.raises(SiteError, match=r"n_blocks must be a whole number of at least 1 .*, got 0"):
        residual_sites(model, n_blocks=0)
    for name in ("mlp", "attn"):
        with pytest.raises(
            SiteError, match=rf"{name} must be a sequence of block indices, e.g. {name}=\(1,\)"
        ):
            residual_sites(model, **{name: 1})
    hooks = [s.hook for s in residual_sites(model, n_blocks=np.int64(1), mlp=np.arange(1))]
    assert hooks == [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_mid",
        "blocks.0.mlp.hook_post",
        "blocks.0.hook_resid_post",
    ]
