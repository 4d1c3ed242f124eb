"""Turn/event records and the Redis-streams store, against a real Valkey server."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from rlhf_core import feedback as fb
from rlhf_core.feedback import (
    EVENT_KINDS,
    EVENTS_STREAM,
    Event,
    FeedbackError,
    FeedbackStore,
    FeedbackUnavailable,
    Turn,
    UnknownTurnError,
)
from rlhf_core.redis_server import RedisUnavailableError

ODD = (
    "emoji 👍🏽 👨‍👩‍👧 flags 🇫🇷 | RTL שלום عليكم \u202eevil\u202c | combining é | "
    "NUL \x00 bell \x07 esc \x1b DEL \x7f NEL \x85 LS \u2028 PS \u2029 BOM \ufeff | "
    "quotes \" \\ ' | CJK 漢字 | astral 𝔘𝔫𝔦 | private \ue000 | max \U0010ffff"
)


def make_turn(turn_id: str = "t1", session_id: str = "s1", user_id: str = "u1", **kw) -> Turn:
    base = dict(
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hi"},
        ],
        answer="Hello!",
        policy_version=3,
        sampling={"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64},
        model="tiny-random",
    )
    base.update(kw)
    return Turn(turn_id=turn_id, session_id=session_id, user_id=user_id, **base)


def make_event(turn: Turn, kind: str, event_id: str | None = None, text: str | None = None):
    return Event(
        event_id=event_id or fb.new_id(),
        turn_id=turn.turn_id,
        kind=kind,
        session_id=turn.session_id,
        user_id=turn.user_id,
        text=text,
    )


@pytest.fixture()
def store(redis_client) -> FeedbackStore:
    return FeedbackStore(redis_client)


# ---------------------------------------------------------------- records


def test_turn_and_event_round_trip_odd_unicode_through_redis(store, redis_client):
    turn = make_turn(
        messages=[{"role": "system", "content": ODD}, {"role": "user", "content": ODD[::-1]}],
        answer=ODD,
        sampling={"temperature": 0.25, "note": ODD},
        parent_turn_id="t0",
    )
    assert store.save_turn(turn) is True
    loaded = store.get_turn("t1")
    assert loaded == turn
    assert loaded.messages[1]["content"] == ODD[::-1]
    # Stored as UTF-8 JSON, readable by any other client.
    raw = redis_client.get("rlhf:turn:t1")
    assert json.loads(raw.decode("utf-8"))["answer"] == ODD

    event = make_event(turn, "rewrite", text=ODD)
    assert store.record_event(event) is not None
    assert list(store.events()) == [event]
    assert Event.from_json(event.to_json()) == event
    assert Turn.from_dict(turn.to_dict()) == turn


def test_lone_surrogates_are_replaced_not_fatal(store):
    # A lone surrogate cannot be encoded as UTF-8 (nor read by strict JSON parsers):
    # it becomes U+FFFD; the rest of the text is kept exactly.
    turn = make_turn(answer="a\ud800b", messages=[{"role": "user", "content": "x\udfffy 👍"}])
    assert turn.answer == "a\ufffdb"
    store.save_turn(turn)
    loaded = store.get_turn(turn.turn_id)
    assert loaded.answer == "a\ufffdb"
    assert loaded.messages[0]["content"] == "x\ufffdy 👍"
    # A valid surrogate pair arriving as JSON escapes is a real character and survives.
    assert Turn.from_json(turn.to_json().replace("a\ufffdb", "\\ud83d\\udc4d")).answer == "👍"


def test_event_validation_messages():
    turn = make_turn()
    with pytest.raises(ValueError, match="allowed kinds are like, dislike, unvote"):
        make_event(turn, "love")
    with pytest.raises(FeedbackError, match="rewrite event needs the rewritten answer"):
        make_event(turn, "rewrite", text="   ")
    with pytest.raises(FeedbackError, match="rewrite event needs"):
        make_event(turn, "rewrite")
    with pytest.raises(FeedbackError, match="turn_id must be a non-empty string"):
        Event("e", "", "like", "s", "u")
    with pytest.raises(FeedbackError, match="messages must be a list"):
        make_turn(messages=[{"content": "no role"}])
    with pytest.raises(FeedbackError, match="cannot be stored as JSON"):
        make_turn(sampling={"temperature": float("nan")}).to_json()
    assert set(EVENT_KINDS) == {"like", "dislike", "unvote", "rewrite", "regenerate", "undo"}


def test_from_dict_ignores_unknown_keys():
    turn = make_turn()
    data = turn.to_dict() | {"added_by_a_newer_version": 1}
    assert Turn.from_dict(data) == turn


# ---------------------------------------------------------------- idempotency


def test_save_turn_is_idempotent(store, redis_client):
    turn = make_turn()
    assert store.save_turn(turn) is True
    # A retried write (even with different content) keeps the first record.
    assert store.save_turn(make_turn(answer="changed")) is False
    assert store.get_turn("t1").answer == "Hello!"
    assert store.counts()["turns"] == 1
    assert [t.turn_id for t in store.turns()] == ["t1"]
    assert [t.turn_id for t in store.turns_for_session("s1")] == ["t1"]


def test_record_event_is_idempotent_by_event_id(store):
    turn = make_turn()
    store.save_turn(turn)
    event = make_event(turn, "like", event_id="click-1")
    first = store.record_event(event)
    assert first is not None and "-" in first
    assert store.record_event(event) is None
    assert store.record_event(make_event(turn, "dislike", event_id="click-1")) is None
    assert store.counts()["events"] == 1
    assert [e.kind for e in store.events()] == ["like"]


def test_record_events_in_bulk_matches_one_by_one(store):
    turns = [make_turn(f"t{i}", session_id=f"s{i % 2}") for i in range(3)]
    for turn in turns:
        store.save_turn(turn)
    batch = [make_event(t, "like", event_id=f"bulk-{t.turn_id}") for t in turns]
    batch.append(make_event(turns[0], "dislike", event_id="bulk-t0"))  # a retried click
    ids = store.record_events(batch)
    assert [i is not None for i in ids] == [True, True, True, False]
    assert store.record_events(batch[:1]) == [None]  # idempotent across calls too
    assert [(e.turn_id, e.kind) for e in store.events()] == [(t.turn_id, "like") for t in turns]
    # One refused event refuses the batch: nothing of it is written.
    stranger = make_event(turns[1], "like", event_id="bulk-x")
    stranger.session_id = "someone-else"
    with pytest.raises(fb.FeedbackError, match="Nothing of this batch"):
        store.record_events([make_event(turns[2], "dislike", event_id="bulk-y"), stranger])
    assert store.counts()["events"] == 3


def test_a_bulk_import_larger_than_one_script_keeps_order_and_idempotency(store):
    turn = make_turn("t-bulk")
    store.save_turn(turn)
    n = 2 * fb.SCRIPT_BATCH + 1
    batch = [make_event(turn, "like", event_id=f"imp-{i}") for i in range(n)]
    batch[-1] = make_event(turn, "like", event_id="imp-0")  # a repeat from the first slice
    ids = store.record_events(batch)
    assert len(ids) == n and ids[-1] is None and None not in ids[:-1]
    assert len(set(ids[:-1])) == n - 1
    assert [e.event_id for e in store.events()] == [f"imp-{i}" for i in range(n - 1)]
    assert store.counts()["events"] == n - 1


def test_event_for_unknown_turn_or_foreign_session_is_refused(store):
    ghost = make_turn("never-saved")
    with pytest.raises(UnknownTurnError, match="A turn is written before the user can react"):
        store.record_event(make_event(ghost, "like"))
    turn = make_turn()
    store.save_turn(turn)
    intruder = Event(fb.new_id(), "t1", "like", session_id="other-session", user_id="u2")
    with pytest.raises(FeedbackError, match="can only react to its own answers"):
        store.record_event(intruder)
    assert store.counts()["events"] == 0


def test_iterators_in_order_and_sessions_separate(store):
    for i in range(7):
        store.save_turn(make_turn(f"t{i}", session_id=f"s{i % 2}"))
    assert [t.turn_id for t in store.turns(batch=3)] == [f"t{i}" for i in range(7)]
    assert [t.turn_id for t in store.turns_for_session("s1")] == ["t1", "t3", "t5"]
    assert store.turns_for_session("nobody") == []
    kinds = ["like", "dislike", "unvote", "like", "undo"]
    for i, kind in enumerate(kinds):
        store.record_event(make_event(store.get_turn(f"t{i % 2}"), kind))
    assert [e.kind for e in store.events(batch=2)] == kinds
    ids = [sid for sid, _ in store.event_entries()]
    assert ids == sorted(ids, key=fb._stream_id_key)
    assert [e.kind for e in store.events_for_turns(["t1"])] == ["dislike", "like"]
    assert store.get_turns(["t0", "missing", "t0"]).keys() == {"t0"}


# ---------------------------------------------------------------- consumer group


def _seed(store: FeedbackStore, n: int) -> list[Event]:
    turn = make_turn()
    store.save_turn(turn)
    events = [make_event(turn, "like" if i % 2 else "dislike") for i in range(n)]
    for e in events:
        assert store.record_event(e)
    return events


def test_read_ack_and_unconsumed_counts(store):
    # Events written before any worker existed are still delivered (group from id 0).
    events = _seed(store, 5)
    assert store.counts() == {"turns": 1, "events": 5, "unconsumed": 5, "held": 0}
    got = store.read_unconsumed("w1", count=3)
    assert [e for _, e in got] == events[:3]
    # Delivered but not acked: still unconsumed.
    assert store.counts()["unconsumed"] == 5
    assert store.pending()["consumers"] == {"w1": 3}
    assert store.ack([sid for sid, _ in got]) == 3
    assert store.ack([sid for sid, _ in got]) == 0  # acking twice counts once
    assert store.counts()["unconsumed"] == 2
    rest = store.read_unconsumed("w1", count=10)
    assert [e for _, e in rest] == events[3:]
    assert store.read_unconsumed("w1", count=10) == []
    store.ack([sid for sid, _ in rest])
    assert store.counts() == {"turns": 1, "events": 5, "unconsumed": 0, "held": 0}
    assert store.pending()["pending"] == 0


def test_dead_consumer_entries_are_reclaimed_once(redis_client):
    store = FeedbackStore(redis_client, min_idle_ms=300)
    events = _seed(store, 6)
    dead = store.read_unconsumed("dead-worker", count=4)  # reads, then "dies" without ack
    assert len(dead) == 4
    # Too early: the entries are not stale yet; the live worker only gets new ones.
    early = store.read_unconsumed("live-worker", count=10)
    assert [e for _, e in early] == events[4:]
    time.sleep(0.4)
    reclaimed = store.read_unconsumed("live-worker", count=10)
    # Its own unacked entries went stale too and come back along with the dead one's.
    assert sorted(sid for sid, _ in reclaimed) == sorted(sid for sid, _ in dead + early)
    assert store.pending()["consumers"].get("dead-worker", 0) == 0
    store.ack([sid for sid, _ in reclaimed])
    assert store.counts()["unconsumed"] == 0
    # Every event was acknowledged exactly once and nothing remains for anyone.
    time.sleep(0.4)
    assert store.read_unconsumed("third", count=10) == []
    assert store.pending()["pending"] == 0


def test_min_idle_zero_takes_over_at_once_and_release(store):
    events = _seed(store, 3)
    first = store.read_unconsumed("round-1", count=3)
    # Under the train lock a new round may take every pending entry immediately.
    second = store.read_unconsumed("round-2", count=10, min_idle_ms=0)
    assert [e for _, e in second] == events
    assert store.pending()["consumers"] == {"round-2": 3}
    # A failed gate hands the entries back: the default (long) idle does not delay them.
    assert store.release("round-2", [sid for sid, _ in second]) == 3
    third = store.read_unconsumed("round-3", count=10)
    assert [sid for sid, _ in third] == [sid for sid, _ in first]
    assert store.counts()["unconsumed"] == 3


# Not JSON; JSON but not an object (null or a list made Event.from_dict raise an error the
# quarantine did not catch, and the queue stayed blocked for good).
@pytest.mark.parametrize("bad", [[b"{not json"], [b"null", b"[1, 2]"]])
def test_invalid_entry_is_quarantined_not_blocking(store, redis_client, bad):
    events = _seed(store, 1)
    for payload in bad:
        redis_client.xadd(EVENTS_STREAM, {"event": payload})
    got = store.read_unconsumed("w", count=10)
    assert [e for _, e in got] == events
    assert redis_client.xlen("rlhf:events:invalid") == len(bad)
    store.ack([sid for sid, _ in got])
    assert store.counts()["unconsumed"] == 0


def test_group_recreated_after_stream_deleted(store, redis_client):
    _seed(store, 2)
    store.read_unconsumed("w", count=1)
    redis_client.delete(EVENTS_STREAM)
    assert store.read_unconsumed("w", count=5) == []
    assert store.counts()["unconsumed"] == 0


def test_concurrent_writers_lose_nothing_and_duplicates_collapse(store):
    turns = [make_turn(f"t{i}", session_id=f"s{i}", user_id=f"u{i}") for i in range(8)]
    errors: list[BaseException] = []
    results: list[str | None] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        try:
            turn = turns[i]
            store.save_turn(turn)  # every thread also races to save the same turn
            for j in range(40):
                # Each event is sent twice (a retried click), the copy from another thread.
                for eid in (f"e{i}-{j}", f"e{(i + 1) % 8}-{j}"):
                    owner = turns[int(eid[1:].split("-")[0])]
                    store.save_turn(owner)
                    sid = store.record_event(
                        Event(eid, owner.turn_id, "like", owner.session_id, owner.user_id)
                    )
                    with lock:
                        results.append(sid)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.counts()["turns"] == 8
    assert store.counts()["events"] == 8 * 40
    assert sum(r is not None for r in results) == 8 * 40
    assert len({e.event_id for e in store.events()}) == 8 * 40


def test_concurrent_consumers_deliver_each_event_once(store):
    _seed(store, 60)
    seen: list[str] = []
    lock = threading.Lock()

    def consume(name: str) -> None:
        while batch := store.read_unconsumed(name, count=7):
            with lock:
                seen.extend(sid for sid, _ in batch)
            store.ack([sid for sid, _ in batch])

    threads = [threading.Thread(target=consume, args=(f"c{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 60 and len(set(seen)) == 60
    assert store.counts()["unconsumed"] == 0


# ---------------------------------------------------------------- availability


def test_unreachable_redis_raises_clear_error(valkey):
    client = redis.Redis.from_url(valkey.url, socket_timeout=1, socket_connect_timeout=1)
    store = FeedbackStore(client)
    store.save_turn(make_turn())
    valkey.kill()
    with pytest.raises(FeedbackUnavailable, match="unreachable.*rlhf-chat up") as info:
        store.record_event(make_event(make_turn(), "like"))
    # Either way of catching it works for the UI.
    assert isinstance(info.value, redis.exceptions.ConnectionError)
    assert isinstance(info.value, RedisUnavailableError)
    with pytest.raises(FeedbackUnavailable):
        list(store.turns())
    with pytest.raises(FeedbackUnavailable):
        store.counts()


def test_records_survive_kill_and_restart(valkey):
    client = redis.Redis.from_url(valkey.url, socket_timeout=2)
    store = FeedbackStore(client)
    turn = make_turn()
    store.save_turn(turn)
    confirmed = [store.record_event(make_event(turn, "like")) for _ in range(20)]
    assert all(confirmed)
    valkey.kill()  # SIGKILL: no clean shutdown, the AOF (appendfsync always) is all there is
    valkey.start()
    client = redis.Redis.from_url(valkey.url, socket_timeout=2)
    store = FeedbackStore(client)
    assert [sid for sid, _ in store.event_entries()] == confirmed
    assert store.get_turn("t1") == turn
    # The idempotency markers survived too: a retried click is still a duplicate.
    first = next(store.events())
    assert store.record_event(first) is None
    client.close()


def test_unconsumed_count_without_server_lag(store, redis_client):
    # Deleting an entry makes XINFO GROUPS report lag as null; the count then
    # comes from the entries after the group's last-delivered id.
    _seed(store, 6)
    got = store.read_unconsumed("w", count=2)
    never_delivered = [sid for sid, _ in store.event_entries()][2:]
    redis_client.xdel(EVENTS_STREAM, never_delivered[0])
    assert store._group_info()["lag"] is None
    assert store.counts()["unconsumed"] == 2 + 3
    store.ack([sid for sid, _ in got])
    assert store.counts()["unconsumed"] == 3


def test_unconsumed_count_without_server_lag_reads_the_backlog_once(store, redis_client):
    # Review of s17 (a helper): with the lag unknown, every count (each /status, each vote's
    # "is a round due?") read every unread event: the whole backlog, while workers lag.
    events = _seed(store, 8)
    got = store.read_unconsumed("w", count=3)  # 3 delivered (pending), 5 never delivered
    ids = [sid for sid, _ in store.event_entries()]
    redis_client.xdel(EVENTS_STREAM, ids[4])  # one never delivered: 4 unread + 3 pending
    reads: list[tuple] = []
    real_xrange = store.redis.xrange

    def xrange(*args, **kwargs):
        reads.append(args)
        return real_xrange(*args, **kwargs)

    store.redis.xrange = xrange
    try:
        assert store.counts()["unconsumed"] == 4 + 3 and len(reads) == 1
        assert store.counts()["unconsumed"] == 7 and len(reads) == 1  # not read again
        turn = store.get_turn(events[0].turn_id)
        for _ in range(2):
            assert store.record_event(make_event(turn, "like"))
        assert store.counts()["unconsumed"] == 9 and len(reads) == 1  # 2 added, counted
        redis_client.xdel(EVENTS_STREAM, ids[6])  # another deletion: read once more
        assert store.counts()["unconsumed"] == 8 and len(reads) == 2
        store.ack([sid for sid, _ in got])  # the pending ones leave; the unread stay 5
        assert store.counts()["unconsumed"] == 5 and len(reads) == 2
        later = store.read_unconsumed("w", count=2)  # the group moves on
        assert store.counts()["unconsumed"] == 5
        store.ack([sid for sid, _ in later])
        assert store.counts()["unconsumed"] == 3
    finally:
        store.redis.xrange = real_xrange


def test_policy_version_accepts_integer_types_only():
    import numpy as np

    assert make_turn(policy_version=np.int64(4)).to_dict()["policy_version"] == 4
    assert type(make_turn(policy_version=np.int64(4)).policy_version) is int
    with pytest.raises(FeedbackError, match="policy_version must be an int"):
        make_turn(policy_version="4")
    with pytest.raises(FeedbackError, match="policy_version must be an int"):
        make_turn(policy_version=True)


def test_reclaim_stale_takes_only_idle_entries(redis_client):
    store = FeedbackStore(redis_client, min_idle_ms=200)
    _seed(store, 3)
    dead = store.read_unconsumed("dead", count=3)
    assert store.reclaim_stale("rescuer") == []  # not idle long enough yet
    time.sleep(0.3)
    rescued = store.reclaim_stale("rescuer", count=2)
    assert [sid for sid, _ in rescued] == [sid for sid, _ in dead[:2]]
    assert store.pending()["consumers"] == {"dead": 1, "rescuer": 2}
    # Reclaiming is not reading new entries: there are none, and none are made up.
    assert len(store.reclaim_stale("rescuer", min_idle_ms=0, count=10)) == 3


def test_turn_finished_defaults_to_true_for_older_records():
    """Issue 9, defect 3: Turn.finished (the answer ended with EOS) round-trips, and a
    record written before the field existed reads as finished, as training assumed."""
    turn = Turn("t1", "s1", "u1", [{"role": "user", "content": "Hi"}], "cut off", finished=False)
    assert Turn.from_json(turn.to_json()).finished is False
    old = json.loads(turn.to_json())
    del old["finished"]
    assert Turn.from_dict(old).finished is True
    with pytest.raises(FeedbackError, match="finished"):
        Turn("t1", "s1", "u1", [{"role": "user", "content": "Hi"}], "x", finished="no")
