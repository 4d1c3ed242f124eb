"""Turn and event records, and the Redis-streams store that keeps them.

This is the only module that knows the feedback keys (all under ``rlhf:``):

- ``rlhf:turn:{turn_id}``           the Turn as UTF-8 JSON, written once (SET NX).
- ``rlhf:turns``                    stream: index of turn ids in the order they were written.
- ``rlhf:session_turns:{session}``  list: the turn ids of one chat session, in order.
- ``rlhf:events``                   stream: every reaction (Event); consumer group ``trainers``.
- ``rlhf:event_seen:{event_id}``    idempotency marker; its value is the event's stream id.
- ``rlhf:turn_events:{turn_id}``    list: stream ids of the events on one turn, in order.
- ``rlhf:events:invalid``           stream: entries that could not be decoded (kept for a person).
- ``rlhf:arena``                    stream: arena battles (two versions, one message, a pick).
- ``rlhf:battle_seen:{battle_id}``  idempotency marker of a battle's pick.
- ``rlhf:consent``                  hash: turn id -> "0"/"1", the chat's "don't train" switch as
                                    last set (overrides the records' ``may_train``, never their
                                    ``consent``).
- ``rlhf:consent_epoch``            counter: +1 whenever written turns change whether they may
                                    train (the switch, a deletion); caches read it.
- ``rlhf:review``                   hash: event id -> "approved" / "dropped" (rewrite review).
- ``rlhf:held``                     sorted set: stream ids of events acked but held back, scored
                                    by when they may train (+inf: waiting for review).
- ``rlhf:accounts``                 hash: user id -> when its first turn or event was written.
- ``rlhf:forgotten``                hash: sha256(user id) -> when that user's data was deleted;
                                    a turn of theirs made before then is refused.
- ``rlhf:forgotten_recent:{sha256}`` the same for a user who had nothing stored when they asked,
                                    expiring after ``SHORT_TOMBSTONE_S`` (see :meth:`tombstone`).
- ``rlhf:user_data:{user_id}``      hash: everything stored of one user, so that deleting it costs
                                    what they wrote, not the size of the store:
                                    ``t:<turn id>`` -> its ``rlhf:turns`` id, ``e:<stream id>`` ->
                                    the turn of an event they made, ``b:<stream id>`` -> the
                                    battle id of an arena pick of theirs.
- ``rlhf:user_index``               "1" once every record is in the per-user hashes (written when
                                    the first turn goes into an empty store, or by
                                    :meth:`FeedbackStore.ensure_user_index` for an older store).

Every write is one Lua script, so a crash (of the client or of the server: the
embedded server logs each script's effects as one MULTI/EXEC block with
``appendfsync always``) never leaves a marker without its event or an index
without its record.

Delivery to training is at-least-once through the consumer group: a worker
reads with :meth:`FeedbackStore.read_unconsumed`, does the work, makes it
durable (publishes the version), and only then calls :meth:`FeedbackStore.ack`.
Entries of a worker that died are reclaimed by the next one with XAUTOCLAIM.
The streams shrink only by :meth:`FeedbackStore.delete_turns` (a person's
"delete my data", ``rlhf-chat forget``, and retention; see rlhf_core/privacy.py),
which removes a turn with every event on it, its indexes and markers, in one
script; retention never picks a turn with an entry still pending or held.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
import numbers
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar, get_args

import redis
from redis.exceptions import ResponseError

from rlhf_core.redis_server import RedisUnavailableError

log = logging.getLogger(__name__)

PREFIX = "rlhf:"
TURNS_STREAM = f"{PREFIX}turns"
EVENTS_STREAM = f"{PREFIX}events"
INVALID_STREAM = f"{PREFIX}events:invalid"
ARENA_STREAM = f"{PREFIX}arena"
CONSENT_KEY = f"{PREFIX}consent"
CONSENT_EPOCH_KEY = f"{PREFIX}consent_epoch"
REVIEW_KEY = f"{PREFIX}review"
HELD_KEY = f"{PREFIX}held"
ACCOUNTS_KEY = f"{PREFIX}accounts"
FORGOTTEN_KEY = f"{PREFIX}forgotten"
USER_INDEX_READY = f"{PREFIX}user_index"
# How long a deletion of a user who had nothing stored is remembered. It only guards
# against an answer another UI replica kept in memory while Redis was unreachable and
# flushes late (this replica's own are dropped by the handler); one such mark per
# request, so it must expire: a stranger can ask for a fresh cookie's deletion at the
# per-IP rate (an hour of that is ~15,000 small keys).
SHORT_TOMBSTONE_S = 3600
GROUP = "trainers"
REVIEW_DECISIONS: tuple[str, ...] = ("approved", "dropped")

EventKind = Literal["like", "dislike", "unvote", "rewrite", "regenerate", "undo"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)
# Kinds that carry an opinion about the answer; "undo" retracts the last of these.
VOTE_KINDS: tuple[str, ...] = ("like", "dislike", "unvote")

# Entries a consumer has held this long without acking are treated as abandoned
# (its worker died) and reclaimed by the next reader. Without the train lock a
# live but slow round could lose its entries to another reader this way, so
# readers that do not hold the lock should keep it longer than a round; a
# reader holding the lock can pass 0 (every pending entry is from a round that is over).
DEFAULT_MIN_IDLE_MS = 60_000


def turn_key(turn_id: str) -> str:
    return f"{PREFIX}turn:{turn_id}"


def seen_key(event_id: str) -> str:
    return f"{PREFIX}event_seen:{event_id}"


def session_turns_key(session_id: str) -> str:
    return f"{PREFIX}session_turns:{session_id}"


def turn_events_key(turn_id: str) -> str:
    return f"{PREFIX}turn_events:{turn_id}"


def battle_seen_key(battle_id: str) -> str:
    return f"{PREFIX}battle_seen:{battle_id}"


def user_data_key(user_id: str) -> str:
    return f"{PREFIX}user_data:{user_id}"


def recent_tombstone_key(user_id: str) -> str:
    return f"{PREFIX}forgotten_recent:{user_hash(user_id)}"


# The votes an arena pick stands for have ids "arena:<battle id>:<side>" (Battle.events);
# event ids are made by the server, never taken from a client, so the prefix is trusted.
ARENA_EVENT_PREFIX = "arena:"


def arena_pick(event_id: str) -> tuple[str, str] | None:
    """(battle id, side "a" or "b") of a vote that an arena pick stands for; None for
    any other event. Datasets pair the two sides of one battle with each other only."""
    if not event_id.startswith(ARENA_EVENT_PREFIX):
        return None
    battle_id, _, side = event_id[len(ARENA_EVENT_PREFIX) :].rpartition(":")
    return (battle_id, side) if battle_id and side in ("a", "b") else None


def user_hash(user_id: str) -> str:
    """What the store keeps of a forgotten user: a digest, not the id itself."""
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()


def new_id() -> str:
    """A fresh random id for a turn or an event. The UI should make the event id
    when the click happens, so a retried write of the same click stays one event."""
    return uuid.uuid4().hex


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


class FeedbackError(ValueError):
    """A record is malformed or refers to something that does not exist."""


class UnknownTurnError(FeedbackError):
    """An event names a turn that was never written."""


class FeedbackUnavailable(RedisUnavailableError, redis.exceptions.ConnectionError):
    """Redis could not be reached; nothing was written. Both a RuntimeError (like
    RedisUnavailableError) and a redis ConnectionError, so either catch works."""


def _server_name(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


F = TypeVar("F", bound=Callable[..., Any])


def _surface_unavailable(method: F) -> F:
    """Turn connection errors and timeouts into FeedbackUnavailable with a message
    a person can act on. Works for plain methods and generator methods."""

    def wrap(self: FeedbackStore, exc: Exception) -> FeedbackUnavailable:
        return FeedbackUnavailable(
            f"Redis at {_server_name(self.redis)} is unreachable ({type(exc).__name__}: {exc}); "
            "the feedback store could not complete the request and nothing was half-written. "
            "Check that the server runs (`rlhf-chat up` starts the embedded one; otherwise "
            "check RLHF_REDIS_URL) and try again."
        )

    errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def gen_wrapper(self: FeedbackStore, *args: Any, **kwargs: Any) -> Any:
            try:
                yield from method(self, *args, **kwargs)
            except FeedbackUnavailable:
                raise
            except errors as exc:
                raise wrap(self, exc) from exc

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(self: FeedbackStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except FeedbackUnavailable:
            raise
        except errors as exc:
            raise wrap(self, exc) from exc

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------


def clean_text(value: str) -> str:
    """Replace lone UTF-16 surrogates (U+D800..U+DFFF) by U+FFFD.

    They are not characters: UTF-8 cannot encode them, strict JSON parsers and
    tokenizers reject them, and a browser never sends them in valid text. They
    can still reach us through JSON escapes ("\\ud800"). Replacing them, rather
    than refusing the record, means a turn the model already answered is never
    lost over one bad code point. Everything else (emoji, ZWJ sequences, RTL
    and bidi controls, combining marks, NUL and other control characters)
    is kept exactly."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)


