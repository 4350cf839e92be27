"""Exactness of prompt graphs on small random float64 models (the figures of
docs/prompt_graphs.md; tests/engine/test_prompt_graph.py asserts them to 1e-10).

    python benchmarks/prompt_graph_exactness.py

For each API and model ("mlp": attention + ReLU MLP, no norm; "ln": LayerNorm + GELU), two
layers, LIB with directions below 5% of the largest truncated (so rest nodes hold a real part):
the largest |features + rest node − g·f| over sites and positions, and the largest |edge −
brute-force Jacobian edge| over every edge of the full graph. For the deep linear network
(three attention-only layers, one position), the largest |edge − C⁺ (I + Σ_h W_V W_O) C · f̂|.
"""

from __future__ import annotations

import torch

from tl_degeneracy.engine.attribution import site_gradients
from tl_degeneracy.engine.bases import Truncation
from tl_degeneracy.engine.compat import available_apis, build_model, hooked_state_dict
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.prompt_graph import Target, node_attributions, prompt_graph, site_chain
from tl_degeneracy.engine.prompt_graph.edges import FEATURE, REST
from tl_degeneracy.engine.sections import Section, run_section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import capture_sites


def random_model(api: str, kind: str, seed: int = 0):
    cfg = dict(d_model=8, d_head=4, n_heads=2, d_mlp=16, n_layers=2, n_ctx=4, d_vocab=11,
               act_fn="relu", normalization_type=None)  # fmt: skip
    if kind == "ln":
        cfg.update(normalization_type="LN", act_fn="gelu")
    if kind == "linear":
        cfg.update(n_ctx=1, attn_only=True, n_layers=3, d_mlp=None, d_vocab=40)
    model = build_model(cfg, None, api=api, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith(("w", "weight")) and "ln" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                fan = p.shape[-2] if p.ndim >= 2 else 4
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / fan**0.5)
    return model


def tokens(model, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, model.cfg.n_ctx), generator=gen)


def full(model, result, prompt):
    return prompt_graph(model, result, prompt, Target.logit_difference(3, 4),
                        candidate_share=1.0, max_candidates=10**6)  # fmt: skip


def residual_model(api: str, kind: str) -> tuple[float, float, int]:
    model = random_model(api, kind)
    hooks = [f"blocks.{b}.hook_resid_{s}" for b in range(2) for s in ("pre", "mid")]
    sites = (*(Site(h) for h in hooks), Site("blocks.1.hook_resid_post"), Site("logits", "last"))
    config = LIBConfig(sites, truncation=Truncation(1e-15, 0.05), progress=False)
    result = fit_basis(model, tokens(model, 100, 1), config)
    prompt = tokens(model, 1, 7)
    target = Target.logit_difference(3, 4)
    chain = site_chain(model, result)
    attrs = node_attributions(model, chain, prompt, target, freeze_final_norm=False)
    acts, grads, _ = site_gradients(model, [c.site for c in chain], prompt, target.metric())
    sum_err = max(
        float((attrs.attributions[i].sum(-1) + attrs.rest[i]
               - (acts[c.site.name][0] * grads[c.site.name][0]).sum(-1)).abs().max())
        for i, c in enumerate(chain)
    )  # fmt: skip
    graph = full(model, result, prompt)
    c = graph.candidates
    edge_err, n_edges = 0.0, 0
    for layer in range(1, len(chain)):
        inp, out = chain[layer - 1], chain[layer]
        (x,) = capture_sites(model, prompt, [inp.site])

        def f(v, inp=inp, out=out):
            return run_section(model, prompt, Section(inp.site, out.site), lambda a: v[None])[0]

        jac = torch.autograd.functional.jacobian(f, x[0].to(torch.float64))
        feats = inp.basis.features(x[0])
        rest = x[0] - feats @ inp.basis.C_pinv
        d_out = torch.einsum("tesd,ei->tisd", jac, out.basis.C)
        want_f = torch.einsum("tisd,jd,sj->tisj", d_out, inp.basis.C_pinv, feats)
        want_r = torch.einsum("tisd,sd->tis", d_out, rest)
        into = torch.nonzero((c.layer[c.dst] == layer) & (c.kind[c.dst] == FEATURE))[:, 0]
        for e in into.tolist():
            s, d = int(c.src[e]), int(c.dst[e])
            t, i, p, j = (int(c.position[d]), int(c.feature[d]), int(c.position[s]),
                          int(c.feature[s]))  # fmt: skip
            want = want_r[t, i, p] if c.kind[s] == REST else want_f[t, i, p, j]
            edge_err = max(edge_err, abs(float(c.weight[e]) - float(want)))
            n_edges += 1
    return sum_err, edge_err, n_edges


def linear_model(api: str) -> tuple[float, int]:
    model = random_model(api, "linear")
    sites = (*(Site(f"blocks.{b}.hook_resid_pre") for b in range(3)),
             Site("blocks.2.hook_resid_post"), Site("logits"))  # fmt: skip
    result = fit_basis(model, tokens(model, 400, 1), LIBConfig(sites, progress=False))
    prompt = tokens(model, 1, 3)
    graph = full(model, result, prompt)
    c = graph.candidates
    sd = {k: v.to(torch.float64) for k, v in hooked_state_dict(model).items()}
    chain = site_chain(model, result)
    (acts,) = [capture_sites(model, prompt, [ch.site for ch in chain])]
    err, n = 0.0, 0
    for e in range(c.src.numel()):
        s, d = int(c.src[e]), int(c.dst[e])
        ls = int(c.layer[s])
        if c.kind[s] != FEATURE or int(c.layer[d]) >= len(chain):
            continue
        ov = torch.einsum("hde,hem->dm", sd[f"blocks.{ls}.attn.W_V"], sd[f"blocks.{ls}.attn.W_O"])
        w = torch.eye(ov.shape[0], dtype=ov.dtype) + ov
        b_in, b_out = chain[ls].basis, chain[ls + 1].basis
        j, i = int(c.feature[s]), int(c.feature[d])
        want = b_in.features(acts[ls][0, 0])[j] * (b_in.C_pinv[j] @ w @ b_out.C[:, i])
        err = max(err, abs(float(c.weight[e]) - float(want)))
        n += 1
    return err, n


def main() -> None:
    torch.set_num_threads(1)
    print(
        "| API | model | max \\|features + rest − g·f\\| | max \\|edge − Jacobian edge\\| | edges |"
    )
    print("|---|---|---:|---:|---:|")
    for api in available_apis():
        for kind in ("mlp", "ln"):
            s, e, n = residual_model(api, kind)
            print(f"| {api} | {kind} | {s:.1e} | {e:.1e} | {n} |")
    print()
    print("| API | deep linear: max \\|edge − C⁺ (I + Σ W_V W_O) C · f̂\\| | edges |")
    print("|---|---:|---:|")
    for api in available_apis():
        e, n = linear_model(api)
        print(f"| {api} | {e:.1e} | {n} |")


if __name__ == "__main__":
    main()
