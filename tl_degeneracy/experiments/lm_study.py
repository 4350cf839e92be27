"""LIB and PCA at every residual-stream cut of a language model, at scale (CPU, any token count).

Sites: `hook_resid_pre` and `hook_resid_mid` of every block, and the last block's
`hook_resid_post` as the final site (PCA basis). One forward pass per batch collects the Gram
statistics of all sites and, on a `HookedTransformer`, writes every section input to an
activation store on disk. Then, backwards from the final site, each section's stochastic `M'`
(Rademacher sources over output positions and units) is streamed by running *only that
block's attention or MLP* on the stored input, instead of the whole prefix of the model: the
prefix would cost half a forward per section, thirty forwards for SmolLM2's 60 sections. Edges
(method.md §5, stochastic over output positions) are streamed the same way on a slice of the
data, for the top output features of each section, in LIB and in PCA coordinates.

Memory does not grow with the number of tokens (statistics are O(d²) per site, batches are
streamed, the store lives on disk and each site's part is deleted once used). Every pass is
checkpointed and resumable, and shards over `torch.distributed` ranks (see `distributed`).
Without a store (a `TransformerBridge`, or `cache_activations=False`) the core accumulators
run the model from the tokens for every section; both paths give the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis, Truncation, interaction_basis, pca_basis
from tl_degeneracy.engine.compat import (
    StopForward,
    frozen_parameters,
    is_bridge,
    model_cfg,
    model_identity,
)
from tl_degeneracy.engine.distributed import (
    DistContext,
    merge_gram_states,
    stream_sharded,
    sum_states,
)
from tl_degeneracy.engine.edges import EdgeConfig, SectionEdges, _EdgeAccumulator
from tl_degeneracy.engine.jacobians import (
    JacobianConfig,
    JacobianGram,
    _JacobianAccumulator,
    output_readout,
    stochastic_cotangents,
    vjp_batches,
)
from tl_degeneracy.engine.result import BasisResult, build_metadata
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Positions, Site, validate_sites
from tl_degeneracy.engine.statistics import (
    GramStatistics,
    add_to_statistics,
    capture_sites,
    check_finite,
)
from tl_degeneracy.engine.streaming import Checkpointing, batch_generator, chunks, iter_batches

Log = Callable[[str], None]


def lm_sites(
    n_layers: int, n_blocks: int | None = None, positions: Positions = "all"
) -> list[Site]:
    """`resid_pre` and `resid_mid` of the first `n_blocks` blocks (all by default), then the
    last of those blocks' `resid_post` (the final site)."""
    n = n_layers if n_blocks is None else min(n_blocks, n_layers)
    hooks = [f"blocks.{b}.hook_resid_{s}" for b in range(n) for s in ("pre", "mid")]
    return [Site(h, positions) for h in [*hooks, f"blocks.{n - 1}.hook_resid_post"]]


