"""The full seed-0 modular-addition pipeline, phase by phase: Gram statistics, the LIB fit
(Grams + `M'` + bases of the three sites), the edges of each of the three sections and the whole
`interaction_graph`, on the 3,830 training inputs in float64 on one thread. Prints median CPU
and wall seconds over the repeats (after one untimed warm-up run).

    python benchmarks/bench_pipeline_modadd.py [--repeats 5] [--checkpoint DIR]
        [--baseline DIR] [--threads 1]

When the `--baseline` folder exists (default `/work/baseline`, a checkout of the code before
the engine redesign), the same phases are measured there too, in a subprocess started in that
folder so that its own `tl_degeneracy` is imported, and printed side by side with the ratio and
the largest relative difference of the edges. Each side runs in its own fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_CPU_S = 2.4
STATS = "Gram statistics (collect_statistics)"
FIT = "fit_basis (Grams + M' + bases)"
GRAPH = "interaction_graph (3 sections)"
PIPELINE = "pipeline (fit_basis + interaction_graph)"


def _api() -> dict[str, Any]:
    """The entry points of whichever `tl_degeneracy` is imported (redesigned or baseline),
    chosen by the imported package's layout: trying the new names first would import them from
    an editable install of the other checkout (its import hook serves any missing submodule)."""
    import tl_degeneracy

    if (Path(tl_degeneracy.__file__).parent / "engine").is_dir():
        from tl_degeneracy.engine.edges import interaction_graph, section_edges
        from tl_degeneracy.engine.fit import LIBConfig, fit_basis
        from tl_degeneracy.engine.statistics import collect_statistics
        from tl_degeneracy.models.modadd.checkpoints import ModAddCheckpoint
        from tl_degeneracy.models.modadd.sites import REFERENCE_SITES
    else:  # the pre-redesign layout
        from tl_degeneracy.edges import interaction_graph, section_edges  # type: ignore
        from tl_degeneracy.fit import LIBConfig, fit_basis  # type: ignore
        from tl_degeneracy.modadd.checkpoints import ModAddCheckpoint  # type: ignore
        from tl_degeneracy.modadd.fit_job import REFERENCE_SITES  # type: ignore
        from tl_degeneracy.statistics import collect_statistics  # type: ignore
    return dict(
        interaction_graph=interaction_graph,
        section_edges=section_edges,
        LIBConfig=LIBConfig,
        fit_basis=fit_basis,
        collect_statistics=collect_statistics,
        ModAddCheckpoint=ModAddCheckpoint,
        REFERENCE_SITES=REFERENCE_SITES,
    )


def _timed(fn) -> tuple[float, float, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.process_time() - cpu, time.perf_counter() - start, out


def measure(checkpoint: str, repeats: int, threads: int) -> dict[str, Any]:
    """Per phase, the CPU and wall seconds of every repeat, and the edges' sums per section."""
    import torch

    torch.set_num_threads(threads)
    api = _api()
    model = api["ModAddCheckpoint"].open(checkpoint).model(dtype=torch.float64)
    train, _ = api["ModAddCheckpoint"].open(checkpoint).dataset().train()
    sites = api["REFERENCE_SITES"]
    config = api["LIBConfig"](sites, batch_size=4096, progress=False)

    def fit():
        return api["fit_basis"](model, train, config)

    def stats():
        return api["collect_statistics"](model, sites, train, 4096, progress=False)

    def graph(lib):
        return api["interaction_graph"](model, train, lib, batch_size=4096, progress=False)

    lib = fit()  # warm-up, untimed
    graph(lib)
    bases = list(lib.bases.values())
    times: dict[str, list[tuple[float, float]]] = {}

    def record(phase: str, fn) -> Any:
        cpu, wall, out = _timed(fn)
        times.setdefault(phase, []).append((cpu, wall))
        return out

    def edges_of(b_in, b_out):
        return api["section_edges"](model, train, b_in, b_out, batch_size=4096, progress=False)

    edges: dict[str, Any] = {}
    for _ in range(repeats):
        record(STATS, stats)
        lib = record(FIT, fit)
        for b_in, b_out in zip(bases, bases[1:]):
            record(f"  edges {b_in.site.name}->{b_out.site.name}", partial(edges_of, b_in, b_out))
        g = record(GRAPH, partial(graph, lib))
        (fit_cpu, fit_wall), (graph_cpu, graph_wall) = times[FIT][-1], times[GRAPH][-1]
        times.setdefault(PIPELINE, []).append((fit_cpu + graph_cpu, fit_wall + graph_wall))
        edges = {
            name: [s.edges.flatten().tolist(), s.mean_edges.tolist(), s.method]
            for name, s in g.sections.items()
        }
    return {"times": times, "edges": edges, "n": int(train.shape[0]), "threads": threads}


