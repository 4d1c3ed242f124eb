"""A simulated user who wants plain language: short sentences and everyday words.

A language-register taste (readability), not a length or format one: 👍 when every
sentence has at most 16 words and at most 1 word in 12 is long (9 letters or
more), the way plain-language guides measure text. The rewrite splits long
sentences at commas and conjunctions and swaps common long words for short ones.
Same interface as ../shared/eval/oracle_concise.py.
"""

import re

MAX_SENTENCE_WORDS = 16
LONG_WORD = 9
MAX_LONG_SHARE = 1 / 12

SIMPLER = {
    "approximately": "about",
    "additionally": "also",
    "utilize": "use",
    "utilizes": "uses",
    "demonstrate": "show",
    "demonstrates": "shows",
    "individuals": "people",
    "individual": "person",
    "therefore": "so",
    "however": "but",
    "furthermore": "also",
    "numerous": "many",
    "purchase": "buy",
    "assistance": "help",
    "component": "part",
    "components": "parts",
    "requirements": "needs",
    "commence": "start",
    "sufficient": "enough",
    "consequently": "so",
    "particularly": "mainly",
    "significant": "big",
    "significantly": "much",
    "information": "facts",
    "temperature": "heat",
    "environment": "world",
    "important": "key",
    "understanding": "grasp",
    "especially": "mainly",
    "different": "other",
    "including": "like",
    "typically": "often",
    "generally": "mostly",
    "everything": "all",
    "something": "a thing",
    "delicious": "tasty",
    "beautiful": "lovely",
}


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+(?:'[a-z]+)?", text)


def judge(prompt: str, response: str) -> bool:
    words = _words(response)
    if not words:
        return False
    long_share = sum(len(w) >= LONG_WORD for w in words) / len(words)
    return long_share <= MAX_LONG_SHARE and all(
        len(_words(s)) <= MAX_SENTENCE_WORDS for s in _sentences(response)
    )


def _simplify_words(text: str) -> str:
    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        simple = SIMPLER.get(word.lower())
        if simple is None:
            return word
        return simple.capitalize() if word[0].isupper() else simple

    return re.sub(r"[A-Za-z]+", swap, text)


def _split_long(sentence: str) -> list[str]:
    if len(_words(sentence)) <= MAX_SENTENCE_WORDS:
        return [sentence]
    parts = [p.strip() for p in re.split(r",\s+|;\s+|\s+(?:and|but|which|because)\s+", sentence)]
    out = []
    for part in parts:
        words = part.split()
        while words:
            chunk, words = words[:MAX_SENTENCE_WORDS], words[MAX_SENTENCE_WORDS:]
            text = " ".join(chunk).rstrip(".!?,;:")
            if text:
                out.append(text[0].upper() + text[1:] + ".")
    return out


def rewrite(prompt: str, response: str) -> str | None:
    """Short sentences, common words: the first four sentences of the answer, split."""
    if judge(prompt, response) or not response.strip():
        return None
    sentences = []
    for sentence in _sentences(_simplify_words(response))[:4]:
        sentences.extend(_split_long(sentence))
    # A sentence still full of long words (names, terms) is dropped rather than mangled.
    kept = [s for s in sentences if s.strip(". ") and judge(prompt, s)]
    text = " ".join(kept)
    return text if len(_words(text)) >= 5 and judge(prompt, text) else None
