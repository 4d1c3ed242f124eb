"""PPO on one shared base model: rollouts, scoring, experience, clipped updates.

One base model is in memory for the whole round. It carries two LoRA adapters on a
:class:`peft.PeftModel`: ``"policy"`` (the causal LM being trained) and ``"reward"``
(with a scalar head, see :mod:`rlhf_core.reward`). The value head is a
``nn.Linear(hidden, 1)`` on the *policy adapter's* last hidden state: the policy
forward that gives the old log-probs gives the old values for free (no extra value
adapter forward, no extra memory), as in Ziegler et al. 2019 and TRL's
``AutoModelForCausalLMWithValueHead``. The reference policy is the base with the
adapters disabled (``with model.disable_adapter():``), so it costs no memory at all.

Per PPO step (Ouyang et al. 2022; the math is in :mod:`rlhf_core.ppo`):

1. generate answers under the policy (sampling, KV cache), left-padded prompts;
   the response mask covers exactly the generated tokens up to and including EOS;
2. three forwards without gradient: policy (old log-probs + values), reference
   (adapters off), reward (reward adapter, read at the last answer token) -- or a
   rule-based ``reward_fn(prompts, answers)`` instead of the reward model;
3. per-token rewards ``-kl_coef * KL`` plus the (optionally normalised, clipped,
   no-EOS-penalised) score on the last token; GAE; whitened advantages;
4. ``ppo_epochs`` passes over mini-batches (gradient accumulation over micro-batches,
   gradient clipping), stopping early when the approximate KL passes a bound.

Log-probs are computed with the LM head applied to the answer positions only: the
``[batch, tokens, vocab]`` logits of the prompt are never built.

The loop runs under :class:`accelerate.Accelerator`: the same code runs on one CPU,
one GPU (bf16 autocast) or several processes (``accelerate launch``). Statistics
that span the batch (advantage whitening, score normalisation, token counts that
weight the loss, the early-stop KL, the non-finite guard) are reduced across
processes, so N processes with 1/N of a global batch make the same update as one
process with all of it.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlhf_core.chat_format import answer_ids, text_ids
from rlhf_core.chat_format import prompt_ids as chat_prompt_ids
from rlhf_core.gate import KLSearch
from rlhf_core.generation import Sampling, generate_kwargs, stop_token_ids
from rlhf_core.modeling import LoadedModel
from rlhf_core.ppo import (
    RunningMoments,
    compute_gae,
    continue_logprobs,
    kl_barrier,
    kl_penalty,
    logprobs_from_logits,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_entropy,
    token_kl,
    token_rewards,
    value_loss,
)
from rlhf_core.reward import (
    Messages,
    RewardModel,
    adapter_named_parameters,
    adapter_parameters,
    attach_adapter,
    autocast,
    heldout_metrics,
    hidden_states,
    pairs_worse_without_top_user,
    save_adapter,
)
from rlhf_core.rounds import WORSE_WITHOUT_TOP_USER_KEY
from rlhf_core.settings import Settings

log = logging.getLogger(__name__)

POLICY_ADAPTER = "policy"
VALUE_HEAD_FILE = "value_head.safetensors"
POLICY_META_FILE = "policy_meta.json"

RewardFn = Callable[[list[Messages], list[str]], Sequence[float]]
# A person's rewrite to imitate: (context, the answer they wrote) or, with the answer
# they edited, (context, rewrite, original): then only what they changed is imitated.
Demonstration = tuple[Messages, str] | tuple[Messages, str, str]
Progress = Callable[[str, float], None]


class NonFiniteError(RuntimeError):
    """Too many PPO updates in a row had a non-finite loss or gradient."""


@dataclass
class PPOConfig:
    """PPO hyper-parameters. Batch sizes are *global* (over all processes)."""

    batch_size: int = 8  # prompts per rollout
    mini_batch_size: int | None = None  # answers per optimiser step; None = the whole batch
    micro_batch_size: int | None = None  # answers per forward (gradient accumulation)
    ppo_epochs: int = 4
    max_new_tokens: int = 64
    min_new_tokens: int | None = None  # benchmarks only: fixed-length rollouts
    max_prompt_tokens: int = 1024
    temperature: float = 1.0
    learning_rate: float = 3e-4
    init_kl_coef: float = 0.2
    target_kl: float | None = 6.0  # adaptive KL target per answer (nats); None = fixed coefficient
    # Samples over which the adaptive coefficient moves by up to kl_rise_clip / kl_fall_clip
    # (Ziegler et al. use 10,000 samples of a long run; a round here has ~32, so the
    # coefficient must react within a round or two). from_settings: one round's samples.
    kl_horizon: float = 32.0
    # The controller's proportional error is clipped to [-kl_fall_clip, kl_rise_clip]: the
    # most it moves per horizon (AdaptiveKLController says why the two differ).
    kl_rise_clip: float = 0.2
    kl_fall_clip: float = 0.5
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    max_grad_norm: float = 1.0
    early_stop_kl: float | None = 0.5  # stop an update when policy/approx_kl passes this
    # Running normalisation of scores (mean 0, std 1 over the scores seen so far): the
    # reward model's raw scores sit at 4-7 while a zero-initialised critic moves by at most
    # cliprange_value per update, so on raw scores it lags the returns for many rounds.
    score_norm: bool = True
    score_clip: float | None = None  # clip (normalised) scores to [-c, c]
    # Subtracted from the (normalised) score of an answer that was cut at the served limit
    # without EOS, as TRL's missing_eos_penalty: such an answer is not one people were
    # served whole, and the reward model scores it at a token that ends nothing.
    missing_eos_penalty: float | None = 1.0
    # The served answer limit (RLHF_MAX_NEW_TOKENS); None = max_new_tokens. A rollout
    # shorter than it that stops without EOS is *unfinished*, not cut: served, it would
    # have gone on.
    answer_limit: int | None = None
    # How an unfinished answer is scored. "bootstrap": no score and no penalty; its last
    # advantage bootstraps from the critic's value of the state it stopped in (what the
    # whole answer is expected to score). "penalty": the reward model's score of the
    # unfinished text minus missing_eos_penalty, as a cut answer: every taste is then
    # also pushed to finish within the rollout length (served at 256 tokens, 72% of the
    # first round's 64-token rollouts on oracle_thorough had not finished).
    unfinished_answers: str = "bootstrap"
    # Weight of the imitation loss on people's rewrites (mean NLL of the rewritten answer),
    # added to each PPO optimiser step, as InstructGPT's PPO-ptx adds a supervised loss.
    # A rewrite is a demonstration of the answer wanted: learning from it directly is far
    # more sample-efficient than only through the reward model's scalar. 0 = pure PPO.
    demo_coef: float = 0.0
    # Longest demonstration imitated, in tokens (EOS included, as generate counts it):
    # a rewrite is a whole served answer, so its limit is the served one, not the
    # rollout length; a longer one is cut there and gets no EOS.
    demo_max_tokens: int = 256
    # "edited": imitate only the tokens a person changed (inserted or replaced) and the
    # closing EOS; the tokens they kept are the policy's own sample, and imitating them
    # only sharpens the policy toward it (KL to the base without any taste in it).
    # "all": every token of the rewrite.
    demo_tokens: str = "edited"
    max_consecutive_skips: int = 3
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> PPOConfig:
        values: dict[str, Any] = {
            "batch_size": settings.ppo_batch_size,
            "micro_batch_size": settings.ppo_micro_batch_size,
            "ppo_epochs": settings.ppo_epochs,
            "max_new_tokens": settings.ppo_new_tokens,
            "max_prompt_tokens": settings.max_context_tokens,
            "learning_rate": settings.learning_rate,
            "init_kl_coef": settings.init_kl_coef,
            "target_kl": settings.target_kl,
            "kl_horizon": settings.kl_horizon or settings.ppo_steps * settings.ppo_batch_size,
            "kl_rise_clip": settings.kl_rise_clip,
            "kl_fall_clip": settings.kl_fall_clip,
            "missing_eos_penalty": settings.missing_eos_penalty,
            "answer_limit": settings.max_new_tokens,
            "unfinished_answers": settings.ppo_unfinished,
            "seed": settings.seed,
            "demo_coef": settings.demo_coef,
            "demo_max_tokens": settings.demo_max_tokens or settings.max_new_tokens,
            "demo_tokens": settings.demo_tokens,
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class Rollout:
    """Answers sampled for a batch of prompts (this process's share)."""

    prompts: list[Messages]
    query_ids: Tensor  # [B, P] left-padded prompts
    query_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, R] generated tokens, pad after the first EOS
    response_mask: Tensor  # [B, R] float, 1.0 up to and including the first EOS
    has_eos: Tensor  # [B] bool
    answers: list[str]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], dim=1)


