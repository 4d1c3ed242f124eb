"""PPO trainer on the tiny model: it learns a rule, stays near the reference under a
large KL coefficient, guards against non-finite updates, saves a loadable policy,
and runs a whole round for the worker without leaving adapters on the shared base.

Why the policy adapter here also adapts ``lm_head``: the tiny random model ties its
output layer to embeddings of std 0.02, so its logits span about +-1.3 whatever the
hidden state is, and its next-token distribution stays near uniform over 49k tokens
unless the output layer itself can move. (SmolLM2 learns with attention LoRA only.)
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from rlhf_core.gate import (
    MIN_GATE_PROMPTS,
    GateSample,
    backtrack_to_kl_budget,
    fraction_within_kl_budget,
    gate_samples_kl,
    kl_exponent,
    parent_kl_when_scaled,
    prompt_clustered_bound,
    rescale_after_miss,
    scale_between,
    scale_within_kl_budget,
    score_gain,
    set_update_fraction,
    toward_base_keeps_more,
    within_kl_budget,
)
from rlhf_core.generation import Sampling
from rlhf_core.modeling import lora_config
from rlhf_core.ppo import make_kl_controller
from rlhf_core.settings import Settings
from rlhf_core.trainer import (
    POLICY_ADAPTER,
    NonFiniteError,
    PPOConfig,
    PPOTrainer,
    attach_policy,
    edited_tokens,
    run_training_round,
)

PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(8)]


def lower_half_rule(tokenizer):
    """Score = share of the answer's tokens whose id is in the lower half of the vocabulary."""
    half = len(tokenizer) // 2

    def reward_fn(prompts, answers):
        out = []
        for answer in answers:
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            out.append(sum(i < half for i in ids) / len(ids) if ids else 0.0)
        return out

    return reward_fn


def small_lora_config(settings):
    config = lora_config(settings)
    config.target_modules = ["q_proj", "v_proj", "lm_head"]
    config.r, config.lora_alpha = 8, 16
    return config


@pytest.fixture()
def policy(tiny_model, tiny_settings):
    """A fresh policy adapter on the shared tiny model; taken out again afterwards."""
    torch.manual_seed(0)
    model, head, _ = attach_policy(
        tiny_model, tiny_settings, None, small_lora_config(tiny_settings)
    )
    yield model, head
    model.unload()


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared by several test runs: one thread per process is faster than two
    threads that keep waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def eos_raised(model, eos_ids, by: float):
    """The output layer's stop-token logits raised by ``by``: the tiny random model gives
    EOS about 1/49k everywhere, too little for where it stops to be a live question."""

    def raise_eos(_module, _inputs, out):
        out = out.clone()
        out[..., eos_ids] += by
        return out

    hook = model.get_base_model().get_output_embeddings().register_forward_hook(raise_eos)
    try:
        yield
    finally:
        hook.remove()


def _config(**overrides) -> PPOConfig:
    values = dict(
        batch_size=16,
        ppo_epochs=4,
        max_new_tokens=6,
        learning_rate=3e-2,
        init_kl_coef=0.0,
        target_kl=None,
        early_stop_kl=None,
        seed=0,
    )
    values.update(overrides)
    return PPOConfig(**values)


def _run(model, head, tokenizer, steps, **overrides):
    trainer = PPOTrainer(
        model,
        tokenizer,
        _config(**overrides),
        reward_fn=lower_half_rule(tokenizer),
        value_head=head,
    )
    return [trainer.step(PROMPTS * 2) for _ in range(steps)]


def test_served_kl_is_zero_at_the_reference_and_grows_with_training(policy, tiny_model):
    """The gate's KL: a fresh adapter (LoRA B = 0) is the reference itself, so every
    log-ratio is 0; after a few strong steps the answers have moved."""
    model, head = policy
    tokenizer = tiny_model.tokenizer
    trainer = PPOTrainer(
        model, tokenizer, _config(), reward_fn=lower_half_rule(tokenizer), value_head=head
    )
    assert trainer.served_kl(PROMPTS * 2, Sampling(0.7, 0.9, 6)) == pytest.approx(0.0, abs=1e-4)
    for _ in range(4):
        trainer.step(PROMPTS * 2)
    assert trainer.served_kl(PROMPTS * 2, Sampling(1.0, 1.0, 6)) > 1.0


def test_ppo_raises_a_rule_based_reward(policy, tiny_model):
    model, head = policy
    history = _run(model, head, tiny_model.tokenizer, steps=6)
    scores = [h["objective/scores"] for h in history]
    assert (scores[-1] + scores[-2]) / 2 > (scores[0] + scores[1]) / 2 + 0.15, scores
    assert all(math.isfinite(h["objective/kl"]) for h in history)
    assert history[-1]["objective/kl"] > 5.0  # it had to move away from the reference
    for key in (
        "loss/policy",
        "loss/value",
        "policy/clipfrac",
        "policy/approx_kl",
        "policy/entropy",
        "ppo/skipped_steps",
        "time/gen_s",
        "time/score_s",
        "time/update_s",
        "objective/kl_coef",
    ):
        assert math.isfinite(history[-1][key]), key
    assert history[-1]["policy/entropy"] < history[0]["policy/entropy"]


def test_a_large_fixed_kl_coef_keeps_the_policy_near_the_reference(policy, tiny_model):
    model, head = policy
    # The same seed, data and learning rate as the test above, where KL passes 5 nats.
    history = _run(model, head, tiny_model.tokenizer, steps=6, init_kl_coef=5.0)
    assert all(math.isfinite(h["objective/kl"]) for h in history)
    assert max(h["objective/kl"] for h in history) < 2.0, [h["objective/kl"] for h in history]
    assert history[-1]["objective/kl_coef"] == 5.0


def test_non_finite_rewards_skip_the_update_and_repeated_ones_abort(policy, tiny_model):
    model, head = policy
    config = _config(batch_size=4, ppo_epochs=1, max_new_tokens=4, max_consecutive_skips=3)

    def nan_reward(prompts, answers):
        return [float("nan")] + [1.0] * (len(answers) - 1)

    trainer = PPOTrainer(model, tiny_model.tokenizer, config, reward_fn=nan_reward, value_head=head)
    before = [p.detach().clone() for p in trainer.params]
    stats = trainer.step(PROMPTS[:4])
    assert stats["ppo/skipped_steps"] == 1 and stats["ppo/updates"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))
    trainer.step(PROMPTS[:4])
    with pytest.raises(NonFiniteError, match="3 updates in a row"):
        trainer.step(PROMPTS[:4])
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


