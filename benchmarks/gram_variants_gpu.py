"""Where the Gram pass spends its time on a GPU, variants side by side: the forward, capturing
all 61 residual sites (BOS left out) of a SmolLM2-shaped model, the whole Gram pass, and one
batch's update: as the package does it now (means read in place, each activation centred and
converted in one pass into one float64 buffer, its Grams by two half products
(`centred_gram`), one merge for all sites), as it did in the last round (means of copies, a
copy then a second centring pass, one full `bmm`), as it did before that (stack, convert,
centred copy, `bmm`, a merge per site), and a loop over sites; then the copying alone, the
products alone and a torch.profiler table of one small Gram pass. Float32 and bfloat16.

    python benchmarks/gram_variants_gpu.py [--device cpu --rows 8 --batches 2]

Written to find why the Gram pass cost 1.38× the forward in float32 on an H200 (target 1.3×,
docs/devices.md), then 1.39× in bfloat16 on an H100. The pass is also timed as it ran before
its update stopped waiting for its own products, without its one remaining wait per batch
(the NaN/Inf check: an upper bound on what deferring it could save), and with
TransformerLens's own hook context; on CUDA the synchronisations of a forward and of a Gram
batch are counted.
`--device cpu` is a smoke test (and a proxy for the copies saved; the CPU's own Gram pass uses
one BLAS product per site).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import SMOLLM2_SHAPE  # noqa: E402

from tl_degeneracy.engine import statistics as stats_module  # noqa: E402
from tl_degeneracy.engine.capture import capture_sites  # noqa: E402
from tl_degeneracy.engine.compat import build_model, move_model  # noqa: E402
from tl_degeneracy.engine.sites import residual_sites  # noqa: E402
from tl_degeneracy.engine.statistics import (  # noqa: E402
    GramStatistics,
    SiteStatistics,
    add_to_statistics,
    centred_gram,
    collect_statistics,
)
from tl_degeneracy.engine.synchronisation import (  # noqa: E402
    count_synchronisations,
    cuda_synchronisations,
)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def update_last_round(stats, sites, acts, device):
    """The batched update of the last round (kept here to compare): means of copies of the
    selected positions, each activation copied into the float64 buffer, centred in place
    (a second pass over it), one full `bmm`, one merge."""
    from tl_degeneracy.engine.statistics import _merge_group, _site_statistics

    n, d = acts[0].numel() // acts[0].shape[-1], acts[0].shape[-1]
    mean = torch.stack([a.reshape(n, d).mean(0, dtype=torch.float64) for a in acts])
    bool(torch.isfinite(mean).all())
    x = torch.empty(len(acts), n, d, dtype=torch.float64, device=device)
    for j, a in enumerate(acts):
        x[j].view(a.shape).copy_(a)
    x.sub_(mean[:, None])
    m2 = torch.bmm(x.transpose(1, 2), x)
    _merge_group([_site_statistics(stats, s, d, device) for s in sites], n, mean, m2)


def update_before(stats, sites, acts, device):
    """The batched update two rounds ago (kept here to compare): stack the selected
    activations (a copy each for non-contiguous ones, then the stack), convert the stack to
    float64, subtract the means into a new tensor, one `bmm`, then a merge per site."""
    flats = [a.reshape(-1, a.shape[-1]) for a in acts]
    x = torch.stack(flats).to(device, torch.float64)
    mean = x.mean(1)
    xc = x - mean[:, None]
    m2 = torch.bmm(xc.transpose(1, 2), xc)
    bool(torch.isfinite(mean).all())
    for j, site in enumerate(sites):
        if site.name not in stats.per_site:
            stats.per_site[site.name] = SiteStatistics.empty(site, x.shape[-1], device)
        stats.per_site[site.name]._merge(x.shape[1], mean[j], m2[j])


def syncs_per_batch(model, sites, batches) -> str:
    """Synchronisations of one plain forward and of one batch of the Gram pass."""
    from tl_degeneracy.engine.statistics import GramAccumulator

    acc = GramAccumulator(model, sites)
    acc.update(0, batches[0])  # creates the sums

    @torch.no_grad()
    def forward():
        model(batches[1])

    gram = count_synchronisations(lambda: acc.update(1, batches[1]), "cuda")
    return (
        f"plain forward {count_synchronisations(forward, 'cuda')}, Gram batch {gram} at "
        f"{cuda_synchronisations(lambda: acc.update(2, batches[0]))}"
    )


def timed(fn, repeats=3):
    ts = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def operators(update, sites) -> int:
    """Top-level operators one update dispatches into existing sums (a proxy for launches)."""
    from torch.profiler import ProfilerActivity, profile

    stats = GramStatistics(sites)
    update(stats)  # the first batch creates the sums
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        update(stats)
    return sum(1 for e in prof.events() if e.cpu_parent is None)


def profile_dtype(name: str, args: argparse.Namespace) -> None:
    """Times and profile of the Gram pass in one dtype."""
    dtype, device = getattr(torch, name), args.device
    model = move_model(build_model(SMOLLM2_SHAPE, api="hooked", dtype=dtype), device)
    sites = residual_sites(model, positions="1:")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 49152, (args.rows * args.batches, 128), generator=gen)
    batches = tokens.to(device).split(args.rows)
    n = tokens.numel()

    @torch.no_grad()
    def forward():
        for b in batches:
            model(b)

    @torch.no_grad()
    def capture_all():
        for i, b in enumerate(batches):
            capture_sites(model, b, sites, i, check=False)  # as the Gram pass reads them

    def gram():
        collect_statistics(model, sites, tokens, args.rows, progress=False, device=device)

    def gram_waiting():
        """The pass as before this round: each update waited for its own products (its
        NaN/Inf check came after them and its merge weights were copied from the host)."""
        merge = stats_module._merge_group

        def waiting(*a):
            merge(*a)
            sync()

        stats_module._merge_group = waiting
        try:
            gram()
        finally:
            stats_module._merge_group = merge

    def gram_unchecked():
        """The pass without its one wait per batch (the NaN/Inf check of the batch means):
        what deferring that check could save at most. Not a mode of the package."""
        check = stats_module._check_means
        stats_module._check_means = lambda *a: None
        try:
            gram()
        finally:
            stats_module._check_means = check

    def gram_tl_hooks():
        """The pass with TransformerLens's own hook context (it walks every hook point on
        exit), as before `compat.temporary_hooks`."""
        from tl_degeneracy.engine import compat

        own = compat.temporary_hooks
        compat.temporary_hooks = lambda m, hooks: m.hooks(fwd_hooks=list(hooks))
        try:
            gram()
        finally:
            compat.temporary_hooks = own

    forward()
    t_f = timed(forward)
    t_h = timed(gram_tl_hooks)
    t_c = timed(capture_all)
    t_g = timed(gram)
    t_w = timed(gram_waiting)
    t_u = timed(gram_unchecked)
    print(
        f"{name}: forward {t_f:.3f} s, capture 61 sites {t_c:.3f} s ({t_c / t_f:.2f}x), "
        f"gram {t_g:.3f} s ({t_g / t_f:.2f}x), gram waiting for its products (before) "
        f"{t_w:.3f} s ({t_w / t_f:.2f}x), gram without its NaN check {t_u:.3f} s "
        f"({t_u / t_f:.2f}x), gram with TransformerLens's hook context {t_h:.3f} s "
        f"({t_h / t_f:.2f}x), {n} tokens"
    )
    if device == "cuda":
        print(f"  synchronisations: {syncs_per_batch(model, sites, batches)}")
    with torch.no_grad():
        acts = capture_sites(model, batches[0], sites, 0)

    def update_now():
        stats = GramStatistics(sites)
        add_to_statistics(stats, sites, acts, 0, device, batched=True)

    def update_old():
        update_before(GramStatistics(sites), sites, acts, device)

    def update_last():
        update_last_round(GramStatistics(sites), sites, acts, device)

    x64 = torch.stack([a.reshape(-1, a.shape[-1]) for a in acts]).to(torch.float64)

    def full_bmm():
        torch.bmm(x64.transpose(1, 2), x64)

    def half_products():
        centred_gram(x64)

    def copy_now():
        rows, width = acts[0].numel() // acts[0].shape[-1], acts[0].shape[-1]
        x = torch.empty(len(acts), rows, width, dtype=torch.float64, device=device)
        for j, a in enumerate(acts):
            x[j].view(a.shape).copy_(a)

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
        ("update (now)", update_now),
        ("update (last round)", update_last),
        ("update (before)", update_old),
        ("bmm of the buffer", full_bmm),
        ("centred_gram (now)", half_products),
        ("per-site loop", per_site),
        ("copy into f64 (now)", copy_now),
        ("stack + to f64", stacked_only),
        ("stack + bmm", bmm_only),
    ):
        t = timed(fn, 5)
        print(
            f"  one batch of {batches[0].numel()} tokens: {label:20s} {t * 1000:8.1f} ms"
            f"  (x{len(batches)} batches = {t * len(batches):.3f} s)"
        )
    for label, update in (
        ("now", lambda s: add_to_statistics(s, sites, acts, 1, device, batched=True)),
        ("last round", lambda s: update_last_round(s, sites, acts, device)),
        ("before", lambda s: update_before(s, sites, acts, device)),
    ):
        print(f"  operators dispatched by one update ({label}): {operators(update, sites)}")
    if device != "cuda":
        return
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
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=64, help="rows of 128 tokens per batch")
    p.add_argument("--batches", type=int, default=6)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --device cpu for a smoke test)")
    torch.manual_seed(0)
    for dtype in ("float32", "bfloat16"):
        profile_dtype(dtype, args)
        if args.device == "cuda":
            torch.cuda.empty_cache()
