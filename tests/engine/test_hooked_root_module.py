"""The engine on a model written as a TransformerLens `HookedRootModule` (no position axis,
sites by hook names, the output as the final site): the method's identities, `M'` by the
declared ReLU closed form against autograd and a brute-force Jacobian, a deep linear network's
diagonal edges, node and edge ablation against hand-written hooks, attach, save and load."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from tl_degeneracy.engine.ablation import evaluate, node_ablation_curve
from tl_degeneracy.engine.artifacts import ArtifactError
from tl_degeneracy.engine.attach import attach, feature_hook_name
from tl_degeneracy.engine.bases import Truncation
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import run_with_hooks
from tl_degeneracy.engine.edge_ablation import (
    EdgeAblationScorer,
    ablated_output_features,
    edge_ablation_score,
    edges_required,
    keep_mask,
)
from tl_degeneracy.engine.edges import interaction_graph, section_edges
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.jacobians import jacobian_gram
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import capture_sites, collect_statistics
from tl_degeneracy.engine.structures import autograd_only, structure_of
from tl_degeneracy.engine.structures.forms import Affine
from tl_degeneracy.models.digits.model import DigitsMLP, DigitsMLPConfig, init_weights

F64 = torch.float64
CFG = DigitsMLPConfig(d_in=6, hidden=(9, 7), n_classes=8)


def relu_mlp(seed: int = 0, cfg: DigitsMLPConfig = CFG) -> DigitsMLP:
    """A random float64 ReLU MLP, weights and biases U(±2/√fan_in): units on and off."""
    return init_weights(DigitsMLP(cfg, dtype=F64), seed, scale=2.0).eval()


def inputs(n: int, d: int, seed: int = 1) -> Tensor:
    return torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(seed))


def sites_of(model) -> list[Site]:
    return [Site(name) for name in model.cut_names]


def out_basis(result: BasisResult, site: Site) -> Tensor | None:
    """The matrix the fit used for the next site's features (None: raw coordinates)."""
    b = result[site.name]
    return None if b.kind == "raw" else b.C


def margin(logits: Tensor, x: Tensor) -> Tensor:
    """A continuous metric (logit 0 − logit 1), so that no difference hides behind an argmax."""
    return (logits[..., 0] - logits[..., 1]).to(F64).reshape(-1)


def agreement(model: nn.Module, x: Tensor):
    """Accuracy against the unablated model's own argmax, inputs looked up by value."""
    with torch.no_grad():
        table = {tuple(r.tolist()): int(c) for r, c in zip(x, model(x).argmax(-1))}

    def metric(logits: Tensor, batch: Tensor) -> Tensor:
        target = torch.tensor([table[tuple(r.tolist())] for r in batch])
        return (logits.argmax(-1) == target).to(F64)

    return metric


def capture(model: nn.Module, x: Tensor, site: Site) -> Tensor:
    """The site's activation, `[n, d]` (the engine adds a position axis of one)."""
    (act,) = capture_sites(model, x, [site])
    assert act.shape[:2] == (x.shape[0], 1)
    return act[:, 0]


def write_at(model: nn.Module, x: Tensor, hook: str, value: Tensor) -> Tensor:
    """The model's output with the activation at `hook` replaced by `value`."""
    return run_with_hooks(model, x, [(hook, lambda act, hook: value.to(act.dtype))])


@pytest.fixture(scope="module")
def fitted():
    model = relu_mlp()
    x = inputs(160, CFG.d_in)
    sites = sites_of(model)
    lib = fit_basis(model, x, LIBConfig(tuple(sites), progress=False))
    return model, x, sites, lib


# -- the method's identities and M' -------------------------------------------------------------


def test_lib_identities(fitted):
    model, x, sites, lib = fitted
    stats = collect_statistics(model, sites, x, progress=False)
    assert lib[sites[-1].name].kind == "raw"
    for site, nxt in zip(sites, sites[1:]):
        b = lib[site.name]
        assert b.kind == "lib" and 0 < b.k <= b.d
        m_prime = jacobian_gram(
            model, x, Section(site, nxt), out_basis(lib, nxt), progress=False
        ).matrix
        eye = torch.eye(b.k, dtype=F64)
        gram = stats[site].gram
        scale = float(b.importance[0])
        torch.testing.assert_close(
            b.C.T @ gram @ b.C, torch.diag(b.importance), rtol=0, atol=1e-10 * scale
        )
        torch.testing.assert_close(b.C_pinv @ b.C, eye, rtol=0, atol=1e-10)
        torch.testing.assert_close(b.C_pinv @ m_prime @ b.C_pinv.T, eye, rtol=0, atol=1e-10)
        assert torch.all(b.importance[:-1] >= b.importance[1:])
        # each feature's mean square on the data (one position per input) is its Λ
        feats = b.features(capture(model, x, site))
        torch.testing.assert_close(feats.pow(2).mean(0), b.importance, rtol=1e-9, atol=1e-12)


