"""Seed-0 LIB fit on modular addition (Grams + bases for the three sites, 3,830 training
inputs, float64), and the Jacobian-Gram variants side by side. Prints medians.

    python benchmarks/bench_fit_modadd.py [--repeats 3] [--checkpoint DIR] [--skip-exact]

Prints wall and CPU seconds: on a shared machine wall time measures the load as much as the
code. `--skip-exact` leaves out the autograd variants (about two minutes per section).

Without DIR it uses ../shared/reference/modadd/seed0 when present, else the package's model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch

from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.jacobians import JacobianConfig, jacobian_gram
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.structures import autograd_only
from tl_degeneracy.models.modadd.checkpoints import ModAddCheckpoint, default_checkpoint_dir
from tl_degeneracy.models.modadd.sites import REFERENCE_SITES


def median_time(fn, repeats: int) -> tuple[float, object]:
    return median_times(fn, repeats)[0::2]  # type: ignore[return-value]


def median_times(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of `repeats` calls, and the last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--skip-exact", action="store_true", help="no autograd variants")
    args = parser.parse_args()
    shared = Path(__file__).resolve().parents[1].parent / "shared/reference/modadd/seed0"
    path = (
        Path(args.checkpoint)
        if args.checkpoint
        else (shared if shared.exists() else default_checkpoint_dir())
    )
    ckpt = ModAddCheckpoint.open(path)
    model = ckpt.model(dtype=torch.float64)
    train, _ = ckpt.dataset().train()
    n = train.shape[0]
    print(
        f"checkpoint {path}, {n} training inputs, float64, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )

    config = LIBConfig(REFERENCE_SITES, batch_size=4096, progress=False)
    t_fit, cpu_fit, lib = median_times(lambda: fit_basis(model, train, config), args.repeats)
    print(
        f"\nLIB fit, 3 sites (Grams + M' + bases): median {t_fit:.2f} s wall, {cpu_fit:.2f} s "
        f"CPU ({n / t_fit:.0f} inputs/s) over {args.repeats} runs   [target ≤ 10 s]"
    )
    for site, method in lib.metadata["jacobian_methods"].items():
        print(f"  {site:32s} M' by {method}")

    print("\nM' of each section, variants side by side (median seconds; relative error of the")
    print("exact and stochastic estimates against the closed form in brackets):")
    sections = [Section(a, b) for a, b in zip(REFERENCE_SITES, REFERENCE_SITES[1:])]
    # (name, config, autograd only): the structure's closed form, then the generic paths
    variants = [("closed form", JacobianConfig(), False)]
    if not args.skip_exact:
        variants.append(("autograd, chunk 16", JacobianConfig(chunk_size=16), True))
        variants.append(("autograd, chunk 64", JacobianConfig(chunk_size=64), True))
    variants.append(("stochastic, R=4", JacobianConfig(method="stochastic", n_sources=4), True))
    print(f"{'section':62s}" + "".join(f"{name:>22s}" for name, _, _ in variants))
    for sec in sections:
        out_basis = None if sec.out.is_logits else lib[sec.out].C
        row, exact = f"{sec.name:62s}", None
        for _, cfg, generic in variants:  # relative errors against the closed form

            def run(cfg=cfg, sec=sec, out_basis=out_basis, generic=generic):
                with autograd_only() if generic else contextlib.nullcontext():
                    return jacobian_gram(
                        model, train, sec, out_basis, cfg, batch_size=4096, progress=False
                    )

            t, jg = median_time(run, args.repeats if not generic else 1)
            cell = f"{t:.2f}"
            if exact is None:
                exact = jg.matrix
            else:
                err = float(torch.linalg.norm(jg.matrix - exact) / torch.linalg.norm(exact))
                cell += f" [{err:.1e}]"
            row += f"{cell:>22s}"
        print(row)


if __name__ == "__main__":
    main()
