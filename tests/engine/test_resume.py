"""A LIB fit killed with SIGKILL and restarted on its checkpoint folder ends with the result of
an uninterrupted run (stochastic M', same seed), and what checkpointing does not yet catch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support import random_tokens, tiny_config, tiny_model

from tl_degeneracy.engine import streaming
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.jacobians import JacobianConfig
from tl_degeneracy.models.files import load_model_file, save_model_file

API = available_apis()[0]
SITES = (
    "blocks.0.hook_resid_pre",
    "blocks.0.hook_resid_mid",
    "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_resid_mid",
    "blocks.1.hook_resid_post",
)
JAC = JacobianConfig(method="stochastic", n_sources=3, seed=11)

FIT = (
    textwrap.dedent(
        """
    import sys, time
    from safetensors.torch import load_file
    from tl_degeneracy.models.files import load_model_file
    from tl_degeneracy.engine.fit import LIBConfig, fit_basis
    from tl_degeneracy.engine.jacobians import JacobianConfig

    folder, ckpt, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    model = load_model_file(folder, api="API_NAME")
    if delay:  # slow every forward down so that the parent can kill us mid-pass
        model.add_hook("blocks.0.hook_resid_pre", lambda a, hook: time.sleep(delay),
                       is_permanent=True)
    tokens = load_file(folder + "/tokens.safetensors")["tokens"]
    config = LIBConfig(SITES, kind="lib", final_basis="pca",
                       jacobian=JacobianConfig(method="stochastic", n_sources=3, seed=11),
                       batch_size=2, checkpoint_dir=ckpt, checkpoint_every=1, progress=False)
    fit_basis(model, tokens, config).save(out)
    """
    )
    .replace("SITES", repr(SITES))
    .replace("API_NAME", API)
)


def _config(ckpt: Path | None, **kw) -> LIBConfig:
    jac = kw.pop("jacobian", JAC)
    return LIBConfig(
        SITES,
        kind="lib",
        final_basis="pca",
        jacobian=jac,
        batch_size=2,
        checkpoint_dir=None if ckpt is None else str(ckpt),
        checkpoint_every=1,
        progress=False,
        **kw,
    )


def _setup(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    model = tiny_model(API, "ln", seed=5, n_layers=2)
    tokens = random_tokens(model, 24, seed=6)  # 12 batches a pass
    folder = save_model_file(model, tiny_config("ln", n_layers=2), tmp_path / "model")
    save_file({"tokens": tokens}, str(folder / "tokens.safetensors"))
    (tmp_path / "fit.py").write_text(FIT)
    return folder, tokens


def _done(ckpt: Path, key: str) -> int:
    meta = ckpt / f"{key}.json"
    try:
        return int(json.loads(meta.read_text())["batches_done"])
    except (OSError, ValueError, KeyError):
        return 0


def _assert_same(a: BasisResult, b: BasisResult, exact: bool) -> None:
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-10, atol=1e-12)
    assert list(a.bases) == list(b.bases)
    for name in a.bases:
        for f in ("C", "C_pinv", "importance", "mean"):
            torch.testing.assert_close(getattr(a[name], f), getattr(b[name], f), **tol)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    folder, tokens = _setup(tmp_path)
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed"
    cmd = [sys.executable, str(tmp_path / "fit.py"), str(folder), str(ckpt), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "0.05"], env=env, stderr=subprocess.PIPE, text=True)
    # the M' pass of the second section (backwards) is mid-way: Gram and one section are done
    key = "jacobian.blocks.1.hook_resid_pre->blocks.1.hook_resid_mid"
    deadline = time.monotonic() + 300
    while _done(ckpt, key) < 4:
        assert proc.poll() is None, f"the fit ended before it was killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 4 <= _done(ckpt, key) < 12 and not out.exists()

    rerun = subprocess.run([*cmd, "0"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = BasisResult.load(out)

    model = load_model_file(folder, api=API)
    uninterrupted = fit_basis(model, tokens, _config(None))
    _assert_same(resumed, uninterrupted, exact=False)
    assert resumed.metadata["jacobian_errors"] == pytest.approx(
        uninterrupted.metadata["jacobian_errors"], rel=1e-9
    )


def test_crash_between_tensor_and_meta_write_does_not_double_count(tmp_path, monkeypatch):
    """A kill after the state file was replaced but before its batch count was: the resumed
    run must not fold the last batches in twice."""
    folder, tokens = _setup(tmp_path)
    model = load_model_file(folder, api=API)
    ckpt = tmp_path / "ckpt"
    real_replace = os.replace
    calls = {"n": 0}

    def crash_on_meta(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("gram.safetensors"):
            calls["n"] += 1
            if calls["n"] == 5:  # state of 5 batches written, count still says 4
                raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(streaming.os, "replace", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        fit_basis(model, tokens, _config(ckpt))
    monkeypatch.setattr(streaming.os, "replace", real_replace)
    resumed = fit_basis(model, tokens, _config(ckpt))
    _assert_same(resumed, fit_basis(model, tokens, _config(None)), exact=False)
    assert resumed.metadata["n_tokens"] == tokens.numel()


def test_stale_checkpoint_of_other_settings_is_refused(tmp_path):
    folder, tokens = _setup(tmp_path)
    model = load_model_file(folder, api=API)
    ckpt = tmp_path / "ckpt"
    fit_basis(model, tokens, _config(ckpt))
    other = JacobianConfig(method="stochastic", n_sources=5, seed=11)
    with pytest.raises(Exception, match="(?i)checkpoint"):
        fit_basis(model, tokens, _config(ckpt, jacobian=other))
