"""Consent, deletion, retention, review, new-account hold and scrubbing (rlhf_core/privacy.py),
on a real Valkey server and, for rounds, the real tiny model and trainer."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import pytest

from rlhf_core import datasets as ds
from rlhf_core import privacy
from rlhf_core.feedback import GROUP, Battle, Event, FeedbackStore, Turn, new_id
from rlhf_core.privacy import Admission, admitted_events, scrub_text
from rlhf_core.registry import Registry
from rlhf_core.rounds import round_is_due, run_round

# --------------------------------------------------------------------------- scrubbing


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("Mail jane.doe@example.com today", "Mail <EMAIL_ADDRESS> today"),
        ("Call +1 415-555-2671 now", "Call <PHONE_NUMBER> now"),
        ("London office: +44 20 7946 0958.", "London office: <PHONE_NUMBER>."),
        ("Mon portable : 06 12 34 56 78", "Mon portable : <PHONE_NUMBER>"),
        ("card 4111 1111 1111 1111 exp 12/29", "card <CREDIT_CARD> exp 12/29"),
        # Not a card: the Luhn check digit is wrong, so the number stays.
        ("order 4111 1111 1111 1112", "order 4111 1111 1111 1112"),
        ("IBAN DE89370400440532013000 please", "IBAN <IBAN_CODE> please"),
        ("key sk-proj-abcdefghijklmnopqrstuvwx123", "key <API_KEY>"),
        ("HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyzABCDEFGH", "HF_TOKEN=<API_KEY>"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "token <API_KEY>"),
        ("AWS AKIAIOSFODNN7EXAMPLE ok", "AWS <API_KEY> ok"),
        ("Authorization: Bearer abcdefghij0123456789xyz", "Authorization: Bearer <API_KEY>"),
        ('password = "hunter2hunter2"', 'password = "<API_KEY>"'),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
            "jwt <API_KEY>",
        ),
        # Ordinary text, numbers, dates, versions and code stay exactly as they were.
        ("3 + 4 = 7; 2024-05-01; v1.2.3; 12345", "3 + 4 = 7; 2024-05-01; v1.2.3; 12345"),
        ("def f(x): return x @ w  # matmul", "def f(x): return x @ w  # matmul"),
        ("שלום 👍🏽 漢字", "שלום 👍🏽 漢字"),
    ],
)
def test_scrub_worked_examples(text, scrubbed):
    assert scrub_text(text) == scrubbed


def test_scrubbing_a_long_hostile_text_takes_linear_time():
    # Review of s24: Presidio's e-mail pattern has an unbounded local part, tried again from
    # every word boundary: "a-a-a-...@" of a message's 4,000 characters took 2.4 s to scrub,
    # 8,000 (a rewrite may be 4x its answer) 9 s, quadratic. Every such message of a
    # signed-in stranger cost a training round (or an export) that long, at 300 a day.
    scrub_text("warm up x@example.com")  # Presidio's first use imports spaCy
    for text in ("a-" * 4000 + "@x", "a." * 4000 + "@x", "a-" * 4000 + "@example.com"):
        start = time.perf_counter()
        scrub_text(text)
        # About 0.01 s now, 9 s before: a bound far from both, for a loaded machine.
        assert time.perf_counter() - start < 2.0, text[-20:]
    # Addresses are still found, up to the longest local part a mail server takes (64).
    local = "first.last-" + "x" * 53
    assert scrub_text(f"write to {local}@example.com now") == "write to <EMAIL_ADDRESS> now"
    assert scrub_text("a-b-c@example.com") == "<EMAIL_ADDRESS>"


def test_scrub_turn_and_event_keep_everything_else():
    turn = Turn(
        "t1", "s1", "u1",
        [{"role": "system", "content": "be nice"},
         {"role": "user", "content": "I am bob@corp.io"}],
        "Write to bob@corp.io", created_at=5.0,
    )  # fmt: skip
    out = privacy.scrub_turn(turn)
    assert out.messages[1]["content"] == "I am <EMAIL_ADDRESS>"
    assert out.answer == "Write to <EMAIL_ADDRESS>" and out.created_at == 5.0
    assert turn.answer == "Write to bob@corp.io"  # the stored record is not touched
    clean = Turn("t2", "s1", "u1", [{"role": "user", "content": "hi"}], "hello")
    assert privacy.scrub_turn(clean) is clean


# --------------------------------------------------------------------------- admission rules


def e(kind: str, idx: int, session: str = "s", turn: str = "t") -> Event:
    return Event(f"e{idx}", turn, kind, session, "u", "x" if kind == "rewrite" else None)


@pytest.mark.parametrize(
    ("kinds", "keep", "expected"),
    [
        # like, rewrite(held), undo -> the undo took back the rewrite: both go, like stays.
        (["like", "rewrite", "undo"], {0}, [0]),
        # The undo took back the like, which stays taken back when the rewrite goes.
        (["like", "rewrite", "undo", "undo"], {0}, [0, 3]),
        # rewrite(held) never undone; the like after it and its undo stay paired.
        (["rewrite", "like", "undo"], {1}, [1, 2]),
        # An undo with nothing to take back stays (it does nothing either way).
        (["undo", "like"], {1}, [0, 1]),
    ],
)
def test_admitted_events_drop_undos_with_their_events(kinds, keep, expected):
    events = [e(k, i) for i, k in enumerate(kinds)]
    assert [ev.event_id for ev in admitted_events(events, keep)] == [f"e{i}" for i in expected]
    # Resolving what is left gives what resolving everything gives, minus the held event.
    full = ds.resolve_turn_events(events)
    left = ds.resolve_turn_events(admitted_events(events, keep))
    assert left.vote == full.vote


def test_admission_rules_worked_example():
    turn = Turn("t", "s", "u", [{"role": "user", "content": "q"}], "a", created_at=100.0)
    off = Turn("t2", "s", "u", [{"role": "user", "content": "q"}], "a", may_train=False)
    rewrite = Event("r", "t", "rewrite", "s", "u", "better", created_at=150.0)
    like = Event("l", "t", "like", "s", "u", created_at=150.0)
    rules = Admission(now=1000.0)
    assert rules.event_status(like, turn) == ("train", 0.0)
    assert rules.event_status(like, off) == ("excluded", 0.0)
    assert rules.event_status(like, None) == ("excluded", 0.0)  # turn gone
    # The chat switch set later wins over the records, both ways.
    assert not Admission(overrides={"t": False}).turn_ok(turn)
    assert Admission(overrides={"t2": True}).turn_ok(off)
    no_train_click = Event("n", "t", "like", "s", "u", may_train=False)
    assert rules.event_status(no_train_click, turn)[0] == "excluded"
    assert Admission(overrides={"t": True}).event_status(no_train_click, turn)[0] == "train"
    # Review: pending rewrites wait for ever, approved ones train, dropped ones never do.
    review = Admission(review_rewrites=True, now=1000.0)
    assert review.event_status(rewrite, turn) == ("held", math.inf)
    assert review.event_status(like, turn) == ("train", 0.0)
    approved = Admission(review_rewrites=True, decisions={"r": "approved"}, now=1000.0)
    assert approved.event_status(rewrite, turn) == ("train", 0.0)
    assert Admission(decisions={"r": "dropped"}).event_status(rewrite, turn)[0] == "excluded"
    # New account: first turn at 900, hold 600 s -> held until 1500 when it is 1000 now.
    young = Admission(new_account_hold_s=600.0, first_seen={"u": 900.0}, now=1000.0)
    assert young.event_status(like, turn) == ("held", 1500.0)
    assert Admission(new_account_hold_s=600.0, first_seen={"u": 900.0}, now=1500.0
                     ).event_status(like, turn) == ("train", 0.0)  # fmt: skip
    # Deleted user: what was made before the deletion never comes back.
    gone = Admission(forgotten={"u": 200.0})
    assert not gone.turn_ok(turn)
    later = Turn("t3", "s", "u", [{"role": "user", "content": "q"}], "a", created_at=300.0)
    assert gone.turn_ok(later)


# --------------------------------------------------------------------------- the store

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def chat(store, user, session, n, *, may_train=True, pii=False, at=None, kinds=("like",)):
    """``n`` answered turns of one chat, each with one reaction; returns (turns, events)."""
    turns, events = [], []
    for i in range(n):
        contact = " Reach me at ann.lee@gmail.com or +1 415-555-2671." if pii else ""
        turn = Turn(
            turn_id=new_id(),
            session_id=session,
            user_id=user,
            messages=[SYSTEM, {"role": "user", "content": f"Q{i} of {user}?{contact}"}],
            answer=f"A{i} of {user}",
            may_train=may_train,
            created_at=at if at is not None else time.time(),
        )
        assert store.save_turn(turn)
        kind = kinds[i % len(kinds)]
        event = Event.new(
            turn.turn_id, kind, session, user, "Better." if kind == "rewrite" else None
        )
        event.may_train = may_train
        if at is not None:
            event.created_at = at
        assert store.record_event(event)
        turns.append(turn)
        events.append(event)
    return turns, events


@pytest.fixture()
def store(redis_client):
    return FeedbackStore(redis_client)


def users_in(rows):
    return {r["user_id"] for r in rows}


def test_dont_train_chat_is_left_out_of_datasets_and_exports(store, tiny_settings, tmp_path):
    chat(store, "ann", "a1", 2)
    chat(store, "bob", "b1", 2, may_train=False)
    # Exports and round data leave bob's chat out; the UI's raw counts still see it.
    assert {r["user_id"] for r in ds.export_rows(store, "turns", settings=tiny_settings)} == {"ann"}
    raw_turns, _ = ds.load_feedback(store, raw=True)
    assert {t.user_id for t in raw_turns} == {"ann", "bob"}
    n = ds.export(store, "kto", tmp_path / "kto.jsonl", settings=tiny_settings)
    assert n == 2 and "bob" not in (tmp_path / "kto.jsonl").read_text()

    # Switching the chat off later covers the answers already written, and back on again.
    ann_turns = store.turns_for_session("a1")
    store.set_training([t.turn_id for t in ann_turns], allowed=False)
    assert ds.export_rows(store, "kto", settings=tiny_settings) == []
    store.set_training([t.turn_id for t in ann_turns], allowed=True)
    assert len(ds.export_rows(store, "kto", settings=tiny_settings)) == 2


def test_exports_are_scrubbed(store, tiny_settings, tmp_path):
    turns, _ = chat(store, "ann", "a1", 1, pii=True)
    rewrite = Event.new(turns[0].turn_id, "rewrite", "a1", "ann", "Mail ann.lee@gmail.com.")
    store.record_event(rewrite)
    for fmt in ("turns", "kto", "dpo"):
        path = tmp_path / f"{fmt}.jsonl"
        ds.export(store, fmt, path, settings=tiny_settings)
        text = path.read_text()
        assert "ann.lee@gmail.com" not in text and "415-555-2671" not in text, fmt
    rows = ds.read_jsonl(tmp_path / "dpo.jsonl")
    assert rows[0]["chosen"][0]["content"] == "Mail <EMAIL_ADDRESS>."
    assert "<EMAIL_ADDRESS> or <PHONE_NUMBER>" in rows[0]["prompt"][-1]["content"]
    # The store keeps what was written (deleting it is "delete my data").
    assert "ann.lee@gmail.com" in store.get_turn(turns[0].turn_id).messages[-1]["content"]


def test_forget_user_removes_everything_and_keeps_it_out(store, redis_client, tiny_settings):
    ann_turns, ann_events = chat(store, "ann", "a1", 3)
    bob_turns, _ = chat(store, "bob", "b1", 2)
    # Some of ann's events are pending in the training group, one is marked used.
    read = store.read_unconsumed("w1", count=2)
    assert {ev.user_id for _, ev in read} == {"ann"}
    redis_client.hset("rlhf:registry:used", read[0][0], 1)
    old_pending = Turn(new_id(), "a1", "ann", [{"role": "user", "content": "late"}], "x",
                       created_at=time.time() - 1)  # fmt: skip

    battle = Battle(new_id(), "a1", "ann", ann_turns[0].turn_id, ann_turns[1].turn_id, 0, 1, "a")
    assert store.record_battle(battle)
    assert len(ds.export_rows(store, "arena", settings=tiny_settings)) == 1

    counts = privacy.forget_user(redis_client, tiny_settings, "ann")
    assert counts == {"turns": 3, "events": 5, "battles": 1}  # the pick's two votes too
    assert store.battles() == [] and ds.export_rows(store, "arena", settings=tiny_settings) == []
    assert store.counts()["turns"] == 2 and store.counts()["events"] == 2
    assert not redis_client.exists(f"rlhf:battle_seen:{battle.battle_id}")
    assert all(t.user_id == "bob" for t in store.turns())
    assert all(ev.user_id == "bob" for ev in store.events())
    assert store.turns_for_session("a1") == []
    assert store.pending()["pending"] == 0  # their pending entries were acked, not left
    assert not redis_client.hexists("rlhf:registry:used", read[0][0])
    assert not any(redis_client.exists(f"rlhf:event_seen:{ev.event_id}") for ev in ann_events)
    assert not any(redis_client.exists(f"rlhf:turn_events:{t.turn_id}") for t in ann_turns)
    assert not redis_client.hexists("rlhf:accounts", "ann")
    # Nothing personal is kept to remember the deletion: only a digest.
    assert b"ann" not in b"".join(redis_client.hkeys("rlhf:forgotten"))
    # A turn made before the deletion and saved late (a replica's flush) is refused...
    assert store.save_turn(old_pending) is False and store.get_turn(old_pending.turn_id) is None
    # ...a new chat afterwards is welcome.
    chat(store, "ann", "a2", 1)
    assert users_in(ds.export_rows(store, "turns", settings=tiny_settings)) == {"ann", "bob"}
    # The next read gives the remaining events once, nothing deleted.
    rest = store.read_unconsumed("w2", count=10, min_idle_ms=0)
    assert sorted(ev.user_id for _, ev in rest) == ["ann", "bob", "bob"]


# What "delete my data" may read: everything of that one user, nothing of the whole store.
WHOLE_STORE_STREAMS = ("rlhf:turns", "rlhf:events", "rlhf:arena")
WHOLE_STORE_HASHES = ("rlhf:accounts", "rlhf:forgotten", "rlhf:consent", "rlhf:review")


def commands_during(client, call):
    """(what ``call`` returned, every command the server ran meanwhile, oldest first, as
    lists of strings, the ones run inside scripts included): the server's slow log with a
    threshold of 0 logs each command, however it was sent."""
    client.config_set("slowlog-max-len", 100_000)
    client.config_set("slowlog-log-slower-than", 0)
    client.slowlog_reset()
    try:
        result = call()
    finally:
        client.config_set("slowlog-log-slower-than", 10_000)
    entries = client.slowlog_get(100_000)[::-1]
    return result, [e["command"].decode("utf-8", "replace").split(" ") for e in entries]


def whole_store_reads(commands, max_keys: int = 0):
    """The commands that read a whole-store structure: a range of one of the streams
    (a single entry, start == end, is fine), SCAN/KEYS, a whole global hash, or an MGET
    of more than ``max_keys`` keys."""
    out = []
    for cmd in commands:
        name = cmd[0].upper()
        if name in ("XRANGE", "XREVRANGE") and cmd[1] in WHOLE_STORE_STREAMS and cmd[2] != cmd[3]:
            out.append(cmd)
        elif name in ("XREAD", "XREADGROUP", "SCAN", "KEYS"):
            out.append(cmd)
        elif name in ("HGETALL", "HKEYS", "HVALS", "HSCAN") and cmd[1] in WHOLE_STORE_HASHES:
            out.append(cmd)
        elif name == "MGET" and len(cmd) - 1 > max_keys:
            out.append(cmd[:4])
    return out


def test_forget_user_costs_only_that_users_data(store, redis_client, tiny_settings):
    """A stranger can ask to delete the data of a fresh cookie at the per-IP rate: that
    must cost nothing of the size of the store, and leave nothing behind that grows."""
    for k in range(40):  # 2,000 turns (each with a vote) of other people
        chat(store, f"u{k}", f"s{k}", 50)
    other = Battle(new_id(), "s0", "u0", *[t for _, t in list(store.turn_index())[:2]], 0, 1, "b")
    assert store.record_battle(other)
    before = store.counts()
    late = Turn(new_id(), "n1", "anon:new", [{"role": "user", "content": "hi"}], "x",
                created_at=time.time() - 1)  # fmt: skip

    counts, commands = commands_during(
        redis_client, lambda: privacy.forget_user(redis_client, tiny_settings, "anon:new")
    )
    assert counts == {"turns": 0, "events": 0, "battles": 0}
    assert whole_store_reads(commands) == []
    assert redis_client.hlen("rlhf:forgotten") == 0  # nothing that grows per cookie
    privacy.forget_user(redis_client, tiny_settings, "anon:new")
    assert redis_client.hlen("rlhf:forgotten") == 0
    # Still, an answer of theirs that another replica kept while Redis was down and
    # flushes late is refused.
    assert store.save_turn(late) is False

    # A user with data: exactly theirs goes, read from their own index.
    mine, _ = chat(store, "cat", "c1", 3)
    bob_turn = next(t for t in store.turns() if t.user_id == "u1")
    # A reaction on another person's answer (a session whose account changed).
    assert store.record_event(Event.new(bob_turn.turn_id, "dislike", bob_turn.session_id, "cat"))
    assert store.record_battle(Battle(new_id(), "c1", "cat", mine[0].turn_id, mine[1].turn_id,
                                      0, 1, "tie"))  # fmt: skip
    counts, commands = commands_during(
        redis_client, lambda: privacy.forget_user(redis_client, tiny_settings, "cat")
    )
    assert counts == {"turns": 3, "events": 3 + 1 + 2, "battles": 1}
    assert whole_store_reads(commands, max_keys=3) == []
    after = store.counts()
    assert (after["turns"], after["events"]) == (before["turns"], before["events"])
    assert [b["user_id"] for b in store.battles()] == ["u0"]
    assert redis_client.hlen("rlhf:forgotten") == 1  # cat had data: tombstoned for good
    assert store.get_turn(bob_turn.turn_id) is not None


def test_forget_user_indexes_an_older_store_once(store, redis_client, tiny_settings):
    """A store written before the per-user index existed is indexed by the first
    deletion, in one pass; later deletions read only the user's own index."""
    ann, _ = chat(store, "ann", "a1", 2)
    chat(store, "bob", "b1", 30)
    bob_turn = next(t for t in store.turns() if t.user_id == "bob")
    assert store.record_event(Event.new(bob_turn.turn_id, "like", "b1", "ann"))
    assert store.record_battle(Battle(new_id(), "a1", "ann", ann[0].turn_id, ann[1].turn_id,
                                      0, 1, "a"))  # fmt: skip
    # As an older version left it: no index, no marker.
    redis_client.delete("rlhf:user_index", *redis_client.keys("rlhf:user_data:*"))

    _, commands = commands_during(
        redis_client, lambda: privacy.forget_user(redis_client, tiny_settings, "anon:x")
    )
    assert whole_store_reads(commands)  # the one pass that builds the index
    assert redis_client.get("rlhf:user_index") == b"1"
    counts, commands = commands_during(
        redis_client, lambda: privacy.forget_user(redis_client, tiny_settings, "ann")
    )
    assert counts == {"turns": 2, "events": 2 + 1 + 2, "battles": 1}
    assert whole_store_reads(commands, max_keys=2) == []
    assert {t.user_id for t in store.turns()} == {"bob"}
    assert {e.user_id for e in store.events()} == {"bob"} and store.battles() == []
    # Nothing of ann is left in the index either.
    assert not redis_client.exists("rlhf:user_data:ann")


