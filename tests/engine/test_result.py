import copy
import hashlib
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import APIS, tiny_config

from tl_degeneracy.engine.basis_result import ArtifactError, BasisResult
from tl_degeneracy.engine.compat import build_model, hooked_state_dict
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


def _flip_three_neurons(model) -> None:
    """The input weights of three MLP neurons change sign: mean |w| and rms stay, the function
    changes."""
    with torch.no_grad():
        hooked_state_dict(model, keep_vars=True)["blocks.0.mlp.W_in"][:, :3] *= -1


def _permute_queries(model) -> None:
    with torch.no_grad():
        w_q = hooked_state_dict(model, keep_vars=True)["blocks.0.attn.W_Q"]
        w_q.copy_(w_q.flip(-1))


@pytest.mark.parametrize("edit", [_flip_three_neurons, _permute_queries])
def test_sign_flips_and_permutations_of_weights_are_refused(fitted, tmp_path, edit):
    model, result = fitted
    result.save(tmp_path / "lib")
    changed = copy.deepcopy(model)
    edit(changed)
    with pytest.raises(ArtifactError, match="other weights: blocks.0"):
        BasisResult.load(tmp_path / "lib", changed)
    with pytest.raises(ArtifactError, match="other weights: blocks.0"):
        result.check_model(changed)


def _rewrite(folder, meta_fn=None, tensors_fn=None):
    """Edit a saved basis's metadata and tensors, keeping the checksum valid (as someone who
    edits both files would)."""
    meta = json.loads((folder / "metadata.json").read_text())
    if tensors_fn is not None:
        tensors = load_file(str(folder / "tensors.safetensors"))
        tensors_fn(tensors)
        save_file(tensors, str(folder / "tensors.safetensors"))
        meta["tensors_sha256"] = hashlib.sha256(
            (folder / "tensors.safetensors").read_bytes()
        ).hexdigest()
    if meta_fn is not None:
        meta_fn(meta)
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_fingerprints_of_earlier_versions_still_load(fitted, tmp_path):
    """A fingerprint of mean |w| and rms only (6 digits) is completed by the weight digest:
    silent on the same model; a warning that says so on a sign-flipped one, whose digest
    differs."""
    model, result = fitted

    def earlier(meta):
        meta["weight_fingerprint"] = {
            k: [float(f"{x:.6g}") for x in v[:2]] for k, v in meta["weight_fingerprint"].items()
        }

    folder = _rewrite(result.save(tmp_path / "lib"), earlier)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BasisResult.load(folder, model)
    changed = copy.deepcopy(model)
    _flip_three_neurons(changed)
    with pytest.warns(UserWarning, match="earlier tl_degeneracy.*Save the basis again"):
        BasisResult.load(folder, changed)


def test_metadata_without_a_model_says_it_cannot_check(fitted, tmp_path):
    model, result = fitted
    folder = _rewrite(
        result.save(tmp_path / "lib"),
        lambda m: (m.pop("model"), m.pop("weight_fingerprint")),
    )
    with pytest.warns(UserWarning, match="records no model.*cannot be checked"):
        BasisResult.load(folder, model)


def _first(meta):
    return meta["bases"][0]["name"]


def _replace(field, fn):
    """A tensors_fn replacing `field` of the first site by `fn(tensor)`."""

    def edit(tensors):
        name = next(k for k in tensors if k.endswith("/C")).rsplit("/", 1)[0]
        tensors[f"{name}/{field}"] = fn(tensors[f"{name}/{field}"]).contiguous()

    return edit


def _nan(t):
    t = t.clone()
    t[0, 0] = float("nan")
    return t


