"""Live evaluation statistics: pure functions, no Redis, no model (like ppo.py).

- :func:`wilson_interval`: the Wilson score interval of a 👍 rate (Wilson 1927; Evan
  Miller, "How Not To Sort By Average Rating"). Used for display: it is a fixed-n
  interval, not valid under repeated looks.
- :func:`msprt_log_lambda`, :func:`confidence_sequence`, :func:`ab_test`: the
  always-valid comparison of two 👍 rates that decides a canary. It is the normal-mixture
  mSPRT of Johari, Koomen, Pekelis & Walsh, "Peeking at A/B Tests" (KDD 2017) and
  Johari, Pekelis, Koomen & Walsh, "Always Valid Inference: Continuous Monitoring of
  A/B Tests" (Operations Research 70(3), 2022). With ``theta_hat`` the difference of the
  two rates, ``V`` its variance and a N(theta0, tau^2) mixture over the effect,

      Lambda_n(theta0) = sqrt(V/(V + tau^2)) exp(tau^2 (theta_hat - theta0)^2 / (2V(V + tau^2)))

  is a nonnegative martingale under theta0, so by Ville's inequality
  P(Lambda_n >= 1/alpha at ANY n) <= alpha: the test may be checked after every vote
  without inflating its error. Inverting it gives a *confidence sequence*, an interval
  that covers the true difference at all times with probability >= 1 - alpha. The
  Bernoulli variance is a plug-in estimate (as in the paper's binary-data section), so
  the guarantee is asymptotic; decisions wait for ``burn_in`` votes per version, and
  benchmarks/canary.py measures the error rates that result.
- :func:`decide_codes` / :func:`decide`: the canary rule on top of the confidence
  sequence: roll back when the candidate is worse with confidence, promote after a
  minimum of votes when it is not worse than ``margin``, else decide at the timeout.
- :func:`bradley_terry` / :func:`leaderboard`: the arena leaderboard, a Bradley-Terry
  maximum-likelihood fit on the Elo scale with bootstrap 95% intervals, as FastChat's
  ``fastchat/serve/monitor/elo_analysis.py`` (``compute_mle_elo`` and
  ``get_bootstrap_result``): ties and both-bad count half a win to each side.
- :func:`in_candidate_arm`: sticky canary assignment by a stable hash of the user.

Every function takes numbers (or numpy arrays of them, where noted) and returns
numbers; tests/test_live_eval.py checks each against hand-worked values and plain loops.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

# Decision codes (numpy-friendly, so the benchmark runs thousands of canaries at once).
CONTINUE, ROLLBACK, PROMOTE = 0, 1, 2
ACTIONS = {CONTINUE: "continue", ROLLBACK: "rollback", PROMOTE: "promote"}

# Elo scale of FastChat's leaderboard: a 400-point gap = 10:1 odds.
ELO_SCALE, ELO_BASE, ELO_INIT = 400.0, 10.0, 1000.0


# --------------------------------------------------------------------------- rates


def z_value(confidence: float) -> float:
    """Two-sided normal quantile: z(0.95) = 1.959963984540054."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``; (0, 1) when n = 0.

    center = (p + z^2/2n) / (1 + z^2/n),  half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


# --------------------------------------------------------------------------- mSPRT


def diff_variance(likes_a: Any, n_a: Any, likes_b: Any, n_b: Any, paired: Any = 0) -> Any:
    """Plug-in variance of rate_a - rate_b: p_a(1-p_a)/n_a + p_b(1-p_b)/n_b, with each
    p smoothed to (likes + 1) / (n + 2) so that 0/5 or 5/5 does not claim zero
    variance (which would make the first few votes look infinitely certain).

    ``paired``: how many of the votes come in pairs, one vote for each version from one
    arena pick (the winner 👍, the loser 👎: they go opposite ways, so the two rates are
    not independent). Each pair adds the largest covariance term it can have (correlation
    -1, Cauchy-Schwarz), 2 sqrt(p_a(1-p_a) p_b(1-p_b)) / (n_a n_b), so the variance is
    not understated whatever the picks' correlation; 0 pairs = independent votes.
    Arrays broadcast; n must be >= 1."""
    na, nb = np.asarray(n_a, dtype=float), np.asarray(n_b, dtype=float)
    pa = (np.asarray(likes_a, dtype=float) + 1.0) / (na + 2.0)
    pb = (np.asarray(likes_b, dtype=float) + 1.0) / (nb + 2.0)
    va, vb = pa * (1 - pa), pb * (1 - pb)
    return va / na + vb / nb + 2.0 * np.asarray(paired, dtype=float) * np.sqrt(va * vb) / (na * nb)


