"""`tl-degeneracy prompt-graph`: a study written by `fit` explains a prediction on the user's own
prompt, loading the model again as the fit did, and checks what it writes against the model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tl_degeneracy.cli import main
from tl_degeneracy.engine.prompt_graph import PromptGraph
from tl_degeneracy.models import load_local, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--n-tokens", "480", "--seq-len", "16", "--batch-rows", "8", "--sources", "2",
         "--edge-tokens", "64", "--ablation-tokens", "64", "--quiet"]  # fmt: skip
PROMPT, CORRUPTED = "the quick fox", "the quick dog"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny GPT-2 checkpoint folder and a study fitted on it (BOS left out, as by default)."""
    root = tmp_path_factory.mktemp("prompt")
    folder = tiny_checkpoint("gpt2", root / "tiny-gpt2", seed=0)
    text = root / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = root / "study"
    assert (
        main(["fit", "--model", str(folder), "--text", str(text), *SMALL, "--out", str(out)]) == 0
    )
    return folder, out


def _tokens(model, text):
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor([[model.tokenizer.bos_token_id, *ids]])


def test_the_default_target_is_the_models_first_choice_against_its_second(study, tmp_path, capsys):
    """Without --answer/--vs the target is the logit difference of the model's two most likely
    next tokens, read from the model directly; the graph, its summary and the intervention
    check agree on its value, and the graph leaves out BOS as the fit did."""
    folder, out = study
    args = ["prompt-graph", str(out), "--prompt", PROMPT, "--details-rows", "4"]
    assert main([*args, "--out", str(tmp_path / "g")]) == 0
    model = load_local(folder)
    tokens = _tokens(model, PROMPT)
    with torch.no_grad():
        last = model(tokens)[0, -1].double()
    first, second = last.topk(2).indices.tolist()
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["tokens"] == tokens[0].tolist()
    assert (summary["target"]["good"], summary["target"]["bad"]) == (first, second)
    assert summary["value"] == pytest.approx(float(last[first] - last[second]), rel=1e-5)
    assert summary["intervention"]["before"] == pytest.approx(summary["value"], rel=1e-6)
    graph = PromptGraph.load(tmp_path / "g" / "graph")
    assert graph.value == pytest.approx(summary["value"], rel=1e-12)
    assert min(n.position for n in graph.top_nodes(100, kept=False)) == 1  # BOS carries none
    assert len(summary["top_supporting_nodes"]) == 10
    assert all(r["attribution"] * summary["value"] > 0 for r in summary["top_supporting_nodes"])
    assert "tld-prompt-graph" in (tmp_path / "g" / "graph.html").read_text()
    printed = capsys.readouterr().out
    assert "most influential supporting nodes set to their mean together" in printed


