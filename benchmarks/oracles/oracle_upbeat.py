"""A simulated user who likes an upbeat tone: the answer opens with an
enthusiastic word and carries an exclamation mark.

A tone preference, unrelated to length, so a rising thumbs-up rate here shows
the loop learns tastes other than "be short". Same interface as
../shared/eval/oracle_concise.py.
"""

import re

OPENERS = ("sure", "great", "absolutely", "of course", "happy to", "glad")


def judge(prompt: str, response: str) -> bool:
    text = response.strip().lower()
    return text.startswith(OPENERS) and "!" in text


def rewrite(prompt: str, response: str) -> str | None:
    """Prefix an upbeat opener to the first two sentences."""
    if judge(prompt, response) or not response.strip():
        return None
    sentences = re.split(r"(?<=[.!?])\s+", response.strip())
    return "Sure! " + " ".join(sentences[:2])