def test_retention_leaves_no_index_entries_behind(store, redis_client, tiny_settings):
    settings = tiny_settings.model_copy(update={"retention_days": 30})
    turns, _ = chat(store, "ann", "a1", 2)
    store.ack(sid for sid, _ in store.read_unconsumed("w1", count=10))
    assert store.record_battle(Battle(new_id(), "a1", "ann", turns[0].turn_id,
                                      turns[1].turn_id, 0, 1, "a"))  # fmt: skip
    store.ack(sid for sid, _ in store.read_unconsumed("w1", count=10))
    assert redis_client.hlen("rlhf:user_data:ann") == 2 + 4 + 1
    counts = privacy.apply_retention(redis_client, settings, now=time.time() + 31 * 86_400)
    assert counts == {"turns": 2, "events": 4}
    assert not redis_client.exists("rlhf:user_data:ann")


def test_retention_forgets_the_accounts_it_emptied(store, redis_client, tiny_settings):
    # Review of s22: every visitor who ever sent a message left their account id and when it
    # was first seen in rlhf:accounts for good: it outlived RLHF_RETENTION_DAYS (one field per
    # fresh cookie). Deletion marks stay (a digest and a time: they refuse late copies).
    settings = tiny_settings.model_copy(update={"retention_days": 30})
    day = 86_400
    for user in ("ann", "anon:c1", "anon:c2"):
        chat(store, user, f"{user}-s", 1)
    store.ack(sid for sid, _ in store.read_unconsumed("w1", count=10))
    chat(store, "bob", "b1", 1)  # never read by the training group: his turn stays
    chat(store, "dee", "d1", 1)
    privacy.forget_user(redis_client, settings, "dee")
    later = time.time() + 31 * day
    chat(store, "eve", "e1", 1)
    store.tombstone("eve", at=later - day)  # a deletion inside the window
    assert redis_client.hlen("rlhf:forgotten") == 2 and redis_client.hlen("rlhf:accounts") == 4

    assert privacy.apply_retention(redis_client, settings, now=later)["turns"] == 3
    assert store.first_seen(["ann", "anon:c1", "anon:c2", "bob"]).keys() == {"bob"}
    assert store.forgotten_at(["dee", "eve"]).keys() == {"dee", "eve"}
    # A store older than the per-user index: the index is built before "nothing left" is
    # read from it (gus's turn is still there, unread by the training group).
    chat(store, "gus", "g1", 1)
    redis_client.delete("rlhf:user_index", "rlhf:user_data:gus")
    redis_client.hset("rlhf:accounts", "gus", repr(time.time() - 40 * day))
    privacy.apply_retention(redis_client, settings)
    assert "gus" in store.first_seen(["gus"])
    # Nothing older than the cut-off: nothing goes.
    redis_client.hset("rlhf:accounts", "fay", repr(time.time()))
    privacy.apply_retention(redis_client, settings)
    assert store.first_seen(["bob", "fay"]).keys() == {"bob", "fay"}


