"""Consent, deletion, retention, review and scrubbing: what may become training data.

Everything that decides whether a piece of feedback may train (or be exported) is
here, applied once where feedback becomes training data (``datasets.load_feedback``)
and where a round takes its events (``sort_entries``):

- **Consent.** A turn written with ``may_train=False`` (its chat's "don't use this chat
  for training" switch was on), or whose chat was switched off later
  (``FeedbackStore.set_training``), is left out with every event on it. The latest switch
  wins: turning it back on lets the chat train again. An event made while the switch was
  on is left out unless the chat was switched back on afterwards. A turn or event with
  ``consent=False`` (the UI's access rules say its writer may not train: an anonymous
  visitor of a public UI) is left out whatever the switch says (records written before the
  field existed read ``consent=True``: for them the switch decides, as it did then). An
  un-vote is the exception: it only takes a vote back, so it counts whoever made it.
- **Deletion.** :func:`forget_user` removes a person's turns and events from the store
  (records, stream entries, indexes, markers, pending entries, held entries) and the
  registry's record of them; a digest of the id keeps late copies out.
- **Retention.** :func:`apply_retention` deletes turns (with their events) older than
  ``RLHF_RETENTION_DAYS``, never one with an event still pending in the training group,
  never read by it yet, or held back.
- **Review.** With ``RLHF_REVIEW_REWRITES`` a rewrite trains only after an admin approves
  it; until then it is held. A dropped rewrite never trains, review or not.
- **New accounts.** With ``RLHF_NEW_ACCOUNT_HOLD_S`` the feedback of an account younger
  than that is held until the account is old enough.
- **Scrubbing.** E-mail addresses, phone numbers, card numbers, IBANs and API keys or
  tokens in messages, answers and rewrites are replaced by ``<EMAIL_ADDRESS>``,
  ``<PHONE_NUMBER>``, ``<CREDIT_CARD>``, ``<IBAN_CODE>``, ``<API_KEY>``: Presidio's
  pattern recognizers (no NLP model: ``NoOpNlpEngine``) and its anonymizer.

A held event is acked and kept in ``rlhf:held`` with the time it may train, so it
never blocks the rounds before then; an excluded event is acked and never trains.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf_core.feedback import Event, FeedbackStore, Turn
from rlhf_core.periodic import PeriodicLoop
from rlhf_core.settings import Settings

log = logging.getLogger(__name__)

Status = Literal["train", "held", "excluded"]
DAY_S = 86_400.0


# --------------------------------------------------------------------------
# scrubbing
# --------------------------------------------------------------------------

# Secrets people paste: provider key formats with a fixed prefix (low false-positive
# rate), JWTs, bearer tokens, private key blocks, and "key = value" assignments.
API_KEY_PATTERNS: tuple[tuple[str, str], ...] = (
    ("openai", r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"),
    ("huggingface", r"\bhf_[A-Za-z0-9]{30,}\b"),
    ("github", r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})\b"),
    ("aws access key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    ("google api key", r"\bAIza[0-9A-Za-z_\-]{35}\b"),
    ("slack", r"\bxox[abposr]-[A-Za-z0-9\-]{10,}"),
    ("stripe", r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}\b"),
    ("jwt", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
    ("bearer", r"(?i)(?<=\bbearer )[A-Za-z0-9._~+/\-]{20,}=*"),
    ("private key", r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
    (
        "assignment",
        r"(?i)(?<=(?:api[_\- ]?key|secret|token|password|passwd)[\"']?\s{0,3}[:=]\s{0,3}[\"']?)"
        r"[^\s\"']{8,}",
    ),
)
# Cheap pre-checks: the phone recognizer (libphonenumber over 8 regions) costs ~10 ms a
# text; most chat text has no run of digits it could match and is passed over.
_DIGITS = re.compile(r"\d")
_KEYISH = re.compile(
    r"sk-|hf_|gh[pousr]_|github_pat_|AKIA|ASIA|AIza|xox|_live_|_test_|eyJ|(?i:bearer|private key"
    r"|api.?key|secret|token|passw)"
)


class Scrubber:
    """Presidio's analyzer with pattern recognizers only, and its anonymizer.

    Built lazily, the first time a text needs it (importing spaCy, which Presidio needs
    even without a model, takes seconds) and once per process; thread-safe after that.
    ``scrub_text`` is cached by text: a round and its replays see the same contexts
    again and again."""

    ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "API_KEY")

    def __init__(self) -> None:
        import tldextract
        from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer
        from presidio_analyzer.nlp_engine import NoOpNlpEngine
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            PhoneRecognizer,
        )
        from presidio_analyzer.recognizer_registry import RecognizerRegistry
        from presidio_anonymizer import AnonymizerEngine

        # tldextract's default fetches the public suffix list from the internet on first
        # use; the snapshot it ships is enough to tell a domain, and works offline.
        offline = tldextract.TLDExtract(suffix_list_urls=())

        class OfflineEmailRecognizer(EmailRecognizer):
            # Presidio's pattern, with the local part bounded at the 64 characters mail
            # takes: unbounded, it was tried again from every word boundary, quadratic
            # ("a-a-a-...@" of 8,000 characters: 9 s to scrub).
            PATTERNS = [
                Pattern(
                    "Email (Medium)",
                    r"\b((([!#$%&'*+\-/=?^_`{|}~\w])|([!#$%&'*+\-/=?^_`{|}~\w]"
                    r"[!#$%&'*+\-/=?^_`{|}~\.\w]{0,62}[!#$%&'*+\-/=?^_`{|}~\w]))"
                    r"[@]\w+(?:-+\w+)*(?:\.\w+(?:-+\w+)*)+)\b",
                    0.5,
                )
            ]

            def validate_result(self, pattern_text: str) -> bool:
                return offline(pattern_text).fqdn != ""

        keys = PatternRecognizer(
            supported_entity="API_KEY",
            patterns=[Pattern(name, regex, 0.9) for name, regex in API_KEY_PATTERNS],
            name="ApiKeyRecognizer",
        )
        registry = RecognizerRegistry(supported_languages=["en"])
        for recognizer in (
            OfflineEmailRecognizer(),
            PhoneRecognizer(),
            CreditCardRecognizer(),  # Luhn-checked: "4111 1111 1111 1112" stays
            IbanRecognizer(),  # checksum-validated
            keys,
        ):
            registry.add_recognizer(recognizer)
        self.analyzer = AnalyzerEngine(
            registry=registry,
            nlp_engine=NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}]),
            supported_languages=["en"],
        )
        self.anonymizer = AnonymizerEngine()

    def scrub(self, text: str, entities: list[str]) -> str:
        results = self.analyzer.analyze(text, language="en", entities=entities)
        if not results:
            return text
        return self.anonymizer.anonymize(text, results).text  # "<ENTITY_TYPE>" in place


def entities_for(text: str) -> list[str]:
    """The entity types worth looking for in ``text`` (see the pre-checks above). Plain
    text needs none, and then Presidio is never even imported."""
    wanted: list[str] = []
    if "@" in text:
        wanted.append("EMAIL_ADDRESS")
    if len(_DIGITS.findall(text)) >= 7:
        wanted += ["PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE"]
    if _KEYISH.search(text):
        wanted.append("API_KEY")
    return wanted


@functools.lru_cache(maxsize=200_000)
def _scrub_cached(text: str) -> str:
    entities = entities_for(text)
    return scrubber().scrub(text, entities) if entities else text


_scrubber: Scrubber | None = None
_scrubber_lock = threading.Lock()


def scrubber() -> Scrubber:
    global _scrubber
    with _scrubber_lock:
        if _scrubber is None:
            _scrubber = Scrubber()
        return _scrubber


def scrub_text(text: str) -> str:
    """``text`` with e-mail addresses, phone numbers, card numbers, IBANs and keys
    replaced by ``<ENTITY_TYPE>``."""
    if not isinstance(text, str) or not text:
        return text
    return _scrub_cached(text)


def scrub_turn(turn: Turn) -> Turn:
    """The turn with its messages and answer scrubbed (the same object when clean)."""
    messages = [{**m, "content": scrub_text(m["content"])} for m in turn.messages]
    answer = scrub_text(turn.answer)
    if messages == turn.messages and answer == turn.answer:
        return turn
    return dataclasses.replace(turn, messages=messages, answer=answer)


def scrub_event(event: Event) -> Event:
    if not event.text:
        return event
    text = scrub_text(event.text)
    return event if text == event.text else dataclasses.replace(event, text=text)


# --------------------------------------------------------------------------
# admission: may this turn / event train now?
# --------------------------------------------------------------------------


@dataclass
class Admission:
    """What the store says about a set of turns and events, and the rules applied.

    Built with :meth:`load` (a handful of HMGETs); then :meth:`turn_ok` and
    :meth:`event_status` are plain functions of it, testable without Redis."""

    review_rewrites: bool = False
    new_account_hold_s: float = 0.0
    now: float = field(default_factory=time.time)
    overrides: dict[str, bool] = field(default_factory=dict)  # turn id -> chat switch
    decisions: dict[str, str] = field(default_factory=dict)  # event id -> review decision
    first_seen: dict[str, float] = field(default_factory=dict)  # user id -> first turn/event
    forgotten: dict[str, float] = field(default_factory=dict)  # user id -> deletion time

    @classmethod
    def load(
        cls,
        store: FeedbackStore,
        settings: Settings,
        turns: Iterable[Turn],
        events: Iterable[Event],
        now: float | None = None,
    ) -> Admission:
        turns, events = list(turns), list(events)
        users = {t.user_id for t in turns} | {e.user_id for e in events}
        return cls(
            review_rewrites=settings.review_rewrites,
            new_account_hold_s=settings.new_account_hold_s,
            now=time.time() if now is None else now,
            overrides=store.training_overrides([t.turn_id for t in turns]),
            decisions=store.review_decisions([e.event_id for e in events if e.kind == "rewrite"]),
            first_seen=store.first_seen(users) if settings.new_account_hold_s > 0 else {},
            forgotten=store.forgotten_at(users),
        )

    def _erased(self, user_id: str, created_at: float) -> bool:
        at = self.forgotten.get(user_id)
        return at is not None and created_at <= at

    def turn_ok(self, turn: Turn) -> bool:
        """May this turn (and so any event on it) be used at all? The chat switch set
        later wins over the turn's own flag, never over its writer's consent."""
        if not turn.consent or self._erased(turn.user_id, turn.created_at):
            return False
        return self.overrides.get(turn.turn_id, turn.may_train)

    def event_status(self, event: Event, turn: Turn | None) -> tuple[Status, float]:
        """("train", 0), ("held", until) or ("excluded", 0) for one event."""
        # An un-vote only takes back: it counts whoever made it (the same chat, signed out).
        if turn is None or not self.turn_ok(turn) or not (event.consent or event.kind == "unvote"):
            return "excluded", 0.0
        if self._erased(event.user_id, event.created_at):
            return "excluded", 0.0
        # The chat switch set later for the whole chat wins over the event's own flag.
        if not self.overrides.get(event.turn_id, event.may_train):
            return "excluded", 0.0
        decision = self.decisions.get(event.event_id)
        if event.kind == "rewrite" and decision == "dropped":
            return "excluded", 0.0
        until = 0.0
        if event.kind == "rewrite" and self.review_rewrites and decision != "approved":
            until = math.inf
        if self.new_account_hold_s > 0 and event.user_id in self.first_seen:
            until = max(until, self.first_seen[event.user_id] + self.new_account_hold_s)
        if until > self.now:
            return "held", until
        return "train", 0.0


def admitted_events(events: Sequence[Event], keep: set[int]) -> list[Event]:
    """``events`` (in stream order) without the ones whose index is not in ``keep``
    and without the undos that retracted them.

    An undo retracts the latest event still in force of its session on that turn (a
    stack per session, see datasets.resolve_turn_events). Removing an event together
    with the undo that popped it leaves every other undo popping the same event, as
    removing a matched pair of brackets leaves the other pairs matched; an undo that
    popped nothing still pops nothing."""
    stacks: dict[tuple[str, str], list[int]] = {}
    dropped_undos: set[int] = set()
    for i, event in enumerate(events):
        stack = stacks.setdefault((event.turn_id, event.session_id), [])
        if event.kind == "undo":
            if stack and stack.pop() not in keep:
                dropped_undos.add(i)
        else:
            stack.append(i)
    return [
        e
        for i, e in enumerate(events)
        if (i in keep if e.kind != "undo" else i not in dropped_undos)
    ]


def training_view(
    store: FeedbackStore,
    settings: Settings,
    turns: Sequence[Turn],
    events: Sequence[Event],
    *,
    now: float | None = None,
    scrub: bool = True,
) -> tuple[list[Turn], list[Event]]:
    """The turns and events that may train (or be exported) now, scrubbed: turns
    without consent or of deleted users go with all their events; held and excluded
    events go with the undos that retracted them."""
    from rlhf_core.datasets import resolve_events

    admission = Admission.load(store, settings, turns, events, now)
    kept_turns = {t.turn_id: t for t in turns if admission.turn_ok(t)}
    # A vote on an edited answer is on the person's text and never counts (the rule is
    # datasets.resolve_turn_events'); it goes here with the rest, or, when its rewrite may
    # not train (held for review, dropped), it would count as a vote on the served answer.
    on_edit = {e.event_id for state in resolve_events(events).values() for e in state.on_edit}
    keep = {
        i
        for i, e in enumerate(events)
        if e.kind != "undo"
        and e.event_id not in on_edit
        and admission.event_status(e, kept_turns.get(e.turn_id))[0] == "train"
    }
    kept_events = [e for e in admitted_events(list(events), keep) if e.turn_id in kept_turns]
    out_turns = list(kept_turns.values())
    if scrub:
        out_turns = [scrub_turn(t) for t in out_turns]
        kept_events = [scrub_event(e) for e in kept_events]
    return out_turns, kept_events


@dataclass
class SortedEntries:
    """A round's entries sorted by :func:`sort_entries`."""

    train: list[tuple[str, Event]]
    held: dict[str, float]  # stream id -> when it may train (inf: waiting for review)
    excluded: list[str]


