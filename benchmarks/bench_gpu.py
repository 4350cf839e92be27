"""Throughput on a GPU (needs CUDA): a SmolLM2-135M-shaped model (30 Llama blocks, d_model 576,
9 query / 3 key-value heads, gated SiLU MLP of 1,536, RMSNorm, rotary, vocabulary 49,152) in
float32 and bfloat16, side by side:

- the plain forward (to the logits) in tokens/s;
- Gram statistics at all 61 residual sites (float64 on the GPU), tokens/s and the ratio to the
  forward (target ≤ 1.3);
- the whole LIB fit (statistics + stochastic `M'` with R = 4 sources at all 60 sections,
  block-local on an in-GPU activation store + bases) over `--tokens` tokens, seconds (target:
  100,000 tokens in under 2 minutes).

    python benchmarks/bench_gpu.py [--tokens 100000] [--seq-len 128] [--batch-rows 64]

The weights are random (the packaged SmolLM2 GGUF cannot travel to the GPU machine here):
throughput does not depend on their values. Wall-clock seconds with `torch.cuda.synchronize`,
medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tl_degeneracy.engine.compat import build_model, move_model
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.jacobians import JacobianConfig
from tl_degeneracy.engine.sites import residual_sites
from tl_degeneracy.engine.statistics import collect_statistics

SMOLLM2_SHAPE = dict(
    d_model=576,
    d_head=64,
    n_heads=9,
    n_key_value_heads=3,
    d_mlp=1536,
    n_layers=30,
    n_ctx=2048,
    d_vocab=49152,
    act_fn="silu",
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_dim=64,
    gated_mlp=True,
    final_rms=True,
    eps=1e-5,
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds of `fn()` (synchronised) and its last result."""
    times, out = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def study_phase(model, tokens: torch.Tensor, args: argparse.Namespace) -> None:
    """The whole study (`experiments.study.run_study`) with two MLP sites, phase by phase."""
    from tl_degeneracy.experiments.study import StudyConfig, run_study

    sites = residual_sites(model, positions="1:", mlp=(5, 15))
    config = StudyConfig(
        batch_rows=args.batch_rows,
        edge_tokens=min(8192, tokens.numel()),
        ablation_tokens=4096,
        progress=False,
    )
    held = tokens[-max(1, 4096 // tokens.shape[1]) :]
    sync()
    start = time.perf_counter()
    study = run_study(model, sites, tokens, config, heldout=held, log=lambda s: None)
    sync()
    total = time.perf_counter() - start
    phases = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in study.timings.items())
    print(f"study of {tokens.numel()} tokens, {len(sites)} sites: {total:.1f} s ({phases})")
    for site, by_kind in study.curves.items():
        ks = {kind: c.min_k(0.05) for kind, c in by_kind.items()}
        print(f"  {site}: baseline loss {next(iter(by_kind.values())).baseline:.3f}, min k {ks}")


def bench_dtype(name: str, tokens: torch.Tensor, args: argparse.Namespace, study: bool) -> None:
    """Forward, Gram statistics and the LIB fit of the model in dtype `name`."""
    torch.manual_seed(0)
    dtype = getattr(torch, name)
    model = move_model(build_model(SMOLLM2_SHAPE, api="hooked", dtype=dtype), args.device)
    sites = residual_sites(model, positions="1:")
    batches = tokens.to(args.device).split(args.batch_rows)

    @torch.no_grad()
    def forward() -> None:
        for b in batches:
            model(b)

    def gram() -> object:
        return collect_statistics(
            model, sites, tokens, args.batch_rows, progress=False, device=args.device
        )

    config = LIBConfig(
        tuple(sites),
        kind="lib",
        final_basis="pca",
        jacobian=JacobianConfig(method="stochastic", n_sources=4),
        batch_size=args.batch_rows,
        progress=False,
    )
    forward()  # warm-up
    t_fwd, _ = timed(forward, args.repeats)
    t_gram, _ = timed(gram, args.repeats)
    t_fit, lib = timed(lambda: fit_basis(model, tokens, config), 1)
    n = tokens.numel()
    for phase, t in (
        ("plain forward", t_fwd),
        ("Gram statistics, 61 sites", t_gram),
        ("LIB fit (stats + M' R=4 + bases)", t_fit),
    ):
        print(f"{name:9s} {phase:34s} {t:9.2f} {n / t:12.0f} {t / t_fwd:10.2f}")
    kept = [b.k for b in lib.bases.values()]  # type: ignore[attr-defined]
    print(f"{name:9s} kept features per site: min {min(kept)}, max {max(kept)}")
    if study and args.study_tokens > 0:
        study_phase(model, tokens[: max(1, args.study_tokens // args.seq_len)], args)
    if args.device == "cuda":
        print(f"{name:9s} peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-rows", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test)")
    p.add_argument(
        "--study-tokens",
        type=int,
        default=32768,
        help="tokens for the whole study (LIB and PCA, MLP sites of blocks 5 and 15, edges, "
        "node ablation) on the first dtype; 0 skips it",
    )
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --device cpu for a smoke test)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(name, f"torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    rows = args.tokens // args.seq_len
    tokens = torch.randint(0, SMOLLM2_SHAPE["d_vocab"], (rows, args.seq_len), generator=gen)
    print(f"{tokens.numel()} tokens ({rows} rows of {args.seq_len}), batch {args.batch_rows} rows")
    header = f"{'dtype':9s} {'phase':34s} {'seconds':>9s} {'tokens/s':>12s} {'vs forward':>10s}"
    print(header)
    for name in args.dtypes:
        bench_dtype(name, tokens, args, study=name == args.dtypes[0])
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