TAMPERED = {
    "site hook edited": (
        lambda m: m["bases"][0]["site"].update(hook="blocks.0.hook_resid_pre"),
        None,
        "metadata.json: bases\\[0\\]: the entry is named .* but its site is",
    ),
    "site kind unknown": (
        lambda m: m["bases"][0].update(kind="banana"),
        None,
        "metadata.json: bases\\[0\\] .*kind 'banana' is not a kind of basis",
    ),
    "fit kind unknown": (
        lambda m: m.update(kind="banana"),
        None,
        "metadata.json: kind 'banana' is not a kind of basis",
    ),
    "newer format": (
        lambda m: m.update(format_version=99),
        None,
        "metadata.json is in format 99.*reads formats up to 2: upgrade it",
    ),
    "no format": (
        lambda m: m.update(format_version="two"),
        None,
        "format_version 'two' is not a format",
    ),
    "no bases": (lambda m: m.pop("bases"), None, "metadata.json lists no bases"),
    "C narrower than C_pinv": (
        None,
        _replace("C", lambda t: t[:, :1]),
        "tensors.safetensors: .*/C_pinv has shape .* so it should be",
    ),
    "C transposed": (
        None,
        _replace("C", lambda t: t.T),  # square here: only C⁺C ≠ I shows it
        "tensors.safetensors: .*/C_pinv is not a left inverse of .*/C",
    ),
    "mean too short": (
        None,
        _replace("mean", lambda t: t[:3]),
        "tensors.safetensors: .*/mean has shape \\[3\\]",
    ),
    "C in float32": (
        None,
        _replace("C", lambda t: t.float()),
        "tensors.safetensors: .*/C is torch.float32, but bases are saved in float64",
    ),
    "NaN in C": (None, _replace("C", _nan), "tensors.safetensors: .*/C holds NaN"),
    "tensor of no site": (
        None,
        lambda t: t.update({"blocks.9.hook_resid_pre/C": torch.zeros(2, 2, dtype=torch.float64)}),
        "holds tensors of no listed site",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_edited_artifacts_are_refused_naming_file_entry_and_problem(fitted, tmp_path, case):
    """What the checksum cannot catch (both files edited): each is refused at load, where it
    would otherwise load and act at another hook or fail with a raw torch error when used."""
    model, result = fitted
    meta_fn, tensors_fn, message = TAMPERED[case]
    folder = _rewrite(result.save(tmp_path / "lib"), meta_fn, tensors_fn)
    with pytest.raises(ArtifactError, match=message):
        BasisResult.load(folder)
    with pytest.raises(ArtifactError, match=message):
        BasisResult.load(folder, model)


def test_another_weight_layout_is_named_as_such(fitted, tmp_path):
    """A non-zero weight on one side only means another API or other weight processing, not
    other weights; a zero one (a bias the other layout leaves out) is no difference."""
    model, result = fitted

    def extra(value):
        def edit(meta):
            meta["weight_fingerprint"]["blocks.0.attn.b_extra"] = [value] * 5

        return edit

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BasisResult.load(_rewrite(result.save(tmp_path / "zero"), extra(0.0)), model)
    with pytest.raises(ArtifactError, match="laid out differently.*TransformerLens API"):
        BasisResult.load(_rewrite(result.save(tmp_path / "nonzero"), extra(0.5)), model)


@pytest.mark.skipif("hooked" not in APIS, reason="needs both TransformerLens APIs")
def test_a_basis_fitted_on_one_api_loads_for_the_other(tiny, tokens_for, tmp_path):
    """Grouped-query attention: the HookedTransformer holds `attn._W_K`, the Bridge of the same
    weights `attn.W_K`; the same weights are recognised across the two layouts."""
    hooked = tiny("hooked", "ln", n_key_value_heads=1)
    bridge = build_model(
        tiny_config("ln", n_key_value_heads=1), hooked.state_dict(), "bridge", torch.float64
    )
    config = LIBConfig(SITES, progress=False)
    fit_basis(hooked, tokens_for(hooked, 30), config).save(tmp_path / "hooked")
    fit_basis(bridge, tokens_for(bridge, 30), config).save(tmp_path / "bridge")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BasisResult.load(tmp_path / "hooked", bridge)
        BasisResult.load(tmp_path / "bridge", hooked)


def test_other_weights_with_other_processing_say_so(fitted, tmp_path):
    """Weights changed by other weight processing (centring, folding) are named as such."""
    model, result = fitted
    folder = _rewrite(
        result.save(tmp_path / "lib"), lambda m: m.update(weight_processing={"fold_ln": True})
    )
    changed = copy.deepcopy(model)
    _flip_three_neurons(changed)
    with pytest.raises(ArtifactError, match="weight processing differs too .*fold_ln"):
        BasisResult.load(folder, changed)


def test_a_basis_is_looked_up_by_name_site_or_short_form(fitted):
    """`result[site]` and `top_features` take what every site argument takes: the name, a
    `Site`, a short form with its positions; another site is refused naming the sites."""
    _, result = fitted
    name = SITES[0].name
    for site in (name, SITES[0], (("resid_mid", 0), "last")):
        assert result[site] is result.bases[name]
    assert result.top_features((("resid_mid", 0), "last"), 2) == result.top_features(name, 2)
    with pytest.raises(KeyError, match=r"\['blocks.0.hook_resid_mid\[-1\]'\] is at the same hook"):
        result[("resid_mid", 0)]


# -- every result type: edited files are refused at load, naming the file and the entry -------

_A, _B = Site("blocks.0.hook_resid_pre", "all"), Site("blocks.0.hook_resid_mid", "all")
_F64 = torch.float64


def _gram_statistics():
    from tl_degeneracy.engine.statistics import GramStatistics, SiteStatistics

    stats = SiteStatistics(_A, 5, torch.ones(3, dtype=_F64), torch.eye(3, dtype=_F64))
    return GramStatistics([_A], {_A.name: stats})


def _interaction_graph():
    from tl_degeneracy.engine.edges import InteractionGraph, SectionEdges
    from tl_degeneracy.engine.sections import Section

    section = Section(_A, _B)
    edges = SectionEdges(
        section, torch.ones(2, 3, dtype=_F64), torch.ones(2, dtype=_F64), 8, "exact"
    )
    return InteractionGraph(BasisResult({}, {}), {section.name: edges})


def _ablation_curve():
    from tl_degeneracy.engine.ablation import AblationCurve

    return AblationCurve(_B.name, "lib", {1: 0.5, 3: 0.7}, 0.8)


def _edge_ablation():
    from tl_degeneracy.engine.edge_ablation import EdgeAblation

    return EdgeAblation("a->b", 6, 0.8, {3: 0.7, 6: 0.8}, 6)


def _jacobian_gram():
    from tl_degeneracy.engine.jacobians import JacobianGram
    from tl_degeneracy.engine.sections import Section

    eye = torch.eye(3, dtype=_F64)
    return JacobianGram(Section(_A, _B), 4 * eye, 4, torch.stack([eye, eye]), "exact")


def _prompt_graph():
    from tl_degeneracy.engine.prompt_graph import PromptGraph
    from tl_degeneracy.engine.prompt_graph.edges import CandidateGraph
    from tl_degeneracy.engine.prompt_graph.graph import PromptGraphConfig

    def longs(n):
        return torch.zeros(n, dtype=torch.long)

    def ones(*shape):
        return torch.ones(*shape, dtype=_F64)

    nodes = {f: longs(4) for f in ("layer", "position", "feature", "kind")}
    candidates = CandidateGraph(
        **nodes,
        activation=ones(4),
        attribution=ones(4),
        src=longs(3),
        dst=longs(3),
        weight=ones(3),
        input_abs=ones(4),
    )
    return PromptGraph(
        tokens=torch.tensor([1, 2]),
        str_tokens=["a", "b"],
        sites=[_A.hook],
        target={"name": "logit(5)", "position": 1, "kind": "logit", "token": 5},
        value=1.0,
        site_positions=[torch.tensor([0, 1])],
        features=[ones(2, 3)],
        attributions=[ones(2, 3)],
        rest=[ones(2)],
        site_totals=ones(1),
        embedding=ones(2),
        candidates=candidates,
        influence=ones(4),
        kept_nodes=torch.ones(4, dtype=torch.bool),
        kept_edges=torch.ones(3, dtype=torch.bool),
        config=PromptGraphConfig(),
    )


def _patching_comparison():
    from tl_degeneracy.engine.prompt_graph import PatchingComparison

    site = {
        "site": _A.hook,
        "nodes (attribution patching)": 1.0,
        "rest (attribution patching)": 0.0,
        "TransformerLens": 1.0,
        "nodes (graph)": 0.9,
        "site patching": 1.1,
    }
    node = {"site": _A.hook, "position": 1, "feature": 0, "attribution patching": 0.5}
    nodes = [{**node, "graph attribution": 0.4, "patching": p} for p in (0.3, 0.6)]
    return PatchingComparison([site], nodes, 1.0, 0.5)


def _attribution_comparison():
    from tl_degeneracy.engine.attribution import AttributionComparison
    from tl_degeneracy.engine.attribution.site_scores import SiteAttribution

    v = torch.tensor([0.3, 0.2, 0.1], dtype=_F64)
    site = SiteAttribution(_A.name, "lib", v, v.flip(0), v, 0.6, 0.6, 0.7, 3)
    return AttributionComparison({_A.name: site}, 1.0, 0.5)


_M, _T = "metadata.json", "tensors.safetensors"
_GRAM_SITE = _A.name
_SECTION = f"{_A.name}->{_B.name}"
RESULT_TYPES = {
    # builder: (a key to remove, a key and a wrong value for it, a tensor to remove, one to resize)
    "GramStatistics": (
        _gram_statistics,
        "sites",
        ("sites", {"hook": _A.hook}),
        f"{_GRAM_SITE}/m2",
        f"{_GRAM_SITE}/mean",
    ),
    "InteractionGraph": (
        _interaction_graph,
        "sections",
        ("modules", [1]),
        f"{_SECTION}/mean_edges",
        f"{_SECTION}/edges",
    ),
    "AblationCurve": (_ablation_curve, "baseline", ("kind", 3), "k", "k"),
    "EdgeAblation": (_edge_ablation, "scores", ("baseline", "0.8"), "n", "score"),
    "JacobianGram": (_jacobian_gram, "count", ("method", 1), "total", "halves"),
    "PromptGraph": (_prompt_graph, "format", ("target", 7), "candidates/src", "kept_edges"),
    "PatchingComparison": (
        _patching_comparison,
        "node_rows",
        ("site_rows", [{"site": 1}]),
        "values",
        "values",
    ),
    "AttributionComparison": (
        _attribution_comparison,
        "comparison",
        ("comparison", [1]),
        f"{_A.name}/importance",
        f"{_A.name}/patching",
    ),
}


def _damage(kind, spec):
    """(metadata edit, tensors edit, the file named, the entry named) of one kind of damage."""
    _, missing, (key, value), dropped, resized = spec
    if kind == "metadata key missing":
        return (lambda m: m.pop(missing)), None, _M, missing
    if kind == "metadata key of the wrong type":
        return (lambda m: m.update({key: value})), None, _M, key
    if kind == "tensor missing":
        return None, (lambda t: t.pop(dropped)), _T, dropped
    if kind == "tensor resized":
        return None, (lambda t: t.update({resized: torch.zeros(5, dtype=_F64)})), _T, resized
    extra = "blocks.9.hook_resid_pre/C"
    return None, (lambda t: t.update({extra: torch.zeros(2, dtype=_F64)})), _T, extra


DAMAGES = [
    "metadata key missing",
    "metadata key of the wrong type",
    "tensor missing",
    "tensor resized",
    "extra tensor",
]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", sorted(RESULT_TYPES))
def test_every_result_type_refuses_an_edited_file_naming_it(kind, damage, tmp_path):
    """`metadata.json` is not under the tensors' checksum: an edited entry, or tensors replaced
    with the checksum updated, is refused at load by an `ArtifactError` naming the file and the
    entry, where it raised a raw KeyError or TypeError, failed only when rendered, or loaded
    inconsistent tensors silently."""
    result = RESULT_TYPES[kind][0]()
    folder = result.save(tmp_path / "r")
    type(result).load(folder)  # intact, it loads
    meta_fn, tensors_fn, file, entry = _damage(damage, RESULT_TYPES[kind])
    _rewrite(folder, meta_fn, tensors_fn)
    with pytest.raises(ArtifactError) as refused:
        type(result).load(folder)
    message = str(refused.value)
    assert str(folder / file) in message and f"'{entry}" in message, message


def test_numbers_saved_as_null_load_as_nan(tmp_path):
    """A NaN baseline or score is written as null (`jsonable`) and read back as NaN."""
    from tl_degeneracy.engine.ablation import AblationCurve
    from tl_degeneracy.engine.edge_ablation import EdgeAblation

    curve = AblationCurve(_B.name, "lib", {1: float("nan"), 3: 0.7}, float("nan"))
    loaded = AblationCurve.load(curve.save(tmp_path / "curve"))
    assert math.isnan(loaded.baseline) and math.isnan(loaded.scores[1]) and loaded.undecided
    edges = EdgeAblation("a->b", 6, float("nan"), {3: float("nan"), 6: 0.8}, None)
    loaded_edges = EdgeAblation.load(edges.save(tmp_path / "edges"))
    assert math.isnan(loaded_edges.baseline) and math.isnan(loaded_edges.scores[3])


def test_a_rebuilding_error_of_any_type_names_the_folder(tmp_path):
    """The backstop of `Result.load`: an entry no schema covers (a section of three sites)
    still gives an `ArtifactError` naming metadata.json, not a raw ValueError."""
    result = _jacobian_gram()
    folder = _rewrite(result.save(tmp_path / "j"), lambda m: m["section"].append(m["section"][0]))
    with pytest.raises(ArtifactError, match=f"{folder / _M}.*ValueError"):
        type(result).load(folder)
