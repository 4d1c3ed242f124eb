"""The Training tab (chat_ui/training.py) as a stranger on a public Space reaches it: its
`refresh` runs for every open tab every few seconds and for anyone who posts its fn_index.
Real Valkey, real Gradio components, the real round code."""

from __future__ import annotations

import threading
import time

import gradio as gr
import pytest

from chat_ui import training
from chat_ui.access import COOKIE, Access, new_cookie_value
from rlhf_core.feedback import Battle, Event, FeedbackStore, Turn, new_id
from rlhf_core.rounds import run_round
from tests.test_registry import adapters  # noqa: F401  (fixture)


def answered_turn(store: FeedbackStore, i: int, user: str = "alice", version: int = 0) -> Turn:
    turn = Turn(
        turn_id=new_id(),
        session_id=f"{user}-s",
        user_id=user,
        messages=[{"role": "user", "content": f"Question {i} from {user}?"}],
        answer=f"Answer {i}",
        policy_version=version,
    )
    store.save_turn(turn)
    return turn


def vote(store: FeedbackStore, i: int, kind: str = "like") -> None:
    turn = answered_turn(store, i)
    assert store.record_event(Event.new(turn.turn_id, kind, turn.session_id, turn.user_id))


def training_tab(settings, client, **kwargs) -> dict:
    with gr.Blocks():
        with gr.Tab("Training"):
            return training.build_training_tab(settings, client=client, **kwargs)


def signed_request(access: Access, session: str, **headers: str) -> gr.Request:
    """A request from a browser holding a cookie this server signed (headers: e.g. the
    proxy's account header)."""
    cookie = new_cookie_value(access.secret)
    return gr.Request(
        session_hash=session, headers=headers, cookies={COOKIE: cookie},
        client={"host": "198.51.100.7"},
    )  # fmt: skip


class FrozenClock:
    """``time`` for chat_ui.training with a ``monotonic`` the test moves by hand."""

    now = 1000.0

    def __getattr__(self, name):
        return getattr(time, name)

    def monotonic(self):
        return self.now


def frozen_clock(monkeypatch) -> FrozenClock:
    """The Training tab on a clock the test moves, its snapshot recomputed at every call."""
    clock = FrozenClock()
    monkeypatch.setattr(training, "time", clock)
    monkeypatch.setattr(training, "TAB_REFRESH_S", 0.0)
    return clock


def count_calls(monkeypatch, name: str, pause_s: float = 0.0) -> list[int]:
    """Wrap ``training.<name>`` with a counter (and a pause that lets concurrent callers
    overlap, as they would on a big store)."""
    real = getattr(training, name)
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        time.sleep(pause_s)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, name, counted)
    return calls


