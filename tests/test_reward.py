"""Reward model on the tiny model: it learns a synthetic preference, saves and reloads.

Every test wraps the shared session model in fresh adapters and unloads them at the
end, so the base weights other tests see are never changed.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlhf_core.reward import REWARD_ADAPTER, RewardConfig, RewardModel

WORDS = ["river", "stone", "cloud", "paper", "green", "table", "light", "sound", "quick", "music"]
GOOD = "banana"


def _answer(rng: random.Random, good: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
    if good:
        words.insert(rng.randint(0, len(words)), GOOD)
    return " ".join(words)


def _pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))}]
        out.append(
            {"messages": messages, "chosen": _answer(rng, True), "rejected": _answer(rng, False)}
        )
    return out


def _pointwise(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        good = i % 2 == 0
        messages = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))}]
        out.append({"messages": messages, "answer": _answer(rng, good), "label": float(good)})
    return out


@pytest.fixture()
def fresh_reward(tiny_model, tiny_settings):
    torch.manual_seed(0)
    config = RewardConfig.from_settings(tiny_settings, learning_rate=3e-3, epochs=3, batch_size=8)
    rm = RewardModel.attach(tiny_model.model, tiny_model.tokenizer, tiny_settings, config=config)
    yield rm
    rm.model.unload()  # take the LoRA layers out of the shared base model again


def test_reward_model_learns_a_synthetic_preference(fresh_reward):
    heldout = _pairs(40, seed=99)
    before = fresh_reward.evaluate(heldout)
    metrics = fresh_reward.train(_pointwise(32, seed=1), _pairs(48, seed=2))
    after = fresh_reward.evaluate(heldout)
    assert metrics["reward/steps"] > 0 and metrics["reward/skipped"] == 0
    assert after["reward/accuracy"] >= 0.9, (before, after)
    assert after["reward/margin"] > before["reward/margin"] + 0.5
    # Pointwise labels were learned too: liked answers score above disliked ones.
    point = _pointwise(20, seed=7)
    scores = fresh_reward.score([e["messages"] for e in point], [e["answer"] for e in point])
    good = scores[[i for i, e in enumerate(point) if e["label"] == 1]].mean()
    bad = scores[[i for i, e in enumerate(point) if e["label"] == 0]].mean()
    assert good > bad


def test_saved_reward_model_reloads_identically_and_counts_versions(
    fresh_reward, tiny_model, tiny_settings, tmp_path
):
    fresh_reward.train(pairs=_pairs(16, seed=3), epochs=1)
    pairs = _pairs(6, seed=5)
    contexts = [p["messages"] for p in pairs]
    answers = [p["chosen"] for p in pairs]
    expected = fresh_reward.score(contexts, answers)
    out = fresh_reward.save(tmp_path / "rm", metadata={"metrics": {"reward/accuracy": 1.0}})
    meta = json.loads((out / "reward_meta.json").read_text())
    assert meta["version"] == 1 and meta["format_version"] == 1
    assert (out / "adapter_model.safetensors").exists() and (
        out / "reward_head.safetensors"
    ).exists()
    fresh_reward.model.unload()

    reloaded = RewardModel.load(tiny_model.model, tiny_model.tokenizer, tiny_settings, out)
    try:
        assert torch.allclose(reloaded.score(contexts, answers), expected, atol=1e-5)
        # Incremental: the next round starts from it, replays older feedback, and
        # its save is the next version.
        metrics = reloaded.train(pairs=_pairs(8, seed=4), replay_pairs=_pairs(8, seed=3), epochs=1)
        assert metrics["reward/train_examples"] == 16
        meta2 = json.loads((reloaded.save(tmp_path / "rm2") / "reward_meta.json").read_text())
        assert meta2["version"] == 2 and meta2["parent_version"] == 1
    finally:
        reloaded.model.unload()


def test_unload_leaves_the_shared_base_untouched(tiny_model, tiny_settings):
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    rm = RewardModel.attach(tiny_model.model, tiny_model.tokenizer, tiny_settings)
    assert REWARD_ADAPTER in rm.model.peft_config
    rm.train(pairs=_pairs(4, seed=0), epochs=1)
    rm.model.unload()
    after = tiny_model.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in name for name, _ in tiny_model.model.named_modules())


def test_a_folder_that_is_not_a_reward_model_is_refused(tiny_model, tiny_settings, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved reward model"):
        RewardModel.load(tiny_model.model, tiny_model.tokenizer, tiny_settings, tmp_path)


def test_reward_adapter_on_the_top_layers_only_leaves_the_policy_on_every_layer(
    tiny_model, tiny_settings
):
    """reward_lora_layers=1 on the 2-layer tiny model: the reward adapter sits in layer 1
    only (so its backward pass stops there) and trains; the policy adapter attached
    beside it keeps both layers."""
    from rlhf_core.reward import attach_adapter

    settings = tiny_settings.model_copy(update={"reward_lora_layers": 1})
    peft_model = attach_adapter(tiny_model.model, "policy", settings)
    rm = RewardModel.attach(peft_model, tiny_model.tokenizer, settings)
    try:

        def layers_of(adapter: str) -> set[int]:
            return {
                int(name.split(".layers.")[1].split(".")[0])
                for name, _ in rm.model.named_parameters()
                if f".{adapter}." in name and "lora_A" in name
            }

        assert layers_of(REWARD_ADAPTER) == {1}
        assert layers_of("policy") == {0, 1}
        metrics = rm.train(pairs=_pairs(4, seed=0), epochs=1)
        assert metrics["reward/steps"] == 1.0 and metrics["reward/skipped"] == 0.0
    finally:
        rm.model.unload()


def test_replayed_feedback_is_seen_once_per_round_new_feedback_every_epoch(fresh_reward):
    # batch 8: epoch 1 = 8 new + 8 replayed pairs (2 steps), epoch 2 = the 8 new (1 step)
    metrics = fresh_reward.train(pairs=_pairs(8, seed=5), replay_pairs=_pairs(8, seed=6), epochs=2)
    assert metrics["reward/steps"] == 3.0
    assert metrics["reward/train_examples"] == 16.0


def test_a_cut_answer_is_encoded_as_cut(fresh_reward):
    """Issue 9, defect 3: a served answer that was cut (Turn.finished False) gets no EOS,
    so it is scored at its last token, as a PPO rollout that hit its limit is; an answer
    longer than the reward model's limit is cut too."""
    tok = fresh_reward.tokenizer
    eos = tok.eos_token_id
    messages = [{"role": "user", "content": "Hi"}]
    ids, mask = fresh_reward.encode(
        [messages, messages], ["All done.", "And then the"], [True, False]
    )
    prompt = fresh_reward.prompt_ids(messages)
    done = ids[0][mask[0].bool()].tolist()
    cut = ids[1][mask[1].bool()].tolist()
    assert done == prompt + tok.encode("All done.", add_special_tokens=False) + [eos]
    assert cut == prompt + tok.encode("And then the", add_special_tokens=False)
    fresh_reward.config.max_answer_tokens = 3
    ids, mask = fresh_reward.encode([messages], ["one two three four five six"])
    assert (
        ids[0][mask[0].bool()].tolist()[len(prompt) :]
        == tok.encode("one two three four five six", add_special_tokens=False)[:3]
    )
    # The losses and evaluation read the flags from the examples.
    point = {"messages": messages, "answer": "And then the", "label": 0.0, "finished": False}
    pair = {"messages": messages, "chosen": "All done.", "rejected": "And then the",
            "chosen_finished": True, "rejected_finished": False}  # fmt: skip
    rewards = fresh_reward.score([messages], ["And then the"], finished=[False])
    with torch.no_grad():
        loss, _ = fresh_reward.loss([point], [])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(rewards, torch.zeros(1))
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)
    diff = fresh_reward.score([messages], ["All done."]) - rewards
    assert fresh_reward.evaluate([pair])["reward/margin"] == pytest.approx(float(diff), abs=1e-5)