def through_hooks(model: nn.Module, x: Tensor, inp: Site, out: Site):
    """`f ↦ activation at out` for one input, with the activation at `inp` replaced by `f`."""

    def fn(f: Tensor) -> Tensor:
        seen: dict[str, Tensor] = {}
        hooks = [(inp.hook, lambda act, hook: f[None])]
        if not out.is_logits:
            hooks.append((out.hook, lambda act, hook: seen.setdefault("out", act)))
        logits = run_with_hooks(model, x[None], hooks)
        return (logits if out.is_logits else seen["out"])[0]

    return fn


def test_m_prime_closed_form_equals_autograd_and_brute_force(fitted):
    model, x, sites, lib = fitted
    kinds = ["closed_form:relu_mlp"] * (len(sites) - 2) + ["closed_form:affine"]
    for (site, nxt), kind in zip(zip(sites, sites[1:]), kinds):
        section = Section(site, nxt)
        assert structure_of(model, section).describe() == kind
        c_out = out_basis(lib, nxt)
        fast = jacobian_gram(model, x, section, c_out, progress=False)
        with autograd_only():
            assert structure_of(model, section).describe() == "generic"
            slow = jacobian_gram(model, x, section, c_out, progress=False)
        assert fast.method == kind and slow.method != kind
        assert fast.count == slow.count == x.shape[0]
        torch.testing.assert_close(fast.matrix, slow.matrix, rtol=0, atol=1e-11)
        # brute force: one full Jacobian per input, M' = (1/N) Σ_b Jᵀ C Cᵀ J
        acts = capture(model, x, site)
        k_out = (
            torch.eye(capture(model, x, nxt).shape[-1], dtype=F64)
            if c_out is None
            else c_out @ c_out.T
        )
        brute = torch.zeros_like(fast.matrix)
        for b in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(through_hooks(model, x[b], site, nxt), acts[b])
            brute += jac.T @ k_out @ jac
        torch.testing.assert_close(fast.matrix, brute / x.shape[0], rtol=0, atol=1e-11)
        assert fast.matrix.abs().max() > 1e-3


def test_final_section_rank_bounds_the_last_basis():
    """Into raw logits the Jacobian is `W_out`: `M'` has rank n_classes, so with a relative
    cut-off LIB keeps exactly n_classes features at the last hidden layer."""
    cfg = DigitsMLPConfig(d_in=6, hidden=(9, 12), n_classes=4)
    model = relu_mlp(2, cfg)
    x = inputs(200, cfg.d_in)
    sites = sites_of(model)
    config = LIBConfig(tuple(sites), truncation=Truncation(relative=1e-12), progress=False)
    lib = fit_basis(model, x, config)
    last = lib[sites[-2].name]
    assert last.d == 12 and last.k == torch.linalg.matrix_rank(model.W_out).item() == 4


# -- a deep linear network ----------------------------------------------------------------------


class LinearChain(HookedRootModule):
    """`y = (…(x W_0 + b_0)…) W_L + b_L`, a hook after every layer, identity activations;
    declares its sections as `Affine` forms unless `declare` is False (then the engine's
    generic path through the hooks computes everything)."""

    def __init__(self, widths: tuple[int, ...], seed: int, declare: bool = True):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.declare = declare
        self.hook_in = HookPoint()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.weights.append(nn.Parameter(torch.randn(a, b, dtype=F64, generator=gen) / a**0.5))
            self.biases.append(nn.Parameter(torch.randn(b, dtype=F64, generator=gen)))
        self.points = nn.ModuleList(HookPoint() for _ in widths[1:-1])
        self.setup()

    @property
    def cut_names(self) -> list[str]:
        return ["hook_in", *(f"points.{i}" for i in range(len(self.points))), "logits"]

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_in(x)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w + b
            if i < len(self.points):
                x = self.points[i](x)
        return x

    def section_form(self, inp: str, out: str) -> Affine | None:
        cuts = self.cut_names
        if not self.declare or inp not in cuts or out not in cuts:
            return None
        i = cuts.index(inp)
        return Affine(self.weights[i], self.biases[i]) if cuts.index(out) == i + 1 else None


