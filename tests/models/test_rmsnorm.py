"""HookedTransformer's RMSNorm switched to Hugging Face's rounding (`x * rsqrt(...)`)."""

from __future__ import annotations

import pytest
import torch

from tl_degeneracy.engine.compat import has_hooked_transformer
from tl_degeneracy.models.rmsnorm import round_rmsnorm_like_hugging_face

pytestmark = pytest.mark.skipif(
    not has_hooked_transformer(), reason="HookedTransformer needs TransformerLens < 4"
)


def rms_model(seed: int = 0):
    """A one-block float32 HookedTransformer with RMSNorm and non-trivial norm weights."""
    from support import tiny_model

    model = tiny_model("hooked", normalization_type="RMS", seed=seed)
    return model.to(torch.float32)


def hf_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """`LlamaRMSNorm.forward` for float32 input, written out."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_switches_every_rmsnorm_and_rounds_like_hugging_face():
    model = rms_model()
    ln = model.blocks[0].ln1
    x = 300 * torch.randn(64, 5, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    before = ln(x)
    assert round_rmsnorm_like_hugging_face(model) == 3  # ln1, ln2, ln_final
    after = ln(x)
    expected = hf_rmsnorm(x, ln.w, ln.eps)
    assert torch.equal(after, expected)
    assert not torch.equal(before, expected)  # TransformerLens's own rounding differs
    torch.testing.assert_close(after, before, atol=0, rtol=1e-6)  # the same function
    assert round_rmsnorm_like_hugging_face(model) == 0  # already switched


def test_hook_scale_keeps_its_meaning_and_a_patched_scale_is_used():
    model = rms_model()
    round_rmsnorm_like_hugging_face(model)
    x = torch.randn(2, 3, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    ln = model.blocks[0].ln1
    seen = {}

    def read(scale, hook):
        seen["scale"] = scale.detach().clone()

    ln.hook_scale.add_hook(read)
    ln(x)
    torch.testing.assert_close(seen["scale"], (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt())
    ln.hook_scale.remove_hooks()

    ln.hook_scale.add_hook(lambda scale, hook: torch.full_like(scale, 2.0))
    torch.testing.assert_close(ln(x), x / 2.0 * ln.w)
    ln.hook_scale.remove_hooks()


def test_a_detached_scale_is_frozen():
    """A hook that returns the scale detached (same values, no gradient) linearises the norm: the
    output's gradient is `w / scale`, as with TransformerLens's own RMSNorm."""
    model = rms_model()
    ln = model.blocks[0].ln1
    x = torch.randn(2, 3, model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    grads = []
    for switch in (False, True):
        if switch:
            round_rmsnorm_like_hugging_face(model)
        ln.hook_scale.add_hook(lambda scale, hook: scale.detach())
        xi = x.clone().requires_grad_(True)
        ln(xi).sum().backward()
        ln.hook_scale.remove_hooks()
        grads.append(xi.grad)
    scale = (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    torch.testing.assert_close(grads[1], (ln.w / scale).detach().expand_as(x))
    torch.testing.assert_close(grads[1], grads[0])


def test_gradients_equal_transformer_lens_own():
    plain, switched = rms_model(), rms_model()
    round_rmsnorm_like_hugging_face(switched)
    tokens = torch.randint(0, plain.cfg.d_vocab, (3, 4), generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (plain, switched):
        model.zero_grad()
        model(tokens).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