@dataclass
class Experience:
    rollout: Rollout
    old_logprobs: Tensor  # [B, R]
    old_values: Tensor  # [B, R]
    advantages: Tensor  # [B, R] whitened
    returns: Tensor  # [B, R]
    stats: dict[str, float] = field(default_factory=dict)


class PolicyValueModel(nn.Module):
    """Policy log-probs and values from one forward under the active (policy) adapter.

    This is the module that accelerate prepares (DDP-wraps): its trainable
    parameters are the policy adapter and the value head."""

    def __init__(self, peft_model: nn.Module, value_head: nn.Linear, temperature: float = 1.0):
        super().__init__()
        self.peft_model = peft_model
        self.value_head = value_head
        self.temperature = temperature

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, prompt_len: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(logprobs, values, logits, final_values)``: the first three for the
        answer positions ``[B, R]`` (logits ``[B, R, vocab]``), position ``t`` holding the
        state that emits answer token ``t``; ``final_values`` ``[B]`` is the value of the
        state after each answer's last token (the bootstrap of an answer the rollout's
        length stopped). Answers are right-padded."""
        hidden = hidden_states(self.peft_model, input_ids, attention_mask)[:, prompt_len - 1 :]
        logits = answer_logits(self.peft_model, hidden[:, :-1], self.temperature)
        logprobs = logprobs_from_logits(logits, input_ids[:, prompt_len:])
        values = self.value_head(hidden.float()).squeeze(-1)
        # Position L of hidden[:, prompt_len - 1:] has read the answer's L-th (last) token.
        answer_len = attention_mask[:, prompt_len:].sum(1).long()
        final_values = values.gather(1, answer_len[:, None]).squeeze(1)
        return logprobs, values[:, :-1], logits, final_values


def answer_logits(peft_model: nn.Module, hidden: Tensor, temperature: float = 1.0) -> Tensor:
    logits = peft_model.get_base_model().get_output_embeddings()(hidden)
    return logits / temperature if temperature != 1.0 else logits


def new_value_head(hidden_size: int, device: torch.device) -> nn.Linear:
    head = nn.Linear(hidden_size, 1).to(device=device, dtype=torch.float32)
    nn.init.zeros_(head.weight)  # values start at 0: no noise in the first advantages
    nn.init.zeros_(head.bias)
    return head


def prompt_token_ids(tokenizer: Any, messages: Messages, max_tokens: int) -> list[int]:
    """The served encoding of the context (``chat_format.prompt_ids``); most recent
    tokens kept."""
    return chat_prompt_ids(tokenizer, messages, max_tokens)


def edited_tokens(rewrite: Sequence[int], original: Sequence[int]) -> list[bool]:
    """For each token of ``rewrite``: True when the person wrote it, False when it is
    kept from ``original`` (the answer they edited), by the longest matching blocks of
    ``difflib.SequenceMatcher`` on token ids (no "junk" heuristics: answers are short).

    ``[1, 2, 9, 4, 5, 7]`` from ``[1, 2, 3, 4, 5]`` -> ``[F, F, T, F, F, T]``: 9 replaced
    3, 7 was added; a rewrite that only deletes has no token the person wrote.
    """
    wrote = [True] * len(rewrite)
    matcher = difflib.SequenceMatcher(None, list(original), list(rewrite), autojunk=False)
    for block in matcher.get_matching_blocks():
        for j in range(block.b, block.b + block.size):
            wrote[j] = False
    return wrote


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _chunks(idx: Tensor, size: int) -> list[Tensor]:
    return [idx[i : i + size] for i in range(0, len(idx), size)]


class PPOTrainer:
    """PPO for the ``"policy"`` adapter of ``model`` (a PeftModel on the shared base).

    ``reward_model`` (a :class:`RewardModel` on the same PeftModel) or ``reward_fn``
    gives the scores; exactly one is needed.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: PPOConfig,
        *,
        reward_model: RewardModel | None = None,
        reward_fn: RewardFn | None = None,
        value_head: nn.Linear | None = None,
        accelerator: Any = None,
        kl_state: dict[str, float] | None = None,
        score_state: dict[str, float] | None = None,
        demos: Sequence[Demonstration] = (),
        kl_barrier: float = 1.0,
    ) -> None:
        """``demos``: people's rewrites, (context, answer wanted) or (context, answer
        wanted, the answer they edited), imitated with weight ``config.demo_coef`` in
        every optimiser step (only the edited tokens where the original is given and
        ``config.demo_tokens`` is "edited"). ``kl_barrier``: multiplier of the KL
        controller's coefficient in the rewards (:func:`rlhf_core.ppo.kl_barrier`), and
        divisor of ``demo_coef``; the controller itself moves its own value, which is
        what the next round inherits."""
        from accelerate import Accelerator

        if (reward_model is None) == (reward_fn is None):
            raise ValueError("PPOTrainer needs exactly one of reward_model or reward_fn")
        if config.demo_tokens not in ("edited", "all"):
            raise ValueError(f"demo_tokens must be 'edited' or 'all', not {config.demo_tokens!r}")
        if POLICY_ADAPTER not in model.peft_config:
            raise ValueError(f"the model has no {POLICY_ADAPTER!r} adapter: attach one first")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.reward_model = reward_model
        self.reward_fn = reward_fn
        device = next(model.parameters()).device
        # cpu=True on a CPU model: under `accelerate launch` (WORLD_SIZE > 1) that is what
        # makes accelerate start gloo (MULTI_CPU) instead of staying single-process.
        self.accelerator = accelerator or Accelerator(
            cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no"
        )
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        for name, size in (
            ("batch_size", config.batch_size),
            ("mini_batch_size", config.mini_batch_size),
            ("micro_batch_size", config.micro_batch_size),
        ):
            if size is not None and size % self.world:
                raise ValueError(
                    f"{name}={size} does not split evenly over {self.world} processes: "
                    f"make it a multiple of {self.world}"
                )
        model.set_adapter(POLICY_ADAPTER)  # trainable: the policy adapter only
        hidden = model.get_base_model().config.get_text_config().hidden_size
        self.value_head = value_head or new_value_head(hidden, device)
        self.policy_value = PolicyValueModel(model, self.value_head, config.temperature)
        params = adapter_parameters(model, POLICY_ADAPTER) + list(self.value_head.parameters())
        self.params = params
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
        self.wrapped, self.optimizer = self.accelerator.prepare(self.policy_value, optimizer)
        self.device = self.accelerator.device
        self.kl_ctl = make_kl_controller(
            config.init_kl_coef,
            config.target_kl,
            config.kl_horizon,
            config.kl_rise_clip,
            config.kl_fall_clip,
        )
        if kl_state:
            self.kl_ctl.load_state_dict(kl_state)
        self.kl_barrier = float(kl_barrier)
        # The imitation term is part of what the KL penalty regularises (the objective is
        # reward + demo_coef * log-likelihood of the rewrites - kl_coef * KL), so the barrier
        # scales it down as it scales the penalty up: at 10x near the budget the rewrites
        # pulled the policy 9 nats from its parent in one round (bullets round 3, penalty
        # at 2.3), unchecked by PPO's clip or the penalty, which see only the rollouts.
        self.demo_coef = config.demo_coef / self.kl_barrier
        self.score_moments = RunningMoments()
        if score_state:
            self.score_moments.load_state_dict(score_state)
        self.eos_ids = stop_token_ids(model, tokenizer)
        self.rollout_sampling = Sampling(config.temperature, 1.0, config.max_new_tokens)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.steps = 0
        self._gen = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed + self.rank)  # sampling differs per process
        self.demos = self._shard(list(demos)) if config.demo_coef > 0 else []

    # -- distributed helpers ------------------------------------------------------

    def _sum(self, x: Tensor) -> Tensor:
        x = x.detach().float().to(self.device)
        return self.accelerator.reduce(x, reduction="sum") if self.world > 1 else x

    def _whiten(self, x: Tensor, mask: Tensor) -> Tensor:
        """``masked_whiten`` with statistics over the answers of every process."""
        if self.world == 1:
            return masked_whiten(x, mask)
        count, total = self._sum(mask.sum()), self._sum((x * mask).sum())
        mean = total / count
        var = self._sum((((x - mean) ** 2) * mask).sum()) / count
        var = var * count / (count - 1) if count >= 2 else var
        return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + 1e-8), torch.zeros_like(x))

    # -- rollouts -------------------------------------------------------------------

    def _shard(self, items: Sequence[Any]) -> list[Any]:
        return list(items[self.rank :: self.world]) if self.world > 1 else list(items)

    def _finish_rollout(
        self, prompts: list[Messages], query_ids: Tensor, query_mask: Tensor, response: Tensor
    ) -> Rollout:
        pad = self.tokenizer.pad_token_id
        is_eos = torch.isin(response, torch.tensor(self.eos_ids, device=response.device))
        # Tokens strictly after the first EOS are padding from generate, not the answer.
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        response_mask = (~after_eos).float()
        response = torch.where(after_eos, torch.full_like(response, pad), response)
        answers = self.tokenizer.batch_decode(
            [row[: int(m.sum())] for row, m in zip(response, response_mask, strict=True)],
            skip_special_tokens=True,
        )
        return Rollout(
            prompts, query_ids, query_mask, response, response_mask, is_eos.any(1), answers
        )

    def _encode_prompts(self, prompts: list[Messages]) -> tuple[Tensor, Tensor]:
        rows = [prompt_token_ids(self.tokenizer, m, self.config.max_prompt_tokens) for m in prompts]
        return _left_pad(rows, self.tokenizer.pad_token_id, self.device)

    @torch.no_grad()
    def generate(self, prompts: list[Messages], sampling: Sampling | None = None) -> Rollout:
        """Sample one answer per prompt under the policy adapter (this process's prompts).

        The default is PPO's rollouts: plain sampling from softmax(logits / T) at the
        trainer's temperature (top-p 1, no top-k, nothing inherited from the base's
        generation_config), since PPO's ratio assumes the answers come from exactly
        the distribution whose log-probs it computes. ``served_kl`` passes the UI's."""
        if sampling is None:
            sampling = self.rollout_sampling
        query_ids, query_mask = self._encode_prompts(prompts)
        self.model.set_adapter(POLICY_ADAPTER)
        kwargs = generate_kwargs(
            sampling,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            min_new_tokens=self.config.min_new_tokens,
        )
        with autocast(self.device):
            out = self.model.generate(input_ids=query_ids, attention_mask=query_mask, **kwargs)
        return self._finish_rollout(prompts, query_ids, query_mask, out[:, query_ids.shape[1] :])

    @torch.no_grad()
    def served_kl_samples(
        self,
        prompts: Sequence[Messages],
        sampling: Sampling,
        parent_dir: str | os.PathLike | None = None,
        chunk: int = 16,
        positions: int = 64,
    ) -> ServedSample:
        """How far what people will be served has moved, one number per answer.

        One answer per prompt (repeat prompts for more samples) is sampled exactly as
        the chat UI samples it (``sampling``: its temperature, top-p and token limit,
        through :func:`rlhf_core.generation.generate_kwargs`), and along each answer the
        exact KL of the policy's next-token distribution to the reference's is summed
        (``token_kl``). With ``parent_dir`` (the version this round started from, loaded
        beside the policy for the measurement and deleted after it) the KL to it is summed
        along the same answers. Each answer is also scored by the round's reward (the reward
        model, or ``reward_fn``), as a PPO rollout is: the gate records what a candidate's
        answers are worth beside what they cost in KL.
        Returns ``ServedSample(to_ref, to_parent, scores)``, each ``[n]`` over every
        process's answers (``to_parent`` None without a parent).
        The per-step ``objective/kl`` cannot stand in for it: it is measured on T=1
        rollouts of ``ppo_new_tokens`` tokens, each step *before* that step's update.

        ``chunk`` answers are generated together; the LM head is applied ``positions``
        answer tokens at a time, so the ``[chunk, positions, vocab]`` logits bound the
        memory (49k vocabulary: 16 x 64 x 49k floats = 200 MB) whatever the answer length.
        """
        parent_adapter = None
        if parent_dir is not None:
            self.model.load_adapter(str(parent_dir), adapter_name=PARENT_ADAPTER)
            self.model.set_adapter(POLICY_ADAPTER)
            parent_adapter = PARENT_ADAPTER
        try:
            return self._sample_with_parent_loaded(
                list(prompts), sampling, parent_adapter, chunk, positions
            )
        finally:
            if parent_adapter is not None:
                self.model.delete_adapter(PARENT_ADAPTER)

    def _sample_with_parent_loaded(
        self,
        prompts: list[Messages],
        sampling: Sampling,
        parent_adapter: str | None,
        chunk: int,
        positions: int,
    ) -> ServedSample:
        """:meth:`served_kl_samples` with the parent's adapter, if any, loaded."""
        local = self._shard(prompts)
        to_ref: list[Tensor] = []
        to_parent: list[Tensor] = []
        scores: list[Tensor] = []
        head = self.model.get_base_model().get_output_embeddings()
        for start in range(0, len(local), chunk):
            rollout = self.generate(local[start : start + chunk], sampling)
            mask = rollout.response_mask
            with autocast(self.device):
                policy_h = self._answer_hidden(rollout)
                with self.model.disable_adapter():
                    ref_h = self._answer_hidden(rollout)
                parent_h = None
                if parent_adapter is not None:
                    self.model.set_adapter(parent_adapter)
                    try:
                        parent_h = self._answer_hidden(rollout)
                    finally:
                        self.model.set_adapter(POLICY_ADAPTER)
                kl_ref = torch.zeros(mask.shape[0], device=mask.device)
                kl_parent = torch.zeros_like(kl_ref)
                for t in range(0, mask.shape[1], positions):
                    window = slice(t, t + positions)
                    logits = head(policy_h[:, window])
                    kl_ref += (token_kl(logits, head(ref_h[:, window])) * mask[:, window]).sum(1)
                    if parent_h is not None:
                        kl = token_kl(logits, head(parent_h[:, window]))
                        kl_parent += (kl * mask[:, window]).sum(1)
            to_ref.append(kl_ref.float())
            if parent_h is not None:
                to_parent.append(kl_parent.float())
            scores.append(self.score(rollout))
        ref_all = torch.cat(to_ref).to(self.device)
        parent_all = torch.cat(to_parent).to(self.device) if to_parent else None
        scores_all = torch.cat(scores).to(self.device)
        if self.world > 1:
            ref_all = self.accelerator.gather(ref_all)
            parent_all = self.accelerator.gather(parent_all) if parent_all is not None else None
            scores_all = self.accelerator.gather(scores_all)
        return ServedSample(
            ref_all.cpu(), parent_all.cpu() if parent_all is not None else None, scores_all.cpu()
        )

    def _answer_hidden(self, rollout: Rollout) -> Tensor:
        """Last hidden states ``[B, R, hidden]`` at the positions that emit the answer
        tokens, under the active adapter (untempered: the exact KL compares the models)."""
        prompt_len = rollout.query_ids.shape[1]
        hidden = hidden_states(self.model, rollout.input_ids, rollout.attention_mask)
        return hidden[:, prompt_len - 1 : -1]

    def served_kl(self, prompts: Sequence[Messages], sampling: Sampling) -> float:
        """Mean served KL to the reference over one answer per prompt (see
        :meth:`served_kl_samples`); the learning benchmark reports the same quantity."""
        return float(self.served_kl_samples(prompts, sampling).to_ref.mean())

    def rollout_from_texts(
        self,
        prompts: list[Messages],
        answers: list[str],
        max_tokens: int | None = None,
        finished: Sequence[bool] | None = None,
    ) -> Rollout:
        """A rollout of given answers, e.g. people's rewrites (demonstrations), replays
        or tests: each answer's tokens up to ``max_tokens`` (default
        ``config.demo_max_tokens``, the served answer limit, not the rollout length),
        then EOS only where the answer ended (``finished``, default True) and was not
        cut: imitating a cut answer must not teach the policy to stop there."""
        limit = self.config.demo_max_tokens if max_tokens is None else max_tokens
        ends = [True] * len(answers) if finished is None else list(finished)
        encoded = [
            answer_ids(self.tokenizer, a, limit, done)
            for a, done in zip(answers, ends, strict=True)
        ]
        query_ids, query_mask = self._encode_prompts(prompts)
        width = max(1, max(len(ids) for ids, _ in encoded))
        response = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        # The mask is built from the lengths, not by looking for EOS: the pad token may
        # be the EOS token, and a cut answer's padding must not read as its end.
        response_mask = torch.zeros((len(encoded), width), dtype=torch.float)
        for i, (ids, _) in enumerate(encoded):
            response[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[i, : len(ids)] = 1.0
        has_eos = torch.tensor([ended for _, ended in encoded], dtype=torch.bool)
        return Rollout(
            list(prompts),
            query_ids,
            query_mask,
            response.to(self.device),
            response_mask.to(self.device),
            has_eos.to(self.device),
            list(answers),
        )

    # -- scoring and experience ---------------------------------------------------------

    @torch.no_grad()
    def score(self, rollout: Rollout) -> Tensor:
        """Raw scores ``[B]`` (float32): reward model at the last answer token, or reward_fn."""
        if self.reward_fn is not None:
            values = list(self.reward_fn(rollout.prompts, rollout.answers))
            return torch.tensor(values, dtype=torch.float32, device=self.device)
        last = rollout.query_ids.shape[1] + rollout.response_mask.sum(1).long() - 1
        with torch.inference_mode():
            scores = self.reward_model.forward_scores(
                rollout.input_ids, rollout.attention_mask, last
            )
        return scores.float().clone()

    def unfinished(self, rollout: Rollout) -> Tensor:
        """``[B]`` bool: answers that stopped without EOS only because the rollout is
        shorter than the served limit (scored by bootstrapping, see ``unfinished_answers``).
        Answers without EOS at the served limit are cut, as served ones would be."""
        config = self.config
        if config.unfinished_answers not in ("bootstrap", "penalty"):
            raise ValueError(
                f"unknown unfinished_answers {config.unfinished_answers!r}: "
                "use 'bootstrap' or 'penalty'"
            )
        shorter = config.max_new_tokens < (config.answer_limit or config.max_new_tokens)
        if config.unfinished_answers == "penalty" or not shorter:
            return torch.zeros_like(rollout.has_eos)
        return ~rollout.has_eos

    def _process_scores(
        self, scores: Tensor, has_eos: Tensor, unfinished: Tensor | None = None
    ) -> Tensor:
        """Normalise (running moments), then penalise answers cut without EOS, then clip.
        The penalty comes after the normalisation so that it is in units of the scores'
        standard deviation whatever the reward model's scale, and it does not enter the
        moments (they describe the reward model, not the penalty). Unfinished answers'
        scores are not used (0 here: the caller bootstraps them) and stay out of the
        moments, unless fewer than two answers finished, when all scores describe the
        reward model's scale better than one."""
        config = self.config
        unfinished = torch.zeros_like(has_eos) if unfinished is None else unfinished
        if config.score_norm:
            gather = self.accelerator.gather if self.world > 1 else (lambda x: x)
            everything, skipped = gather(scores), gather(unfinished.float()) > 0.5
            finite = torch.isfinite(everything)
            # A NaN score must not poison the running statistics.
            used = everything[finite & ~skipped]
            if used.numel() < 2:
                used = everything[finite]
            if used.numel():
                self.score_moments.update(used)
            scores = self.score_moments.normalize(scores)
        if config.missing_eos_penalty is not None:
            cut = ~has_eos & ~unfinished
            scores = torch.where(cut, scores - config.missing_eos_penalty, scores)
        if config.score_clip is not None:
            scores = scores.clamp(-config.score_clip, config.score_clip)
        return torch.where(unfinished, torch.zeros_like(scores), scores)

    @torch.no_grad()
    def make_experience(self, rollout: Rollout, scores: Tensor) -> Experience:
        """Old log-probs and values (one policy forward), reference log-probs (one
        forward, adapters off), per-token rewards, GAE and whitened advantages."""
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
        prompt_len = rollout.query_ids.shape[1]
        mask = rollout.response_mask
        self.model.set_adapter(POLICY_ADAPTER)
        self.wrapped.eval()  # the mode of the new log-probs in update()
        with autocast(self.device):
            old_logprobs, old_values, _, final_values = self.policy_value(
                input_ids, attention_mask, prompt_len
            )
            with self.model.disable_adapter():
                hidden = hidden_states(self.model, input_ids, attention_mask)[
                    :, prompt_len - 1 : -1
                ]
                ref_logits = answer_logits(self.model, hidden, self.config.temperature)
                ref_logprobs = logprobs_from_logits(ref_logits, rollout.response_ids)
        del hidden, ref_logits
        kl = kl_penalty(old_logprobs, ref_logprobs, self.config.kl_estimator) * mask
        unfinished = self.unfinished(rollout)
        processed = self._process_scores(
            scores.to(self.device).float(), rollout.has_eos, unfinished
        )
        rewards, non_score = token_rewards(processed, kl, mask, self.kl_coef)
        bootstrap = torch.where(unfinished, final_values.float(), torch.zeros_like(processed))
        advantages, returns = compute_gae(
            rewards, old_values, mask, self.config.gamma, self.config.lam, bootstrap
        )
        advantages = self._whiten(advantages, mask)
        n = self._sum(torch.tensor(float(len(rollout.prompts))))
        answer_kl = kl.sum(1)
        stats = {
            "objective/kl": float(self._sum(answer_kl.sum()) / n),
            "objective/kl_coef": self.kl_coef,
            "objective/kl_controller_coef": self.kl_ctl.value,
            "objective/kl_barrier": self.kl_barrier,
            "objective/demo_coef": self.demo_coef,
            "objective/scores": float(self._sum(scores.sum()) / n),
            "objective/scores_processed": float(self._sum(processed.sum()) / n),
            "objective/non_score_reward": float(self._sum(non_score.sum()) / n),
            "objective/answer_tokens": float(self._sum(mask.sum()) / n),
            "objective/eos_rate": float(self._sum(rollout.has_eos.float().sum()) / n),
            "objective/unfinished_rate": float(self._sum(unfinished.float().sum()) / n),
        }
        return Experience(rollout, old_logprobs, old_values, advantages, returns, stats)

    # -- update ----------------------------------------------------------------------

    def _grads_finite(self) -> bool:
        return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params)

    def update(self, exp: Experience) -> dict[str, float]:
        """``ppo_epochs`` passes over mini-batches of the experience."""
        config, acc = self.config, self.accelerator
        rollout = exp.rollout
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
        prompt_len = rollout.query_ids.shape[1]
        mask = rollout.response_mask
        local = len(rollout.prompts)
        mini = (config.mini_batch_size or config.batch_size) // self.world or local
        micro = (config.micro_batch_size or mini * self.world) // self.world or mini
        mini, micro = min(mini, local), min(micro, mini)
        keys = [
            "loss/policy",
            "loss/value",
            "loss/total",
            "policy/clipfrac",
            "policy/approx_kl",
            "policy/entropy",
            "value/clipfrac",
            "ppo/grad_norm",
            "loss/demo",
        ]
        sums = dict.fromkeys(keys, 0.0)
        done, skipped, early_stopped = 0, 0, False
        # Eval mode, as when the old log-probs were taken (make_experience): with any
        # dropout, train-mode log-probs would differ from the old ones before the first
        # update and the ratio would not start at 1 (Huang et al., "The N Implementation
        # Details of RLHF with PPO": dropout off in RLHF).
        self.wrapped.eval()
        for _epoch in range(config.ppo_epochs):
            order = torch.randperm(local, generator=self._gen).to(self.device)
            for mb in _chunks(order, mini):
                tokens = self._sum(mask[mb].sum())  # global answer tokens in this mini-batch
                mb_stats = dict.fromkeys(keys, 0.0)
                if self.demos:
                    with acc.no_sync(self.wrapped) if self.world > 1 else nullcontext():
                        demo_nll = self._demo_loss(micro)
                        acc.backward(self.demo_coef * demo_nll)
                    mb_stats["loss/demo"] = float(demo_nll.detach()) / self.world
                parts = _chunks(mb, micro)
                for i, idx in enumerate(parts):
                    sync = i == len(parts) - 1
                    with nullcontext() if sync else acc.no_sync(self.wrapped):
                        logprobs, values, logits, _ = self.wrapped(
                            input_ids[idx], attention_mask[idx], prompt_len
                        )
                        m = mask[idx]
                        pg_loss, pg_stats = policy_loss(
                            logprobs,
                            exp.old_logprobs[idx],
                            exp.advantages[idx],
                            m,
                            config.cliprange,
                        )
                        vf_loss, vf_stats = value_loss(
                            values,
                            exp.old_values[idx],
                            exp.returns[idx],
                            m,
                            config.cliprange_value,
                        )
                        if config.ent_coef:
                            entropy = masked_mean(token_entropy(logits), m)
                        else:
                            with torch.no_grad():
                                entropy = masked_mean(token_entropy(logits), m)
                        loss = pg_loss + config.vf_coef * vf_loss - config.ent_coef * entropy
                        # Token-weighted share of the global mini-batch, times the number of
                        # processes because DDP averages gradients over them: the update is
                        # that of one mean over all answer tokens of the mini-batch.
                        weight = m.sum() * self.world / tokens
                        acc.backward(loss * weight)
                    w = float(m.sum() / tokens)  # this process's share of the global mean
                    for key, value in (
                        ("loss/policy", pg_loss),
                        ("loss/value", vf_loss),
                        ("loss/total", loss),
                        ("policy/clipfrac", pg_stats["policy/clipfrac"]),
                        ("policy/approx_kl", pg_stats["policy/approx_kl"]),
                        ("policy/entropy", entropy),
                        ("value/clipfrac", vf_stats["value/clipfrac"]),
                    ):
                        mb_stats[key] += float(value.detach()) * w
                    del logits
                local_ok = float(self._grads_finite() and math.isfinite(mb_stats["loss/total"]))
                all_ok = float(self._sum(torch.tensor(local_ok))) == self.world
                if not all_ok:
                    # Skipped on every process alike, so their weights stay identical.
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    self.skipped_steps += 1
                    self.consecutive_skips += 1
                    log.warning(
                        "PPO: non-finite loss or gradient, step skipped (%d in a row)",
                        self.consecutive_skips,
                    )
                    if self.consecutive_skips >= config.max_consecutive_skips:
                        raise NonFiniteError(
                            f"PPO aborted: {self.consecutive_skips} updates in a row had a "
                            f"non-finite loss or gradient ({self.skipped_steps} skipped in total); "
                            "nothing from this round was saved. Check the rewards for NaN/inf "
                            "(reward model or reward_fn) and lower the learning rate."
                        )
                    continue
                self.consecutive_skips = 0
                grad_norm = acc.clip_grad_norm_(self.params, config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                mb_stats = {k: float(self._sum(torch.tensor(v))) for k, v in mb_stats.items()}
                mb_stats["ppo/grad_norm"] = float(grad_norm)
                for key in keys:
                    sums[key] += mb_stats[key]
                done += 1
                if (
                    config.early_stop_kl is not None
                    and mb_stats["policy/approx_kl"] > config.early_stop_kl
                ):
                    early_stopped = True
                    break
            if early_stopped:
                break
        self.wrapped.eval()
        stats = {k: sums[k] / done for k in keys} if done else {}
        if not self.demos:
            stats.pop("loss/demo", None)
        stats.update(
            {
                "ppo/updates": float(done),
                "ppo/skipped_steps": float(skipped),
                "ppo/early_stopped": float(early_stopped),
            }
        )
        return stats

    def _demo_loss(self, size: int) -> Tensor:
        """Negative log-likelihood per imitated token of ``size`` sampled
        demonstrations under the policy: over the tokens the person changed and the
        closing EOS (``demo_loss_mask``), or over every answer token (``demo_tokens``
        "all", or a demonstration given without the answer it edits).

        With "edited", the tokens the person kept add the other half of their choice
        of where the answer ends: at each of them the answer went on, log(1 - p(stop)).
        Imitating the closing EOS alone raises p(stop) wherever the context looks like
        the end, at every earlier sentence end too: a rewrite that cut a long answer
        back to its last full sentence taught "stop after the first sentence" (the
        thorough oracle's answers fell from 47 to 20 words in one round). The length's
        whole likelihood is the product of (1 - p(stop)) before the end and p(stop) at it;
        the kept positions are summed into the same numerator, so a deletion's loss
        is the stop decision's whole log-likelihood per imitated token."""
        picks = torch.randperm(len(self.demos), generator=self._gen)[:size].tolist()
        chosen = [self.demos[i] for i in picks]
        demo = self.rollout_from_texts([d[0] for d in chosen], [d[1] for d in chosen])
        logprobs, _values, logits, _ = self.wrapped(
            demo.input_ids, demo.attention_mask, demo.query_ids.shape[1]
        )
        imitated = self.demo_loss_mask(demo, chosen)
        loss = -(logprobs * imitated).sum()
        if self.config.demo_tokens == "edited":
            kept = demo.response_mask * (1.0 - imitated)
            loss = loss - (continue_logprobs(logits, self.eos_ids) * kept).sum()
        del logits
        return loss / imitated.sum().clamp(min=1.0)

    def demo_loss_mask(self, demo: Rollout, chosen: Sequence[Demonstration]) -> Tensor:
        """``demo.response_mask`` narrowed, row by row, to the tokens the person wrote
        (``edited_tokens`` against the answer they edited) and the EOS, which is where
        they chose to stop. A row with nothing left (a cut rewrite that only deleted)
        keeps every token, so each demonstration still counts."""
        mask = demo.response_mask.clone()
        if self.config.demo_tokens != "edited":
            return mask
        for row, item in enumerate(chosen):
            if len(item) < 3:
                continue
            length = int(mask[row].sum())
            ids = demo.response_ids[row, :length].tolist()
            text_len = length - int(bool(demo.has_eos[row]))
            wrote = edited_tokens(ids[:text_len], text_ids(self.tokenizer, item[2]))
            wrote += [True] * (length - text_len)  # the EOS
            if any(wrote):
                mask[row, :length] = torch.tensor(wrote, dtype=mask.dtype)
        return mask

    def step(self, prompts: Sequence[Messages]) -> dict[str, float]:
        """One PPO step on a global batch of prompts (each process takes its share)."""
        local = self._shard(prompts)
        if not local:
            raise ValueError("PPOTrainer.step got no prompts for this process")
        start = time.perf_counter()
        rollout = self.generate(local)
        gen_s = time.perf_counter() - start
        start = time.perf_counter()
        scores = self.score(rollout)
        exp = self.make_experience(rollout, scores)
        score_s = time.perf_counter() - start
        start = time.perf_counter()
        stats = self.update(exp)
        update_s = time.perf_counter() - start
        kl = exp.stats["objective/kl"]
        if math.isfinite(kl):
            self.kl_ctl.update(kl, int(self.config.batch_size))
        self.steps += 1
        return {
            **exp.stats,
            **stats,
            "ppo/skipped_total": float(self.skipped_steps),
            "time/gen_s": gen_s,
            "time/score_s": score_s,
            "time/update_s": update_s,
            "time/step_s": gen_s + score_s + update_s,
        }

    @property
    def kl_coef(self) -> float:
        """The coefficient of the KL penalty in the rewards: the adaptive controller's
        value times the round's budget barrier."""
        return self.kl_ctl.value * self.kl_barrier

    # -- artifacts ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "kl_ctl": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
        }

    def save_policy(
        self, out_dir: str | os.PathLike, metadata: dict[str, Any] | None = None
    ) -> Path:
        """The policy adapter in the default PEFT layout (``PeftModel.from_pretrained(base,
        out_dir)`` loads it), plus the value head and the trainer state for the next round.
        Refuses non-finite weights; written to a temporary folder renamed at the end."""
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            raise FloatingPointError(
                "refusing to save a policy with non-finite weights; the round must be retried"
            )
        out = Path(out_dir)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(self.model, POLICY_ADAPTER, tmp)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
            str(tmp / VALUE_HEAD_FILE),
        )
        meta = {
            "format": "rlhf-chat/policy",
            "format_version": 1,
            **self.state(),
            "ppo_config": asdict(self.config),
            **(metadata or {}),
        }
        (tmp / POLICY_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
        return out


# ---------------------------------------------------------------- the worker's entry


class ServedSample(NamedTuple):
    """:meth:`PPOTrainer.served_kl_samples`'s answers: each one's summed KL to the
    reference and to the parent (None: no parent loaded), and its score by the trainer's
    reward (a trainer always has one: its reward model or ``reward_fn``)."""

    to_ref: Tensor
    to_parent: Tensor | None
    scores: Tensor


@dataclass
class RoundResult:
    metrics: dict[str, float]
    policy_dir: str
    reward_dir: str
    # The KL controller after the round, kept by the registry whether or not the policy
    # is published: a round refused for KL must leave a larger coefficient behind.
    trainer_state: dict[str, Any] = field(default_factory=dict)


def attach_policy(
    base: LoadedModel,
    settings: Settings,
    policy_dir: str | os.PathLike | None,
    lora_config: Any = None,
) -> tuple[nn.Module, nn.Linear, dict[str, Any]]:
    """A PeftModel on ``base.model`` with the ``"policy"`` adapter (fresh or loaded), its
    value head and the saved trainer state. Undo with ``peft_model.unload()``.
    ``lora_config`` overrides ``modeling.lora_config(settings)`` for a fresh adapter."""
    model = attach_adapter(base.model, POLICY_ADAPTER, settings, policy_dir, lora_config)
    device = next(base.model.parameters()).device
    hidden = base.model.config.get_text_config().hidden_size
    head = new_value_head(hidden, device)
    meta: dict[str, Any] = {}
    if policy_dir is not None:
        head_file = Path(policy_dir) / VALUE_HEAD_FILE
        if head_file.exists():  # an adapter from elsewhere may come without one
            head.load_state_dict(load_file(str(head_file)))
        meta_file = Path(policy_dir) / POLICY_META_FILE
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
    return model, head, meta


PARENT_ADAPTER = "parent"  # the version a round started from, loaded beside the policy to measure


def _cycle_batches(
    prompts: list[Messages], steps: int, size: int, seed: int
) -> list[list[Messages]]:
    """``steps`` batches of ``size`` prompts: shuffled passes over the prompts."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * size:
        block = list(range(len(prompts)))
        rng.shuffle(block)
        order += block
    return [[prompts[i] for i in order[s * size : (s + 1) * size]] for s in range(steps)]


def run_training_round(
    base: LoadedModel,
    settings: Settings,
    *,
    pointwise: Sequence[dict[str, Any]],
    pairs: Sequence[dict[str, Any]],
    prompts: Sequence[Messages],
    policy_dir: str | os.PathLike | None,
    reward_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    gate_prompts: Sequence[Messages] = (),
    heldout_pairs: Sequence[dict[str, Any]] | None = None,
    replay_pointwise: Sequence[dict[str, Any]] = (),
    replay_pairs: Sequence[dict[str, Any]] = (),
    progress: Progress | None = None,
    reward_fn: RewardFn | None = None,
    ppo_config: PPOConfig | None = None,
    accelerator: Any = None,
    kl_state: dict[str, float] | None = None,
) -> RoundResult:
    """One training round: update the reward model, run ``settings.ppo_steps`` PPO steps of
    ``settings.ppo_batch_size`` prompts, save both to ``out_dir/{policy,reward}``.

    Adapters are attached to ``base.model`` for the round and taken out again at the
    end (also on error), so a worker can keep one base model loaded across rounds.
    Nothing is written unless the whole round finished with finite weights.
    Metrics include ``reward/accuracy_before`` / ``reward/accuracy`` (held-out pairs,
    for the gate), ``objective/kl`` (mean KL per answer over the steps, and
    ``objective/kl_max``), ``objective/scores`` (mean score) and ``ppo/skipped_steps``.

    The KL gate (:class:`rlhf_core.gate.KLSearch`) decides on its measurement
    (:func:`rlhf_core.gate.gate_samples_kl`): ``objective/kl_served`` and
    ``objective/kl_served_ucb`` (KL to the base of answers sampled as served, mean and
    95% upper bound), ``objective/kl_parent`` / ``objective/kl_parent_ucb`` (the same to
    the version this round started from). It samples on ``gate_prompts`` (prompts no round
    trains on, ``datasets.gate_prompts``: held-out contexts and calibration prompts; the KL
    of what will be served to prompts the policy has not seen) when there are at least
    ``MIN_GATE_PROMPTS`` of them, else on the
    round's PPO prompts; ``gate/unseen_prompts`` says how many it used (0: the PPO
    prompts). The search measures on half of them, and when the full update overshot and
    the line search chose a smaller one, that candidate is measured again on the other half
    (:func:`rlhf_core.gate.gate_prompt_halves`; ``gate/confirmation_prompts`` how many, 0:
    the same ones)
    and decided on both samples pooled (``gate/samples`` = twice ``settings.gate_samples``;
    ``gate/chosen_kl_served`` and ``gate/fresh_kl_served`` the two means). ``kl_state``: the
    KL controller's state from the last round, published or not (else the parent policy's).
    """
    if not prompts:
        raise ValueError("run_training_round needs at least one prompt for PPO")
    report = progress or (lambda stage, fraction: None)
    round_start = time.perf_counter()
    torch.manual_seed(settings.seed)
    out = Path(out_dir)
    config = ppo_config or PPOConfig.from_settings(settings)
    model, value_head, policy_meta = attach_policy(base, settings, policy_dir)
    try:
        reward_model = RewardModel.attach(model, base.tokenizer, settings, reward_dir)
        metrics: dict[str, float] = {}
        heldout = list(heldout_pairs or [])
        if heldout:
            margins_before = reward_model.margins(heldout)
            before = heldout_metrics(margins_before)
            metrics["reward/accuracy_before"] = before["reward/accuracy"]
            metrics["reward/margin_before"] = before["reward/margin"]
        report("reward", 0.0)
        start = time.perf_counter()
        metrics.update(
            reward_model.train(
                pointwise, pairs, replay_pointwise=replay_pointwise, replay_pairs=replay_pairs
            )
        )
        metrics["time/reward_train_s"] = time.perf_counter() - start
        if heldout:
            margins_after = reward_model.margins(heldout)
            metrics.update(heldout_metrics(margins_after))
            metrics[WORSE_WITHOUT_TOP_USER_KEY] = float(pairs_worse_without_top_user(
                margins_before, margins_after, [p.get("user_id") for p in heldout]
            ))  # fmt: skip
        else:
            metrics["reward/heldout_pairs"] = 0.0
        report("reward", 1.0)

        # The parent's served KL as its own round measured it (the gate's bound): the
        # closer to the budget, the harder this round's penalty pulls toward the base.
        parent_metrics = policy_meta.get("metrics", {})
        parent_bound = parent_metrics.get("objective/kl_served_ucb")
        barrier = kl_barrier(parent_bound, settings.kl_budget) if settings.kl_barrier else 1.0
        trainer = PPOTrainer(
            model,
            base.tokenizer,
            config,
            reward_model=None if reward_fn else reward_model,
            reward_fn=reward_fn,
            value_head=value_head,
            accelerator=accelerator,
            kl_state=kl_state or policy_meta.get("kl_ctl"),
            kl_barrier=barrier,
            # No score_state: the reward model was retrained above, so the scale of its
            # scores is new and last round's moments would normalise with a stale one.
            demos=[
                (p["messages"], p["chosen"], p["rejected"])
                for p in [*pairs, *replay_pairs]
                if p.get("source") == "rewrite"
            ],
        )
        # The KL gate's search keeps the policy adapter as the round found it: the parent
        # version (or, in round one, LoRA's zero update), which it may move back toward.
        search = KLSearch(
            trainer, settings, adapter_named_parameters(model, POLICY_ADAPTER), policy_dir,
            parent_metrics,
        )  # fmt: skip
        history: list[dict[str, float]] = []
        batches = _cycle_batches(
            list(prompts),
            settings.ppo_steps,
            config.batch_size,
            settings.seed + int(reward_model.meta.get("version", 0)),
        )
        for i, batch in enumerate(batches):
            history.append(trainer.step(batch))
            report("ppo", (i + 1) / len(batches))
        for key in history[0]:
            values = [h[key] for h in history if key in h]
            metrics[key] = sum(values) / len(values)
        metrics["objective/kl_max"] = max(h["objective/kl"] for h in history)
        report("measuring KL", 1.0)
        search.run(gate_prompts, prompts, metrics)
        metrics["objective/kl_coef"] = trainer.kl_coef
        metrics["objective/kl_controller_coef"] = trainer.kl_ctl.value
        metrics["objective/kl_barrier"] = barrier
        metrics["ppo/skipped_steps"] = float(trainer.skipped_steps)
        metrics["ppo/steps"] = float(len(history))

        policy_out, reward_out = out / "policy", out / "reward"
        metrics["time/training_round_s"] = time.perf_counter() - round_start
        if trainer.accelerator.is_main_process:
            trainer.save_policy(policy_out, {"metrics": metrics, "base_model": base.name})
            reward_model.save(reward_out, {"metrics": metrics})
        trainer.accelerator.wait_for_everyone()
        report("saved", 1.0)
        return RoundResult(
            metrics=metrics,
            policy_dir=str(policy_out),
            reward_dir=str(reward_out),
            trainer_state=trainer.state(),
        )
    finally:
        # Take every LoRA layer out of the shared base again (no merge), so the next
        # round or the serving code sees the plain base model.
        model.unload()
        base.model.eval()
