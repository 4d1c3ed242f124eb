"""The KL gate: how far what people will be served has moved, and the largest part of a
round's update that stays within the budgets.

A round's PPO steps can overshoot the KL budgets even with the adaptive penalty: the KL
controller sees the T=1 rollouts of each step before its update, people see the final
policy at their temperature. So before a version is published the gate measures it as
it will be served (:func:`gate_sample`: answers sampled with the UI's arguments on prompts
no round trained on, the exact KL to the base and to the parent summed along each), and
decides on a 95% upper bound that treats answers to one prompt as one draw
(:func:`prompt_clustered_bound`). :class:`KLSearch` runs the round's search: the full
step first; when it overshoots, the adapter scaled toward the base or moved back toward
the parent (a backtracking line search, the KL constraint of TRPO applied to the served
KL), each candidate predicted from the last measurement by how KL grows with the step
(:func:`fraction_within_kl_budget`, :func:`scale_within_kl_budget`,
:func:`rescale_after_miss`, :func:`scale_between`); after a search toward the base, the
candidate on the parent's side is measured too, and published unless the round's reward
model scores the scaled one's answers higher by more than their noise (:func:`score_gain`);
the chosen candidate is measured again on prompts the search did not see
(:func:`gate_prompt_halves`) and decided on both samples pooled.

The sampling and the forwards are :class:`~rlhf_core.trainer.PPOTrainer`'s
(``served_kl_samples``); this module decides what to measure and which candidate the
numbers admit. Whether the round is then published (these bounds against the budgets, and
the reward model's held-out accuracy) is :func:`rlhf_core.rounds.gate_check`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from rlhf_core.generation import Sampling
from rlhf_core.ppo import mean_upper_bound
from rlhf_core.reward import Messages
from rlhf_core.settings import Settings

if TYPE_CHECKING:
    from rlhf_core.trainer import PPOTrainer

log = logging.getLogger(__name__)

GATE_Z = 1.645  # one-sided 95% upper confidence bound
# Fewer held-out contexts than this (a young store) and the gate samples the round's PPO
# prompts instead: a handful of prompts would make the bound describe them, not serving.
MIN_GATE_PROMPTS = 4
# A candidate scaled toward the base is published over the one on the parent's side only
# where the round's reward model scores its answers higher by more than this many standard
# errors of the difference (:func:`score_gain`): scaling also shrinks what the parent had
# learnt, and a reward model's preference within its noise is a coin flip
# (:meth:`KLSearch._parent_side_unless_scaled_scores_clearly_higher`).
SCALED_OVER_PARENT_SIDE_ERRORS = 1.0


def prompt_key(prompt: Messages) -> str:
    """One prompt's identity: the same messages give the same key."""
    return json.dumps(prompt, sort_keys=True)


def distinct_prompts(prompts: Sequence[Messages]) -> list[Messages]:
    """``prompts`` without repeats, order kept."""
    return list({prompt_key(p): p for p in prompts}.values())


@dataclass
class GateSample:
    """The gate's per-answer KL samples: to the base and to the parent version (None:
    the parent is the base, the same numbers), which prompt each answer answered
    (``prompt_ids``: the same id for the same prompt, :func:`prompt_key` in the gate's own
    samples, so that samples on different prompt lists pool right; None: every answer a
    prompt of its own), and each answer's score by the round's reward (None: not scored).
    The scores record what the KL a candidate costs buys, and decide between a candidate
    scaled toward the base and one on the parent's side
    (:meth:`KLSearch._parent_side_unless_scaled_scores_clearly_higher`)."""

    to_ref: Tensor
    to_parent: Tensor | None = None
    prompt_ids: list[Hashable] | None = None
    scores: Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """Means and 95% upper confidence bounds, as the gate reads them
        (:func:`prompt_clustered_bound`)."""
        mean, ucb = prompt_clustered_bound(self.to_ref, self.prompt_ids)
        p_mean, p_ucb = (mean, ucb)
        if self.to_parent is not None:
            p_mean, p_ucb = prompt_clustered_bound(self.to_parent, self.prompt_ids)
        scored = (
            {} if self.scores is None else {"objective/score_served": float(self.scores.mean())}
        )
        return scored | {
            "objective/kl_served": mean,
            "objective/kl_served_ucb": ucb,
            "objective/kl_served_max": float(self.to_ref.max()),
            "objective/kl_parent": p_mean,
            "objective/kl_parent_ucb": p_ucb,
            "gate/samples": float(self.to_ref.numel()),
            "gate/prompts": float(len(set(self.prompt_ids or range(self.to_ref.numel())))),
        }

    def pooled(self, other: GateSample) -> GateSample:
        """Both samples as one: answers of the same policy, to the same prompts or others."""
        parent = None
        if self.to_parent is not None and other.to_parent is not None:
            parent = torch.cat([self.to_parent, other.to_parent])
        ids = None
        if self.prompt_ids is not None and other.prompt_ids is not None:
            ids = self.prompt_ids + other.prompt_ids
        scores = None
        if self.scores is not None and other.scores is not None:
            scores = torch.cat([self.scores, other.scores])
        return GateSample(torch.cat([self.to_ref, other.to_ref]), parent, ids, scores)


