"""A simulated user who wants a casual, spoken register: talk to me ("you"), with
contractions ("it's", "don't"), and none of the stiff connectors of an essay
("Additionally,", "Furthermore,", "In conclusion,", "It is important to note").

A language-register taste opposite to oracle_formal.py, written after the other eleven
had been run, as a check of the defaults on a taste nobody tuned for. The rewrite
contracts what it can and drops the stiff connectors, so it is about as long as the
answer; an answer that does not talk to the reader, or has nothing to contract, cannot be
made casual by that edit and gets only a 👎 (of SmolLM2's answers to the 80 held-out
prompts, at 64 tokens: 29% liked, and 1 answer rewritable).
Same interface as ../shared/eval/oracle_concise.py:
judge(prompt, response) -> bool, rewrite(prompt, response) -> str | None.
"""

import re

CONTRACTION = re.compile(
    r"\b(?:\w+n['’]t|(?:i|you|we|they|he|she|it|that|there|what|who|let|here)['’](?:m|re|ve|ll|d|s))\b",
    re.IGNORECASE,
)
# The stiff connectors, written once for the judge and the rewrite: an essay's openers
# ("Additionally, ...") and its preamble ("It is important to ...").
OPENERS = r"additionally|furthermore|moreover|in conclusion|in summary|to summari[sz]e"
PREAMBLE = r"it is (?:important|essential|crucial) to|it's (?:important|essential|crucial) to note"
STIFF = re.compile(rf"\b(?:{OPENERS}|{PREAMBLE})\b", re.IGNORECASE)
# Spelled out -> contracted, the common cases a person fixes when they edit.
CONTRACT = (
    ("do not", "don't"),
    ("does not", "doesn't"),
    ("did not", "didn't"),
    ("is not", "isn't"),
    ("are not", "aren't"),
    ("was not", "wasn't"),
    ("cannot", "can't"),
    ("can not", "can't"),
    ("will not", "won't"),
    ("would not", "wouldn't"),
    ("should not", "shouldn't"),
    ("it is", "it's"),
    ("that is", "that's"),
    ("there is", "there's"),
    ("here is", "here's"),
    ("you are", "you're"),
    ("you will", "you'll"),
    ("you have", "you've"),
    ("we are", "we're"),
    ("they are", "they're"),
    ("i am", "I'm"),
    ("let us", "let's"),
)


YOU = re.compile(r"\b(?:you|your|yours|yourself)\b", re.IGNORECASE)


def judge(prompt: str, response: str) -> bool:
    text = response.strip()
    return (
        bool(text)
        and YOU.search(text) is not None
        and CONTRACTION.search(text) is not None
        and STIFF.search(text) is None
    )


def _contract(text: str) -> str:
    for long, short in CONTRACT:
        pattern = re.compile(rf"\b{long}\b", re.IGNORECASE)
        text = pattern.sub(
            lambda m, short=short: (
                short[0].upper() + short[1:] if m.group(0)[0].isupper() else short
            ),
            text,
        )
    return text


def _drop_stiff(text: str) -> str:
    # "Additionally, you can ..." -> "You can ..."; a preamble ("It is important to note
    # that x") leaves what follows it.
    text = re.sub(
        rf"\b(?:{OPENERS}),\s*(\w)", lambda m: m.group(1).upper(), text, flags=re.IGNORECASE
    )
    text = re.sub(rf"\b(?:{PREAMBLE})\s+(?:note\s+)?(?:that\s+)?", "", text, flags=re.IGNORECASE)
    # Capitalise a sentence whose opening was dropped.
    return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def rewrite(prompt: str, response: str) -> str | None:
    """The same answer in a casual register."""
    if judge(prompt, response) or not response.strip():
        return None
    text = _drop_stiff(_contract(response.strip()))
    return text if judge(prompt, text) else None
