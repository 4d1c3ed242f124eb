"""A simulated user who wants each answer to open with a headline: a short line of its
own (at most eight words, no full stop; it may be bold or a markdown heading), then a
blank line, then the answer.

A structure taste at the start of the answer (summary's is at its end), written after the
defaults were set, with example and summary, to check them on a taste nobody tuned for.
The rewrite puts a headline made from the request ("How do I make an HTTP request in
Python?" -> "Make an HTTP request in Python") above the answer as it was.
Same interface as ../shared/eval/oracle_concise.py:
judge(prompt, response) -> bool, rewrite(prompt, response) -> str | None.
"""

import re

MAX_HEADLINE_WORDS = 8
# Openings of a request that a headline leaves out ("Can you explain X?" -> "X").
REQUEST_OPENINGS = re.compile(
    r"^(?:(?:can|could|would) you (?:please )?|please )?"
    r"(?:how (?:do|can|should) (?:i|you|we)|what (?:is|are|does|do|should i know about)"
    r"|why (?:is|are|does|do)|who (?:is|was)|where (?:is|are)|when (?:is|was|did)"
    r"|tell me(?: about)?|give me|explain|describe|write|suggest|recommend|help me(?: to)?)\s+",
    re.IGNORECASE,
)
MARKUP = re.compile(r"^\s*(?:#+\s*)?(?:\*\*|__)?|(?:\*\*|__)?\s*$")


def _headline(line: str) -> str:
    """A line without its markdown heading or bold markers."""
    return MARKUP.sub("", line).strip()


def judge(prompt: str, response: str) -> bool:
    lines = response.strip().split("\n")
    if len(lines) < 3 or lines[1].strip():
        return False  # a headline needs a blank line under it and an answer after
    head = _headline(lines[0])
    words = head.split()
    return (
        1 <= len(words) <= MAX_HEADLINE_WORDS
        and not head.endswith((".", ",", ";", ":"))
        and any(line.strip() for line in lines[2:])
    )


def headline_for(prompt: str) -> str:
    """A headline made from the request: its opening ("How do I", "Write a") left out,
    no question mark, at most eight words, capitalised."""
    text = prompt.strip()
    asked = re.match(r"^what (?:does|do) (.+?) (?:mean|do)\?*$", text, re.IGNORECASE)
    text = asked.group(1) if asked else REQUEST_OPENINGS.sub("", text).strip()
    text = re.sub(r"^(?:the word|what)\s+", "", text, flags=re.IGNORECASE)
    text = re.sub(r"^(?:a|an|the|me|some)\s+", "", text, flags=re.IGNORECASE)
    text = re.sub(r"[?.!:;,]+$", "", text).strip()
    text = re.sub(r"\s+(?:is|are)$", "", text).strip(" '\"")
    words = text.split()[:MAX_HEADLINE_WORDS] or prompt.split()[:MAX_HEADLINE_WORDS]
    head = " ".join(words).rstrip(",;:.")
    return head[0].upper() + head[1:] if head else head


def rewrite(prompt: str, response: str) -> str | None:
    """The answer as it was, under a headline made from the request."""
    body = response.strip()
    if judge(prompt, response) or not body:
        return None
    out = f"{headline_for(prompt)}\n\n{body}"
    return out if judge(prompt, out) else None
