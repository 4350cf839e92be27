"""Train a one-layer modular-addition transformer to grokking, on this CPU, in minutes.

The model is the reference's TransformerLens architecture (1 layer, d_model 128, 4 heads of 32,
d_mlp 512, ReLU, no LayerNorm, n_ctx 3, d_vocab p+1), trained full batch with AdamW (lr 1e-3,
weight decay 1) on `frac_train` of the p² inputs. Two things make it fast, neither changes the
model: (1) the loss only reads the last position, so the MLP and unembedding run there alone
(`last_position_logits`, a functional forward on HookedTransformer-named weights, tested equal
to the TransformerLens forward); (2) a smaller initialisation than TransformerLens's default,
which shortens the memorisation phase before grokking. At the end the weights are loaded into
a normal TransformerLens model (`HookedTransformer` on 3.9, `TransformerBridge` on 4.x) and
saved as a checkpoint directory in the reference format (see `checkpoints.py`).

Run: `python -m tl_degeneracy.models.modadd.train --out DIR --p 113`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine import compat, identity
from tl_degeneracy.models.modadd.data import ModAddDataset, evaluate

Backend = Literal["functional", "model"]


def model_config(p: int) -> dict[str, Any]:
    """The reference's TransformerLens config for modulus `p`."""
    return {
        "act_fn": "relu",
        "d_head": 32,
        "d_mlp": 512,
        "d_model": 128,
        "d_vocab": p + 1,
        "n_ctx": 3,
        "n_heads": 4,
        "n_layers": 1,
        "normalization_type": None,
    }


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved in the checkpoint's config.json)."""

    p: int = 113
    frac_train: float = 0.3
    split_seed: int = 0
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    max_epochs: int = 20_000
    init_scale: float = 0.5
    target_test_accuracy: float = 0.99
    extra_epochs: int = 0
    eval_every: int = 50
    backend: Backend = "functional"
    threads: int | None = None


@dataclass
class TrainResult:
    """A trained model with its data, history and timings."""

    model: nn.Module
    dataset: ModAddDataset
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    epochs: int = 0
    grokked_epoch: int | None = None
    interrupted: bool = False
    wall_time_s: float = 0.0
    train_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)


def init_state_dict(
    config: dict[str, Any], seed: int, init_scale: float = 1.0
) -> dict[str, Tensor]:
    """HookedTransformer-named initial weights: TransformerLens's GPT-2 scheme (weights
    N(0, (0.8/√d_model)²), biases 0) times `init_scale`, from a private generator so the result is
    the same on either API."""
    d, h, dh, m, v = (config[k] for k in ("d_model", "n_heads", "d_head", "d_mlp", "d_vocab"))
    std = init_scale * 0.8 / math.sqrt(d)
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "embed.W_E": (v, d),
        "pos_embed.W_pos": (config["n_ctx"], d),
        "blocks.0.attn.W_Q": (h, d, dh),
        "blocks.0.attn.W_K": (h, d, dh),
        "blocks.0.attn.W_V": (h, d, dh),
        "blocks.0.attn.W_O": (h, dh, d),
        "blocks.0.mlp.W_in": (d, m),
        "blocks.0.mlp.W_out": (m, d),
        "unembed.W_U": (d, v),
    }
    sd = {k: torch.randn(s, generator=gen) * std for k, s in shapes.items()}
    for x in "QKV":
        sd[f"blocks.0.attn.b_{x}"] = torch.zeros(h, dh)
    sd["blocks.0.attn.b_O"] = torch.zeros(d)
    sd["blocks.0.mlp.b_in"] = torch.zeros(m)
    sd["blocks.0.mlp.b_out"] = torch.zeros(d)
    sd["unembed.b_U"] = torch.zeros(v)
    return sd


