"""`validate_tokens`: every bad batch is refused with the problem and the fix named, on both
APIs; good batches come back as int64 on the model's device."""

import warnings

import numpy as np
import pytest
import torch

from tl_degeneracy.engine.tokens import PaddingWarning, TokenError, validate_tokens


@pytest.fixture
def model(api, tiny):
    return tiny(api)  # d_vocab 11, n_ctx 4


def test_good_tokens_come_back_as_int64(model):
    for tokens in (
        torch.tensor([[1, 2, 3, 4]], dtype=torch.int32),
        np.array([[0, 10], [5, 5]], dtype=np.uint8),
        [[3, 1, 4]],
    ):
        out = validate_tokens(model, tokens)
        assert out.dtype == torch.int64 and out.device == model.W_E.device
        assert out.tolist() == torch.as_tensor(tokens).tolist()
    with torch.no_grad():  # and the model runs on them
        model(validate_tokens(model, [[10, 0, 3, 7]]))


def test_ids_outside_the_vocabulary_name_row_position_id_and_size(model):
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 11, 12]])
    with pytest.raises(TokenError, match=r"token id 11 at row 1, position 2 .*\[0, 11\)") as e:
        validate_tokens(model, tokens)
    assert "2 such ids in 1 rows" in str(e.value) and "to_tokens" in str(e.value)
    with pytest.raises(TokenError, match="token id -1 at row 0, position 0"):
        validate_tokens(model, torch.tensor([[-1, 0]]))


def test_the_error_replaces_transformer_lens_index_error(model):
    with pytest.raises(IndexError), torch.no_grad():
        model(torch.tensor([[1, 11]]))
    with pytest.raises(TokenError):
        validate_tokens(model, torch.tensor([[1, 11]]))
    assert issubclass(TokenError, ValueError)


def test_non_integer_tokens_name_the_dtype_and_the_conversion(model):
    with pytest.raises(TokenError, match=r"torch.float32.*whole numbers: convert them with"):
        validate_tokens(model, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(TokenError, match="not whole numbers"):
        validate_tokens(model, torch.tensor([[0.5, 2.0]]))
    with pytest.raises(TokenError, match="bool"):
        validate_tokens(model, torch.tensor([[True, False]]))
    with pytest.raises(TokenError, match="text: tokenize first"):
        validate_tokens(model, "hello")


def test_wrong_rank_says_what_shape_is_needed(model):
    with pytest.raises(TokenError, match=r"shape \(3,\).*tokens\[None\]"):
        validate_tokens(model, torch.tensor([1, 2, 3]))
    with pytest.raises(TokenError, match=r"3 axes.*reshape\(-1, 2\)"):
        validate_tokens(model, torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(TokenError, match="no rows"):
        validate_tokens(model, torch.zeros(0, 3, dtype=torch.long))


def test_sequences_longer_than_the_context_name_length_and_limit(model):
    with pytest.raises(TokenError, match=r"5 positions .* n_ctx = 4.*tokens\[:, :4\]"):
        validate_tokens(model, torch.zeros(2, 5, dtype=torch.long))


def test_a_padded_batch_of_prompts_is_warned_about(api):
    """TransformerLens pads a list of prompts to its longest with the pad id (here EOS): the
    pad positions would be fitted as text. Right and left padding warn; batches by length
    (`prompt_batches`) and a packed row that ends in one end-of-text token do not."""
    from tl_degeneracy.models import prompt_batches, tiny_model

    model = tiny_model("llama", api)
    pad = model.tokenizer.pad_token_id
    prompts = ["hello there", "hi", "good morning"]
    with pytest.warns(PaddingWarning, match=rf"2 of 3 rows end in .*id {pad}.*prompt_batches"):
        validate_tokens(model, model.to_tokens(prompts))
    left = torch.tensor([[pad, pad, 1, 5, 6], [1, 7, 8, 9, 10]])
    with pytest.warns(PaddingWarning, match="1 of 2 rows start in"):
        validate_tokens(model, left)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in prompt_batches(prompts, model.tokenizer):
            validate_tokens(model, batch)
        validate_tokens(model, torch.tensor([[1, 5, 6, pad], [1, 7, 8, 9]]))