def msprt_log_lambda(theta_hat: Any, variance: Any, tau: float, theta0: float = 0.0) -> Any:
    """log of the normal-mixture mSPRT statistic (Johari et al. 2017, eq. for the
    normal mixture): 0.5 log(V/(V+tau^2)) + tau^2 (theta_hat-theta0)^2 / (2V(V+tau^2)).
    Reject theta0 when it reaches log(1/alpha)."""
    v = np.asarray(variance, dtype=float)
    t2 = tau * tau
    d = np.asarray(theta_hat, dtype=float) - theta0
    return 0.5 * np.log(v / (v + t2)) + t2 * d * d / (2.0 * v * (v + t2))


def confidence_half_width(variance: Any, tau: float, alpha: float) -> Any:
    """Half-width of the always-valid interval: every theta0 with
    log Lambda(theta0) < log(1/alpha), i.e.
    sqrt(2V(V+tau^2)/tau^2 * (log(1/alpha) + 0.5 log((V+tau^2)/V)))."""
    v = np.asarray(variance, dtype=float)
    t2 = tau * tau
    return np.sqrt(2.0 * v * (v + t2) / t2 * (math.log(1.0 / alpha) + 0.5 * np.log((v + t2) / v)))


def confidence_sequence(
    likes_a: Any, n_a: Any, likes_b: Any, n_b: Any, *, tau: float, alpha: float, paired: Any = 0
) -> tuple[Any, Any, Any]:
    """(theta_hat, low, high) for rate_a - rate_b, valid at every look (arrays broadcast);
    ``paired``: see :func:`diff_variance`."""
    theta = np.asarray(likes_a, dtype=float) / np.asarray(n_a, dtype=float) - np.asarray(
        likes_b, dtype=float
    ) / np.asarray(n_b, dtype=float)
    half = confidence_half_width(diff_variance(likes_a, n_a, likes_b, n_b, paired), tau, alpha)
    return theta, theta - half, theta + half


@dataclass(frozen=True)
class Rule:
    """The canary decision rule (its fields come from the RLHF_CANARY_* settings)."""

    alpha: float = 0.05  # error rate of each automatic decision
    tau: float = 0.1  # mixture sd: the size of effect the test is most sensitive to
    burn_in: int = 20  # votes per version before any decision (the normal approximation)
    min_votes: int = 100  # candidate votes before a promotion
    margin: float = 0.05  # "not worse": promote when the lower bound > -margin (0 = better)
    timeout_s: float = 86400.0
    timeout_action: str = "rollback"  # what a canary that never decided becomes

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0 (0 = promote only if better), got {self.margin}")
        if self.timeout_action not in ("rollback", "promote"):
            raise ValueError(
                f"timeout action must be 'rollback' or 'promote', got {self.timeout_action!r}"
            )


def decide_codes(
    likes_c: Any, n_c: Any, likes_b: Any, n_b: Any, rule: Rule, paired: Any = 0
) -> tuple[Any, Any, Any, Any]:
    """The canary rule on arrays of canaries: (code, theta_hat, low, high), where the
    difference is candidate - baseline and code is CONTINUE / ROLLBACK / PROMOTE.
    ``paired``: votes that come in pairs from arena picks (:func:`diff_variance`).

    - ROLLBACK when both versions have ``burn_in`` votes and the whole interval is
      below 0 (the candidate is worse, with error <= alpha at any look);
    - PROMOTE when the candidate has ``min_votes`` votes (and both ``burn_in``) and the
      interval's low end is above -margin (not worse by more than the margin).
    The timeout is not here: it depends on the clock, see :func:`decide`."""
    n_c = np.asarray(n_c)
    n_b = np.asarray(n_b)
    ready = (n_c >= max(rule.burn_in, 1)) & (n_b >= max(rule.burn_in, 1))
    safe_c = np.maximum(n_c, 1)
    safe_b = np.maximum(n_b, 1)
    theta, low, high = confidence_sequence(
        likes_c, safe_c, likes_b, safe_b, tau=rule.tau, alpha=rule.alpha, paired=paired
    )
    code = np.where(ready & (high < 0), ROLLBACK, CONTINUE)
    promote = ready & (n_c >= rule.min_votes) & (low > -rule.margin) & (code == CONTINUE)
    code = np.where(promote, PROMOTE, code)
    return code, theta, low, high


