"""λ̂ on the modular-addition seed-0 model: tl_degeneracy's sampler against devinterp's.

    python benchmarks/llc_vs_devinterp.py [--chains 4] [--steps 400] [--burnin 100]
        [--rounds 3] [--threads 1] [--out out/llc_vs_devinterp.json]

Both samplers get the same model (HookedTransformer, float32), data (the 3,830 training
inputs), loss (KL of the last position's softmax to the trained model's), and hyperparameters
(ε = 1e-4, γ = 100, nβ = n / log n, batch 512, the same burn-in and chain length). devinterp
(an optional dependency: `pip install -e ".[compare]"`; run through
`engine.degeneracy.crosscheck.devinterp_llc`) averages the minibatch loss of every step
after its burn-in, as ours does. Prints each estimate with the standard error across chains,
the gap in units of the combined standard error, and each sampler's steps per second (wall
and CPU time, whole run including set-up). The machine's speed drifts by ±20% from minute to
minute, so the two samplers alternate for `--rounds` rounds and the speed ratio is the median
of the per-round ratios (the estimates are those of the first round; later rounds repeat the
same seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "modadd"
STEP_SIZE, GAMMA, BATCH = 1e-4, 100.0, 512


def load() -> tuple[torch.nn.Module, torch.Tensor]:
    """Seed-0 model (HookedTransformer, float32) and its training inputs."""
    from tl_degeneracy.engine.compat import build_model

    cfg = json.loads((REFERENCE / "seed0" / "config.json").read_text())["model"]
    model = build_model(
        cfg, load_file(str(REFERENCE / "seed0" / "model.safetensors")), api="hooked"
    )
    p = 113
    tokens = torch.tensor([[a, b, p] for a in range(p) for b in range(p)])
    train = load_file(str(REFERENCE / "split.safetensors"))["train_indices"]
    return model, tokens[train]


def ours(model, tokens, chains: int, steps: int, burnin: int) -> dict:
    from tl_degeneracy.engine.degeneracy import ModelProblem, SGLDConfig, estimate_llc

    cfg = SGLDConfig(STEP_SIZE, GAMMA, None, chains, steps, burnin, BATCH)
    wall, cpu = time.perf_counter(), time.process_time()
    res = estimate_llc(ModelProblem(model, tokens), cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "llc": res.llc,
        "llc_se": res.llc_se,
        "per_chain": res.llc_per_chain.tolist(),
        "rhat": res.rhat,
        "nbeta": res.nbeta,
        "wall_s": wall,
        "cpu_s": cpu,
        "steps_per_s_wall": chains * steps / wall,
        "steps_per_s_cpu": chains * steps / cpu,
        "messages": res.messages,
    }


def devinterp(model, tokens, chains: int, steps: int, burnin: int) -> dict:
    from tl_degeneracy.engine.degeneracy import SGLDConfig
    from tl_degeneracy.engine.degeneracy.crosscheck import devinterp_llc

    cfg = SGLDConfig(STEP_SIZE, GAMMA, None, chains, steps, burnin, BATCH)
    wall, cpu = time.perf_counter(), time.process_time()
    res = devinterp_llc(model, tokens, cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "llc": res.llc,
        "llc_se": res.llc_se,
        "per_chain": res.llc_per_chain,
        "nbeta": res.nbeta,
        "wall_s": wall,
        "cpu_s": cpu,
        "steps_per_s_wall": chains * steps / wall,
        "steps_per_s_cpu": chains * steps / cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--burnin", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="out/llc_vs_devinterp.json")
    args = parser.parse_args()
    if not REFERENCE.exists():
        print(f"skipped: {REFERENCE} is absent")
        return 0
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    model, tokens = load()
    run = (args.chains, args.steps, args.burnin)
    result = {
        "settings": {
            "step_size": STEP_SIZE,
            "gamma": GAMMA,
            "batch_size": BATCH,
            "chains": args.chains,
            "steps": args.steps,
            "burnin": args.burnin,
            "rounds": args.rounds,
            "threads": args.threads,
            "n": int(tokens.shape[0]),
        },
        "load_average_before": os.getloadavg()[0],
        "rounds": [],
    }
    for r in range(args.rounds):
        a = ours(model, tokens, *run)
        b = devinterp(model, tokens, *run)
        ratio = a["steps_per_s_cpu"] / b["steps_per_s_cpu"]
        result["rounds"].append({"tl_degeneracy": a, "devinterp": b, "speed_ratio_cpu": ratio})
        print(
            f"round {r}: tl_degeneracy {a['steps_per_s_cpu']:.1f}, devinterp "
            f"{b['steps_per_s_cpu']:.1f} steps/s (CPU time): {ratio:.2f}×",
            flush=True,
        )
    first = result["rounds"][0]
    result["tl_degeneracy"], result["devinterp"] = first["tl_degeneracy"], first["devinterp"]
    result["load_average_after"] = os.getloadavg()[0]
    a, b = result["tl_degeneracy"], result["devinterp"]
    se = math.hypot(a["llc_se"], b["llc_se"])
    result["gap"] = a["llc"] - b["llc"]
    result["gap_in_se"] = result["gap"] / se
    ratios = sorted(x["speed_ratio_cpu"] for x in result["rounds"])
    result["speed_ratio_cpu"] = ratios[len(ratios) // 2]
    result["speed_ratio_cpu_range"] = [ratios[0], ratios[-1]]
    ours_speed = sorted(x["tl_degeneracy"]["steps_per_s_cpu"] for x in result["rounds"])
    theirs_speed = sorted(x["devinterp"]["steps_per_s_cpu"] for x in result["rounds"])
    result["steps_per_s_cpu_median"] = {
        "tl_degeneracy": ours_speed[len(ours_speed) // 2],
        "devinterp": theirs_speed[len(theirs_speed) // 2],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    med = result["steps_per_s_cpu_median"]
    print(
        f"tl_degeneracy λ̂ = {a['llc']:.1f} ± {a['llc_se']:.1f}; devinterp λ̂ = "
        f"{b['llc']:.1f} ± {b['llc_se']:.1f}; gap {result['gap']:.1f} "
        f"({result['gap_in_se']:.2f} combined se); speed (CPU time, median of "
        f"{args.rounds} rounds) {med['tl_degeneracy']:.1f} vs {med['devinterp']:.1f} steps/s; "
        f"ratio {result['speed_ratio_cpu']:.2f}× (range {ratios[0]:.2f}–{ratios[-1]:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
