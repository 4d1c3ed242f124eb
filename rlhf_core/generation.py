"""One builder of ``generate()`` keyword arguments: serving, PPO rollouts and the KL gate.

What trains must be what was served. Three places call ``model.generate``: the chat
server (what people see and vote on), PPO's rollouts (whose log-probs the ratio uses)
and the gate's served-KL measurement (what people *will* see). Each used to build its
own arguments; now each calls :func:`generate_kwargs` with a :class:`Sampling`.

Pinned, not inherited. ``generate`` fills every argument the caller leaves out from the
base model's ``generation_config`` and then from transformers' global defaults
(``top_k=50`` among them). A base shipped with ``repetition_penalty=1.2`` or ``top_k=20``
would then sample from a distribution other than ``softmax(logits / T)`` -- the one
whose log-probs PPO computes -- and from another one again in the gate. So every
argument that changes the next-token distribution or the answer's length is passed
explicitly (:data:`NEUTRAL`): the only knobs are temperature, top-p and the token limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rlhf_core.settings import Settings

__all__ = ["NEUTRAL", "Sampling", "generate_kwargs", "stop_token_ids"]

# Every generation_config field that adds a logits processor, a stopping rule or a
# decoding strategy, at the value that turns it off (transformers 5.x names).
NEUTRAL: dict[str, Any] = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "top_k": 0,
    "typical_p": 1.0,
    "min_p": None,
    "top_h": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "min_length": 0,
    "min_new_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "renormalize_logits": False,
    "max_length": None,
    "max_time": None,
    "stop_strings": None,
    "prompt_lookup_num_tokens": None,
    "assistant_early_exit": None,
}
# Arguments that only mean something when sampling; greedy decoding leaves them unset
# (transformers warns when they are set with do_sample=False).
_SAMPLING_ONLY = ("top_k", "typical_p", "min_p", "top_h", "epsilon_cutoff", "eta_cutoff")


@dataclass
class Sampling:
    """Sampling settings of one answer; stored with the turn so training knows them.

    ``temperature`` 0 means greedy decoding; otherwise answers are drawn from
    ``softmax(logits / temperature)`` restricted to the top-``top_p`` nucleus."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256

    @classmethod
    def from_settings(cls, settings: Settings) -> Sampling:
        """What the chat UI serves by default (RLHF_TEMPERATURE, RLHF_TOP_P,
        RLHF_MAX_NEW_TOKENS)."""
        return cls(settings.temperature, settings.top_p, settings.max_new_tokens)

    @classmethod
    def coerce(cls, value: Sampling | dict[str, Any] | None, settings: Settings) -> Sampling:
        """Fill missing fields from the settings and clamp to ranges generate accepts."""
        base = cls.from_settings(settings)
        if isinstance(value, Sampling):
            value = value.as_dict()
        # A NaN passes min/max untouched and an infinite token limit breaks int(): a value
        # that is not a finite number takes the default, as a missing one does.
        given = {k: v for k, v in (value or {}).items() if v is not None and _finite(v)}
        merged = {**base.as_dict(), **given}
        return cls(
            temperature=min(max(float(merged["temperature"]), 0.0), 2.0),
            top_p=min(max(float(merged["top_p"]), 0.01), 1.0),
            max_new_tokens=min(max(int(merged["max_new_tokens"]), 1), 4096),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the base's
    ``generation_config.eos_token_id`` (one id or a list). Serving, rollouts and the
    gate stop at the same tokens, and the trainer's response mask ends at them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids: Iterable[Any] = eos if isinstance(eos, list | tuple) else [eos]
    return sorted({*(int(e) for e in ids if e is not None), int(tokenizer.eos_token_id)})


def generate_kwargs(
    sampling: Sampling,
    *,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None,
    min_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``model.generate`` that sample exactly as ``sampling`` says.

    Returns the pinned :data:`NEUTRAL` values plus ``do_sample``, ``temperature``,
    ``top_p``, ``max_new_tokens``, ``eos_token_id``, ``pad_token_id`` and
    ``use_cache=True``. The caller adds the inputs (and a streamer or stopping
    criteria). ``min_new_tokens`` is for benchmarks that want fixed-length answers.
    """
    kwargs = dict(NEUTRAL)
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=float(sampling.temperature))
        kwargs.update(top_p=float(sampling.top_p))
    else:
        for key in _SAMPLING_ONLY:
            kwargs[key] = None
        kwargs.update(do_sample=False, temperature=None, top_p=None)
    kwargs.update(
        max_new_tokens=int(sampling.max_new_tokens),
        min_new_tokens=min_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    return kwargs
