"""What the chat buttons do, as plain functions of plain data (no gradio here).

:class:`ChatService` keeps one :class:`ChatSession` per browser session, keyed by
the session id the web layer passes in (Gradio's ``session_hash``): sessions never
share a conversation, and nothing about a user lives in a module global. Each
session has its own lock; it is held only while the session's data changes, never
during generation, so a vote on an older answer is not stuck behind a stream.

The rules the handlers keep:

- A finished answer is written as a Turn before it is returned with its buttons
  (send/regenerate save, then yield the final update). If Redis is down at that
  moment the answer is kept in the session as *pending* and saved on the next
  call that reaches Redis (every handler, and the periodic status tick, retries).
- Event ids are deterministic per (turn, number of this session's reactions on
  it, kind), made before the write: a retried request writes one event, and a
  second 👍 on an already liked answer writes nothing (the session knows the
  current vote).
- Bad input raises :class:`InputError` with a message for the person; an
  unreachable Redis raises ``FeedbackUnavailable`` (a ``RedisUnavailableError``)
  and nothing in the session changes, so the user can simply try again.
- Undo takes back the session's last action: a vote or rewrite (an ``undo``
  event on that turn retracts it in the training data, see rlhf_core.datasets),
  a regenerate (the earlier answer comes back), a sent message (the exchange is
  removed and its text returned to the input box), or a new chat.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from chat_ui import validation
from chat_ui.access import AnswerSlot
from chat_ui.validation import InputError
from rlhf_core.feedback import (
    BATTLE_OUTCOMES,
    Battle,
    Event,
    FeedbackError,
    FeedbackStore,
    Turn,
    clean_text,
    new_id,
)
from rlhf_core.redis_server import RedisUnavailableError
from rlhf_core.serving import ContextTooLongError, Generation, PolicyServer, UnknownVersionError
from rlhf_core.settings import Settings

log = logging.getLogger(__name__)

VOTES = validation.VOTE_KINDS
EMPTY_ANSWER = "*(the model returned an empty answer)*"
MAX_SESSIONS = 10_000  # beyond this the least recently used are dropped (their answers saved)
# Undo reaches back this many actions: each keeps what it replaced (a rewrite its text of up to
# RLHF_MAX_INPUT_CHARS or more, a new chat the whole chat), and the stack had no end.
UNDO_DEPTH = 50
# Characters one chat may hold (messages and answers). The model reads only the part of a
# chat that fits its context, but every streamed token re-renders the whole chat on the
# page, and each send renders and encodes it: a chat grown to hundreds of 4,000-character
# messages by a script made every token cost that much CPU, beside everyone's answers.
MAX_CHAT_CHARS = 200_000
# Reactions (votes, rewrites) one answer takes in a session. Each is an event kept in the
# store; a person changes their mind a few times, and 50 is far more than that: without a
# cap, a script alternating two 4,000-character rewrites of one answer wrote 240 a minute.
MAX_REACTIONS_PER_ANSWER = 50


def remember(session: ChatSession, action: dict[str, Any]) -> None:
    """Push ``action`` on the session's undo stack, which keeps the last ``UNDO_DEPTH``."""
    session.actions.append(action)
    del session.actions[:-UNDO_DEPTH]


# What an unreachable or restarting Redis raises (FeedbackUnavailable is both).
STORE_ERRORS = (RedisUnavailableError, redis.exceptions.RedisError)
# Why an answer was stopped before it was saved (ChatService._stop_answer).
ANSWER_ABANDONED = (
    "This answer was stopped: nothing read it for several minutes. Send the message again."
)
ANSWER_UNDONE = "The answer was stopped by Undo: your message is back in the box."
ANSWER_CHAT_CHANGED = (
    "The answer was stopped: the chat changed while it was written (New chat or Delete my "
    "data), so it answered a chat that is no longer there. Send the message again."
)
# Called by send, regenerate and arena_send once the request has passed every check the chat
# makes itself (the message valid, the chat free, the answer to regenerate found, an arena with
# two versions), under the chat's lock and before anything is written; it raises to refuse.
# The app counts the message against its rate limits here, so a request refused by those
# checks (a second Enter while an answer streams, an empty message) does not use up the
# person's messages. The server's own refusals come after it and are counted: a system prompt
# and message that alone overflow the model's context, a version unloaded mid-arena.
# It returns the caller's AnswerSlot (one of their answers in flight), which the answer marks
# paused at each yield and releases when it ends, however it ends; or None.
Admit = Callable[[], "AnswerSlot | None"]


def _admitted(admit: Admit | None) -> AnswerSlot:
    slot = admit() if admit is not None else None
    return slot if slot is not None else AnswerSlot()


def _live(stream: dict[str, Any] | None, now: float) -> bool:
    """Is this answer still being written? Not once nobody reads it (ABANDONED_AFTER_S)."""
    return stream is not None and not stream["slot"].abandoned(now)


@dataclass
class Update:
    """What the page should show after a handler step."""

    messages: list[dict[str, Any]]  # the session's conversation (see ChatService.view)
    notices: list[str] = field(default_factory=list)  # warnings/info for the person
    done: bool = True  # False while an answer is still streaming
    textbox: str | None = None  # text to put back in the input box (undo of a send)
    version: int = 0  # the current policy version
    no_train: bool = False  # the chat's "don't use this chat for training" switch, as set


@dataclass
class ArenaUpdate:
    """What the Arena tab shows: two anonymous answers, and after the pick, who wrote them."""

    a: str = ""
    b: str = ""
    done: bool = False
    picked: str | None = None
    versions: tuple[int, int] | None = None  # revealed after the pick
    notices: list[str] = field(default_factory=list)


