"""The digits MLP replication: sites, the over-seeds summary, and (once the engine takes a
`HookedRootModule` with float inputs) a whole run on a small checkpoint, checked by identities
that hold for any model: all features kept or all edges kept give the unablated accuracy, and
PCA at the input keeps as many directions as the training images span."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn")

from tl_degeneracy import cli  # noqa: E402
from tl_degeneracy.experiments.replicate_mlp import (  # noqa: E402
    mlp_sites,
    plot_summary,
    replicate_checkpoint,
    report_markdown,
    summarise,
    summary_markdown,
)
from tl_degeneracy.models.digits import DigitsDataset, load_digits_model  # noqa: E402
from tl_degeneracy.models.digits.train import TrainConfig, save_result, train  # noqa: E402


def fake_run(base: float, k: int | None, edges: int | None) -> dict:
    """The fields of `replicate_checkpoint`'s result that the summary and report read."""
    kinds = {"lib": k, "pca": None if k is None else k + 2}
    return {
        "baseline_test_accuracy": base,
        "n_train": 1348,
        "n_test": 449,
        "node_tolerance": 0.01,
        "edge_tolerance": 0.001,
        "total_s": 1.0,
        "timings_s": {"fit": 0.5},
        "sites": {
            "hook_in": {
                kind: {"min_k": {"0.01": v, "0.001": v}, "retained": 61, "width": 64}
                for kind, v in kinds.items()
            }
        },
        "sections": {
            "hook_in->logits": {
                kind: {"edges_required": edges, "edges_for_99pct_weight": 7, "total_edges": 610}
                for kind in kinds
            }
        },
    }


def test_sites_are_the_cuts_in_forward_order():
    model, _ = load_digits_model(0)
    assert [s.name for s in mlp_sites(model)] == [
        "hook_in",
        "layers.0.hook_post",
        "layers.1.hook_post",
        "logits",
    ]


def test_summary_has_mean_and_sd_over_the_runs_that_met_the_criterion(tmp_path):
    runs = {"seed0": fake_run(0.97, 10, 100), "seed1": fake_run(0.95, 14, None)}
    runs["seed2"] = fake_run(0.96, None, 300)
    summary = summarise(runs)
    rows = summary["rows"]
    assert rows["baseline_test_accuracy"]["mean"] == pytest.approx(0.96)
    assert rows["baseline_test_accuracy"]["sd"] == pytest.approx(0.01)
    lib = rows["hook_in features needed lib"]
    assert lib["values"] == [10, 14, None] and lib["n"] == 2 and lib["mean"] == 12
    assert lib["sd"] == pytest.approx(2**0.5 * 2)
    assert rows["hook_in features needed pca"]["mean"] == 14
    edges = rows["hook_in->logits edges required lib"]
    assert edges["mean"] == 200 and edges["n"] == 2
    text = summary_markdown(summary)
    assert "| hook_in features needed lib | 10 | 14 | – | 12.0 ± 2.8 |" in text
    report = report_markdown(runs["seed0"], "seed0")
    assert "| `hook_in` | 64 | 61 | 10 (10) | 61 | 12 (12) |" in report
    assert "| `hook_in->logits` | 610 | 100 | 100 | 7 | 7 |" in report
    plot_summary(summary, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    data = DigitsDataset.load()
    result = train(TrainConfig(seed=1, hidden=(12, 10), epochs=3), data, log=lambda _: None)
    return save_result(result, tmp_path_factory.mktemp("digits") / "small")


def test_replicate_checkpoint_identities(small_checkpoint, tmp_path):
    result = replicate_checkpoint(small_checkpoint, tmp_path / "run", log=lambda _: None)
    base = result["baseline_test_accuracy"]
    data = DigitsDataset.load(dtype=torch.float64)
    centred = data.train_inputs - data.train_inputs.mean(0)
    assert result["sites"]["hook_in"]["pca"]["retained"] == torch.linalg.matrix_rank(centred)
    for site, entry in result["sites"].items():
        for kind in ("lib", "pca"):
            e = entry[kind]
            assert e["accuracy_by_k"][str(e["retained"])] == pytest.approx(base, abs=1e-12)
            assert e["min_k"]["0.01"] <= e["retained"], (site, kind)
    assert list(result["sections"]) and len(result["sections"]) == 3
    for sec in result["sections"].values():
        for e in sec.values():
            assert e["accuracy_by_n"][str(e["total_edges"])] == pytest.approx(base, abs=1e-12)
            assert 1 <= e["edges_required"] <= e["total_edges"]
    saved = json.loads((tmp_path / "run" / "replication.json").read_text())
    assert saved["sites"].keys() == result["sites"].keys()
    for name in ("report.md", "node_ablation.png", "edges_required.png", "graph_lib.png"):
        assert (tmp_path / "run" / name).is_file(), name


def test_cli_writes_the_summary(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "mlp"
    argv = ["replicate-mlp", str(small_checkpoint), "--out", str(out), "--jobs", "1"]
    assert cli.main(argv) == 0
    assert "features needed" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"] == ["small"] and (out / "small" / "report.md").is_file()
