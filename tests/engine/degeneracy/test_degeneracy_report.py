"""`DegeneracyReport`: building, saving and loading, rendering."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

from tl_degeneracy.engine.degeneracy import (
    DegeneracyReport,
    SGLDConfig,
    SGLDWarning,
    SourcesConfig,
    degeneracy_report,
)

FAST = SGLDConfig(step_size=1e-4, n_chains=2, n_steps=30, n_burnin=10, batch_size=64)


_BUILT: dict[str, DegeneracyReport] = {}


@pytest.fixture
def report(tiny, tokens_for, api):
    """One report per API for the module (building one runs SGLD five times)."""
    if api not in _BUILT:
        model = tiny(api, "mlp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SGLDWarning)
            _BUILT[api] = degeneracy_report(
                model, tokens_for(model, 48), SourcesConfig(batch_size=48), FAST
            )
    return copy.deepcopy(_BUILT[api])


def test_report_covers_every_parameter(report, tiny, api):
    model = tiny(api, "mlp")
    assert [s.name for s in report.sections] == [
        "embed",
        "blocks.0.attn",
        "blocks.0.mlp",
        "unembed",
    ]
    assert report.total.n_params == sum(s.n_params for s in report.sections)
    assert report.total.n_params == sum(p.numel() for p in model.parameters())
    for s in [*report.sections, report.total]:
        assert s.upper_bound == s.n_params - s.free["total"]
        assert s.llc is not None and s.llc.loss_traces.shape == (2, 30)
        assert len(s.bound_curve) == len(report.eps_grid)
    every = [*report.sections, report.total]
    assert (report.additivity is not None) == all(s.converged for s in every)


def test_an_estimate_that_is_not_a_result_is_not_shown(report):
    """Unconverged, diverged, or above the bound: the table says "not converged", the notes
    say why and give the setting; N_eff is NaN. A result is shown with its error."""
    section = report.sections[2]
    section.llc.rhat = 1.5
    section.upper_bound = int(section.llc.n_eff) + 1000
    assert not section.converged and math.isnan(section.n_eff)
    row = next(r for r in report.rows() if r["section"] == section.name)
    assert row["SGLD N_eff = 2λ̂"] == "not converged"
    (note,) = [n for n in report.notes() if n.startswith(section.name)]
    assert "R-hat 1.500 > 1.1" in note and f"ε = {section.llc.config.step_size:g}" in note
    section.llc.rhat = 1.0
    section.llc.llc_se = 0.1
    section.upper_bound = int(section.llc.n_eff) - 1
    assert "above the bound" in section.note()
    section.upper_bound = int(section.llc.n_eff) + 1
    if section.llc.llc >= 0 and not bool(section.llc.diverged.any()):
        assert section.converged and section.note() is None
        row = next(r for r in report.rows() if r["section"] == section.name)
        assert row["SGLD N_eff = 2λ̂"].startswith(f"{section.llc.n_eff:.4g} ± ")


def test_save_load_round_trip(report, tmp_path):
    report.save(tmp_path / "rep")
    assert (tmp_path / "rep.json").exists() and (tmp_path / "rep.safetensors").exists()
    json.loads((tmp_path / "rep.json").read_text())  # plain JSON, no pickle anywhere
    loaded = DegeneracyReport.load(tmp_path / "rep.json")
    assert loaded.to_markdown() == report.to_markdown()
    assert loaded._repr_html_() == report._repr_html_()
    for a, b in zip([*report.sections, report.total], [*loaded.sections, loaded.total]):
        assert a.free == b.free and a.upper_bound == b.upper_bound
        assert torch.equal(a.bound_curve, b.bound_curve)
        assert torch.equal(a.llc.loss_traces, b.llc.loss_traces)
        assert a.llc.config == b.llc.config
        assert a.details == b.details


def test_html_escapes_every_string(report):
    report.model["model_name"] = "<script>alert(1)</script>"
    report.sections[0].name = "a<b>&"
    page = report._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "a&lt;b&gt;&amp;" in page
    assert "http" not in page


def test_without_sgld(tiny, tokens_for):
    model = tiny("hooked" if "hooked" in _apis() else "bridge", "mlp")
    rep = degeneracy_report(model, tokens_for(model, 32), SourcesConfig(batch_size=32), llc="none")
    assert all(s.llc is None for s in rep.sections) and rep.total.llc is None
    assert "—" in rep.to_markdown()


def _apis():
    from tl_degeneracy.engine.compat import available_apis

    return available_apis()


def test_sensitivity_grid_is_reported_saved_and_drawn(tiny, tokens_for, tmp_path):
    """The total's λ̂ at other step sizes and nβ: one entry per other setting (the report's
    own is not repeated), in the markdown, in the page with the traces, and saved."""
    model = tiny(_apis()[0], "mlp")
    tokens = tokens_for(model, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        rep = degeneracy_report(
            model,
            tokens,
            SourcesConfig(batch_size=48),
            FAST,
            llc="total",
            sensitivity_step_sizes=(3e-5, 1e-4),
            sensitivity_nbetas=(None, 10.0),
        )
    settings = [(r.config.step_size, round(r.nbeta, 6)) for r in rep.sensitivity]
    own = (FAST.step_size, round(FAST.nbeta(48), 6))
    assert own not in settings and len(settings) == 3
    assert (3e-5, 10.0) in settings and all(r.loss_traces.shape == (2, 30) for r in rep.sensitivity)
    md = rep.to_markdown()
    assert "Sensitivity of λ̂" in md and md.count("| 3e-05 |") == 2
    page = rep.html_page().to_html()
    assert page.count("data:image/png;base64,") == 2  # convergence traces and the grid's
    rep.save(tmp_path / "rep")
    loaded = DegeneracyReport.load(tmp_path / "rep")
    assert [r.llc for r in loaded.sensitivity] == [r.llc for r in rep.sensitivity]
    assert torch.equal(loaded.sensitivity[2].loss_traces, rep.sensitivity[2].loss_traces)
    assert loaded.to_markdown() == md


def test_a_section_without_an_estimate_still_sets_its_pace(tiny, tokens_for, api, monkeypatch):
    """The whole model moves each section at that section's step size. A section whose
    calibration chose a step size but ran out of budget before an estimate used to be left
    out, so the whole model moved it at the largest step of all."""
    from tl_degeneracy.engine.degeneracy import CalibratedLLC
    from tl_degeneracy.engine.degeneracy import build_report as module
    from tl_degeneracy.engine.degeneracy.weight_maps import section_filter

    seen: list[SGLDConfig] = []

    def calibrated(problem, config, calibration, bound, progress, largest):
        seen.append(config)
        chosen = 3e-5 if len(seen) == 1 else 1e-4  # the first section: no estimate
        return CalibratedLLC(None, [], chosen, notes=["the budget ended it"])

    monkeypatch.setattr(module, "calibrated_llc", calibrated)
    model = tiny(api, "mlp")
    report = degeneracy_report(model, tokens_for(model, 48), SourcesConfig(batch_size=48))
    scales = dict(seen[-1].step_scales)  # the whole model's run
    assert len(seen) == len(report.sections) + 1 and len(scales) == len(report.sections)
    assert scales[section_filter(report.sections[0].name)] == pytest.approx(0.3)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:50])


REPORT_DAMAGES = {
    # a damage of the files of a saved report: (what to do to which file, the file named)
    "report.json holds a list": (lambda json_, arrays: json_.write_text("[]"), "json"),
    "report.json without its format": (
        lambda json_, arrays: json_.write_text(json.dumps({"sections": []})),
        "json",
    ),
    "report.json with an empty section": (
        lambda json_, arrays: json_.write_text(
            json.dumps({"format": "tl_degeneracy.DegeneracyReport/1", "sections": [{}]})
        ),
        "json",
    ),
    "report.safetensors pickled": (
        lambda json_, arrays: torch.save({"eps_grid": torch.zeros(2)}, arrays),
        "safetensors",
    ),
    "report.safetensors truncated": (lambda json_, arrays: _truncate(arrays), "safetensors"),
}


@pytest.mark.parametrize("damage", sorted(REPORT_DAMAGES))
def test_a_damaged_report_is_refused_naming_the_file(damage, tmp_path):
    """Where `load` raised a raw TypeError, KeyError or SafetensorError, or loaded a JSON file
    of no report, it names the file and the problem (`ArtifactError`). The damage comes
    before any use of the content, so a stand-in report does."""
    from safetensors.torch import save_file

    from tl_degeneracy.engine.artifacts import ArtifactError

    json_, arrays = tmp_path / "rep.json", tmp_path / "rep.safetensors"
    json_.write_text(json.dumps({"format": "tl_degeneracy.DegeneracyReport/1", "sections": []}))
    save_file({"eps_grid": torch.zeros(2, dtype=torch.float64)}, str(arrays))
    edit, named = REPORT_DAMAGES[damage]
    edit(json_, arrays)
    with pytest.raises(ArtifactError) as refused:
        DegeneracyReport.load(tmp_path / "rep")
    assert str(tmp_path / f"rep.{named}") in str(refused.value), str(refused.value)
