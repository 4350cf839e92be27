"""`models.presets.load_preset`: a spec names a preset or a folder, and the folder's own
`config.json` says which kind of checkpoint it is."""

from __future__ import annotations

import pytest

from tl_degeneracy.models.modadd.checkpoints import save_checkpoint
from tl_degeneracy.models.modadd.data import ModAddDataset
from tl_degeneracy.models.presets import load_preset
from tl_degeneracy.models.tiny import tiny_checkpoint


def test_a_folder_is_read_as_the_kind_its_config_says(api, tiny, tmp_path):
    """A modular-addition checkpoint (its TransformerLens config under "model", as the
    reference writes it) is a task model on its training inputs; a Hugging Face folder is a
    language model."""
    p = 7
    model = tiny(api, "mlp", d_vocab=p + 1, n_ctx=3)
    dataset = ModAddDataset.random(p, 0.5, 0)
    modadd = load_preset(str(save_checkpoint(tmp_path / "ckpt", model, {}, dataset)), api)
    assert not modadd.language_model and modadd.name == f"modadd-p{p}"
    train = modadd.data("train", None, 0)
    assert train.shape == (len(dataset.train_indices), 3)
    hf = load_preset(str(tiny_checkpoint("gpt2", tmp_path / "tiny-gpt2", seed=0)))
    assert hf.language_model and hf.name == "tiny-gpt2"
    with pytest.raises(ValueError, match="takes no tokenizer"):
        load_preset(str(tmp_path / "ckpt"), api, tokenizer=str(tmp_path / "tiny-gpt2"))
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_preset(str(tmp_path / "nowhere"))
