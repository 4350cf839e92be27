"""Throughput of the LIB pipeline on SmolLM2-135M (held-out Wikipedia), side by side.

    python benchmarks/bench_lm.py [--tokens 512] [--repeats 3] [--threads N] [--out FILE]

Rows (tokens per second of wall-clock and of process CPU time, medians over repeats):
plain forward (to the logits, and stopped at the final site); Gram statistics at all 61 sites;
the whole LIB fit (statistics + M' at all 60 sections, block-local on an activation store) with
R = 1, 4, 16; one section's M' block-local vs re-running the model prefix (the core path);
one section's edges; and the relative error of stochastic vs exact M' on a small slice.
The machine is shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tl_degeneracy.engine.edges import EdgeConfig
from tl_degeneracy.engine.jacobians import JacobianConfig, jacobian_gram
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site, residual_sites
from tl_degeneracy.engine.statistics import capture_sites, collect_statistics
from tl_degeneracy.engine.store import ActivationSource, ActivationStore
from tl_degeneracy.engine.streaming import iter_batches
from tl_degeneracy.engine.structures import autograd_only, structure_of
from tl_degeneracy.experiments.lm_report import relative_error
from tl_degeneracy.experiments.lm_study import LMFitConfig, fit_lm
from tl_degeneracy.models import load_corpus, load_smollm2


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(fn: Callable[[], object], n_tokens: int, repeats: int) -> dict:
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {
        "tokens": n_tokens,
        "wall_s": wall,
        "cpu_s": cpu,
        "tok_per_s": n_tokens / wall,
        "tok_per_cpu_s": n_tokens / cpu,
        "walls": walls,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=512, help="tokens per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-rows", type=int, default=4)
    p.add_argument("--fit-sources", type=int, nargs="*", default=[1, 4, 16])
    p.add_argument("--exact-tokens", type=int, default=16, help="positions of the exact slice")
    p.add_argument("--skip", nargs="*", default=[], help="rows to skip: fit, exact, edges")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model = load_smollm2(api="hooked")
    heldout = load_corpus(model.tokenizer, 128, "heldout")
    rows = max(1, args.tokens // 128)
    tokens = heldout[:rows]
    n = tokens.numel()
    sites = residual_sites(model)
    batches = iter_batches(tokens, args.batch_rows)
    res: dict[str, dict] = {}
    print(f"{n} tokens, {torch.get_num_threads()} threads, load average {load_before}")

    @torch.no_grad()
    def forward() -> None:
        for b in batches:
            model(b)

    @torch.no_grad()
    def forward_to_final_site() -> None:
        for b in batches:
            capture_sites(model, b, sites[-1:])

    @torch.no_grad()
    def capture_all() -> None:
        for b in batches:
            capture_sites(model, b, sites)

    def gram() -> None:
        collect_statistics(model, sites, tokens, args.batch_rows, progress=False)

    res["forward (logits)"] = measure(forward, n, args.repeats)
    res["forward to final site"] = measure(forward_to_final_site, n, args.repeats)
    res["capture 61 sites (no Gram)"] = measure(capture_all, n, args.repeats)
    res["Gram statistics, 61 sites"] = measure(gram, n, args.repeats)

    # One section's M': block-local on stored inputs vs the core path (prefix re-run).
    section = Section(Site("blocks.15.hook_resid_pre"), Site("blocks.15.hook_resid_mid"))
    jcfg = JacobianConfig(method="stochastic", n_sources=4, seed=0)
    store = ActivationStore(
        Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_lm_{os.getpid()}", args.batch_rows
    )
    with torch.no_grad():
        for i, b in enumerate(batches):
            (act,) = capture_sites(model, b, [section.inp])
            store.write(section.inp, i, act)

    def section_store() -> None:
        source = ActivationSource(model, store)
        acc = structure_of(model, section).jacobian_accumulator(None, jcfg, source)
        for i, b in enumerate(batches):
            acc.update(i, b)

    def section_prefix() -> None:
        with autograd_only():
            acc = structure_of(model, section).jacobian_accumulator(
                None, jcfg, ActivationSource(model)
            )
            for i, b in enumerate(batches):
                acc.update(i, b)

    res["M' one section R=4, block-local"] = measure(section_store, n, args.repeats)
    res["M' one section R=4, prefix re-run"] = measure(section_prefix, n, args.repeats)

    if "edges" not in args.skip:
        stats = collect_statistics(model, [section.inp, section.out], tokens, 4, progress=False)
        from tl_degeneracy.engine.bases import pca_basis

        b_in = pca_basis(section.inp, stats[section.inp].mean, stats[section.inp].gram)
        b_out = pca_basis(section.out, stats[section.out].mean, stats[section.out].gram)

        def edges() -> None:
            source = ActivationSource(model, store)
            acc = structure_of(model, section).edge_accumulator(
                b_in, b_out.truncated(16), EdgeConfig("stochastic"), source
            )
            for i, b in enumerate(batches):
                acc.update(i, b)

        res["edges one section, top 16 outputs"] = measure(edges, n, 1)
    store.clear()

    if "fit" not in args.skip:
        for r in args.fit_sources:
            cfg = LMFitConfig(
                n_sources=r,
                skip_bos=False,
                batch_rows=args.batch_rows,
                edge_tokens=0,
                ablation_tokens=0,
                progress=False,
                kinds=("lib",),
            )
            res[f"LIB fit, all 60 sections, R={r}"] = measure(
                lambda cfg=cfg: fit_lm(model, tokens, cfg, log=lambda s: None), n, 1
            )

    errors: dict[str, list[float]] = {}
    if "exact" not in args.skip:
        mlp = Section(Site("blocks.15.hook_resid_mid"), Site("blocks.16.hook_resid_pre"))
        small = heldout[:2, : args.exact_tokens]
        t0 = time.perf_counter()
        exact = jacobian_gram(
            model,
            small,
            mlp,
            None,
            JacobianConfig(method="exact", chunk_size=64),
            2,
            None,
            progress=False,
        ).matrix
        exact_s = time.perf_counter() - t0
        for r in (1, 4, 16):
            errs = []
            for seed in range(3):
                est = jacobian_gram(
                    model,
                    small,
                    mlp,
                    None,
                    JacobianConfig(method="stochastic", n_sources=r, seed=seed),
                    2,
                    None,
                    progress=False,
                ).matrix
                errs.append(relative_error(est, exact))
            errors[f"R={r}"] = errs
        res["_exact"] = {"section": mlp.name, "tokens": small.numel(), "exact_s": exact_s}

    load_after = os.getloadavg()
    base = res["forward (logits)"]["wall_s"]
    base_cpu = res["forward (logits)"]["cpu_s"]
    print(
        f"\nSmolLM2-135M, {n} held-out tokens, {torch.get_num_threads()} threads, "
        f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    print(f"{'measurement':42s} {'tok/s':>9s} {'tok/cpu-s':>10s} {'x fwd':>7s} {'x fwd cpu':>10s}")
    for name, r in res.items():
        if name.startswith("_"):
            continue
        print(
            f"{name:42s} {r['tok_per_s']:9.1f} {r['tok_per_cpu_s']:10.1f} "
            f"{r['wall_s'] / base:7.2f} {r['cpu_s'] / base_cpu:10.2f}"
        )
    if errors:
        ex = res["_exact"]
        print(
            f"\nstochastic vs exact M' on {ex['section']}, {ex['tokens']} tokens "
            f"(exact took {ex['exact_s']:.0f} s); relative Frobenius error, 3 seeds:"
        )
        for k, v in errors.items():
            print(
                f"  {k:5s} median {statistics.median(v):.3f}  ({', '.join(f'{e:.3f}' for e in v)})"
            )
    if args.out:
        payload = {
            "results": res,
            "errors": errors,
            "load": [load_before, load_after],
            "threads": torch.get_num_threads(),
        }
        Path(args.out).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
