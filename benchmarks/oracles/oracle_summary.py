"""A simulated user who wants an answer to close with a one-line summary: its last
sentence opens with "In short", "In summary", "To sum up", "Overall" or "In brief", and
the answer ends where that sentence ends (cut off mid-summary is no summary).

A structure taste none of the other oracles has, written in session 16 after the
defaults were set, to check them once more on a taste nobody tuned for. The base model
seldom closes this way. The rewrite is the edit such a user makes: the answer cut back
to its first complete sentences (at most 30 words, so that it still fits the served
length) and a closing "In short, ..." that restates the first sentence's main clause.
Same interface as ../shared/eval/oracle_concise.py.
"""

import re

_OPENERS = ("in short", "in summary", "to sum up", "overall", "in brief")
_SENTENCE_END = re.compile(r"(?<=[A-Za-z0-9)\]\"'”])[.!?](?=\s|$)")
KEPT_WORDS = 30
SUMMARY_WORDS = 12


def _sentences(text: str) -> list[str]:
    """Complete sentences only: text after the last sentence end is dropped."""
    out, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        out.append(text[start : match.end()].strip())
        start = match.end()
    return [s for s in out if s]


def judge(prompt: str, response: str) -> bool:
    text = response.strip()
    sentences = _sentences(text)
    if not sentences or not text.endswith(sentences[-1]):
        return False
    last = sentences[-1].lstrip("*_#> -").lower()
    return len(sentences) >= 2 and last.startswith(_OPENERS)


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
    sentences = _sentences(text)
    if not sentences:
        return None
    kept: list[str] = []
    for sentence in sentences:
        if kept and len(" ".join([*kept, sentence]).split()) > KEPT_WORDS:
            break
        kept.append(sentence)
    # The first sentence's main clause, as the gist: up to its first comma or colon.
    gist = re.split(r"[,:;]", sentences[0].rstrip(".!?"), maxsplit=1)[0].split()
    if len(gist) < 3:
        return None
    summary = "In short, " + _lower_first(" ".join(gist[:SUMMARY_WORDS])) + "."
    return " ".join([*kept, summary])
