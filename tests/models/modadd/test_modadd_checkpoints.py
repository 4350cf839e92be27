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


def _small_checkpoint(folder, p: int = 5):
    """A tiny checkpoint (p = 5) written by `save_checkpoint`, to damage."""
    model = build_model(model_config(p), None, api=APIS[0])
    return save_checkpoint(folder, model, {"dataset": {"modulus": p, "frac_train": 0.4}})


def _edit_config(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_damaged_weights_are_named_never_unpickled(tmp_path):
    """A pickle in place of model.safetensors (never unpickled) and a weight of another shape:
    one ValueError naming the file, not a SafetensorError or a state_dict RuntimeError."""
    from safetensors.torch import load_file, save_file

    folder = _small_checkpoint(tmp_path / "pickled")
    torch.save({"W_E": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"pickled/model.safetensors is not a safetensors file"):
        load_checkpoint(folder)
    folder = _small_checkpoint(tmp_path / "shape")
    weights = load_file(str(folder / "model.safetensors"))
    weights["blocks.0.attn.W_K"] = torch.zeros(3, 3)
    save_file(weights, str(folder / "model.safetensors"))
    for api in APIS:
        with pytest.raises(ValueError, match=r"W_K has shape \[3, 3\], but .*config.json gives"):
            load_checkpoint(folder, api=api)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["model"].update(d_model="x"), "model.d_model is 'x'; it must be a whole"),
        (lambda c: c.update(model=[1]), "'model' is a JSON list, not an object"),
        (lambda c: c["dataset"].update(modulus="x"), "dataset.modulus is 'x', but model.d_vocab"),
        (lambda c: c["dataset"].update(frac_train=2), "dataset.frac_train is 2; it must be"),
    ],
)
def test_a_config_of_the_wrong_types_is_named(tmp_path, edit, message):
    folder = _small_checkpoint(tmp_path / "ck")
    _edit_config(folder, edit)
    with pytest.raises(ValueError, match=r"ck/config.json: ") as caught:
        load_checkpoint(folder)
    assert message in str(caught.value) and "save_checkpoint" in str(caught.value)
