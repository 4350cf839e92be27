"""Two processes (torchrun, gloo on localhost) give the statistics of one process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import random_tokens, tiny_config, tiny_model

from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.engine.distributed import DistContext, sum_states
from tl_degeneracy.engine.jacobians import JacobianConfig, jacobian_gram
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import collect_statistics
from tl_degeneracy.models.files import load_model_file, save_model_file

API = available_apis()[0]

SITES = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"]
SECTION = Section(Site("blocks.0.hook_resid_pre"), Site("blocks.0.hook_resid_mid"))
STOCHASTIC = JacobianConfig(method="stochastic", n_sources=3, seed=5)
LM_SETTINGS = dict(
    n_sources=2,
    batch_rows=5,
    edge_tokens=40,
    edge_outputs=3,
    ablation_tokens=0,
    seed=1,
    progress=False,
    checkpoint_every=1,
)

WORKER = (
    textwrap.dedent(
        """
    import sys
    from safetensors.torch import load_file, save_file
    from tl_degeneracy.engine.distributed import DistContext
    from tl_degeneracy.engine.jacobians import JacobianConfig, jacobian_gram
    from tl_degeneracy.engine.statistics import collect_statistics
    from tl_degeneracy.models.files import load_model_file
    from tl_degeneracy.engine.sections import Section
    from tl_degeneracy.engine.sites import Site

    folder, out = sys.argv[1], sys.argv[2]
    ctx = DistContext.from_env(backend="gloo")
    assert ctx.world_size == 2, ctx
    model = load_model_file(folder, api="API_NAME")
    tokens = load_file(folder + "/tokens.safetensors")["tokens"]
    sites = SITES_LIST
    stats = collect_statistics(model, sites, tokens, batch_size=5, progress=False, ctx=ctx)
    section = Section(Site(sites[0]), Site(sites[1]))
    cfg = JacobianConfig(method="stochastic", n_sources=3, seed=5)
    jg = jacobian_gram(model, tokens, section, None, cfg, batch_size=5, progress=False, ctx=ctx)
    state = {**stats.state_dict(), "M/total": jg.total, "M/halves": jg.halves}
    save_file(state, f"{out}/rank{ctx.rank}.safetensors")

    # the whole LM job, every pass sharded (block-local sections on per-rank stores)
    from tl_degeneracy.experiments.lm_study import LMFitConfig, fit_lm
    lm_model = load_model_file(folder + "/ln", api="API_NAME")
    lm = fit_lm(lm_model, tokens[:, :4], LMFitConfig(**LM_CONFIG), out + f"/work{ctx.world_size}",
                ctx=ctx, log=lambda s: None)
    save_file({f"{k}/{n}": b.C.clone() for k in lm.bases for n, b in lm.bases[k].bases.items()}
              | {f"edges/{n}": e.edges for n, e in lm.edges["lib"].items()},
              f"{out}/lm_rank{ctx.rank}.safetensors")
    """
    )
    .replace("SITES_LIST", repr(SITES))
    .replace("API_NAME", API)
    .replace("LM_CONFIG", "LM_SETTINGS")
)


def _single_process(model, tokens):
    stats = collect_statistics(model, SITES, tokens, batch_size=5, progress=False)
    jg = jacobian_gram(model, tokens, SECTION, None, STOCHASTIC, batch_size=5, progress=False)
    return stats, jg


def test_two_processes_equal_one(tmp_path):
    model = tiny_model(API, "mlp", seed=3)
    tokens = random_tokens(model, 23, seed=4)  # 5 batches: rank 0 gets 3, rank 1 gets 2
    save_model_file(model, tiny_config("mlp"), tmp_path / "model")
    save_file({"tokens": tokens}, str(tmp_path / "model" / "tokens.safetensors"))
    save_model_file(
        tiny_model(API, "ln", seed=8, n_layers=2),
        tiny_config("ln", n_layers=2),
        tmp_path / "model" / "ln",
    )
    (tmp_path / "worker.py").write_text(WORKER.replace("LM_SETTINGS", repr(LM_SETTINGS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(tmp_path / "worker.py"),
        str(tmp_path / "model"),
        str(tmp_path),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    stats, jg = _single_process(model, tokens)
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        for site in SITES:
            assert int(got[f"{site}/count"][0]) == stats[site].count == 23 * 4
            torch.testing.assert_close(got[f"{site}/mean"], stats[site].mean, rtol=1e-12, atol=0)
            torch.testing.assert_close(got[f"{site}/m2"], stats[site].m2, rtol=1e-12, atol=1e-13)
        # stochastic sources are seeded by the global batch index: the same draws as one process
        torch.testing.assert_close(got["M/total"], jg.total, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(got["M/halves"], jg.halves, rtol=1e-12, atol=1e-13)

    from tl_degeneracy.experiments.lm_study import LMFitConfig, fit_lm

    lm_model = load_model_file(tmp_path / "model" / "ln", API)
    one = fit_lm(lm_model, tokens[:, :4], LMFitConfig(**LM_SETTINGS), None, log=lambda s: None)
    # the two processes' folder is not one process's: each rank checkpointed its own shard, and
    # a run of another process count used to start over silently (then delete them)
    from tl_degeneracy.engine.streaming import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match=r"world_size: 2 -> \(absent\)"):
        fit_lm(lm_model, tokens[:, :4], LMFitConfig(**LM_SETTINGS), tmp_path / "work2")
    got = load_file(str(tmp_path / "lm_rank1.safetensors"))
    assert one.used_store == (API == "hooked")
    for kind, result in one.bases.items():
        for name, b in result.bases.items():
            c = got[f"{kind}/{name}"]
            # one sign per feature (bases._signed): the same C, not only up to sign
            torch.testing.assert_close(c, b.C, rtol=1e-8, atol=1e-10)
    for name, e in one.edges["lib"].items():
        torch.testing.assert_close(got[f"edges/{name}"], e.edges, rtol=1e-8, atol=1e-12)


def test_sharding_is_strided_and_complete():
    shards = [DistContext(r, 3).shard(8) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert sorted(sum(shards, [])) == list(range(8))
    assert DistContext(3, 4).shard(2) == []


def test_sum_states_treats_missing_keys_as_zero():
    a = {"count": torch.tensor([2]), "total": torch.ones(2, 2)}
    b = {"count": torch.tensor([3])}
    out = sum_states([a, b])
    assert int(out["count"][0]) == 5
    torch.testing.assert_close(out["total"], torch.ones(2, 2))


def test_running_the_module_as_a_command_says_what_to_run():
    """`python -m tl_degeneracy.engine.distributed ...` (old docs) used to exit 0 having
    done nothing; it now fails naming the command to run under torchrun."""
    run = subprocess.run(
        [sys.executable, "-m", "tl_degeneracy.engine.distributed", "statistics"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "tl-degeneracy) fit" in run.stderr
