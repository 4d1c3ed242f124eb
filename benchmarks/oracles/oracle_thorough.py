"""A simulated user who wants a full answer: at least 40 words, and it ends where a
sentence ends (an answer cut off mid-sentence is not full).

A length taste opposite to ../shared/eval/oracle_concise.py, and one that also
asks the policy to finish what it starts within the served length limit. The
rewrite keeps the answer's complete sentences when they are long enough; a short
answer cannot be made thorough by editing, so it gets only a 👎.
Same interface: judge(prompt, response) -> bool, rewrite(prompt, response) -> str | None.
"""

import re

MIN_WORDS = 40


def _words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def _complete(text: str) -> bool:
    return re.search(r"[A-Za-z)\]\"'”][.!?][*_)\"'”]*$", text.rstrip()) is not None


def judge(prompt: str, response: str) -> bool:
    return len(_words(response)) >= MIN_WORDS and _complete(response)


def rewrite(prompt: str, response: str) -> str | None:
    """The answer cut back to its last complete sentence, if that still has 40 words."""
    if judge(prompt, response) or not response.strip():
        return None
    text = response.strip()
    # A sentence ends after a word, not after a list number ("3.").
    ends = [m.end() for m in re.finditer(r"(?<=[A-Za-z)\]\"'”])[.!?](?=\s|$)", text)]
    if not ends:
        return None
    kept = text[: ends[-1]]
    return kept if judge(prompt, kept) else None
