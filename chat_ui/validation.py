"""Every value that reaches the chat from outside, checked before any work is done on it.

This is the one place for input checks (the web layer, the handlers and the access
module call these; nothing else parses user values). Each check looks at the type
first, then finiteness, then range or length, and raises :class:`InputError` with a
message a person can act on. A check never mutates anything, so a refused request
leaves the session exactly as it was.

Nothing here runs in more than linear time on user text: no backtracking regex sees a
string of unbounded length (see :func:`strip_footer`, which replaced a regex that
took an hour on a 1 MB run of blanks), and every number is parsed from a string of
at most :data:`MAX_NUMBER_CHARS` characters.

Limits that a deployment may want to change live in :class:`~rlhf_core.settings.Settings`
(``max_input_chars``, ``max_system_prompt_chars``); the ranges of the sampling
controls are fixed here and the page's sliders are built from them.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

from rlhf_core.feedback import clean_text
from rlhf_core.settings import Settings

# Ranges of the sampling controls: the sliders on the page use the same numbers.
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.05, 1.0)
MIN_TEMPERATURE = 0.01  # besides 0 (greedy)
MAX_NEW_TOKENS_RANGE = (1, 1024)
MAX_NUMBER_CHARS = 32  # a number sent as text longer than this is not a number we need
MAX_INDEX = 100_000  # more messages than one chat can hold
MAX_VERSION = 10**9
MAX_SESSION_ID_CHARS = 256
MAX_KIND_CHARS = 16
MAX_EDIT_PARTS = 64  # a Chatbot edit value may come as a list of text parts

VOTE_KINDS = {
    "like": "like", "dislike": "dislike", "unvote": "unvote", "none": "unvote", "": "unvote"
}  # fmt: skip

# The footer under every answer ("written by v3 · edited by you"), which the editor shows
# and an edited answer therefore often still carries. Matched only on the short tail
# that follows the last "<sub>written by v", never on the whole text.
_FOOTER_OPEN = "<sub>written by v"
_FOOTER_CLOSE = "</sub>"
_FOOTER_BODY = re.compile(r"\d+[^<]*")


class InputError(ValueError):
    """The person's input cannot be used; the message says what to do instead."""


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


# --- numbers --------------------------------------------------------------------------
def number(
    value: Any,
    what: str,
    *,
    lo: float,
    hi: float,
    integer: bool = False,
    default: float | None = None,
    lo_open: bool = False,
) -> float:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``). Accepts ints,
    floats and short numeric strings (a dropdown or a hand-written API call sends text);
    ``None`` or ``""`` gives ``default`` when there is one. With ``integer`` the value
    must be whole (``3.0`` is 3, ``3.5`` is refused) and an ``int`` comes back."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if default is not None:
            return int(default) if integer else float(default)
        raise InputError(f"{what} is missing: give a number between {lo:g} and {hi:g}.")
    if isinstance(value, bool):
        raise InputError(f"{what} must be a number, not true/false.")
    if isinstance(value, str):
        if len(value) > MAX_NUMBER_CHARS:
            raise InputError(f"{what} must be a number; got {len(value):,} characters of text.")
        try:
            parsed = float(value.strip())
        except ValueError:
            raise InputError(f"{what} must be a number, got {value!r}.") from None
    elif isinstance(value, numbers.Real):
        try:
            parsed = float(value)
        except OverflowError:  # an int with more digits than a float holds
            parsed = math.inf if value > 0 else -math.inf
    else:
        raise InputError(f"{what} must be a number, got {_kind(value)}.")
    if not math.isfinite(parsed):
        raise InputError(f"{what} must be a finite number between {lo:g} and {hi:g}, got {parsed}.")
    low_ok = parsed > lo if lo_open else parsed >= lo
    if not low_ok or parsed > hi:
        bound = f"above {lo:g}" if lo_open else f"at least {lo:g}"
        raise InputError(f"{what} must be {bound} and at most {hi:g}; got {parsed:g}.")
    if integer:
        if not parsed.is_integer():
            raise InputError(f"{what} must be a whole number, got {parsed:g}.")
        return int(parsed)
    return parsed


