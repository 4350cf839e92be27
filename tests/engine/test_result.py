import copy
import json

import pytest
import torch

from tl_degeneracy.engine.basis_result import ArtifactError, BasisResult
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.sites import Site

SITES = (Site("blocks.0.hook_resid_mid", "last"), Site("logits", "last"))


@pytest.fixture(params=["lib", "pca"])
def fitted(api, tiny, tokens_for, request):
    model = tiny(api)
    config = LIBConfig(SITES, kind=request.param, progress=False)
    return model, fit_basis(model, tokens_for(model, 30), config)


def test_save_load_round_trip(fitted, tmp_path):
    model, result = fitted
    result.save(tmp_path / "lib")
    loaded = BasisResult.load(tmp_path / "lib", model)
    for name, b in result.bases.items():
        assert torch.equal(loaded[name].C, b.C) and loaded[name].site == b.site
    meta = json.loads((tmp_path / "lib" / "metadata.json").read_text())
    for field in (
        "model",
        "weight_processing",
        "versions",
        "sites",
        "model_dtype",
        "n_tokens",
        "truncation",
        "kind",
    ):
        assert field in meta, field
    assert meta["versions"]["transformer_lens"]
    assert loaded.kind in repr(loaded) and "<table" in loaded._repr_html_()


def test_loading_onto_the_wrong_model_fails(fitted, tiny, tmp_path, api):
    _, result = fitted
    result.save(tmp_path / "lib")
    with pytest.raises(ArtifactError, match="other weights"):
        BasisResult.load(tmp_path / "lib", tiny(api, seed=7))
    with pytest.raises(ArtifactError, match="d_model"):
        BasisResult.load(tmp_path / "lib", tiny(api, d_model=12, d_head=6))


def test_corrupted_artifacts(fitted, tmp_path):
    _, result = fitted
    folder = result.save(tmp_path / "lib")
    data = bytearray((folder / "tensors.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (folder / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        BasisResult.load(folder)
    result.save(folder)
    (folder / "metadata.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="invalid JSON"):
        BasisResult.load(folder)
    with pytest.raises(ArtifactError, match="not a saved basis"):
        BasisResult.load(tmp_path / "missing")


def test_html_renders_offline(fitted, tmp_path):
    _, result = fitted
    page = result.save_html(tmp_path / "basis.html").read_text()
    assert "<table" in page and "data:image/png;base64" in page
    assert 'src="http' not in page and "src='http" not in page
    assert "<table" in result._repr_html_()


def test_every_weight_is_checked_and_dtype_or_device_changes_are_accepted(fitted, tmp_path):
    """A change of one block weight (not the embeddings) is refused, naming the weight; the same
    weights in float32 load (results are float64 and move where they are used)."""
    model, result = fitted
    result.save(tmp_path / "lib")
    changed = copy.deepcopy(model)
    with torch.no_grad():
        dict(changed.named_parameters())[_a_block_weight(changed)].mul_(1.001)
    with pytest.raises(ArtifactError, match="blocks.0"):
        BasisResult.load(tmp_path / "lib", changed)
    as_float32 = copy.deepcopy(model).to(torch.float32)
    loaded = BasisResult.load(tmp_path / "lib", as_float32)
    name = result.sites[0].name
    torch.testing.assert_close(loaded.bases[name].C, result.bases[name].C)


def _a_block_weight(model) -> str:
    """The first MLP weight matrix, by its name on either API."""
    return next(n for n, p in model.named_parameters() if "mlp" in n and p.ndim >= 2)


def test_moving_results_to_a_device_this_machine_lacks_names_it(fitted, monkeypatch):
    """`BasisResult.to`, `SiteBasis.to` and `GramStatistics.to` name a misspelt device or a
    GPU that is not there, where torch would fail inside the first copy."""
    from tl_degeneracy.engine.statistics import collect_statistics

    model, result = fitted
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stats = collect_statistics(model, SITES, torch.zeros(2, model.cfg.n_ctx, dtype=torch.long))
    for movable in (result, next(iter(result.bases.values())), stats):
        with pytest.raises(ValueError, match="'gpu' is not a device"):
            movable.to("gpu")
        with pytest.raises(ValueError, match="CUDA is not available here"):
            movable.to("cuda")
        assert movable.to("cpu") is not None