def test_saved_policy_loads_with_plain_peft_and_reproduces_logits(
    tiny_model, tiny_settings, tmp_path
):
    torch.manual_seed(1)
    model, head, _ = attach_policy(tiny_model, tiny_settings, None)
    try:
        with torch.no_grad():  # a policy that differs from the base
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        trainer = PPOTrainer(
            model,
            tiny_model.tokenizer,
            _config(batch_size=4, max_new_tokens=4),
            reward_fn=lambda p, a: [1.0] * len(a),
            value_head=head,
        )
        rollout = trainer.generate(PROMPTS[:4])
        ids, mask = rollout.input_ids, rollout.attention_mask
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
            with model.disable_adapter():
                base_logits = model(input_ids=ids, attention_mask=mask).logits
        out = trainer.save_policy(tmp_path / "policy")
    finally:
        model.unload()
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_model.model, str(out))
    try:
        with torch.no_grad():
            logits = loaded(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(logits, expected, atol=1e-5)
        assert not torch.allclose(logits, base_logits, atol=1e-3)
    finally:
        loaded.unload()


def _pairs(n):
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Question {i}?"}]
        out.append({"messages": messages, "chosen": f"Yes banana {i}.", "rejected": f"No {i}."})
    return out


def test_a_training_round_saves_both_artifacts_and_leaves_the_base_clean(
    tiny_model, tiny_settings, tmp_path
):
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    pointwise = [
        {"messages": p["messages"], "answer": p["chosen"], "label": 1.0} for p in _pairs(4)
    ]
    stages = []
    first = run_training_round(
        tiny_model,
        tiny_settings,
        pointwise=pointwise,
        pairs=_pairs(8),
        prompts=PROMPTS,
        policy_dir=None,
        reward_dir=None,
        out_dir=tmp_path / "round1",
        heldout_pairs=_pairs(4),
        progress=lambda stage, fraction: stages.append((stage, fraction)),
    )
    for key in (
        "reward/accuracy_before",
        "reward/accuracy",
        "reward/heldout_worse_without_top_user",
        "reward/margin",
        "objective/kl",
        "objective/scores",
        "ppo/skipped_steps",
        "loss/policy",
    ):
        assert math.isfinite(first.metrics[key]), key
    assert ("ppo", 1.0) in stages and stages[-1] == ("saved", 1.0)
    assert not any("lora" in name for name, _ in tiny_model.model.named_modules())
    after = tiny_model.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    # The next round starts from the saved adapters (incremental), with replayed pairs.
    second = run_training_round(
        tiny_model,
        tiny_settings,
        pointwise=[],
        pairs=_pairs(4),
        prompts=PROMPTS,
        policy_dir=first.policy_dir,
        reward_dir=first.reward_dir,
        out_dir=tmp_path / "round2",
        heldout_pairs=_pairs(4),
        replay_pairs=_pairs(8),
    )
    assert second.metrics["reward/accuracy_before"] == first.metrics["reward/accuracy"]
    assert second.metrics["reward/train_examples"] == 12
    assert not any("lora" in name for name, _ in tiny_model.model.named_modules())


def test_rewrites_are_imitated_when_demo_coef_is_set(policy, tiny_model):
    """With a reward that says nothing (always 0), only the imitation term moves the
    policy: the rewritten answer becomes more likely than before, and more so than
    with demo_coef = 0."""
    model, head = policy
    demos = [(PROMPTS[i], "Sure! Short answer.") for i in range(4)]

    def demo_nll(trainer):
        with torch.no_grad():
            return float(trainer._demo_loss(len(demos)))

    def run(coef):
        for p in head.parameters():
            torch.nn.init.zeros_(p)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.zeros_(p)  # back to the base model
        trainer = PPOTrainer(
            model, tiny_model.tokenizer, _config(batch_size=4, ppo_epochs=2, demo_coef=coef),
            reward_fn=lambda prompts, answers: [0.0] * len(answers), value_head=head,
            demos=demos,
        )  # fmt: skip
        probe = PPOTrainer(
            model, tiny_model.tokenizer, _config(batch_size=4, demo_coef=1.0),
            reward_fn=lambda prompts, answers: [0.0] * len(answers), value_head=head,
            demos=demos,
        )  # fmt: skip
        before = demo_nll(probe)
        stats = [trainer.step(PROMPTS[:4]) for _ in range(3)]
        return before, demo_nll(probe), stats

    before, after, stats = run(1.0)
    assert after < before - 1.0, (before, after)
    assert all("loss/demo" in s for s in stats)
    before0, after0, stats0 = run(0.0)
    assert abs(before0 - before) < 1e-4  # same starting point
    assert after < after0 - 0.5
    assert all("loss/demo" not in s for s in stats0)


def test_demonstrations_keep_their_length_and_a_cut_one_gets_no_eos(policy, tiny_model):
    """Issue 9, defect 2: a rewrite longer than the rollout length (6 tokens here) is
    imitated whole up to the demonstration limit, with its EOS; one longer than that
    limit is cut there and has no EOS in its loss."""
    model, head = policy
    tok = tiny_model.tokenizer
    eos = tok.eos_token_id
    long_answer = " ".join(f"word{i}" for i in range(40))
    n = len(tok.encode(long_answer, add_special_tokens=False))
    assert n > 20
    trainer = PPOTrainer(
        model, tok, _config(batch_size=4, demo_max_tokens=n + 1),
        reward_fn=lambda prompts, answers: [0.0] * len(answers), value_head=head,
    )  # fmt: skip
    whole = trainer.rollout_from_texts(PROMPTS[:2], [long_answer, "Short."])
    assert int(whole.response_mask[0].sum()) == n + 1  # every token, then EOS
    assert whole.response_ids[0, n] == eos and bool(whole.has_eos[0])
    short = tok.encode("Short.", add_special_tokens=False)
    assert int(whole.response_mask[1].sum()) == len(short) + 1 and bool(whole.has_eos[1])
    cut = trainer.rollout_from_texts(PROMPTS[:1], [long_answer], max_tokens=10)
    assert int(cut.response_mask[0].sum()) == 10 and not bool(cut.has_eos[0])
    assert eos not in cut.response_ids[0, :10].tolist()
    unfinished = trainer.rollout_from_texts(PROMPTS[:1], ["Short."], finished=[False])
    assert int(unfinished.response_mask[0].sum()) == len(short)
    assert not bool(unfinished.has_eos[0])


def test_edited_tokens_by_hand():
    """The tokens a person wrote, against the answer they edited (by hand)."""
    T, F = True, False
    assert edited_tokens([1, 2, 9, 4, 5, 7], [1, 2, 3, 4, 5]) == [F, F, T, F, F, T]
    assert edited_tokens([1, 2, 3], [1, 2, 3, 4, 5]) == [F, F, F]  # only deleted
    assert edited_tokens([8, 9], [1, 2, 3]) == [T, T]  # written from scratch
    assert edited_tokens([5, 1, 2, 3], [1, 2, 3]) == [T, F, F, F]  # a bullet put in front
    assert edited_tokens([], [1, 2]) == []


def test_only_the_edited_tokens_and_the_end_are_imitated(policy, tiny_model):
    """A rewrite that keeps the served answer and adds a question: its imitation loss is
    the NLL of the added tokens and the EOS (the kept words are the policy's own sample:
    imitating them only sharpens it), with, at each kept word, only that the answer did
    not end there; "all" and a demonstration given without its original take every
    token; a cut rewrite that only deleted keeps every token."""
    model, head = policy
    tok = tiny_model.tokenizer
    served = "The sky is blue because of scattering."
    rewrite = served + " Would you like to know more?"
    kept = len(tok.encode(served, add_special_tokens=False))
    total = len(tok.encode(rewrite, add_special_tokens=False))
    assert tok.encode(rewrite, add_special_tokens=False)[:kept] == tok.encode(
        served, add_special_tokens=False
    )  # the tokenizer keeps the served words as they were

    def trainer_for(demo_tokens):
        return PPOTrainer(
            model, tok, _config(batch_size=4, demo_coef=1.0, demo_tokens=demo_tokens),
            reward_fn=lambda prompts, answers: [0.0] * len(answers), value_head=head,
        )  # fmt: skip

    trainer = trainer_for("edited")
    demo = trainer.rollout_from_texts(PROMPTS[:3], [rewrite, rewrite, served])
    mask = trainer.demo_loss_mask(
        demo, [(PROMPTS[0], rewrite, served), (PROMPTS[1], rewrite), (PROMPTS[2], served, served)]
    )
    row = mask[0].tolist()
    assert row[:kept] == [0.0] * kept and row[kept : total + 1] == [1.0] * (total + 1 - kept)
    assert mask[1].tolist() == demo.response_mask[1].tolist()  # no original: every token
    # Identical text: nothing written but the EOS (where the person chose to stop).
    assert mask[2].tolist()[: kept + 1] == [0.0] * kept + [1.0]
    cut = trainer.rollout_from_texts(PROMPTS[:1], [served[:10]], finished=[False])
    only_deleted = trainer.demo_loss_mask(cut, [(PROMPTS[0], served[:10], served)])
    assert only_deleted.tolist() == cut.response_mask.tolist()
    everything = trainer_for("all").demo_loss_mask(demo, [(PROMPTS[0], rewrite, served)] * 3)
    assert everything.tolist() == demo.response_mask.tolist()

    # The loss is the NLL over exactly those tokens, plus, at each kept token, that the
    # answer went on there (log(1 - p(stop))), per imitated token.
    trainer.demos = [(PROMPTS[0], rewrite, served)]
    with torch.no_grad(), eos_raised(model, trainer.eos_ids, 9.0):  # p(stop) about 0.14
        loss = float(trainer._demo_loss(1))
        one = trainer.rollout_from_texts(PROMPTS[:1], [rewrite])
        logprobs, _, logits, _ = trainer.wrapped(
            one.input_ids, one.attention_mask, one.query_ids.shape[1]
        )
    p_stop = torch.softmax(logits[0, :kept].double(), -1)[:, trainer.eos_ids].sum(-1)
    imitated = total + 1 - kept
    by_hand = -(logprobs[0, kept : total + 1].double().sum() + torch.log1p(-p_stop).sum())
    assert loss == pytest.approx(float(by_hand) / imitated, rel=1e-5)
    with pytest.raises(ValueError, match="demo_tokens"):
        trainer_for("some")


def test_a_rewrite_that_cut_back_to_a_sentence_end_does_not_teach_stopping_earlier(
    policy, tiny_model
):
    """The thorough oracle's rewrite keeps a long answer's full sentences and deletes the
    cut one. Imitating only the closing EOS (what "edited" imitated before) raised
    p(stop) at every position, the earlier sentence ends too: one round took the
    thorough oracle's answers from 47 to 20 words. With the kept tokens' "the answer
    went on here" in the loss, 20 demonstration steps leave p(stop) at the kept positions
    below where it started, and raise it at the end the person chose (on the commit
    before: p(stop) 0.92-1.00 at every kept position)."""
    model, head = policy
    tok = tiny_model.tokenizer
    kept_text = "The sky is blue. Light scatters in the air. Blue scatters most."
    served = kept_text + " So at sunset the light"
    trainer = PPOTrainer(
        model, tok, _config(batch_size=4, demo_coef=1.0, learning_rate=1e-2),
        reward_fn=lambda prompts, answers: [0.0] * len(answers), value_head=head,
    )  # fmt: skip
    trainer.demos = [(PROMPTS[0], kept_text, served)]
    eos = trainer.eos_ids

    def p_stop():
        demo = trainer.rollout_from_texts(PROMPTS[:1], [kept_text])
        with torch.no_grad():
            _, _, logits, _ = trainer.wrapped(
                demo.input_ids, demo.attention_mask, demo.query_ids.shape[1]
            )
        n = int(demo.response_mask[0].sum())
        return torch.softmax(logits[0, :n].double(), -1)[:, eos].sum(-1)

    with eos_raised(model, eos, 9.0):
        before = p_stop()
        for _ in range(20):
            trainer.optimizer.zero_grad()
            trainer._demo_loss(1).backward()
            trainer.optimizer.step()
        after = p_stop()
    assert 0.05 < float(before[:-1].mean()) < 0.3
    assert float(after[:-1].max()) < float(before[:-1].mean()) / 2  # it went on: no stop
    assert float(after[-1]) > 0.9  # where the person stopped


def test_demo_limit_defaults_to_the_served_answer_limit(tiny_settings):
    settings = tiny_settings.model_copy(update={"max_new_tokens": 200, "ppo_new_tokens": 16})
    assert PPOConfig.from_settings(settings).demo_max_tokens == 200
    settings = settings.model_copy(update={"demo_max_tokens": 50})
    assert PPOConfig.from_settings(settings).demo_max_tokens == 50


def default_kl_controller(settings: Settings):
    config = PPOConfig.from_settings(settings)
    ctl = make_kl_controller(
        config.init_kl_coef,
        config.target_kl,
        config.kl_horizon,
        config.kl_rise_clip,
        config.kl_fall_clip,
    )
    return config, ctl


def test_a_retired_kl_setting_is_refused_with_what_to_set_instead(monkeypatch):
    monkeypatch.setenv("RLHF_KL_ERROR_CLIP", "0.2")
    with pytest.raises(ValueError, match="RLHF_KL_RISE_CLIP .* RLHF_KL_FALL_CLIP"):
        Settings()


def test_the_default_kl_controller_moves_measurably_in_one_round():
    """Issue 9 defect 4: at twice the target KL for one round of default settings
    (4 steps of 8 answers, horizon = those 32 samples, rises clipped to 0.2) the
    coefficient grows by (1 + 0.2 * 8/32)**4 = 1.05**4 = 1.2155x. On the issue's main
    (horizon 10,000 samples) it grew 1.00006x."""
    settings = Settings()
    config, ctl = default_kl_controller(settings)
    for _ in range(settings.ppo_steps):
        ctl.update(2 * config.target_kl, config.batch_size)
    assert ctl.value == pytest.approx(config.init_kl_coef * 1.05**4, rel=1e-6)


def test_the_default_kl_controller_leaves_the_base_within_two_rounds_of_thumbs_only():
    """Thumbs only (nothing to imitate) PPO moved the policy 1-2 nats a round against a
    target of 6: e = clip(1/6 - 1) = -0.5, x(1 - 0.5 * 8/32) = x0.875 a step, so two rounds
    take 0.2 to 0.2 * 0.875**8 = 0.0687 (with the paper's clip 0.2: 0.2 * 0.95**8 = 0.1327,
    and 0.0717 only after five rounds, when the measured run first learnt its taste)."""
    settings = Settings()
    config, ctl = default_kl_controller(settings)
    assert (config.init_kl_coef, config.kl_fall_clip) == (0.2, 0.5)
    for _ in range(2 * settings.ppo_steps):
        ctl.update(1.0, config.batch_size)
    assert ctl.value == pytest.approx(0.0687, abs=1e-4)


def test_the_default_kl_controller_keeps_a_taste_through_four_rounds_of_rollouts_above_target():
    """The rollouts of upbeat-clip05-20min's four rounds read 5.3, 12.9, 13.5 and 11.2 nats
    (the whole step, before the gate scaled it toward the base) against the target of 6.
    Round 1: e = 5.3/6 - 1 = -0.116667, x(1 - 0.116667/4)**4 = x0.888339 -> 0.177668;
    then rises clipped to 0.2, x1.05**4 a round: 0.177668 * 1.05**12 = 0.319066, whose
    KL-regularised optimum lies 1/(2 * 0.319066**2) = 4.91 nats from the base. With one clip
    of 0.5 (3a15b3b) the rises were x1.125**4: 0.177668 * 1.125**12 = 0.730195, an optimum
    0.94 nats from the base, and that run's v4 fell from 0.84 to 0.25."""
    settings = Settings()
    config, ctl = default_kl_controller(settings)
    for round_kl in (5.3, 12.9, 13.5, 11.2):
        for _ in range(settings.ppo_steps):
            ctl.update(round_kl, config.batch_size)
    assert ctl.value == pytest.approx(0.319066, abs=1e-6)
    assert 1 / (2 * ctl.value**2) > 4.9


def test_answers_cut_without_eos_are_penalised_by_default(policy, tiny_model):
    """Issue 9 defect 3 (PPO half): by default scores are normalised with running moments
    (defect 7) and an answer cut without EOS loses RLHF_MISSING_EOS_PENALTY = 1 (in units
    of the scores' std). Scores 1..4: mean 2.5, std sqrt(1.25) = 1.118034, normalised
    -1.341641, -0.447214, 0.447214, 1.341641; the 2nd and 4th have no EOS: -1 each."""
    model, head = policy
    config = PPOConfig.from_settings(Settings())
    trainer = PPOTrainer(
        model, tiny_model.tokenizer, config, reward_fn=lower_half_rule(tiny_model.tokenizer),
        value_head=head,
    )  # fmt: skip
    processed = trainer._process_scores(
        torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, False, True, False])
    )
    torch.testing.assert_close(
        processed, torch.tensor([-1.341641, -1.447214, 0.447214, 0.341641]), atol=1e-5, rtol=0
    )


def _scores_trainer(model, head, tokenizer, **settings):
    config = PPOConfig.from_settings(Settings(**settings), init_kl_coef=0.0, target_kl=None)
    return PPOTrainer(
        model, tokenizer, config, reward_fn=lower_half_rule(tokenizer), value_head=head
    )


