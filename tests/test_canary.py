"""The canary against a real Valkey: candidate state in the registry, live votes from
the feedback store, automatic and admin decisions, the queue of later versions."""

from __future__ import annotations

import json
import time

import pytest

from rlhf_core import canary
from rlhf_core.feedback import Event, FeedbackStore, Turn, new_id
from rlhf_core.registry import CHANNEL, CandidateError, Registry, UnknownVersionError
from tests.conftest import pubsub_messages
from tests.test_registry import adapters  # noqa: F401  (fixture)


def publish(registry: Registry, folder, share: float = 0.0) -> int:
    lock = registry.lock()
    token = lock.acquire()
    try:
        return registry.publish(folder, {"parent": registry.current()}, token, canary_share=share)
    finally:
        lock.release()


def answer(
    store: FeedbackStore,
    user: str,
    version: int,
    kind: str | None,
    created_at=None,
    may_train: bool = True,
) -> Turn:
    """One answer written by ``version`` for ``user``, with one reaction. ``may_train``
    as the UI writes it: False for a person whose feedback may not train (anonymous on a
    public Space); their reactions carry only the chat's own switch, so stay True."""
    turn = Turn(
        turn_id=new_id(), session_id=f"{user}-s", user_id=user,
        messages=[{"role": "user", "content": f"hi from {user}"}], answer="hello",
        policy_version=version, created_at=created_at or time.time(), may_train=may_train,
    )  # fmt: skip
    store.save_turn(turn)
    if kind is not None:
        store.record_event(Event.new(turn.turn_id, kind, turn.session_id, user))
    return turn


@pytest.fixture()
def settings(tiny_settings):
    return tiny_settings.model_copy(
        update={"canary_share": 0.5, "canary_burn_in": 5, "canary_min_votes": 30}
    )


def test_publish_with_a_share_makes_a_candidate_then_queues(redis_client, settings, adapters):  # noqa: F811
    registry = Registry(redis_client, settings)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL)
    v1 = publish(registry, adapters[1][0])  # no share: current at once, as before
    assert registry.current() == v1 and registry.candidate() is None
    v2 = publish(registry, adapters[2][0], share=0.2)
    assert registry.current() == v1  # the candidate is not current
    cand = registry.candidate()
    assert (cand["version"], cand["baseline"], cand["share"]) == (v2, v1, 0.2)
    assert registry.get(v2)["published_as"] == "candidate"
    # A round that passes its gate while the canary runs does not start a second one.
    v3 = publish(registry, adapters[1][0], share=0.2)
    v4 = publish(registry, adapters[2][0], share=0.2)
    assert registry.candidate()["version"] == v2 and registry.candidate_queue() == [v3, v4]
    assert registry.get(v3)["published_as"] == "queued"
    assert "candidate version 2 serving 20%" in registry.status_line()

    # Rolling back v2 keeps v1 and starts the newest queued version against it.
    nxt = registry.decide(v2, "rollback", {"reason": "test"})
    assert nxt == v4 and registry.current() == v1
    assert registry.candidate()["version"] == v4 and registry.candidate()["baseline"] == v1
    assert registry.candidate_queue() == []
    # A second decision on v2 (another worker) changes nothing.
    with pytest.raises(CandidateError, match="not the candidate"):
        registry.decide(v2, "promote", {})
    assert registry.decide(v4, "promote", {"reason": "good"}) is None
    assert registry.current() == v4 and registry.candidate() is None
    # v3, which waited behind v2 too, is dropped with an entry that says why (it vanished
    # from the queue without one before).
    assert [(d["version"], d["action"]) for d in registry.decisions()] == [
        (v4, "promote"),
        (v3, "dropped"),
        (v2, "rollback"),
    ]
    assert f"v{v4}" in registry.decisions()[1]["reason"]
    assert [m["reason"] for m in registry.pointer_log()] == ["promote", "publish"]

    messages = pubsub_messages(pubsub, 6)
    pubsub.close()
    assert [m["reason"] for m in messages] == [
        "publish", "candidate", "queued", "queued", "rollback", "promote",
    ]  # fmt: skip


