"""rlhf_core.ppo against numbers worked by hand and against plain Python loops.

Each hand-worked case shows its arithmetic in a comment so that a reader can check it
without running anything.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhf_core.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_gae,
    continue_logprobs,
    entropy_from_logits,
    kl_barrier,
    kl_penalty,
    last_token_index,
    logprobs_from_logits,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    mean_upper_bound,
    policy_loss,
    token_entropy,
    token_kl,
    token_rewards,
    value_loss,
)

T = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol
    )


# ------------------------------------------------------------- plain Python references


def ref_gae(rewards: list[float], values: list[float], gamma: float, lam: float):
    """GAE over one answer (no padding), written straight from the paper."""
    n = len(rewards)
    adv = [0.0] * n
    for t in range(n):
        total = 0.0
        for k in range(t, n):  # A_t = sum_k (gamma lam)^(k-t) delta_k, V after the answer = 0
            next_v = values[k + 1] if k + 1 < n else 0.0
            delta = rewards[k] + gamma * next_v - values[k]
            total += (gamma * lam) ** (k - t) * delta
        adv[t] = total
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


def random_batch(seed: int, batch: int = 4, tokens: int = 9, side: str = "right"):
    """Answers of random lengths, padded on ``side``; padding holds junk on purpose."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, tokens - 2) for _ in range(batch)]
    answers = [[[rng.gauss(0, 1) for _ in range(5)] for _ in range(n)] for n in lengths]
    return answers, pad(answers, tokens, side)


def pad(answers, tokens: int, side: str, junk: float = 7.0):
    """answers[b][t] = list of fields -> (tensor [fields, batch, tokens], mask [batch, tokens])."""
    fields = len(answers[0][0])
    x = torch.full((fields, len(answers), tokens), junk, dtype=torch.float64)
    mask = torch.zeros(len(answers), tokens, dtype=torch.float64)
    for b, ans in enumerate(answers):
        start = 1 if side == "right" else tokens - len(ans) - 1  # a pad token on both sides
        for i, token in enumerate(ans):
            x[:, b, start + i] = T(token, dtype=torch.float64)
            mask[b, start + i] = 1.0
    return x, mask