def _clean(value: Any) -> Any:
    """clean_text applied through nested JSON-like data (dict keys included)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k) if isinstance(k, str) else k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _to_json(data: dict[str, Any], what: str) -> str:
    try:
        # allow_nan=False: NaN/Infinity are not JSON and would break other readers.
        return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise FeedbackError(
            f"{what} cannot be stored as JSON ({exc}); pass only strings, numbers, booleans, "
            "None, lists and dicts (finite numbers only)."
        ) from exc


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def _require_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise FeedbackError(f"{name} must be true or false, got {value!r}.")


def _require_record(data: Any, what: str) -> None:
    if not isinstance(data, dict):
        raise FeedbackError(f"A stored {what} must be a JSON object, got {type(data).__name__}.")


def _require_id(value: Any, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise FeedbackError(f"{name} must be a non-empty string, got {value!r}.")


@dataclass
class Turn:
    """A finished answer, with everything needed to learn from it later."""

    turn_id: str
    session_id: str
    user_id: str
    messages: list[dict[str, Any]]  # full context incl. system, excluding the answer
    answer: str
    policy_version: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    created_at: float = field(default_factory=time.time)
    parent_turn_id: str | None = None  # set for a regenerate: the turn it replaces
    # Whether the answer ended with EOS. False: it was cut (at max_new_tokens, or
    # stopped), and training must score and imitate it as cut. Records written before
    # this field existed read as True, which is what training assumed of them.
    finished: bool = True
    # False: the person said "don't use this chat for training" (or may not train at
    # all); the turn and every event on it stay out of training and exports, unless the
    # chat is switched back on later (FeedbackStore.set_training).
    may_train: bool = True
    # False: the person who wrote it may not train at all (chat_ui.access.may_train: an
    # anonymous visitor of a public UI). Unlike may_train no switch changes it: turning a
    # chat's switch off and on again must not make an anonymous visitor's chat train.
    consent: bool = True

    def __post_init__(self) -> None:
        for name in ("turn_id", "session_id", "user_id"):
            _require_id(getattr(self, name), name)
        _require_bool(self.may_train, "Turn.may_train")
        _require_bool(self.consent, "Turn.consent")
        if not isinstance(self.messages, list) or not all(
            # Text: the model is a text model, serving renders text, and every round
            # encodes these. None, a number or a list of parts (a multimodal template's
            # form, which SmolLM's template cannot render) failed every round's encoding.
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in self.messages
        ):
            raise FeedbackError(
                "Turn.messages must be a list of {'role': str, 'content': str} dicts "
                f"(the chat context before the answer); got {self.messages!r:.200}."
            )
        if not isinstance(self.answer, str):
            raise FeedbackError(f"Turn.answer must be a string, got {type(self.answer).__name__}.")
        if isinstance(self.policy_version, bool) or not isinstance(
            self.policy_version, numbers.Integral
        ):
            raise FeedbackError(f"Turn.policy_version must be an int, got {self.policy_version!r}.")
        self.policy_version = int(self.policy_version)  # e.g. a numpy integer -> JSON int
        if not isinstance(self.sampling, dict):
            raise FeedbackError(f"Turn.sampling must be a dict, got {self.sampling!r}.")
        if self.parent_turn_id is not None:
            _require_id(self.parent_turn_id, "parent_turn_id")
        if not isinstance(self.finished, bool):
            raise FeedbackError(
                f"Turn.finished must be True or False (did the answer end with EOS), "
                f"got {self.finished!r}."
            )
        self.messages = _clean(self.messages)
        self.answer = clean_text(self.answer)
        self.sampling = _clean(self.sampling)
        self.model = clean_text(self.model)
        self.created_at = float(self.created_at)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return _to_json(self.to_dict(), f"Turn {self.turn_id}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Turn:
        _require_record(data, "Turn")
        # Unknown keys are ignored so that records written by a newer version load.
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Turn:
        return cls.from_dict(json.loads(_text(raw)))


@dataclass
class Event:
    """One reaction to a turn: a vote, its removal, a rewrite, a regenerate, an undo."""

    event_id: str
    turn_id: str
    kind: str  # one of EVENT_KINDS
    session_id: str
    user_id: str
    text: str | None = None  # the rewritten answer, for kind == "rewrite"
    created_at: float = field(default_factory=time.time)
    may_train: bool = True  # False: made while the chat's "don't train" switch was on
    # False: made by a person who may not train at all (Turn.consent), e.g. one who
    # signed out and reacted anonymously to the answers of their signed-in chat.
    consent: bool = True

    def __post_init__(self) -> None:
        for name in ("event_id", "turn_id", "session_id", "user_id"):
            _require_id(getattr(self, name), name)
        _require_bool(self.may_train, "Event.may_train")
        _require_bool(self.consent, "Event.consent")
        if self.kind not in EVENT_KINDS:
            raise FeedbackError(
                f"Unknown event kind {self.kind!r}; allowed kinds are {', '.join(EVENT_KINDS)}."
            )
        if self.text is not None and not isinstance(self.text, str):
            raise FeedbackError(f"Event.text must be a string or None, got {self.text!r}.")
        if self.text is not None:
            self.text = clean_text(self.text)
        if self.kind == "rewrite" and not (self.text and self.text.strip()):
            raise FeedbackError(
                "A rewrite event needs the rewritten answer in `text`; it was empty. "
                "Send the edited answer, or no event if the user cancelled the edit."
            )
        self.created_at = float(self.created_at)

    @classmethod
    def new(
        cls, turn_id: str, kind: str, session_id: str, user_id: str, text: str | None = None
    ) -> Event:
        return cls(new_id(), turn_id, kind, session_id, user_id, text)

    def to_dict(self) -> dict[str, Any]:
        # Flat fields: a plain dict is several times cheaper than dataclasses.asdict,
        # which shows in bulk ingestion.
        return {f: getattr(self, f) for f in _EVENT_FIELDS}

    def to_json(self) -> str:
        return _to_json(self.to_dict(), f"Event {self.event_id}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        _require_record(data, "Event")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        return cls.from_dict(json.loads(_text(raw)))


_EVENT_FIELDS = tuple(f.name for f in fields(Event))

BATTLE_OUTCOMES: tuple[str, ...] = ("a", "b", "tie", "both_bad")
# What a pick says about each answer, as ordinary votes: the winner 👍 and the loser 👎
# (so the pick is a preference pair for the reward model and a vote for the canary);
# a tie is 👍 for both, both-bad 👎 for both (labels, no pair).
_PICK_VOTES = {
    "a": ("like", "dislike"),
    "b": ("dislike", "like"),
    "tie": ("like", "like"),
    "both_bad": ("dislike", "dislike"),
}


@dataclass
class Battle:
    """One arena comparison: two versions answered one message anonymously (as answer
    A and answer B, two saved turns) and the person picked."""

    battle_id: str
    session_id: str
    user_id: str
    turn_a: str
    turn_b: str
    version_a: int
    version_b: int
    outcome: str  # one of BATTLE_OUTCOMES
    created_at: float = field(default_factory=time.time)
    consent: bool = True  # the picker may train (Event.consent of the two votes)

    def __post_init__(self) -> None:
        for name in ("battle_id", "session_id", "user_id", "turn_a", "turn_b"):
            _require_id(getattr(self, name), name)
        if self.outcome not in BATTLE_OUTCOMES:
            raise FeedbackError(
                f"Unknown arena pick {self.outcome!r}; pick one of {', '.join(BATTLE_OUTCOMES)}."
            )
        if self.turn_a == self.turn_b:
            raise FeedbackError("An arena battle needs two different answers.")
        self.version_a, self.version_b = int(self.version_a), int(self.version_b)

    def events(self) -> list[Event]:
        """The votes the pick stands for, with ids fixed by the battle (a retry writes
        nothing twice)."""
        kinds = _PICK_VOTES[self.outcome]
        who = (self.session_id, self.user_id)
        return [
            Event(
                f"{ARENA_EVENT_PREFIX}{self.battle_id}:{side}",
                turn,
                kind,
                *who,
                consent=self.consent,
            )  # fmt: skip
            for side, turn, kind in (("a", self.turn_a, kinds[0]), ("b", self.turn_b, kinds[1]))
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------

# KEYS: turn, turns stream, session list, accounts, forgotten, recent tombstone, user data,
# user-index marker. ARGV: turn json, turn id, user id, created_at, user hash.
# Returns 1 when written, 0 when the turn already existed (nothing changed), -1 when
# its user's data was deleted after the turn was made (a UI replica flushing a turn
# it kept while Redis was down must not bring deleted data back).
# The first turn of an empty store marks the per-user index complete: there is nothing
# older to index.
_SAVE_TURN = """
local function erased(at)
  return at and tonumber(ARGV[4]) <= tonumber(at)