def test_retention_trims_old_consumed_turns_only(store, redis_client, tiny_settings):
    settings = tiny_settings.model_copy(update={"retention_days": 30})
    day = 86_400
    # Stream ids carry the server's clock, so "old" is simulated by a later "now".
    chat(store, "ann", "a1", 2)  # read and acked: trained on
    chat(store, "bob", "b1", 1)  # read, not acked: pending
    chat(store, "dee", "d1", 1)  # read, then held for review
    read = store.read_unconsumed("w1", count=4)
    assert [ev.user_id for _, ev in read] == ["ann", "ann", "bob", "dee"]
    store.ack([sid for sid, ev in read if ev.user_id == "ann"])
    store.hold({read[3][0]: math.inf})
    chat(store, "cid", "c1", 1)  # never read by the group
    later = time.time() + 31 * day

    counts = privacy.apply_retention(redis_client, settings, now=later)
    assert counts == {"turns": 2, "events": 2}  # ann's two answers and their votes
    left = {t.user_id for t in store.turns()}
    assert left == {"bob", "cid", "dee"}
    assert store.pending()["pending"] == 1 and store.counts()["held"] == 1
    # Nothing older than the cut-off yet: nothing goes.
    assert privacy.apply_retention(redis_client, settings)["turns"] == 0
    assert privacy.apply_retention(redis_client, tiny_settings, now=later)["turns"] == 0