def test_admin_starts_candidate_and_changes_share(redis_client, settings, adapters):  # noqa: F811
    registry = Registry(redis_client, settings)
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0])
    with pytest.raises(CandidateError, match="already current"):
        registry.start_candidate(v2, 0.1)
    with pytest.raises(UnknownVersionError, match="never published"):
        registry.start_candidate(9, 0.1)
    with pytest.raises(CandidateError, match="No candidate"):
        registry.set_candidate_share(0.3)
    registry.start_candidate(v1, 0.1, by="admin:alice")
    assert registry.candidate()["baseline"] == v2 and registry.candidate()["started_by"] == (
        "admin:alice"
    )
    with pytest.raises(CandidateError, match="already the candidate"):
        registry.start_candidate(v1, 0.1)
    registry.set_candidate_share(0.3)
    assert registry.candidate()["share"] == 0.3
    # A round that passes while this canary runs waits, even with no share set: the
    # baseline must not move under a running comparison.
    v3 = publish(registry, adapters[1][0], share=0.0)
    assert registry.get(v3)["published_as"] == "queued" and registry.current() == v2
    with pytest.raises(ValueError, match="share"):
        registry.set_candidate_share(1.5)


def test_counted_votes_count_final_state_rewrites_and_per_user_cap(redis_client, settings):
    store = FeedbackStore(redis_client)
    since = time.time() - 1
    old = answer(store, "old", 1, None, created_at=since - 3600)  # before the canary
    store.record_event(Event.new(old.turn_id, "like", "old-s", "old"))  # voted on later
    for user, version, kind in [
        ("a", 2, "like"), ("a", 2, "dislike"), ("b", 2, "like"), ("c", 1, "like"),
        ("c", 1, None), ("d", 1, "dislike"), ("e", 3, "like"),
    ]:  # fmt: skip
        answer(store, user, version, kind)
    rewritten = answer(store, "b", 2, "like")
    store.record_event(Event.new(rewritten.turn_id, "rewrite", "b-s", "b", "better text"))
    undone = answer(store, "d", 1, "dislike")
    store.record_event(Event.new(undone.turn_id, "undo", "d-s", "d"))

    counts = canary.counted_votes(store, settings, (2, 1), since, max_per_user=50)[0]
    # v2: a like, a dislike, b like, b like-then-rewrite (a 👎) -> 2 of 4.
    # v1: c like, d dislike; not the unvoted answer, the undone dislike, or the
    # answer written before the canary started (voted on since) -> 1 of 2. v3 is no arm.
    assert counts == {2: (2, 4), 1: (1, 2)}
    # One answer per person: a's first (like), b's first (like).
    assert canary.counted_votes(store, settings, (2, 1), since, max_per_user=1)[0][2] == (2, 2)
    assert canary.counted_votes(store, settings, (2, 1), time.time() + 60, 50)[0] == {
        2: (0, 0),
        1: (0, 0),
    }


def test_only_feedback_that_may_train_decides_the_canary(redis_client, settings, adapters):  # noqa: F811
    """Strangers' cookies on a public Space (feedback that may not train), a chat with
    "don't train" switched on afterwards and a person who deleted their data do not
    count; the same votes of people whose feedback trains do."""
    from rlhf_core.privacy import forget_user

    registry = Registry(redis_client, settings)
    store = FeedbackStore(redis_client)
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0], share=0.5)
    for k in range(40):  # enough to roll back (canary_min_votes=30), were they counted
        answer(store, f"anon:{k}", v2, "dislike", may_train=False)
        answer(store, f"anon:b{k}", v1, "like", may_train=False)
    switched = [answer(store, "hf:cy", v2, "dislike") for _ in range(3)]
    store.set_training([t.turn_id for t in switched], allowed=False)
    answer(store, "hf:gone", v2, "dislike")
    forget_user(redis_client, settings, "hf:gone")

    assert canary.check(redis_client, settings) is None and registry.candidate() is not None
    assert canary.counted_votes(store, settings, (v2, v1), time.time() - 60, 50)[0] == {
        v2: (0, 0),
        v1: (0, 0),
    }
    answer(store, "hf:ann", v2, "dislike")
    answer(store, "hf:bo", v1, "like")
    assert canary.counted_votes(store, settings, (v2, v1), time.time() - 60, 50)[0] == {
        v2: (0, 1),
        v1: (1, 1),
    }


