"""A ReLU MLP for the 8×8 digits, written as a TransformerLens `HookedRootModule`.

Hook points, in forward order: `hook_in` (the standardised image, `[batch, 64]`), then for each
hidden layer `i` `layers.{i}.hook_pre` (`x W_i + b_i`) and `layers.{i}.hook_post` (its ReLU);
the forward returns logits `[batch, 10]`. Weights are in the row convention (`y = x @ W + b`),
like TransformerLens's `W_in`/`W_out`.

Cuts of the computation are `hook_in`, every `layers.{i}.hook_post` and the logits; the model
states the closed form of each section between consecutive cuts (`section_form`), which the
engine can use instead of autograd.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from tl_degeneracy.engine.structures.forms import Affine, AffineRelu, Form

LOGITS = "logits"


@dataclass(frozen=True)
class DigitsMLPConfig:
    """Shape of the MLP: `d_in` pixels, ReLU hidden layers of widths `hidden`, `n_classes`."""

    d_in: int = 64
    hidden: tuple[int, ...] = (100, 100)
    n_classes: int = 10
    act_fn: str = "relu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if not self.hidden:
            raise ValueError("DigitsMLPConfig needs at least one hidden layer")
        if self.act_fn != "relu":
            raise ValueError(f"only act_fn='relu' is supported, got {self.act_fn!r}")

    @property
    def n_layers(self) -> int:
        return len(self.hidden)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DigitsMLPConfig:
        return cls(**{**d, "hidden": tuple(d["hidden"])})


class DigitsLayer(nn.Module):
    """One hidden layer: `post = ReLU(x W_in + b_in)`, with hooks on both sides of the ReLU."""

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.W_in = nn.Parameter(torch.zeros(d_in, d_out, dtype=dtype))
        self.b_in = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_out"]:
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        return self.hook_post(torch.relu(pre))


class DigitsMLP(HookedRootModule):
    """`logits = ReLU(…ReLU(x W_0 + b_0)…) W_out + b_out`, hooked at every layer."""

    def __init__(self, cfg: DigitsMLPConfig | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg or DigitsMLPConfig()
        widths = (self.cfg.d_in, *self.cfg.hidden)
        self.hook_in = HookPoint()
        self.layers = nn.ModuleList(
            DigitsLayer(a, b, dtype) for a, b in zip(widths[:-1], widths[1:])
        )
        self.W_out = nn.Parameter(torch.zeros(widths[-1], self.cfg.n_classes, dtype=dtype))
        self.b_out = nn.Parameter(torch.zeros(self.cfg.n_classes, dtype=dtype))
        self.setup()

    def forward(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch n_classes"]:
        x = self.hook_in(x.to(self.W_out.dtype))
        for layer in self.layers:
            x = layer(x)
        return x @ self.W_out + self.b_out

    @property
    def cut_names(self) -> list[str]:
        """The cuts of the computation in forward order: the sites a basis can live at."""
        return ["hook_in", *(f"layers.{i}.hook_post" for i in range(self.cfg.n_layers)), LOGITS]

    def section_form(self, inp: str, out: str) -> Form | None:
        """The closed form of the section from cut `inp` to the next cut `out` (float64 copies
        on the weights' device), or None when `inp → out` is not such a section."""
        cuts = self.cut_names
        if inp not in cuts or out not in cuts or cuts.index(out) != cuts.index(inp) + 1:
            return None
        if out == LOGITS:
            return Affine(
                self.W_out.detach().to(torch.float64), self.b_out.detach().to(torch.float64)
            )
        layer = self.layers[cuts.index(out) - 1]
        assert isinstance(layer, DigitsLayer)
        W, b = layer.W_in.detach().to(torch.float64), layer.b_in.detach().to(torch.float64)
        return AffineRelu(W, b, Q=None, P=None, c=W.new_zeros(W.shape[1]))

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write `model.safetensors` (float32 unless the model is float64) and `config.json`
        (`model`: the config, plus the sections of `meta`) into the folder `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(weights, str(path / "model.safetensors"))
        config = {"model": self.cfg.to_json(), **(meta or {})}
        (path / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float64) -> DigitsMLP:
        """A model saved with `save`, in `dtype`, in eval mode."""
        path = Path(path)
        if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} needs model.safetensors and config.json")
        config = json.loads((path / "config.json").read_text())
        model = cls(DigitsMLPConfig.from_json(config["model"]), dtype=dtype)
        weights = load_file(str(path / "model.safetensors"))
        model.load_state_dict({k: v.to(dtype) for k, v in weights.items()})
        return model.eval()


def init_weights(model: DigitsMLP, seed: int, scale: float = 1.0) -> DigitsMLP:
    """PyTorch's default `nn.Linear` initialisation, U(±1/√fan_in) for weights and biases,
    times `scale`, drawn from a private generator in a fixed order (layer 0 … out)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for W, b in _weight_pairs(model):
            bound = scale / W.shape[0] ** 0.5
            W.copy_((torch.rand(W.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
            b.copy_((torch.rand(b.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
    return model


def _weight_pairs(model: DigitsMLP) -> list[tuple[nn.Parameter, nn.Parameter]]:
    pairs = [(layer.W_in, layer.b_in) for layer in model.layers if isinstance(layer, DigitsLayer)]
    return [*pairs, (model.W_out, model.b_out)]