def test_answer_vs_and_a_corrupted_prompt_match_patching_by_hand(study, capsys):
    """Named tokens set the target; with a corrupted prompt, patching the last residual site
    at every position but BOS (which both prompts share) restores the clean value exactly, so
    the comparison's site patching there is value(clean) − value(corrupted), computed here
    from the model. Each run writes the next numbered folder, never over an earlier one."""
    folder, out = study
    shutil.rmtree(out / "prompt_graphs", ignore_errors=True)
    model = load_local(folder)
    good, bad = (model.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("x", "5"))
    args = ["prompt-graph", str(out), "--prompt", PROMPT, "--answer", "x", "--vs", "5"]
    for _ in range(2):
        assert main([*args, "--corrupted", CORRUPTED, "--details-rows", "0", "--kind", "pca"]) == 0
    written = sorted(p.name for p in (out / "prompt_graphs").iterdir())
    assert written == ["001_pca", "002_pca"]
    summary = json.loads((out / "prompt_graphs" / "002_pca" / "summary.json").read_text())
    assert (summary["target"]["good"], summary["target"]["bad"]) == (good, bad)

    def value(text):
        with torch.no_grad():
            last = model(_tokens(model, text))[0, -1].double()
        return float(last[good] - last[bad])

    sites = summary["patching"]["sites"]
    final = next(s for s in sites if s["site"].startswith("blocks.1.hook_resid_post"))
    assert final["site patching"] == pytest.approx(value(PROMPT) - value(CORRUPTED), rel=1e-5)
    assert (out / "prompt_graphs" / "002_pca" / "patching.html").is_file()
    printed = capsys.readouterr().out
    assert "TransformerLens" in printed and "Spearman rho with patching" in printed
    one = "blocks.1.hook_resid_pre"
    only = ["--corrupted", CORRUPTED, "--details-rows", "0", "--compare-sites", one]
    assert main([*args, *only]) == 0
    summary = json.loads((out / "prompt_graphs" / "003_lib" / "summary.json").read_text())
    assert [s["site"] for s in summary["patching"]["sites"]] == [one]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--answer", "xyz"], "--answer 'xyz' is 3 tokens for this tokenizer"),
        (["--answer", "x", "--vs", "x"], "--answer and --vs name the same token"),
        (["--kind", "ib"], "has no ib basis (it has: lib, pca); pass --kind lib"),
        (["--corrupted", "the quick foxes"], "--corrupted is 16 tokens and the prompt 14"),
        (["--positions", "one"], "--positions 'one' is not understood"),
    ],
)
def test_bad_requests_end_in_one_line_naming_the_fix(study, extra, message, capsys):
    _, out = study
    assert main(["prompt-graph", str(out), "--prompt", PROMPT, "--details-rows", "0", *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_study_that_does_not_record_its_model_asks_for_it(study, tmp_path, capsys):
    """A folder whose fit did not record how it loaded the model (an older one) names --model,
    and works once it is given; token ids stand in for text."""
    folder, out = study
    old = tmp_path / "old"
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("prompt_graphs", "checkpoints"))
    record = json.loads((old / "study.json").read_text())
    del record["metadata"]["job"]
    (old / "study.json").write_text(json.dumps(record))
    ids = " ".join(map(str, _tokens(load_local(folder), PROMPT)[0].tolist()))
    args = ["prompt-graph", str(old), "--token-ids", ids, "--details-rows", "0"]
    assert main(args) == 2
    assert "does not record its model" in capsys.readouterr().err
    assert main([*args, "--model", str(folder)]) == 0
    summary = json.loads((old / "prompt_graphs" / "001_lib" / "summary.json").read_text())
    assert " ".join(map(str, summary["tokens"])) == ids


def test_a_study_fitted_on_a_device_this_machine_lacks_names_the_flag(study, tmp_path, capsys):
    """A study fitted on a GPU, read on a machine without one (this test's), names --device;
    given it, the model runs where asked."""
    if torch.cuda.is_available():
        pytest.skip("this machine has the device the study names")
    _, out = study
    moved = tmp_path / "gpu_fit"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("prompt_graphs", "checkpoints"))
    record = json.loads((moved / "study.json").read_text())
    record["metadata"]["job"]["device"] = "cuda"
    (moved / "study.json").write_text(json.dumps(record))
    args = ["prompt-graph", str(moved), "--prompt", PROMPT, "--details-rows", "0"]
    assert main(args) == 2
    assert "was fitted on cuda" in capsys.readouterr().err
    assert main([*args, "--device", "cpu"]) == 0


def _fit(folder, root, *extra):
    text = root / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = root / "study"
    assert main(["fit", "--model", str(folder), "--text", str(text), *SMALL, *extra,
                 "--out", str(out)]) == 0  # fmt: skip
    return out


