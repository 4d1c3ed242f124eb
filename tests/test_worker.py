"""End to end with real parts: Valkey, Celery worker subprocesses, the tiny model.

Each worker is ``python -m worker`` in its own process group, so ``kill -9`` takes
the Celery parent and its pool child down together, as a machine crash would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_core.feedback import FeedbackStore
from rlhf_core.registry import Registry, StaleTokenError
from rlhf_core.rounds import events_consumed
from tests.conftest import tiny_env, wait_for
from tests.test_rounds import post_feedback

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def fast(settings):
    """Rounds as short as they can be while still training for real."""
    # A lease of a few seconds lapsed under load (load average 10) while a round ran.
    return settings.model_copy(update={"reward_epochs": 1, "lock_ttl_s": 10.0})


def worker_env(settings, **extra: str) -> dict[str, str]:
    env = tiny_env(settings)
    env.update(
        RLHF_REWARD_EPOCHS=str(settings.reward_epochs),
        RLHF_LOCK_TTL_S=str(settings.lock_ttl_s),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Worker:
    def __init__(self, settings, name: str, log_dir: Path, **env: str) -> None:
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "-n", f"{name}@%h"],
            cwd=ROOT,
            env=worker_env(settings, **env),
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill -9 reaches the pool child
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture()
def workers(tiny_settings, tmp_path):
    started: list[Worker] = []

    def start(name: str = "w1", settings=None, **env: str) -> Worker:
        worker = Worker(settings or fast(tiny_settings), name, tmp_path, **env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture()
def celery(tiny_settings):
    from worker.celery_app import make_app

    app = make_app(tiny_settings, tiny_settings.redis_url)
    yield app
    app.close()


def send_round(celery, reason: str = "test"):
    from worker.celery_app import TRAIN_TASK

    return celery.send_task(TRAIN_TASK, kwargs={"reason": reason})


def test_kill_9_mid_round_loses_and_doubles_nothing(tiny_settings, redis_client, workers, celery):
    settings = fast(tiny_settings)
    store = FeedbackStore(redis_client)
    registry = Registry(redis_client, settings)
    events = post_feedback(store, 4, "alice") + post_feedback(store, 2, "bob")
    first = workers("doomed", RLHF_DEBUG_ROUND_DELAY_S="30")
    send_round(celery)
    # The round has read the events (they are pending on it) and is in the middle.
    wait_for(lambda: (registry.progress() or {}).get("stage") == "debug delay", 120,
             "the first round to start", first.log)  # fmt: skip
    assert store.pending()["pending"] == 6
    first.kill()
    assert registry.current() == 0 and registry.versions() == []

    second = workers("survivor")
    result = send_round(celery)
    # The dead round's lease runs out (RLHF_LOCK_TTL_S=3); the survivor retries,
    # reclaims the dead consumer's pending entries and publishes.
    outcome = result.get(timeout=240)
    assert outcome["status"] == "published", (outcome, second.tail())
    assert registry.versions() == [1] and registry.current() == 1
    consumed = events_consumed(registry)
    assert sorted(consumed) == sorted(e.event_id for e in events)
    assert all(versions == [1] for versions in consumed.values())
    assert store.pending()["pending"] == 0 and store.counts()["unconsumed"] == 0


def test_a_killed_round_re_runs_without_new_feedback(tiny_settings, redis_client, workers, celery):
    """A worker killed mid-round left its round unacked for Celery's visibility timeout
    (70 minutes): no new version until someone voted again. The workers' due-round check
    now re-queues it once the dead round's lock lease is out."""
    settings = fast(tiny_settings)
    store = FeedbackStore(redis_client)
    registry = Registry(redis_client, settings)
    events = post_feedback(store, 4, "alice")
    first = workers("doomed", RLHF_DEBUG_ROUND_DELAY_S="60", RLHF_ROUND_CHECK_S="2")
    send_round(celery)
    wait_for(lambda: (registry.progress() or {}).get("stage") == "debug delay", 120,
             "the first round to start", first.log)  # fmt: skip
    first.kill()
    killed_at = time.monotonic()
    second = workers("survivor", RLHF_ROUND_CHECK_S="2")  # no task is sent, no new feedback
    wait_for(lambda: registry.versions() == [1], 180, "the round to re-run", second.log)
    assert sorted(events_consumed(registry)) == sorted(e.event_id for e in events)
    assert "re-run of round" in second.tail() or "re-run of round" in str(registry.history())
    print(f"killed round re-ran and published {time.monotonic() - killed_at:.0f} s after kill -9")


