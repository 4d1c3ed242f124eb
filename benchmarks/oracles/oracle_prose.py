"""A simulated user who wants plain prose: one paragraph, no lists, no line breaks
(a format taste, the opposite of oracle_bullets.py).

👍 when the answer is a single paragraph with no list items; the rewrite is the same
answer with its list markers dropped and its lines joined, so the rewrite is about
as long as the answer (length is not what this user cares about). Same interface
as ../shared/eval/oracle_concise.py: judge(prompt, response) -> bool,
rewrite(prompt, response) -> str | None.
"""

import re

ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)


def judge(prompt: str, response: str) -> bool:
    text = response.strip()
    return bool(text) and "\n" not in text and not ITEM.match(text)


def rewrite(prompt: str, response: str) -> str | None:
    """The answer as one paragraph: list markers and emphasis dropped, lines joined."""
    if judge(prompt, response) or not response.strip():
        return None
    lines = [ITEM.sub("", line).replace("**", "").strip() for line in response.splitlines()]
    paragraph = " ".join(line for line in lines if line)
    return paragraph or None