@dataclass(frozen=True)
class LMFitConfig:
    """Settings of the language-model job. The defaults are the `fit-lm` demo (~10 min on
    two free cores; see docs/language_models.md)."""

    n_tokens: int = 2048
    """Training tokens for the Gram statistics and `M'` (whole rows of `seq_len`)."""
    seq_len: int = 128
    n_sources: int = 4
    """Rademacher sources per data point for `M'`."""
    batch_rows: int = 8
    """Sequences per batch (the unit of streaming, checkpointing and sharding)."""
    n_blocks: int | None = None
    """Use only the first `n_blocks` blocks (None: all)."""
    kinds: tuple[Literal["lib", "pca"], ...] = ("lib", "pca")
    truncation: Truncation = field(default_factory=lambda: Truncation(1e-15, 1e-10))
    """Relative cut-off 1e-10: float32 activations leave rounding-level directions that
    whitening would amplify (method.md §2)."""
    edge_tokens: int = 128
    """Tokens (first rows of the data) for the edges; 0 skips edges."""
    edge_outputs: int = 16
    """Edges into the top `edge_outputs` output features of each section (each output feature
    costs one backward pass per batch)."""
    edge_sources: int = 1
    ablation_tokens: int = 256
    """Held-out tokens for node-ablation curves; 0 skips them."""
    ablation_sites: tuple[str, ...] = (
        "blocks.5.hook_resid_mid",
        "blocks.15.hook_resid_mid",
        "blocks.25.hook_resid_mid",
    )
    ablation_ks: tuple[int, ...] = (0, 4, 16, 64, 128, 256, 384, 512, 576)
    skip_first_position: bool = False
    """Leave position 0 (the BOS token, whose massive activation dominates every spectrum) out
    of every site; it keeps its value on the data. Sections then run on the whole prefix."""
    seed: int = 0
    cache_activations: bool = True
    """Stream section inputs from a disk store (HookedTransformer only) instead of
    re-running the model's prefix for every section."""
    checkpoint_every: int = 4
    api: Literal["auto", "hooked", "bridge"] = "auto"
    progress: bool = True

    def jacobian(self) -> JacobianConfig:
        return JacobianConfig(method="stochastic", n_sources=self.n_sources, seed=self.seed)

    def edges(self) -> EdgeConfig:
        return EdgeConfig(method="stochastic", n_sources=self.edge_sources, seed=self.seed)


@dataclass
class LMFit:
    """Bases, edges, ablation curves and timings of one job."""

    config: LMFitConfig
    bases: dict[str, BasisResult]
    edges: dict[str, dict[str, SectionEdges]]
    """{kind: {section name: edges}} (top `edge_outputs` output features)."""
    curves: dict[str, dict[str, Any]]
    """{site: {kind: AblationCurve}}"""
    timings: dict[str, float]
    n_tokens: int
    jacobian_errors: dict[str, float]
    used_store: bool = False
    """Whether sections ran block-local on stored activations (else on the whole prefix)."""


# ---------------------------------------------------------------------------------------------
# Activation store and block-local sections
# ---------------------------------------------------------------------------------------------


