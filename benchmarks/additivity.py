"""Do modules add their learning coefficients? λ̂ of the whole against the sum over modules.

    python benchmarks/additivity.py [--checkpoint DIR] [--steps 800] [--skip-planted]

1. Ground truth: the planted-module network of `engine.degeneracy.invariance` (three modules
   with no cross weights, on data that makes them independent), squared-error outputs so that
   the loss is a sum over modules. Partition: each module's block of every weight
   (`PlantedModules.parameter_masks`). Independent modules add: λ(union) = Σ λ(module).
2. Modular addition: the MLP's neurons grouped by the dominant Fourier frequency of their
   activation on all p² inputs (the package's Fourier labels); a module is its neurons'
   `W_in` columns, `b_in` entries and `W_out` rows. The whole is every neuron (the MLP without
   `b_out`). Fixed SGLD settings for every estimate (the MLP's calibrated step size).

Prints one table per case: module, parameters, λ̂ ± se, R-hat; then Σ, whole, gap ± se.
"""

from __future__ import annotations

import argparse
import time

import torch

from tl_degeneracy.engine.degeneracy import (
    AdditivityResult,
    ModelProblem,
    SGLDConfig,
    estimate_llc,
    model_additivity,
)
from tl_degeneracy.engine.degeneracy.invariance import PlantedModulesConfig, planted_modules_model


def table(res: AdditivityResult) -> str:
    rows = ["| module | parameters | λ̂ | R-hat |", "|---|---|---|---|"]
    for name, r in {**res.modules, "whole (union)": res.whole}.items():
        rows.append(f"| {name} | {r.n_params:,} | {r.llc:.4g} ± {r.llc_se:.2g} | {r.rhat:.3f} |")
    rows.append(
        f"\nΣ modules = {res.sum_of_modules:.4g} ± {res.sum_se:.2g}; whole = {res.whole.llc:.4g} "
        f"± {res.whole.llc_se:.2g}; gap Σ − whole = {res.gap:.3g} ± {res.gap_se:.2g} "
        f"({res.gap / res.gap_se:+.1f} se); whole / Σ = {res.ratio:.3f}"
    )
    return "\n".join(rows)


def planted(steps: int) -> None:
    p = planted_modules_model(PlantedModulesConfig(n_layers=1, n_values=4))  # either API
    partition = {f"module {i}": p.parameter_masks(i) for i in range(3)}
    cfg = SGLDConfig(1e-3, 100.0, n_chains=4, n_steps=steps, n_burnin=steps // 4, batch_size=10**9)
    start = time.process_time()
    res = model_additivity(p.model, p.tokens, partition, cfg, divergence="mse")
    print(f"## Planted modules ({len(p.tokens)} inputs, squared error)\n\n{table(res)}")
    every = estimate_llc(ModelProblem(p.model, p.tokens, None, divergence="mse"), cfg)
    print(f"every parameter (cross-module weights too): {every.summary()}")
    print(f"({time.process_time() - start:.0f} CPU-s)\n")


def frequency_partition(model, p: int, min_neurons: int) -> dict[str, dict[str, torch.Tensor]]:
    """MLP neurons grouped by the dominant frequency of their activation at the last
    position over all p² inputs; groups smaller than `min_neurons` go to "other"."""
    from tl_degeneracy.engine.compat import run_with_hooks
    from tl_degeneracy.models.modadd.fourier import fourier_labels

    grid = torch.tensor([[a, b, p] for a in range(p) for b in range(p)])
    acts: dict[str, torch.Tensor] = {}

    def keep(act, hook=None):
        acts["post"] = act[:, -1].detach().to(torch.float64)

    with torch.no_grad():
        run_with_hooks(model, grid, [("blocks.0.mlp.hook_post", keep)])
    freq = fourier_labels(acts["post"], p).dominant_frequency
    names, counts = torch.unique(freq, return_counts=True)
    label = {
        int(f): (f"frequency {int(f)}" if c >= min_neurons else "other")
        for f, c in zip(names, counts)
    }
    d_model, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    out: dict[str, dict[str, torch.Tensor]] = {}
    for module in dict.fromkeys(label.values()):
        neurons = torch.tensor([label[int(f)] == module for f in freq])
        out[f"{module} ({int(neurons.sum())} neurons)"] = {
            "blocks.0.mlp.W_in": neurons[None].expand(d_model, d_mlp).clone(),
            "blocks.0.mlp.b_in": neurons.clone(),
            "blocks.0.mlp.W_out": neurons[:, None].expand(d_mlp, d_model).clone(),
        }
    return out


def modadd(checkpoint: str | None, steps: int, step_size: float, min_neurons: int) -> None:
    from tl_degeneracy.models.modadd.checkpoints import ModAddCheckpoint

    ckpt = ModAddCheckpoint.open(checkpoint)
    model = ckpt.model(api="hooked", dtype=torch.float32)
    data = ckpt.dataset()
    tokens = data.tokens[data.train_indices]
    partition = frequency_partition(model, ckpt.p, min_neurons)
    cfg = SGLDConfig(step_size, 100.0, n_chains=4, n_steps=steps, n_burnin=steps // 4)
    start = time.process_time()
    res = model_additivity(model, tokens, partition, cfg)
    print(f"## Modular addition MLP neurons by frequency ({checkpoint or 'package model'})\n")
    print(f"{table(res)}\n({time.process_time() - start:.0f} CPU-s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="modular-addition checkpoint folder")
    parser.add_argument("--steps", type=int, default=800, help="steps per chain (modadd)")
    parser.add_argument("--step-size", type=float, default=1e-4, help="SGLD ε (modadd)")
    parser.add_argument("--min-neurons", type=int, default=16, help="smallest frequency group")
    parser.add_argument("--planted-steps", type=int, default=600)
    parser.add_argument("--skip-planted", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.skip_planted:
        planted(args.planted_steps)
    modadd(args.checkpoint, args.steps, args.step_size, args.min_neurons)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
