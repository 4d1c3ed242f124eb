"""Feedback -> training data: final votes, pointwise examples, preference pairs,
PPO prompts, and JSONL exports in the formats TRL's trainers read.

How the events of one turn resolve (``resolve_feedback``), in stream order:

- ``like`` / ``dislike`` / ``unvote``: the last one wins. ``unvote`` removes the
  vote; a second ``like`` after a ``like`` changes nothing (a double click
  counts once). label = 1.0 for like, 0.0 for dislike, none otherwise. A vote
  made while a rewrite is in force is on the person's own text (the page shows it
  in place of the answer), so it does not count.
- ``rewrite``: the user's edited answer; the last one wins. It yields a pair
  (rewrite chosen over the original answer), not a pointwise label.
- an arena pick: recorded as the votes it stands for (winner 👍, loser 👎; a tie two 👍,
  both-bad two 👎), event ids ``arena:<battle>:<side>``; its pair is winner over loser.
- ``regenerate``: the user asked for another answer; the new answer is its own
  turn with ``parent_turn_id`` set. It carries no label by itself; votes on the
  original and on the regenerated answer (same context) make a pair.
- ``undo``: retracts the most recent not yet retracted event of that turn from
  the same session (any kind but undo). Undos stack: two undos retract the
  last two events. An undo with nothing left to retract does nothing; an undo
  cannot itself be undone (there is no redo).

Stream order is the order the server received the events, so a client clock
that is off does not reorder votes.

Every builder takes plain ``(turns, events)``: the worker passes the events of
one round, the exports pass everything. ``load_feedback`` gathers them from a
``FeedbackStore``; ``round_datasets`` does it all for one training round.

``load_feedback`` is where feedback becomes training data, so it is where privacy
applies, once (rlhf_core/privacy.py): chats switched to "don't train", deleted users,
held and dropped events are left out, and personal data in every text is scrubbed.
Builders given turns and events directly use them as given.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from rlhf_core.calibration import CALIBRATION_PROMPTS, calibration_context, is_calibration
from rlhf_core.feedback import VOTE_KINDS, Event, FeedbackStore, Turn, arena_pick, user_hash
from rlhf_core.settings import Settings, get_settings

Vote = Literal["like", "dislike"]
EXPORT_FORMATS: tuple[str, ...] = ("turns", "kto", "dpo", "reward", "arena")

T = TypeVar("T")


# --------------------------------------------------------------------------
# resolving events into a final state per turn
# --------------------------------------------------------------------------


@dataclass
class TurnFeedback:
    """The final state of one turn's feedback after all its events."""

    vote: Vote | None = None
    rewrite: str | None = None
    regenerated: bool = False
    effective: list[Event] = field(default_factory=list)  # events still in force, in order
    retracted: list[Event] = field(default_factory=list)  # events taken back by an undo
    on_edit: list[Event] = field(default_factory=list)  # votes on the person's rewrite: ignored

    @property
    def label(self) -> float | None:
        return {"like": 1.0, "dislike": 0.0}.get(self.vote) if self.vote else None


@dataclass
class Labeled:
    """A turn with its resolved feedback."""

    turn: Turn
    feedback: TurnFeedback

    @property
    def vote(self) -> Vote | None:
        return self.feedback.vote

    @property
    def label(self) -> float | None:
        return self.feedback.label

    @property
    def rewrite(self) -> str | None:
        return self.feedback.rewrite


def resolve_turn_events(events: Iterable[Event]) -> TurnFeedback:
    """Resolve the events of one turn (in stream order) into its final state."""
    effective: list[Event] = []
    retracted: list[Event] = []
    for event in events:
        if event.kind == "undo":
            for i in range(len(effective) - 1, -1, -1):
                if effective[i].session_id == event.session_id:
                    retracted.append(effective.pop(i))
                    break
            continue
        effective.append(event)
    state = TurnFeedback(effective=effective, retracted=retracted)
    for event in effective:
        if event.kind in VOTE_KINDS and state.rewrite is not None:
            # The page shows the person's edit in place of the answer: a vote now is on
            # their own text, never served, and says nothing of what the model wrote.
            state.on_edit.append(event)
            continue
        if event.kind in ("like", "dislike"):
            state.vote = event.kind  # type: ignore[assignment]
        elif event.kind == "unvote":
            state.vote = None
        elif event.kind == "rewrite":
            state.rewrite = event.text
        elif event.kind == "regenerate":
            state.regenerated = True
    return state


def resolve_events(events: Iterable[Event]) -> dict[str, TurnFeedback]:
    """Final state of every turn that has events, by turn id (events in stream order).
    The chat UI can use this to show the current vote of each answer."""
    by_turn: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_turn[event.turn_id].append(event)
    return {turn_id: resolve_turn_events(evs) for turn_id, evs in by_turn.items()}