class ActivationStore:
    """Site activations per batch on disk (model dtype, one safetensors file per batch)."""

    def __init__(self, root: str | Path, batch_rows: int):
        self.root, self.batch_rows = Path(root), batch_rows

    def _path(self, site: Site, batch_index: int) -> Path:
        return self.root / site.name / f"{batch_index:07d}.safetensors"

    def write(self, site: Site, batch_index: int, act: Tensor) -> None:
        path = self._path(site, batch_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"act": act.detach().contiguous()}, str(tmp))
        tmp.replace(path)

    def read(
        self, site: Site, batch_index: int, model: nn.Module, tokens: Int[Tensor, "batch pos"]
    ) -> Tensor:
        """The activation of `tokens`, the first rows of stored batch `batch_index`; when a
        resumed run finds the batch missing, the model's (stored if it is the whole batch)."""
        path = self._path(site, batch_index)
        if path.exists():
            act = load_file(str(path))["act"]
            return act if act.shape[0] == tokens.shape[0] else act[: tokens.shape[0]]
        with torch.no_grad():
            (act,) = capture_sites(model, tokens, [site], batch_index)
        if tokens.shape[0] == self.batch_rows:
            self.write(site, batch_index, act)
        return act

    def drop(self, site: Site) -> None:
        shutil.rmtree(self.root / site.name, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def block_local_supported(model: nn.Module, section: Section) -> bool:
    """True where `section` is one block's attention (resid_pre → resid_mid) or MLP
    (resid_mid → resid_post) of a pre-norm `HookedTransformer`, on all positions."""
    if is_bridge(model):
        return False
    cfg = model.cfg
    tokenizer = getattr(model, "tokenizer", None)
    if (
        getattr(cfg, "parallel_attn_mlp", False)
        or getattr(cfg, "attn_only", False)
        or getattr(cfg, "use_hook_mlp_in", False)
        or getattr(cfg, "use_attn_in", False)
        or getattr(cfg, "use_split_qkv_input", False)
        or getattr(cfg, "positional_embedding_type", "standard") == "shortformer"
        or str(getattr(cfg, "original_architecture", "")).startswith("Olmo")
        or (tokenizer is not None and getattr(tokenizer, "padding_side", "right") == "left")
        or section.inp.positions != "all"
        or section.out.positions != "all"
    ):
        return False
    inp, out = section.inp.hook, section.out.hook
    if not inp.startswith("blocks.") or not out.startswith("blocks."):
        return False
    b_in, b_out = int(inp.split(".")[1]), int(out.split(".")[1])
    kinds = (inp.rsplit("_", 1)[-1], out.rsplit("_", 1)[-1])
    # resid_post of block b is resid_pre of block b + 1: the MLP section has two names
    return (b_out == b_in and kinds in {("pre", "mid"), ("mid", "post")}) or (
        b_out == b_in + 1 and kinds == ("mid", "pre")
    )


def block_local_output(
    model: nn.Module, section: Section, x: Float[Tensor, "batch pos d"]
) -> Float[Tensor, "batch pos d"]:
    """The section's output from its input, running only the block's attention or MLP
    (see `block_local_supported` for the sections this covers)."""
    block_index = int(section.inp.hook.split(".")[1])
    hooked: Any = model  # blocks and hooks() are attributes of either API, not of nn.Module
    block = hooked.blocks[block_index]
    if section.inp.hook.endswith("hook_resid_mid"):
        return block.hook_resid_post(x + block.apply_mlp(block.ln2(x)))
    store: dict[str, Tensor] = {}

    def read(act: Tensor, hook=None) -> None:
        store["y"] = act
        raise StopForward

    with hooked.hooks(fwd_hooks=[(f"blocks.{block_index}.hook_resid_mid", read)]):
        try:
            block(x)
        except StopForward:
            pass
    return store["y"]


class _StoreGram:
    """Gram statistics of all sites; writes each section input to the store."""

    def __init__(self, model: nn.Module, sites: list[Site], store: ActivationStore | None):
        self.model, self.sites, self.store = model, sites, store
        self.stats = GramStatistics(sites)

    def update(self, batch_index: int, tokens: Tensor) -> None:
        acts = capture_sites(self.model, tokens, self.sites, batch_index, check=False)
        add_to_statistics(self.stats, self.sites, acts, batch_index)
        if self.store is not None:
            for site, act in zip(self.sites[:-1], acts[:-1]):
                self.store.write(site, batch_index, act)

    def state_dict(self) -> dict[str, Tensor]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.stats.load_state_dict(state)


class _StoreJacobian(_JacobianAccumulator):
    """Stochastic `M'` from stored section inputs, block-local (same draws as the core path:
    sources are seeded by (seed, section, batch index))."""

    def __init__(self, model, section, out_basis, config, store: ActivationStore):
        super().__init__(model, section, out_basis, config)
        self.store = store

    def update(self, batch_index: int, tokens: Tensor) -> None:
        cfg = self.config
        act = self.store.read(self.section.inp, batch_index, self.model, tokens)
        with torch.enable_grad(), frozen_parameters(self.model):
            x = act.clone().requires_grad_(True)
            y = block_local_output(self.model, self.section, x)
        check_finite(y.detach(), self.section.out, batch_index)
        readout = output_readout(self.out_basis, y.shape[-1], y.dtype)
        gen = batch_generator(cfg.seed, self.section.name, batch_index)
        cots = stochastic_cotangents(
            readout, y.shape[0], y.shape[1], cfg.n_sources, cfg.sources_over, gen, cfg.chunk_size
        )
        d_in = x.shape[-1]
        m = torch.zeros(d_in, d_in, dtype=torch.float64)
        for g, w in vjp_batches(x, y, cots):
            flat = g.reshape(-1, d_in).to(torch.float64)
            m += w * (flat.T @ flat)
        self._add(batch_index, m, x.shape[0] * x.shape[1])


class _StoreEdges(_EdgeAccumulator):
    """Stochastic edges (plain gradient, α = 1) from stored section inputs, block-local."""

    def __init__(self, model, section, basis_in, basis_out, config, store: ActivationStore):
        super().__init__(model, section, basis_in, basis_out, config)
        self.store = store

    def update(self, batch_index: int, tokens: Tensor) -> None:
        cfg = self.config
        b_in, b_out = self.basis_in, self.basis_out
        act = self.store.read(self.section.inp, batch_index, self.model, tokens)
        feats = b_in.features(act)  # [B, P_in, k_in]
        with torch.enable_grad(), frozen_parameters(self.model):
            x = act.clone().requires_grad_(True)
            y = block_local_output(self.model, self.section, x)
        batch, t_out = y.shape[:2]
        readout = b_out.C.T.to(y.dtype)  # [k_out, d_out]
        k_out = readout.shape[0]
        gen = batch_generator(cfg.seed, "edges", self.section.name, batch_index)
        signs = (
            torch.randint(0, 2, (cfg.n_sources, k_out, batch, t_out), generator=gen) * 2 - 1
        ).to(readout.dtype)
        units = [(r, i) for r in range(cfg.n_sources) for i in range(k_out)]
        c_pinv_t = b_in.C_pinv.T
        for sl in chunks(len(units), cfg.chunk_size):
            part = units[sl]
            rs = torch.tensor([r for r, _ in part])
            out_idx = torch.tensor([i for _, i in part])
            v = signs[rs, out_idx][..., None] * readout[out_idx][:, None, None, :]
            (g,) = torch.autograd.grad(y, x, v, is_grads_batched=True, retain_graph=True)
            g = g.to(torch.float64)  # [c, B, P_in, d_in]
            attr = ((g @ c_pinv_t) * feats).sum(2)
            attr_mean = (g @ b_in.mean).sum(2)
            self.edges.index_add_(0, out_idx, attr.pow(2).sum(1) / cfg.n_sources)
            self.mean_edges.index_add_(0, out_idx, attr_mean.pow(2).sum(1) / cfg.n_sources)
        self.count += batch * feats.shape[1]


def top_outputs(basis: SiteBasis, k: int) -> SiteBasis:
    """The basis restricted to its `k` most important features (for edges into them)."""
    k = min(k, basis.k)
    return replace(
        basis, C=basis.C[:, :k], C_pinv=basis.C_pinv[:k], importance=basis.importance[:k]
    )


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


class JobClock:
    """Elapsed time and ETA per phase, logged once per pass."""

    def __init__(self, log: Log):
        self.log, self.start = log, time.perf_counter()
        self.phase_start: dict[str, float] = {}
        self.timings: dict[str, float] = {}

    def begin(self, phase: str) -> None:
        self.phase_start[phase] = time.perf_counter()

    def step(self, phase: str, done: int, total: int, what: str) -> None:
        spent = time.perf_counter() - self.phase_start[phase]
        eta = spent / done * (total - done) if done else float("nan")
        self.log(
            f"[{phase} {done}/{total}] {what}  elapsed {_fmt(time.perf_counter() - self.start)}"
            f", {phase} ETA {_fmt(eta)}"
        )

    def end(self, phase: str) -> float:
        spent = time.perf_counter() - self.phase_start[phase]
        self.timings[f"{phase}_s"] = spent
        return spent


def _fmt(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _key(text: str) -> str:
    """A checkpoint key that fits in a file name (sites with position lists have long names)."""
    if len(text) <= 150:
        return text
    return f"{text[:80]}~{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _fingerprint(config: LMFitConfig, model: nn.Module, tokens: Tensor, sites: list[Site]) -> str:
    h = hashlib.sha256()
    fields = {k: v for k, v in asdict(config).items() if k not in ("progress", "ablation_ks")}
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    h.update(json.dumps(model_identity(model), sort_keys=True, default=str).encode())
    h.update(json.dumps([s.name for s in sites]).encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()[:20]


def _claim_checkpoint(folder: Path, fingerprint: str, ctx: DistContext) -> None:
    """Refuse to resume a checkpoint folder written for other settings, model or data."""
    stamp = folder / "fingerprint.json"
    if stamp.exists():
        saved = json.loads(stamp.read_text()).get("fingerprint")
        if saved != fingerprint:
            raise RuntimeError(
                f"{folder} holds checkpoints of a different job (settings, model or tokens "
                f"differ: {saved} vs {fingerprint}); use another --out or delete {folder}"
            )
        return
    ctx.barrier()
    if ctx.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"fingerprint": fingerprint}))
    ctx.barrier()