def sort_entries(
    store: FeedbackStore,
    settings: Settings,
    entries: Sequence[tuple[str, Event]],
    now: float | None = None,
) -> SortedEntries:
    """Split a round's entries into those it trains on, those held back, and those
    that never train. The caller holds (:meth:`FeedbackStore.hold`) and acks them."""
    events = [e for _, e in entries]
    turns = store.get_turns({e.turn_id for e in events})
    admission = Admission.load(store, settings, turns.values(), events, now)
    out = SortedEntries([], {}, [])
    for sid, event in entries:
        status, until = admission.event_status(event, turns.get(event.turn_id))
        if status == "train":
            out.train.append((sid, event))
        elif status == "held":
            out.held[sid] = until
        else:
            out.excluded.append(sid)
    return out


# --------------------------------------------------------------------------
# deletion and retention
# --------------------------------------------------------------------------


def forget_user(client: Any, settings: Settings, user_id: str) -> dict[str, int]:
    """Delete everything of one user: their turns with every event on them, their
    events on other turns, their arena battles; their held entries, review decisions
    and consent marks; the registry's record that a version trained on those entries.
    From now on turns of theirs made before this moment are refused. Returns what was deleted.

    The cost is that of the user's own data, read from their index in the store (see
    :meth:`FeedbackStore.user_data`), never a pass over everyone's: anyone can ask this
    for a fresh cookie, as often as the rate limits allow. (A store written before the
    index existed is indexed once, by the first deletion: a migration rather than a slow
    path per user, because only a full pass can tell which users of an old store have
    data -- a reaction on a turn of another account leaves no other trace of its author.)

    A round already running may still publish a version trained on some of it (it read
    the events before); every later round and export goes without."""
    from rlhf_core.registry import Registry

    store = FeedbackStore(client)
    store.ensure_user_index()
    # First, so that a turn flushed late by another UI replica cannot slip in after the
    # index is read. Nothing stored: nothing to read either.
    if not store.tombstone(user_id):
        return {"turns": 0, "events": 0, "battles": 0}
    data = store.user_data(user_id)
    owned = list(data.turns.items())
    doomed: list[tuple[str, str, str]] = []
    for start in range(0, len(owned), 500):  # a prolific user's records, a slice at a time
        part = owned[start : start + 500]
        found = store.get_turns(t for t, _ in part)
        doomed += [
            (turn_id, index_id, found[turn_id].session_id)
            for turn_id, index_id in part
            if turn_id in found and found[turn_id].user_id == user_id
        ]
        # A record that no longer decodes cannot say whose it is; the user's own index
        # (written with the record) does, and it may still hold their message.
        broken = store.undecodable_turns(t for t, _ in part if t not in found)
        doomed += [(t, index_id, broken[t]) for t, index_id in part if t in broken]
    doomed_ids = {t for t, _, _ in doomed}
    _, deleted = store.delete_turns(doomed)
    # Their reactions on turns that are not theirs (a session whose account changed).
    stray = [
        (sid, e)
        for sid, e in store.event_entries_at(
            sid for sid, turn_id in data.events.items() if turn_id not in doomed_ids
        )
        if e.user_id == user_id
    ]
    deleted += store.delete_events(stray)
    battles = store.delete_battle_entries((sid, b, user_id) for sid, b in data.battles.items())
    store.unindex_user(user_id, data)
    Registry(client, settings).forget_stream_ids(deleted)
    log.info("forgot user data: %d turns, %d events", len(doomed), len(deleted))
    return {"turns": len(doomed), "events": len(deleted), "battles": battles}


