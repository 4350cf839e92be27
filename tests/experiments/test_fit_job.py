"""`tl-degeneracy fit --model FOLDER`: the general command on a Hugging Face checkpoint folder
a user would bring (a tiny random GPT-2 written by `transformers`), end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tl_degeneracy import BasisResult, validate_tokens
from tl_degeneracy.cli import main
from tl_degeneracy.models import load_local, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--n-tokens", "480", "--seq-len", "16", "--batch-rows", "8", "--sources", "2",
         "--edge-tokens", "64", "--ablation-tokens", "64", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint("gpt2", tmp_path_factory.mktemp("ckpt") / "tiny-gpt2", seed=0)


def test_fit_on_a_folder_with_text_and_mlp_sites(folder, tmp_path):
    """Text files in, every residual cut plus the MLP sites of both blocks out: bases that load
    back onto the model, ablation curves, and the report with logit effects of MLP sites."""
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "out"
    args = ["fit", "--model", str(folder), "--text", str(text), "--mlp-sites", "0", "1"]
    assert main([*args, "--attn-sites", "1", *SMALL, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
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


def test_rows_longer_than_the_context_name_the_flag(folder, tmp_path, capsys):
    """Text packed into rows longer than the model's context ends in one line naming
    `--seq-len`, not a token-level fix the command line cannot apply."""
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    n_ctx = load_local(folder).cfg.n_ctx
    args = ["fit", "--model", str(folder), "--text", str(text), *SMALL, "--out", str(tmp_path)]
    assert main([*args, "--seq-len", str(n_ctx + 1)]) == 2
    assert f"pass --seq-len {n_ctx} or less" in capsys.readouterr().err


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
