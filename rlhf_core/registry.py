"""Policy versions in Redis: artifacts, metadata, the current pointer, the training lock.

Everything that several processes must agree on about versions lives here, under
``rlhf:registry:*`` (plus the lock ``rlhf:lock:train``):

- ``version:{n}`` hash: metadata of version ``n`` (parent, time, events used,
  metrics, reward-model version, fencing token, where its adapter lives).
- ``versions`` list: version numbers in publish order; ``next`` the counter.
- ``current``: the version every UI should serve (0 = the base model).
- ``blob:{artifact}:{kind}``: the adapter folder as an uncompressed tar, when it is
  small enough (``inline_artifact_max_mb``); larger ones go to the shared
  ``RLHF_ARTIFACT_DIR`` folder, which every machine must mount.
- ``used`` hash: feedback stream id -> version that trained on it, so that a
  round that crashed between publish and ack cannot count an event twice.
- ``round`` hash: the progress of the round in flight; ``last_round``, ``failures``.
- ``reward:{r}`` hash, ``reward_versions`` list, ``reward_next`` counter and
  ``reward_current``: reward models, versioned on their own. A round whose policy the
  gate refuses for KL still publishes the reward model it trained, so the feedback it
  learned from is not thrown away (and not trained on twice); ``reward_used``, as
  ``used``, records the events each reward version trained on.
- ``trainer_state``: the PPO KL controller after the last round, published or refused:
  a round refused for KL leaves a larger coefficient for the next one.

Publishing is one Lua script: it checks the caller's fencing token against the lock
holder, allocates the version number, writes the metadata, moves the pointer,
marks the events used and announces on ``rlhf:versions`` -- all or nothing, so a
worker killed at any point never leaves a half-published version behind, and a
worker whose lock lease expired (a stale token) cannot publish over a newer round.
Artifacts are written *before* the script under a fresh id (inline blobs with a
TTL that the script removes), so the pointer never names a missing artifact.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis

from rlhf_core.periodic import PeriodicLoop
from rlhf_core.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "rlhf:registry:"
CHANNEL = "rlhf:versions"
LOCK_KEY = "rlhf:lock:train"
LOCK_TOKEN_KEY = "rlhf:lock:train:token"

K_CURRENT = PREFIX + "current"
K_NEXT = PREFIX + "next"
K_VERSIONS = PREFIX + "versions"
K_USED = PREFIX + "used"
# Feedback stream id -> reward version that trained on it: a round refused for KL keeps
# its reward model and acks its events; a worker dying between the two must not leave
# them for the next round's reward model to learn a second time.
K_REWARD_USED = PREFIX + "reward_used"
K_ROUND = PREFIX + "round"
K_LAST_ROUND = PREFIX + "last_round"
K_FAILURES = PREFIX + "failures"
# What visitors read of a round that an exception stopped (its text is for operators).
ROUND_ERROR = "an error stopped it (the operator's log has the details)"
K_POINTER_LOG = PREFIX + "pointer_log"
K_REQUESTED = PREFIX + "round_requested"
# Live A/B (see rlhf_core.canary): the candidate being evaluated, versions that passed
# the gate while it was out, and every decision with its numbers.
K_CANDIDATE = PREFIX + "candidate"
K_CANDIDATE_QUEUE = PREFIX + "candidate_queue"
K_DECISIONS = PREFIX + "decisions"
K_REWARD_NEXT = PREFIX + "reward_next"
K_REWARD_VERSIONS = PREFIX + "reward_versions"
K_REWARD_CURRENT = PREFIX + "reward_current"
K_TRAINER_STATE = PREFIX + "trainer_state"

# A staged inline artifact that was never published (the worker died first)
# expires on its own instead of leaking memory.
STAGED_TTL_S = 24 * 3600
KINDS = ("policy", "reward")


PUBLISH_KEYS = (
    LOCK_KEY, K_CURRENT, K_NEXT, K_VERSIONS, K_USED, K_POINTER_LOG, K_CANDIDATE, K_CANDIDATE_QUEUE
)  # fmt: skip
PUBLISH_REWARD_KEYS = (
    LOCK_KEY, K_REWARD_NEXT, K_REWARD_VERSIONS, K_REWARD_CURRENT, K_CURRENT, K_REWARD_USED
)  # fmt: skip
# What publish() writes as an artifact id (uuid4().hex): anything else read back from
# Redis is refused before it becomes part of a path.
ARTIFACT_RE = re.compile(r"[0-9a-f]{32}")


class ArtifactPathError(ValueError):
    """Registry metadata names an artifact outside the folders it may live in."""


def confined(root: Path, *parts: str) -> Path:
    """``root/parts...``, refused unless it resolves inside ``root`` (values read from
    Redis are not trusted to stay there: ``../`` or an absolute path would escape)."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if not path.is_relative_to(base):
        raise ArtifactPathError(
            f"Refusing artifact path {'/'.join(parts)!r}: it resolves outside {base}. The "
            "registry's metadata in Redis is corrupt or was tampered with; roll back to a "
            "good version (`rlhf-chat rollback N`)."
        )
    return path


def _split_reason(entry: dict[str, Any]) -> bool:
    """Whether a round's record keeps an exception's text out of its ``reason``: every
    record written since ``detail`` exists, and the KL gate's (its text is ours). Older
    records of failures may carry an exception's text in ``reason``."""
    return "detail" in entry or "kl_budget_reached" in entry


class StaleTokenError(RuntimeError):
    """A publish came from a round that no longer holds the training lock."""


