"""Training rounds end to end in-process: real Valkey, real tiny model, real trainer."""

from __future__ import annotations

import copy
import math

import pytest

from rlhf_core.feedback import Event, FeedbackStore, Turn, new_id
from rlhf_core.registry import Registry
from rlhf_core.rounds import events_consumed, gate, round_is_due, run_round


def post_feedback(store: FeedbackStore, n: int, user: str = "alice", kinds=("like", "dislike")):
    """``n`` answered turns of one user, each with one vote; returns the events."""
    events = []
    for i in range(n):
        session = f"{user}-s"
        turn = Turn(
            turn_id=new_id(),
            session_id=session,
            user_id=user,
            messages=[{"role": "user", "content": f"Question {i} from {user}?"}],
            answer=f"Answer {i}" + " very long" * (i % 3),
        )
        store.save_turn(turn)
        event = Event.new(turn.turn_id, kinds[i % len(kinds)], session, user)
        assert store.record_event(event)
        events.append(event)
    return events


@pytest.fixture()
def tiny_settings(tiny_settings):
    # One pass over the reward data keeps each real round to seconds.
    return tiny_settings.model_copy(update={"reward_epochs": 1})


def test_gate_rules(tiny_settings):
    assert gate({"objective/kl": 0.5, "reward/accuracy": 0.8}, tiny_settings) is None
    assert "non-finite" in gate({"loss/policy": math.nan}, tiny_settings)
    assert gate({"objective/kl": 12.3}, tiny_settings) == "KL 12.3 > budget 10"
    # The KL of answers served after the round wins over the lagging per-step KL.
    served = {"objective/kl": 0.9, "objective/kl_served": 10.9}
    assert gate(served, tiny_settings) == "KL 10.9 > budget 10"
    zero = tiny_settings.model_copy(update={"kl_budget": 0.0})
    assert "budget of 0" in gate({"objective/kl": 0.0}, zero)
    worse = {"reward/accuracy": 0.5, "reward/accuracy_before": 0.75}
    assert "0.50 < 0.75" in gate(worse, tiny_settings)


def test_busy_when_another_round_holds_the_lock(redis_client, tiny_settings, tiny_model):
    store = FeedbackStore(redis_client)
    post_feedback(store, 4)
    lock = Registry(redis_client, tiny_settings).lock()
    assert lock.acquire() is not None
    outcome = run_round(tiny_settings, redis_client, tiny_model, consumer_name="w2")
    lock.release()
    assert outcome.status == "busy"
    assert store.counts()["unconsumed"] == 4  # nothing was read


def test_round_publishes_then_acks_with_per_user_cap(redis_client, tiny_settings, tiny_model):
    settings = tiny_settings.model_copy(update={"max_events_per_user": 3})
    store = FeedbackStore(redis_client)
    registry = Registry(redis_client, settings)
    alice = post_feedback(store, 5, "alice")
    bob = post_feedback(store, 2, "bob")
    assert round_is_due(settings, redis_client)
    stages = []
    outcome = run_round(
        settings, redis_client, tiny_model, consumer_name="w1",
        progress=lambda stage, fraction: stages.append((stage, fraction)),
    )  # fmt: skip
    assert outcome.status == "published", outcome.reason
    assert outcome.version == 1 and registry.current() == 1 and outcome.events == 5
    meta = registry.get(1)
    used = set(meta["event_ids"])
    assert {e.event_id for e in bob} <= used  # bob's 2 and 3 of alice's 5
    assert len(used & {e.event_id for e in alice}) == 3
    assert meta["parent"] == 0 and "reward" in meta["kinds"]
    assert stages[-1] == ("published", 1.0) and any(s == "gate" for s, _ in stages)
    # Alice's two capped events wait for the next round, which takes them.
    assert store.counts()["unconsumed"] == 2
    second = run_round(settings, redis_client, tiny_model, consumer_name="w1")
    assert second.status == "published" and second.version == 2
    assert registry.get(2)["parent"] == 1 and registry.get(2)["reward_parent"] == 1
    assert store.counts()["unconsumed"] == 0 and store.pending()["pending"] == 0
    consumed = events_consumed(registry)
    assert sorted(consumed) == sorted(e.event_id for e in alice + bob)
    assert all(len(v) == 1 for v in consumed.values())
    assert run_round(settings, redis_client, tiny_model, consumer_name="w1").status == "skipped"
    assert registry.last_round()["status"] == "skipped"


def test_gate_failure_keeps_version_and_events(redis_client, tiny_settings, tiny_model):
    settings = tiny_settings.model_copy(update={"kl_budget": 0.0})
    store = FeedbackStore(redis_client)
    registry = Registry(redis_client, settings)
    post_feedback(store, 4)
    outcome = run_round(settings, redis_client, tiny_model, consumer_name="w1")
    assert outcome.status == "failed" and "KL" in outcome.reason
    assert registry.current() == 0 and registry.versions() == []
    assert registry.last_round()["status"] == "failed"
    assert "last round failed: KL" in registry.status_line()
    assert store.counts()["unconsumed"] == 4  # left for the next round
    # The same events do not trigger another automatic round; new feedback does.
    assert not round_is_due(settings, redis_client)
    post_feedback(store, 4, "bob")
    assert round_is_due(settings, redis_client)
    # With a sane budget the next round uses all eight, each exactly once.
    ok = run_round(tiny_settings, redis_client, tiny_model, consumer_name="w2")
    assert ok.status == "published" and ok.events == 8
    assert store.counts()["unconsumed"] == 0


def test_crash_between_publish_and_ack_counts_events_once(
    redis_client, tiny_settings, tiny_model, tmp_path
):
    """A worker that published and died before XACK: the next round must not
    train on those events again (the registry recorded them with the version)."""
    from peft import get_peft_model

    from rlhf_core.modeling import lora_config

    store = FeedbackStore(redis_client)
    registry = Registry(redis_client, tiny_settings)
    post_feedback(store, 4)
    entries = store.read_unconsumed("dead-worker", 10)

    adapter = tmp_path / "adapter"
    get_peft_model(copy.deepcopy(tiny_model.model), lora_config(tiny_settings)).save_pretrained(
        adapter
    )
    lock = registry.lock()
    token = lock.acquire()
    registry.publish(adapter, {"event_ids": [e.event_id for _, e in entries]}, token,
                     stream_ids=[sid for sid, _ in entries])  # fmt: skip
    lock.release()  # ... and the worker dies here, before ack
    assert store.pending()["pending"] == 4
    outcome = run_round(tiny_settings, redis_client, tiny_model, consumer_name="w2")
    assert outcome.status == "skipped"
    assert store.pending()["pending"] == 0 and store.counts()["unconsumed"] == 0
    assert registry.versions() == [1]
    assert all(len(v) == 1 for v in events_consumed(registry).values())


def test_nothing_to_do_is_skipped(redis_client, tiny_settings, tiny_model):
    outcome = run_round(tiny_settings, redis_client, tiny_model, consumer_name="w1")
    assert outcome.status == "skipped" and Registry(redis_client, tiny_settings).current() == 0