def test_an_answer_the_rollout_length_stopped_gets_no_score_and_no_penalty(policy, tiny_model):
    """Rollouts stop at RLHF_PPO_NEW_TOKENS (64), the UI at RLHF_MAX_NEW_TOKENS (256): an
    answer stopped by the first would have gone on when served. Penalised as cut, it pushed
    every taste to finish within 64 tokens (72% of the first round's rollouts on
    oracle_thorough served at 256). By default its score is unused and stays out of the
    moments: finished scores 1 and 3, mean 2, std 1, normalised -1 and 1; the unfinished
    rows get 0 (their return comes from the critic). RLHF_PPO_UNFINISHED=penalty keeps the
    old scoring."""
    model, head = policy
    tok = tiny_model.tokenizer
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    has_eos = torch.tensor([True, False, True, False])
    trainer = _scores_trainer(model, head, tok)
    rollout = trainer.rollout_from_texts(PROMPTS[:4], ["a"] * 4, finished=has_eos.tolist())
    unfinished = trainer.unfinished(rollout)
    assert unfinished.tolist() == [False, True, False, True]
    processed = trainer._process_scores(scores, has_eos, unfinished)
    torch.testing.assert_close(processed, torch.tensor([-1.0, 0.0, 1.0, 0.0]))

    old_way = _scores_trainer(model, head, tok, ppo_unfinished="penalty")
    assert not old_way.unfinished(rollout).any()
    # Rollouts as long as served answers: no answer is unfinished, one without EOS is cut.
    as_served = _scores_trainer(model, head, tok, ppo_new_tokens=256)
    assert not as_served.unfinished(rollout).any()


def test_an_unfinished_answers_return_bootstraps_from_the_critic(policy, tiny_model):
    """With no KL penalty (coefficient 0) an answer's return at its last token is its score
    if it ended, and the critic's value of the state after its last token if the rollout's
    length stopped it (gamma = 1: A_T = 0 + V_after - V_T, return = A_T + V_T = V_after)."""
    model, head = policy
    tok = tiny_model.tokenizer
    with torch.no_grad():
        head.weight.normal_(0, 0.5)  # a critic that is not 0 everywhere
        head.bias.fill_(0.3)
    trainer = _scores_trainer(model, head, tok)
    long_answer = " ".join(f"word{i}" for i in range(12))
    rollout = trainer.rollout_from_texts(
        PROMPTS[:2], [long_answer, "Short."], max_tokens=8, finished=[False, True]
    )
    assert int(rollout.response_mask[0].sum()) == rollout.response_mask.shape[1] == 8
    exp = trainer.make_experience(rollout, torch.tensor([5.0, 7.0]))
    with torch.no_grad():
        *_, after = trainer.policy_value(
            rollout.input_ids, rollout.attention_mask, rollout.query_ids.shape[1]
        )
    last_finished = int(rollout.response_mask[1].sum()) - 1
    assert float(exp.returns[0, 7]) == pytest.approx(float(after[0]), abs=1e-4)
    assert float(after[0]) != pytest.approx(0.0, abs=1e-3)
    # the finished answer is the only finished score in the batch: the moments fall back
    # to both scores (mean 6, std 1), 7 normalises to 1
    assert float(exp.returns[1, last_finished]) == pytest.approx(1.0, abs=1e-4)
    assert exp.stats["objective/unfinished_rate"] == 0.5
    # The state after an answer's last token is read at that token, not at the padding:
    # an unfinished answer shorter than the batch's widest bootstraps the same.
    short = trainer.rollout_from_texts(
        PROMPTS[:2], [long_answer, "Short."], max_tokens=5, finished=[True, False]
    )
    alone = trainer.rollout_from_texts(PROMPTS[1:2], ["Short."], max_tokens=5, finished=[False])
    with torch.no_grad():
        *_, padded = trainer.policy_value(
            short.input_ids, short.attention_mask, short.query_ids.shape[1]
        )
        *_, unpadded = trainer.policy_value(
            alone.input_ids, alone.attention_mask, alone.query_ids.shape[1]
        )
    assert short.response_mask[1].sum() < short.response_mask.shape[1]
    assert float(padded[1]) == pytest.approx(float(unpadded[0]), abs=1e-4)


