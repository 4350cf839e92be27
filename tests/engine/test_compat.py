import pytest
import torch

from tl_degeneracy.engine.compat import (
    as_dtype,
    available_apis,
    rebuild,
    replace_hooks,
    run_with_hooks,
    temporary_hooks,
)
from tl_degeneracy.engine.identity import model_identity


@pytest.mark.skipif(len(available_apis()) < 2, reason="HookedTransformer needs TransformerLens < 4")
@pytest.mark.parametrize("kind", ["mlp", "ln"])
def test_same_weights_same_logits_on_both_apis(tiny, tokens_for, kind):
    hooked = tiny("hooked", kind)
    bridge = rebuild(hooked, "bridge")
    toks = tokens_for(hooked, 8)
    with torch.no_grad():
        assert torch.allclose(hooked(toks), bridge(toks), atol=1e-12)
    assert model_identity(hooked)["weight_digest"] == model_identity(bridge)["weight_digest"]


def test_temporary_hooks_remove_their_own_hooks_only(api, tiny, tokens_for):
    """Hooks put on for a block run in it, on top of the caller's own (a permanent one and
    one of an enclosing `model.hooks` at the same point), and leave with it, also when the
    block raises; the caller's hooks stay, and still run after."""
    model = tiny(api)
    toks = tokens_for(model, 2)
    calls: list[str] = []

    def note(label):
        def hook(act, hook=None):
            calls.append(label)

        return hook

    point = "blocks.0.hook_resid_mid"
    model.hook_dict[point].add_hook(note("permanent"), is_permanent=True)
    level = getattr(model, "context_level", None)
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(point, note("outer"))]):
            with temporary_hooks(
                model, [(point, note("mine")), ("blocks.0.hook_resid_pre", note("pre"))]
            ):
                model(toks)
            assert calls == ["pre", "permanent", "outer", "mine"]
            calls.clear()
            with pytest.raises(KeyError, match="raised inside"):
                with temporary_hooks(model, [(point, note("mine"))]):
                    raise KeyError("raised inside")
            model(toks)
            assert calls == ["permanent", "outer"]
            assert getattr(model, "context_level", None) == (None if level is None else level + 1)
        calls.clear()
        model(toks)
        assert calls == ["permanent"]
        assert getattr(model, "context_level", None) == level
    finally:
        model.reset_hooks(including_permanent=True)


def test_temporary_hooks_take_name_filters_and_name_what_is_not_a_hook_point(api, tiny, tokens_for):
    """Named hooks go on where named; a name filter (a callable, as `model.hooks` takes) is
    TransformerLens's own business; a name that is not a hook point is a KeyError naming it."""
    model = tiny(api)
    toks = tokens_for(model, 2)
    seen: list[str] = []

    def note(act, hook=None):
        seen.append(hook.name)

    with torch.no_grad(), temporary_hooks(model, [(lambda n: n.endswith("resid_mid"), note)]):
        model(toks)
    assert len(seen) == model.cfg.n_layers  # one resid_mid a block (a Bridge names it its way)
    if api == "hooked":  # TL 3.9's Bridge ignores unknown names; TL 4 raises its own KeyError
        for name in ("blocks.0.nope", "blocks.0.attn"):
            with pytest.raises(KeyError, match=name.replace(".", r"\.")):
                with temporary_hooks(model, [(name, note)]):
                    pass
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_writing_resid_mid_changes_the_residual(api, tiny, tokens_for):
    """A write at hook_resid_mid must reach hook_resid_post through the residual too (on the
    Bridge the hook is an alias of the MLP's input and needs the change carried)."""
    model = tiny(api)
    toks = tokens_for(model, 4)
    seen = {}

    def read(name):
        def hook(act, hook=None):
            seen[name] = act.detach().clone()

        return hook

    with torch.no_grad():
        run_with_hooks(
            model,
            toks,
            [("blocks.0.hook_resid_mid", read("mid")), ("blocks.0.hook_resid_post", read("post"))],
        )
        base_post = seen["post"]
        mlp_base = base_post - seen["mid"]
        hooks = replace_hooks(model, "blocks.0.hook_resid_mid", lambda a: a + 1.0)
        run_with_hooks(model, toks, hooks + [("blocks.0.hook_resid_post", read("post2"))])
    # post = (mid + 1) + mlp(mid + 1): the residual part moved by exactly 1
    mlp_new = seen["post2"] - (seen["mid"] + 1.0)
    assert not torch.allclose(mlp_new, mlp_base)
    hooks = replace_hooks(model, "blocks.0.hook_resid_mid", lambda a: a)
    with torch.no_grad():
        run_with_hooks(model, toks, hooks + [("blocks.0.hook_resid_post", read("post3"))])
    assert torch.equal(seen["post3"], base_post)


HF_ARCHS = ("gpt2", "neox", "llama", "gemma", "mistral", "qwen2", "processed")


