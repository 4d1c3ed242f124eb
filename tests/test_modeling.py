"""Model resolution: tiny model, local folders, cache, and the error a person can act on."""

import time

import pytest
import torch

from rlhf_core.modeling import ModelLoadError, load_base_model, resolve_model_dir
from rlhf_core.settings import Settings


def test_tiny_random_has_the_real_tokenizer_and_chat_template(tiny_model):
    tok = tiny_model.tokenizer
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>assistant" in text
    assert tiny_model.model.config.num_hidden_layers == 2
    assert tiny_model.model.get_input_embeddings().weight.shape[0] == len(tok)


def test_a_local_folder_loads_as_is(tiny_model, model_cache):
    folder = tiny_model.model_dir
    loaded = load_base_model(Settings(base_model=folder, model_cache_dir=model_cache))
    assert loaded.model_dir == folder
    for a, b in zip(loaded.model.parameters(), tiny_model.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_cached_default_model_loads_in_seconds(model_cache):
    settings = Settings(model_cache_dir=model_cache)
    resolve_model_dir(settings)  # converts the bundled GGUF once per machine
    start = time.perf_counter()
    loaded = load_base_model(settings)
    assert time.perf_counter() - start < 10
    assert loaded.model.config.model_type == "llama"
    assert loaded.tokenizer.eos_token == "<|im_end|>"


def test_nothing_loadable_says_what_was_tried_and_what_to_do(tmp_path):
    settings = Settings(base_model=str(tmp_path / "no-such-model"), model_cache_dir=tmp_path)
    with pytest.raises(ModelLoadError) as error:
        resolve_model_dir(settings)
    message = str(error.value)
    assert "does not exist" in message and "RLHF_BASE_MODEL" in message