def test_old_and_new_logprobs_are_taken_in_the_same_mode(tiny_model, tiny_settings):
    """Issue 9 defect 8: with dropout in the adapter and a learning rate of 0, the first
    update's ratio must be exactly 1 (old log-probs in eval mode, new ones in train mode
    gave an approximate KL of about 0.1 nats per token on main)."""
    config = small_lora_config(tiny_settings)
    config.lora_dropout = 0.5
    torch.manual_seed(0)
    model, head, _ = attach_policy(tiny_model, tiny_settings, None, config)
    try:
        with torch.no_grad():  # LoRA B = 0 would make dropout invisible
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        trainer = PPOTrainer(
            model, tiny_model.tokenizer, _config(batch_size=4, ppo_epochs=1, learning_rate=0.0),
            reward_fn=lower_half_rule(tiny_model.tokenizer), value_head=head,
        )  # fmt: skip
        stats = trainer.step(PROMPTS[:4])
    finally:
        model.unload()
    assert stats["policy/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["policy/clipfrac"] == 0.0


def test_the_critic_follows_a_fixed_reward_within_a_round(policy, tiny_model, tiny_settings):
    """Issue 9 defect 7: raw scores of 5-7 against a zero-initialised value head with an
    absolute value clip of 0.2 kept the value loss at about 9 over a whole round on main.
    With the default running normalisation the targets are O(1): the loss is below 1 and
    falls over the round."""
    model, head = policy
    tokenizer = tiny_model.tokenizer
    rule = lower_half_rule(tokenizer)

    def fixed_reward(prompts, answers):
        return [5.0 + 2.0 * s for s in rule(prompts, answers)]

    config = PPOConfig.from_settings(
        tiny_settings.model_copy(update={"ppo_steps": 4}),
        batch_size=8, micro_batch_size=None, max_new_tokens=8, learning_rate=3e-4,
        answer_limit=8,  # rollouts as long as served answers: every answer is scored
    )  # fmt: skip
    trainer = PPOTrainer(model, tokenizer, config, reward_fn=fixed_reward, value_head=head)
    losses = [trainer.step(PROMPTS)["loss/value"] for _ in range(4)]
    assert max(losses) < 1.0, losses
    assert (losses[2] + losses[3]) / 2 < (losses[0] + losses[1]) / 2, losses


def test_the_gate_samples_as_served_and_measures_kl_to_the_parent(
    policy, tiny_model, tiny_settings, tmp_path
):
    """Issue 9 defect 5: the gate samples RLHF_GATE_SAMPLES answers with the served
    max_new_tokens (not PPO's), and measures the KL to the parent version as well as to
    the base: with the parent = the policy itself it is 0 while the KL to the base is not."""
    model, head = policy
    tokenizer = tiny_model.tokenizer
    settings = tiny_settings.model_copy(
        update={"max_new_tokens": 12, "ppo_new_tokens": 4, "gate_samples": 6}
    )
    trainer = PPOTrainer(
        model, tokenizer, _config(batch_size=4, max_new_tokens=4),
        reward_fn=lower_half_rule(tokenizer), value_head=head,
    )  # fmt: skip
    for _ in range(3):
        trainer.step(PROMPTS[:4])
    trainer.save_policy(tmp_path / "parent")
    lengths = []
    original = model.generate

    def spy(*args, **kwargs):
        lengths.append(kwargs["max_new_tokens"])
        return original(*args, **kwargs)

    model.generate = spy
    try:
        metrics = gate_samples_kl(trainer, settings, PROMPTS[:4], tmp_path / "parent")
    finally:
        del model.generate
    assert set(lengths) == {12}
    assert metrics["gate/samples"] == 6
    assert metrics["objective/kl_served"] > 0.5
    assert metrics["objective/kl_served_ucb"] >= metrics["objective/kl_served"]
    assert metrics["objective/kl_parent"] == pytest.approx(0.0, abs=1e-3)
    assert "parent" not in model.peft_config  # taken out again
    fresh = gate_samples_kl(trainer, settings, PROMPTS[:4], None)  # version 1: parent = base
    assert fresh["objective/kl_parent"] == fresh["objective/kl_served"]


def test_backtracking_halves_the_update_until_the_served_kl_fits(tiny_settings):
    """KL grows about quadratically with the step: 12 f^2 nats at fraction f. Budgets
    10 (total) and 8 (round): the full step (12) overshoots, half of it (3) fits."""
    settings = tiny_settings.model_copy(update={"kl_budget": 10.0, "kl_round_budget": 8.0})
    seen = []

    def measure(fraction):
        seen.append(fraction)
        kl = 12 * fraction**2
        return {"objective/kl_served_ucb": kl, "objective/kl_parent_ucb": kl}

    def fits(metrics):
        return within_kl_budget(metrics, settings)

    fraction, metrics, tried = backtrack_to_kl_budget(measure, fits, max_halvings=2)
    assert (fraction, metrics["objective/kl_served_ucb"], tried) == (0.5, 3.0, 2)
    assert seen == [1.0, 0.5]
    # The round budget alone can force it too: 9 to the base fits, 9 to the parent not.
    assert not within_kl_budget(
        {"objective/kl_served_ucb": 9.0, "objective/kl_parent_ucb": 9.0}, settings
    )
    # No halving allowed, or none fits: the last measurement goes to the gate (refused).
    assert backtrack_to_kl_budget(measure, fits, max_halvings=0)[:2] == (1.0, measure(1.0))
    fraction, metrics, tried = backtrack_to_kl_budget(
        lambda f: {"objective/kl_served_ucb": 50.0}, fits, max_halvings=2
    )
    assert (fraction, tried) == (0.25, 3) and not fits(metrics)


def test_the_fraction_that_fits_is_predicted_from_the_square_root_of_the_kl(tiny_settings):
    """Issue 9: near the budget, halving refused rounds that a smaller step would have
    passed (formal round 2: a quarter step 0.40 nats from a parent at 4.20 measured 7.29
    > 10 at its bound; bullets, question, concise: rounds 3-5). KL to the base grows as
    ``(sqrt(K) + f sqrt(k))^2``. By hand: parent at K = 4, the full step 9 nats from it
    (to the base (2 + 3)^2 = 25), budgets 10 and 8: ``f = (sqrt(10) - 2) / 3 = 0.3874``
    (round budget: sqrt(8/9) = 0.943); with a bound 4% above the mean (26),
    ``(sqrt(10 / 1.04) - 2) / 3 = 0.36696``. (These at ``aim=1``: the budgets themselves;
    the default aims at 90% of each: ``(sqrt(9) - 2) / 3 = 1/3``.)"""
    settings = tiny_settings.model_copy(update={"kl_budget": 10.0, "kl_round_budget": 8.0})
    full = {"objective/kl_served": 25.0, "objective/kl_served_ucb": 25.0,
            "objective/kl_parent": 9.0, "objective/kl_parent_ucb": 9.0}  # fmt: skip

    def predicted(metrics, parent, aim=1.0):
        return fraction_within_kl_budget(metrics, parent, settings, aim=aim)

    assert predicted(full, 4.0) == pytest.approx(0.38743, abs=1e-5)
    with_margin = {**full, "objective/kl_served_ucb": 26.0}
    assert predicted(with_margin, 4.0) == pytest.approx(0.36696, abs=1e-5)
    # From the base (K = 0) only the round budget can bind: min(sqrt(10)/3, sqrt(8/9)).
    assert predicted(full, 0.0) == pytest.approx(math.sqrt(8 / 9))
    # A parent already at the budget: the smallest step.
    assert predicted(full, 10.0) == 1 / 64
    assert fraction_within_kl_budget(full, 4.0, settings) == pytest.approx(1 / 3)  # aim 0.9

    # The line search measures the predicted fraction first. The full step's bound is
    # 10% above its mean (27.5; to the parent 9.9): aiming at 90% of the budgets,
    # f = (sqrt(9 / 1.1) - 2) / 3 = 0.28680 (round: sqrt(7.2 / 9.9) = 0.853). Here the
    # spread comes from the step alone (+2.5 f^2), so at 0.28680 the bound is 8.18 + 0.21
    # = 8.39: it fits, a larger step than halving finds (0.5: bound 12.875, refused; 0.25: 7.72),
    # in one measurement fewer.
    seen = []

    def measure(fraction):
        seen.append(fraction)
        to_base, to_parent = (2 + 3 * fraction) ** 2, 9 * fraction**2
        return {
            "objective/kl_served": to_base,
            "objective/kl_served_ucb": to_base + 2.5 * fraction**2,
            "objective/kl_parent": to_parent,
            "objective/kl_parent_ucb": 1.1 * to_parent,
        }

    def fits(metrics):
        return within_kl_budget(metrics, settings)

    fraction, metrics, tried = backtrack_to_kl_budget(
        measure, fits, 2, first_guess=lambda m: fraction_within_kl_budget(m, 4.0, settings)
    )
    assert fraction == pytest.approx(0.28680, abs=1e-5) and tried == 2 and fits(metrics)
    assert backtrack_to_kl_budget(measure, fits, 2)[0] == 0.25  # halving alone


def test_a_wide_spread_in_the_full_step_still_leaves_room_for_a_smaller_one(tiny_settings):
    """Issue 9 (ec58f49, formal round 1): the full step's gate bound stood 10 nats above
    its mean (a few answers far out), and the first rule, an additive margin
    ``sqrt(B - (bound - mean))``, left no room at all: 1/64 of the update was published,
    0.002 nats from the base, a lost round. Each answer's KL shrinks as ``f^2`` from the
    base, so the spread does too. By hand: mean 12, bound 22, to the parent (the base) the
    same, budgets 10 and 8 aimed at 90%: total ``sqrt(9 / 22) = 0.640``, round
    ``sqrt(7.2 / 22) = 0.572``; the line search measures 0.572 (bound 22 x 0.327 = 7.2)
    and publishes it."""
    settings = tiny_settings.model_copy(update={"kl_budget": 10.0, "kl_round_budget": 8.0})
    full = {"objective/kl_served": 12.0, "objective/kl_served_ucb": 22.0,
            "objective/kl_parent": 12.0, "objective/kl_parent_ucb": 22.0}  # fmt: skip
    assert fraction_within_kl_budget(full, 0.0, settings) == pytest.approx(math.sqrt(7.2 / 22))

    def measure(fraction):
        return {k: v * fraction**2 for k, v in full.items()}

    fraction, metrics, tried = backtrack_to_kl_budget(
        measure,
        lambda m: within_kl_budget(m, settings),
        2,
        first_guess=lambda m: fraction_within_kl_budget(m, 0.0, settings),
    )
    assert fraction == pytest.approx(math.sqrt(7.2 / 22)) and tried == 2
    assert metrics["objective/kl_served_ucb"] == pytest.approx(7.2)


def test_the_predicted_fraction_is_measured_even_above_a_half(tiny_settings):
    """Issue 9 (bae41df, formal round 1): the full step just over both budgets (mean 8.5,
    bound 10.1; from the base, so to the parent the same) was predicted to fit at 0.89
    and published at 0.5, the cap on the first guess then: a quarter of its KL (1.65
    nats), a round mostly lost. By hand, budgets 10 and 8 aimed at 90%: total
    ``sqrt(9 / 10.1) = 0.944``, round ``sqrt(7.2 / 10.1) = 0.8443``."""
    settings = tiny_settings.model_copy(update={"kl_budget": 10.0, "kl_round_budget": 8.0})
    full = {"objective/kl_served": 8.5, "objective/kl_served_ucb": 10.1,
            "objective/kl_parent": 8.5, "objective/kl_parent_ucb": 10.1}  # fmt: skip

    fraction, metrics, tried = backtrack_to_kl_budget(
        lambda f: {k: v * f**2 for k, v in full.items()},
        lambda m: within_kl_budget(m, settings),
        2,
        first_guess=lambda m: fraction_within_kl_budget(m, 0.0, settings),
    )
    assert fraction == pytest.approx(0.84432, abs=1e-5) and tried == 2
    assert metrics["objective/kl_parent_ucb"] == pytest.approx(7.2)
    # A guess that is no fraction (a NaN measurement; the full step predicted to fit,
    # which it did not): plain halving.
    for guess in (math.nan, 1.0):
        assert (
            backtrack_to_kl_budget(
                lambda f: {k: v * f**2 for k, v in full.items()},
                lambda m: within_kl_budget(m, settings),
                1,
                first_guess=lambda m, g=guess: g,
            )[0]
            == 0.5
        )


def test_near_the_budget_the_adapter_is_scaled_toward_the_base_when_that_keeps_more(
    tiny_settings,
):
    """Issue 9 (ef3f6f1, formal): near the budget the line search moved back toward the
    parent and kept little of a round (round 2: 0.137 of it; round 3: 1/64, the parent
    republished). Scaling the whole adapter toward the base keeps the round's direction.
    By hand, budget 10 aimed at 90%: full step M = 10 nats from the base (bound 12.5,
    ratio 1.25), k = 4 from a parent at K = 4: toward the parent
    ``f = (sqrt(7.2) - 2) / 2 = 0.3416`` gives up ``(1 - f)^2 k = 1.734`` nats of the
    round; scaled, ``s = sqrt(9 / 12.5) = 0.8485`` gives up ``(1 - s)^2 M = 0.229``. Had the
    round gone on straight along the parent's direction (M = (2 + 2)^2 = 16, bound 20),
    both are the same policy: s = sqrt(9 / 20) = 0.6708, ``0.329^2 x 16 = 1.734``."""
    settings = tiny_settings.model_copy(update={"kl_budget": 10.0, "kl_round_budget": 8.0})
    turned = {"objective/kl_served": 10.0, "objective/kl_served_ucb": 12.5,
              "objective/kl_parent": 4.0, "objective/kl_parent_ucb": 4.0}  # fmt: skip
    f = fraction_within_kl_budget(turned, 4.0, settings)
    s = scale_within_kl_budget(turned, settings)
    assert (f, s) == (pytest.approx(0.34164, abs=1e-5), pytest.approx(0.84853, abs=1e-5))
    assert toward_base_keeps_more(turned, f, s)
    straight = {**turned, "objective/kl_served": 16.0, "objective/kl_served_ucb": 20.0}
    f2, s2 = (
        fraction_within_kl_budget(straight, 4.0, settings),
        scale_within_kl_budget(straight, settings),
    )
    assert (1 - s2) ** 2 * 16 == pytest.approx((1 - f2) ** 2 * 4, abs=1e-9)
    assert scale_within_kl_budget({"objective/kl_served": 0.0}, settings) == 1.0
    # From the base (the first version) the round budget binds too: to the parent 10 nats,
    # bound 12.5, so s = min(sqrt(9 / 12.5), sqrt(7.2 / 12.5)) = 0.7589.
    first = {**turned, "objective/kl_parent": 10.0, "objective/kl_parent_ucb": 12.5}
    assert scale_within_kl_budget(first, settings, parent_is_base=True) == pytest.approx(
        math.sqrt(7.2 / 12.5)
    )


def test_a_round_past_the_budget_from_a_parent_publishes_the_adapter_scaled(
    tiny_model, tiny_settings, tmp_path, monkeypatch
):
    """The same on the tiny model: a second round whose full step passes a tight total
    budget, from a parent recorded near it, publishes its own full step with every LoRA
    ``B`` scaled by the predicted ``s`` (so the weight change ``B A`` scales by ``s``),
    ``A`` as the full step left it, and the scaled policy's KL within the budget. (The
    parent's side, measured next and chosen by the reward model's scores, is left out
    here: the tiny model's scores are noise; the scripted test of that choice is
    ``test_a_scaled_candidate_is_published_only_if_it_outscores_the_parents_side``.)"""
    from safetensors.torch import load_file

    from rlhf_core.gate import KLSearch

    monkeypatch.setattr(
        KLSearch, "_parent_side_unless_scaled_scores_clearly_higher", lambda self: None
    )

    settings = tiny_settings.model_copy(update={"ppo_steps": 2})
    common = dict(pointwise=[], pairs=_pairs(8), prompts=PROMPTS, reward_dir=None,
                  heldout_pairs=_pairs(4))  # fmt: skip
    first = run_training_round(
        tiny_model, settings, policy_dir=None, out_dir=tmp_path / "r1", **common
    )
    loose = run_training_round(
        tiny_model, settings, policy_dir=first.policy_dir, out_dir=tmp_path / "loose", **common
    )
    assert loose.metrics["gate/base_scale"] == 1.0
    assert loose.metrics["gate/update_fraction"] == 1.0
    full = {k: loose.metrics[f"gate/full_{k.split('/')[1]}"] for k in (
        "objective/kl_served", "objective/kl_served_ucb",
        "objective/kl_parent", "objective/kl_parent_ucb")}  # fmt: skip
    # A total budget at half the full step's bound; the parent recorded at the budget
    # (K = B), so moving back toward it keeps only the smallest step.
    budget = full["objective/kl_served_ucb"] / 2
    tight = settings.model_copy(
        update={"kl_budget": budget, "kl_round_budget": 10 * budget, "kl_backtrack_steps": 2}
    )
    meta_file = tmp_path / "r1" / "policy" / "policy_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["metrics"]["objective/kl_served"] = budget
    meta_file.write_text(json.dumps(meta))
    scaled = run_training_round(
        tiny_model, tight, policy_dir=first.policy_dir, out_dir=tmp_path / "scaled", **common
    )
    expected = scale_within_kl_budget(full, tight)
    assert scaled.metrics["gate/base_scale"] == pytest.approx(expected)
    assert scaled.metrics["gate/update_fraction"] == 1.0
    assert within_kl_budget(scaled.metrics, tight)
    weights = load_file(Path(scaled.policy_dir) / "adapter_model.safetensors")
    reference = load_file(Path(loose.policy_dir) / "adapter_model.safetensors")
    for name, tensor in weights.items():
        factor = expected if "lora_B" in name else 1.0
        torch.testing.assert_close(tensor, factor * reference[name])


def test_a_scale_that_misses_is_followed_by_one_predicted_from_its_measurement(tiny_settings):
    """Issue 9 (d16f707, formal round 2): the scaled adapter missed the budget at its
    predicted 0.66 and the round was refused after one parent-ward try. The KL of a scaled
    adapter is second order in the scale, so the miss itself predicts the next one. By
    hand, budget 10 aimed at 90%: the full step at mean 16, bound 20 gives
    ``s1 = sqrt(9 / 20) = 0.67082``; the KL is 30% steeper than predicted there (bound
    26 x 0.45 = 11.7 > 10), so ``s2 = s1 sqrt(9 / 11.7) = 0.58835``, bound exactly 9:
    published in three measurements where halving (0.335) gives up three quarters."""
    settings = tiny_settings.model_copy(update={"kl_budget": 10.0, "kl_round_budget": 8.0})

    def measure(s):
        return {"objective/kl_served": 16 * s**2, "objective/kl_served_ucb": 26 * s**2,
                "objective/kl_parent": 4 * s**2, "objective/kl_parent_ucb": 5 * s**2}  # fmt: skip

    full = {**measure(1.0), "objective/kl_served_ucb": 20.0}
    scale, metrics, tried = backtrack_to_kl_budget(
        measure,
        lambda m: within_kl_budget(m, settings),
        3,
        first_guess=lambda m: scale_within_kl_budget(m, settings),
        full=full,
        next_guess=lambda s, m: rescale_after_miss(s, m, settings),
    )
    assert scale == pytest.approx(0.58835, abs=1e-5) and tried == 3
    assert metrics["objective/kl_served_ucb"] == pytest.approx(9.0)
    # The round budget answers where it is the one missed: 0.5 x sqrt(7.2 / 9) = 0.4472.
    missed_round = {"objective/kl_served_ucb": 5.0, "objective/kl_parent_ucb": 9.0}
    assert rescale_after_miss(0.5, missed_round, settings) == pytest.approx(0.44721, abs=1e-5)


def test_the_rescale_after_a_miss_follows_the_measured_growth_of_the_kl(tiny_settings):
    """Formal's rounds 1 and 2 on 7ab017c: the KL fell from 14.6 to 5.4 nats at scale
    0.40 (and 19.8 to 6.2 at 0.46), far slower than second order, and the rescale that
    assumed ``s^2`` missed twice in each round (5 measurements, 94 and 117 s of the gate).
    By hand, KL mean ``15 s^1.1``, bound 1.2 x the mean, total budget 10 aimed at 9: the
    first guess ``sqrt(9 / 18) = 0.70711`` measures mean 15 x 0.70711^1.1 = 10.2453,
    bound 12.2944 (a miss); the two means give ``p = ln(15 / 10.2453) / ln(1 / 0.70711)
    = 1.1``, and ``s2 = 0.70711 (9 / 12.2944)^(1 / 1.1) = 0.53252``, bound 9.000: it fits
    in three measurements. The second-order rescale goes to 0.60500 (bound 10.356, a
    miss) and 0.56399 (9.587): four."""
    settings = tiny_settings.model_copy(update={"kl_budget": 10.0, "kl_round_budget": 100.0})

    def measure(s):
        mean = 15 * s**1.1
        return {"objective/kl_served": mean, "objective/kl_served_ucb": 1.2 * mean,
                "objective/kl_parent": 0.1, "objective/kl_parent_ucb": 0.1}  # fmt: skip

    full = measure(1.0)
    first = scale_within_kl_budget(full, settings)
    assert first == pytest.approx(0.70711, abs=1e-5)
    assert measure(first)["objective/kl_served"] == pytest.approx(10.2453, abs=1e-4)
    assert kl_exponent((1.0, full), first, measure(first)) == pytest.approx(1.1)
    guess = rescale_after_miss(first, measure(first), settings, previous=(1.0, full))
    assert guess == pytest.approx(0.53252, abs=1e-5)
    assert rescale_after_miss(first, measure(first), settings) == pytest.approx(0.60500, abs=1e-5)
    measured_scales = [(1.0, full)]

    def next_scale(s, missed):
        out = rescale_after_miss(s, missed, settings, previous=measured_scales[-1])
        measured_scales.append((s, missed))
        return out

    scale, metrics, tried = backtrack_to_kl_budget(
        measure, lambda m: within_kl_budget(m, settings), 3,
        first_guess=lambda m: scale_within_kl_budget(m, settings), full=full,
        next_guess=next_scale,
    )  # fmt: skip
    assert scale == pytest.approx(0.53252, abs=1e-5) and tried == 3
    assert metrics["objective/kl_served_ucb"] == pytest.approx(9.0, abs=1e-3)
    # The exponent stays within [1, 2]: second order at most, and a KL that did not fall
    # (noise) says nothing, so the second-order rule of before.
    quadratic = {"objective/kl_served": 4.0}
    assert kl_exponent((1.0, {"objective/kl_served": 16.0}), 0.5, quadratic) == 2.0
    assert kl_exponent((1.0, {"objective/kl_served": 40.0}), 0.5, quadratic) == 2.0
    assert kl_exponent((1.0, {"objective/kl_served": 5.0}), 0.5, quadratic) == 1.0
    assert kl_exponent((1.0, {"objective/kl_served": 3.0}), 0.5, quadratic) == 2.0


def test_the_kl_to_the_parent_of_a_scaled_adapter_is_predicted(tiny_settings):
    """Review of 7dac52d: scaling toward the base was chosen without asking the round
    budget, and from a parent of its own it does not take the KL to the parent to 0.
    By hand, KL as a squared distance: M = 9 from the base, k = 9.5 from the parent,
    K = 5 the parent from the base; at s = 0.843 the scaled policy lies
    ``0.843^2 x 9 + 5 - 0.843 x (5 + 9 - 9.5) = 6.3958 + 5 - 3.7935 = 7.6023`` from the
    parent (K = 5 at s = 0, k = 9.5 at s = 1); the bound keeps its ratio (x 1.2)."""
    full = {"objective/kl_served": 9.0, "objective/kl_parent": 9.5,
            "objective/kl_parent_ucb": 11.4}  # fmt: skip
    assert parent_kl_when_scaled(full, 5.0, 0.843) == pytest.approx(1.2 * 7.60234, abs=1e-4)
    assert parent_kl_when_scaled(full, 5.0, 0.0) == pytest.approx(1.2 * 5.0)
    assert parent_kl_when_scaled(full, 5.0, 1.0) == pytest.approx(11.4)
    # Formal's round 3 on 7dac52d (M 19.00, k 7.19 [9.22], K 7.33, s 0.593): measured 3.42.
    formal = {"objective/kl_served": 18.997, "objective/kl_parent": 7.191,
              "objective/kl_parent_ucb": 9.215}  # fmt: skip
    assert parent_kl_when_scaled(formal, 7.328, 0.5929) == pytest.approx(3.41, abs=0.01)
    # From a parent of its own the rescale after a miss answers the total budget only.
    settings = tiny_settings.model_copy(update={"kl_budget": 10.0, "kl_round_budget": 8.0})
    missed_round = {"objective/kl_served_ucb": 5.0, "objective/kl_parent_ucb": 9.0}
    assert rescale_after_miss(0.5, missed_round, settings, parent_is_base=False) == 0.5


def test_set_update_fraction_interpolates_between_parent_and_final():
    param = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    start, end = torch.tensor([0.0, 2.0]), torch.tensor([4.0, -2.0])
    set_update_fraction([param], [start], [end], 0.25)
    assert param.tolist() == [1.0, 1.0]
    set_update_fraction([param], [start], [end], 1.0)
    assert param.tolist() == [4.0, -2.0]


def test_a_round_that_overshoots_the_kl_budget_publishes_a_shrunk_update(
    tiny_model, tiny_settings, tmp_path
):
    """Issue 9: rounds were refused outright when the served KL passed the budget (the
    learning benchmark lost round 2 at KL 15.2 > 10). Now the update is halved toward the
    parent until it fits, and the saved policy is the shrunk one: its served KL is the
    measured one, below the full update's."""
    settings = tiny_settings.model_copy(update={"ppo_steps": 3, "kl_backtrack_steps": 0})
    common = dict(
        pointwise=[], pairs=_pairs(8), prompts=PROMPTS, policy_dir=None, reward_dir=None,
        heldout_pairs=_pairs(4),
    )  # fmt: skip
    full = run_training_round(tiny_model, settings, out_dir=tmp_path / "full", **common)
    assert full.metrics["gate/update_fraction"] == 1.0
    assert full.metrics["gate/base_scale"] == 1.0
    kl_full = full.metrics["objective/kl_served_ucb"]
    assert kl_full > 0
    # A budget between the full step's KL and nothing: the same round (same seed) shrinks.
    tight = settings.model_copy(update={"kl_budget": kl_full / 3, "kl_backtrack_steps": 4})
    shrunk = run_training_round(tiny_model, tight, out_dir=tmp_path / "shrunk", **common)
    assert shrunk.metrics["gate/measurements"] >= 2
    assert shrunk.metrics["objective/kl_served_ucb"] <= kl_full / 3
    assert within_kl_budget(shrunk.metrics, tight)
    # The search chose the candidate on its sample: the gate decided on it pooled with a
    # fresh sample of the same policy (twice the answers, the mean of the two means).
    assert shrunk.metrics["gate/samples"] == 2 * settings.gate_samples
    chosen, fresh = shrunk.metrics["gate/chosen_kl_served"], shrunk.metrics["gate/fresh_kl_served"]
    assert chosen != fresh
    assert shrunk.metrics["objective/kl_served"] == pytest.approx((chosen + fresh) / 2)
    assert "gate/chosen_kl_served" not in full.metrics  # a full step that fits: no search
    # Every measurement is kept in order: the full step first, the confirmation last.
    tries = int(shrunk.metrics["gate/measurements"])
    assert shrunk.metrics["gate/try0_scale"] == 1.0 == shrunk.metrics["gate/try0_fraction"]
    assert shrunk.metrics["gate/try0_kl_served_ucb"] == pytest.approx(kl_full)
    last = f"gate/try{tries - 1}"
    assert shrunk.metrics[f"{last}_scale"] == shrunk.metrics["gate/base_scale"]
    assert f"gate/try{tries}_scale" not in shrunk.metrics
    assert shrunk.metrics[f"{last}_kl_served"] == pytest.approx(fresh)
    # The full step's own measurement is kept beside the published one's.
    assert shrunk.metrics["gate/full_kl_served_ucb"] == pytest.approx(kl_full)
    # The first version's parent is the base: the shrink scales every LoRA B (the weight
    # change exactly ``s`` times the round's), A as the full step left it. (d16f707
    # interpolated A and B both, not linear in the weight change: formal's round 1,
    # predicted to fit at 0.555 of its step, passed the budget there.)
    scale = shrunk.metrics["gate/base_scale"]
    assert 0 < scale < 1 and shrunk.metrics["gate/update_fraction"] == 1.0
    from safetensors.torch import load_file

    weights = load_file(Path(shrunk.policy_dir) / "adapter_model.safetensors")
    reference = load_file(Path(full.policy_dir) / "adapter_model.safetensors")
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, (scale if "lora_B" in name else 1.0) * reference[name])


