"""A simulated user who wants a formal, impersonal register: no contractions, no
exclamation marks, no chatty openers, no emoji, and no "I" or "you" (the way a
reference work is written: "one adds the flour", not "you add the flour").

A language-register taste, unrelated to length or layout, and opposite in tone to
oracle_upbeat.py. The rewrite expands contractions, drops the chatty opener and
turns exclamation marks into full stops, so it is about as long as the answer.
Same interface as ../shared/eval/oracle_concise.py:
judge(prompt, response) -> bool, rewrite(prompt, response) -> str | None.
"""

import re

# Contractions written with an apostrophe (straight or curly); "'s" is left out because
# it is also the possessive ("the cat's tail"), except after the pronouns below.
CONTRACTION = re.compile(
    r"\b(?:\w+n['’]t|(?:i|you|we|they|he|she|it|that|there|what|who|let)['’](?:m|re|ve|ll|d|s))\b",
    re.IGNORECASE,
)
CHATTY_OPENERS = (
    "sure",
    "great",
    "absolutely",
    "of course",
    "okay",
    "ok",
    "hey",
    "hi",
    "well",
    "oh",
    "wow",
    "yes!",
    "certainly!",
    "happy to",
    "glad",
)
PERSONAL = re.compile(r"\b(?:you|your|yours|yourself|i|me|my)\b", re.IGNORECASE)
EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf]")

IMPERSONAL = (
    ("you are", "one is"),
    ("yourself", "oneself"),
    ("yours", "one's"),
    ("your", "one's"),
    ("you", "one"),
)

EXPANSIONS = {
    "can't": "cannot",
    "won't": "will not",
    "shan't": "shall not",
    "i'm": "I am",
    "let's": "let us",
    "it's": "it is",
    "that's": "that is",
    "there's": "there is",
    "what's": "what is",
    "who's": "who is",
    "he's": "he is",
    "she's": "she is",
}


def judge(prompt: str, response: str) -> bool:
    text = response.strip()
    if not text or "!" in text or EMOJI.search(text) or CONTRACTION.search(text):
        return False
    if PERSONAL.search(text):
        return False
    return not text.lower().startswith(CHATTY_OPENERS)


def _expand(match: re.Match[str]) -> str:
    word = match.group(0).replace("’", "'")
    lower = word.lower()
    if lower in EXPANSIONS:
        out = EXPANSIONS[lower]
    elif lower.endswith("n't"):
        out = word[:-3] + " not"
    else:
        stem, _, tail = word.partition("'")
        out = (
            stem
            + " "
            + {"m": "am", "re": "are", "ve": "have", "ll": "will", "d": "would", "s": "is"}[
                tail.lower()
            ]
        )
    return out[0].upper() + out[1:] if word[0].isupper() else out


def rewrite(prompt: str, response: str) -> str | None:
    """The same answer in a formal register."""
    if judge(prompt, response) or not response.strip():
        return None
    text = EMOJI.sub("", response.strip())
    text = CONTRACTION.sub(_expand, text)
    text = text.replace("!", ".")
    for personal, impersonal in IMPERSONAL:
        text = re.sub(rf"\b{personal}\b", impersonal, text)
        text = re.sub(rf"\b{personal.capitalize()}\b", impersonal.capitalize(), text)
    # Sentences about the writer ("I think ...") have no impersonal form: drop them.
    sentences = re.split(r"(?<=[.!?])\s+", text)
    text = " ".join(s for s in sentences if not re.search(r"\b(?:I|me|my|My)\b", s))
    # Drop a chatty opener sentence ("Sure. Here is ..." -> "Here is ...").
    first, _, rest = text.partition(" ")
    while text.lower().startswith(CHATTY_OPENERS) and rest:
        text = re.split(r"(?<=[.,:;])\s+", text, maxsplit=1)[-1]
        first, _, rest = text.partition(" ")
    text = text[0].upper() + text[1:] if text else text
    return text if judge(prompt, text) else None
