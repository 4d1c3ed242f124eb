"""A simulated user who wants answers as a bulleted list (a format taste).

👍 when the answer has at least two lines that start with "- " or "* " (or a
numbered item); the rewrite turns the answer's sentences into such a list. A
different direction from ../shared/eval/oracle_concise.py (structure, not
length), used to show the loop is not tuned to one oracle. Same interface:
judge(prompt, response) -> bool, rewrite(prompt, response) -> str | None.
"""

import re

ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)


def judge(prompt: str, response: str) -> bool:
    return len(ITEM.findall(response)) >= 2


def rewrite(prompt: str, response: str) -> str | None:
    """Up to three sentences of the answer, one bullet each."""
    if judge(prompt, response) or not response.strip():
        return None
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", response.strip()) if s.strip()]
    if len(sentences) < 2:
        sentences = [p.strip() for p in re.split(r"[,;]\s+", response.strip()) if p.strip()]
    return "\n".join(f"- {s}" for s in sentences[:3]) if len(sentences) >= 2 else None
