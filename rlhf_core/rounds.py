"""One training round, start to finish: lock, read feedback, train, gate, publish, ack.

This is plain library code (no Celery): the worker task calls :func:`run_round`,
and so can a test or a script.

Crash safety, step by step (a worker may be killed at any line):

1. Take the training lock (fencing token). A dead holder's lease runs out after
   ``RLHF_LOCK_TTL_S``; until then other rounds are refused ("busy").
2. Read unconsumed events through the consumer group. With the lock held, any
   pending entry belongs to a round that is over (it crashed or failed its gate),
   so they are reclaimed at once (``min_idle_ms=0``).
3. Drop entries a published version already trained on (the registry records
   them atomically with the publish) -- a crash between publish and ack must not
   count an event twice; they are acked now. Ask ``datasets.round_datasets`` once for
   everything the round trains on; entries over their user's window cap are acked
   untrained (losing them in a crash loses nothing that would have trained).
4. Train into a private temporary folder. A crash here leaves nothing visible.
5. Gate. Pass: publish the reward model (its own version), then one atomic publish
   of the policy (refused if our token is stale), then ack.
   Refused for KL (the policy moved too far from the base or from its parent): the
   reward model is published all the same and the events are acked -- it learned from
   them, and handing them back would train it on them twice and retrain a policy that
   cannot go further, round after round. The KL controller's larger coefficient is kept
   for the next round (``Registry.set_trainer_state``).
   Any other failure: record why, hand the events back (still unacked) for the next round.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from rlhf_core.datasets import is_heldout, round_datasets
from rlhf_core.feedback import Event, FeedbackStore
from rlhf_core.privacy import apply_retention, sort_entries
from rlhf_core.registry import ROUND_ERROR, Registry, StaleTokenError
from rlhf_core.settings import Settings

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]
# Events read per round at most; more wait for the next round.
MAX_EVENTS_PER_ROUND = 512
# The first present is gated: the 95% upper bound of the KL of answers sampled as the UI
# samples them, after the round (gate.gate_samples_kl); the others for rounds run by
# other trainers.
KL_KEYS = (
    "objective/kl_served_ucb",
    "objective/kl_served",
    "objective/kl",
    "objective/kl_final",
    "policy/kl",
)
# The same to the version the round started from, against RLHF_KL_ROUND_BUDGET.
KL_PARENT_KEYS = ("objective/kl_parent_ucb", "objective/kl_parent")
KL_TOTAL, KL_ROUND = "kl_total", "kl_round"
ACCURACY_KEY = "reward/accuracy"
HELDOUT_PAIRS_KEY = "reward/heldout_pairs"
ACCURACY_BEFORE_KEYS = ("reward/accuracy_before", "reward/heldout_accuracy_before")
# Net held-out pairs made worse, leaving out the person whose pairs got most worse
# (reward.pairs_worse_without_top_user): no one person decides the reward gate alone.
WORSE_WITHOUT_TOP_USER_KEY = "reward/heldout_worse_without_top_user"


@dataclass
class RoundOutcome:
    """What a round did: ``published``, ``failed`` (gate or error), ``busy`` (another
    round holds the lock) or ``skipped`` (nothing to learn from)."""

    status: str
    reason: str = ""
    version: int | None = None
    parent: int | None = None
    events: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    token: int | None = None
    duration_s: float = 0.0
    role: str = ""  # a published version's: current, candidate (canary) or queued

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LeaseLostError(StaleTokenError):
    """A round found, at one of its progress reports, that its lease on the training lock
    had passed to another worker: it stops there instead of training to a refused publish."""


def round_seed(base_seed: int, token: int) -> int:
    """The seed of one round, from the base seed (RLHF_SEED) and the round's fencing
    token: rounds draw different samples (replay, caps, PPO batches, sampling) while a
    rerun of the same round draws the same ones. Hashed rather than added, so that
    neighbouring rounds' derived streams (``seed + 1`` ...) do not coincide."""
    digest = hashlib.sha256(f"{base_seed}/{token}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def recent_user_events(registry: Registry, rounds: int) -> list[dict[str, int]]:
    """Trained events per user of the last ``rounds`` rounds that trained, oldest first.
    Read from the reward versions: every such round publishes one, also a round whose
    policy the gate refused (its events trained the reward model and were consumed).
    Versions written before this was recorded count as none."""
    if rounds <= 0:
        return []
    versions = registry.reward_versions()[-rounds:]
    return [registry.get_reward(v).get("user_events", {}) for v in versions]


def gate(metrics: dict[str, float], settings: Settings) -> str | None:
    """Why a round must not be published, or None when it passes (see :func:`gate_check`)."""
    return gate_check(metrics, settings)[0]


def reward_drop_p_value(
    before: float, after: float, pairs: int, worse_without_top_user: float | None = None
) -> float:
    """One-sided p-value that the retrained reward model is worse on the held-out pairs.

    Both models are scored on the same ``pairs``: a sign test (McNemar's exact test) on
    the pairs that changed. The accuracies give only the net change, ``k`` more pairs
    wrong than before; the fewest changed pairs they allow (``k`` wrong, none newly
    right) give the smallest p-value, ``0.5 ** k``, so this errs toward refusing. On the
    3-4 held-out pairs of an early round no drop is significant (a drop of one pair: p =
    0.5): a coin flip must not throw a round away. 0.75 -> 0.50 on 20 pairs: k = 5,
    p = 1/32 = 0.031. ``worse_without_top_user``: the same count without the pairs of the
    person whose pairs got most worse; the test then counts the smaller of the two.
    """
    k = round((before - after) * pairs)
    if worse_without_top_user is not None:
        k = min(k, round(worse_without_top_user))
    return 1.0 if k <= 0 else 0.5**k


def gate_check(metrics: dict[str, float], settings: Settings) -> tuple[str | None, str | None]:
    """``(reason, kind)`` why a round must not be published, ``(None, None)`` when it passes.

    - every metric finite (a NaN loss means broken weights); kind ``"non-finite"``;
    - the served KL to the base within ``settings.kl_budget`` (its 95% upper bound when
      measured, else its mean; a budget of 0 or less admits no change at all); kind
      :data:`KL_TOTAL`;
    - the served KL to the parent version within ``settings.kl_round_budget`` (how far
      one round may move what people are served); kind :data:`KL_ROUND`;
    - held-out reward-model accuracy not significantly below the accuracy before the
      round (``reward_drop_p_value`` < ``settings.reward_gate_alpha``, counting the pairs
      made worse without the one person whose pairs got most worse); ``"reward"``.
    """
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        return f"non-finite metrics: {', '.join(bad)}", "non-finite"
    after = metrics.get(ACCURACY_KEY)
    before = next((metrics[k] for k in ACCURACY_BEFORE_KEYS if k in metrics), None)
    if after is not None and before is not None and after < before - 1e-9:
        why = f"held-out reward accuracy {after:.2f} < {before:.2f} before the round"
        pairs = metrics.get(HELDOUT_PAIRS_KEY)
        if pairs is None:  # no count to test against: any drop refuses
            return why, "reward"
        p_value = reward_drop_p_value(
            before, after, int(pairs), metrics.get(WORSE_WITHOUT_TOP_USER_KEY)
        )
        if p_value < settings.reward_gate_alpha:
            return f"{why} (p = {p_value:.3f} on {int(pairs)} pairs)", "reward"
    key = next((k for k in KL_KEYS if k in metrics), None)
    budget = settings.kl_budget
    if key is not None:
        kl = metrics[key]
        bound = " (95% bound)" if key.endswith("_ucb") else ""
        if kl > budget:
            return f"KL {kl:.3g}{bound} > budget {budget:g}", KL_TOTAL
        if budget <= 0:
            why = f"KL {kl:.3g} with a budget of {budget:g} (a budget of 0 admits no change)"
            return why, KL_TOTAL
    key = next((k for k in KL_PARENT_KEYS if k in metrics), None)
    if key is not None and metrics[key] > settings.kl_round_budget:
        bound = " (95% bound)" if key.endswith("_ucb") else ""
        limit = settings.kl_round_budget
        return f"KL to the parent {metrics[key]:.3g}{bound} > round budget {limit:g}", KL_ROUND
    return None, None


def round_is_due(settings: Settings, client: redis.Redis) -> bool:
    """Enough new feedback for an automatic round: ``train_every`` unconsumed events,
    and after a failed round ``train_every`` more than that round saw (so a round
    that keeps failing on the same events is not retried on every click)."""
    store = FeedbackStore(client)
    counts = store.counts()
    # Held entries count once their time has come; the others do not start rounds.
    counts["unconsumed"] += store.held_count()
    if counts["unconsumed"] < settings.train_every:
        return False
    last = Registry(client, settings).last_round()
    if last and last.get("status") == "failed" and "events_total" in last:
        return counts["events"] - int(last["events_total"]) >= settings.train_every
    return True


def _sleep_for_tests(seconds: float, report: ProgressFn) -> None:
    """RLHF_DEBUG_ROUND_DELAY_S: hold the round open (events pending) so crash tests
    can kill the worker in the middle of it."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        report("debug delay", 0.05)
        time.sleep(min(0.5, left))


def run_round(
    settings: Settings,
    client: redis.Redis,
    base_model: Any,
    *,
    consumer_name: str,
    progress: ProgressFn | None = None,
    reason: str = "manual",
    max_events: int = MAX_EVENTS_PER_ROUND,
    run_training_round: Callable[..., Any] | None = None,
) -> RoundOutcome:
    """Run one round if no other round runs. ``base_model`` is a ``LoadedModel`` or a
    function returning one (loaded only when there is something to train on)."""
    registry = Registry(client, settings)
    store = FeedbackStore(client)
    lock = registry.lock()
    token = lock.acquire()
    if token is None:
        return RoundOutcome("busy", "another round holds the training lock")
    # Requests made from here on need a round after this one: let them through.
    registry.clear_round_request()
    started = time.monotonic()
    taken: list[str] = []  # stream ids pending on us, not yet acked
    parent: int | None = None  # the current version the round trains from, once read
    events_total = 0
    work_dir: Path | None = None

    def report(stage: str, fraction: float) -> None:
        try:
            registry.set_progress(stage, fraction, token, reason=reason, events=len(taken))
        except redis.RedisError as error:
            # Progress is for people watching; a blip must not throw the round away (the
            # lease renewal tolerates blips too, and the publish checks the lock).
            log.warning("round %s: progress not recorded (%s)", token, error)
        if progress is not None:
            progress(stage, fraction)

    def done(outcome: RoundOutcome) -> RoundOutcome:
        outcome.token = token
        outcome.duration_s = time.monotonic() - started
        return outcome

    try:
        report("reading feedback", 0.0)
        if settings.retention_days is not None:
            apply_retention(client, settings)
        events_total = store.counts()["events"]
        entries = store.read_unconsumed(consumer_name, count=max_events, min_idle_ms=0)
        # Held entries whose time came (an approved rewrite, an account now old enough).
        entries += store.held_ready(count=max(0, max_events - len(entries)))
        taken = [sid for sid, _ in entries]
        # Used by a published version, or by a reward version (a worker died before it
        # acked them): trained once already.
        already = registry.used_by(taken) | registry.reward_used_by(taken)
        if already:
            log.warning("acking %d events a published version or reward version already "
                        "trained on", len(already))  # fmt: skip
            store.ack(already)
            entries = [(sid, ev) for sid, ev in entries if sid not in already]
            taken = [sid for sid, _ in entries]
        # Consent, deletion, review and new-account hold (rlhf_core/privacy.py): held
        # entries wait aside without blocking later rounds; excluded ones never train.
        admitted = sort_entries(store, settings, entries)
        store.hold(admitted.held)
        store.ack(admitted.excluded)
        entries = admitted.train
        taken = [sid for sid, _ in entries]
        if not entries:
            why = "no new feedback"
            if admitted.held or admitted.excluded:
                why += (
                    f" that may train ({len(admitted.held)} held back for review or a new "
                    f"account, {len(admitted.excluded)} without consent or deleted)"
                )
            registry.record_round("skipped", why)
            return done(RoundOutcome("skipped", why))
        if settings.debug_round_delay_s > 0:
            _sleep_for_tests(settings.debug_round_delay_s, report)

        report("building datasets", 0.05)
        data = round_datasets(
            store,
            entries,
            max_per_user=settings.max_events_per_user,
            window_rounds=settings.user_window_rounds,
            recent_user_events=recent_user_events(registry, settings.user_window_rounds - 1),
            n_prompts=settings.ppo_batch_size,
            # One prompt per answer for the gate's search and as many others for its
            # confirmation sample (gate.gate_prompt_halves).
            n_gate_prompts=2 * settings.gate_samples,
            seed=round_seed(settings.seed, token),
            settings=settings,
        )
        if data.capped:
            # Over their user's window budget: consumed without training (they stay in
            # the stream for exports). Handed back, they would return every round.
            log.info("%d events over their users' window cap, not trained", len(data.capped))
            store.ack([sid for sid, _ in data.capped])
        taken = data.stream_ids
        if not data.entries:
            why = f"all {len(data.capped)} new events are over their users' window cap"
            registry.record_round("skipped", why, events=0, capped=len(data.capped))
            return done(RoundOutcome("skipped", why))
        if not data.labelled:
            # Only regenerates/undos/unvotes: nothing to learn, and their effect on
            # later votes is read from the per-turn history anyway.
            store.ack(taken)
            why = f"no votes or rewrites in {len(taken)} new events"
            registry.record_round("skipped", why, events=len(taken))
            return done(RoundOutcome("skipped", why, events=len(taken)))
        if not data.prompts:
            # Every new vote is on a context held out of training (one in five, by its
            # hash): they measure the reward model and the KL gate, and nothing else
            # is left to learn from or to run PPO on.
            store.ack(taken)
            why = f"all {len(taken)} new events are on held-out contexts (kept to measure with)"
            registry.record_round("skipped", why, events=len(taken))
            return done(RoundOutcome("skipped", why, events=len(taken)))
        events: list[Event] = data.events

        parent = registry.current()
        work_dir = Path(tempfile.mkdtemp(prefix=f"round{token}-", dir=_rounds_dir(settings)))
        policy_dir = registry.materialize(parent, work_dir / "in")
        reward_from = registry.current_reward()
        if reward_from:
            reward_dir = registry.materialize_reward(reward_from, work_dir / "in")
        else:  # reward models published inside policy versions (before reward versions)
            legacy = registry.latest_reward_version()
            reward_dir = registry.materialize(legacy, work_dir / "in", kind="reward")

        report("loading model", 0.08)
        base = base_model() if callable(base_model) else base_model
        if run_training_round is None:
            from rlhf_core.trainer import run_training_round

        def train_progress(stage: str, fraction: float) -> None:
            if lock.lost.is_set():
                # Another worker holds the lease now (this process was frozen past
                # RLHF_LOCK_TTL_S): the publish would be refused, so training on is waste.
                raise LeaseLostError(
                    f"This round lost the training lock (token {token}) while it trained, so "
                    f"it could not publish; it stopped at '{stage}', and its events stay "
                    "pending for the round that holds the lock."
                )
            report(stage, 0.1 + 0.8 * max(0.0, min(1.0, fraction)))

        train_kwargs: dict[str, Any] = {}
        kl_state = (registry.trainer_state() or {}).get("kl_ctl")
        if kl_state:
            train_kwargs["kl_state"] = kl_state
        result = run_training_round(
            base,
            # Every seed of the round (sampling, shuffles, batches) comes from the round.
            settings.model_copy(update={"seed": data.seed}),
            pointwise=data.pointwise,
            pairs=data.pairs,
            prompts=data.prompts,
            gate_prompts=data.gate_prompts,
            policy_dir=str(policy_dir) if policy_dir else None,
            reward_dir=str(reward_dir) if reward_dir else None,
            out_dir=str(work_dir / "out"),
            heldout_pairs=data.heldout_pairs,
            replay_pointwise=data.replay_pointwise,
            replay_pairs=data.replay_pairs,
            progress=train_progress,
            **train_kwargs,
        )
        metrics = {k: float(v) for k, v in result.metrics.items()}
        report("gate", 0.92)
        why, kind = gate_check(metrics, settings)
        trainer_state = getattr(result, "trainer_state", None)
        if kind in (KL_TOTAL, KL_ROUND):
            # The reward model learned from these events whatever the policy did: keep it
            # (its own version), ack the events, keep the larger KL coefficient.
            log.warning("round %s: policy refused (%s); publishing its reward model", token, why)
            reward_version = registry.publish_reward(
                result.reward_dir,
                {"metrics": metrics, "reward_parent": reward_from, "policy_refused": why,
                 "events_used": len(taken), "base_model": settings.base_model,
                 "user_events": data.user_events},
                token, stream_ids=taken,
            )  # fmt: skip
            if trainer_state:
                registry.set_trainer_state(trainer_state)
            store.ack(taken)
            registry.record_failure(
                why, metrics=metrics, events=len(taken), events_total=events_total,
                parent=parent, reward_version=reward_version,
                kl_budget_reached=kind == KL_TOTAL, kl_round_refused=kind == KL_ROUND,
            )  # fmt: skip
            taken = []
            report("rejected", 1.0)
            return done(RoundOutcome("failed", why, None, parent, len(events), metrics))
        if why is not None:
            log.warning("round %s rejected: %s", token, why)
            registry.record_failure(
                why, metrics=metrics, events=len(taken), events_total=events_total, parent=parent
            )
            store.release(consumer_name, taken)
            report("rejected", 1.0)
            return done(RoundOutcome("failed", why, None, parent, len(taken), metrics))

        report("publishing", 0.95)
        try:
            reward_version = registry.publish_reward(
                result.reward_dir,
                {"metrics": metrics, "reward_parent": reward_from, "events_used": len(taken),
                 "base_model": settings.base_model, "user_events": data.user_events},
                token, parent=parent, stream_ids=taken,
            )  # fmt: skip
        except StaleTokenError as error:
            registry.record_failure(str(error), events=len(taken), events_total=events_total)
            return done(RoundOutcome("failed", str(error), None, parent, len(taken), metrics))
        metadata = {
            "parent": parent,
            "events_used": len(taken),
            "event_ids": [ev.event_id for ev in events],
            "users": len(data.user_events),
            # Trained events per user (the window reads the reward version's copy).
            "user_events": data.user_events,
            "seed": data.seed,
            "data": data.stats,
            "metrics": metrics,
            "reward_parent": reward_from,
            "reward_version": reward_version,
            "reason": reason,
            "base_model": settings.base_model,
            "duration_s": time.monotonic() - started,
        }  # fmt: skip
        try:
            # With a canary share the version becomes the candidate (or waits for the
            # one out to be decided); the parent stays the current version either way.
            version = registry.publish(
                result.policy_dir, metadata, token, stream_ids=taken,
                canary_share=settings.canary_share, parent=parent,
            )  # fmt: skip
        except StaleTokenError as error:
            registry.record_failure(str(error), events=len(taken), events_total=events_total)
            return done(RoundOutcome("failed", str(error), None, parent, len(taken), metrics))
        # Durable now (the version records the stream ids): acknowledging may fail
        # or never happen (crash) -- the next round then acks them in step 3.
        if trainer_state:
            registry.set_trainer_state(trainer_state)
        store.ack(taken)
        taken = []
        role = registry.get(version)["published_as"]
        registry.record_round(
            "published", version=version, events=len(events), parent=parent, role=role
        )
        report("published", 1.0)
        log.info(
            "round %s published version %s (%s) from %d events", token, version, role, len(events)
        )
        outcome = RoundOutcome("published", "", version, parent, len(events), metrics)
        outcome.role = role
        return done(outcome)
    except LeaseLostError as error:
        # No release: the round holding the lock now has reclaimed these entries (its read
        # takes every pending one) and trains on them; only it may move them.
        log.warning("round %s: %s", token, error)
        try:
            registry.record_failure(str(error), events=len(taken), events_total=events_total)
        except redis.RedisError:
            pass
        return done(RoundOutcome("failed", str(error), None, parent, len(taken)))
    except BaseException as error:
        # Includes Celery's SoftTimeLimitExceeded. Events stay unacked for the next round.
        why = f"{type(error).__name__}: {error}"
        log.exception("round %s failed", token)
        try:
            registry.record_failure(
                ROUND_ERROR, why[:500], events=len(taken), events_total=events_total
            )
            if taken:
                store.release(consumer_name, taken)
        except redis.RedisError:
            pass  # the entries are reclaimed by the next round anyway
        raise
    finally:
        lock.release()
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)


def _rounds_dir(settings: Settings) -> Path:
    path = Path(settings.data_dir) / "rounds"
    path.mkdir(parents=True, exist_ok=True)
    return path


def events_consumed(registry: Registry) -> dict[str, list[int]]:
    """event id -> versions that trained on it (each should have exactly one)."""
    out: dict[str, list[int]] = {}
    for meta in registry.history():
        for event_id in meta.get("event_ids", []):
            out.setdefault(event_id, []).append(meta["version"])
    return out


__all__: Sequence[str] = (
    "RoundOutcome",
    "events_consumed",
    "gate",
    "gate_check",
    "is_heldout",
    "recent_user_events",
    "round_is_due",
    "round_seed",
    "run_round",
)
