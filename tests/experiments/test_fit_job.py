"""`tl-degeneracy fit --model FOLDER`: the general command on a Hugging Face checkpoint folder
a user would bring (a tiny random GPT-2 written by `transformers`), end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tl_degeneracy import BasisResult, validate_tokens
from tl_degeneracy.cli import main
from tl_degeneracy.experiments.study import Study
from tl_degeneracy.models import load_local, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--n-tokens", "480", "--seq-len", "16", "--batch-rows", "8", "--sources", "2",
         "--edge-tokens", "64", "--ablation-tokens", "64", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint("gpt2", tmp_path_factory.mktemp("ckpt") / "tiny-gpt2", seed=0)


def test_fit_on_a_folder_with_text_and_mlp_sites(folder, tmp_path, capsys):
    """Text files in, every residual cut plus the MLP sites of both blocks out: bases that load
    back onto the model, ablation curves, and the report with logit effects of MLP sites.
    Sections of different widths are summarised with the range of their edge counts, and the
    report's own time is in the summary's timings."""
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "out"
    args = ["fit", "--model", str(folder), "--text", str(text), "--mlp-sites", "0", "1"]
    assert main([*args, "--attn-sites", "1", *SMALL, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    spread = False
    for kind, graph in Study.load(out).graphs.items():
        totals = sorted(s.total_edges for s in graph.sections.values())
        of = f"{totals[0]}" if totals[0] == totals[-1] else f"{totals[0]}–{totals[-1]}"
        assert f"{kind}: median edges for 99% of the weight" in printed
        assert f"(of {of} per section)" in printed
        spread |= totals[0] < totals[-1]
    assert spread  # the MLP and attention sites make some sections wider
    summary = json.loads((out / "summary.json").read_text())
    timings = summary["timings_s"]
    assert timings["report_s"] > 0.05 and timings["total_s"] >= timings["report_s"]
    assert summary["sites"]["blocks.1.mlp.hook_post[1:]"]["lib"]["kept"] > 0
    assert summary["sites"]["blocks.1.attn.hook_z[1:]"]["lib"]["kept"] > 0
    model = load_local(folder)
    lib = BasisResult.load(out / "bases" / "lib", model=model)
    assert "blocks.0.mlp.hook_post[1:]" in lib.bases and "blocks.1.mlp.hook_post[1:]" in lib.bases
    effects = json.loads((out / "logit_effects_lib.json").read_text())
    assert "blocks.1.mlp.hook_post[1:]" in effects  # a composite site among the late ones
    assert "tld-graph" in (out / "report.html").read_text()


def test_fit_on_a_folder_with_tokens_and_chosen_sites(folder, tmp_path):
    """A token file and an explicit site list with positions after '@'."""
    model = load_local(folder)
    gen = torch.Generator().manual_seed(0)
    tokens = validate_tokens(model, torch.randint(0, model.cfg.d_vocab, (40, 16), generator=gen))
    save_file({"tokens": tokens}, str(tmp_path / "tokens.safetensors"))
    out = tmp_path / "out"
    sites = ["blocks.0.hook_resid_pre@1:", "blocks.0.attn.hook_z@1:", "blocks.1.hook_resid_post@1:"]
    args = ["fit", "--model", str(folder), "--tokens", str(tmp_path / "tokens.safetensors")]
    assert main([*args, "--sites", *sites, *SMALL, "--out", str(out)]) == 0
    lib = BasisResult.load(out / "bases" / "lib", model=model)
    assert list(lib.bases) == [s.replace("@", "[") + "]" for s in sites]


def test_a_checkpoint_without_tokenizer_files_takes_another_folders(folder, tmp_path, capsys):
    """`--tokenizer FOLDER` for a checkpoint saved without tokenizer files: the fit runs on
    the text tokenised by it; without it, or on a preset, the command ends in one line that
    says what to do."""
    import shutil

    bare = tmp_path / "fine-tune"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*"))
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    args = ["fit", "--model", str(bare), "--text", str(text), *SMALL]
    assert main([*args, "--out", str(tmp_path / "o1")]) == 2
    assert "--tokenizer FOLDER" in capsys.readouterr().err
    out = tmp_path / "o2"
    assert main([*args, "--tokenizer", str(folder), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sites"]["blocks.1.hook_resid_pre[1:]"]["lib"]["kept"] > 0
    assert main(["fit", "--model", "modadd", "--tokenizer", str(folder), *SMALL]) == 2
    assert "leave --tokenizer out" in capsys.readouterr().err


def test_mlp_sites_that_cannot_be_added_end_in_one_line(folder, tmp_path, capsys):
    """`--mlp-sites` of a block the model lacks, or beside an explicit `--sites` list (which it
    would not change), ends the command with the reason instead of being left out."""
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    args = ["fit", "--model", str(folder), "--text", str(text), *SMALL, "--out", str(tmp_path)]
    assert main([*args, "--mlp-sites", "7"]) == 2
    assert "block(s) [7]" in capsys.readouterr().err
    sites = ["blocks.0.hook_resid_pre@1:", "blocks.1.hook_resid_post@1:"]
    assert main([*args, "--sites", *sites, "--mlp-sites", "0"]) == 2
    assert "list them with --sites" in capsys.readouterr().err
    assert main([*args, "--sites", *sites, "--attn-sites", "0"]) == 2
    assert "--attn-sites adds sites" in capsys.readouterr().err


def test_a_finished_folder_refuses_a_run_of_other_settings(folder, tmp_path, capsys):
    """A second run into a finished --out with other settings used to write its results beside
    the first's (a lib-only run left the old PCA in place); it is refused by name. The same
    settings run again."""
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "out"
    args = ["fit", "--model", str(folder), "--text", str(text), *SMALL, "--out", str(out)]
    assert main(args) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["fingerprint.json"]
    capsys.readouterr()
    assert main([*args, "--kinds", "lib", "--dtype", "float64"]) == 2
    err = capsys.readouterr().err
    assert "another --out" in err
    # each setting that differs is named with its flag (it used to name only internal fields)
    assert 'settings.kinds (--kinds): ["lib", "pca"] -> ["lib"]' in err
    assert 'model_dtype (--dtype): "torch.float32" -> "torch.float64"' in err
    assert sorted(Study.load(out).bases) == ["lib", "pca"]
    assert main(args) == 0


def test_too_little_text_names_the_file_and_the_fix(folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    args = ["fit", "--model", str(folder), "--text", str(short), *SMALL]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--text {short} gives 0 row(s) of 16 tokens" in err and "more text" in err
    degeneracy = ["degeneracy", str(folder), "--text", str(short), "--seq-len", "16"]
    assert main([*degeneracy, "--llc", "none", "--quiet", "--out", str(tmp_path / "d")]) == 2
    assert f"--text {short} gives no row of 16 tokens" in capsys.readouterr().err


def test_sites_without_positions_leave_out_the_bos_unless_kept(folder, tmp_path):
    """`--sites` without `@positions` read a text's rows as the default sites do, position 0
    (the BOS) left out; `--keep-bos` keeps it (it used to do nothing for explicit sites)."""
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]
    args = ["fit", "--model", str(folder), "--text", str(text), "--sites", *sites, *SMALL]
    args += ["--kinds", "pca", "--edge-tokens", "0", "--ablation-tokens", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert list(Study.load(tmp_path / "a").bases["pca"].bases) == [f"{s}[1:]" for s in sites]
    assert main([*args, "--keep-bos", "--out", str(tmp_path / "b")]) == 0
    assert list(Study.load(tmp_path / "b").bases["pca"].bases) == sites


def test_the_token_count_is_the_most_positions_fitted(folder, tmp_path):
    """A final site read at the last position has one sample per row; the run's token count
    is that of the sites read at every position, and each site's count is recorded."""
    model = load_local(folder)
    gen = torch.Generator().manual_seed(0)
    tokens = validate_tokens(model, torch.randint(0, model.cfg.d_vocab, (40, 16), generator=gen))
    save_file({"tokens": tokens}, str(tmp_path / "tokens.safetensors"))
    out = tmp_path / "out"
    sites = ["blocks.0.hook_resid_post@1:", "blocks.1.hook_resid_pre@1:", "logits@last"]
    args = ["fit", "--model", str(folder), "--tokens", str(tmp_path / "tokens.safetensors")]
    assert main([*args, "--sites", *sites, *SMALL, "--out", str(out)]) == 0
    study = Study.load(out)
    rows = 480 // 16  # --n-tokens 480 in rows of 16 (a tenth of the 40 rows is held out)
    assert study.n_tokens == rows * 15
    counts = study.metadata["site_counts"]
    assert counts["blocks.0.hook_resid_post[1:]"] == rows * 15 and counts["logits[-1]"] == rows


