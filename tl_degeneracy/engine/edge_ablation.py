"""Edge ablation (method.md §6): keep the n largest edges of one section; every output
feature i is recomputed from the input features with its dropped edges zeroed,
`x_i = μ + (f̂ ⊙ m_i) C⁺`, and the model runs on from the output site. Bisection finds the
fewest edges whose score stays within a tolerance of the unablated one ("edges required").

The generic path replicates the batch once per output feature (in chunks) and runs the
section on the model's hooks. Sections with structure have exact fast paths that only touch
the kept edges (or the dropped ones, when fewer): a linear unembedding, a ReLU MLP with
residual, and a LayerNorm-free attention block. `EdgeAblationScorer` keeps the input
features across the masks of a bisection and, for a plain model and a last-position metric,
runs the rest of the model in closed form (`plain_forward.PlainTail`). Tests hold every fast
path to the generic one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.ablation import Metric, reads_last_position_only
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.compat import (
    frozen_parameters,
    hooked_state_dict,
    replace_hooks,
    run_with_hooks,
)
from tl_degeneracy.engine.edges import SectionEdges
from tl_degeneracy.engine.jacobians import closed_form_kind
from tl_degeneracy.engine.plain_forward import PlainBlock, PlainTail, attention_layer
from tl_degeneracy.engine.sections import Section, run_section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import capture_sites
from tl_degeneracy.engine.streaming import chunks, iter_batches


def keep_mask(edges: Float[Tensor, "k_out k_in"], n: int) -> Bool[Tensor, "k_out k_in"]:
    """True on the `n` largest edges (ties broken by index)."""
    flat = torch.zeros(edges.numel(), dtype=torch.bool)
    if n > 0:
        flat[edges.flatten().topk(min(n, edges.numel())).indices] = True
    return flat.reshape(edges.shape)


def _section_kind(model: nn.Module, section: Section) -> str | None:
    """'linear_unembed', 'relu_mlp' or 'attention' where the section has an exact fast path."""
    kind = closed_form_kind(model, section)
    if kind in ("linear_unembed", "relu_mlp"):
        return kind
    if attention_layer(model, section.inp, section.out) is not None:
        return "attention"
    return None


class _OutputRows:
    """The section's output features with each output's dropped input edges zeroed, for one
    batch whose input features are fixed (float64, `[batch, p_out, k_out]`).

    An output is a part linear in its kept inputs (all outputs at once, one product) plus a
    non-linear part that depends only on its own mask row, through a *state* linear in the
    kept inputs (an MLP's pre-activations; an attention block's queries and keys). Rows are
    grouped by content and visited along a short path (`_row_path`): each state is reached
    from the previous row's, the empty row's or the full row's state by adding and removing
    the inputs that differ, so a mask costs about as many input rows as its rows differ,
    not as many as they keep. Each row's non-linear part is remembered across masks (a
    bisection revisits most rows unchanged), up to `cache_bytes`.
    """

    cache_bytes: int = 256 * 2**20

    def __init__(self) -> None:
        self._cache: dict[tuple[int, bytes], Tensor] = {}
        self._cached_bytes = 0

    def _linear(self, mask: Bool[Tensor, "k_out k_in"]) -> Float[Tensor, "batch p_out k_out"]:
        raise NotImplementedError

    def _state(self, full: bool) -> tuple[Tensor, ...]:
        """The state with no input kept, or with every input kept."""
        raise NotImplementedError

    def _move(self, state: tuple[Tensor, ...], add: Tensor, remove: Tensor) -> tuple[Tensor, ...]:
        """The state with the inputs `add` kept and `remove` dropped besides."""
        raise NotImplementedError

    def _read(
        self, state: tuple[Tensor, ...], row: Bool[Tensor, " k_in"], outputs: list[int]
    ) -> Float[Tensor, "batch p_out n"]:
        """The non-linear part of `outputs`, which all have mask row `row` and this state."""
        raise NotImplementedError

    def outputs(self, mask: Bool[Tensor, "k_out k_in"]) -> Float[Tensor, "batch p_out k_out"]:
        out = self._linear(mask)
        groups: dict[bytes, list[int]] = {}
        for i in range(mask.shape[0]):
            key = mask[i].numpy().tobytes()
            hit = self._cache.get((i, key))
            if hit is not None:
                out[..., i] += hit
            else:
                groups.setdefault(key, []).append(i)
        if not groups:
            return out
        rows = [outputs for outputs in groups.values()]
        masks = torch.stack([mask[r[0]] for r in rows])  # distinct rows
        state, current = None, None
        for r, start in _row_path(masks):
            if start is not None:
                state = self._state(full=start)
                current = torch.full_like(masks[r], start)
            assert state is not None and current is not None
            add = (masks[r] & ~current).nonzero()[:, 0]
            remove = (current & ~masks[r]).nonzero()[:, 0]
            state, current = self._move(state, add, remove), masks[r]
            values = self._read(state, masks[r], rows[r])
            key = masks[r].numpy().tobytes()
            for n, i in enumerate(rows[r]):
                out[..., i] += values[..., n]
                self._remember((i, key), values[..., n].clone())
        return out

    def _remember(self, key: tuple[int, bytes], value: Tensor) -> None:
        size = value.numel() * value.element_size()
        while self._cache and self._cached_bytes + size > self.cache_bytes:
            old = self._cache.pop(next(iter(self._cache)))  # first in, first out
            self._cached_bytes -= old.numel() * old.element_size()
        if size <= self.cache_bytes:
            self._cache[key] = value
            self._cached_bytes += size


def _row_path(masks: Bool[Tensor, "rows k_in"]) -> list[tuple[int, bool | None]]:
    """An order to visit distinct mask rows, each with where its state comes from: `None`
    (the previous row's state), `False` (the empty row's) or `True` (the full row's).

    Greedy nearest neighbour on the Hamming distance: the next row is the unvisited one
    closest to the current row, to the empty row or to the full row.
    """
    m = masks.to(torch.float64)
    k_in = m.shape[1]
    kept = m.sum(1)
    between = kept[:, None] + kept[None, :] - 2 * (m @ m.T)  # Hamming distances
    from_empty, from_full = kept, k_in - kept
    todo = torch.ones(len(m), dtype=torch.bool)
    path: list[tuple[int, bool | None]] = []
    current = None
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    while bool(todo.any()):
        restart = torch.minimum(from_empty, from_full)
        near = between[current] if current is not None else restart + 1
        cost = torch.where(todo, torch.minimum(near, restart), inf)
        r = int(cost.argmin())
        if current is not None and near[r] <= restart[r]:
            path.append((r, None))
        else:
            path.append((r, bool(from_full[r] < from_empty[r])))
        todo[r] = False
        current = r
    return path


def _shift(
    state: Float[Tensor, "n width"],
    inputs_t: Float[Tensor, "k_in n"],
    proj: Float[Tensor, "k_in width"],
    add: Tensor,
    remove: Tensor,
) -> Float[Tensor, "n width"]:
    """`state + inputs[:, add] @ proj[add] − inputs[:, remove] @ proj[remove]` in one
    product (inputs stored transposed, so that the rows gathered are contiguous)."""
    if len(add) + len(remove) == 0:
        return state
    idx = torch.cat([add, remove])
    rows = inputs_t[idx]
    if len(remove):
        rows[len(add) :] *= -1
    return torch.addmm(state, rows.T, proj[idx])


def _smaller_side(row: Bool[Tensor, " k_in"]) -> tuple[bool, Tensor]:
    """For one mask row: whether to add the kept inputs to the all-dropped value (True) or
    subtract the dropped ones from the all-kept value (False), and those inputs' indices."""
    n_kept = int(row.sum())
    if 2 * n_kept <= row.numel():
        return True, row.nonzero()[:, 0]
    return False, (~row).nonzero()[:, 0]


class _GenericRows(_OutputRows):
    """Any section, on the model's hooks: the batch is replicated once per output feature (in
    chunks) with the masked input written at the input site."""

    def __init__(self, model, tokens, section, basis_in, basis_out, feats, chunk_size=16):
        super().__init__()
        self.model, self.tokens, self.section = model, tokens, section
        self.basis_in, self.basis_out, self.feats = basis_in, basis_out, feats
        self.chunk_size = chunk_size

    def outputs(self, mask):
        m = mask.to(torch.float64)
        batch = self.tokens.shape[0]
        outs = []
        with frozen_parameters(self.model):
            for sl in chunks(m.shape[0], self.chunk_size):
                idx = torch.arange(sl.start, sl.stop)
                c = idx.numel()
                masked = self.feats[None] * m[idx][:, None, None, :]  # [c, B, P, k_in]
                x = self.basis_in.reconstruct(masked).reshape(c * batch, self.feats.shape[1], -1)
                y = run_section(
                    self.model, self.tokens.repeat(c, 1), self.section, lambda a, x=x: x
                )
                f_out = self.basis_out.features(y).reshape(c, batch, y.shape[1], -1)
                outs.append(f_out[torch.arange(c), :, :, idx].permute(1, 2, 0))
        return torch.cat(outs, -1)


class _LinearUnembedRows(_OutputRows):
    """`logits = x W_U + b_U`: output i is a masked linear function of the inputs."""

    def __init__(self, model, basis_in, basis_out, feats):
        super().__init__()
        sd = hooked_state_dict(model)
        w_u = sd["unembed.W_U"].to(torch.float64)
        b_u = sd.get("unembed.b_U", torch.zeros(w_u.shape[1])).to(torch.float64)
        self.feats = feats
        self.lin = basis_in.C_pinv @ w_u @ basis_out.C  # [k_in, k_out]
        self.const = (basis_in.mean @ w_u + b_u - basis_out.mean) @ basis_out.C

    def outputs(self, mask):
        return self.const + self.feats @ (mask.T.to(torch.float64) * self.lin)


class _ReluMlpRows(_OutputRows):
    """`y = x + ReLU(x W_in + b_in) W_out + b_out` at the output positions (a subset of the
    input positions). Shared per mask row: the hidden activations."""

    def __init__(self, model, section, basis_in, basis_out, feats, n_pos):
        super().__init__()
        layer = int(section.inp.hook.split(".")[1])
        block = PlainBlock.of(model, layer)
        if block is None or not block.has_mlp:
            raise ValueError(f"{section.name}: not a plain ReLU MLP section")
        self.feats = feats[:, _outputs_in_input(section, n_pos)]  # [B, T, k_in]
        self.inputs_t = self.feats.flatten(0, 1).T.contiguous()  # [k_in, B·T]
        self.lin = basis_in.C_pinv @ basis_out.C  # [k_in, k_out]
        self.proj = basis_in.C_pinv @ block.W_in  # [k_in, d_mlp]
        self.read = block.W_out @ basis_out.C  # [d_mlp, k_out]
        self.base_pre = basis_in.mean @ block.W_in + block.b_in
        self.full_pre = self.base_pre + self.inputs_t.T @ self.proj  # [B·T, d_mlp]
        self.const = (basis_in.mean + block.b_out - basis_out.mean) @ basis_out.C

    def _linear(self, mask):
        return self.const + self.feats @ (mask.T.to(torch.float64) * self.lin)

    def _state(self, full):
        return (self.full_pre if full else self.base_pre.expand_as(self.full_pre),)

    def _move(self, state, add, remove):
        return (_shift(state[0], self.inputs_t, self.proj, add, remove),)

    def _read(self, state, row, outputs):
        return (torch.relu(state[0]) @ self.read[:, outputs]).view(*self.feats.shape[:2], -1)


class _AttentionRows(_OutputRows):
    """`y_t = x_t + attn_t(x)` at the output positions, the input at every position. Values
    reach output i only through `W_O C_out[:, i]`, so they are kept contracted with it
    (`[B, S, H]` per output). Shared per mask row: the attention pattern."""

    def __init__(self, model, section, basis_in, basis_out, feats, n_pos):
        super().__init__()
        layer = attention_layer(model, section.inp, section.out)
        block = PlainBlock.of(model, layer) if layer is not None else None
        if block is None:
            raise ValueError(f"{section.name}: not a plain attention section")
        self.heads, self.scale = block.n_heads, block.scale
        self.feats = feats  # [B, S, k_in]
        self.queries = section.out.index(n_pos)
        self.feats_q = feats[:, self.queries]  # [B, T, k_in]
        self.inputs_q = self.feats_q.flatten(0, 1).T.contiguous()  # [k_in, B·T]
        self.inputs_k = feats.flatten(0, 1).T.contiguous()  # [k_in, B·S]
        c_in, mu, c_out = basis_in.C_pinv, basis_in.mean, basis_out.C
        flat = lambda w: w.permute(1, 0, 2).flatten(1)  # noqa: E731  [H, d, e] -> [d, H·e]
        self.proj_q, self.proj_k = c_in @ flat(block.W_Q), c_in @ flat(block.W_K)
        self.base_q = mu @ flat(block.W_Q) + block.b_Q.flatten()
        self.base_k = mu @ flat(block.W_K) + block.b_K.flatten()
        self.full_q = self.base_q + self.inputs_q.T @ self.proj_q  # [B·T, H·e]
        self.full_k = self.base_k + self.inputs_k.T @ self.proj_k  # [B·S, H·e]
        read = torch.einsum("hem,mi->hei", block.W_O, c_out)  # [H, e, k_out]
        self.value_read = torch.einsum("jd,hde,hei->jhi", c_in, block.W_V, read)
        self.base_value = torch.einsum("d,hde,hei->hi", mu, block.W_V, read)
        self.base_value += torch.einsum("he,hei->hi", block.b_V, read)
        self.full_value = self.base_value + torch.einsum("bsj,jhi->bshi", feats, self.value_read)
        self.lin = c_in @ c_out
        self.const = (mu + block.b_O - basis_out.mean) @ c_out
        causal = torch.arange(n_pos)[None, :] <= self.queries[:, None]  # [T, S]
        self.blocked = ~causal[:, :, None]  # [T, S, 1]

    def _linear(self, mask):
        return self.const + self.feats_q @ (mask.T.to(torch.float64) * self.lin)

    def _state(self, full):
        if full:
            return self.full_q, self.full_k
        return self.base_q.expand_as(self.full_q), self.base_k.expand_as(self.full_k)

    def _move(self, state, add, remove):
        q = _shift(state[0], self.inputs_q, self.proj_q, add, remove)
        return q, _shift(state[1], self.inputs_k, self.proj_k, add, remove)

    def _read(self, state, row, outputs):
        batch, n_pos = self.feats.shape[:2]
        q = state[0].view(batch, -1, self.heads, self.proj_q.shape[1] // self.heads)
        k = state[1].view(batch, n_pos, self.heads, -1)
        scores = (q[:, :, None] * k[:, None]).sum(-1) / self.scale  # [B, T, S, H]
        pattern = scores.masked_fill(self.blocked, float("-inf")).softmax(-2)
        add, idx = _smaller_side(row)
        read = self.value_read[idx][..., outputs].flatten(1)  # [n, H·o]
        delta = (self.inputs_k[idx].T @ read).view(batch, n_pos, self.heads, -1)
        if add:
            values = self.base_value[:, outputs] + delta
        else:
            values = self.full_value[..., outputs] - delta
        return torch.einsum("btsh,bsho->bto", pattern, values)


def _output_rows(
    model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    basis_in: SiteBasis,
    basis_out: SiteBasis,
    fast: bool,
    chunk_size: int = 16,
) -> _OutputRows:
    """Capture the input features of one batch and prepare the section's ablated outputs."""
    section = Section(basis_in.site, basis_out.site)
    kind = _section_kind(model, section) if fast else None
    (act_in,) = capture_sites(model, tokens, [basis_in.site])
    feats = basis_in.features(act_in)  # [B, P_in, k_in]
    n_pos = tokens.shape[1]
    if kind == "linear_unembed":
        return _LinearUnembedRows(model, basis_in, basis_out, feats)
    if kind == "relu_mlp":
        return _ReluMlpRows(model, section, basis_in, basis_out, feats, n_pos)
    if kind == "attention":
        return _AttentionRows(model, section, basis_in, basis_out, feats, n_pos)
    return _GenericRows(model, tokens, section, basis_in, basis_out, feats, chunk_size)


@torch.no_grad()
def ablated_output_features(
    model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    basis_in: SiteBasis,
    basis_out: SiteBasis,
    mask: Bool[Tensor, "k_out k_in"],
    fast: bool = True,
    chunk_size: int = 16,
) -> Float[Tensor, "batch p_out k_out"]:
    """Output features with each output's dropped input edges zeroed (float64)."""
    return _output_rows(model, tokens, basis_in, basis_out, fast, chunk_size).outputs(mask)


def _outputs_in_input(section: Section, n_pos: int) -> Tensor:
    """For each output position, its index in the input site's selection."""
    pin, pout = section.inp.index(n_pos).tolist(), section.out.index(n_pos).tolist()
    if any(q not in pin for q in pout):
        raise ValueError(f"{section.name}: output positions must be among the input positions")
    return torch.tensor([pin.index(q) for q in pout])


class EdgeAblationScorer:
    """Scores edge-ablation masks of one section on fixed data (method.md §6).

    Built once per section and reused by the bisection: the input features of every batch
    and everything about the section that does not depend on the mask are kept. When the
    model is plain (see `plain_forward`), the output site is a residual site of its last
    layer and the metric reads only the last position, the rest of the model runs in closed
    form at the last position; otherwise it runs on the model's hooks with the output site
    rewritten. Memory: the input features of all data, float64.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: Int[Tensor, "n pos"],
        basis_in: SiteBasis,
        basis_out: SiteBasis,
        metric: Metric,
        batch_size: int = 2048,
        fast: bool = True,
    ):
        self.model, self.basis_out, self.metric = model, basis_out, metric
        out = basis_out.site
        tail = PlainTail.of(model) if fast and reads_last_position_only(metric) else None
        self.tail = tail if tail is not None and tail.stage(out.hook) is not None else None
        self.batches = []
        with torch.no_grad():
            for batch in iter_batches(tokens, batch_size):
                rows = _output_rows(model, batch, basis_in, basis_out, fast)
                clean = None
                if self.tail is not None and not out.is_logits:
                    (clean,) = capture_sites(model, batch, [Site(out.hook, "all")])
                    clean = clean.to(torch.float64)
                self.batches.append((batch, rows, clean))

    @torch.no_grad()
    def score(self, mask: Bool[Tensor, "k_out k_in"]) -> float:
        """Mean metric with the section's output features recomputed under `mask`."""
        total, n = 0.0, 0
        out_site = self.basis_out.site
        for batch, rows, clean in self.batches:
            new = self.basis_out.reconstruct(rows.outputs(mask))  # [B, p_out, d_out]
            n_pos = batch.shape[1]
            idx = out_site.index(n_pos)
            if self.tail is not None:
                last = [n_pos - 1]
                if out_site.is_logits:
                    slot = (idx == n_pos - 1).nonzero()[:, 0]
                    logits = new[:, slot] if len(slot) else self.model(batch)[:, last]
                else:
                    assert clean is not None  # captured in __init__ for a tail before the logits
                    act = clean.index_copy(1, idx, new)
                    logits = self.tail.logits(out_site.hook, act, last)
            elif out_site.is_logits:
                logits = self.model(batch).clone()
                logits[:, idx] = new.to(logits.dtype)
            else:

                def write(act: Tensor, new=new, idx=idx) -> Tensor:
                    return act.index_copy(1, idx, new.to(act.dtype))

                logits = run_with_hooks(
                    self.model, batch, replace_hooks(self.model, out_site.hook, write)
                )
            scores = self.metric(logits, batch)
            total += float(scores.sum())
            n += int(scores.numel())
        return total / n


def edge_ablation_score(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    basis_in: SiteBasis,
    basis_out: SiteBasis,
    mask: Bool[Tensor, "k_out k_in"],
    metric: Metric,
    batch_size: int = 2048,
    fast: bool = True,
) -> float:
    """Mean metric with the section's output features recomputed under `mask` (one mask;
    use `EdgeAblationScorer` to score several)."""
    scorer = EdgeAblationScorer(model, tokens, basis_in, basis_out, metric, batch_size, fast)
    return scorer.score(mask)


@dataclass
class EdgeAblation:
    """Scores by number of kept edges, and the bisection's answer."""

    section: str
    total_edges: int
    baseline: float
    scores: dict[int, float] = field(default_factory=dict)
    edges_required: int | None = None
    tolerance: float = 0.001

    def to_json(self) -> dict:
        return {
            "section": self.section,
            "total_edges": self.total_edges,
            "baseline": self.baseline,
            "tolerance": self.tolerance,
            "edges_required": self.edges_required,
            "scores": {str(k): v for k, v in sorted(self.scores.items())},
        }


def edges_required(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    edges: SectionEdges,
    basis_in: SiteBasis,
    basis_out: SiteBasis,
    metric: Metric,
    tolerance: float = 0.001,
    baseline: float | None = None,
    batch_size: int = 2048,
    higher_is_better: bool = True,
    log: Callable[[str], None] | None = None,
    fast: bool = True,
) -> EdgeAblation:
    """Fewest kept edges whose score is within `tolerance` of the unablated score: halve
    down from all edges until the score fails, then bisect (the reference's protocol)."""
    from tl_degeneracy.engine.ablation import evaluate

    e = edges.edges
    total = e.numel()
    if baseline is None:
        baseline = evaluate(model, tokens, metric, batch_size)
    result = EdgeAblation(edges.section.name, total, baseline, tolerance=tolerance)
    scorer = EdgeAblationScorer(model, tokens, basis_in, basis_out, metric, batch_size, fast)

    def ok(n: int) -> bool:
        if n not in result.scores:
            result.scores[n] = scorer.score(keep_mask(e, n))
            if log:
                log(f"  {edges.section.name}: {n} edges -> {result.scores[n]:.5f}")
        gap = baseline - result.scores[n]
        return (gap if higher_is_better else -gap) <= tolerance

    result.edges_required = fewest_passing(total, ok)
    return result


def fewest_passing(total: int, ok: Callable[[int], bool]) -> int | None:
    """The fewest n in 1…total with `ok(n)`, searched as the reference does: halve from `total`
    until a count fails, then bisect between the last pass and that failure (0 counts as
    failing). None when even `ok(total)` fails (the bases are truncated too much)."""
    if not ok(total):
        return None
    hi, lo = total, 0  # ok(hi) holds; lo fails
    n = (total + 1) // 2
    while n >= 1:
        if not ok(n):
            lo = n
            break
        hi = n
        n = (n + 1) // 2 if n > 1 else 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