def _run_in(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`measure` in a fresh process started in `folder`, importing that folder's package."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--checkpoint",
        str(args.checkpoint),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark in {folder} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(pairs: list[list[float]], i: int) -> float:
    return statistics.median(p[i] for p in pairs)


def _edge_differences(new: dict[str, Any], old: dict[str, Any]) -> list[str]:
    """Per section, the largest difference of the edges (and mean-node edges) relative to the
    largest edge."""
    import torch

    lines = []
    for (name, a), b in zip(new.items(), old.values()):
        ea, eb, ma, mb = (torch.tensor(v, dtype=torch.float64) for v in (a[0], b[0], a[1], b[1]))
        scale = float(eb.abs().max())
        err = max(float((ea - eb).abs().max()), float((ma - mb).abs().max())) / scale
        lines.append(f"  {name:66s}{err:9.1e}   ({a[2]} / {b[2]})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--baseline", default="/work/baseline")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, os.getcwd())
        print(json.dumps(measure(args.checkpoint, args.repeats, args.threads)))
        return
    shared = ROOT.parent / "shared/reference/modadd/seed0"
    if args.checkpoint is None:
        if not shared.exists():
            sys.exit(f"no checkpoint: pass --checkpoint (looked for {shared})")
        args.checkpoint = str(shared)
    runs = {"this checkout": _run_in(ROOT, args)}
    baseline = Path(args.baseline)
    if (baseline / "tl_degeneracy").is_dir():
        runs["baseline"] = _run_in(baseline, args)
    load = os.getloadavg()[0]
    first = runs["this checkout"]
    print(
        f"checkpoint {args.checkpoint}: {first['n']} training inputs, float64, "
        f"{args.threads} thread(s), median of {args.repeats} runs after a warm-up, "
        f"load average {load:.1f}\n"
    )
    header = f"{'phase':66s}" + "".join(f"{name + ' CPU s / wall s':>30s}" for name in runs)
    if len(runs) == 2:
        header += f"{'CPU speed-up':>14s}"
    print(header)
    for phase in first["times"]:
        row = f"{phase:66s}"
        cpus = []
        for run in runs.values():
            p = run["times"].get(phase)
            if p is None:
                row += f"{'—':>30s}"
                continue
            cpus.append(_median(p, 0))
            row += f"{f'{_median(p, 0):.2f} / {_median(p, 1):.2f}':>30s}"
        if len(cpus) == 2:
            row += f"{cpus[1] / cpus[0]:>13.1f}×"
        print(row)
    total = _median(first["times"][PIPELINE], 0)
    verdict = "within" if total <= TARGET_CPU_S else "OVER"
    print(f"\npipeline: {total:.2f} CPU s, {verdict} the target of {TARGET_CPU_S} CPU s")
    if "baseline" in runs:
        print("edges against the baseline's (each side with its own fit), largest difference:")
        print("\n".join(_edge_differences(first["edges"], runs["baseline"]["edges"])))


if __name__ == "__main__":
    main()
