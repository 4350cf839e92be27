"""`tl-degeneracy degeneracy`: the report of a checkpoint, written as JSON + safetensors + HTML."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tl_degeneracy import cli
from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.engine.degeneracy import DegeneracyReport, SGLDWarning
from tl_degeneracy.engine.degeneracy.parameters import state_dict_parameters
from tl_degeneracy.experiments.degeneracy_job import DegeneracyJobConfig
from tl_degeneracy.models import load_local, tiny_checkpoint, tokens_from_text_files
from tl_degeneracy.models.modadd.checkpoints import save_checkpoint
from tl_degeneracy.models.modadd.data import ModAddDataset


def test_degeneracy_command_on_a_tiny_checkpoint(api, tiny, tmp_path, capsys):
    p = 7
    model = tiny(api, "mlp", d_vocab=p + 1, n_ctx=3)
    dataset = ModAddDataset.random(p, 0.5, 0)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {"dataset": {"p": p}}, dataset)
    out = tmp_path / "report"
    argv = ["degeneracy", str(ckpt), "--out", str(out), "--api", api, "--threads", "1"]
    argv += ["--chains", "2", "--steps", "20", "--burnin", "5", "--batch-size", "16", "--quiet"]
    argv += ["--step-size", "1e-4"]  # fixed settings: exactly these chains
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| total |" in printed and "wrote" in printed
    for name in ("report.json", "report.safetensors", "report.html", "report.md", "job.json"):
        assert (out / name).is_file(), name
    report = DegeneracyReport.load(out / "report")
    assert DegeneracyReport.load(out).to_markdown() == report.to_markdown()  # the folder too
    with pytest.raises(FileNotFoundError, match="give the stem the report was saved under"):
        DegeneracyReport.load(out / "elsewhere")
    n_params = sum(p_.numel() for p_ in model.parameters())
    assert report.total.n_params == n_params
    assert report.n_data == len(dataset.train_indices)
    assert report.total.llc is not None and report.total.llc.loss_traces.shape == (2, 20)
    assert report.eps == 1e-10
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "SGLD diagnostics" in page
    assert "http://" not in page and "https://" not in page  # offline
    job = json.loads((out / "job.json").read_text())
    assert job["timing"]["wall_s"] > 0 and job["config"]["chains"] == 2


def test_one_section_only(api, tiny, tmp_path):
    """`--sections`: only that section's sources, and the total is that section."""
    p = 7
    model = tiny(api, "mlp", d_vocab=p + 1, n_ctx=3)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {}, ModAddDataset.random(p, 0.5, 0))
    out = tmp_path / "mlp"
    argv = ["degeneracy", str(ckpt), "--out", str(out), "--api", api, "--llc", "total"]
    argv += ["--sections", "blocks.0.mlp", "--chains", "2", "--steps", "10", "--burnin", "2"]
    argv += ["--step-size", "1e-4"]
    argv += ["--grid-step-sizes", "3e-5", "1e-4", "--grid-nbetas", "5", "50"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        assert cli.main(argv) == 0
    report = DegeneracyReport.load(out / "report")
    assert [s.name for s in report.sections] == ["blocks.0.mlp"]
    mlp = [p_ for n, p_ in model.named_parameters() if ".mlp." in n]
    assert report.total.n_params == sum(p_.numel() for p_ in mlp)
    assert report.total.llc.n_params == report.total.n_params  # SGLD moved only the MLP
    assert report.sections[0].llc is None
    assert torch.equal(report.total.bound_curve, report.sections[0].bound_curve)
    # the sensitivity grid: 2 step sizes × 2 nβ, all over the MLP's parameters
    assert len(report.sensitivity) == 4
    assert {round(r.nbeta) for r in report.sensitivity} == {5, 50}
    assert all(r.n_params == report.total.n_params for r in report.sensitivity)
    assert "Sensitivity of λ̂" in (out / "report.md").read_text()
    assert len(json.loads((out / "job.json").read_text())["timing"]["sensitivity_s"]) == 4


def test_without_a_step_size_every_estimate_is_calibrated(tiny, tmp_path):
    """No `--step-size`: every section and the total choose their step size by pilots; the
    table shows an estimate only where it is a result, and says why where it is not."""
    p = 7
    api = "hooked" if "hooked" in available_apis() else "bridge"
    model = tiny(api, "mlp", d_vocab=p + 1, n_ctx=3)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {}, ModAddDataset.random(p, 0.5, 0))
    out = tmp_path / "auto"
    argv = ["degeneracy", str(ckpt), "--out", str(out), "--api", api, "--quiet"]
    argv += ["--chains", "2", "--steps", "40", "--burnin", "10", "--max-total-steps", "3000"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        assert cli.main(argv) == 0
    report = DegeneracyReport.load(out / "report")
    assert report.settings["calibration"]["max_total_steps"] == 3000
    md = (out / "report.md").read_text()
    for s in [*report.sections, report.total]:
        assert s.calibration is not None and s.calibration.steps_used <= 3000
        assert s.calibration.pilots and s.calibration.lengths
        row = next(line for line in md.splitlines() if line.startswith(f"| {s.name} |"))
        if s.converged:
            assert s.llc is not None and s.n_eff <= s.upper_bound and s.llc.rhat <= 1.1
            assert f"{s.llc.n_eff:.4g} ± " in row
        else:
            assert "not converged" in row and f"- {s.name}: not converged — " in md
    job = json.loads((out / "job.json").read_text())
    assert job["config"]["step_size"] is None
    page = (out / "report.html").read_text()
    for column in ("γ tried", "step-size check", "localisation check"):
        assert f"<th>{column}</th>" in page
    checked = [s.calibration for s in [*report.sections, report.total] if s.calibration]
    for cal in checked:  # the checks round-trip through report.json
        assert cal.check_discretisation
        if cal.discretisation is not None:
            assert f"λ̂ {cal.discretisation.llc_fine:.4g} at ε = " in page


def test_a_hugging_face_folder_on_its_own_text_or_tokens(tmp_path):
    """Any model the `fit` command takes: a Hugging Face folder measured on a text file (a
    language model: KL at every position, eps 1e-6), and on a token file holding the same rows,
    which gives the same sources."""
    from safetensors.torch import save_file

    folder = tiny_checkpoint("gpt2", tmp_path / "tiny-gpt2", seed=0)
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    argv = ["degeneracy", str(folder), "--seq-len", "16", "--n-data", "12", "--quiet"]
    argv += ["--llc", "total", "--step-size", "1e-4", "--chains", "2", "--steps", "10"]
    argv += ["--burnin", "2", "--batch-size", "4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        assert cli.main([*argv, "--text", str(text), "--out", str(tmp_path / "a")]) == 0
    model = load_local(folder)
    rows = tokens_from_text_files([text], model.tokenizer, 16)[:12]
    save_file({"input_ids": rows}, str(tmp_path / "rows.safetensors"))
    tokens = ["--tokens", str(tmp_path / "rows.safetensors"), "--llc", "none"]
    assert cli.main([*argv, *tokens, "--out", str(tmp_path / "b")]) == 0
    a, b = (DegeneracyReport.load(tmp_path / x / "report") for x in "ab")
    assert a.n_data == b.n_data == 12 and a.eps == 1e-6
    # every weight once (a Bridge's parameters() also lists GPT-2's fused qkv beside q, k, v)
    assert a.total.n_params == sum(p.numel() for p in state_dict_parameters(model).values())
    assert a.total.llc is not None and a.total.llc.loss_traces.shape == (2, 10)
    assert b.total.llc is None
    assert [s.name for s in a.sections] == [s.name for s in b.sections]
    assert "blocks.1.mlp" in [s.name for s in a.sections]
    assert torch.equal(a.total.bound_curve, b.total.bound_curve)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--step-size", "0"], "step_size must be a positive finite number, got 0.0"),
        (["--step-size", "-0.0001"], "step_size must be a positive finite number"),
        (["--nbeta", "0"], "nbeta must be a positive finite number, got 0.0"),
        (["--chains", "0"], "argument --chains: must be at least 1, got 0"),
        (["--steps", "50"], "burnin (100) must be less than steps (50)"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
        (["--gamma", "-100"], "gamma must be a non-negative finite number"),
        (["--eps", "-1"], "eps must be a non-negative finite number"),
        (["--n-data", "0"], "argument --n-data: must be at least 1"),
        (["--grid-step-sizes", "0"], "every step size of sensitivity_step_sizes"),
    ],
)
def test_bad_settings_exit_with_one_line_before_loading(tmp_path, capsys, options, message):
    """Checked before any model is loaded (the default model needs no files here): integer
    options when the command line is read, the rest by the settings' own checks."""
    argv = ["degeneracy", "--out", str(tmp_path / "out"), "--quiet", *options]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("tl-degeneracy degeneracy: ") and message in err[0]
    assert not (tmp_path / "out" / "report.json").exists()


def test_step_size_zero_is_not_the_default():
    with pytest.raises(ValueError, match="step_size"):
        DegeneracyJobConfig(step_size=0.0)
    assert DegeneracyJobConfig(step_size=1e-3).sgld_config(10).step_size == 1e-3


def test_one_data_point_exits_with_one_line(api, tiny, tmp_path, capsys):
    p = 7
    model = tiny(api, "mlp", d_vocab=p + 1, n_ctx=3)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {}, ModAddDataset.random(p, 0.5, 0))
    argv = ["degeneracy", str(ckpt), "--out", str(tmp_path / "out"), "--api", api, "--quiet"]
    argv += ["--n-data", "1", "--llc", "total", "--step-size", "1e-4", "--steps", "10"]
    argv += ["--burnin", "2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()[0]
    assert "β = 1/log n needs n ≥ 2" in err and "give more data" in err