def last_position_logits(
    params: dict[str, Tensor], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch vocab"]:
    """The logits at the last position of a one-layer, LayerNorm-free, ReLU TransformerLens
    model, from HookedTransformer-named weights.

    Same function as the TransformerLens forward, organised for speed: queries, keys and values
    are looked up in per-(position, token) tables instead of being recomputed per input, the
    last query alone is needed (it sees every key, so no causal mask), and the MLP and
    unembedding run on the last position only.
    """
    n_pos = tokens.shape[1]
    a = "blocks.0.attn."
    n_heads, d_model, d_head = params[a + "W_Q"].shape
    embed = params["embed.W_E"] + params["pos_embed.W_pos"][:n_pos, None]  # [pos, vocab, d]
    w_qkv = torch.cat([params[a + "W_Q"], params[a + "W_K"], params[a + "W_V"]])
    b_qkv = torch.cat([params[a + "b_Q"], params[a + "b_K"], params[a + "b_V"]])
    table = einops.einsum(embed, w_qkv, "s v m, h m d -> s v h d") + b_qkv
    rows = tokens + torch.arange(n_pos, device=tokens.device) * embed.shape[1]
    qkv = table.flatten(0, 1)[rows]  # [batch, pos, 3 * heads, d_head]
    q = qkv[:, -1, :n_heads]
    k = qkv[:, :, n_heads : 2 * n_heads]
    v = qkv[:, :, 2 * n_heads :]
    pattern = ((q[:, None] * k).sum(-1) / math.sqrt(d_head)).softmax(dim=1)  # [batch, pos, h]
    z = (pattern[..., None] * v).sum(1)  # [batch, heads, d_head]
    attn_out = torch.addmm(params[a + "b_O"], z.flatten(1), params[a + "W_O"].flatten(0, 1))
    mid = embed.flatten(0, 1)[rows[:, -1]] + attn_out
    hidden = F.relu(torch.addmm(params["blocks.0.mlp.b_in"], mid, params["blocks.0.mlp.W_in"]))
    post = mid + torch.addmm(params["blocks.0.mlp.b_out"], hidden, params["blocks.0.mlp.W_out"])
    return torch.addmm(params["unembed.b_U"], post, params["unembed.W_U"])


def _print_now(message: str) -> None:
    print(message, flush=True)


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(-1) == labels).double().mean().item()