def test_a_study_fitted_with_relative_paths_is_used_from_anywhere(study, tmp_path, monkeypatch):
    """fit records the model and tokenizer folders as absolute paths (it recorded them as
    typed, so a study fitted with `--model ck` could only be read from where it ran); a
    study that does record a relative path names --model; --model keeps the recorded
    tokenizer (a checkpoint saved without tokenizer files takes another folder's)."""
    folder, _ = study
    bare = tmp_path / "fine-tune"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*"))
    monkeypatch.chdir(tmp_path)
    out = _fit("fine-tune", tmp_path, "--tokenizer", str(folder))
    record = json.loads((out / "study.json").read_text())["metadata"]["job"]
    assert record["model"] == str(bare.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = ["prompt-graph", str(out), "--prompt", PROMPT, "--details-rows", "0"]
    assert main([*args, "--out", "g1"]) == 0
    assert main([*args, "--model", str(bare), "--out", "g2"]) == 0  # the recorded tokenizer
    record["model"] = "fine-tune"  # as an older fit recorded it
    study_json = json.loads((out / "study.json").read_text())
    study_json["metadata"]["job"] = record
    (out / "study.json").write_text(json.dumps(study_json))
    assert main([*args, "--out", "g3"]) == 2


def test_the_default_positions_are_those_every_site_was_fitted_at(study, tmp_path, capsys):
    """Sites read at the last position only give nodes there only (every site's positions
    were taken from the first site); positions a site was not fitted at are warned about;
    positions without the last one, where the target is read, are refused."""
    folder, _ = study
    sites = ["blocks.0.hook_resid_pre@1:", "blocks.1.hook_resid_pre@last",
             "blocks.1.hook_resid_post@last"]  # fmt: skip
    out = _fit(folder, tmp_path, "--sites", *sites)
    args = ["prompt-graph", str(out), "--prompt", PROMPT, "--details-rows", "0"]
    assert main([*args, "--out", str(tmp_path / "g")]) == 0
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    n = len(summary["tokens"])
    assert summary["positions"] == [n - 1]
    graph = PromptGraph.load(tmp_path / "g" / "graph")
    assert {int(p) for positions in graph.site_positions for p in positions} == {n - 1}
    capsys.readouterr()
    assert main([*args, "--positions", "1:", "--out", str(tmp_path / "g2")]) == 0
    assert "note: blocks.1.hook_resid_post was fitted at positions" in capsys.readouterr().out
    assert main([*args, "--positions", "1:4", "--out", str(tmp_path / "g3")]) == 2
    assert "leave out the last position" in capsys.readouterr().err


def test_default_positions_that_cannot_serve_name_each_sites_fit(study, tmp_path, capsys):
    """Sites whose fitted positions do not all hold the last one are named with their
    positions (the message spoke of an empty list, or of positions as if given); a site
    fitted at listed positions past a short prompt's end does not stop other positions."""
    folder, _ = study
    sites = ["blocks.0.hook_resid_pre@2,10,15", "blocks.1.hook_resid_pre@1:",
             "blocks.1.hook_resid_post@1:"]  # fmt: skip
    out = _fit(folder, tmp_path, "--sites", *sites)
    args = ["prompt-graph", str(out), "--prompt", "the cat sat o", "--details-rows", "0"]
    assert main(args) == 2
    assert "blocks.0.hook_resid_pre at [2, 10]" in capsys.readouterr().err
    assert main([*args, "--positions", "1:", "--out", str(tmp_path / "g")]) == 0
    assert "blocks.0.hook_resid_pre was fitted at positions [2, 10]" in capsys.readouterr().out


def test_the_check_sets_random_nodes_beside_the_top_ones(study, tmp_path, capsys):
    """The top nodes' change is set beside random sets of as many nodes at least as active
    (the summed first-order estimate it printed double-counted nodes on one path: −19.7
    against a joint first order of −8.7); each random set's change is recorded and agrees
    with setting those nodes by hand."""
    from tl_degeneracy.engine.basis_result import BasisResult
    from tl_degeneracy.engine.prompt_graph import Target
    from tl_degeneracy.engine.prompt_graph.interventions import intervene
    from tl_degeneracy.experiments.prompt_graph_ioi import random_nodes_like

    folder, out = study
    args = ["prompt-graph", str(out), "--prompt", PROMPT, "--details-rows", "0"]
    assert main([*args, "--out", str(tmp_path / "g")]) == 0
    assert "20 random sets of as many nodes at least as active" in capsys.readouterr().out
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    changes = summary["intervention"]["random_changes"]
    assert len(changes) == 20
    model = load_local(folder)
    graph = PromptGraph.load(tmp_path / "g" / "graph")
    top = graph.top_nodes(10, sign="supporting")
    draws, _ = random_nodes_like(graph, top, 20, torch.Generator().manual_seed(0))
    lib = BasisResult.load(out / "bases" / "lib", model=model)
    target = Target.logit_difference(summary["target"]["good"], summary["target"]["bad"])
    alone = intervene(model, lib, _tokens(model, PROMPT), target, draws[3], mode="mean")
    assert changes[3] == pytest.approx(alone.delta, abs=1e-5)


def test_out_never_replaces_a_study_or_other_files_and_leaves_nothing_stale(study, tmp_path):
    _, out = study
    args = ["prompt-graph", str(out), "--prompt", PROMPT, "--details-rows", "0"]
    assert main([*args, "--out", str(out)]) == 2
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main([*args, "--out", str(other)]) == 2
    again = tmp_path / "again"
    assert main([*args, "--corrupted", CORRUPTED, "--out", str(again)]) == 0
    assert (again / "patching.json").is_file()
    assert main([*args, "--out", str(again)]) == 0  # another run, without --corrupted
    assert not (again / "patching.json").exists() and not (again / "patching.html").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--compare-sites", "blocks.1.hook_resid_pre"], "add --corrupted"),
        (["--corrupted", CORRUPTED, "--compare-sites", "nonsense"], "--compare-sites: "),
        (["--corrupted", PROMPT], "--corrupted is the prompt itself"),
        (["--prompt", " "], "--prompt is empty"),
    ],
)
def test_requests_are_checked_before_the_graph_is_built(study, extra, message, capsys):
    _, out = study
    args = ["prompt-graph", str(out), "--prompt", PROMPT, "--details-rows", "0", *extra]
    assert main(args) == 2
    err = capsys.readouterr()
    assert message in err.err and "prompt:" not in err.out