def prompt_clustered_bound(
    kl: Tensor, prompt_ids: Sequence[Hashable] | None
) -> tuple[float, float]:
    """The mean KL per answer and its one-sided 95% upper bound, where several answers may
    share a prompt. Served KL is an average over the prompts people send, and the
    answers to one prompt are alike, so their spread says little about the next
    prompt's: the gate's 16 answers over 8 held-out contexts are 8 draws of a prompt,
    not 16. The bound takes the larger of two standard errors: the answers'
    (``s / sqrt(n)``) and the prompts' (the spread of the per-prompt means over
    ``sqrt(#prompts)``, the cluster-robust error, with two prompts or more); the mean is
    that of the per-prompt means (each prompt weighed once, as serving weighs it). With
    one answer per prompt both are the plain mean and bound. (Question on 9370a54: v2 and
    v3 passed at bounds 8.19 and 7.64 on 16 answers over 8 and 10 contexts, then measured
    10.37 and 10.08 on the benchmark's 32 held-out prompts; the next round's 13 contexts
    read 10-12 for policies 0.01 nats from v3.)"""
    values = kl.detach().double().flatten()
    if prompt_ids is None or len(set(prompt_ids)) == values.numel():
        return mean_upper_bound(values, GATE_Z)
    means = torch.tensor(list(_per_prompt_means(values, prompt_ids).values()), dtype=torch.float64)
    mean = float(means.mean())
    _, answers_ucb = mean_upper_bound(values, GATE_Z)
    error = (answers_ucb - float(values.mean())) / GATE_Z
    if means.numel() > 1:
        error = max(error, float(means.std(unbiased=True)) / math.sqrt(means.numel()))
    return mean, mean + GATE_Z * error


def score_gain(candidate: GateSample, other: GateSample) -> tuple[float, float] | None:
    """How much higher the round's reward model scores ``candidate``'s answers than
    ``other``'s, and the standard error of that difference; None where either sample is
    unscored. Where both answered the same prompts (the search's, two or more), the
    difference is paired by prompt: the mean over prompts of each prompt's mean score
    difference, its error the spread of those over ``sqrt(#prompts)``, as the prompts,
    not the answers, are the draws (:func:`prompt_clustered_bound`). Otherwise the two
    means' difference, its error ``sqrt(s1^2 / n1 + s2^2 / n2)``. None also where a score is
    not finite."""
    if candidate.scores is None or other.scores is None:
        return None
    ids_a, ids_b = candidate.prompt_ids, other.prompt_ids
    if ids_a is not None and ids_b is not None:
        means_a = _per_prompt_means(candidate.scores, ids_a)
        means_b = _per_prompt_means(other.scores, ids_b)
        shared = [pid for pid in means_a if pid in means_b]
        if len(shared) >= 2:
            gaps = torch.tensor([means_a[p] - means_b[p] for p in shared], dtype=torch.float64)
            error = float(gaps.std(unbiased=True)) / math.sqrt(len(shared))
            return _finite_pair(float(gaps.mean()), error)
    a, b = candidate.scores.double().flatten(), other.scores.double().flatten()
    error = math.sqrt(sum(float(x.var(unbiased=True)) / x.numel() for x in (a, b) if x.numel() > 1))
    return _finite_pair(float(a.mean() - b.mean()), error)


def _finite_pair(gain: float, error: float) -> tuple[float, float] | None:
    """None where a score was not finite: nothing to judge by, as with no scores."""
    return (gain, error) if math.isfinite(gain) and math.isfinite(error) else None


def _per_prompt_means(values: Tensor, prompt_ids: Sequence[Hashable]) -> dict[Hashable, float]:
    groups: dict[Hashable, list[float]] = {}
    for pid, value in zip(prompt_ids, values.double().flatten().tolist(), strict=True):
        groups.setdefault(pid, []).append(value)
    return {pid: sum(v) / len(v) for pid, v in groups.items()}


def gate_samples_kl(
    trainer: PPOTrainer,
    settings: Settings,
    prompts: Sequence[Messages],
    parent_dir: str | os.PathLike | None,
) -> dict[str, float]:
    """:func:`gate_sample`'s means and bounds."""
    return gate_sample(trainer, settings, prompts, parent_dir).metrics()


def gate_sample(
    trainer: PPOTrainer,
    settings: Settings,
    prompts: Sequence[Messages],
    parent_dir: str | os.PathLike | None,
) -> GateSample:
    """The KL gate's measurement: ``settings.gate_samples`` answers sampled as served
    (``Sampling.from_settings``: the UI's temperature, top-p and ``max_new_tokens``), over
    the distinct ``prompts`` in turn; per answer the summed exact KL to the base and
    to the parent version (loaded beside the policy for the measurement; the base itself
    when this is the first version).

    Samples and cost per round (default 16 answers of up to ``max_new_tokens`` = 256
    tokens): one batched generation of 16 x 256 tokens (16x the tokens of one PPO
    rollout of 8 x 64) plus three forwards over them (policy, base, parent). On the tiny
    model, where answers never stop early, ``benchmarks/gate_cost.py`` measured 20 s for
    16 samples (10 s for 8, 39 s for 32) against 3.3 s per PPO step. The bound: one-sided
    95%, ``mean + 1.645 s / sqrt(n)``; with n = 16 it sits 0.41 standard deviations of
    the per-answer KL above the mean; with fewer distinct prompts than answers, the
    prompts' own spread may widen it (:func:`prompt_clustered_bound`).
    """
    unique = distinct_prompts(prompts)
    n = max(2, int(settings.gate_samples))
    n -= n % trainer.world  # an even share per process
    picks = [unique[i % len(unique)] for i in range(max(n, trainer.world))]
    served = trainer.served_kl_samples(
        picks, Sampling.from_settings(settings), parent_dir=parent_dir
    )
    # Which prompt each answer answered: the processes' shards (every world-th pick from
    # the rank's own), gathered in rank order.
    order = [i for rank in range(trainer.world) for i in range(rank, len(picks), trainer.world)]
    # Version 1's parent is the base: its KL to the parent is its KL to the base.
    keys = [prompt_key(p) for p in unique]
    ids = [keys[i % len(unique)] for i in order]
    return GateSample(served.to_ref, served.to_parent, ids, served.scores)