@dataclass
class ABResult:
    """The numbers behind one look at a canary (recorded with every decision)."""

    action: str  # continue / rollback / promote
    reason: str
    candidate_votes: int
    candidate_likes: int
    baseline_votes: int
    baseline_likes: int
    candidate_rate: float | None
    baseline_rate: float | None
    candidate_interval: tuple[float, float]  # Wilson 95%, for display
    baseline_interval: tuple[float, float]
    difference: float | None  # candidate - baseline
    interval: tuple[float, float] | None  # always-valid (1 - alpha) interval of the difference
    log_lambda: float | None  # mSPRT statistic against "no difference"
    p_value: float | None  # always-valid p-value at this look: min(1, 1/Lambda)
    elapsed_s: float = 0.0
    paired_votes: int = 0  # pairs of votes from arena picks (see diff_variance)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    likes_c: int,
    n_c: int,
    likes_b: int,
    n_b: int,
    rule: Rule,
    elapsed_s: float = 0.0,
    paired: int = 0,
) -> ABResult:
    """One look at a canary: the action, why, and every number behind it. ``paired``:
    how many pairs of the votes come from arena picks (:func:`diff_variance`)."""
    code, theta, low, high = (
        float(x) for x in decide_codes(likes_c, n_c, likes_b, n_b, rule, paired)
    )  # fmt: skip
    has_votes = n_c > 0 and n_b > 0
    log_lam = None
    if has_votes:
        var = float(diff_variance(likes_c, n_c, likes_b, n_b, paired))
        log_lam = float(msprt_log_lambda(theta, var, rule.tau))
    action = ACTIONS[int(code)]
    if action == "rollback":
        reason = (
            f"candidate worse with {1 - rule.alpha:.0%} confidence: difference {theta:+.3f}, "
            f"interval [{low:+.3f}, {high:+.3f}] below 0"
        )
    elif action == "promote":
        what = "better" if rule.margin == 0 else f"not worse than -{rule.margin:g}"
        reason = (
            f"candidate {what} after {n_c} votes: difference {theta:+.3f}, "
            f"interval [{low:+.3f}, {high:+.3f}]"
        )
    elif elapsed_s >= rule.timeout_s:
        action = rule.timeout_action
        reason = (
            f"timeout after {elapsed_s / 3600:.1f} h without a decision "
            f"({n_c} + {n_b} votes); RLHF_CANARY_TIMEOUT_ACTION={rule.timeout_action}"
        )
    else:
        need = max(rule.burn_in - min(n_c, n_b), rule.min_votes - n_c, 0)
        reason = f"collecting votes ({need} more before a promotion)" if need else "undecided"
    return ABResult(
        action=action,
        reason=reason,
        candidate_votes=int(n_c),
        candidate_likes=int(likes_c),
        baseline_votes=int(n_b),
        baseline_likes=int(likes_b),
        candidate_rate=likes_c / n_c if n_c else None,
        baseline_rate=likes_b / n_b if n_b else None,
        candidate_interval=wilson_interval(likes_c, n_c),
        baseline_interval=wilson_interval(likes_b, n_b),
        difference=theta if has_votes else None,
        interval=(low, high) if has_votes else None,
        log_lambda=log_lam,
        p_value=min(1.0, math.exp(-log_lam)) if log_lam is not None else None,
        elapsed_s=float(elapsed_s),
        paired_votes=int(paired),
    )


# --------------------------------------------------------------------------- assignment


