"""The job clock's ETA, and what a resumed pass says of itself."""

from __future__ import annotations

import time

import torch
from support import random_tokens, tiny_model

from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.engine.progress import JobClock
from tl_degeneracy.engine.streaming import Checkpointing

API = available_apis()[0]


def test_restored_items_do_not_shorten_the_eta():
    """Sections read back from a checkpoint take no time; counting them as done used to give
    an ETA of 0.6 s where 18 s were left."""
    lines: list[str] = []
    clock = JobClock(lines.append)
    clock.begin("M'")
    clock.step("M'", 1, 4, "a", restored=True)
    clock.step("M'", 2, 4, "b", restored=True)
    time.sleep(0.2)
    clock.step("M'", 3, 4, "c")  # one item computed here in 0.2 s: one more takes 0.2 s
    assert "(restored)" in lines[0] and "M' ETA ?" in lines[0]
    eta = float(lines[-1].split("M' ETA ")[1].rstrip("s"))
    assert 0.15 <= eta <= 0.5, lines[-1]


def test_a_resumed_fit_says_which_passes_it_read_back(tmp_path, capsys):
    from tl_degeneracy.engine.fit import LIBConfig, fit_basis
    from tl_degeneracy.engine.jacobians import JacobianConfig

    model = tiny_model(API, n_layers=2)
    tokens = random_tokens(model, 12)
    sites = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre")
    jac = JacobianConfig(method="stochastic", n_sources=2)
    config = LIBConfig(sites, jacobian=jac, batch_size=4, checkpoint_dir=str(tmp_path))
    lines: list[str] = []
    first = fit_basis(model, tokens, config, log=lines.append)
    assert not any("(restored)" in line for line in lines)
    capsys.readouterr()
    lines.clear()
    again = fit_basis(model, tokens, config, log=lines.append)  # every pass saved whole
    steps = [line for line in lines if line.startswith("[M' ")]
    assert len(steps) == 2 and all("(restored)" in line for line in steps)
    assert "resumed from its checkpoint at batch 3 of 3" in capsys.readouterr().err
    for name, b in first.bases.items():
        torch.testing.assert_close(again[name].C, b.C, rtol=0, atol=0)
    assert Checkpointing(tmp_path).every == 10