def test_a_parent_near_the_kl_budget_raises_the_rounds_kl_coefficient(
    tiny_model, tiny_settings, tmp_path
):
    """Issue 9: a version published near the KL budget left no room, and every later
    round was refused (bullets: v2's bound 7.43 of 10, rounds 3-5 refused at 10.7-12.1
    while the controller's coefficient crept 0.24 -> 0.31). The round's KL penalty now
    grows as the parent's served KL fills the budget (``kl_barrier``): a parent at half
    the budget doubles it, in every step's rewards and in the round's metrics."""
    settings = tiny_settings.model_copy(update={"ppo_steps": 1, "kl_barrier": True})
    common = dict(pointwise=[], pairs=_pairs(8), prompts=PROMPTS, reward_dir=None,
                  heldout_pairs=_pairs(4))  # fmt: skip
    first = run_training_round(
        tiny_model, settings, policy_dir=None, out_dir=tmp_path / "r1", **common
    )
    assert first.metrics["objective/kl_barrier"] == 1.0  # no parent: the plain penalty
    meta_file = tmp_path / "r1" / "policy" / "policy_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["metrics"]["objective/kl_served_ucb"] = settings.kl_budget / 2
    meta_file.write_text(json.dumps(meta))
    second = run_training_round(
        tiny_model, settings, policy_dir=first.policy_dir, out_dir=tmp_path / "r2", **common
    )
    controller = second.metrics["objective/kl_controller_coef"]
    assert second.metrics["objective/kl_barrier"] == pytest.approx(2.0)
    assert second.metrics["objective/kl_coef"] == pytest.approx(2 * controller)
    # The imitation of rewrites is regularised by the same penalty: its weight halves.
    assert second.metrics["objective/demo_coef"] == pytest.approx(settings.demo_coef / 2)
    # The controller's own value (what the next round starts from) is not multiplied.
    assert second.trainer_state["kl_ctl"]["value"] == pytest.approx(controller)
    off = settings.model_copy(update={"kl_barrier": False})
    plain = run_training_round(
        tiny_model, off, policy_dir=first.policy_dir, out_dir=tmp_path / "r3", **common
    )
    assert plain.metrics["objective/kl_barrier"] == 1.0
    assert plain.metrics["objective/demo_coef"] == pytest.approx(settings.demo_coef)