def gate_prompt_halves(
    unseen: Sequence[Messages], ppo_prompts: Sequence[Messages]
) -> tuple[list[Messages], list[Messages]]:
    """The prompts the gate's search measures its candidates on, and the others its
    confirmation sample measures the chosen one on (every other of the distinct ``unseen``
    prompts each, so both halves draw alike from held-out contexts and calibration
    prompts). The search keeps the scale whose sample fitted, and with it the luck of its
    prompts: some prompts draw more KL than others (a per-answer spread of 6-11 nats on
    SmolLM2), and a confirmation on the same prompts shares that luck. Summary's v2-v4 on
    f69bf1d read 0.6-0.9 nats more on the held-out contexts their gate did not draw than
    on the 16 it did (``benchmarks/gate_prompt_luck.py``); summary's v3 on 46fb60e read
    7.00 at the search, 6.54 confirmed on the same prompts and 10.76 on the 26 held-out
    contexts they came from (``benchmarks/gate_remeasure.py``). With fewer than
    ``2 * MIN_GATE_PROMPTS`` unseen prompts both measure on the same ones; with fewer than
    ``MIN_GATE_PROMPTS``, on the round's PPO prompts."""
    if len(unseen) >= 2 * MIN_GATE_PROMPTS:
        return list(unseen[0::2]), list(unseen[1::2])
    chosen = list(unseen) if len(unseen) >= MIN_GATE_PROMPTS else list(ppo_prompts)
    return chosen, chosen


def set_update_fraction(
    params: Sequence[nn.Parameter],
    start: Sequence[Tensor],
    end: Sequence[Tensor],
    fraction: float,
) -> None:
    """Set every parameter to ``start + fraction * (end - start)`` in place: 1 is the
    round's full update, 0 the policy the round started from."""
    with torch.no_grad():
        for param, a, b in zip(params, start, end, strict=True):
            param.copy_(a + fraction * (b - a))


def finite_or_none(value: float | None) -> float | None:
    """``value`` where it is a finite number, else None (a NaN score judges nothing)."""
    return value if value is not None and math.isfinite(value) else None


def within_kl_budget(metrics: dict[str, float], settings: Settings) -> bool:
    """The gate's two KL conditions (see ``rounds.gate_check``) on one measurement."""
    total = metrics.get("objective/kl_served_ucb", metrics.get("objective/kl_served", 0.0))
    parent = metrics.get("objective/kl_parent_ucb", metrics.get("objective/kl_parent", 0.0))
    return total <= settings.kl_budget and parent <= settings.kl_round_budget


KL_AIM = 0.9  # the line search aims at this share of each KL budget (see below)


def fraction_within_kl_budget(
    full: dict[str, float],
    parent_kl: float,
    settings: Settings,
    smallest: float = 1 / 64,
    aim: float = KL_AIM,
) -> float:
    """The fraction of a round's update predicted to fit both KL budgets, from the
    measurement of the full update (``full``) and the parent's own served KL to the base
    (``parent_kl``, the mean its round measured; 0 for the base).

    KL to the base is not additive along a path: for a policy tilted from the base,
    ``KL ~ theta^2 Var / 2``, so its square root grows linearly with the step and a step
    of ``k`` nats from a parent at ``K`` lands near ``(sqrt(K) + sqrt(k))^2`` when it goes
    on in the direction the parent already moved (the learnt taste), which is why a
    quarter step 0.4 nats from a parent at 4.2 measured 7.3 (formal round 2), and 0.09
    nats from 7.2 measured 8.8 (question). The KL to the parent grows as ``f^2 k`` at
    fraction ``f``.

    The gate decides on upper bounds, and each answer's KL shrinks with the step as the
    mean does, so their spread shrinks with it: the bound is taken to keep its ratio to
    the mean, ``r = bound / mean`` of the full measurement. The total fits when
    ``sqrt(K) + f sqrt(k) <= sqrt(B / r)``, the round budget when
    ``f^2 k_bound <= B_round``. (An additive margin, bound minus mean, was the first rule:
    it left no room at all whenever the full step's spread alone passed the budget, and
    formal's round 1 on ec58f49 published 1/64 of its update, 0.002 nats.) Both budgets
    are taken at ``aim`` (90%) of their value: the bound measured at the predicted
    fraction has a sampling error of its own (with 16 samples about a quarter of the
    answers' spread: 0.8 nats at 7), so aiming at the budget itself would fail half the
    time, and each miss costs a measurement (30 s on SmolLM2) and a halving. Returns the
    smaller ``f``, within ``[smallest, 1]``.
    """
    k = max(full.get("objective/kl_parent", 0.0), 1e-12)
    mean = full.get("objective/kl_served", 0.0)
    bound = full.get("objective/kl_served_ucb", mean)
    ratio = max(bound / mean, 1.0) if mean > 0 else 1.0
    room = math.sqrt(aim * settings.kl_budget / ratio)
    f_total = (room - math.sqrt(max(parent_kl, 0.0))) / math.sqrt(k)
    k_bound = max(full.get("objective/kl_parent_ucb", k), k)
    f_round = math.sqrt(aim * settings.kl_round_budget / k_bound)
    return min(max(min(f_total, f_round), smallest), 1.0)


