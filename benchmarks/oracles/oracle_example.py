"""A simulated user who wants a concrete example in every answer: "for example",
"for instance", "e.g." or "such as" somewhere in it.

A content-structure taste that none of the other oracles has (written in session 14,
after the defaults were set, to check them on a taste nobody tuned for). The base model
rarely does it on its own: 2 of 48 held-out answers (4%) at 64 tokens. The rewrite is
the edit such a user makes: the example marker put in front of the answer's second
sentence ("... heat. For example, the water in food ..."), or after the first clause of
a one-sentence answer. Same interface as ../shared/eval/oracle_concise.py.
"""

import re

# "e.g." ends in a dot: no word boundary after it ("e.g. swallows").
_MARKER = re.compile(r"\b(?:for example|for instance|such as)\b|\be\.g\.", re.IGNORECASE)


def judge(prompt: str, response: str) -> bool:
    return _MARKER.search(response) is not None


def _lower_first(text: str) -> str:
    # "The water" -> "the water"; "I", acronyms and names ("NASA", "Paris") stay.
    word = text.split(" ", 1)[0]
    if word[:1].isupper() and word[1:].islower() and word != "I":
        return text[0].lower() + text[1:]
    return text


def rewrite(prompt: str, response: str) -> str | None:
    text = response.strip()
    if not text or judge(prompt, text):
        return None
    sentences = re.split(r"(?<=[.!?])\s+", text, maxsplit=1)
    if len(sentences) == 2 and sentences[1][:1].isalpha():
        return f"{sentences[0]} For example, {_lower_first(sentences[1])}"
    head, comma, tail = text.partition(", ")
    if comma and tail[:1].isalpha():
        return f"{head}, for example, {tail}"
    return None