def integer(value: Any, what: str, *, lo: int, hi: int, default: int | None = None) -> int:
    return int(number(value, what, lo=lo, hi=hi, integer=True, default=default))


def sampling(temperature: Any, top_p: Any, max_new_tokens: Any, settings: Settings) -> dict:
    """The three sampling controls, checked; a missing one takes the server's default."""
    return {
        "temperature": _temperature(temperature, settings),
        "top_p": number(
            top_p, "Top-p", lo=0.0, hi=TOP_P_RANGE[1], lo_open=True, default=settings.top_p
        ),
        "max_new_tokens": integer(
            max_new_tokens, "Max new tokens", lo=MAX_NEW_TOKENS_RANGE[0],
            hi=MAX_NEW_TOKENS_RANGE[1], default=settings.max_new_tokens,
        ),
    }  # fmt: skip


def _temperature(value: Any, settings: Settings) -> float:
    """0 means greedy decoding; otherwise at least MIN_TEMPERATURE: the logits are divided
    by it, and 1e-182 turned them into infinities that sampling refuses (a RuntimeError
    the fuzz test found)."""
    lo, hi = TEMPERATURE_RANGE
    value = number(value, "Temperature", lo=lo, hi=hi, default=settings.temperature)
    if 0 < value < MIN_TEMPERATURE:
        raise InputError(
            f"Temperature must be 0 (always the likeliest word) or between {MIN_TEMPERATURE:g} "
            f"and {hi:g}; got {value:g}."
        )
    return value


def sampling_dict(value: Any, settings: Settings) -> dict:
    """A sampling dict from a caller of the handlers (``None`` = the defaults)."""
    if value is None:
        return sampling(None, None, None, settings)
    if not isinstance(value, dict):
        raise InputError(f"Sampling settings must be a mapping, got {_kind(value)}.")
    unknown = set(value) - {"temperature", "top_p", "max_new_tokens"}
    if unknown:
        names = ", ".join(sorted(map(str, unknown)))[:200]
        raise InputError(
            f"Unknown sampling settings: {names}; use temperature, top_p, max_new_tokens."
        )
    return sampling(
        value.get("temperature"), value.get("top_p"), value.get("max_new_tokens"), settings
    )


def answer_index(value: Any) -> int:
    """The index of a message in the chat (negative counts from the end)."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = value[0]  # a Chatbot event in (row, column) form names the row
    return integer(value, "The answer index", lo=-MAX_INDEX, hi=MAX_INDEX)


def version(value: Any) -> int:
    """A policy version number (0 = the base model)."""
    return integer(value, "The version", lo=0, hi=MAX_VERSION)


# --- text -----------------------------------------------------------------------------
def text(value: Any, what: str, *, limit: int, allow_empty: bool = False, hint: str = "") -> str:
    """Text of at most ``limit`` characters after trimming; lone surrogates become U+FFFD
    (see :func:`rlhf_core.feedback.clean_text`). ``None`` counts as empty."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InputError(f"{what} must be text, got {_kind(value)}.")
    cleaned = clean_text(value).strip()
    if not cleaned and not allow_empty:
        raise InputError(f"{what} is empty.{(' ' + hint) if hint else ''}")
    if len(cleaned) > limit:
        raise InputError(
            f"{what} is {len(cleaned):,} characters long; the limit is {limit:,}. "
            f"Shorten it.{(' ' + hint) if hint else ''}"
        )
    return cleaned