def scale_within_kl_budget(
    full: dict[str, float], settings: Settings, aim: float = KL_AIM, parent_is_base: bool = False
) -> float:
    """The scale ``s`` of the round's whole adapter (its weight change from the base,
    ``B A``, times ``s``) predicted to fit the total budget: the KL to the base is second
    order in that change, ``s^2 M`` for the full step's ``M``, its bound keeping its
    ratio ``r`` to the mean (as in :func:`fraction_within_kl_budget`), so
    ``s = sqrt(aim B / (r M))``, within ``(0, 1]``. ``parent_is_base`` (the first
    version): the KL to the parent is the same KL, so the round budget binds too,
    ``s <= sqrt(aim B_round / k_bound)``."""
    mean = full.get("objective/kl_served", 0.0)
    if not mean > 0:
        return 1.0
    ratio = max(full.get("objective/kl_served_ucb", mean) / mean, 1.0)
    scale = math.sqrt(aim * settings.kl_budget / (ratio * mean))
    if parent_is_base:
        k_bound = max(full.get("objective/kl_parent_ucb", mean), 1e-12)
        scale = min(scale, math.sqrt(aim * settings.kl_round_budget / k_bound))
    return min(scale, 1.0)


def toward_base_keeps_more(full: dict[str, float], fraction: float, scale: float) -> bool:
    """Whether the policy scaled toward the base (``scale``) stays nearer the round's full
    step than the one moved back toward the parent (``fraction``): in KL, ``(1 - s)^2 M``
    against ``(1 - f)^2 k`` (``M`` the full step's KL to the base, ``k`` to the parent).

    Near the budget, moving back toward the parent gives up most of the round: a parent
    at ``K`` leaves ``f = (sqrt(B) - sqrt(K)) / sqrt(k)``, 0.14 for formal's round 2 on
    ef3f6f1 (K 5.4, k 6.2, M 15.3; round 3: 1/64, a republished parent), while scaling
    the whole adapter keeps the round's direction at 0.68 of its length. Where the round
    went on straight along the parent's direction (``M = (sqrt(K) + sqrt(k))^2``) the two
    are the same policy; the further the round turned, the more scaling keeps."""
    k = full.get("objective/kl_parent", 0.0)
    big_m = full.get("objective/kl_served", 0.0)
    return (1 - scale) ** 2 * big_m < (1 - fraction) ** 2 * k


def parent_kl_when_scaled(full: dict[str, float], parent_kl: float, scale: float) -> float:
    """The predicted bound of the KL to the parent of the round's adapter scaled by
    ``scale`` toward the base. With KL as a squared distance (second order in the
    weights), the full step ``M`` from the base, ``k`` from the parent and the parent
    ``K`` from the base give the cosine between them, and the scaled policy lies
    ``s^2 M + K - s (K + M - k)`` from the parent (``K`` at ``s = 0``: the parent's own
    distance from the base; ``k`` at 1); the bound keeps the full step's ratio to the
    mean. (Formal's round 3 on 7dac52d: predicted 3.41 at s = 0.593, measured 3.42.)"""
    big_m = full.get("objective/kl_served", 0.0)
    k = full.get("objective/kl_parent", 0.0)
    ratio = max(full.get("objective/kl_parent_ucb", k) / k, 1.0) if k > 0 else 1.0
    distance = scale**2 * big_m + parent_kl - scale * (parent_kl + big_m - k)
    return ratio * max(distance, 0.0)


def kl_exponent(previous: tuple[float, dict[str, float]], scale: float, measured: dict) -> float:
    """How the KL of a scaled adapter grows with the scale between two measurements,
    ``KL ~ s^p`` through ``(s_a, KL_a)`` and ``(s_b, KL_b)``: ``p = ln(KL_a / KL_b) /
    ln(s_a / s_b)`` (means, which carry less noise than the bounds), within ``[1, 2]``.
    Second order (2) for a small step; nearer 1 for a large one, where the tilted
    next-token distributions are far from the base's: formal's rounds 1 and 2 on 7ab017c
    measured 14.6 -> 5.4 nats at s = 0.40 (p 1.08) and 19.8 -> 6.2 at 0.46 (p 1.49), and
    the second-order rule missed twice in each. Two measurements that say nothing (the
    KL did not fall) give 2, the rule that assumed it."""
    prev_scale, prev = previous
    a, b = prev.get("objective/kl_served", 0.0), measured.get("objective/kl_served", 0.0)
    if not (prev_scale > scale > 0 and a > b > 0):
        return 2.0
    return min(max(growth_exponent(scale, b, prev_scale, a), 1.0), 2.0)


def growth_exponent(s_low: float, kl_low: float, s_high: float, kl_high: float) -> float:
    """``p`` of ``KL ~ s^p`` through two measurements (both scales and KLs positive, the
    scales different): ``ln(KL_high / KL_low) / ln(s_high / s_low)``."""
    return math.log(kl_high / kl_low) / math.log(s_high / s_low)


def rescale_after_miss(
    scale: float,
    measured: dict[str, float],
    settings: Settings,
    aim: float = KL_AIM,
    parent_is_base: bool = True,
    previous: tuple[float, dict[str, float]] | None = None,
) -> float:
    """The next scale after ``scale`` missed a budget, from its own measurement: a bound
    ``U`` at ``s`` predicts ``U (s' / s)^p`` at ``s'``, so ``s' = s (aim B / U)^(1/p)``
    (the smaller of the two budgets' answers), ``p`` the exponent the miss and the
    measurement before it (``previous``: ``(scale, metrics)``, the full step's for the
    first miss) show (:func:`kl_exponent`), 2 without one. Nearer than the full step's
    prediction, and kinder than halving (a quarter of the KL): formal's round 2 on
    d16f707 missed at 0.66 and lost the round to a parent-ward fallback. The round
    budget answers only where the parent is the base (``parent_is_base``): from a parent
    of its own, scaling toward the base does not take the KL to the parent to 0
    (:func:`parent_kl_when_scaled`)."""
    power = 2.0 if previous is None else kl_exponent(previous, scale, measured)
    total = measured.get("objective/kl_served_ucb", 0.0)
    parent = measured.get("objective/kl_parent_ucb", 0.0)
    factor = 1.0
    if total > 0:
        factor = min(factor, (aim * settings.kl_budget / total) ** (1 / power))
    if parent > 0 and parent_is_base:
        factor = min(factor, (aim * settings.kl_round_budget / parent) ** (1 / power))
    return scale * factor