def test_compare_sites_in_any_order_are_compared_in_forward_order(study, tmp_path):
    _, out = study
    sites = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre"]
    args = ["prompt-graph", str(out), "--prompt", PROMPT, "--details-rows", "0"]
    assert main([*args, "--corrupted", CORRUPTED, "--compare-sites", *sites,
                 "--out", str(tmp_path / "g")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert [s["site"] for s in summary["patching"]["sites"]] == sites[1::-1]
    assert summary["corrupted"] == CORRUPTED and len(summary["corrupted_tokens"]) == 14
    assert CORRUPTED in (tmp_path / "g" / "patching.html").read_text()


def test_token_ids_without_a_tokenizer_are_checked_against_the_vocabulary():
    from types import SimpleNamespace

    from tl_degeneracy.experiments.prompt_job import _token_id

    model = SimpleNamespace(cfg=SimpleNamespace(d_vocab=114))
    assert _token_id(model, "113", "--answer") == 113
    for bad in ("114", "-1"):
        with pytest.raises(ValueError, match="outside this model's vocabulary of 114 tokens"):
            _token_id(model, bad, "--answer")


@pytest.fixture(scope="module")
def modadd_study(tmp_path_factory):
    """A study of the package's modular-addition model (no tokenizer; sites after the first
    read at the last position only)."""
    out = tmp_path_factory.mktemp("modadd") / "study"
    args = ["fit", "--model", "modadd", "--edge-tokens", "0", "--ablation-tokens", "300"]
    assert main([*args, "--quiet", "--out", str(out)]) == 0
    return out


def test_a_task_model_by_token_ids_with_a_corrupted_prompt(modadd_study, tmp_path, capsys):
    """On modular addition the graph sits at the last position (where its later sites were
    fitted), the comparison with patching runs there (it crashed), and where fewer other nodes
    are as active as the top ones no random comparison is claimed (20 copies of one set were
    reported as 20 random sets); out-of-vocabulary ids are named by flag before any work."""
    args = ["prompt-graph", str(modadd_study), "--token-ids", "5 7 113", "--details-rows", "0"]
    assert main([*args, "--corrupted", "5 200 113"]) == 2
    err = capsys.readouterr()
    assert "--corrupted: token id 200" in err.err and "prompt:" not in err.out
    run = [*args, "--answer", "12", "--vs", "13", "--corrupted", "6 7 113"]
    assert main([*run, "--out", str(tmp_path / "g")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["positions"] == [2] and len(summary["patching"]["sites"]) == 3
    assert summary["intervention"]["random_changes"] == []  # 4 top nodes, 2 others as active
    shared = [n for n in summary["patching"]["nodes"] if n["site"] == "blocks.0.hook_resid_pre"]
    assert not shared  # the prompts agree there at the last position: no nodes to patch
    assert "fewer than 5 other nodes are at least as active" in printed
    assert main([*args, "--out", str(tmp_path / "g2")]) == 0  # 2 top nodes, 3 others
    changes = json.loads((tmp_path / "g2" / "summary.json").read_text())["intervention"]
    assert len(changes["random_changes"]) == len(set(changes["random_changes"])) == 3
    assert "3 random sets of as many nodes" in capsys.readouterr().out


def test_answers_by_id_and_composite_compare_sites(study, tmp_path, capsys):
    """Tokens may be named by id on a model with a tokenizer too (the same target as by
    text); an id outside the vocabulary and a composite site to compare are named by flag."""
    folder, out = study
    model = load_local(folder)
    good, bad = (model.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("x", "5"))
    args = ["prompt-graph", str(out), "--prompt", PROMPT, "--details-rows", "0"]
    by_id = ["--answer-id", str(good), "--vs-id", str(bad), "--out", str(tmp_path / "g")]
    assert main([*args, *by_id]) == 0
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert (summary["target"]["good"], summary["target"]["bad"]) == (good, bad)
    assert main([*args, "--answer-id", "100000"]) == 2
    assert "--answer-id 100000 is outside this model's vocabulary" in capsys.readouterr().err
    mlp = _fit(folder, tmp_path, "--mlp-sites", "1")
    site = ["--compare-sites", "blocks.1.mlp.hook_post", "--corrupted", CORRUPTED]
    assert main(["prompt-graph", str(mlp), "--prompt", PROMPT, "--details-rows", "0", *site]) == 2
    assert "a composite MLP or attention site" in capsys.readouterr().err
