"""Pure PPO math for RLHF on token sequences: one formula per function.

Every tensor is ``[batch, tokens]`` unless a docstring says otherwise. ``mask`` is a
float tensor of the same shape, 1.0 on answer (generated) tokens and 0.0 on prompt
and padding tokens; padding may sit on either side of the answer. Positions where
``mask`` is 0 never influence a result on a position where it is 1.

Names follow the papers and CleanRL / TRL (``advantages``, ``returns``, ``logratio``,
``ratio``, ``pg_loss``, ``vf_loss``, ``clipfrac``, ``approx_kl``, ``kl_coef``, ``lam``).

References
----------
- [PPO] Schulman, Wolski, Dhariwal, Radford, Klimov (2017), "Proximal Policy
  Optimization Algorithms", arXiv:1707.06347 (clipped surrogate, eq. 7).
- [GAE] Schulman, Moritz, Levine, Jordan, Abbeel (2016), "High-Dimensional Continuous
  Control Using Generalized Advantage Estimation", arXiv:1506.02438 (eq. 16).
- [Ziegler] Ziegler et al. (2019), "Fine-Tuning Language Models from Human
  Preferences", arXiv:1909.08593 (per-token KL penalty, adaptive KL coefficient, sec. 2.2).
- [Ouyang] Ouyang et al. (2022), "Training language models to follow instructions
  with human feedback", arXiv:2203.02155.
- [k3] John Schulman (2020), "Approximating KL Divergence",
  http://joschu.net/blog/kl-approx.html.
- [CleanRL] Huang et al., CleanRL ``ppo.py`` (value clipping, approx_kl, clipfrac);
  [TRL] Hugging Face TRL ``trainer/utils.py`` (masked_mean, masked_whiten, RunningMoments).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "compute_gae",
    "entropy_from_logits",
    "kl_barrier",
    "kl_penalty",
    "last_token_index",
    "logprobs_from_logits",
    "make_kl_controller",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "mean_upper_bound",
    "policy_loss",
    "token_entropy",
    "token_kl",
    "token_rewards",
    "value_loss",
]

KLEstimator = Literal["k1", "k2", "k3"]


# --------------------------------------------------------------------------- masks


def _check_mask(mask: Tensor) -> float:
    """Number of answer tokens; a clear error when there are none (a mean over
    nothing is 0/0 and would silently turn a loss into NaN)."""
    count = float(mask.sum())
    if count <= 0:
        raise ValueError(
            "mask selects no tokens (all zeros): there is nothing to average over. "
            "Check that the mask marks the generated answer tokens with 1.0 and that "
            "the batch is not empty."
        )
    return count


def masked_mean(x: Tensor, mask: Tensor, axis: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 [TRL].

    x, mask: ``[batch, tokens]``. Returns a scalar, or ``[batch]`` with ``axis=1``
    (one mean per row; every row then needs at least one answer token).
    """
    mask = mask.to(x.dtype)
    if axis is None:
        _check_mask(mask)
        return (x * mask).sum() / mask.sum()
    counts = mask.sum(axis)
    if bool((counts <= 0).any()):
        raise ValueError(
            f"mask selects no tokens in some slice along axis {axis}: a per-row mean needs "
            "at least one answer token in every row. Drop empty rows first."
        )
    return (x * mask).sum(axis) / counts


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over positions where ``mask`` is 1 (scalar) [TRL].

    With ``unbiased`` the Bessel correction n/(n-1) is applied when n >= 2 (with a
    single token the variance is 0 either way).
    """
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    count = float(mask.sum())
    if unbiased and count >= 2:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to unit variance over the answer tokens [TRL].

    ``(x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back
    (used for rewards, whose sign carries meaning). Statistics use masked positions
    only; masked-out positions of the result are 0, so padding cannot leak anywhere.
    x, mask: ``[batch, tokens]``; returns ``[batch, tokens]``.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last answer token in each row (``[batch]`` long).

    Works for left or right padding: it is the last position where ``mask`` is 1.
    A row without answer tokens gets index 0.
    """
    tokens = mask.shape[1]
    positions = torch.arange(tokens, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)


