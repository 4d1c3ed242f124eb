"""Housekeeping that keeps a long-running deployment alive and bounded.

- :func:`due_round` -- the workers' periodic check (worker.tasks starts it): a round
  whose worker was killed (``kill -9``, OOM, a lost machine) re-runs as soon as its lock
  lease has run out, without waiting for new feedback or for Celery's visibility timeout
  (which must be longer than the longest round, so it is more than an hour). It also
  queues a round when enough feedback waits but the request that should have started it
  was lost. Celery beat would do the timing, but it is one more process to run and,
  with several workers, would fire once per worker anyway; the Redis claim below makes
  any number of checking workers queue one round.
- :func:`prune_adapters` -- a cap on stored adapters: the newest ``keep_adapters``
  versions keep their weights, so do the current version and the newest reward model;
  an older version keeps its metadata (the Training tab, the events it used) but its
  weights are deleted and it can no longer be rolled back to.
- :func:`prune_adapter_cache` -- the same for a UI's local folder of unpacked adapters.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import redis

from rlhf_core.periodic import PeriodicLoop
from rlhf_core.registry import PREFIX, Registry
from rlhf_core.settings import Settings

log = logging.getLogger(__name__)

# Stages a round writes as its last progress; any other last stage with the lock gone
# and no outcome recorded after it means the round died in the middle.
FINAL_STAGES = ("published", "rejected")
PRUNED = "pruned"


def abandoned_round(registry: Registry) -> dict[str, Any] | None:
    """The progress record of a round that died without recording an outcome, or None.

    A round writes its progress while it holds the training lock and records an outcome
    (published, failed, skipped) before it ends. So: progress whose token no longer holds
    the lock, at a stage that is not final, and no outcome recorded after its last update,
    is a round whose worker was killed."""
    progress = registry.progress()
    if not progress or progress["running"] or progress.get("stage") in FINAL_STAGES:
        return None
    if registry.lock_holder() is not None:
        return None  # another round runs (it will pick up the dead round's events)
    last = registry.last_round()
    if last and float(last.get("at", 0)) >= progress["updated_at"]:
        return None
    return progress


def due_round(settings: Settings, client: redis.Redis) -> str | None:
    """Why a round should be queued now, or None. Cheap: a few Redis reads."""
    from rlhf_core.rounds import round_is_due

    registry = Registry(client, settings)
    if registry.lock_holder() is not None:
        return None
    dead = abandoned_round(registry)
    if dead is not None:
        return f"re-run of round {dead.get('token') or '?'}, stopped at {dead.get('stage')}"
    if round_is_due(settings, client):
        return f"{settings.train_every} new feedback events"
    return None


def request_due_round(settings: Settings, client: redis.Redis, send: Any) -> str | None:
    """Queue a round with ``send(reason)`` when one is due and no other checker (or UI)
    queued one in the last minute. Returns the reason when it queued one."""
    reason = due_round(settings, client)
    if reason is None:
        return None
    registry = Registry(client, settings)
    ttl = max(60.0, 4 * settings.round_check_s, settings.lock_ttl_s * 2)
    if not registry.claim_round_request(ttl_s=ttl):
        return None
    log.warning("queueing a training round: %s", reason)
    send(reason)
    return reason


# ---------------------------------------------------------------- adapters
def kept_versions(registry: Registry, keep: int) -> set[int]:
    """The versions whose adapters must stay: the newest ``keep``, the current one and
    the newest reward model (the next round trains on from both)."""
    versions = registry.versions()
    kept = set(versions[-keep:]) if keep > 0 else set()
    kept.add(registry.current())
    kept.add(registry.latest_reward_version())
    candidate = registry.candidate()  # a canary being measured
    if candidate is not None:
        kept.add(int(candidate["version"]))
    kept.discard(0)
    return kept


def prune_adapters(settings: Settings, client: redis.Redis) -> list[int]:
    """Delete the stored weights of versions beyond the cap; returns the versions pruned."""
    if settings.keep_adapters <= 0:
        return []
    registry = Registry(client, settings)
    kept = kept_versions(registry, settings.keep_adapters)
    pruned = []
    for version in registry.versions():
        if version in kept:
            continue
        key = f"{PREFIX}version:{version}"
        storage, artifact = (
            v.decode() if isinstance(v, bytes) else v
            for v in client.hmget(key, "storage", "artifact")
        )
        if storage in (None, PRUNED):
            continue
        # ``kept`` was read before this loop: a rollback (or a canary) may have picked
        # this version since. The mark checks that in one step with it, and the rollback
        # refuses a version marked pruned.
        if not registry.mark_pruned(version):
            continue
        if storage == "inline":
            client.delete(*(f"{PREFIX}blob:{artifact}:{kind}" for kind in ("policy", "reward")))
        elif storage == "shared":
            shutil.rmtree(settings.resolved_artifact_dir() / artifact, ignore_errors=True)
        pruned.append(version)
    if pruned:
        log.info("pruned the adapters of versions %s (RLHF_KEEP_ADAPTERS=%d)", pruned,
                 settings.keep_adapters)  # fmt: skip
    return pruned


def prune_adapter_cache(
    cache_dir: Path, in_use: set[int], older_than_s: float = 600.0
) -> list[Path]:
    """Delete unpacked adapter folders (``v{N}-{artifact}``) of versions not in use here.
    Only folders untouched for ``older_than_s``: another UI on the same data folder may
    be loading one right now."""
    removed = []
    if not cache_dir.is_dir():
        return removed
    now = time.time()
    for folder in cache_dir.glob("v*-*"):
        try:
            version = int(folder.name[1:].split("-", 1)[0])
        except ValueError:
            continue
        if version in in_use or now - folder.stat().st_mtime < older_than_s:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class DueRoundLoop(PeriodicLoop):
    """A thread in each worker's main process that calls :func:`request_due_round` every
    ``round_check_s`` seconds (beside the pool, so it runs while the pool is busy or
    restarting). ``send(reason)`` queues the round (the worker passes Celery's send_task).
    Errors are logged and retried at the next tick: a worker must not die of them.
    ``RLHF_ROUND_CHECK_S=0`` turns the check off."""

    def __init__(self, settings: Settings, send: Any, client: redis.Redis | None = None) -> None:
        super().__init__(self.tick, settings.round_check_s, "due-rounds", "due-round check")
        self.settings = settings
        self.send = send
        self.client = client

    def tick(self) -> str | None:
        if self.client is None:
            from rlhf_core.redis_server import connect

            self.client = connect(self.settings)
        return request_due_round(self.settings, self.client, self.send)