end
if erased(redis.call('HGET', KEYS[5], ARGV[5])) or erased(redis.call('GET', KEYS[6])) then
  return -1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  if redis.call('XLEN', KEYS[2]) == 0 then
    redis.call('SET', KEYS[8], '1', 'NX')
  end
  local sid = redis.call('XADD', KEYS[2], '*', 'turn_id', ARGV[2])
  redis.call('RPUSH', KEYS[3], ARGV[2])
  redis.call('HSETNX', KEYS[4], ARGV[3], ARGV[4])
  redis.call('HSET', KEYS[7], 't:' .. ARGV[2], sid)
  return 1
end
return 0
"""

# Retention of account records. KEYS: accounts, then per user: their data. ARGV: the
# cut-off time, then the user ids. An account first seen before the cut-off with nothing
# stored any more is forgotten; checked in the script, so a turn written meanwhile keeps it.
_FORGET_IDLE_ACCOUNTS = """
local n = 0
for i = 2, #ARGV do
  local first = redis.call('HGET', KEYS[1], ARGV[i])
  if first and tonumber(first) < tonumber(ARGV[1]) and redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""

# A deletion's tombstone. KEYS: forgotten, accounts, user data, recent tombstone.
# ARGV: user hash, user id, time, seconds a short one lasts. A user with anything stored
# (or deleted before) gets the lasting field; one with nothing stored an expiring key.
# Returns 1 for the lasting one, 0 for the short one.
_TOMBSTONE = """
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1
    or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('HDEL', KEYS[2], ARGV[2])
  return 1
end
redis.call('SET', KEYS[4], ARGV[3], 'EX', ARGV[4])
return 0
"""

# Delete turns with every event on them, atomically. KEYS: events stream, turns stream,
# held, review, consent. ARGV: group, key prefix, a cut-off in ms ('' = none: a turn
# with an event at or after it is left alone, so a vote that arrives on an old answer
# while retention runs keeps the answer), then per turn: turn id, its index entry's
# stream id ('' when unknown), session id. Events are acked before XDEL: a deleted
# entry left in the pending list would count as pending forever. Each record says whose
# it is, and leaves that user's index with it.
# Returns {number of turns deleted, {stream ids of the deleted events}}.
_DELETE_TURNS = """
local group, prefix = ARGV[1], ARGV[2]
local cutoff = tonumber(ARGV[3])
local deleted, n_turns = {}, 0
local function unindex(raw, field)
  local ok, record = pcall(cjson.decode, raw)
  if ok and type(record) == 'table' and type(record.user_id) == 'string' then
    redis.call('HDEL', prefix .. 'user_data:' .. record.user_id, field)
  end
end
for i = 4, #ARGV, 3 do
  local turn_id, index_id, session = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local list_key = prefix .. 'turn_events:' .. turn_id
  local sids = redis.call('LRANGE', list_key, 0, -1)
  local keep = false
  if cutoff then
    for _, sid in ipairs(sids) do
      if tonumber(string.match(sid, '^(%d+)')) >= cutoff then
        keep = true
      end
    end
  end
  if not keep then
  n_turns = n_turns + 1
  for _, sid in ipairs(sids) do
    local entry = redis.call('XRANGE', KEYS[1], sid, sid)
    if #entry > 0 then
      local f = entry[1][2]
      for j = 1, #f, 2 do
        if f[j] == 'event_id' then
          redis.call('DEL', prefix .. 'event_seen:' .. f[j + 1])
          redis.call('HDEL', KEYS[4], f[j + 1])
        elseif f[j] == 'event' then
          unindex(f[j + 1], 'e:' .. sid)
        end
      end
    end
    redis.pcall('XACK', KEYS[1], group, sid)
    redis.call('XDEL', KEYS[1], sid)
    redis.call('ZREM', KEYS[3], sid)
    deleted[#deleted + 1] = sid
  end
  local record = redis.call('GET', prefix .. 'turn:' .. turn_id)
  if record then
    unindex(record, 't:' .. turn_id)
  end
  redis.call('DEL', list_key, prefix .. 'turn:' .. turn_id)
  if index_id ~= '' then
    redis.call('XDEL', KEYS[2], index_id)
  end
  redis.call('LREM', prefix .. 'session_turns:' .. session, 0, turn_id)
  redis.call('HDEL', KEYS[5], turn_id)
  end
end
return {n_turns, deleted}
"""

# Delete single events (a user's reactions on a turn that is not theirs). KEYS: events
# stream, held, review. ARGV: group, key prefix, then per event: stream id, event id,
# turn id, user id.
_DELETE_EVENTS = """
local group, prefix = ARGV[1], ARGV[2]
for i = 3, #ARGV, 4 do
  local sid, event_id, turn_id, user_id = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  redis.call('HDEL', prefix .. 'user_data:' .. user_id, 'e:' .. sid)
  redis.call('DEL', prefix .. 'event_seen:' .. event_id)
  redis.call('HDEL', KEYS[3], event_id)
  redis.pcall('XACK', KEYS[1], group, sid)
  redis.call('XDEL', KEYS[1], sid)
  redis.call('ZREM', KEYS[2], sid)
  redis.call('LREM', prefix .. 'turn_events:' .. turn_id, 0, sid)
end
return (#ARGV - 2) / 4
"""

# A batch of events, all or nothing (one script runs atomically; the embedded server
# logs its effects as one MULTI/EXEC block). KEYS: the events stream, the accounts hash,
# then per event: seen marker, turn-events list, its user's data. ARGV: per event: event
# json, event id, turn id, kind, user id, time. An account is first seen at its first turn
# or event, whichever comes first: one that only ever reacted (to the turns of another
# account signed in to the same chat) is new too, for RLHF_NEW_ACCOUNT_HOLD_S.
# Returns {status, stream id} per event: 1 written, 0 a duplicate (the id it was
# written with). The caller has checked that every turn exists; a turn deleted between
# that check and this script (retention, "Delete my data") leaves an event on a turn that
# is gone, which no round or export admits (privacy.Admission needs the turn).
SCRIPT_BATCH = 500  # events per script call
_RECORD_EVENTS = """
local out = {}
for i = 0, #ARGV / 6 - 1 do
  local seen_key, index_key, user_key = KEYS[3 * i + 3], KEYS[3 * i + 4], KEYS[3 * i + 5]
  local a = 6 * i
  local seen = redis.call('GET', seen_key)
  if seen then
    out[i + 1] = {0, seen}
  else
    local id = redis.call('XADD', KEYS[1], '*', 'event', ARGV[a + 1], 'event_id', ARGV[a + 2],
                          'turn_id', ARGV[a + 3], 'kind', ARGV[a + 4])
    redis.call('SET', seen_key, id)
    redis.call('RPUSH', index_key, id)
    redis.call('HSET', user_key, 'e:' .. id, ARGV[a + 3])
    redis.call('HSETNX', KEYS[2], ARGV[a + 5], ARGV[a + 6])
    out[i + 1] = {1, id}
  end
end
return out
"""


