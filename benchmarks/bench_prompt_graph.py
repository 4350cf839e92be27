"""CPU time of a prompt graph on SmolLM2: one 32-token prompt, every residual-stream site
(61 sites), graph and pruning; medians of `--repeats` runs.

    python benchmarks/bench_prompt_graph.py --repeats 3 --threads 1

The bases (LIB and PCA at every residual cut, 2,048 corpus tokens) come from the cache that
`experiments.prompt_graph_ioi.ioi_bases` fills (fitted there on first use, ~7 minutes). The
prompt is the first 32 tokens of the held-out corpus; the target is the logit difference
between the model's two most likely next tokens. Also printed: the candidate graph's size
against all pairs of nodes of consecutive sites (what memory would hold without candidates).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--kind", default="lib", choices=["lib", "pca"])
    parser.add_argument("--max-candidates", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tl_degeneracy.engine.prompt_graph import Target, prompt_graph
    from tl_degeneracy.experiments.prompt_graph_ioi import ioi_bases
    from tl_degeneracy.models import load_corpus, load_smollm2

    model = load_smollm2()
    basis = ioi_bases(model)[args.kind]
    tokens = load_corpus(model.tokenizer, 128, "heldout")[:1, : args.tokens]
    with torch.no_grad():
        top2 = model(tokens)[0, -1].topk(2).indices.tolist()
    target = Target.logit_difference(*top2)
    print(f"prompt: {model.to_string(tokens[0])!r}")
    print(f"target: logit difference of {model.to_str_tokens(torch.tensor(top2))}")
    cpu: dict[str, list[float]] = {"nodes": [], "edges": [], "prune": [], "total": []}
    wall = []
    graph = None
    for _ in range(args.repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        graph = prompt_graph(model, basis, tokens, target, max_candidates=args.max_candidates)
        cpu["total"].append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
        for phase, seconds in graph.metadata["cpu_seconds"].items():
            cpu[phase].append(seconds)
    assert graph is not None
    print(f"{len(graph.sites)} sites, {args.tokens} positions, {args.kind}, threads {args.threads}")
    for phase, values in cpu.items():
        print(f"  {phase:>6}: median {statistics.median(values):6.2f} CPU s  {values}")
    print(f"  wall  : median {statistics.median(wall):6.2f} s")
    c = graph.candidates
    n_edges = int(c.src.numel())
    widths = [f.numel() + f.shape[0] for f in graph.features]  # features + rest nodes per site
    all_pairs = sum(a * b for a, b in zip(widths, widths[1:]))
    print(
        f"candidate graph: {c.n_nodes} nodes, {n_edges} edges ({n_edges * 24 / 2**20:.1f} MiB "
        f"as int64 pairs + float64); all pairs of consecutive sites' nodes: {all_pairs:.3g} "
        f"({all_pairs * 8 / 2**30:.1f} GiB dense float64)"
    )
    print(f"kept {graph.n_kept} nodes, {int(graph.kept_edges.sum())} edges")
    print(graph.completeness_summary())


if __name__ == "__main__":
    main()