def answer_tokens(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [
        [float(v) for v, m in zip(row, mrow, strict=True) if m > 0]
        for row, mrow in zip(x, mask, strict=True)
    ]


# ------------------------------------------------------------------------ masked stats


def test_masked_mean_and_var_by_hand():
    x = T([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    # tokens 1, 2, 3, 6: mean 3; squared deviations 4, 1, 0, 9 = 14; unbiased 14 / 3
    assert close(masked_mean(x, mask), 3.0)
    assert close(masked_var(x, mask), 14 / 3)
    assert close(masked_var(x, mask, unbiased=False), 14 / 4)
    assert close(masked_mean(x, mask, axis=1), [1.5, 4.5])


def test_masked_whiten_by_hand():
    x = T([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    std = math.sqrt(14 / 3)
    expected = T([[-2 / std, -1 / std, 0.0], [0.0, 0.0, 3 / std]])
    assert close(masked_whiten(x, mask), expected, 1e-4)
    # shift_mean=False keeps the mean: (x - 3) / std + 3 on the answer tokens
    assert close(masked_whiten(x, mask, shift_mean=False), (expected + 3) * mask, 1e-4)
    w = masked_whiten(torch.randn(3, 7, dtype=torch.float64), torch.ones(3, 7, dtype=torch.float64))
    assert abs(float(w.mean())) < 1e-6 and abs(float(w.std()) - 1) < 1e-4


@pytest.mark.parametrize(
    "call",
    [
        lambda x, m: masked_mean(x, m),
        lambda x, m: masked_var(x, m),
        lambda x, m: masked_whiten(x, m),
        lambda x, m: masked_mean(x, m, axis=1),
        lambda x, m: policy_loss(x, x, x, m, 0.2),
        lambda x, m: value_loss(x, x, x, m, 0.2),
    ],
)
def test_empty_mask_is_a_clear_value_error(call):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="no tokens"):
        call(x, torch.zeros(2, 3))


def test_masked_mean_per_row_rejects_one_empty_row():
    with pytest.raises(ValueError, match="no tokens"):
        masked_mean(torch.ones(2, 3), T([[1.0, 0, 0], [0, 0, 0]]), axis=1)


# ------------------------------------------------------------------------------ GAE


def test_gae_issue_example_gamma_lam_one():
    # delta = [1 + .5 - .5, 0 + .5 - .5, 1 + 0 - .5] = [1, 0, .5]; A = cumulative sums from the end
    adv, ret = compute_gae(T([[1.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), torch.ones(1, 3), 1.0, 1.0)
    assert close(adv, [[1.5, 0.5, 0.5]])
    assert close(ret, [[2.0, 1.0, 1.0]])


def test_gae_by_hand_with_discount():
    # gamma = .9, lam = .8, gamma*lam = .72
    # t=2: delta = 1 + 0 - .5 = .5                  A2 = .5
    # t=1: delta = 0 + .9*.5 - .5 = -.05            A1 = -.05 + .72*.5 = .31
    # t=0: delta = 1 + .9*.5 - .5 = .95             A0 = .95 + .72*.31 = 1.1732
    adv, ret = compute_gae(T([[1.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), torch.ones(1, 3), 0.9, 0.8)
    assert close(adv, [[1.1732, 0.31, 0.5]])
    assert close(ret, [[1.6732, 0.81, 1.0]])


def test_gae_value_after_last_answer_token_is_zero_and_padding_is_ignored():
    # the answer [1, 0, 1] with values .5 sits between junk (even NaN) padding on both sides
    rewards = T([[float("nan"), 1.0, 0.0, 1.0, 5.0, 5.0]])
    values = T([[float("nan"), 0.5, 0.5, 0.5, 9.0, 9.0]])
    mask = T([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    assert close(adv, [[0.0, 1.5, 0.5, 0.5, 0.0, 0.0]])
    assert close(ret, [[0.0, 2.0, 1.0, 1.0, 0.0, 0.0]])


def test_gae_bootstraps_an_answer_the_rollout_length_stopped_from_the_given_value():
    """An answer cut by the rollout's length did not end: the value after its last token
    is the critic's estimate of the state it stopped in, not 0. gamma = 1, lam = .5.
    Row 1 (bootstrap .8): t=2 delta = .3 + .8 - .6 = .5, A2 = .5; t=1 delta = -.2 + .6 - .4
    = 0, A1 = .5 * .5 = .25; t=0 delta = .1 + .4 - .5 = 0, A0 = .125. Row 2, right-padded
    (bootstrap .25 after its 2nd token): t=1 delta = 1 + .25 - .5 = .75; t=0 delta = 0,
    A0 = .375. Returns = A + V."""
    rewards = T([[0.1, -0.2, 0.3], [0.0, 1.0, 5.0]])
    values = T([[0.5, 0.4, 0.6], [0.5, 0.5, 9.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, 1.0, 0.5, bootstrap=T([0.8, 0.25]))
    assert close(adv, [[0.125, 0.25, 0.5], [0.375, 0.75, 0.0]])
    assert close(ret, [[0.625, 0.65, 1.1], [0.875, 1.25, 0.0]])
    # a bootstrap of 0 is the ended episode of the plain call
    plain = compute_gae(rewards, values, mask, 1.0, 0.5)
    zero = compute_gae(rewards, values, mask, 1.0, 0.5, bootstrap=T([0.0, 0.0]))
    assert close(plain[0], zero[0].tolist()) and close(plain[1], zero[1].tolist())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("side", ["left", "right"])
def test_gae_matches_python_loop(seed: int, side: str):
    gamma, lam = [(1.0, 1.0), (0.99, 0.95), (0.9, 0.5), (1.0, 0.0), (0.5, 1.0)][seed]
    answers, ((rewards, values, *_), mask) = random_batch(seed, side=side)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    for b, ans in enumerate(answers):
        exp_adv, exp_ret = ref_gae([t[0] for t in ans], [t[1] for t in ans], gamma, lam)
        assert close(answer_tokens(adv, mask)[b], exp_adv, 1e-9)
        assert close(answer_tokens(ret, mask)[b], exp_ret, 1e-9)
    assert float(adv[mask == 0].abs().sum()) == 0 and float(ret[mask == 0].abs().sum()) == 0


# ---------------------------------------------------- left vs right padding, everywhere


@pytest.mark.parametrize("seed", range(3))
def test_left_and_right_padding_give_the_same_results(seed: int):
    answers, ((r1, v1, lp1, old1, ref1), m1) = random_batch(seed, side="left")
    (r2, v2, lp2, old2, ref2), m2 = pad(answers, 9, "right")
    assert not torch.equal(m1, m2)

    def everything(r, v, lp, old, ref, m):
        adv, ret = compute_gae(r, v, m, 0.95, 0.9)
        white = masked_whiten(adv, m)
        pg, pg_stats = policy_loss(lp, old, white, m, 0.2)
        vf, vf_stats = value_loss(v, old, ret, m, 0.2)
        rewards, _ = token_rewards(r[:, 0], kl_penalty(lp, ref, "k3"), m, 0.1)
        return (
            answer_tokens(adv, m),
            answer_tokens(ret, m),
            answer_tokens(white, m),
            answer_tokens(masked_whiten(r, m, shift_mean=False), m),
            answer_tokens(rewards, m),
            [float(pg), float(vf), float(masked_mean(lp, m)), float(masked_var(lp, m))],
            [float(s) for s in (*pg_stats.values(), *vf_stats.values())],
        )

    left, right = everything(r1, v1, lp1, old1, ref1, m1), everything(r2, v2, lp2, old2, ref2, m2)
    for a, b in zip(left, right, strict=True):
        for x, y in zip(a, b, strict=True):
            assert close(x, y, 1e-9)


# ------------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp, ref = T([[math.log(0.5)]]), T([[math.log(0.25)]])
    # k1 = log .5 - log .25 = log 2
    assert close(kl_penalty(logp, ref, "k1"), [[math.log(2)]])
    # logr = ref - logp = -log 2; k3 = e^-log2 - 1 + log 2 = .5 - 1 + .693147 = .193147
    assert close(kl_penalty(logp, ref, "k3"), [[0.5 - 1 + math.log(2)]])
    # k2 = .5 * (log 2)^2
    assert close(kl_penalty(logp, ref, "k2"), [[0.5 * math.log(2) ** 2]])
    # identical policies: every estimator is 0
    for est in ("k1", "k2", "k3"):
        assert close(kl_penalty(logp, logp, est), [[0.0]])
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_kl_estimators_are_unbiased_on_samples():
    # p = [.7, .2, .1], q = [.2, .3, .5]; the true KL(p || q), and the mean of k1 and k3 over
    # many samples of p, agree; k3 is non-negative on every sample, k1 is not.
    p, q = T([0.7, 0.2, 0.1], dtype=torch.float64), T([0.2, 0.3, 0.5], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    torch.manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True)
    k1, k3 = kl_penalty(p.log()[x], q.log()[x], "k1"), kl_penalty(p.log()[x], q.log()[x], "k3")
    assert abs(float(k1.mean()) - true_kl) < 0.01 and abs(float(k3.mean()) - true_kl) < 0.01
    assert float(k3.min()) >= 0 and float(k1.min()) < 0


def test_token_rewards_put_the_score_on_the_last_answer_token():
    kl = T([[9.0, 1.0, 2.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = T([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards, non_score = token_rewards(T([2.0, 3.0]), kl, mask, kl_coef=0.1)
    assert close(non_score, [[0.0, -0.1, -0.2, 0.0], [-0.1, -0.1, -0.1, -0.1]])
    assert close(rewards, [[0.0, -0.1, 1.8, 0.0], [-0.1, -0.1, -0.1, 2.9]])
    assert last_token_index(mask).tolist() == [2, 3]


# --------------------------------------------------------------------------- losses


def test_policy_loss_clipping_by_hand():
    # cliprange .2, so the ratio is clipped to [.8, 1.2]
    #   ratio 1.5, A=+1: max(-1.5, -1.2) = -1.2  clipped (no gain from moving further up)
    #   ratio 1.5, A=-1: max( 1.5,  1.2) =  1.5  not clipped (a bad move stays penalised)
    #   ratio 0.5, A=+1: max(-0.5, -0.8) = -0.5  not clipped
    #   ratio 0.5, A=-1: max( 0.5,  0.8) =  0.8  clipped
    # loss = (-1.2 + 1.5 - 0.5 + 0.8) / 4 = .15, clipfrac = 2/4
    ratio = T([[1.5, 1.5, 0.5, 0.5]])
    adv = T([[1.0, -1.0, 1.0, -1.0]])
    old = T([[-1.0, -2.0, -3.0, -0.5]])
    logp = (old + ratio.log()).requires_grad_()
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 4), 0.2)
    assert close(loss, 0.15)
    assert close(stats["policy/clipfrac"], 0.5)
    # approx_kl = mean((ratio - 1) - log ratio) = (2*(.5 - .405465) + 2*(-.5 + .693147)) / 4
    assert close(
        stats["policy/approx_kl"], (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 + math.log(2))) / 4
    )
    # the clipped tokens give no gradient; the others give -A * ratio / n
    loss.backward()
    assert close(logp.grad, [[0.0, 1.5 / 4, -0.5 / 4, 0.0]])


def test_policy_loss_padding_and_python_loop():
    torch.manual_seed(1)
    logp, old, adv = torch.randn(3, 6), torch.randn(3, 6) * 0.1, torch.randn(3, 6)
    logp = old + torch.randn(3, 6) * 0.3
    mask = (torch.rand(3, 6) > 0.3).float()
    mask[:, 0] = 1.0
    loss, stats = policy_loss(logp, old, adv, mask, 0.2)
    terms, clipped = [], 0
    for i in range(3):
        for j in range(6):
            if mask[i, j] == 0:
                continue
            r = math.exp(float(logp[i, j] - old[i, j]))
            a = float(adv[i, j])
            unclipped, clip = -a * r, -a * min(max(r, 0.8), 1.2)
            terms.append(max(unclipped, clip))
            clipped += clip > unclipped
    assert close(loss, sum(terms) / len(terms))
    assert close(stats["policy/clipfrac"], clipped / len(terms))


def test_value_loss_clipping_by_hand():
    # old values 0, cliprange .2 -> v is clipped to [-.2, .2]
    #   v=.5,  R=1: (v-R)^2 = .25, (.2-1)^2 = .64 -> .64 clipped
    #   v=.5,  R=0: .25 vs (.2)^2 = .04           -> .25
    #   v=-.1, R=0: .01 vs .01                    -> .01 (inside the range, not clipped)
    # loss = .5 * (.64 + .25 + .01) / 3 = .15, clipfrac = 1/3
    values = T([[0.5, 0.5, -0.1, 123.0]], requires_grad=True)
    old, returns = torch.zeros(1, 4), T([[1.0, 0.0, 0.0, -55.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, 0.2)
    assert close(loss, 0.15)
    assert close(stats["value/clipfrac"], 1 / 3)
    assert close(stats["value/error"], (0.25 + 0.25 + 0.01) / 3)
    loss.backward()
    # d/dv of .5 * mean: the clipped token gets 0, others (v - R) / 3, padding 0
    assert close(values.grad, [[0.0, 0.5 / 3, -0.1 / 3, 0.0]])


# ------------------------------------------------------------- logits helpers


def test_logprobs_and_entropy_match_plain_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (2, 5))
    logp = logprobs_from_logits(logits, labels)
    for b in range(2):
        for t in range(5):
            z = [float(v) for v in logits[b, t]]
            log_norm = math.log(sum(math.exp(v) for v in z))
            assert abs(float(logp[b, t]) - (z[int(labels[b, t])] - log_norm)) < 1e-9
            probs = [math.exp(v - log_norm) for v in z]
            assert (
                abs(float(token_entropy(logits)[b, t]) + sum(p * math.log(p) for p in probs)) < 1e-9
            )
    mask = T([[1.0, 1, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.float64)
    ent = token_entropy(logits)
    assert close(entropy_from_logits(logits, mask), (ent[0, :2].sum() + ent[1, 3:].sum()) / 4, 1e-9)
    # uniform logits: entropy is log(vocab)
    assert close(token_entropy(torch.zeros(1, 1, 11)), [[math.log(11)]])


def test_token_kl_by_hand():
    # p = softmax([0, ln 3]) = (1/4, 3/4), q = uniform (1/2, 1/2):
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.1732868 + 0.3040988 = 0.1308120
    logits = T([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    ref = T([[[0.0, 0.0]]], dtype=torch.float64)
    assert close(token_kl(logits, ref), [[0.25 * math.log(0.5) + 0.75 * math.log(1.5)]], 1e-12)
    assert abs(float(token_kl(logits, ref)[0, 0]) - 0.1308120) < 1e-7
    # the same distribution (logits shifted by a constant): 0; KL is not symmetric
    assert close(token_kl(logits, logits + 5.0), [[0.0]], 1e-12)
    assert float(token_kl(ref, logits)[0, 0]) != float(token_kl(logits, ref)[0, 0])


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    assert ctl.value == 0.2
    # KL 9 vs target 6: error .5 clipped to .2; mult = 1 + .2 * 8 / 10000 = 1.00016
    assert math.isclose(ctl.update(9.0, 8), 0.2 * 1.00016)
    # KL 3: error -.5 clipped to -.2; mult = 1 - .2 * 256 / 10000 = .99488
    assert math.isclose(ctl.update(3.0, 256), 0.2 * 1.00016 * 0.99488)
    # KL 6.6: error .1 (inside the clip); mult = 1 + .1 * 100 / 10000 = 1.001
    before = ctl.value
    ctl.update(6.6, 100)
    assert math.isclose(ctl.value, before * 1.001)
    # on target: unchanged
    before = ctl.value
    ctl.update(6.0, 1000)
    assert math.isclose(ctl.value, before)
    restored = AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_adaptive_kl_controller_clips_rises_and_falls_apart_by_hand():
    ctl = AdaptiveKLController(
        init_kl_coef=0.2, target=6.0, horizon=32, rise_clip=0.2, fall_clip=0.5
    )
    # KL 1: error -5/6 clipped to -.5; mult = 1 - .5 * 8 / 32 = .875
    assert ctl.update(1.0, 8) == pytest.approx(0.175)
    # KL 4.2: error -.3, inside the fall clip: mult = 1 - .3 * 8 / 32 = .925
    assert ctl.update(4.2, 8) == pytest.approx(0.175 * 0.925)
    # KL 7.2: error .2, at the rise clip: mult 1.05
    assert ctl.update(7.2, 8) == pytest.approx(0.175 * 0.925 * 1.05)
    # KL 30: error 4 clipped to .2 (it was .5, x1.125, with one clip of 0.5): mult 1.05
    assert ctl.update(30.0, 8) == pytest.approx(0.175 * 0.925 * 1.05**2)
    assert (ctl.state_dict()["rise_clip"], ctl.state_dict()["fall_clip"]) == (0.2, 0.5)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="clips"):
            AdaptiveKLController(0.2, 6.0, 32, rise_clip=bad)
        with pytest.raises(ValueError, match="clips"):
            AdaptiveKLController(0.2, 6.0, 32, fall_clip=bad)


def test_fixed_kl_controller_and_factory():
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05 and fixed.value == 0.05
    assert isinstance(make_kl_controller(0.05, None), FixedKLController)
    assert isinstance(make_kl_controller(0.05, 6.0), AdaptiveKLController)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.05, 0.0, 10000)


# -------------------------------------------------------------- reward normaliser


def test_running_moments_equal_statistics_of_everything_seen():
    torch.manual_seed(0)
    batches = [torch.randn(n) * 3 + 1 for n in (5, 1, 17, 8)]
    moments = RunningMoments()
    for b in batches:
        mean, std = moments.update(b)
        assert math.isclose(mean, float(b.mean()), rel_tol=1e-6)
    everything = torch.cat(batches).double()
    assert math.isclose(moments.mean, float(everything.mean()), rel_tol=1e-9)
    assert math.isclose(moments.std, float(everything.std(unbiased=False)), rel_tol=1e-9)
    assert moments.count == len(everything)
    normalized = moments.normalize(everything)
    assert abs(float(normalized.mean())) < 1e-6
    with pytest.raises(ValueError, match="empty"):
        moments.update(torch.zeros(0))


def test_mean_upper_bound_by_hand():
    """[1..5]: mean 3, s = sqrt(2.5) = 1.58114, bound 3 + 1.645 * 1.58114 / sqrt(5) = 4.16319."""
    mean, ucb = mean_upper_bound(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert mean == pytest.approx(3.0)
    assert ucb == pytest.approx(4.16319, abs=1e-5)
    assert mean_upper_bound(torch.tensor([7.0])) == (7.0, 7.0)
    with pytest.raises(ValueError, match="at least one sample"):
        mean_upper_bound(torch.tensor([]))


def test_adaptive_kl_controller_moves_within_one_round_by_hand():
    """Issue 9 defect 4. A round's horizon (4 steps x 8 answers = 32) at twice the target:
    e = clip(12/6 - 1) = 0.2 each step, x (1 + 0.2 * 8/32) = x1.05 per step, so
    0.05 -> 0.05 * 1.05**4 = 0.0607753 in one round (with 10,000: 0.0500320)."""
    ctl = AdaptiveKLController(init_kl_coef=0.05, target=6.0, horizon=32)
    for _ in range(4):
        ctl.update(12.0, 8)
    assert ctl.value == pytest.approx(0.0607753, abs=1e-7)
    # And back down below the target: e = clip(3/6 - 1) = -0.2, x0.95 per step.
    ctl.update(3.0, 8)
    assert ctl.value == pytest.approx(0.0607753 * 0.95, abs=1e-7)


def test_kl_barrier_by_hand():
    """The KL coefficient's multiplier for a round whose parent's served KL bound is K
    of a budget B: 1 / (1 - K/B), the derivative of the log barrier -B log(1 - KL/B)
    (which is KL itself to first order). Hand values with B = 10."""
    assert kl_barrier(None, 10.0) == 1.0  # no measured parent (round one)
    assert kl_barrier(0.0, 10.0) == 1.0
    assert kl_barrier(5.0, 10.0) == pytest.approx(2.0)  # half the budget: twice the penalty
    assert kl_barrier(7.5, 10.0) == pytest.approx(4.0)
    # Capped at 90% of the budget: at most 10x, also for a parent measured over it.
    assert kl_barrier(9.5, 10.0) == pytest.approx(10.0)
    assert kl_barrier(12.0, 10.0) == pytest.approx(10.0)
    assert kl_barrier(-1.0, 10.0) == 1.0  # a negative estimate counts as none
    assert kl_barrier(5.0, 0.0) == 1.0  # a budget of 0 admits no change: the gate's call
    assert kl_barrier(5.0, 10.0, max_fill=0.5) == pytest.approx(2.0)
    assert kl_barrier(8.0, 10.0, max_fill=0.5) == pytest.approx(2.0)


def test_continue_logprobs_is_log_one_minus_the_stop_tokens_probability():
    """Hand values: logits [0, 0, ln 2] with stop id 2: p(stop) = 2/4, log(1 - p) = log 0.5;
    logits [ln 3, 0, 0] with stop ids {1, 2}: p(stop) = 2/5, log 0.6; a stop token 30 nats
    below the other: log(1 - 1/(1 + e^30)) = -9.4e-14 (the stable branch, not a rounded 0);
    a stop token 10 nats above two others: log(2 / (e^10 + 2)); one 200 nats above (p(stop)
    rounds to 1): finite."""
    ln2, ln3 = math.log(2.0), math.log(3.0)
    logits = torch.tensor([[[0.0, 0.0, ln2], [ln3, 0.0, 0.0]]])
    got = continue_logprobs(logits, [2])
    assert got[0, 0].item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert continue_logprobs(logits, [1, 2])[0, 1].item() == pytest.approx(math.log(0.6), abs=1e-6)
    far = continue_logprobs(torch.tensor([[[0.0, -30.0]]], dtype=torch.float64), [1])
    assert far.item() == pytest.approx(-math.exp(-30.0), rel=1e-6)
    near = continue_logprobs(torch.tensor([[[0.0, 0.0, 10.0]]], dtype=torch.float64), [2])
    assert near.item() == pytest.approx(ln2 - math.log(math.exp(10.0) + 2.0), abs=1e-9)
    # p(stop) = 1 - 4e-18 and 1 - e^-200: finite, with a finite gradient.
    certain = torch.tensor([[[0.0, 40.0], [0.0, 200.0]]], dtype=torch.float64, requires_grad=True)
    out = continue_logprobs(certain, [1])
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(certain.grad).all()
