"""SGLD steps per second on the modular-addition seed-0 model at batch 512, and with all
chains of a ground-truth loss at once.

    python benchmarks/bench_llc.py [--threads 2] [--repeats 5] [--steps 60]
        [--devinterp /tmp/devinterp-venv/bin/python]

Times tl_degeneracy's sampler (behavioural KL at the last position, float32, ε = 1e-4,
γ = 100, nβ = n / log n on the 3,830 training inputs) through its written-out forward
(`PlainModel`, the default for models without normalisation) and through the model's own
forward (`ModelProblem` built under `autograd_only()`), and, when a Python with `devinterp`
is given, devinterp's `sample` on the same model, loss and hyperparameters. Each repeat
runs two chain lengths and reports (steps₂ − steps₁) / (time₂ − time₁), so set-up (reference
outputs, initial loss) is not counted. Prints the median over repeats. Repeats of the two
samplers are interleaved, so a busy machine slows both alike. The last row is the batched
sampler (`FunctionProblem(batched=True)`): 8 chains of reduced-rank regression (widths 6, 5,
4, rank 2, n = 2,000, batch 64, float64), steps of all chains per second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "modadd"
STEP_SIZE, GAMMA, BATCH = 1e-4, 100.0, 512

LOAD = """
import json, torch
from safetensors.torch import load_file
from tl_degeneracy.engine.compat import build_model

def load(reference):
    cfg = json.loads((reference / "seed0" / "config.json").read_text())["model"]
    model = build_model(cfg, load_file(str(reference / "seed0" / "model.safetensors")),
                        dtype=torch.float32)
    p = 113
    tokens = torch.tensor([[a, b, p] for a in range(p) for b in range(p)])
    train = load_file(str(reference / "split.safetensors"))["train_indices"]
    return model, tokens, train
"""

DEVINTERP = """
import json, math, sys, time
from pathlib import Path
import torch
from datasets import Dataset
from devinterp.slt.sampling import sample
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

torch.set_num_threads(int(sys.argv[2]))
reference = Path(sys.argv[1])
cfg = json.loads((reference / "seed0" / "config.json").read_text())["model"]
model = HookedTransformer(HookedTransformerConfig(**cfg, dtype=torch.float32))
model.load_state_dict(load_file(str(reference / "seed0" / "model.safetensors")), strict=False)
p = 113
tokens = torch.tensor([[a, b, p] for a in range(p) for b in range(p)])
train = load_file(str(reference / "split.safetensors"))["train_indices"]
n = len(train)
with torch.no_grad():
    reference = torch.log_softmax(model(tokens)[:, -1], -1)  # every input, by a * 113 + b

def kl(model, input_ids):
    ref = reference[input_ids[:, 0] * 113 + input_ids[:, 1]]
    logp = torch.log_softmax(model(input_ids)[:, -1], -1)
    per_seq = (ref.exp() * (ref - logp)).sum(-1, keepdim=True)
    return per_seq.expand(-1, input_ids.shape[1] - 1)  # devinterp wants (batch, seq - 1)

data = Dataset.from_dict({"input_ids": tokens[train].tolist()}).with_format("torch")
def run(steps):
    start = time.perf_counter()
    sample(model, data, {}, lr=STEP_SIZE, n_beta=n / math.log(n), localization=GAMMA,
           num_chains=1, num_draws=steps, batch_size=BATCH, num_init_loss_batches=1, loss_fn=kl)
    return time.perf_counter() - start