class ParentChangedError(StaleTokenError):
    """A round's version was not published: the current version it trained from was
    replaced while it trained (its events go to the next round, as for a stale token,
    unless the round's reward version already recorded them: then they count as trained)."""


def _parent_changed(parent: int | None, holder: str, then: str) -> ParentChangedError:
    """The refusal of a publish (policy or reward) whose round trained from ``parent``
    after ``holder`` became current; ``then`` says what happens to the round's events."""
    return ParentChangedError(
        f"Not published: the round trained from version {parent}, and version {holder} "
        f"became current while it trained (a rollback or a promotion); {then}"
    )


class CandidateError(RuntimeError):
    """A canary operation that does not fit the present state (no candidate, another one)."""


class UnknownVersionError(KeyError):
    """The version asked for was never published."""

    def __str__(self) -> str:  # KeyError quotes its message; say it plainly
        return str(self.args[0]) if self.args else "unknown version"


# KEYS: lock, current, next, versions, used, pointer_log, candidate, candidate_queue
# ARGV: token, meta_json, created_at, version_key_prefix, channel, artifact, storage,
#       canary_share, expected current ('' = any), n_blobs, blob keys..., stream ids...
# Refused ({-2, current}) when the current version is no longer the one the round trained
# from: a rollback or a promotion while it trained must not be undone by its child.
# While a candidate is out, the new version waits in the queue (never two candidates,
# and the baseline does not move under a running comparison). Otherwise, with
# canary_share > 0 it becomes the candidate (served to that share of users), else current.
_PUBLISH = """
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  return {-1, holder or ''}
end
local previous = redis.call('GET', KEYS[2]) or '0'
if ARGV[9] ~= '' and previous ~= ARGV[9] then
  return {-2, previous}
end
local v = redis.call('INCR', KEYS[3])
local share = tonumber(ARGV[8])
local role = 'current'
if redis.call('EXISTS', KEYS[7]) == 1 then
  role = 'queued'
elseif share > 0 then
  role = 'candidate'
end
redis.call('HSET', ARGV[4] .. v, 'version', v, 'meta', ARGV[2], 'created_at', ARGV[3],
           'previous_current', previous, 'fencing_token', ARGV[1],
           'artifact', ARGV[6], 'storage', ARGV[7], 'published_as', role)
redis.call('RPUSH', KEYS[4], v)
if role == 'current' then
  redis.call('SET', KEYS[2], v)
elseif role == 'candidate' then
  redis.call('HSET', KEYS[7], 'version', v, 'baseline', previous, 'share', ARGV[8],
             'started_at', ARGV[3], 'started_by', 'publish')
else
  redis.call('RPUSH', KEYS[8], v)
end
local n_blobs = tonumber(ARGV[10])
for i = 11, 10 + n_blobs do
  redis.call('PERSIST', ARGV[i])
end
for i = 11 + n_blobs, #ARGV do
  redis.call('HSET', KEYS[5], ARGV[i], v)
end
local reason = 'publish'
if role ~= 'current' then
  reason = role
end
local msg = '{"version": ' .. v .. ', "reason": "' .. reason .. '", "at": ' .. ARGV[3] .. '}'
if role == 'current' then
  redis.call('LPUSH', KEYS[6], msg)
  redis.call('LTRIM', KEYS[6], 0, 999)
end
redis.call('PUBLISH', ARGV[5], msg)
return {v, role}
"""

# KEYS: candidate, current, pointer_log, decisions, candidate_queue
# ARGV: expected candidate version, action (promote|rollback), decision json, channel, at,
#       expected started_at ('' = any)
# Compare-and-set on the candidate: of two deciders (two workers, a worker and an
# admin) only the first acts; with started_at, only on the canary that was looked at (the
# same version may have been ended and put out again since). Then the newest queued
# version (if any) becomes the next candidate, against whatever is current now; each older
# one is dropped with a decision entry that says why (an admin reads what became of it).
_DECIDE = """
local version = redis.call('HGET', KEYS[1], 'version')
if version ~= ARGV[1] then
  return {0, version or ''}
end
if ARGV[6] ~= '' and tonumber(redis.call('HGET', KEYS[1], 'started_at')) ~= tonumber(ARGV[6]) then
  return {0, version .. ' (put out again since)'}
end
local share = redis.call('HGET', KEYS[1], 'share')
if ARGV[2] == 'promote' then
  redis.call('SET', KEYS[2], version)
  local msg = '{"version": ' .. version .. ', "reason": "promote", "at": ' .. ARGV[5] .. '}'
  redis.call('LPUSH', KEYS[3], msg)
  redis.call('LTRIM', KEYS[3], 0, 999)
end
redis.call('DEL', KEYS[1])
redis.call('LPUSH', KEYS[4], ARGV[3])
redis.call('LTRIM', KEYS[4], 0, 999)
local nxt = redis.call('RPOP', KEYS[5])
local current = redis.call('GET', KEYS[2]) or '0'
for _, dropped in ipairs(redis.call('LRANGE', KEYS[5], 0, -1)) do
  redis.call('LPUSH', KEYS[4], '{"version": ' .. dropped .. ', "action": "dropped", "at": ' ..
             ARGV[5] .. ', "by": "queue", "baseline": ' .. current .. ', "reason": ' ..
             '"a newer version, v' .. nxt .. ', waited behind the same canary and is the ' ..
             'next candidate"}')
end
redis.call('LTRIM', KEYS[4], 0, 999)
redis.call('DEL', KEYS[5])
if nxt then
  redis.call('HSET', KEYS[1], 'version', nxt, 'baseline', current, 'share', share,
             'started_at', ARGV[5], 'started_by', 'queue')
end
redis.call('PUBLISH', ARGV[4], '{"version": ' .. current .. ', "reason": "' .. ARGV[2] ..
           '", "candidate": ' .. version .. ', "at": ' .. ARGV[5] .. '}')
return {1, nxt or ''}
"""