def test_two_workers_one_round_and_stale_token_refused(
    tiny_settings, redis_client, workers, celery, tmp_path
):
    settings = fast(tiny_settings)
    store = FeedbackStore(redis_client)
    registry = Registry(redis_client, settings)
    events = post_feedback(store, 4)
    # A slowed round so both workers are surely busy with it at the same time.
    a = workers("a", RLHF_DEBUG_ROUND_DELAY_S="3")
    workers("b", RLHF_DEBUG_ROUND_DELAY_S="3")
    wait_for(lambda: len(celery.control.ping(timeout=1.0)) == 2, 120, "both workers", a.log)
    results = [send_round(celery, "a"), send_round(celery, "b")]
    outcomes = [r.get(timeout=300) for r in results]
    statuses = sorted(o["status"] for o in outcomes)
    # One round ran; the other found it busy and either gave up after a few retries
    # (the running round queues a follow-up itself) or ran after it with nothing left.
    assert statuses in (["busy", "published"], ["published", "skipped"]), (outcomes, a.tail())
    assert registry.versions() == [1]
    assert all(v == [1] for v in events_consumed(registry).values())
    assert len(events_consumed(registry)) == len(events)

    # The finished round's token is stale now: it cannot publish over anything.
    token = registry.get(1)["fencing_token"]
    folder = registry.materialize(1, tmp_path / "cache")
    with pytest.raises(StaleTokenError):
        registry.publish(folder, {}, token)
    lock = registry.lock()
    newer = lock.acquire()
    assert newer > token
    with pytest.raises(StaleTokenError):
        registry.publish(folder, {}, token)
    lock.release()
    assert registry.versions() == [1]


def test_gate_failure_through_the_worker(tiny_settings, redis_client, workers, celery):
    store = FeedbackStore(redis_client)
    registry = Registry(redis_client, tiny_settings)
    post_feedback(store, 4)
    worker = workers("strict", RLHF_KL_BUDGET="0")
    outcome = send_round(celery).get(timeout=240)
    assert outcome["status"] == "failed" and "KL" in outcome["reason"], worker.tail()
    assert registry.current() == 0 and registry.versions() == []
    # The reward model is kept (its own version) and the events it learned from acked.
    assert registry.current_reward() == 1 and store.counts()["unconsumed"] == 0
    assert "KL budget reached: KL" in registry.status_line()


def _text(message) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


def test_feedback_to_new_version_served_without_restart_then_rollback(
    tiny_settings, redis_client, workers
):
    from gradio_client import Client

    from chat_ui.app import serve
    from rlhf_core.redis_server import free_port

    settings = fast(tiny_settings).model_copy(update={"port": free_port()})
    registry = Registry(redis_client, settings)
    worker = workers("w1")
    app = serve(settings, block=False)
    try:
        client = Client(app.url, verbose=False)
        sampling = (1.0, 0.9, 8)
        for i in range(settings.train_every):
            _, answers, _ = client.predict(f"question {i}?", "", *sampling, api_name="/send")[:3]
            assert answers[-1]["version"] == 0
            client.predict(-1, "like" if i % 2 else "dislike", api_name="/vote")
        # The fourth vote made a round due; the UI queued it and a worker runs it.
        wait_for(lambda: registry.current() == 1, 240, "version 1 to be published", worker.log)
        # Every UI follows the registry; this one swaps without a restart.
        wait_for(lambda: client.predict(api_name="/status")["current_version"] == 1, 30,
                 "the UI to serve version 1")  # fmt: skip
        chat, answers, badge = client.predict("after?", "", *sampling, api_name="/send")[:3]
        assert answers[-1]["version"] == 1 and "written by v1" in _text(chat[-1])
        assert "current policy version 1" in badge
        assert app.service.store.get_turn(answers[-1]["turn_id"]).policy_version == 1

        # The Training tab's rollback button, through its API endpoint.
        message = client.predict(0, api_name="/rollback")
        assert "Version 0 is current again" in message and registry.current() == 0
        wait_for(lambda: client.predict(api_name="/status")["current_version"] == 0, 30,
                 "the UI to serve version 0 again")  # fmt: skip
        _, answers, _ = client.predict("and now?", "", *sampling, api_name="/send")[:3]
        assert answers[-1]["version"] == 0
        assert "never published" in client.predict(7, api_name="/rollback")
        assert "must be a number" in client.predict("x", api_name="/rollback")
        assert "finite" in client.predict("inf", api_name="/rollback")  # was an OverflowError
        assert registry.current() == 0
    finally:
        app.close()