# The battle and its two votes, all or nothing. KEYS: arena stream, battle marker, events
# stream, the picker's user data, the accounts hash, then per event: seen marker,
# turn-events list. ARGV: battle json, battle id, the picker's user id, the time, then per
# event: event json, event id, turn id, kind (the votes are the picker's; first seen as in
# _RECORD_EVENTS). Returns 0 when the battle was already recorded.
_RECORD_BATTLE = """
if not redis.call('SET', KEYS[2], '1', 'NX') then
  return 0
end
local battle = redis.call('XADD', KEYS[1], '*', 'battle', ARGV[1])
redis.call('HSET', KEYS[4], 'b:' .. battle, ARGV[2])
redis.call('HSETNX', KEYS[5], ARGV[3], ARGV[4])
for i = 0, (#ARGV - 4) / 4 - 1 do
  local seen_key, index_key, a = KEYS[2 * i + 6], KEYS[2 * i + 7], 4 * i + 4
  if not redis.call('GET', seen_key) then
    local id = redis.call('XADD', KEYS[3], '*', 'event', ARGV[a + 1], 'event_id', ARGV[a + 2],
                          'turn_id', ARGV[a + 3], 'kind', ARGV[a + 4])
    redis.call('SET', seen_key, id)
    redis.call('RPUSH', index_key, id)
    redis.call('HSET', KEYS[4], 'e:' .. id, ARGV[a + 3])
  end
end
return 1
"""


def _check_event(event: Event, turn_session: str | None, suffix: str = "") -> None:
    """Refuse an event whose turn was never saved, or that comes from another session."""
    if turn_session is None:
        raise UnknownTurnError(
            f"Event {event.event_id} ({event.kind}) refers to turn {event.turn_id!r}, which "
            "was never saved. A turn is written before the user can react to it: call "
            "FeedbackStore.save_turn(turn) first." + suffix
        )
    if turn_session != event.session_id:
        # A session only ever sees its own turns; anything else is a bug or tampering.
        raise FeedbackError(
            f"Event {event.event_id} comes from session {event.session_id!r} but turn "
            f"{event.turn_id!r} belongs to session {turn_session!r}; a session can only "
            "react to its own answers." + suffix
        )


@dataclass
class UserData:
    """What the per-user index lists for one user (see :meth:`FeedbackStore.user_data`)."""

    turns: dict[str, str] = field(default_factory=dict)  # turn id -> its rlhf:turns id
    events: dict[str, str] = field(default_factory=dict)  # rlhf:events id -> turn id
    battles: dict[str, str] = field(default_factory=dict)  # rlhf:arena id -> battle id


# The events stream's unread count where the server gives none (FeedbackStore._unread_after),
# by server: (group position and deletion mark, entries added, unread count). Stores are made
# per call in places, so the count lives with the process, not with one store.
_UNREAD_COUNTS: dict[tuple[Any, ...], tuple[tuple[str, str], int, int]] = {}