def fit_lm(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    config: LMFitConfig,
    work_dir: str | Path | None = None,
    heldout: Int[Tensor, "m pos"] | None = None,
    ctx: DistContext | None = None,
    log: Log = print,
) -> LMFit:
    """Fit `config.kinds` at `lm_sites`, stream edges on a slice and ablate on `heldout`.

    `work_dir` holds checkpoints and the activation store (resume by calling again with the
    same folder); None computes in memory with a temporary store.
    """
    import tempfile

    ctx = ctx or DistContext()
    positions: Positions = tuple(range(1, tokens.shape[1])) if config.skip_first_position else "all"
    n_layers = model_cfg(model).n_layers
    sites = validate_sites(model, lm_sites(n_layers, config.n_blocks, positions))
    batches = iter_batches(tokens, config.batch_rows)
    tmp_root = None
    if work_dir is None:
        tmp_root = tempfile.mkdtemp(prefix="tl_degeneracy_lm_")
        root, ckpt = Path(tmp_root), None
    else:
        root = Path(work_dir)
        _claim_checkpoint(root / "checkpoints", _fingerprint(config, model, tokens, sites), ctx)
        ckpt = Checkpointing(root / "checkpoints", config.checkpoint_every)
    use_store = config.cache_activations and all(
        block_local_supported(model, Section(a, b)) for a, b in zip(sites, sites[1:])
    )
    store = (
        ActivationStore(root / "activations" / f"rank{ctx.rank}", config.batch_rows)
        if use_store
        else None
    )
    clock = JobClock(log)
    log(
        "sections run block-local on an activation store"
        if use_store
        else "sections run the model from the tokens (no activation store)"
    )
    progress = config.progress and ctx.is_main
    try:
        with torch.no_grad():
            clock.begin("statistics")
            acc = _StoreGram(model, sites, store)
            states = stream_sharded(acc, batches, "Gram statistics", ctx, ckpt, "gram", progress)
            stats = merge_gram_states(states, GramStatistics(sites))
            clock.step("statistics", 1, 1, f"{len(sites)} sites, {stats.count} tokens")
            clock.end("statistics")
        bases, jerrors = _fit_bases(model, batches, sites, stats, config, store, ckpt, ctx, clock)
        edges = _all_edges(model, batches, bases, config, store, ckpt, ctx, clock)
        if store is not None:  # kept after a failure: a resumed run reads it
            store.clear()
            if not ctx.active:  # ranks may share the folder: leave the parent to them
                shutil.rmtree(root / "activations", ignore_errors=True)
    finally:
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)
    curves: dict[str, dict[str, Any]] = {}
    if heldout is not None and config.ablation_tokens > 0 and ctx.is_main:
        curves = _ablation_curves(model, heldout, bases, config, clock)
    return LMFit(config, bases, edges, curves, clock.timings, stats.count, jerrors, use_store)