@pytest.mark.parametrize("declare", [True, False])
def test_deep_linear_network_edges_are_diagonal(declare):
    model = LinearChain((5, 5, 5, 5, 7), seed=3, declare=declare)
    x = inputs(120, 5)
    sites = sites_of(model)
    lib = fit_basis(model, x, LIBConfig(tuple(sites), progress=False))
    graph = interaction_graph(model, x, lib, progress=False)
    expected = "closed_form:affine" if declare else "generic"
    lams = [lib[s.name].importance for s in sites[:-1]]
    for i, (site, nxt) in enumerate(zip(sites, sites[1:])):
        assert structure_of(model, Section(site, nxt)).describe() == expected
        e = graph[f"{site.name}->{nxt.name}"].edges
        lam = lib[site.name].importance
        assert lam.shape == (5,) and (e >= 0).all()
        # a linear single-position section: Σ_i E_ij = Λ_j
        torch.testing.assert_close(e.sum(0), lam, rtol=1e-9, atol=1e-12 * float(lam[0]))
        if not nxt.is_logits:  # between LIB sites each feature talks to one feature
            off = e - torch.diag(torch.diagonal(e))
            assert e.shape == (5, 5) and off.abs().max() < 1e-10 * e.max()
            torch.testing.assert_close(lams[i + 1], lam, rtol=1e-9, atol=1e-12 * float(lam[0]))


# -- ablations, attach, save and load ------------------------------------------------------------


def kept(basis, act: Tensor, k: int) -> Tensor:
    """`μ + f̂_{:k} C⁺_{:k}`: the site's activation with only the top k features."""
    return basis.mean + basis.features(act)[..., :k] @ basis.C_pinv[:k]


def test_node_ablation_equals_hand_written_hooks(fitted):
    model, x, sites, lib = fitted
    baseline = evaluate(model, x, margin)
    for site in sites[:-1]:
        b = lib[site.name]
        curve = node_ablation_curve(model, lib, site.name, x, margin, ks=range(b.k + 1))
        assert curve.baseline == baseline and sorted(curve.scores) == list(range(b.k + 1))
        act = capture(model, x, site)
        for k in range(b.k + 1):
            with torch.no_grad():
                logits = write_at(model, x, site.hook, kept(b, act, k))
            expected = float(margin(logits, x).mean())
            assert curve.scores[k] == pytest.approx(expected, rel=1e-12, abs=1e-12)
        # the dropped directions carry no variance, so keeping every feature is exact
        assert curve.scores[b.k] == pytest.approx(baseline, rel=1e-10, abs=1e-10)
        # attach(keep=…) is the same ablation
        with attach(model, lib, keep={site.name: 2}), torch.no_grad():
            assert float(margin(model(x), x).mean()) == pytest.approx(curve.scores[2], rel=1e-12)


def test_float32_inputs_of_a_float64_model_are_converted(fitted):
    """Data loaded as float32 runs a float64 model (converted, as a basis is), and a site
    is given as a `Site` or by name alike; torch used to fail inside the first layer."""
    model, x, sites, lib = fitted
    site = sites[1]
    by_name = node_ablation_curve(model, lib, site.name, x, margin, ks=(0, 2))
    by_site = node_ablation_curve(model, lib, site, x.float(), margin, ks=(0, 2))
    assert by_site.site == site.name
    for k in (0, 2):  # the inputs were rounded to float32, nothing else changed
        assert by_site.scores[k] == pytest.approx(by_name.scores[k], rel=1e-5, abs=1e-6)
    refit = fit_basis(model, x.float(), LIBConfig(tuple(sites), progress=False))
    assert refit[site.name].C.dtype == F64
    torch.testing.assert_close(
        refit[site.name].importance, lib[site.name].importance, rtol=1e-4, atol=1e-8
    )
    with pytest.raises(KeyError, match="no basis at site 'hook_nowhere'"):
        node_ablation_curve(model, dict(lib.bases), "hook_nowhere", x, margin)


def test_attach_leaves_logits_unchanged(fitted):
    model, x, sites, lib = fitted
    with torch.no_grad():
        clean = model(x)
    with attach(model, lib):
        logits, cache = model.run_with_cache(x)
    torch.testing.assert_close(logits, clean, rtol=0, atol=1e-12)
    for site in sites[:-1]:
        b = lib[site.name]
        feats = b.features(capture(model, x, site))
        # the feature hook carries the engine's position axis of one: [n, 1, k]
        cached = cache[feature_hook_name(b)].reshape(feats.shape)
        torch.testing.assert_close(cached, feats, rtol=0, atol=0)
    assert not any("features" in name for name in model.hook_dict)  # detached on exit


