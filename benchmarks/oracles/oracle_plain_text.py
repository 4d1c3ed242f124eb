"""A simulated user who wants plain prose: no Markdown, no lists, under 60 words.

A different taste from ../shared/eval/oracle_concise.py (format, not only length),
used to show the loop is not tuned to one oracle. Same interface:
judge(prompt, response) -> bool, rewrite(prompt, response) -> str | None.
"""

import re

MAX_WORDS = 60
MARKDOWN = re.compile(r"(\*\*|__|^#+\s|^\s*[-*+]\s|^\s*\d+[.)]\s|`)", re.MULTILINE)


def _words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def judge(prompt: str, response: str) -> bool:
    words = _words(response)
    return 1 <= len(words) <= MAX_WORDS and not MARKDOWN.search(response)


def rewrite(prompt: str, response: str) -> str | None:
    """Strip the Markdown, join the lines into prose, cut to the word limit."""
    if judge(prompt, response) or not response.strip():
        return None
    plain = re.sub(r"(\*\*|__|`)", "", response)
    plain = re.sub(r"^\s*(#+|[-*+]|\d+[.)])\s*", "", plain, flags=re.MULTILINE)
    return " ".join(_words(plain)[:MAX_WORDS]) or None