def test_refresh_reads_all_feedback_at_most_once_per_window(
    tiny_settings, redis_client, monkeypatch
):
    """Every open tab polls `refresh`, and anyone can call it: a vote between calls must not
    make each call load every turn and event again, nor may concurrent callers each load."""
    store = FeedbackStore(redis_client)
    vote(store, 0)
    monkeypatch.setattr(training, "TAB_REFRESH_S", 3600.0, raising=False)
    loads = count_calls(monkeypatch, "load_feedback", pause_s=0.3)
    refresh = training_tab(tiny_settings, redis_client)["refresh"]

    # Four tabs at once on a cold tab: one load, the others wait for its result.
    results: list[tuple] = []
    start = threading.Barrier(4)

    def tab() -> None:
        start.wait()
        results.append(refresh(None))

    threads = [threading.Thread(target=tab) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(loads) == 1
    assert all(list(r[1]["votes"]) == [1] for r in results)

    # People keep voting between ticks: still the one load within the window.
    for i in range(1, 6):
        vote(store, i)
        refresh(None)
    assert len(loads) == 1

    # Once the window has passed, the figures follow the store again: from the events recorded
    # since (ThumbsTally), not by reading everything again.
    monkeypatch.setattr(training, "TAB_REFRESH_S", 0.0)
    table = refresh(None)[1]
    assert len(loads) == 1
    assert list(table["votes"]) == [6] and list(table["👍 rate"]) == [1.0]


def test_leaderboard_reads_the_arena_only_when_a_battle_changed(redis_client, monkeypatch):
    store = FeedbackStore(redis_client)
    a, b = answered_turn(store, 0, "bob", version=1), answered_turn(store, 1, "bob", version=2)
    battle = Battle(new_id(), "bob-s", "bob", a.turn_id, b.turn_id, 1, 2, "a")
    assert store.record_battle(battle)
    reads = []
    real = FeedbackStore.battles
    monkeypatch.setattr(FeedbackStore, "battles", lambda self: reads.append(1) or real(self))
    first = training.leaderboard_rows(store, rounds=20)
    assert [r["version"] for r in first] == [1, 2]
    for _ in range(3):
        assert training.leaderboard_rows(store, rounds=20) == first
    assert len(reads) == 1, "the whole arena stream was read again with no new battle"
    c, d = answered_turn(store, 2, "bob", version=1), answered_turn(store, 3, "bob", version=2)
    assert store.record_battle(Battle(new_id(), "bob-s", "bob", c.turn_id, d.turn_id, 1, 2, "b"))
    assert training.leaderboard_rows(store, rounds=20)[0]["battles"] == 2
    assert len(reads) == 2


def test_a_failed_rounds_exception_text_is_for_admins_only(tiny_settings, redis_client):
    """Exception text can name paths, hosts and ports: visitors of the read-only tab get a
    short reason, admins the detail."""
    store = FeedbackStore(redis_client)
    for i in range(4):
        vote(store, i, ("like", "dislike")[i % 2])

    def out_of_disk(*args, **kwargs):
        raise OSError("[Errno 28] No space left: '/data/artifacts/x' (store 10.0.0.5:6379)")

    with pytest.raises(OSError):
        run_round(
            tiny_settings, redis_client, lambda: None, consumer_name="w1",
            run_training_round=out_of_disk,
        )  # fmt: skip

    settings = tiny_settings.model_copy(update={"public": True, "admins": "root", "auth": "header"})
    access = Access(settings, redis_client)
    refresh = training_tab(settings, redis_client, access=access)["refresh"]

    visitor = refresh(signed_request(access, "s-visitor"))[0]
    assert "last round failed" in visitor
    assert "/data/artifacts" not in visitor and "10.0.0.5" not in visitor, visitor
    admin = refresh(signed_request(access, "s-admin", **{"x-forwarded-user": "root"}))[0]
    assert "/data/artifacts/x" in admin and "10.0.0.5:6379" in admin, admin


def test_a_hidden_training_tab_gives_its_numbers_to_admins_only(tiny_settings, redis_client):
    # Review of s22: RLHF_TRAINING_TAB=hidden hid the tab in the page, but anyone who
    # posted the refresh handler's fn_index got the status, versions, 👍 rates, canary and
    # leaderboard all the same.
    store = FeedbackStore(redis_client)
    for i in range(3):
        vote(store, i)
    settings = tiny_settings.model_copy(
        update={"public": True, "admins": "root", "auth": "header", "training_tab": "hidden"}
    )
    access = Access(settings, redis_client)
    refresh = training_tab(settings, redis_client, access=access)["refresh"]

    stranger = refresh(signed_request(access, "s-stranger"))
    assert stranger[0] == training.HIDDEN_TAB_STATUS
    assert all(part == gr.skip() for part in stranger[1:]), stranger
    admin = refresh(signed_request(access, "s-admin", **{"x-forwarded-user": "root"}))
    assert admin[0] != training.HIDDEN_TAB_STATUS and "version" in admin[0].lower(), admin[0]
    assert len(admin[1]) >= 1  # the versions table
    # The default (read-only) shows the same numbers to everyone.
    readonly = settings.model_copy(update={"training_tab": "readonly"})
    refresh = training_tab(readonly, redis_client, access=Access(readonly, redis_client))["refresh"]
    assert refresh(signed_request(access, "s-stranger"))[0] != training.HIDDEN_TAB_STATUS


def test_deletions_do_not_make_every_refresh_read_the_whole_store(
    tiny_settings, redis_client, monkeypatch
):
    # Review of s22: a deletion shortens the events stream, so the next refresh read every
    # turn and event again (2 s per 20,000 turns in the UI's process), and it moves the
    # battles' mark, so the arena's bootstrap was refitted: one message, one vote and
    # "Delete my data", repeated by a stranger, kept the UI's process reading the store.
    from rlhf_core import privacy

    clock = frozen_clock(monkeypatch)
    monkeypatch.setattr(training, "_board_cache", {})  # fitted with another clock
    store = FeedbackStore(redis_client)
    vote(store, 0)
    a, b = answered_turn(store, 1, "bob", version=0), answered_turn(store, 2, "bob", version=0)
    assert store.record_battle(Battle(new_id(), "bob-s", "bob", a.turn_id, b.turn_id, 0, 0, "a"))
    loads = count_calls(monkeypatch, "load_feedback")
    fits = []
    real = FeedbackStore.battles
    monkeypatch.setattr(FeedbackStore, "battles", lambda self: fits.append(1) or real(self))
    refresh = training_tab(tiny_settings, redis_client)["refresh"]
    assert list(refresh(None)[1]["votes"]) == [3]  # the like and the pick's two votes
    assert (len(loads), len(fits)) == (1, 1)

    for i in range(5):  # the stranger, five times within a minute
        clock.now += 5
        stranger = answered_turn(store, 10 + i, f"stranger{i}")
        assert store.record_event(Event.new(stranger.turn_id, "like", stranger.session_id,
                                            stranger.user_id))  # fmt: skip
        assert list(refresh(None)[1]["votes"]) == [4 + 2 * i]  # the stranger's vote counted
        privacy.forget_user(redis_client, tiny_settings, f"stranger{i}")
        vote(store, 20 + i)  # people keep voting: counted as they come
        votes = list(refresh(None)[1]["votes"])
        assert (len(loads), len(fits)) == (1, 1), "a deletion made a refresh read everything"
        assert votes == [5 + 2 * i]  # the deleted votes stay in until the next full read

    # Once the minute has passed, one full read puts the figures right again.
    clock.now += training.FULL_READ_MIN_S
    assert list(refresh(None)[1]["votes"]) == [8]
    assert (len(loads), len(fits)) == (2, 2)


def test_a_running_canary_is_read_in_full_at_most_once_a_minute(
    tiny_settings,
    redis_client,
    adapters,  # noqa: F811  (the fixture)
    monkeypatch,
):
    # Review of s23: while a candidate was out, every refresh (every 5 s, and for anyone who
    # posts the handler) re-read every event since it started, however many a flood of
    # votes had made them. Now at most once a minute, and at once for another candidate.
    from rlhf_core import canary
    from rlhf_core.registry import Registry
    from tests.test_canary import answer, publish

    clock = frozen_clock(monkeypatch)
    settings = tiny_settings.model_copy(update={"canary_share": 0.5, "canary_burn_in": 5})
    registry, store = Registry(redis_client, settings), FeedbackStore(redis_client)
    v1 = publish(registry, adapters[1][0])
    v2 = publish(registry, adapters[2][0], share=0.5)
    assert registry.candidate()["version"] == v2
    reads = []
    real = canary.counted_votes
    monkeypatch.setattr(canary, "counted_votes", lambda *a, **k: reads.append(1) or real(*a, **k))
    refresh = training_tab(settings, redis_client)["refresh"]
    assert f"v{v2}" in refresh(None)[5] and len(reads) == 1
    for k in range(5):  # a stranger's votes, and a refresh every 5 s
        answer(store, f"s{k}", v2, "like")
        clock.now += 5
        refresh(None)
    assert len(reads) == 1, "each refresh re-read the canary's events"
    clock.now += training.FULL_READ_MIN_S
    refresh(None)
    assert len(reads) == 2
    # With no candidate out (an admin rolled it back, reading its votes once more to
    # record them), nothing is read.
    canary.override(redis_client, settings, "rollback")
    assert registry.candidate() is None and registry.current() == v1 and len(reads) == 3
    assert "No candidate out" in refresh(None)[5] and len(reads) == 3
