"""Agreement with the reference implementation on modular addition seed 0: worst feature
cosine and relative Λ error per section (given the reference's next-site basis), end-to-end
top-ten Λ, PCA, node-ablation accuracies at every k of the reference JSON. Needs ../shared."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))

import torch  # noqa: E402
from support import REFERENCE  # noqa: E402
from test_reference_modadd import NEXT, NODE, SITES, P, Seed0, assert_features_match  # noqa: E402

from tl_degeneracy.engine.ablation import last_position_accuracy, node_ablation_curve  # noqa: E402
from tl_degeneracy.engine.bases import interaction_basis, pca_basis  # noqa: E402
from tl_degeneracy.engine.fit import LIBConfig, fit_basis  # noqa: E402
from tl_degeneracy.engine.jacobians import jacobian_gram  # noqa: E402
from tl_degeneracy.engine.sections import Section  # noqa: E402


def main() -> None:
    start = time.perf_counter()
    s = Seed0(REFERENCE)
    print("section given the reference's next-site basis (LIB):")
    for node, site in NODE.items():
        nxt = NEXT[node]
        out_site = SITES[list(NODE).index(node) + 1]
        out_basis = None if nxt is None else s.ref_basis("lib", nxt)[0]
        jg = jacobian_gram(
            s.model, s.train, Section(site, out_site), out_basis, batch_size=4096, progress=False
        )
        st = s.stats[site]
        b = interaction_basis(site, st.mean, st.gram, jg.matrix)
        _, ref_c_pinv, ref_lam = s.ref_basis("lib", node)
        cos, rel = assert_features_match(b.C_pinv, b.importance, ref_c_pinv, ref_lam, st.gram, 1)
        print(f"  {node:8s} kept {b.k:4d}  worst |cos| {cos:.12f}  worst rel Λ err {rel:.2e}")
    print("PCA:")
    for node, site in NODE.items():
        st = s.stats[site]
        b = pca_basis(site, st.mean, st.gram)
        _, ref_c_pinv, ref_var = s.ref_basis("pca", node)
        cos, rel = assert_features_match(b.C_pinv, b.importance, ref_c_pinv, ref_var, st.gram, 1)
        print(f"  {node:8s} kept {b.k:4d}  worst |cos| {cos:.12f}  worst rel var err {rel:.2e}")
    own = s.own()
    print("end to end, own bases at every site, top ten Λ:")
    for node, site in NODE.items():
        lam = own[site].importance[:10]
        ref = s.ref_basis("lib", node)[2][:10]
        print(f"  {node:8s} worst rel err {float(((lam - ref).abs() / ref).max()):.2e}")
    metric = last_position_accuracy(lambda t: (t[:, 0] + t[:, 1]) % P)
    pca = fit_basis(
        s.model,
        s.train,
        LIBConfig(SITES, kind="pca", batch_size=4096, progress=False),
        statistics=s.stats,
    )
    print("node ablation, |ours − reference| test accuracy over every k in the reference JSON:")
    for kind, result in (("lib", own), ("pca", pca)):
        for node, site in NODE.items():
            ref = json.loads((REFERENCE / "seed0" / f"{kind}_node_ablation.json").read_text())
            ref = ref["results"][node]
            ks = sorted(int(k) - 1 for k in ref if int(k) >= 1)
            k_max = result[site].k
            curve = node_ablation_curve(
                s.model,
                result,
                site.name,
                s.test,
                metric,
                ks=[min(k, k_max) for k in ks],
                batch_size=4096,
            )
            worst = max(abs(curve.scores[min(k, k_max)] - ref[str(k + 1)]) for k in ks)
            print(f"  {kind} {node:8s} {len(ks)} values of k, worst difference {worst:.5f}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