def _fit_bases(model, batches, sites, stats, config, store, ckpt, ctx, clock):
    final = sites[-1]
    pca = {s.name: pca_basis(s, stats[s].mean, stats[s].gram, config.truncation) for s in sites}
    out: dict[str, BasisResult] = {}
    meta = dict(
        n_tokens=stats.count,
        truncation=config.truncation,
        final_basis="pca",
        job="fit-lm",
    )
    if "pca" in config.kinds:
        out["pca"] = BasisResult(pca, build_metadata(model, sites, kind="pca", **meta))
    jerrors: dict[str, float] = {}
    if "lib" not in config.kinds:
        return out, jerrors
    lib: dict[str, SiteBasis] = {final.name: pca[final.name]}
    jcfg = config.jacobian()
    clock.begin("M'")
    n_sections = len(sites) - 1
    for done, index in enumerate(range(len(sites) - 2, -1, -1), start=1):
        site, nxt = sites[index], sites[index + 1]
        section = Section(site, nxt)
        c_out = lib[nxt.name].C
        if store is not None:
            acc = _StoreJacobian(model, section, c_out, jcfg, store)
        else:
            acc = _JacobianAccumulator(model, section, c_out, jcfg)
        states = stream_sharded(
            acc,
            batches,
            f"M' {section.name}",
            ctx,
            ckpt,
            _key(f"jacobian.{section.name}"),
            config.progress and ctx.is_main,
        )
        merged = _JacobianAccumulator(model, section, c_out, jcfg)
        merged.load_state_dict(sum_states([s for s in states if s]))
        jg: JacobianGram = merged.finalize()
        jerrors[site.name] = jg.split_half_rel_error
        st = stats[site]
        lib[site.name] = interaction_basis(site, st.mean, st.gram, jg.matrix, config.truncation)
        clock.step(
            "M'",
            done,
            n_sections,
            f"{section.name}: kept {lib[site.name].k}, split-half error {jerrors[site.name]:.3f}",
        )
    clock.end("M'")
    ordered = {s.name: lib[s.name] for s in sites}
    out["lib"] = BasisResult(
        ordered,
        build_metadata(
            model,
            sites,
            kind="lib",
            jacobian=jcfg,
            jacobian_methods={k: "stochastic" for k in jerrors},
            jacobian_errors=jerrors,
            **meta,
        ),
    )
    return out, jerrors


