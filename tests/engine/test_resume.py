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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support import random_tokens, tiny_config, tiny_model

from tl_degeneracy.engine import store as store_module
from tl_degeneracy.engine import streaming
from tl_degeneracy.engine.bases import Truncation
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import available_apis, build_model
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.jacobians import JacobianConfig
from tl_degeneracy.engine.sites import Site
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
STORE_SITES = (  # on both APIs, every section but 0.resid_post -> 1.attn.hook_z reads the store
    "blocks.0.hook_resid_pre",
    "blocks.0.hook_resid_mid",
    "blocks.0.mlp.hook_post",
    "blocks.0.hook_resid_post",
    "blocks.1.attn.hook_z",
    "blocks.1.hook_resid_mid",
    "blocks.1.hook_resid_post",
    "logits",
)
STORED = 6 * 12
"""Store files of a full Gram pass over STORE_SITES: six section inputs, 12 batches."""

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
    if delay:  # slow every pass through block 1 down so that the parent can kill us mid-pass
        model.add_hook("blocks.1.hook_resid_pre", lambda a, hook: time.sleep(delay),
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


def _config(ckpt: Path | None, sites: tuple[str, ...] = SITES, **kw) -> LIBConfig:
    jac = kw.pop("jacobian", JAC)
    return LIBConfig(
        sites,
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


def test_an_interrupted_run_does_not_resume_in_another_dtype(tmp_path):
    """float32 weights read the same in float64, so the weight digest alone let a float32
    run's half-done Gram be resumed as float64 (a mix of both precisions); the model's dtype
    is part of the stamp."""
    folder, tokens = _setup(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    single, double = (
        build_model({**config, "dtype": None}, weights, api=API, dtype=dtype)
        for dtype in (torch.float32, torch.float64)
    )
    ckpt = tmp_path / "ckpt"
    _interrupted_fit(single, tokens, _config(ckpt), at=2)
    with pytest.raises(ValueError, match=r"model_dtype: \"torch.float32\" -> \"torch.float64\""):
        fit_basis(double, tokens, _config(ckpt))


def test_a_finished_folder_keeps_its_stamp_and_refuses_other_settings(tmp_path):
    """After a run, its checkpoints go but its stamp stays: the same settings run again into
    the folder, other settings are refused by name instead of writing beside its results."""
    folder, tokens = _setup(tmp_path)
    model = load_model_file(folder, api=API)
    ckpt = tmp_path / "ckpt"
    first = fit_basis(model, tokens, _config(ckpt))
    streaming.finish_checkpoint_folder(ckpt)
    assert [p.name for p in ckpt.iterdir()] == ["fingerprint.json"]
    again = fit_basis(model, tokens, _config(ckpt))
    for name, basis in first.bases.items():
        torch.testing.assert_close(again[name].importance, basis.importance, rtol=1e-12, atol=0)
    other = JacobianConfig(method="stochastic", n_sources=5, seed=12)
    with pytest.raises(streaming.CheckpointMismatchError, match="n_sources: 3 -> 5") as refused:
        fit_basis(model, tokens, _config(ckpt, jacobian=other))
    assert [d[0] for d in refused.value.differences] == [
        "settings.jacobian.n_sources",
        "settings.jacobian.seed",
    ]
    # a caller's labels go to the longest labelled prefix of each setting
    labels = {"settings.jacobian": "--sources", "settings.jacobian.seed": "--seed"}
    text = str(refused.value.labelled(labels))
    assert "settings.jacobian.n_sources (--sources): 3 -> 5" in text
    assert "settings.jacobian.seed (--seed): " in text


class _Interrupt(Exception):
    """Stands for a crash at a chosen forward."""


def _interrupt_at(n: int, exc: Callable[[], None]) -> Callable:
    """A hook that calls `exc` (which raises) at the `n`-th forward through it."""
    calls = {"n": 0}

    def hook(act, hook):
        calls["n"] += 1
        if calls["n"] == n:
            exc()

    return hook


def _crash() -> None:
    raise _Interrupt()


def _interrupted_fit(model, tokens, config: LIBConfig, at: int, exc=_crash) -> None:
    """Run `config` until the `at`-th forward at the first site, where it is interrupted.
    The counter is a global module hook, not a hook on the model: one there would make the
    fit run the model's own modules in place of its closed forms (docs/concepts.md), and the
    interrupted run would be another computation than the resumed one."""
    point, interrupt = model.hook_dict[SITES[0]], _interrupt_at(at, exc)

    def counter(module, args, output):
        if module is point:
            interrupt(output, None)

    handle = torch.nn.modules.module.register_module_forward_hook(counter)
    try:
        with pytest.raises((_Interrupt, KeyboardInterrupt)):
            fit_basis(model, tokens, config)
    finally:
        handle.remove()


def test_same_bytes_in_other_shapes_or_batches_are_refused(tmp_path):
    """The data digest covers every batch's shape: a [24, 4] run interrupted in the Gram pass
    is not resumed on the same token stream as [48, 2] (it would count 112 tokens of 96), nor
    on the same rows split into other batches (the M' passes would skip rows)."""
    model = tiny_model(API, "ln", seed=5, n_layers=2)
    tokens = random_tokens(model, 24, seed=6)
    ckpt = tmp_path / "ckpt"
    _interrupted_fit(model, tokens, _config(ckpt), at=6)
    with pytest.raises(ValueError, match=r"data\.batches: \"12 x \[2, 4\] int64\" -> \"24 x"):
        fit_basis(model, tokens.reshape(48, 2), _config(ckpt))

    # items of more than batch_size rows are split into batch_size rows, so the boundaries
    # move with the first item: [1], [2] x 11, [1] against [2] x 12
    batches = [tokens[:1], tokens[1:]]
    ckpt = tmp_path / "ckpt_batches"
    _interrupted_fit(model, batches, _config(ckpt), at=2)
    moved = [tokens[:2], tokens[2:]]
    with pytest.raises(
        ValueError, match=r"1 x \[1, 4\] int64, 11 x \[2, 4\] int64, 1 x \[1, 4\] int64\" -> \"12 x"
    ):
        fit_basis(model, moved, _config(ckpt))
    assert streaming.data_digest(batches) != streaming.data_digest(moved)
    assert streaming.data_digest(tokens.split(2)) != streaming.data_digest(tokens.int().split(2))


def _old_format_stamp(model, tokens: torch.Tensor, config: LIBConfig) -> dict:
    """`fingerprint.json` as tl_degeneracy wrote it before the digest covered batch shapes
    (no "format"; `data_sha256` hashed the concatenated bytes)."""
    import hashlib

    from tl_degeneracy.engine.artifacts import jsonable
    from tl_degeneracy.engine.identity import model_identity
    from tl_degeneracy.engine.sites import validate_sites

    skip = ("checkpoint_dir", "progress", "store")
    settings = {k: v for k, v in vars(config).items() if k not in skip}
    data = hashlib.sha256()
    for batch in tokens.split(config.batch_size):
        data.update(batch.contiguous().numpy().tobytes())
    record = {
        "settings": jsonable(settings),
        "sites": [s.to_json() for s in validate_sites(model, config.sites)],
        "model": {k: v for k, v in model_identity(model).items() if k != "api"},
        "data_sha256": data.hexdigest(),
    }
    text = json.dumps(record, sort_keys=True, default=str)
    return {"fingerprint": hashlib.sha256(text.encode()).hexdigest()[:20], "settings": record}


def test_folder_of_the_old_data_digest_is_refused(tmp_path):
    """A folder stamped before the digest covered shapes cannot be checked against the data
    (the same bytes in other shapes matched it): refused, saying why and what to do."""
    model = tiny_model(API, "ln", seed=5, n_layers=2)
    tokens = random_tokens(model, 24, seed=6)
    ckpt = tmp_path / "ckpt"
    _interrupted_fit(model, tokens, _config(ckpt), at=6)
    (ckpt / "fingerprint.json").write_text(
        json.dumps(_old_format_stamp(model, tokens, _config(ckpt)))
    )
    with pytest.raises(
        ValueError, match=r"older tl_degeneracy.*use another folder \(another --out"
    ):
        fit_basis(model, tokens.reshape(48, 2), _config(ckpt))


def test_refusal_names_what_differs_and_checkpoint_every_may_change(tmp_path):
    """A refused resume names each differing setting with both values and the way out; how
    often a run checkpoints does not change its result, so a resume may change it and still
    ends with the uninterrupted run's bases."""
    model = tiny_model(API, "ln", seed=5, n_layers=2)
    tokens = random_tokens(model, 24, seed=6)
    ckpt = tmp_path / "ckpt"
    _interrupted_fit(model, tokens, _config(ckpt), at=16)  # in the first Generic M' pass
    other = JacobianConfig(method="stochastic", n_sources=5, seed=11)
    with pytest.raises(ValueError) as refused:
        fit_basis(model, tokens, _config(ckpt, jacobian=other, truncation=Truncation(1e-9, 1e-12)))
    text = str(refused.value)
    assert "settings.jacobian.n_sources: 3 -> 5" in text
    assert "settings.truncation.absolute: 1e-15 -> 1e-09" in text
    assert (
        "use another folder (another --out on the command line)" in text
        and "that run's settings" in text
    )
    assert "data." not in text and "model." not in text  # only what differs

    resumed = fit_basis(model, tokens, replace(_config(ckpt), checkpoint_every=5))
    _assert_same(resumed, fit_basis(model, tokens, _config(None)), exact=True)
    assert resumed.metadata["n_tokens"] == tokens.numel()


def _store_files(ckpt: Path) -> list[Path]:
    return sorted((ckpt / "activations").rglob("*.safetensors"))


@pytest.fixture(autouse=True)
def _ctrl_c_raises():
    """Python's own SIGINT handler (KeyboardInterrupt) for every test here: a process started
    in the background (CI without a terminal, `nohup`) inherits SIGINT ignored, and a raised
    SIGINT would then do nothing."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_keeps_the_disk_store_for_the_resumed_run(tmp_path, monkeypatch):
    """SIGINT (Ctrl-C) during an M' pass leaves the disk store in the checkpoint folder; the
    resumed run reads every section input back from it (no forward to reach a section) and
    ends with the uninterrupted result; a completed run removes the store."""
    model = tiny_model(API, "mlp", seed=5, n_layers=2)
    tokens = random_tokens(model, 24, seed=6)
    ckpt = tmp_path / "ckpt"
    config = _config(ckpt, STORE_SITES, store="disk")

    def ctrl_c() -> None:
        signal.raise_signal(signal.SIGINT)

    # 12 forwards fill the Gram pass (and the store); the 16th is in the M' pass of the one
    # section that runs from the tokens, after three that read the store
    _interrupted_fit(model, tokens, config, at=16, exc=ctrl_c)
    assert (ckpt / "gram.safetensors").exists() and not (
        ckpt / "jacobian.blocks.0.mlp.hook_post->blocks.0.hook_resid_post.json"
    ).exists()
    kept = _store_files(ckpt)
    assert len(kept) == STORED, "Ctrl-C deleted the activation store of the checkpoint folder"

    forwards = {"n": 0}
    real_capture = store_module.capture_sites

    def counting_capture(*args, **kwargs):
        forwards["n"] += 1
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(store_module, "capture_sites", counting_capture)
    resumed = fit_basis(model, tokens, config)
    assert forwards["n"] == 0, f"{forwards['n']} section inputs recomputed, not read back"
    assert _store_files(ckpt) == [], "a completed run leaves its store behind"
    monkeypatch.undo()
    uninterrupted = fit_basis(model, tokens, _config(None, STORE_SITES, store="disk"))
    _assert_same(resumed, uninterrupted, exact=False)


def test_partial_or_short_store_is_never_used_wrongly(tmp_path):
    """An interruption in the Gram pass leaves a store of the first batches only: the resumed
    run fills in the rest and is right. A stored entry with fewer rows than the batch asked
    for (left by other data) is recomputed, not returned short."""
    model = tiny_model(API, "mlp", seed=5, n_layers=2)
    tokens = random_tokens(model, 24, seed=6)
    ckpt = tmp_path / "ckpt"
    config = _config(ckpt, STORE_SITES, store="disk")
    _interrupted_fit(model, tokens, config, at=6, exc=lambda: signal.raise_signal(signal.SIGINT))
    assert 0 < len(_store_files(ckpt)) < STORED
    resumed = fit_basis(model, tokens, config)
    _assert_same(resumed, fit_basis(model, tokens, _config(None, STORE_SITES)), exact=False)

    site = Site(SITES[1])
    store = store_module.ActivationStore(tmp_path / "store", batch_rows=2)
    source = store_module.ActivationSource(model, store)
    (full,) = store_module.capture_sites(model, tokens[:2], [site], 0, all_positions=True)
    store.write(site, 0, full[:1])
    act = source.activation(site, 0, tokens[:2])
    torch.testing.assert_close(act, full, rtol=0, atol=0)


def test_a_checkpoint_of_other_data_or_another_basis_is_refused_not_returned(tmp_path):
    """`collect_statistics`, `jacobian_gram` and `interaction_graph` keep their state under
    fixed keys; a second call into the same folder with other tokens (or another basis) used
    to load the first call's finished state and return its numbers as its own. Each state now
    carries what it is of, and another call is refused by name; the same call resumes."""
    from tl_degeneracy import Checkpointing, collect_statistics, interaction_graph
    from tl_degeneracy.engine.jacobians import jacobian_gram
    from tl_degeneracy.engine.sections import Section

    model = tiny_model(API, n_layers=2)
    a, b = random_tokens(model, 16, seed=1), random_tokens(model, 16, seed=2)
    sites = SITES[:3]
    ck = Checkpointing(tmp_path / "stats", every=1)
    first = collect_statistics(model, sites, a, batch_size=4, checkpoint=ck, progress=False)
    again = collect_statistics(model, sites, a, batch_size=4, checkpoint=ck, progress=False)
    torch.testing.assert_close(again[sites[1]].gram, first[sites[1]].gram, rtol=0, atol=0)
    with pytest.raises(streaming.CheckpointMismatchError, match=r"(?s)state 'gram'.*data.sha256"):
        collect_statistics(model, sites, b, batch_size=4, checkpoint=ck, progress=False)

    section = Section(Site(sites[0]), Site(sites[1]))
    jck = Checkpointing(tmp_path / "jacobian", every=1)
    jacobian_gram(model, a, section, config=JAC, batch_size=4, checkpoint=jck, progress=False)
    with pytest.raises(streaming.CheckpointMismatchError, match=r"config.n_sources: 3 -> 4"):
        other = replace(JAC, n_sources=4)
        jacobian_gram(model, a, section, config=other, batch_size=4, checkpoint=jck, progress=False)

    lib_a = fit_basis(model, a, _config(None, sites))
    lib_b = fit_basis(model, b, _config(None, sites))
    gck = Checkpointing(tmp_path / "edges", every=1)
    graph = interaction_graph(model, a, lib_a, batch_size=4, progress=False, checkpoint=gck)
    same = interaction_graph(model, a, lib_a, batch_size=4, progress=False, checkpoint=gck)
    for name, se in graph.sections.items():
        torch.testing.assert_close(same.sections[name].edges, se.edges, rtol=0, atol=0)
    with pytest.raises(streaming.CheckpointMismatchError, match=r"basis_in: "):
        interaction_graph(model, a, lib_b, batch_size=4, progress=False, checkpoint=gck)


def test_rounded_digests_ignore_rounding_and_see_changes():
    x = torch.randn(50, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert streaming.rounded_digest(x) == streaming.rounded_digest(x * (1 + 1e-15))
    assert streaming.rounded_digest(x) != streaming.rounded_digest(x * (1 + 1e-6))
    assert streaming.rounded_digest(x) != streaming.rounded_digest(x.T.contiguous())


# -- damaged checkpoints: refused by name, never resumed into wrong numbers --------------------

JAC_KEY = "jacobian"
"""The state of the M' pass under way after 16 forwards (2 or 3 of its 12 batches done; which
section's depends on the API's structures, `_state_under_way`)."""


def _state_under_way(ckpt: Path, key: str) -> str:
    """`key`, or for `JAC_KEY` the M' state with the fewest batches done."""
    if key != JAC_KEY:
        return key

    def done(file: Path) -> int:
        with safe_open(str(file), "pt") as f:
            return int((f.metadata() or {})["batches_done"])

    return min(ckpt.glob(f"{JAC_KEY}.*.safetensors"), key=done).stem


def _damaged_fit(tmp_path: Path, at: int, key: str, change: Callable[[dict, dict], None]):
    """A fit interrupted at the `at`-th forward, its state `key` rewritten by `change(tensors,
    header)`; returns the refusal of resuming it (and asserts that it is refused)."""
    model = tiny_model(API, "ln", seed=5, n_layers=2)
    tokens = random_tokens(model, 24, seed=6)
    ckpt = tmp_path / "ckpt"
    _interrupted_fit(model, tokens, _config(ckpt), at=at)
    file = ckpt / f"{_state_under_way(ckpt, key)}.safetensors"
    tensors = load_file(str(file))
    with safe_open(str(file), "pt") as f:
        header = dict(f.metadata())
    change(tensors, header)
    save_file(tensors, str(file), metadata=header)
    try:
        result = fit_basis(model, tokens, _config(ckpt))
    except Exception as error:  # asserted below: the refusal, not any failure
        refused = error
    else:
        n = result.metadata["n_tokens"]
        pytest.fail(f"a damaged checkpoint was resumed: {n} tokens counted of {tokens.numel()}")
    assert isinstance(refused, streaming.CheckpointDamagedError), repr(refused)
    assert f"checkpoint file {file} is damaged" in str(refused)
    assert "run again without resuming" in str(refused)
    return refused


@pytest.mark.parametrize(
    ("key", "at", "done"),
    [
        ("gram", 6, "-5"),  # read as 5 from the end: batches folded in twice
        ("gram", 6, "99"),  # read as finished: a Gram of 5 batches of 12
        ("gram", 6, "3"),  # a count of 5 batches' tokens: batches 3 and 4 folded in twice
        ("gram", 6, "abc"),
        ("gram", 6, "1.5"),
        (JAC_KEY, 16, "999"),  # an M' pass of 2 batches taken as all 12
    ],
)
def test_a_batch_count_out_of_range_is_refused(tmp_path, key, at, done):
    """`batches_done` of a state file is a whole number from 0 to the pass's batches, and no
    fewer than its token counts need: a negative count used to resume from the end (every
    batch counted twice), one past the end to return a part of the pass as the whole."""

    def change(tensors: dict, header: dict) -> None:
        header["batches_done"] = done

    refused = _damaged_fit(tmp_path, at, key, change)
    assert "batches_done" in str(refused) or "tokens" in str(refused)


def _gram_m2(tensors: dict) -> str:
    return next(k for k in tensors if k.endswith("/m2"))


@pytest.mark.parametrize(
    ("key", "at", "damage"),
    [
        ("gram", 16, lambda t: t.update({_gram_m2(t): t[_gram_m2(t)].long()})),  # rounded
        ("gram", 6, lambda t: t.update({_gram_m2(t): t[_gram_m2(t)][:1, :1].clone()})),
        ("gram", 6, lambda t: t[_gram_m2(t)].fill_(float("nan"))),
        (JAC_KEY, 16, lambda t: t.update(total=torch.zeros(4, 4, dtype=torch.float64))),
        (JAC_KEY, 16, lambda t: t.pop("count")),
    ],
    ids=["int64", "shape", "nan", "jacobian-shape", "no-count"],
)
def test_a_state_of_another_dtype_or_shape_is_refused(tmp_path, key, at, damage):
    """A saved state's tensors are the accumulator's: float64 sums of its shapes, finite, and
    its counts. An int64 Gram used to be resumed (and rounded); other shapes failed somewhere
    later with a bare RuntimeError or KeyError."""
    refused = _damaged_fit(tmp_path, at, key, lambda tensors, header: damage(tensors))
    assert "tensor" in str(refused) or "state" in str(refused)


def _pickle_bomb(marker: Path) -> object:
    """An object whose unpickling creates `marker`: a state file must never be unpickled."""

    class Bomb:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    return Bomb()


def _huge_shape(file: Path) -> None:
    """Declare a 100000 x 100000 tensor in the header without its bytes."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [100000, 100000]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


@pytest.mark.parametrize("damage", ["truncated", "empty", "pickled", "huge-shape", "fingerprint"])
def test_an_unreadable_state_file_is_refused_by_name(tmp_path, damage):
    """A truncated, empty or pickled state file, one whose header declares more than it holds
    or whose fingerprint is not JSON, used to end the run with a bare SafetensorError or
    JSONDecodeError that did not name the file; it is never unpickled."""
    model = tiny_model(API, "ln", seed=5, n_layers=2)
    tokens = random_tokens(model, 24, seed=6)
    ckpt = tmp_path / "ckpt"
    _interrupted_fit(model, tokens, _config(ckpt), at=6)
    file, marker = ckpt / "gram.safetensors", tmp_path / "unpickled"
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "pickled":
        torch.save({"x": _pickle_bomb(marker)}, file)
    elif damage == "huge-shape":
        _huge_shape(file)
    else:
        save_file(load_file(str(file)), str(file), metadata={"fingerprint": "{not json"})
    with pytest.raises(streaming.CheckpointDamagedError, match=f"checkpoint file {file} is"):
        fit_basis(model, tokens, _config(ckpt))
    assert not marker.exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"'])
def test_a_damaged_stamp_is_refused_by_name(tmp_path, text):
    """A `fingerprint.json` that is not a JSON object used to raise a bare JSONDecodeError or
    AttributeError; it is refused, naming the file and the way out."""
    model = tiny_model(API, "ln", seed=5, n_layers=2)
    tokens = random_tokens(model, 24, seed=6)
    ckpt = tmp_path / "ckpt"
    _interrupted_fit(model, tokens, _config(ckpt), at=6)
    stamp = ckpt / "fingerprint.json"
    stamp.write_text(text)
    with pytest.raises(streaming.CheckpointDamagedError, match="use another folder") as refused:
        fit_basis(model, tokens, _config(ckpt))
    assert f"checkpoint file {stamp} is damaged" in str(refused.value)


def test_a_damaged_file_is_refused_like_a_mismatch():
    """The command line shows a `CheckpointMismatchError` as one line (exit 2) after labelling
    its settings; a damaged file is one and names no settings."""
    error = streaming.CheckpointDamagedError("/x/gram.safetensors", "it is truncated")
    assert isinstance(error, streaming.CheckpointMismatchError)
    assert error.labelled({"settings": "--flag"}) is error
    assert str(error).startswith("checkpoint file /x/gram.safetensors is damaged: it is")


@pytest.mark.parametrize("damage", ["truncated", "pickled", "no-act", "width", "dtype"])
def test_a_damaged_stored_activation_is_refused_by_name(tmp_path, damage):
    """A batch file of the activation store that is truncated, pickled, lacks its tensor or
    holds another width or dtype than its site's other batches used to fail with a bare
    SafetensorError, KeyError or RuntimeError deep in a section's forward."""
    model = tiny_model(API, "mlp", seed=5, n_layers=2)
    tokens = random_tokens(model, 24, seed=6)
    ckpt = tmp_path / "ckpt"
    config = _config(ckpt, STORE_SITES, store="disk")
    _interrupted_fit(model, tokens, config, at=16, exc=lambda: signal.raise_signal(signal.SIGINT))
    firsts = sorted((ckpt / "activations").glob("*/0000000.safetensors"))
    assert firsts, "the interrupted run left no store"
    marker = tmp_path / "unpickled"
    for file in firsts:  # batch 0 of every stored site: the resumed run reads one of them
        act = load_file(str(file))["act"]
        if damage == "truncated":
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])
        elif damage == "pickled":
            torch.save({"act": _pickle_bomb(marker)}, file)
        elif damage == "no-act":
            save_file({"other": act}, str(file))
        elif damage == "width":
            save_file({"act": act[..., :5].contiguous()}, str(file))
        else:
            save_file({"act": act.float()}, str(file))
    with pytest.raises(streaming.CheckpointDamagedError) as refused:
        fit_basis(model, tokens, config)
    text = str(refused.value)
    assert any(f"checkpoint file {file} is damaged" in text for file in firsts), text
    assert "computed again from the model" in text
    assert not marker.exists()