def test_what_cannot_train_is_neither_reviewed_nor_exported_as_an_arena_row(store, tiny_settings):
    # Review of s12: the review queue showed admins a rewrite made after signing out (it can
    # never train), and the arena export kept a battle picked after signing out.
    settings = tiny_settings.model_copy(update={"review_rewrites": True})
    turn = Turn("t1", "s1", "alice", [{"role": "user", "content": "q"}], "a")
    store.save_turn(turn)
    store.record_event(Event("e1", "t1", "rewrite", "s1", "anon:c1", "Better.", consent=False))
    assert privacy.review_queue(store, settings) == []
    other = Turn("t2", "s1", "alice", [{"role": "user", "content": "q"}], "b")
    battle = dict(
        battle_id="b1", session_id="s1", user_id="anon:c1", turn_a="t1", turn_b="t2",
        version_a=1, version_b=0, outcome="a",
    )  # fmt: skip
    turns = {"t1": turn, "t2": other}
    assert len(ds.to_arena_rows([Battle(**battle).to_dict()], turns)) == 1
    assert ds.to_arena_rows([Battle(**battle, consent=False).to_dict()], turns) == []


def test_the_leaderboard_counts_only_picks_that_may_train(store, tiny_settings):
    # Review of s12: the arena leaderboard rated versions on every pick, so anonymous
    # cookies on a public UI (whose picks may not train) could move the ratings.
    from chat_ui.training import leaderboard_rows

    def battle(name, turn_consent=True, pick_consent=True):
        a = Turn(f"{name}a", "s1", "alice", [{"role": "user", "content": "q"}], "a",
                 policy_version=1, consent=turn_consent)  # fmt: skip
        b = Turn(f"{name}b", "s1", "alice", [{"role": "user", "content": "q"}], "b",
                 policy_version=0, consent=turn_consent)  # fmt: skip
        store.save_turn(a)
        store.save_turn(b)
        user = "alice" if pick_consent else "anon:c1"
        assert store.record_battle(Battle(name, "s1", user, a.turn_id, b.turn_id, 1, 0, "a",
                                          consent=pick_consent))  # fmt: skip

    battle("counted")
    battle("signed-out", pick_consent=False)
    battle("anonymous", turn_consent=False, pick_consent=False)
    rows = leaderboard_rows(store, rounds=10)
    assert {r["version"]: r["battles"] for r in rows} == {0: 1, 1: 1}
    assert len(ds.export_rows(store, "arena", settings=tiny_settings)) == 1  # the same one
    # The counted pick's chat switched to "don't train" after the pick: out of the ratings
    # at once, though no battle was recorded or deleted (the cache must not keep it).
    store.set_training(["counteda", "countedb"], False)
    assert leaderboard_rows(store, rounds=10) == []
    # Review of s13: a chat switched off when its answers were written and on again before
    # the pick trains its votes (the switch set later wins), so its pick counts here too.
    late = Turn("latea", "s1", "alice", [{"role": "user", "content": "q"}], "a",
                policy_version=1, may_train=False)  # fmt: skip
    store.save_turn(late)
    store.save_turn(replace(late, turn_id="lateb", answer="b", policy_version=0))
    store.set_training(["latea", "lateb"], True)
    assert store.record_battle(Battle("late", "s1", "alice", "latea", "lateb", 1, 0, "a"))
    rows = leaderboard_rows(store, rounds=10)
    assert {r["version"]: r["battles"] for r in rows} == {0: 1, 1: 1}
    assert [r["version_a"] for r in ds.export_rows(store, "arena", settings=tiny_settings)] == [1]


