"""Where the Gram pass spends its time on a GPU (needs CUDA), variants side by side: the forward,
capturing all 61 residual sites of a SmolLM2-shaped model, the whole Gram pass, and one batch's
update as the package does it (sites of one shape stacked, one float64 `bmm`) against a loop
over sites, the stacking and conversion alone, and the product alone; then a torch.profiler
table of one small Gram pass. Float32 and bfloat16.

    python benchmarks/gram_variants_gpu.py

Written to find why the Gram pass costs 1.38× the forward in float32 on an H200 (target 1.3×,
docs/devices.md); not yet run.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import SMOLLM2_SHAPE  # noqa: E402

from tl_degeneracy.engine.capture import capture_sites  # noqa: E402
from tl_degeneracy.engine.compat import build_model, move_model  # noqa: E402
from tl_degeneracy.engine.sites import residual_sites  # noqa: E402
from tl_degeneracy.engine.statistics import (  # noqa: E402
    GramStatistics,
    add_to_statistics,
    collect_statistics,
)


def sync():
    torch.cuda.synchronize()


def timed(fn, repeats=3):
    ts = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def profile_dtype(name: str) -> None:
    """Times and profile of the Gram pass in one dtype."""
    dtype = getattr(torch, name)
    model = move_model(build_model(SMOLLM2_SHAPE, api="hooked", dtype=dtype), "cuda")
    sites = residual_sites(model, positions="1:")
    tokens = torch.randint(0, 49152, (392, 128), generator=torch.Generator().manual_seed(1))
    batches = tokens.cuda().split(64)
    n = tokens.numel()

    @torch.no_grad()
    def forward():
        for b in batches:
            model(b)

    @torch.no_grad()
    def capture_all():
        for i, b in enumerate(batches):
            capture_sites(model, b, sites, i)

    def gram():
        collect_statistics(model, sites, tokens, 64, progress=False, device="cuda")

    forward()
    t_f = timed(forward)
    t_c = timed(capture_all)
    t_g = timed(gram)
    print(
        f"{name}: forward {t_f:.3f} s, capture 61 sites {t_c:.3f} s ({t_c / t_f:.2f}x), "
        f"gram {t_g:.3f} s ({t_g / t_f:.2f}x), {n} tokens"
    )
    with torch.no_grad():
        acts = capture_sites(model, batches[0], sites, 0)

    def update_only():
        stats = GramStatistics(sites)
        add_to_statistics(stats, sites, acts, 0, "cuda")

    def per_site():
        for a in acts:
            x = a.reshape(-1, a.shape[-1]).to(torch.float64)
            xc = x - x.mean(0)
            xc.T @ xc

    def stacked_only():
        torch.stack([a.reshape(-1, a.shape[-1]) for a in acts]).to(torch.float64)

    def bmm_only():
        x = torch.stack([a.reshape(-1, a.shape[-1]) for a in acts]).to(torch.float64)
        torch.bmm(x.transpose(1, 2), x)

    for label, fn in (
        ("update (current)", update_only),
        ("per-site loop", per_site),
        ("stack + to f64", stacked_only),
        ("stack + bmm", bmm_only),
    ):
        t = timed(fn, 5)
        print(
            f"  one batch of {batches[0].numel()} tokens: {label:18s} {t * 1000:8.1f} ms"
            f"  (x{len(batches)} batches = {t * len(batches):.3f} s)"
        )
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        collect_statistics(model, sites, tokens[:128], 64, progress=False, device="cuda")
        sync()
    try:
        print(
            prof.key_averages().table(
                sort_by="device_time_total", row_limit=14, max_name_column_width=50
            )
        )
    except Exception as e:
        print("device table failed", e)
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=14, max_name_column_width=50
            )
        )
    print(
        prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50)
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    for dtype in ("float32", "bfloat16"):
        profile_dtype(dtype)
        torch.cuda.empty_cache()