def test_the_kl_gate_samples_prompts_held_out_of_training(tiny_model, tiny_settings, tmp_path,
                                                         monkeypatch):  # fmt: skip
    """The gate measures the policy on held-out contexts (``gate_prompts``), not on the PPO
    prompts it was just optimised on; with fewer than MIN_GATE_PROMPTS of them it falls
    back to the PPO prompts and says so (``gate/unseen_prompts`` 0). Before, every
    measurement sampled the round's PPO prompts."""
    sampled: list[list] = []
    original = PPOTrainer.served_kl_samples

    def recording(self, prompts, *args, **kwargs):
        sampled.append(list(prompts))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(PPOTrainer, "served_kl_samples", recording)
    settings = tiny_settings.model_copy(update={"ppo_steps": 1, "gate_samples": 8})
    unseen = [[{"role": "user", "content": f"Never trained on {i}?"}] for i in range(5)]
    common = dict(pointwise=[], pairs=_pairs(4), prompts=PROMPTS, policy_dir=None,
                  reward_dir=None)  # fmt: skip
    result = run_training_round(
        tiny_model, settings, out_dir=tmp_path / "a", gate_prompts=unseen + unseen[:1], **common
    )
    assert result.metrics["gate/unseen_prompts"] == 5
    assert sampled and all(p in unseen for batch in sampled for p in batch)
    assert {json.dumps(p) for batch in sampled for p in batch} == {json.dumps(p) for p in unseen}

    sampled.clear()
    few = unseen[: MIN_GATE_PROMPTS - 1]
    result = run_training_round(
        tiny_model, settings, out_dir=tmp_path / "b", gate_prompts=few, **common
    )
    assert result.metrics["gate/unseen_prompts"] == 0
    assert sampled and all(p in PROMPTS for batch in sampled for p in batch)


def test_the_gate_records_what_each_candidates_answers_score(tiny_model, tiny_settings, tmp_path):
    """Beside each candidate's KL, the gate records the mean score the round's reward gives
    the same answers it sampled for the KL (``gate/try{n}_score``), and the decided sample's
    mean (``objective/score_served``): what a smaller candidate gives up is then on record.
    The reward here is each answer's length in characters, so the score of a measurement is
    the mean length of the answers the gate sampled on the held-out prompts."""
    unseen = [[{"role": "user", "content": f"Never trained on {i}?"}] for i in range(8)]
    keys = {json.dumps(p) for p in unseen}
    gate_calls: list[list[float]] = []

    def length_reward(prompts, answers):
        scores = [float(len(a)) for a in answers]
        if all(json.dumps(p) in keys for p in prompts):  # the gate's answers, not PPO's
            gate_calls.append(scores)
        return scores

    settings = tiny_settings.model_copy(
        update={"ppo_steps": 1, "gate_samples": 8, "kl_budget": 1e9, "kl_round_budget": 1e9}
    )
    result = run_training_round(
        tiny_model, settings, pointwise=[], pairs=_pairs(4), prompts=PROMPTS, policy_dir=None,
        reward_dir=None, out_dir=tmp_path / "r", gate_prompts=unseen, reward_fn=length_reward,
    )  # fmt: skip
    metrics = result.metrics
    assert metrics["gate/measurements"] == 1  # the full step fits an unbounded budget
    assert len(gate_calls) == 1 and len(gate_calls[0]) == 8
    expected = sum(gate_calls[0]) / 8
    assert metrics["gate/try0_score"] == pytest.approx(expected)
    assert metrics["objective/score_served"] == pytest.approx(expected)
    assert expected > 0  # the answers were scored, not left empty


def test_the_gate_bound_counts_prompts_not_only_answers():
    """Answers to one prompt are alike: 8 answers over 4 prompts are 4 draws of a prompt.
    By hand, prompts A [2, 4], B [6, 8], C [1, 1], D [9, 11]: over the 8 answers mean 5.25,
    s = sqrt(103.5 / 7) = 3.84522, bound 5.25 + 1.645 x 3.84522 / sqrt(8) = 7.48636; over
    the 4 prompt means (3, 7, 1, 10) s = sqrt(48.75 / 3) = 4.03113, bound 5.25 + 1.645 x
    4.03113 / 2 = 8.56560, the larger. Before, the gate read 7.49 whatever the prompts
    (question on 9370a54: v2 and v3 passed at 8.19 and 7.64 on 8 and 10 contexts and
    measured 10.37 and 10.08 on 32 held-out prompts)."""
    kl = torch.tensor([2.0, 4.0, 6.0, 8.0, 1.0, 1.0, 9.0, 11.0])
    ids = [0, 0, 1, 1, 2, 2, 3, 3]
    assert prompt_clustered_bound(kl, None) == pytest.approx((5.25, 7.48636), abs=1e-5)
    assert prompt_clustered_bound(kl, ids) == pytest.approx((5.25, 8.56560), abs=1e-5)
    # One answer per prompt: the plain bound; answers alike across prompts (a narrow
    # spread of prompt means) never narrow it below the answers' own.
    assert prompt_clustered_bound(kl, list(range(8))) == prompt_clustered_bound(kl, None)
    alike = torch.tensor([1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0])  # prompt means all 5
    assert prompt_clustered_bound(alike, ids) == prompt_clustered_bound(alike, None)
    assert prompt_clustered_bound(torch.tensor([3.0, 5.0]), [0, 0]) == pytest.approx(
        (4.0, 4.0 + 1.645 * math.sqrt(2) / math.sqrt(2))
    )
    # The gate's sample keeps which prompt each answer answered, also pooled.
    from rlhf_core.gate import GateSample

    sample = GateSample(kl, None, ids)
    assert sample.metrics()["objective/kl_served_ucb"] == pytest.approx(8.56560, abs=1e-5)
    assert sample.metrics()["gate/prompts"] == 4
    both = sample.pooled(GateSample(kl + 1, None, ids))
    assert both.prompt_ids == ids + ids and both.metrics()["objective/kl_served"] == 5.75


def test_the_gate_confirms_a_searched_candidate_on_prompts_the_search_did_not_see(
    tiny_model, tiny_settings, tmp_path, monkeypatch
):
    """The search keeps the scale whose sample fitted, and with it the luck of the prompts
    it sampled; a confirmation on the same prompts shares that luck (summary's v3 on
    46fb60e: 7.00 at the search, 6.54 confirmed on the same 16 prompts, 10.76 on the 26
    held-out contexts they came from). The search samples every other unseen prompt, the
    confirmation the others, and the pooled decision counts the prompts of both. Before,
    every measurement sampled the same prompts."""
    sampled: list[list[str]] = []
    original = PPOTrainer.served_kl_samples

    def recording(self, prompts, *args, **kwargs):
        sampled.append([p[-1]["content"] for p in prompts])
        return original(self, prompts, *args, **kwargs)

    settings = tiny_settings.model_copy(update={"ppo_steps": 2, "gate_samples": 16})
    unseen = [[{"role": "user", "content": f"Never trained on {i}?"}] for i in range(16)]
    common = dict(pointwise=[], pairs=_pairs(8), prompts=PROMPTS, reward_dir=None,
                  gate_prompts=unseen, policy_dir=None)  # fmt: skip
    loose = run_training_round(tiny_model, settings, out_dir=tmp_path / "loose", **common)
    # A total budget at half the full step's bound: the search scales the adapter.
    budget = loose.metrics["gate/full_kl_served_ucb"] / 2
    tight = settings.model_copy(update={"kl_budget": budget, "kl_round_budget": budget})
    monkeypatch.setattr(PPOTrainer, "served_kl_samples", recording)
    result = run_training_round(tiny_model, tight, out_dir=tmp_path / "tight", **common)
    metrics = result.metrics
    assert metrics["gate/base_scale"] < 1.0 and metrics["gate/measurements"] >= 3
    assert metrics["gate/unseen_prompts"] == 16 and metrics["gate/confirmation_prompts"] == 8
    assert len(sampled) == metrics["gate/measurements"]
    search, confirmation = frozenset(sampled[0]), frozenset(sampled[-1])  # full step, last
    assert {frozenset(batch) for batch in sampled} == {search, confirmation}
    assert len(search) == len(confirmation) == 8 and not search & confirmation
    assert search | confirmation == {p[-1]["content"] for p in unseen}
    # Decided on both samples pooled: 32 answers over 16 prompts.
    assert metrics["gate/samples"] == 32 and metrics["gate/prompts"] == 16


def test_a_guess_far_below_the_aim_is_followed_by_a_scale_between_it_and_the_miss(tiny_settings):
    """Question's round 2 on 60af9b6: the full step measured 17.80 nats, the second-order
    guess 0.641 fell to 3.84 [bound 4.54], under half the aim, and was published: the KL
    had fallen as ``s^3.45``. By hand, budget 10 aimed at 9: ``p = ln(17.798 / 3.843) /
    ln(1 / 0.641) = 3.44669``; the bound keeps the fitted candidate's ratio 4.543 / 3.843,
    so the aim's mean is 9 x 3.843 / 4.543 = 7.61325 and ``s = 0.641 (7.61325 / 3.843)^(1
    / 3.44669) = 0.78163``."""
    settings = tiny_settings.model_copy(update={"kl_budget": 10.0, "kl_round_budget": 8.0})
    low = (0.641, {"objective/kl_served": 3.843, "objective/kl_served_ucb": 4.543,
                   "objective/kl_parent_ucb": 1.578})  # fmt: skip
    high = (1.0, {"objective/kl_served": 17.798, "objective/kl_served_ucb": 21.919})
    assert scale_between(low, high, settings) == pytest.approx(0.78163, abs=1e-5)
    # The first version (the parent is the base): the round budget is on the same KL,
    # 0.9 x 8 x 3.843 / 4.543 = 6.09 of mean: 0.641 (6.09060 / 3.843)^(1 / 3.44669) = 0.73262.
    first = (0.641, {**low[1], "objective/kl_parent_ucb": 4.543})
    assert scale_between(first, high, settings, parent_is_base=True) == pytest.approx(
        0.73262, abs=1e-5
    )
    # Never past the scale that missed; the fitted one where the two say nothing.
    assert scale_between(low, (0.7, {"objective/kl_served": 3.9}), settings) == 0.7
    assert scale_between(low, (1.0, {"objective/kl_served": 3.0}), settings) == 0.641


def lora_b_norm(named, adapter: str = "") -> float:
    """The summed norm of the LoRA B matrices (of ``adapter``'s, in a model with several)."""
    key = f"lora_B.{adapter}." if adapter else "lora_B"
    return float(sum(t.detach().float().norm() for name, t in named if key in name))


def saved_lora_b_norm(policy_dir) -> float:
    """The LoRA B norm of the adapter a round saved (its published candidate)."""
    from safetensors.torch import load_file

    return lora_b_norm(load_file(Path(policy_dir) / "adapter_model.safetensors").items())


norms: list[float] = []  # the policy's LoRA B norm at each scripted measurement


def _around(mean: float) -> torch.Tensor:
    """16 answers' KL around ``mean``, +-0.5 (a scripted gate sample)."""
    return torch.tensor([mean + (0.5 if i % 2 else -0.5) for i in range(16)])


def _scripted_metrics(mean: float) -> dict[str, float]:
    """What the gate reads from :func:`_scripted_gate`'s sample around ``mean``."""
    return GateSample(_around(mean), None, list(range(16))).metrics()


def _scripted_gate(monkeypatch, means: list[float]) -> list[float]:
    """The gate's measurements, in order, replaced by 16 answers around each of ``means``
    (one per prompt, +-0.5): the search's decisions without the model's sampling luck."""
    import rlhf_core.gate as gate_module

    queue = list(means)
    norms.clear()

    def scripted(trainer, settings, prompts, parent_dir):
        norms.append(lora_b_norm(trainer.model.named_parameters(), POLICY_ADAPTER))
        # A number, or (KL to the base, KL to the parent[, the answers' mean score, or
        # their 16 scores]).
        mean = queue.pop(0)
        if isinstance(mean, tuple):
            scores = None if len(mean) < 3 else mean[2]
            scores = _around(scores) if isinstance(scores, float) else scores
            parent = _around(mean[1]).clamp(min=0)
            return GateSample(_around(mean[0]), parent, list(range(16)), scores)
        return GateSample(_around(mean), None, list(range(16)))

    monkeypatch.setattr(gate_module, "gate_sample", scripted)
    return queue