def test_one_account_counts_a_capped_number_of_battles_on_the_leaderboard(store, tiny_settings):
    """One signed-in account (whose picks may train) submitting arena pick after arena pick
    moved the ratings without bound: each version counts at most
    RLHF_CANARY_MAX_VOTES_PER_USER battles of one person (the earliest), as its votes in the
    canary do. Its picks still train (the export keeps them all)."""
    from chat_ui.training import leaderboard_rows

    settings = tiny_settings.model_copy(update={"canary_max_votes_per_user": 3})

    def battle(name, user, outcome):
        a = Turn(f"{name}a", f"{user}-s", user, [{"role": "user", "content": "q"}], "a",
                 policy_version=1)  # fmt: skip
        store.save_turn(a)
        store.save_turn(replace(a, turn_id=f"{name}b", answer="b", policy_version=0))
        assert store.record_battle(Battle(name, f"{user}-s", user, a.turn_id, f"{name}b", 1, 0,
                                          outcome))  # fmt: skip

    for k in range(4):  # four people find version 0 better
        battle(f"honest{k}", f"user{k}", "b")
    for k in range(40):  # one account says version 1, forty times
        battle(f"stuffed{k}", "mallory", "a")
    rows = {r["version"]: r for r in leaderboard_rows(store, rounds=10, settings=settings)}
    assert rows[1]["battles"] == rows[0]["battles"] == 4 + 3
    assert rows[1]["wins"] == 3 and rows[0]["wins"] == 4
    assert rows[0]["rating"] > rows[1]["rating"]
    assert len(ds.export_rows(store, "arena", settings=settings)) == 44