def message(value: Any, settings: Settings) -> str:
    """A chat message from the person."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError("Type a message first: an empty message cannot be answered.")
    if isinstance(value, str):
        cleaned = clean_text(value).strip()
        if len(cleaned) > settings.max_input_chars:
            raise InputError(
                f"Your message is {len(cleaned):,} characters long; the limit is "
                f"{settings.max_input_chars:,} (RLHF_MAX_INPUT_CHARS). Shorten it or send it in "
                "parts; your text is still in the box."
            )
        return cleaned
    raise InputError(f"The message must be text, got {_kind(value)}.")


def system_prompt(value: Any, settings: Settings) -> str | None:
    """The system prompt box: ``None`` means "the server's default"; an empty box means
    no system prompt."""
    if value is None:
        return None
    return text(
        value, "The system prompt", limit=settings.max_system_prompt_chars, allow_empty=True
    )


def edited_text(value: Any) -> str:
    """A Chatbot edit value as one string: text, or a list of text parts."""
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_EDIT_PARTS:
            raise InputError("The edited answer came in too many parts; edit it as plain text.")
        parts = []
        for part in value:
            if isinstance(part, dict):
                part = part.get("text", "")
            if not isinstance(part, str):
                raise InputError(f"The edited answer must be text, got {_kind(part)}.")
            parts.append(part)
        return "".join(parts)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"The edited answer must be text, got {_kind(value)}.")
    return value


def rewrite(value: Any, settings: Settings, original_chars: int) -> str:
    """An edited answer: the footer the editor shows is removed; an answer may grow to
    four times the original or ``max_input_chars``, whichever is more."""
    limit = max(settings.max_input_chars, 4 * original_chars)
    raw = edited_text(value)
    # Every step below is linear in the length of the text (see strip_footer).
    cleaned = strip_footer(clean_text(raw)).strip()
    if not cleaned:
        raise InputError(
            "An edited answer cannot be empty. To say the answer is bad, use 👎; "
            "to get another one, use Regenerate."
        )
    if len(cleaned) > limit:
        raise InputError(
            f"The edited answer is {len(cleaned):,} characters long; the limit is {limit:,}. "
            "Shorten it."
        )
    return cleaned


def strip_footer(value: str) -> str:
    """``value`` without a trailing "written by vN …" footer, in linear time.

    Equivalent to ``re.sub(r"\\s*<sub>written by v\\d+[^<]*</sub>\\s*$", "", value)``, whose
    leading ``\\s*`` made the regex engine retry at every blank of a long run of blanks
    (quadratic: 40,000 blanks took 6.6 s, holding the interpreter lock)."""
    body = value.rstrip()
    if not body.endswith(_FOOTER_CLOSE):
        return value
    start = body.rfind(_FOOTER_OPEN)
    if start < 0:
        return value
    inner = body[start + len(_FOOTER_OPEN) : len(body) - len(_FOOTER_CLOSE)]
    # [^<]* cannot cross a "<": the footer is the tail after the last "<sub>written by v".
    if _FOOTER_BODY.fullmatch(inner) is None:
        return value
    return body[:start].rstrip()


def vote_kind(value: Any) -> str:
    """like / dislike / unvote (``none`` and empty mean unvote)."""
    if value is None:
        value = ""
    if not isinstance(value, str) or len(value) > MAX_KIND_CHARS or value not in VOTE_KINDS:
        shown = repr(value)[:40] if isinstance(value, str) else _kind(value)
        raise InputError(f"Unknown vote {shown}; use 'like', 'dislike' or 'unvote'.")
    return VOTE_KINDS[value]


def session_id(value: Any) -> str:
    """The id of a browser session: printable text the store can keep as it is."""
    if not isinstance(value, str) or not value.strip():
        # A blank id is no id (the store refuses it, after the answer was generated).
        raise InputError("No session id: reload the page.")
    if len(value) > MAX_SESSION_ID_CHARS or not value.isprintable() or clean_text(value) != value:
        raise InputError(
            "This session id cannot be used (too long or not plain text): reload the page."
        )
    return value


def unchecked(component: Any) -> Any:
    """A Gradio input component whose value reaches the handler as sent, to be checked
    here: Gradio's own range check of a slider or number lets NaN through and answers
    text with a Python error. (Set on the instance: a subclass of a component makes
    Gradio write a .pyi file next to the module that defines it.)"""
    component.preprocess = lambda payload: payload
    return component