# A candidate that fits this far below the aim leaves enough of the round unused to be
# worth one more measurement (~20 s) between it and the scale that missed.
SCALE_UP_BELOW = 0.7
# The step up stays this far below the nearest scale that missed (see KLSearch._search_scale).
STEP_UP_CLEAR_OF_MISS = 0.95


def scale_between(
    low: tuple[float, dict[str, float]],
    high: tuple[float, dict[str, float]],
    settings: Settings,
    aim: float = KL_AIM,
    parent_is_base: bool = False,
) -> float:
    """A scale between one that fitted (``low``: ``(scale, metrics)``) and a larger one that
    missed (``high``) predicted to land at the aim, by the growth ``KL ~ s^p`` the two
    measurements show (:func:`kl_exponent` without its clamp: between two measurements it
    interpolates, it does not extrapolate). The bound keeps the fitted candidate's ratio
    to its mean; where the parent is the base the round budget is on the same KL and
    answers too. ``low``'s own scale when the two say nothing (the KL did not grow).

    Question's round 2 on 60af9b6: the full step at 17.80 nats, the first guess from a
    second-order growth 0.641, where the KL fell to 3.84 [bound 4.54], less than half the
    aim: between them ``p = 3.45``, and the scale for the aim is 0.78, a quarter more of
    the round's step."""
    (s_low, m_low), (s_high, m_high) = low, high
    mean_low, mean_high = (
        m_low.get("objective/kl_served", 0.0),
        m_high.get("objective/kl_served", 0.0),
    )
    if not (0 < s_low < s_high and 0 < mean_low < mean_high):
        return s_low
    power = growth_exponent(s_low, mean_low, s_high, mean_high)
    target = (
        aim
        * settings.kl_budget
        * mean_low
        / max(m_low.get("objective/kl_served_ucb", mean_low), mean_low)
    )
    if parent_is_base:
        parent_bound = max(m_low.get("objective/kl_parent_ucb", mean_low), mean_low)
        target = min(target, aim * settings.kl_round_budget * mean_low / parent_bound)
    if target <= mean_low:
        return s_low
    return min(s_low * (target / mean_low) ** (1 / power), s_high)


def scale_up_is_worth_it(
    metrics: dict[str, float], settings: Settings, parent_is_base: bool
) -> bool:
    """Whether a fitted candidate sits so far below the aim (bound under ``SCALE_UP_BELOW``
    of it, on either budget that scaling moves) that one more measurement may keep more."""
    room = metrics.get("objective/kl_served_ucb", 0.0) / (KL_AIM * settings.kl_budget)
    if parent_is_base:
        room = max(
            room, metrics.get("objective/kl_parent_ucb", 0.0) / (KL_AIM * settings.kl_round_budget)
        )
    return room < SCALE_UP_BELOW


def backtrack_to_kl_budget(
    measure: Callable[[float], dict[str, float]],
    fits: Callable[[dict[str, float]], bool],
    max_halvings: int,
    first_guess: Callable[[dict[str, float]], float] | None = None,
    full: dict[str, float] | None = None,
    next_guess: Callable[[float, dict[str, float]], float] | None = None,
) -> tuple[float, dict[str, float], int]:
    """Backtracking line search on what people will be served (the KL constraint of
    TRPO, Schulman et al. 2015, sec. 6, applied to the served KL the gate measures).

    A round's PPO steps can overshoot the KL budget even with the adaptive penalty: the
    controller sees the T=1 rollouts of each step *before* its update, the people see the
    final policy at their temperature. Rather than refusing the whole round (and its
    feedback), the update is shrunk (``measure(x)``: toward the parent by the fraction
    ``x``, or, as :class:`KLSearch` also uses it, its adapter scaled by ``x`` toward
    the base) until the gate's bounds hold: ``measure(1.0)``; then the fraction
    ``first_guess`` predicts from that measurement (:func:`fraction_within_kl_budget`), or
    0.5 without one (or where the prediction says the full step fits, which it did not);
    then halves of it, at most ``max_halvings`` measurements after the first. (The guess was
    capped at 0.5 at first: formal's round 1 on bae41df, a full step just over both budgets,
    bound 10.1, was predicted to fit at 0.89 and published at 0.5, a quarter of its KL.)
    Returns ``(fraction, metrics, measurements)``; when no fraction fits, the last one tried
    and its metrics, which the gate then refuses. ``full``: the full step's measurement
    where it was already made (it counts as the first). ``next_guess(fraction, metrics)``:
    the next fraction predicted from a failed one's measurement, instead of its half (used
    where the KL is second order in the fraction: :func:`rescale_after_miss`).
    """
    fraction = 1.0
    metrics = full if full is not None else measure(fraction)
    tried = 1
    while not fits(metrics) and tried <= max_halvings:
        if tried == 1 and first_guess is not None:
            guess = first_guess(metrics)
            # (NaN, from a NaN measurement, fails the comparison too: plain halving.)
            fraction = guess if 0.0 < guess < 1.0 else 0.5
        elif next_guess is not None:
            guess = next_guess(fraction, metrics)
            fraction = guess if 0.0 < guess < fraction else fraction / 2
        else:
            fraction /= 2
        metrics = measure(fraction)
        tried += 1
    return fraction, metrics, tried