def _ms(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def apply_retention(
    client: Any, settings: Settings, now: float | None = None, days: float | None = None
) -> dict[str, int]:
    """Delete turns older than ``days`` (default ``RLHF_RETENTION_DAYS``; unset: keep
    everything) together with their events, where every event on the turn is older
    too, and none is pending in the training group, still unread by it, or held back
    (feedback is never lost before it was trained on or decided); then the records of
    accounts first seen before the cut-off with nothing left
    (:meth:`FeedbackStore.forget_old_accounts`). Returns counts of turns and events."""
    from rlhf_core.registry import Registry

    days = settings.retention_days if days is None else days
    if days is None:
        return {"turns": 0, "events": 0}
    now = time.time() if now is None else now
    cutoff_ms = int((now - days * DAY_S) * 1000)
    store = FeedbackStore(client)
    old = [(sid, t) for sid, t in store.turn_index(end=f"({cutoff_ms}-0")]
    if not old:
        store.trim_invalid(cutoff_ms)
        store.delete_battles(before_ms=cutoff_ms)
        store.forget_old_accounts(cutoff_ms / 1000)
        return {"turns": 0, "events": 0}
    pending = store.pending_ids()
    last = store.last_delivered_id()
    last_key = _ms(last) if last is not None else (-1, -1)
    event_ids = store.turn_event_ids(t for _, t in old)
    held = store.held_until(s for ids in event_ids.values() for s in ids)
    sessions = {t.turn_id: t.session_id for t in store.get_turns(t for _, t in old).values()}
    doomed: list[tuple[str, str, str]] = []
    for sid, turn_id in old:
        ids = event_ids.get(turn_id, [])
        if any(
            _ms(e)[0] >= cutoff_ms or e in pending or e in held or _ms(e) > last_key for e in ids
        ):
            continue
        # A turn record already gone (its index entry left over) is tidied away too.
        doomed.append((turn_id, sid, sessions.get(turn_id, "")))
    n_turns, deleted = store.delete_turns(doomed, unless_events_since_ms=cutoff_ms)
    Registry(client, settings).forget_stream_ids(deleted)
    store.trim_invalid(cutoff_ms)
    store.delete_battles(before_ms=cutoff_ms)
    # After the turns: an account whose last turn just went is forgotten in this pass.
    store.forget_old_accounts(cutoff_ms / 1000)
    if n_turns:
        log.info("retention: deleted %d turns and %d events", n_turns, len(deleted))
    return {"turns": n_turns, "events": len(deleted)}


def review_queue(store: FeedbackStore, settings: Settings, limit: int = 200) -> list[dict]:
    """Rewrites waiting for an admin's decision, oldest first: still in force on their
    turn (not undone or replaced), not decided, their turn may train."""
    from rlhf_core.datasets import resolve_turn_events

    rewrites = [(sid, e) for sid, e in store.event_entries() if e.kind == "rewrite"]
    decided = store.review_decisions(e.event_id for _, e in rewrites)
    rewrites = [(sid, e) for sid, e in rewrites if e.event_id not in decided]
    if not rewrites:
        return []
    turns = store.get_turns({e.turn_id for _, e in rewrites})
    history = store.events_for_turns(turns)
    by_turn: dict[str, list[Event]] = {}
    for event in history:
        by_turn.setdefault(event.turn_id, []).append(event)
    admission = Admission.load(store, settings, turns.values(), [e for _, e in rewrites])
    out = []
    for sid, event in rewrites:
        turn = turns.get(event.turn_id)
        if turn is None or admission.event_status(event, turn)[0] == "excluded":
            continue  # could never train, approved or not (e.g. made after signing out)
        state = resolve_turn_events(by_turn.get(event.turn_id, []))
        if not any(e.event_id == event.event_id for e in state.effective):
            continue  # undone, or a later rewrite replaced it
        out.append(
            {
                "event_id": event.event_id,
                "stream_id": sid,
                "user_id": event.user_id,
                "prompt": turn.messages[-1]["content"] if turn.messages else "",
                "answer": turn.answer,
                "rewrite": event.text,
            }
        )
        if len(out) >= limit:
            break
    return out


RETENTION_EVERY_S = 3600.0


class RetentionLoop(PeriodicLoop):
    """A thread in each worker that applies ``RLHF_RETENTION_DAYS`` every hour, so old
    data goes even when no feedback arrives to start rounds. It runs under the training
    lock (skipping a tick while a round runs: the round applies it itself)."""

    def __init__(
        self, settings: Settings, client: Any = None, every_s: float = RETENTION_EVERY_S
    ) -> None:
        super().__init__(self.tick, every_s, "retention", "retention pass")
        self.settings = settings
        self.client = client

    def tick(self) -> dict[str, int] | None:
        """One pass; None when a round holds the lock."""
        from rlhf_core.registry import Registry

        if self.client is None:
            from rlhf_core.redis_server import connect

            self.client = connect(self.settings)
        lock = Registry(self.client, self.settings).lock()
        if lock.acquire() is None:
            return None
        try:
            return apply_retention(self.client, self.settings)
        finally:
            lock.release()
