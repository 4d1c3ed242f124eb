"""A simulated user who likes to be engaged: the answer ends with a follow-up
question to them ("Would you like an example?").

A tone and structure taste: what matters is the last sentence, not the length or
the layout of the rest. The answer must end with a question mark, and that last
sentence must speak to the user ("you"), so a rhetorical question in the middle
does not count. The rewrite keeps the first two sentences and adds a question.
Same interface as ../shared/eval/oracle_concise.py.
"""

import re

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _last_sentence(text: str) -> str:
    sentences = [s for s in SENTENCE_END.split(text.strip()) if s.strip()]
    return sentences[-1] if sentences else ""


def judge(prompt: str, response: str) -> bool:
    last = _last_sentence(response)
    return last.endswith("?") and re.search(r"\byou(r)?\b", last, re.IGNORECASE) is not None


def rewrite(prompt: str, response: str) -> str | None:
    """The first two sentences and a follow-up question."""
    if judge(prompt, response) or not response.strip():
        return None
    sentences = [s for s in SENTENCE_END.split(response.strip()) if s.strip()]
    # A list marker ("1.") ends no sentence: keep sentences of three words or more.
    full = [s for s in sentences if len(s.split()) >= 3 and s[-1:] in ".!?"]
    kept = full[:2] or [sentences[0].rstrip(",;: ") + "."]
    return " ".join(kept) + " Would you like me to go into more detail?"