def _scripted_gate_settings(tiny_settings):
    """One PPO step a round; budgets 10 in total and 8 a round; 16 gate answers."""
    return tiny_settings.model_copy(
        update={"ppo_steps": 1, "kl_budget": 10.0, "kl_round_budget": 8.0, "gate_samples": 16}
    )


def _second_round_scripted(tiny_model, tiny_settings, tmp_path, monkeypatch, means):
    """Version 1 (its gate reads 3.0, it fits at once), then a round from it whose gate
    measurements are ``means`` (:func:`_scripted_gate_settings`)."""
    settings = _scripted_gate_settings(tiny_settings)
    common = dict(pointwise=[], pairs=_pairs(4), prompts=PROMPTS, reward_dir=None)
    _scripted_gate(monkeypatch, [3.0])
    first = run_training_round(tiny_model, settings, out_dir=tmp_path / "v1", policy_dir=None,
                               **common)  # fmt: skip
    left = _scripted_gate(monkeypatch, means)
    result = run_training_round(tiny_model, settings, out_dir=tmp_path / "v2",
                                policy_dir=first.policy_dir, **common)  # fmt: skip
    return settings, result, left


@pytest.mark.parametrize(
    "case, means, published",
    [
        ("the step up fits", [17.8, 3.8, 7.0, 7.2], "up"),
        ("the step up misses", [17.8, 3.8, 12.0, 4.0], "guess"),
        ("the step up fits alone, not pooled", [17.8, 3.8, 8.4, 11.6, 4.0], "guess"),
    ],
)
def test_a_round_whose_scaled_guess_lands_far_below_the_aim_takes_one_step_up(
    tiny_model, tiny_settings, tmp_path, monkeypatch, case, means, published
):
    """The search measures once between a guess that fitted far below the aim and the
    scale that missed, publishes the step up when it fits (pooled with a fresh sample,
    as any searched candidate), and otherwise the guess, its own weights and sample.
    Before, the guess was published (question's round 2 on 60af9b6: 3.84 nats of 10)."""
    settings = tiny_settings.model_copy(
        update={"ppo_steps": 1, "kl_budget": 10.0, "kl_round_budget": 10.0, "gate_samples": 16}
    )
    left = _scripted_gate(monkeypatch, means)
    result = run_training_round(
        tiny_model, settings, out_dir=tmp_path / "r", pointwise=[], pairs=_pairs(4),
        prompts=PROMPTS, policy_dir=None, reward_dir=None,
    )  # fmt: skip
    metrics = result.metrics
    assert not left and metrics["gate/measurements"] == len(means)
    guess = metrics["gate/try1_scale"]
    assert metrics["gate/scaled_up_from"] == guess
    up = metrics["gate/try2_scale"]
    sample = _scripted_metrics
    expected = scale_between((guess, sample(3.8)), (1.0, sample(17.8)), settings,
                             parent_is_base=True)  # fmt: skip
    assert up == pytest.approx(expected) and up > 1.05 * guess
    chosen = up if published == "up" else guess
    assert metrics["gate/base_scale"] == chosen
    assert within_kl_budget(metrics, settings) and result.policy_dir is not None
    # Decided pooled with a fresh sample of the published candidate.
    assert metrics["gate/samples"] == 32
    assert metrics["objective/kl_served"] == pytest.approx((means[-1] + (7.0 if published ==
           "up" else 3.8)) / 2)  # fmt: skip
    # The saved policy is the published candidate's weights.
    saved = saved_lora_b_norm(result.policy_dir)
    assert saved == pytest.approx(norms[2 if published == "up" else 1], rel=1e-4)
    assert norms[2] == pytest.approx(norms[1] * up / guess, rel=1e-4)


def test_the_gates_reading_of_a_scaled_candidate_is_what_its_saved_weights_give(
    tiny_model, tiny_settings, tmp_path, monkeypatch
):
    """The gate's last in-round measurement of a candidate scaled from a parent's round,
    with the parent adapter loaded beside it, is bit for bit what the published folder gives
    loaded fresh and measured the same way with the same seed: nothing of the search (the
    scaling in place, the parent loaded and deleted, the PPO steps) reaches the reading.
    Checked when summary's v3 (46fb60e) read 7.00 at its gate and 10.76 measured again."""
    import rlhf_core.gate as gate_module

    settings = tiny_settings.model_copy(update={"ppo_steps": 2, "gate_samples": 16})
    common = dict(pointwise=[], pairs=_pairs(8), prompts=PROMPTS, reward_dir=None)
    first = run_training_round(tiny_model, settings, policy_dir=None, out_dir=tmp_path / "r1",
                               **common)  # fmt: skip
    loose = run_training_round(tiny_model, settings, policy_dir=first.policy_dir,
                               out_dir=tmp_path / "loose", **common)  # fmt: skip
    budget = loose.metrics["gate/full_kl_served_ucb"] / 2
    tight = settings.model_copy(update={"kl_budget": budget, "kl_round_budget": 10 * budget})
    meta_file = tmp_path / "r1" / "policy" / "policy_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["metrics"]["objective/kl_served"] = budget  # the parent near the budget: scale
    meta_file.write_text(json.dumps(meta))
    readings: list[tuple[list, dict[str, float]]] = []
    original = gate_module.gate_sample

    def seeded(trainer, settings, prompts, parent_dir):
        torch.manual_seed(77)
        sample = original(trainer, settings, prompts, parent_dir)
        readings.append((list(prompts), sample.metrics()))
        return sample

    monkeypatch.setattr(gate_module, "gate_sample", seeded)
    result = run_training_round(tiny_model, tight, policy_dir=first.policy_dir,
                                out_dir=tmp_path / "scaled", **common)  # fmt: skip
    assert result.metrics["gate/base_scale"] < 1.0
    prompts, in_round = readings[-1]
    model, head, _ = attach_policy(tiny_model, tight, result.policy_dir)
    try:
        trainer = PPOTrainer(model, tiny_model.tokenizer, PPOConfig.from_settings(tight),
                             reward_fn=lambda p, a: [0.0] * len(a), value_head=head)  # fmt: skip
        torch.manual_seed(77)
        again = original(trainer, tight, prompts, first.policy_dir).metrics()
    finally:
        model.unload()
    # The KL reading; the answers' scores are the round's reward model's there, zero here.
    in_round.pop("objective/score_served")
    again.pop("objective/score_served")
    assert again == pytest.approx(in_round, rel=1e-5)


def test_a_step_up_next_to_the_scale_that_missed_is_not_measured(
    tiny_model, tiny_settings, tmp_path, monkeypatch
):
    """A step up that lands next to a scale that already missed is that candidate measured
    again, published if its second sample happens to be the lower: summary's round 3 on
    f69bf1d read 7.87 [10.86] at 0.542, 4.70 at 0.491, then 6.62 [8.53] at 0.538 (99% of
    the miss), which was published. The step up stays below 0.95 of the miss; here that is
    under 1.05 of the fitted scale, so there is none. Before, 5 measurements (a step up)."""
    settings = tiny_settings.model_copy(
        update={"ppo_steps": 1, "kl_budget": 10.0, "kl_round_budget": 10.0, "gate_samples": 16}
    )
    left = _scripted_gate(monkeypatch, [25.15, 9.9, 4.7, 4.9])
    result = run_training_round(
        tiny_model, settings, out_dir=tmp_path / "r", pointwise=[], pairs=_pairs(4),
        prompts=PROMPTS, policy_dir=None, reward_dir=None,
    )  # fmt: skip
    metrics = result.metrics
    missed, fitted = metrics["gate/try1_scale"], metrics["gate/try2_scale"]
    sample = _scripted_metrics
    up = scale_between((fitted, sample(4.7)), (missed, sample(9.9)), settings,
                       parent_is_base=True)  # fmt: skip
    assert up > 1.05 * fitted and up > 0.95 * missed  # a step up, next to the miss
    assert 0.95 * missed < 1.05 * fitted
    assert not left and metrics["gate/measurements"] == 4
    assert "gate/scaled_up_from" not in metrics
    assert metrics["gate/base_scale"] == fitted


def _both_sides_scripted(tiny_model, tiny_settings, tmp_path, monkeypatch, parent_side_scores):
    """A round from v1 (at 3.0) whose full step reads 17.0 (6.0 from the parent); the scaled
    candidate fits at 8.0, its answers scored 1.0; the parent's side fits at 8.5, scored
    ``parent_side_scores`` (a mean or 16 scores); the confirmation reads 8.3."""
    return _second_round_scripted(
        tiny_model, tiny_settings, tmp_path, monkeypatch,
        [(17.0, 6.0), (8.0, 3.0, 1.0), (8.5, 2.5, parent_side_scores), (8.3, 2.4, 1.1)],
    )  # fmt: skip


@pytest.mark.parametrize("parent_side_score, published", [(1.2, "parent side"),
                                                            (1.0, "parent side"),
                                                            (0.8, "scaled")])  # fmt: skip
def test_a_scaled_candidate_is_published_only_if_it_outscores_the_parents_side(
    tiny_model, tiny_settings, tmp_path, monkeypatch, parent_side_score, published
):
    """From a parent at 3.0 nats, a full step at 17.0 (6.0 from the parent): scaling the
    whole adapter toward the base keeps more of the round in KL, by hand ``s = sqrt(9 /
    17.21237) = 0.72310`` against ``f = (sqrt(9 x 17 / 17.21237) - sqrt(3)) / sqrt(6) =
    0.51006`` toward the parent, ``(1 - s)^2 x 17 = 1.30`` < ``(1 - f)^2 x 6 = 1.44``. The
    scaled candidate fits (8.0, its answers scored 1.0 by the round's reward model); the
    candidate on the parent's side, measured next, fits too (8.5) and is published when it
    scores at least as high (a tie included), then confirmed with a fresh sample as any
    searched candidate; otherwise the scaled one is, its own weights and sample. Before,
    the scaled candidate was published whatever its answers were worth."""
    settings, result, left = _both_sides_scripted(
        tiny_model, tiny_settings, tmp_path, monkeypatch, parent_side_score
    )
    metrics = result.metrics
    assert not left and metrics["gate/measurements"] == 4
    assert metrics["gate/try1_scale"] == pytest.approx(0.72310, abs=1e-5)
    assert metrics["gate/try2_fraction"] == pytest.approx(0.51006, abs=1e-5)
    assert metrics["gate/parent_side_fraction"] == metrics["gate/try2_fraction"]
    assert within_kl_budget(metrics, settings) and result.policy_dir is not None
    if published == "parent side":
        assert metrics["gate/parent_side_chosen"] == 1.0
        assert metrics["gate/update_fraction"] == pytest.approx(0.51006, abs=1e-5)
        assert metrics["gate/base_scale"] == 1.0
        assert metrics["objective/kl_served"] == pytest.approx((8.5 + 8.3) / 2)
    else:
        assert metrics["gate/parent_side_chosen"] == 0.0
        assert metrics["gate/update_fraction"] == 1.0
        assert metrics["gate/base_scale"] == pytest.approx(0.72310, abs=1e-5)
        assert metrics["objective/kl_served"] == pytest.approx((8.0 + 8.3) / 2)
    # The saved adapter is the published candidate, as the confirmation measured it.
    saved = saved_lora_b_norm(result.policy_dir)
    assert saved == pytest.approx(norms[-1], rel=1e-4)
    assert norms[-1] == pytest.approx(norms[2 if published == "parent side" else 1], rel=1e-4)
    assert norms[1] != pytest.approx(norms[2], rel=1e-3)  # two different candidates