# ---------------------------------------------------------------- log-probabilities


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) under ``softmax(logits)``.

    logits: ``[batch, tokens, vocab]``; labels: ``[batch, tokens]`` (long).
    Returns ``[batch, tokens]``. Computed as ``logit[label] - logsumexp(logits)``,
    which never materialises a second ``[batch, tokens, vocab]`` tensor of
    log-probabilities (the vocabulary is large: 49k for SmolLM2).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # half-precision logsumexp loses the small differences PPO needs
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def continue_logprobs(logits: Tensor, stop_ids: list[int]) -> Tensor:
    """log(1 - p(stop)) per position: the log-probability of *not* ending the answer
    there, ``p(stop)`` being the total probability of the stop tokens ``stop_ids``.

    logits: ``[batch, tokens, vocab]``; returns ``[batch, tokens]``. Computed from
    ``log p(stop) = logsumexp(z[stop]) - logsumexp(z)`` with ``log1mexp`` in its
    stable form (``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` below -ln 2).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    stop = torch.logsumexp(logits[..., stop_ids], dim=-1) - torch.logsumexp(logits, dim=-1)
    # p(stop) rounded to 1 has no finite log(1 - p): keep it just below 1. (In float32 the
    # difference of two logsumexps resolves about 1e-7, so a 1 - p(stop) below about 2e-7
    # reads up to a few tenths of a nat off, and one below about 3e-8 as 1e-38, with no
    # gradient. A kept token is one the served answer went past: such certainty is rare.)
    stop = stop.clamp(max=-torch.finfo(stop.dtype).tiny)
    near_zero = stop > -math.log(2.0)
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(stop)),
        torch.log1p(-torch.exp(stop)),
    )


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` per token: ``logsumexp(z) - sum(p * z)``.

    logits: ``[batch, tokens, vocab]``; returns ``[batch, tokens]``.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean per-token entropy over the answer tokens (scalar); logits ``[batch, tokens, vocab]``."""
    return masked_mean(token_entropy(logits), mask)


# ------------------------------------------------------------------------------ KL


