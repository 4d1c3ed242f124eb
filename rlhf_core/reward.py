"""Reward model: a LoRA adapter named ``"reward"`` plus a scalar head on the shared base.

The base model is never copied: the reward model is one more adapter on the same
:class:`peft.PeftModel` that carries the policy adapter, and a ``nn.Linear(hidden, 1)``
head on the last hidden state. An answer is scored at its last token, in exactly the
token layout of a PPO rollout: ``chat_template(messages, add_generation_prompt) +
answer tokens + EOS``, so the scores it learns from feedback are the scores PPO sees.

Losses (weights configurable):
- pointwise (thumbs up = 1, down = 0): logistic loss ``BCEWithLogits(r, label)``;
- pairs (a rewrite over the answer it replaced, a liked over a disliked answer to one
  context): Bradley-Terry ``-logsigmoid(r_chosen - r_rejected)`` (Ouyang et al. 2022, eq. 1).

Incremental: :meth:`RewardModel.attach` starts from the previous round's saved folder,
and :meth:`RewardModel.train` mixes a replay sample of older feedback into the new one.
A saved reward model is a folder: the PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``), ``reward_head.safetensors`` and ``reward_meta.json``
(format version, model version counter, base model, metrics).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.chat_format import answer_ids
from rlhf_core.chat_format import prompt_ids as chat_prompt_ids
from rlhf_core.settings import Settings

log = logging.getLogger(__name__)

REWARD_ADAPTER = "reward"
HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_meta.json"
FORMAT = "rlhf-chat/reward-model"
FORMAT_VERSION = 1

Messages = list[dict[str, str]]


# ----------------------------------------------------------------- shared helpers


def position_ids_from(attention_mask: Tensor) -> Tensor:
    """Positions that skip padding, as ``generate`` computes them for left-padded
    prompts; every forward uses them so that scoring sees what sampling saw."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the weights stay fp32); nothing on the CPU, where bf16
    matmuls are slower than fp32 on most machines."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer trunk (without the LM head) of a causal LM or a PeftModel of one.

    Calling the trunk directly gives hidden states without paying for the
    ``[batch, tokens, vocab]`` logits that a reward or value head does not need; LoRA
    layers live inside the trunk, so the active adapter still applies."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden state ``[batch, tokens, hidden]`` (after the final norm)."""
    out = decoder_of(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def save_adapter(model: nn.Module, adapter_name: str, out_dir: str | os.PathLike) -> None:
    """Save one adapter of a multi-adapter PeftModel in the layout of a *default*
    adapter (files at the top of ``out_dir``), so that a plain
    ``PeftModel.from_pretrained(base, out_dir)`` loads it in any program.
    (``save_pretrained`` would put a non-default adapter in a sub-folder.)"""
    import copy

    from peft import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(str(out))


def attach_adapter(
    model: nn.Module,
    adapter_name: str,
    settings: Settings,
    from_dir: str | os.PathLike | None = None,
    lora_config: Any = None,
) -> nn.Module:
    """Add a trainable LoRA adapter to ``model`` (a plain causal LM or a PeftModel),
    fresh or loaded from ``from_dir``. Returns the PeftModel (new or the same)."""
    from peft import PeftModel, get_peft_model

    from rlhf_core.modeling import lora_config as default_lora_config

    config = lora_config or default_lora_config(settings)
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(f"adapter {adapter_name!r} is already attached to this model")
        if from_dir is not None:
            model.load_adapter(str(from_dir), adapter_name=adapter_name, is_trainable=True)
        else:
            model.add_adapter(adapter_name, config)
        return model
    if from_dir is not None:
        return PeftModel.from_pretrained(
            model, str(from_dir), adapter_name=adapter_name, is_trainable=True
        )
    return get_peft_model(model, config, adapter_name=adapter_name)


def adapter_named_parameters(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
    """The LoRA parameters of one adapter with their names (``...lora_A.<name>.weight``)."""
    tag = f".{adapter_name}."
    return [(n, p) for n, p in model.named_parameters() if tag in n and "lora_" in n]


def adapter_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The LoRA parameters of one adapter (:func:`adapter_named_parameters`)."""
    return [p for _, p in adapter_named_parameters(model, adapter_name)]


def _finished_flags(
    pointwise: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]]
) -> list[bool]:
    """Whether each answer of a ``loss`` batch ended with EOS, in its encode order."""
    return (
        [bool(e.get("finished", True)) for e in pointwise]
        + [bool(p.get("chosen_finished", True)) for p in pairs]
        + [bool(p.get("rejected_finished", True)) for p in pairs]
    )


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------- the model


@dataclass
class RewardConfig:
    learning_rate: float = 3e-4
    epochs: int = 4
    batch_size: int = 8  # examples per optimiser step (a pair counts once)
    pointwise_weight: float = 1.0
    pair_weight: float = 1.0
    max_grad_norm: float = 1.0
    max_prompt_tokens: int = 1024  # older context is cut from the left beyond this
    max_answer_tokens: int = 256
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RewardConfig:
        values: dict[str, Any] = {
            "learning_rate": settings.reward_learning_rate,
            "epochs": settings.reward_epochs,
            "max_prompt_tokens": settings.max_context_tokens,
            "max_answer_tokens": settings.max_new_tokens,
            "seed": settings.seed,
        }
        values.update(overrides)
        return cls(**values)


class RewardModel:
    """Scalar reward on the shared base: adapter ``"reward"`` + ``head``.

    Build it with :meth:`attach` (fresh, or from a saved folder). Public API:
    ``score(messages_list, answers) -> Tensor[batch]``, ``train(...)``,
    ``train_step(...)``, ``evaluate(pairs)``, ``save(dir)`` / ``load(...)``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        head: nn.Linear,
        config: RewardConfig,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.model = model  # PeftModel holding (at least) the "reward" adapter
        self.tokenizer = tokenizer
        self.head = head
        self.config = config
        self.meta: dict[str, Any] = dict(meta or {})
        self.device = next(head.parameters()).device
        self._optimizer: torch.optim.Optimizer | None = None

    # -- construction ---------------------------------------------------------

    @classmethod
    def attach(
        cls,
        model: PreTrainedModel | nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        settings: Settings,
        reward_dir: str | os.PathLike | None = None,
        config: RewardConfig | None = None,
        lora_config: Any = None,
    ) -> RewardModel:
        """Attach the reward adapter and head to ``model`` (base or PeftModel), fresh or
        from ``reward_dir`` (a folder written by :meth:`save`)."""
        meta: dict[str, Any] = {}
        if reward_dir is not None:
            meta = cls.read_meta(reward_dir)
        text_config = model.config.get_text_config()
        if lora_config is None:
            from rlhf_core.modeling import lora_config as make_lora_config

            # The task (is this the kind of answer people like?) reads the top
            # layers' features; the policy adapter keeps every layer.
            lora_config = make_lora_config(settings, top_layers_of=text_config.num_hidden_layers)
        peft_model = attach_adapter(model, REWARD_ADAPTER, settings, reward_dir, lora_config)
        hidden = text_config.hidden_size
        device = next(peft_model.parameters()).device
        head = nn.Linear(hidden, 1).to(device=device, dtype=torch.float32)
        if reward_dir is not None:
            head.load_state_dict(load_file(str(Path(reward_dir) / HEAD_FILE)))
        else:
            # Small random init (as TRL's value heads): a zero head would give every
            # answer the same score and zero gradient to the adapter on the first step.
            gen = torch.Generator().manual_seed(settings.seed)
            with torch.no_grad():
                head.weight.copy_(
                    torch.randn(head.weight.shape, generator=gen) / math.sqrt(hidden + 1)
                )
                head.bias.zero_()
        return cls(
            peft_model, tokenizer, head, config or RewardConfig.from_settings(settings), meta
        )

    @staticmethod
    def read_meta(reward_dir: str | os.PathLike) -> dict[str, Any]:
        path = Path(reward_dir) / META_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{reward_dir} is not a saved reward model (no {META_FILE}); pass a folder "
                "written by RewardModel.save, or None to start a fresh reward model."
            )
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{reward_dir} holds format {meta.get('format')!r} v{meta.get('format_version')}, "
                f"this code reads {FORMAT!r} up to v{FORMAT_VERSION}: upgrade rlhf-chat or retrain."
            )
        return meta

    load = attach  # RewardModel.load(model, tokenizer, settings, reward_dir)

    def save(self, out_dir: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write the adapter, head and metadata to ``out_dir`` (via a temporary folder
        renamed at the end, so a crash never leaves a half-written artifact).
        The version counter is one more than the one this model was loaded from."""
        out = Path(out_dir)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        bad = [n for n, p in self.head.named_parameters() if not torch.isfinite(p).all()]
        bad += [
            str(i)
            for i, p in enumerate(adapter_parameters(self.model, REWARD_ADAPTER))
            if not torch.isfinite(p).all()
        ]
        if bad:
            raise FloatingPointError(
                "refusing to save a reward model with non-finite weights; retrain from the "
                "previous version (lower reward_learning_rate if this repeats)"
            )
        save_adapter(self.model, REWARD_ADAPTER, tmp)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
            str(tmp / HEAD_FILE),
        )
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": int(self.meta.get("version", 0)) + 1,
            "parent_version": int(self.meta.get("version", 0)),
            "base_model": getattr(self.model.get_base_model().config, "_name_or_path", ""),
            "hidden_size": self.head.in_features,
            "created_at": time.time(),
            **(metadata or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
        self.meta = meta
        return out

    # -- encoding and scoring -----------------------------------------------

    def prompt_ids(self, messages: Messages) -> list[int]:
        """Token ids of the chat context with the assistant generation prompt: what a
        PPO rollout starts from. Over-long contexts keep their most recent tokens."""
        return chat_prompt_ids(self.tokenizer, messages, self.config.max_prompt_tokens)

    def encode(
        self,
        messages_list: Sequence[Messages],
        answers: Sequence[str],
        finished: Sequence[bool] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Left-padded ``(input_ids, attention_mask)`` of ``prompt + answer (+ EOS)``; the
        last column is every row's last answer token, where it is scored: its EOS for an
        answer that ended, its last text token for one that was cut -- the layout of a
        PPO rollout that hit its token limit. ``finished[i]`` (default all True) says
        whether answer ``i`` ended with EOS when it was served (``Turn.finished``)."""
        if len(messages_list) != len(answers):
            raise ValueError(f"{len(messages_list)} contexts but {len(answers)} answers")
        ended = [True] * len(answers) if finished is None else [bool(f) for f in finished]
        if len(ended) != len(answers):
            raise ValueError(f"{len(answers)} answers but {len(ended)} finished flags")
        rows = []
        for messages, answer, done in zip(messages_list, answers, ended, strict=True):
            ids, _ = answer_ids(self.tokenizer, answer, self.config.max_answer_tokens, done)
            rows.append(self.prompt_ids(messages) + ids)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row)
            attention_mask[i, width - len(row) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def forward_scores(
        self, input_ids: Tensor, attention_mask: Tensor, last_index: Tensor | None = None
    ) -> Tensor:
        """Scalar rewards ``[batch]`` at ``last_index`` (default: the last column), under
        the reward adapter. Differentiable; wrap in ``torch.inference_mode`` to score."""
        previous = self.model.active_adapter
        if previous != REWARD_ADAPTER:
            self.model.set_adapter(REWARD_ADAPTER)
        try:
            with autocast(self.device):
                hidden = hidden_states(self.model, input_ids, attention_mask)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            idx = (
                last_index if last_index is not None else torch.full_like(rows, hidden.shape[1] - 1)
            )
            return self.head(hidden[rows, idx].float()).squeeze(-1)
        finally:
            if previous != REWARD_ADAPTER:
                self.model.set_adapter(previous)

    def score(
        self,
        messages_list: Sequence[Messages],
        answers: Sequence[str],
        batch_size: int = 16,
        finished: Sequence[bool] | None = None,
    ) -> Tensor:
        """Rewards ``[batch]`` (float32, on the CPU) of answers to their contexts
        (``finished``: as in :meth:`encode`)."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(answers), batch_size):
                end = start + batch_size
                ids, mask = self.encode(
                    messages_list[start:end],
                    answers[start:end],
                    None if finished is None else finished[start:end],
                )
                out.append(self.forward_scores(ids, mask).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    # -- training -------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return adapter_parameters(self.model, REWARD_ADAPTER) + list(self.head.parameters())

    def _ensure_optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(
                self.trainable_parameters(), lr=self.config.learning_rate, weight_decay=0.0
            )
        return self._optimizer

    def loss(
        self, pointwise: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]]
    ) -> tuple[Tensor, dict[str, float]]:
        """Weighted loss of one batch (one forward for all its sequences).

        pointwise: ``{"messages", "answer", "label"}`` with label 1.0 (liked) / 0.0;
        pairs: ``{"messages", "chosen", "rejected"}``. Optional ``finished`` (pointwise),
        ``chosen_finished`` / ``rejected_finished`` (pairs): False for a served answer
        that was cut before its EOS (see :meth:`encode`); missing means True."""
        contexts = [e["messages"] for e in pointwise] + [p["messages"] for p in pairs] * 2
        answers = (
            [e["answer"] for e in pointwise]
            + [p["chosen"] for p in pairs]
            + [p["rejected"] for p in pairs]
        )
        ids, mask = self.encode(contexts, answers, _finished_flags(pointwise, pairs))
        rewards = self.forward_scores(ids, mask)
        n_point, n_pair = len(pointwise), len(pairs)
        total = rewards.new_zeros(())
        stats: dict[str, float] = {}
        if n_point:
            labels = torch.tensor([float(e["label"]) for e in pointwise], device=rewards.device)
            point_loss = nn.functional.binary_cross_entropy_with_logits(rewards[:n_point], labels)
            total = total + self.config.pointwise_weight * point_loss
            stats["reward/pointwise_loss"] = float(point_loss.detach())
        if n_pair:
            chosen = rewards[n_point : n_point + n_pair]
            rejected = rewards[n_point + n_pair :]
            pair_loss = -nn.functional.logsigmoid(chosen - rejected).mean()
            total = total + self.config.pair_weight * pair_loss
            stats["reward/pair_loss"] = float(pair_loss.detach())
            stats["reward/train_accuracy"] = float((chosen > rejected).float().mean())
        return total, stats

    def train_step(
        self, pointwise: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]]
    ) -> dict[str, float]:
        """One optimiser step on one batch; a non-finite loss or gradient skips it
        (``reward/skipped`` = 1) and leaves the weights untouched."""
        if not pointwise and not pairs:
            raise ValueError("train_step needs at least one pointwise example or pair")
        self.model.set_adapter(REWARD_ADAPTER)  # also marks only this adapter trainable
        optimizer = self._ensure_optimizer()
        optimizer.zero_grad(set_to_none=True)
        loss, stats = self.loss(pointwise, pairs)
        loss.backward()
        params = self.trainable_parameters()
        grads_finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        if not (torch.isfinite(loss) and grads_finite):
            optimizer.zero_grad(set_to_none=True)
            return {"reward/loss": float(loss.detach()), "reward/skipped": 1.0}
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"reward/loss": float(loss.detach()), "reward/skipped": 0.0, **stats}

    def train(
        self,
        pointwise: Sequence[dict[str, Any]] = (),
        pairs: Sequence[dict[str, Any]] = (),
        *,
        replay_pointwise: Sequence[dict[str, Any]] = (),
        replay_pairs: Sequence[dict[str, Any]] = (),
        epochs: int | None = None,
    ) -> dict[str, float]:
        """Train on new feedback mixed with replayed older feedback (so an incremental
        round does not forget). The first epoch shuffles both kinds together; later
        epochs pass over the new feedback only (the replayed examples were trained on in
        the rounds that brought them, and come back in later rounds' replays). Batches
        of ``config.batch_size``. Returns mean metrics over the steps."""
        new_items = [("point", e) for e in pointwise] + [("pair", p) for p in pairs]
        replayed = [("point", e) for e in replay_pointwise] + [("pair", p) for p in replay_pairs]
        if not new_items and not replayed:
            return {"reward/steps": 0.0}
        rng = random.Random(self.config.seed + int(self.meta.get("version", 0)))
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        steps = 0
        for epoch in range(epochs if epochs is not None else self.config.epochs):
            items = new_items + replayed if epoch == 0 else list(new_items)
            rng.shuffle(items)
            for batch in _batches(items, self.config.batch_size):
                stats = self.train_step(
                    [e for kind, e in batch if kind == "point"],
                    [e for kind, e in batch if kind == "pair"],
                )
                steps += 1
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
        metrics = {k: sums[k] / counts[k] for k in sums}
        metrics["reward/skipped"] = sums.get("reward/skipped", 0.0)
        metrics["reward/steps"] = float(steps)
        metrics["reward/train_examples"] = float(len(new_items) + len(replayed))
        return metrics

    def evaluate(self, pairs: Sequence[dict[str, Any]], batch_size: int = 16) -> dict[str, float]:
        """``reward/accuracy`` (share of pairs with chosen scored above rejected) and
        ``reward/margin`` (mean ``r_chosen - r_rejected``) on held-out pairs. With no
        pairs only ``reward/heldout_pairs`` = 0 is returned (nothing to measure)."""
        if not pairs:
            return {"reward/heldout_pairs": 0.0}
        return heldout_metrics(self.margins(pairs, batch_size))

    def margins(self, pairs: Sequence[dict[str, Any]], batch_size: int = 16) -> Tensor:
        """``r_chosen - r_rejected`` of each pair (positive: the pair is scored right)."""
        contexts = [p["messages"] for p in pairs]
        chosen = self.score(
            contexts,
            [p["chosen"] for p in pairs],
            batch_size,
            [bool(p.get("chosen_finished", True)) for p in pairs],
        )
        rejected = self.score(
            contexts,
            [p["rejected"] for p in pairs],
            batch_size,
            [bool(p.get("rejected_finished", True)) for p in pairs],
        )
        return chosen - rejected


def heldout_metrics(margins: Tensor) -> dict[str, float]:
    """:meth:`RewardModel.evaluate`'s metrics from the pairs' margins."""
    return {
        "reward/accuracy": float((margins > 0).float().mean()),
        "reward/margin": float(margins.mean()),
        "reward/heldout_pairs": float(margins.numel()),
    }


MIN_PEOPLE_TO_LEAVE_ONE_OUT = 3  # see pairs_worse_without_top_user


def pairs_worse_without_top_user(before: Tensor, after: Tensor, users: Sequence[Any]) -> int:
    """How many more held-out pairs the retrained reward model scores wrong than the one
    before it (``before`` / ``after``: the pairs' margins; newly wrong minus newly right),
    leaving out the one person whose pairs got most worse, where the pairs are of three
    people or more. One person's pairs move together (their answers to one prompt, paired
    with each other) and anyone signed in can make many, so on a service with many people
    no one account may refuse every round through the reward gate alone (review of s22).
    With the pairs of one or two ids (a laptop, where each browser is an id of its own)
    every pair counts: leaving one of two out would leave the gate nearly blind."""
    net: dict[Any, int] = {}
    for was_right, is_right, user in zip(
        (before > 0).tolist(), (after > 0).tolist(), users, strict=True
    ):
        change = int(was_right and not is_right) - int(is_right and not was_right)
        net[user] = net.get(user, 0) + change
    total = sum(net.values())
    return total if len(net) < MIN_PEOPLE_TO_LEAVE_ONE_OUT else total - max(net.values())