def current_feedback(store: FeedbackStore, turn_ids: Iterable[str]) -> dict[str, TurnFeedback]:
    """The present state of each turn's feedback, read from the store (for a UI
    that redraws its buttons); turns without events get an empty state."""
    ids = list(dict.fromkeys(turn_ids))
    states = resolve_events(store.events_for_turns(ids))
    return {t: states.get(t) or TurnFeedback() for t in ids}


def resolve_feedback(
    turns: Iterable[Turn] | Mapping[str, Turn], events: Iterable[Event]
) -> list[Labeled]:
    """One Labeled per turn (in the order given), with the final state of its
    events. Events on turns not given are ignored."""
    turn_list = list(turns.values()) if isinstance(turns, Mapping) else list(turns)
    states = resolve_events(events)
    return [Labeled(t, states.get(t.turn_id) or TurnFeedback()) for t in turn_list]


# --------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages reduced to role and content, the keys chat templates read
    (a UI may add its own keys such as metadata)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def context_key(messages: Sequence[Mapping[str, Any]]) -> str:
    """A canonical string for a context, to tell when two answers reply to the same one."""
    return json.dumps(chat_messages(messages), ensure_ascii=False, sort_keys=True)


def pointwise_examples(
    turns: Iterable[Turn] | Mapping[str, Turn],
    events: Iterable[Event],
    *,
    focus: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Thumbs as labels: [{messages, answer, label (1.0 like / 0.0 dislike), user_id,
    turn_id}] for every turn whose final vote is a like or a dislike. ``focus``
    (turn ids) keeps only those turns."""
    out = []
    for item in resolve_feedback(turns, events):
        if item.label is None or (focus is not None and item.turn.turn_id not in focus):
            continue
        out.append(
            {
                "messages": chat_messages(item.turn.messages),
                "answer": item.turn.answer,
                "label": item.label,
                "user_id": item.turn.user_id,
                "turn_id": item.turn.turn_id,
                "finished": item.turn.finished,
            }
        )
    return out


def preference_pairs(
    turns: Iterable[Turn] | Mapping[str, Turn],
    events: Iterable[Event],
    *,
    focus: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Pairs [{messages, chosen, rejected, user_id, source, chosen_turn_id,
    rejected_turn_id}] from

    - rewrites: the rewritten text is chosen over the turn's original answer;
    - arena picks: the winner of one battle over its loser (source "arena"). A tie or
      both-bad says neither answer is better: no pair (its two votes are labels for
      the pointwise examples). An answer written for the arena is compared with its
      rival only: its vote is half of a relative judgement, not a verdict to pair with
      another battle's answers;
    - votes: a liked and a disliked answer of one user to the same context
      (same messages, e.g. an answer and its regenerate), as :func:`vote_pairings`
      pairs them. A pair states one person's preference, so answers of different
      users are not paired.

    Pairs whose two sides are the same text are dropped (no preference), and a
    pair is kept once. ``focus`` (turn ids) keeps pairs with a side in it.
    """
    labeled = resolve_feedback(turns, events)
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()

    def add(item: Labeled, chosen: str, rejected: str, source: str, chosen_id: str | None,
            rejected_id: str, chosen_finished: bool, rejected_finished: bool) -> None:  # fmt: skip
        if chosen.strip() == rejected.strip():
            return
        if focus is not None and chosen_id not in focus and rejected_id not in focus:
            return
        key = (context_key(item.turn.messages), chosen, rejected)
        if key in seen:
            return
        seen.add(key)
        out.append(
            {
                "messages": chat_messages(item.turn.messages),
                "chosen": chosen,
                "rejected": rejected,
                "user_id": item.turn.user_id,
                "source": source,
                "chosen_turn_id": chosen_id,
                "rejected_turn_id": rejected_id,
                "chosen_finished": chosen_finished,
                "rejected_finished": rejected_finished,
            }
        )

    for item in labeled:
        if item.rewrite is not None:
            # The rewrite has no turn of its own; it is attributed to its turn. A person's
            # text is a whole answer (it ends), the served one may have been cut.
            add(item, item.rewrite, item.turn.answer, "rewrite", item.turn.turn_id,
                item.turn.turn_id, True, item.turn.finished)  # fmt: skip

    # Battle id -> side -> its answer; filled in stream order, so pairs come out in the
    # order the battles were picked.
    battles: dict[str, dict[str, Labeled]] = defaultdict(dict)
    for item in labeled:
        for event in item.feedback.effective:
            pick = arena_pick(event.event_id)
            if pick is not None:
                battles[pick[0]][pick[1]] = item
    in_arena = {item.turn.turn_id for sides in battles.values() for item in sides.values()}
    for sides in battles.values():
        a, b = sides.get("a"), sides.get("b")
        if a is None or b is None:
            continue  # the other answer was deleted or may not train
        votes = (a.vote, b.vote)
        if votes in (("like", "dislike"), ("dislike", "like")):
            good, bad = (a, b) if votes[0] == "like" else (b, a)
            add(good, good.turn.answer, bad.turn.answer, "arena", good.turn.turn_id,
                bad.turn.turn_id, good.turn.finished, bad.turn.finished)  # fmt: skip

    groups: dict[tuple[str, str], list[Labeled]] = defaultdict(list)
    for item in labeled:
        if item.vote is not None and item.turn.turn_id not in in_arena:
            groups[(item.turn.user_id, context_key(item.turn.messages))].append(item)
    for group in groups.values():
        liked = [i for i in group if i.vote == "like"]
        disliked = [i for i in group if i.vote == "dislike"]
        for g, b in vote_pairings(len(liked), len(disliked)):
            good, bad = liked[g], disliked[b]
            add(good, good.turn.answer, bad.turn.answer, "vote", good.turn.turn_id,
                bad.turn.turn_id, good.turn.finished, bad.turn.finished)  # fmt: skip
    return out


PAIRS_PER_ANSWER = 2


def vote_pairings(n_liked: int, n_disliked: int) -> list[tuple[int, int]]:
    """Which (liked, disliked) answers of one person to one context make pairs, by index:
    every combination while one side has at most ``PAIRS_PER_ANSWER`` answers (an answer
    and its regenerates); beyond that each answer of the longer side is paired with
    ``PAIRS_PER_ANSWER`` consecutive answers of the shorter one (round robin), so every
    answer is in ``PAIRS_PER_ANSWER`` pairs or more, and the pairs are distinct. Every
    combination would grow with the square of one person's answers to one prompt (review
    of s22: 150 liked and 150 disliked answers, 22,500 pairs, all scored twice in every
    round), and its pairs would move together, one answer in a hundred of them."""
    if min(n_liked, n_disliked) <= PAIRS_PER_ANSWER:
        return [(g, b) for g in range(n_liked) for b in range(n_disliked)]
    if n_liked >= n_disliked:
        return [(i, (i + shift) % n_disliked)
                for shift in range(PAIRS_PER_ANSWER) for i in range(n_liked)]  # fmt: skip
    return [((i + shift) % n_liked, i)
            for shift in range(PAIRS_PER_ANSWER) for i in range(n_disliked)]  # fmt: skip


def pair_digest(pair: dict[str, Any]) -> str:
    """A pair's fixed identity (its context and both answers), for choosing by content."""
    text = json.dumps([context_key(pair["messages"]), pair["chosen"], pair["rejected"]])
    return hashlib.sha1(text.encode()).hexdigest()


def _user_of(item: Any) -> Any:
    if isinstance(item, Mapping):
        return item.get("user_id")
    return getattr(item, "user_id", None)


def cap_per_user(
    items: Sequence[T],
    max_per_user: int | Mapping[Any, int] | None,
    seed: int = 0,
    *,
    user_of: Callable[[T], Any] = _user_of,
    choose_by: Callable[[T], Any] | None = None,
) -> list[T]:
    """Keep at most ``max_per_user`` items per user (items are dicts with a
    ``user_id`` key or objects with a ``user_id`` attribute), so one person
    cannot dominate a batch. Which items a prolific user keeps is a seeded
    random sample, so it does not always favour their oldest or newest; with
    ``choose_by``, the items with the smallest keys instead (the same ones as
    long as no lower key comes). The kept items stay in their original order.
    ``None`` means no cap; a mapping gives each user their own cap (a user not in it
    keeps none)."""
    if max_per_user is None:
        return list(items)
    if not isinstance(max_per_user, Mapping) and max_per_user < 1:
        raise ValueError(
            f"max_per_user must be at least 1 (or None for no cap), got {max_per_user}."
        )
    by_user: dict[Any, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_user[user_of(item)].append(index)
    rng = random.Random(seed)
    keep: set[int] = set()
    # Sorted by repr so the sample depends only on the seed and the data.
    for user in sorted(by_user, key=repr):
        indices = by_user[user]
        cap = max_per_user.get(user, 0) if isinstance(max_per_user, Mapping) else max_per_user
        if len(indices) <= cap:
            keep.update(indices)
        elif choose_by is not None:
            keep.update(sorted(indices, key=lambda i: choose_by(items[i]))[:cap])
        else:
            keep.update(rng.sample(indices, cap))
    return [item for index, item in enumerate(items) if index in keep]


def latest_per_context(turns: Iterable[Turn]) -> list[Turn]:
    """The most recent turn of each distinct context among ``turns``, most recent first."""
    latest: dict[str, Turn] = {}
    for turn in sorted(turns, key=lambda t: t.created_at, reverse=True):
        latest.setdefault(context_key(turn.messages), turn)
    return list(latest.values())


def ppo_prompts(turns: Iterable[Turn], limit: int | None = None) -> list[list[dict[str, Any]]]:
    """The distinct contexts of ``turns`` (most recent first), as PPO prompts."""
    return [chat_messages(t.messages) for t in latest_per_context(turns)[:limit]]


def trainable_contexts(store: FeedbackStore, settings: Settings | None = None) -> list[Turn]:
    """The most recent turn of each distinct context among the turns that may train
    (consented, not deleted, not held back), most recent first: the pool replayed and gate
    prompts are drawn from. Turns rather than contexts, so that the pool can be capped per
    user: a message needs no vote, and the window caps only votes."""
    from rlhf_core.privacy import training_view

    turns, _ = training_view(store, settings or get_settings(), list(store.turns()), [])
    return latest_per_context(turns)


def replay_prompts(
    store: FeedbackStore,
    n: int,
    seed: int = 0,
    *,
    exclude: Iterable[Sequence[dict]] = (),
    settings: Settings | None = None,
    max_per_user: int | None = None,
) -> list[list[dict[str, Any]]]:
    """``n`` distinct contexts sampled (seeded) from every turn that may train,
    other than ``exclude`` -- older prompts replayed so PPO does not forget them. At most
    ``max_per_user`` contexts of any one user in the pool they are drawn from, as for
    replayed examples."""
    excluded = {context_key(m) for m in exclude}
    pool = [
        t for t in trainable_contexts(store, settings)
        if context_key(t.messages) not in excluded and not is_heldout(t)
    ]  # fmt: skip
    pool = cap_per_user(pool, max_per_user, seed)
    rng = random.Random(seed)
    return [chat_messages(t.messages) for t in rng.sample(pool, min(n, len(pool)))]


def gate_prompts(
    store: FeedbackStore,
    n: int,
    seed: int = 0,
    *,
    settings: Settings | None = None,
    max_per_user: int | None = None,
) -> list[list[dict[str, Any]]]:
    """``n`` distinct prompts the KL gate samples on, none of which any round trains on:
    held-out contexts first (a seeded sample of every turn that may train, at most
    ``max_per_user`` contexts of any one user in the pool: one account's messages, chosen
    for answers that move the KL little, must not be what the gate measures), topped up
    with the built-in calibration prompts (:mod:`rlhf_core.calibration`, with the default
    system prompt) while the store has fewer than ``n`` of them.

    No round trains on either (not the reward model, not PPO), so the gate measures the
    policy on prompts it has not seen, as serving will: measured on the round's own PPO
    prompts, where the KL penalty was optimised, the gate sat below the KL of the same
    versions on the benchmark's held-out prompts (formal, 17 versions: +1.33 nats on
    average, 14 of 17 above). And it measures on as many prompts as it takes answers: on
    the 5-10 held-out contexts of the first rounds alone it read 6.75 nats [bound 8.93]
    for a version that measured 11.85 on 32 held-out prompts (question, 203c79c)."""
    settings = settings or get_settings()
    contexts = trainable_contexts(store, settings)
    pool = cap_per_user([t for t in contexts if is_heldout(t)], max_per_user, seed)
    rng = random.Random(seed)
    chosen = [chat_messages(t.messages) for t in rng.sample(pool, min(n, len(pool)))]
    if len(chosen) < n:
        # A calibration prompt someone also sent is a context of the store: held out
        # (already in the pool) or trained on (then not unseen).
        in_store = {context_key(t.messages) for t in contexts}
        extra = [
            c for c in (calibration_context(text, settings.system_prompt)
                        for text in CALIBRATION_PROMPTS)
            if context_key(c) not in in_store
        ]  # fmt: skip
        chosen += rng.sample(extra, min(n - len(chosen), len(extra)))
    return chosen


# --------------------------------------------------------------------------
# gathering from the store, one training round
# --------------------------------------------------------------------------


def load_feedback(
    store: FeedbackStore,
    events: Iterable[Event] | None = None,
    *,
    settings: Settings | None = None,
    raw: bool = False,
) -> tuple[list[Turn], list[Event]]:
    """Turns and events to build datasets from.

    With no ``events``: every turn and every event in the store. With events
    (one round's): the turns they touch plus the other turns of the same
    sessions (regenerates of the same context, for vote pairs), and the full
    event history of all those turns, so that, say, an ``unvote`` in this round
    cancels a ``like`` from an earlier one.

    Only what may train, scrubbed (``privacy.training_view`` with ``settings``,
    default the process settings); ``raw=True`` returns the records as stored (for
    counts in the UI, never for training or export)."""
    if events is None:
        turn_list, history = list(store.turns()), list(store.events())
    else:
        touched = list(dict.fromkeys(e.turn_id for e in events))
        found = store.get_turns(touched)
        turns: dict[str, Turn] = {}
        for session_id in dict.fromkeys(t.session_id for t in found.values()):
            for turn in store.turns_for_session(session_id):
                turns[turn.turn_id] = turn
        turns.update(found)
        turn_list, history = list(turns.values()), store.events_for_turns(turns)
    if raw:
        return turn_list, history
    from rlhf_core.privacy import training_view

    return training_view(store, settings or get_settings(), turn_list, history)


# --------------------------------------------------------------------------
# the held-out split and the per-user window
# --------------------------------------------------------------------------

# One context in HELDOUT_EVERY (by a stable hash of the context) is held out: every
# example derived from it -- its thumbs, its vote pairs, its rewrites, new or replayed --
# stays out of training in every round, and its pairs measure the reward model before
# and after each round (the gate's "held-out accuracy not worse"). Splitting by context
# rather than by example keeps an answer and its regenerate on the same side.
HELDOUT_EVERY = 5


def is_heldout(item: Any) -> bool:
    """Whether a context is held out. ``item``: a list of messages, or anything with
    ``messages`` (an example or pair dict, a Turn). The only place the split is decided."""
    if isinstance(item, Mapping):
        messages = item["messages"]
    elif isinstance(item, Sequence) and not isinstance(item, str):
        messages = item
    else:
        messages = item.messages
    digest = hashlib.sha1(context_key(messages).encode()).digest()
    return digest[0] % HELDOUT_EVERY == 0


def split_heldout(examples: Iterable[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)`` by :func:`is_heldout`, order kept."""
    train: list[dict[str, Any]] = []
    heldout: list[dict[str, Any]] = []
    for example in examples:
        (heldout if is_heldout(example) else train).append(example)
    return train, heldout


def window_budgets(
    users: Iterable[Any],
    max_per_user: int | None,
    window_rounds: int,
    recent_user_events: Sequence[Mapping[str, int]] = (),
) -> dict[Any, int | None]:
    """Events each user may still train in this round: ``max_per_user`` a round on
    average over a window of ``window_rounds`` rounds (this one and the ``window_rounds
    - 1`` that trained before it, whose per-user counts are ``recent_user_events``), so
    ``max_per_user * window_rounds`` minus what the user trained in the earlier rounds
    of the window. None: no cap."""
    if max_per_user is None:
        return {user: None for user in users}
    if max_per_user < 1 or window_rounds < 1:
        raise ValueError(
            f"max_per_user and window_rounds must be at least 1 (max_per_user None for no "
            f"cap), got max_per_user={max_per_user}, window_rounds={window_rounds}."
        )
    earlier = list(recent_user_events)[-(window_rounds - 1) :] if window_rounds > 1 else []
    used: dict[Any, int] = defaultdict(int)
    for counts in earlier:
        for user, n in counts.items():
            used[user] += int(n)
    return {user: max(0, max_per_user * window_rounds - used[user]) for user in users}


@dataclass
class RoundData:
    """Everything one training round trains on and measures with, built once by
    :func:`round_datasets`: the rounds module asks for it and hands it to the trainer."""

    entries: list[tuple[str, Event]]  # (stream id, event) this round trains on
    capped: list[tuple[str, Event]]  # over the user's window budget: consumed, never trained
    pointwise: list[dict[str, Any]]  # new thumbs, held-out contexts removed
    pairs: list[dict[str, Any]]  # new pairs, held-out contexts removed
    replay_pointwise: list[dict[str, Any]]  # older thumbs mixed in (no held-out, per-user cap)
    replay_pairs: list[dict[str, Any]]
    heldout_pairs: list[dict[str, Any]]  # every held-out pair in the store: measures only
    prompts: list[list[dict[str, Any]]]  # PPO: this round's contexts, then replayed ones
    gate_prompts: list[list[dict[str, Any]]]  # the KL gate samples on them: never trained
    turn_ids: list[str]  # turns touched by the trained events
    user_events: dict[str, int]  # trained events per user digest; later rounds' window reads it
    seed: int  # this round's seed (derived from the round)
    labelled: int = 0  # new votes and rewrites, held-out ones included
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def events(self) -> list[Event]:
        return [event for _, event in self.entries]

    @property
    def stream_ids(self) -> list[str]:
        return [sid for sid, _ in self.entries]


def round_datasets(
    store: FeedbackStore,
    entries: Sequence[tuple[str, Event]],
    *,
    max_per_user: int | None = None,
    window_rounds: int = 1,
    recent_user_events: Sequence[Mapping[str, int]] = (),
    n_prompts: int = 0,
    n_gate_prompts: int = 0,
    seed: int = 0,
    settings: Settings | None = None,
) -> RoundData:
    """The whole dataset of one round from its unconsumed ``entries`` (as read with
    ``read_unconsumed``), in one value:

    1. the per-user window: each user keeps at most their budget (:func:`window_budgets`)
       of these events, a seeded sample; the rest are ``capped`` -- the caller acks them
       untrained, so a flood neither comes back as new feedback round after round nor,
       read oldest first, holds back everyone else's newer feedback (it stays in the
       store, where the replay below draws at most ``max_per_user`` of a user's
       examples a round);
    2. pointwise examples of the touched turns and pairs with a touched side (the full
       event history of those turns is read, so an unvote cancels an older like), minus
       every held-out context; a user's pairs at most ``PAIRS_PER_ANSWER`` per event of
       the round on their answers;
    3. a replay of older feedback, as many of each kind as the new ones: never a
       held-out context, never a touched turn, at most ``max_per_user`` examples of any
       one user in the pool it is drawn from (a prolific user's history must not come
       back to dominate either);
    4. every held-out pair in the store (to measure the reward model), at most
       ``max_per_user * window_rounds`` of any one user, the same ones from round to
       round (chosen by :func:`pair_digest`);
    5. PPO prompts: the touched contexts, topped up to ``n_prompts`` with replayed ones,
       never a held-out context, at most ``max_per_user`` of any one user in the pool;
    6. ``n_gate_prompts`` prompts for the KL gate: held-out contexts (at most
       ``max_per_user`` of any one user in the pool), topped up with calibration prompts
       (:func:`gate_prompts`).
    """
    users = dict.fromkeys(event.user_id for _, event in entries)
    # The window's counts are kept in the registry's versions, by digest: "Delete my data"
    # must not leave the id there (nor a round that ran meanwhile write it again).
    budgets = window_budgets(
        {user_hash(u) for u in users}, max_per_user, window_rounds, recent_user_events
    )
    rng = random.Random(seed)
    keep: set[str] = set()
    # Sorted by repr so the sample depends only on the seed and the data.
    for user in sorted(users, key=repr):
        ids = [sid for sid, event in entries if event.user_id == user]
        budget = budgets[user_hash(user)]
        keep.update(ids if budget is None or len(ids) <= budget else rng.sample(ids, budget))
    kept = [(sid, event) for sid, event in entries if sid in keep]
    capped = [(sid, event) for sid, event in entries if sid not in keep]
    events = [event for _, event in kept]

    turns, history = load_feedback(store, events, settings=settings) if events else ([], [])
    touched = list(dict.fromkeys(e.turn_id for e in events))
    focus = set(touched)
    window_cap = None if max_per_user is None else max_per_user * window_rounds
    # A pair combines votes (liked and disliked answers), so it is capped on its own too:
    # PAIRS_PER_ANSWER for each event this round trains on the user's answers, and never
    # more than the window's budget. The window counts events, and one 👍 on one more
    # regenerate pairs with every 👎 answer of the chat to that prompt: capped at the
    # window's budget alone, one vote a round brought a window's worth of pairs every
    # round, from 👎 events the window had capped untrained.
    writer = {t.turn_id: t.user_id for t in turns}
    pair_caps = None
    if max_per_user is not None:
        on_answers = Counter(writer[e.turn_id] for e in events if e.turn_id in writer)
        pair_caps = {u: min(window_cap, PAIRS_PER_ANSWER * n) for u, n in on_answers.items()}
    all_pointwise = cap_per_user(pointwise_examples(turns, history, focus=focus), window_cap, seed)
    all_pairs = cap_per_user(preference_pairs(turns, history, focus=focus), pair_caps, seed)
    pointwise, heldout_point = split_heldout(all_pointwise)
    pairs, heldout_new_pairs = split_heldout(all_pairs)

    old_turns, old_events = load_feedback(store, settings=settings) if events else ([], [])
    old_point, _ = split_heldout(
        p for p in pointwise_examples(old_turns, old_events) if p["turn_id"] not in focus
    )
    store_pairs = preference_pairs(old_turns, old_events)
    old_pairs, _ = split_heldout(
        p for p in store_pairs if not {p["chosen_turn_id"], p["rejected_turn_id"]} & focus
    )
    # Capped per user as the training pairs are: the sign test of the reward gate counts
    # pairs, and one person's many pairs on held-out contexts would decide it alone. Chosen
    # by content, so the reward model is measured on the same pairs from round to round.
    heldout = [p for p in store_pairs if is_heldout(p)]
    heldout_pairs = cap_per_user(heldout, window_cap, choose_by=pair_digest)
    replay_rng = random.Random(seed + 1)
    old_point = cap_per_user(old_point, max_per_user, seed)
    old_pairs = cap_per_user(old_pairs, max_per_user, seed)
    replay_point = replay_rng.sample(old_point, min(len(pointwise), len(old_point)))
    replay_pairs = replay_rng.sample(old_pairs, min(len(pairs), len(old_pairs)))

    prompts = ppo_prompts([t for t in turns if t.turn_id in focus and not is_heldout(t)])
    if events and len(prompts) < n_prompts:
        prompts += replay_prompts(
            store, n_prompts - len(prompts), seed + 2, exclude=prompts, settings=settings,
            max_per_user=max_per_user,
        )  # fmt: skip
    unseen = (
        gate_prompts(store, n_gate_prompts, seed + 3, settings=settings, max_per_user=max_per_user)
        if events
        else []
    )

    user_events: dict[str, int] = defaultdict(int)
    for event in events:
        user_events[user_hash(event.user_id)] += 1
    stats = {
        "events": len(events),
        "events_capped": len(capped),
        "turns": len(focus),
        "users": len(user_events),
        "pointwise": len(pointwise),
        "pairs": len(pairs),
        "pointwise_heldout": len(heldout_point),
        "pairs_heldout": len(heldout_new_pairs),
        "replay_pointwise": len(replay_point),
        "replay_pairs": len(replay_pairs),
        "heldout_pairs": len(heldout_pairs),
        "prompts": len(prompts),
        "gate_prompts": len(unseen),
        "gate_calibration_prompts": sum(is_calibration(p) for p in unseen),
    }
    return RoundData(
        entries=kept,
        capped=capped,
        pointwise=pointwise,
        pairs=pairs,
        replay_pointwise=replay_point,
        replay_pairs=replay_pairs,
        heldout_pairs=heldout_pairs,
        prompts=prompts,
        gate_prompts=unseen,
        turn_ids=touched,
        user_events=dict(user_events),
        seed=seed,
        labelled=len(all_pointwise) + len(all_pairs),
        stats=stats,
    )


# --------------------------------------------------------------------------
# TRL formats and export
# --------------------------------------------------------------------------


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def to_kto_rows(
    turns: Iterable[Turn] | Mapping[str, Turn], events: Iterable[Event]
) -> list[dict[str, Any]]:
    """TRL unpaired preference, conversational (KTOTrainer):
    {"prompt": [messages], "completion": [{"role": "assistant", ...}], "label": bool}."""
    return [
        {
            "prompt": ex["messages"],
            "completion": _assistant(ex["answer"]),
            "label": ex["label"] == 1.0,
        }
        for ex in pointwise_examples(turns, events)
    ]


def to_dpo_rows(
    turns: Iterable[Turn] | Mapping[str, Turn], events: Iterable[Event]
) -> list[dict[str, Any]]:
    """TRL preference with explicit prompt, conversational (DPOTrainer):
    {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]},
    one row per :func:`preference_pairs` pair (rewrites, vote pairs, arena picks with a
    winner)."""
    return [
        {
            "prompt": pair["messages"],
            "chosen": _assistant(pair["chosen"]),
            "rejected": _assistant(pair["rejected"]),
        }
        for pair in preference_pairs(turns, events)
    ]


def to_reward_rows(
    turns: Iterable[Turn] | Mapping[str, Turn], events: Iterable[Event]
) -> list[dict[str, Any]]:
    """TRL RewardTrainer reads the same explicit-prompt preference rows as DPO: rewrites,
    vote pairs and decisive arena picks. Its Bradley-Terry loss has no term for "equal",
    so an arena tie or both-bad has no row here; it is in the kto export (two 👍 or two
    👎) and in the arena export (with its outcome and versions)."""
    return to_dpo_rows(turns, events)


def to_turn_rows(
    turns: Iterable[Turn] | Mapping[str, Turn], events: Iterable[Event]
) -> list[dict[str, Any]]:
    """Every turn in full with its final feedback (for analysis, not a TRL format)."""
    rows = []
    for item in resolve_feedback(turns, events):
        row = item.turn.to_dict()
        row["feedback"] = {
            "vote": item.vote,
            "label": item.label,
            "rewrite": item.rewrite,
            "regenerated": item.feedback.regenerated,
            "events": [e.to_dict() for e in item.feedback.effective],
            "retracted": [e.to_dict() for e in item.feedback.retracted],
        }
        rows.append(row)
    return rows


def battle_counts(battle: Mapping[str, Any], turns: Mapping[str, Turn]) -> bool:
    """Whether an arena pick may train, be exported or move the leaderboard: both of its
    answers are in ``turns``, the turns that may train as ``privacy.training_view`` admits
    them, and it was picked by someone who may train.

    ``turns`` must come from that view, not from the store: it applies the writer's consent,
    deletion, and the chat's training switch as set *later* (the turn record keeps the flag
    it was written with; a chat switched off and on again trains, so its picks count)."""
    if battle["turn_a"] not in turns or battle["turn_b"] not in turns:
        return False  # deleted, not consented, or the chat is switched to "don't train"
    # Picked by someone who may not train (signed out before the pick).
    return bool(battle.get("consent", True))


def counted_battles(
    store: FeedbackStore,
    settings: Settings | None = None,
    *,
    scrub: bool = True,
    max_per_user: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Turn]]:
    """The arena battles whose picks count (:func:`battle_counts`), with their turns as
    training sees them (consent, deletion and scrubbing: ``privacy.training_view``). The
    export and the leaderboard read the same ones: a flood of anonymous cookies on a
    public UI must not move the versions' ratings any more than it may train them.
    ``scrub=False`` leaves the turns' text as stored (for counting, not for export).
    ``max_per_user`` (the leaderboard: ``RLHF_CANARY_MAX_VOTES_PER_USER``, as the canary
    counts votes): a person's earliest battles only, that many per version, so that one
    account picking again and again cannot move the ratings without bound."""
    from rlhf_core.privacy import training_view

    battles = store.battles()
    ids = {t for b in battles for t in (b["turn_a"], b["turn_b"])}
    turns, _ = training_view(
        store, settings or get_settings(), list(store.get_turns(ids).values()), [], scrub=scrub
    )
    by_id = {t.turn_id: t for t in turns}
    counted = [b for b in battles if battle_counts(b, by_id)]
    if max_per_user is not None:
        seen: Counter[tuple[str, int]] = Counter()
        capped = []
        for b in counted:  # oldest first
            keys = [(b["user_id"], b["version_a"]), (b["user_id"], b["version_b"])]
            if all(seen[k] < max_per_user for k in keys):
                seen.update(keys)
                capped.append(b)
        counted = capped
    return counted, by_id


def to_arena_rows(
    battles: Iterable[Mapping[str, Any]], turns: Mapping[str, Turn]
) -> list[dict[str, Any]]:
    """Arena battles, as FastChat logs them, in DPO's conversational shape: {"prompt",
    "chosen", "rejected"} when the pick has a winner (ties and both-bad have neither),
    plus "answer_a", "answer_b", "version_a", "version_b", "outcome". The decisive ones
    are also rows of the dpo/reward exports (source "arena" in :func:`preference_pairs`);
    every pick's two votes are labels in the kto export."""
    rows = []
    for b in battles:
        if not battle_counts(b, turns):
            continue
        a, bb = turns[b["turn_a"]], turns[b["turn_b"]]
        row: dict[str, Any] = {
            "prompt": chat_messages(a.messages),
            "answer_a": _assistant(a.answer),
            "answer_b": _assistant(bb.answer),
            "version_a": b["version_a"],
            "version_b": b["version_b"],
            "outcome": b["outcome"],
            "user_id": b["user_id"],
        }
        if b["outcome"] in ("a", "b"):
            win, lose = (a, bb) if b["outcome"] == "a" else (bb, a)
            row["chosen"], row["rejected"] = _assistant(win.answer), _assistant(lose.answer)
        rows.append(row)
    return rows


_BUILDERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "turns": to_turn_rows,
    "kto": to_kto_rows,
    "dpo": to_dpo_rows,
    "reward": to_reward_rows,
}


def export_rows(
    store: FeedbackStore,
    format: str,
    events: Iterable[Event] | None = None,
    *,
    settings: Settings | None = None,
) -> list[dict[str, Any]]:
    """Rows of one export format from the whole store (or from ``events``' turns):
    what may train, scrubbed (see ``load_feedback``)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(
            f"Unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}."
        )
    if format == "arena":
        return to_arena_rows(*counted_battles(store, settings))
    turns, all_events = load_feedback(store, events, settings=settings)
    return _BUILDERS[format](turns, all_events)


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write rows as UTF-8 JSON lines (non-ASCII kept as is), atomically: the file
    appears complete or not at all. Returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                # ensure_ascii=False keeps emoji and RTL text readable; JSON still
                # escapes control characters and U+2028/2029 are valid inside strings.
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False))
                f.write("\n")
                count += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file written by ``write_jsonl``. Lines are split on "\\n" only:
    str.splitlines would also split inside strings at U+2028 and friends."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def export(
    store: FeedbackStore,
    format: str,
    path: str | os.PathLike[str],
    events: Iterable[Event] | None = None,
    *,
    settings: Settings | None = None,
) -> int:
    """Write one export format (turns, kto, dpo, reward, arena) as JSONL; returns the row count."""
    return write_jsonl(export_rows(store, format, events, settings=settings), path)
