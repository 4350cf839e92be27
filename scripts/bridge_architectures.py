"""Try every Bridge-only causal LM on a tiny random checkpoint: write it with `transformers`,
`load_local` it (which checks it against `transformers` on a probe batch), compare float64
logits with `transformers`, and fit LIB at every residual site plus block 0's MLP site.

    python scripts/bridge_architectures.py [ClassName ...]   # default: every Bridge-only class

One line per class: `ok` with the dtype, the logits' relative gap and the number of sites, or
`FAIL` with the stage (config, build, load_local, logits, fit) and the error. Each class gets
`--seconds` (default 120). The config is one generic recipe (16-wide, 2 layers, 4 heads, 50
tokens); a class whose config rejects it fails at 'config' or 'build', which says nothing about
the package. Mixture-of-experts kernels without float64 are run in float32.
"""

from __future__ import annotations

import argparse
import inspect
import signal
import tempfile
import warnings

import torch

SMALL = dict(
    vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=16,
    n_embd=16, n_layer=2, n_head=4, n_positions=16, n_inner=32, ffn_dim=32, d_model=16,
    n_ctx=16, bos_token_id=1, eos_token_id=2, pad_token_id=None, moe_intermediate_size=16,
    num_experts=4, num_local_experts=4, num_experts_per_tok=2,
    shared_expert_intermediate_size=16, word_embed_proj_dim=16, rotary_dim=2,
)  # fmt: skip


class Timeout(Exception):
    pass


def tiny_config(cls):
    params = inspect.signature(cls.config_class.__init__).parameters
    default = cls.config_class()
    kw = {k: v for k, v in SMALL.items() if k in params or hasattr(default, k)}
    try:
        config = cls.config_class(**kw)
    except (TypeError, AttributeError):  # a field the config only derives (e.g. head_dim)
        config = cls.config_class(**{k: v for k, v in kw.items() if k in params})
    config.architectures = [cls.__name__]
    return config


def try_class(name: str) -> str:
    import transformers

    from tl_degeneracy import LIBConfig, Site, fit_basis, residual_sites
    from tl_degeneracy.engine.compat import hook_names
    from tl_degeneracy.models.local import load_hf, load_local
    from tl_degeneracy.models.tiny import randomize, tiny_tokenizer

    stage = "config"
    try:
        cls = getattr(transformers, name)
        config = tiny_config(cls)
        stage = "build"
        with torch.random.fork_rng():
            hf_model = cls(config)
        randomize(hf_model, 0)
        with tempfile.TemporaryDirectory() as folder:
            hf_model.save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)
            stage = "load_local"
            dtype = torch.float64
            try:
                hf, _ = load_hf(folder, dtype=dtype)
                with torch.no_grad():
                    hf(torch.randint(3, 50, (1, 4)))
            except RuntimeError as error:
                if "Float32" not in str(error):
                    raise
                dtype = torch.float32  # an expert kernel without float64
                hf, _ = load_hf(folder, dtype=dtype)
            model = load_local(folder, dtype=dtype)
        tokens = torch.randint(3, 50, (4, 8), generator=torch.Generator().manual_seed(0))
        stage = "logits"
        with torch.no_grad():
            got, want = model(tokens), hf(tokens).logits
        gap = float((got - want).abs().max() / want.abs().max())
        stage = "fit"
        mlp = (0,) if "blocks.0.mlp.hook_post" in set(hook_names(model)) else ()
        sites = (*residual_sites(model, mlp=mlp), Site("logits", "last"))
        fit_basis(model, tokens, LIBConfig(sites, kind="lib", progress=False))
        return f"ok   {str(dtype)[6:]} logits {gap:.1e}, {len(sites) - 1} sites, mlp={bool(mlp)}"
    except Timeout:
        return f"FAIL {stage}: timed out"
    except Exception as error:
        return f"FAIL {stage}: {type(error).__name__}: {str(error)[:150]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("classes", nargs="*")
    parser.add_argument("--seconds", type=int, default=120)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    from tl_degeneracy.models.architectures import ARCHITECTURES, bridge_causal_lms

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    names = args.classes or sorted(bridge_causal_lms() - set(ARCHITECTURES))

    def alarm(*_):
        raise Timeout

    signal.signal(signal.SIGALRM, alarm)
    for name in names:
        signal.alarm(args.seconds)
        try:
            line = try_class(name)
        finally:
            signal.alarm(0)
        print(f"{name:32s} {line}", flush=True)


if __name__ == "__main__":
    main()