steps = [int(s) for s in sys.argv[3:5]]
times = [run(s) for s in steps]
print((steps[1] - steps[0]) / (times[1] - times[0]))
"""


def ours(steps: tuple[int, int], threads: int, fast: bool = True) -> float:
    """Steps per second of `estimate_llc` (one chain), set-up excluded."""
    from tl_degeneracy.engine.degeneracy import ModelProblem, SGLDConfig, estimate_llc

    namespace: dict = {}
    exec(LOAD, namespace)
    model, tokens, train = namespace["load"](REFERENCE)
    torch.set_num_threads(threads)
    from tl_degeneracy.engine.structures import autograd_only

    with contextlib.nullcontext() if fast else autograd_only():
        problem = ModelProblem(model, tokens[train])
    times = []
    for s in steps:
        cfg = SGLDConfig(STEP_SIZE, GAMMA, n_chains=1, n_steps=s, n_burnin=0, batch_size=BATCH)
        times.append(estimate_llc(problem, cfg).seconds)
    return (steps[1] - steps[0]) / (times[1] - times[0])


def batched(steps: tuple[int, int], threads: int) -> float:
    """Steps per second of all 8 chains at once on a ground-truth loss, set-up excluded."""
    from tl_degeneracy.engine.degeneracy import SGLDConfig, estimate_llc
    from tl_degeneracy.engine.degeneracy.ground_truth import deep_linear_problem

    torch.set_num_threads(threads)
    problem = deep_linear_problem([6, 5, 4], r=2, n=2000)
    times = []
    for s in (20 * steps[0], 20 * steps[1]):  # a step here is ~100 times cheaper
        cfg = SGLDConfig(1e-4, 1.0, n_chains=8, n_steps=s, n_burnin=0, batch_size=64)
        times.append(estimate_llc(problem, cfg, warn=False).seconds)
    return 20 * (steps[1] - steps[0]) / (times[1] - times[0])


def devinterp(python: str, steps: tuple[int, int], threads: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(DEVINTERP)
    settings = f"STEP_SIZE, GAMMA, BATCH = {STEP_SIZE!r}, {GAMMA!r}, {BATCH!r}\n"
    with open(f.name, "w") as g:
        g.write(settings + DEVINTERP)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run(
        [python, f.name, str(REFERENCE), str(threads), *map(str, steps)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--devinterp", default=None, help="a Python with devinterp installed")
    args = parser.parse_args()
    steps = (args.steps // 3, args.steps)
    rates: dict[str, list[float]] = {}
    model_rows = REFERENCE.exists()
    if model_rows:
        rates = {"tl_degeneracy": [], "tl_degeneracy (model forward)": []}
    else:
        print(f"model rows skipped: {REFERENCE} is absent")
    if args.devinterp and model_rows:
        rates["devinterp"] = []
    rates["batched, 8 chains (ground truth)"] = []
    for _ in range(args.repeats):
        if model_rows:
            rates["tl_degeneracy"].append(ours(steps, args.threads))
            rates["tl_degeneracy (model forward)"].append(ours(steps, args.threads, fast=False))
        if "devinterp" in rates:
            rates["devinterp"].append(devinterp(args.devinterp, steps, args.threads))
        rates["batched, 8 chains (ground truth)"].append(batched(steps, args.threads))
    load = os.getloadavg()[0]
    summary = {
        name: {"median_steps_per_s": statistics.median(r), "runs": [round(x, 2) for x in r]}
        for name, r in rates.items()
    }
    print(json.dumps({"threads": args.threads, "load_average": load, **summary}, indent=1))
    finite = all(math.isfinite(v["median_steps_per_s"]) for v in summary.values())
    if not model_rows:
        return 0 if finite else 1
    fast = summary["tl_degeneracy"]["median_steps_per_s"]
    slow = summary["tl_degeneracy (model forward)"]["median_steps_per_s"]
    print(f"written-out / model forward = {fast / slow:.2f}")
    if "devinterp" in rates:
        theirs = summary["devinterp"]["median_steps_per_s"]
        print(f"tl_degeneracy / devinterp = {fast / theirs:.2f}")
    return 0 if finite else 1


if __name__ == "__main__":
    start = time.time()
    code = main()
    print(f"({time.time() - start:.0f} s)", file=sys.stderr)
    sys.exit(code)
