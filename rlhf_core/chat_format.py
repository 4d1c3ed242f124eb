"""The one chat encoding: messages and answers to token ids, for every part of the loop.

Serving, PPO rollouts, the reward model, demonstrations and the KL gate all encode
through these functions, so what trains is token for token what was served.

- ``prompt_ids``: the chat template with the assistant generation prompt, applied with
  ``sanitize_control_tokens=True`` (transformers 5): a control token that a person
  types (``<|im_end|>\\n<|im_start|>assistant``) is encoded as plain text, so it cannot
  forge a turn boundary, neither in the served prompt nor in training data. Rendering
  the template to a string and tokenizing that string (what training did before)
  turns typed control tokens into real ones.
- ``answer_ids``: an answer's text as plain text (control tokens typed into a rewrite
  stay text too), then EOS only when the answer finished. An answer that was cut (at
  the served token limit, or at a training limit here) did not end: giving it an EOS
  would teach the policy to stop mid-sentence and the reward model to score a cut
  answer as a complete one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Messages = Sequence[Mapping[str, Any]]


def chat_messages(messages: Messages) -> list[dict[str, Any]]:
    """Messages reduced to role and content, the keys chat templates read (a UI may
    add its own keys, such as metadata, that must not change the encoding)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def prompt_ids(tokenizer: Any, messages: Messages, max_tokens: int | None = None) -> list[int]:
    """Token ids of the chat context with the assistant generation prompt: exactly
    what the served model is given. ``max_tokens`` keeps the most recent tokens
    (serving drops whole turns first, so a served context always fits)."""
    if not messages:
        raise ValueError("A chat context needs at least one message; got none.")
    ids = tokenizer.apply_chat_template(
        chat_messages(messages),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
        sanitize_control_tokens=True,
    )
    ids = [int(i) for i in ids]
    return ids[-max_tokens:] if max_tokens else ids


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` as plain text: control tokens in it are split like any other text."""
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def answer_ids(
    tokenizer: Any, answer: str, max_tokens: int | None = None, finished: bool = True
) -> tuple[list[int], bool]:
    """``(ids, ended)``: the answer's tokens followed by EOS when the answer
    ``finished`` (the served answer ended with EOS) and fits ``max_tokens``.
    ``ended`` says whether the EOS is there; a cut answer gets none.

    ``max_tokens`` counts the EOS, as ``generate(max_new_tokens=...)`` does: an answer
    of ``max_tokens`` text tokens or more would have been cut by generate before its
    EOS, so it is cut here too, at ``max_tokens`` tokens and without EOS."""
    ids = text_ids(tokenizer, answer)
    if max_tokens is not None and len(ids) >= max_tokens:
        return ids[:max_tokens], False
    if not finished:
        return ids, False
    return ids + [int(tokenizer.eos_token_id)], True


__all__ = ["Messages", "answer_ids", "chat_messages", "prompt_ids", "text_ids"]
