"""Faithfulness of prompt graphs on SmolLM2 indirect-object prompts, LIB and PCA side by side
(the table of docs/prompt_graphs.md), and the side-by-side with attribution patching on one
pair.

    python benchmarks/prompt_graph_ioi.py --pairs 16 --threads 1   # final norm frozen and not
    python benchmarks/prompt_graph_ioi.py --pairs 0 --compare 5     # the comparison only

The bases come from the cache that `experiments.prompt_graph_ioi.ioi_bases` fills (fitted on
first use). For each pair and basis, the graph's 10 most influential kept nodes that support
the prediction are set to their mean together and compared with 20 draws of 10 random feature
nodes of equal or larger |activation|.
"""

from __future__ import annotations

import argparse
import json

import torch

COMPARE_SITES = [f"blocks.{b}.hook_resid_pre" for b in (16, 20, 24, 28)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--random", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--compare", type=int, default=5, help="nodes per site against patching (0: skip)"
    )
    parser.add_argument(
        "--freeze-final-norm",
        choices=["on", "off", "both"],
        default="both",
        help="hold the final norm's scale in the graphs (on), use the model's own gradient "
        "(off), or run both side by side",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tl_degeneracy.engine.prompt_graph import Target
    from tl_degeneracy.engine.prompt_graph.compare import compare_with_patching
    from tl_degeneracy.experiments.ioi import ioi_prompt_pairs
    from tl_degeneracy.experiments.prompt_graph_ioi import ioi_bases, ioi_faithfulness
    from tl_degeneracy.models import load_smollm2

    model = load_smollm2()
    bases = ioi_bases(model)
    freezes = {"on": [True], "off": [False], "both": [True, False]}[args.freeze_final_norm]
    for freeze in freezes if args.pairs else []:
        print(f"\nfreeze_final_norm={freeze}")
        result = ioi_faithfulness(
            model, n_pairs=args.pairs, bases=bases, n_random=args.random,
            freeze_final_norm=freeze,
        )  # fmt: skip
        print(result.table())
        print(json.dumps(result.summary(), indent=1))
    if args.compare:
        pairs = ioi_prompt_pairs(model.tokenizer, 1)
        target = Target.logit_difference(int(pairs.io_tokens[0]), int(pairs.s_tokens[0]))
        positions = tuple(range(1, pairs.clean_tokens.shape[1]))
        print(f"\n{pairs.prompts[0]!r} against {pairs.corrupted_prompts[0]!r}")
        for kind, basis in bases.items():
            comparison = compare_with_patching(
                model, basis, pairs.clean_tokens, pairs.corrupted_tokens, target,
                sites=COMPARE_SITES, positions=positions, top=args.compare,
            )  # fmt: skip
            print(f"\n{kind.upper()}: target clean {comparison.clean_value:.3f}, corrupted "
                  f"{comparison.corrupted_value:.3f}")  # fmt: skip
            print(comparison.sites_table())
            print(f"max |Σ nodes − TransformerLens| / max |value|: "
                  f"{comparison.max_site_discrepancy():.1e}")  # fmt: skip
            for site in COMPARE_SITES:
                print(f"{site}: Spearman ρ(attribution patching, patching) over "
                      f"{args.compare} nodes {comparison.correlation(site):.3f}")  # fmt: skip
            print(f"all {len(comparison.nodes)} nodes: ρ = {comparison.correlation():.3f}")


if __name__ == "__main__":
    main()
