"""Peak memory of Gram statistics at all 61 SmolLM2 sites does not grow with the token count.

    python benchmarks/bench_memory.py [--tokens 10000 100000] [--threads 1]

Each count runs in a fresh subprocess. It loads the model, resets the kernel's peak-RSS mark
(`/proc/self/clear_refs`), streams `collect_statistics` over that many training tokens and
reports the peak RSS of the streaming phase (VmHWM) next to the process's lifetime peak
(`ru_maxrss`, which includes loading the model).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child(n_tokens: int, threads: int | None, batch_rows: int) -> dict:
    import torch

    from tl_degeneracy.engine.sites import residual_sites
    from tl_degeneracy.engine.statistics import collect_statistics
    from tl_degeneracy.models import load_corpus, load_smollm2

    if threads:
        torch.set_num_threads(threads)
    model = load_smollm2(api="hooked")
    tokens = load_corpus(model.tokenizer, 128, "train", max_tokens=n_tokens)
    sites = residual_sites(model)  # all 61 residual cuts
    rss_loaded = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    stats = collect_statistics(model, sites, tokens, batch_rows, progress=False)
    return {
        "tokens": stats.count,
        "floats_per_token": sum(st.d for st in stats.per_site.values()),
        "seconds": time.perf_counter() - start,
        "rss_after_load_mb": rss_loaded / 1024,
        "streaming_peak_mb": _status_kb("VmHWM") / 1024 if reset else float("nan"),
        "lifetime_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run(counts: list[int], threads: int | None = 1, batch_rows: int = 8) -> list[dict]:
    """Measure each count in a fresh interpreter; returns one dict per count."""
    out = []
    for n in counts:
        cmd = [sys.executable, __file__, "--child", str(n), "--batch-rows", str(batch_rows)]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-rows", type=int, default=8)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.threads, args.batch_rows)))
        return
    rows = run(args.tokens, args.threads, args.batch_rows)
    print(
        f"{'tokens':>8s} {'seconds':>8s} {'RSS loaded':>11s} {'stream peak':>12s} "
        f"{'lifetime peak':>14s}  (MB)"
    )
    for r in rows:
        print(
            f"{r['tokens']:8d} {r['seconds']:8.0f} {r['rss_after_load_mb']:11.0f} "
            f"{r['streaming_peak_mb']:12.0f} {r['lifetime_peak_mb']:14.0f}"
        )
    a, b = rows[0], rows[-1]
    growth = b["streaming_peak_mb"] - a["streaming_peak_mb"]
    kept = (b["tokens"] - a["tokens"]) * b["floats_per_token"] * 4 / 2**20
    print(
        f"streaming peak ratio {b['streaming_peak_mb'] / a['streaming_peak_mb']:.3f}, "
        f"lifetime peak ratio {b['lifetime_peak_mb'] / a['lifetime_peak_mb']:.3f}"
    )
    # the peak moves by a few hundred MB from run to run (the allocator's transient batch
    # buffers): judge its growth against what keeping the added tokens' activations would take
    print(
        f"streaming peak growth {growth:.0f} MB for {b['tokens'] - a['tokens']} more tokens; "
        f"keeping their float32 activations at the sites would take {kept:.0f} MB "
        f"(growth share {growth / kept:.3f})"
    )


if __name__ == "__main__":
    main()
