"""The weight maps of a TransformerLens model (a weight matrix and its bias between an input
site and an output site), grouped into sections: `embed`, `blocks.L.attn`, `blocks.L.mlp`,
`unembed`; and the parameters of each section.

The maps are those of the parameters the model holds (`parameters.state_dict_parameters`): a
positional map only where there is a learned `W_pos` (none on rotary models, whatever hook
points the Bridge adds), and an unembedding that is
the embedding matrix itself (a Bridge around a tied checkpoint) marked `tied_to="W_E"`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from tl_degeneracy.engine.compat import hook_names, model_cfg
from tl_degeneracy.engine.degeneracy.parameters import state_dict_parameters

TOKENS = "tokens"
POSITIONS = "positions"
LOGITS = "logits"


@dataclass(frozen=True)
class WeightMap:
    """A weight matrix (and its bias) from an input site to an output site.

    `input_site` is a hook name, or "tokens"/"positions" (one-hot inputs of the embeddings);
    `output_site` a hook name or "logits".
    """

    name: str
    section: str
    input_site: str
    output_site: str
    d_in: int
    d_out: int
    tied_to: str | None = None
    """The other map with the same weight matrix (tied `W_E` and `W_U` on a Bridge): the
    matrix is counted once, with the map whose `counted` is True (`W_E`, in `embed`, the
    section whose parameter it is), and its weights are free only where free for both uses."""
    counted: bool = True
    """False for the second use of a tied matrix (`W_U`): it adds no weights or free
    directions to its own section."""


def _first_hook(model: nn.Module, *names: str) -> str:
    valid = set(hook_names(model))
    for n in names:
        if n in valid:
            return n
    raise KeyError(f"none of the hooks {names} exists on this model")


def _tied_unembedding(model: nn.Module, params: dict[str, nn.Parameter]) -> bool:
    """True when the unembedding is the embedding matrix itself (a Bridge around a checkpoint
    with tied embeddings; a HookedTransformer unties them when it converts)."""
    sd = model.state_dict(keep_vars=True)
    u, e = sd.get("unembed.weight"), sd.get("embed.weight")
    if u is None or e is None or "unembed.weight" in params:
        return False
    return u.untyped_storage().data_ptr() == e.untyped_storage().data_ptr()


def weight_maps(model: nn.Module) -> list[WeightMap]:
    """The weight maps of a standard TransformerLens model, grouped into sections
    `embed`, `blocks.L.attn`, `blocks.L.mlp`, `unembed`."""
    cfg = model_cfg(model)
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    normed = getattr(cfg, "normalization_type", None) is not None
    gated = bool(getattr(cfg, "gated_mlp", False))
    h_kv = getattr(cfg, "n_key_value_heads", None) or h  # grouped-query attention: fewer K, V
    params = state_dict_parameters(model)

    tied = _tied_unembedding(model, params)
    maps = [
        WeightMap(
            "W_E", "embed", TOKENS, "hook_embed", cfg.d_vocab, d, tied_to="W_U" if tied else None
        )
    ]
    # a learned positional embedding only (rotary models have none, though a Bridge may still
    # have a hook_pos_embed)
    if {"pos_embed.W_pos", "pos_embed.weight"} & set(params):
        maps.append(WeightMap("W_pos", "embed", POSITIONS, "hook_pos_embed", cfg.n_ctx, d))
    for layer in range(cfg.n_layers):
        b = f"blocks.{layer}"
        attn_in = (
            _first_hook(model, f"{b}.ln1.hook_normalized", f"{b}.ln1.hook_out")
            if normed
            else f"{b}.hook_resid_pre"
        )
        for x in "QKV":
            heads = h if x == "Q" else h_kv
            maps.append(
                WeightMap(
                    f"{b}.attn.W_{x}",
                    f"{b}.attn",
                    attn_in,
                    f"{b}.attn.hook_{x.lower()}",
                    d,
                    heads * dh,
                )
            )
        maps.append(
            WeightMap(
                f"{b}.attn.W_O",
                f"{b}.attn",
                f"{b}.attn.hook_z",
                f"{b}.hook_attn_out",
                h * dh,
                d,
            )
        )
        if getattr(cfg, "attn_only", False):
            continue
        mlp_in = (
            _first_hook(model, f"{b}.ln2.hook_normalized", f"{b}.ln2.hook_out")
            if normed
            else f"{b}.hook_resid_mid"
        )
        dm = cfg.d_mlp
        mlp = f"{b}.mlp"
        if gated:  # act(x W_gate) * (x W_in): the gate's pre-activation is mlp.hook_pre
            maps.append(
                WeightMap(
                    f"{mlp}.W_gate",
                    mlp,
                    mlp_in,
                    f"{mlp}.hook_pre",
                    d,
                    dm,
                )
            )
            maps.append(
                WeightMap(
                    f"{mlp}.W_in",
                    mlp,
                    mlp_in,
                    f"{mlp}.hook_pre_linear",
                    d,
                    dm,
                )
            )
        else:
            maps.append(WeightMap(f"{mlp}.W_in", mlp, mlp_in, f"{mlp}.hook_pre", d, dm))
        maps.append(
            WeightMap(
                f"{mlp}.W_out",
                mlp,
                f"{mlp}.hook_post",
                f"{b}.hook_mlp_out",
                dm,
                d,
            )
        )
    last = cfg.n_layers - 1
    unembed_in = (
        _first_hook(model, "ln_final.hook_normalized", "ln_final.hook_out")
        if normed
        else f"blocks.{last}.hook_resid_post"
    )
    d_vocab_out = cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab
    maps.append(
        WeightMap(
            "W_U",
            "unembed",
            unembed_in,
            LOGITS,
            d,
            d_vocab_out,
            "W_E" if tied else None,
            not tied,
        )
    )
    return maps


SECTION_PARAMS: dict[str, str] = {
    "embed": r"^(embed|pos_embed)\.",
    "unembed": r"^(unembed|ln_final)\.",
}


def section_filter(section: str) -> str:
    """Regex selecting a section's parameters on both APIs (layer norms go with the section
    that reads them)."""
    if section in SECTION_PARAMS:
        return SECTION_PARAMS[section]
    block, kind = section.rsplit(".", 1)
    ln = "ln1" if kind == "attn" else "ln2"
    return rf"^{re.escape(block)}\.({kind}|{ln})\."
