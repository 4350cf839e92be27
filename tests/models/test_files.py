"""TransformerLens models as folders (models.files): the same model on either API."""

from __future__ import annotations

import pytest
import torch
from support import random_tokens, tiny_config, tiny_model

from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.models.files import load_model_file, save_model_file


@pytest.mark.parametrize("api", available_apis())
@pytest.mark.parametrize("kind", ["mlp", "ln"])
def test_saved_model_round_trips(tmp_path, api, kind):
    """Also the normalisation weights of a Bridge (compat.hooked_state_dict used to drop them)."""
    model = tiny_model(api, kind, seed=3, n_layers=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.mul_(1.5).add_(0.1)
    save_model_file(model, tiny_config(kind, n_layers=2), tmp_path)
    toks = random_tokens(model, 3)
    for other in available_apis():
        again = load_model_file(tmp_path, other)
        torch.testing.assert_close(again(toks), model(toks))
