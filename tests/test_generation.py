"""One builder of generate() arguments (issue 9, defects 5 and 8).

A base whose ``generation_config`` carries a repetition penalty, a top-k, a minimum
length or suppressed tokens must not change how serving, PPO's rollouts or the KL gate
sample: every step's processed scores must be exactly ``logits / T`` (at T = 1, top-p =
1, the raw logits). On the main before this change, serving inherited the base's
repetition penalty and transformers' global ``top_k=50``, and rollouts inherited the
repetition penalty and the minimum length.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import GenerationConfig

from rlhf_core.generation import NEUTRAL, Sampling, generate_kwargs, stop_token_ids
from rlhf_core.modeling import lora_config
from rlhf_core.serving import PolicyServer
from rlhf_core.trainer import PPOConfig, PPOTrainer, attach_policy

CHAT = [{"role": "user", "content": "Tell me about the sea."}]
# What a base model may ship with; none of it may reach the sampling distribution.
ODD_CONFIG = {
    "repetition_penalty": 3.0,
    "no_repeat_ngram_size": 2,
    "top_k": 5,
    "min_new_tokens": 6,
    "suppress_tokens": [11, 12, 13],
    "typical_p": 0.5,
}


@contextlib.contextmanager
def odd_generation_config(model):
    config = model.generation_config
    saved = {k: getattr(config, k, None) for k in ODD_CONFIG}
    for key, value in ODD_CONFIG.items():
        setattr(config, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


@contextlib.contextmanager
def recording_generate(model, calls: list):
    """Every generate call on the base model also returns its raw and processed
    scores (a real generate, only asked for more output)."""
    original = model.generate

    def spy(*args, **kwargs):
        kwargs.update(return_dict_in_generate=True, output_scores=True, output_logits=True)
        out = original(*args, **kwargs)
        calls.append(out)
        return out.sequences

    model.generate = spy
    try:
        yield
    finally:
        del model.generate  # back to the class's method


def assert_scores_are_raw_logits(calls: list, temperature: float = 1.0) -> None:
    assert calls, "generate was never called"
    for out in calls:
        for scores, logits in zip(out.scores, out.logits, strict=True):
            torch.testing.assert_close(scores.float(), logits.float() / temperature)


def test_every_pinned_argument_is_a_generation_config_field():
    """A renamed field in a future transformers would silently stop being pinned."""
    unused = GenerationConfig().update(**NEUTRAL)
    assert unused == {}


def test_kwargs_sample_from_softmax_of_logits_whatever_the_base_config(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]  # fmt: skip
    kwargs = generate_kwargs(
        Sampling(temperature=0.7, top_p=1.0, max_new_tokens=8),
        eos_token_id=stop_token_ids(tiny_model.model, tok),
        pad_token_id=tok.pad_token_id,
    )
    with odd_generation_config(tiny_model.model), torch.no_grad():
        out = tiny_model.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs,
            return_dict_in_generate=True, output_scores=True, output_logits=True,
        )  # fmt: skip
    assert_scores_are_raw_logits([out], temperature=0.7)


def test_greedy_kwargs_set_no_sampling_argument():
    kwargs = generate_kwargs(Sampling(0.0, 0.9, 5), eos_token_id=2, pad_token_id=0)
    assert kwargs["do_sample"] is False
    assert all(kwargs[k] is None for k in ("temperature", "top_p", "top_k"))
    assert kwargs["repetition_penalty"] == 1.0 and kwargs["max_new_tokens"] == 5


def test_serving_samples_from_softmax_of_logits(tiny_model, tiny_settings):
    # The one-at-a-time path calls generate; the batched one is checked below.
    server = PolicyServer(
        tiny_model, tiny_settings.model_copy(update={"serving_backend": "sequential"})
    )
    calls: list = []
    with odd_generation_config(tiny_model.model), recording_generate(tiny_model.model, calls):
        server.generate(CHAT, {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8})
    assert_scores_are_raw_logits(calls)


def test_batched_serving_samples_from_softmax_of_logits(tiny_model, tiny_settings):
    """The batched server never calls generate: its greedy answer is the argmax of the
    raw logits at every step (no penalty, minimum length or suppressed token of the base's
    config), and a sampled answer uses the temperature and top-p warpers alone."""
    from rlhf_core.batching import make_slot

    server = PolicyServer(tiny_model, tiny_settings)
    assert server.batched
    ids = server.build_prompt(CHAT, 8).input_ids
    with odd_generation_config(tiny_model.model):
        answer = server.generate(CHAT, {"temperature": 0.0, "max_new_tokens": 8}).token_ids
        expected, context = [], list(ids)
        with torch.no_grad():
            for _ in range(len(answer)):
                logits = tiny_model.model(input_ids=torch.tensor([context])).logits[0, -1]
                expected.append(int(logits.argmax()))
                context.append(expected[-1])
        gen = server.stream(CHAT, {"temperature": 0.7, "top_p": 0.8})
        slot = make_slot(gen, None, server._stop_ids, seed=0)
        gen.consume()
    server.close()
    assert answer == expected
    assert [type(w).__name__ for w in slot.warpers] == [
        "TemperatureLogitsWarper",
        "TopPLogitsWarper",
    ] and slot.do_sample


def test_ppo_rollouts_and_the_gate_sample_from_softmax_of_logits(tiny_model, tiny_settings):
    model, head, _ = attach_policy(tiny_model, tiny_settings, None, lora_config(tiny_settings))
    try:
        trainer = PPOTrainer(
            model,
            tiny_model.tokenizer,
            PPOConfig(batch_size=2, max_new_tokens=8, target_kl=None),
            reward_fn=lambda prompts, answers: [0.0] * len(answers),
            value_head=head,
        )
        calls: list = []
        with odd_generation_config(tiny_model.model), recording_generate(tiny_model.model, calls):
            trainer.generate([CHAT, CHAT])
            assert_scores_are_raw_logits(calls)
            calls.clear()
            trainer.served_kl([CHAT, CHAT], Sampling(1.0, 1.0, 8))
            assert_scores_are_raw_logits(calls)
    finally:
        model.unload()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_sampling_coerce_fills_and_clamps(tiny_settings, temperature):
    s = Sampling.coerce({"temperature": temperature, "top_p": 5, "max_new_tokens": None},
                        tiny_settings)  # fmt: skip
    assert s == Sampling(temperature, 1.0, tiny_settings.max_new_tokens)


def test_sampling_coerce_turns_non_finite_values_into_the_defaults(tiny_settings):
    # Review c: min/max let NaN through (a NaN temperature and top-p reached the server and
    # the stored turn) and int() raised on an infinite token limit.
    nan, inf = float("nan"), float("inf")
    s = Sampling.coerce({"temperature": nan, "top_p": nan, "max_new_tokens": inf}, tiny_settings)
    assert s == Sampling.from_settings(tiny_settings)
    s = Sampling.coerce({"temperature": -inf, "top_p": 1e400, "max_new_tokens": nan}, tiny_settings)
    assert s == Sampling(
        tiny_settings.temperature, tiny_settings.top_p, tiny_settings.max_new_tokens
    )