def token_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact ``KL(softmax(logits) || softmax(ref_logits))`` per token, summed over the
    whole vocabulary: ``sum_v p_v (log p_v - log q_v)``.

    logits, ref_logits: ``[batch, tokens, vocab]``; returns ``[batch, tokens]``. Unlike a
    sampled estimate (``kl_penalty``), it does not depend on which token was drawn, so
    summed along answers sampled any way (the UI's temperature and top-p) it is the KL
    of the policy's next-token distributions on the contexts people actually see.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits, ref_logits = logits.float(), ref_logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    logq = torch.log_softmax(ref_logits, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy [k3].

    With ``logr = ref_logprobs - logprobs``:
    - ``"k1"``: ``-logr = logprobs - ref_logprobs`` (unbiased, can be negative per token);
    - ``"k2"``: ``0.5 * logr**2`` (biased, non-negative);
    - ``"k3"``: ``exp(logr) - 1 - logr`` (unbiased, non-negative, lower variance).
    Shapes ``[batch, tokens]`` in and out.
    """
    logr = ref_logprobs - logprobs
    if estimator == "k1":
        return -logr
    if estimator == "k2":
        return 0.5 * logr**2
    if estimator == "k3":
        return torch.expm1(logr) - logr
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1' or 'k3' (or 'k2')")


def token_rewards(
    scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: ``-kl_coef * kl`` on every answer token, plus the scalar
    score of the whole answer on its last token [Ziegler, Ouyang eq. 2].

    scores: ``[batch]``; kl, mask: ``[batch, tokens]``.
    Returns ``(rewards, non_score_reward)``, both ``[batch, tokens]`` and 0 off the mask.
    """
    non_score_reward = -kl_coef * kl * mask
    rewards = non_score_reward.clone()
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * (mask.sum(1) > 0).to(rewards.dtype)
    return rewards, non_score_reward


# ----------------------------------------------------------------------------- GAE


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
    bootstrap: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the answer tokens [GAE eq. 16].

    ``delta_t = r_t + gamma * V_{t+1} - V_t``; ``A_t = delta_t + gamma * lam * A_{t+1}``,
    where ``A_{t+1}`` is 0 after the last answer token and ``V_{t+1}`` there is the row's
    ``bootstrap`` value (default 0: the episode ended). An answer that stopped only because
    the rollout's length ran out did not end: its bootstrap is the critic's value of the
    state it stopped in (partial-episode bootstrapping, Pardo et al. 2018, "Time Limits in
    Reinforcement Learning"). ``returns = advantages + values`` are the value targets.

    rewards, values, mask: ``[batch, tokens]``; bootstrap: ``[batch]``; the answer is one
    contiguous run of mask==1 per row, padding on either side. Returns ``(advantages,
    returns)``, both ``[batch, tokens]`` and 0 where ``mask`` is 0. No gradient flows
    through them.
    """
    with torch.no_grad():
        keep = mask.bool()
        zeros = torch.zeros_like(values)
        # Padding may hold anything (even NaN from a pad-token forward): zero it, not multiply.
        rewards = torch.where(keep, rewards, zeros)
        values = torch.where(keep, values, zeros)
        mask = keep.to(values.dtype)
        tokens = values.shape[1]
        advantages = torch.zeros_like(values)
        lastgaelam = torch.zeros_like(values[:, 0])
        # Shifted one token left, with 0 past the end: mask[t+1] is 0 after the last
        # answer token, so there is no bootstrap value and no carry-over there.
        next_mask = torch.nn.functional.pad(mask[:, 1:], (0, 1))
        next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
        if bootstrap is not None:
            rows = torch.arange(values.shape[0], device=values.device)
            last = last_token_index(mask)
            answered = mask.sum(1) > 0
            next_values[rows, last] = torch.where(
                answered, bootstrap.to(values.dtype), next_values[rows, last]
            )
        for t in reversed(range(tokens)):
            delta = rewards[:, t] + gamma * next_values[:, t] - values[:, t]
            lastgaelam = delta + gamma * lam * next_mask[:, t] * lastgaelam
            advantages[:, t] = lastgaelam
        advantages = advantages * mask
        returns = (advantages + values) * mask
    return advantages, returns


# -------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate policy loss [PPO eq. 7], as a loss to minimise.

    ``ratio = exp(logprobs - old_logprobs)``;
    ``pg_loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)))``.

    All inputs ``[batch, tokens]``; gradients flow through ``logprobs`` only.
    Returns ``(pg_loss, stats)``; stats are detached scalars:
    ``policy/clipfrac`` (share of tokens where the clipped term was taken),
    ``policy/approx_kl`` (k3 estimate of KL(old || new) [k3, CleanRL]),
    ``policy/ratio_mean``.
    """
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((pg_losses2 > pg_losses).to(logprobs.dtype), mask),
            "policy/approx_kl": masked_mean((ratio - 1) - logratio, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return pg_loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss [CleanRL; TRL; Ouyang].

    ``v_clipped = clip(v, old - c, old + c)``;
    ``vf_loss = 0.5 * masked_mean(max((v - R)^2, (v_clipped - R)^2))``.

    All inputs ``[batch, tokens]``; gradients flow through ``values`` only.
    Returns ``(vf_loss, stats)`` with detached scalars ``value/clipfrac`` (share of
    tokens where the clipped error was larger) and ``value/error`` (mean squared error).
    """
    vpredclipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        stats = {
            "value/clipfrac": masked_mean((vf_losses2 > vf_losses1).to(values.dtype), mask),
            "value/error": masked_mean(vf_losses1, mask),
        }
    return vf_loss, stats


# ------------------------------------------------------------------ KL controllers


class AdaptiveKLController:
    """Adaptive KL coefficient [Ziegler sec. 2.2], with separate clips for rises and falls.

    ``e = clip(KL / target - 1, -fall_clip, rise_clip)``;
    ``kl_coef <- kl_coef * (1 + e * n_steps / horizon)``.
    ``current_kl`` is the KL of a whole answer (summed over its tokens), as in the paper.

    ``horizon`` is in samples: after ``horizon`` samples at a KL of at least ``1 + rise_clip``
    times the target the coefficient has grown by about ``rise_clip``. Ziegler et al. use one
    clip of 0.2 and a horizon of 10,000 for runs of millions of samples; a round here samples a
    few dozen answers, so the trainer sets the horizon to one round's samples
    (Settings.kl_horizon). Near the target the gain is the paper's (the error is not clipped).

    Why two clips (Settings.kl_rise_clip 0.2, kl_fall_clip 0.5): a round's rollouts sample
    the whole PPO step, before the gate scales it toward the base, so with rewrites they read
    9-18 nats against a target of 6 round after round while the versions published sit at 6-9.
    Rising up to 60% a round (a clip of 0.5) the coefficient reached 0.5-0.6 by the fourth
    round, where the KL-regularised optimum of unit-variance scores lies 1/(2 coef^2) = 1.4-2
    nats from the base, and every taste measured fell back toward the base. Falling only 20%
    a round (0.2) a policy that PPO alone moves 1-2 nats a round (thumbs only: nothing to
    imitate) needed four rounds to bring the coefficient from 0.2 to where it learnt; 40% a
    round (0.5) needs two.
    """

    def __init__(
        self,
        init_kl_coef: float,
        target: float,
        horizon: float,
        rise_clip: float = 0.2,
        fall_clip: float | None = None,
    ) -> None:
        fall_clip = rise_clip if fall_clip is None else fall_clip
        if target <= 0 or horizon <= 0 or not (0 < rise_clip < 1 and 0 < fall_clip < 1):
            raise ValueError(
                "AdaptiveKLController needs target > 0, horizon > 0 and clips strictly between "
                f"0 and 1 (got target={target}, horizon={horizon}, rise_clip={rise_clip}, "
                f"fall_clip={fall_clip}); use FixedKLController for a constant coefficient."
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.rise_clip = float(rise_clip)
        self.fall_clip = float(fall_clip)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient towards the target after ``n_steps`` samples; returns it."""
        error = float(current_kl) / self.target - 1.0
        proportional_error = min(max(error, -self.fall_clip), self.rise_clip)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {
            "value": self.value,
            "target": self.target,
            "horizon": self.horizon,
            "rise_clip": self.rise_clip,
            "fall_clip": self.fall_clip,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def kl_barrier(kl_bound: float | None, budget: float, max_fill: float = 0.9) -> float:
    """Multiplier of a round's KL coefficient when its parent's served KL is ``kl_bound``
    (nats, the gate's 95% bound) of a total ``budget``: ``1 / (1 - kl_bound / budget)``.

    The total budget is a hard constraint (the gate refuses a policy past it), and a
    linear penalty ``coef * KL`` does not know where it is: the KL-regularised optimum
    of unit-variance scores lies ``1 / (2 coef^2)`` nats from the base whatever the
    budget, so a policy that learnt its taste near the budget is pushed over it by the
    next round and refused, round after round. An interior-point method replaces the
    constraint ``KL <= B`` by the log barrier ``-B log(1 - KL/B)``, which equals ``KL`` to
    first order (far from the budget nothing changes) and whose slope
    ``1 / (1 - KL/B)`` grows without bound as KL nears ``B``; the round's coefficient is
    the controller's times that slope at the parent. Half the budget used: twice the
    penalty; 75%: four times. ``max_fill`` caps the fill (0.9: at most 10x), also for a
    parent measured over the budget. No measured parent, or a budget of 0 or less (the
    gate then admits no change at all): 1.
    """
    if kl_bound is None or budget <= 0 or not math.isfinite(kl_bound):
        return 1.0
    fill = min(max(float(kl_bound) / budget, 0.0), max_fill)
    return 1.0 / (1.0 - fill)


def make_kl_controller(
    init_kl_coef: float,
    target: float | None,
    horizon: float = 10000,
    rise_clip: float = 0.2,
    fall_clip: float | None = None,
) -> AdaptiveKLController | FixedKLController:
    """Adaptive when a target is given (Settings.target_kl), fixed otherwise."""
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon, rise_clip, fall_clip)


def mean_upper_bound(x: Tensor, z: float = 1.645) -> tuple[float, float]:
    """Sample mean of ``x`` (any shape, >= 1 element) and its upper confidence bound
    ``mean + z * s / sqrt(n)``, with ``s`` the unbiased standard deviation (0 for n = 1).

    By the central limit theorem the true mean lies below the bound with probability
    about ``Phi(z)`` (z = 1.645: one-sided 95%). The KL gate decides on this bound, so
    that a policy passes only when its served KL is within budget with that confidence,
    not when a handful of lucky samples happened to be short.
    """
    x = x.detach().double().flatten()
    n = x.numel()
    if n == 0:
        raise ValueError("mean_upper_bound needs at least one sample")
    mean = float(x.mean())
    std = float(x.std(unbiased=True)) if n > 1 else 0.0
    return mean, mean + z * std / math.sqrt(n)


# ------------------------------------------------------------- reward normaliser


class RunningMoments:
    """Running mean and standard deviation of scores across batches [TRL].

    Batches are merged with the parallel-variance formula (Chan et al. 1979), so the
    result equals the statistics of all scores seen so far.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, xs: Tensor) -> tuple[float, float]:
        """Add a batch of scores (any shape); returns the batch's (mean, std)."""
        xs = xs.detach().double().flatten()
        n = xs.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty batch of scores")
        batch_mean = float(xs.mean())
        batch_var = float(xs.var(unbiased=False))
        if self.count == 0:
            self.mean, self.var, self.count = batch_mean, batch_var, float(n)
        else:
            delta = batch_mean - self.mean
            total = self.count + n
            m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
            self.mean += delta * n / total
            self.var = m2 / total
            self.count = total
        batch_std = float(xs.std(unbiased=True)) if n > 1 else 0.0
        return batch_mean, batch_std

    def normalize(self, xs: Tensor, eps: float = 1e-8) -> Tensor:
        """``(xs - mean) / std`` with the running statistics."""
        return (xs - self.mean) / (self.std + eps)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = (
            float(state["mean"]),
            float(state["var"]),
            float(state["count"]),
        )