def test_review_holds_rewrites_until_approved_and_drop_is_final(store, tiny_settings):
    settings = tiny_settings.model_copy(update={"review_rewrites": True})
    turns, events = chat(store, "ann", "a1", 3, kinds=("rewrite", "like", "rewrite"))
    entries = store.read_unconsumed("w1", count=10)
    sorted_ = privacy.sort_entries(store, settings, entries)
    assert [ev.kind for _, ev in sorted_.train] == ["like"]
    assert sorted(sorted_.held.values()) == [math.inf, math.inf]
    store.hold(sorted_.held)
    assert store.pending()["pending"] == 3 - 2 and store.held_count() == 0
    # Neither rewrite is in the data while pending.
    assert ds.export_rows(store, "dpo", settings=settings) == []
    queue = privacy.review_queue(store, settings)
    assert [q["event_id"] for q in queue] == [events[0].event_id, events[2].event_id]

    store.decide_review([events[0].event_id], "approved")
    store.decide_review([events[2].event_id], "dropped")
    assert privacy.review_queue(store, settings) == []
    ready = store.held_ready()
    assert [ev.event_id for _, ev in ready] == [events[0].event_id]
    assert [r["chosen"][0]["content"] for r in ds.export_rows(store, "dpo", settings=settings)] == [
        "Better."
    ]
    # Dropped stays out even with review turned off.
    assert len(ds.export_rows(store, "dpo", settings=tiny_settings)) == 1
    with pytest.raises(ValueError, match="approved or dropped"):
        store.decide_review([events[0].event_id], "maybe")


def round_with_capture(settings, client, model):
    from rlhf_core.trainer import run_training_round

    seen: dict = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        return run_training_round(*args, **kwargs)

    outcome = run_round(settings, client, model, consumer_name="w1", run_training_round=capture)
    return outcome, seen