def test_check_rolls_back_a_worse_candidate_and_records_numbers(redis_client, settings, adapters):  # noqa: F811
    registry = Registry(redis_client, settings)
    store = FeedbackStore(redis_client)
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0], share=0.5)
    assert canary.check(redis_client, settings) is None  # no votes yet
    for k in range(30):  # baseline liked 24/30, candidate 6/30
        answer(store, f"u{k}", v1, "like" if k % 5 else "dislike")
        answer(store, f"w{k}", v2, "dislike" if k % 5 else "like")
    decision = canary.check(redis_client, settings)
    assert decision["action"] == "rollback" and decision["version"] == v2
    numbers = decision["numbers"]
    assert (numbers["candidate_likes"], numbers["candidate_votes"]) == (6, 30)
    assert (numbers["baseline_likes"], numbers["baseline_votes"]) == (24, 30)
    assert numbers["interval"][1] < 0 and numbers["p_value"] < settings.canary_alpha
    assert registry.current() == v1 and registry.candidate() is None
    recorded = registry.decisions()[0]
    assert recorded["by"] == "automatic" and recorded["numbers"]["difference"] == pytest.approx(
        -0.6
    )
    assert canary.check(redis_client, settings) is None  # nothing left to decide


def test_check_promotes_after_min_votes_and_times_out(redis_client, settings, adapters):  # noqa: F811
    registry = Registry(redis_client, settings)
    store = FeedbackStore(redis_client)
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0], share=0.5)
    for k in range(29):
        answer(store, f"u{k}", v1, "like" if k % 2 else "dislike")
        answer(store, f"w{k}", v2, "like")
    assert canary.check(redis_client, settings) is None  # 29 < canary_min_votes
    answer(store, "w-last", v2, "like")
    decision = canary.check(redis_client, settings)
    assert decision["action"] == "promote" and registry.current() == v2

    # An undecided canary takes the timeout action, stated in the decision. (The
    # answers above, older than the clock slack, are not part of the new canary.)
    time.sleep(canary.CLOCK_SLACK_S + 0.1)
    registry.start_candidate(v1, 0.5)
    later = time.time() + settings.canary_timeout_s + 1
    decision = canary.check(redis_client, settings, now=later)
    assert decision["action"] == "rollback" and "timeout" in decision["reason"]
    assert registry.current() == v2


def test_admin_override_records_the_numbers(redis_client, settings, adapters):  # noqa: F811
    registry = Registry(redis_client, settings)
    with pytest.raises(CandidateError, match="No candidate"):
        canary.override(redis_client, settings, "promote")
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0], share=0.5)
    answer(FeedbackStore(redis_client), "x", v2, "like")
    record = canary.override(redis_client, settings, "promote", by="admin:root")
    assert record["numbers"]["candidate_votes"] == 1 and registry.current() == v2
    assert registry.decisions()[0]["by"] == "admin:root"
    status = canary.status(redis_client, settings)
    assert status["candidate"] is None and status["current"] == v2 and v1 == 1


def test_version_for_is_sticky_per_user():
    candidate = {"version": 4, "share": 0.5}
    picks = {u: canary.version_for(u, candidate) for u in (f"user{k}" for k in range(400))}
    assert set(picks.values()) == {4, None}
    assert 150 < sum(v == 4 for v in picks.values()) < 250
    assert all(canary.version_for(u, candidate) == v for u, v in picks.items())
    assert canary.version_for("anyone", None) is None


