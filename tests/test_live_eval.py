"""rlhf_core.live_eval against hand-worked numbers and plain Python loops.

Each hand-worked case shows its arithmetic in a comment, so a reader can check it
without running anything.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from rlhf_core.live_eval import (
    PROMOTE,
    ROLLBACK,
    Rule,
    assignment_point,
    bradley_terry,
    confidence_half_width,
    decide,
    decide_codes,
    diff_variance,
    in_candidate_arm,
    leaderboard,
    msprt_log_lambda,
    wilson_interval,
    z_value,
)

# ------------------------------------------------------------------ Wilson


def test_z_value_is_the_normal_quantile():
    assert z_value(0.95) == pytest.approx(1.959963984540054, abs=1e-12)
    assert z_value(0.90) == pytest.approx(1.6448536269514722, abs=1e-12)


def test_wilson_interval_worked_numbers():
    # 8 of 10, z = 1.959964, z^2 = 3.841459:
    # denom = 1 + 3.841459/10 = 1.3841459
    # center = (0.8 + 3.841459/20) / denom = 0.9920729 / 1.3841459 = 0.716742
    # half = 1.959964 * sqrt(0.8*0.2/10 + 3.841459/400) / denom
    #      = 1.959964 * sqrt(0.016 + 0.0096036) / 1.3841459 = 0.226596
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490162, abs=1e-5)
    assert high == pytest.approx(0.943321, abs=1e-5)
    # 0 of 10: center = 0.192073/1.384146 = 0.138767 = half: [0, 0.277533]
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.277533, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(3, 2)


def test_wilson_interval_covers_as_stated_plain_loop():
    # Exact coverage by summing the binomial pmf over every outcome (n = 50, p = 0.3).
    n, p = 50, 0.3
    coverage = 0.0
    for k in range(n + 1):
        low, high = wilson_interval(k, n)
        if low <= p <= high:
            coverage += math.comb(n, k) * p**k * (1 - p) ** (n - k)
    assert 0.93 < coverage < 0.97


# ------------------------------------------------------------------ mSPRT


def test_diff_variance_smooths_each_rate():
    # 3 of 8 -> p = 4/10 = 0.4, var 0.24/8 = 0.03; 5 of 8 -> p = 0.6, var 0.03: total 0.06
    assert float(diff_variance(3, 8, 5, 8)) == pytest.approx(0.06)
    # 0 of 5 is not "certain": p = 1/7, var = (1/7)(6/7)/5 = 0.0244898
    assert float(diff_variance(0, 5, 0, 5)) == pytest.approx(2 * 6 / 49 / 5)


def test_msprt_worked_numbers():
    # theta_hat = -0.2, V = 0.01, tau = 0.1 (tau^2 = 0.01):
    # 0.5 log(0.01/0.02) = -0.346574;  0.01 * 0.04 / (2 * 0.01 * 0.02) = 1.0
    assert float(msprt_log_lambda(-0.2, 0.01, 0.1)) == pytest.approx(1.0 - 0.346574, abs=1e-6)
    # half-width at alpha 0.05: sqrt(2*0.01*0.02/0.01 * (log 20 + 0.5 log 2))
    #   = sqrt(0.04 * (2.995732 + 0.346574)) = sqrt(0.133692) = 0.365639
    assert float(confidence_half_width(0.01, 0.1, 0.05)) == pytest.approx(0.365639, abs=1e-6)


def test_msprt_is_the_mixture_likelihood_ratio_plain_loop():
    """Lambda = integral over theta ~ N(0, tau^2) of the normal likelihood ratio
    exp((2 theta_hat theta - theta^2) / 2V), here summed on a fine grid."""
    for theta_hat, v, tau in [(-0.2, 0.01, 0.1), (0.05, 0.002, 0.2), (0.3, 0.05, 0.15)]:
        total, step = 0.0, tau / 2000
        for k in range(-20000, 20001):
            theta = k * step
            prior = math.exp(-theta * theta / (2 * tau * tau)) / math.sqrt(2 * math.pi) / tau
            total += prior * math.exp((2 * theta_hat * theta - theta * theta) / (2 * v)) * step
        assert float(msprt_log_lambda(theta_hat, v, tau)) == pytest.approx(math.log(total), 1e-6)


def test_confidence_sequence_is_where_the_test_does_not_reject():
    v, tau, alpha, theta_hat = 0.004, 0.1, 0.05, -0.12
    half = float(confidence_half_width(v, tau, alpha))
    for edge in (theta_hat - half, theta_hat + half):
        log_lam = float(msprt_log_lambda(theta_hat, v, tau, theta0=edge))
        assert log_lam == pytest.approx(math.log(1 / alpha), abs=1e-9)
    inside = float(msprt_log_lambda(theta_hat, v, tau, theta0=theta_hat + 0.9 * half))
    assert inside < math.log(1 / alpha)


def test_checked_after_every_vote_equal_versions_rarely_roll_back():
    """The property that makes the test usable: under no difference, looking after
    every vote for 2000 votes rolls back at most about alpha of the time."""
    rule = Rule(alpha=0.05, tau=0.1, burn_in=20, min_votes=10**9)
    rng = np.random.default_rng(7)
    runs, votes, p = 2000, 2000, 0.5
    arm = rng.random((runs, votes)) < 0.5  # True = candidate
    like = rng.random((runs, votes)) < p
    n_c = np.cumsum(arm, axis=1)
    n_b = np.cumsum(~arm, axis=1)
    l_c = np.cumsum(arm & like, axis=1)
    l_b = np.cumsum(~arm & like, axis=1)
    code, *_ = decide_codes(l_c, n_c, l_b, n_b, rule)
    rolled_back = (code == ROLLBACK).any(axis=1).mean()
    assert rolled_back <= 0.05
    # ...while a fixed-n 95% test checked after every vote would be wrong far more often.
    theta = l_c / np.maximum(n_c, 1) - l_b / np.maximum(n_b, 1)
    naive = theta / np.sqrt(diff_variance(l_c, np.maximum(n_c, 1), l_b, np.maximum(n_b, 1)))
    ready = (n_c >= 20) & (n_b >= 20)
    assert ((naive < -1.96) & ready).any(axis=1).mean() > 2 * rolled_back


def test_decide_worked_cases():
    rule = Rule(alpha=0.05, tau=0.1, burn_in=20, min_votes=100, margin=0.05)
    # Candidate 10/50 vs baseline 35/50: difference -0.5, clearly worse.
    worse = decide(10, 50, 35, 50, rule)
    assert worse.action == "rollback" and worse.interval[1] < 0
    assert worse.difference == pytest.approx(-0.5)
    assert worse.p_value < 0.05 and "worse" in worse.reason
    # Too few votes: never decides, whatever the rates.
    early = decide(0, 10, 10, 10, rule)
    assert early.action == "continue" and "more before a promotion" in early.reason
    # 400/500 vs 380/500 after the minimum: low end above -0.05 -> promote.
    good = decide(400, 500, 380, 500, rule)
    assert good.action == "promote" and good.interval[0] > -0.05
    # Equal rates, not enough votes to bound the difference within 0.05: continue...
    tie = decide(60, 120, 60, 120, rule)
    assert tie.action == "continue"
    # ...until the timeout, which takes the configured action.
    late = decide(60, 120, 60, 120, Rule(timeout_s=10, timeout_action="promote"), elapsed_s=11)
    assert late.action == "promote" and "timeout" in late.reason
    assert decide(60, 120, 60, 120, Rule(timeout_s=10), elapsed_s=11).action == "rollback"
    # margin 0 ("better" as the setting) needs the low end above 0.
    assert decide(400, 500, 380, 500, Rule(margin=0.0)).action == "continue"
    assert decide(450, 500, 300, 500, Rule(margin=0.0)).action == "promote"
    with pytest.raises(ValueError, match="timeout action"):
        Rule(timeout_action="keep")


def test_arena_pairs_keep_the_error_rates_when_checked_after_every_pick():
    """Equal versions compared in the arena alone: every pick is the winner's 👍 and the
    loser's 👎. Taken as independent votes, the test rolled back (or, margin 0, promoted)
    in well over alpha of the canaries; with the pairs counted it stays under alpha."""
    rng = np.random.default_rng(5)
    runs, picks = 1000, 600
    candidate_wins = (rng.random((runs, picks)) < 0.5).cumsum(axis=1)
    n = np.arange(1, picks + 1)
    rule = Rule(margin=0.0)

    def first_decisions(paired):
        code, *_ = decide_codes(candidate_wins, n, n - candidate_wins, n, rule, paired)
        decided = code != 0
        first = code[np.arange(runs), decided.argmax(axis=1)] * decided.any(axis=1)
        return (first == ROLLBACK).mean(), (first == PROMOTE).mean()

    naive_rollbacks, naive_promotions = first_decisions(0)
    assert naive_rollbacks > 0.05 and naive_promotions > 0.05
    rollbacks, promotions = first_decisions(n)
    assert rollbacks < 0.05 and promotions < 0.05
    one = decide(80, 200, 120, 200, Rule(), paired=200)
    assert one.action == "continue" and one.paired_votes == 200
    assert decide(80, 200, 120, 200, Rule()).action == "rollback"  # as independent votes


def test_decide_codes_matches_decide_elementwise():
    rule = Rule(min_votes=30)
    rng = random.Random(3)
    cases = [(rng.randint(0, 60), 60, rng.randint(0, 60), 60) for _ in range(50)]
    arr = np.array(cases).T
    codes, *_ = decide_codes(arr[0], arr[1], arr[2], arr[3], rule)
    names = {0: "continue", ROLLBACK: "rollback", PROMOTE: "promote"}
    assert [names[int(c)] for c in codes] == [decide(*c, rule).action for c in cases]


# ------------------------------------------------------------------ assignment


def test_assignment_is_sticky_and_matches_the_share():
    users = [f"user-{k}" for k in range(20000)]
    arms = [in_candidate_arm(u, 0.2, "v7") for u in users]
    assert arms == [in_candidate_arm(u, 0.2, "v7") for u in users]  # sticky
    assert abs(sum(arms) / len(users) - 0.2) < 0.01
    # Raising the share only adds people: nobody in the 20% leaves it at 30%.
    assert all(in_candidate_arm(u, 0.3, "v7") for u, a in zip(users, arms, strict=True) if a)
    # A new candidate draws its own people.
    other = [in_candidate_arm(u, 0.2, "v8") for u in users]
    assert 0.1 < sum(a and b for a, b in zip(arms, other, strict=True)) / sum(arms) < 0.3
    assert not in_candidate_arm("anyone", 0.0, "v7")
    assert in_candidate_arm("anyone", 1.0, "v7")


def test_assignment_point_is_sha256():
    import hashlib

    digest = hashlib.sha256(b"v3\x00alice").digest()
    assert assignment_point("alice", "v3") == int.from_bytes(digest[:8], "big") / 2**64


# ------------------------------------------------------------------ Bradley-Terry


def test_bradley_terry_two_versions_worked():
    # 1 beats 2 three times in four: P = 0.75 = 1/(1 + 10^(-d/400)) -> d = 400 log10(3) = 190.849
    battles = [(1, 2, "a")] * 3 + [(1, 2, "b")]
    ratings = bradley_terry(battles, l2=0.0)
    assert ratings[1] - ratings[2] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (ratings[1] + ratings[2]) / 2 == pytest.approx(1000.0)
    # A tie is half a win each: 2 wins + 2 ties for version 1 -> 3 of 4 again.
    tied = [(1, 2, "a")] * 2 + [(2, 1, "tie"), (1, 2, "both_bad")]
    assert bradley_terry(tied, l2=0.0)[1] - bradley_terry(tied, l2=0.0)[2] == pytest.approx(
        400 * math.log10(3), abs=1e-6
    )


def ref_bradley_terry_mm(battles, iters=5000):
    """Zermelo's / Hunter's (2004) MM iteration, a different algorithm for the same MLE:
    gamma_i <- W_i / sum_j n_ij / (gamma_i + gamma_j)."""
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    wins = {m: 0.0 for m in models}
    games: dict[tuple[int, int], float] = {}
    for a, b, o in battles:
        score = {"a": 1.0, "b": 0.0}.get(o, 0.5)
        wins[a] += score
        wins[b] += 1 - score
        games[(a, b)] = games.get((a, b), 0) + 1
        games[(b, a)] = games.get((b, a), 0) + 1
    gamma = {m: 1.0 for m in models}
    for _ in range(iters):
        new = {}
        for i in models:
            denom = sum(n / (gamma[i] + gamma[j]) for (x, j), n in games.items() if x == i)
            new[i] = wins[i] / denom
        mean_log = sum(math.log(g) for g in new.values()) / len(new)
        gamma = {m: g / math.exp(mean_log) for m, g in new.items()}
    return {m: 1000 + 400 * math.log10(g) for m, g in gamma.items()}


def test_bradley_terry_matches_mm_reference():
    rng = random.Random(0)
    strength = {0: 0.0, 1: 0.5, 2: 1.0, 3: -0.3}
    battles = []
    for _ in range(400):
        a, b = rng.sample(list(strength), 2)
        p = 1 / (1 + math.exp(-(strength[a] - strength[b])))
        u = rng.random()
        battles.append((a, b, "tie" if abs(u - p) < 0.05 else ("a" if u < p else "b")))
    ours = bradley_terry(battles, l2=0.0)
    ref = ref_bradley_terry_mm(battles)
    for m in strength:
        assert ours[m] == pytest.approx(ref[m], abs=1e-4)


def test_leaderboard_bootstrap_intervals():
    battles = [(2, 1, "a")] * 30 + [(2, 1, "b")] * 10 + [(1, 0, "a")] * 20 + [(1, 0, "tie")] * 20
    rows = leaderboard(battles, rounds=300, seed=1)
    assert [r["version"] for r in rows] == [2, 1, 0]
    for row in rows:
        assert row["low"] < row["rating"] < row["high"]
    top = rows[0]
    assert top["battles"] == 40 and top["wins"] == 30 and top["ties"] == 0
    assert rows[2]["ties"] == 20
    # An unbeaten version still gets a finite rating (the weak prior).
    assert math.isfinite(bradley_terry([(5, 6, "a")] * 3)[5])
    assert leaderboard([]) == []
    with pytest.raises(ValueError, match="unknown battle outcome"):
        bradley_terry([(1, 2, "draw")])
