"""The UI's side of training: ask workers for rounds, follow new versions, the Training tab.

- :func:`request_round` / :func:`request_round_if_due` send the ``rlhf.train_round``
  task by name through a Celery client; this package never imports ``worker``.
- :class:`VersionWatcher` keeps a :class:`~rlhf_core.serving.PolicyServer` on the
  registry's current version: a thread subscribed to ``rlhf:versions``, plus a check
  every ``version_poll_s`` so a missed message (a reconnect) is caught. A new adapter
  is loaded beside the old one and then made current; answers in flight finish on
  the version they started with.
- :func:`build_training_tab` lays out the Training tab (call it inside ``gr.Tab``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import redis

from chat_ui import validation
from rlhf_core.datasets import load_feedback, resolve_feedback
from rlhf_core.feedback import FeedbackStore
from rlhf_core.redis_server import discover_url
from rlhf_core.registry import (
    CHANNEL,
    CandidateError,
    Registry,
    UnknownVersionError,
)
from rlhf_core.rounds import round_is_due
from rlhf_core.settings import Settings, get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

SWAP_RETRY_S = 60.0  # a version whose adapter failed to load is tried again after this
TRAIN_TASK = "rlhf.train_round"  # worker/celery_app.py; by name, not by import
TRAIN_QUEUE = "train"

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def celery_client(settings: Settings) -> Any:
    """A Celery app used only to send tasks (one per Redis URL)."""
    from celery import Celery

    url = discover_url(settings)
    if url is None:
        raise RuntimeError(
            "No Redis to send the training request to: set RLHF_REDIS_URL or start the "
            "app with `rlhf-chat up`."
        )
    with _clients_lock:
        if url not in _clients:
            app = Celery("rlhf_chat_client", broker=url, backend=url)
            app.conf.update(
                task_serializer="json",
                accept_content=["json"],
                result_serializer="json",
                task_routes={TRAIN_TASK: {"queue": TRAIN_QUEUE}},
                broker_connection_retry_on_startup=True,
                broker_transport_options={
                    "visibility_timeout": int(settings.round_time_limit_s * 2 + 600)
                },
            )
            _clients[url] = app
        return _clients[url]


def request_round(settings: Settings, reason: str = "manual") -> str:
    """Queue a training round; returns the Celery task id. A worker that finds a
    round already running retries shortly (in case that round's worker died)."""
    result = celery_client(settings).send_task(
        TRAIN_TASK, kwargs={"reason": reason}, queue=TRAIN_QUEUE
    )
    return result.id


def request_round_if_due(
    settings: Settings, store: FeedbackStore | None = None, client: redis.Redis | None = None
) -> str | None:
    """After each feedback event: queue a round when ``train_every`` unconsumed
    events wait and no round runs or is queued. Returns the task id or None.
    Never raises: training is best effort from the chat's point of view."""
    try:
        client = client or (store.redis if store is not None else None)
        if client is None:
            from rlhf_core.redis_server import connect

            client = connect(settings)
        registry = Registry(client, settings)
        if registry.lock_holder() is not None:
            return None  # the running round queues the next one if feedback piled up
        if not round_is_due(settings, client):
            return None
        if not registry.claim_round_request(ttl_s=max(60.0, settings.lock_ttl_s * 2)):
            return None  # one is queued already
        return request_round(settings, reason=f"{settings.train_every} new feedback events")
    except Exception as error:  # a vote must never fail because training could not start
        log.warning("could not request a training round: %s", error)
        return None


# ---------------------------------------------------------------- hot swap


class VersionWatcher:
    """Keep ``server`` on the registry's current version."""

    def __init__(
        self,
        server: Any,
        settings: Settings,
        client: redis.Redis | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.server = server
        self.settings = settings
        self.client = client
        self.cache_dir = cache_dir
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sync_lock = threading.Lock()
        self.last_error: str | None = None
        self._failed: dict[int, tuple[float, str]] = {}  # version -> (when, why) it failed
        self.swaps: list[tuple[int, float]] = []  # (version, time it became current here)
        # The registry's candidate, once its adapter is loaded here (None: no canary).
        self.candidate: dict[str, Any] | None = None

    def version_for(self, user_id: str) -> int | None:
        """The version to serve this user: the candidate for its sticky share while a
        canary is out (and loaded here), else None = the current version."""
        from rlhf_core.canary import version_for

        return version_for(user_id, self.candidate)

    def _client(self) -> redis.Redis:
        if self.client is None:
            from rlhf_core.redis_server import connect

            self.client = connect(self.settings)
        return self.client

    def sync(self) -> int:
        """Bring the server to the current version now; returns the version served."""
        with self._sync_lock:
            registry = Registry(self._client(), self.settings)
            target = registry.current()
            try:
                self._sync_candidate(registry)
                candidate_error = None
            except Exception as error:  # a broken candidate must not block the current one
                candidate_error = error
            if target != self.server.current_version:
                if target != 0:
                    # Loading beside the old adapter first: requests keep being served by
                    # the old version until the new one is ready.
                    self._load(registry, target)
                self.server.set_current(target)
                self.swaps.append((target, time.time()))
                log.info("now serving policy version %d", target)
                self._prune_cache()
            if candidate_error is not None:
                raise candidate_error
            return target

    def _load(self, registry: Registry, version: int) -> None:
        """Load a version's adapter beside the others, read in full first: a corrupt
        adapter fails here, not half-way into the served model (peft injects the LoRA
        layers before it reads the weights). A version that failed is tried again only
        after SWAP_RETRY_S, not at every poll."""
        if version in self.server.loaded_versions:
            return
        failed = self._failed.get(version)
        if failed is not None and time.monotonic() - failed[0] < SWAP_RETRY_S:
            raise RuntimeError(failed[1])
        # Imported here: the CLI imports this module and must not pay for torch.
        from rlhf_core.modeling import forget_materialized, verify_adapter

        folder = None
        try:
            folder = registry.materialize(version, self.cache_dir)
            verify_adapter(folder)
            self.server.load_adapter(version, str(folder))
        except Exception as error:
            why = f"version {version} cannot be served: {type(error).__name__}: {error}"[:500]
            self._failed[version] = (time.monotonic(), why)
            forget_materialized(folder)  # unpacked afresh from the registry next time
            raise RuntimeError(why) from error
        self._failed.pop(version, None)

    def _prune_cache(self) -> None:
        """Unpacked adapters of versions this server no longer holds are deleted."""
        from pathlib import Path

        from rlhf_core.upkeep import prune_adapter_cache

        cache = Path(self.cache_dir or Path(self.settings.data_dir) / "adapters")
        try:
            prune_adapter_cache(cache, set(self.server.loaded_versions))
        except OSError as error:
            log.warning("could not prune %s: %s", cache, error)

    def _sync_candidate(self, registry: Registry) -> None:
        candidate = registry.candidate()
        if candidate is not None and candidate["version"] not in self.server.loaded_versions:
            # Until the new candidate is loaded nobody is routed to a candidate: the one
            # before it may have just been rolled back (a load that fails raises here).
            self.candidate = None
            self._load(registry, candidate["version"])
            log.info("loaded candidate version %d", candidate["version"])
        self.candidate = candidate

    def _safe_sync(self) -> None:
        try:
            self.sync()
            self.last_error = None
        except Exception as error:
            # Any error at all (Redis, a corrupt or truncated adapter, safetensors, PEFT):
            # the old version keeps serving, the thread lives on, the next message or
            # poll tries again, and status and the Training tab show why.
            self.last_error = f"{type(error).__name__}: {error}"[:500]
            log.warning("could not switch policy version: %s", self.last_error)

    def _run(self) -> None:
        url = discover_url(self.settings)
        while not self._stop.is_set():
            pubsub = None
            try:
                # A separate connection without a read timeout: pub/sub waits.
                sub_client = redis.Redis.from_url(
                    url, socket_connect_timeout=self.settings.redis_timeout_s
                )
                pubsub = sub_client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                self._safe_sync()  # anything published before we subscribed
                while not self._stop.is_set():
                    # Returns at a message or after a quiet poll interval: check either way.
                    pubsub.get_message(timeout=self.settings.version_poll_s)
                    self._safe_sync()
            except Exception as error:  # Redis gone, or anything else: never let the thread die
                self.last_error = f"{type(error).__name__}: {error}"[:500]
                log.warning("version watcher: %s; retrying", self.last_error)
                self._stop.wait(self.settings.version_poll_s)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except redis.RedisError:
                        pass

    def start(self) -> VersionWatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="version-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.version_poll_s + 5)
            self._thread = None


def arena_pair(server: Any, watcher: VersionWatcher | None) -> tuple[int, int] | None:
    """The two versions an arena battle compares: the candidate and the current version
    while a canary is out (its picks then count in the decision), else the current
    version and the newest other one loaded here; None when only one is loaded."""
    current = server.current_version
    candidate = watcher.candidate if watcher is not None else None
    loaded = server.loaded_versions
    if candidate and candidate["version"] in loaded and candidate["version"] != current:
        return candidate["version"], current
    others = [v for v in loaded if v != current]
    return (max(others), current) if others else None


# ---------------------------------------------------------------- data for the tab

ACCURACY_KEYS = ("reward/accuracy",)
MEAN_REWARD_KEYS = ("objective/scores", "env/reward_mean", "objective/reward", "reward/mean")
KL_KEYS = ("objective/kl", "objective/kl_final", "policy/kl")


def _first(metrics: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if key in metrics and metrics[key] is not None:
            return float(metrics[key])
    return None


TAB_REFRESH_S = 5.0  # the Training tab's figures are recomputed at most this often
# ...and read from the whole store at most this often: a deletion ("Delete my data", one
# click for anyone) or a chat switched to "don't train" would otherwise make the next
# refresh read every turn and event, or refit the arena's bootstrap (2 s per 20,000
# turns, in the UI's process), as often as a stranger cares to repeat them. Until then
# the tab's 👍 counts and ratings may still hold the votes that went, and a new arena
# pick reaches the leaderboard within this time too (picks also move the mark).
FULL_READ_MIN_S = 60.0
HIDDEN_TAB_STATUS = "The Training tab is for admins on this server (RLHF_TRAINING_TAB=hidden)."


def tab_hidden_from(settings: Settings, admin: bool) -> bool:
    """Whether this visitor gets nothing of the Training tab (RLHF_TRAINING_TAB=hidden)."""
    return not admin and settings.training_tab == "hidden"


class CanaryLooks:
    """:func:`rlhf_core.canary.evaluate` for the Training tab: the running candidate's votes
    are re-read (every event since it started, through the admission rules) at most once
    per ``FULL_READ_MIN_S``, and at once when another candidate is out. Each refresh read
    them all before (every ``TAB_REFRESH_S``, for anyone who posts the handler), however
    many a flood of votes had made them; the worker's canary check decides on its own
    reads, so the tab's figures may be up to a minute behind its decisions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[Any, Any] | None = None
        self._looked: Any = None
        self._at = -math.inf

    def __call__(self, client: redis.Redis, settings: Settings) -> Any:
        from rlhf_core.canary import evaluate

        candidate = Registry(client, settings).candidate()
        key = None if candidate is None else (candidate["version"], candidate["started_at"])
        with self._lock:
            if key != self._key or time.monotonic() - self._at >= FULL_READ_MIN_S:
                looked = None if key is None else evaluate(client, settings)
                if looked is not None:  # the candidate evaluate read, if it changed since
                    key = (looked[0]["version"], looked[0]["started_at"])
                self._looked, self._key, self._at = looked, key, time.monotonic()
            return self._looked


class Snapshot(Generic[T]):
    """The last value of an expensive read, recomputed at most every ``TAB_REFRESH_S``
    seconds, by one caller at a time. Every open Training tab polls, and anyone can
    call the tab's handler over HTTP: callers that arrive while it is recomputed get
    the last value (only the very first callers wait for one)."""

    def __init__(self, compute: Callable[[], T]) -> None:
        self._compute = compute
        self._lock = threading.Lock()
        self._value: T | None = None
        self._at = -math.inf

    def stale(self) -> None:
        """Recompute at the next call (an admin's action changed what it shows)."""
        self._at = -math.inf

    def _fresh(self) -> bool:
        return time.monotonic() - self._at < TAB_REFRESH_S

    def get(self) -> T:
        if self._fresh():
            return self._value  # type: ignore[return-value]  # set before _at
        if not self._lock.acquire(blocking=self._value is None):
            return self._value  # type: ignore[return-value]  # another caller recomputes it
        try:
            if not self._fresh():
                self._value = self._compute()
                self._at = time.monotonic()
            return self._value
        finally:
            self._lock.release()


def thumbs_up_rate(store: FeedbackStore) -> dict[int, tuple[int, int]]:
    """policy version -> (likes, votes) over the final votes people gave its answers.
    Reads all feedback: the Training tab reads it through its Snapshot."""
    # Counts of votes only, shown to admins: the records as stored (no scrubbing).
    turns, events = load_feedback(store, raw=True)
    out: dict[int, list[int]] = {}
    for item in resolve_feedback(turns, events):
        if item.vote is None:
            continue
        counts = out.setdefault(item.turn.policy_version, [0, 0])
        counts[0] += item.vote == "like"
        counts[1] += 1
    return {v: (c[0], c[1]) for v, c in out.items()}


class ThumbsTally:
    """:func:`thumbs_up_rate`, kept up to date instead of read again: each call reads the
    events recorded since the last one and the histories of their turns only, so an open
    Training tab costs what people did in the last seconds, not the size of the store
    (which it read in full every TAB_REFRESH_S: about 2 s at 20,000 turns). Deletions (a
    person's data, retention) show as an events stream shorter than what was counted plus
    what is new; the tally is then read again in full, at most once every
    ``min_full_read_s`` seconds (until then what is new is counted, and the votes that
    went with the deletion may still be). Thread-safe."""

    def __init__(self, store: FeedbackStore, min_full_read_s: float = 0.0) -> None:
        self.store = store
        self.min_full_read_s = min_full_read_s
        self._votes: dict[str, tuple[int, str]] = {}  # turn id -> (its version, final vote)
        self._newest: str | None = None  # the last event counted
        self._length = 0  # the events stream's length when it was counted
        self._read_at = -math.inf  # when the store was last read in full
        self._deleted = False  # events counted before were deleted since that read
        self._lock = threading.Lock()

    def counts(self) -> dict[int, tuple[int, int]]:
        """policy version -> (likes, votes), as :func:`thumbs_up_rate`."""
        with self._lock:
            if self._newest is None:
                self._read_all()
            else:
                length, new = self.store.events_after(self._newest)
                self._deleted |= length != self._length + len(new)
                if self._deleted and time.monotonic() - self._read_at >= self.min_full_read_s:
                    self._newest = None  # if the read below fails, the next call reads all
                    self._read_all()
                else:
                    if new:
                        self._recount({event.turn_id for _, event in new})
                        self._newest = new[-1][0]
                    self._length = length
            out: dict[int, list[int]] = {}
            for version, vote in self._votes.values():
                counts = out.setdefault(version, [0, 0])
                counts[0] += vote == "like"
                counts[1] += 1
            return {v: (c[0], c[1]) for v, c in out.items()}

    def _read_all(self) -> None:
        # The mark first: events recorded while the store is read are counted now and
        # again at the next call (a turn's count is recomputed from its whole history).
        # Nothing is kept until the read succeeds: a mark moved past votes that were not
        # counted would look consistent for good.
        length, newest = self.store.events_mark()
        read_at = time.monotonic()
        turns, events = load_feedback(self.store, raw=True)
        self._votes = {}
        self._set(resolve_feedback(turns, events))
        self._length, self._newest = length, newest or "0-0"
        self._read_at, self._deleted = read_at, False

    def _recount(self, turn_ids: set[str]) -> None:
        turns = self.store.get_turns(turn_ids)
        for gone in turn_ids - turns.keys():
            self._votes.pop(gone, None)
        self._set(resolve_feedback(turns, self.store.events_for_turns(turns)))

    def _set(self, items: Any) -> None:
        for item in items:
            if item.vote is None:
                self._votes.pop(item.turn.turn_id, None)
            else:
                self._votes[item.turn.turn_id] = (item.turn.policy_version, item.vote)


def versions_table(
    client: redis.Redis, settings: Settings, tally: ThumbsTally | None = None
) -> list[dict[str, Any]]:
    """One row per version (0 = base model first): the numbers the tab plots. ``tally``:
    the votes kept up to date (the Training tab's); without one, every vote is read."""
    registry = Registry(client, settings)
    thumbs = tally.counts() if tally is not None else thumbs_up_rate(FeedbackStore(client))
    current = registry.current()
    rows = []
    for meta in [registry.get(0), *registry.history()]:
        version = meta["version"]
        likes, votes = thumbs.get(version, (0, 0))
        metrics = meta.get("metrics", {})
        rows.append(
            {
                "version": version,
                "current": "✓" if version == current else "",
                "parent": meta.get("parent"),
                "published": time.strftime("%H:%M:%S", time.localtime(meta["created_at"]))
                if "created_at" in meta
                else "",
                "feedback used": meta.get("events_used", 0),
                "reward accuracy": _first(metrics, ACCURACY_KEYS),
                "mean reward": _first(metrics, MEAN_REWARD_KEYS),
                "KL": _first(metrics, KL_KEYS),
                "👍 rate": likes / votes if votes else None,
                "votes": votes,
            }
        )
    return rows


def status_markdown(
    client: redis.Redis, settings: Settings, swap_error: str | None = None, public: bool = True
) -> str:
    """The tab's status; ``public``: without a failed round's exception text (admins only)."""
    registry = Registry(client, settings)
    lines = [f"**Serving version {registry.current()}** · {registry.status_line(public=public)}"]
    if swap_error:
        lines.append(f"⚠️ This UI keeps serving its version: {swap_error}")
    progress = registry.progress()
    if progress and progress["running"]:
        lines.append(f"Round in progress: **{progress['stage']}** — {progress['fraction']:.0%}")
    counts = FeedbackStore(client).counts()
    lines.append(
        f"Feedback: {counts['events']} events, {counts['unconsumed']} not yet trained on "
        f"(a round starts at {settings.train_every})."
    )
    return "\n\n".join(lines)


# ---------------------------------------------------------------- live A/B and arena


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def ab_markdown(status: dict[str, Any]) -> str:
    """The canary in words and one table: for the Training tab and `rlhf-chat ab status`."""
    candidate = status.get("candidate")
    if candidate is None:
        share = status.get("canary_share_setting", 0.0)
        lines = [f"**No candidate out**; version {status['current']} serves everyone."]
        lines.append(
            f"The next version that passes the gate becomes a candidate for {share:.0%} of users "
            "(RLHF_CANARY_SHARE)."
            if share > 0
            else "RLHF_CANARY_SHARE is 0: a version that passes the gate is served to "
            "everyone at once (start a canary with `rlhf-chat ab start VERSION --share 0.2`)."
        )
        return "\n\n".join(lines)
    look = status["look"]
    c, b = candidate["version"], candidate["baseline"]
    lines = [
        f"**Candidate v{c}** serves {candidate['share']:.0%} of users, v{b} the rest "
        f"(since {_when(candidate['started_at'])}, started by {candidate['started_by']}).",
        "| version | role | 👍 | votes | 👍 rate | 95% interval (Wilson) |",
        "|---|---|---|---|---|---|",
    ]
    for version, role, prefix in ((c, "candidate", "candidate"), (b, "current", "baseline")):
        low, high = look[f"{prefix}_interval"]
        lines.append(
            f"| v{version} | {role} | {look[f'{prefix}_likes']} | {look[f'{prefix}_votes']} | "
            f"{_pct(look[f'{prefix}_rate'])} | [{low:.2f}, {high:.2f}] |"
        )
    table = "\n".join(lines[1:])
    text = [lines[0], table]
    if look["difference"] is not None:
        low, high = look["interval"]
        text.append(
            f"Difference (candidate − current) {look['difference']:+.3f}, always-valid interval "
            f"[{low:+.3f}, {high:+.3f}], mSPRT p = {look['p_value']:.3g}."
        )
    text.append(f"Now: **{look['action']}** — {look['reason']}.")
    if status.get("queued"):
        text.append(f"Waiting to be the next candidate: v{status['queued'][-1]}.")
    return "\n\n".join(text)


def decision_rows(decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for d in decisions:
        n = d.get("numbers") or {}
        interval = n.get("interval")
        rows.append(
            {
                "when": _when(d["at"]),
                "version": d["version"],
                "against": d.get("baseline"),
                "action": d["action"],
                "by": d.get("by", ""),
                "candidate 👍/votes": f"{n.get('candidate_likes', 0)}/"
                f"{n.get('candidate_votes', 0)}",
                "current 👍/votes": f"{n.get('baseline_likes', 0)}/{n.get('baseline_votes', 0)}",
                "difference": n.get("difference"),
                "interval": f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else "",
                "p": n.get("p_value"),
                "reason": d.get("reason", ""),
            }
        )
    return rows


# redis client -> (the battles' mark, the rows, when they were fitted)
_board_cache: dict[int, tuple[tuple[int, str | None, int], list[dict[str, Any]], float]] = {}


def leaderboard_rows(
    store: FeedbackStore,
    rounds: int = 1000,
    settings: Settings | None = None,
    min_refit_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Bradley-Terry ratings with bootstrap 95% intervals over the arena battles that
    count (``datasets.counted_battles``: picks by people who may train, at most
    RLHF_CANARY_MAX_VOTES_PER_USER of one person's per version). The bootstrap
    refits ``rounds`` times, and the arena stream and its turns are read, only when the
    battles that count may have changed (``FeedbackStore.battles_mark``: a battle recorded
    or deleted, a chat switched to "don't train", turns deleted), and at most once every
    ``min_refit_s`` seconds (the ratings before are given until then)."""
    from rlhf_core.datasets import counted_battles
    from rlhf_core.live_eval import leaderboard

    mark = store.battles_mark()
    cached = _board_cache.get(id(store.redis))
    if cached and (cached[0] == mark or time.monotonic() - cached[2] < min_refit_s):
        return cached[1]
    settings = settings or get_settings()
    battles, _ = counted_battles(
        store, settings, scrub=False, max_per_user=settings.canary_max_votes_per_user
    )
    rows = leaderboard(
        [(b["version_a"], b["version_b"], b["outcome"]) for b in battles], rounds=rounds
    )
    out = [
        {
            "rank": k + 1,
            "version": r["version"],
            "rating": round(r["rating"], 1),
            "95% interval": f"[{r['low']:.0f}, {r['high']:.0f}]",
            "battles": r["battles"],
            "wins": r["wins"],
            "ties": r["ties"],
        }
        for k, r in enumerate(rows)
    ]
    _board_cache[id(store.redis)] = (mark, out, time.monotonic())
    return out


def _frames(rows: list[dict[str, Any]]) -> tuple[Any, Any, Any]:
    import pandas as pd

    table = pd.DataFrame(rows)
    long = []
    for row in rows:
        for metric in ("reward accuracy", "👍 rate", "mean reward", "KL"):
            if row[metric] is not None:
                long.append({"version": row["version"], "metric": metric, "value": row[metric]})
    frame = pd.DataFrame(long or [{"version": 0, "metric": "👍 rate", "value": 0.0}])
    quality = frame[frame["metric"].isin(["reward accuracy", "👍 rate"])]
    policy = frame[frame["metric"].isin(["mean reward", "KL"])]
    return table, quality, policy


# ---------------------------------------------------------------- the tab


def build_training_tab(
    settings: Settings,
    client: redis.Redis | None = None,
    store: FeedbackStore | None = None,
    server: Any = None,
    swap_error: Any = None,
    access: Any = None,
    **_: Any,
) -> dict[str, Any]:
    """The Training tab's layout and listeners; call inside ``with gr.Tab("Training"):``.
    Returns the components by name (tests and the app may wire more to them).

    ``access`` (a chat_ui.access.Access) guards the buttons: only admins may train or
    roll back, checked in the handler whoever calls it; without one (a bare tab in a
    test page) nobody may."""
    import gradio as gr

    if client is None:
        if store is not None:
            client = store.redis
        else:
            from rlhf_core.redis_server import connect

            client = connect(settings)

    import pandas as pd

    from rlhf_core import canary

    feedback = store if store is not None else FeedbackStore(client)

    def is_admin(request: Any) -> bool:
        from chat_ui.access import AccessError

        try:
            return access is not None and access.identify(request).admin
        except AccessError:
            return False

    tally = ThumbsTally(feedback, min_full_read_s=FULL_READ_MIN_S)
    canary_looks = CanaryLooks()

    def tab_data() -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
        # The votes recorded since the last refresh (and every arena battle when one was
        # added): once per TAB_REFRESH_S for all tabs and callers together.
        return (
            versions_table(client, settings, tally),
            canary.status(client, settings, look=canary_looks),
            leaderboard_rows(feedback, settings=settings, min_refit_s=FULL_READ_MIN_S),
        )

    snapshot = Snapshot(tab_data)

    def refresh(request: gr.Request):
        admin = is_admin(request)
        if tab_hidden_from(settings, admin):
            # Hiding the tab in the page is not enough: anyone can post this handler's
            # fn_index, so the numbers are withheld here, where every caller passes.
            return (HIDDEN_TAB_STATUS,) + (gr.skip(),) * 7
        try:
            rows, ab, board = snapshot.get()
            table, quality, policy = _frames(rows)
            problem = swap_error() if swap_error else None
            if problem and not admin:
                # The watcher's error names hosts and paths: admins (and the log) only.
                problem = "the newest version could not be loaded yet"
            return (
                status_markdown(client, settings, problem, public=not admin),
                table,
                quality,
                policy,
                gr.update(choices=[r["version"] for r in rows]),
                ab_markdown(ab),
                pd.DataFrame(decision_rows(ab["decisions"])),
                pd.DataFrame(board),
            )
        except redis.RedisError as error:
            log.warning("training tab: Redis unreachable: %s", error)
            return ("The feedback store is unreachable; retrying…",) + (gr.skip(),) * 7

    def admin_only(request: Any) -> None:
        from chat_ui.access import NOT_ADMIN, AccessError

        try:
            if access is None:
                raise AccessError(NOT_ADMIN)
            access.require_admin(access.identify(request))
        except AccessError as error:
            raise gr.Error(str(error), title="Not allowed") from error

    def train_now(request: gr.Request) -> str:
        admin_only(request)
        try:
            # At most one round waits in the queue, however often the button is pressed:
            # the marker lasts as long as a round may, and a starting round clears it.
            registry = Registry(client, settings)
            if not registry.claim_round_request(ttl_s=settings.round_time_limit_s + 600):
                return "A round is already queued; it starts as soon as a worker is free."
            task_id = request_round(settings, reason="Train now")
        except Exception as error:
            log.warning("Train now: could not queue a round: %s", error)
            return "Could not queue a round: the task queue is unreachable. Try again shortly."
        return f"Round requested (task {task_id[:8]}); progress shows once a worker starts it."

    def ab_decide(action: str, request: gr.Request) -> str:
        admin_only(request)
        try:
            record = canary.override(client, settings, action, by="admin (Training tab)")
        except CandidateError as error:
            return str(error)
        snapshot.stale()  # the admin's next refresh shows the decision
        verb = "is current now" if action == "promote" else "was rolled back"
        return f"Candidate v{record['version']} {verb}; every UI follows within seconds."

    def ab_promote(request: gr.Request) -> str:
        return ab_decide("promote", request)

    def ab_demote(request: gr.Request) -> str:
        return ab_decide("rollback", request)

    def ab_share(share: Any, request: gr.Request) -> str:
        admin_only(request)
        try:
            share = validation.number(share, "The candidate share", lo=0.01, hi=1.0)
            Registry(client, settings).set_candidate_share(share)
        except (CandidateError, ValueError, TypeError) as error:
            return str(error)
        snapshot.stale()
        return f"The candidate now serves {share:.0%} of users."

    def rollback(version: Any, request: gr.Request) -> str:
        admin_only(request)
        if version is None or version == "":
            return "Pick a version to roll back to."
        try:
            version = validation.version(version)
            Registry(client, settings).rollback(version)
        except (validation.InputError, UnknownVersionError) as error:
            return f"{error} Pick a version from the table."
        except redis.RedisError as error:
            log.warning("rollback: Redis unreachable: %s", error)
            return "The feedback store is unreachable; try again in a few seconds."
        snapshot.stale()
        return f"Version {version} is current again; every UI switches within seconds."

    # gradio is imported here, not at the top (CLI commands import this module), so the
    # string annotations above cannot resolve: give Gradio the real class to inject.
    for handler in (refresh, train_now, rollback, ab_decide, ab_promote, ab_demote, ab_share):
        handler.__annotations__["request"] = gr.Request

    status = gr.Markdown("Loading…", elem_id="training-status")
    # Hidden until the page load finds an admin (app.py): others get a read-only tab.
    with gr.Row(visible=False) as controls:
        train_button = gr.Button("Train now", variant="primary", elem_id="train-now")
        version_pick = gr.Dropdown(
            choices=[0], value=None, label="Version", allow_custom_value=True, scale=1
        )
        rollback_button = gr.Button("Roll back to this version", elem_id="rollback")
    action = gr.Markdown("", elem_id="training-action")
    with gr.Row():
        quality_plot = gr.LinePlot(
            x="version", y="value", color="metric", title="Reward accuracy and 👍 rate",
            y_lim=[0, 1], height=260,
        )  # fmt: skip
        policy_plot = gr.LinePlot(
            x="version", y="value", color="metric", title="Mean reward and KL", height=260
        )
    table = gr.Dataframe(label="Versions", interactive=False, elem_id="versions-table")
    gr.Markdown("### Live A/B (canary)")
    ab_box = gr.Markdown("Loading…", elem_id="ab-status")
    with gr.Row(visible=False) as ab_controls:  # admins only, as the row above
        promote_button = gr.Button("Promote candidate", elem_id="ab-promote")
        demote_button = gr.Button("Roll back candidate", elem_id="ab-rollback")
        share_pick = validation.unchecked(
            gr.Number(0.2, label="Candidate share", minimum=0.01, maximum=1.0, step=0.05)
        )
        share_button = gr.Button("Set share", elem_id="ab-share")
    decisions = gr.Dataframe(label="Canary decisions", interactive=False, elem_id="ab-decisions")
    board = gr.Dataframe(
        label="Arena leaderboard (Bradley-Terry, bootstrap 95% intervals)",
        interactive=False, elem_id="leaderboard",
    )  # fmt: skip
    timer = gr.Timer(max(1.0, settings.version_poll_s))

    review = build_review_panel(settings, client, admin_only) if settings.review_rewrites else {}

    outputs = [status, table, quality_plot, policy_plot, version_pick, ab_box, decisions, board]
    quiet: dict[str, Any] = {"queue": False, "api_visibility": "private"}
    timer.tick(refresh, outputs=outputs, show_progress="hidden", **quiet)
    # Named endpoints: gradio_client and scripts press the same buttons a person does.
    train_button.click(train_now, outputs=action, queue=False, api_name="train_now").then(
        refresh, outputs=outputs, **quiet
    )
    rollback_button.click(
        rollback, inputs=version_pick, outputs=action, queue=False, api_name="rollback"
    ).then(refresh, outputs=outputs, **quiet)
    promote_button.click(ab_promote, outputs=action, queue=False, api_name="ab_promote").then(
        refresh, outputs=outputs, **quiet
    )
    demote_button.click(ab_demote, outputs=action, queue=False, api_name="ab_rollback").then(
        refresh, outputs=outputs, **quiet
    )
    share_button.click(
        ab_share, inputs=share_pick, outputs=action, queue=False, api_name="ab_share"
    ).then(refresh, outputs=outputs, **quiet)
    return {
        "status": status,
        "controls": controls,
        "ab_controls": ab_controls,
        "train_now": train_button,
        "version": version_pick,
        "rollback": rollback_button,
        "action": action,
        "table": table,
        "quality_plot": quality_plot,
        "policy_plot": policy_plot,
        "timer": timer,
        "refresh": refresh,
        "ab_status": ab_box,
        "decisions": decisions,
        "leaderboard": board,
        **review,
    }


# ---------------------------------------------------------------- review of rewrites

REVIEW_COLUMNS = ["event_id", "user_id", "prompt", "answer", "rewrite"]


def review_rows(client: redis.Redis, settings: Settings) -> list[list[str]]:
    """The rewrites waiting for a decision, as table rows (texts shortened)."""
    from rlhf_core.privacy import review_queue

    def short(text: Any, n: int = 200) -> str:
        text = text if isinstance(text, str) else str(text)
        return text if len(text) <= n else text[: n - 1] + "…"

    return [
        [short(row[c], 400) if c == "rewrite" else short(row[c]) for c in REVIEW_COLUMNS]
        for row in review_queue(FeedbackStore(client), settings)
    ]


def decide_rewrites(client: redis.Redis, settings: Settings, ids: Any, decision: str) -> str:
    """Approve or drop rewrites by event id (comma or space separated); empty = every
    rewrite waiting now."""
    if ids is not None and not isinstance(ids, str):
        return "Give event ids as text, separated by commas or spaces."
    wanted = [i for i in (ids or "").replace(",", " ").split() if i]
    if not wanted:
        wanted = [row[0] for row in review_rows(client, settings)]
    if not wanted:
        return "No rewrites are waiting for review."
    n = FeedbackStore(client).decide_review(wanted, decision)
    verb = "Approved (they train in the next round)" if decision == "approved" else "Dropped"
    missing = len(wanted) - n
    return f"{verb}: {n} rewrites." + (f" {missing} ids were not found." if missing else "")


def build_review_panel(
    settings: Settings, client: redis.Redis, admin_only: Any = None
) -> dict[str, Any]:
    """With RLHF_REVIEW_REWRITES: rewrites wait here until an admin approves (they
    train) or drops them (they never do). ``admin_only(request)`` raises for anyone
    else: the list shows what other people wrote."""
    import gradio as gr

    def check(request: Any) -> None:
        if admin_only is None:
            raise gr.Error("Only an admin can review rewrites.", title="Not allowed")
        admin_only(request)

    with gr.Accordion("Rewrites waiting for review", open=True, elem_id="review"):
        rows = gr.Dataframe(
            headers=REVIEW_COLUMNS, interactive=False, wrap=True, elem_id="review-table"
        )
        with gr.Row():
            ids = gr.Textbox(
                label="Event ids (comma-separated; empty = all listed)", scale=3,
                elem_id="review-ids",
            )  # fmt: skip
            load = gr.Button("Refresh list", elem_id="review-refresh")
            approve = gr.Button("Approve", variant="primary", elem_id="review-approve")
            drop = gr.Button("Drop", variant="stop", elem_id="review-drop")
        said = gr.Markdown("", elem_id="review-action")

    def refresh_rows(request: gr.Request):
        check(request)
        try:
            return review_rows(client, settings)
        except redis.RedisError as error:
            log.warning("review list: Redis unreachable: %s", error)
            gr.Warning("The feedback store is unreachable; try again in a few seconds.")
            return gr.skip()

    def approve_ids(value: Any, request: gr.Request) -> str:
        check(request)
        return decide_rewrites(client, settings, value, "approved")

    def drop_ids(value: Any, request: gr.Request) -> str:
        check(request)
        return decide_rewrites(client, settings, value, "dropped")

    for handler in (refresh_rows, approve_ids, drop_ids):
        handler.__annotations__["request"] = gr.Request

    quiet: dict[str, Any] = {"queue": False, "api_visibility": "private"}
    load.click(refresh_rows, outputs=rows, api_name="review_list", queue=False)
    approve.click(approve_ids, ids, said, api_name="approve_rewrites", queue=False).then(
        refresh_rows, outputs=rows, **quiet
    )
    drop.click(drop_ids, ids, said, api_name="drop_rewrites", queue=False).then(
        refresh_rows, outputs=rows, **quiet
    )
    return {
        "review_table": rows,
        "review_ids": ids,
        "review_approve": approve,
        "review_drop": drop,
        "review_refresh": load,
        "review_action": said,
    }


# ---------------------------------------------------------------- CLI: train / versions / rollback


def _cli_client(args: Any) -> tuple[Settings, redis.Redis]:
    from chat_ui.__main__ import settings_from
    from rlhf_core.redis_server import connect

    settings = settings_from(args)
    return settings, connect(settings)


def cmd_train(args: Any) -> int:
    settings, client = _cli_client(args)
    task_id = request_round(settings, reason="rlhf-chat train")
    print(f"training round requested (task {task_id})", flush=True)
    if not args.wait:
        return 0
    outcome = celery_client(settings).AsyncResult(task_id).get(timeout=args.timeout)
    print(json.dumps(outcome, indent=2))
    return 0 if outcome.get("status") in ("published", "skipped") else 1


def cmd_versions(args: Any) -> int:
    settings, client = _cli_client(args)
    rows = versions_table(client, settings)
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    print(f"{'':2}{'version':>7} {'parent':>6} {'published':>9} {'events':>6} "
          f"{'rm acc':>6} {'reward':>7} {'KL':>7} {'👍 rate':>7}")  # fmt: skip
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        print(
            f"{'*' if r['current'] else ' ':2}{r['version']:>7} {fmt(r['parent'], '>6')} "
            f"{r['published'] or '-':>9} {r['feedback used']:>6} "
            f"{fmt(r['reward accuracy'], '>6.2f')} {fmt(r['mean reward'], '>7.3f')} "
            f"{fmt(r['KL'], '>7.3f')} {fmt(r['👍 rate'], '>7.2f')}"
        )
    print(Registry(client, settings).status_line(public=False))
    return 0


def cmd_rollback(args: Any) -> int:
    settings, client = _cli_client(args)
    try:
        Registry(client, settings).rollback(args.version)
    except UnknownVersionError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"version {args.version} is current again; running UIs switch within seconds")
    return 0


def cmd_ab(args: Any) -> int:
    from rlhf_core import canary

    settings, client = _cli_client(args)
    registry = Registry(client, settings)
    try:
        if args.action == "status":
            status = canary.status(client, settings)
            if args.json:
                print(json.dumps(status, default=str))
                return 0
            print(ab_markdown(status).replace("**", ""))
            rows = decision_rows(status["decisions"])
            if rows:
                print("\ndecisions (newest first):")
            for r in rows:
                print(
                    f"  {r['when']}  v{r['version']} vs v{r['against']}: {r['action']} by "
                    f"{r['by']}; candidate {r['candidate 👍/votes']}, current "
                    f"{r['current 👍/votes']}, interval {r['interval'] or '-'}; {r['reason']}"
                )
            return 0
        if args.action == "check":
            decision = canary.check(client, settings)
            print(json.dumps(decision, default=str) if decision else "no decision yet")
            return 0
        if args.action in ("promote", "rollback"):
            record = canary.override(client, settings, args.action, by="admin (cli)")
            print(f"candidate v{record['version']}: {args.action} ({record['reason']})")
            if record.get("next_candidate"):
                print(f"v{record['next_candidate']} is the candidate now")
            return 0
        if args.action == "start":
            version = _ab_number(args.value, int)
            if version is None:
                print("say which version: rlhf-chat ab start VERSION [--share 0.2]",
                      file=sys.stderr)  # fmt: skip
                return 2
            share = DEFAULT_CANDIDATE_SHARE if args.share is None else args.share
            registry.start_candidate(version, share, by="admin (cli)")
            print(f"v{version} is the candidate for {share:.0%} of users")
            return 0
        if args.action == "share":
            share = args.share if args.value is None else _ab_number(args.value, float)
            both = args.value is not None and args.share is not None
            if share is None or (both and args.share != share):
                print("say the new share once, between 0 and 1: rlhf-chat ab share 0.5",
                      file=sys.stderr)  # fmt: skip
                return 2
            registry.set_candidate_share(share)
            print(f"the candidate now serves {share:.0%} of users")
            return 0
    except (CandidateError, UnknownVersionError, ValueError) as error:
        print(error, file=sys.stderr)
        return 2
    return 2


def cmd_leaderboard(args: Any) -> int:
    settings, client = _cli_client(args)
    rows = leaderboard_rows(FeedbackStore(client), rounds=args.rounds, settings=settings)
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no arena battles yet (turn on the arena in the Chat tab)")
        return 0
    print(f"{'rank':>4} {'version':>7} {'rating':>7} {'95% interval':>14} {'battles':>7} "
          f"{'wins':>5} {'ties':>5}")  # fmt: skip
    for r in rows:
        print(
            f"{r['rank']:>4} {r['version']:>7} {r['rating']:>7.1f} {r['95% interval']:>14} "
            f"{r['battles']:>7} {r['wins']:>5} {r['ties']:>5}"
        )
    return 0


DEFAULT_CANDIDATE_SHARE = 0.2  # `ab start` without --share


def _ab_number(value: str | None, kind: type) -> Any:
    """``ab``'s positional value as ``kind`` (the version of ``start``, the share of
    ``share``), or None when it is missing or not such a number."""
    try:
        return None if value is None else kind(value)
    except ValueError:
        return None


def _ab_args(parser: Any) -> None:
    parser.add_argument(
        "action",
        choices=["status", "check", "promote", "rollback", "start", "share"],
        help="status: the canary and its numbers; check: decide now if the test can; "
        "promote / rollback: end the canary (admin override); start VERSION: put a version "
        "out as the candidate; share SHARE: change the candidate's share",
    )
    # One positional for both (start VERSION, share SHARE): read per action in cmd_ab.
    parser.add_argument(
        "value", nargs="?", metavar="VERSION|SHARE", help="start: the version; share: the share"
    )
    parser.add_argument(
        "--share",
        type=float,
        default=None,
        help=f"share of users (0-1]; for start, default {DEFAULT_CANDIDATE_SHARE}",
    )
    parser.add_argument("--json", action="store_true", help="status as one JSON object")


def _bootstrap_rounds(text: str) -> int:
    """--rounds: at least one resample (an interval needs one) and at most 100,000 (each
    is a Bradley-Terry fit)."""
    import argparse

    try:
        rounds = int(text)
    except ValueError:
        rounds = 0
    if not 1 <= rounds <= 100_000:
        raise argparse.ArgumentTypeError(f"give a whole number from 1 to 100000, not {text!r}")
    return rounds


def _leaderboard_args(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON list")
    parser.add_argument("--rounds", type=_bootstrap_rounds, default=1000, help="bootstrap rounds")


def _train_args(parser: Any) -> None:
    parser.add_argument("--wait", action="store_true", help="wait for the round and print it")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait")


def _versions_args(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON list")


def _rollback_args(parser: Any) -> None:
    parser.add_argument("version", type=int, help="version to serve again (0 = base model)")


CLI_COMMANDS = [
    ("train", "start a training round now (--wait for its outcome)", _train_args, cmd_train),
    ("versions", "policy versions with their metrics", _versions_args, cmd_versions),
    ("rollback", "make an earlier version current again", _rollback_args, cmd_rollback),
    ("ab", "live A/B of a candidate version: status, promote, rollback, start", _ab_args, cmd_ab),
    ("leaderboard", "arena ratings (Bradley-Terry, 95% intervals)", _leaderboard_args,
     cmd_leaderboard),
]  # fmt: skip
