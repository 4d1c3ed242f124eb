"""kill -9 the Redis server while the UI runs: confirmed feedback survives, the UI says
clearly and quickly that the store is down, keeps what it could not save, and works
again once the server is back on the same port."""

from __future__ import annotations

import time

import pytest
import redis
from gradio_client import Client
from gradio_client.exceptions import AppError

from rlhf_core.feedback import FeedbackStore

SAMPLING = (1.0, 0.9, 6)


def test_kill_9_redis_while_the_ui_runs(app, valkey):
    client = Client(app.url, verbose=False)
    _, answers, _, _ = client.predict("Remember me", "", *SAMPLING, api_name="/send")
    confirmed_turn = answers[0]["turn_id"]
    client.predict(-1, "like", api_name="/vote")
    _, answers, _ = client.predict(-1, "I remember you.", api_name="/rewrite")
    time.sleep(1.1)  # "confirmed more than a second before the kill"

    valkey.kill()  # SIGKILL: no shutdown, no final fsync beyond appendfsync always

    # A vote during the outage fails fast with a message a person understands.
    start = time.monotonic()
    with pytest.raises(AppError, match="(?i)feedback store unreachable"):
        client.predict(-1, "dislike", api_name="/vote")
    assert time.monotonic() - start < 10, "the UI must not hang while Redis is down"

    # Chatting still works; the new answer is kept in the session until it can be saved.
    _, answers, badge, _ = client.predict("Still there?", "", *SAMPLING, api_name="/send")
    pending_turn = answers[-1]["turn_id"]
    assert answers[-1]["saved"] is False
    status = client.predict(api_name="/status")
    assert status["store_ok"] is False and status["pending_turns"] == 1

    valkey.start()  # same port, same data directory: the server replays its AOF

    store = FeedbackStore(redis.Redis.from_url(valkey.url))
    assert store.get_turn(confirmed_turn) is not None
    kinds = [e.kind for e in store.events()]
    assert kinds == ["like", "rewrite"], "every confirmed event survives kill -9"

    # The UI recovers by itself: the vote works again, the pending turn gets saved.
    _, answers, _ = client.predict(1, "dislike", api_name="/vote")
    assert answers[0]["vote"] == "dislike"
    status = client.predict(api_name="/status")
    assert status["store_ok"] is True and status["pending_turns"] == 0
    assert store.get_turn(pending_turn) is not None
    _, answers, _ = client.predict(-1, "like", api_name="/vote")
    assert [e.kind for e in store.events()] == ["like", "rewrite", "dislike", "like"]


def test_a_ui_stopped_while_redis_is_down_says_what_it_could_not_save(app, valkey, caplog):
    """A UI stopped (a deploy, `docker stop`) while the store is down cannot keep the answers
    it holds in memory. Its log said they were "kept for the next sweep", which never comes
    (review, session 26): it now says, as an error, how many were lost."""
    client = Client(app.url, verbose=False)
    client.predict("Hello", "", *SAMPLING, api_name="/send")
    valkey.kill()
    _, answers, _, _ = client.predict("Still there?", "", *SAMPLING, api_name="/send")
    assert answers[-1]["saved"] is False
    with caplog.at_level("ERROR"):
        app.close()
    lost = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("1 answers" in m and "lost" in m for m in lost), lost