@dataclass
class ChatSession:
    session_id: str
    user_id: str
    # user/assistant messages; an assistant message also carries turn_id, version,
    # vote, rewritten, context (what the model saw) and saved.
    messages: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)  # the undo stack
    pending: dict[str, Turn] = field(default_factory=dict)  # turns not yet in Redis
    # Events that must follow a pending turn (a regenerate, a vote clicked mid-stream):
    # written, in order, right after the pending turns.
    pending_events: list[Event] = field(default_factory=list)
    # The answer being streamed: its index on the page and votes clicked on it meanwhile.
    streaming: dict[str, Any] | None = None
    arena_streaming: dict[str, Any] | None = None  # the arena battle being answered
    reactions: dict[str, int] = field(default_factory=dict)  # turn id -> events sent
    epoch: int = 0  # bumped when the conversation is replaced (new chat)
    arena: dict[str, Any] | None = None  # the last arena battle: turns, versions, pick
    # The "don't use this chat for training" switch, and every turn of the chat (answers
    # replaced by a regenerate included), so that switching covers the whole chat.
    no_train: bool = False
    chat_turns: list[str] = field(default_factory=list)
    train: bool = True  # may this person train at all (chat_ui.access.may_train)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    touched: float = field(default_factory=time.monotonic)

    @property
    def answering(self) -> bool:
        """An answer (a chat message's or an arena battle's) is being written."""
        now = time.monotonic()
        return _live(self.streaming, now) or _live(self.arena_streaming, now)


def validate_message(text: Any, settings: Settings) -> str:
    """The user's message, cleaned, or InputError saying what is wrong with it."""
    return validation.message(text, settings)