@pytest.mark.parametrize("arch", HF_ARCHS)
@pytest.mark.parametrize("api", available_apis())
def test_hooked_state_dict_reproduces_the_blocks_outputs(arch, api):
    """The output weights read back under HookedTransformer names write what the model's own
    forward writes: `z W_O + b_O` is the attention's output, `post W_out + b_out` the MLP's
    (GPT-2's Conv1D layers hold their weights transposed on the Bridge; a square W_O would be
    silently wrong)."""
    from tl_degeneracy.engine.compat import hooked_state_dict
    from tl_degeneracy.models.tiny import tiny_model

    model = tiny_model(arch, api)
    toks = torch.randint(1, model.cfg.d_vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    names = ["hook_resid_pre", "attn.hook_z", "hook_resid_mid", "mlp.hook_post", "hook_resid_post"]
    acts = {}

    def keep(name):
        def hook(act, hook=None):
            acts[name] = act.detach()

        return hook

    present = set(dict(model.hook_dict)) if hasattr(model, "hook_dict") else set()
    hooks = [(f"blocks.1.{n}", keep(n)) for n in names if f"blocks.1.{n}" in present]
    with torch.no_grad():
        run_with_hooks(model, toks, hooks)
    w = hooked_state_dict(model)
    p = "blocks.1."
    attn = acts["attn.hook_z"].flatten(-2) @ w[p + "attn.W_O"].flatten(0, 1)
    attn = attn + w.get(p + "attn.b_O", 0)
    mlp = acts["mlp.hook_post"] @ w[p + "mlp.W_out"] + w.get(p + "mlp.b_out", 0)
    if "hook_resid_mid" in acts:
        torch.testing.assert_close(acts["hook_resid_mid"] - acts["hook_resid_pre"], attn)
        torch.testing.assert_close(acts["hook_resid_post"] - acts["hook_resid_mid"], mlp)
    else:  # parallel attention and MLP
        torch.testing.assert_close(acts["hook_resid_post"] - acts["hook_resid_pre"], attn + mlp)


@pytest.mark.skipif(len(available_apis()) < 2, reason="HookedTransformer needs TransformerLens < 4")
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hooked_state_dict_is_the_same_on_both_apis(arch):
    """Every weight both APIs name, equal: GPT-2's transposed Conv1D layers, and Gemma's
    embedding scale √d_model and RMSNorm gain 1 + w, which a HookedTransformer holds folded in."""
    from tl_degeneracy.engine.compat import hooked_state_dict
    from tl_degeneracy.models.tiny import tiny_model

    hooked = hooked_state_dict(tiny_model(arch, "hooked"))
    bridge = hooked_state_dict(tiny_model(arch, "bridge"))
    shared = sorted(set(hooked) & set(bridge))
    wanted = ["embed.W_E", "unembed.W_U"]
    wanted += [f"blocks.{b}.{w}" for b in (0, 1) for w in ("attn.W_Q", "attn.W_O", "mlp.W_out")]
    assert set(wanted) <= set(shared)
    for key in shared:
        torch.testing.assert_close(bridge[key], hooked[key], rtol=1e-12, atol=1e-12, msg=key)


def test_the_bridges_read_in_hooked_form_are_the_loaders_table():
    """`hooked_state_dict` vouches for exactly the architectures `load_local` converts to a
    HookedTransformer (each checked above); any other Bridge runs through its hooks."""
    from tl_degeneracy.engine.compat import HOOKED_FORM_MODELS, has_hooked_weights
    from tl_degeneracy.models.architectures import ARCHITECTURES
    from tl_degeneracy.models.tiny import tiny_model

    assert set(ARCHITECTURES) == HOOKED_FORM_MODELS - {"NativeModel"}
    assert has_hooked_weights(tiny_model("attn_only", "bridge"))
    assert not has_hooked_weights(tiny_model("qwen3", "bridge"))


def test_a_device_this_machine_lacks_is_named(monkeypatch):
    """`usable_device` (behind `move_model`, `load_local`, `LIBConfig.stats_device` and the
    `fit` command) names a misspelt device, a GPU this machine lacks, or one index too many."""
    from tl_degeneracy.engine.compat import usable_device

    assert usable_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu' is not a device: use cpu, cuda, cuda:N or mps"):
        usable_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda:0': CUDA is not available here"):
        usable_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert usable_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="has 2 CUDA device\\(s\\), cuda:0 to cuda:1"):
        usable_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'mps': Apple's Metal backend is not available"):
        usable_device("mps")


def test_dtype_names_are_read_in_one_place():
    assert as_dtype("bfloat16") is torch.bfloat16 and as_dtype("torch.float64") is torch.float64
    assert as_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match=r"'int8' is not a floating dtype.*names float32, float64"):
        as_dtype("int8")