def test_cli_ab_and_leaderboard(redis_client, settings, adapters):  # noqa: F811
    import subprocess
    import sys

    from rlhf_core.feedback import Battle
    from tests.conftest import tiny_env

    registry = Registry(redis_client, settings)
    store = FeedbackStore(redis_client)
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0])

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "chat_ui", *args], env=tiny_env(settings),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert "No candidate out" in cli("ab", "status").stdout
    started = cli("ab", "start", str(v1), "--share", "0.25")
    assert started.returncode == 0, started.stderr
    assert registry.candidate()["version"] == v1 and registry.candidate()["share"] == 0.25
    refused = cli("ab", "start", str(v1))
    assert refused.returncode == 2 and "already the candidate" in refused.stderr
    answer(store, "x", v1, "like")
    answer(store, "y", v2, "dislike")
    shown = cli("ab", "status").stdout
    assert "Candidate v1 serves 25% of users" in shown and "| v1 | candidate | 1 | 1 |" in shown
    assert json.loads(cli("ab", "status", "--json").stdout)["look"]["candidate_votes"] == 1
    assert cli("ab", "share", "--share", "0.5").returncode == 0
    assert registry.candidate()["share"] == 0.5
    # The share as the README writes it, `ab share S` (it was read as a version: "0.4"
    # refused as "invalid int value", "1" accepted and the share set to 0.2 unsaid).
    assert cli("ab", "share", "1").returncode == 0
    assert registry.candidate()["share"] == 1.0
    assert cli("ab", "share", "0.5").returncode == 0
    assert registry.candidate()["share"] == 0.5
    for unclear in [
        ("ab", "share"),
        ("ab", "share", "half"),
        ("ab", "share", "0.4", "--share", "0.3"),
    ]:
        refused = cli(*unclear)
        assert refused.returncode == 2 and "rlhf-chat ab share 0.5" in refused.stderr, unclear
    assert registry.candidate()["share"] == 0.5
    assert "no decision yet" in cli("ab", "check").stdout
    done = cli("ab", "promote")
    assert done.returncode == 0 and registry.current() == v1
    shown = cli("ab", "status").stdout
    assert "v1 vs v2: promote by admin (cli)" in shown
    assert cli("ab", "rollback").returncode == 2  # nothing out any more

    # Two arena battles: v2 beats v1 twice.
    for k in range(2):
        a, b = answer(store, "z", v2, None), answer(store, "z", v1, None)
        store.record_battle(Battle(f"b{k}", "z-s", "z", a.turn_id, b.turn_id, v2, v1, "a"))
    rows = json.loads(cli("leaderboard", "--json", "--rounds", "50").stdout)
    assert [r["version"] for r in rows] == [v2, v1] and rows[0]["wins"] == 2
    assert "rank" in cli("leaderboard").stdout


def test_a_round_during_a_canary_trains_on_both_arms_and_queues(
    redis_client,
    settings,
    tiny_model,
    adapters,  # noqa: F811
):
    from rlhf_core.rounds import run_round

    settings = settings.model_copy(update={"reward_epochs": 1})
    registry = Registry(redis_client, settings)
    store = FeedbackStore(redis_client)
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0], share=0.5)
    events = []
    for k in range(3):
        for version, kind in ((v1, "like"), (v2, "dislike")):
            turn = answer(store, f"user{k}-{version}", version, kind)
            events += [e.event_id for e in store.events_for_turns([turn.turn_id])]
    outcome = run_round(settings, redis_client, tiny_model, consumer_name="w1")
    assert outcome.status == "published", outcome.reason
    assert outcome.role == "queued" and outcome.parent == v1  # trained from the current
    meta = registry.get(outcome.version)
    assert sorted(meta["event_ids"]) == sorted(events)  # feedback on both versions' answers
    assert registry.candidate()["version"] == v2 and registry.current() == v1
    assert registry.candidate_queue() == [outcome.version]
    assert f"published version {outcome.version} as queued" in registry.status_line()


def test_share_change_racing_a_decision_leaves_no_half_candidate(
    valkey,
    redis_client,
    settings,
    adapters,  # noqa: F811
):
    """An admin's `ab share` while a worker decides the canary: the decision lands right
    after the share change's first command. The change must not then create a candidate
    hash with only a share (no version): every reader of the candidate failed (KeyError),
    and every later version was queued behind it for good."""
    import redis

    registry = Registry(redis_client, settings)
    publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0], share=0.5)
    admin_client = redis.Redis.from_url(valkey.url, socket_timeout=5)
    admin = Registry(admin_client, settings)
    send = admin_client.execute_command

    def then_the_worker_decides(*args, **kwargs):
        out = send(*args, **kwargs)
        admin_client.execute_command = send  # once
        registry.decide(v2, "rollback", {"reason": "test", "by": "automatic"})
        return out

    admin_client.execute_command = then_the_worker_decides
    try:
        admin.set_candidate_share(0.3)
    except CandidateError:
        pass  # told there is no candidate any more: as good
    finally:
        admin_client.execute_command = send
    assert registry.candidate() is None
    v3 = publish(registry, adapters[1][0], share=0.5)  # the next canary starts as usual
    assert registry.candidate()["version"] == v3