class ChatService:
    """The chat handlers for every session of one UI process."""

    def __init__(
        self,
        settings: Settings,
        policy: PolicyServer,
        store: FeedbackStore,
        on_event: Callable[[], Any] | None = None,
        route: Callable[[str], int | None] | None = None,
        arena_versions: Callable[[], tuple[int, int] | None] | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.store = store
        self.on_event = on_event  # e.g. "start a training round if enough feedback arrived"
        # user id -> the version to serve them (a canary's sticky share), None = current.
        self.route = route
        self.watcher: Any = None  # the hot-swap watcher, whose last error status shows
        # The two versions an arena battle compares (candidate and current, or the two
        # newest), None when only one version exists.
        self.arena_versions = arena_versions
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._sessions_lock = threading.Lock()
        self._last_sweep = time.monotonic()
        self._sweeping = False  # one sweep at a time, however many requests come in
        self._sweep_every = max(1.0, min(60.0, settings.session_idle_s / 4))

    # --- sessions --------------------------------------------------------------
    def session(
        self, session_id: str, user_id: str | None = None, train: bool | None = None
    ) -> ChatSession:
        """The session's state; ``user_id`` and ``train`` (from chat_ui.access, given by
        the web layer on every request) apply to what the session writes from now on,
        so signing in mid-chat makes the next turns the account's."""
        session_id = validation.session_id(session_id)
        now = time.monotonic()
        with self._sessions_lock:
            found = self._sessions.get(session_id)
            if found is None:
                found = ChatSession(session_id=session_id, user_id=user_id or session_id)
                self._sessions[session_id] = found
            self._sessions.move_to_end(session_id)
            found.touched = now
            if user_id:
                found.user_id = user_id
            if train is not None:
                found.train = train
            sweep = now - self._last_sweep >= self._sweep_every or len(self._sessions) > (
                MAX_SESSIONS
            )
            # Beyond MAX_SESSIONS every request asks for a sweep; one runs at a time (a
            # thread per request, each walking every session, was a flood's lever).
            sweep = sweep and not self._sweeping
            if sweep:
                self._last_sweep, self._sweeping = now, True
        if sweep:
            # In the background: saving pending turns may wait on Redis.
            threading.Thread(target=self._sweep, name="expire-sessions", daemon=True).start()
        return found

    def _sweep(self) -> None:
        try:
            self.expire_idle()
        finally:
            self._sweeping = False

    def expire_idle(self, now: float | None = None) -> int:
        """Drop sessions nobody touched for ``session_idle_s`` (an open tab polls every few
        seconds, so these are closed tabs whose unload never arrived), and beyond
        MAX_SESSIONS the least recently used. A session's pending answers are saved
        first; one whose answers cannot be saved yet (Redis down) or that is streaming
        is kept for the next sweep, so nothing is lost. Returns how many were dropped."""
        now = time.monotonic() if now is None else now
        with self._sessions_lock:
            by_age = list(self._sessions.values())  # least recently used first
            excess = len(by_age) - MAX_SESSIONS
        idle_s = self.settings.session_idle_s
        victims = [s for i, s in enumerate(by_age) if i < excess or now - s.touched > idle_s]
        dropped = 0
        for session in victims:
            with session.lock:
                if session.answering or not self._try_flush(session):
                    continue
                with self._sessions_lock:
                    if self._sessions.get(session.session_id) is session and (
                        session.touched <= now
                    ):
                        del self._sessions[session.session_id]
                        dropped += 1
        if dropped:
            log.info("dropped %d idle chat sessions (RLHF_SESSION_IDLE_S)", dropped)
        return dropped

    def drop_session(self, session_id: str) -> None:
        """Forget a closed session's conversation (its turns stay in Redis). What it has
        not saved yet (answers, and reactions queued behind them) is tried once more;
        when the store is still down the session is kept, marked idle, so that the sweep
        (``expire_idle``) saves it once the store is back: a closed tab loses nothing."""
        with self._sessions_lock:
            session = self._sessions.get(session_id)
            if session is None:
                return
            if session.answering:
                # Still answering: dropped now, the chat's next message would find a new
                # session with no answer running (an unload any script can send would
                # undo "one answer at a time"). Marked idle, the sweep drops it once done.
                session.touched = float("-inf")
                return
            del self._sessions[session_id]
        with session.lock:
            if not (session.pending or session.pending_events):
                return
            try:
                self._flush(session)
                return
            except Exception as error:
                log.warning(
                    "Session %s closed with %d unsaved answers and %d reactions, kept for the "
                    "next sweep: %s",
                    session_id,
                    len(session.pending),
                    len(session.pending_events),
                    error,
                )
            session.touched = float("-inf")  # idle: the next sweep saves it, then drops it
        with self._sessions_lock:
            current = self._sessions.setdefault(session_id, session)
        if current is not session:  # the chat id came back meanwhile: hand it the unsaved
            with current.lock:
                current.pending.update(session.pending)
                current.pending_events[:0] = session.pending_events

    def view(self, session: ChatSession) -> list[dict[str, Any]]:
        """The conversation as plain dicts (copies), with each answer's metadata."""
        return [{k: v for k, v in m.items() if k != "context"} for m in session.messages]

    def _update(self, session: ChatSession, **kwargs: Any) -> Update:
        return Update(
            messages=self.view(session), version=self.policy.current_version,
            no_train=session.no_train, **kwargs,
        )  # fmt: skip

    # --- store helpers -----------------------------------------------------------
    def _flush(self, session: ChatSession) -> None:
        """Save the session's pending turns, then its pending events (raises
        FeedbackUnavailable if Redis is down; what was not written stays pending)."""
        for turn_id, turn in list(session.pending.items()):
            try:
                self.store.save_turn(turn)
            except FeedbackError:
                # Not a store outage: this turn can never be stored (a bug upstream of the
                # checks). Keeping it would make every later call of the session fail.
                log.exception("Turn %s cannot be stored; dropped from session", turn_id)
            del session.pending[turn_id]
            for m in session.messages:
                if m.get("turn_id") == turn_id:
                    m["saved"] = True
        while session.pending_events:
            event = session.pending_events[0]
            try:
                self.store.record_event(event)
            except FeedbackError:
                log.exception("Event %s cannot be stored; dropped", event.event_id)
            session.pending_events.pop(0)

    def _save(self, session: ChatSession, turn: Turn) -> list[str]:
        """Save a new turn; when Redis is down keep it pending and say so."""
        session.pending[turn.turn_id] = turn
        session.chat_turns.append(turn.turn_id)
        try:
            self._flush(session)
            return []
        except STORE_ERRORS as error:
            log.warning("Turn %s kept pending: %s", turn.turn_id, error)
            return [
                "Feedback store unreachable, retrying… This answer is kept here and will be "
                "saved as soon as the store is back; reactions to it need the store."
            ]

    def _record(
        self,
        session: ChatSession,
        turn_id: str,
        kind: str,
        text: str | None = None,
        *,
        queue: bool = False,
    ) -> None:
        """Record one reaction with an id fixed by the session's history of this turn.

        When the store is unreachable the reaction is refused (FeedbackUnavailable, and
        nothing changes), unless ``queue``: then it waits in the session, behind the
        pending turns, and is written with them (a regenerate whose answer is shown)."""
        n = session.reactions.get(turn_id, 0)
        if (kind in VOTES or kind == "rewrite") and n >= MAX_REACTIONS_PER_ANSWER:
            # What a click repeats. Undo stays open (it only takes back what the stack
            # holds), and a regenerate is recorded once its new answer exists.
            raise validation.InputError(
                f"This answer has taken {MAX_REACTIONS_PER_ANSWER} reactions, as many as one "
                "answer keeps. Send a new message to go on."
            )
        event = Event(
            event_id=f"{turn_id}:{n}:{kind}",
            turn_id=turn_id,
            kind=kind,
            session_id=session.session_id,
            user_id=session.user_id,
            text=text,
            may_train=not session.no_train,
            consent=session.train,
        )
        session.pending_events.append(event)
        session.reactions[turn_id] = n + 1
        try:
            self._flush(session)
        except STORE_ERRORS:
            if queue:
                log.warning("%s on %s kept pending: the store is unreachable", kind, turn_id)
                return
            if event in session.pending_events:
                session.pending_events.remove(event)
                session.reactions[turn_id] = n
            raise
        # Feedback that cannot train must not start rounds either (a flood of it would
        # only queue empty ones).
        if self.on_event is not None and session.train:
            try:
                self.on_event()
            except Exception:  # a round not started must not make the vote look failed
                log.exception("on_event hook failed after %s on %s", kind, turn_id)

    def _answer_at(self, session: ChatSession, index: Any) -> tuple[int, dict[str, Any]]:
        """The finished answer the page shows at ``index`` (negative counts from the end of
        the page), and its place in ``session.messages``. While an answer streams the page
        shows the chat up to that answer's place, then the message it answers and the
        answer itself; a regenerate streams in place of the answer it replaces, which the
        page no longer shows. Only a finished answer before that place can be reacted to:
        the one streaming is not stored yet, the one being replaced is off the page.
        Called with the session's lock."""
        index = validation.answer_index(index)
        stream, n = session.streaming, len(session.messages)
        shown, finished = (n, n) if stream is None else (stream["index"] + 1, stream["index"])
        if index < 0:
            index += shown
        finished = min(finished, n)
        if not 0 <= index < finished or session.messages[index]["role"] != "assistant":
            raise InputError(
                "That message is not a finished answer of this chat (it may still be streaming, "
                "or the chat changed). Wait for the answer, then try again."
            )
        return index, session.messages[index]

    # --- generation --------------------------------------------------------------
    def _context(self, session: ChatSession, system_prompt: str | None) -> list[dict[str, str]]:
        system = clean_text(
            system_prompt if system_prompt is not None else self.settings.system_prompt
        )  # checked by validation.system_prompt before this
        context = [{"role": "system", "content": system.strip()}] if system.strip() else []
        context += [{"role": m["role"], "content": m["content"]} for m in session.messages]
        return context

    def _start(
        self, context: list[dict[str, str]], sampling: dict[str, Any] | None, user_id: str = ""
    ) -> Generation:
        version = self.route(user_id) if self.route is not None else None
        try:
            try:
                return self.policy.stream(context, sampling, version=version)
            except UnknownVersionError:
                # The candidate was just decided and unloaded: serve the current version.
                return self.policy.stream(context, sampling)
        except ContextTooLongError as error:
            raise InputError(str(error)) from error

    def _start_stream(
        self,
        session: ChatSession,
        stream: dict[str, Any],
        context: list[dict[str, str]],
        sampling: dict[str, Any] | None,
    ) -> Generation:
        """:meth:`_start` for the chat's stream (outside the lock: a queue for a version
        must not hold the chat). An answer stopped meanwhile (Undo, New chat) is
        cancelled at once: it ends without text and is not saved."""
        gen = self._start(context, sampling, session.user_id)
        with session.lock:
            stream["gen"] = gen
            if "stopped" in stream:
                gen.cancel()
        return gen

    def _trim_notice(self, gen: Generation) -> list[str]:
        if not gen.trimmed:
            return []
        return [
            f"This conversation is longer than the model's context "
            f"({self.settings.max_context_tokens} tokens): the oldest {gen.trimmed} messages "
            "were left out of this answer. Start a new chat for a fresh context."
        ]

    def _answer_message(self, gen: Generation, turn: Turn) -> dict[str, Any]:
        return {
            "role": "assistant",
            "content": gen.text,
            "turn_id": turn.turn_id,
            "version": gen.version,
            "vote": None,
            "rewritten": False,
            "context": gen.messages,
            "saved": False,
            "answer_chars": len(gen.text),  # the rewrite limit's base (validation.rewrite)
        }

    def _stream(
        self,
        gen: Generation,
        shown: list[dict[str, Any]],
        notices: list[str],
        slot: AnswerSlot,
    ) -> Iterator[Update]:
        for text in gen:
            partial = {
                "role": "assistant",
                "content": text,
                "turn_id": None,
                "version": gen.version,
            }
            slot.paused()  # see access.ABANDONED_AFTER_S
            yield Update(
                messages=[*shown, partial],
                notices=notices,
                done=False,
                version=self.policy.current_version,
            )
            slot.resumed()

    def _turn(
        self, session: ChatSession, gen: Generation, asked_at: float, parent: str | None = None
    ) -> Turn:
        # The context stored is what the model saw (after trimming): the answer is
        # conditioned on exactly that, which is what training needs. The turn is dated
        # when its context was taken, not when the answer ended: "Delete my data" clicked
        # while it streamed tombstones everything up to that moment, and an answer
        # finished after it carries the deleted chat as its context (the store refuses
        # a turn dated at or before its user's tombstone).
        return Turn(
            created_at=asked_at,
            turn_id=new_id(),
            session_id=session.session_id,
            user_id=session.user_id,
            messages=gen.messages,
            answer=gen.text,
            policy_version=gen.version,
            sampling=gen.sampling.as_dict(),
            model=self.settings.base_model,
            parent_turn_id=parent,
            finished=gen.ended_with_eos,
            may_train=session.train and not session.no_train,
            consent=session.train,
        )

    def send(
        self,
        session_id: str,
        text: Any,
        system_prompt: str | None = None,
        sampling: dict[str, Any] | None = None,
        user_id: str | None = None,
        admit: Admit | None = None,
    ) -> Iterator[Update]:
        """Stream an answer to ``text``; the last update comes after the turn is saved.
        ``admit``: see :data:`Admit`."""
        session = self.session(session_id, user_id)
        text = validate_message(text, self.settings)
        system_prompt = validation.system_prompt(system_prompt, self.settings)
        sampling = validation.sampling_dict(sampling, self.settings)
        slot, stream = AnswerSlot(), None
        try:
            with session.lock:
                self._refuse_a_second_answer(session)
                self._refuse_a_chat_too_long(session, text)
                slot = _admitted(admit)
                self._try_flush(session)
                epoch, asked_at = session.epoch, time.time()
                context = self._context(session, system_prompt)
                context.append({"role": "user", "content": text})
                shown = self.view(session) + [{"role": "user", "content": text}]
                stream = self._begin_stream(session, len(shown), slot)
                stream["text"] = text  # an Undo while it streams gives it back
            gen = self._start_stream(session, stream, context, sampling)
            notices = self._trim_notice(gen)
            yield from self._stream(gen, shown, notices, slot)
            turn = self._turn(session, gen, asked_at)
            with session.lock:
                self._refuse_a_stopped_answer(stream)
                notices = notices + self._save(session, turn)
                answer = self._answer_message(gen, turn)
                answer["saved"] = turn.turn_id not in session.pending
                if session.epoch == epoch:
                    session.messages += [{"role": "user", "content": text}, answer]
                    remember(session, {"kind": "send", "turn_id": turn.turn_id, "text": text})
                    self._apply_deferred_votes(session, stream, answer)
                self._end_stream(session, stream)  # under the lock: no vote lands in between
                final = self._update(session, notices=notices)
        finally:
            self._end_stream(session, stream)
            slot.release()
        # Yield outside the lock: Gradio may resume a generator on another thread.
        yield final

    def regenerate(
        self,
        session_id: str,
        index: int = -1,
        sampling: dict[str, Any] | None = None,
        admit: Admit | None = None,
    ) -> Iterator[Update]:
        """A new answer in place of the one at ``index`` (same context, so the two
        can form a preference pair); later messages are dropped, as in a retry.
        ``admit``: see :data:`Admit`.

        The ``regenerate`` event is recorded only together with the new answer: a
        generation that fails (or a closed tab) leaves no event behind, so a later Undo
        takes back what the person sees, not a regenerate that never showed."""
        session = self.session(session_id)
        sampling = validation.sampling_dict(sampling, self.settings)
        slot, stream = AnswerSlot(), None
        try:
            with session.lock:
                self._refuse_a_second_answer(session)
                index, old = self._answer_at(session, index)
                slot = _admitted(admit)
                epoch, asked_at = session.epoch, time.time()
                context = list(old["context"])
                shown = self.view(session)[:index]
                stream = self._begin_stream(session, index, slot)
            gen = self._start_stream(session, stream, context, sampling)
            notices = self._trim_notice(gen)
            yield from self._stream(gen, shown, notices, slot)
            turn = self._turn(session, gen, asked_at, parent=old["turn_id"])
            with session.lock:
                self._refuse_a_stopped_answer(stream)
                notices = notices + self._save(session, turn)
                answer = self._answer_message(gen, turn)
                answer["saved"] = turn.turn_id not in session.pending
                if (
                    session.epoch == epoch
                    and index < len(session.messages)
                    and (session.messages[index].get("turn_id") == old["turn_id"])
                ):
                    # Queued behind the new turn when the store is down: the page shows
                    # the new answer, so the store gets the regenerate with it.
                    self._record(session, old["turn_id"], "regenerate", queue=True)
                    removed = session.messages[index:]
                    session.messages = session.messages[:index] + [answer]
                    remember(
                        session,
                        {
                            "kind": "regenerate",
                            "turn_id": old["turn_id"],
                            "index": index,
                            "removed": removed,
                        },
                    )
                    self._apply_deferred_votes(session, stream, answer)
                self._end_stream(session, stream)  # under the lock: no vote lands in between
                final = self._update(session, notices=notices)
        finally:
            self._end_stream(session, stream)
            slot.release()
        yield final

    # --- answers still streaming ------------------------------------------------------
    def _refuse_a_second_answer(self, session: ChatSession) -> None:
        """One answer at a time per chat. The page disables nothing while an answer
        streams (Enter in the box sends), and any script can call send, regenerate and
        arena_send on one chat id at once: two answers to one chat would each take the
        context without the other and land in an order nobody sent, and one chat id
        would hold several of the server's decode slots. Called with the session's lock."""
        if session.answering:
            raise InputError(
                "An answer is still being written in this chat. Wait for it to finish, "
                "then send again."
            )

    @staticmethod
    def _refuse_a_chat_too_long(session: ChatSession, text: str, replacing: str = "") -> None:
        """A message, or a rewrite of ``replacing``, that would take the chat past
        ``MAX_CHAT_CHARS``. Called with the session's lock."""
        chars = sum(len(str(m.get("content", ""))) for m in session.messages)
        chars += len(text) - len(replacing)
        if chars > MAX_CHAT_CHARS:
            raise InputError(
                f"This chat has grown too long ({chars:,} characters with this message, the "
                f"limit is {MAX_CHAT_CHARS:,}). Start a new chat to go on: the model reads "
                "only the latest part of a chat anyway."
            )

    @staticmethod
    def _refuse_a_stopped_answer(stream: dict[str, Any]) -> None:
        """A stopped answer (:meth:`_stop_answer`, the one way an answer leaves its chat before
        it is saved) is not saved: one stopped as abandoned (``_drop_abandoned``) whose
        handler runs again after all (it was only starved, not gone), its decode cut short
        and its chat maybe answering a newer message since; or one whose chat changed under
        it (Undo, New chat, Delete my data), so that what it answers is no longer what the
        chat says. Called with the session's lock."""
        if "stopped" in stream:
            raise InputError(stream["stopped"])

    @staticmethod
    def _stop_answer(session: ChatSession, name: str, reason: str) -> dict[str, Any] | None:
        """Stop the answer being written in ``session.<name>`` ("streaming" or
        "arena_streaming"): its decode is cancelled, its caller's slot given back, and its
        handler, when it comes to save the answer, finds it stopped (``reason`` is what it
        says) and saves nothing. Returns the stopped stream, or None. Called with the
        session's lock."""
        stream = getattr(session, name)
        if stream is None:
            return None
        stream["stopped"] = reason
        if stream["gen"] is not None:
            stream["gen"].cancel()
        stream["slot"].release()
        setattr(session, name, None)
        return stream

    def _begin_stream(
        self, session: ChatSession, index: int, slot: AnswerSlot | None = None
    ) -> dict[str, Any]:
        self._drop_abandoned(session)
        stream = {"index": index, "votes": [], "slot": slot or AnswerSlot(), "gen": None}
        session.streaming = stream
        return stream

    @staticmethod
    def _drop_abandoned(session: ChatSession) -> None:
        """An abandoned answer (see :func:`_live`) stops: its decode is cancelled, its
        caller's slot given back, and the chat is free again. Called with the session's lock."""
        now = time.monotonic()
        for name in ("streaming", "arena_streaming"):
            stream = getattr(session, name)
            if stream is not None and not _live(stream, now):
                ChatService._stop_answer(session, name, ANSWER_ABANDONED)

    def _end_stream(self, session: ChatSession, stream: dict[str, Any]) -> None:
        """The answer is no longer streaming. Called with the session's lock held once the
        answer is stored (so that a vote clicked at that moment finds either the stream or
        the stored answer, never a stream already applied), and again without it when the
        generator ends: Gradio closes a generator whose client left on its event loop,
        and waiting there for the lock (held across Redis calls, up to their timeout
        while Redis hangs) would stall every visitor. One reference write needs no lock."""
        if session.streaming is stream:
            session.streaming = None

    def _apply_deferred_votes(
        self, session: ChatSession, stream: dict[str, Any], answer: dict[str, Any]
    ) -> None:
        """A 👍/👎 clicked while the answer streamed counts once the answer is stored:
        the last click wins, recorded like a vote on the finished answer."""
        if not stream["votes"]:
            return
        kind = stream["votes"][-1]
        new = None if kind == "unvote" else kind
        if answer.get("vote") == new:
            return
        self._record(session, answer["turn_id"], kind, queue=True)
        remember(session, {"kind": "vote", "turn_id": answer["turn_id"], "prev": None})
        answer["vote"] = new

    # --- reactions ---------------------------------------------------------------
    def vote(self, session_id: str, index: int, kind: str) -> Update:
        """👍 / 👎 / remove the vote on the answer at ``index`` (negative counts from the end).

        On the answer still streaming, the vote is kept and recorded when the answer is
        stored; the returned update then has ``done=False`` (the page keeps streaming)."""
        kind = validation.vote_kind(kind)
        index = validation.answer_index(index)
        session = self.session(session_id)
        with session.lock:
            stream = session.streaming
            # The page shows the streaming answer last, at its place stream["index"].
            if stream is not None and index in (stream["index"], -1):
                stream["votes"] = [kind]  # the last click wins; no list to grow
                return self._update(session, done=False)
            _, msg = self._answer_at(session, index)
            new = None if kind == "unvote" else kind
            if msg.get("vote") == new:
                return self._update(session)  # a repeated click: nothing changes
            self._record(session, msg["turn_id"], kind)
            remember(session, {"kind": "vote", "turn_id": msg["turn_id"], "prev": msg["vote"]})
            msg["vote"] = new
            return self._update(session)

    def feedback_state(self, session_id: str) -> list[str | None]:
        """The vote of every answer the page shows, the one streaming included."""
        session = self.session(session_id)
        with session.lock:
            stream = session.streaming
            shown = session.messages[: stream["index"]] if stream else session.messages
            votes = [m.get("vote") for m in shown if m["role"] == "assistant"]
            if stream is not None:
                last = stream["votes"][-1] if stream["votes"] else "unvote"
                votes.append(None if last == "unvote" else last)
            return votes

    def rewrite(self, session_id: str, index: int, text: Any) -> Update:
        """Replace the answer at ``index`` by the user's edited version."""
        session = self.session(session_id)
        validation.edited_text(text)  # its type, before any work
        with session.lock:
            _, msg = self._answer_at(session, index)
            # The limit is four times the model's answer, not the last rewrite: measured
            # on the last rewrite, each edit could quadruple the one before it.
            text = validation.rewrite(text, self.settings, msg["answer_chars"])
            # The editor starts from what the page shows, EMPTY_ANSWER for an empty answer:
            # saved unchanged, that is no edit, and the placeholder no answer anyone wrote.
            if text in (msg["content"], msg["content"] or EMPTY_ANSWER):
                return self._update(session)
            # A rewrite may be four times its answer: short messages and long rewrites
            # would grow a chat past the limit a send checks.
            self._refuse_a_chat_too_long(session, text, replacing=str(msg["content"]))
            self._record(session, msg["turn_id"], "rewrite", text)
            remember(
                session,
                {
                    "kind": "rewrite",
                    "turn_id": msg["turn_id"],
                    "prev": msg["content"],
                    "prev_rewritten": msg["rewritten"],
                },
            )
            msg["content"] = text
            msg["rewritten"] = True
            return self._update(session)

    def undo(self, session_id: str) -> Update:
        """Take back the last action of this session."""
        session = self.session(session_id)
        with session.lock:
            self._drop_abandoned(session)
            if session.streaming is not None:
                # What the person did last is the message (or regenerate) being answered:
                # Undo stops that answer, and a sent message comes back into the box. Taking
                # back an older action instead would change the chat the answer is written
                # for, and the answer would then be saved with the taken-back text as its
                # context.
                stopped = self._stop_answer(session, "streaming", ANSWER_UNDONE)
                return self._update(session, textbox=stopped.get("text"))
            if not session.actions:
                return self._update(session, notices=["Nothing to undo."])
            action = session.actions[-1]
            self._withdraw(session, self._answers_taken_back(session, action))
            if action.get("turn_id"):
                self._record(session, action["turn_id"], "undo")
            session.actions.pop()
            textbox = None
            msg = next(
                (m for m in session.messages if m.get("turn_id") == action.get("turn_id")), None
            )
            if action["kind"] == "vote" and msg is not None:
                msg["vote"] = action["prev"]
            elif action["kind"] == "rewrite" and msg is not None:
                msg["content"] = action["prev"]
                msg["rewritten"] = action["prev_rewritten"]
            elif action["kind"] == "send":
                if msg is not None:
                    at = session.messages.index(msg)
                    session.messages = session.messages[: max(at - 1, 0)]
                textbox = action["text"]
            elif action["kind"] == "regenerate":
                session.messages = session.messages[: action["index"]] + action["removed"]
            elif action["kind"] == "new_chat":
                session.messages = action["messages"]
                session.chat_turns = action.get("chat_turns", [])
                # The chat comes back with its own switch: its turns carry it (a switch set
                # in the chat after it covered only that chat), and what it answers next
                # must follow it too. The page shows it (Update.no_train).
                session.no_train = action.get("no_train", session.no_train)
                session.epoch += 1
            return self._update(session, textbox=textbox)

    @staticmethod
    def _answers_taken_back(session: ChatSession, action: dict[str, Any]) -> list[str]:
        """The answers an undo takes off the page: a sent message's, or the answer a
        regenerate wrote (the one it replaced comes back)."""
        if action["kind"] == "send":
            return [action["turn_id"]]
        if action["kind"] == "regenerate" and action["index"] < len(session.messages):
            shown = session.messages[action["index"]]
            if shown.get("turn_id") and shown["turn_id"] != action["turn_id"]:
                return [shown["turn_id"]]
        return []

    def _withdraw(self, session: ChatSession, turn_ids: list[str]) -> None:
        """An answer the person took back (Undo) stays in the log but never trains and is
        never exported: a message sent by mistake, and taken back at once, is not one the
        person meant to give. It is marked like a chat switched to "don't train" (before
        anything else changes: if the store is down, the undo fails as a whole), and leaves
        the chat's turns so that switching the chat back on does not bring it back."""
        if not turn_ids:
            return
        self.store.set_training(turn_ids, allowed=False)
        session.chat_turns = [t for t in session.chat_turns if t not in turn_ids]

    def new_chat(self, session_id: str) -> Update:
        session = self.session(session_id)
        with session.lock:
            # An answer being written answers the chat being put away: it stops, unsaved
            # (saved, it would be a turn of no chat the page shows, out of reach of that
            # chat's "don't train" switch after an Undo brings the chat back).
            self._stop_answer(session, "streaming", ANSWER_CHAT_CHANGED)
            if session.messages:
                remember(
                    session,
                    {
                        "kind": "new_chat",
                        "messages": session.messages,
                        "chat_turns": session.chat_turns,
                        "no_train": session.no_train,
                    },
                )
            session.messages = []
            session.chat_turns = []
            session.epoch += 1
            return self._update(session)

    # --- arena -------------------------------------------------------------------
    def arena_send(
        self,
        session_id: str,
        text: Any,
        system_prompt: str | None = None,
        sampling: dict[str, Any] | None = None,
        admit: Admit | None = None,
    ) -> Iterator[ArenaUpdate]:
        """Two versions answer ``text`` one after the other, shown as A and B in a random
        order; both answers are saved as turns. The last update comes after both are saved.
        ``admit``: see :data:`Admit` (the caller counts the two answers)."""
        session = self.session(session_id)
        text = validate_message(text, self.settings)
        system_prompt = validation.system_prompt(system_prompt, self.settings)
        sampling = validation.sampling_dict(sampling, self.settings)
        pair = self.arena_versions() if self.arena_versions is not None else None
        if pair is None:
            raise InputError(
                "The arena compares two versions, and this service has only one so far. "
                "It opens after the first training round publishes a version."
            )
        versions = list(pair)
        random.shuffle(versions)  # anonymous: the person cannot know which side is which
        system = clean_text(
            system_prompt if system_prompt is not None else self.settings.system_prompt
        ).strip()
        context = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        slot, battle = AnswerSlot(), None
        try:
            with session.lock:
                self._refuse_a_second_answer(session)
                slot = _admitted(admit)
                self._drop_abandoned(session)
                battle = {"slot": slot, "gen": None}
                session.arena_streaming = battle
            answers = ["", ""]
            turns: list[Turn] = []
            asked_at = time.time()
            notices: list[str] = []
            for side, version in enumerate(versions):
                if "stopped" in battle:
                    break  # refused below, with the reason
                try:
                    gen = battle["gen"] = self.policy.stream(context, sampling, version=version)
                except UnknownVersionError as error:
                    raise InputError(
                        "One of the versions was just unloaded (a new version arrived). "
                        "Send the message again."
                    ) from error
                except ContextTooLongError as error:
                    raise InputError(str(error)) from error
                for partial in gen:
                    answers[side] = partial
                    slot.paused()  # see access.ABANDONED_AFTER_S
                    yield ArenaUpdate(a=answers[0], b=answers[1])
                    slot.resumed()
                turn = self._turn(session, gen, asked_at)
                turns.append(turn)
            with session.lock:
                self._refuse_a_stopped_answer(battle)
                for turn in turns:
                    notices += self._save(session, turn)
                session.arena = {
                    "battle_id": new_id(),
                    "turns": (turns[0].turn_id, turns[1].turn_id),
                    "versions": (turns[0].policy_version, turns[1].policy_version),
                    "answers": (answers[0], answers[1]),
                    "picked": None,
                }
        finally:
            if battle is not None and session.arena_streaming is battle:  # lock-free
                session.arena_streaming = None
            slot.release()
        yield ArenaUpdate(a=answers[0], b=answers[1], done=True, notices=notices)

    def arena_pick(self, session_id: str, outcome: str) -> ArenaUpdate:
        """The person's pick: a (A is better), b, tie or both_bad. Recorded with the two
        votes it stands for; then the versions are revealed."""
        if not isinstance(outcome, str) or outcome not in BATTLE_OUTCOMES:
            shown = outcome[:20] if isinstance(outcome, str) else type(outcome).__name__
            raise InputError(f"Unknown pick {shown!r}; use one of {', '.join(BATTLE_OUTCOMES)}.")
        session = self.session(session_id)
        with session.lock:
            arena = session.arena
            if arena is None:
                raise InputError("Send a message in the arena first; then pick the better answer.")
            if arena["picked"] is not None:
                return ArenaUpdate(
                    *arena["answers"], done=True, picked=arena["picked"],
                    versions=arena["versions"], notices=["You already picked for this message."],
                )  # fmt: skip
            self._flush(session)
            battle = Battle(
                battle_id=arena["battle_id"],
                session_id=session.session_id,
                user_id=session.user_id,
                turn_a=arena["turns"][0],
                turn_b=arena["turns"][1],
                version_a=arena["versions"][0],
                version_b=arena["versions"][1],
                outcome=outcome,
                consent=session.train,
            )
            self.store.record_battle(battle)
            arena["picked"] = outcome
        if self.on_event is not None and session.train:
            try:
                self.on_event()
            except Exception:
                log.exception("on_event hook failed after an arena pick")
        return ArenaUpdate(*arena["answers"], done=True, picked=outcome, versions=arena["versions"])

    # --- consent and deletion (the rules live in rlhf_core.privacy) ----------------
    def set_no_train(self, session_id: str, no_train: Any) -> Update:
        """The chat's "don't use this chat for training" switch: it covers the whole
        chat, answers already written included, until switched back."""
        if not isinstance(no_train, bool):
            raise InputError("The training switch takes true or false.")
        session = self.session(session_id)
        with session.lock:
            if session.no_train == no_train:
                return self._update(session)
            self.store.set_training(session.chat_turns, allowed=not no_train)
            session.no_train = no_train
            notice = (
                "This chat will not be used for training, including its earlier answers."
                if no_train
                else "This chat may be used for training again."
            )
            return self._update(session, notices=[notice])

    def forget_me(self, session_id: str, also: Sequence[str] = ()) -> Update:
        """Delete my data: every turn and reaction of this session's user (and of the
        user ids in ``also``: the web layer names the id this browser's anonymous turns
        carry, written before the person signed in), from the store and from every later
        round and export; this process's open chats of those users are emptied (answers
        not yet saved are discarded, not saved)."""
        from rlhf_core.privacy import forget_user

        session = self.session(session_id)
        user_ids = set(filter(None, [session.user_id, *also]))
        with self._sessions_lock:
            mine = [s for s in self._sessions.values() if s.user_id in user_ids]
        # The chats are emptied and their answers stopped before the store deletes: an
        # answer finished during the deletion would be dated after its marker, so the
        # store would take it, with the deleted messages as its context; emptied first,
        # the next message is answered in a chat without them.
        for other in mine:
            with other.lock:
                other.pending.clear()
                other.pending_events.clear()
                for name in ("streaming", "arena_streaming"):
                    self._stop_answer(other, name, ANSWER_CHAT_CHANGED)
                other.messages, other.actions, other.chat_turns = [], [], []
                other.reactions.clear()
                other.arena = None
                other.epoch += 1
        counts = {"turns": 0, "events": 0}
        for user_id in sorted(user_ids):
            for key, n in forget_user(self.store.redis, self.settings, user_id).items():
                counts[key] = counts.get(key, 0) + n
        with session.lock:
            return self._update(
                session,
                notices=[
                    f"Deleted your data: {counts['turns']} answers and {counts['events']} "
                    "reactions. Nothing of it will be used for training or exports from now on."
                ],
            )

    # --- status ------------------------------------------------------------------
    def save_pending(self) -> tuple[int, int]:
        """At stop: save what sessions still hold (a closed tab's answers wait for a sweep
        that will not come). Returns the answers and reactions that could not be saved,
        lost with this process; after the first failure the store is taken as down, so a
        hung server costs one timeout, not one per session."""
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        answers = reactions = 0
        store_up = True
        for session in sessions:
            with session.lock:
                if store_up:
                    store_up = self._try_flush(session)
                answers += len(session.pending)
                reactions += len(session.pending_events)
        return answers, reactions

    def _try_flush(self, session: ChatSession) -> bool:
        if not (session.pending or session.pending_events):
            return True
        try:
            self._flush(session)
            return True
        except STORE_ERRORS:
            return False

    def status(self, session_id: str | None = None) -> dict[str, Any]:
        """Current policy version, whether the store answers, this session's counts.
        Also retries saving the session's pending turns."""
        out: dict[str, Any] = {
            "current_version": self.policy.current_version,
            "loaded_versions": self.policy.loaded_versions,
            "model": self.settings.base_model,
            "swap_error": getattr(self.watcher, "last_error", None),
        }
        if session_id:
            session = self.session(session_id)
            with session.lock:
                flushed = self._try_flush(session)
                out["session_answers"] = sum(m["role"] == "assistant" for m in session.messages)
                out["pending_turns"] = len(session.pending)
        else:
            flushed = True
        try:
            out["store"] = self.store.counts() if flushed else None
        except STORE_ERRORS:
            out["store"] = None
        out["store_ok"] = out["store"] is not None
        return out