# KEYS: candidate, current; ARGV: version, version key, share, at, by, channel
_START_CANDIDATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'version')}
end
if redis.call('EXISTS', ARGV[2]) == 0 then
  return {-1, ''}
end
if redis.call('HGET', ARGV[2], 'storage') == 'pruned' then
  return {-3, ''}
end
local current = redis.call('GET', KEYS[2]) or '0'
if current == ARGV[1] then
  return {-2, current}
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'baseline', current, 'share', ARGV[3],
           'started_at', ARGV[4], 'started_by', ARGV[5])
redis.call('PUBLISH', ARGV[6], '{"version": ' .. ARGV[1] .. ', "reason": "candidate", "at": ' ..
           ARGV[4] .. '}')
return {1, ARGV[1]}
"""

# KEYS: candidate; ARGV: share, channel, message. The check and the write in one step: a
# decision landing between them left a candidate hash with a share and no version.
_SET_SHARE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'share', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# KEYS: lock, reward_next, reward_versions, reward_current, current, reward_used
# ARGV: token, meta_json, created_at, reward_key_prefix, artifact, storage,
#       expected current policy ('' = any), n_blobs, blob keys..., stream ids...
# Refused ({-2, current}) like _PUBLISH when the policy the round trained from is no longer
# current: the round's events then stay for the next round, and a reward model kept from
# them would be trained on them a second time (and count them twice in the user window).
_PUBLISH_REWARD = """
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  return {-1, holder or ''}
end
local current = redis.call('GET', KEYS[5]) or '0'
if ARGV[7] ~= '' and current ~= ARGV[7] then
  return {-2, current}
end
local r = redis.call('INCR', KEYS[2])
redis.call('HSET', ARGV[4] .. r, 'version', r, 'meta', ARGV[2], 'created_at', ARGV[3],
           'fencing_token', ARGV[1], 'artifact', ARGV[5], 'storage', ARGV[6])
redis.call('RPUSH', KEYS[3], r)
redis.call('SET', KEYS[4], r)
local n_blobs = tonumber(ARGV[8])
for i = 9, 8 + n_blobs do
  redis.call('PERSIST', ARGV[i])
end
for i = 9 + n_blobs, #ARGV do
  redis.call('HSET', KEYS[6], ARGV[i], r)
end
return {r, ''}
"""

# KEYS: version key, current, candidate; ARGV: version. Marks a version's adapter as
# pruned unless it is current or the candidate now (a rollback or a canary may have picked
# it after the pruner chose what to keep): 1 marked, 0 left alone. The rollback and
# candidate scripts refuse a pruned version, so the two cannot cross.
_MARK_PRUNED = """
local storage = redis.call('HGET', KEYS[1], 'storage')
if not storage or storage == 'pruned' then
  return 0
end
if (redis.call('GET', KEYS[2]) or '0') == ARGV[1]
    or redis.call('HGET', KEYS[3], 'version') == ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'storage', 'pruned')
return 1
"""

# KEYS: current, pointer_log, candidate, decisions, candidate_queue
# ARGV: version, version_key, channel, at
# A running canary ends with it (logged as a decision by the rollback): its candidate was
# measured against a version that no longer serves, and a promotion on those votes would
# undo the rollback. The versions waiting behind it trained from the versions rolled back
# from, as a round's publish is refused then (ParentChangedError): each is dropped with a
# decision entry that says so; `ab start N` puts one out.
_ROLLBACK = """
if ARGV[1] ~= '0' and redis.call('EXISTS', ARGV[2]) == 0 then
  return -1
end
if ARGV[1] ~= '0' and redis.call('HGET', ARGV[2], 'storage') == 'pruned' then
  return -2
end
local previous = redis.call('GET', KEYS[1]) or '0'
redis.call('SET', KEYS[1], ARGV[1])
local candidate = redis.call('HGET', KEYS[3], 'version')
if candidate then
  local action = 'rollback'
  if candidate == ARGV[1] then
    action = 'promote'
  end
  local baseline = redis.call('HGET', KEYS[3], 'baseline') or previous
  redis.call('DEL', KEYS[3])
  redis.call('LPUSH', KEYS[4], '{"version": ' .. candidate .. ', "action": "' .. action ..
             '", "at": ' .. ARGV[4] .. ', "by": "rollback to v' .. ARGV[1] ..
             '", "baseline": ' .. baseline .. ', "reason": "the current version was ' ..
             'rolled back to v' .. ARGV[1] .. ' while the canary ran"}')
end
for _, dropped in ipairs(redis.call('LRANGE', KEYS[5], 0, -1)) do
  redis.call('LPUSH', KEYS[4], '{"version": ' .. dropped .. ', "action": "dropped", "at": ' ..
             ARGV[4] .. ', "by": "rollback to v' .. ARGV[1] .. '", "baseline": ' ..
             previous .. ', "reason": "it waited for a canary and trained from v' ..
             previous .. ', which was rolled back to v' .. ARGV[1] .. '"}')