def test_next_round_honours_dont_train_delete_and_review(redis_client, tiny_settings, tiny_model):
    """One real round after: a no-train chat, a deleted user, a pending rewrite, and a
    new account under hold. Only the rest trains; the held entries wait aside and come
    back (the approved rewrite) in the round after, without blocking it."""
    settings = tiny_settings.model_copy(
        update={"review_rewrites": True, "max_events_per_user": 16, "new_account_hold_s": 0}
    )
    store = FeedbackStore(redis_client)
    chat(store, "ann", "a1", 2, kinds=("like", "dislike"))
    chat(store, "bob", "b1", 2, may_train=False)
    chat(store, "cid", "c1", 2)
    _, rewrites = chat(store, "dee", "d1", 1, kinds=("rewrite",))
    privacy.forget_user(redis_client, settings, "cid")
    assert round_is_due(settings, redis_client)

    outcome, seen = round_with_capture(settings, redis_client, tiny_model)
    assert outcome.status == "published", outcome.reason
    assert {p["user_id"] for p in seen["pointwise"]} == {"ann"}
    # dee's rewrite is waiting for review: neither trained on nor used to measure.
    assert seen["pairs"] == [] and seen["heldout_pairs"] == []
    used = set(Registry(redis_client, settings).get(outcome.version)["event_ids"])
    assert len(used) == 2
    counts = store.counts()
    assert counts["unconsumed"] == 0 and counts["held"] == 1  # bob's acked, never to train

    store.decide_review([rewrites[0].event_id], "approved")
    assert store.held_count() == 1
    outcome, seen = round_with_capture(settings, redis_client, tiny_model)
    assert outcome.status == "published", outcome.reason
    # Trained on, or (one context in five, by hash) held out to measure the reward model.
    assert [p["chosen"] for p in seen["pairs"] + seen["heldout_pairs"]] == ["Better."]
    assert store.counts()["held"] == 0 and store.pending()["pending"] == 0


def test_new_account_feedback_waits_for_the_hold(store, tiny_settings):
    settings = tiny_settings.model_copy(update={"new_account_hold_s": 3600})
    # An account seen before the hold existed (no first-seen record) is established.
    chat(store, "old", "o1", 1)
    store.redis.hdel("rlhf:accounts", "old")
    chat(store, "new", "n1", 2)
    entries = store.read_unconsumed("w1", count=10)
    sorted_ = privacy.sort_entries(store, settings, entries)
    assert [ev.user_id for _, ev in sorted_.train] == ["old"]
    first = store.first_seen(["new"])["new"]
    assert list(sorted_.held.values()) == [first + 3600, first + 3600]
    store.hold(sorted_.held)
    assert store.held_ready() == []
    assert len(store.held_ready(now=first + 3601)) == 2
    assert len(ds.export_rows(store, "kto", settings=settings)) == 1  # old's vote only


def test_an_account_that_only_reacts_is_new_too(store, tiny_settings):
    # Review of s22: first-seen was written with a turn only, so an account that signed in
    # to a chat another account had written in (same cookie and session) and reacted to
    # its answers had no record, counted as established and trained at once; each such
    # account also brings a fresh per-user cap.
    settings = tiny_settings.model_copy(update={"new_account_hold_s": 3600})
    (turn,), _ = chat(store, "writer", "shared-tab", 1)
    store.redis.hdel("rlhf:accounts", "writer")  # established (seen before the hold)
    newcomer = Event.new(turn.turn_id, "dislike", "shared-tab", "newcomer")
    assert store.record_event(newcomer)
    assert store.first_seen(["newcomer"]) == {"newcomer": newcomer.created_at}
    sorted_ = privacy.sort_entries(store, settings, store.read_unconsumed("w1", count=10))
    assert [ev.user_id for _, ev in sorted_.train] == ["writer"]
    assert list(sorted_.held.values()) == [newcomer.created_at + 3600]
    # An arena pick is a reaction too: its picker is first seen with it.
    assert store.first_seen(["picker"]) == {}
    a, b = (Turn(turn_id=new_id(), session_id="arena-tab", user_id="arena-writer",
                 messages=[SYSTEM, {"role": "user", "content": "Q?"}], answer=x)
            for x in ("A", "B"))  # fmt: skip
    assert store.save_turn(a) and store.save_turn(b)
    battle = Battle(battle_id=new_id(), session_id="arena-tab", user_id="picker",
                    turn_a=a.turn_id, turn_b=b.turn_id, version_a=0, version_b=0,
                    outcome="a")  # fmt: skip
    assert store.record_battle(battle)
    assert store.first_seen(["picker"]) == {"picker": battle.created_at}


def test_group_commands_after_forget_still_work(store, redis_client, tiny_settings):
    chat(store, "ann", "a1", 2)
    store.read_unconsumed("w1", count=1)
    privacy.forget_user(redis_client, tiny_settings, "ann")
    info = redis_client.xinfo_groups("rlhf:events")
    assert info[0]["name"] == GROUP.encode() and info[0]["pending"] == 0
    assert store.counts()["unconsumed"] == 0


