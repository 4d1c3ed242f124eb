"""The live A/B loop: who gets the candidate, what people think of it, and the decision.

A version that passes the offline gate while ``RLHF_CANARY_SHARE`` > 0 becomes the
registry's *candidate* (see :meth:`Registry.publish`): it serves that share of users,
picked by a stable hash of the user (:func:`version_for`), and the rest keep the current
version (the *baseline*). Every answer records the version that wrote it, so the live
👍 rate of each comes from the feedback store (:func:`counted_votes`): the final vote on
each answer written since the canary started, a rewrite counting as 👎, at most
``RLHF_CANARY_MAX_VOTES_PER_USER`` answers per person, and only feedback that may
train (:func:`rlhf_core.privacy.training_view`: not anonymous on a public Space, not
a "don't train" chat, not a deleted user's). :func:`check` compares the two
with the always-valid test of :mod:`rlhf_core.live_eval` and, when it decides, promotes
or rolls back through the registry, recording the numbers. Workers call it every
``RLHF_CANARY_CHECK_S`` seconds; an admin can decide instead (:func:`override`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import redis

from rlhf_core.datasets import resolve_events
from rlhf_core.feedback import FeedbackStore, arena_pick
from rlhf_core.live_eval import ABResult, Rule, decide, in_candidate_arm
from rlhf_core.periodic import PeriodicLoop
from rlhf_core.privacy import training_view
from rlhf_core.registry import CandidateError, Registry
from rlhf_core.settings import Settings

log = logging.getLogger(__name__)

# Turns written up to this long before the canary started (by another machine's
# clock) still count; anything older belongs to the period before the comparison.
CLOCK_SLACK_S = 2.0


def rule_from(settings: Settings) -> Rule:
    return Rule(
        alpha=settings.canary_alpha,
        tau=settings.canary_mixture_sd,
        burn_in=settings.canary_burn_in,
        min_votes=settings.canary_min_votes,
        margin=settings.canary_margin,
        timeout_s=settings.canary_timeout_s,
        timeout_action=settings.canary_timeout_action,
    )


def salt(candidate: dict[str, Any]) -> str:
    """Each candidate draws its own users, so the same people are not always first."""
    return f"canary-v{candidate['version']}"


def version_for(user_id: str, candidate: dict[str, Any] | None) -> int | None:
    """The version this user is served while ``candidate`` is out: the candidate's for
    its share of users, else None (= the current version)."""
    if not candidate:
        return None
    if in_candidate_arm(user_id, candidate["share"], salt(candidate)):
        return int(candidate["version"])
    return None


def counted_votes(
    store: FeedbackStore,
    settings: Settings,
    versions: tuple[int, ...],
    since: float,
    max_per_user: int,
) -> tuple[dict[int, tuple[int, int]], int]:
    """(version -> (likes, votes) on answers written since ``since`` by these versions,
    the number of arena picks that count with both their votes).

    Each answer counts once, with its final state (votes changed or undone count as
    they ended): a 👍 is a like; a 👎 or a rewrite (the person wanted another answer)
    is not. A person counts at most ``max_per_user`` answers per version, the
    earliest ones. Only events after ``since`` are read (stream ids are times).

    Only what the admission rules let train now counts (the rounds' rule, applied by
    :func:`rlhf_core.privacy.training_view`): feedback that may not train must not pick
    what everyone is served either. A stranger gets a fresh user, and so a fresh
    per-user cap, with every cookie; people whose feedback trains are signed in, or the
    deployment trusts its anonymous users. Held feedback (a rewrite waiting for review,
    a new account's) counts once it may train.

    An arena pick is two votes, one per version, that go opposite ways (the winner 👍,
    the loser 👎); the test must not take them for independent ones, so the picks whose
    two votes both count are counted too (:func:`rlhf_core.live_eval.diff_variance`)."""
    start = f"{max(0, int((since - CLOCK_SLACK_S) * 1000))}-0"
    events = [event for _, event in store.event_entries(start=start)]
    found = store.get_turns({e.turn_id for e in events})
    kept, events = training_view(
        store,
        settings,
        list(found.values()),
        [e for e in events if e.turn_id in found],
        scrub=False,
    )
    turns = {t.turn_id: t for t in kept}
    states = resolve_events(events)
    battle_of = {e.turn_id: pick[0] for e in events if (pick := arena_pick(e.event_id))}
    by_user: dict[tuple[int, str], list[tuple[float, bool, str]]] = defaultdict(list)
    for turn_id, state in states.items():
        turn = turns[turn_id]
        if turn.policy_version not in versions or turn.created_at < since - CLOCK_SLACK_S:
            continue
        if state.rewrite is not None:
            liked = False
        elif state.vote is not None:
            liked = state.vote == "like"
        else:
            continue
        by_user[(turn.policy_version, turn.user_id)].append((turn.created_at, liked, turn_id))
    out = {v: [0, 0] for v in versions}
    sides: dict[str, set[int]] = defaultdict(set)  # battle id -> versions of its counted votes
    for (version, _), votes in by_user.items():
        for _, liked, turn_id in sorted(votes)[:max_per_user]:
            out[version][0] += liked
            out[version][1] += 1
            if turn_id in battle_of:
                sides[battle_of[turn_id]].add(version)
    paired = sum(len(found) == 2 for found in sides.values())
    return {v: (likes, n) for v, (likes, n) in out.items()}, paired


def evaluate(
    client: redis.Redis, settings: Settings, now: float | None = None
) -> tuple[dict[str, Any], ABResult] | None:
    """The running canary and one look at it (no decision is applied); None when no
    candidate is out."""
    registry = Registry(client, settings)
    candidate = registry.candidate()
    if candidate is None:
        return None
    c, b = candidate["version"], candidate["baseline"]
    votes, paired = counted_votes(
        FeedbackStore(client),
        settings,
        (c, b),
        candidate["started_at"],
        settings.canary_max_votes_per_user,
    )
    now = time.time() if now is None else now
    elapsed = now - candidate["started_at"]
    result = decide(*votes[c], *votes[b], rule_from(settings), elapsed, paired=paired)
    return candidate, result


def check(client: redis.Redis, settings: Settings, now: float | None = None) -> dict | None:
    """Look at the canary and apply the decision when there is one. Returns the
    recorded decision, or None (no canary, or still collecting). Safe to call from
    several workers at once: the registry applies only the first decision."""
    looked = evaluate(client, settings, now)
    if looked is None:
        return None
    candidate, result = looked
    if result.action == "continue":
        return None
    record = {
        "by": "automatic",
        "baseline": candidate["baseline"],
        "share": candidate["share"],
        "started_at": candidate["started_at"],
        "reason": result.reason,
        "numbers": result.to_dict(),
        "rule": rule_from(settings).__dict__,
    }
    try:
        nxt = Registry(client, settings).decide(
            candidate["version"], result.action, record, started_at=candidate["started_at"]
        )
    except CandidateError:
        return None  # someone else decided first
    record.update(version=candidate["version"], action=result.action, next_candidate=nxt)
    return record


def override(
    client: redis.Redis, settings: Settings, action: str, by: str = "admin"
) -> dict[str, Any]:
    """An admin ends the canary now ('promote' or 'rollback'); the numbers so far are
    recorded with it. Raises CandidateError when no candidate is out."""
    looked = evaluate(client, settings)
    if looked is None:
        raise CandidateError("No candidate is out; nothing to promote or roll back.")
    candidate, result = looked
    record = {
        "by": by,
        "baseline": candidate["baseline"],
        "share": candidate["share"],
        "started_at": candidate["started_at"],
        "reason": f"admin override ({by}); the test said: {result.reason}",
        "numbers": result.to_dict(),
    }
    nxt = Registry(client, settings).decide(
        candidate["version"], action, record, started_at=candidate["started_at"]
    )
    record.update(version=candidate["version"], action=action, next_candidate=nxt)
    return record


def status(
    client: redis.Redis,
    settings: Settings,
    look: Callable[[redis.Redis, Settings], tuple[dict[str, Any], ABResult] | None] = evaluate,
) -> dict[str, Any]:
    """Everything the Training tab and `rlhf-chat ab status` show; ``look``: how the
    running canary is looked at (:func:`evaluate`, or a caller's cache of it)."""
    registry = Registry(client, settings)
    looked = look(client, settings)
    out: dict[str, Any] = {
        "current": registry.current(),
        "candidate": None,
        "queued": registry.candidate_queue(),
        "decisions": registry.decisions(),
        "canary_share_setting": settings.canary_share,
    }
    if looked is not None:
        candidate, result = looked
        out["candidate"] = candidate
        out["look"] = result.to_dict()
    return out


class CanaryLoop(PeriodicLoop):
    """A thread that calls :func:`check` every ``canary_check_s`` seconds (workers run
    one; several are harmless). Errors are logged and retried at the next tick."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        super().__init__(self.tick, settings.canary_check_s, "canary-loop", "canary check")
        self.settings = settings
        self.client = client

    def tick(self) -> dict[str, Any] | None:
        """One look at the running canary: its decision, or None while it keeps running."""
        if self.client is None:
            from rlhf_core.redis_server import connect

            self.client = connect(self.settings)
        decision = check(self.client, self.settings)
        if decision is not None:
            log.info(
                "canary v%s: %s (%s)",
                decision["version"], decision["action"], decision["reason"],
            )  # fmt: skip
        return decision