def test_score_gain_pairs_the_two_candidates_answers_by_prompt():
    """By hand, two answers a prompt. Scaled: A [1.2, 0.8], B [0.5, 0.5], C [2, 2], D [0,
    0.2], prompt means 1.0, 0.5, 2.0, 0.1; parent's side: A [0.2, 0.2], B [1.0, 0.8], C [1,
    1], D [0.3, 0.3], means 0.2, 0.9, 1.0, 0.3. Paired by prompt the gaps are 0.8, -0.4,
    1.0, -0.2: mean 0.3, s = sqrt(1.48 / 3) = 0.70238, error 0.70238 / 2 = 0.35119, so the
    scaled candidate is not clearly higher (0.3 < 0.35119). Without prompt ids: means 0.9
    and 0.6, error sqrt(4.14 / 7 / 8 + 1.02 / 7 / 8) = 0.30355."""
    scaled = torch.tensor([1.2, 0.8, 0.5, 0.5, 2.0, 2.0, 0.0, 0.2])
    parent_side = torch.tensor([0.2, 0.2, 1.0, 0.8, 1.0, 1.0, 0.3, 0.3])
    kl = torch.zeros(8)
    ids = ["A", "A", "B", "B", "C", "C", "D", "D"]
    gain = score_gain(GateSample(kl, None, ids, scaled), GateSample(kl, None, ids, parent_side))
    assert gain == pytest.approx((0.3, 0.35119), abs=1e-5)
    # The same prompts in another order pair the same way.
    order = [6, 7, 0, 1, 4, 5, 2, 3]
    shuffled = GateSample(kl, None, [ids[i] for i in order], parent_side[order])
    assert score_gain(GateSample(kl, None, ids, scaled), shuffled) == pytest.approx(gain)
    unpaired = score_gain(
        GateSample(kl, None, None, scaled), GateSample(kl, None, None, parent_side)
    )
    assert unpaired == pytest.approx((0.3, 0.30355), abs=1e-5)
    assert score_gain(GateSample(kl, None, ids, None), GateSample(kl, None, ids, scaled)) is None
    broken = scaled.clone()
    broken[3] = float("nan")  # a score that is not a number: nothing to judge by
    assert score_gain(GateSample(kl, None, ids, broken), GateSample(kl, None, ids, scaled)) is None


@pytest.mark.parametrize("spread, published", [(0.0, "scaled"), (1.0, "parent side")])
def test_a_scaled_candidate_must_outscore_the_parents_side_by_more_than_its_noise(
    tiny_model, tiny_settings, tmp_path, monkeypatch, spread, published
):
    """The scaled candidate's 16 answers score 0.2 higher than the parent's side's on
    average. With no spread in the per-prompt gaps (all 0.2) that is clear and the scaled
    one is published; with the parent's side's scores 0.8 +- 1 (the gaps 1.2 on eight
    prompts, -0.8 on the other eight: mean 0.2, s = sqrt(16 / 15) = 1.03280, error
    1.03280 / 4 = 0.25820), it is within one standard error and the parent's side is
    published. Before, any higher mean published the scaled candidate: headline's v2 and
    v4 on 68e1d63 outscored the parent's side by 0.00 and 0.05 and lost 13 and 25 points
    of held-out 👍."""
    swing = torch.tensor([spread, spread, -spread, -spread] * 4)
    parent_side_scores = _around(0.8) + swing
    settings, result, left = _both_sides_scripted(
        tiny_model, tiny_settings, tmp_path, monkeypatch, parent_side_scores
    )
    metrics = result.metrics
    assert not left and metrics["gate/measurements"] == 4
    assert metrics["gate/scaled_score_gain"] == pytest.approx(0.2, abs=1e-6)
    assert metrics["gate/scaled_score_gain_se"] == pytest.approx(spread * 0.25820, abs=1e-5)
    if published == "parent side":
        assert metrics["gate/parent_side_chosen"] == 1.0
        assert metrics["gate/update_fraction"] == pytest.approx(0.51006, abs=1e-5)
        assert metrics["gate/base_scale"] == 1.0
    else:
        assert metrics["gate/parent_side_chosen"] == 0.0
        assert metrics["gate/update_fraction"] == 1.0
        assert metrics["gate/base_scale"] == pytest.approx(0.72310, abs=1e-5)
    assert saved_lora_b_norm(result.policy_dir) == pytest.approx(
        norms[2 if published == "parent side" else 1], rel=1e-4
    )


def test_a_parent_over_the_budget_on_this_rounds_prompts_is_scaled_toward_the_base(
    tiny_model, tiny_settings, tmp_path, monkeypatch
):
    """Question's round 4 on 60af9b6: the full step measured 32.8 nats (6.98 from its
    parent), and 0.23, 0.12 and 0.06 of it toward the parent 14.3, 9.4 and 10.4 [14.3]:
    on that round's prompts the parent itself was at the budget, no step from it could
    fit, and the round was refused. Now the smallest candidate is scaled toward the base
    once more, as a missed scale is rescaled: by hand its bound, 16 answers at 10.4 +-0.5
    (s.d. 0.51640), is 10.4 + 1.645 x 0.51640 / 4 = 10.61237, so ``s = sqrt(9 /
    10.61237) = 0.92091``; it fits, and is published after the usual fresh sample."""
    settings, result, left = _second_round_scripted(
        tiny_model,
        tiny_settings,
        tmp_path,
        monkeypatch,
        [(32.8, 7.0), (14.3, 1.0), (10.5, 0.2), (10.4, 0.07), (6.0, 0.5), (6.2, 0.5)],
    )
    metrics = result.metrics
    assert not left and metrics["gate/measurements"] == 6
    assert metrics["gate/parent_over_budget"] == 1.0
    fraction = metrics["gate/try3_fraction"]
    assert metrics["gate/try1_fraction"] == pytest.approx(4 * fraction)  # then two halvings
    assert metrics["gate/try4_fraction"] == fraction == metrics["gate/update_fraction"]
    assert metrics["gate/base_scale"] == pytest.approx(0.92091, abs=1e-5)
    assert within_kl_budget(metrics, settings)
    assert metrics["objective/kl_served"] == pytest.approx((6.0 + 6.2) / 2)


def test_a_candidate_over_the_total_budget_once_pooled_is_scaled_toward_the_base(
    tiny_model, tiny_settings, tmp_path, monkeypatch
):
    """Question's round 3 on a5af884: the full step read 30.0 nats, 0.038 of it toward
    the parent 7.58 [9.08], a fresh sample of that candidate 9.51, and pooled the bound
    passed the budget (10.1): the round was refused, with the parent itself at the
    budget. Now the candidate is scaled toward the base and measured once more on the
    confirmation prompts. By hand: pooled, 32 answers at 8.6 +-0.5 and 12.0 +-0.5, mean
    10.3, s.d. sqrt(8 x (2.2^2 + 1.2^2) x 2 / 31) = 1.80036 (larger than the prompts' error,
    0.51640 / 4), bound 10.3 + 1.645 x 1.80036 / sqrt(32) = 10.82354; the confirmation
    prompts alone read higher, 12.0 + 1.645 x 0.51640 / 4 = 12.21237, and they decide next,
    so ``s = sqrt(9 / 12.21237) = 0.85846`` (from the pooled bound it was 0.91188); its
    measurement (7.0) fits and decides."""
    settings, result, left = _second_round_scripted(
        tiny_model,
        tiny_settings,
        tmp_path,
        monkeypatch,
        [(32.8, 7.0), (8.6, 0.05), (12.0, 0.05), (7.0, 0.5)],
    )
    metrics = result.metrics
    assert not left and metrics["gate/measurements"] == 4
    assert metrics["gate/confirmed_over_budget"] == 1.0
    assert metrics["gate/fresh_kl_served"] == pytest.approx(12.0)
    fraction = metrics["gate/try1_fraction"]
    assert 0 < fraction < 1 and metrics["gate/try3_fraction"] == fraction
    assert metrics["gate/update_fraction"] == fraction
    assert metrics["gate/base_scale"] == pytest.approx(0.85846, abs=1e-5)
    assert metrics["objective/kl_served"] == pytest.approx(7.0)
    assert within_kl_budget(metrics, settings) and result.policy_dir is not None
    # The saved adapter is the scaled candidate: the last measurement's LoRA B norm.
    saved = saved_lora_b_norm(result.policy_dir)
    assert saved == pytest.approx(norms[-1], rel=1e-4)
    assert norms[-1] == pytest.approx(norms[-2] * 0.85846, rel=1e-4)


def test_a_candidate_over_the_budget_once_pooled_is_rescaled_for_the_prompts_that_decide(
    tiny_model, tiny_settings, tmp_path, monkeypatch
):
    """Upbeat's round 2 on 2f83edd: the full step read 11.37 nats (3.30 from v1), the whole
    adapter scaled by 0.807 read 7.69 [9.63] on the search's prompts and 11.36 [13.16] on
    the confirmation prompts, pooled over the budget; rescaled from the pooled bound to
    0.732 and measured on the confirmation prompts alone it read 9.62 [10.91], and the
    round was refused at 10.9 minutes. The rescale now aims from the reading of the
    prompts that decide next where it is the higher. By hand (16 answers +-0.5 each, s.d.
    0.51640, the bound 1.645 x 0.51640 / 4 = 0.21237 above the mean): the full step's bound
    11.58037, so the scaled guess is ``sqrt(9 / 11.58037) = 0.88158``; pooled, 32 answers at
    7.19, 8.19, 10.86 and 11.86, mean 9.525, s.d. sqrt(16 x (2.335^2 + 1.335^2) / 31) =
    1.93233, bound 9.525 + 1.645 x 1.93233 / sqrt(32) = 10.08692 (over); the confirmation
    prompts alone 11.57237, so the scale is multiplied by ``sqrt(9 / 11.57237) = 0.88188``
    (from the pooled bound, the rule before: 0.94458)."""
    settings, result, left = _second_round_scripted(
        tiny_model,
        tiny_settings,
        tmp_path,
        monkeypatch,
        [(11.368, 3.299), (7.69, 2.14), (11.36, 2.706), (8.2, 1.5)],
    )
    metrics = result.metrics
    assert not left and metrics["gate/measurements"] == 4
    assert metrics["gate/confirmed_over_budget"] == 1.0
    guess = metrics["gate/try1_scale"]
    assert guess == pytest.approx(0.88158, abs=1e-5)
    assert metrics["gate/try2_scale"] == guess  # the confirmation, same weights
    assert metrics["gate/base_scale"] == pytest.approx(guess * 0.88188, abs=1e-5)
    assert metrics["gate/try3_scale"] == metrics["gate/base_scale"]
    assert metrics["objective/kl_served"] == pytest.approx(8.2)
    assert within_kl_budget(metrics, settings) and result.policy_dir is not None


def test_a_first_version_over_the_round_budget_once_pooled_is_scaled_toward_the_base(
    tiny_model, tiny_settings, tmp_path, monkeypatch
):
    """Where the parent is the base, the round budget (8) bounds the same KL as the total
    one (10): a first version whose pooled bound lands between them is rescaled too, by
    the tighter one. By hand: 32 answers at 6.8 +-0.5 and 9.0 +-0.5, mean 7.9, s.d.
    sqrt(16 x (1.6^2 + 0.6^2) / 31) = 1.22764, bound 7.9 + 1.645 x 1.22764 / sqrt(32) =
    8.25700; the confirmation prompts, which decide next, read higher alone: 9.0 + 1.645 x
    0.51640 / 4 = 9.21237, so the scale is multiplied by sqrt(0.9 x 8 / 9.21237) = 0.88406
    (from the pooled bound it was 0.93380)."""
    settings = _scripted_gate_settings(tiny_settings)
    left = _scripted_gate(monkeypatch, [17.8, 6.8, 9.0, 6.0])
    result = run_training_round(
        tiny_model, settings, out_dir=tmp_path / "r", pointwise=[], pairs=_pairs(4),
        prompts=PROMPTS, policy_dir=None, reward_dir=None,
    )  # fmt: skip
    metrics = result.metrics
    assert not left and metrics["gate/measurements"] == 4
    assert metrics["gate/confirmed_over_budget"] == 1.0
    guess = metrics["gate/try1_scale"]
    assert metrics["gate/base_scale"] == pytest.approx(guess * 0.88406, abs=1e-5)
    assert metrics["objective/kl_served"] == pytest.approx(6.0)
    assert within_kl_budget(metrics, settings) and result.policy_dir is not None