def test_edge_ablation_equals_hand_written_section(fitted):
    """Each output feature recomputed from the input features with its dropped edges zeroed,
    through the layer's own weights; the closed form, the generic path and that agree."""
    model, x, sites, lib = fitted
    gen = torch.Generator().manual_seed(4)
    for i, (site, nxt) in enumerate(zip(sites, sites[1:])):
        b_in, b_out = lib[site.name], lib[nxt.name]
        mask = torch.rand(b_out.k, b_in.k, generator=gen) < 0.5
        fast = ablated_output_features(model, x, b_in, b_out, mask)
        with autograd_only():
            slow = ablated_output_features(model, x, b_in, b_out, mask)
        feats = b_in.features(capture(model, x, site))
        if nxt.is_logits:
            w, bias, relu = model.W_out, model.b_out, False
        else:
            w, bias, relu = model.layers[i].W_in, model.layers[i].b_in, True
        hand = torch.empty(x.shape[0], b_out.k, dtype=F64)
        with torch.no_grad():
            for j in range(b_out.k):
                y = (b_in.mean + (feats * mask[j]) @ b_in.C_pinv) @ w + bias
                hand[:, j] = b_out.features(y.clamp(min=0) if relu else y)[:, j]
        torch.testing.assert_close(fast.reshape(hand.shape), hand, rtol=0, atol=1e-10)
        torch.testing.assert_close(slow.reshape(hand.shape), hand, rtol=0, atol=1e-10)
        # the scorer runs the rest of the model on the recomputed output
        scorer = EdgeAblationScorer(model, x, b_in, b_out, margin)
        new = b_out.reconstruct(hand)
        with torch.no_grad():
            logits = new if nxt.is_logits else write_at(model, x, nxt.hook, new)
        expected = margin(logits, x).mean()
        assert scorer.score(mask) == pytest.approx(float(expected), rel=1e-10, abs=1e-10)


def test_edges_required_on_the_mlp(fitted):
    model, x, sites, lib = fitted
    metric = agreement(model, x)
    assert evaluate(model, x, metric) == 1.0
    b_in, b_out = lib[sites[1].name], lib[sites[2].name]
    edges = section_edges(model, x, b_in, b_out, progress=False)
    assert edges.method == "closed_form:relu_mlp"
    full = torch.ones(b_out.k, b_in.k, dtype=torch.bool)
    assert edge_ablation_score(model, x, b_in, b_out, full, metric) == 1.0
    res = edges_required(model, x, edges, b_in, b_out, metric, tolerance=0.05)
    n = res.edges_required
    assert n is not None and 1 <= n <= edges.total_edges
    assert res.baseline - res.scores[n] <= 0.05
    if n - 1 in res.scores:
        assert res.baseline - res.scores[n - 1] > 0.05
    again = edge_ablation_score(model, x, b_in, b_out, keep_mask(edges.edges, n), metric)
    assert again == res.scores[n]


def test_save_load_refuses_other_weights(fitted, tmp_path):
    model, x, sites, lib = fitted
    folder = lib.save(tmp_path / "lib")
    loaded = BasisResult.load(folder, model)
    for site in sites:
        assert torch.equal(loaded[site.name].C, lib[site.name].C)
        assert loaded[site.name].site == site
    assert loaded.metadata["model"]["model_name"] == "DigitsMLP"
    with pytest.raises(ArtifactError, match="other weights"):
        BasisResult.load(folder, relu_mlp(seed=5))
    with pytest.raises(ArtifactError, match="weight_shapes.*layers.1.W_in"):
        BasisResult.load(folder, relu_mlp(0, DigitsMLPConfig(d_in=6, hidden=(9, 8), n_classes=8)))


class Recurrent(HookedRootModule):
    """One layer applied three times through the same hook point: not a cut."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=F64)
        self.hook_in, self.hook_h = HookPoint(), HookPoint()
        self.setup()

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_in(x)
        for _ in range(3):
            x = self.hook_h(torch.tanh(self.lin(x)))
        return x


def test_a_hook_that_runs_several_times_is_not_a_site():
    """It used to be fitted at its last application and fail later on mismatched shapes."""
    from tl_degeneracy.engine.sites import SiteError

    model = Recurrent()
    x = torch.randn(20, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    sites = (Site("hook_in"), Site("hook_h"), Site("logits"))
    with pytest.raises(SiteError, match=r"\['hook_h'\] ran 3 times in one forward"):
        fit_basis(model, x, LIBConfig(sites, progress=False))
