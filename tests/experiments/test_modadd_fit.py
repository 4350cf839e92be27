"""The modular-addition main job (experiments.modadd_fit)."""

from __future__ import annotations

from tl_degeneracy.experiments import modadd_fit


def test_progress_false_silences_every_bar(monkeypatch, capfd):
    """`fit-modadd --quiet` (progress=False) printed no fit bars but still one ablation bar per
    site: `node_ablation_curve` was called without `progress`."""
    seen: list[bool] = []
    real = modadd_fit.node_ablation_curve

    def spy(*args, **kwargs):
        seen.append(kwargs.get("progress", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(modadd_fit, "node_ablation_curve", spy)
    fit = modadd_fit.fit_modadd(kinds=("pca",), ks=[0], progress=False)
    assert fit.baseline_test_accuracy > 0.9
    assert seen and not any(seen)
    err = capfd.readouterr().err
    assert "ablation" not in err and "batch/s" not in err, err