class KLSearch:
    """One round's search for the largest part of its update that both KL budgets admit,
    and the record of it in the round's metrics.

    Made before the round's PPO steps: it keeps the adapter's weights as the round found
    them (the parent version, or LoRA's zero update in round one). :meth:`run`, after the
    steps, measures the full step; when it overshoots, the adapter is scaled toward the
    base (for the first version, and where that keeps more of the round,
    :func:`toward_base_keeps_more`; then the parent's side is measured and may be chosen
    instead, :meth:`_parent_side_unless_scaled_scores_clearly_higher`) or moved back toward
    the parent (:func:`backtrack_to_kl_budget`). It leaves the adapter at the chosen candidate, and
    every measurement in the metrics (``gate/try{n}_*``): how the KL answered each step
    of the search is the evidence its predictions are judged by.
    """

    def __init__(
        self,
        trainer: PPOTrainer,
        settings: Settings,
        adapter: Sequence[tuple[str, nn.Parameter]],
        policy_dir: str | os.PathLike | None,
        parent_metrics: dict[str, float],
    ) -> None:
        """``adapter``: the policy adapter's named parameters; ``policy_dir``: the parent
        version (None: the base); ``parent_metrics``: what the parent's own round
        measured."""
        self.trainer = trainer
        self.settings = settings
        self.policy_dir = policy_dir
        self.parent_is_base = policy_dir is None
        self.lora = [param for _, param in adapter]
        self.is_lora_b = [".lora_B." in name for name, _ in adapter]
        self.parent_weights = [p.detach().clone() for p in self.lora]
        # The parent's KL to the base as its own round measured it (0 for the base): the
        # line search predicts from it how much of the update fits (None: plain halving).
        self.parent_kl = 0.0 if self.parent_is_base else parent_metrics.get("objective/kl_served")
        self.metrics: dict[str, float] = {}
        self.final_weights: list[Tensor] = []
        self.search_on: list[Messages] = []
        self.confirm_on: list[Messages] = []
        self.last_sample: GateSample | None = None  # the latest measurement's answers
        self.fitted_below: tuple[float, GateSample] | None = None  # see _search_scale
        self.full: dict[str, float] = {}
        self.fraction, self.scale, self.tried = 1.0, 1.0, 0
        self.gate_metrics: dict[str, float] = {}

    def run(
        self,
        gate_prompts: Sequence[Messages],
        ppo_prompts: Sequence[Messages],
        metrics: dict[str, float],
    ) -> None:
        """Search on ``gate_prompts`` (held-out contexts and calibration prompts; the
        round's PPO prompts when there are fewer than ``MIN_GATE_PROMPTS``), leave the
        adapter at the chosen candidate, and add to ``metrics`` what the gate decides on
        (``objective/kl_served``, ``objective/kl_served_ucb``, ``objective/kl_parent``,
        ``objective/kl_parent_ucb``), ``gate/update_fraction``, ``gate/base_scale``,
        ``gate/measurements`` and ``time/served_kl_s``."""
        settings = self.settings
        start = time.perf_counter()
        self.metrics = metrics
        self.final_weights = [p.detach().clone() for p in self.lora]
        unseen = distinct_prompts(gate_prompts)
        self.search_on, self.confirm_on = gate_prompt_halves(unseen, ppo_prompts)
        enough = len(unseen) >= MIN_GATE_PROMPTS
        metrics["gate/unseen_prompts"] = float(len(unseen) if enough else 0)
        metrics["gate/confirmation_prompts"] = float(
            len(self.confirm_on) if self.confirm_on is not self.search_on else 0
        )
        self.full = full = self.measure(1.0)
        metrics.update({f"gate/full_{k.split('/')[1]}": v for k, v in full.items()
                        if k.startswith("objective/")})  # fmt: skip
        self.fraction, self.scale, self.gate_metrics, self.tried = 1.0, 1.0, full, 1
        if self.fits(full) or settings.kl_backtrack_steps == 0:
            pass
        elif self.parent_is_base:
            # The first version: the parent is the base itself (every LoRA B zero), and
            # scaling B is moving back toward it, the weight change exactly s times the
            # round's. Interpolating A and B both is not linear in it, f B (A0 + f (A1 -
            # A0)): formal's round 1 on d16f707, predicted to fit at 0.555 of a 19.3-nat
            # step, passed the budget there and published 0.277 at 0.83 nats.
            self._search_scale(lambda m: scale_within_kl_budget(m, settings, parent_is_base=True))
        elif self.parent_kl and self._scaling_keeps_more():
            # Scaling the whole adapter toward the base keeps more of the round than
            # moving back toward the parent (``toward_base_keeps_more``), in KL; the
            # round's reward model then judges it against the parent's side.
            self._search_scale(lambda m: scale_within_kl_budget(m, settings))
            self._parent_side_unless_scaled_scores_clearly_higher()
        else:
            self._back_toward_parent()
        if self.tried > 1 and self.fits(self.gate_metrics):
            self._confirm()
        metrics.update(self.gate_metrics)
        metrics["gate/update_fraction"] = self.fraction
        metrics["gate/base_scale"] = self.scale
        metrics["gate/measurements"] = float(self.tried)
        metrics["time/served_kl_s"] = time.perf_counter() - start

    def apply(self, fraction: float, scale: float = 1.0) -> None:
        """The parent moved ``fraction`` of the way to the round's full step, its adapter
        then scaled by ``scale`` toward the base (the LoRA ``B`` matrices: the weight
        change ``B A`` scales exactly)."""
        set_update_fraction(self.lora, self.parent_weights, self.final_weights, fraction)
        if scale != 1.0:
            with torch.no_grad():
                for param, b in zip(self.lora, self.is_lora_b, strict=True):
                    if b:
                        param.mul_(scale)

    def measure(
        self, fraction: float, scale: float = 1.0, on: Sequence[Messages] | None = None
    ) -> dict[str, float]:
        """The gate's measurement of :meth:`apply`'s policy, on the search's prompts
        unless ``on`` says which."""
        self.apply(fraction, scale)
        prompts = self.search_on if on is None else on
        sample = gate_sample(self.trainer, self.settings, prompts, self.policy_dir)
        self.last_sample = sample
        measured = sample.metrics()
        n = sum(key.endswith("_fraction") for key in self.metrics if key.startswith("gate/try"))
        self.metrics.update({
            f"gate/try{n}_fraction": fraction,
            f"gate/try{n}_scale": scale,
            f"gate/try{n}_kl_served": measured["objective/kl_served"],
            f"gate/try{n}_kl_served_ucb": measured["objective/kl_served_ucb"],
            f"gate/try{n}_kl_parent_ucb": measured["objective/kl_parent_ucb"],
        })  # fmt: skip
        if "objective/score_served" in measured:
            # What the candidate's answers are worth to the round's reward model, beside
            # their KL: how much of the round's gain a smaller candidate gives up.
            self.metrics[f"gate/try{n}_score"] = measured["objective/score_served"]
        log.info("gate measurement %d: fraction %.4f, scale %.4f: %s", n, fraction, scale,
                 {k: round(v, 3) for k, v in measured.items()})  # fmt: skip
        return measured

    def fits(self, measured: dict[str, float]) -> bool:
        return within_kl_budget(measured, self.settings)

    def _search_scale(self, first_guess: Callable[[dict[str, float]], float]) -> None:
        """The adapter scaled toward the base: the scale ``first_guess`` predicts from the
        full step, rescaled after each miss (:func:`rescale_after_miss`); then, where the
        candidate landed far below the aim, one step up toward the nearest scale that
        missed."""
        settings = self.settings
        measured_scales = [(1.0, self.full)]
        samples: dict[float, GateSample] = {}

        def measure_scale(s: float) -> dict[str, float]:
            measured = self.measure(1.0, s)
            samples[s] = self.last_sample
            return measured

        def next_scale(s: float, missed: dict[str, float]) -> float:
            guess = rescale_after_miss(s, missed, settings, parent_is_base=self.parent_is_base,
                                       previous=measured_scales[-1])  # fmt: skip
            measured_scales.append((s, missed))
            return guess

        self.scale, self.gate_metrics, self.tried = backtrack_to_kl_budget(
            measure_scale,
            self.fits,
            settings.kl_backtrack_steps,
            first_guess=first_guess,
            full=self.full,
            next_guess=next_scale,
        )
        fitted_after_a_miss = self.fits(self.gate_metrics) and 1 < self.tried
        if not (
            fitted_after_a_miss
            and self.tried <= settings.kl_backtrack_steps
            and scale_up_is_worth_it(self.gate_metrics, settings, self.parent_is_base)
        ):
            return
        # The guess landed far below the aim (the KL fell faster than second order):
        # one measurement between it and the nearest scale that missed.
        missed = min((sm for sm in measured_scales if sm[0] > self.scale), key=lambda sm: sm[0])
        up = scale_between((self.scale, self.gate_metrics), missed, settings,
                           parent_is_base=self.parent_is_base)  # fmt: skip
        # Clear of the scale that missed: a step up next to it is that candidate
        # measured again, kept if the second sample is the luckier (summary's round 3
        # on f69bf1d: 0.542 read 7.87 [10.86], 0.491 read 4.70, and the step up to
        # 0.538, 99% of the miss, read 6.62 [8.53] and was published).
        up = min(up, STEP_UP_CLEAR_OF_MISS * missed[0])
        if up < 1.05 * self.scale:
            return
        measured = measure_scale(up)
        self.tried += 1
        self.metrics["gate/scaled_up_from"] = self.scale
        if self.fits(measured):
            self.fitted_below = (self.scale, samples[self.scale])
            self.scale, self.gate_metrics = up, measured
        else:  # back to the candidate that fitted, weights and sample
            self.apply(1.0, self.scale)
            self.last_sample = samples[self.scale]

    def _scaling_keeps_more(self) -> bool:
        """Toward the base where it keeps more of the round and its KL to the parent
        is predicted within the round budget too."""
        settings, full = self.settings, self.full
        guess = scale_within_kl_budget(full, settings)
        return toward_base_keeps_more(
            full, fraction_within_kl_budget(full, self.parent_kl, settings), guess
        ) and parent_kl_when_scaled(full, self.parent_kl, guess) <= (
            KL_AIM * settings.kl_round_budget
        )

    def _parent_side_unless_scaled_scores_clearly_higher(self) -> None:
        """After the search toward the base, one measurement of the candidate on the
        parent's side (the fraction :func:`fraction_within_kl_budget` predicts), published
        instead where it fits, unless the scaled one fits and the round's reward model
        scores its answers higher by more than ``SCALED_OVER_PARENT_SIDE_ERRORS`` standard
        errors (:func:`score_gain`, both sampled on the search's prompts).

        Nearness to the full step in KL (:func:`toward_base_keeps_more`) is not what
        people like: scaling the whole adapter also shrinks what the parent had learnt.
        Over every 64-token run in ``benchmarks/results/learning/`` up to 2f83edd, the
        versions after the first that were scaled toward the base moved the held-out 👍
        rate by -0.4 points on average (96 versions, 18 of them down by 10 or more), those
        moved back toward the parent +10.8 (15, none down). On 68e1d63, where the scaled
        one had to score at least as high, the 12 scaled versions moved it by -2.3 on
        average, the 9 on the parent's side +7; the scaled ones that fell, by 7-25 points
        (headline's v2 and v4, upbeat's v4, concise's v3), had outscored the parent's side
        by 0.00-0.19, within the noise of 16 answers, and those that rose (plain's v2,
        upbeat's v5, bullets' v4, formal's v2) by 0.52-0.65. Where the predicted fraction
        is the smallest (1/64: the parent near the budget), that candidate is nearly the
        parent itself, and keeping it is still worth weighing against the scaled one."""
        scaled_fits = self.fits(self.gate_metrics)
        scaled_sample = self.last_sample
        if scaled_fits and (scaled_sample is None or scaled_sample.scores is None):
            return  # nothing to judge the two by (the gate's answers were not scored)
        scaled = (self.scale, self.gate_metrics, self.last_sample, self.fitted_below)
        fraction = fraction_within_kl_budget(self.full, self.parent_kl, self.settings)
        measured = self.measure(fraction)
        self.tried += 1
        self.metrics["gate/parent_side_fraction"] = fraction
        gain = None if scaled_sample is None else score_gain(scaled_sample, self.last_sample)
        if gain is not None:
            self.metrics["gate/scaled_score_gain"], self.metrics["gate/scaled_score_gain_se"] = gain
        scaled_clearly_higher = gain is None or gain[0] > SCALED_OVER_PARENT_SIDE_ERRORS * gain[1]
        if self.fits(measured) and not (scaled_fits and scaled_clearly_higher):
            self.fraction, self.scale, self.gate_metrics = fraction, 1.0, measured
            self.fitted_below = None  # the step up's fallback belongs to the scaled search
            self.metrics["gate/parent_side_chosen"] = 1.0
            return
        self.scale, self.gate_metrics, self.last_sample, self.fitted_below = scaled
        self.apply(1.0, self.scale)  # back to the scaled candidate, weights and sample
        self.metrics["gate/parent_side_chosen"] = 0.0

    def _back_toward_parent(self) -> None:
        """The update shortened back toward the parent (:func:`backtrack_to_kl_budget`),
        the first fraction predicted from the full step and the parent's KL."""
        settings, parent_kl = self.settings, self.parent_kl
        self.fraction, self.gate_metrics, self.tried = backtrack_to_kl_budget(
            self.measure,
            self.fits,
            settings.kl_backtrack_steps,
            first_guess=None
            if parent_kl is None
            else lambda m: fraction_within_kl_budget(m, parent_kl, settings),
            full=self.full,
        )
        total_bound = self.gate_metrics.get("objective/kl_served_ucb", 0.0)
        if not self.fits(self.gate_metrics) and self.tried > 1 and total_bound > settings.kl_budget:
            # Even the smallest step from the parent passed the total budget: on this
            # round's prompts the parent itself is at it (question's round 4 on
            # 60af9b6: 0.06 of the step from v3 read 10.4 [14.3] where v3's own round
            # had read 5.3, and the round was refused). Moving toward the parent can
            # never fit; the candidate scaled toward the base, as a missed scale is
            # rescaled (:func:`rescale_after_miss`), may -- one measurement more than
            # the search's, against a refused round's whole feedback.
            self.scale = rescale_after_miss(1.0, self.gate_metrics, settings, parent_is_base=False)
            self.gate_metrics = self.measure(self.fraction, self.scale)
            self.tried += 1
            self.metrics["gate/parent_over_budget"] = 1.0

    def _confirm(self) -> None:
        """A candidate the search chose because its sample fitted: of the candidates near
        the budget, the ones whose sample came out low pass, and the sample keeps that
        luck (the winner's curse). The gate decides on it pooled with a fresh sample of
        the same policy (:meth:`measure` leaves the weights as they are) on prompts the
        search did not see (:func:`gate_prompt_halves`), and the fresh one's mean is kept
        apart to show the luck."""
        settings = self.settings
        chosen = self.last_sample
        fresh = self.measure(self.fraction, self.scale, self.confirm_on)
        self.metrics["gate/chosen_kl_served"] = self.gate_metrics["objective/kl_served"]
        self.metrics["gate/fresh_kl_served"] = fresh["objective/kl_served"]
        self.gate_metrics = chosen.pooled(self.last_sample).metrics()
        self.tried += 1
        if not self.fits(self.gate_metrics) and self.fitted_below is not None:
            # The step up passed on its own sample but not pooled: the candidate
            # below it, which fitted, confirmed the same way.
            self.scale, below = self.fitted_below
            fresh = self.measure(self.fraction, self.scale, self.confirm_on)
            self.metrics["gate/fresh_kl_served"] = fresh["objective/kl_served"]
            self.gate_metrics = below.pooled(self.last_sample).metrics()
            self.tried += 1
        over_total = self.gate_metrics["objective/kl_served_ucb"] > settings.kl_budget
        if not self.fits(self.gate_metrics) and (over_total or self.parent_is_base):
            # Pooled, the candidate is over the total budget: question's round 3 on
            # a5af884, 0.038 of the step from v2 read 7.58 [9.08], a fresh sample
            # 9.51, pooled [10.1], and the round was refused. A step that small is
            # the parent, which had passed at 7.47 [9.19]: the parent sits at the
            # budget, and no step from it fits. Scaled toward the base, rescaled as any
            # miss is (:func:`rescale_after_miss`), it is measured once more on a fresh
            # sample, which decides. Where the parent is the base, both budgets bound
            # the same KL and the rescale answers both.
            # That sample is drawn on the confirmation prompts, so the rescale aims from
            # their own reading where it is the higher: upbeat's round 2 on 2f83edd read
            # 7.69 [9.63] on the search's prompts and 11.36 [13.16] on these with the same
            # weights; rescaled from the pooled bound (10.94) to 0.732 of the step, these
            # prompts read 9.62 [10.91] and the round was refused at 10.9 minutes.
            reading = max(self.gate_metrics, fresh, key=lambda m: m["objective/kl_served_ucb"])
            self.scale = rescale_after_miss(
                self.scale, reading, settings, parent_is_base=self.parent_is_base
            )
            self.gate_metrics = self.measure(self.fraction, self.scale, self.confirm_on)
            self.tried += 1
            self.metrics["gate/confirmed_over_budget"] = 1.0