def test_an_admin_rollback_during_a_canary_is_not_undone_by_its_promotion(
    redis_client,
    settings,
    adapters,  # noqa: F811
):
    """`rlhf-chat rollback 1` while v3 is measured against v2: the worker's next check
    promoted v3 on votes compared with v2, which no longer served anyone, and so undid the
    admin's rollback (v3 trained from v2, the version rolled away from)."""
    registry = Registry(redis_client, settings)
    store = FeedbackStore(redis_client)
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0])
    v3 = publish(registry, adapters[1][0], share=0.5)
    v4 = publish(registry, adapters[2][0], share=0.5)  # waits behind v3, trained from v2
    assert registry.candidate()["version"] == v3 and registry.candidate_queue() == [v4]
    for k in range(40):
        answer(store, f"c{k}", v3, "like")
        answer(store, f"b{k}", v2, "like" if k % 2 else "dislike")
    assert canary.evaluate(redis_client, settings)[1].action == "promote"
    registry.rollback(v1)
    assert canary.check(redis_client, settings) is None
    assert registry.current() == v1
    assert registry.candidate() is None and registry.candidate_queue() == []
    dropped, last = registry.decisions()[:2]
    assert (last["version"], last["action"], last["baseline"]) == (v3, "rollback", v2)
    assert "rollback" in last["by"]
    # v4 left the queue with an entry of its own (it vanished without one before).
    assert (dropped["version"], dropped["action"], dropped["baseline"]) == (v4, "dropped", v2)
    assert f"rolled back to v{v1}" in dropped["reason"]


def test_a_decision_on_an_earlier_canary_of_the_same_version_is_refused(
    redis_client,
    settings,
    adapters,  # noqa: F811
    monkeypatch,
):
    """A worker looks at the canary of v2 (slow: it reads every vote since the start); an
    admin meanwhile ends it and puts v2 out again (`ab rollback`, `ab start 2`). The
    worker's decision, on the earlier canary's votes, must not decide the new one: the
    compare-and-set was on the version alone."""
    registry = Registry(redis_client, settings)
    store = FeedbackStore(redis_client)
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0], share=0.5)
    for k in range(40):
        answer(store, f"c{k}", v2, "like")
        answer(store, f"b{k}", v1, "like" if k % 2 else "dislike")
    looked = canary.decide

    def meanwhile_the_admin_restarts_it(*args, **kwargs):
        result = looked(*args, **kwargs)
        monkeypatch.setattr(canary, "decide", looked)  # once
        canary.override(redis_client, settings, "rollback", by="admin (cli)")
        time.sleep(0.01)
        registry.start_candidate(v2, 0.5, by="admin (cli)")
        return result

    monkeypatch.setattr(canary, "decide", meanwhile_the_admin_restarts_it)
    assert canary.check(redis_client, settings) is None
    assert registry.current() == v1
    restarted = registry.candidate()
    assert restarted["version"] == v2 and restarted["started_by"] == "admin (cli)"


def test_arena_picks_are_not_counted_as_independent_votes(redis_client, settings, adapters):  # noqa: F811
    """An arena pick is the winner's 👍 and the loser's 👎: two votes, one per version, that
    always go opposite ways. Counted as independent votes, their difference looked twice
    as certain as it is: 200 picks between equal versions where the candidate happens to
    win 80 (the difference of 200 +-1 picks: mean -0.2, variance 0.96/200) were a
    rollback; with the true variance the always-valid interval still holds 0. Simulated,
    equal versions in the arena alone were rolled back in 8-15% of canaries at alpha 5%."""
    from rlhf_core.feedback import Battle

    registry = Registry(redis_client, settings)
    store = FeedbackStore(redis_client)
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0], share=0.5)
    for k in range(200):
        user = f"p{k}"
        c, b = answer(store, user, v2, None), answer(store, user, v1, None)
        outcome = "a" if k < 80 else "b"  # side a is the candidate's answer
        assert store.record_battle(
            Battle(f"battle{k}", f"{user}-s", user, c.turn_id, b.turn_id, v2, v1, outcome)
        )
    look = canary.evaluate(redis_client, settings)[1]
    assert (look.candidate_likes, look.candidate_votes) == (80, 200)
    assert (look.baseline_likes, look.baseline_votes) == (120, 200)
    assert look.difference == pytest.approx(-0.2)
    assert look.action == "continue", look
    low, high = look.interval
    assert low < 0 < high
    assert canary.check(redis_client, settings) is None and registry.candidate() is not None