def test_rows_longer_than_the_context_name_the_flag(folder, tmp_path, capsys):
    """Text packed into rows longer than the model's context ends in one line naming
    `--seq-len`, not a token-level fix the command line cannot apply."""
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    n_ctx = load_local(folder).cfg.n_ctx
    args = ["fit", "--model", str(folder), "--text", str(text), *SMALL, "--out", str(tmp_path)]
    assert main([*args, "--seq-len", str(n_ctx + 1)]) == 2
    assert f"pass --seq-len {n_ctx} or less" in capsys.readouterr().err
    long = torch.zeros(4, n_ctx + 4, dtype=torch.int64)  # a token file of longer rows
    save_file({"tokens": long}, str(tmp_path / "long.safetensors"))
    tokens = ["fit", "--model", str(folder), "--tokens", str(tmp_path / "long.safetensors")]
    assert main([*tokens, "--out", str(tmp_path / "t"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"rows of {n_ctx + 4} tokens" in err and f"at most {n_ctx} tokens" in err
    degeneracy = ["degeneracy", str(folder), "--text", str(text), "--llc", "none", "--quiet"]
    assert main([*degeneracy, "--out", str(tmp_path / "d")]) == 2  # its --seq-len is 32
    assert f"--seq-len 32 is longer than the model's context (n_ctx = {n_ctx})" in (
        capsys.readouterr().err
    )


def test_a_token_file_with_fewer_tokens_than_asked(folder, tmp_path, capsys):
    """Token ids under Hugging Face's key `input_ids`; asking for more tokens than the file
    has says how many it gives and fits on those."""
    model = load_local(folder)
    gen = torch.Generator().manual_seed(0)
    ids = validate_tokens(model, torch.randint(0, model.cfg.d_vocab, (20, 16), generator=gen))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    args = ["fit", "--model", str(folder), "--tokens", str(tmp_path / "ids.safetensors")]
    assert main([*args, *SMALL, "--n-tokens", "10000", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "(the data gives 288 training tokens, fewer than --n-tokens 10000;" in out


def test_a_device_this_machine_lacks_ends_in_one_line(folder, tmp_path, capsys):
    args = ["fit", "--model", str(folder), *SMALL, "--out", str(tmp_path)]
    assert main([*args, "--device", "gpu"]) == 2
    assert "'gpu' is not a device" in capsys.readouterr().err
    assert main([*args, "--stats-device", "cuda:64"]) == 2
    assert "device 'cuda:64'" in capsys.readouterr().err


def test_fit_on_a_modular_addition_folder_in_the_reference_format(api, tiny, tmp_path):
    """A folder as the reference writes it (its TransformerLens config under "model") runs as
    a task model with its own sites and data, not as a Hugging Face checkpoint."""
    from tl_degeneracy.models.modadd.checkpoints import save_checkpoint
    from tl_degeneracy.models.modadd.data import ModAddDataset

    p = 7
    model = tiny(api, "mlp", d_vocab=p + 1, n_ctx=3)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {}, ModAddDataset.random(p, 0.5, 0))
    out = tmp_path / "out"
    assert main(["fit", "--model", str(ckpt), "--api", api, "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "blocks.0.hook_resid_mid[-1]" in summary["sites"]


def test_fit_on_a_bridge_only_folder(tmp_path, capsys):
    """A Gemma 2 folder (norms after attention and MLP: no HookedTransformer conversion) runs
    the same command on the TransformerBridge, MLP sites included; the report says it has no
    logit effects, and why, instead of failing."""
    folder = tiny_checkpoint("gemma2", tmp_path / "tiny-gemma2", seed=0)
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "out"
    args = ["fit", "--model", str(folder), "--text", str(text), "--mlp-sites", "1"]
    with pytest.warns(UserWarning, match="no logit effects: Gemma2ForCausalLM"):
        assert main([*args, *SMALL, "--out", str(out)]) == 0
    assert "TransformerBridge (through its hooks only) on cpu" in capsys.readouterr().out
    model = load_local(folder)
    assert type(model).__name__ == "TransformerBridge"
    lib = BasisResult.load(out / "bases" / "lib", model=model)
    assert lib.bases["blocks.1.mlp.hook_post[1:]"].k > 0
    assert not (out / "logit_effects_lib.json").exists()
    assert "tld-graph" in (out / "report.html").read_text()


def test_sites_too_wide_for_memory_end_in_one_line(folder, tmp_path, monkeypatch, capsys):
    """A logits site too wide for the free memory (made small here) ends the command with one
    line naming the site and exit status 2, before any statistics are allocated."""
    import tl_degeneracy.engine.statistics as statistics

    monkeypatch.setattr(statistics, "_available_bytes", lambda device: 10_000)
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    args = ["fit", "--model", str(folder), "--text", str(text), "--out", str(tmp_path / "out")]
    assert main([*args, "--sites", "blocks.1.hook_resid_pre", "logits@-1", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "StatisticsMemoryError" in err and "logits[-1]: 50 units" in err


def test_the_log_announces_each_long_step(folder, tmp_path, monkeypatch, capsys):
    """Steps that run without a bar say so when they start: the basis solve of a wide site
    (every site is "wide" here) and each part of the report."""
    import tl_degeneracy.engine.fit as fit

    monkeypatch.setattr(fit, "WIDE_SOLVE", 1)
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    loud = [a for a in SMALL if a != "--quiet"]
    args = ["fit", "--model", str(folder), "--text", str(text), "--mlp-sites", "1"]
    assert main([*args, *loud, "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "blocks.1.mlp.hook_post[1:]->blocks.1.hook_resid_post[1:]: rotating 48 units" in printed
    parts = ["report: attribution patching", "report: feature examples", "report: graphs"]
    where = [printed.find(p) for p in parts]
    assert min(where) > printed.find("rotating") and where == sorted(where), printed[-2000:]
