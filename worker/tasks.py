"""Celery tasks: JSON in, ``rlhf_core.rounds`` does the work, JSON out."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from rlhf_core.redis_server import connect
from rlhf_core.registry import Registry, worker_name
from rlhf_core.settings import get_settings
from worker.celery_app import PING_TASK, TRAIN_TASK, app

log = logging.getLogger(__name__)
_settings = get_settings()

# One base model per worker process, loaded on the first round and kept: loading
# is the slow part of a small round. Rounds run one at a time per process.
_base = None
_base_lock = threading.Lock()

# How often a round that found the lock busy comes back, in case the holder died
# (its lease then runs out within RLHF_LOCK_TTL_S).
BUSY_RETRIES = 3


def base_model():
    global _base
    with _base_lock:
        if _base is None:
            from rlhf_core.modeling import load_base_model

            _base = load_base_model(_settings)
        return _base


@worker_process_init.connect
def _preload_base_model(**_: Any) -> None:
    """Load the base model as soon as a pool process starts (in the background, so the
    worker comes up at once), not when the first round arrives: the first
    vote-to-version wait should not include it. A round that comes first waits on the lock."""

    def load() -> None:
        try:
            base_model()
        except Exception:  # the round will raise it again, with its own report
            log.exception("preloading the base model failed")

    threading.Thread(target=load, name="preload-base-model", daemon=True).start()


_canary_loop = None


@worker_ready.connect
def _start_canary_loop(**_: Any) -> None:
    """Every worker looks at the running canary every RLHF_CANARY_CHECK_S (in the main
    process, beside the pool, so a long round does not delay a rollback). Two workers
    deciding at once is harmless: the registry applies only the first decision."""
    global _canary_loop
    from rlhf_core.canary import CanaryLoop

    _canary_loop = CanaryLoop(_settings).start()


_retention_loop = None


@worker_ready.connect
def _start_retention_loop(**_: Any) -> None:
    """With RLHF_RETENTION_DAYS, old data goes hourly even when no round runs."""
    global _retention_loop
    if _settings.retention_days is not None:
        from rlhf_core.privacy import RetentionLoop

        _retention_loop = RetentionLoop(_settings).start()


@worker_shutdown.connect
def _stop_canary_loop(**_: Any) -> None:
    if _canary_loop is not None:
        _canary_loop.stop()
    if _retention_loop is not None:
        _retention_loop.stop()


_due_loop = None


@worker_ready.connect
def _start_due_round_loop(**_: Any) -> None:
    """Every RLHF_ROUND_CHECK_S, queue a round that is due: one whose worker was killed
    (it re-runs once its lock lease is out, not after Celery's hour-long visibility
    timeout) or one that enough feedback asked for. A Redis claim makes many workers
    queue one round (see rlhf_core.upkeep)."""
    global _due_loop
    from rlhf_core.upkeep import DueRoundLoop

    def send(reason: str) -> None:
        app.send_task(TRAIN_TASK, kwargs={"reason": reason})

    _due_loop = DueRoundLoop(_settings, send).start()


@worker_shutdown.connect
def _stop_due_round_loop(**_: Any) -> None:
    if _due_loop is not None:
        _due_loop.stop()


@app.task(
    name=TRAIN_TASK,
    bind=True,
    acks_late=True,
    soft_time_limit=_settings.round_time_limit_s,
    time_limit=_settings.round_time_limit_s + 120,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=5,
)
def train_round(self, reason: str = "manual") -> dict[str, Any]:
    """Run one training round if no other runs; returns the outcome as JSON."""
    from rlhf_core.rounds import round_is_due, run_round

    settings = _settings
    # Generous socket timeout: the worker waits on nothing interactive, and a
    # slow fsync under load must not fail a round that took minutes.
    client = connect(settings, socket_timeout=30, socket_connect_timeout=10)
    try:
        try:
            outcome = run_round(
                settings, client, base_model, consumer_name=worker_name(), reason=reason
            )
        except SoftTimeLimitExceeded:
            # run_round already recorded the failure and left the events pending.
            return {"status": "failed", "reason": "round exceeded RLHF_ROUND_TIME_LIMIT_S"}
        result = outcome.to_dict()
        if outcome.status == "busy" and self.request.retries < BUSY_RETRIES:
            ttl_ms = client.pttl("rlhf:lock:train")
            raise self.retry(countdown=max(1.0, ttl_ms / 1000 + 1), max_retries=None)
        if outcome.status == "published":
            _prune(settings, client)
        if outcome.status == "published" and round_is_due(settings, client):
            # Feedback arrived during the round: the next round starts right away.
            self.app.send_task(TRAIN_TASK, kwargs={"reason": "backlog"})
        return result
    finally:
        client.close()


def _prune(settings, client) -> None:
    """The stored-adapter cap (RLHF_KEEP_ADAPTERS), after each publish."""
    from rlhf_core.upkeep import prune_adapters

    try:
        prune_adapters(settings, client)
    except Exception:  # a full store is a slow problem; the round itself succeeded
        log.exception("pruning old adapters failed")


@app.task(name=PING_TASK)
def ping() -> dict[str, Any]:
    """Liveness check for tests and `rlhf-chat status`: who answers, what it serves."""
    client = connect(_settings)
    try:
        return {"worker": worker_name(), "current": Registry(client, _settings).current()}
    finally:
        client.close()
