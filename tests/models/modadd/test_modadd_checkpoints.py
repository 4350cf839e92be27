"""Loading checkpoints into every available TransformerLens API: the package's own, and the
reference's five (skipped without ../shared)."""

from __future__ import annotations

import json

import pytest
import torch

from tl_degeneracy.engine.compat import available_apis, build_model, hooked_state_dict
from tl_degeneracy.models.modadd import (
    ModAddCheckpoint,
    ModAddDataset,
    default_checkpoint_dir,
    evaluate,
    list_reference_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from tl_degeneracy.models.modadd.train import last_position_logits, model_config

APIS = available_apis()
REFERENCE = list_reference_checkpoints()
needs_reference = pytest.mark.skipif(
    not REFERENCE,
    reason="reference checkpoints not found (../shared/reference/modadd beside the checkout, "
    "or $TL_DEGENERACY_SHARED); ../shared is only on the project's machines",
)
NO_PROCESSING = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False}


@pytest.mark.skipif(
    not (default_checkpoint_dir() / "model.safetensors").is_file(),
    reason="the package checkpoint is not in tl_degeneracy/assets/modadd yet (train it with "
    "python -m tl_degeneracy.models.modadd.train --out tl_degeneracy/assets/modadd --p 113)",
)
@pytest.mark.parametrize("api", APIS)
def test_own_checkpoint_loads_and_generalises(api):
    ckpt = ModAddCheckpoint.open(default_checkpoint_dir())
    assert ckpt.p == 113 and ckpt.split_path == default_checkpoint_dir() / "split.safetensors"
    model, ds = load_checkpoint(api=api)
    assert model.tl_degeneracy_weight_processing == NO_PROCESSING
    test = evaluate(model, *ds.test())
    assert test["accuracy"] >= 0.99
    recorded = ckpt.config["metrics"]["test"]["accuracy"]
    assert test["accuracy"] == pytest.approx(recorded, abs=2e-4)


def test_save_and_reload_roundtrip(tmp_path):
    cfg = model_config(7)
    model = build_model(cfg, None, api=APIS[0])
    ds = ModAddDataset.random(7, 0.5, seed=0)
    save_checkpoint(tmp_path / "ck", model, {"dataset": {"modulus": 7}}, dataset=ds)
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["model"]["d_vocab"] == 8 and meta["dataset"] == {"modulus": 7}
    for api in APIS:
        back, back_ds = load_checkpoint(tmp_path / "ck", api=api, dtype=torch.float64)
        assert torch.equal(back_ds.train_indices, ds.train_indices)
        with torch.no_grad():
            torch.testing.assert_close(
                back(ds.tokens), model(ds.tokens).double(), atol=1e-6, rtol=0
            )


def test_missing_split_falls_back_to_the_recorded_seed(tmp_path):
    model = build_model(model_config(5), None, api=APIS[0])
    save_checkpoint(tmp_path, model, {"dataset": {"frac_train": 0.4, "seed": 2}})
    ds = ModAddCheckpoint.open(tmp_path).dataset()
    assert torch.equal(ds.train_indices, ModAddDataset.random(5, 0.4, 2).train_indices)
    with pytest.raises(FileNotFoundError):
        ModAddCheckpoint.open(tmp_path / "nowhere")


@needs_reference
def test_all_reference_checkpoints_load():
    assert [d.name for d in REFERENCE] == [f"seed{i}" for i in range(5)]
    for path in REFERENCE:
        ckpt = ModAddCheckpoint.open(path)
        ds = ckpt.dataset()
        assert ckpt.p == 113 and ds.train_indices.numel() == 3830
        assert ckpt.split_path == path.parent / "split.safetensors"


@needs_reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_seed0_accuracy_on_every_api(dtype):
    ckpt = ModAddCheckpoint.open(REFERENCE[0])
    x, y = ckpt.dataset().test()
    assert x.shape[0] == 8939
    logits = {}
    for api in APIS:
        model = ckpt.model(api=api, dtype=dtype)
        assert model.tl_degeneracy_weight_processing == NO_PROCESSING
        with torch.no_grad():
            logits[api] = model(x)[:, -1]
        acc = (logits[api].argmax(-1) == y).double().mean().item()
        assert acc == pytest.approx(0.99955, abs=1e-4), api
    # the APIs agree with each other and with an independent forward on the stored weights
    weights = {k: v.to(dtype) for k, v in ckpt.state_dict.items()}
    functional = last_position_logits(weights, x)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for api in APIS:
        torch.testing.assert_close(logits[api], functional, rtol=0, atol=tol)
        torch.testing.assert_close(logits[api], logits[APIS[0]], rtol=0, atol=tol)


@needs_reference
def test_reference_weights_survive_both_apis():
    ckpt = ModAddCheckpoint.open(REFERENCE[0])
    for api in APIS:
        back = hooked_state_dict(ckpt.model(api=api))
        for name, weight in ckpt.state_dict.items():
            torch.testing.assert_close(back[name], weight, rtol=0, atol=0)