class FeedbackStore:
    """Turns and events in Redis. Thread-safe (redis-py clients are) and works
    with clients made with or without ``decode_responses``."""

    def __init__(self, redis_client: redis.Redis, *, min_idle_ms: int = DEFAULT_MIN_IDLE_MS):
        self.redis = redis_client
        self.min_idle_ms = min_idle_ms
        # register_script retries with SCRIPT LOAD when a restarted server lost its cache.
        self._save_turn = redis_client.register_script(_SAVE_TURN)
        self._record_events = redis_client.register_script(_RECORD_EVENTS)
        self._record_battle = redis_client.register_script(_RECORD_BATTLE)
        self._delete_turns = redis_client.register_script(_DELETE_TURNS)
        self._delete_events = redis_client.register_script(_DELETE_EVENTS)
        self._tombstone = redis_client.register_script(_TOMBSTONE)
        self._forget_idle_accounts = redis_client.register_script(_FORGET_IDLE_ACCOUNTS)
        self._group_ready = False

    # ---- turns -----------------------------------------------------------

    @_surface_unavailable
    def save_turn(self, turn: Turn) -> bool:
        """Write a turn once. Returns True when written, False when a turn with this
        id already existed (the first one is kept unchanged: turns are immutable), or
        when its user asked for their data to be deleted after the turn was made."""
        created = self._save_turn(
            keys=[
                turn_key(turn.turn_id),
                TURNS_STREAM,
                session_turns_key(turn.session_id),
                ACCOUNTS_KEY,
                FORGOTTEN_KEY,
                recent_tombstone_key(turn.user_id),
                user_data_key(turn.user_id),
                USER_INDEX_READY,
            ],
            args=[
                turn.to_json(),
                turn.turn_id,
                turn.user_id,
                repr(turn.created_at),
                user_hash(turn.user_id),
            ],
        )
        if int(created) < 0:
            log.info("turn %s not saved: its user's data was deleted after it", turn.turn_id)
        return int(created) == 1

    @_surface_unavailable
    def get_turn(self, turn_id: str) -> Turn | None:
        return self.get_turns([turn_id]).get(turn_id)

    @_surface_unavailable
    def get_turns(self, turn_ids: Iterable[str]) -> dict[str, Turn]:
        """The turns that exist among ``turn_ids``, by id (one MGET). A record that
        cannot be read as a Turn (corrupt, or written by an older version without a
        field) is left out, with a log line: it must not stop every round and export."""
        ids = list(dict.fromkeys(turn_ids))
        if not ids:
            return {}
        raws = self.redis.mget([turn_key(t) for t in ids])
        found = ((t, _decode_turn(t, r)) for t, r in zip(ids, raws, strict=True) if r is not None)
        return {t: turn for t, turn in found if turn is not None}

    @_surface_unavailable
    def undecodable_turns(self, turn_ids: Iterable[str]) -> dict[str, str]:
        """The records among ``turn_ids`` that exist but cannot be read as a Turn, by id,
        each with the session id the record still names ("" when it names none): what
        "Delete my data" must delete by the user's own index, since the record itself
        no longer says whose it is."""
        ids = list(dict.fromkeys(turn_ids))
        raws = self.redis.mget([turn_key(t) for t in ids]) if ids else []
        out: dict[str, str] = {}
        for turn_id, raw in zip(ids, raws, strict=True):
            if raw is None or _decode_turn(turn_id, raw, quiet=True) is not None:
                continue
            try:
                session = json.loads(raw).get("session_id")
            except (ValueError, AttributeError):  # not JSON, or not an object
                session = None
            out[turn_id] = session if isinstance(session, str) else ""
        return out

    @_surface_unavailable
    def turns(self, batch: int = 500) -> Iterator[Turn]:
        """Every turn, oldest first."""
        for _, entries in self._scan(TURNS_STREAM, batch):
            ids = [_text(_field(data, "turn_id")) for _, data in entries]
            found = self.get_turns(ids)
            yield from (found[t] for t in ids if t in found)

    @_surface_unavailable
    def turns_for_session(self, session_id: str) -> list[Turn]:
        """The turns of one chat session, oldest first."""
        ids = [_text(x) for x in self.redis.lrange(session_turns_key(session_id), 0, -1)]
        found = self.get_turns(ids)
        return [found[t] for t in ids if t in found]

    # ---- events ----------------------------------------------------------

    @_surface_unavailable
    def record_event(self, event: Event) -> str | None:
        """Append an event to ``rlhf:events`` once. Returns its stream id, or None
        when this event id was already recorded (a retried click).

        Raises UnknownTurnError when the turn was never written (the UI writes a
        turn before showing its buttons), and FeedbackError when the event's
        session is not the session the turn belongs to."""
        return self.record_events([event])[0]

    @_surface_unavailable
    def record_events(self, events: Iterable[Event]) -> list[str | None]:
        """:meth:`record_event` for many events in two round trips (one MGET of their
        turns, one atomic script per 500 events), for bulk ingestion: imports,
        replays, a proxy that batches clicks. Same checks, same result per event;
        nothing is written when any event is refused."""
        events = list(events)
        if not events:
            return []
        sessions = self._turn_sessions({e.turn_id for e in events})
        suffix = " Nothing of this batch was written." if len(events) > 1 else ""
        for event in events:
            _check_event(event, sessions.get(event.turn_id), suffix)
        results: list[str | None] = []
        # A script blocks the server while it runs: a huge import goes in slices.
        for start in range(0, len(events), SCRIPT_BATCH):
            keys, args = [EVENTS_STREAM, ACCOUNTS_KEY], []
            for event in events[start : start + SCRIPT_BATCH]:
                keys += [
                    seen_key(event.event_id),
                    turn_events_key(event.turn_id),
                    user_data_key(event.user_id),
                ]
                args += [event.to_json(), event.event_id, event.turn_id, event.kind,
                         event.user_id, repr(event.created_at)]  # fmt: skip
            results += [
                _text(stream_id) if status == 1 else None
                for status, stream_id in self._record_events(keys=keys, args=args)
            ]
        return results

    # ---- arena -------------------------------------------------------------

    @_surface_unavailable
    def record_battle(self, battle: Battle) -> bool:
        """Record an arena pick and the two votes it stands for, atomically. Returns
        False when this battle was already picked (a retry, or a second click)."""
        events = battle.events()
        sessions = self._turn_sessions({e.turn_id for e in events})
        for event in events:
            _check_event(event, sessions.get(event.turn_id), " Nothing was written.")
        keys = [
            ARENA_STREAM,
            battle_seen_key(battle.battle_id),
            EVENTS_STREAM,
            user_data_key(battle.user_id),
            ACCOUNTS_KEY,
        ]
        args = [
            _to_json(battle.to_dict(), f"Battle {battle.battle_id}"),
            battle.battle_id,
            battle.user_id,
            repr(battle.created_at),
        ]
        for event in events:
            keys += [seen_key(event.event_id), turn_events_key(event.turn_id)]
            args += [event.to_json(), event.event_id, event.turn_id, event.kind]
        return bool(self._record_battle(keys=keys, args=args))

    @_surface_unavailable
    def battles(self) -> list[dict[str, Any]]:
        """Every arena battle, oldest first, as dicts (Battle fields)."""
        out = []
        for _, entries in self._scan(ARENA_STREAM, 1000):
            for _, data in entries:
                out.append(json.loads(_text(_field(data, "battle"))))
        return out

    @_surface_unavailable
    def battles_mark(self) -> tuple[int, str | None, int]:
        """(number of battles, id of the newest, consent epoch): it changes whenever a
        battle is recorded or deleted, or written turns change whether they may train (a
        chat switched to "don't train", turns deleted), so a cache of what is computed from
        the battles that count can check it cheaply before reading the stream."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(ARENA_STREAM)
        pipe.xrevrange(ARENA_STREAM, count=1)
        pipe.get(CONSENT_EPOCH_KEY)
        n, newest, epoch = pipe.execute()
        return n, _text(newest[0][0]) if newest else None, int(epoch or 0)

    def _turn_sessions(self, turn_ids: Iterable[str]) -> dict[str, str]:
        """turn id -> its session id, for the turns that exist (one MGET; only the one
        field is read, a full Turn is not built)."""
        ids = list(turn_ids)
        raws = self.redis.mget([turn_key(t) for t in ids])
        return {t: json.loads(r)["session_id"] for t, r in zip(ids, raws, strict=True) if r}

    def _decode_entry(self, stream_id: Any, data: dict[Any, Any] | None) -> Event | None:
        if data is None:
            return None
        raw = _field(data, "event")
        try:
            return Event.from_json(raw)
        except (TypeError, ValueError) as exc:
            log.error("Undecodable event %s in %s: %s", _text(stream_id), EVENTS_STREAM, exc)
            return None

    @_surface_unavailable
    def event_entries(
        self, start: str = "-", end: str = "+", batch: int = 500
    ) -> Iterator[tuple[str, Event]]:
        """(stream id, Event) for every event in stream order, from ``start`` to ``end``."""
        for _, entries in self._scan(EVENTS_STREAM, batch, start, end):
            for sid, data in entries:
                event = self._decode_entry(sid, data)
                if event is not None:
                    yield _text(sid), event

    @_surface_unavailable
    def events_after(self, stream_id: str) -> tuple[int, list[tuple[str, Event]]]:
        """(the events stream's length, every event recorded after ``stream_id``), read in
        one transaction: a reader that keeps a tally of the events up to ``stream_id`` can
        tell from the length whether any of those were deleted since (it is then less than
        the number it counted plus the new ones)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xlen(EVENTS_STREAM)
        pipe.xrange(EVENTS_STREAM, min=f"({stream_id}", max="+")
        length, entries = pipe.execute()
        decoded = ((_text(sid), self._decode_entry(sid, data)) for sid, data in entries)
        return int(length), [(sid, event) for sid, event in decoded if event is not None]

    @_surface_unavailable
    def events_mark(self) -> tuple[int, str | None]:
        """(the events stream's length, the id of its newest entry), in one transaction."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xlen(EVENTS_STREAM)
        pipe.xrevrange(EVENTS_STREAM, count=1)
        length, newest = pipe.execute()
        return int(length), _text(newest[0][0]) if newest else None

    def events(self, batch: int = 500) -> Iterator[Event]:
        """Every event, in the order the server received them (stream order)."""
        for _, event in self.event_entries(batch=batch):
            yield event

    @_surface_unavailable
    def events_for_turns(self, turn_ids: Iterable[str]) -> list[Event]:
        """All events on these turns, in stream order (from the per-turn index, so
        a round's worker sees the full history of the turns it touches)."""
        pipe = self.redis.pipeline(transaction=False)
        for t in dict.fromkeys(turn_ids):
            pipe.lrange(turn_events_key(t), 0, -1)
        stream_ids = sorted({_text(s) for ids in pipe.execute() for s in ids}, key=_stream_id_key)
        return [event for _, event in self.event_entries_at(stream_ids)]

    def _scan(
        self, stream: str, batch: int, start: str = "-", end: str = "+"
    ) -> Iterator[tuple[str, list[tuple[Any, dict[Any, Any]]]]]:
        """XRANGE in pages; yields (last id, entries)."""
        cursor = start
        while True:
            entries = self.redis.xrange(stream, cursor, end, count=batch)
            if not entries:
                return
            last = _text(entries[-1][0])
            yield last, entries
            if len(entries) < batch:
                return
            cursor = f"({last}"

    # ---- counts ----------------------------------------------------------

    @_surface_unavailable
    def counts(self) -> dict[str, int]:
        """{"turns", "events", "unconsumed", "held"}; unconsumed = events the training
        group has not acknowledged yet (never delivered + delivered but pending); held =
        events acked but held back (waiting for review or for a new account's hold)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(TURNS_STREAM)
        pipe.xlen(EVENTS_STREAM)
        pipe.zcard(HELD_KEY)
        n_turns, n_events, n_held = pipe.execute()
        return {
            "turns": n_turns,
            "events": n_events,
            "unconsumed": self._unconsumed(n_events),
            "held": n_held,
        }

    def _group_info(self) -> dict[str, Any] | None:
        try:
            groups = self.redis.xinfo_groups(EVENTS_STREAM)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        for g in groups:
            if _text(g["name"]) == GROUP:
                return g
        return None

    def _unconsumed(self, n_events: int) -> int:
        info = self._group_info()
        if info is None:  # no worker ever read: everything is still to be used
            return n_events
        pending = int(info["pending"])
        lag = info.get("lag")
        if lag is None:
            # The server could not compute lag (old server, or entries deleted in
            # the middle): count the entries after the group's last-delivered id.
            lag = self._unread_after(_text(info["last-delivered-id"]))
        # A stream emptied by deletions reports the lag it had before (the server finds
        # no deleted entries in an empty stream); there cannot be more unread than there are.
        return min(int(lag), n_events) + pending

    def _unread_after(self, last: str) -> int:
        """The events after the group's last-delivered id ``last``, where the server gives
        no lag (an entry after it was deleted: any "Delete my data" or retention sweep,
        until the workers read past it). Read once, then kept up by the count of entries
        the stream has added since, while neither the group's position nor the stream's
        deletions moved: reading every unread event on each call made every ``/status``
        and every vote's "is a round due?" cost the whole backlog (20,000 unread events:
        0.12 s a call, for as long as the workers were behind)."""
        stream = self.redis.xinfo_stream(EVENTS_STREAM)
        mark = (last, _text(stream["max-deleted-entry-id"]))
        added, newest = int(stream["entries-added"]), _text(stream["last-generated-id"])
        kwargs = self.redis.connection_pool.connection_kwargs
        server = (kwargs.get("host"), kwargs.get("port"), kwargs.get("path"), kwargs.get("db"))
        known = _UNREAD_COUNTS.get(server)
        if known is not None and known[0] == mark and known[1] <= added:
            count = known[2] + added - known[1]
        else:  # read up to the newest id the added count above covers, not later arrivals
            count = sum(len(e) for _, e in self._scan(EVENTS_STREAM, 1000, f"({last}", newest))
        _UNREAD_COUNTS[server] = (mark, added, count)
        return count

    # ---- the training consumer group --------------------------------------

    @_surface_unavailable
    def ensure_group(self) -> None:
        """Create the ``trainers`` group from the start of the stream (id 0, so
        events recorded before any worker existed are still trained on)."""
        try:
            self.redis.xgroup_create(EVENTS_STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _with_group(self, call: Callable[[], Any]) -> Any:
        """Run a group command; if the group is gone (stream deleted, fresh server
        restored without it), recreate it once and retry."""
        if not self._group_ready:
            self.ensure_group()
        try:
            return call()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()
            return call()

    def _take(
        self, entries: Iterable[tuple[Any, Any]], out: list[tuple[str, Event]], invalid: list[str]
    ) -> None:
        for sid, data in entries:
            if sid is None:  # deleted while pending; XAUTOCLAIM drops it from the PEL
                continue
            event = self._decode_entry(sid, data)
            if event is None:
                invalid.append(_text(sid))
            else:
                out.append((_text(sid), event))

    def _autoclaim(
        self, consumer: str, min_idle_ms: int, count: int, invalid: list[str]
    ) -> list[tuple[str, Event]]:
        out: list[tuple[str, Event]] = []
        cursor = "0-0"
        while len(out) < count:
            reply = self._with_group(
                lambda c=cursor: self.redis.xautoclaim(
                    EVENTS_STREAM, GROUP, consumer, min_idle_ms, start_id=c, count=count - len(out)
                )
            )
            self._take(reply[1], out, invalid)
            cursor = _text(reply[0])
            if cursor == "0-0":  # scanned the whole pending list
                break
        return out

    @_surface_unavailable
    def reclaim_stale(
        self, consumer: str, min_idle_ms: int | None = None, count: int = 100
    ) -> list[tuple[str, Event]]:
        """Take over (XAUTOCLAIM) up to ``count`` entries that some consumer has held
        longer than ``min_idle_ms`` without acking -- a worker that died mid-round."""
        _require_id(consumer, "consumer")
        min_idle = self.min_idle_ms if min_idle_ms is None else min_idle_ms
        invalid: list[str] = []
        out = self._autoclaim(consumer, min_idle, count, invalid) if count > 0 else []
        if invalid:
            self._quarantine(invalid)
        return out

    @_surface_unavailable
    def read_unconsumed(
        self,
        consumer: str,
        count: int = 100,
        *,
        min_idle_ms: int | None = None,
        block_ms: int | None = None,
    ) -> list[tuple[str, Event]]:
        """Up to ``count`` events for ``consumer`` to train on, oldest first:
        first entries another (dead) consumer held longer than ``min_idle_ms``
        without acking (XAUTOCLAIM), then never-delivered ones (XREADGROUP ">").

        Each returned entry stays pending until :meth:`ack`; if this consumer
        dies, the next one reclaims it after ``min_idle_ms``. A caller holding
        the one-round-at-a-time train lock may pass ``min_idle_ms=0``: then every
        pending entry belongs to a round that is over, and is taken at once."""
        _require_id(consumer, "consumer")
        if count <= 0:
            return []
        min_idle = self.min_idle_ms if min_idle_ms is None else min_idle_ms
        invalid: list[str] = []
        out = self._autoclaim(consumer, min_idle, count, invalid)
        if len(out) < count:
            reply = self._with_group(
                lambda: self.redis.xreadgroup(
                    GROUP, consumer, {EVENTS_STREAM: ">"}, count=count - len(out), block=block_ms
                )
            )
            for _, entries in reply or []:
                self._take(entries, out, invalid)
        if invalid:
            self._quarantine(invalid)
        return out

    def _quarantine(self, stream_ids: list[str]) -> None:
        """An entry that cannot be decoded can never be trained on; copy it to
        ``rlhf:events:invalid`` for a person to look at and ack it, so it does
        not block every round forever."""
        pipe = self.redis.pipeline(transaction=True)
        for sid in stream_ids:
            pipe.xadd(INVALID_STREAM, {"stream_id": sid})
        pipe.xack(EVENTS_STREAM, GROUP, *stream_ids)
        pipe.execute()

    @_surface_unavailable
    def ack(self, stream_ids: Iterable[str]) -> int:
        """Mark entries as used for training. Call after the work is durable.
        Returns how many were pending (acking twice counts once)."""
        ids = list(stream_ids)
        if not ids:
            return 0

        def ack_and_unhold() -> int:
            # A held entry that trained is done with too (it was acked when held).
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(EVENTS_STREAM, GROUP, *ids)
            pipe.zrem(HELD_KEY, *ids)
            return int(pipe.execute()[0])

        return int(self._with_group(ack_and_unhold))

    @_surface_unavailable
    def release(self, consumer: str, stream_ids: Iterable[str]) -> int:
        """Hand entries back without acking them (a round that failed its gate):
        they become reclaimable by the next read at once instead of after
        ``min_idle_ms``. Returns how many were released."""
        ids = list(stream_ids)
        if not ids:
            return 0
        # XCLAIM ... IDLE sets the entry's idle time; a huge one makes it stale now.
        claimed = self._with_group(
            lambda: self.redis.xclaim(
                EVENTS_STREAM, GROUP, consumer, 0, ids, idle=2**40, justid=True
            )
        )
        return len(claimed)

    @_surface_unavailable
    def pending(self) -> dict[str, Any]:
        """{"pending": n, "min": id | None, "max": id | None, "consumers": {name: n}}."""
        info = self._with_group(lambda: self.redis.xpending(EVENTS_STREAM, GROUP))
        return {
            "pending": int(info["pending"]),
            "min": _text(info["min"]) if info["min"] else None,
            "max": _text(info["max"]) if info["max"] else None,
            "consumers": {_text(c["name"]): int(c["pending"]) for c in info["consumers"]},
        }

    @_surface_unavailable
    def pending_entries(self, consumer: str | None = None, count: int = 1000) -> list[dict]:
        """Details of pending entries: id, consumer, idle ms, times delivered."""
        rows = self._with_group(
            lambda: self.redis.xpending_range(
                EVENTS_STREAM, GROUP, "-", "+", count, consumername=consumer
            )
        )
        return [
            {
                "stream_id": _text(r["message_id"]),
                "consumer": _text(r["consumer"]),
                "idle_ms": int(r["time_since_delivered"]),
                "times_delivered": int(r["times_delivered"]),
            }
            for r in rows
        ]

    # ---- consent: the chat's "don't use this chat for training" switch ---------

    @_surface_unavailable
    def set_training(self, turn_ids: Iterable[str], allowed: bool) -> int:
        """Record that these turns (a whole chat) may or may not train, overriding what
        their records said when written: the switch applies to the chat as it is now,
        earlier answers included. Returns how many turns were marked."""
        ids = list(dict.fromkeys(turn_ids))
        if ids:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(CONSENT_KEY, mapping={t: "1" if allowed else "0" for t in ids})
            pipe.incr(CONSENT_EPOCH_KEY)
            pipe.execute()
        return len(ids)

    @_surface_unavailable
    def training_overrides(self, turn_ids: Iterable[str]) -> dict[str, bool]:
        """turn id -> allowed, for the turns whose chat switch was set after the fact."""
        ids = list(dict.fromkeys(turn_ids))
        if not ids:
            return {}
        values = self.redis.hmget(CONSENT_KEY, ids)
        return {t: _text(v) == "1" for t, v in zip(ids, values, strict=True) if v is not None}

    # ---- review of rewrites -------------------------------------------------------

    @_surface_unavailable
    def decide_review(self, event_ids: Iterable[str], decision: str) -> int:
        """An admin's decision on rewrites: "approved" (they may train) or "dropped"
        (they never train). Approved ones that were held wait no longer. Returns how
        many of the events exist."""
        if decision not in REVIEW_DECISIONS:
            raise FeedbackError(
                f"Unknown review decision {decision!r}; use {' or '.join(REVIEW_DECISIONS)}."
            )
        ids = list(dict.fromkeys(event_ids))
        if not ids:
            return 0
        sids = [s for s in self.redis.mget([seen_key(e) for e in ids])]
        found = {e: _text(s) for e, s in zip(ids, sids, strict=True) if s is not None}
        if not found:
            return 0
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(REVIEW_KEY, mapping={e: decision for e in found})
        held = list(found.values())
        if decision == "approved":
            # Only entries that are held: XX never adds one that is not.
            pipe.zadd(HELD_KEY, {sid: 0 for sid in held}, xx=True)
        else:
            pipe.zrem(HELD_KEY, *held)
        pipe.execute()
        return len(found)

    @_surface_unavailable
    def review_decisions(self, event_ids: Iterable[str]) -> dict[str, str]:
        """event id -> "approved" / "dropped", for the events that were reviewed."""
        ids = list(dict.fromkeys(event_ids))
        if not ids:
            return {}
        values = self.redis.hmget(REVIEW_KEY, ids)
        return {e: _text(v) for e, v in zip(ids, values, strict=True) if v is not None}

    # ---- held-back events -----------------------------------------------------------

    @_surface_unavailable
    def hold(self, until: Mapping[str, float]) -> int:
        """Take entries out of the training group's queue (ack) and keep them aside
        until the given time (``math.inf``: until an admin approves them). Held entries
        do not block the rounds that come before their time; :meth:`held_ready` hands
        them back. One transaction: an entry is never acked without being held."""
        if not until:
            return 0
        scores = {sid: ("+inf" if math.isinf(t) else float(t)) for sid, t in until.items()}

        def hold_and_ack() -> int:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zadd(HELD_KEY, scores)  # type: ignore[arg-type]
            pipe.xack(EVENTS_STREAM, GROUP, *scores)
            pipe.execute()
            return len(scores)

        return int(self._with_group(hold_and_ack))

    @_surface_unavailable
    def held_ready(self, now: float | None = None, count: int = 100) -> list[tuple[str, Event]]:
        """Held entries whose time has come, oldest first (they are not acked again:
        :meth:`ack` also removes them from the held set, :meth:`hold` re-holds them)."""
        now = time.time() if now is None else now
        sids = [_text(s) for s in self.redis.zrangebyscore(HELD_KEY, "-inf", now, 0, count)]
        if not sids:
            return []
        out = self.event_entries_at(sids)
        found = {sid for sid, _ in out}
        gone = [sid for sid in sids if sid not in found]
        if gone:
            self.redis.zrem(HELD_KEY, *gone)
        return sorted(out, key=lambda e: _stream_id_key(e[0]))

    @_surface_unavailable
    def held_count(self, now: float | None = None) -> int:
        """Held entries that may train now (they count towards the next round)."""
        now = time.time() if now is None else now
        return int(self.redis.zcount(HELD_KEY, "-inf", now))

    @_surface_unavailable
    def held_until(self, stream_ids: Iterable[str]) -> dict[str, float]:
        ids = list(stream_ids)
        if not ids:
            return {}
        scores = self.redis.zmscore(HELD_KEY, ids)
        return {s: float(v) for s, v in zip(ids, scores, strict=True) if v is not None}

    # ---- accounts, deletion, retention ---------------------------------------------

    @_surface_unavailable
    def first_seen(self, user_ids: Iterable[str]) -> dict[str, float]:
        """user id -> when their first turn or event was written (users seen before
        this was recorded are missing: they count as established)."""
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        values = self.redis.hmget(ACCOUNTS_KEY, ids)
        return {u: float(v) for u, v in zip(ids, values, strict=True) if v is not None}

    @_surface_unavailable
    def forgotten_at(self, user_ids: Iterable[str]) -> dict[str, float]:
        """user id -> when their data was deleted, for the users whose data was."""
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        values = self.redis.hmget(FORGOTTEN_KEY, [user_hash(u) for u in ids])
        return {u: float(v) for u, v in zip(ids, values, strict=True) if v is not None}

    @_surface_unavailable
    def tombstone(self, user_id: str, at: float | None = None) -> bool:
        """Mark a user's data as deleted from ``at`` on: turns of theirs made before
        then are refused from now on (a replica's late flush), and they count as a new
        account again. Keeps only a digest of the id.

        Returns whether the user has (or had) anything stored: then the mark lasts (a
        field of ``rlhf:forgotten``). A user with nothing stored gets a mark that expires
        after ``SHORT_TOMBSTONE_S``: anyone can ask this for any number of fresh
        cookies, and a lasting mark each would grow without bound. Call
        :meth:`ensure_user_index` first: "nothing stored" is read from the user's index."""
        _require_id(user_id, "user_id")
        at = time.time() if at is None else float(at)
        lasting = self._tombstone(
            keys=[
                FORGOTTEN_KEY,
                ACCOUNTS_KEY,
                user_data_key(user_id),
                recent_tombstone_key(user_id),
            ],
            args=[user_hash(user_id), user_id, repr(at), SHORT_TOMBSTONE_S],
        )
        return bool(lasting)

    @_surface_unavailable
    def forget_old_accounts(self, before: float) -> int:
        """Retention for what the store keeps about accounts themselves: when an account
        was first seen, where that was before ``before`` and nothing of it is stored any
        more (it comes back as a new account). Deletion marks stay: a digest and a time,
        what refuses a late copy of a deleted person's turn or event for good. "Nothing
        stored" is read from the per-user index, built here first on a store older than
        it. Returns how many accounts were forgotten."""
        self.ensure_user_index()
        gone = 0
        idle = [_text(user) for user, first in self.redis.hscan_iter(ACCOUNTS_KEY, count=1000)
                if float(first) < before]  # fmt: skip
        for start in range(0, len(idle), SCRIPT_BATCH):
            users = idle[start : start + SCRIPT_BATCH]
            keys = [ACCOUNTS_KEY, *(user_data_key(u) for u in users)]
            gone += int(self._forget_idle_accounts(keys=keys, args=[repr(before), *users]))
        return gone

    @_surface_unavailable
    def user_data(self, user_id: str) -> UserData:
        """What the per-user index says is stored of ``user_id`` (one HGETALL)."""
        out = UserData()
        for raw_field, raw_value in self.redis.hgetall(user_data_key(user_id)).items():
            name, value = _text(raw_field), _text(raw_value)
            kind, _, ident = name.partition(":")
            part = {"t": out.turns, "e": out.events, "b": out.battles}.get(kind)
            if part is not None and ident:
                part[ident] = value
        return out

    @_surface_unavailable
    def unindex_user(self, user_id: str, data: UserData) -> None:
        """Drop these entries from the user's index (those already gone are tidied:
        a record deleted while the index was being built, or never decodable)."""
        names = (
            [f"t:{t}" for t in data.turns]
            + [f"e:{s}" for s in data.events]
            + [f"b:{s}" for s in data.battles]
        )
        if names:
            self.redis.hdel(user_data_key(user_id), *names)

    @_surface_unavailable
    def ensure_user_index(self, batch: int = 500) -> bool:
        """Put every stored turn, event and battle into its user's index, once per store:
        a store written before the index existed gets it here, in one pass over the whole
        store, the first time anyone's data is deleted. Every later write keeps the index
        itself (in the same script as the record), and a store that was empty when its
        first turn came is marked complete then. Concurrent callers wait for the one that
        builds it. Returns True when this call built it."""
        if self.redis.exists(USER_INDEX_READY):
            return False
        with self.redis.lock(f"{USER_INDEX_READY}:lock", timeout=900, blocking_timeout=900):
            if self.redis.exists(USER_INDEX_READY):
                return False
            for _, entries in self._scan(TURNS_STREAM, batch):
                ids = [(_text(sid), _text(_field(data, "turn_id"))) for sid, data in entries]
                found = self.get_turns(t for _, t in ids)
                pipe = self.redis.pipeline(transaction=False)
                for sid, turn_id in ids:
                    if turn_id in found:
                        pipe.hset(user_data_key(found[turn_id].user_id), f"t:{turn_id}", sid)
                pipe.execute()
            for _, entries in self._scan(EVENTS_STREAM, batch):
                pipe = self.redis.pipeline(transaction=False)
                for sid, data in entries:
                    event = self._decode_entry(sid, data)
                    if event is not None:
                        pipe.hset(user_data_key(event.user_id), f"e:{_text(sid)}", event.turn_id)
                pipe.execute()
            for _, entries in self._scan(ARENA_STREAM, batch):
                pipe = self.redis.pipeline(transaction=False)
                for sid, data in entries:
                    battle = json.loads(_text(_field(data, "battle")))
                    pipe.hset(
                        user_data_key(str(battle.get("user_id"))),
                        f"b:{_text(sid)}",
                        str(battle.get("battle_id")),
                    )
                pipe.execute()
            self.redis.set(USER_INDEX_READY, "1")
            log.info("built the per-user index of the feedback store")
        return True

    @_surface_unavailable
    def event_entries_at(self, stream_ids: Iterable[str]) -> list[tuple[str, Event]]:
        """(stream id, Event) for the given ids that still exist, in the order given."""
        ids = list(dict.fromkeys(stream_ids))
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for sid in ids:
            pipe.xrange(EVENTS_STREAM, sid, sid)
        out = []
        for sid, result in zip(ids, pipe.execute(), strict=True):
            event = self._decode_entry(sid, result[0][1]) if result else None
            if event is not None:
                out.append((sid, event))
        return out

    @_surface_unavailable
    def turn_index(
        self, start: str = "-", end: str = "+", batch: int = 500
    ) -> Iterator[tuple[str, str]]:
        """(stream id in ``rlhf:turns``, turn id), oldest first."""
        for _, entries in self._scan(TURNS_STREAM, batch, start, end):
            for sid, data in entries:
                yield _text(sid), _text(_field(data, "turn_id"))

    @_surface_unavailable
    def turn_event_ids(self, turn_ids: Iterable[str]) -> dict[str, list[str]]:
        """turn id -> the stream ids of the events on it."""
        ids = list(dict.fromkeys(turn_ids))
        pipe = self.redis.pipeline(transaction=False)
        for t in ids:
            pipe.lrange(turn_events_key(t), 0, -1)
        return {t: [_text(s) for s in r] for t, r in zip(ids, pipe.execute(), strict=True)}

    @_surface_unavailable
    def delete_turns(
        self,
        turns: Iterable[tuple[str, str, str]],
        batch: int = 200,
        *,
        unless_events_since_ms: int | None = None,
    ) -> tuple[int, list[str]]:
        """Delete turns ``(turn id, index stream id or "", session id)`` with every event
        on them: the records, the stream entries (acked first, so nothing stays pending),
        the idempotency markers, the per-turn and per-session indexes, held entries,
        review decisions and consent marks. With ``unless_events_since_ms`` a turn that
        has an event at or after that time is kept (checked inside the script).
        Returns (turns deleted, the deleted events' stream ids)."""
        items = list(turns)
        n_turns, deleted = 0, []
        if items and not self._group_ready:
            self.ensure_group()
        cutoff = "" if unless_events_since_ms is None else str(int(unless_events_since_ms))
        for start in range(0, len(items), batch):
            args: list[str] = [GROUP, PREFIX, cutoff]
            for turn_id, index_id, session_id in items[start : start + batch]:
                args += [turn_id, index_id, session_id]
            n, sids = self._delete_turns(
                keys=[EVENTS_STREAM, TURNS_STREAM, HELD_KEY, REVIEW_KEY, CONSENT_KEY], args=args
            )
            n_turns += int(n)
            deleted += [_text(s) for s in sids]
        if n_turns:
            self.redis.incr(CONSENT_EPOCH_KEY)
        return n_turns, deleted

    @_surface_unavailable
    def delete_events(self, entries: Iterable[tuple[str, Event]]) -> list[str]:
        """Delete single events (stream id, Event) with their markers and index entries."""
        items = list(entries)
        if not items:
            return []
        args: list[str] = [GROUP, PREFIX]
        for sid, event in items:
            args += [sid, event.event_id, event.turn_id, event.user_id]
        self._delete_events(keys=[EVENTS_STREAM, HELD_KEY, REVIEW_KEY], args=args)
        return [sid for sid, _ in items]

    @_surface_unavailable
    def delete_battles(self, user_id: str | None = None, before_ms: int | None = None) -> int:
        """Delete arena battles picked by ``user_id`` and/or older than ``before_ms``
        (their votes are events, deleted with their turns). Returns how many."""
        doomed: list[tuple[str, str, str]] = []
        end = "+" if before_ms is None else f"({before_ms}-0"
        for _, entries in self._scan(ARENA_STREAM, 1000, "-", end):
            for sid, data in entries:
                battle = json.loads(_text(_field(data, "battle")))
                if user_id is None or battle.get("user_id") == user_id:
                    who = str(battle.get("user_id"))
                    doomed.append((_text(sid), str(battle.get("battle_id")), who))
        return self.delete_battle_entries(doomed)

    @_surface_unavailable
    def delete_battle_entries(self, battles: Iterable[tuple[str, str, str]]) -> int:
        """Delete arena battles ``(stream id, battle id, user id)`` with their markers and
        index entries. Returns how many were still there."""
        doomed = list(battles)
        if not doomed:
            return 0
        pipe = self.redis.pipeline(transaction=True)
        pipe.xdel(ARENA_STREAM, *[sid for sid, _, _ in doomed])
        pipe.delete(*[battle_seen_key(b) for _, b, _ in doomed])
        for sid, _, who in doomed:
            pipe.hdel(user_data_key(who), f"b:{sid}")
        return int(pipe.execute()[0])

    @_surface_unavailable
    def pending_ids(self) -> set[str]:
        """Stream ids delivered to the training group and not acked yet."""
        if self._group_info() is None:
            return set()
        out: set[str] = set()
        start = "-"
        while True:
            rows = self.redis.xpending_range(EVENTS_STREAM, GROUP, start, "+", 1000)
            out.update(_text(r["message_id"]) for r in rows)
            if len(rows) < 1000:
                return out
            start = f"({_text(rows[-1]['message_id'])}"

    @_surface_unavailable
    def last_delivered_id(self) -> str | None:
        """The training group's last delivered id (entries after it were never read);
        None when no group exists (nothing was ever read)."""
        info = self._group_info()
        return None if info is None else _text(info["last-delivered-id"])

    @_surface_unavailable
    def trim_invalid(self, before_ms: int) -> int:
        """Drop quarantine records older than ``before_ms`` (they hold only stream ids)."""
        return int(self.redis.xtrim(INVALID_STREAM, minid=before_ms, approximate=False))


def _decode_turn(turn_id: str, raw: bytes | str, quiet: bool = False) -> Turn | None:
    try:
        return Turn.from_json(raw)
    except (TypeError, ValueError) as exc:
        if quiet:  # the caller has logged it already
            return None
        log.error(
            "Undecodable turn record %s (%s): left out of training and exports; fix or "
            "delete the key to clear this message",
            turn_key(turn_id),
            exc,
        )
        return None


def _field(data: dict[Any, Any], name: str) -> Any:
    """A stream entry field, whether the client decodes responses or not."""
    return data[name] if name in data else data.get(name.encode())


def _stream_id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