def train(
    config: TrainConfig,
    api: compat.API | Literal["auto"] = "auto",
    log: Callable[[str], None] = _print_now,
) -> TrainResult:
    """Train to `target_test_accuracy` (then `extra_epochs` more), or `max_epochs`.

    `backend="functional"` trains the weights with `last_position_logits` and loads them into a
    TransformerLens model at the end; `backend="model"` trains the TransformerLens model's own
    parameters through its forward (slower; the loss is still the last position's).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    cfg = model_config(config.p)
    dataset = ModAddDataset.random(config.p, config.frac_train, config.split_seed)
    x_train, y_train = dataset.train()
    x_test, y_test = dataset.test()
    init = init_state_dict(cfg, config.seed, config.init_scale)
    model = compat.build_model(cfg, init, api=api, model_name=f"modadd-p{config.p}")
    if config.backend == "functional":
        params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        trainable = list(params.values())

        def forward(tokens: Tensor) -> Tensor:
            return last_position_logits(params, tokens)
    elif config.backend == "model":
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        # the native TransformerBridge keeps the unembedding bias as a buffer: train it too
        for name, buffer in model.named_buffers():
            if name.endswith("bias") and buffer.is_floating_point():
                trainable.append(buffer.requires_grad_(True))

        def forward(tokens: Tensor) -> Tensor:
            return model(tokens)[:, -1]
    else:
        raise ValueError(f"unknown backend {config.backend!r}")

    opt = torch.optim.AdamW(
        trainable, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas
    )
    result = TrainResult(model=model, dataset=dataset, config=config)
    start = time.perf_counter()
    stop_at: int | None = None
    epoch = 0
    try:
        for epoch in range(1, config.max_epochs + 1):
            opt.zero_grad(set_to_none=True)
            logits = forward(x_train)
            loss = F.cross_entropy(logits, y_train)
            loss.backward()
            opt.step()
            if epoch % config.eval_every == 0 or epoch == config.max_epochs:
                with torch.no_grad():
                    test_logits = forward(x_test)
                    row = {
                        "epoch": epoch,
                        "seconds": time.perf_counter() - start,
                        "train_loss": loss.item(),
                        "train_accuracy": _accuracy(logits, y_train),
                        "test_loss": F.cross_entropy(test_logits, y_test).item(),
                        "test_accuracy": _accuracy(test_logits, y_test),
                    }
                result.history.append(row)
                log(
                    f"epoch {epoch:6d}  {row['seconds']:7.1f}s  train loss {row['train_loss']:.3e} "
                    f"acc {row['train_accuracy']:.4f}  test loss {row['test_loss']:.3e} "
                    f"acc {row['test_accuracy']:.4f}"
                )
                if stop_at is None and row["test_accuracy"] >= config.target_test_accuracy:
                    result.grokked_epoch = epoch
                    stop_at = epoch + config.extra_epochs
                if stop_at is not None and epoch >= stop_at:
                    break
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see main): keep what has been trained
        result.interrupted = True
    result.wall_time_s = time.perf_counter() - start
    result.epochs = epoch
    for buffer in model.buffers():
        buffer.requires_grad_(False)
    if config.backend == "functional":
        trained = {k: v.detach().clone() for k, v in params.items()}
        model = compat.build_model(cfg, trained, api=api, model_name=f"modadd-p{config.p}")
    model.eval()
    identity.set_weight_processing(
        model,
        {
            "fold_ln": False,
            "center_writing_weights": False,
            "center_unembed": False,
        },
    )
    result.model = model
    result.train_metrics = evaluate(model, x_train, y_train)
    result.test_metrics = evaluate(model, x_test, y_test)
    return result


def save_result(result: TrainResult, out: str | Path) -> Path:
    """Write `model.safetensors`, `config.json` and `split.safetensors` to `out`."""
    from tl_degeneracy.models.modadd.checkpoints import save_checkpoint

    cfg = result.config
    meta = {
        "train_seed": cfg.seed,
        "dataset": {
            "fn_name": "add",
            "frac_train": cfg.frac_train,
            "modulus": cfg.p,
            "seed": cfg.split_seed,
            "split_file": "split.safetensors",
        },
        "train": {
            "batch_size": "full",
            "learning_rate": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "betas": list(cfg.betas),
            "optimizer": "AdamW",
            "loss": "cross-entropy at the last position, all d_vocab outputs",
            "init": f"N(0, ({cfg.init_scale} * 0.8 / sqrt(d_model))^2) weights, zero biases",
            "config": asdict(cfg),
            "epochs": result.epochs,
            "grokked_epoch": result.grokked_epoch,
            "interrupted": result.interrupted,
            "wall_time_s": round(result.wall_time_s, 1),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__,
            "transformer_lens": compat.tl_version(),
        },
        "metrics": {"train": result.train_metrics, "test": result.test_metrics},
    }
    path = save_checkpoint(out, result.model, meta, dataset=result.dataset)
    (path / "history.json").write_text(json.dumps(result.history) + "\n")
    return path


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Command line: train, then write the checkpoint (also after Ctrl-C or SIGTERM)."""
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--p", type=int, default=defaults.p)
    ap.add_argument("--frac-train", type=float, default=defaults.frac_train)
    ap.add_argument("--split-seed", type=int, default=defaults.split_seed)
    ap.add_argument("--seed", type=int, default=defaults.seed, help="initialisation seed")
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    ap.add_argument("--max-epochs", type=int, default=defaults.max_epochs)
    ap.add_argument("--init-scale", type=float, default=defaults.init_scale)
    ap.add_argument("--target-test-accuracy", type=float, default=defaults.target_test_accuracy)
    ap.add_argument("--extra-epochs", type=int, default=defaults.extra_epochs)
    ap.add_argument("--eval-every", type=int, default=defaults.eval_every)
    ap.add_argument("--backend", choices=["functional", "model"], default=defaults.backend)
    ap.add_argument("--api", choices=["auto", "hooked", "bridge"], default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    config = TrainConfig(
        p=args.p,
        frac_train=args.frac_train,
        split_seed=args.split_seed,
        seed=args.seed,
        lr=args.lr,
        weight_decay=args.weight_decay,
        max_epochs=args.max_epochs,
        init_scale=args.init_scale,
        target_test_accuracy=args.target_test_accuracy,
        extra_epochs=args.extra_epochs,
        eval_every=args.eval_every,
        backend=args.backend,
        threads=args.threads,
    )
    result = train(config, api=args.api)
    path = save_result(result, args.out)
    summary = {
        "out": str(path),
        "epochs": result.epochs,
        "grokked_epoch": result.grokked_epoch,
        "interrupted": result.interrupted,
        "wall_time_s": round(result.wall_time_s, 1),
        "train": result.train_metrics,
        "test": result.test_metrics,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