def test_forget_and_retention_commands(store, tiny_settings):
    """`rlhf-chat forget --user` and `rlhf-chat retention` as an admin runs them, in
    another process, against the test's Valkey."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import tiny_env

    env = tiny_env(tiny_settings)
    chat(store, "ann", "a1", 2)
    chat(store, "bob", "b1", 1)

    def rlhf_chat(*args):
        return subprocess.run(
            [sys.executable, "-m", "chat_ui", *args], env=env, capture_output=True, text=True,
            timeout=120, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip

    done = rlhf_chat("forget", "--user", "ann", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"turns": 2, "events": 2, "battles": 0}
    assert {t.user_id for t in store.turns()} == {"bob"}
    done = rlhf_chat("forget", "--user", "  ")
    assert done.returncode == 2 and "needs the user id" in done.stderr

    done = rlhf_chat("retention")
    assert done.returncode == 2 and "RLHF_RETENTION_DAYS" in done.stderr
    done = rlhf_chat("retention", "--days", "30")
    assert done.returncode == 0 and "deleted 0 turns" in done.stdout, done.stderr


def test_retention_keeps_a_turn_whose_vote_arrives_while_it_runs(
    store, redis_client, tiny_settings
):
    """The script re-checks inside: a turn picked as old is kept when an event on it is
    at or after the cut-off by the time it runs (a late vote on an old answer)."""
    turns, _ = chat(store, "ann", "a1", 1)
    (sid,) = store.turn_event_ids([turns[0].turn_id])[turns[0].turn_id]
    index = next(s for s, t in store.turn_index() if t == turns[0].turn_id)
    vote_ms = int(sid.split("-")[0])
    item = (turns[0].turn_id, index, "a1")
    assert store.delete_turns([item], unless_events_since_ms=vote_ms) == (0, [])
    assert store.get_turn(turns[0].turn_id) is not None
    assert store.delete_turns([item], unless_events_since_ms=vote_ms + 1) == (1, [sid])
    assert store.counts()["turns"] == 0 and store.counts()["events"] == 0


def test_retention_loop_runs_under_the_training_lock(redis_client, tiny_settings):
    settings = tiny_settings.model_copy(update={"retention_days": 0.0})
    store = FeedbackStore(redis_client)
    chat(store, "ann", "a1", 1)
    store.ack([sid for sid, _ in store.read_unconsumed("w1", count=5)])
    loop = privacy.RetentionLoop(settings, redis_client)
    lock = Registry(redis_client, settings).lock()
    assert lock.acquire() is not None
    assert loop.tick() is None  # a round runs: it applies retention itself
    lock.release()
    time.sleep(0.01)  # the cut-off (now - 0 days) must be after the vote
    assert loop.tick() == {"turns": 1, "events": 1}


def everything_stored(client) -> bytes:
    """Every key of the server and everything in it, as one blob to search."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        out.append(key)
        if kind == "string":
            out.append(client.get(key))
        elif kind == "hash":
            out += [b for kv in client.hgetall(key).items() for b in kv]
        elif kind == "list":
            out += client.lrange(key, 0, -1)
        elif kind == "set":
            out += list(client.smembers(key))
        elif kind == "zset":
            out += client.zrange(key, 0, -1)
        elif kind == "stream":
            out += [b for _, data in client.xrange(key) for kv in data.items() for b in kv]
    return b"\n".join(out)


def test_forget_user_leaves_no_trace_of_the_id_after_a_round(redis_client, tiny_settings,
                                                               tiny_model):  # fmt: skip
    """The rounds wrote each user's trained-event count under their id into the policy
    and reward versions (for the per-user window), where forget_user never looked, and a
    round running during the deletion wrote it again: "Delete my data" left the id."""
    store = FeedbackStore(redis_client)
    for user in ("zed-4711", "amy"):
        for i in range(3):
            turn = Turn(new_id(), f"s-{user}", user, [{"role": "user", "content": f"Q{i}?"}],
                        f"A{i}.")  # fmt: skip
            assert store.save_turn(turn)
            kind = ("like", "dislike")[i % 2]
            assert store.record_event(Event.new(turn.turn_id, kind, f"s-{user}", user))

    def forget_meanwhile(stage: str, _: float) -> None:
        if stage == "loading model":  # the round has read zed's events
            privacy.forget_user(redis_client, tiny_settings, "zed-4711")

    outcome = run_round(tiny_settings, redis_client, tiny_model, consumer_name="w1",
                        progress=forget_meanwhile)  # fmt: skip
    assert outcome.status == "published", outcome.reason
    assert Registry(redis_client, tiny_settings).get(outcome.version)["users"] == 2
    left = everything_stored(redis_client)
    assert b"zed-4711" not in left, [line for line in left.split(b"\n") if b"zed-4711" in line]
    # Deleted after the round, the same holds.
    privacy.forget_user(redis_client, tiny_settings, "amy")
    assert b"s-amy" not in everything_stored(redis_client)


def test_forget_user_deletes_their_turn_records_that_no_longer_decode(
    store, redis_client, tiny_settings
):
    """A turn record of the user's that cannot be read as a Turn (corrupt, or written by
    an older version without a field) is theirs by their own index: "Delete my data"
    deletes it with its events. It was skipped and kept, with their message in it."""
    import json

    from rlhf_core.feedback import turn_key

    ann_turns, _ = chat(store, "ann", "a1", 2)
    bob_turns, _ = chat(store, "bob", "b1", 1)
    broken, garbled = ann_turns[0].turn_id, ann_turns[1].turn_id
    record = json.loads(redis_client.get(turn_key(broken)))
    del record["answer"]  # an older version's record, without a field
    redis_client.set(turn_key(broken), json.dumps(record))
    redis_client.set(turn_key(garbled), b"\xff not json")
    assert store.get_turns([broken, garbled]) == {}

    counts = privacy.forget_user(redis_client, tiny_settings, "ann")

    assert counts == {"turns": 2, "events": 2, "battles": 0}
    assert not redis_client.exists(turn_key(broken)) and not redis_client.exists(turn_key(garbled))
    assert not any(redis_client.exists(f"rlhf:turn_events:{t}") for t in (broken, garbled))
    # The record that still names its chat leaves the chat's index; the garbled one's id
    # (a random id, nothing personal) may stay there, pointing at nothing.
    assert broken.encode() not in redis_client.lrange("rlhf:session_turns:a1", 0, -1)
    assert all(ev.user_id == "bob" for ev in store.events())
    assert [t.turn_id for t in store.turns()] == [bob_turns[0].turn_id]
    assert b"Q0 of ann" not in everything_stored(redis_client)