def assignment_point(user_id: str, salt: str) -> float:
    """A stable uniform number in [0, 1) for (salt, user): the first 8 bytes of
    SHA-256. Stable across processes and machines (Python's hash() is salted)."""
    digest = hashlib.sha256(f"{salt}\x00{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_candidate_arm(user_id: str, share: float, salt: str) -> bool:
    """Sticky canary assignment: the same user always gets the same arm for one
    ``salt`` (the candidate's version), and raising ``share`` only adds users to the
    candidate arm (a user with point < 0.1 also has point < 0.2)."""
    return share > 0 and assignment_point(user_id, salt) < share


# --------------------------------------------------------------------------- Bradley-Terry

# The prior on strengths (natural-log scale): N(0, 1/L2), sd 3.2 = about 550 Elo points.
# FastChat fits without one on thousands of battles; a young service has a handful, and
# one unbeaten battle would otherwise put a version thousands of points ahead.
L2 = 0.1

# One battle: (model a, model b, outcome) with outcome "a", "b", "tie" or "both_bad".
Battle = tuple[int, int, str]
OUTCOMES = ("a", "b", "tie", "both_bad")


def _battle_table(
    battles: Iterable[Battle], models: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (i, j, score of i) rows with their counts; a tie or both-bad is
    0.5 for each side, as FastChat counts them."""
    index = {m: k for k, m in enumerate(models)}
    counts: dict[tuple[int, int, float], int] = {}
    for a, b, outcome in battles:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown battle outcome {outcome!r}; use one of {OUTCOMES}")
        if a == b:
            continue  # a version against itself says nothing about ratings
        score = {"a": 1.0, "b": 0.0}.get(outcome, 0.5)
        key = (index[a], index[b], score)
        counts[key] = counts.get(key, 0) + 1
    keys = list(counts)
    i = np.array([k[0] for k in keys], dtype=int)
    j = np.array([k[1] for k in keys], dtype=int)
    y = np.array([k[2] for k in keys], dtype=float)
    w = np.array([counts[k] for k in keys], dtype=float)
    return i, j, y, w


def _fit_bt(
    n_models: int,
    i: np.ndarray,
    j: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    l2: float,
    iters: int = 100,
) -> np.ndarray:
    """Newton's method on the weighted logistic likelihood of the strengths s:
    P(i beats j) = sigmoid(s_i - s_j), plus (l2/2)|s|^2 so that an unbeaten version
    has a finite rating. Natural-log scale; the mean is 0."""
    s = np.zeros(n_models)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(s[i] - s[j])))
        r = w * (y - p)
        grad = np.bincount(i, r, n_models) - np.bincount(j, r, n_models) - l2 * s
        h = w * p * (1 - p)
        hess = np.zeros((n_models, n_models))
        np.add.at(hess, (i, i), -h)
        np.add.at(hess, (j, j), -h)
        np.add.at(hess, (i, j), h)
        np.add.at(hess, (j, i), h)
        hess -= l2 * np.eye(n_models)
        # The likelihood fixes differences only: solve on the mean-zero subspace.
        hess -= np.full((n_models, n_models), 1.0 / n_models)
        step = np.linalg.solve(hess, grad)
        s = s - step
        s -= s.mean()
        if np.max(np.abs(step)) < 1e-10:
            break
    return s


def bradley_terry(
    battles: Iterable[Battle], models: Sequence[int] | None = None, l2: float = L2
) -> dict[int, float]:
    """Elo-scale Bradley-Terry ratings (mean ELO_INIT): a gap of d points means
    P(win) = 1 / (1 + 10^(-d/400)). ``l2`` is a weak prior toward equal ratings
    (0 = the plain maximum likelihood, which diverges for an unbeaten version)."""
    battles = list(battles)
    models = sorted({m for a, b, _ in battles for m in (a, b)}) if models is None else list(models)
    if not models:
        return {}
    i, j, y, w = _battle_table(battles, models)
    s = _fit_bt(len(models), i, j, y, w, l2) if len(w) else np.zeros(len(models))
    elo = ELO_INIT + ELO_SCALE / math.log(ELO_BASE) * s
    return {m: float(e) for m, e in zip(models, elo, strict=True)}


def leaderboard(
    battles: Iterable[Battle], rounds: int = 1000, seed: int = 0, l2: float = L2
) -> list[dict[str, Any]]:
    """Ratings with bootstrap 95% intervals (FastChat: resample the battles with
    replacement ``rounds`` times, refit, take the 2.5% and 97.5% quantiles), best first.
    Rows: version, rating, low, high, battles, wins, ties (a tie or both-bad)."""
    battles = list(battles)
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    if not models:
        return []
    i, j, y, w = _battle_table(battles, models)
    point = bradley_terry(battles, models, l2)
    samples = np.empty((0, len(models)))
    if len(w):
        # Resampling n battles with replacement = a multinomial draw over the distinct rows.
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(int(w.sum()), w / w.sum(), size=rounds)
        scale = ELO_SCALE / math.log(ELO_BASE)
        samples = np.array(
            [ELO_INIT + scale * _fit_bt(len(models), i, j, y, d.astype(float), l2) for d in draws]
        )
    rows = []
    for k, m in enumerate(models):
        mine = [(a, b, o) for a, b, o in battles if m in (a, b) and a != b]
        wins = sum((a == m and o == "a") or (b == m and o == "b") for a, b, o in mine)
        ties = sum(o in ("tie", "both_bad") for _, _, o in mine)
        low, high = (
            (float(np.quantile(samples[:, k], 0.025)), float(np.quantile(samples[:, k], 0.975)))
            if len(samples)
            else (point[m], point[m])
        )
        rows.append(
            {"version": m, "rating": point[m], "low": low, "high": high,
             "battles": len(mine), "wins": wins, "ties": ties}
        )  # fmt: skip
    rows.sort(key=lambda r: -r["rating"])
    return rows