end
redis.call('LTRIM', KEYS[4], 0, 999)
redis.call('DEL', KEYS[5])
local msg = '{"version": ' .. ARGV[1] .. ', "reason": "rollback", "at": ' .. ARGV[4] .. '}'
redis.call('LPUSH', KEYS[2], msg)
redis.call('LTRIM', KEYS[2], 0, 999)
redis.call('PUBLISH', ARGV[3], msg)
return 1
"""

# KEYS: lock, token counter; ARGV: ttl_ms.  Only INCR when the lock is free, so
# tokens grow by one per round and a busy lock costs nothing.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return nil
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _tar_folder(folder: Path) -> bytes:
    # Uncompressed: safetensors weights barely compress and gzip costs seconds.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(folder)))
    return buf.getvalue()


def _untar(data: bytes, out: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(out, filter="data")


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class TrainingLock:
    """One training round at a time across all machines: a lease in Redis
    (``SET NX PX``) carrying a fencing token from an ``INCR`` counter.

    A background thread renews the lease every ``ttl/3`` while the round runs, so
    a live round keeps it for as long as it needs, and a killed worker gives it up
    ``ttl`` seconds later. ``lost`` turns true when a renewal finds someone else's
    token (the lease expired, e.g. the process was frozen); such a round cannot
    publish anyway, because :meth:`Registry.publish` checks the token.
    """

    def __init__(self, client: redis.Redis, ttl_s: float = 30.0) -> None:
        self.client = client
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token: int | None = None
        self.lost = threading.Event()
        self._renewer: PeriodicLoop | None = None
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> int | None:
        """The fencing token when the lock was free, else None (a round runs)."""
        token = self._acquire(keys=[LOCK_KEY, LOCK_TOKEN_KEY], args=[self.ttl_ms])
        if token is None:
            return None
        self._stop_renewing()
        self.token = int(token)
        self.lost.clear()
        self._renewer = PeriodicLoop(
            self._keep_alive, self.ttl_ms / 3000, "lock-renew", "renewing the training lock"
        ).start()
        return self.token

    def renew(self) -> bool:
        if self.token is None:
            return False
        ok = bool(self._renew(keys=[LOCK_KEY], args=[self.token, self.ttl_ms]))
        if not ok:
            self.lost.set()
        return ok

    def _keep_alive(self) -> None:
        """One renewal, every ttl/3 on the ``lock-renew`` thread."""
        if self.lost.is_set():  # the lease is someone else's: renewing again cannot win it back
            return
        try:
            if not self.renew():
                log.warning("training lock lost (token %s); this round cannot publish", self.token)
        except redis.RedisError as error:  # keep trying: the lease outlives a short blip
            log.warning("could not renew the training lock: %s", error)

    def _stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = None

    def release(self) -> None:
        self._stop_renewing()
        if self.token is not None:
            try:
                self._release(keys=[LOCK_KEY], args=[self.token])
            except redis.RedisError as error:  # the lease expires by itself
                log.warning("could not release the training lock: %s", error)
        self.token = None

    def holder(self) -> int | None:
        value = self.client.get(LOCK_KEY)
        return int(value) if value is not None else None

    def __enter__(self) -> TrainingLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Registry:
    """Policy versions shared by every UI and worker through one Redis."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._publish = client.register_script(_PUBLISH)
        self._publish_reward = client.register_script(_PUBLISH_REWARD)
        self._rollback = client.register_script(_ROLLBACK)
        self._mark_pruned = client.register_script(_MARK_PRUNED)
        self._decide = client.register_script(_DECIDE)
        self._start_candidate = client.register_script(_START_CANDIDATE)
        self._set_share = client.register_script(_SET_SHARE)

    # ------------------------------------------------------------------ lock
    def lock(self, ttl_s: float | None = None) -> TrainingLock:
        return TrainingLock(self.client, ttl_s if ttl_s is not None else self.settings.lock_ttl_s)

    def lock_holder(self) -> int | None:
        value = self.client.get(LOCK_KEY)
        return int(value) if value is not None else None

    # ------------------------------------------------------------- versions
    def current(self) -> int:
        value = self.client.get(K_CURRENT)
        return int(value) if value is not None else 0

    def versions(self) -> list[int]:
        return [int(v) for v in self.client.lrange(K_VERSIONS, 0, -1)]

    def get(self, version: int) -> dict[str, Any]:
        """Metadata of one version (0 = the base model)."""
        if version == 0:
            return {"version": 0, "parent": None, "metrics": {}, "events_used": 0, "base": True}
        fields, meta = self._read_record(
            f"{PREFIX}version:{version}",
            lambda: f"Version {version} was never published; known versions: {self.versions()}",
        )
        meta.update(
            previous_current=int(fields["previous_current"]),
            fencing_token=int(fields["fencing_token"]),
            published_as=fields.get("published_as", "current"),
        )
        meta.setdefault("parent", meta["previous_current"])
        meta.setdefault("reward_version", meta["version"] if "reward" in meta["kinds"] else None)
        return meta

    def history(self) -> list[dict[str, Any]]:
        """Every published version, oldest first, with ``current`` marking the served one."""
        current = self.current()
        out = []
        for version in self.versions():
            meta = self.get(version)
            meta["current"] = version == current
            out.append(meta)
        return out

    def latest_reward_version(self) -> int:
        """The newest version that carries a reward model (0 = none yet). The reward
        model keeps learning across rollbacks of the policy: it only sees feedback."""
        for version in reversed(self.versions()):
            if "reward" in self.get(version)["kinds"]:
                return version
        return 0

    def pointer_log(self, count: int = 50) -> list[dict[str, Any]]:
        """Recent moves of the current pointer (publish and rollback), newest first."""
        return [json.loads(m) for m in self.client.lrange(K_POINTER_LOG, 0, count - 1)]

    def used_by(self, stream_ids: Iterable[str]) -> dict[str, int]:
        """Which of these feedback stream ids a published version already trained on."""
        return self._used_in(K_USED, stream_ids)

    def reward_used_by(self, stream_ids: Iterable[str]) -> dict[str, int]:
        """Which of these feedback stream ids a published reward version trained on."""
        return self._used_in(K_REWARD_USED, stream_ids)

    def _used_in(self, key: str, stream_ids: Iterable[str]) -> dict[str, int]:
        ids = [_text(s) for s in stream_ids]
        if not ids:
            return {}
        values = self.client.hmget(key, ids)
        return {sid: int(v) for sid, v in zip(ids, values, strict=True) if v is not None}

    def forget_stream_ids(self, stream_ids: Iterable[str]) -> int:
        """Drop the record that a version trained on these feedback entries (they were
        deleted: a person's data, or retention). The versions' own metadata keeps only
        random event ids."""
        ids = [_text(s) for s in stream_ids]
        if not ids:
            return 0
        return int(self.client.hdel(K_USED, *ids)) + int(self.client.hdel(K_REWARD_USED, *ids))

    # ------------------------------------------------------------- publish
    def publish(
        self,
        adapter_dir: str | Path,
        metadata: dict[str, Any],
        fencing_token: int,
        *,
        reward_dir: str | Path | None = None,
        stream_ids: Iterable[str] = (),
        canary_share: float = 0.0,
        parent: int | None = None,
    ) -> int:
        """Store the adapter(s), then atomically make them the next current version.

        ``metadata`` is free JSON (parent, events_used, metrics, ...). ``stream_ids``
        are the feedback entries this version trained on; they are marked used in
        the same atomic step. Raises :class:`StaleTokenError` when
        ``fencing_token`` is not the lock's current holder.

        With ``canary_share`` > 0 the version becomes the *candidate* instead (served
        to that share of users until :meth:`decide`). While a candidate is out (also
        one an admin started), a new version waits in the candidate queue whatever the
        share; ``get(v)["published_as"]`` says which.

        ``parent``: the current version the round trained from. When another version
        became current meanwhile (a rollback, a promotion), the publish is refused with
        :class:`ParentChangedError`: its child would undo that decision.
        """
        if not 0.0 <= canary_share <= 1.0:
            raise ValueError(f"canary share must be in [0, 1], got {canary_share}")
        folders = {"policy": Path(adapter_dir)}
        if reward_dir is not None:
            folders["reward"] = Path(reward_dir)
        artifact, inline, blob_keys, total = self._stage(folders, "PeftModel.save_pretrained")
        meta = dict(metadata)
        meta["kinds"] = sorted(folders)
        meta["size_bytes"] = total
        ids = [_text(s) for s in stream_ids]
        meta.setdefault("events_used", len(ids))
        result = self._publish(
            keys=[*PUBLISH_KEYS],
            args=[
                str(fencing_token),
                json.dumps(meta),
                repr(time.time()),
                f"{PREFIX}version:",
                CHANNEL,
                artifact,
                "inline" if inline else "shared",
                repr(float(canary_share)),
                "" if parent is None else str(int(parent)),
                len(blob_keys),
                *blob_keys,
                *ids,
            ],
        )
        version, holder = int(result[0]), _text(result[1])
        if version == -2:
            self._unstage(artifact, blob_keys)
            raise _parent_changed(
                parent,
                holder,
                f"the next round trains from version {holder}. The round's events that its "
                f"reward version recorded count as trained; any others go to the next round.",
            )
        if version < 0:
            self._unstage(artifact, blob_keys)
            raise StaleTokenError(
                f"Refused to publish: fencing token {fencing_token} no longer holds the training "
                f"lock (holder: {holder or 'nobody'}). The round outlived its lease "
                f"(RLHF_LOCK_TTL_S={self.settings.lock_ttl_s}). The round's events that its "
                f"reward version recorded count as trained; any others go to the next round."
            )
        log.info(
            "published version %s as %s (%s, %.1f MB)", version, holder, meta["kinds"],
            total / 2**20,
        )  # fmt: skip
        return version

    def _stage(self, folders: dict[str, Path], saved_with: str) -> tuple[str, bool, list[str], int]:
        """Write the folders under a fresh artifact id, before the publish script that
        makes them visible: inline blobs with a TTL (the script persists them) or the
        shared folder. Returns ``(artifact, inline, blob_keys, total_bytes)``. A folder
        without ``adapter_config.json`` is refused first, naming ``saved_with`` (what
        writes a loadable folder) so the caller knows what to do."""
        for kind, folder in folders.items():
            if not (folder / "adapter_config.json").exists():
                raise FileNotFoundError(
                    f"{kind} adapter folder {folder} has no adapter_config.json; save it with "
                    f"{saved_with} before publishing"
                )
        artifact = uuid.uuid4().hex
        total = sum(_folder_bytes(f) for f in folders.values())
        inline = total <= self.settings.inline_artifact_max_mb * 1024 * 1024
        blob_keys: list[str] = []
        if inline:
            pipe = self.client.pipeline(transaction=True)
            for kind, folder in folders.items():
                key = f"{PREFIX}blob:{artifact}:{kind}"
                pipe.set(key, _tar_folder(folder), ex=STAGED_TTL_S)
                blob_keys.append(key)
            pipe.execute()
        else:
            self._write_shared(artifact, folders)
        return artifact, inline, blob_keys, total

    def _unstage(self, artifact: str, blob_keys: list[str]) -> None:
        # Nothing points at the staged artifact: drop it now rather than at its TTL.
        if blob_keys:
            self.client.delete(*blob_keys)
        else:
            shutil.rmtree(self.settings.resolved_artifact_dir() / artifact, ignore_errors=True)

    # ------------------------------------------------------- reward models
    def publish_reward(
        self,
        reward_dir: str | Path,
        metadata: dict[str, Any],
        fencing_token: int,
        *,
        parent: int | None = None,
        stream_ids: Iterable[str] = (),
    ) -> int:
        """Store a reward model as the next reward version (its own counter, 1, 2, ...)
        and make it the one the next round starts from; ``stream_ids``, the feedback
        entries it trained on, are marked used in the same script (:meth:`used_by`).
        Refused with
        :class:`StaleTokenError` when ``fencing_token`` no longer holds the lock, and with
        :class:`ParentChangedError` when ``parent`` is given and is no longer the current
        policy version (as :meth:`publish` would refuse the policy right after)."""
        artifact, inline, blob_keys, total = self._stage(
            {"reward": Path(reward_dir)}, "RewardModel.save"
        )
        meta = {**metadata, "kinds": ["reward"], "size_bytes": total}
        result = self._publish_reward(
            keys=list(PUBLISH_REWARD_KEYS),
            args=[
                str(fencing_token),
                json.dumps(meta),
                repr(time.time()),
                f"{PREFIX}reward:",
                artifact,
                "inline" if inline else "shared",
                "" if parent is None else str(int(parent)),
                str(len(blob_keys)),
                *blob_keys,
                *(_text(sid) for sid in stream_ids),
            ],
        )
        version, holder = int(result[0]), _text(result[1])
        if version == -2:
            self._unstage(artifact, blob_keys)
            raise _parent_changed(
                parent,
                holder,
                f"its events stay for the next round, which trains from version {holder}.",
            )
        if version < 0:
            self._unstage(artifact, blob_keys)
            raise StaleTokenError(
                f"Refused to publish a reward model: fencing token {fencing_token} no longer "
                f"holds the training lock (holder: {holder or 'nobody'})."
            )
        return version

    def current_reward(self) -> int:
        """The reward version the next round starts from (0 = none published on its own)."""
        value = self.client.get(K_REWARD_CURRENT)
        return int(value) if value is not None else 0

    def reward_versions(self) -> list[int]:
        return [int(v) for v in self.client.lrange(K_REWARD_VERSIONS, 0, -1)]

    def get_reward(self, version: int) -> dict[str, Any]:
        _, meta = self._read_record(
            f"{PREFIX}reward:{version}",
            lambda: (
                f"Reward version {version} was never published; known: {self.reward_versions()}"
            ),
        )
        return meta

    def _read_record(
        self, key: str, missing: Callable[[], str]
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """The fields of a published policy or reward record and its metadata, with the
        fields that both kinds store merged in. ``missing()`` words the error when there is
        no such record (a callable: listing the known versions costs a round trip)."""
        raw = self.client.hgetall(key)
        if not raw:
            raise UnknownVersionError(missing())
        fields = {_text(k): _text(v) for k, v in raw.items()}
        meta = json.loads(fields["meta"])
        meta.update(
            version=int(fields["version"]),
            created_at=float(fields["created_at"]),
            artifact=fields["artifact"],
            storage=fields["storage"],
        )
        return fields, meta

    def materialize_reward(
        self, version: int, local_cache_dir: str | Path | None = None
    ) -> Path | None:
        """A local folder holding reward version ``version`` (None for 0)."""
        if version == 0:
            return None
        meta = self.get_reward(version)
        return self._materialize_artifact(
            meta["artifact"], meta["storage"], "reward", f"r{version}", local_cache_dir
        )

    def trainer_state(self) -> dict[str, Any] | None:
        """The KL controller state the last round left (published or refused)."""
        raw = self.client.get(K_TRAINER_STATE)
        return json.loads(raw) if raw else None

    def set_trainer_state(self, state: dict[str, Any]) -> None:
        self.client.set(K_TRAINER_STATE, json.dumps(state))

    def _write_shared(self, artifact: str, folders: dict[str, Path]) -> None:
        root = self.settings.resolved_artifact_dir()
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{artifact}"
        for kind, folder in folders.items():
            shutil.copytree(folder, tmp / kind)
        # rename is atomic: readers never see a half-copied artifact folder.
        tmp.rename(root / artifact)

    def rollback(self, version: int) -> int:
        """Make an earlier version (or 0, the base model) current again and announce it.
        A running canary ends with it, its queue too (see _ROLLBACK)."""
        ok = self._rollback(
            keys=[K_CURRENT, K_POINTER_LOG, K_CANDIDATE, K_DECISIONS, K_CANDIDATE_QUEUE],
            args=[int(version), f"{PREFIX}version:{int(version)}", CHANNEL, repr(time.time())],
        )
        if int(ok) == -2:  # checked in the script: a prune cannot slip in between
            raise UnknownVersionError(
                f"Cannot roll back to version {version}: its adapter was deleted to keep the "
                f"store bounded (RLHF_KEEP_ADAPTERS={self.settings.keep_adapters}). "
                f"Versions with adapters: {self.versions()[-self.settings.keep_adapters :]}"
            )
        if int(ok) < 0:
            raise UnknownVersionError(
                f"Cannot roll back to version {version}: it was never published. "
                f"Known versions: {self.versions() or 'none (0 = base model)'}"
            )
        return int(version)

    def mark_pruned(self, version: int) -> bool:
        """Mark ``version``'s adapter as deleted, in one step with the check that it is
        neither current nor the candidate; False when it is (or has no adapter to
        delete). Mark first, delete after: a reader then says "pruned", not "missing"."""
        return bool(
            self._mark_pruned(
                keys=[f"{PREFIX}version:{int(version)}", K_CURRENT, K_CANDIDATE],
                args=[int(version)],
            )
        )

    # ------------------------------------------------------------ canary
    def candidate(self) -> dict[str, Any] | None:
        """The version under live evaluation: {version, baseline, share, started_at,
        started_by}, or None when no canary is out."""
        raw = self.client.hgetall(K_CANDIDATE)
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return {
            "version": int(fields["version"]),
            "baseline": int(fields["baseline"]),
            "share": float(fields["share"]),
            "started_at": float(fields["started_at"]),
            "started_by": fields.get("started_by", ""),
        }

    def candidate_queue(self) -> list[int]:
        """Versions that passed the gate while a candidate was out, oldest first; the
        newest becomes the next candidate when the current one is decided."""
        return [int(v) for v in self.client.lrange(K_CANDIDATE_QUEUE, 0, -1)]

    def start_candidate(self, version: int, share: float, by: str = "admin") -> None:
        """Put a published version (e.g. an older one, or the same adapter published
        twice) out as the candidate, against the current version."""
        if not 0.0 < share <= 1.0:
            raise ValueError(f"The canary share must be in (0, 1], got {share}.")
        code, detail = self._start_candidate(
            keys=[K_CANDIDATE, K_CURRENT],
            args=[int(version), f"{PREFIX}version:{int(version)}", repr(float(share)),
                  repr(time.time()), by, CHANNEL],
        )  # fmt: skip
        code = int(code)
        if code == 0:
            raise CandidateError(
                f"Version {_text(detail)} is already the candidate; promote or roll it back "
                "first (`rlhf-chat ab promote` / `rlhf-chat ab rollback`)."
            )
        if code == -1:
            raise UnknownVersionError(
                f"Version {version} was never published; known versions: {self.versions()}"
            )
        if code == -2:
            raise CandidateError(f"Version {version} is already current; pick another version.")
        if code == -3:
            raise UnknownVersionError(
                f"Version {version}'s adapter was deleted to keep the store bounded "
                f"(RLHF_KEEP_ADAPTERS={self.settings.keep_adapters}); pick a newer version."
            )

    def set_candidate_share(self, share: float) -> None:
        """Change the share of users the running candidate serves."""
        if not 0.0 < share <= 1.0:
            raise ValueError(f"The canary share must be in (0, 1], got {share}.")
        message = json.dumps({"reason": "share", "share": share})
        if not self._set_share(keys=[K_CANDIDATE], args=[repr(float(share)), CHANNEL, message]):
            raise CandidateError("No candidate is out; nothing to change.")

    def decide(
        self,
        version: int,
        action: str,
        record: dict[str, Any],
        started_at: float | None = None,
    ) -> int | None:
        """End the canary of ``version``: 'promote' makes it current, 'rollback' keeps
        the current version. ``record`` (the numbers behind the decision, who decided)
        goes into the decisions log. Returns the next candidate started from the
        queue (or None); raises CandidateError when ``version`` is not the candidate
        (someone else decided first), or, given the ``started_at`` of the canary the
        decision was made on, when that canary ended and the version was put out again."""
        if action not in ("promote", "rollback"):
            raise ValueError(f"action must be 'promote' or 'rollback', got {action!r}")
        at = time.time()
        entry = {"version": int(version), "action": action, "at": at, **record}
        ok, detail = self._decide(
            keys=[K_CANDIDATE, K_CURRENT, K_POINTER_LOG, K_DECISIONS, K_CANDIDATE_QUEUE],
            args=[int(version), action, json.dumps(entry, default=float), CHANNEL, repr(at),
                  "" if started_at is None else repr(float(started_at))],
        )  # fmt: skip
        detail = _text(detail)
        if int(ok) == 0:
            raise CandidateError(
                f"Version {version} is not the candidate (now: {detail or 'none'}); "
                "nothing was changed."
            )
        log.info("canary of version %s: %s (%s)", version, action, record.get("reason", ""))
        return int(detail) if detail else None

    def decisions(self, count: int = 50) -> list[dict[str, Any]]:
        """Canary decisions, newest first, each with its numbers."""
        return [json.loads(m) for m in self.client.lrange(K_DECISIONS, 0, count - 1)]

    # ----------------------------------------------------------- artifacts
    def materialize(
        self, version: int, local_cache_dir: str | Path | None = None, kind: str = "policy"
    ) -> Path | None:
        """A local folder that ``PeftModel.from_pretrained`` loads, or None for version 0.

        Inline artifacts are unpacked once into ``local_cache_dir`` (default
        ``<data_dir>/adapters``); shared ones are read where they are.
        """
        if version == 0:
            return None
        meta = self.get(version)
        if kind not in meta["kinds"]:
            return None
        if meta["storage"] == "pruned":
            raise FileNotFoundError(
                f"Version {version}'s adapters were deleted to keep the store bounded "
                f"(RLHF_KEEP_ADAPTERS={self.settings.keep_adapters}); only its metadata remains."
            )
        return self._materialize_artifact(
            meta["artifact"], meta["storage"], kind, f"v{version}", local_cache_dir
        )

    def _materialize_artifact(
        self,
        artifact: str,
        storage: str,
        kind: str,
        label: str,
        local_cache_dir: str | Path | None,
    ) -> Path:
        version = label
        if kind not in KINDS or not ARTIFACT_RE.fullmatch(artifact):
            raise ArtifactPathError(
                f"Version {version} names artifact {artifact!r} ({kind!r}), which publish() "
                "never writes; the registry in Redis is corrupt or was tampered with. Roll "
                "back to a good version (`rlhf-chat rollback N`)."
            )
        if storage == "shared":
            folder = confined(self.settings.resolved_artifact_dir(), artifact, kind)
            if not (folder / "adapter_config.json").exists():
                raise FileNotFoundError(
                    f"Version {version} lives in the shared artifact folder {folder}, which "
                    "this machine cannot read. Mount the same RLHF_ARTIFACT_DIR on every machine."
                )
            return folder
        cache = Path(local_cache_dir or Path(self.settings.data_dir) / "adapters")
        out = confined(cache, f"{label}-{artifact}", kind)
        if (out / "adapter_config.json").exists():
            return out
        data = self.client.get(f"{PREFIX}blob:{artifact}:{kind}")
        if data is None:
            raise FileNotFoundError(f"Version {version}'s {kind} adapter is missing from Redis")
        tmp = out.with_name(f".{kind}.tmp{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _untar(data, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another thread unpacked it first: theirs is just as good
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    # ------------------------------------------------- round status/progress
    def set_progress(
        self, stage: str, fraction: float, token: int | None = None, **extra: Any
    ) -> None:
        """What the round in flight is doing, for the Training tab."""
        fields = {
            "stage": stage,
            "fraction": f"{max(0.0, min(1.0, float(fraction))):.4f}",
            "updated_at": repr(time.time()),
            "token": "" if token is None else str(token),
            "worker": worker_name(),
            **{k: json.dumps(v) for k, v in extra.items()},
        }
        self.client.hset(K_ROUND, mapping=fields)

    def clear_progress(self) -> None:
        self.client.delete(K_ROUND)

    def progress(self) -> dict[str, Any] | None:
        """The round in flight: stage, fraction, updated_at, token; None when idle.

        ``running`` is true only while the round's lock is still held, so a worker
        killed mid-round shows as stopped once its lease runs out.
        """
        raw = self.client.hgetall(K_ROUND)
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        out: dict[str, Any] = dict(fields)
        out["fraction"] = float(fields.get("fraction", 0) or 0)
        out["updated_at"] = float(fields.get("updated_at", 0) or 0)
        holder = self.lock_holder()
        out["running"] = holder is not None and fields.get("token") == str(holder)
        return out

    def claim_round_request(self, ttl_s: float = 60.0) -> bool:
        """True for the first caller to ask for an automatic round; later callers
        within ``ttl_s`` (or until a round starts) are told one is already queued."""
        return bool(self.client.set(K_REQUESTED, worker_name(), nx=True, px=int(ttl_s * 1000)))

    def clear_round_request(self) -> None:
        self.client.delete(K_REQUESTED)

    def record_round(
        self, status: str, reason: str = "", detail: str | None = None, **details: Any
    ) -> None:
        """The outcome of a round: 'published', 'failed' (gate or error) or 'skipped'.
        ``reason`` is our own words, shown to everyone (the gate's, a skip's); ``detail`` is
        an exception's text, which can name paths, hosts and ports: operators and admins
        only (``status_line(public=False)``)."""
        entry = {"status": status, "reason": reason, "detail": detail, "at": time.time(), **details}
        pipe = self.client.pipeline(transaction=True)
        pipe.set(K_LAST_ROUND, json.dumps(entry))
        if status == "failed":
            pipe.lpush(K_FAILURES, json.dumps(entry))
            pipe.ltrim(K_FAILURES, 0, 99)
        pipe.execute()

    def record_failure(self, reason: str, detail: str | None = None, **details: Any) -> None:
        self.record_round("failed", reason, detail, **details)

    def last_round(self) -> dict[str, Any] | None:
        raw = self.client.get(K_LAST_ROUND)
        return json.loads(raw) if raw else None

    def failures(self, count: int = 20) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.client.lrange(K_FAILURES, 0, count - 1)]

    def status_line(self, public: bool = True) -> str:
        """One line for the Training tab (``public``: a failed round's exception text left
        out) and for ``rlhf-chat status`` and admins (``public=False``)."""
        parts = [f"current version {self.current()}"]
        candidate = self.candidate()
        if candidate is not None:
            parts.append(
                f"candidate version {candidate['version']} serving {candidate['share']:.0%}"
            )
        progress = self.progress()
        if progress and progress["running"]:
            parts.append(f"round running: {progress['stage']} {progress['fraction']:.0%}")
        last = self.last_round()
        if last:
            reason = last["reason"]
            if last["status"] == "failed" and not public and last.get("detail"):
                reason = last["detail"]
            elif last["status"] == "failed" and public and not _split_reason(last):
                reason = ROUND_ERROR
            if last["status"] == "failed" and last.get("kl_budget_reached"):
                # Said plainly: rounds keep training the reward model, the policy stays.
                parts.append(f"KL budget reached: {reason}")
            elif last["status"] == "failed":
                parts.append(f"last round failed: {reason}")
            elif last["status"] == "published":
                role = last.get("role", "current")
                as_what = "" if role == "current" else f" as {role}"
                parts.append(f"last round published version {last.get('version')}{as_what}")
            else:
                parts.append(f"last round {last['status']}: {reason}")
        return "; ".join(parts)
