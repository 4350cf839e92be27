"""The digits MLP: hook names, forward, the closed forms it declares (equal to its own forward
between hooks, and their Jacobians equal to autograd through the hooks), save/load."""

from __future__ import annotations

import json

import pytest
import torch

from tl_degeneracy.engine.structures.forms import Affine, AffineRelu, DeclaresSections
from tl_degeneracy.models.digits.model import DigitsMLP, DigitsMLPConfig, init_weights

CFG = DigitsMLPConfig(d_in=7, hidden=(9, 6, 8), n_classes=5)


def random_model(seed: int = 0, cfg: DigitsMLPConfig = CFG) -> DigitsMLP:
    """float64, weights and biases N(0, 1/fan_in) so that ReLUs are on and off."""
    model = DigitsMLP(cfg, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[0] if p.ndim == 2 else 4
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / fan_in**0.5)
    return model


def capture(model: DigitsMLP, x: torch.Tensor) -> dict[str, torch.Tensor]:
    logits, cache = model.run_with_cache(x)
    return {**{k: v for k, v in cache.items()}, "logits": logits}


def through_hooks(model: DigitsMLP, x: torch.Tensor, inp: str, out: str):
    """`f ↦ activation at out` with the activation at `inp` replaced by `f` (one input)."""

    def fn(f: torch.Tensor) -> torch.Tensor:
        seen = {}

        def put(act, hook):
            return f[None].expand_as(act)

        def keep(act, hook):
            seen["out"] = act

        hooks = [(inp, put)] + ([] if out == "logits" else [(out, keep)])
        logits = model.run_with_hooks(x[None], fwd_hooks=hooks)
        return (logits if out == "logits" else seen["out"])[0]

    return fn


def test_hook_names_in_forward_order():
    model = random_model()
    assert list(model.hook_dict) == [
        "hook_in",
        "layers.0.hook_pre",
        "layers.0.hook_post",
        "layers.1.hook_pre",
        "layers.1.hook_post",
        "layers.2.hook_pre",
        "layers.2.hook_post",
    ]
    assert model.cut_names == [
        "hook_in",
        "layers.0.hook_post",
        "layers.1.hook_post",
        "layers.2.hook_post",
        "logits",
    ]
    assert isinstance(model, DeclaresSections)


def test_forward_is_the_stated_mlp():
    model = random_model(1)
    x = torch.randn(11, CFG.d_in, dtype=torch.float64)
    h = x
    for layer in model.layers:
        h = torch.clamp(h @ layer.W_in + layer.b_in, min=0)
    acts = capture(model, x)
    torch.testing.assert_close(acts["logits"], h @ model.W_out + model.b_out, rtol=0, atol=1e-13)
    assert acts["logits"].shape == (11, CFG.n_classes)
    torch.testing.assert_close(acts["hook_in"], x, rtol=0, atol=0)
    pre = acts["layers.1.hook_pre"]
    torch.testing.assert_close(acts["layers.1.hook_post"], pre.clamp(min=0), rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_section_forms_equal_forward_and_autograd(seed):
    model = random_model(seed)
    x = torch.randn(6, CFG.d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    acts = capture(model, x)
    cuts = model.cut_names
    for inp, out in zip(cuts, cuts[1:]):
        form = model.section_form(inp, out)
        expected_kind = Affine if out == "logits" else AffineRelu
        assert isinstance(form, expected_kind), (inp, out)
        torch.testing.assert_close(form(acts[inp]), acts[out], rtol=0, atol=1e-12)
        for b in range(x.shape[0]):
            f = acts[inp][b]
            if isinstance(form, AffineRelu):
                assert form.P is None and form.Q is None and not form.c.any()
                mask = (f @ form.W_in + form.b_in > 0).to(torch.float64)
                closed = (form.W_in * mask) @ form.read() + form.direct()
            else:
                closed = form.P
            auto = torch.autograd.functional.jacobian(through_hooks(model, x[b], inp, out), f)
            torch.testing.assert_close(closed.T, auto, rtol=0, atol=1e-11)
        assert (closed != 0).any()


def test_section_form_is_none_off_the_cuts():
    model = random_model()
    assert model.section_form("hook_in", "layers.1.hook_post") is None  # not consecutive
    assert model.section_form("layers.0.hook_pre", "layers.0.hook_post") is None
    assert model.section_form("layers.1.hook_post", "layers.0.hook_post") is None
    assert model.section_form("hook_in", "logits") is None


def test_section_form_is_float64_on_the_weights_device():
    model = random_model().to(torch.float32)
    form = model.section_form("layers.2.hook_post", "logits")
    assert isinstance(form, Affine)
    assert form.P.dtype == torch.float64 and form.P.device == model.W_out.device
    torch.testing.assert_close(form.P, model.W_out.detach().double(), rtol=0, atol=0)


def test_save_load_round_trip(tmp_path):
    model = random_model(3)
    model.save(tmp_path / "m", {"note": {"a": 1}})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model"]["hidden"] == [9, 6, 8] and config["note"] == {"a": 1}
    loaded = DigitsMLP.load(tmp_path / "m", dtype=torch.float64)
    assert loaded.cfg == model.cfg and not loaded.training
    x = torch.randn(4, CFG.d_in, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DigitsMLP.load(tmp_path / "missing")


def test_init_weights_is_seeded_and_bounded():
    a = init_weights(DigitsMLP(CFG), 5)
    b = init_weights(DigitsMLP(CFG), 5)
    c = init_weights(DigitsMLP(CFG), 6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc), name
    bound = 1 / CFG.d_in**0.5
    assert a.layers[0].W_in.abs().max() <= bound and a.layers[0].W_in.abs().max() > 0.8 * bound


def test_config_rejects_what_it_cannot_build():
    with pytest.raises(ValueError, match="hidden layer"):
        DigitsMLPConfig(hidden=())
    with pytest.raises(ValueError, match="relu"):
        DigitsMLPConfig(act_fn="gelu")
