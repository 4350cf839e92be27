"""The forward pass of a LayerNorm-free transformer layer written out in float64 tensors.

The fast paths of edges, edge ablation and node ablation need to run pieces of the model on
many modified copies of one site's activation (one copy per kept-feature count, or per output
feature). Running the whole model through its hooks for each copy repeats the embedding, all
positions and all layers; the pieces written out here compute only what the copy changes:

- `PlainBlock`: one block's attention (at chosen query positions only) and MLP, read from the
  model's HookedTransformer-named weights, so HookedTransformer and TransformerBridge give
  the same tensors;
- `PlainTail`: the last block plus the unembedding, i.e. the map from a residual site of the
  last layer to the logits, which is what an ablation at that site feeds.

Only models without normalisation, with standard (additive) positional embeddings, full
multi-head attention and an elementwise MLP activation are written out (`PlainBlock.of`
returns None otherwise, and callers fall back to the generic hook path). Tests hold every
function here to the model's own forward.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.compat import has_hooked_weights, hooked_state_dict
from tl_degeneracy.engine.sites import LOGITS
from tl_degeneracy.engine.synchronisation import device_index

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def query_index(
    queries: Sequence[int] | Tensor, n_keys: int, device: torch.device
) -> tuple[Tensor, bool | None]:
    """Query positions as an index on `device` (negative ones count from the end), and whether
    the causal mask matters (a query before the last key). Positions given on the host are
    worked out there and their index made once per device; positions already on the device
    are used as they are (the mask is then decided there, `attend_qkv`)."""
    if isinstance(queries, Tensor) and queries.device.type != "cpu":
        return queries, None
    listed = queries.tolist() if isinstance(queries, Tensor) else list(queries)
    pos = [int(p) % n_keys if p < 0 else int(p) for p in listed]
    return device_index(pos, device), any(p < n_keys - 1 for p in pos)


def is_plain(model: nn.Module) -> bool:
    """True when every block can be written out: no normalisation, standard positional
    embeddings, causal attention with one key/value head per query head, no score capping
    or local windows, an elementwise MLP, and weights a HookedTransformer would hold."""
    cfg = model.cfg
    act = getattr(cfg, "act_fn", None)
    return (
        has_hooked_weights(model)
        and getattr(cfg, "normalization_type", None) is None
        and getattr(cfg, "positional_embedding_type", "standard") == "standard"
        and not getattr(cfg, "n_key_value_heads", None)
        and float(getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) <= 0
        and not getattr(cfg, "gated_mlp", False)
        and not getattr(cfg, "use_local_attn", False)
        and getattr(cfg, "attention_dir", "causal") == "causal"
        and not getattr(cfg, "use_qk_norm", False)
        and (getattr(cfg, "attn_only", False) or str(act) in ACTIVATIONS)
    )


def attention_scale(model: nn.Module) -> float:
    """The divisor of the attention scores (√d_head unless configured otherwise)."""
    cfg: Any = model.cfg
    if not getattr(cfg, "use_attn_scale", True):
        return 1.0
    configured = float(getattr(cfg, "attn_scale", -1.0) or -1.0)  # ≤ 0 means √d_head (Bridge)
    return configured if configured > 0 else math.sqrt(cfg.d_head)


@dataclass(frozen=True)
class PlainBlock:
    """Weights of one block (float64, HookedTransformer shapes and names)."""

    layer: int
    W_Q: Float[Tensor, "head d_model d_head"]
    W_K: Float[Tensor, "head d_model d_head"]
    W_V: Float[Tensor, "head d_model d_head"]
    W_O: Float[Tensor, "head d_head d_model"]
    b_Q: Float[Tensor, "head d_head"]
    b_K: Float[Tensor, "head d_head"]
    b_V: Float[Tensor, "head d_head"]
    b_O: Float[Tensor, " d_model"]
    scale: float
    W_in: Float[Tensor, "d_model d_mlp"] | None = None
    b_in: Float[Tensor, " d_mlp"] | None = None
    W_out: Float[Tensor, "d_mlp d_model"] | None = None
    b_out: Float[Tensor, " d_model"] | None = None
    act_fn: str = "relu"

    @classmethod
    def of(
        cls,
        model: nn.Module,
        layer: int,
        state: dict[str, Tensor] | None = None,
        dtype: torch.dtype | None = torch.float64,
    ) -> PlainBlock | None:
        """The block's weights, or None when the model is not plain (see `is_plain`).
        `dtype=None` keeps the weights as they are (differentiable when `state` is)."""
        if not is_plain(model):
            return None
        sd = state if state is not None else hooked_state_dict(model)
        p = f"blocks.{layer}."
        w = {
            k[len(p) :]: v if dtype is None else v.to(dtype)
            for k, v in sd.items()
            if k.startswith(p)
        }
        w_q = w["attn.W_Q"]
        heads, d_model, d_head = w_q.shape
        zeros = w_q.new_zeros(heads, d_head).detach()
        mlp: dict[str, Any] = {}
        if "mlp.W_in" in w:
            cfg: Any = model.cfg
            mlp = dict(
                W_in=w["mlp.W_in"],
                b_in=w.get("mlp.b_in", w_q.new_zeros(w["mlp.W_in"].shape[1]).detach()),
                W_out=w["mlp.W_out"],
                b_out=w.get("mlp.b_out", w_q.new_zeros(d_model).detach()),
                act_fn=str(cfg.act_fn),
            )
        return cls(
            layer,
            w_q,
            w["attn.W_K"],
            w["attn.W_V"],
            w["attn.W_O"],
            w.get("attn.b_Q", zeros),
            w.get("attn.b_K", zeros),
            w.get("attn.b_V", zeros),
            w.get("attn.b_O", w_q.new_zeros(d_model).detach()),
            attention_scale(model),
            **mlp,
        )

    @property
    def n_heads(self) -> int:
        return int(self.W_Q.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PlainBlock:
        """The same block with its tensors on `device` (and in `dtype`)."""
        fields = {
            f.name: getattr(self, f.name).to(
                device=device, dtype=dtype or getattr(self, f.name).dtype
            )
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **fields)

    @property
    def has_mlp(self) -> bool:
        return self.W_in is not None

    def qkv_weight(self) -> tuple[Float[Tensor, "d_model three_hd"], Float[Tensor, " three_hd"]]:
        """Queries, keys and values of all heads as one linear map `x W + b`; the last axis
        splits as `[3, head, d_head]`."""
        w = torch.stack([self.W_Q, self.W_K, self.W_V])  # [3, H, d, dh]
        b = torch.stack([self.b_Q, self.b_K, self.b_V])  # [3, H, dh]
        return w.permute(2, 0, 1, 3).flatten(1), b.flatten()

    def attend(
        self,
        qkv: Float[Tensor, "... pos three_hd"],
        queries: Sequence[int] | Tensor,
    ) -> Float[Tensor, "... query d_model"]:
        """Attention output (with `b_O`, without the residual) at the query positions, from
        the projected queries/keys/values of every position (causal mask)."""
        q_idx, masked = query_index(queries, qkv.shape[-2], qkv.device)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.attend_qkv(q[..., q_idx, :], k, v, q_idx, masked)

    def attend_qkv(
        self,
        q: Float[Tensor, "... query hd"],
        k: Float[Tensor, "... key hd"],
        v: Float[Tensor, "... key hd"],
        queries: Tensor,
        masked: bool | None = None,
    ) -> Float[Tensor, "... query d_model"]:
        """Causal attention output (with `b_O`) at the query positions `queries`, from the
        queries there and the keys and values of every position (heads flattened last). Few
        positions (modular addition): broadcast products, faster than batched tiny matrix
        products; many: einsum. `masked` says whether a query comes before the last key (None:
        read from `queries`, which waits on a GPU; `query_index` knows it on the host)."""
        h = self.n_heads
        q, k, v = q.unflatten(-1, (h, -1)), k.unflatten(-1, (h, -1)), v.unflatten(-1, (h, -1))
        n_keys = k.shape[-3]
        few = q.shape[-3] * n_keys <= 64
        if few:
            scores = (q[..., :, None, :, :] * k[..., None, :, :, :]).sum(-1)
        else:
            scores = torch.einsum("...thd,...shd->...tsh", q, k)
        scores = scores / self.scale  # [..., query, key, head]
        if masked is None:
            masked = bool((queries < n_keys - 1).any())
        if masked:
            allowed = (
                torch.arange(n_keys, device=q.device)[None, :] <= queries[:, None]
            )  # [query, key]
            scores = scores.masked_fill(~allowed[..., None], float("-inf"))
        pattern = scores.softmax(-2)
        if few:
            z = (pattern[..., None] * v[..., None, :, :, :]).sum(-3)  # [..., query, head, d_head]
        else:
            z = torch.einsum("...tsh,...shd->...thd", pattern, v)
        return z.flatten(-2) @ self.W_O.flatten(0, 1) + self.b_O

    def attention(
        self, x: Float[Tensor, "... pos d_model"], queries: Sequence[int] | Tensor
    ) -> Float[Tensor, "... query d_model"]:
        """Attention output at the query positions given the residual stream `x`."""
        w, b = self.qkv_weight()
        return self.attend(x @ w + b, queries)

    def mlp_from_pre(self, pre: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_model"]:
        """MLP output (without the residual) from its pre-activation."""
        assert self.W_out is not None and self.b_out is not None
        return ACTIVATIONS[self.act_fn](pre) @ self.W_out + self.b_out

    def mlp(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """MLP output (without the residual); zero for attention-only blocks."""
        if not self.has_mlp:
            return torch.zeros_like(x)
        assert self.W_in is not None and self.b_in is not None
        return self.mlp_from_pre(x @ self.W_in + self.b_in)


@dataclass(frozen=True)
class PlainTail:
    """The last block and the unembedding: logits at chosen positions from a residual site
    of the last layer (`hook_resid_pre`, `hook_resid_mid`, `hook_resid_post`, or the
    previous block's `hook_resid_post`, which is the same stream)."""

    block: PlainBlock
    W_U: Float[Tensor, "d_model vocab"]
    b_U: Float[Tensor, " vocab"]

    @classmethod
    def of(cls, model: nn.Module) -> PlainTail | None:
        if not is_plain(model):
            return None
        sd = hooked_state_dict(model)
        cfg: Any = model.cfg
        block = PlainBlock.of(model, cfg.n_layers - 1, sd)
        assert block is not None
        w_u = sd["unembed.W_U"].to(torch.float64)
        b_u = sd.get("unembed.b_U", w_u.new_zeros(w_u.shape[1])).to(torch.float64)
        return cls(block, w_u, b_u)

    def stage(self, hook: str) -> str | None:
        """Where `hook` enters the tail: 'pre', 'mid', 'post', 'logits', or None."""
        last = self.block.layer
        names = {
            f"blocks.{last}.hook_resid_pre": "pre",
            f"blocks.{last}.hook_resid_mid": "mid",
            f"blocks.{last}.hook_resid_post": "post",
            LOGITS: "logits",
        }
        if last > 0:
            names[f"blocks.{last - 1}.hook_resid_post"] = "pre"
        return names.get(hook)

    def from_mid(self, resid_mid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        """Logits from the residual stream after attention (per position)."""
        return (resid_mid + self.block.mlp(resid_mid)) @ self.W_U + self.b_U

    def logits(
        self,
        hook: str,
        act: Float[Tensor, "... pos d"],
        queries: Sequence[int] | Tensor,
    ) -> Float[Tensor, "... query vocab"]:
        """Logits at the query positions when the stream at `hook` is `act` (all positions
        for 'pre', which attention mixes; any position set otherwise, read at `queries`)."""
        stage = self.stage(hook)
        q, _ = query_index(queries, act.shape[-2], act.device)
        if stage == "pre":
            mid = act[..., q, :] + self.block.attention(act, queries)
            return self.from_mid(mid)
        if stage == "mid":
            return self.from_mid(act[..., q, :])
        if stage == "post":
            return act[..., q, :] @ self.W_U + self.b_U
        if stage == "logits":
            return act[..., q, :]
        raise ValueError(f"{hook} is not a residual site of the last layer")


@dataclass(frozen=True)
class PlainModel:
    """A whole plain model written out: logits at chosen positions from tokens (or from the
    residual stream entering a later block). With `PlainModel.of(model,
    hooked_state_dict(model, keep_vars=True), dtype=None)` it is differentiable in the model's
    own parameters, which is what the SGLD sampler needs: the same function as the model's
    forward without its hook points and per-module Python (2–3× faster on modular
    addition)."""

    blocks: tuple[PlainBlock, ...]
    W_E: Float[Tensor, "vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    W_U: Float[Tensor, "d_model vocab_out"]
    b_U: Float[Tensor, " vocab_out"]

    @classmethod
    def of(
        cls,
        model: nn.Module,
        state: dict[str, Tensor] | None = None,
        dtype: torch.dtype | None = torch.float64,
    ) -> PlainModel | None:
        """The model's weights, or None when it is not plain (see `is_plain`)."""
        if not is_plain(model):
            return None
        sd = state if state is not None else hooked_state_dict(model)
        cfg: Any = model.cfg
        layers = range(cfg.n_layers)
        blocks = tuple(PlainBlock.of(model, layer, sd, dtype) for layer in layers)
        assert all(b is not None for b in blocks)

        def get(name: str) -> Tensor:
            return sd[name] if dtype is None else sd[name].to(dtype)

        w_u = get("unembed.W_U")
        b_u = get("unembed.b_U") if "unembed.b_U" in sd else w_u.new_zeros(w_u.shape[1]).detach()
        return cls(blocks, get("embed.W_E"), get("pos_embed.W_pos"), w_u, b_u)  # type: ignore[arg-type]

    def logits(
        self,
        tokens: Int[Tensor, "batch pos"] | None,
        queries: Sequence[int] | Tensor,
        resid: Float[Tensor, "batch pos d_model"] | None = None,
        start_layer: int = 0,
    ) -> Float[Tensor, "batch query vocab_out"]:
        """Logits at the query positions, from `tokens`, or from `resid` (the residual stream
        entering block `start_layer`, as `stop_at_layer=start_layer` returns it).

        Only the last block's queries are computed at `queries`; earlier blocks run at every
        position. When the vocabulary has no more rows than the batch has sequences, block 0's
        queries, keys and values are projected once per (position, token) and looked up.
        Queries, keys and values are kept apart (no slicing of one fused projection), so the
        backward pass scatters into small tables instead of filling batch-sized zeros."""
        last = len(self.blocks) - 1
        table: Tensor | None = None
        rows: Tensor | None = None
        if resid is None:
            if tokens is None:
                raise ValueError("give tokens or resid")
            start_layer = 0
            n_pos = tokens.shape[1]
            table = (self.W_E + self.W_pos[:n_pos, None]).flatten(0, 1)  # [(pos vocab), d]
            rows = tokens + torch.arange(n_pos, device=tokens.device) * self.W_E.shape[0]
            x = None if last == 0 else table[rows]
        else:
            n_pos = resid.shape[-2]
            x = resid
        q_pos, q_masked = query_index(queries, n_pos, self.W_E.device)
        everywhere = torch.arange(n_pos, device=self.W_E.device)
        for layer in range(start_layer, last + 1):
            block = self.blocks[layer]
            at, masked = (q_pos, q_masked) if layer == last else (everywhere, n_pos > 1)
            w_q, w_k, w_v = (_heads_last(w) for w in (block.W_Q, block.W_K, block.W_V))
            b_q, b_k, b_v = (b.flatten() for b in (block.b_Q, block.b_K, block.b_V))
            if layer == 0 and table is not None and rows is not None:
                q = _embedded_projection(table, rows, w_q, b_q, at)
                k = _embedded_projection(table, rows, w_k, b_k, everywhere)
                v = _embedded_projection(table, rows, w_v, b_v, everywhere)
                here = table[rows[:, at]]
            else:
                assert x is not None
                here = x if layer < last else x[..., at, :]
                q = here @ w_q + b_q
                k, v = x @ w_k + b_k, x @ w_v + b_v
            x = here + block.attend_qkv(q, k, v, at, masked)
            if block.has_mlp:
                x = x + block.mlp(x)
        assert x is not None
        return x @ self.W_U + self.b_U


def _embedded_projection(
    table: Float[Tensor, "pos_vocab d_model"],
    rows: Int[Tensor, "batch pos"],
    w: Float[Tensor, "d_model hd"],
    b: Float[Tensor, " hd"],
    pos: Tensor,
) -> Float[Tensor, "batch n hd"]:
    """`x W + b` of the embedded tokens at positions `pos`: the table of every (position,
    token) is projected once and looked up when it has fewer rows than the batch."""
    if table.shape[0] <= rows.numel():
        return torch.addmm(b, table, w)[rows[:, pos]]
    return table[rows[:, pos]] @ w + b


def _heads_last(w: Float[Tensor, "head d_model d_head"]) -> Float[Tensor, "d_model hd"]:
    return w.permute(1, 0, 2).flatten(1)