def _all_edges(model, batches, bases, config, store, ckpt, ctx, clock):
    edges: dict[str, dict[str, SectionEdges]] = {}
    if config.edge_tokens <= 0:
        return edges
    # the first rows of the data: batch i of this slice is a prefix of stored batch i
    rows = -(-config.edge_tokens // batches[0].shape[1])
    edge_batches = iter_batches(torch.cat(batches)[:rows], config.batch_rows)
    ecfg = config.edges()
    kinds = [k for k in ("lib", "pca") if k in bases]
    clock.begin("edges")
    total = sum(len(bases[k].bases) - 1 for k in kinds)
    done = 0
    for kind in kinds:
        result = bases[kind]
        names = list(result.bases)
        edges[kind] = {}
        for a, b in zip(names[::-1][1:], names[::-1][:-1]):  # backwards, like the store
            b_in, b_out = result.bases[a], top_outputs(result.bases[b], config.edge_outputs)
            section = Section(b_in.site, b_out.site)
            if store is not None:
                acc = _StoreEdges(model, section, b_in, b_out, ecfg, store)
            else:
                acc = _EdgeAccumulator(model, section, b_in, b_out, ecfg)
            states = stream_sharded(
                acc,
                edge_batches,
                f"edges {kind} {section.name}",
                ctx,
                ckpt,
                _key(f"edges.{kind}.{section.name}"),
                config.progress and ctx.is_main,
            )
            merged = sum_states([s for s in states if s])
            count = int(merged["count"][0])
            edges[kind][section.name] = SectionEdges(
                section,
                merged["edges"] / count,
                merged["mean_edges"] / count,
                count,
                f"stochastic-top{b_out.k}",
            )
            done += 1
            clock.step("edges", done, total, f"{kind} {section.name}")
    clock.end("edges")
    return edges


def _ablation_curves(model, heldout, bases, config, clock):
    from tl_degeneracy.engine.ablation import next_token_loss, node_ablation_curve

    rows = max(1, config.ablation_tokens // heldout.shape[1])
    data = heldout[:rows]
    curves: dict[str, dict[str, Any]] = {}
    by_hook = {b.site.hook: name for name, b in next(iter(bases.values())).bases.items()}
    sites = [by_hook[s] for s in config.ablation_sites if s in by_hook]
    clock.begin("ablation")
    for n, site in enumerate(sites, start=1):
        curves[site] = {}
        for kind, result in bases.items():
            basis = result.bases[site]
            ks = sorted({min(k, basis.k) for k in config.ablation_ks})
            curves[site][kind] = node_ablation_curve(
                model,
                {site: basis},
                site,
                data,
                next_token_loss,
                ks,
                batch_size=config.batch_rows,
                higher_is_better=False,
            )
        clock.step("ablation", n, len(sites), site)
    clock.end("ablation")
    return curves


# ---------------------------------------------------------------------------------------------
# Artifacts and the command-line job
# ---------------------------------------------------------------------------------------------


def write_lm_fit(fit: LMFit, out: str | Path) -> Path:
    """Write bases (`lib/`, `pca/`), edges, curves, `summary.json` and `report.html`."""
    from tl_degeneracy.experiments.lm_report import lm_report, lm_summary

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for kind, result in fit.bases.items():
        result.save(out / kind)
    for kind, sections in fit.edges.items():
        tensors = {}
        for name, se in sections.items():
            tensors[f"{name}/edges"] = se.edges.contiguous()
            tensors[f"{name}/mean_edges"] = se.mean_edges.contiguous()
        save_file(tensors, str(out / f"edges_{kind}.safetensors"))
    summary = lm_summary(fit)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lm_report(fit, summary).save(out / "report.html")
    return out


def run_lm_fit(
    config: LMFitConfig,
    out: str | Path,
    ctx: DistContext | None = None,
    log: Log = print,
    threads: int | None = None,
) -> LMFit:
    """Load SmolLM2 and the corpus, fit, write to `out` (rank 0). Resumes from `out`."""
    from tl_degeneracy.models import load_corpus, load_smollm2

    ctx = ctx or DistContext()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_smollm2(api=config.api)
    tokens = load_corpus(model.tokenizer, config.seq_len, "train", max_tokens=config.n_tokens)
    heldout = load_corpus(model.tokenizer, config.seq_len, "heldout")
    log(
        f"{model.cfg.model_name}: {type(model).__name__}, {torch.get_num_threads()} threads, "
        f"{tokens.numel()} tokens ({tokens.shape[0]} rows of {tokens.shape[1]}), "
        f"R = {config.n_sources}, rank {ctx.rank}/{ctx.world_size}; "
        f"loaded in {time.perf_counter() - start:.1f} s"
    )
    fit = fit_lm(model, tokens, config, out, heldout, ctx, log)
    fit.timings["load_s"] = time.perf_counter() - start - sum(fit.timings.values())
    fit.timings["total_s"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    fit.timings["cpu_total_s"] = usage.ru_utime + usage.ru_stime
    if ctx.is_main:
        write_lm_fit(fit, out)
        shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)
    ctx.barrier()
    return fit


def summary_lines(fit: LMFit, sites: Sequence[str] | None = None) -> list[str]:
    """A few lines for the terminal."""
    lines = [f"tokens {fit.n_tokens}, total {fit.timings.get('total_s', 0):.0f} s"]
    for kind, sections in fit.edges.items():
        n99 = [s.edges_for_fraction(0.99) for s in sections.values()]
        if n99:
            lines.append(
                f"{kind}: median edges for 99% of the weight {sorted(n99)[len(n99) // 2]} "
                f"(of {next(iter(sections.values())).total_edges} per section)"
            )
    for site, by_kind in fit.curves.items():
        parts = []
        for kind, curve in by_kind.items():
            parts.append(f"{kind} min k (0.05 nats) {curve.min_k(0.05)}")
        lines.append(
            f"{site}: baseline loss {next(iter(by_kind.values())).baseline:.3f}; "
            + "; ".join(parts)
        )
    return lines
