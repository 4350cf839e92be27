"""`prompt-graph`: explain one prediction on one's own prompt in a fitted study's basis."""

from __future__ import annotations

import argparse

from tl_degeneracy.cli.checks import THREADS, check_device, count
from tl_degeneracy.cli.registry import command


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share in (0, 1], got {text}")
    return value


def _prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="a folder written by tl-degeneracy fit (or fit-lm, demo)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="the prompt, as text (BOS first where the model has one)")
    given.add_argument(
        "--token-ids",
        help="the prompt as token ids, e.g. '5 7 113' (a model without a tokenizer)",
    )
    answer = p.add_mutually_exclusive_group()
    answer.add_argument(
        "--answer",
        default=None,
        help="the token whose logit is explained, as text (e.g. ' Mary', mind the space); "
        "default: the model's most likely next token",
    )
    answer.add_argument("--answer-id", type=int, default=None, help="the answer as a token id")
    vs = p.add_mutually_exclusive_group()
    vs.add_argument(
        "--vs",
        default=None,
        help="the token it is compared with: the target is logit(answer) - logit(vs); "
        "default: the most likely other token",
    )
    vs.add_argument("--vs-id", type=int, default=None, help="that token as a token id")
    p.add_argument(
        "--corrupted",
        default=None,
        help="a prompt of the same token length (ids with --token-ids): the graph's nodes "
        "beside attribution patching and activation patching from it",
    )
    p.add_argument("--kind", default="lib", help="which of the study's bases (default: lib)")
    p.add_argument(
        "--positions",
        default=None,
        help="positions that carry nodes (all, last, 1:, or 0,3,-1), the last included; "
        "default: those every site of the graph was fitted at",
    )
    p.add_argument(
        "--top",
        type=count(1),
        default=10,
        help="supporting nodes set to their mean together to check the graph, beside random "
        "sets of as many nodes (default: 10)",
    )
    p.add_argument(
        "--node-share",
        type=_share,
        default=0.8,
        help="share of the influence the kept nodes hold (default: %(default)s)",
    )
    p.add_argument(
        "--details-rows",
        type=count(0, " (0 shows no contexts)"),
        default=48,
        help="corpus rows of 64 tokens (the context, if shorter) whose top contexts the "
        "viewer shows per feature (default: %(default)s; 0: none)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="the model (a preset or a folder), when the study does not record it or records "
        "a path not found from here",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizer folder, in place of the one the study's fit recorded",
    )
    p.add_argument(
        "--compare-sites",
        nargs="+",
        default=None,
        help="sites compared with patching when --corrupted is given (default: every site of "
        "the graph; each costs two forwards: the site patched, and its nodes patched side by "
        "side)",
    )
    p.add_argument("--device", default=None, help="where to run the model (default: the fit's)")
    p.add_argument("--threads", type=THREADS, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: STUDY/prompt_graphs/NNN_KIND, the first unused)",
    )


@command(
    "prompt-graph",
    "explain one prediction on your own prompt in a fitted study's basis: the prompt graph, "
    "checked by intervention, and beside patching given a corrupted prompt",
)(_prompt_args)
def run_prompt_graph(args: argparse.Namespace) -> int:
    from tl_degeneracy.experiments.prompt_job import PromptJob, parse_token_ids, run_prompt_job

    check_device("--device", args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    job = PromptJob(
        study=args.study,
        prompt=args.prompt,
        token_ids=None
        if args.token_ids is None
        else parse_token_ids(args.token_ids, "--token-ids"),
        answer=args.answer,
        vs=args.vs,
        answer_id=args.answer_id,
        vs_id=args.vs_id,
        corrupted=args.corrupted,
        kind=args.kind,
        positions=args.positions,
        top=args.top,
        node_share=args.node_share,
        compare_sites=tuple(args.compare_sites) if args.compare_sites else None,
        details_rows=args.details_rows,
        model=args.model,
        tokenizer=args.tokenizer,
        device=args.device,
        out=args.out,
    )
    run_prompt_job(job)
    return 0
